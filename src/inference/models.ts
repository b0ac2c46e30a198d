// The model registry: load/unload lifecycle, in-flight accounting and the memory budget.
// A session is released only after every Run on it has returned.

import { type OnnxRuntime, OrtError, RunOptions, Session, Value } from "../../ffi/onnxruntime.ts";
import { Batcher, type BatchObserver, unbatchable } from "./batching.ts";
import { type AgentConfig, batchingFor, isModelName, MAX_MODEL_NAME } from "../config.ts";
import {
  AgentError,
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  resourceExhausted,
  Status,
} from "../errors.ts";
import type { Logger } from "../log.ts";
import { openPackage } from "../packages/load.ts";
import { RunSlots } from "./run_slots.ts";
import { concurrentRunsFor, sessionOptions, type ThreadPolicy, threadPolicy } from "./runtime.ts";
import type { SharedMemoryReader, ShmRegion } from "./shm.ts";
import { bindOutputLocations, type OutputTarget, OutputWrites, type WrittenOutput } from "./shm_outputs.ts";
import { bindInputs, type BoundInput, inputValue, outputByteLength, type TensorSpec, toSpecs } from "./tensors.ts";
import type { OutputLocation, Tensor } from "../service/wire.ts";

const ORT_INVALID_ARGUMENT = 2;
const NO_BYTES = new Uint8Array(0);

export interface ModelInfo {
  name: string;
  url: string;
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  sizeBytes: number;
  loadSeconds: number;
  /** The package's version (edge-model.json "version"); absent when it names none. */
  version?: string;
  /** Set when a deployment loaded it (rather than LoadModel). */
  deployment?: Deployed;
  /** Its Runs: going now, the most at once since it was loaded, waiting for a slot (live, for metrics). */
  runs: RunSlots;
}

/** What a deployment manifest said of a model it loaded. */
export interface Deployed {
  /** SHA-256 of the package file, hex. */
  sha256: string;
  version: string;
}

/**
 * An output tensor whose bytes are borrowed from ORT: valid only inside the consumer callback. An
 * output the client asked for in shared memory has no bytes but `sharedMemory`: where it was written.
 */
export interface BorrowedOutput {
  spec: TensorSpec;
  shape: number[];
  byteLength: number;
  /** A view of ORT's buffer (empty when the output went to shared memory). */
  readonly bytes: Uint8Array;
  /** Copies the bytes into `target` (byteLength bytes) without making a view of ORT's buffer. */
  copyInto(target: Uint8Array): void;
  /** Set when the output was written into the caller's shared memory: the answer carries no bytes. */
  sharedMemory?: WrittenOutput;
}

/** Where a Predict's time went (milliseconds), for debug logs and the benchmark. */
export interface PredictTiming {
  /** Checking request tensors and wrapping them as ORT values. */
  bindMs: number;
  /** ONNX Runtime's Run, including the hop to and from the worker thread. */
  runMs: number;
  /** Encoding the response from ORT's output buffers. */
  encodeMs: number;
  /** Inputs that had to be copied because their bytes were not aligned to the element size. */
  copiedInputs: number;
  /** Inputs read from shared memory (mapped during bind, unmapped after the Run). */
  sharedMemoryInputs: number;
  /** Outputs written into shared memory (by ORT in place, or copied after the Run). */
  sharedMemoryOutputs?: number;
  /** Of those, the ones copied after the Run. */
  copiedOutputs?: number;
  /** Requests in the Run this one was part of (dynamic batching; absent when it ran alone). */
  batchRequests?: number;
  /** The Run went on the agent's own thread (edge_agent_inline_run_max_us), not to a worker thread. */
  onThisThread?: boolean;
}

/** One Run's arguments: values feeding the model's inputs at `inputIndexes`, and outputs to fill in place. */
interface RunArgs {
  session: Session;
  inputIndexes: number[];
  inputs: Value[];
  /** The inputs' bytes in all: what a Run's expected time scales with (see #runsHere). */
  inputBytes: number;
  preallocated?: (Value | null)[];
}

interface Entry {
  info: ModelInfo;
  /** null while the model is loading. */
  session: Session | null;
  inFlight: number;
  /** Resolves when inFlight drops to zero after an unload began. */
  drained: PromiseWithResolvers<void> | null;
  /** Combines concurrent Predicts when the config turns dynamic batching on for this model. */
  batcher: Batcher | null;
}

