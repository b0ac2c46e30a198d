// The durable spool: append-only segment files of checksummed records (frame.ts) under one folder.
//
// - append() resolves once the record is written and fdatasync'd. Appends that arrive together share
//   one round: one write() of all their frames, made at once on the calling thread (a page-cache copy),
//   then one fdatasync on the blocking pool. While a round's fdatasync runs, the next round may start
//   its own (up to `syncsInFlight`): an append then waits for one flush, not for the rest of another.
//   A round is acknowledged only when its own fdatasync, started after its write returned, returns.
// - Segments are named seg-<16-digit sequence>.log and rotate once they reach `segmentBytes`. A new
//   segment's folder entry is fsync'd before any record in it is acknowledged.
// - A segment is deleted once every record in it was released (stored at the destination or
//   dead-lettered), the one being appended to excepted.
// - Opening scans every segment: a torn or damaged tail (never acknowledged) is truncated away, damaged
//   regions followed by intact records are skipped with a warning, every intact record is handed back.

import type { Logger } from "../log.ts";
import { unavailable } from "../errors.ts";
import { checkFileHeader, FILE_HEADER_BYTES, fileHeader, FRAME_HEADER_BYTES, scanFrames } from "./frame.ts";
import { syncDir, writeAll } from "./fsutil.ts";

const KIND = "EMCSPOOL";
const SEGMENT_NAME = /^seg-(\d{16})\.log$/;

export interface SpoolOptions {
  dir: string;
  /** A segment rotates once it holds this many bytes (a single larger record gets a segment of its own). */
  segmentBytes: number;
  /** false: no fdatasync (benchmark ceiling only: acknowledged records can be lost on power failure). */
  fsync: boolean;
  /** Rounds whose fdatasync may run at once; default 2 (1: a round waits for the previous one). */
  syncsInFlight?: number;
  logger?: Logger;
}

/** Where a record's payload is: bytes [offset, offset + length) of segment `segment`. */
export interface SpoolLocation {
  segment: number;
  offset: number;
  length: number;
}

/** readMany reads neighbouring records together up to this many bytes at once... */
const READ_SPAN_BYTES = 8 * 1024 * 1024;
/** ...reading through gaps (released or other batches' records) of at most this many bytes. */
const READ_GAP_BYTES = 64 * 1024;

async function readAt(file: Deno.FsFile, path: string, offset: number, length: number): Promise<Uint8Array> {
  await file.seek(offset, Deno.SeekMode.Start);
  const out = new Uint8Array(length);
  for (let done = 0; done < length;) {
    const n = await file.read(out.subarray(done));
    if (n === null) throw new Error(`capture spool: ${path} ends inside a record`);
    done += n;
  }
  return out;
}

/**
 * Called for each intact record at open, in order. Returns the record's tag (the capture id) and whether it
 * is still live (false: already released, e.g. stored before a crash hid the bookkeeping's last step).
 */
export type RecoverVisitor = (
  payload: Uint8Array,
  location: SpoolLocation,
) => Promise<{ tag: string; live: boolean }> | { tag: string; live: boolean };

interface Segment {
  seq: number;
  path: string;
  /** Bytes written to the file (header included). */
  size: number;
  live: number;
  tags: string[];
}

interface AppendItem {
  frame: Uint8Array;
  tag: string;
  resolve: (location: SpoolLocation) => void;
  reject: (error: unknown) => void;
}

const segmentName = (seq: number) => `seg-${String(seq).padStart(16, "0")}.log`;

export class Spool {
  private segments = new Map<number, Segment>();
  private active: Segment | null = null;
  private file: Deno.FsFile | null = null;
  private nextSeq: number;
  private failure: Error | null = null;
  private closed = false;
  /** Appends not written yet. */
  private queue: AppendItem[] = [];
  private pumpQueued = false;
  private pumping = false;
  /** Rounds written whose fdatasync has not returned yet. */
  private syncing = 0;
  /** Handles of the active segment free to run an fdatasync (Deno runs one async op per handle at a time). */
  private syncHandles: Deno.FsFile[] = [];
  private openHandles: Deno.FsFile[] = [];
  /** Woken whenever a round's fdatasync returns and when pump() stops. */
  private waiters: Array<() => void> = [];
  private roundCount = 0;
  /** Tags of the segments deleted while opening (all their records were already released). */
  readonly deletedAtOpen: string[][] = [];
  /** Called with the tags of a segment once it is deleted. */
  onSegmentDeleted: (tags: string[]) => void = () => {};

