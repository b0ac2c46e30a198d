// A gRPC server over HTTP/2 (RFC 9113) on Deno's own Unix socket listener, for unary calls.
//
// Why not grpc-js's server: under Deno its HTTP/2 (node:http2 over nghttp2) aborts the whole process
// when a client closes a connection that carried concurrent streams (denoland/deno#36788: assertion
// in find_stream_on_goaway_func). A device agent must survive every client disconnect, so the
// transport is ours: frames, HPACK, flow control, and gRPC's length-prefixed messages and trailers.

import { AgentError, CallCancelled, type CancelReason, Status } from "../errors.ts";
import { encodeHeaders, type Header, HpackDecoder } from "./hpack.ts";

import {
  closeAfterWrites,
  concat,
  ConnectionError,
  decodeHeaderBlock,
  DEFAULT_MAX_FRAME,
  DEFAULT_WINDOW,
  encodeGrpcMessage,
  ErrorCode,
  FLAG_ACK,
  FLAG_END_HEADERS,
  FLAG_END_STREAM,
  frame,
  frameHeader,
  FrameType,
  Incoming,
  MAX_WINDOW,
  MessageReader,
  parseSettings,
  pingReply,
  PREFACE,
  READ_BUFFER_BYTES,
  SETTINGS_HEADER_TABLE_SIZE,
  SETTINGS_INITIAL_WINDOW_SIZE,
  SETTINGS_MAX_CONCURRENT_STREAMS,
  SETTINGS_MAX_FRAME_SIZE,
  SETTINGS_MAX_HEADER_LIST_SIZE,
  settingsFrame,
  u32Payload,
  unpad,
  windowIncrement,
} from "./frames.ts";

const MAX_CONCURRENT_STREAMS = 1000;
const MAX_HEADER_LIST = 65536;
/** Our receive window: large, so a client can send a whole tensor without waiting for us. */
const RECEIVE_WINDOW = 16 * 1024 * 1024;

/** What a unary handler answers. */
export type UnaryResult = { message: Uint8Array } | { status: number; details: string };

/**
 * What a handler knows of its call: `signal` aborts (its reason a CallCancelled) when the deadline
 * passes, the client resets the call or its connection closes; `deadline` is the client's deadline
 * on the performance.now() clock (null: none).
 */
export interface CallContext {
  signal: AbortSignal;
  deadline: number | null;
}

/** One unary method: raw request bytes in, response bytes or a status out. */
export type UnaryHandler = (request: Uint8Array, call: CallContext) => Promise<UnaryResult>;

const TIMEOUT_UNIT_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 };
/** Longest timer a runtime keeps (about 24.8 days); longer deadlines are never reached. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** grpc-timeout in milliseconds (gRPC over HTTP/2: 1-8 ASCII digits and a unit H, M, S, m, u or n); null when malformed. */
export function parseGrpcTimeout(value: string): number | null {
  const match = /^(\d{1,8})([HMSmun])$/.exec(value);
  return match ? Number(match[1]) * TIMEOUT_UNIT_MS[match[2]] : null;
}

/**
 * A streaming method (client, server or bidirectional streaming): request messages in, response
 * messages out. Throwing an AgentError ends the call with its status. `cancelled` aborts when the
 * client resets the call or its connection goes, so a handler waiting on something else can stop.
 */
export type StreamHandler = (requests: AsyncIterable<Uint8Array>, cancelled: AbortSignal) => AsyncIterable<Uint8Array>;

export interface GrpcServerOptions {
  /** Handlers by path, e.g. "/AWS.SageMaker.Edge.Agent/Predict". */
  methods: Map<string, UnaryHandler>;
  /** Streaming handlers by path. */
  streams?: Map<string, StreamHandler>;
  maxMessageBytes: number;
  /** Reports a misbehaving connection (protocol errors); the server keeps running. */
  onConnectionError?: (message: string) => void;
}

