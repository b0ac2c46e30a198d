// HTTP/2 framing (RFC 9113) and gRPC's message and status encoding, shared by the agent's server
// and its command-line client.

import { Status } from "../errors.ts";
import { CompressionError, type Header, type HpackDecoder } from "./hpack.ts";
import type { BufferPool, Lease } from "./buffers.ts";

export const PREFACE = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

export const enum FrameType {
  DATA = 0,
  HEADERS = 1,
  PRIORITY = 2,
  RST_STREAM = 3,
  SETTINGS = 4,
  PUSH_PROMISE = 5,
  PING = 6,
  GOAWAY = 7,
  WINDOW_UPDATE = 8,
  CONTINUATION = 9,
}

export const FLAG_END_STREAM = 0x1;
export const FLAG_ACK = 0x1;
export const FLAG_END_HEADERS = 0x4;
export const FLAG_PADDED = 0x8;
export const FLAG_PRIORITY = 0x20;

export const enum ErrorCode {
  NO_ERROR = 0,
  PROTOCOL_ERROR = 1,
  INTERNAL_ERROR = 2,
  FLOW_CONTROL_ERROR = 3,
  STREAM_CLOSED = 5,
  FRAME_SIZE_ERROR = 6,
  REFUSED_STREAM = 7,
  CANCEL = 8,
  COMPRESSION_ERROR = 9,
  ENHANCE_YOUR_CALM = 11,
  INADEQUATE_SECURITY = 12,
}

export const SETTINGS_HEADER_TABLE_SIZE = 1;
export const SETTINGS_ENABLE_PUSH = 2;
export const SETTINGS_MAX_CONCURRENT_STREAMS = 3;
export const SETTINGS_INITIAL_WINDOW_SIZE = 4;
export const SETTINGS_MAX_FRAME_SIZE = 5;
export const SETTINGS_MAX_HEADER_LIST_SIZE = 6;

export const DEFAULT_WINDOW = 65535;
export const DEFAULT_MAX_FRAME = 16384;
export const MAX_WINDOW = 2 ** 31 - 1;
export const READ_BUFFER_BYTES = 64 * 1024;

/** A fault that ends the whole connection with GOAWAY(code). */
export class ConnectionError extends Error {
  constructor(readonly code: ErrorCode, message: string) {
    super(message);
  }
}

/** Writes a frame header into `out` (9 bytes), without allocating: small calls build several frames each. */
export function writeFrameHeader(
  out: Uint8Array,
  length: number,
  type: FrameType,
  flags: number,
  streamId: number,
  at = 0,
): void {
  out[at] = length >>> 16;
  out[at + 1] = (length >>> 8) & 0xff;
  out[at + 2] = length & 0xff;
  out[at + 3] = type;
  out[at + 4] = flags;
  out[at + 5] = (streamId >>> 24) & 0x7f;
  out[at + 6] = (streamId >>> 16) & 0xff;
  out[at + 7] = (streamId >>> 8) & 0xff;
  out[at + 8] = streamId & 0xff;
}

export function frameHeader(length: number, type: FrameType, flags: number, streamId: number): Uint8Array {
  const header = new Uint8Array(9);
  writeFrameHeader(header, length, type, flags, streamId);
  return header;
}

const NO_PAYLOAD = new Uint8Array(0);

export function frame(type: FrameType, flags: number, streamId: number, payload: Uint8Array = NO_PAYLOAD): Uint8Array {
  const out = new Uint8Array(9 + payload.length);
  writeFrame(out, 0, type, flags, streamId, payload);
  return out;
}

/** Writes a whole frame into `out` at `at`; returns where the next one goes. */
export function writeFrame(
  out: Uint8Array,
  at: number,
  type: FrameType,
  flags: number,
  streamId: number,
  payload: Uint8Array,
): number {
  writeFrameHeader(out, payload.length, type, flags, streamId, at);
  out.set(payload, at + 9);
  return at + 9 + payload.length;
}

/**
 * Writes a DATA frame carrying one whole gRPC message (its length prefix, then it) into `out` at
 * `at`; returns where the next frame goes.
 */
