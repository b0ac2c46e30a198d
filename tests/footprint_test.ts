// The agent writes and reaches only what its deployment names, including through the native
// library it loads, which Deno's permissions do not cover.

import assert from "node:assert/strict";
import { join } from "node:path";
import { enumValues } from "../src/service/wire.ts";
import { startAgent } from "./helpers/agent.ts";
import { floats, tensor } from "./helpers/assertions.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";

async function denoDir(): Promise<string> {
  const { stdout } = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"], stdout: "piped" }).output();
  return JSON.parse(new TextDecoder().decode(stdout)).denoDir;
}

async function listTree(root: string): Promise<string[]> {
  const found: string[] = [];
  for await (const entry of Deno.readDir(root)) {
    const path = join(root, entry.name);
    found.push(path);
    if (entry.isDirectory) found.push(...await listTree(path));
  }
  return found;
}

Deno.test("ONNX Runtime's telemetry stays off: nothing is written to the service user's home", async () => {
  const home = await Deno.makeTempDir({ prefix: "edge-agent-home-" });
  // A minimal service environment: ONNX Runtime's telemetry also switches itself off when CI is set,
  // so the tests' own environment would hide it.
  const agent = await startAgent({
    clearEnv: true,
    env: { HOME: home, PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", DENO_DIR: await denoDir(), NO_COLOR: "1" },
  });
  try {
    const model = await writeModelFolder(agent.modelsDir, "identity", identityModel(OnnxType.FLOAT));
    await agent.client.loadModel(model, "identity");
    const x = Float32Array.from([1, 2, 3]);
    const out = await agent.client.predict("identity", [tensor("x", enumValues("DataType").FLOAT32, [1, 3], x)]);
    assert.deepEqual(floats(out.tensors[0].byte_data), x);
  } finally {
    assert.equal((await agent.stop()).code, 0, agent.logs());
    await Deno.remove(agent.dir, { recursive: true });
  }
  const written = await listTree(home);
  await Deno.remove(home, { recursive: true });
  assert.deepEqual(written, [], "the agent wrote into its home folder");
});
