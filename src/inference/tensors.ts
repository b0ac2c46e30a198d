// The DataType <-> ONNX Runtime element type table, and the checks that turn request tensors
// into ORT values over the request's own bytes.

import { ElementType, type OnnxRuntime, type TensorInfo, Value } from "../../ffi/onnxruntime.ts";
import { invalidArgument } from "../errors.ts";
import type { ShmHandle } from "./shm.ts";
import type { SharedMemoryHandle, Tensor, TensorMetadata, Uint64 } from "../service/wire.ts";

interface DataTypeEntry {
  /** Value of the wire enum DataType. */
  dataType: number;
  name: string;
  elementType: number;
  size: number;
}

/** Wire DataType values 0..6 are Edge Manager's; 7.. are this agent's additions. */
const DATA_TYPES: DataTypeEntry[] = [
  { dataType: 0, name: "UINT8", elementType: ElementType.UINT8, size: 1 },
  { dataType: 1, name: "INT16", elementType: ElementType.INT16, size: 2 },
  { dataType: 2, name: "INT32", elementType: ElementType.INT32, size: 4 },
  { dataType: 3, name: "INT64", elementType: ElementType.INT64, size: 8 },
  { dataType: 4, name: "FLOAT16", elementType: ElementType.FLOAT16, size: 2 },
  { dataType: 5, name: "FLOAT32", elementType: ElementType.FLOAT, size: 4 },
  { dataType: 6, name: "FLOAT64", elementType: ElementType.DOUBLE, size: 8 },
  { dataType: 7, name: "INT8", elementType: ElementType.INT8, size: 1 },
  { dataType: 8, name: "UINT16", elementType: ElementType.UINT16, size: 2 },
  { dataType: 9, name: "UINT32", elementType: ElementType.UINT32, size: 4 },
  { dataType: 10, name: "UINT64", elementType: ElementType.UINT64, size: 8 },
  { dataType: 11, name: "BOOL", elementType: ElementType.BOOL, size: 1 },
  { dataType: 12, name: "BFLOAT16", elementType: ElementType.BFLOAT16, size: 2 },
];

const byDataType = new Map(DATA_TYPES.map((e) => [e.dataType, e]));
const byElementType = new Map<number, DataTypeEntry>(DATA_TYPES.map((e) => [e.elementType, e]));
const ELEMENT_TYPE_NAMES = new Map<number, string>(Object.entries(ElementType).map(([name, value]) => [value, name]));

/** The wire DataType of an ORT element type, or undefined when the wire has none. */
export function dataTypeOfElement(elementType: number): DataTypeEntry | undefined {
  return byElementType.get(elementType);
}

export function dataTypeName(dataType: number): string {
  return byDataType.get(dataType)?.name ?? `unknown (${dataType})`;
}

/** Bytes per element of a wire DataType (0 for an unknown one). */
export function elementSize(dataType: number): number {
  return byDataType.get(dataType)?.size ?? 0;
}

export function elementTypeName(elementType: number): string {
  return elementType === -1 ? "a non-tensor value" : ELEMENT_TYPE_NAMES.get(elementType) ?? `type ${elementType}`;
}

/** A model input or output as the wire describes it. */
export interface TensorSpec {
  name: string;
  dataType: DataTypeEntry;
  /** Dynamic dimensions are -1. */
  shape: number[];
}

/** Maps a session's tensor info to wire specs; lists what has no wire type. */
export function toSpecs(infos: TensorInfo[]): { specs: TensorSpec[]; unsupported: string[] } {
  const specs: TensorSpec[] = [];
  const unsupported: string[] = [];
  for (const info of infos) {
    const dataType = dataTypeOfElement(info.elementType);
    if (dataType) specs.push({ name: info.name, dataType, shape: info.shape.map((d) => (d < 0 ? -1 : d)) });
    else unsupported.push(`${info.name} (${elementTypeName(info.elementType)})`);
  }
  return { specs, unsupported };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: false });

export function metadataOf(spec: TensorSpec): TensorMetadata {
  return { name: encoder.encode(spec.name), data_type: spec.dataType.dataType, shape: spec.shape };
}

export function shapeText(shape: number[]): string {
  return `[${shape.join(",")}]`;
}

/** Number of bytes of a tensor, or undefined when it does not fit in memory anyway. */
function byteLength(shape: number[], elementSize: number): number | undefined {
  let bytes = BigInt(elementSize);
  for (const d of shape) bytes *= BigInt(d);
  return bytes <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(bytes) : undefined;
}

/** One request tensor, checked against the model input it feeds. */
export interface BoundInput {
  inputIndex: number;
  spec: TensorSpec;
  shape: number[];
  /** Names the tensor in error messages. */
  label: string;
  byteLength: number;
  /** The bytes from the message, or where they lie in shared memory. */
  source: { bytes: Uint8Array } | { handle: ShmHandle };
}

