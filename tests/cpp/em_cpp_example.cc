// A C++ client written the way Edge Manager's agent_cpp_example is: gRPC C++ stubs from agent.proto,
// the input in a SysV segment made with shmget(IPC_PRIVATE, size, 0666), filled, then made read-only
// (0400) before the agent sees it; the tensor carries segment_id, offset 0 and size 0 (the agent works
// the size out from the shape); PredictSHMAndCapture captures with the id "capture" + time(0).
//
//   em_cpp_example ListModels
//   em_cpp_example PredictSHMAndCapture <model> <raw image> <input name> <w> <h> <c>
//
// Like Edge Manager's clients it connects to /tmp/sagemaker_edge_agent_example.sock; EM_EXAMPLE_SOCKET
// overrides that only where the tests cannot give it a private /tmp.
//
// Prints one JSON object with what it observed; a failed call prints its status and exits 1.

#include <sys/ipc.h>
#include <sys/shm.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "agent.grpc.pb.h"

using AWS::SageMaker::Edge::Agent;
namespace edge = AWS::SageMaker::Edge;

static int fail(const char* rpc, const grpc::Status& status) {
  std::cout << "{\"rpc\":\"" << rpc << "\",\"code\":" << status.error_code() << ",\"details\":\""
            << status.error_message() << "\"}" << std::endl;
  return 1;
}

static int listModels(Agent::Stub& stub) {
  grpc::ClientContext context;
  edge::ListModelsRequest request;
  edge::ListModelsResponse response;
  grpc::Status status = stub.ListModels(&context, request, &response);
  if (!status.ok()) return fail("ListModels", status);
  std::cout << "{\"models\":[";
  for (int i = 0; i < response.models_size(); i++) {
    std::cout << (i ? "," : "") << "\"" << response.models(i).name() << "\"";
  }
  std::cout << "]}" << std::endl;
  return 0;
}

static int predictShmAndCapture(Agent::Stub& stub, char** argv) {
  const std::string model = argv[0], imagePath = argv[1], inputName = argv[2];
  const int w = std::stoi(argv[3]), h = std::stoi(argv[4]), c = std::stoi(argv[5]);
  std::ifstream file(imagePath, std::ios::binary);
  std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const size_t size = image.size();

  int segment = shmget(IPC_PRIVATE, size, 0666);
  if (segment < 0) {
    perror("shmget");
    return 1;
  }
  void* address = shmat(segment, nullptr, 0);
  std::memcpy(address, image.data(), size);
  struct shmid_ds info;
  shmctl(segment, IPC_STAT, &info);
  info.shm_perm.mode = 0400;
  shmctl(segment, IPC_SET, &info);

  edge::Tensor tensor;
  tensor.mutable_tensor_metadata()->set_name(inputName);
  tensor.mutable_tensor_metadata()->set_data_type(edge::UINT8);
  for (int d : {1, h, w, c}) tensor.mutable_tensor_metadata()->add_shape(d);
  tensor.mutable_shared_memory_handle()->set_segment_id(segment);
  tensor.mutable_shared_memory_handle()->set_offset(0);
  tensor.mutable_shared_memory_handle()->set_size(0);

  edge::PredictRequest predict;
  predict.set_name(model);
  *predict.add_tensors() = tensor;
  edge::PredictResponse predicted;
  grpc::ClientContext predictContext;
  grpc::Status status = stub.Predict(&predictContext, predict, &predicted);
  if (!status.ok()) return fail("Predict", status);

  const std::string captureId = "capture" + std::to_string(time(0));
  edge::CaptureDataRequest capture;
  capture.set_model_name(model);
  capture.set_capture_id(captureId);
  capture.mutable_inference_timestamp()->set_seconds(time(0));
  *capture.add_input_tensors() = tensor;
  for (const auto& output : predicted.tensors()) *capture.add_output_tensors() = output;
  edge::CaptureDataResponse captured;
  grpc::ClientContext captureContext;
  status = stub.CaptureData(&captureContext, capture, &captured);
  if (!status.ok()) return fail("CaptureData", status);

  shmdt(address);
  shmctl(segment, IPC_RMID, nullptr);

  // Wait for the capture to be stored (Disk) for at most 20 s.
  edge::CaptureDataStatus state = edge::IN_PROGRESS;
  for (int i = 0; i < 200 && state == edge::IN_PROGRESS; i++) {
    edge::GetCaptureDataStatusRequest request;
    request.set_capture_id(captureId);
    edge::GetCaptureDataStatusResponse response;
    grpc::ClientContext context;
    status = stub.GetCaptureDataStatus(&context, request, &response);
    if (!status.ok()) return fail("GetCaptureDataStatus", status);
    state = response.status();
    if (state == edge::IN_PROGRESS) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }

  const edge::Tensor& output = predicted.tensors(0);
  std::cout << "{\"capture_id\":\"" << captureId << "\",\"capture_status\":\"" << edge::CaptureDataStatus_Name(state)
            << "\",\"segment\":" << segment << ",\"output\":{\"name\":\"" << output.tensor_metadata().name()
            << "\",\"shape\":[";
  for (int i = 0; i < output.tensor_metadata().shape_size(); i++) {
    std::cout << (i ? "," : "") << output.tensor_metadata().shape(i);
  }
  std::cout << "],\"data\":[";
  const std::string& bytes = output.byte_data();
  for (size_t i = 0; i < bytes.size(); i++) std::cout << (i ? "," : "") << int(static_cast<unsigned char>(bytes[i]));
  std::cout << "]}}" << std::endl;
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " ListModels | PredictSHMAndCapture <model> <image> <input> <w> <h> <c>"
              << std::endl;
    return 2;
  }
  const char* socket = std::getenv("EM_EXAMPLE_SOCKET");
  auto channel = grpc::CreateChannel(std::string("unix://") + (socket ? socket : "/tmp/sagemaker_edge_agent_example.sock"),
                                     grpc::InsecureChannelCredentials());
  std::unique_ptr<Agent::Stub> stub = Agent::NewStub(channel);
  const std::string command = argv[1];
  if (command == "ListModels") return listModels(*stub);
  if (command == "PredictSHMAndCapture" && argc == 8) return predictShmAndCapture(*stub, argv + 2);
  std::cerr << "unknown command " << command << std::endl;
  return 2;
}
