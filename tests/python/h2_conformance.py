#!/usr/bin/env python3
"""RFC 9113 conformance of the agent's HTTP/2 server, checked by an independent HTTP/2 peer.

Frames are built and parsed with hyperframe and header blocks with hpack (hyper-h2's own
components, not the agent's code); the well-behaved call made after every case goes through the h2
state machine, which also validates every frame the agent answers with.

Run by tests/h2_conformance_test.ts: `h2_conformance.py --socket PATH --service NAME` prints one
JSON list of {name, rfc, expected, got, ok}. Each case opens its own connection, sends what the rule
forbids (or allows), and checks the exact answer: GOAWAY with an error code (connection error),
RST_STREAM with an error code on the stream (stream error), or a response. After a stream error the
same connection must still serve a call (the header block was decoded, HPACK stays in step); after
every case a fresh connection must serve one.
"""

import argparse
import json
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import Frame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
CODES = {
    0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED",
}
CODE = {name: value for value, name in CODES.items()}
EMPTY_MESSAGE = b"\0\0\0\0\0"
WAIT = 3.0

SOCKET = ""
SERVICE = ""


def raw_frame(type_, flags, stream, payload=b""):
    """Any frame, including ones hyperframe would refuse to build (wrong lengths, reserved ids)."""
    return struct.pack(">I", len(payload))[1:] + bytes([type_, flags]) + struct.pack(">I", stream) + payload


def u32(*values):
    return b"".join(struct.pack(">I", v) for v in values)


def settings_payload(*pairs):
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


def grpc_request(path=None, extra=()):
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path or f"/{SERVICE}/ListModels"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


WATCH = "/grpc.health.v1.Health/Watch"


class Outcome(Exception):
    pass


