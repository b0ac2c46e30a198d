// What the agent's start-up and memory are made of: each part's cost at start (bench/startup_probe.ts in
// fresh processes), where a running agent's RSS lies (its /proc/<pid>/smaps by mapping), and the memory
// reference, onnxruntime-node in a process of its own holding the same models.

import { join } from "node:path";
import { readProc } from "./agent_process.ts";
import { median, ms, table } from "./stats.ts";
import type { OrtChoice } from "./runners.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const PROBE = join(ROOT, "bench", "startup_probe.ts");
const REFERENCE = join(ROOT, "bench", "reference_process.mjs");
const COMPILE_CONFIG = join(ROOT, "deploy", "deno.compile.json");
/** Let start-up work (module evaluation, first allocations) settle before reading a process's RSS. */
const SETTLE_MS = 500;

export interface StageCost {
  what: string;
  ms: number;
  rssKiB: number;
  anonKiB: number;
  heapKiB: number;
  externalKiB: number;
}

export interface StartupCosts {
  runs: number;
  /** Deno itself, before any of the agent's modules. */
  baseRssKiB: number;
  /** Medians over the runs, in the probe's order. */
  stages: StageCost[];
}

/** Runs the probe `runs` times, each in a fresh process with the executable's module config. */
export async function startupCosts(runs: number): Promise<StartupCosts> {
  const results: { base: { rssKiB: number }; rows: StageCost[] }[] = [];
  for (let i = 0; i < runs; i++) {
    const { success, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--config", COMPILE_CONFIG, "--v8-flags=--expose-gc", "--allow-all", PROBE],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!success) throw new Error(`start-up probe failed: ${new TextDecoder().decode(stderr)}`);
    results.push(JSON.parse(new TextDecoder().decode(stdout)));
  }
  const stages = results[0].rows.map((row, i) => {
    const of = (key: keyof Omit<StageCost, "what">) => median(results.map((r) => r.rows[i][key]));
    return {
      what: row.what,
      ms: of("ms"),
      rssKiB: of("rssKiB"),
      anonKiB: of("anonKiB"),
      heapKiB: of("heapKiB"),
      externalKiB: of("externalKiB"),
    };
  });
  return { runs, baseRssKiB: median(results.map((r) => r.base.rssKiB)), stages };
}

const mib = (kib: number) => (kib / 1024).toFixed(1);

export function printStartupCosts(costs: StartupCosts): void {
  console.log(
    `\nWhat each part costs at start, loaded one after the other in a fresh process (bench/startup_probe.ts; ` +
      `medians of ${costs.runs}; RSS and heap after a full GC; Deno itself: ${mib(costs.baseRssKiB)} MiB RSS)`,
  );
  console.log(
    table(
      ["part", "ms", "RSS MiB", "anon MiB", "V8 heap MiB", "external MiB"],
      costs.stages.map((s) =>
        s.what.startsWith("--")
          ? [s.what, "", "", "", "", ""]
          : [s.what, ms(s.ms), mib(s.rssKiB), mib(s.anonKiB), mib(s.heapKiB), mib(s.externalKiB)]
      ),
    ),
  );
  console.log(
    "  Parts below the line load when first needed, not at start. RSS includes the code pages a part touches\n" +
      "  in Deno's executable and in ONNX Runtime's library; anon is what it allocates.",
  );
}

/** A process's RSS by kind of mapping, in KiB. */
export interface RssBreakdown {
  total: number;
  /** Anonymous memory: V8's heap, malloc (ONNX Runtime's allocations among it), thread stacks. */
  anonymous: number;
  /** Code and data pages of the runtime's executable: deno, denort (a compiled agent) or node. */
  executable: number;
  onnxRuntime: number;
  otherFiles: number;
}

export function rssBreakdown(pid: number): RssBreakdown {
  const smaps = readProc(`/proc/${pid}/smaps`);
  const breakdown: RssBreakdown = { total: 0, anonymous: 0, executable: 0, onnxRuntime: 0, otherFiles: 0 };
  let file = "";
  for (const line of smaps.split("\n")) {
    const mapping = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (mapping) {
      file = mapping[1].startsWith("/") ? mapping[1] : "";
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (!rss) continue;
    const kib = Number(rss[1]);
    breakdown.total += kib;
    if (!file) breakdown.anonymous += kib;
    else if (/libonnxruntime/.test(file)) breakdown.onnxRuntime += kib;
    else if (/\/(deno|denort|node|edge-agent[^/]*)$/.test(file)) breakdown.executable += kib;
    else breakdown.otherFiles += kib;
  }
  return breakdown;
}

export function describeRss(b: RssBreakdown): string {
  return `${mib(b.total)} MiB = anonymous ${mib(b.anonymous)} + the executable ${mib(b.executable)} + ` +
    `ONNX Runtime's library ${mib(b.onnxRuntime)} + other files ${mib(b.otherFiles)}`;
}

export interface ReferenceMemory {
  /** "node" or "deno". */
  runtime: string;
  rssKiB: number;
  breakdown: RssBreakdown;
}

/**
 * onnxruntime-node holding `files` with the agent's ONNX Runtime options, in a process of its own, under
 * `runtime`: its RSS once every session is created.
 */
export async function referenceMemory(
  runtime: "node" | "deno",
  files: string[],
  choice: OrtChoice,
): Promise<ReferenceMemory> {
  const program = runtime === "node" ? "node" : Deno.execPath();
  const args = [...(runtime === "node" ? [] : ["run", "--allow-all"]), REFERENCE, JSON.stringify(choice), ...files];
  const child = new Deno.Command(program, { args, cwd: ROOT, stdin: "piped", stdout: "piped", stderr: "inherit" })
    .spawn();
  try {
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (!text.includes("ready\n")) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`reference process under ${runtime} exited before its models were loaded`);
      text += value;
    }
    reader.releaseLock();
    await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
    const breakdown = rssBreakdown(child.pid);
    return { runtime, rssKiB: breakdown.total, breakdown };
  } finally {
    await child.stdin.close().catch(() => {});
    await child.stdout.cancel().catch(() => {});
    await child.status;
  }
}
