// The known HTTP/2 attacks against the real agent: each attacker runs on its own raw connection while
// a well-behaved grpcio client keeps calling ListModels. Pass: every legitimate call answers within
// 1 s, the agent's resident memory stays under the stated bound, and the attacker gets the right
// GOAWAY code (or is closed, for the connection cap and the idle timeout).

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { type AgentProcess, parseLogs, startAgent } from "./helpers/agent.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";
import {
  concat,
  ENHANCE_YOUR_CALM,
  frameOf,
  grpcMessage,
  NO_ERROR,
  PREFACE,
  RawPeer,
  requestHeaders,
  rssMiB,
  runQueueWaitMs,
  settingsOf,
  T,
  u32,
  unaryCall,
} from "./helpers/raw_h2.ts";
import { createLogger, REPEAT_WINDOW_MS, REPEATS_PER_WINDOW } from "../src/log.ts";
import { SendHeap } from "../src/transport/limits.ts";
import { HEALTH_SERVICE_NAME, SERVICE_NAME } from "../src/service/wire.ts";

const missing = await pythonGrpcMissing();
const LIST_MODELS = `/${SERVICE_NAME}/ListModels`;
const WATCH = `/${HEALTH_SERVICE_NAME}/Watch`;
const REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/** What the agent's resident memory may grow by under attack (garbage not yet collected included; it starts near 100 MiB). */
const RSS_GROWTH_MIB = 128;
/** Beyond the time the agent waited for a CPU (a loaded machine's share, not the attack's). */
const SLOWEST_LEGITIMATE_MS = 1000;

let stubs: Promise<string> | null = null;

function stubsDir(): Promise<string> {
  return Deno.makeTempDir({ prefix: "attack-stubs-" }).then((dir) => {
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    return generateStubs(dir);
  });
}

/** The grpcio client calling ListModels until stopped. */
async function steadyClient(socket: string) {
  stubs ??= stubsDir();
  const child = new Deno.Command(PYTHON, {
    args: [join(import.meta.dirname!, "python", "steady_client.py"), "--stubs", await stubs, "--socket", socket],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const reader = child.stdout.getReader();
  let text = "";
  while (!text.includes("ready")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`steady client died: ${await stderr}`);
    text += new TextDecoder().decode(value);
  }
  return {
    async stop(): Promise<{ calls: number; failures: string[]; slowest_ms: number; windows: [number, number][] }> {
      await child.stdin.close();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += new TextDecoder().decode(value);
      }
      const status = await child.status;
      assert.ok(status.success, await stderr);
      return JSON.parse(text.split("\n").filter((l) => l.startsWith("{")).pop()!);
    },
  };
}

/**
 * Runs `attacks` against a fresh agent while the steady client calls; checks the client's calls and
 * the agent's peak memory, then that the agent stops cleanly.
 */
