// Builds one self-contained executable per architecture with `deno compile`, ONNX Runtime's
// library embedded and the permission flags of a deployment profile baked in; with --release, a
// tarball per target with the executable, a systemd unit, an example config, the profile and
// SHA256SUMS, and a Debian package per target (src/deb.ts).
//
//   deno task build [--target x86_64-unknown-linux-gnu|aarch64-unknown-linux-gnu|all]
//                   [--profile deploy/profile.json] [--out dist] [--release] [--dry-run]
//                   [--denort <target>=<denort binary>]... [--deno-dir <prepared Deno cache>]
//
// deno compile needs Deno's runtime (denort) for each target. It downloads it into its cache
// (<DENO_DIR>/dl/release/v<version>/denort-<target>.zip) unless it is there already, so an air-gapped
// build host either pre-fills such a cache (--deno-dir) or names an extracted denort binary per target
// (--denort; passed to deno compile as DENORT_BIN, which it uses as-is for any target).

import { basename, dirname, join, relative, resolve } from "node:path";
import { parseArgs } from "node:util";
import { DebError, DEBIAN_ARCHITECTURES, debPackage } from "./src/deb.ts";
import { StartupError } from "./src/errors.ts";
import { parseProfile, type Profile, profileFlags } from "./src/permissions.ts";
import { digestFile, type FileDigest } from "./src/file_digest.ts";
import { npmLibraryPath } from "./src/inference/runtime.ts";

export const TARGETS = {
  "x86_64-unknown-linux-gnu": "x86_64",
  "aarch64-unknown-linux-gnu": "aarch64",
} as const;
export type Target = keyof typeof TARGETS;

const ROOT = new URL(".", import.meta.url).pathname;

export interface BuildPlan {
  target: Target;
  output: string;
  /** Environment for deno compile (DENORT_BIN or DENO_DIR), empty to let it use its cache. */
  env: Record<string, string>;
  args: string[];
}

export class BuildError extends Error {}

/** Where denort for `target` comes from, checked against this Deno's version. */
export async function runtimeSource(
  target: Target,
  denort: Map<string, string>,
  denoDir: string | null,
  version = Deno.version.deno,
): Promise<Record<string, string>> {
  const given = denort.get(target);
  if (given) {
    const bytes = await Deno.readFile(given).catch((e) => {
      throw new BuildError(`--denort ${target}=${given}: cannot be read (${e.message})`);
    });
    if (!containsAscii(bytes, `Deno/${version}`)) {
      throw new BuildError(`--denort ${target}=${given}: not a denort of Deno ${version} (this deno is ${version})`);
    }
    return { DENORT_BIN: resolve(given) };
  }
  const cache = denoDir ?? Deno.env.get("DENO_DIR") ?? join(Deno.env.get("HOME") ?? "/root", ".cache", "deno");
  const zip = join(cache, "dl", "release", `v${version}`, `denort-${target}.zip`);
  if (await Deno.stat(zip).then(() => true, () => false)) return denoDir ? { DENO_DIR: resolve(denoDir) } : {};
  throw new BuildError(
    `no Deno runtime for ${target}: deno compile would download denort-${target}.zip for v${version} from Deno's ` +
      `releases. Offline, pass --denort ${target}=<extracted denort binary of v${version}>, or a Deno cache ` +
      `holding dl/release/v${version}/denort-${target}.zip with --deno-dir <dir>.`,
  );
}

function containsAscii(haystack: Uint8Array, needle: string): boolean {
  const bytes = new TextEncoder().encode(needle);
  outer: for (let i = haystack.indexOf(bytes[0]); i >= 0 && i <= haystack.length - bytes.length;) {
    for (let j = 1; j < bytes.length; j++) {
      if (haystack[i + j] !== bytes[j]) {
        i = haystack.indexOf(bytes[0], i + 1);
        continue outer;
      }
    }
    return true;
  }
  return false;
}

export const COMPILE_CONFIG = join(ROOT, "deploy", "deno.compile.json");

