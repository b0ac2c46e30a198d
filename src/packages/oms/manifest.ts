// The model side of OMS: enumerate the files in scope (spec 6.1, 6.2), hash them (6.3), build resources and
// the root digest (6.4, 6.5) when signing, and compare them with signed resources when verifying (8.4, 8.5).

import { basename, dirname, join, relative, resolve, sep as SEPARATOR } from "node:path";
import { createHash } from "node:crypto";
import { describe, type ManifestProblem, OmsError } from "./errors.ts";
import { compareCodePoints, hexDecode } from "./encoding.ts";
import { hashBytesRanges, hashFileRanges, rangesFor } from "./hashing.ts";
import { canonicalizeRelativePath, DEFAULT_IGNORE_PATHS, parseShardName, PathFilter } from "./paths.ts";
import type { HashType, OmsPredicate, ResourceDescriptor, SerializationMethod } from "./bundle.ts";

/** Default shard size when shard serialization is chosen without one (spec 6.3.2). */
export const DEFAULT_SHARD_SIZE = 1_000_000_000;

export interface ModelFile {
  /** Canonical path relative to the model root (spec 6.1.2). */
  name: string;
  /** Filesystem path to read (through the symlink, if one led here). */
  path: string;
  size: number;
}

export interface EnumerationOptions {
  allowSymlinks: boolean;
  /** Canonical relative ignore paths (user or predicate), matched exactly with their subtree. */
  ignorePaths: string[];
  /** Filesystem path of the signature; excluded when it lies inside the model. */
  signaturePath?: string;
}

export interface Enumeration {
  /** Absolute real path of the model root (a directory or a single file). */
  root: string;
  singleFile: boolean;
  files: ModelFile[];
  /** Model-relative path of the signature when it lies inside the model (and so was excluded). */
  signatureName?: string;
  warnings: string[];
}

function ioError(what: string, error: unknown, file?: string): OmsError {
  return new OmsError("manifest", "model_unreadable", `${what}: ${describe(error)}`, { file, cause: error });
}

/** Default signature location: model.sig inside a model folder, `<file>.sig` beside a single-file model. */
export async function defaultSignaturePath(modelPath: string): Promise<string> {
  const info = await Deno.stat(modelPath).catch((e) => {
    throw ioError(`model ${modelPath}`, e);
  });
  return info.isDirectory ? join(modelPath, "model.sig") : `${modelPath}.sig`;
}

/** Where `signaturePath` sits relative to the model root, or undefined when outside it. */
async function signatureNameIn(root: string, signaturePath: string): Promise<string | undefined> {
  // The signature may not exist yet (signing): resolve its folder, which must.
  let dir: string;
  try {
    dir = await Deno.realPath(dirname(resolve(signaturePath)));
  } catch {
    return undefined;
  }
  const rel = relative(root, join(dir, basename(signaturePath)));
  if (rel === "" || rel.startsWith("..") || rel.startsWith(SEPARATOR)) return undefined;
  const canonical = canonicalizeRelativePath(rel.split(SEPARATOR).join("/"));
  return canonical instanceof Error ? undefined : canonical;
}

/**
 * Lists the regular files in scope: recursive, exclusions applied before symlink handling (spec 6.1 steps
 * 3-4), symlinks refused unless allowed, special files refused. Sorted by code point.
 */
