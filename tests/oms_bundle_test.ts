// Bundle parsing: the spec's test vectors, and one clear refusal per malformed part of each layer.

import assert from "node:assert/strict";
import {
  generateDevelopmentKeyPair,
  inspectBundle,
  type OmsBundleJson,
  OmsError,
  type OmsErrorCode,
  parseBundle,
  preAuthEncoding,
  signModel,
} from "../src/packages/oms/mod.ts";

// The OMS spec's test vectors and schemas, kept in the repository (see testdata/oms/PROVENANCE.md).
const OMS_DIR = new URL("./testdata/oms", import.meta.url).pathname;

const VECTORS = `${OMS_DIR}/test-vectors/v1.0`;

function vector(name: string): Promise<Uint8Array> {
  return Deno.readFile(`${VECTORS}/${name}.bundle.json`);
}

function refusal(call: () => unknown, code: OmsErrorCode, message?: RegExp): OmsError {
  try {
    call();
  } catch (error) {
    assert.ok(error instanceof OmsError, `expected OmsError, got ${error}`);
    assert.equal(error.code, code, `expected ${code}, got ${error.code}: ${error.message}`);
    if (message) assert.match(error.message, message);
    return error;
  }
  assert.fail(`expected ${code}, but parsing succeeded`);
}

let cached: OmsBundleJson | undefined;
/** A valid key-method bundle signed over a small real folder. */
async function validBundle(): Promise<OmsBundleJson> {
  if (!cached) {
    const dir = await Deno.makeTempDir({ prefix: "oms_bundle_" });
    await Deno.writeTextFile(`${dir}/weights.bin`, "weights");
    await Deno.writeTextFile(`${dir}/config.json`, "{}");
    const { privateKeyPem } = await generateDevelopmentKeyPair();
    cached = (await signModel({ modelPath: dir, privateKeyPem, write: false })).bundle;
    await Deno.remove(dir, { recursive: true });
  }
  return structuredClone(cached);
}

// deno-lint-ignore no-explicit-any
type AnyJson = any;

async function withBundle(edit: (b: AnyJson) => void): Promise<AnyJson> {
  const b = await validBundle();
  edit(b);
  return b;
}

async function withStatement(edit: (s: AnyJson) => void): Promise<AnyJson> {
  const b = await validBundle();
  const statement = JSON.parse(atob(b.dsseEnvelope.payload));
  edit(statement);
  b.dsseEnvelope.payload = btoa(JSON.stringify(statement));
  return b;
}

Deno.test("oms bundle: valid spec test vectors parse and report their method", async () => {
  const key = parseBundle(await vector("valid/key"));
  assert.equal(key.material.method, "key");
  assert.equal(
    key.material.method === "key" && key.material.hint,
    "e8450dec4eb99dae995da9af1bc2cc9f76ed669ee2e744f57abba763df3e3f8e",
  );
  assert.equal(key.statement.predicate.resources.length, 2);
  assert.deepEqual(key.signatures.map((s) => s.keyid), [""]);

  const cert = parseBundle(await vector("valid/certificate"));
  assert.equal(cert.material.method, "certificate");
  assert.equal(cert.material.method === "certificate" && cert.material.certificates.length, 2);

  const sigstore = parseBundle(await vector("valid/sigstore"));
  assert.equal(sigstore.material.method, "sigstore");
  assert.equal(sigstore.material.method === "sigstore" && sigstore.material.tlogEntries, 1);
  assert.equal(sigstore.signatures[0].keyid, undefined);
  assert.deepEqual(sigstore.statement.predicate.serialization.ignore_paths?.includes("model.sig"), true);
});

