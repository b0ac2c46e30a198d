// The deployment manifest (parsing, fleet, signature), the package downloader on a folder source,
// `package deployment`, and the config keys and permissions deployments add.

import assert from "node:assert/strict";
import { join } from "node:path";
import { parseConfig } from "../src/config.ts";
import { Downloader, RESERVE_BYTES } from "../src/deployments/downloader.ts";
import { DeploymentError, modelsFor, parseManifest, verifyManifest } from "../src/deployments/manifest.ts";
import { type DeploymentSource, FolderSource } from "../src/deployments/source.ts";
import { CommandError, packageDeployment } from "../src/packages/cli.ts";
import { profileFlags, profileFor } from "../src/permissions.ts";
import { sha256Hex } from "../src/capture/s3.ts";
import { publish } from "./helpers/deployments.ts";
import { testTrust } from "./helpers/signing.ts";

const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
const SHA = "a".repeat(64);
const model = (extra: Record<string, unknown> = {}) => ({
  name: "cls",
  package: "packages/cls-2.tar.gz",
  sha256: SHA,
  size: 10,
  version: "2",
  ...extra,
});

Deno.test("deployment manifest: a valid one parses, state defaults to loaded", () => {
  const manifest = parseManifest(encode({ serial: 3, fleets: { a: { models: [model()] }, b: { models: [] } } }));
  assert.equal(manifest.serial, 3);
  assert.deepEqual(modelsFor(manifest, "a"), [{ ...model(), state: "loaded" }]);
  assert.deepEqual(modelsFor(manifest, "b"), []);
});

