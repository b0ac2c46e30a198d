// The agent's lifecycle: configuration, ONNX Runtime, the model registry and the server, started in
// order and stopped in reverse on SIGTERM, SIGINT or SIGHUP.

import {
  type AgentConfig,
  captureDiskPath,
  DEFAULTS,
  deploymentSource,
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
import { Deployer } from "./deployments/deployer.ts";
import { type DeploymentSource, FolderSource, S3Source } from "./deployments/source.ts";
import { createLogger, type Logger } from "./log.ts";
import { Metrics, parseMetricsAddress, serveMetrics } from "./service/metrics.ts";
import { permissionProblems } from "./permissions.ts";
import { ModelRegistry } from "./inference/models.ts";
import { Libc } from "../ffi/libc.ts";
import { openRuntime } from "./inference/runtime.ts";
import { SharedMemoryReader } from "./inference/shm.ts";
import { startServer } from "./service/server.ts";

const STOP_SIGNALS: Deno.Signal[] = ["SIGTERM", "SIGINT", "SIGHUP"];
/** How long the agent must have had no call before a model change's leftovers are collected (releaseLeftovers). */
const LEFTOVERS_QUIET_MS = 1000;
/** How long after a model change calls may keep the agent from a quiet second before the shorter collection runs. */
const LEFTOVERS_PATIENCE_MS = 10_000;
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

async function openCapture(
  config: AgentConfig,
  log: Logger,
  credentials: () => Promise<CredentialSource>,
): Promise<CaptureService> {
  const s3 = config.captureDestination === "Cloud" || config.capturePeriodicUpload;
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
        credentials: await credentials(),
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

/**
 * The deployer when edge_agent_deployment_source names a source, with what the last apply left
 * loaded restored from the state folder (offline: the source is read once serving).
 */
async function openDeployments(
  config: AgentConfig,
  log: Logger,
  registry: ModelRegistry,
  credentials: () => Promise<CredentialSource>,
  metrics: Metrics,
): Promise<Deployer | null> {
  const spec = deploymentSource(config);
  if (spec === null || "problem" in spec) return null;
  const source: DeploymentSource = "folder" in spec ? new FolderSource(spec.folder) : new S3Source({
    bucket: spec.bucket,
    region: config.region || "us-east-1",
    endpoint: config.s3Endpoint ?? undefined,
    forcePathStyle: config.s3ForcePathStyle,
    credentials: await credentials(),
  }, spec.prefix);
  const deployer = await Deployer.open({
    registry,
    source,
    stateDir: config.stateDir,
    fleet: config.deviceFleetName,
    pollSeconds: config.deploymentPollSeconds,
    trust: { rootCertsPath: config.rootCertsPath, trustedKeysPath: config.trustedModelKeys },
    log,
    unloaded: (name) => metrics.forget(name),
  }).catch((error) => {
    throw new StartupError([`deployments: ${error.message}`]);
  });
  await deployer.restore();
  log.info("deployments on", { source: config.deploymentSource, fleet: config.deviceFleetName });
  return deployer;
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

/**
 * After a model loads or unloads, what the load left behind is garbage: the model's bytes as read and
 * verified, signature checking's working memory, ONNX Runtime's graph optimisation buffers. Collected
 * (when V8's gc is exposed: see permissions.ts) and trimmed from malloc's arenas at once, RSS is what
 * the models hold rather than what loading them took (cls + det: 135 -> 110-118 MiB). The cost is one
 * pause of the JavaScript thread per burst of model changes (130-520 ms on a busy 2-core machine),
 * logged at debug level, so it waits for a quiet agent. An agent that calls keep busy gets V8's regular
 * full collection meanwhile: a third of the pause, but it keeps ~10 MiB (the young generation's space
 * and the model's bytes).
 */
function releaseLeftovers(libc: Libc, log: Logger, memoryReducing: boolean): void {
  const started = performance.now();
  // "last-resort": V8's memory-reducing collection, which also gives back the young generation's space.
  const flavor = memoryReducing ? "last-resort" : "regular";
  (globalThis as { gc?: (options?: object) => void }).gc?.({ type: "major", execution: "sync", flavor });
  const gcMs = performance.now() - started;
  libc.trimHeap();
  if (log.verbose) {
    const mib = (bytes: number) => Math.round(bytes / 2 ** 17) / 8;
    const { rss, heapTotal, heapUsed, external } = Deno.memoryUsage();
    log.debug("memory after a model change (MiB)", {
      collection: flavor,
      ms: Math.round((performance.now() - started) * 10) / 10,
      gcMs: Math.round(gcMs * 10) / 10,
      rss: mib(rss),
      heapTotal: mib(heapTotal),
      heapUsed: mib(heapUsed),
      external: mib(external),
    });
  }
}

/** The agent's metrics, and when a call last started or finished: what the collection waits on. */
class ServingMetrics extends Metrics {
  lastCallActivity = -Infinity;

  override started(): void {
    super.started();
    this.lastCallActivity = performance.now();
  }

  override finished(): void {
    super.finished();
    this.lastCallActivity = performance.now();
  }
}

/** Serves until a stop signal arrives; resolves when everything is released. */
export async function serve(options: ServeOptions): Promise<void> {
  // Where start-up time goes, in ms since the process began (performance's time origin): a debug line.
  const startup: Record<string, number> = {};
  const mark = (phase: string) => startup[phase] = Math.round(performance.now() * 10) / 10;
  mark("modules");
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
  mark("config");
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

  mark("stateFolder");
  const ort = await openRuntime(config);
  mark("onnxRuntime");
  const libc = Libc.open();
  const shm = new SharedMemoryReader(libc, {
    kind: config.sharedMemory,
    posixPrefix: config.shmPosixPrefix,
    sysvKeepAttachedSeconds: config.sysvKeepAttachedSeconds,
  });
  const metrics = new ServingMetrics();
  const registry = new ModelRegistry(ort, shm, config, log, metrics);
  log.info("thread policy", { ...registry.threads });
  let capture: CaptureService | null = null;
  let deployer: Deployer | null = null;
  // One credential source for capture uploads and deployments, made when the first asks.
  let credentials: Promise<CredentialSource> | null = null;
  const sharedCredentials = () => credentials ??= credentialSource(config, log);
  // The collection pauses JavaScript, so it waits until no call has started or finished for a second:
  // a call arriving during the pause would wait it out, and one that comes while others are being
  // handled likely has more behind it. A burst of model changes is collected once. Calls that keep
  // the agent busy past the patience get the regular collection, and the full one when they pause.
  let leftovers: ReturnType<typeof setTimeout> | undefined;
  let lastChange = 0;
  let regularDone = false;
  const collectWhenQuiet = () => {
    const now = performance.now();
    const quietMs = metrics.inFlight === 0 ? now - metrics.lastCallActivity : 0;
    if (quietMs >= LEFTOVERS_QUIET_MS) return releaseLeftovers(libc, log, true);
    if (!regularDone && metrics.inFlight === 0 && now - lastChange >= LEFTOVERS_PATIENCE_MS) {
      regularDone = true;
      releaseLeftovers(libc, log, false);
    }
    collectIn(LEFTOVERS_QUIET_MS - quietMs);
  };
  const collectIn = (ms: number) => {
    clearTimeout(leftovers);
    leftovers = setTimeout(collectWhenQuiet, ms);
    Deno.unrefTimer(leftovers);
  };
  const collectLater = () => {
    lastChange = performance.now();
    regularDone = false;
    collectIn(LEFTOVERS_QUIET_MS);
  };
  registry.changes.addEventListener("change", collectLater);
  let stopMetrics = async () => {};
  let server: Awaited<ReturnType<typeof startServer>> | null = null;
  try {
    capture = await openCapture(config, log, sharedCredentials);
    mark("capture");
    deployer = await openDeployments(config, log, registry, sharedCredentials, metrics);
    mark("deployments");
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
      services: { registry, capture, shm, clockSkewSeconds: config.captureClockSkewSeconds, deployment: deployer },
      metrics,
      log,
    });
    const service = capture;
    const deployments = deployer;
    stopMetrics = await startMetrics(
      config,
      () =>
        metrics.render(
          registry.list(),
          service.stats(),
          shm.attachedSegments,
          deployments?.stats() ?? null,
          registry.threads,
        ),
    );
  } catch (error) {
    await server?.stop(0);
    await capture?.close({ drainMs: 0 });
    await registry.closeAll();
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
  mark("listening");
  log.debug("start-up", { msSinceProcessStart: startup });
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

  deployer?.start();

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
  // No swap starts once stopping: a download in progress is resumed after the restart.
  await deployer?.stop();
  await stopMetrics();
  await server.stop(config.shutdownGraceSeconds);
  // Acknowledged captures are already durable; the rest of the grace period lets queued uploads finish.
  await capture.close({ drainMs: Math.max(0, deadline - performance.now()) });
  await registry.closeAll();
  ort.close();
  // After closeAll: no Run reads a segment any more, so every kept one detaches now.
  shm.close();
  clearTimeout(leftovers);
  libc.close();
  log.info("stopped");
}