class Raw:
    """A client connection speaking raw frames; answers are parsed with hyperframe and hpack."""

    def __init__(self, preface=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCKET)
        self.buffer = b""
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.closed = False
        self.write_failed = False
        self.block = {}
        self.settings = {}
        if preface:
            self.send(PREFACE + raw_frame(SETTINGS, 0, 0))

    def send(self, data):
        # Once the agent has closed, sends fail; what it sent before closing is still read.
        if self.write_failed:
            return
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.write_failed = True

    def headers(self, stream, headers, end_stream=True, flags=END_HEADERS, prefix=b""):
        block = self.encoder.encode(headers)
        self.send(raw_frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream, prefix + block))

    def call(self, stream, path=None, extra=(), message=EMPTY_MESSAGE):
        self.headers(stream, grpc_request(path, extra), end_stream=False)
        self.send(raw_frame(DATA, END_STREAM, stream, message))

    def next_frame(self, deadline):
        """The next frame from the agent (SETTINGS are acknowledged), or None once closed or timed out."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9:9 + length]))
                    self.buffer = self.buffer[9 + length:]
                    if frame.type == SETTINGS and "ACK" not in frame.flags:
                        self.settings.update(frame.settings)
                        self.send(raw_frame(SETTINGS, ACK, 0))
                    if frame.type in (HEADERS, CONTINUATION):
                        self.block.setdefault(frame.stream_id, b"")
                        self.block[frame.stream_id] += frame.data
                        if "END_HEADERS" in frame.flags:
                            frame.decoded = self.decoder.decode(self.block.pop(frame.stream_id), raw=False)
                    return frame
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.buffer += chunk

    def expect_goaway(self, code):
        deadline = time.monotonic() + WAIT
        while (frame := self.next_frame(deadline)) is not None:
            if frame.type == GOAWAY:
                got = f"GOAWAY {CODES.get(frame.error_code, frame.error_code)}"
                return got, frame.error_code == CODE[code]
            if frame.type == RST_STREAM:
                return f"RST_STREAM {CODES.get(frame.error_code)} on stream {frame.stream_id}", False
        return ("connection closed without GOAWAY" if self.closed else "no answer"), False

    def expect_rst(self, stream, code):
        deadline = time.monotonic() + WAIT
        while (frame := self.next_frame(deadline)) is not None:
            if frame.type == RST_STREAM and frame.stream_id == stream:
                got = f"RST_STREAM {CODES.get(frame.error_code, frame.error_code)}"
                return got, frame.error_code == CODE[code]
            if frame.type == GOAWAY:
                return f"GOAWAY {CODES.get(frame.error_code, frame.error_code)}", False
            if frame.type in (HEADERS, DATA) and frame.stream_id == stream and "END_STREAM" in frame.flags:
                return "the stream was answered", False
        return ("connection closed" if self.closed else "no answer"), False

    def response(self, stream):
        """(headers, trailers, body) of the answer on `stream`; raises Outcome on anything else."""
        deadline = time.monotonic() + WAIT
        blocks, body = [], b""
        while (frame := self.next_frame(deadline)) is not None:
            if frame.type == GOAWAY:
                raise Outcome(f"GOAWAY {CODES.get(frame.error_code)}")
            if frame.stream_id != stream:
                continue
            if frame.type == RST_STREAM:
                raise Outcome(f"RST_STREAM {CODES.get(frame.error_code)}")
            if frame.type in (HEADERS, CONTINUATION) and hasattr(frame, "decoded"):
                blocks.append(dict(frame.decoded))
            if frame.type == DATA:
                body += frame.data
            if frame.type in (HEADERS, DATA) and "END_STREAM" in frame.flags:
                return blocks[0], (blocks[1] if len(blocks) > 1 else blocks[0]), body
        raise Outcome("connection closed" if self.closed else "no answer")

    def first_data(self, stream):
        """Waits for the first DATA on `stream` (a Watch call's first status)."""
        deadline = time.monotonic() + WAIT
        while (frame := self.next_frame(deadline)) is not None:
            if frame.stream_id == stream and frame.type == DATA:
                return
            if frame.type in (GOAWAY, RST_STREAM):
                raise Outcome(f"{frame.__class__.__name__} before the Watch answered")
        raise Outcome("the Watch call did not answer")

    def call_ok(self, stream, extra=()):
        """A ListModels call on this connection ends with grpc-status 0."""
        self.call(stream, extra=extra)
        headers, trailers, _ = self.response(stream)
        if headers.get(":status") != "200" or trailers.get("grpc-status") != "0":
            raise Outcome(f"call answered {headers} {trailers}")

    def close(self):
        self.sock.close()


def h2_call(path=None, headers=None, body=EMPTY_MESSAGE):
    """One request through hyper-h2's state machine: (response headers, trailers, body)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(SOCKET)
    sock.settimeout(WAIT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers or grpc_request(path), end_stream=body is None)
    if body is not None:
        conn.send_data(stream, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    response, trailers, data = {}, {}, b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise Outcome("connection closed before the answer")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response = dict(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise Outcome(f"{type(event).__name__} {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded):
                    return response, trailers or response, data
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


def still_serves():
    """A fresh, well-behaved client's call succeeds."""
    _, trailers, _ = h2_call()
    if trailers.get("grpc-status") != "0":
        raise Outcome(f"a normal call afterwards got {trailers}")


CASES = []


TOKENS = ["SETTINGS_MAX_CONCURRENT_STREAMS", "RST_STREAM", "WINDOW_UPDATE", "END_STREAM", "ENABLE_PUSH", "INITIAL_WINDOW_SIZE", "MAX_FRAME_SIZE",
          "PUSH_PROMISE"]


def case(rfc, expected):
    """Registers a case; its name is the function's, with spaces (frame and setting names kept)."""

    def register(fn):
        name = fn.__name__.replace("2_31_minus_1", "2^31-1").replace("2_24_minus_1", "2^24-1")
        for token in TOKENS:
            name = name.replace(token, token.replace("_", "\0"))
        name = name.replace("_", " ").replace("\0", "_")
        CASES.append((name, rfc, expected, fn))
        return fn

    return register


def connection_error(code, *frames, setup=None):
    conn = Raw()
    if setup:
        setup(conn)
    for data in frames:
        conn.send(data)
    try:
        return conn.expect_goaway(code)
    finally:
        conn.close()


def stream_error(code, send, stream=1, follow_up=3):
    """`send(conn)` provokes a stream error on `stream`; the connection must then serve a call."""
    conn = Raw()
    try:
        send(conn)
        got, ok = conn.expect_rst(stream, code)
        if ok and follow_up:
            conn.call_ok(follow_up)
            got += ", then the connection served a call"
        return got, ok
    finally:
        conn.close()


def malformed(headers, data=None, end_stream=True, trailers=None):
    """A request breaking section 8: RST_STREAM PROTOCOL_ERROR on its stream, the connection lives on."""

    def send(conn):
        conn.headers(1, headers, end_stream=end_stream and data is None and trailers is None)
        if data is not None:
            conn.send(raw_frame(DATA, END_STREAM if trailers is None else 0, 1, data))
        if trailers is not None:
            conn.headers(1, trailers, end_stream=True)

    return stream_error("PROTOCOL_ERROR", send)


def watch(conn, stream=1, end_stream=True):
    """Opens a health Watch, which stays open once it has answered its first status."""
    conn.headers(stream, grpc_request(WATCH), end_stream=False)
    conn.send(raw_frame(DATA, END_STREAM if end_stream else 0, stream, EMPTY_MESSAGE))
    conn.first_data(stream)


def replace(headers, name, value):
    return [(n, value if n == name else v) for n, v in headers]


def without(headers, name):
    return [(n, v) for n, v in headers if n != name]


# --- Section 3.4 and 4: the preface and frames ---


@case("3.4", "GOAWAY PROTOCOL_ERROR")
def invalid_connection_preface():
    conn = Raw(preface=False)
    conn.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + raw_frame(SETTINGS, 0, 0))
    try:
        return conn.expect_goaway("PROTOCOL_ERROR")
    finally:
        conn.close()


