// The agent's lifecycle: configuration, ONNX Runtime, the model registry and the server, started in
// order and stopped in reverse on SIGTERM, SIGINT or SIGHUP.

import {
  type AgentConfig,
  captureDiskPath,
  DEFAULTS,
  iotCredentials,
  loadConfigFile,
  type LoadedConfig,
} from "./config.ts";
import { CaptureService } from "./capture/service.ts";
import {
  type CredentialSource,
  EnvironmentCredentials,
  IotCredentials,
  keyFileProblems,
} from "./capture/credentials.ts";
import { StartupError } from "./errors.ts";
import { createLogger, type Logger } from "./log.ts";
import { Metrics, parseMetricsAddress, serveMetrics } from "./metrics.ts";
import { permissionProblems } from "./permissions.ts";
import { ModelRegistry } from "./models.ts";
import { Libc } from "../ffi/libc.ts";
import { openRuntime } from "./runtime.ts";
import { SharedMemoryReader } from "./shm.ts";
import { startServer } from "./server.ts";

const STOP_SIGNALS: Deno.Signal[] = ["SIGTERM", "SIGINT", "SIGHUP"];
/** How far past the grace period a stop may run before the process exits anyway. */
const STOP_OVERRUN_MS = 700;

export interface ServeOptions {
  socketPath: string;
  configPath: string | null;
  /** `-f`: remove a socket file at the path even when another process serves on it. */
  removeExistingSocket?: boolean;
  /** `-m <bytes>`: overrides edge_agent_max_message_bytes. */
  maxMessageBytes?: number;
}

/** Creates the state folder and removes what an interrupted package load left in it. */
async function prepareStateDir(stateDir: string): Promise<void> {
  try {
    await Deno.mkdir(stateDir, { recursive: true, mode: 0o750 });
    for (const leftover of ["staging", "packages"]) {
      await Deno.remove(`${stateDir}/${leftover}`, { recursive: true }).catch(() => {});
    }
  } catch (error) {
    throw new StartupError([`state folder ${stateDir}: ${(error as Error).message}`]);
  }
}

/**
 * Where S3 credentials come from: the AWS IoT credentials provider when its keys are set (and the
 * provider is "Aws"), else the environment. A private key readable by others stops start-up.
 */
async function credentialSource(config: AgentConfig, log: Logger): Promise<CredentialSource> {
  if (!iotCredentials(config)) {
    if (config.credentialsProvider && !/^(aws|none)$/i.test(config.credentialsProvider)) {
      const provider = config.credentialsProvider;
      log.warn("this credentials provider is not supported: S3 credentials come from the environment", { provider });
    }
    return new EnvironmentCredentials();
  }
  const problems = await keyFileProblems(config.iotKeyFile!);
  if (problems.length) throw new StartupError(problems);
  const source = new IotCredentials({
    endpoint: config.iotCredentialsEndpoint!,
    deviceFleetName: config.deviceFleetName || "unnamed-fleet",
    thingName: config.iotThingName || "unnamed-device", // the config defaults it to the device name
    certFile: config.iotCertFile!,
    keyFile: config.iotKeyFile!,
    caFile: config.iotCaFile,
    logger: log,
  });
  log.info("S3 credentials come from the AWS IoT credentials provider", { url: source.url.href });
  return source;
}

async function openCapture(config: AgentConfig, log: Logger): Promise<CaptureService> {
  const s3 = config.captureDestination === "Cloud" || config.capturePeriodicUpload;
  const credentials = s3 ? await credentialSource(config, log) : null;
  return await CaptureService.open({
    stateDir: config.stateDir,
    // Capture object keys name the fleet and device; a config without them still captures.
    deviceFleetName: config.deviceFleetName || "unnamed-fleet",
    deviceName: config.deviceName || "unnamed-device",
    folderPrefix: config.captureFolderPrefix,
    destination: config.captureDestination,
    diskPath: captureDiskPath(config),
    s3: s3
      ? {
        bucket: config.s3Bucket,
        region: config.region || "us-east-1",
        endpoint: config.s3Endpoint ?? undefined,
        forcePathStyle: config.s3ForcePathStyle,
        credentials: credentials!,
      }
      : undefined,
    bufferSize: config.captureBufferSize,
    maxSpoolBytes: config.captureSpoolMaxBytes,
    batchSize: config.captureBatchSize,
    pushPeriodSeconds: config.capturePushPeriodSeconds,
    base64EmbedLimit: config.captureBase64EmbedLimit,
    layout: config.captureLayout,
    periodicUpload: config.capturePeriodicUpload,
    periodicUploadPeriodSeconds: config.capturePeriodicUploadPeriodSeconds,
    statusRetentionSeconds: config.captureStatusRetentionSeconds,
    statusRetentionCount: config.captureStatusRetentionCount,
    logger: log,
  }).catch((error) => {
    // Another agent on the same state folder, an unreadable spool: start-up errors, not crashes.
    if (error instanceof StartupError) throw error;
    throw new StartupError([`capture: ${error.message}`]);
  });
}

/** Serves metrics where the config says, replacing a stale socket; returns how to stop. */
async function startMetrics(config: AgentConfig, render: () => string): Promise<() => Promise<void>> {
  const address = config.metrics ? parseMetricsAddress(config.metrics) : null;
  if (!address) return async () => {};
  if ("path" in address) await Deno.remove(address.path).catch(() => {});
  let stop: () => Promise<void>;
  try {
    stop = serveMetrics(address, render);
  } catch (error) {
    throw new StartupError([`metrics ${config.metrics}: cannot listen: ${(error as Error).message}`]);
  }
  return async () => {
    await stop();
    if ("path" in address) await Deno.remove(address.path).catch(() => {});
  };
}

