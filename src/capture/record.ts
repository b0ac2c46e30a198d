// A capture record and its binary form in the spool.
//
// Layout (version 2, little-endian; str = u16 UTF-8 byte length + bytes):
//   u8 version, str capture_id, str model_name, str model_version (absent in version 1: read as ""),
//   i64 inference seconds, u32 inference nanos, i64 arrival seconds, u32 arrival nanos,
//   u32 counts of input tensors, output tensors, aux inputs, aux outputs,
//   each tensor: str name, u32 data_type, u32 rank, f64 dims[rank], u32 byte length, bytes
//   each aux:    str name, u32 encoding, u32 byte length, bytes
// A hand-written layout rather than protobuf: identity fields come first so recovery reads them without
// decoding tensors, the record is built in one pass straight into its spool frame (one copy of the
// tensor bytes), and decoding returns views into the read buffer instead of copies.

import { invalidArgument } from "../errors.ts";
import { allocFrame, FRAME_HEADER_BYTES, sealFrame } from "./frame.ts";

/** Edge Manager's AuxilaryData encodings (numbers as in agent.proto). */
export enum AuxEncoding {
  CSV = 0,
  JSON = 1,
  NONE = 2,
  BASE64 = 3,
}

export interface Timestamp {
  seconds: number;
  nanos: number;
}

export interface CaptureTensor {
  name: string;
  /** agent.proto DataType number. */
  dataType: number;
  shape: number[];
  data: Uint8Array;
}

export interface CaptureAux {
  name: string;
  encoding: AuxEncoding;
  data: Uint8Array;
}

export interface CaptureRecord {
  captureId: string;
  modelName: string;
  /** The loaded package's version (edge-model.json), "" when it names none. */
  modelVersion?: string;
  inferenceTimestamp: Timestamp;
  /** When the agent received the request; CaptureService.capture fills it in when absent. */
  arrivalTime?: Timestamp;
  inputTensors: CaptureTensor[];
  outputTensors: CaptureTensor[];
  inputs: CaptureAux[];
  outputs: CaptureAux[];
}

/** The fields recovery and batching need, read without decoding tensors. */
export interface RecordHeader {
  captureId: string;
  modelName: string;
  modelVersion: string;
  inferenceTimestamp: Timestamp;
  arrivalTime: Timestamp;
}

const VERSION = 2;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });
const MAX_U32 = 0xffffffff;

export function timestampFromMillis(ms: number): Timestamp {
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

export function timestampToMillis(t: Timestamp): number {
  return t.seconds * 1000 + Math.floor(t.nanos / 1e6);
}

function checkTimestamp(what: string, t: Timestamp | undefined): void {
  if (!t || !Number.isSafeInteger(t.seconds) || !Number.isInteger(t.nanos) || t.nanos < 0 || t.nanos > 999_999_999) {
    throw invalidArgument(`${what} must have integer seconds and nanos in [0, 999999999]`);
  }
}

/**
 * The UTF-8 form of a string field: the string itself when it is ASCII (ids and names mostly are; the
 * frame writer copies its characters, sparing a TextEncoder call and an allocation per field), else bytes.
 */
function checkString(what: string, s: unknown, allowEmpty = false): Uint8Array | string {
  if (typeof s !== "string" || (!allowEmpty && s.length === 0)) {
    throw invalidArgument(`${what} must be a non-empty string`);
  }
  let ascii = s.length <= 0xffff;
  for (let i = 0; ascii && i < s.length; i++) ascii = s.charCodeAt(i) < 0x80;
  if (ascii) return s;
  const bytes = encoder.encode(s);
  if (bytes.length > 0xffff) throw invalidArgument(`${what} is longer than 65535 bytes`);
  return bytes;
}

function checkU32(what: string, n: unknown): number {
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > MAX_U32) {
    throw invalidArgument(`${what} must be an integer in [0, 2^32)`);
  }
  return n;
}

