// Signing keys of the key and certificate methods: EC P-256/P-384/P-521 (algorithm registry), each with the
// hash Sigstore pairs with it (PKIX_ECDSA_P256_SHA_256, P384_SHA_384, P521_SHA_512), as the reference
// implementation signs. DSSE signatures are DER on the wire and raw r||s inside WebCrypto.

import * as x509 from "./x509.ts";
import { OmsError, type OmsStage } from "./errors.ts";
import { CURVE_COORDINATE_BYTES, derToRaw, rawToDer } from "./ecdsa_der.ts";
import { base64Decode, hexEncode, pemBlocks, pemEncode, toArrayBuffer, utf8, utf8Strict } from "./encoding.ts";

export type EcCurve = "P-256" | "P-384" | "P-521";
export const EC_CURVES: readonly EcCurve[] = ["P-256", "P-384", "P-521"];
export const CURVE_HASH: Record<EcCurve, "SHA-256" | "SHA-384" | "SHA-512"> = {
  "P-256": "SHA-256",
  "P-384": "SHA-384",
  "P-521": "SHA-512",
};

/** A public key that may check DSSE signatures. */
export interface VerifyKey {
  curve: EcCurve;
  key: CryptoKey;
  /** DER SubjectPublicKeyInfo. */
  spki: Uint8Array;
}

export async function sha256Hex(data: Uint8Array): Promise<string> {
  return hexEncode(new Uint8Array(await crypto.subtle.digest("SHA-256", toArrayBuffer(data))));
}

/** Human-readable key type of an SPKI ("ECDSA P-256", "RSA 3072", ...). */
export function describeSpki(spki: Uint8Array): string {
  try {
    const alg = new x509.PublicKey(toArrayBuffer(spki)).algorithm as Algorithm & {
      namedCurve?: string;
      modulusLength?: number;
    };
    if (alg.namedCurve) return `${alg.name} ${alg.namedCurve}`;
    if (alg.modulusLength) return `RSA ${alg.modulusLength}`;
    return alg.name;
  } catch {
    return "unknown key type";
  }
}

/** Imports an SPKI as an ECDSA verification key, refusing curves and key types OMS does not sign with. */
export async function importVerifyKey(spki: Uint8Array, stage: OmsStage, what: string): Promise<VerifyKey> {
  let alg: Algorithm & { namedCurve?: string };
  try {
    alg = new x509.PublicKey(toArrayBuffer(spki)).algorithm;
  } catch (error) {
    throw new OmsError(
      stage,
      "unsupported_key",
      `${what}: not a valid SubjectPublicKeyInfo (${(error as Error).message})`,
    );
  }
  const curve = alg.namedCurve as EcCurve | undefined;
  if (alg.name !== "ECDSA" || curve === undefined || !EC_CURVES.includes(curve)) {
    throw new OmsError(
      stage,
      "unsupported_key",
      `${what}: ${describeSpki(spki)} keys cannot sign OMS bundles; the key and certificate methods use ` +
        `EC P-256, P-384 or P-521 (OMS algorithm registry)`,
    );
  }
  const key = await crypto.subtle.importKey("spki", toArrayBuffer(spki), { name: "ECDSA", namedCurve: curve }, true, [
    "verify",
  ]);
  return { curve, key, spki };
}

/**
 * Checks one DSSE signature over `message` (the PAE). Signatures are DER as the reference tools write them;
 * a raw r||s of exactly the curve's width is accepted too since some DSSE producers emit that form.
 */
export async function verifyEcdsa(key: VerifyKey, message: Uint8Array, signature: Uint8Array): Promise<boolean> {
  const width = CURVE_COORDINATE_BYTES[key.curve];
  let raw: Uint8Array;
  try {
    raw = derToRaw(signature, width);
  } catch {
    if (signature.length !== 2 * width) return false;
    raw = signature;
  }
  return await crypto.subtle.verify(
    { name: "ECDSA", hash: CURVE_HASH[key.curve] },
    key.key,
    toArrayBuffer(raw),
    toArrayBuffer(message),
  );
}

