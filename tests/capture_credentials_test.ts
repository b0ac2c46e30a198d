// S3 credentials: the AWS IoT credentials provider over mutual TLS with real certificates (openssl), a
// local endpoint that requires the client certificate (Python's ssl), real s3rver; and capture that
// never stops inference: an agent without credentials or without S3 starts, serves, keeps captures,
// reports `capture` NOT_SERVING in health, and uploads once credentials or S3 come back.

import assert from "node:assert/strict";
import { join } from "node:path";
import { CaptureService, IotCredentials, S3Client } from "../src/capture/mod.ts";
import { iotCredentialsUrl, keyFileProblems } from "../src/capture/credentials.ts";
import { signRequest } from "../src/capture/s3.ts";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { parseConfig } from "../src/config.ts";
import { parseProfile, profileFlags, profileFor } from "../src/permissions.ts";
import { enumValues, health } from "../src/service/wire.ts";
import { type AgentProcess, parseLogs, startAgent } from "./helpers/agent.ts";
import { tensor } from "./helpers/assertions.ts";
import { BUCKET, freePort, makeRecord, quiet, TestS3 } from "./helpers/capture_fixtures.ts";
import { CredentialsEndpoint, makePki, type Pki } from "./helpers/iot_credentials.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";
import { watch } from "./helpers/health_watch.ts";
import { until } from "./helpers/wait.ts";

const DataType = enumValues("DataType");
const CaptureStatus = enumValues("CaptureDataStatus");
const { SERVING, NOT_SERVING } = health.status;

/** A PKI made once for the file (openssl takes a moment). */
let pkiPromise: Promise<Pki> | null = null;
function pki(): Promise<Pki> {
  pkiPromise ??= Deno.makeTempDir({ prefix: "edge-agent-pki-" }).then((dir) => {
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    return makePki(dir);
  });
  return pkiPromise;
}

function iot(p: Pki, endpoint: string, extra: Partial<ConstructorParameters<typeof IotCredentials>[0]> = {}) {
  return new IotCredentials({
    endpoint,
    deviceFleetName: "fleet-1",
    thingName: "thing-1",
    certFile: p.deviceCert,
    keyFile: p.deviceKey,
    caFile: p.caFile,
    logger: quiet,
    retryBaseMs: 50,
    retryMaxMs: 200,
    ...extra,
  });
}

