// A raw HTTP/2 peer for attack tests: writes hand-made frames on its own Unix-socket connection and
// reads what the agent answers (in particular the GOAWAY code), or deliberately reads nothing.

import { encodeHeaders } from "../../src/transport/hpack.ts";
import { concat, frame, grpcRequestHeaders, PREFACE } from "../../src/transport/frames.ts";
import { SERVICE_NAME } from "../../src/service/wire.ts";

// Encoding a frame is plain byte layout; what the attacks test is the agent's reading of them.
export { concat, PREFACE } from "../../src/transport/frames.ts";

export const enum T {
  DATA = 0,
  HEADERS = 1,
  PRIORITY = 2,
  RST_STREAM = 3,
  SETTINGS = 4,
  PING = 6,
  GOAWAY = 7,
  WINDOW_UPDATE = 8,
  CONTINUATION = 9,
}

export const ENHANCE_YOUR_CALM = 11;
export const NO_ERROR = 0;

/** A frame of any type, flags and stream: also ones the agent must refuse. */
export function frameOf(type: number, flags: number, stream: number, payload?: Uint8Array): Uint8Array {
  return frame(type, flags, stream, payload);
}

export function u32(...values: number[]): Uint8Array {
  const out = new Uint8Array(4 * values.length);
  values.forEach((v, i) => new DataView(out.buffer).setUint32(4 * i, v));
  return out;
}

export function settingsOf(settings: [number, number][] = []): Uint8Array {
  const payload = new Uint8Array(6 * settings.length);
  settings.forEach(([id, value], i) => {
    new DataView(payload.buffer).setUint16(6 * i, id);
    new DataView(payload.buffer).setUint32(6 * i + 2, value);
  });
  return frameOf(T.SETTINGS, 0, 0, payload);
}

/** A request's header block for `path` (default: the Agent's ListModels). */
export function requestHeaders(path = `/${SERVICE_NAME}/ListModels`): Uint8Array {
  return encodeHeaders(grpcRequestHeaders(path));
}

/** One gRPC message (length-prefixed). */
export function grpcMessage(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(5 + body.length);
  new DataView(out.buffer).setUint32(1, body.length);
  out.set(body, 5);
  return out;
}

/** A whole unary call on `stream`: HEADERS, then an empty request message with END_STREAM. */
export function unaryCall(stream: number, path?: string): Uint8Array {
  return concat([
    frameOf(T.HEADERS, 0x4, stream, requestHeaders(path)),
    frameOf(T.DATA, 0x1, stream, grpcMessage(new Uint8Array(0))),
  ]);
}

export interface Frame {
  type: number;
  flags: number;
  stream: number;
  payload: Uint8Array;
}

/** A connection to the agent driven frame by frame. */
export class RawPeer {
  readonly frames: Frame[] = [];
  /** The agent closed the connection (EOF or reset). */
  closed = false;
  readonly done: Promise<void>;
  #buffer: Uint8Array = new Uint8Array(0);
  #changed = new EventTarget();

  private constructor(readonly conn: Deno.UnixConn, read: boolean) {
    this.done = read ? this.#readLoop() : Promise.resolve();
  }

  /** Connects; with `read` false nothing is ever read (a client that does not read). */
  static async open(socket: string, options: { read?: boolean; preface?: boolean } = {}): Promise<RawPeer> {
    const conn = await Deno.connect({ transport: "unix", path: socket });
    const peer = new RawPeer(conn, options.read ?? true);
    if (options.preface ?? true) await peer.write(concat([PREFACE, settingsOf()]));
    return peer;
  }

  /** Writes; false once the agent has closed the connection. */
  async write(bytes: Uint8Array): Promise<boolean> {
    try {
      let offset = 0;
      while (offset < bytes.length) offset += await this.conn.write(bytes.subarray(offset));
      return true;
    } catch {
      this.closed = true;
      return false;
    }
  }

  /** Writes `bytes` until the agent closes the connection, `stop()` says so, or `ms` pass. */
  async flood(bytes: Uint8Array, ms: number, stop: () => boolean = () => this.goAway !== null): Promise<number> {
    const end = performance.now() + ms;
    let count = 0;
    while (performance.now() < end && !stop() && !this.closed) {
      const written = await Promise.race([
        this.write(bytes),
        new Promise<false>((resolve) => setTimeout(() => resolve(false), Math.max(1, end - performance.now()))),
      ]);
      if (!written) break;
      count++;
    }
    return count;
  }

  /** The error code of the GOAWAY the agent sent, or null. */
  get goAway(): number | null {
    const frame = this.frames.find((f) => f.type === T.GOAWAY);
    return frame ? new DataView(frame.payload.buffer, frame.payload.byteOffset).getUint32(4) : null;
  }

  /** Resolves once `match` holds, or rejects after `ms`. */
  waitFor(match: () => boolean, ms: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!match()) return;
        clearTimeout(timer);
        this.#changed.removeEventListener("change", check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.#changed.removeEventListener("change", check);
        reject(new Error(`${what}: not seen within ${ms} ms (frames: ${this.frames.map((f) => f.type)})`));
      }, ms);
      this.#changed.addEventListener("change", check);
      check();
    });
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }

  async #readLoop(): Promise<void> {
    const chunk = new Uint8Array(65536);
    try {
      for (;;) {
        const n = await this.conn.read(chunk);
        if (n === null) break;
        this.#buffer = concat([this.#buffer, chunk.subarray(0, n)]);
        this.#parse();
        this.#changed.dispatchEvent(new Event("change"));
      }
    } catch { /* reset by the agent, or closed by us */ }
    this.closed = true;
    this.#changed.dispatchEvent(new Event("change"));
  }

  #parse(): void {
    let pos = 0;
    const b = this.#buffer;
    while (pos + 9 <= b.length) {
      const length = (b[pos] << 16) | (b[pos + 1] << 8) | b[pos + 2];
      if (pos + 9 + length > b.length) break;
      const stream = new DataView(b.buffer, b.byteOffset + pos + 5, 4).getUint32(0) & 0x7fffffff;
      // Only what tests look at is kept: DATA payloads are dropped (a flood's answers add up).
      const payload = b[pos + 3] === T.DATA ? new Uint8Array(0) : b.slice(pos + 9, pos + 9 + length);
      this.frames.push({ type: b[pos + 3], flags: b[pos + 4], stream, payload });
      if (this.frames.length > 10000) this.frames.splice(1, 5000);
      pos += 9 + length;
    }
    this.#buffer = b.slice(pos);
  }
}

/** The agent's resident memory in MiB (VmRSS of /proc/<pid>/status). */
export function rssMiB(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = Number(/VmRSS:\s+(\d+)\s+kB/.exec(status)?.[1]);
  return kb / 1024;
}

/**
 * How long `pid`'s main thread (the agent's event loop) has waited for a CPU, in ms: the second field of
 * /proc/<pid>/schedstat. On a loaded machine this is the part of a wait the agent could do nothing about.
 */
export function runQueueWaitMs(pid: number): number {
  return Number(Deno.readTextFileSync(`/proc/${pid}/schedstat`).split(" ")[1]) / 1e6;
}
