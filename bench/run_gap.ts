// Where a det Predict with inputs and outputs by SysV shared memory loses time against onnxruntime-node
// in-process: the same Run taken apart step by step, side by side in one run. Blocks of calls alternate
// over many rounds in a rotating order; each path's figure is the median over rounds of its block median
// divided by the reference's block median of the same round, so load that drifts over the run cancels.
//
//   deno run -A bench/run_gap.ts [--rounds N] [--block N] [--model det|cls] [--only a,b,...] [--before DIR]
//
// Besides wall time it prints what a busy machine disturbs less: the CPU time per call of the process
// that runs the model, its minor page faults, and per thread (schedstat) the time on a CPU and the time
// spent runnable but waiting for one, which shows work competing with the Run (e.g. V8's collector).
//
// Paths (in-process unless said):
//   reference    onnxruntime-node's session.run (on the JavaScript thread)
//   referenceBytes  the same, the session made from the model's bytes (as the agent makes it), not its path
//   ffiSync      our bindings, Run called synchronously on the JavaScript thread, output copied out
//   ffi          our bindings, Run as the agent calls it (non-blocking FFI, on Deno's blocking pool)
//   ffiShm       as ffi, the input in a SysV segment and the output written in place into another
//   agent*       the agent over gRPC (grpc-js client), input and output by SysV shared memory; one agent
//                per configuration (agentShared: the defaults; agentOwn: edge_agent_shared_thread_pools off)
//   --before DIR adds agentBefore (the agent of another checkout, e.g. `git worktree add DIR HEAD~1`, with
//                `deno cache --config deploy/deno.compile.json main.ts` run there) and agentAfter (this
//                checkout's), both started alike: same config, default log level, logs discarded

import { join } from "node:path";
import { parseArgs } from "node:util";
import process from "node:process";
import * as ort from "onnxruntime-node";
import { ElementType, OnnxRuntime, RunOptions, Session, Value } from "../ffi/onnxruntime.ts";
import { bindFunction, readPointer } from "../ffi/native.ts";
import { parseConfig } from "../src/config.ts";
import { npmLibraryPath, sessionOptions } from "../src/inference/runtime.ts";
import { enumValues, type OutputLocation, type Tensor } from "../src/service/wire.ts";
import { PADDLE_CLS, PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { SysvSegment } from "../tests/helpers/shm_segments.ts";
import { AgentProcess } from "./agent_process.ts";
import { agentDeployment, MAIN, PROJECT_ROOT } from "../tests/helpers/agent.ts";
import { GrpcJsAgentClient } from "../tests/helpers/grpcjs_client.ts";
import { testTrust } from "../tests/helpers/signing.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, percentile, table } from "./stats.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "12" },
    block: { type: "string", default: "3" },
    model: { type: "string", default: "det" },
    only: { type: "string", default: "" },
    agents: { type: "string", default: "agentShared,agentOwn" },
    before: { type: "string", default: "" },
  },
});
const ROUNDS = Number(args.values.rounds);
const BLOCK = Number(args.values.block);
const MODEL = args.values.model === "cls"
  ? { key: "cls", file: PADDLE_CLS, shape: [1, 3, 48, 192] }
  : { key: "det", file: PADDLE_DET, shape: [1, 3, 640, 640] };

/** The agent's ONNX Runtime settings, given to every path. */
const AGENT_KEYS = { edge_agent_intra_op_threads: 1, edge_agent_allow_spinning: false };
/** Extra agent keys per agent path. */
const AGENT_VARIANTS: Record<string, Record<string, unknown>> = {
  agentShared: {},
  agentOwn: { edge_agent_shared_thread_pools: false },
};

interface Path {
  name: string;
  /** Per measured call, where the agent logs it: its handler's time and the Run's within it. */
  splits?: { handlerMs: number; runMs: number }[];
  call(): Promise<unknown>;
  cpuMs(): number;
  /** Minor page faults so far of the process that runs the model. */
  faults(): number;
  /** The process that runs the model. */
  pid: number | "self";
  /** First output's first floats, for a cross-check. */
  check(): Promise<Float32Array>;
}