Deno.test("SigV4 by AWS's signer matches AWS's documented ListObjects example (query canonicalisation)", async () => {
  const headers = await signRequest({
    method: "GET",
    url: new URL("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J"),
    payloadHash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    credentials: { accessKeyId: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" },
    region: "us-east-1",
    date: new Date("2013-05-24T00:00:00Z"),
  });
  assert.equal(
    headers.authorization,
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, " +
      "SignedHeaders=host;x-amz-content-sha256;x-amz-date, " +
      "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
  );
  // A session token is sent and signed.
  const withToken = await signRequest({
    method: "PUT",
    url: new URL("http://127.0.0.1:4568/b/k"),
    payloadHash: "UNSIGNED-PAYLOAD",
    credentials: { accessKeyId: "A", secretAccessKey: "S", sessionToken: "T" },
    region: "us-east-1",
  });
  assert.equal(withToken["x-amz-security-token"], "T");
  assert.match(withToken.authorization, /SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,/);
});

Deno.test("credentials endpoint: a whole URL is used as it is; a bare host gets the fleet's role alias", () => {
  const whole = "https://abc.credentials.iot.eu-west-1.amazonaws.com/role-aliases/my-alias/credentials";
  assert.equal(iotCredentialsUrl(whole, "f").href, whole);
  assert.equal(
    iotCredentialsUrl("abc.credentials.iot.eu-west-1.amazonaws.com", "fleet 1").href,
    "https://abc.credentials.iot.eu-west-1.amazonaws.com/role-aliases/SageMakerEdge-fleet%201/credentials",
  );
  assert.equal(
    iotCredentialsUrl("https://127.0.0.1:8443", "f").href,
    "https://127.0.0.1:8443/role-aliases/SageMakerEdge-f/credentials",
  );
});

Deno.test("IoT credentials over mutual TLS: fetched with the thing name, cached, refreshed at 80% of their life, accepted by S3", async () => {
  const p = await pki();
  const endpoint = await CredentialsEndpoint.start(p, { lifetime: 100 });
  const s3 = await TestS3.start(await Deno.makeTempDir({ prefix: "edge-agent-s3rver-" }));
  try {
    let offset = 0; // the source's clock runs ahead by this much
    const source = iot(p, endpoint.url, { now: () => Date.now() + offset });
    const first = await source.get();
    assert.equal(first.accessKeyId, "S3RVER");
    assert.equal(first.sessionToken, "token-1");
    assert.ok(Math.abs(first.expiresAt! - (Date.now() + 100_000)) < 5000, "expiration parsed");
    assert.deepEqual(endpoint.fetches, [
      { path: "/role-aliases/SageMakerEdge-fleet-1/credentials", thing: "thing-1", subject: "thing-1" },
    ]);
    offset = 75_000;
    assert.equal(await source.get(), first, "cached while fresh");
    assert.equal(endpoint.fetches.length, 1);
    // Past 80% of the lifetime a refresh starts; until it lands, the old credentials still serve.
    offset = 85_000;
    assert.equal(await source.get(), first);
    await until(() => endpoint.fetches.length === 2, "a refresh before expiry");
    await until(async () => (await source.get()).sessionToken === "token-2", "the new credentials serve");
    // Expired credentials are never used: with the endpoint gone, there are none.
    await endpoint.stop();
    offset = 500_000;
    await assert.rejects(source.get(), { name: "CredentialsError" });
    // S3 takes requests with the session token (s3rver checks the key id and ignores the token).
    offset = 0;
    const fresh = iot(p, endpoint.url);
    await assert.rejects(fresh.get(), /credentials provider/, "the endpoint is stopped");
    const restarted = await CredentialsEndpoint.start(p, { port: endpoint.port });
    try {
      const client = new S3Client({ ...s3.options, credentials: iot(p, restarted.url) });
      await client.putObject("k", new Uint8Array([1, 2, 3]), "application/octet-stream");
      assert.deepEqual(await client.getObject("k"), new Uint8Array([1, 2, 3]));
      assert.equal(restarted.fetches.length, 1);
      // A device clock an hour ahead: the lifetime counts by the endpoint's clock, so the credentials
      // are fresh, not expired on arrival (which would cost a fetch per upload).
      const skewed = iot(p, restarted.url, { now: () => Date.now() + 3_600_000 });
      const got = await skewed.get();
      assert.equal(await skewed.get(), got);
      assert.equal(restarted.fetches.length, 2);
    } finally {
      await restarted.stop();
    }
  } finally {
    await endpoint.stop();
    await s3.stop();
    await Deno.remove(s3.directory, { recursive: true });
  }
});

Deno.test("credentials S3 refuses (InvalidAccessKeyId) are replaced at once, and the capture goes through", async () => {
  const p = await pki();
  // The first credentials are unknown to s3rver; the next ones work. Lifetimes are long: only the
  // refusal can cause the second fetch.
  const endpoint = await CredentialsEndpoint.start(p, { keys: ["REVOKED", "S3RVER"] });
  const base = await Deno.makeTempDir({ prefix: "edge-agent-creds-" });
  const s3 = await TestS3.start(`${base}/s3`);
  try {
    const service = await CaptureService.open({
      stateDir: `${base}/state`,
      deviceFleetName: "fleet-1",
      deviceName: "device-1",
      destination: "Cloud",
      s3: { ...s3.options, credentials: iot(p, endpoint.url) },
      batchSize: 1,
      pushPeriodSeconds: 0,
      maxAttempts: 1, // a refusal counted as permanent would dead-letter at once
      retryBaseMs: 20,
      retryMaxMs: 200,
      logger: quiet,
    });
    await service.capture(makeRecord("r1"));
    assert.ok(await service.flush(10_000));
    assert.equal(service.status("r1"), "SUCCESS");
    assert.equal(endpoint.fetches.length, 2);
    assert.equal(service.stats().failed, 0);
    await service.close();
  } finally {
    await endpoint.stop();
    await s3.stop();
    await Deno.remove(base, { recursive: true });
  }
});

Deno.test("credentials S3 refuses are never given up: captures wait, uploads report why, and go once the credentials are right", async () => {
  const base = await Deno.makeTempDir({ prefix: "edge-agent-creds-" });
  const s3 = await TestS3.start(`${base}/s3`);
  try {
    // s3rver checks the access key id (not SigV4 signatures): an unknown one is refused.
    const credentials = { accessKeyId: "NOT-KNOWN", secretAccessKey: "S3RVER" };
    const service = await CaptureService.open({
      stateDir: `${base}/state`,
      deviceFleetName: "fleet-1",
      deviceName: "device-1",
      destination: "Cloud",
      s3: { ...s3.options, credentials },
      batchSize: 1,
      pushPeriodSeconds: 0,
      maxAttempts: 1,
      retryBaseMs: 50,
      retryMaxMs: 200,
      logger: quiet,
    });
    assert.deepEqual(service.uploadState(), { ok: true, reason: null, since: null });
    await service.capture(makeRecord("w1"));
    await until(() => !service.uploadState().ok, "uploads report the refusal");
    assert.match(service.uploadState().reason!, /403 InvalidAccessKeyId/);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(service.status("w1"), "IN_PROGRESS");
    assert.equal(service.stats().failed, 0);
    credentials.accessKeyId = "S3RVER"; // the operator fixes the credentials
    assert.ok(await service.flush(10_000));
    assert.equal(service.status("w1"), "SUCCESS");
    assert.equal(service.uploadState().ok, true);
    await service.close();
  } finally {
    await s3.stop();
    await Deno.remove(base, { recursive: true });
  }
});

Deno.test("a client certificate from another CA: a clear error, no retry storm; a key readable by others is refused", async () => {
  const p = await pki();
  const endpoint = await CredentialsEndpoint.start(p);
  try {
    const source = iot(p, endpoint.url, { certFile: p.rogueCert, keyFile: p.rogueKey, retryBaseMs: 60_000 });
    const error = await source.get().then(() => null, (e) => e as Error);
    assert.ok(error, "refused");
    assert.equal(error.name, "CredentialsError");
    assert.match(error.message, new RegExp(`credentials provider ${endpoint.url}/role-aliases/.*: `));
    assert.match(
      error.message,
      /the endpoint refused the device certificate .*rogue\.pem: is it registered and active in AWS IoT/,
    );
    await until(() => endpoint.stderr().includes("handshake refused"), "the endpoint refused the handshake");
    // Backing off: the next asks within the delay do not reach the endpoint.
    const refusals = endpoint.stderr().split("handshake refused").length;
    await assert.rejects(source.get(), /credentials provider/);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(endpoint.stderr().split("handshake refused").length, refusals);
    assert.equal(endpoint.fetches.length, 0);

    const loose = join(p.dir, "loose.key");
    await Deno.copyFile(p.deviceKey, loose);
    await Deno.chmod(loose, 0o640);
    assert.deepEqual(await keyFileProblems(loose), [
      `sagemaker_edge_provider_aws_cert_pk_file ${loose} is readable by group or others (mode 0640): run chmod 600 ${loose}`,
    ]);
    assert.deepEqual(await keyFileProblems(p.deviceKey), []);
  } finally {
    await endpoint.stop();
  }
});

Deno.test("the deployment profile of a config with the IoT provider names the endpoint and the certificate files", () => {
  const { config } = parseConfig({
    sagemaker_edge_core_capture_data_destination: "Cloud",
    sagemaker_edge_provider_s3_bucket_name: "b",
    sagemaker_edge_core_region: "eu-west-1",
    sagemaker_edge_core_device_fleet_name: "f",
    sagemaker_edge_provider_aws_cert_file: "/etc/edge-agent/iot/device.pem",
    sagemaker_edge_provider_aws_cert_pk_file: "/etc/edge-agent/iot/device.key",
    sagemaker_edge_provider_aws_ca_cert_file: "/etc/edge-agent/iot/AmazonRootCA1.pem",
    sagemaker_edge_provider_aws_iot_cred_endpoint: "abc.credentials.iot.eu-west-1.amazonaws.com",
  });
  const profile = profileFor("/run/edge-agent/agent.sock", null, config);
  assert.deepEqual(profile.credential_hosts, ["abc.credentials.iot.eu-west-1.amazonaws.com:443"]);
  assert.deepEqual(profile.credential_files, [
    "/etc/edge-agent/iot/device.pem",
    "/etc/edge-agent/iot/device.key",
    "/etc/edge-agent/iot/AmazonRootCA1.pem",
  ]);
  assert.deepEqual(profile.env, [], "the environment is not a source when the provider is configured");
  const flags = profileFlags(parseProfile(JSON.parse(JSON.stringify(profile))));
  assert.ok(
    flags.includes(
      "--allow-net=unix:/run/edge-agent/agent.sock,b.s3.eu-west-1.amazonaws.com," +
        "abc.credentials.iot.eu-west-1.amazonaws.com:443",
    ),
    flags.join(" "),
  );
  assert.match(
    flags.find((f) => f.startsWith("--allow-read="))!,
    /,\/etc\/edge-agent\/iot\/device\.pem,\/etc\/edge-agent\/iot\/device\.key,\/etc\/edge-agent\/iot\/AmazonRootCA1\.pem$/,
  );
  assert.ok(!flags.some((f) => f.startsWith("--allow-write=") && f.includes("/iot/")), "certificates are read only");
  // Half a provider is a config error.
  assert.throws(
    () =>
      parseConfig({
        sagemaker_edge_core_capture_data_destination: "Cloud",
        sagemaker_edge_provider_s3_bucket_name: "b",
        sagemaker_edge_core_region: "eu-west-1",
        sagemaker_edge_provider_aws_iot_cred_endpoint: "abc.credentials.iot.eu-west-1.amazonaws.com",
      }),
    /the AWS IoT credentials provider needs "sagemaker_edge_provider_aws_cert_file"/,
  );
});

// --- the agent ----------------------------------------------------------------------------------------

const QUICK = {
  sagemaker_edge_core_capture_data_batch_size: 1,
  sagemaker_edge_core_capture_data_push_period_seconds: 1,
};

function cloudConfig(s3Port: number) {
  return {
    ...QUICK,
    sagemaker_edge_core_capture_data_destination: "Cloud",
    sagemaker_edge_provider_s3_bucket_name: BUCKET,
    sagemaker_edge_core_region: "us-east-1",
    sagemaker_edge_core_device_fleet_name: "fleet-7",
    sagemaker_edge_core_device_name: "camera-3",
    edge_agent_s3_endpoint: `http://127.0.0.1:${s3Port}`,
    edge_agent_s3_force_path_style: true,
  };
}

function iotConfig(p: Pki, endpointPort: number, files = { cert: p.deviceCert, key: p.deviceKey }) {
  return {
    sagemaker_edge_provider_provider: "Aws",
    sagemaker_edge_provider_aws_cert_file: files.cert,
    sagemaker_edge_provider_aws_cert_pk_file: files.key,
    sagemaker_edge_provider_aws_ca_cert_file: p.caFile,
    sagemaker_edge_provider_aws_iot_cred_endpoint: `https://127.0.0.1:${endpointPort}`,
    sagemaker_edge_core_iot_thing_name: "thing-1",
  };
}

async function loadModel(agent: AgentProcess): Promise<void> {
  const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n", 3]));
  await agent.client.loadModel(folder, "id");
}

const x = () => tensor("x", DataType.FLOAT32, [1, 3], new Float32Array([1, 2, 3]));

async function predictWorks(agent: AgentProcess): Promise<void> {
  const answer = await agent.client.call<{ tensors: unknown[] }>("Predict", { name: "id", tensors: [x()] });
  assert.equal(answer.tensors.length, 1);
}

function capture(agent: AgentProcess, id: string): Promise<unknown> {
  return agent.client.call("CaptureData", {
    model_name: "id",
    capture_id: id,
    input_tensors: [x()],
    output_tensors: [tensor("y", DataType.FLOAT32, [1, 3], new Float32Array([1, 2, 3]))],
  });
}

async function status(agent: AgentProcess, id: string): Promise<number> {
  return (await agent.client.call<{ status: number }>("GetCaptureDataStatus", { capture_id: id })).status;
}

async function stored(agent: AgentProcess, ...ids: string[]): Promise<void> {
  for (const id of ids) {
    await until(async () => await status(agent, id) === CaptureStatus.SUCCESS, `${id} is stored`, 60_000);
  }
}

async function s3Keys(port: number): Promise<string[]> {
  const listing = await (await fetch(`http://127.0.0.1:${port}/${BUCKET}?prefix=`)).text();
  return [...listing.matchAll(/<Key>([^<]+)<\/Key>/g)].map((m) => m[1]);
}

function warnings(agent: AgentProcess, pattern: RegExp): Record<string, unknown>[] {
  return parseLogs(agent.logs()).filter((l) => l.level === "warn" && pattern.test(String(l.msg)));
}

/** A sample from the agent's metrics socket (`series` as written, labels included). */
async function sample(socket: string, series: string): Promise<number> {
  const samples = await scrapeMetrics(`unix:${socket}`);
  assert.ok(samples.has(series), `${series} in ${[...samples.keys()]}`);
  return samples.get(series)!;
}

const blockedGauge = (socket: string) => sample(socket, "edge_agent_capture_uploads_blocked");

async function stopAgent(agent: AgentProcess): Promise<void> {
  const { code } = await agent.stop();
  assert.equal(code, 0, agent.logs());
}

Deno.test("agent without credentials and without S3: starts, serves Predict, keeps captures, capture NOT_SERVING; uploads once both come", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-offline-" });
  const s3Port = freePort();
  let s3: TestS3 | null = null;
  try {
    // No AWS_* variables and S3 not running (the agent gets no environment but what is named here).
    let agent = await startAgent({ dir, config: cloudConfig(s3Port) });
    try {
      await loadModel(agent);
      await predictWorks(agent);
      await until(async () => await agent.client.health("capture") === NOT_SERVING, "capture is NOT_SERVING");
      assert.equal(await agent.client.health(""), SERVING, "the agent itself serves");
      await capture(agent, "offline-1");
      await capture(agent, "offline-2");
      const cannot = /^capture: uploads (cannot|still cannot) proceed/;
      const first = await agent.logged(
        (l) => l.level === "warn" && cannot.test(String(l.msg)),
        "uploads cannot proceed",
      );
      assert.match(String(first.reason), /no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/);
      // Past more failed attempts: they are not each a warning.
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(await status(agent, "offline-1"), CaptureStatus.IN_PROGRESS);
      await predictWorks(agent);
      const said = warnings(agent, cannot);
      assert.ok(said.length <= 2, `rate-limited: ${said.length} warnings in 3 s`);
    } finally {
      await stopAgent(agent);
    }

    // With credentials now, but S3 still down: still NOT_SERVING, the reason is the network.
    const env = { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" };
    const metrics = join(dir, "metrics.sock");
    agent = await startAgent({ dir, config: { ...cloudConfig(s3Port), edge_agent_metrics: `unix:${metrics}` }, env });
    const watcher = watch(agent.socket, "capture");
    try {
      await loadModel(agent);
      await until(
        () => warnings(agent, /^capture: uploads/).some((l) => !/credentials/.test(String(l.reason))),
        "the agent reports S3 unreachable",
      );
      assert.equal(await agent.client.health("capture"), NOT_SERVING);
      assert.equal(await blockedGauge(metrics), 1);
      assert.equal(await status(agent, "offline-2"), CaptureStatus.IN_PROGRESS);
      await predictWorks(agent);

      s3 = await TestS3.start(join(dir, "s3"), s3Port);
      await stored(agent, "offline-1", "offline-2");
      await until(async () => await agent.client.health("capture") === SERVING, "capture is SERVING again");
      await capture(agent, "online-1");
      await stored(agent, "online-1");
      assert.equal((await s3Keys(s3Port)).filter((k) => k.endsWith(".jsonl")).length, 3);
      await agent.logged((l) => l.msg === "capture: uploads proceed again", "uploads proceeding again");
      assert.equal(await blockedGauge(metrics), 0);
      // A watcher heard the change both ways (the first status may predate the first failed upload).
      const heard = watcher.statuses;
      await until(() => heard.at(-1) === SERVING && heard.includes(NOT_SERVING), `Watch hears both (${heard})`);
      assert.ok(heard.every((v, i) => i === 0 || v !== heard[i - 1]), `each status once per change: ${heard}`);
    } finally {
      watcher.close();
      await stopAgent(agent);
    }
  } finally {
    await s3?.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent writing to Disk with periodic upload and no credentials: starts, stores on disk, capture NOT_SERVING until the mirror works", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-periodic-" });
  const s3 = await TestS3.start(join(dir, "s3"));
  const config = {
    ...cloudConfig(s3.port),
    sagemaker_edge_core_capture_data_destination: "Disk",
    sagemaker_edge_core_capture_data_periodic_upload: true,
    sagemaker_edge_core_capture_data_periodic_upload_period_seconds: 1,
  };
  try {
    let agent = await startAgent({ dir, config });
    try {
      await loadModel(agent);
      await capture(agent, "disk-1");
      await stored(agent, "disk-1"); // SUCCESS: it is on disk
      await until(async () => await agent.client.health("capture") === NOT_SERVING, "the mirror reports");
      await agent.logged((l) => /no S3 credentials/.test(String(l.error)), "no S3 credentials");
      await predictWorks(agent);
    } finally {
      await stopAgent(agent);
    }
    const env = { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" };
    agent = await startAgent({ dir, config, env });
    try {
      await until(async () => (await s3Keys(s3.port)).some((k) => k.endsWith(".jsonl")), "the mirror uploads");
      await until(async () => await agent.client.health("capture") === SERVING, "capture is SERVING");
    } finally {
      await stopAgent(agent);
    }
  } finally {
    await s3.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent with the AWS IoT credentials provider: waits for the endpoint, then captures flow across credential rotations", async () => {
  const p = await pki();
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-iot-" });
  const s3 = await TestS3.start(join(dir, "s3"));
  const endpointPort = freePort();
  let endpoint: CredentialsEndpoint | null = null;
  try {
    const metrics = join(dir, "metrics.sock");
    const startedAt = Date.now();
    const agent = await startAgent({
      dir,
      config: { ...cloudConfig(s3.port), ...iotConfig(p, endpointPort), edge_agent_metrics: `unix:${metrics}` },
    });
    try {
      await loadModel(agent);
      // The endpoint is not up yet: inference goes on, captures wait.
      await until(async () => await agent.client.health("capture") === NOT_SERVING, "capture is NOT_SERVING");
      await capture(agent, "early-1");
      await predictWorks(agent);
      assert.equal(await status(agent, "early-1"), CaptureStatus.IN_PROGRESS);

      endpoint = await CredentialsEndpoint.start(p, { port: endpointPort, lifetime: 4 });
      await stored(agent, "early-1");
      await until(async () => await agent.client.health("capture") === SERVING, "capture is SERVING");
      await capture(agent, "before-rotation");
      await stored(agent, "before-rotation");
      const fetched = endpoint.fetches.length;
      // Credentials live 4 s and are renewed at 80%: keep capturing across two renewals.
      const ids: string[] = [];
      for (let i = 0; endpoint.fetches.length < fetched + 2; i++) {
        assert.ok(i < 300, "renewed within 30 s");
        ids.push(`rotating-${i}`);
        await capture(agent, ids[ids.length - 1]);
        await new Promise((r) => setTimeout(r, 100));
      }
      await capture(agent, "after-rotation");
      await stored(agent, ...ids, "after-rotation");
      assert.ok(endpoint.fetches.length >= 3);
      for (const f of endpoint.fetches) {
        assert.deepEqual(f, {
          path: "/role-aliases/SageMakerEdge-fleet-7/credentials",
          thing: "thing-1",
          subject: "thing-1",
        });
      }
      const keys = await s3Keys(s3.port);
      assert.equal(keys.filter((k) => k.endsWith(".jsonl")).length, ids.length + 3);
      assert.equal(await agent.client.health("capture"), SERVING);
      const fetches = 'edge_agent_capture_credentials_fetches_total{result="ok"}';
      assert.equal(await sample(metrics, fetches), endpoint.fetches.length);
      assert.ok(await sample(metrics, 'edge_agent_capture_credentials_fetches_total{result="error"}') >= 1);
      const expiry = await sample(metrics, "edge_agent_capture_credentials_expiry_timestamp_seconds");
      assert.ok(expiry > startedAt / 1000 && expiry < Date.now() / 1000 + 5, `expiry ${expiry}`);
    } finally {
      await stopAgent(agent);
    }
  } finally {
    await endpoint?.stop();
    await s3.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent with a device certificate the endpoint does not trust: a clear log line, captures kept, uploaded once the certificate is replaced", async () => {
  const p = await pki();
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-rogue-" });
  const s3 = await TestS3.start(join(dir, "s3"));
  const endpoint = await CredentialsEndpoint.start(p);
  try {
    // The files the config names hold a certificate of another CA.
    const cert = join(dir, "device.pem");
    const key = join(dir, "device.key");
    await Deno.copyFile(p.rogueCert, cert);
    await Deno.copyFile(p.rogueKey, key);
    await Deno.chmod(key, 0o600);
    const agent = await startAgent({
      dir,
      config: { ...cloudConfig(s3.port), ...iotConfig(p, endpoint.port, { cert, key }) },
    });
    try {
      await loadModel(agent);
      await capture(agent, "kept-1");
      await until(async () => await agent.client.health("capture") === NOT_SERVING, "capture is NOT_SERVING");
      await predictWorks(agent);
      assert.equal(await status(agent, "kept-1"), CaptureStatus.IN_PROGRESS);
      const line = await agent.logged((l) => l.msg === "capture: cannot get credentials", "cannot get credentials");
      assert.match(String(line.reason), new RegExp(`^credentials provider ${endpoint.url}/role-aliases/`));
      assert.match(
        String(line.reason),
        /fatal alert: UnknownCA \(the endpoint refused the device certificate .*device\.pem/,
      );
      assert.equal(endpoint.fetches.length, 0);

      // The right certificate and key arrive on disk; no restart.
      await Deno.copyFile(p.deviceCert, cert);
      await Deno.copyFile(p.deviceKey, key);
      await stored(agent, "kept-1");
      assert.equal(await agent.client.health("capture"), SERVING);
    } finally {
      await stopAgent(agent);
    }
  } finally {
    await endpoint.stop();
    await s3.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent refuses to start with a private key readable by others, naming the fix", async () => {
  const p = await pki();
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-loose-key-" });
  try {
    const key = join(dir, "device.key");
    await Deno.copyFile(p.deviceKey, key);
    await Deno.chmod(key, 0o644);
    const config = { ...cloudConfig(freePort()), ...iotConfig(p, freePort(), { cert: p.deviceCert, key }) };
    const error = await startAgent({ dir, config }).then(() => null, (e) => e as Error);
    assert.ok(error, "the agent must not start");
    assert.match(error.message, /agent exited \(2\)/);
    assert.match(error.message, new RegExp(`readable by group or others \\(mode 0644\\): run chmod 600 ${key}`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
