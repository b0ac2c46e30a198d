// Standard gRPC health checking (grpc.health.v1.Health/Check), as grpc_health_probe and service
// managers use it, against the real agent.

import assert from "node:assert/strict";
import { Status } from "../src/errors.ts";
import { health, SERVICE_NAME } from "../src/wire.ts";
import { withAgent } from "./helpers/agent.ts";
import { rejectsWith } from "./helpers/assertions.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";

Deno.test("health: the agent and each loaded model report SERVING; unknown services are NOT_FOUND", async () => {
  await withAgent({}, async (agent) => {
    const check = (service: string) => agent.client.health(service);
    assert.equal(await check(""), health.status.SERVING);
    assert.equal(await check(SERVICE_NAME), health.status.SERVING);
    await rejectsWith(check("model/addsub"), Status.NOT_FOUND, /unknown service "model\/addsub"/);
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    assert.equal(await check("model/addsub"), health.status.SERVING);
    await agent.client.unloadModel("addsub");
    await rejectsWith(check("model/addsub"), Status.NOT_FOUND);
    await rejectsWith(check("some.Other"), Status.NOT_FOUND);
  });
});
