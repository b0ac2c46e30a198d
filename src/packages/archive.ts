// Safe extraction of a model package that arrives as a .tar.gz of a folder's contents.
// The archive is streamed (file -> gunzip -> tar-stream -> files), never held whole; limits are judged on
// the bytes as gunzip produces them, before they reach the tar parser or the disk. Files land in a fresh
// staging folder inside the state folder and appear under their final name by one rename, so a reader
// never sees half a package and a failure leaves nothing behind.

import { createReadStream } from "node:fs";
import { pipeline } from "node:stream/promises";
import { createGunzip } from "node:zlib";
import { dirname, isAbsolute, join, relative, resolve, sep } from "node:path";
import { extract as tarExtract } from "tar-stream";
import type { Extract, Header } from "tar-stream";

export interface ArchiveLimits {
  /** Bytes gunzip may produce in all: file contents plus tar headers and padding. */
  totalBytes: number;
  /** Bytes of one file. */
  fileBytes: number;
  /** Tar entries (files and folders). */
  entries: number;
  /** Uncompressed / compressed bytes so far; judged once RATIO_GRACE_BYTES have come out. Infinity disables. */
  ratio: number;
}

/**
 * - fileBytes 2 GiB: protobuf's ceiling for one ONNX file, and the agent hands ONNX Runtime bytes, not paths,
 *   so a model bigger than that could not be loaded anyway.
 * - totalBytes 4 GiB: one model at that ceiling plus its signature and metadata, with room to spare.
 * - entries 1024: a package is a model, model.sig and edge-model.json; a thousand is generous.
 * - ratio 100: float weights gzip to about 1.1x, JSON and tar padding to 5-20x; zeros reach ~1000x.
 */
export const DEFAULT_LIMITS: Readonly<ArchiveLimits> = Object.freeze({
  totalBytes: 4 * 1024 ** 3,
  fileBytes: 2 * 1024 ** 3,
  entries: 1024,
  ratio: 100,
});

/** Tar headers and end-of-archive padding are mostly zeros, so tiny archives have high ratios: judge later. */
export const RATIO_GRACE_BYTES = 1024 * 1024;

export type ArchiveErrorReason =
  | "symlink"
  | "hardlink"
  | "device"
  | "fifo"
  | "unsupported-type"
  | "absolute-path"
  | "parent-segment"
  | "outside-root"
  | "bad-name"
  | "duplicate"
  | "conflict"
  | "too-many-entries"
  | "file-too-large"
  | "total-too-large"
  | "ratio-too-high"
  | "corrupt"
  | "io"
  | "destination";

export class ArchiveError extends Error {
  constructor(readonly reason: ArchiveErrorReason, message: string, readonly entry?: string) {
    super(message);
    this.name = "ArchiveError";
  }
}

export interface ExtractOptions {
  /** The state folder: nothing is written outside it. */
  stateDir: string;
  /** Final folder, absolute or relative to stateDir; must be inside stateDir and not exist yet. */
  destination: string;
  limits?: Partial<ArchiveLimits>;
}

export interface ExtractedPackage {
  /** Real path of the final folder. */
  path: string;
  /** Regular files written. */
  files: number;
  /** Bytes of file contents written. */
  bytes: number;
}

const STAGING = "staging";

export async function extractPackage(archivePath: string, options: ExtractOptions): Promise<ExtractedPackage> {
  const limits = checkLimits({ ...DEFAULT_LIMITS, ...options.limits });
  const { state, destination } = await placeDestination(options.stateDir, options.destination);
  const stagingRoot = join(state, STAGING);
  const stage = await makeStage(stagingRoot);
  try {
    const { files, bytes } = await unpack(archivePath, stage, limits);
    await publish(stage, destination, state);
    return { path: destination, files, bytes };
  } catch (error) {
    await Deno.remove(stage, { recursive: true }).catch(() => {});
    throw asArchiveError(error, "io");
  } finally {
    // Leaves no empty staging/ behind; fails harmlessly while another extraction still stages there.
    await Deno.remove(stagingRoot).catch(() => {});
  }
}

function checkLimits(limits: ArchiveLimits): ArchiveLimits {
  for (const [key, value] of Object.entries(limits)) {
    if (typeof value !== "number" || Number.isNaN(value) || value <= 0) {
      throw new RangeError(`archive limit ${key} must be a positive number, got ${value}`);
    }
  }
  return limits;
}

