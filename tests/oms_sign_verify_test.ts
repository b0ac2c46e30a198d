// Sign real model folders with real (development) certificates and keys, verify them, and check that each
// kind of tampering or trust failure is refused with its own code and a message naming what failed.

import assert from "node:assert/strict";
import {
  checkLoadedBytes,
  type DevelopmentTrust,
  generateDevelopmentKeyPair,
  generateDevelopmentTrust,
  loadTrust,
  type OmsBundleJson,
  OmsError,
  type OmsErrorCode,
  type OmsTrust,
  signModel,
  verifyModel,
  type VerifyModelOptions,
} from "../src/packages/oms/mod.ts";
import * as x509 from "../src/packages/oms/x509.ts";
import { pemEncode } from "../src/packages/oms/encoding.ts";
import { importSigningKey, signEcdsa } from "../src/packages/oms/keys.ts";
import { preAuthEncoding } from "../src/packages/oms/bundle.ts";
import { cpuMs } from "./helpers/assertions.ts";

// The OMS spec's test vectors and schemas, kept in the repository (see testdata/oms/PROVENANCE.md).
const OMS_DIR = new URL("./testdata/oms", import.meta.url).pathname;

const DAY = 86_400_000;

async function makeModel(files: Record<string, string | Uint8Array>): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "oms_model_" });
  for (const [name, content] of Object.entries(files)) {
    const path = `${dir}/${name}`;
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    if (typeof content === "string") await Deno.writeTextFile(path, content);
    else await Deno.writeFile(path, content);
  }
  return dir;
}

function bytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

const MODEL = { "model.onnx": bytes(5000), "config.json": '{"name":"demo"}', "tokenizer/vocab.txt": "a\nb\nc\n" };

async function rejects(call: Promise<unknown>, code: OmsErrorCode, message?: RegExp): Promise<OmsError> {
  try {
    await call;
  } catch (error) {
    assert.ok(error instanceof OmsError, `expected OmsError ${code}, got ${error}`);
    assert.equal(error.code, code, `expected ${code}, got ${error.code}: ${error.message}`);
    if (message) assert.match(error.message, message);
    return error;
  }
  assert.fail(`expected OmsError ${code}, but the call succeeded`);
}

// One development trust shared by most tests (CA key generation is the slow part).
let shared: { dev: DevelopmentTrust; trust: OmsTrust } | undefined;
async function devTrust(): Promise<{ dev: DevelopmentTrust; trust: OmsTrust }> {
  if (!shared) {
    const dev = await generateDevelopmentTrust();
    shared = { dev, trust: await loadTrust({ trustedRootsPem: dev.root.certificatePem }) };
  }
  return shared;
}

async function signedModel(
  files: Record<string, string | Uint8Array> = MODEL,
): Promise<{ dir: string; trust: OmsTrust }> {
  const { dev, trust } = await devTrust();
  const dir = await makeModel(files);
  await signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem });
  return { dir, trust };
}

async function editBundle(dir: string, edit: (b: OmsBundleJson) => void): Promise<void> {
  const path = `${dir}/model.sig`;
  const bundle = JSON.parse(await Deno.readTextFile(path));
  edit(bundle);
  await Deno.writeTextFile(path, JSON.stringify(bundle));
}

