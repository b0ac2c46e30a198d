// Predict latency of the agent against onnxruntime-node in-process, on PaddleOCR cls and det.
//
//   default   reference (onnxruntime-node) / agent (gRPC over the Unix socket, from the grpc-js client in this
//             process, from a Python grpcio client and from grpc-js under Node; the input as bytes in the message
//             or as a handle to a SysV segment or POSIX object) / ffi (our bindings in this process) side by side,
//             where the agent's time goes, the transport against a raw socket exchange, what mapping a segment
//             per request costs, start-up time and memory
//   --sweep   agent (both clients) and reference under several ONNX Runtime settings, with CPU time per inference
//   --quick   fewer calls (about 30 s for the default mode)
//
// Prints tables and writes the figures to bench/results/.

import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import * as ort from "onnxruntime-node";
import { OnnxRuntime } from "../ffi/onnxruntime.ts";
import { npmLibraryPath } from "../src/inference/runtime.ts";
import { DEFAULTS } from "../src/config.ts";
import { asBuffer, messageType, type Tensor } from "../src/service/wire.ts";
import { PADDLE_CLS, PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess, readProc } from "./agent_process.ts";
import { captureBenchmark, printCaptures } from "./capture_bench.ts";
import { concurrencyBenchmark } from "./concurrency_bench.ts";
import { loadBenchmark, printLoads } from "./load_bench.ts";
import { generateStubs, GrpcioClient, grpcioMissing, NaiveNodePeer, nodeMissing } from "./grpcio.ts";
import {
  agentConfigKeys,
  AgentRunner,
  type AgentSplit,
  type BlockPlan,
  choiceLabel,
  FfiRunner,
  GrpcioRunner,
  type ModelCase,
  NaiveNodeRunner,
  type OrtChoice,
  type PathName,
  type PathResult,
  pseudoRandomInput,
  ReferenceRunner,
  runBlocks,
  type Runner,
} from "./runners.ts";
import { BenchSegments, mappingCosts } from "./shared_memory.ts";
import {
  compareTransport,
  type ListModelsFigures,
  listModelsRoundTrips,
  MinimalPeer,
  printTransport,
  QuietAgent,
  RawExchange,
  type TransportFigures,
} from "./transport.ts";
import { median, ms, percentile, ratio, signedMs, table, us } from "./stats.ts";
import {
  describeRss,
  printStartupCosts,
  type ReferenceMemory,
  referenceMemory,
  rssBreakdown,
  startupCosts,
} from "./startup_costs.ts";
// Imported as `targets`: this file has a summary() of its own (latency figures of one path).
import { ROW, summary as targets } from "./summary.ts";

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

type Transport = "bytes" | "shm";

/** Per model and how the input reaches the agent; shm saves the copies, so its targets are tighter. */
const TARGETS: Record<string, Record<Transport, Target>> = {
  cls: {
    bytes: { text: "p50 <= in-process + 1.0 ms", met: (agent, reference) => agent <= reference + 1.0 },
    shm: { text: "p50 <= in-process + 0.5 ms", met: (agent, reference) => agent <= reference + 0.5 },
  },
  det: {
    bytes: { text: "p50 <= 1.5x in-process", met: (agent, reference) => agent <= 1.5 * reference },
    shm: { text: "p50 <= 1.05x in-process", met: (agent, reference) => agent <= 1.05 * reference },
  },
};

/** Inputs and outputs by shared memory: only the Run is left, so the target is the tightest. */
const SHM_IN_OUT_TARGETS: Record<string, Target> = {
  det: { text: "p50 <= 1.02x in-process", met: (agent, reference) => agent <= 1.02 * reference },
};

/** Node applications' own targets for the grpc-js client under Node (bytes), where tighter than TARGETS. */
const NODE_TARGETS: Record<string, Target> = {
  det: { text: "p50 <= 1.25x in-process", met: (agent, reference) => agent <= 1.25 * reference },
};

interface Plan {
  /** Agent starts timed for spawn -> "serving". */
  starts: number;
  /** Per model key. */
  blocks: Record<string, BlockPlan>;
  /** Iterations of each shared memory mapping loop (default mode). */
  mappingIterations: number;
  /** Rounds of the transport comparison (det from grpcio, raw exchange, minimal peer; 5 calls each). */
  transportRounds: number;
}

