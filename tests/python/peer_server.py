#!/usr/bin/env python3
"""An independent gRPC server for the agent's own client: Python grpcio (its own HTTP/2, HPACK and
flow control) serving the Agent service from proto/agent.proto on a Unix socket.

Run by tests/grpc_client_test.ts. It prints "ready" once serving. The methods behave so that each
client path can be observed:
  Predict          echoes the request's tensors (any size, so both flow-control directions work)
  ListModels       one model per call so far, named m0, m1, ...
  DescribeModel    "slow": answers after 3 s; "missing": NOT_FOUND with a UTF-8 message;
                   "big-trailers": OK with 40 KB of trailing metadata (CONTINUATION frames);
                   otherwise the model named
  UnLoadModel      aborts with the status code given as the name (e.g. "14")
"""

import argparse
import sys
import threading
import time
from concurrent import futures

import grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import agent_pb2
    import agent_pb2_grpc

    calls = {"list": 0}
    lock = threading.Lock()

    class Agent(agent_pb2_grpc.AgentServicer):
        def Predict(self, request, context):
            return agent_pb2.PredictResponse(tensors=request.tensors)

        def ListModels(self, request, context):
            with lock:
                count = calls["list"]
                calls["list"] += 1
            return agent_pb2.ListModelsResponse(
                models=[agent_pb2.Model(name=f"m{i}", url=f"/models/m{i}") for i in range(count)]
            )

        def DescribeModel(self, request, context):
            if request.name == "slow":
                time.sleep(3)
            if request.name == "missing":
                context.abort(grpc.StatusCode.NOT_FOUND, "no model named \u201cmissing\u201d (r\u00e9essayez: 100% s\u00fbr)")
            if request.name == "big-trailers":
                context.set_trailing_metadata([("x-padding", "p" * 40000)])
            return agent_pb2.DescribeModelResponse(model=agent_pb2.Model(name=request.name, url="/models/x"))

        def UnLoadModel(self, request, context):
            code = next(c for c in grpc.StatusCode if c.value[0] == int(request.name))
            context.abort(code, f"aborted with {code.name}")

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_metadata_size", 128 * 1024),
        ],
    )
    agent_pb2_grpc.add_AgentServicer_to_server(Agent(), server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