async function underAttack(
  config: Record<string, unknown>,
  attacks: (agent: AgentProcess) => Promise<void>,
  rssGrowthMiB = RSS_GROWTH_MIB,
): Promise<AgentProcess> {
  const agent = await startAgent({ config });
  try {
    const pid = agent.process.pid;
    const before = rssMiB(pid);
    let peak = before;
    const waits: RunQueueSample[] = [[Date.now(), runQueueWaitMs(pid)]];
    const sampler = setInterval(() => {
      try {
        peak = Math.max(peak, rssMiB(pid));
        waits.push([Date.now(), runQueueWaitMs(pid)]);
      } catch { /* exited */ }
    }, 50);
    const client = await steadyClient(agent.socket);
    try {
      await attacks(agent);
      peak = Math.max(peak, rssMiB(pid));
    } finally {
      clearInterval(sampler);
      const result = await client.stop();
      waits.push([Date.now(), runQueueWaitMs(pid)]);
      assert.deepEqual(result.failures, [], "legitimate calls failed");
      assert.ok(result.calls > 0, "the legitimate client made calls");
      const slowest = slowestCall(result.windows, waits);
      assert.ok(
        slowest.served < SLOWEST_LEGITIMATE_MS,
        `a legitimate call took ${slowest.wall.toFixed(0)} ms, ${slowest.waited.toFixed(0)} ms of it with the agent ` +
          `waiting for a CPU (${result.calls} calls)`,
      );
    }
    assert.ok(
      peak - before < rssGrowthMiB,
      `RSS grew by ${(peak - before).toFixed(0)} MiB (${before.toFixed(0)} MiB before)`,
    );
    const status = await agent.stop();
    assert.equal(status.code, 0, agent.logs());
    return agent;
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
}

/** When (ms since the epoch) and how long the agent had waited for a CPU by then (ms). */
type RunQueueSample = [number, number];

/** The agent's time waiting for a CPU by `at`, between the samples around it. */
function waitedBy(at: number, samples: RunQueueSample[]): number {
  const after = samples.findIndex(([t]) => t >= at);
  if (after <= 0) return after === 0 ? samples[0][1] : samples[samples.length - 1][1];
  const [t0, w0] = samples[after - 1], [t1, w1] = samples[after];
  return w0 + (w1 - w0) * (at - t0) / Math.max(1, t1 - t0);
}

/** The legitimate call that took longest once the agent's waits for a CPU during it are taken off. */
function slowestCall(windows: [number, number][], samples: RunQueueSample[]) {
  let slowest = { served: 0, wall: 0, waited: 0 };
  for (const [start, end] of windows) {
    const waited = waitedBy(end, samples) - waitedBy(start, samples);
    const served = end - start - waited;
    if (served > slowest.served) slowest = { served, wall: end - start, waited };
  }
  return slowest;
}

/** Floods `unit` on a fresh connection until the agent says GOAWAY; checks its code. */
async function floodUntilGoAway(socket: string, label: string, unit: Uint8Array, code = ENHANCE_YOUR_CALM) {
  const peer = await RawPeer.open(socket);
  await peer.flood(unit, 8000);
  await peer.waitFor(() => peer.goAway !== null, 3000, `${label}: GOAWAY`);
  assert.equal(peer.goAway, code, `${label}: GOAWAY code`);
  await peer.waitFor(() => peer.closed, 3000, `${label}: connection closed`);
  peer.close();
}

/** `count` copies of `frame`, written at once. */
const times = (frame: Uint8Array, count: number) => concat(Array.from({ length: count }, () => frame));

const test = (name: string, fn: () => Promise<void>) => Deno.test({ name, ignore: missing !== null, fn });

test("a fast legitimate client is not taken for a flood: its WINDOW_UPDATEs answer the agent's DATA", async () => {
  // grpcio answers each response with a connection and a stream WINDOW_UPDATE; at a low rate and
  // calls back to back, those alone would pass the rate within a second if they were not earned.
  const agent = await startAgent({ config: { edge_agent_control_frames_per_second: 100 } });
  try {
    const calls = 3000;
    const { success, stdout, stderr } = await new Deno.Command(PYTHON, {
      args: [
        join(import.meta.dirname!, "python", "steady_client.py"),
        ...["--stubs", await (stubs ??= stubsDir()), "--socket", agent.socket, "--calls", String(calls)],
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(success, new TextDecoder().decode(stderr));
    const result = JSON.parse(new TextDecoder().decode(stdout).split("\n").filter((l) => l.startsWith("{")).pop()!);
    assert.deepEqual(result.failures, [], "calls failed");
    assert.equal(result.calls, calls);
    // Read once the agent has stopped: every line it wrote is in.
    assert.equal((await agent.stop()).code, 0, agent.logs());
    assert.ok(!agent.logs().includes("control or empty frames"), "the client was taken for a flood");
  } finally {
    await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
  }
});

test("control-frame floods (PING, SETTINGS, RST_STREAM, WINDOW_UPDATE, PRIORITY, empty DATA) get GOAWAY ENHANCE_YOUR_CALM", async () => {
  await underAttack({}, async ({ socket }) => {
    const ping = frameOf(T.PING, 0, 0, new Uint8Array(8));
    await floodUntilGoAway(socket, "PING", times(ping, 1000));
    await floodUntilGoAway(socket, "SETTINGS", times(settingsOf([[4, 65535]]), 1000));
    await floodUntilGoAway(socket, "WINDOW_UPDATE", times(frameOf(T.WINDOW_UPDATE, 0, 0, u32(1)), 1000));
    await floodUntilGoAway(socket, "PRIORITY", times(frameOf(T.PRIORITY, 0, 3, u32(0, 0).subarray(0, 5)), 1000));
    const resets = await RawPeer.open(socket);
    await resets.write(unaryCall(1));
    await resets.flood(times(frameOf(T.RST_STREAM, 0, 1, u32(8)), 1000), 8000);
    await resets.waitFor(() => resets.goAway !== null, 3000, "RST_STREAM: GOAWAY");
    assert.equal(resets.goAway, ENHANCE_YOUR_CALM, "RST_STREAM of a closed stream");
    resets.close();
    // Empty DATA on an open stream.
    const open = concat([frameOf(T.HEADERS, 0x4, 1, requestHeaders()), times(frameOf(T.DATA, 0, 1), 1000)]);
    const peer = await RawPeer.open(socket);
    await peer.write(open);
    await peer.flood(times(frameOf(T.DATA, 0, 1), 1000), 8000);
    await peer.waitFor(() => peer.goAway !== null, 3000, "empty DATA: GOAWAY");
    assert.equal(peer.goAway, ENHANCE_YOUR_CALM);
    peer.close();
  });
});

test("CONTINUATION floods (empty or small fragments, never END_HEADERS) get GOAWAY ENHANCE_YOUR_CALM", async () => {
  await underAttack({}, async ({ socket }) => {
    for (const [label, fragment] of [["empty", 0], ["one-byte", 1], ["1000-byte", 1000]] as const) {
      const peer = await RawPeer.open(socket);
      // The block never ends: the agent must not keep (or re-sum) fragments without bound.
      await peer.write(frameOf(T.HEADERS, 0, 1, Uint8Array.of(0x82)));
      await peer.flood(times(frameOf(T.CONTINUATION, 0, 1, new Uint8Array(fragment).fill(0x82)), 500), 8000);
      await peer.waitFor(() => peer.goAway !== null, 3000, `${label} CONTINUATION: GOAWAY`);
      assert.equal(peer.goAway, ENHANCE_YOUR_CALM, `${label} CONTINUATION`);
      peer.close();
    }
  });
});

test("rapid reset (HEADERS + RST_STREAM floods) stays harmless and is cut off", async () => {
  await underAttack({}, async ({ socket }) => {
    const peer = await RawPeer.open(socket);
    let stream = 1;
    const batch = () =>
      concat(Array.from({ length: 200 }, () => {
        const id = stream;
        stream += 2;
        return concat([unaryCall(id), frameOf(T.RST_STREAM, 0, id, u32(8))]);
      }));
    const end = performance.now() + 8000;
    while (peer.goAway === null && !peer.closed && performance.now() < end) await peer.write(batch());
    await peer.waitFor(() => peer.goAway !== null, 3000, "rapid reset: GOAWAY");
    assert.equal(peer.goAway, ENHANCE_YOUR_CALM);
    peer.close();
  });
});

test("clients that do not read: PING floods and unread answers stop being read; memory stays bounded", async () => {
  // The rate limit is lifted so that the write bound alone must hold the memory.
  const config = { edge_agent_control_frames_per_second: 1_000_000, edge_agent_max_pending_write_bytes: 65536 };
  await underAttack(config, async ({ socket }) => {
    const pinger = await RawPeer.open(socket, { read: false });
    const pings = await pinger.flood(times(frameOf(T.PING, 0, 0, new Uint8Array(8)), 4096), 2000, () => false);
    const caller = await RawPeer.open(socket, { read: false });
    const calls = await floodCalls(caller, LIST_MODELS, 2000);
    const hog = await RawPeer.open(socket, { read: false });
    await floodCalls(hog, "/Unknown/Method", 1000);
    // The agent stopped reading them: their writes stall long before the time is up.
    assert.ok(pings < 2000, `${pings} batches of 4096 PINGs were taken`);
    assert.ok(calls < 20000, `${calls} batches of 50 calls were taken`);
    for (const peer of [pinger, caller, hog]) peer.close();
  });
});

/**
 * Writes batches of 50 ListModels calls until the agent stops taking them (a batch not taken within 2 s):
 * by then its answers fill the socket and wait, unread. Counted, not timed: on a loaded machine a fixed
 * time may give too few calls to fill it.
 */
async function callsUntilUnread(peer: RawPeer): Promise<void> {
  let stream = 1;
  for (let batches = 0; batches < 100_000; batches++) {
    const batch = concat(Array.from({ length: 50 }, () => unaryCall((stream += 2) - 2, LIST_MODELS)));
    const taken = await Promise.race([
      peer.write(batch),
      new Promise<false>((resolve) => setTimeout(() => resolve(false), 2000)),
    ]);
    if (!taken) return;
  }
  assert.fail("the agent kept reading calls whose answers were never read");
}

/** Writes batches of 50 whole calls to `path`, on new streams, for `ms`; returns the batches taken. */
async function floodCalls(peer: RawPeer, path: string, ms: number): Promise<number> {
  let stream = 1;
  const end = performance.now() + ms;
  let batches = 0;
  while (performance.now() < end) {
    const batch = concat(Array.from({ length: 50 }, () => unaryCall((stream += 2) - 2, path)));
    const written = await Promise.race([
      peer.write(batch),
      new Promise<false>((resolve) => setTimeout(() => resolve(false), Math.max(1, end - performance.now()))),
    ]);
    if (!written) break;
    batches++;
  }
  return batches;
}

test("parked streams: WINDOW_UPDATE and SETTINGS floods do no work per stream and get GOAWAY ENHANCE_YOUR_CALM", async () => {
  await underAttack({ edge_agent_max_concurrent_streams: 1000 }, async ({ socket }) => {
    const peer = await RawPeer.open(socket, { preface: false });
    // Window 0: every answer parks behind it.
    await peer.write(concat([PREFACE, settingsOf([[4, 0]])]));
    await peer.write(concat(Array.from({ length: 999 }, (_, i) => unaryCall(2 * i + 1))));
    await peer.waitFor(() => peer.frames.filter((f) => f.type === T.HEADERS).length >= 999, 5000, "999 parked answers");
    const unit = concat([
      times(frameOf(T.WINDOW_UPDATE, 0, 0, u32(1)), 100),
      settingsOf([[4, 0]]),
      settingsOf([[4, 1]]),
    ]);
    await peer.flood(times(unit, 10), 8000);
    await peer.waitFor(() => peer.goAway !== null, 3000, "GOAWAY");
    assert.equal(peer.goAway, ENHANCE_YOUR_CALM);
    peer.close();
  });
});

test("connection cap: connections past it are closed at once, the others keep working; idle and deaf ones are closed", async () => {
  const config = { edge_agent_max_connections: 12, edge_agent_idle_connection_seconds: 1 };
  const agent = await underAttack(config, async ({ socket, logged }) => {
    // The steady client holds one connection; 11 more fit. Each holds a Watch open, so none idles
    // out (and frees its place) however long the others take to open on a loaded machine.
    const kept = await Promise.all(Array.from({ length: 11 }, async () => {
      const peer = await RawPeer.open(socket);
      await peer.write(
        concat([
          frameOf(T.HEADERS, 0x4, 1, requestHeaders(WATCH)),
          frameOf(T.DATA, 0, 1, grpcMessage(new Uint8Array(0))),
        ]),
      );
      return peer;
    }));
    await Promise.all(
      kept.map((p) =>
        p.waitFor(() => p.frames.some((f) => f.type === T.DATA && f.stream === 1), 10_000, "Watch status")
      ),
    );
    const refused = await RawPeer.open(socket, { preface: false });
    await refused.waitFor(() => refused.closed, 10_000, "refused connection closed");
    assert.deepEqual(refused.frames, []);
    // The ones within the cap are served: a call on each.
    await Promise.all(kept.map(async (p) => {
      await p.write(unaryCall(3));
      await p.waitFor(
        () => p.frames.some((f) => f.type === T.HEADERS && f.stream === 3 && f.flags & 0x1),
        10_000,
        "an answer",
      );
    }));
    // Once its Watch is cancelled, a connection is idle (no stream, no bytes): GOAWAY NO_ERROR, then closed.
    await Promise.all(kept.map(async (p) => {
      await p.write(frameOf(T.RST_STREAM, 0, 1, u32(8)));
      await p.waitFor(() => p.goAway !== null && p.closed, 10_000, "idle GOAWAY");
      assert.equal(p.goAway, NO_ERROR);
    }));
    // A silent one too.
    const silent = await RawPeer.open(socket, { preface: false });
    const opened = performance.now();
    await silent.waitFor(() => silent.closed, 10_000, "a connection that never sent a byte closed");
    assert.ok(performance.now() - opened > 900, "closed for idling, not refused");
    // A stream left open keeps its connection.
    const open = await RawPeer.open(socket);
    await open.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(WATCH)));
    await open.write(frameOf(T.DATA, 0, 1, grpcMessage(new Uint8Array(0))));
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.equal(open.closed, false, "a connection with an open Watch is not idle");
    open.close();
    // A client that stops reading while answers wait for it is cut off after the idle time.
    // It sends calls until the agent stops reading them: the answers have filled the socket (the agent
    // joins answers into few writes, so the kernel holds many) and then the agent's write bound.
    const deaf = await RawPeer.open(socket, { read: false });
    await callsUntilUnread(deaf);
    await logged((l) => /has read nothing/.test(String(l.error ?? l.msg)), "a client that reads nothing cut off");
    deaf.close();
  });
  const refusals = parseLogs(agent.logs()).filter((l) => String(l.msg).startsWith("connection refused"));
  assert.ok(refusals.length >= 1);
});

test("a thousand idle connections cost little memory", async () => {
  await underAttack({ edge_agent_max_connections: 2000 }, async ({ socket }) => {
    const peers = [];
    for (let i = 0; i < 1000; i++) peers.push(await RawPeer.open(socket, { preface: false, read: false }));
    await new Promise((resolve) => setTimeout(resolve, 500));
    for (const peer of peers) peer.close();
  }, 40);
});

/** A ServerReflectionRequest: list_services (field 7) after an unknown field 15 of `padding` bytes. */
function reflectionRequest(padding: number): Uint8Array {
  const varint = (n: number) => {
    const out = [];
    while (n > 0x7f) {
      out.push((n & 0x7f) | 0x80);
      n >>>= 7;
    }
    out.push(n);
    return out;
  };
  const head = Uint8Array.from([0x7a, ...varint(padding)]);
  return concat([head, new Uint8Array(padding).fill(0x61), Uint8Array.of(0x3a, 0)]);
}

/** `bytes` as DATA frames of at most 16 KiB on `stream`. */
function dataFrames(stream: number, bytes: Uint8Array, end = false): Uint8Array {
  const frames = [];
  for (let offset = 0; offset < bytes.length; offset += 16384) {
    const last = offset + 16384 >= bytes.length;
    frames.push(frameOf(T.DATA, last && end ? 1 : 0, stream, bytes.subarray(offset, offset + 16384)));
  }
  return concat(frames);
}

test("streaming calls: a Watch drops extra requests, reflection waits for its reader, 16 MiB arrives whole", async () => {
  await underAttack({}, async ({ socket }) => {
    // A Watch followed by 200 x 1 MiB requests it never reads: they are dropped, not kept.
    const watcher = await RawPeer.open(socket);
    await watcher.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(WATCH)));
    await watcher.write(frameOf(T.DATA, 0, 1, grpcMessage(new Uint8Array(0))));
    const extra = dataFrames(1, grpcMessage(new Uint8Array(1024 * 1024)));
    for (let i = 0; i < 200 && !watcher.closed; i++) await watcher.write(extra);
    await watcher.waitFor(() => watcher.frames.some((f) => f.type === T.DATA && f.stream === 1), 3000, "status");
    watcher.close();

    // Reflection whose client sends requests and gives no window for the answers: the handler waits
    // for each answer to leave before it takes the next request, so the requests queue up to their
    // bound and the call is refused (RST_STREAM), instead of the answers piling up in the agent.
    const stuck = await RawPeer.open(socket, { preface: false });
    await stuck.write(concat([PREFACE, settingsOf([[4, 0]])]));
    await stuck.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(REFLECTION)));
    for (let i = 0; i < 40 && !stuck.frames.some((f) => f.type === T.RST_STREAM); i++) {
      await stuck.write(frameOf(T.DATA, 0, 1, grpcMessage(reflectionRequest(0))));
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await stuck.waitFor(() => stuck.frames.some((f) => f.type === T.RST_STREAM && f.stream === 1), 3000, "RST_STREAM");
    stuck.close();

    // 16 MiB in 1024 DATA frames on a streaming call: answered in seconds (copies are not redone per frame).
    const large = await RawPeer.open(socket);
    const started = performance.now();
    await large.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(REFLECTION)));
    await large.write(dataFrames(1, grpcMessage(reflectionRequest(16 * 1024 * 1024 - 16)), true));
    await large.waitFor(() => large.frames.some((f) => f.type === T.HEADERS && f.flags & 0x1), 10000, "answer");
    const trailers = large.frames.filter((f) => f.type === T.HEADERS).pop()!;
    assert.ok(trailers.payload.length > 0);
    assert.ok(large.frames.some((f) => f.type === T.DATA && f.stream === 1), "a reflection answer");
    assert.ok(performance.now() - started < 10000);
    large.close();
  });
});

