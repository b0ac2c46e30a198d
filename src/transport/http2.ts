// A gRPC server over HTTP/2 (RFC 9113) on Deno's own Unix socket listener, for unary calls.
//
// Why not grpc-js's server: under Deno its HTTP/2 (node:http2 over nghttp2) aborts the whole process
// when a client closes a connection that carried concurrent streams (denoland/deno#36788: assertion
// in find_stream_on_goaway_func). A device agent must survive every client disconnect, so the
// transport is ours: frames, HPACK, flow control, and gRPC's length-prefixed messages and trailers.

import { AgentError, CallCancelled, type CancelReason, Status } from "../errors.ts";
import { encodeHeaders, type Header, HpackDecoder } from "./hpack.ts";
import { BufferPool, type Lease } from "./buffers.ts";
import { SocketWriter } from "./socket_writer.ts";
import { parseRequestHeaders, trailersProblem } from "./request_headers.ts";

import {
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
  FrameBuffer,
  frameHeader,
  FrameType,
  MAX_WINDOW,
  type MessageAlignment,
  MessageReader,
  MessageSplitter,
  parseSettings,
  pingReply,
  PREFACE,
  SETTINGS_HEADER_TABLE_SIZE,
  SETTINGS_INITIAL_WINDOW_SIZE,
  SETTINGS_MAX_CONCURRENT_STREAMS,
  SETTINGS_MAX_FRAME_SIZE,
  SETTINGS_MAX_HEADER_LIST_SIZE,
  settingsFrame,
  streamDependency,
  u32Payload,
  unpad,
  windowIncrement,
  writeFrame,
  writeMessageFrame,
} from "./frames.ts";
import {
  Backoff,
  ByteBudget,
  CONTROL_BURST_SECONDS,
  DEFAULT_LIMITS,
  SendHeap,
  type ServerLimits,
  TokenBucket,
} from "./limits.ts";

/** Request messages a streaming call may hold before its handler takes them. */
const MAX_QUEUED_MESSAGES = 16;
/** A connection's read buffer while reads are small (an idle connection holds no more). */
const MIN_READ_BYTES = 1024;
/**
 * Its size once data flows: a large message then takes few reads. A unix socket holds about 200 KiB
 * in flight, so a larger buffer would rarely fill.
 */
const MAX_READ_BYTES = 256 * 1024;
/**
 * The largest frame we accept (SETTINGS_MAX_FRAME_SIZE): clients that honour it send a large message
 * in a quarter of the frames the default 16 KiB takes. A frame must fit the read buffer.
 */
const RECEIVE_MAX_FRAME = 64 * 1024;
/** How long a closing connection may take to flush its last frames before its socket is closed anyway. */
const CLOSE_FLUSH_MS = 1000;
/** After the stop's grace period, connections get this long to flush GOAWAY before they are cut. */
const STOP_FLUSH_MS = 200;
/** Our receive window: large, so a client can send a whole tensor without waiting for us. */
const RECEIVE_WINDOW = 16 * 1024 * 1024;
/**
 * How many streams we reset are remembered: frames the client sent on them before our RST_STREAM
 * reached it are ignored (RFC 9113 section 5.1), while frames on other closed streams are errors.
 */
const RESET_STREAMS_REMEMBERED = 1024;
/**
 * Request and write buffers kept for reuse once their call is done, at most this many bytes in all
 * (a det request and a few answers); spares unused for 30 s are dropped.
 */
const SPARE_BUFFER_BYTES = 32 * 1024 * 1024;
/** How many ranges of skipped stream ids are remembered (clients that skip ids are rare). */
const SKIPPED_RANGES_REMEMBERED = 64;
/** Response headers and the trailers of an OK call, the same on every call: HPACK-encoded once. */
const RESPONSE_HEADERS = encodeHeaders([
  [":status", "200"],
  ["content-type", "application/grpc"],
  ["grpc-accept-encoding", "identity"],
]);
const OK_TRAILERS = encodeHeaders([["grpc-status", String(Status.OK)]]);
/** Answers up to this size (frames included) are built whole in one buffer (see #respondWhole). */
const SMALL_ANSWER_BYTES = 16 * 1024;
/** The body of an HTTP error answer to a request that is not gRPC, for people and tools that look. */
const NOT_GRPC_BODY = new TextEncoder().encode(
  "This is a gRPC server: calls are POST requests with content-type application/grpc.\n",
);

/** The status of a unary call whose client sends a second message. */
const SECOND_MESSAGE = { status: Status.UNIMPLEMENTED, details: "more than one request message on a unary call" };

/** What a unary handler answers. */
export type UnaryResult = { message: Uint8Array } | { status: number; details: string };

/**
 * What a handler knows of its call: `signal` aborts (its reason a CallCancelled) when the deadline
 * passes, the client resets the call or its connection closes; `deadline` is the client's deadline
 * on the performance.now() clock (null: none).
 *
 * The request bytes are lent to the handler until its promise settles, then their buffer is reused
 * for another call (see buffers.ts): a handler that keeps views of them longer (without copying)
 * calls `keepRequest` and calls the function it returns once it lets go of them. `responseBuffer`
 * gives (once per call) a buffer for the response message, reused once the answer has been written.
 * Its methods are called on it (not passed around unbound).
 */
export interface CallContext {
  readonly signal: AbortSignal;
  /** Throws the CallCancelled `signal` would carry once the call is given up (without making the signal). */
  throwIfCancelled(): void;
  readonly deadline: number | null;
  keepRequest(): () => void;
  responseBuffer(length: number): Uint8Array;
}

/** One unary method: raw request bytes in, response bytes or a status out. */
export type UnaryHandler = (request: Uint8Array, call: CallContext) => Promise<UnaryResult>;

const TIMEOUT_UNIT_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 };
/** Longest timer a runtime keeps (about 24.8 days); longer deadlines are never reached. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Clients reset a call when their own deadline passes, and their clock started before ours (ours
 * starts when the headers arrive), so their reset can beat our timer by a little: a reset that
 * close to the deadline is the deadline, not the caller changing its mind.
 */
const DEADLINE_RESET_MARGIN_MS = 50;

