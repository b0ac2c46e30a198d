// Admission of one model's ONNX Runtime Runs: at most `limit` at once, so that its concurrent Runs do
// not oversubscribe the cores (and starve the JavaScript thread that feeds them). The others wait in
// arrival order without holding a thread, and leave the line when their caller gives up.

interface Waiter {
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal?: AbortSignal;
  onAbort: () => void;
}

export class RunSlots {
  #running = 0;
  #peak = 0;
  readonly #waiting: Waiter[] = [];

  constructor(readonly limit: number) {}

  /** Runs holding a slot now. */
  get running(): number {
    return this.#running;
  }

  /** The most Runs that held slots at once. */
  get peak(): number {
    return this.#peak;
  }

  /** Runs waiting for a slot now. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /**
   * Resolves once the caller holds a slot (it must `release()` it exactly once); rejects with
   * `signal.reason` if the signal aborts first, holding nothing.
   */
  acquire(signal?: AbortSignal): Promise<void> {
    signal?.throwIfAborted();
    if (this.#running < this.limit) {
      this.#peak = Math.max(this.#peak, ++this.#running);
      return Promise.resolve();
    }
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    const waiter: Waiter = {
      resolve,
      reject,
      signal,
      onAbort: () => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1);
        reject(signal!.reason);
      },
    };
    signal?.addEventListener("abort", waiter.onAbort, { once: true });
    this.#waiting.push(waiter);
    return promise;
  }

  /** Gives the slot to the longest waiter (running stays the same), or frees it. */
  release(): void {
    const next = this.#waiting.shift();
    if (next) {
      next.signal?.removeEventListener("abort", next.onAbort);
      next.resolve();
      return;
    }
    this.#running--;
  }
}
