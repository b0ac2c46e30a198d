// The publisher's side of signed packages, for the command line: development trust, signing,
// packing and verifying. Run on a workstation or build host (`deno task trust` / `deno task package`);
// the device's executable only serves.

import { digestFile } from "../file_digest.ts";
import { basename, join } from "node:path";
import { MANIFEST_NAME, parseManifest, SIGNATURE_NAME } from "../deployments/manifest.ts";
import { extractPackage, packFolder } from "./archive.ts";
import { readPemFiles } from "./load.ts";
import {
  formatVerificationResult,
  generateDevelopmentTrust,
  loadTrust,
  OmsError,
  signModel,
  verifyModel,
} from "./oms/mod.ts";

/** A mistake of the user's (bad argument, failed verification): printed without a stack. */
export class CommandError extends Error {}

/** Writes a development root, intermediate and code-signing leaf into `out`. */
export async function trustInit(out: string): Promise<string> {
  const trust = await generateDevelopmentTrust();
  await Deno.mkdir(out, { recursive: true });
  const files: [string, string, number][] = [
    ["root.pem", trust.root.certificatePem, 0o644],
    ["intermediate.pem", trust.intermediate.certificatePem, 0o644],
    ["signing-chain.pem", trust.chainPem, 0o644],
    ["signing-key.pem", trust.leaf.privateKeyPem, 0o600],
  ];
  for (const [name, text, mode] of files) {
    await Deno.writeTextFile(join(out, name), text, { mode, createNew: true }).catch((error) => {
      throw new CommandError(`${join(out, name)}: ${error.message}`);
    });
  }
  return [
    `Development trust written to ${out} (FOR DEVELOPMENT ONLY: every certificate says so).`,
    `  device:  copy root.pem into the folder named by sagemaker_edge_core_root_certs_path`,
    `  signing: --key ${join(out, "signing-key.pem")} --cert-chain ${join(out, "signing-chain.pem")}`,
  ].join("\n");
}

export interface SignArguments {
  folder: string;
  key: string;
  certChain?: string;
  name?: string;
  version?: string;
  arch?: string;
}

/** Signs a package folder (model.sig), writing edge-model.json first when name, version or arch is given. */
export async function packageSign(args: SignArguments): Promise<string> {
  const privateKeyPem = await readText(args.key, "--key");
  const certificateChainPem = args.certChain ? await readText(args.certChain, "--cert-chain") : undefined;
  if (args.name || args.version || args.arch) {
    const models = (await Array.fromAsync(Deno.readDir(args.folder))).filter((e) =>
      e.isFile && e.name.endsWith(".onnx")
    );
    if (models.length !== 1) {
      throw new CommandError(`${args.folder}: edge-model.json needs exactly one .onnx file, found ${models.length}`);
    }
    if (args.arch && !["x86_64", "aarch64", "any"].includes(args.arch)) {
      throw new CommandError(`--arch ${args.arch}: use x86_64, aarch64 or any`);
    }
    const manifest = {
      name: args.name ?? basename(args.folder),
      version: args.version ?? "1",
      framework: "onnx",
      model: models[0].name,
      // Built for this machine unless told otherwise: a package is signed for where it was tested.
      target_arch: args.arch ?? Deno.build.arch,
    };
    await Deno.writeTextFile(join(args.folder, "edge-model.json"), JSON.stringify(manifest, null, 2) + "\n");
  }
  try {
    const result = await signModel({ modelPath: args.folder, privateKeyPem, certificateChainPem });
    return `signed ${args.folder} (${result.method} method): ${result.signaturePath}`;
  } catch (error) {
    throw new CommandError(`cannot sign ${args.folder}: ${(error as Error).message}`);
  }
}

/** Packs a signed folder as the .tar.gz LoadModel accepts. */
export async function packagePack(folder: string, out: string): Promise<string> {
  const { files, bytes } = await packFolder(folder, out).catch((error) => {
    throw new CommandError(`cannot pack ${folder}: ${error.message}`);
  });
  return `packed ${files} files (${bytes} bytes) from ${folder} into ${out}`;
}

