// Start-up and shutdown as a service manager sees them: signals, the socket file, exit codes,
// start-up errors and the log format.

import assert from "node:assert/strict";
import { join } from "node:path";
import { parseConfig } from "../src/config.ts";
import { agentPermissionFlags } from "../src/permissions.ts";
import { enumValues } from "../src/service/wire.ts";
import { MAIN, parseLogs, startAgent } from "./helpers/agent.ts";
import { floats, tensor } from "./helpers/assertions.ts";
import { slowModel, writeModelFolder } from "./helpers/onnx_models.ts";
import { untilInFlight } from "./helpers/wait.ts";

/** Runs `serve` to completion (for start-up failures) with a deployment's permission flags. */
async function serveOnce(dir: string, raw: Record<string, unknown> | string, socket = join(dir, "agent.sock")) {
  const configPath = join(dir, "config.json");
  await Deno.writeTextFile(configPath, typeof raw === "string" ? raw : JSON.stringify(raw));
  let config;
  try {
    config = parseConfig(raw).config;
  } catch {
    config = parseConfig({}).config;
  }
  const output = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...agentPermissionFlags({ socketPath: socket, configPath, config }),
      MAIN,
      "serve",
      "-a",
      socket,
      "-c",
      configPath,
    ],
    stdin: "null",
  }).output();
  return { code: output.code, stderr: new TextDecoder().decode(output.stderr) };
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "edge-agent-lifecycle-" });
}

for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
  Deno.test(`${signal} stops the agent cleanly: exit 0, socket removed`, async () => {
    const agent = await startAgent();
    try {
      assert.ok((await Deno.lstat(agent.socket)).isSocket);
      const status = await agent.stop(signal);
      assert.equal(status.code, 0, agent.logs());
      await assert.rejects(Deno.lstat(agent.socket), Deno.errors.NotFound);
      const messages = parseLogs(agent.logs()).map((l) => l.msg);
      assert.ok(messages.includes("stopping") && messages.includes("stopped"), agent.logs());
    } finally {
      await agent.stop();
      await Deno.remove(agent.dir, { recursive: true });
    }
  });
}

Deno.test("an in-flight Predict finishes when SIGTERM arrives", async () => {
  const dir = await tempDir();
  const metrics = join(dir, "metrics.sock");
  const agent = await startAgent({ dir, config: { edge_agent_metrics: `unix:${metrics}` } });
  try {
    const n = 512;
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(n, 60)), "slow");
    const x = Float32Array.from({ length: n * n }, (_, i) => (i % 97) / 97);
    const predict = agent.client.predict("slow", [tensor("x", enumValues("DataType").FLOAT32, [n, n], x)]);
    await untilInFlight(metrics, 1);
    const stopped = agent.stop("SIGTERM");
    const result = await predict;
    assert.deepEqual(floats(result.tensors[0].byte_data), x);
    assert.equal((await stopped).code, 0, agent.logs());
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});

Deno.test("a stale socket left by a killed agent is replaced", async () => {
  const first = await startAgent();
  try {
    first.process.kill("SIGKILL");
    await first.stop();
    assert.ok((await Deno.lstat(first.socket)).isSocket, "SIGKILL leaves the socket file behind");
    const second = await startAgent({ dir: first.dir });
    try {
      assert.deepEqual((await second.client.listModels()).models, []);
      assert.ok(parseLogs(second.logs()).some((l) => l.msg === "removing stale socket"), second.logs());
    } finally {
      assert.equal((await second.stop()).code, 0);
    }
  } finally {
    await Deno.remove(first.dir, { recursive: true });
  }
});

Deno.test("a second agent on a live socket refuses to start and leaves the first serving", async () => {
  const first = await startAgent();
  try {
    const { code, stderr } = await serveOnce(first.dir, {
      edge_agent_model_roots: [first.modelsDir],
      // Its own state folder, so the socket is the only thing the two share.
      edge_agent_state_dir: join(first.dir, "second-state"),
    }, first.socket);
    assert.equal(code, 2);
    assert.match(stderr, /another process is already serving on it/);
    assert.deepEqual((await first.client.listModels()).models, []);
  } finally {
    assert.equal((await first.stop()).code, 0);
    await Deno.remove(first.dir, { recursive: true });
  }
});

