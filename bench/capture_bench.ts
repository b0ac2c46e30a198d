// Acknowledged captures per second: 8 concurrent gRPC clients sending CaptureData to the agent (durable:
// fsync'd before OK), with p50/p99 acknowledgement latency; and the spool in-process with fsync on and
// off, as the ceiling. Target: >= 5,000 durable acks/s on this 2-core machine.

import { join } from "node:path";
import { benchCaptureAppends } from "../src/capture/bench.ts";
import { AgentClient } from "../src/client.ts";
import { enumValues } from "../src/wire.ts";
import { tensor } from "../tests/helpers/assertions.ts";
import { identityModel, OnnxType, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { median, ms, percentile, table } from "./stats.ts";

const CLIENTS = 8;
/** A cls-sized capture: a 1 KiB input tensor and the 2-float output. */
const INPUT = new Float32Array(256).map((_, i) => i / 256);
const OUTPUT = Float32Array.of(0.25, 0.75);

export interface CaptureBenchFigures {
  agentAcksPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  spoolDurable: number;
  spoolNoFsync: number;
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
  try {
    await agent.client.loadModel(await writeModelFolder(modelsDir, "m", identityModel(OnnxType.FLOAT, ["n"])), "m");
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
          capture_id: `bench-${next++}`,
          input_tensors: [tensor("x", float32, [256], INPUT)],
          output_tensors: [tensor("y", float32, [2], OUTPUT)],
        });
        latencies.push(performance.now() - sent);
      }
    }));
    const elapsed = (performance.now() - started) / 1000;
    const durable = await benchCaptureAppends({ fsync: true, durationMs: seconds * 1000 });
    const noFsync = await benchCaptureAppends({ fsync: false, durationMs: seconds * 1000 });
    return {
      agentAcksPerSecond: latencies.length / elapsed,
      p50Ms: median(latencies),
      p99Ms: percentile(latencies, 99),
      spoolDurable: durable.acksPerSecond,
      spoolNoFsync: noFsync.acksPerSecond,
    };
  } finally {
    for (const client of clients) client.close();
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

export function printCaptures(f: CaptureBenchFigures): void {
  console.log(`\nCaptureData, ${CLIENTS} concurrent clients, 1 KiB input + 8-byte output per capture`);
  console.log(table(["path", "acks/s", "p50", "p99", "target", "result"], [
    [
      "agent over gRPC, durable",
      f.agentAcksPerSecond.toFixed(0),
      ms(f.p50Ms),
      ms(f.p99Ms),
      ">= 5000/s",
      f.agentAcksPerSecond >= 5000 ? "met" : "MISSED",
    ],
    ["spool in-process, durable", f.spoolDurable.toFixed(0), "", "", "", "(ceiling)"],
    ["spool in-process, fsync off", f.spoolNoFsync.toFixed(0), "", "", "", "(ceiling)"],
  ]));
}

if (import.meta.main) printCaptures(await captureBenchmark(Deno.args.includes("--quick") ? 2 : 5));
