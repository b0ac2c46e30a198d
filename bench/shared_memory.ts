// The benchmark's shared memory: one SysV segment and one POSIX object per model, filled once with the
// input as a client reusing its segment would, and what mapping such a segment per request costs.

import { Libc } from "../ffi/libc.ts";
import { type SharedMemoryKind, SharedMemoryReader } from "../src/inference/shm.ts";
import { PosixObject, SysvSegment } from "../tests/helpers/shm_segments.ts";
import { percentile } from "./stats.ts";

/** Above any SysV id (at most 2^31 - 1), so in "both" mode a SysV handle can never name one of our objects. */
const POSIX_ID_BASE = 2 ** 32;
const PAGE_BYTES = 4096;

export interface ModelSegments {
  byteLength: number;
  sysvId: number;
  /** A SysV segment for the model's first output, as large as the input (room enough for cls and det). */
  sysvOutput: SysvSegment;
  /** Segment id of the POSIX object `<prefix><posixId>`. */
  posixId: number;
}

/** Segments the benchmark made; removeAll() must run whatever happens. */
export class BenchSegments {
  /** Unique per run, so a concurrent run or a leftover object cannot be mistaken for ours. */
  readonly posixPrefix = `/edge_agent_bench_${Deno.pid}_`;
  readonly byModel: Record<string, ModelSegments> = {};
  readonly #owned: { remove(): void }[] = [];

  /** The agent config that serves both kinds: a POSIX object of the id wins, else the id is a SysV shmid. */
  agentKeys(): Record<string, unknown> {
    return { edge_agent_shared_memory: "both", edge_agent_shm_posix_prefix: this.posixPrefix };
  }

  add(key: string, input: Float32Array): ModelSegments {
    const sysv = new SysvSegment(input.byteLength);
    this.#owned.push(sysv);
    sysv.write(0, input);
    const posixId = POSIX_ID_BASE + Object.keys(this.byModel).length;
    const posix = new PosixObject(`${this.posixPrefix}${posixId}`, input.byteLength);
    this.#owned.push(posix);
    posix.write(0, input);
    const sysvOutput = new SysvSegment(input.byteLength);
    this.#owned.push(sysvOutput);
    return (this.byModel[key] = { byteLength: input.byteLength, sysvId: sysv.id, sysvOutput, posixId });
  }

  removeAll(): void {
    for (const segment of this.#owned.splice(0)) segment.remove();
  }
}

/** Per-request cost (µs, medians unless said) of one way the agent maps one model's segment. */
export interface MappingCost {
  model: string;
  /** Which segment and reader mode, e.g. "SysV, both". */
  how: string;
  bytes: number;
  pages: number;
  openUs: number;
  releaseUs: number;
  /** open + release of one iteration. */
  cycleUs: number;
  cycleP99Us: number;
  /** Reading one byte per page of a fresh mapping: its page faults, as ORT's Run meets them. */
  firstReadUs: number;
  /** The same reads on a mapping kept across iterations: the loop without page faults. */
  keptReadUs: number;
  /** Unmapping once the pages are mapped in: the page tables to tear down. */
  releaseAfterReadUs: number;
}

/** Keeps the page reads observable, so the JIT cannot drop them. */
let sink = 0;

function touchPages(bytes: Uint8Array): void {
  let sum = 0;
  for (let i = 0; i < bytes.byteLength; i += PAGE_BYTES) sum += bytes[i];
  sink += sum;
}

/**
 * Times SharedMemoryReader.open() + release() (what the agent does per shm tensor) in this process on the
 * benchmark's segments: SysV read as in "both" mode (a shm_open miss first) and in "sysv" mode, POSIX as in
 * "both" mode (found at once, as in "posix" mode).
 */
export function mappingCosts(segments: BenchSegments, iterations: number): MappingCost[] {
  const libc = Libc.open();
  try {
    // keepSeconds 0 attaches afresh per request; the agent's default keeps a SysV segment attached.
    const reader = (kind: SharedMemoryKind, keepSeconds: number) =>
      new SharedMemoryReader(libc, { kind, posixPrefix: segments.posixPrefix, sysvKeepAttachedSeconds: keepSeconds });
    const costs: MappingCost[] = [];
    for (const [model, s] of Object.entries(segments.byModel)) {
      const ways: [string, SharedMemoryKind, number, number][] = [
        ["SysV, both", "both", s.sysvId, 0],
        ["SysV, sysv", "sysv", s.sysvId, 0],
        ["SysV, sysv, kept", "sysv", s.sysvId, 10],
        ["POSIX, both", "both", s.posixId, 0],
      ];
      for (const [how, kind, id, keepSeconds] of ways) {
        const r = reader(kind, keepSeconds);
        const handle = { size: BigInt(s.byteLength), offset: 0n, segmentId: BigInt(id) };
        const open = () => r.open(model, handle, s.byteLength, 4);
        const opens: number[] = [];
        const releases: number[] = [];
        const cycles: number[] = [];
        const firstReads: number[] = [];
        const releasesAfterRead: number[] = [];
        const keptReads: number[] = [];
        for (let i = -20; i < iterations; i++) {
          const t0 = performance.now();
          const region = open();
          const t1 = performance.now();
          region.release();
          const t2 = performance.now();
          const touched = open();
          const t3 = performance.now();
          touchPages(touched.bytes);
          const t4 = performance.now();
          touched.release();
          const t5 = performance.now();
          // Negative i: warm-up for the JIT and the kernel's caches.
          if (i < 0) continue;
          opens.push(t1 - t0);
          releases.push(t2 - t1);
          cycles.push(t2 - t0);
          firstReads.push(t4 - t3);
          releasesAfterRead.push(t5 - t4);
        }
        const kept = open();
        try {
          for (let i = -20; i < iterations; i++) {
            const started = performance.now();
            touchPages(kept.bytes);
            if (i >= 0) keptReads.push(performance.now() - started);
          }
        } finally {
          kept.release();
          r.close();
        }
        const us = (samples: number[], p = 50) => percentile(samples, p) * 1000;
        costs.push({
          model,
          how,
          bytes: s.byteLength,
          pages: Math.ceil(s.byteLength / PAGE_BYTES),
          openUs: us(opens),
          releaseUs: us(releases),
          cycleUs: us(cycles),
          cycleP99Us: us(cycles, 99),
          firstReadUs: us(firstReads),
          keptReadUs: us(keptReads),
          releaseAfterReadUs: us(releasesAfterRead),
        });
      }
    }
    if (Number.isNaN(sink)) throw new Error("unreachable: page reads summed to NaN");
    return costs;
  } finally {
    libc.close();
  }
}
