// The deployment manifest: which models, in which package and version, each fleet should run. It is
// signed like a model package (OpenSSF Model Signing, `deployment.json.sig` beside it) and verified
// against the device's trust before anything in it is acted on.

import { join } from "node:path";
import { isModelName } from "../config.ts";
import { verifySigned } from "../packages/load.ts";

export const MANIFEST_NAME = "deployment.json";
export const SIGNATURE_NAME = `${MANIFEST_NAME}.sig`;
/** A manifest lists names and digests: far below this even for large fleets. */
export const MAX_MANIFEST_BYTES = 1024 * 1024;
const VERSION = /^[\x21-\x7e]{1,64}$/;
const SHA256 = /^[0-9a-f]{64}$/;
const PACKAGE = /^([A-Za-z0-9._-]+\/)*[A-Za-z0-9._-]+\.(tar\.gz|tgz)$/;

export interface DeploymentModel {
  name: string;
  /** The package's path relative to the manifest (a .tar.gz beside it or below it). */
  package: string;
  /** SHA-256 of the package file, lower-case hex. */
  sha256: string;
  /** Bytes of the package file. */
  size: number;
  /** At most 64 printable characters, as Edge Manager's ModelVersion. */
  version: string;
  /** "unloaded": the model must not be loaded on the fleet's devices, however it was loaded. */
  state: "loaded" | "unloaded";
}

export interface DeploymentManifest {
  /** Grows with every manifest published; a device refuses one older than the one it applied. */
  serial: number;
  fleets: Record<string, { models: DeploymentModel[] }>;
}

/** A manifest that cannot be used; `transient` when trying again later may succeed. */
export class DeploymentError extends Error {
  constructor(message: string, readonly transient = false) {
    super(message);
    this.name = "DeploymentError";
  }
}

/** Parses and checks a manifest, naming every problem. */
export function parseManifest(bytes: Uint8Array): DeploymentManifest {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new DeploymentError(`${MANIFEST_NAME} is not valid JSON: ${(error as Error).message}`);
  }
  const problems: string[] = [];
  const object = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);
  if (!object(raw)) throw new DeploymentError(`${MANIFEST_NAME} must be a JSON object`);
  for (const key of Object.keys(raw)) if (key !== "serial" && key !== "fleets") problems.push(`unknown key "${key}"`);
  if (!Number.isSafeInteger(raw.serial) || (raw.serial as number) < 1) {
    problems.push(`"serial" must be a whole number of at least 1, got ${JSON.stringify(raw.serial)}`);
  }
  const fleets: DeploymentManifest["fleets"] = {};
  if (!object(raw.fleets)) problems.push(`"fleets" must be an object of fleet names`);
  else {
    for (const [fleet, value] of Object.entries(raw.fleets)) {
      const at = `fleets.${fleet}`;
      if (!object(value) || !Array.isArray(value.models)) {
        problems.push(`"${at}" must be an object with a "models" list`);
        continue;
      }
      const seen = new Set<string>();
      fleets[fleet] = {
        models: value.models.flatMap((model, i) => {
          const checked = checkModel(model, `${at}.models[${i}]`, problems);
          if (checked && seen.has(checked.name)) problems.push(`"${at}" names model ${checked.name} twice`);
          if (checked) seen.add(checked.name);
          return checked ? [checked] : [];
        }),
      };
    }
  }
  if (problems.length > 0) throw new DeploymentError(`${MANIFEST_NAME}: ${problems.join("; ")}`);
  return { serial: raw.serial as number, fleets };
}

function checkModel(raw: unknown, at: string, problems: string[]): DeploymentModel | null {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    problems.push(`"${at}" must be an object`);
    return null;
  }
  const model = raw as Record<string, unknown>;
  const before = problems.length;
  const check = (key: string, ok: boolean, expected: string) => {
    if (!ok) problems.push(`"${at}.${key}" must be ${expected}, got ${JSON.stringify(model[key])}`);
  };
  for (const key of Object.keys(model)) {
    if (!["name", "package", "sha256", "size", "version", "state"].includes(key)) {
      problems.push(`"${at}" has unknown key "${key}"`);
    }
  }
  const text = (key: string) => typeof model[key] === "string" ? model[key] as string : "";
  check("name", isModelName(text("name")), "a model name");
  check(
    "package",
    PACKAGE.test(text("package")) && !text("package").split("/").some((p) => /^\.+$/.test(p)),
    "a relative path to a .tar.gz without . or .. components",
  );
  check("sha256", SHA256.test(text("sha256")), "64 lower-case hex digits");
  check("size", Number.isSafeInteger(model.size) && (model.size as number) > 0, "a positive whole number of bytes");
  check("version", VERSION.test(text("version")), "1-64 printable characters without spaces");
  check(
    "state",
    model.state === undefined || model.state === "loaded" || model.state === "unloaded",
    '"loaded" or "unloaded"',
  );
  if (problems.length > before) return null;
  return {
    name: text("name"),
    package: text("package"),
    sha256: text("sha256"),
    size: model.size as number,
    version: text("version"),
    state: (model.state as DeploymentModel["state"] | undefined) ?? "loaded",
  };
}

/** The models a fleet should run; a manifest that does not name the fleet is refused, not taken as "none". */
export function modelsFor(manifest: DeploymentManifest, fleet: string): DeploymentModel[] {
  const entry = Object.hasOwn(manifest.fleets, fleet) ? manifest.fleets[fleet] : undefined;
  if (!entry) {
    throw new DeploymentError(
      `${MANIFEST_NAME} (serial ${manifest.serial}) does not name fleet "${fleet}" (it names ${
        Object.keys(manifest.fleets).join(", ") || "none"
      })`,
    );
  }
  return entry.models;
}

export interface Trust {
  rootCertsPath: string | null;
  trustedKeysPath: string | null;
}

/**
 * Verifies `<folder>/deployment.json` with `<folder>/deployment.json.sig` as a signed single-file
 * package, then parses it. What is parsed is the bytes that were verified.
 */
export async function verifyManifest(
  folder: string,
  trust: Trust,
): Promise<{ manifest: DeploymentManifest; bytes: Uint8Array }> {
  const path = join(folder, MANIFEST_NAME);
  const bytes = await Deno.readFile(path);
  try {
    await verifySigned(`deployment manifest ${MANIFEST_NAME}`, path, trust, new Map([[MANIFEST_NAME, bytes]]));
  } catch (error) {
    throw new DeploymentError((error as Error).message);
  }
  return { manifest: parseManifest(bytes), bytes };
}
