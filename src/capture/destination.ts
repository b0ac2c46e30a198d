// Where batches go. A put is idempotent (same key, same bytes) and resolves only once the object is
// durable there; errors say whether retrying may help.

import { dirname, resolve } from "node:path";
import { ensureDirDurable, writeFileDurable } from "./fsutil.ts";
import { CREDENTIALS_UNAVAILABLE, S3Client, S3Error, type S3Options } from "./s3.ts";

export interface Destination {
  /** "Disk" or "Cloud", for logs and stats. */
  readonly kind: "Disk" | "Cloud";
  put(key: string, data: Uint8Array, contentType: string, signal?: AbortSignal): Promise<void>;
  /** Where the object at `key` is, as capture records reference it (s3://bucket/key, file:///path). */
  dataRef?(key: string): string;
  /** Throws DestinationError when uploads cannot proceed now (e.g. no credentials); absent: nothing to check. */
  probe?(): Promise<void>;
}

/**
 * A put that failed. `transient`: an outage (retried without limit); otherwise counts towards max attempts.
 * `credentials`: no credentials could be had (none configured, the credentials provider fails).
 */
export class DestinationError extends Error {
  constructor(message: string, readonly transient: boolean, readonly credentials = false) {
    super(message);
    this.name = "DestinationError";
  }
}

/** Disk errors that a later attempt may not hit: full disk, I/O errors, resource limits, read-only remounts. */
const TRANSIENT_DISK_CODES = new Set(["ENOSPC", "EIO", "EAGAIN", "EBUSY", "EMFILE", "ENFILE", "EROFS", "EDQUOT"]);

/** Writes objects as files under `root` (disk_path): temporary file, fsync, rename, fsync folder. */
export class DiskDestination implements Destination {
  readonly kind = "Disk";
  private knownDirs = new Set<string>();

  constructor(readonly root: string, private readonly sync = true) {}

  dataRef(key: string): string {
    // Not percent-encoded: consumers strip "file://" to get the path, as Edge Manager's records allowed.
    return `file://${resolve(this.root)}/${key}`;
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = `${this.root}/${key}`;
    try {
      const dir = dirname(path);
      if (!this.knownDirs.has(dir)) {
        await ensureDirDurable(dir, this.root);
        this.knownDirs.add(dir);
      }
      await writeFileDurable(path, data, this.sync);
    } catch (e) {
      this.knownDirs.clear(); // the folder may have been removed under us
      const code = (e as { code?: string }).code ?? "";
      throw new DestinationError(`disk write ${path}: ${(e as Error).message}`, TRANSIENT_DISK_CODES.has(code));
    }
  }
}

export class S3Destination implements Destination {
  readonly kind = "Cloud";
  readonly client: S3Client;

  constructor(private readonly options: S3Options) {
    this.client = new S3Client(options);
  }

  dataRef(key: string): string {
    return `s3://${this.options.bucket}/${key}`;
  }

  async put(key: string, data: Uint8Array, contentType: string, signal?: AbortSignal): Promise<void> {
    try {
      await this.client.putObject(key, data, contentType, signal);
    } catch (e) {
      if (e instanceof S3Error) {
        throw new DestinationError(e.message, e.transient, e.code === CREDENTIALS_UNAVAILABLE);
      }
      throw new DestinationError(String(e), true);
    }
  }

  async probe(): Promise<void> {
    try {
      await this.client.credentials.get();
    } catch (e) {
      throw new DestinationError((e as Error).message, true, true);
    }
  }
}