export async function enumerateModel(modelPath: string, options: EnumerationOptions): Promise<Enumeration> {
  let root: string;
  let rootInfo: Deno.FileInfo;
  try {
    root = await Deno.realPath(modelPath);
    rootInfo = await Deno.stat(root);
  } catch (error) {
    throw ioError(`model ${modelPath}`, error);
  }
  const warnings: string[] = [];

  if (rootInfo.isFile) {
    // Single-file model: the name is the basename and exclusions have nothing to act on (spec 6.1.2 rule 5).
    const name = basename(root);
    checkUtf8Name(name, name);
    return { root, singleFile: true, files: [{ name, path: root, size: rootInfo.size }], warnings };
  }
  if (!rootInfo.isDirectory) {
    throw new OmsError("manifest", "unsupported_file_type", `model ${modelPath} is neither a file nor a directory`);
  }

  const signatureName = options.signaturePath ? await signatureNameIn(root, options.signaturePath) : undefined;
  const filter = new PathFilter(options.ignorePaths, signatureName ? [signatureName] : []);
  const files: ModelFile[] = [];

  const walk = async (dir: string, relDir: string, ancestors: Set<string>): Promise<void> => {
    let entries: Deno.DirEntry[];
    try {
      entries = await Array.fromAsync(Deno.readDir(dir));
    } catch (error) {
      throw ioError(`directory ${relDir || "."}`, error, relDir || undefined);
    }
    entries.sort((a, b) => compareCodePoints(a.name, b.name));
    for (const entry of entries) {
      const rel = relDir ? `${relDir}/${entry.name}` : entry.name;
      checkUtf8Name(entry.name, rel);
      if (filter.excludedBy(rel) !== null) continue;
      const path = join(dir, entry.name);

      if (entry.isSymlink) {
        if (!options.allowSymlinks) {
          throw new OmsError(
            "manifest",
            "symlink_refused",
            `${rel}: is a symbolic link and serialization.allow_symlinks is false`,
            { file: rel },
          );
        }
        let target: string;
        let info: Deno.FileInfo;
        try {
          target = await Deno.realPath(path);
          info = await Deno.stat(target);
        } catch (error) {
          throw ioError(`${rel}: symbolic link cannot be resolved`, error, rel);
        }
        if (target !== root && !target.startsWith(root + SEPARATOR)) {
          warnings.push(`${rel}: symbolic link points outside the model root (${target})`);
        }
        if (info.isDirectory) {
          if (ancestors.has(target)) {
            warnings.push(`${rel}: symbolic link cycle back to an ancestor directory, not followed`);
            continue;
          }
          await walk(target, rel, new Set([...ancestors, target]));
        } else if (info.isFile) {
          files.push({ name: rel, path: target, size: info.size });
        } else {
          throw new OmsError("manifest", "unsupported_file_type", `${rel}: symbolic link to a special file`, {
            file: rel,
          });
        }
      } else if (entry.isDirectory) {
        const real = await Deno.realPath(path).catch((e) => {
          throw ioError(rel, e, rel);
        });
        await walk(path, rel, new Set([...ancestors, real]));
      } else if (entry.isFile) {
        const info = await Deno.stat(path).catch((e) => {
          throw ioError(rel, e, rel);
        });
        files.push({ name: rel, path, size: info.size });
      } else {
        throw new OmsError(
          "manifest",
          "unsupported_file_type",
          `${rel}: is neither a regular file, a directory nor a symbolic link`,
          { file: rel },
        );
      }
    }
  };
  await walk(root, "", new Set([root]));
  files.sort((a, b) => compareCodePoints(a.name, b.name));
  return { root, singleFile: false, files, signatureName, warnings };
}

function checkUtf8Name(name: string, rel: string): void {
  // Deno replaces undecodable bytes with U+FFFD; such a name cannot be written losslessly (spec 6.1.2 rule 7).
  if (name.includes("\uFFFD")) {
    throw new OmsError("manifest", "invalid_path", `${rel}: file name is not valid UTF-8`, { file: rel });
  }
}

export interface SerializeOptions {
  method: SerializationMethod;
  hashType: HashType;
  shardSize?: number;
}

/** Hashes enumerated files into resource descriptors sorted by name (spec 6.3, 6.4). */
export async function serializeFiles(files: ModelFile[], options: SerializeOptions): Promise<ResourceDescriptor[]> {
  const resources: ResourceDescriptor[] = [];
  for (const file of files) {
    const ranges = rangesFor(file.size, options.method === "shards" ? options.shardSize : undefined);
    const digests = await hashFileRanges(file.path, ranges, options.hashType, file.name);
    ranges.forEach((range, i) => {
      const name = options.method === "shards" ? `${file.name}:${range.start}:${range.end}` : file.name;
      resources.push({ name, digest: digests[i], algorithm: options.hashType });
    });
  }
  resources.sort((a, b) => compareCodePoints(a.name, b.name));
  return resources;
}

