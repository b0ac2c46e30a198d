// Seeded fuzz targets for the transport's parsers (run by tests/transport_fuzz_test.ts, each in a
// worker so that even an endless loop is caught): the HTTP/2 connection's frame handling (Incoming
// and the whole per-connection state machine, driven over an in-memory Deno.Conn), the HPACK
// decoder, the request header rules and the gRPC message reader. Inputs are generated from valid
// seeds (well-formed frames and requests, RFC 7541's examples, gRPC messages) and mutated, plus
// random bytes. Only the documented errors may come out (ConnectionError, CompressionError, a
// stream reset, a message problem) and memory stays bounded. Each target stores the index of the
// input it is on in `at[0]`, and throws with the seed and the input's bytes on a failure.

import assert from "node:assert/strict";
import { Status } from "../../src/errors.ts";
import {
  ALIGN_HEAD_BYTES,
  concat,
  ConnectionError,
  DEFAULT_MAX_FRAME,
  DEFAULT_WINDOW,
  FLAG_ACK,
  FLAG_END_HEADERS,
  FLAG_END_STREAM,
  FLAG_PADDED,
  FLAG_PRIORITY,
  frame,
  FrameBuffer,
  FrameType,
  grpcRequestHeaders,
  Incoming,
  MessageReader,
  PREFACE,
  SETTINGS_INITIAL_WINDOW_SIZE,
  SETTINGS_MAX_FRAME_SIZE,
  settingsFrame,
  u32Payload,
} from "../../src/transport/frames.ts";
import { CompressionError, encodeHeaders, type Header, HpackDecoder } from "../../src/transport/hpack.ts";
import { Connection, GrpcServer } from "../../src/transport/http2.ts";
import { parseRequestHeaders, trailersProblem } from "../../src/transport/request_headers.ts";

/** The run's seed: every input derives from it and its index alone. */
let SEED = 0;

export function setSeed(seed: number): void {
  SEED = seed;
}
/** mulberry32: a small, fast PRNG; one stream per (seed, target, input index) so any input replays alone. */
class Rng {
  #state: number;
  constructor(seed: number) {
    this.#state = seed >>> 0;
  }
  next(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i += 4) {
      const word = this.next() * 4294967296;
      for (let j = 0; j < 4 && i + j < n; j++) out[i + j] = word >>> (8 * j);
    }
    return out;
  }
}

function rngFor(target: number, index: number): Rng {
  return new Rng(Math.imul(SEED ^ Math.imul(target + 1, 0x9e3779b1), 0x85ebca6b) ^ Math.imul(index, 0xc2b2ae35));
}

function hex(text: string): Uint8Array {
  const clean = text.replace(/\s+/g, "");
  return Uint8Array.from({ length: clean.length / 2 }, (_, i) => parseInt(clean.slice(2 * i, 2 * i + 2), 16));
}

function toHex(bytes: Uint8Array): string {
  return Array.from(bytes.subarray(0, 4096), (b) => b.toString(16).padStart(2, "0")).join("");
}

const INTERESTING = [0, 1, 0x7f, 0x80, 0xff, 0x3f, 0x40, 0x1f, 0x20, 0x0f, 0x10, 0xfe];