async function placeDestination(
  stateDir: string,
  destination: string,
): Promise<{ state: string; destination: string }> {
  const root = resolve(stateDir);
  const wanted = resolve(root, destination);
  const rel = relative(root, wanted);
  if (rel === "" || rel === ".." || rel.startsWith(".." + sep) || isAbsolute(rel) || rel.split(sep)[0] === STAGING) {
    throw new ArchiveError(
      "destination",
      `destination ${destination} must be a folder inside ${root}, not ${STAGING}/`,
    );
  }
  let state: string;
  try {
    state = await Deno.realPath(root);
  } catch (error) {
    throw new ArchiveError("destination", `state folder ${root}: ${(error as Error).message}`);
  }
  const target = join(state, rel);
  if (await exists(target)) throw new ArchiveError("destination", `destination ${target} already exists`);
  return { state, destination: target };
}

async function makeStage(stagingRoot: string): Promise<string> {
  for (let attempt = 1;; attempt++) {
    let created = false;
    try {
      await Deno.mkdir(stagingRoot, { mode: 0o755 });
      created = true;
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw asArchiveError(error, "io");
      // A symlink here would send the files elsewhere.
      const info = await io(() => Deno.lstat(stagingRoot));
      if (!info.isDirectory) throw new ArchiveError("destination", `${stagingRoot} is not a plain folder`);
    }
    try {
      return await Deno.makeTempDir({ dir: stagingRoot });
    } catch (error) {
      // A concurrent extraction may have removed the empty staging/ in between: make it again.
      if (!(error instanceof Deno.errors.NotFound) || attempt >= 3) {
        if (created) await Deno.remove(stagingRoot).catch(() => {});
        throw asArchiveError(error, "io");
      }
    }
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw asArchiveError(error, "io");
  }
}

async function unpack(archivePath: string, stage: string, limits: ArchiveLimits) {
  const source = createReadStream(archivePath, { highWaterMark: 64 * 1024 });
  const gunzip = createGunzip({ chunkSize: 64 * 1024 });
  const extract = tarExtract();
  const abort = new AbortController();
  let failure: unknown;
  const fail = (error: unknown) => {
    failure ??= error;
    abort.abort();
    extract.destroy(error instanceof Error ? error : new Error(String(error)));
  };
  // Taken before any byte is fed so that no entry is missed.
  // Bodies yield Buffers; streamx types them as unknown.
  const entries = extract[Symbol.asyncIterator]() as Entries;
  // Tar format errors ("Invalid tar header", "Unexpected end of data"); our own destroy(error) lands here too.
  extract.on("error", (error: unknown) => fail(asArchiveError(error, "corrupt")));

  let uncompressed = 0;
  const feed = async (chunks: AsyncIterable<Uint8Array>) => {
    try {
      await feedAll(chunks);
    } catch (error) {
      // Recorded here: pipeline() itself reports only an AbortError for a failing last step.
      fail(asArchiveError(error, "io"));
    }
  };
  const feedAll = async (chunks: AsyncIterable<Uint8Array>) => {
    for await (const chunk of chunks) {
      uncompressed += chunk.byteLength;
      if (uncompressed > limits.totalBytes) {
        throw new ArchiveError("total-too-large", `archive unpacks to more than ${limits.totalBytes} bytes`);
      }
      // bytesWritten: compressed bytes gunzip has consumed, so a bomb is caught within one output chunk.
      const compressed = gunzip.bytesWritten;
      if (uncompressed > RATIO_GRACE_BYTES && uncompressed > limits.ratio * compressed) {
        throw new ArchiveError(
          "ratio-too-high",
          `archive expands more than ${limits.ratio}x (${uncompressed} bytes from ${compressed})`,
        );
      }
      // The parser closed: whoever closed it has already recorded why.
      if (!(await write(extract, chunk))) return;
    }
    await end(extract);
  };
  // The streams' own errors, first hand: pipeline() may pass on only an AbortError or a premature close.
  source.on("error", (error) => fail(asArchiveError(error, "io")));
  gunzip.on("error", (error) => fail(asArchiveError(error, "corrupt")));
  const feeding = pipeline(source, gunzip, feed, { signal: abort.signal }).catch((error) => {
    fail(asArchiveError(error, isZlibError(error) ? "corrupt" : "io"));
  });
  const consuming = consume(entries, stage, limits).catch(fail);
  const [, result] = await Promise.all([feeding, consuming]);
  if (failure !== undefined) throw failure;
  return result as { files: number; bytes: number };
}

/** Resolves false once the parser is closed. */
function write(extract: Extract, chunk: Uint8Array): Promise<boolean> {
  if (extract.destroyed) return Promise.resolve(false);
  if (extract.write(chunk)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = () => {
      extract.off("drain", done);
      extract.off("close", done);
      resolve(!extract.destroyed);
    };
    extract.on("drain", done);
    extract.on("close", done);
  });
}

