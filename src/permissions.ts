// Deployment profiles and the Deno permissions they grant: the agent may read, write and reach
// exactly what its deployment names, and checks at start-up that its config asks for nothing more.
// --allow-ffi stays unscoped: a path-scoped one disables Deno's pointer APIs (denoland/deno#15511)
// and resolves a bare "libc.so.6" against the working directory; native code is outside Deno's
// sandbox anyway, which is why the FFI surface (ffi/) is kept small.

import { isAbsolute } from "node:path";
import { type AgentConfig, captureDiskPath, deploymentS3, deploymentSource, iotCredentials, s3Host } from "./config.ts";
import { AWS_CREDENTIAL_VARIABLES, iotCredentialsHost } from "./capture/credentials.ts";
import { StartupError } from "./errors.ts";
import { parseMetricsAddress } from "./service/metrics.ts";
import { ORT_TELEMETRY_SWITCH } from "./inference/runtime.ts";

/** What a deployment names; every permission flag derives from it. */
export interface Profile {
  /** The Unix socket the agent serves on. */
  socket: string;
  /** The config file, or null for built-in defaults. */
  config: string | null;
  model_roots: string[];
  state_dir: string;
  /** sagemaker_edge_core_root_certs_path, when models are verified against certificates. */
  trusted_roots: string | null;
  /** edge_agent_trusted_model_keys, when models are verified against public keys. */
  trusted_keys: string | null;
  /** sagemaker_edge_core_capture_data_disk_path, when it lies outside the state folder. */
  capture_dir: string | null;
  /** edge_agent_metrics: "unix:<path>" or "<loopback host>:<port>". */
  metrics: string | null;
  /** S3 endpoint hosts ("host" or "host:port") capture uploads and deployments may reach. */
  s3_hosts: string[];
  /** Environment variables the agent may read (AWS credentials). */
  env: string[];
  /** The AWS IoT credentials endpoint ("host:port") S3 credentials are fetched from. */
  credential_hosts: string[];
  /** The device certificate, its key and the endpoint's CA file (read only). */
  credential_files: string[];
  /** Folders deployments are read from (edge_agent_deployment_source naming a folder). */
  deployment_dirs: string[];
  /** System information the agent may read: "statfs" (free space before a deployment's download). */
  sys: string[];
}

const PROFILE_KEYS: Record<keyof Profile, "path" | "path?" | "paths" | "paths?" | "hosts" | "names" | "metrics?"> = {
  socket: "path",
  config: "path?",
  model_roots: "paths",
  state_dir: "path",
  trusted_roots: "path?",
  trusted_keys: "path?",
  capture_dir: "path?",
  metrics: "metrics?",
  s3_hosts: "hosts",
  env: "names",
  credential_hosts: "hosts",
  credential_files: "paths?",
  deployment_dirs: "paths?",
  sys: "names",
};

function isInside(path: string, folder: string): boolean {
  const f = folder.replace(/\/+$/, "");
  return path === f || path.startsWith(f + "/");
}

/** Validates a parsed profile, listing every problem with its key. */
export function parseProfile(raw: unknown, source = "profile"): Profile {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new StartupError([`${source}: must be a JSON object`]);
  }
  const problems: string[] = [];
  const record = raw as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!(key in PROFILE_KEYS)) problems.push(`${source}: unknown key "${key}"`);
  }
  // Commas separate entries inside one permission flag, so no name may hold one.
  const path = (v: unknown) => typeof v === "string" && isAbsolute(v) && !v.includes(",");
  for (const [key, kind] of Object.entries(PROFILE_KEYS)) {
    const value = record[key];
    const ok = {
      "path": () => path(value),
      "path?": () => value === undefined || value === null || path(value),
      "paths": () => Array.isArray(value) && value.every(path),
      "paths?": () => value === undefined || (Array.isArray(value) && value.every(path)),
      "hosts": () =>
        value === undefined ||
        (Array.isArray(value) && value.every((h) => typeof h === "string" && /^[A-Za-z0-9.-]+(:\d{1,5})?$/.test(h))),
      "names": () =>
        value === undefined || (Array.isArray(value) && value.every((n) => typeof n === "string" && /^\w+$/.test(n))),
      "metrics?": () =>
        value === undefined || value === null || (typeof value === "string" && parseMetricsAddress(value) !== null),
    }[kind]();
    if (!ok) {
      const expected = {
        "path": "an absolute path (without commas)",
        "path?": "an absolute path or null",
        "paths": "a list of absolute paths",
        "paths?": "a list of absolute paths",
        "hosts": 'a list of host names, optionally with ":port"',
        "names": "a list of environment variable names",
        "metrics?": 'null, "unix:<path>" or "<loopback host>:<port>"',
      }[kind];
      problems.push(`${source}: "${key}" must be ${expected}, got ${JSON.stringify(value)}`);
    }
  }
  if (problems.length > 0) throw new StartupError(problems);
  return {
    socket: record.socket as string,
    config: (record.config as string | null | undefined) ?? null,
    model_roots: record.model_roots as string[],
    state_dir: record.state_dir as string,
    trusted_roots: (record.trusted_roots as string | null | undefined) ?? null,
    trusted_keys: (record.trusted_keys as string | null | undefined) ?? null,
    capture_dir: (record.capture_dir as string | null | undefined) ?? null,
    metrics: (record.metrics as string | null | undefined) ?? null,
    s3_hosts: (record.s3_hosts as string[] | undefined) ?? [],
    env: (record.env as string[] | undefined) ?? [],
    credential_hosts: (record.credential_hosts as string[] | undefined) ?? [],
    credential_files: (record.credential_files as string[] | undefined) ?? [],
    deployment_dirs: (record.deployment_dirs as string[] | undefined) ?? [],
    sys: (record.sys as string[] | undefined) ?? [],
  };
}