/** One to a few byte-level mutations: flips, interesting values, inserts, deletions, duplications, splices. */
function mutate(rng: Rng, input: Uint8Array, others: readonly Uint8Array[]): Uint8Array {
  let bytes: Uint8Array = input.slice();
  const rounds = 1 + rng.int(4);
  for (let r = 0; r < rounds; r++) {
    const at = rng.int(bytes.length + 1);
    switch (rng.int(8)) {
      case 0:
        if (bytes.length > 0) bytes[Math.min(at, bytes.length - 1)] ^= 1 << rng.int(8);
        break;
      case 1:
        if (bytes.length > 0) bytes[Math.min(at, bytes.length - 1)] = rng.pick(INTERESTING);
        break;
      case 2:
        bytes = concat([bytes.subarray(0, at), rng.bytes(1 + rng.int(8)), bytes.subarray(at)]);
        break;
      case 3:
        bytes = concat([bytes.subarray(0, at), bytes.subarray(at + 1 + rng.int(8))]);
        break;
      case 4: {
        const end = Math.min(bytes.length, at + 1 + rng.int(32));
        bytes = concat([bytes.subarray(0, end), bytes.subarray(at, end), bytes.subarray(end)]);
        break;
      }
      case 5: {
        const other = rng.pick(others);
        const from = rng.int(other.length + 1);
        bytes = concat([bytes.subarray(0, at), other.subarray(from, from + 1 + rng.int(64))]);
        break;
      }
      case 6:
        bytes = bytes.subarray(0, at);
        break;
      default:
        if (bytes.length >= 4) {
          // A 32-bit field (lengths, ids, increments) set to an edge value.
          const value = rng.pick([0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 16384, 16385, 65535, 2 ** 24 - 1]);
          new DataView(bytes.buffer, bytes.byteOffset).setUint32(Math.min(at, bytes.length - 4), value);
        }
    }
  }
  return bytes;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Splits bytes into 1..6 chunks at random places (socket reads arrive in any sizes). */
function chunked(rng: Rng, bytes: Uint8Array): Uint8Array[] {
  const cuts = Array.from({ length: rng.int(6) }, () => rng.int(bytes.length + 1)).sort((a, b) => a - b);
  const chunks: Uint8Array[] = [];
  let last = 0;
  for (const cut of [...cuts, bytes.length]) {
    if (cut > last) chunks.push(bytes.subarray(last, cut));
    last = cut;
  }
  return chunks;
}

// --- Generators of valid (and nearly valid) inputs ---

const PATHS = ["/fuzz.Service/Unary", "/fuzz.Service/Stream", "/fuzz.Service/Nope", "/", "*"];
const NAMES = [
  ":method",
  ":scheme",
  ":path",
  ":authority",
  ":status",
  ":protocol",
  "content-type",
  "te",
  "grpc-timeout",
  "grpc-encoding",
  "content-length",
  "connection",
  "host",
  "user-agent",
  "X-Upper",
  "x-bin",
];
const VALUES = [
  "POST",
  "GET",
  "CONNECT",
  "http",
  "trailers",
  "application/grpc",
  "identity",
  "gzip",
  "5",
  "0",
  "",
  " x",
];

function requestHeaders(rng: Rng): Header[] {
  const headers: Header[] = [
    [":method", "POST"],
    [":scheme", "http"],
    [":path", rng.pick(PATHS)],
    [":authority", "localhost"],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
  ];
  // Sometimes break a rule: a random field anywhere, a dropped or duplicated one.
  for (let i = rng.chance(0.4) ? 1 + rng.int(2) : 0; i > 0; i--) {
    const field: Header = [rng.pick(NAMES), rng.chance(0.2) ? String(rng.int(100)) : rng.pick(VALUES)];
    headers.splice(rng.int(headers.length + 1), 0, field);
  }
  if (rng.chance(0.1)) headers.splice(rng.int(headers.length), 1);
  return headers;
}

function grpcMessage(rng: Rng, length = rng.int(64)): Uint8Array {
  const message = new Uint8Array(5 + length);
  new DataView(message.buffer).setUint32(1, length);
  message.set(rng.bytes(length), 5);
  return message;
}

const STREAM_IDS = [0, 1, 1, 1, 3, 3, 5, 2, 7, 0x7fffffff];

/** The streams a generated connection has opened, so later frames mostly land on them. */
class Script {
  last = 0;
  stream(rng: Rng, opening: boolean): number {
    if (rng.chance(0.25)) return rng.pick(STREAM_IDS);
    if (opening && (this.last === 0 || rng.chance(0.6))) this.last += 2 - (this.last === 0 ? 1 : 0);
    return this.last || 1;
  }
}

/** A frame of any type with plausible contents, mostly on the streams `script` opened. */
function anyFrame(rng: Rng, script = new Script()): Uint8Array {
  const kind = rng.int(12);
  const stream = script.stream(rng, kind <= 1);
  switch (kind) {
    case 0:
    case 1: {
      let flags = FLAG_END_HEADERS | (rng.chance(0.5) ? FLAG_END_STREAM : 0);
      // A request on a new stream; on an open one, trailers (sometimes with a pseudo-header).
      const trailers: Header[] = [["x-trailer", "1"], ...(rng.chance(0.2) ? [[":path", "/"] as Header] : [])];
      let block = encodeHeaders(stream === script.last && rng.chance(0.3) ? trailers : requestHeaders(rng));
      if (rng.chance(0.15)) {
        flags |= FLAG_PRIORITY;
        block = concat([u32Payload(rng.pick([0, stream, 3])), Uint8Array.of(rng.int(256)), block]);
      }
      if (rng.chance(0.1)) {
        flags |= FLAG_PADDED;
        const pad = rng.int(8);
        block = concat([Uint8Array.of(pad), block, new Uint8Array(pad)]);
      }
      if (rng.chance(0.2)) {
        // Split into HEADERS + CONTINUATION.
        const cut = rng.int(block.length + 1);
        return concat([
          frame(FrameType.HEADERS, flags & ~FLAG_END_HEADERS, stream, block.subarray(0, cut)),
          frame(FrameType.CONTINUATION, FLAG_END_HEADERS, stream, block.subarray(cut)),
        ]);
      }
      return frame(FrameType.HEADERS, flags, stream, block);
    }
    case 2:
    case 3:
      return frame(FrameType.DATA, rng.chance(0.5) ? FLAG_END_STREAM : 0, stream, grpcMessage(rng));
    case 4:
      return settingsFrame(
        Array.from({ length: rng.int(4) }, () => [1 + rng.int(7), rng.pick([0, 1, 2, 100, 16384, 65535, 2 ** 31])]),
      );
    case 5:
      return frame(FrameType.WINDOW_UPDATE, 0, stream, u32Payload(rng.pick([0, 1, 1000, 0x7fffffff])));
    case 6:
      return frame(FrameType.RST_STREAM, 0, stream, u32Payload(rng.int(14)));
    case 7:
      return frame(FrameType.PING, rng.int(2), 0, rng.bytes(8));
    case 8:
      return frame(FrameType.PRIORITY, 0, stream, concat([u32Payload(rng.pick([0, 1, stream])), rng.bytes(1)]));
    case 9:
      return frame(FrameType.GOAWAY, 0, 0, u32Payload(rng.int(10), rng.int(12)));
    case 10:
      return frame(FrameType.CONTINUATION, rng.chance(0.5) ? FLAG_END_HEADERS : 0, stream, rng.bytes(rng.int(8)));
    default:
      return frame(rng.int(16), rng.int(256), stream, rng.bytes(rng.int(16)));
  }
}

/** A typical well-behaved connection: a unary call and a streaming call. */
function validConnection(rng: Rng): Uint8Array {
  const call = (stream: number, path: string) => [
    frame(
      FrameType.HEADERS,
      FLAG_END_HEADERS,
      stream,
      encodeHeaders(grpcRequestHeaders(path)),
    ),
    frame(FrameType.DATA, FLAG_END_STREAM, stream, grpcMessage(rng)),
  ];
  return concat([
    settingsFrame([[4, 65535], [2, 0]]),
    ...call(1, PATHS[0]),
    frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(1000)),
    ...call(3, PATHS[1]),
    frame(FrameType.PING, 0, 0, rng.bytes(8)),
  ]);
}

