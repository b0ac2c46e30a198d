// Runs happen off the JavaScript thread: control-plane calls are answered during a long Predict,
// predicts run side by side (on one model and on several, up to the model's run slots, seen in the
// metrics), and an unload never frees a session under a running Run.

import assert from "node:assert/strict";
import { join } from "node:path";
import { AgentClient } from "../src/client/client.ts";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { parseConfig } from "../src/config.ts";
import { Status } from "../src/errors.ts";
import { concurrentRunsFor, threadPolicy } from "../src/inference/runtime.ts";
import { enumValues } from "../src/service/wire.ts";
import { loggedLines, parseLogs, startAgent } from "./helpers/agent.ts";
import { floats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { addSubModel, slowModel, writeModelFolder } from "./helpers/onnx_models.ts";
import { until, untilInFlight } from "./helpers/wait.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;
const N = 512;

/** x is diagonal-free noise; the slow model multiplies by the identity, so y must equal x. */
function slowInput(seed: number): Float32Array {
  return Float32Array.from({ length: N * N }, (_, i) => ((i * 2654435761 + seed) % 1000) / 1000);
}

Deno.test("concurrency: the agent answers while a slow Predict runs, and unload waits for it", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-concurrency-" });
  const metrics = join(dir, "metrics.sock");
  const agent = await startAgent({ dir, config: { edge_agent_metrics: `unix:${metrics}` } });
  const { client } = agent;
  try {
    await client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(N, 200)), "slow");
    await client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    const slowRequest = (seed: number) => [tensor("x", FLOAT32, [N, N], slowInput(seed))];

    await t.step(
      "ListModels, DescribeModel and another model's Predict are answered during a slow Predict",
      async () => {
        const order: string[] = [];
        const started = performance.now();
        const slow = client.predict("slow", slowRequest(1)).then((r) => {
          order.push("slow");
          return r;
        });
        await untilInFlight(metrics, 1);
        for (let i = 0; i < 2; i++) {
          await client.listModels();
          await client.describeModel("slow");
          const { tensors } = await client.predict("addsub", [
            tensor("a", FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1)),
            tensor("b", FLOAT32, [2, 2], Float32Array.of(i, i, i, i)),
          ]);
          assert.deepEqual([...floats(tensors[0].byte_data)], [1 + i, 1 + i, 1 + i, 1 + i]);
        }
        order.push("control");
        const result = await slow;
        const slowMs = performance.now() - started;
        assert.deepEqual(order, ["control", "slow"], `the slow Predict took ${slowMs.toFixed(0)} ms`);
        assert.deepEqual(floats(result.tensors[0].byte_data), slowInput(1));
      },
    );

    await t.step("concurrent Predicts on one model each get their own answer", async () => {
      const results = await Promise.all([2, 3, 4].map((seed) => client.predict("slow", slowRequest(seed))));
      results.forEach((r, i) => assert.deepEqual(floats(r.tensors[0].byte_data), slowInput(i + 2)));
    });

    await t.step("concurrent LoadModel of one name: exactly one wins, the others get ALREADY_EXISTS", async () => {
      const folder = await writeModelFolder(agent.modelsDir, "addsub2", addSubModel());
      const outcomes = await Promise.allSettled([1, 2, 3, 4].map(() => client.loadModel(folder, "twin")));
      assert.equal(outcomes.filter((o) => o.status === "fulfilled").length, 1);
      for (const o of outcomes.filter((o) => o.status === "rejected")) {
        assert.equal((o as PromiseRejectedResult).reason.code, Status.ALREADY_EXISTS);
      }
      await client.unloadModel("twin");
    });

    await t.step("UnLoadModel during a running Predict waits for it; the Predict succeeds", async () => {
      let predictDone = 0;
      let unloadDone = 0;
      const slow = client.predict("slow", slowRequest(5)).then((r) => {
        predictDone = performance.now();
        return r;
      });
      await untilInFlight(metrics, 1);
      const unload = client.unloadModel("slow").then(() => unloadDone = performance.now());
      // Once unloading has begun, new calls see the model as gone.
      await until(async () => !(await client.listModels()).models.some((m) => m.name === "slow"), "unloading began");
      await rejectsWith(client.predict("slow", slowRequest(6)), Status.NOT_FOUND);
      const [result] = await Promise.all([slow, unload]);
      assert.deepEqual(floats(result.tensors[0].byte_data), slowInput(5));
      // Both answers leave the agent in the same turn once the Run ends; an unload that did not
      // wait would have been answered while the Run (hundreds of ms) was still going.
      assert.ok(unloadDone >= predictDone - 50, `unload answered ${(predictDone - unloadDone).toFixed(0)} ms early`);
      assert.deepEqual((await client.listModels()).models.map((m) => m.name), ["addsub"]);
    });
  } finally {
    assert.equal((await agent.stop()).code, 0, agent.logs());
    await Deno.remove(agent.dir, { recursive: true });
  }
});

