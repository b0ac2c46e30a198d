// The agent on aarch64 for real: the aarch64 Deno from npm and ONNX Runtime's arm64 library under
// qemu-user (tests/arm64/run-aarch64), driven from here over its Unix socket. Its outputs must
// match x86_64's. Slow under emulation (about half a minute), so one start serves every check.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { enumValues } from "../src/service/wire.ts";
import { PROJECT_ROOT, startAgent } from "./helpers/agent.ts";
import { floats, pseudoRandomFloats, tensor } from "./helpers/assertions.ts";
import { PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { installed } from "./helpers/tools.ts";

const RUN_AARCH64 = join(PROJECT_ROOT, "tests", "arm64", "run-aarch64");
/** .ci/run unpacks npm's @deno/linux-arm64-glibc here; EDGE_AGENT_ARM64_DENO overrides it. */
const ARM64_DENO = Deno.env.get("EDGE_AGENT_ARM64_DENO") ?? join(PROJECT_ROOT, ".cache", "deno-arm64", "deno");

async function missing(): Promise<string | null> {
  if (Deno.build.arch !== "x86_64") return "the host is not x86_64";
  if (Deno.uid() !== 0) return "run-aarch64 needs root (a private mount namespace)";
  for (const path of [RUN_AARCH64, ARM64_DENO]) {
    if (!await Deno.stat(path).then(() => true, () => false)) return `${path} is missing`;
  }
  return await installed("qemu-aarch64") ? null : "qemu-aarch64 is not installed (Debian qemu-user)";
}

const skip = await missing();
if (skip) console.log(`skipping the aarch64 run: ${skip}`);

Deno.test({
  name: "on aarch64 (qemu-user) the agent loads PP-OCR cls and predicts what x86_64 predicts",
  ignore: skip !== null,
  async fn() {
    const started = performance.now();
    const agent = await startAgent({ wrapper: [RUN_AARCH64], deno: ARM64_DENO });
    const readyMs = performance.now() - started;
    try {
      const folder = await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
      const { model } = await agent.client.loadModel(folder, "cls");
      assert.deepEqual(model.input_tensor_metadatas[0].shape, [-1, 3, -1, -1]);
      const shape = [1, 3, 48, 192];
      const input = pseudoRandomFloats(3 * 48 * 192, 11);
      const predictStarted = performance.now();
      const { tensors } = await agent.client.predict("cls", [
        tensor("x", enumValues("DataType").FLOAT32, shape, input),
      ]);
      const predictMs = performance.now() - predictStarted;
      const session = await ort.InferenceSession.create(PADDLE_CLS);
      const x86 = (await session.run({ x: new ort.Tensor("float32", input, shape) }))[session.outputNames[0]]
        .data as Float32Array;
      await session.release();
      const arm = floats(tensors[0].byte_data);
      assert.equal(arm.length, 2);
      for (let i = 0; i < arm.length; i++) assert.ok(Math.abs(arm[i] - x86[i]) < 1e-5, `${arm[i]} vs ${x86[i]}`);
      console.log(
        `aarch64 under qemu: ready ${(readyMs / 1000).toFixed(1)} s, Predict ${(predictMs / 1000).toFixed(1)} s`,
      );
    } finally {
      assert.equal((await agent.stop()).code, 0, agent.logs());
      await Deno.remove(agent.dir, { recursive: true });
    }
  },
});