/**
 * Key fingerprints a bundle's `publicKey.hint` may carry. The reference implementation writes the SHA-256 of
 * the PEM text (64-column lines, trailing newline); the spec only says "hex-encoded key fingerprint", so the
 * SHA-256 of the DER SPKI is recognized as well.
 */
export async function keyHints(spki: Uint8Array): Promise<{ pem: string; der: string }> {
  return { pem: await sha256Hex(utf8.encode(pemEncode("PUBLIC KEY", spki))), der: await sha256Hex(spki) };
}

/** The hint this library writes: the reference implementation's (SHA-256 of the PEM SPKI). */
export async function keyHint(spki: Uint8Array): Promise<string> {
  return (await keyHints(spki)).pem;
}

/** DER SPKI inside a pre-v1.1.0 `publicKey.rawBytes` (which held the PEM text; DER accepted too). */
export function spkiFromRawBytes(raw: Uint8Array): Uint8Array | null {
  try {
    const text = utf8Strict.decode(raw);
    if (text.includes("-----BEGIN")) {
      const block = pemBlocks(text).find((b) => b.label === "PUBLIC KEY");
      return block?.der ?? null;
    }
    const decoded = base64Decode(text.replace(/\s+/g, ""));
    if (decoded && decoded[0] === 0x30) return decoded;
  } catch {
    // not text: fall through to DER
  }
  return raw[0] === 0x30 ? raw : null;
}

/** An EC private key ready to sign DSSE envelopes, with its public half. */
export interface SigningKey {
  curve: EcCurve;
  privateKey: CryptoKey;
  spki: Uint8Array;
}

/** Loads a PKCS#8 PEM ("PRIVATE KEY") EC key and derives its SPKI. */
export async function importSigningKey(privateKeyPem: string): Promise<SigningKey> {
  let blocks;
  try {
    blocks = pemBlocks(privateKeyPem);
  } catch (error) {
    throw new OmsError("signing", "invalid_trust_material", `private key: ${(error as Error).message}`);
  }
  const labels = blocks.map((b) => b.label);
  const block = blocks.find((b) => b.label === "PRIVATE KEY");
  if (!block) {
    const hint = labels.includes("EC PRIVATE KEY")
      ? " (found a SEC1 'EC PRIVATE KEY'; convert it with `openssl pkcs8 -topk8 -nocrypt`)"
      : labels.includes("ENCRYPTED PRIVATE KEY")
      ? " (found an encrypted key; decrypt it first)"
      : labels.length > 0
      ? ` (found: ${labels.join(", ")})`
      : "";
    throw new OmsError("signing", "invalid_trust_material", `private key: expected a PKCS#8 "PRIVATE KEY" PEM${hint}`);
  }
  // PKCS#8 names the curve inside; WebCrypto wants it up front, so try each supported one.
  for (const curve of EC_CURVES) {
    let privateKey: CryptoKey;
    try {
      privateKey = await crypto.subtle.importKey(
        "pkcs8",
        toArrayBuffer(block.der),
        { name: "ECDSA", namedCurve: curve },
        true,
        [
          "sign",
        ],
      );
    } catch {
      continue;
    }
    const jwk = await crypto.subtle.exportKey("jwk", privateKey);
    const publicKey = await crypto.subtle.importKey(
      "jwk",
      { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y, ext: true },
      { name: "ECDSA", namedCurve: curve },
      true,
      ["verify"],
    );
    const spki = new Uint8Array(await crypto.subtle.exportKey("spki", publicKey));
    return { curve, privateKey, spki };
  }
  throw new OmsError(
    "signing",
    "unsupported_key",
    "private key: not an EC P-256, P-384 or P-521 key (the key and certificate methods sign with EC keys)",
  );
}

/** Signs `message` (the PAE) and returns the DER signature DSSE tools expect. */
export async function signEcdsa(key: SigningKey, message: Uint8Array): Promise<Uint8Array> {
  const raw = await crypto.subtle.sign(
    { name: "ECDSA", hash: CURVE_HASH[key.curve] },
    key.privateKey,
    toArrayBuffer(message),
  );
  return rawToDer(new Uint8Array(raw));
}