@case("4.1", "ignored")
def unknown_frame_type_is_ignored():
    conn = Raw()
    try:
        conn.send(raw_frame(0x42, 0xFF, 0, b"hello"))
        conn.call_ok(1)
        return "ignored, the connection served a call", True
    finally:
        conn.close()


@case("4.2", "GOAWAY FRAME_SIZE_ERROR")
def frame_larger_than_max_frame_size():
    # One byte over the SETTINGS_MAX_FRAME_SIZE the agent advertised (16384 when it advertises none).
    conn = Raw()
    try:
        deadline = time.monotonic() + WAIT
        while 0x5 not in conn.settings and conn.next_frame(deadline) is not None:
            pass
        conn.send(raw_frame(DATA, 0, 1, b"x" * (conn.settings.get(0x5, 16384) + 1)))
        return conn.expect_goaway("FRAME_SIZE_ERROR")
    finally:
        conn.close()


# --- Section 5.1: stream states ---


@case("5.1", "GOAWAY PROTOCOL_ERROR")
def idle_stream_DATA():
    return connection_error("PROTOCOL_ERROR", raw_frame(DATA, END_STREAM, 1, b"test"))


@case("5.1", "GOAWAY PROTOCOL_ERROR")
def idle_stream_RST_STREAM():
    return connection_error("PROTOCOL_ERROR", raw_frame(RST_STREAM, 0, 1, u32(CODE["CANCEL"])))


@case("5.1", "GOAWAY PROTOCOL_ERROR")
def idle_stream_WINDOW_UPDATE():
    return connection_error("PROTOCOL_ERROR", raw_frame(WINDOW_UPDATE, 0, 1, u32(100)))


@case("5.1", "GOAWAY PROTOCOL_ERROR")
def idle_stream_CONTINUATION():
    block = hpack.Encoder().encode(grpc_request())
    return connection_error("PROTOCOL_ERROR", raw_frame(CONTINUATION, END_HEADERS, 1, block))


@case("5.1", "RST_STREAM STREAM_CLOSED")
def half_closed_remote_DATA():
    def send(conn):
        watch(conn)
        conn.send(raw_frame(DATA, 0, 1, EMPTY_MESSAGE))

    return stream_error("STREAM_CLOSED", send)


@case("5.1", "RST_STREAM STREAM_CLOSED")
def half_closed_remote_HEADERS():
    def send(conn):
        watch(conn)
        conn.headers(1, [("x-trailer", "1")], end_stream=True)

    return stream_error("STREAM_CLOSED", send)


@case("5.1", "GOAWAY STREAM_CLOSED")
def closed_stream_DATA_after_END_STREAM():
    return connection_error("STREAM_CLOSED", raw_frame(DATA, END_STREAM, 1, b"test"), setup=lambda c: c.call_ok(1))


@case("5.1", "GOAWAY STREAM_CLOSED")
def closed_stream_HEADERS_after_END_STREAM():
    def setup(conn):
        conn.call_ok(1)
        conn.headers(1, grpc_request())

    return connection_error("STREAM_CLOSED", setup=setup)


@case("5.1", "GOAWAY STREAM_CLOSED")
def closed_stream_DATA_after_client_RST_STREAM():
    def setup(conn):
        watch(conn, end_stream=False)
        conn.send(raw_frame(RST_STREAM, 0, 1, u32(CODE["CANCEL"])))

    return connection_error("STREAM_CLOSED", raw_frame(DATA, 0, 1, EMPTY_MESSAGE), setup=setup)


@case("5.1", "ignored")
def closed_stream_WINDOW_UPDATE_RST_STREAM_PRIORITY_allowed():
    conn = Raw()
    try:
        conn.call_ok(1)
        conn.send(raw_frame(WINDOW_UPDATE, 0, 1, u32(100)))
        conn.send(raw_frame(RST_STREAM, 0, 1, u32(CODE["CANCEL"])))
        conn.send(raw_frame(PRIORITY, 0, 1, u32(0) + b"\x10"))
        conn.call_ok(3)
        return "ignored, the connection served a call", True
    finally:
        conn.close()


