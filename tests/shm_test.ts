// Tensors by shared memory: real SysV segments and POSIX objects, the real agent, real gRPC.
// Every answer through shared memory must equal the same request sent as bytes.

import assert from "node:assert/strict";
import * as ort from "onnxruntime-node";
import { Libc } from "../ffi/libc.ts";
import { SharedMemoryReader } from "../src/inference/shm.ts";
import { Status } from "../src/errors.ts";
import { enumValues, type Tensor } from "../src/service/wire.ts";
import { type AgentProcess, startAgent, withAgent } from "./helpers/agent.ts";
import { floats, nameOf, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { addSubModel, identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { PosixObject, sysvAttachments, SysvSegment } from "./helpers/shm_segments.ts";

const DataType = enumValues("DataType");
const encoder = new TextEncoder();

/** A tensor whose data is a shared memory handle. */
function shmTensor(
  name: string,
  dataType: number,
  shape: number[],
  handle: { segment_id: number | string; offset?: number | string; size?: number | string },
): Tensor {
  return {
    tensor_metadata: { name: encoder.encode(name), data_type: dataType, shape },
    shared_memory_handle: { size: handle.size ?? 0, offset: handle.offset ?? 0, segment_id: handle.segment_id },
  };
}

const TYPES: [string, number, (n: number) => ArrayBufferView][] = [
  ["UINT8", OnnxType.UINT8, (n) => Uint8Array.from({ length: n }, (_, i) => 200 + i)],
  ["INT16", OnnxType.INT16, (n) => Int16Array.from({ length: n }, (_, i) => -1000 * i)],
  ["INT32", OnnxType.INT32, (n) => Int32Array.from({ length: n }, (_, i) => -99999 * i)],
  ["INT64", OnnxType.INT64, (n) => BigInt64Array.from({ length: n }, (_, i) => -(2n ** 50n) + BigInt(i))],
  ["FLOAT16", OnnxType.FLOAT16, (n) => Uint16Array.from({ length: n }, (_, i) => 0x3c00 + i)],
  ["FLOAT32", OnnxType.FLOAT, (n) => Float32Array.from({ length: n }, (_, i) => i * 1.5 - 2)],
  ["FLOAT64", OnnxType.DOUBLE, (n) => Float64Array.from({ length: n }, (_, i) => Math.E * i)],
  ["INT8", OnnxType.INT8, (n) => Int8Array.from({ length: n }, (_, i) => -100 + i)],
  ["UINT16", OnnxType.UINT16, (n) => Uint16Array.from({ length: n }, (_, i) => 60000 + i)],
  ["UINT32", OnnxType.UINT32, (n) => Uint32Array.from({ length: n }, (_, i) => 3e9 + i)],
  ["UINT64", OnnxType.UINT64, (n) => BigUint64Array.from({ length: n }, (_, i) => 2n ** 64n - 1n - BigInt(i))],
  ["BOOL", OnnxType.BOOL, (n) => Uint8Array.from({ length: n }, (_, i) => (i + 1) % 2)],
  ["BFLOAT16", OnnxType.BFLOAT16, (n) => Uint16Array.from({ length: n }, (_, i) => 0x4000 + i)],
];

async function inProcess(input: Float32Array, shape: number[]): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(PADDLE_CLS);
  try {
    const out = await session.run({ x: new ort.Tensor("float32", input, shape) });
    return out[session.outputNames[0]].data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Segments the test made, removed whatever happens. */
class Segments {
  readonly #all: { remove(): void }[] = [];
  sysv(size: number): SysvSegment {
    const segment = new SysvSegment(size);
    this.#all.push(segment);
    return segment;
  }
  posix(name: string, size: number): PosixObject {
    const object = new PosixObject(name, size);
    this.#all.push(object);
    return object;
  }
  adopt(segment: SysvSegment): void {
    this.#all.push(segment);
  }
  removeAll(): void {
    for (const s of this.#all.splice(0)) s.remove();
  }
}

async function loadIdentities(agent: AgentProcess): Promise<void> {
  for (const [name, onnxType] of TYPES) {
    const folder = await writeModelFolder(agent.modelsDir, `id-${name}`, identityModel(onnxType));
    await agent.client.loadModel(folder, `id-${name.toLowerCase()}`);
  }
}

const prefix = `/edge_agent_test_${Deno.pid}_`;

Deno.test("SysV shared memory: every DataType, the Edge Manager pattern, cls, mixed with bytes", async (t) => {
  const segments = new Segments();
  await withAgent({ config: {} }, async (agent) => {
    const { client } = agent;
    await loadIdentities(agent);
    await t.step("every DataType: output equals the same request sent as bytes", async () => {
      for (const [name, , sample] of TYPES) {
        const data = sample(6);
        // Offset 64: a handle may point anywhere inside a segment, aligned to the element size.
        const segment = segments.sysv(64 + data.byteLength).write(64, data);
        const model = `id-${name.toLowerCase()}`;
        const viaShm = await client.predict(model, [
          shmTensor("x", DataType[name], [2, 3], { segment_id: segment.id, offset: 64, size: data.byteLength }),
        ]);
        const viaBytes = await client.predict(model, [tensor("x", DataType[name], [2, 3], data)]);
        assert.deepEqual(viaShm.tensors[0].tensor_metadata, viaBytes.tensors[0].tensor_metadata, name);
        assert.deepEqual(new Uint8Array(viaShm.tensors[0].byte_data!), new Uint8Array(viaBytes.tensors[0].byte_data!));
        assert.deepEqual(
          new Uint8Array(viaShm.tensors[0].byte_data!),
          new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
        );
      }
    });

    await t.step(
      "Edge Manager's pattern: 0666 create, fill, chmod 0400, offset 0, size 0; cls matches ORT",
      async () => {
        await client.loadModel(await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS)), "cls");
        const shape = [1, 3, 48, 192];
        const input = pseudoRandomFloats(3 * 48 * 192, 3);
        const segment = segments.sysv(input.byteLength).write(0, input).chmod(0o400);
        const { tensors } = await client.predict("cls", [
          shmTensor("x", DataType.FLOAT32, shape, { segment_id: segment.id }),
        ]);
        assert.equal(nameOf(tensors[0]), "softmax_0.tmp_0");
        assert.deepEqual(floats(tensors[0].byte_data), await inProcess(input, shape));
      },
    );

    await t.step("one request mixes a shared memory tensor and a bytes tensor", async () => {
      await client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
      const segment = segments.sysv(16).write(0, Float32Array.of(1, 2, 3, 4));
      const { tensors } = await client.predict("addsub", [
        shmTensor("a", DataType.FLOAT32, [2, 2], { segment_id: segment.id }),
        tensor("b", DataType.FLOAT32, [2, 2], Float32Array.of(10, 10, 10, 10)),
      ]);
      assert.deepEqual([...floats(tensors[0].byte_data)], [11, 12, 13, 14]);
    });

    await t.step("the client may rewrite its segment between calls; each call reads the current data", async () => {
      const segment = segments.sysv(16).write(0, Float32Array.of(1, 1, 1, 1));
      const request = [
        shmTensor("a", DataType.FLOAT32, [2, 2], { segment_id: segment.id }),
        shmTensor("b", DataType.FLOAT32, [2, 2], { segment_id: segment.id }),
      ];
      assert.deepEqual([...floats((await client.predict("addsub", request)).tensors[0].byte_data)], [2, 2, 2, 2]);
      segment.write(0, Float32Array.of(5, 6, 7, 8));
      assert.deepEqual([...floats((await client.predict("addsub", request)).tensors[0].byte_data)], [10, 12, 14, 16]);
    });

    await t.step("several clients predicting through shared memory at once get their own outputs", async () => {
      const clients = Array.from({ length: 6 }, (_, i) => {
        const data = Float32Array.from({ length: 6 }, (_, j) => i * 100 + j);
        return { data, segment: segments.sysv(data.byteLength).write(0, data) };
      });
      await Promise.all(clients.map(async ({ data, segment }) => {
        for (let round = 0; round < 20; round++) {
          const { tensors } = await client.predict("id-float32", [
            shmTensor("x", DataType.FLOAT32, [2, 3], { segment_id: segment.id }),
          ]);
          assert.deepEqual(floats(tensors[0].byte_data), data);
        }
      }));
    });
  }).finally(() => segments.removeAll());
});

Deno.test("POSIX shared memory objects, and 'both' preferring a POSIX object over a SysV id", async (t) => {
  const segments = new Segments();
  try {
    await withAgent(
      { config: { edge_agent_shared_memory: "posix", edge_agent_shm_posix_prefix: prefix } },
      async (agent) => {
        await loadIdentities(agent);
        await t.step("every DataType through shm_open/mmap equals bytes", async () => {
          for (const [index, [name, , sample]] of TYPES.entries()) {
            const data = sample(6);
            segments.posix(`${prefix}${index}`, 8 + data.byteLength).write(8, data);
            const model = `id-${name.toLowerCase()}`;
            const { tensors } = await agent.client.predict(model, [
              shmTensor("x", DataType[name], [2, 3], { segment_id: index, offset: 8 }),
            ]);
            assert.deepEqual(
              new Uint8Array(tensors[0].byte_data!),
              new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
              name,
            );
          }
        });
        await t.step("a missing object is INVALID_ARGUMENT naming it", async () => {
          await rejectsWith(
            agent.client.predict("id-uint8", [shmTensor("x", DataType.UINT8, [2, 3], { segment_id: 999 })]),
            Status.INVALID_ARGUMENT,
            new RegExp(`tensor "x": shared memory object ${prefix}999 not found`),
          );
        });
      },
    );

    await withAgent(
      { config: { edge_agent_shared_memory: "both", edge_agent_shm_posix_prefix: prefix } },
      async (agent) => {
        await loadIdentities(agent);
        await t.step("with 'both', an existing POSIX object wins, else the id is a SysV segment", async () => {
          const sysv = segments.sysv(6).write(0, Uint8Array.of(1, 2, 3, 4, 5, 6));
          segments.posix(`${prefix}${sysv.id}`, 6).write(0, Uint8Array.of(9, 9, 9, 9, 9, 9));
          const request = [shmTensor("x", DataType.UINT8, [2, 3], { segment_id: sysv.id })];
          const first = await agent.client.predict("id-uint8", request);
          assert.deepEqual([...new Uint8Array(first.tensors[0].byte_data!)], [9, 9, 9, 9, 9, 9]);
          const other = segments.sysv(6).write(0, Uint8Array.of(6, 5, 4, 3, 2, 1));
          const second = await agent.client.predict("id-uint8", [
            shmTensor("x", DataType.UINT8, [2, 3], { segment_id: other.id }),
          ]);
          assert.deepEqual([...new Uint8Array(second.tensors[0].byte_data!)], [6, 5, 4, 3, 2, 1]);
        });
      },
    );
  } finally {
    segments.removeAll();
  }
});

/** A seeded generator, so a failing hostile case can be replayed. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state ^ (state >>> 15), 0x2c1b3c6d) + 0x9e3779b9) >>> 0;
    return state / 2 ** 32;
  };
}

Deno.test("hostile handles: 10,000 requests, each answered with the right code; valid ones in between succeed", async () => {
  const segments = new Segments();
  await withAgent({ config: {} }, async (agent) => {
    const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n", 4]));
    await agent.client.loadModel(folder, "id");
    const data = Float32Array.from({ length: 64 }, (_, i) => i);
    const good = segments.sysv(data.byteLength).write(0, data);
    const removed = segments.sysv(64);
    const removedId = removed.id;
    removed.remove();
    const U64_MAX = (2n ** 64n - 1n).toString();
    const TWO_63 = (2n ** 63n).toString();
    type Case = { handle: Parameters<typeof shmTensor>[3]; rows: number; code: Status; message?: RegExp };
    const valid = (rows: number, offsetRows: number): Case => ({
      handle: { segment_id: good.id, offset: offsetRows * 16, size: rows * 16 },
      rows,
      code: Status.OK,
    });
    const bad = (handle: Case["handle"], message: RegExp, rows = 2): Case => ({
      handle,
      rows,
      code: Status.INVALID_ARGUMENT,
      message,
    });
    const next = random(20261126);
    const pick = (): Case => {
      switch (Math.floor(next() * 12)) {
        case 0:
          return bad({ segment_id: removedId }, /segment \d+ not found/);
        case 1:
          return bad({ segment_id: U64_MAX }, /segment 18446744073709551615 not found/);
        case 2:
          return bad({ segment_id: Math.floor(next() * 2 ** 31) }, /not found|runs past the end/);
        case 3:
          return bad(
            { segment_id: good.id, offset: TWO_63 },
            /offset 9223372036854775808 \+ 32 bytes runs past the end/,
          );
        case 4:
          return bad({ segment_id: good.id, offset: U64_MAX }, /not a multiple of the element size 4/);
        case 5:
          return bad({ segment_id: good.id, offset: "18446744073709551612" }, /runs past the end of segment/);
        case 6:
          return bad({ segment_id: good.id, size: U64_MAX }, /size is 18446744073709551615, but .* need 32 bytes/);
        case 7:
          return bad({ segment_id: good.id, size: 31 }, /size is 31/);
        case 8:
          return bad(
            { segment_id: good.id, offset: 2 },
            /offset 2 in segment \d+ is not a multiple of the element size 4/,
          );
        case 9:
          return bad(
            { segment_id: good.id, offset: 240 },
            /offset 240 \+ 32 bytes runs past the end of segment \d+, which holds 256 bytes/,
          );
        default: {
          const rows = 1 + Math.floor(next() * 8);
          return valid(rows, Math.floor(next() * (16 - rows + 1)));
        }
      }
    };
    const TOTAL = 10_000;
    const IN_FLIGHT = 16;
    let sent = 0;
    let succeeded = 0;
    const worker = async () => {
      while (sent < TOTAL) {
        sent++;
        const c = pick();
        const request = agent.client.predict("id", [shmTensor("x", DataType.FLOAT32, [c.rows, 4], c.handle)]);
        if (c.code === Status.OK) {
          const { tensors } = await request;
          const offset = Number(c.handle.offset) / 4;
          assert.deepEqual(floats(tensors[0].byte_data), data.slice(offset, offset + c.rows * 4));
          succeeded++;
        } else {
          await rejectsWith(request, c.code, c.message);
        }
      }
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
    assert.ok(succeeded > 1000, `only ${succeeded} valid requests were among them`);
    assert.deepEqual((await agent.client.listModels()).models.map((m) => m.name), ["id"]);
  }).finally(() => segments.removeAll());
});

/** Root without the capabilities that bypass IPC and file permission checks, like any other user. */
const UNPRIVILEGED = ["setpriv", "--bounding-set=-ipc_owner,-dac_override,-dac_read_search", "--inh-caps=-all", "--"];
const canDropPrivileges = Deno.uid() === 0 &&
  await new Deno.Command("setpriv", { args: ["--version"], stdout: "null", stderr: "null" }).output().then(
    (r) => r.success,
    () => false,
  );
if (!canDropPrivileges) {
  console.log("skipping the PERMISSION_DENIED test: it needs root and setpriv to run the agent without ipc_owner");
}

/** A SysV segment created by user `uid` (its creator), attached here for writing. */
async function segmentCreatedBy(uid: number, size: number): Promise<SysvSegment> {
  const out = await new Deno.Command("setpriv", {
    args: [
      `--reuid=${uid}`,
      `--regid=${uid}`,
      "--clear-groups",
      "--",
      "/usr/bin/python3",
      "-c",
      `import ctypes; print(ctypes.CDLL("libc.so.6").shmget(0, ${size}, 0o1600))`,
    ],
  }).output();
  const id = Number(new TextDecoder().decode(out.stdout).trim());
  if (!out.success || !(id >= 0)) {
    throw new Error(`shmget as uid ${uid} failed: ${new TextDecoder().decode(out.stderr)}`);
  }
  return SysvSegment.attach(id, size);
}

Deno.test({
  name: "segments of another user that the agent may not read are PERMISSION_DENIED, saying what to do",
  ignore: !canDropPrivileges,
  async fn() {
    const segments = new Segments();
    const agent = await startAgent({
      config: { edge_agent_shared_memory: "both", edge_agent_shm_posix_prefix: prefix },
      wrapper: UNPRIVILEGED,
    });
    try {
      const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.UINT8, ["n", 3]));
      await agent.client.loadModel(folder, "id");
      const nobody = 65534;
      // The kernel grants owner access to a segment's creator too, so another user must create it.
      const sysv = await segmentCreatedBy(nobody, 6);
      segments.adopt(sysv);
      sysv.write(0, Uint8Array.of(1, 2, 3, 4, 5, 6)).chmod(0o600);
      await rejectsWith(
        agent.client.predict("id", [shmTensor("x", DataType.UINT8, [2, 3], { segment_id: sysv.id })]),
        Status.PERMISSION_DENIED,
        new RegExp(`may not read segment ${sysv.id} .*run the agent as the user that owns the segment`),
      );
      segments.posix(`${prefix}77`, 6).write(0, Uint8Array.of(1, 2, 3, 4, 5, 6)).chown(nobody).chmod(0o600);
      await rejectsWith(
        agent.client.predict("id", [shmTensor("x", DataType.UINT8, [2, 3], { segment_id: 77 })]),
        Status.PERMISSION_DENIED,
        new RegExp(`may not read shared memory object ${prefix}77`),
      );
      // Granting others read access is enough.
      sysv.chmod(0o604);
      const { tensors } = await agent.client.predict("id", [
        shmTensor("x", DataType.UINT8, [2, 3], { segment_id: sysv.id }),
      ]);
      assert.deepEqual([...new Uint8Array(tensors[0].byte_data!)], [1, 2, 3, 4, 5, 6]);
      // Revoked again while the agent keeps the segment attached: the next request is refused all the same.
      sysv.chmod(0o600);
      await rejectsWith(
        agent.client.predict("id", [shmTensor("x", DataType.UINT8, [2, 3], { segment_id: sysv.id })]),
        Status.PERMISSION_DENIED,
      );
    } finally {
      assert.equal((await agent.stop()).code, 0, agent.logs());
      await Deno.remove(agent.dir, { recursive: true });
      segments.removeAll();
    }
  },
});

