// The status index: which captures were stored (SUCCESS) or given up on (FAILURE), and which pending
// captures were sealed into which upload batch. IN_PROGRESS is not logged: a capture is in progress
// exactly while its record is in the spool and it has no final status, so capturing costs one fsync.
//
// status.log holds checksummed frames (frame.ts) of JSON entries, appended with group commit:
//   {"t":"S","b":batch,"m":model,"ids":[...],"at":ms}   a batch was sealed (its composition is now fixed)
//   {"t":"D","b":batch,"at":ms}                         the destination confirmed the whole batch: SUCCESS
//   {"t":"F","ids":[...],"r":reason,"at":ms,"b"?:batch} dead-lettered: FAILURE (and the batch is closed)
//   {"t":"A","b":batch}                                 a batch was split up after a permanent error
//   {"t":"T","e":[[id,"S"|"F",at,reason?],...]}         final statuses carried over by compaction
// When it grows past a threshold it is rewritten (temporary file, fsync, rename, fsync folder) with only
// what is retained: final statuses within the retention limits, and open batches.

import { dirname } from "node:path";
import type { Logger } from "../log.ts";
import { checkFileHeader, encodeFrame, FILE_HEADER_BYTES, fileHeader, scanFrames } from "./frame.ts";
import { GroupCommit } from "./group_commit.ts";
import { syncDir, writeAll } from "./fsutil.ts";

const KIND = "EMCSTATS";
const COMPACT_MIN_BYTES = 256 * 1024;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

export type FinalStatus = "SUCCESS" | "FAILURE";

export interface FinalEntry {
  status: FinalStatus;
  /** When it became final (ms since the epoch). */
  at: number;
  reason?: string;
  /**
   * The capture's record is still in a spool segment. Such an entry is kept whatever the retention says:
   * without it the record would look pending at the next start and be uploaded twice.
   */
  pinned: boolean;
}

export interface SealedBatch {
  id: string;
  model: string;
  ids: string[];
  /** When it was sealed (ms since the epoch); the date in its object keys. */
  at: number;
}

type Entry =
  | { t: "S"; b: string; m: string; ids: string[]; at: number }
  | { t: "D"; b: string; at: number }
  | { t: "F"; ids: string[]; r: string; at: number; b?: string }
  | { t: "A"; b: string }
  | { t: "T"; e: Array<[string, "S" | "F", number, string?]> };

export interface StatusOptions {
  path: string;
  fsync: boolean;
  retentionMs: number;
  retentionCount: number;
  now: () => number;
  logger?: Logger;
}

export class StatusIndex {
  /** Final statuses, oldest first. */
  readonly finals = new Map<string, FinalEntry>();
  /** Sealed batches the destination has not confirmed yet, oldest first. */
  readonly batches = new Map<string, SealedBatch>();
  private file: Deno.FsFile | null = null;
  private size = 0;
  private compactAt = COMPACT_MIN_BYTES;
  private writer = new GroupCommit<Entry, void>((entries) => this.round(entries));
  private closed = false;

  private constructor(private readonly options: StatusOptions) {}