/** A wire handle's uint64 fields as BigInts (no precision lost near 2^64). */
export function shmHandle(handle: SharedMemoryHandle): ShmHandle {
  return { size: uint64(handle.size), offset: uint64(handle.offset), segmentId: uint64(handle.segment_id) };
}

function uint64(value: Uint64): bigint {
  return typeof value === "number" ? BigInt(value) : BigInt.asUintN(64, BigInt(value.toString()));
}

/**
 * Matches request tensors to model inputs (by metadata name, or by position when a tensor has
 * no name) and checks dtype, shape and byte length. Throws INVALID_ARGUMENT naming the tensor.
 */
export function bindInputs(
  modelName: string,
  inputs: TensorSpec[],
  tensors: Tensor[],
  { role = "input", requireAll = true }: { role?: "input" | "output"; requireAll?: boolean } = {},
): BoundInput[] {
  const bound: BoundInput[] = [];
  const seen = new Set<number>();
  tensors.forEach((tensor, position) => {
    const metadata = tensor.tensor_metadata ?? null;
    const name = metadata ? decoder.decode(metadata.name) : "";
    const label = name ? `tensor "${name}"` : `tensor #${position}`;
    const inputIndex = name ? inputs.findIndex((i) => i.name === name) : position;
    if (inputIndex < 0 || inputIndex >= inputs.length) {
      throw invalidArgument(
        name
          ? `${label}: model ${modelName} has no ${role} of that name (${role}s: ${
            inputs.map((i) => i.name).join(", ")
          })`
          : `${label}: model ${modelName} has only ${inputs.length} ${role}(s)`,
      );
    }
    if (seen.has(inputIndex)) throw invalidArgument(`${label}: input "${inputs[inputIndex].name}" is given twice`);
    seen.add(inputIndex);
    const spec = inputs[inputIndex];
    if (metadata && metadata.data_type !== spec.dataType.dataType) {
      throw invalidArgument(
        `${label}: data_type ${
          dataTypeName(metadata.data_type)
        } but model ${modelName} ${role} "${spec.name}" is ${spec.dataType.name}`,
      );
    }
    const handle = tensor.data === "shared_memory_handle" && tensor.shared_memory_handle
      ? shmHandle(tensor.shared_memory_handle)
      : null;
    const bytes = tensor.data === "byte_data" && tensor.byte_data ? tensor.byte_data : null;
    if (!handle && !bytes) throw invalidArgument(`${label}: carries no data (set byte_data or shared_memory_handle)`);
    // The data's length settles one -1 (a handle's size 0 means "as the shape needs", so it settles none).
    const available = handle
      ? { bytes: handle.size === 0n ? null : handle.size, what: "shared_memory_handle.size" }
      : { bytes: BigInt(bytes!.byteLength), what: "byte_data" };
    const shape = resolveShape(label, `model ${modelName} ${role} "${spec.name}"`, spec, metadata?.shape, available);
    const length = byteLength(shape, spec.dataType.size);
    const needs = () => `shape ${shapeText(shape)} of ${spec.dataType.name} needs ${length ?? "more than can exist"}`;
    if (handle) {
      if (length === undefined) throw invalidArgument(`${label}: ${needs()} bytes`);
      bound.push({ inputIndex, spec, shape, label, byteLength: length, source: { handle } });
    } else {
      if (length !== bytes!.byteLength) {
        throw invalidArgument(`${label}: byte_data holds ${bytes!.byteLength} bytes, but ${needs()}`);
      }
      bound.push({ inputIndex, spec, shape, label, byteLength: length, source: { bytes: bytes! } });
    }
  });
  const missing = inputs.filter((_, i) => !seen.has(i)).map((i) => `"${i.name}"`);
  if (requireAll && missing.length > 0) {
    throw invalidArgument(`model ${modelName} needs input(s) ${missing.join(", ")}, which the request does not carry`);
  }
  return bound;
}

/**
 * The shape a request tensor runs with. A -1 where the model's dimension is fixed takes that size (Edge
 * Manager's clients copy ListModels' metadata into requests); one -1 where it is dynamic is worked out
 * from the data's length, as reshape does. Throws INVALID_ARGUMENT naming what the client must give.
 */
