// Configuration: Edge Manager's keys as they are, plus this agent's `edge_agent_*` keys.
// Every key is typed and checked; a wrong one stops start-up with a message naming it.

import { isAbsolute, resolve } from "node:path";
import { StartupError } from "./errors.ts";
import type { SharedMemoryKind } from "./inference/shm.ts";
import { CAPTURE_LAYOUTS, type CaptureLayout } from "./capture/layout.ts";

export const DEFAULT_SOCKET_PATH = "/tmp/sagemaker_edge_agent_example.sock";

export type GraphOptimization = "disable" | "basic" | "extended" | "all";

export interface AgentConfig {
  deviceName: string;
  deviceFleetName: string;
  region: string;
  rootCertsPath: string | null;
  logVerbose: boolean;
  onnxRuntimeLibrary: string | null;
  modelRoots: string[];
  stateDir: string;
  maxMessageBytes: number;
  modelMemoryBudgetBytes: number;
  intraOpThreads: number;
  interOpThreads: number;
  /** Intra-op threads of the models named here, on pools of their own (0: one per core); others use intraOpThreads. */
  modelIntraOpThreads: Record<string, number>;
  /** Runs of one model at once; 0: as many as the cores hold at intra-op threads each (see threadPolicy). */
  maxConcurrentRuns: number;
  /**
   * A Run expected to take at most this many microseconds runs on the agent's own thread when no other
   * Predict is in flight (no hand-off to a worker thread); 0: every Run goes to a worker thread.
   */
  inlineRunMaxUs: number;
  /** One intra-op and one inter-op pool for all models (ORT's global thread pools) instead of a pair per model. */
  sharedThreadPools: boolean;
  allowSpinning: boolean;
  graphOptimization: GraphOptimization;
  cpuMemArena: boolean;
  socketMode: number;
  shutdownGraceSeconds: number;
  sharedMemory: SharedMemoryKind;
  shmPosixPrefix: string;
  sysvKeepAttachedSeconds: number;
  trustedModelKeys: string | null;
  allowUnsignedModels: boolean;
  packageMaxBytes: number;
  packageMaxRatio: number;
  captureDestination: "Disk" | "Cloud";
  /** null: <stateDir>/captures. */
  captureDiskPath: string | null;
  captureFolderPrefix: string;
  s3Bucket: string;
  s3Endpoint: string | null;
  s3ForcePathStyle: boolean;
  captureBufferSize: number;
  captureBatchSize: number;
  capturePushPeriodSeconds: number;
  captureBase64EmbedLimit: number;
  captureLayout: CaptureLayout;
  capturePeriodicUpload: boolean;
  capturePeriodicUploadPeriodSeconds: number;
  captureSpoolMaxBytes: number;
  captureClockSkewSeconds: number;
  captureStatusRetentionSeconds: number;
  captureStatusRetentionCount: number;
  /** "unix:<path>" or "<loopback host>:<port>"; null: no metrics. */
  metrics: string | null;
  /** sagemaker_edge_provider_provider: "Aws" (or unset) uses the AWS IoT credentials provider when configured. */
  credentialsProvider: string | null;
  /** The AWS IoT credentials provider: device certificate, its private key, the endpoint's CA, the endpoint. */
  iotCertFile: string | null;
  iotKeyFile: string | null;
  iotCaFile: string | null;
  iotCredentialsEndpoint: string | null;
  /** sagemaker_edge_core_iot_thing_name; "": the device name. */
  iotThingName: string;
  // The gRPC server's bounds (README "Limits and hardening").
  maxConnections: number;
  idleConnectionSeconds: number;
  maxConcurrentStreams: number;
  maxHeaderListBytes: number;
  controlFramesPerSecond: number;
  maxPendingWriteBytes: number;
  maxBufferedMessageBytes: number;
  /** Where deployment manifests come from: "s3://bucket/prefix" or an absolute folder; "": deployments off. */
  deploymentSource: string;
  deploymentPollSeconds: number;
  /** Dynamic batching per model name, "*" for every other model; false turns a named model's off. */
  batching: Record<string, BatchingSettings | false>;
}

/** How one model's concurrent Predicts are combined (README "Dynamic batching"). */
export interface BatchingSettings {
  /** Most rows (first-dimension entries) in one Run. */
  maxBatchSize: number;
  /** Longest a request waits for others to join its Run, in milliseconds. */
  maxDelayMs: number;
  /** Most requests waiting; past it a request runs alone at once. */
  maxQueue: number;
}

