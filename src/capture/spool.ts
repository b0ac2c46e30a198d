// The durable spool: append-only segment files of checksummed records (frame.ts) under one folder.
//
// - append() resolves once the record is written and fdatasync'd; concurrent appends share one
//   write + fdatasync round (group_commit.ts).
// - Segments are named seg-<16-digit sequence>.log and rotate once they reach `segmentBytes`. A new
//   segment's folder entry is fsync'd before any record in it is acknowledged.
// - A segment is deleted once every record in it was released (stored at the destination or
//   dead-lettered), the one being appended to excepted.
// - Opening scans every segment: a torn or damaged tail (never acknowledged) is truncated away, damaged
//   regions followed by intact records are skipped with a warning, every intact record is handed back.

import type { Logger } from "../log.ts";
import { unavailable } from "../errors.ts";
import { checkFileHeader, FILE_HEADER_BYTES, fileHeader, FRAME_HEADER_BYTES, scanFrames } from "./frame.ts";
import { GroupCommit } from "./group_commit.ts";
import { syncDir, writeAll } from "./fsutil.ts";

const KIND = "EMCSPOOL";
const SEGMENT_NAME = /^seg-(\d{16})\.log$/;
/** Small frames of one round are copied into one buffer up to this size: one write() call instead of many. */
const COALESCE_BYTES = 1 << 20;

export interface SpoolOptions {
  dir: string;
  /** A segment rotates once it holds this many bytes (a single larger record gets a segment of its own). */
  segmentBytes: number;
  /** false: no fdatasync (benchmark ceiling only: acknowledged records can be lost on power failure). */
  fsync: boolean;
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
}

const segmentName = (seq: number) => `seg-${String(seq).padStart(16, "0")}.log`;

export class Spool {
  private segments = new Map<number, Segment>();
  private active: Segment | null = null;
  private file: Deno.FsFile | null = null;
  private nextSeq: number;
  private failure: Error | null = null;
  private closed = false;
  private writer: GroupCommit<AppendItem, SpoolLocation | Error>;
  /** Tags of the segments deleted while opening (all their records were already released). */
  readonly deletedAtOpen: string[][] = [];
  /** Called with the tags of a segment once it is deleted. */
  onSegmentDeleted: (tags: string[]) => void = () => {};

  private constructor(private readonly options: SpoolOptions, nextSeq: number) {
    this.nextSeq = nextSeq;
    this.writer = new GroupCommit((items) => this.round(items));
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
    return this.writer.rounds;
  }

  /**
   * Appends one frame (frame.ts; for captures, record.ts builds it) and resolves with its location once it
   * is durable. Rejects with AgentError(UNAVAILABLE) if the disk fails; the record is then not kept.
   */
  async append(frame: Uint8Array, tag: string): Promise<SpoolLocation> {
    if (this.closed) throw unavailable("capture spool is closed");
    const result = await this.writer.submit({ frame, tag });
    if (result instanceof Error) throw result;
    return result;
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
    await this.writer.idle();
    this.file?.close();
    this.file = null;
    const active = this.active;
    this.active = null;
    if (active && active.live === 0) await this.remove(active);
  }

  private async rotate(): Promise<void> {
    const previous = this.active;
    this.file?.close();
    this.file = null;
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
    this.active = { seq, path, size: FILE_HEADER_BYTES, live: 0, tags: [] };
    this.segments.set(seq, this.active);
  }

  /** One group-commit round: write every queued frame (rotating as needed), then one fdatasync per segment. */
  private async round(items: AppendItem[]): Promise<Array<SpoolLocation | Error>> {
    if (this.failure) throw unavailable(`capture spool is failing: ${this.failure.message}`);
    const results: Array<SpoolLocation | Error> = [];
    try {
      while (results.length < items.length) {
        const i = results.length;
        if (!this.active || (this.active.size > FILE_HEADER_BYTES && this.active.size >= this.options.segmentBytes)) {
          await this.rotate();
        }
        const segment = this.active!;
        // The frames that go to this segment: at least one, and no more than fit under segmentBytes.
        let end = i;
        let size = segment.size;
        while (
          end < items.length &&
          ((end === i && segment.size === FILE_HEADER_BYTES) ||
            size + items[end].frame.length <= this.options.segmentBytes)
        ) {
          size += items[end++].frame.length;
        }
        if (end === i) {
          await this.rotate();
          continue;
        }
        await this.writeFrames(segment, items.slice(i, end), results);
      }
    } catch (e) {
      // Frames already synced in an earlier segment of this round stay acknowledged; the rest are refused.
      const error = unavailable(`capture spool write failed: ${(e as Error).message}`);
      while (results.length < items.length) results.push(error);
    }
    return results;
  }

  private async writeFrames(
    segment: Segment,
    items: AppendItem[],
    locations: Array<SpoolLocation | Error>,
  ): Promise<void> {
    const file = this.file!;
    const start = segment.size;
    try {
      let pos = start;
      let chunk: Uint8Array[] = [];
      let chunkBytes = 0;
      const flush = async () => {
        if (chunk.length === 1) await writeAll(file, chunk[0]);
        else if (chunk.length > 1) {
          const joined = new Uint8Array(chunkBytes);
          let o = 0;
          for (const c of chunk) {
            joined.set(c, o);
            o += c.length;
          }
          await writeAll(file, joined);
        }
        chunk = [];
        chunkBytes = 0;
      };
      for (const { frame } of items) {
        if (chunkBytes + frame.length > COALESCE_BYTES) await flush();
        chunk.push(frame);
        chunkBytes += frame.length;
        pos += frame.length;
      }
      await flush();
      if (this.options.fsync) await file.syncData();
      let offset = start;
      for (const { frame, tag } of items) {
        locations.push({
          segment: segment.seq,
          offset: offset + FRAME_HEADER_BYTES,
          length: frame.length - FRAME_HEADER_BYTES,
        });
        offset += frame.length;
        segment.tags.push(tag);
        segment.live++;
      }
      segment.size = pos;
    } catch (e) {
      // Put the file back to its last durable length so a half-written round is not recovered later as
      // records whose appends were refused; if even that fails, refuse every further append.
      try {
        await file.truncate(start);
        await file.seek(start, Deno.SeekMode.Start);
        if (this.options.fsync) await file.syncData();
      } catch (e2) {
        this.failure = e2 as Error;
        this.options.logger?.error("capture spool: cannot restore a segment after a failed write", {
          path: segment.path,
          error: String(e2),
        });
      }
      throw e;
    }
  }
}
