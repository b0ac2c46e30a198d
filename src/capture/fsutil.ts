// File-system steps whose order makes data survive power loss, not just a process crash.

import { dirname } from "node:path";

/** fsync a directory, so entries created, renamed or removed in it survive power loss. */
export async function syncDir(path: string): Promise<void> {
  const dir = await Deno.open(path, { read: true });
  try {
    await dir.sync();
  } finally {
    dir.close();
  }
}

/** mkdir -p, then fsync the parent of each level from `path` up to `root`, so new entries are durable. */
export async function ensureDirDurable(path: string, root = dirname(path)): Promise<void> {
  try {
    if ((await Deno.stat(path)).isDirectory) return;
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  await Deno.mkdir(path, { recursive: true });
  for (let dir = path; dir !== root && dirname(dir) !== dir; dir = dirname(dir)) await syncDir(dirname(dir));
}

/**
 * Writes at most this many bytes on the calling thread: copying a few KiB into the page cache costs less
 * than handing the write to another thread and back. Larger writes go off it, so as not to hold up calls.
 */
export const SYNC_WRITE_BYTES = 256 * 1024;

/** Writes all of `bytes` at the file's position: on this thread when small (SYNC_WRITE_BYTES), else off it. */
export async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  if (bytes.length <= SYNC_WRITE_BYTES) {
    for (let done = 0; done < bytes.length;) done += file.writeSync(bytes.subarray(done));
    return;
  }
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}

/**
 * Replaces `path` atomically and durably: a temporary file in the same folder is written and synced,
 * renamed over `path`, then the folder is synced. A reader sees the old file or the whole new one.
 */
export async function writeFileDurable(path: string, data: Uint8Array, sync = true): Promise<void> {
  const dir = dirname(path);
  const tmp = `${dir}/.${path.slice(dir.length + 1)}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
  try {
    await writeAll(file, data);
    if (sync) await file.syncData();
  } catch (e) {
    file.close();
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
  file.close();
  try {
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
  if (sync) await syncDir(dir);
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, Math.max(0, ms));
    signal?.addEventListener("abort", done, { once: true });
  });
}