type Kind = "string" | "boolean" | "integer" | "path" | "paths" | "mode" | "batching" | "threadsByModel";

interface KeySpec {
  kind: Kind;
  /** Field of AgentConfig it sets; absent for Edge Manager keys accepted but not used yet. */
  field?: keyof AgentConfig;
  min?: number;
  max?: number;
  oneOf?: readonly string[];
  pattern?: RegExp;
}

const MiB = 1024 * 1024;

export const DEFAULTS: AgentConfig = {
  deviceName: "",
  deviceFleetName: "",
  region: "",
  rootCertsPath: null,
  logVerbose: false,
  onnxRuntimeLibrary: null,
  modelRoots: ["/var/lib/edge-agent/models"],
  stateDir: "/var/lib/edge-agent/state",
  maxMessageBytes: 64 * MiB,
  modelMemoryBudgetBytes: 0,
  intraOpThreads: 1,
  interOpThreads: 1,
  modelIntraOpThreads: {},
  maxConcurrentRuns: 0,
  inlineRunMaxUs: 1000,
  sharedThreadPools: true,
  allowSpinning: false,
  graphOptimization: "all",
  cpuMemArena: true,
  socketMode: 0o660,
  shutdownGraceSeconds: 10,
  sharedMemory: "sysv",
  shmPosixPrefix: "/edge_agent_",
  sysvKeepAttachedSeconds: 10,
  trustedModelKeys: null,
  allowUnsignedModels: false,
  packageMaxBytes: 2 * 1024 * MiB,
  packageMaxRatio: 100,
  captureDestination: "Disk",
  captureDiskPath: null,
  captureFolderPrefix: "",
  s3Bucket: "",
  s3Endpoint: null,
  s3ForcePathStyle: false,
  captureBufferSize: 30,
  captureBatchSize: 10,
  capturePushPeriodSeconds: 4,
  captureBase64EmbedLimit: 3072,
  captureLayout: "edge-manager",
  capturePeriodicUpload: false,
  capturePeriodicUploadPeriodSeconds: 60,
  captureSpoolMaxBytes: 256 * MiB,
  captureClockSkewSeconds: 60,
  captureStatusRetentionSeconds: 86400,
  captureStatusRetentionCount: 100000,
  metrics: null,
  credentialsProvider: null,
  iotCertFile: null,
  iotKeyFile: null,
  iotCaFile: null,
  iotCredentialsEndpoint: null,
  iotThingName: "",
  maxConnections: 256,
  idleConnectionSeconds: 300,
  maxConcurrentStreams: 100,
  maxHeaderListBytes: 65536,
  controlFramesPerSecond: 1000,
  maxPendingWriteBytes: 16 * MiB,
  maxBufferedMessageBytes: 256 * MiB,
  deploymentSource: "",
  deploymentPollSeconds: 300,
  batching: {},
};

