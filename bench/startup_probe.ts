// Run by bench/startup_costs.ts in a fresh process: loads the agent's parts one after the other, in
// the order a start-up meets them, and prints what each adds (time, RSS, V8 heap) as one JSON line.
// No static imports, so the baseline is Deno itself.
//
//   deno run --config deploy/deno.compile.json --v8-flags=--expose-gc --allow-all bench/startup_probe.ts

/** Marks where the stages loaded at start end. */
export const FIRST_USE = "-- loaded when first needed --";
let ort: { readonly env: unknown } | null = null;

const gc = (globalThis as { gc?: () => void }).gc ?? (() => {});

function rollup(): { rssKiB: number; anonKiB: number } {
  const text = Deno.readTextFileSync("/proc/self/smaps_rollup");
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
  return { rssKiB: kib("Rss"), anonKiB: kib("Anonymous") };
}

function sample() {
  gc();
  const { heapUsed, external } = Deno.memoryUsage();
  return { ...rollup(), heapUsed, external };
}

/** The agent's parts; each stage's figures are what it adds to those before it. */
const STAGES: [string, () => Promise<unknown>][] = [
  // What `serve` loads before it listens, in that order.
  ["config, log, permissions (and Node compatibility)", () => import("../src/permissions.ts")],
  ["gRPC server (HTTP/2, HPACK)", () => import("../src/transport/http2.ts")],
  ["protobufjs + agent.proto codecs", () => import("../src/service/wire.ts")],
  ["capture (spool, layouts, disk)", () => import("../src/capture/service.ts")],
  ["model registry, server, agent (the rest)", () => import("../src/agent.ts")],
  ["ONNX Runtime dlopen + API table", async () => {
    const [{ OnnxRuntime }, { npmLibraryPath }] = await Promise.all([
      import("../ffi/onnxruntime.ts"),
      import("../src/inference/runtime.ts"),
    ]);
    ort = OnnxRuntime.open(npmLibraryPath());
  }],
  // What later calls load when first needed.
  [FIRST_USE, () => Promise.resolve()],
  ["OrtEnv (first LoadModel)", () => Promise.resolve(ort!.env)],
  ["tar archives: tar-stream (first .tar.gz package)", () => import("../src/packages/archive.ts")],
  ["signing, X.509: @peculiar/x509 (first signed package)", () => import("../src/packages/oms/mod.ts")],
  ["reflection descriptors (first reflection call)", () => import("../src/service/reflection.ts")],
  [
    "S3 signer: @smithy (first upload)",
    () => Promise.all([import("@smithy/signature-v4"), import("@smithy/hash-node")]),
  ],
  ["image codecs: pngjs, jpeg-js (client, first image)", () => Promise.all([import("pngjs"), import("jpeg-js")])],
  ["the client (client commands)", () => import("../src/client/client.ts")],
];

const rows = [];
let before = sample();
const base = before;
for (const [what, load] of STAGES) {
  const started = performance.now();
  await load();
  const ms = performance.now() - started;
  const after = sample();
  rows.push({
    what,
    ms,
    rssKiB: after.rssKiB - before.rssKiB,
    anonKiB: after.anonKiB - before.anonKiB,
    heapKiB: (after.heapUsed - before.heapUsed) / 1024,
    externalKiB: (after.external - before.external) / 1024,
  });
  before = after;
}
console.log(JSON.stringify({ base: { rssKiB: base.rssKiB, heapKiB: base.heapUsed / 1024 }, rows }));
