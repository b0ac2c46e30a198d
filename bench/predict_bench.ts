// Predict latency of the agent against onnxruntime-node in-process, on PaddleOCR cls and det.
//
//   default   reference (onnxruntime-node) / agent (gRPC over the Unix socket, from the grpc-js client in this
//             process and from a Python grpcio client) / ffi (our bindings in this process) side by side, where
//             the agent's time goes, start-up time and memory
//   --sweep   agent (both clients) and reference under several ONNX Runtime settings, with CPU time per inference
//   --quick   fewer calls (about 30 s for the default mode)
//
// Prints tables and writes the figures to bench/results/.

import { copyFile, mkdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import * as ort from "onnxruntime-node";
import { OnnxRuntime } from "../ffi/onnxruntime.ts";
import { npmLibraryPath } from "../src/runtime.ts";
import { DEFAULTS } from "../src/config.ts";
import { asBuffer, messageType, type Tensor } from "../src/wire.ts";
import { PADDLE_CLS, PADDLE_DET } from "../tests/helpers/onnx_models.ts";
import { AgentProcess, readProc } from "./agent_process.ts";
import { generateStubs, GrpcioClient, grpcioMissing } from "./grpcio.ts";
import {
  agentConfigKeys,
  AgentRunner,
  type AgentSplit,
  type BlockPlan,
  choiceLabel,
  FfiRunner,
  GrpcioRunner,
  type ModelCase,
  type OrtChoice,
  type PathName,
  type PathResult,
  pseudoRandomInput,
  ReferenceRunner,
  runBlocks,
  type Runner,
} from "./runners.ts";
import { median, ms, percentile, ratio, signedMs, table } from "./stats.ts";

const RESULTS_DIR = new URL("./results/", import.meta.url).pathname;
const LIST_MODELS_CALLS = 50;

const MODELS = [
  { key: "cls", file: PADDLE_CLS, shape: [1, 3, 48, 192], seed: 1 },
  { key: "det", file: PADDLE_DET, shape: [1, 3, 640, 640], seed: 2 },
];

/** The agent's defaults (src/config.ts). */
const DEFAULT_CHOICE: OrtChoice = {
  intraOpThreads: DEFAULTS.intraOpThreads,
  allowSpinning: DEFAULTS.allowSpinning,
  graphOptimization: DEFAULTS.graphOptimization,
};

const SWEEP_CHOICES: OrtChoice[] = [
  ...[0, 1, 2].flatMap((intraOpThreads) =>
    [true, false].map((allowSpinning) => ({ intraOpThreads, allowSpinning, graphOptimization: "all" as const }))
  ),
  { ...DEFAULT_CHOICE, graphOptimization: "extended" },
  { ...DEFAULT_CHOICE, graphOptimization: "basic" },
];

interface Target {
  text: string;
  met(agentP50: number, referenceP50: number): boolean;
}

const TARGETS: Record<string, Target> = {
  cls: { text: "p50 <= in-process + 1.0 ms", met: (agent, reference) => agent <= reference + 1.0 },
  det: { text: "p50 <= 1.5x in-process", met: (agent, reference) => agent <= 1.5 * reference },
};

interface Plan {
  /** Agent starts timed for spawn -> "serving". */
  starts: number;
  /** Per model key. */
  blocks: Record<string, BlockPlan>;
}

// Rounds are multiples of the number of paths (4 in default mode, 3 in the sweep; one fewer without grpcio), so
// each path holds each position in the rotation equally.
const PLANS: Record<string, Plan> = {
  default: {
    starts: 5,
    blocks: {
      cls: { warmup: 20, rounds: 32, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 3, rounds: 24, blockSize: 10, blockWarmup: 2 },
    },
  },
  defaultQuick: {
    starts: 3,
    blocks: {
      cls: { warmup: 10, rounds: 8, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 2, rounds: 4, blockSize: 10, blockWarmup: 2 },
    },
  },
  sweep: {
    starts: 0,
    blocks: {
      cls: { warmup: 10, rounds: 9, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 2, rounds: 6, blockSize: 8, blockWarmup: 2 },
    },
  },
  sweepQuick: {
    starts: 0,
    blocks: {
      cls: { warmup: 5, rounds: 3, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 1, rounds: 3, blockSize: 5, blockWarmup: 1 },
    },
  },
};

const PATH_LABELS: Record<PathName, string> = {
  reference: "reference (onnxruntime-node, in-process)",
  agent: "agent (grpc-js client, in-process)",
  grpcio: "agent (grpcio client, Python subprocess)",
  ffi: "ffi (our bindings, in-process)",
};

/** The agent's client on each path that goes through gRPC. */
const CLIENTS: Record<string, string> = { agent: "grpc-js", grpcio: "grpcio" };

interface Workspace {
  dir: string;
  modelsDir: string;
  models: ModelCase[];
  /** LoadModel url per model key. */
  urls: Record<string, string>;
  /** Folder of the generated Python stubs; null when the grpcio path is skipped. */
  grpcioStubs: string | null;
}

/** Starts a grpcio client on `agent` when the workspace has stubs. */
function startGrpcio(workspace: Workspace, agent: AgentProcess): Promise<GrpcioClient | null> {
  return workspace.grpcioStubs ? GrpcioClient.start(workspace.grpcioStubs, agent.socket) : Promise.resolve(null);
}

async function prepare(): Promise<Workspace> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-bench-" });
  const modelsDir = join(dir, "models");
  const urls: Record<string, string> = {};
  for (const { key, file } of MODELS) {
    urls[key] = join(modelsDir, key);
    await mkdir(urls[key], { recursive: true });
    await copyFile(file, join(urls[key], "model.onnx"));
  }
  const models = MODELS.map(({ key, file, shape, seed }) => ({
    key,
    file,
    shape,
    input: pseudoRandomInput(shape, seed),
  }));
  const missing = await grpcioMissing();
  if (missing) console.log(`grpcio client path skipped: ${missing}`);
  return { dir, modelsDir, models, urls, grpcioStubs: missing ? null : await generateStubs(dir) };
}

