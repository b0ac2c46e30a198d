// Writes to a connection's socket for the server and the client alike.
//
// What is queued in one turn of the event loop goes out together: small pieces joined into one write
// (a frame header and its payload, a call's HEADERS, DATA and trailers), so the peer wakes once per
// turn instead of once per frame. One write is in flight at a time, straight on the socket (not
// through a WritableStream, whose queue costs several promises per write): what is queued meanwhile
// is joined into the next one, so a busy connection makes fewer, larger writes.

import type { BufferPool, Lease } from "./buffers.ts";

/** Pieces at least this large are written as they are rather than copied into a joined write. */
export const LARGE_WRITE_BYTES = 64 * 1024;

export class SocketWriter {
  #parts: Uint8Array[] = [];
  #flushQueued = false;
  #writing = false;
  #failed = false;
  /** Bytes queued so far, and bytes written (or given up) so far: a waiter waits for its mark. */
  #queuedTotal = 0;
  #doneTotal = 0;
  #waiters: { mark: number; then: () => void }[] = [];

  /**
   * `pool` lends the buffers of joined writes (null: allocated). `onWritten` hears of every write
   * that went out, with its length; `onError` of the first that failed (nothing is written after it).
   */
  constructor(
    private readonly conn: Deno.Conn,
    private readonly pool: BufferPool | null,
    private readonly onWritten: (bytes: number) => void,
    private readonly onError: (error: unknown) => void,
  ) {}

  /** Queues bytes; they go out once this turn of the event loop ends. The caller must not change them. */
  send(bytes: Uint8Array): void {
    if (this.#failed || bytes.length === 0) return;
    this.#parts.push(bytes);
    this.#queuedTotal += bytes.length;
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

  async #writeAll(): Promise<void> {
    try {
      while (this.#parts.length > 0 && !this.#failed) {
        const parts = this.#parts;
        this.#parts = [];
        let from = 0;
        for (let i = 0; i <= parts.length; i++) {
          if (i < parts.length && parts[i].length < LARGE_WRITE_BYTES) continue;
          if (i - from === 1) await this.#write(parts[from], null);
          else if (i > from) await this.#writeJoined(parts, from, i);
          if (i < parts.length) await this.#write(parts[i], null);
          from = i + 1;
        }
      }
    } catch (error) {
      this.#failed = true;
      this.#parts = [];
      this.#doneTotal = this.#queuedTotal;
      this.onError(error);
    } finally {
      this.#writing = false;
      this.#wake();
    }
  }

  /** parts[from..to) joined into one write, in a buffer given back once the socket took it. */
  #writeJoined(parts: Uint8Array[], from: number, to: number): Promise<void> {
    let length = 0;
    for (let i = from; i < to; i++) length += parts[i].length;
    const lease = this.pool?.lease(length) ?? null;
    const out = lease?.bytes ?? new Uint8Array(length);
    let offset = 0;
    for (let i = from; i < to; i++) {
      out.set(parts[i], offset);
      offset += parts[i].length;
    }
    return this.#write(out, lease);
  }

  async #write(bytes: Uint8Array, lease: Lease | null): Promise<void> {
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