function end(extract: Extract): Promise<void> {
  return new Promise((resolve) => {
    extract.once("finish", resolve);
    extract.once("close", resolve);
    extract.end(null); // streamx's types want an argument; null means none
  });
}

function isZlibError(error: unknown): boolean {
  const code = (error as { code?: unknown })?.code;
  return typeof code === "string" && code.startsWith("Z_");
}

type Entries = AsyncIterator<AsyncIterable<Uint8Array> & { header: Header }>;

async function consume(entries: Entries, stage: string, limits: ArchiveLimits) {
  const seen = new Map<string, "file" | "dir" | "parent">();
  let count = 0;
  let files = 0;
  let bytes = 0;
  while (true) {
    let next;
    try {
      next = await entries.next();
    } catch (error) {
      throw asArchiveError(error, "corrupt");
    }
    if (next.done) break;
    const entry = next.value;
    const header = entry.header;
    const name = quote(header.name);
    if (++count > limits.entries) {
      throw new ArchiveError(
        "too-many-entries",
        `entry ${name}: archive has more than ${limits.entries} entries`,
        name,
      );
    }
    checkType(header, name);
    const rel = safeName(header.name, name, stage);
    if (rel === "") {
      // "./" from `tar -C folder .` names the staging folder itself.
      if (header.type !== "directory") throw new ArchiveError("bad-name", `entry ${name} names the root`, name);
      continue;
    }
    claim(seen, rel, header.type === "directory" ? "dir" : "file", name);
    const target = join(stage, rel);
    if (header.type === "directory") {
      await io(() => Deno.mkdir(target, { recursive: true, mode: 0o755 }));
      continue;
    }
    if (header.size > limits.fileBytes) {
      throw new ArchiveError("file-too-large", `entry ${name}: ${header.size} bytes, over ${limits.fileBytes}`, name);
    }
    if (bytes + header.size > limits.totalBytes) {
      throw new ArchiveError("total-too-large", `entry ${name}: files add up to more than ${limits.totalBytes}`, name);
    }
    bytes += await writeFile(entry, target, limits.fileBytes, name);
    files++;
  }
  return { files, bytes };
}

function checkType(header: Header, name: string): void {
  const type = header.type as string | null;
  if (type === "file" || type === "directory") return;
  const link = header.linkname ? ` -> ${quote(header.linkname)}` : "";
  if (type === "symlink") throw new ArchiveError("symlink", `entry ${name} is a symlink${link}`, name);
  if (type === "link") throw new ArchiveError("hardlink", `entry ${name} is a hard link${link}`, name);
  if (type === "character-device" || type === "block-device") {
    throw new ArchiveError("device", `entry ${name} is a ${type}`, name);
  }
  if (type === "fifo") throw new ArchiveError("fifo", `entry ${name} is a fifo`, name);
  throw new ArchiveError("unsupported-type", `entry ${name} has unsupported type ${type ?? "unknown"}`, name);
}

/** The entry's path relative to the root, "" for the root itself. */
function safeName(raw: string, name: string, stage: string): string {
  if (raw === "") throw new ArchiveError("bad-name", "an entry has an empty name", name);
  for (let i = 0; i < raw.length; i++) {
    const c = raw.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) throw new ArchiveError("bad-name", `entry ${name} has a control character`, name);
  }
  // Backslash is a separator on Windows, where such a name would climb out.
  if (raw.includes("\\")) throw new ArchiveError("bad-name", `entry ${name} has a backslash`, name);
  if (raw.startsWith("/")) throw new ArchiveError("absolute-path", `entry ${name} is an absolute path`, name);
  const segments = raw.split("/");
  if (segments.includes("..")) throw new ArchiveError("parent-segment", `entry ${name} has a .. segment`, name);
  const kept = segments.filter((s) => s !== "" && s !== ".");
  if (kept.some((s) => new TextEncoder().encode(s).byteLength > 255)) {
    throw new ArchiveError("bad-name", `entry ${name} has a segment over 255 bytes`, name);
  }
  const rel = kept.join("/");
  // Cannot trip after the checks above; kept as the last word on where a file may go.
  const full = resolve(stage, rel);
  if (full !== stage && !full.startsWith(stage + sep)) {
    throw new ArchiveError("outside-root", `entry ${name} resolves outside the package`, name);
  }
  return rel;
}