function summary(result: PathResult) {
  return {
    n: result.latencies.length,
    p50: percentile(result.latencies, 50),
    p99: percentile(result.latencies, 99),
    cpuMsPerCall: result.cpuMsPerCall,
  };
}

function timeMedian(iterations: number, fn: () => unknown): number {
  for (let i = 0; i < 5; i++) fn();
  const times: number[] = [];
  for (let i = 0; i < iterations; i++) {
    const started = performance.now();
    fn();
    times.push(performance.now() - started);
  }
  return median(times);
}

/** protobufjs work around the call, timed in-process on the same messages grpc-js serializes. */
function codecTimes(runner: AgentRunner, response: { tensors: Tensor[] }) {
  const PredictRequest = messageType("PredictRequest");
  const PredictResponse = messageType("PredictResponse");
  const request = { name: runner.model.key, tensors: runner.tensors };
  const requestBytes = asBuffer(PredictRequest.encode(request).finish());
  const responseBytes = asBuffer(PredictResponse.encode(response).finish());
  const iterations = requestBytes.byteLength > 1_000_000 ? 30 : 200;
  return {
    requestBytes: requestBytes.byteLength,
    responseBytes: responseBytes.byteLength,
    requestEncodeMs: timeMedian(iterations, () => asBuffer(PredictRequest.encode(request).finish())),
    requestDecodeMs: timeMedian(iterations, () => PredictRequest.decode(requestBytes)),
    responseDecodeMs: timeMedian(iterations, () => PredictResponse.decode(responseBytes)),
  };
}
type Codec = ReturnType<typeof codecTimes>;

function splitSummary(splits: AgentSplit[], codec: Codec) {
  const codecMs = codec.requestEncodeMs + codec.requestDecodeMs + codec.responseDecodeMs;
  const of = (f: (s: AgentSplit) => number) => median(splits.map(f));
  return {
    n: splits.length,
    clientTotalMs: of((s) => s.totalMs),
    clientRequestEncodeMs: codec.requestEncodeMs,
    agentRequestDecodeMs: codec.requestDecodeMs,
    agentHandlerMs: of((s) => s.ms),
    agentBindMs: of((s) => s.bindMs),
    agentRunMs: of((s) => s.runMs),
    agentResponseEncodeMs: of((s) => s.encodeMs),
    agentHandlerOtherMs: of((s) => s.ms - s.bindMs - s.runMs - s.encodeMs),
    clientResponseDecodeMs: codec.responseDecodeMs,
    transportMs: of((s) => s.totalMs - s.ms - codecMs),
    callsWithCopiedInputs: splits.filter((s) => s.copiedInputs > 0).length,
    requestBytes: codec.requestBytes,
    responseBytes: codec.responseBytes,
  };
}

