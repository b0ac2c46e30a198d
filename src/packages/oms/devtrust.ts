// Development trust: a throw-away root CA, intermediate CA and code-signing leaf so models can be signed and
// verified without a real PKI. Every subject says NOT FOR PRODUCTION, so such a root is easy to spot if it ever
// lands in a production trust configuration.

import * as x509 from "./x509.ts";
import { pemEncode } from "./encoding.ts";
import { CURVE_HASH, type EcCurve } from "./keys.ts";

export type KeyUsageName = Exclude<keyof typeof x509.KeyUsageFlags, number>;

export interface DevelopmentTrustOptions {
  /** Curve of the code-signing leaf key. Default P-256. */
  leafCurve?: EcCurve;
  /** Key of the intermediate CA: EC P-256 or RSA. Default "ec". */
  intermediateKey?: "ec" | "rsa";
  /** Key of the root CA: EC P-256 or RSA. Default "ec". */
  rootKey?: "ec" | "rsa";
  /** Signature scheme of RSA CAs: PKCS#1 v1.5 or PSS (SHA-256 both). Default "pkcs1". */
  rsaSignatureScheme?: "pkcs1" | "pss";
  /** RSA modulus bits. Default 3072. */
  rsaModulusLength?: number;
  /** Issue time. Default now. */
  now?: Date;
  /** CA validity. Default 3650 days. */
  caValidityDays?: number;
  /** Leaf validity. Default 365 days. */
  leafValidityDays?: number;
  /** Appended to every common name, to tell several development trusts apart. */
  nameSuffix?: string;
  /** Leaf overrides, e.g. to produce deliberately unusable certificates in tests. */
  leaf?: {
    notBefore?: Date;
    notAfter?: Date;
    /** Default ["digitalSignature"]. */
    keyUsage?: KeyUsageName[];
    /** OIDs; default [codeSigning]; null leaves the extension out. */
    extendedKeyUsage?: string[] | null;
  };
}

export interface DevelopmentCredential {
  subject: string;
  certificatePem: string;
  /** PKCS#8 PEM. */
  privateKeyPem: string;
  /** SubjectPublicKeyInfo PEM. */
  publicKeyPem: string;
}

export interface DevelopmentTrust {
  root: DevelopmentCredential;
  intermediate: DevelopmentCredential;
  leaf: DevelopmentCredential;
  /** Leaf then intermediate: what signModel's certificateChainPem takes. */
  chainPem: string;
}

const DAY_MS = 86_400_000;
const CODE_SIGNING = "1.3.6.1.5.5.7.3.3";
const ORG = "O=OMS development trust - NOT FOR PRODUCTION";

interface KeyMaterial {
  keys: CryptoKeyPair;
  /** How certificates issued by this key are signed. */
  signingAlgorithm: Algorithm;
  signingKey: CryptoKey;
}

async function ecKey(curve: EcCurve): Promise<KeyMaterial> {
  const keys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: curve }, true, ["sign", "verify"]);
  return {
    keys,
    signingAlgorithm: { name: "ECDSA", hash: CURVE_HASH[curve] } as Algorithm,
    signingKey: keys.privateKey,
  };
}

async function rsaKey(bits: number, scheme: "pkcs1" | "pss"): Promise<KeyMaterial> {
  const keys = await crypto.subtle.generateKey(
    { name: "RSASSA-PKCS1-v1_5", modulusLength: bits, publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" },
    true,
    ["sign", "verify"],
  );
  if (scheme === "pkcs1") {
    return {
      keys,
      signingAlgorithm: { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" } as Algorithm,
      signingKey: keys.privateKey,
    };
  }
  // Same key, used for RSASSA-PSS: WebCrypto binds a key to one scheme, so import it again for PSS.
  const pkcs8 = await crypto.subtle.exportKey("pkcs8", keys.privateKey);
  const signingKey = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "RSA-PSS", hash: "SHA-256" }, false, [
    "sign",
  ]);
  return { keys, signingAlgorithm: { name: "RSA-PSS", hash: "SHA-256", saltLength: 32 } as Algorithm, signingKey };
}

