// Shared by the capture tests: deterministic capture records, and an s3rver on 127.0.0.1 that can be
// stopped and started again on the same port and folder (an outage).

import assert from "node:assert/strict";
import { join, relative } from "node:path";
import S3rver from "s3rver";
import { createLogger } from "../../src/log.ts";
import { AuxEncoding, type CaptureRecord } from "../../src/capture/mod.ts";
import type { S3Options } from "../../src/capture/s3.ts";

export const BUCKET = "captures";
/** A logger that drops everything (the tests provoke warnings on purpose). */
export const quiet = createLogger(false, () => 0);
const decoder = new TextDecoder();

/** Bytes that depend on the capture id and a salt, so tests can rebuild them and compare byte for byte. */
export function bytesFor(id: string, salt: string, length: number): Uint8Array {
  let h = 2166136261;
  for (const c of `${id}/${salt}`) h = Math.imul(h ^ c.charCodeAt(0), 16777619);
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) {
    h = Math.imul(h ^ (h >>> 15), 2246822507) ^ i;
    out[i] = h >>> 24;
  }
  return out;
}

/** A capture with a small input tensor (embedded), an output of `outputBytes` (separate above 3 KB), aux data. */
export function makeRecord(id: string, model = "model-a", outputBytes = 16): CaptureRecord {
  return {
    captureId: id,
    modelName: model,
    inferenceTimestamp: { seconds: 1_717_000_000, nanos: 123_456_789 },
    inputTensors: [{ name: "input", dataType: 5, shape: [1, 4], data: bytesFor(id, "in", 16) }],
    outputTensors: [{ name: "scores", dataType: 0, shape: [outputBytes], data: bytesFor(id, "out", outputBytes) }],
    inputs: [{ name: "meta", encoding: AuxEncoding.JSON, data: new TextEncoder().encode(`{"id":"${id}"}`) }],
    outputs: [{ name: "raw", encoding: AuxEncoding.NONE, data: bytesFor(id, "aux", 5) }],
  };
}

export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** s3rver (credentials S3RVER/S3RVER, path style) on 127.0.0.1, storing under `directory`. */
export class TestS3 {
  private server: S3rver | null = null;
  private constructor(readonly port: number, readonly directory: string) {}

  /** Starts on `port` (default: a free one), e.g. one an agent was told about before. */
  static async start(directory: string, port = freePort()): Promise<TestS3> {
    const s3 = new TestS3(port, directory);
    await s3.resume();
    return s3;
  }

  get options(): S3Options {
    return {
      bucket: BUCKET,
      region: "us-east-1",
      endpoint: `http://127.0.0.1:${this.port}`,
      forcePathStyle: true,
      credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
      requestTimeoutMs: 5000,
    };
  }

  /** Starts again on the same port and folder (after stop()). */
  async resume(): Promise<void> {
    this.server = new S3rver({
      address: "127.0.0.1",
      port: this.port,
      silent: true,
      directory: this.directory,
      configureBuckets: [{ name: BUCKET }],
    });
    await this.server.run();
  }

  /**
   * Every key under `prefix`, read from s3rver's folder: its ListObjects pages in directory order, not
   * key order, so paging past 1000 keys can skip or repeat keys (S3 lists in key order).
   */
  async keys(prefix: string): Promise<string[]> {
    const root = join(this.directory, BUCKET);
    const suffix = "._S3rver_object";
    const keys: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      for await (const entry of Deno.readDir(dir)) {
        const path = join(dir, entry.name);
        if (entry.isDirectory) await walk(path);
        else if (entry.name.endsWith(suffix)) keys.push(relative(root, path).slice(0, -suffix.length));
      }
    };
    await walk(root);
    return keys.filter((key) => key.startsWith(prefix)).sort();
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = null;
    if (!server) return;
    const closed = server.close();
    // close() alone waits for clients' idle keep-alive connections (minutes, now and then).
    (server as unknown as { httpServer?: { closeAllConnections?(): void } }).httpServer?.closeAllConnections?.();
    await closed;
  }
}

/** One line of the "manifest" layout (edge_agent_capture_layout "manifest"). */
export interface ManifestLine {
  captureId: string;
  modelName: string;
  batchId: string;
  inputTensors: Array<{ name: string; byteLength: number; data?: string; key?: string; shape: number[] }>;
  outputTensors: Array<{ name: string; byteLength: number; data?: string; key?: string; dataTypeName: string }>;
  inputs: Array<{ name: string; encoding: string; data: string }>;
  outputs: Array<{ name: string; encoding: string; data: string }>;
  inferenceTime: string;
}

/** An entry of Edge Manager's record lists. */
export interface EdgeManagerData {
  name: string;
  data?: string;
  "data-ref"?: string;
  encoding: string;
  mode: "Input" | "Output";
  observedContentType: string;
}

