// A gRPC client for unary calls over HTTP/2 on a Unix socket, on Deno's own socket API.
//
// The command line (and the compiled executable's `client`) use it instead of grpc-js: grpc-js
// reads GRPC_* environment variables and runs on node:http2, so under the agent's own permissions
// it could not even start, and it would add a second HTTP/2 stack to the executable. Calls are
// multiplexed on one connection, which is opened on first use and again after it closes.

import { Status } from "../errors.ts";
import { BufferPool } from "./buffers.ts";
import { encodeHeaders, type Header, HpackDecoder } from "./hpack.ts";
import { CHUNK_BYTES, SocketWriter } from "./socket_writer.ts";
import {
  concat,
  ConnectionError,
  decodeGrpcMessage,
  decodeHeaderBlock,
  DEFAULT_MAX_FRAME,
  DEFAULT_WINDOW,
  ErrorCode,
  FLAG_ACK,
  FLAG_END_HEADERS,
  FLAG_END_STREAM,
  frame,
  FrameBuffer,
  frameHeader,
  FrameType,
  grpcRequestHeaders,
  MAX_WINDOW,
  MessageReader,
  parseSettings,
  pingReply,
  PREFACE,
  READ_BUFFER_BYTES,
  SETTINGS_ENABLE_PUSH,
  SETTINGS_INITIAL_WINDOW_SIZE,
  SETTINGS_MAX_CONCURRENT_STREAMS,
  SETTINGS_MAX_FRAME_SIZE,
  SETTINGS_MAX_HEADER_LIST_SIZE,
  settingsFrame,
  u32Payload,
  unpad,
  windowIncrement,
  writeFrame,
  writeMessageFrame,
} from "./frames.ts";

const MAX_HEADER_LIST = 65536;
/** Request header blocks kept per connection, by path. */
const MAX_KEPT_HEADER_BLOCKS = 32;
/** The receive buffer while responses are small; it grows to READ_BUFFER_BYTES as reads fill it. */
const READ_BUFFER_MIN_BYTES = 1024;
/** Larger receive buffers given up by one connection, for the next that grows (a few, shared by the process). */
const READ_BUFFERS = new BufferPool(8 * READ_BUFFER_BYTES);
/** Chunks that queued writes are copied into, shared by the process's connections like READ_BUFFERS. */
const WRITE_CHUNKS = new BufferPool(8 * CHUNK_BYTES);

/** Requests up to this size (frames included) are built whole in one buffer (see #sendWhole). */
const SMALL_REQUEST_BYTES = 16 * 1024;
/** A response message's bounds: its size is checked against maxMessageBytes; one message per call. */
const RESPONSE_LIMITS = {
  reserve: () => null,
  secondMessage: { status: Status.INTERNAL, details: "the agent sent more than one message on a unary call" },
};

/** A call that ended with a non-OK status (the fields grpc-js's ServiceError has too). */
export class GrpcCallError extends Error {
  constructor(readonly code: number, readonly details: string) {
    super(`${Status[code] ?? code}: ${details}`);
  }
}

export interface GrpcClientOptions {
  /** Largest response message accepted, and the receive window per call. */
  maxMessageBytes?: number;
  /** Sent as user-agent. */
  userAgent?: string;
}

/** HTTP status of a response that is not gRPC, as gRPC maps it (doc/http-grpc-status-mapping.md). */
function statusOfHttp(httpStatus: string): number {
  switch (httpStatus) {
    case "400":
      return Status.INTERNAL;
    case "401":
      return Status.UNAUTHENTICATED;
    case "403":
      return Status.PERMISSION_DENIED;
    case "404":
      return Status.UNIMPLEMENTED;
    case "429":
    case "502":
    case "503":
    case "504":
      return Status.UNAVAILABLE;
    default:
      return Status.UNKNOWN;
  }
}

/** The status a stream reset by the server ends with (gRPC over HTTP/2, "Errors"). */
function statusOfReset(code: number): number {
  switch (code) {
    case ErrorCode.REFUSED_STREAM:
      return Status.UNAVAILABLE;
    case ErrorCode.CANCEL:
      return Status.CANCELLED;
    case ErrorCode.ENHANCE_YOUR_CALM:
      return Status.RESOURCE_EXHAUSTED;
    case ErrorCode.INADEQUATE_SECURITY:
      return Status.PERMISSION_DENIED;
    default:
      return Status.INTERNAL;
  }
}

/** grpc-timeout: at most 8 digits and a unit. */
function grpcTimeout(ms: number): string {
  const whole = Math.max(1, Math.ceil(ms));
  return whole < 1e8 ? `${whole}m` : `${Math.ceil(whole / 1000)}S`;
}

