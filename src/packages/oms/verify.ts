// Verification procedure of spec 8: parse (8.1), check the signature with the caller's trust (8.2), validate
// the statement and its root digest (8.3, 6.5), then match the model files (8.4, 8.5). Everything is offline:
// the key and certificate methods need nothing but the trust given here; sigstore bundles are refused.

import { OmsError } from "./errors.ts";
import {
  type OmsBundleJson,
  parseBundle,
  type ParsedBundle,
  preAuthEncoding,
  type ResourceDescriptor,
  type Serialization,
  type SigningMethod,
} from "./bundle.ts";
import {
  type CertificateInfo,
  certificateInfo,
  parseCertificate,
  parseTrustedRoots,
  type TrustedRoot,
  validateChain,
} from "./chain.ts";
import { bytesEqual, pemBlocks } from "./encoding.ts";
import { hashBytesRanges, rangesFor } from "./hashing.ts";
import { parseShardName } from "./paths.ts";
import {
  CURVE_HASH,
  describeSpki,
  importVerifyKey,
  keyHints,
  sha256Hex,
  spkiFromRawBytes,
  verifyEcdsa,
  type VerifyKey,
} from "./keys.ts";
import {
  defaultSignaturePath,
  type ManifestVerification,
  rootDigest,
  type VerifiedResource,
  verifyManifest,
} from "./manifest.ts";

/** Largest signature file read; a bundle is JSON metadata, far below this even with millions of shards. */
const MAX_BUNDLE_BYTES = 256 * 1024 * 1024;

export interface TrustOptions {
  /** Trusted root CA certificates for the certificate method: PEM text(s), each may hold several certificates. */
  trustedRootsPem?: string | string[];
  /** Trusted public keys for the key method: PEM SubjectPublicKeyInfo text(s) ("PUBLIC KEY" blocks). */
  trustedKeysPem?: string | string[];
}

export interface TrustedKey {
  /** SHA-256 of the DER SubjectPublicKeyInfo, hex. */
  fingerprint: string;
  /** Hints a bundle may name this key by: SHA-256 of its PEM (reference tools) or of its DER. */
  hints: { pem: string; der: string };
  verifyKey: VerifyKey;
}

/** Parsed trust material; load once (at start-up) and reuse for every verification. */
export interface OmsTrust {
  roots: TrustedRoot[];
  keys: TrustedKey[];
}

function list(value: string | string[] | undefined): string[] {
  return value === undefined ? [] : Array.isArray(value) ? value : [value];
}

/** Parses trust PEMs, refusing anything unusable with a message naming the PEM text and block. */
export async function loadTrust(options: TrustOptions): Promise<OmsTrust> {
  const roots = parseTrustedRoots(list(options.trustedRootsPem));
  const keys: TrustedKey[] = [];
  for (const [i, pem] of list(options.trustedKeysPem).entries()) {
    let blocks;
    try {
      blocks = pemBlocks(pem).filter((b) => b.label === "PUBLIC KEY");
    } catch (error) {
      throw new OmsError("trust", "invalid_trust_material", `trusted key PEM #${i}: ${(error as Error).message}`);
    }
    if (blocks.length === 0) {
      throw new OmsError("trust", "invalid_trust_material", `trusted key PEM #${i}: holds no "PUBLIC KEY" PEM block`);
    }
    for (const [j, block] of blocks.entries()) {
      let verifyKey: VerifyKey;
      try {
        verifyKey = await importVerifyKey(block.der, "trust", `trusted key PEM #${i}, key ${j}`);
      } catch (error) {
        if (error instanceof OmsError) {
          throw new OmsError("trust", "invalid_trust_material", error.message, { cause: error });
        }
        throw error;
      }
      keys.push({ fingerprint: await sha256Hex(block.der), hints: await keyHints(block.der), verifyKey });
    }
  }
  return { roots, keys };
}

