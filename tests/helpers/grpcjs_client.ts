// The Agent service through grpc-js, the client Node applications generate from agent.proto: tests
// and the benchmark use it to show the agent answers a standard client (the product's own client
// is src/client/client.ts).

import * as grpc from "@grpc/grpc-js";
import type { Buffer } from "node:buffer";
import type protobuf from "protobufjs";
import {
  asBuffer,
  health,
  HEALTH_SERVICE_NAME,
  RPC_NAMES,
  RPC_TYPES,
  type RpcName,
  SERVICE_NAME,
} from "../../src/service/wire.ts";
import { AgentCalls } from "../../src/client/client.ts";

function encoder(type: protobuf.Type): (message: unknown) => Buffer {
  return (message) => asBuffer(type.encode(message as protobuf.Message).finish());
}

function decoder(type: protobuf.Type): (bytes: Buffer) => unknown {
  return (bytes) => type.decode(bytes);
}

/** The Agent service for grpc-js. */
export const agentService: grpc.ServiceDefinition = Object.fromEntries(
  RPC_NAMES.map((rpc) => {
    const { request, response } = RPC_TYPES[rpc];
    return [rpc, {
      path: `/${SERVICE_NAME}/${rpc}`,
      requestStream: false,
      responseStream: false,
      requestSerialize: encoder(request),
      requestDeserialize: decoder(request),
      responseSerialize: encoder(response),
      responseDeserialize: decoder(response),
      originalName: rpc[0].toLowerCase() + rpc.slice(1),
    }];
  }),
);

const AgentClientConstructor = grpc.makeGenericClientConstructor(agentService, "Agent");

type GenericClient = grpc.Client & Record<string, unknown>;

export class GrpcJsAgentClient extends AgentCalls {
  readonly #client: GenericClient;

  constructor(socketPath: string, options: { maxMessageBytes?: number } = {}) {
    super();
    const max = options.maxMessageBytes ?? 64 * 1024 * 1024;
    this.#client = new AgentClientConstructor(`unix:${socketPath}`, grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": max,
      "grpc.max_send_message_length": max,
      // HTTP/2's default 64 KiB receive window makes a 1.6 MB response wait for ~25 window updates.
      "grpc-node.flow_control_window": Math.min(max, 2 ** 31 - 1),
    }) as GenericClient;
  }

  /** Calls `rpc`; rejects with the grpc-js ServiceError (code, details) on a non-OK status. */
  override call<T>(rpc: RpcName, request: unknown, deadlineMs?: number): Promise<T> {
    const method = this.#client[rpc] as (
      request: unknown,
      metadata: grpc.Metadata,
      options: grpc.CallOptions,
      callback: (error: grpc.ServiceError | null, response: T) => void,
    ) => void;
    const options: grpc.CallOptions = deadlineMs ? { deadline: Date.now() + deadlineMs } : {};
    return new Promise((resolve, reject) =>
      method.call(this.#client, request, new grpc.Metadata(), options, (error, response) => {
        if (error) reject(error);
        else resolve(response);
      })
    );
  }

  /** grpc.health.v1 Check of `service` ("" = the agent): its ServingStatus value. */
  health(service: string): Promise<number> {
    return new Promise((resolve, reject) =>
      this.#client.makeUnaryRequest(
        `/${HEALTH_SERVICE_NAME}/Check`,
        (m: { service: string }) => asBuffer(health.request.encode(m).finish()),
        (b: Buffer) => (health.response.decode(b) as unknown as { status: number }).status,
        { service },
        (error, status) => error ? reject(error) : resolve(status!),
      )
    );
  }

  close(): void {
    this.#client.close();
  }
}
