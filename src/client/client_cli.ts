// `edge-agent client ...`: try a device's agent by hand. Each command returns the text to print; a
// failed call becomes a ClientCommandError carrying the gRPC status name and message.

import { isAbsolute, resolve } from "node:path";
import { AgentClient } from "./client.ts";
import { dataTypeName, elementSize } from "../inference/tensors.ts";
import { Status } from "../errors.ts";
import { decodeImage, type ImageOptions, imageTensor, PLAIN_IMAGE } from "./images.ts";
import { NpyError, readNpy, writeNpy } from "./npy.ts";
import { enumValues, health, type Model, type Tensor, type TensorMetadata } from "../service/wire.ts";

export class ClientCommandError extends Error {}

const DataType = enumValues("DataType");
const CaptureStatus = Object.fromEntries(Object.entries(enumValues("CaptureDataStatus")).map(([k, v]) => [v, k]));
/** Runs `fn` with a client of `socket`, turning gRPC failures into "<STATUS>: <message>". */
export async function withClient<T>(socket: string, fn: (client: AgentClient) => Promise<T>): Promise<T> {
  const client = new AgentClient(socket);
  try {
    return await fn(client);
  } catch (error) {
    const e = error as { code?: number; details?: string };
    if (typeof e.code === "number") throw new ClientCommandError(`${Status[e.code] ?? e.code}: ${e.details}`);
    throw error;
  } finally {
    client.close();
  }
}

function describeTensor(m: TensorMetadata): string {
  return `${new TextDecoder().decode(m.name)} ${dataTypeName(m.data_type)} [${m.shape.join(",")}]`;
}

function describeModel(model: Model): string {
  return [
    `${model.name}  ${model.url}`,
    ...model.input_tensor_metadatas.map((m) => `  input  ${describeTensor(m)}`),
    ...model.output_tensor_metadatas.map((m) => `  output ${describeTensor(m)}`),
  ].join("\n");
}

export async function list(client: AgentClient): Promise<string> {
  const { models } = await client.listModels();
  return models.length === 0 ? "no models loaded" : models.map(describeModel).join("\n");
}

export async function describe(client: AgentClient, name: string): Promise<string> {
  return describeModel((await client.describeModel(name)).model);
}

export async function load(client: AgentClient, url: string, name: string): Promise<string> {
  return `loaded\n${describeModel((await client.loadModel(absoluteUrl(url), name)).model)}`;
}

/** The agent takes absolute paths and file:// URLs only; a relative path means the user's working folder. */
function absoluteUrl(url: string): string {
  if (isAbsolute(url) || /^[a-z][a-z0-9+.-]*:/i.test(url)) return url;
  try {
    return resolve(url);
  } catch {
    return url; // the working folder is not readable here: the agent names the problem
  }
}

export async function unload(client: AgentClient, name: string): Promise<string> {
  await client.unloadModel(name);
  return `unloaded ${name}`;
}

export async function captureStatus(client: AgentClient, id: string): Promise<string> {
  const { status } = await client.call<{ status: number }>("GetCaptureDataStatus", { capture_id: id });
  return `${id}: ${CaptureStatus[status] ?? status}`;
}

/** grpc.health.v1 Check of `service` ("" = the agent). */
export async function checkHealth(client: AgentClient, service: string): Promise<string> {
  const status = await client.health(service);
  const name = Object.entries(health.status).find(([, v]) => v === status)?.[0] ?? status;
  return `${service || "agent"}: ${name}`;
}

/**
 * `name=path[:d1,d2,...]`: an .npy file (dtype and shape inside), a PNG or JPEG image (see images.ts),
 * or raw little-endian bytes; a path of "-" is standard input.
 */
export interface InputArgument {
  name: string;
  path: string;
  shape: number[] | null;
  /** How an image input becomes a tensor (--mean, --std, --bgr). */
  image: ImageOptions;
}

/** `--mean`/`--std`: three numbers, one per channel in the model's channel order. */
export function parseImageOptions(mean: string | undefined, std: string | undefined, bgr: boolean): ImageOptions {
  const triple = (flag: string, text: string | undefined, fallback: [number, number, number]) => {
    if (text === undefined) return fallback;
    const values = text.split(",").map(Number);
    if (values.length !== 3 || values.some((v) => !Number.isFinite(v))) {
      throw new ClientCommandError(`${flag} ${text}: give three numbers, one per channel, e.g. ${flag} 0.5,0.5,0.5`);
    }
    return values as [number, number, number];
  };
  const options = {
    mean: triple("--mean", mean, PLAIN_IMAGE.mean),
    std: triple("--std", std, PLAIN_IMAGE.std),
    bgr,
  };
  if (options.std.some((s) => s === 0)) throw new ClientCommandError(`--std ${std}: a channel's std cannot be 0`);
  return options;
}

