// The agent's own HTTP/2 transport: HPACK against RFC 7541's examples, clients that come and go
// (the case that crashes node:http2 under Deno), and hostile bytes on the socket.

import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { Status } from "../src/errors.ts";
import { encodeHeaders, HpackDecoder } from "../src/transport/hpack.ts";
import { GrpcJsAgentClient as AgentClient } from "./helpers/grpcjs_client.ts";
import { enumValues, SERVICE_NAME } from "../src/service/wire.ts";
import { type AgentProcess, withAgent } from "./helpers/agent.ts";
import { floats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { addSubModel, writeModelFolder } from "./helpers/onnx_models.ts";

const FLOAT32 = enumValues("DataType").FLOAT32;

function hex(text: string): Uint8Array {
  const clean = text.replace(/\s+/g, "");
  return Uint8Array.from({ length: clean.length / 2 }, (_, i) => parseInt(clean.slice(2 * i, 2 * i + 2), 16));
}

Deno.test("HPACK decodes RFC 7541 C.4 (Huffman, dynamic table across blocks) and C.3", () => {
  const decoder = new HpackDecoder();
  assert.deepEqual(decoder.decode(hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")), [
    [":method", "GET"],
    [":scheme", "http"],
    [":path", "/"],
    [":authority", "www.example.com"],
  ]);
  assert.deepEqual(decoder.decode(hex("8286 84be 5886 a8eb 1064 9cbf")), [
    [":method", "GET"],
    [":scheme", "http"],
    [":path", "/"],
    [":authority", "www.example.com"],
    ["cache-control", "no-cache"],
  ]);
  assert.deepEqual(decoder.decode(hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")), [
    [":method", "GET"],
    [":scheme", "https"],
    [":path", "/index.html"],
    [":authority", "www.example.com"],
    ["custom-key", "custom-value"],
  ]);
  const plain = new HpackDecoder();
  assert.deepEqual(plain.decode(hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d")), [
    [":method", "GET"],
    [":scheme", "http"],
    [":path", "/"],
    [":authority", "www.example.com"],
  ]);
});

Deno.test("HPACK refuses malformed blocks and round-trips what the server encodes", () => {
  const decoder = new HpackDecoder();
  for (const bad of ["80", "ff", "41", "4188f1e3", "bf", "3fe21f"]) {
    assert.throws(() => new HpackDecoder().decode(hex(bad)), /HPACK/, bad);
  }
  const headers: [string, string][] = [
    [":status", "200"],
    ["content-type", "application/grpc"],
    ["grpc-status", "3"],
    ["grpc-message", "tensor %22x%22: shape [1,2] does not fit"],
  ];
  assert.deepEqual(decoder.decode(encodeHeaders(headers)), headers);
});

function withAddSub(fn: (agent: AgentProcess) => Promise<void>): Promise<void> {
  return withAgent({}, async (agent) => {
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    await fn(agent);
  });
}

async function addSub(client: AgentClient, value: number): Promise<void> {
  const a = Float32Array.of(value, value, value, value);
  const { tensors } = await client.predict("addsub", [
    tensor("a", FLOAT32, [2, 2], a),
    tensor("b", FLOAT32, [2, 2], a),
  ]);
  assert.deepEqual([...floats(tensors[0].byte_data)], [2 * value, 2 * value, 2 * value, 2 * value]);
}

Deno.test("clients that run concurrent calls and then close their channel never bring the agent down", async () => {
  await withAddSub(async (agent) => {
    for (let round = 0; round < 15; round++) {
      const client = new AgentClient(agent.socket);
      await Promise.all(Array.from({ length: 6 }, async (_, worker) => {
        for (let i = 0; i < 10; i++) await addSub(client, round * 100 + worker * 10 + i);
      }));
      client.close();
    }
    await addSub(agent.client, 7);
  });
});

/** Sends raw bytes on a fresh connection and returns what the agent answered before closing. */
async function raw(socket: string, bytes: Uint8Array, waitMs = 2000): Promise<Uint8Array> {
  const conn = await Deno.connect({ transport: "unix", path: socket });
  try {
    await conn.write(bytes);
    const received: Uint8Array[] = [];
    const buffer = new Uint8Array(65536);
    const deadline = setTimeout(() => conn.close(), waitMs);
    try {
      for (;;) {
        const n = await conn.read(buffer);
        if (n === null) break;
        received.push(buffer.slice(0, n));
      }
    } catch { /* closed by the deadline */ }
    clearTimeout(deadline);
    return Uint8Array.from(received.flatMap((r) => [...r]));
  } finally {
    try {
      conn.close();
    } catch { /* already closed */ }
  }
}

const PREFACE = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

function frameOf(type: number, flags: number, stream: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(9 + payload.length);
  out.set([payload.length >> 16, (payload.length >> 8) & 0xff, payload.length & 0xff, type, flags]);
  new DataView(out.buffer).setUint32(5, stream);
  out.set(payload, 9);
  return out;
}

/** The frames of an answer, in order. */
function framesOf(bytes: Uint8Array): { type: number; stream: number; payload: Uint8Array }[] {
  const frames = [];
  for (let pos = 0; pos + 9 <= bytes.length;) {
    const length = (bytes[pos] << 16) | (bytes[pos + 1] << 8) | bytes[pos + 2];
    const stream = new DataView(bytes.buffer, bytes.byteOffset + pos + 5, 4).getUint32(0) & 0x7fffffff;
    frames.push({ type: bytes[pos + 3], stream, payload: bytes.subarray(pos + 9, pos + 9 + length) });
    pos += 9 + length;
  }
  return frames;
}

function frameTypes(bytes: Uint8Array): number[] {
  return framesOf(bytes).map((f) => f.type);
}

const GOAWAY = 7;

Deno.test("hostile bytes on the socket end that connection only; the agent keeps serving", async () => {
  await withAddSub(async (agent) => {
    const garbage = Uint8Array.from({ length: 4096 }, (_, i) => (i * 7919) % 256);
    await raw(agent.socket, garbage);
    await raw(agent.socket, new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    const settings = frameOf(4, 0, 0, new Uint8Array(0));
    const cases: [string, Uint8Array][] = [
      ["HEADERS with an undecodable block", frameOf(1, 0x5, 1, Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff))],
      ["HEADERS on stream 0", frameOf(1, 0x5, 0, Uint8Array.of(0x82))],
      ["an oversized frame", frameOf(0, 0, 1, new Uint8Array(20000))],
      ["DATA on an idle stream", frameOf(0, 0, 9, Uint8Array.of(0, 0, 0, 0, 0))],
      ["PUSH_PROMISE from a client", frameOf(5, 0x4, 1, Uint8Array.of(0, 0, 0, 2))],
      ["SETTINGS of a bad length", frameOf(4, 0, 0, Uint8Array.of(1, 2, 3))],
      ["a zero WINDOW_UPDATE on the connection", frameOf(8, 0, 0, Uint8Array.of(0, 0, 0, 0))],
    ];
    for (const [label, bad] of cases) {
      const answer = await raw(agent.socket, Uint8Array.from([...PREFACE, ...settings, ...bad]));
      assert.ok(frameTypes(answer).includes(GOAWAY), `${label}: expected a GOAWAY, got ${frameTypes(answer)}`);
    }
    await addSub(agent.client, 3);
  });
});

Deno.test("unknown methods, non-gRPC requests and missing messages get clear statuses", async () => {
  await withAddSub(async (agent) => {
    const rawClient = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure());
    const call = (path: string, body: Uint8Array) =>
      new Promise((resolve, reject) =>
        rawClient.makeUnaryRequest(
          path,
          (b: Uint8Array) => Buffer.from(b),
          (b: Buffer) => b,
          body,
          (error, value) => error ? reject(error) : resolve(value),
        )
      );
    try {
      await rejectsWith(call(`/${SERVICE_NAME}/Nope`, new Uint8Array(0)), Status.UNIMPLEMENTED, /Nope/);
      await rejectsWith(call(`/Other.Service/Predict`, new Uint8Array(0)), Status.UNIMPLEMENTED);
    } finally {
      rawClient.close();
    }
    // A plain HTTP/2 POST that is not gRPC gets HTTP 415.
    const request = encodeHeaders([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", `/${SERVICE_NAME}/ListModels`],
      [":authority", "localhost"],
      ["content-type", "text/plain"],
    ]);
    const answer = await raw(
      agent.socket,
      Uint8Array.from([...PREFACE, ...frameOf(4, 0, 0, new Uint8Array(0)), ...frameOf(1, 0x5, 1, request)]),
      300,
    );
    const headers = framesOf(answer).find((f) => f.type === 1 && f.stream === 1);
    assert.ok(headers, "a HEADERS answer on stream 1");
    assert.deepEqual(new HpackDecoder().decode(headers.payload)[0], [":status", "415"]);
    await addSub(agent.client, 5);
  });
});