/** The grpcio client's total around the agent's handler; the rest is grpcio, both codecs and the transport. */
function grpcioSplitSummary(splits: AgentSplit[]) {
  const of = (f: (s: AgentSplit) => number) => median(splits.map(f));
  return {
    n: splits.length,
    clientTotalMs: of((s) => s.totalMs),
    agentHandlerMs: of((s) => s.ms),
    outsideHandlerMs: of((s) => s.totalMs - s.ms),
  };
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

async function defaultMode(workspace: Workspace, { starts, blocks }: Plan) {
  const keys = agentConfigKeys(DEFAULT_CHOICE);

  console.log(`agent start-up: ${starts} starts`);
  const readyMs: number[] = [];
  for (let i = 0; i < starts; i++) {
    const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, keys);
    readyMs.push(agent.readyMs);
    await agent.stop();
  }

  const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, keys);
  const runtime = OnnxRuntime.open(npmLibraryPath());
  const releases: (() => unknown)[] = [];
  let grpcio: GrpcioClient | null = null;
  try {
    // Let start-up work (module evaluation, grpc-js set-up) settle before calling the process idle.
    await new Promise((resolve) => setTimeout(resolve, 500));
    const idle = agent.memory();
    const agents: AgentRunner[] = [];
    for (const model of workspace.models) {
      agents.push(await AgentRunner.create(model, agent, workspace.urls[model.key]));
    }
    const loaded = agent.memory();
    grpcio = await startGrpcio(workspace, agent);

    const models = [];
    for (const [i, model] of workspace.models.entries()) {
      const reference = await ReferenceRunner.create(model, DEFAULT_CHOICE);
      releases.push(() => reference.release());
      const ffi = await FfiRunner.create(model, runtime, DEFAULT_CHOICE);
      releases.push(() => ffi.release());
      const viaGrpcio = grpcio && await GrpcioRunner.create(grpcio, agents[i], workspace.dir);
      const runners: Runner[] = [reference, agents[i], ...(viaGrpcio ? [viaGrpcio] : []), ffi];
      const expected = await reference.output();
      const diffs: Partial<Record<PathName, number>> = {};
      for (const runner of runners.slice(1)) diffs[runner.path] = maxAbsDiff(await runner.output(), expected);
      const plan = blocks[model.key];
      console.log(
        `${model.key}: ${plan.rounds} rounds of ${plan.blockSize}-call blocks per path (+${plan.blockWarmup} warm-up)`,
      );
      const results = await runBlocks(runners, plan);
      const response = await agents[i].call();
      const codec = codecTimes(agents[i], response);
      models.push({
        model: model.key,
        shape: model.shape,
        maxAbsDiffVsReference: diffs,
        paths: Object.fromEntries(
          runners.map((r, j) => [r.path, { ...summary(results[j]), latencies: results[j].latencies }]),
        ),
        split: splitSummary(agents[i].splits, codec),
        grpcioSplit: viaGrpcio && grpcioSplitSummary(viaGrpcio.splits),
      });
    }
    // A tiny rpc's round trip: the per-call cost of gRPC on the socket, whatever the tensors.
    const listModelsMs: Partial<Record<PathName, number>> = {};
    const grpcJsTimes: number[] = [];
    for (let i = 0; i < LIST_MODELS_CALLS; i++) {
      const started = performance.now();
      await agent.client.listModels();
      grpcJsTimes.push(performance.now() - started);
    }
    listModelsMs.agent = median(grpcJsTimes);
    if (grpcio) listModelsMs.grpcio = median(await grpcio.listModels(LIST_MODELS_CALLS));
    return {
      readyMs,
      listModelsMs,
      memory: { idle, modelsLoaded: loaded, afterInference: agent.memory() },
      models,
      onnxRuntimeVersion: runtime.version,
      grpcioVersion: grpcio?.version,
    };
  } finally {
    await grpcio?.stop();
    await agent.stop();
    for (const release of releases) await release();
    runtime.close();
  }
}

