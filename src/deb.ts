// The Debian package of a compiled agent, built with Debian's own dpkg-deb from the templates in
// deploy/debian/: the executable as /usr/bin/edge-agent, the systemd unit, a sysusers.d entry for
// the user and group edge-agent, /etc/edge-agent/config.json as a conffile, /etc/edge-agent/trust,
// a man page, copyright and changelog, and maintainer scripts that create the state and model
// folders and handle the service.

import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { gzipSync } from "node:zlib";

const DEPLOY = new URL("../deploy/", import.meta.url).pathname;
const TEMPLATES = join(DEPLOY, "debian");

/** Debian's name for each build target's architecture. */
export const DEBIAN_ARCHITECTURES = {
  "x86_64-unknown-linux-gnu": "amd64",
  "aarch64-unknown-linux-gnu": "arm64",
} as const;
export type DebianArchitecture = typeof DEBIAN_ARCHITECTURES[keyof typeof DEBIAN_ARCHITECTURES];

export const DEFAULT_MAINTAINER = "edge-agent maintainers <edge-agent@example.com>";

/** Where the unit's ExecStart finds the executable in a tarball install, and in the package. */
const TARBALL_EXECUTABLE = "/usr/local/bin/edge-agent";
const PACKAGE_EXECUTABLE = "/usr/bin/edge-agent";

export class DebError extends Error {}

export interface DebOptions {
  /** The compiled agent for this architecture (packaging does not look inside it). */
  executable: string;
  architecture: DebianArchitecture;
  /** Debian version, e.g. 0.1.0 (built by the project itself, so a native version). */
  version: string;
  /** Folder the .deb is written to. */
  out: string;
  /** Default: "$DEBFULLNAME <$DEBEMAIL>" (Debian's convention) when DEBEMAIL is set, else DEFAULT_MAINTAINER. */
  maintainer?: string;
  /** The changelog's date and the latest file time: SOURCE_DATE_EPOCH when set, else now. */
  date?: Date;
}

/** The unit with the packaged executable's path wherever it names the tarball's (ExecStart at least). */
export function packagedUnit(unit: string): string {
  const execStart = unit.split("\n").filter((line) => line.startsWith("ExecStart="));
  if (execStart.length !== 1 || !execStart[0].startsWith(`ExecStart=${TARBALL_EXECUTABLE} `)) {
    throw new DebError(`deploy/edge-agent.service: expected one "ExecStart=${TARBALL_EXECUTABLE} ..." line`);
  }
  return unit.replaceAll(`${TARBALL_EXECUTABLE} `, `${PACKAGE_EXECUTABLE} `);
}

/** A Debian changelog with one entry for `version` (the package is built from the project's release). */
export function changelog(version: string, maintainer: string, date: Date): string {
  return `edge-agent (${version}) stable; urgency=medium\n\n` +
    `  * Release ${version}.\n\n` +
    ` -- ${maintainer}  ${rfc2822(date)}\n`;
}

function rfc2822(date: Date): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const two = (n: number) => String(n).padStart(2, "0");
  const day = `${days[date.getUTCDay()]}, ${two(date.getUTCDate())} ${months[date.getUTCMonth()]}`;
  const time = `${two(date.getUTCHours())}:${two(date.getUTCMinutes())}:${two(date.getUTCSeconds())}`;
  return `${day} ${date.getUTCFullYear()} ${time} +0000`;
}

/** `<out>/edge-agent_<version>_<architecture>.deb`, built with `dpkg-deb --build --root-owner-group`. */
export async function debPackage(options: DebOptions): Promise<string> {
  const { architecture, version, out } = options;
  if (!/^[0-9][A-Za-z0-9.+~]*$/.test(version)) throw new DebError(`version ${version}: not a native Debian version`);
  const email = Deno.env.get("DEBEMAIL");
  const maintainer = options.maintainer ??
    (email ? `${Deno.env.get("DEBFULLNAME") ?? "edge-agent maintainers"} <${email}>` : DEFAULT_MAINTAINER);
  const epoch = Deno.env.get("SOURCE_DATE_EPOCH");
  const date = options.date ?? (epoch ? new Date(Number(epoch) * 1000) : new Date());
  const name = `edge-agent_${version}_${architecture}`;
  await Deno.mkdir(out, { recursive: true });
  // The package's tree, staged beside it (a copy of the executable) and removed once built.
  const staging = await Deno.makeTempDir({ dir: out, prefix: `.${name}-` });
  try {
    return await build(join(staging, "root"), join(out, `${name}.deb`), options, maintainer, date);
  } finally {
    await Deno.remove(staging, { recursive: true });
  }
}

