// CaptureService against a real S3 API (s3rver on 127.0.0.1): the documented layout, byte-exact tensors,
// an outage in the middle of a stream of captures, a missing bucket, and Disk mirrored by periodic upload.

import assert from "node:assert/strict";
import { type CaptureOptions, CaptureService, S3Client } from "../src/capture/mod.ts";
import { makeRecord, quiet, readBack, TestS3 } from "./helpers/capture_fixtures.ts";

async function withS3(fn: (s3: TestS3, base: string) => Promise<void>): Promise<void> {
  const base = await Deno.makeTempDir({ prefix: "capture-s3-test-" });
  const s3 = await TestS3.start(`${base}/s3`);
  try {
    await fn(s3, base);
  } finally {
    await s3.stop();
    await Deno.remove(base, { recursive: true });
  }
}

function cloud(s3: TestS3, stateDir: string, extra: Partial<CaptureOptions> = {}) {
  return CaptureService.open({
    stateDir,
    deviceFleetName: "fleet-1",
    deviceName: "device-1",
    folderPrefix: "captures",
    destination: "Cloud",
    s3: s3.options,
    batchSize: 4,
    pushPeriodSeconds: 0.2,
    retryBaseMs: 20,
    retryMaxMs: 200,
    logger: quiet,
    ...extra,
  });
}

async function fetchAll(s3: TestS3, prefix = "") {
  const client = new S3Client(s3.options);
  const keys = await client.listKeys(prefix);
  const read = async (key: string) => {
    const body = await client.getObject(key);
    assert.ok(body, `${key} exists`);
    return body;
  };
  return { keys, read };
}

Deno.test("Cloud: captures land on S3 in the documented layout; statuses go IN_PROGRESS -> SUCCESS", async () => {
  await withS3(async (s3, base) => {
    const sizes: Record<string, number> = { a1: 10, a2: 4000, a3: 3072, a4: 70_000, a5: 1 };
    const service = await cloud(s3, `${base}/state`);
    for (const [id, n] of Object.entries(sizes)) {
      await service.capture(makeRecord(id, "resnet", n));
      assert.equal(service.status(id), "IN_PROGRESS");
    }
    assert.ok(await service.flush(10_000));
    for (const id of Object.keys(sizes)) assert.equal(service.status(id), "SUCCESS");
    await service.close();
    const { keys, read } = await fetchAll(s3);
    const batch = "\\d{8}T\\d{9}Z-[0-9a-f]{16}";
    for (const key of keys) {
      assert.match(
        key,
        new RegExp(`^captures/fleet-1/resnet/2024/05/29/16/(${batch}\\.jsonl|${batch}/a\\d-output-0\\.bin)$`),
      );
    }
    assert.equal(keys.filter((k) => k.endsWith(".jsonl")).length, 2, "a batch of 4 and one of 1");
    assert.equal(keys.filter((k) => k.endsWith(".bin")).length, 2, "a2 and a4 are separate objects");
    const records = await readBack(keys, read, (id) => sizes[id]);
    assert.deepEqual([...records.keys()].sort(), Object.keys(sizes));
    const a2 = keys.find((k) => k.endsWith("/a2-output-0.bin"));
    assert.equal(records.get("a2")!.deviceFleetOutputs[0]["data-ref"], `s3://${s3.options.bucket}/${a2}`);
  });
});

