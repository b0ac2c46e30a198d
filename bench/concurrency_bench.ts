// Concurrent clients: throughput, p50 and p99 of Predict at 1, 2, 4 and 8 clients, each on its own connection,
// on one model (PaddleOCR cls) and on two models (cls and a second copy of it, half the clients on each), as
// ratios to one client, side by side in one run.
//
//   deno task bench:concurrency [--seconds S] [--rounds R] [--clients grpcio,own] [--sweep]
//
//   grpcio  one Python grpcio process per client (the gRPC C core, as device applications use it)
//   own     the agent's own client (src/client/client.ts), one connection per client, all in this process
//   --sweep the same under several thread policies (intra-op threads, concurrent Runs per model, shared pools)
//
// Cells (client count x scenario) alternate within each round so that the machine's background load falls
// on all of them alike. Prints one table per policy and writes the figures to bench/results/.

import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { AgentClient } from "../src/client/client.ts";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { DEFAULTS } from "../src/config.ts";
import { enumValues, type Tensor } from "../src/service/wire.ts";
import { PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { PYTHON } from "../tests/helpers/python.ts";
import { AgentProcess } from "./agent_process.ts";
import { generateStubs, GrpcioClient, grpcioMissing } from "./grpcio.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, ms, percentile, ratio, table } from "./stats.ts";
import { ROW, summary } from "./summary.ts";

const RESULTS_DIR = new URL("./results/", import.meta.url).pathname;
const CLIENT_COUNTS = [1, 2, 4, 8];
const SHAPE = [1, 3, 48, 192];
const WARMUP_CALLS = 100;

export type ClientKind = "grpcio" | "own";
type Scenario = "one model" | "two models";
const SCENARIOS: Scenario[] = ["one model", "two models"];

/** A thread policy under test: the agent's config keys for it. */
interface Policy {
  label: string;
  keys: Record<string, unknown>;
}

const DEFAULT_POLICY: Policy = { label: "defaults (intra 1, runs one per core, shared pools)", keys: {} };

const UNLIMITED = 1024;

/** Labels name the intra-op threads per Run and the run slots per model. */
const SWEEP: Policy[] = [
  DEFAULT_POLICY,
  { label: "intra 1, runs 1", keys: { edge_agent_intra_op_threads: 1, edge_agent_max_concurrent_runs: 1 } },
  {
    label: "intra 1, runs unlimited",
    keys: { edge_agent_intra_op_threads: 1, edge_agent_max_concurrent_runs: UNLIMITED },
  },
  {
    label: "intra 0 (one per core), runs 1",
    keys: { edge_agent_intra_op_threads: 0, edge_agent_max_concurrent_runs: 1 },
  },
  {
    label: "intra 0 (one per core), runs one per core, shared pools",
    keys: { edge_agent_intra_op_threads: 0, edge_agent_max_concurrent_runs: navigator.hardwareConcurrency },
  },
  {
    label: "intra 0, runs unlimited, a pool per model (the earlier defaults)",
    keys: {
      edge_agent_intra_op_threads: 0,
      edge_agent_max_concurrent_runs: UNLIMITED,
      edge_agent_shared_thread_pools: false,
    },
  },
];

interface Cell {
  kind: ClientKind;
  scenario: Scenario;
  clients: number;
  calls: number;
  callsPerSecond: number;
  p50: number;
  p99: number;
  /** The agent's CPU time (all threads) per call. */
  agentCpuMsPerCall: number;
  /** The agent's CPU time over wall time: how many cores it kept busy. */
  agentCores: number;
  /** Times the agent's threads were taken off a core while still runnable, per call: oversubscription. */
  agentPreemptionsPerCall: number;
}

/** N clients of one kind, each on its own connection, driven for a given time. */
interface Clients {
  kind: ClientKind;
  /** Calls `models[i % models.length]` from clients 0..n-1 for `seconds`; per-client latencies (ms). */
  run(n: number, models: string[], seconds: number): Promise<number[][]>;
  close(): Promise<void>;
}

function tensorsFor(input: Float32Array, inputName: string): Tensor[] {
  return [{
    tensor_metadata: {
      name: new TextEncoder().encode(inputName),
      data_type: enumValues("DataType").FLOAT32,
      shape: SHAPE,
    },
    byte_data: new Uint8Array(input.buffer, input.byteOffset, input.byteLength),
  }];
}

async function ownClients(socket: string, tensors: Tensor[], max: number): Promise<Clients> {
  const clients = Array.from({ length: max }, () => new AgentClient(socket));
  // Connect and warm each connection up.
  await Promise.all(clients.map(async (c) => {
    for (let i = 0; i < WARMUP_CALLS; i++) await c.predict("cls", tensors);
  }));
  return {
    kind: "own",
    async run(n, models, seconds) {
      const end = performance.now() + seconds * 1000;
      return await Promise.all(
        clients.slice(0, n).map(async (client, i) => {
          const times: number[] = [];
          const name = models[i % models.length];
          while (performance.now() < end) {
            const started = performance.now();
            await client.predict(name, tensors);
            times.push(performance.now() - started);
          }
          return times;
        }),
      );
    },
    close() {
      for (const c of clients) c.close();
      return Promise.resolve();
    },
  };
}

async function grpcioClients(
  stubs: string,
  socket: string,
  inputFile: string,
  inputName: string,
  max: number,
): Promise<Clients> {
  const clients: GrpcioClient[] = [];
  const command = (name: string) => ({ name, input: inputFile, inputName, shape: SHAPE, count: 1 });
  try {
    for (let i = 0; i < max; i++) clients.push(await GrpcioClient.start(stubs, socket));
    await Promise.all(clients.map((c) => c.predict({ ...command("cls"), count: WARMUP_CALLS })));
  } catch (error) {
    await Promise.all(clients.map((c) => c.stop()));
    throw error;
  }
  return {
    kind: "grpcio",
    run(n, models, seconds) {
      return Promise.all(
        clients.slice(0, n).map((c, i) => c.predict({ ...command(models[i % models.length]), seconds })),
      );
    },
    async close() {
      await Promise.all(clients.map((c) => c.stop()));
    },
  };
}

/**
 * How many cores this run can get now: the CPU time `cores` busy processes receive over `seconds`. On a
 * machine shared with other work, scaling can only be judged against this (a 2-core box giving the
 * benchmark 0.4 cores shows no 2-core scaling whatever the agent does).
 */
async function coresAvailable(seconds = 0.5): Promise<number> {
  const burn = `import time\nend = time.perf_counter() + ${seconds}\nwhile time.perf_counter() < end: pass\n` +
    "print(time.process_time())";
  const cpu = await Promise.all(
    Array.from({ length: navigator.hardwareConcurrency }, async () => {
      const { stdout } = await new Deno.Command(PYTHON, { args: ["-c", burn], stdout: "piped" }).output();
      return Number(new TextDecoder().decode(stdout));
    }),
  );
  return cpu.reduce((a, b) => a + b, 0) / seconds;
}

/** One cell's figures, summed over rounds. */
interface Tally {
  latencies: number[];
  calls: number;
  /** Calls per second, one per round. */
  rate: number[];
  cpuMs: number;
  wallMs: number;
  preemptions: number;
}

const emptyTally = (): Tally => ({ latencies: [], calls: 0, rate: [], cpuMs: 0, wallMs: 0, preemptions: 0 });

/**
 * Involuntary context switches of the agent's live threads so far (threads that exited are not counted; the
 * agent's are long-lived while calls keep coming).
 */
async function preemptions(pid: number): Promise<number> {
  const { stdout } = await new Deno.Command("sh", {
    args: ["-c", `cat /proc/${pid}/task/*/status`],
    stdout: "piped",
    stderr: "null",
  }).output();
  return [...new TextDecoder().decode(stdout).matchAll(/^nonvoluntary_ctxt_switches:\s+(\d+)/gm)]
    .reduce((sum, m) => sum + Number(m[1]), 0);
}

async function measurePolicy(
  policy: Policy,
  workspace: { dir: string; modelsDir: string; clsUrl: string; inputFile: string; stubs: string | null },
  input: Float32Array,
  kinds: ClientKind[],
  seconds: number,
  rounds: number,
): Promise<{ cells: Cell[]; peakRuns: Record<string, number> }> {
  const metrics = `unix:${join(workspace.dir, "metrics.sock")}`;
  const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, {
    // No debug line per call: at thousands of calls per second the log would be part of what is measured.
    sagemaker_edge_log_verbose: false,
    // For the most Runs of each model that went side by side.
    edge_agent_metrics: metrics,
    // Its own state (the capture spool's lock), apart from any other agent on this machine.
    edge_agent_state_dir: join(workspace.dir, "state"),
    ...policy.keys,
  });
  const all: Clients[] = [];
  try {
    const { model } = await agent.ownClient.loadModel(workspace.clsUrl, "cls");
    await agent.ownClient.loadModel(workspace.clsUrl, "cls2");
    const inputName = new TextDecoder().decode(model.input_tensor_metadatas[0].name);
    const max = Math.max(...CLIENT_COUNTS);
    for (const kind of kinds) {
      if (kind === "own") all.push(await ownClients(agent.socket, tensorsFor(input, inputName), max));
      else if (workspace.stubs) {
        all.push(await grpcioClients(workspace.stubs, agent.socket, workspace.inputFile, inputName, max));
      }
    }
    const samples = new Map<string, Tally>();
    for (let round = 0; round < rounds; round++) {
      for (const clients of all) {
        for (const scenario of SCENARIOS) {
          for (const n of CLIENT_COUNTS) {
            const models = scenario === "one model" ? ["cls"] : ["cls", "cls2"];
            const preemptedBefore = await preemptions(agent.pid);
            const cpuBefore = agent.cpuMs();
            const started = performance.now();
            const perClient = await clients.run(n, models, seconds);
            const wallMs = performance.now() - started;
            const cpuMs = agent.cpuMs() - cpuBefore;
            const preempted = await preemptions(agent.pid) - preemptedBefore;
            const key = `${clients.kind}|${scenario}|${n}`;
            const entry = samples.get(key) ?? emptyTally();
            samples.set(key, entry);
            for (const times of perClient) entry.latencies.push(...times);
            const calls = perClient.reduce((sum, t) => sum + t.length, 0);
            entry.calls += calls;
            entry.cpuMs += cpuMs;
            entry.wallMs += wallMs;
            entry.preemptions += preempted;
            // Each client's own rate over the time it was calling, summed: all ran side by side for `seconds`.
            entry.rate.push(perClient.reduce((sum, t) => sum + (t.length * 1000) / t.reduce((a, b) => a + b, 0), 0));
          }
        }
      }
    }
    const scrape = await scrapeMetrics(metrics);
    const peakRuns = Object.fromEntries(
      ["cls", "cls2"].map((m) => [m, scrape.get(`edge_agent_runs_in_flight_peak{model="${m}"}`) ?? NaN]),
    );
    const cells = [...samples].map(([key, s]) => {
      const [kind, scenario, n] = key.split("|");
      return {
        kind: kind as ClientKind,
        scenario: scenario as Scenario,
        clients: Number(n),
        calls: s.calls,
        callsPerSecond: median(s.rate),
        p50: percentile(s.latencies, 50),
        p99: percentile(s.latencies, 99),
        agentCpuMsPerCall: s.cpuMs / s.calls,
        agentCores: s.cpuMs / s.wallMs,
        agentPreemptionsPerCall: s.preemptions / s.calls,
      };
    });
    return { cells, peakRuns };
  } finally {
    for (const clients of all) await clients.close();
    await agent.stop();
  }
}

