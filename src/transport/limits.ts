// The server's resource bounds: what one connection, and all of them together, may make the agent
// hold or do. Each bound is a config key (edge_agent_*); see README "Limits and hardening".

/** Bounds of the gRPC server; every field has a default in DEFAULT_LIMITS. */
export interface ServerLimits {
  /** Connections open at once; past it a new connection is closed at once. */
  maxConnections: number;
  /** A connection with no open stream and no bytes either way for this long gets GOAWAY and is closed. */
  idleConnectionMs: number;
  /** Streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused. */
  maxConcurrentStreams: number;
  /** A request's header block, over HEADERS and every CONTINUATION (9 bytes counted per frame). */
  maxHeaderListBytes: number;
  /** Control frames (PING, SETTINGS, RST_STREAM, WINDOW_UPDATE, PRIORITY, empty ones) per second. */
  controlFramesPerSecond: number;
  /** Bytes written to a connection and not yet taken by its peer; past it we stop reading it. */
  maxPendingWriteBytes: number;
  /** Request message bytes held across all connections. */
  maxBufferedMessageBytes: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_LIMITS: ServerLimits = {
  maxConnections: 256,
  idleConnectionMs: 300_000,
  maxConcurrentStreams: 100,
  maxHeaderListBytes: 65536,
  controlFramesPerSecond: 1000,
  maxPendingWriteBytes: 16 * MiB,
  maxBufferedMessageBytes: 256 * MiB,
};

/** Seconds of control frames a connection may send at once before the rate applies. */
export const CONTROL_BURST_SECONDS = 5;

/**
 * A token bucket: `rate` tokens a second, at most `burst` saved. Legitimate peers stay far below;
 * a flood empties it within milliseconds.
 */
export class TokenBucket {
  #tokens: number;
  #last = performance.now();

  constructor(private readonly rate: number, private readonly burst: number) {
    this.#tokens = burst;
  }

  /** Takes `cost` tokens; false once the bucket is empty. */
  take(cost = 1): boolean {
    if (this.#tokens < cost) {
      const now = performance.now();
      this.#tokens = Math.min(this.burst, this.#tokens + (now - this.#last) * this.rate / 1000);
      this.#last = now;
      if (this.#tokens < cost) return false;
    }
    this.#tokens -= cost;
    return true;
  }

  /** Gives back tokens a peer earned (e.g. a WINDOW_UPDATE is due for data we sent). */
  give(count = 1): void {
    this.#tokens = Math.min(this.burst, this.#tokens + count);
  }
}

/** Bytes reserved against a limit (request messages held by the whole server). */
export class ByteBudget {
  #used = 0;

  constructor(readonly limit: number) {}

  get used(): number {
    return this.#used;
  }

  reserve(bytes: number): boolean {
    if (this.#used + bytes > this.limit) return false;
    this.#used += bytes;
    return true;
  }

  release(bytes: number): void {
    this.#used -= bytes;
  }
}

/** Delays between retries of a failing operation: doubling from `firstMs` to `maxMs`, reset on success. */
export class Backoff {
  #next: number;

  constructor(private readonly firstMs = 10, private readonly maxMs = 1000) {
    this.#next = firstMs;
  }

  nextDelay(): number {
    const delay = this.#next;
    this.#next = Math.min(this.maxMs, this.#next * 2);
    return delay;
  }

  reset(): void {
    this.#next = this.firstMs;
  }
}

/** Something parked in a SendHeap: its key is the stream's flow-control credit. */
export interface Parked {
  /** Window the stream has left beyond the peer's initial window (may be negative). */
  sendCredit: number;
  /** In the heap now (entries of streams that left are skipped lazily). */
  parked: boolean;
}

/**
 * Streams whose response data waits for their own send window, by credit, highest first. When the
 * peer raises SETTINGS_INITIAL_WINDOW_SIZE, exactly the streams it unblocks are popped: the work is
 * proportional to the streams that can send, never to all streams of the connection.
 */
export class SendHeap<T extends Parked> {
  #entries: { item: T; credit: number }[] = [];
  #live = 0;

  get size(): number {
    return this.#live;
  }

  park(item: T): void {
    if (item.parked) return;
    item.parked = true;
    this.#live++;
    this.#push({ item, credit: item.sendCredit });
    // Entries left behind by streams that were unparked or whose credit moved: rebuild now and then.
    if (this.#entries.length > 2 * this.#live + 64) {
      this.#entries = this.#entries.filter((e) => e.item.parked && e.credit === e.item.sendCredit);
      const entries = this.#entries;
      this.#entries = [];
      for (const entry of entries) this.#push(entry);
    }
  }

  /** The stream left the heap by itself (its own WINDOW_UPDATE, reset or end). */
  unpark(item: T): void {
    if (!item.parked) return;
    item.parked = false;
    this.#live--;
  }

  /** Pops every parked item whose credit is above `minCredit`. */
  popAbove(minCredit: number): T[] {
    const out: T[] = [];
    while (this.#entries.length > 0) {
      const top = this.#entries[0];
      const stale = !top.item.parked || top.credit !== top.item.sendCredit;
      if (!stale && top.credit <= minCredit) break;
      this.#pop();
      if (stale) continue;
      this.unpark(top.item);
      out.push(top.item);
    }
    return out;
  }

  #push(entry: { item: T; credit: number }): void {
    const a = this.#entries;
    a.push(entry);
    let i = a.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (a[parent].credit >= a[i].credit) break;
      [a[parent], a[i]] = [a[i], a[parent]];
      i = parent;
    }
  }

  #pop(): void {
    const a = this.#entries;
    const last = a.pop()!;
    if (a.length === 0) return;
    a[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let best = i;
      if (l < a.length && a[l].credit > a[best].credit) best = l;
      if (r < a.length && a[r].credit > a[best].credit) best = r;
      if (best === i) return;
      [a[best], a[i]] = [a[i], a[best]];
      i = best;
    }
  }
}