Deno.test("outage: S3 stops while captures flow and comes back on the same port; everything arrives once", async () => {
  await withS3(async (s3, base) => {
    const service = await cloud(s3, `${base}/state`, { bufferSize: 1000, maxAttempts: 2 });
    const ids: string[] = [];
    let pendingAtResume = 0;
    for (let i = 0; i < 60; i++) {
      if (i === 15) await s3.stop();
      if (i === 45) {
        pendingAtResume = service.stats().pending;
        await s3.resume();
      }
      const id = `flow-${i}`;
      await service.capture(makeRecord(id, "m", i % 3 === 0 ? 5000 : 50));
      ids.push(id);
      await new Promise((r) => setTimeout(r, 8));
    }
    assert.ok(await service.flush(20_000), "delivered after the outage");
    const stats = service.stats();
    for (const id of ids) assert.equal(service.status(id), "SUCCESS", id);
    assert.equal(stats.failed, 0, "an outage never dead-letters");
    assert.ok(stats.retries > 0, "uploads failed during the outage");
    assert.ok(pendingAtResume >= 25, `${pendingAtResume} captures waited for S3`);
    console.log(
      `outage: ${ids.length} captures, ${pendingAtResume} pending when S3 came back, ${stats.retries} failed attempts`,
    );
    await service.close();
    const { keys, read } = await fetchAll(s3);
    const lines = await readBack(keys, read, (id) => (Number(id.split("-")[1]) % 3 === 0 ? 5000 : 50));
    assert.deepEqual([...lines.keys()].sort(), [...ids].sort());
    assert.equal(keys.filter((k) => k.endsWith(".bin")).length, 20);
  });
});

Deno.test("a missing bucket is a permanent error: FAILURE after max attempts, kept in the dead letter", async () => {
  await withS3(async (s3, base) => {
    const options = { ...s3.options, bucket: "no-such-bucket" };
    const service = await CaptureService.open({
      stateDir: `${base}/state`,
      deviceFleetName: "f",
      deviceName: "d",
      destination: "Cloud",
      s3: options,
      batchSize: 2,
      pushPeriodSeconds: 0,
      maxAttempts: 2,
      retryBaseMs: 10,
      logger: quiet,
    });
    await service.capture(makeRecord("x1"));
    await service.capture(makeRecord("x2"));
    assert.ok(await service.flush(10_000));
    assert.equal(service.status("x1"), "FAILURE");
    assert.match(service.failureReason("x1")!, /404 NoSuchBucket/);
    assert.equal(service.stats().failed, 2);
    await service.close();
    const names: string[] = [];
    for await (const e of Deno.readDir(`${base}/state/capture/dead-letter`)) names.push(e.name);
    assert.equal(names.filter((n) => n.endsWith(".capture")).length, 2);
  });
});

Deno.test("periodic upload: what the Disk destination wrote is mirrored to S3 with the same keys", async () => {
  await withS3(async (s3, base) => {
    const diskPath = `${base}/disk`;
    const open = () =>
      CaptureService.open({
        stateDir: `${base}/state`,
        deviceFleetName: "fleet-1",
        deviceName: "device-1",
        folderPrefix: "captures",
        destination: "Disk",
        diskPath,
        s3: s3.options,
        periodicUpload: true,
        periodicUploadPeriodSeconds: 0.1,
        batchSize: 3,
        pushPeriodSeconds: 0.1,
        logger: quiet,
      });
    const service = await open();
    for (let i = 0; i < 5; i++) await service.capture(makeRecord(`p${i}`, "m", i === 0 ? 9000 : 100));
    assert.ok(await service.flush(10_000));
    const deadline = Date.now() + 10_000;
    while (service.stats().periodicUploaded < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(service.stats().periodicUploaded, 3, "two manifests and one tensor");
    await service.close();
    const { keys, read } = await fetchAll(s3);
    assert.equal(keys.length, 3);
    for (const key of keys) assert.deepEqual(await read(key), await Deno.readFile(`${diskPath}/${key}`));
    // Reopened, it mirrors what is new and nothing it mirrored before: the round that finds the new
    // manifest has walked the old files too, and later rounds upload nothing more.
    const again = await open();
    await again.capture(makeRecord("p5", "m", 100));
    assert.ok(await again.flush(10_000));
    const until = Date.now() + 10_000;
    while (again.stats().periodicUploaded < 1 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 500)); // five more periods
    assert.equal(again.stats().periodicUploaded, 1, "only the new manifest");
    await again.close();
    assert.equal((await fetchAll(s3)).keys.length, 4);
  });
});