/**
 * Imports of the executable's module graph that its compile config cannot resolve. deno compile
 * embeds such a graph without complaint, and the executable then fails at start-up, so the build
 * checks first.
 */
export async function unresolvedImports(config = COMPILE_CONFIG): Promise<string[]> {
  const info = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", "--config", config, join(ROOT, "main.ts")],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!info.success) throw new BuildError(`deno info failed: ${new TextDecoder().decode(info.stderr)}`);
  const graph = JSON.parse(new TextDecoder().decode(info.stdout)) as {
    modules: { specifier: string; error?: string; dependencies?: { code?: { error?: string } }[] }[];
  };
  const problems = new Set<string>();
  for (const module of graph.modules) {
    if (module.error) problems.add(module.error);
    for (const dependency of module.dependencies ?? []) {
      if (dependency.code?.error) problems.add(dependency.code.error);
    }
  }
  return [...problems];
}

/** Where the entry module of the executable written to `output` goes. */
export function entryPath(output: string): string {
  return join(ROOT, ".build", `${basename(output)}.ts`);
}

/**
 * The executable's entry module: main.ts's command line with the deployment's socket and config as
 * the defaults, so `edge-agent serve` and `edge-agent client list` need no flags on the device, and
 * the SHA-256 and size of the ONNX Runtime library it embeds, so that a start need not hash it
 * (without them, it does).
 */
export async function writeEntry(profile: Profile, path: string, library?: FileDigest): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true });
  const specifier = (file: string) => {
    const from = relative(dirname(path), join(ROOT, file));
    return JSON.stringify(from.startsWith(".") ? from : `./${from}`);
  };
  const defaults = { socket: profile.socket, config: profile.config };
  const lines = [
    `// Written by build.ts: the command line with this deployment's defaults, and the library it embeds.`,
    `import { main } from ${specifier("main.ts")};`,
  ];
  if (library) {
    lines.push(
      `import { declareEmbeddedLibrary } from ${specifier("src/inference/runtime.ts")};`,
      "",
      `declareEmbeddedLibrary(${JSON.stringify({ sha256: library.sha256, size: library.size })});`,
    );
  }
  lines.push(`await main(Deno.args, ${JSON.stringify(defaults)});`);
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
}

/** The deno compile command for one target. */
export function compileArgs(target: Target, profile: Profile, output: string): string[] {
  return [
    "compile",
    // deno compile embeds every npm package the config maps, so the executable builds with a config
    // mapping only what it imports, not the project's (test fixtures, grpc-js, the benchmark's
    // reference runtime, every platform's ORT). Types are checked by `deno task check`.
    "--config",
    COMPILE_CONFIG,
    "--no-check",
    "--target",
    target,
    "--output",
    output,
    "--include",
    npmLibraryPath(TARGETS[target]),
    ...profileFlags(profile),
    entryPath(output),
  ];
}

export async function readProfile(path: string): Promise<Profile> {
  let raw: unknown;
  try {
    raw = JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new BuildError(`profile ${path}: ${(error as Error).message}`);
  }
  return parseProfile(raw, `profile ${path}`);
}

