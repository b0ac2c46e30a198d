// Waiting on conditions rather than on time: the bounds are generous, for a slow, loaded CI machine
// (a condition that holds returns at once; only a failure waits the whole bound).

import { scrapeMetrics } from "../../src/client/client_cli.ts";

/** Polls `check` every `everyMs` until it holds; throws naming `what` once `ms` have passed. */
export async function until(
  check: () => boolean | Promise<boolean>,
  what: string,
  ms = 30_000,
  everyMs = 20,
): Promise<void> {
  const deadline = performance.now() + ms;
  while (!await check()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${ms} ms waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}

/** The agent's count of calls being handled (a handler started), from its metrics socket. */
export async function inFlight(metricsSocket: string): Promise<number> {
  return (await scrapeMetrics(`unix:${metricsSocket}`)).get("edge_agent_requests_in_flight") ?? 0;
}

/** Polls until exactly `count` calls are being handled (at least `count` with `atLeast`). */
export function untilInFlight(metricsSocket: string, count: number, { atLeast = false } = {}): Promise<void> {
  return until(
    async () => {
      const n = await inFlight(metricsSocket);
      return atLeast ? n >= count : n === count;
    },
    `${count} calls are in flight`,
    60_000,
    1,
  );
}
