// Streaming file hashing (spec 6.3). Files are read in chunks, and the event loop gets a turn every few
// milliseconds, so hashing a large model never holds it for long; crypto.subtle.digest is one-shot, so
// node:crypto's incremental createHash does SHA-256 and BLAKE2b-512 and @noble/hashes does BLAKE3.

import { createHash } from "node:crypto";
import { setImmediate } from "node:timers";
import { blake3 } from "@noble/hashes/blake3.js";
import { OmsError } from "./errors.ts";
import { hexEncode } from "./encoding.ts";
import type { HashType } from "./bundle.ts";

/** Bytes read from the file per step. */
export const HASH_CHUNK_BYTES = 1 << 20;

/**
 * Bytes handed to the hasher at a time. Small enough that even the pure-JavaScript BLAKE3 (about 40 MB/s)
 * spends only a few milliseconds on one, so the time budget below is checked often enough.
 */
const HASH_SLICE_BYTES = 128 * 1024;

/** Longest stretch of hashing between two turns of the event loop, in milliseconds. */
const YIELD_EVERY_MS = 5;

/**
 * Lets timers and I/O callbacks run. Awaiting a file read is not enough: Deno may settle a read of a cached
 * file without a turn of the event loop, so a whole file could be hashed in one go.
 */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export interface StreamingHasher {
  update(data: Uint8Array): void;
  digestHex(): string;
}

export function createHasher(hashType: HashType): StreamingHasher {
  switch (hashType) {
    case "sha256":
    case "blake2b": {
      let h;
      try {
        // The registry's blake2b is BLAKE2b with its full 512-bit output (algorithm-registry.md).
        h = createHash(hashType === "sha256" ? "sha256" : "blake2b512");
      } catch (error) {
        throw new OmsError(
          "manifest",
          "unsupported_hash",
          `${hashType} is not available in this runtime's node:crypto (${(error as Error).message})`,
        );
      }
      return { update: (d) => void h.update(d), digestHex: () => h.digest("hex") };
    }
    case "blake3": {
      const h = blake3.create();
      return { update: (d) => void h.update(d), digestHex: () => hexEncode(h.digest()) };
    }
    default:
      throw new OmsError("manifest", "unsupported_hash", `hash algorithm "${hashType}" is not supported`);
  }
}

export interface ByteRange {
  start: number;
  end: number;
}

/**
 * Hashes consecutive byte ranges of one file (a single [0, size) range for file serialization, the shard grid
 * for shard serialization) in one sequential pass. Throws if the file ends before the last range does.
 */
export async function hashFileRanges(
  path: string,
  ranges: ByteRange[],
  hashType: HashType,
  displayName: string,
): Promise<string[]> {
  const digests: string[] = [];
  const file = await Deno.open(path, { read: true });
  try {
    const buffer = new Uint8Array(HASH_CHUNK_BYTES);
    let position = 0;
    let lastYield = performance.now();
    for (const range of ranges) {
      if (range.start !== position) {
        await file.seek(range.start, Deno.SeekMode.Start);
        position = range.start;
      }
      const hasher = createHasher(hashType);
      while (position < range.end) {
        const want = Math.min(buffer.length, range.end - position);
        const n = await file.read(buffer.subarray(0, want));
        if (n === null) {
          throw new OmsError(
            "manifest",
            "model_unreadable",
            `${displayName}: file ended at byte ${position}, before ${range.end} (was it changed while being read?)`,
            { file: displayName },
          );
        }
        for (let at = 0; at < n; at += HASH_SLICE_BYTES) {
          hasher.update(buffer.subarray(at, Math.min(at + HASH_SLICE_BYTES, n)));
          if (performance.now() - lastYield >= YIELD_EVERY_MS) {
            await yieldToEventLoop();
            lastYield = performance.now();
          }
        }
        position += n;
      }
      digests.push(hasher.digestHex());
    }
  } finally {
    file.close();
  }
  return digests;
}

/** Hashes consecutive byte ranges of bytes already in memory, yielding to the event loop as file hashing does. */
export async function hashBytesRanges(bytes: Uint8Array, ranges: ByteRange[], hashType: HashType): Promise<string[]> {
  const digests: string[] = [];
  let lastYield = performance.now();
  for (const range of ranges) {
    const hasher = createHasher(hashType);
    for (let pos = range.start; pos < range.end; pos += HASH_SLICE_BYTES) {
      hasher.update(bytes.subarray(pos, Math.min(pos + HASH_SLICE_BYTES, range.end)));
      if (performance.now() - lastYield >= YIELD_EVERY_MS) {
        await yieldToEventLoop();
        lastYield = performance.now();
      }
    }
    digests.push(hasher.digestHex());
  }
  return digests;
}

/** Byte ranges of a file of `size` bytes: one whole-file range, or the shard grid (none for an empty file). */
export function rangesFor(size: number, shardSize?: number): ByteRange[] {
  if (shardSize === undefined) return [{ start: 0, end: size }];
  const ranges: ByteRange[] = [];
  for (let start = 0; start < size; start += shardSize) ranges.push({ start, end: Math.min(start + shardSize, size) });
  return ranges;
}
