// Signing procedure of spec 6: enumerate, hash, build the statement, sign its PAE, wrap it in a bundle and write
// the detached signature. The bundle is re-parsed with this library's own verifier rules before it is written.

import { basename, resolve } from "node:path";
import { OmsError } from "./errors.ts";
import {
  BUNDLE_MEDIA_TYPE,
  DSSE_PAYLOAD_TYPE,
  type HashType,
  type OmsBundleJson,
  type OmsStatement,
  parseBundle,
  preAuthEncoding,
  PREDICATE_TYPE,
  type ResourceDescriptor,
  type Serialization,
  type SerializationMethod,
  STATEMENT_TYPE,
} from "./bundle.ts";
import { type CertificateInfo, certificateInfo, pemCertificates } from "./chain.ts";
import { base64Encode, bytesEqual, utf8 } from "./encoding.ts";
import { createHasher } from "./hashing.ts";
import { importSigningKey, keyHint, signEcdsa } from "./keys.ts";
import { DEFAULT_SHARD_SIZE, defaultSignaturePath, enumerateModel, rootDigest, serializeFiles } from "./manifest.ts";
import { canonicalIgnorePath, DEFAULT_IGNORE_PATHS } from "./paths.ts";

export interface SerializationOptions {
  /** Default "files". */
  method?: SerializationMethod;
  /** Default "sha256". */
  hashType?: HashType;
  /** Shard bytes for method "shards"; default 1,000,000,000 (spec 6.3.2). */
  shardSize?: number;
  /** Follow symbolic links (deprecated in the spec). Default false: a symlink in the model is an error. */
  allowSymlinks?: boolean;
  /** Extra model-relative paths to exclude (exact paths with their subtree, spec 6.2.1). */
  ignorePaths?: string[];
}

export interface SignModelOptions {
  /** Model folder (or single model file). */
  modelPath: string;
  /** Where to write the bundle; default `<modelPath>/model.sig` (folder) or `<modelPath>.sig` (file). */
  signaturePath?: string;
  /** EC P-256/P-384/P-521 private key, PKCS#8 PEM. */
  privateKeyPem: string;
  /**
   * Certificate method: the signing certificate first, then its CA chain (the root may be left out), as PEM
   * text(s). Absent: key method.
   */
  certificateChainPem?: string | string[];
  serialization?: SerializationOptions;
  /** subject[0].name; default the basename of modelPath (spec 6.5). */
  modelName?: string;
  /** Time the signing certificate must be valid at; default now. */
  now?: Date;
  /** Write the bundle to signaturePath. Default true. */
  write?: boolean;
}

export interface SignModelResult {
  method: "key" | "certificate";
  signaturePath: string;
  bundle: OmsBundleJson;
  /** The bundle as written (JSON text). */
  json: string;
  statement: OmsStatement;
  resources: ResourceDescriptor[];
  /** Key method: the publicKey.hint written. */
  keyHint?: string;
  /** Certificate method: the certificates written, leaf first. */
  certificates?: CertificateInfo[];
  warnings: string[];
}

function refuse(message: string, code: "invalid_path" | "model_empty" | "invalid_trust_material" = "invalid_path") {
  return new OmsError("signing", code, message);
}

