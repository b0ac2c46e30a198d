// RFC 9113 conformance of the agent's HTTP/2 server, judged by an independent peer: Python's
// hyper-h2 stack (h2, hyperframe, hpack from Debian) against the real agent over its Unix socket.
// Each case is one rule (tests/python/h2_conformance.py names its section): the exact GOAWAY or
// RST_STREAM code the rule asks for, or the answer it allows, and a well-behaved call served after.

import assert from "node:assert/strict";
import { join } from "node:path";
import { PROJECT_ROOT, withAgent } from "./helpers/agent.ts";
import { PYTHON } from "./helpers/python.ts";
import { SERVICE_NAME } from "../src/wire.ts";

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
      assert.match(agent.logs(), /stream \d+ reset: /);
      assert.deepEqual((await agent.client.listModels()).models, []);
    });
  },
});
