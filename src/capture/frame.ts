// Record framing shared by spool segments and the status log, and the header of those files.
//
// File:   "EMCSPOOL" | "EMCSTATS" | ... (8 ASCII bytes), u32 format version, u32 zero   (16 bytes)
// Record: u32 magic 0x31504143 ("CAP1"), u32 payload length, u32 CRC32C(payload),
//         u32 CRC32C(the 12 bytes before it), payload                                (16 + n bytes)
// All integers little-endian. The header has its own checksum so a damaged length is caught before it
// is trusted, and the magic lets recovery find the next intact record after a damaged one.

import { crc32c } from "./crc32c.ts";

export const FILE_HEADER_BYTES = 16;
export const FRAME_HEADER_BYTES = 16;
const FRAME_MAGIC = 0x31504143;
const FORMAT_VERSION = 1;

export function fileHeader(kind: string): Uint8Array {
  if (kind.length !== 8) throw new Error("file kind must be 8 ASCII characters");
  const header = new Uint8Array(FILE_HEADER_BYTES);
  header.set(new TextEncoder().encode(kind));
  new DataView(header.buffer).setUint32(8, FORMAT_VERSION, true);
  return header;
}

/** "ok", "short" (a header torn by a crash while creating the file), or "foreign" (not ours / newer version). */
export function checkFileHeader(bytes: Uint8Array, kind: string): "ok" | "short" | "foreign" {
  if (bytes.length < FILE_HEADER_BYTES) return "short";
  const expected = fileHeader(kind);
  for (let i = 0; i < FILE_HEADER_BYTES; i++) if (bytes[i] !== expected[i]) return "foreign";
  return "ok";
}

/** Allocates one frame with room for `payloadBytes` after the header; fill the payload, then call sealFrame. */
export function allocFrame(payloadBytes: number): Uint8Array {
  return new Uint8Array(FRAME_HEADER_BYTES + payloadBytes);
}

/** Writes the header of a frame whose payload (bytes 16..) is already in place. */
export function sealFrame(frame: Uint8Array): Uint8Array {
  const view = new DataView(frame.buffer, frame.byteOffset, FRAME_HEADER_BYTES);
  view.setUint32(0, FRAME_MAGIC, true);
  view.setUint32(4, frame.length - FRAME_HEADER_BYTES, true);
  view.setUint32(8, crc32c(frame.subarray(FRAME_HEADER_BYTES)), true);
  view.setUint32(12, crc32c(frame.subarray(0, 12)), true);
  return frame;
}

export function encodeFrame(payload: Uint8Array): Uint8Array {
  const frame = allocFrame(payload.length);
  frame.set(payload, FRAME_HEADER_BYTES);
  return sealFrame(frame);
}

/** A complete record found by scanFrames: its payload is bytes [offset, offset + length) of the scanned buffer. */
export interface FoundFrame {
  /** Offset of the frame header. */
  start: number;
  /** Offset of the payload. */
  offset: number;
  length: number;
}

export interface ScanResult {
  frames: FoundFrame[];
  /** End of the last intact frame: everything after it is a torn or damaged tail. */
  validEnd: number;
  /** Damaged regions that intact frames follow (media damage, not a crash), as [from, to) offsets. */
  skipped: Array<[number, number]>;
}

function frameAt(bytes: Uint8Array, view: DataView, pos: number): FoundFrame | null {
  if (pos + FRAME_HEADER_BYTES > bytes.length) return null;
  if (view.getUint32(pos, true) !== FRAME_MAGIC) return null;
  if (view.getUint32(pos + 12, true) !== crc32c(bytes.subarray(pos, pos + 12))) return null;
  const length = view.getUint32(pos + 4, true);
  const offset = pos + FRAME_HEADER_BYTES;
  if (offset + length > bytes.length) return null;
  if (view.getUint32(pos + 8, true) !== crc32c(bytes.subarray(offset, offset + length))) return null;
  return { start: pos, offset, length };
}

/**
 * Finds every intact frame from `start` on. A bad frame followed by no intact one is a torn tail (a crash
 * mid-write: never acknowledged); one followed by intact frames is damage in the middle, skipped so that
 * the records after it survive.
 */
export function scanFrames(bytes: Uint8Array, start: number): ScanResult {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames: FoundFrame[] = [];
  const skipped: Array<[number, number]> = [];
  let pos = start;
  let validEnd = start;
  while (pos < bytes.length) {
    const frame = frameAt(bytes, view, pos);
    if (frame) {
      frames.push(frame);
      pos = validEnd = frame.offset + frame.length;
      continue;
    }
    let next = -1;
    for (let i = bytes.indexOf(0x43, pos + 1); i >= 0; i = bytes.indexOf(0x43, i + 1)) {
      if (frameAt(bytes, view, i)) {
        next = i;
        break;
      }
    }
    if (next < 0) break;
    skipped.push([pos, next]);
    pos = next;
  }
  return { frames, validEnd, skipped };
}
