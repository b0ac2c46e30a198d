// Dynamic batching: concurrent Predicts on one model combined into one Run along the first dimension,
// each caller handed back exactly its own rows. Per model, and only when the config turns it on.
//
// While the model has a Run slot free a request starts at once, alone: a lone client never waits.
// While its Runs are going, requests queue; when one ends, the queue's head and the requests of the
// same shape behind it go into the next Run together. After a Run of n requests, the next one waits up to max_delay_ms for
// n requests to be there (clients answered together come back together), so batches stay whole
// under steady load and a client left alone waits at most once.

import type { BatchingSettings } from "../config.ts";
import { AgentError, Status } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { BorrowedOutput, PredictTiming } from "./models.ts";
import { type BoundInput, shapeText, type TensorSpec } from "./tensors.ts";

/** Why a request on a batching model ran alone rather than in a batch (metrics label). */
export type AloneReason = "shared_memory" | "shape" | "too_large" | "queue_full" | "fallback";

/** What is counted about batches (src/service/metrics.ts). */
export interface BatchObserver {
  /** A Run of the batch queue: `requests` requests (1 when nobody else was waiting). */
  batch(model: string, requests: number): void;
  /** A request that did not go through the batch queue. */
  unbatched(model: string, reason: AloneReason): void;
}

/** The Run the batcher uses, for one request or a batch alike: ModelRegistry's. */
export type RunPredict = <T>(
  bound: BoundInput[],
  consume: (outputs: BorrowedOutput[]) => T,
  timing: PredictTiming,
  signal?: AbortSignal,
) => Promise<T>;

/** Why a model cannot be batched, or null when every input and output is batched along dimension 0. */
export function unbatchable(inputs: TensorSpec[], outputs: TensorSpec[]): string | null {
  for (const [role, specs] of [["input", inputs], ["output", outputs]] as const) {
    for (const spec of specs) {
      if (spec.shape.length === 0 || spec.shape[0] !== -1) {
        return `${role} "${spec.name}" has shape ${shapeText(spec.shape)}: its first dimension is not dynamic`;
      }
    }
  }
  return null;
}

interface Batch {
  /** Members still waiting for their rows; when none is left the Run is stopped. */
  live: number;
  controller: AbortController;
}

interface Waiter {
  /** In model input order. */
  bound: BoundInput[];
  rows: number;
  /** Requests with the same key (every dimension but the first) can share a Run. */
  key: string;
  consume: (outputs: BorrowedOutput[]) => unknown;
  timing: PredictTiming;
  signal: AbortSignal | undefined;
  enqueuedAt: number;
  done: PromiseWithResolvers<unknown>;
  /** The Run it is part of; null while queued. */
  batch: Batch | null;
  /** Settled (answered, failed or given up). */
  settled: boolean;
  onAbort: () => void;
}

const newTiming = (): PredictTiming => ({ bindMs: 0, runMs: 0, encodeMs: 0, copiedInputs: 0, sharedMemoryInputs: 0 });

export class Batcher {
  readonly #queue: Waiter[] = [];
  /** Runs going now, at most `maxRuns`. */
  #running = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Requests the last Run took: how many the next one waits for (up to max_delay_ms). */
  #expected = 1;
  /** Set when a batch's outputs turned out not to split by rows: from then on every request runs alone. */
  #disabled = false;

  constructor(
    readonly model: string,
    readonly settings: BatchingSettings,
    /** Runs of the model at once (one when a Run's intra-op threads take every core). */
    private readonly maxRuns: number,
    private readonly run: RunPredict,
    private readonly log: Logger,
    private readonly observer: BatchObserver | undefined,
  ) {}