export interface VerifyArguments {
  target: string;
  roots?: string;
  publicKey?: string;
}

/** Verifies a folder or .tar.gz as the agent would; returns what was checked. */
export async function packageVerify(args: VerifyArguments): Promise<string> {
  if (!args.roots && !args.publicKey) {
    throw new CommandError("name the trust: --roots <pem or folder> or --public-key <pem>");
  }
  const trust = await loadTrust({
    trustedRootsPem: args.roots
      ? await readPemFiles(args.roots).catch((error) => {
        throw new CommandError(`--roots ${args.roots}: ${error.message}`);
      })
      : [],
    trustedKeysPem: args.publicKey ? [await readText(args.publicKey, "--public-key")] : [],
  }).catch((error) => {
    throw new CommandError(error.message);
  });
  let folder = args.target;
  let scratch: string | null = null;
  try {
    if (/\.(tar\.gz|tgz)$/.test(args.target)) {
      scratch = await Deno.makeTempDir({ prefix: "edge-agent-verify-" });
      folder = (await extractPackage(args.target, { stateDir: scratch, destination: "package" }).catch((error) => {
        throw new CommandError(`cannot unpack ${args.target}: ${error.message}`);
      })).path;
    }
    const result = await verifyModel({ modelPath: folder, trust }).catch((error) => {
      if (error instanceof OmsError) throw new CommandError(`${args.target}: verification failed: ${error.message}`);
      throw error;
    });
    return `${args.target}: verified\n${formatVerificationResult(result)}`;
  } finally {
    if (scratch) await Deno.remove(scratch, { recursive: true });
  }
}

export interface DeploymentArguments {
  folder: string;
  key: string;
  certChain?: string;
}

/**
 * Completes `<folder>/deployment.json` (each package's sha256 and size from the file it names, the
 * serial raised by one), checks it as a device will, and signs it: `deployment.json.sig`.
 */
export async function packageDeployment(args: DeploymentArguments): Promise<string> {
  const path = join(args.folder, MANIFEST_NAME);
  let raw;
  try {
    raw = JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new CommandError(`${path}: ${(error as Error).message}`);
  }
  const lines: string[] = [];
  for (const [fleet, entry] of Object.entries<{ models?: Record<string, unknown>[] }>(raw?.fleets ?? {})) {
    for (const model of entry?.models ?? []) {
      if (typeof model?.package !== "string") continue; // the check below names it
      const file = join(args.folder, model.package);
      let digest;
      try {
        digest = await digestFile(file);
      } catch (error) {
        throw new CommandError(`${path}: fleet ${fleet}, model ${model.name}: ${file}: ${(error as Error).message}`);
      }
      const { size } = digest;
      model.sha256 = digest.sha256;
      model.size = size;
      lines.push(
        `  ${fleet}: ${model.name} ${model.version} ${model.state ?? "loaded"} ${model.package} (${size} bytes)`,
      );
    }
  }
  if (raw !== null && typeof raw === "object") raw.serial = (Number.isSafeInteger(raw.serial) ? raw.serial : 0) + 1;
  const text = JSON.stringify(raw, null, 2) + "\n";
  try {
    parseManifest(new TextEncoder().encode(text));
  } catch (error) {
    throw new CommandError((error as Error).message);
  }
  await Deno.writeTextFile(path, text);
  const privateKeyPem = await readText(args.key, "--key");
  const certificateChainPem = args.certChain ? await readText(args.certChain, "--cert-chain") : undefined;
  try {
    await signModel({ modelPath: path, privateKeyPem, certificateChainPem });
  } catch (error) {
    throw new CommandError(`cannot sign ${path}: ${(error as Error).message}`);
  }
  return [`signed ${path} (serial ${raw.serial}) into ${join(args.folder, SIGNATURE_NAME)}:`, ...lines].join("\n");
}

async function readText(path: string, flag: string): Promise<string> {
  return await Deno.readTextFile(path).catch((error) => {
    throw new CommandError(`${flag} ${path}: ${error.message}`);
  });
}
