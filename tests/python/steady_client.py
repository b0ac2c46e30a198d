#!/usr/bin/env python3
"""A well-behaved grpcio client that keeps calling ListModels while an attack test runs.

Run by tests/transport_attacks_test.ts. It calls until its standard input closes (or, with --calls, makes
that many calls back to back, as fast as it can), then prints one JSON object: how many calls it made,
which failed (with their status), the slowest one in ms, and when each call started and ended (wall
clock, ms since the epoch), so the waits can be set against the agent's time waiting for a CPU.
"""

import argparse
import json
import sys
import threading
import time

import grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True, help="directory holding agent_pb2*.py")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--calls", type=int, default=0, help="make this many calls without pausing, then stop")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import agent_pb2 as pb2
    import agent_pb2_grpc as pb2_grpc

    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.read()
        stop.set()

    if not args.calls:
        threading.Thread(target=wait_for_eof, daemon=True).start()
    calls, failures, slowest, windows = 0, [], 0.0, []
    with grpc.insecure_channel(f"unix:{args.socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb2_grpc.AgentStub(channel)
        print("ready", flush=True)
        while not stop.is_set() and (not args.calls or calls < args.calls):
            started, started_at = time.monotonic(), time.time()
            try:
                stub.ListModels(pb2.ListModelsRequest(), timeout=5)
            except grpc.RpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            slowest = max(slowest, (time.monotonic() - started) * 1000)
            windows.append([round(started_at * 1000, 1), round(time.time() * 1000, 1)])
            calls += 1
            if not args.calls:
                time.sleep(0.01)
    result = {"calls": calls, "failures": failures[:10], "slowest_ms": round(slowest, 1), "windows": windows}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
