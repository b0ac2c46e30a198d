// Operators' tools from another language: Python grpcio (the gRPC C core, as grpc_health_probe and
// grpcurl-like tools use) checks and watches health and reads reflection from the real agent.

import assert from "node:assert/strict";
import { join } from "node:path";
import { PROJECT_ROOT, withAgent } from "./helpers/agent.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";

const CLIENT = join(PROJECT_ROOT, "tests/python/operator_client.py");
const skipReason = await pythonGrpcMissing();
if (skipReason) console.log(`python_operator_test skipped: ${skipReason}`);

Deno.test({
  name: "grpcio: health Check and Watch across a model's load and unload; reflection lists and describes the Agent",
  ignore: skipReason !== null,
  async fn() {
    await withAgent({}, async (agent) => {
      const stubs = await generateStubs(agent.dir, ["health.proto", "reflection.proto"]);
      const url = await writeModelFolder(agent.modelsDir, "watched", addSubModel());
      const result = await new Deno.Command(PYTHON, {
        args: [CLIENT, "--stubs", stubs, "--socket", agent.socket, "--model-url", url],
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(60_000),
      }).output();
      const stderr = new TextDecoder().decode(result.stderr);
      assert.ok(result.success, stderr);
      const seen = JSON.parse(new TextDecoder().decode(result.stdout));
      assert.equal(seen.check, "SERVING");
      assert.deepEqual(seen.watch, ["SERVICE_UNKNOWN", "SERVING", "SERVICE_UNKNOWN"]);
      assert.deepEqual(seen.services, [
        "AWS.SageMaker.Edge.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
      ]);
      assert.equal(seen.agent_package, "AWS.SageMaker.Edge");
      assert.deepEqual(seen.agent_methods, [
        "CaptureData",
        "DescribeModel",
        "GetCaptureDataStatus",
        "ListModels",
        "LoadModel",
        "Predict",
        "UnLoadModel",
      ]);
      assert.deepEqual((await agent.client.listModels()).models, [], "the model the watcher saw is gone again");
    });
  },
});