Deno.test("deployment manifest: each problem is named", () => {
  const refused = (value: unknown, pattern: RegExp) =>
    assert.throws(() => parseManifest(value instanceof Uint8Array ? value : encode(value)), (error) => {
      assert.ok(error instanceof DeploymentError);
      assert.match(error.message, pattern);
      return true;
    });
  refused(new TextEncoder().encode("{"), /not valid JSON/);
  refused([], /must be a JSON object/);
  refused({ serial: 0, fleets: {} }, /"serial" must be a whole number of at least 1/);
  refused({ serial: 1, fleets: {}, extra: 1 }, /unknown key "extra"/);
  refused({ serial: 1, fleets: { a: {} } }, /"fleets.a" must be an object with a "models" list/);
  const one = (extra: Record<string, unknown>) => ({ serial: 1, fleets: { a: { models: [model(extra)] } } });
  refused(one({ name: "-bad" }), /"fleets.a.models\[0\].name" must be a model name/);
  for (const path of ["../x.tar.gz", "/abs/x.tar.gz", "a/./x.tar.gz", "x.onnx", "a//x.tar.gz"]) {
    refused(one({ package: path }), /"fleets.a.models\[0\].package" must be a relative path to a .tar.gz/);
  }
  refused(one({ sha256: SHA.toUpperCase() }), /sha256" must be 64 lower-case hex digits/);
  refused(one({ size: 0 }), /size" must be a positive whole number/);
  refused(one({ version: "a b" }), /version" must be 1-64 printable characters/);
  refused(one({ version: "v".repeat(65) }), /version" must be 1-64 printable characters/);
  refused(one({ state: "gone" }), /state" must be "loaded" or "unloaded"/);
  refused(one({ url: "x" }), /has unknown key "url"/);
  refused({ serial: 1, fleets: { a: { models: [model(), model()] } } }, /names model cls twice/);
});

Deno.test("deployment manifest: a fleet it does not name is refused, not taken as no models", () => {
  const manifest = parseManifest(encode({ serial: 1, fleets: { a: { models: [] } } }));
  assert.throws(() => modelsFor(manifest, "b"), /does not name fleet "b" \(it names a\)/);
  assert.throws(() => modelsFor(manifest, "__proto__"), /does not name fleet/);
});

Deno.test("deployment manifest: verified against the device's trust before it is parsed", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await publish(dir, "a", [{ name: "m", version: "1" }]);
    const trust = { rootCertsPath: (await testTrust()).rootFile, trustedKeysPath: null };
    const { manifest } = await verifyManifest(dir, trust);
    assert.equal(modelsFor(manifest, "a")[0].name, "m");
    assert.equal(manifest.serial, 1, "package deployment starts the serial at 1");

    const text = await Deno.readTextFile(join(dir, "deployment.json"));
    await Deno.writeTextFile(join(dir, "deployment.json"), text.replace('"loaded"', '"unloaded"'));
    await assert.rejects(verifyManifest(dir, trust), /deployment manifest deployment.json failed verification/);

    await publish(dir, "a", [{ name: "m", version: "1" }], { untrustedManifest: true });
    await assert.rejects(verifyManifest(dir, trust), /failed verification/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("package deployment: fills in digests, sizes and the serial; refuses what a device would", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await publish(dir, "a", [{ name: "m", version: "1" }]);
    await publish(dir, "a", [{ name: "m", version: "1" }]);
    const written = JSON.parse(await Deno.readTextFile(join(dir, "deployment.json")));
    assert.equal(written.serial, 2);
    const bytes = await Deno.readFile(join(dir, "packages", "m-1.tar.gz"));
    const digest = await sha256Hex(bytes);
    assert.deepEqual(written.fleets.a.models[0], {
      name: "m",
      package: "packages/m-1.tar.gz",
      version: "1",
      state: "loaded",
      sha256: digest,
      size: bytes.byteLength,
    });
    const trust = await testTrust();
    await Deno.writeTextFile(join(dir, "key.pem"), trust.leaf.privateKeyPem);
    written.fleets.a.models[0].package = "packages/missing.tar.gz";
    await Deno.writeTextFile(join(dir, "deployment.json"), JSON.stringify(written));
    await assert.rejects(packageDeployment({ folder: dir, key: join(dir, "key.pem") }), CommandError);
    written.fleets.a.models[0].package = "packages/m-1.tar.gz";
    written.fleets.a.models[0].version = "has space";
    await Deno.writeTextFile(join(dir, "deployment.json"), JSON.stringify(written));
    await assert.rejects(packageDeployment({ folder: dir, key: join(dir, "key.pem") }), /version" must be/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("downloader: resumes a partial file, checks the digest, checks free space first", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const source = join(dir, "source");
    const packages = join(dir, "packages");
    await Deno.mkdir(source);
    await Deno.mkdir(packages);
    const bytes = crypto.getRandomValues(new Uint8Array(50_000));
    await Deno.writeFile(join(source, "p.tar.gz"), bytes);
    const sha256 = await sha256Hex(bytes);
    const ref = { package: "p.tar.gz", sha256, size: bytes.byteLength };

    // What an interrupted download left: the first half, and the source is asked only for the rest.
    await Deno.writeFile(join(packages, `${sha256}.part`), bytes.subarray(0, 20_000));
    const asked: number[] = [];
    const folder = new FolderSource(source);
    const counting: DeploymentSource = {
      url: (path) => folder.url(path),
      read: (path, max) => folder.read(path, max),
      stream: (path, offset) => {
        asked.push(offset);
        return folder.stream(path, offset);
      },
    };
    const downloader = new Downloader(packages, counting);
    const file = await downloader.fetch(ref);
    assert.deepEqual(asked, [20_000]);
    assert.deepEqual(await Deno.readFile(file), bytes);
    assert.equal(downloader.downloadedBytes, 30_000);
    assert.equal(await downloader.fetch(ref), file, "a complete package is not downloaded again");
    assert.deepEqual(asked, [20_000]);

    // A part whose bytes differ from the package: the digest refuses it and the part goes.
    const other = { ...ref, sha256: "b".repeat(64) };
    await assert.rejects(downloader.fetch(other), /has SHA-256 [0-9a-f]{64}, the manifest says b{64}/);
    assert.deepEqual((await Array.fromAsync(Deno.readDir(packages))).map((e) => e.name), [`${sha256}.tar.gz`]);

    // Larger than the free space: refused before a byte is asked for.
    const huge = { ...ref, sha256: "c".repeat(64), size: 2 ** 52 };
    await assert.rejects(downloader.fetch(huge), (error) => {
      assert.ok(error instanceof DeploymentError && error.transient);
      assert.match(error.message, new RegExp(`not enough space .* ${2 ** 52} bytes to download and ${RESERVE_BYTES}`));
      return true;
    });
    assert.equal(asked.length, 2, "only the mismatching download asked the source");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("downloader: one download at a time", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const refs = [];
    for (const i of [1, 2, 3]) {
      const bytes = crypto.getRandomValues(new Uint8Array(60_000));
      await Deno.writeFile(join(dir, `${i}.tar.gz`), bytes);
      const sha256 = await sha256Hex(bytes);
      refs.push({ package: `${i}.tar.gz`, sha256, size: bytes.byteLength });
    }
    const folder = new FolderSource(dir);
    let running = 0;
    let most = 0;
    const watching: DeploymentSource = {
      url: (path) => folder.url(path),
      read: (path, max) => folder.read(path, max),
      stream: async (path, offset) => {
        most = Math.max(most, ++running);
        const { from, body } = await folder.stream(path, offset);
        return { from, body: body.pipeThrough(new TransformStream({ flush: () => void running-- })) };
      },
    };
    await Deno.mkdir(join(dir, "packages"));
    const downloader = new Downloader(join(dir, "packages"), watching);
    await Promise.all(refs.map((ref) => downloader.fetch(ref)));
    assert.equal(most, 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deployment config: off by default; the source adds exactly its folder or S3 host and statfs", () => {
  const flags = (raw: Record<string, unknown>) =>
    profileFlags(profileFor("/run/a.sock", null, parseConfig({ edge_agent_state_dir: "/s", ...raw }).config));
  const off = flags({});
  assert.ok(!off.some((f) => f.startsWith("--allow-sys")));
  const folder = flags({ edge_agent_deployment_source: "/srv/rollout", sagemaker_edge_core_device_fleet_name: "f" });
  assert.ok(folder.find((f) => f.startsWith("--allow-read="))!.split(",").includes("/srv/rollout"));
  assert.ok(!folder.find((f) => f.startsWith("--allow-write="))!.includes("/srv/rollout"));
  assert.ok(folder.includes("--allow-sys=statfs"));
  assert.ok(folder.includes("--allow-env=ORT_DISABLE_TELEMETRY"), "a folder source needs no credentials");
  const s3 = flags({
    edge_agent_deployment_source: "s3://fleet-models/prod",
    sagemaker_edge_core_device_fleet_name: "f",
    sagemaker_edge_core_region: "eu-west-1",
  });
  assert.equal(
    s3.find((f) => f.startsWith("--allow-net=")),
    "--allow-net=unix:/run/a.sock,fleet-models.s3.eu-west-1.amazonaws.com",
  );
  assert.ok(s3.some((f) => f.startsWith("--allow-env=ORT_DISABLE_TELEMETRY,AWS_ACCESS_KEY_ID")));

  const problems = (raw: Record<string, unknown>) => {
    try {
      parseConfig(raw);
      return "";
    } catch (error) {
      return (error as Error).message;
    }
  };
  assert.match(
    problems({ edge_agent_deployment_source: "relative/dir", sagemaker_edge_core_device_fleet_name: "f" }),
    /"edge_agent_deployment_source" must be "s3:\/\/<bucket>\/<prefix>" or an absolute folder path/,
  );
  assert.match(
    problems({ edge_agent_deployment_source: "/srv/rollout" }),
    /deployments need the fleet name "sagemaker_edge_core_device_fleet_name"/,
  );
  assert.match(
    problems({ edge_agent_deployment_source: "s3://b-b/p", sagemaker_edge_core_device_fleet_name: "f" }),
    /deployments from S3 need "sagemaker_edge_core_region" or "edge_agent_s3_endpoint"/,
  );
  assert.match(
    problems({ edge_agent_deployment_poll_seconds: 0 }),
    /edge_agent_deployment_poll_seconds" must be at least 1/,
  );
});
