// The model registry: load/unload lifecycle, in-flight accounting and the memory budget.
// A session is released only after every Run on it has returned.

import { type OnnxRuntime, OrtError, RunOptions, Session, type Value } from "../ffi/onnxruntime.ts";
import type { AgentConfig } from "./config.ts";
import {
  AgentError,
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  resourceExhausted,
  Status,
} from "./errors.ts";
import type { Logger } from "./log.ts";
import { openPackage } from "./packages/load.ts";
import { sessionOptions } from "./runtime.ts";
import type { SharedMemoryReader, ShmRegion } from "./shm.ts";
import { bindInputs, inputValue, outputByteLength, type TensorSpec, toSpecs } from "./tensors.ts";
import type { Tensor } from "./wire.ts";

const MODEL_NAME = /^[a-zA-Z0-9](-*[a-zA-Z0-9])*$/;
const MAX_MODEL_NAME = 255;
const ORT_INVALID_ARGUMENT = 2;

export interface ModelInfo {
  name: string;
  url: string;
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  sizeBytes: number;
  loadSeconds: number;
  /** The package's version (edge-model.json "version"); absent when it names none. */
  version?: string;
}

/** An output tensor whose bytes are borrowed from ORT: valid only inside the consumer callback. */
export interface BorrowedOutput {
  spec: TensorSpec;
  shape: number[];
  byteLength: number;
  /** A view of ORT's buffer. */
  readonly bytes: Uint8Array;
  /** Copies the bytes into `target` (byteLength bytes) without making a view of ORT's buffer. */
  copyInto(target: Uint8Array): void;
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
}

interface Entry {
  info: ModelInfo;
  /** null while the model is loading. */
  session: Session | null;
  inFlight: number;
  /** Resolves when inFlight drops to zero after an unload began. */
  drained: PromiseWithResolvers<void> | null;
}

export class ModelRegistry {
  readonly #models = new Map<string, Entry>();
  /** A "change" event whenever a model becomes loaded or stops being loaded (health Watch). */
  readonly changes = new EventTarget();
  #reservedBytes = 0;

  constructor(
    private readonly ort: OnnxRuntime,
    private readonly shm: SharedMemoryReader,
    private readonly config: AgentConfig,
    private readonly log: Logger,
  ) {}

  async load(url: string, name: string): Promise<ModelInfo> {
    checkModelName(name);
    if (this.#models.has(name)) throw alreadyExists(`a model named ${name} is already loaded`);
    // Reserve the name before the first await, so concurrent loads of one name cannot both win.
    const entry: Entry = {
      info: { name, url, inputs: [], outputs: [], sizeBytes: 0, loadSeconds: 0 },
      session: null,
      inFlight: 0,
      drained: null,
    };
    this.#models.set(name, entry);
    const started = performance.now();
    let session: Session | null = null;
    try {
      const model = await openPackage(url, {
        roots: this.config.modelRoots,
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
      entry.info.sizeBytes = model.bytes.byteLength;
      const version: unknown = model.manifest?.version;
      // Captures record it; Edge Manager's ModelVersion was a string of at most 64 characters.
      if (typeof version === "string" || typeof version === "number") entry.info.version = String(version).slice(0, 64);
      const options = sessionOptions(this.ort, this.config);
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
      entry.session = session;
      this.changes.dispatchEvent(new Event("change"));
      this.log.info("model loaded", {
        model: name,
        url,
        bytes: entry.info.sizeBytes,
        seconds: Number(entry.info.loadSeconds.toFixed(3)),
      });
      return entry.info;
    } catch (error) {
      session?.release();
      this.#reservedBytes -= entry.info.sizeBytes;
      this.#models.delete(name);
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
    if (entry.inFlight > 0) {
      entry.drained = Promise.withResolvers();
      await entry.drained.promise;
    }
    entry.session!.release();
    this.#reservedBytes -= entry.info.sizeBytes;
    this.log.info("model unloaded", { model: name });
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
   * rejects with `signal.reason`.
   */
  async predict<T>(
    name: string,
    tensors: Tensor[],
    consume: (outputs: BorrowedOutput[]) => T,
    timing: PredictTiming,
    signal?: AbortSignal,
  ): Promise<T> {
    signal?.throwIfAborted();
    let mark = performance.now();
    const lap = () => {
      const now = performance.now();
      const ms = now - mark;
      mark = now;
      return ms;
    };
    const entry = this.#ready(name);
    const session = entry.session!;
    const bound = bindInputs(name, entry.info.inputs, tensors);
    entry.inFlight++;
    const inputs: Value[] = [];
    const regions: ShmRegion[] = [];
    let outputs: Value[] = [];
    try {
      for (const input of bound) {
        let bytes: Uint8Array;
        if ("handle" in input.source) {
          const region = this.shm.open(input.label, input.source.handle, input.byteLength, input.spec.dataType.size);
          regions.push(region);
          bytes = region.bytes;
        } else {
          bytes = input.source.bytes;
        }
        const { value, copied } = inputValue(this.ort, input, bytes);
        inputs.push(value);
        if (copied) timing.copiedInputs++;
      }
      timing.bindMs = lap();
      timing.sharedMemoryInputs = regions.length;
      outputs = await this.#run(name, session, bound.map((b) => b.inputIndex), inputs, signal);
      timing.runMs = lap();
      const result = consume(outputs.map((value, i) => {
        const spec = entry.info.outputs[i];
        const { shape } = value.tensorInfo();
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
      for (const region of regions) region.release();
      if (--entry.inFlight === 0) entry.drained?.resolve();
    }
  }

  /** One Run with its own RunOptions, terminated when `signal` aborts. */
  async #run(
    name: string,
    session: Session,
    inputIndexes: number[],
    inputs: Value[],
    signal: AbortSignal | undefined,
  ): Promise<Value[]> {
    signal?.throwIfAborted();
    const options = new RunOptions(this.ort);
    let abortedAt = 0;
    const terminate = () => {
      abortedAt = performance.now();
      options.terminate();
    };
    signal?.addEventListener("abort", terminate, { once: true });
    try {
      const outputs = await session.run(inputIndexes, inputs, options);
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

function checkModelName(name: string): void {
  if (name.length === 0 || name.length > MAX_MODEL_NAME || !MODEL_NAME.test(name)) {
    throw invalidArgument(
      `model name "${name}" is invalid: use 1-${MAX_MODEL_NAME} letters, digits and inner hyphens (^[a-zA-Z0-9](-*[a-zA-Z0-9])*$)`,
    );
  }
}
