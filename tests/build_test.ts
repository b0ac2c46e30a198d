// build.ts: the exact deno compile commands per target, the profile they come from, offline runtime
// handling, and the release tarball. The compiled executable itself needs Deno's runtime (denort),
// which cannot be downloaded here: that test runs where DENORT_BIN names one.

import assert from "node:assert/strict";
import { join } from "node:path";
import { BuildError, COMPILE_CONFIG, release, runtimeSource, unresolvedImports } from "../build.ts";
import { StartupError } from "../src/errors.ts";
import { parseProfile } from "../src/permissions.ts";
import { PROJECT_ROOT, startAgent } from "./helpers/agent.ts";

const decoder = new TextDecoder();

async function build(args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-run",
      "--allow-env",
      join(PROJECT_ROOT, "build.ts"),
      ...args,
    ],
    env,
  }).output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

Deno.test("--dry-run prints one deno compile per target with that target's ORT library and the profile's flags", async () => {
  const { code, stdout, stderr } = await build(["--target", "all", "--dry-run"]);
  assert.equal(code, 0, stderr);
  const lines = stdout.trim().split("\n");
  assert.equal(lines.length, 2);
  for (
    const [line, target, arch] of [[lines[0], "x86_64-unknown-linux-gnu", "x64"], [
      lines[1],
      "aarch64-unknown-linux-gnu",
      "arm64",
    ]]
  ) {
    assert.match(line, new RegExp(`^deno compile .*--target ${target} `));
    assert.match(line, new RegExp(`--output \\S+/dist/edge-agent-\\d+\\.\\d+\\.\\d+-${target} `));
    assert.match(
      line,
      new RegExp(`--include \\S+/onnxruntime-node/bin/napi-v6/linux/${arch}/libonnxruntime\\.so\\.1 `),
    );
    assert.match(
      line,
      / --allow-read=\/run\/edge-agent\/agent\.sock,\/etc\/edge-agent\/config\.json,\/var\/lib\/edge-agent\/models,\/var\/lib\/edge-agent\/state,\/etc\/edge-agent\/trust /,
    );
    assert.match(line, / --allow-write=\/run\/edge-agent\/agent\.sock,\/var\/lib\/edge-agent\/state /);
    assert.match(line, / --allow-net=unix:\/run\/edge-agent\/agent\.sock /);
    assert.match(
      line,
      / --allow-env=ORT_DISABLE_TELEMETRY,AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN,AWS_REGION /,
    );
    assert.doesNotMatch(line, /\s(-A|--allow-all)(\s|$)/);
    // Every grant but FFI is scoped.
    const bare = line.split(" ").filter((a) => a.startsWith("--allow-") && !a.includes("="));
    assert.deepEqual(bare, ["--allow-ffi"]);
    // The entry is main.ts's command line with the profile's socket and config as defaults.
    assert.match(line, new RegExp(`/\\.build/edge-agent-\\d+\\.\\d+\\.\\d+-${target}\\.ts$`));
  }
});

Deno.test("without a runtime for the target, the build stops saying what to provide", async () => {
  const emptyCache = await Deno.makeTempDir();
  try {
    const { code, stderr } = await build(["--target", "aarch64-unknown-linux-gnu"], { DENO_DIR: emptyCache });
    assert.equal(code, 2);
    assert.match(stderr, /no Deno runtime for aarch64-unknown-linux-gnu/);
    assert.match(stderr, /--denort aarch64-unknown-linux-gnu=<extracted denort binary of v2\.9\.6>/);
    assert.match(stderr, /--deno-dir/);
  } finally {
    await Deno.remove(emptyCache, { recursive: true });
  }
});