const M = 256;

/** x for the M x M slow model; its output equals x. */
function overlapInput(seed: number): Float32Array {
  return Float32Array.from({ length: M * M }, (_, i) => ((i * 40503 + seed * 7919) % 997) / 997);
}

/** Scrapes every few ms until `done` settles; returns every scrape taken meanwhile. */
async function scrapeWhile(metrics: string, done: Promise<unknown>): Promise<Map<string, number>[]> {
  let finished = false;
  done.finally(() => finished = true).catch(() => {});
  const scrapes: Map<string, number>[] = [];
  while (!finished) {
    scrapes.push(await scrapeMetrics(metrics));
    await new Promise((r) => setTimeout(r, 5));
  }
  return scrapes;
}

const runs = (scrape: Map<string, number>, metric: string, model: string) =>
  scrape.get(`edge_agent_${metric}{model="${model}"}`) ?? NaN;

Deno.test("concurrency: Runs of one model and of two models overlap, from separate connections", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-concurrency-" });
  const metrics = `unix:${join(dir, "metrics.sock")}`;
  const agent = await startAgent({
    dir,
    config: {
      edge_agent_metrics: metrics,
      edge_agent_intra_op_threads: 1,
      edge_agent_max_concurrent_runs: 2,
    },
  });
  const clients = Array.from({ length: 5 }, () => new AgentClient(agent.socket));
  try {
    // Runs of a few hundred ms (overlap-long: seconds), long beside the scrapes that watch them.
    for (const [name, steps] of [["overlap-a", 400], ["overlap-b", 400], ["overlap-long", 1500]] as const) {
      await agent.client.loadModel(await writeModelFolder(agent.modelsDir, name, slowModel(M, steps)), name);
    }
    const request = (seed: number) => [tensor("x", FLOAT32, [M, M], overlapInput(seed))];

    await t.step("the thread policy in effect is the config's, in the log and the metrics", async () => {
      const logged = parseLogs(agent.logs()).find((l) => l.msg === "thread policy");
      assert.equal(logged?.intraOpThreads, 1);
      assert.equal(logged?.concurrentRuns, 2);
      assert.equal(logged?.sharedThreadPools, true);
      const scrape = await scrapeMetrics(metrics);
      assert.equal(scrape.get('edge_agent_thread_policy{setting="intra_op_threads"}'), 1);
      assert.equal(scrape.get('edge_agent_thread_policy{setting="concurrent_runs"}'), 2);
      assert.equal(scrape.get('edge_agent_thread_policy{setting="shared_thread_pools"}'), 1);
    });

    await t.step(
      "five callers, three on one model and two on another: all answered right, Runs side by side",
      async () => {
        // Three calls on overlap-a (two slots: one waits), two on overlap-b, each on its own connection.
        const models = ["overlap-a", "overlap-a", "overlap-a", "overlap-b", "overlap-b"];
        const all = Promise.all(clients.map((client, i) => client.predict(models[i], request(i))));
        const scrapes = await scrapeWhile(metrics, all);
        const results = await all;
        results.forEach((r, i) => assert.deepEqual(floats(r.tensors[0].byte_data), overlapInput(i), `caller ${i}`));
        // Each seen at one instant: both of a's slots busy, a third call on a waiting, a and b running together.
        const seen = (what: string, at: (s: Map<string, number>) => boolean) =>
          assert.ok(scrapes.some(at), `no scrape of ${scrapes.length} saw ${what}`);
        seen("two Runs of one model", (s) => runs(s, "runs_in_flight", "overlap-a") === 2);
        seen("a call waiting for a slot", (s) => runs(s, "runs_waiting", "overlap-a") === 1);
        seen(
          "Runs of two models side by side",
          (s) => runs(s, "runs_in_flight", "overlap-a") >= 1 && runs(s, "runs_in_flight", "overlap-b") >= 1,
        );
        const after = await scrapeMetrics(metrics);
        // Never more than the two slots, though three callers asked at once.
        assert.equal(runs(after, "runs_in_flight_peak", "overlap-a"), 2);
        assert.equal(runs(after, "runs_in_flight", "overlap-a"), 0);
        assert.equal(runs(after, "runs_waiting", "overlap-a"), 0);
      },
    );

    await t.step("a call waiting for a slot gives up at its deadline without running", async () => {
      const before = await scrapeMetrics(metrics);
      // The client resets the call at its deadline as the agent's own timer fires: either reason counts.
      const cancelled = (s: Map<string, number>) =>
        ["deadline", "reset"].reduce(
          (n, reason) => n + s.get(`edge_agent_predict_cancelled_total{reason="${reason}"}`)!,
          0,
        );
      // Runs far longer than the deadline, so the third call is still waiting when it passes.
      const busy = [clients[0].predict("overlap-long", request(10)), clients[1].predict("overlap-long", request(11))];
      try {
        const giveUp = Date.now() + 30_000;
        while (runs(await scrapeMetrics(metrics), "runs_in_flight", "overlap-long") < 2) {
          assert.ok(Date.now() < giveUp, "two Runs of overlap-long never went at once");
          await new Promise((r) => setTimeout(r, 5));
        }
        await rejectsWith(
          clients[2].call("Predict", { name: "overlap-long", tensors: request(12) }, 100),
          Status.DEADLINE_EXCEEDED,
        );
        // The client gives up at its deadline too, so the agent's count may come a moment later.
        let during = await scrapeMetrics(metrics);
        for (let i = 0; i < 200 && cancelled(during) === cancelled(before); i++) {
          await new Promise((r) => setTimeout(r, 10));
          during = await scrapeMetrics(metrics);
        }
        assert.equal(cancelled(during), cancelled(before) + 1);
        assert.equal(runs(during, "runs_waiting", "overlap-long"), 0, "the expired call left the line");
      } finally {
        await Promise.allSettled(busy);
      }
      const results = await Promise.all(busy);
      results.forEach((r, i) => assert.deepEqual(floats(r.tensors[0].byte_data), overlapInput(10 + i)));
      // It never ran: only the two busy calls ever held slots.
      assert.equal(runs(await scrapeMetrics(metrics), "runs_in_flight_peak", "overlap-long"), 2);
    });
  } finally {
    for (const client of clients) client.close();
    assert.equal((await agent.stop()).code, 0, agent.logs());
    await Deno.remove(dir, { recursive: true });
  }
});