interface Call {
  id: number;
  /** Request bytes (prefix and message) not yet sent for lack of window. */
  unsent: Uint8Array[];
  sendWindow: number;
  /** Response headers seen; the next header block is the trailers. */
  headersSeen: boolean;
  reader: MessageReader;
  receivedSinceUpdate: number;
  settle: (result: Uint8Array | GrpcCallError) => void;
}

class ClientConnection {
  readonly #conn: Deno.Conn;
  readonly #out: SocketWriter;
  readonly #decoder = new HpackDecoder(4096, MAX_HEADER_LIST);
  readonly #calls = new Map<number, Call>();
  readonly #headerBlocks = new Map<string, Uint8Array>();
  /** Calls waiting for the server's concurrent-stream limit. */
  readonly #queued: (() => void)[] = [];
  #nextStreamId = 1;
  /** A header block still arriving in CONTINUATION frames (its call may have ended meanwhile). */
  #continuation: { streamId: number; blocks: Uint8Array[]; endStream: boolean } | null = null;
  #sendWindow = DEFAULT_WINDOW;
  #peerInitialWindow = DEFAULT_WINDOW;
  #peerMaxFrame = DEFAULT_MAX_FRAME;
  #peerMaxStreams = Infinity;
  #receivedSinceUpdate = 0;
  /** Set once no new call may start here (GOAWAY seen, or closed). */
  draining = false;
  closed = false;