Deno.test("a runtime of another Deno version, or a prepared cache, is recognised", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const wrong = join(dir, "denort");
    await Deno.writeTextFile(wrong, "a runtime of Deno/2.8.0");
    await assert.rejects(
      runtimeSource("x86_64-unknown-linux-gnu", new Map([["x86_64-unknown-linux-gnu", wrong]]), null, "2.9.6"),
      (e: Error) => e instanceof BuildError && /not a denort of Deno 2\.9\.6/.test(e.message),
    );
    const right = join(dir, "denort-right");
    await Deno.writeTextFile(right, "...Deno/2.9.6...");
    assert.deepEqual(
      await runtimeSource("x86_64-unknown-linux-gnu", new Map([["x86_64-unknown-linux-gnu", right]]), null, "2.9.6"),
      { DENORT_BIN: right },
    );
    const cache = join(dir, "cache");
    await Deno.mkdir(join(cache, "dl", "release", "v2.9.6"), { recursive: true });
    await Deno.writeFile(
      join(cache, "dl", "release", "v2.9.6", "denort-aarch64-unknown-linux-gnu.zip"),
      new Uint8Array(1),
    );
    assert.deepEqual(await runtimeSource("aarch64-unknown-linux-gnu", new Map(), cache, "2.9.6"), { DENO_DIR: cache });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("bad profiles are refused with one message per problem", () => {
  const problems = (raw: unknown) => {
    try {
      parseProfile(raw);
    } catch (error) {
      assert.ok(error instanceof StartupError);
      return error.problems;
    }
    assert.fail("accepted");
  };
  const found = problems({
    socket: "relative.sock",
    model_roots: ["/ok", "/a,b"],
    state_dir: "/var/lib/x",
    s3_hosts: ["http://s3.example.com"],
    env: ["AWS KEY"],
    extra: 1,
  });
  assert.equal(found.length, 5, found.join("\n"));
  assert.match(found.join("\n"), /unknown key "extra"/);
  assert.match(found.join("\n"), /"socket" must be an absolute path/);
  assert.match(found.join("\n"), /"model_roots" must be a list of absolute paths/);
  assert.match(found.join("\n"), /"s3_hosts" must be a list of host names/);
  assert.match(found.join("\n"), /"env" must be a list of environment variable names/);
  assert.match(problems([])[0], /must be a JSON object/);
});

Deno.test("the release tarball holds the executable, unit, example config, profile and matching SHA256SUMS", async () => {
  const out = await Deno.makeTempDir();
  try {
    // A stand-in for the compiled file: packaging does not look inside it.
    const executable = join(out, "edge-agent-0.0.0-x86_64-unknown-linux-gnu");
    await Deno.writeTextFile(executable, "#!/bin/sh\n");
    const tarball = await release(
      { target: "x86_64-unknown-linux-gnu", output: executable, env: {}, args: [] },
      join(PROJECT_ROOT, "deploy", "profile.json"),
      "0.0.0",
      out,
    );
    assert.equal(tarball, join(out, "edge-agent-0.0.0-x86_64-unknown-linux-gnu.tar.gz"));
    const unpacked = join(out, "unpacked");
    await Deno.mkdir(unpacked);
    assert.ok((await new Deno.Command("tar", { args: ["-xzf", tarball, "-C", unpacked] }).output()).success);
    const folder = join(unpacked, "edge-agent-0.0.0-x86_64-unknown-linux-gnu");
    const names = (await Array.fromAsync(Deno.readDir(folder))).map((e) => e.name).sort();
    assert.deepEqual(names, [
      "SHA256SUMS",
      "config.example.json",
      "edge-agent",
      "edge-agent.service",
      "edge-agent.tmpfiles.conf",
      "profile.json",
    ]);
    const check = await new Deno.Command("sha256sum", { args: ["-c", "SHA256SUMS"], cwd: folder }).output();
    assert.ok(check.success, decoder.decode(check.stdout) + decoder.decode(check.stderr));
    const unit = await Deno.readTextFile(join(folder, "edge-agent.service"));
    for (const line of ["NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"]) {
      assert.ok(unit.includes(line), line);
    }
    assert.match(unit, /^ReadWritePaths=\/var\/lib\/edge-agent\/state \/run\/edge-agent$/m);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("the executable's compile config maps every package it imports, at the project's versions", async () => {
  assert.deepEqual(await unresolvedImports(), []);
  const project = JSON.parse(await Deno.readTextFile(join(PROJECT_ROOT, "deno.json"))).imports;
  const embedded = JSON.parse(await Deno.readTextFile(COMPILE_CONFIG)).imports;
  for (const [name, specifier] of Object.entries(embedded)) assert.equal(specifier, project[name], name);
  assert.equal(embedded["@grpc/grpc-js"], undefined, "the executable carries no second HTTP/2 stack");
});

Deno.test("a compile config that misses a package is caught, naming the import", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const config = join(dir, "deno.compile.json");
    const full = JSON.parse(await Deno.readTextFile(COMPILE_CONFIG));
    delete full.imports["tar-stream"];
    full.lock = false; // The project's lock lies beside the real config, and would no longer match.
    await Deno.writeTextFile(config, JSON.stringify(full));
    const unresolved = await unresolvedImports(config);
    assert.equal(unresolved.length, 1, unresolved.join("\n"));
    assert.match(unresolved[0], /^Import "tar-stream" not a dependency/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const DENORT = Deno.env.get("DENORT_BIN");
if (!DENORT) console.log("skipping the compiled executable test: set DENORT_BIN to a denort of this Deno's version");

Deno.test({
  name: "the compiled executable serves the core end to end",
  ignore: !DENORT,
  async fn() {
    const out = await Deno.makeTempDir();
    const dir = await Deno.makeTempDir();
    try {
      const profile = {
        socket: join(dir, "agent.sock"),
        config: join(dir, "config.json"),
        model_roots: [join(dir, "models")],
        state_dir: join(dir, "state"),
        trusted_roots: null,
        s3_hosts: [],
        env: [],
      };
      await Deno.writeTextFile(join(dir, "profile.json"), JSON.stringify(profile));
      const built = await build([
        "--profile",
        join(dir, "profile.json"),
        "--out",
        out,
        "--denort",
        `${Deno.build.target}=${DENORT}`,
      ]);
      assert.equal(built.code, 0, built.stderr);
      const executable = (await Array.fromAsync(Deno.readDir(out))).find((e) => e.name.startsWith("edge-agent-"))!;
      const size = (await Deno.stat(join(out, executable.name))).size;
      console.log(`compiled executable: ${(size / 2 ** 20).toFixed(1)} MiB`);
      const agent = await startAgent({ dir, deno: join(out, executable.name), compiled: true });
      try {
        assert.deepEqual((await agent.client.listModels()).models, []);
        // Its client needs no flags: the profile's socket is its default.
        const listed = await new Deno.Command(join(out, executable.name), { args: ["client", "list"] }).output();
        assert.equal(decoder.decode(listed.stdout).trim(), "no models loaded", decoder.decode(listed.stderr));
      } finally {
        assert.equal((await agent.stop()).code, 0, agent.logs());
      }
    } finally {
      await Deno.remove(out, { recursive: true });
      await Deno.remove(dir, { recursive: true });
    }
  },
});