async function build(
  root: string,
  deb: string,
  { executable, architecture, version }: DebOptions,
  maintainer: string,
  date: Date,
): Promise<string> {
  const template = (file: string) => Deno.readFile(join(TEMPLATES, file));
  const text = (s: string) => new TextEncoder().encode(s);
  const gzip = (bytes: Uint8Array) => gzipSync(bytes, { level: 9 }); // no name or time in the header
  const doc = "usr/share/doc/edge-agent";
  // [path in the package, contents, mode]
  const files: [string, Uint8Array, number][] = [
    ["usr/bin/edge-agent", await Deno.readFile(executable), 0o755],
    [
      "usr/lib/systemd/system/edge-agent.service",
      text(packagedUnit(await Deno.readTextFile(join(DEPLOY, "edge-agent.service")))),
      0o644,
    ],
    ["usr/lib/sysusers.d/edge-agent.conf", await template("edge-agent.sysusers"), 0o644],
    // Edge Manager's clients' socket path, linked to the agent's (see the file's comment).
    ["usr/lib/tmpfiles.d/edge-agent.conf", await Deno.readFile(join(DEPLOY, "edge-agent.tmpfiles.conf")), 0o644],
    ["etc/edge-agent/config.json", await Deno.readFile(join(DEPLOY, "config.example.json")), 0o644],
    [`${doc}/copyright`, await template("copyright"), 0o644],
    [`${doc}/changelog.gz`, gzip(text(changelog(version, maintainer, date))), 0o644],
    ["usr/share/man/man1/edge-agent.1.gz", gzip(await template("edge-agent.1")), 0o644],
    ["usr/share/lintian/overrides/edge-agent", await template("lintian-overrides"), 0o644],
  ];
  const conffiles = new TextDecoder().decode(await template("conffiles"));
  const directories = new Set(["etc/edge-agent/trust"]);
  for (const [path] of files) {
    for (let dir = dirname(path); dir !== "."; dir = dirname(dir)) directories.add(dir);
  }
  await Deno.mkdir(root, { recursive: true });
  await Deno.chmod(root, 0o755);
  for (const dir of [...directories].sort()) {
    await Deno.mkdir(join(root, dir), { recursive: true });
    await Deno.chmod(join(root, dir), 0o755);
  }
  let installedKiB = directories.size; // what dpkg-gencontrol counts: 1 KiB per folder, files rounded up
  const md5sums: string[] = [];
  for (const [path, contents, mode] of files) {
    await Deno.writeFile(join(root, path), contents);
    await Deno.chmod(join(root, path), mode);
    installedKiB += Math.ceil(contents.length / 1024);
    // dpkg keeps its own digests of conffiles.
    if (!conffiles.split("\n").includes(`/${path}`)) {
      md5sums.push(`${createHash("md5").update(contents).digest("hex")}  ${path}`);
    }
  }

  const control = join(root, "DEBIAN");
  await Deno.mkdir(control);
  await Deno.chmod(control, 0o755);
  const fields: Record<string, string> = {
    VERSION: version,
    ARCH: architecture,
    MAINTAINER: maintainer,
    INSTALLED_SIZE: String(installedKiB),
  };
  const controlText = new TextDecoder().decode(await template("control"))
    .replace(/@([A-Z_]+)@/g, (_, key: string) => fields[key] ?? `@${key}@`);
  for (
    const [file, contents, mode] of [
      ["control", text(controlText), 0o644],
      ["conffiles", text(conffiles), 0o644],
      ["md5sums", text(md5sums.join("\n") + "\n"), 0o644],
      ["postinst", await template("postinst"), 0o755],
      ["prerm", await template("prerm"), 0o755],
      ["postrm", await template("postrm"), 0o755],
    ] as [string, Uint8Array, number][]
  ) {
    await Deno.writeFile(join(control, file), contents);
    await Deno.chmod(join(control, file), mode);
  }

  const built = await new Deno.Command("dpkg-deb", {
    args: ["--build", "--root-owner-group", root, deb],
    // dpkg-deb sets the archive's times from it, and clamps every file's time to it.
    env: { SOURCE_DATE_EPOCH: String(Math.floor(date.getTime() / 1000)) },
    stdout: "piped",
    stderr: "piped",
  }).output().catch((e) => {
    throw new DebError(`dpkg-deb: ${e.message} (install dpkg)`);
  });
  if (!built.success) throw new DebError(`dpkg-deb --build failed: ${new TextDecoder().decode(built.stderr)}`);
  return deb;
}