export function parseInput(text: string, image: ImageOptions = PLAIN_IMAGE): InputArgument {
  const match = /^([^=]+)=([^:]+)(?::(\d+(?:,\d+)*))?$/.exec(text);
  if (!match) {
    throw new ClientCommandError(
      `--input ${text}: use <name>=<file.npy|file.bin|image.png|image.jpg|->[:<d1>,<d2>,...]`,
    );
  }
  return { name: match[1], path: match[2], shape: match[3] ? match[3].split(",").map(Number) : null, image };
}

/** "-" is standard input. */
async function readInput(input: InputArgument): Promise<Uint8Array> {
  if (input.path === "-") return await new Response(Deno.stdin.readable).bytes();
  return await Deno.readFile(input.path).catch((error) => {
    if (error instanceof Deno.errors.NotCapable) {
      // The compiled executable carries its deployment's permissions, client included.
      throw new ClientCommandError(
        `--input ${input.name}: ${input.path}: this executable may read only its deployment's folders; ` +
          `pipe the file in instead: --input ${input.name}=-${input.shape ? `:${input.shape}` : ""} < ${input.path}`,
      );
    }
    throw new ClientCommandError(`--input ${input.name}: ${input.path}: ${error.message}`);
  });
}

const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47];
const JPEG_MAGIC = [0xff, 0xd8, 0xff];

function startsWith(bytes: Uint8Array, magic: number[]): boolean {
  return magic.every((b, i) => bytes[i] === b);
}

/** By contents, so standard input needs no name; the extension decides for files that are damaged. */
function inputFormat(path: string, bytes: Uint8Array): "npy" | "png" | "jpeg" | "raw" {
  if (startsWith(bytes, NPY_MAGIC)) return "npy";
  if (startsWith(bytes, PNG_MAGIC)) return "png";
  if (startsWith(bytes, JPEG_MAGIC)) return "jpeg";
  if (/\.npy$/i.test(path)) return "npy";
  if (/\.png$/i.test(path)) return "png";
  if (/\.jpe?g$/i.test(path)) return "jpeg";
  return "raw";
}

async function inputTensor(model: Model, input: InputArgument): Promise<Tensor> {
  const spec = model.input_tensor_metadatas.find((m) => new TextDecoder().decode(m.name) === input.name);
  if (!spec) {
    const names = model.input_tensor_metadatas.map((m) => new TextDecoder().decode(m.name)).join(", ");
    throw new ClientCommandError(`--input ${input.name}: model ${model.name} has no such input (inputs: ${names})`);
  }
  const bytes = await readInput(input);
  const format = inputFormat(input.path, bytes);
  let dataType = spec.data_type;
  let shape: number[];
  let data: Uint8Array;
  if (format === "npy") {
    let array;
    try {
      array = readNpy(bytes);
    } catch (error) {
      if (error instanceof NpyError) {
        throw new ClientCommandError(`--input ${input.name}: ${input.path}: ${error.message}`);
      }
      throw error;
    }
    dataType = DataType[array.dataType];
    shape = input.shape ?? array.shape;
    data = array.data;
  } else if (format === "png" || format === "jpeg") {
    const type = dataTypeName(spec.data_type);
    if (type !== "FLOAT32" && type !== "UINT8") {
      throw new ClientCommandError(`--input ${input.name}: an image fills FLOAT32 or UINT8 inputs, not ${type}`);
    }
    try {
      const image = imageTensor(await decodeImage(format, bytes), input.shape ?? spec.shape, type, input.image);
      shape = image.shape;
      data = image.data;
    } catch (error) {
      throw new ClientCommandError(`--input ${input.name}: ${input.path}: ${(error as Error).message}`);
    }
  } else {
    shape = input.shape ?? spec.shape;
    if (shape.some((d) => d < 0)) {
      throw new ClientCommandError(
        `--input ${input.name}: the model's shape [${spec.shape}] is dynamic: give the shape, e.g. ${input.name}=${input.path}:1,3,48,192`,
      );
    }
    data = bytes;
  }
  return {
    tensor_metadata: { name: new TextEncoder().encode(input.name), data_type: dataType, shape },
    byte_data: data,
  };
}

