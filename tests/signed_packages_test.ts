// Signed model packages through the real agent: what loads (certificate chains, trusted keys,
// folders and archives) and what is refused, each with its reason, while the agent keeps serving
// and leaves nothing behind in its state folder.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { generateDevelopmentKeyPair, generateDevelopmentTrust, signModel } from "../src/packages/oms/mod.ts";
import { type AgentProcess, withAgent } from "./helpers/agent.ts";
import { rejectsWith } from "./helpers/assertions.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";
import { testTrust } from "./helpers/signing.ts";

/** Entries left in the agent's state folder by package loads (extracted or staged packages). */
async function leftovers(agent: AgentProcess): Promise<string[]> {
  const found: string[] = [];
  for (const folder of ["packages", "staging"]) {
    try {
      for await (const entry of Deno.readDir(join(agent.dir, "state", folder))) found.push(`${folder}/${entry.name}`);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
  return found;
}

async function tarGz(folder: string, archive: string, extra: string[] = []): Promise<string> {
  const out = await new Deno.Command("tar", { args: ["-czf", archive, "-C", folder, ".", ...extra] }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  return archive;
}

Deno.test("signed packages load: folders, archives, P-384 leaves under an RSA intermediate, trusted keys", async (t) => {
  const strong = await generateDevelopmentTrust({ leafCurve: "P-384", intermediateKey: "rsa", nameSuffix: " strong" });
  const keyPair = await generateDevelopmentKeyPair("P-256");
  const trustDir = await Deno.makeTempDir({ prefix: "edge-agent-roots-" });
  const keysDir = await Deno.makeTempDir({ prefix: "edge-agent-keys-" });
  try {
    await Deno.writeTextFile(join(trustDir, "test.pem"), (await testTrust()).root.certificatePem);
    await Deno.writeTextFile(join(trustDir, "strong.pem"), strong.root.certificatePem);
    await Deno.writeTextFile(join(keysDir, "publisher.pem"), keyPair.publicKeyPem);
    const config = { sagemaker_edge_core_root_certs_path: trustDir, edge_agent_trusted_model_keys: keysDir };
    await withAgent({ config }, async (agent) => {
      const { client, modelsDir } = agent;
      await t.step("a folder signed with a P-256 leaf (root -> intermediate -> leaf)", async () => {
        await client.loadModel(await writeModelFolder(modelsDir, "p256", addSubModel()), "p256");
        const verified = await agent.logged((l) => l.msg === "model verified" && l.model === "p256", "p256 verified");
        assert.equal(verified?.method, "certificate");
      });
      await t.step("a P-384 leaf under an RSA intermediate", async () => {
        const folder = await writeModelFolder(modelsDir, "p384", addSubModel(), { signed: false });
        await signModel({
          modelPath: folder,
          privateKeyPem: strong.leaf.privateKeyPem,
          certificateChainPem: strong.chainPem,
        });
        await client.loadModel(folder, "p384");
      });
      await t.step("the key method, with the publisher's key among the trusted keys", async () => {
        const folder = await writeModelFolder(modelsDir, "keyed", addSubModel(), { signed: false });
        await signModel({ modelPath: folder, privateKeyPem: keyPair.privateKeyPem });
        await client.loadModel(folder, "keyed");
      });
      await t.step(
        "a .tar.gz of a signed folder, with edge-model.json naming the model; nothing stays extracted",
        async () => {
          const folder = join(modelsDir, "packed-src");
          await Deno.mkdir(folder);
          await Deno.writeFile(join(folder, "addsub.onnx"), addSubModel());
          await Deno.writeTextFile(
            join(folder, "edge-model.json"),
            JSON.stringify({
              name: "addsub",
              version: "1.0",
              framework: "onnx",
              model: "addsub.onnx",
              target_arch: "any",
            }),
          );
          const trust = await testTrust();
          await signModel({
            modelPath: folder,
            privateKeyPem: trust.leaf.privateKeyPem,
            certificateChainPem: trust.chainPem,
          });
          const archive = await tarGz(folder, join(modelsDir, "addsub.tar.gz"));
          await client.loadModel(archive, "from-archive");
          assert.deepEqual(await leftovers(agent), []);
        },
      );
      await t.step("two packages loading at once", async () => {
        const [a, b] = await Promise.all([
          writeModelFolder(modelsDir, "twin-a", addSubModel()),
          writeModelFolder(modelsDir, "twin-b", addSubModel()),
        ]);
        await Promise.all([client.loadModel(a, "twin-a"), client.loadModel(b, "twin-b")]);
      });
      const names = (await client.listModels()).models.map((m) => m.name).sort();
      assert.deepEqual(names, ["from-archive", "keyed", "p256", "p384", "twin-a", "twin-b"]);
    });
  } finally {
    await Deno.remove(trustDir, { recursive: true });
    await Deno.remove(keysDir, { recursive: true });
  }
});

Deno.test("packages that fail verification are refused with the reason, and the agent keeps serving", async (t) => {
  // The device trusts the test root, a root whose signing certificate has expired, and one publisher key.
  const past = new Date(Date.now() - 3 * 365 * 86_400_000);
  const old = await generateDevelopmentTrust({ now: past, leafValidityDays: 30, nameSuffix: " old" });
  const publisher = await generateDevelopmentKeyPair("P-256");
  const rootsDir = await Deno.makeTempDir({ prefix: "edge-agent-roots-" });
  const keysDir = await Deno.makeTempDir({ prefix: "edge-agent-keys-" });
  await Deno.writeTextFile(join(rootsDir, "test.pem"), (await testTrust()).root.certificatePem);
  await Deno.writeTextFile(join(rootsDir, "old.pem"), old.root.certificatePem);
  await Deno.writeTextFile(join(keysDir, "publisher.pem"), publisher.publicKeyPem);
  const config = { sagemaker_edge_core_root_certs_path: rootsDir, edge_agent_trusted_model_keys: keysDir };
  await withAgent({ config }, async (agent) => {
    const { client, modelsDir } = agent;
    let refusals = 0;
    // A name per load: a package wrongly accepted fails its own step only.
    const refuse = async (url: string, message: RegExp) => {
      await rejectsWith(client.loadModel(url, `refused-${++refusals}`), Status.FAILED_PRECONDITION, message);
    };
    await t.step("the trust above accepts what it should: a publisher-key package and a fresh chain", async () => {
      const keyed = await writeModelFolder(modelsDir, "publisher", addSubModel(), { signed: false });
      await signModel({ modelPath: keyed, privateKeyPem: publisher.privateKeyPem });
      await client.loadModel(keyed, "publisher");
      await client.loadModel(await writeModelFolder(modelsDir, "fresh", addSubModel()), "fresh");
      await client.unloadModel("publisher");
      await client.unloadModel("fresh");
    });
    await t.step("one byte of the model flipped after signing", async () => {
      const folder = await writeModelFolder(modelsDir, "flipped", addSubModel());
      const model = await Deno.readFile(join(folder, "model.onnx"));
      model[model.length - 3] ^= 0x01;
      await Deno.writeFile(join(folder, "model.onnx"), model);
      await refuse(folder, /failed verification: .*model\.onnx/);
    });
    await t.step("a file added after signing", async () => {
      const folder = await writeModelFolder(modelsDir, "extra", addSubModel());
      await Deno.writeTextFile(join(folder, "notes.txt"), "unsigned");
      await refuse(folder, /failed verification: .*notes\.txt/);
    });
    await t.step("a signer under a root the device does not trust", async () => {
      const stranger = await generateDevelopmentTrust({ nameSuffix: " stranger" });
      const folder = await writeModelFolder(modelsDir, "stranger", addSubModel(), { signed: false });
      await signModel({
        modelPath: folder,
        privateKeyPem: stranger.leaf.privateKeyPem,
        certificateChainPem: stranger.chainPem,
      });
      await refuse(folder, /failed verification: .*(trusted|root)/i);
    });
    await t.step("an expired signing certificate under a trusted root", async () => {
      const folder = await writeModelFolder(modelsDir, "expired", addSubModel(), { signed: false });
      await signModel({
        modelPath: folder,
        privateKeyPem: old.leaf.privateKeyPem,
        certificateChainPem: old.chainPem,
        now: new Date(past.getTime() + 86_400_000),
      });
      const leafEnd = new Date(past.getTime() + 30 * 86_400_000).toISOString().slice(0, 10);
      await refuse(
        folder,
        new RegExp(`failed verification: leaf certificate "[^"]*" \\(bundle certificate #0\\) expired on ${leafEnd}`),
      );
    });
    await t.step("a package signed by a key the device does not trust", async () => {
      const stranger = await generateDevelopmentKeyPair("P-256");
      const folder = await writeModelFolder(modelsDir, "untrusted-key", addSubModel(), { signed: false });
      await signModel({ modelPath: folder, privateKeyPem: stranger.privateKeyPem });
      await refuse(folder, /failed verification: DSSE signature does not verify with any of the 1 trusted key\(s\)/);
    });
    await t.step("a forged signature: another key's signature under the trusted certificate chain", async () => {
      const folder = await writeModelFolder(modelsDir, "forged", addSubModel());
      const genuine = JSON.parse(await Deno.readTextFile(join(folder, "model.sig")));
      // The forger signs the same statement with a key of their own, and keeps the trusted chain.
      const forger = await generateDevelopmentKeyPair("P-256");
      await signModel({ modelPath: folder, privateKeyPem: forger.privateKeyPem });
      const forged = JSON.parse(await Deno.readTextFile(join(folder, "model.sig")));
      assert.equal(forged.dsseEnvelope.payload, genuine.dsseEnvelope.payload);
      await Deno.writeTextFile(
        join(folder, "model.sig"),
        JSON.stringify({ ...genuine, dsseEnvelope: forged.dsseEnvelope }),
      );
      await refuse(folder, /failed verification: DSSE signature does not verify with the key of leaf certificate/);
    });
    await t.step("a forged signature: the trusted signer's signature with one bit changed", async () => {
      const folder = await writeModelFolder(modelsDir, "bit-flipped", addSubModel());
      const bundle = JSON.parse(await Deno.readTextFile(join(folder, "model.sig")));
      const signature = Uint8Array.from(atob(bundle.dsseEnvelope.signatures[0].sig), (c) => c.charCodeAt(0));
      signature[signature.length - 5] ^= 0x01;
      bundle.dsseEnvelope.signatures[0].sig = btoa(String.fromCharCode(...signature));
      await Deno.writeTextFile(join(folder, "model.sig"), JSON.stringify(bundle));
      await refuse(folder, /failed verification: DSSE signature does not verify with the key of leaf certificate/);
    });
    await t.step("a package for another architecture", async () => {
      const folder = await writeModelFolder(modelsDir, "other-arch", addSubModel(), { signed: false });
      const other = Deno.build.arch === "x86_64" ? "aarch64" : "x86_64";
      await Deno.writeTextFile(
        join(folder, "edge-model.json"),
        JSON.stringify({ framework: "onnx", target_arch: other }),
      );
      const trust = await testTrust();
      await signModel({
        modelPath: folder,
        privateKeyPem: trust.leaf.privateKeyPem,
        certificateChainPem: trust.chainPem,
      });
      await refuse(folder, new RegExp(`model is not compiled for this machine: .* is for ${other}`));
    });
    await t.step("a sigstore keyless bundle, which needs an online transparency log", async () => {
      const folder = await writeModelFolder(modelsDir, "keyless", addSubModel(), { signed: false });
      const vector = new URL("./testdata/oms/test-vectors/v1.0/valid/sigstore.bundle.json", import.meta.url);
      await Deno.copyFile(vector, join(folder, "model.sig"));
      await refuse(folder, /sigstore/i);
    });
    await t.step("archives with a path escaping the package, a link, or a gzip bomb; nothing left behind", async () => {
      const source = await writeModelFolder(modelsDir, "archive-src", addSubModel());
      const escape = join(modelsDir, "escape.tar.gz");
      const tarred = await new Deno.Command("tar", {
        args: ["-czf", escape, "-C", source, "--transform", "s,^\\./model.onnx,../model.onnx,", "."],
      }).output();
      assert.ok(tarred.success);
      await refuse(escape, /cannot be unpacked: .*\.\./);
      await Deno.symlink("model.onnx", join(source, "link.onnx"));
      await refuse(await tarGz(source, join(modelsDir, "link.tar.gz")), /cannot be unpacked: .*link/);
      await Deno.remove(join(source, "link.onnx"));
      const bomb = join(modelsDir, "bomb.tar.gz");
      await Deno.writeTextFile(join(source, "zeros.bin"), "");
      const zeros = await Deno.open(join(source, "zeros.bin"), { write: true });
      await zeros.truncate(64 * 1024 * 1024);
      zeros.close();
      await refuse(await tarGz(source, bomb), /cannot be unpacked: archive expands more than 100x/);
      assert.deepEqual(await leftovers(agent), []);
    });
    await client.loadModel(await writeModelFolder(modelsDir, "fine", addSubModel()), "fine");
    assert.deepEqual((await client.listModels()).models.map((m) => m.name), ["fine"]);
  });
  await Deno.remove(rootsDir, { recursive: true });
  await Deno.remove(keysDir, { recursive: true });
});

Deno.test("with edge_agent_allow_unsigned_models, plain .onnx files load, with a warning each time", async () => {
  await withAgent({ config: { edge_agent_allow_unsigned_models: true } }, async (agent) => {
    const file = join(agent.modelsDir, "plain.onnx");
    await Deno.writeFile(file, addSubModel());
    await agent.client.loadModel(file, "plain");
    const empty = join(agent.modelsDir, "empty");
    await Deno.mkdir(empty);
    await rejectsWith(agent.client.loadModel(empty, "empty"), Status.NOT_FOUND, /holds no \.onnx model/);
    await agent.logged(
      (l) => l.level === "warn" && /edge_agent_allow_unsigned_models is on/.test(String(l.msg)),
      "warning that unsigned models are allowed",
    );
    await agent.logged(
      (l) => l.level === "warn" && l.model === "plain" && /unsigned/.test(String(l.msg)),
      "warning that plain loaded unsigned",
    );
  });
});