@case("5.1", "ignored")
def frames_in_flight_after_our_RST_STREAM_are_ignored():
    conn = Raw()
    try:
        # A call declaring a message beyond any limit, still sending: answered and reset (NO_ERROR).
        conn.headers(1, grpc_request(), end_stream=False)
        conn.send(raw_frame(DATA, 0, 1, b"\0\xff\xff\xff\xff"))
        _, trailers, _ = conn.response(1)
        if trailers.get("grpc-status") != "8":
            return f"the call answered {trailers}", False
        got, ok = conn.expect_rst(1, "NO_ERROR")
        if not ok:
            return got, False
        # What the client had sent meanwhile: DATA, then trailers that add to the HPACK table.
        conn.send(raw_frame(DATA, 0, 1, b"body"))
        conn.headers(1, [("x-late-trailer", "indexed")], end_stream=True)
        # This call names that field by its table index: it decodes right only if the trailers were decoded.
        conn.call_ok(3, extra=[("x-late-trailer", "indexed")])
        return "ignored, the connection served a call", True
    finally:
        conn.close()


@case("5.1.1", "GOAWAY PROTOCOL_ERROR")
def even_stream_id_from_client():
    return connection_error("PROTOCOL_ERROR", setup=lambda c: c.headers(2, grpc_request()))


@case("5.1.1", "GOAWAY PROTOCOL_ERROR")
def stream_id_lower_than_one_already_opened():
    def setup(conn):
        conn.call_ok(5)
        conn.headers(3, grpc_request())

    return connection_error("PROTOCOL_ERROR", setup=setup)


@case("5.1.2", "RST_STREAM REFUSED_STREAM")
def streams_beyond_SETTINGS_MAX_CONCURRENT_STREAMS():
    conn = Raw()
    try:
        deadline = time.monotonic() + WAIT
        while 3 not in conn.settings and conn.next_frame(deadline) is not None:
            pass
        limit = conn.settings.get(3)
        if limit is None:
            return "no SETTINGS_MAX_CONCURRENT_STREAMS advertised", False
        # A zero window keeps every answered stream open (its body waits), as h2spec does.
        conn.send(raw_frame(SETTINGS, 0, 0, settings_payload((4, 0))))
        last = 2 * limit + 1
        for stream in range(1, last + 1, 2):
            conn.headers(stream, GET)
        return conn.expect_rst(last, "REFUSED_STREAM")
    finally:
        conn.close()


# --- Section 5.3.1: dependencies ---


@case("5.3.1", "RST_STREAM PROTOCOL_ERROR")
def HEADERS_depending_on_itself():
    def send(conn):
        conn.headers(1, grpc_request(), flags=END_HEADERS | PRIORITY_FLAG, prefix=u32(1) + b"\xff")

    return stream_error("PROTOCOL_ERROR", send)


@case("5.3.1", "RST_STREAM PROTOCOL_ERROR")
def PRIORITY_depending_on_itself_open_stream():
    def send(conn):
        watch(conn)
        conn.send(raw_frame(PRIORITY, 0, 1, u32(1) + b"\x10"))

    return stream_error("PROTOCOL_ERROR", send)


@case("5.3.1", "GOAWAY PROTOCOL_ERROR")
def PRIORITY_depending_on_itself_idle_stream():
    # RST_STREAM may not be sent on an idle stream (section 6.4): the stream error ends the connection.
    return connection_error("PROTOCOL_ERROR", raw_frame(PRIORITY, 0, 3, u32(3) + b"\x10"))


# --- Section 6: frame definitions ---


@case("6.1", "GOAWAY PROTOCOL_ERROR")
def DATA_on_stream_0():
    return connection_error("PROTOCOL_ERROR", raw_frame(DATA, 0, 0, b"test"))


@case("6.1", "GOAWAY PROTOCOL_ERROR")
def DATA_padding_longer_than_payload():
    def setup(conn):
        conn.headers(1, grpc_request(), end_stream=False)

    return connection_error("PROTOCOL_ERROR", raw_frame(DATA, PADDED, 1, b"\x06abc"), setup=setup)


@case("4.2", "GOAWAY FRAME_SIZE_ERROR")
def DATA_padded_without_a_Pad_Length_field():
    def setup(conn):
        conn.headers(1, grpc_request(), end_stream=False)

    return connection_error("FRAME_SIZE_ERROR", raw_frame(DATA, PADDED, 1, b""), setup=setup)


@case("4.2", "GOAWAY FRAME_SIZE_ERROR")
def HEADERS_too_short_for_its_priority_fields():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1, b"\0\0"))


@case("6.2", "GOAWAY PROTOCOL_ERROR")
def HEADERS_on_stream_0():
    return connection_error("PROTOCOL_ERROR", setup=lambda c: c.headers(0, grpc_request()))