/** Polls `condition` every 100 ms for up to `ms`; true once it holds. */
async function eventually(condition: () => boolean, ms: number): Promise<boolean> {
  for (const deadline = performance.now() + ms; performance.now() < deadline;) {
    if (condition()) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return condition();
}

/** Long beside the sweep (1 s), so a removed segment's release cannot be taken for an idle one's. */
const KEEP_ATTACHED_SECONDS = 5;

Deno.test("a SysV segment stays attached between requests, and is let go once idle, removed, or at the stop", async () => {
  const metricsDir = await Deno.makeTempDir();
  const metricsSocket = `${metricsDir}/metrics.sock`;
  const agent = await startAgent({
    config: {
      edge_agent_sysv_keep_attached_seconds: KEEP_ATTACHED_SECONDS,
      edge_agent_metrics: `unix:${metricsSocket}`,
    },
  });
  const http = Deno.createHttpClient({ proxy: { transport: "unix", path: metricsSocket } });
  const attachedGauge = async () => {
    const text = await (await fetch("http://localhost/metrics", { client: http })).text();
    return Number(/^edge_agent_shm_sysv_segments_attached (\d+)$/m.exec(text)?.[1]);
  };
  const segments: SysvSegment[] = [];
  try {
    const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n"]));
    await agent.client.loadModel(folder, "id");
    const predict = async (segment: SysvSegment, values: number[]) => {
      segment.write(0, Float32Array.from(values));
      const { tensors } = await agent.client.predict("id", [
        shmTensor("x", DataType.FLOAT32, [values.length], { segment_id: segment.id }),
      ]);
      assert.deepEqual([...floats(tensors[0].byte_data)], values, "each request reads the segment's current data");
    };
    const idle = new SysvSegment(16);
    segments.push(idle);
    await predict(idle, [1, 2, 3, 4]);
    await predict(idle, [5, 6, 7, 8]);
    assert.equal(sysvAttachments(idle.id), 2, "this test and the agent, which kept it for the next request");
    assert.equal(await attachedGauge(), 1);
    assert.ok(
      await eventually(() => sysvAttachments(idle.id) === 1, 20_000),
      `detached after ${KEEP_ATTACHED_SECONDS} s without requests`,
    );
    assert.equal(await attachedGauge(), 0);
    await predict(idle, [9, 10, 11, 12]);
    assert.equal(sysvAttachments(idle.id), 2, "attached again on the next request");

    // The client removes its segment: the agent lets go within its sweep (a second), so the memory is
    // freed well before the segment would have idled out.
    const removed = new SysvSegment(16);
    await predict(removed, [1, 1, 1, 1]);
    removed.remove();
    assert.ok(
      await eventually(() => sysvAttachments(removed.id) === null, (KEEP_ATTACHED_SECONDS - 1) * 1000),
      "the removed segment is freed",
    );

    const status = await agent.stop();
    assert.equal(status.code, 0, agent.logs());
    assert.equal(sysvAttachments(idle.id), 1, "the stopped agent holds nothing");
  } finally {
    http.close();
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    await Deno.remove(metricsDir, { recursive: true });
    for (const segment of segments) segment.remove();
  }
});

Deno.test("requests through a kept SysV segment add its bytes to V8's outside memory once, not once per request", () => {
  // V8 counts every new ArrayBuffer over outside memory as memory pressure; megabytes per request would
  // set off a full collection every few requests, whose marking takes a core from the Runs.
  const libc = Libc.open();
  const size = 4 << 20;
  const segment = new SysvSegment(size);
  const reader = new SharedMemoryReader(libc, { kind: "sysv", posixPrefix: "/unused_", sysvKeepAttachedSeconds: 60 });
  try {
    const handle = { size: 0n, offset: 0n, segmentId: BigInt(segment.id) };
    const requests = 25;
    const before = Deno.memoryUsage().external;
    // Held, so a collection meanwhile cannot hide what they added.
    const held: Uint8Array[] = [];
    for (let i = 0; i < requests; i++) {
      const input = reader.open("input", { ...handle, size: BigInt(size / 2) }, size / 2, 4);
      const output = reader.openWritable("output", { ...handle, offset: BigInt(size / 2) }, 4);
      output.bytes[i] = i + 1;
      assert.equal(segment.read(size / 2 + i, 1)[0], i + 1, "the output's view writes into the segment");
      assert.equal(input.bytes.byteLength, size / 2);
      held.push(input.bytes, output.bytes);
      input.release();
      output.release();
    }
    const added = Deno.memoryUsage().external - before;
    assert.ok(added <= 2 * size + (1 << 20), `${requests} requests added ${added} bytes of outside memory`);
  } finally {
    reader.close();
    segment.remove();
    libc.close();
  }
});