  constructor(conn: Deno.Conn, private readonly options: Required<GrpcClientOptions>) {
    this.#conn = conn;
    // A call's HEADERS and DATA, queued in the same turn, leave in one write.
    this.#out = new SocketWriter(
      conn,
      WRITE_CHUNKS,
      () => {},
      (error) => this.#fail(`cannot write to the agent: ${(error as Error).message}`),
    );
    this.#send(concat([
      PREFACE,
      settingsFrame([
        [SETTINGS_ENABLE_PUSH, 0],
        [SETTINGS_INITIAL_WINDOW_SIZE, this.#receiveWindow],
        [SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST],
      ]),
      frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(this.#receiveWindow - DEFAULT_WINDOW)),
    ]));
    this.#read();
  }

  /** A whole response fits in the window, so the agent never waits for us mid-message. */
  get #receiveWindow(): number {
    return Math.min(MAX_WINDOW, this.options.maxMessageBytes + 5);
  }

  async unary(path: string, request: Uint8Array, deadline: number | null): Promise<Uint8Array> {
    while (this.#calls.size >= this.#peerMaxStreams && !this.draining) {
      await new Promise<void>((resolve) => this.#queued.push(resolve));
    }
    if (this.draining) throw new GrpcCallError(Status.UNAVAILABLE, "the agent closed the connection");
    const id = this.#nextStreamId;
    this.#nextStreamId += 2;
    const { promise, resolve } = Promise.withResolvers<Uint8Array | GrpcCallError>();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const call: Call = {
      id,
      unsent: [],
      sendWindow: this.#peerInitialWindow,
      headersSeen: false,
      reader: new MessageReader(this.options.maxMessageBytes, RESPONSE_LIMITS),
      receivedSinceUpdate: 0,
      settle: (result) => {
        if (!this.#calls.delete(id)) return;
        clearTimeout(timer);
        this.#queued.shift()?.();
        resolve(result);
      },
    };
    this.#calls.set(id, call);
    // Without a deadline a path's header block is always the same bytes (no HPACK table is used): kept.
    let block = deadline === null ? this.#headerBlocks.get(path) : undefined;
    const headers: Header[] = block ? [] : [...grpcRequestHeaders(path), ["user-agent", this.options.userAgent]];
    if (deadline !== null) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        call.settle(new GrpcCallError(Status.DEADLINE_EXCEEDED, "deadline exceeded before the call started"));
        return this.#outcome(await promise);
      }
      headers.push(["grpc-timeout", grpcTimeout(remaining)]);
      timer = setTimeout(() => {
        this.#send(frame(FrameType.RST_STREAM, 0, id, u32Payload(ErrorCode.CANCEL)));
        call.settle(new GrpcCallError(Status.DEADLINE_EXCEEDED, `deadline exceeded (${grpcTimeout(remaining)})`));
      }, remaining);
    }
    if (!block) {
      block = encodeHeaders(headers);
      if (deadline === null && this.#headerBlocks.size < MAX_KEPT_HEADER_BLOCKS) this.#headerBlocks.set(path, block);
    }
    if (!this.#sendWhole(call, block, request)) {
      this.#sendHeaders(id, block);
      const prefix = new Uint8Array(5);
      new DataView(prefix.buffer).setUint32(1, request.length);
      call.unsent.push(prefix);
      if (request.length > 0) call.unsent.push(request);
      this.#flush();
    }
    return this.#outcome(await promise);
  }

  /**
   * The usual call, a small request the windows let out at once: its HEADERS and its one DATA frame
   * built in one buffer, as #sendHeaders and #flush would have sent them. False when it does not fit.
   */
  #sendWhole(call: Call, block: Uint8Array, request: Uint8Array): boolean {
    const data = 5 + request.length;
    const size = 9 + block.length + 9 + data;
    if (
      size > SMALL_REQUEST_BYTES || block.length > this.#peerMaxFrame ||
      data > Math.min(this.#peerMaxFrame, this.#sendWindow, call.sendWindow)
    ) {
      return false;
    }
    const out = new Uint8Array(size);
    const at = writeFrame(out, 0, FrameType.HEADERS, FLAG_END_HEADERS, call.id, block);
    writeMessageFrame(out, at, FLAG_END_STREAM, call.id, request);
    this.#sendWindow -= data;
    call.sendWindow -= data;
    this.#send(out);
    return true;
  }

  #outcome(result: Uint8Array | GrpcCallError): Uint8Array {
    if (result instanceof GrpcCallError) throw result;
    return result;
  }

  #sendHeaders(id: number, block: Uint8Array): void {
    const parts: Uint8Array[] = [];
    for (let offset = 0; offset === 0 || offset < block.length; offset += this.#peerMaxFrame) {
      const piece = block.subarray(offset, offset + this.#peerMaxFrame);
      const last = offset + this.#peerMaxFrame >= block.length;
      const type = offset === 0 ? FrameType.HEADERS : FrameType.CONTINUATION;
      parts.push(frame(type, last ? FLAG_END_HEADERS : 0, id, piece));
    }
    this.#send(concat(parts));
  }

  /** Sends request data as far as the windows allow; END_STREAM goes with the last byte. */
  #flush(): void {
    for (const call of this.#calls.values()) {
      if (call.unsent.length === 0) continue;
      const parts: Uint8Array[] = [];
      while (call.unsent.length > 0) {
        const chunk = call.unsent[0];
        const size = Math.min(chunk.length, this.#peerMaxFrame, this.#sendWindow, call.sendWindow);
        if (size <= 0) break;
        if (size < chunk.length) call.unsent[0] = chunk.subarray(size);
        else call.unsent.shift();
        const last = call.unsent.length === 0;
        parts.push(frameHeader(size, FrameType.DATA, last ? FLAG_END_STREAM : 0, call.id), chunk.subarray(0, size));
        this.#sendWindow -= size;
        call.sendWindow -= size;
      }
      if (parts.length > 0) this.#send(concat(parts));
    }
  }

  async #read(): Promise<void> {
    // One receive buffer reused across reads (frames are views into it; what is kept is copied), instead
    // of a fresh 64 KiB buffer per read, which the allocator zeroes: most of a small call's client CPU.
    const incoming = new FrameBuffer(READ_BUFFER_MIN_BYTES, READ_BUFFER_BYTES, READ_BUFFERS);
    let reason = "the connection to the agent closed";
    try {
      for (;;) {
        const count = await this.#conn.read(incoming.space());
        if (count === null) break;
        incoming.filled(count);
        incoming.takeFrames(DEFAULT_MAX_FRAME, (type, flags, streamId, payload) => {
          this.#onFrame(type, flags, streamId, payload);
        });
      }
    } catch (error) {
      if (error instanceof ConnectionError) {
        this.#send(frame(FrameType.GOAWAY, 0, 0, u32Payload(0, error.code)));
        reason = `the agent broke the HTTP/2 protocol: ${error.message}`;
      } else if (!this.closed) {
        reason = `the connection to the agent failed: ${(error as Error).message}`;
      }
    }
    this.#fail(reason);
  }

  #onFrame(type: number, flags: number, streamId: number, payload: Uint8Array): void {
    if (this.#continuation && type !== FrameType.CONTINUATION) {
      throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION");
    }
    switch (type) {
      case FrameType.SETTINGS:
        if (streamId !== 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream");
        if (flags & FLAG_ACK) return;
        for (const [id, value] of parseSettings(payload)) {
          if (id === SETTINGS_INITIAL_WINDOW_SIZE) {
            for (const call of this.#calls.values()) call.sendWindow += value - this.#peerInitialWindow;
            this.#peerInitialWindow = value;
          } else if (id === SETTINGS_MAX_FRAME_SIZE) {
            this.#peerMaxFrame = value;
          } else if (id === SETTINGS_MAX_CONCURRENT_STREAMS) {
            this.#peerMaxStreams = value;
          }
        }
        this.#send(frame(FrameType.SETTINGS, FLAG_ACK, 0));
        return this.#flush();
      case FrameType.PING: {
        const reply = pingReply(flags, streamId, payload);
        if (reply) this.#send(reply);
        return;
      }
      case FrameType.WINDOW_UPDATE: {
        const increment = windowIncrement(payload);
        if (streamId === 0) {
          this.#sendWindow += increment;
          if (this.#sendWindow > MAX_WINDOW) {
            throw new ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow");
          }
        } else {
          const call = this.#calls.get(streamId);
          if (call) call.sendWindow += increment;
        }
        return this.#flush();
      }
      case FrameType.HEADERS: {
        if (streamId === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0");
        // END_STREAM rides on the HEADERS frame, not on its CONTINUATIONs.
        const endStream = !!(flags & FLAG_END_STREAM);
        const fragment = unpad(flags, payload, true);
        // A whole block is decoded where it lies in the read buffer; a fragment waiting for more is copied.
        if (flags & FLAG_END_HEADERS) return this.#onHeaderBlock(streamId, [fragment], endStream);
        this.#continuation = { streamId, blocks: [fragment.slice()], endStream };
        return;
      }
      case FrameType.CONTINUATION: {
        const block = this.#continuation;
        if (!block || block.streamId !== streamId) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "stray CONTINUATION");
        }
        block.blocks.push(payload.slice());
        if (block.blocks.reduce((n, b) => n + b.length, 0) > MAX_HEADER_LIST) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block too large");
        }
        if (flags & FLAG_END_HEADERS) {
          this.#continuation = null;
          this.#onHeaderBlock(block.streamId, block.blocks, block.endStream);
        }
        return;
      }
      case FrameType.DATA:
        return this.#onData(flags, streamId, payload);
      case FrameType.RST_STREAM: {
        if (payload.length !== 4) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length");
        const code = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
        this.#calls.get(streamId)?.settle(
          new GrpcCallError(statusOfReset(code), `the agent reset the call (HTTP/2 error ${code})`),
        );
        return;
      }
      case FrameType.GOAWAY: {
        if (payload.length < 8) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length");
        const lastStreamId = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0) & 0x7fffffff;
        this.draining = true;
        for (const call of [...this.#calls.values()]) {
          if (call.id > lastStreamId) {
            call.settle(new GrpcCallError(Status.UNAVAILABLE, "the agent closed the connection before the call"));
          }
        }
        for (const wake of this.#queued.splice(0)) wake();
        return;
      }
      case FrameType.PUSH_PROMISE:
        throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, which this client disabled");
      default:
        return;
    }
  }

  #onHeaderBlock(streamId: number, blocks: Uint8Array[], endStream: boolean): void {
    // Decoded even for a call that already ended, to keep the HPACK table in step with the agent's.
    const headers = decodeHeaderBlock(this.#decoder, blocks);
    const call = this.#calls.get(streamId);
    if (!call) return;
    const get = (name: string) => headers.find(([n]) => n === name)?.[1];
    if (!call.headersSeen) {
      call.headersSeen = true;
      const httpStatus = get(":status");
      if (httpStatus !== "200") {
        this.#cancel(call, !endStream);
        return call.settle(
          new GrpcCallError(statusOfHttp(httpStatus ?? ""), `the agent answered HTTP ${httpStatus} (not gRPC)`),
        );
      }
      if (!(get("content-type") ?? "").startsWith("application/grpc")) {
        this.#cancel(call, !endStream);
        return call.settle(
          new GrpcCallError(Status.UNKNOWN, `the agent answered content-type ${get("content-type")} (not gRPC)`),
        );
      }
      if (!endStream) return; // Response headers; the message and trailers follow.
    } else if (!endStream) {
      throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM");
    }
    const status = Number(get("grpc-status") ?? "NaN");
    if (!Number.isInteger(status)) {
      return call.settle(new GrpcCallError(Status.UNKNOWN, "the agent ended the call without a grpc-status"));
    }
    if (status !== Status.OK) {
      return call.settle(new GrpcCallError(status, decodeGrpcMessage(get("grpc-message") ?? "")));
    }
    if (!call.reader.complete) {
      return call.settle(
        new GrpcCallError(Status.INTERNAL, call.reader.started ? "the response was cut short" : "no response message"),
      );
    }
    call.settle(call.reader.message);
  }

  #onData(flags: number, streamId: number, payload: Uint8Array): void {
    // Everything received is consumed at once, so the window is given back as it fills.
    this.#receivedSinceUpdate += payload.length;
    if (this.#receivedSinceUpdate >= this.#receiveWindow / 2) {
      this.#send(frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(this.#receivedSinceUpdate)));
      this.#receivedSinceUpdate = 0;
    }
    const call = this.#calls.get(streamId);
    if (!call) return; // Ended already (deadline, size limit).
    const data = unpad(flags, payload);
    if (!call.headersSeen) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA before HEADERS");
    if (flags & FLAG_END_STREAM) {
      return call.settle(new GrpcCallError(Status.INTERNAL, "the agent ended the call without trailers"));
    }
    call.receivedSinceUpdate += payload.length;
    if (call.receivedSinceUpdate >= this.#receiveWindow / 2) {
      this.#send(frame(FrameType.WINDOW_UPDATE, 0, call.id, u32Payload(call.receivedSinceUpdate)));
      call.receivedSinceUpdate = 0;
    }
    call.reader.push(data);
    if (call.reader.problem) {
      this.#cancel(call, true);
      call.settle(new GrpcCallError(call.reader.problem.status, call.reader.problem.details));
    } else if (call.reader.complete && call.reader.compressed) {
      this.#cancel(call, true);
      call.settle(new GrpcCallError(Status.INTERNAL, "the agent sent a compressed message, which was not asked for"));
    }
  }

  #cancel(call: Call, stillOpen: boolean): void {
    if (stillOpen) this.#send(frame(FrameType.RST_STREAM, 0, call.id, u32Payload(ErrorCode.CANCEL)));
  }

  #fail(reason: string): void {
    this.draining = true;
    for (const call of [...this.#calls.values()]) call.settle(new GrpcCallError(Status.UNAVAILABLE, reason));
    for (const wake of this.#queued.splice(0)) wake();
    this.close();
  }

  #send(bytes: Uint8Array): void {
    if (this.closed) return;
    this.#out.send(bytes);
  }

  close(): void {
    if (this.closed) return;
    this.draining = true;
    this.closed = true;
    this.#out.flush();
    this.#out.afterWrites(() => {
      try {
        this.#conn.close();
      } catch { /* already closed */ }
    });
    for (const call of [...this.#calls.values()]) {
      call.settle(new GrpcCallError(Status.CANCELLED, "the client was closed"));
    }
  }
}

