// Request and response buffers are reused across calls (src/transport/buffers.ts). These tests fill a
// call's bytes, make later calls that would reuse its buffer, and compare: a call cancelled while its
// handler still reads its request (as a terminated ONNX Runtime Run does), and a capture whose data
// the agent stores after answering, must never see another call's bytes. The socket writer's chunks
// (src/transport/socket_writer.ts) keep what they carry in order and go back to the pool once each.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { BufferPool, sizeClass } from "../src/transport/buffers.ts";
import { GrpcCallError, GrpcClient } from "../src/transport/client.ts";
import { concat } from "../src/transport/frames.ts";
import { type CallContext, GrpcServer, type UnaryResult } from "../src/transport/http2.ts";
import { CHUNK_BYTES, SocketWriter } from "../src/transport/socket_writer.ts";
import { encodePredictResponseInto, enumValues, messageType, type OutputTensor } from "../src/service/wire.ts";
import { withAgent } from "./helpers/agent.ts";
import { floats, tensor } from "./helpers/assertions.ts";
import { identityModel, OnnxType, writeModelFolder } from "./helpers/onnx_models.ts";
import { until } from "./helpers/wait.ts";

const DataType = enumValues("DataType");
const CaptureStatus = enumValues("CaptureDataStatus");
const MESSAGE_BYTES = 1024 * 1024;

function filled(value: number, length = MESSAGE_BYTES): Uint8Array {
  return new Uint8Array(length).fill(value);
}

Deno.test("a lease keeps its buffer out of the pool until its last holder releases it", () => {
  const pool = new BufferPool(16 * MESSAGE_BYTES);
  const first = pool.lease(MESSAGE_BYTES, 3);
  assert.equal(first.bytes.length, MESSAGE_BYTES);
  assert.equal(first.bytes.byteOffset, 3, "the view starts where the caller asked (alignment room)");
  first.bytes.fill(1);
  first.retain();
  first.release();
  const second = pool.lease(MESSAGE_BYTES);
  assert.ok(second.backing !== first.backing, "still held by its second holder: not handed out again");
  first.release();
  assert.throws(() => first.release(), /released twice/);
  const third = pool.lease(MESSAGE_BYTES - 10, 13);
  assert.ok(third.backing === first.backing, "the same size class reuses the buffer given back");
  assert.equal(pool.reused, 1);
  // Small buffers are not pooled, and the pool holds at most its byte bound.
  assert.equal(pool.lease(100).backing.length, 100);
  const small = new BufferPool(MESSAGE_BYTES);
  const a = small.lease(MESSAGE_BYTES);
  const b = small.lease(MESSAGE_BYTES);
  a.release();
  b.release();
  assert.equal(small.spareBytes, sizeClass(MESSAGE_BYTES));
});

Deno.test("a pooled PredictResponse is byte for byte the one protobufjs encodes", () => {
  const tensors = [
    { name: "out", shape: [1, 3, 640, 640], bytes: filled(7, 4 * 3 * 640 * 640) },
    { name: "", shape: [], bytes: new Uint8Array(0) },
    { name: "x".repeat(200), shape: [2, 100000], bytes: filled(9, 300) },
  ];
  // An output written into shared memory carries its handle instead of bytes.
  const handle = { size: "1638400", offset: "4096", segment_id: "32769" };
  const expected = messageType("PredictResponse").encode({
    tensors: [
      ...tensors.map((t) => ({
        tensor_metadata: { name: new TextEncoder().encode(t.name), data_type: DataType.FLOAT32, shape: t.shape },
        byte_data: t.bytes,
      })),
      {
        tensor_metadata: { name: new TextEncoder().encode("map"), data_type: DataType.FLOAT32, shape: [1, 640, 640] },
        shared_memory_handle: handle,
      },
    ],
  }).finish();
  const pool = new BufferPool(64 * MESSAGE_BYTES);
  const actual = encodePredictResponseInto(
    tensors.map((t): OutputTensor => ({
      tensor_metadata: { name: new TextEncoder().encode(t.name), data_type: DataType.FLOAT32, shape: t.shape },
      byteLength: t.bytes.length,
      copyInto: (target: Uint8Array) => target.set(t.bytes),
    })).concat([{
      tensor_metadata: { name: new TextEncoder().encode("map"), data_type: DataType.FLOAT32, shape: [1, 640, 640] },
      byteLength: 0,
      copyInto: () => {},
      shared_memory_handle: handle,
    }]),
    (length) => pool.lease(length).bytes,
  );
  assert.equal(actual.length, expected.length);
  assert.ok(actual.every((byte, i) => byte === expected[i]));
});

