// A stop that always stops: SIGTERM, SIGINT and SIGHUP end the real agent within the grace period
// plus a second whatever its clients do (not reading, half-sent frames, open Watch streams, zero
// windows); it exits 0, removes its socket, and names the calls it cut off.

import assert from "node:assert/strict";
import { parseLogs, startAgent } from "./helpers/agent.ts";
import {
  concat,
  frameOf,
  grpcMessage,
  PREFACE,
  RawPeer,
  requestHeaders,
  settingsOf,
  T,
  unaryCall,
} from "./helpers/raw_h2.ts";
import { HEALTH_SERVICE_NAME, SERVICE_NAME } from "../src/service/wire.ts";
import { Status } from "../src/errors.ts";
import { HpackDecoder } from "../src/transport/hpack.ts";

const GRACE_SECONDS = 1;
/** The stop's bound: the grace period plus one second (process start-up of the test is not in it). */
const STOP_BOUND_MS = GRACE_SECONDS * 1000 + 1000;
const LIST_MODELS = `/${SERVICE_NAME}/ListModels`;

for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
  Deno.test(`${signal} ends the agent within the grace period + 1 s whatever its clients do`, async () => {
    const agent = await startAgent({ config: { edge_agent_shutdown_grace_seconds: GRACE_SECONDS } });
    const peers: RawPeer[] = [];
    try {
      // A client that sends calls and never reads their answers: the agent's writes to it stall.
      const deaf = await RawPeer.open(agent.socket, { read: false });
      peers.push(deaf);
      let stream = 1;
      const end = performance.now() + 500;
      while (performance.now() < end) {
        const batch = concat(Array.from({ length: 50 }, () => unaryCall((stream += 2) - 2)));
        const written = await Promise.race([
          deaf.write(batch),
          new Promise<false>((resolve) => setTimeout(() => resolve(false), 100)),
        ]);
        if (!written) break;
      }
      // A client that stops in the middle of a frame.
      const half = await RawPeer.open(agent.socket);
      peers.push(half);
      await half.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(LIST_MODELS)));
      await half.write(frameOf(T.DATA, 0, 1, new Uint8Array(16000)).subarray(0, 100));
      // An open Watch.
      const watcher = await RawPeer.open(agent.socket);
      peers.push(watcher);
      await watcher.write(frameOf(T.HEADERS, 0x4, 1, requestHeaders(`/${HEALTH_SERVICE_NAME}/Watch`)));
      await watcher.write(frameOf(T.DATA, 0, 1, grpcMessage(new Uint8Array(0))));
      await watcher.waitFor(() => watcher.frames.some((f) => f.type === T.DATA), 3000, "Watch status");
      // A client that gives no window: its ListModels answer cannot leave.
      const closedWindow = await RawPeer.open(agent.socket, { preface: false });
      peers.push(closedWindow);
      await closedWindow.write(concat([PREFACE, settingsOf([[4, 0]]), unaryCall(1)]));
      await closedWindow.waitFor(() => closedWindow.frames.some((f) => f.type === T.HEADERS), 3000, "answer headers");

      const started = performance.now();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const status = await Promise.race([
        agent.stop(signal),
        new Promise<never>((_, reject) =>
          timer = setTimeout(() => {
            agent.process.kill("SIGKILL");
            reject(new Error(`the agent was still running ${STOP_BOUND_MS * 5} ms after ${signal}:\n${agent.logs()}`));
          }, STOP_BOUND_MS * 5)
        ),
      ]);
      clearTimeout(timer);
      const elapsed = performance.now() - started;
      assert.equal(status.code, 0, agent.logs());
      assert.ok(elapsed < STOP_BOUND_MS, `the stop took ${elapsed.toFixed(0)} ms`);
      await assert.rejects(Deno.lstat(agent.socket), Deno.errors.NotFound);
      const logs = parseLogs(agent.logs());
      const cut = logs.find((l) => l.msg === "in-flight calls did not finish in time");
      assert.ok(cut, "the calls cut off are logged");
      assert.ok((cut.calls as string[]).includes(LIST_MODELS), JSON.stringify(cut));
      assert.ok(logs.some((l) => l.msg === "stopped"));
      // The call cut off mid-request is told so, with a status clients retry on, before the connection ends.
      const decoder = new HpackDecoder();
      const answer = half.frames.filter((f) => f.type === T.HEADERS && f.stream === 1)
        .flatMap((f) => decoder.decode(f.payload));
      assert.ok(
        answer.some(([name, value]) => name === "grpc-status" && value === String(Status.UNAVAILABLE)),
        JSON.stringify(answer),
      );
    } finally {
      for (const peer of peers) peer.close();
      await agent.stop();
      await Deno.remove(agent.dir, { recursive: true });
    }
  });
}
