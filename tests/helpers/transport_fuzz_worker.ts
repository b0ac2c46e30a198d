// Runs one fuzz target of transport_fuzz.ts in a worker: the test can end it when an input never
// finishes, even in an endless synchronous loop. In: {target, seed, count, at}; out: {summary} or {error}.

import * as targets from "./transport_fuzz.ts";

type Target = (count: number, at: Int32Array) => string | Promise<string>;

// The worker's global scope, typed for what it uses here (the file is checked with the window lib).
const scope = self as unknown as {
  onmessage: (event: MessageEvent) => void;
  postMessage: (message: unknown) => void;
};

scope.onmessage = async (event: MessageEvent) => {
  const { target, seed, count, at } = event.data as { target: string; seed: number; count: number; at: Int32Array };
  try {
    targets.setSeed(seed);
    const run = (targets as unknown as Record<string, Target>)[target];
    scope.postMessage({ summary: await run(count, at) });
  } catch (error) {
    scope.postMessage({ error: (error as Error)?.stack ?? String(error) });
  }
};