/** One entry per path; a file may not sit where a folder is needed, nor the other way. */
function claim(seen: Map<string, "file" | "dir" | "parent">, rel: string, kind: "file" | "dir", name: string) {
  const parts = rel.split("/");
  for (let i = 1; i < parts.length; i++) {
    const parent = parts.slice(0, i).join("/");
    if (seen.get(parent) === "file") {
      throw new ArchiveError("conflict", `entry ${name}: ${quote(parent)} is a file in this archive`, name);
    }
    if (!seen.has(parent)) seen.set(parent, "parent");
  }
  const before = seen.get(rel);
  if (before === "file" || before === "dir") {
    throw new ArchiveError("duplicate", `entry ${name}: ${quote(rel)} appears more than once`, name);
  }
  if (before === "parent" && kind === "file") {
    throw new ArchiveError("conflict", `entry ${name}: ${quote(rel)} is a folder of earlier entries`, name);
  }
  seen.set(rel, kind);
}

async function writeFile(body: AsyncIterable<Uint8Array>, target: string, max: number, name: string) {
  await io(() => Deno.mkdir(dirname(target), { recursive: true, mode: 0o755 }));
  // createNew: never open something already there (or a link planted there).
  const file = await io(() => Deno.open(target, { write: true, createNew: true, mode: 0o644 }));
  let written = 0;
  try {
    for await (const chunk of body) {
      written += chunk.byteLength;
      if (written > max) throw new ArchiveError("file-too-large", `entry ${name}: over ${max} bytes`, name);
      for (let off = 0; off < chunk.byteLength;) off += await io(() => file.write(chunk.subarray(off)));
    }
    // The folder is published by rename: its files must be on disk by then.
    await io(() => file.syncData());
  } finally {
    file.close();
  }
  return written;
}

async function publish(stage: string, destination: string, state: string): Promise<void> {
  await io(() => Deno.chmod(stage, 0o755)); // makeTempDir makes it 0700
  const parent = dirname(destination);
  const made: string[] = [];
  try {
    for (let dir = parent; dir !== state && !(await exists(dir)); dir = dirname(dir)) made.unshift(dir);
    for (const dir of made) await io(() => Deno.mkdir(dir, { mode: 0o755 }));
    // A symlinked parent would put the package elsewhere.
    const real = await io(() => Deno.realPath(parent));
    if (real !== state && !real.startsWith(state + sep)) {
      throw new ArchiveError("destination", `destination ${destination} leads outside ${state}`);
    }
    // rename(2) silently replaces an empty folder: check again right before.
    if (await exists(destination)) throw new ArchiveError("destination", `destination ${destination} already exists`);
    await io(() => Deno.rename(stage, destination));
  } catch (error) {
    for (const dir of made.reverse()) await Deno.remove(dir).catch(() => {});
    throw error;
  }
}

async function io<T>(op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (error) {
    throw asArchiveError(error, "io");
  }
}

function asArchiveError(error: unknown, reason: ArchiveErrorReason): ArchiveError {
  if (error instanceof ArchiveError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new ArchiveError(reason, reason === "corrupt" ? `corrupt archive: ${message}` : message);
}

/** Names may be megabytes long (PAX): keep messages readable. */
function quote(name: string): string {
  return JSON.stringify(name.length > 200 ? name.slice(0, 200) + "..." : name);
}

/**
 * Writes a .tar.gz of `folder`'s contents (regular files and folders only, entry names relative
 * to it), the form `extractPackage` takes. Symlinks and special files are refused, as on extraction.
 */
export async function packFolder(folder: string, archivePath: string): Promise<{ files: number; bytes: number }> {
  const { pack } = await import("tar-stream");
  const { createGzip } = await import("node:zlib");
  const { createWriteStream } = await import("node:fs");
  const tar = pack();
  const written = pipeline(tar, createGzip(), createWriteStream(archivePath));
  let files = 0;
  let bytes = 0;
  const walk = async (dir: string): Promise<void> => {
    const entries = (await Array.fromAsync(Deno.readDir(dir))).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const entry of entries) {
      const path = join(dir, entry.name);
      const name = relative(folder, path);
      if (entry.isDirectory) {
        await new Promise<void>((ok, fail) =>
          tar.entry({ name, type: "directory", mode: 0o755 }, (e) => e ? fail(e) : ok())
        );
        await walk(path);
      } else if (entry.isFile) {
        const content = await Deno.readFile(path);
        await new Promise<void>((ok, fail) => tar.entry({ name, mode: 0o644 }, content, (e) => e ? fail(e) : ok()));
        files++;
        bytes += content.length;
      } else {
        throw new ArchiveError("unsupported-type", `${path}: only regular files and folders can be packed`, name);
      }
    }
  };
  try {
    await walk(folder);
    tar.finalize();
    await written;
  } catch (error) {
    tar.destroy(error as Error);
    await written.catch(() => {});
    await Deno.remove(archivePath).catch(() => {});
    throw error;
  }
  return { files, bytes };
}
