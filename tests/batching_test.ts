// Dynamic batching against the real agent and ONNX Runtime: concurrent Predicts from several
// connections combined into shared Runs (the metrics prove it) and each caller answered with exactly
// its own rows, as one by one; shapes that cannot share a Run; callers that go while queued or while
// their Run is going; models that cannot be batched; and the default, no batching.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { parseConfig } from "../src/config.ts";
import { Status } from "../src/errors.ts";
import { enumValues, type Tensor } from "../src/service/wire.ts";
import { type AgentProcess, parseLogs, startAgent } from "./helpers/agent.ts";
import { floats, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { agentService, GrpcJsAgentClient } from "./helpers/grpcjs_client.ts";
import { buildModel, OnnxType, PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { SysvSegment } from "./helpers/shm_segments.ts";
import { untilInFlight } from "./helpers/wait.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;
const INT64 = enumValues("DataType").INT64;

/** sum = a + b and prod = a * b, both [n, k]: elementwise, so batched answers are bit-exact. */
function pairModel(): Uint8Array {
  return buildModel({
    inputs: [["a", OnnxType.FLOAT, ["n", "k"]], ["b", OnnxType.FLOAT, ["n", "k"]]],
    outputs: [["sum", OnnxType.FLOAT, ["n", "k"]], ["prod", OnnxType.FLOAT, ["n", "k"]]],
    nodes: [{ op: "Add", inputs: ["a", "b"], outputs: ["sum"] }, { op: "Mul", inputs: ["a", "b"], outputs: ["prod"] }],
  });
}

/** y = mean of all of x, shaped [1, 1] whatever x's rows. */
function meanModel(): Uint8Array {
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, ["n", 3]]],
    outputs: [["y", OnnxType.FLOAT, [1, 1]]],
    nodes: [{ op: "ReduceMean", inputs: ["x"], outputs: ["y"] }],
  });
}

/** y = x transposed, [k, n]: its first dimension is dynamic, but it is not the rows. */
function transposeModel(): Uint8Array {
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, ["n", "k"]]],
    outputs: [["y", OnnxType.FLOAT, ["k", "n"]]],
    nodes: [{ op: "Transpose", inputs: ["x"], outputs: ["y"] }],
  });
}

/** `steps` chained MatMuls of `from` [b, 512] by the identity, into `to`. */
function chain(steps: number, from: string, to: string) {
  return Array.from({ length: steps }, (_, s) => ({
    op: "MatMul",
    inputs: [s === 0 ? from : `${to}${s}`, "w"],
    outputs: [s === steps - 1 ? to : `${to}${s + 1}`],
  }));
}

function identity(n: number) {
  const weight = new Float32Array(n * n);
  for (let i = 0; i < n; i++) weight[i * n + i] = 1;
  return { name: "w", dims: [n, n], floats: weight };
}

/** `steps` chained MatMuls of x [b, 512] by the identity: slow enough to queue requests behind. */
function slowRowsModel(steps: number): Uint8Array {
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, ["b", SLOW_WIDTH]]],
    outputs: [["y", OnnxType.FLOAT, ["b", SLOW_WIDTH]]],
    nodes: chain(steps, "x", "y"),
    initializers: [identity(SLOW_WIDTH)],
  });
}

/**
 * y = table[idx] for a 10-entry table (an index out of range makes ONNX Runtime refuse the Run), and
 * z = x through a slow chain, so a request with many rows holds the model while others queue.
 */
function gatherModel(): Uint8Array {
  return buildModel({
    inputs: [["idx", OnnxType.INT64, ["n"]], ["x", OnnxType.FLOAT, ["n", SLOW_WIDTH]]],
    outputs: [["y", OnnxType.FLOAT, ["n"]], ["z", OnnxType.FLOAT, ["n", SLOW_WIDTH]]],
    nodes: [{ op: "Gather", inputs: ["table", "idx"], outputs: ["y"] }, ...chain(50, "x", "z")],
    initializers: [
      { name: "table", dims: [10], floats: Float32Array.from({ length: 10 }, (_, i) => i * 1.5) },
      identity(SLOW_WIDTH),
    ],
  });
}

