// Applies deployment manifests: polls the source, verifies the manifest against the device's trust,
// downloads and verifies each package, swaps models in without failing a Predict, unloads the models
// a manifest drops (never those loaded by hand unless it names them), and keeps what it applied in
// the state folder so that a restart restores it offline.
//
// <state>/deployments/current/   the last verified manifest and its signature
//                     incoming/  a manifest being verified
//                     packages/  <sha256>.tar.gz complete packages, <sha256>.part downloads
//                     applied.json  the models the last apply left loaded (name, digest, version, url)

import { join } from "node:path";
import { AgentError, Status } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { ModelRegistry } from "../inference/models.ts";
import { Downloader } from "./downloader.ts";
import {
  DeploymentError,
  type DeploymentManifest,
  type DeploymentModel,
  MANIFEST_NAME,
  MAX_MANIFEST_BYTES,
  modelsFor,
  SIGNATURE_NAME,
  type Trust,
  verifyManifest,
} from "./manifest.ts";
import type { DeploymentSource } from "./source.ts";

export interface DeployerOptions {
  registry: ModelRegistry;
  source: DeploymentSource;
  stateDir: string;
  fleet: string;
  pollSeconds: number;
  trust: Trust;
  log: Logger;
  /** Called after the deployer unloaded a model (its metrics series go, as after UnLoadModel). */
  unloaded?: (name: string) => void;
}

/** The last deployment result of one model the manifest names. */
export interface ModelResult {
  name: string;
  version: string;
  result: "applied" | "refused";
  /** Why it was refused (the version loaded before keeps serving). */
  reason?: string;
  /** When the result changed (ms since the epoch). */
  at: number;
}

export interface DeploymentStats {
  /** Serial of the last verified manifest; 0 before the first. */
  serial: number;
  /** Why the latest manifest read from the source was refused; null when it was not. */
  manifestRefused: string | null;
  /** When the source last answered (ms since the epoch). */
  lastCheckAt: number | null;
  /** Why the source could not be read at the last poll; null when it could. */
  sourceError: string | null;
  models: ModelResult[];
  downloadedBytes: number;
}

interface AppliedModel {
  name: string;
  sha256: string;
  version: string;
  url: string;
}

export class Deployer {
  /** A "change" event whenever a result, the manifest or the source's state changes. */
  readonly changes = new EventTarget();
  readonly #results = new Map<string, ModelResult>();
  /** Packages refused for a reason that retrying cannot fix (name -> sha256/version), until the manifest changes. */
  readonly #refused = new Map<string, string>();
  readonly #downloader: Downloader;
  readonly #stop = new AbortController();
  #current: { manifest: DeploymentManifest; bytes: Uint8Array } | null = null;
  #manifestRefused: string | null = null;
  #sourceError: string | null = null;
  #lastCheckAt: number | null = null;
  #loop: Promise<void> | null = null;

  private constructor(private readonly o: DeployerOptions, private readonly dir: string, packages: string) {
    this.#downloader = new Downloader(packages, o.source);
  }

  static async open(options: DeployerOptions): Promise<Deployer> {
    const dir = join(options.stateDir, "deployments");
    await Deno.mkdir(join(dir, "packages"), { recursive: true, mode: 0o750 });
    // Packages load from here: a root given as its real path, as LoadModel's roots are compared.
    return new Deployer(options, dir, await Deno.realPath(join(dir, "packages")));
  }

  /** Loads what the last apply left loaded and reads the last verified manifest, all from disk. */
  async restore(): Promise<void> {
    for (const model of await this.#readApplied()) {
      try {
        await this.o.registry.deploy(model.name, this.#downloader.file(model), this.#downloader.dir, model);
        this.#record(model, null);
      } catch (error) {
        this.o.log.warn("a deployed model cannot be restored", { model: model.name, reason: message(error) });
      }
    }
    for (const folder of ["current", "current.old"]) {
      try {
        this.#current = await verifyManifest(join(this.dir, folder), this.o.trust);
        break;
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) continue;
        this.o.log.warn("the last deployment manifest no longer verifies", { reason: message(error) });
      }
    }
  }