Deno.test("oms bundle: test vectors verify what needs no trust anchors", async () => {
  // Certificate vector: the DSSE signature (P-384, SHA-384) verifies with the bundle's own leaf, the leaf is
  // signed by the RSA intermediate in the bundle, and the root digest matches; only the root is unknown.
  const cert = await inspectBundle(await vector("valid/certificate"));
  assert.equal(cert.method, "certificate");
  assert.equal(cert.signatureMatchesEmbeddedKey, true);
  assert.equal(cert.rootDigestConsistent, true);
  assert.deepEqual(cert.chainLinks.map((l) => l.signedByNext), [true]);
  assert.equal(cert.certificates[0].keyAlgorithm, "ECDSA P-384");
  assert.equal(cert.certificates[1].keyAlgorithm, "RSA 3072");
  assert.match(cert.notVerified.join("\n"), /trusted roots/);

  // Sigstore vector: its DSSE signature matches the Fulcio certificate, but trust needs the transparency log.
  const sigstore = await inspectBundle(await vector("valid/sigstore"));
  assert.equal(sigstore.method, "sigstore");
  assert.equal(sigstore.signatureMatchesEmbeddedKey, true);
  assert.equal(sigstore.rootDigestConsistent, true);
  assert.equal(sigstore.tlogEntries, 1);
  assert.match(sigstore.notVerified.join("\n"), /transparency-log/);

  // Key vector: named by hint only, so the signature cannot be checked without the key.
  const key = await inspectBundle(await vector("valid/key"));
  assert.equal(key.method, "key");
  assert.equal(key.signatureMatchesEmbeddedKey, null);
  assert.equal(key.rootDigestConsistent, true);
  assert.equal(key.publicKey?.hint, "e8450dec4eb99dae995da9af1bc2cc9f76ed669ee2e744f57abba763df3e3f8e");
});

Deno.test("oms bundle: each invalid spec test vector is refused with its own reason", async () => {
  const cases: [string, OmsErrorCode, RegExp][] = [
    ["invalid/empty", "malformed_json", /empty/],
    ["invalid/missing-envelope", "malformed_envelope", /dsseEnvelope: is missing/],
    ["invalid/missing-tlog-entries", "malformed_bundle", /tlogEntries.*at least one transparency log entry/],
    ["invalid/missing-verification-material", "malformed_bundle", /verificationMaterial: is missing/],
    ["invalid-payload/wrong-predicate", "unsupported_predicate_type", /example\.com\/wrong-predicate/],
  ];
  for (const [name, code, message] of cases) {
    const bytes = await vector(name);
    refusal(() => parseBundle(bytes), code, message);
  }
});

Deno.test("oms bundle: PAE is DSSEv1 with byte lengths", () => {
  const pae = preAuthEncoding("application/vnd.in-toto+json", new TextEncoder().encode("héllo"));
  assert.equal(new TextDecoder().decode(pae), "DSSEv1 28 application/vnd.in-toto+json 6 héllo");
});

Deno.test("oms bundle: older media types and keyid forms are accepted", async () => {
  for (
    const mediaType of [
      "application/vnd.dev.sigstore.bundle+json;version=0.3",
      "application/vnd.dev.sigstore.bundle+json;version=0.2",
      "application/vnd.dev.sigstore.bundle+json;version=0.1",
    ]
  ) {
    assert.equal(parseBundle(await withBundle((b) => b.mediaType = mediaType)).mediaType, mediaType);
  }
  for (const keyid of [null, "", "some-key", undefined]) {
    const parsed = parseBundle(await withBundle((b) => b.dsseEnvelope.signatures[0].keyid = keyid));
    assert.equal(parsed.signatures[0].keyid, keyid);
  }
  // Pre-v1.1.0: publicKey.rawBytes (+ keyDetails) instead of hint; tlogEntries absent; no ignore_paths.
  const old = await withBundle((b) => {
    b.verificationMaterial.publicKey = {
      rawBytes: btoa("-----BEGIN PUBLIC KEY-----\n"),
      keyDetails: "PKIX_ECDSA_P256_SHA_256",
    };
    delete b.verificationMaterial.tlogEntries;
  });
  assert.equal(parseBundle(old).material.method, "key");
  const noIgnores = parseBundle(await withStatement((s) => delete s.predicate.serialization.ignore_paths));
  assert.equal(noIgnores.statement.predicate.serialization.ignore_paths, undefined);
});

