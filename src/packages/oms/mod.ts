// OpenSSF Model Signing (OMS) v1.0: sign model folders and verify them offline before they are loaded.
//
//   const trust = await loadTrust({ trustedRootsPem: [rootPem] });          // once, at start-up
//   const result = await verifyModel({ modelPath, trust });                  // throws OmsError on refusal
//   await signModel({ modelPath, privateKeyPem, certificateChainPem });      // writes <modelPath>/model.sig
//
// Methods: "certificate" (leaf + CA chain to a trusted root) and "key" (trusted public keys). "sigstore"
// keyless bundles are parsed but refused: they need online transparency-log verification.

export { type CertificateRef, type ManifestProblem, OmsError, type OmsErrorCode, type OmsStage } from "./errors.ts";
export {
  ACCEPTED_BUNDLE_MEDIA_TYPES,
  BUNDLE_MEDIA_TYPE,
  DSSE_PAYLOAD_TYPE,
  type DsseSignature,
  type HashType,
  type OmsBundleJson,
  type OmsPredicate,
  type OmsStatement,
  parseBundle,
  type ParsedBundle,
  preAuthEncoding,
  PREDICATE_TYPE,
  type ResourceDescriptor,
  type Serialization,
  type SerializationMethod,
  type SigningMethod,
  STATEMENT_TYPE,
  type VerificationMaterial,
} from "./bundle.ts";
export { type CertificateInfo } from "./chain.ts";
export { derToRaw, rawToDer } from "./ecdsa_der.ts";
export { type EcCurve, keyHint } from "./keys.ts";
export { DEFAULT_SHARD_SIZE, type VerifiedResource } from "./manifest.ts";
export { DEFAULT_IGNORE_PATHS, DEFAULT_SIGNATURE_NAME } from "./paths.ts";
export {
  type BundleInspection,
  checkLoadedBytes,
  formatVerificationResult,
  inspectBundle,
  loadTrust,
  type OmsTrust,
  type SignatureVerification,
  type SignerInfo,
  type TrustedKey,
  type TrustOptions,
  type VerificationResult,
  verifyBundleSignature,
  verifyModel,
  type VerifyModelOptions,
} from "./verify.ts";
export { type SerializationOptions, signModel, type SignModelOptions, type SignModelResult } from "./sign.ts";
export {
  type DevelopmentCredential,
  type DevelopmentTrust,
  type DevelopmentTrustOptions,
  generateDevelopmentKeyPair,
  generateDevelopmentTrust,
  type KeyUsageName,
} from "./devtrust.ts";
