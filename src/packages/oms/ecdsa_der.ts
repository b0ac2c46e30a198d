// DSSE signatures made by the OMS reference tools (Python `cryptography`, Go crypto/ecdsa) are DER
// ECDSA-Sig-Value = SEQUENCE { r INTEGER, s INTEGER } (RFC 3279), while WebCrypto signs and verifies the raw
// fixed-width r||s form (IEEE P1363). This is the only hand-written ASN.1 in the library, kept to that one
// structure and strict DER so a malleated encoding is refused rather than normalized.

/** Bytes of one coordinate (r or s) for each supported curve. */
export const CURVE_COORDINATE_BYTES = { "P-256": 32, "P-384": 48, "P-521": 66 } as const;

function readLength(der: Uint8Array, pos: number): [length: number, next: number] {
  if (pos >= der.length) throw new Error("truncated length");
  const first = der[pos];
  if (first < 0x80) return [first, pos + 1];
  // ECDSA signatures are under 256 bytes for every supported curve: only the 0x81 long form can occur.
  if (first !== 0x81) throw new Error("unsupported length encoding");
  if (pos + 1 >= der.length) throw new Error("truncated length");
  const len = der[pos + 1];
  if (len < 0x80) throw new Error("non-minimal length encoding");
  return [len, pos + 2];
}

function readInteger(der: Uint8Array, pos: number, width: number): [value: Uint8Array, next: number] {
  if (der[pos] !== 0x02) throw new Error("expected INTEGER");
  const [len, start] = readLength(der, pos + 1);
  const end = start + len;
  if (len === 0 || end > der.length) throw new Error("bad INTEGER length");
  let value = der.subarray(start, end);
  if (value[0] & 0x80) throw new Error("negative INTEGER");
  if (value[0] === 0x00) {
    if (value.length === 1) throw new Error("zero INTEGER");
    if (!(value[1] & 0x80)) throw new Error("non-minimal INTEGER");
    value = value.subarray(1);
  }
  if (value.length > width) throw new Error("INTEGER too large for the curve");
  const out = new Uint8Array(width);
  out.set(value, width - value.length);
  return [out, end];
}

/** DER ECDSA-Sig-Value to raw r||s of `width` bytes each. Throws with the reason on malformed input. */
export function derToRaw(der: Uint8Array, width: number): Uint8Array<ArrayBuffer> {
  if (der.length < 8 || der[0] !== 0x30) throw new Error("not a DER SEQUENCE");
  const [seqLen, body] = readLength(der, 1);
  if (body + seqLen !== der.length) throw new Error("SEQUENCE length does not match the signature length");
  const [r, afterR] = readInteger(der, body, width);
  const [s, afterS] = readInteger(der, afterR, width);
  if (afterS !== der.length) throw new Error("trailing bytes after s");
  const raw = new Uint8Array(2 * width);
  raw.set(r, 0);
  raw.set(s, width);
  return raw;
}

function encodeInteger(value: Uint8Array): Uint8Array {
  let i = 0;
  while (i < value.length - 1 && value[i] === 0) i++;
  const stripped = value.subarray(i);
  const pad = stripped[0] & 0x80 ? 1 : 0;
  const out = new Uint8Array(2 + pad + stripped.length);
  out[0] = 0x02;
  out[1] = pad + stripped.length;
  out.set(stripped, 2 + pad);
  return out;
}

/** Raw r||s (as WebCrypto returns) to DER ECDSA-Sig-Value (as DSSE tools expect). */
export function rawToDer(raw: Uint8Array): Uint8Array<ArrayBuffer> {
  if (raw.length === 0 || raw.length % 2 !== 0) throw new Error("raw ECDSA signature must be r||s of equal widths");
  const width = raw.length / 2;
  const r = encodeInteger(raw.subarray(0, width));
  const s = encodeInteger(raw.subarray(width));
  const bodyLen = r.length + s.length;
  const header = bodyLen < 0x80 ? [0x30, bodyLen] : [0x30, 0x81, bodyLen];
  const out = new Uint8Array(header.length + bodyLen);
  out.set(header, 0);
  out.set(r, header.length);
  out.set(s, header.length + r.length);
  return out;
}