/** The `deno run` / `deno compile` permission flags of a profile, and V8's. No bare --allow-* but FFI. */
export function profileFlags(profile: Profile): string[] {
  const readable = [
    profile.socket,
    ...(profile.config ? [profile.config] : []),
    ...profile.model_roots,
    profile.state_dir,
    ...(profile.trusted_roots ? [profile.trusted_roots] : []),
    ...(profile.trusted_keys ? [profile.trusted_keys] : []),
    ...(profile.capture_dir ? [profile.capture_dir] : []),
    ...profile.credential_files,
    ...profile.deployment_dirs,
  ];
  const writable = [profile.socket, profile.state_dir, ...(profile.capture_dir ? [profile.capture_dir] : [])];
  const reachable = [`unix:${profile.socket}`, ...profile.s3_hosts, ...profile.credential_hosts];
  const metrics = profile.metrics ? parseMetricsAddress(profile.metrics) : null;
  if (metrics && "path" in metrics) {
    readable.push(metrics.path);
    writable.push(metrics.path);
    reachable.push(`unix:${metrics.path}`);
  } else if (metrics) {
    reachable.push(`${metrics.hostname}:${metrics.port}`);
  }
  return [
    "--no-prompt",
    `--allow-read=${readable.join(",")}`,
    `--allow-write=${writable.join(",")}`,
    `--allow-net=${reachable.join(",")}`,
    // The agent sets ONNX Runtime's telemetry switch itself before loading the library (src/inference/runtime.ts).
    `--allow-env=${[ORT_TELEMETRY_SWITCH, ...profile.env].join(",")}`,
    ...(profile.sys.length > 0 ? [`--allow-sys=${profile.sys.join(",")}`] : []),
    "--allow-ffi",
    ...AGENT_V8_FLAGS,
  ];
}

/**
 * V8 flags every agent runs with, compiled in with the permissions (README "Memory and start-up"):
 * gc() collects at once what a model load left behind (agent.ts), so loaded RSS is what models hold.
 */
export const AGENT_V8_FLAGS = ["--v8-flags=--expose-gc"];

/** The profile a config needs when served on `socketPath`. */
export function profileFor(socketPath: string, configPath: string | null, config: AgentConfig): Profile {
  const s3 = s3Host(config);
  const deployments = deploymentSource(config);
  const deploymentHost = deploymentS3(config)?.host ?? null;
  const hosts = [...new Set([s3, deploymentHost].filter((h): h is string => h !== null))];
  const aws = hosts.length > 0;
  return {
    socket: socketPath,
    config: configPath,
    model_roots: config.modelRoots,
    state_dir: config.stateDir,
    trusted_roots: config.rootCertsPath,
    trusted_keys: config.trustedModelKeys,
    capture_dir: isInside(captureDiskPath(config), config.stateDir) ? null : captureDiskPath(config),
    metrics: config.metrics,
    s3_hosts: hosts,
    // With the AWS IoT credentials provider the environment is not a source (README: Credentials).
    env: aws && !iotCredentials(config) ? [...AWS_CREDENTIAL_VARIABLES] : [],
    credential_hosts: aws && iotCredentials(config) ? [credentialsHost(config)] : [],
    credential_files: aws && iotCredentials(config) ? credentialFiles(config) : [],
    deployment_dirs: deployments && "folder" in deployments ? [deployments.folder] : [],
    sys: deployments ? ["statfs"] : [],
  };
}

