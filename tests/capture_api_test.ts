// CaptureData and GetCaptureDataStatus through the real agent: Disk and S3 (s3rver) destinations,
// every status code, shared memory copied at call time, an S3 outage, and SIGKILLs at random moments.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { enumValues } from "../src/service/wire.ts";
import { type AgentProcess, startAgent, withAgent } from "./helpers/agent.ts";
import { floats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { BUCKET, type EdgeManagerRecord, TestS3 } from "./helpers/capture_fixtures.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";
import { SysvSegment } from "./helpers/shm_segments.ts";
import { until } from "./helpers/wait.ts";

const DataType = enumValues("DataType");
const Encoding = enumValues("Encoding");
const CaptureStatus = enumValues("CaptureDataStatus");
const encoder = new TextEncoder();

/** Fast batching, so a capture reaches its destination within a second. */
const QUICK = {
  sagemaker_edge_core_capture_data_batch_size: 1,
  sagemaker_edge_core_capture_data_push_period_seconds: 1,
};

function withModel(config: Record<string, unknown>, fn: (agent: AgentProcess) => Promise<void>, env = {}) {
  return withAgent({ config: { ...QUICK, ...config }, env }, async (agent) => {
    const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n", 3]));
    await agent.client.loadModel(folder, "id");
    await fn(agent);
  });
}

function rows(n: number, seed: number): Float32Array {
  return Float32Array.from({ length: n * 3 }, (_, i) => seed * 1000 + i);
}

function capture(agent: AgentProcess, id: string, extra: Record<string, unknown> = {}): Promise<unknown> {
  return agent.client.call("CaptureData", {
    model_name: "id",
    capture_id: id,
    input_tensors: [tensor("x", DataType.FLOAT32, [2, 3], rows(2, 1))],
    output_tensors: [tensor("y", DataType.FLOAT32, [2, 3], rows(2, 1))],
    ...extra,
  });
}

async function status(agent: AgentProcess, id: string): Promise<number> {
  return (await agent.client.call<{ status: number }>("GetCaptureDataStatus", { capture_id: id })).status;
}

async function filesUnder(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string) => {
    for await (const e of Deno.readDir(dir)) {
      const path = join(dir, e.name);
      if (e.isDirectory) await walk(path);
      else out.push(path);
    }
  };
  await walk(root).catch((e) => {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  });
  return out;
}

/** Edge Manager's records (the default layout) by capture id, with the file each is in. */
async function manifests(root: string): Promise<Map<string, { line: EdgeManagerRecord; file: string }>> {
  const found = new Map<string, { line: EdgeManagerRecord; file: string }>();
  for (const file of (await filesUnder(root)).filter((f) => f.endsWith(".jsonl"))) {
    for (const raw of (await Deno.readTextFile(file)).trimEnd().split("\n")) {
      const line = JSON.parse(raw) as EdgeManagerRecord;
      const id = line.eventMetadata.eventId;
      assert.ok(!found.has(id), `${id} appears twice`);
      found.set(id, { line, file });
    }
  }
  return found;
}