function printCells(policy: Policy, cells: Cell[]): void {
  console.log(`\nthread policy: ${policy.label}`);
  const rows: string[][] = [];
  for (const cell of cells) {
    const one = cells.find((c) => c.kind === cell.kind && c.scenario === cell.scenario && c.clients === 1)!;
    rows.push([
      cell.kind,
      cell.scenario,
      String(cell.clients),
      cell.callsPerSecond.toFixed(0),
      ratio(cell.callsPerSecond / one.callsPerSecond),
      ms(cell.p50),
      ratio(cell.p50 / one.p50),
      ms(cell.p99),
      ratio(cell.p99 / one.p99),
      ms(cell.agentCpuMsPerCall),
      cell.agentCores.toFixed(2),
      cell.agentPreemptionsPerCall.toFixed(2),
    ]);
  }
  console.log(table(
    [
      "client",
      "models",
      "clients",
      "calls/s",
      "vs 1",
      "p50 ms",
      "vs 1",
      "p99 ms",
      "vs 1",
      "agent CPU ms/call",
      "agent cores busy",
      "agent preemptions/call",
    ],
    rows,
    2,
  ));
  for (const kind of new Set(cells.map((c) => c.kind))) {
    const rate = (scenario: Scenario, n: number) =>
      cells.find((c) => c.kind === kind && c.scenario === scenario && c.clients === n)!.callsPerSecond;
    for (const scenario of SCENARIOS) {
      const four = rate(scenario, 4) / rate(scenario, 1);
      const eight = rate(scenario, 8) / rate(scenario, 4);
      console.log(
        `${kind}, ${scenario}: 4 clients ${ratio(four)} one client's throughput (target at least 1.80x); ` +
          `8 clients ${ratio(eight)} of 4 clients' (target at least 1.00x)`,
      );
    }
  }
}

