// Tensors in clients' shared memory: which segment a handle names (SysV id or POSIX object), the
// bounds every access must respect, and how long a mapping lives: at least until the Run that reads
// (inputs) or writes (outputs) it ends; a SysV segment stays attached a while after, for the client's
// next request. Inputs are mapped read-only, outputs read-write, each only with the client's permission.

import { Errno, ErrnoError, type Libc, type Mapping, type SegmentStatus, SHM_DEST } from "../../ffi/libc.ts";
import { invalidArgument, permissionDenied } from "../errors.ts";

export type SharedMemoryKind = "sysv" | "posix" | "both";

export interface SharedMemoryOptions {
  kind: SharedMemoryKind;
  /** POSIX object name = prefix + segment id, e.g. "/edge_agent_42". */
  posixPrefix: string;
  /**
   * Keep a SysV segment attached for this long after its last use (0: detach after every request).
   * Clients reuse one segment per stream of frames; attaching again costs a page fault per 4 KiB page
   * on the next Run (about 1 ms for a 5 MB image).
   */
  sysvKeepAttachedSeconds: number;
}

/** A handle's fields, as unsigned 64-bit values. */
export interface ShmHandle {
  size: bigint;
  offset: bigint;
  segmentId: bigint;
}

/** A tensor's bytes inside a client's segment, readable (or, for an output, writable) until release. */
export interface ShmRegion {
  /** Where they start in this process (null in an empty mapping). */
  address: Deno.PointerValue;
  byteLength: number;
  /**
   * A view of them, made when first asked for: ORT is handed `address`. V8 counts the bytes of every new
   * ArrayBuffer over outside memory as memory pressure, and megabytes per request would set off a full
   * collection every few requests, whose marking takes a core from the Runs.
   */
  readonly bytes: Uint8Array;
  release(): void;
}

const MAX_SYSV_ID = 2n ** 31n - 1n;
/** Attached segments kept at most; the least recently used idle one goes first. */
const MAX_KEPT_SEGMENTS = 64;
const SWEEP_MS = 1000;

/** What a request reads a segment through. */
interface Lease {
  size: bigint;
  address(offset: number): Deno.PointerValue;
  view(offset: number, length: number): Uint8Array;
  release(): void;
}

function region(lease: Lease, offset: number, byteLength: number): ShmRegion {
  let bytes: Uint8Array | null = null;
  return {
    address: lease.address(offset),
    byteLength,
    get bytes() {
      return bytes ??= lease.view(offset, byteLength);
    },
    release: () => lease.release(),
  };
}

/** A SysV segment attached by this process, shared by the requests that name it. */
interface Attachment {
  id: number;
  writable: boolean;
  mapping: Mapping;
  /**
   * shm_ctime, owner and mode when attached: a change (IPC_SET) means the segment must be checked
   * afresh. The owner and mode are compared too because shm_ctime counts seconds, and a chmod in the
   * second of the attach must still take effect (write permission is checked only by shmat).
   */
  stamp: string;
  users: number;
  lastUsedMs: number;
  /** No longer handed out (removed, changed, idle, evicted or the reader closed); detached at users 0. */
  retired: boolean;
}

export class SharedMemoryReader {
  /** By attachKey(): a segment may be attached once read-only (inputs) and once read-write (outputs). */
  readonly #kept = new Map<string, Attachment>();
  #sweeper: ReturnType<typeof setInterval> | null = null;

  constructor(private readonly libc: Libc, private readonly options: SharedMemoryOptions) {}

