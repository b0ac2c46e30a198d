// A soak of the real agent: mixed load for many minutes, to find what short tests miss (memory that grows,
// descriptors or segment attachments that are never released, captures that stop being stored, errors that
// appear only after a while). Not part of CI: `deno task soak [--minutes N]` (default 10).
//
// The load, all at once for the whole run, kept moderate for 2 cores (leaks, not throughput):
//   Predict on PP-OCR cls with the input as bytes, from the agent's own client and from grpc-js
//   Predict with the input in a SysV segment: one kept for the run, and a new one every few seconds, removed after
//   CaptureData at a steady rate, with GetCaptureDataStatus checks that older captures reached SUCCESS
//   LoadModel / Predict / UnLoadModel of an identity model under a new name every couple of seconds
//   clients that connect, make one call and close, several times a second
//   bad requests (unknown model, wrong shape, removed segment, ...) that must get their gRPC status codes
// Every few seconds it samples the agent's RSS, CPU, open descriptors, threads and SysV mappings, the segments'
// attachment counts, and the agent's metrics. At the end: a table over time, one verdict per resource, the figures
// as JSON under bench/results/, and a non-zero exit when a verdict fails.

import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { AgentClient as EdgeAgentClient } from "../src/client/client.ts";
import { Status } from "../src/errors.ts";
import { enumValues, type Tensor } from "../src/service/wire.ts";
import { floats, pseudoRandomFloats, tensor } from "../tests/helpers/assertions.ts";
import { GrpcJsAgentClient } from "../tests/helpers/grpcjs_client.ts";
import { identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { SysvSegment } from "../tests/helpers/shm_segments.ts";
import { AgentProcess, readProc } from "./agent_process.ts";
import { table } from "./stats.ts";

const RESULTS_DIR = new URL("./results/", import.meta.url).pathname;
const DEFAULT_MINUTES = 10;

/** Calls per second of each steady kind of load. */
const RATES = {
  /** Per client; one edge-agent client and one grpc-js client. */
  predictBytes: 15,
  predictSharedMemory: 10,
  captures: 200,
  connects: 5,
  badRequests: 4,
};
/** Concurrent CaptureData senders: one alone cannot keep the rate while each call waits for an fsync. */
const CAPTURE_SENDERS = 4;
const FRESH_SEGMENT_EVERY_MS = 3000;
const PREDICTS_PER_FRESH_SEGMENT = 3;
const MODEL_CYCLE_EVERY_MS = 2000;
const STATUS_CHECK_EVERY_MS = 1000;
/** Every Nth acknowledged capture is asked about once it is old enough to have been stored. */
const STATUS_CHECK_STRIDE = 20;
/** Past the push period (4 s) with room for a slow disk: a capture this old must be SUCCESS. */
const STORED_WITHIN_MS = 10_000;
/**
 * The agent keeps final capture statuses up to a count (100000 by default) once their records have left the spool.
 * At 200 captures/s that map would grow for over 8 minutes and pass for a leak; a small retention fills it during
 * warm-up, so growth after it is real.
 */
const STATUS_RETENTION_COUNT = 5000;
/** Checked at the end: the newest acknowledged captures, fewer than retained (batches finish slightly out of order). */
const STATUS_CHECKED_AT_END = 4000;
const DRAIN_TIMEOUT_MS = 60_000;
/**
 * The agent may keep a SysV segment attached after a request, for the client's next one, and lets go of a removed
 * segment at its next check (each second); a segment still attached after this long was leaked.
 */
const SEGMENT_RELEASE_TIMEOUT_MS = 5000;

/**
 * How much RSS may rise over the measured half of the run. The agent's heap swings by a few MiB as it collects
 * garbage, so a short run cannot tell a smaller rise from noise: 10 minutes allow 96 MiB/h, an hour 16 MiB/h.
 */
const RSS_RISE_ALLOWED_MIB = 8;
/** However long the run, RSS may not rise faster (a device left running for a week would lose 1.6 GiB). */
const RSS_SLOPE_FLOOR_MIB_PER_HOUR = 10;
/**
 * Under this load the agent's RSS rises for about 5 minutes (its heap growing to its working size, with one step of
 * some 40 MiB near the end) and is flat after: a 30-minute run with the model cycle kept to one name measured
 * 6 MiB/h over its second half. Growth is judged only after this.
 */
const RSS_WARM_UP_SECONDS = 300;
/**
 * New metric series allowed in the second half. Once every kind of call has been made, the (rpc, model, code)
 * combinations and Predict histograms are all there; a count that keeps growing is state kept per name forever.
 */
const METRIC_SERIES_SLACK = 10;
/** Descriptors the agent may hold at the end beyond its count before the load (a spool segment file rotating in). */
const FD_SLACK = 2;

const DataType = enumValues("DataType");
/** The tally's key for identity models loaded (each under a new name). */
const MODEL_LOADED = "LoadModel OK";
/** Labels the calls made after the load, when the run's outcome is checked. */
const AT_THE_END = "at the end";
const CaptureStatus = enumValues("CaptureDataStatus");
const CLS_SHAPE = [1, 3, 48, 192];

type Client = EdgeAgentClient | GrpcJsAgentClient;

/** Calls made, by label and status code, and what went wrong. */
class Tally {
  readonly byOutcome = new Map<string, number>();
  calls = 0;
  unexpected = 0;
  /** The first unexpected outcomes, word for word, for the report. */
  readonly examples: string[] = [];

  ok(label: string): void {
    this.#count(`${label} OK`);
  }

  expected(label: string, code: string): void {
    this.#count(`${label} ${code} (expected)`);
  }

  wrong(label: string, code: string, detail: string): void {
    this.#count(`${label} ${code} (UNEXPECTED)`);
    this.#unexpected(label, code, detail);
  }

  /** A call that succeeded with the wrong answer (counted as a call already). */
  wrongAnswer(label: string, what: string, detail: string): void {
    this.#count(`${label} ${what} (UNEXPECTED)`, false);
    this.#unexpected(label, what, detail);
  }

  #unexpected(label: string, what: string, detail: string): void {
    this.unexpected++;
    if (this.examples.length < 20) this.examples.push(`${label}: ${what}: ${detail}`);
  }

  #count(key: string, isCall = true): void {
    if (isCall) this.calls++;
    this.byOutcome.set(key, (this.byOutcome.get(key) ?? 0) + 1);
  }
}

