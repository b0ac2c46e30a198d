// One error type for everything the OMS library refuses, so a caller (LoadModel, a CLI) can branch on `code`
// and show `message` as is: the message always names the part of the bundle, the file or the certificate.

/** Which stage of signing or verification refused. */
export type OmsStage =
  | "bundle" // Sigstore bundle JSON, mediaType, verificationMaterial (spec 4, 8.1)
  | "envelope" // DSSE envelope (payloadType, payload, signatures)
  | "statement" // in-toto Statement (spec 6.6, 8.3)
  | "predicate" // OMS predicate: resources and serialization (spec 5)
  | "trust" // trust configuration given by the caller (roots, keys)
  | "signature" // DSSE signature over the PAE (spec 8.2)
  | "chain" // X.509 chain of the certificate method (spec 8.2)
  | "manifest" // model files against the signed resources (spec 6, 8.4)
  | "signing"; // producing a bundle

export type OmsErrorCode =
  // bundle / envelope / statement / predicate structure
  | "bundle_unreadable"
  | "malformed_json"
  | "malformed_bundle"
  | "unsupported_media_type"
  | "malformed_envelope"
  | "unsupported_payload_type"
  | "malformed_statement"
  | "unsupported_predicate_type"
  | "malformed_predicate"
  | "unsupported_hash"
  // signing methods
  | "unsupported_method" // sigstore keyless: needs online transparency-log verification
  | "no_trust_material"
  | "invalid_trust_material"
  | "unsupported_key"
  | "signature_invalid"
  // certificate chain
  | "malformed_certificate"
  | "chain_incomplete" // an issuer is neither in the bundle nor among the trusted roots
  | "chain_untrusted" // the chain ends at a certificate that is not a trusted root
  | "certificate_signature_invalid"
  | "certificate_expired"
  | "certificate_not_yet_valid"
  | "certificate_key_usage"
  | "certificate_extended_key_usage"
  | "certificate_not_ca"
  | "certificate_path_length"
  | "certificate_unsupported_critical_extension"
  // statement against manifest
  | "subject_digest_mismatch"
  // model files
  | "model_unreadable"
  | "model_empty"
  | "invalid_path"
  | "symlink_refused"
  | "unsupported_file_type"
  | "file_missing"
  | "file_unsigned"
  | "digest_mismatch"
  // producing a bundle
  | "signature_write_failed";

/** The certificate a chain error is about: its place in the bundle's chain (0 = leaf) or among the roots. */
export interface CertificateRef {
  role: "leaf" | "intermediate" | "root";
  /** Index in verificationMaterial.x509CertificateChain.certificates, or in the trusted roots for role "root". */
  index: number;
  subject: string;
}

/** One model-file problem; verification collects all of them before failing so a CLI can list them. */
export interface ManifestProblem {
  code: "file_missing" | "file_unsigned" | "digest_mismatch";
  /** Path relative to the model root, `/`-separated (for shards: the file, not the `:start:end` name). */
  file: string;
  message: string;
}

export interface OmsErrorDetails {
  /** Model-relative path of the file concerned. */
  file?: string;
  /** JSON location in the bundle, e.g. `dsseEnvelope.signatures[0].sig`. */
  field?: string;
  certificate?: CertificateRef;
  /** All model-file problems when code is file_missing, file_unsigned or digest_mismatch. */
  problems?: ManifestProblem[];
  cause?: unknown;
}

export class OmsError extends Error {
  readonly code: OmsErrorCode;
  readonly stage: OmsStage;
  readonly file?: string;
  readonly field?: string;
  readonly certificate?: CertificateRef;
  readonly problems?: ManifestProblem[];

  constructor(stage: OmsStage, code: OmsErrorCode, message: string, details: OmsErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "OmsError";
    this.stage = stage;
    this.code = code;
    this.file = details.file;
    this.field = details.field;
    this.certificate = details.certificate;
    this.problems = details.problems;
  }
}

/** Message of an unknown thrown value, for wrapping library errors into OmsError. */
export function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
