// CaptureService with the Disk destination and injected faults: layout and manifests, statuses across
// restarts, admission control, torn-tail recovery, dead letters, outages, retention, the state lock.

import assert from "node:assert/strict";
import {
  type CaptureOptions,
  type CaptureRecord,
  CaptureService,
  decodeRecord,
  type Destination,
  DestinationError,
  DiskDestination,
} from "../src/capture/mod.ts";
import { AgentError, Status } from "../src/errors.ts";
import { makeRecord, quiet, readBack, readBackManifest } from "./helpers/capture_fixtures.ts";

const decoder = new TextDecoder();

async function tempDirs() {
  const base = await Deno.makeTempDir({ prefix: "capture-test-" });
  return { base, stateDir: `${base}/state`, diskPath: `${base}/disk` };
}

function open(dirs: { stateDir: string; diskPath: string }, extra: Partial<CaptureOptions> = {}) {
  return CaptureService.open({
    stateDir: dirs.stateDir,
    deviceFleetName: "fleet-1",
    deviceName: "device 1",
    folderPrefix: "edge/captures",
    destination: "Disk",
    diskPath: dirs.diskPath,
    batchSize: 3,
    pushPeriodSeconds: 0.2,
    retryBaseMs: 10,
    retryMaxMs: 50,
    logger: quiet,
    ...extra,
  });
}

async function rejectsWith(call: Promise<unknown>, code: Status): Promise<AgentError> {
  try {
    await call;
  } catch (e) {
    assert.ok(e instanceof AgentError, `expected AgentError, got ${e}`);
    assert.equal(Status[e.code], Status[code], e.message);
    return e;
  }
  assert.fail(`expected ${Status[code]}`);
}

async function walk(root: string, rel = ""): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const e of Deno.readDir(`${root}/${rel}`)) {
      const child = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory) out.push(...await walk(root, child));
      else out.push(child);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return out.sort();
}

