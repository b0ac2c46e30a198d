// gRPC server reflection: the services the agent serves and their descriptors, built from the same
// .proto files the codecs come from, so `grpcurl -unix -plaintext <socket> list` and `describe` work.

import protobuf from "protobufjs";
import descriptor from "protobufjs/ext/descriptor/index.js";
import agentProto from "../../proto/agent.proto" with { type: "text" };
import healthProto from "../../proto/health.proto" with { type: "text" };
import reflectionProto from "../../proto/reflection.proto" with { type: "text" };
import { Status } from "../errors.ts";
import type { StreamHandler } from "../transport/http2.ts";

const reflectionRoot = protobuf.parse(reflectionProto, { keepCase: true }).root;
const Request = reflectionRoot.lookupType("grpc.reflection.v1.ServerReflectionRequest");
const Response = reflectionRoot.lookupType("grpc.reflection.v1.ServerReflectionResponse");

interface ProtoFile {
  name: string;
  packageName: string;
  services: string[];
  bytes: Uint8Array;
}

interface MessageDescriptor {
  name: string;
  field?: { typeName?: string }[];
  nestedType?: MessageDescriptor[];
  enumType?: { name: string }[];
}

/**
 * protobufjs names types relative to their scope ("PredictRequest"); descriptors as protoc writes
 * them, and as reflection clients resolve them, use fully-qualified names (".pkg.PredictRequest").
 */
function qualify(
  file: { package: string; messageType?: MessageDescriptor[]; service?: { method: Record<string, string>[] }[] },
): void {
  const pkg = `.${file.package}`;
  const walk = (message: MessageDescriptor, scope: string) => {
    const own = `${scope}.${message.name}`;
    const nested = new Set([...(message.nestedType ?? []), ...(message.enumType ?? [])].map((t) => t.name));
    for (const field of message.field ?? []) {
      if (field.typeName && !field.typeName.startsWith(".")) {
        field.typeName = nested.has(field.typeName) ? `${own}.${field.typeName}` : `${pkg}.${field.typeName}`;
      }
    }
    for (const child of message.nestedType ?? []) walk(child, own);
  };
  for (const message of file.messageType ?? []) walk(message, pkg);
  for (const service of file.service ?? []) {
    for (const method of service.method) {
      for (const key of ["inputType", "outputType"]) {
        if (!method[key].startsWith(".")) method[key] = `${pkg}.${method[key]}`;
      }
    }
  }
}

/** A .proto text as a serialized FileDescriptorProto named `name`. */
function describeFile(name: string, text: string): ProtoFile {
  const root = protobuf.parse(text, { keepCase: true }).root;
  // deno-lint-ignore no-explicit-any
  const file = (root as any).toDescriptor("proto3").file[0];
  file.name = name;
  qualify(file);
  return {
    name,
    packageName: file.package,
    services: (file.service ?? []).map((s: { name: string }) => `${file.package}.${s.name}`),
    bytes: descriptor.FileDescriptorProto.encode(file).finish(),
  };
}

const FILES = [
  describeFile("agent.proto", agentProto),
  describeFile("grpc/health/v1/health.proto", healthProto),
  describeFile("grpc/reflection/v1/reflection.proto", reflectionProto),
];

/** Services listed: the v1alpha reflection service is served too, under the same messages. */
const SERVICES = [...FILES.flatMap((f) => f.services), "grpc.reflection.v1alpha.ServerReflection"];

/** The file defining `symbol` (a package-qualified service, method, message or enum name). */
function fileOf(symbol: string): ProtoFile | undefined {
  return FILES.find((f) => symbol === f.packageName || symbol.startsWith(`${f.packageName}.`));
}

interface ReflectionRequest {
  host: string;
  message_request?: string;
  file_by_filename?: string;
  file_containing_symbol?: string;
  list_services?: string;
}

function answer(request: ReflectionRequest): Record<string, unknown> {
  const base = { valid_host: request.host, original_request: request };
  const notFound = (what: string) => ({
    ...base,
    error_response: { error_code: Status.NOT_FOUND, error_message: what },
  });
  switch (request.message_request) {
    case "list_services":
      return { ...base, list_services_response: { service: SERVICES.map((name) => ({ name })) } };
    case "file_by_filename": {
      const file = FILES.find((f) => f.name === request.file_by_filename);
      return file
        ? { ...base, file_descriptor_response: { file_descriptor_proto: [file.bytes] } }
        : notFound(`file ${request.file_by_filename} not found`);
    }
    case "file_containing_symbol": {
      const file = fileOf(request.file_containing_symbol!);
      return file
        ? { ...base, file_descriptor_response: { file_descriptor_proto: [file.bytes] } }
        : notFound(`symbol ${request.file_containing_symbol} not found`);
    }
    default:
      return {
        ...base,
        error_response: {
          error_code: Status.UNIMPLEMENTED,
          error_message: `${request.message_request ?? "an empty request"} is not supported`,
        },
      };
  }
}

/** The ServerReflectionInfo stream: one response per request, as the protocol asks. */
export const serverReflectionInfo: StreamHandler = async function* (requests) {
  for await (const bytes of requests) {
    const request = Request.toObject(Request.decode(bytes), { oneofs: true }) as ReflectionRequest;
    yield Response.encode(Response.fromObject(answer(request))).finish();
  }
};
