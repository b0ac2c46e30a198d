// Structure of an OMS bundle (spec 4-5, 8.1, 8.3): Sigstore bundle -> DSSE envelope -> in-toto Statement ->
// OMS predicate. Parsing checks every layer against the v1.0 schemas' rules (plus the spec's prose rules the
// schemas cannot express) and says which field is wrong; it does no cryptography.

import { OmsError, type OmsErrorCode, type OmsStage } from "./errors.ts";
import { base64Decode, concatBytes, utf8, utf8Strict } from "./encoding.ts";
import { canonicalIgnorePath, canonicalPathProblem, parseShardName } from "./paths.ts";

/** Media type OMS producers write (sigstore_bundle.proto, bundle v0.3). */
export const BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json";

/**
 * Media types accepted on input: the current one and the older Sigstore spellings (bundle v0.1-v0.3 with a
 * `version` parameter) that pre-v1.1.0 producers may have written; all carry the same JSON layout for DSSE.
 */
export const ACCEPTED_BUNDLE_MEDIA_TYPES: readonly string[] = [
  BUNDLE_MEDIA_TYPE,
  "application/vnd.dev.sigstore.bundle+json;version=0.3",
  "application/vnd.dev.sigstore.bundle+json;version=0.2",
  "application/vnd.dev.sigstore.bundle+json;version=0.1",
];

export const DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json";
export const STATEMENT_TYPE = "https://in-toto.io/Statement/v1";
export const PREDICATE_TYPE = "https://model_signing/signature/v1.0";
/** Deprecated v0.2.0 predicate (spec 5.1, 11): recognized only to refuse it with a precise reason. */
export const LEGACY_PREDICATE_TYPE = "https://model_signing/Digests/v0.1";

export type SigningMethod = "key" | "certificate" | "sigstore";
export type HashType = "sha256" | "blake2b" | "blake3";
export type SerializationMethod = "files" | "shards";

/** Hex digest length of each registry algorithm (algorithm-registry.md). */
export const HASH_HEX_LENGTH: Record<HashType, number> = { sha256: 64, blake2b: 128, blake3: 64 };

export interface ResourceDescriptor {
  name: string;
  digest: string;
  algorithm: HashType;
}

export interface Serialization {
  method: SerializationMethod;
  hash_type: HashType;
  shard_size?: number;
  allow_symlinks: boolean;
  ignore_paths?: string[];
}

export interface OmsPredicate {
  resources: ResourceDescriptor[];
  serialization: Serialization;
}

export interface OmsStatement {
  _type: typeof STATEMENT_TYPE;
  subject: { name: string; digest: Record<string, string> }[];
  predicateType: typeof PREDICATE_TYPE;
  predicate: OmsPredicate;
}

/** The JSON form written to model.sig. */
export interface OmsBundleJson {
  mediaType: string;
  verificationMaterial: {
    publicKey?: { hint?: string; rawBytes?: string; keyDetails?: string };
    x509CertificateChain?: { certificates: { rawBytes: string }[] };
    certificate?: { rawBytes: string };
    tlogEntries?: unknown[];
    timestampVerificationData?: unknown;
  };
  dsseEnvelope: {
    payload: string;
    payloadType: string;
    signatures: { sig: string; keyid?: string | null }[];
  };
}

export type VerificationMaterial =
  | {
    method: "key";
    /** Hex key fingerprint (current producers). */
    hint?: string;
    /** Decoded `rawBytes` of pre-v1.1.0 bundles (the producer's public key, PEM or DER). */
    rawBytes?: Uint8Array;
    keyDetails?: string;
  }
  | {
    method: "certificate";
    /** DER certificates, leaf first then the CA chain. */
    certificates: Uint8Array[];
  }
  | {
    method: "sigstore";
    /** DER Fulcio certificate. */
    certificate: Uint8Array;
    tlogEntries: number;
    rfc3161Timestamps: number;
  };

export interface DsseSignature {
  sig: Uint8Array;
  keyid?: string | null;
}

export interface ParsedBundle {
  mediaType: string;
  material: VerificationMaterial;
  payloadType: string;
  /** Decoded DSSE payload: the exact bytes the signature's PAE covers. */
  payload: Uint8Array;
  signatures: DsseSignature[];
  statement: OmsStatement;
  /** subject[0].name: informational only (spec 6.5). */
  modelName: string;
  /** subject[0].digest.sha256 (spec 6.5). */
  rootDigest: string;
}