function printDefault(report: Awaited<ReturnType<typeof defaultMode>>): void {
  const rows: string[][] = [];
  const versus: string[][] = [];
  for (const m of report.models) {
    const reference = m.paths.reference;
    for (const [path, s] of Object.entries(m.paths)) {
      rows.push([m.model, PATH_LABELS[path as PathName], String(s.n), ms(s.p50), ms(s.p99), ms(s.cpuMsPerCall)]);
      if (path === "reference") continue;
      const target = TARGETS[m.model];
      // The targets are the agent's, whichever client calls it; ffi only shows what gRPC adds.
      const targeted = path !== "ffi";
      versus.push([
        m.model,
        `${path} / in-process`,
        ratio(s.p50 / reference.p50),
        ratio(s.p99 / reference.p99),
        signedMs(s.p50 - reference.p50),
        signedMs(s.p99 - reference.p99),
        targeted ? target.text : "(diagnostic)",
        targeted ? (target.met(s.p50, reference.p50) ? "met" : "MISSED") : "",
      ]);
    }
  }
  console.log(
    `\nEvery path: ONNX Runtime ${report.onnxRuntimeVersion}, ${choiceLabel(DEFAULT_CHOICE)} (agent defaults)` +
      (report.grpcioVersion ? `; Python grpcio ${report.grpcioVersion}` : ""),
  );
  console.log("\nLatency per Predict (ms); cpu/inf = CPU time of the process running the model, per call");
  console.log(table(["model", "path", "n", "p50", "p99", "cpu/inf"], rows, 2));
  console.log("\nAgainst onnxruntime-node in-process");
  console.log(
    table(["model", "path", "p50 ratio", "p99 ratio", "p50 delta", "p99 delta", "target", "result"], versus, 2),
  );

  const split = report.models.map((m) => {
    const s = m.split;
    return [
      m.model,
      ms(s.clientTotalMs),
      ms(s.clientRequestEncodeMs),
      ms(s.agentRequestDecodeMs),
      ms(s.agentHandlerMs),
      ms(s.agentBindMs),
      ms(s.agentRunMs),
      ms(s.agentResponseEncodeMs),
      ms(s.agentHandlerOtherMs),
      ms(s.clientResponseDecodeMs),
      ms(s.transportMs),
      `${s.callsWithCopiedInputs}/${s.n}`,
    ];
  });
  console.log("\nWhere an agent Predict's time goes, grpc-js client (medians, ms)");
  console.log(
    table([
      "model",
      "client total",
      "req encode",
      "req decode",
      "handler",
      "bind",
      "run",
      "resp encode",
      "handler other",
      "resp decode",
      "transport",
      "copied inputs",
    ], split),
  );
  console.log(
    "  handler = bind + run + resp encode + handler other: the agent's own log lines (run includes the hop to\n" +
      "  ORT's thread; copied inputs: calls whose input bytes were unaligned, as the agent counts them).\n" +
      "  req encode, req decode (agent side) and resp decode (client side): protobufjs on the same messages,\n" +
      "  timed in-process. transport = client total - agent handler - those three: gRPC, HTTP/2, the socket.",
  );
  for (const m of report.models) {
    const g = m.grpcioSplit;
    if (!g) continue;
    console.log(
      `  grpcio client, ${m.model}: total ${ms(g.clientTotalMs)} ms, agent handler ${ms(g.agentHandlerMs)} ms, ` +
        `the rest (grpcio, codecs, transport) ${ms(g.outsideHandlerMs)} ms (medians)`,
    );
  }
  const listModels = Object.entries(report.listModelsMs).map(([path, t]) => `${ms(t)} ms from ${CLIENTS[path]}`);
  console.log(`  for scale: a ListModels round trip (no tensors) takes ${listModels.join(", ")} (medians)`);
  for (const m of report.models) {
    const diffs = Object.entries(m.maxAbsDiffVsReference).map(([path, d]) => `max |${path} - reference| ${d}`);
    console.log(`  output check ${m.model}: ${diffs.join(", ")}`);
  }

  const mem = report.memory;
  console.log("\nAgent process");
  console.log(
    `  spawn -> "serving": median ${ms(median(report.readyMs))} ms over ${report.readyMs.length} starts ` +
      `(${report.readyMs.map(ms).join(", ")})`,
  );
  console.log(
    `  RSS: idle ${mem.idle.rssMiB.toFixed(1)} MiB, cls + det loaded ${mem.modelsLoaded.rssMiB.toFixed(1)} MiB, ` +
      `after the benchmark ${mem.afterInference.rssMiB.toFixed(1)} MiB (peak ${
        mem.afterInference.hwmMiB.toFixed(1)
      } MiB)`,
  );
}