  /** Runs the request in a batch when it can, else alone; resolves with what `consume` returned. */
  predict<T>(
    bound: BoundInput[],
    consume: (outputs: BorrowedOutput[]) => T,
    timing: PredictTiming,
    signal?: AbortSignal,
  ): Promise<T> {
    const reason = this.#aloneReason(bound);
    if (reason) {
      this.observer?.unbatched(this.model, reason);
      return this.run(bound, consume, timing, signal);
    }
    const ordered = bound.toSorted((a, b) => a.inputIndex - b.inputIndex);
    const waiter: Waiter = {
      bound: ordered,
      rows: ordered[0].shape[0],
      key: ordered.map((b) => b.shape.slice(1).join(",")).join(";"),
      consume,
      timing,
      signal,
      enqueuedAt: performance.now(),
      done: Promise.withResolvers(),
      batch: null,
      settled: false,
      onAbort: () => this.#abandon(waiter),
    };
    signal?.addEventListener("abort", waiter.onAbort, { once: true });
    this.#queue.push(waiter);
    this.#schedule(false);
    return waiter.done.promise as Promise<T>;
  }

  #aloneReason(bound: BoundInput[]): AloneReason | null {
    if (this.#disabled) return "fallback";
    // Shared memory exists to spare copies; a batch copies every input once.
    if (bound.some((b) => !("bytes" in b.source))) return "shared_memory";
    const rows = bound[0]?.shape[0] ?? 0;
    if (rows < 1 || bound.some((b) => b.shape[0] !== rows)) return "shape";
    if (rows >= this.settings.maxBatchSize) return "too_large";
    if (this.#queue.length >= this.settings.maxQueue) return "queue_full";
    return null;
  }

  /** The caller went (deadline, reset, disconnect): out of the queue, or its rows dropped from its Run. */
  #abandon(waiter: Waiter): void {
    if (waiter.settled) return;
    waiter.settled = true;
    waiter.done.reject(waiter.signal!.reason);
    const batch = waiter.batch;
    if (batch) {
      // Nobody left to answer: stop the Run inside ONNX Runtime.
      if (--batch.live === 0) batch.controller.abort(waiter.signal!.reason);
      return;
    }
    this.#queue.splice(this.#queue.indexOf(waiter), 1);
    this.#schedule(false);
  }