function values(tensor: Tensor): number[] | null {
  const bytes = new Uint8Array(tensor.byte_data!);
  const view = new DataView(bytes.buffer);
  const type = dataTypeName(tensor.tensor_metadata!.data_type);
  const size = elementSize(tensor.tensor_metadata!.data_type);
  const read: Record<string, (offset: number) => number> = {
    FLOAT32: (o) => view.getFloat32(o, true),
    FLOAT64: (o) => view.getFloat64(o, true),
    INT32: (o) => view.getInt32(o, true),
    UINT8: (o) => view.getUint8(o),
    INT8: (o) => view.getInt8(o),
    INT64: (o) => Number(view.getBigInt64(o, true)),
  };
  if (!read[type]) return null;
  return Array.from({ length: bytes.length / size }, (_, i) => read[type](i * size));
}

/** Top-5 for a score vector, shape and statistics otherwise. */
function summarize(tensor: Tensor): string {
  const meta = tensor.tensor_metadata!;
  const head = describeTensor(meta);
  const numbers = values(tensor);
  if (!numbers) return `${head}: ${tensor.byte_data!.length} bytes`;
  const vector = meta.shape.filter((d) => d !== 1).length <= 1;
  if (vector && numbers.length > 0) {
    const top = numbers.map((v, i) => [i, v]).sort((a, b) => b[1] - a[1]).slice(0, 5);
    return `${head}\n${top.map(([i, v]) => `  #${i}: ${v.toPrecision(6)}`).join("\n")}`;
  }
  // One pass, no spread: an image-sized output has far more values than call arguments may hold.
  let [min, max, sum] = [Infinity, -Infinity, 0];
  for (const v of numbers) {
    if (v < min) min = v;
    if (v > max) max = v;
    sum += v;
  }
  const mean = sum / numbers.length;
  return `${head}: min ${min.toPrecision(6)}, max ${max.toPrecision(6)}, mean ${mean.toPrecision(6)}`;
}

export async function predict(
  client: AgentClient,
  modelName: string,
  inputs: InputArgument[],
  out: string | null,
): Promise<string> {
  const { model } = await client.describeModel(modelName);
  const tensors = await Promise.all(inputs.map((input) => inputTensor(model, input)));
  const started = performance.now();
  const response = await client.predict(modelName, tensors);
  const ms = performance.now() - started;
  const lines = response.tensors.map(summarize);
  if (out) {
    const first = response.tensors[0];
    const npy = writeNpy({
      dataType: dataTypeName(first.tensor_metadata!.data_type),
      shape: first.tensor_metadata!.shape,
      data: new Uint8Array(first.byte_data!),
    });
    await writeOutput(out, npy);
    lines.push(`saved ${describeTensor(first.tensor_metadata!)} to ${out === "-" ? "standard output" : out}`);
  }
  lines.push(`(${ms.toFixed(1)} ms)`);
  return lines.join("\n");
}

/** "-" is standard output. */
async function writeOutput(out: string, bytes: Uint8Array): Promise<void> {
  if (out === "-") {
    const writer = Deno.stdout.writable.getWriter();
    await writer.write(bytes);
    writer.releaseLock();
    return;
  }
  await Deno.writeFile(out, bytes).catch((error) => {
    if (error instanceof Deno.errors.NotCapable) {
      throw new ClientCommandError(
        `--out ${out}: this executable may write only its state folder; write to standard output instead: --out - > ${out}`,
      );
    }
    throw new ClientCommandError(`--out ${out}: ${error.message}`);
  });
}

/** Predict in a loop from `concurrency` connections for `seconds`: latency percentiles and throughput. */
export async function bench(
  socket: string,
  modelName: string,
  inputs: InputArgument[],
  concurrency: number,
  seconds: number,
): Promise<string> {
  const clients = Array.from({ length: concurrency }, () => new AgentClient(socket));
  try {
    const { model } = await clients[0].describeModel(modelName);
    const tensors = await Promise.all(inputs.map((input) => inputTensor(model, input)));
    for (let i = 0; i < 5; i++) await clients[0].predict(modelName, tensors);
    const latencies: number[] = [];
    const started = performance.now();
    const deadline = started + seconds * 1000;
    const progress = Deno.stdout.isTerminal()
      ? setInterval(() => {
        const done = Math.min(1, (performance.now() - started) / (seconds * 1000));
        const bar = "#".repeat(Math.round(done * 30)).padEnd(30, ".");
        Deno.stdout.writeSync(new TextEncoder().encode(`\r[${bar}] ${latencies.length} calls`));
      }, 200)
      : undefined;
    try {
      await Promise.all(clients.map(async (client) => {
        while (performance.now() < deadline) {
          const sent = performance.now();
          await client.predict(modelName, tensors);
          latencies.push(performance.now() - sent);
        }
      }));
    } finally {
      clearInterval(progress);
      if (progress !== undefined) Deno.stdout.writeSync(new TextEncoder().encode("\n"));
    }
    const elapsed = (performance.now() - started) / 1000;
    latencies.sort((a, b) => a - b);
    const at = (p: number) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))];
    return [
      `${modelName}: ${latencies.length} calls in ${elapsed.toFixed(1)} s from ${concurrency} connection(s)`,
      `  throughput ${(latencies.length / elapsed).toFixed(1)}/s`,
      `  latency ms: p50 ${at(50).toFixed(2)}  p90 ${at(90).toFixed(2)}  p99 ${at(99).toFixed(2)}  max ${
        latencies[latencies.length - 1].toFixed(2)
      }`,
    ].join("\n");
  } finally {
    for (const client of clients) client.close();
  }
}