Deno.test("CaptureData to disk: tensors by bytes and shared memory, auxiliary data, every status code", async () => {
  await withModel({}, async (agent) => {
    const captures = join(agent.dir, "state", "captures");
    const big = rows(400, 2); // 4800 bytes: beyond the 3072-byte embed limit, stored as its own object
    const segment = new SysvSegment(big.byteLength).write(0, big);
    const auxSegment = new SysvSegment(64).write(0, encoder.encode("a,b\n1,2\n"));
    try {
      await capture(agent, "first-1", {
        inference_timestamp: { seconds: Math.floor(Date.now() / 1000) - 5, nanos: 250 },
        input_tensors: [{
          tensor_metadata: { name: encoder.encode("x"), data_type: DataType.FLOAT32, shape: [400, 3] },
          shared_memory_handle: { segment_id: segment.id, offset: 0, size: 0 },
        }],
        output_tensors: [tensor("y", DataType.FLOAT32, [1, 3], Float32Array.of(7, 8, 9))],
        inputs: [{ name: "request", encoding: Encoding.JSON, byte_data: encoder.encode('{"frame":1}') }],
        outputs: [{
          name: "table",
          encoding: Encoding.CSV,
          shared_memory_handle: { segment_id: auxSegment.id, offset: 0, size: 8 },
        }],
      });
      // The agent copied the segment when it answered: the client may reuse it at once.
      segment.write(0, new Float32Array(1200));
      assert.notEqual(await status(agent, "first-1"), CaptureStatus.NOT_FOUND);
      await until(async () => await status(agent, "first-1") === CaptureStatus.SUCCESS, "first-1 is stored");

      const { line, file } = (await manifests(captures)).get("first-1")!;
      const hour = new Date((Math.floor(Date.now() / 1000) - 5) * 1000).toISOString().slice(0, 13);
      assert.match(file, new RegExp(`/captures/unnamed-fleet/id/${hour.replace(/[-T]/g, "/")}/[^/]+\\.jsonl$`));
      assert.equal(line.eventMetadata.modelName, "id");
      assert.equal(line.eventMetadata.deviceId, "unnamed-device");
      const input = line.deviceFleetInputs[0];
      assert.deepEqual([input.name, input.observedContentType, input.encoding], [
        "x",
        "Tensor[FLOAT32; 400, 3]",
        "NONE",
      ]);
      assert.ok(input["data-ref"] && !input.data, "a 4800-byte tensor is a separate object");
      assert.ok(input["data-ref"].startsWith(`file://${captures}/`), input["data-ref"]);
      const stored = await Deno.readFile(input["data-ref"].slice("file://".length));
      assert.deepEqual([...floats(stored)], [...big]);
      assert.deepEqual([...floats(Uint8Array.fromBase64(line.deviceFleetOutputs[0].data!))], [7, 8, 9]);
      const [request] = line.deviceFleetAuxiliaryInputs;
      assert.deepEqual([request.name, request.encoding, request.data], ["request", "JSON", '{"frame":1}']);
      const [table] = line.deviceFleetAuxiliaryOutputs;
      assert.deepEqual([table.encoding, table.data], ["CSV", "a,b\n1,2\n"], "shared memory aux data, as text");
    } finally {
      segment.remove();
      auxSegment.remove();
    }

    await rejectsWith(capture(agent, "first-1"), Status.ALREADY_EXISTS, /first-1/);
    await rejectsWith(capture(agent, "bad id!"), Status.INVALID_ARGUMENT, /capture_id "bad id!" is invalid/);
    await rejectsWith(capture(agent, "x".repeat(129)), Status.INVALID_ARGUMENT, /capture_id/);
    await rejectsWith(capture(agent, "c2", { model_name: "nope" }), Status.NOT_FOUND, /model nope is not loaded/);
    await rejectsWith(
      capture(agent, "c3", { inference_timestamp: { seconds: Math.floor(Date.now() / 1000) + 3600, nanos: 0 } }),
      Status.OUT_OF_RANGE,
      /in the future/,
    );
    await rejectsWith(
      capture(agent, "c4", { input_tensors: [tensor("x", DataType.INT32, [2, 3], new Int32Array(6))] }),
      Status.INVALID_ARGUMENT,
      /tensor "x": data_type INT32 but model id input "x" is FLOAT32/,
    );
    await rejectsWith(
      capture(agent, "c5", { output_tensors: [tensor("z", DataType.FLOAT32, [2, 3], rows(2, 1))] }),
      Status.INVALID_ARGUMENT,
      /model id has no output of that name/,
    );
    await rejectsWith(
      capture(agent, "c6", { inputs: [{ name: "empty", encoding: Encoding.NONE }] }),
      Status.INVALID_ARGUMENT,
      /inputs\[0\] "empty": carries no data/,
    );
    assert.equal(await status(agent, "never-sent"), CaptureStatus.NOT_FOUND);
    assert.equal(await status(agent, "c3"), CaptureStatus.NOT_FOUND, "a refused capture leaves nothing");
  });
});