  /** Starts the next Run if a slot is free and the queue's head has company enough or waited enough. */
  #schedule(timerFired: boolean): void {
    if (this.#running >= this.maxRuns || this.#queue.length === 0) return;
    const { group, full } = this.#headGroup();
    const waited = performance.now() - this.#queue[0].enqueuedAt;
    if (timerFired || full || group.length >= this.#expected || waited >= this.settings.maxDelayMs) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#dispatch(group);
    } else if (this.#timer === undefined) {
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.#schedule(true);
      }, this.settings.maxDelayMs - waited);
    }
  }

  /** The head of the queue and the requests of its shape behind it, as many rows as a Run takes. */
  #headGroup(): { group: Waiter[]; full: boolean } {
    const key = this.#queue[0].key;
    const group: Waiter[] = [];
    let rows = 0;
    for (const waiter of this.#queue) {
      if (waiter.key !== key) continue;
      if (rows + waiter.rows > this.settings.maxBatchSize) return { group, full: true };
      group.push(waiter);
      rows += waiter.rows;
    }
    return { group, full: rows === this.settings.maxBatchSize };
  }

  #dispatch(group: Waiter[]): void {
    const taken = new Set(group);
    const rest = this.#queue.filter((w) => !taken.has(w));
    this.#queue.length = 0;
    this.#queue.push(...rest);
    this.#expected = group.length;
    this.#running++;
    this.observer?.batch(this.model, group.length);
    const run = group.length === 1 ? this.#alone(group[0]) : this.#together(group);
    run.catch((error) => this.log.error("batch failed", { model: this.model, error: String(error?.stack ?? error) }))
      .finally(() => {
        // Every member is answered by now; should one not be, it must not wait forever.
        for (const waiter of group.filter((w) => !w.settled)) {
          waiter.settled = true;
          waiter.signal?.removeEventListener("abort", waiter.onAbort);
          waiter.done.reject(new AgentError(Status.INTERNAL, `model ${this.model}: the batch of this request failed`));
        }
        this.#running--;
        this.#schedule(false);
      });
  }

  /** One request in its own Run, its inputs used in place, stopped by its own signal. */
  async #alone(waiter: Waiter): Promise<void> {
    waiter.signal?.removeEventListener("abort", waiter.onAbort);
    if (waiter.settled) return;
    waiter.settled = true;
    const ran = performance.now();
    try {
      waiter.done.resolve(await this.run(waiter.bound, waiter.consume, waiter.timing, waiter.signal));
      // Time in the queue counts as run time, as the caller sees it.
      waiter.timing.runMs += ran - waiter.enqueuedAt;
    } catch (error) {
      waiter.done.reject(error);
    }
  }

  /** One Run over the members' inputs concatenated along dimension 0; each member gets its rows. */
  async #together(group: Waiter[]): Promise<void> {
    const batch: Batch = { live: group.length, controller: new AbortController() };
    for (const waiter of group) waiter.batch = batch;
    const total = group.reduce((sum, w) => sum + w.rows, 0);
    let unsplit = null as string | null;
    try {
      await this.run(
        concatenate(group, total),
        (outputs) => {
          const odd = outputs.find((o) => o.shape[0] !== total);
          if (odd) {
            unsplit = `output "${odd.spec.name}" has shape ${shapeText(odd.shape)} for a batch of ${total} rows`;
            return;
          }
          const finished = performance.now();
          let start = 0;
          for (const waiter of group) {
            const rows = waiter.rows;
            const from = start;
            start += rows;
            if (waiter.settled) continue;
            this.#answer(waiter, finished, group.length, outputs.map((o) => rowsOf(o, from, rows, total)));
          }
        },
        newTiming(),
        batch.controller.signal,
      );
    } catch (error) {
      // Every member went: each was answered as it went.
      if (batch.controller.signal.aborted) return;
      // One member's data may be what the model refused: each member runs alone, and gets its own answer.
      this.log.debug("batch failed; its requests run alone", {
        model: this.model,
        requests: group.length,
        error: (error as Error).message,
      });
      await this.#again(group);
      return;
    }
    if (unsplit) {
      this.#disabled = true;
      this.log.warn("dynamic batching turned off for this model: its outputs do not split by rows", {
        model: this.model,
        reason: unsplit,
      });
      await this.#again(group);
    }
  }

  /** The members of a failed batch still waiting, each in a Run of its own. */
  async #again(group: Waiter[]): Promise<void> {
    await Promise.all(
      group.filter((w) => !w.settled).map((waiter) => {
        this.observer?.unbatched(this.model, "fallback");
        return this.#alone(waiter);
      }),
    );
  }

  #answer(waiter: Waiter, finished: number, requests: number, outputs: BorrowedOutput[]): void {
    waiter.signal?.removeEventListener("abort", waiter.onAbort);
    waiter.settled = true;
    const { timing } = waiter;
    timing.runMs = finished - waiter.enqueuedAt;
    timing.batchRequests = requests;
    try {
      waiter.done.resolve(waiter.consume(outputs));
    } catch (error) {
      waiter.done.reject(error);
    }
    timing.encodeMs = performance.now() - finished;
  }
}

/** Rows [from, from + rows) of a batch output: a view of ORT's buffer, valid as long as the output. */
function rowsOf(output: BorrowedOutput, from: number, rows: number, total: number): BorrowedOutput {
  const rowBytes = output.byteLength / total;
  const bytes = output.bytes.subarray(from * rowBytes, (from + rows) * rowBytes);
  return {
    spec: output.spec,
    shape: [rows, ...output.shape.slice(1)],
    byteLength: bytes.byteLength,
    bytes,
    copyInto: (target: Uint8Array) => target.set(bytes),
  };
}

/** The members' inputs, each concatenated along dimension 0: the one copy a batch makes of them. */
function concatenate(group: Waiter[], total: number): BoundInput[] {
  return group[0].bound.map((first, i): BoundInput => {
    const bytes = new Uint8Array(group.reduce((sum, w) => sum + w.bound[i].byteLength, 0));
    let offset = 0;
    for (const waiter of group) {
      bytes.set((waiter.bound[i].source as { bytes: Uint8Array }).bytes, offset);
      offset += waiter.bound[i].byteLength;
    }
    return {
      inputIndex: first.inputIndex,
      spec: first.spec,
      shape: [total, ...first.shape.slice(1)],
      label: `input "${first.spec.name}" of a batch of ${group.length} requests`,
      byteLength: bytes.byteLength,
      source: { bytes },
    };
  });
}
