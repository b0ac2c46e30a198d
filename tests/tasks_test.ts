// The README's commands: `deno task start [-a <socket>] [-c <config>]` serves with exactly the
// permissions its config's deployment gets, as root or as any user, and `deno task demo` runs the
// main job end to end.

import assert from "node:assert/strict";
import { join } from "node:path";
import { DEFAULT_SOCKET_PATH, DEFAULTS, parseConfig } from "../src/config.ts";
import { agentPermissionFlags } from "../src/permissions.ts";
import { AgentClient } from "../src/client/client.ts";
import { Status } from "../src/errors.ts";
import { plan } from "../scripts/start.ts";
import { MAIN, PROJECT_ROOT } from "./helpers/agent.ts";
import { rejectsWith } from "./helpers/assertions.ts";
import { PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { testTrust } from "./helpers/signing.ts";
import { installed } from "./helpers/tools.ts";

const denoJson = JSON.parse(await Deno.readTextFile(`${PROJECT_ROOT}/deno.json`));

Deno.test("deno task start derives the agent's permissions from its config, as the executable's profile does", async () => {
  assert.match(denoJson.tasks.start, /^deno run .* scripts\/start\.ts$/);
  assert.doesNotMatch(denoJson.tasks.start, /\s(-A|--allow-all)\b/);
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-start-" });
  try {
    // root without -c: the built-in defaults, exactly the default deployment's permissions.
    const root = await plan([], { uid: 0, cwd: dir, env: {} });
    assert.equal(root.configPath, null);
    assert.deepEqual(
      root.flags,
      agentPermissionFlags({ socketPath: DEFAULT_SOCKET_PATH, configPath: null, config: DEFAULTS }),
    );
    assert.deepEqual(root.args, ["run", ...root.flags, MAIN, "serve", "-a", DEFAULT_SOCKET_PATH]);

    // Any other user without -c: folders of their own (XDG base directories).
    const user = await plan([], { uid: 1000, cwd: dir, env: { HOME: "/home/u" } });
    assert.deepEqual(user.userConfig?.raw, {
      edge_agent_state_dir: "/home/u/.local/state/edge-agent/state",
      edge_agent_model_roots: ["/home/u/.local/share/edge-agent/models"],
    });
    assert.equal(user.configPath, "/home/u/.local/state/edge-agent/config.json");
    const xdg = await plan([], { uid: 1000, cwd: dir, env: { XDG_STATE_HOME: "/s", XDG_DATA_HOME: "/d" } });
    assert.deepEqual(xdg.userConfig?.raw.edge_agent_model_roots, ["/d/edge-agent/models"]);
    await assert.rejects(plan([], { uid: 1000, cwd: dir, env: {} }), /neither HOME nor XDG_STATE_HOME/);

    // -c and -a relative to the caller's folder; the flags are the config's deployment's.
    const raw = { edge_agent_state_dir: join(dir, "state"), edge_agent_model_roots: [join(dir, "models")] };
    await Deno.writeTextFile(join(dir, "agent.json"), JSON.stringify(raw));
    const own = await plan(["-c", "agent.json", "-a", "agent.sock"], { uid: 1000, cwd: dir, env: {} });
    const deployment = { socketPath: join(dir, "agent.sock"), configPath: join(dir, "agent.json") };
    assert.deepEqual(own.flags, agentPermissionFlags({ ...deployment, config: parseConfig(raw).config }));
    assert.deepEqual(own.args.slice(-5), ["serve", "-a", deployment.socketPath, "-c", deployment.configPath]);
    await assert.rejects(plan(["-c", "missing.json"], { uid: 0, cwd: dir, env: {} }), /missing\.json: cannot be read/);
    await assert.rejects(plan(["--bogus"], { uid: 0, cwd: dir, env: {} }), /usage: deno task start/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deno task demo loads a real model, classifies through gRPC and stops cleanly", async () => {
  const out = await new Deno.Command(Deno.execPath(), { args: ["task", "-q", "demo"], cwd: PROJECT_ROOT }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, text + new TextDecoder().decode(out.stderr));
  const upright = text.match(/upright text line: P\(0°\) = ([\d.]+), P\(180°\) = ([\d.]+)/);
  const rotated = text.match(/rotated text line: P\(0°\) = ([\d.]+), P\(180°\) = ([\d.]+)/);
  assert.ok(upright && rotated, text);
  assert.ok(Number(upright[1]) > 0.5, "the upright line is classified as 0°");
  assert.ok(Number(rotated[2]) > 0.5, "the rotated line is classified as 180°");
  assert.match(text, /agent stopped \(exit 0\)/);
});

interface Started {
  child: Deno.ChildProcess;
  /** The launcher's and the agent's stderr up to "serving". */
  seen: string;
  /** The rest of stderr, read to the end. */
  rest: Promise<string>;
}

/** Runs `deno task -q start <args>` (under `wrapper`), returning once the agent serves. */
async function taskStart(args: string[], options: { cwd: string; env?: Record<string, string>; wrapper?: string[] }) {
  const [command, ...prefix] = [...(options.wrapper ?? []), options.env?.DENO_BIN ?? Deno.execPath()];
  // deno task names the caller's folder in INIT_CWD only when it is not set yet: under `deno task test`
  // the outer one must not reach the task started here.
  const env = { ...Deno.env.toObject(), ...options.env };
  delete env.INIT_CWD;
  const child = new Deno.Command(command, {
    args: [...prefix, "task", "-q", "start", ...args],
    cwd: options.cwd,
    env,
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream()).values();
  let seen = "";
  while (!seen.includes('"msg":"serving"')) {
    const { value, done } = await lines.next();
    if (done) {
      throw new Error(`the agent exited (${(await child.status).code}) before serving:\n${seen}`);
    }
    seen += value;
  }
  const rest = (async () => {
    let text = "";
    for await (const chunk of lines) text += chunk;
    return text;
  })();
  return { child, seen, rest } satisfies Started;
}

/** SIGTERM to `deno task`, which passes it on; the agent must stop cleanly. */
async function stopTask(started: Started): Promise<void> {
  started.child.kill("SIGTERM");
  const rest = await started.rest;
  assert.equal((await started.child.status).code, 0, started.seen + rest);
  assert.match(rest, /"msg":"stopped"/);
}

Deno.test("deno task start -c <config> -a <socket>: from a subfolder, the config's permissions, a signed model loads", async () => {
  const dir = await Deno.makeTempDir({ dir: PROJECT_ROOT, prefix: ".start-task-" });
  try {
    const models = join(dir, "models");
    const folder = await writeModelFolder(models, "cls", await Deno.readFile(PADDLE_CLS));
    const raw = {
      edge_agent_state_dir: join(dir, "state"),
      edge_agent_model_roots: [models],
      sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
    };
    await Deno.writeTextFile(join(dir, "agent.json"), JSON.stringify(raw));
    const socket = join(dir, "agent.sock");
    // Its own socket: whatever holds Edge Manager's default socket does not matter here.
    const started = await taskStart(["-c", "agent.json", "-a", "agent.sock"], { cwd: dir });
    const client = new AgentClient(socket);
    try {
      const flags = agentPermissionFlags({
        socketPath: socket,
        configPath: join(dir, "agent.json"),
        config: parseConfig(raw).config,
      });
      assert.ok(
        started.seen.includes(`edge-agent start: deno run ${flags.join(" ")} ${MAIN} serve -a ${socket} -c `),
        started.seen,
      );
      assert.deepEqual((await client.listModels()).models, []);
      await rejectsWith(client.loadModel(PROJECT_ROOT, "m"), Status.PERMISSION_DENIED, /outside the model roots/);
      assert.equal((await client.loadModel(folder, "cls")).model.name, "cls");
    } finally {
      client.close();
      await stopTask(started);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"];
const asUserSkip = Deno.uid() !== 0
  ? "it needs root to become another user"
  : !await installed("setpriv")
  ? "setpriv is not installed (util-linux)"
  : null;
if (asUserSkip) console.log(`skipping the start task as another user: ${asUserSkip}`);

Deno.test({
  name: "deno task start as a user other than root, without a config: state and models under the user's home",
  ignore: asUserSkip !== null,
  async fn() {
    const home = await Deno.makeTempDir({ prefix: "edge-agent-user-" });
    try {
      // The user's own Deno (this one may sit in root's home) and Deno folder, with the npm
      // metadata a `deno install` of theirs would have left (so nothing is fetched).
      const bin = join(home, "deno");
      await Deno.copyFile(Deno.execPath(), bin);
      const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"], stderr: "null" }).output();
      const denoDir = JSON.parse(new TextDecoder().decode(info.stdout)).denoDir as string;
      await Deno.mkdir(join(home, "deno-dir", "npm"), { recursive: true });
      const copied = await new Deno.Command("sh", {
        args: [
          "-c",
          `cd "$0/npm" && find . -name registry.json -exec cp --parents {} "$1/deno-dir/npm/" \\;`,
          denoDir,
          home,
        ],
      }).output();
      assert.ok(copied.success, new TextDecoder().decode(copied.stderr));
      await new Deno.Command("chown", { args: ["-R", "nobody:nogroup", home] }).output();
      await Deno.chmod(home, 0o755);
      const socket = join(home, "agent.sock");
      const env = { HOME: home, DENO_DIR: join(home, "deno-dir"), DENO_BIN: bin, PATH: Deno.env.get("PATH") ?? "" };
      const started = await taskStart(["-a", socket], { cwd: PROJECT_ROOT, env, wrapper: NOBODY });
      try {
        assert.match(started.seen, new RegExp(`user defaults in ${home}/\\.local/state/edge-agent/config\\.json`));
        assert.doesNotMatch(started.seen, /Download https?:/, "nothing fetched");
        const listed = await new Deno.Command(NOBODY[0], {
          args: [...NOBODY.slice(1), bin, "task", "-q", "client", "--socket", socket, "list"],
          cwd: PROJECT_ROOT,
          env,
        }).output();
        assert.equal(new TextDecoder().decode(listed.stdout).trim(), "no models loaded");
        const state = await Deno.stat(join(home, ".local", "state", "edge-agent", "state"));
        assert.equal(state.uid, (await Deno.stat(join(home, "deno-dir"))).uid, "the state belongs to the user");
        assert.ok((await Deno.stat(join(home, ".local", "share", "edge-agent", "models"))).isDirectory);
      } finally {
        await stopTask(started);
      }
    } finally {
      await Deno.remove(home, { recursive: true });
    }
  },
});

Deno.test("first run: no approve-scripts warning; after `deno install --quiet` a task prints only its own line", async () => {
  // A copy of the project without node_modules; packages come from the Deno cache these tests use.
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-first-run-" });
  const env: Record<string, string> = { ...Deno.env.toObject(), NO_COLOR: "1" };
  delete env.INIT_CWD;
  const deno = async (...args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), { args, cwd: dir, env, clearEnv: true }).output();
    const [stdout, stderr] = [out.stdout, out.stderr].map((b) => new TextDecoder().decode(b));
    assert.equal(out.code, 0, stderr);
    return { stdout, stderr };
  };
  try {
    for (const entry of ["deno.json", "deno.lock", "main.ts", "scripts", "src", "ffi", "proto", "deploy"]) {
      const copied = await new Deno.Command("cp", { args: ["-r", join(PROJECT_ROOT, entry), dir] }).output();
      assert.ok(copied.success, entry);
    }
    // The first task sets up node_modules itself (listing the packages); the install scripts it skips
    // are denied in deno.json, so Deno does not ask to approve them. Without -q, as the README has it.
    const first = await deno("task", "trust", "init", "--out", "./a");
    assert.doesNotMatch(first.stderr, /approve-scripts|Ignored build scripts/);
    assert.match(first.stdout, /^Development trust written to \.\/a/);

    await Deno.remove(join(dir, "node_modules"), { recursive: true });
    assert.deepEqual(await deno("install", "--quiet"), { stdout: "", stderr: "" });
    const quiet = await deno("task", "trust", "init", "--out", "./b");
    assert.match(quiet.stderr, /^Task trust deno run [^\n]*\n$/, "the task's own line is all");
    assert.match(quiet.stdout, /^Development trust written to \.\/b/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
