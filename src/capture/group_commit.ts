// Group commit: one write + fsync round serves every append that arrived while the previous round ran,
// so durable appends cost one disk flush per round rather than one per request.

interface Waiter<I, R> {
  item: I;
  resolve: (result: R) => void;
  reject: (error: unknown) => void;
}

export class GroupCommit<I, R> {
  private queue: Waiter<I, R>[] = [];
  private running = false;
  private idleWaiters: Array<() => void> = [];
  /** Rounds run so far (each is one fsync when syncing is on). */
  rounds = 0;

  /** `round` gets the items in arrival order and returns one result per item, or throws for all of them. */
  constructor(private readonly round: (items: I[]) => Promise<R[]>) {}

  submit(item: I): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      this.queue.push({ item, resolve, reject });
      if (!this.running) {
        this.running = true;
        // A microtask's delay lets appends issued in the same tick join the first round too.
        queueMicrotask(() => this.run());
      }
    });
  }

  get queued(): number {
    return this.queue.length;
  }

  /** Resolves once nothing is queued or being written. */
  idle(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private async run(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue;
      this.queue = [];
      this.rounds++;
      try {
        const results = await this.round(batch.map((w) => w.item));
        batch.forEach((w, i) => w.resolve(results[i]));
      } catch (e) {
        for (const w of batch) w.reject(e);
      }
    }
    this.running = false;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}
