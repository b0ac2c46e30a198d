// The agent as the benchmark runs it: the real main.ts in a deno subprocess with the permission flags a
// deployment gets, its stderr log lines parsed as they arrive, and its CPU time and memory from /proc.

import { join } from "node:path";
import { GrpcJsAgentClient as AgentClient } from "../tests/helpers/grpcjs_client.ts";
import { AgentClient as EdgeAgentClient } from "../src/client/client.ts";
import { agentDeployment } from "../tests/helpers/agent.ts";
import { testTrust } from "../tests/helpers/signing.ts";

/** USER_HZ: the unit of utime and stime in /proc/<pid>/stat on Linux. */
const CLOCK_TICKS_PER_SECOND = 100;
const START_TIMEOUT_MS = 60_000;
const LOG_TIMEOUT_MS = 10_000;
const TAIL_LINES = 40;

/** The timing fields of one Predict debug line (see src/service/server.ts). */
export interface PredictLog {
  ms: number;
  bindMs: number;
  runMs: number;
  encodeMs: number;
  copiedInputs: number;
  /** Inputs the agent mapped from shared memory (0 in logs of agents without it). */
  sharedMemoryInputs: number;
}

export interface Memory {
  rssMiB: number;
  /** Peak RSS so far. */
  hwmMiB: number;
}

/** Deno reads /proc only with --allow-all, so cat reads it. */
export function readProc(path: string): string {
  const { success, stdout, stderr } = new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "piped" })
    .outputSync();
  if (!success) throw new Error(`cat ${path}: ${new TextDecoder().decode(stderr)}`);
  return new TextDecoder().decode(stdout);
}

/** utime + stime in ms from a /proc stat file (of a process or of one of its threads). */
function cpuMsOf(path: string): number {
  const stat = readProc(path);
  // Fields after the parenthesised command name, which may itself hold spaces; utime and stime are 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS_PER_SECOND;
}

export class AgentProcess {
  readonly client: AgentClient;
  /** The product's own client (what `edge-agent client` uses). */
  readonly ownClient: EdgeAgentClient;
  readonly socket: string;
  readonly #process: Deno.ChildProcess;
  readonly #predicts: PredictLog[] = [];
  #taken = 0;
  readonly #tail: string[] = [];
  /** Resolved and replaced whenever stderr brings lines or ends. */
  #changed = Promise.withResolvers<void>();
  #ended = false;
  readonly #drained: Promise<void>;
  readonly #spawnedAt: number;
  #servingAt = NaN;
  #startupMarks: Record<string, number> | null = null;

  private constructor(process: Deno.ChildProcess, spawnedAt: number, socket: string) {
    this.#process = process;
    this.#spawnedAt = spawnedAt;
    this.#drained = this.#read(process.stderr);
    this.socket = socket;
    this.client = new AgentClient(socket);
    this.ownClient = new EdgeAgentClient(socket);
  }

  /**
   * Starts an agent on `<dir>/agent.sock` with verbose logs (for the per-Predict timing lines), model
   * roots `[modelsDir]` and the extra config keys; resolves once it logs "serving".
   */
  static async start(dir: string, modelsDir: string, keys: Record<string, unknown> = {}): Promise<AgentProcess> {
    const raw = {
      edge_agent_model_roots: [modelsDir],
      sagemaker_edge_log_verbose: true,
      // The benchmark's packages are signed by the tests' development trust.
      sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
      // Its own state folder: agents of other runs on the machine hold the default one's lock.
      edge_agent_state_dir: join(dir, "state"),
      ...keys,
    };
    const { socket, args } = await agentDeployment(dir, raw);
    // For profiling: extra deno flags, e.g. BENCH_AGENT_FLAGS="--cpu-prof --cpu-prof-dir=/tmp/prof" (or V8's
    // --v8-flags=--trace-gc, whose lines go to stdout, kept then).
    const extra = Deno.env.get("BENCH_AGENT_FLAGS");
    if (extra) args.splice(1, 0, ...extra.split(" "));
    const command = new Deno.Command(Deno.execPath(), {
      args,
      stdin: "null",
      stdout: extra ? "inherit" : "null",
      stderr: "piped",
    });
    const spawnedAt = performance.now();
    const agent = new AgentProcess(command.spawn(), spawnedAt, socket);
    try {
      await agent.#until(() => !Number.isNaN(agent.#servingAt), START_TIMEOUT_MS, () => "agent did not start serving");
    } catch (error) {
      await agent.stop();
      throw error;
    }
    return agent;
  }

