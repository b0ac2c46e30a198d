// CaptureService: the capture core behind CaptureData / GetCaptureDataStatus.
//
// capture() validates, admits (buffer size and spool byte budget), appends the record to the durable
// spool and resolves once it is fsync'd. Pending captures are sealed into per-model batches (batch_size
// reached or push_period elapsed); a seal is logged durably before the upload, so a batch keeps its
// composition and object keys across crashes. Upload workers write each batch's large tensors, then its
// manifest (layout.ts), then log the batch as done; only then are its spool records released.
//
// Failures: transient ones (network, 5xx, throttling, full disk, credentials missing or refused) pause all
// uploads with exponential backoff and jitter and never give up, so an outage only delays. While they
// last, uploadState() says why (the `capture` health entry, metrics), logged when it starts, when the
// reason changes and at most once a minute otherwise. Permanent ones (4xx, bad paths) split a
// batch into one batch per capture, so one bad capture cannot sink the others; a capture failing
// max_attempts times goes to <stateDir>/capture/dead-letter/ with the reason, and its status is FAILURE.
//
// State folder (<stateDir>/capture/): LOCK (one process at a time), spool/ (spool.ts), status.log
// (status.ts), dead-letter/ (<capture-id>-<arrival ms>.capture = the record as in the spool, readable with
// decodeRecord; .json = why), periodic.log (files already mirrored by periodic upload).

import {
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  resourceExhausted,
  StartupError,
  unavailable,
} from "../errors.ts";
import { createLogger, type Logger } from "../log.ts";
import { type Destination, DestinationError, DiskDestination, S3Destination } from "./destination.ts";
import {
  checkFileHeader,
  encodeFrame,
  FILE_HEADER_BYTES,
  fileHeader,
  FRAME_HEADER_BYTES,
  scanFrames,
} from "./frame.ts";
import { ensureDirDurable, sleep, writeAll, writeFileDurable } from "./fsutil.ts";
import {
  CAPTURE_LAYOUTS,
  type CaptureLayout,
  encodeComponent,
  layoutBatch,
  type LayoutOptions,
  makeBatchId,
  MAX_BASE64_EMBED_LIMIT,
} from "./layout.ts";
import {
  type CaptureRecord,
  decodeRecord,
  decodeRecordHeader,
  encodeRecordFrame,
  timestampFromMillis,
  timestampToMillis,
} from "./record.ts";
import { S3Client, type S3Options } from "./s3.ts";
import { Spool, type SpoolLocation } from "./spool.ts";
import { type SealedBatch, StatusIndex } from "./status.ts";

export type CaptureStatus = "IN_PROGRESS" | "SUCCESS" | "FAILURE" | "NOT_FOUND";

export interface CaptureOptions {
  /** The agent's state folder; the service keeps everything under <stateDir>/capture/. */
  stateDir: string;
  deviceFleetName: string;
  deviceName: string;
  /** sagemaker_edge_core_folder_prefix; default "". */
  folderPrefix?: string;
  /** sagemaker_edge_core_capture_data_destination. */
  destination: "Disk" | "Cloud";
  /** sagemaker_edge_core_capture_data_disk_path (Disk). */
  diskPath?: string;
  /** Bucket and endpoint (Cloud, or Disk with periodic upload). */
  s3?: S3Options;
  /** sagemaker_edge_core_capture_data_buffer_size: most captures pending upload at once; default 30. */
  bufferSize?: number;
  /** Most bytes of spool segment files; default 256 MiB. */
  maxSpoolBytes?: number;
  /** sagemaker_edge_core_capture_data_batch_size; default 10. */
  batchSize?: number;
  /** sagemaker_edge_core_capture_data_push_period_seconds; default 4. */
  pushPeriodSeconds?: number;
  /** edge_agent_capture_layout: "edge-manager" (Edge Manager's keys and records, default) or "manifest". */
  layout?: CaptureLayout;
  /** sagemaker_edge_core_capture_data_base64_embed_limit in bytes; default and maximum 3072. */
  base64EmbedLimit?: number;
  /** sagemaker_edge_core_capture_data_periodic_upload: with Disk, also mirror what is written to S3. */
  periodicUpload?: boolean;
  /** sagemaker_edge_core_capture_data_periodic_upload_period_seconds; default 60. */
  periodicUploadPeriodSeconds?: number;
  /** Spool segment size before rotation; default 8 MiB. */
  segmentBytes?: number;
  /** false turns every fsync off: a benchmark ceiling only, acknowledged captures can be lost. Default true. */
  fsync?: boolean;
  /** Attempts of a capture against permanent errors before it is dead-lettered; default 5. */
  maxAttempts?: number;
  /** First retry delay; default 1000 ms, doubling up to retryMaxMs (default 60 s), with jitter. */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** Batches uploaded at once; default 2. */
  uploadConcurrency?: number;
  /** Final statuses are kept this long (default 1 day) and at most this many (default 100000). */
  statusRetentionSeconds?: number;
  statusRetentionCount?: number;
  logger?: Logger;
  /** Clock (ms since the epoch); for tests. */
  now?: () => number;
  /** Replaces the destination built from `destination` (tests, other back ends). */
  destinationImpl?: Destination;
}

