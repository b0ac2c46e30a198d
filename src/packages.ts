// Where a LoadModel url leads: the one seam through which model bytes enter the agent.
// The agent reads the bytes itself (under Deno's permissions) and hands ONNX Runtime the bytes,
// never a path, so what was checked is exactly what is loaded.

import { isAbsolute, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { AgentError, invalidArgument, notFound, permissionDenied } from "./errors.ts";

export interface ModelFile {
  /** Real path of the model file. */
  path: string;
  bytes: Uint8Array;
}

/** Resolves `url` (an absolute path or file:// URL, to a .onnx file or a folder holding one) and reads it. */
export async function readModel(url: string, roots: string[]): Promise<ModelFile> {
  const requested = localPath(url);
  checkUnderRoots(requested, url, roots);
  const path = await osCall(url, () => Deno.realPath(requested));
  checkUnderRoots(path, url, roots);
  const info = await osCall(url, () => Deno.stat(path));
  const file = info.isDirectory ? await singleModelIn(path, url) : path;
  const bytes = await osCall(url, () => Deno.readFile(file));
  return { path: file, bytes };
}

function localPath(url: string): string {
  if (url === "") throw invalidArgument("url is empty: name a model file or folder");
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

async function singleModelIn(folder: string, url: string): Promise<string> {
  const entries = await osCall(url, () => Array.fromAsync(Deno.readDir(folder)));
  const models = entries.filter((e) => e.isFile && e.name.endsWith(".onnx")).map((e) => e.name);
  if (models.length === 0) throw notFound(`folder ${folder} holds no .onnx model`);
  if (models.length > 1) {
    throw invalidArgument(
      `folder ${folder} holds ${models.length} .onnx files (${models.sort().join(", ")}): name one`,
    );
  }
  return `${folder}/${models[0]}`;
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
