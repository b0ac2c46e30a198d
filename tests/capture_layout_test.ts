// Captured data as Edge Manager's cloud consumers read it: the real agent stores a capture on S3 (s3rver)
// or Disk in Edge Manager's layout, and a Python consumer that knows only the stored objects
// (tests/python/capture_consumer.py) lists, downloads, base64-decodes and struct-unpacks them.

import assert from "node:assert/strict";
import { join } from "node:path";
import { enumValues } from "../src/service/wire.ts";
import { type AgentProcess, withAgent } from "./helpers/agent.ts";
import { tensor } from "./helpers/assertions.ts";
import { BUCKET, TestS3 } from "./helpers/capture_fixtures.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";
import { PYTHON } from "./helpers/python.ts";

const DataType = enumValues("DataType");
const Encoding = enumValues("Encoding");
const CaptureStatus = enumValues("CaptureDataStatus");
const encoder = new TextEncoder();
const CONSUMER = new URL("./python/capture_consumer.py", import.meta.url).pathname;

const DEVICE = {
  sagemaker_edge_core_device_fleet_name: "fleet-9",
  sagemaker_edge_core_device_name: "camera-9",
  sagemaker_edge_core_capture_data_batch_size: 1,
  sagemaker_edge_core_capture_data_push_period_seconds: 1,
};
const INFERENCE_SECONDS = Date.UTC(2023, 4, 31, 20, 5, 24) / 1000;
const INPUT = Float32Array.of(0.5, -1.25, 3, 4.75, 0.125, 42);
const OUTPUT = Float32Array.from({ length: 600 * 6 }, (_, i) => i / 4); // 14400 bytes: over the embed limit
const FRAME = Uint8Array.from({ length: 5000 }, (_, i) => (i * 7) % 251); // stands for a JPEG
const RESULT = '{"label":"ok","score":0.5}';

interface Entry {
  name: string;
  mode: string;
  encoding: string;
  observedContentType: string;
  "data-ref"?: string;
  bytes_base64: string;
  floats?: number[];
}

interface ConsumerView {
  key: string;
  eventVersion: string;
  eventMetadata: Record<string, string>;
  deviceId: string;
  lambda_inputs?: number[];
  deviceFleetInputs: Entry[];
  deviceFleetOutputs: Entry[];
  deviceFleetAuxiliaryInputs: Entry[];
  deviceFleetAuxiliaryOutputs: Entry[];
}