/** SHA-256 over the concatenated raw digests, in the order given (spec 6.5.1). */
export function rootDigest(resources: ResourceDescriptor[]): string {
  const h = createHash("sha256");
  for (const r of resources) h.update(hexDecode(r.digest) ?? new Uint8Array());
  return h.digest("hex");
}

/** Ignore paths a verifier applies: the defaults plus those recorded in the predicate (spec 6.2.1, 8.4 step 4). */
export function effectiveIgnorePaths(predicate: OmsPredicate): string[] {
  return [...new Set([...DEFAULT_IGNORE_PATHS, ...(predicate.serialization.ignore_paths ?? [])])];
}

export interface VerifiedResource extends ResourceDescriptor {
  /** The model file the resource covers (for shards, the path before `:start:end`). */
  file: string;
}

export interface ManifestVerification {
  root: string;
  singleFile: boolean;
  /** Model-relative path of the signature file if it lies inside the model (excluded from the scope). */
  signatureName?: string;
  ignorePaths: string[];
  /** Every resource, recomputed and matched. */
  resources: VerifiedResource[];
  /** Files present but not signed, when ignoreUnsignedFiles let them pass (spec 8.5). */
  unsignedFiles: string[];
  fileCount: number;
  bytesHashed: number;
  warnings: string[];
}

interface Expected {
  whole?: ResourceDescriptor;
  shards: { start: number; end: number; resource: ResourceDescriptor }[];
}

/**
 * Spec 8.4: enumerate with the predicate's rules, then check every resource against the local files. Name
 * problems (missing, unsigned) are reported before any hashing; digest mismatches are collected over all
 * files. Each problem names its file; the thrown error carries them all in `problems`.
 */