export interface CaptureStats {
  /** Captures acknowledged and not yet stored or dead-lettered. */
  pending: number;
  /** Captures being appended right now (admitted, not yet durable). */
  appending: number;
  /** Bytes of spool segment files. */
  spoolBytes: number;
  spoolSegments: number;
  /** fsync rounds of the spool: fewer than appends when group commit merges them. */
  spoolRounds: number;
  /** Captures acknowledged (durable in the spool) since open. */
  acknowledged: number;
  /** Sealed batches not yet stored. */
  batchesWaiting: number;
  /** Captures stored at the destination since open. */
  uploaded: number;
  /** Captures dead-lettered since open. */
  failed: number;
  /** Failed upload attempts since open (each is retried or ends in the dead letter). */
  retries: number;
  /** When the destination last confirmed a batch (ms since the epoch), or null. */
  lastUploadAt: number | null;
  /** Uploads are paused after transient errors until then (ms since the epoch), or null. */
  pausedUntil: number | null;
  /** Files mirrored to S3 by periodic upload since open. */
  periodicUploaded: number;
  /** Why uploads cannot proceed now, or null when they can. */
  blockedReason: string | null;
  /** Since when uploads cannot proceed (ms since the epoch), or null. */
  blockedSince: number | null;
  /** Temporary S3 credentials in use expire then (ms since the epoch), or null. */
  credentialsExpireAt: number | null;
  /** Fetches from the credentials provider since open: successful and failed. */
  credentialsFetches: number;
  credentialsFetchFailures: number;
}

/** Whether uploads proceed; `reason` says why not. */
export interface UploadState {
  ok: boolean;
  reason: string | null;
  since: number | null;
}

interface Pending {
  id: string;
  model: string;
  loc: SpoolLocation;
  /** The record as appended, kept while `cachedBytes` allows: its upload then reads nothing back. */
  payload?: Uint8Array;
  arrivalMs: number;
  /** When it joined the unsealed queue (0 for recovered captures: due at once). */
  queuedAt: number;
  batchId: string | null;
}

interface BatchRun {
  batch: SealedBatch;
  attempts: number;
  nextAt: number;
  running: boolean;
}

const DEFAULTS = {
  folderPrefix: "",
  bufferSize: 30,
  maxSpoolBytes: 256 * 1024 * 1024,
  batchSize: 10,
  pushPeriodSeconds: 4,
  layout: "edge-manager" as CaptureLayout,
  base64EmbedLimit: MAX_BASE64_EMBED_LIMIT,
  periodicUpload: false,
  periodicUploadPeriodSeconds: 60,
  segmentBytes: 8 * 1024 * 1024,
  fsync: true,
  maxAttempts: 5,
  retryBaseMs: 1000,
  retryMaxMs: 60_000,
  uploadConcurrency: 2,
  statusRetentionSeconds: 86_400,
  statusRetentionCount: 100_000,
};
const TENSOR_PUTS_AT_ONCE = 4;
/**
 * A batch sealed while uploads lag holds at most this many batch sizes of captures, and goes past
 * COALESCE_BYTES of records only with its first batch size: laying out and writing a batch runs on the
 * JavaScript thread, so a batch stays small enough (a few ms) not to hold up Predicts.
 */
const COALESCE_BATCHES = 100;
const COALESCE_BYTES = 256 * 1024;
/**
 * Records awaiting upload are kept in memory up to this many bytes, so that uploading a batch needs no
 * open, seek and read of the spool (recovered records and those past the limit are read back).
 */
const CACHED_RECORD_BYTES = 4 * 1024 * 1024;
/** A lasting upload failure is logged again at most this often (the reason changing logs at once). */
const BLOCKED_LOG_EVERY_MS = 60_000;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

type Resolved = typeof DEFAULTS & CaptureOptions;

function checkOptions(o: Resolved): string[] {
  const problems: string[] = [];
  const int = (name: keyof typeof DEFAULTS, min: number, max = Number.MAX_SAFE_INTEGER) => {
    const v = o[name] as number;
    if (!Number.isInteger(v) || v < min || v > max) {
      problems.push(`capture: ${name} must be an integer in [${min}, ${max}]`);
    }
  };
  int("bufferSize", 1);
  int("maxSpoolBytes", 4096);
  int("batchSize", 1);
  const seconds = (name: "pushPeriodSeconds" | "periodicUploadPeriodSeconds", min: number) => {
    const v = o[name];
    if (typeof v !== "number" || !(v >= min) || v > 86_400 * 365) problems.push(`capture: ${name} must be >= ${min}`);
  };
  seconds("pushPeriodSeconds", 0);
  seconds("periodicUploadPeriodSeconds", 0.01);
  int("base64EmbedLimit", 0, MAX_BASE64_EMBED_LIMIT);
  int("segmentBytes", 4096);
  int("maxAttempts", 1);
  int("retryBaseMs", 1);
  int("retryMaxMs", 1);
  int("uploadConcurrency", 1, 64);
  int("statusRetentionSeconds", 0);
  int("statusRetentionCount", 1);
  if (!o.stateDir) problems.push("capture: stateDir is required");
  if (!o.deviceFleetName) problems.push("capture: deviceFleetName is required");
  if (!o.deviceName) problems.push("capture: deviceName is required");
  if (!o.destinationImpl) {
    if (o.destination === "Disk" && !o.diskPath) problems.push("capture: the Disk destination needs diskPath");
    if (o.destination === "Cloud" && !o.s3) problems.push("capture: the Cloud destination needs s3 options");
    if (o.destination !== "Disk" && o.destination !== "Cloud") {
      problems.push('capture: destination is "Disk" or "Cloud"');
    }
  }
  if (o.periodicUpload && o.destination === "Disk" && !o.s3) problems.push("capture: periodic upload needs s3 options");
  if (!CAPTURE_LAYOUTS.includes(o.layout)) problems.push(`capture: layout is one of ${CAPTURE_LAYOUTS.join(", ")}`);
  return problems;
}

