// Where a LoadModel url leads, and whether it may load: the one seam through which model bytes enter
// the agent. A package is a folder (model files, `model.sig`, optional `edge-model.json`) or a
// `.tar.gz` of one; it loads only when its OpenSSF Model Signing signature verifies against the
// device's trust. The agent reads the model bytes itself and checks them against the signed digest
// before handing them (never a path) to ONNX Runtime, so what was verified is exactly what is loaded.

import { basename, isAbsolute, join, normalize, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { AgentError, failedPrecondition, invalidArgument, notFound, permissionDenied } from "../errors.ts";
// Archives and signatures (tar-stream, @peculiar/x509) load at the first package that needs them:
// an agent that has not loaded a model yet does not hold them in memory.
import type { ArchiveLimits } from "./archive.ts";
import type { OmsTrust, VerificationResult } from "./oms/mod.ts";
import { DEFAULT_SIGNATURE_NAME } from "./oms/paths.ts";

export interface PackageOptions {
  /** Folders packages may come from (edge_agent_model_roots). */
  roots: string[];
  /** Archives are extracted under `<stateDir>/packages/`. */
  stateDir: string;
  /** sagemaker_edge_core_root_certs_path: a PEM file or a folder of them. */
  rootCertsPath: string | null;
  /** edge_agent_trusted_model_keys: a folder of PEM public keys. */
  trustedKeysPath: string | null;
  /** Development only: plain .onnx files and unsigned folders load too. */
  allowUnsigned: boolean;
  archiveLimits?: Partial<ArchiveLimits>;
}

/** edge-model.json, signed like every other file of the package. */
export interface PackageManifest {
  name?: string;
  version?: string;
  framework?: string;
  model?: string;
  target_arch?: string | string[];
}

export interface ModelPackage {
  /** Real path of the model file. */
  path: string;
  bytes: Uint8Array;
  /** null when loaded unsigned (edge_agent_allow_unsigned_models). */
  verification: VerificationResult | null;
  manifest: PackageManifest | null;
}

const ARCHIVE = /\.(tar\.gz|tgz)$/;
const MANIFEST_FILE = "edge-model.json";

/** Resolves, verifies and reads the package `url` names. Every failure is an AgentError. */
export async function openPackage(url: string, options: PackageOptions): Promise<ModelPackage> {
  const requested = localPath(url);
  checkUnderRoots(requested, url, options.roots);
  const path = await osCall(url, () => Deno.realPath(requested));
  checkUnderRoots(path, url, options.roots);
  const info = await osCall(url, () => Deno.stat(path));
  if (info.isFile && ARCHIVE.test(path)) return await openArchive(url, path, options);
  return await openLocal(url, path, info.isDirectory, options);
}

/** Extracts into the state folder, verifies and reads, then removes the extracted copy. */
async function openArchive(url: string, archive: string, options: PackageOptions): Promise<ModelPackage> {
  const destination = join(options.stateDir, "packages", crypto.randomUUID());
  let extracted: string | null = null;
  try {
    const { extractPackage } = await import("./archive.ts");
    try {
      extracted =
        (await extractPackage(archive, { stateDir: options.stateDir, destination, limits: options.archiveLimits }))
          .path;
    } catch (error) {
      throw failedPrecondition(`package ${url} cannot be unpacked: ${(error as Error).message}`);
    }
    return await openLocal(url, extracted, true, options);
  } finally {
    if (extracted) await Deno.remove(extracted, { recursive: true }).catch(() => {});
  }
}

async function openLocal(url: string, path: string, isFolder: boolean, options: PackageOptions): Promise<ModelPackage> {
  const folder = isFolder ? path : null;
  const signature = folder ? join(folder, DEFAULT_SIGNATURE_NAME) : `${path}.sig`;
  const signed = await Deno.stat(signature).then(() => true, () => false);
  if (!signed && !options.allowUnsigned) {
    throw failedPrecondition(
      `model ${url} is not signed: ${signature} is missing (sign it with "edge-agent package sign", or allow ` +
        `unsigned models for development with edge_agent_allow_unsigned_models)`,
    );
  }
  // edge-model.json only chooses which file to read here; it is acted on once verified with the rest.
  const manifestText = folder ? await Deno.readTextFile(join(folder, MANIFEST_FILE)).catch(() => null) : null;
  const manifest = manifestText === null ? null : parseManifest(url, manifestText);
  const modelFile = folder ? await modelFileIn(url, folder, manifest) : path;
  const bytes = await osCall(url, () => Deno.readFile(modelFile));
  let verification: VerificationResult | null = null;
  if (signed) {
    // The model is hashed from the bytes just read, which are the bytes ONNX Runtime gets.
    const name = folder ? relative(folder, modelFile) : basename(modelFile);
    verification = await verify(url, path, options, new Map([[name, bytes]]));
  }
  if (manifest) checkArch(url, manifest);
  return { path: modelFile, bytes, verification, manifest };
}

/** Trust is read at every load, so roots or keys added on the device apply without a restart. */
async function verify(
  url: string,
  path: string,
  options: PackageOptions,
  preloaded: Map<string, Uint8Array>,
): Promise<VerificationResult> {
  return await verifySigned(`model ${url}`, path, options, preloaded);
}

/**
 * Verifies a signed folder or file (`<file>.sig`) against the device's trust exactly as packages are
 * verified; `what` names it in the FAILED_PRECONDITION a refusal becomes.
 */
export async function verifySigned(
  what: string,
  path: string,
  options: Pick<PackageOptions, "rootCertsPath" | "trustedKeysPath">,
  preloaded: Map<string, Uint8Array>,
): Promise<VerificationResult> {
  const { verifyModel, OmsError } = await import("./oms/mod.ts");
  const trust = await readTrust(options);
  try {
    return await verifyModel({ modelPath: path, trust, preloaded });
  } catch (error) {
    if (error instanceof OmsError) throw failedPrecondition(`${what} failed verification: ${error.message}`);
    throw error;
  }
}

async function readTrust(options: Pick<PackageOptions, "rootCertsPath" | "trustedKeysPath">): Promise<OmsTrust> {
  const roots = options.rootCertsPath
    ? await pemFiles(options.rootCertsPath, "sagemaker_edge_core_root_certs_path")
    : [];
  const keys = options.trustedKeysPath ? await pemFiles(options.trustedKeysPath, "edge_agent_trusted_model_keys") : [];
  if (roots.length === 0 && keys.length === 0) {
    throw failedPrecondition(
      "no trusted roots or keys: set sagemaker_edge_core_root_certs_path (certificates) or edge_agent_trusted_model_keys",
    );
  }
  // The same material gives the same trust object, so verified signatures can be reused.
  const identity = JSON.stringify([roots, keys]);
  if (cachedTrust?.identity !== identity) {
    const { loadTrust } = await import("./oms/mod.ts");
    try {
      cachedTrust = { identity, trust: await loadTrust({ trustedRootsPem: roots, trustedKeysPem: keys }) };
    } catch (error) {
      throw failedPrecondition(`the device's trust material is unusable: ${(error as Error).message}`);
    }
  }
  return cachedTrust.trust;
}

let cachedTrust: { identity: string; trust: OmsTrust } | null = null;

/** The PEM text of a file, or of every .pem/.crt/.cert file in a folder. */
export async function readPemFiles(path: string): Promise<string[]> {
  const info = await Deno.stat(path);
  if (!info.isDirectory) return [await Deno.readTextFile(path)];
  const names = (await Array.fromAsync(Deno.readDir(path)))
    .filter((e) => e.isFile && /\.(pem|crt|cert)$/.test(e.name))
    .map((e) => e.name)
    .sort();
  return await Promise.all(names.map((name) => Deno.readTextFile(join(path, name))));
}

async function pemFiles(path: string, key: string): Promise<string[]> {
  return await readPemFiles(path).catch((error) => {
    throw failedPrecondition(`${key} ${path} cannot be read: ${error.message}`);
  });
}

function parseManifest(url: string, text: string): PackageManifest {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw failedPrecondition(`package ${url}: ${MANIFEST_FILE} is not valid JSON: ${(error as Error).message}`);
  }
}