Deno.test("requests that declare huge messages and never send them cannot exhaust the agent's memory", async () => {
  await withAddSub(async (agent) => {
    const headers = encodeHeaders([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", `/${SERVICE_NAME}/Predict`],
      [":authority", "localhost"],
      ["content-type", "application/grpc"],
    ]);
    // Each stream announces a 60 MB message (under the 64 MiB limit) and sends only its prefix.
    const prefix = Uint8Array.of(0, 0x03, 0x93, 0x87, 0x00);
    const frames: number[] = [...PREFACE, ...frameOf(4, 0, 0, new Uint8Array(0))];
    for (const stream of [1, 3, 5, 7]) {
      frames.push(...frameOf(1, 0x4, stream, headers), ...frameOf(0, 0, stream, prefix));
    }
    const answer = await raw(agent.socket, Uint8Array.from(frames), 500);
    const refused = framesOf(answer).filter((f) => f.type === 1).map((f) => ({
      stream: f.stream,
      headers: Object.fromEntries(new HpackDecoder().decode(f.payload)),
    }));
    assert.deepEqual(refused.map((r) => [r.stream, r.headers["grpc-status"]]), [[5, "8"], [7, "8"]]);
    assert.match(refused[0].headers["grpc-message"], /too many large requests at once on this connection/);
    await addSub(agent.client, 9);
  });
});