const VALID_CONNECTIONS = Array.from({ length: 16 }, (_, i) => validConnection(new Rng(i + 1)));

function connectionInput(rng: Rng): Uint8Array {
  const kind = rng.int(10);
  if (kind === 0) return concat([PREFACE, rng.bytes(rng.int(256))]);
  if (kind === 1) return mutate(rng, concat([PREFACE, rng.pick(VALID_CONNECTIONS)]), VALID_CONNECTIONS);
  const script = new Script();
  const frames = concat(Array.from({ length: 1 + rng.int(10) }, () => anyFrame(rng, script)));
  const body = kind < 6 ? frames : mutate(rng, frames, VALID_CONNECTIONS);
  return concat([PREFACE, body]);
}

// --- The connection, driven in memory ---

/** A Deno.Conn whose reads return the given chunks, then end; what is written is kept. */
function memoryConn(chunks: Uint8Array[]): { conn: Deno.Conn; output: () => Uint8Array; closed: Promise<void> } {
  const written: Uint8Array[] = [];
  const queue = [...chunks];
  const closed = Promise.withResolvers<void>();
  const conn = {
    read(buffer: Uint8Array): Promise<number | null> {
      const next = queue.shift();
      if (!next) return Promise.resolve(null);
      const count = Math.min(next.length, buffer.length);
      buffer.set(next.subarray(0, count));
      if (count < next.length) queue.unshift(next.subarray(count));
      return Promise.resolve(count);
    },
    write(chunk: Uint8Array): Promise<number> {
      written.push(chunk.slice());
      return Promise.resolve(chunk.length);
    },
    close() {
      closed.resolve();
    },
  };
  return { conn: conn as unknown as Deno.Conn, output: () => concat(written), closed: closed.promise };
}

