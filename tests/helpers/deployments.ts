// Deployments for the tests: signed model packages and a signed deployment.json published to a folder
// (and from there to the test S3), and a TCP relay in front of S3 that can hold a download mid-way.

import { join, relative } from "node:path";
import { packFolder } from "../../src/packages/archive.ts";
import { packageDeployment } from "../../src/packages/cli.ts";
import { type DevelopmentTrust, generateDevelopmentTrust, signModel } from "../../src/packages/oms/mod.ts";
import { S3Client, type S3Options } from "../../src/capture/s3.ts";
import { buildModel, OnnxType } from "./onnx_models.ts";
import { testTrust } from "./signing.ts";

/**
 * y = x + c, float32 [1]: a Predict's answer tells which version served it. With `slow`, x is
 * [side, side] and goes through `steps` MatMuls by the identity first, so a Run takes a while.
 */
export function addConstantModel(c: number, slow?: { side: number; steps: number }): Uint8Array {
  const side = slow?.side ?? 1;
  const steps = slow?.steps ?? 0;
  const identity = new Float32Array(side * side);
  for (let i = 0; i < side; i++) identity[i * side + i] = 1;
  const chain = Array.from({ length: steps }, (_, s) => ({
    op: "MatMul",
    inputs: [s === 0 ? "x" : `h${s}`, "w"],
    outputs: [`h${s + 1}`],
  }));
  const shape = slow ? [side, side] : [1];
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, shape]],
    outputs: [["y", OnnxType.FLOAT, shape]],
    nodes: [...chain, { op: "Add", inputs: [steps ? `h${steps}` : "x", "c"], outputs: ["y"] }],
    initializers: [
      ...(steps ? [{ name: "w", dims: [side, side], floats: identity }] : []),
      { name: "c", dims: [1], floats: new Float32Array([c]) },
    ],
  });
}

let untrusted: Promise<DevelopmentTrust> | null = null;
/** A second development trust, which the agents under test do not trust. */
export function untrustedTrust(): Promise<DevelopmentTrust> {
  return untrusted ??= generateDevelopmentTrust();
}

export interface PublishedModel {
  name: string;
  version: string;
  /** y = x + constant */
  constant?: number;
  state?: "loaded" | "unloaded";
  /** The model file changed after signing. */
  tampered?: boolean;
  /** Signed by the untrusted development trust. */
  untrustedSigner?: boolean;
  /** Bytes of incompressible padding signed into the package (a large download). */
  paddingBytes?: number;
  /** The version the package's own edge-model.json names (default: none). */
  packageVersion?: string;
}

/**
 * Writes each model as a signed .tar.gz under `<folder>/packages/`, then `deployment.json` for
 * `fleet` and its signature with `edge-agent package deployment` (serial one above the last).
 */
export async function publish(
  folder: string,
  fleet: string,
  models: PublishedModel[],
  options: { untrustedManifest?: boolean } = {},
): Promise<void> {
  const scratch = await Deno.makeTempDir({ prefix: "edge-agent-publish-" });
  await Deno.mkdir(join(folder, "packages"), { recursive: true });
  const entries = [];
  for (const model of models) {
    const path = `packages/${model.name}-${model.version}.tar.gz`;
    entries.push({ name: model.name, package: path, version: model.version, state: model.state ?? "loaded" });
    if (await Deno.stat(join(folder, path)).then(() => true, () => false)) continue;
    const dir = join(scratch, `${model.name}-${model.version}`);
    await Deno.mkdir(dir);
    await Deno.writeFile(join(dir, "model.onnx"), addConstantModel(model.constant ?? 0));
    if (model.paddingBytes) {
      const padding = new Uint8Array(model.paddingBytes);
      for (let i = 0; i < padding.length; i += 65536) crypto.getRandomValues(padding.subarray(i, i + 65536));
      await Deno.writeFile(join(dir, "padding.bin"), padding);
    }
    if (model.packageVersion) {
      const manifest = { name: model.name, version: model.packageVersion, model: "model.onnx" };
      await Deno.writeTextFile(join(dir, "edge-model.json"), JSON.stringify(manifest));
    }
    const trust = model.untrustedSigner ? await untrustedTrust() : await testTrust();
    await signModel({ modelPath: dir, privateKeyPem: trust.leaf.privateKeyPem, certificateChainPem: trust.chainPem });
    if (model.tampered) await Deno.writeFile(join(dir, "model.onnx"), addConstantModel(1000));
    await packFolder(dir, join(folder, path));
  }
  const manifest = join(folder, "deployment.json");
  const serial = await Deno.readTextFile(manifest).then((text) => JSON.parse(text).serial, () => 0);
  await Deno.writeTextFile(manifest, JSON.stringify({ serial, fleets: { [fleet]: { models: entries } } }));
  const trust = options.untrustedManifest ? await untrustedTrust() : await testTrust();
  await Deno.writeTextFile(join(scratch, "key.pem"), trust.leaf.privateKeyPem);
  await Deno.writeTextFile(join(scratch, "chain.pem"), trust.chainPem);
  await packageDeployment({ folder, key: join(scratch, "key.pem"), certChain: join(scratch, "chain.pem") });
  await Deno.remove(scratch, { recursive: true });
}