/** The summary's concurrency rows from the default policy's one-model cells (grpcio first, as devices call). */
function summarize(cells: Cell[]): void {
  const kind = cells.some((c) => c.kind === "grpcio") ? "grpcio" : cells[0]?.kind;
  const rate = (n: number) =>
    cells.find((c) => c.kind === kind && c.scenario === SCENARIOS[0] && c.clients === n)?.callsPerSecond;
  const [one, four, eight] = [rate(1), rate(4), rate(8)];
  if (!one || !four || !eight) return;
  summary.add({ what: ROW.concurrency4, measured: `${ratio(four / one)} (${kind})`, met: four / one >= 1.8 });
  summary.add({ what: ROW.concurrency8, measured: `${ratio(eight / four)} (${kind})`, met: eight / four >= 1 });
}

/**
 * 1, 2, 4 and 8 clients under the default thread policy (every policy of the sweep with `sweep`), printed,
 * saved under bench/results, and the default policy's ratios added to the summary table.
 */
export async function concurrencyBenchmark(
  { seconds, rounds, kinds, sweep }: { seconds: number; rounds: number; kinds: ClientKind[]; sweep: boolean },
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-concurrency-" });
  try {
    const modelsDir = join(dir, "models");
    const clsUrl = await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
    const input = pseudoRandomInput(SHAPE, 1);
    const inputFile = join(dir, "cls-input.f32");
    await Deno.writeFile(inputFile, new Uint8Array(input.buffer));
    const missing = kinds.includes("grpcio") ? await grpcioMissing() : "not asked for";
    if (missing && kinds.includes("grpcio")) console.log(`grpcio clients skipped: ${missing}`);
    const stubs = missing ? null : await generateStubs(dir);
    const policies = sweep ? SWEEP : [DEFAULT_POLICY];
    console.log(
      `${Deno.build.target}, ${navigator.hardwareConcurrency} cores; agent defaults: intra-op threads ${DEFAULTS.intraOpThreads}; ` +
        `${rounds} rounds of ${seconds} s per cell`,
    );
    const results = [];
    for (const policy of policies) {
      const before = await coresAvailable();
      const { cells, peakRuns } = await measurePolicy(
        policy,
        { dir, modelsDir, clsUrl, inputFile, stubs },
        input,
        kinds,
        seconds,
        rounds,
      );
      const after = await coresAvailable();
      printCells(policy, cells);
      if (policy === DEFAULT_POLICY) summarize(cells);
      console.log(
        `cores this run could get (${navigator.hardwareConcurrency} busy processes), before / after: ` +
          `${before.toFixed(2)} / ${
            after.toFixed(2)
          }; the most Runs at once: cls ${peakRuns.cls}, cls2 ${peakRuns.cls2}`,
      );
      results.push({ policy, cells, coresAvailable: { before, after }, peakRuns });
    }
    await mkdir(RESULTS_DIR, { recursive: true });
    const file = join(RESULTS_DIR, `concurrency-${new Date().toISOString().replaceAll(":", "-")}.json`);
    await Deno.writeTextFile(file, JSON.stringify({ seconds, rounds, results }, null, 1) + "\n");
    console.log(`\nfigures: ${file}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      seconds: { type: "string", default: "2" },
      rounds: { type: "string", default: "2" },
      clients: { type: "string", default: "grpcio,own" },
      sweep: { type: "boolean", default: false },
    },
  });
  await concurrencyBenchmark({
    seconds: Number(values.seconds),
    rounds: Number(values.rounds),
    kinds: values.clients.split(",") as ClientKind[],
    sweep: values.sweep,
  });
}
