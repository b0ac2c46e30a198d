// Fuzzing of the transport's parsers (tests/helpers/transport_fuzz.ts has the targets and the
// input generators): at least 100,000 generated and mutated inputs per target and run, seeded and
// reproducible. Each target runs in a worker; an input that does not finish within INPUT_BOUND_MS
// (an endless loop, a wait that never ends) fails the test with its index.
//
// The seed is printed; FUZZ_SEED=<n> replays a run, FUZZ_SCALE=<x> multiplies the input counts.

import assert from "node:assert/strict";

const SEED = Number(Deno.env.get("FUZZ_SEED") ?? Math.floor(Math.random() * 2 ** 32));
const SCALE = Number(Deno.env.get("FUZZ_SCALE") ?? 1);
console.log(`transport fuzz seed: ${SEED} (replay with FUZZ_SEED=${SEED})`);
/** Generous: one input takes microseconds, but the machine may be loaded. */
const INPUT_BOUND_MS = 10_000;

async function fuzz(target: string, count: number): Promise<void> {
  const at = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(new URL("./helpers/transport_fuzz_worker.ts", import.meta.url), { type: "module" });
  let last = -1;
  let watchdog: ReturnType<typeof setInterval> | undefined;
  try {
    const result = await new Promise<{ summary?: string; error?: string }>((resolve) => {
      worker.onmessage = (event) => resolve(event.data);
      worker.onerror = (event) => {
        event.preventDefault();
        resolve({ error: event.message });
      };
      watchdog = setInterval(() => {
        const now = Atomics.load(at, 0);
        if (now === last) {
          resolve({ error: `input ${now} did not finish within ${INPUT_BOUND_MS} ms (FUZZ_SEED=${SEED})` });
        }
        last = now;
      }, INPUT_BOUND_MS);
      worker.postMessage({ target, seed: SEED, count: Math.round(count * SCALE), at });
    });
    if (result.error) assert.fail(`${target}: ${result.error}`);
    console.log(`  ${result.summary}`);
  } finally {
    clearInterval(watchdog);
    worker.terminate();
  }
}

Deno.test("fuzz: HTTP/2 connections (frames, stream states, headers, messages) end only in protocol errors", () =>
  fuzz("connections", 100_000));

Deno.test("fuzz: Incoming reassembles frames from any split of the byte stream, and refuses oversized ones", () =>
  fuzz("incoming", 100_000));

Deno.test("fuzz: the server's reused read buffer gives the frames sent whatever the reads, within its bound", () =>
  fuzz("frameBuffer", 100_000));

Deno.test("fuzz: the HPACK decoder only answers headers or CompressionError, with its table bounded", () =>
  fuzz("hpack", 100_000));

Deno.test("fuzz: request header rules answer a head or a reason for any header list, never throw", () =>
  fuzz("headers", 100_000));

Deno.test("fuzz: MessageReader assembles any split of a message, and reports problems instead of throwing", () =>
  fuzz("messages", 100_000));