export interface SignerInfo {
  method: "key" | "certificate";
  /** Leaf certificate subject (certificate method). */
  subject?: string;
  issuer?: string;
  /** e.g. "ECDSA P-256". */
  keyAlgorithm: string;
  /** Hash of the ECDSA signature, fixed by the curve. */
  hashAlgorithm: string;
  /** SHA-256 of the signer's DER SubjectPublicKeyInfo, hex. */
  keyFingerprint: string;
  /** Key method: how the trusted key was found ("hint", "rawBytes", or by trying each trusted key). */
  keyMatchedBy?: "hint" | "rawBytes" | "trial";
}

/** Outcome of spec 8.1-8.3 (and the 6.5 root digest): who signed which manifest. */
export interface SignatureVerification {
  method: "key" | "certificate";
  mediaType: string;
  signer: SignerInfo;
  /** Certificate method: leaf first, ending with the trusted root. Empty for the key method. */
  chain: CertificateInfo[];
  /** Which DSSE signature verified (index in dsseEnvelope.signatures). */
  signatureIndex: number;
  /** subject[0].name: informational only. */
  modelName: string;
  rootDigest: string;
  serialization: Serialization;
  resources: ResourceDescriptor[];
}

function refuseSigstore(): never {
  throw new OmsError(
    "signature",
    "unsupported_method",
    "bundle uses the sigstore (keyless) signing method: verifying it requires transparency-log (Rekor) " +
      "inclusion checks and Fulcio/timestamp trust roots, which need online Sigstore trust material; this " +
      "offline verifier accepts the key and certificate methods only",
  );
}

async function verifyWith(bundle: ParsedBundle, key: VerifyKey): Promise<number> {
  const pae = preAuthEncoding(bundle.payloadType, bundle.payload);
  for (const [i, s] of bundle.signatures.entries()) {
    if (await verifyEcdsa(key, pae, s.sig)) return i;
  }
  return -1;
}

/**
 * Spec 8.2-8.3 on a parsed bundle: the signature under the caller's trust, then the statement's root digest.
 * Does not look at model files.
 */
