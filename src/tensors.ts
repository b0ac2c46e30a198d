// The DataType <-> ONNX Runtime element type table, and the checks that turn request tensors
// into ORT values over the request's own bytes.

import { ElementType, type OnnxRuntime, type TensorInfo, Value } from "../ffi/onnxruntime.ts";
import { invalidArgument } from "./errors.ts";
import type { ShmHandle } from "./shm.ts";
import type { SharedMemoryHandle, Tensor, TensorMetadata, Uint64 } from "./wire.ts";

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
    const shape = metadata ? metadata.shape : spec.shape;
    if (!metadata && shape.some((d) => d < 0)) {
      throw invalidArgument(
        `${label}: no tensor_metadata, and model ${modelName} ${role} "${spec.name}" has dynamic shape ${
          shapeText(spec.shape)
        }: send tensor_metadata with the shape`,
      );
    }
    checkShape(label, `model ${modelName} ${role}`, spec, shape);
    const length = byteLength(shape, spec.dataType.size);
    const needs = () => `shape ${shapeText(shape)} of ${spec.dataType.name} needs ${length ?? "more than can exist"}`;
    if (tensor.data === "shared_memory_handle" && tensor.shared_memory_handle) {
      if (length === undefined) throw invalidArgument(`${label}: ${needs()} bytes`);
      const handle = shmHandle(tensor.shared_memory_handle);
      bound.push({ inputIndex, spec, shape, label, byteLength: length, source: { handle } });
    } else if (tensor.data === "byte_data" && tensor.byte_data) {
      if (length !== tensor.byte_data.byteLength) {
        throw invalidArgument(`${label}: byte_data holds ${tensor.byte_data.byteLength} bytes, but ${needs()}`);
      }
      bound.push({ inputIndex, spec, shape, label, byteLength: length, source: { bytes: tensor.byte_data } });
    } else {
      throw invalidArgument(`${label}: carries no data (set byte_data or shared_memory_handle)`);
    }
  });
  const missing = inputs.filter((_, i) => !seen.has(i)).map((i) => `"${i.name}"`);
  if (requireAll && missing.length > 0) {
    throw invalidArgument(`model ${modelName} needs input(s) ${missing.join(", ")}, which the request does not carry`);
  }
  return bound;
}

function checkShape(label: string, what: string, spec: TensorSpec, shape: number[]): void {
  const mismatch = shape.length !== spec.shape.length ||
    shape.some((d, i) => d < 0 || (spec.shape[i] >= 0 && spec.shape[i] !== d));
  if (mismatch) {
    throw invalidArgument(
      `${label}: shape ${shapeText(shape)} does not fit ${what} "${spec.name}" of shape ${
        shapeText(spec.shape)
      } (-1 = any size)`,
    );
  }
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