/** Serves until a stop signal arrives; resolves when everything is released. */
export async function serve(options: ServeOptions): Promise<void> {
  const { config, ignoredKeys, resolvedPaths }: LoadedConfig = options.configPath
    ? await loadConfigFile(options.configPath)
    : { config: structuredClone(DEFAULTS), ignoredKeys: [], resolvedPaths: {} };
  if (options.maxMessageBytes !== undefined) {
    config.maxMessageBytes = options.maxMessageBytes;
    // -m may raise the limit past the default total budget: one message of that size must still fit.
    config.maxBufferedMessageBytes = Math.max(config.maxBufferedMessageBytes, options.maxMessageBytes);
  }
  const problems = await permissionProblems(options.socketPath, config);
  if (problems.length > 0) throw new StartupError(problems);
  const log = createLogger(config.logVerbose);
  if (ignoredKeys.length > 0) log.info("config keys accepted but not used by this agent", { keys: ignoredKeys });
  if (Object.keys(resolvedPaths).length > 0) {
    log.info("relative paths in the config resolved against the working folder", {
      workingFolder: Deno.cwd(),
      paths: resolvedPaths,
    });
  }
  if (config.allowUnsignedModels) {
    log.warn("edge_agent_allow_unsigned_models is on: models load without a signature; for development only");
  } else if (!config.rootCertsPath && !config.trustedModelKeys) {
    log.warn(
      "no trust configured: LoadModel refuses every model until sagemaker_edge_core_root_certs_path or edge_agent_trusted_model_keys is set",
    );
  }
  await prepareStateDir(config.stateDir);

  const ort = await openRuntime(config);
  const libc = Libc.open();
  const shm = new SharedMemoryReader(libc, {
    kind: config.sharedMemory,
    posixPrefix: config.shmPosixPrefix,
    sysvKeepAttachedSeconds: config.sysvKeepAttachedSeconds,
  });
  const metrics = new Metrics();
  const registry = new ModelRegistry(ort, shm, config, log, metrics);
  let capture: CaptureService | null = null;
  let stopMetrics = async () => {};
  let server: Awaited<ReturnType<typeof startServer>> | null = null;
  try {
    capture = await openCapture(config, log);
    server = await startServer({
      socketPath: options.socketPath,
      removeExistingSocket: options.removeExistingSocket ?? false,
      socketMode: config.socketMode,
      maxMessageBytes: config.maxMessageBytes,
      limits: {
        maxConnections: config.maxConnections,
        idleConnectionMs: config.idleConnectionSeconds * 1000,
        maxConcurrentStreams: config.maxConcurrentStreams,
        maxHeaderListBytes: config.maxHeaderListBytes,
        controlFramesPerSecond: config.controlFramesPerSecond,
        maxPendingWriteBytes: config.maxPendingWriteBytes,
        maxBufferedMessageBytes: config.maxBufferedMessageBytes,
      },
      services: { registry, capture, shm, clockSkewSeconds: config.captureClockSkewSeconds },
      metrics,
      log,
    });
    const service = capture;
    stopMetrics = await startMetrics(
      config,
      () => metrics.render(registry.list(), service.stats(), shm.attachedSegments),
    );
  } catch (error) {
    await server?.stop(0);
    await capture?.close({ drainMs: 0 });
    ort.close();
    shm.close();
    libc.close();
    throw error;
  }

  const stopRequested = Promise.withResolvers<Deno.Signal>();
  const listeners = STOP_SIGNALS.map((signal) => {
    const listener = () => stopRequested.resolve(signal);
    Deno.addSignalListener(signal, listener);
    return [signal, listener] as const;
  });
  log.info("serving", {
    socket: options.socketPath,
    config: options.configPath ?? undefined,
    maxMessageBytes: config.maxMessageBytes,
    onnxruntime: ort.version,
    sharedMemory: config.sharedMemory,
    device: config.deviceName || undefined,
    fleet: config.deviceFleetName || undefined,
    pid: Deno.pid,
  });

  const signal = await stopRequested.promise;
  log.info("stopping", { signal });
  const graceMs = config.shutdownGraceSeconds * 1000;
  const deadline = performance.now() + graceMs;
  // The stop ends within the grace period plus a little, whatever clients or a long model run do:
  // past it the process exits anyway. Unref'd, so it never delays an exit that happens by itself.
  const watchdog = setTimeout(() => {
    log.warn("stop took longer than the grace period; exiting now", { graceSeconds: config.shutdownGraceSeconds });
    Deno.exit(0);
  }, graceMs + STOP_OVERRUN_MS);
  Deno.unrefTimer(watchdog as unknown as number);
  for (const [s, listener] of listeners) Deno.removeSignalListener(s, listener);
  await stopMetrics();
  await server.stop(config.shutdownGraceSeconds);
  // Acknowledged captures are already durable; the rest of the grace period lets queued uploads finish.
  await capture.close({ drainMs: Math.max(0, deadline - performance.now()) });
  await registry.closeAll();
  ort.close();
  // After closeAll: no Run reads a segment any more, so every kept one detaches now.
  shm.close();
  libc.close();
  log.info("stopped");
}