/** Edge Manager's documented keys. Those without `field` are accepted and logged as ignored. */
const EDGE_MANAGER_KEYS: Record<string, KeySpec> = {
  sagemaker_edge_core_device_name: { kind: "string", field: "deviceName" },
  sagemaker_edge_core_device_fleet_name: { kind: "string", field: "deviceFleetName" },
  sagemaker_edge_core_region: { kind: "string", field: "region" },
  sagemaker_edge_core_root_certs_path: { kind: "path", field: "rootCertsPath" },
  sagemaker_edge_log_verbose: { kind: "boolean", field: "logVerbose" },
  sagemaker_edge_provider_provider: { kind: "string", field: "credentialsProvider" },
  sagemaker_edge_provider_provider_path: { kind: "string" },
  sagemaker_edge_provider_aws_ca_cert_file: { kind: "path", field: "iotCaFile" },
  sagemaker_edge_provider_aws_cert_file: { kind: "path", field: "iotCertFile" },
  sagemaker_edge_provider_aws_cert_pk_file: { kind: "path", field: "iotKeyFile" },
  sagemaker_edge_provider_aws_iot_cred_endpoint: {
    kind: "string",
    field: "iotCredentialsEndpoint",
    pattern: /^(https:\/\/)?[A-Za-z0-9.-]+(:\d{1,5})?(\/[^\s]*)?$/,
  },
  sagemaker_edge_provider_s3_bucket_name: { kind: "string", field: "s3Bucket" },
  sagemaker_edge_core_capture_data_destination: {
    kind: "string",
    field: "captureDestination",
    oneOf: ["Disk", "Cloud"],
  },
  sagemaker_edge_core_capture_data_disk_path: { kind: "path", field: "captureDiskPath" },
  sagemaker_edge_core_capture_data_buffer_size: { kind: "integer", field: "captureBufferSize", min: 1, max: 1_000_000 },
  sagemaker_edge_core_capture_data_batch_size: { kind: "integer", field: "captureBatchSize", min: 1, max: 10_000 },
  sagemaker_edge_core_capture_data_push_period_seconds: {
    kind: "integer",
    field: "capturePushPeriodSeconds",
    min: 1,
    max: 86400,
  },
  sagemaker_edge_core_capture_data_base64_embed_limit: {
    kind: "integer",
    field: "captureBase64EmbedLimit",
    min: 0,
    max: 3072,
  },
  sagemaker_edge_core_capture_data_periodic_upload: { kind: "boolean", field: "capturePeriodicUpload" },
  sagemaker_edge_core_capture_data_periodic_upload_period_seconds: {
    kind: "integer",
    field: "capturePeriodicUploadPeriodSeconds",
    min: 1,
    max: 86400,
  },
  sagemaker_edge_core_folder_prefix: { kind: "string", field: "captureFolderPrefix" },
  sagemaker_edge_telemetry_libsystemd_path: { kind: "string" },
  // The device name's older key, still written by Edge Manager's config generator and container template.
  sagemaker_edge_core_device_uuid: { kind: "string", field: "deviceName" },
  sagemaker_edge_core_iot_thing_name: { kind: "string", field: "iotThingName" },
  // Written by AWS's device set-up tools for the 2021-2022 agents (database, deployment and DLR modules).
  sagemaker_edge_core_config_path: { kind: "string" },
  sagemaker_edge_core_endpoint_override: { kind: "string" },
  sagemaker_edge_db_module_path: { kind: "string" },
  sagemaker_edge_local_data_root_path: { kind: "string" },
  sagemaker_edge_deployment_lib_path: { kind: "string" },
  sagemaker_edge_model_deployment_poll_interval: { kind: "integer", min: 0 },
  sagemaker_edge_dlr_backend_options: { kind: "string" },
};

