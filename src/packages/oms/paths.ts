// Relative-path rules of spec 6.1.2 (canonical resource names) and 6.2 (ignore paths and their matching).

/** Excluded by default, matched as top-level components of the model root only (spec 6.2.1). */
export const DEFAULT_IGNORE_PATHS: readonly string[] = [".git", ".gitignore", ".gitattributes", ".github"];

/** Name of the detached signature when the caller names none (spec 6.2 / 9). */
export const DEFAULT_SIGNATURE_NAME = "model.sig";

/**
 * Canonical form of a model-relative path (spec 6.1.2): `/` separators, no empty or `.` components, no
 * trailing `/`. Returns the reason as an Error for what cannot be made canonical (absolute paths, `..`).
 */
export function canonicalizeRelativePath(path: string): string | Error {
  if (path.length === 0) return new Error("path is empty");
  if (path.includes("\0")) return new Error("path contains a NUL character");
  if (path.startsWith("/")) return new Error("path is absolute (starts with /)");
  const parts: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") return new Error("path contains a `..` component");
    parts.push(part);
  }
  if (parts.length === 0) return new Error("path names the model root itself");
  return parts.join("/");
}

/** Null when `path` is already canonical, else why not (resource names must be, spec 6.1.2). */
export function canonicalPathProblem(path: string): string | null {
  const canonical = canonicalizeRelativePath(path);
  if (canonical instanceof Error) return canonical.message;
  if (canonical !== path) return `path is not canonical (canonical form: "${canonical}")`;
  return null;
}

/**
 * Validates one user or predicate ignore entry (spec 6.2.1: no glob characters, no leading `/`, no `..`) and
 * returns its canonical form.
 */
export function canonicalIgnorePath(entry: string): string | Error {
  if (/[*?[]/.test(entry)) return new Error("ignore path contains a glob character (*, ? or [)");
  return canonicalizeRelativePath(entry);
}

/**
 * The exclusion rules for one enumeration: defaults by top-level component, explicit entries as exact paths
 * with their subtree, plus exact files (the signature itself).
 */
export class PathFilter {
  readonly #paths: Set<string>;
  readonly #files: Set<string>;

  constructor(ignorePaths: Iterable<string>, excludedFiles: Iterable<string> = []) {
    this.#paths = new Set(ignorePaths);
    this.#files = new Set(excludedFiles);
  }

  /** The rule that excludes `rel`, or null when it is in scope. */
  excludedBy(rel: string): string | null {
    if (this.#files.has(rel)) return rel;
    const top = rel.split("/", 1)[0];
    if (DEFAULT_IGNORE_PATHS.includes(top)) return top;
    if (this.#paths.has(rel)) return rel;
    for (let i = rel.indexOf("/"); i !== -1; i = rel.indexOf("/", i + 1)) {
      const prefix = rel.slice(0, i);
      if (this.#paths.has(prefix)) return prefix;
    }
    return null;
  }
}

/** Splits a shard resource name `<path>:<start>:<end>` by its last two colons (spec 6.3.2). */
export function parseShardName(name: string): { path: string; start: number; end: number } | Error {
  const m = /^(.+):(0|[1-9][0-9]*):(0|[1-9][0-9]*)$/s.exec(name);
  if (!m) return new Error("shard name is not <path>:<start>:<end> with decimal offsets");
  const start = Number(m[2]);
  const end = Number(m[3]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end)) return new Error("shard offsets are too large");
  if (end <= start) return new Error("shard end offset is not after its start");
  return { path: m[1], start, end };
}