  private constructor(private readonly options: SpoolOptions, nextSeq: number) {
    this.nextSeq = nextSeq;
  }

  static async open(options: SpoolOptions, visit: RecoverVisitor): Promise<Spool> {
    const log = options.logger;
    await Deno.mkdir(options.dir, { recursive: true });
    const seqs: number[] = [];
    for await (const entry of Deno.readDir(options.dir)) {
      const m = entry.isFile ? SEGMENT_NAME.exec(entry.name) : null;
      if (m) seqs.push(Number(m[1]));
    }
    seqs.sort((a, b) => a - b);
    const spool = new Spool(options, (seqs.at(-1) ?? 0) + 1);
    let removed = false;
    for (const seq of seqs) {
      const path = `${options.dir}/${segmentName(seq)}`;
      const bytes = await Deno.readFile(path);
      const header = checkFileHeader(bytes, KIND);
      if (header === "short") {
        // A crash while the segment was being created: no record in it was ever acknowledged.
        await Deno.remove(path);
        removed = true;
        continue;
      }
      if (header === "foreign") {
        log?.error("capture spool: segment has an unknown header; left alone", { path });
        continue;
      }
      const scan = scanFrames(bytes, FILE_HEADER_BYTES);
      for (const [from, to] of scan.skipped) {
        log?.warn("capture spool: skipped a damaged region", { path, from, to });
      }
      if (scan.validEnd < bytes.length) {
        log?.warn("capture spool: dropped a torn tail (never acknowledged)", {
          path,
          at: scan.validEnd,
          bytes: bytes.length - scan.validEnd,
        });
        await Deno.truncate(path, scan.validEnd);
        if (options.fsync) {
          const f = await Deno.open(path, { write: true });
          await f.syncData().finally(() => f.close());
        }
      }
      const segment: Segment = { seq, path, size: scan.validEnd, live: 0, tags: [] };
      for (const frame of scan.frames) {
        const payload = bytes.subarray(frame.offset, frame.offset + frame.length);
        const { tag, live } = await visit(payload, { segment: seq, offset: frame.offset, length: frame.length });
        segment.tags.push(tag);
        if (live) segment.live++;
      }
      if (segment.live === 0) {
        await Deno.remove(path);
        removed = true;
        spool.deletedAtOpen.push(segment.tags);
      } else {
        spool.segments.set(seq, segment);
      }
    }
    if (removed) await syncDir(options.dir);
    return spool;
  }

  /** Bytes of all segment files. */
  get bytes(): number {
    let total = 0;
    for (const s of this.segments.values()) total += s.size;
    return total;
  }

  get segmentCount(): number {
    return this.segments.size;
  }

  /** fsync rounds so far (how many appends share one is the point of group commit). */
  get rounds(): number {
    return this.roundCount;
  }

  /**
   * Appends one frame (frame.ts; for captures, record.ts builds it) and resolves with its location once it
   * is durable. Rejects with AgentError(UNAVAILABLE) if the disk fails; the record is then not kept.
   */
  append(frame: Uint8Array, tag: string): Promise<SpoolLocation> {
    if (this.closed) return Promise.reject(unavailable("capture spool is closed"));
    return new Promise((resolve, reject) => {
      this.queue.push({ frame, tag, resolve, reject });
      if (!this.pumpQueued) {
        this.pumpQueued = true;
        // A microtask's delay lets appends issued in the same tick join the round.
        queueMicrotask(() => {
          this.pumpQueued = false;
          this.pump();
        });
      }
    });
  }

  /** Reads a record's payload back. */
  async read(location: SpoolLocation): Promise<Uint8Array> {
    return (await this.readMany([location]))[0];
  }