export function writeMessageFrame(
  out: Uint8Array,
  at: number,
  flags: number,
  streamId: number,
  message: Uint8Array,
): number {
  writeFrameHeader(out, 5 + message.length, FrameType.DATA, flags, streamId, at);
  // Not compressed, then the length (big-endian).
  out[at + 9] = 0;
  out[at + 10] = message.length >>> 24;
  out[at + 11] = (message.length >>> 16) & 0xff;
  out[at + 12] = (message.length >>> 8) & 0xff;
  out[at + 13] = message.length & 0xff;
  out.set(message, at + 14);
  return at + 14 + message.length;
}

export function u32Payload(...values: number[]): Uint8Array {
  const payload = new Uint8Array(values.length * 4);
  const view = new DataView(payload.buffer);
  values.forEach((v, i) => view.setUint32(i * 4, v));
  return payload;
}

export function settingsFrame(settings: [id: number, value: number][]): Uint8Array {
  const payload = new Uint8Array(settings.length * 6);
  const view = new DataView(payload.buffer);
  settings.forEach(([id, value], i) => {
    view.setUint16(i * 6, id);
    view.setUint32(i * 6 + 2, value);
  });
  return frame(FrameType.SETTINGS, 0, 0, payload);
}

/** The settings in a SETTINGS payload, in order; a malformed payload ends the connection. */
export function parseSettings(payload: Uint8Array): [id: number, value: number][] {
  if (payload.length % 6 !== 0) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length");
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const settings: [number, number][] = [];
  for (let i = 0; i < payload.length; i += 6) {
    const id = view.getUint16(i);
    const value = view.getUint32(i + 2);
    if (id === SETTINGS_INITIAL_WINDOW_SIZE && value > MAX_WINDOW) {
      throw new ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large");
    }
    if (id === SETTINGS_ENABLE_PUSH && value > 1) {
      throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1");
    }
    if (id === SETTINGS_MAX_FRAME_SIZE && (value < DEFAULT_MAX_FRAME || value > 16777215)) {
      throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "max frame size out of range");
    }
    settings.push([id, value]);
  }
  return settings;
}

/** The answer to a PING (null for a PING that is itself an answer); a malformed one ends the connection. */
export function pingReply(flags: number, streamId: number, payload: Uint8Array): Uint8Array | null {
  if (streamId !== 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream");
  if (payload.length !== 8) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING length");
  return flags & FLAG_ACK ? null : frame(FrameType.PING, FLAG_ACK, 0, payload.slice());
}

/** A whole header block (HEADERS and its CONTINUATIONs); HPACK faults end the connection. */
export function decodeHeaderBlock(decoder: HpackDecoder, blocks: Uint8Array[]): Header[] {
  try {
    return decoder.decode(blocks.length === 1 ? blocks[0] : concat(blocks));
  } catch (error) {
    if (error instanceof CompressionError) throw new ConnectionError(ErrorCode.COMPRESSION_ERROR, error.message);
    throw error;
  }
}

/** A WINDOW_UPDATE's increment. */
export function windowIncrement(payload: Uint8Array): number {
  if (payload.length !== 4) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length");
  return new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0) & 0x7fffffff;
}

/** The data of a DATA or HEADERS payload without its padding (and, for HEADERS, priority fields). */
export function unpad(flags: number, payload: Uint8Array, priority = false): Uint8Array {
  const padded = (flags & FLAG_PADDED) !== 0;
  const fixed = (padded ? 1 : 0) + (priority && flags & FLAG_PRIORITY ? 5 : 0);
  // Too short for its own Pad Length or priority fields (section 4.2).
  if (payload.length < fixed) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "frame too short for its fields");
  const padding = padded ? payload[0] : 0;
  // Padding that leaves no room for the fields before it (sections 6.1, 6.2).
  if (padding > payload.length - fixed) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad padding");
  return payload.subarray(fixed, payload.length - padding);
}

/**
 * The stream a HEADERS (with FLAG_PRIORITY) or PRIORITY frame makes its stream depend on, or null
 * when it carries no priority fields. The payload's length must have been checked.
 */
