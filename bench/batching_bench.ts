// Dynamic batching: one agent serving each model twice, "<model>" one by one (the default) and
// "<model>-batched" with edge_agent_batching, in alternating blocks of one run. Models: PaddleOCR cls (the
// target), and a small MLP whose Runs cost little per row but read all weights once per Run (where
// batching pays on a CPU).
//
//   throughput  N clients (separate connections, the agent's own client), each calling in a loop: calls/s,
//               and the agent's and the clients' CPU time per call (other load disturbs these less)
//   latency     one client alone: p50 and p99
//   ceiling     ONNX Runtime in this process, 8 Runs of one row against one Run of 8 rows: what batching
//               can save at most
//
// Targets (cls): 8 clients at least 1.5x the unbatched throughput; one client's p50 at most +0.1 ms.
//
//   deno task bench:batching [--quick] [--max-delay-ms 2] [--max-batch-size 8]

import { join } from "node:path";
import { mkdir } from "node:fs/promises";
import { parseArgs } from "node:util";
import process from "node:process";
import { ElementType, OnnxRuntime, Session, Value } from "../ffi/onnxruntime.ts";
import { Batcher, type RunPredict } from "../src/inference/batching.ts";
import { AgentClient } from "../src/client/client.ts";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { BATCHING_DEFAULTS, DEFAULTS } from "../src/config.ts";
import { createLogger } from "../src/log.ts";
import type { BoundInput } from "../src/inference/tensors.ts";
import { npmLibraryPath, sessionOptions } from "../src/inference/runtime.ts";
import { enumValues, type Tensor } from "../src/service/wire.ts";
import { buildModel, OnnxType, PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, ms, percentile, ratio, signedMs, table } from "./stats.ts";

const CLIENT_COUNTS = [4, 8];
const MODES = ["unbatched", "batched"] as const;
type Mode = typeof MODES[number];
const RESULTS_DIR = new URL("./results/", import.meta.url).pathname;
const MLP_WIDTH = 512;
const MLP_LAYERS = 4;

interface Case {
  key: string;
  bytes: Uint8Array;
  /** One request's input shape (one row). */
  shape: number[];
  /** Whether the targets apply. */
  targets: boolean;
}

/** x [n, 512] through 4 MatMul + Relu layers of 512x512 (4 MiB of weights): little work per row. */
function mlpModel(): Uint8Array {
  const nodes = [];
  for (let layer = 0; layer < MLP_LAYERS; layer++) {
    const x = layer === 0 ? "x" : `r${layer}`;
    nodes.push({ op: "MatMul", inputs: [x, `w${layer}`], outputs: [`m${layer}`] });
    nodes.push({ op: "Relu", inputs: [`m${layer}`], outputs: [layer === MLP_LAYERS - 1 ? "y" : `r${layer + 1}`] });
  }
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, ["n", MLP_WIDTH]]],
    outputs: [["y", OnnxType.FLOAT, ["n", MLP_WIDTH]]],
    nodes,
    initializers: Array.from({ length: MLP_LAYERS }, (_, layer) => ({
      name: `w${layer}`,
      dims: [MLP_WIDTH, MLP_WIDTH],
      floats: pseudoRandomInput([MLP_WIDTH, MLP_WIDTH], layer + 1).map((v) => v / 16),
    })),
  });
}

const { values } = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    "max-delay-ms": { type: "string", default: "2" },
    "max-batch-size": { type: "string", default: "8" },
  },
});
const plan = values.quick
  ? { rounds: 3, callsPerClient: 20, latencyBlocks: 6, latencyBlockSize: 10, warmup: 20 }
  : { rounds: 8, callsPerClient: 40, latencyBlocks: 20, latencyBlockSize: 10, warmup: 40 };

function request(shape: number[], seed: number): Tensor[] {
  return [{
    tensor_metadata: { name: new TextEncoder().encode("x"), data_type: enumValues("DataType").FLOAT32, shape },
    byte_data: new Uint8Array(pseudoRandomInput(shape, seed).buffer),
  }];
}

