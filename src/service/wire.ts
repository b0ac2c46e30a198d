// Protobuf codecs for proto/agent.proto and proto/health.proto.
// Decoded `bytes` fields are views into the received message (no copy).

import { Buffer } from "node:buffer";
import protobuf from "protobufjs";
import agentProto from "../../proto/agent.proto" with { type: "text" };
import healthProto from "../../proto/health.proto" with { type: "text" };

const root = protobuf.parse(agentProto, { keepCase: true }).root;
export const PACKAGE = "AWS.SageMaker.Edge";
export const SERVICE_NAME = `${PACKAGE}.Agent`;

/** protobufjs' 64-bit integer (long.js), as decoded from int64/uint64 fields. */
export interface Long {
  low: number;
  high: number;
  unsigned: boolean;
  toString(): string;
}

export interface TensorMetadata {
  name: Uint8Array;
  data_type: number;
  shape: number[];
}

/** uint64 fields decode as Long; when encoding, decimal strings carry values past 2^53 too. */
export type Uint64 = Long | number | string;

export interface SharedMemoryHandle {
  size: Uint64;
  offset: Uint64;
  segment_id: Uint64;
}

export interface Tensor {
  tensor_metadata?: TensorMetadata | null;
  byte_data?: Uint8Array;
  shared_memory_handle?: SharedMemoryHandle | null;
  /** Which member of the `data` oneof is set. */
  data?: "byte_data" | "shared_memory_handle";
}

export interface Model {
  url: string;
  name: string;
  input_tensor_metadatas: TensorMetadata[];
  output_tensor_metadatas: TensorMetadata[];
}

/** Where an output goes in the client's shared memory (an addition of this agent). */
export interface OutputLocation {
  /** The output's name; when empty, `index` names it. */
  name?: string;
  index?: number;
  shared_memory_handle?: SharedMemoryHandle | null;
}

export interface PredictRequest {
  name: string;
  tensors: Tensor[];
  output_locations?: OutputLocation[];
}

export interface NameRequest {
  name: string;
}

export interface LoadModelRequest {
  url: string;
  name: string;
}

export interface AuxilaryData {
  name: string;
  /** Wire enum Encoding: CSV = 0, JSON = 1, NONE = 2, BASE64 = 3. */
  encoding: number;
  byte_data?: Uint8Array;
  shared_memory_handle?: SharedMemoryHandle | null;
  data?: "byte_data" | "shared_memory_handle";
}

export interface CaptureDataRequest {
  model_name: string;
  capture_id: string;
  inference_timestamp?: { seconds: Long | number; nanos: number } | null;
  input_tensors: Tensor[];
  output_tensors: Tensor[];
  inputs: AuxilaryData[];
  outputs: AuxilaryData[];
}

export const RPC_NAMES = [
  "Predict",
  "LoadModel",
  "UnLoadModel",
  "ListModels",
  "DescribeModel",
  "CaptureData",
  "GetCaptureDataStatus",
] as const;
export type RpcName = typeof RPC_NAMES[number];

/** Each rpc's request and response message types, as the server and the clients encode them. */
export const RPC_TYPES = Object.fromEntries(
  RPC_NAMES.map((rpc) => [rpc, { request: messageType(`${rpc}Request`), response: messageType(`${rpc}Response`) }]),
) as Record<RpcName, { request: protobuf.Type; response: protobuf.Type }>;

const healthRoot = protobuf.parse(healthProto, { keepCase: true }).root;
export const HEALTH_SERVICE_NAME = "grpc.health.v1.Health";

/** grpc.health.v1 messages, and ServingStatus values by name. */
export const health = {
  request: healthRoot.lookupType("grpc.health.v1.HealthCheckRequest"),
  response: healthRoot.lookupType("grpc.health.v1.HealthCheckResponse"),
  status: healthRoot.lookupEnum("grpc.health.v1.HealthCheckResponse.ServingStatus").values,
};

/** Enum values by name, e.g. enumValues("DataType").FLOAT32 === 5. */
export function enumValues(name: string): Record<string, number> {
  return root.lookupEnum(`${PACKAGE}.${name}`).values;
}

export function messageType(name: string): protobuf.Type {
  return root.lookupType(`${PACKAGE}.${name}`);
}

/** A Buffer over `bytes` without copying. */
export function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const TensorMetadataType = messageType("TensorMetadata");
const SharedMemoryHandleType = messageType("SharedMemoryHandle");

/** A response tensor whose bytes are copied straight into the encoded message. */
export interface OutputTensor {
  tensor_metadata: TensorMetadata;
  byteLength: number;
  copyInto(target: Uint8Array): void;
  /** Where the output was written instead (outputs by shared memory): the tensor carries no bytes. */
  shared_memory_handle?: SharedMemoryHandle;
}

function varintSize(value: number): number {
  let size = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    size++;
  }
  return size;
}

/**
 * The PredictResponse protobufjs would encode, byte for byte, written into one buffer from
 * `allocate` (a pooled one: see transport/buffers.ts), each tensor's bytes copied once into place.
 */
export function encodePredictResponseInto(
  tensors: OutputTensor[],
  allocate: (length: number) => Uint8Array,
): Uint8Array {
  // PredictResponse.tensors = 1 { Tensor.tensor_metadata = 1 {...}, Tensor.byte_data = 4 bytes
  // | Tensor.shared_memory_handle = 5 {...} }
  const metas = tensors.map((tensor) => TensorMetadataType.encode(tensor.tensor_metadata).finish());
  const handles = tensors.map((tensor) =>
    tensor.shared_memory_handle ? SharedMemoryHandleType.encode(tensor.shared_memory_handle).finish() : null
  );
  const bodyLength = (i: number) => handles[i]?.length ?? tensors[i].byteLength;
  const sizes = tensors.map((_, i) =>
    1 + varintSize(metas[i].length) + metas[i].length + 1 + varintSize(bodyLength(i)) + bodyLength(i)
  );
  const out = allocate(sizes.reduce((total, size) => total + 1 + varintSize(size) + size, 0));
  let at = 0;
  const varint = (value: number) => {
    while (value >= 128) {
      out[at++] = (value % 128) | 128;
      value = Math.floor(value / 128);
    }
    out[at++] = value;
  };
  tensors.forEach((tensor, i) => {
    out[at++] = 0x0a;
    varint(sizes[i]);
    out[at++] = 0x0a;
    varint(metas[i].length);
    out.set(metas[i], at);
    at += metas[i].length;
    const handle = handles[i];
    if (handle) {
      out[at++] = 0x2a;
      varint(handle.length);
      out.set(handle, at);
      at += handle.length;
      return;
    }
    out[at++] = 0x22;
    varint(tensor.byteLength);
    tensor.copyInto(out.subarray(at, at + tensor.byteLength));
    at += tensor.byteLength;
  });
  return out;
}