@case("6.2", "GOAWAY PROTOCOL_ERROR")
def HEADERS_padding_longer_than_payload():
    block = hpack.Encoder().encode(grpc_request())
    bad = raw_frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, bytes([len(block) + 1]) + block)
    return connection_error("PROTOCOL_ERROR", bad)


@case("6.2", "GOAWAY PROTOCOL_ERROR")
def HEADERS_interrupted_by_another_frame():
    def setup(conn):
        conn.headers(1, grpc_request(), flags=0)
        conn.send(raw_frame(PING, 0, 0, b"12345678"))

    return connection_error("PROTOCOL_ERROR", setup=setup)


@case("6.3", "GOAWAY PROTOCOL_ERROR")
def PRIORITY_on_stream_0():
    return connection_error("PROTOCOL_ERROR", raw_frame(PRIORITY, 0, 0, u32(1) + b"\x10"))


@case("6.3", "RST_STREAM FRAME_SIZE_ERROR")
def PRIORITY_length_not_5_open_stream():
    def send(conn):
        watch(conn)
        conn.send(raw_frame(PRIORITY, 0, 1, u32(0)))

    return stream_error("FRAME_SIZE_ERROR", send)


@case("6.3", "GOAWAY FRAME_SIZE_ERROR")
def PRIORITY_length_not_5_idle_stream():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(PRIORITY, 0, 1, u32(0) + b"\x10\x00"))


@case("6.4", "GOAWAY PROTOCOL_ERROR")
def RST_STREAM_on_stream_0():
    return connection_error("PROTOCOL_ERROR", raw_frame(RST_STREAM, 0, 0, u32(CODE["CANCEL"])))


@case("6.4", "GOAWAY FRAME_SIZE_ERROR")
def RST_STREAM_length_not_4():
    def setup(conn):
        watch(conn)

    return connection_error("FRAME_SIZE_ERROR", raw_frame(RST_STREAM, 0, 1, b"\0\0\0"), setup=setup)


@case("6.5", "GOAWAY FRAME_SIZE_ERROR")
def SETTINGS_ACK_with_payload():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(SETTINGS, ACK, 0, settings_payload((4, 100))))


@case("6.5", "GOAWAY PROTOCOL_ERROR")
def SETTINGS_on_a_stream():
    return connection_error("PROTOCOL_ERROR", raw_frame(SETTINGS, 0, 1, settings_payload((4, 100))))


@case("6.5", "GOAWAY FRAME_SIZE_ERROR")
def SETTINGS_length_not_multiple_of_6():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(SETTINGS, 0, 0, b"\0\x04\0\0\0"))


@case("6.5.2", "GOAWAY PROTOCOL_ERROR")
def SETTINGS_ENABLE_PUSH_2():
    return connection_error("PROTOCOL_ERROR", raw_frame(SETTINGS, 0, 0, settings_payload((2, 2))))


@case("6.5.2", "GOAWAY FLOW_CONTROL_ERROR")
def SETTINGS_INITIAL_WINDOW_SIZE_above_2_31_minus_1():
    return connection_error("FLOW_CONTROL_ERROR", raw_frame(SETTINGS, 0, 0, settings_payload((4, 2**31))))


@case("6.5.2", "GOAWAY PROTOCOL_ERROR")
def SETTINGS_MAX_FRAME_SIZE_below_16384():
    return connection_error("PROTOCOL_ERROR", raw_frame(SETTINGS, 0, 0, settings_payload((5, 16383))))


@case("6.5.2", "GOAWAY PROTOCOL_ERROR")
def SETTINGS_MAX_FRAME_SIZE_above_2_24_minus_1():
    return connection_error("PROTOCOL_ERROR", raw_frame(SETTINGS, 0, 0, settings_payload((5, 2**24))))


@case("6.5.2", "SETTINGS ACK")
def SETTINGS_unknown_identifier_ignored_and_acknowledged():
    conn = Raw()
    try:
        conn.send(raw_frame(SETTINGS, 0, 0, settings_payload((0xFF, 1), (2, 0))))
        deadline = time.monotonic() + WAIT
        acks = 0
        while (frame := conn.next_frame(deadline)) is not None:
            if frame.type == SETTINGS and "ACK" in frame.flags:
                acks += 1
                if acks == 2:  # one for the preface's SETTINGS, one for this one
                    conn.call_ok(1)
                    return "SETTINGS ACK, the connection served a call", True
            if frame.type == GOAWAY:
                return f"GOAWAY {CODES.get(frame.error_code)}", False
        return "no SETTINGS ACK", False
    finally:
        conn.close()


@case("6.5.3", "GOAWAY PROTOCOL_ERROR")
def PUSH_PROMISE_from_a_client():
    return connection_error("PROTOCOL_ERROR", raw_frame(PUSH_PROMISE, END_HEADERS, 1, u32(2)))