  /** Milliseconds from spawn to the "serving" log line (socket listening). */
  get readyMs(): number {
    return this.#servingAt - this.#spawnedAt;
  }

  /**
   * The agent's own start-up marks (ms since its process began, by phase; src/agent.ts), from its
   * verbose log; null when it does not log them.
   */
  get startupMarks(): Record<string, number> | null {
    return this.#startupMarks;
  }

  get pid(): number {
    return this.#process.pid;
  }

  /** Resolves with the agent's exit status once it has exited (after stop(), or on its own). */
  get exited(): Promise<Deno.CommandStatus> {
    return this.#process.status;
  }

  /** Last stderr lines, for error messages. */
  logTail(): string {
    return this.#tail.join("\n");
  }

  /** utime + stime of the whole process (all threads, live and exited), in ms. */
  cpuMs(): number {
    return cpuMsOf(`/proc/${this.pid}/stat`);
  }

  /** utime + stime of the agent's main (JavaScript) thread alone, in ms. */
  mainThreadCpuMs(): number {
    return cpuMsOf(`/proc/${this.pid}/task/${this.pid}/stat`);
  }

  memory(): Memory {
    const status = readProc(`/proc/${this.pid}/status`);
    const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
    return { rssMiB: kib("VmRSS") / 1024, hwmMiB: kib("VmHWM") / 1024 };
  }

  /** The next `count` Predict log lines not taken yet, waiting for them to arrive. */
  async takePredicts(count: number): Promise<PredictLog[]> {
    const wanted = this.#taken + count;
    await this.#until(
      () => this.#predicts.length >= wanted,
      LOG_TIMEOUT_MS,
      () => `agent logged ${this.#predicts.length - this.#taken} of ${count} Predict lines expected`,
    );
    const lines = this.#predicts.slice(this.#taken, wanted);
    this.#taken = wanted;
    return lines;
  }

  async stop(): Promise<void> {
    this.client.close();
    this.ownClient.close();
    try {
      this.#process.kill("SIGTERM");
    } catch { /* already exited */ }
    await this.#process.status;
    await this.#drained;
  }

  /** Waits until `condition` holds; throws `failure()` with the log tail if stderr ends or time runs out. */
  async #until(condition: () => boolean, timeoutMs: number, failure: () => string): Promise<void> {
    const deadline = Promise.withResolvers<boolean>();
    const timer = setTimeout(() => deadline.resolve(true), timeoutMs);
    try {
      while (!condition()) {
        const expired = this.#ended ||
          await Promise.race([this.#changed.promise.then(() => false), deadline.promise]);
        if (expired && !condition()) {
          throw new Error(`${failure()} (${this.#ended ? "it exited" : `${timeoutMs} ms`}):\n${this.logTail()}`);
        }
      }
    } finally {
      clearTimeout(timer);
    }
  }

  async #read(stream: ReadableStream<Uint8Array>): Promise<void> {
    let partial = "";
    try {
      for await (const text of stream.pipeThrough(new TextDecoderStream())) {
        const lines = (partial + text).split("\n");
        partial = lines.pop()!;
        for (const line of lines) this.#line(line);
        this.#signal();
      }
    } finally {
      this.#ended = true;
      this.#signal();
    }
  }

  #signal(): void {
    const changed = this.#changed;
    this.#changed = Promise.withResolvers();
    changed.resolve();
  }

  #line(line: string): void {
    this.#tail.push(line);
    if (this.#tail.length > TAIL_LINES) this.#tail.shift();
    let entry: Record<string, unknown>;
    try {
      entry = JSON.parse(line);
    } catch {
      return; // not one of the agent's log lines (native libraries may write to stderr too)
    }
    if (entry.msg === "serving") this.#servingAt = performance.now();
    if (entry.msg === "start-up") this.#startupMarks = entry.msSinceProcessStart as Record<string, number>;
    if (entry.msg === "rpc" && entry.rpc === "Predict" && entry.code === "OK") {
      const { ms, bindMs, runMs, encodeMs, copiedInputs, sharedMemoryInputs = 0 } = entry as unknown as PredictLog;
      this.#predicts.push({ ms, bindMs, runMs, encodeMs, copiedInputs, sharedMemoryInputs });
    }
  }
}