/** Keys this agent adds. */
const AGENT_KEYS: Record<string, KeySpec> = {
  edge_agent_onnxruntime_library: { kind: "path", field: "onnxRuntimeLibrary" },
  edge_agent_model_roots: { kind: "paths", field: "modelRoots" },
  edge_agent_state_dir: { kind: "path", field: "stateDir" },
  edge_agent_max_message_bytes: { kind: "integer", field: "maxMessageBytes", min: 4096, max: 2 ** 31 - 1 },
  edge_agent_model_memory_budget_bytes: { kind: "integer", field: "modelMemoryBudgetBytes", min: 0 },
  edge_agent_intra_op_threads: { kind: "integer", field: "intraOpThreads", min: 0, max: 256 },
  edge_agent_inter_op_threads: { kind: "integer", field: "interOpThreads", min: 0, max: 256 },
  edge_agent_model_intra_op_threads: { kind: "threadsByModel", field: "modelIntraOpThreads" },
  edge_agent_max_concurrent_runs: { kind: "integer", field: "maxConcurrentRuns", min: 0, max: 1024 },
  edge_agent_inline_run_max_us: { kind: "integer", field: "inlineRunMaxUs", min: 0, max: 10_000 },
  edge_agent_shared_thread_pools: { kind: "boolean", field: "sharedThreadPools" },
  edge_agent_allow_spinning: { kind: "boolean", field: "allowSpinning" },
  edge_agent_graph_optimization: {
    kind: "string",
    field: "graphOptimization",
    oneOf: ["disable", "basic", "extended", "all"],
  },
  edge_agent_cpu_mem_arena: { kind: "boolean", field: "cpuMemArena" },
  edge_agent_socket_mode: { kind: "mode", field: "socketMode" },
  edge_agent_shared_memory: { kind: "string", field: "sharedMemory", oneOf: ["sysv", "posix", "both"] },
  edge_agent_shm_posix_prefix: { kind: "string", field: "shmPosixPrefix", pattern: /^\/[^/]{0,200}$/ },
  edge_agent_sysv_keep_attached_seconds: {
    kind: "integer",
    field: "sysvKeepAttachedSeconds",
    min: 0,
    max: 3600,
  },
  edge_agent_trusted_model_keys: { kind: "path", field: "trustedModelKeys" },
  edge_agent_allow_unsigned_models: { kind: "boolean", field: "allowUnsignedModels" },
  edge_agent_package_max_bytes: { kind: "integer", field: "packageMaxBytes", min: 1024 },
  edge_agent_package_max_ratio: { kind: "integer", field: "packageMaxRatio", min: 2 },
  edge_agent_s3_endpoint: { kind: "string", field: "s3Endpoint", pattern: /^https?:\/\/[A-Za-z0-9.-]+(:\d{1,5})?\/?$/ },
  edge_agent_s3_force_path_style: { kind: "boolean", field: "s3ForcePathStyle" },
  edge_agent_capture_layout: { kind: "string", field: "captureLayout", oneOf: CAPTURE_LAYOUTS },
  edge_agent_capture_spool_max_bytes: { kind: "integer", field: "captureSpoolMaxBytes", min: MiB },
  edge_agent_capture_clock_skew_seconds: { kind: "integer", field: "captureClockSkewSeconds", min: 0, max: 86400 },
  edge_agent_capture_status_retention_seconds: {
    kind: "integer",
    field: "captureStatusRetentionSeconds",
    min: 1,
  },
  edge_agent_capture_status_retention_count: { kind: "integer", field: "captureStatusRetentionCount", min: 1 },
  edge_agent_metrics: {
    kind: "string",
    field: "metrics",
    pattern: /^(unix:\/[^,]+|(127\.0\.0\.1|localhost|\[::1\]):\d{1,5})$/,
  },
  edge_agent_shutdown_grace_seconds: { kind: "integer", field: "shutdownGraceSeconds", min: 0, max: 3600 },
  edge_agent_max_connections: { kind: "integer", field: "maxConnections", min: 1, max: 65536 },
  edge_agent_idle_connection_seconds: { kind: "integer", field: "idleConnectionSeconds", min: 1, max: 86400 },
  edge_agent_max_concurrent_streams: { kind: "integer", field: "maxConcurrentStreams", min: 1, max: 10000 },
  edge_agent_max_header_list_bytes: { kind: "integer", field: "maxHeaderListBytes", min: 1024, max: 16 * MiB },
  edge_agent_control_frames_per_second: { kind: "integer", field: "controlFramesPerSecond", min: 10, max: 1_000_000 },
  edge_agent_max_pending_write_bytes: { kind: "integer", field: "maxPendingWriteBytes", min: 65536, max: 2 ** 31 - 1 },
  edge_agent_max_buffered_message_bytes: { kind: "integer", field: "maxBufferedMessageBytes", min: 4096 },
  edge_agent_deployment_source: { kind: "string", field: "deploymentSource" },
  edge_agent_deployment_poll_seconds: { kind: "integer", field: "deploymentPollSeconds", min: 1, max: 86400 },
  edge_agent_batching: { kind: "batching", field: "batching" },
};

export interface LoadedConfig {
  config: AgentConfig;
  /** Edge Manager keys present in the file that this agent does not act on. */
  ignoredKeys: string[];
  /** Keys whose relative path was resolved against the working folder, with the absolute path. */
  resolvedPaths: Record<string, string | string[]>;
}

/**
 * Validates a parsed JSON object. Relative paths resolve against `workingFolder`, as Edge Manager's
 * agent resolved them. Throws StartupError listing every problem.
 */