/** Awaits a call that must end with `expected` (OK by default); returns its response when it succeeded. */
async function call<T>(tally: Tally, label: string, pending: Promise<T>, expected = Status.OK): Promise<T | null> {
  try {
    const response = await pending;
    if (expected === Status.OK) tally.ok(label);
    else tally.wrong(label, "OK", `expected ${Status[expected]}`);
    return response;
  } catch (error) {
    const { code, details, message } = error as { code?: number; details?: string; message?: string };
    const name = code === undefined ? "no status" : Status[code] ?? String(code);
    if (code === expected && expected !== Status.OK) tally.expected(label, name);
    else tally.wrong(label, name, details ?? message ?? String(error));
    return null;
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** Runs `step` every `intervalMs` while `running()`; a step that overruns delays the next rather than bunching. */
async function paced(
  intervalMs: number,
  running: () => boolean,
  step: (i: number) => Promise<void>,
  offsetMs = 0,
): Promise<void> {
  await sleep(offsetMs);
  let due = performance.now();
  for (let i = 0; running(); i++) {
    await step(i);
    due = Math.max(due + intervalMs, performance.now());
    await sleep(due - performance.now());
  }
}

/** Every SysV segment the soak made, so the end can show none outlived its removal. */
class Segments {
  readonly created: number[] = [];
  readonly #live = new Map<number, SysvSegment>();

  /** A segment holding `data`, made read-only as Edge Manager's example client does. */
  create(data: Float32Array): SysvSegment {
    const segment = new SysvSegment(data.byteLength).write(0, data).chmod(0o400);
    this.created.push(segment.id);
    this.#live.set(segment.id, segment);
    return segment;
  }

  remove(segment: SysvSegment): void {
    this.#live.delete(segment.id);
    segment.remove();
  }

  removeAll(): void {
    for (const segment of [...this.#live.values()]) this.remove(segment);
  }

  get liveCount(): number {
    return this.#live.size;
  }

  /**
   * Our segments the kernel still lists, with their attachment counts. A removed segment stays listed while
   * anyone is attached, so after removal any entry here is an attachment the agent never dropped.
   */
  listed(): Map<number, number> {
    const ours = new Set(this.created);
    const [header, ...rows] = readProc("/proc/sysvipc/shm").trim().split("\n");
    const columns = header.trim().split(/\s+/);
    const idColumn = columns.indexOf("shmid");
    const nattchColumn = columns.indexOf("nattch");
    const found = new Map<number, number>();
    for (const row of rows) {
      const cells = row.trim().split(/\s+/);
      const id = Number(cells[idColumn]);
      if (ours.has(id)) found.set(id, Number(cells[nattchColumn]));
    }
    return found;
  }

  /** Attachments to our live segments besides our own, and how many of the removed ones are still attached. */
  attachments(): { toLive: number; removedStillAttached: number } {
    let toLive = 0, removedStillAttached = 0;
    for (const [id, nattch] of this.listed()) {
      if (this.#live.has(id)) toLive += nattch - 1;
      else removedStillAttached++;
    }
    return { toLive, removedStillAttached };
  }

  /** Removes every segment and waits for the agent to let go of them; returns those still attached, with nattch. */
  async removeAllAndWait(): Promise<{ left: Map<number, number>; waitedMs: number }> {
    this.removeAll();
    const started = performance.now();
    let left = this.listed();
    while (left.size > 0 && performance.now() - started < SEGMENT_RELEASE_TIMEOUT_MS) {
      await sleep(100);
      left = this.listed();
    }
    return { left, waitedMs: performance.now() - started };
  }
}

/** Captures the agent acknowledged, in order, and those not yet checked for SUCCESS. */
class CaptureLedger {
  readonly acknowledged: string[] = [];
  readonly #unchecked: { id: string; at: number }[] = [];
  #next = 0;

  newId(): string {
    return `soak-${this.#next++}`;
  }

  acknowledge(id: string): void {
    if (this.acknowledged.length % STATUS_CHECK_STRIDE === 0) this.#unchecked.push({ id, at: performance.now() });
    this.acknowledged.push(id);
  }

  /** Sampled captures acknowledged at least `ageMs` ago, each handed out once. */
  takeOlderThan(ageMs: number): string[] {
    const cutoff = performance.now() - ageMs;
    let count = 0;
    while (count < this.#unchecked.length && this.#unchecked[count].at <= cutoff) count++;
    return this.#unchecked.splice(0, count).map((entry) => entry.id);
  }
}

/** What the load sends, built once. */
interface Inputs {
  clsImage: Float32Array;
  cls: Tensor;
  /** The cls output for `clsImage`, from the first Predict: every later answer must match it. */
  clsExpected: Float32Array;
  identity: Tensor;
  identityData: Float32Array;
  identityUrl: string;
  clsUrl: string;
}

interface Context {
  agent: AgentProcess;
  tally: Tally;
  segments: Segments;
  captures: CaptureLedger;
  inputs: Inputs;
  own: EdgeAgentClient[];
  grpcJs: GrpcJsAgentClient[];
  running: () => boolean;
}

function sharedMemoryTensor(segmentId: number): Tensor {
  return {
    tensor_metadata: { name: new TextEncoder().encode("x"), data_type: DataType.FLOAT32, shape: CLS_SHAPE },
    shared_memory_handle: { segment_id: segmentId, offset: 0, size: 0 },
  };
}

/** Predict on cls whose answer must equal the first one (same input, same model: a changed answer is a bug). */
async function predictCls(ctx: Context, client: Client, label: string, input: Tensor): Promise<void> {
  const response = await call(ctx.tally, label, client.predict("cls", [input]));
  if (!response) return;
  const output = floats(response.tensors[0]?.byte_data);
  const expected = ctx.inputs.clsExpected;
  if (output.length !== expected.length || output.some((v, i) => Math.abs(v - expected[i]) > 1e-5)) {
    ctx.tally.wrongAnswer(label, "wrong output", `[${output.join(", ")}] instead of [${expected.join(", ")}]`);
  }
}

async function predictBytes(ctx: Context): Promise<void> {
  const senders = [ctx.own[0], ctx.grpcJs[0]].map((client, i) =>
    paced(
      1000 / RATES.predictBytes,
      ctx.running,
      () => predictCls(ctx, client, `Predict bytes (${clientKind(client)})`, ctx.inputs.cls),
      i * 10,
    )
  );
  await Promise.all(senders);
}

function clientKind(client: Client): string {
  return client instanceof EdgeAgentClient ? "edge-agent" : "grpc-js";
}

/** Predict from the segment kept for the whole run, alternating clients. */
async function predictKeptSegment(ctx: Context, segment: SysvSegment): Promise<void> {
  await paced(1000 / RATES.predictSharedMemory, ctx.running, async (i) => {
    const client = i % 2 === 0 ? ctx.own[1] : ctx.grpcJs[1];
    await predictCls(ctx, client, `Predict SysV (${clientKind(client)})`, sharedMemoryTensor(segment.id));
  });
}

/**
 * A new segment every few seconds: a few Predicts from it, then it is removed, and a Predict naming it must be
 * INVALID_ARGUMENT: the agent may keep a segment attached for the next request, but must notice its removal.
 */
async function predictFreshSegments(ctx: Context): Promise<void> {
  await paced(FRESH_SEGMENT_EVERY_MS, ctx.running, async (i) => {
    const segment = ctx.segments.create(ctx.inputs.clsImage);
    const clients = [ctx.own[1], ctx.grpcJs[1]];
    for (let n = 0; n < PREDICTS_PER_FRESH_SEGMENT; n++) {
      const client = clients[(i + n) % 2];
      await predictCls(ctx, client, `Predict fresh SysV (${clientKind(client)})`, sharedMemoryTensor(segment.id));
    }
    ctx.segments.remove(segment);
    await call(
      ctx.tally,
      "Predict removed SysV",
      ctx.own[1].predict("cls", [sharedMemoryTensor(segment.id)]),
      Status.INVALID_ARGUMENT,
    );
  }, 500);
}

/**
 * About 1 KiB of detections as CSV, sent with every capture. Besides being what an application attaches, it makes
 * the spool rotate its 8 MiB segments every half minute or so: the agent keeps each capture's status while its record
 * is in a spool segment, whatever the retention count, so with tiny captures that map would grow for minutes by
 * design and hide a real leak.
 */
const DETECTIONS_CSV = new TextEncoder().encode(
  "box,x,y,width,height,score\n" +
    Array.from({ length: 48 }, (_, i) => `${i},${(i * 37) % 640},${(i * 91) % 640},${48 + i},${16 + i},0.${i}`)
      .join("\n"),
);

/** A cls capture: the 2-float output, the frame number as JSON and the detections as CSV. */
function captureRequest(id: string, frame: number) {
  const Encoding = enumValues("Encoding");
  return {
    model_name: "cls",
    capture_id: id,
    input_tensors: [],
    output_tensors: [tensor("softmax_0.tmp_0", DataType.FLOAT32, [1, 2], Float32Array.of(0.25, 0.75))],
    inputs: [{ name: "frame", encoding: Encoding.JSON, byte_data: new TextEncoder().encode(`{"frame":${frame}}`) }],
    outputs: [{ name: "detections", encoding: Encoding.CSV, byte_data: DETECTIONS_CSV }],
  };
}

async function sendCaptures(ctx: Context): Promise<void> {
  const clients: Client[] = [...ctx.own, ...ctx.grpcJs];
  const interval = (1000 * CAPTURE_SENDERS) / RATES.captures;
  const senders = Array.from({ length: CAPTURE_SENDERS }, (_, sender) => {
    const client = clients[sender % clients.length];
    return paced(interval, ctx.running, async (i) => {
      const id = ctx.captures.newId();
      const label = `CaptureData (${clientKind(client)})`;
      const response = await call(ctx.tally, label, client.call("CaptureData", captureRequest(id, i)));
      if (response) ctx.captures.acknowledge(id);
    }, (interval * sender) / CAPTURE_SENDERS);
  });
  await Promise.all(senders);
}

/** The status of one capture, or null when the call itself failed (already counted). */
async function captureStatus(
  ctx: Context,
  client: Client,
  id: string,
  label = "GetCaptureDataStatus",
): Promise<number | null> {
  const response = await call<{ status: number }>(
    ctx.tally,
    label,
    client.call("GetCaptureDataStatus", { capture_id: id }),
  );
  return response ? response.status ?? CaptureStatus.FAILURE : null;
}

const statusName = (status: number) =>
  Object.entries(CaptureStatus).find(([, value]) => value === status)?.[0] ?? String(status);

/** Sampled old captures must be SUCCESS, the newest IN_PROGRESS or SUCCESS, and an id never sent NOT_FOUND. */
async function checkCaptureStatuses(ctx: Context): Promise<void> {
  const client = ctx.agent.ownClient;
  await paced(STATUS_CHECK_EVERY_MS, ctx.running, async (i) => {
    for (const id of ctx.captures.takeOlderThan(STORED_WITHIN_MS)) {
      const status = await captureStatus(ctx, client, id);
      if (status !== null && status !== CaptureStatus.SUCCESS) {
        ctx.tally.wrongAnswer(
          "GetCaptureDataStatus",
          statusName(status),
          `${id} is not SUCCESS ${STORED_WITHIN_MS} ms after OK`,
        );
      }
    }
    const newest = ctx.captures.acknowledged.at(-1);
    if (newest) {
      const status = await captureStatus(ctx, client, newest);
      if (status !== null && status !== CaptureStatus.SUCCESS && status !== CaptureStatus.IN_PROGRESS) {
        ctx.tally.wrongAnswer("GetCaptureDataStatus", statusName(status), `${newest} was just acknowledged`);
      }
    }
    const status = await captureStatus(ctx, client, `never-sent-${i}`);
    if (status !== null && status !== CaptureStatus.NOT_FOUND) {
      ctx.tally.wrongAnswer("GetCaptureDataStatus", statusName(status), `never-sent-${i} was never captured`);
    }
  }, 250);
}

/**
 * Load, use and unload the identity model, then its name must be NOT_FOUND. A new name each time, as deployments
 * that version their model names do, so that anything the agent keeps per model name shows as growth.
 */
async function cycleModels(ctx: Context): Promise<void> {
  await paced(MODEL_CYCLE_EVERY_MS, ctx.running, async (i) => {
    const name = `identity-${i}`;
    const client: Client = i % 2 === 0 ? ctx.agent.ownClient : ctx.agent.client;
    if (!await call(ctx.tally, "LoadModel", client.loadModel(ctx.inputs.identityUrl, name))) return;
    const response = await call(ctx.tally, "Predict identity", client.predict(name, [ctx.inputs.identity]));
    const output = response ? floats(response.tensors[0]?.byte_data) : null;
    if (output && output.some((v, n) => v !== ctx.inputs.identityData[n])) {
      ctx.tally.wrongAnswer("Predict identity", "wrong output", `[${output.join(", ")}]`);
    }
    await call(ctx.tally, "UnLoadModel", client.unloadModel(name));
    await call(ctx.tally, "Predict unloaded", client.predict(name, [ctx.inputs.identity]), Status.NOT_FOUND);
  }, 250);
}

/** New clients that connect, make one call and close: the agent must release each connection. */
async function churnConnections(ctx: Context): Promise<void> {
  await paced(1000 / RATES.connects, ctx.running, async (i) => {
    // Mostly the product's client; grpc-js now and then, which closes its connections differently.
    const client: Client = i % 4 === 3
      ? new GrpcJsAgentClient(ctx.agent.socket)
      : new EdgeAgentClient(ctx.agent.socket);
    try {
      await call(ctx.tally, `ListModels new ${clientKind(client)} client`, client.listModels());
    } finally {
      client.close();
    }
  }, 100);
}

/** Requests the agent must refuse, each with its own status code; a request of null is not sent this time. */
function badRequests(ctx: Context): [string, () => Promise<unknown> | null, Status][] {
  const { cls, clsImage, clsUrl } = ctx.inputs;
  const oneChannel = clsImage.subarray(0, clsImage.length / 3);
  // The newest capture's id is still known to the agent; an old one may have left its status retention.
  const newestCapture = () => ctx.captures.acknowledged.at(-1);
  return [
    ["Predict unknown model", () => ctx.agent.client.predict("no-such-model", [cls]), Status.NOT_FOUND],
    [
      "Predict wrong shape",
      () => ctx.agent.ownClient.predict("cls", [tensor("x", DataType.FLOAT32, [1, 1, 48, 192], oneChannel)]),
      Status.INVALID_ARGUMENT,
    ],
    [
      "Predict short data",
      () => ctx.agent.client.predict("cls", [tensor("x", DataType.FLOAT32, CLS_SHAPE, oneChannel)]),
      Status.INVALID_ARGUMENT,
    ],
    ["UnLoadModel unknown", () => ctx.agent.ownClient.unloadModel("no-such-model"), Status.NOT_FOUND],
    ["LoadModel loaded name", () => ctx.agent.client.loadModel(clsUrl, "cls"), Status.ALREADY_EXISTS],
    [
      "CaptureData same id",
      () => {
        const id = newestCapture();
        return id === undefined ? null : ctx.agent.ownClient.call("CaptureData", captureRequest(id, 0));
      },
      Status.ALREADY_EXISTS,
    ],
  ];
}

async function sendBadRequests(ctx: Context): Promise<void> {
  const requests = badRequests(ctx);
  await paced(1000 / RATES.badRequests, ctx.running, async (i) => {
    const [label, send, expected] = requests[i % requests.length];
    const sent = send();
    if (sent) await call(ctx.tally, label, sent, expected);
  }, 150);
}

/** One look at the agent and the load. */
interface Sample {
  seconds: number;
  phase: "before load" | "load" | "after load";
  rssMiB: number;
  /** CPU use of the agent since the previous sample (100 = one core). */
  cpuPercent: number;
  fds: number;
  threads: number;
  /** SysV segments mapped in the agent's address space (lines of /proc/<pid>/maps). */
  agentSysvMappings: number;
  liveSegments: number;
  /** Attachments to our live segments besides ours: the agent's (while a Run uses one, or kept for the next). */
  agentAttachments: number;
  /** Segments we removed that the kernel still lists: someone (the agent) is still attached. */
  removedStillAttached: number;
  calls: number;
  unexpected: number;
  capturesAcknowledged: number;
  /** Model names loaded so far (each cycle uses a new one). */
  modelNamesLoaded: number;
  /** From the agent's metrics. */
  capturePending: number;
  spoolBytes: number;
  metricSeries: number;
}

/** Entries of /proc/<pid>/fd, listed by `ls` (Deno reads /proc only with --allow-all). */
async function openFds(pid: number): Promise<number> {
  const { success, stdout, stderr } = await new Deno.Command("ls", { args: [`/proc/${pid}/fd`] }).output();
  if (!success) throw new Error(`ls /proc/${pid}/fd: ${new TextDecoder().decode(stderr)}`);
  return new TextDecoder().decode(stdout).split("\n").filter((line) => line !== "").length;
}

/** The agent's metrics: `name{labels}` -> value. */
async function scrapeMetrics(socket: string): Promise<Map<string, number>> {
  const client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
  try {
    const response = await fetch("http://localhost/metrics", { client });
    const text = await response.text();
    if (!response.ok) throw new Error(`metrics: HTTP ${response.status}: ${text}`);
    const samples = new Map<string, number>();
    for (const line of text.split("\n")) {
      const match = /^(\S+) (\S+)$/.exec(line);
      if (match && !line.startsWith("#")) samples.set(match[1], Number(match[2]));
    }
    return samples;
  } finally {
    client.close();
  }
}

class Sampler {
  readonly samples: Sample[] = [];
  #lastCpuMs: number;
  #lastAt: number;

  constructor(
    readonly agent: AgentProcess,
    readonly metricsSocket: string,
    readonly segments: Segments,
    readonly tally: Tally,
    readonly captures: CaptureLedger,
    readonly startedAt: number,
  ) {
    this.#lastCpuMs = agent.cpuMs();
    this.#lastAt = performance.now();
  }

  async take(phase: Sample["phase"]): Promise<Sample> {
    const { agent } = this;
    const now = performance.now();
    const cpuMs = agent.cpuMs();
    const status = readProc(`/proc/${agent.pid}/status`);
    const maps = readProc(`/proc/${agent.pid}/maps`);
    const metrics = await scrapeMetrics(this.metricsSocket);
    const attachments = this.segments.attachments();
    const sample: Sample = {
      seconds: (now - this.startedAt) / 1000,
      phase,
      rssMiB: agent.memory().rssMiB,
      cpuPercent: (100 * (cpuMs - this.#lastCpuMs)) / Math.max(1, now - this.#lastAt),
      fds: await openFds(agent.pid),
      threads: Number(/^Threads:\s+(\d+)/m.exec(status)?.[1] ?? NaN),
      agentSysvMappings: maps.split("\n").filter((line) => line.includes("/SYSV")).length,
      liveSegments: this.segments.liveCount,
      agentAttachments: attachments.toLive,
      removedStillAttached: attachments.removedStillAttached,
      calls: this.tally.calls,
      unexpected: this.tally.unexpected,
      capturesAcknowledged: this.captures.acknowledged.length,
      modelNamesLoaded: this.tally.byOutcome.get(MODEL_LOADED) ?? 0,
      capturePending: metrics.get("edge_agent_capture_pending") ?? NaN,
      spoolBytes: metrics.get("edge_agent_capture_spool_bytes") ?? NaN,
      metricSeries: metrics.size,
    };
    this.#lastCpuMs = cpuMs;
    this.#lastAt = now;
    this.samples.push(sample);
    return sample;
  }

  async every(intervalMs: number, running: () => boolean): Promise<void> {
    await sleep(intervalMs);
    await paced(intervalMs, running, async () => {
      try {
        await this.take("load");
      } catch (error) {
        // An agent that died leaves no /proc entry to read; the verdicts report its exit, not this.
        const exited = await Promise.race([this.agent.exited.then(() => true), sleep(1000).then(() => false)]);
        if (!exited) throw error;
      }
    });
  }
}

/** Least-squares slope of y over x. */
function slope(points: [number, number][]): number {
  const n = points.length;
  if (n < 2) return NaN;
  const meanX = points.reduce((sum, [x]) => sum + x, 0) / n;
  const meanY = points.reduce((sum, [, y]) => sum + y, 0) / n;
  const covariance = points.reduce((sum, [x, y]) => sum + (x - meanX) * (y - meanY), 0);
  const variance = points.reduce((sum, [x]) => sum + (x - meanX) ** 2, 0);
  return covariance / variance;
}

/** Capture ids of every record line the Disk destination wrote (Edge Manager's layout), with how often each appears. */
async function storedCaptureIds(folder: string): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  const walk = async (dir: string): Promise<void> => {
    for await (const entry of Deno.readDir(dir)) {
      const path = join(dir, entry.name);
      if (entry.isDirectory) await walk(path);
      else if (entry.name.endsWith(".jsonl")) {
        for (const line of (await Deno.readTextFile(path)).split("\n")) {
          if (line === "") continue;
          const id = (JSON.parse(line) as { eventMetadata: { eventId: string } }).eventMetadata.eventId;
          counts.set(id, (counts.get(id) ?? 0) + 1);
        }
      }
    }
  };
  try {
    await walk(folder);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return counts;
}

/** Waits until the agent has stored every acknowledged capture (pending 0 and the newest SUCCESS). */
async function drainCaptures(ctx: Context, metricsSocket: string): Promise<boolean> {
  const deadline = performance.now() + DRAIN_TIMEOUT_MS;
  const newest = ctx.captures.acknowledged.at(-1);
  while (performance.now() < deadline) {
    const pending = (await scrapeMetrics(metricsSocket)).get("edge_agent_capture_pending");
    const status = newest === undefined
      ? CaptureStatus.SUCCESS
      : await captureStatus(ctx, ctx.own[0], newest, `GetCaptureDataStatus ${AT_THE_END}`);
    if (pending === 0 && status === CaptureStatus.SUCCESS) return true;
    await sleep(500);
  }
  return false;
}

interface CaptureFigures {
  acknowledged: number;
  /** Of the newest acknowledged captures (within the agent's status retention), how many are SUCCESS. */
  checkedAtEnd: number;
  successAtEnd: number;
  otherAtEnd: Record<string, number>;
  drained: boolean;
  /** Acknowledged captures found once in the Disk destination's manifests, missing, or more than once. */
  storedOnce: number;
  missing: number;
  duplicated: number;
  /** Manifest lines for ids that were never acknowledged (a failed call whose capture was kept anyway). */
  notAcknowledged: number;
}

/**
 * The newest acknowledged captures must be SUCCESS (asked only of an agent still running); every acknowledged one
 * must be on disk exactly once.
 */
async function verifyCaptures(
  ctx: Context,
  capturesFolder: string,
  drained: boolean,
  askAgent: boolean,
): Promise<CaptureFigures> {
  const { acknowledged } = ctx.captures;
  const newest = askAgent ? acknowledged.slice(-STATUS_CHECKED_AT_END) : [];
  const otherAtEnd: Record<string, number> = {};
  let successAtEnd = 0;
  const clients: Client[] = [...ctx.own, ...ctx.grpcJs];
  await Promise.all(clients.map(async (client, c) => {
    for (let i = c; i < newest.length; i += clients.length) {
      const status = await captureStatus(ctx, client, newest[i], `GetCaptureDataStatus ${AT_THE_END}`);
      if (status === CaptureStatus.SUCCESS) successAtEnd++;
      else {
        const name = status === null ? "call failed" : statusName(status);
        otherAtEnd[name] = (otherAtEnd[name] ?? 0) + 1;
      }
    }
  }));
  const stored = await storedCaptureIds(capturesFolder);
  const acknowledgedSet = new Set(acknowledged);
  let storedOnce = 0, missing = 0, duplicated = 0;
  for (const id of acknowledged) {
    const count = stored.get(id) ?? 0;
    if (count === 1) storedOnce++;
    else if (count === 0) missing++;
    else duplicated++;
  }
  const notAcknowledged = [...stored.keys()].filter((id) => !acknowledgedSet.has(id)).length;
  return {
    acknowledged: acknowledged.length,
    checkedAtEnd: newest.length,
    successAtEnd,
    otherAtEnd,
    drained,
    storedOnce,
    missing,
    duplicated,
    notAcknowledged,
  };
}

interface Verdict {
  resource: string;
  /** null: the run cannot tell (too short). */
  passed: boolean | null;
  text: string;
}

interface Outcome {
  minutes: number;
  samples: Sample[];
  tally: Tally;
  captures: CaptureFigures;
  segmentsCreated: number;
  /** Our segments still listed once removed and given time to be let go: id -> nattch. */
  segmentsLeft: Map<number, number>;
  /** How long the agent took to let go of the segments removed at the end. */
  segmentsReleasedMs: number;
  exitCode: number | null;
  /** The agent exited before the end of the load. */
  diedEarly: boolean;
}

function rssVerdict(samples: Sample[], minutes: number): { verdict: Verdict; slopeMiBPerHour: number } {
  const secondHalf = samples.filter((s) => s.phase === "load" && s.seconds >= (minutes * 60) / 2);
  const slopeMiBPerHour = slope(secondHalf.map((s) => [s.seconds / 3600, s.rssMiB]));
  const first = samples[0]?.rssMiB ?? NaN;
  const last = samples.at(-1)?.rssMiB ?? NaN;
  const windowHours = ((secondHalf.at(-1)?.seconds ?? 0) - (secondHalf[0]?.seconds ?? 0)) / 3600;
  const limit = Math.max(RSS_SLOPE_FLOOR_MIB_PER_HOUR, RSS_RISE_ALLOWED_MIB / windowHours);
  const measured = `${slopeMiBPerHour.toFixed(1)} MiB/h over the second half (${secondHalf.length} samples); ` +
    `${first.toFixed(1)} MiB before load, ${last.toFixed(1)} MiB at the end`;
  const warmedUp = secondHalf.length >= 3 && secondHalf[0].seconds >= RSS_WARM_UP_SECONDS;
  const verdict: Verdict = warmedUp
    ? { resource: "RSS", passed: slopeMiBPerHour <= limit, text: `${measured}; limit ${limit.toFixed(0)} MiB/h` }
    : {
      resource: "RSS",
      passed: null,
      text: `${measured}; not judged: RSS rises for the first ${RSS_WARM_UP_SECONDS / 60} minutes of load as the ` +
        `heap grows, so the second half of a run under ${(2 * RSS_WARM_UP_SECONDS) / 60} minutes is still warm-up`,
    };
  return { verdict, slopeMiBPerHour };
}

function metricSeriesVerdict(samples: Sample[], minutes: number): Verdict {
  const before = samples[0]?.metricSeries ?? NaN;
  const midRun = samples.find((s) => s.phase === "load" && s.seconds >= (minutes * 60) / 2);
  const end = samples.findLast((s) => s.phase === "load");
  if (!midRun || !end) return { resource: "metric series", passed: null, text: "too few samples to compare" };
  const growth = end.metricSeries - midRun.metricSeries;
  const names = end.modelNamesLoaded - midRun.modelNamesLoaded;
  const perName = growth > METRIC_SERIES_SLACK && names > 0
    ? ` (${(growth / names).toFixed(0)} per model name loaded meanwhile, kept after it was unloaded)`
    : "";
  return {
    resource: "metric series",
    passed: growth <= METRIC_SERIES_SLACK,
    text: `${before} before load, ${midRun.metricSeries} at mid-run, ${end.metricSeries} at the end of the load` +
      perName,
  };
}

function fdVerdict(samples: Sample[]): Verdict {
  const first = samples.find((s) => s.phase === "before load")?.fds ?? NaN;
  const last = samples.findLast((s) => s.phase === "after load")?.fds ?? NaN;
  const max = Math.max(...samples.map((s) => s.fds));
  return {
    resource: "fds",
    passed: last <= first + FD_SLACK,
    text: `${first} before load, ${last} after (max ${max} during; slack ${FD_SLACK})`,
  };
}

function captureVerdict(c: CaptureFigures): Verdict {
  const others = Object.entries(c.otherAtEnd).map(([name, n]) => `${n} ${name}`).join(", ");
  return {
    resource: "captures",
    passed: c.drained && c.successAtEnd === c.checkedAtEnd && c.missing === 0 && c.duplicated === 0 &&
      c.notAcknowledged === 0,
    text: `${c.acknowledged} acknowledged; newest ${c.checkedAtEnd}: ${c.successAtEnd} SUCCESS` +
      `${others ? `, ${others}` : ""}; on disk once ${c.storedOnce}, missing ${c.missing}, ` +
      `duplicated ${c.duplicated}, never acknowledged ${c.notAcknowledged}` +
      (c.drained ? "" : `; pending captures not stored within ${DRAIN_TIMEOUT_MS / 1000} s`),
  };
}

function segmentVerdict(o: Outcome): Verdict {
  const left = [...o.segmentsLeft].map(([id, nattch]) => `${id} (nattch ${nattch})`).join(", ");
  const maxMappings = Math.max(...o.samples.map((s) => s.agentSysvMappings));
  const maxRemovedAttached = Math.max(...o.samples.map((s) => s.removedStillAttached));
  return {
    resource: "SysV segments",
    passed: o.segmentsLeft.size === 0,
    text: `${o.segmentsCreated} created, ${o.segmentsCreated - o.segmentsLeft.size} gone ` +
      `${(o.segmentsReleasedMs / 1000).toFixed(1)} s after the last removal` +
      (left ? `; still attached: ${left}` : "") +
      `; at samples: at most ${maxMappings} mapped in the agent, ${maxRemovedAttached} removed but attached`,
  };
}

function verdicts(o: Outcome): { list: Verdict[]; slopeMiBPerHour: number } {
  const { verdict: rss, slopeMiBPerHour } = rssVerdict(o.samples, o.minutes);
  const agent: Verdict = {
    resource: "agent",
    passed: !o.diedEarly && o.exitCode === 0,
    text: o.diedEarly ? `exited during the load (code ${o.exitCode})` : `stopped with exit code ${o.exitCode}`,
  };
  const errors: Verdict = {
    resource: "gRPC errors",
    passed: o.tally.unexpected === 0,
    text: `${o.tally.unexpected} unexpected of ${o.tally.calls} calls`,
  };
  // What is checked after the load needs the agent alive then.
  const afterLoad = o.diedEarly
    ? ["fds", "captures", "SysV segments", "metric series"].map((resource) => ({
      resource,
      passed: null,
      text: "not checked: the agent exited during the load",
    }))
    : [fdVerdict(o.samples), captureVerdict(o.captures), segmentVerdict(o), metricSeriesVerdict(o.samples, o.minutes)];
  return { slopeMiBPerHour, list: [agent, rss, errors, ...afterLoad] };
}

function printSamples(samples: Sample[]): void {
  const fixed = (value: number, digits = 0) => Number.isFinite(value) ? value.toFixed(digits) : "-";
  console.log(table(
    [
      "t (s)",
      "phase",
      "RSS MiB",
      "CPU %",
      "fds",
      "threads",
      "SysV maps",
      "segs",
      "attach",
      "rm+att",
      "calls",
      "unexp",
      "captures",
      "pending",
      "spool KiB",
      "series",
    ],
    samples.map((s) => [
      fixed(s.seconds),
      s.phase,
      fixed(s.rssMiB, 1),
      fixed(s.cpuPercent),
      String(s.fds),
      String(s.threads),
      String(s.agentSysvMappings),
      String(s.liveSegments),
      String(s.agentAttachments),
      String(s.removedStillAttached),
      String(s.calls),
      String(s.unexpected),
      String(s.capturesAcknowledged),
      fixed(s.capturePending),
      fixed(s.spoolBytes / 1024),
      String(s.metricSeries),
    ]),
    2,
  ));
}

function printTally(tally: Tally, seconds: number): void {
  const rows = [...tally.byOutcome].sort(([a], [b]) => a.localeCompare(b)).map(([key, count]) => [
    key,
    String(count),
    // The checks after the load are no rate.
    key.includes(AT_THE_END) ? "-" : (count / seconds).toFixed(1),
  ]);
  console.log(table(["call and outcome", "count", "per s"], rows));
  for (const example of tally.examples) console.log(`  unexpected: ${example}`);
}

/** Six significant digits: more than the figures mean, and the file stays readable. */
function forJson(value: unknown): string {
  return JSON.stringify(
    value,
    (_key, v) => typeof v === "number" ? Number(v.toPrecision(6)) : v instanceof Map ? Object.fromEntries(v) : v,
    1,
  );
}

/** cls, the identity model, and the inputs the load sends (the cls reference answer is filled in later). */
async function prepareModels(modelsDir: string): Promise<Inputs> {
  const clsUrl = await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
  const identityUrl = await writeModelFolder(modelsDir, "identity", identityModel(OnnxType.FLOAT, ["n", 3]));
  const clsImage = pseudoRandomFloats(CLS_SHAPE.reduce((a, b) => a * b), 7);
  const identityData = pseudoRandomFloats(6, 9);
  return {
    clsImage,
    cls: tensor("x", DataType.FLOAT32, CLS_SHAPE, clsImage),
    clsExpected: new Float32Array(),
    identity: tensor("x", DataType.FLOAT32, [2, 3], identityData),
    identityData,
    identityUrl,
    clsUrl,
  };
}

function parseMinutes(): number {
  const { values } = parseArgs({
    args: Deno.args,
    options: { minutes: { type: "string", default: String(DEFAULT_MINUTES) } },
    strict: true,
  });
  const minutes = Number(values.minutes);
  if (!(minutes > 0)) throw new Error(`--minutes must be a positive number, not ${values.minutes}`);
  return minutes;
}

/** Everything one run holds: the agent, its folders, the clients and what was counted. */
interface Soak {
  minutes: number;
  startedAt: Date;
  dir: string;
  stateDir: string;
  metricsSocket: string;
  agent: AgentProcess;
  /** Set once the agent has exited, whenever that is. */
  exit: { status: Deno.CommandStatus | null; settled: Promise<unknown> };
  ctx: Context;
  /** The segment the steady SysV Predicts read. */
  kept: SysvSegment;
}

/** A temp folder with the signed models, the agent serving it, cls loaded and every client connected. */
async function startSoak(minutes: number): Promise<Soak> {
  const startedAt = new Date();
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-soak-" });
  const modelsDir = join(dir, "models");
  const stateDir = join(dir, "state");
  const metricsSocket = join(dir, "metrics.sock");
  let agent: AgentProcess;
  let inputs: Inputs;
  try {
    inputs = await prepareModels(modelsDir);
    agent = await AgentProcess.start(dir, modelsDir, {
      sagemaker_edge_log_verbose: false,
      edge_agent_state_dir: stateDir,
      edge_agent_metrics: `unix:${metricsSocket}`,
      edge_agent_capture_status_retention_count: STATUS_RETENTION_COUNT,
    });
  } catch (error) {
    await Deno.remove(dir, { recursive: true });
    throw error;
  }
  const exit: Soak["exit"] = { status: null, settled: Promise.resolve() };
  exit.settled = agent.exited.then((status) => exit.status = status);
  const ctx: Context = {
    agent,
    tally: new Tally(),
    segments: new Segments(),
    captures: new CaptureLedger(),
    inputs,
    own: [new EdgeAgentClient(agent.socket), new EdgeAgentClient(agent.socket)],
    grpcJs: [new GrpcJsAgentClient(agent.socket), new GrpcJsAgentClient(agent.socket)],
    running: () => false,
  };
  try {
    await agent.client.loadModel(inputs.clsUrl, "cls");
    // The reference answer, and a first call on every persistent client so that their connections exist before the
    // baseline sample (grpc-js connects lazily).
    inputs.clsExpected = floats((await agent.ownClient.predict("cls", [inputs.cls])).tensors[0].byte_data);
    for (const client of [agent.client, ...ctx.own, ...ctx.grpcJs]) await client.listModels();
    const kept = ctx.segments.create(inputs.clsImage);
    return { minutes, startedAt, dir, stateDir, metricsSocket, agent, exit, ctx, kept };
  } catch (error) {
    await stopAgent({ agent, exit, ctx });
    await Deno.remove(dir, { recursive: true });
    throw error;
  }
}

/** Every kind of load at once until the time is up (or the agent dies), sampled all along. */
async function runLoad(soak: Soak, sampler: Sampler): Promise<number> {
  const { ctx } = soak;
  const started = performance.now();
  const deadline = started + soak.minutes * 60_000;
  ctx.running = () => performance.now() < deadline && soak.exit.status === null;
  await Promise.all([
    predictBytes(ctx),
    predictKeptSegment(ctx, soak.kept),
    predictFreshSegments(ctx),
    sendCaptures(ctx),
    checkCaptureStatuses(ctx),
    cycleModels(ctx),
    churnConnections(ctx),
    sendBadRequests(ctx),
    sampler.every(soak.minutes <= 5 ? 5000 : 10_000, ctx.running),
  ]);
  return (performance.now() - started) / 1000;
}

/** What is checked after the load while the agent still runs (its exit would release what it leaked). */
async function checkAfterLoad(soak: Soak, sampler: Sampler) {
  const { ctx } = soak;
  const drained = await drainCaptures(ctx, soak.metricsSocket);
  await sampler.take("after load");
  const captures = await verifyCaptures(ctx, join(soak.stateDir, "captures"), drained, true);
  const segments = await ctx.segments.removeAllAndWait();
  return { captures, segments };
}

async function stopAgent(soak: Pick<Soak, "agent" | "exit" | "ctx">): Promise<void> {
  for (const client of [...soak.ctx.own, ...soak.ctx.grpcJs]) client.close();
  await soak.agent.stop();
  await soak.exit.settled;
}

async function writeFigures(soak: Soak, outcome: Outcome, loadSeconds: number, list: Verdict[], slope: number) {
  await mkdir(RESULTS_DIR, { recursive: true });
  const file = join(RESULTS_DIR, `soak-${soak.startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
  const { tally } = outcome;
  await Deno.writeTextFile(
    file,
    forJson({
      minutes: soak.minutes,
      startedAt: soak.startedAt,
      loadSeconds,
      rates: RATES,
      rssSlopeMiBPerHour: slope,
      verdicts: list,
      calls: { total: tally.calls, unexpected: tally.unexpected, byOutcome: tally.byOutcome, examples: tally.examples },
      captures: outcome.captures,
      segments: {
        created: outcome.segmentsCreated,
        left: outcome.segmentsLeft,
        releasedMs: outcome.segmentsReleasedMs,
      },
      samples: outcome.samples,
    }) + "\n",
  );
  return file;
}

async function main(): Promise<number> {
  const soak = await startSoak(parseMinutes());
  const { ctx, agent } = soak;
  try {
    console.log(`soak: ${soak.minutes} min against agent pid ${agent.pid} in ${soak.dir}`);
    const sampler = new Sampler(agent, soak.metricsSocket, ctx.segments, ctx.tally, ctx.captures, performance.now());
    await sampler.take("before load");
    const loadSeconds = await runLoad(soak, sampler);
    const diedEarly = soak.exit.status !== null;
    const after = diedEarly ? null : await checkAfterLoad(soak, sampler);
    await stopAgent(soak);
    const captures = after?.captures ??
      await verifyCaptures(ctx, join(soak.stateDir, "captures"), false, false);

    console.log("\nSamples");
    printSamples(sampler.samples);
    console.log(`\nCalls over ${loadSeconds.toFixed(0)} s of load`);
    printTally(ctx.tally, loadSeconds);
    const outcome: Outcome = {
      minutes: soak.minutes,
      samples: sampler.samples,
      tally: ctx.tally,
      captures,
      segmentsCreated: ctx.segments.created.length,
      segmentsLeft: after?.segments.left ?? new Map(),
      segmentsReleasedMs: after?.segments.waitedMs ?? NaN,
      exitCode: soak.exit.status?.code ?? null,
      diedEarly,
    };
    const { list, slopeMiBPerHour } = verdicts(outcome);
    console.log("\nVerdicts");
    for (const v of list) {
      console.log(`${v.passed === null ? "SKIP" : v.passed ? "PASS" : "FAIL"}  ${v.resource}: ${v.text}`);
    }
    if (diedEarly) console.log(`agent log tail:\n${agent.logTail()}`);
    console.log(`figures: ${await writeFigures(soak, outcome, loadSeconds, list, slopeMiBPerHour)}`);
    const failed = list.filter((v) => v.passed === false);
    if (failed.length > 0) console.log(`\nsoak FAILED: ${failed.map((v) => `${v.resource}: ${v.text}`).join("; ")}`);
    return failed.length > 0 ? 1 : 0;
  } finally {
    ctx.segments.removeAll();
    if (soak.exit.status === null) await stopAgent(soak);
    await Deno.remove(soak.dir, { recursive: true });
  }
}

if (import.meta.main) Deno.exit(await main());