/** dist/edge-agent-<version>-<target>.tar.gz holding the executable, unit, tmpfiles line, config, profile, SHA256SUMS. */
export async function release(plan: BuildPlan, profilePath: string, version: string, out: string): Promise<string> {
  const name = `edge-agent-${version}-${plan.target}`;
  const staging = join(out, "release");
  const folder = join(staging, name);
  await Deno.remove(folder, { recursive: true }).catch(() => {});
  await Deno.mkdir(folder, { recursive: true });
  const files: [string, string][] = [
    [plan.output, "edge-agent"],
    [join(ROOT, "deploy", "edge-agent.service"), "edge-agent.service"],
    [join(ROOT, "deploy", "edge-agent.tmpfiles.conf"), "edge-agent.tmpfiles.conf"],
    [join(ROOT, "deploy", "config.example.json"), "config.example.json"],
    [profilePath, "profile.json"],
  ];
  const sums: string[] = [];
  for (const [from, to] of files) {
    await Deno.copyFile(from, join(folder, to));
    sums.push(`${(await digestFile(join(folder, to))).sha256}  ${to}`);
  }
  await Deno.writeTextFile(join(folder, "SHA256SUMS"), sums.join("\n") + "\n");
  const tarball = join(out, `${name}.tar.gz`);
  const tar = await new Deno.Command("tar", { args: ["-czf", tarball, "-C", staging, name] }).output();
  if (!tar.success) throw new BuildError(`tar failed: ${new TextDecoder().decode(tar.stderr)}`);
  return tarball;
}

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      target: { type: "string", default: Deno.build.target },
      profile: { type: "string", default: join(ROOT, "deploy", "profile.json") },
      out: { type: "string", default: join(ROOT, "dist") },
      denort: { type: "string", multiple: true, default: [] },
      "deno-dir": { type: "string" },
      release: { type: "boolean", default: false },
      "dry-run": { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const targets = values.target === "all" ? Object.keys(TARGETS) as Target[] : [values.target as Target];
  for (const target of targets) {
    if (!(target in TARGETS)) throw new BuildError(`--target ${target}: use ${Object.keys(TARGETS).join(", ")} or all`);
  }
  const denort = new Map<string, string>();
  for (const entry of values.denort) {
    const [target, path] = entry.split("=", 2);
    if (!(target in TARGETS) || !path) throw new BuildError(`--denort ${entry}: expected <target>=<path>`);
    denort.set(target, path);
  }
  const profile = await readProfile(values.profile);
  const { version } = JSON.parse(await Deno.readTextFile(join(ROOT, "deno.json")));
  const plans: BuildPlan[] = [];
  for (const target of targets) {
    const output = join(values.out, `edge-agent-${version}-${target}`);
    const env = values["dry-run"]
      ? Object.fromEntries(denort.has(target) ? [["DENORT_BIN", resolve(denort.get(target)!)]] : [])
      : await runtimeSource(target, denort, values["deno-dir"] ?? null);
    plans.push({ target, output, env, args: compileArgs(target, profile, output) });
  }
  if (!values["dry-run"]) {
    const unresolved = await unresolvedImports();
    if (unresolved.length > 0) {
      throw new BuildError(
        `${COMPILE_CONFIG} does not map every package the executable imports:\n${
          unresolved.map((p) => `  ${p}`).join("\n")
        }`,
      );
    }
  }
  for (const plan of plans) {
    const env = Object.entries(plan.env).map(([k, v]) => `${k}=${v} `).join("");
    console.log(`${env}deno ${plan.args.map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(" ")}`);
    if (values["dry-run"]) continue;
    await Deno.mkdir(values.out, { recursive: true });
    await writeEntry(profile, entryPath(plan.output), await digestFile(npmLibraryPath(TARGETS[plan.target])));
    const compiled = await new Deno.Command(Deno.execPath(), { args: plan.args, env: plan.env }).spawn().status;
    if (!compiled.success) throw new BuildError(`deno compile for ${plan.target} failed (exit ${compiled.code})`);
    const size = (await Deno.stat(plan.output)).size;
    console.log(`${basename(plan.output)}: ${(size / 2 ** 20).toFixed(1)} MiB`);
    if (values.release) {
      console.log(`release: ${await release(plan, values.profile, version, values.out)}`);
      const architecture = DEBIAN_ARCHITECTURES[plan.target];
      console.log(`release: ${await debPackage({ executable: plan.output, architecture, version, out: values.out })}`);
    }
  }
}

if (import.meta.main) {
  try {
    await main(Deno.args);
  } catch (error) {
    if (
      error instanceof BuildError || error instanceof DebError || error instanceof StartupError ||
      error instanceof TypeError
    ) {
      console.error(`build: ${error.message}`);
      Deno.exit(2);
    }
    throw error;
  }
}
