// Dynamic batching on PaddleOCR cls: one agent serving the same model twice, "cls" one by one (the
// default) and "cls-batched" with edge_agent_batching, in alternating blocks of one run.
//
//   throughput  N clients (separate connections, the agent's own client), each calling in a loop: calls/s
//   latency     one client alone: p50 and p99
//
// Targets: 8 clients at least 1.5x the unbatched throughput; one client's p50 at most +0.1 ms.
//
//   deno task bench:batching [--quick] [--max-delay-ms 2] [--max-batch-size 8]

import { join } from "node:path";
import { mkdir } from "node:fs/promises";
import { parseArgs } from "node:util";
import { AgentClient } from "../src/client.ts";
import { scrapeMetrics } from "../src/client_cli.ts";
import { enumValues, type Tensor } from "../src/wire.ts";
import { PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { pseudoRandomInput } from "./runners.ts";
import { median, ms, percentile, ratio, signedMs, table } from "./stats.ts";

const SHAPE = [1, 3, 48, 192];
const CLIENT_COUNTS = [4, 8];
const MODES = ["unbatched", "batched"] as const;
type Mode = typeof MODES[number];
const MODEL: Record<Mode, string> = { unbatched: "cls", batched: "cls-batched" };
const RESULTS_DIR = new URL("./results/", import.meta.url).pathname;

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

function request(seed: number): Tensor[] {
  return [{
    tensor_metadata: { name: new TextEncoder().encode("x"), data_type: enumValues("DataType").FLOAT32, shape: SHAPE },
    byte_data: new Uint8Array(pseudoRandomInput(SHAPE, seed).buffer),
  }];
}

/**
 * `clients` callers in closed loops of `calls` each: calls per second over the block, and the agent's CPU
 * time per call (a figure other load on the machine disturbs less than wall-clock time).
 */
async function throughput(
  agent: AgentProcess,
  clients: AgentClient[],
  model: string,
  calls: number,
): Promise<{ rate: number; cpuMs: number }> {
  const inputs = clients.map((_, i) => request(i + 1));
  const cpu = agent.cpuMs();
  const started = performance.now();
  await Promise.all(clients.map(async (client, i) => {
    for (let k = 0; k < calls; k++) await client.predict(model, inputs[i]);
  }));
  const total = clients.length * calls;
  return { rate: total / ((performance.now() - started) / 1000), cpuMs: (agent.cpuMs() - cpu) / total };
}

async function latencies(client: AgentClient, model: string, calls: number): Promise<number[]> {
  const input = request(99);
  const samples: number[] = [];
  for (let k = 0; k < calls; k++) {
    const started = performance.now();
    await client.predict(model, input);
    samples.push(performance.now() - started);
  }
  return samples;
}

const dir = await Deno.makeTempDir({ prefix: "edge-agent-batching-bench-" });
const metrics = join(dir, "metrics.sock");
const maxDelayMs = Number(values["max-delay-ms"]);
const maxBatchSize = Number(values["max-batch-size"]);
const agent = await AgentProcess.start(dir, join(dir, "models"), {
  edge_agent_metrics: `unix:${metrics}`,
  edge_agent_state_dir: join(dir, "state"),
  edge_agent_batching: { [MODEL.batched]: { max_batch_size: maxBatchSize, max_delay_ms: maxDelayMs } },
  // The per-call debug lines would cost the agent's thread more than some Runs.
  sagemaker_edge_log_verbose: false,
});
const clients = Array.from({ length: Math.max(...CLIENT_COUNTS) }, () => new AgentClient(agent.socket));
try {
  const folder = await writeModelFolder(join(dir, "models"), "cls", await Deno.readFile(PADDLE_CLS));
  for (const model of Object.values(MODEL)) {
    await agent.client.loadModel(folder, model);
    await latencies(clients[0], model, plan.warmup);
    await throughput(agent, clients, model, plan.warmup / 4);
  }
  const blocks: Record<Mode, Record<number, { rate: number; cpuMs: number }[]>> = { unbatched: {}, batched: {} };
  const lone: Record<Mode, number[]> = { unbatched: [], batched: [] };
  for (let round = 0; round < plan.rounds; round++) {
    // Alternate which goes first, so drifts in the machine's load fall on both alike.
    const order = round % 2 === 0 ? MODES : [...MODES].reverse();
    for (const count of CLIENT_COUNTS) {
      for (const mode of order) {
        const block = await throughput(agent, clients.slice(0, count), MODEL[mode], plan.callsPerClient);
        (blocks[mode][count] ??= []).push(block);
      }
    }
  }
  // One client: short alternating blocks, so both modes see the same moments of the machine's load.
  for (let block = 0; block < plan.latencyBlocks; block++) {
    const order = block % 2 === 0 ? MODES : [...MODES].reverse();
    for (const mode of order) lone[mode].push(...await latencies(clients[0], MODEL[mode], plan.latencyBlockSize));
  }
  const samples = await scrapeMetrics(`unix:${metrics}`);
  const runs = samples.get(`edge_agent_predict_batch_size_count{model="${MODEL.batched}"}`) ?? 0;
  const requests = samples.get(`edge_agent_predict_batch_size_sum{model="${MODEL.batched}"}`) ?? 0;

  console.log(
    `\nPaddleOCR cls ${JSON.stringify(SHAPE)}, one agent, "${MODEL.batched}" with max_batch_size ${maxBatchSize}, ` +
      `max_delay_ms ${maxDelayMs}; ${plan.rounds} alternating rounds (medians)`,
  );
  const rows: string[][] = [];
  for (const count of CLIENT_COUNTS) {
    const rate = (mode: Mode) => median(blocks[mode][count].map((b) => b.rate));
    const cpu = (mode: Mode) => median(blocks[mode][count].map((b) => b.cpuMs));
    const gain = rate("batched") / rate("unbatched");
    const target = count === 8 ? { text: ">= 1.5x", met: gain >= 1.5 } : null;
    rows.push([
      `${count} clients: calls/s`,
      rate("unbatched").toFixed(0),
      rate("batched").toFixed(0),
      ratio(gain),
      target?.text ?? "",
      target ? (target.met ? "met" : "MISSED") : "",
    ]);
    rows.push([
      `${count} clients: agent CPU ms/call`,
      ms(cpu("unbatched")),
      ms(cpu("batched")),
      ratio(cpu("batched") / cpu("unbatched")),
      "",
      "",
    ]);
  }
  const p50 = { unbatched: median(lone.unbatched), batched: median(lone.batched) };
  rows.push([
    "1 client: p50 ms",
    ms(p50.unbatched),
    ms(p50.batched),
    signedMs(p50.batched - p50.unbatched),
    "<= +0.1 ms",
    p50.batched - p50.unbatched <= 0.1 ? "met" : "MISSED",
  ]);
  rows.push([
    "1 client: p99 ms",
    ms(percentile(lone.unbatched, 99)),
    ms(percentile(lone.batched, 99)),
    signedMs(percentile(lone.batched, 99) - percentile(lone.unbatched, 99)),
    "",
    "",
  ]);
  console.log(table(["what", "unbatched", "batched", "difference", "target", "result"], rows));
  console.log(`requests per Run of ${MODEL.batched} (all blocks, warm-up included): ${(requests / runs).toFixed(2)}`);
  await mkdir(RESULTS_DIR, { recursive: true });
  const file = join(RESULTS_DIR, `batching-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  await Deno.writeTextFile(
    file,
    JSON.stringify({ maxBatchSize, maxDelayMs, plan, blocks, p50, requestsPerRun: requests / runs }, null, 2),
  );
  console.log(`figures written to ${file}`);
} finally {
  for (const client of clients) client.close();
  await agent.stop();
  await Deno.remove(dir, { recursive: true });
}
