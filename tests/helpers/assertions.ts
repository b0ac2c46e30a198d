// Request builders and status assertions shared by the tests.

import assert from "node:assert/strict";
import process from "node:process";
import { Status } from "../../src/errors.ts";
import type { Tensor } from "../../src/service/wire.ts";

const encoder = new TextEncoder();

/** A byte tensor with metadata. */
export function tensor(name: string, dataType: number, shape: number[], data: ArrayBufferView): Tensor {
  return {
    tensor_metadata: { name: encoder.encode(name), data_type: dataType, shape },
    byte_data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  };
}

/** A copy of a tensor's bytes as float32 values (copied so alignment never matters). */
export function floats(bytes: Uint8Array | undefined): Float32Array {
  assert.ok(bytes, "tensor has byte_data");
  return new Float32Array(new Uint8Array(bytes).buffer);
}

export function nameOf(t: { tensor_metadata?: { name: Uint8Array } | null }): string {
  return new TextDecoder().decode(t.tensor_metadata!.name);
}

/** Awaits a call that must fail with `code`; its message must match `message`. */
export async function rejectsWith(call: Promise<unknown>, code: Status, message?: RegExp): Promise<string> {
  try {
    await call;
  } catch (error) {
    const e = error as { code?: number; details?: string };
    assert.equal(Status[e.code!], Status[code], `expected ${Status[code]}, got ${Status[e.code!]}: ${e.details}`);
    if (message) assert.match(e.details ?? "", message);
    return e.details ?? "";
  }
  assert.fail(`expected ${Status[code]}, but the call succeeded`);
}

/** Deterministic pseudo-random floats in [0, 1). */
export function pseudoRandomFloats(count: number, seed = 1): Float32Array {
  const out = new Float32Array(count);
  let state = seed >>> 0;
  for (let i = 0; i < count; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    out[i] = state / 2 ** 32;
  }
  return out;
}

/**
 * CPU time this process has used, in ms: for "this took little work" checks, which wall time cannot make
 * on a loaded machine (the process may wait for a core for any length of time).
 */
export function cpuMs(): number {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}
