// The memory reference: onnxruntime-node in a process of its own with the given models loaded, as an
// application would hold them in-process. Runs under Node or Deno; prints "ready" once every session
// is created, then waits until its standard input closes, so its RSS can be read from /proc meanwhile.
//
//   node|deno run -A bench/reference_process.mjs '{"intraOpThreads":0,...}' model.onnx ...

import process from "node:process";
import * as ort from "onnxruntime-node";

const [choiceJson, ...files] = process.argv.slice(2);
const choice = JSON.parse(choiceJson);
const spinning = choice.allowSpinning ? "1" : "0";
const sessions = [];
for (const file of files) {
  // The options of the benchmark's in-process reference (bench/runners.ts ReferenceRunner).
  sessions.push(
    await ort.InferenceSession.create(file, {
      intraOpNumThreads: choice.intraOpThreads,
      interOpNumThreads: 1,
      graphOptimizationLevel: choice.graphOptimization === "disable" ? "disabled" : choice.graphOptimization,
      extra: { session: { intra_op: { allow_spinning: spinning }, inter_op: { allow_spinning: spinning } } },
    }),
  );
}
process.stdout.write("ready\n");
process.stdin.resume();
process.stdin.on("end", async () => {
  for (const session of sessions) await session.release();
  process.exit(0);
});
