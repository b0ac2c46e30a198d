// Metrics in Prometheus' text format, served on a Unix socket or a loopback TCP port when
// `edge_agent_metrics` names one: request counts by rpc, model and status, Predict latency
// histograms split into bind (decode checks, shared memory), run and encode, in-flight calls,
// model load times, capture queue and uploads, and the process's memory and CPU.

import process from "node:process";
import type { CaptureStats } from "../capture/service.ts";
import type { DeploymentStats } from "../deployments/deployer.ts";
import type { ModelInfo } from "../inference/models.ts";
import type { CancelReason } from "../errors.ts";
import type { ThreadPolicy } from "../inference/runtime.ts";
import type { AloneReason, BatchObserver } from "../inference/batching.ts";

/** Seconds; Prometheus' default buckets extended down to 100 µs for small models. */
const BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

class Histogram {
  readonly counts: number[];
  sum = 0;
  count = 0;
  constructor(readonly buckets: number[] = BUCKETS) {
    this.counts = new Array<number>(buckets.length).fill(0);
  }
  observe(seconds: number): void {
    for (let i = 0; i < this.buckets.length; i++) if (seconds <= this.buckets[i]) this.counts[i]++;
    this.sum += seconds;
    this.count++;
  }
}

/** Requests per Run of a batching model. */
const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

export type PredictPhase = "total" | "bind" | "run" | "encode";