/** Signs a model folder or file and (by default) writes its OMS bundle. */
export async function signModel(options: SignModelOptions): Promise<SignModelResult> {
  const opts = options.serialization ?? {};
  const method = opts.method ?? "files";
  const hashType = opts.hashType ?? "sha256";
  const allowSymlinks = opts.allowSymlinks ?? false;
  const shardSize = method === "shards" ? opts.shardSize ?? DEFAULT_SHARD_SIZE : undefined;
  if (method !== "files" && method !== "shards") {
    throw refuse(`serialization method "${method}" is not files or shards`);
  }
  if (shardSize !== undefined && (!Number.isSafeInteger(shardSize) || shardSize <= 0)) {
    throw refuse(`shard size ${shardSize} is not a positive integer`);
  }
  if (method === "files" && opts.shardSize !== undefined) throw refuse('shardSize only applies to method "shards"');
  createHasher(hashType); // refuses an unsupported hash before any file is read

  const userIgnores = (opts.ignorePaths ?? []).map((entry) => {
    const canonical = canonicalIgnorePath(entry);
    if (canonical instanceof Error) throw refuse(`ignore path "${entry}": ${canonical.message}`);
    return canonical;
  });

  const key = await importSigningKey(options.privateKeyPem);
  const chainPems = options.certificateChainPem === undefined
    ? undefined
    : Array.isArray(options.certificateChainPem)
    ? options.certificateChainPem
    : [options.certificateChainPem];
  let certificates: CertificateInfo[] | undefined;
  let chainDers: Uint8Array[] | undefined;
  if (chainPems) {
    const chain = chainPems.flatMap((pem, i) => pemCertificates(pem, `certificate chain PEM #${i}`));
    const leaf = chain[0].certificate;
    if (!bytesEqual(new Uint8Array(leaf.publicKey.rawData), key.spki)) {
      throw refuse(
        `signing certificate "${leaf.subject}" does not hold the public key of the given private key`,
        "invalid_trust_material",
      );
    }
    const now = options.now ?? new Date();
    if (now < leaf.notBefore || now > leaf.notAfter) {
      throw new OmsError(
        "signing",
        now > leaf.notAfter ? "certificate_expired" : "certificate_not_yet_valid",
        `signing certificate "${leaf.subject}" is valid ${leaf.notBefore.toISOString()} - ` +
          `${leaf.notAfter.toISOString()}, not at ${now.toISOString()}`,
      );
    }
    chainDers = chain.map((c) => c.der);
    certificates = await Promise.all(
      chain.map((c, i) => certificateInfo(c.certificate, i === 0 ? "leaf" : "intermediate")),
    );
  }

  const signaturePath = options.signaturePath ?? await defaultSignaturePath(options.modelPath);
  const enumeration = await enumerateModel(options.modelPath, {
    allowSymlinks,
    ignorePaths: userIgnores,
    signaturePath,
  });
  if (enumeration.files.length === 0) {
    throw refuse(`model ${options.modelPath} has no files to sign after exclusions (spec 6.1)`, "model_empty");
  }
  const resources = await serializeFiles(enumeration.files, { method, hashType, shardSize });
  if (resources.length === 0) {
    // Shard serialization omits empty files; a model of only empty files has nothing to list.
    throw refuse(`model ${options.modelPath} has only empty files, which shard serialization omits`, "model_empty");
  }

  // Excluded paths are recorded (spec 6.2) so the verifier applies the same scope.
  const ignorePaths = [
    ...new Set([
      ...DEFAULT_IGNORE_PATHS,
      ...userIgnores,
      ...(enumeration.signatureName ? [enumeration.signatureName] : []),
    ]),
  ];
  const serialization: Serialization = {
    method,
    hash_type: hashType,
    ...(shardSize !== undefined ? { shard_size: shardSize } : {}),
    allow_symlinks: allowSymlinks,
    ignore_paths: ignorePaths,
  };
  const statement: OmsStatement = {
    _type: STATEMENT_TYPE,
    subject: [{
      name: options.modelName ?? basename(resolve(options.modelPath)),
      digest: { sha256: rootDigest(resources) },
    }],
    predicateType: PREDICATE_TYPE,
    predicate: { resources, serialization },
  };

  const payload = utf8.encode(JSON.stringify(statement));
  const signature = await signEcdsa(key, preAuthEncoding(DSSE_PAYLOAD_TYPE, payload));
  let hint: string | undefined;
  const verificationMaterial: OmsBundleJson["verificationMaterial"] = {};
  if (chainDers) {
    verificationMaterial.x509CertificateChain = {
      certificates: chainDers.map((der) => ({ rawBytes: base64Encode(der) })),
    };
  } else {
    hint = await keyHint(key.spki);
    verificationMaterial.publicKey = { hint };
  }
  // An empty tlogEntries list, as the reference tools write for the key and certificate methods (spec 11.1).
  verificationMaterial.tlogEntries = [];
  const bundle: OmsBundleJson = {
    mediaType: BUNDLE_MEDIA_TYPE,
    verificationMaterial,
    dsseEnvelope: {
      payload: base64Encode(payload),
      payloadType: DSSE_PAYLOAD_TYPE,
      signatures: [{ sig: base64Encode(signature) }],
    },
  };
  const json = JSON.stringify(bundle, null, 2) + "\n";
  parseBundle(json); // our own output must pass our own parser

  if (options.write ?? true) {
    // Written beside the target and renamed, so a reader never sees a half-written signature.
    const tmp = `${signaturePath}.tmp-${crypto.randomUUID()}`;
    try {
      await Deno.writeTextFile(tmp, json);
      await Deno.rename(tmp, signaturePath);
    } catch (error) {
      await Deno.remove(tmp).catch(() => {});
      throw new OmsError(
        "signing",
        "signature_write_failed",
        `cannot write ${signaturePath}: ${(error as Error).message}`,
        {
          cause: error,
        },
      );
    }
  }

  return {
    method: chainDers ? "certificate" : "key",
    signaturePath,
    bundle,
    json,
    statement,
    resources,
    keyHint: hint,
    certificates,
    warnings: enumeration.warnings,
  };
}
