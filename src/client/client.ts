// A promise-based client of the Agent service over its Unix socket, on the agent's own HTTP/2
// transport (see transport/client.ts for why not grpc-js).

import { GrpcCallError, GrpcClient } from "../transport/client.ts";
import {
  health,
  HEALTH_SERVICE_NAME,
  type Model,
  type OutputLocation,
  RPC_TYPES,
  type RpcName,
  SERVICE_NAME,
  type Tensor,
} from "../service/wire.ts";

export { GrpcCallError };

/** The Agent service's calls, over whichever client supplies `call`. */
export abstract class AgentCalls {
  /** Calls `rpc`; rejects with an error carrying the gRPC `code` and `details` on a non-OK status. */
  abstract call<T>(rpc: RpcName, request: unknown, deadlineMs?: number): Promise<T>;

  loadModel(url: string, name: string): Promise<{ model: Model }> {
    return this.call("LoadModel", { url, name });
  }
  unloadModel(name: string): Promise<Record<string, never>> {
    return this.call("UnLoadModel", { name });
  }
  listModels(): Promise<{ models: Model[] }> {
    return this.call("ListModels", {});
  }
  describeModel(name: string): Promise<{ model: Model }> {
    return this.call("DescribeModel", { name });
  }
  /**
   * Outputs named in `outputLocations` are written into the caller's shared memory; their response
   * tensors carry a shared_memory_handle instead of byte_data.
   */
  predict(name: string, tensors: Tensor[], outputLocations?: OutputLocation[]): Promise<{ tensors: Tensor[] }> {
    return this.call(
      "Predict",
      outputLocations?.length ? { name, tensors, output_locations: outputLocations } : { name, tensors },
    );
  }
}

export class AgentClient extends AgentCalls {
  readonly #grpc: GrpcClient;

  constructor(socketPath: string, options: { maxMessageBytes?: number } = {}) {
    super();
    this.#grpc = new GrpcClient(socketPath, { maxMessageBytes: options.maxMessageBytes });
  }

  /** Calls `rpc`; rejects with GrpcCallError (code, details) on a non-OK status. */
  override async call<T>(rpc: RpcName, request: unknown, deadlineMs?: number): Promise<T> {
    const { request: requestType, response: responseType } = RPC_TYPES[rpc];
    const bytes = requestType.encode(request as Record<string, unknown>).finish();
    const response = await this.#grpc.unary(`/${SERVICE_NAME}/${rpc}`, bytes, { deadlineMs });
    return responseType.decode(response) as T;
  }

  /** grpc.health.v1 Check of `service` ("" = the agent): its ServingStatus value. */
  async health(service: string): Promise<number> {
    const response = await this.#grpc.unary(
      `/${HEALTH_SERVICE_NAME}/Check`,
      health.request.encode({ service }).finish(),
    );
    return (health.response.decode(response) as unknown as { status: number }).status;
  }

  close(): void {
    this.#grpc.close();
  }
}