export function parseConfig(raw: unknown, source = "config", workingFolder = Deno.cwd()): LoadedConfig {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new StartupError([`${source}: must be a JSON object of keys and values`]);
  }
  const config: AgentConfig = structuredClone(DEFAULTS);
  const problems: string[] = [];
  const ignoredKeys: string[] = [];
  const resolvedPaths: Record<string, string | string[]> = {};
  // Which key set each field, so that two names of one setting cannot disagree.
  const setBy = new Map<keyof AgentConfig, [string, unknown]>();
  for (const [key, value] of Object.entries(raw)) {
    const spec = EDGE_MANAGER_KEYS[key] ?? AGENT_KEYS[key];
    if (!spec) {
      problems.push(`${source}: unknown key "${key}"`);
      continue;
    }
    const checked = checkValue(`key "${key}"`, spec, value, workingFolder);
    if (typeof checked === "object" && checked !== null && "problem" in checked) {
      problems.push(`${source}: ${checked.problem}`);
    } else if (spec.field) {
      const earlier = setBy.get(spec.field);
      // An empty value (templates leave one key blank) does not disagree, nor replace the other.
      if (earlier && checked === "") continue;
      if (earlier && earlier[1] !== checked && earlier[1] !== "") {
        problems.push(
          `${source}: keys "${earlier[0]}" (${JSON.stringify(earlier[1])}) and "${key}" (${
            JSON.stringify(checked)
          }) name the same setting with different values; keep one`,
        );
      }
      setBy.set(spec.field, [key, checked]);
      (config as unknown as Record<string, unknown>)[spec.field] = checked;
      if (JSON.stringify(value) !== JSON.stringify(checked) && (spec.kind === "path" || spec.kind === "paths")) {
        resolvedPaths[key] = checked as string | string[];
      }
    } else {
      ignoredKeys.push(key);
    }
  }
  if (problems.length === 0) problems.push(...crossChecks(config, source));
  if (problems.length > 0) throw new StartupError(problems);
  config.iotThingName ||= config.deviceName;
  return { config, ignoredKeys, resolvedPaths };
}

/** Checks `-m <bytes>`, the command line's gRPC message size limit, as edge_agent_max_message_bytes is checked. */
export function parseMessageLimit(text: string): number | { problem: string } {
  return checkValue("-m", AGENT_KEYS.edge_agent_max_message_bytes, text, "/") as number | { problem: string };
}

/** Rules that involve several keys. */
function crossChecks(config: AgentConfig, source: string): string[] {
  const problems: string[] = [];
  const s3 = config.captureDestination === "Cloud" || config.capturePeriodicUpload;
  if (s3 && !config.s3Bucket) {
    problems.push(`${source}: uploading captures to S3 needs "sagemaker_edge_provider_s3_bucket_name"`);
  }
  if (s3 && !config.region && !config.s3Endpoint) {
    problems.push(`${source}: uploading captures to S3 needs "sagemaker_edge_core_region" or "edge_agent_s3_endpoint"`);
  }
  if ((s3 || deploymentS3(config)) && iotCredentials(config)) {
    for (const [key, value] of [["cert_file", config.iotCertFile], ["cert_pk_file", config.iotKeyFile]] as const) {
      if (!value) {
        problems.push(`${source}: the AWS IoT credentials provider needs "sagemaker_edge_provider_aws_${key}"`);
      }
    }
  }
  const deployments = deploymentSource(config);
  if (deployments && "problem" in deployments) {
    problems.push(`${source}: "edge_agent_deployment_source" ${deployments.problem}`);
  }
  if (deployments && !config.deviceFleetName) {
    problems.push(`${source}: deployments need the fleet name "sagemaker_edge_core_device_fleet_name"`);
  }
  if (deployments && "bucket" in deployments && !config.region && !config.s3Endpoint) {
    problems.push(`${source}: deployments from S3 need "sagemaker_edge_core_region" or "edge_agent_s3_endpoint"`);
  }
  if (config.maxBufferedMessageBytes < config.maxMessageBytes) {
    problems.push(
      `${source}: "edge_agent_max_buffered_message_bytes" (${config.maxBufferedMessageBytes}) must be at least "edge_agent_max_message_bytes" (${config.maxMessageBytes})`,
    );
  }
  return problems;
}

/** Whether S3 credentials come from the AWS IoT credentials provider (else from the environment). */
export function iotCredentials(config: AgentConfig): boolean {
  const provider = (config.credentialsProvider ?? "Aws").toLowerCase();
  return provider === "aws" && config.iotCredentialsEndpoint !== null && config.iotCredentialsEndpoint !== "";
}

/** Where Disk captures go. */
export function captureDiskPath(config: AgentConfig): string {
  return config.captureDiskPath ?? `${config.stateDir}/captures`;
}

