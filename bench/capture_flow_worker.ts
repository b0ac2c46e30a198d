// Sends CaptureData at a steady rate from its own thread (a camera pipeline beside the application's
// Predict calls), so the benchmark's Predict timing does not wait behind the capture client's work.
// Message in: { socket, senders, rate (captures/s in all), ms, prefix }; answers { sent } when done;
// { close: true } closes the connections.

import { AgentClient } from "../src/client/client.ts";
import { enumValues } from "../src/service/wire.ts";
import { tensor } from "../tests/helpers/assertions.ts";

const float32 = enumValues("DataType").FLOAT32;
const OUTPUT = Float32Array.of(0.25, 0.75);
let clients: AgentClient[] = [];
let next = 0;

interface Flow {
  socket: string;
  senders: number;
  rate: number;
  ms: number;
  prefix: string;
  close?: boolean;
}

const scope = self as unknown as {
  onmessage: (event: MessageEvent<Flow>) => void;
  postMessage: (message: unknown) => void;
};

scope.onmessage = async (event: MessageEvent<Flow>) => {
  const { socket, senders, rate, ms, prefix, close } = event.data;
  if (close) {
    for (const client of clients) client.close();
    scope.postMessage({ sent: 0 });
    return;
  }
  if (clients.length === 0) clients = Array.from({ length: senders }, () => new AgentClient(socket));
  const deadline = performance.now() + ms;
  const interval = (1000 * clients.length) / rate;
  let sent = 0;
  await Promise.all(clients.map(async (client, i) => {
    let due = performance.now() + (interval * i) / clients.length;
    while (performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, Math.max(0, due - performance.now())));
      due += interval;
      await client.call("CaptureData", {
        model_name: "cls",
        capture_id: `${prefix}-${next++}`,
        input_tensors: [],
        output_tensors: [tensor("softmax_0.tmp_0", float32, [1, 2], OUTPUT)],
      });
      sent++;
    }
  }));
  scope.postMessage({ sent });
};
