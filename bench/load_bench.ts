// LoadModel of signed packages vs the same model as a plain .onnx (unsigned models allowed), for
// PP-OCR det (4.7 MB) and rec (10.8 MB): what verification (signature, chain, re-hashing every
// file, checking the loaded bytes) adds to load time. Target: at most 25%.

import { join } from "node:path";
import { PADDLE_DET, PADDLE_REC, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { median, ms, ratio, table } from "./stats.ts";

export interface LoadResult {
  model: string;
  megabytes: number;
  signedMs: number;
  unsignedMs: number;
  ratio: number;
}

/** Alternates signed and unsigned loads of each model, `rounds` times, on one agent. */
export async function loadBenchmark(rounds: number): Promise<LoadResult[]> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-load-bench-" });
  const modelsDir = join(dir, "models");
  const agent = await AgentProcess.start(dir, modelsDir, { edge_agent_allow_unsigned_models: true });
  try {
    const results: LoadResult[] = [];
    for (const [key, file] of [["det", PADDLE_DET], ["rec", PADDLE_REC]] as const) {
      const bytes = await Deno.readFile(file);
      const signed = await writeModelFolder(modelsDir, `${key}-signed`, bytes);
      const plain = join(modelsDir, `${key}-plain.onnx`);
      await Deno.writeFile(plain, bytes);
      const times = { signed: [] as number[], unsigned: [] as number[] };
      for (let round = 0; round <= rounds; round++) {
        for (const [kind, url] of [["signed", signed], ["unsigned", plain]] as const) {
          const started = performance.now();
          await agent.client.loadModel(url, key);
          const elapsed = performance.now() - started;
          await agent.client.unloadModel(key);
          // Round 0 warms the file cache and ORT's code paths.
          if (round > 0) times[kind].push(elapsed);
        }
      }
      const signedMs = median(times.signed);
      const unsignedMs = median(times.unsigned);
      results.push({ model: key, megabytes: bytes.length / 1e6, signedMs, unsignedMs, ratio: signedMs / unsignedMs });
    }
    return results;
  } finally {
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

export function printLoads(results: LoadResult[], rounds: number): void {
  console.log(`\nLoadModel, signed package vs plain .onnx (median of ${rounds} alternating loads each, ms)`);
  console.log(table(
    ["model", "MB", "signed", "unsigned", "ratio", "target", "result"],
    results.map((r) => [
      r.model,
      r.megabytes.toFixed(1),
      ms(r.signedMs),
      ms(r.unsignedMs),
      ratio(r.ratio),
      "<= 1.25x",
      r.ratio <= 1.25 ? "met" : "MISSED",
    ]),
  ));
}

if (import.meta.main) {
  const rounds = Deno.args.includes("--quick") ? 3 : 8;
  printLoads(await loadBenchmark(rounds), rounds);
}
