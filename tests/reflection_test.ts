// gRPC server reflection over the agent's own HTTP/2 transport (a bidirectional stream), as grpcurl
// uses it: list the services, then fetch and decode the descriptor of the Agent service.

import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";
import descriptor from "protobufjs/ext/descriptor/index.js";
import reflectionProto from "../proto/reflection.proto" with { type: "text" };
import { withAgent } from "./helpers/agent.ts";

const root = protobuf.parse(reflectionProto, { keepCase: true }).root;
const Request = root.lookupType("grpc.reflection.v1.ServerReflectionRequest");
const Response = root.lookupType("grpc.reflection.v1.ServerReflectionResponse");

// deno-lint-ignore no-explicit-any
type Reply = any;

/** Sends each request on one stream, reading one response after each, as grpcurl does. */
async function converse(socket: string, version: "v1" | "v1alpha", requests: object[]): Promise<Reply[]> {
  const client = new grpc.Client(`unix:${socket}`, grpc.credentials.createInsecure());
  try {
    const call = client.makeBidiStreamRequest(
      `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`,
      (m: object) => Buffer.from(Request.encode(Request.fromObject(m)).finish()),
      (b: Buffer) => Response.toObject(Response.decode(b), { oneofs: true }),
    );
    const replies: Reply[] = [];
    const ended = new Promise<void>((resolve, reject) => {
      call.on("end", resolve);
      call.on("error", reject);
    });
    const next = () => new Promise<Reply>((resolve) => call.once("data", resolve));
    for (const request of requests) {
      const reply = next();
      call.write(request);
      replies.push(await reply);
    }
    call.end();
    await ended;
    return replies;
  } finally {
    client.close();
  }
}

Deno.test("reflection: services are listed and the Agent's descriptor names every rpc (v1 and v1alpha)", async () => {
  await withAgent({}, async (agent) => {
    for (const version of ["v1", "v1alpha"] as const) {
      const [list, file, missing, byName] = await converse(agent.socket, version, [
        { list_services: "" },
        { file_containing_symbol: "AWS.SageMaker.Edge.Agent" },
        { file_containing_symbol: "no.such.Service" },
        { file_by_filename: "grpc/health/v1/health.proto" },
      ]);
      const services = list.list_services_response.service.map((s: { name: string }) => s.name);
      assert.deepEqual(services.sort(), [
        "AWS.SageMaker.Edge.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
      ]);
      const [bytes] = file.file_descriptor_response.file_descriptor_proto;
      const proto = descriptor.FileDescriptorProto.decode(bytes) as unknown as {
        name: string;
        package: string;
        service: { name: string; method: { name: string; inputType: string }[] }[];
        messageType: { name: string }[];
      };
      assert.equal(proto.name, "agent.proto");
      assert.equal(proto.package, "AWS.SageMaker.Edge");
      assert.deepEqual(proto.service[0].method.map((m) => m.name), [
        "Predict",
        "LoadModel",
        "UnLoadModel",
        "ListModels",
        "DescribeModel",
        "CaptureData",
        "GetCaptureDataStatus",
      ]);
      assert.equal(proto.service[0].method[0].inputType, ".AWS.SageMaker.Edge.PredictRequest");
      assert.ok(proto.messageType.some((m) => m.name === "AuxilaryData"));
      assert.equal(missing.error_response.error_code, 5);
      assert.match(missing.error_response.error_message, /no\.such\.Service not found/);
      const health = descriptor.FileDescriptorProto.decode(
        byName.file_descriptor_response.file_descriptor_proto[0],
      ) as unknown as { package: string; messageType: { name: string; field: { typeName?: string }[] }[] };
      assert.equal(health.package, "grpc.health.v1");
      const status = health.messageType.find((m) => m.name === "HealthCheckResponse")!.field[0];
      assert.equal(status.typeName, ".grpc.health.v1.HealthCheckResponse.ServingStatus");
    }
    // A stream the client abandons half-way (cancelled, never half-closed) ends on the agent's side too.
    const client = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure());
    const call = client.makeBidiStreamRequest(
      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
      (m: object) => Buffer.from(Request.encode(Request.fromObject(m)).finish()),
      (b: Buffer) => b,
    );
    call.on("error", () => {});
    const first = new Promise((resolve) => call.once("data", resolve));
    call.write({ list_services: "" });
    await first;
    call.cancel();
    client.close();
    // The agent still serves ordinary calls on the same socket.
    assert.deepEqual((await agent.client.listModels()).models, []);
  });
});
