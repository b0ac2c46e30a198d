// RFC 9113 conformance of the agent's HTTP/2 server, judged by an independent peer: Python's
// hyper-h2 stack (h2, hyperframe, hpack from Debian) against the real agent over its Unix socket.
// Each case is one rule (tests/python/h2_conformance.py names its section): the exact GOAWAY or
// RST_STREAM code the rule asks for, or the answer it allows, and a well-behaved call served after.

import assert from "node:assert/strict";
import { join } from "node:path";
import { type AgentProcess, PROJECT_ROOT, withAgent } from "./helpers/agent.ts";
import { PYTHON } from "./helpers/python.ts";
import { SERVICE_NAME } from "../src/service/wire.ts";

const SCRIPT = join(PROJECT_ROOT, "tests/python/h2_conformance.py");

interface CaseResult {
  name: string;
  rfc: string;
  expected: string;
  got: string;
  ok: boolean;
}

async function h2Missing(): Promise<string | null> {
  try {
    const { success } = await new Deno.Command(PYTHON, {
      args: ["-c", "import h2, hyperframe, hpack"],
      stdout: "null",
      stderr: "null",
    }).output();
    return success ? null : `${PYTHON} lacks h2, hyperframe or hpack (Debian: python3-h2)`;
  } catch (error) {
    return `${PYTHON} cannot be run (${(error as Error).message})`;
  }
}

const skipReason = await h2Missing();
if (skipReason) console.log(`h2_conformance_test skipped: ${skipReason}`);

Deno.test({
  name: "HTTP/2 conformance (RFC 9113) against an independent peer: each rule's exact error code",
  ignore: skipReason !== null,
  async fn(t) {
    await withAgent({}, async (agent) => {
      const output = await new Deno.Command(PYTHON, {
        args: [SCRIPT, "--socket", agent.socket, "--service", SERVICE_NAME],
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(120_000),
      }).output();
      const stderr = new TextDecoder().decode(output.stderr);
      assert.ok(output.success, `h2_conformance.py failed:\n${stderr}`);
      const results: CaseResult[] = JSON.parse(new TextDecoder().decode(output.stdout));
      assert.ok(results.length >= 60, `only ${results.length} cases ran`);
      for (const result of results) {
        await t.step(`RFC 9113 ${result.rfc}: ${result.name} -> ${result.expected}`, () => {
          assert.ok(result.ok, `expected ${result.expected}, got ${result.got}`);
        });
      }
      // The agent logged why it reset or closed, and is still up.
      await agent.logged((l) => /^stream \d+ reset: /.test(String(l.error)), "a stream reset");
      assert.deepEqual((await agent.client.listModels()).models, []);
    });
  },
});

async function commandMissing(command: string): Promise<boolean> {
  try {
    await new Deno.Command(command, { args: ["--version"], stdout: "null", stderr: "null" }).output();
    return false;
  } catch {
    return true;
  }
}

const nghttp2Missing = (await Promise.all(["h2load", "nghttp", "socat"].map(commandMissing))).some((m) => m);
if (nghttp2Missing) {
  console.log("nghttp2 smoke test skipped: h2load, nghttp or socat missing (Debian: nghttp2-client, socat)");
}

async function run(command: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(command, {
    args,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  return new TextDecoder().decode(output.stdout) + new TextDecoder().decode(output.stderr);
}

/** Serves the agent's socket on 127.0.0.1 (the nghttp2 tools speak TCP only) while `fn` runs. */
async function withTcpBridge(agent: AgentProcess, fn: (url: string) => Promise<void>): Promise<void> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (probe.addr as Deno.NetAddr).port;
  probe.close();
  const socat = new Deno.Command("socat", {
    args: [`TCP-LISTEN:${port},bind=127.0.0.1,reuseaddr,fork`, `UNIX-CONNECT:${agent.socket}`],
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    // Up to 30 s for socat to listen: it starts at once, unless the machine is loaded.
    for (let i = 0; i < 300; i++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
        break;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    await fn(`http://127.0.0.1:${port}`);
  } finally {
    socat.kill();
    await socat.status;
  }
}

Deno.test({
  name: "nghttp2's h2load and nghttp (the reference C implementation) get valid answers to gRPC and plain requests",
  ignore: nghttp2Missing,
  async fn() {
    await withAgent({}, async (agent) => {
      await withTcpBridge(agent, async (url) => {
        const body = join(agent.dir, "empty-message.bin");
        await Deno.writeFile(body, new Uint8Array(5));
        const load = await run("h2load", [
          ...["-n", "500", "-c", "2", "-m", "10", "-d", body],
          ...["-H", "content-type: application/grpc", "-H", "te: trailers"],
          `${url}/${SERVICE_NAME}/ListModels`,
        ]);
        assert.match(load, /requests: 500 total, 500 started, 500 done, 500 succeeded, 0 failed, 0 errored/, load);
        assert.match(load, /status codes: 500 2xx/, load);
        const get = await run("nghttp", ["-v", `${url}/`]);
        assert.match(get, /:status: 405/, get);
        assert.match(get, /This is a gRPC server/, get);
        assert.doesNotMatch(get, /error_code=(?!NO_ERROR)/, get);
      });
    });
  },
});