export async function verifyBundleSignature(
  bundle: ParsedBundle,
  trust: OmsTrust,
  options: { now?: Date } = {},
): Promise<SignatureVerification> {
  const material = bundle.material;
  let signer: SignerInfo;
  let chain: CertificateInfo[] = [];
  let signatureIndex: number;

  if (material.method === "sigstore") refuseSigstore();
  if (material.method === "key") {
    if (trust.keys.length === 0) {
      throw new OmsError(
        "trust",
        "no_trust_material",
        "bundle uses the key method but no trusted public keys are configured",
      );
    }
    // publicKey only says which key to try first; a signature by any trusted key is what counts.
    const rawSpki = material.rawBytes ? spkiFromRawBytes(material.rawBytes) : null;
    const named = trust.keys.filter((k) =>
      (material.hint !== undefined && (k.hints.pem === material.hint || k.hints.der === material.hint)) ||
      (rawSpki !== null && bytesEqual(rawSpki, k.verifyKey.spki))
    );
    const ordered = [...named, ...trust.keys.filter((k) => !named.includes(k))];
    let found: TrustedKey | undefined;
    signatureIndex = -1;
    for (const key of ordered) {
      signatureIndex = await verifyWith(bundle, key.verifyKey);
      if (signatureIndex !== -1) {
        found = key;
        break;
      }
    }
    if (!found) {
      const naming = material.hint !== undefined ? `publicKey.hint ${material.hint}` : "publicKey.rawBytes";
      throw new OmsError(
        "signature",
        "signature_invalid",
        named.length > 0
          ? `DSSE signature does not verify with trusted key ${named[0].fingerprint} named by ${naming}: ` +
            `the signed statement or the signature was altered`
          : `DSSE signature does not verify with any of the ${trust.keys.length} trusted key(s) ` +
            `(${naming} matches none of them): signed by an untrusted key, or the statement was altered`,
        { field: "dsseEnvelope.signatures" },
      );
    }
    signer = {
      method: "key",
      keyAlgorithm: `ECDSA ${found.verifyKey.curve}`,
      hashAlgorithm: CURVE_HASH[found.verifyKey.curve],
      keyFingerprint: found.fingerprint,
      keyMatchedBy: named.includes(found) ? (material.hint !== undefined ? "hint" : "rawBytes") : "trial",
    };
  } else {
    if (trust.roots.length === 0) {
      throw new OmsError(
        "trust",
        "no_trust_material",
        "bundle uses the certificate method but no trusted root certificates are configured",
      );
    }
    const validated = await validateChain(material.certificates, trust.roots, options.now ?? new Date());
    chain = validated.path;
    const spki = new Uint8Array(validated.leaf.publicKey.rawData);
    let key: VerifyKey;
    try {
      key = await importVerifyKey(spki, "chain", `leaf certificate "${validated.leaf.subject}"`);
    } catch (error) {
      if (error instanceof OmsError) {
        throw new OmsError("chain", error.code, error.message, {
          certificate: { role: "leaf", index: 0, subject: validated.leaf.subject },
        });
      }
      throw error;
    }
    signatureIndex = await verifyWith(bundle, key);
    if (signatureIndex === -1) {
      throw new OmsError(
        "signature",
        "signature_invalid",
        `DSSE signature does not verify with the key of leaf certificate "${validated.leaf.subject}": ` +
          `the signed statement or the signature was altered`,
        { field: "dsseEnvelope.signatures", certificate: { role: "leaf", index: 0, subject: validated.leaf.subject } },
      );
    }
    signer = {
      method: "certificate",
      subject: validated.leaf.subject,
      issuer: validated.leaf.issuer,
      keyAlgorithm: `ECDSA ${key.curve}`,
      hashAlgorithm: CURVE_HASH[key.curve],
      keyFingerprint: await sha256Hex(spki),
    };
  }

  const predicate = bundle.statement.predicate;
  const computed = rootDigest(predicate.resources);
  if (computed !== bundle.rootDigest) {
    throw new OmsError(
      "statement",
      "subject_digest_mismatch",
      `statement.subject[0].digest.sha256 is ${bundle.rootDigest} but the signed resources hash to ${computed} ` +
        `(spec 6.5): the signer produced an inconsistent statement`,
      { field: "statement.subject[0].digest.sha256" },
    );
  }

  return {
    method: material.method,
    mediaType: bundle.mediaType,
    signer,
    chain,
    signatureIndex,
    modelName: bundle.modelName,
    rootDigest: bundle.rootDigest,
    serialization: predicate.serialization,
    resources: predicate.resources,
  };
}

/**
 * Verified signatures per trust and bundle text. Parsing certificates and validating a chain costs
 * several milliseconds; the result depends only on the bundle, the trust and the time, so a reload
 * of the same package reuses it while every certificate of its chain is still valid. Files are
 * always hashed again.
 */
const signatureCache = new WeakMap<OmsTrust, Map<string, SignatureVerification>>();

async function cachedSignature(
  raw: string | Uint8Array | OmsBundleJson,
  bundle: ParsedBundle,
  trust: OmsTrust,
  now: Date,
): Promise<SignatureVerification> {
  const key = typeof raw === "string" ? raw : raw instanceof Uint8Array ? new TextDecoder().decode(raw) : null;
  const cache = signatureCache.get(trust) ?? new Map<string, SignatureVerification>();
  signatureCache.set(trust, cache);
  const hit = key === null ? undefined : cache.get(key);
  const valid = (v: SignatureVerification) =>
    v.chain.every((c) => Date.parse(c.notBefore) <= now.getTime() && now.getTime() <= Date.parse(c.notAfter));
  if (hit && valid(hit)) return hit;
  const verified = await verifyBundleSignature(bundle, trust, { now });
  if (key !== null) cache.set(key, verified);
  return verified;
}