const input = pseudoRandomInput(MODEL.shape, 2);
const inputBytes = new Uint8Array(input.buffer);
const elements = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
/** The fields of /proc/<pid>/stat after the command name: [7] minor faults, [11] utime, [12] stime (ticks). */
function statFields(pid: number | "self"): string[] {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
}
const ownFaults = () => Number(statFields("self")[7]);
/** Per thread of `pid`: its name, and ns on a CPU and ns runnable but waiting for one (schedstat). */
function threadTimes(pid: number | "self"): Map<string, { comm: string; runNs: number; waitNs: number }> {
  const times = new Map<string, { comm: string; runNs: number; waitNs: number }>();
  for (const entry of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      const comm = Deno.readTextFileSync(`/proc/${pid}/task/${entry.name}/comm`).trim();
      const [runNs, waitNs] = Deno.readTextFileSync(`/proc/${pid}/task/${entry.name}/schedstat`).split(" ").map(Number);
      times.set(entry.name, { comm, runNs, waitNs });
    } catch { /* exited meanwhile */ }
  }
  return times;
}

/** Per thread name: ms on a CPU and ms waiting for one between two threadTimes() samples. */
function threadDelta(
  before: ReturnType<typeof threadTimes>,
  after: ReturnType<typeof threadTimes>,
): Map<string, { runMs: number; waitMs: number }> {
  const byName = new Map<string, { runMs: number; waitMs: number }>();
  for (const [tid, now] of after) {
    const was = before.get(tid) ?? { runNs: 0, waitNs: 0 };
    // Thread names with a number (pool workers) are summed under one name.
    const name = now.comm.replace(/[-_ ]?\d+$/, "");
    const sum = byName.get(name) ?? { runMs: 0, waitMs: 0 };
    sum.runMs += (now.runNs - was.runNs) / 1e6;
    sum.waitMs += (now.waitNs - was.waitNs) / 1e6;
    byName.set(name, sum);
  }
  return byName;
}

const ownCpuMs = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
};

/** onnxruntime-node's options for AGENT_KEYS. */
const REFERENCE_OPTIONS: ort.InferenceSession.SessionOptions = {
  intraOpNumThreads: 1,
  interOpNumThreads: 1,
  graphOptimizationLevel: "all",
  extra: { session: { intra_op: { allow_spinning: "0" }, inter_op: { allow_spinning: "0" } } },
};
// onnxruntime-node creates the process's OrtEnv first; our bindings share it (one per process).
const referenceSession = await ort.InferenceSession.create(MODEL.file, REFERENCE_OPTIONS);
const feeds = { [referenceSession.inputNames[0]]: new ort.Tensor("float32", input, MODEL.shape) };
/** onnxruntime-node's session.run on the JavaScript thread, in this process. */
function referencePath(name: string, session: ort.InferenceSession): Path {
  return {
    name,
    call: () => session.run(feeds),
    cpuMs: ownCpuMs,
    faults: ownFaults,
    pid: "self",
    check: async () => (await session.run(feeds))[session.outputNames[0]].data as Float32Array,
  };
}
const reference = referencePath("reference", referenceSession);
// The same, the model given as bytes (as the agent gives it) rather than as a path.
const referenceBytes = referencePath(
  "referenceBytes",
  await ort.InferenceSession.create(await Deno.readFile(MODEL.file), REFERENCE_OPTIONS),
);

const runtime = OnnxRuntime.open(npmLibraryPath());
const options = sessionOptions(runtime, parseConfig(AGENT_KEYS).config);
const session = await Session.create(runtime, await Deno.readFile(MODEL.file), options);
options.release();

// A blocking binding of Run, to call it on the JavaScript thread as onnxruntime-node does.
const lib = Deno.dlopen(npmLibraryPath(), { OrtGetApiBase: { parameters: [], result: "pointer" } });
const base = lib.symbols.OrtGetApiBase()!;
const table16 = bindFunction(readPointer(base, 0), { parameters: ["u32"], result: "pointer" }).call(16)!;
const syncRun = bindFunction(readPointer(table16, 9 * 8), {
  parameters: ["pointer", "pointer", "pointer", "pointer", "usize", "pointer", "usize", "pointer"],
  result: "pointer",
});
const syncRunOptions = new RunOptions(runtime);
const at = (buffer: BufferSource) => Deno.UnsafePointer.of(buffer as Uint8Array);
const name = (text: string) => new TextEncoder().encode(text + "\0");
const inputName = name(session.inputs[0].name);
const outputNames = session.outputs.map((o) => name(o.name));
const pointersOf = (buffers: Uint8Array[]) =>
  new BigUint64Array(buffers.map((b) => BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(b)))));