/** Unary calls to a gRPC server on a Unix socket. */
export class GrpcClient {
  readonly #options: Required<GrpcClientOptions>;
  #current: ClientConnection | null = null;
  #opening: Promise<ClientConnection> | null = null;
  #closed = false;

  constructor(readonly socketPath: string, options: GrpcClientOptions = {}) {
    this.#options = {
      maxMessageBytes: options.maxMessageBytes ?? 64 * 1024 * 1024,
      userAgent: options.userAgent ?? "edge-agent-client",
    };
  }

  /** Calls `path` with one request message; resolves with the response message or rejects with GrpcCallError. */
  async unary(path: string, request: Uint8Array, options: { deadlineMs?: number } = {}): Promise<Uint8Array> {
    const deadline = options.deadlineMs ? Date.now() + options.deadlineMs : null;
    const connection = await this.#connect();
    return connection.unary(path, request, deadline);
  }

  async #connect(): Promise<ClientConnection> {
    if (this.#closed) throw new GrpcCallError(Status.CANCELLED, "the client was closed");
    if (this.#current && !this.#current.draining) return this.#current;
    this.#opening ??= Deno.connect({ transport: "unix", path: this.socketPath }).then(
      (conn) => this.#current = new ClientConnection(conn, this.#options),
      (error) => {
        throw new GrpcCallError(
          Status.UNAVAILABLE,
          `cannot connect to ${this.socketPath}: ${connectionFailure(error)}`,
        );
      },
    ).finally(() => this.#opening = null);
    return await this.#opening;
  }

  close(): void {
    this.#closed = true;
    this.#current?.close();
    this.#opening?.then((connection) => connection.close(), () => {});
  }
}

function connectionFailure(error: Error): string {
  if (error instanceof Deno.errors.NotFound) return "no such socket (is the agent running, and is this its -a path?)";
  if (error instanceof Deno.errors.ConnectionRefused) return "nothing is listening there (is the agent running?)";
  if (error instanceof Deno.errors.PermissionDenied) {
    return "permission denied (the socket is mode 0660: run as the agent's user or group)";
  }
  if (error instanceof Deno.errors.NotCapable) {
    // Deno's own advice (run again with --allow-read) does not apply to a compiled executable.
    return "this executable may connect only to the socket its deployment profile names";
  }
  return error.message;
}
