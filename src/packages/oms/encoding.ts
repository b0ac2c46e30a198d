// Small byte/text conversions shared by the OMS modules (no ASN.1 here).

const BASE64_RE = /^[A-Za-z0-9+/\-_]*={0,2}$/;

/**
 * Decodes RFC 4648 base64. DSSE allows the standard and the URL-safe alphabet, padded or not, so both are
 * accepted; anything else (whitespace, stray characters, bad length) returns null so callers can say which
 * field was wrong.
 */
export function base64Decode(text: string): Uint8Array | null {
  if (!BASE64_RE.test(text)) return null;
  let s = text.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  if (s.length % 4 === 1) return null;
  s += "=".repeat((4 - (s.length % 4)) % 4);
  try {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  } catch {
    return null;
  }
}

export function base64Encode(bytes: Uint8Array): string {
  let bin = "";
  // Chunked so String.fromCharCode never gets more arguments than the engine allows.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

export function hexEncode(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

/** Lowercase hex only, as the predicate schema's `^[0-9a-f]+$` requires. */
export function hexDecode(hex: string): Uint8Array | null {
  if (hex.length % 2 !== 0 || !/^[0-9a-f]*$/.test(hex)) return null;
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A copy backed by a plain ArrayBuffer: WebCrypto's typings want BufferSource, not a shared/generic view. */
export function toArrayBuffer(bytes: Uint8Array): ArrayBuffer {
  const out = new ArrayBuffer(bytes.byteLength);
  new Uint8Array(out).set(bytes);
  return out;
}

export interface PemBlock {
  label: string;
  der: Uint8Array;
}

/** Splits PEM text (one or several blocks, any surrounding text) into labelled DER blocks. */
export function pemBlocks(text: string): PemBlock[] {
  const blocks: PemBlock[] = [];
  const re = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/g;
  for (const m of text.matchAll(re)) {
    const der = base64Decode(m[2].replace(/\s+/g, ""));
    if (der === null || der.length === 0) throw new Error(`PEM block "${m[1]}" does not hold valid base64`);
    blocks.push({ label: m[1], der });
  }
  return blocks;
}

/** PEM as OpenSSL and Python's `cryptography` write it: 64-character lines, trailing newline. */
export function pemEncode(label: string, der: Uint8Array): string {
  const b64 = base64Encode(der);
  const lines = b64.match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

/**
 * Orders strings by Unicode code point, as spec 5.2.1 requires for `resources`. JavaScript's default sort
 * compares UTF-16 code units, which differs for astral characters against U+E000..U+FFFF.
 */
export function compareCodePoints(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    const xs = x >= 0xd800 && x <= 0xdfff;
    const ys = y >= 0xd800 && y <= 0xdfff;
    // A surrogate (code point >= U+10000) sorts after any BMP code unit that is not a surrogate.
    if (xs !== ys) return xs ? 1 : -1;
    return x - y;
  }
  return a.length - b.length;
}

export const utf8 = new TextEncoder();
export const utf8Strict = new TextDecoder("utf-8", { fatal: true });