/** Full-jitter-ish exponential backoff: between half and all of min(max, base * 2^(n-1)). */
function backoff(base: number, max: number, n: number): number {
  const delay = Math.min(max, base * 2 ** Math.min(n - 1, 30));
  return delay / 2 + Math.random() * (delay / 2);
}

async function mapLimit<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
}

export class CaptureService {
  private readonly o: Resolved;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly root: string;
  private readonly layout: LayoutOptions;
  private destination!: Destination;
  private spool!: Spool;
  private index!: StatusIndex;
  private lock!: Deno.FsFile;
  private readonly pending = new Map<string, Pending>();
  private readonly appending = new Map<string, number>();
  private appendingBytes = 0;
  private cachedBytes = 0;
  private readonly unsealed = new Map<string, Pending[]>();
  private readonly runs = new Map<string, BatchRun>();
  private readonly sealing = new Set<Promise<void>>();
  private readonly counters = {
    acknowledged: 0,
    uploaded: 0,
    failed: 0,
    retries: 0,
    lastUploadAt: null as number | null,
    periodic: 0,
  };
  private outageUntil = 0;
  private outageCount = 0;
  private blocked: { reason: string; since: number; loggedAt: number; credentials: boolean } | null = null;
  /** "change" when uploads stop or start proceeding. */
  readonly changes = new EventTarget();
  private sealTimer: ReturnType<typeof setTimeout> | null = null;
  private sealTimerAt = Infinity;
  private wakers: Array<() => void> = [];
  private readonly abort = new AbortController();
  private loops: Promise<void>[] = [];
  private closing = false;
  private stopped = false;
  private closed: Promise<void> | null = null;
  private periodicDone = new Set<string>();
  private periodicLog: Deno.FsFile | null = null;
  private periodicS3: S3Client | null = null;
  /** Why the last periodic upload round failed, or null. */
  private periodicBlocked: string | null = null;
  private periodicBlockedSince: number | null = null;

  private constructor(options: CaptureOptions) {
    const defined = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
    this.o = { ...DEFAULTS, ...defined } as Resolved;
    this.log = options.logger ?? createLogger(false);
    this.now = options.now ?? Date.now;
    this.root = `${options.stateDir}/capture`;
    this.layout = {
      kind: this.o.layout,
      dataRef: (key) => this.destination.dataRef?.(key) ?? key,
      folderPrefix: this.o.folderPrefix,
      deviceFleetName: this.o.deviceFleetName,
      deviceName: this.o.deviceName,
      base64EmbedLimit: this.o.base64EmbedLimit,
    };
  }

  /**
   * Opens (or creates) the capture state, recovers the spool, and starts uploading. Throws StartupError for
   * bad options and AgentError(FAILED_PRECONDITION) when another process holds the state folder.
   */
  static async open(options: CaptureOptions): Promise<CaptureService> {
    const service = new CaptureService(options);
    const problems = checkOptions(service.o);
    if (problems.length) throw new StartupError(problems);
    await service.start();
    return service;
  }

  private async start(): Promise<void> {
    const o = this.o;
    await ensureDirDurable(this.root, o.stateDir);
    await ensureDirDurable(`${this.root}/dead-letter`, this.root);
    this.lock = await Deno.open(`${this.root}/LOCK`, { read: true, write: true, create: true });
    if (!(await this.lock.tryLock(true))) {
      this.lock.close();
      throw failedPrecondition(`${this.root} is in use by another agent process`);
    }
    try {
      // Credentials are asked for at each upload, not here: without them the agent still starts and spools.
      this.destination = o.destinationImpl ??
        (o.destination === "Disk" ? new DiskDestination(o.diskPath!, o.fsync) : new S3Destination(o.s3!));
      if (o.periodicUpload && o.destination === "Disk" && o.s3) this.periodicS3 = new S3Client(o.s3);
      this.index = await StatusIndex.open({
        path: `${this.root}/status.log`,
        fsync: o.fsync,
        retentionMs: o.statusRetentionSeconds * 1000,
        retentionCount: o.statusRetentionCount,
        now: this.now,
        logger: this.log,
      });
      const inSpool = new Set<string>();
      this.spool = await Spool.open(
        { dir: `${this.root}/spool`, segmentBytes: o.segmentBytes, fsync: o.fsync, logger: this.log },
        (payload, loc) => this.recover(payload, loc, inSpool),
      );
      for (const [id, entry] of this.index.finals) entry.pinned = inSpool.has(id);
      this.index.unpin(this.spool.deletedAtOpen.flat());
      this.spool.onSegmentDeleted = (tags) => this.index.unpin(tags);
      this.index.prune();
      this.rebuildBatches();
      if (this.periodicS3) await this.openPeriodicLog();
    } catch (e) {
      await this.index?.close().catch(() => {});
      await this.spool?.close().catch(() => {});
      await this.lock.unlock().catch(() => {});
      this.lock.close();
      throw e;
    }
    const recovered = this.pending.size;
    if (recovered) this.log.info("capture: recovered pending captures", { count: recovered, batches: this.runs.size });
    for (let i = 0; i < o.uploadConcurrency; i++) this.loops.push(this.worker());
    if (this.periodicLog) this.loops.push(this.periodicLoop());
    if (this.destination.probe) this.loops.push(this.probeLoop(this.destination.probe.bind(this.destination)));
    this.sealDue();
  }

