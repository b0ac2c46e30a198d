// Prometheus metrics on a Unix socket: scraped over HTTP, parsed as the text format, counts moving as
// requests are made.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { enumValues } from "../src/service/wire.ts";
import { withAgent } from "./helpers/agent.ts";
import { rejectsWith, tensor } from "./helpers/assertions.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";

/** Samples of a text exposition: `name{labels}` -> value; every line must be a comment or a sample. */
function parse(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.trimEnd().split("\n")) {
    if (line.startsWith("# HELP ") || line.startsWith("# TYPE ")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (-?[0-9.e+-]+|\+Inf|NaN)$/.exec(line);
    assert.ok(match, `not a sample line: ${line}`);
    samples.set(match[1], Number(match[2]));
  }
  return samples;
}

async function scrape(socket: string): Promise<Map<string, number>> {
  const client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
  try {
    const response = await fetch("http://localhost/metrics", { client });
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
    return parse(await response.text());
  } finally {
    client.close();
  }
}

Deno.test("metrics: request counts by status, Predict histograms, models, captures and the process", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-metrics-" });
  const socket = join(dir, "metrics.sock");
  try {
    await withAgent({ config: { edge_agent_metrics: `unix:${socket}` } }, async (agent) => {
      const before = await scrape(socket);
      assert.equal(before.get("edge_agent_models_loaded"), 0);
      assert.ok(before.get("process_resident_memory_bytes")! > 10e6);
      await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
      const x = Float32Array.of(1, 2, 3, 4);
      const float32 = enumValues("DataType").FLOAT32;
      for (let i = 0; i < 3; i++) {
        await agent.client.predict("addsub", [tensor("a", float32, [2, 2], x), tensor("b", float32, [2, 2], x)]);
      }
      await rejectsWith(agent.client.predict("addsub", []), Status.INVALID_ARGUMENT);
      const after = await scrape(socket);
      assert.equal(after.get('edge_agent_requests_total{rpc="Predict",model="addsub",code="OK"}'), 3);
      assert.equal(after.get('edge_agent_requests_total{rpc="Predict",model="addsub",code="INVALID_ARGUMENT"}'), 1);
      assert.equal(after.get('edge_agent_requests_total{rpc="LoadModel",model="addsub",code="OK"}'), 1);
      assert.equal(after.get('edge_agent_predict_duration_seconds_count{model="addsub",phase="run"}'), 3);
      assert.equal(after.get('edge_agent_predict_duration_seconds_bucket{model="addsub",phase="total",le="+Inf"}'), 3);
      assert.ok(after.get('edge_agent_predict_duration_seconds_sum{model="addsub",phase="total"}')! > 0);
      assert.equal(after.get("edge_agent_models_loaded"), 1);
      assert.ok(after.get('edge_agent_model_load_seconds{model="addsub"}')! > 0);
      assert.equal(after.get("edge_agent_capture_pending"), 0);
      assert.ok(after.get("process_cpu_seconds_total")! > 0);

      // Names clients make up, and models once unloaded, leave no series behind: memory stays bounded.
      for (let i = 0; i < 50; i++) await rejectsWith(agent.client.predict(`made-up-${i}`, []), Status.NOT_FOUND);
      await agent.client.unloadModel("addsub");
      const last = await scrape(socket);
      assert.equal(last.get('edge_agent_requests_total{rpc="Predict",model="",code="NOT_FOUND"}'), 50);
      assert.equal(last.get('edge_agent_requests_total{rpc="UnLoadModel",model="",code="OK"}'), 1);
      const named = [...last.keys()].filter((k) => /model="(made-up|addsub)/.test(k));
      assert.deepEqual(named, [], "no series for unknown or unloaded models");
    });
    await assert.rejects(Deno.lstat(socket), Deno.errors.NotFound, "the metrics socket is removed at stop");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