// Plans give whole rotations, so every path holds every position equally however many paths run (7 in
// default mode, 3 in the sweep; fewer without grpcio). Default mode's det blocks take most of its time; short
// ones spread bursts of load from other processes over every path rather than a few blocks.
const PLANS: Record<string, Plan> = {
  default: {
    starts: 5,
    blocks: {
      cls: { warmup: 20, rotations: 4, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 3, rotations: 4, blockSize: 5, blockWarmup: 1 },
    },
    mappingIterations: 1000,
    transportRounds: 8,
  },
  defaultQuick: {
    starts: 3,
    blocks: {
      cls: { warmup: 10, rotations: 1, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 2, rotations: 1, blockSize: 4, blockWarmup: 1 },
    },
    mappingIterations: 200,
    transportRounds: 3,
  },
  sweep: {
    starts: 0,
    blocks: {
      cls: { warmup: 10, rotations: 3, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 2, rotations: 2, blockSize: 8, blockWarmup: 2 },
    },
    mappingIterations: 0,
    transportRounds: 0,
  },
  sweepQuick: {
    starts: 0,
    blocks: {
      cls: { warmup: 5, rotations: 1, blockSize: 20, blockWarmup: 2 },
      det: { warmup: 1, rotations: 1, blockSize: 5, blockWarmup: 1 },
    },
    mappingIterations: 0,
    transportRounds: 0,
  },
};

const PATH_LABELS: Record<PathName, string> = {
  reference: "reference (onnxruntime-node, in-process)",
  agent: "agent, bytes (grpc-js client, in-process)",
  agentSysv: "agent, SysV shm (grpc-js client, in-process)",
  agentPosix: "agent, POSIX shm (grpc-js client, in-process)",
  agentSysvInOut: "agent, SysV shm in and out (grpc-js client, in-process)",
  ownClient: "agent, bytes (edge-agent client, in-process)",
  grpcio: "agent, bytes (grpcio client, Python)",
  grpcioSysv: "agent, SysV shm (grpcio client, Python)",
  nodeGrpcJs: "agent, bytes (grpc-js client, Node)",
  nodeGrpcJsSysv: "agent, SysV shm (grpc-js client, Node)",
  nodeGrpcJsPosix: "agent, POSIX shm (grpc-js client, Node)",
  naiveNode: "naive Node agent, bytes (grpc-js client, Node)",
  ffi: "ffi (our bindings, in-process)",
};

/** The agent's client on each path that goes through gRPC. */
const CLIENTS: Record<string, string> = {
  agent: "grpc-js",
  agentSysv: "grpc-js",
  agentPosix: "grpc-js",
  agentSysvInOut: "grpc-js",
  ownClient: "the edge-agent client",
  grpcio: "grpcio",
  grpcioSysv: "grpcio",
  nodeGrpcJs: "grpc-js under Node",
  nodeGrpcJsSysv: "grpc-js under Node",
  nodeGrpcJsPosix: "grpc-js under Node",
};

/** How each agent path's input reaches the agent; the other paths are in-process. */
const TRANSPORTS: Partial<Record<PathName, Transport>> = {
  agent: "bytes",
  agentSysv: "shm",
  agentPosix: "shm",
  agentSysvInOut: "shm",
  ownClient: "bytes",
  grpcio: "bytes",
  grpcioSysv: "shm",
  nodeGrpcJs: "bytes",
  nodeGrpcJsSysv: "shm",
  nodeGrpcJsPosix: "shm",
};

/** Input column of the split tables. */
const INPUT_LABELS: Partial<Record<PathName, string>> = {
  agent: "bytes",
  agentSysv: "SysV shm",
  agentPosix: "POSIX shm",
  agentSysvInOut: "SysV shm, output too",
  ownClient: "bytes, edge-agent client",
  grpcio: "bytes",
  grpcioSysv: "SysV shm",
  nodeGrpcJs: "bytes",
  nodeGrpcJsSysv: "SysV shm",
  nodeGrpcJsPosix: "POSIX shm",
};