/** One line of Edge Manager's layout (the default). */
export interface EdgeManagerRecord {
  eventVersion: string;
  eventMetadata: {
    deviceFleetName: string;
    deviceId: string;
    eventId: string;
    inferenceTime: string;
    modelName: string;
    modelVersion: string;
  };
  deviceFleetInputs: EdgeManagerData[];
  deviceFleetOutputs: EdgeManagerData[];
  deviceFleetAuxiliaryInputs: EdgeManagerData[];
  deviceFleetAuxiliaryOutputs: EdgeManagerData[];
}

type Read = (key: string) => Promise<Uint8Array>;

/** Lines of every .jsonl file by id, checking each id appears once; `check` verifies one line. */
async function collect<T>(
  files: string[],
  read: Read,
  idOf: (line: T) => string,
  check: (line: T, key: string) => Promise<void>,
): Promise<Map<string, T>> {
  const lines = new Map<string, T>();
  for (const key of files.filter((f) => f.endsWith(".jsonl"))) {
    const text = decoder.decode(await read(key));
    assert.ok(text.endsWith("\n"));
    for (const raw of text.trimEnd().split("\n")) {
      const line = JSON.parse(raw) as T;
      const id = idOf(line);
      assert.ok(!lines.has(id), `${id} is in two lines`);
      lines.set(id, line);
      await check(line, key);
    }
  }
  return lines;
}

/** The bytes of an Edge Manager entry: embedded, or the listed object its data-ref ends with. */
export async function entryBytes(entry: EdgeManagerData, files: string[], read: Read): Promise<Uint8Array> {
  if (entry.data !== undefined) {
    return entry.encoding === "BASE64" ? Uint8Array.fromBase64(entry.data) : new TextEncoder().encode(entry.data);
  }
  const ref = entry["data-ref"]!;
  const key = files.find((f) => ref === f || ref.endsWith(`/${f}`));
  assert.ok(key, `${ref} is a listed object`);
  return await read(key);
}

/**
 * Records of makeRecord captures in Edge Manager's layout, by capture id: each id once, under the hour of
 * its inference time, every tensor and aux entry byte-exact (embedded or by data-ref).
 */
export async function readBack(
  files: string[],
  read: Read,
  outputBytes: (id: string) => number,
): Promise<Map<string, EdgeManagerRecord>> {
  return await collect<EdgeManagerRecord>(files, read, (r) => r.eventMetadata.eventId, async (r, key) => {
    const id = r.eventMetadata.eventId;
    assert.equal(r.eventVersion, "0");
    assert.equal(r.eventMetadata.inferenceTime, "2024-05-29T16:26:40");
    assert.match(key, new RegExp(`/${encodeURIComponent(r.eventMetadata.modelName)}/2024/05/29/16/[^/]+\\.jsonl$`));
    assert.deepEqual(await entryBytes(r.deviceFleetInputs[0], files, read), bytesFor(id, "in", 16));
    const out = r.deviceFleetOutputs[0];
    assert.deepEqual(await entryBytes(out, files, read), bytesFor(id, "out", outputBytes(id)), `output of ${id}`);
    assert.equal(out.data !== undefined, outputBytes(id) <= 3072, `embedding of ${id}`);
    assert.deepEqual([out.mode, out.encoding], ["Output", out.data !== undefined ? "BASE64" : "NONE"]);
    const [meta] = r.deviceFleetAuxiliaryInputs;
    assert.deepEqual([meta.name, meta.encoding, meta.data], ["meta", "JSON", `{"id":"${id}"}`]);
    const [raw] = r.deviceFleetAuxiliaryOutputs;
    assert.deepEqual([raw.name, raw.encoding, raw.observedContentType], ["raw", "BASE64", "bin"], "5 binary bytes");
    assert.deepEqual(Uint8Array.fromBase64(raw.data!), bytesFor(id, "aux", 5));
  });
}

/** Manifest lines ("manifest" layout) by capture id, checking every referenced object is byte-exact. */
export async function readBackManifest(
  files: string[],
  read: Read,
  outputBytes: (id: string) => number,
): Promise<Map<string, ManifestLine>> {
  return await collect<ManifestLine>(files, read, (line) => line.captureId, async (line, key) => {
    const id = line.captureId;
    assert.ok(key.endsWith(`/${line.batchId}.jsonl`));
    assert.deepEqual(Uint8Array.fromBase64(line.inputTensors[0].data!), bytesFor(id, "in", 16));
    const out = line.outputTensors[0];
    assert.equal(out.byteLength, outputBytes(id));
    const bytes = out.data !== undefined ? Uint8Array.fromBase64(out.data) : await read(out.key!);
    assert.deepEqual(bytes, bytesFor(id, "out", outputBytes(id)), `output tensor of ${id}`);
    assert.equal(out.data !== undefined, outputBytes(id) <= 3072, `embedding of ${id}`);
    if (out.key) assert.ok(files.includes(out.key), `${out.key} is listed`);
    assert.equal(line.inputs[0].encoding, "JSON");
    assert.equal(decoder.decode(Uint8Array.fromBase64(line.inputs[0].data)), `{"id":"${id}"}`);
    assert.deepEqual(Uint8Array.fromBase64(line.outputs[0].data), bytesFor(id, "aux", 5));
  });
}
