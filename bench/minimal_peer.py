#!/usr/bin/env python3
"""The cheapest gRPC server the benchmark can put before a client: what a client costs by itself.

Run by bench/transport.ts. It listens on --socket and answers every call on it, whatever its method,
with one fixed PredictResponse (one float32 tensor of --reply-floats zeros), or an empty message when
the request is under 1 KiB (a ListModels, say), without parsing the request: it reads only frame headers, skips DATA payloads, acknowledges SETTINGS and PING, and
gives back flow-control window. The time a client takes for a call against it is the client's own
share of a call plus a near-free server: a floor for the transport share of any agent.
Prints "listening" once ready; runs until killed.
"""

import argparse
import socket
import struct
import sys

DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 4, 6, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
RECEIVE_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 64 * 1024


def frame_header(length, kind, flags, stream):
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def frame(kind, flags, stream, payload=b""):
    return frame_header(len(payload), kind, flags, stream) + payload


def literal(name, value):
    """An HPACK literal header field without indexing (RFC 7541 section 6.2.2), names and values under 127 bytes."""
    return bytes([0, len(name)]) + name + bytes([len(value)]) + value


RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")  # 0x88: :status 200
TRAILERS = literal(b"grpc-status", b"0")
EMPTY_MESSAGE = b"\0\0\0\0\0"


def response_message(stubs, floats):
    sys.path.insert(0, stubs)
    import agent_pb2 as pb2

    tensor = pb2.Tensor(
        tensor_metadata=pb2.TensorMetadata(name=b"output", data_type=pb2.FLOAT32, shape=[1, 1, floats]),
        byte_data=bytes(4 * floats),
    )
    body = pb2.PredictResponse(tensors=[tensor]).SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def serve(conn, message):
    conn.sendall(
        frame(SETTINGS, 0, 0, struct.pack(">HIHI", 4, RECEIVE_WINDOW, 5, MAX_FRAME))
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - 65535))
    )
    peer_max_frame = 16384
    buffer = memoryview(bytearray(1024 * 1024))
    header = bytearray()
    kind = flags = stream = length = 0
    remaining = 0  # payload bytes of the current frame still to come
    payload = bytearray()  # kept for control frames only; DATA is skipped
    unacknowledged = 0
    request_bytes = 0
    preface = 24
    while True:
        count = conn.recv_into(buffer)
        if count == 0:
            return
        i = 0
        if preface:
            skip = min(preface, count)
            preface -= skip
            i = skip
        while i < count:
            if remaining == 0:
                take = min(9 - len(header), count - i)
                header += buffer[i : i + take]
                i += take
                if len(header) < 9:
                    break
                length = remaining = int.from_bytes(header[0:3], "big")
                kind, flags = header[3], header[4]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                header.clear()
                payload.clear()
                if remaining > 0:
                    continue
            else:
                take = min(remaining, count - i)
                if kind != DATA:
                    payload += buffer[i : i + take]
                i += take
                remaining -= take
                if remaining > 0:
                    break
            # A whole frame.
            if kind == SETTINGS and not flags & ACK:
                for at in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[at : at + 6])
                    if ident == 5:
                        peer_max_frame = value
                conn.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                conn.sendall(frame(PING, ACK, 0, bytes(payload)))
            elif kind == DATA:
                unacknowledged += length
                request_bytes += length
                if unacknowledged >= RECEIVE_WINDOW // 2:
                    conn.sendall(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", unacknowledged)))
                    unacknowledged = 0
                if flags & END_STREAM:
                    respond(conn, stream, message if request_bytes >= 1024 else EMPTY_MESSAGE, peer_max_frame)
                    request_bytes = 0


def respond(conn, stream, message, max_frame):
    """Headers, the message in frames of the client's largest size, trailers: one gather write, no copy."""
    parts = [frame(HEADERS, END_HEADERS, stream, RESPONSE_HEADERS)]
    for at in range(0, len(message), max_frame):
        piece = message[at : at + max_frame]
        parts += [frame_header(len(piece), DATA, 0, stream), piece]
    parts.append(frame(HEADERS, END_STREAM | END_HEADERS, stream, TRAILERS))
    sent = conn.sendmsg(parts)
    total = sum(len(part) for part in parts)
    if sent < total:
        conn.sendall(b"".join(bytes(part) for part in parts)[sent:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--reply-floats", type=int, required=True)
    args = parser.parse_args()
    message = memoryview(response_message(args.stubs, args.reply_floats))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(4)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            serve(conn, message)
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    main()