function resetReason(stream: { deadline: number | null }): CancelReason {
  const deadlineReached = stream.deadline !== null && performance.now() >= stream.deadline - DEADLINE_RESET_MARGIN_MS;
  return deadlineReached ? "deadline" : "reset";
}

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
  /** Resource bounds; missing ones take DEFAULT_LIMITS. */
  limits?: Partial<ServerLimits>;
  /** Where unary methods want their large request messages placed in memory (see MessageAlignment). */
  alignments?: Map<string, MessageAlignment>;
  /** Reports a misbehaving connection (protocol errors); the server keeps running. */
  onConnectionError?: (message: string) => void;
  /** Reports a problem of the server itself (failed accept, refused connection). */
  onWarning?: (message: string, fields: Record<string, unknown>) => void;
}

interface Stream {
  id: number;
  headerBlock: Uint8Array[];
  /** Bytes of the header block being received, 9 per frame included (empty CONTINUATIONs count). */
  headerBytes: number;
  path: string;
  reader: MessageReader;
  /** The client finished sending (END_STREAM seen). */
  remoteClosed: boolean;
  /** We sent END_STREAM or RST_STREAM. */
  localClosed: boolean;
  /** Send window beyond the peer's initial window: the window is sendCredit + #peerInitialWindow. */
  sendCredit: number;
  /** Waiting in #parked for its own send window. */
  parked: boolean;
  /** Resolves a streaming handler waiting for its last response to leave (see #runStream). */
  onDrained: (() => void) | null;
  /** Response messages waiting for send window, then the trailers once the call has ended. */
  pending: { chunks: Uint8Array[]; trailers: Uint8Array | null } | null;
  /** Response headers went out (a later error needs trailers, not a trailers-only answer). */
  headersSent: boolean;
  /** A streaming call's request messages not yet taken by its handler. */
  incoming: {
    queue: Uint8Array[];
    splitter: MessageSplitter;
    /** The handler stopped reading requests: later ones are dropped unread. */
    discard: boolean;
    ended: boolean;
    wake: (() => void) | null;
  } | null;
  receivedSinceUpdate: number;
  dispatched: boolean;
  /** Counted in the server's in-flight calls. */
  counted: boolean;
  /** Bytes of the connection's request budget this stream's message holds. */
  reservedBytes: number;
  /**
   * Aborted when the call is given up (deadline, reset, connection closed); made only when a handler
   * asks for its signal (most calls never do), until then `cancelled` says why it was given up.
   */
  cancel: AbortController | null;
  cancelled: CallCancelled | null;
  /** The client's deadline (performance.now() clock) and the timer that enforces it. */
  deadline: number | null;
  deadlineTimer: ReturnType<typeof setTimeout> | null;
  /**
   * What to do with the header block being received once it is decoded (it always is, to keep
   * HPACK state in step): reset the stream with a stream error, or drop it (a stream we reset).
   */
  blockFault: { code: ErrorCode; reason: string } | "drop" | null;
  /** The request's content-length, checked against the DATA received (RFC 9113 section 8.1.1). */
  contentLength: number | null;
  dataReceived: number;
  /** A well-formed request that is not gRPC: the HTTP answer it gets once received whole. */
  notGrpc: { status: string; body: boolean } | null;
  /** The buffer the handler encoded its response into (CallContext.responseBuffer). */
  responseLease: Lease | null;
}

/** The signal that aborts when the stream's call is given up, made on first use. */
function cancelSignal(stream: Stream): AbortSignal {
  if (!stream.cancel) {
    stream.cancel = new AbortController();
    if (stream.cancelled) stream.cancel.abort(stream.cancelled);
  }
  return stream.cancel.signal;
}

/** A unary handler's view of its call (see CallContext). */
class UnaryCall implements CallContext {
  constructor(readonly stream: Stream, readonly lease: Lease, readonly pool: BufferPool) {}

  get signal(): AbortSignal {
    return cancelSignal(this.stream);
  }

  get deadline(): number | null {
    return this.stream.deadline;
  }

  throwIfCancelled(): void {
    if (this.stream.cancelled) throw this.stream.cancelled;
  }

  keepRequest(): () => void {
    const lease = this.lease;
    lease.retain();
    let held = true;
    return () => {
      if (held) lease.release();
      held = false;
    };
  }

  responseBuffer(length: number): Uint8Array {
    const stream = this.stream;
    if (stream.responseLease) throw new Error("one response buffer per call");
    stream.responseLease = this.pool.lease(length);
    return stream.responseLease.bytes;
  }
}

/** One client connection (exported so tests can drive it over an in-memory Deno.Conn). */
export class Connection {
  readonly #conn: Deno.Conn;
  readonly #out: SocketWriter;
  readonly #limits: ServerLimits;
  readonly #decoder: HpackDecoder;
  readonly #streams = new Map<number, Stream>();
  /** Streams with response bytes or trailers to send and send window of their own (in turn). */
  readonly #ready = new Set<Stream>();
  /** Streams whose response waits for their own send window. */
  readonly #parked = new SendHeap<Stream>();
  readonly #control: TokenBucket;
  /** Bytes handed to #send that have not gone out yet. */
  #queuedBytes = 0;
  /** Resolves the read loop, paused while #queuedBytes is over the bound. */
  #writable: PromiseWithResolvers<void> | null = null;
  /** When a byte last went either way, and when the writer last made progress (ms, performance.now()). */
  #lastActivity = performance.now();
  #lastWrite = performance.now();

  #lastStreamId = 0;
  #continuationOf: Stream | null = null;
  #sendWindow = DEFAULT_WINDOW;
  #peerInitialWindow = DEFAULT_WINDOW;
  #peerMaxFrame = DEFAULT_MAX_FRAME;
  #receivedSinceUpdate = 0;
  #reservedBytes = 0;
  #closed = false;
  /** Streams we reset, oldest first, up to RESET_STREAMS_REMEMBERED. */
  readonly #resetByUs = new Set<number>();
  /** Ranges of stream ids the client skipped (never opened), the newest SKIPPED_RANGES_REMEMBERED. */
  readonly #skipped: [from: number, to: number][] = [];
  /** Request messages' buffers (one function for every stream). */
  readonly #allocate = (length: number, offset: number) => this.server.pool.lease(length, offset);

