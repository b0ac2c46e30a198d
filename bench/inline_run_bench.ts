// A short Run on the agent's own thread against handing it to a worker thread: two agents side by side,
// edge_agent_inline_run_max_us at its default (1000) and 0, each called by one client (the agent's own, on
// its own connection) with PP-OCR cls Predicts in alternating blocks. Prints p50/p99 and the agent's CPU
// per call, so the setting's default is chosen from figures.
//
// deno run -A bench/inline_run_bench.ts [--rounds N]

import { join } from "node:path";
import { parseArgs } from "node:util";
import { AgentClient } from "../src/client/client.ts";
import { enumValues } from "../src/service/wire.ts";
import { tensor } from "../tests/helpers/assertions.ts";
import { PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { median, percentile } from "./stats.ts";

const BLOCK = 200;
const WARM_UP_ROUNDS = 2;
const { values } = parseArgs({ args: Deno.args, options: { rounds: { type: "string", default: "12" } } });
const rounds = Number(values.rounds);

const float32 = enumValues("DataType").FLOAT32;
const image = tensor("x", float32, [1, 3, 48, 192], new Float32Array(3 * 48 * 192).fill(0.5));
const dir = await Deno.makeTempDir({ prefix: "edge-agent-inline-run-" });
const sides: { label: string; agent: AgentProcess; client: AgentClient; ms: number[]; cpuMs: number }[] = [];
try {
  for (const [label, us] of [["on the agent's thread (1000 us)", 1000], ["always a worker thread (0)", 0]] as const) {
    const agentDir = join(dir, `agent-${us}`);
    const modelsDir = join(agentDir, "models");
    await Deno.mkdir(agentDir);
    const agent = await AgentProcess.start(agentDir, modelsDir, {
      sagemaker_edge_log_verbose: false,
      edge_agent_inline_run_max_us: us,
    });
    sides.push({ label, agent, client: new AgentClient(agent.socket), ms: [], cpuMs: 0 });
    await agent.client.loadModel(await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS)), "cls");
  }
  for (let round = 0; round < rounds + WARM_UP_ROUNDS; round++) {
    for (const side of sides) {
      const cpu = side.agent.cpuMs();
      const ms: number[] = [];
      for (let i = 0; i < BLOCK; i++) {
        const started = performance.now();
        await side.client.predict("cls", [image]);
        ms.push(performance.now() - started);
      }
      if (round < WARM_UP_ROUNDS) continue;
      side.ms.push(...ms);
      side.cpuMs += side.agent.cpuMs() - cpu;
    }
  }
  console.log(`PP-OCR cls Predict from one client, ${rounds} alternating blocks of ${BLOCK} calls per agent`);
  for (const side of sides) {
    console.log(
      `  ${side.label.padEnd(32)} p50 ${median(side.ms).toFixed(3)} ms  p99 ${
        percentile(side.ms, 99).toFixed(3)
      } ms  ` +
        `agent CPU ${(side.cpuMs / side.ms.length).toFixed(3)} ms/call`,
    );
  }
  const [on, off] = sides;
  console.log(
    `  p50 ${(median(on.ms) - median(off.ms)).toFixed(3)} ms, agent CPU ` +
      `${((on.cpuMs / on.ms.length) - (off.cpuMs / off.ms.length)).toFixed(3)} ms per call`,
  );
} finally {
  for (const side of sides) {
    side.client.close();
    await side.agent.stop();
  }
  await Deno.remove(dir, { recursive: true });
}