interface Workspace {
  dir: string;
  modelsDir: string;
  models: ModelCase[];
  /** LoadModel url per model key. */
  urls: Record<string, string>;
  /** Folder of the generated Python stubs; null when the grpcio path is skipped. */
  grpcioStubs: string | null;
  /** Whether `node` runs here (the grpc-js client under Node). */
  node: boolean;
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
    urls[key] = await writeModelFolder(modelsDir, key, await Deno.readFile(file));
  }
  const models = MODELS.map(({ key, file, shape, seed }) => ({
    key,
    file,
    shape,
    input: pseudoRandomInput(shape, seed),
  }));
  const missing = await grpcioMissing();
  if (missing) console.log(`grpcio client path skipped: ${missing}`);
  const noNode = await nodeMissing();
  if (noNode) console.log(`grpc-js under Node path skipped: ${noNode}`);
  return { dir, modelsDir, models, urls, grpcioStubs: missing ? null : await generateStubs(dir), node: !noNode };
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
    callsWithShmInputs: splits.filter((s) => s.sharedMemoryInputs > 0).length,
    requestBytes: codec.requestBytes,
    responseBytes: codec.responseBytes,
  };
}

/** A client process's total around the agent's handler; the rest is that client, both codecs and the transport. */
function grpcioSplitSummary(splits: AgentSplit[]) {
  const of = (f: (s: AgentSplit) => number) => median(splits.map(f));
  return {
    n: splits.length,
    clientTotalMs: of((s) => s.totalMs),
    agentHandlerMs: of((s) => s.ms),
    agentBindMs: of((s) => s.bindMs),
    agentRunMs: of((s) => s.runMs),
    outsideHandlerMs: of((s) => s.totalMs - s.ms),
    callsWithCopiedInputs: splits.filter((s) => s.copiedInputs > 0).length,
    callsWithShmInputs: splits.filter((s) => s.sharedMemoryInputs > 0).length,
    // The Node client times its protobufjs work inside each call: the rest is gRPC, HTTP/2 and the socket.
    codec: splits.every((s) => s.clientEncodeMs !== undefined)
      ? {
        clientEncodeMs: of((s) => s.clientEncodeMs!),
        clientDecodeMs: of((s) => s.clientDecodeMs!),
        transportMs: of((s) => s.totalMs - s.ms - s.clientEncodeMs! - s.clientDecodeMs!),
      }
      : null,
  };
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

async function defaultMode(workspace: Workspace, plan: Plan) {
  const segments = new BenchSegments();
  // SysV segments outlive their process, so an interrupted run removes them too.
  const interrupted = () => {
    segments.removeAll();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", interrupted);
  try {
    return await measureDefault(workspace, plan, segments);
  } finally {
    Deno.removeSignalListener("SIGINT", interrupted);
    segments.removeAll();
  }
}

async function measureDefault(
  workspace: Workspace,
  { starts, blocks, mappingIterations, transportRounds }: Plan,
  segments: BenchSegments,
) {
  // One agent serves every path: bytes, SysV ids, and POSIX objects under a prefix unique to this run.
  const keys = { ...agentConfigKeys(DEFAULT_CHOICE), ...segments.agentKeys() };

  console.log(`agent start-up: ${starts} starts, and ${starts} runs of the start-up probe`);
  const readyMs: number[] = [];
  const startupMarks: Record<string, number>[] = [];
  for (let i = 0; i < starts; i++) {
    const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, keys);
    readyMs.push(agent.readyMs);
    if (agent.startupMarks) startupMarks.push(agent.startupMarks);
    await agent.stop();
  }
  const costs = starts > 0 ? await startupCosts(starts) : null;

  const agent = await AgentProcess.start(workspace.dir, workspace.modelsDir, keys);
  const runtime = OnnxRuntime.open(npmLibraryPath());
  const releases: (() => unknown)[] = [];
  let grpcio: GrpcioClient | null = null;
  let node: GrpcioClient | null = null;
  let naive: NaiveNodePeer | null = null;
  try {
    // Let start-up work (module evaluation, grpc-js set-up) settle before calling the process idle.
    await new Promise((resolve) => setTimeout(resolve, 500));
    const idle = agent.memory();
    const idleBreakdown = rssBreakdown(agent.pid);
    const agents: AgentRunner[] = [];
    for (const model of workspace.models) {
      agents.push(await AgentRunner.create(model, agent, workspace.urls[model.key]));
    }
    // Settled too: the agent collects what the loads left behind a second after them (src/agent.ts).
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const loaded = agent.memory();
    const loadedBreakdown = rssBreakdown(agent.pid);
    // The memory target's reference: onnxruntime-node holding the same models, in a process of its own.
    const files = workspace.models.map((m) => m.file);
    const references: ReferenceMemory[] = [await referenceMemory("deno", files, DEFAULT_CHOICE)];
    if (workspace.node) references.push(await referenceMemory("node", files, DEFAULT_CHOICE));
    grpcio = await startGrpcio(workspace, agent);
    node = workspace.node ? await GrpcioClient.startNode(agent.socket) : null;
    // The same Node client against a naive agent under Node (grpc-js server + onnxruntime-node).
    naive = workspace.node
      ? await NaiveNodePeer.start(join(workspace.dir, "naive-node.sock"), workspace.models, DEFAULT_CHOICE)
      : null;

    const models = [];
    let detViaGrpcio: GrpcioRunner | null = null;
    for (const [i, model] of workspace.models.entries()) {
      const segment = segments.add(model.key, model.input);
      const reference = await ReferenceRunner.create(model, DEFAULT_CHOICE);
      releases.push(() => reference.release());
      const ffi = await FfiRunner.create(model, runtime, DEFAULT_CHOICE);
      releases.push(() => ffi.release());
      const grpcJs = [
        agents[i],
        agents[i].viaSharedMemory({ kind: "sysv", segmentId: segment.sysvId }),
        agents[i].viaSharedMemory({ kind: "posix", segmentId: segment.posixId }),
        agents[i].viaSharedMemoryInOut({ kind: "sysv", segmentId: segment.sysvId }, {
          segmentId: segment.sysvOutput.id,
          read: (offset, length) => segment.sysvOutput.read(offset, length),
        }),
      ];
      const viaGrpcio = grpcio
        ? [
          await GrpcioRunner.create(grpcio, agents[i], workspace.dir),
          await GrpcioRunner.create(grpcio, agents[i], workspace.dir, segment.sysvId),
        ]
        : [];
      if (model.key === "det" && viaGrpcio.length > 0) detViaGrpcio = viaGrpcio[0];
      if (node) {
        viaGrpcio.push(
          await GrpcioRunner.createNode(node, agents[i], workspace.dir),
          await GrpcioRunner.createNode(node, agents[i], workspace.dir, { kind: "sysv", segmentId: segment.sysvId }),
          await GrpcioRunner.createNode(node, agents[i], workspace.dir, { kind: "posix", segmentId: segment.posixId }),
        );
      }
      const naiveRunner = naive ? [await NaiveNodeRunner.create(model, naive, agents[i].inputName, workspace.dir)] : [];
      const ownClient = agents[i].viaOwnClient();
      const runners: Runner[] = [reference, ...grpcJs, ownClient, ...viaGrpcio, ...naiveRunner, ffi];
      const expected = await reference.output();
      const diffs: Partial<Record<PathName, number>> = {};
      for (const runner of runners.slice(1)) diffs[runner.path] = maxAbsDiff(await runner.output(), expected);
      const plan = blocks[model.key];
      console.log(
        `${model.key}: ${plan.rotations * runners.length} rounds (${plan.rotations} rotation${
          plan.rotations === 1 ? "" : "s"
        } of ${runners.length} paths) of ${plan.blockSize}-call blocks per path (+${plan.blockWarmup} warm-up)`,
      );
      const results = await runBlocks(runners, plan);
      const splits: Partial<Record<PathName, ReturnType<typeof splitSummary>>> = {};
      for (const runner of [...grpcJs, ownClient]) {
        splits[runner.path] = splitSummary(runner.splits, codecTimes(runner, await runner.call()));
      }
      models.push({
        model: model.key,
        shape: model.shape,
        inputBytes: model.input.byteLength,
        maxAbsDiffVsReference: diffs,
        paths: Object.fromEntries(
          runners.map((r, j) => [r.path, { ...summary(results[j]), latencies: results[j].latencies }]),
        ),
        splits,
        grpcioSplits: Object.fromEntries(viaGrpcio.map((r) => [r.path, grpcioSplitSummary(r.splits)])),
      });
    }
    // A tiny rpc's round trip: the per-call cost of gRPC on the socket, whatever the tensors.
    const listModelsMs: Partial<Record<PathName, number>> = {};
    const roundTrip = async (client: { listModels(): Promise<unknown> }) => {
      const times: number[] = [];
      for (let i = 0; i < LIST_MODELS_CALLS; i++) {
        const started = performance.now();
        await client.listModels();
        times.push(performance.now() - started);
      }
      return median(times);
    };
    listModelsMs.agent = await roundTrip(agent.client);
    listModelsMs.ownClient = await roundTrip(agent.ownClient);
    if (grpcio) listModelsMs.grpcio = median(await grpcio.listModels(LIST_MODELS_CALLS));
    // The transport's share of a det Predict against the same bytes over a bare socket, and grpcio's own cost.
    let transport: TransportFigures | null = null;
    let listModels: ListModelsFigures | null = null;
    if (grpcio && detViaGrpcio && workspace.grpcioStubs) {
      console.log(`transport: ${transportRounds} rounds of det from grpcio, raw exchange and minimal peer`);
      const requestBytes = detViaGrpcio.model.input.byteLength;
      const responseBytes = (await detViaGrpcio.output()).byteLength;
      const raw = await RawExchange.start(workspace.dir, requestBytes, responseBytes);
      let peer: MinimalPeer | null = null;
      let quiet: QuietAgent | null = null;
      try {
        peer = await MinimalPeer.start(workspace.dir, workspace.grpcioStubs, responseBytes / 4);
        const figures = await compareTransport(agent, detViaGrpcio, raw, peer, transportRounds, 5);
        transport = { ...figures, requestBytes, responseBytes };
        quiet = await QuietAgent.start(workspace.dir, workspace.modelsDir, workspace.grpcioStubs, workspace.urls, keys);
        listModels = await listModelsRoundTrips(quiet.client, grpcio, peer, 1000);
      } finally {
        await quiet?.stop();
        await peer?.stop();
        await raw.stop();
      }
    }
    console.log(`shared memory mapping: ${mappingIterations} iterations per loop`);
    const mapping = mappingCosts(segments, mappingIterations);
    return {
      readyMs,
      startupMarks,
      costs,
      listModelsMs,
      transport,
      listModels,
      memory: {
        idle,
        modelsLoaded: loaded,
        afterInference: agent.memory(),
        idleBreakdown,
        loadedBreakdown,
        references,
      },
      models,
      mappingIterations,
      mapping,
      onnxRuntimeVersion: runtime.version,
      grpcioVersion: grpcio?.version,
      grpcJsNodeVersion: node?.version,
    };
  } finally {
    await grpcio?.stop();
    await node?.stop();
    await naive?.stop();
    await agent.stop();
    for (const release of releases) await release();
    runtime.close();
  }
}

function printDefault(report: Awaited<ReturnType<typeof defaultMode>>): void {
  const rows: string[][] = [];
  const versus: string[][] = [];
  const sideBySide: string[][] = [];
  for (const m of report.models) {
    const paths = m.paths as Partial<Record<PathName, ReturnType<typeof summary>>>;
    const reference = paths.reference!;
    for (const [path, s] of Object.entries(paths) as [PathName, ReturnType<typeof summary>][]) {
      rows.push([m.model, PATH_LABELS[path], String(s.n), ms(s.p50), ms(s.p99), ms(s.cpuMsPerCall)]);
      if (path === "reference") continue;
      // The targets are the agent's, whichever client calls it; ffi only shows what gRPC adds.
      const transport = TRANSPORTS[path];
      const target = (path === "nodeGrpcJs" && NODE_TARGETS[m.model]) ||
        (path === "agentSysvInOut" && SHM_IN_OUT_TARGETS[m.model]) || (transport && TARGETS[m.model][transport]);
      versus.push([
        m.model,
        `${path} / in-process`,
        ratio(s.p50 / reference.p50),
        ratio(s.p99 / reference.p99),
        signedMs(s.p50 - reference.p50),
        signedMs(s.p99 - reference.p99),
        target ? target.text : "(diagnostic)",
        target ? (target.met(s.p50, reference.p50) ? "met" : "MISSED") : "",
      ]);
    }
    sideBySide.push([
      m.model,
      ms(reference.p50),
      ms(reference.p99),
      ...(["agent", "agentSysv", "agentPosix"] as const).flatMap((path) => {
        const s = paths[path]!;
        return [ms(s.p50), ms(s.p99), ratio(s.p50 / reference.p50)];
      }),
    ]);
  }
  console.log(
    `\nEvery path: ONNX Runtime ${report.onnxRuntimeVersion}, ${choiceLabel(DEFAULT_CHOICE)} (agent defaults)` +
      (report.grpcioVersion ? `; Python grpcio ${report.grpcioVersion}` : "") +
      (report.grpcJsNodeVersion ? `; grpc-js ${report.grpcJsNodeVersion} under Node` : ""),
  );
  console.log("\nSide by side: in-process vs agent Predict from grpc-js, input as bytes / SysV shm / POSIX shm");
  console.log("(ms; ratio = p50 / in-process p50)");
  console.log(
    table([
      "model",
      "in-proc p50",
      "p99",
      "bytes p50",
      "p99",
      "ratio",
      "SysV p50",
      "p99",
      "ratio",
      "POSIX p50",
      "p99",
      "ratio",
    ], sideBySide),
  );
  console.log("\nLatency per Predict (ms); cpu/inf = CPU time of the process running the model, per call");
  console.log(table(["model", "path", "n", "p50", "p99", "cpu/inf"], rows, 2));
  console.log("\nAgainst onnxruntime-node in-process");
  console.log(
    table(["model", "path", "p50 ratio", "p99 ratio", "p50 delta", "p99 delta", "target", "result"], versus, 2),
  );

  const split = report.models.flatMap((m) =>
    (Object.entries(m.splits) as [PathName, ReturnType<typeof splitSummary>][]).map(([path, s]) => [
      m.model,
      INPUT_LABELS[path]!,
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
      `${s.callsWithShmInputs}/${s.n}`,
    ])
  );
  console.log("\nWhere an agent Predict's time goes, grpc-js client and the edge-agent client (medians, ms)");
  console.log(
    table(
      [
        "model",
        "input",
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
        "shm inputs",
      ],
      split,
      2,
    ),
  );
  console.log(
    "  handler = bind + run + resp encode + handler other: the agent's own log lines (bind includes mapping the\n" +
      "  segment; run includes the hop to ORT's thread and, with shm, the page faults of ORT's first reads of the\n" +
      "  fresh mapping; handler other includes unmapping it; copied inputs: calls whose input bytes were\n" +
      "  unaligned, shm inputs: calls whose input came by shared memory, as the agent counts them).\n" +
      "  req encode, req decode (agent side) and resp decode (client side): protobufjs on the same messages,\n" +
      "  timed in-process. transport = client total - agent handler - those three: gRPC, HTTP/2, the socket.",
  );
  for (const m of report.models) {
    for (const [path, g] of Object.entries(m.grpcioSplits)) {
      const rest = g.codec
        ? `client encode ${ms(g.codec.clientEncodeMs)} ms, client decode ${ms(g.codec.clientDecodeMs)} ms, ` +
          `transport ${ms(g.codec.transportMs)} ms`
        : `the rest (client, codecs, transport) ${ms(g.outsideHandlerMs)} ms`;
      console.log(
        `  ${CLIENTS[path]} client, ${m.model}, ${INPUT_LABELS[path as PathName]}: total ${ms(g.clientTotalMs)} ms, ` +
          `agent handler ${ms(g.agentHandlerMs)} ms (bind ${ms(g.agentBindMs)}, run ${ms(g.agentRunMs)}), ` +
          `${rest} (medians; copied inputs ${g.callsWithCopiedInputs}/${g.n}, shm inputs ` +
          `${g.callsWithShmInputs}/${g.n})`,
      );
    }
    // Node applications' comparison: the agent against a naive agent under Node, from the same Node client.
    const paths = m.paths as Partial<Record<PathName, ReturnType<typeof summary>>>;
    const [agentNode, naiveNode, reference] = [paths.nodeGrpcJs, paths.naiveNode, paths.reference];
    if (agentNode && naiveNode && reference) {
      console.log(
        `  grpc-js under Node, ${m.model}, bytes: agent p50 ${ms(agentNode.p50)} ms (${
          signedMs(agentNode.p50 - reference.p50)
        } ms, ${ratio(agentNode.p50 / reference.p50)} in-process) vs naive Node agent ${ms(naiveNode.p50)} ms (${
          signedMs(naiveNode.p50 - reference.p50)
        } ms, ${ratio(naiveNode.p50 / reference.p50)}): agent below the naive peer: ${
          agentNode.p50 < naiveNode.p50 ? "met" : "MISSED"
        }`,
      );
    }
  }
  const listModels = Object.entries(report.listModelsMs).map(([path, t]) => `${ms(t)} ms from ${CLIENTS[path]}`);
  console.log(`  for scale: a ListModels round trip (no tensors) takes ${listModels.join(", ")} (medians)`);
  if (report.transport) printTransport(report.transport, report.listModels ?? undefined);
  for (const m of report.models) {
    const bytes = m.splits.agent!;
    const deltas = (["agentSysv", "agentPosix"] as const).map((path) => {
      const s = m.splits[path]!;
      return `${INPUT_LABELS[path]} bind ${signedMs(s.agentBindMs - bytes.agentBindMs)}, ` +
        `run ${signedMs(s.agentRunMs - bytes.agentRunMs)}`;
    });
    console.log(`  agent's own time, shm vs bytes, ${m.model}: ${deltas.join("; ")} ms (medians)`);
  }
  for (const m of report.models) {
    const diffs = Object.entries(m.maxAbsDiffVsReference).map(([path, d]) => `max |${path} - reference| ${d}`);
    console.log(`  output check ${m.model}: ${diffs.join(", ")}`);
  }

  const iterations = report.mapping.length > 0 ? report.mappingIterations : 0;
  console.log(
    `\nMapping a segment per request, in this process: SharedMemoryReader.open() + release() (src/inference/shm.ts), ` +
      `${iterations} iterations each (µs per request, p50 unless said)`,
  );
  console.log(
    table(
      [
        "model",
        "segment, reader mode",
        "bytes",
        "pages",
        "open",
        "release",
        "open+release",
        "p99",
        "1st read",
        "read, kept",
        "faults",
        "per page",
        "release after read",
        "per request",
      ],
      report.mapping.map((c) => {
        const faults = c.firstReadUs - c.keptReadUs;
        return [
          c.model,
          c.how,
          String(c.bytes),
          String(c.pages),
          us(c.openUs),
          us(c.releaseUs),
          us(c.cycleUs),
          us(c.cycleP99Us),
          us(c.firstReadUs),
          us(c.keptReadUs),
          us(faults),
          us(faults / c.pages),
          us(c.releaseAfterReadUs),
          us(c.openUs + faults + c.releaseAfterReadUs),
        ];
      }),
      2,
    ),
  );
  console.log(
    "  open: checks, shm_open (+ lseek, mmap, close) or shmctl(IPC_STAT) + shmat, and the view; release: munmap\n" +
      '  or shmdt, of an unread mapping. SysV in "both" mode first misses shm_open on <prefix><id>. 1st read: one\n' +
      "  byte per 4096 of a fresh mapping; faults = 1st read - the same reads on a kept mapping: what the agent\n" +
      "  pays inside ORT's Run when it first reads the input. per request = open + faults + release after read.\n" +
      "  kept: the segment stays attached between requests (edge_agent_sysv_keep_attached_seconds, the agent's\n" +
      "  default): open is shmctl(IPC_STAT) and the view, and the pages are already mapped.",
  );

  const mem = report.memory;
  console.log("\nAgent process");
  console.log(
    `  spawn -> "serving": median ${ms(median(report.readyMs))} ms over ${report.readyMs.length} starts ` +
      `(${report.readyMs.map(ms).join(", ")})`,
  );
  const marks = report.startupMarks;
  if (marks.length > 0) {
    // Each phase's own time: the median of its mark minus the one before, over the starts.
    let previous = "";
    const phases = Object.keys(marks[0]).map((phase) => {
      const took = median(marks.map((m) => m[phase] - (previous ? m[previous] : 0)));
      previous = phase;
      return `${phase} ${ms(took)}`;
    });
    console.log(
      `  in the agent (its start-up log line; ms per phase, medians; modules = from its time origin): ${
        phases.join(", ")
      }`,
    );
  }
  console.log(
    `  RSS: idle ${mem.idle.rssMiB.toFixed(1)} MiB, cls + det loaded ${mem.modelsLoaded.rssMiB.toFixed(1)} MiB, ` +
      `after the benchmark ${mem.afterInference.rssMiB.toFixed(1)} MiB (peak ${
        mem.afterInference.hwmMiB.toFixed(1)
      } MiB)`,
  );
  console.log(`  idle RSS: ${describeRss(mem.idleBreakdown)} MiB`);
  console.log(`  loaded RSS: ${describeRss(mem.loadedBreakdown)} MiB`);
  for (const r of mem.references) {
    console.log(`  reference, onnxruntime-node under ${r.runtime} with cls + det: ${describeRss(r.breakdown)} MiB`);
  }
  if (report.costs) printStartupCosts(report.costs);
}

/** The default run's rows of the summary table. */
function summarizeDefault(report: Awaited<ReturnType<typeof defaultMode>>): void {
  const mem = report.memory;
  targets.add({
    what: ROW.rssIdle,
    measured: `${mem.idle.rssMiB.toFixed(1)} MiB`,
    met: mem.idle.rssMiB <= 80,
  });
  // The stricter reference: the runtime whose process holds the models in less memory.
  const reference = mem.references.reduce((a, b) => (b.rssKiB < a.rssKiB ? b : a));
  const referenceMiB = reference.rssKiB / 1024;
  targets.add({
    what: ROW.rssLoaded,
    measured: `${mem.modelsLoaded.rssMiB.toFixed(1)} MiB (reference under ${reference.runtime}: ${
      referenceMiB.toFixed(1)
    } MiB, so <= ${(referenceMiB + 30).toFixed(1)})`,
    met: mem.modelsLoaded.rssMiB <= referenceMiB + 30,
  });
  const det = report.models.find((m) => m.model === "det");
  const detPaths = det?.paths as Partial<Record<PathName, ReturnType<typeof summary>>> | undefined;
  if (detPaths?.agentSysvInOut && detPaths.reference) {
    const shmRatio = detPaths.agentSysvInOut.p50 / detPaths.reference.p50;
    targets.add({
      what: ROW.detSharedMemory,
      measured: `${ratio(shmRatio)} (SysV, grpc-js client)`,
      met: shmRatio <= 1.02,
    });
  }
  if (report.readyMs.length > 0) {
    const ready = median(report.readyMs);
    targets.add({
      what: ROW.startup,
      measured: `${ms(ready)} ms (median of ${report.readyMs.length})`,
      met: ready <= 200,
    });
  }
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
    const target = TARGETS[key].bytes;
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
      const loadRounds = values.quick ? 3 : 8;
      const loads = await loadBenchmark(loadRounds);
      printLoads(loads, loadRounds);
      const captures = await captureBenchmark(values.quick ? 2 : 5);
      printCaptures(captures);
      summarizeDefault(report);
      const best = captures.acks.filter((a) => a.client === "edge-agent")
        .reduce((a, b) => (b.acksPerSecond > a.acksPerSecond ? b : a));
      targets.add({
        what: ROW.captureAcks,
        measured: `${best.acksPerSecond.toFixed(0)}/s (${best.senders} senders, edge-agent client)`,
        met: best.acksPerSecond >= 10_000,
      });
      const slowdown = captures.predictWithCapturesMs / captures.predictAloneMs;
      targets.add({ what: ROW.predictUnderCaptures, measured: ratio(slowdown), met: slowdown <= 1.1 });
      console.log(
        "\nConcurrent clients on cls (`deno task bench:concurrency` adds the agent's own client and --sweep)",
      );
      await concurrencyBenchmark({
        seconds: values.quick ? 1 : 2,
        rounds: values.quick ? 1 : 2,
        kinds: ["grpcio"],
        sweep: false,
      });
      results = { ...report, loads, captures };
    }
  } finally {
    await Deno.remove(workspace.dir, { recursive: true });
  }
  const seconds = (performance.now() - started) / 1000;
  console.log("\nSummary: the targets, beside what this run measured");
  console.log(targets.render());
  console.log(`\n${mode}${values.quick ? " --quick" : ""} run took ${seconds.toFixed(0)} s`);

  await mkdir(RESULTS_DIR, { recursive: true });
  const stamp = startedAt.toISOString().replace(/[:.]/g, "-");
  const file = join(RESULTS_DIR, `predict-${mode}${values.quick ? "-quick" : ""}-${stamp}.json`);
  await Deno.writeTextFile(
    file,
    forJson({ mode, quick: values.quick, startedAt, seconds, machine: host, plan, results, summary: targets.rows() }) +
      "\n",
  );
  console.log(`figures: ${file}`);
}

if (import.meta.main) await main();