Deno.test("oms bundle: malformed bundle and envelope parts each get their own reason", async () => {
  const cases: [string, (b: AnyJson) => void, OmsErrorCode, RegExp][] = [
    ["not JSON", () => {}, "malformed_json", /not valid JSON/],
    ["array", () => {}, "malformed_bundle", /bundle: must be an object/],
    ["mediaType", (b) => b.mediaType = "application/json", "unsupported_media_type", /mediaType: "application\/json"/],
    ["mediaType missing", (b) => delete b.mediaType, "malformed_bundle", /mediaType: is missing/],
    ["extra field", (b) => b.messageSignature = {}, "malformed_bundle", /unexpected field "messageSignature"/],
    ["two methods", (b) => b.verificationMaterial.certificate = { rawBytes: "AA==" }, "malformed_bundle", /both/],
    ["no signer", (b) => delete b.verificationMaterial.publicKey, "malformed_bundle", /names no signer/],
    ["no hint", (b) => b.verificationMaterial.publicKey = {}, "malformed_bundle", /neither hint nor rawBytes/],
    [
      "bad rawBytes",
      (b) => b.verificationMaterial.publicKey = { rawBytes: "not base64!" },
      "malformed_bundle",
      /publicKey\.rawBytes: is not valid base64/,
    ],
    [
      "empty chain",
      (b) => {
        delete b.verificationMaterial.publicKey;
        b.verificationMaterial.x509CertificateChain = { certificates: [] };
      },
      "malformed_bundle",
      /certificates: must be a non-empty array/,
    ],
    [
      "tlogEntries",
      (b) => b.verificationMaterial.tlogEntries = {},
      "malformed_bundle",
      /tlogEntries: must be an array/,
    ],
    ["payloadType", (b) => b.dsseEnvelope.payloadType = "text/plain", "unsupported_payload_type", /payloadType/],
    ["payload base64", (b) => b.dsseEnvelope.payload = "%%%", "malformed_envelope", /payload: is not valid base64/],
    ["no signatures", (b) => b.dsseEnvelope.signatures = [], "malformed_envelope", /non-empty array/],
    [
      "sig missing",
      (b) => delete b.dsseEnvelope.signatures[0].sig,
      "malformed_envelope",
      /signatures\[0\]\.sig: is missing/,
    ],
    [
      "keyid type",
      (b) => b.dsseEnvelope.signatures[0].keyid = 7,
      "malformed_envelope",
      /keyid: must be a string or null/,
    ],
    ["envelope field", (b) => b.dsseEnvelope.extra = 1, "malformed_envelope", /unexpected field "extra"/],
  ];
  for (const [label, edit, code, message] of cases) {
    let input: unknown = await withBundle(edit);
    if (label === "not JSON") input = "{ nope";
    if (label === "array") input = [];
    const error = refusal(() => parseBundle(input), code, message);
    assert.ok(error.stage === "bundle" || error.stage === "envelope", `${label}: stage ${error.stage}`);
  }
});