Deno.test("oms: root -> EC intermediate -> P-256 leaf, files serialization, verifies and reports what it checked", async () => {
  const { dev, trust } = await devTrust();
  const dir = await makeModel(MODEL);
  const signed = await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: dev.chainPem,
  });
  assert.equal(signed.method, "certificate");
  assert.equal(signed.signaturePath, `${dir}/model.sig`);
  assert.deepEqual(signed.resources.map((r) => r.name), ["config.json", "model.onnx", "tokenizer/vocab.txt"]);
  assert.deepEqual(signed.statement.predicate.serialization.ignore_paths, [
    ".git",
    ".gitignore",
    ".gitattributes",
    ".github",
    "model.sig",
  ]);

  const result = await verifyModel({ modelPath: dir, trust });
  assert.equal(result.method, "certificate");
  assert.match(result.signer.subject!, /OMS Development Code Signing - NOT FOR PRODUCTION/);
  assert.equal(result.signer.keyAlgorithm, "ECDSA P-256");
  assert.equal(result.signer.hashAlgorithm, "SHA-256");
  assert.deepEqual(result.chain.map((c) => c.role), ["leaf", "intermediate", "root"]);
  assert.match(result.chain[1].subject, /Intermediate CA/);
  assert.match(result.chain[2].subject, /Root CA/);
  assert.deepEqual(result.files.map((f) => [f.name, f.digest.length]), [
    ["config.json", 64],
    ["model.onnx", 64],
    ["tokenizer/vocab.txt", 64],
  ]);
  assert.equal(result.fileCount, 3);
  assert.equal(result.checks.length, 6);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: P-384 leaf under an RSA (PKCS#1 v1.5) intermediate verifies", async () => {
  const dev = await generateDevelopmentTrust({ leafCurve: "P-384", intermediateKey: "rsa", rsaModulusLength: 2048 });
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem });
  const result = await verifyModel({
    modelPath: dir,
    trust: await loadTrust({ trustedRootsPem: dev.root.certificatePem }),
  });
  assert.equal(result.signer.keyAlgorithm, "ECDSA P-384");
  assert.equal(result.signer.hashAlgorithm, "SHA-384");
  assert.equal(result.chain[1].keyAlgorithm, "RSA 2048");
  assert.equal(result.chain[0].signatureAlgorithm, "RSASSA-PKCS1-v1_5 SHA-256");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: P-521 leaf under RSA-PSS root and intermediate verifies", async () => {
  const dev = await generateDevelopmentTrust({
    leafCurve: "P-521",
    rootKey: "rsa",
    intermediateKey: "rsa",
    rsaSignatureScheme: "pss",
    rsaModulusLength: 2048,
  });
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem });
  const result = await verifyModel({
    modelPath: dir,
    trust: await loadTrust({ trustedRootsPem: dev.root.certificatePem }),
  });
  assert.equal(result.signer.keyAlgorithm, "ECDSA P-521");
  assert.equal(result.signer.hashAlgorithm, "SHA-512");
  assert.match(result.chain[0].signatureAlgorithm, /^RSA-PSS/);
  assert.match(result.chain[1].signatureAlgorithm, /^RSA-PSS/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: a pinned self-signed signing certificate, or an intermediate trusted as anchor, verifies", async () => {
  const keys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
  const selfSigned = await x509.X509CertificateGenerator.createSelfSigned({
    name: "CN=Self-signed model signer",
    keys,
    signingAlgorithm: { name: "ECDSA", hash: "SHA-256" } as Algorithm,
    extensions: [
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(["1.3.6.1.5.5.7.3.3"]),
    ],
  });
  const certPem = pemEncode("CERTIFICATE", new Uint8Array(selfSigned.rawData));
  const keyPem = pemEncode("PRIVATE KEY", new Uint8Array(await crypto.subtle.exportKey("pkcs8", keys.privateKey)));
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: keyPem, certificateChainPem: certPem });
  const pinned = await verifyModel({ modelPath: dir, trust: await loadTrust({ trustedRootsPem: certPem }) });
  assert.deepEqual(pinned.chain.map((c) => [c.role, c.subject]), [
    ["leaf", "CN=Self-signed model signer"],
    ["root", "CN=Self-signed model signer"],
  ]);

  const { dev } = await devTrust();
  await signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem });
  const anchored = await verifyModel({
    modelPath: dir,
    trust: await loadTrust({ trustedRootsPem: dev.intermediate.certificatePem }),
  });
  assert.deepEqual(anchored.chain.map((c) => c.role), ["leaf", "root"]);
  assert.match(anchored.chain[1].subject, /Intermediate CA/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: key method signs with a hint and verifies against trusted public keys", async () => {
  const signer = await generateDevelopmentKeyPair("P-256");
  const other = await generateDevelopmentKeyPair("P-384");
  const dir = await makeModel(MODEL);
  const signed = await signModel({ modelPath: dir, privateKeyPem: signer.privateKeyPem });
  assert.equal(signed.method, "key");
  assert.match(signed.keyHint!, /^[0-9a-f]{64}$/);
  assert.equal(signed.bundle.verificationMaterial.publicKey?.hint, signed.keyHint);

  const trust = await loadTrust({ trustedKeysPem: [other.publicKeyPem, signer.publicKeyPem] });
  const result = await verifyModel({ modelPath: dir, trust });
  assert.equal(result.method, "key");
  assert.equal(result.signer.keyMatchedBy, "hint");
  assert.equal(result.signer.keyAlgorithm, "ECDSA P-256");
  assert.deepEqual(result.chain, []);

  // A hint that names no trusted key only changes the search order: the signature decides.
  await editBundle(dir, (b) => b.verificationMaterial.publicKey = { hint: "00".repeat(32) });
  assert.equal((await verifyModel({ modelPath: dir, trust })).signer.keyMatchedBy, "trial");

  // Pre-v1.1.0 form: rawBytes held the PEM public key.
  await editBundle(dir, (b) => {
    b.verificationMaterial.publicKey = { rawBytes: btoa(signer.publicKeyPem), keyDetails: "PKIX_ECDSA_P256_SHA_256" };
    delete b.verificationMaterial.tlogEntries;
    b.dsseEnvelope.signatures[0].keyid = null;
  });
  assert.equal((await verifyModel({ modelPath: dir, trust })).signer.keyMatchedBy, "rawBytes");

  // Signed by a key that is not trusted.
  await rejects(
    verifyModel({ modelPath: dir, trust: await loadTrust({ trustedKeysPem: other.publicKeyPem }) }),
    "signature_invalid",
    /does not verify with any of the 1 trusted key/,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: key method with P-384 and P-521 keys", async () => {
  for (const curve of ["P-384", "P-521"] as const) {
    const keys = await generateDevelopmentKeyPair(curve);
    const dir = await makeModel(MODEL);
    await signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem });
    const result = await verifyModel({ modelPath: dir, trust: await loadTrust({ trustedKeysPem: keys.publicKeyPem }) });
    assert.equal(result.signer.keyAlgorithm, `ECDSA ${curve}`);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("oms: shards serialization lists byte ranges, omits empty files, and catches a flipped byte per shard", async () => {
  const { dev, trust } = await devTrust();
  const dir = await makeModel({ "weights.bin": bytes(2500, 7), "empty.txt": "", "a:b.txt": "colon" });
  const signed = await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: dev.chainPem,
    serialization: { method: "shards", shardSize: 1000 },
  });
  assert.deepEqual(signed.resources.map((r) => r.name), [
    "a:b.txt:0:5",
    "weights.bin:0:1000",
    "weights.bin:1000:2000",
    "weights.bin:2000:2500",
  ]);
  assert.equal(signed.statement.predicate.serialization.shard_size, 1000);
  const result = await verifyModel({ modelPath: dir, trust });
  assert.equal(result.files.length, 4);
  assert.equal(result.fileCount, 2);

  const file = await Deno.readFile(`${dir}/weights.bin`);
  file[1500] ^= 0x01;
  await Deno.writeFile(`${dir}/weights.bin`, file);
  const error = await rejects(verifyModel({ modelPath: dir, trust }), "digest_mismatch", /weights\.bin:1000:2000/);
  assert.equal(error.file, "weights.bin");

  // A file that grew no longer fits its signed shard grid.
  await Deno.writeFile(`${dir}/weights.bin`, bytes(2600, 7));
  await rejects(verifyModel({ modelPath: dir, trust }), "digest_mismatch", /2600 bytes but its signed shards/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: blake2b and blake3 hashing round-trip", async () => {
  const keys = await generateDevelopmentKeyPair();
  const trust = await loadTrust({ trustedKeysPem: keys.publicKeyPem });
  for (const hashType of ["blake2b", "blake3"] as const) {
    const dir = await makeModel(MODEL);
    const signed = await signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem, serialization: { hashType } });
    assert.equal(signed.resources[0].algorithm, hashType);
    assert.equal(signed.resources[0].digest.length, hashType === "blake2b" ? 128 : 64);
    assert.equal((await verifyModel({ modelPath: dir, trust })).serialization.hash_type, hashType);
    await Deno.writeTextFile(`${dir}/config.json`, '{"name":"demo!"}');
    await rejects(
      verifyModel({ modelPath: dir, trust }),
      "digest_mismatch",
      new RegExp(`config\\.json: ${hashType} digest`),
    );
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("oms: a single-file model is named by its basename and signed beside itself", async () => {
  const keys = await generateDevelopmentKeyPair();
  const dir = await makeModel({ "model.onnx": bytes(100) });
  const signed = await signModel({ modelPath: `${dir}/model.onnx`, privateKeyPem: keys.privateKeyPem });
  assert.equal(signed.signaturePath, `${dir}/model.onnx.sig`);
  assert.deepEqual(signed.resources.map((r) => r.name), ["model.onnx"]);
  assert.equal(signed.statement.subject[0].name, "model.onnx");
  const trust = await loadTrust({ trustedKeysPem: keys.publicKeyPem });
  assert.equal((await verifyModel({ modelPath: `${dir}/model.onnx`, trust })).singleFile, true);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: default and recorded ignore paths exclude exactly what spec 6.2.1 says", async () => {
  const { dev, trust } = await devTrust();
  const dir = await makeModel({
    ...MODEL,
    ".git/HEAD": "ref: main",
    ".gitattributes": "* binary",
    "sub/.git": "nested, not a default exclusion",
    "cache/tmp.bin": "scratch",
  });
  const signed = await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: dev.chainPem,
    serialization: { ignorePaths: ["./cache/"] },
  });
  assert.ok(signed.resources.some((r) => r.name === "sub/.git"));
  assert.ok(!signed.resources.some((r) => r.name.startsWith(".git") || r.name.startsWith("cache")));
  assert.ok(signed.statement.predicate.serialization.ignore_paths!.includes("cache"));

  // Ignored content may change freely; the verifier reads the ignore list from the signed predicate.
  await Deno.writeTextFile(`${dir}/cache/tmp.bin`, "changed");
  await Deno.writeTextFile(`${dir}/.git/new`, "x");
  await Deno.writeTextFile(`${dir}/.github`, "x");
  await verifyModel({ modelPath: dir, trust });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: a signature stored outside the model folder verifies too", async () => {
  const keys = await generateDevelopmentKeyPair();
  const dir = await makeModel(MODEL);
  const sig = `${await Deno.makeTempDir()}/elsewhere.sig`;
  const signed = await signModel({ modelPath: dir, signaturePath: sig, privateKeyPem: keys.privateKeyPem });
  assert.ok(!signed.statement.predicate.serialization.ignore_paths!.includes("elsewhere.sig"));
  const trust = await loadTrust({ trustedKeysPem: keys.publicKeyPem });
  await verifyModel({ modelPath: dir, signaturePath: sig, trust });
  // The bundle may also be handed over already read.
  await verifyModel({ modelPath: dir, bundle: await Deno.readTextFile(sig), trust });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: bytes read after verification are re-checked against the signed digests", async () => {
  const { dev, trust } = await devTrust();
  for (const serialization of [{}, { method: "shards" as const, shardSize: 1000 }]) {
    const dir = await makeModel(MODEL);
    await signModel({
      modelPath: dir,
      privateKeyPem: dev.leaf.privateKeyPem,
      certificateChainPem: dev.chainPem,
      serialization,
    });
    const result = await verifyModel({ modelPath: dir, trust });
    const loaded = await Deno.readFile(`${dir}/model.onnx`);
    await checkLoadedBytes(result, "model.onnx", loaded);
    loaded[42] ^= 1;
    const error = await rejects(
      checkLoadedBytes(result, "model.onnx", loaded),
      "digest_mismatch",
      /model\.onnx: loaded bytes/,
    );
    assert.equal(error.file, "model.onnx");
    await rejects(checkLoadedBytes(result, "other.onnx", loaded), "file_unsigned");
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("oms: reject one byte flipped in a model file", async () => {
  const { dir, trust } = await signedModel();
  const file = await Deno.readFile(`${dir}/model.onnx`);
  file[1234] ^= 0x80;
  await Deno.writeFile(`${dir}/model.onnx`, file);
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "digest_mismatch",
    /model\.onnx: sha256 digest [0-9a-f]{64} does not match the signed [0-9a-f]{64}/,
  );
  assert.equal(error.stage, "manifest");
  assert.equal(error.file, "model.onnx");
  assert.deepEqual(error.problems?.map((p) => p.file), ["model.onnx"]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject an edited statement (signature mismatch)", async () => {
  const { dir, trust } = await signedModel();
  // Re-point the manifest at a different model.onnx: still a well-formed statement, but not the signed one.
  await editBundle(dir, (b) => {
    const statement = JSON.parse(atob(b.dsseEnvelope.payload));
    statement.predicate.resources[1].digest = "0".repeat(64);
    b.dsseEnvelope.payload = btoa(JSON.stringify(statement));
  });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "signature_invalid",
    /DSSE signature does not verify with the key of leaf certificate "CN=OMS Development Code Signing/,
  );
  assert.equal(error.stage, "signature");
  assert.equal(error.certificate?.role, "leaf");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a signer that is not under a trusted root", async () => {
  const { dev } = await devTrust();
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem });
  // Another development trust with the same names but other keys: the issuer name matches, the key does not.
  const other = await generateDevelopmentTrust();
  const otherTrust = await loadTrust({ trustedRootsPem: other.root.certificatePem });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust: otherTrust }),
    "chain_untrusted",
    /intermediate certificate "CN=OMS Development Intermediate CA.*names trusted root .* does not verify with that root's key/,
  );
  assert.equal(error.certificate?.role, "intermediate");
  assert.equal(error.certificate?.index, 1);

  // A chain that carries its own (untrusted) self-signed root.
  await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: [dev.chainPem, dev.root.certificatePem],
  });
  await rejects(
    verifyModel({ modelPath: dir, trust: otherTrust }),
    "chain_untrusted",
    /root certificate .*OMS Development Root CA.* is self-signed and not among the trusted roots|is self-signed and not among the trusted roots/,
  );
  // ... which is fine when that root is trusted.
  await verifyModel({ modelPath: dir, trust: (await devTrust()).trust });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a chain missing its intermediate", async () => {
  const { dev, trust } = await devTrust();
  const dir = await makeModel(MODEL);
  await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: dev.leaf.certificatePem,
  });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "chain_incomplete",
    /leaf certificate .* was issued by "CN=OMS Development Intermediate CA.*neither in the bundle's certificate chain nor among the trusted roots/,
  );
  assert.equal(error.certificate?.role, "leaf");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject an expired leaf and a leaf not yet valid", async () => {
  const now = new Date();
  // CAs issued a month ago so only the leaf's own window is in play.
  const expired = await generateDevelopmentTrust({
    now: new Date(now.getTime() - 30 * DAY),
    leaf: { notBefore: new Date(now.getTime() - 10 * DAY), notAfter: new Date(now.getTime() - DAY) },
  });
  const dir = await makeModel(MODEL);
  await signModel({
    modelPath: dir,
    privateKeyPem: expired.leaf.privateKeyPem,
    certificateChainPem: expired.chainPem,
    now: new Date(now.getTime() - 5 * DAY),
  });
  const trust = await loadTrust({ trustedRootsPem: expired.root.certificatePem });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "certificate_expired",
    /leaf certificate .* expired on/,
  );
  assert.equal(error.certificate?.role, "leaf");
  // Verifying "as of" a time inside the validity window succeeds: `now` is the caller's.
  await verifyModel({ modelPath: dir, trust, now: new Date(now.getTime() - 2 * DAY) });
  await rejects(
    verifyModel({ modelPath: dir, trust, now: new Date(now.getTime() - 20 * DAY) }),
    "certificate_not_yet_valid",
    /leaf certificate .* is not valid before/,
  );
  // The signer refuses an expired certificate too.
  await rejects(
    signModel({ modelPath: dir, privateKeyPem: expired.leaf.privateKeyPem, certificateChainPem: expired.chainPem }),
    "certificate_expired",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a leaf whose keyUsage or extendedKeyUsage does not allow code signing", async () => {
  const wrongKu = await generateDevelopmentTrust({ leaf: { keyUsage: ["keyEncipherment"] } });
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: wrongKu.leaf.privateKeyPem, certificateChainPem: wrongKu.chainPem });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust: await loadTrust({ trustedRootsPem: wrongKu.root.certificatePem }) }),
    "certificate_key_usage",
    /leaf certificate .* keyUsage does not allow digitalSignature \(has: keyEncipherment\)/,
  );
  assert.equal(error.certificate?.role, "leaf");

  const wrongEku = await generateDevelopmentTrust({ leaf: { extendedKeyUsage: ["1.3.6.1.5.5.7.3.1"] } });
  await signModel({
    modelPath: dir,
    privateKeyPem: wrongEku.leaf.privateKeyPem,
    certificateChainPem: wrongEku.chainPem,
  });
  await rejects(
    verifyModel({ modelPath: dir, trust: await loadTrust({ trustedRootsPem: wrongEku.root.certificatePem }) }),
    "certificate_extended_key_usage",
    /extendedKeyUsage does not include codeSigning \(has: 1\.3\.6\.1\.5\.5\.7\.3\.1\)/,
  );

  // No extendedKeyUsage at all is acceptable ("where present").
  const noEku = await generateDevelopmentTrust({ leaf: { extendedKeyUsage: null } });
  await signModel({ modelPath: dir, privateKeyPem: noEku.leaf.privateKeyPem, certificateChainPem: noEku.chainPem });
  await verifyModel({ modelPath: dir, trust: await loadTrust({ trustedRootsPem: noEku.root.certificatePem }) });
  await Deno.remove(dir, { recursive: true });
});

