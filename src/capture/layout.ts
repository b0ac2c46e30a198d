// Where captures land at the destination, and what the records say. Two layouts
// (edge_agent_capture_layout): "edge-manager" (default), Edge Manager's own, so that what fleets built on it
// (S3-triggered functions, Athena tables, monitoring jobs) keeps working; and "manifest", this agent's
// earlier layout. Keys are S3 keys under the bucket, or paths under disk_path for the Disk destination.
//
// Common to both:
// - <prefix> is sagemaker_edge_core_folder_prefix (may hold "/"; left out when empty).
// - <batch-id> is <sealed at, YYYYMMDDTHHMMSSmmmZ>-<16 hex of SHA-256(model, capture ids, arrival times)>:
//   it sorts by time, and it is fixed in the status log before the first upload, so every retry of the
//   batch (after a crash too) writes the same keys with the same bytes.
// - Separate objects sit under their batch, so a capture id used again after its status expired never
//   overwrites what an earlier record points to.
// - Each path component is percent-encoded outside [A-Za-z0-9._-] ("." and ".." too), so no name can add
//   or climb folders; a component over 200 bytes keeps its first bytes and ends "~<16 hex of its SHA-256>".
// - A record file is written after the objects it references: its presence means they are complete.
//
// "edge-manager":
//   <prefix>/<fleet>/<model>/YYYY/MM/DD/HH/<batch-id>.jsonl            one JSON line per capture
//   <prefix>/<fleet>/<model>/YYYY/MM/DD/HH/<batch-id>/<capture-id>-<input|output|aux-input|aux-output>-<i>.<ext>
//   YYYY/MM/DD/HH is the UTC hour of the capture's inference time; a batch spanning hours writes one file
//   per hour. Each line:
//   {"eventVersion":"0",
//    "eventMetadata":{"deviceFleetName","deviceId","eventId","inferenceTime":"2023-05-31T20:05:24",
//                     "modelName","modelVersion"},
//    "deviceFleetInputs":[{"name","data"|"data-ref","encoding","mode":"Input","observedContentType"}],
//    "deviceFleetOutputs":[...,"mode":"Output"...],
//    "deviceFleetAuxiliaryInputs":[...], "deviceFleetAuxiliaryOutputs":[...]}
//   Tensors: "data" is the base64 of the raw bytes (encoding "BASE64") up to base64_embed_limit bytes;
//   larger ones are a separate object of raw bytes named by "data-ref" (encoding "NONE").
//   observedContentType "Tensor[FLOAT32; 1, 6, 10, 10]".
//   Auxiliary data: "encoding" says what "data" holds, as in SageMaker's endpoint data capture. CSV, JSON
//   and BASE64 data are text and are embedded as that text with the request's encoding (BASE64 data
//   decodes with one b64decode); NONE (binary) data and text that is not UTF-8 are embedded as base64 with
//   encoding "BASE64". Aux data over the limit is a separate object of the bytes as sent, named by
//   "data-ref", with the request's encoding. observedContentType is the extension of the aux name
//   ("frame.jpg" -> "jpg"), else "csv", "json", "base64" or "bin" by the request's encoding.
//   "data-ref" is s3://<bucket>/<key> for S3 and file://<absolute path> for Disk.
//
// "manifest":
//   <prefix>/<fleet>/<device>/<model>/YYYY/MM/DD/<batch-id>.jsonl
//   <prefix>/<fleet>/<device>/<model>/YYYY/MM/DD/tensors/<batch-id>/<capture-id>/<input|output>-<index>-<name>.bin
//   YYYY/MM/DD is the UTC date the batch was sealed; all of a batch's objects share it. One line per capture:
//   {"captureId","modelName","batchId","deviceFleetName","deviceName",
//    "inferenceTimestamp":{"seconds","nanos"},"inferenceTime":ISO-8601,
//    "arrivalTimestamp":{"seconds","nanos"},"arrivalTime":ISO-8601,
//    "inputTensors":[{"index","name","dataType","dataTypeName","shape","byteLength", "data" | "key"}],
//    "outputTensors":[...same...],
//    "inputs":[{"index","name","encoding":"CSV"|"JSON"|"NONE"|"BASE64","byteLength","data"}],
//    "outputs":[...same...]}
//   "data" is the bytes in base64 (tensors up to base64_embed_limit bytes; aux data always); "key" names the
//   separate object holding a larger tensor's raw bytes.