export class ModelRegistry {
  readonly #models = new Map<string, Entry>();
  /** A "change" event whenever a model becomes loaded or stops being loaded (health Watch). */
  readonly changes = new EventTarget();
  #reservedBytes = 0;
  readonly threads: ThreadPolicy;
  /** Predicts in flight on every model (queued for a batch, binding, running or encoding). */
  #predicts = 0;
  /** Per session, its recent Runs' milliseconds per input byte (a moving average; null after the first Run). */
  readonly #runCost = new WeakMap<Session, number | null>();

  constructor(
    private readonly ort: OnnxRuntime,
    private readonly shm: SharedMemoryReader,
    private readonly config: AgentConfig,
    private readonly log: Logger,
    private readonly batchObserver?: BatchObserver,
  ) {
    this.threads = threadPolicy(config);
  }

  async load(url: string, name: string): Promise<ModelInfo> {
    checkModelName(name);
    if (this.#models.has(name)) throw alreadyExists(`a model named ${name} is already loaded`);
    // Reserve the name before the first await, so concurrent loads of one name cannot both win.
    const placeholder = pending(name, url, concurrentRunsFor(this.config, name));
    this.#models.set(name, placeholder);
    try {
      const entry = await this.#open(url, name, this.config.modelRoots);
      this.#models.set(name, entry);
      this.changes.dispatchEvent(new Event("change"));
      return entry.info;
    } catch (error) {
      this.#models.delete(name);
      throw error;
    }
  }

  /**
   * Loads the package at `path` (under `root`) as `name` for a deployment. A model already loaded under
   * that name keeps serving until the new one is ready; then the name points to the new one in one
   * step (Predict takes its entry synchronously) and the old session is released once its in-flight
   * Runs have returned. A package that fails to verify or load leaves the old one serving.
   */
  async deploy(name: string, path: string, root: string, origin: Deployed & { url: string }): Promise<ModelInfo> {
    checkModelName(name);
    const previous = this.#models.get(name);
    if (previous?.session === null) throw alreadyExists(`model ${name} is being loaded`);
    const placeholder = previous ? null : pending(name, origin.url, concurrentRunsFor(this.config, name));
    if (placeholder) this.#models.set(name, placeholder);
    let entry: Entry;
    try {
      entry = await this.#open(path, name, [root]);
    } catch (error) {
      if (placeholder) this.#models.delete(name);
      throw error;
    }
    const current = this.#models.get(name);
    const declared = entry.info.version;
    const problem = declared !== undefined && declared !== origin.version
      ? failedPrecondition(`package of model ${name} says version ${declared}, the deployment says ${origin.version}`)
      // Unloaded and loaded again by hand while this one loaded: the newer request wins.
      : current !== undefined && current !== (previous ?? placeholder)
      ? alreadyExists(`model ${name} was loaded by hand meanwhile`)
      : null;
    if (problem) {
      if (placeholder && current === placeholder) this.#models.delete(name);
      await this.#release(entry);
      throw problem;
    }
    entry.info.url = origin.url;
    entry.info.version = origin.version;
    entry.info.deployment = { sha256: origin.sha256, version: origin.version };
    this.#models.set(name, entry);
    this.changes.dispatchEvent(new Event("change"));
    // Unless an UnloadModel took it out meanwhile (and releases it itself).
    if (previous && current === previous) {
      this.log.info("model swapped", { model: name, version: origin.version, previous: previous.info.version });
      await this.#release(previous);
    }
    return entry.info;
  }

  /** Verifies and opens a package into a new entry, reserving its memory; nothing is left behind on failure. */
  async #open(url: string, name: string, roots: string[]): Promise<Entry> {
    const entry = pending(name, url, concurrentRunsFor(this.config, name));
    const started = performance.now();
    let session: Session | null = null;
    let reserved = false;
    try {
      const model = await openPackage(url, {
        roots,
        stateDir: this.config.stateDir,
        rootCertsPath: this.config.rootCertsPath,
        trustedKeysPath: this.config.trustedModelKeys,
        allowUnsigned: this.config.allowUnsignedModels,
        archiveLimits: {
          totalBytes: this.config.packageMaxBytes,
          fileBytes: this.config.packageMaxBytes,
          ratio: this.config.packageMaxRatio,
        },
      });
      if (model.verification) {
        const signer = model.verification.signer;
        this.log.info("model verified", {
          model: name,
          url,
          method: model.verification.method,
          signer: signer.subject,
        });
      } else {
        this.log.warn("loading an unsigned model (edge_agent_allow_unsigned_models is on)", { model: name, url });
      }
      this.#reserve(name, model.bytes.byteLength);
      reserved = true;
      entry.info.sizeBytes = model.bytes.byteLength;
      const version: unknown = model.manifest?.version;
      // Captures record it; Edge Manager's ModelVersion was a string of at most 64 characters.
      if (typeof version === "string" || typeof version === "number") entry.info.version = String(version).slice(0, 64);
      const options = sessionOptions(this.ort, this.config, name);
      try {
        session = await Session.create(this.ort, model.bytes, options);
      } catch (error) {
        if (error instanceof OrtError) {
          throw failedPrecondition(`model ${url} cannot be loaded by ONNX Runtime: ${error.ortMessage}`);
        }
        throw error;
      } finally {
        options.release();
      }
      const inputs = toSpecs(session.inputs);
      const outputs = toSpecs(session.outputs);
      const unsupported = [...inputs.unsupported, ...outputs.unsupported];
      if (unsupported.length > 0) {
        throw failedPrecondition(
          `model ${url} uses tensor types the Edge Manager API cannot carry: ${unsupported.join(", ")}`,
        );
      }
      entry.info.inputs = inputs.specs;
      entry.info.outputs = outputs.specs;
      entry.info.loadSeconds = (performance.now() - started) / 1000;
      entry.batcher = this.#batcher(entry);
      entry.session = session;
      this.log.info("model loaded", {
        model: name,
        url,
        bytes: entry.info.sizeBytes,
        seconds: Number(entry.info.loadSeconds.toFixed(3)),
      });
      return entry;
    } catch (error) {
      session?.release();
      if (reserved) this.#reservedBytes -= entry.info.sizeBytes;
      throw error;
    }
  }