/** Uploads every file of `folder` under `prefix`, packages first, so the manifest never names a missing one. */
export async function uploadFolder(options: S3Options, folder: string, prefix: string): Promise<void> {
  const client = new S3Client(options);
  const files: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for await (const entry of Deno.readDir(dir)) {
      if (entry.isDirectory) await walk(join(dir, entry.name));
      else files.push(relative(folder, join(dir, entry.name)));
    }
  };
  await walk(folder);
  const rank = (f: string) => f === "deployment.json" ? 2 : f === "deployment.json.sig" ? 1 : 0;
  files.sort((a, b) => rank(a) - rank(b));
  for (const file of files) {
    await client.putObject(prefix + file, await Deno.readFile(join(folder, file)), "application/octet-stream");
  }
}

/**
 * A TCP relay to a local server that records what clients send, and, while `holdAfter` is set,
 * stops passing a connection's answers on after that many bytes (a download that stalls).
 */
export class Relay {
  holdAfter: number | null = null;
  #sent = "";
  readonly #listener: Deno.TcpListener;
  readonly #conns = new Set<Deno.Conn>();

  constructor(private readonly targetPort: number) {
    const listener = this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    (async () => {
      for await (const conn of listener) this.#relay(conn).catch(() => {});
    })().catch(() => {});
  }

  get port(): number {
    return this.#listener.addr.port;
  }

  /** Everything clients sent since the last clear (HTTP/1.1 request heads and bodies). */
  get sent(): string {
    return this.#sent;
  }

  clear(): void {
    this.#sent = "";
  }

  async #relay(conn: Deno.Conn): Promise<void> {
    const upstream = await Deno.connect({ hostname: "127.0.0.1", port: this.targetPort });
    this.#conns.add(conn).add(upstream);
    const decoder = new TextDecoder("latin1");
    const requests = (async () => {
      for await (const chunk of conn.readable) {
        this.#sent += decoder.decode(chunk);
        await write(upstream, chunk);
      }
    })().catch(() => {});
    const answers = (async () => {
      let passed = 0;
      for await (const chunk of upstream.readable) {
        const allowed = this.holdAfter === null ? chunk.byteLength : Math.max(0, this.holdAfter - passed);
        if (allowed > 0) await write(conn, chunk.subarray(0, Math.min(allowed, chunk.byteLength)));
        passed += chunk.byteLength;
      }
    })().catch(() => {});
    await Promise.race([requests, answers]);
    for (const c of [conn, upstream]) {
      this.#conns.delete(c);
      try {
        c.close();
      } catch { /* closed by its readable */ }
    }
  }

  close(): void {
    try {
      this.#listener.close();
    } catch { /* closed before */ }
    for (const c of this.#conns) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
  }
}

async function write(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.byteLength;) written += await conn.write(bytes.subarray(written));
}
