// Deadlines and cancellation against the real agent and PaddleOCR det: grpc-timeout answered with
// DEADLINE_EXCEEDED, and Predicts whose caller is gone (deadline, RST_STREAM, closed connection)
// stopped inside ONNX Runtime, shown by the agent's own CPU time.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { Status } from "../src/errors.ts";
import { encodeHeaders, type Header, HpackDecoder } from "../src/transport/hpack.ts";
import { enumValues, HEALTH_SERVICE_NAME, RPC_TYPES, SERVICE_NAME } from "../src/service/wire.ts";
import { type AgentProcess, parseLogs, startAgent } from "./helpers/agent.ts";
import { pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { GrpcJsAgentClient } from "./helpers/grpcjs_client.ts";
import { PADDLE_DET } from "./helpers/onnx_models.ts";
import { concat, frameOf, PREFACE } from "./helpers/raw_h2.ts";
import { signPackage } from "./helpers/signing.ts";
import { until, untilInFlight } from "./helpers/wait.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;
const PREDICT = `/${SERVICE_NAME}/Predict`;
const DATA = 0, HEADERS = 1, RST_STREAM = 3, SETTINGS = 4, PING = 6;
const END_STREAM = 1, ACK = 1, END_HEADERS = 4;
const CANCEL = 8;

/** A det Predict request (640x640: 4.9 MB) as encoded protobuf. */
function detRequest(side = 640, name = "det"): Uint8Array {
  const shape = [1, 3, side, side];
  return RPC_TYPES.Predict.request.encode({
    name,
    tensors: [tensor("x", FLOAT32, shape, pseudoRandomFloats(3 * side * side, 5))],
  }).finish();
}

/**
 * A bare HTTP/2 client written frame by frame, so a test decides exactly what the agent reads and
 * when: a reset right behind a request, half a request, a connection closed mid-call. It honours
 * the agent's SETTINGS before sending requests (16 MiB windows: three det requests per connection).
 */
class RawClient {
  readonly #conn: Deno.Conn;
  readonly #decoder = new HpackDecoder();
  #buffer: Uint8Array = new Uint8Array(0);
  #nextStream = 1;
  #pingAcks = 0;
  readonly #changed = new EventTarget();
  /** Headers and RST_STREAM codes the agent sent, by stream. */
  readonly headers = new Map<number, Header[][]>();
  readonly resets = new Map<number, number>();
  closed = false;

  private constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  static async open(socket: string): Promise<RawClient> {
    const client = new RawClient(await Deno.connect({ transport: "unix", path: socket }));
    await client.#conn.write(concat([PREFACE, frameOf(SETTINGS, 0, 0)]));
    let settingsSeen = false;
    client.#read((type, flags) => {
      if (type === SETTINGS && !(flags & ACK)) settingsSeen = true;
    });
    await client.until(() => settingsSeen);
    return client;
  }

  async #read(onFrame: (type: number, flags: number) => void): Promise<void> {
    const chunk = new Uint8Array(65536);
    try {
      for (;;) {
        const n = await this.#conn.read(chunk);
        if (n === null) break;
        this.#buffer = concat([this.#buffer, chunk.subarray(0, n)]);
        while (this.#buffer.length >= 9) {
          const b = this.#buffer;
          const length = (b[0] << 16) | (b[1] << 8) | b[2];
          if (b.length < 9 + length) break;
          const [type, flags] = [b[3], b[4]];
          const stream = new DataView(b.buffer, b.byteOffset + 5, 4).getUint32(0) & 0x7fffffff;
          const payload = b.slice(9, 9 + length);
          this.#buffer = b.slice(9 + length);
          if (type === HEADERS) {
            const list = this.headers.get(stream) ?? [];
            list.push(this.#decoder.decode(payload));
            this.headers.set(stream, list);
          } else if (type === RST_STREAM) {
            this.resets.set(stream, new DataView(payload.buffer).getUint32(0));
          } else if (type === PING && flags & ACK) {
            this.#pingAcks++;
          }
          onFrame(type, flags);
          this.#changed.dispatchEvent(new Event("frame"));
        }
      }
    } catch { /* closed */ }
    this.closed = true;
    this.#changed.dispatchEvent(new Event("frame"));
  }

  /** Resolves once `done()` holds; rejects after `ms`. */
  until(done: () => boolean, ms = 10_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!done()) return;
        clearTimeout(timer);
        this.#changed.removeEventListener("frame", check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.#changed.removeEventListener("frame", check);
        reject(new Error(`no answer within ${ms} ms`));
      }, ms);
      this.#changed.addEventListener("frame", check);
      check();
    });
  }

  /** The frames of one unary call: HEADERS (with grpc-timeout when given), then DATA in 16 KiB frames. */
  call(message: Uint8Array, options: { timeout?: string; endStream?: boolean; path?: string } = {}) {
    const stream = this.#nextStream;
    this.#nextStream += 2;
    const headers: Header[] = [
      [":method", "POST"],
      [":scheme", "http"],
      [":path", options.path ?? PREDICT],
      [":authority", "localhost"],
      ["content-type", "application/grpc"],
      ["te", "trailers"],
    ];
    if (options.timeout !== undefined) headers.push(["grpc-timeout", options.timeout]);
    const body = new Uint8Array(5 + message.length);
    new DataView(body.buffer).setUint32(1, message.length);
    body.set(message, 5);
    const frames = [frameOf(HEADERS, END_HEADERS, stream, encodeHeaders(headers))];
    for (let offset = 0; offset < body.length; offset += 16384) {
      const last = offset + 16384 >= body.length && (options.endStream ?? true);
      frames.push(frameOf(DATA, last ? END_STREAM : 0, stream, body.subarray(offset, offset + 16384)));
    }
    return { stream, frames, bytes: concat(frames) };
  }

  reset(stream: number): Uint8Array {
    return frameOf(RST_STREAM, 0, stream, Uint8Array.of(0, 0, 0, CANCEL));
  }

  async send(bytes: Uint8Array): Promise<void> {
    for (let offset = 0; offset < bytes.length;) offset += await this.#conn.write(bytes.subarray(offset));
  }

  /** Waits for the agent to have read everything sent so far (a PING's ACK comes after it). */
  async sync(): Promise<void> {
    const acks = this.#pingAcks;
    await this.send(frameOf(PING, 0, 0, new Uint8Array(8)));
    await this.until(() => this.#pingAcks > acks);
  }

  /** The call's final headers (trailers, or trailers-only) as a map. */
  async status(stream: number, ms = 10_000): Promise<Map<string, string>> {
    const final = () => this.headers.get(stream)?.find((h) => h.some(([n]) => n === "grpc-status"));
    await this.until(() => final() !== undefined || this.closed, ms);
    const headers = final();
    assert.ok(headers, `stream ${stream} got no grpc-status`);
    return new Map(headers);
  }

  close(): void {
    try {
      this.#conn.close();
    } catch { /* closed already */ }
  }
}