export function streamDependency(type: FrameType, flags: number, payload: Uint8Array): number | null {
  if (type === FrameType.HEADERS && !(flags & FLAG_PRIORITY)) return null;
  const at = type === FrameType.HEADERS && flags & FLAG_PADDED ? 1 : 0;
  return ((payload[at] << 24) | (payload[at + 1] << 16) | (payload[at + 2] << 8) | payload[at + 3]) & 0x7fffffff;
}

/** The request headers of a gRPC call to `path`, as a client sends them. */
export function grpcRequestHeaders(path: string): Header[] {
  return [
    [":method", "POST"],
    [":scheme", "http"],
    [":path", path],
    [":authority", "localhost"],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
  ];
}

export function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** Percent-encoding of grpc-message (gRPC over HTTP/2 spec). */
export function encodeGrpcMessage(text: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(text.slice(0, 4096))) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25
      ? String.fromCharCode(byte)
      : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/** The inverse of encodeGrpcMessage; a malformed escape is kept as it is, as the spec asks. */
export function decodeGrpcMessage(text: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const hex = text[i] === "%" ? text.slice(i + 1, i + 3) : "";
    if (/^[0-9A-Fa-f]{2}$/.test(hex)) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(text.charCodeAt(i) & 0xff);
    }
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

/** Receive buffer of socket chunks; frames are taken without copying when they lie in one chunk. */
export class Incoming {
  #chunks: Uint8Array[] = [];
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  peek(count: number): Uint8Array {
    return this.#gather(count, false);
  }

  take(count: number): Uint8Array {
    return this.#gather(count, true);
  }

  /**
   * Calls `onFrame` for every whole frame buffered. A frame longer than `maxFrame` (what we
   * advertised) ends the connection.
   */
  takeFrames(
    maxFrame: number,
    onFrame: (type: number, flags: number, streamId: number, payload: Uint8Array) => void,
  ): void {
    while (this.#length >= 9) {
      const header = this.peek(9);
      const length = (header[0] << 16) | (header[1] << 8) | header[2];
      if (length > maxFrame) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, `frame of ${length} bytes`);
      if (this.#length < 9 + length) return;
      this.take(9);
      const streamId = ((header[5] << 24) | (header[6] << 16) | (header[7] << 8) | header[8]) & 0x7fffffff;
      onFrame(header[3], header[4], streamId, this.take(length));
    }
  }

  #gather(count: number, consume: boolean): Uint8Array {
    if (count === 0) return new Uint8Array(0);
    const first = this.#chunks[0];
    let out: Uint8Array;
    if (first.length >= count) {
      out = first.subarray(0, count);
      if (consume) {
        if (first.length === count) this.#chunks.shift();
        else this.#chunks[0] = first.subarray(count);
      }
    } else {
      out = new Uint8Array(count);
      let filled = 0;
      let i = 0;
      while (filled < count) {
        const chunk = this.#chunks[i++];
        const part = chunk.subarray(0, count - filled);
        out.set(part, filled);
        filled += part.length;
      }
      if (consume) {
        let remaining = count;
        while (remaining > 0) {
          const chunk = this.#chunks[0];
          if (chunk.length <= remaining) {
            remaining -= chunk.length;
            this.#chunks.shift();
          } else {
            this.#chunks[0] = chunk.subarray(remaining);
            remaining = 0;
          }
        }
      }
    }
    if (consume) this.#length -= count;
    return out;
  }
}

/** A receive buffer that a read filled grows this many times (up to its maximum). */
const GROWTH_STEP = 16;

/**
 * A server connection's receive buffer, one buffer reused across reads (no allocation per read).
 * Frames are handed out as views into it, valid only until the next `space()`: whoever keeps
 * payload bytes copies them (header fragments, messages and PING payloads all do).
 *
 * Its size follows the traffic: `minBytes` while reads are small (an idle connection holds little),
 * growing towards `maxBytes` with each read that fills it (a large message then takes few reads), and back to
 * `minBytes` once a small read leaves nothing buffered. It always grows to hold one whole frame.
 * Its larger buffers are leased from `pool` and given back when it shrinks, so a connection that
 * alternates small and full reads (small requests between window updates) allocates nothing.
 */
