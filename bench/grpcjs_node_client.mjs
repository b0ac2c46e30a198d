// The benchmark's Node.js client: @grpc/grpc-js under Node, as Node applications on devices call the agent,
// with its messages from proto/agent.proto through protobufjs (what @grpc/proto-loader does underneath).
//
// Run by bench/grpcio.ts with `node`, long-lived, connected to the agent on unix:<socket>; it speaks the same
// JSON-lines protocol as bench/grpcio_client.py: {"ready": <grpc-js version>} once connected, then
//   {"op": "predict", "name", "input", "input_name", "shape", "count"[, "segment_id"][, "output"]}
//       -> {"ms": [...], "encode_ms": [...], "decode_ms": [...]}
//   {"op": "list_models", "count"} -> {"ms": [...]}
// Each call is timed around the client call, from the request object to the decoded response; encode_ms and
// decode_ms are the protobufjs encoding of its request and decoding of its response, timed inside it. With
// "segment_id" the tensor is a handle to that shared memory segment (SysV id, or the agent's POSIX object
// <prefix><id>), which holds the input at offset 0: the segment is made and filled by the benchmark.
// An RPC failure is printed to stderr and ends the process, which the Deno side reports.

import { Buffer } from "node:buffer";
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import process from "node:process";
import { parseArgs } from "node:util";
import * as grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";

// The limits the other benchmark clients set, so every client accepts the same messages.
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const CONNECT_TIMEOUT_MS = 30_000;

const { values } = parseArgs({ options: { socket: { type: "string" } } });
const root = protobuf.parse(readFileSync(new URL("../proto/agent.proto", import.meta.url), "utf8"), {
  keepCase: true,
}).root;
const type = (name) => root.lookupType(`AWS.SageMaker.Edge.${name}`);
// Codec time of the call in progress (calls run one at a time).
const codec = { encodeMs: 0, decodeMs: 0 };
// protobufjs under Node encodes into a Buffer already: handed over as it is, as @grpc/proto-loader does.
const asBuffer = (bytes) => Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
const method = (name, request, response) => ({
  path: `/AWS.SageMaker.Edge.Agent/${name}`,
  requestStream: false,
  responseStream: false,
  requestSerialize: (message) => {
    const started = performance.now();
    const bytes = asBuffer(type(request).encode(message).finish());
    codec.encodeMs += performance.now() - started;
    return bytes;
  },
  requestDeserialize: (bytes) => type(request).decode(bytes),
  responseSerialize: (message) => asBuffer(type(response).encode(message).finish()),
  responseDeserialize: (bytes) => {
    const started = performance.now();
    const message = type(response).decode(bytes);
    codec.decodeMs += performance.now() - started;
    return message;
  },
});
const Agent = grpc.makeGenericClientConstructor({
  predict: method("Predict", "PredictRequest", "PredictResponse"),
  listModels: method("ListModels", "ListModelsRequest", "ListModelsResponse"),
}, "Agent");
const client = new Agent(`unix:${values.socket}`, grpc.credentials.createInsecure(), {
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
});

const call = (name, request) =>
  new Promise((resolve, reject) =>
    client[name](request, (error, response) => (error ? reject(error) : resolve(response)))
  );

async function timed(count, name, request) {
  const ms = [];
  const encodeMs = [];
  const decodeMs = [];
  let response = null;
  for (let i = 0; i < count; i++) {
    codec.encodeMs = codec.decodeMs = 0;
    const started = performance.now();
    response = await call(name, request);
    ms.push(performance.now() - started);
    encodeMs.push(codec.encodeMs);
    decodeMs.push(codec.decodeMs);
  }
  return { ms, encodeMs, decodeMs, response };
}

const FLOAT32 = root.lookupEnum("AWS.SageMaker.Edge.DataType").values.FLOAT32;
// Inputs read once per file: an application holds its tensor in memory already.
const inputs = new Map();

async function main() {
  await new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + CONNECT_TIMEOUT_MS, (error) => (error ? reject(error) : resolve()))
  );
  const version = createRequire(import.meta.url)("@grpc/grpc-js/package.json").version;
  process.stdout.write(JSON.stringify({ ready: version }) + "\n");
  for await (const line of createInterface({ input: process.stdin })) {
    const command = JSON.parse(line);
    if (command.op === "list_models") {
      const { ms } = await timed(command.count, "listModels", {});
      process.stdout.write(JSON.stringify({ ms }) + "\n");
      continue;
    }
    const tensor_metadata = { name: Buffer.from(command.input_name), data_type: FLOAT32, shape: command.shape };
    let tensor;
    if (command.segment_id !== undefined && command.segment_id !== null) {
      // Offset 0, size 0: Edge Manager's handle, the size being the tensor's.
      tensor = { tensor_metadata, shared_memory_handle: { segment_id: command.segment_id, offset: 0, size: 0 } };
    } else {
      if (!inputs.has(command.input)) inputs.set(command.input, readFileSync(command.input));
      tensor = { tensor_metadata, byte_data: inputs.get(command.input) };
    }
    const request = { name: command.name, tensors: [tensor] };
    const { ms, encodeMs, decodeMs, response } = await timed(command.count, "predict", request);
    if (command.output) writeFileSync(command.output, response.tensors[0].byte_data);
    process.stdout.write(JSON.stringify({ ms, encode_ms: encodeMs, decode_ms: decodeMs }) + "\n");
  }
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
