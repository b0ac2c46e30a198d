// Group commit under many senders, through the real agent and the product's own client: 24 connections
// send CaptureData back to back, so one spool fdatasync covers many acknowledgements; the agent is
// killed with SIGKILL at random moments, and every acknowledged capture must still be stored, once.

import assert from "node:assert/strict";
import { join } from "node:path";
import { AgentClient } from "../src/client/client.ts";
import { scrapeMetrics } from "../src/client/client_cli.ts";
import { enumValues } from "../src/service/wire.ts";
import { startAgent } from "./helpers/agent.ts";
import { tensor } from "./helpers/assertions.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";

const DataType = enumValues("DataType");
const SENDERS = 24;
const ROUNDS = 5;

async function storedIds(root: string): Promise<string[]> {
  const ids: string[] = [];
  const walk = async (dir: string) => {
    for await (const e of Deno.readDir(dir)) {
      const path = join(dir, e.name);
      if (e.isDirectory) await walk(path);
      else if (e.name.endsWith(".jsonl")) {
        for (const line of (await Deno.readTextFile(path)).trimEnd().split("\n")) {
          ids.push(JSON.parse(line).eventMetadata.eventId);
        }
      }
    }
  };
  await walk(root);
  return ids;
}

Deno.test(`${SENDERS} concurrent senders share spool flushes; SIGKILLs lose no acknowledged capture`, async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-group-commit-" });
  const acknowledged = new Set<string>();
  let acks = 0;
  let syncs = 0;
  let next = 0;
  try {
    for (let round = 0; round <= ROUNDS; round++) {
      const metrics = `unix:${join(dir, `metrics-${round}.sock`)}`;
      const agent = await startAgent({
        dir,
        config: {
          edge_agent_metrics: metrics,
          sagemaker_edge_core_capture_data_buffer_size: 100_000,
          sagemaker_edge_core_capture_data_push_period_seconds: 1,
        },
      });
      if (round === ROUNDS) {
        // The last start only delivers what the killed rounds acknowledged.
        try {
          const deadline = Date.now() + 60_000;
          while ((await scrapeMetrics(metrics)).get("edge_agent_capture_pending") !== 0) {
            assert.ok(Date.now() < deadline, "the recovered captures were not delivered within 60 s");
            await new Promise((r) => setTimeout(r, 100));
          }
        } finally {
          assert.equal((await agent.stop()).code, 0, agent.logs());
        }
        break;
      }
      const folder = await writeModelFolder(agent.modelsDir, `id-${round}`, identityModel(OnnxType.FLOAT, ["n"]));
      await agent.client.loadModel(folder, "id");
      const clients = Array.from({ length: SENDERS }, () => new AgentClient(agent.socket));
      let killed = false;
      const before = acknowledged.size;
      const senders = clients.map(async (client) => {
        while (!killed) {
          const id = `gc-${next++}`;
          try {
            await client.call("CaptureData", {
              model_name: "id",
              capture_id: id,
              input_tensors: [tensor("x", DataType.FLOAT32, [64], new Float32Array(64).fill(next))],
              output_tensors: [],
            });
            acknowledged.add(id);
          } catch {
            return; // the agent is gone; this one was never acknowledged
          }
        }
      });
      for (let waited = 0; acknowledged.size - before < 200 && waited < 10_000; waited += 5) {
        await new Promise((r) => setTimeout(r, 5));
      }
      const seen = await scrapeMetrics(metrics);
      acks += seen.get("edge_agent_capture_acknowledged_total")!;
      syncs += seen.get("edge_agent_capture_spool_syncs_total")!;
      // Killed a little later, at a random moment while the senders keep going.
      await new Promise((r) => setTimeout(r, Math.random() * 100));
      killed = true;
      agent.process.kill("SIGKILL");
      await Promise.all(senders);
      for (const client of clients) client.close();
      await agent.stop();
      assert.ok(acknowledged.size - before >= 200, `round ${round}: only ${acknowledged.size - before} acknowledged`);
    }
    const stored = await storedIds(join(dir, "state", "captures"));
    const twice = stored.filter((id, i) => stored.indexOf(id) !== i);
    assert.deepEqual(twice, [], "captures stored twice");
    const lost = [...acknowledged].filter((id) => !stored.includes(id));
    assert.deepEqual(lost, [], "acknowledged captures lost");
    // Group commit: with this many senders waiting, one fdatasync acknowledges several captures.
    assert.ok(acks >= 2 * syncs, `${acks} captures acknowledged by ${syncs} spool flushes`);
    console.log(
      `group commit: ${ROUNDS} SIGKILLs, ${acknowledged.size} acknowledged, ${stored.length} stored, 0 lost, ` +
        `0 duplicated; ${(acks / syncs).toFixed(1)} captures per spool fdatasync before the kills`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