interface ParsedFrame {
  type: number;
  flags: number;
  stream: number;
  payload: Uint8Array;
}

/** The whole frames in `bytes`, up to the first that is too large or cut short. */
function framesOf(bytes: Uint8Array): ParsedFrame[] {
  const frames: ParsedFrame[] = [];
  const incoming = new Incoming();
  incoming.push(bytes);
  try {
    incoming.takeFrames(2 ** 24 - 1, (type, flags, stream, payload) => frames.push({ type, flags, stream, payload }));
  } catch { /* the frames before the fault */ }
  return frames;
}

const u32At = (payload: Uint8Array, at: number) => new DataView(payload.buffer, payload.byteOffset).getUint32(at);

/**
 * Whatever the client sent, what the server sent back is valid HTTP/2 towards it: frames only on
 * streams the client opened, nothing on a stream after the server ended or reset it, nothing after
 * GOAWAY, frames within the client's frame size, DATA within the windows the client gave. Returns
 * the first breach, or null.
 */
function outputProblem(input: Uint8Array, output: Uint8Array): string | null {
  // Upper bounds over everything the client sent (the server may have stopped reading earlier):
  // a stream's window is at most the largest initial window in force while it was open, plus
  // every increment the client gave it.
  const windowBound = new Map<number, number>();
  const opened = windowBound;
  const credit = new Map<number, number>();
  let initialWindow = DEFAULT_WINDOW;
  let maxFrame = DEFAULT_MAX_FRAME;
  for (const f of framesOf(input.subarray(PREFACE.length))) {
    if (f.type === FrameType.HEADERS && f.stream % 2 === 1 && !opened.has(f.stream)) {
      windowBound.set(f.stream, initialWindow);
    }
    if (f.type === FrameType.WINDOW_UPDATE && f.payload.length === 4) {
      credit.set(f.stream, (credit.get(f.stream) ?? 0) + (u32At(f.payload, 0) & 0x7fffffff));
    }
    if (f.type === FrameType.SETTINGS && !(f.flags & FLAG_ACK)) {
      for (let at = 0; at + 6 <= f.payload.length; at += 6) {
        const id = (f.payload[at] << 8) | f.payload[at + 1];
        if (id === SETTINGS_INITIAL_WINDOW_SIZE) {
          initialWindow = u32At(f.payload, at + 2);
          for (const [stream, bound] of windowBound) windowBound.set(stream, Math.max(bound, initialWindow));
        }
        if (id === SETTINGS_MAX_FRAME_SIZE) maxFrame = Math.max(maxFrame, u32At(f.payload, at + 2));
      }
    }
  }
  const sent = new Map<number, number>();
  const ended = new Set<number>();
  const reset = new Set<number>();
  let goaway = false;
  for (const f of framesOf(output)) {
    const what = `server frame type ${f.type} on stream ${f.stream}`;
    if (goaway) return `${what} after its GOAWAY`;
    if (f.payload.length > maxFrame) return `${what} of ${f.payload.length} bytes`;
    if (f.type === FrameType.GOAWAY) goaway = true;
    if (f.stream === 0) continue;
    if (!opened.has(f.stream)) return `${what}, a stream the client never opened`;
    if (reset.has(f.stream)) return `${what} after the server reset it`;
    if (f.type === FrameType.RST_STREAM) reset.add(f.stream);
    if (f.type === FrameType.HEADERS || f.type === FrameType.DATA) {
      if (ended.has(f.stream)) return `${what} after the server ended it`;
      if (f.flags & FLAG_END_STREAM) ended.add(f.stream);
    }
    if (f.type === FrameType.DATA) {
      sent.set(f.stream, (sent.get(f.stream) ?? 0) + f.payload.length);
      sent.set(0, (sent.get(0) ?? 0) + f.payload.length);
    }
  }
  for (const [stream, bytes] of sent) {
    const window = (stream === 0 ? DEFAULT_WINDOW : windowBound.get(stream)!) + (credit.get(stream) ?? 0);
    if (bytes > window) return `${bytes} bytes of DATA on stream ${stream}, beyond its window of ${window}`;
  }
  return null;
}

