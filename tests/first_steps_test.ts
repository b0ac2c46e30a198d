// The README's First steps, run as written: its three shell blocks in a folder of the clone, with the
// Deno running these tests first on PATH. The scores printed must be onnxruntime-node's for the same input.

import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import * as ort from "onnxruntime-node";
import { PROJECT_ROOT } from "./helpers/agent.ts";
import { PADDLE_CLS } from "./helpers/onnx_models.ts";

/** The ```sh blocks of the README's "First steps" section, in order. */
async function firstSteps(): Promise<string[]> {
  const readme = await Deno.readTextFile(join(PROJECT_ROOT, "README.md"));
  const start = readme.indexOf("\n## First steps\n");
  assert.ok(start >= 0, "README has a First steps section");
  const section = readme.slice(start, readme.indexOf("\n## ", start + 1));
  return [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]);
}

Deno.test("README first steps: sign a package with the project's commands, serve it with its config, Predict", async () => {
  const [prepare, serve, call] = await firstSteps();
  assert.ok(prepare && serve && call, "three blocks: prepare, serve, call");
  // A folder of the clone, as `try/` is. deno task names the caller's folder in INIT_CWD only when
  // it is not set yet, so the one of `deno task test` must not reach the commands.
  const dir = await Deno.makeTempDir({ dir: PROJECT_ROOT, prefix: ".first-steps-" });
  const env = Deno.env.toObject();
  delete env.INIT_CWD;
  env.PATH = `${dirname(Deno.execPath())}:${env.PATH ?? "/usr/bin:/bin"}`;
  const bash = (script: string, options: { piped?: boolean } = {}) =>
    new Deno.Command("bash", {
      args: ["-euo", "pipefail", "-c", script],
      cwd: dir,
      env,
      clearEnv: true,
      stdin: "null",
      stdout: options.piped ? "null" : "piped",
      stderr: "piped",
    });
  try {
    const prepared = await bash(prepare).output();
    assert.equal(prepared.code, 0, new TextDecoder().decode(prepared.stderr));
    // Relative paths meant this folder, and the package is for this machine.
    const manifest = JSON.parse(await Deno.readTextFile(join(dir, "models", "cls", "edge-model.json")));
    assert.equal(manifest.target_arch, Deno.build.arch);
    assert.ok((await Deno.stat(join(dir, "trust", "root.pem"))).isFile);

    // exec: the signal reaches deno task, as Ctrl-C would.
    const agent = bash(`exec ${serve.trim()}`, { piped: true }).spawn();
    const lines = agent.stderr.pipeThrough(new TextDecoderStream()).values();
    let seen = "";
    try {
      while (!seen.includes('"msg":"serving"')) {
        const { value, done } = await lines.next();
        assert.ok(!done, `the agent exited before serving:\n${seen}`);
        seen += value;
      }
      const called = await bash(call).output();
      const out = new TextDecoder().decode(called.stdout);
      assert.equal(called.code, 0, out + new TextDecoder().decode(called.stderr));
      assert.match(out, /^loaded\ncls {2}.*\/models\/cls\.tar\.gz\n {2}input {2}x FLOAT32 \[-1,3,-1,-1\]/m);
      const scores = /softmax_0\.tmp_0 FLOAT32 \[1,2\]\n {2}#(\d): (\S+)\n {2}#(\d): (\S+)/.exec(out);
      assert.ok(scores, out);
      const session = await ort.InferenceSession.create(PADDLE_CLS);
      const x = new ort.Tensor("float32", new Float32Array(3 * 48 * 192), [1, 3, 48, 192]);
      const expected = (await session.run({ x }))[session.outputNames[0]].data as Float32Array;
      await session.release();
      for (const [index, shown] of [[scores[1], scores[2]], [scores[3], scores[4]]]) {
        assert.ok(Math.abs(Number(shown) - expected[Number(index)]) < 1e-5, `#${index}: ${shown} vs ${expected}`);
      }
      console.log(out);
    } finally {
      agent.kill("SIGTERM");
      for await (const chunk of lines) seen += chunk;
      assert.equal((await agent.status).code, 0, seen);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
