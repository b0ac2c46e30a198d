#!/usr/bin/env python3
"""The floor for the agent's transport: the same bytes as a Predict, over a plain Unix socket, between two processes.

Run by bench/transport.ts as a long-lived client; it starts its own server (this script with --serve) as a second
process. The client sends `--send` bytes, the server reads them all and answers `--reply` bytes, the client reads
them all: no framing, no protocol, one buffer each way. After {"ready": true}, each line on stdin is
{"count": n}, answered with {"ms": [...]} (each exchange timed around send and receive).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def read_exactly(sock, view):
    """Fills `view` from the socket; False if the peer closed first."""
    filled = 0
    while filled < len(view):
        count = sock.recv_into(view[filled:])
        if count == 0:
            return False
        filled += count
    return True


def serve(path, receive_bytes, reply_bytes):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    request = memoryview(bytearray(receive_bytes))
    reply = bytes(reply_bytes)
    while read_exactly(conn, request):
        conn.sendall(reply)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--send", type=int, required=True)
    parser.add_argument("--reply", type=int, required=True)
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.socket, args.send, args.reply)
        return

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", f"--socket={args.socket}", f"--send={args.send}", f"--reply={args.reply}"],
        stdout=subprocess.PIPE,
    )
    try:
        server.stdout.readline()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)
        request = bytes(args.send)
        reply = memoryview(bytearray(args.reply))
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            count = json.loads(line)["count"]
            times = []
            for _ in range(count):
                started = time.perf_counter()
                sock.sendall(request)
                if not read_exactly(sock, reply):
                    raise RuntimeError("the raw exchange server closed the socket")
                times.append((time.perf_counter() - started) * 1000)
            print(json.dumps({"ms": times}), flush=True)
        sock.close()
    finally:
        server.wait(timeout=10)
        os.unlink(args.socket)


if __name__ == "__main__":
    main()