import { createHash } from "node:crypto";
import { AuxEncoding, type CaptureRecord, type CaptureTensor, type Timestamp, timestampToMillis } from "./record.ts";

/** Edge Manager's largest embed limit, and this agent's default. */
export const MAX_BASE64_EMBED_LIMIT = 3072;
const MAX_COMPONENT_BYTES = 200;
const encoder = new TextEncoder();

const DATA_TYPE_NAMES = [
  "UINT8",
  "INT16",
  "INT32",
  "INT64",
  "FLOAT16",
  "FLOAT32",
  "FLOAT64",
  "INT8",
  "UINT16",
  "UINT32",
  "UINT64",
  "BOOL",
  "BFLOAT16",
];

export const CAPTURE_LAYOUTS = ["edge-manager", "manifest"] as const;
export type CaptureLayout = typeof CAPTURE_LAYOUTS[number];

export interface LayoutOptions {
  kind: CaptureLayout;
  folderPrefix: string;
  deviceFleetName: string;
  deviceName: string;
  base64EmbedLimit: number;
  /** The "data-ref" of the separate object at `key` (s3://bucket/key, file:///path). */
  dataRef: (key: string) => string;
}

const sha256Hex = (text: string) => createHash("sha256").update(text).digest("hex");

/** Makes `name` a single safe path component (see the top of this file). */
export function encodeComponent(name: string): string {
  let out = "";
  for (const byte of encoder.encode(name)) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9._-]/.test(c) ? c : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  if (out === "" || out === "." || out === "..") out = out.replaceAll(".", "%2E") || "%00";
  if (out.length > MAX_COMPONENT_BYTES) {
    let cut = MAX_COMPONENT_BYTES - 17;
    const pct = out.lastIndexOf("%", cut);
    if (pct > cut - 3) cut = pct; // never split a %XX escape
    out = `${out.slice(0, cut)}~${sha256Hex(name).slice(0, 16)}`;
  }
  return out;
}

function prefixParts(prefix: string): string[] {
  return prefix.split("/").filter((p) => p !== "").map(encodeComponent);
}

const pad = (n: number, width = 2) => String(n).padStart(width, "0");

/** The folder of a batch's objects: <prefix>/<fleet>/<device>/<model>/YYYY/MM/DD. */
export function batchFolder(layout: LayoutOptions, model: string, sealedAt: number): string {
  const d = new Date(sealedAt);
  return [
    ...prefixParts(layout.folderPrefix),
    encodeComponent(layout.deviceFleetName),
    encodeComponent(layout.deviceName),
    encodeComponent(model),
    String(d.getUTCFullYear()),
    pad(d.getUTCMonth() + 1),
    pad(d.getUTCDate()),
  ].join("/");
}

/** A batch id derived from the batch's contents and seal time (see the top of this file). */
export function makeBatchId(model: string, sealedAt: number, captures: Array<{ id: string; arrivalMs: number }>) {
  const d = new Date(sealedAt);
  const stamp = `${d.getUTCFullYear()}${pad(d.getUTCMonth() + 1)}${pad(d.getUTCDate())}T` +
    `${pad(d.getUTCHours())}${pad(d.getUTCMinutes())}${pad(d.getUTCSeconds())}${pad(d.getUTCMilliseconds(), 3)}Z`;
  const digest = sha256Hex(JSON.stringify([model, ...captures.map((c) => [c.id, c.arrivalMs])]));
  return `${stamp}-${digest.slice(0, 16)}`;
}

export const manifestKey = (folder: string, batchId: string) => `${folder}/${batchId}.jsonl`;

export function tensorKey(
  folder: string,
  batchId: string,
  captureId: string,
  io: "input" | "output",
  index: number,
  name: string,
): string {
  return `${folder}/tensors/${batchId}/${encodeComponent(captureId)}/${encodeComponent(`${io}-${index}-${name}`)}.bin`;
}