Deno.test("CaptureData to S3 (s3rver): stored with the layout, delivered after an outage, RESOURCE_EXHAUSTED when full", async () => {
  const s3dir = await Deno.makeTempDir({ prefix: "edge-agent-s3rver-" });
  const s3 = await TestS3.start(s3dir);
  try {
    const config = {
      sagemaker_edge_core_capture_data_destination: "Cloud",
      sagemaker_edge_provider_s3_bucket_name: BUCKET,
      sagemaker_edge_core_region: "us-east-1",
      sagemaker_edge_core_folder_prefix: "fleet-captures",
      sagemaker_edge_core_device_fleet_name: "fleet-7",
      sagemaker_edge_core_device_name: "camera-3",
      sagemaker_edge_core_capture_data_buffer_size: 5,
      edge_agent_s3_endpoint: `http://127.0.0.1:${s3.port}`,
      edge_agent_s3_force_path_style: true,
    };
    await withModel(config, async (agent) => {
      await capture(agent, "s3-1");
      await until(async () => await status(agent, "s3-1") === CaptureStatus.SUCCESS, "s3-1 is stored");
      const listing = await (await fetch(`http://127.0.0.1:${s3.port}/${BUCKET}?prefix=fleet-captures/`)).text();
      const keys = [...listing.matchAll(/<Key>([^<]+)<\/Key>/g)].map((m) => m[1]);
      assert.equal(keys.length, 1, listing);
      assert.match(keys[0], /^fleet-captures\/fleet-7\/id\/\d{4}\/\d{2}\/\d{2}\/\d{2}\/[^/]+\.jsonl$/);

      await s3.stop();
      for (let i = 0; i < 5; i++) await capture(agent, `outage-${i}`);
      await rejectsWith(capture(agent, "outage-5"), Status.RESOURCE_EXHAUSTED, /./);
      assert.equal(await status(agent, "outage-5"), CaptureStatus.NOT_FOUND, "nothing of a refused request is kept");
      assert.equal(await status(agent, "outage-0"), CaptureStatus.IN_PROGRESS);
      await s3.resume();
      for (let i = 0; i < 5; i++) {
        await until(
          async () => await status(agent, `outage-${i}`) === CaptureStatus.SUCCESS,
          `outage-${i} is stored`,
          90_000,
        );
      }
    }, { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" });
  } finally {
    await s3.stop();
    await Deno.remove(s3dir, { recursive: true });
  }
});

Deno.test("acknowledged captures survive SIGKILL at random moments: each stored exactly once", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-capture-crash-" });
  const acknowledged = new Set<string>();
  /** Captures acknowledged in each round before its SIGKILL. */
  const perRound: number[] = [];
  let next = 0;
  const ROUNDS = 20;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const before = acknowledged.size;
      const agent = await startAgent({
        dir,
        config: { ...QUICK, sagemaker_edge_core_capture_data_buffer_size: 100_000 },
      });
      const folder = await writeModelFolder(agent.modelsDir, `id-${round}`, identityModel(OnnxType.FLOAT, ["n", 3]));
      await agent.client.loadModel(folder, "id");
      let killed = false;
      const sender = async () => {
        while (!killed) {
          const id = `crash-${next++}`;
          try {
            await capture(agent, id);
            acknowledged.add(id);
          } catch {
            return; // the agent is gone; this one was never acknowledged
          }
        }
      };
      const senders = [sender(), sender(), sender(), sender()];
      // The kill falls at a random moment while captures flow (the first one acknowledged, or 10 s).
      for (let waited = 0; acknowledged.size === before && waited < 10_000; waited += 5) {
        await new Promise((r) => setTimeout(r, 5));
      }
      await new Promise((r) => setTimeout(r, Math.random() * 250));
      killed = true;
      agent.process.kill("SIGKILL");
      await Promise.all(senders);
      await agent.stop();
      perRound.push(acknowledged.size - before);
    }
    const agent = await startAgent({ dir, config: QUICK });
    try {
      await until(
        async () => {
          for (const id of acknowledged) if (await status(agent, id) !== CaptureStatus.SUCCESS) return false;
          return true;
        },
        "every acknowledged capture is stored",
        120_000,
      );
    } finally {
      assert.equal((await agent.stop()).code, 0, agent.logs());
    }
    const stored = await manifests(join(dir, "state", "captures"));
    const lost = [...acknowledged].filter((id) => !stored.has(id));
    console.log(
      `capture crash: ${ROUNDS} SIGKILLs, ${acknowledged.size} acknowledged, ${stored.size} stored ` +
        `(${stored.size - acknowledged.size} durable but never acknowledged), ${lost.length} lost, 0 duplicated`,
    );
    assert.deepEqual(lost, []);
    assert.ok(perRound.every((n) => n > 0), `captures flowed in every round: ${perRound.join(", ")}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
