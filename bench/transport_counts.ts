// Counts behind the transport's timings, which a shared machine makes noisy: per det Predict and per
// ListModels from grpcio, the agent's minor page faults, V8 garbage collections (scavenges and
// mark-compacts, from --trace-gc) and, with --syscalls, its read and write system calls (strace -f -c).
//
// deno task bench:counts [--calls=N] [--syscalls]

import { join } from "node:path";
import { parseArgs } from "node:util";
import { agentDeployment } from "../tests/helpers/agent.ts";
import { PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { testTrust } from "../tests/helpers/signing.ts";
import { readProc } from "./agent_process.ts";
import { generateStubs, GrpcioClient, grpcioMissing, lines } from "./grpcio.ts";
import { GrpcJsAgentClient } from "../tests/helpers/grpcjs_client.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, ms } from "./stats.ts";

/** minflt (field 10) and majflt (12) of /proc/<pid>/stat. */
function faults(pid: number): number {
  const stat = readProc(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[7]) + Number(fields[9]);
}

/** An agent whose stdout carries V8's --trace-gc lines, counted as they come. */
class TracedAgent {
  scavenges = 0;
  markCompacts = 0;
  /** Pause time of those collections, ms. */
  gcMs = 0;
  readonly #stdout: Promise<void>;
  readonly #stderr: Promise<string>;

  constructor(readonly process: Deno.ChildProcess, readonly socket: string) {
    this.#stdout = (async () => {
      for await (const line of lines(process.stdout)) {
        if (line.includes("Scavenge") || line.includes("Minor Mark")) this.scavenges++;
        else if (line.includes("Mark-Compact") || line.includes("Mark-sweep")) this.markCompacts++;
        else continue;
        // The pause, and the incremental marking steps before it.
        this.gcMs += Number(/MB, (?:pooled: [\d.]+ MB, )?([\d.]+) \//.exec(line)?.[1] ?? 0) +
          Number(/\+ ([\d.]+) ms in \d+ steps/.exec(line)?.[1] ?? 0);
      }
    })();
    this.#stderr = new Response(process.stderr).text();
  }

  static async start(dir: string, modelsDir: string): Promise<TracedAgent> {
    const { socket, args } = await agentDeployment(dir, {
      edge_agent_model_roots: [modelsDir],
      sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
      edge_agent_state_dir: join(dir, "state"),
    });
    args.splice(1, 0, "--v8-flags=--trace-gc");
    // V8 prints with C stdio, block-buffered into a pipe: stdbuf makes it line-buffered, so lines arrive per call.
    const process = new Deno.Command("stdbuf", {
      args: ["-oL", Deno.execPath(), ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const agent = new TracedAgent(process, socket);
    for (let i = 0; i < 600; i++) {
      try {
        (await Deno.connect({ transport: "unix", path: socket })).close();
        return agent;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    throw new Error(`agent did not start: ${await agent.stop()}`);
  }

  snapshot(): { faults: number; scavenges: number; markCompacts: number; gcMs: number } {
    return {
      faults: faults(this.process.pid),
      scavenges: this.scavenges,
      markCompacts: this.markCompacts,
      gcMs: this.gcMs,
    };
  }

  async stop(): Promise<string> {
    try {
      this.process.kill("SIGTERM");
    } catch { /* gone */ }
    await this.process.status;
    await this.#stdout;
    return await this.#stderr;
  }
}

/** strace -f -c on the agent while `work` runs: calls per syscall name. */
async function syscalls(pid: number, work: () => Promise<void>): Promise<Map<string, number>> {
  const out = join(await Deno.makeTempDir(), "strace.txt");
  const strace = new Deno.Command("strace", {
    args: [
      "-f",
      "-c",
      "-e",
      "trace=read,write,writev,recvfrom,sendto,sendmsg,recvmsg,epoll_wait,futex",
      "-o",
      out,
      "-p",
      String(pid),
    ],
    stdout: "null",
    stderr: "null",
  }).spawn();
  await new Promise((resolve) => setTimeout(resolve, 500));
  await work();
  strace.kill("SIGINT");
  await strace.status;
  const counts = new Map<string, number>();
  for (const line of (await Deno.readTextFile(out)).split("\n")) {
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/.exec(line);
    if (m) counts.set(m[2], Number(m[1]));
  }
  return counts;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { calls: { type: "string", default: "20" }, syscalls: { type: "boolean", default: false } },
  });
  const calls = Number(values.calls);
  const missing = await grpcioMissing();
  if (missing) throw new Error(`grpcio is needed: ${missing}`);
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-counts-" });
  const modelsDir = join(dir, "models");
  const url = await writeModelFolder(modelsDir, "det", await Deno.readFile(PADDLE_DET));
  const agent = await TracedAgent.start(dir, modelsDir);
  let grpcio: GrpcioClient | null = null;
  try {
    const loader = new GrpcJsAgentClient(agent.socket);
    const { model } = await loader.loadModel(url, "det");
    loader.close();
    const input = pseudoRandomInput([1, 3, 640, 640], 2);
    const inputFile = join(dir, "det.input.bin");
    await Deno.writeFile(inputFile, new Uint8Array(input.buffer));
    grpcio = await GrpcioClient.start(await generateStubs(dir), agent.socket);
    const command = {
      name: "det",
      input: inputFile,
      inputName: new TextDecoder().decode(model.input_tensor_metadatas[0].name),
      shape: [1, 3, 640, 640],
    };
    const client = grpcio;
    await client.predict({ ...command, count: 5 });
    await client.listModels(200);
    const measure = async (label: string, work: () => Promise<number[]>, count: number) => {
      const before = agent.snapshot();
      const times = await work();
      // trace-gc lines of the last call may still be on their way.
      await new Promise((resolve) => setTimeout(resolve, 200));
      const after = agent.snapshot();
      const per = (key: keyof typeof before) => ((after[key] - before[key]) / count).toFixed(2);
      console.log(
        `${label}: ${count} calls, p50 ${ms(median(times))} ms; per call: minor faults ${per("faults")}, ` +
          `scavenges ${per("scavenges")}, mark-compacts ${per("markCompacts")}, GC ${per("gcMs")} ms`,
      );
    };
    await measure("det Predict from grpcio", () => client.predict({ ...command, count: calls }), calls);
    await measure("ListModels from grpcio", () => client.listModels(calls * 50), calls * 50);
    if (values.syscalls) {
      for (
        const [label, work, count] of [
          ["det Predict", () => client.predict({ ...command, count: calls }), calls],
          ["ListModels", () => client.listModels(calls * 10), calls * 10],
        ] as const
      ) {
        const counts = await syscalls(agent.process.pid, async () => void await work());
        console.log(
          `${label} syscalls per call (strace -f -c): ` +
            [...counts].map(([name, n]) => `${name} ${(n / count).toFixed(1)}`).join(", "),
        );
      }
    }
  } finally {
    await grpcio?.stop();
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