test("request messages held across connections are bounded: the call that does not fit gets RESOURCE_EXHAUSTED", async () => {
  const MiB = 1024 * 1024;
  const config = { edge_agent_max_message_bytes: 4 * MiB, edge_agent_max_buffered_message_bytes: 8 * MiB };
  await underAttack(config, async ({ socket }) => {
    const peers = await Promise.all([0, 1, 2].map(() => RawPeer.open(socket)));
    // Each declares a 3 MiB Predict request and sends only its first bytes: two fit in 8 MiB.
    const prefix = new Uint8Array(5);
    new DataView(prefix.buffer).setUint32(1, 3 * MiB);
    for (const peer of peers) {
      await peer.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(`/${SERVICE_NAME}/Predict`)));
      await peer.write(frameOf(T.DATA, 0, 1, prefix));
    }
    const last = peers[2];
    await last.waitFor(() => last.frames.some((f) => f.type === T.HEADERS), 3000, "an answer");
    const { HpackDecoder } = await import("../src/transport/hpack.ts");
    const headers = Object.fromEntries(
      new HpackDecoder().decode(last.frames.find((f) => f.type === T.HEADERS)!.payload),
    );
    assert.equal(headers["grpc-status"], "8");
    assert.match(decodeURIComponent(headers["grpc-message"]), /edge_agent_max_buffered_message_bytes/);
    for (const peer of peers.slice(0, 2)) assert.ok(!peer.frames.some((f) => f.type === T.HEADERS));
    for (const peer of peers) peer.close();
  });
});

