// Runs happen off the JavaScript thread: control-plane calls are answered during a long Predict,
// predicts run side by side, and an unload never frees a session under a running Run.

import assert from "node:assert/strict";
import { Status } from "../src/errors.ts";
import { enumValues } from "../src/wire.ts";
import { startAgent } from "./helpers/agent.ts";
import { floats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { addSubModel, slowModel, writeModelFolder } from "./helpers/onnx_models.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;
const N = 512;

/** x is diagonal-free noise; the slow model multiplies by the identity, so y must equal x. */
function slowInput(seed: number): Float32Array {
  return Float32Array.from({ length: N * N }, (_, i) => ((i * 2654435761 + seed) % 1000) / 1000);
}

Deno.test("concurrency: the agent answers while a slow Predict runs, and unload waits for it", async (t) => {
  const agent = await startAgent();
  const { client } = agent;
  try {
    await client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(N, 200)), "slow");
    await client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    const slowRequest = (seed: number) => [tensor("x", FLOAT32, [N, N], slowInput(seed))];

    await t.step(
      "ListModels, DescribeModel and another model's Predict are answered during a slow Predict",
      async () => {
        const order: string[] = [];
        const started = performance.now();
        const slow = client.predict("slow", slowRequest(1)).then((r) => {
          order.push("slow");
          return r;
        });
        // Give the slow call time to reach ONNX Runtime.
        await new Promise((r) => setTimeout(r, 30));
        for (let i = 0; i < 2; i++) {
          await client.listModels();
          await client.describeModel("slow");
          const { tensors } = await client.predict("addsub", [
            tensor("a", FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1)),
            tensor("b", FLOAT32, [2, 2], Float32Array.of(i, i, i, i)),
          ]);
          assert.deepEqual([...floats(tensors[0].byte_data)], [1 + i, 1 + i, 1 + i, 1 + i]);
        }
        order.push("control");
        const result = await slow;
        const slowMs = performance.now() - started;
        assert.deepEqual(order, ["control", "slow"], `the slow Predict took ${slowMs.toFixed(0)} ms`);
        assert.deepEqual(floats(result.tensors[0].byte_data), slowInput(1));
      },
    );

    await t.step("concurrent Predicts on one model each get their own answer", async () => {
      const results = await Promise.all([2, 3, 4].map((seed) => client.predict("slow", slowRequest(seed))));
      results.forEach((r, i) => assert.deepEqual(floats(r.tensors[0].byte_data), slowInput(i + 2)));
    });

    await t.step("concurrent LoadModel of one name: exactly one wins, the others get ALREADY_EXISTS", async () => {
      const folder = await writeModelFolder(agent.modelsDir, "addsub2", addSubModel());
      const outcomes = await Promise.allSettled([1, 2, 3, 4].map(() => client.loadModel(folder, "twin")));
      assert.equal(outcomes.filter((o) => o.status === "fulfilled").length, 1);
      for (const o of outcomes.filter((o) => o.status === "rejected")) {
        assert.equal((o as PromiseRejectedResult).reason.code, Status.ALREADY_EXISTS);
      }
      await client.unloadModel("twin");
    });

    await t.step("UnLoadModel during a running Predict waits for it; the Predict succeeds", async () => {
      let predictDone = 0;
      let unloadDone = 0;
      const slow = client.predict("slow", slowRequest(5)).then((r) => {
        predictDone = performance.now();
        return r;
      });
      await new Promise((r) => setTimeout(r, 30));
      const unload = client.unloadModel("slow").then(() => unloadDone = performance.now());
      // Once unloading has begun, new calls see the model as gone.
      await new Promise((r) => setTimeout(r, 10));
      await rejectsWith(client.predict("slow", slowRequest(6)), Status.NOT_FOUND);
      const [result] = await Promise.all([slow, unload]);
      assert.deepEqual(floats(result.tensors[0].byte_data), slowInput(5));
      // Both answers leave the agent in the same turn once the Run ends; an unload that did not
      // wait would have been answered while the Run (hundreds of ms) was still going.
      assert.ok(unloadDone >= predictDone - 50, `unload answered ${(predictDone - unloadDone).toFixed(0)} ms early`);
      assert.deepEqual((await client.listModels()).models.map((m) => m.name), ["addsub"]);
    });
  } finally {
    assert.equal((await agent.stop()).code, 0, agent.logs());
    await Deno.remove(agent.dir, { recursive: true });
  }
});