function isoTime(t: Timestamp): string | null {
  const ms = timestampToMillis(t);
  const d = new Date(ms);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

export interface ManifestLine {
  line: string;
  /** Tensors over the embed limit: separate objects to write before the manifest. */
  objects: Array<{ key: string; data: Uint8Array }>;
}

/** The manifest line of one capture, and the separate objects it references. */
export function manifestLine(
  layout: LayoutOptions,
  folder: string,
  batchId: string,
  record: CaptureRecord & { arrivalTime: Timestamp },
): ManifestLine {
  const limit = Math.min(layout.base64EmbedLimit, MAX_BASE64_EMBED_LIMIT);
  const objects: ManifestLine["objects"] = [];
  const tensors = (io: "input" | "output", list: CaptureTensor[]) =>
    list.map((t, index) => {
      const meta = {
        index,
        name: t.name,
        dataType: t.dataType,
        dataTypeName: DATA_TYPE_NAMES[t.dataType] ?? null,
        shape: t.shape,
        byteLength: t.data.length,
      };
      if (t.data.length <= limit) return { ...meta, data: t.data.toBase64() };
      const key = tensorKey(folder, batchId, record.captureId, io, index, t.name);
      objects.push({ key, data: t.data });
      return { ...meta, key };
    });
  const auxes = (list: CaptureRecord["inputs"]) =>
    list.map((a, index) => ({
      index,
      name: a.name,
      encoding: AuxEncoding[a.encoding] ?? String(a.encoding),
      byteLength: a.data.length,
      data: a.data.toBase64(),
    }));
  const line = JSON.stringify({
    captureId: record.captureId,
    modelName: record.modelName,
    batchId,
    deviceFleetName: layout.deviceFleetName,
    deviceName: layout.deviceName,
    inferenceTimestamp: record.inferenceTimestamp,
    inferenceTime: isoTime(record.inferenceTimestamp),
    arrivalTimestamp: record.arrivalTime,
    arrivalTime: isoTime(record.arrivalTime),
    inputTensors: tensors("input", record.inputTensors),
    outputTensors: tensors("output", record.outputTensors),
    inputs: auxes(record.inputs),
    outputs: auxes(record.outputs),
  });
  return { line, objects };
}

// --- "edge-manager" ----------------------------------------------------------------------------------

const AUX_CONTENT_TYPES: Record<number, string> = {
  [AuxEncoding.CSV]: "csv",
  [AuxEncoding.JSON]: "json",
  [AuxEncoding.NONE]: "bin",
  [AuxEncoding.BASE64]: "base64",
};
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** A record file and the separate objects it references (written before it). */
export interface BatchFile {
  key: string;
  body: Uint8Array;
  objects: Array<{ key: string; data: Uint8Array }>;
}

type StoredRecord = CaptureRecord & { arrivalTime: Timestamp };

const HOUR_MS = 3_600_000;

/** The folder of an hour's records: <prefix>/<fleet>/<model>/YYYY/MM/DD/HH (UTC). */
export function hourFolder(layout: LayoutOptions, model: string, atMs: number): string {
  const d = new Date(atMs);
  return [
    ...prefixParts(layout.folderPrefix),
    encodeComponent(layout.deviceFleetName),
    encodeComponent(model),
    String(d.getUTCFullYear()),
    pad(d.getUTCMonth() + 1),
    pad(d.getUTCDate()),
    pad(d.getUTCHours()),
  ].join("/");
}

/** The last inferenceTime formatted: a batch's captures mostly share their second. */
let lastInference = { second: NaN, text: "" };

/** Edge Manager's inferenceTime: UTC to the second, no zone suffix ("2023-05-31T20:05:24"). */
export function inferenceTime(t: Timestamp): string {
  const ms = timestampToMillis(t);
  const second = Math.floor(ms / 1000);
  if (second !== lastInference.second) {
    lastInference = { second, text: new Date(ms).toISOString().slice(0, 19) };
  }
  return lastInference.text;
}

/** "Tensor[FLOAT32; 1, 6, 10, 10]". */
export function tensorContentType(t: CaptureTensor): string {
  return `Tensor[${DATA_TYPE_NAMES[t.dataType] ?? `TYPE${t.dataType}`}; ${t.shape.join(", ")}]`;
}

/** The aux name's extension when it has a plain one ("frame.jpg" -> "jpg"), else one by encoding. */
export function auxContentType(name: string, encoding: AuxEncoding): string {
  return /\.([A-Za-z0-9]{1,16})$/.exec(name)?.[1] ?? AUX_CONTENT_TYPES[encoding] ?? "bin";
}

function textOf(data: Uint8Array): string | null {
  try {
    return utf8.decode(data);
  } catch {
    return null;
  }
}

/** One capture as Edge Manager's JSON line, and the separate objects it references. */
export function edgeManagerLine(
  layout: LayoutOptions,
  folder: string,
  batchId: string,
  record: StoredRecord,
): { line: string; objects: BatchFile["objects"] } {
  const limit = Math.min(layout.base64EmbedLimit, MAX_BASE64_EMBED_LIMIT);
  const objects: BatchFile["objects"] = [];
  const ref = (what: string, index: number, ext: string, data: Uint8Array) => {
    const key = `${folder}/${batchId}/${encodeComponent(`${record.captureId}-${what}-${index}.${ext}`)}`;
    objects.push({ key, data });
    return layout.dataRef(key);
  };
  const tensors = (mode: "Input" | "Output", list: CaptureTensor[]) =>
    list.map((t, i) => {
      const rest = { mode, observedContentType: tensorContentType(t) };
      if (t.data.length <= limit) return { name: t.name, data: t.data.toBase64(), encoding: "BASE64", ...rest };
      return { name: t.name, "data-ref": ref(mode.toLowerCase(), i, "bin", t.data), encoding: "NONE", ...rest };
    });
  const auxes = (mode: "Input" | "Output", list: CaptureRecord["inputs"]) =>
    list.map((a, i) => {
      const name = a.name || `${mode}-${i + 1}`;
      const encoding = AuxEncoding[a.encoding] ?? String(a.encoding);
      const observedContentType = auxContentType(a.name, a.encoding);
      const rest = { mode, observedContentType };
      if (a.data.length > limit) {
        const dataRef = ref(`aux-${mode.toLowerCase()}`, i, observedContentType, a.data);
        return { name, "data-ref": dataRef, encoding, ...rest };
      }
      const text = a.encoding !== AuxEncoding.NONE ? textOf(a.data) : null;
      if (text !== null) return { name, data: text, encoding, ...rest };
      // Binary (or text that is not UTF-8) cannot be a JSON string as it is: embedded as base64, said so.
      return { name, data: a.data.toBase64(), encoding: "BASE64", ...rest };
    });
  const line = JSON.stringify({
    eventVersion: "0",
    eventMetadata: {
      deviceFleetName: layout.deviceFleetName,
      deviceId: layout.deviceName,
      eventId: record.captureId,
      inferenceTime: inferenceTime(record.inferenceTimestamp),
      modelName: record.modelName,
      modelVersion: record.modelVersion ?? "",
    },
    deviceFleetInputs: tensors("Input", record.inputTensors),
    deviceFleetOutputs: tensors("Output", record.outputTensors),
    deviceFleetAuxiliaryInputs: auxes("Input", record.inputs),
    deviceFleetAuxiliaryOutputs: auxes("Output", record.outputs),
  });
  return { line, objects };
}

/** What a sealed batch writes, in order: per file, its objects first, then the file. */
export function layoutBatch(
  layout: LayoutOptions,
  batch: { id: string; model: string; at: number },
  records: StoredRecord[],
): BatchFile[] {
  const files = new Map<string, { lines: string[]; objects: BatchFile["objects"] }>();
  // A batch's records mostly fall in one hour: each folder is worked out once per batch.
  const folders = new Map<number, string>();
  const setFolder = (key: number, folder: string) => (folders.set(key, folder), folder);
  const folderOf = (record: StoredRecord): string => {
    if (layout.kind === "manifest") return folders.get(0) ?? setFolder(0, batchFolder(layout, batch.model, batch.at));
    const hour = Math.floor(timestampToMillis(record.inferenceTimestamp) / HOUR_MS);
    return folders.get(hour) ?? setFolder(hour, hourFolder(layout, batch.model, hour * HOUR_MS));
  };
  for (const record of records) {
    const folder = folderOf(record);
    const { line, objects } = layout.kind === "manifest"
      ? manifestLine(layout, folder, batch.id, record)
      : edgeManagerLine(layout, folder, batch.id, record);
    let file = files.get(folder);
    if (!file) files.set(folder, file = { lines: [], objects: [] });
    file.lines.push(line);
    file.objects.push(...objects);
  }
  return [...files].map(([folder, file]) => ({
    key: manifestKey(folder, batch.id),
    body: encoder.encode(file.lines.join("\n") + "\n"),
    objects: file.objects,
  }));
}