@case("6.7", "PING ACK")
def PING_is_answered_with_same_payload():
    conn = Raw()
    try:
        conn.send(raw_frame(PING, 0, 0, b"h2-peer!"))
        deadline = time.monotonic() + WAIT
        while (frame := conn.next_frame(deadline)) is not None:
            if frame.type == PING:
                ok = "ACK" in frame.flags and frame.opaque_data == b"h2-peer!"
                return f"PING flags={sorted(frame.flags)} data={frame.opaque_data!r}", ok
        return "no PING answer", False
    finally:
        conn.close()


@case("6.7", "GOAWAY PROTOCOL_ERROR")
def PING_on_a_stream():
    return connection_error("PROTOCOL_ERROR", raw_frame(PING, 0, 1, b"12345678"))


@case("6.7", "GOAWAY FRAME_SIZE_ERROR")
def PING_length_not_8():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(PING, 0, 0, b"123456"))


@case("6.8", "GOAWAY PROTOCOL_ERROR")
def GOAWAY_on_a_stream():
    return connection_error("PROTOCOL_ERROR", raw_frame(GOAWAY, 0, 1, u32(0, 0)))


@case("6.9", "GOAWAY PROTOCOL_ERROR")
def WINDOW_UPDATE_zero_on_connection():
    return connection_error("PROTOCOL_ERROR", raw_frame(WINDOW_UPDATE, 0, 0, u32(0)))


@case("6.9", "RST_STREAM PROTOCOL_ERROR")
def WINDOW_UPDATE_zero_on_stream():
    def send(conn):
        watch(conn)
        conn.send(raw_frame(WINDOW_UPDATE, 0, 1, u32(0)))

    return stream_error("PROTOCOL_ERROR", send)


@case("6.9", "GOAWAY FRAME_SIZE_ERROR")
def WINDOW_UPDATE_length_not_4():
    return connection_error("FRAME_SIZE_ERROR", raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"))


@case("6.9.1", "GOAWAY FLOW_CONTROL_ERROR")
def WINDOW_UPDATE_overflows_connection_window():
    return connection_error(
        "FLOW_CONTROL_ERROR",
        raw_frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)),
        raw_frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)),
    )


@case("6.9.1", "RST_STREAM FLOW_CONTROL_ERROR")
def WINDOW_UPDATE_overflows_stream_window():
    def send(conn):
        watch(conn)
        conn.send(raw_frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1)))

    return stream_error("FLOW_CONTROL_ERROR", send)


@case("6.9.2", "GOAWAY FLOW_CONTROL_ERROR")
def SETTINGS_INITIAL_WINDOW_SIZE_overflows_a_stream_window():
    def setup(conn):
        watch(conn)
        # The stream's window (65535 less the Watch's answer) grows to just under 2^31-1 ...
        conn.send(raw_frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1 - 65535)))

    # ... and a larger initial window would push it over.
    return connection_error("FLOW_CONTROL_ERROR", raw_frame(SETTINGS, 0, 0, settings_payload((4, 65535 + 1000))), setup=setup)


def data_within(conn, stream, seconds):
    """(DATA bytes received on `stream` within `seconds`, whether the stream ended, any GOAWAY)."""
    deadline = time.monotonic() + seconds
    received, ended = 0, False
    while (frame := conn.next_frame(deadline)) is not None:
        if frame.type == GOAWAY:
            raise Outcome(f"GOAWAY {CODES.get(frame.error_code)}")
        if frame.stream_id == stream and frame.type == DATA:
            received += len(frame.data)
        if frame.stream_id == stream and "END_STREAM" in frame.flags:
            ended = True
            break
    return received, ended


GET = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "localhost")]


@case("6.9.1", "1 byte of DATA, the rest after WINDOW_UPDATE")
def response_DATA_stays_within_a_1_byte_window():
    conn = Raw()
    try:
        conn.send(raw_frame(SETTINGS, 0, 0, settings_payload((4, 1))))
        conn.headers(1, GET)
        first, ended = data_within(conn, 1, 0.5)
        if first != 1 or ended:
            return f"{first} bytes of DATA in a 1-byte window (ended: {ended})", False
        conn.send(raw_frame(WINDOW_UPDATE, 0, 1, u32(1000)))
        rest, ended = data_within(conn, 1, WAIT)
        return f"1 byte, then {rest} more after WINDOW_UPDATE (ended: {ended})", rest > 0 and ended
    finally:
        conn.close()