/** Samples of a Prometheus text exposition by `name{labels}`. */
function parseExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (match) samples.set(match[1], Number(match[2]));
  }
  return samples;
}

/** The agent's metrics at `metrics` ("unix:<path>" or "host:port"): `name{labels}` -> value. */
export async function scrapeMetrics(metrics: string): Promise<Map<string, number>> {
  let response: Response;
  if (metrics.startsWith("unix:")) {
    const client = Deno.createHttpClient({ proxy: { transport: "unix", path: metrics.slice(5) } });
    try {
      response = await fetch("http://localhost/metrics", { client });
      return parseExposition(await response.text());
    } finally {
      client.close();
    }
  }
  response = await fetch(`http://${metrics}/metrics`);
  return parseExposition(await response.text());
}

/** A quantile of one model's Predict "total" histogram, interpolated inside its bucket (as Prometheus does). */
function quantile(samples: Map<string, number>, model: string, q: number): number | null {
  const prefix = `edge_agent_predict_duration_seconds_bucket{model="${model}",phase="total",le="`;
  const buckets = [...samples].filter(([k]) => k.startsWith(prefix))
    .map(([k, v]) => [k.slice(prefix.length, -2) === "+Inf" ? Infinity : Number(k.slice(prefix.length, -2)), v])
    .sort((a, b) => a[0] - b[0]);
  const total = buckets.at(-1)?.[1] ?? 0;
  if (total === 0) return null;
  const rank = q * total;
  let previousBound = 0;
  let previousCount = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (!Number.isFinite(bound)) return previousBound;
      return previousBound + (bound - previousBound) * ((rank - previousCount) / Math.max(1, count - previousCount));
    }
    previousBound = bound;
    previousCount = count;
  }
  return null;
}

/**
 * One screen for `watch`: models, and with the agent's metrics endpoint, Predict rates over the
 * last second, p50/p99 since start, and the capture backlog.
 */
export async function status(client: AgentClient, metrics: string | null): Promise<string> {
  const { models } = await client.listModels();
  const lines = [`${models.length} model(s) loaded`];
  if (!metrics) {
    lines.push(...models.map((m) => `  ${m.name}  ${m.url}`));
    lines.push("(pass --metrics <unix:path|host:port> of edge_agent_metrics for rates, latencies and captures)");
    return lines.join("\n");
  }
  const before = await scrapeMetrics(metrics);
  await new Promise((r) => setTimeout(r, 1000));
  const after = await scrapeMetrics(metrics);
  const predicts = (samples: Map<string, number>, model: string) =>
    [...samples].filter(([k]) => k.startsWith(`edge_agent_requests_total{rpc="Predict",model="${model}",`))
      .reduce((sum, [, v]) => sum + v, 0);
  const ms = (s: number | null) => (s === null ? "-" : (s * 1000).toFixed(2));
  lines.push("  model                          req/s   p50 ms   p99 ms   total");
  for (const model of models) {
    const rate = predicts(after, model.name) - predicts(before, model.name);
    lines.push(
      `  ${model.name.padEnd(30)} ${String(rate).padStart(5)}  ${ms(quantile(after, model.name, 0.5)).padStart(7)}  ${
        ms(quantile(after, model.name, 0.99)).padStart(7)
      }  ${predicts(after, model.name)}`,
    );
  }
  lines.push(
    `captures: ${after.get("edge_agent_capture_pending") ?? 0} pending, ${
      after.get("edge_agent_capture_uploaded_total") ?? 0
    } uploaded, ${after.get("edge_agent_capture_failed_total") ?? 0} failed, spool ${
      after.get("edge_agent_capture_spool_bytes") ?? 0
    } bytes`,
  );
  lines.push(`agent: ${((after.get("process_resident_memory_bytes") ?? 0) / 2 ** 20).toFixed(0)} MiB resident`);
  return lines.join("\n");
}
