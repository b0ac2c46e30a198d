// The ways a benchmark call reaches ONNX Runtime, behind one interface, and the block schedule that
// alternates them.

import { join } from "node:path";
import process from "node:process";
import * as ort from "onnxruntime-node";
import { ElementType, type OnnxRuntime, Session, Value } from "../ffi/onnxruntime.ts";
import { type GraphOptimization, parseConfig } from "../src/config.ts";
import { sessionOptions } from "../src/inference/runtime.ts";
import { enumValues, type OutputLocation, type Tensor } from "../src/service/wire.ts";
import { type AgentProcess, type PredictLog, readProc } from "./agent_process.ts";
import type { GrpcioClient, NaiveNodePeer } from "./grpcio.ts";

export type PathName =
  | "reference"
  | "agent"
  | "agentSysv"
  | "agentPosix"
  | "agentSysvInOut"
  | "ownClient"
  | "grpcio"
  | "grpcioSysv"
  | "nodeGrpcJs"
  | "nodeGrpcJsSysv"
  | "nodeGrpcJsPosix"
  | "naiveNode"
  | "ffi";

/** Where an agent path's input tensor travels: in the message, or as a handle to a segment filled once. */
export type InputSource = { kind: "bytes" } | { kind: "sysv" | "posix"; segmentId: number };

/** A segment the agent writes the first output into (output_locations), and how to read it back. */
export interface OutputSegment {
  segmentId: number;
  read(offset: number, length: number): Uint8Array;
}

export interface ModelCase {
  key: string;
  file: string;
  shape: number[];
  input: Float32Array;
}

/** ONNX Runtime options under test; every path gets the same ones. */
export interface OrtChoice {
  intraOpThreads: number;
  allowSpinning: boolean;
  graphOptimization: GraphOptimization;
}

export function agentConfigKeys(choice: OrtChoice): Record<string, unknown> {
  return {
    edge_agent_intra_op_threads: choice.intraOpThreads,
    edge_agent_allow_spinning: choice.allowSpinning,
    edge_agent_graph_optimization: choice.graphOptimization,
  };
}

export function choiceLabel(choice: OrtChoice): string {
  return `intra ${choice.intraOpThreads}, spin ${choice.allowSpinning ? "on" : "off"}, opt ${choice.graphOptimization}`;
}

export interface Sample {
  ms: number;
  measured: boolean;
}

export interface Runner {
  readonly path: PathName;
  readonly model: ModelCase;
  /** `count` inferences back to back, each timed until its outputs are in the client's memory; ms each. */
  timeCalls(count: number): Promise<number[]>;
  /** CPU time (ms) used so far by the process that runs the model. */
  cpuMs(): number;
  /** First output of one inference, for the cross-check between paths. */
  output(): Promise<Float32Array>;
  /** Sees every block's samples, warm-up included, right after the block. */
  afterBlock?(block: Sample[]): Promise<void>;
}

/** Times `count` calls of `infer` in this process. */
async function timeEach(count: number, infer: () => Promise<unknown>): Promise<number[]> {
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    const started = performance.now();
    await infer();
    times.push(performance.now() - started);
  }
  return times;
}

function ownCpuMs(): number {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}

