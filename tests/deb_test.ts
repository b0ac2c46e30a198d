// The Debian package (src/deb.ts, deploy/debian/): one per architecture, built with dpkg-deb and
// clean under lintian, then installed, upgraded, removed, purged and reinstalled with dpkg into a
// throwaway root (dpkg --root --force-script-chrootless: the maintainer scripts run here with
// DPKG_ROOT set, so every path and the user they create must land inside that root).
//
// No Deno runtime for compiling is available here (see build_test.ts), so the packages hold an
// executable stand-in, as the release tarball test does: packaging does not look inside the file.

import assert from "node:assert/strict";
import { join } from "node:path";
import { DebError, DEBIAN_ARCHITECTURES, type DebianArchitecture, debPackage, packagedUnit } from "../src/deb.ts";
import { PROJECT_ROOT } from "./helpers/agent.ts";

const decoder = new TextDecoder();

console.log(
  "deb_test: the packages hold an executable stand-in (a shell script), not the compiled agent: no Deno " +
    "runtime (denort) is available here to compile it",
);

async function run(command: string, args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(command, { args, env, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** A stand-in for the compiled agent that names its version, to see which one is installed. */
async function build(dir: string, architecture: DebianArchitecture, version: string): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  const executable = join(dir, `edge-agent-${version}-${architecture}`);
  await Deno.writeTextFile(executable, `#!/bin/sh\necho "edge-agent ${version} (stand-in)"\n`);
  return await debPackage({ executable, architecture, version, out: dir, date: new Date("2026-01-02T03:04:05Z") });
}

const HOST_ARCH = DEBIAN_ARCHITECTURES[Deno.build.target as keyof typeof DEBIAN_ARCHITECTURES];

Deno.test("one package per architecture: its files, owners and modes, conffile, unit, and lintian clean", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const debs: string[] = [];
    for (const architecture of ["amd64", "arm64"] as const) {
      const deb = await build(dir, architecture, "0.1.0");
      assert.equal(deb, join(dir, `edge-agent_0.1.0_${architecture}.deb`));
      debs.push(deb);
      const fields = await run("dpkg-deb", ["--field", deb, "Package", "Version", "Architecture", "Depends"]);
      assert.equal(fields.code, 0, fields.stderr);
      assert.match(fields.stdout, /^Package: edge-agent$/m);
      assert.match(fields.stdout, /^Version: 0\.1\.0$/m);
      assert.match(fields.stdout, new RegExp(`^Architecture: ${architecture}$`, "m"));
      assert.match(fields.stdout, /^Depends: .*systemd \| systemd-standalone-sysusers \| systemd-sysusers/m);

      // `dpkg-deb --contents`: mode, owner/group, size, date, time, path.
      const listing = await run("dpkg-deb", ["--contents", deb]);
      assert.equal(listing.code, 0, listing.stderr);
      const entries = listing.stdout.trim().split("\n").map((line) => {
        const [mode, owner, , , , path] = line.split(/\s+/);
        return { mode, owner, path: path.replace(/^\.\//, "/") };
      });
      const files = Object.fromEntries(entries.filter((e) => !e.mode.startsWith("d")).map((e) => [e.path, e.mode]));
      assert.deepEqual(files, {
        "/etc/edge-agent/config.json": "-rw-r--r--",
        "/usr/bin/edge-agent": "-rwxr-xr-x",
        "/usr/lib/systemd/system/edge-agent.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/edge-agent.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/edge-agent.conf": "-rw-r--r--",
        "/usr/share/doc/edge-agent/changelog.gz": "-rw-r--r--",
        "/usr/share/doc/edge-agent/copyright": "-rw-r--r--",
        "/usr/share/lintian/overrides/edge-agent": "-rw-r--r--",
        "/usr/share/man/man1/edge-agent.1.gz": "-rw-r--r--",
      });
      assert.ok(entries.some((e) => e.path === "/etc/edge-agent/trust/" && e.mode === "drwxr-xr-x"));
      for (const entry of entries) assert.equal(entry.owner, "root/root", entry.path);
      for (const entry of entries.filter((e) => e.mode.startsWith("d"))) assert.equal(entry.mode, "drwxr-xr-x");

      const conffiles = await run("dpkg-deb", ["--info", deb, "conffiles"]);
      assert.equal(conffiles.stdout, "/etc/edge-agent/config.json\n");
      const root = join(dir, `unpacked-${architecture}`);
      assert.equal((await run("dpkg-deb", ["--extract", deb, root])).code, 0);
      assert.equal(
        await Deno.readTextFile(join(root, "etc/edge-agent/config.json")),
        await Deno.readTextFile(join(PROJECT_ROOT, "deploy/config.example.json")),
      );
      // The unit is the project's, with ExecStart at the packaged executable.
      const unit = await Deno.readTextFile(join(root, "usr/lib/systemd/system/edge-agent.service"));
      const source = await Deno.readTextFile(join(PROJECT_ROOT, "deploy/edge-agent.service"));
      assert.match(unit, /^ExecStart=\/usr\/bin\/edge-agent serve /m);
      assert.equal(unit.replaceAll("/usr/bin/edge-agent ", "/usr/local/bin/edge-agent "), source);
    }

    // Errors and warnings fail; informational hints (e.g. overrides that only a compiled executable
    // uses) are listed.
    const lintian = await run("lintian", ["--fail-on", "error,warning", "--display-info", ...debs]);
    const hints = lintian.stdout.trim().split("\n").filter((line) => /^[EWI]: /.test(line));
    console.log(`lintian ${debs.map((d) => d.split("/").pop()).join(" ")}:\n  ${hints.join("\n  ")}`);
    assert.deepEqual(hints.filter((line) => /^[EW]: /.test(line)), []);
    assert.equal(lintian.code, 0, lintian.stdout + lintian.stderr);

    // The same inputs and date give the same bytes, so a fleet can pin a package by its digest (built
    // again seconds later, after lintian: the build time must not leak in).
    const again = await build(join(dir, "again"), "amd64", "0.1.0");
    assert.deepEqual(await Deno.readFile(again), await Deno.readFile(debs[0]), "a reproducible package");
    assert.deepEqual((await Array.fromAsync(Deno.readDir(join(dir, "again")))).map((e) => e.name).sort(), [
      "edge-agent-0.1.0-amd64",
      "edge-agent_0.1.0_amd64.deb",
    ], "no staging tree left behind");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a unit whose ExecStart is not the tarball's /usr/local/bin/edge-agent is refused, not packaged", () => {
  const unit = "[Service]\nExecStartPre=/usr/local/bin/edge-agent check\nExecStart=/usr/local/bin/edge-agent serve\n";
  assert.equal(
    packagedUnit(unit),
    "[Service]\nExecStartPre=/usr/bin/edge-agent check\nExecStart=/usr/bin/edge-agent serve\n",
  );
  for (const wrong of ["[Service]\nExecStart=/opt/edge-agent serve\n", "[Service]\n", unit + unit]) {
    assert.throws(() => packagedUnit(wrong), (e: Error) => e instanceof DebError && /ExecStart=/.test(e.message));
  }
});

/**
 * An empty system for dpkg: its database, base users and groups, and the package's dependencies
 * recorded as installed at the host's versions (the maintainer scripts run the host's tools; dpkg
 * still checks the package's Depends against these records).
 */
async function throwawayRoot(root: string, deb: string): Promise<void> {
  await Deno.mkdir(join(root, "var/lib/dpkg/info"), { recursive: true });
  await Deno.mkdir(join(root, "var/lib/dpkg/updates"), { recursive: true });
  await Deno.mkdir(join(root, "etc"));
  await Deno.copyFile("/usr/share/base-passwd/passwd.master", join(root, "etc/passwd"));
  await Deno.copyFile("/usr/share/base-passwd/group.master", join(root, "etc/group"));
  const depends = (await run("dpkg-deb", ["--field", deb, "Depends"])).stdout.trim();
  const entries: string[] = [];
  for (const group of depends.split(",")) {
    const alternatives = group.split("|").map((a) => a.trim().split(" ")[0]);
    let found = false;
    for (const name of alternatives) {
      const version = await run("dpkg-query", ["--showformat", "${Version}", "--show", name]);
      if (version.code !== 0 || version.stdout === "") continue;
      entries.push(
        `Package: ${name}\nStatus: install ok installed\nMaintainer: host <root@localhost>\n` +
          `Architecture: ${HOST_ARCH}\nVersion: ${version.stdout}\nDescription: installed on the host\n`,
      );
      await Deno.writeTextFile(join(root, `var/lib/dpkg/info/${name}.list`), "");
      found = true;
      break;
    }
    assert.ok(found, `this host needs one of ${alternatives.join(", ")} installed`);
  }
  await Deno.writeTextFile(join(root, "var/lib/dpkg/status"), entries.join("\n"));
}

Deno.test("install, upgrade, remove, purge and reinstall into a throwaway root", async () => {
  const dir = await Deno.makeTempDir();
  const hostPasswd = await Deno.readTextFile("/etc/passwd");
  try {
    const v1 = await build(dir, HOST_ARCH, "0.1.0");
    const v2 = await build(dir, HOST_ARCH, "0.1.1");
    const root = join(dir, "root");
    await throwawayRoot(root, v1);
    const at = (path: string) => join(root, path);
    const dpkg = async (...args: string[]) => {
      const out = await run("dpkg", [`--root=${root}`, "--force-script-chrootless", ...args]);
      assert.equal(out.code, 0, `dpkg ${args.join(" ")}:\n${out.stdout}${out.stderr}`);
      return out.stdout + out.stderr;
    };
    const status = async () =>
      (await run("dpkg-query", [`--admindir=${at("var/lib/dpkg")}`, "-W", "-f", "${Status} ${Version}", "edge-agent"]))
        .stdout;
    const exists = (path: string) => Deno.lstat(at(path)).then(() => true, () => false);
    const user = async () => {
      const passwd = (await Deno.readTextFile(at("etc/passwd"))).split("\n").filter((l) => l.startsWith("edge-agent:"));
      const group = (await Deno.readTextFile(at("etc/group"))).split("\n").filter((l) => l.startsWith("edge-agent:"));
      assert.equal(passwd.length, 1, "one user edge-agent");
      assert.equal(group.length, 1, "one group edge-agent");
      const [, , uid, gid, , home, shell] = passwd[0].split(":");
      assert.equal(Number(group[0].split(":")[2]), Number(gid), "its primary group is edge-agent");
      return { uid: Number(uid), gid: Number(gid), home, shell };
    };
    /** Owner and permission bits of each data folder. */
    const dataFolders = async () => {
      const found: Record<string, string> = {};
      for (const path of ["var/lib/edge-agent", "var/lib/edge-agent/models", "var/lib/edge-agent/state"]) {
        const info = await Deno.lstat(at(path));
        assert.ok(info.isDirectory, path);
        found[path] = `${info.uid}:${info.gid} ${(info.mode! & 0o7777).toString(8)}`;
      }
      return found;
    };
    const spooled = "var/lib/edge-agent/state/capture/spool/seg-0000000000000001.log";

    // Install.
    assert.match(await dpkg("--install", v1), /Setting up edge-agent \(0\.1\.0\)/);
    assert.equal(await status(), "install ok installed 0.1.0");
    const agent = await user();
    assert.ok(agent.uid > 0 && agent.uid < 1000, `a system user (uid ${agent.uid})`);
    assert.equal(agent.home, "/var/lib/edge-agent");
    assert.equal(agent.shell, "/usr/sbin/nologin");
    const owned = `${agent.uid}:${agent.gid} 750`;
    assert.deepEqual(await dataFolders(), {
      "var/lib/edge-agent": owned,
      "var/lib/edge-agent/models": owned,
      "var/lib/edge-agent/state": owned,
    });
    const executable = await Deno.lstat(at("usr/bin/edge-agent"));
    assert.equal(`${executable.uid} ${(executable.mode! & 0o7777).toString(8)}`, "0 755");
    const config = await Deno.lstat(at("etc/edge-agent/config.json"));
    assert.equal(`${config.uid} ${(config.mode! & 0o7777).toString(8)}`, "0 644");
    assert.ok((await Deno.lstat(at("etc/edge-agent/trust"))).isDirectory);
    assert.match(await Deno.readTextFile(at("usr/lib/systemd/system/edge-agent.service")), /^User=edge-agent$/m);
    // Enabled the way systemctl enable would, inside the root.
    assert.equal(
      await Deno.readLink(at("etc/systemd/system/multi-user.target.wants/edge-agent.service")),
      "/usr/lib/systemd/system/edge-agent.service",
    );
    assert.equal(await Deno.readTextFile("/etc/passwd"), hostPasswd, "the host's users are untouched");

    // What a device gathers while it runs: a local config edit, a trusted root, a model, a spooled capture.
    const edited = (await Deno.readTextFile(at("etc/edge-agent/config.json"))).replace('"device-1"', '"device-42"');
    await Deno.writeTextFile(at("etc/edge-agent/config.json"), edited);
    await Deno.writeTextFile(at("etc/edge-agent/trust/root.pem"), "-----BEGIN CERTIFICATE-----\n");
    await Deno.writeTextFile(at("var/lib/edge-agent/models/model.onnx"), "onnx");
    await Deno.mkdir(at("var/lib/edge-agent/state/capture/spool"), { recursive: true });
    await Deno.writeTextFile(at(spooled), "spooled capture record");
    for (const path of ["var/lib/edge-agent/state/capture", "var/lib/edge-agent/state/capture/spool", spooled]) {
      await Deno.chown(at(path), agent.uid, agent.gid);
    }
    const kept = async () => ({
      config: await Deno.readTextFile(at("etc/edge-agent/config.json")),
      trust: await Deno.readTextFile(at("etc/edge-agent/trust/root.pem")),
      model: await Deno.readTextFile(at("var/lib/edge-agent/models/model.onnx")),
      spooled: await Deno.readTextFile(at(spooled)),
      spooledOwner: (await Deno.lstat(at(spooled))).uid,
      folders: await dataFolders(),
      user: await user(),
    });
    const before = await kept();

    // Upgrade: the new executable; config (a conffile edited here), trust, models, state and the
    // spooled capture stay as they were, and no second user appears.
    assert.match(await dpkg("--install", v2), /Unpacking edge-agent \(0\.1\.1\) over \(0\.1\.0\)/);
    assert.equal(await status(), "install ok installed 0.1.1");
    assert.match(await Deno.readTextFile(at("usr/bin/edge-agent")), /edge-agent 0\.1\.1/);
    assert.deepEqual(await kept(), before);
    assert.equal(before.config, edited);
    for (const leftover of ["config.json.dpkg-dist", "config.json.dpkg-new", "config.json.dpkg-old"]) {
      assert.equal(await exists(`etc/edge-agent/${leftover}`), false, leftover);
    }

    // Remove: the program goes, the configuration and the data stay.
    await dpkg("--remove", "edge-agent");
    assert.equal(await status(), "deinstall ok config-files 0.1.1");
    for (
      const path of [
        "usr/bin/edge-agent",
        "usr/lib/systemd/system/edge-agent.service",
        "usr/lib/sysusers.d/edge-agent.conf",
        "usr/lib/tmpfiles.d/edge-agent.conf",
      ]
    ) {
      assert.equal(await exists(path), false, path);
    }
    assert.deepEqual(await kept(), before);

    // Purge: configuration, trust, models, state and spool go; the user and group stay (Debian's usual
    // practice: files elsewhere may still belong to them).
    await dpkg("--purge", "edge-agent");
    assert.equal(await status(), "");
    const left: string[] = [];
    const walk = async (path: string) => {
      for await (const entry of Deno.readDir(at(path))) {
        const child = path ? `${path}/${entry.name}` : entry.name;
        if (entry.name.includes("edge-agent")) left.push(child);
        if (entry.isDirectory) await walk(child);
      }
    };
    await walk("");
    assert.deepEqual(left, [], "nothing of the package is left");
    assert.deepEqual(await user(), before.user);

    // A reinstall reuses the user, and starts from the packaged config.
    await dpkg("--install", v2);
    assert.deepEqual(await user(), before.user);
    assert.deepEqual(await dataFolders(), before.folders);
    assert.equal(
      await Deno.readTextFile(at("etc/edge-agent/config.json")),
      await Deno.readTextFile(join(PROJECT_ROOT, "deploy/config.example.json")),
    );
    assert.equal(await Deno.readTextFile("/etc/passwd"), hostPasswd, "the host's users are untouched");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
