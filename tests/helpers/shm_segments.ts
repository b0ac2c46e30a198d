// The client side of shared memory, as applications do it: SysV segments the way Edge Manager's
// example client makes them (shmget 0666, fill, chmod 0400) and POSIX objects (shm_open + mmap).

import { Buffer } from "node:buffer";

const symbols = {
  // int shmget(key_t key, size_t size, int shmflg)
  shmget: { parameters: ["i32", "usize", "i32"], result: "i32" },
  // void* shmat(int shmid, const void* shmaddr, int shmflg)
  shmat: { parameters: ["i32", "pointer", "i32"], result: "pointer" },
  // int shmdt(const void* shmaddr)
  shmdt: { parameters: ["pointer"], result: "i32" },
  // int shmctl(int shmid, int cmd, struct shmid_ds* buf)
  shmctl: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  // int shm_open(const char* name, int oflag, mode_t mode)
  shm_open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int shm_unlink(const char* name)
  shm_unlink: { parameters: ["buffer"], result: "i32" },
  // int ftruncate(int fd, off_t length)
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  // void* mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset)
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void* addr, size_t length)
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // int fchmod(int fd, mode_t mode)
  fchmod: { parameters: ["i32", "u32"], result: "i32" },
  // int fchown(int fd, uid_t owner, gid_t group)
  fchown: { parameters: ["i32", "u32", "u32"], result: "i32" },
  // int close(int fd)
  close: { parameters: ["i32"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

const libc = Deno.dlopen("libc.so.6", symbols).symbols;
const IPC_PRIVATE = 0;
const IPC_CREAT = 0o1000;
const IPC_RMID = 0;
const IPC_SET = 1;
const IPC_STAT = 2;
const O_RDWR = 2;
const O_CREAT = 0o100;
const O_EXCL = 0o200;
const PROT_READ_WRITE = 3;
const MAP_SHARED = 1;
const MODE_OFFSET = 20;
/** offsetof(struct shmid_ds, shm_nattch) on x86_64 and aarch64 (glibc; checked by tests/shm_layout_test.ts). */
export const NATTCH_OFFSET = 88;

/** How many processes have SysV segment `id` attached; null once the segment is gone. */
export function sysvAttachments(id: number): number | null {
  const ds = new Uint8Array(112);
  if (libc.shmctl(id, IPC_STAT, ds) !== 0) return null;
  return Number(new DataView(ds.buffer).getBigUint64(NATTCH_OFFSET, true));
}

function bytesOf(data: ArrayBufferView): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function writeAt(address: Deno.PointerObject, offset: number, data: ArrayBufferView): void {
  if (data.byteLength === 0) return;
  new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(address, data.byteLength, offset)).set(bytesOf(data));
}

/** A SysV segment made as Edge Manager's example client makes it. */
export class SysvSegment {
  readonly id: number;
  readonly #address: Deno.PointerObject;

  constructor(readonly size: number, existingId?: number) {
    this.id = existingId ?? libc.shmget(IPC_PRIVATE, BigInt(size), IPC_CREAT | 0o666);
    if (this.id < 0) throw new Error(`shmget(${size}) failed`);
    const address = libc.shmat(this.id, null, 0);
    if (!address || Deno.UnsafePointer.value(address) === 0xffffffffffffffffn) throw new Error("shmat failed");
    this.#address = address;
  }

  /** Attaches a segment someone else created (root may attach any). */
  static attach(id: number, size: number): SysvSegment {
    return new SysvSegment(size, id);
  }

  write(offset: number, data: ArrayBufferView): this {
    writeAt(this.#address, offset, data);
    return this;
  }

  /** A copy of `length` bytes at `offset`. */
  read(offset: number, length: number): Uint8Array {
    return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.#address, length, offset)).slice();
  }

  /** shmctl(IPC_SET) with a new mode, as the example client does to make the segment read-only. */
  chmod(mode: number): this {
    const ds = new Uint8Array(112);
    if (libc.shmctl(this.id, IPC_STAT, ds) !== 0) throw new Error("IPC_STAT failed");
    new DataView(ds.buffer).setUint16(MODE_OFFSET, mode, true);
    if (libc.shmctl(this.id, IPC_SET, ds) !== 0) throw new Error("IPC_SET failed");
    return this;
  }

  /** Detaches and removes the segment (the id stops existing once no one is attached). */
  remove(): void {
    libc.shmdt(this.#address);
    libc.shmctl(this.id, IPC_RMID, null);
  }
}

/** A POSIX shared memory object /<name>, created, sized and mapped read-write. */
export class PosixObject {
  readonly #address: Deno.PointerObject | null;
  readonly #fd: number;

  constructor(readonly name: string, readonly size: number, mode = 0o600) {
    this.#fd = libc.shm_open(Buffer.from(name + "\0"), O_RDWR | O_CREAT | O_EXCL, mode);
    if (this.#fd < 0) throw new Error(`shm_open(${name}) failed`);
    if (libc.ftruncate(this.#fd, BigInt(size)) !== 0) throw new Error("ftruncate failed");
    this.#address = size === 0 ? null : libc.mmap(null, BigInt(size), PROT_READ_WRITE, MAP_SHARED, this.#fd, 0n);
  }

  write(offset: number, data: ArrayBufferView): this {
    writeAt(this.#address!, offset, data);
    return this;
  }

  chmod(mode: number): this {
    if (libc.fchmod(this.#fd, mode) !== 0) throw new Error("fchmod failed");
    return this;
  }

  chown(uid: number): this {
    if (libc.fchown(this.#fd, uid, uid) !== 0) throw new Error("fchown failed");
    return this;
  }

  remove(): void {
    if (this.#address) libc.munmap(this.#address, BigInt(this.size));
    libc.close(this.#fd);
    libc.shm_unlink(Buffer.from(this.name + "\0"));
  }
}