/** A P-256 leaf with digitalSignature, issued by `issuerPem`'s key with `hash`; both as PEM. */
async function issueLeaf(
  subject: string,
  issuerCertificatePem: string,
  issuerKeyPem: string,
  hash: "SHA-256" | "SHA-1",
): Promise<{ leafPem: string; leafKeyPem: string }> {
  const issuerKey = await importSigningKey(issuerKeyPem);
  const issuer = new x509.X509Certificate(issuerCertificatePem);
  const leafKeys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
  const leaf = await x509.X509CertificateGenerator.create({
    subject,
    issuer: issuer.subjectName,
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + DAY),
    signingAlgorithm: { name: "ECDSA", hash } as Algorithm,
    publicKey: leafKeys.publicKey,
    signingKey: issuerKey.privateKey,
    extensions: [new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true)],
  });
  return {
    leafPem: pemEncode("CERTIFICATE", new Uint8Array(leaf.rawData)),
    leafKeyPem: pemEncode("PRIVATE KEY", new Uint8Array(await crypto.subtle.exportKey("pkcs8", leafKeys.privateKey))),
  };
}

Deno.test("oms: reject an intermediate that is not a CA", async () => {
  // The development leaf (cA false, digitalSignature only) pretends to be an intermediate for a new leaf.
  const { dev, trust } = await devTrust();
  const { leafPem, leafKeyPem } = await issueLeaf(
    "CN=Leaf under a non-CA",
    dev.leaf.certificatePem,
    dev.leaf.privateKeyPem,
    "SHA-256",
  );
  const dir = await makeModel(MODEL);
  await signModel({ modelPath: dir, privateKeyPem: leafKeyPem, certificateChainPem: [leafPem, dev.chainPem] });
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "certificate_not_ca",
    /intermediate certificate "CN=OMS Development Code Signing.* issues certificates but is not a CA \(basicConstraints cA is false\)/,
  );
  assert.equal(error.certificate?.index, 1);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a leaf certificate signed with SHA-1", async () => {
  const { dev, trust } = await devTrust();
  const { leafPem, leafKeyPem } = await issueLeaf(
    "CN=SHA-1 leaf",
    dev.intermediate.certificatePem,
    dev.intermediate.privateKeyPem,
    "SHA-1",
  );
  const dir = await makeModel(MODEL);
  await signModel({
    modelPath: dir,
    privateKeyPem: leafKeyPem,
    certificateChainPem: [leafPem, dev.intermediate.certificatePem],
  });
  await rejects(
    verifyModel({ modelPath: dir, trust }),
    "certificate_signature_invalid",
    /"CN=SHA-1 leaf".*signed with SHA-1/,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a listed file that is missing", async () => {
  const { dir, trust } = await signedModel();
  await Deno.remove(`${dir}/tokenizer/vocab.txt`);
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "file_missing",
    /tokenizer\/vocab\.txt: listed in the signed manifest but not found in the model/,
  );
  assert.equal(error.file, "tokenizer/vocab.txt");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject an extra unlisted file, unless unsigned files are ignored on request", async () => {
  const { dir, trust } = await signedModel();
  await Deno.writeTextFile(`${dir}/tokenizer/extra.py`, "print('hi')");
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "file_unsigned",
    /tokenizer\/extra\.py: present in the model but not listed in the signed manifest/,
  );
  assert.equal(error.file, "tokenizer/extra.py");
  const result = await verifyModel({ modelPath: dir, trust, ignoreUnsignedFiles: true });
  assert.deepEqual(result.unsignedFiles, ["tokenizer/extra.py"]);

  // Several problems are all listed, the first (by path) giving the code.
  await Deno.remove(`${dir}/config.json`);
  const both = await rejects(verifyModel({ modelPath: dir, trust }), "file_missing", /2 problems/);
  assert.deepEqual(both.problems?.map((p) => `${p.code} ${p.file}`), [
    "file_missing config.json",
    "file_unsigned tokenizer/extra.py",
  ]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a symlink unless allow_symlinks; follow it when allowed", async () => {
  const { dev, trust } = await devTrust();
  const { dir } = await signedModel();
  await Deno.symlink(`${dir}/model.onnx`, `${dir}/alias.onnx`);
  const error = await rejects(
    verifyModel({ modelPath: dir, trust }),
    "symlink_refused",
    /alias\.onnx: is a symbolic link and serialization\.allow_symlinks is false/,
  );
  assert.equal(error.file, "alias.onnx");
  await rejects(
    signModel({ modelPath: dir, privateKeyPem: dev.leaf.privateKeyPem, certificateChainPem: dev.chainPem }),
    "symlink_refused",
  );

  // With allow_symlinks the link is hashed as its target, under its own name; a directory cycle is skipped.
  await Deno.symlink(dir, `${dir}/tokenizer/loop`);
  const signed = await signModel({
    modelPath: dir,
    privateKeyPem: dev.leaf.privateKeyPem,
    certificateChainPem: dev.chainPem,
    serialization: { allowSymlinks: true },
  });
  const digests = new Map(signed.resources.map((r) => [r.name, r.digest]));
  assert.equal(digests.get("alias.onnx"), digests.get("model.onnx"));
  assert.match(signed.warnings.join("\n"), /tokenizer\/loop: symbolic link cycle/);
  const result = await verifyModel({ modelPath: dir, trust });
  assert.equal(result.serialization.allow_symlinks, true);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a sigstore (keyless) bundle: transparency-log verification needs to be online", async () => {
  const { trust } = await devTrust();
  const dir = await makeModel(MODEL);
  const bundle = await Deno.readTextFile(`${OMS_DIR}/test-vectors/v1.0/valid/sigstore.bundle.json`);
  const error = await rejects(
    verifyModel({ modelPath: dir, bundle, trust }),
    "unsupported_method",
    /sigstore \(keyless\).*transparency-log.*online/,
  );
  assert.equal(error.stage, "signature");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: spec test vectors under local trust are refused with precise reasons", async () => {
  const dir = await makeModel({ "signme-1": "x", "signme-2": "y" });
  const vectors = `${OMS_DIR}/test-vectors/v1.0`;
  const keys = await generateDevelopmentKeyPair("P-384");
  // Key vector: we do not hold its key.
  await rejects(
    verifyModel({
      modelPath: dir,
      bundle: await Deno.readTextFile(`${vectors}/valid/key.bundle.json`),
      trust: await loadTrust({ trustedKeysPem: keys.publicKeyPem }),
    }),
    "signature_invalid",
    /publicKey\.hint e8450dec.* matches none/,
  );
  // Certificate vector: its chain stops at "CN=root-ca", which we do not hold ...
  const vector = await Deno.readTextFile(`${vectors}/valid/certificate.bundle.json`);
  const at = new Date("2026-01-01T00:00:00Z");
  await rejects(
    verifyModel({ modelPath: dir, bundle: vector, trust: (await devTrust()).trust, now: at }),
    "chain_incomplete",
    /issued by "CN=root-ca"/,
  );
  // ... and a root of that name but another key is not its root.
  const fakeRootKeys = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, [
    "sign",
    "verify",
  ]);
  const fakeRoot = await x509.X509CertificateGenerator.createSelfSigned({
    name: "CN=root-ca",
    keys: fakeRootKeys,
    signingAlgorithm: { name: "ECDSA", hash: "SHA-256" } as Algorithm,
    extensions: [new x509.BasicConstraintsExtension(true, undefined, true)],
  });
  await rejects(
    verifyModel({
      modelPath: dir,
      bundle: vector,
      trust: await loadTrust({ trustedRootsPem: fakeRoot.toString("pem") }),
      now: at,
    }),
    "chain_untrusted",
    /"CN=intermediate-ca" .*names trusted root "CN=root-ca".*does not verify/,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: reject a statement whose subject root digest does not match its resources", async () => {
  const keys = await generateDevelopmentKeyPair();
  const { dir } = { dir: await makeModel(MODEL) };
  const signed = await signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem });
  // Re-sign a statement with a wrong root digest, as a faulty signer would.
  const statement = structuredClone(signed.statement);
  statement.subject[0].digest.sha256 = "f".repeat(64);
  const payload = new TextEncoder().encode(JSON.stringify(statement));
  const sig = await signEcdsa(
    await importSigningKey(keys.privateKeyPem),
    preAuthEncoding("application/vnd.in-toto+json", payload),
  );
  await editBundle(dir, (b) => {
    b.dsseEnvelope.payload = btoa(String.fromCharCode(...payload));
    b.dsseEnvelope.signatures = [{ sig: btoa(String.fromCharCode(...sig)) }];
  });
  await rejects(
    verifyModel({ modelPath: dir, trust: await loadTrust({ trustedKeysPem: keys.publicKeyPem }) }),
    "subject_digest_mismatch",
    /subject\[0\]\.digest\.sha256 is f{64} but the signed resources hash to/,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms: trust and signing inputs are checked with clear reasons", async () => {
  const { dev, trust } = await devTrust();
  const dir = await makeModel(MODEL);
  const keys = await generateDevelopmentKeyPair();
  await signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem });
  await rejects(verifyModel({ modelPath: dir, trust }), "no_trust_material", /key method but no trusted public keys/);
  await rejects(
    loadTrust({ trustedRootsPem: "nothing here" }),
    "invalid_trust_material",
    /trusted root PEM #0: holds no/,
  );
  await rejects(
    loadTrust({ trustedKeysPem: dev.root.certificatePem }),
    "invalid_trust_material",
    /holds no "PUBLIC KEY"/,
  );
  const rsa = await crypto.subtle.generateKey(
    { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048, publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" },
    true,
    ["sign", "verify"],
  );
  const rsaPem = pemEncode("PUBLIC KEY", new Uint8Array(await crypto.subtle.exportKey("spki", rsa.publicKey)));
  await rejects(
    loadTrust({ trustedKeysPem: rsaPem }),
    "invalid_trust_material",
    /RSA 2048 keys cannot sign OMS bundles/,
  );
  await rejects(
    signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem, certificateChainPem: dev.chainPem }),
    "invalid_trust_material",
    /does not hold the public key of the given private key/,
  );
  await rejects(
    signModel({
      modelPath: dir,
      privateKeyPem: "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
    }),
    "invalid_trust_material",
    /openssl pkcs8/,
  );
  await rejects(
    signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem, serialization: { ignorePaths: ["*.bin"] } }),
    "invalid_path",
    /glob character/,
  );
  const empty = await makeModel({ ".gitignore": "x" });
  await rejects(signModel({ modelPath: empty, privateKeyPem: keys.privateKeyPem }), "model_empty", /no files to sign/);
  await rejects(verifyModel({ modelPath: empty, trust }), "bundle_unreadable", /model\.sig: not found/);
  await Deno.remove(dir, { recursive: true });
  await Deno.remove(empty, { recursive: true });
});

