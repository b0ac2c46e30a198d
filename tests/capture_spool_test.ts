// The capture core's storage pieces on their own: checksums, framing, record encoding, the spool
// (group commit, fsync before acknowledgement, torn-tail and damage recovery), the status log, SigV4.

import assert from "node:assert/strict";
import { crc32c } from "../src/capture/crc32c.ts";
import { encodeFrame, FILE_HEADER_BYTES, FRAME_HEADER_BYTES, scanFrames } from "../src/capture/frame.ts";
import { encodeComponent, makeBatchId } from "../src/capture/layout.ts";
import { decodeRecord, decodeRecordHeader, encodeRecordFrame } from "../src/capture/record.ts";
import { signRequest } from "../src/capture/s3.ts";
import { Spool, type SpoolLocation } from "../src/capture/spool.ts";
import { StatusIndex } from "../src/capture/status.ts";
import { AgentError, Status } from "../src/errors.ts";
import { makeRecord } from "./helpers/capture_fixtures.ts";
import { until } from "./helpers/wait.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

async function openSpool(dir: string, segmentBytes = 1 << 20) {
  const recovered: Array<{ text: string; loc: SpoolLocation }> = [];
  const spool = await Spool.open({ dir, segmentBytes, fsync: true }, (payload, loc) => {
    const text = decoder.decode(payload);
    recovered.push({ text, loc });
    return { tag: text, live: true };
  });
  return { spool, recovered };
}