Deno.test("a file that is not a socket at the socket path is a start-up error", async () => {
  const dir = await tempDir();
  try {
    const socket = join(dir, "agent.sock");
    await Deno.writeTextFile(socket, "precious");
    const { code, stderr } = await serveOnce(dir, {
      edge_agent_model_roots: [dir],
      edge_agent_state_dir: join(dir, "state"),
    }, socket);
    assert.equal(code, 2);
    assert.match(stderr, /agent\.sock: a file that is not a socket is in the way/);
    assert.equal(await Deno.readTextFile(socket), "precious");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the socket is created with mode 0660, or edge_agent_socket_mode", async () => {
  for (const [config, mode] of [[{}, 0o660], [{ edge_agent_socket_mode: "0600" }, 0o600]] as const) {
    const agent = await startAgent({ config });
    try {
      assert.equal((await Deno.lstat(agent.socket)).mode! & 0o777, mode);
    } finally {
      assert.equal((await agent.stop()).code, 0);
      await Deno.remove(agent.dir, { recursive: true });
    }
  }
});

Deno.test("configuration problems stop start-up with exit 2 and a message naming each key", async () => {
  const dir = await tempDir();
  try {
    const { code, stderr } = await serveOnce(dir, {
      edge_agent_model_roots: [dir],
      edge_agent_bogus: 1,
      sagemaker_edge_core_capture_data_buffer_size: "thirty",
      edge_agent_intra_op_threads: -1,
      edge_agent_graph_optimization: "max",
      sagemaker_edge_core_capture_data_destination: "Tape",
    });
    assert.equal(code, 2, stderr);
    assert.match(stderr, /unknown key "edge_agent_bogus"/);
    assert.match(stderr, /"sagemaker_edge_core_capture_data_buffer_size" must be a whole number, got "thirty"/);
    assert.match(stderr, /"edge_agent_intra_op_threads" must be at least 0, got -1/);
    assert.match(stderr, /"edge_agent_graph_optimization" must be one of disable, basic, extended, all/);
    assert.match(stderr, /"sagemaker_edge_core_capture_data_destination" must be one of Disk, Cloud/);
    const broken = await serveOnce(dir, "{ not json");
    assert.equal(broken.code, 2);
    assert.match(broken.stderr, /config\.json: not valid JSON/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a missing ONNX Runtime library is a clear start-up error", async () => {
  const dir = await tempDir();
  try {
    const { code, stderr } = await serveOnce(dir, {
      edge_agent_model_roots: [dir],
      edge_agent_state_dir: join(dir, "state"),
      edge_agent_onnxruntime_library: join(dir, "libonnxruntime.so.1"),
    });
    assert.equal(code, 2);
    assert.match(stderr, /ONNX Runtime library could not be loaded/);
    assert.match(stderr, /libonnxruntime\.so\.1: .*No such file/);
    await assert.rejects(Deno.lstat(join(dir, "agent.sock")), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Edge Manager keys the agent does not use are logged as ignored; debug lines only when verbose", async () => {
  const edgeManagerConfig = {
    sagemaker_edge_core_device_name: "device-1",
    sagemaker_edge_core_device_fleet_name: "fleet-1",
    sagemaker_edge_core_region: "us-west-2",
    sagemaker_edge_provider_provider_path: "/opt/edge/lib/libprovider_aws.so",
    sagemaker_edge_provider_s3_bucket_name: "bucket",
    sagemaker_edge_core_capture_data_buffer_size: 30,
  };
  for (const verbose of [false, true]) {
    const agent = await startAgent({ config: { ...edgeManagerConfig, sagemaker_edge_log_verbose: verbose } });
    try {
      await agent.client.listModels();
    } finally {
      assert.equal((await agent.stop()).code, 0);
      await Deno.remove(agent.dir, { recursive: true });
    }
    const logs = parseLogs(agent.logs());
    const ignored = logs.find((l) => l.msg === "config keys accepted but not used by this agent");
    assert.deepEqual(ignored?.keys, ["sagemaker_edge_provider_provider_path"]);
    const serving = logs.find((l) => l.msg === "serving")!;
    assert.equal(serving.device, "device-1");
    assert.equal(serving.fleet, "fleet-1");
    assert.equal(logs.some((l) => l.level === "debug" && l.rpc === "ListModels"), verbose);
  }
});

Deno.test("the command line rejects unknown commands and flags with usage", async () => {
  for (const args of [["bogus"], ["serve", "--port", "1"]]) {
    const out = await new Deno.Command(Deno.execPath(), { args: ["run", MAIN, ...args] }).output();
    assert.equal(out.code, 2);
    assert.match(new TextDecoder().decode(out.stderr), /usage:\n {2}edge-agent serve \[-a <socket path>\]/);
  }
});

Deno.test("a config that names more than the agent's permissions stops start-up, one message per mismatch", async () => {
  const dir = await tempDir();
  try {
    const socket = join(dir, "agent.sock");
    const configPath = join(dir, "config.json");
    const granted = parseConfig({ edge_agent_model_roots: [dir], edge_agent_state_dir: join(dir, "state") }).config;
    await Deno.writeTextFile(
      configPath,
      JSON.stringify({
        edge_agent_model_roots: [dir, "/data/models"],
        edge_agent_state_dir: "/var/lib/elsewhere",
        sagemaker_edge_core_root_certs_path: "/etc/edge-agent/trust",
      }),
    );
    const flags = agentPermissionFlags({ socketPath: socket, configPath, config: granted });
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", ...flags, MAIN, "serve", "-a", socket, "-c", configPath],
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 2, stderr);
    assert.match(
      stderr,
      /config names model root \/data\/models, but this agent may not read it; rebuild with a profile/,
    );
    assert.match(stderr, /config names state folder \/var\/lib\/elsewhere, but this agent may not read it/);
    assert.match(stderr, /config names state folder \/var\/lib\/elsewhere, but this agent may not write it/);
    assert.match(stderr, /config names trusted roots \/etc\/edge-agent\/trust, but this agent may not read them/);
    assert.doesNotMatch(stderr, new RegExp(`model root ${dir},`));
    await assert.rejects(Deno.lstat(socket), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a second agent on the same state folder is refused at start-up with a clear message", async () => {
  const first = await startAgent();
  try {
    const second = join(first.dir, "second");
    await Deno.mkdir(second);
    const { code, stderr } = await serveOnce(second, {
      edge_agent_model_roots: [first.modelsDir],
      edge_agent_state_dir: join(first.dir, "state"),
    });
    assert.equal(code, 2, stderr);
    assert.match(stderr, /cannot start:\n {2}capture: /);
    assert.doesNotMatch(stderr, /\bat \w+ \(/, "no stack trace");
  } finally {
    assert.equal((await first.stop()).code, 0);
    await Deno.remove(first.dir, { recursive: true });
  }
});
