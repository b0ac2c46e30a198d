// Where ONNX Runtime's library comes from, and the session options the config asks for.

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { GraphOptimizationLevel, OnnxRuntime, SessionOptions } from "../ffi/onnxruntime.ts";
import type { AgentConfig } from "./config.ts";
import { StartupError } from "./errors.ts";

const NPM_ARCH: Record<string, string> = { x86_64: "x64", aarch64: "arm64" };
export const ORT_LIBRARY_FILE = "libonnxruntime.so.1";

/** The copy shipped in the onnxruntime-node npm package, for this machine's architecture. */
export function npmLibraryPath(arch: string = Deno.build.arch): string {
  const projectRoot = dirname(dirname(fileURLToPath(import.meta.url)));
  return join(
    projectRoot,
    "node_modules",
    "onnxruntime-node",
    "bin",
    "napi-v6",
    "linux",
    NPM_ARCH[arch] ?? arch,
    ORT_LIBRARY_FILE,
  );
}

/** Candidate library paths, most specific first. */
export function libraryCandidates(config: AgentConfig): string[] {
  if (config.onnxRuntimeLibrary) return [config.onnxRuntimeLibrary];
  return [join(dirname(Deno.execPath()), "lib", ORT_LIBRARY_FILE), npmLibraryPath()];
}

/**
 * Opens the first candidate that loads. dlopen itself answers whether a path exists, so no read
 * permission is needed on library folders.
 */
export function openRuntime(config: AgentConfig): OnnxRuntime {
  const failures: string[] = [];
  for (const path of libraryCandidates(config)) {
    try {
      return OnnxRuntime.open(path, { verbose: config.logVerbose });
    } catch (error) {
      failures.push(`${path}: ${(error as Error).message}`);
    }
  }
  throw new StartupError([
    `ONNX Runtime library could not be loaded (set edge_agent_onnxruntime_library to a ${ORT_LIBRARY_FILE} for ${Deno.build.arch}):`,
    ...failures.map((f) => `  ${f}`),
  ]);
}

/** Session options from the config. The caller releases them. */
export function sessionOptions(ort: OnnxRuntime, config: AgentConfig): SessionOptions {
  const options = new SessionOptions(ort);
  try {
    options
      .setIntraOpThreads(config.intraOpThreads)
      .setInterOpThreads(config.interOpThreads)
      .setGraphOptimizationLevel(GraphOptimizationLevel[config.graphOptimization])
      .setCpuMemArena(config.cpuMemArena)
      .addConfigEntry("session.intra_op.allow_spinning", config.allowSpinning ? "1" : "0")
      .addConfigEntry("session.inter_op.allow_spinning", config.allowSpinning ? "1" : "0");
    return options;
  } catch (error) {
    options.release();
    throw error;
  }
}