Deno.test("oms: hashing a 10 MB model yields to the event loop between chunks", async () => {
  const keys = await generateDevelopmentKeyPair();
  const trust = await loadTrust({ trustedKeysPem: keys.publicKeyPem });
  const dir = await makeModel({ "big.bin": bytes(10 * 1024 * 1024, 3) });
  // SHA-256 (native) and BLAKE3 (pure JavaScript, a few hundred milliseconds for 10 MB: long enough that a
  // verifier that never yielded would hold the loop for all of it).
  for (const hashType of ["sha256", "blake3"] as const) {
    await signModel({ modelPath: dir, privateKeyPem: keys.privateKeyPem, serialization: { hashType } });
    // Gaps between timer ticks in CPU time of this process, not wall time: on a loaded machine the
    // process may wait for a core, which is no turn of the event loop withheld.
    let ticks = 0;
    let last = cpuMs();
    let longestGap = 0;
    const timer = setInterval(() => {
      const now = cpuMs();
      longestGap = Math.max(longestGap, now - last);
      last = now;
      ticks++;
    }, 1);
    const started = performance.now();
    try {
      const options: VerifyModelOptions = { modelPath: dir, trust };
      const result = await verifyModel(options);
      assert.equal(result.bytesHashed, 10 * 1024 * 1024);
    } finally {
      clearInterval(timer);
    }
    const took = performance.now() - started;
    // A verification quicker than a timer tick proves nothing either way; a longer one must let timers run.
    if (took >= 50) assert.ok(ticks >= 1, `${hashType}: no timer ran during ${took.toFixed(0)} ms of verification`);
    assert.ok(
      longestGap < 50,
      `${hashType}: event loop held for ${longestGap.toFixed(1)} ms of CPU time (verification took ${
        took.toFixed(0)
      } ms)`,
    );
  }
  await Deno.remove(dir, { recursive: true });
});