function checkArch(url: string, manifest: PackageManifest): void {
  if (manifest.framework !== undefined && manifest.framework !== "onnx") {
    throw failedPrecondition(`package ${url}: framework "${manifest.framework}" is not supported (only "onnx")`);
  }
  const arch = manifest.target_arch ?? "any";
  const arches = Array.isArray(arch) ? arch : [arch];
  if (!arches.includes("any") && !arches.includes(Deno.build.arch)) {
    throw failedPrecondition(
      `model is not compiled for this machine: package ${url} is for ${
        arches.join(", ")
      }, this machine is ${Deno.build.arch}`,
    );
  }
}

async function modelFileIn(url: string, folder: string, manifest: PackageManifest | null): Promise<string> {
  if (manifest?.model) {
    const file = normalize(join(folder, manifest.model));
    if (!file.startsWith(folder + "/")) {
      throw failedPrecondition(`package ${url}: model "${manifest.model}" is outside it`);
    }
    return file;
  }
  const entries = await osCall(url, () => Array.fromAsync(Deno.readDir(folder)));
  const models = entries.filter((e) => e.isFile && e.name.endsWith(".onnx")).map((e) => e.name);
  if (models.length === 0) throw notFound(`folder ${folder} holds no .onnx model`);
  if (models.length > 1) {
    throw invalidArgument(
      `folder ${folder} holds ${models.length} .onnx files (${models.sort().join(", ")}): name one in ${MANIFEST_FILE}`,
    );
  }
  return join(folder, models[0]);
}

function localPath(url: string): string {
  if (url === "") throw invalidArgument("url is empty: name a model package (folder or .tar.gz)");
  let path = url;
  if (url.startsWith("file:")) {
    try {
      path = fileURLToPath(url);
    } catch (error) {
      throw invalidArgument(`url ${url} is not a valid file URL: ${(error as Error).message}`);
    }
  } else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url)) {
    throw invalidArgument(`url ${url}: only local paths and file:// URLs are supported`);
  }
  if (!isAbsolute(path)) throw invalidArgument(`url ${url} must be an absolute path`);
  return normalize(path);
}

function checkUnderRoots(path: string, url: string, roots: string[]): void {
  const inside = roots.some((root) => {
    const r = normalize(root).replace(/\/+$/, "");
    return path === r || path.startsWith(r + "/");
  });
  if (!inside) {
    throw permissionDenied(`url ${url} is outside the model roots (${roots.join(", ") || "none configured"})`);
  }
}

/** Runs a file-system call, mapping OS and permission errors to statuses naming the url. */
async function osCall<T>(url: string, call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (error) {
    if (error instanceof AgentError) throw error;
    if (error instanceof Deno.errors.NotFound) throw notFound(`model ${url} does not exist`);
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      throw permissionDenied(`model ${url} cannot be read by the agent: ${(error as Error).message}`);
    }
    throw invalidArgument(`model ${url} cannot be read: ${(error as Error).message}`);
  }
}