export interface VerifyModelOptions {
  /** Model folder (or single model file). */
  modelPath: string;
  trust: OmsTrust;
  /** Signature file; default `<modelPath>/model.sig` (folder) or `<modelPath>.sig` (file). Excluded from the scope. */
  signaturePath?: string;
  /** Bundle content when already read; `signaturePath` is then used only to exclude the signature file. */
  bundle?: string | Uint8Array | OmsBundleJson;
  /** Time the certificate chain must be valid at; default now. */
  now?: Date;
  /** Spec 8.5 `--ignore-unsigned-files`: extra files pass (reported in `unsignedFiles`). Default false. */
  ignoreUnsignedFiles?: boolean;
  /** Files (by manifest name) whose bytes the caller holds and will use: verified from these bytes. */
  preloaded?: ReadonlyMap<string, Uint8Array>;
}

export interface VerificationResult extends SignatureVerification {
  /** Real path of the verified model root. */
  modelPath: string;
  signaturePath: string;
  singleFile: boolean;
  /** Every signed resource, recomputed and matched, with its file. */
  files: VerifiedResource[];
  /** Number of distinct model files covered. */
  fileCount: number;
  bytesHashed: number;
  /** Ignore paths applied (defaults + the predicate's). */
  ignorePaths: string[];
  unsignedFiles: string[];
  warnings: string[];
  /** Each check passed, one line each, for a CLI to print. */
  checks: string[];
}

async function readBundle(signaturePath: string): Promise<Uint8Array> {
  try {
    const info = await Deno.stat(signaturePath);
    if (info.size > MAX_BUNDLE_BYTES) {
      throw new OmsError(
        "bundle",
        "malformed_bundle",
        `signature file ${signaturePath} is ${info.size} bytes, too large`,
      );
    }
    return await Deno.readFile(signaturePath);
  } catch (error) {
    if (error instanceof OmsError) throw error;
    const what = error instanceof Deno.errors.NotFound ? "not found" : (error as Error).message;
    throw new OmsError("bundle", "bundle_unreadable", `signature file ${signaturePath}: ${what}`, { cause: error });
  }
}

/** The full procedure of spec 8 for one model. Throws OmsError on the first failed stage. */
export async function verifyModel(options: VerifyModelOptions): Promise<VerificationResult> {
  const signaturePath = options.signaturePath ?? await defaultSignaturePath(options.modelPath);
  const raw = options.bundle ?? await readBundle(signaturePath);
  const bundle = parseBundle(raw);
  const signature = await cachedSignature(raw, bundle, options.trust, options.now ?? new Date());
  const manifest: ManifestVerification = await verifyManifest(options.modelPath, bundle.statement.predicate, {
    signaturePath,
    ignoreUnsignedFiles: options.ignoreUnsignedFiles,
    preloaded: options.preloaded,
  });

  const ser = signature.serialization;
  const checks = [
    `bundle: ${bundle.mediaType}, DSSE ${bundle.payloadType}, in-toto Statement v1 with the OMS v1.0 predicate`,
    signature.method === "certificate"
      ? `certificate chain valid at ${(options.now ?? new Date()).toISOString()}: ` +
        signature.chain.map((c) => `${c.role} "${c.subject}"`).join(" <- ")
      : `trusted key ${signature.signer.keyFingerprint} (found by ${signature.signer.keyMatchedBy})`,
    `DSSE signature #${signature.signatureIndex} verified (${signature.signer.keyAlgorithm}, ${signature.signer.hashAlgorithm})`,
    `statement root digest ${signature.rootDigest} matches its ${signature.resources.length} resource digest(s)`,
    `${manifest.fileCount} file(s), ${manifest.bytesHashed} bytes re-hashed with ${ser.hash_type} (${ser.method}` +
    `${ser.method === "shards" ? `, shard_size ${ser.shard_size}` : ""}): all digests match`,
    options.ignoreUnsignedFiles
      ? `unsigned files ignored on request: ${manifest.unsignedFiles.length}`
      : "no unsigned files in the model",
  ];
  return {
    ...signature,
    modelPath: manifest.root,
    signaturePath,
    singleFile: manifest.singleFile,
    files: manifest.resources,
    fileCount: manifest.fileCount,
    bytesHashed: manifest.bytesHashed,
    ignorePaths: manifest.ignorePaths,
    unsignedFiles: manifest.unsignedFiles,
    warnings: manifest.warnings,
    checks,
  };
}

