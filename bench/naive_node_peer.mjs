// A naive agent for comparison: grpc-js's server under Node, serving the Agent's Predict with
// onnxruntime-node, as one would write it in a Node program without care for copies. The benchmark's grpc-js
// client under Node calls it beside the real agent, so the agent's transport has a plain Node peer to beat.
//
//   node bench/naive_node_peer.mjs --socket=<path> --model=<name>=<file.onnx> [--model ...]
//       [--intra-op-threads=N] [--allow-spinning=0|1] [--graph-optimization=disabled|basic|extended|all]
// Prints "listening" once it serves; runs until killed. Only Predict (bytes inputs) and ListModels.

import { Buffer } from "node:buffer";
import { readFileSync } from "node:fs";
import process from "node:process";
import { parseArgs } from "node:util";
import * as grpc from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import protobuf from "protobufjs";

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

const { values } = parseArgs({
  options: {
    socket: { type: "string" },
    model: { type: "string", multiple: true },
    "intra-op-threads": { type: "string", default: "0" },
    "allow-spinning": { type: "string", default: "1" },
    "graph-optimization": { type: "string", default: "all" },
  },
});
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
const FLOAT32 = root.lookupEnum("AWS.SageMaker.Edge.DataType").values.FLOAT32;

const sessions = new Map();
const spinning = values["allow-spinning"];
for (const spec of values.model ?? []) {
  const at = spec.indexOf("=");
  sessions.set(
    spec.slice(0, at),
    await ort.InferenceSession.create(spec.slice(at + 1), {
      intraOpNumThreads: Number(values["intra-op-threads"]),
      interOpNumThreads: 1,
      graphOptimizationLevel: values["graph-optimization"],
      extra: { session: { intra_op: { allow_spinning: spinning }, inter_op: { allow_spinning: spinning } } },
    }),
  );
}

async function predict(call, callback) {
  try {
    const session = sessions.get(call.request.name);
    if (!session) return callback({ code: grpc.status.NOT_FOUND, details: `model ${call.request.name} is not loaded` });
    const feeds = {};
    call.request.tensors.forEach((tensor, i) => {
      const bytes = tensor.byte_data;
      // A Float32Array needs 4-byte alignment: copied when the message placed the bytes elsewhere.
      const aligned = bytes.byteOffset % 4 === 0 ? bytes : Buffer.from(bytes);
      const data = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.length / 4);
      feeds[session.inputNames[i]] = new ort.Tensor("float32", data, tensor.tensor_metadata.shape);
    });
    const outputs = await session.run(feeds);
    callback(null, {
      tensors: session.outputNames.map((name) => {
        const output = outputs[name];
        return {
          tensor_metadata: { name: Buffer.from(name), data_type: FLOAT32, shape: output.dims },
          byte_data: Buffer.from(output.data.buffer, output.data.byteOffset, output.data.byteLength),
        };
      }),
    });
  } catch (error) {
    callback({ code: grpc.status.INTERNAL, details: String(error?.message ?? error) });
  }
}

const server = new grpc.Server({
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
});
server.addService({
  predict: method("Predict", "PredictRequest", "PredictResponse"),
  listModels: method("ListModels", "ListModelsRequest", "ListModelsResponse"),
}, {
  predict,
  listModels: (_call, callback) => callback(null, { models: [] }),
});
server.bindAsync(`unix:${values.socket}`, grpc.ServerCredentials.createInsecure(), (error) => {
  if (error) {
    console.error(error);
    process.exit(1);
  }
  process.stdout.write("listening\n");
});