@case("6.9.2", "no DATA in a 0 window, 1 byte once it is 1")
def INITIAL_WINDOW_SIZE_change_applies_to_open_streams():
    conn = Raw()
    try:
        conn.send(raw_frame(SETTINGS, 0, 0, settings_payload((4, 0))))
        conn.headers(1, GET)
        first, _ = data_within(conn, 1, 0.5)
        conn.send(raw_frame(SETTINGS, 0, 0, settings_payload((4, 1))))
        second, ended = data_within(conn, 1, 0.5)
        return f"{first} bytes at window 0, {second} at window 1", first == 0 and second == 1 and not ended
    finally:
        conn.close()


@case("6.10", "GOAWAY PROTOCOL_ERROR")
def CONTINUATION_on_another_stream():
    def setup(conn):
        block = conn.encoder.encode(grpc_request())
        conn.send(raw_frame(HEADERS, END_STREAM, 1, block[:5]))
        conn.send(raw_frame(CONTINUATION, END_HEADERS, 3, block[5:]))

    return connection_error("PROTOCOL_ERROR", setup=setup)


@case("6.10", "response")
def CONTINUATION_completes_a_header_block():
    conn = Raw()
    try:
        block = conn.encoder.encode(grpc_request())
        conn.send(raw_frame(HEADERS, 0, 1, block[:3]))
        conn.send(raw_frame(CONTINUATION, 0, 1, block[3:7]))
        conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[7:]))
        conn.send(raw_frame(DATA, END_STREAM, 1, EMPTY_MESSAGE))
        _, trailers, _ = conn.response(1)
        return f"grpc-status {trailers.get('grpc-status')}", trailers.get("grpc-status") == "0"
    finally:
        conn.close()


@case("6.10", "response")
def CONTINUATION_in_a_later_read():
    # Each fragment arrives in a read of its own: the agent keeps the earlier ones, not views of its read buffer.
    conn = Raw()
    try:
        block = conn.encoder.encode(grpc_request())
        conn.send(raw_frame(HEADERS, 0, 1, block[:3]))
        time.sleep(0.05)
        conn.send(raw_frame(CONTINUATION, 0, 1, block[3:7]))
        time.sleep(0.05)
        conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[7:]) + raw_frame(DATA, END_STREAM, 1, EMPTY_MESSAGE))
        _, trailers, _ = conn.response(1)
        return f"grpc-status {trailers.get('grpc-status')}", trailers.get("grpc-status") == "0"
    finally:
        conn.close()


# --- Section 8: HTTP semantics (requests) ---


@case("8.2", "RST_STREAM PROTOCOL_ERROR")
def uppercase_field_name():
    return malformed(grpc_request(extra=[("X-Upper", "1")]))