  /** One intact spool record at open: pending, already final, or unreadable (dead-lettered). */
  private async recover(payload: Uint8Array, loc: SpoolLocation, inSpool: Set<string>) {
    let header;
    try {
      header = decodeRecordHeader(payload);
    } catch (e) {
      const tag = `#${loc.segment}:${loc.offset}`;
      await this.writeDeadLetter(`unreadable-${loc.segment}-${loc.offset}`, payload, {
        reason: `spool record cannot be decoded: ${(e as Error).message}`,
      });
      return { tag, live: false };
    }
    const id = header.captureId;
    inSpool.add(id);
    if (this.index.get(id)) return { tag: id, live: false };
    if (this.pending.has(id)) {
      await this.writeDeadLetter(`${encodeComponent(id)}-duplicate-${loc.segment}-${loc.offset}`, payload, {
        captureId: id,
        reason: "a second spool record with the same capture id",
      });
      return { tag: id, live: false };
    }
    this.pending.set(id, {
      id,
      model: header.modelName,
      loc,
      arrivalMs: timestampToMillis(header.arrivalTime),
      queuedAt: 0,
      batchId: null,
    });
    return { tag: id, live: true };
  }

  /** Sealed batches from the status log resume as they were; the other pending captures queue for sealing. */
  private rebuildBatches(): void {
    for (const batch of [...this.index.batches.values()]) {
      const ids = batch.ids.filter((id) => this.pending.get(id)?.batchId === null);
      if (ids.length < batch.ids.length) {
        this.log.error("capture: a sealed batch lost captures from the spool", {
          batch: batch.id,
          missing: batch.ids.filter((id) => !ids.includes(id)),
        });
        batch.ids = ids;
      }
      if (ids.length === 0) {
        this.index.batches.delete(batch.id);
        continue;
      }
      for (const id of ids) this.pending.get(id)!.batchId = batch.id;
      this.runs.set(batch.id, { batch, attempts: 0, nextAt: 0, running: false });
    }
    for (const p of this.pending.values()) if (p.batchId === null) this.enqueue(p);
  }

  private enqueue(p: Pending): void {
    const queue = this.unsealed.get(p.model);
    if (queue) queue.push(p);
    else this.unsealed.set(p.model, [p]);
  }

  /**
   * Stores a capture durably: resolves once it is fsync'd in the spool (it will be uploaded even if the
   * process or the power dies next). Throws AgentError: INVALID_ARGUMENT (unstorable record),
   * ALREADY_EXISTS (capture id pending or with a retained status), RESOURCE_EXHAUSTED (buffer_size captures
   * pending or the spool byte budget reached: nothing of the request is kept), UNAVAILABLE (closing, or
   * the spool disk fails).
   */
  async capture(record: CaptureRecord): Promise<void> {
    if (this.closing) throw unavailable("capture service is shutting down");
    const id = record?.captureId;
    if (typeof id !== "string" || id === "") throw invalidArgument("capture_id must be a non-empty string");
    if (this.has(id)) throw alreadyExists(`capture ${id} already exists`);
    if (this.pending.size + this.appending.size >= this.o.bufferSize) {
      throw resourceExhausted(`capture buffer is full: ${this.o.bufferSize} captures are waiting to be uploaded`);
    }
    const arrivalTime = record.arrivalTime ?? timestampFromMillis(this.now());
    const frame = encodeRecordFrame({ ...record, arrivalTime });
    if (this.spool.bytes + this.appendingBytes + frame.length > this.o.maxSpoolBytes) {
      throw resourceExhausted(`capture spool is full: ${this.o.maxSpoolBytes} bytes`);
    }
    this.appending.set(id, frame.length);
    this.appendingBytes += frame.length;
    let loc: SpoolLocation;
    try {
      loc = await this.spool.append(frame, id);
    } finally {
      this.appending.delete(id);
      this.appendingBytes -= frame.length;
    }
    const p: Pending = {
      id,
      model: record.modelName,
      loc,
      payload: this.cache(frame.subarray(FRAME_HEADER_BYTES)),
      arrivalMs: timestampToMillis(arrivalTime),
      queuedAt: this.now(),
      batchId: null,
    };
    this.pending.set(id, p);
    this.counters.acknowledged++;
    this.enqueue(p);
    this.sealDue();
  }