const SLOW_WIDTH = 512;
/** Rows of a slow request: its Run takes a few hundred milliseconds here. */
const SLOW_ROWS = 256;
const slowInput = (seed: number, rows = SLOW_ROWS) => [
  tensor("x", FLOAT32, [rows, SLOW_WIDTH], pseudoRandomFloats(rows * SLOW_WIDTH, seed)),
];

const BATCHING = {
  cls: { max_batch_size: 8, max_delay_ms: 5 },
  pair: { max_batch_size: 16, max_delay_ms: 5 },
  "mean-fixed": {},
  // Its output's first dimension is x's second (7), never a batch's rows (at most 4).
  transpose: { max_batch_size: 4, max_delay_ms: 5 },
  // No wait: a long request reaching an idle model starts at once, so the next ones queue behind it.
  gather: { max_batch_size: 4096, max_delay_ms: 0 },
  slow: { max_batch_size: 4096, max_delay_ms: 0, max_queue: 2 },
};

async function loadModels(agent: AgentProcess): Promise<void> {
  const models: [string, Uint8Array][] = [
    ["cls", await Deno.readFile(PADDLE_CLS)],
    ["pair", pairModel()],
    ["mean-fixed", meanModel()],
    ["transpose", transposeModel()],
    ["gather", gatherModel()],
    ["slow", slowRowsModel(200)],
  ];
  for (const [name, bytes] of models) {
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, name, bytes), name);
  }
}

interface Call {
  model: string;
  tensors: Tensor[];
}

/** Calls of pair with rows 1-3 and k 3 or 5 (two shapes that cannot share a Run), distinct data each. */
function pairCalls(count: number): Call[] {
  return Array.from({ length: count }, (_, i) => {
    const rows = 1 + (i % 3);
    const k = i % 2 === 0 ? 3 : 5;
    return {
      model: "pair",
      tensors: [
        tensor("a", FLOAT32, [rows, k], pseudoRandomFloats(rows * k, 100 + i)),
        tensor("b", FLOAT32, [rows, k], pseudoRandomFloats(rows * k, 200 + i)),
      ],
    };
  });
}

/** Calls of cls with 1 or 2 rows of 3x48x192, distinct data each. */
function clsCalls(count: number): Call[] {
  return Array.from({ length: count }, (_, i) => {
    const rows = i % 4 === 3 ? 2 : 1;
    return {
      model: "cls",
      tensors: [tensor("x", FLOAT32, [rows, 3, 48, 192], pseudoRandomFloats(rows * 27648, i + 1))],
    };
  });
}

/** The calls all at once, spread over the clients (separate connections). */
function concurrently(clients: GrpcJsAgentClient[], calls: Call[]): Promise<{ tensors: Tensor[] }[]> {
  return Promise.all(calls.map((call, i) => clients[i % clients.length].predict(call.model, call.tensors)));
}

async function oneByOne(client: GrpcJsAgentClient, calls: Call[]): Promise<{ tensors: Tensor[] }[]> {
  const results = [];
  for (const call of calls) results.push(await client.predict(call.model, call.tensors));
  return results;
}

/** Same shapes and the same bytes, answer by answer. */
function assertSameAnswers(actual: { tensors: Tensor[] }[], expected: { tensors: Tensor[] }[]): void {
  assert.equal(actual.length, expected.length);
  actual.forEach((answer, i) => {
    assert.equal(answer.tensors.length, expected[i].tensors.length);
    answer.tensors.forEach((t, j) => {
      const e = expected[i].tensors[j];
      assert.deepEqual(
        t.tensor_metadata?.shape.map(Number),
        e.tensor_metadata?.shape.map(Number),
        `call ${i} output ${j}`,
      );
      assert.deepEqual(floats(t.byte_data), floats(e.byte_data), `call ${i} output ${j}`);
    });
  });
}

/** The batch size histogram of `model`: Runs, requests in them, and Runs of one request. */
async function batches(
  metricsSocket: string,
  model: string,
): Promise<{ runs: number; requests: number; alone: number }> {
  const samples = await scrapeMetrics(`unix:${metricsSocket}`);
  return {
    runs: samples.get(`edge_agent_predict_batch_size_count{model="${model}"}`) ?? 0,
    requests: samples.get(`edge_agent_predict_batch_size_sum{model="${model}"}`) ?? 0,
    alone: samples.get(`edge_agent_predict_batch_size_bucket{model="${model}",le="1"}`) ?? 0,
  };
}