  static async open(options: StatusOptions): Promise<StatusIndex> {
    const index = new StatusIndex(options);
    let bytes: Uint8Array | null = null;
    try {
      bytes = await Deno.readFile(options.path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (bytes && checkFileHeader(bytes, KIND) === "foreign") {
      throw new Error(`${options.path} is not a capture status log (or a newer format)`);
    }
    if (bytes && checkFileHeader(bytes, KIND) === "ok") {
      const scan = scanFrames(bytes, FILE_HEADER_BYTES);
      for (const [from, to] of scan.skipped) {
        options.logger?.warn("capture status log: skipped a damaged region", { path: options.path, from, to });
      }
      for (const f of scan.frames) {
        try {
          index.apply(JSON.parse(decoder.decode(bytes.subarray(f.offset, f.offset + f.length))) as Entry);
        } catch (e) {
          options.logger?.warn("capture status log: unreadable entry", { path: options.path, error: String(e) });
        }
      }
    }
    // Rewriting at open drops any torn tail and starts from a compact file.
    await index.compact();
    return index;
  }

  get(id: string): FinalEntry | undefined {
    return this.finals.get(id);
  }

  /** Records a batch's composition durably, before any of it is uploaded. */
  seal(batch: SealedBatch): Promise<void> {
    return this.submit({ t: "S", b: batch.id, m: batch.model, ids: batch.ids, at: batch.at });
  }

  /** The destination confirmed every capture of the batch. */
  done(batchId: string): Promise<void> {
    return this.submit({ t: "D", b: batchId, at: this.options.now() });
  }

  /** The captures (of `batchId`, when given: it is closed too) were dead-lettered. */
  fail(ids: string[], reason: string, batchId?: string): Promise<void> {
    return this.submit({ t: "F", ids, r: reason, at: this.options.now(), ...(batchId ? { b: batchId } : {}) });
  }

  /** The batch will not be uploaded as such; its captures get sealed into new batches. */
  abandon(batchId: string): Promise<void> {
    return this.submit({ t: "A", b: batchId });
  }

  /** The captures' records left the spool: their final statuses may now expire. */
  unpin(ids: Iterable<string>): void {
    for (const id of ids) {
      const entry = this.finals.get(id);
      if (entry) entry.pinned = false;
    }
  }

  /** Forgets final statuses past the retention limits (in memory; the next compaction makes it durable). */
  prune(): void {
    const cutoff = this.options.now() - this.options.retentionMs;
    for (const [id, entry] of this.finals) {
      const tooMany = this.finals.size > this.options.retentionCount;
      if (!tooMany && entry.at >= cutoff) break;
      if (!entry.pinned) this.finals.delete(id);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.writer.idle();
    this.file?.close();
    this.file = null;
  }

  private async submit(entry: Entry): Promise<void> {
    if (this.closed) throw new Error("capture status log is closed");
    await this.writer.submit(entry);
  }

  private apply(entry: Entry): void {
    switch (entry.t) {
      case "S":
        this.batches.set(entry.b, { id: entry.b, model: entry.m, ids: entry.ids, at: entry.at });
        break;
      case "D": {
        const batch = this.batches.get(entry.b);
        if (!batch) break;
        this.batches.delete(entry.b);
        for (const id of batch.ids) this.setFinal(id, { status: "SUCCESS", at: entry.at, pinned: true });
        break;
      }
      case "F":
        if (entry.b) this.batches.delete(entry.b);
        for (const id of entry.ids) {
          this.setFinal(id, { status: "FAILURE", at: entry.at, reason: entry.r, pinned: true });
        }
        break;
      case "A":
        this.batches.delete(entry.b);
        break;
      case "T":
        for (const [id, s, at, reason] of entry.e) {
          this.setFinal(id, { status: s === "S" ? "SUCCESS" : "FAILURE", at, reason, pinned: true });
        }
        break;
    }
  }

  private setFinal(id: string, entry: FinalEntry): void {
    this.finals.delete(id); // re-insert: the map stays in order of age
    this.finals.set(id, entry);
  }

  private async round(entries: Entry[]): Promise<void[]> {
    const frames = entries.map((e) => encodeFrame(encoder.encode(JSON.stringify(e))));
    const total = frames.reduce((n, f) => n + f.length, 0);
    const joined = new Uint8Array(total);
    let o = 0;
    for (const f of frames) {
      joined.set(f, o);
      o += f.length;
    }
    const start = this.size;
    try {
      await writeAll(this.file!, joined);
      if (this.options.fsync) await this.file!.syncData();
    } catch (e) {
      await this.file!.truncate(start).catch(() => {});
      await this.file!.seek(start, Deno.SeekMode.Start).catch(() => {});
      throw e;
    }
    this.size += total;
    for (const e of entries) this.apply(e);
    if (this.size > this.compactAt) {
      // The entries are durable already; a failed compaction only leaves the log longer.
      await this.compact().catch((e) => {
        this.compactAt = this.size * 2;
        this.options.logger?.warn("capture status log: compaction failed", { error: String(e) });
      });
    }
    return entries.map(() => undefined);
  }

  /** Rewrites the log with what is retained; runs at open and inside a round (so nothing is appending). */
  private async compact(): Promise<void> {
    this.prune();
    const entries: Entry[] = [];
    let chunk: Array<[string, "S" | "F", number, string?]> = [];
    for (const [id, f] of this.finals) {
      chunk.push(f.reason === undefined ? [id, f.status === "SUCCESS" ? "S" : "F", f.at] : [id, "F", f.at, f.reason]);
      if (chunk.length === 1000) {
        entries.push({ t: "T", e: chunk });
        chunk = [];
      }
    }
    if (chunk.length) entries.push({ t: "T", e: chunk });
    for (const b of this.batches.values()) entries.push({ t: "S", b: b.id, m: b.model, ids: b.ids, at: b.at });
    const parts = [fileHeader(KIND), ...entries.map((e) => encodeFrame(encoder.encode(JSON.stringify(e))))];
    const size = parts.reduce((n, p) => n + p.length, 0);
    const tmp = `${this.options.path}.tmp`;
    const out = await Deno.open(tmp, { write: true, create: true, truncate: true });
    try {
      for (const p of parts) await writeAll(out, p);
      if (this.options.fsync) await out.syncData();
    } finally {
      out.close();
    }
    await Deno.rename(tmp, this.options.path);
    if (this.options.fsync) await syncDir(dirname(this.options.path));
    const file = await Deno.open(this.options.path, { write: true });
    await file.seek(size, Deno.SeekMode.Start);
    this.file?.close();
    this.file = file;
    this.size = size;
    this.compactAt = Math.max(COMPACT_MIN_BYTES, size * 2);
  }
}