interface Block {
  rate: number;
  cpuMs: number;
  clientCpuMs: number;
  /** Requests per Run of the batched model over the block (1 for the unbatched one). */
  perRun: number;
}

/** Runs and requests in them so far, from the agent's batch size histogram. */
async function batchCounts(metrics: string, model: string): Promise<{ runs: number; requests: number }> {
  const samples = await scrapeMetrics(`unix:${metrics}`);
  return {
    runs: samples.get(`edge_agent_predict_batch_size_count{model="${model}"}`) ?? 0,
    requests: samples.get(`edge_agent_predict_batch_size_sum{model="${model}"}`) ?? 0,
  };
}

/** `clients` callers in closed loops of `calls` each. */
async function throughput(
  agent: AgentProcess,
  metrics: string,
  clients: AgentClient[],
  model: string,
  shape: number[],
  calls: number,
): Promise<Block> {
  const inputs = clients.map((_, i) => request(shape, i + 1));
  const before = await batchCounts(metrics, model);
  const cpu = agent.cpuMs();
  const clientCpu = process.cpuUsage();
  const started = performance.now();
  await Promise.all(clients.map(async (client, i) => {
    for (let k = 0; k < calls; k++) await client.predict(model, inputs[i]);
  }));
  const total = clients.length * calls;
  const rate = total / ((performance.now() - started) / 1000);
  const cpuMs = (agent.cpuMs() - cpu) / total;
  const { user, system } = process.cpuUsage(clientCpu);
  const after = await batchCounts(metrics, model);
  const perRun = after.runs > before.runs ? (after.requests - before.requests) / (after.runs - before.runs) : 1;
  return { rate, cpuMs, clientCpuMs: (user + system) / 1000 / total, perRun };
}

async function latencies(client: AgentClient, model: string, shape: number[], calls: number): Promise<number[]> {
  const input = request(shape, 99);
  const samples: number[] = [];
  for (let k = 0; k < calls; k++) {
    const started = performance.now();
    await client.predict(model, input);
    samples.push(performance.now() - started);
  }
  return samples;
}

interface Ceiling {
  /** Per row: 8 Runs of one row. */
  one: { wallMs: number; cpuMs: number };
  /** Per row: one Run of 8 rows. */
  eight: { wallMs: number; cpuMs: number };
}

/** ONNX Runtime alone in this process, with the agent's session options, in alternating blocks. */
async function inProcessCeiling(ort: OnnxRuntime, model: Case, rounds: number): Promise<Ceiling> {
  const options = sessionOptions(ort, DEFAULTS);
  const session = await Session.create(ort, model.bytes, options);
  options.release();
  const run = async (rows: number) => {
    const shape = [rows, ...model.shape.slice(1)];
    const input = Value.tensorOver(
      ort,
      new Uint8Array(pseudoRandomInput(shape, rows).buffer),
      shape,
      ElementType.FLOAT,
    );
    for (const value of await session.run([0], [input])) value.release();
    input.release();
  };
  const figures = {
    one: { wall: [] as number[], cpu: [] as number[] },
    eight: { wall: [] as number[], cpu: [] as number[] },
  };
  try {
    for (let round = 0; round <= rounds; round++) {
      for (const [key, rows, runs] of [["one", 1, 8], ["eight", 8, 1]] as const) {
        const cpu = process.cpuUsage();
        const started = performance.now();
        for (let i = 0; i < 5 * runs; i++) await run(rows);
        const { user, system } = process.cpuUsage(cpu);
        // Round 0 warms up.
        if (round > 0) {
          figures[key].wall.push((performance.now() - started) / 40);
          figures[key].cpu.push((user + system) / 1000 / 40);
        }
      }
    }
  } finally {
    session.release();
  }
  const summary = (key: "one" | "eight") => ({ wallMs: median(figures[key].wall), cpuMs: median(figures[key].cpu) });
  return { one: summary("one"), eight: summary("eight") };
}

/**
 * What the batcher itself adds to a lone request (the one-client p50 target): a Batcher over a Run that
 * returns at once, against that Run called directly, in microseconds per call.
 */
