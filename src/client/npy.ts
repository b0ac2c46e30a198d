// NumPy's .npy format (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html),
// versions 1.0-3.0, little-endian C-order arrays of the agent's data types: small enough to own.

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

/** .npy dtype descriptors of the wire DataType names. */
export const NPY_DESCR: Record<string, string> = {
  UINT8: "|u1",
  INT8: "|i1",
  BOOL: "|b1",
  INT16: "<i2",
  UINT16: "<u2",
  INT32: "<i4",
  UINT32: "<u4",
  INT64: "<i8",
  UINT64: "<u8",
  FLOAT16: "<f2",
  FLOAT32: "<f4",
  FLOAT64: "<f8",
};

export interface NpyArray {
  /** Wire DataType name, e.g. "FLOAT32". */
  dataType: string;
  shape: number[];
  /** Raw little-endian element bytes. */
  data: Uint8Array;
}

export class NpyError extends Error {}

export function readNpy(bytes: Uint8Array): NpyArray {
  if (bytes.length < 10 || !MAGIC.every((b, i) => bytes[i] === b)) throw new NpyError("not a .npy file (bad magic)");
  const major = bytes[6];
  if (major < 1 || major > 3) throw new NpyError(`.npy version ${major}.${bytes[7]} is not supported`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  if (start + headerLength > bytes.length) throw new NpyError(".npy header is cut short");
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined) throw new NpyError(`.npy header not understood: ${header.trim()}`);
  if (fortran === "True") throw new NpyError(".npy arrays in Fortran order are not supported (save with C order)");
  const dataType = Object.entries(NPY_DESCR).find(([, d]) => d === descr || d.replace("<", "|") === descr)?.[0];
  if (!dataType) throw new NpyError(`.npy dtype ${descr} has no DataType (big-endian or unsupported)`);
  const shape = shapeText.split(",").map((d) => d.trim()).filter((d) => d !== "").map(Number);
  if (shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new NpyError(`.npy shape (${shapeText}) is invalid`);
  const size = Number(descr.slice(2));
  const length = shape.reduce((a, b) => a * b, 1) * size;
  const data = bytes.subarray(start + headerLength);
  if (data.length !== length) {
    throw new NpyError(`.npy data holds ${data.length} bytes, but shape (${shape}) of ${descr} needs ${length}`);
  }
  return { dataType, shape, data };
}

export function writeNpy(array: NpyArray): Uint8Array {
  const descr = NPY_DESCR[array.dataType];
  if (!descr) throw new NpyError(`DataType ${array.dataType} has no .npy dtype`);
  const shape = array.shape.length === 1 ? `${array.shape[0]},` : array.shape.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape}), }`;
  // Version 1.0: the whole preamble is padded with spaces to a multiple of 64 bytes, ending in "\n".
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  const out = new Uint8Array(10 + header.length + array.data.length);
  out.set(MAGIC);
  out.set([1, 0], 6);
  new DataView(out.buffer).setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  out.set(array.data, 10 + header.length);
  return out;
}
