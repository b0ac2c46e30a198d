#!/usr/bin/env python3
"""Edge Manager's Python example client, call for call.

The calls follow `docs/examples/agent_python_example/example.py` of Edge Manager's agent release
1.20210820.e20fa3a (as kept in github.com/DougAnsonAustinTX/SageMakerEdgeAgentContainer): one
module-level channel to the hard-coded /tmp/sagemaker_edge_agent_example.sock with the HTTP proxy
off; predict_image sends Pillow's raw image bytes and copies the name, data_type and shape of the
model's first input from ListModels into the request, so dynamic dimensions arrive as -1. The flow is
the example's main(): LoadModel, ListModels, Predict, UnLoadModel.

For the tests the stubs folder comes from STUBS, EM_EXAMPLE_SOCKET overrides the socket only where the
tests cannot give the client a private /tmp, and main() prints what it observed as one JSON object (a
Predict failure is reported there, with its status, instead of a traceback).
"""

import base64
import json
import os
import sys
from argparse import ArgumentParser

sys.path.insert(0, os.environ["STUBS"])

import grpc  # noqa: E402
from PIL import Image  # noqa: E402

import agent_pb2  # noqa: E402
import agent_pb2_grpc  # noqa: E402

agent_socket = "unix://" + os.environ.get("EM_EXAMPLE_SOCKET", "/tmp/sagemaker_edge_agent_example.sock")

agent_channel = grpc.insecure_channel(
    agent_socket, options=(("grpc.enable_http_proxy", 0),)
)

agent_client = agent_pb2_grpc.AgentStub(agent_channel)


def list_models():
    return agent_client.ListModels(agent_pb2.ListModelsRequest())


def list_model_tensors(models):
    return {
        model.name: {
            "inputs": model.input_tensor_metadatas,
            "outputs": model.output_tensor_metadatas,
        }
        for model in list_models().models
    }


def load_model(name, url):
    load_request = agent_pb2.LoadModelRequest()
    load_request.url = url
    load_request.name = name
    return agent_client.LoadModel(load_request)


def unload_model(name):
    unload_request = agent_pb2.UnLoadModelRequest()
    unload_request.name = name
    return agent_client.UnLoadModel(unload_request)


def predict_image(model_name, image_tensor_name, image_path):
    image_tensor = agent_pb2.Tensor()
    image_tensor.byte_data = Image.open(image_path).tobytes()
    image_tensor_metadata = list_model_tensors(list_models())[model_name]["inputs"][0]
    image_tensor.tensor_metadata.name = image_tensor_metadata.name
    image_tensor.tensor_metadata.data_type = image_tensor_metadata.data_type
    for shape in image_tensor_metadata.shape:
        image_tensor.tensor_metadata.shape.append(shape)
    predict_request = agent_pb2.PredictRequest()
    predict_request.name = model_name
    predict_request.tensors.append(image_tensor)
    predict_response = agent_client.Predict(predict_request)
    return predict_response


def main():
    parser = ArgumentParser(description="Agent python example")
    parser.add_argument("--model_url", type=str, help="model folder path")
    parser.add_argument("--model_name", type=str, help="name the model you loaded with agent")
    parser.add_argument("--image_path", type=str, help="inference image path")
    parser.add_argument("--image_tensor_name", type=str, help="tensor name is different for different framework")
    args = parser.parse_args()

    observed = {}
    load_model(args.model_name, args.model_url)
    model = next(m for m in list_models().models if m.name == args.model_name)
    observed["input_shape"] = list(model.input_tensor_metadatas[0].shape)
    try:
        response = predict_image(args.model_name, args.image_tensor_name, args.image_path)
        observed["outputs"] = [
            {
                "name": t.tensor_metadata.name.decode("utf-8"),
                "data_type": t.tensor_metadata.data_type,
                "shape": list(t.tensor_metadata.shape),
                "data": base64.b64encode(t.byte_data).decode("ascii"),
            }
            for t in response.tensors
        ]
    except grpc.RpcError as error:
        observed["error"] = {"code": error.code().name, "details": error.details()}
    unload_model(args.model_name)
    print(json.dumps(observed))


if __name__ == "__main__":
    main()
