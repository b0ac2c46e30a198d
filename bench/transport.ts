// The agent's transport against its floor: the part of a det Predict from grpcio outside the agent's handler, next
// to a raw exchange of the same bytes over a plain Unix socket between two processes (bench/raw_exchange.py) and to
// the same grpcio client calling a minimal gRPC peer that does no work (bench/minimal_peer.py: what grpcio costs by
// itself), measured in alternating blocks of the same run; and a ListModels round trip from grpcio.
//
// Run alone for a quick look (about 30 s): deno task bench:transport [--rounds=N]
// predict_bench.ts runs the same comparison in its default mode.

import { join } from "node:path";
import { parseArgs } from "node:util";
import { PYTHON } from "../tests/helpers/python.ts";
import { PADDLE_DET, writeModelFolder } from "../tests/helpers/onnx_models.ts";
import { AgentProcess } from "./agent_process.ts";
import { connectWhenListening, generateStubs, GrpcioClient, grpcioMissing, lines } from "./grpcio.ts";
import { AgentRunner, GrpcioRunner, type ModelCase, pseudoRandomInput } from "./runners.ts";
import { median, ms, ratio } from "./stats.ts";

const RAW_EXCHANGE = new URL("./raw_exchange.py", import.meta.url).pathname;
const MINIMAL_PEER = new URL("./minimal_peer.py", import.meta.url).pathname;

/** Targets: the transport's share of a det Predict, in multiples of the raw exchange; a ListModels round trip. */
export const TRANSPORT_TARGET_RATIO = 2;
export const LIST_MODELS_TARGET_MS = 0.15;

/** Two Python processes exchanging `send` then `reply` bytes over a Unix socket, driven one JSON line per block. */
export class RawExchange {
  readonly #process: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #lines: AsyncIterator<string>;
  readonly #stderr: Promise<string>;

  private constructor(process: Deno.ChildProcess) {
    this.#process = process;
    this.#writer = process.stdin.getWriter();
    this.#lines = lines(process.stdout)[Symbol.asyncIterator]();
    this.#stderr = new Response(process.stderr).text();
  }

  static async start(dir: string, sendBytes: number, replyBytes: number): Promise<RawExchange> {
    const command = new Deno.Command(PYTHON, {
      args: [RAW_EXCHANGE, `--socket=${join(dir, "raw.sock")}`, `--send=${sendBytes}`, `--reply=${replyBytes}`],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    });
    const exchange = new RawExchange(command.spawn());
    try {
      await exchange.#reply();
    } catch (error) {
      await exchange.stop();
      throw error;
    }
    return exchange;
  }

  /** `count` exchanges back to back; ms each, as the client process timed them. */
  async time(count: number): Promise<number[]> {
    await this.#writer.write(new TextEncoder().encode(JSON.stringify({ count }) + "\n")).catch(() => {});
    return (await this.#reply()).ms as number[];
  }

  async stop(): Promise<void> {
    await this.#writer.close().catch(() => {});
    await this.#process.status;
    await this.#stderr;
  }

  async #reply(): Promise<Record<string, unknown>> {
    const { done, value } = await this.#lines.next();
    if (done) throw new Error(`${RAW_EXCHANGE} exited:\n${await this.#stderr}`);
    return JSON.parse(value);
  }
}

/** bench/minimal_peer.py on its own socket, with a grpcio client connected to it. */
export class MinimalPeer {
  private constructor(readonly client: GrpcioClient, readonly process: Deno.ChildProcess) {}

