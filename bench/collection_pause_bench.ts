// What the collection after a model change costs the calls that arrive during it, and what it saves:
// an agent loads cls and det, then a client calls Predict on cls every 20 ms, as a camera application
// would, for 5 s (it then stops: the collection can wait for a quiet agent) and for 12 s (past the
// agent's patience: it collects while calls go on). Per agent: the pause as it logs it, the calls sent
// during it and the slowest of them, the worst latency and p99 of all calls, how many took over three
// times the median, and the RSS once idle; against an agent without V8's gc exposed (it only trims
// malloc's arenas). Agents run one after the other, round after round; the machine's load shows in
// every column but the pause's own.
//
//   deno run --allow-all bench/collection_pause_bench.ts [--rounds N] [--seconds 5,12]

import { join } from "node:path";
import { parseArgs } from "node:util";
import { agentDeployment } from "../tests/helpers/agent.ts";
import { AgentClient } from "../src/client/client.ts";
import { testTrust } from "../tests/helpers/signing.ts";
import { tensor } from "../tests/helpers/assertions.ts";
import { PADDLE_CLS, PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { readProc } from "./agent_process.ts";
import { median, percentile } from "./stats.ts";
import { enumValues } from "../src/service/wire.ts";

const PERIOD_MS = 20;
/** After the calls: time for a collection that waits for a quiet agent, then for RSS to settle. */
const IDLE_MS = 3000;
const FLOAT32 = enumValues("DataType").FLOAT32;

interface Setting {
  name: string;
  /** Drops V8's --expose-gc: malloc_trim alone. */
  noGc: boolean;
  callingMs: number;
}

interface Result {
  worstMs: number;
  p50Ms: number;
  p99Ms: number;
  delayed: number;
  calls: number;
  /** The agent's collections: V8's kind (its log's "collection") and the pause in ms. */
  pauses: [string, number][];
  /** Calls sent while the collection ran, and the slowest of them. */
  callsDuring: number;
  worstDuringMs: number | null;
  rssMiB: number;
}

async function run(setting: Setting): Promise<Result> {
  const dir = await Deno.makeTempDir({ prefix: "collection-bench-" });
  const modelsDir = join(dir, "models");
  const { socket, args } = await agentDeployment(dir, {
    edge_agent_model_roots: [modelsDir],
    sagemaker_edge_log_verbose: true,
    sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
    edge_agent_state_dir: join(dir, "state"),
  });
  const agentArgs = args
    .filter((a) => !(setting.noGc && a.startsWith("--v8-flags")));
  const child = new Deno.Command(Deno.execPath(), {
    args: agentArgs,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines: Record<string, unknown>[] = [];
  const reading = (async () => {
    let partial = "";
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      const parts = (partial + text).split("\n");
      partial = parts.pop()!;
      for (const part of parts) {
        try {
          lines.push(JSON.parse(part));
        } catch {
          lines.push({ text: part });
        }
      }
    }
  })();
  const until = async (match: (line: Record<string, unknown>) => boolean, timeoutMs: number) => {
    const deadline = performance.now() + timeoutMs;
    while (!lines.some(match) && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return lines.find(match);
  };
  const client = new AgentClient(socket);
  try {
    if (!await until((l) => l.msg === "serving", 60_000)) {
      throw new Error(`agent did not start: ${JSON.stringify(lines)}`);
    }
    const cls = await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
    const det = await writeModelFolder(modelsDir, "det", await Deno.readFile(PADDLE_DET));
    await client.loadModel(cls, "cls");
    await client.loadModel(det, "det");
    const input = [tensor("x", FLOAT32, [1, 3, 48, 192], new Float32Array(3 * 48 * 192).fill(0.5))];
    const latencies: Promise<number>[] = [];
    const sentAt: number[] = [];
    const started = performance.now();
    for (let i = 0; i * PERIOD_MS < setting.callingMs; i++) {
      const due = started + i * PERIOD_MS;
      await new Promise((r) => setTimeout(r, Math.max(0, due - performance.now())));
      const sent = performance.now();
      sentAt.push(Date.now());
      latencies.push(
        client.predict("cls", input).then(() => performance.now() - sent, (error) => {
          throw new Error(
            `${error.message}; the agent's last lines:\n${
              lines.filter((l) => l.msg !== "rpc").slice(-10).map((l) => JSON.stringify(l)).join("\n")
            }`,
          );
        }),
      );
      latencies.at(-1)!.catch(() => {}); // reported by Promise.all below
    }
    const ms = await Promise.all(latencies);
    const isCollection = (l: Record<string, unknown>) => l.msg === "memory after a model change (MiB)";
    // The memory-reducing one ends the wait (agents that log no kind run only that one).
    await until((l) => isCollection(l) && (l.collection ?? "last-resort") === "last-resort", IDLE_MS);
    const collections = lines.filter(isCollection);
    await new Promise((r) => setTimeout(r, IDLE_MS / 3));
    const status = readProc(`/proc/${child.pid}/status`);
    const p50 = median(ms);
    // A log line's time is the collection's end; a call sent just before its start waits too.
    const during = ms.filter((_, i) =>
      collections.some((c) => {
        const end = Date.parse(String(c.time));
        return sentAt[i] >= end - Number(c.ms) - PERIOD_MS && sentAt[i] <= end;
      })
    );
    return {
      worstMs: Math.max(...ms),
      p50Ms: p50,
      p99Ms: percentile(ms, 99),
      delayed: ms.filter((m) => m > 3 * p50).length,
      calls: ms.length,
      pauses: collections.map((c) => [setting.noGc ? "trim" : String(c.collection ?? "last-resort"), Number(c.ms)]),
      callsDuring: during.length,
      worstDuringMs: during.length ? Math.max(...during) : null,
      rssMiB: Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]) / 1024,
    };
  } finally {
    client.close();
    try {
      child.kill("SIGTERM");
    } catch { /* exited */ }
    await child.status;
    await reading;
    await Deno.remove(dir, { recursive: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { rounds: { type: "string", default: "2" }, seconds: { type: "string", default: "5,12" } },
  });
  const settings = values.seconds.split(",").flatMap((seconds) =>
    [false, true].map((noGc) => ({
      name: `${seconds} s of calls, ${noGc ? "without gc (trim only)" : "collection"}`,
      noGc,
      callingMs: Number(seconds) * 1000,
    }))
  );
  const results = new Map<string, Result[]>();
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const setting of settings) {
      const result = await run(setting);
      results.set(setting.name, [...(results.get(setting.name) ?? []), result]);
      console.error(setting.name, JSON.stringify(result));
    }
  }
  const range = (values: number[], digits = 0) => {
    const lo = Math.min(...values).toFixed(digits), hi = Math.max(...values).toFixed(digits);
    return lo === hi ? lo : `${lo}-${hi}`;
  };
  console.log(`Predict cls every ${PERIOD_MS} ms after loading cls + det; ranges over ${values.rounds} rounds`);
  console.log(
    "| setting | pauses ms | calls sent in them | their worst ms | worst ms | p99 ms | p50 ms | calls > 3x p50 | RSS idle MiB |",
  );
  console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
  for (const [name, rs] of results) {
    const kinds = [...new Set(rs.flatMap((r) => r.pauses.map(([kind]) => kind)))];
    const pauses = kinds.map((kind) =>
      `${kind} ${range(rs.flatMap((r) => r.pauses.filter(([k]) => k === kind).map(([, ms]) => ms)))}`
    ).join(", ");
    const worstDuring = rs.map((r) => r.worstDuringMs).filter((p) => p !== null) as number[];
    console.log(
      `| ${name} | ${pauses || "-"} | ${range(rs.map((r) => r.callsDuring))} | ${
        worstDuring.length ? range(worstDuring) : "-"
      } | ${range(rs.map((r) => r.worstMs))} | ${range(rs.map((r) => r.p99Ms))} | ${
        range(rs.map((r) => r.p50Ms), 1)
      } | ${range(rs.map((r) => r.delayed))} of ${rs[0].calls} | ${range(rs.map((r) => r.rssMiB), 1)} |`,
    );
  }
}

if (import.meta.main) await main();
