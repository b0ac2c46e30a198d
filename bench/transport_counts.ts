// Counts behind the transport's timings, which a shared machine makes noisy: per det Predict and per
// ListModels from grpcio, and per det and cls Predict from grpcio and grpc-js under Node, the CPU time of the agent's
// main thread (JavaScript: transport, protobuf, handlers; not ONNX Runtime's threads), its minor page faults,
// V8 garbage collections (scavenges and mark-compacts, from --trace-gc, with their pause and incremental
// marking time) and, with --syscalls, its system calls on the socket (strace -f -c).
//
// deno task bench:counts [--calls=N] [--syscalls]

import { join } from "node:path";
import { parseArgs } from "node:util";
import { agentDeployment } from "../tests/helpers/agent.ts";
import { PADDLE_CLS, PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { testTrust } from "../tests/helpers/signing.ts";
import { readProc } from "./agent_process.ts";
import { generateStubs, GrpcioClient, grpcioMissing, lines, nodeMissing, type PredictCommand } from "./grpcio.ts";
import { GrpcJsAgentClient } from "../tests/helpers/grpcjs_client.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, ms } from "./stats.ts";

/** minflt (field 10) and majflt (12) of /proc/<pid>/stat. */
function faults(pid: number): number {
  const stat = readProc(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[7]) + Number(fields[9]);
}

/** CPU time of the agent's main thread (JavaScript: the transport, protobuf, the handlers), ms: schedstat's ns. */
function mainThreadCpuMs(pid: number): number {
  return Number(readProc(`/proc/${pid}/task/${pid}/schedstat`).split(" ")[0]) / 1e6;
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
    // COUNTS_PERF=<file>: perf samples the main thread during one case's calls (COUNTS_PERF_CASE: part of its
    // label; default det from grpcio), JIT frames named by --perf-basic-prof.
    args.splice(
      1,
      0,
      Deno.env.get("COUNTS_PERF") ? "--v8-flags=--trace-gc,--perf-basic-prof" : "--v8-flags=--trace-gc",
    );
    // V8 prints with C stdio, block-buffered into a pipe: stdbuf makes it line-buffered, so lines arrive per call.
    const process = new Deno.Command("stdbuf", {
      args: ["-oL", Deno.execPath(), ...args],
      // --perf-basic-prof leaves V8 log files in the working folder: the run's own.
      cwd: dir,
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

  snapshot(): { faults: number; mainCpuMs: number; scavenges: number; markCompacts: number; gcMs: number } {
    return {
      faults: faults(this.process.pid),
      mainCpuMs: mainThreadCpuMs(this.process.pid),
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

interface Case {
  label: string;
  calls: number;
  run: (count: number) => Promise<number[]>;
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
  const models = [
    { key: "det", file: PADDLE_DET, shape: [1, 3, 640, 640], seed: 2 },
    { key: "cls", file: PADDLE_CLS, shape: [1, 3, 48, 192], seed: 1 },
  ];
  const agent = await TracedAgent.start(dir, modelsDir);
  const clients: GrpcioClient[] = [];
  try {
    const loader = new GrpcJsAgentClient(agent.socket);
    const commands: Record<string, Omit<PredictCommand, "count">> = {};
    for (const { key, file, shape, seed } of models) {
      const { model } = await loader.loadModel(await writeModelFolder(modelsDir, key, await Deno.readFile(file)), key);
      const input = join(dir, `${key}.input.bin`);
      await Deno.writeFile(input, new Uint8Array(pseudoRandomInput(shape, seed).buffer));
      commands[key] = {
        name: key,
        input,
        inputName: new TextDecoder().decode(model.input_tensor_metadatas[0].name),
        shape,
      };
    }
    loader.close();
    const grpcio = await GrpcioClient.start(await generateStubs(dir), agent.socket);
    clients.push(grpcio);
    const cases: Case[] = [
      { label: "det Predict from grpcio", calls, run: (count) => grpcio.predict({ ...commands.det, count }) },
      { label: "ListModels from grpcio", calls: calls * 50, run: (count) => grpcio.listModels(count) },
      {
        label: "cls Predict from grpcio",
        calls: calls * 20,
        run: (count) => grpcio.predict({ ...commands.cls, count }),
      },
    ];
    if (!await nodeMissing()) {
      const node = await GrpcioClient.startNode(agent.socket);
      clients.push(node);
      cases.push(
        { label: "det Predict from grpc-js (Node)", calls, run: (count) => node.predict({ ...commands.det, count }) },
        {
          label: "cls Predict from grpc-js (Node)",
          calls: calls * 20,
          run: (count) => node.predict({ ...commands.cls, count }),
        },
      );
    }
    for (const c of cases) await c.run(5);
    const perfFile = Deno.env.get("COUNTS_PERF");
    for (const c of cases) {
      const perf = perfFile && c.label.includes(Deno.env.get("COUNTS_PERF_CASE") ?? "det Predict from grpcio")
        ? new Deno.Command("perf", {
          args: ["record", "-F", "4000", "-g", "-t", String(agent.process.pid), "-o", perfFile],
          stdout: "null",
          stderr: "null",
        }).spawn()
        : null;
      const before = agent.snapshot();
      const times = await c.run(c.calls);
      // trace-gc lines of the last call may still be on their way.
      await new Promise((resolve) => setTimeout(resolve, 200));
      const after = agent.snapshot();
      if (perf) {
        perf.kill("SIGINT");
        await perf.status;
      }
      const per = (key: keyof typeof before, digits = 2) => ((after[key] - before[key]) / c.calls).toFixed(digits);
      console.log(
        `${c.label}: ${c.calls} calls, p50 ${ms(median(times))} ms; per call: main thread CPU ${
          per("mainCpuMs", 3)
        } ms, minor faults ${per("faults")}, scavenges ${per("scavenges")}, mark-compacts ${per("markCompacts")}, GC ${
          per("gcMs")
        } ms`,
      );
    }
    if (values.syscalls) {
      for (const c of cases) {
        const count = Math.max(1, Math.round(c.calls / 5));
        const counts = await syscalls(agent.process.pid, async () => void await c.run(count));
        console.log(
          `${c.label} syscalls per call (strace -f -c): ` +
            [...counts].map(([name, n]) => `${name} ${(n / count).toFixed(1)}`).join(", "),
        );
      }
    }
  } finally {
    for (const client of clients) await client.stop();
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