function fuzzServer(reports: string[]): GrpcServer {
  return new GrpcServer({
    methods: new Map([[PATHS[0], (request) => Promise.resolve({ message: request })]]),
    streams: new Map([[PATHS[1], async function* (requests) {
      for await (const request of requests) yield request;
    }]]),
    maxMessageBytes: 1024,
    onConnectionError: (message) => reports.push(message),
  });
}

/** What a bug looks like from outside: an exception other than the protocol's own errors. */
const UNEXPECTED = /^\w*Error: /;

function rssMiB(): number {
  return Deno.memoryUsage().rss / 2 ** 20;
}

/** HTTP/2 connections (frames, stream states, headers, messages) end only in protocol errors */
export async function connections(count: number, at: Int32Array): Promise<string> {
  const reports: string[] = [];
  const server = fuzzServer(reports);
  const rssBefore = rssMiB();
  let reported = 0;
  let input: Uint8Array = new Uint8Array(0);
  const replay = () => `(FUZZ_SEED=${SEED}): ${toHex(input)}`;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(0, i);
    input = connectionInput(rng);
    const { conn, output, closed } = memoryConn(chunked(rng, input));
    reports.length = 0;
    await new Connection(conn, server).serve();
    await closed;
    const bug = reports.find((r) => UNEXPECTED.test(r));
    if (bug) assert.fail(`${bug}\ninput ${i} ${replay()}`);
    if (reports.length > 0) reported++;
    const written = output();
    if (written.length > 1024 * 1024) assert.fail(`wrote ${written.length} bytes for input ${i} ${replay()}`);
    const problem = outputProblem(input, written);
    if (problem) assert.fail(`${problem}\ninput ${i} ${replay()}`);
  }
  // Let handlers started by the last inputs settle, then every call must have left the count.
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(await server.stop(0), [], "calls still counted in flight after every connection closed");
  const growth = rssMiB() - rssBefore;
  assert.ok(reported > count / 10 && reported < count, "inputs reach both outcomes");
  // GC slack, not a leak: after a forced GC the heap stays flat over 100,000 connections.
  assert.ok(growth < 400, `RSS grew by ${growth.toFixed(0)} MiB`);
  return `${count} connections, ${reported} ended in a protocol error or reset, RSS +${growth.toFixed(0)} MiB`;
}

/** Incoming reassembles frames from any split of the byte stream, and refuses oversized ones */
export function incoming(count: number, at: Int32Array): string {
  let whole = 0;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(1, i);
    const frames = Array.from({ length: 1 + rng.int(6) }, () => anyFrame(rng));
    const mutated = rng.chance(0.3);
    const bytes = mutated ? mutate(rng, concat(frames), VALID_CONNECTIONS) : concat(frames);
    const incoming = new Incoming();
    const seen: Uint8Array[] = [];
    try {
      for (const chunk of chunked(rng, bytes)) {
        incoming.push(chunk);
        incoming.takeFrames(16384, (type, flags, stream, payload) => {
          seen.push(concat([frame(type, flags, stream, payload)]));
        });
      }
    } catch (error) {
      if (!(error instanceof ConnectionError)) throw new Error(`input ${i} (FUZZ_SEED=${SEED}): ${error}`);
      continue;
    }
    if (!mutated) {
      // Reserved bit of stream ids aside, the frames come out exactly as they went in.
      if (!equalBytes(concat(seen), bytes) || incoming.length !== 0) {
        assert.fail(`frames came out differently: input ${i} (FUZZ_SEED=${SEED}): ${toHex(bytes)}`);
      }
      whole++;
    }
  }
  return `${count} byte streams, ${whole} reassembled exactly`;
}

/** Bytes (header included) of the largest frame whose header lies within the first `end` bytes. */
function largestFrame(bytes: Uint8Array, end: number): number {
  let largest = 0;
  for (let at = 0; at + 9 <= end; at += 9 + ((bytes[at] << 16) | (bytes[at + 1] << 8) | bytes[at + 2])) {
    largest = Math.max(largest, 9 + ((bytes[at] << 16) | (bytes[at + 1] << 8) | bytes[at + 2]));
  }
  return largest;
}

