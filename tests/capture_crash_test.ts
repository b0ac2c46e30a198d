// Crash safety: a subprocess captures in a loop and prints each acknowledged id; it is killed with SIGKILL
// at random moments (sometimes while still opening and recovering), round after round, on one state
// folder. Every acknowledged capture must then be recovered and stored on S3 exactly once.

import assert from "node:assert/strict";
import { CaptureService, S3Client } from "../src/capture/mod.ts";
import { crashOutputBytes, crashS3Options, crashServiceOptions } from "./helpers/capture_crash_shared.ts";
import { TestS3 } from "./helpers/capture_fixtures.ts";

const ROUNDS = 24;
const writer = new URL("./helpers/capture_crash_writer.ts", import.meta.url).pathname;

/** Runs one writer round and returns the ids it acknowledged (complete lines only). */
async function round(stateDir: string, port: number, n: number): Promise<{ acked: string[]; killedEarly: boolean }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--quiet",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-net=127.0.0.1",
      writer,
      stateDir,
      String(port),
      String(n),
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let text = "";
  // The other rounds are killed once a random number of captures were acknowledged (counted, not
  // timed: on a loaded machine a capture may take long), a moment later still.
  const target = 6 + Math.floor(Math.random() * 15);
  const { promise: flowed, resolve: flow } = Promise.withResolvers<void>();
  const reading = (async () => {
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      if (text.startsWith("ready\n") && text.split("\n").length - 2 >= target) flow();
    }
    flow();
  })();
  // One round in five is killed early, possibly while the service is still opening and recovering.
  const killedEarly = n % 5 === 3;
  if (killedEarly) await new Promise((r) => setTimeout(r, 30 + Math.random() * 120));
  else {
    await flowed;
    await new Promise((r) => setTimeout(r, Math.random() * 50));
  }
  child.kill("SIGKILL");
  const status = await child.status;
  await reading;
  const err = await stderr;
  assert.equal(status.signal, "SIGKILL", `round ${n} ended by itself: ${err}`);
  const lines = text.split("\n");
  lines.pop(); // the last piece has no newline: possibly cut mid-write
  return { acked: lines.filter((l) => l !== "ready"), killedEarly };
}

Deno.test(`crash: ${ROUNDS} SIGKILLs at random moments lose no acknowledged capture and duplicate none`, async () => {
  const base = await Deno.makeTempDir({ prefix: "capture-crash-test-" });
  const s3 = await TestS3.start(`${base}/s3`);
  const stateDir = `${base}/state`;
  try {
    const acked: string[] = [];
    let early = 0;
    for (let n = 0; n < ROUNDS; n++) {
      const r = await round(stateDir, s3.port, n);
      acked.push(...r.acked);
      if (r.killedEarly) early++;
    }
    assert.equal(new Set(acked).size, acked.length);
    assert.ok(acked.length > 100, `only ${acked.length} captures acknowledged`);

    const client = new S3Client(crashS3Options(s3.port));
    const earlyManifests = (await s3.keys("crash/")).filter((k) => k.endsWith(".jsonl"));
    const storedEarly: string[] = [];
    for (const key of earlyManifests) {
      const text = new TextDecoder().decode((await client.getObject(key))!);
      // s3rver can show an object whose PUT was cut off by the kill (S3 itself never does); such a
      // manifest was not stored, and recovery uploads it again under the same key.
      if (!text.endsWith("\n")) continue;
      for (const line of text.trimEnd().split("\n")) storedEarly.push(JSON.parse(line).eventMetadata.eventId);
    }
    const service = await CaptureService.open(crashServiceOptions(stateDir, s3.port, {
      bufferSize: 100_000,
      batchSize: 50,
      pushPeriodSeconds: 0,
      retryBaseMs: 20,
    }));
    const recovered = service.stats().pending;
    // Stored at the destination, but killed before the batch was logged as done: uploaded again, same keys.
    const rewritten = storedEarly.filter((id) => service.status(id) === "IN_PROGRESS").length;
    for (const id of acked) {
      const status = service.status(id);
      assert.ok(status === "IN_PROGRESS" || status === "SUCCESS", `${id} is ${status} after the crashes`);
    }
    assert.ok(await service.flush(30_000), "everything recovered was delivered");
    for (const id of acked) assert.equal(service.status(id), "SUCCESS", id);
    await service.close();

    const keys = await s3.keys("crash/");
    const manifests = keys.filter((k) => k.endsWith(".jsonl"));
    const tensors = keys.filter((k) => k.endsWith(".bin"));
    const seen = new Map<string, number>();
    for (const key of manifests) {
      const text = new TextDecoder().decode((await client.getObject(key))!);
      for (const line of text.trimEnd().split("\n")) {
        const id = JSON.parse(line).eventMetadata.eventId as string;
        seen.set(id, (seen.get(id) ?? 0) + 1);
      }
    }
    const lines = [...seen.values()].reduce((a, b) => a + b, 0);
    const twice = [...seen].filter(([, c]) => c > 1).map(([id]) => id);
    assert.deepEqual(twice, [], "captures in more than one manifest line");
    const missing = acked.filter((id) => !seen.has(id));
    assert.deepEqual(missing, [], "acknowledged captures missing at the destination");
    const big = [...seen.keys()].filter((id) => crashOutputBytes(id) > 3072);
    assert.equal(tensors.length, big.length, "one tensor object per large output");
    for (const id of big) assert.equal(tensors.filter((k) => k.endsWith(`/${id}-output-0.bin`)).length, 1, id);
    console.log(
      `crash: ${ROUNDS} rounds (${early} killed while starting), ${acked.length} acknowledged, ` +
        `${earlyManifests.length} manifests stored during the rounds (${rewritten} of their captures killed before ` +
        `bookkeeping, so uploaded again), ${recovered} captures pending at the final open, ` +
        `${manifests.length} manifests with ${lines} lines ` +
        `(${
          lines - acked.length
        } durable but never acknowledged), ${tensors.length} tensor objects, 0 lost, 0 duplicated`,
    );
  } finally {
    await s3.stop();
    await Deno.remove(base, { recursive: true });
  }
});