  /** Polls the source now and every poll period until stop(). */
  start(): void {
    this.#loop ??= (async () => {
      const signal = this.#stop.signal;
      while (!signal.aborted) {
        // A failure of the state folder (disk full, removed) is reported and tried again, never fatal.
        await this.poll().catch((error) => this.o.log.warn("deployment failed", { reason: message(error) }));
        await new Promise<void>((resolve) => {
          const timer = setTimeout(done, this.o.pollSeconds * 1000);
          function done() {
            clearTimeout(timer);
            signal.removeEventListener("abort", done);
            resolve();
          }
          signal.addEventListener("abort", done);
        });
      }
    })();
  }

  /** Stops polling; a download in progress is abandoned (and resumed after a restart). */
  async stop(): Promise<void> {
    this.#stop.abort();
    await this.#loop;
  }

  /** Reads the source, then applies its manifest, or the last verified one when the source cannot be read. */
  async poll(): Promise<void> {
    let manifest: DeploymentManifest | null = null;
    try {
      manifest = await this.#fetch();
      this.#setSource(null);
      this.#setManifestRefused(null);
    } catch (error) {
      if (error instanceof DeploymentError && error.transient) this.#setSource(error.message);
      else this.#setManifestRefused(message(error));
    }
    manifest ??= this.#current?.manifest ?? null;
    if (manifest) await this.#apply(manifest);
  }

  /** Every model the manifest names is as it asks. */
  converged(): boolean {
    if (this.#manifestRefused !== null || !this.#current) return false;
    try {
      return modelsFor(this.#current.manifest, this.o.fleet).every((m) =>
        this.#results.get(m.name)?.result === "applied"
      );
    } catch {
      return false;
    }
  }

  stats(): DeploymentStats {
    return {
      serial: this.#current?.manifest.serial ?? 0,
      manifestRefused: this.#manifestRefused,
      lastCheckAt: this.#lastCheckAt,
      sourceError: this.#sourceError,
      models: [...this.#results.values()],
      downloadedBytes: this.#downloader.downloadedBytes,
    };
  }

  /** Reads and verifies the source's manifest, keeping it as the current one when it is newer. */
  async #fetch(): Promise<DeploymentManifest> {
    const bytes = await this.o.source.read(MANIFEST_NAME, MAX_MANIFEST_BYTES, this.#stop.signal);
    const signature = await this.o.source.read(SIGNATURE_NAME, MAX_MANIFEST_BYTES, this.#stop.signal);
    this.#lastCheckAt = Date.now();
    const incoming = join(this.dir, "incoming");
    await Deno.remove(incoming, { recursive: true }).catch(() => {});
    await Deno.mkdir(incoming, { mode: 0o750 });
    await Deno.writeFile(join(incoming, MANIFEST_NAME), bytes);
    await Deno.writeFile(join(incoming, SIGNATURE_NAME), signature);
    const verified = await verifyManifest(incoming, this.o.trust);
    modelsFor(verified.manifest, this.o.fleet);
    const current = this.#current;
    if (current && sameBytes(current.bytes, verified.bytes)) return current.manifest;
    if (current && verified.manifest.serial <= current.manifest.serial) {
      throw new DeploymentError(
        `${MANIFEST_NAME} has serial ${verified.manifest.serial}, not above the ${current.manifest.serial} already ` +
          `applied: an older manifest is not applied again (publish it with a higher serial)`,
      );
    }
    // Replaced in two renames; a crash between them leaves current.old, which restore() reads.
    const path = join(this.dir, "current");
    await Deno.remove(`${path}.old`, { recursive: true }).catch(() => {});
    await Deno.rename(path, `${path}.old`).catch(() => {});
    await Deno.rename(incoming, path);
    await Deno.remove(`${path}.old`, { recursive: true }).catch(() => {});
    this.#current = verified;
    this.#refused.clear();
    this.o.log.info("deployment manifest verified", { serial: verified.manifest.serial, fleet: this.o.fleet });
    this.changes.dispatchEvent(new Event("change"));
    return verified.manifest;
  }

  async #apply(manifest: DeploymentManifest): Promise<void> {
    let wanted: DeploymentModel[];
    try {
      wanted = modelsFor(manifest, this.o.fleet);
    } catch {
      return; // reported when it was read
    }
    for (const model of wanted) {
      if (this.#stop.signal.aborted) return;
      await this.#applyModel(model);
    }
    const named = new Set(wanted.map((m) => m.name));
    for (const info of this.o.registry.list()) {
      // Only what a deployment loaded: models loaded by hand stay unless the manifest names them.
      if (!info.deployment || named.has(info.name)) continue;
      await this.o.registry.unload(info.name).catch(() => {});
      this.o.unloaded?.(info.name);
      this.#results.delete(info.name);
      this.o.log.info("model removed by deployment", { model: info.name, version: info.version });
      this.changes.dispatchEvent(new Event("change"));
    }
    for (const name of this.#results.keys()) if (!named.has(name)) this.#results.delete(name);
    await this.#saveApplied();
    await this.#collect(wanted);
  }

  async #applyModel(model: DeploymentModel): Promise<void> {
    const { registry } = this.o;
    const loaded = registry.list().find((m) => m.name === model.name);
    if (model.state === "unloaded") {
      if (loaded) {
        await registry.unload(model.name).catch(() => {});
        this.o.unloaded?.(model.name);
      }
      this.#record(model, null);
      return;
    }
    if (loaded?.deployment?.sha256 === model.sha256 && loaded.deployment.version === model.version) {
      this.#record(model, null);
      return;
    }
    const key = `${model.sha256}/${model.version}`;
    if (this.#refused.get(model.name) === key) return;
    const url = this.o.source.url(model.package);
    try {
      const file = await this.#downloader.fetch(model, this.#stop.signal);
      await registry.deploy(model.name, file, this.#downloader.dir, {
        url,
        sha256: model.sha256,
        version: model.version,
      });
      this.#record(model, null);
    } catch (error) {
      // Verification, digest and load failures stay until the manifest changes; the rest are retried.
      const transient = error instanceof DeploymentError
        ? error.transient
        : !(error instanceof AgentError) || error.code === Status.RESOURCE_EXHAUSTED ||
          error.code === Status.ALREADY_EXISTS;
      if (!transient) this.#refused.set(model.name, key);
      this.#record(model, message(error));
    }
  }

  /** Keeps, logs and announces a model's result when it changed. */
  #record(model: Pick<DeploymentModel, "name" | "version">, reason: string | null): void {
    const before = this.#results.get(model.name);
    const result = reason === null ? "applied" : "refused";
    if (before?.result === result && before.version === model.version && before.reason === (reason ?? undefined)) {
      return;
    }
    this.#results.set(model.name, {
      name: model.name,
      version: model.version,
      result,
      ...(reason === null ? {} : { reason }),
      at: Date.now(),
    });
    const loaded = this.o.registry.list().find((m) => m.name === model.name);
    if (reason === null) this.o.log.info("deployment applied", { model: model.name, version: model.version });
    else {
      this.o.log.warn("deployment refused", {
        model: model.name,
        version: model.version,
        serving: loaded?.version ?? null,
        reason,
      });
    }
    this.changes.dispatchEvent(new Event("change"));
  }

  #setSource(error: string | null): void {
    if (error === this.#sourceError) return;
    this.#sourceError = error;
    if (error) {
      this.o.log.warn("deployment source cannot be read; the last verified manifest stays applied", { reason: error });
    }
    this.changes.dispatchEvent(new Event("change"));
  }

  #setManifestRefused(reason: string | null): void {
    if (reason === this.#manifestRefused) return;
    this.#manifestRefused = reason;
    if (reason) this.o.log.warn("deployment manifest refused; the last verified one stays applied", { reason });
    this.changes.dispatchEvent(new Event("change"));
  }

  async #readApplied(): Promise<AppliedModel[]> {
    try {
      return JSON.parse(await Deno.readTextFile(join(this.dir, "applied.json"))).models;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) {
        this.o.log.warn("applied.json cannot be read; nothing restored", { reason: message(error) });
      }
      return [];
    }
  }

  async #saveApplied(): Promise<void> {
    const models: AppliedModel[] = this.o.registry.list().flatMap((m) =>
      m.deployment ? [{ name: m.name, sha256: m.deployment.sha256, version: m.deployment.version, url: m.url }] : []
    );
    const path = join(this.dir, "applied.json");
    await Deno.writeTextFile(`${path}.tmp`, JSON.stringify({ models }, null, 2) + "\n");
    await Deno.rename(`${path}.tmp`, path);
  }

  /** Deletes packages neither loaded nor wanted. */
  async #collect(wanted: DeploymentModel[]): Promise<void> {
    const keep = new Set([
      ...this.o.registry.list().flatMap((m) => m.deployment ? [m.deployment.sha256] : []),
      ...wanted.filter((m) => m.state === "loaded").map((m) => m.sha256),
    ]);
    for await (const entry of Deno.readDir(this.#downloader.dir)) {
      if (!keep.has(entry.name.replace(/\.(tar\.gz|part)$/, ""))) {
        await Deno.remove(join(this.#downloader.dir, entry.name)).catch(() => {});
      }
    }
  }
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && a.every((byte, i) => byte === b[i]);
}
