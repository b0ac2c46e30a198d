// What a compiled agent's start pays for its embedded ONNX Runtime (extractLibrary on the real 44 MB
// library): each start is a fresh process timing one call, as the agent makes it. Three cases, the
// runs of each alternating with the others': the first start (no copy yet), a later start of an
// executable whose entry carries the library's digest (build.ts), and a later start without it.
//
//   deno run --allow-all bench/extract_library_bench.ts [--runs N]

import { join } from "node:path";
import { parseArgs } from "node:util";
import { median } from "./stats.ts";

const RUNTIME = new URL("../src/inference/runtime.ts", import.meta.url).href;

type Case = "first start" | "later start, digest baked" | "later start, no digest";

/** One start, in this process: prints the ms extractLibrary took. */
async function probe(state: string, baked: boolean): Promise<void> {
  const runtime = await import(RUNTIME);
  const library = runtime.npmLibraryPath();
  if (baked) runtime.declareEmbeddedLibrary(JSON.parse(Deno.env.get("EMBEDDED_DIGEST")!));
  const started = performance.now();
  await runtime.extractLibrary(library, state);
  console.log(JSON.stringify({ ms: performance.now() - started }));
}

async function start(state: string, baked: boolean, facts: string): Promise<number> {
  const { success, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", import.meta.filename!, "--probe", state, ...(baked ? ["--baked"] : [])],
    env: { EMBEDDED_DIGEST: facts },
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!success) throw new Error(new TextDecoder().decode(stderr));
  return JSON.parse(new TextDecoder().decode(stdout)).ms;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { runs: { type: "string", default: "7" }, probe: { type: "string" }, baked: { type: "boolean" } },
  });
  if (values.probe) return await probe(values.probe, values.baked ?? false);
  const runtime = await import(RUNTIME);
  const library = runtime.npmLibraryPath();
  const { createHash } = await import("node:crypto");
  const sha256 = createHash("sha256").update(await Deno.readFile(library)).digest("hex");
  const facts = JSON.stringify({ sha256, size: (await Deno.stat(library)).size });
  const bakes = "declareEmbeddedLibrary" in runtime;
  const state = await Deno.makeTempDir({ prefix: "extract-bench-" });
  const times = new Map<Case, number[]>();
  const record = (what: Case, ms: number) => times.set(what, [...(times.get(what) ?? []), ms]);
  try {
    for (let i = 0; i < Number(values.runs); i++) {
      await Deno.remove(join(state, "lib"), { recursive: true }).catch(() => {});
      record("first start", await start(state, bakes, facts));
      if (bakes) record("later start, digest baked", await start(state, true, facts));
      record("later start, no digest", await start(state, false, facts));
    }
  } finally {
    await Deno.remove(state, { recursive: true });
  }
  console.log(`extractLibrary on ${library} (${(JSON.parse(facts).size / 2 ** 20).toFixed(1)} MiB), ms per start:`);
  for (const [what, ms] of times) {
    const sorted = ms.toSorted((a, b) => a - b);
    console.log(
      `  ${what.padEnd(28)} median ${median(ms).toFixed(1)}, range ${sorted[0].toFixed(1)}-${
        sorted.at(-1)!.toFixed(1)
      }`,
    );
  }
}

if (import.meta.main) await main();