async function batcherCostUs(calls: number): Promise<number> {
  const spec = { name: "x", dataType: { dataType: 5, name: "FLOAT32", elementType: 1, size: 4 }, shape: [-1, 3] };
  const bytes = new Uint8Array(12);
  const bound: BoundInput[] = [{ inputIndex: 0, spec, shape: [1, 3], label: "x", byteLength: 12, source: { bytes } }];
  const run: RunPredict = (_bound, consume) => Promise.resolve(consume([]));
  const batcher = new Batcher("m", BATCHING_DEFAULTS, 1, run, createLogger(false), undefined);
  const signal = new AbortController().signal;
  const timing = () => ({ bindMs: 0, runMs: 0, encodeMs: 0, copiedInputs: 0, sharedMemoryInputs: 0 });
  const added: number[] = [];
  for (let round = 0; round < 5; round++) {
    let started = performance.now();
    for (let i = 0; i < calls; i++) await run(bound, () => i, timing(), signal);
    const direct = performance.now() - started;
    started = performance.now();
    for (let i = 0; i < calls; i++) await batcher.predict(bound, () => i, timing(), signal);
    added.push(((performance.now() - started - direct) / calls) * 1000);
  }
  return median(added);
}

interface CaseResult {
  blocks: Record<Mode, Record<number, Block[]>>;
  lone: Record<Mode, number[]>;
  ceiling: Ceiling;
}

const modelName = (model: Case, mode: Mode) => (mode === "batched" ? `${model.key}-batched` : model.key);

async function measure(agent: AgentProcess, clients: AgentClient[], model: Case, metrics: string) {
  const blocks: Record<Mode, Record<number, Block[]>> = { unbatched: {}, batched: {} };
  const lone: Record<Mode, number[]> = { unbatched: [], batched: [] };
  for (const mode of MODES) {
    await latencies(clients[0], modelName(model, mode), model.shape, plan.warmup);
    await throughput(agent, metrics, clients, modelName(model, mode), model.shape, plan.warmup / 4);
  }
  for (let round = 0; round < plan.rounds; round++) {
    // Alternate which goes first, so drifts in the machine's load fall on both alike.
    const order = round % 2 === 0 ? MODES : [...MODES].reverse();
    for (const count of CLIENT_COUNTS) {
      for (const mode of order) {
        const block = await throughput(
          agent,
          metrics,
          clients.slice(0, count),
          modelName(model, mode),
          model.shape,
          plan.callsPerClient,
        );
        (blocks[mode][count] ??= []).push(block);
      }
    }
  }
  // One client: short alternating blocks, so both modes see the same moments of the machine's load.
  for (let block = 0; block < plan.latencyBlocks; block++) {
    const order = block % 2 === 0 ? MODES : [...MODES].reverse();
    for (const mode of order) {
      lone[mode].push(...await latencies(clients[0], modelName(model, mode), model.shape, plan.latencyBlockSize));
    }
  }
  return { blocks, lone };
}

