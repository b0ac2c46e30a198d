// The README's commands: `deno task start` runs with exactly a default deployment's permissions,
// and `deno task demo` runs the main job end to end.

import assert from "node:assert/strict";
import { DEFAULT_SOCKET_PATH, DEFAULTS } from "../src/config.ts";
import { agentPermissionFlags } from "../src/permissions.ts";
import { AgentClient } from "../src/client.ts";
import { Status } from "../src/errors.ts";
import { PROJECT_ROOT } from "./helpers/agent.ts";
import { rejectsWith } from "./helpers/assertions.ts";

const denoJson = JSON.parse(await Deno.readTextFile(`${PROJECT_ROOT}/deno.json`));

Deno.test("deno task start grants exactly the default deployment's permissions, and no -A", () => {
  const flags = agentPermissionFlags({ socketPath: DEFAULT_SOCKET_PATH, configPath: null, config: DEFAULTS });
  assert.equal(denoJson.tasks.start, `deno run ${flags.join(" ")} main.ts serve`);
  assert.doesNotMatch(denoJson.tasks.start, /\s(-A|--allow-all)\b/);
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

Deno.test({
  name: "the start task's command serves on Edge Manager's default socket with its own permissions",
  ignore: await Deno.lstat(DEFAULT_SOCKET_PATH).then(() => {
    console.log(`skipping the start task run: ${DEFAULT_SOCKET_PATH} is in use by something else`);
    return true;
  }, () => false),
  async fn() {
    const [, ...args] = denoJson.tasks.start.split(" ");
    const agent = new Deno.Command(Deno.execPath(), { args, cwd: PROJECT_ROOT, stderr: "piped" }).spawn();
    const client = new AgentClient(DEFAULT_SOCKET_PATH);
    try {
      const lines = agent.stderr.pipeThrough(new TextDecoderStream()).values();
      let seen = "";
      while (!seen.includes('"msg":"serving"')) {
        const { value, done } = await lines.next();
        assert.ok(!done, `the agent exited before serving:\n${seen}`);
        seen += value;
      }
      assert.deepEqual((await client.listModels()).models, []);
      // Outside the default model root, loading is refused by the agent's own policy.
      await rejectsWith(client.loadModel(PROJECT_ROOT, "m"), Status.PERMISSION_DENIED, /outside the model roots/);
      client.close();
      agent.kill("SIGTERM");
      for await (const _ of lines) { /* drain until exit */ }
      assert.equal((await agent.status).code, 0);
    } finally {
      client.close();
      try {
        agent.kill("SIGKILL");
      } catch { /* already exited */ }
      await agent.status;
    }
  },
});