Deno.test("oms bundle: malformed statement and predicate parts each get their own reason", async () => {
  const cases: [(s: AnyJson) => void, OmsErrorCode, RegExp][] = [
    [(s) => s._type = "https://in-toto.io/Statement/v0.1", "malformed_statement", /statement\._type/],
    [
      (s) => s.predicateType = "https://model_signing/Digests/v0.1",
      "unsupported_predicate_type",
      /deprecated v0\.2\.0/,
    ],
    [(s) => s.subject.push(s.subject[0]), "malformed_statement", /exactly one entry/],
    [(s) => s.subject[0].name = "", "malformed_statement", /subject\[0\]\.name: must not be empty/],
    [(s) => s.subject[0].digest = { sha512: "ab" }, "malformed_statement", /SHA-256 root digest/],
    [(s) => s.subject[0].digest.sha256 = "ABC", "malformed_statement", /lowercase hex/],
    [(s) => s.extra = true, "malformed_statement", /unexpected field "extra"/],
    [(s) => delete s.predicate, "malformed_predicate", /predicate: is missing/],
    [(s) => s.predicate.annotations = {}, "malformed_predicate", /unexpected field "annotations"/],
    [(s) => s.predicate.serialization.method = "model", "malformed_predicate", /method: "model" is neither/],
    [(s) => s.predicate.serialization.hash_type = "md5", "unsupported_hash", /"md5" is not a registry hash/],
    [(s) => s.predicate.serialization.method = "shards", "malformed_predicate", /shard_size: is required/],
    [(s) => s.predicate.serialization.shard_size = 10, "malformed_predicate", /must be absent for method "files"/],
    [(s) => delete s.predicate.serialization.allow_symlinks, "malformed_predicate", /allow_symlinks: is missing/],
    [(s) => s.predicate.serialization.ignore_paths = ["*.tmp"], "malformed_predicate", /glob character/],
    [(s) => s.predicate.serialization.ignore_paths = ["../up"], "malformed_predicate", /`\.\.` component/],
    [(s) => s.predicate.resources = [], "malformed_predicate", /at least one resource/],
    [
      (s) => s.predicate.resources[0].algorithm = "blake3",
      "malformed_predicate",
      /differs from serialization\.hash_type/,
    ],
    [(s) => s.predicate.resources[0].digest = "abcd", "malformed_predicate", /64 lowercase hex digits/],
    [(s) => s.predicate.resources[0].name = "../etc/passwd", "malformed_predicate", /`\.\.` component/],
    [(s) => s.predicate.resources[0].name = "/abs", "malformed_predicate", /absolute/],
    [(s) => s.predicate.resources[0].name = "./config.json", "malformed_predicate", /not canonical/],
    [(s) => s.predicate.resources[1].name = s.predicate.resources[0].name, "malformed_predicate", /listed twice/],
    [
      (s) => {
        s.predicate.serialization.method = "shards";
        s.predicate.serialization.shard_size = 4;
      },
      "malformed_predicate",
      /not <path>:<start>:<end>/,
    ],
    [
      (s) => {
        s.predicate.serialization.method = "shards";
        s.predicate.serialization.shard_size = 4;
        s.predicate.resources[0].name = "config.json:1:3";
      },
      "malformed_predicate",
      /shard grid/,
    ],
  ];
  for (const [edit, code, message] of cases) {
    const bundle = await withStatement(edit);
    const error = refusal(() => parseBundle(bundle), code, message);
    assert.ok(["statement", "predicate"].includes(error.stage), `${error.message}: stage ${error.stage}`);
    assert.ok(error.field, `${error.message}: names its field`);
  }
  const notJson = await withBundle((b) => b.dsseEnvelope.payload = btoa("not json"));
  refusal(() => parseBundle(notJson), "malformed_statement", /DSSE payload is not valid JSON/);
});

Deno.test("oms bundle: shard names split on their last two colons", async () => {
  const bundle = await withStatement((s) => {
    s.predicate.serialization.method = "shards";
    s.predicate.serialization.shard_size = 4;
    s.predicate.resources = [
      { name: "a:b.bin:0:4", algorithm: "sha256", digest: "0".repeat(64) },
      { name: "a:b.bin:4:6", algorithm: "sha256", digest: "1".repeat(64) },
    ];
  });
  const parsed = parseBundle(bundle);
  assert.deepEqual(parsed.statement.predicate.resources.map((r) => r.name), ["a:b.bin:0:4", "a:b.bin:4:6"]);
});