/** Threads of the process: ONNX Runtime's pools, and Deno's own (its tokio workers start as work comes). */
function threads(pid: number): number {
  return [...Deno.readDirSync(`/proc/${pid}/task`)].length;
}

Deno.test("concurrency: with shared thread pools, loading models adds no threads; without, each adds its own pool", async () => {
  const added: Record<string, number> = {};
  for (const shared of [true, false]) {
    const agent = await startAgent({
      config: { edge_agent_intra_op_threads: 3, edge_agent_shared_thread_pools: shared },
    });
    try {
      // The environment (and shared pools with it) comes with the first model: count from there.
      await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "m1", addSubModel()), "m1");
      const before = threads(agent.process.pid);
      for (const name of ["m2", "m3"]) {
        await agent.client.loadModel(await writeModelFolder(agent.modelsDir, name, addSubModel()), name);
      }
      const { tensors } = await agent.client.predict("m3", [
        tensor("a", FLOAT32, [2, 2], Float32Array.of(1, 2, 3, 4)),
        tensor("b", FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1)),
      ]);
      assert.deepEqual([...floats(tensors[0].byte_data)], [2, 3, 4, 5]);
      added[String(shared)] = threads(agent.process.pid) - before;
    } finally {
      assert.equal((await agent.stop()).code, 0, agent.logs());
      await Deno.remove(agent.dir, { recursive: true });
    }
  }
  // Three intra-op threads per Run: the calling thread and two pool workers, per model or once for all.
  // Deno may start one more worker of its own for the loads' file reads or the Run's call.
  assert.ok(added.true <= 1, `shared pools: ${added.true} threads added by two more models`);
  assert.ok(added.false >= 4, `own pools: ${added.false} threads added by two more models`);
});

