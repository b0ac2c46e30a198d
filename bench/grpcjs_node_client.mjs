// The benchmark's Node.js client: @grpc/grpc-js under Node, as Node applications on devices call the agent,
// with its messages from proto/agent.proto through protobufjs (what @grpc/proto-loader does underneath).
//
// Run by bench/grpcio.ts with `node`, long-lived, connected to the agent on unix:<socket>; it speaks the same
// JSON-lines protocol as bench/grpcio_client.py: {"ready": <grpc-js version>} once connected, then
//   {"op": "predict", "name", "input", "input_name", "shape", "count"[, "output"]} -> {"ms": [...]}
//   {"op": "list_models", "count"} -> {"ms": [...]}
// Each call is timed around the client call, from the request object to the decoded response.
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
const method = (name, request, response) => ({
  path: `/AWS.SageMaker.Edge.Agent/${name}`,
  requestStream: false,
  responseStream: false,
  requestSerialize: (message) => Buffer.from(type(request).encode(message).finish()),
  requestDeserialize: (bytes) => type(request).decode(bytes),
  responseSerialize: (message) => Buffer.from(type(response).encode(message).finish()),
  responseDeserialize: (bytes) => type(response).decode(bytes),
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
  let response = null;
  for (let i = 0; i < count; i++) {
    const started = performance.now();
    response = await call(name, request);
    ms.push(performance.now() - started);
  }
  return { ms, response };
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
    if (!inputs.has(command.input)) inputs.set(command.input, readFileSync(command.input));
    const request = {
      name: command.name,
      tensors: [{
        tensor_metadata: { name: Buffer.from(command.input_name), data_type: FLOAT32, shape: command.shape },
        byte_data: inputs.get(command.input),
      }],
    };
    const { ms, response } = await timed(command.count, "predict", request);
    if (command.output) writeFileSync(command.output, response.tensors[0].byte_data);
    process.stdout.write(JSON.stringify({ ms }) + "\n");
  }
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
