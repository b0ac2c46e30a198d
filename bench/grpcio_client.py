#!/usr/bin/env python3
"""The benchmark's gRPC C-core client: Python grpcio, as applications on devices call the agent.

Run by bench/grpcio.ts, long-lived, connected to the agent on unix:<socket>. It reads one JSON command
per line on stdin and answers each with one JSON line on stdout, after a first {"ready": <grpcio version>}
once connected:

  {"op": "predict", "name", "input", "input_name", "shape", "count"[, "seconds"][, "segment_id"][, "output"]}
      -> {"ms": [...]}   count Predicts of the raw float32 file `input`, each timed around the stub call
                         (with "seconds": as many as fit in that time, at least count);
                         with "segment_id", the tensor is instead a handle to that SysV segment, which
                         holds the input at offset 0; with "output", the last response's first tensor
                         bytes are written there
  {"op": "list_models", "count"} -> {"ms": [...]}

An RPC failure raises: the traceback goes to stderr and the process exits, which the Deno side reports.
"""

import argparse
import json
import sys
import time

import grpc
import numpy as np

# The limits the Deno AgentClient sets, so both clients accept the same messages.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT_S = 30


def timed(count, rpc, request, seconds=None):
    """Calls the stub method `rpc` count times (or until `seconds` passed, if later); returns each call's
    milliseconds and the last response."""
    times = []
    result = None
    end = time.perf_counter() + (seconds or 0)
    while len(times) < count or time.perf_counter() < end:
        started = time.perf_counter()
        result = rpc(request)
        times.append((time.perf_counter() - started) * 1000)
    return times, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True, help="directory holding agent_pb2*.py")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()

    # The stubs are generated when the benchmark starts, so they are only importable once their folder is on the path.
    sys.path.insert(0, args.stubs)
    import agent_pb2 as pb2
    import agent_pb2_grpc as pb2_grpc

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    # Inputs read once per file: an application holds its tensor in memory already.
    inputs = {}
    with grpc.insecure_channel(f"unix:{args.socket}", options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        stub = pb2_grpc.AgentStub(channel)
        print(json.dumps({"ready": grpc.__version__}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "list_models":
                request = pb2.ListModelsRequest()
                times, _ = timed(command["count"], stub.ListModels, request)
                print(json.dumps({"ms": times}), flush=True)
                continue
            shape = command["shape"]
            metadata = pb2.TensorMetadata(
                name=command["input_name"].encode("utf-8"), data_type=pb2.FLOAT32, shape=shape
            )
            # Built once per block and reused, as an application sending the same kind of tensor would.
            if command.get("segment_id") is not None:
                # Offset 0, size 0: Edge Manager's handle, the size being the tensor's.
                tensor = pb2.Tensor(
                    tensor_metadata=metadata,
                    shared_memory_handle=pb2.SharedMemoryHandle(segment_id=command["segment_id"], offset=0, size=0),
                )
            else:
                if command["input"] not in inputs:
                    inputs[command["input"]] = np.fromfile(command["input"], dtype="<f4").reshape(shape)
                tensor = pb2.Tensor(tensor_metadata=metadata, byte_data=inputs[command["input"]].tobytes())
            request = pb2.PredictRequest(name=command["name"], tensors=[tensor])
            times, response = timed(command["count"], stub.Predict, request, command.get("seconds"))
            if "output" in command:
                with open(command["output"], "wb") as out:
                    out.write(response.tensors[0].byte_data)
            print(json.dumps({"ms": times}), flush=True)


if __name__ == "__main__":
    main()