function credentialsHost(config: AgentConfig): string {
  return iotCredentialsHost(config.iotCredentialsEndpoint!, config.deviceFleetName || "unnamed-fleet");
}

function credentialFiles(config: AgentConfig): string[] {
  return [config.iotCertFile, config.iotKeyFile, config.iotCaFile].filter((f): f is string => !!f);
}

export interface Deployment {
  socketPath: string;
  configPath: string | null;
  config: AgentConfig;
}

/** `deno run` flags for an agent serving `deployment`, exactly what it needs. */
export function agentPermissionFlags(deployment: Deployment): string[] {
  return profileFlags(profileFor(deployment.socketPath, deployment.configPath, deployment.config));
}

async function granted(descriptor: Deno.PermissionDescriptor): Promise<boolean> {
  return (await Deno.permissions.query(descriptor)).state === "granted";
}

/**
 * Compares what the config and command line name with the permissions this process holds: one
 * message per mismatch, so the operator knows what to add to the deployment profile.
 */
export async function permissionProblems(socketPath: string, config: AgentConfig): Promise<string[]> {
  const problems: string[] = [];
  const rebuild = (what: string) => `; rebuild with a profile that includes it in ${what}`;
  for (const root of config.modelRoots) {
    if (!await granted({ name: "read", path: root })) {
      problems.push(`config names model root ${root}, but this agent may not read it${rebuild("model_roots")}`);
    }
  }
  for (const name of ["read", "write"] as const) {
    if (!await granted({ name, path: config.stateDir })) {
      problems.push(
        `config names state folder ${config.stateDir}, but this agent may not ${name} it${rebuild("state_dir")}`,
      );
    }
    if (!await granted({ name, path: socketPath })) {
      problems.push(`socket ${socketPath}: this agent may not ${name} it${rebuild("socket")}`);
    }
  }
  if (!await granted({ name: "net", host: `unix:${socketPath}` })) {
    problems.push(`socket ${socketPath}: this agent may not listen on it${rebuild("socket")}`);
  }
  const captures = captureDiskPath(config);
  if (!await granted({ name: "write", path: captures })) {
    problems.push(`config names capture folder ${captures}, but this agent may not write it${rebuild("capture_dir")}`);
  }
  const metrics = config.metrics ? parseMetricsAddress(config.metrics) : null;
  const metricsHost = metrics && ("path" in metrics ? `unix:${metrics.path}` : `${metrics.hostname}:${metrics.port}`);
  if (metricsHost && !await granted({ name: "net", host: metricsHost })) {
    problems.push(
      `config serves metrics on ${config.metrics}, but this agent may not listen there${rebuild("metrics")}`,
    );
  }
  const s3 = s3Host(config);
  if (s3 && !await granted({ name: "net", host: s3 })) {
    problems.push(`config uploads captures to ${s3}, but this agent may not reach it${rebuild("s3_hosts")}`);
  }
  const deployments = deploymentSource(config);
  const deploymentHost = deploymentS3(config)?.host;
  if (deploymentHost && !await granted({ name: "net", host: deploymentHost })) {
    problems.push(
      `config pulls deployments from ${deploymentHost}, but this agent may not reach it${rebuild("s3_hosts")}`,
    );
  }
  if (deployments && "folder" in deployments && !await granted({ name: "read", path: deployments.folder })) {
    problems.push(
      `config pulls deployments from folder ${deployments.folder}, but this agent may not read it${
        rebuild("deployment_dirs")
      }`,
    );
  }
  if (deployments && !await granted({ name: "sys", kind: "statfs" })) {
    problems.push(`config enables deployments, but this agent may not check free space${rebuild('sys ["statfs"]')}`);
  }
  if ((s3 || deploymentHost) && iotCredentials(config)) {
    const host = credentialsHost(config);
    if (!await granted({ name: "net", host })) {
      problems.push(
        `config fetches S3 credentials from ${host}, but this agent may not reach it${rebuild("credential_hosts")}`,
      );
    }
    for (const file of credentialFiles(config)) {
      if (!await granted({ name: "read", path: file })) {
        problems.push(
          `config names credentials file ${file}, but this agent may not read it${rebuild("credential_files")}`,
        );
      }
    }
  }
  if (config.trustedModelKeys && !await granted({ name: "read", path: config.trustedModelKeys })) {
    problems.push(
      `config names trusted model keys ${config.trustedModelKeys}, but this agent may not read them${
        rebuild("trusted_keys")
      }`,
    );
  }
  if (config.rootCertsPath && !await granted({ name: "read", path: config.rootCertsPath })) {
    problems.push(
      `config names trusted roots ${config.rootCertsPath}, but this agent may not read them${rebuild("trusted_roots")}`,
    );
  }
  return problems;
}