/**
 * Re-checks the bytes of one model file that the caller has read into memory after verifyModel, against the
 * signed digests in `result` (files or shards). Loading exactly the bytes checked closes the window in which
 * the file could change between verification and loading.
 */
export async function checkLoadedBytes(result: SignatureVerification, name: string, bytes: Uint8Array): Promise<void> {
  const ser = result.serialization;
  const mismatch = (detail: string) =>
    new OmsError("manifest", "digest_mismatch", `${name}: loaded bytes do not match the signature: ${detail}`, {
      file: name,
      problems: [{ code: "digest_mismatch", file: name, message: `${name}: ${detail}` }],
    });
  if (ser.method === "files") {
    const signed = result.resources.find((r) => r.name === name);
    if (!signed) {
      throw new OmsError("manifest", "file_unsigned", `${name}: not listed in the signed manifest`, { file: name });
    }
    const [digest] = await hashBytesRanges(bytes, rangesFor(bytes.length), ser.hash_type);
    if (digest !== signed.digest) throw mismatch(`${ser.hash_type} ${digest}, signed ${signed.digest}`);
    return;
  }
  const shards = result.resources
    .map((r) => ({ r, shard: parseShardName(r.name) }))
    .filter((x): x is { r: ResourceDescriptor; shard: { path: string; start: number; end: number } } =>
      !(x.shard instanceof Error) && x.shard.path === name
    )
    .sort((a, b) => a.shard.start - b.shard.start);
  if (shards.length === 0 && bytes.length > 0) {
    throw new OmsError("manifest", "file_unsigned", `${name}: not listed in the signed manifest`, { file: name });
  }
  const grid = rangesFor(bytes.length, ser.shard_size);
  if (
    grid.length !== shards.length ||
    grid.some((g, i) => g.start !== shards[i].shard.start || g.end !== shards[i].shard.end)
  ) {
    throw mismatch(`${bytes.length} bytes do not fit the signed shards`);
  }
  const digests = await hashBytesRanges(bytes, grid, ser.hash_type);
  shards.forEach(({ r }, i) => {
    if (digests[i] !== r.digest) throw mismatch(`shard ${r.name}: ${ser.hash_type} ${digests[i]}, signed ${r.digest}`);
  });
}

/** Multi-line report of a successful verification, for a CLI. */
export function formatVerificationResult(result: VerificationResult): string {
  const lines = [
    `Model ${result.modelPath} verified (OMS ${result.method} method)`,
    `  signature: ${result.signaturePath}`,
  ];
  if (result.signer.subject) lines.push(`  signer: ${result.signer.subject}`);
  lines.push(`  key: ${result.signer.keyAlgorithm}, sha256 ${result.signer.keyFingerprint}`);
  for (const c of result.chain) lines.push(`  chain ${c.role}: ${c.subject} (valid ${c.notBefore} - ${c.notAfter})`);
  lines.push("  checks:");
  for (const check of result.checks) lines.push(`    - ${check}`);
  lines.push("  files:");
  for (const f of result.files) lines.push(`    ${f.algorithm}:${f.digest}  ${f.name}`);
  for (const w of result.warnings) lines.push(`  warning: ${w}`);
  return lines.join("\n");
}