function copyOut(outputs: Value[]): Uint8Array {
  return outputs[0].borrowBytes(4 * elements(outputs[0].tensorInfo().shape)).slice();
}

const ffiSync: Path = {
  name: "ffiSync",
  call: () => {
    // As onnxruntime-node: the Run on the JavaScript thread after a setImmediate hop.
    return new Promise((resolve) =>
      setTimeout(() => {
        const value = Value.tensorOver(runtime, inputBytes, MODEL.shape, ElementType.FLOAT);
        const values = new BigUint64Array([BigInt(Deno.UnsafePointer.value(value.pointer))]);
        const out = new BigUint64Array(outputNames.length);
        // Made per call, as Session.run makes them.
        const inputNamePointers = pointersOf([inputName]);
        const outputNamePointers = pointersOf(outputNames);
        runtime.check(
          "Run",
          syncRun.call(
            session.pointer,
            syncRunOptions.pointer,
            at(inputNamePointers),
            at(values),
            1n,
            at(outputNamePointers),
            BigInt(outputNames.length),
            at(out),
          ),
        );
        const outputs = Array.from(out, (p) => new Value(runtime, Deno.UnsafePointer.create(p), null));
        const bytes = copyOut(outputs);
        for (const v of outputs) v.release();
        value.release();
        resolve(bytes);
      }, 0)
    );
  },
  cpuMs: ownCpuMs,
  faults: ownFaults,
  pid: "self",
  check: async () => new Float32Array(((await ffiSync.call()) as Uint8Array).buffer),
};

async function ffiRun(): Promise<Uint8Array> {
  const value = Value.tensorOver(runtime, inputBytes, MODEL.shape, ElementType.FLOAT);
  let outputs: Value[] = [];
  try {
    outputs = await session.run([0], [value]);
    return copyOut(outputs);
  } finally {
    for (const v of outputs) v.release();
    value.release();
  }
}
const ffi: Path = {
  name: "ffi",
  call: ffiRun,
  cpuMs: ownCpuMs,
  faults: ownFaults,
  pid: "self",
  check: async () => new Float32Array((await ffiRun()).buffer),
};

const inSegment = new SysvSegment(inputBytes.byteLength).write(0, inputBytes);
const outSegment = new SysvSegment(inputBytes.byteLength);
const segments = [inSegment, outSegment];
const attach = (segment: SysvSegment) => {
  // A second attachment of our own, as the agent holds one: read-write for the output.
  const libc = Deno.dlopen("libc.so.6", {
    shmat: { parameters: ["i32", "pointer", "i32"], result: "pointer" },
  });
  const address = libc.symbols.shmat(segment.id, null, 0)!;
  return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(address, segment.size));
};
const shmIn = attach(inSegment);
const shmOut = attach(outSegment);
const outputShape = MODEL.key === "cls" ? [1, 2] : [1, 1, MODEL.shape[2], MODEL.shape[3]];
async function ffiShmRun(): Promise<void> {
  const value = Value.tensorOver(runtime, shmIn, MODEL.shape, ElementType.FLOAT);
  const target = Value.tensorOver(
    runtime,
    shmOut.subarray(0, 4 * elements(outputShape)),
    outputShape,
    ElementType.FLOAT,
  );
  let outputs: Value[] = [];
  try {
    outputs = await session.run([0], [value], null, [target]);
  } finally {
    for (const v of outputs) if (v !== target) v.release();
    target.release();
    value.release();
  }
}
const ffiShm: Path = {
  name: "ffiShm",
  call: ffiShmRun,
  cpuMs: ownCpuMs,
  faults: ownFaults,
  pid: "self",
  check: async () => {
    await ffiShmRun();
    return new Float32Array(shmOut.slice(0, 4 * elements(outputShape)).buffer);
  },
};