Deno.test("Disk, Edge Manager layout (default): <prefix>/<fleet>/<model>/YYYY/MM/DD/HH, records and data-refs", async () => {
  const dirs = await tempDirs();
  const sizes: Record<string, number> = { c1: 16, c2: 5000, c3: 3072, c4: 3073, c5: 100_000, c6: 0, c7: 20 };
  try {
    const service = await open(dirs);
    for (const [id, n] of Object.entries(sizes)) {
      await service.capture({ ...makeRecord(id, id === "c7" ? "model/b" : "model-a", n), modelVersion: "2.1" });
    }
    assert.ok(await service.flush(10_000));
    for (const id of Object.keys(sizes)) assert.equal(service.status(id), "SUCCESS", id);
    await service.close();

    const files = await walk(dirs.diskPath);
    const batch = "\\d{8}T\\d{9}Z-[0-9a-f]{16}";
    for (const f of files) {
      assert.match(
        f,
        new RegExp(
          `^edge/captures/fleet-1/(model-a|model%2Fb)/2024/05/29/16/(${batch}\\.jsonl|${batch}/c\\d-output-0\\.bin)$`,
        ),
      );
    }
    const records = await readBack(files, (k) => Deno.readFile(`${dirs.diskPath}/${k}`), (id) => sizes[id]);
    assert.deepEqual([...records.keys()].sort(), Object.keys(sizes));
    assert.equal(files.filter((f) => f.endsWith(".bin")).length, 3, "c2, c4 and c5 are separate objects");
    const c4 = records.get("c4")!.deviceFleetOutputs[0];
    assert.equal(c4["data-ref"], `file://${dirs.diskPath}/${files.find((f) => f.endsWith("/c4-output-0.bin"))}`);
    const c7 = records.get("c7")!;
    assert.deepEqual(c7.eventMetadata, {
      deviceFleetName: "fleet-1",
      deviceId: "device 1",
      eventId: "c7",
      inferenceTime: "2024-05-29T16:26:40",
      modelName: "model/b",
      modelVersion: "2.1",
    });
    assert.deepEqual(Object.entries(c7.deviceFleetInputs[0]), [
      ["name", "input"],
      ["data", c7.deviceFleetInputs[0].data],
      ["encoding", "BASE64"],
      ["mode", "Input"],
      ["observedContentType", "Tensor[FLOAT32; 1, 4]"],
    ]);
    assert.equal(c7.deviceFleetOutputs[0].observedContentType, "Tensor[UINT8; 20]");
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("a batch whose captures span hours writes one record file per hour folder, same batch id", async () => {
  const dirs = await tempDirs();
  try {
    const service = await open(dirs, { batchSize: 2, pushPeriodSeconds: 3600 });
    await service.capture(makeRecord("h1", "m"));
    const later = makeRecord("h2", "m");
    await service.capture({ ...later, inferenceTimestamp: { seconds: 1_717_000_000 + 3600, nanos: 0 } });
    assert.ok(await service.flush(5000));
    await service.close();
    const files = await walk(dirs.diskPath);
    assert.equal(files.length, 2, files.join("\n"));
    const [first, second] = files;
    assert.match(first, /^edge\/captures\/fleet-1\/m\/2024\/05\/29\/16\/[^/]+\.jsonl$/);
    assert.match(second, /^edge\/captures\/fleet-1\/m\/2024\/05\/29\/17\/[^/]+\.jsonl$/);
    assert.equal(first.split("/").at(-1), second.split("/").at(-1));
    const ids = await Promise.all(files.map(async (f) => JSON.parse(await Deno.readTextFile(`${dirs.diskPath}/${f}`))));
    assert.deepEqual(ids.map((r) => [r.eventMetadata.eventId, r.eventMetadata.inferenceTime]), [
      ["h1", "2024-05-29T16:26:40"],
      ["h2", "2024-05-29T17:26:40"],
    ]);
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test('Disk, manifest layout (edge_agent_capture_layout "manifest"): manifests parse, tensors read back byte-exact', async () => {
  const dirs = await tempDirs();
  const sizes: Record<string, number> = { c1: 16, c2: 5000, c3: 3072, c4: 3073, c5: 100_000, c6: 0, c7: 20 };
  try {
    const service = await open(dirs, { layout: "manifest" });
    for (const [id, n] of Object.entries(sizes)) {
      await service.capture(makeRecord(id, id === "c7" ? "model/b" : "model-a", n));
      assert.equal(service.status(id), "IN_PROGRESS");
    }
    assert.ok(await service.flush(10_000));
    for (const id of Object.keys(sizes)) assert.equal(service.status(id), "SUCCESS", id);
    const stats = service.stats();
    assert.equal(stats.uploaded, 7);
    assert.equal(stats.pending, 0);
    assert.ok(stats.lastUploadAt !== null);
    await service.close();

    const files = await walk(dirs.diskPath);
    const d = new Date();
    const day = `${d.getUTCFullYear()}/${String(d.getUTCMonth() + 1).padStart(2, "0")}/` +
      String(d.getUTCDate()).padStart(2, "0");
    const batch = "\\d{8}T\\d{9}Z-[0-9a-f]{16}";
    for (const f of files) {
      assert.match(
        f,
        new RegExp(
          `^edge/captures/fleet-1/device%201/(model-a|model%2Fb)/${day}/` +
            `(${batch}\\.jsonl|tensors/${batch}/c\\d/output-0-scores\\.bin)$`,
        ),
      );
    }
    const lines = await readBackManifest(files, (k) => Deno.readFile(`${dirs.diskPath}/${k}`), (id) => sizes[id]);
    assert.deepEqual([...lines.keys()].sort(), Object.keys(sizes));
    assert.equal(files.filter((f) => f.endsWith(".bin")).length, 3, "c2, c4 and c5 are separate objects");
    assert.equal(lines.get("c7")!.modelName, "model/b");
    assert.equal(lines.get("c1")!.inferenceTime, "2024-05-29T16:26:40.123Z");
    assert.equal(lines.get("c1")!.outputTensors[0].dataTypeName, "UINT8");
    assert.deepEqual(lines.get("c1")!.inputTensors[0].shape, [1, 4]);
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("statuses survive a restart; has() sees pending and finished ids; unknown ids are NOT_FOUND", async () => {
  const dirs = await tempDirs();
  try {
    const service = await open(dirs, { pushPeriodSeconds: 3600, batchSize: 2 });
    await service.capture(makeRecord("done-1"));
    await service.capture(makeRecord("done-2"));
    await service.capture(makeRecord("waiting"));
    assert.ok(service.has("waiting"));
    await rejectsWith(service.capture(makeRecord("waiting")), Status.ALREADY_EXISTS);
    while (service.status("done-2") !== "SUCCESS") await new Promise((r) => setTimeout(r, 10));
    await service.close();

    const again = await open(dirs, { pushPeriodSeconds: 3600, batchSize: 2 });
    assert.equal(again.status("done-1"), "SUCCESS");
    assert.equal(again.status("done-2"), "SUCCESS");
    assert.equal(again.status("waiting"), "IN_PROGRESS");
    assert.equal(again.status("never"), "NOT_FOUND");
    assert.ok(again.has("done-1") && again.has("waiting") && !again.has("never"));
    await rejectsWith(again.capture(makeRecord("done-1")), Status.ALREADY_EXISTS);
    assert.ok(await again.flush(5000));
    assert.equal(again.status("waiting"), "SUCCESS");
    await again.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("buffer full or spool budget reached: RESOURCE_EXHAUSTED, and nothing of the request is kept", async () => {
  const dirs = await tempDirs();
  try {
    const service = await open(dirs, { bufferSize: 3, batchSize: 100, pushPeriodSeconds: 3600 });
    // Ten at once: exactly three are admitted.
    const results = await Promise.allSettled(
      Array.from({ length: 10 }, (_, i) => service.capture(makeRecord(`b${i}`))),
    );
    const ok = results.flatMap((r, i) => (r.status === "fulfilled" ? [`b${i}`] : []));
    assert.equal(ok.length, 3);
    for (const r of results) {
      if (r.status === "rejected") assert.equal((r.reason as AgentError).code, Status.RESOURCE_EXHAUSTED);
    }
    const bytes = service.stats().spoolBytes;
    const e = await rejectsWith(service.capture(makeRecord("one-more")), Status.RESOURCE_EXHAUSTED);
    assert.match(e.message, /buffer is full/);
    assert.equal(service.status("one-more"), "NOT_FOUND");
    assert.ok(!service.has("one-more"));
    assert.equal(service.stats().spoolBytes, bytes);
    await service.close();
    const again = await open(dirs, { bufferSize: 3, batchSize: 100, pushPeriodSeconds: 3600 });
    assert.equal(again.stats().pending, 3);
    for (let i = 0; i < 10; i++) {
      assert.equal(again.status(`b${i}`), ok.includes(`b${i}`) ? "IN_PROGRESS" : "NOT_FOUND");
    }
    await again.close();

    const small = await open({ ...dirs, stateDir: `${dirs.base}/state2` }, { maxSpoolBytes: 8192 });
    await small.capture(makeRecord("fits", "m", 3000));
    const big = await rejectsWith(small.capture(makeRecord("too-big", "m", 6000)), Status.RESOURCE_EXHAUSTED);
    assert.match(big.message, /spool is full/);
    assert.equal(small.status("too-big"), "NOT_FOUND");
    await rejectsWith(small.capture({ ...makeRecord("bad"), captureId: "" }), Status.INVALID_ARGUMENT);
    await small.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("torn tail: the complete captures survive a crash mid-record, the torn one is dropped", async () => {
  const dirs = await tempDirs();
  try {
    const service = await open(dirs, { batchSize: 100, pushPeriodSeconds: 3600 });
    for (const id of ["t1", "t2", "t3"]) await service.capture(makeRecord(id, "m", 2000));
    await service.close();
    const spoolDir = `${dirs.stateDir}/capture/spool`;
    const [segment] = await walk(spoolDir);
    const path = `${spoolDir}/${segment}`;
    const size = (await Deno.stat(path)).size;
    await Deno.truncate(path, size - 1000); // inside t3's tensor bytes
    const again = await open(dirs, { batchSize: 100, pushPeriodSeconds: 3600 });
    assert.deepEqual(["t1", "t2", "t3"].map((id) => again.status(id)), ["IN_PROGRESS", "IN_PROGRESS", "NOT_FOUND"]);
    assert.ok(await again.flush(5000));
    assert.deepEqual(["t1", "t2", "t3"].map((id) => again.status(id)), ["SUCCESS", "SUCCESS", "NOT_FOUND"]);
    await again.close();
    const lines = await readBack(
      await walk(dirs.diskPath),
      (k) => Deno.readFile(`${dirs.diskPath}/${k}`),
      () => 2000,
    );
    assert.deepEqual([...lines.keys()].sort(), ["t1", "t2"]);
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

/** A Disk destination that refuses (permanently) any key naming a capture id containing "bad". */
class Refusing implements Destination {
  readonly kind = "Disk";
  puts = 0;
  constructor(private readonly inner: Destination) {}
  put(key: string, data: Uint8Array, type: string) {
    this.puts++;
    if (key.includes("/bad")) return Promise.reject(new DestinationError(`403 AccessDenied ${key}`, false));
    return this.inner.put(key, data, type);
  }
}

Deno.test("a permanently refused capture is split from its batch and dead-lettered; the others are stored", async () => {
  const dirs = await tempDirs();
  try {
    const options = { maxAttempts: 3, destinationImpl: new Refusing(new DiskDestination(dirs.diskPath)) };
    const service = await open(dirs, options);
    const records = ["good-1", "bad-1", "good-2"].map((id) => makeRecord(id, "m", 5000));
    for (const r of records) await service.capture(r);
    assert.ok(await service.flush(10_000));
    assert.equal(service.status("good-1"), "SUCCESS");
    assert.equal(service.status("good-2"), "SUCCESS");
    assert.equal(service.status("bad-1"), "FAILURE");
    assert.match(service.failureReason("bad-1")!, /AccessDenied/);
    const stats = service.stats();
    assert.deepEqual([stats.uploaded, stats.failed, stats.pending], [2, 1, 0]);
    assert.ok(stats.retries >= 3);
    await service.close();

    const dead = `${dirs.stateDir}/capture/dead-letter`;
    const files = await walk(dead);
    assert.equal(files.length, 2);
    const info = JSON.parse(decoder.decode(await Deno.readFile(`${dead}/${files.find((f) => f.endsWith(".json"))}`)));
    assert.equal(info.captureId, "bad-1");
    assert.equal(info.attempts, 3);
    assert.match(info.reason, /AccessDenied/);
    const kept = decodeRecord(await Deno.readFile(`${dead}/${files.find((f) => f.endsWith(".capture"))}`));
    const { arrivalTime: _, ...rest } = kept;
    assert.deepEqual(rest, { ...records[1], modelVersion: "" } as CaptureRecord);

    const again = await open(dirs, options);
    assert.equal(again.status("bad-1"), "FAILURE");
    assert.match(again.failureReason("bad-1")!, /AccessDenied/);
    assert.equal(again.stats().pending, 0);
    await again.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

/** Fails every put with a transient error while `down` is set. */
class Flaky implements Destination {
  readonly kind = "Disk";
  down = true;
  refused = 0;
  constructor(private readonly inner: Destination) {}
  put(key: string, data: Uint8Array, type: string) {
    if (this.down) {
      this.refused++;
      return Promise.reject(new DestinationError("connection refused", true));
    }
    return this.inner.put(key, data, type);
  }
}

Deno.test("an outage only delays: transient errors never exhaust the attempts", async () => {
  const dirs = await tempDirs();
  try {
    const flaky = new Flaky(new DiskDestination(dirs.diskPath));
    // One upload at a time and pauses of 200-400 ms, so every attempt can be counted against the pause.
    const service = await open(dirs, {
      maxAttempts: 1,
      destinationImpl: flaky,
      pushPeriodSeconds: 0,
      uploadConcurrency: 1,
      retryBaseMs: 400,
      retryMaxMs: 400,
    });
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms)));
    for (let i = 0; i < 6; i++) await service.capture(makeRecord(`o${i}`));
    let checked = 0;
    // Three pauses at least; more while none was observed before its end (a loaded machine may wake us late).
    for (let pauses = 0; pauses < 3 || (checked === 0 && pauses < 20); pauses++) {
      let pausedUntil: number | null;
      while ((pausedUntil = service.stats().pausedUntil) === null) await sleep(5);
      const refused = flaky.refused;
      assert.ok(pausedUntil - Date.now() <= 400, "a pause is at most retryMaxMs");
      // While paused, nothing is attempted; after it, the upload is tried again and pauses anew.
      await sleep(pausedUntil - Date.now() - 100);
      // Read in one synchronous step: if the pause has not ended yet, no attempt can have started.
      if (Date.now() < pausedUntil) {
        assert.equal(flaky.refused, refused, `no attempt during pause ${pauses + 1}`);
        checked++;
      }
      while (flaky.refused === refused) await sleep(5);
      assert.ok(Date.now() >= pausedUntil, "the next attempt waits for the pause to end");
    }
    assert.ok(checked > 0, "at least one pause was observed before it ended");
    assert.equal(service.status("o0"), "IN_PROGRESS");
    flaky.down = false;
    assert.ok(await service.flush(10_000));
    for (let i = 0; i < 6; i++) assert.equal(service.status(`o${i}`), "SUCCESS");
    assert.equal(service.stats().failed, 0);
    assert.ok(service.stats().retries >= 3);
    await service.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("final statuses expire by count and by age once their records left the spool", async () => {
  const dirs = await tempDirs();
  let offset = 0;
  const now = () => Date.now() + offset;
  try {
    const options = { statusRetentionCount: 2, statusRetentionSeconds: 60, segmentBytes: 4096, batchSize: 1, now };
    const service = await open(dirs, options);
    for (const id of ["r1", "r2", "r3", "r4"]) {
      await service.capture(makeRecord(id, "m", 5000));
      assert.ok(await service.flush(5000));
    }
    assert.deepEqual(["r1", "r2", "r3", "r4"].map((id) => service.status(id)), [
      "NOT_FOUND",
      "NOT_FOUND",
      "SUCCESS",
      "SUCCESS",
    ]);
    await service.close();
    const again = await open(dirs, options);
    assert.deepEqual(["r1", "r2", "r3", "r4"].map((id) => again.status(id)), [
      "NOT_FOUND",
      "NOT_FOUND",
      "SUCCESS",
      "SUCCESS",
    ]);
    await again.close();
    offset = 61_000;
    const later = await open(dirs, options);
    assert.equal(later.status("r4"), "NOT_FOUND");
    await later.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

Deno.test("one process at a time: a second open of the same state folder is refused", async () => {
  const dirs = await tempDirs();
  try {
    const service = await open(dirs);
    await rejectsWith(open(dirs), Status.FAILED_PRECONDITION);
    await service.close();
    await rejectsWith(service.capture(makeRecord("late")), Status.UNAVAILABLE);
    const again = await open(dirs);
    await again.close();
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});

/** Stores the first manifest, then reports a timeout: as if the agent died before it heard back. */
class LostResponse implements Destination {
  readonly kind = "Disk";
  manifestPuts = 0;
  constructor(private readonly inner: Destination) {}
  async put(key: string, data: Uint8Array, type: string) {
    await this.inner.put(key, data, type);
    if (key.endsWith(".jsonl") && this.manifestPuts++ === 0) throw new DestinationError("response timed out", true);
  }
}

Deno.test("stored but unconfirmed: the retry rewrites the same keys, no capture is stored twice", async () => {
  const dirs = await tempDirs();
  try {
    const lost = new LostResponse(new DiskDestination(dirs.diskPath));
    const service = await open(dirs, { destinationImpl: lost, batchSize: 3 });
    const sizes: Record<string, number> = { l1: 5000, l2: 10, l3: 4000, l4: 7 };
    for (const [id, n] of Object.entries(sizes)) await service.capture(makeRecord(id, "m", n));
    assert.ok(await service.flush(5000));
    await service.close();
    assert.equal(lost.manifestPuts, 3, "the first batch's manifest was written twice");
    const files = await walk(dirs.diskPath);
    assert.equal(files.filter((f) => f.endsWith(".jsonl")).length, 2);
    assert.equal(files.filter((f) => f.endsWith(".bin")).length, 2);
    const lines = await readBack(files, (k) => Deno.readFile(`${dirs.diskPath}/${k}`), (id) => sizes[id]);
    assert.deepEqual([...lines.keys()].sort(), Object.keys(sizes));
  } finally {
    await Deno.remove(dirs.base, { recursive: true });
  }
});