type Json = Record<string, unknown>;

function fail(stage: OmsStage, code: OmsErrorCode, field: string, message: string): never {
  throw new OmsError(stage, code, `${field}: ${message}`, { field });
}

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function kind(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}

function object(stage: OmsStage, code: OmsErrorCode, value: unknown, field: string): Json {
  if (value === undefined) fail(stage, code, field, "is missing");
  if (!isObject(value)) fail(stage, code, field, `must be an object, found ${kind(value)}`);
  return value;
}

function onlyKeys(stage: OmsStage, code: OmsErrorCode, obj: Json, field: string, allowed: string[]): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) fail(stage, code, field, `unexpected field "${key}" (allowed: ${allowed.join(", ")})`);
  }
}

function string(stage: OmsStage, code: OmsErrorCode, value: unknown, field: string, nonEmpty = true): string {
  if (value === undefined) fail(stage, code, field, "is missing");
  if (typeof value !== "string") fail(stage, code, field, `must be a string, found ${kind(value)}`);
  if (nonEmpty && value.length === 0) fail(stage, code, field, "must not be empty");
  return value;
}

function base64Field(stage: OmsStage, code: OmsErrorCode, value: unknown, field: string): Uint8Array {
  const text = string(stage, code, value, field);
  const bytes = base64Decode(text);
  if (bytes === null || bytes.length === 0) fail(stage, code, field, "is not valid base64");
  return bytes;
}

/** Parses and structurally validates a bundle given as JSON text, bytes or an already parsed value. */
export function parseBundle(input: string | Uint8Array | unknown): ParsedBundle {
  let json: unknown = input;
  if (typeof input === "string" || input instanceof Uint8Array) {
    let text: string;
    try {
      text = typeof input === "string" ? input : utf8Strict.decode(input);
    } catch {
      throw new OmsError("bundle", "malformed_json", "signature bundle is not valid UTF-8");
    }
    if (text.trim() === "") throw new OmsError("bundle", "malformed_json", "signature bundle is empty");
    try {
      json = JSON.parse(text);
    } catch (error) {
      throw new OmsError("bundle", "malformed_json", `signature bundle is not valid JSON: ${(error as Error).message}`);
    }
  }
  const bundle = object("bundle", "malformed_bundle", json, "bundle");
  onlyKeys("bundle", "malformed_bundle", bundle, "bundle", ["mediaType", "verificationMaterial", "dsseEnvelope"]);

  const mediaType = string("bundle", "malformed_bundle", bundle.mediaType, "mediaType");
  if (!ACCEPTED_BUNDLE_MEDIA_TYPES.includes(mediaType)) {
    fail(
      "bundle",
      "unsupported_media_type",
      "mediaType",
      `"${mediaType}" is not a supported Sigstore bundle media type (expected ${BUNDLE_MEDIA_TYPE})`,
    );
  }
  const material = parseVerificationMaterial(bundle.verificationMaterial);

  if (bundle.dsseEnvelope === undefined) {
    fail(
      "envelope",
      "malformed_envelope",
      "dsseEnvelope",
      "is missing (OMS bundles carry a DSSE envelope, not a messageSignature)",
    );
  }
  const envelope = object("envelope", "malformed_envelope", bundle.dsseEnvelope, "dsseEnvelope");
  onlyKeys("envelope", "malformed_envelope", envelope, "dsseEnvelope", ["payload", "payloadType", "signatures"]);
  const payloadType = string("envelope", "malformed_envelope", envelope.payloadType, "dsseEnvelope.payloadType");
  if (payloadType !== DSSE_PAYLOAD_TYPE) {
    fail(
      "envelope",
      "unsupported_payload_type",
      "dsseEnvelope.payloadType",
      `"${payloadType}" is not ${DSSE_PAYLOAD_TYPE}`,
    );
  }
  const payload = base64Field("envelope", "malformed_envelope", envelope.payload, "dsseEnvelope.payload");
  const sigs = envelope.signatures;
  if (sigs === undefined) fail("envelope", "malformed_envelope", "dsseEnvelope.signatures", "is missing");
  if (!Array.isArray(sigs) || sigs.length === 0) {
    fail("envelope", "malformed_envelope", "dsseEnvelope.signatures", "must be a non-empty array");
  }
  const signatures = sigs.map((entry, i): DsseSignature => {
    const field = `dsseEnvelope.signatures[${i}]`;
    const sig = object("envelope", "malformed_envelope", entry, field);
    onlyKeys("envelope", "malformed_envelope", sig, field, ["sig", "keyid"]);
    // keyid may be absent, "" or null (spec 4.1, 11.2); OMS never uses it.
    if (sig.keyid !== undefined && sig.keyid !== null && typeof sig.keyid !== "string") {
      fail("envelope", "malformed_envelope", `${field}.keyid`, `must be a string or null, found ${kind(sig.keyid)}`);
    }
    return {
      sig: base64Field("envelope", "malformed_envelope", sig.sig, `${field}.sig`),
      keyid: sig.keyid as string | null | undefined,
    };
  });

  const statement = parseStatement(payload);
  return {
    mediaType,
    material,
    payloadType,
    payload,
    signatures,
    statement,
    modelName: statement.subject[0].name,
    rootDigest: statement.subject[0].digest.sha256,
  };
}

