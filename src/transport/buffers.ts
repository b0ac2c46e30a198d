// Large buffers reused across calls: a det Predict brings 4.9 MB and answers 1.6 MB, and fresh
// buffers of that size per call cost page faults, zeroing, and a full V8 garbage collection every few
// calls (V8 counts ArrayBuffer memory and collects when it grows). Reusing them is safe only if no one
// still reads a buffer when the next call fills it, so every pooled buffer is held through a Lease.
//
// The ownership rule: whoever holds a view of a leased buffer holds a reference on its lease, and a
// buffer returns to the pool only when the last reference is released. The transport holds a request
// message's lease from its first byte until the handler's promise has settled (whether the call
// finished, failed, was cancelled or its connection went), and an answer's (CallContext.responseBuffer)
// or a joined write's until the socket has taken its bytes; a handler that keeps views of its request bytes past its promise takes a reference of its own
// (CallContext.keepRequest). Buffers of Predict inputs stay referenced while ONNX Runtime reads them,
// since the handler's promise settles only after the Run has returned, even a terminated one.

/** Buffers smaller than this are allocated per use: the pool would cost more than it saves. */
export const MIN_POOLED_BYTES = 16 * 1024;
/** Spare buffers untouched for this long are dropped, so an agent that has gone quiet gives memory back. */
const SPARE_IDLE_MS = 30_000;

/** A reference-counted hold on a buffer; the buffer is reused once every reference is released. */
export class Lease {
  #refs = 1;

  constructor(readonly bytes: Uint8Array, private readonly pool: BufferPool | null, readonly backing: Uint8Array) {}

  /** Another holder of views: the buffer stays out of the pool until it releases too. */
  retain(): void {
    if (this.#refs === 0) throw new Error("lease retained after its last release");
    this.#refs++;
  }

  release(): void {
    if (this.#refs === 0) throw new Error("lease released twice");
    if (--this.#refs === 0) this.pool?.giveBack(this.backing);
  }
}

/** The size class of `bytes`: eight classes per power of two, so a buffer wastes at most an eighth. */
export function sizeClass(bytes: number): number {
  if (bytes <= MIN_POOLED_BYTES) return MIN_POOLED_BYTES;
  const step = 2 ** Math.max(0, Math.floor(Math.log2(bytes)) - 3);
  return Math.ceil(bytes / step) * step;
}

/**
 * Spare buffers by size class, at most `maxSpareBytes` in all. Buffers come back only through a
 * Lease's last release; one that does not fit is left to the garbage collector.
 */
export class BufferPool {
  readonly #spares = new Map<number, { buffer: Uint8Array; since: number }[]>();
  #spareBytes = 0;
  /** Leases served by a spare buffer (tests check that reuse happens). */
  reused = 0;

  constructor(readonly maxSpareBytes: number) {}

  get spareBytes(): number {
    return this.#spareBytes;
  }

  /**
   * `length` bytes (a view `offset` bytes into its buffer: room for alignment), under a lease of one
   * reference. The bytes are not zeroed: the holder writes them before anyone reads them.
   */
  lease(length: number, offset = 0): Lease {
    const size = offset + length;
    if (size < MIN_POOLED_BYTES || this.maxSpareBytes === 0) {
      const buffer = new Uint8Array(size);
      return new Lease(buffer.subarray(offset), null, buffer);
    }
    const cls = sizeClass(size);
    const spare = this.#spares.get(cls)?.pop();
    let buffer: Uint8Array;
    if (spare) {
      this.#spareBytes -= cls;
      this.reused++;
      buffer = spare.buffer;
    } else {
      buffer = new Uint8Array(cls);
    }
    return new Lease(buffer.subarray(offset, size), this, buffer);
  }

  /** Spare buffers that a lease of `length` bytes could take now. */
  sparesFor(length: number): number {
    return this.#spares.get(sizeClass(length))?.length ?? 0;
  }

  /** Called by a lease's last release. */
  giveBack(buffer: Uint8Array): void {
    if (this.#spareBytes + buffer.length > this.maxSpareBytes) return;
    const list = this.#spares.get(buffer.length) ?? [];
    list.push({ buffer, since: performance.now() });
    this.#spares.set(buffer.length, list);
    this.#spareBytes += buffer.length;
  }

  /** Drops spares unused for a while (called from the server's housekeeping). */
  trim(now: number): void {
    for (const [cls, list] of this.#spares) {
      const keep = list.filter((spare) => now - spare.since < SPARE_IDLE_MS);
      this.#spareBytes -= (list.length - keep.length) * cls;
      if (keep.length > 0) this.#spares.set(cls, keep);
      else this.#spares.delete(cls);
    }
  }
}
