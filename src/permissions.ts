// The Deno permission flags an agent deployment needs, derived from what it names: socket,
// config file and model roots. Nothing else is readable, writable or reachable.
// --allow-ffi stays unscoped: a path-scoped one disables Deno's pointer APIs (denoland/deno#15511),
// and native code is outside Deno's sandbox anyway.

import type { AgentConfig } from "./config.ts";

/** Environment variables grpc-js reads when it loads. */
export const GRPC_ENV_VARS = [
  "GRPC_TRACE",
  "GRPC_VERBOSITY",
  "GRPC_NODE_TRACE",
  "GRPC_NODE_VERBOSITY",
  "GRPC_NODE_USE_ALTERNATIVE_RESOLVER",
  "GRPC_EXPERIMENTAL_ENABLE_OUTLIER_DETECTION",
  "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
  "GRPC_SSL_CIPHER_SUITES",
  "GRPC_NODE_DEBUG_SEND_ERROR_DETAILS",
];

export interface Deployment {
  socketPath: string;
  configPath: string | null;
  config: AgentConfig;
}

/** `deno run` flags for an agent serving `deployment`. */
export function agentPermissionFlags(deployment: Deployment): string[] {
  const { socketPath, configPath, config } = deployment;
  const readable = [socketPath, ...(configPath ? [configPath] : []), ...config.modelRoots];
  return [
    "--no-prompt",
    `--allow-read=${readable.join(",")}`,
    `--allow-write=${socketPath}`,
    `--allow-net=unix:${socketPath}`,
    `--allow-env=${GRPC_ENV_VARS.join(",")}`,
    "--allow-ffi",
  ];
}