  /**
   * Reads records back, in the order given. A batch's records mostly lie side by side in one segment,
   * so each segment is opened once and neighbouring records are read in one span (at most
   * READ_SPAN_BYTES, skipping gaps of at most READ_GAP_BYTES): one open and a few reads per batch
   * rather than an open, seek and read per record.
   */
  async readMany(locations: SpoolLocation[]): Promise<Uint8Array[]> {
    const out = new Array<Uint8Array>(locations.length);
    const bySegment = new Map<number, number[]>();
    locations.forEach((location, i) => {
      const indexes = bySegment.get(location.segment) ?? [];
      indexes.push(i);
      bySegment.set(location.segment, indexes);
    });
    for (const [seq, indexes] of bySegment) {
      const segment = this.segments.get(seq);
      if (!segment) throw new Error(`capture spool: segment ${seq} is gone`);
      indexes.sort((a, b) => locations[a].offset - locations[b].offset);
      const file = await Deno.open(segment.path, { read: true });
      try {
        for (let first = 0; first < indexes.length;) {
          const start = locations[indexes[first]].offset;
          let end = start + locations[indexes[first]].length;
          let last = first;
          while (last + 1 < indexes.length) {
            const next = locations[indexes[last + 1]];
            const nextEnd = Math.max(end, next.offset + next.length);
            if (next.offset - end > READ_GAP_BYTES || nextEnd - start > READ_SPAN_BYTES) break;
            end = nextEnd;
            last++;
          }
          const span = await readAt(file, segment.path, start, end - start);
          for (let k = first; k <= last; k++) {
            const { offset, length } = locations[indexes[k]];
            out[indexes[k]] = span.subarray(offset - start, offset - start + length);
          }
          first = last + 1;
        }
      } finally {
        file.close();
      }
    }
    return out;
  }

  /**
   * Marks a record as no longer needed. Call only after whatever replaces it (destination, dead letter,
   * status log) is durable: a segment whose records are all released is deleted.
   */
  async release(location: SpoolLocation): Promise<void> {
    const segment = this.segments.get(location.segment);
    if (!segment) return;
    segment.live--;
    if (segment.live <= 0 && segment !== this.active) await this.remove(segment);
  }

  private async remove(segment: Segment): Promise<void> {
    this.segments.delete(segment.seq);
    await Deno.remove(segment.path).catch((e) => {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    });
    // No directory fsync: if the removal is lost to a power cut, the segment comes back at start-up and
    // its records are recognised as already stored (their status is durable first).
    this.onSegmentDeleted(segment.tags);
  }

  /** Waits for queued appends, then closes the active segment. */
  async close(): Promise<void> {
    this.closed = true;
    while (this.queue.length > 0 || this.pumping || this.pumpQueued || this.syncing > 0) await this.change();
    this.closeHandles();
    const active = this.active;
    this.active = null;
    if (active && active.live === 0) await this.remove(active);
  }

  private closeHandles(): void {
    for (const handle of this.openHandles) handle.close();
    this.openHandles = [];
    this.syncHandles = [];
    this.file = null;
  }