export async function verifyManifest(
  modelPath: string,
  predicate: OmsPredicate,
  options: {
    signaturePath?: string;
    ignoreUnsignedFiles?: boolean;
    /** Files whose content the caller already holds: hashed from these bytes, not read again. */
    preloaded?: ReadonlyMap<string, Uint8Array>;
  } = {},
): Promise<ManifestVerification> {
  // Bytes the caller will use are the bytes checked: nothing can change between check and use.
  const hashRanges = (path: string, name: string, ranges: ReturnType<typeof rangesFor>) => {
    const bytes = options.preloaded?.get(name);
    return bytes ? hashBytesRanges(bytes, ranges, ser.hash_type) : hashFileRanges(path, ranges, ser.hash_type, name);
  };
  const sizeOf = (file: { name: string; size: number }) => options.preloaded?.get(file.name)?.length ?? file.size;
  const ser = predicate.serialization;
  const ignorePaths = effectiveIgnorePaths(predicate);
  const enumeration = await enumerateModel(modelPath, {
    allowSymlinks: ser.allow_symlinks,
    ignorePaths,
    signaturePath: options.signaturePath,
  });

  const expected = new Map<string, Expected>();
  for (const resource of predicate.resources) {
    if (ser.method === "shards") {
      const shard = parseShardName(resource.name) as { path: string; start: number; end: number };
      const entry = expected.get(shard.path) ?? { shards: [] };
      entry.shards.push({ start: shard.start, end: shard.end, resource });
      expected.set(shard.path, entry);
    } else {
      expected.set(resource.name, { whole: resource, shards: [] });
    }
  }

  const local = new Map(enumeration.files.map((f) => [f.name, f]));
  const problems: ManifestProblem[] = [];
  const unsignedFiles: string[] = [];
  for (const file of enumeration.files) {
    if (expected.has(file.name)) continue;
    // Shard serialization omits empty files (spec 6.3.2), so an empty file has nothing to be listed under.
    if (ser.method === "shards" && file.size === 0) continue;
    if (options.ignoreUnsignedFiles) {
      unsignedFiles.push(file.name);
    } else {
      problems.push({
        code: "file_unsigned",
        file: file.name,
        message: `${file.name}: present in the model but not listed in the signed manifest`,
      });
    }
  }
  for (const name of expected.keys()) {
    if (local.has(name)) continue;
    const why = name === enumeration.signatureName
      ? " (this path is the signature file itself)"
      : isIgnored(name, ignorePaths)
      ? " (it lies under an ignored path)"
      : "";
    problems.push({
      code: "file_missing",
      file: name,
      message: `${name}: listed in the signed manifest but not found in the model${why}`,
    });
  }
  if (problems.length > 0) throw manifestError(problems);

  const resources: VerifiedResource[] = [];
  let bytesHashed = 0;
  const names = [...expected.keys()].sort(compareCodePoints);
  for (const name of names) {
    const want = expected.get(name)!;
    const file = local.get(name)!;
    if (want.whole) {
      const [digest] = await hashRanges(file.path, name, rangesFor(sizeOf(file)));
      bytesHashed += sizeOf(file);
      if (digest !== want.whole.digest) {
        problems.push({
          code: "digest_mismatch",
          file: name,
          message: `${name}: ${ser.hash_type} digest ${digest} does not match the signed ${want.whole.digest}`,
        });
      } else {
        resources.push({ ...want.whole, file: name });
      }
      continue;
    }
    const shards = want.shards.sort((a, b) => a.start - b.start);
    const grid = rangesFor(sizeOf(file), ser.shard_size);
    const sameGrid = grid.length === shards.length &&
      grid.every((r, i) => r.start === shards[i].start && r.end === shards[i].end);
    if (!sameGrid) {
      const signedEnd = shards.length ? shards[shards.length - 1].end : 0;
      problems.push({
        code: "digest_mismatch",
        file: name,
        message: `${name}: file is ${file.size} bytes but its signed shards ` +
          `(${shards.map((s) => `${s.start}:${s.end}`).join(", ")}) cover ${signedEnd} bytes`,
      });
      continue;
    }
    const digests = await hashRanges(file.path, name, grid);
    bytesHashed += sizeOf(file);
    shards.forEach((shard, i) => {
      if (digests[i] !== shard.resource.digest) {
        problems.push({
          code: "digest_mismatch",
          file: name,
          message: `${shard.resource.name}: ${ser.hash_type} digest of bytes ${shard.start}-${shard.end} is ` +
            `${digests[i]}, not the signed ${shard.resource.digest}`,
        });
      } else {
        resources.push({ ...shard.resource, file: name });
      }
    });
  }
  if (problems.length > 0) throw manifestError(problems);

  resources.sort((a, b) => compareCodePoints(a.name, b.name));
  return {
    root: enumeration.root,
    singleFile: enumeration.singleFile,
    signatureName: enumeration.signatureName,
    ignorePaths,
    resources,
    unsignedFiles,
    fileCount: expected.size,
    bytesHashed,
    warnings: enumeration.warnings,
  };
}

function isIgnored(name: string, ignorePaths: string[]): boolean {
  return new PathFilter(ignorePaths).excludedBy(name) !== null;
}

function manifestError(problems: ManifestProblem[]): OmsError {
  problems.sort((a, b) => compareCodePoints(a.file, b.file));
  const first = problems[0];
  const shown = problems.slice(0, 10).map((p) => p.message);
  if (problems.length > shown.length) shown.push(`... and ${problems.length - shown.length} more`);
  const message = problems.length === 1
    ? `model does not match its signature: ${first.message}`
    : `model does not match its signature (${problems.length} problems): ${shown.join("; ")}`;
  return new OmsError("manifest", first.code, message, { file: first.file, problems });
}
