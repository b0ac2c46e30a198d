// Run by tests/capture_crash_test.ts and killed with SIGKILL at a random moment: opens the capture
// service on the given state folder (recovering what earlier rounds left), then four writers capture in
// a loop and print each capture id once it is acknowledged.
// Usage: capture_crash_writer.ts <stateDir> <s3 port> <round>

import { CaptureService } from "../../src/capture/mod.ts";
import { crashRecord, crashServiceOptions } from "./capture_crash_shared.ts";

const [stateDir, port, round] = Deno.args;
const service = await CaptureService.open(crashServiceOptions(stateDir, Number(port), {
  bufferSize: 10_000,
  batchSize: 4,
  pushPeriodSeconds: 0.05,
  retryBaseMs: 20,
  retryMaxMs: 100,
}));
const encoder = new TextEncoder();
await Deno.stdout.write(encoder.encode("ready\n"));
const stop = Date.now() + 60_000; // a safety net: the test kills it long before
await Promise.all([0, 1, 2, 3].map(async (w) => {
  for (let n = 0; Date.now() < stop; n++) {
    const id = `r${round}-w${w}-${n}`;
    await service.capture(crashRecord(id));
    await Deno.stdout.write(encoder.encode(`${id}\n`));
    // Paced so that uploads keep up and kills also land between an upload and its bookkeeping.
    await new Promise((r) => setTimeout(r, 2));
  }
}));
await service.close();