/** The S3 host ("host" or "host:port") capture uploads reach, or null when they do not use S3. */
export function s3Host(config: AgentConfig): string | null {
  if (config.captureDestination !== "Cloud" && !config.capturePeriodicUpload) return null;
  return s3HostOf(config, config.s3Bucket);
}

function s3HostOf(config: AgentConfig, bucket: string): string {
  if (config.s3Endpoint) return new URL(config.s3Endpoint).host;
  const pathStyle = config.s3ForcePathStyle || bucket.includes(".");
  return `${pathStyle ? "" : `${bucket}.`}s3.${config.region}.amazonaws.com`;
}

/** Where deployments come from (edge_agent_deployment_source), null when off, or what is wrong with it. */
export type DeploymentSourceSpec = { bucket: string; prefix: string } | { folder: string } | { problem: string };

export function deploymentSource(config: AgentConfig): DeploymentSourceSpec | null {
  const value = config.deploymentSource;
  if (value === "") return null;
  const s3 = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(\/.*)?$/.exec(value);
  if (s3) return { bucket: s3[1], prefix: (s3[2] ?? "/").slice(1).replace(/([^/])$/, "$1/") };
  if (isAbsolute(value) && !value.includes(",")) return { folder: resolve(value) };
  return { problem: `must be "s3://<bucket>/<prefix>" or an absolute folder path, got ${JSON.stringify(value)}` };
}

/** The S3 deployment source's bucket and prefix, or null when deployments are off or come from a folder. */
export function deploymentS3(config: AgentConfig): { bucket: string; prefix: string; host: string } | null {
  const spec = deploymentSource(config);
  return spec && "bucket" in spec ? { ...spec, host: s3HostOf(config, spec.bucket) } : null;
}

/** Reads and validates the config file at `path`. */
export async function loadConfigFile(path: string): Promise<LoadedConfig> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new StartupError([`config ${path}: cannot be read: ${(error as Error).message}`]);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new StartupError([`config ${path}: not valid JSON: ${(error as Error).message}`]);
  }
  return parseConfig(raw, `config ${path}`);
}

/** Checks one value; `label` names it in the problem. Relative paths resolve against `workingFolder`. */
function checkValue(
  label: string,
  spec: KeySpec,
  value: unknown,
  workingFolder: string,
): unknown | { problem: string } {
  const wrong = (expected: string) => ({
    problem: `${label} must be ${expected}, got ${JSON.stringify(value)}`,
  });
  switch (spec.kind) {
    case "string":
      if (typeof value !== "string") return wrong("a string");
      if (spec.oneOf && !spec.oneOf.includes(value)) return wrong(`one of ${spec.oneOf.join(", ")}`);
      if (spec.pattern && !spec.pattern.test(value)) return wrong(`a string matching ${spec.pattern.source}`);
      return value;
    case "boolean":
      if (typeof value === "boolean") return value;
      // Edge Manager's own sample configs write booleans as strings.
      if (typeof value === "string" && value.toLowerCase() === "true") return true;
      if (typeof value === "string" && value.toLowerCase() === "false") return false;
      return wrong("true or false");
    case "integer": {
      // Edge Manager read whole numbers written as strings too ("30"); anything else is refused.
      const number = typeof value === "string" && /^-?\d{1,16}$/.test(value) ? Number(value) : value;
      if (typeof number !== "number" || !Number.isSafeInteger(number)) return wrong("a whole number");
      if (spec.min !== undefined && number < spec.min) return wrong(`at least ${spec.min}`);
      if (spec.max !== undefined && number > spec.max) return wrong(`at most ${spec.max}`);
      return number;
    }
    case "path":
      if (typeof value !== "string" || value === "") return wrong("a path");
      return isAbsolute(value) ? value : resolve(workingFolder, value);
    case "paths":
      if (!Array.isArray(value) || !value.every((p) => typeof p === "string" && p !== "")) {
        return wrong("a list of paths");
      }
      return value.map((p) => (isAbsolute(p) ? p : resolve(workingFolder, p)));
    case "mode":
      if (typeof value !== "string" || !/^0?[0-7]{3}$/.test(value)) return wrong('an octal file mode such as "0660"');
      return parseInt(value, 8);
    case "batching":
      return checkBatching(label, value);
    case "threadsByModel":
      return checkThreadsByModel(label, value);
  }
}