/**
 * Validates `record` and serializes it into a spool frame (header space reserved, checksums written).
 * Throws AgentError(INVALID_ARGUMENT) for a record that cannot be stored.
 */
export function encodeRecordFrame(record: CaptureRecord & { arrivalTime: Timestamp }): Uint8Array {
  const id = checkString("capture_id", record.captureId);
  const model = checkString("model_name", record.modelName);
  const modelVersion = checkString("model version", record.modelVersion ?? "", true);
  checkTimestamp("inference_timestamp", record.inferenceTimestamp);
  checkTimestamp("arrival time", record.arrivalTime);
  const lists = [record.inputTensors ?? [], record.outputTensors ?? [], record.inputs ?? [], record.outputs ?? []];
  let size = 1 + 2 + id.length + 2 + model.length + 2 + modelVersion.length + 8 + 4 + 8 + 4 + 16;
  const names: Array<Uint8Array | string> = [];
  for (const [which, tensors] of [["input tensor", lists[0]], ["output tensor", lists[1]]] as const) {
    for (const t of tensors as CaptureTensor[]) {
      const name = checkString(`${which} name`, t.name, true);
      names.push(name);
      checkU32(`${which} ${t.name} data_type`, t.dataType);
      if (!Array.isArray(t.shape) || t.shape.length > 0xffff || !t.shape.every((d) => Number.isSafeInteger(d))) {
        throw invalidArgument(`${which} ${t.name} shape must be a list of integers`);
      }
      if (!(t.data instanceof Uint8Array) || t.data.length > MAX_U32) {
        throw invalidArgument(`${which} ${t.name} data must be bytes under 4 GiB`);
      }
      size += 2 + name.length + 4 + 4 + 8 * t.shape.length + 4 + t.data.length;
    }
  }
  for (const [which, auxes] of [["aux input", lists[2]], ["aux output", lists[3]]] as const) {
    for (const a of auxes as CaptureAux[]) {
      const name = checkString(`${which} name`, a.name, true);
      names.push(name);
      if (!(a.encoding in AuxEncoding) || typeof a.encoding !== "number") {
        throw invalidArgument(`${which} ${a.name} encoding must be CSV, JSON, NONE or BASE64`);
      }
      if (!(a.data instanceof Uint8Array) || a.data.length > MAX_U32) {
        throw invalidArgument(`${which} ${a.name} data must be bytes under 4 GiB`);
      }
      size += 2 + name.length + 4 + 4 + a.data.length;
    }
  }
  if (size > MAX_U32 - FRAME_HEADER_BYTES) throw invalidArgument("capture is larger than 4 GiB");

  const frame = allocFrame(size);
  const view = new DataView(frame.buffer);
  let p = FRAME_HEADER_BYTES;
  const u32 = (n: number) => {
    view.setUint32(p, n, true);
    p += 4;
  };
  const bytes = (b: Uint8Array) => {
    frame.set(b, p);
    p += b.length;
  };
  const str = (b: Uint8Array | string) => {
    view.setUint16(p, b.length, true);
    p += 2;
    if (typeof b !== "string") return bytes(b);
    for (let i = 0; i < b.length; i++) frame[p++] = b.charCodeAt(i);
  };
  const ts = (t: Timestamp) => {
    // An i64 as two halves (exact for safe integers, negative ones too): no BigInt per field.
    view.setUint32(p, t.seconds >>> 0, true);
    view.setInt32(p + 4, Math.floor(t.seconds / 2 ** 32), true);
    p += 8;
    u32(t.nanos);
  };
  frame[p++] = VERSION;
  str(id);
  str(model);
  str(modelVersion);
  ts(record.inferenceTimestamp);
  ts(record.arrivalTime);
  for (const list of lists) u32(list.length);
  let n = 0;
  for (const tensors of [lists[0], lists[1]] as CaptureTensor[][]) {
    for (const t of tensors) {
      str(names[n++]);
      u32(t.dataType);
      u32(t.shape.length);
      for (const d of t.shape) {
        view.setFloat64(p, d, true);
        p += 8;
      }
      u32(t.data.length);
      bytes(t.data);
    }
  }
  for (const auxes of [lists[2], lists[3]] as CaptureAux[][]) {
    for (const a of auxes) {
      str(names[n++]);
      u32(a.encoding);
      u32(a.data.length);
      bytes(a.data);
    }
  }
  if (p !== frame.length) throw new Error(`capture record size mismatch: ${p} != ${frame.length}`);
  return sealFrame(frame);
}