  private cache(payload: Uint8Array): Uint8Array | undefined {
    if (this.cachedBytes + payload.length > CACHED_RECORD_BYTES) return undefined;
    this.cachedBytes += payload.length;
    return payload;
  }

  /** Forgets a capture that left the spool (stored or dead-lettered). */
  private forget(p: Pending): void {
    this.pending.delete(p.id);
    if (p.payload) this.cachedBytes -= p.payload.length;
    p.payload = undefined;
  }

  /** IN_PROGRESS until the destination stored it, then SUCCESS; FAILURE once dead-lettered. */
  status(id: string): CaptureStatus {
    if (this.pending.has(id) || this.appending.has(id)) return "IN_PROGRESS";
    return this.index.get(id)?.status ?? "NOT_FOUND";
  }

  /** Why a capture is FAILURE (the dead-letter reason), if it is. */
  failureReason(id: string): string | undefined {
    return this.index.get(id)?.reason;
  }

  /** Whether the id is pending or has a retained status (for ALREADY_EXISTS). */
  has(id: string): boolean {
    return this.pending.has(id) || this.appending.has(id) || this.index.get(id) !== undefined;
  }

  stats(): CaptureStats {
    const source = this.destination instanceof S3Destination
      ? this.destination.client.credentials
      : this.periodicS3?.credentials;
    const credentials = source?.stats();
    return {
      pending: this.pending.size,
      appending: this.appending.size,
      spoolBytes: this.spool.bytes,
      spoolSegments: this.spool.segmentCount,
      spoolRounds: this.spool.rounds,
      acknowledged: this.counters.acknowledged,
      batchesWaiting: this.runs.size,
      uploaded: this.counters.uploaded,
      failed: this.counters.failed,
      retries: this.counters.retries,
      lastUploadAt: this.counters.lastUploadAt,
      pausedUntil: this.outageUntil > this.now() ? this.outageUntil : null,
      periodicUploaded: this.counters.periodic,
      blockedReason: this.uploadState().reason,
      blockedSince: this.uploadState().since,
      credentialsExpireAt: credentials?.expiresAt ?? null,
      credentialsFetches: credentials?.fetches ?? 0,
      credentialsFetchFailures: credentials?.fetchFailures ?? 0,
    };
  }

  /** Whether uploads proceed (false while the destination or the periodic upload's S3 fails). */
  uploadState(): UploadState {
    const reason = this.blocked?.reason ?? this.periodicBlocked;
    return { ok: reason === null, reason, since: this.blocked?.since ?? this.periodicBlockedSince };
  }

  /** The periodic upload's state; its failures are logged by its loop, once a period. */
  private setPeriodicBlocked(reason: string | null): void {
    const changed = (reason === null) !== (this.periodicBlocked === null);
    this.periodicBlocked = reason;
    if (!changed) return;
    this.periodicBlockedSince = reason === null ? null : this.now();
    if (reason === null) this.log.info("capture: periodic upload proceeds again");
    this.changes.dispatchEvent(new Event("change"));
  }

  private setBlocked(reason: string, credentials: boolean): void {
    const now = this.now();
    const fields = { destination: this.destination.kind, reason };
    if (!this.blocked) {
      this.blocked = { reason, since: now, loggedAt: now, credentials };
      this.log.warn("capture: uploads cannot proceed; captures are kept and retried", fields);
      this.changes.dispatchEvent(new Event("change"));
      return;
    }
    // The same failure on another object is no news: compare without the request's path.
    const gist = (r: string) => r.replace(/^(S3 \w+|disk write) \S+: /, "");
    const changed = gist(this.blocked.reason) !== gist(reason);
    this.blocked.reason = reason;
    this.blocked.credentials = credentials;
    if (changed || now - this.blocked.loggedAt >= BLOCKED_LOG_EVERY_MS) {
      this.blocked.loggedAt = now;
      this.log.warn("capture: uploads still cannot proceed", {
        ...fields,
        forSeconds: Math.round((now - this.blocked.since) / 1000),
      });
    } else this.log.debug("capture: uploads still cannot proceed", fields);
  }

  private setUnblocked(): void {
    if (!this.blocked) return;
    this.log.info("capture: uploads proceed again", {
      destination: this.destination.kind,
      afterSeconds: Math.round((this.now() - this.blocked.since) / 1000),
    });
    this.blocked = null;
    this.changes.dispatchEvent(new Event("change"));
  }

