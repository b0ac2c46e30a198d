#!/usr/bin/env python3
"""What operators' tools do, from Python grpcio (the gRPC C core): health Check and Watch, and server
reflection as grpcurl uses it, with stubs generated from proto/health.proto and proto/reflection.proto.

Run by tests/python_operator_test.ts. It loads and unloads a model through the Agent service while
watching its health, and prints one JSON object with what it observed.
"""

import argparse
import json
import sys

import grpc

TIMEOUT_S = 30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model-url", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import agent_pb2
    import agent_pb2_grpc
    import health_pb2
    import health_pb2_grpc
    import reflection_pb2
    import reflection_pb2_grpc
    from google.protobuf import descriptor_pb2

    out = {}
    with grpc.insecure_channel(f"unix:{args.socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        agent = agent_pb2_grpc.AgentStub(channel)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name
        out["check"] = name(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S).status)

        watch = health.Watch(health_pb2.HealthCheckRequest(service="model/watched"), timeout=TIMEOUT_S)
        seen = [name(next(watch).status)]
        agent.LoadModel(agent_pb2.LoadModelRequest(url=args.model_url, name="watched"), timeout=TIMEOUT_S)
        seen.append(name(next(watch).status))
        agent.UnLoadModel(agent_pb2.UnLoadModelRequest(name="watched"), timeout=TIMEOUT_S)
        seen.append(name(next(watch).status))
        watch.cancel()
        out["watch"] = seen

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="AWS.SageMaker.Edge.Agent"),
        ]
        replies = list(reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT_S))
        out["services"] = sorted(s.name for s in replies[0].list_services_response.service)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in replies[1].file_descriptor_response.file_descriptor_proto
        ]
        agent_file = next(f for f in files if any(s.name == "Agent" for s in f.service))
        service = next(s for s in agent_file.service if s.name == "Agent")
        out["agent_package"] = agent_file.package
        out["agent_methods"] = sorted(m.name for m in service.method)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