export function resolveShape(
  label: string,
  what: string,
  spec: TensorSpec,
  given: number[] | undefined,
  available: { bytes: bigint | null; what: string },
): number[] {
  const shape = [...(given ?? spec.shape)];
  const doesNotFit = () =>
    invalidArgument(
      `${label}: shape ${shapeText(shape)} does not fit ${what} of shape ${shapeText(spec.shape)} (-1 = any size)`,
    );
  if (shape.length !== spec.shape.length) throw doesNotFit();
  const open: number[] = [];
  for (const [i, d] of shape.entries()) {
    if (d < -1) {
      throw invalidArgument(`${label}: shape ${shapeText(shape)}: dimension ${i} is ${d}; a size is 0 or more, or -1`);
    }
    if (d === -1 && spec.shape[i] >= 0) shape[i] = spec.shape[i];
    else if (d === -1) open.push(i);
    else if (spec.shape[i] >= 0 && spec.shape[i] !== d) throw doesNotFit();
  }
  if (open.length === 0) return shape;
  const dims = open.join(", ");
  if (!given) {
    if (open.length === 1 && available.bytes !== null) return settle(label, shape, open[0], spec, available);
    throw invalidArgument(
      `${label}: no tensor_metadata, and ${what} has dynamic shape ${
        shapeText(spec.shape)
      }: send tensor_metadata with the shape`,
    );
  }
  if (open.length > 1) {
    throw invalidArgument(
      `${label}: shape ${shapeText(shape)} leaves dimensions ${dims} of ${what} (${
        shapeText(spec.shape)
      }) open, and the data's length can settle only one -1: give the sizes of dimensions ${dims} (one may stay -1)`,
    );
  }
  if (available.bytes === null) {
    throw invalidArgument(
      `${label}: shape ${
        shapeText(shape)
      }: dimension ${dims} is -1, and ${available.what} is 0, so nothing settles it: ` +
        `give its size or set ${available.what}`,
    );
  }
  return settle(label, shape, open[0], spec, available);
}

/** Sets dimension `index` (-1) so the shape covers exactly the available bytes. */
function settle(
  label: string,
  shape: number[],
  index: number,
  spec: TensorSpec,
  available: { bytes: bigint | null; what: string },
): number[] {
  const bytes = available.bytes!;
  let step = BigInt(spec.dataType.size);
  for (const [i, d] of shape.entries()) if (i !== index) step *= BigInt(d);
  if (step === 0n || bytes % step !== 0n || bytes / step > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw invalidArgument(
      `${label}: shape ${shapeText(shape)} of ${spec.dataType.name}: ${available.what} holds ${bytes} bytes, which is ${
        step === 0n ? "not settled by" : "not a whole multiple of"
      } the ${step} bytes each step of dimension ${index} takes, so the -1 cannot be worked out`,
    );
  }
  shape[index] = Number(bytes / step);
  return shape;
}

/**
 * Where the first tensor's byte_data begins in an encoded PredictRequest, read from its first bytes
 * alone (the wire format, without decoding): null when they do not reach it. Clients place fields
 * differently (proto3 encoders pack a shape, protobufjs does not), so the offset varies by client.
 */
export function firstTensorBytesOffset(head: Uint8Array): number | null {
  let pos = 0;
  const varint = (): number | null => {
    let value = 0;
    for (let shift = 0; shift < 35; shift += 7) {
      if (pos >= head.length) return null;
      const byte = head[pos++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
    return null;
  };
  let inTensor = false;
  while (pos < head.length) {
    const key = varint();
    if (key === null) return null;
    const field = Math.floor(key / 8);
    const wireType = key % 8;
    if (wireType === 0) {
      if (varint() === null) return null;
    } else if (wireType === 1 || wireType === 5) {
      pos += wireType === 1 ? 8 : 4;
    } else if (wireType === 2) {
      const length = varint();
      if (length === null) return null;
      // PredictRequest.tensors = 2, then Tensor.byte_data = 4: the bytes start after the length.
      if (inTensor && field === 4) return pos;
      if (!inTensor && field === 2) inTensor = true;
      else pos += length;
    } else {
      return null;
    }
  }
  return null;
}

/**
 * An ORT value over the tensor's bytes. Zero-copy when the bytes are aligned to the element size;
 * otherwise they are copied once into an aligned buffer, since typed element access in ORT's kernels
 * assumes natural alignment.
 */
export function inputValue(
  ort: OnnxRuntime,
  input: BoundInput,
  bytes: Uint8Array,
): { value: Value; copied: boolean } {
  const { spec } = input;
  const address = Number(BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))) % BigInt(spec.dataType.size));
  const aligned = bytes.byteLength === 0 || address === 0;
  // Uint8Array's slice copies; a Buffer's (what grpc-js hands us) would only make another view.
  const data = aligned ? bytes : Uint8Array.prototype.slice.call(bytes);
  return { value: Value.tensorOver(ort, data, input.shape, spec.dataType.elementType), copied: !aligned };
}

/** Byte length of an output tensor produced by ORT. */
export function outputByteLength(shape: number[], dataType: DataTypeEntry): number {
  const length = byteLength(shape, dataType.size);
  if (length === undefined) throw new Error(`output of shape ${shapeText(shape)} is too large`);
  return length;
}