/**
 * The server's FrameBuffer, read into as a socket would fill it (any room, any read size), gives the
 * same frames as the bytes sent, refuses oversized ones, and never holds more than its bound or the
 * largest frame begun, and goes back to its small size when reads are small.
 */
export function frameBuffer(count: number, at: Int32Array): string {
  let whole = 0;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(5, i);
    const frames = Array.from({ length: 1 + rng.int(6) }, () => anyFrame(rng));
    const mutated = rng.chance(0.3);
    const bytes = mutated ? mutate(rng, concat(frames), VALID_CONNECTIONS) : concat(frames);
    // Small bounds, so growing, moving and shrinking all happen within a few frames.
    const minBytes = 16 + rng.int(64);
    const maxBytes = minBytes + rng.int(1024);
    const maxFrame = 16384;
    const buffer = new FrameBuffer(minBytes, maxBytes);
    const seen: Uint8Array[] = [];
    let offset = 0;
    let quiet = false;
    try {
      while (offset < bytes.length) {
        const room = buffer.space();
        if (room.length === 0) assert.fail(`no room to read: input ${i} (FUZZ_SEED=${SEED})`);
        // A small read (not for lack of room) that left nothing buffered: back to the small size (what an idle connection holds).
        if (quiet && buffer.capacity !== minBytes) {
          assert.fail(`${buffer.capacity} bytes held after a quiet read: input ${i} (FUZZ_SEED=${SEED})`);
        }
        const count = Math.min(room.length, bytes.length - offset, 1 + rng.int(4096));
        room.set(bytes.subarray(offset, offset + count));
        buffer.filled(count);
        offset += count;
        if (buffer.capacity > Math.max(maxBytes, largestFrame(bytes, offset))) {
          assert.fail(`buffer of ${buffer.capacity} bytes: input ${i} (FUZZ_SEED=${SEED})`);
        }
        buffer.takeFrames(maxFrame, (type, flags, stream, payload) => {
          seen.push(concat([frame(type, flags, stream, payload)]));
        });
        quiet = count < minBytes / 2 && count < room.length && buffer.length === 0;
      }
    } catch (error) {
      if (!(error instanceof ConnectionError)) throw new Error(`input ${i} (FUZZ_SEED=${SEED}): ${error}`);
      continue;
    }
    if (!mutated) {
      if (!equalBytes(concat(seen), bytes) || buffer.length !== 0) {
        assert.fail(`frames came out differently: input ${i} (FUZZ_SEED=${SEED}): ${toHex(bytes)}`);
      }
      whole++;
    }
  }
  return `${count} byte streams, ${whole} read back exactly`;
}

const RFC7541_BLOCKS = [
  "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
  "040c 2f73 616d 706c 652f 7061 7468",
  "1008 7061 7373 776f 7264 0673 6563 7265 74",
  "82",
  "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
  "8286 84be 5808 6e6f 2d63 6163 6865",
  "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
  "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
  "8286 84be 5886 a8eb 1064 9cbf",
  "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
  "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
  "3fe1 1f82", // a table size update, then an index
].map(hex);

/** the HPACK decoder only answers headers or CompressionError, with its table bounded */
export function hpack(count: number, at: Int32Array): string {
  let decoded = 0;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(2, i);
    // A sequence of blocks on one decoder, so the dynamic table carries state between them.
    const decoder = new HpackDecoder(rng.pick([0, 256, 4096]), rng.pick([256, 65536]));
    for (let b = 1 + rng.int(3); b > 0; b--) {
      // Whole valid blocks keep the table in use; mutated ones and random bytes probe the rules.
      const kind = rng.int(5);
      const seed = kind === 0 || kind === 2 ? encodeHeaders(requestHeaders(rng)) : rng.pick(RFC7541_BLOCKS);
      const block = kind === 4 ? rng.bytes(rng.int(64)) : kind < 2 ? seed : mutate(rng, seed, RFC7541_BLOCKS);
      try {
        const headers = decoder.decode(block);
        decoded++;
        for (const [name, value] of headers) assert.ok(typeof name === "string" && typeof value === "string");
      } catch (error) {
        if (!(error instanceof CompressionError)) {
          throw new Error(`input ${i} (FUZZ_SEED=${SEED}) ${toHex(block)}: ${error}`);
        }
      }
    }
  }
  assert.ok(decoded > count / 10, `only ${decoded} blocks decoded: the mutations are too destructive`);
  return `${count} decoders, ${decoded} blocks decoded`;
}