Deno.test("a call cancelled while its handler still reads its request keeps its bytes until the handler settles", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-buffers-" });
  const socket = join(dir, "grpc.sock");
  const handlerCancelled = Promise.withResolvers<void>();
  const laterCallsDone = Promise.withResolvers<void>();
  const held = Promise.withResolvers<{ intact: boolean; first: number }>();
  // Reads its request after its call was cancelled, as ONNX Runtime reads a Predict's input until a
  // terminated Run has returned.
  const hold = async (request: Uint8Array, call: CallContext): Promise<UnaryResult> => {
    await new Promise((resolve) => call.signal.addEventListener("abort", resolve, { once: true }));
    handlerCancelled.resolve();
    await laterCallsDone.promise;
    held.resolve({ intact: request.every((byte) => byte === 0xaa), first: request[0] });
    return { message: new Uint8Array(0) };
  };
  const echo = (request: Uint8Array): Promise<UnaryResult> => {
    return Promise.resolve({ message: request.slice(0, 16) });
  };
  // Answers at once but keeps a view of its request, declared with keepRequest, until told to let go.
  let kept: { request: Uint8Array; letGo: () => void } | null = null;
  const keep = (request: Uint8Array, call: CallContext): Promise<UnaryResult> => {
    kept = { request, letGo: call.keepRequest() };
    return Promise.resolve({ message: new Uint8Array(0) });
  };
  const server = new GrpcServer({
    methods: new Map([["/test/Hold", hold], ["/test/Echo", echo], ["/test/Keep", keep]]),
    maxMessageBytes: 4 * MESSAGE_BYTES,
  });
  server.listen(socket);
  const client = new GrpcClient(socket);
  try {
    await assert.rejects(
      client.unary("/test/Hold", filled(0xaa), { deadlineMs: 300 }),
      (error) => error instanceof GrpcCallError && error.code === Status.DEADLINE_EXCEEDED,
    );
    await handlerCancelled.promise;
    // Same size class: each would take the held buffer if it had been given back at the cancellation.
    const reusedBefore = server.pool.reused;
    for (let i = 0; i < 4; i++) assert.deepEqual(await client.unary("/test/Echo", filled(0x55)), filled(0x55, 16));
    laterCallsDone.resolve();
    const { intact, first } = await held.promise;
    assert.ok(intact, `the cancelled call's request was overwritten (first byte ${first.toString(16)})`);
    // Once it settled, its buffer is reused: the test exercised the pool, not fresh buffers.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const reusedAfterHold = server.pool.reused;
    await client.unary("/test/Echo", filled(0x11));
    assert.ok(server.pool.reused > reusedAfterHold && reusedAfterHold > reusedBefore, "buffers are reused");

    // A handler that keeps its request past its answer, by keepRequest.
    await client.unary("/test/Keep", filled(0xcc));
    for (let i = 0; i < 4; i++) await client.unary("/test/Echo", filled(0x33));
    const { request, letGo } = kept!;
    assert.ok(request.every((byte) => byte === 0xcc), "a kept request was overwritten");
    letGo();
    letGo(); // a second call is harmless
    const reusedBeforeLetGo = server.pool.reused;
    await client.unary("/test/Echo", filled(0x22));
    assert.ok(server.pool.reused > reusedBeforeLetGo, "let go of, its buffer is reused");
  } finally {
    client.close();
    await server.stop(0);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a capture's tensors are stored as sent, while later calls reuse the request buffers", async () => {
  const rowsCount = 40_000; // 480 KB: a pooled request
  const captureRows = (seed: number) => Float32Array.from({ length: rowsCount * 3 }, (_, i) => seed * 1e6 + i);
  await withAgent({
    config: {
      sagemaker_edge_core_capture_data_batch_size: 1,
      sagemaker_edge_core_capture_data_push_period_seconds: 1,
    },
  }, async (agent) => {
    const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n", 3]));
    await agent.client.loadModel(folder, "id");
    const sent = captureRows(1);
    const captured = agent.client.call("CaptureData", {
      model_name: "id",
      capture_id: "kept-1",
      input_tensors: [tensor("x", DataType.FLOAT32, [rowsCount, 3], sent)],
      output_tensors: [],
    }).then(() => null, (error) => error);
    // Calls of about the same size while the capture is being taken and after it was acknowledged.
    for (let seed = 2; seed < 8; seed++) {
      const { tensors } = await agent.client.predict("id", [
        tensor("x", DataType.FLOAT32, [rowsCount, 3], captureRows(seed)),
      ]);
      assert.equal(floats(tensors[0].byte_data!)[5], seed * 1e6 + 5);
      if (seed === 4) assert.equal(await captured, null, "the capture is acknowledged");
    }
    await until(
      async () =>
        (await agent.client.call<{ status: number }>("GetCaptureDataStatus", { capture_id: "kept-1" })).status ===
          CaptureStatus.SUCCESS,
      "the capture is stored",
    );
    const captures = join(agent.dir, "state", "captures");
    const stored = await storedTensor(captures);
    assert.equal(stored.length, sent.length);
    assert.ok(stored.every((value, i) => value === sent[i]), "the stored capture holds the bytes sent");
  });
});

/** The one large tensor object under `root`. */
async function storedTensor(root: string): Promise<Float32Array> {
  const files: string[] = [];
  const walk = async (dir: string) => {
    for await (const entry of Deno.readDir(dir)) {
      const path = join(dir, entry.name);
      if (entry.isDirectory) await walk(path);
      else if (!path.endsWith(".jsonl")) files.push(path);
    }
  };
  await walk(root);
  assert.equal(files.length, 1, `one tensor object: ${files.join(", ")}`);
  return floats(await Deno.readFile(files[0]));
}

