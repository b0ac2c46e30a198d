// Acknowledged captures per second: 8 concurrent gRPC clients sending CaptureData to the agent (durable:
// fsync'd before OK), with p50/p99 acknowledgement latency; and the spool in-process with fsync on and
// off, as the ceiling. Target: >= 5,000 durable acks/s on this 2-core machine.

import { join } from "node:path";
import { benchCaptureAppends } from "../src/capture/bench.ts";
import { GrpcJsAgentClient as AgentClient } from "../tests/helpers/grpcjs_client.ts";
import { AgentClient as EdgeAgentClient } from "../src/client.ts";
import { enumValues } from "../src/wire.ts";
import { tensor } from "../tests/helpers/assertions.ts";
import { identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { median, ms, percentile, table } from "./stats.ts";

const CLIENTS = 8;
/** A cls-sized capture: a 1 KiB input tensor and the 2-float output. */
const INPUT = new Float32Array(256).map((_, i) => i / 256);
const OUTPUT = Float32Array.of(0.25, 0.75);

interface AckFigures {
  acksPerSecond: number;
  p50Ms: number;
  p99Ms: number;
}

export interface CaptureBenchFigures {
  /** From grpc-js clients, and from the product's own client (lighter, so the agent is nearer its limit). */
  grpcJs: AckFigures;
  ownClient: AckFigures;
  spoolDurable: number;
  spoolNoFsync: number;
  /** PP-OCR cls Predict p50 alone, and while CAPTURE_RATE captures/s flow. */
  predictAloneMs: number;
  predictWithCapturesMs: number;
}

/** Captures per second flowing while Predict is timed: a few cameras' worth of frames. */
const CAPTURE_RATE = 500;

/**
 * Predict p50 of PP-OCR cls (loaded on first use) over `seconds`, alone or while the clients send
 * CAPTURE_RATE captures per second between them.
 */
async function predictP50(
  client: AgentClient,
  modelsDir: string,
  seconds: number,
  capturers: AgentClient[] | null,
): Promise<number> {
  if (!(await client.listModels()).models.some((m) => m.name === "cls")) {
    await client.loadModel(await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS)), "cls");
  }
  const float32 = enumValues("DataType").FLOAT32;
  const image = tensor("x", float32, [1, 3, 48, 192], new Float32Array(3 * 48 * 192).fill(0.5));
  for (let i = 0; i < 20; i++) await client.predict("cls", [image]);
  const deadline = performance.now() + seconds * 1000;
  let id = 0;
  const capturing = (capturers ?? []).map(async (capturer, i, all) => {
    const interval = (1000 * all.length) / CAPTURE_RATE;
    let due = performance.now() + (interval * i) / all.length;
    while (performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, Math.max(0, due - performance.now())));
      due += interval;
      await capturer.call("CaptureData", {
        model_name: "cls",
        capture_id: `flow-${capturers === null ? 0 : 1}-${id++}`,
        input_tensors: [],
        output_tensors: [tensor("softmax_0.tmp_0", float32, [1, 2], OUTPUT)],
      });
    }
  });
  const latencies: number[] = [];
  while (performance.now() < deadline) {
    const sent = performance.now();
    await client.predict("cls", [image]);
    latencies.push(performance.now() - sent);
  }
  await Promise.all(capturing);
  return median(latencies);
}

/** CLIENTS clients sending CaptureData back to back for `seconds`. */
async function acknowledged(
  clients: Pick<AgentClient, "call">[],
  seconds: number,
  prefix: string,
): Promise<AckFigures> {
  const float32 = enumValues("DataType").FLOAT32;
  const latencies: number[] = [];
  let next = 0;
  const deadline = performance.now() + seconds * 1000;
  const started = performance.now();
  await Promise.all(clients.map(async (client) => {
    while (performance.now() < deadline) {
      const sent = performance.now();
      await client.call("CaptureData", {
        model_name: "m",
        capture_id: `${prefix}-${next++}`,
        input_tensors: [tensor("x", float32, [256], INPUT)],
        output_tensors: [tensor("y", float32, [2], OUTPUT)],
      });
      latencies.push(performance.now() - sent);
    }
  }));
  const elapsed = (performance.now() - started) / 1000;
  return { acksPerSecond: latencies.length / elapsed, p50Ms: median(latencies), p99Ms: percentile(latencies, 99) };
}

export async function captureBenchmark(seconds: number): Promise<CaptureBenchFigures> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-capture-bench-" });
  const modelsDir = join(dir, "models");
  const agent = await AgentProcess.start(dir, modelsDir, {
    sagemaker_edge_log_verbose: false,
    edge_agent_state_dir: join(dir, "state"),
    sagemaker_edge_core_capture_data_buffer_size: 1_000_000,
  });
  const clients = Array.from({ length: CLIENTS }, () => new AgentClient(agent.socket));
  const ownClients = Array.from({ length: CLIENTS }, () => new EdgeAgentClient(agent.socket));
  try {
    await agent.client.loadModel(await writeModelFolder(modelsDir, "m", identityModel(OnnxType.FLOAT, ["n"])), "m");
    const grpcJs = await acknowledged(clients, seconds, "grpc-js");
    const ownClient = await acknowledged(ownClients, seconds, "own");
    const predictAlone = await predictP50(agent.client, modelsDir, seconds, null);
    const predictWithCaptures = await predictP50(agent.client, modelsDir, seconds, clients);
    const durable = await benchCaptureAppends({ fsync: true, durationMs: seconds * 1000 });
    const noFsync = await benchCaptureAppends({ fsync: false, durationMs: seconds * 1000 });
    return {
      grpcJs,
      ownClient,
      spoolDurable: durable.acksPerSecond,
      spoolNoFsync: noFsync.acksPerSecond,
      predictAloneMs: predictAlone,
      predictWithCapturesMs: predictWithCaptures,
    };
  } finally {
    for (const client of [...clients, ...ownClients]) client.close();
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

export function printCaptures(f: CaptureBenchFigures): void {
  console.log(`\nCaptureData, ${CLIENTS} concurrent clients, 1 KiB input + 8-byte output per capture`);
  const row = (path: string, a: AckFigures) => [
    path,
    a.acksPerSecond.toFixed(0),
    ms(a.p50Ms),
    ms(a.p99Ms),
    ">= 5000/s",
    a.acksPerSecond >= 5000 ? "met" : "MISSED",
  ];
  console.log(table(["path", "acks/s", "p50", "p99", "target", "result"], [
    row("agent over gRPC, durable, grpc-js clients", f.grpcJs),
    row("agent over gRPC, durable, edge-agent clients", f.ownClient),
    ["spool in-process, durable", f.spoolDurable.toFixed(0), "", "", "", "(ceiling)"],
    ["spool in-process, fsync off", f.spoolNoFsync.toFixed(0), "", "", "", "(ceiling)"],
  ]));
  const degradation = f.predictWithCapturesMs / f.predictAloneMs;
  console.log(
    `PP-OCR cls Predict p50: ${ms(f.predictAloneMs)} ms alone, ${ms(f.predictWithCapturesMs)} ms while ` +
      `${CAPTURE_RATE} captures/s flow: ${((degradation - 1) * 100).toFixed(1)}% slower ` +
      `(target <= 10%: ${degradation <= 1.1 ? "met" : "MISSED"})`,
  );
}

if (import.meta.main) printCaptures(await captureBenchmark(Deno.args.includes("--quick") ? 2 : 5));