  /**
   * Checks the credentials while no batch is waiting (uploads check them otherwise): at start, so that
   * missing credentials show before the first capture, then every retryMaxMs, sooner while they fail.
   */
  private async probeLoop(probe: () => Promise<void>): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      if (this.runs.size === 0 && (!this.blocked || this.blocked.credentials)) {
        try {
          await probe();
          failures = 0;
          if (this.blocked?.credentials && this.runs.size === 0) this.setUnblocked();
        } catch (e) {
          failures++;
          if (!this.stopped && this.runs.size === 0) this.setBlocked((e as Error).message, true);
        }
      } else if (this.blocked?.credentials && this.outageUntil > this.now()) {
        // Uploads are paused for want of credentials: resume as soon as some come. (Credentials S3
        // refused are not this case: retrying those keeps the outage backoff.)
        try {
          await probe();
          this.outageUntil = 0;
          this.wake();
        } catch { /* still none: the pause stands */ }
      }
      const wait = failures > 0
        ? backoff(this.o.retryBaseMs, this.o.retryMaxMs, failures)
        : (this.blocked ? this.o.retryBaseMs : this.o.retryMaxMs);
      await sleep(wait, this.abort.signal);
    }
  }

  /**
   * Seals every pending capture now and waits until all captures acknowledged so far are stored or
   * dead-lettered. Resolves true when done, false when `timeoutMs` passed first.
   */
  async flush(timeoutMs = 30_000): Promise<boolean> {
    const deadline = this.now() + timeoutMs;
    while (this.appending.size > 0 && this.now() < deadline) await sleep(5);
    const waitFor = new Set(this.pending.keys());
    this.sealDue(true);
    while (this.now() < deadline && !this.stopped) {
      let left = false;
      for (const id of waitFor) {
        if (this.pending.has(id)) left = true;
        else waitFor.delete(id);
      }
      if (!left) return true;
      this.sealDue(true);
      await sleep(20);
    }
    return waitFor.size === 0;
  }

  /**
   * Stops taking captures, waits for appends in flight, optionally drains uploads for up to `drainMs`,
   * then stops the upload loops (aborting uploads in flight: they resume at the next open) and closes files.
   */
  close(options: { drainMs?: number } = {}): Promise<void> {
    this.closed ??= this.shutdown(options.drainMs ?? 0);
    return this.closed;
  }

  private async shutdown(drainMs: number): Promise<void> {
    this.closing = true;
    if (drainMs > 0) await this.flush(drainMs);
    else while (this.appending.size > 0) await sleep(5);
    this.stopped = true;
    this.abort.abort();
    if (this.sealTimer !== null) clearTimeout(this.sealTimer);
    this.sealTimer = null;
    this.wake();
    await Promise.all(this.loops);
    await Promise.all(this.sealing);
    await this.spool.close();
    await this.index.close();
    this.periodicLog?.close();
    await this.lock.unlock().catch(() => {});
    this.lock.close();
  }

  // --- batching -------------------------------------------------------------------------------------

  /** Seals full batches, and batches whose oldest capture waited push_period (all of them if `force`). */
  private sealDue(force = false): void {
    if (this.stopped) return;
    const now = this.now();
    const period = this.o.pushPeriodSeconds * 1000;
    let next = Infinity;
    let free = this.o.uploadConcurrency - this.sealing.size;
    for (const run of this.runs.values()) if (!run.running) free--;
    for (const [model, queue] of this.unsealed) {
      // A full batch is sealed at once while a worker is free to take it. While every worker is busy,
      // captures wait here and the next batch takes all of them (up to COALESCE_BATCHES batch sizes):
      // under a burst, uploads then cost fewer objects, flushes and status entries, and catch up.
      while (queue.length >= this.o.batchSize && (free-- > 0 || force)) this.seal(model, this.nextBatch(queue));
      while (queue.length && (force || now - queue[0].queuedAt >= period)) this.seal(model, this.nextBatch(queue));
      if (queue.length) next = Math.min(next, queue[0].queuedAt + period);
      else this.unsealed.delete(model);
    }
    if (next < this.sealTimerAt || this.sealTimer === null) {
      if (this.sealTimer !== null) clearTimeout(this.sealTimer);
      this.sealTimer = null;
      this.sealTimerAt = next;
      if (next !== Infinity) {
        this.sealTimer = setTimeout(() => {
          this.sealTimer = null;
          this.sealTimerAt = Infinity;
          this.sealDue();
        }, Math.max(0, next - now));
      }
    }
  }

  /** Takes the next batch off `queue`: batch_size captures, more when more wait (see COALESCE_BATCHES). */
  private nextBatch(queue: Pending[]): Pending[] {
    let n = Math.min(queue.length, this.o.batchSize);
    let bytes = 0;
    for (let i = 0; i < n; i++) bytes += queue[i].loc.length;
    while (
      n < queue.length && n < this.o.batchSize * COALESCE_BATCHES && bytes + queue[n].loc.length <= COALESCE_BYTES
    ) {
      bytes += queue[n++].loc.length;
    }
    return queue.splice(0, n);
  }

  private seal(model: string, captures: Pending[]): void {
    const at = this.now();
    const batch: SealedBatch = {
      id: makeBatchId(model, at, captures),
      model,
      ids: captures.map((c) => c.id),
      at,
    };
    for (const c of captures) c.batchId = batch.id;
    const sealing = this.index.seal(batch).then(
      () => {
        this.runs.set(batch.id, { batch, attempts: 0, nextAt: 0, running: false });
        this.wake();
      },
      (e) => {
        // Nothing was uploaded yet: put them back to be sealed again later.
        this.log.error("capture: cannot log a batch seal", { error: String(e) });
        for (const c of captures) {
          c.batchId = null;
          c.queuedAt = this.now();
          this.enqueue(c);
        }
        if (!this.stopped) setTimeout(() => this.sealDue(), this.o.retryBaseMs);
      },
    ).finally(() => this.sealing.delete(sealing));
    this.sealing.add(sealing);
  }

  // --- uploading ------------------------------------------------------------------------------------

  private wake(): void {
    for (const w of this.wakers.splice(0)) w();
  }

  private async waitForWork(): Promise<void> {
    this.index.prune(); // final statuses also expire while nothing is uploaded
    const now = this.now();
    let until = now + 60_000;
    if (this.outageUntil > now) until = this.outageUntil;
    else {
      for (const run of this.runs.values()) if (!run.running) until = Math.min(until, run.nextAt);
    }
    if (until <= now) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, until - now);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wakers.push(done);
    });
  }

  private pickReady(): BatchRun | null {
    const now = this.now();
    if (now < this.outageUntil) return null;
    for (const run of this.runs.values()) if (!run.running && run.nextAt <= now) return run;
    return null;
  }

  private async worker(): Promise<void> {
    while (!this.stopped) {
      const run = this.pickReady();
      if (!run) {
        await this.waitForWork();
        continue;
      }
      run.running = true;
      try {
        await this.upload(run);
      } catch (e) {
        this.log.error("capture: upload bookkeeping failed", { batch: run.batch.id, error: String(e) });
        run.nextAt = this.now() + backoff(this.o.retryBaseMs, this.o.retryMaxMs, 1);
      } finally {
        run.running = false;
        this.sealDue(); // captures that waited for a free worker
        this.wake(); // idle workers re-check: the outage pause or other batches may have changed
      }
    }
  }

  /** Writes a batch's separate objects, then its record files (layout.ts); throws DestinationError or a spool read error. */
  private async publish(batch: SealedBatch): Promise<void> {
    const ids = batch.ids.filter((id) => this.pending.has(id));
    const payloads = ids.map((id) => this.pending.get(id)!.payload);
    const missing = ids.filter((_, i) => !payloads[i]);
    try {
      const read = await this.spool.readMany(missing.map((id) => this.pending.get(id)!.loc));
      for (let i = 0, k = 0; i < payloads.length; i++) payloads[i] ??= read[k++];
    } catch (e) {
      throw new DestinationError(`batch ${batch.id}: spool records unreadable: ${(e as Error).message}`, false);
    }
    const records = ids.map((id, i) => {
      try {
        return decodeRecord(payloads[i]!);
      } catch (e) {
        throw new DestinationError(`capture ${id}: spool record unreadable: ${(e as Error).message}`, false);
      }
    });
    for (const file of layoutBatch(this.layout, batch, records)) {
      await mapLimit(file.objects, TENSOR_PUTS_AT_ONCE, async (o) => {
        if (this.stopped) throw new DestinationError("stopped", true);
        await this.destination.put(o.key, o.data, "application/octet-stream", this.abort.signal);
      });
      if (this.stopped) throw new DestinationError("stopped", true);
      await this.destination.put(file.key, file.body, "application/x-ndjson", this.abort.signal);
    }
  }

  private async upload(run: BatchRun): Promise<void> {
    const { batch } = run;
    try {
      await this.publish(batch);
    } catch (e) {
      if (this.stopped) return; // aborted by close: resumes at the next open
      await this.uploadFailed(run, e);
      return;
    }
    // Durable SUCCESS first, then release the records: a crash in between re-uploads the same keys.
    await this.index.done(batch.id);
    this.runs.delete(batch.id);
    this.outageCount = 0;
    this.setUnblocked();
    this.counters.lastUploadAt = this.now();
    for (const id of batch.ids) {
      const p = this.pending.get(id);
      if (!p) continue;
      this.forget(p);
      this.counters.uploaded++;
      await this.spool.release(p.loc);
    }
    this.index.prune();
  }

  private async uploadFailed(run: BatchRun, error: unknown): Promise<void> {
    const { batch } = run;
    // Anything but a DestinationError is unexpected: treated as permanent so it cannot stall every upload.
    const transient = error instanceof DestinationError ? error.transient : false;
    const reason = error instanceof Error ? error.message : String(error);
    this.counters.retries++;
    if (transient) {
      // The destination is unreachable or overloaded: pause every upload, never give up.
      this.outageCount++;
      const delay = backoff(this.o.retryBaseMs, this.o.retryMaxMs, this.outageCount);
      this.outageUntil = this.now() + delay;
      this.setBlocked(reason, error instanceof DestinationError && error.credentials);
      this.log.debug("capture: uploads paused", { reason, retryInMs: Math.round(delay) });
      return;
    }
    run.attempts++;
    if (batch.ids.length > 1) {
      // Retry each capture on its own so that one bad capture cannot take the others down with it.
      this.log.warn("capture: batch refused, retrying its captures one by one", { batch: batch.id, reason });
      await this.index.abandon(batch.id);
      this.runs.delete(batch.id);
      for (const id of batch.ids) {
        const p = this.pending.get(id);
        if (p) this.seal(batch.model, [p]);
      }
      return;
    }
    if (run.attempts < this.o.maxAttempts) {
      run.nextAt = this.now() + backoff(this.o.retryBaseMs, this.o.retryMaxMs, run.attempts);
      this.log.warn("capture: upload refused, will retry", { batch: batch.id, attempt: run.attempts, reason });
      return;
    }
    await this.deadLetter(run, reason);
  }

  private async deadLetter(run: BatchRun, reason: string): Promise<void> {
    const { batch } = run;
    for (const id of batch.ids) {
      const p = this.pending.get(id);
      if (!p) continue;
      let payload: Uint8Array = new Uint8Array();
      try {
        payload = p.payload ?? await this.spool.read(p.loc);
      } catch (e) {
        reason += `; the spool record is unreadable too: ${(e as Error).message}`;
      }
      await this.writeDeadLetter(`${encodeComponent(id)}-${p.arrivalMs}`, payload, {
        captureId: id,
        modelName: p.model,
        batchId: batch.id,
        attempts: run.attempts,
        destination: this.destination.kind,
        reason,
      });
    }
    await this.index.fail(batch.ids, reason, batch.id);
    this.runs.delete(batch.id);
    for (const id of batch.ids) {
      const p = this.pending.get(id);
      if (!p) continue;
      this.forget(p);
      this.counters.failed++;
      await this.spool.release(p.loc);
    }
    this.log.error("capture: dead-lettered after failed attempts", { ids: batch.ids, reason });
    this.index.prune();
  }

  private async writeDeadLetter(name: string, payload: Uint8Array, info: Record<string, unknown>): Promise<void> {
    const dir = `${this.root}/dead-letter`;
    await writeFileDurable(`${dir}/${name}.capture`, payload, this.o.fsync);
    const json = JSON.stringify({ ...info, failedAt: new Date(this.now()).toISOString() }, null, 2) + "\n";
    await writeFileDurable(`${dir}/${name}.json`, encoder.encode(json), this.o.fsync);
  }

  // --- periodic upload (Disk destination mirrored to S3) -------------------------------------------------

  private async openPeriodicLog(): Promise<void> {
    const path = `${this.root}/periodic.log`;
    let bytes: Uint8Array | null = null;
    try {
      bytes = await Deno.readFile(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (bytes && checkFileHeader(bytes, "EMCPERIO") === "ok") {
      const scan = scanFrames(bytes, FILE_HEADER_BYTES);
      for (const f of scan.frames) {
        for (const key of decoder.decode(bytes.subarray(f.offset, f.offset + f.length)).split("\n")) {
          if (key) this.periodicDone.add(key);
        }
      }
    }
    // Rewritten at open: drops a torn tail and the files removed from disk since.
    const kept: string[] = [];
    for (const key of this.periodicDone) {
      try {
        await Deno.stat(`${this.o.diskPath}/${key}`);
        kept.push(key);
      } catch {
        this.periodicDone.delete(key);
      }
    }
    const parts = [fileHeader("EMCPERIO")];
    for (let i = 0; i < kept.length; i += 1000) {
      parts.push(encodeFrame(encoder.encode(kept.slice(i, i + 1000).join("\n"))));
    }
    const data = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let o = 0;
    for (const p of parts) {
      data.set(p, o);
      o += p.length;
    }
    await writeFileDurable(path, data, this.o.fsync);
    this.periodicLog = await Deno.open(path, { write: true, append: true });
  }

  private async periodicLoop(): Promise<void> {
    const s3 = this.periodicS3!;
    const period = this.o.periodicUploadPeriodSeconds * 1000;
    while (!this.stopped) {
      await sleep(period, this.abort.signal);
      if (this.stopped) break;
      try {
        await this.periodicRound(s3);
        this.setPeriodicBlocked(null);
      } catch (e) {
        if (!this.stopped) {
          this.log.warn("capture: periodic upload round failed", { error: String(e) });
          this.setPeriodicBlocked(`periodic upload: ${(e as Error).message}`);
        }
      }
    }
  }

  /** Uploads files under disk_path/<prefix> not mirrored yet: tensors before manifests, as the Disk writer does. */
  private async periodicRound(s3: S3Client): Promise<void> {
    const base = this.o.diskPath!;
    const top = this.o.folderPrefix.split("/").filter((p) => p).map(encodeComponent).join("/");
    const found: string[] = [];
    const walk = async (rel: string) => {
      let entries;
      try {
        entries = Deno.readDir(`${base}/${rel}`);
        for await (const e of entries) {
          if (e.name.startsWith(".")) continue; // temporary files of writes in progress
          const child = rel ? `${rel}/${e.name}` : e.name;
          if (e.isDirectory) await walk(child);
          else if (e.isFile && !this.periodicDone.has(child)) found.push(child);
        }
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) throw e;
      }
    };
    await walk(top);
    found.sort((a, b) => Number(a.endsWith(".jsonl")) - Number(b.endsWith(".jsonl")) || (a < b ? -1 : 1));
    let done: string[] = [];
    const record = async () => {
      if (!done.length) return;
      await writeAll(this.periodicLog!, encodeFrame(encoder.encode(done.join("\n"))));
      if (this.o.fsync) await this.periodicLog!.syncData();
      for (const k of done) this.periodicDone.add(k);
      this.counters.periodic += done.length;
      done = [];
    };
    try {
      for (const key of found) {
        if (this.stopped) break;
        const data = await Deno.readFile(`${base}/${key}`);
        const type = key.endsWith(".jsonl") ? "application/x-ndjson" : "application/octet-stream";
        await s3.putObject(key, data, type, this.abort.signal);
        done.push(key);
        if (done.length >= 100) await record();
      }
    } finally {
      await record();
    }
  }
}