Deno.test("large answers written while other connections' calls reuse the buffers arrive intact", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-buffers-" });
  const socket = join(dir, "grpc.sock");
  const answerBytes = 2 * MESSAGE_BYTES; // more than a socket holds: its writes stay in flight for a while
  // Its answer in a pooled buffer, every byte the request's first one.
  const fill = (request: Uint8Array, call: CallContext): Promise<UnaryResult> =>
    Promise.resolve({ message: call.responseBuffer(answerBytes).fill(request[0]) });
  const server = new GrpcServer({ methods: new Map([["/test/Fill", fill]]), maxMessageBytes: 4 * MESSAGE_BYTES });
  server.listen(socket);
  const clients = [1, 2, 3].map(() => new GrpcClient(socket));
  try {
    await Promise.all(clients.map(async (client, c) => {
      for (let i = 0; i < 8; i++) {
        const value = c * 16 + i + 1;
        const answer = await client.unary("/test/Fill", filled(value, 16));
        assert.equal(answer.length, answerBytes);
        const wrong = answer.findIndex((byte) => byte !== value);
        assert.equal(wrong, -1, `answer ${value} holds ${answer[wrong]} at ${wrong}`);
      }
    }));
    assert.ok(server.pool.reused > 10, `buffers are reused (${server.pool.reused})`);
    // Every answer's buffer comes back once its write has settled.
    await until(() => server.pool.sparesFor(answerBytes) >= 1, "answer buffers are given back to the pool");
  } finally {
    for (const client of clients) client.close();
    await server.stop(0);
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * A SocketWriter on the accepted end of a connected pair of Unix sockets, with its own pool and the errors
 * it reported; `peer` is the connecting end.
 */
async function writerPair() {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-writer-" });
  const path = join(dir, "s.sock");
  const listener = Deno.listen({ transport: "unix", path });
  const [writerEnd, peer] = await Promise.all([listener.accept(), Deno.connect({ transport: "unix", path })]);
  listener.close();
  const pool = new BufferPool(64 * 1024 * 1024);
  const errors: unknown[] = [];
  return {
    writer: new SocketWriter(writerEnd, pool, () => {}, (e) => errors.push(e)),
    pool,
    errors,
    peer,
    close: async () => {
      for (const conn of [writerEnd, peer]) {
        try {
          conn.close();
        } catch { /* closed already */ }
      }
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Small pieces of 1-200 bytes, each filled with its own index: a lost, repeated or reordered one shows. */
function smallPieces(count: number): Uint8Array[] {
  return Array.from({ length: count }, (_, i) => new Uint8Array(1 + (i * 37) % 200).fill(i & 0xff));
}

Deno.test("pieces queued behind a write in flight arrive whole and in order, copied into pooled chunks", async () => {
  const { writer, pool, errors, peer, close } = await writerPair();
  try {
    // 4 MiB is more than the socket holds: the write stays in flight while the small pieces queue.
    const large = new Uint8Array(4 * 1024 * 1024).map((_, i) => i % 251);
    const pieces = smallPieces(20_000);
    writer.send(large);
    writer.flush();
    for (const piece of pieces) writer.send(piece);
    const expected = concat([large, ...pieces]);
    const received = new Uint8Array(expected.length);
    for (let at = 0; at < received.length;) {
      const n = await peer.read(received.subarray(at));
      assert.ok(n !== null, `the stream ended at byte ${at} of ${received.length}`);
      at += n;
    }
    assert.ok(received.every((b, i) => b === expected[i]), "bytes arrived as sent");
    await new Promise<void>((resolve) => writer.afterWrites(resolve));
    assert.deepEqual(errors, []);
    // The chunks the pieces were copied into came back to the pool once written.
    assert.ok(pool.spareBytes >= CHUNK_BYTES, `spare ${pool.spareBytes}`);
  } finally {
    await close();
  }
});

Deno.test("when the peer goes, every chunk of what was queued goes back to the pool once", async () => {
  const { writer, pool, errors, peer, close } = await writerPair();
  try {
    writer.send(new Uint8Array(4 * 1024 * 1024));
    writer.flush();
    const pieces = smallPieces(5_000);
    for (const piece of pieces) writer.send(piece);
    const queued = pieces.reduce((n, p) => n + p.length, 0);
    peer.close();
    await until(() => errors.length > 0, "the write to fail", 10_000);
    await new Promise<void>((resolve) => writer.afterWrites(resolve));
    // Each chunk holds at most CHUNK_BYTES of pieces: all of them are back (a double release would have thrown).
    assert.ok(pool.spareBytes >= queued, `spare ${pool.spareBytes} of ${queued} queued bytes`);
    assert.equal(pool.spareBytes % CHUNK_BYTES, 0);
    writer.send(new Uint8Array(10));
    assert.equal(errors.length, 1, "nothing is written after the first failure");
  } finally {
    await close();
  }
});
