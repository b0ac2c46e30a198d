// Writes to a connection's socket for the server and the client alike.
//
// What is queued in one turn of the event loop goes out together: small pieces joined into one write
// (a frame header and its payload, a call's HEADERS, DATA and trailers), so the peer wakes once per
// turn instead of once per frame. One write is in flight at a time, straight on the socket (not
// through a WritableStream, whose queue costs several promises per write): what is queued meanwhile
// is copied into chunks that go out next, so a busy connection makes fewer, larger writes, and what
// waits for a slow reader costs its bytes rather than an object per piece.

import type { BufferPool, Lease } from "./buffers.ts";

/** Pieces at least this large are written as they are rather than copied. */
export const LARGE_WRITE_BYTES = 64 * 1024;
/** Smaller pieces queued during a write are copied into chunks of this size (a deaf client's thousands of answers). */
export const CHUNK_BYTES = 32 * 1024;

interface Part {
  bytes: Uint8Array;
  lease: Lease | null;
}

export class SocketWriter {
  #parts: Part[] = [];
  /** The chunk that small pieces queued during a write are copied into, and how much of it they fill. */
  #tail: Lease | null = null;
  #tailUsed = 0;
  #flushQueued = false;
  #writing = false;
  #failed = false;
  /** Bytes queued so far, and bytes written (or given up) so far: a waiter waits for its mark. */
  #queuedTotal = 0;
  #doneTotal = 0;
  #waiters: { mark: number; then: () => void }[] = [];

  /**
   * `pool` lends the chunks. `onWritten` hears of every write that went out, with
   * its length; `onError` of the first that failed (nothing is written after it).
   */
  constructor(
    private readonly conn: Deno.Conn,
    private readonly pool: BufferPool,
    private readonly onWritten: (bytes: number) => void,
    private readonly onError: (error: unknown) => void,
  ) {}

  /** Queues bytes; they go out once this turn of the event loop ends. The caller must not change them. */
  send(bytes: Uint8Array): void {
    if (this.#failed || bytes.length === 0) return;
    this.#queuedTotal += bytes.length;
    // Pieces that will wait for a write in flight are copied into a chunk; others are joined when they go.
    if (this.#writing && bytes.length < LARGE_WRITE_BYTES) {
      this.#append(bytes);
      return;
    }
    this.#closeTail();
    this.#parts.push({ bytes, lease: null });
    if (!this.#flushQueued && !this.#writing) {
      this.#flushQueued = true;
      queueMicrotask(() => this.flush());
    }
  }

  /** Starts writing what is queued now (a write in flight takes it up when it is done). */
  flush(): void {
    this.#flushQueued = false;
    if (this.#writing || this.#parts.length === 0) return;
    this.#writing = true;
    this.#writeAll();
  }

  /**
   * Runs `then` once every byte queued so far has been written, or could not be (the socket failed
   * or closed): buffers those bytes are views of may be reused then.
   */
  afterWrites(then: () => void): void {
    if (this.#doneTotal >= this.#queuedTotal) then();
    else this.#waiters.push({ mark: this.#queuedTotal, then });
  }

  #append(bytes: Uint8Array): void {
    if (this.#tail === null || this.#tailUsed + bytes.length > this.#tail.bytes.length) {
      this.#closeTail();
      this.#tail = this.pool.lease(CHUNK_BYTES);
    }
    this.#tail.bytes.set(bytes, this.#tailUsed);
    this.#tailUsed += bytes.length;
  }

  #closeTail(): void {
    if (this.#tail === null) return;
    this.#parts.push({ bytes: this.#tail.bytes.subarray(0, this.#tailUsed), lease: this.#tail });
    this.#tail = null;
    this.#tailUsed = 0;
  }

  async #writeAll(): Promise<void> {
    let batch: Part[] = [];
    // batch[next..] have not been handed to #write (whose lease it releases whatever happens).
    let next = 0;
    try {
      for (;;) {
        this.#closeTail();
        if (this.#parts.length === 0 || this.#failed) break;
        batch = this.#parts;
        this.#parts = [];
        next = 0;
        // Runs of small pieces are joined into one write; chunks and large pieces go as they are.
        let from = 0;
        for (let i = 0; i <= batch.length; i++) {
          if (i < batch.length && batch[i].lease === null && batch[i].bytes.length < LARGE_WRITE_BYTES) continue;
          next = i;
          if (i - from === 1) await this.#write(batch[from]);
          else if (i > from) await this.#writeJoined(batch, from, i);
          next = i + 1;
          if (i < batch.length) await this.#write(batch[i]);
          from = i + 1;
        }
      }
    } catch (error) {
      this.#failed = true;
      this.#closeTail();
      for (const { lease } of [...batch.slice(next), ...this.#parts.splice(0)]) lease?.release();
      this.#doneTotal = this.#queuedTotal;
      this.onError(error);
    } finally {
      this.#writing = false;
      this.#wake();
    }
  }

  /** parts[from..to) joined into one write, in a buffer given back once the socket took it. */
  #writeJoined(parts: Part[], from: number, to: number): Promise<void> {
    let length = 0;
    for (let i = from; i < to; i++) length += parts[i].bytes.length;
    const lease = this.pool.lease(length);
    let offset = 0;
    for (let i = from; i < to; i++) {
      lease.bytes.set(parts[i].bytes, offset);
      offset += parts[i].bytes.length;
    }
    return this.#write({ bytes: lease.bytes, lease });
  }

  async #write({ bytes, lease }: Part): Promise<void> {
    try {
      for (let done = 0; done < bytes.length;) done += await this.conn.write(bytes.subarray(done));
    } finally {
      lease?.release();
    }
    this.#doneTotal += bytes.length;
    this.onWritten(bytes.length);
    this.#wake();
  }

  #wake(): void {
    while (this.#waiters.length > 0 && this.#waiters[0].mark <= this.#doneTotal) this.#waiters.shift()!.then();
  }
}