  /**
   * Maps the `byteLength` bytes a handle points at, read-only and without copying. `label` names
   * the tensor in error messages; `elementSize` is the alignment the offset must have.
   */
  open(label: string, handle: ShmHandle, byteLength: number, elementSize: number): ShmRegion {
    const { size, offset, segmentId } = handle;
    if (size !== 0n && size !== BigInt(byteLength)) {
      throw invalidArgument(
        `${label}: shared_memory_handle.size is ${size}, but the tensor's shape and data_type need ${byteLength} bytes (send 0 to use that)`,
      );
    }
    if (offset % BigInt(elementSize) !== 0n) {
      throw invalidArgument(
        `${label}: shared_memory_handle.offset ${offset} in segment ${segmentId} is not a multiple of the element size ${elementSize}`,
      );
    }
    const mapping = this.#map(label, segmentId, false);
    if (offset + BigInt(byteLength) > mapping.size) {
      mapping.release();
      throw invalidArgument(
        `${label}: offset ${offset} + ${byteLength} bytes runs past the end of segment ${segmentId}, which holds ${mapping.size} bytes`,
      );
    }
    return region(mapping, Number(offset), byteLength);
  }

  /**
   * Maps the room a handle gives an output, read-write: `size` bytes at `offset`, or everything from
   * `offset` to the end of the segment when `size` is 0. Bounds are computed on unsigned 64-bit values,
   * so no offset or size wraps around. The caller checks that the output fits the room.
   */
  openWritable(label: string, handle: ShmHandle, elementSize: number): ShmRegion {
    const { size, offset, segmentId } = handle;
    if (offset % BigInt(elementSize) !== 0n) {
      throw invalidArgument(
        `${label}: shared_memory_handle.offset ${offset} in segment ${segmentId} is not a multiple of the element size ${elementSize}`,
      );
    }
    const mapping = this.#map(label, segmentId, true);
    const end = size === 0n ? mapping.size : offset + size;
    if (offset > mapping.size || end > mapping.size) {
      mapping.release();
      throw invalidArgument(
        `${label}: offset ${offset}${
          size === 0n ? "" : ` + ${size} bytes`
        } runs past the end of segment ${segmentId}, which holds ${mapping.size} bytes`,
      );
    }
    return region(mapping, Number(offset), Number(end - offset));
  }