function parseVerificationMaterial(value: unknown): VerificationMaterial {
  const field = "verificationMaterial";
  const vm = object("bundle", "malformed_bundle", value, field);
  const present = ["publicKey", "x509CertificateChain", "certificate"].filter((k) => vm[k] !== undefined);
  if (present.length === 0) {
    fail(
      "bundle",
      "malformed_bundle",
      field,
      "names no signer: expected publicKey (key method), x509CertificateChain (certificate method) " +
        "or certificate (sigstore method)",
    );
  }
  if (present.length > 1) fail("bundle", "malformed_bundle", field, `holds both ${present.join(" and ")}`);
  if (vm.tlogEntries !== undefined && !Array.isArray(vm.tlogEntries)) {
    fail("bundle", "malformed_bundle", `${field}.tlogEntries`, `must be an array, found ${kind(vm.tlogEntries)}`);
  }
  if (vm.timestampVerificationData !== undefined) {
    object("bundle", "malformed_bundle", vm.timestampVerificationData, `${field}.timestampVerificationData`);
  }
  const tlogEntries = (vm.tlogEntries as unknown[] | undefined) ?? [];

  if (present[0] === "publicKey") {
    const pk = object("bundle", "malformed_bundle", vm.publicKey, `${field}.publicKey`);
    if (pk.hint === undefined && pk.rawBytes === undefined) {
      fail("bundle", "malformed_bundle", `${field}.publicKey`, "has neither hint nor rawBytes");
    }
    const hint = pk.hint === undefined
      ? undefined
      : string("bundle", "malformed_bundle", pk.hint, `${field}.publicKey.hint`);
    const rawBytes = pk.rawBytes === undefined
      ? undefined
      : base64Field("bundle", "malformed_bundle", pk.rawBytes, `${field}.publicKey.rawBytes`);
    const keyDetails = typeof pk.keyDetails === "string" ? pk.keyDetails : undefined;
    return { method: "key", hint, rawBytes, keyDetails };
  }

  if (present[0] === "x509CertificateChain") {
    const chainField = `${field}.x509CertificateChain`;
    const chain = object("bundle", "malformed_bundle", vm.x509CertificateChain, chainField);
    const certs = chain.certificates;
    if (!Array.isArray(certs) || certs.length === 0) {
      fail("bundle", "malformed_bundle", `${chainField}.certificates`, "must be a non-empty array");
    }
    const certificates = certs.map((c, i) => {
      const f = `${chainField}.certificates[${i}]`;
      return base64Field(
        "bundle",
        "malformed_bundle",
        object("bundle", "malformed_bundle", c, f).rawBytes,
        `${f}.rawBytes`,
      );
    });
    return { method: "certificate", certificates };
  }

  const cert = object("bundle", "malformed_bundle", vm.certificate, `${field}.certificate`);
  const certificate = base64Field("bundle", "malformed_bundle", cert.rawBytes, `${field}.certificate.rawBytes`);
  if (tlogEntries.length === 0) {
    fail(
      "bundle",
      "malformed_bundle",
      `${field}.tlogEntries`,
      "a sigstore bundle (verificationMaterial.certificate) must hold at least one transparency log entry",
    );
  }
  const tvd = vm.timestampVerificationData as Json | undefined;
  const stamps = Array.isArray(tvd?.rfc3161Timestamps) ? tvd.rfc3161Timestamps.length : 0;
  return { method: "sigstore", certificate, tlogEntries: tlogEntries.length, rfc3161Timestamps: stamps };
}