Deno.test("concurrency: a model given threads of its own gets pools of its own beside the shared ones", async () => {
  const agent = await startAgent({
    config: { edge_agent_intra_op_threads: 1, edge_agent_model_intra_op_threads: { big: 3 } },
  });
  try {
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "small", addSubModel()), "small");
    const before = threads(agent.process.pid);
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "big", addSubModel()), "big");
    const { tensors } = await agent.client.predict("big", [
      tensor("a", FLOAT32, [2, 2], Float32Array.of(1, 2, 3, 4)),
      tensor("b", FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1)),
    ]);
    assert.deepEqual([...floats(tensors[0].byte_data)], [2, 3, 4, 5]);
    // Its intra-op pool: the calling thread and two workers.
    assert.ok(threads(agent.process.pid) - before >= 2, "the named model brought its own pool");
  } finally {
    assert.equal((await agent.stop()).code, 0, agent.logs());
    await Deno.remove(agent.dir, { recursive: true });
  }
});

Deno.test("concurrency: the thread policy from the config keys, for a given number of cores", () => {
  const policy = (keys: Record<string, unknown>, cores: number) => threadPolicy(parseConfig(keys).config, cores);
  // Defaults: one thread per Run, as many Runs of a model at once as there are cores, pools shared.
  assert.deepEqual(policy({}, 4), {
    cores: 4,
    intraOpThreads: 1,
    interOpThreads: 1,
    concurrentRuns: 4,
    sharedThreadPools: true,
  });
  // Runs of all cores' threads go one at a time; of two threads, two at a time on four cores.
  assert.equal(policy({ edge_agent_intra_op_threads: 0 }, 4).intraOpThreads, 4);
  assert.equal(policy({ edge_agent_intra_op_threads: 0 }, 4).concurrentRuns, 1);
  assert.equal(policy({ edge_agent_intra_op_threads: 2 }, 4).concurrentRuns, 2);
  assert.equal(policy({ edge_agent_intra_op_threads: 8 }, 4).concurrentRuns, 1);
  // Set explicitly, the limit is the config's whatever the cores.
  assert.equal(policy({ edge_agent_max_concurrent_runs: 3, edge_agent_intra_op_threads: 0 }, 4).concurrentRuns, 3);
  assert.equal(policy({ edge_agent_shared_thread_pools: false }, 2).sharedThreadPools, false);
  // A model given all cores runs one at a time; the others keep the policy's slots.
  const named = parseConfig({ edge_agent_model_intra_op_threads: { det: 0, mid: "2" } }).config;
  assert.equal(concurrentRunsFor(named, "det", 4), 1);
  assert.equal(concurrentRunsFor(named, "mid", 4), 2);
  assert.equal(concurrentRunsFor(named, "cls", 4), 4);
  assert.equal(concurrentRunsFor(named, "constructor", 4), 4);
  assert.throws(
    () => parseConfig({ edge_agent_model_intra_op_threads: { det: -1 } }),
    /"edge_agent_model_intra_op_threads", model "det": must be a whole number of threads from 0/,
  );
  assert.throws(() => parseConfig({ edge_agent_model_intra_op_threads: [1] }), /must be an object of model names/);
});