async function sweepMode(workspace: Workspace, { blocks }: Plan) {
  const rows = [];
  for (const choice of SWEEP_CHOICES) {
    console.log(`sweep: ${choiceLabel(choice)}`);
    const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, agentConfigKeys(choice));
    const references: ReferenceRunner[] = [];
    let grpcio: GrpcioClient | null = null;
    try {
      grpcio = await startGrpcio(workspace, agent);
      for (const model of workspace.models) {
        const reference = await ReferenceRunner.create(model, choice);
        references.push(reference);
        const agentRunner = await AgentRunner.create(model, agent, workspace.urls[model.key]);
        const viaGrpcio = grpcio && await GrpcioRunner.create(grpcio, agentRunner, workspace.dir);
        const clients = viaGrpcio ? [agentRunner, viaGrpcio] : [agentRunner];
        const [r, ...c] = await runBlocks([reference, ...clients], blocks[model.key]);
        rows.push({
          choice,
          model: model.key,
          reference: { ...summary(r), latencies: r.latencies },
          clients: clients.map((runner, i) => ({
            path: runner.path,
            ...summary(c[i]),
            latencies: c[i].latencies,
            agentRunMs: median(runner.splits.map((s) => s.runMs)),
          })),
        });
      }
    } finally {
      await grpcio?.stop();
      await agent.stop();
      for (const reference of references) await reference.release();
    }
  }
  return { rows };
}

function printSweep(report: Awaited<ReturnType<typeof sweepMode>>): void {
  for (const { key } of MODELS) {
    const target = TARGETS[key];
    // One row per client; the options and reference figures only on each setting's first.
    const rows = report.rows.filter((r) => r.model === key).flatMap((r) =>
      r.clients.map((a, i) => [
        ...(i === 0
          ? [choiceLabel(r.choice), ms(r.reference.p50), ms(r.reference.p99), ms(r.reference.cpuMsPerCall)]
          : ["", "", "", ""]),
        CLIENTS[a.path],
        ms(a.p50),
        ms(a.p99),
        ms(a.cpuMsPerCall),
        ms(a.agentRunMs),
        ratio(a.p50 / r.reference.p50),
        signedMs(a.p50 - r.reference.p50),
        target.met(a.p50, r.reference.p50) ? "met" : "MISSED",
      ])
    );
    const n = report.rows.find((r) => r.model === key)!;
    console.log(
      `\n${key}: ms, n = ${n.reference.n} per path; cpu/inf = CPU time of the model's process per call; target ${target.text}`,
    );
    console.log(
      table([
        "ONNX Runtime options",
        "ref p50",
        "ref p99",
        "ref cpu/inf",
        "client",
        "agent p50",
        "agent p99",
        "agent cpu/inf",
        "agent run",
        "p50 ratio",
        "p50 delta",
        "target",
      ], rows),
    );
  }
}

/** Six significant digits: more than the clocks resolve, and the file stays readable. */
function forJson(value: unknown): string {
  return JSON.stringify(value, (_key, v) => (typeof v === "number" ? Number(v.toPrecision(6)) : v), 1);
}

function machine() {
  return {
    cpu: /^model name\s*:\s*(.*)$/m.exec(readProc("/proc/cpuinfo"))?.[1] ?? "unknown",
    logicalCpus: navigator.hardwareConcurrency,
    kernel: Deno.osRelease(),
    deno: Deno.version.deno,
    onnxruntimeNode: ort.env.versions.node,
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { quick: { type: "boolean", default: false }, sweep: { type: "boolean", default: false } },
    strict: true,
  });
  const mode = values.sweep ? "sweep" : "default";
  const plan = PLANS[mode + (values.quick ? "Quick" : "")];
  const started = performance.now();
  const startedAt = new Date();
  const host = machine();
  console.log(
    `Predict benchmark, ${mode}${values.quick ? " --quick" : ""}: ${host.cpu}, ${host.logicalCpus} logical CPUs, ` +
      `Deno ${host.deno}, onnxruntime-node ${host.onnxruntimeNode}`,
  );
  const workspace = await prepare();
  let results;
  try {
    if (values.sweep) {
      const report = await sweepMode(workspace, plan);
      printSweep(report);
      results = report;
    } else {
      const report = await defaultMode(workspace, plan);
      printDefault(report);
      results = report;
    }
  } finally {
    await Deno.remove(workspace.dir, { recursive: true });
  }
  const seconds = (performance.now() - started) / 1000;
  console.log(`\n${mode}${values.quick ? " --quick" : ""} run took ${seconds.toFixed(0)} s`);

  await mkdir(RESULTS_DIR, { recursive: true });
  const stamp = startedAt.toISOString().replace(/[:.]/g, "-");
  const file = join(RESULTS_DIR, `predict-${mode}${values.quick ? "-quick" : ""}-${stamp}.json`);
  await Deno.writeTextFile(
    file,
    forJson({ mode, quick: values.quick, startedAt, seconds, machine: host, plan, results }) + "\n",
  );
  console.log(`figures: ${file}`);
}

if (import.meta.main) await main();
