// The gRPC service on the Unix socket: one handler per rpc, errors mapped to statuses.

import type protobuf from "protobufjs";
import { AgentError, CallCancelled, invalidArgument, StartupError, Status } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { ModelInfo, ModelRegistry, PredictTiming } from "../inference/models.ts";
import { firstTensorBytesOffset, metadataOf } from "../inference/tensors.ts";
import { type CallContext, GrpcServer, type StreamHandler, type UnaryHandler } from "../transport/http2.ts";
import type { ServerLimits } from "../transport/limits.ts";
import { type DeploymentHealth, HealthService } from "./health.ts";
import type { CaptureService } from "../capture/service.ts";
import { captureRecord } from "../capture/request.ts";
import type { Metrics } from "./metrics.ts";
import type { SharedMemoryReader } from "../inference/shm.ts";
import {
  type CaptureDataRequest,
  encodePredictResponseInto,
  enumValues,
  health,
  HEALTH_SERVICE_NAME,
  type LoadModelRequest,
  type Model,
  type NameRequest,
  type PredictRequest,
  RPC_TYPES,
  type RpcName,
  SERVICE_NAME,
} from "./wire.ts";

const encoder = new TextEncoder();

const REFLECTION_PATHS = [
  "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/** Reflection's descriptors (and protobufjs' descriptor extension) load at the first reflection call. */
const serverReflectionInfo: StreamHandler = async function* (requests, cancelled) {
  const reflection = await import("./reflection.ts");
  yield* reflection.serverReflectionInfo(requests, cancelled);
};

function modelMessage(info: ModelInfo): Model {
  return {
    url: info.url,
    name: info.name,
    input_tensor_metadatas: info.inputs.map(metadataOf),
    output_tensor_metadatas: info.outputs.map(metadataOf),
  };
}

/**
 * One rpc's work. Only Predict stops when `call.signal` aborts: LoadModel, UnLoadModel and CaptureData
 * change state, so once started they finish and only their answer is dropped.
 */
type Handler = (request: unknown, timing: PredictTiming, call: CallContext) => Promise<unknown> | unknown;

/** What the handlers serve from. */
export interface Services {
  registry: ModelRegistry;
  capture: CaptureService;
  shm: SharedMemoryReader;
  clockSkewSeconds: number;
  /** The deployments' state, when they are on (health). */
  deployment?: DeploymentHealth | null;
}

const CAPTURE_STATUS = enumValues("CaptureDataStatus");

function handlers({ registry, capture, shm, clockSkewSeconds }: Services): Record<RpcName, Handler> {
  return {
    Predict: (request, timing, call) => {
      const { name, tensors, output_locations } = request as PredictRequest;
      return registry.predict(
        name,
        tensors,
        // Into a buffer the transport reuses once the answer has been written.
        (outputs) =>
          encodePredictResponseInto(
            outputs.map((output) => ({
              tensor_metadata: {
                name: encoder.encode(output.spec.name),
                data_type: output.spec.dataType.dataType,
                shape: output.shape,
              },
              byteLength: output.byteLength,
              copyInto: output.copyInto,
              ...(output.sharedMemory
                ? {
                  shared_memory_handle: {
                    size: output.sharedMemory.size.toString(),
                    offset: output.sharedMemory.offset.toString(),
                    segment_id: output.sharedMemory.segmentId.toString(),
                  },
                }
                : {}),
            })),
            (length) => call.responseBuffer(length),
          ),
        timing,
        call.signal,
        output_locations,
      );
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
    CaptureData: async (request) => {
      const req = request as CaptureDataRequest;
      const model = registry.describe(req.model_name);
      await capture.capture(captureRecord(req, { model, shm, clockSkewSeconds, nowMs: Date.now() }));
      return {};
    },
    // An unknown id is answered with status NOT_FOUND and gRPC OK: the enum value exists for it.
    GetCaptureDataStatus: (request) => ({
      status: CAPTURE_STATUS[capture.status((request as { capture_id: string }).capture_id)],
    }),
  };
}

const roundMs = (ms: number) => Number(ms.toFixed(3));

function roundTiming(timing: PredictTiming): Record<string, number | boolean> {
  if (timing.runMs === 0) return {};
  return {
    bindMs: roundMs(timing.bindMs),
    runMs: roundMs(timing.runMs),
    encodeMs: roundMs(timing.encodeMs),
    copiedInputs: timing.copiedInputs,
    sharedMemoryInputs: timing.sharedMemoryInputs,
    ...(timing.sharedMemoryOutputs
      ? { sharedMemoryOutputs: timing.sharedMemoryOutputs, copiedOutputs: timing.copiedOutputs ?? 0 }
      : {}),
    ...(timing.batchRequests ? { batchRequests: timing.batchRequests } : {}),
    ...(timing.onThisThread ? { onThisThread: true } : {}),
  };
}

function statusOf(error: unknown, rpc: string, log: Logger): { status: Status; details: string } {
  if (error instanceof AgentError) return { status: error.code, details: error.message };
  log.error("unexpected failure", { rpc, error: String((error as Error)?.stack ?? error) });
  return { status: Status.INTERNAL, details: `${rpc} failed: ${(error as Error)?.message ?? error}` };
}

/**
 * Refuses a live socket (unless `force`, Edge Manager's -f) or a non-socket file at `path`; removes a
 * stale socket a dead agent left.
 */
async function prepareSocketPath(path: string, log: Logger, force: boolean): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw new StartupError([`socket ${path}: ${(error as Error).message}`]);
  }
  if (!info.isSocket) {
    throw new StartupError([
      `socket ${path}: a file that is not a socket is in the way (-f removes only sockets); remove it or pass another -a path`,
    ]);
  }
  if (force) {
    log.info("removing the existing socket (-f)", { socket: path });
    await Deno.remove(path).catch((error) => {
      throw new StartupError([`socket ${path}: -f cannot remove it: ${error.message}`]);
    });
    return;
  }
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
  } catch {
    log.info("removing stale socket", { socket: path });
    await Deno.remove(path);
    return;
  }
  throw new StartupError([`socket ${path}: another process is already serving on it (-f replaces it)`]);
}

