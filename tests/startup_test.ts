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

const COLLECTION = "memory after a model change (MiB)";

Deno.test("what a model load leaves behind is collected after a Predict that outlasts the quiet second has finished", async () => {
  const agent = await startAgent({ config: { sagemaker_edge_log_verbose: true } });
  try {
    const n = 512;
    // Runs for seconds (0.9 s per 300 steps on a busy 2-core machine).
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(n, 1200)), "slow");
    const x = new Float32Array(n * n).fill(0.5);
    await agent.client.predict("slow", [tensor("x", enumValues("DataType").FLOAT32, [n, n], x)]);
    await agent.logged((l) => l.msg === COLLECTION, "a collection", 30_000);
    const logs = parseLogs(agent.logs());
    const collected = logs.findIndex((l) => l.msg === COLLECTION);
    assert.equal(logs[collected].collection, "last-resort");
    assert.ok(collected > logs.findIndex((l) => l.msg === "rpc" && l.rpc === "Predict"), "not while it ran");
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});

Deno.test("calls that keep coming after model loads get the regular collection, and the memory-reducing one once they pause", async () => {
  const agent = await startAgent({ config: { sagemaker_edge_log_verbose: true } });
  try {
    for (const name of ["a", "b"]) {
      await agent.client.loadModel(await writeModelFolder(agent.modelsDir, name, identityModel(OnnxType.FLOAT)), name);
    }
    const input = [tensor("x", enumValues("DataType").FLOAT32, [1, 3], new Float32Array(3))];
    // A camera application's pace: never a quiet second, until the agent's patience runs out.
    const deadline = Date.now() + 60_000;
    while (!agent.logs().includes('"collection":"regular"')) {
      assert.ok(Date.now() < deadline, "no regular collection while calls kept coming");
      await agent.client.predict("a", input);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    for (let i = 0; i < 3; i++) await agent.client.predict("a", input);
    await agent.logged((l) => l.msg === COLLECTION && l.collection === "last-resort", "the full collection", 30_000);
    const logs = parseLogs(agent.logs());
    const collections = logs.flatMap((l, i) => l.msg === COLLECTION ? [[i, l.collection]] : []);
    assert.deepEqual(collections.map(([, kind]) => kind), ["regular", "last-resort"], "two loads, collected once");
    const predicts = logs.flatMap((l, i) => l.msg === "rpc" && l.rpc === "Predict" ? [i] : []);
    const [[regular], [full]] = collections as [number, string][];
    assert.ok(predicts[0] < regular && regular < predicts.at(-1)!, "the regular one while calls went on");
    assert.ok(full > predicts.at(-1)!, "the memory-reducing one after they stopped");
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});