/** request header rules answer a head or a reason for any header list, never throw */
export function headers(count: number, at: Int32Array): string {
  let wellFormed = 0;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(3, i);
    const headers = requestHeaders(rng);
    if (rng.chance(0.3)) {
      // Arbitrary characters in a name or value.
      const at = rng.int(headers.length);
      const text = String.fromCharCode(...rng.bytes(1 + rng.int(6)));
      headers[at] = rng.chance(0.5) ? [text, headers[at][1]] : [headers[at][0], text];
    }
    const head = parseRequestHeaders(headers);
    if ("malformed" in head) {
      assert.ok(head.malformed.length > 0);
    } else {
      wellFormed++;
      assert.ok(head.method.length > 0 && (head.method === "CONNECT" || head.path.length > 0));
    }
    const trailers = trailersProblem(headers.filter(([n]) => !n.startsWith(":")));
    assert.ok(trailers === null || typeof trailers === "string");
  }
  assert.ok(wellFormed > count / 10 && wellFormed < count, `${wellFormed} well-formed`);
  return `${count} header lists, ${wellFormed} well-formed`;
}

/** MessageReader assembles any split of a message, and reports problems instead of throwing */
export function messages(count: number, at: Int32Array): string {
  const second = { status: Status.UNIMPLEMENTED, details: "second message" };
  let complete = 0;
  for (let i = 0; i < count; i++) {
    Atomics.store(at, 0, i);
    const rng = rngFor(4, i);
    const original = grpcMessage(rng, rng.int(rng.chance(0.05) ? 3000 : 40));
    const mutated = rng.chance(0.5);
    const bytes = mutated ? mutate(rng, original, [original, grpcMessage(rng)]) : original;
    let budget = rng.pick([0, 100, 1_000_000]);
    const reader = new MessageReader(4096, {
      reserve: (n) => {
        if (n > budget) return { status: Status.RESOURCE_EXHAUSTED, details: "budget" };
        budget -= n;
        return null;
      },
      secondMessage: second,
    });
    // Half the readers place the message for an offset named from its first bytes.
    let asked: { head: Uint8Array; offset: number | null } | null = null;
    if (rng.chance(0.5)) {
      const minBytes = rng.int(64);
      const pick = rng.int(4);
      reader.alignment = {
        minBytes,
        offsetOf: (head) => {
          const offset = pick === 0 ? null : pick === 1 ? -1 : rng.int(head.length + 8);
          asked = { head: head.slice(), offset };
          return offset;
        },
      };
    }
    const replay = () => `input ${i} (FUZZ_SEED=${SEED}): ${toHex(bytes)}`;
    try {
      for (const chunk of chunked(rng, bytes)) reader.push(chunk);
    } catch (error) {
      throw new Error(`${error}: ${replay()}`);
    }
    if (reader.complete && !reader.problem) {
      complete++;
      const length = new DataView(bytes.buffer, bytes.byteOffset).getUint32(1);
      if (bytes.length !== 5 + length || !equalBytes(reader.message, bytes.subarray(5))) {
        assert.fail(`the message assembled differs from the one sent: ${replay()}`);
      }
      const placed = asked as { head: Uint8Array; offset: number | null } | null;
      if (placed) {
        if (!equalBytes(placed.head, bytes.subarray(5, 5 + Math.min(length, ALIGN_HEAD_BYTES)))) {
          assert.fail(`the alignment saw other bytes than the message's first: ${replay()}`);
        }
        const { offset } = placed;
        if (offset !== null && offset >= 0 && offset <= length && (reader.message.byteOffset + offset) % 8 !== 0) {
          assert.fail(`offset ${offset} is not 8-aligned: ${replay()}`);
        }
      }
    } else if (!mutated && reader.problem === null) {
      assert.fail(`a whole message was not assembled: ${replay()}`);
    }
  }
  assert.ok(complete > count / 4, `only ${complete} messages complete`);
  return `${count} messages, ${complete} assembled`;
}