/** Strings up to this long are checked for plain ASCII (longer ones go to the TextDecoder). */
const ASCII_FAST_BYTES = 256;

function isAscii(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] >= 0x80) return false;
  return true;
}

class Reader {
  private view: DataView;
  p = 0;
  constructor(private bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  need(n: number) {
    if (this.p + n > this.bytes.length) throw new Error("capture record is truncated");
  }
  u8() {
    this.need(1);
    return this.bytes[this.p++];
  }
  u32() {
    this.need(4);
    const v = this.view.getUint32(this.p, true);
    this.p += 4;
    return v;
  }
  f64() {
    this.need(8);
    const v = this.view.getFloat64(this.p, true);
    this.p += 8;
    return v;
  }
  take(n: number) {
    this.need(n);
    const b = this.bytes.subarray(this.p, this.p + n);
    this.p += n;
    return b;
  }
  str() {
    this.need(2);
    const n = this.view.getUint16(this.p, true);
    this.p += 2;
    const bytes = this.take(n);
    // Ids and names are mostly ASCII: read as they are, without a TextDecoder call each.
    return n <= ASCII_FAST_BYTES && isAscii(bytes)
      ? String.fromCharCode.apply(null, bytes as unknown as number[])
      : decoder.decode(bytes);
  }
  ts(): Timestamp {
    this.need(8);
    const seconds = Number(this.view.getBigInt64(this.p, true));
    this.p += 8;
    return { seconds, nanos: this.u32() };
  }
}

function readHeader(r: Reader): RecordHeader {
  const version = r.u8();
  // Version 1 (no model version) is still read: a spool written before an upgrade drains after it.
  if (version !== VERSION && version !== 1) throw new Error(`capture record version ${version} is not supported`);
  const captureId = r.str();
  const modelName = r.str();
  const modelVersion = version === 1 ? "" : r.str();
  return { captureId, modelName, modelVersion, inferenceTimestamp: r.ts(), arrivalTime: r.ts() };
}

export function decodeRecordHeader(payload: Uint8Array): RecordHeader {
  return readHeader(new Reader(payload));
}

/** Decodes a spool payload; tensor and aux data are views into `payload`. */
export function decodeRecord(payload: Uint8Array): CaptureRecord & { arrivalTime: Timestamp } {
  const r = new Reader(payload);
  const header = readHeader(r);
  const counts = [r.u32(), r.u32(), r.u32(), r.u32()];
  const tensors = (count: number): CaptureTensor[] =>
    Array.from({ length: count }, () => {
      const name = r.str();
      const dataType = r.u32();
      const rank = r.u32();
      const shape = Array.from({ length: rank }, () => r.f64());
      return { name, dataType, shape, data: r.take(r.u32()) };
    });
  const auxes = (count: number): CaptureAux[] =>
    Array.from({ length: count }, () => {
      const name = r.str();
      const encoding = r.u32() as AuxEncoding;
      return { name, encoding, data: r.take(r.u32()) };
    });
  const record = {
    ...header,
    inputTensors: tensors(counts[0]),
    outputTensors: tensors(counts[1]),
    inputs: auxes(counts[2]),
    outputs: auxes(counts[3]),
  };
  if (r.p !== payload.length) throw new Error("capture record has trailing bytes");
  return record;
}
