// Outputs written into the client's shared memory (PredictRequest.output_locations). Everything is
// checked and mapped before the Run, so a bad location fails the call with nothing written. When every
// such output's shape is known before the Run (fixed in the model, or seen before for the same input
// shapes), ONNX Runtime writes them straight into the mapped segments; otherwise each is copied once
// after the Run, after all of them were checked to fit.

import { type OnnxRuntime, type Session, Value } from "../../ffi/onnxruntime.ts";
import { invalidArgument } from "../errors.ts";
import type { SharedMemoryReader, ShmHandle, ShmRegion } from "./shm.ts";
import { type BoundInput, outputByteLength, shapeText, shmHandle, type TensorSpec } from "./tensors.ts";
import type { OutputLocation } from "../service/wire.ts";

/** One output the client asked to have written into its shared memory. */
export interface OutputTarget {
  outputIndex: number;
  spec: TensorSpec;
  /** Names the output in error messages. */
  label: string;
  handle: ShmHandle;
}

/** What the response says instead of the bytes: where the output now lies. */
export interface WrittenOutput {
  segmentId: bigint;
  offset: bigint;
  size: bigint;
}

/**
 * Matches output locations to model outputs (by name, or by index when the name is empty). Throws
 * INVALID_ARGUMENT naming the location.
 */
export function bindOutputLocations(
  modelName: string,
  outputs: TensorSpec[],
  locations: OutputLocation[],
): OutputTarget[] {
  const seen = new Set<number>();
  return locations.map((location, position) => {
    const name = location.name ?? "";
    const index = location.index ?? 0;
    const outputIndex = name ? outputs.findIndex((o) => o.name === name) : index;
    const where = name ? `output_locations[${position}] (output "${name}")` : `output_locations[${position}]`;
    if (outputIndex < 0 || outputIndex >= outputs.length) {
      throw invalidArgument(
        name
          ? `${where}: model ${modelName} has no output of that name (outputs: ${
            outputs.map((o) => o.name).join(", ")
          })`
          : `${where}: index ${index}, but model ${modelName} has ${outputs.length} output(s)`,
      );
    }
    const spec = outputs[outputIndex];
    const label = `output "${spec.name}"`;
    if (seen.has(outputIndex)) throw invalidArgument(`${label}: output_locations names it twice`);
    seen.add(outputIndex);
    if (!location.shared_memory_handle) {
      throw invalidArgument(`${label}: output_locations entry has no shared_memory_handle`);
    }
    return { outputIndex, spec, label, handle: shmHandle(location.shared_memory_handle) };
  });
}

/** Output shapes seen per model and input shapes; null where they varied between Runs. */
const seenShapes = new WeakMap<Session, Map<string, number[][] | null>>();
/** Input shape combinations remembered per model (a model fed ever new shapes starts over). */
const MAX_SEEN = 64;

interface Placed {
  target: OutputTarget;
  region: ShmRegion;
  /** The preallocated tensor over the region, when ORT writes the output in place. */
  value: Value | null;
}

/** One request's output locations, mapped; release() unmaps them exactly once. */
export class OutputWrites {
  readonly #placed: Placed[] = [];
  readonly #byOutput = new Map<number, Placed>();
  readonly #shapesKey: string;
  /** Some preallocated shape is only the one seen before, which this Run may not produce. */
  #guessed = false;
  #released = false;
  /** Outputs ORT did not write in place and that were copied after the Run. */
  copied = 0;

  private constructor(private readonly ort: OnnxRuntime, private readonly session: Session, inputs: BoundInput[]) {
    this.#shapesKey = inputs.map((i) => `${i.inputIndex}:${i.shape.join("x")}`).sort().join(",");
  }

  /**
   * Maps every target's room read-write and checks it: bounds, permission, no overlap with another
   * output or with an input read from the same segment, and room for outputs of known shape.
   */
  static prepare(
    ort: OnnxRuntime,
    shm: SharedMemoryReader,
    session: Session,
    inputs: BoundInput[],
    targets: OutputTarget[],
  ): OutputWrites {
    const writes = new OutputWrites(ort, session, inputs);
    try {
      checkOverlaps(inputs, targets);
      for (const target of targets) {
        const region = shm.openWritable(target.label, target.handle, target.spec.dataType.size);
        const placed = { target, region, value: null };
        writes.#placed.push(placed);
        writes.#byOutput.set(target.outputIndex, placed);
      }
      writes.#preallocate();
      return writes;
    } catch (error) {
      writes.release();
      throw error;
    }
  }