interface Stream {
  id: number;
  headerBlock: Uint8Array[];
  path: string;
  reader: MessageReader;
  /** The client finished sending (END_STREAM seen). */
  remoteClosed: boolean;
  /** We sent END_STREAM or RST_STREAM. */
  localClosed: boolean;
  sendWindow: number;
  /** Response messages waiting for send window, then the trailers once the call has ended. */
  pending: { chunks: Uint8Array[]; trailers: Uint8Array | null } | null;
  /** Response headers went out (a later error needs trailers, not a trailers-only answer). */
  headersSent: boolean;
  /** A streaming call's request messages not yet taken by its handler. */
  incoming: {
    queue: Uint8Array[];
    buffer: Uint8Array;
    ended: boolean;
    wake: (() => void) | null;
  } | null;
  receivedSinceUpdate: number;
  dispatched: boolean;
  /** Counted in the server's in-flight calls. */
  counted: boolean;
  /** Bytes of the connection's request budget this stream's message holds. */
  reservedBytes: number;
  /** Aborted when the call is given up (deadline, reset, connection closed). */
  cancel: AbortController;
  /** The client's deadline (performance.now() clock) and the timer that enforces it. */
  deadline: number | null;
  deadlineTimer: ReturnType<typeof setTimeout> | null;
}

/** One client connection. */
class Connection {
  readonly #conn: Deno.Conn;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #decoder = new HpackDecoder(4096, MAX_HEADER_LIST);
  readonly #streams = new Map<number, Stream>();
  #lastStreamId = 0;
  #continuationOf: Stream | null = null;
  #sendWindow = DEFAULT_WINDOW;
  #peerInitialWindow = DEFAULT_WINDOW;
  #peerMaxFrame = DEFAULT_MAX_FRAME;
  #receivedSinceUpdate = 0;
  #reservedBytes = 0;
  #closed = false;

  constructor(conn: Deno.Conn, private readonly server: GrpcServer) {
    this.#conn = conn;
    this.#writer = conn.writable.getWriter();
  }

  async serve(): Promise<void> {
    const incoming = new Incoming();
    let prefaceSeen = false;
    this.#send(this.#settingsFrame());
    this.#send(frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(RECEIVE_WINDOW - DEFAULT_WINDOW)));
    try {
      for (;;) {
        // A fresh buffer per read: frames keep views into it. (Iterating conn.readable would close
        // the socket on an exception, before the GOAWAY that explains it is written.)
        const buffer = new Uint8Array(READ_BUFFER_BYTES);
        const count = await this.#conn.read(buffer);
        if (count === null) break;
        incoming.push(buffer.subarray(0, count));
        if (!prefaceSeen) {
          if (incoming.length < PREFACE.length) continue;
          const preface = incoming.take(PREFACE.length);
          if (!preface.every((b, i) => b === PREFACE[i])) {
            throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad preface");
          }
          prefaceSeen = true;
        }
        incoming.takeFrames(DEFAULT_MAX_FRAME, (type, flags, streamId, payload) => {
          this.#onFrame(type, flags, streamId, payload);
        });
      }
    } catch (error) {
      if (error instanceof ConnectionError) {
        this.server.reportConnectionError(error.message);
        this.#send(frame(FrameType.GOAWAY, 0, 0, u32Payload(this.#lastStreamId, error.code)));
      } else if (
        !this.#closed &&
        !(error instanceof Deno.errors.BadResource || error instanceof Deno.errors.ConnectionReset ||
          error instanceof Deno.errors.Interrupted)
      ) {
        this.server.reportConnectionError(String(error));
      }
    } finally {
      this.close();
    }
  }