/** User plus system CPU seconds the process has used (all its threads). */
async function cpuSeconds(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime (fields 14, 15) in ticks
}

async function cancelled(metricsSocket: string, reason: string): Promise<number> {
  return (await scrapeMetrics(`unix:${metricsSocket}`)).get(`edge_agent_predict_cancelled_total{reason="${reason}"}`) ??
    0;
}

/** How long terminated Runs took to return after their cancellation, from the agent's debug log. */
function stopTimes(agent: AgentProcess, reason: RegExp): number[] {
  return parseLogs(agent.logs())
    .filter((l) => l.msg === "run terminated" && reason.test(String(l.reason)))
    .map((l) => l.stopMs as number);
}

function summary(ms: number[]): string {
  const sorted = [...ms].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]?.toFixed(1);
  return `n=${sorted.length} median=${at(0.5)} ms p90=${at(0.9)} ms max=${sorted.at(-1)?.toFixed(1)} ms`;
}

Deno.test("deadlines and cancellation reach ONNX Runtime (det)", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-deadline-" });
  const metrics = join(dir, "metrics.sock");
  const agent = await startAgent({
    dir,
    config: { edge_agent_metrics: `unix:${metrics}`, sagemaker_edge_log_verbose: true },
  });
  const pid = agent.process.pid;
  const request = detRequest();
  try {
    await Deno.copyFile(PADDLE_DET, join(agent.modelsDir, "det.onnx"));
    await signPackage(join(agent.modelsDir, "det.onnx"));
    await agent.client.loadModel(`file://${join(agent.modelsDir, "det.onnx")}`, "det");

    // What a whole det Predict costs the agent, to compare cancelled ones against.
    const grpcjs = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": 64 << 20,
      "grpc.max_send_message_length": 64 << 20,
    });
    const predict = (deadlineMs?: number, body = request) => {
      let call: grpc.ClientUnaryCall;
      const done = new Promise<Buffer>((resolve, reject) => {
        call = grpcjs.makeUnaryRequest(
          PREDICT,
          (m: Uint8Array) => Buffer.from(m),
          (b: Buffer) => b,
          body,
          new grpc.Metadata(),
          deadlineMs ? { deadline: Date.now() + deadlineMs } : {},
          (error, response) => error ? reject(error) : resolve(response!),
        );
      });
      return { call: call!, done };
    };
    await predict().done; // warm-up
    const before = await cpuSeconds(pid);
    const FULL = 5;
    for (let i = 0; i < FULL; i++) await predict().done;
    const perPredict = (await cpuSeconds(pid) - before) / FULL;
    console.log(`one whole det Predict: ${(perPredict * 1000).toFixed(0)} ms of agent CPU`);

    await t.step("grpc-js Predict with a 10 ms deadline gets DEADLINE_EXCEEDED; the agent keeps serving", async () => {
      for (const ms of [5, 10, 20]) {
        await rejectsWith(predict(ms).done, Status.DEADLINE_EXCEEDED);
      }
      assert.equal((await agent.client.listModels()).models.length, 1);
    });

    await t.step("the agent itself answers DEADLINE_EXCEEDED: request arriving, whole, and already past", async () => {
      const raw = await RawClient.open(agent.socket);
      try {
        // Half a request that never ends: answered at the deadline, and the client told to stop.
        const half = raw.call(request, { timeout: "50m", endStream: false });
        await raw.send(concat(half.frames.slice(0, 6)));
        const started = performance.now();
        const status = await raw.status(half.stream);
        assert.equal(status.get("grpc-status"), String(Status.DEADLINE_EXCEEDED));
        assert.equal(status.get("grpc-message"), "deadline exceeded");
        assert.ok(performance.now() - started < 2000, "answered near its deadline");
        await raw.sync();
        assert.equal(raw.resets.get(half.stream), 0, "RST_STREAM NO_ERROR stops the upload");

        // A whole request whose deadline passes while det runs (or before: either way status 4).
        const whole = raw.call(request, { timeout: "30m" });
        await raw.send(whole.bytes);
        assert.equal((await raw.status(whole.stream)).get("grpc-status"), String(Status.DEADLINE_EXCEEDED));

        // A streaming call (Health/Watch) has answered headers already: at its deadline it is reset.
        const watch = raw.call(new Uint8Array(0), { timeout: "50m", path: `/${HEALTH_SERVICE_NAME}/Watch` });
        await raw.send(watch.bytes);
        await raw.until(() => raw.resets.has(watch.stream));
        assert.equal(raw.resets.get(watch.stream), CANCEL, "Watch reset with CANCEL at its deadline");

        // A deadline already past gets no handler at all, even one that would answer at once.
        const past = raw.call(new Uint8Array(0), { timeout: "0n", path: `/${SERVICE_NAME}/ListModels` });
        await raw.send(past.bytes);
        assert.equal((await raw.status(past.stream)).get("grpc-status"), String(Status.DEADLINE_EXCEEDED));
      } finally {
        raw.close();
      }
    });

    await t.step(
      "malformed grpc-timeout fails the call with INTERNAL naming the header; a valid one is harmless",
      async () => {
        const raw = await RawClient.open(agent.socket);
        const listModels = `/${SERVICE_NAME}/ListModels`;
        try {
          for (const bad of ["", "1", "5s", "123456789S", "-1S", "1.5S", "1 S"]) {
            const { stream, bytes } = raw.call(new Uint8Array(0), { timeout: bad, path: listModels });
            await raw.send(bytes);
            const status = await raw.status(stream);
            assert.equal(status.get("grpc-status"), String(Status.INTERNAL), bad);
            assert.match(decodeURIComponent(status.get("grpc-message")!), /malformed grpc-timeout/);
          }
          for (const good of ["99999999H", "5S", "1000000u", "50000000n"]) {
            const { stream, bytes } = raw.call(new Uint8Array(0), { timeout: good, path: listModels });
            await raw.send(bytes);
            assert.equal((await raw.status(stream)).get("grpc-status"), "0", good);
          }
        } finally {
          raw.close();
        }
      },
    );

    await t.step("a Predict whose deadline passes mid-Run is terminated inside ONNX Runtime", async () => {
      // A 1280x1280 det Run takes about four times the 640x640 one; the deadline falls inside it.
      const big = detRequest(1280);
      const raw = await RawClient.open(agent.socket);
      try {
        const deadlineBefore = await cancelled(metrics, "deadline");
        for (let i = 0; i < 3; i++) {
          const { stream, bytes } = raw.call(big, { timeout: "150m" });
          await raw.send(bytes);
          assert.equal((await raw.status(stream)).get("grpc-status"), String(Status.DEADLINE_EXCEEDED));
          await raw.sync();
        }
        // Wait for the Runs to come back: they count as they stop.
        await until(
          async () => await cancelled(metrics, "deadline") - deadlineBefore >= 1,
          "a Predict stopped at its deadline",
        );
        await agent.logged(
          (l) => l.msg === "run terminated" && /deadline/.test(String(l.reason)),
          "of a Run terminated at its deadline",
        );
      } finally {
        raw.close();
      }
    });

    await t.step("100 det Predicts reset right behind their request (rapid reset) cost next to nothing", async () => {
      // A LoadModel reset right behind its request is not started either (the last step lists models).
      await Deno.copyFile(PADDLE_DET, join(agent.modelsDir, "det3.onnx"));
      await signPackage(join(agent.modelsDir, "det3.onnx"));
      const load = await RawClient.open(agent.socket);
      const loadCall = load.call(
        RPC_TYPES.LoadModel.request.encode({ url: `file://${join(agent.modelsDir, "det3.onnx")}`, name: "det3" })
          .finish(),
        { path: `/${SERVICE_NAME}/LoadModel` },
      );
      await load.send(concat([loadCall.bytes, load.reset(loadCall.stream)]));
      await load.sync();
      load.close();

      const resetBefore = await cancelled(metrics, "reset");
      const runsBefore = stopTimes(agent, /cancelled/).length;
      const cpuBefore = await cpuSeconds(pid);
      for (let connection = 0; connection < 34; connection++) {
        const raw = await RawClient.open(agent.socket);
        try {
          const calls = Array.from({ length: Math.min(3, 100 - connection * 3) }, () => raw.call(request));
          // HEADERS, DATA... END_STREAM and RST_STREAM in one write per call.
          for (const { stream, bytes } of calls) await raw.send(concat([bytes, raw.reset(stream)]));
          await raw.sync();
          for (const { stream } of calls) assert.equal(raw.headers.get(stream), undefined, "no answer to a reset call");
        } finally {
          raw.close();
        }
      }
      await untilInFlight(metrics, 0);
      const used = await cpuSeconds(pid) - cpuBefore;
      const count = await cancelled(metrics, "reset") - resetBefore;
      const runs = stopTimes(agent, /cancelled/).length - runsBefore;
      console.log(
        `rapid reset: 100 det calls cost ${used.toFixed(2)} CPU-s (100 whole ones: ${
          (100 * perPredict).toFixed(2)
        }); ${count} counted cancelled, ${runs} Runs started and terminated`,
      );
      assert.ok(count >= 90, `Predicts counted as cancelled by reset: ${count}`);
      // The reset is read with the request's end (unless a read ends between them): no Run starts.
      assert.ok(runs <= 20, `Runs started for calls reset with their request: ${runs}`);
      assert.ok(used < 0.35 * 100 * perPredict, `100 reset calls used ${used.toFixed(2)} CPU-s`);
    });

    await t.step("100 det Predicts cancelled by grpc-js mid-Run: ONNX Runtime stops, the CPU is freed", async () => {
      const resetBefore = await cancelled(metrics, "reset");
      const stopsBefore = stopTimes(agent, /cancelled/).length;
      const cpuBefore = await cpuSeconds(pid);
      // One at a time: each call is cancelled once its handler runs, and the next waits for it to end.
      for (let i = 0; i < 100; i++) {
        const { call, done } = predict();
        // A call that fails on its own must say why, not leave this waiting.
        await Promise.race([
          untilInFlight(metrics, 1),
          done.then(() => assert.fail("answered before it was cancelled")),
        ]);
        call.cancel();
        await rejectsWith(done, Status.CANCELLED);
        await untilInFlight(metrics, 0);
      }
      const used = await cpuSeconds(pid) - cpuBefore;
      const count = await cancelled(metrics, "reset") - resetBefore;
      const stops = stopTimes(agent, /cancelled/).slice(stopsBefore);
      console.log(
        `grpc-js cancel mid-Run: 100 det calls cost ${used.toFixed(2)} CPU-s (100 whole ones: ${
          (100 * perPredict).toFixed(2)
        }); ${count} counted cancelled; from reset to Run returning: ${summary(stops)}`,
      );
      assert.ok(count >= 90, `Predicts counted as cancelled by reset: ${count}`);
      assert.ok(stops.length >= 50, `Runs terminated: ${stops.length}`);
      assert.ok(used < 0.6 * 100 * perPredict, `100 cancelled calls used ${used.toFixed(2)} CPU-s`);
    });

    await t.step("a connection closed mid-Run stops its Predict", async () => {
      const before = await cancelled(metrics, "disconnect");
      const stopsBefore = stopTimes(agent, /connection closed/).length;
      for (let i = 0; i < 5; i++) {
        const raw = await RawClient.open(agent.socket);
        await raw.send(raw.call(request).bytes);
        await untilInFlight(metrics, 1);
        raw.close();
        await untilInFlight(metrics, 0);
      }
      assert.equal(await cancelled(metrics, "disconnect") - before, 5);
      const stops = stopTimes(agent, /connection closed/).slice(stopsBefore);
      console.log(`connection closed mid-Run: from close to Run returning: ${summary(stops)}`);
      assert.ok(stops.length >= 1, "Runs terminated");
    });

    await t.step(
      "LoadModel past its deadline: DEADLINE_EXCEEDED, yet the model loads and the agent is healthy",
      async () => {
        await Deno.copyFile(PADDLE_DET, join(agent.modelsDir, "det2.onnx"));
        await signPackage(join(agent.modelsDir, "det2.onnx"));
        const client = new GrpcJsAgentClient(agent.socket);
        try {
          await rejectsWith(
            client.call("LoadModel", { url: `file://${join(agent.modelsDir, "det2.onnx")}`, name: "det2" }, 60),
            Status.DEADLINE_EXCEEDED,
          );
          let names: string[] = [];
          for (let i = 0; i < 500 && !names.includes("det2"); i++) {
            names = (await client.listModels()).models.map((m) => m.name);
            await new Promise((r) => setTimeout(r, 20));
          }
          assert.deepEqual(names.sort(), ["det", "det2"]);
          const loaded = await agent.logged((l) => l.msg === "model loaded" && l.model === "det2", "det2 loaded");
          console.log(`det2 loaded in ${loaded?.seconds} s, past the caller's 60 ms deadline`);
          assert.equal(await client.health(""), 1, "SERVING");

          // UnLoadModel waits for det2's running Predict: its deadline passes first, yet det2 goes.
          const running = predict(undefined, detRequest(1280, "det2"));
          await untilInFlight(metrics, 1);
          await rejectsWith(client.call("UnLoadModel", { name: "det2" }, 30), Status.DEADLINE_EXCEEDED);
          await running.done;
          await untilInFlight(metrics, 0);
          assert.deepEqual((await client.listModels()).models.map((m) => m.name), ["det"]);
        } finally {
          client.close();
        }
      },
    );

    grpcjs.close();
    const logs = parseLogs(agent.logs()); // every line is JSON: ORT printed nothing of its own
    assert.deepEqual(logs.filter((l) => l.level === "error" || l.level === "warn"), []);
  } finally {
    const status = await agent.stop();
    await Deno.remove(dir, { recursive: true });
    assert.equal(status.code, 0, agent.logs().slice(-3000));
  }
});