function serialNumber(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[0] &= 0x7f; // positive INTEGER
  bytes[0] |= 0x01; // and not starting with a zero byte
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function credential(cert: x509.X509Certificate, keys: CryptoKeyPair): Promise<DevelopmentCredential> {
  return {
    subject: cert.subject,
    certificatePem: pemEncode("CERTIFICATE", new Uint8Array(cert.rawData)),
    privateKeyPem: pemEncode("PRIVATE KEY", new Uint8Array(await crypto.subtle.exportKey("pkcs8", keys.privateKey))),
    publicKeyPem: pemEncode("PUBLIC KEY", new Uint8Array(await crypto.subtle.exportKey("spki", keys.publicKey))),
  };
}

/** Generates a root CA, an intermediate CA and a code-signing leaf, all labelled as development-only. */
export async function generateDevelopmentTrust(options: DevelopmentTrustOptions = {}): Promise<DevelopmentTrust> {
  const now = options.now ?? new Date();
  const suffix = options.nameSuffix ? ` ${options.nameSuffix}` : "";
  const caDays = options.caValidityDays ?? 3650;
  const leafDays = options.leafValidityDays ?? 365;
  const bits = options.rsaModulusLength ?? 3072;
  const scheme = options.rsaSignatureScheme ?? "pkcs1";
  // Back-dated an hour so a verifier whose clock is slightly behind still accepts fresh certificates.
  const notBefore = new Date(now.getTime() - 3_600_000);

  const rootKey = options.rootKey === "rsa" ? await rsaKey(bits, scheme) : await ecKey("P-256");
  const interKey = options.intermediateKey === "rsa" ? await rsaKey(bits, scheme) : await ecKey("P-256");
  const leafKey = await ecKey(options.leafCurve ?? "P-256");

  const rootName = `CN=OMS Development Root CA - NOT FOR PRODUCTION${suffix}, ${ORG}`;
  const interName = `CN=OMS Development Intermediate CA - NOT FOR PRODUCTION${suffix}, ${ORG}`;
  const leafName = `CN=OMS Development Code Signing - NOT FOR PRODUCTION${suffix}, ${ORG}`;
  const caUsage = x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign;

  const root = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: rootName,
    issuer: rootName,
    notBefore,
    notAfter: new Date(now.getTime() + caDays * DAY_MS),
    signingAlgorithm: rootKey.signingAlgorithm,
    publicKey: rootKey.keys.publicKey,
    signingKey: rootKey.signingKey,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(caUsage, true),
      await x509.SubjectKeyIdentifierExtension.create(rootKey.keys.publicKey),
    ],
  });

  const intermediate = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: interName,
    issuer: root.subjectName,
    notBefore,
    notAfter: new Date(now.getTime() + caDays * DAY_MS),
    signingAlgorithm: rootKey.signingAlgorithm,
    publicKey: interKey.keys.publicKey,
    signingKey: rootKey.signingKey,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(caUsage, true),
      await x509.SubjectKeyIdentifierExtension.create(interKey.keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(rootKey.keys.publicKey),
    ],
  });

  const leafUsage = (options.leaf?.keyUsage ?? ["digitalSignature"]).reduce(
    (flags, name) => flags | x509.KeyUsageFlags[name],
    0,
  );
  const eku = options.leaf?.extendedKeyUsage === undefined ? [CODE_SIGNING] : options.leaf.extendedKeyUsage;
  const leafExtensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(leafUsage, true),
    await x509.SubjectKeyIdentifierExtension.create(leafKey.keys.publicKey),
    await x509.AuthorityKeyIdentifierExtension.create(interKey.keys.publicKey),
  ];
  if (eku !== null) leafExtensions.push(new x509.ExtendedKeyUsageExtension(eku, false));
  const leaf = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: leafName,
    issuer: intermediate.subjectName,
    notBefore: options.leaf?.notBefore ?? notBefore,
    notAfter: options.leaf?.notAfter ?? new Date(now.getTime() + leafDays * DAY_MS),
    signingAlgorithm: interKey.signingAlgorithm,
    publicKey: leafKey.keys.publicKey,
    signingKey: interKey.signingKey,
    extensions: leafExtensions,
  });

  const result = {
    root: await credential(root, rootKey.keys),
    intermediate: await credential(intermediate, interKey.keys),
    leaf: await credential(leaf, leafKey.keys),
  };
  return { ...result, chainPem: result.leaf.certificatePem + result.intermediate.certificatePem };
}

/** A bare EC key pair for the key method (PKCS#8 and SPKI PEM). */
export async function generateDevelopmentKeyPair(
  curve: EcCurve = "P-256",
): Promise<{ privateKeyPem: string; publicKeyPem: string }> {
  const keys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: curve }, true, ["sign", "verify"]);
  return {
    privateKeyPem: pemEncode("PRIVATE KEY", new Uint8Array(await crypto.subtle.exportKey("pkcs8", keys.privateKey))),
    publicKeyPem: pemEncode("PUBLIC KEY", new Uint8Array(await crypto.subtle.exportKey("spki", keys.publicKey))),
  };
}