function report(model: Case, result: CaseResult): void {
  const { blocks, lone, ceiling } = result;
  const rows: string[][] = [];
  const row = (what: string, unbatched: string, batched: string, difference: string, target = "", met?: boolean) =>
    rows.push([what, unbatched, batched, difference, target, met === undefined ? "" : met ? "met" : "MISSED"]);
  for (const count of CLIENT_COUNTS) {
    const figure = (mode: Mode, key: keyof Block) => median(blocks[mode][count].map((b) => b[key]));
    const gain = figure("batched", "rate") / figure("unbatched", "rate");
    const target = model.targets && count === 8;
    row(
      `${count} clients: calls/s`,
      figure("unbatched", "rate").toFixed(0),
      figure("batched", "rate").toFixed(0),
      ratio(gain),
      target ? ">= 1.5x" : "",
      target ? gain >= 1.5 : undefined,
    );
    row(`${count} clients: requests per Run`, "1", figure("batched", "perRun").toFixed(2), "");
    for (const [key, what] of [["cpuMs", "agent"], ["clientCpuMs", "clients'"]] as const) {
      row(
        `${count} clients: ${what} CPU ms/call`,
        ms(figure("unbatched", key)),
        ms(figure("batched", key)),
        ratio(figure("batched", key) / figure("unbatched", key)),
      );
    }
  }
  const p50 = { unbatched: median(lone.unbatched), batched: median(lone.batched) };
  const added = p50.batched - p50.unbatched;
  row(
    "1 client: p50 ms",
    ms(p50.unbatched),
    ms(p50.batched),
    signedMs(added),
    model.targets ? "<= +0.1 ms" : "",
    model.targets ? added <= 0.1 : undefined,
  );
  const p99 = { unbatched: percentile(lone.unbatched, 99), batched: percentile(lone.batched, 99) };
  row("1 client: p99 ms", ms(p99.unbatched), ms(p99.batched), signedMs(p99.batched - p99.unbatched));
  for (const key of ["wallMs", "cpuMs"] as const) {
    row(
      `in-process ORT per row, ${key === "wallMs" ? "wall" : "CPU"} ms (x1 vs x8)`,
      ms(ceiling.one[key]),
      ms(ceiling.eight[key]),
      ratio(ceiling.eight[key] / ceiling.one[key]),
    );
  }
  console.log(`\n${model.key} ${JSON.stringify(model.shape)}`);
  console.log(table(["what", "unbatched", "batched", "difference", "target", "result"], rows));
}

const maxDelayMs = Number(values["max-delay-ms"]);
const maxBatchSize = Number(values["max-batch-size"]);
const models: Case[] = [
  { key: "cls", bytes: await Deno.readFile(PADDLE_CLS), shape: [1, 3, 48, 192], targets: true },
  { key: "mlp", bytes: mlpModel(), shape: [1, MLP_WIDTH], targets: false },
];
const dir = await Deno.makeTempDir({ prefix: "edge-agent-batching-bench-" });
const metrics = join(dir, "metrics.sock");
const agent = await AgentProcess.start(dir, join(dir, "models"), {
  edge_agent_metrics: `unix:${metrics}`,
  edge_agent_state_dir: join(dir, "state"),
  edge_agent_batching: Object.fromEntries(
    models.map((m) => [modelName(m, "batched"), { max_batch_size: maxBatchSize, max_delay_ms: maxDelayMs }]),
  ),
  // The per-call debug lines would cost the agent's thread more than some Runs.
  sagemaker_edge_log_verbose: false,
});
const clients = Array.from({ length: Math.max(...CLIENT_COUNTS) }, () => new AgentClient(agent.socket));
const ort = OnnxRuntime.open(npmLibraryPath());
try {
  console.log(
    `Dynamic batching, max_batch_size ${maxBatchSize}, max_delay_ms ${maxDelayMs}; ${plan.rounds} alternating rounds ` +
      "(medians); the agent's own client, one connection per client",
  );
  const results: Record<string, CaseResult> = {};
  for (const model of models) {
    const folder = await writeModelFolder(join(dir, "models"), model.key, model.bytes);
    for (const mode of MODES) await agent.client.loadModel(folder, modelName(model, mode));
    const measured = await measure(agent, clients, model, metrics);
    results[model.key] = { ...measured, ceiling: await inProcessCeiling(ort, model, plan.rounds) };
    report(model, results[model.key]);
    for (const mode of MODES) await agent.client.unloadModel(modelName(model, mode));
  }
  const batcherUs = await batcherCostUs(values.quick ? 20_000 : 100_000);
  console.log(`\nThe batcher's own cost per lone request (no Run, in this process): ${batcherUs.toFixed(1)} µs`);
  await mkdir(RESULTS_DIR, { recursive: true });
  const file = join(RESULTS_DIR, `batching-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  await Deno.writeTextFile(file, JSON.stringify({ maxBatchSize, maxDelayMs, plan, results, batcherUs }, null, 2));
  console.log(`figures written to ${file}`);
} finally {
  ort.close();
  for (const client of clients) client.close();
  await agent.stop();
  await Deno.remove(dir, { recursive: true });
}