  constructor(conn: Deno.Conn, private readonly server: GrpcServer) {
    this.#conn = conn;
    this.#out = new SocketWriter(conn, server.pool, (length) => this.#wrote(length), () => this.close());
    this.#limits = server.limits;
    this.#decoder = new HpackDecoder(4096, this.#limits.maxHeaderListBytes);
    const rate = this.#limits.controlFramesPerSecond;
    this.#control = new TokenBucket(rate, rate * CONTROL_BURST_SECONDS);
  }

  async serve(): Promise<void> {
    const incoming = new FrameBuffer(MIN_READ_BYTES, MAX_READ_BYTES, this.server.pool);
    let prefaceSeen = false;
    this.#send(this.#settingsFrame());
    this.#send(frame(FrameType.WINDOW_UPDATE, 0, 0, u32Payload(RECEIVE_WINDOW - DEFAULT_WINDOW)));
    try {
      for (;;) {
        // A peer that does not read what we write is not read either, until the writes drain.
        if (this.#queuedBytes > this.#limits.maxPendingWriteBytes) {
          this.#writable = Promise.withResolvers();
          await this.#writable.promise;
        }
        if (this.#closed) break;
        // Read into the connection's own buffer, reused (iterating conn.readable would close the
        // socket on an exception, before the GOAWAY that explains it is written).
        const count = await this.#conn.read(incoming.space());
        if (count === null) break;
        this.#lastActivity = performance.now();
        incoming.filled(count);
        if (!prefaceSeen) {
          if (incoming.length < PREFACE.length) continue;
          const preface = incoming.take(PREFACE.length);
          if (!preface.every((b, i) => b === PREFACE[i])) {
            throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad preface");
          }
          prefaceSeen = true;
        }
        incoming.takeFrames(RECEIVE_MAX_FRAME, (type, flags, streamId, payload) => {
          this.#checkFlood(type, flags, payload);
          this.#onFrame(type, flags, streamId, payload);
        });
      }
    } catch (error) {
      if (error instanceof ConnectionError) {
        this.server.reportConnectionError(error.message);
        this.goAway(error.code);
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
      [SETTINGS_MAX_CONCURRENT_STREAMS, this.#limits.maxConcurrentStreams],
      [SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW],
      [SETTINGS_MAX_FRAME_SIZE, RECEIVE_MAX_FRAME],
      [SETTINGS_MAX_HEADER_LIST_SIZE, this.#limits.maxHeaderListBytes],
    ]);
  }

  /**
   * Frames that carry no request data cost a token each; a peer sending them faster than
   * controlFramesPerSecond (beyond the burst) is cut off. Legitimate clients send a handful per call.
   */
  #checkFlood(type: number, flags: number, payload: Uint8Array): void {
    const empty = payload.length === 0 && (
      (type === FrameType.DATA && !(flags & FLAG_END_STREAM)) ||
      ((type === FrameType.HEADERS || type === FrameType.CONTINUATION) && !(flags & FLAG_END_HEADERS))
    );
    const control = type === FrameType.PING || type === FrameType.SETTINGS || type === FrameType.RST_STREAM ||
      type === FrameType.WINDOW_UPDATE || type === FrameType.PRIORITY;
    if ((control || empty) && !this.#control.take()) {
      throw new ConnectionError(
        ErrorCode.ENHANCE_YOUR_CALM,
        `more than ${this.#limits.controlFramesPerSecond} control or empty frames a second (edge_agent_control_frames_per_second)`,
      );
    }
  }

  /**
   * Adds a HEADERS or CONTINUATION fragment to the stream's header block, within the size bound. The
   * last fragment is not kept: it is decoded from the frame, still in the read buffer.
   */
  #addHeaderFragment(stream: Stream, fragment: Uint8Array, last: boolean): void {
    stream.headerBytes += 9 + fragment.length;
    if (stream.headerBytes > this.#limits.maxHeaderListBytes) {
      throw new ConnectionError(
        ErrorCode.ENHANCE_YOUR_CALM,
        `header block over ${this.#limits.maxHeaderListBytes} bytes (edge_agent_max_header_list_bytes)`,
      );
    }
    if (last) this.#onHeaderBlock(stream, fragment);
    else if (fragment.length > 0) stream.headerBlock.push(fragment.slice());
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
        if (flags & FLAG_END_HEADERS) this.#continuationOf = null;
        this.#addHeaderFragment(stream, payload, (flags & FLAG_END_HEADERS) !== 0);
        return;
      }
      case FrameType.DATA:
        return this.#onData(flags, streamId, payload);
      case FrameType.RST_STREAM: {
        if (streamId === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0");
        if (payload.length !== 4) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length");
        if (this.#isIdle(streamId)) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream");
        const stream = this.#streams.get(streamId);
        if (stream) {
          this.#uncount(stream);
          this.#cancelHandler(stream, resetReason(stream));
          stream.localClosed = true;
          stream.remoteClosed = true;
          this.#streams.delete(streamId);
        }
        return;
      }
      case FrameType.GOAWAY:
        if (streamId !== 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream");
        if (payload.length < 8) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length");
        // The client will open no more streams; answers to open ones still go out.
        return;
      case FrameType.PRIORITY:
        // Priorities are advisory and ignored, but a malformed one is still an error (section 6.3).
        if (streamId === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0");
        if (payload.length !== 5) return this.#streamError(streamId, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length");
        if (streamDependency(type, flags, payload) === streamId) {
          return this.#streamError(streamId, ErrorCode.PROTOCOL_ERROR, "stream depends on itself");
        }
        return;
      case FrameType.PUSH_PROMISE:
        throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client");
      default:
        return; // Unknown frame types are ignored (RFC 9113 section 4.1).
    }
  }

  #onSettings(flags: number, streamId: number, payload: Uint8Array): void {
    if (streamId !== 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream");
    if (flags & FLAG_ACK) {
      if (payload.length !== 0) throw new ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload");
      return;
    }
    for (const [id, value] of parseSettings(payload)) {
      if (id === SETTINGS_INITIAL_WINDOW_SIZE) {
        if (value > this.#peerInitialWindow) {
          // Only a raise can overflow; streams are bounded by edge_agent_max_concurrent_streams and
          // SETTINGS by the control-frame rate.
          for (const stream of this.#streams.values()) {
            if (stream.sendCredit + value > MAX_WINDOW) {
              throw new ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window overflows a stream window");
            }
          }
        }
        this.#setPeerInitialWindow(value);
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
      if (!stream) {
        if (this.#isIdle(streamId)) {
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream");
        }
        return; // A closed stream: allowed for a while after it closed (section 5.1).
      }
      if (increment === 0) return this.#streamError(streamId, ErrorCode.PROTOCOL_ERROR, "zero window increment");
      stream.sendCredit += increment;
      if (this.#streamWindow(stream) > MAX_WINDOW) {
        return this.#streamError(streamId, ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow");
      }
      this.#windowChanged(stream);
    }
    this.#flushPending();
  }

  #streamWindow(stream: Stream): number {
    return stream.sendCredit + this.#peerInitialWindow;
  }

  /** Windows are kept relative to the initial one, so a change touches only the streams it unblocks. */
  #setPeerInitialWindow(value: number): void {
    const raised = value > this.#peerInitialWindow;
    this.#peerInitialWindow = value;
    if (raised) { for (const stream of this.#parked.popAbove(-value)) this.#ready.add(stream); }
  }

  /** A parked stream got window: it sends again (or waits under its new credit). */
  #windowChanged(stream: Stream): void {
    if (!stream.parked) return;
    this.#parked.unpark(stream);
    if (this.#streamWindow(stream) > 0) this.#ready.add(stream);
    else this.#parked.park(stream);
  }

  #onHeaders(flags: number, streamId: number, payload: Uint8Array): void {
    if (streamId === 0 || streamId % 2 === 0) throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad stream id");
    const block = unpad(flags, payload, true);
    let stream = this.#streams.get(streamId);
    let fault: Stream["blockFault"] = null;
    if (stream) {
      // Trailers from the client end its side; gRPC clients send none on unary calls.
      if (stream.remoteClosed) fault = { code: ErrorCode.STREAM_CLOSED, reason: "HEADERS after END_STREAM" };
      else if (!(flags & FLAG_END_STREAM)) fault = { code: ErrorCode.PROTOCOL_ERROR, reason: "second HEADERS" };
    } else {
      if (streamId <= this.#lastStreamId) {
        if (this.#skipped.some(([from, to]) => streamId >= from && streamId <= to)) {
          // Never opened, and now below the newest stream: an unexpected identifier (section 5.1.1).
          throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS with a stream id below one already opened");
        }
        if (!this.#resetByUs.has(streamId)) {
          throw new ConnectionError(ErrorCode.STREAM_CLOSED, "HEADERS on a closed stream");
        }
        // Sent before our RST_STREAM reached the client: decoded only to keep HPACK state in step.
        fault = "drop";
      }
      const firstSkipped = this.#lastStreamId === 0 ? 1 : this.#lastStreamId + 2;
      if (streamId > firstSkipped) {
        this.#skipped.push([firstSkipped, streamId - 2]);
        if (this.#skipped.length > SKIPPED_RANGES_REMEMBERED) this.#skipped.shift();
      }
      this.#lastStreamId = Math.max(this.#lastStreamId, streamId);
      stream = {
        id: streamId,
        headerBlock: [],
        headerBytes: 0,
        path: "",
        reader: new MessageReader(this.server.maxMessageBytes, {
          reserve: (bytes) => this.#reserve(stream!, bytes),
          secondMessage: SECOND_MESSAGE,
          allocate: this.#allocate,
        }),
        remoteClosed: false,
        localClosed: false,
        sendCredit: 0,
        parked: false,
        onDrained: null,
        pending: null,
        headersSent: false,
        incoming: null,
        receivedSinceUpdate: 0,
        dispatched: false,
        counted: false,
        reservedBytes: 0,
        cancel: null,
        cancelled: null,
        deadline: null,
        deadlineTimer: null,
        blockFault: null,
        contentLength: null,
        dataReceived: 0,
        notGrpc: null,
        responseLease: null,
      };
      if (fault !== "drop") this.#streams.set(streamId, stream);
    }
    if (!fault && streamDependency(FrameType.HEADERS, flags, payload) === streamId) {
      fault = { code: ErrorCode.PROTOCOL_ERROR, reason: "stream depends on itself" };
    }
    stream.blockFault = fault;
    if (flags & FLAG_END_STREAM) stream.remoteClosed = true;
    if (!(flags & FLAG_END_HEADERS)) this.#continuationOf = stream;
    this.#addHeaderFragment(stream, block, (flags & FLAG_END_HEADERS) !== 0);
  }

  /**
   * Room for a request message of `bytes`: requests declare their size up front; without a cap, a
   * client could make us allocate max-size buffers for a thousand streams it never fills. The
   * connection may hold two maximal messages, all connections together maxBufferedMessageBytes.
   */
  #reserve(stream: Stream, bytes: number): { status: number; details: string } | null {
    // A call already answered holds nothing more (its budget was given back once).
    if (stream.localClosed) return { status: Status.CANCELLED, details: "the call has ended" };
    if (this.#reservedBytes + bytes > 2 * this.server.maxMessageBytes) {
      return {
        status: Status.RESOURCE_EXHAUSTED,
        details: `too many large requests at once on this connection (a ${bytes}-byte message did not fit)`,
      };
    }
    if (!this.server.budget.reserve(bytes)) {
      return {
        status: Status.RESOURCE_EXHAUSTED,
        details:
          `the agent holds too many request messages (a ${bytes}-byte message did not fit in ${this.server.budget.limit} bytes, edge_agent_max_buffered_message_bytes)`,
      };
    }
    this.#reservedBytes += bytes;
    stream.reservedBytes += bytes;
    return null;
  }

  #release(stream: Stream, bytes: number): void {
    bytes = Math.min(bytes, stream.reservedBytes);
    this.#reservedBytes -= bytes;
    stream.reservedBytes -= bytes;
    this.server.budget.release(bytes);
  }

  /** The stream's header block is whole with `last`, its final fragment. */
  #onHeaderBlock(stream: Stream, last: Uint8Array): void {
    const fragments = stream.headerBlock;
    if (fragments.length > 0) fragments.push(last);
    const headers = decodeHeaderBlock(this.#decoder, fragments.length > 0 ? fragments : [last]);
    stream.headerBlock = [];
    stream.headerBytes = 0;
    const fault = stream.blockFault;
    stream.blockFault = null;
    if (fault === "drop") return;
    if (fault) return this.#streamError(stream.id, fault.code, fault.reason);
    if (stream.path !== "") {
      // Client trailers: only END_STREAM matters, once they and the body are well-formed.
      const problem = trailersProblem(headers) ?? this.#lengthProblem(stream);
      if (problem) return this.#streamError(stream.id, ErrorCode.PROTOCOL_ERROR, problem);
      if (stream.notGrpc) return this.#answerNotGrpc(stream);
      if (stream.incoming && stream.remoteClosed) {
        stream.incoming.ended = true;
        stream.incoming.wake?.();
      }
      this.#maybeDispatch(stream);
      return;
    }
    // A malformed request is a stream error, never a call (RFC 9113 section 8.1.1).
    const head = parseRequestHeaders(headers);
    if ("malformed" in head) return this.#streamError(stream.id, ErrorCode.PROTOCOL_ERROR, head.malformed);
    stream.contentLength = head.contentLength;
    const lengthProblem = this.#lengthProblem(stream);
    if (lengthProblem) return this.#streamError(stream.id, ErrorCode.PROTOCOL_ERROR, lengthProblem);
    const get = (name: string) => head.fields.get(name);
    stream.path = head.path || "/";
    stream.reader.alignment = this.server.alignments.get(stream.path) ?? null;
    if (this.#streams.size > this.#limits.maxConcurrentStreams) {
      return this.#reset(stream, ErrorCode.REFUSED_STREAM);
    }
    if (head.method !== "POST" || !(get("content-type") ?? "").startsWith("application/grpc")) {
      stream.notGrpc = { status: head.method !== "POST" ? "405" : "415", body: head.method !== "HEAD" };
      return this.#answerNotGrpc(stream);
    }
    if (this.server.stopping) {
      // Answered: DATA still arriving for it must not start its handler during the stop.
      stream.dispatched = true;
      return this.#respondStatus(stream, Status.UNAVAILABLE, "the agent is stopping");
    }
    // A call counts as in flight from its headers until its last frame is queued (or the stream or
    // connection ends): a stop waits for requests still arriving and for large responses still
    // waiting for window.
    stream.counted = true;
    this.server.callStarted(stream);
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
      const queue: Uint8Array[] = [];
      const reserve = (bytes: number) =>
        queue.length >= MAX_QUEUED_MESSAGES
          ? {
            status: Status.RESOURCE_EXHAUSTED,
            details: `more than ${MAX_QUEUED_MESSAGES} request messages wait for the handler`,
          }
          : this.#reserve(stream, bytes);
      stream.incoming = {
        queue,
        splitter: new MessageSplitter(this.server.maxMessageBytes, reserve, (message) => queue.push(message)),
        discard: false,
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
    const release = (bytes: number) => this.#release(stream, bytes);
    async function* requests(): AsyncIterable<Uint8Array> {
      try {
        for (;;) {
          if (incoming.queue.length > 0) {
            const message = incoming.queue.shift()!;
            release(message.length);
            yield message;
          } else if (incoming.ended) return;
          else await new Promise<void>((resolve) => incoming.wake = resolve);
        }
      } finally {
        // The handler reads no more (a Watch takes one request): what else comes is dropped.
        incoming.discard = true;
        for (const message of incoming.queue.splice(0)) release(message.length);
      }
    }
    try {
      for await (const response of handler(requests(), cancelSignal(stream))) {
        if (stream.localClosed || this.#closed) return;
        this.#queueMessage(stream, response);
        // The next response is asked for only once this one has left: a client that does not read
        // makes the handler wait, instead of making us hold its answers.
        if (stream.pending && stream.pending.chunks.length > 0) {
          await new Promise<void>((resolve) => stream.onDrained = resolve);
          if (stream.localClosed || this.#closed) return;
        }
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
    if (incoming.discard) return;
    incoming.splitter.push(data);
    const problem = incoming.splitter.problem;
    if (problem) return this.#abortStream(stream, problem.status, problem.details);
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
      if (streamId === 0 || this.#isIdle(streamId)) {
        throw new ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream");
      }
      if (this.#resetByUs.has(streamId)) return; // Sent before our RST_STREAM reached the client.
      // The client ended or reset this stream: a stream error we may (and do) treat as a connection error.
      throw new ConnectionError(ErrorCode.STREAM_CLOSED, "DATA on a closed stream");
    }
    if (stream.remoteClosed) return this.#reset(stream, ErrorCode.STREAM_CLOSED);
    stream.receivedSinceUpdate += payload.length;
    stream.dataReceived += data.length;
    if (flags & FLAG_END_STREAM) stream.remoteClosed = true;
    const lengthProblem = this.#lengthProblem(stream);
    if (lengthProblem) return this.#streamError(stream.id, ErrorCode.PROTOCOL_ERROR, lengthProblem);
    if (!stream.remoteClosed && stream.receivedSinceUpdate >= RECEIVE_WINDOW / 2) {
      this.#send(frame(FrameType.WINDOW_UPDATE, 0, stream.id, u32Payload(stream.receivedSinceUpdate)));
      stream.receivedSinceUpdate = 0;
    }
    if (stream.notGrpc) return this.#answerNotGrpc(stream); // Its body is checked, not kept.
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
    this.#runUnary(stream, handler, reader.message, reader.takeLease()!);
  }

  /**
   * Runs a unary handler and answers. The request's buffer is released here, and only here, once the
   * handler's promise has settled (see CallContext): whatever ended the call, the handler may still
   * read it until then.
   */
  async #runUnary(stream: Stream, handler: UnaryHandler, message: Uint8Array, lease: Lease): Promise<void> {
    // Started once the frames of this read are handled: a reset right behind the request (rapid
    // reset) has then cancelled the call before its handler does any work.
    await undefined;
    let result: UnaryResult;
    try {
      result = await handler(message, new UnaryCall(stream, lease, this.server.pool));
    } catch (error) {
      result = { status: Status.INTERNAL, details: String((error as Error)?.message ?? error) };
    } finally {
      lease.release();
    }
    try {
      if ("message" in result) this.#respondMessage(stream, result.message);
      else this.#respondStatus(stream, result.status, result.details);
    } finally {
      // A call that ended before its handler gave a buffer back (#uncount has run already).
      if (stream.localClosed || this.#closed) this.#dropResponse(stream);
    }
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

  #respondMessage(stream: Stream, message: Uint8Array): void {
    if (this.#respondWhole(stream, message)) return;
    this.#queueMessage(stream, message);
    this.#finish(stream, Status.OK, "");
  }

  /**
   * The usual answer, a small message that the windows and the write bound let out at once: its
   * HEADERS, DATA and trailers built in one buffer (one allocation and no join), as #queueMessage,
   * #flushPending and #finish would have sent them. False when the answer must take the general path.
   */
  #respondWhole(stream: Stream, message: Uint8Array): boolean {
    const data = 5 + message.length;
    const size = 9 + RESPONSE_HEADERS.length + 9 + data + 9 + OK_TRAILERS.length;
    if (
      stream.localClosed || this.#closed || stream.headersSent || stream.pending || this.#ready.size > 0 ||
      size > SMALL_ANSWER_BYTES ||
      data > Math.min(this.#peerMaxFrame, this.#sendWindow, this.#streamWindow(stream)) ||
      RESPONSE_HEADERS.length > this.#peerMaxFrame || this.#queuedBytes + size > this.#limits.maxPendingWriteBytes
    ) {
      return false;
    }
    const out = new Uint8Array(size);
    let at = writeFrame(out, 0, FrameType.HEADERS, FLAG_END_HEADERS, stream.id, RESPONSE_HEADERS);
    at = writeMessageFrame(out, at, 0, stream.id, message);
    writeFrame(out, at, FrameType.HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, stream.id, OK_TRAILERS);
    stream.headersSent = true;
    this.#sendWindow -= data;
    stream.sendCredit -= data;
    // As for any DATA frame: the peer may answer it with two WINDOW_UPDATEs (see #flushPending).
    this.#control.give(2);
    this.#send(out);
    this.#closeLocal(stream);
    return true;
  }

  /** Queues one length-prefixed response message (response headers first, once). */
  #queueMessage(stream: Stream, message: Uint8Array): void {
    if (stream.localClosed || this.#closed) return;
    // The length prefix goes out as its own piece: the message itself is copied only into the write.
    const prefix = new Uint8Array(5);
    new DataView(prefix.buffer).setUint32(1, message.length);
    if (!stream.headersSent) {
      this.#sendHeaderBlock(stream.id, RESPONSE_HEADERS, false);
      stream.headersSent = true;
    }
    stream.pending ??= { chunks: [], trailers: null };
    stream.pending.chunks.push(prefix, message);
    if (!stream.parked) this.#ready.add(stream);
    this.#flushPending();
  }

  /** Ends a call: trailers after any queued messages, or a trailers-only answer. */
  #finish(stream: Stream, status: number, details: string): void {
    if (stream.localClosed || this.#closed) return;
    if (!stream.headersSent) return this.#respondStatus(stream, status, details);
    stream.pending ??= { chunks: [], trailers: null };
    if (status === Status.OK && !details) stream.pending.trailers = OK_TRAILERS;
    else {
      const trailers: Header[] = [["grpc-status", String(status)]];
      if (details) trailers.push(["grpc-message", encodeGrpcMessage(details)]);
      stream.pending.trailers = encodeHeaders(trailers);
    }
    if (!stream.parked) this.#ready.add(stream);
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

  /**
   * Answers a well-formed request that is not gRPC with an HTTP error and a short text body (none
   * for HEAD), once the request has been received whole: until then its trailers and length are
   * still checked like any request's. The body waits for window like any response.
   */
  #answerNotGrpc(stream: Stream): void {
    if (!stream.remoteClosed || stream.dispatched || !stream.notGrpc) return;
    stream.dispatched = true;
    const body = stream.notGrpc.body ? NOT_GRPC_BODY : new Uint8Array(0);
    this.#sendHeaderBlock(
      stream.id,
      encodeHeaders([
        [":status", stream.notGrpc.status],
        ["content-type", "text/plain; charset=utf-8"],
        ["grpc-status", String(Status.UNIMPLEMENTED)],
      ]),
      body.length === 0,
    );
    if (body.length === 0) return this.#closeLocal(stream);
    if (body.length <= Math.min(this.#sendWindow, this.#streamWindow(stream))) {
      this.#sendWindow -= body.length;
      stream.sendCredit -= body.length;
      this.#send(frame(FrameType.DATA, FLAG_END_STREAM, stream.id, body));
      return this.#closeLocal(stream);
    }
    // Sent as the windows open, then an empty trailer section ends the stream.
    stream.headersSent = true;
    stream.pending = { chunks: [body], trailers: new Uint8Array(0) };
    this.#ready.add(stream);
    this.#flushPending();
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
    for (const part of parts) this.#send(part);
  }

  /**
   * Sends as much pending response data as the windows and the write bound allow; trailers follow
   * the last byte. Only streams that can send are visited: those waiting for their own window are
   * parked, and a full connection window or write buffer ends the round at once.
   */
  #flushPending(): void {
    const limit = this.#limits.maxPendingWriteBytes;
    for (const stream of this.#ready) {
      if (this.#queuedBytes >= limit || this.#closed) return;
      const pending = stream.pending;
      if (!pending || stream.localClosed) {
        this.#ready.delete(stream);
        continue;
      }
      const parts: Uint8Array[] = [];
      let bytes = 0;
      while (pending.chunks.length > 0) {
        const chunk = pending.chunks[0];
        let offset = 0;
        while (offset < chunk.length) {
          const size = Math.min(
            chunk.length - offset,
            this.#peerMaxFrame,
            this.#sendWindow,
            this.#streamWindow(stream),
            limit - this.#queuedBytes - bytes,
          );
          if (size <= 0) break;
          // Header and a view of the payload: #send joins small pieces into one write, large ones go as they are.
          parts.push(frameHeader(size, FrameType.DATA, 0, stream.id), chunk.subarray(offset, offset + size));
          offset += size;
          bytes += 9 + size;
          this.#sendWindow -= size;
          stream.sendCredit -= size;
          // The peer may answer each DATA frame with a WINDOW_UPDATE for the stream and one for the
          // connection (grpcio does, on every call): those are not a flood.
          this.#control.give(2);
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
      for (const part of parts) this.#send(part);
      if (done) this.#closeLocal(stream);
      if (!stream.pending || stream.pending.chunks.length === 0) {
        // Sent all it had (a streaming call may queue more later).
        this.#ready.delete(stream);
        stream.onDrained?.();
        stream.onDrained = null;
      } else if (this.#streamWindow(stream) <= 0) {
        this.#ready.delete(stream);
        this.#parked.park(stream);
      } else if (this.#sendWindow <= 0) {
        // Its turn ends: it goes last for the next WINDOW_UPDATE of the connection.
        this.#ready.delete(stream);
        this.#ready.add(stream);
        return;
      }
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
    this.#release(stream, stream.reservedBytes);
    // A message not handed to a handler goes back to the pool (one handed over is the handler's).
    stream.reader.dispose();
    this.#dropResponse(stream);
    this.#ready.delete(stream);
    this.#parked.unpark(stream);
    stream.onDrained?.();
    stream.onDrained = null;
    if (!stream.counted) return;
    stream.counted = false;
    this.server.callFinished(stream);
  }

  /**
   * The call's work stops (a running Predict is terminated) and a streaming handler waiting for
   * requests, or for anything else, ends instead of waiting forever.
   */
  #cancelHandler(stream: Stream, reason: CancelReason): void {
    if (!stream.cancelled) {
      stream.cancelled = new CallCancelled(reason);
      stream.cancel?.abort(stream.cancelled);
    }
    if (!stream.incoming) return;
    stream.incoming.ended = true;
    stream.incoming.wake?.();
  }

  /** Client-initiated ids above the last one opened, and every even id (we open none), are idle. */
  #isIdle(streamId: number): boolean {
    return streamId % 2 === 0 || streamId > this.#lastStreamId;
  }

  /**
   * A stream error (RFC 9113 section 5.4.2): an open stream is reset with `code`; on a stream that
   * is not open (where RST_STREAM may not be sent), it ends the connection with that code.
   */
  #streamError(streamId: number, code: ErrorCode, reason: string): void {
    const stream = this.#streams.get(streamId);
    if (!stream) throw new ConnectionError(code, reason);
    this.server.reportConnectionError(`stream ${streamId} reset: ${reason}`);
    this.#reset(stream, code);
  }

  /** The body received breaks the request's content-length, or null. */
  #lengthProblem(stream: Stream): string | null {
    const declared = stream.contentLength;
    if (declared === null) return null;
    const received = stream.dataReceived;
    if (received > declared || (stream.remoteClosed && received !== declared)) {
      return `content-length ${declared} but ${stream.remoteClosed ? "" : "at least "}${received} bytes of DATA`;
    }
    return null;
  }

  #reset(stream: Stream, code: ErrorCode): void {
    this.#send(frame(FrameType.RST_STREAM, 0, stream.id, u32Payload(code)));
    this.#resetByUs.add(stream.id);
    if (this.#resetByUs.size > RESET_STREAMS_REMEMBERED) {
      this.#resetByUs.delete(this.#resetByUs.values().next().value!);
    }
    this.#cancelHandler(stream, "reset");
    this.#uncount(stream);
    stream.localClosed = true;
    stream.remoteClosed = true;
    stream.dispatched = true;
    this.#streams.delete(stream.id);
  }

  /**
   * Queues bytes on the socket; #queuedBytes counts them until they have gone out. What is queued
   * while handling one read (or one answer) leaves together, once this turn of the event loop ends:
   * one write instead of one per frame, so the client wakes once (see SocketWriter).
   */
  #send(bytes: Uint8Array): void {
    if (this.#closed || bytes.length === 0) return;
    if (this.#queuedBytes === 0) this.#lastWrite = performance.now();
    this.#queuedBytes += bytes.length;
    this.#out.send(bytes);
  }

  /** A stream's response buffer goes back to the pool once the writes holding views of it are done. */
  #dropResponse(stream: Stream): void {
    const lease = stream.responseLease;
    if (!lease) return;
    stream.responseLease = null;
    this.#out.afterWrites(() => lease.release());
  }

  #wrote(length: number): void {
    this.#queuedBytes -= length;
    this.#lastActivity = this.#lastWrite = performance.now();
    if (this.#queuedBytes > this.#limits.maxPendingWriteBytes / 2) return;
    this.#writable?.resolve();
    this.#writable = null;
    if (this.#ready.size > 0) this.#flushPending();
  }

  /**
   * Housekeeping (about once a second): a connection idle for idleConnectionMs gets GOAWAY and is
   * closed; one whose peer has taken none of our bytes for that long is cut.
   */
  tick(now: number): void {
    const idleMs = this.#limits.idleConnectionMs;
    if (this.#queuedBytes > 0 && now - this.#lastWrite > idleMs) {
      this.server.reportConnectionError(`the client has read nothing for ${idleMs / 1000} s; connection closed`);
      this.close(0);
    } else if (this.#streams.size === 0 && now - this.#lastActivity > idleMs) {
      this.goAway(ErrorCode.NO_ERROR);
    }
  }

  /**
   * The agent is stopping and its grace period is over: every call still open gets UNAVAILABLE (a
   * status clients retry on) instead of a connection that just ends, and its work is stopped. A call
   * whose answer is already queued whole keeps it.
   */
  endCallsForStop(): void {
    for (const stream of [...this.#streams.values()]) {
      if (!stream.counted || stream.localClosed || stream.pending?.trailers) continue;
      this.#cancelHandler(stream, "disconnect");
      this.#finish(stream, Status.UNAVAILABLE, "the agent stopped before this call finished");
      // Answered whole while the client was still sending: ask it to stop.
      if (stream.localClosed && !stream.remoteClosed) this.#reset(stream, ErrorCode.NO_ERROR);
    }
  }

  /** Says GOAWAY and closes, giving the frame `flushMs` to go out. */
  goAway(code: ErrorCode, flushMs = CLOSE_FLUSH_MS): void {
    this.#send(frame(FrameType.GOAWAY, 0, 0, u32Payload(this.#lastStreamId, code)));
    this.close(flushMs);
  }

  /** Ends the connection: what is queued may go out for `flushMs`, then the socket is closed anyway. */
  close(flushMs = CLOSE_FLUSH_MS): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const stream of this.#streams.values()) {
      this.#uncount(stream);
      this.#cancelHandler(stream, "disconnect");
    }
    this.#writable?.resolve();
    this.#out.flush();
    const closeSocket = () => {
      clearTimeout(timer);
      try {
        this.#conn.close();
      } catch { /* already closed */ }
    };
    // A peer that does not read would hold the last writes (and the process) forever.
    const timer = setTimeout(closeSocket, flushMs);
    this.#out.afterWrites(closeSocket);
    this.server.connectionClosed(this);
  }
}

/** Serves gRPC methods on a Unix socket. */
export class GrpcServer {
  readonly methods: Map<string, UnaryHandler>;
  readonly streams: Map<string, StreamHandler>;
  readonly maxMessageBytes: number;
  readonly limits: ServerLimits;
  readonly alignments: Map<string, MessageAlignment>;
  /** Request message bytes held by all connections. */
  readonly budget: ByteBudget;
  /** Large request and write buffers, reused across calls and connections. */
  readonly pool = new BufferPool(SPARE_BUFFER_BYTES);
  stopping = false;
  readonly #connections = new Set<Connection>();
  #listener: Deno.UnixListener | null = null;
  /** Calls in progress (from their headers until their last frame is queued). */
  readonly #calls = new Set<{ path: string }>();
  #drained: PromiseWithResolvers<void> | null = null;
  #housekeeping: ReturnType<typeof setInterval> | undefined;
  /** Wakes the accept loop from its back-off when the server stops. */
  #wakeAccept: (() => void) | null = null;
  readonly #onConnectionError: (message: string) => void;
  readonly #onWarning: (message: string, fields: Record<string, unknown>) => void;

  constructor(options: GrpcServerOptions) {
    this.methods = options.methods;
    this.streams = options.streams ?? new Map();
    this.maxMessageBytes = options.maxMessageBytes;
    this.limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.alignments = options.alignments ?? new Map();
    this.budget = new ByteBudget(this.limits.maxBufferedMessageBytes);
    this.#onConnectionError = options.onConnectionError ?? (() => {});
    this.#onWarning = options.onWarning ?? (() => {});
  }

  listen(path: string): void {
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#accept(this.#listener);
    const period = Math.min(1000, Math.max(50, this.limits.idleConnectionMs / 4));
    this.#housekeeping = setInterval(() => {
      const now = performance.now();
      for (const connection of [...this.#connections]) connection.tick(now);
      this.pool.trim(now);
    }, period);
  }

  /**
   * Accepts until the server stops. A failed accept (out of descriptors: EMFILE, ENFILE; a client
   * gone before it was accepted: ECONNABORTED) is logged and retried after a growing pause: the
   * listener never dies of it. Past maxConnections a new connection is closed at once.
   */
  async #accept(listener: Deno.UnixListener): Promise<void> {
    const backoff = new Backoff();
    while (!this.stopping) {
      let conn: Deno.UnixConn;
      try {
        conn = await listener.accept();
        backoff.reset();
      } catch (error) {
        if (this.stopping || error instanceof Deno.errors.BadResource) return;
        const delayMs = backoff.nextDelay();
        this.#onWarning("accept failed; retrying", { error: (error as Error).message, retryMs: delayMs });
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, delayMs);
          this.#wakeAccept = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wakeAccept = null;
        continue;
      }
      if (this.#connections.size >= this.limits.maxConnections) {
        this.#onWarning("connection refused: too many connections (edge_agent_max_connections)", {
          maxConnections: this.limits.maxConnections,
        });
        try {
          conn.close();
        } catch { /* already closed */ }
        continue;
      }
      const connection = new Connection(conn, this);
      this.#connections.add(connection);
      connection.serve();
    }
  }

  reportConnectionError(message: string): void {
    this.#onConnectionError(message);
  }

  callStarted(call: { path: string }): void {
    this.#calls.add(call);
  }

  callFinished(call: { path: string }): void {
    this.#calls.delete(call);
    if (this.#calls.size === 0) this.#drained?.resolve();
  }

  connectionClosed(connection: Connection): void {
    this.#connections.delete(connection);
  }

  /**
   * Stops accepting connections and calls (new calls get UNAVAILABLE), waits up to `graceMs` for
   * calls in progress, then closes every connection whatever its client does. Returns the paths of
   * the calls cut off.
   */
  async stop(graceMs: number): Promise<string[]> {
    this.stopping = true;
    try {
      this.#listener?.close();
    } catch { /* already closed */ }
    this.#wakeAccept?.();
    clearInterval(this.#housekeeping);
    if (this.#calls.size > 0) {
      this.#drained = Promise.withResolvers();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs));
      await Promise.race([this.#drained.promise, timeout]);
      clearTimeout(timer);
    }
    const unfinished = [...this.#calls].map((call) => call.path);
    for (const connection of [...this.#connections]) {
      connection.endCallsForStop();
      connection.goAway(ErrorCode.NO_ERROR, STOP_FLUSH_MS);
    }
    return unfinished;
  }
}
