// A device that ran Edge Manager switches over: the real agent started as Edge Manager's unit started
// its agent (working folder, -f, -m, a config as Edge Manager's tools wrote it), and Edge Manager's
// Python and C++ example clients, unchanged in how they call, reaching it through
// /tmp/sagemaker_edge_agent_example.sock as the installed agent offers it (a link to the real socket).

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { parseProfile } from "../src/permissions.ts";
import { enumValues } from "../src/service/wire.ts";
import { type AgentProcess, MAIN, parseLogs, PROJECT_ROOT, startAgent } from "./helpers/agent.ts";
import { floats, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { EDGE_MANAGER_STYLE_CONFIG } from "./helpers/edge_manager.ts";
import { identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";
import { testTrust } from "./helpers/signing.ts";

const DataType = enumValues("DataType");
const EXAMPLE_SOCKET = "/tmp/sagemaker_edge_agent_example.sock";
const MESSAGE_LIMIT = 1024 * 1024;
/** The image model: raw RGB bytes in, the same bytes out, batch dynamic as Neo-compiled image models had it. */
const [W, H, C] = [24, 16, 3];
const decoder = new TextDecoder();

/** Without files the agent would have to read (the credentials keys get their own tests). */
const CONFIG = {
  ...Object.fromEntries(
    Object.entries(EDGE_MANAGER_STYLE_CONFIG).filter(([key]) => !key.startsWith("sagemaker_edge_provider_aws_")),
  ),
  sagemaker_edge_provider_provider: "None",
  edge_agent_model_roots: ["models"],
  edge_agent_state_dir: "state",
  // Overridden by -m.
  edge_agent_max_message_bytes: "67108864",
};

/** The image's bytes, as Pillow's tobytes() gives them (rows of RGB pixels). */
function imageBytes(): Uint8Array {
  const bytes = new Uint8Array(W * H * C);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) bytes.set([(x * 10) % 256, (y * 15) % 256, ((x + y) * 7) % 256], (y * W + x) * C);
  }
  return bytes;
}