const NEEDS_ESCAPE = /[\\"\n]/;

/** Label values are escaped as the text format asks (every call labels a few, which rarely need it). */
function label(value: string): string {
  if (!NEEDS_ESCAPE.test(value)) return value;
  return value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/**
 * Series are kept per model, so a model's go when it is unloaded: model names come from clients, and
 * series for every name ever seen would grow without bound (callers label calls about models that
 * are not loaded with "").
 */
export class Metrics implements BatchObserver {
  readonly #requests = new Map<string, Map<string, number>>();
  /** Dynamic batching, per model: requests per Run, and requests that went around the queue by reason. */
  readonly #batches = new Map<string, { sizes: Histogram; unbatched: Map<AloneReason, number> }>();
  readonly #predict = new Map<string, Map<string, Histogram>>();
  #inFlight = 0;
  readonly #predictCancelled: Record<CancelReason, number> = { deadline: 0, reset: 0, disconnect: 0 };

  /** Counts a finished call; `model` is "" for calls about no loaded model. */
  request(rpc: string, model: string, code: string): void {
    const key = `rpc="${label(rpc)}",model="${label(model)}",code="${label(code)}"`;
    const series = this.#requests.get(model) ?? new Map<string, number>();
    this.#requests.set(model, series);
    series.set(key, (series.get(key) ?? 0) + 1);
  }

  predict(model: string, phase: PredictPhase, seconds: number): void {
    const key = `model="${label(model)}",phase="${phase}"`;
    const series = this.#predict.get(model) ?? new Map<string, Histogram>();
    this.#predict.set(model, series);
    let histogram = series.get(key);
    if (!histogram) series.set(key, histogram = new Histogram());
    histogram.observe(seconds);
  }

  /** Drops an unloaded model's series. */
  forget(model: string): void {
    if (model === "") return;
    this.#requests.delete(model);
    this.#predict.delete(model);
    this.#batches.delete(model);
  }

  #batching(model: string) {
    let series = this.#batches.get(model);
    if (!series) this.#batches.set(model, series = { sizes: new Histogram(BATCH_BUCKETS), unbatched: new Map() });
    return series;
  }

  batch(model: string, requests: number): void {
    this.#batching(model).sizes.observe(requests);
  }

  unbatched(model: string, reason: AloneReason): void {
    const { unbatched } = this.#batching(model);
    unbatched.set(reason, (unbatched.get(reason) ?? 0) + 1);
  }

  /** A Predict given up before its answer: not started, or its Run terminated. */
  predictCancelled(reason: CancelReason): void {
    this.#predictCancelled[reason]++;
  }

  started(): void {
    this.#inFlight++;
  }

  finished(): void {
    this.#inFlight--;
  }

  /** Calls being handled now. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The text exposition of everything, with the registry's and the capture service's state now. */
  render(
    models: ModelInfo[],
    capture: CaptureStats | null,
    sysvSegmentsAttached: number,
    deployment: DeploymentStats | null = null,
    threads?: ThreadPolicy,
  ): string {
    const out: string[] = [];
    const metric = (name: string, type: string, help: string, samples: [string, number][]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, value] of samples) out.push(`${name}${labels ? `{${labels}}` : ""} ${value}`);
    };
    metric(
      "edge_agent_requests_total",
      "counter",
      "Calls answered, by rpc, model and gRPC status code.",
      [...this.#requests.values()].flatMap((series) => [...series]),
    );
    out.push(
      "# HELP edge_agent_predict_duration_seconds Predict time in the agent: total, and its bind, run and encode phases.",
      "# TYPE edge_agent_predict_duration_seconds histogram",
    );
    const histogram = (name: string, labels: string, h: Histogram) => {
      h.buckets.forEach((bound, i) => out.push(`${name}_bucket{${labels},le="${bound}"} ${h.counts[i]}`));
      out.push(
        `${name}_bucket{${labels},le="+Inf"} ${h.count}`,
        `${name}_sum{${labels}} ${h.sum}`,
        `${name}_count{${labels}} ${h.count}`,
      );
    };
    for (const [labels, h] of [...this.#predict.values()].flatMap((series) => [...series])) {
      histogram("edge_agent_predict_duration_seconds", labels, h);
    }
    if (this.#batches.size > 0) {
      out.push(
        "# HELP edge_agent_predict_batch_size Requests per Run of a model with dynamic batching (1: it ran alone).",
        "# TYPE edge_agent_predict_batch_size histogram",
      );
      for (const [model, { sizes }] of this.#batches) {
        histogram("edge_agent_predict_batch_size", `model="${label(model)}"`, sizes);
      }
      metric(
        "edge_agent_predict_unbatched_total",
        "counter",
        "Predicts on a model with dynamic batching that ran alone without queueing, by reason: shared_memory, shape, too_large, queue_full, fallback.",
        [...this.#batches].flatMap(([model, { unbatched }]) =>
          [...unbatched].map(([reason, n]): [string, number] => [`model="${label(model)}",reason="${reason}"`, n])
        ),
      );
    }
    metric(
      "edge_agent_predict_cancelled_total",
      "counter",
      "Predicts stopped before their answer (Run not started or terminated), by reason: deadline, reset, disconnect.",
      Object.entries(this.#predictCancelled).map(([reason, n]) => [`reason="${reason}"`, n]),
    );
    metric("edge_agent_requests_in_flight", "gauge", "Calls being handled now.", [["", this.#inFlight]]);
    metric("edge_agent_models_loaded", "gauge", "Models loaded.", [["", models.length]]);
    metric(
      "edge_agent_runs_in_flight",
      "gauge",
      "ONNX Runtime Runs going now, by model.",
      models.map((m) => [`model="${label(m.name)}"`, m.runs.running]),
    );
    metric(
      "edge_agent_runs_in_flight_peak",
      "gauge",
      "The most Runs of the model going at once since it was loaded.",
      models.map((m) => [`model="${label(m.name)}"`, m.runs.peak]),
    );
    metric(
      "edge_agent_runs_waiting",
      "gauge",
      "Predicts waiting for one of the model's run slots (edge_agent_max_concurrent_runs).",
      models.map((m) => [`model="${label(m.name)}"`, m.runs.waiting]),
    );
    if (threads) {
      const { cores, intraOpThreads, interOpThreads, concurrentRuns, sharedThreadPools } = threads;
      const settings = {
        cores,
        intra_op_threads: intraOpThreads,
        inter_op_threads: interOpThreads,
        concurrent_runs: concurrentRuns,
        shared_thread_pools: sharedThreadPools ? 1 : 0,
      };
      metric(
        "edge_agent_thread_policy",
        "gauge",
        "How Runs use the cores: cores, threads per Run, Runs at once per model, pools shared by all models (1) or not (0).",
        Object.entries(settings).map(([setting, n]) => [`setting="${setting}"`, n]),
      );
    }
    metric(
      "edge_agent_model_load_seconds",
      "gauge",
      "How long each loaded model took to load (verification and session creation).",
      models.map((m) => [`model="${label(m.name)}"`, m.loadSeconds]),
    );
    metric(
      "edge_agent_model_size_bytes",
      "gauge",
      "Size of each loaded model file.",
      models.map((m) => [
        `model="${label(m.name)}"`,
        m.sizeBytes,
      ]),
    );
    metric(
      "edge_agent_model_version_info",
      "gauge",
      "1 for each loaded model that has a version (its package's, or its deployment's).",
      models.flatMap((m) =>
        m.version === undefined ? [] : [[`model="${label(m.name)}",version="${label(m.version)}"`, 1]]
      ),
    );
    if (deployment) renderDeployment(metric, deployment);
    if (capture) {
      metric("edge_agent_capture_pending", "gauge", "Captures acknowledged and not yet stored at the destination.", [[
        "",
        capture.pending,
      ]]);
      metric("edge_agent_capture_spool_bytes", "gauge", "Bytes of the capture spool.", [["", capture.spoolBytes]]);
      metric(
        "edge_agent_capture_spool_syncs_total",
        "counter",
        "Disk flushes (write + fdatasync rounds) of the capture spool; captures acknowledged per flush show group commit.",
        [["", capture.spoolRounds]],
      );
      metric("edge_agent_capture_acknowledged_total", "counter", "Captures acknowledged (durable in the spool).", [[
        "",
        capture.acknowledged,
      ]]);
      metric("edge_agent_capture_uploaded_total", "counter", "Captures stored at the destination.", [[
        "",
        capture.uploaded,
      ]]);
      metric("edge_agent_capture_failed_total", "counter", "Captures given up (dead letter).", [["", capture.failed]]);
      metric("edge_agent_capture_upload_retries_total", "counter", "Failed upload attempts that were retried.", [[
        "",
        capture.retries,
      ]]);
      metric(
        "edge_agent_capture_last_upload_timestamp_seconds",
        "gauge",
        "When the destination last confirmed a batch (0: never).",
        [["", (capture.lastUploadAt ?? 0) / 1000]],
      );
      metric(
        "edge_agent_capture_uploads_blocked",
        "gauge",
        "1 while uploads cannot proceed (destination unreachable, credentials missing or refused; the log says why).",
        [["", capture.blockedReason === null ? 0 : 1]],
      );
      metric(
        "edge_agent_capture_uploads_blocked_since_timestamp_seconds",
        "gauge",
        "Since when uploads cannot proceed (0: they do).",
        [["", (capture.blockedSince ?? 0) / 1000]],
      );
      metric(
        "edge_agent_capture_credentials_expiry_timestamp_seconds",
        "gauge",
        "When the temporary S3 credentials in use expire (0: none, or they do not expire).",
        [["", (capture.credentialsExpireAt ?? 0) / 1000]],
      );
      metric(
        "edge_agent_capture_credentials_fetches_total",
        "counter",
        "Fetches from the AWS IoT credentials provider, by result.",
        [['result="ok"', capture.credentialsFetches], ['result="error"', capture.credentialsFetchFailures]],
      );
    }
    metric(
      "edge_agent_shm_sysv_segments_attached",
      "gauge",
      "SysV segments kept attached for clients' next requests (one used for inputs and outputs counts twice).",
      [["", sysvSegmentsAttached]],
    );
    const cpu = process.cpuUsage();
    metric("process_resident_memory_bytes", "gauge", "Resident memory of the agent.", [["", Deno.memoryUsage().rss]]);
    metric("process_cpu_seconds_total", "counter", "User and system CPU time of the agent.", [[
      "",
      (cpu.user + cpu.system) / 1e6,
    ]]);
    return out.join("\n") + "\n";
  }
}

type Emit = (name: string, type: string, help: string, samples: [string, number][]) => void;

function renderDeployment(metric: Emit, d: DeploymentStats): void {
  metric(
    "edge_agent_deployment_model_result",
    "gauge",
    "1 for each model the deployment manifest names, by the version it asks and the last result: applied, or " +
      "refused (the log says why; the version loaded before keeps serving).",
    d.models.map((m) => [`model="${label(m.name)}",version="${label(m.version)}",result="${m.result}"`, 1]),
  );
  metric(
    "edge_agent_deployment_manifest_serial",
    "gauge",
    "Serial of the last verified deployment manifest (0: none).",
    [
      ["", d.serial],
    ],
  );
  metric(
    "edge_agent_deployment_manifest_refused",
    "gauge",
    "1 while the manifest at the source is refused (signature, content, fleet or serial; the log says why).",
    [["", d.manifestRefused === null ? 0 : 1]],
  );
  metric("edge_agent_deployment_source_unreachable", "gauge", "1 while the deployment source cannot be read.", [
    ["", d.sourceError === null ? 0 : 1],
  ]);
  metric(
    "edge_agent_deployment_last_check_timestamp_seconds",
    "gauge",
    "When the deployment source last answered (0: never since start).",
    [["", (d.lastCheckAt ?? 0) / 1000]],
  );
  metric("edge_agent_deployment_downloaded_bytes_total", "counter", "Package bytes downloaded.", [[
    "",
    d.downloadedBytes,
  ]]);
}

/** Where metrics are served: `unix:<path>` or `<loopback host>:<port>`. */
export type MetricsAddress = { path: string } | { hostname: string; port: number };

export function parseMetricsAddress(value: string): MetricsAddress | null {
  if (value.startsWith("unix:")) {
    const path = value.slice("unix:".length);
    return path.startsWith("/") ? { path } : null;
  }
  const match = /^(127\.0\.0\.1|localhost|\[::1\]):(\d{1,5})$/.exec(value);
  if (!match || Number(match[2]) > 65535) return null;
  return { hostname: match[1].replace(/^\[|\]$/g, ""), port: Number(match[2]) };
}

/** Serves GET /metrics until the returned function is called. */
export function serveMetrics(address: MetricsAddress, render: () => string): () => Promise<void> {
  const handler = (request: Request) =>
    new URL(request.url).pathname === "/metrics"
      ? new Response(render(), { headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" } })
      : new Response("not found: metrics are at /metrics\n", { status: 404 });
  const server = "path" in address
    ? Deno.serve({ transport: "unix", path: address.path, onListen: () => {} }, handler)
    : Deno.serve({ hostname: address.hostname, port: address.port, onListen: () => {} }, handler);
  return () => server.shutdown();
}
