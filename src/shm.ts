// Tensors in clients' shared memory: which segment a handle names (SysV id or POSIX object), the
// bounds every access must respect, and how long a mapping lives (until the Run that reads it ends).

import { Errno, ErrnoError, type Libc, type Mapping } from "../ffi/libc.ts";
import { invalidArgument, permissionDenied } from "./errors.ts";

export type SharedMemoryKind = "sysv" | "posix" | "both";

export interface SharedMemoryOptions {
  kind: SharedMemoryKind;
  /** POSIX object name = prefix + segment id, e.g. "/edge_agent_42". */
  posixPrefix: string;
}

/** A handle's fields, as unsigned 64-bit values. */
export interface ShmHandle {
  size: bigint;
  offset: bigint;
  segmentId: bigint;
}

/** A tensor's bytes inside a client's segment, readable until release. */
export interface ShmRegion {
  bytes: Uint8Array;
  release(): void;
}

const MAX_SYSV_ID = 2n ** 31n - 1n;

export class SharedMemoryReader {
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
    const mapping = this.#map(label, segmentId);
    if (offset + BigInt(byteLength) > mapping.size) {
      mapping.release();
      throw invalidArgument(
        `${label}: offset ${offset} + ${byteLength} bytes runs past the end of segment ${segmentId}, which holds ${mapping.size} bytes`,
      );
    }
    return { bytes: mapping.view(Number(offset), byteLength), release: () => mapping.release() };
  }

  #map(label: string, segmentId: bigint): Mapping {
    const { kind, posixPrefix } = this.options;
    if (kind !== "sysv") {
      const name = `${posixPrefix}${segmentId}`;
      try {
        return this.libc.mapPosix(name);
      } catch (error) {
        const missing = error instanceof ErrnoError && error.errno === Errno.ENOENT;
        if (!(missing && kind === "both")) throw this.#explain(error, label, `shared memory object ${name}`);
      }
    }
    if (segmentId > MAX_SYSV_ID) throw invalidArgument(`${label}: segment ${segmentId} not found`);
    const id = Number(segmentId);
    try {
      return this.libc.attach(id, this.libc.segmentStatus(id).size);
    } catch (error) {
      throw this.#explain(error, label, `segment ${segmentId}`);
    }
  }

  #explain(error: unknown, label: string, segment: string): Error {
    if (!(error instanceof ErrnoError)) return error as Error;
    switch (error.errno) {
      case Errno.EACCES:
      case Errno.EPERM:
        return permissionDenied(
          `${label}: the agent may not read ${segment} (${error.call}: access denied); run the agent as the user that owns the segment, or grant that user's group or others read access`,
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