export class FrameBuffer {
  #buffer: Uint8Array;
  /** The lease of #buffer when it came from the pool (the smallest size is allocated: it costs less). */
  #lease: Lease | null = null;
  #start = 0;
  #end = 0;
  /** The last read filled the room it was given: more was waiting. */
  #full = false;
  /** The last read was small, and not for lack of room. */
  #quiet = false;
  /** Bytes the frame begun needs in all, once takeFrames has seen (and checked) its header. */
  #need = 9;

  constructor(
    private readonly minBytes: number,
    private readonly maxBytes: number,
    private readonly pool: BufferPool | null = null,
  ) {
    this.#buffer = new Uint8Array(minBytes);
  }

  get length(): number {
    return this.#end - this.#start;
  }

  /** The buffer's size now (for memory bounds). */
  get capacity(): number {
    return this.#buffer.length;
  }

  /** Room for the next read; bytes read into it are announced with `filled`. */
  space(): Uint8Array {
    const pending = this.#end - this.#start;
    if (pending === 0) this.#start = this.#end = 0;
    const b = this.#buffer;
    // Room for at least the whole frame begun (its length was checked against maxFrame when seen).
    const need = pending > 0 ? this.#need : 9;
    let size = b.length;
    // Grown in steps (1 KiB, 16 KiB, 256 KiB for the server): a stream of 1-2 KiB requests settles at
    // the middle size instead of swinging between the smallest and a 256 KiB buffer, which a connection
    // missing the spare pool would allocate (and the allocator zero) on every other read.
    if (this.#full) size = Math.min(this.maxBytes, Math.max(size, size * GROWTH_STEP));
    else if (this.#quiet && pending === 0) size = this.minBytes;
    size = Math.max(size, need);
    if (size !== b.length) {
      const lease = size > this.minBytes && this.pool ? this.pool.lease(size) : null;
      const next = lease?.bytes ?? new Uint8Array(size);
      next.set(b.subarray(this.#start, this.#end));
      // Frames handed out are views valid only until this call, so the old buffer may be reused.
      this.#lease?.release();
      this.#lease = lease;
      this.#buffer = next;
      this.#start = 0;
      this.#end = pending;
    } else if (this.#start > 0 && (b.length - this.#end < b.length / 4 || b.length - this.#start < need)) {
      // What is left is at most one partial frame: moved to the front for a larger read.
      b.copyWithin(0, this.#start, this.#end);
      this.#start = 0;
      this.#end = pending;
    }
    this.#full = this.#quiet = false;
    return this.#buffer.subarray(this.#end);
  }

  /** `count` bytes were read into the last `space()`. */
  filled(count: number): void {
    this.#full = this.#end + count === this.#buffer.length;
    this.#end += count;
    this.#quiet = !this.#full && count < this.minBytes / 2;
  }

  /** Copies `bytes` in (for data that was not read into `space()`). */
  push(bytes: Uint8Array): void {
    for (let offset = 0; offset < bytes.length;) {
      const room = this.space();
      const count = Math.min(room.length, bytes.length - offset);
      room.set(bytes.subarray(offset, offset + count));
      this.filled(count);
      offset += count;
    }
  }

  /** The next `count` bytes (a view; `count` must be buffered). */
  take(count: number): Uint8Array {
    const out = this.#buffer.subarray(this.#start, this.#start + count);
    this.#start += count;
    return out;
  }

  /**
   * Calls `onFrame` for every whole frame buffered, its payload a view into the buffer. A frame
   * longer than `maxFrame` (what we advertised) ends the connection.
   */
  takeFrames(
    maxFrame: number,
    onFrame: (type: number, flags: number, streamId: number, payload: Uint8Array) => void,
  ): void {
    const b = this.#buffer;
    this.#need = 9;
    while (this.#end - this.#start >= 9) {
      const at = this.#start;
      const length = (b[at] << 16) | (b[at + 1] << 8) | b[at + 2];
      if (length > maxFrame) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, `frame of ${length} bytes`);
      if (this.#end - at < 9 + length) {
        this.#need = 9 + length;
        return;
      }
      this.#start = at + 9 + length;
      const streamId = ((b[at + 5] << 24) | (b[at + 6] << 16) | (b[at + 7] << 8) | b[at + 8]) & 0x7fffffff;
      onFrame(b[at + 3], b[at + 4], streamId, b.subarray(at + 9, at + 9 + length));
    }
  }
}

/** What went wrong with a call's message stream: the status to end it with. */
export interface MessageProblem {
  status: number;
  details: string;
}

/**
 * Where a method wants its request message placed: `offsetOf` reads the message's first bytes (up
 * to ALIGN_HEAD_BYTES) and names an offset in it that should fall on an 8-byte boundary of memory
 * (e.g. where a tensor's bytes begin), or null. Messages under `minBytes` are not worth it.
 */
export interface MessageAlignment {
  minBytes: number;
  offsetOf: (head: Uint8Array) => number | null;
}

/** How much of a message MessageAlignment.offsetOf sees. */
export const ALIGN_HEAD_BYTES = 256;

/**
 * A unary call's single gRPC message, assembled from DATA frames into one buffer (one copy).
 * `reserve` may refuse room for a declared length (the server's per-connection budget). With an
 * `alignment`, the message's first bytes are held until it can say where to place the buffer.
 * With `allocate`, the buffer is leased (see buffers.ts): the reader holds the lease until it is
 * taken (takeLease) or the reader is disposed, after which it writes nothing more.
 */
export class MessageReader {
  #prefix = new Uint8Array(5);
  #prefixFilled = 0;
  #message: Uint8Array | null = null;
  #lease: Lease | null = null;
  #disposed = false;
  #filled = 0;
  /** The message's first bytes, while the alignment waits for them. */
  #head: Uint8Array | null = null;
  #headFilled = 0;
  alignment: MessageAlignment | null = null;
  compressed = false;
  /** Set once the declared length exceeds the limit, the budget refuses it, or a second message starts. */
  problem: MessageProblem | null = null;

  constructor(
    private readonly maxBytes: number,
    private readonly limits: {
      reserve: (bytes: number) => MessageProblem | null;
      /** The status for a second message, which a unary call must not carry. */
      secondMessage: MessageProblem;
      /** A leased buffer of `length` bytes, `offset` bytes into its memory (default: a new one). */
      allocate?: (length: number, offset: number) => Lease;
    },
  ) {}

  /** The whole message's lease, now the caller's to release (null without `allocate`). */
  takeLease(): Lease | null {
    const lease = this.#lease;
    this.#lease = null;
    this.#message = null;
    this.#disposed = true;
    return lease;
  }

  /** The call has ended before its message was taken: the buffer goes back, and later data is ignored. */
  dispose(): void {
    this.takeLease()?.release();
  }

  get complete(): boolean {
    return this.#message !== null && this.#filled === this.#message.length;
  }

  get started(): boolean {
    return this.#prefixFilled > 0;
  }

  get message(): Uint8Array {
    return this.#message!;
  }

  push(data: Uint8Array): void {
    if (this.#disposed) return;
    let pos = 0;
    while (pos < data.length && !this.problem) {
      if (this.#message === null) {
        const take = Math.min(5 - this.#prefixFilled, data.length - pos);
        this.#prefix.set(data.subarray(pos, pos + take), this.#prefixFilled);
        this.#prefixFilled += take;
        pos += take;
        if (this.#prefixFilled < 5) return;
        this.compressed = this.#prefix[0] !== 0;
        const length = new DataView(this.#prefix.buffer).getUint32(1);
        if (length > this.maxBytes) {
          // grpc-js's and grpc-core's wording, which operators search for.
          this.problem = {
            status: Status.RESOURCE_EXHAUSTED,
            details: `Received message larger than max (${length} vs. ${this.maxBytes})`,
          };
          return;
        }
        this.problem = this.limits.reserve(length);
        if (this.problem) return;
        if (this.alignment && length > 0 && length >= this.alignment.minBytes) {
          this.#head = new Uint8Array(Math.min(length, ALIGN_HEAD_BYTES));
          this.#headFilled = 0;
          this.#message = this.#head; // a placeholder until the head is whole
        } else {
          this.#message = this.#allocate(length, 0);
        }
      } else if (this.#head) {
        const take = Math.min(this.#head.length - this.#headFilled, data.length - pos);
        this.#head.set(data.subarray(pos, pos + take), this.#headFilled);
        this.#headFilled += take;
        pos += take;
        if (this.#headFilled === this.#head.length) this.#placeMessage(this.#head);
      } else if (this.#filled === this.#message.length) {
        this.problem = this.limits.secondMessage;
        return;
      } else {
        const take = Math.min(this.#message.length - this.#filled, data.length - pos);
        this.#message.set(data.subarray(pos, pos + take), this.#filled);
        this.#filled += take;
        pos += take;
      }
    }
  }

  /** Allocates the message so that the offset its head names lies on an 8-byte boundary. */
  #placeMessage(head: Uint8Array): void {
    const length = new DataView(this.#prefix.buffer).getUint32(1);
    const offset = this.alignment!.offsetOf(head);
    const pad = offset === null || offset < 0 || offset > length ? 0 : (8 - (offset % 8)) % 8;
    // Backing stores start 8-aligned (or better), so pad bytes in moves the offset onto a boundary.
    this.#message = this.#allocate(length, pad);
    this.#message.set(head);
    this.#filled = head.length;
    this.#head = null;
  }

  #allocate(length: number, offset: number): Uint8Array {
    if (!this.limits.allocate) return new Uint8Array(offset + length).subarray(offset);
    this.#lease = this.limits.allocate(length, offset);
    return this.#lease.bytes;
  }
}

/**
 * A streaming call's request messages, split from DATA as it arrives: each message is copied once
 * into a buffer of its declared size (no re-copy of a partial message per frame). `reserve` may
 * refuse room for a declared length; `onMessage` receives each whole message.
 */
export class MessageSplitter {
  #prefix = new Uint8Array(5);
  #prefixFilled = 0;
  #message: Uint8Array | null = null;
  #filled = 0;
  problem: MessageProblem | null = null;

  constructor(
    private readonly maxBytes: number,
    private readonly reserve: (bytes: number) => MessageProblem | null,
    private readonly onMessage: (message: Uint8Array) => void,
  ) {}

  /** A message has begun and not ended: a call whose requests end now was cut short. */
  get partial(): boolean {
    return this.#prefixFilled > 0;
  }

  push(data: Uint8Array): void {
    let pos = 0;
    while (!this.problem) {
      if (this.#message === null) {
        if (pos >= data.length) return;
        const take = Math.min(5 - this.#prefixFilled, data.length - pos);
        this.#prefix.set(data.subarray(pos, pos + take), this.#prefixFilled);
        this.#prefixFilled += take;
        pos += take;
        if (this.#prefixFilled < 5) return;
        const length = new DataView(this.#prefix.buffer).getUint32(1);
        if (this.#prefix[0] !== 0) {
          this.problem = { status: Status.UNIMPLEMENTED, details: "compressed messages are not supported" };
        } else if (length > this.maxBytes) {
          this.problem = {
            status: Status.RESOURCE_EXHAUSTED,
            details: `Received message larger than max (${length} vs. ${this.maxBytes})`,
          };
        } else {
          this.problem = this.reserve(length);
        }
        if (this.problem) return;
        this.#message = new Uint8Array(length);
        this.#filled = 0;
      }
      const take = Math.min(this.#message.length - this.#filled, data.length - pos);
      this.#message.set(data.subarray(pos, pos + take), this.#filled);
      this.#filled += take;
      pos += take;
      if (this.#filled < this.#message.length) return;
      const message = this.#message;
      this.#message = null;
      this.#prefixFilled = 0;
      this.onMessage(message);
    }
  }
}
