// The agent's own gRPC client (src/transport/client.ts, used by `edge-agent client`): against an
// independent server (Python grpcio, its own HTTP/2, HPACK and flow control), and against the real
// agent side by side with grpc-js.

import assert from "node:assert/strict";
import { join } from "node:path";
import { AgentClient } from "../src/client/client.ts";
import { Status } from "../src/errors.ts";
import { enumValues } from "../src/service/wire.ts";
import { withAgent } from "./helpers/agent.ts";
import { floats, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { GrpcJsAgentClient } from "./helpers/grpcjs_client.ts";
import { PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;
const PEER = new URL("./python/peer_server.py", import.meta.url).pathname;

const missing = await pythonGrpcMissing();
if (missing) console.log(`skipping the grpcio peer tests: ${missing}`);

/** A decoded message with byte fields as plain arrays (grpc-js decodes into Buffers, we into Uint8Arrays). */
function plain(value: unknown): unknown {
  if (value instanceof Uint8Array) return Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

interface Peer {
  socket: string;
  stop(): Promise<void>;
}

/** Starts tests/python/peer_server.py on `socket` and waits for "ready". */
async function startPeer(dir: string, socket: string): Promise<Peer> {
  const stubs = join(dir, "stubs");
  if (!await Deno.stat(stubs).then(() => true, () => false)) await generateStubs(dir);
  const process = new Deno.Command(PYTHON, {
    args: [PEER, "--stubs", stubs, "--socket", socket],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(process.stderr).text();
  const reader = process.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  while (!seen.includes("ready")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`peer server exited before serving:\n${await stderr}`);
    seen += value;
  }
  reader.releaseLock();
  return {
    socket,
    async stop() {
      try {
        process.kill("SIGKILL");
      } catch { /* exited */ }
      await process.status;
      await process.stdout.cancel().catch(() => {});
      await stderr;
    },
  };
}

/** Runs `fn` with a client of a fresh grpcio peer server. */
async function withPeer(
  fn: (client: AgentClient) => Promise<void>,
  options: { maxMessageBytes?: number } = {},
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-peer-" });
  const peer = await startPeer(dir, join(dir, "peer.sock"));
  const client = new AgentClient(peer.socket, options);
  try {
    await fn(client);
  } finally {
    client.close();
    await peer.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "client ↔ grpcio: calls, 8 MiB each way through grpcio's 64 KiB windows, 64 concurrent calls on one connection",
  ignore: missing !== null,
  async fn() {
    await withPeer(async (client) => {
      assert.deepEqual((await client.listModels()).models, []);
      assert.deepEqual((await client.listModels()).models.map((m) => m.name), ["m0"]);
      const big = pseudoRandomFloats(2 * 1024 * 1024, 7);
      const echoed = await client.predict("echo", [tensor("x", FLOAT32, [2048, 1024], big)]);
      assert.deepEqual(floats(echoed.tensors[0].byte_data), big, "8 MiB echoed byte for byte");
      const answers = await Promise.all(Array.from({ length: 64 }, async (_, i) => {
        const data = pseudoRandomFloats(1000 + 97 * i, i + 1);
        const response = await client.predict("echo", [tensor(`t${i}`, FLOAT32, [data.length], data)]);
        return { sent: data, received: floats(response.tensors[0].byte_data) };
      }));
      for (const { sent, received } of answers) assert.deepEqual(received, sent);
    });
  },
});

Deno.test({
  name: "client ↔ grpcio: every status code and UTF-8 message comes through; trailers in CONTINUATION frames",
  ignore: missing !== null,
  async fn() {
    await withPeer(async (client) => {
      await rejectsWith(
        client.describeModel("missing"),
        Status.NOT_FOUND,
        /^no model named “missing” \(réessayez: 100% sûr\)$/,
      );
      for (let code = 1; code <= 16; code++) {
        await rejectsWith(client.unloadModel(String(code)), code, new RegExp(`^aborted with ${Status[code]}$`));
      }
      assert.equal((await client.describeModel("big-trailers")).model.name, "big-trailers");
      assert.equal((await client.describeModel("after")).model.name, "after", "the connection still works");
    });
  },
});

Deno.test({
  name: "client ↔ grpcio: a deadline ends the call with DEADLINE_EXCEEDED and the connection carries on",
  ignore: missing !== null,
  async fn() {
    await withPeer(async (client) => {
      const started = performance.now();
      await rejectsWith(client.call("DescribeModel", { name: "slow" }, 300), Status.DEADLINE_EXCEEDED);
      const waited = performance.now() - started;
      assert.ok(waited < 2500, `gave up after ${waited.toFixed(0)} ms, not when the server answered (3 s)`);
      assert.equal((await client.describeModel("next")).model.name, "next");
    });
  },
});

Deno.test({
  name: "client ↔ grpcio: a response over the client's limit is RESOURCE_EXHAUSTED, and the connection carries on",
  ignore: missing !== null,
  async fn() {
    await withPeer(async (client) => {
      const data = new Float32Array(300_000);
      await rejectsWith(
        client.predict("echo", [tensor("x", FLOAT32, [data.length], data)]),
        Status.RESOURCE_EXHAUSTED,
        /^Received message larger than max \(\d+ vs\. 1048576\)$/,
      );
      assert.deepEqual((await client.listModels()).models, []);
    }, { maxMessageBytes: 1024 * 1024 });
  },
});

Deno.test({
  name: "client: a server that dies mid-call gives UNAVAILABLE; the same client reconnects once it is back",
  ignore: missing !== null,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "edge-agent-peer-" });
    const socket = join(dir, "peer.sock");
    const client = new AgentClient(socket);
    try {
      await rejectsWith(
        client.listModels(),
        Status.UNAVAILABLE,
        new RegExp(`^cannot connect to ${socket}: no such socket`),
      );
      let peer = await startPeer(dir, socket);
      assert.deepEqual((await client.listModels()).models, []);
      const cutOff = rejectsWith(client.call("DescribeModel", { name: "slow" }), Status.UNAVAILABLE, /connection/);
      await new Promise((r) => setTimeout(r, 300));
      await peer.stop();
      await cutOff;
      await Deno.remove(socket).catch(() => {});
      peer = await startPeer(dir, socket);
      try {
        assert.deepEqual((await client.listModels()).models, [], "a fresh server, reached by the same client");
      } finally {
        await peer.stop();
      }
    } finally {
      client.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("client and grpc-js get the same answers and statuses from the agent", async () => {
  await withAgent({}, async (agent) => {
    const ours = new AgentClient(agent.socket);
    const reference = new GrpcJsAgentClient(agent.socket);
    try {
      const folder = join(agent.modelsDir, "cls");
      await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
      const loaded = await ours.loadModel(folder, "cls");
      assert.deepEqual(plain(loaded), plain(await reference.describeModel("cls")));
      assert.deepEqual(plain(await ours.listModels()), plain(await reference.listModels()));
      const input = tensor("x", FLOAT32, [1, 3, 48, 192], pseudoRandomFloats(3 * 48 * 192, 3));
      const [a, b] = await Promise.all([ours.predict("cls", [input]), reference.predict("cls", [input])]);
      assert.deepEqual(floats(a.tensors[0].byte_data), floats(b.tensors[0].byte_data));
      assert.deepEqual(plain(a.tensors[0].tensor_metadata), plain(b.tensors[0].tensor_metadata));
      const wrongShape = [tensor("x", FLOAT32, [1, 4, 48, 192], new Float32Array(4 * 48 * 192))];
      for (
        const call of [
          (c: AgentClient | GrpcJsAgentClient) => c.predict("cls", wrongShape),
          (c: AgentClient | GrpcJsAgentClient) => c.describeModel("nope"),
        ]
      ) {
        const [x, y] = await Promise.allSettled([call(ours), call(reference)]);
        assert.equal(x.status, "rejected");
        assert.equal(y.status, "rejected");
        const [e, f] = [(x as PromiseRejectedResult).reason, (y as PromiseRejectedResult).reason];
        assert.equal(e.code, f.code);
        assert.equal(e.details, f.details);
      }
      assert.equal(await ours.health("model/cls"), await reference.health("model/cls"));
    } finally {
      ours.close();
      reference.close();
    }
  });
});