/** What a bundle says and what can be checked about it without any trust (for CLIs and test vectors). */
export interface BundleInspection {
  method: SigningMethod;
  mediaType: string;
  modelName: string;
  rootDigest: string;
  /** Whether subject[0].digest.sha256 matches the resources (spec 6.5). */
  rootDigestConsistent: boolean;
  serialization: Serialization;
  resources: ResourceDescriptor[];
  /** Key method: what identifies the key. */
  publicKey?: { hint?: string; rawBytesKey?: string; keyDetails?: string };
  /** Certificates carried by the bundle (unverified): the chain, or the sigstore Fulcio certificate. */
  certificates: CertificateInfo[];
  /** For each bundle certificate but the last: is it signed by the next one? */
  chainLinks: { subject: string; issuer: string; signedByNext: boolean }[];
  /**
   * The DSSE signature checked against the key the bundle itself carries (leaf / Fulcio certificate, or
   * rawBytes key): true/false, or null when the bundle names its key only by hint. Proves integrity, not trust.
   */
  signatureMatchesEmbeddedKey: boolean | null;
  tlogEntries?: number;
  /** What was not verified, and why. */
  notVerified: string[];
}

/** Parses a bundle and checks what needs no trust anchors. Throws OmsError only if the bundle is malformed. */
export async function inspectBundle(input: string | Uint8Array | OmsBundleJson): Promise<BundleInspection> {
  const bundle = parseBundle(input);
  const material = bundle.material;
  const predicate = bundle.statement.predicate;
  const certificates: CertificateInfo[] = [];
  const chainLinks: BundleInspection["chainLinks"] = [];
  const notVerified: string[] = [];
  let embeddedSpki: Uint8Array | null = null;
  let publicKey: BundleInspection["publicKey"];
  let tlogEntries: number | undefined;

  if (material.method === "key") {
    embeddedSpki = material.rawBytes ? spkiFromRawBytes(material.rawBytes) : null;
    publicKey = {
      hint: material.hint,
      rawBytesKey: embeddedSpki ? describeSpki(embeddedSpki) : undefined,
      keyDetails: material.keyDetails,
    };
    notVerified.push("signer trust: the key method needs the signer's public key among the trusted keys");
  } else {
    const ders = material.method === "certificate" ? material.certificates : [material.certificate];
    const certs = ders.map((der, i) => parseCertificate(der, `certificate #${i}`));
    for (const [i, cert] of certs.entries()) {
      certificates.push(await certificateInfo(cert, i === 0 ? "leaf" : "intermediate"));
      if (i + 1 < certs.length) {
        let ok = false;
        try {
          ok = await cert.verify({ publicKey: certs[i + 1].publicKey, signatureOnly: true });
        } catch {
          ok = false;
        }
        chainLinks.push({ subject: cert.subject, issuer: cert.issuer, signedByNext: ok });
      }
    }
    embeddedSpki = new Uint8Array(certs[0].publicKey.rawData);
    if (material.method === "certificate") {
      notVerified.push("chain trust: the chain's root must be among the trusted roots (none given to inspect)");
    } else {
      tlogEntries = material.tlogEntries;
      notVerified.push(
        "sigstore: transparency-log inclusion and Fulcio/timestamp trust need online Sigstore trust material",
      );
    }
  }

  let signatureMatchesEmbeddedKey: boolean | null = null;
  if (embeddedSpki) {
    try {
      const key = await importVerifyKey(embeddedSpki, "signature", "embedded key");
      signatureMatchesEmbeddedKey = (await verifyWith(bundle, key)) !== -1;
    } catch {
      signatureMatchesEmbeddedKey = false;
      notVerified.push(`DSSE signature: embedded key type ${describeSpki(embeddedSpki)} is not supported`);
    }
  } else {
    notVerified.push("DSSE signature: the bundle names its key only by hint");
  }
  notVerified.push("model files: inspection does not read the model");

  return {
    method: material.method,
    mediaType: bundle.mediaType,
    modelName: bundle.modelName,
    rootDigest: bundle.rootDigest,
    rootDigestConsistent: rootDigest(predicate.resources) === bundle.rootDigest,
    serialization: predicate.serialization,
    resources: predicate.resources,
    publicKey,
    certificates,
    chainLinks,
    signatureMatchesEmbeddedKey,
    tlogEntries,
    notVerified,
  };
}
