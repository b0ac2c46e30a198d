// Deployments pulled by the real agent from the real S3 (s3rver): signed manifests and packages,
// swaps under load, refusals, removals, a download killed mid-way and resumed, and a start-up with
// the source unreachable.

import assert from "node:assert/strict";
import { join } from "node:path";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { health } from "../src/service/wire.ts";
import { type AgentProcess, parseLogs, startAgent } from "./helpers/agent.ts";
import { floats, tensor } from "./helpers/assertions.ts";
import { BUCKET, TestS3 } from "./helpers/capture_fixtures.ts";
import { S3Client } from "../src/capture/s3.ts";
import { publish, Relay, uploadFolder } from "./helpers/deployments.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";

const FLEET = "fleet-a";
const PREFIX = "rollout/";
const FLOAT32 = 5; // the wire's DataType

async function until<T>(what: string, check: () => Promise<T | null | false> | T | null | false, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await Promise.resolve(check()).catch(() => null);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** y for x = 1: which version answered (y = 1 + its constant). */
async function answer(agent: AgentProcess, model: string): Promise<number> {
  const { tensors } = await agent.client.predict(model, [tensor("x", FLOAT32, [1], new Float32Array([1]))]);
  return floats(tensors[0].byte_data)[0];
}

function deploymentConfig(dir: string, port: number): Record<string, unknown> {
  return {
    sagemaker_edge_core_device_fleet_name: FLEET,
    sagemaker_edge_core_region: "us-east-1",
    edge_agent_s3_endpoint: `http://127.0.0.1:${port}`,
    edge_agent_s3_force_path_style: true,
    edge_agent_deployment_source: `s3://${BUCKET}/${PREFIX}`,
    edge_agent_deployment_poll_seconds: 1,
    edge_agent_metrics: `unix:${join(dir, "metrics.sock")}`,
  };
}

const S3_ENV = { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" };

function start(dir: string, port: number): Promise<AgentProcess> {
  return startAgent({ dir, config: deploymentConfig(dir, port), env: S3_ENV });
}

const metrics = (agent: AgentProcess) => scrapeMetrics(`unix:${join(agent.dir, "metrics.sock")}`);

function refusals(agent: AgentProcess): Record<string, unknown>[] {
  return parseLogs(agent.logs()).filter((l) => l.msg === "deployment refused");
}

Deno.test("deployments: deploy, swap under load, refuse tampered and untrusted versions, remove; hand-loaded models stay", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-deploy-" });
  const published = join(dir, "published");
  const s3 = await TestS3.start(join(dir, "s3"));
  let agent: AgentProcess | null = null;
  try {
    const release = async (models: Parameters<typeof publish>[2], options?: Parameters<typeof publish>[3]) => {
      await publish(published, FLEET, models, options);
      await uploadFolder(s3.options, published, PREFIX);
    };
    await release([{ name: "m", version: "1", constant: 1 }]);
    const first = await Promise.all(
      ["deployment.json", "deployment.json.sig"].map((f) => Deno.readFile(join(published, f))),
    );
    agent = await start(join(dir, "agent"), s3.port);
    const a = agent;

    await until("v1 serving", async () => await answer(a, "m") === 2);
    const { model } = await a.client.describeModel("m");
    assert.equal(model.url, `s3://${BUCKET}/${PREFIX}packages/m-1.tar.gz`, "url carries the package");
    assert.equal(await a.client.health("model/m@1"), health.status.SERVING);
    await until("deployment converged", async () => await a.client.health("deployment") === health.status.SERVING);
    let samples = await metrics(a);
    assert.equal(samples.get('edge_agent_model_version_info{model="m",version="1"}'), 1);
    assert.equal(samples.get('edge_agent_deployment_model_result{model="m",version="1",result="applied"}'), 1);

    // Loaded by hand: no deployment touches it.
    await writeModelFolder(a.modelsDir, "hand", addSubModel());
    await a.client.loadModel(join(a.modelsDir, "hand"), "hand");

    // v2 while clients Predict: every call answers, from v1 then from v2.
    let stop = false;
    const seen = new Map<number, number>();
    const failures: string[] = [];
    const client = async () => {
      while (!stop) {
        try {
          const y = await answer(a, "m");
          seen.set(y, (seen.get(y) ?? 0) + 1);
        } catch (error) {
          failures.push((error as Error).message);
        }
      }
    };
    const clients = [client(), client(), client()];
    await release([{ name: "m", version: "2", constant: 2 }]);
    await until("v2 serving", () => (seen.get(3) ?? 0) > 20);
    stop = true;
    await Promise.all(clients);
    assert.deepEqual(failures, [], "no Predict failed during the swap");
    assert.ok((seen.get(2) ?? 0) > 0 && (seen.get(3) ?? 0) > 0, `answers ${JSON.stringify([...seen])}`);
    assert.deepEqual([...seen.keys()].sort(), [2, 3]);
    await a.logged((l) => l.msg === "model swapped" && l.model === "m" && l.version === "2", "m swapped to 2");

    // A package changed after signing: refused, v2 keeps serving.
    await release([{ name: "m", version: "3", constant: 3, tampered: true }]);
    await until("v3 refused", () => refusals(a).some((l) => l.version === "3"));
    assert.match(String(refusals(a).find((l) => l.version === "3")!.reason), /failed verification/);
    assert.equal(await answer(a, "m"), 3);
    assert.equal(await a.client.health("model/m@2"), health.status.SERVING);
    assert.equal(await a.client.health("deployment"), health.status.NOT_SERVING);
    samples = await metrics(a);
    assert.equal(samples.get('edge_agent_deployment_model_result{model="m",version="3",result="refused"}'), 1);
    assert.equal(samples.get('edge_agent_model_version_info{model="m",version="2"}'), 1);

    // A package signed by a key the device does not trust: refused, v2 keeps serving.
    await release([{ name: "m", version: "4", constant: 4, untrustedSigner: true }]);
    await until("v4 refused", () => refusals(a).some((l) => l.version === "4"));
    assert.match(String(refusals(a).find((l) => l.version === "4")!.reason), /failed verification.*(chain|trusted)/i);
    assert.equal(await answer(a, "m"), 3);

    // A manifest signed by an untrusted key: refused as a whole.
    await release([{ name: "m", version: "5", constant: 5 }], { untrustedManifest: true });
    await until("manifest refused", async () => (await metrics(a)).get("edge_agent_deployment_manifest_refused") === 1);
    assert.equal(await answer(a, "m"), 3);
    assert.equal((await metrics(a)).get("edge_agent_deployment_manifest_serial"), 4);

    // The first manifest again, validly signed: an old serial is not applied again (no rollback by replay).
    const s3Client = new S3Client(s3.options);
    await s3Client.putObject(`${PREFIX}deployment.json.sig`, first[1], "application/json");
    await s3Client.putObject(`${PREFIX}deployment.json`, first[0], "application/json");
    await until(
      "replay refused",
      () => parseLogs(a.logs()).some((l) => String(l.reason).includes("has serial 1, not above the 4 already applied")),
    );
    assert.equal(await answer(a, "m"), 3);

    // m dropped, m2 added: m is unloaded, m2 loaded, the hand-loaded model stays.
    await release([{ name: "m2", version: "1", constant: 10 }]);
    await until("m removed", async () => {
      const names = (await a.client.listModels()).models.map((m) => m.name).sort();
      return names.join() === "hand,m2";
    });
    assert.equal(await answer(a, "m2"), 11);
    assert.equal((await metrics(a)).get("edge_agent_deployment_manifest_refused"), 0);
    await a.logged((l) => l.msg === "model removed by deployment" && l.model === "m", "m removed");
    assert.ok(![...(await metrics(a)).keys()].some((k) => k.includes('model="m"')), "m's series went with it");
    const status = await a.stop();
    assert.equal(status.code, 0, a.logs());
    agent = null;
  } catch (error) {
    if (agent) console.error(agent.logs());
    throw error;
  } finally {
    await agent?.stop("SIGKILL");
    await s3.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deployments: a download killed mid-way resumes after the restart; offline, the last deployment is restored", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-deploy-" });
  const published = join(dir, "published");
  const s3 = await TestS3.start(join(dir, "s3"));
  const relay = new Relay(s3.port);
  const agentDir = join(dir, "agent");
  const packages = join(agentDir, "state", "deployments", "packages");
  let agent: AgentProcess | null = null;
  try {
    await publish(published, FLEET, [{ name: "big", version: "1", constant: 7, paddingBytes: 4 * 1024 * 1024 }]);
    await uploadFolder(s3.options, published, PREFIX);
    relay.holdAfter = 1024 * 1024;
    agent = await start(agentDir, relay.port);
    const partSize = async () => {
      for await (const entry of Deno.readDir(packages)) {
        if (entry.name.endsWith(".part")) return (await Deno.stat(join(packages, entry.name))).size;
      }
      return 0;
    };
    await until("a partial download", async () => await partSize() > 0);
    await new Promise((r) => setTimeout(r, 300)); // what the relay lets through is written
    await agent.stop("SIGKILL");
    agent = null;
    const have = await partSize();
    assert.ok(have > 0 && have < 4 * 1024 * 1024, `part file holds ${have} bytes`);

    relay.holdAfter = null;
    relay.clear();
    agent = await start(agentDir, relay.port);
    const a = agent;
    await until("big serving", async () => await answer(a, "big") === 8);
    assert.match(
      relay.sent,
      new RegExp(`GET /${BUCKET}/${PREFIX}packages/big-1\\.tar\\.gz[^]*?range: bytes=${have}-`, "i"),
    );
    assert.equal((await Array.fromAsync(Deno.readDir(packages))).filter((e) => e.name.endsWith(".part")).length, 0);
    assert.equal((await agent.stop()).code, 0);
    agent = null;

    // The source is gone at start-up: what was applied is loaded from the state folder.
    relay.close();
    await s3.stop();
    agent = await start(agentDir, relay.port);
    const b = agent;
    assert.equal(await answer(b, "big"), 8, "served before the source is read");
    assert.equal((await b.client.describeModel("big")).model.url, `s3://${BUCKET}/${PREFIX}packages/big-1.tar.gz`);
    await until("source reported unreachable", async () => {
      return (await metrics(b)).get("edge_agent_deployment_source_unreachable") === 1;
    });
    assert.equal(await b.client.health("model/big@1"), health.status.SERVING);
    assert.equal(await b.client.health("deployment"), health.status.SERVING, "the last verified manifest is applied");
    await b.logged(
      (l) => l.msg === "deployment source cannot be read; the last verified manifest stays applied",
      "that the last verified manifest stays applied",
    );
    assert.equal((await b.stop()).code, 0);
    agent = null;
  } catch (error) {
    if (agent) console.error(agent.logs());
    throw error;
  } finally {
    await agent?.stop("SIGKILL");
    relay.close();
    await s3.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deployments from a folder: loaded, swapped, and a hand-loaded model the manifest marks unloaded goes", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-deploy-" });
  const source = join(dir, "source");
  let agent: AgentProcess | null = null;
  try {
    await publish(source, FLEET, [{ name: "m", version: "1", constant: 1 }]);
    agent = await startAgent({
      dir: join(dir, "agent"),
      config: {
        sagemaker_edge_core_device_fleet_name: FLEET,
        edge_agent_deployment_source: source,
        edge_agent_deployment_poll_seconds: 1,
      },
    });
    const a = agent;
    await until("v1 serving", async () => await answer(a, "m") === 2);
    assert.equal((await a.client.describeModel("m")).model.url, join(source, "packages/m-1.tar.gz"));
    await writeModelFolder(a.modelsDir, "hand", addSubModel());
    await a.client.loadModel(join(a.modelsDir, "hand"), "hand");
    await publish(source, FLEET, [
      { name: "m", version: "2", constant: 2 },
      { name: "hand", version: "1", state: "unloaded" },
    ]);
    await until("v2 serving, hand unloaded", async () => {
      const names = (await a.client.listModels()).models.map((m) => m.name);
      return await answer(a, "m") === 3 && names.join() === "m";
    });
    // A package whose own signed edge-model.json names another version than the manifest.
    await publish(source, FLEET, [{ name: "m", version: "3", constant: 3, packageVersion: "9" }]);
    await until("v3 refused", () => refusals(a).some((l) => l.version === "3"));
    assert.match(String(refusals(a)[0].reason), /package of model m says version 9, the deployment says 3/);
    assert.equal(await answer(a, "m"), 3);
    assert.equal((await a.stop()).code, 0);
    agent = null;
  } catch (error) {
    if (agent) console.error(agent.logs());
    throw error;
  } finally {
    await agent?.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});
