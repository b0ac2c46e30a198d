// Where captures land at the destination, and what the manifests say.
//
// Object keys (S3 keys under the bucket; paths under disk_path for the Disk destination):
//
//   <prefix>/<fleet>/<device>/<model>/YYYY/MM/DD/<batch-id>.jsonl
//   <prefix>/<fleet>/<device>/<model>/YYYY/MM/DD/tensors/<batch-id>/<capture-id>/<input|output>-<index>-<name>.bin
//
// - <prefix> is sagemaker_edge_core_folder_prefix (may hold "/"; left out when empty).
// - YYYY/MM/DD is the UTC date the batch was sealed; all of a batch's objects share it.
// - <batch-id> is <sealed at, YYYYMMDDTHHMMSSmmmZ>-<16 hex of SHA-256(model, capture ids, arrival times)>:
//   it sorts by time, and it is fixed in the status log before the first upload, so every retry of the
//   batch (after a crash too) writes the same keys with the same bytes.
// - Tensor objects sit under their batch, so a capture id used again after its status expired never
//   overwrites what an earlier manifest points to.
// - Each path component is percent-encoded outside [A-Za-z0-9._-] ("." and ".." too), so no name can add
//   or climb folders; a component over 200 bytes keeps its first bytes and ends "~<16 hex of its SHA-256>".
//
// The manifest is written last: a manifest's presence means every object it names is complete.
// One JSON line per capture, in the batch's order:
//   {"captureId","modelName","batchId","deviceFleetName","deviceName",
//    "inferenceTimestamp":{"seconds","nanos"},"inferenceTime":ISO-8601,
//    "arrivalTimestamp":{"seconds","nanos"},"arrivalTime":ISO-8601,
//    "inputTensors":[{"index","name","dataType","dataTypeName","shape","byteLength", "data" | "key"}],
//    "outputTensors":[...same...],
//    "inputs":[{"index","name","encoding":"CSV"|"JSON"|"NONE"|"BASE64","byteLength","data"}],
//    "outputs":[...same...]}
// "data" is the bytes in base64 (tensors up to base64_embed_limit bytes; aux data always); "key" names the
// separate object holding a larger tensor's raw bytes.

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

export interface LayoutOptions {
  folderPrefix: string;
  deviceFleetName: string;
  deviceName: string;
  base64EmbedLimit: number;
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
