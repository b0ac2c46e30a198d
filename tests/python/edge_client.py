#!/usr/bin/env python3
"""A second-language client of the agent: Python grpcio with stubs generated from proto/agent.proto.

Run by tests/python_client_test.ts. It walks the model lifecycle over unix:<socket> and prints one
JSON object with what it observed, so the Deno side can compare it with its own client and with
onnxruntime-node. Any unexpected RPC failure raises (non-zero exit, traceback on stderr).
"""

import argparse
import json
import sys

import grpc
import numpy as np

# Each call gets a deadline so a wedged agent fails the test instead of hanging it.
TIMEOUT_S = 30


def metadata(m, pb2):
    return {
        "name": m.name.decode("utf-8"),
        "data_type": m.data_type,
        "data_type_name": pb2.DataType.Name(m.data_type),
        "shape": list(m.shape),
    }


def model(m, pb2):
    return {
        "url": m.url,
        "name": m.name,
        "inputs": [metadata(t, pb2) for t in m.input_tensor_metadatas],
        "outputs": [metadata(t, pb2) for t in m.output_tensor_metadatas],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True, help="directory holding agent_pb2*.py")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model-url", required=True)
    parser.add_argument("--name", default="cls")
    parser.add_argument("--input", required=True, help="raw little-endian float32 input tensor")
    parser.add_argument("--input-name", default="x")
    parser.add_argument("--shape", required=True, help="comma-separated input shape")
    args = parser.parse_args()

    # The stubs are generated at test time, so they are only importable once their folder is on the path.
    sys.path.insert(0, args.stubs)
    import agent_pb2 as pb2
    import agent_pb2_grpc as pb2_grpc

    shape = [int(d) for d in args.shape.split(",")]
    x = np.fromfile(args.input, dtype="<f4")
    if x.size != int(np.prod(shape)):
        raise SystemExit(f"{args.input} holds {x.size} floats, shape {shape} needs {int(np.prod(shape))}")
    x = x.reshape(shape)

    observed = {"grpc_version": grpc.__version__}
    with grpc.insecure_channel(f"unix:{args.socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        stub = pb2_grpc.AgentStub(channel)

        listed = stub.ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT_S)
        observed["list_before"] = [model(m, pb2) for m in listed.models]

        loaded = stub.LoadModel(pb2.LoadModelRequest(url=args.model_url, name=args.name), timeout=TIMEOUT_S)
        observed["loaded"] = model(loaded.model, pb2)

        described = stub.DescribeModel(pb2.DescribeModelRequest(name=args.name), timeout=TIMEOUT_S)
        observed["described"] = model(described.model, pb2)

        listed = stub.ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT_S)
        observed["list_loaded"] = [model(m, pb2) for m in listed.models]

        name = args.input_name.encode("utf-8")
        tensor = pb2.Tensor(
            tensor_metadata=pb2.TensorMetadata(name=name, data_type=pb2.FLOAT32, shape=shape),
            byte_data=x.astype("<f4").tobytes(),
        )
        predicted = stub.Predict(pb2.PredictRequest(name=args.name, tensors=[tensor]), timeout=TIMEOUT_S)
        outputs = []
        for t in predicted.tensors:
            out = metadata(t.tensor_metadata, pb2)
            out["data"] = t.WhichOneof("data")
            if out["data_type_name"] == "FLOAT32" and out["data"] == "byte_data":
                # tolist() widens each float32 to a Python float exactly, so JSON round-trips the values.
                out["values"] = np.frombuffer(t.byte_data, dtype="<f4").tolist()
            outputs.append(out)
        observed["outputs"] = outputs

        stub.UnLoadModel(pb2.UnLoadModelRequest(name=args.name), timeout=TIMEOUT_S)
        listed = stub.ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT_S)
        observed["list_after"] = [model(m, pb2) for m in listed.models]

        try:
            stub.Predict(pb2.PredictRequest(name="no-such-model", tensors=[tensor]), timeout=TIMEOUT_S)
            observed["unknown_model_error"] = {"code": "OK", "details": ""}
        except grpc.RpcError as error:
            observed["unknown_model_error"] = {"code": error.code().name, "details": error.details()}

    json.dump(observed, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