  #settingsFrame(): Uint8Array {
    return settingsFrame([
      [SETTINGS_HEADER_TABLE_SIZE, 4096],
      [SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS],
      [SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW],
      [SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME],
      [SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST],
    ]);
  }

  #onFrame(type: number, flags: number, streamId: number, payload: Uint8Array): void {
    if (this.#continuationOf && type !== FrameType.CONTINUATION) {
      throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION");
    }
    switch (type) {
      case FrameType.SETTINGS:
        return this.#onSettings(flags, streamId, payload);
      case FrameType.PING: {
        const reply = pingReply(flags, streamId, payload);
        if (reply) this.#send(reply);
        return;
      }
      case FrameType.WINDOW_UPDATE:
        return this.#onWindowUpdate(streamId, payload);
      case FrameType.HEADERS:
        return this.#onHeaders(flags, streamId, payload);
      case FrameType.CONTINUATION: {
        const stream = this.#continuationOf;
        if (!stream || stream.id !== streamId) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "stray CONTINUATION");
        }
        stream.headerBlock.push(payload.slice());
        if (stream.headerBlock.reduce((n, b) => n + b.length, 0) > MAX_HEADER_LIST) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block too large");
        }
        if (flags & FLAG_END_HEADERS) {
          this.#continuationOf = null;
          this.#onHeaderBlock(stream);
        }
        return;
      }
      case FrameType.DATA:
        return this.#onData(flags, streamId, payload);
      case FrameType.RST_STREAM: {
        if (streamId === 0 || payload.length !== 4) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad RST_STREAM");
        }
        const stream = this.#streams.get(streamId);
        if (stream) {
          this.#uncount(stream);
          this.#cancelHandler(stream, "reset");
          stream.localClosed = true;
          stream.remoteClosed = true;
          this.#streams.delete(streamId);
        }
        return;
      }
      case FrameType.GOAWAY:
        // The client will open no more streams; answers to open ones still go out.
        return;
      case FrameType.PRIORITY:
        if (streamId === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0");
        return;
      case FrameType.PUSH_PROMISE:
        throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client");
      default:
        return; // Unknown frame types are ignored (RFC 9113 section 4.1).
    }
  }

  #onSettings(flags: number, streamId: number, payload: Uint8Array): void {
    if (streamId !== 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream");
    if (flags & FLAG_ACK) return;
    for (const [id, value] of parseSettings(payload)) {
      if (id === SETTINGS_INITIAL_WINDOW_SIZE) {
        const delta = value - this.#peerInitialWindow;
        this.#peerInitialWindow = value;
        for (const stream of this.#streams.values()) stream.sendWindow += delta;
      } else if (id === SETTINGS_MAX_FRAME_SIZE) {
        this.#peerMaxFrame = value;
      }
    }
    this.#send(frame(FrameType.SETTINGS, FLAG_ACK, 0));
    this.#flushPending();
  }

  #onWindowUpdate(streamId: number, payload: Uint8Array): void {
    const increment = windowIncrement(payload);
    if (streamId === 0) {
      if (increment === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "zero window increment");
      this.#sendWindow += increment;
      if (this.#sendWindow > MAX_WINDOW) throw new ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow");
    } else {
      const stream = this.#streams.get(streamId);
      if (!stream) return;
      stream.sendWindow += increment;
    }
    this.#flushPending();
  }

  #onHeaders(flags: number, streamId: number, payload: Uint8Array): void {
    if (streamId === 0 || streamId % 2 === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad stream id");
    const block = unpad(flags, payload, true);
    let stream = this.#streams.get(streamId);
    if (stream) {
      // Trailers from the client end its side; gRPC clients send none on unary calls.
      if (!(flags & FLAG_END_STREAM)) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "second HEADERS");
    } else {
      if (streamId <= this.#lastStreamId) throw new ConnectionError(ErrorCode.STREAM_CLOSED, "reused stream id");
      this.#lastStreamId = streamId;
      stream = {
        id: streamId,
        headerBlock: [],
        path: "",
        reader: new MessageReader(this.server.maxMessageBytes, {
          reserve: (bytes) => {
            // Requests declare their size up front; without a cap, a client could make us allocate
            // max-size buffers for a thousand streams it never fills.
            if (this.#reservedBytes + bytes > 2 * this.server.maxMessageBytes) {
              return {
                status: Status.RESOURCE_EXHAUSTED,
                details: `too many large requests at once on this connection (a ${bytes}-byte message did not fit)`,
              };
            }
            this.#reservedBytes += bytes;
            stream!.reservedBytes = bytes;
            return null;
          },
          secondMessage: { status: Status.UNIMPLEMENTED, details: "more than one request message on a unary call" },
        }),
        remoteClosed: false,
        localClosed: false,
        sendWindow: this.#peerInitialWindow,
        pending: null,
        headersSent: false,
        incoming: null,
        receivedSinceUpdate: 0,
        dispatched: false,
        counted: false,
        reservedBytes: 0,
        cancel: new AbortController(),
        deadline: null,
        deadlineTimer: null,
      };
      this.#streams.set(streamId, stream);
    }
    stream.headerBlock.push(block.slice());
    if (flags & FLAG_END_STREAM) stream.remoteClosed = true;
    if (flags & FLAG_END_HEADERS) this.#onHeaderBlock(stream);
    else this.#continuationOf = stream;
  }

  #onHeaderBlock(stream: Stream): void {
    const headers = decodeHeaderBlock(this.#decoder, stream.headerBlock);
    stream.headerBlock = [];
    if (stream.path !== "") {
      // Client trailers: only END_STREAM matters.
      if (stream.incoming && stream.remoteClosed) {
        stream.incoming.ended = true;
        stream.incoming.wake?.();
      }
      this.#maybeDispatch(stream);
      return;
    }
    const get = (name: string) => headers.find(([n]) => n === name)?.[1];
    stream.path = get(":path") ?? "/";
    if (this.#streams.size > MAX_CONCURRENT_STREAMS) {
      return this.#reset(stream, ErrorCode.REFUSED_STREAM);
    }
    if (get(":method") !== "POST" || !(get("content-type") ?? "").startsWith("application/grpc")) {
      return this.#respondHttp(stream, get(":method") !== "POST" ? "405" : "415");
    }
    if (this.server.stopping) {
      return this.#respondStatus(stream, Status.UNAVAILABLE, "the agent is stopping");
    }
    // A call counts as in flight from its headers until its last frame is queued (or the stream or
    // connection ends): a stop waits for requests still arriving and for large responses still
    // waiting for window.
    stream.counted = true;
    this.server.callStarted();
    const encoding = get("grpc-encoding");
    if (encoding && encoding !== "identity") {
      // We advertise identity only; a client that compresses anyway gets UNIMPLEMENTED.
      stream.reader.problem = { status: Status.UNIMPLEMENTED, details: `grpc-encoding ${encoding} is not supported` };
    }
    const timeout = get("grpc-timeout");
    if (timeout !== undefined) {
      const ms = parseGrpcTimeout(timeout);
      // As grpc-go does: a malformed timeout fails the call rather than running it without one.
      if (ms === null) {
        stream.reader.problem ??= {
          status: Status.INTERNAL,
          details: `malformed grpc-timeout "${timeout}": expected 1-8 digits and a unit (H, M, S, m, u, n)`,
        };
      } else {
        stream.deadline = performance.now() + ms;
        if (ms <= MAX_TIMER_MS) stream.deadlineTimer = setTimeout(() => this.#deadlinePassed(stream), ms);
      }
    }
    const streaming = this.server.streams.get(stream.path);
    if (streaming && !stream.reader.problem) {
      stream.dispatched = true;
      stream.incoming = {
        queue: [],
        buffer: new Uint8Array(0),
        ended: stream.remoteClosed,
        wake: null,
      };
      this.#runStream(stream, streaming);
      return;
    }
    this.#maybeDispatch(stream);
  }

  /** Runs a streaming handler, feeding it the stream's messages and sending what it yields. */
  async #runStream(stream: Stream, handler: StreamHandler): Promise<void> {
    const incoming = stream.incoming!;
    async function* requests(): AsyncIterable<Uint8Array> {
      for (;;) {
        if (incoming.queue.length > 0) yield incoming.queue.shift()!;
        else if (incoming.ended) return;
        else await new Promise<void>((resolve) => incoming.wake = resolve);
      }
    }
    try {
      for await (const response of handler(requests(), stream.cancel.signal)) {
        if (stream.localClosed || this.#closed) return;
        this.#queueMessage(stream, response);
      }
      this.#finish(stream, Status.OK, "");
    } catch (error) {
      const status = error instanceof AgentError ? error.code : Status.INTERNAL;
      this.#finish(stream, status, String((error as Error)?.message ?? error));
    }
  }

  /** Splits a streaming call's DATA into messages for its handler. */
  #onStreamData(stream: Stream, data: Uint8Array): void {
    const incoming = stream.incoming!;
    let buffer = incoming.buffer.length === 0 ? data : concat([incoming.buffer, data]);
    while (buffer.length >= 5) {
      const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
      const length = view.getUint32(1);
      if (buffer[0] !== 0) {
        return this.#abortStream(stream, Status.UNIMPLEMENTED, "compressed messages are not supported");
      }
      if (length > this.server.maxMessageBytes) {
        return this.#abortStream(
          stream,
          Status.RESOURCE_EXHAUSTED,
          `Received message larger than max (${length} vs. ${this.server.maxMessageBytes})`,
        );
      }
      if (buffer.length < 5 + length) break;
      incoming.queue.push(buffer.slice(5, 5 + length));
      buffer = buffer.subarray(5 + length);
    }
    incoming.buffer = buffer.slice();
    incoming.wake?.();
  }

  #abortStream(stream: Stream, status: number, details: string): void {
    stream.incoming!.ended = true;
    stream.incoming!.wake?.();
    this.#finish(stream, status, details);
    if (!stream.remoteClosed) this.#reset(stream, ErrorCode.NO_ERROR);
  }

  #onData(flags: number, streamId: number, payload: Uint8Array): void {
    const data = unpad(flags, payload);
    // Flow control counts the whole payload, padding included.
    this.#receivedSinceUpdate += payload.length;
    if (this.#receivedSinceUpdate >= RECEIVE_WINDOW / 2) {
      this.#send(frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(this.#receivedSinceUpdate)));
      this.#receivedSinceUpdate = 0;
    }
    const stream = this.#streams.get(streamId);
    if (!stream) {
      if (streamId === 0 || streamId > this.#lastStreamId) {
        throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream");
      }
      return; // A stream we already answered or reset.
    }
    if (stream.remoteClosed) return this.#reset(stream, ErrorCode.STREAM_CLOSED);
    stream.receivedSinceUpdate += payload.length;
    if (flags & FLAG_END_STREAM) {
      stream.remoteClosed = true;
    } else if (stream.receivedSinceUpdate >= RECEIVE_WINDOW / 2) {
      this.#send(frame(FrameType.WINDOW_UPDATE, 0, stream.id, u32Payload(stream.receivedSinceUpdate)));
      stream.receivedSinceUpdate = 0;
    }
    if (stream.incoming) {
      this.#onStreamData(stream, data);
      if (stream.remoteClosed && stream.incoming) {
        stream.incoming.ended = true;
        stream.incoming.wake?.();
      }
      return;
    }
    if (!stream.reader.problem) stream.reader.push(data);
    this.#maybeDispatch(stream);
  }

  /** Answers once the request is whole, or at once when it can never succeed. */
  #maybeDispatch(stream: Stream): void {
    if (stream.dispatched || stream.path === "") return;
    const reader = stream.reader;
    if (reader.problem) {
      stream.dispatched = true;
      this.#respondStatus(stream, reader.problem.status, reader.problem.details);
      // The client may still be sending; ask it to stop.
      if (!stream.remoteClosed) this.#reset(stream, ErrorCode.NO_ERROR);
      return;
    }
    if (!stream.remoteClosed) return;
    // A deadline already past (e.g. "0n", or a timer not yet run) gets no handler.
    if (stream.deadline !== null && performance.now() >= stream.deadline) return this.#deadlinePassed(stream);
    stream.dispatched = true;
    const handler = this.server.methods.get(stream.path);
    if (!handler) {
      return this.#respondStatus(stream, Status.UNIMPLEMENTED, `method ${stream.path} is not implemented`);
    }
    if (!reader.complete) {
      return this.#respondStatus(
        stream,
        Status.INTERNAL,
        reader.started ? "request message was cut short" : "request carries no message",
      );
    }
    if (reader.compressed) {
      return this.#respondStatus(stream, Status.UNIMPLEMENTED, "compressed messages are not supported");
    }
    // Started once the frames of this read are handled: a reset right behind the request (rapid
    // reset) has then aborted the call's signal before its handler does any work.
    const call: CallContext = { signal: stream.cancel.signal, deadline: stream.deadline };
    Promise.resolve().then(() => handler(reader.message, call)).then(
      (result) => {
        if ("message" in result) this.#respondMessage(stream, result.message);
        else this.#respondStatus(stream, result.status, result.details);
      },
      (error) => this.#respondStatus(stream, Status.INTERNAL, String((error as Error)?.message ?? error)),
    );
  }

  /** The client's deadline passed: DEADLINE_EXCEEDED if nothing went out yet, else a reset. */
  #deadlinePassed(stream: Stream): void {
    if (stream.localClosed || this.#closed) return;
    this.#cancelHandler(stream, "deadline");
    if (stream.headersSent) return this.#reset(stream, ErrorCode.CANCEL);
    stream.dispatched = true;
    this.#respondStatus(stream, Status.DEADLINE_EXCEEDED, "deadline exceeded");
    // The request may still be arriving; ask the client to stop sending it.
    if (!stream.remoteClosed) this.#reset(stream, ErrorCode.NO_ERROR);
  }

  #responseHeaders(): Uint8Array {
    return encodeHeaders([
      [":status", "200"],
      ["content-type", "application/grpc"],
      ["grpc-accept-encoding", "identity"],
    ]);
  }

  #respondMessage(stream: Stream, message: Uint8Array): void {
    this.#queueMessage(stream, message);
    this.#finish(stream, Status.OK, "");
  }

  /** Queues one length-prefixed response message (response headers first, once). */
  #queueMessage(stream: Stream, message: Uint8Array): void {
    if (stream.localClosed || this.#closed) return;
    // The length prefix goes out as its own piece: the message itself is copied only into the write.
    const prefix = new Uint8Array(5);
    new DataView(prefix.buffer).setUint32(1, message.length);
    if (!stream.headersSent) {
      this.#sendHeaderBlock(stream.id, this.#responseHeaders(), false);
      stream.headersSent = true;
    }
    stream.pending ??= { chunks: [], trailers: null };
    stream.pending.chunks.push(prefix, message);
    this.#flushPending();
  }

  /** Ends a call: trailers after any queued messages, or a trailers-only answer. */
  #finish(stream: Stream, status: number, details: string): void {
    if (stream.localClosed || this.#closed) return;
    if (!stream.headersSent) return this.#respondStatus(stream, status, details);
    const trailers: Header[] = [["grpc-status", String(status)]];
    if (details) trailers.push(["grpc-message", encodeGrpcMessage(details)]);
    stream.pending ??= { chunks: [], trailers: null };
    stream.pending.trailers = encodeHeaders(trailers);
    this.#flushPending();
  }

  #respondStatus(stream: Stream, status: number, details: string): void {
    if (stream.localClosed || this.#closed) return;
    const headers: Header[] = [
      [":status", "200"],
      ["content-type", "application/grpc"],
      ["grpc-status", String(status)],
    ];
    if (details) headers.push(["grpc-message", encodeGrpcMessage(details)]);
    this.#sendHeaderBlock(stream.id, encodeHeaders(headers), true);
    this.#closeLocal(stream);
  }

  #respondHttp(stream: Stream, httpStatus: string): void {
    stream.dispatched = true;
    this.#sendHeaderBlock(
      stream.id,
      encodeHeaders([[":status", httpStatus], ["grpc-status", String(Status.UNIMPLEMENTED)]]),
      true,
    );
    this.#closeLocal(stream);
    if (!stream.remoteClosed) this.#reset(stream, ErrorCode.NO_ERROR);
  }

  #sendHeaderBlock(streamId: number, block: Uint8Array, endStream: boolean): void {
    const flags = endStream ? FLAG_END_STREAM : 0;
    if (block.length <= this.#peerMaxFrame) {
      this.#send(frame(FrameType.HEADERS, flags | FLAG_END_HEADERS, streamId, block));
      return;
    }
    const parts: Uint8Array[] = [];
    for (let offset = 0; offset < block.length; offset += this.#peerMaxFrame) {
      const piece = block.subarray(offset, offset + this.#peerMaxFrame);
      const last = offset + this.#peerMaxFrame >= block.length;
      parts.push(
        offset === 0
          ? frame(FrameType.HEADERS, flags, streamId, piece)
          : frame(FrameType.CONTINUATION, last ? FLAG_END_HEADERS : 0, streamId, piece),
      );
    }
    this.#send(concat(parts));
  }

  /** Sends as much pending response data as the windows allow; trailers follow the last byte. */
  #flushPending(): void {
    for (const stream of this.#streams.values()) {
      const pending = stream.pending;
      if (!pending || stream.localClosed) continue;
      const parts: Uint8Array[] = [];
      while (pending.chunks.length > 0) {
        const chunk = pending.chunks[0];
        let offset = 0;
        while (offset < chunk.length) {
          const size = Math.min(chunk.length - offset, this.#peerMaxFrame, this.#sendWindow, stream.sendWindow);
          if (size <= 0) break;
          // Header and a view of the payload: concat() below is the one copy into the write buffer.
          parts.push(frameHeader(size, FrameType.DATA, 0, stream.id), chunk.subarray(offset, offset + size));
          offset += size;
          this.#sendWindow -= size;
          stream.sendWindow -= size;
        }
        if (offset < chunk.length) {
          pending.chunks[0] = chunk.subarray(offset);
          break;
        }
        pending.chunks.shift();
      }
      const done = pending.chunks.length === 0 && pending.trailers !== null;
      if (done) {
        parts.push(frame(FrameType.HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, stream.id, pending.trailers!));
        stream.pending = null;
      }
      if (parts.length > 0) this.#send(concat(parts));
      if (done) this.#closeLocal(stream);
    }
  }

  #closeLocal(stream: Stream): void {
    stream.localClosed = true;
    this.#uncount(stream);
    if (stream.remoteClosed) this.#streams.delete(stream.id);
  }

  /** The stream is done: its call leaves the in-flight count and its message budget is freed. */
  #uncount(stream: Stream): void {
    if (stream.deadlineTimer !== null) clearTimeout(stream.deadlineTimer);
    stream.deadlineTimer = null;
    this.#reservedBytes -= stream.reservedBytes;
    stream.reservedBytes = 0;
    if (!stream.counted) return;
    stream.counted = false;
    this.server.callFinished();
  }

  /**
   * The call's work stops (a running Predict is terminated) and a streaming handler waiting for
   * requests, or for anything else, ends instead of waiting forever.
   */
  #cancelHandler(stream: Stream, reason: CancelReason): void {
    if (!stream.cancel.signal.aborted) stream.cancel.abort(new CallCancelled(reason));
    if (!stream.incoming) return;
    stream.incoming.ended = true;
    stream.incoming.wake?.();
  }

  #reset(stream: Stream, code: ErrorCode): void {
    this.#send(frame(FrameType.RST_STREAM, 0, stream.id, u32Payload(code)));
    this.#cancelHandler(stream, "reset");
    this.#uncount(stream);
    stream.localClosed = true;
    stream.remoteClosed = true;
    stream.dispatched = true;
    this.#streams.delete(stream.id);
  }

  #send(bytes: Uint8Array): void {
    if (this.#closed || bytes.length === 0) return;
    this.#writer.write(bytes).catch(() => this.close());
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const stream of this.#streams.values()) {
      this.#uncount(stream);
      this.#cancelHandler(stream, "disconnect");
    }
    closeAfterWrites(this.#writer, this.#conn);
    this.server.connectionClosed(this);
  }
}