/** The model a request is about, for metrics ("" for none). */
function modelOf(request: unknown): string {
  const r = request as { name?: unknown; model_name?: unknown };
  return typeof r.model_name === "string" ? r.model_name : typeof r.name === "string" ? r.name : "";
}

/**
 * One unary method: decode, run the handler, encode; every failure becomes a status; metrics and a
 * debug log line per call.
 */
function unary(
  rpc: string,
  types: { request: protobuf.Type; response: protobuf.Type },
  handler: Handler,
  log: Logger,
  metrics: Metrics,
  isLoaded: (model: string) => boolean,
): UnaryHandler {
  // Names of models not loaded come from clients: they get no series of their own (see Metrics).
  const seriesOf = (model: string) => (isLoaded(model) ? model : "");
  return async (bytes, call) => {
    const started = performance.now();
    const timing = { bindMs: 0, runMs: 0, encodeMs: 0, copiedInputs: 0, sharedMemoryInputs: 0 };
    let model = "";
    metrics.started();
    try {
      let request: unknown;
      try {
        request = types.request.decode(bytes);
      } catch (error) {
        throw invalidArgument(`request is not a valid ${types.request.name} message: ${(error as Error).message}`);
      }
      model = modelOf(request);
      // Given up before it started (e.g. reset right behind its request): no work at all.
      call.throwIfCancelled();
      const response = await handler(request, timing, call);
      if (rpc === "UnLoadModel") metrics.forget(model);
      // Finished after its caller went: the transport drops the answer; count what the client saw.
      call.throwIfCancelled();
      const message = response instanceof Uint8Array ? response : types.response.encode(response as object).finish();
      const ms = performance.now() - started;
      metrics.request(rpc, seriesOf(model), "OK");
      if (rpc === "Predict" && isLoaded(model)) {
        metrics.predict(model, "total", ms / 1000);
        metrics.predict(model, "bind", timing.bindMs / 1000);
        metrics.predict(model, "run", timing.runMs / 1000);
        metrics.predict(model, "encode", timing.encodeMs / 1000);
      }
      // The line's fields cost more than the call's bookkeeping: built only when they are written.
      if (log.verbose) log.debug("rpc", { rpc, code: "OK", ms: roundMs(ms), ...roundTiming(timing) });
      return { message };
    } catch (error) {
      const { status, details } = statusOf(error, rpc, log);
      metrics.request(rpc, seriesOf(model), Status[status]);
      if (error instanceof CallCancelled && rpc === "Predict") metrics.predictCancelled(error.reason);
      if (log.verbose) log.debug("rpc", { rpc, code: Status[status], details });
      return { status, details };
    } finally {
      metrics.finished();
    }
  };
}