const dir = await Deno.makeTempDir({ prefix: "edge-agent-run-gap-" });
const modelsDir = join(dir, "models");
const url = await writeModelFolder(modelsDir, MODEL.key, await Deno.readFile(MODEL.file));
/** A Predict's input from inSegment and its first output into outSegment. */
function shmRequest(inputName: Uint8Array): { tensors: Tensor[]; locations: OutputLocation[] } {
  const tensor_metadata = { name: inputName, data_type: enumValues("DataType").FLOAT32, shape: MODEL.shape };
  return {
    tensors: [{
      tensor_metadata,
      shared_memory_handle: { size: inputBytes.byteLength, offset: 0, segment_id: inSegment.id },
    }],
    locations: [{ index: 0, shared_memory_handle: { segment_id: outSegment.id, offset: 0, size: 0 } }],
  };
}
const agents: AgentProcess[] = [];
const agentPaths: Path[] = [];
const wanted = args.values.only ? new Set(args.values.only.split(",")) : null;
for (const agentName of args.values.agents.split(",").filter(Boolean)) {
  if (wanted && !wanted.has(agentName)) continue;
  const agentDir = join(dir, agentName);
  await Deno.mkdir(agentDir);
  const agent = await AgentProcess.start(agentDir, modelsDir, { ...AGENT_KEYS, ...AGENT_VARIANTS[agentName] });
  agents.push(agent);
  const { model: loaded } = await agent.client.loadModel(url, MODEL.key);
  const { tensors, locations } = shmRequest(loaded.input_tensor_metadatas[0].name);
  const splits: { handlerMs: number; runMs: number }[] = [];
  const call = async () => {
    const response = await agent.client.predict(MODEL.key, tensors, locations);
    const [log] = await agent.takePredicts(1);
    splits.push({ handlerMs: log.ms, runMs: log.runMs });
    return response;
  };
  agentPaths.push({
    name: agentName,
    splits,
    call,
    cpuMs: () => agent.cpuMs(),
    pid: agent.pid,
    faults: () => Number(statFields(agent.pid)[7]),
    check: async () => {
      const { tensors: out } = await call();
      return new Float32Array(outSegment.read(0, Number(out[0].shared_memory_handle!.size)).buffer);
    },
  });
}

