// Small helpers shared by the raw bindings: C strings, out-parameters and pointer reads.

const encoder = new TextEncoder();

/** A failure inside a native call that is not the library's own status (NULL results, misuse). */
export class NativeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NativeError";
  }
}

/** NUL-terminated UTF-8 copy of `text`, for `const char*` parameters. */
export function cString(text: string): Uint8Array<ArrayBuffer> {
  return encoder.encode(text + "\0");
}

/** Storage for one `T**` out-parameter. */
export function outPointer(): BigUint64Array<ArrayBuffer> {
  return new BigUint64Array(1);
}

/** The pointer an out-parameter received. */
export function toPointer(out: BigUint64Array): Deno.PointerValue {
  return Deno.UnsafePointer.create(out[0]);
}

/** Reads the pointer stored at `base + offset`. */
export function readPointer(base: NonNullable<Deno.PointerValue>, offset: number): Deno.PointerValue {
  return new Deno.UnsafePointerView(base).getPointer(offset);
}

/** A callable for the C function at `pointer`, described by `definition`. */
export function bindFunction<const Fn extends Deno.ForeignFunction>(
  pointer: Deno.PointerValue,
  definition: Fn,
): Deno.UnsafeFnPointer<Fn> {
  if (pointer === null) throw new NativeError("function pointer is NULL");
  return new Deno.UnsafeFnPointer(pointer as Deno.PointerObject<Fn>, definition);
}

/**
 * Marks buffers as used after an asynchronous native call, so they stay reachable (and their
 * memory valid) until the call has finished with them.
 */
export function keepAlive(..._buffers: unknown[]): void {}
