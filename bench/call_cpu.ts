// CPU per call, of the agent's JavaScript thread and of the calling process, for one kind of call made
// back to back from several connections: ListModels (the transport and little else), CaptureData (a cls-sized
// capture, durable) or PP-OCR cls Predict. Per-call CPU moves less than wall-clock figures on a shared
// machine; run it twice (or two trees one after the other) to compare.
//
// deno run -A bench/call_cpu.ts [list|capture|predict] [--client own|grpc-js] [--senders N] [--seconds N]

import { join } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { AgentClient } from "../src/client/client.ts";
import { enumValues } from "../src/service/wire.ts";
import { tensor } from "../tests/helpers/assertions.ts";
import { GrpcJsAgentClient } from "../tests/helpers/grpcjs_client.ts";
import { identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { median, percentile } from "./stats.ts";

const WARM_UP_CALLS = 200;

const { values, positionals } = parseArgs({
  args: Deno.args,
  allowPositionals: true,
  options: {
    client: { type: "string", default: "own" },
    senders: { type: "string", default: "8" },
    seconds: { type: "string", default: "4" },
  },
});
const kind = positionals[0] ?? "list";
const senders = Number(values.senders);
const seconds = Number(values.seconds);
if (!["list", "capture", "predict"].includes(kind) || !["own", "grpc-js"].includes(values.client)) {
  throw new Error("usage: call_cpu.ts [list|capture|predict] [--client own|grpc-js] [--senders N] [--seconds N]");
}

const float32 = enumValues("DataType").FLOAT32;
const dir = await Deno.makeTempDir({ prefix: "edge-agent-call-cpu-" });
const modelsDir = join(dir, "models");
const agent = await AgentProcess.start(dir, modelsDir, {
  sagemaker_edge_log_verbose: false,
  sagemaker_edge_core_capture_data_buffer_size: 1_000_000,
});
const clients: Pick<AgentClient, "call" | "close">[] = Array.from(
  { length: senders },
  () => values.client === "own" ? new AgentClient(agent.socket) : new GrpcJsAgentClient(agent.socket),
);
try {
  await agent.client.loadModel(await writeModelFolder(modelsDir, "m", identityModel(OnnxType.FLOAT, ["n"])), "m");
  await agent.client.loadModel(await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS)), "cls");
  const input = tensor("x", float32, [256], new Float32Array(256).map((_, i) => i / 256));
  const output = tensor("y", float32, [2], Float32Array.of(0.25, 0.75));
  const image = tensor("x", float32, [1, 3, 48, 192], new Float32Array(3 * 48 * 192).fill(0.5));
  let next = 0;
  const call = (client: Pick<AgentClient, "call">) =>
    kind === "list" ? client.call("ListModels", {}) : kind === "capture"
      ? client.call("CaptureData", {
        model_name: "m",
        capture_id: `c-${next++}`,
        input_tensors: [input],
        output_tensors: [output],
      })
      : client.call("Predict", { name: "cls", tensors: [image] });
  for (let i = 0; i < WARM_UP_CALLS; i++) await call(clients[0]);
  const latencies: number[] = [];
  const [main0, client0] = [agent.mainThreadCpuMs(), process.cpuUsage()];
  const started = performance.now();
  const deadline = started + seconds * 1000;
  await Promise.all(clients.map(async (client) => {
    while (performance.now() < deadline) {
      const sent = performance.now();
      await call(client);
      latencies.push(performance.now() - sent);
    }
  }));
  const elapsed = (performance.now() - started) / 1000;
  const clientCpu = process.cpuUsage(client0);
  const perCall = (ms: number) => ((ms * 1000) / latencies.length).toFixed(1);
  console.log(
    `${kind} from ${senders} ${values.client} connections: ${(latencies.length / elapsed).toFixed(0)} calls/s, ` +
      `agent JS ${perCall(agent.mainThreadCpuMs() - main0)} us/call, ` +
      `client ${perCall((clientCpu.user + clientCpu.system) / 1000)} us/call, ` +
      `p50 ${median(latencies).toFixed(2)} ms, p99 ${percentile(latencies, 99).toFixed(2)} ms`,
  );
} finally {
  for (const client of clients) client.close();
  await agent.stop();
  await Deno.remove(dir, { recursive: true });
}