async function run(command: string[], env: Record<string, string> = {}): Promise<string> {
  const { success, code, stdout, stderr } = await new Deno.Command(command[0], {
    args: command.slice(1),
    env,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  if (!success) {
    throw new Error(`${command.join(" ")} failed (${code}):\n${decoder.decode(stdout)}\n${decoder.decode(stderr)}`);
  }
  return decoder.decode(stdout);
}

/**
 * How a client process sees the device's /tmp and /run/edge-agent: a private mount namespace (root and
 * unshare) with `fakeTmp` on /tmp and the agent's socket folder on /run/edge-agent, so the hard-coded
 * path and the shipped link are really what it opens; elsewhere EM_EXAMPLE_SOCKET names the socket.
 */
const privateTmp = await new Deno.Command("unshare", { args: ["-m", "true"], stdout: "null", stderr: "null" })
  .output().then((r) => r.success, () => false);
if (!privateTmp) {
  console.log("edge_manager_test: no private /tmp (needs root and unshare); clients get EM_EXAMPLE_SOCKET");
}

function clientCommand(
  fakeTmp: string,
  socketFolder: string,
  command: string[],
): { command: string[]; env: Record<string, string> } {
  if (!privateTmp) return { command, env: { EM_EXAMPLE_SOCKET: join(socketFolder, "agent.sock") } };
  // A checkout under /tmp (the client programs) stays visible at its path inside the private /tmp.
  const script = "mount --make-rprivate / && " +
    'case "$3" in /tmp/*) mkdir -p "$1${3#/tmp}" && mount --bind "$3" "$1${3#/tmp}";; esac && ' +
    'mount --rbind "$1" /tmp && mount -t tmpfs tmpfs /run && ' +
    'mkdir /run/edge-agent && mount --bind "$2" /run/edge-agent && shift 3 && exec "$@"';
  return {
    command: ["unshare", "-m", "sh", "-c", script, "sh", fakeTmp, socketFolder, PROJECT_ROOT, ...command],
    env: {},
  };
}

/** Makes the shipped tmpfiles lines' link under `root` (with systemd-tmpfiles where it is installed). */
async function applyTmpfiles(root: string): Promise<void> {
  const conf = join(PROJECT_ROOT, "deploy", "edge-agent.tmpfiles.conf");
  await Deno.mkdir(join(root, "tmp"), { recursive: true });
  // Spawning a missing program throws at once rather than rejecting: both mean it did not run.
  const applied = await (async () => {
    try {
      return (await new Deno.Command("systemd-tmpfiles", { args: [`--root=${root}`, "--create", conf] }).output())
        .success;
    } catch {
      return false;
    }
  })();
  if (applied) return;
  console.log("edge_manager_test: systemd-tmpfiles did not run; making its link by hand");
  const [, path, , , , , target] = (await Deno.readTextFile(conf)).split("\n").find((l) => l.startsWith("L+"))!
    .split(/\s+/);
  await Deno.remove(join(root, path)).catch(() => {});
  await Deno.symlink(target, join(root, path));
}

/** Why the C++ client cannot be built here, or null. */
async function cppMissing(): Promise<string | null> {
  for (
    const [tool, args] of [["g++", ["--version"]], ["protoc", ["--version"]], ["pkg-config", ["--exists", "grpc++"]]]
  ) {
    const ok = await new Deno.Command(tool as string, { args: args as string[], stdout: "null", stderr: "null" })
      .output().then((r) => r.success, () => false);
    if (!ok) return `${tool} ${(args as string[]).join(" ")} failed (needs g++, protobuf-compiler-grpc, libgrpc++-dev)`;
  }
  return null;
}

/** Builds tests/cpp/em_cpp_example.cc once per source version into .cache/. */
async function buildCppClient(): Promise<string> {
  const source = join(PROJECT_ROOT, "tests/cpp/em_cpp_example.cc");
  const proto = join(PROJECT_ROOT, "proto/agent.proto");
  const hash = createHash("sha256").update(await Deno.readFile(source)).update(await Deno.readFile(proto)).digest(
    "hex",
  );
  const dir = join(PROJECT_ROOT, ".cache", "em-cpp-example", hash.slice(0, 16));
  const binary = join(dir, "em_cpp_example");
  if (await Deno.stat(binary).then(() => true, () => false)) return binary;
  await Deno.mkdir(dir, { recursive: true });
  await run([
    "protoc",
    `-I${join(PROJECT_ROOT, "proto")}`,
    `--cpp_out=${dir}`,
    `--grpc_out=${dir}`,
    "--plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin",
    proto,
  ]);
  const flags = (await run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"])).trim().split(/\s+/);
  const sources = [source, join(dir, "agent.pb.cc"), join(dir, "agent.grpc.pb.cc")];
  await run(["g++", "-std=c++17", "-O1", `-I${dir}`, ...sources, ...flags, "-o", `${binary}.tmp`]);
  await Deno.rename(`${binary}.tmp`, binary);
  return binary;
}

async function filesUnder(dir: string): Promise<string[]> {
  const found: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const path = join(dir, entry.name);
    if (entry.isDirectory) found.push(...await filesUnder(path));
    else found.push(path);
  }
  return found;
}

Deno.test("an Edge Manager device switches over: its config, -f, -m, its Python and C++ example clients", async (t) => {
  // Outside /tmp, so that a client's private /tmp does not hide the agent's socket.
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "edge-agent-em-" });
  const socketFolder = join(dir, "run");
  const socket = join(socketFolder, "agent.sock");
  await Deno.mkdir(socketFolder);
  // The clients' /tmp, with what the shipped edge-agent.tmpfiles.conf makes there on a device, over a
  // leftover of Edge Manager's own agent.
  const fakeTmp = join(dir, "root", "tmp");
  await Deno.mkdir(fakeTmp, { recursive: true });
  await Deno.writeTextFile(join(fakeTmp, "sagemaker_edge_agent_example.sock"), "");
  await applyTmpfiles(join(dir, "root"));
  // The workshops' relative root certificates folder, under the agent's working folder.
  await Deno.mkdir(join(dir, "agent", "certificates", "root"), { recursive: true });
  await Deno.mkdir(join(dir, "agent", "capture"));
  await Deno.copyFile((await testTrust()).rootFile, join(dir, "agent", "certificates", "root", "root.pem"));
  const models = join(dir, "models");
  await Deno.mkdir(models);
  const imageModel = await writeModelFolder(models, "image", identityModel(OnnxType.UINT8, ["n", H, W, C]));
  const clsDir = await writeModelFolder(models, "cls", await Deno.readFile(PADDLE_CLS));

  // Something already serves on the address, as after an unclean restart of a wedged agent.
  const squatter = Deno.listen({ transport: "unix", path: socket });
  let agent = null as AgentProcess | null;
  const start = (serveArgs: string[]) => startAgent({ dir, socket, cwd: dir, config: CONFIG, serveArgs });
  try {
    await t.step("without -f a live socket stops start-up; -f replaces it", async () => {
      await assert.rejects(
        start([]),
        /socket .*agent\.sock: another process is already serving on it \(-f replaces it\)/,
      );
      // -c again, relative as Edge Manager's unit passed it (the last -c wins): it resolves against the working folder.
      agent = await start(["-f", "-m", String(MESSAGE_LIMIT), "-c", "config.json"]);
    });
    const running = agent!;

    await t.step("the start-up log: absolute paths, the keys not used (once), the device, -m", () => {
      const lines = parseLogs(running.logs());
      const unused = lines.filter((l) => l.msg === "config keys accepted but not used by this agent");
      assert.equal(unused.length, 1, "logged once");
      assert.deepEqual((unused[0].keys as string[]).sort(), [
        "sagemaker_edge_core_config_path",
        "sagemaker_edge_core_endpoint_override",
        "sagemaker_edge_db_module_path",
        "sagemaker_edge_deployment_lib_path",
        "sagemaker_edge_dlr_backend_options",
        "sagemaker_edge_local_data_root_path",
        "sagemaker_edge_model_deployment_poll_interval",
        "sagemaker_edge_provider_provider_path",
        "sagemaker_edge_telemetry_libsystemd_path",
      ]);
      const resolved = lines.find((l) => l.msg === "relative paths in the config resolved against the working folder");
      assert.ok(resolved, running.logs());
      assert.equal(resolved.workingFolder, dir);
      assert.deepEqual(resolved.paths, {
        sagemaker_edge_core_root_certs_path: join(dir, "agent/certificates/root"),
        sagemaker_edge_core_capture_data_disk_path: join(dir, "agent/capture"),
        edge_agent_model_roots: [models],
        edge_agent_state_dir: join(dir, "state"),
      });
      const serving = lines.find((l) => l.msg === "serving")!;
      assert.equal(serving.device, "turbine-7", "sagemaker_edge_core_device_uuid names the device");
      assert.equal(serving.config, join(dir, "config.json"));
      assert.equal(serving.maxMessageBytes, MESSAGE_LIMIT, "-m overrides edge_agent_max_message_bytes");
    });

    await t.step("-m limits the message size; the agent keeps serving", async () => {
      await running.client.loadModel(clsDir, "cls");
      const big = [1, 3, 256, 400];
      await rejectsWith(
        running.client.predict("cls", [tensor("x", DataType.FLOAT32, big, new Float32Array(3 * 256 * 400))]),
        Status.RESOURCE_EXHAUSTED,
        /larger than max/,
      );
    });

    await t.step("cls: a -1 copied from ListModels is settled; three of them are refused, naming them", async () => {
      const x = pseudoRandomFloats(3 * 48 * 192, 11);
      const exact = await running.client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, 48, 192], x)]);
      for (const shape of [[-1, 3, 48, 192], [1, -1, 48, 192], [1, 3, 48, -1]]) {
        const { tensors } = await running.client.predict("cls", [tensor("x", DataType.FLOAT32, shape, x)]);
        assert.deepEqual(tensors[0].tensor_metadata!.shape, [1, 2], JSON.stringify(shape));
        assert.deepEqual(floats(tensors[0].byte_data), floats(exact.tensors[0].byte_data));
      }
      await rejectsWith(
        running.client.predict("cls", [tensor("x", DataType.FLOAT32, [-1, 3, -1, -1], x)]),
        Status.INVALID_ARGUMENT,
        /leaves dimensions 0, 2, 3 of model cls input "x" \(\[-1,3,-1,-1\]\) open.*give the sizes of dimensions 0, 2, 3/,
      );
      await rejectsWith(
        running.client.predict("cls", [tensor("x", DataType.FLOAT32, [-1, 3, 48, 191], x)]),
        Status.INVALID_ARGUMENT,
        /byte_data holds 110592 bytes, which is not a whole multiple of the 110016 bytes each step of dimension 0/,
      );
      await running.client.unloadModel("cls");
    });

    const pythonMissing = await pythonGrpcMissing() ??
      await run([PYTHON, "-c", "import PIL"]).then(() => null, () => `${PYTHON} lacks Pillow (python3-pil)`);
    if (pythonMissing) console.log(`Edge Manager's Python example skipped: ${pythonMissing}`);
    await t.step({
      name: "Edge Manager's Python example: raw image bytes, metadata copied from ListModels (-1 included)",
      ignore: pythonMissing !== null,
      fn: async () => {
        const stubs = await generateStubs(dir);
        const image = join(dir, "image.png");
        await run([
          PYTHON,
          "-c",
          `from PIL import Image\nim = Image.new("RGB", (${W}, ${H}))\n` +
          `im.putdata([(x * 10 % 256, y * 15 % 256, (x + y) * 7 % 256) for y in range(${H}) for x in range(${W})])\n` +
          `im.save(${JSON.stringify(image)})`,
        ]);
        const example = (model: string, url: string) => {
          const script = join(PROJECT_ROOT, "tests/python/em_python_example.py");
          const args = ["--model_url", url, "--model_name", model, "--image_path", image, "--image_tensor_name", "x"];
          const { command, env } = clientCommand(fakeTmp, socketFolder, [PYTHON, script, ...args]);
          return run(command, { ...env, STUBS: stubs }).then((out) => JSON.parse(out));
        };
        const ok = await example("image", imageModel);
        assert.deepEqual(ok.input_shape, [-1, H, W, C], "ListModels shows the dynamic batch as -1");
        assert.equal(ok.error, undefined, JSON.stringify(ok.error));
        assert.deepEqual(ok.outputs[0].shape, [1, H, W, C], "the -1 was settled from the image's length");
        assert.deepEqual(Uint8Array.from(atob(ok.outputs[0].data), (c) => c.charCodeAt(0)), imageBytes());
        const refused = await example("cls", clsDir);
        assert.equal(refused.error.code, "INVALID_ARGUMENT");
        assert.match(refused.error.details, /give the sizes of dimensions 0, 2, 3/);
        assert.doesNotMatch(refused.error.details, /does not fit/);
      },
    });

    const noCpp = await cppMissing();
    if (noCpp) console.log(`Edge Manager-style C++ client skipped: ${noCpp}`);
    await t.step({
      name: "an Edge Manager-style C++ client: SysV segment made read-only, Predict, then CaptureData",
      ignore: noCpp !== null,
      fn: async () => {
        const binary = await buildCppClient();
        const raw = join(dir, "image.raw");
        await Deno.writeFile(raw, imageBytes());
        await running.client.loadModel(imageModel, "image");
        const { command, env } = clientCommand(fakeTmp, socketFolder, [
          binary,
          "PredictSHMAndCapture",
          "image",
          raw,
          "x",
          `${W}`,
          `${H}`,
          `${C}`,
        ]);
        const observed = JSON.parse(await run(command, env));
        assert.deepEqual(observed.output.shape, [1, H, W, C]);
        assert.deepEqual(Uint8Array.from(observed.output.data), imageBytes());
        assert.match(observed.capture_id, /^capture\d+$/);
        assert.equal(observed.capture_status, "SUCCESS");
        // Stored under the config's relative capture folder, resolved against the working folder.
        assert.ok((await filesUnder(join(dir, "agent", "capture"))).length > 0, "capture files on disk");
        const list = clientCommand(fakeTmp, socketFolder, [binary, "ListModels"]);
        assert.deepEqual(JSON.parse(await run(list.command, list.env)).models, ["image"]);
      },
    });

    await t.step("SIGHUP (Edge Manager's unit's stop signal) stops the agent cleanly", async () => {
      const status = await running.stop("SIGHUP");
      assert.equal(status.code, 0, running.logs());
      assert.ok(!await Deno.lstat(socket).then(() => true, () => false), "socket removed");
    });
  } finally {
    await agent?.stop();
    // Only now: closing a Deno listener unlinks its path, which by then was the agent's socket.
    squatter.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the shipped unit and tmpfiles line offer Edge Manager's socket path without opening /tmp to the agent", async () => {
  const deploy = join(PROJECT_ROOT, "deploy");
  const profile = parseProfile(JSON.parse(await Deno.readTextFile(join(deploy, "profile.json"))));
  const tmpfiles = (await Deno.readTextFile(join(deploy, "edge-agent.tmpfiles.conf"))).split("\n")
    .filter((l) => l.trim() && !l.startsWith("#")).map((l) => l.trim().split(/\s+/));
  assert.deepEqual(tmpfiles, [
    ["L+", EXAMPLE_SOCKET, "-", "-", "-", "-", profile.socket],
    ["x", EXAMPLE_SOCKET],
  ]);
  const unit = await Deno.readTextFile(join(deploy, "edge-agent.service"));
  assert.match(unit, /^PrivateTmp=yes$/m);
  assert.ok(unit.includes(`Environment=SOCKET_ADDRESS=${profile.socket} AGENT_CONFIG_FILE_PATH=${profile.config}\n`));
  assert.match(unit, /^EnvironmentFile=-\/etc\/edge-agent\/agent\.env$/m);
  assert.match(
    unit,
    /^ExecStart=\/usr\/local\/bin\/edge-agent serve -a \$\{SOCKET_ADDRESS\} -c \$\{AGENT_CONFIG_FILE_PATH\}$/m,
  );
  assert.match(unit, /^WorkingDirectory=\/etc\/edge-agent$/m);
  // The agent never touches /tmp: its profile grants nothing there.
  assert.ok(!JSON.stringify(profile).includes("/tmp"));
});

Deno.test("serve -m takes a whole number of bytes in edge_agent_max_message_bytes' range; usage documents -f and -m", async () => {
  const serve = async (args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), { args: ["run", MAIN, "serve", ...args] }).output();
    return { code: out.code, stderr: decoder.decode(out.stderr) };
  };
  for (
    const [value, problem] of [["8MB", /-m must be a whole number, got "8MB"/], ["100", /-m must be at least 4096/]]
  ) {
    const { code, stderr } = await serve(["-m", value as string]);
    assert.equal(code, 2, stderr);
    assert.match(stderr, problem as RegExp);
    assert.match(stderr, /edge-agent serve \[-a <socket path>\] \[-c <config.json>\] \[-f\] \[-m <bytes>\]/);
    assert.match(stderr, /-f, --force: remove a socket file already at the address/);
    assert.match(stderr, /-m, --max-message-bytes: gRPC message size limit/);
  }
});