test("5000 garbage prefaces give a handful of warning lines", async () => {
  const agent = await underAttack({}, async ({ socket }) => {
    const garbage = new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    for (let round = 0; round < 50; round++) {
      await Promise.all(Array.from({ length: 100 }, async () => {
        const conn = await Deno.connect({ transport: "unix", path: socket });
        await conn.write(garbage).catch(() => {});
        await conn.read(new Uint8Array(1024)).catch(() => null);
        conn.close();
      }));
    }
  });
  const warnings = parseLogs(agent.logs()).filter((l) => l.level === "warn");
  assert.ok(warnings.length <= 12, `${warnings.length} warning lines`);
});

Deno.test("repeated warnings are rate-limited and summarised with the number left out", async () => {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger(false, (line) => lines.push(JSON.parse(line)), 100);
  for (let i = 0; i < 5000; i++) log.warn("client connection error", { error: "bad preface" });
  log.warn("something else");
  log.info("not limited");
  assert.equal(lines.filter((l) => l.msg === "client connection error").length, 10);
  assert.equal(lines.filter((l) => l.msg === "something else").length, 1);
  await new Promise((resolve) => setTimeout(resolve, 200));
  const summary = lines.find((l) => l.msg === "repeated log lines suppressed");
  assert.deepEqual([summary?.message, summary?.suppressed], ["client connection error", 4990]);
});