/** Serves unary gRPC methods on a Unix socket. */
export class GrpcServer {
  readonly methods: Map<string, UnaryHandler>;
  readonly streams: Map<string, StreamHandler>;
  readonly maxMessageBytes: number;
  stopping = false;
  readonly #connections = new Set<Connection>();
  #listener: Deno.UnixListener | null = null;
  #inFlight = 0;
  #drained: PromiseWithResolvers<void> | null = null;
  readonly #onConnectionError: (message: string) => void;

  constructor(options: GrpcServerOptions) {
    this.methods = options.methods;
    this.streams = options.streams ?? new Map();
    this.maxMessageBytes = options.maxMessageBytes;
    this.#onConnectionError = options.onConnectionError ?? (() => {});
  }

  listen(path: string): void {
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#accept(this.#listener);
  }

  async #accept(listener: Deno.UnixListener): Promise<void> {
    try {
      for await (const conn of listener) {
        const connection = new Connection(conn, this);
        this.#connections.add(connection);
        connection.serve();
      }
    } catch (error) {
      if (!this.stopping) this.#onConnectionError(`accept failed: ${(error as Error).message}`);
    }
  }

  reportConnectionError(message: string): void {
    this.#onConnectionError(message);
  }

  callStarted(): void {
    this.#inFlight++;
  }

  callFinished(): void {
    if (--this.#inFlight === 0) this.#drained?.resolve();
  }

  connectionClosed(connection: Connection): void {
    this.#connections.delete(connection);
  }

  /**
   * Stops accepting connections and calls (new calls get UNAVAILABLE), waits up to `graceMs` for
   * calls in progress, then closes every connection. Returns the number of calls still running.
   */
  async stop(graceMs: number): Promise<number> {
    this.stopping = true;
    this.#listener?.close();
    if (this.#inFlight > 0) {
      this.#drained = Promise.withResolvers();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs));
      await Promise.race([this.#drained.promise, timeout]);
      clearTimeout(timer);
    }
    for (const connection of [...this.#connections]) connection.close();
    return this.#inFlight;
  }
}