  static async start(dir: string, stubs: string, replyFloats: number): Promise<MinimalPeer> {
    const socket = join(dir, "minimal-peer.sock");
    const process = new Deno.Command(PYTHON, {
      args: [MINIMAL_PEER, `--stubs=${stubs}`, `--socket=${socket}`, `--reply-floats=${replyFloats}`],
      stdin: "null",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    return new MinimalPeer(
      await connectWhenListening(process, MINIMAL_PEER, () => GrpcioClient.start(stubs, socket)),
      process,
    );
  }

  async stop(): Promise<void> {
    await this.client.stop();
    this.process.kill();
    await this.process.status;
  }
}

export interface TransportFigures {
  /** Medians over the measured calls, ms. */
  predictTotalMs: number;
  handlerMs: number;
  /** Client total minus the agent's handler: grpcio, HTTP/2 both ways, the socket. */
  transportMs: number;
  rawMs: number;
  /** The same grpcio call against the minimal peer (null when not measured). */
  minimalPeerMs: number | null;
  calls: number;
  requestBytes: number;
  responseBytes: number;
}

/**
 * det Predicts from grpcio and raw exchanges of the same byte counts, in alternating blocks of `blockSize`
 * (one unmeasured call each) so both see the same load from the rest of the machine.
 */
export async function compareTransport(
  agent: AgentProcess,
  grpcio: GrpcioRunner,
  raw: RawExchange,
  peer: MinimalPeer | null,
  rounds: number,
  blockSize: number,
): Promise<Omit<TransportFigures, "requestBytes" | "responseBytes">> {
  const outside: number[] = [];
  const totals: number[] = [];
  const handlers: number[] = [];
  const rawMs: number[] = [];
  const peerMs: number[] = [];
  for (let round = 0; round < rounds; round++) {
    if (peer) peerMs.push(...(await grpcio.timeCallsOn(peer.client, blockSize + 1)).slice(1));
    const block = await grpcio.timeCalls(blockSize + 1);
    const logs = await agent.takePredicts(block.length);
    for (let i = 1; i < block.length; i++) {
      totals.push(block[i]);
      handlers.push(logs[i].ms);
      outside.push(block[i] - logs[i].ms);
    }
    rawMs.push(...(await raw.time(blockSize + 1)).slice(1));
  }
  return {
    predictTotalMs: median(totals),
    handlerMs: median(handlers),
    transportMs: median(outside),
    rawMs: median(rawMs),
    minimalPeerMs: peer ? median(peerMs) : null,
    calls: outside.length,
  };
}

/**
 * Median ListModels round trips from grpcio: to an agent at its default log level (what the target is
 * about), to the benchmark's agent (which logs a debug line per call for the Predict timings), and to
 * the minimal peer.
 */
export interface ListModelsFigures {
  agentMs: number;
  verboseAgentMs: number;
  minimalPeerMs: number | null;
}

/** A second agent at the default log level, with the same models loaded, and a grpcio client on it. */
export class QuietAgent {
  private constructor(readonly agent: AgentProcess, readonly client: GrpcioClient) {}

  static async start(
    dir: string,
    modelsDir: string,
    stubs: string,
    urls: Record<string, string>,
    keys: Record<string, unknown> = {},
  ): Promise<QuietAgent> {
    const own = join(dir, "quiet-agent");
    await Deno.mkdir(own, { recursive: true });
    // Its own state folder: two agents may not share one.
    const agent = await AgentProcess.start(own, modelsDir, {
      ...keys,
      sagemaker_edge_log_verbose: false,
      edge_agent_state_dir: join(own, "state"),
    });
    try {
      for (const [name, url] of Object.entries(urls)) await agent.client.loadModel(url, name);
      return new QuietAgent(agent, await GrpcioClient.start(stubs, agent.socket));
    } catch (error) {
      await agent.stop();
      throw error;
    }
  }

  async stop(): Promise<void> {
    await this.client.stop();
    await this.agent.stop();
  }
}

export async function listModelsRoundTrips(
  quiet: GrpcioClient,
  verbose: GrpcioClient,
  peer: MinimalPeer | null,
  count: number,
): Promise<ListModelsFigures> {
  const clients = [quiet, verbose, ...(peer ? [peer.client] : [])];
  for (const client of clients) await client.listModels(200);
  const times: number[][] = clients.map(() => []);
  // Alternating blocks, as for Predict.
  for (let block = 0; block < 5; block++) {
    for (const [i, client] of clients.entries()) times[i].push(...await client.listModels(count / 5));
  }
  return {
    agentMs: median(times[0]),
    verboseAgentMs: median(times[1]),
    minimalPeerMs: peer ? median(times[2]) : null,
  };
}

export function printTransport(figures: TransportFigures, listModels: ListModelsFigures | undefined): void {
  const r = figures.transportMs / figures.rawMs;
  console.log(
    `\nTransport, det from grpcio (${figures.requestBytes} bytes in, ${figures.responseBytes} out; medians of ` +
      `${figures.calls} calls each, alternating blocks)`,
  );
  console.log(
    `  Predict: client total ${ms(figures.predictTotalMs)} ms - agent handler ${ms(figures.handlerMs)} ms = ` +
      `transport ${ms(figures.transportMs)} ms`,
  );
  console.log(`  raw Unix-socket exchange of the same bytes between two Python processes: ${ms(figures.rawMs)} ms`);
  if (figures.minimalPeerMs !== null) {
    console.log(
      `  the same grpcio call to a minimal gRPC peer that does no work (bench/minimal_peer.py): ` +
        `${ms(figures.minimalPeerMs)} ms (what grpcio and HTTP/2 cost by themselves; agent transport / this: ${
          ratio(figures.transportMs / figures.minimalPeerMs)
        })`,
    );
  }
  console.log(
    `  transport / raw: ${ratio(r)} (target <= ${TRANSPORT_TARGET_RATIO}x: ${
      r <= TRANSPORT_TARGET_RATIO ? "met" : "MISSED"
    })`,
  );
  if (listModels !== undefined) {
    const { agentMs, verboseAgentMs, minimalPeerMs } = listModels;
    console.log(
      `  ListModels round trip from grpcio: ${
        ms(agentMs)
      } ms at the agent's default log level (target <= ${LIST_MODELS_TARGET_MS} ms: ${
        agentMs <= LIST_MODELS_TARGET_MS ? "met" : "MISSED"
      }); ${ms(verboseAgentMs)} ms with the debug line per call this benchmark's agent logs` +
        (minimalPeerMs === null ? "" : `; ${ms(minimalPeerMs)} ms to the minimal peer`),
    );
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ args: Deno.args, options: { rounds: { type: "string", default: "6" } } });
  const missing = await grpcioMissing();
  if (missing) throw new Error(`grpcio is needed: ${missing}`);
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-transport-" });
  const modelsDir = join(dir, "models");
  const url = await writeModelFolder(modelsDir, "det", await Deno.readFile(PADDLE_DET));
  const model: ModelCase = {
    key: "det",
    file: PADDLE_DET,
    shape: [1, 3, 640, 640],
    input: pseudoRandomInput([1, 3, 640, 640], 2),
  };
  const agent = await AgentProcess.start(dir, modelsDir);
  let grpcio: GrpcioClient | null = null;
  let raw: RawExchange | null = null;
  let peer: MinimalPeer | null = null;
  let quiet: QuietAgent | null = null;
  try {
    const runner = await AgentRunner.create(model, agent, url);
    const stubs = await generateStubs(dir);
    grpcio = await GrpcioClient.start(stubs, agent.socket);
    const viaGrpcio = await GrpcioRunner.create(grpcio, runner, dir);
    const output = await viaGrpcio.output();
    const requestBytes = model.input.byteLength;
    const responseBytes = output.byteLength;
    raw = await RawExchange.start(dir, requestBytes, responseBytes);
    peer = await MinimalPeer.start(dir, stubs, output.length);
    await viaGrpcio.timeCalls(2);
    await agent.takePredicts(2);
    const figures = await compareTransport(agent, viaGrpcio, raw, peer, Number(values.rounds), 5);
    quiet = await QuietAgent.start(dir, modelsDir, stubs, { det: url });
    const listModels = await listModelsRoundTrips(quiet.client, grpcio, peer, 1000);
    printTransport({ ...figures, requestBytes, responseBytes }, listModels);
  } finally {
    await quiet?.stop();
    await peer?.stop();
    await raw?.stop();
    await grpcio?.stop();
    await agent.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