/** Loads a signed package whose edge-model.json names version 4.2, and captures one inference. */
async function captureOne(agent: AgentProcess): Promise<void> {
  const folder = join(agent.modelsDir, "detector");
  await Deno.mkdir(folder, { recursive: true });
  await Deno.writeTextFile(join(folder, "edge-model.json"), JSON.stringify({ name: "detector", version: "4.2" }));
  await writeModelFolder(agent.modelsDir, "detector", identityModel(OnnxType.FLOAT, ["n", 6]));
  await agent.client.loadModel(folder, "detector");
  await agent.client.call("CaptureData", {
    model_name: "detector",
    capture_id: "cap-1",
    inference_timestamp: { seconds: INFERENCE_SECONDS, nanos: 500_000_000 },
    input_tensors: [tensor("x", DataType.FLOAT32, [1, 6], INPUT)],
    output_tensors: [tensor("y", DataType.FLOAT32, [600, 6], OUTPUT)],
    inputs: [
      { name: "frame.jpg", encoding: Encoding.NONE, byte_data: FRAME },
      { name: "request", encoding: Encoding.JSON, byte_data: encoder.encode('{"frame":7}') },
    ],
    outputs: [
      { name: "result", encoding: Encoding.BASE64, byte_data: encoder.encode(btoa(RESULT)) },
      { name: "table", encoding: Encoding.CSV, byte_data: encoder.encode("a,b\n1,2\n") },
    ],
  });
  const deadline = Date.now() + 20_000;
  for (;;) {
    const { status } = await agent.client.call<{ status: number }>("GetCaptureDataStatus", { capture_id: "cap-1" });
    if (status === CaptureStatus.SUCCESS) return;
    if (Date.now() > deadline) throw new Error(`cap-1 not stored (status ${status}):\n${agent.logs()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function consume(args: string[]): Promise<ConsumerView[]> {
  const { success, stdout, stderr } = await new Deno.Command(PYTHON, { args: [CONSUMER, ...args] }).output();
  const decoder = new TextDecoder();
  assert.ok(success, decoder.decode(stderr));
  return decoder.decode(stdout).trim().split("\n").map((line) => JSON.parse(line));
}

const bytes = (e: Entry) => Uint8Array.fromBase64(e.bytes_base64);

/** What every consumer relies on, whichever the destination; `refPrefix` starts every data-ref. */
function checkRecord(views: ConsumerView[], keyPrefix: string, refPrefix: string): void {
  assert.equal(views.length, 1, JSON.stringify(views));
  const [view] = views;
  assert.match(view.key, new RegExp(`^${keyPrefix}fleet-9/detector/2023/05/31/20/[^/]+\\.jsonl$`));
  assert.equal(view.eventVersion, "0");
  assert.deepEqual(view.eventMetadata, {
    deviceFleetName: "fleet-9",
    deviceId: "camera-9",
    eventId: "cap-1",
    inferenceTime: "2023-05-31T20:05:24",
    modelName: "detector",
    modelVersion: "4.2",
  });
  assert.equal(view.deviceId, "camera-9");
  assert.deepEqual(view.lambda_inputs, [...INPUT], "struct.unpack('6f', b64decode(...)) gives the input");

  const [input] = view.deviceFleetInputs;
  assert.deepEqual([input.name, input.mode, input.encoding, input.observedContentType, input["data-ref"]], [
    "x",
    "Input",
    "BASE64",
    "Tensor[FLOAT32; 1, 6]",
    undefined,
  ]);
  const [output] = view.deviceFleetOutputs;
  assert.deepEqual([output.name, output.mode, output.encoding, output.observedContentType], [
    "y",
    "Output",
    "NONE",
    "Tensor[FLOAT32; 600, 6]",
  ]);
  assert.ok(output["data-ref"]?.startsWith(refPrefix), String(output["data-ref"]));
  assert.deepEqual(output.floats, [...OUTPUT], "the data-ref object holds the tensor's bytes");

  const [frame, request] = view.deviceFleetAuxiliaryInputs;
  assert.deepEqual([frame.name, frame.mode, frame.encoding, frame.observedContentType], [
    "frame.jpg",
    "Input",
    "NONE",
    "jpg",
  ]);
  assert.ok(frame["data-ref"]?.startsWith(refPrefix), "5000 bytes are beyond the embed limit");
  assert.deepEqual(bytes(frame), FRAME);
  assert.deepEqual([request.name, request.encoding, request.observedContentType], ["request", "JSON", "json"]);
  assert.equal(new TextDecoder().decode(bytes(request)), '{"frame":7}');
  const [result, table] = view.deviceFleetAuxiliaryOutputs;
  assert.deepEqual([result.name, result.mode, result.encoding], ["result", "Output", "BASE64"]);
  assert.equal(new TextDecoder().decode(bytes(result)), RESULT, "BASE64 aux data decodes once to what was meant");
  assert.deepEqual([table.encoding, table.observedContentType], ["CSV", "csv"]);
  assert.equal(new TextDecoder().decode(bytes(table)), "a,b\n1,2\n");
}

Deno.test("S3: a consumer lists, downloads and struct-unpacks captures in Edge Manager's layout", async () => {
  const s3dir = await Deno.makeTempDir({ prefix: "edge-agent-s3rver-" });
  const s3 = await TestS3.start(s3dir);
  try {
    const config = {
      ...DEVICE,
      sagemaker_edge_core_capture_data_destination: "Cloud",
      sagemaker_edge_provider_s3_bucket_name: BUCKET,
      sagemaker_edge_core_region: "us-east-1",
      sagemaker_edge_core_folder_prefix: "edge/captures",
      edge_agent_s3_endpoint: `http://127.0.0.1:${s3.port}`,
      edge_agent_s3_force_path_style: true,
    };
    await withAgent({ config, env: { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" } }, captureOne);
    const views = await consume(["s3", `http://127.0.0.1:${s3.port}`, BUCKET, "edge/captures/"]);
    checkRecord(views, "edge/captures/", `s3://${BUCKET}/edge/captures/fleet-9/detector/2023/05/31/20/`);
  } finally {
    await s3.stop();
    await Deno.remove(s3dir, { recursive: true });
  }
});

Deno.test("Disk: the same records, with file:// data-refs a consumer on the device opens", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-disk-capture-" });
  const captures = join(dir, "captures");
  try {
    const config = { ...DEVICE, sagemaker_edge_core_capture_data_disk_path: captures };
    await withAgent({ config }, captureOne);
    checkRecord(await consume(["disk", captures]), "", `file://${captures}/fleet-9/detector/2023/05/31/20/`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test('edge_agent_capture_layout "manifest" keeps the earlier layout; an unknown layout stops start-up', async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-manifest-capture-" });
  const captures = join(dir, "captures");
  try {
    const config = { ...DEVICE, sagemaker_edge_core_capture_data_disk_path: captures };
    await withAgent({ config: { ...config, edge_agent_capture_layout: "manifest" } }, captureOne);
    const files: string[] = [];
    for await (const e of Deno.readDir(join(captures, "fleet-9", "camera-9", "detector"))) files.push(e.name);
    assert.deepEqual(files, [String(new Date().getUTCFullYear())], "<fleet>/<device>/<model>/YYYY/...");
    await assert.rejects(
      withAgent({ config: { ...config, edge_agent_capture_layout: "edge_manager" } }, () => Promise.resolve()),
      /edge_agent_capture_layout/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