  #reserve(name: string, bytes: number): void {
    const budget = this.config.modelMemoryBudgetBytes;
    if (budget > 0 && this.#reservedBytes + bytes > budget) {
      throw resourceExhausted(
        `model ${name} needs ${bytes} bytes, but only ${
          budget - this.#reservedBytes
        } of the ${budget}-byte model memory budget (edge_agent_model_memory_budget_bytes) are free`,
      );
    }
    this.#reservedBytes += bytes;
  }

  /** Removes the model at once (new calls get NOT_FOUND), then frees it after in-flight runs end. */
  async unload(name: string): Promise<void> {
    const entry = this.#ready(name);
    this.#models.delete(name);
    this.changes.dispatchEvent(new Event("change"));
    await this.#release(entry);
    this.log.info("model unloaded", { model: name });
  }

  /** Frees an entry no longer in the map, once its in-flight Runs have returned. */
  async #release(entry: Entry): Promise<void> {
    if (entry.inFlight > 0) {
      entry.drained = Promise.withResolvers();
      await entry.drained.promise;
    }
    entry.session!.release();
    entry.session = null;
    this.#reservedBytes -= entry.info.sizeBytes;
  }

  isLoaded(name: string): boolean {
    return this.#models.get(name)?.session != null;
  }

  list(): ModelInfo[] {
    return [...this.#models.values()].filter((e) => e.session !== null).map((e) => e.info);
  }

  describe(name: string): ModelInfo {
    return this.#ready(name).info;
  }

  /**
   * Runs the model on the request tensors and hands the outputs to `consume` while ORT's buffers
   * are alive; they are released when it returns. When `signal` aborts (the caller's deadline passed
   * or it went away) a Run not yet started is not started and a running one is terminated: the call
   * rejects with `signal.reason`. Outputs named in `outputLocations` are written into the client's
   * shared memory instead (src/inference/shm_outputs.ts).
   */
  async predict<T>(
    name: string,
    tensors: Tensor[],
    consume: (outputs: BorrowedOutput[]) => T,
    timing: PredictTiming,
    signal?: AbortSignal,
    outputLocations: OutputLocation[] = [],
  ): Promise<T> {
    signal?.throwIfAborted();
    this.#predicts++;
    try {
      const started = performance.now();
      const entry = this.#ready(name);
      const bound = bindInputs(name, entry.info.inputs, tensors);
      const targets = bindOutputLocations(name, entry.info.outputs, outputLocations);
      // Outputs written into a caller's own shared memory are not split from a batch's: such a request runs alone.
      if (!entry.batcher || targets.length > 0) {
        return await this.#predict(entry, bound, consume, timing, signal, started, targets);
      }
      timing.bindMs = performance.now() - started;
      // Queued requests hold the session too: an unload waits for them as for running ones.
      entry.inFlight++;
      try {
        return await entry.batcher.predict(bound, consume, timing, signal);
      } finally {
        if (--entry.inFlight === 0) entry.drained?.resolve();
      }
    } finally {
      this.#predicts--;
    }
  }

  /** The model's batcher when the config turns batching on for it and its shapes allow it. */
  #batcher(entry: Entry): Batcher | null {
    const { name, inputs, outputs } = entry.info;
    const settings = batchingFor(this.config, name);
    if (!settings) return null;
    const problem = unbatchable(inputs, outputs);
    if (problem) {
      this.log.warn("dynamic batching is configured but this model cannot be batched: its Predicts run one by one", {
        model: name,
        reason: problem,
      });
      return null;
    }
    // As many Runs as the model's run slots admit.
    const runs = entry.info.runs.limit;
    this.log.info("dynamic batching on", {
      model: name,
      maxBatchSize: settings.maxBatchSize,
      maxDelayMs: settings.maxDelayMs,
      maxQueue: settings.maxQueue,
      runs,
    });
    const run = <T>(b: BoundInput[], c: (o: BorrowedOutput[]) => T, t: PredictTiming, s?: AbortSignal) =>
      this.#predict(entry, b, c, t, s);
    return new Batcher(name, settings, runs, run, this.log, this.batchObserver);
  }

  /** One Run of bound request tensors (one request's, or a batch's); `since` starts its bind phase. */
  async #predict<T>(
    entry: Entry,
    bound: BoundInput[],
    consume: (outputs: BorrowedOutput[]) => T,
    timing: PredictTiming,
    signal?: AbortSignal,
    since = performance.now(),
    targets: OutputTarget[] = [],
  ): Promise<T> {
    signal?.throwIfAborted();
    let mark = since;
    const lap = () => {
      const now = performance.now();
      const ms = now - mark;
      mark = now;
      return ms;
    };
    const session = entry.session!;
    entry.inFlight++;
    const inputs: Value[] = [];
    const regions: ShmRegion[] = [];
    let outputs: Value[] = [];
    let writes: OutputWrites | null = null;
    try {
      for (const input of bound) {
        if ("handle" in input.source) {
          const region = this.shm.open(input.label, input.source.handle, input.byteLength, input.spec.dataType.size);
          regions.push(region);
          // Aligned: open() checks the offset against the element size, and mappings start on a page.
          const { address, byteLength } = region;
          inputs.push(Value.tensorAt(this.ort, address, byteLength, input.shape, input.spec.dataType.elementType));
          continue;
        }
        const { value, copied } = inputValue(this.ort, input, input.source.bytes);
        inputs.push(value);
        if (copied) timing.copiedInputs++;
      }
      if (targets.length > 0) writes = OutputWrites.prepare(this.ort, this.shm, session, bound, targets);
      timing.bindMs += lap();
      timing.sharedMemoryInputs = regions.length;
      const run: RunArgs = {
        session,
        inputIndexes: bound.map((b) => b.inputIndex),
        inputs,
        inputBytes: bound.reduce((n, b) => n + b.byteLength, 0),
        preallocated: writes?.preallocated(entry.info.outputs.length),
      };
      try {
        outputs = await this.#run(entry.info, run, timing, signal);
      } catch (error) {
        // Output shapes seen before for these inputs may not be this Run's: once more, copying.
        if (signal?.aborted || !writes?.dropGuessedShapes()) throw error;
        outputs = await this.#run(entry.info, { ...run, preallocated: undefined }, timing, signal);
      }
      writes?.finish(outputs);
      timing.runMs = lap();
      timing.sharedMemoryOutputs = writes?.count ?? 0;
      timing.copiedOutputs = writes?.copied ?? 0;
      const result = consume(outputs.map((value, i) => {
        const spec = entry.info.outputs[i];
        const { shape } = value.tensorInfo();
        const sharedMemory = writes?.written(i, shape);
        if (sharedMemory) return { spec, shape, byteLength: 0, bytes: NO_BYTES, copyInto: () => {}, sharedMemory };
        const byteLength = outputByteLength(shape, spec.dataType);
        return {
          spec,
          shape,
          byteLength,
          get bytes() {
            return value.borrowBytes(byteLength);
          },
          copyInto: (target: Uint8Array) => value.copyBytesInto(target.subarray(0, byteLength)),
        };
      }));
      timing.encodeMs = lap();
      return result;
    } finally {
      for (const value of outputs) value.release();
      // Values go before the mappings they point into.
      for (const value of inputs) value.release();
      writes?.release();
      for (const region of regions) region.release();
      if (--entry.inFlight === 0) entry.drained?.resolve();
    }
  }

  /** One Run, once one of the model's run slots is free (a caller that gives up meanwhile never runs). */
  async #run(info: ModelInfo, run: RunArgs, timing: PredictTiming, signal?: AbortSignal): Promise<Value[]> {
    await info.runs.acquire(signal);
    try {
      return await this.#runInSlot(info.name, run, timing, signal);
    } finally {
      info.runs.release();
    }
  }

  /** One Run with its own RunOptions, terminated when `signal` aborts. */
  async #runInSlot(name: string, run: RunArgs, timing: PredictTiming, signal?: AbortSignal): Promise<Value[]> {
    const { session, inputIndexes, inputs, inputBytes, preallocated } = run;
    signal?.throwIfAborted();
    const onThisThread = this.#runsHere(session, inputBytes);
    timing.onThisThread = onThisThread;
    const options = new RunOptions(this.ort);
    let abortedAt = 0;
    const terminate = () => {
      abortedAt = performance.now();
      options.terminate();
    };
    signal?.addEventListener("abort", terminate, { once: true });
    try {
      const started = performance.now();
      const outputs = await session.run(inputIndexes, inputs, options, preallocated, onThisThread);
      this.#noteRunCost(session, performance.now() - started, inputBytes);
      // Terminated too late to stop ORT: the answer has no one to go to.
      if (signal?.aborted) {
        for (const value of outputs) value.release();
        signal.throwIfAborted();
      }
      return outputs;
    } catch (error) {
      if (!(error instanceof OrtError)) throw error;
      if (signal?.aborted) {
        // ORT's "terminate flag" failure is the cancellation, not a model failure.
        this.log.debug("run terminated", {
          model: name,
          reason: String(signal.reason?.message ?? signal.reason),
          stopMs: Number((performance.now() - abortedAt).toFixed(3)),
        });
        throw signal.reason;
      }
      const message = `model ${name} failed on this input: ${error.ortMessage}`;
      throw error.code === ORT_INVALID_ARGUMENT ? invalidArgument(message) : new AgentError(Status.INTERNAL, message);
    } finally {
      // After the Run returned, so ORT no longer reads the options; terminate() cannot run after this.
      signal?.removeEventListener("abort", terminate);
      options.release();
    }
  }

  /**
   * Whether a Run goes on this thread: it is the only Predict in flight (nothing else waits for a Run
   * or for a turn of the event loop it would hold), and this session's recent Runs, scaled to this
   * request's input bytes, took at most edge_agent_inline_run_max_us. The hand-off to a worker thread
   * and back costs about 0.1 ms and as much CPU; for a Run not much longer it is most of the overhead.
   */
  #runsHere(session: Session, inputBytes: number): boolean {
    const limitMs = this.config.inlineRunMaxUs / 1000;
    const msPerByte = this.#runCost.get(session) ?? null;
    return limitMs > 0 && this.#predicts === 1 && msPerByte !== null && msPerByte * inputBytes <= limitMs;
  }

  #noteRunCost(session: Session, ms: number, inputBytes: number): void {
    const previous = this.#runCost.get(session);
    // A session's first Run allocates what later ones reuse: it says little about them.
    if (previous === undefined) {
      this.#runCost.set(session, null);
      return;
    }
    const msPerByte = ms / Math.max(1, inputBytes);
    // At most 4 times the average, so that one Run slowed by the machine moves it less than a run of them.
    this.#runCost.set(
      session,
      previous === null ? msPerByte : previous * 0.8 + Math.min(msPerByte, 4 * previous) * 0.2,
    );
  }

  /** Unloads every model (waiting for their runs). */
  async closeAll(): Promise<void> {
    await Promise.all(
      [...this.#models.values()].filter((e) => e.session !== null).map((e) => this.unload(e.info.name)),
    );
  }

  #ready(name: string): Entry {
    const entry = this.#models.get(name);
    if (!entry || entry.session === null) throw notFound(`model ${name} is not loaded`);
    return entry;
  }
}

/** An entry whose session is being created: its name is taken, it does not serve yet. */
function pending(name: string, url: string, concurrentRuns: number): Entry {
  return {
    info: { name, url, inputs: [], outputs: [], sizeBytes: 0, loadSeconds: 0, runs: new RunSlots(concurrentRuns) },
    session: null,
    inFlight: 0,
    drained: null,
    batcher: null,
  };
}

function checkModelName(name: string): void {
  if (!isModelName(name)) {
    throw invalidArgument(
      `model name "${name}" is invalid: use 1-${MAX_MODEL_NAME} letters, digits and inner hyphens (^[a-zA-Z0-9](-*[a-zA-Z0-9])*$)`,
    );
  }
}
