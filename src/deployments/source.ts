// Where deployments come from: an S3 prefix (through the capture's S3 client, signing and
// credentials) or a folder. Both hold `deployment.json`, its signature, and the packages it names
// by paths relative to it.

import { join, normalize } from "node:path";
import { S3Client, S3Error, type S3Options } from "../capture/s3.ts";
import { DeploymentError } from "./manifest.ts";

/** Bounds one package transfer; an interrupted one resumes where it stopped at the next poll. */
const DOWNLOAD_TIMEOUT_MS = 60 * 60 * 1000;

export interface DeploymentSource {
  /** Where `path` is, for the log and ListModels' url. */
  url(path: string): string;
  /** A small file whole (manifest, signature). */
  read(path: string, maxBytes: number, signal?: AbortSignal): Promise<Uint8Array>;
  /**
   * The bytes of `path` from `offset` on; `from` is where the stream starts (0 when the source
   * cannot start elsewhere).
   */
  stream(
    path: string,
    offset: number,
    signal?: AbortSignal,
  ): Promise<{ from: number; body: ReadableStream<Uint8Array> }>;
}

export class FolderSource implements DeploymentSource {
  constructor(private readonly folder: string) {}

  url(path: string): string {
    return this.#path(path);
  }

  async read(path: string, maxBytes: number): Promise<Uint8Array> {
    const file = await this.#open(path);
    try {
      const size = (await file.stat()).size;
      if (size > maxBytes) throw new DeploymentError(`${this.url(path)} is ${size} bytes, more than ${maxBytes}`);
      const bytes = new Uint8Array(size);
      for (let read = 0; read < size;) {
        const n = await file.read(bytes.subarray(read));
        if (n === null) throw new DeploymentError(`${this.url(path)} shrank while being read`, true);
        read += n;
      }
      return bytes;
    } finally {
      file.close();
    }
  }

  async stream(path: string, offset: number): Promise<{ from: number; body: ReadableStream<Uint8Array> }> {
    const file = await this.#open(path);
    try {
      await file.seek(offset, Deno.SeekMode.Start);
    } catch (error) {
      file.close();
      throw error;
    }
    // The readable closes the file when it ends or is cancelled.
    return { from: offset, body: file.readable };
  }

  async #open(path: string): Promise<Deno.FsFile> {
    try {
      return await Deno.open(this.#path(path));
    } catch (error) {
      throw new DeploymentError(`${this.url(path)} cannot be read: ${(error as Error).message}`, true);
    }
  }

  /** Manifest paths are checked relative paths already; this keeps any other caller inside too. */
  #path(path: string): string {
    const full = normalize(join(this.folder, path));
    if (!full.startsWith(this.folder.replace(/\/+$/, "") + "/")) {
      throw new DeploymentError(`${path} is outside the source`);
    }
    return full;
  }
}

export class S3Source implements DeploymentSource {
  readonly #client: S3Client;

  constructor(private readonly options: S3Options, private readonly prefix: string) {
    this.#client = new S3Client(options);
  }

  url(path: string): string {
    return `s3://${this.options.bucket}/${this.prefix}${path}`;
  }

  async read(path: string, maxBytes: number, signal?: AbortSignal): Promise<Uint8Array> {
    const bytes = await this.#call(path, () => this.#client.getObject(this.prefix + path, signal));
    if (bytes === null) throw new DeploymentError(`${this.url(path)} does not exist`, true);
    if (bytes.byteLength > maxBytes) {
      throw new DeploymentError(`${this.url(path)} is ${bytes.byteLength} bytes, more than ${maxBytes}`);
    }
    return bytes;
  }

  async stream(
    path: string,
    offset: number,
    signal?: AbortSignal,
  ): Promise<{ from: number; body: ReadableStream<Uint8Array> }> {
    const response = await this.#call(
      path,
      () => this.#client.getObjectFrom(this.prefix + path, offset, DOWNLOAD_TIMEOUT_MS, signal),
    );
    if (response === null || !response.body) throw new DeploymentError(`${this.url(path)} does not exist`, true);
    return { from: response.status === 206 ? offset : 0, body: response.body };
  }

  async #call<T>(path: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      if (!(error instanceof S3Error)) throw error;
      throw new DeploymentError(`${this.url(path)}: ${error.message}`, true);
    }
  }
}