/** Parses and validates the decoded DSSE payload as an OMS in-toto Statement (spec 8.3). */
export function parseStatement(payload: Uint8Array): OmsStatement {
  let text: string;
  try {
    text = utf8Strict.decode(payload);
  } catch {
    throw new OmsError("statement", "malformed_statement", "DSSE payload is not valid UTF-8");
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new OmsError(
      "statement",
      "malformed_statement",
      `DSSE payload is not valid JSON: ${(error as Error).message}`,
    );
  }
  const stmt = object("statement", "malformed_statement", json, "statement");
  onlyKeys("statement", "malformed_statement", stmt, "statement", ["_type", "subject", "predicateType", "predicate"]);
  const type = string("statement", "malformed_statement", stmt._type, "statement._type");
  if (type !== STATEMENT_TYPE) {
    fail("statement", "malformed_statement", "statement._type", `"${type}" is not ${STATEMENT_TYPE}`);
  }
  const predicateType = string("statement", "malformed_statement", stmt.predicateType, "statement.predicateType");
  if (predicateType === LEGACY_PREDICATE_TYPE) {
    fail(
      "statement",
      "unsupported_predicate_type",
      "statement.predicateType",
      `"${predicateType}" is the deprecated v0.2.0 format (no serialization metadata); re-sign the model ` +
        `with a current signer (${PREDICATE_TYPE})`,
    );
  }
  if (predicateType !== PREDICATE_TYPE) {
    fail(
      "statement",
      "unsupported_predicate_type",
      "statement.predicateType",
      `"${predicateType}" is not the OMS predicate type ${PREDICATE_TYPE}`,
    );
  }

  const subject = stmt.subject;
  if (!Array.isArray(subject) || subject.length !== 1) {
    fail("statement", "malformed_statement", "statement.subject", "must be an array of exactly one entry (spec 6.5)");
  }
  const s0 = object("statement", "malformed_statement", subject[0], "statement.subject[0]");
  string("statement", "malformed_statement", s0.name, "statement.subject[0].name");
  const digest = object("statement", "malformed_statement", s0.digest, "statement.subject[0].digest");
  for (const [alg, value] of Object.entries(digest)) {
    if (typeof value !== "string" || !/^[0-9a-f]+$/.test(value)) {
      fail("statement", "malformed_statement", `statement.subject[0].digest.${alg}`, "must be a lowercase hex string");
    }
  }
  if (typeof digest.sha256 !== "string" || digest.sha256.length !== 64) {
    fail(
      "statement",
      "malformed_statement",
      "statement.subject[0].digest.sha256",
      "must hold the 64-hex-digit SHA-256 root digest (spec 6.5)",
    );
  }

  parsePredicate(stmt.predicate);
  return stmt as unknown as OmsStatement;
}

const HASH_TYPES: HashType[] = ["sha256", "blake2b", "blake3"];

