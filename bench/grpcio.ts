// The agent's clients in other processes: Python grpcio (gRPC C core, bench/grpcio_client.py) and grpc-js under
// Node (bench/grpcjs_node_client.mjs), as applications on devices use them, each a long-lived subprocess driven
// by one JSON line per command.

import { PYTHON } from "../tests/helpers/python.ts";

const CLIENT = new URL("./grpcio_client.py", import.meta.url).pathname;
const NODE_CLIENT = new URL("./grpcjs_node_client.mjs", import.meta.url).pathname;
const NAIVE_NODE_PEER = new URL("./naive_node_peer.mjs", import.meta.url).pathname;

/** Why the Node client cannot run here (no `node`), or null. */
export async function nodeMissing(): Promise<string | null> {
  try {
    const { success } = await new Deno.Command("node", { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
    return success ? null : "node --version failed";
  } catch {
    return "node is not installed";
  }
}

export { generateStubs, pythonGrpcMissing as grpcioMissing } from "../tests/helpers/python.ts";

export interface PredictCommand {
  /** Model name in the agent. */
  name: string;
  /** Raw float32 input tensor. */
  input: string;
  /** When set, the request carries a handle to this SysV segment (holding the input at offset 0) instead. */
  segmentId?: number;
  inputName: string;
  shape: number[];
  count: number;
  /** When set, as many calls as fit in this time (at least `count`). */
  seconds?: number;
  /** Where to write the last response's first tensor bytes. */
  output?: string;
}

export class GrpcioClient {
  readonly #process: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #lines: AsyncIterator<string>;
  readonly #stderr: Promise<string>;
  #version = "";

  private constructor(process: Deno.ChildProcess, readonly script: string) {
    this.#process = process;
    this.#writer = process.stdin.getWriter();
    this.#lines = lines(process.stdout)[Symbol.asyncIterator]();
    this.#stderr = new Response(process.stderr).text();
  }

  /** Starts the client on the agent's socket; resolves once it is connected (it gives up after 30 s). */
  static start(stubs: string, socket: string): Promise<GrpcioClient> {
    return GrpcioClient.#launch(PYTHON, [CLIENT, `--stubs=${stubs}`, `--socket=${socket}`]);
  }

  /** The grpc-js client under Node on the agent's socket; the same commands. */
  static startNode(socket: string): Promise<GrpcioClient> {
    return GrpcioClient.#launch("node", [NODE_CLIENT, `--socket=${socket}`]);
  }

  static async #launch(program: string, args: string[]): Promise<GrpcioClient> {
    const command = new Deno.Command(program, { args, stdin: "piped", stdout: "piped", stderr: "piped" });
    const client = new GrpcioClient(command.spawn(), args[0]);
    try {
      client.#version = (await client.#reply()).ready as string;
    } catch (error) {
      await client.stop();
      throw error;
    }
    return client;
  }

  /** The client library's version (grpcio or grpc-js), as the client reported it once connected. */
  get version(): string {
    return this.#version;
  }

  /**
   * The Node client's protobufjs time per call of the last predict(): request encoding and response
   * decoding, ms (null from grpcio, which does not report them).
   */
  lastCodecMs: { encode: number[]; decode: number[] } | null = null;

  /** `count` Predicts with one request message; each call's ms as the client process measured it. */
  async predict(command: PredictCommand): Promise<number[]> {
    const { name, input, segmentId, inputName, shape, count, seconds, output } = command;
    const reply = await this.#send({
      op: "predict",
      name,
      input,
      segment_id: segmentId,
      input_name: inputName,
      shape,
      count,
      seconds,
      output,
    });
    this.lastCodecMs = reply.encode_ms
      ? { encode: reply.encode_ms as number[], decode: reply.decode_ms as number[] }
      : null;
    return reply.ms as number[];
  }

  /** Round trips of the tiniest rpc, ms each. */
  async listModels(count: number): Promise<number[]> {
    return (await this.#send({ op: "list_models", count })).ms as number[];
  }

  async stop(): Promise<void> {
    // Closing stdin ends the command loop, and with it the process.
    await this.#writer.close().catch(() => {});
    await this.#process.status;
    await this.#stderr;
  }

  async #send(command: Record<string, unknown>): Promise<Record<string, unknown>> {
    // A client that has exited fails the write; its exit code and stderr, from #reply, say more.
    await this.#writer.write(new TextEncoder().encode(JSON.stringify(command) + "\n")).catch(() => {});
    return this.#reply();
  }

  async #reply(): Promise<Record<string, unknown>> {
    const { done, value } = await this.#lines.next();
    if (done) {
      const { code } = await this.#process.status;
      throw new Error(`${this.script} exited (${code}):\n${await this.#stderr}`);
    }
    return JSON.parse(value);
  }
}

/**
 * A naive agent under Node (bench/naive_node_peer.mjs: grpc-js server + onnxruntime-node) on its own socket,
 * with the Node grpc-js client connected to it.
 */
export class NaiveNodePeer {
  private constructor(readonly client: GrpcioClient, readonly process: Deno.ChildProcess) {}

  static async start(
    socket: string,
    models: { key: string; file: string }[],
    ort: { intraOpThreads: number; allowSpinning: boolean; graphOptimization: string },
  ): Promise<NaiveNodePeer> {
    const process = new Deno.Command("node", {
      args: [
        NAIVE_NODE_PEER,
        `--socket=${socket}`,
        ...models.map((m) => `--model=${m.key}=${m.file}`),
        `--intra-op-threads=${ort.intraOpThreads}`,
        `--allow-spinning=${ort.allowSpinning ? 1 : 0}`,
        `--graph-optimization=${ort.graphOptimization === "disable" ? "disabled" : ort.graphOptimization}`,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    return new NaiveNodePeer(
      await connectWhenListening(process, NAIVE_NODE_PEER, () => GrpcioClient.startNode(socket)),
      process,
    );
  }

  get pid(): number {
    return this.process.pid;
  }

  async stop(): Promise<void> {
    await this.client.stop();
    this.process.kill();
    await this.process.status;
  }
}

/**
 * Waits for a peer process's "listening" line, then connects `client` to it; the process is killed when
 * either fails.
 */
export async function connectWhenListening(
  process: Deno.ChildProcess,
  name: string,
  client: () => Promise<GrpcioClient>,
): Promise<GrpcioClient> {
  const { value } = await lines(process.stdout)[Symbol.asyncIterator]().next();
  if (value !== "listening") {
    await process.status;
    throw new Error(`${name} did not start`);
  }
  try {
    return await client();
  } catch (error) {
    process.kill();
    await process.status;
    throw error;
  }
}

export async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let partial = "";
  for await (const text of stream.pipeThrough(new TextDecoderStream())) {
    const parts = (partial + text).split("\n");
    partial = parts.pop()!;
    yield* parts;
  }
}