Deno.test("out of descriptors: failed accepts are logged (rate-limited) and retried; new clients are served again", async () => {
  const probe = await startAgent({});
  const baseline = [...Deno.readDirSync(`/proc/${probe.process.pid}/fd`)].length;
  await probe.stop();
  await Deno.remove(probe.dir, { recursive: true });
  // Room for about ten connections.
  const limit = baseline + 10;
  const agent = await startAgent({ wrapper: ["prlimit", `--nofile=${limit}:${limit}`, "--"] });
  try {
    const peers = await Promise.all(Array.from({ length: 40 }, () => RawPeer.open(agent.socket)));
    const failure = await agent.logged((l) => l.msg === "accept failed; retrying", "of a failed accept");
    assert.match(String(failure.error), /open files|descriptor/i);
    // Retried meanwhile: a second or more of failures to count.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    for (const peer of peers) peer.close();
    // Served again: a new connection gets an answer.
    const fresh = await RawPeer.open(agent.socket);
    await fresh.write(unaryCall(1));
    await fresh.waitFor(() => fresh.frames.some((f) => f.type === T.HEADERS && f.flags & 0x1), 30_000, "an answer");
    fresh.close();
    await agent.client.listModels();
    assert.equal((await agent.stop()).code, 0, agent.logs());
    // Out of descriptors, Deno itself may print a plain-text warning (e.g. that it could not read
    // NODE_EXTRA_CA_CERTS); the agent's own lines are JSON.
    const ownLines = agent.logs().split("\n").filter((line) => line.startsWith("{")).join("\n");
    const failures = parseLogs(ownLines).filter((l) => l.msg === "accept failed; retrying");
    const firstAt = Date.parse(String(failures[0].time));
    const inFirstWindow = failures.filter((l) => Date.parse(String(l.time)) - firstAt < REPEAT_WINDOW_MS);
    assert.ok(inFirstWindow.length <= REPEATS_PER_WINDOW, `${inFirstWindow.length} lines: rate-limited`);
  } finally {
    const status = await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    assert.equal(status.code, 0, agent.logs());
  }
});

