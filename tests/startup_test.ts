// What the agent loads to start serving: only what serving needs. Archives, signatures, reflection
// descriptors, the S3 signer and image codecs load when first used (README "Memory and start-up"), yet
// stay in the executable's module graph, so `deno compile` embeds them.

import assert from "node:assert/strict";
import { join } from "node:path";
import { compileArgs } from "../build.ts";
import { AGENT_V8_FLAGS, parseProfile } from "../src/permissions.ts";
import { enumValues } from "../src/service/wire.ts";
import { agentDeployment, COMPILE_CONFIG, MAIN, parseLogs, PROJECT_ROOT, startAgent } from "./helpers/agent.ts";
import { tensor } from "./helpers/assertions.ts";
import { identityModel, OnnxType, slowModel, writeModelFolder } from "./helpers/onnx_models.ts";
import { until } from "./helpers/wait.ts";

interface GraphModule {
  specifier: string;
  dependencies?: { code?: { specifier?: string }; isDynamic?: boolean }[];
}

async function moduleGraph(): Promise<Map<string, GraphModule>> {
  const info = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", "--config", COMPILE_CONFIG, MAIN],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert(info.success, new TextDecoder().decode(info.stderr));
  const { modules } = JSON.parse(new TextDecoder().decode(info.stdout)) as { modules: GraphModule[] };
  return new Map(modules.map((m) => [m.specifier, m]));
}

/** Every module `from` loads before its own code runs: its static value imports, transitively. */
function staticClosure(graph: Map<string, GraphModule>, from: string): Set<string> {
  const seen = new Set<string>();
  const visit = (specifier: string) => {
    if (seen.has(specifier)) return;
    seen.add(specifier);
    for (const dependency of graph.get(specifier)?.dependencies ?? []) {
      if (!dependency.isDynamic && dependency.code?.specifier) visit(dependency.code.specifier);
    }
  };
  visit(from);
  return seen;
}

/** Loaded when first needed, by what needs them. */
const FIRST_USE = [
  /npm:\/?@peculiar\/x509/,
  /npm:\/?reflect-metadata/,
  /npm:\/?tar-stream/,
  /npm:\/?@smithy\//,
  /npm:\/?pngjs/,
  /npm:\/?jpeg-js/,
  /npm:\/?protobufjs@[^/]+\/ext\/descriptor/,
  /\/src\/service\/reflection\.ts$/,
  /\/src\/packages\/archive\.ts$/,
  /\/src\/packages\/oms\/mod\.ts$/,
];

Deno.test("serving loads no archive, signature, reflection, S3 or image code until first used; the executable embeds them", async () => {
  const graph = await moduleGraph();
  const agent = new URL("src/agent.ts", `file://${PROJECT_ROOT}`).href;
  assert(graph.has(agent), "src/agent.ts is in main.ts's graph");
  const atStart = [...staticClosure(graph, agent)];
  assert.deepEqual(atStart.filter((s) => FIRST_USE.some((pattern) => pattern.test(s))), []);
  // Still reachable, through dynamic imports with literal specifiers: what deno compile includes.
  const everything = [...graph.keys()];
  for (const pattern of FIRST_USE) assert(everything.some((s) => pattern.test(s)), `${pattern} is in the graph`);
  // The serve path itself stays whole: protobufjs and the transport load at start.
  assert(atStart.some((s) => /npm:\/?protobufjs/.test(s)));
  assert(atStart.some((s) => s.endsWith("/src/transport/http2.ts")));
});

Deno.test("the agent runs with its V8 flags, from deno run as from the compiled executable", async () => {
  const profile = parseProfile(JSON.parse(await Deno.readTextFile(join(PROJECT_ROOT, "deploy", "profile.json"))), "p");
  const compiled = compileArgs("x86_64-unknown-linux-gnu", profile, "/tmp/edge-agent");
  const dir = await Deno.makeTempDir();
  const run = (await agentDeployment(dir, {})).args;
  await Deno.remove(dir, { recursive: true });
  for (const flag of AGENT_V8_FLAGS) {
    assert.ok(compiled.includes(flag), compiled.join(" "));
    // Before the entry module: after it, deno would pass the flag to the program as an argument.
    assert.ok(run.indexOf(flag) >= 0 && run.indexOf(flag) < run.indexOf(MAIN), run.join(" "));
  }
  assert.ok(AGENT_V8_FLAGS.some((f) => f.includes("--expose-gc")), "gc() collects what a model load left behind");
});

Deno.test("what model loads leave behind is collected once, when no call is in flight", async () => {
  const agent = await startAgent({ config: { sagemaker_edge_log_verbose: true } });
  try {
    const n = 512;
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "a", identityModel(OnnxType.FLOAT)), "a");
    // A Predict that outlasts the quiet period the collection waits for.
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(n, 300)), "slow");
    const x = new Float32Array(n * n).fill(0.5);
    await agent.client.predict("slow", [tensor("x", enumValues("DataType").FLOAT32, [n, n], x)]);
    const collections = () => parseLogs(agent.logs()).filter((l) => l.msg === "memory after a model change (MiB)");
    await until(() => collections().length > 0, "the leftovers are collected");
    // Past another quiet period: a second collection would have happened by now.
    await new Promise((r) => setTimeout(r, 1500));
    const logs = parseLogs(agent.logs());
    const collected = logs.findIndex((l) => l.msg === "memory after a model change (MiB)");
    const predicted = logs.findIndex((l) => l.msg === "rpc" && l.rpc === "Predict");
    assert.ok(collected >= 0, "the leftovers are collected");
    assert.ok(collected > predicted, "not while the Predict was in flight");
    assert.equal(collections().length, 1, "two loads in a row are collected once");
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});
