// The one hand-written ASN.1 helper: DER ECDSA-Sig-Value <-> WebCrypto raw r||s.

import assert from "node:assert/strict";
import { CURVE_COORDINATE_BYTES, derToRaw, rawToDer } from "../src/packages/oms/ecdsa_der.ts";

function hex(s: string): Uint8Array {
  return new Uint8Array(s.match(/../g)!.map((b) => parseInt(b, 16)));
}

Deno.test("oms der: known small signature decodes to padded r||s and encodes back", () => {
  // r = 0x01, s = 0x80 (needs a 0x00 pad byte in DER)
  const der = hex("3007020101020200" + "80");
  const raw = derToRaw(der, 4);
  assert.deepEqual(Array.from(raw), [0, 0, 0, 1, 0, 0, 0, 0x80]);
  assert.deepEqual(Array.from(rawToDer(raw)), Array.from(der));
});

Deno.test("oms der: WebCrypto signatures round-trip for P-256, P-384 and P-521 (long-form length)", async () => {
  for (const curve of ["P-256", "P-384", "P-521"] as const) {
    const keys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: curve }, false, ["sign", "verify"]);
    const hash = { "P-256": "SHA-256", "P-384": "SHA-384", "P-521": "SHA-512" }[curve];
    const data = new TextEncoder().encode(`message for ${curve}`);
    for (let i = 0; i < 8; i++) {
      const raw = new Uint8Array(await crypto.subtle.sign({ name: "ECDSA", hash }, keys.privateKey, data));
      const der = rawToDer(raw);
      assert.equal(der[0], 0x30);
      if (curve === "P-521") assert.equal(der[1], 0x81);
      const back = derToRaw(der, CURVE_COORDINATE_BYTES[curve]);
      assert.deepEqual(Array.from(back), Array.from(raw));
      assert.equal(await crypto.subtle.verify({ name: "ECDSA", hash }, keys.publicKey, back, data), true);
    }
  }
});

Deno.test("oms der: a reference-tool signature (spec test vector, P-384) decodes to 96 bytes", () => {
  const b64 =
    "MGYCMQDUN6tD25qxghxyW9Xg2/UUlYstBZCJGskEjMFFS0ZZADs6ieZCS10Hd3I9flsZey8CMQDWNYgqJzPxjpuzOlgRYkvGqt3VtP7rIxednz43U0TWRagFGedLmA+MbEXaOx/ZKJ4=";
  const der = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const raw = derToRaw(der, 48);
  assert.equal(raw.length, 96);
  assert.deepEqual(Array.from(rawToDer(raw)), Array.from(der));
});

Deno.test("oms der: malformed and non-canonical encodings are refused", () => {
  const cases: [string, string][] = [
    ["3107020101020200" + "80", "not a DER SEQUENCE"],
    ["3008020101020200" + "80", "SEQUENCE length"],
    ["300702010102020080" + "00", "SEQUENCE length"],
    ["3006020101020180", "negative INTEGER"],
    ["300702020001020101", "non-minimal INTEGER"],
    ["3006020100020101", "zero INTEGER"],
    ["3006030101020101", "expected INTEGER"],
    ["300b02060102030405060201" + "01", "too large"],
    ["30810602010102010101", "non-minimal length"],
  ];
  for (const [input, reason] of cases) {
    assert.throws(() => derToRaw(hex(input), 4), (e: Error) => e.message.includes(reason), `${input}: ${reason}`);
  }
  assert.throws(() => rawToDer(new Uint8Array(3)), /equal widths/);
});