  #map(label: string, segmentId: bigint, writable: boolean): Lease {
    const { kind, posixPrefix } = this.options;
    if (kind !== "sysv") {
      const name = `${posixPrefix}${segmentId}`;
      let mapping: Mapping | null;
      try {
        mapping = this.libc.mapPosix(name, writable);
      } catch (error) {
        throw this.#explain(error, label, `shared memory object ${name}`, writable);
      }
      if (mapping) return mapping;
      if (kind === "posix") throw invalidArgument(`${label}: shared memory object ${name} not found`);
    }
    if (segmentId > MAX_SYSV_ID) throw invalidArgument(`${label}: segment ${segmentId} not found`);
    const id = Number(segmentId);
    try {
      return this.#attachSysv(id, writable);
    } catch (error) {
      const kept = this.#kept.get(attachKey(id, writable));
      if (kept) this.#retire(kept);
      throw this.#explain(error, label, `segment ${segmentId}`, writable);
    }
  }

  /**
   * The segment's attachment, reused while the segment is unchanged. IPC_STAT runs on every request
   * all the same: it is the permission check (it needs read access), so revoking the agent's access
   * takes effect at the next request even while the segment stays attached.
   */
  #attachSysv(id: number, writable: boolean): Lease {
    const status = this.libc.segmentStatus(id);
    const removed = (status.mode & SHM_DEST) !== 0;
    const key = attachKey(id, writable);
    const kept = this.#kept.get(key);
    if (kept && !removed && kept.stamp === stampOf(status)) {
      kept.users++;
      kept.lastUsedMs = performance.now();
      return this.#lease(kept);
    }
    if (kept) this.#retire(kept);
    const attachment: Attachment = {
      id,
      writable,
      mapping: this.libc.attach(id, status.size, writable),
      stamp: stampOf(status),
      users: 1,
      lastUsedMs: performance.now(),
      retired: removed || this.options.sysvKeepAttachedSeconds === 0,
    };
    if (!attachment.retired) {
      this.#kept.set(key, attachment);
      this.#evictBeyondLimit();
      if (this.#sweeper === null) {
        // The sweep must not keep a stopping agent alive.
        const sweeper = setInterval(() => this.#sweep(), SWEEP_MS);
        Deno.unrefTimer(sweeper);
        this.#sweeper = sweeper;
      }
    }
    return this.#lease(attachment);
  }

  #lease(attachment: Attachment): Lease {
    let released = false;
    return {
      size: attachment.mapping.size,
      address: (offset) => attachment.mapping.address(offset),
      view: (offset, length) => attachment.mapping.view(offset, length),
      release: () => {
        if (released) return;
        released = true;
        attachment.users--;
        attachment.lastUsedMs = performance.now();
        if (attachment.retired && attachment.users === 0) attachment.mapping.release();
      },
    };
  }

  /** Hands the attachment out no more; detaches it now if no request holds it, else at its last release. */
  #retire(attachment: Attachment): void {
    const key = attachKey(attachment.id, attachment.writable);
    if (this.#kept.get(key) === attachment) this.#kept.delete(key);
    attachment.retired = true;
    if (attachment.users === 0) attachment.mapping.release();
  }

  #evictBeyondLimit(): void {
    while (this.#kept.size > MAX_KEPT_SEGMENTS) {
      const idle = [...this.#kept.values()].filter((a) => a.users === 0);
      if (idle.length === 0) return;
      this.#retire(idle.reduce((a, b) => (a.lastUsedMs <= b.lastUsedMs ? a : b)));
    }
  }

  /** Detaches idle attachments that are past their time, or whose segment was removed or changed. */
  #sweep(): void {
    const now = performance.now();
    for (const attachment of [...this.#kept.values()]) {
      if (attachment.users > 0) continue;
      if (now - attachment.lastUsedMs >= this.options.sysvKeepAttachedSeconds * 1000) {
        this.#retire(attachment);
        continue;
      }
      try {
        const status = this.libc.segmentStatus(attachment.id);
        if ((status.mode & SHM_DEST) !== 0 || stampOf(status) !== attachment.stamp) this.#retire(attachment);
      } catch {
        this.#retire(attachment);
      }
    }
    if (this.#kept.size === 0) this.#stopSweeping();
  }

  #stopSweeping(): void {
    if (this.#sweeper !== null) clearInterval(this.#sweeper);
    this.#sweeper = null;
  }

  /** SysV attachments kept, read-only and read-write (the metric edge_agent_shm_sysv_segments_attached). */
  get attachedSegments(): number {
    return this.#kept.size;
  }

  /** Detaches every kept segment; requests still reading keep theirs until they release. */
  close(): void {
    this.#stopSweeping();
    for (const attachment of [...this.#kept.values()]) this.#retire(attachment);
  }

  #explain(error: unknown, label: string, segment: string, writable: boolean): Error {
    if (!(error instanceof ErrnoError)) return error as Error;
    const access = writable ? "write" : "read";
    switch (error.errno) {
      case Errno.EACCES:
      case Errno.EPERM:
        return permissionDenied(
          `${label}: the agent may not ${access} ${segment} (${error.call}: access denied); run the agent as the user that owns the segment, or grant that user's group or others ${access} access`,
        );
      case Errno.ENOENT:
      case Errno.EINVAL:
      case Errno.EIDRM:
      case Errno.ENAMETOOLONG:
        return invalidArgument(`${label}: ${segment} not found`);
      default:
        return invalidArgument(`${label}: ${segment} cannot be mapped (${error.call}: errno ${error.errno})`);
    }
  }
}

function attachKey(id: number, writable: boolean): string {
  return `${writable ? "rw" : "r"}:${id}`;
}

function stampOf(status: SegmentStatus): string {
  return `${status.changed}/${status.uid}/${status.gid}/${status.mode & 0o777}`;
}