Deno.test("legitimate traffic stays within the bounds: h2load with 100 calls in flight, grpc-js cancelling calls quickly", async () => {
  const agent = await startAgent({});
  try {
    const body = join(agent.dir, "empty.msg");
    await Deno.writeFile(body, new Uint8Array(5));
    const h2load = await new Deno.Command("h2load", {
      args: [
        ...["-n", "20000", "-c", "4", "-m", "100", "--base-uri", `unix:${agent.socket}`, "-d", body],
        ...["-H", "content-type: application/grpc", "-H", "te: trailers", `http://localhost${LIST_MODELS}`],
      ],
    }).output();
    const report = new TextDecoder().decode(h2load.stdout);
    assert.match(report, /20000 succeeded, 0 failed, 0 errored/, report);
    // 2000 health Watch calls, each cancelled once its first status arrived (so every cancel is a
    // RST_STREAM of an open stream), 100 at a time, plus 1000 ListModels cancelled as they are sent.
    const client = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure());
    const codec = [(b: Uint8Array) => Buffer.from(b), (b: Buffer) => b] as const;
    for (let round = 0; round < 20; round++) {
      await Promise.all(Array.from({ length: 100 }, () =>
        new Promise<void>((resolve, reject) => {
          const call = client.makeServerStreamRequest(WATCH, ...codec, new Uint8Array(0));
          call.on("data", () => call.cancel());
          call.on("error", (error: grpc.ServiceError) =>
            error.code === grpc.status.CANCELLED ? resolve() : reject(error));
        })));
    }
    const codes = await Promise.all(Array.from({ length: 1000 }, () =>
      new Promise<number>((resolve) => {
        const call = client.makeUnaryRequest(LIST_MODELS, ...codec, new Uint8Array(0), (error) =>
          resolve(error?.code ?? 0));
        setTimeout(() =>
          call.cancel(), 0);
      })));
    assert.ok(codes.every((c) => c === grpc.status.CANCELLED || c === grpc.status.OK), String(codes));
    client.close();
    // The agent cut no connection off, and answers. (A further call on the same grpc-js channel is not
    // asked for: grpc-js on Deno's node:http2 now and then reports its first call after such bursts
    // as CANCELLED without any frame from the server, with the agent before these bounds as well.)
    await agent.client.listModels();
    // Read once the agent has stopped: every line it wrote is in.
    assert.equal((await agent.stop()).code, 0, agent.logs());
    assert.ok(!parseLogs(agent.logs()).some((l) => l.msg === "client connection error"), agent.logs());
  } finally {
    const status = await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    assert.equal(status.code, 0, agent.logs());
  }
});

Deno.test("a raised initial window pops exactly the parked streams it unblocks", () => {
  const heap = new SendHeap<{ id: number; sendCredit: number; parked: boolean }>();
  const items = Array.from({ length: 1000 }, (_, id) => ({ id, sendCredit: -100 - (id % 10), parked: false }));
  for (const item of items) heap.park(item);
  assert.deepEqual(heap.popAbove(-100), []);
  const popped = heap.popAbove(-105);
  assert.equal(popped.length, 500);
  assert.ok(popped.every((item) => item.sendCredit > -105 && !item.parked));
  // A stream's own WINDOW_UPDATE re-keys it; its old entry is skipped.
  const item = items[9];
  heap.unpark(item);
  item.sendCredit = -50;
  heap.park(item);
  assert.deepEqual(heap.popAbove(-60).map((i) => i.id), [9]);
  assert.equal(heap.size, 499);
});