export interface RunningServer {
  /**
   * Stops accepting (new calls get UNAVAILABLE), lets in-flight calls finish for up to
   * `graceSeconds`, closes connections and removes the socket.
   */
  stop(graceSeconds: number): Promise<void>;
}

export async function startServer(options: {
  socketPath: string;
  removeExistingSocket?: boolean;
  socketMode: number;
  maxMessageBytes: number;
  limits?: Partial<ServerLimits>;
  services: Services;
  metrics: Metrics;
  log: Logger;
}): Promise<RunningServer> {
  const { socketPath, log } = options;
  await prepareSocketPath(socketPath, log, options.removeExistingSocket ?? false);
  const methods = new Map<string, UnaryHandler>();
  const isLoaded = (model: string) => options.services.registry.isLoaded(model);
  for (const [rpc, handler] of Object.entries(handlers(options.services)) as [RpcName, Handler][]) {
    methods.set(`/${SERVICE_NAME}/${rpc}`, unary(rpc, RPC_TYPES[rpc], handler, log, options.metrics, isLoaded));
  }
  const { registry, capture, deployment } = options.services;
  const healthService = new HealthService(registry, capture, deployment);
  methods.set(
    `/${HEALTH_SERVICE_NAME}/Check`,
    unary("Health.Check", health, healthService.check, log, options.metrics, isLoaded),
  );
  const server = new GrpcServer({
    methods,
    streams: new Map<string, StreamHandler>([
      ...REFLECTION_PATHS.map((path): [string, StreamHandler] => [path, serverReflectionInfo]),
      [`/${HEALTH_SERVICE_NAME}/Watch`, healthService.watch],
    ]),
    maxMessageBytes: options.maxMessageBytes,
    limits: options.limits,
    // A tensor's bytes at an aligned address are used in place; elsewhere each call copies them.
    alignments: new Map([[`/${SERVICE_NAME}/Predict`, { minBytes: 64 * 1024, offsetOf: firstTensorBytesOffset }]]),
    onConnectionError: (message) => log.warn("client connection error", { error: message }),
    onWarning: (message, fields) => log.warn(message, fields),
  });
  try {
    server.listen(socketPath);
  } catch (error) {
    throw new StartupError([`socket ${socketPath}: cannot listen: ${(error as Error).message}`]);
  }
  await Deno.chmod(socketPath, options.socketMode);
  return {
    async stop(graceSeconds: number) {
      healthService.stop();
      const unfinished = await server.stop(graceSeconds * 1000);
      if (unfinished.length > 0) {
        log.warn("in-flight calls did not finish in time", {
          graceSeconds,
          unfinished: unfinished.length,
          calls: unfinished,
        });
      }
      await Deno.remove(socketPath).catch(() => {});
    },
  };
}
