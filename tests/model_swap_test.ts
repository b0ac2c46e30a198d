// The registry's swap, in process with the real ONNX Runtime: a Run in flight on the old version
// finishes on it before it is released, new calls go to the new version at once, and a version that
// fails to load leaves the one serving in place.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Libc } from "../ffi/libc.ts";
import { parseConfig } from "../src/config.ts";
import { Status } from "../src/errors.ts";
import { ModelRegistry, type PredictTiming } from "../src/inference/models.ts";
import { openRuntime } from "../src/inference/runtime.ts";
import { SharedMemoryReader } from "../src/inference/shm.ts";
import type { Tensor } from "../src/service/wire.ts";
import { tensor } from "./helpers/assertions.ts";
import { quiet } from "./helpers/capture_fixtures.ts";
import { addConstantModel } from "./helpers/deployments.ts";
import { writeModelFolder } from "./helpers/onnx_models.ts";
import { testTrust } from "./helpers/signing.ts";

const FLOAT32 = 5; // the wire's DataType
const SLOW = { side: 512, steps: 80 };
/** A request tensor as the server hands it on: decoded, with its oneof case set. */
const input = (shape: number[], x: Float32Array): Tensor => ({ ...tensor("x", FLOAT32, shape, x), data: "byte_data" });
const timing = (): PredictTiming => ({ bindMs: 0, runMs: 0, encodeMs: 0, copiedInputs: 0, sharedMemoryInputs: 0 });

Deno.test("swap: a Run in flight finishes on the old version before it is released; new calls get the new one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-swap-" });
  const root = join(dir, "models");
  const config = parseConfig({
    edge_agent_model_roots: [root],
    edge_agent_state_dir: join(dir, "state"),
    sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
  }).config;
  const ort = await openRuntime(config);
  const libc = Libc.open();
  const shm = new SharedMemoryReader(libc, { kind: "sysv", posixPrefix: "/edge_agent_", sysvKeepAttachedSeconds: 0 });
  const registry = new ModelRegistry(ort, shm, config, quiet);
  try {
    const v1 = await writeModelFolder(root, "v1", addConstantModel(1, SLOW));
    const v2 = await writeModelFolder(root, "v2", addConstantModel(2));
    const unsigned = await writeModelFolder(root, "v3", addConstantModel(3), { signed: false });
    const origin = (version: string) => ({ url: `s3://b/m-${version}.tar.gz`, sha256: version.repeat(64), version });
    await registry.deploy("m", v1, root, origin("1"));

    const events: string[] = [];
    const x = new Float32Array(SLOW.side * SLOW.side).fill(1);
    const slow = registry.predict(
      "m",
      [input([SLOW.side, SLOW.side], x)],
      (outputs) => new Float32Array(outputs[0].bytes.slice().buffer)[0],
      timing(),
    ).then((y) => {
      events.push("old Run done");
      return y;
    });
    const swapped = registry.deploy("m", v2, root, origin("2")).then(() => events.push("swap done"));
    while (registry.describe("m").version !== "2") await new Promise((r) => setTimeout(r, 5));
    assert.deepEqual(events, [], "the swap happened while the old Run was running");
    const fast = await registry.predict(
      "m",
      [input([1], new Float32Array([1]))],
      (outputs) => new Float32Array(outputs[0].bytes.slice().buffer)[0],
      timing(),
    );
    assert.equal(fast, 3, "a call after the swap gets the new version");
    assert.equal(await slow, 2, "the Run in flight answered from the old version");
    await swapped;
    assert.deepEqual(events, ["old Run done", "swap done"], "the old version was released after its Run");
    assert.equal(registry.describe("m").url, "s3://b/m-2.tar.gz");

    await assert.rejects(registry.deploy("m", unsigned, root, origin("3")), (error: { code: Status }) => {
      assert.equal(error.code, Status.FAILED_PRECONDITION);
      return true;
    });
    assert.equal(registry.describe("m").version, "2", "a version that fails leaves the old one serving");
  } finally {
    await registry.closeAll();
    ort.close();
    shm.close();
    libc.close();
    await Deno.remove(dir, { recursive: true });
  }
});