async function unbatched(metricsSocket: string, model: string, reason: string): Promise<number> {
  return (await scrapeMetrics(`unix:${metricsSocket}`)).get(
    `edge_agent_predict_unbatched_total{model="${model}",reason="${reason}"}`,
  ) ?? 0;
}

/** grpc-js's own client of the Agent service, whose calls can be cancelled (RST_STREAM). */
function rawClient(socket: string) {
  const Raw = grpc.makeGenericClientConstructor(agentService, "Agent");
  return new Raw(`unix:${socket}`, grpc.credentials.createInsecure()) as unknown as grpc.Client & {
    Predict: (r: unknown, cb: (e: grpc.ServiceError | null) => void) => grpc.ClientUnaryCall;
  };
}

Deno.test("batching: concurrent Predicts share Runs and each caller gets exactly its own rows", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-batching-" });
  const metricsSocket = join(dir, "metrics.sock");
  const plainMetrics = join(dir, "plain-metrics.sock");
  // Runs that take every core: one Run of a model at once, so requests queue behind it.
  const agent = await startAgent({
    config: {
      edge_agent_batching: BATCHING,
      edge_agent_metrics: `unix:${metricsSocket}`,
      edge_agent_intra_op_threads: 0,
    },
  });
  // The same models on an agent with the default config: no batching.
  const plain = await startAgent({ config: { edge_agent_metrics: `unix:${plainMetrics}` } });
  const clients = Array.from({ length: 4 }, () => new GrpcJsAgentClient(agent.socket));
  try {
    await Promise.all([loadModels(agent), loadModels(plain)]);

    await t.step("models whose shapes cannot be batched are named at load and run one by one", async () => {
      // "slow" loads last: once its line is read, every earlier load's line is too.
      await agent.logged((l) => l.msg === "dynamic batching on" && l.model === "slow", "for the last model loaded");
      const logs = parseLogs(agent.logs());
      const on = logs.filter((l) => l.msg === "dynamic batching on").map((l) => l.model).sort();
      assert.deepEqual(on, ["cls", "gather", "pair", "slow", "transpose"]);
      const refused = logs.find((l) => /cannot be batched/.test(String(l.msg)));
      assert.equal(refused?.model, "mean-fixed");
      assert.equal(refused?.level, "warn");
      assert.match(String(refused?.reason), /output "y" has shape \[1,1\]: its first dimension is not dynamic/);
    });

    await t.step(
      "pair: 48 calls over 4 connections, two shapes, bit-exact as one by one and as unbatched",
      async () => {
        const calls = pairCalls(48);
        const expected = await oneByOne(plain.client, calls);
        // And the arithmetic itself, so neither agent can be wrong the same way.
        calls.forEach((call, i) => {
          const [a, b] = call.tensors.map((x) => floats(x.byte_data));
          assert.deepEqual(floats(expected[i].tensors[0].byte_data), a.map((v, k) => Math.fround(v + b[k])));
          assert.deepEqual(floats(expected[i].tensors[1].byte_data), a.map((v, k) => Math.fround(v * b[k])));
        });
        const before = await batches(metricsSocket, "pair");
        for (let round = 0; round < 3; round++) assertSameAnswers(await concurrently(clients, calls), expected);
        const after = await batches(metricsSocket, "pair");
        assert.equal(after.requests - before.requests, 3 * 48, "every call went through the batch queue");
        assert.ok(after.runs - before.runs < 3 * 48, `${after.runs - before.runs} Runs for ${3 * 48} calls`);
        assert.ok(after.runs - after.alone > 0, "some Runs held more than one request");
        // Shapes that differ never shared a Run (it would have failed, and its requests run again alone).
        assert.equal(await unbatched(metricsSocket, "pair", "fallback"), 0);
      },
    );

    // ONNX Runtime computes each image of a batch as it would alone: cls's answers are bit-exact too.
    await t.step("cls: 32 calls over 4 connections match one by one and the unbatched agent", async () => {
      const calls = clsCalls(32);
      const expected = await oneByOne(plain.client, calls);
      const before = await batches(metricsSocket, "cls");
      assertSameAnswers(await oneByOne(agent.client, calls), expected);
      assertSameAnswers(await concurrently(clients, calls), expected);
      const after = await batches(metricsSocket, "cls");
      assert.ok(after.runs - before.runs < 64, `${after.runs - before.runs} Runs for 64 calls`);
      assert.ok(after.runs - after.alone > 0, "some Runs held more than one request");
      assert.equal(await unbatched(metricsSocket, "cls", "fallback"), 0);
    });

    await t.step("a model whose outputs turn out not to split by rows falls back to one by one", async () => {
      const calls = Array.from({ length: 12 }, (_, i) => ({
        model: "transpose",
        tensors: [tensor("x", FLOAT32, [1 + (i % 2), 7], pseudoRandomFloats(7 * (1 + (i % 2)), 300 + i))],
      }));
      const expected = await oneByOne(plain.client, calls);
      assertSameAnswers(await concurrently(clients, calls), expected);
      assert.ok(await unbatched(metricsSocket, "transpose", "fallback") > 0, "a batch was tried and given up");
      const warning = await agent.logged(
        (l) => /turned off for this model/.test(String(l.msg)),
        "turning batching off",
      );
      assert.equal(warning?.model, "transpose");
      assert.match(String(warning?.reason), /output "y" has shape \[7,[2-4]\] for a batch of [2-4] rows/);
      // From then on it runs one by one.
      assertSameAnswers(await concurrently(clients, calls), expected);
      const fallbacks = await unbatched(metricsSocket, "transpose", "fallback");
      assert.ok(fallbacks >= 12, `${fallbacks} calls ran alone`);
      // The model refused at load mixes rows too, and was never batched.
      const means = calls.map((c) => ({
        model: "mean-fixed",
        tensors: [tensor("x", FLOAT32, [1, 3], floats(c.tensors[0].byte_data).subarray(0, 3))],
      }));
      assertSameAnswers(await concurrently(clients, means), await oneByOne(plain.client, means));
    });

    await t.step("requests whose inputs come by shared memory run alone, as without batching", async () => {
      const a = pseudoRandomFloats(6, 7), b = pseudoRandomFloats(6, 8);
      const segment = new SysvSegment(48).write(0, a).write(24, b);
      try {
        const handle = (offset: number) => ({ segment_id: segment.id, offset, size: 24 });
        const byHandle = ["a", "b"].map((name, i) => ({
          tensor_metadata: { name: new TextEncoder().encode(name), data_type: FLOAT32, shape: [2, 3] },
          shared_memory_handle: handle(24 * i),
        }));
        const before = await unbatched(metricsSocket, "pair", "shared_memory");
        const [viaShm, viaBytes] = await Promise.all([
          clients[0].predict("pair", byHandle),
          clients[1].predict("pair", [tensor("a", FLOAT32, [2, 3], a), tensor("b", FLOAT32, [2, 3], b)]),
        ]);
        assertSameAnswers([viaShm], [viaBytes]);
        assert.equal(await unbatched(metricsSocket, "pair", "shared_memory"), before + 1);
      } finally {
        segment.remove();
      }
    });

    await t.step("a request the model refuses fails alone; the others in its batch get their answers", async () => {
      const request = (idx: number[], seed: number) => [
        tensor("idx", INT64, [idx.length], BigInt64Array.from(idx.map(BigInt))),
        tensor("x", FLOAT32, [idx.length, SLOW_WIDTH], pseudoRandomFloats(idx.length * SLOW_WIDTH, seed)),
      ];
      // A Run of many rows holds the model, so the requests below all queue and share the next Run.
      const long = clients[0].predict("gather", request(Array.from({ length: 1024 }, (_, i) => i % 10), 1));
      await untilInFlight(metricsSocket, 1, { atLeast: true });
      const indexes = [[1], [2, 3], [99], [4], [0, 9], [5]];
      const outcomes = await Promise.allSettled(
        indexes.map((idx, i) => clients[1 + (i % 3)].predict("gather", request(idx, 10 + i))),
      );
      await long;
      outcomes.forEach((outcome, i) => {
        if (indexes[i].includes(99)) {
          assert.equal(outcome.status, "rejected");
          assert.equal((outcome as PromiseRejectedResult).reason.code, Status.INVALID_ARGUMENT);
          assert.match((outcome as PromiseRejectedResult).reason.details, /model gather failed on this input/);
        } else {
          assert.equal(outcome.status, "fulfilled", String((outcome as PromiseRejectedResult).reason));
          const answer = (outcome as PromiseFulfilledResult<{ tensors: Tensor[] }>).value;
          assert.deepEqual([...floats(answer.tensors[0].byte_data)], indexes[i].map((k) => k * 1.5));
          assert.deepEqual(floats(answer.tensors[1].byte_data), floats(request(indexes[i], 10 + i)[1].byte_data));
        }
      });
      // The long Run, the batch of six that ONNX Runtime refused, then each of the six alone.
      assert.equal(await unbatched(metricsSocket, "gather", "fallback"), 6);
    });

    await t.step("callers whose deadline passes or who reset their stream in the queue leave it", async () => {
      const x = slowInput;
      const before = await batches(metricsSocket, "slow");
      const cancelled = async (reason: string) =>
        (await scrapeMetrics(`unix:${metricsSocket}`)).get(`edge_agent_predict_cancelled_total{reason="${reason}"}`) ??
          0;
      const cancelledBefore = { deadline: await cancelled("deadline"), reset: await cancelled("reset") };
      const raw = rawClient(agent.socket);
      try {
        // Eight times the rows: a Run of seconds here, far past the next call's deadline.
        let firstDone = false;
        const first = clients[0].predict("slow", x(1, 8 * SLOW_ROWS)).finally(() => firstDone = true);
        await untilInFlight(metricsSocket, 1, { atLeast: true });
        // Queued behind the first Run; its deadline passes there.
        const late = clients[1].call("Predict", { name: "slow", tensors: x(2) }, 400);
        await rejectsWith(late, Status.DEADLINE_EXCEEDED);
        // Queued too, then reset by its caller.
        const gone = Promise.withResolvers<grpc.ServiceError | null>();
        const call = raw.Predict({ name: "slow", tensors: x(6) }, (error) => gone.resolve(error));
        await untilInFlight(metricsSocket, 2, { atLeast: true });
        call.cancel();
        assert.equal((await gone.promise)?.code, Status.CANCELLED);
        assert.ok(!firstDone, "both left while the first Run was going");
        const third = clients[2].predict("slow", x(3));
        const [a, c] = await Promise.all([first, third]);
        assert.deepEqual(floats(a.tensors[0].byte_data), floats(x(1, 8 * SLOW_ROWS)[0].byte_data));
        assert.deepEqual(floats(c.tensors[0].byte_data), floats(x(3)[0].byte_data));
        const after = await batches(metricsSocket, "slow");
        // Two Runs of one request each: the callers that went were in neither.
        assert.deepEqual({ runs: after.runs - before.runs, requests: after.requests - before.requests }, {
          runs: 2,
          requests: 2,
        });
        assert.equal(await cancelled("deadline"), cancelledBefore.deadline + 1);
        assert.equal(await cancelled("reset"), cancelledBefore.reset + 1);
      } finally {
        raw.close();
      }
    });

    await t.step("a caller that resets its stream during a shared Run: the others still get their rows", async () => {
      const x = slowInput;
      const raw = rawClient(agent.socket);
      try {
        const before = await batches(metricsSocket, "slow");
        const first = clients[0].predict("slow", x(1));
        await untilInFlight(metricsSocket, 1, { atLeast: true });
        const gone = Promise.withResolvers<grpc.ServiceError | null>();
        const call = raw.Predict({ name: "slow", tensors: x(2) }, (error) => gone.resolve(error));
        const stays = clients[2].predict("slow", x(3));
        await untilInFlight(metricsSocket, 3, { atLeast: true });
        await first;
        // The two queued calls now share a Run; one caller goes.
        call.cancel();
        assert.equal((await gone.promise)?.code, Status.CANCELLED);
        assert.deepEqual(floats((await stays).tensors[0].byte_data), floats(x(3)[0].byte_data));
        const after = await batches(metricsSocket, "slow");
        assert.deepEqual({ runs: after.runs - before.runs, requests: after.requests - before.requests }, {
          runs: 2,
          requests: 3,
        });
      } finally {
        raw.close();
      }
    });

    await t.step("past max_queue, requests run alone at once", async () => {
      const before = await unbatched(metricsSocket, "slow", "queue_full");
      let firstDone = false;
      const first = clients[0].predict("slow", slowInput(7, 4 * SLOW_ROWS)).finally(() => firstDone = true);
      await untilInFlight(metricsSocket, 1, { atLeast: true });
      const call = (seed: number, client: GrpcJsAgentClient) =>
        client.predict("slow", slowInput(seed, 16)).then((answer) => {
          assert.deepEqual(floats(answer.tensors[0].byte_data), floats(slowInput(seed, 16)[0].byte_data));
        });
      // Two fill the queue (max_queue 2) behind the first Run...
      const queued = [call(8, clients[1]), call(9, clients[2])];
      await untilInFlight(metricsSocket, 3, { atLeast: true });
      // ...and two more, sent while the first Run still goes, find it full: they run at once, alone.
      assert.ok(!firstDone, "the first Run still goes");
      await Promise.all([call(10, clients[3]), call(11, clients[1])]);
      assert.equal(await unbatched(metricsSocket, "slow", "queue_full"), before + 2);
      await Promise.all([first, ...queued]);
    });

    await t.step("UnLoadModel waits for queued requests, which are answered", async () => {
      const first = clients[0].predict("slow", slowInput(4));
      await untilInFlight(metricsSocket, 1, { atLeast: true });
      const queued = clients[1].predict("slow", slowInput(5));
      await untilInFlight(metricsSocket, 2, { atLeast: true });
      const unloaded = agent.client.unloadModel("slow");
      const [a, b] = await Promise.all([first, queued, unloaded]);
      assert.deepEqual(floats(a.tensors[0].byte_data), floats(slowInput(4)[0].byte_data));
      assert.deepEqual(floats(b.tensors[0].byte_data), floats(slowInput(5)[0].byte_data));
      assert.ok(!(await agent.client.listModels()).models.some((m) => m.name === "slow"));
    });

    await t.step("without edge_agent_batching nothing is batched", async () => {
      const samples = await scrapeMetrics(`unix:${plainMetrics}`);
      assert.deepEqual([...samples.keys()].filter((k) => k.includes("batch")), []);
      assert.ok(!parseLogs(plain.logs()).some((l) => /batching/.test(String(l.msg))));
      // Outputs of a model mixing rows stay whole: it was never batched.
      assertSameAnswers(await concurrently([plain.client], pairCalls(8)), await oneByOne(plain.client, pairCalls(8)));
    });
  } finally {
    for (const client of clients) client.close();
    for (const a of [agent, plain]) {
      assert.equal((await a.stop()).code, 0, a.logs());
      await Deno.remove(a.dir, { recursive: true });
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("batching: edge_agent_batching is checked at start-up", () => {
  const parse = (value: unknown) => parseConfig({ edge_agent_batching: value }).config;
  const cls = parse({ cls: { max_batch_size: 4, max_delay_ms: 0.5 }, "*": {}, det: false }).batching;
  assert.deepEqual(cls, {
    cls: { maxBatchSize: 4, maxDelayMs: 0.5, maxQueue: 64 },
    "*": { maxBatchSize: 8, maxDelayMs: 2, maxQueue: 64 },
    det: false,
  });
  const problem = (value: unknown) => {
    try {
      parse(value);
    } catch (error) {
      return (error as Error & { problems?: string[] }).message;
    }
    assert.fail(`${JSON.stringify(value)} was accepted`);
  };
  assert.match(problem([]), /edge_agent_batching" must be an object of model names/);
  assert.match(problem({ cls: { max_batch: 4 } }), /model "cls": unknown key "max_batch" \(known: max_batch_size/);
  assert.match(
    problem({ cls: { max_batch_size: 1 } }),
    /"max_batch_size" must be a whole number from 2 to 4096, got 1/,
  );
  assert.match(problem({ cls: { max_delay_ms: 1000 } }), /"max_delay_ms" must be a number from 0 to 100/);
  assert.match(problem({ "bad name": {} }), /model "bad name": not a model name/);
  assert.match(problem({ cls: true }), /model "cls" must be false or an object/);
});