  /** Resolves when a round's fdatasync returns or pump() stops (soon in any case). */
  private change(): Promise<void> {
    if (this.syncing === 0 && !this.pumping) return new Promise((resolve) => setTimeout(resolve, 0));
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private wake(): void {
    for (const resolve of this.waiters.splice(0)) resolve();
  }

  private async rotate(): Promise<void> {
    const previous = this.active;
    this.closeHandles();
    this.active = null;
    if (previous && previous.live === 0) await this.remove(previous);
    const seq = this.nextSeq++;
    const path = `${this.options.dir}/${segmentName(seq)}`;
    const file = await Deno.open(path, { write: true, createNew: true });
    try {
      await writeAll(file, fileHeader(KIND));
      if (this.options.fsync) {
        await file.syncData();
        await syncDir(this.options.dir);
      }
    } catch (e) {
      file.close();
      await Deno.remove(path).catch(() => {});
      throw e;
    }
    this.file = file;
    this.openHandles = [file];
    this.syncHandles = [file];
    this.active = { seq, path, size: FILE_HEADER_BYTES, live: 0, tags: [] };
    this.segments.set(seq, this.active);
  }

  /**
   * Writes rounds while appends are queued and fewer than `syncsInFlight` fdatasyncs run. A round takes
   * every queued frame that fits in the active segment; a frame that does not fit waits until the
   * rounds in flight are synced, then goes to a new segment.
   */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const limit = this.options.syncsInFlight ?? 2;
      while (this.queue.length > 0 && this.syncing < limit) {
        if (this.failure) {
          const error = unavailable(`capture spool is failing: ${this.failure.message}`);
          for (const item of this.queue.splice(0)) item.reject(error);
          break;
        }
        const active = this.active;
        const empty = active !== null && active.size === FILE_HEADER_BYTES;
        if (!active || (!empty && active.size + this.queue[0].frame.length > this.options.segmentBytes)) {
          // Records of the full segment are covered by the rounds in flight; the new one starts after them.
          while (this.syncing > 0) await this.change();
          try {
            await this.rotate();
          } catch (e) {
            const error = unavailable(`capture spool write failed: ${(e as Error).message}`);
            for (const item of this.queue.splice(0)) item.reject(error);
          }
          continue;
        }
        let end = 1;
        let size = active.size + this.queue[0].frame.length;
        while (end < this.queue.length && size + this.queue[end].frame.length <= this.options.segmentBytes) {
          size += this.queue[end++].frame.length;
        }
        await this.write(active, this.queue.splice(0, end));
      }
    } finally {
      this.pumping = false;
      this.wake();
    }
  }

  /**
   * One round: the frames in one write() (on this thread when small: fsutil.writeAll), then one
   * fdatasync, then the acknowledgements. Returns once the write is done; the fdatasync goes on.
   */
  private async write(segment: Segment, items: AppendItem[]): Promise<void> {
    const file = this.file!;
    const start = segment.size;
    let bytes: Uint8Array;
    if (items.length === 1) bytes = items[0].frame;
    else {
      bytes = new Uint8Array(items.reduce((n, item) => n + item.frame.length, 0));
      let o = 0;
      for (const { frame } of items) {
        bytes.set(frame, o);
        o += frame.length;
      }
    }
    try {
      await writeAll(file, bytes);
    } catch (e) {
      this.undo(segment, start, file);
      const error = unavailable(`capture spool write failed: ${(e as Error).message}`);
      for (const item of items) item.reject(error);
      return;
    }
    segment.size = start + bytes.length;
    this.roundCount++;
    this.syncing++;
    this.sync(segment, items, start, bytes.length).finally(() => {
      this.syncing--;
      this.wake();
      if (this.queue.length > 0) this.pump();
    });
  }

  private async sync(segment: Segment, items: AppendItem[], start: number, length: number): Promise<void> {
    if (this.options.fsync) {
      try {
        await this.syncData(segment);
      } catch (e) {
        // The kernel may have dropped the pages it could not write. If nothing was written after this
        // round, cut it off again so that records whose appends were refused do not come back at the next
        // open, and carry on; otherwise (or if that fails too) refuse every further append.
        if (segment.size === start + length && this.syncing === 1) this.undo(segment, start, this.file!);
        else this.failure = e as Error;
        const error = unavailable(`capture spool write failed: ${(e as Error).message}`);
        for (const item of items) item.reject(error);
        return;
      }
    }
    let offset = start;
    for (const { frame, tag, resolve } of items) {
      segment.tags.push(tag);
      segment.live++;
      resolve({ segment: segment.seq, offset: offset + FRAME_HEADER_BYTES, length: frame.length - FRAME_HEADER_BYTES });
      offset += frame.length;
    }
  }

  /** fdatasync of the active segment on a handle no other round is syncing on. */
  private async syncData(segment: Segment): Promise<void> {
    let handle = this.syncHandles.pop();
    if (!handle) {
      handle = await Deno.open(segment.path, { read: true });
      this.openHandles.push(handle);
    }
    try {
      await handle.syncData();
    } finally {
      this.syncHandles.push(handle);
    }
  }

  /** Puts the segment back to `start` bytes after a failed round; if even that fails, refuses every further append. */
  private undo(segment: Segment, start: number, file: Deno.FsFile): void {
    try {
      file.truncateSync(start);
      file.seekSync(start, Deno.SeekMode.Start);
      if (this.options.fsync) file.syncDataSync();
      segment.size = start;
    } catch (e) {
      this.failure = e as Error;
      this.options.logger?.error("capture spool: cannot restore a segment after a failed write", {
        path: segment.path,
        error: String(e),
      });
    }
  }
}