/** An agent of the checkout at `root` (its main.ts and module config) on `dir`/agent.sock, logs discarded. */
async function spawnAgent(
  root: string,
  dir: string,
): Promise<{ stop(): Promise<void>; client: GrpcJsAgentClient; pid: number }> {
  await Deno.mkdir(dir);
  const { socket, args } = await agentDeployment(dir, {
    ...AGENT_KEYS,
    edge_agent_model_roots: [modelsDir],
    sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
    edge_agent_state_dir: join(dir, "state"),
    edge_agent_onnxruntime_library: npmLibraryPath(),
  });
  const rooted = args.map((a) =>
    a === MAIN ? join(root, "main.ts") : a.startsWith(PROJECT_ROOT) ? join(root, a.slice(PROJECT_ROOT.length)) : a
  );
  const child = new Deno.Command(Deno.execPath(), { args: rooted, stdin: "null", stdout: "null", stderr: "null" })
    .spawn();
  const client = new GrpcJsAgentClient(socket);
  for (let tries = 0;; tries++) {
    try {
      await client.listModels();
      break;
    } catch (error) {
      if (tries > 600) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  return {
    client,
    pid: child.pid,
    stop: async () => {
      client.close();
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

const stops: (() => Promise<void>)[] = [];
if (args.values.before) {
  for (const [agentName, root] of [["agentBefore", args.values.before], ["agentAfter", PROJECT_ROOT]]) {
    const agent = await spawnAgent(root, join(dir, agentName));
    stops.push(agent.stop);
    const { model: loaded } = await agent.client.loadModel(url, MODEL.key);
    const { tensors, locations } = shmRequest(loaded.input_tensor_metadatas[0].name);
    const call = () => agent.client.predict(MODEL.key, tensors, locations);
    agentPaths.push({
      name: agentName,
      call,
      pid: agent.pid,
      cpuMs: () => {
        const fields = statFields(agent.pid);
        return (Number(fields[11]) + Number(fields[12])) * 10;
      },
      faults: () => Number(statFields(agent.pid)[7]),
      check: async () => {
        const { tensors: out } = await call();
        return new Float32Array(outSegment.read(0, Number(out[0].shared_memory_handle!.size)).buffer);
      },
    });
  }
}

const paths = [reference, referenceBytes, ffiSync, ffi, ffiShm, ...agentPaths].filter((p) =>
  p === reference || !wanted || wanted.has(p.name)
);

try {
  const expected = await reference.check();
  for (const path of paths.slice(1)) {
    const got = await path.check();
    let diff = 0;
    for (let i = 0; i < expected.length; i++) diff = Math.max(diff, Math.abs(expected[i] - got[i]));
    if (!(diff < 1e-3)) throw new Error(`${path.name}: output differs from the reference by ${diff}`);
  }
  for (const path of paths) for (let i = 0; i < 2; i++) await path.call();

  const perRound = paths.map(() => [] as number[]);
  const all = paths.map(() => [] as number[]);
  const cpu = paths.map(() => ({ ms: 0, calls: 0, faults: 0 }));
  const outside = paths.map(() => [] as number[]);
  const threads = paths.map(() => new Map<string, { runMs: number; waitMs: number }>());
  const handlerOther = paths.map(() => [] as number[]);
  const runs = paths.map(() => [] as number[]);
  console.log(`${MODEL.key}: ${ROUNDS} rounds of ${paths.length} paths, blocks of 1 + ${BLOCK} calls`);
  for (let round = 0; round < ROUNDS; round++) {
    for (let k = 0; k < paths.length; k++) {
      const index = (round + k) % paths.length;
      const path = paths[index];
      await path.call();
      const before = path.cpuMs();
      const faultsBefore = path.faults();
      const threadsBefore = threadTimes(path.pid);
      const times: number[] = [];
      path.splits?.splice(0);
      for (let i = 0; i < BLOCK; i++) {
        const started = performance.now();
        await path.call();
        times.push(performance.now() - started);
      }
      cpu[index].ms += path.cpuMs() - before;
      cpu[index].faults += path.faults() - faultsBefore;
      for (const [name, d] of threadDelta(threadsBefore, threadTimes(path.pid))) {
        const sum = threads[index].get(name) ?? { runMs: 0, waitMs: 0 };
        sum.runMs += d.runMs;
        sum.waitMs += d.waitMs;
        threads[index].set(name, sum);
      }
      cpu[index].calls += BLOCK;
      perRound[index].push(median(times));
      all[index].push(...times);
      if (path.splits) {
        outside[index].push(...times.map((t, i) => t - path.splits![i].handlerMs));
        handlerOther[index].push(...path.splits.map((s) => s.handlerMs - s.runMs));
        runs[index].push(...path.splits.map((s) => s.runMs));
      }
    }
  }
  const ratios = paths.map((_, i) => perRound[i].map((m, round) => m / perRound[0][round]));
  console.log(table(
    [
      "path",
      "p50 ms",
      "p10 ms",
      "ratio (median of rounds)",
      "ratio p25-p75",
      "CPU ms/call",
      "faults/call",
      "outside handler",
      "handler - Run",
      "Run",
    ],
    paths.map((p, i) => [
      p.name,
      median(all[i]).toFixed(2),
      percentile(all[i], 10).toFixed(2),
      median(ratios[i]).toFixed(4),
      `${percentile(ratios[i], 25).toFixed(3)}-${percentile(ratios[i], 75).toFixed(3)}`,
      (cpu[i].ms / cpu[i].calls).toFixed(1),
      (cpu[i].faults / cpu[i].calls).toFixed(0),
      ...[outside[i], handlerOther[i], runs[i]].map((x) => x.length ? median(x).toFixed(2) : ""),
    ]),
  ));
  console.log("\nPer thread of the model's process, ms per call on a CPU / waiting for one (schedstat):");
  for (const [i, path] of paths.entries()) {
    const busy = [...threads[i]].filter(([, t]) => t.runMs + t.waitMs > 0.05 * cpu[i].calls)
      .sort((a, b) => b[1].runMs - a[1].runMs);
    console.log(
      `  ${path.name}: ` +
        busy.map(([name, t]) =>
          `${name} ${(t.runMs / cpu[i].calls).toFixed(2)}/${(t.waitMs / cpu[i].calls).toFixed(2)}`
        )
          .join(", "),
    );
  }
} finally {
  for (const agent of agents) await agent.stop();
  for (const stop of stops) await stop();
  for (const segment of segments) segment.remove();
  session.release();
  await referenceSession.release();
  await Deno.remove(dir, { recursive: true });
}
