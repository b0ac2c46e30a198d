// Micro-benchmark of the durable capture path: acknowledged captures per second from concurrent writers.

import type { Destination } from "./destination.ts";
import { CaptureService } from "./service.ts";

export interface CaptureBenchOptions {
  fsync: boolean;
  /** Concurrent writers, each awaiting its acknowledgement before the next capture; default 8. */
  writers?: number;
  durationMs?: number;
  /** Bytes of the one input tensor of each capture; default 1024. */
  tensorBytes?: number;
  /** Where the state folder goes (a temporary folder under it, removed afterwards); default the system's. */
  dir?: string;
}

export interface CaptureBenchResult {
  fsync: boolean;
  writers: number;
  acks: number;
  seconds: number;
  acksPerSecond: number;
  /** Spool write+fsync rounds; acks per round shows how much group commit merges. */
  rounds: number;
  acksPerRound: number;
}

/** Uploads are held back (no sealing during the run), so this measures admission + encoding + spool append. */
export async function benchCaptureAppends(options: CaptureBenchOptions): Promise<CaptureBenchResult> {
  const writers = options.writers ?? 8;
  const durationMs = options.durationMs ?? 2000;
  const data = new Uint8Array(options.tensorBytes ?? 1024).map((_, i) => i);
  const stateDir = await Deno.makeTempDir({ dir: options.dir, prefix: "capture-bench-" });
  const nowhere: Destination = { kind: "Disk", put: () => Promise.resolve() };
  const service = await CaptureService.open({
    stateDir,
    deviceFleetName: "bench",
    deviceName: "bench",
    destination: "Disk",
    destinationImpl: nowhere,
    fsync: options.fsync,
    bufferSize: 1e9,
    maxSpoolBytes: 2 ** 40,
    batchSize: 1e9,
    pushPeriodSeconds: 3600,
    segmentBytes: 64 * 1024 * 1024,
  });
  let acks = 0;
  let seq = 0;
  let seconds = 0;
  let rounds = 0;
  const t0 = performance.now();
  const end = t0 + durationMs;
  try {
    await Promise.all(Array.from({ length: writers }, async (_, w) => {
      while (performance.now() < end) {
        await service.capture({
          captureId: `w${w}-${seq++}`,
          modelName: "bench-model",
          inferenceTimestamp: { seconds: 1_700_000_000, nanos: 0 },
          inputTensors: [{ name: "x", dataType: 5, shape: [data.length / 4], data }],
          outputTensors: [{ name: "y", dataType: 5, shape: [4], data: data.subarray(0, 16) }],
          inputs: [],
          outputs: [],
        });
        acks++;
      }
    }));
    seconds = (performance.now() - t0) / 1000;
    rounds = service.stats().spoolRounds;
  } finally {
    await service.close();
    await Deno.remove(stateDir, { recursive: true });
  }
  return {
    fsync: options.fsync,
    writers,
    acks,
    seconds,
    acksPerSecond: acks / seconds,
    rounds,
    acksPerRound: acks / Math.max(1, rounds),
  };
}

if (import.meta.main) {
  for (const fsync of [true, false]) {
    const r = await benchCaptureAppends({ fsync });
    console.log(
      `capture appends, ${r.writers} writers, fsync ${fsync ? "on " : "off"}: ${Math.round(r.acksPerSecond)} acks/s ` +
        `(${r.acks} in ${r.seconds.toFixed(2)} s, ${r.acksPerRound.toFixed(1)} acks per write round)`,
    );
  }
}
