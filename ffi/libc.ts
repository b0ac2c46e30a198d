// Raw bindings to the C library calls the agent uses to read (inputs) and write (outputs) clients'
// shared memory (SysV and POSIX), and a class that owns one mapping. No policy here: src/inference/shm.ts decides.

import { cString, NativeError } from "./native.ts";

const libcSymbols = {
  // int* __errno_location(void)
  __errno_location: { parameters: [], result: "pointer" },
  // void* shmat(int shmid, const void* shmaddr, int shmflg)
  shmat: { parameters: ["i32", "pointer", "i32"], result: "pointer" },
  // int shmdt(const void* shmaddr)
  shmdt: { parameters: ["pointer"], result: "i32" },
  // int shmctl(int shmid, int cmd, struct shmid_ds* buf)
  shmctl: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  // void* mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset)
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void* addr, size_t length)
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // off_t lseek(int fd, off_t offset, int whence)
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  // int close(int fd)
  close: { parameters: ["i32"], result: "i32" },
  // int malloc_trim(size_t pad)
  malloc_trim: { parameters: ["usize"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

const shmOpenSymbols = {
  // int shm_open(const char* name, int oflag, mode_t mode)
  shm_open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

export const Errno = { EPERM: 1, ENOENT: 2, EACCES: 13, EINVAL: 22, EIDRM: 43, ENAMETOOLONG: 36 } as const;

const IPC_STAT = 2;
/** shm_perm.mode bit: the segment is marked for removal (IPC_RMID) and goes once the last process detaches. */
export const SHM_DEST = 0o1000;
const SHM_RDONLY = 0o10000;
const O_RDONLY = 0;
const O_RDWR = 2;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const SEEK_END = 2;
const MAP_FAILED = 0xffffffffffffffffn;

/**
 * struct shmid_ds as glibc lays it out on x86_64 and aarch64 (the same there: checked with
 * offsetof() for both by tests/shm_layout_test.ts).
 */
export const SHMID_DS = {
  size: 112,
  uidOffset: 4,
  gidOffset: 8,
  modeOffset: 20,
  segszOffset: 48,
  ctimeOffset: 72,
} as const;

/** A failed C call with its errno. */
export class ErrnoError extends NativeError {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call} failed: errno ${errno}`);
    this.name = "ErrnoError";
  }
}

export interface SegmentStatus {
  /** shm_segsz */
  size: bigint;
  /** shm_perm.mode, including SHM_DEST once the segment is marked for removal. */
  mode: number;
  /** shm_ctime: last change (creation, IPC_SET) in seconds. */
  changed: bigint;
  /** shm_perm.uid and shm_perm.gid: the owner, which IPC_SET may change. */
  uid: number;
  gid: number;
}

/** The C library, plus shm_open from libc.so.6 (glibc >= 2.34) or librt.so.1 (older glibc). */
export class Libc {
  readonly #libc: Deno.DynamicLibrary<typeof libcSymbols>;
  readonly #rt: Deno.DynamicLibrary<typeof shmOpenSymbols>;
  readonly #stat = new Uint8Array(SHMID_DS.size);

  private constructor(libc: Deno.DynamicLibrary<typeof libcSymbols>, rt: Deno.DynamicLibrary<typeof shmOpenSymbols>) {
    this.#libc = libc;
    this.#rt = rt;
  }

  static open(): Libc {
    const libc = Deno.dlopen("libc.so.6", libcSymbols);
    const failures: string[] = [];
    for (const name of ["libc.so.6", "librt.so.1"]) {
      try {
        return new Libc(libc, Deno.dlopen(name, shmOpenSymbols));
      } catch (error) {
        failures.push(`${name}: ${(error as Error).message}`);
      }
    }
    libc.close();
    throw new NativeError(`shm_open was found in neither libc.so.6 nor librt.so.1 (${failures.join("; ")})`);
  }

  /** errno of the last failed call on this thread; read it right after the call. */
  errno(): number {
    const location = this.#libc.symbols.__errno_location();
    return location ? new Deno.UnsafePointerView(location).getInt32() : 0;
  }

  /** shmctl(IPC_STAT) */
  segmentStatus(id: number): SegmentStatus {
    if (this.#libc.symbols.shmctl(id, IPC_STAT, this.#stat) !== 0) throw new ErrnoError("shmctl", this.errno());
    const view = new DataView(this.#stat.buffer);
    return {
      size: view.getBigUint64(SHMID_DS.segszOffset, true),
      mode: view.getUint16(SHMID_DS.modeOffset, true),
      changed: view.getBigInt64(SHMID_DS.ctimeOffset, true),
      uid: view.getUint32(SHMID_DS.uidOffset, true),
      gid: view.getUint32(SHMID_DS.gidOffset, true),
    };
  }

  /** Attaches SysV segment `id`, read-only unless `writable` (which needs write permission). */
  attach(id: number, size: bigint, writable = false): Mapping {
    const address = this.#libc.symbols.shmat(id, null, writable ? 0 : SHM_RDONLY);
    if (isFailure(address)) throw new ErrnoError("shmat", this.errno());
    return new Mapping(address, size, () => this.#libc.symbols.shmdt(address));
  }

  /**
   * shm_open(name) and map the whole object, read-only unless `writable` (O_RDWR, PROT_READ|PROT_WRITE);
   * the descriptor is closed at once. null when no object has that name: a miss is an answer, not a
   * failure (the "both" mode looks for an object before a SysV segment on every request).
   */
  mapPosix(name: string, writable = false): Mapping | null {
    const fd = this.#rt.symbols.shm_open(cString(name), writable ? O_RDWR : O_RDONLY, 0);
    if (fd < 0) {
      const errno = this.errno();
      if (errno === Errno.ENOENT) return null;
      throw new ErrnoError("shm_open", errno);
    }
    try {
      const size = this.#libc.symbols.lseek(fd, 0n, SEEK_END);
      if (size < 0) throw new ErrnoError("lseek", this.errno());
      const length = BigInt(size);
      // mmap refuses zero-length mappings; an empty object maps to nothing.
      if (length === 0n) return new Mapping(null, 0n, () => 0);
      const prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
      const address = this.#libc.symbols.mmap(null, length, prot, MAP_SHARED, fd, 0n);
      if (isFailure(address)) throw new ErrnoError("mmap", this.errno());
      return new Mapping(address, length, () => this.#libc.symbols.munmap(address, length));
    } finally {
      this.#libc.symbols.close(fd);
    }
  }

  /** Hands the free memory at the top of every malloc arena back to the OS (glibc's malloc_trim(0)). */
  trimHeap(): void {
    this.#libc.symbols.malloc_trim(0n);
  }

  close(): void {
    this.#rt.close();
    this.#libc.close();
  }
}

function isFailure(address: Deno.PointerValue): boolean {
  return address === null || BigInt(Deno.UnsafePointer.value(address)) === MAP_FAILED;
}

/** One mapping of a segment; unmapped exactly once. */
export class Mapping {
  #address: Deno.PointerValue;
  readonly #unmap: () => number;
  /**
   * One ArrayBuffer over the whole mapping, made at the first view; views are windows on it. V8 counts
   * the bytes of every new ArrayBuffer over outside memory as memory pressure: one per request (megabytes
   * each for an image) set off a full collection every few requests of a kept segment, whose marking
   * took a core from the Runs.
   */
  #whole: Uint8Array | null = null;

  constructor(address: Deno.PointerValue, readonly size: bigint, unmap: () => number) {
    this.#address = address;
    this.#unmap = unmap;
  }

  /** The address `offset` bytes into the mapping, without a view; null for an empty mapping. */
  address(offset: number): Deno.PointerValue {
    if (this.#address === null && this.size !== 0n) throw new NativeError("mapping used after release");
    if (BigInt(offset) > this.size) throw new NativeError("address beyond the mapping");
    return this.#address === null ? null : Deno.UnsafePointer.offset(this.#address, offset);
  }

  /**
   * `length` bytes at `offset`, as a view of the shared memory (no copy; writable only if the mapping
   * is). The view dies with the mapping: never touch it after release. The caller has checked
   * offset + length <= size.
   */
  view(offset: number, length: number): Uint8Array {
    if (this.#address === null && this.size !== 0n) throw new NativeError("mapping used after release");
    if (BigInt(offset) + BigInt(length) > this.size) throw new NativeError("view beyond the mapping");
    if (length === 0) return new Uint8Array(0);
    this.#whole ??= new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.#address!, Number(this.size)));
    return this.#whole.subarray(offset, offset + length);
  }

  release(): void {
    if (this.#address === null) return;
    this.#unmap();
    this.#address = null;
    this.#whole = null;
  }
  [Symbol.dispose](): void {
    this.release();
  }
}