Deno.test("concurrency: a short Run goes on the agent's own thread only while it is the only Predict", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-inline-" });
  const metrics = join(dir, "metrics.sock");
  const agent = await startAgent({
    dir,
    config: { edge_agent_metrics: `unix:${metrics}`, sagemaker_edge_log_verbose: true },
  });
  const off = await startAgent({ config: { sagemaker_edge_log_verbose: true, edge_agent_inline_run_max_us: 0 } });
  const addsubRequest = (i: number) => [
    tensor("a", FLOAT32, [2, 2], Float32Array.of(1, 2, 3, 4)),
    tensor("b", FLOAT32, [2, 2], Float32Array.of(i, i, i, i)),
  ];
  const predictLines = async (of: typeof agent, count: number) =>
    (await loggedLines(
      of,
      (l) => l.msg === "rpc" && l.rpc === "Predict",
      (l) => l.length >= count,
      `${count} Predicts`,
    ))
      .slice(0, count);
  try {
    for (const each of [agent, off]) {
      await each.client.loadModel(await writeModelFolder(each.modelsDir, "addsub", addSubModel()), "addsub");
    }
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(N, 200)), "slow");

    await t.step(
      "one client's Predicts on a small model: on the agent's thread once its Runs are known short",
      async () => {
        for (let i = 0; i < 30; i++) {
          const { tensors } = await agent.client.predict("addsub", addsubRequest(i));
          assert.deepEqual([...floats(tensors[0].byte_data)], [1 + i, 2 + i, 3 + i, 4 + i]);
        }
        const lines = await predictLines(agent, 30);
        assert.equal(lines[0].onThisThread, undefined, "the first Run, of unknown length, goes to a worker thread");
        assert.ok(lines.slice(20).every((l) => l.onThisThread === true), JSON.stringify(lines.slice(20)));
      },
    );

    await t.step("while a slow Predict is in flight, the small model's Run goes to a worker thread", async () => {
      const slow = agent.client.predict("slow", [tensor("x", FLOAT32, [N, N], slowInput(3))]);
      await untilInFlight(metrics, 1);
      const { tensors } = await agent.client.predict("addsub", addsubRequest(7));
      assert.deepEqual([...floats(tensors[0].byte_data)], [8, 9, 10, 11]);
      const answered = await predictLines(agent, 31);
      assert.equal(answered[30].onThisThread, undefined, "it ran beside the slow one");
      assert.deepEqual(floats((await slow).tensors[0].byte_data), slowInput(3));
      // The slow model's Runs (200 ms) never go on the agent's thread, even alone.
      for (const seed of [4, 5, 6]) await agent.client.predict("slow", [tensor("x", FLOAT32, [N, N], slowInput(seed))]);
      const slowLines = (await predictLines(agent, 35)).slice(31);
      assert.ok(slowLines.every((l) => l.onThisThread === undefined), JSON.stringify(slowLines));
    });

    await t.step("edge_agent_inline_run_max_us 0: every Run goes to a worker thread", async () => {
      for (let i = 0; i < 20; i++) await off.client.predict("addsub", addsubRequest(i));
      const lines = await predictLines(off, 20);
      assert.ok(lines.every((l) => l.onThisThread === undefined), JSON.stringify(lines.slice(10)));
    });
  } finally {
    await agent.stop();
    await off.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
