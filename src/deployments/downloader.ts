// Package downloads into the state folder: one at a time, free space checked first, resumed from
// what an interrupted download left (`<sha256>.part`), and kept only when the SHA-256 the manifest
// names matches (then renamed to `<sha256>.tar.gz`).

import { statfs } from "node:fs/promises";
import { join } from "node:path";
import { digestFile } from "../file_digest.ts";
import { DeploymentError, type DeploymentModel } from "./manifest.ts";
import type { DeploymentSource } from "./source.ts";

/** Left free beside a download: the package is extracted into the state folder to be verified. */
export const RESERVE_BYTES = 64 * 1024 * 1024;

export type PackageRef = Pick<DeploymentModel, "package" | "sha256" | "size">;

export class Downloader {
  /** Downloads run one after another, whoever asks. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Bytes received, for the metrics. */
  downloadedBytes = 0;

  constructor(readonly dir: string, private readonly source: DeploymentSource) {}

  /** Where a package is kept once complete. */
  file(ref: Pick<PackageRef, "sha256">): string {
    return join(this.dir, `${ref.sha256}.tar.gz`);
  }

  /** The complete, digest-checked package file, downloading what is missing. */
  fetch(ref: PackageRef, signal?: AbortSignal): Promise<string> {
    const run = this.#queue.then(() => this.#fetch(ref, signal));
    this.#queue = run.catch(() => {});
    return run;
  }

  async #fetch(ref: PackageRef, signal?: AbortSignal): Promise<string> {
    const done = this.file(ref);
    // Complete files were checked before they were renamed; the signature is checked again at load.
    if ((await size(done)) === ref.size) return done;
    const part = join(this.dir, `${ref.sha256}.part`);
    let have = (await size(part)) ?? 0;
    if (have > ref.size) have = 0;
    if (have < ref.size) {
      await checkFreeSpace(this.dir, ref.size - have, this.source.url(ref.package));
      await this.#receive(ref, part, have, signal);
    }
    const digest = (await digestFile(part)).sha256;
    if (digest !== ref.sha256) {
      await Deno.remove(part).catch(() => {});
      throw new DeploymentError(
        `package ${this.source.url(ref.package)} has SHA-256 ${digest}, the manifest says ${ref.sha256}`,
      );
    }
    await Deno.rename(part, done);
    return done;
  }

  /** Appends the source's bytes from `have` on to `part`, flushed to disk so a restart resumes after them. */
  async #receive(ref: PackageRef, part: string, have: number, signal?: AbortSignal): Promise<void> {
    const url = this.source.url(ref.package);
    const { from, body } = await this.source.stream(ref.package, have, signal);
    const file = await Deno.open(part, { create: true, write: true });
    let at = from;
    try {
      await file.truncate(from);
      await file.seek(from, Deno.SeekMode.Start);
      for await (const chunk of body) {
        if (at + chunk.byteLength > ref.size) {
          throw new DeploymentError(`package ${url} is larger than the ${ref.size} bytes the manifest says`);
        }
        for (let written = 0; written < chunk.byteLength;) {
          written += await file.write(chunk.subarray(written));
        }
        at += chunk.byteLength;
        this.downloadedBytes += chunk.byteLength;
      }
      await file.syncData();
    } catch (error) {
      if (error instanceof DeploymentError) throw error;
      throw new DeploymentError(`package ${url}: download stopped at byte ${at}: ${(error as Error).message}`, true);
    } finally {
      file.close();
    }
    if (at !== ref.size) {
      throw new DeploymentError(`package ${url} ended at ${at} of the ${ref.size} bytes the manifest says`, true);
    }
  }
}

/**
 * Refuses a download that would not fit. Deno has no statfs of its own; node:fs's asks only
 * `--allow-sys=statfs`, which the agent gets when deployments are on.
 */
export async function checkFreeSpace(dir: string, needed: number, what: string): Promise<void> {
  const stats = await statfs(dir);
  const free = Number(stats.bavail) * Number(stats.bsize);
  if (needed + RESERVE_BYTES > free) {
    throw new DeploymentError(
      `not enough space for ${what}: ${needed} bytes to download and ${RESERVE_BYTES} to keep free, ` +
        `${free} free in ${dir}`,
      true,
    );
  }
}

async function size(path: string): Promise<number | null> {
  try {
    return (await Deno.stat(path)).size;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}