/** Validates the OMS predicate body (spec 5.2, predicate.schema.json) and canonicalizes its ignore paths. */
export function parsePredicate(value: unknown): OmsPredicate {
  const p = object("predicate", "malformed_predicate", value, "predicate");
  onlyKeys("predicate", "malformed_predicate", p, "predicate", ["resources", "serialization"]);

  const sf = "predicate.serialization";
  const ser = object("predicate", "malformed_predicate", p.serialization, sf);
  onlyKeys("predicate", "malformed_predicate", ser, sf, [
    "method",
    "hash_type",
    "shard_size",
    "allow_symlinks",
    "ignore_paths",
  ]);
  const method = string("predicate", "malformed_predicate", ser.method, `${sf}.method`);
  if (method !== "files" && method !== "shards") {
    fail("predicate", "malformed_predicate", `${sf}.method`, `"${method}" is neither "files" nor "shards"`);
  }
  const hashType = string("predicate", "malformed_predicate", ser.hash_type, `${sf}.hash_type`);
  if (!HASH_TYPES.includes(hashType as HashType)) {
    fail(
      "predicate",
      "unsupported_hash",
      `${sf}.hash_type`,
      `"${hashType}" is not a registry hash algorithm (${HASH_TYPES.join(", ")})`,
    );
  }
  if (typeof ser.allow_symlinks !== "boolean") {
    fail(
      "predicate",
      "malformed_predicate",
      `${sf}.allow_symlinks`,
      ser.allow_symlinks === undefined ? "is missing" : "must be a boolean",
    );
  }
  if (method === "shards") {
    if (!Number.isSafeInteger(ser.shard_size) || (ser.shard_size as number) <= 0) {
      fail(
        "predicate",
        "malformed_predicate",
        `${sf}.shard_size`,
        ser.shard_size === undefined ? "is required for method shards" : "must be a positive integer",
      );
    }
  } else if (ser.shard_size !== undefined) {
    fail("predicate", "malformed_predicate", `${sf}.shard_size`, 'must be absent for method "files"');
  }
  if (ser.ignore_paths !== undefined) {
    if (!Array.isArray(ser.ignore_paths)) {
      fail("predicate", "malformed_predicate", `${sf}.ignore_paths`, "must be an array of strings");
    }
    ser.ignore_paths = ser.ignore_paths.map((entry, i) => {
      const text = string("predicate", "malformed_predicate", entry, `${sf}.ignore_paths[${i}]`);
      const canonical = canonicalIgnorePath(text);
      if (canonical instanceof Error) {
        fail("predicate", "malformed_predicate", `${sf}.ignore_paths[${i}]`, `"${text}": ${canonical.message}`);
      }
      return canonical;
    });
  }

  const rf = "predicate.resources";
  if (!Array.isArray(p.resources)) {
    fail("predicate", "malformed_predicate", rf, p.resources === undefined ? "is missing" : "must be an array");
  }
  if (p.resources.length === 0) fail("predicate", "malformed_predicate", rf, "must list at least one resource");
  const seen = new Set<string>();
  for (const [i, entry] of p.resources.entries()) {
    const f = `${rf}[${i}]`;
    const r = object("predicate", "malformed_predicate", entry, f);
    const name = string("predicate", "malformed_predicate", r.name, `${f}.name`);
    const algorithm = string("predicate", "malformed_predicate", r.algorithm, `${f}.algorithm`);
    const digest = string("predicate", "malformed_predicate", r.digest, `${f}.digest`);
    if (algorithm !== hashType) {
      fail(
        "predicate",
        "malformed_predicate",
        `${f}.algorithm`,
        `"${algorithm}" differs from serialization.hash_type "${hashType}"`,
      );
    }
    const hexLength = HASH_HEX_LENGTH[hashType as HashType];
    if (!/^[0-9a-f]+$/.test(digest) || digest.length !== hexLength) {
      fail(
        "predicate",
        "malformed_predicate",
        `${f}.digest`,
        `must be ${hexLength} lowercase hex digits for ${hashType} (resource "${name}")`,
      );
    }
    let path = name;
    if (method === "shards") {
      const shard = parseShardName(name);
      if (shard instanceof Error) fail("predicate", "malformed_predicate", `${f}.name`, `"${name}": ${shard.message}`);
      const size = ser.shard_size as number;
      if (shard.start % size !== 0 || shard.end - shard.start > size) {
        fail(
          "predicate",
          "malformed_predicate",
          `${f}.name`,
          `"${name}" is not a range of the ${size}-byte shard grid`,
        );
      }
      path = shard.path;
    }
    const problem = canonicalPathProblem(path);
    if (problem !== null) fail("predicate", "malformed_predicate", `${f}.name`, `"${name}": ${problem}`);
    if (seen.has(name)) fail("predicate", "malformed_predicate", `${f}.name`, `"${name}" is listed twice`);
    seen.add(name);
  }
  return p as unknown as OmsPredicate;
}

/** DSSE pre-authentication encoding: "DSSEv1 <len(type)> <type> <len(body)> <body>" with byte lengths. */
export function preAuthEncoding(payloadType: string, payload: Uint8Array): Uint8Array {
  const type = utf8.encode(payloadType);
  const header = utf8.encode(`DSSEv1 ${type.length} ${payloadType} ${payload.length} `);
  return concatBytes([header, payload]);
}