  /** Tensors over the regions when every output's shape is known; none otherwise (then all are copied). */
  #preallocate(): void {
    const seen = seenShapes.get(this.session)?.get(this.#shapesKey);
    const shapes = this.#placed.map(({ target }) =>
      target.spec.shape.every((d) => d >= 0) ? target.spec.shape : seen?.[target.outputIndex]
    );
    for (const [i, { target, region }] of this.#placed.entries()) {
      const shape = shapes[i];
      if (!shape) continue;
      const needed = outputByteLength(shape, target.spec.dataType);
      const fixed = target.spec.shape.every((d) => d >= 0);
      if (needed > region.byteLength) {
        // A fixed shape will not change: refuse now. A remembered one might: the Run decides.
        if (fixed) throw tooSmall(target, shape, needed, region);
        shapes[i] = undefined;
      }
    }
    // All or none: with some outputs copied after the Run, the ones written in place could not be
    // taken back if a copied one turns out not to fit.
    if (shapes.some((shape) => !shape)) return;
    this.#guessed = this.#placed.some(({ target }) => target.spec.shape.some((d) => d < 0));
    for (const [i, placed] of this.#placed.entries()) {
      const { target, region } = placed;
      const { dataType } = target.spec;
      const length = outputByteLength(shapes[i]!, dataType);
      placed.value = Value.tensorAt(this.ort, region.address, length, shapes[i]!, dataType.elementType);
    }
  }

  /** Session.run's `preallocated`: per model output, a tensor over its region or null. */
  preallocated(outputCount: number): (Value | null)[] {
    return Array.from({ length: outputCount }, (_, i) => this.#byOutput.get(i)?.value ?? null);
  }

  /**
   * After a failed Run: whether a shape seen before was preallocated, which ORT refuses when this Run
   * produces another (its message varies between versions, so any failure counts). The shapes are then
   * marked as varying for these inputs and the preallocated tensors dropped, so the caller can run
   * again with every output copied after the Run; a model that really fails fails again.
   */
  dropGuessedShapes(): boolean {
    if (!this.#guessed) return false;
    this.#guessed = false;
    this.#remember(null);
    for (const placed of this.#placed) {
      placed.value?.release();
      placed.value = null;
    }
    return true;
  }

  /**
   * After a successful Run: checks that every output not written in place fits its room (before any
   * copy, so nothing is written when one does not), then copies those. Remembers the shapes.
   */
  finish(outputs: Value[]): void {
    const shapes = outputs.map((value) => value.tensorInfo().shape);
    const copies: { placed: Placed; bytes: Uint8Array }[] = [];
    for (const placed of this.#placed) {
      const { target, region, value } = placed;
      const output = outputs[target.outputIndex];
      const shape = shapes[target.outputIndex];
      const length = outputByteLength(shape, target.spec.dataType);
      // ORT wrote in place unless it handed back another buffer (e.g. an output that is a constant).
      if (value && output.dataAddress() === BigInt(Deno.UnsafePointer.value(region.address))) continue;
      if (length > region.byteLength) throw tooSmall(target, shape, length, region);
      copies.push({ placed, bytes: output.borrowBytes(length) });
    }
    for (const { placed, bytes } of copies) placed.region.bytes.set(bytes);
    this.copied = copies.length;
    this.#remember(shapes);
  }

  /** Where output `outputIndex` was written, when the client asked for it in shared memory. */
  written(outputIndex: number, shape: number[]): WrittenOutput | undefined {
    const placed = this.#byOutput.get(outputIndex);
    if (!placed) return undefined;
    const { handle, spec } = placed.target;
    return {
      segmentId: handle.segmentId,
      offset: handle.offset,
      size: BigInt(outputByteLength(shape, spec.dataType)),
    };
  }

  get count(): number {
    return this.#placed.length;
  }

  #remember(shapes: number[][] | null): void {
    let byInputs = seenShapes.get(this.session);
    if (!byInputs) seenShapes.set(this.session, byInputs = new Map());
    // Once they varied, they stay "varied" for these inputs.
    if (shapes && byInputs.get(this.#shapesKey) === null) return;
    if (byInputs.size >= MAX_SEEN && !byInputs.has(this.#shapesKey)) byInputs.clear();
    byInputs.set(this.#shapesKey, shapes);
  }

  /** Releases the preallocated tensors, then the mappings they point into; once. */
  release(): void {
    if (this.#released) return;
    this.#released = true;
    for (const placed of this.#placed) placed.value?.release();
    for (const placed of this.#placed) placed.region.release();
  }
}

function tooSmall(target: OutputTarget, shape: number[], needed: number, region: ShmRegion) {
  const { label, spec, handle } = target;
  return invalidArgument(
    `${label}: shape ${shapeText(shape)} of ${spec.dataType.name} needs ${needed} bytes, but shared_memory_handle ` +
      `gives ${region.byteLength} bytes of room at offset ${handle.offset} in segment ${handle.segmentId}` +
      (handle.size === 0n ? " (size 0: up to the end of the segment)" : ` (size ${handle.size})`),
  );
}

/**
 * Refuses outputs whose rooms overlap each other or an input read from the same segment: ORT would
 * read an input while writing over it, and two outputs would overwrite each other.
 */
function checkOverlaps(inputs: BoundInput[], targets: OutputTarget[]): void {
  const spans = [
    ...inputs.flatMap((input) =>
      "handle" in input.source
        ? [{
          label: input.label,
          segmentId: input.source.handle.segmentId,
          start: input.source.handle.offset,
          end: input.source.handle.offset + BigInt(input.byteLength),
        }]
        : []
    ),
    ...targets.map((t) => ({
      label: t.label,
      segmentId: t.handle.segmentId,
      start: t.handle.offset,
      // A size of 0 reaches the end of the segment: whatever follows the offset.
      end: t.handle.size === 0n ? 2n ** 65n : t.handle.offset + t.handle.size,
    })),
  ];
  const inputCount = spans.length - targets.length;
  for (let i = inputCount; i < spans.length; i++) {
    for (let j = 0; j < i; j++) {
      const [a, b] = [spans[i], spans[j]];
      if (a.segmentId === b.segmentId && a.start < b.end && b.start < a.end && a.end > a.start && b.end > b.start) {
        throw invalidArgument(
          `${a.label}: its room [${a.start}, ${
            a.end === 2n ** 65n ? "end" : a.end
          }) in segment ${a.segmentId} overlaps ${b.label}'s`,
        );
      }
    }
  }
}
