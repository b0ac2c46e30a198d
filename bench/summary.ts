// The benchmark's closing table: each figure the project has a target for, beside that target. Benches
// add what they measured; a target no bench measured in this run says so rather than vanishing.
//
//   import { ROW, summary } from "./summary.ts";
//   summary.add({ what: ROW.rssIdle, measured: "72.1 MiB", met: true });   // a row declared below
//   summary.add({ what: "my new figure", measured: "3.2x", target: ">= 3x", met: true });   // a row of its own
//   console.log(summary.render());

import { table } from "./stats.ts";

/** The rows every full run is expected to fill, by the words the table prints. */
export const ROW = {
  rssIdle: "RSS idle",
  rssLoaded: "RSS with cls + det loaded",
  startup: "spawn -> serving",
  concurrency4: "4 concurrent clients on cls (separate connections), throughput vs one client",
  concurrency8: "8 concurrent clients on cls, throughput vs 4",
  captureAcks: "durable capture acks/s through the agent (8-32 senders)",
  predictUnderCaptures: "Predict p50 while 500 captures/s flow, vs alone",
  detSharedMemory: "det, inputs and outputs by shared memory, vs in-process",
} as const;

const TARGETS: Record<string, string> = {
  [ROW.rssIdle]: "<= 80 MiB",
  [ROW.rssLoaded]: "<= in-process onnxruntime-node with the same models + 30 MiB",
  [ROW.startup]: "<= 200 ms",
  [ROW.concurrency4]: ">= 1.8x",
  [ROW.concurrency8]: ">= 1.0x (no worse than 4)",
  [ROW.captureAcks]: ">= 10,000/s",
  [ROW.predictUnderCaptures]: "<= 1.10x",
  [ROW.detSharedMemory]: "<= 1.02x",
};

export const NOT_MEASURED = "not measured in this run";

export interface SummaryRow {
  what: string;
  /** The figure as it should read, with its unit, e.g. "72.1 MiB" or "1.93x". */
  measured: string;
  /** Needed for a row not declared in ROW; a declared row's target is filled in. */
  target?: string;
  /** Whether the target is met; null for a figure without a pass/fail reading. */
  met: boolean | null;
}

export class Summary {
  readonly #rows: Required<SummaryRow>[] = [];
  readonly #targets: Record<string, string>;

  constructor(targets: Record<string, string> = TARGETS) {
    this.#targets = targets;
  }

  /** Records one measured figure; adding the same `what` twice prints both. */
  add(row: SummaryRow): void {
    const target = row.target ?? this.#targets[row.what];
    if (target === undefined) throw new Error(`summary: "${row.what}" is not a declared row, so it needs a target`);
    this.#rows.push({ ...row, target });
  }

  /** Declared rows in their order (with what was added for them), then the other rows as added. */
  rows(): Required<SummaryRow>[] {
    const declared = Object.keys(this.#targets).flatMap((what) => {
      const added = this.#rows.filter((r) => r.what === what);
      return added.length > 0 ? added : [{ what, measured: NOT_MEASURED, target: this.#targets[what], met: null }];
    });
    return [...declared, ...this.#rows.filter((r) => !(r.what in this.#targets))];
  }

  render(): string {
    const verdict = (met: boolean | null) => (met === null ? "" : met ? "met" : "MISSED");
    return table(
      ["what", "measured", "target", "result"],
      this.rows().map((r) => [r.what, r.measured, r.target, verdict(r.met)]),
      3,
    );
  }
}

/** The run's table: every bench of the run adds to this one. */
export const summary = new Summary();
