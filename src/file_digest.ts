// A file's SHA-256 and size, read a chunk at a time: read whole, a large file (a 44 MB library, a
// model package) would stay in memory until a GC.

/** A file's SHA-256 (hex) and size. */
export interface FileDigest {
  sha256: string;
  size: number;
}

/** The SHA-256 and size of the file at `path`; `each` sees every chunk as it is read (e.g. to copy it). */
export async function digestFile(path: string, each?: (chunk: Uint8Array) => unknown): Promise<FileDigest> {
  // Loaded when first needed: serving an agent needs no Node crypto.
  const { createHash } = await import("node:crypto");
  const hash = createHash("sha256");
  const chunk = new Uint8Array(1 << 20);
  let size = 0;
  const file = await Deno.open(path);
  try {
    for (let n = await file.read(chunk); n !== null; n = await file.read(chunk)) {
      hash.update(chunk.subarray(0, n));
      size += n;
      await each?.(chunk.subarray(0, n));
    }
  } finally {
    file.close();
  }
  return { sha256: hash.digest("hex"), size };
}
