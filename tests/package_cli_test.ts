// The publisher's command line: development trust, sign, pack, verify, and the result loading in a
// real agent that trusts the new root.

import assert from "node:assert/strict";
import { join } from "node:path";
import { MAIN, startAgent } from "./helpers/agent.ts";
import { addSubModel } from "./helpers/onnx_models.ts";

async function cli(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), { args: ["run", "--allow-read", "--allow-write", MAIN, ...args] })
    .output();
  return { code: out.code, stdout: new TextDecoder().decode(out.stdout), stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("trust init, package sign, pack and verify; the archive loads in an agent trusting the root", async () => {
  const work = await Deno.makeTempDir({ prefix: "edge-agent-cli-" });
  try {
    const trust = join(work, "trust");
    const init = await cli("trust", "init", "--out", trust);
    assert.equal(init.code, 0, init.stderr);
    assert.match(init.stdout, /FOR DEVELOPMENT ONLY/);
    assert.equal((await Deno.stat(join(trust, "signing-key.pem"))).mode! & 0o777, 0o600);

    const folder = join(work, "addsub");
    await Deno.mkdir(folder);
    await Deno.writeFile(join(folder, "addsub.onnx"), addSubModel());
    const key = join(trust, "signing-key.pem");
    const chain = join(trust, "signing-chain.pem");
    const signed = await cli(
      "package",
      "sign",
      folder,
      "--key",
      key,
      "--cert-chain",
      chain,
      "--name",
      "addsub",
      "--arch",
      "any",
    );
    assert.equal(signed.code, 0, signed.stderr);
    assert.match(signed.stdout, /signed .* \(certificate method\)/);
    const manifest = JSON.parse(await Deno.readTextFile(join(folder, "edge-model.json")));
    assert.deepEqual(manifest, {
      name: "addsub",
      version: "1",
      framework: "onnx",
      model: "addsub.onnx",
      target_arch: "any",
    });

    const archive = join(work, "addsub.tar.gz");
    const packed = await cli("package", "pack", folder, "-o", archive);
    assert.equal(packed.code, 0, packed.stderr);
    const verified = await cli("package", "verify", archive, "--roots", join(trust, "root.pem"));
    assert.equal(verified.code, 0, verified.stderr);
    assert.match(verified.stdout, /verified/);
    assert.match(verified.stdout, /addsub\.onnx/);

    const agent = await startAgent({ config: { sagemaker_edge_core_root_certs_path: join(trust, "root.pem") } });
    try {
      await Deno.copyFile(archive, join(agent.modelsDir, "addsub.tar.gz"));
      const { model } = await agent.client.loadModel(join(agent.modelsDir, "addsub.tar.gz"), "addsub");
      assert.equal(model.input_tensor_metadatas.length, 2);
    } finally {
      assert.equal((await agent.stop()).code, 0, agent.logs());
      await Deno.remove(agent.dir, { recursive: true });
    }

    await Deno.writeTextFile(join(folder, "addsub.onnx"), "tampered");
    const refused = await cli("package", "verify", folder, "--roots", join(trust, "root.pem"));
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /verification failed: .*addsub\.onnx/);
    assert.doesNotMatch(refused.stderr, /\bat \w+ \(/, "no stack trace for a user error");
    const usage = await cli("package", "sign", folder);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--key <key\.pem> is required/);
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});
