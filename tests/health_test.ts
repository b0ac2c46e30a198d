// Standard gRPC health checking (grpc.health.v1.Health Check and Watch), as grpc_health_probe,
// service managers and load balancers use it, against the real agent.

import assert from "node:assert/strict";
import { Status } from "../src/errors.ts";
import { health, SERVICE_NAME } from "../src/service/wire.ts";
import * as grpc from "@grpc/grpc-js";
import { startAgent, withAgent } from "./helpers/agent.ts";
import { watch } from "./helpers/health_watch.ts";
import { rejectsWith } from "./helpers/assertions.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";

Deno.test("health: the agent and each loaded model report SERVING; unknown services are NOT_FOUND", async () => {
  await withAgent({}, async (agent) => {
    const check = (service: string) => agent.client.health(service);
    assert.equal(await check(""), health.status.SERVING);
    assert.equal(await check(SERVICE_NAME), health.status.SERVING);
    assert.equal(await check("capture"), health.status.SERVING, "captures reach their (Disk) destination");
    await rejectsWith(check("model/addsub"), Status.NOT_FOUND, /unknown service "model\/addsub"/);
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    assert.equal(await check("model/addsub"), health.status.SERVING);
    await agent.client.unloadModel("addsub");
    await rejectsWith(check("model/addsub"), Status.NOT_FOUND);
    await rejectsWith(check("some.Other"), Status.NOT_FOUND);
  });
});

Deno.test("health Watch: the status at once, then each change; NOT_SERVING and the end of the call when the agent stops", async () => {
  const agent = await startAgent({ config: { edge_agent_shutdown_grace_seconds: 20 } });
  const { SERVING, NOT_SERVING, SERVICE_UNKNOWN } = health.status;
  const model = watch(agent.socket, "model/addsub");
  const whole = watch(agent.socket, "");
  const leaving = watch(agent.socket, SERVICE_NAME);
  try {
    assert.deepEqual(await model.until(1), [SERVICE_UNKNOWN], "an unknown service is reported, not refused");
    assert.deepEqual(await whole.until(1), [SERVING]);
    await leaving.until(1);
    leaving.cancel();
    assert.equal((await leaving.ended).code, grpc.status.CANCELLED);

    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    assert.deepEqual(await model.until(2), [SERVICE_UNKNOWN, SERVING]);
    await agent.client.unloadModel("addsub");
    assert.deepEqual(await model.until(3), [SERVICE_UNKNOWN, SERVING, SERVICE_UNKNOWN]);
    assert.deepEqual(whole.statuses, [SERVING], "other services' watchers hear nothing");

    const stopping = performance.now();
    const status = await agent.stop();
    assert.equal(status.code, 0, agent.logs());
    assert.deepEqual(await whole.until(2), [SERVING, NOT_SERVING]);
    assert.equal((await whole.ended).code, grpc.status.OK);
    assert.equal((await model.ended).code, grpc.status.OK);
    const seconds = (performance.now() - stopping) / 1000;
    assert.ok(seconds < 10, `open Watch calls must not hold the stop for the 20 s grace period (took ${seconds} s)`);
  } finally {
    for (const w of [model, whole, leaving]) w.close();
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});