const MAX_THREADS = 256;

/** `{ "<model name>": <intra-op threads, 0-256> }`. */
function checkThreadsByModel(label: string, value: unknown): Record<string, number> | { problem: string } {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return { problem: `${label} must be an object of model names to thread counts, got ${JSON.stringify(value)}` };
  }
  const result: Record<string, number> = {};
  for (const [model, raw] of Object.entries(value)) {
    if (!MODEL_NAME_PATTERN.test(model)) {
      return { problem: `${label}, model "${model}": not a model name (letters, digits and inner hyphens)` };
    }
    const threads = typeof raw === "string" && /^\d{1,4}$/.test(raw) ? Number(raw) : raw;
    if (typeof threads !== "number" || !Number.isInteger(threads) || threads < 0 || threads > MAX_THREADS) {
      return {
        problem:
          `${label}, model "${model}": must be a whole number of threads from 0 (one per core) to ${MAX_THREADS}, got ${
            JSON.stringify(raw)
          }`,
      };
    }
    result[model] = threads;
  }
  return result;
}

/** What LoadModel accepts as a model name: the pattern, and at most MAX_MODEL_NAME characters. */
export const MODEL_NAME_PATTERN = /^[a-zA-Z0-9](-*[a-zA-Z0-9])*$/;
export const MAX_MODEL_NAME = 255;

export function isModelName(name: string): boolean {
  return name.length <= MAX_MODEL_NAME && MODEL_NAME_PATTERN.test(name);
}

export const BATCHING_DEFAULTS: BatchingSettings = { maxBatchSize: 8, maxDelayMs: 2, maxQueue: 64 };

const BATCHING_FIELDS: Record<string, { field: keyof BatchingSettings; min: number; max: number; whole: boolean }> = {
  max_batch_size: { field: "maxBatchSize", min: 2, max: 4096, whole: true },
  max_delay_ms: { field: "maxDelayMs", min: 0, max: 100, whole: false },
  max_queue: { field: "maxQueue", min: 1, max: 100_000, whole: true },
};

/** `{ "<model name>" | "*": false | { max_batch_size?, max_delay_ms?, max_queue? } }`. */
function checkBatching(label: string, value: unknown): Record<string, BatchingSettings | false> | { problem: string } {
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  if (!isObject(value)) {
    return {
      problem: `${label} must be an object of model names (or "*") to batching settings, got ${JSON.stringify(value)}`,
    };
  }
  const result: Record<string, BatchingSettings | false> = {};
  for (const [model, settings] of Object.entries(value)) {
    const where = `${label}, model "${model}"`;
    if (model !== "*" && !MODEL_NAME_PATTERN.test(model)) {
      return { problem: `${where}: not a model name (letters, digits and inner hyphens) nor "*"` };
    }
    if (settings === false) {
      result[model] = false;
      continue;
    }
    if (!isObject(settings)) {
      return { problem: `${where} must be false or an object such as {"max_batch_size": 8, "max_delay_ms": 2}` };
    }
    const checked = { ...BATCHING_DEFAULTS };
    for (const [key, raw] of Object.entries(settings)) {
      const spec = BATCHING_FIELDS[key];
      if (!spec) {
        return { problem: `${where}: unknown key "${key}" (known: ${Object.keys(BATCHING_FIELDS).join(", ")})` };
      }
      const number = typeof raw === "string" && /^\d{1,9}(\.\d+)?$/.test(raw) ? Number(raw) : raw;
      if (
        typeof number !== "number" || !Number.isFinite(number) || (spec.whole && !Number.isInteger(number)) ||
        number < spec.min || number > spec.max
      ) {
        return {
          problem: `${where}: "${key}" must be ${
            spec.whole ? "a whole number" : "a number"
          } from ${spec.min} to ${spec.max}, got ${JSON.stringify(raw)}`,
        };
      }
      checked[spec.field] = number;
    }
    result[model] = checked;
  }
  return result;
}

/** A model's batching settings, or null when its Predicts run one by one (the default). */
export function batchingFor(config: AgentConfig, model: string): BatchingSettings | null {
  // Own keys only: a model named "constructor" must not find Object.prototype's.
  const own = (key: string) => Object.hasOwn(config.batching, key) ? config.batching[key] : undefined;
  return (own(model) ?? own("*")) || null;
}
