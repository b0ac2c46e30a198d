// The gRPC service on the Unix socket: one handler per rpc, errors mapped to statuses.

import * as grpc from "@grpc/grpc-js";
import { AgentError, invalidArgument, StartupError, Status } from "./errors.ts";
import type { Logger } from "./log.ts";
import type { ModelInfo, ModelRegistry, PredictTiming } from "./models.ts";
import { metadataOf } from "./tensors.ts";
import {
  agentService,
  encodePredictResponse,
  type LoadModelRequest,
  MalformedMessage,
  type Model,
  type NameRequest,
  type PredictRequest,
  type RpcName,
} from "./wire.ts";

const encoder = new TextEncoder();

function modelMessage(info: ModelInfo): Model {
  return {
    url: info.url,
    name: info.name,
    input_tensor_metadatas: info.inputs.map(metadataOf),
    output_tensor_metadatas: info.outputs.map(metadataOf),
  };
}

type Handler = (request: unknown, timing?: PredictTiming) => Promise<unknown> | unknown;

function handlers(registry: ModelRegistry): Record<RpcName, Handler> {
  const unimplemented = (rpc: string) => () => {
    throw new AgentError(Status.UNIMPLEMENTED, `${rpc} is not available in this version of the agent`);
  };
  return {
    Predict: (request, timing) => {
      const { name, tensors } = request as PredictRequest;
      return registry.predict(name, tensors, (outputs) =>
        encodePredictResponse(outputs.map((output) => ({
          tensor_metadata: {
            name: encoder.encode(output.spec.name),
            data_type: output.spec.dataType.dataType,
            shape: output.shape,
          },
          byte_data: output.bytes,
        }))), timing);
    },
    LoadModel: async (request) => {
      const { url, name } = request as LoadModelRequest;
      return { model: modelMessage(await registry.load(url, name)) };
    },
    UnLoadModel: async (request) => {
      await registry.unload((request as NameRequest).name);
      return {};
    },
    ListModels: () => ({ models: registry.list().map(modelMessage) }),
    DescribeModel: (request) => ({ model: modelMessage(registry.describe((request as NameRequest).name)) }),
    CaptureData: unimplemented("CaptureData"),
    GetCaptureDataStatus: unimplemented("GetCaptureDataStatus"),
  };
}

const roundMs = (ms: number) => Number(ms.toFixed(3));

function roundTiming(timing: PredictTiming | undefined): Record<string, number> {
  if (!timing || timing.runMs === 0) return {};
  return {
    bindMs: roundMs(timing.bindMs),
    runMs: roundMs(timing.runMs),
    encodeMs: roundMs(timing.encodeMs),
    copiedInputs: timing.copiedInputs,
  };
}

function toServiceError(error: unknown, rpc: string, log: Logger): Partial<grpc.ServiceError> {
  if (error instanceof AgentError) return { code: error.code, details: error.message };
  log.error("unexpected failure", { rpc, error: String((error as Error)?.stack ?? error) });
  return { code: Status.INTERNAL, details: `${rpc} failed: ${(error as Error)?.message ?? error}` };
}

/** Refuses a live socket or a non-socket file at `path`; removes a stale socket a dead agent left. */
async function prepareSocketPath(path: string, log: Logger): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw new StartupError([`socket ${path}: ${(error as Error).message}`]);
  }
  if (!info.isSocket) {
    throw new StartupError([
      `socket ${path}: a file that is not a socket is in the way; remove it or pass another -a path`,
    ]);
  }
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
  } catch {
    log.info("removing stale socket", { socket: path });
    await Deno.remove(path);
    return;
  }
  throw new StartupError([`socket ${path}: another process is already serving on it`]);
}

export interface RunningServer {
  /** Stops accepting, lets in-flight calls finish for up to `graceSeconds`, removes the socket. */
  stop(graceSeconds: number): Promise<void>;
}

export async function startServer(options: {
  socketPath: string;
  socketMode: number;
  maxMessageBytes: number;
  registry: ModelRegistry;
  log: Logger;
}): Promise<RunningServer> {
  const { socketPath, log } = options;
  await prepareSocketPath(socketPath, log);
  const server = new grpc.Server({
    "grpc.max_receive_message_length": options.maxMessageBytes,
    "grpc.max_send_message_length": options.maxMessageBytes,
  });
  const implementation: grpc.UntypedServiceImplementation = {};
  for (const [rpc, handler] of Object.entries(handlers(options.registry))) {
    implementation[rpc] = (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
      const started = performance.now();
      const timing = log.verbose ? { bindMs: 0, runMs: 0, encodeMs: 0, copiedInputs: 0 } : undefined;
      Promise.resolve()
        .then(() => {
          if (call.request instanceof MalformedMessage) {
            throw invalidArgument(`request is not a valid ${call.request.typeName} message: ${call.request.reason}`);
          }
          return handler(call.request, timing);
        })
        .then(
          (response) => {
            callback(null, response);
            log.debug("rpc", { rpc, code: "OK", ms: roundMs(performance.now() - started), ...roundTiming(timing) });
          },
          (error) => {
            const serviceError = toServiceError(error, rpc, log);
            callback(serviceError);
            log.debug("rpc", { rpc, code: Status[serviceError.code!], details: serviceError.details });
          },
        );
    };
  }
  server.addService(agentService, implementation);
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix:${socketPath}`, grpc.ServerCredentials.createInsecure(), (error) => {
      if (error) reject(new StartupError([`socket ${socketPath}: cannot listen: ${error.message}`]));
      else resolve();
    })
  );
  await Deno.chmod(socketPath, options.socketMode);
  return {
    async stop(graceSeconds: number) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          log.warn("in-flight calls did not finish in time; cancelling them", { graceSeconds });
          server.forceShutdown();
          resolve();
        }, graceSeconds * 1000);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      await Deno.remove(socketPath).catch(() => {});
    },
  };
}