function elementCount(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function bytesOf(data: Float32Array): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** Generates [-1, 1) floats from `seed` (mulberry32), the same on every run. */
export function pseudoRandomInput(shape: number[], seed: number): Float32Array {
  const data = new Float32Array(elementCount(shape));
  let state = seed >>> 0;
  for (let i = 0; i < data.length; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = Math.imul(state ^ (state >>> 15), state | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    data[i] = (((t ^ (t >>> 14)) >>> 0) / 2 ** 32) * 2 - 1;
  }
  return data;
}

/** onnxruntime-node's session.run in this process: the in-process reference. */
export class ReferenceRunner implements Runner {
  readonly path = "reference";
  readonly #feeds: Record<string, ort.Tensor>;

  private constructor(readonly model: ModelCase, readonly session: ort.InferenceSession) {
    this.#feeds = { [session.inputNames[0]]: new ort.Tensor("float32", model.input, model.shape) };
  }

  static async create(model: ModelCase, choice: OrtChoice): Promise<ReferenceRunner> {
    const spinning = choice.allowSpinning ? "1" : "0";
    const session = await ort.InferenceSession.create(model.file, {
      intraOpNumThreads: choice.intraOpThreads,
      // The agent's default; it only matters in parallel execution mode, which neither uses.
      interOpNumThreads: 1,
      graphOptimizationLevel: choice.graphOptimization === "disable" ? "disabled" : choice.graphOptimization,
      extra: { session: { intra_op: { allow_spinning: spinning }, inter_op: { allow_spinning: spinning } } },
    });
    return new ReferenceRunner(model, session);
  }

  timeCalls(count: number): Promise<number[]> {
    return timeEach(count, () => this.session.run(this.#feeds));
  }

  cpuMs(): number {
    return ownCpuMs();
  }

  async output(): Promise<Float32Array> {
    const outputs = await this.session.run(this.#feeds);
    return outputs[this.session.outputNames[0]].data as Float32Array;
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

/** Our bindings in this process, doing what the agent's Predict does minus gRPC and protobuf. */
export class FfiRunner implements Runner {
  readonly path = "ffi";
  readonly #bytes: Uint8Array;

  private constructor(readonly model: ModelCase, readonly ort: OnnxRuntime, readonly session: Session) {
    this.#bytes = bytesOf(model.input);
  }

  static async create(model: ModelCase, runtime: OnnxRuntime, choice: OrtChoice): Promise<FfiRunner> {
    const options = sessionOptions(runtime, parseConfig(agentConfigKeys(choice)).config);
    try {
      return new FfiRunner(model, runtime, await Session.create(runtime, await Deno.readFile(model.file), options));
    } finally {
      options.release();
    }
  }

  async #run(): Promise<Uint8Array[]> {
    const input = Value.tensorOver(this.ort, this.#bytes, this.model.shape, ElementType.FLOAT);
    let outputs: Value[] = [];
    try {
      outputs = await this.session.run([0], [input]);
      // Copied out, as onnxruntime-node does; both models' outputs are float32.
      return outputs.map((value) => value.borrowBytes(4 * elementCount(value.tensorInfo().shape)).slice());
    } finally {
      for (const value of outputs) value.release();
      input.release();
    }
  }

  timeCalls(count: number): Promise<number[]> {
    return timeEach(count, () => this.#run());
  }

  cpuMs(): number {
    return ownCpuMs();
  }

  async output(): Promise<Float32Array> {
    return new Float32Array((await this.#run())[0].buffer);
  }

  release(): void {
    this.session.release();
  }
}

/** Time split of one measured agent call: the client's total and the agent's own log line. */
export interface AgentSplit extends PredictLog {
  totalMs: number;
  /** The client's protobufjs encoding of the request and decoding of the response (Node client only). */
  clientEncodeMs?: number;
  clientDecodeMs?: number;
}

/** Pairs a block's calls with the agent's Predict log lines, which come in call order. */
async function pairSplits(
  agent: AgentProcess,
  block: Sample[],
  splits: AgentSplit[],
  codec: { encode: number[]; decode: number[] } | null = null,
): Promise<void> {
  const logs = await agent.takePredicts(block.length);
  block.forEach((sample, i) => {
    if (!sample.measured) return;
    const codecMs = codec ? { clientEncodeMs: codec.encode[i], clientDecodeMs: codec.decode[i] } : {};
    splits.push({ totalMs: sample.ms, ...logs[i], ...codecMs });
  });
}

const AGENT_PATHS = { bytes: "agent", sysv: "agentSysv", posix: "agentPosix" } as const;

type Caller = Pick<AgentProcess["client"], "predict">;

/** Predict through a client in this process (grpc-js, or the product's own) to the agent subprocess. */
export class AgentRunner implements Runner {
  readonly path: PathName;
  readonly splits: AgentSplit[] = [];
  readonly tensors: Tensor[];
  readonly #caller: Caller;
  readonly #outputLocations: OutputLocation[] | undefined;

  private constructor(
    readonly model: ModelCase,
    readonly agent: AgentProcess,
    readonly inputName: string,
    readonly source: InputSource,
    ownClient = false,
    readonly outputSegment?: OutputSegment,
  ) {
    this.path = ownClient ? "ownClient" : outputSegment ? "agentSysvInOut" : AGENT_PATHS[source.kind];
    // Size 0: the room is the whole segment.
    this.#outputLocations = outputSegment &&
      [{ index: 0, shared_memory_handle: { segment_id: outputSegment.segmentId, offset: 0, size: 0 } }];
    this.#caller = ownClient ? agent.ownClient : agent.client;
    const tensor_metadata = {
      name: new TextEncoder().encode(inputName),
      data_type: enumValues("DataType").FLOAT32,
      shape: model.shape,
    };
    this.tensors = [
      source.kind === "bytes" ? { tensor_metadata, byte_data: bytesOf(model.input) } : {
        tensor_metadata,
        shared_memory_handle: { size: model.input.byteLength, offset: 0, segment_id: source.segmentId },
      },
    ];
  }

  /** Loads `url` under the model's key as its name; the runner sends the input as bytes. */
  static async create(model: ModelCase, agent: AgentProcess, url: string): Promise<AgentRunner> {
    const { model: loaded } = await agent.client.loadModel(url, model.key);
    return new AgentRunner(model, agent, new TextDecoder().decode(loaded.input_tensor_metadatas[0].name), {
      kind: "bytes",
    });
  }

  /** The same agent and model, the input sent as a handle to a segment that already holds it. */
  viaSharedMemory(source: InputSource & { kind: "sysv" | "posix" }): AgentRunner {
    return new AgentRunner(this.model, this.agent, this.inputName, source);
  }

  /** Input from a SysV segment as viaSharedMemory, and the first output written into `output`. */
  viaSharedMemoryInOut(source: InputSource & { kind: "sysv" }, output: OutputSegment): AgentRunner {
    return new AgentRunner(this.model, this.agent, this.inputName, source, false, output);
  }

  /** The same agent, model and input, called through the product's own client (`edge-agent client`). */
  viaOwnClient(): AgentRunner {
    return new AgentRunner(this.model, this.agent, this.inputName, this.source, true);
  }

  timeCalls(count: number): Promise<number[]> {
    return timeEach(count, () => this.#caller.predict(this.model.key, this.tensors, this.#outputLocations));
  }

  /** One Predict outside the blocks, its log line set aside so later blocks still pair up. */
  async call(): Promise<{ tensors: Tensor[] }> {
    const response = await this.#caller.predict(this.model.key, this.tensors, this.#outputLocations);
    await this.agent.takePredicts(1);
    return response;
  }

  cpuMs(): number {
    return this.agent.cpuMs();
  }

  async output(): Promise<Float32Array> {
    const { tensors } = await this.call();
    if (this.outputSegment) {
      const bytes = this.outputSegment.read(0, Number(tensors[0].shared_memory_handle!.size));
      return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    }
    // A copy: byte_data is a Buffer view into the received message, at any alignment.
    return new Float32Array(new Uint8Array(tensors[0].byte_data!).buffer);
  }

  afterBlock(block: Sample[]): Promise<void> {
    return pairSplits(this.agent, block, this.splits);
  }
}

/**
 * Predict from the Python grpcio client (or the grpc-js client under Node) to the same agent and model as an
 * AgentRunner, timed in that process around each call; the input as bytes, or as a handle to a SysV segment
 * that already holds it.
 */
export class GrpcioRunner implements Runner {
  readonly path: PathName;
  readonly model: ModelCase;
  readonly splits: AgentSplit[] = [];
  readonly #agent: AgentProcess;
  readonly #inputName: string;
  readonly #inputFile: string;
  readonly #outputFile: string;
  readonly #segmentId?: number;

  private constructor(
    readonly client: GrpcioClient,
    grpcJs: AgentRunner,
    dir: string,
    sysvSegmentId?: number,
    node: InputSource | null = null,
  ) {
    this.path = node
      ? { bytes: "nodeGrpcJs", sysv: "nodeGrpcJsSysv", posix: "nodeGrpcJsPosix" }[node.kind] as PathName
      : sysvSegmentId === undefined
      ? "grpcio"
      : "grpcioSysv";
    this.model = grpcJs.model;
    this.#agent = grpcJs.agent;
    this.#inputName = grpcJs.inputName;
    this.#inputFile = join(dir, `${this.model.key}.input.bin`);
    this.#outputFile = join(dir, `${this.model.key}.${this.path}-output.bin`);
    this.#segmentId = node && node.kind !== "bytes" ? node.segmentId : sysvSegmentId;
  }

  /** Tensors go to and from Python as raw float32 files in `dir` (the input only when sent as bytes). */
  static async create(
    client: GrpcioClient,
    grpcJs: AgentRunner,
    dir: string,
    sysvSegmentId?: number,
  ): Promise<GrpcioRunner> {
    const runner = new GrpcioRunner(client, grpcJs, dir, sysvSegmentId);
    if (sysvSegmentId === undefined) await Deno.writeFile(runner.#inputFile, bytesOf(runner.model.input));
    return runner;
  }

  /**
   * Through the grpc-js client under Node (GrpcioClient.startNode), the input as bytes or as a handle to a
   * SysV segment or POSIX object that already holds it.
   */
  static async createNode(
    client: GrpcioClient,
    grpcJs: AgentRunner,
    dir: string,
    source: InputSource = { kind: "bytes" },
  ): Promise<GrpcioRunner> {
    const runner = new GrpcioRunner(client, grpcJs, dir, undefined, source);
    if (source.kind === "bytes") await Deno.writeFile(runner.#inputFile, bytesOf(runner.model.input));
    return runner;
  }

  #predict(count: number, output?: string): Promise<number[]> {
    const { key: name, shape } = this.model;
    return this.client.predict({
      name,
      input: this.#inputFile,
      segmentId: this.#segmentId,
      inputName: this.#inputName,
      shape,
      count,
      output,
    });
  }

  timeCalls(count: number): Promise<number[]> {
    return this.#predict(count);
  }

  /** The same calls from another grpcio client (e.g. on another server's socket); the agent sees none of them. */
  timeCallsOn(client: GrpcioClient, count: number): Promise<number[]> {
    const { key: name, shape } = this.model;
    return client.predict({ name, input: this.#inputFile, inputName: this.#inputName, shape, count });
  }

  cpuMs(): number {
    return this.#agent.cpuMs();
  }

  /** One Predict outside the blocks (its log line set aside, as AgentRunner.call does). */
  async output(): Promise<Float32Array> {
    await this.#predict(1, this.#outputFile);
    await this.#agent.takePredicts(1);
    const bytes = await Deno.readFile(this.#outputFile);
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  }

  afterBlock(block: Sample[]): Promise<void> {
    return pairSplits(this.#agent, block, this.splits, this.client.lastCodecMs);
  }
}

/**
 * Predict from the grpc-js client under Node to a naive agent under Node (bench/naive_node_peer.mjs: grpc-js
 * server + onnxruntime-node), the input as bytes: the plain Node peer the agent should beat for Node clients.
 */
export class NaiveNodeRunner implements Runner {
  readonly path = "naiveNode";
  readonly #inputFile: string;
  readonly #outputFile: string;

  private constructor(
    readonly model: ModelCase,
    readonly peer: NaiveNodePeer,
    readonly inputName: string,
    dir: string,
  ) {
    this.#inputFile = join(dir, `${model.key}.naive-input.bin`);
    this.#outputFile = join(dir, `${model.key}.naive-output.bin`);
  }

  static async create(model: ModelCase, peer: NaiveNodePeer, inputName: string, dir: string): Promise<NaiveNodeRunner> {
    const runner = new NaiveNodeRunner(model, peer, inputName, dir);
    await Deno.writeFile(runner.#inputFile, bytesOf(model.input));
    return runner;
  }

  #predict(count: number, output?: string): Promise<number[]> {
    const { key: name, shape } = this.model;
    return this.peer.client.predict({ name, input: this.#inputFile, inputName: this.inputName, shape, count, output });
  }

  timeCalls(count: number): Promise<number[]> {
    return this.#predict(count);
  }

  cpuMs(): number {
    const stat = readProc(`/proc/${this.peer.pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // utime + stime, in USER_HZ (100 a second).
    return (Number(fields[11]) + Number(fields[12])) * 10;
  }

  async output(): Promise<Float32Array> {
    await this.#predict(1, this.#outputFile);
    const bytes = await Deno.readFile(this.#outputFile);
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  }
}

export interface BlockPlan {
  /** Unmeasured calls per path before the first block. */
  warmup: number;
  /**
   * Full turns of the rotation: each round runs one block per path, in an order rotated by one each round,
   * and a turn is as many rounds as paths, so each path holds each position equally often.
   */
  rotations: number;
  blockSize: number;
  /** Unmeasured calls at the start of each block, so the path before it has let go of the cores. */
  blockWarmup: number;
}

export interface PathResult {
  latencies: number[];
  /** CPU time of the model's process per call, over every block (warm-up calls included in both). */
  cpuMsPerCall: number;
}

async function runBlock(runner: Runner, calls: number, unmeasured: number): Promise<Sample[]> {
  const block = (await runner.timeCalls(calls)).map((ms, i) => ({ ms, measured: i >= unmeasured }));
  await runner.afterBlock?.(block);
  return block;
}

/**
 * Runs blocks of calls per path rather than interleaving single calls: ORT's workers spin for a while
 * after each run, so a call right after another path's run would measure that contention.
 */
export async function runBlocks(runners: Runner[], plan: BlockPlan): Promise<PathResult[]> {
  for (const runner of runners) await runBlock(runner, plan.warmup, plan.warmup);
  const results = runners.map(() => ({ latencies: [] as number[], cpuMs: 0, calls: 0 }));
  for (let round = 0; round < plan.rotations * runners.length; round++) {
    for (let k = 0; k < runners.length; k++) {
      const index = (round + k) % runners.length;
      const runner = runners[index];
      const cpuBefore = runner.cpuMs();
      const block = await runBlock(runner, plan.blockWarmup + plan.blockSize, plan.blockWarmup);
      results[index].cpuMs += runner.cpuMs() - cpuBefore;
      results[index].calls += block.length;
      results[index].latencies.push(...block.filter((s) => s.measured).map((s) => s.ms));
    }
  }
  return results.map((r) => ({ latencies: r.latencies, cpuMsPerCall: r.cpuMs / r.calls }));
}