async function segments(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

Deno.test("crc32c matches the standard check value and continues across calls", () => {
  assert.equal(crc32c(encoder.encode("123456789")), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa); // RFC 3720 B.4: 32 bytes of zeros
  const data = encoder.encode("the quick brown fox jumps over the lazy dog, twice over");
  assert.equal(crc32c(data.subarray(13), crc32c(data.subarray(0, 13))), crc32c(data));
});

Deno.test("a capture record survives encoding byte for byte, and bad records are refused", () => {
  const record = {
    ...makeRecord("id-1", "model/ü", 5000),
    modelVersion: "3.1",
    arrivalTime: { seconds: 1_717_000_001, nanos: 5 },
  };
  const frame = encodeRecordFrame(record);
  const payload = frame.subarray(FRAME_HEADER_BYTES);
  assert.deepEqual(decodeRecord(payload), record);
  assert.deepEqual(decodeRecordHeader(payload), {
    captureId: "id-1",
    modelName: "model/ü",
    modelVersion: "3.1",
    inferenceTimestamp: record.inferenceTimestamp,
    arrivalTime: record.arrivalTime,
  });
  // A version 1 record (spooled before model versions were kept) still decodes, with version "".
  const v2 = encodeRecordFrame({ ...record, modelVersion: "" }).subarray(FRAME_HEADER_BYTES);
  const at = 1 + 2 + 4 + 2 + encoder.encode("model/ü").length; // version, id, model: then u16 0 (no version)
  assert.deepEqual([v2[0], v2[at], v2[at + 1]], [2, 0, 0]);
  const v1 = Uint8Array.of(1, ...v2.subarray(1, at), ...v2.subarray(at + 2));
  assert.deepEqual(decodeRecord(v1), { ...record, modelVersion: "" });
  const bad = (patch: object) =>
    assert.throws(() => encodeRecordFrame({ ...record, ...patch }), (e) => {
      assert.ok(e instanceof AgentError);
      assert.equal(e.code, Status.INVALID_ARGUMENT);
      return true;
    });
  bad({ captureId: "" });
  bad({ inferenceTimestamp: { seconds: 1, nanos: 2e9 } });
  bad({ inputs: [{ name: "x", encoding: 9, data: new Uint8Array() }] });
  bad({ inputTensors: [{ name: "x", dataType: 1, shape: [1.5], data: new Uint8Array() }] });
});

Deno.test("scanFrames: intact frames, a damaged middle skipped, a torn tail cut", () => {
  const frames = ["one", "two", "three", "four"].map((t) => encodeFrame(encoder.encode(t)));
  const file = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
  let o = 0;
  for (const f of frames) {
    file.set(f, o);
    o += f.length;
  }
  const texts = (bytes: Uint8Array) =>
    scanFrames(bytes, 0).frames.map((f) => decoder.decode(bytes.subarray(f.offset, f.offset + f.length)));
  assert.deepEqual(texts(file), ["one", "two", "three", "four"]);
  // A flipped bit in "two" loses only that record.
  const damaged = file.slice();
  damaged[frames[0].length + FRAME_HEADER_BYTES + 1] ^= 0x10;
  const scan = scanFrames(damaged, 0);
  assert.equal(scan.skipped.length, 1);
  assert.deepEqual(texts(damaged), ["one", "three", "four"]);
  // Every cut inside the last frame drops exactly that frame.
  for (let cut = file.length - frames[3].length + 1; cut < file.length; cut++) {
    const torn = scanFrames(file.subarray(0, cut), 0);
    assert.equal(torn.frames.length, 3);
    assert.equal(torn.validEnd, file.length - frames[3].length);
  }
});

Deno.test("spool: concurrent appends share fsync rounds, and each resolves only after its fsync", async () => {
  const dir = await Deno.makeTempDir();
  const events: string[] = [];
  const original = Deno.FsFile.prototype.syncData;
  Deno.FsFile.prototype.syncData = async function (this: Deno.FsFile) {
    events.push("sync-start");
    await new Promise((r) => setTimeout(r, 20));
    await original.call(this);
    events.push("sync-end");
  };
  try {
    const { spool } = await openSpool(dir);
    const appends = Array.from(
      { length: 50 },
      (_, i) => spool.append(encodeFrame(encoder.encode(`r${i}`)), `r${i}`).then(() => events.push(`ack r${i}`)),
    );
    // More arrive once the first round's fsync has started: they wait for the next round.
    await until(() => events.includes("sync-start"), "the first round's fsync started", 30_000, 1);
    const late = Array.from(
      { length: 20 },
      (_, i) =>
        spool.append(encodeFrame(encoder.encode(`late${i}`)), `late${i}`).then(() => events.push(`ack late${i}`)),
    );
    await Promise.all([...appends, ...late]);
    assert.ok(spool.rounds <= 3, `70 appends took ${spool.rounds} rounds`);
    for (const [i, e] of events.entries()) {
      if (!e.startsWith("ack")) continue;
      const lastSyncEnd = events.lastIndexOf("sync-end", i);
      assert.ok(lastSyncEnd >= 0 && events.indexOf("sync-start") < lastSyncEnd, `${e} acknowledged before an fsync`);
    }
    const firstLate = events.findIndex((e) => e.startsWith("ack late"));
    assert.ok(
      events.slice(0, firstLate).filter((e) => e === "sync-end").length >= 2,
      "late appends had a round of their own",
    );
    await spool.close();
  } finally {
    Deno.FsFile.prototype.syncData = original;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spool: an append arriving during a round's fdatasync starts its own at once, up to syncsInFlight", async () => {
  const original = Deno.FsFile.prototype.syncData;
  for (const syncsInFlight of [1, 2]) {
    const dir = await Deno.makeTempDir();
    const events: string[] = [];
    let syncs = 0;
    // Each fdatasync returns when the test lets it, so appends surely arrive while one runs.
    const gates = new Map<number, PromiseWithResolvers<void>>();
    const gate = (n: number) => gates.get(n) ?? gates.set(n, Promise.withResolvers<void>()).get(n)!;
    const started = (n: number) => until(() => events.includes(`sync${n}-start`), `fdatasync ${n} started`, 30_000, 1);
    let gated = false;
    Deno.FsFile.prototype.syncData = async function (this: Deno.FsFile) {
      if (!gated) return await original.call(this);
      const n = ++syncs;
      events.push(`sync${n}-start`);
      await gate(n).promise;
      await original.call(this);
      events.push(`sync${n}-end`);
    };
    try {
      const spool = await Spool.open({ dir, segmentBytes: 1 << 20, fsync: true, syncsInFlight }, () => {
        throw new Error("nothing to recover");
      });
      const append = (tag: string) => spool.append(encodeFrame(encoder.encode(tag)), tag).then(() => events.push(tag));
      await append("first"); // opens the segment (whose creation is synced too)
      events.length = 0;
      gated = true;
      const a = append("a");
      await started(1);
      const b = append("b");
      // With a second flush free, b's round starts at once; c finds none free.
      if (syncsInFlight === 2) await started(2);
      const c = append("c");
      gate(1).resolve();
      await started(syncsInFlight === 2 ? 3 : 2);
      for (let n = 2; n <= 4; n++) gate(n).resolve();
      await Promise.all([a, b, c]);
      const at = (e: string) => events.indexOf(e);
      // Nothing is acknowledged before the fdatasync of its own round returned.
      assert.ok(at("a") > at("sync1-end") && at("b") > at("sync2-end"), events.join(" "));
      if (syncsInFlight === 2) {
        // b did not wait for a's flush; c waited for a free one and then shared nothing with b.
        assert.ok(at("sync2-start") < at("sync1-end"), events.join(" "));
        assert.ok(at("sync3-start") > at("sync1-end") && at("c") > at("sync3-end"), events.join(" "));
      } else {
        // One flush at a time: b and c arrived during a's and share the next round.
        assert.ok(at("sync2-start") > at("sync1-end") && at("c") > at("sync2-end"), events.join(" "));
        assert.equal(syncs, 2, events.join(" "));
      }
      await spool.close();
    } finally {
      Deno.FsFile.prototype.syncData = original;
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("spool: a torn tail is cut at every point inside the last record; complete records survive", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spool } = await openSpool(dir);
    for (let i = 0; i < 5; i++) await spool.append(encodeFrame(encoder.encode(`record-${i}`.repeat(20))), `r${i}`);
    await spool.close();
    const [name] = await segments(dir);
    const full = await Deno.readFile(`${dir}/${name}`);
    const lastFrame = FRAME_HEADER_BYTES + "record-4".repeat(20).length;
    for (const cut of [1, 8, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + 7, lastFrame - 1]) {
      await Deno.writeFile(`${dir}/${name}`, full.subarray(0, full.length - lastFrame + cut));
      const { spool: again, recovered } = await openSpool(dir);
      assert.deepEqual(recovered.map((r) => r.text), [0, 1, 2, 3].map((i) => `record-${i}`.repeat(20)), `cut ${cut}`);
      assert.equal((await Deno.stat(`${dir}/${name}`)).size, full.length - lastFrame, "torn bytes truncated away");
      await again.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spool: readMany returns records in the order asked, across segments, gaps and an oversized record", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spool } = await openSpool(dir, 64 * 1024);
    const locs: SpoolLocation[] = [];
    const payload = (i: number) => new Uint8Array(i === 7 ? 100 * 1024 : 300 + i).fill(i);
    for (let i = 0; i < 40; i++) locs.push(await spool.append(encodeFrame(payload(i)), `r${i}`));
    assert.ok(spool.segmentCount >= 2, `${spool.segmentCount} segments`);
    // Every third record, shuffled: neighbours, gaps, the oversized one (which has a segment of its own).
    const wanted = [21, 3, 7, 39, 0, 12, 6, 9, 33, 15, 8, 30];
    const read = await spool.readMany(wanted.map((i) => locs[i]));
    assert.deepEqual(read.map((bytes) => bytes.length), wanted.map((i) => payload(i).length));
    for (const [k, i] of wanted.entries()) {
      assert.deepEqual(read[k], payload(i), `record ${i}`);
      assert.deepEqual(await spool.read(locs[i]), payload(i));
    }
    assert.deepEqual(await spool.readMany([]), []);
    await spool.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spool: rotation by size, reads back, segments deleted once all records are released", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spool } = await openSpool(dir, 4096);
    const locs: SpoolLocation[] = [];
    for (let i = 0; i < 10; i++) locs.push(await spool.append(encodeFrame(new Uint8Array(1500).fill(i)), `r${i}`));
    assert.ok(spool.segmentCount >= 4, `${spool.segmentCount} segments`);
    for (let i = 0; i < 10; i++) assert.deepEqual(await spool.read(locs[i]), new Uint8Array(1500).fill(i));
    // A record bigger than a segment gets one of its own.
    const big = await spool.append(encodeFrame(new Uint8Array(10_000).fill(7)), "big");
    assert.equal((await spool.read(big)).length, 10_000);
    const deleted: string[][] = [];
    spool.onSegmentDeleted = (tags) => deleted.push(tags);
    for (const loc of locs) await spool.release(loc);
    assert.deepEqual(deleted.flat(), locs.map((_, i) => `r${i}`));
    assert.equal((await segments(dir)).length, 1, "only the segment of the unreleased record is left");
    await spool.close();
    const { spool: again, recovered } = await openSpool(dir, 4096);
    assert.equal(recovered.length, 1);
    assert.equal(recovered[0].loc.length, 10_000);
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spool: a segment torn while being created is removed; an unknown file is left alone", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/seg-0000000000000001.log`, encoder.encode("EMCSP"));
    await Deno.writeFile(`${dir}/notes.txt`, encoder.encode("keep"));
    const { spool, recovered } = await openSpool(dir);
    assert.equal(recovered.length, 0);
    assert.deepEqual(await segments(dir), ["notes.txt"]);
    const loc = await spool.append(encodeFrame(encoder.encode("x")), "x");
    assert.equal(loc.segment, 2, "sequence numbers are not reused");
    assert.equal(loc.offset, FILE_HEADER_BYTES + FRAME_HEADER_BYTES);
    await spool.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("status log: seals, successes and failures survive reopening; retention by count and age", async () => {
  const dir = await Deno.makeTempDir();
  let now = 1_000_000;
  const open = (retentionCount = 100) =>
    StatusIndex.open({ path: `${dir}/status.log`, fsync: true, retentionMs: 60_000, retentionCount, now: () => now });
  try {
    const index = await open();
    await index.seal({ id: "b1", model: "m", ids: ["a", "b"], at: now });
    await index.seal({ id: "b2", model: "m", ids: ["c"], at: now });
    await Promise.all([
      index.done("b1"),
      index.fail(["c"], "refused", "b2"),
      index.seal({ id: "b3", model: "m", ids: ["d"], at: now }),
    ]);
    await index.close();
    // A torn tail in the log is ignored.
    const file = await Deno.open(`${dir}/status.log`, { append: true });
    await file.write(encodeFrame(encoder.encode('{"t":"D","b":"b3","at":1}')).subarray(0, 20));
    file.close();
    const again = await open();
    assert.equal(again.get("a")?.status, "SUCCESS");
    assert.equal(again.get("b")?.status, "SUCCESS");
    assert.deepEqual([again.get("c")?.status, again.get("c")?.reason], ["FAILURE", "refused"]);
    assert.deepEqual([...again.batches.keys()], ["b3"]);
    assert.equal(again.get("d"), undefined);
    // Pinned entries (record still in the spool) outlive retention; unpinned ones expire.
    now += 120_000;
    again.prune();
    assert.equal(again.finals.size, 3);
    again.unpin(["a", "b", "c"]);
    again.prune();
    assert.equal(again.finals.size, 0);
    await again.close();
    const counted = await open(2);
    for (const id of ["x1", "x2", "x3", "x4"]) {
      await counted.seal({ id: `b-${id}`, model: "m", ids: [id], at: now });
      await counted.done(`b-${id}`);
    }
    // Pruning is made durable by compaction, so a, b and c are read back, pinned until the owner says.
    assert.equal(counted.get("a")?.status, "SUCCESS");
    counted.unpin(["a", "b", "c", "x1", "x2", "x3", "x4"]);
    counted.prune();
    assert.deepEqual([...counted.finals.keys()], ["x3", "x4"]);
    await counted.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SigV4 matches AWS's documented GetObject example", async () => {
  const headers = await signRequest({
    method: "GET",
    url: new URL("https://examplebucket.s3.amazonaws.com/test.txt"),
    headers: { range: "bytes=0-9" },
    payloadHash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    credentials: { accessKeyId: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" },
    region: "us-east-1",
    date: new Date("2013-05-24T00:00:00Z"),
  });
  assert.equal(
    headers.authorization,
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, " +
      "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, " +
      "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
  );
});

Deno.test("object key components cannot climb or add folders; batch ids are deterministic", () => {
  assert.equal(encodeComponent("a/b"), "a%2Fb");
  assert.equal(encodeComponent(".."), "%2E%2E");
  assert.equal(encodeComponent("ok-Name_1.2"), "ok-Name_1.2");
  assert.equal(encodeComponent("é"), "%C3%A9");
  const long = encodeComponent("x".repeat(500));
  assert.ok(long.length <= 200 && /~[0-9a-f]{16}$/.test(long));
  assert.notEqual(long, encodeComponent("x".repeat(501)));
  const caps = [{ id: "a", arrivalMs: 1 }, { id: "b", arrivalMs: 2 }];
  const at = Date.UTC(2024, 5, 1, 12, 30, 45, 7);
  assert.equal(makeBatchId("m", at, caps), makeBatchId("m", at, caps));
  assert.match(makeBatchId("m", at, caps), /^20240601T123045007Z-[0-9a-f]{16}$/);
  assert.notEqual(makeBatchId("m", at, caps), makeBatchId("m", at, caps.slice(0, 1)));
});
