// Where ONNX Runtime's library comes from, and the session options the config asks for.

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { type GlobalThreadPools, GraphOptimizationLevel, OnnxRuntime, SessionOptions } from "../../ffi/onnxruntime.ts";
import type { AgentConfig } from "../config.ts";
import { StartupError } from "../errors.ts";
import { digestFile, type FileDigest } from "../file_digest.ts";

const NPM_ARCH: Record<string, string> = { x86_64: "x64", aarch64: "arm64" };
export const ORT_LIBRARY_FILE = "libonnxruntime.so.1";

/** The copy shipped in the onnxruntime-node npm package, for this machine's architecture. */
export function npmLibraryPath(arch: string = Deno.build.arch): string {
  const projectRoot = fileURLToPath(new URL("../../", import.meta.url));
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

/** The library the compiled executable embeds, as build.ts found it; null when not declared. */
let embeddedLibrary: FileDigest | null = null;

/** Declared by the compiled executable's entry (build.ts), before the agent starts. */
export function declareEmbeddedLibrary(digest: FileDigest): void {
  embeddedLibrary = digest;
}

/**
 * The compiled agent embeds the library (build.ts --include). Deno could dlopen it in place, but it
 * then copies the file to $TMPDIR/deno-native-addons/ on every start, never removes it, and fails
 * on a read-only $TMPDIR. So it is written once into the state folder under a name holding its
 * SHA-256, and later starts reuse that copy.
 *
 * Neither file is hashed at a later start (44 MB each: ~85 ms on a PC, far more on a small ARM
 * device). The embedded file's digest is baked into the entry by build.ts. The copy is trusted from
 * how it came to be: a file only gets the copy's name by a rename, after its bytes were hashed
 * against that digest as they were written and synced to disk, so an interrupted write or a power
 * loss leaves no copy, or one the stamp does not describe. The stamp, written after the rename,
 * records the copy's inode, size and change times; a later write into it, a truncation or a
 * replacement changes one of them, and the copy is then written afresh. What the stamp cannot see is
 * a rewrite crafted to keep the inode, size and both times, which only a process of the agent's own
 * user (no one else may write the state folder) or root could make: such a process could as well
 * alter the running agent, which hashing at each start would not stop. An entry without the digest
 * (not written by build.ts) hashes the embedded file first.
 */
export async function extractLibrary(
  embedded: string,
  stateDir: string,
  expected: FileDigest | null = embeddedLibrary,
): Promise<string> {
  expected ??= await digestFile(embedded);
  const folder = join(stateDir, "lib");
  const target = join(folder, `libonnxruntime-${expected.sha256.slice(0, 16)}.so.1`);
  const stamp = `${target}.verified`;
  if (await isVerifiedCopy(target, stamp, expected)) return target;
  await Deno.mkdir(folder, { recursive: true, mode: 0o755 });
  // A name of its own per start: concurrent starts each write and rename a whole verified copy.
  const partial = uniqueSibling(target);
  try {
    await copyVerified(embedded, partial, expected);
    await Deno.rename(partial, target);
  } catch (error) {
    await Deno.remove(partial).catch(() => {});
    throw error;
  }
  await writeStamp(target, stamp, expected);
  await removeStaleCopies(folder, [target, stamp]).catch(() => {});
  return target;
}

/** A partial copy this old belongs to no start still writing it. */
const STALE_PARTIAL_MS = 10 * 60_000;

/**
 * After a fresh copy: earlier versions' copies (44 MB each, one per upgrade) and what interrupted
 * starts left. Unlinking a library a running process has mapped leaves its mapping intact.
 */
async function removeStaleCopies(folder: string, keep: string[]): Promise<void> {
  for await (const entry of Deno.readDir(folder)) {
    const path = join(folder, entry.name);
    if (!entry.name.startsWith("libonnxruntime-") || keep.includes(path)) continue;
    if (entry.name.endsWith(".partial")) {
      const mtime = (await Deno.stat(path).catch(() => null))?.mtime?.getTime() ?? Date.now();
      if (Date.now() - mtime < STALE_PARTIAL_MS) continue;
    }
    await Deno.remove(path).catch(() => {});
  }
}

/** Records the verified copy's identity. Without a stamp, the next start writes the copy again. */
async function writeStamp(target: string, stamp: string, verified: FileDigest): Promise<void> {
  const partial = uniqueSibling(stamp);
  try {
    await Deno.writeTextFile(partial, JSON.stringify({ ...verified, ...identity(await Deno.stat(target)) }));
    await Deno.rename(partial, stamp);
  } catch {
    await Deno.remove(partial).catch(() => {});
  }
}

function uniqueSibling(path: string): string {
  return `${path}.${Deno.pid}-${crypto.randomUUID().slice(0, 8)}.partial`;
}

/** What changes when a file's bytes are written or it is replaced (Deno's ctime has whole seconds). */
function identity(info: Deno.FileInfo) {
  return { dev: info.dev, ino: info.ino, size: info.size, mtime: info.mtime?.getTime(), ctime: info.ctime?.getTime() };
}

/** Whether the stamp describes the file at `target` exactly as it was verified against `expected`. */
async function isVerifiedCopy(target: string, stamp: string, expected: FileDigest): Promise<boolean> {
  const [info, recorded] = await Promise.all([
    Deno.stat(target).catch(() => null),
    Deno.readTextFile(stamp).then(JSON.parse).catch(() => null),
  ]);
  if (!info?.isFile || info.size !== expected.size || recorded === null) return false;
  const wanted: Record<string, unknown> = { ...expected, ...identity(info) };
  return Object.keys(wanted).every((key) => recorded[key] === wanted[key]);
}

/** Copies `from` to a new file `to`, hashing the bytes on the way; refuses them unless they are `expected`. */
async function copyVerified(from: string, to: string, expected: FileDigest): Promise<void> {
  const destination = await Deno.open(to, { write: true, createNew: true, mode: 0o644 });
  try {
    const written = await digestFile(from, async (chunk) => {
      for (let done = 0; done < chunk.length;) done += await destination.write(chunk.subarray(done));
    });
    if (written.sha256 !== expected.sha256 || written.size !== expected.size) {
      throw new Error(
        `${from} is not the library built in (${written.size} bytes, sha256 ${written.sha256}; ` +
          `expected ${expected.size} bytes, sha256 ${expected.sha256})`,
      );
    }
    // On disk before the rename gives it the copy's name: after a power loss, no unwritten copy.
    await destination.sync();
  } finally {
    destination.close();
  }
}

/**
 * ONNX Runtime's Linux builds start Microsoft's telemetry when the environment is created unless
 * this variable is "1": a device id and an event queue written under ~/.cache (or XDG_CACHE_HOME)
 * and uploads to a Microsoft host. Native code is outside Deno's sandbox, so the agent switches
 * it off itself: it reads, writes and reaches only what its deployment names.
 */
export const ORT_TELEMETRY_SWITCH = "ORT_DISABLE_TELEMETRY";

function disableTelemetry(): void {
  try {
    Deno.env.set(ORT_TELEMETRY_SWITCH, "1");
  } catch (error) {
    throw new StartupError([
      `ONNX Runtime's telemetry could not be switched off (${
        (error as Error).message
      }): run the agent with --allow-env=${ORT_TELEMETRY_SWITCH}`,
    ]);
  }
}

/**
 * Opens the first candidate that loads. dlopen itself answers whether a path exists, so no read
 * permission is needed on library folders.
 */
export async function openRuntime(config: AgentConfig): Promise<OnnxRuntime> {
  disableTelemetry();
  const failures: string[] = [];
  const candidates = libraryCandidates(config);
  if (Deno.build.standalone && !config.onnxRuntimeLibrary) {
    try {
      candidates.splice(1, 1, await extractLibrary(npmLibraryPath(), config.stateDir));
    } catch (error) {
      failures.push(`embedded library not extracted into ${config.stateDir}: ${(error as Error).message}`);
    }
  }
  for (const path of candidates) {
    try {
      return OnnxRuntime.open(path, { verbose: config.logVerbose, globalThreadPools: globalThreadPools(config) });
    } catch (error) {
      failures.push(`${path}: ${(error as Error).message}`);
    }
  }
  throw new StartupError([
    `ONNX Runtime library could not be loaded (set edge_agent_onnxruntime_library to a ${ORT_LIBRARY_FILE} for ${Deno.build.arch}):`,
    ...failures.map((f) => `  ${f}`),
  ]);
}

/** How the agent uses the cores: ONNX Runtime's threads per Run and how many Runs go at once. */
export interface ThreadPolicy {
  /** Cores this process may run on. */
  cores: number;
  /** Threads one Run uses (edge_agent_intra_op_threads, 0 resolved to one per core). */
  intraOpThreads: number;
  interOpThreads: number;
  /** Runs of one model at once; more wait their turn. */
  concurrentRuns: number;
  /** All models run on one pair of ONNX Runtime pools. */
  sharedThreadPools: boolean;
}

/**
 * By default (edge_agent_max_concurrent_runs 0) as many Runs of a model go at once as the cores hold
 * Runs of `intraOpThreads` threads: more would only time-slice the cores between Runs, and take them
 * from the JavaScript thread that decodes the next requests while Runs go. The limit is per model so
 * that a model's long Runs never hold up another model's calls.
 */
export function threadPolicy(config: AgentConfig, cores: number = navigator.hardwareConcurrency): ThreadPolicy {
  const intraOpThreads = config.intraOpThreads === 0 ? cores : config.intraOpThreads;
  return {
    cores,
    intraOpThreads,
    interOpThreads: config.interOpThreads,
    concurrentRuns: runSlots(config, intraOpThreads, cores),
    sharedThreadPools: config.sharedThreadPools,
  };
}

/** The configured run limit, or as many Runs as the cores hold at `threadsPerRun` threads each. */
function runSlots(config: AgentConfig, threadsPerRun: number, cores: number): number {
  return config.maxConcurrentRuns || Math.max(1, Math.floor(cores / threadsPerRun));
}

/** Intra-op threads of a model named in edge_agent_model_intra_op_threads, or null when it takes the policy's. */
function ownThreads(config: AgentConfig, model: string): number | null {
  return Object.hasOwn(config.modelIntraOpThreads, model) ? config.modelIntraOpThreads[model] : null;
}

/** Runs of `model` at once: its intra-op threads decide, as threadPolicy does for every other model. */
export function concurrentRunsFor(
  config: AgentConfig,
  model: string,
  cores: number = navigator.hardwareConcurrency,
): number {
  const own = ownThreads(config, model);
  if (own === null) return threadPolicy(config, cores).concurrentRuns;
  return runSlots(config, own === 0 ? cores : own, cores);
}

/** The environment's pools when models share them (edge_agent_shared_thread_pools). */
function globalThreadPools(config: AgentConfig): GlobalThreadPools | null {
  if (!config.sharedThreadPools) return null;
  const { intraOpThreads, interOpThreads, allowSpinning } = config;
  return { intraOpThreads, interOpThreads, allowSpinning };
}

/** Session options from the config. The caller releases them. */
export function sessionOptions(ort: OnnxRuntime, config: AgentConfig, model = ""): SessionOptions {
  const options = new SessionOptions(ort);
  try {
    const own = ownThreads(config, model);
    // With shared pools the environment's settings apply and the session's thread counts are ignored;
    // a model given threads of its own gets pools of its own.
    if (ort.globalThreadPools && own === null) options.disablePerSessionThreads();
    options
      .setIntraOpThreads(own ?? config.intraOpThreads)
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