@case("8.2.1", "RST_STREAM PROTOCOL_ERROR")
def field_value_with_line_feed():
    return malformed(grpc_request(extra=[("x-value", "a\nb")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def connection_header():
    return malformed(grpc_request(extra=[("connection", "keep-alive")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def keep_alive_header():
    return malformed(grpc_request(extra=[("keep-alive", "timeout=5")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def proxy_connection_header():
    return malformed(grpc_request(extra=[("proxy-connection", "keep-alive")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def transfer_encoding_header():
    return malformed(grpc_request(extra=[("transfer-encoding", "chunked")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def upgrade_header():
    return malformed(grpc_request(extra=[("upgrade", "h2c")]))


@case("8.2.2", "RST_STREAM PROTOCOL_ERROR")
def TE_other_than_trailers():
    return malformed(replace(grpc_request(), "te", "trailers, deflate"))


@case("8.3", "RST_STREAM PROTOCOL_ERROR")
def unknown_pseudo_header():
    return malformed([*grpc_request()[:4], (":foo", "bar"), *grpc_request()[4:]])


@case("8.3", "RST_STREAM PROTOCOL_ERROR")
def response_pseudo_header_in_request():
    return malformed([*grpc_request()[:4], (":status", "200"), *grpc_request()[4:]])


@case("8.3", "RST_STREAM PROTOCOL_ERROR")
def pseudo_header_after_regular_field():
    request = grpc_request()
    return malformed([*request[:3], *request[4:], request[3]])


@case("8.3", "RST_STREAM PROTOCOL_ERROR")
def duplicated_method():
    return malformed([grpc_request()[0], *grpc_request()])


@case("8.3", "RST_STREAM PROTOCOL_ERROR")
def duplicated_path():
    request = grpc_request()
    return malformed([*request[:3], request[2], *request[3:]])


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def missing_method():
    return malformed(without(grpc_request(), ":method"))


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def missing_scheme():
    return malformed(without(grpc_request(), ":scheme"))


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def missing_path():
    return malformed(without(grpc_request(), ":path"))


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def empty_method():
    return malformed(replace(grpc_request(), ":method", ""))


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def empty_scheme():
    return malformed(replace(grpc_request(), ":scheme", ""))


@case("8.3.1", "RST_STREAM PROTOCOL_ERROR")
def empty_path():
    return malformed(replace(grpc_request(), ":path", ""))


@case("8.1.1", "RST_STREAM PROTOCOL_ERROR")
def content_length_larger_than_DATA():
    return malformed(grpc_request(extra=[("content-length", "6")]), data=EMPTY_MESSAGE)


@case("8.1.1", "RST_STREAM PROTOCOL_ERROR")
def content_length_smaller_than_DATA():
    return malformed(grpc_request(extra=[("content-length", "4")]), data=EMPTY_MESSAGE)


@case("8.1.1", "RST_STREAM PROTOCOL_ERROR")
def content_length_without_DATA():
    return malformed(grpc_request(extra=[("content-length", "1")]))


@case("8.1.1", "response")
def content_length_matching_DATA():
    conn = Raw()
    try:
        conn.call(1, extra=[("content-length", "5")])
        _, trailers, _ = conn.response(1)
        return f"grpc-status {trailers.get('grpc-status')}", trailers.get("grpc-status") == "0"
    finally:
        conn.close()


@case("8.1", "RST_STREAM PROTOCOL_ERROR")
def pseudo_header_in_trailers():
    return malformed(grpc_request(), data=EMPTY_MESSAGE, trailers=[(":path", "/x")])


@case("8.1", "RST_STREAM PROTOCOL_ERROR")
def second_HEADERS_without_END_STREAM():
    def send(conn):
        conn.headers(1, grpc_request(), end_stream=False)
        conn.headers(1, [("x-more", "1")], end_stream=False)

    return stream_error("PROTOCOL_ERROR", send)


@case("8.1", "response")
def valid_trailers_end_the_request():
    conn = Raw()
    try:
        conn.headers(1, grpc_request(), end_stream=False)
        conn.send(raw_frame(DATA, 0, 1, EMPTY_MESSAGE))
        conn.headers(1, [("x-checksum", "0")], end_stream=True)
        _, trailers, _ = conn.response(1)
        return f"grpc-status {trailers.get('grpc-status')}", trailers.get("grpc-status") == "0"
    finally:
        conn.close()


@case("8.1", "RST_STREAM PROTOCOL_ERROR")
def GET_second_HEADERS_without_END_STREAM():
    def send(conn):
        conn.headers(1, GET, end_stream=False)
        conn.headers(1, [("x-more", "1")], end_stream=False)

    return stream_error("PROTOCOL_ERROR", send)


@case("8.1", "RST_STREAM PROTOCOL_ERROR")
def GET_pseudo_header_in_trailers():
    return malformed(GET, data=b"body", trailers=[(":method", "GET")])


@case("8.1.1", "RST_STREAM PROTOCOL_ERROR")
def GET_content_length_smaller_than_DATA():
    return malformed([*GET, ("content-length", "1")], data=b"test")


@case("4.2", "405 once the request is whole")
def GET_with_a_16384_byte_DATA_frame():
    conn = Raw()
    try:
        conn.headers(1, GET, end_stream=False)
        conn.send(raw_frame(DATA, END_STREAM, 1, b"x" * 16384))
        headers, _, body = conn.response(1)
        return f":status {headers.get(':status')}, {len(body)}-byte body", headers.get(":status") == "405" and len(body) > 0
    finally:
        conn.close()


@case("8.3", "405 with a body")
def GET_is_answered_with_an_HTTP_error_and_a_body():
    headers, _, body = h2_call(headers=GET, body=None)
    got = f":status {headers.get(':status')}, {len(body)}-byte body"
    return got, headers.get(":status") == "405" and len(body) > 0


@case("8.3", "415 with a body")
def POST_that_is_not_gRPC_gets_415_and_a_body():
    request = replace(grpc_request(), "content-type", "text/plain")
    headers, _, body = h2_call(headers=request, body=b"hello")
    got = f":status {headers.get(':status')}, {len(body)}-byte body"
    return got, headers.get(":status") == "415" and len(body) > 0


def main():
    global SOCKET, SERVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args()
    SOCKET, SERVICE = args.socket, args.service
    results = []
    for name, rfc, expected, run in CASES:
        if args.only and args.only not in name:
            continue
        try:
            got, ok = run()
        except Outcome as outcome:
            got, ok = str(outcome), False
        except OSError as error:
            got, ok = f"{type(error).__name__}: {error}", False
        if ok:
            try:
                still_serves()
            except (Outcome, OSError) as error:
                got, ok = f"{got}; afterwards: {error}", False
        results.append({"name": name, "rfc": rfc, "expected": expected, "got": got, "ok": bool(ok)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
