// grpc.health.v1 (doc/health-checking.md): "" and the Agent service are SERVING while the agent
// serves and NOT_SERVING once it stops; "model/<name>" is SERVING while that model is loaded; "capture"
// is SERVING while captures reach their destination and NOT_SERVING while uploads cannot proceed
// (destination unreachable, credentials missing or refused: captures are kept meanwhile). Check
// answers NOT_FOUND for any other name; Watch sends SERVICE_UNKNOWN instead, as the protocol asks,
// and keeps the call open, sending each change until the client leaves or the agent stops.

import { invalidArgument, notFound } from "./errors.ts";
import type { ModelRegistry } from "./models.ts";
import type { UploadState } from "./capture/service.ts";
import { health, SERVICE_NAME } from "./wire.ts";

const { SERVING, NOT_SERVING, SERVICE_UNKNOWN } = health.status;

/** The health entry of capture uploads. */
export const CAPTURE_HEALTH_NAME = "capture";

/** What the capture entry reads: the upload state and its changes. */
export interface CaptureHealth {
  uploadState(): UploadState;
  readonly changes: EventTarget;
}

export class HealthService {
  #stopping = false;
  readonly #stopped = new EventTarget();

  constructor(private readonly registry: ModelRegistry, private readonly capture: CaptureHealth | null = null) {}

  status(service: string): number {
    if (service === CAPTURE_HEALTH_NAME && this.capture) {
      return this.#stopping || !this.capture.uploadState().ok ? NOT_SERVING : SERVING;
    }
    const model = service.startsWith("model/") ? service.slice("model/".length) : null;
    const known = service === "" || service === SERVICE_NAME ||
      (model !== null && this.registry.isLoaded(model));
    if (!known) return SERVICE_UNKNOWN;
    return this.#stopping ? NOT_SERVING : SERVING;
  }

  /** The Check handler. */
  check = (request: unknown): { status: number } => {
    const service = (request as { service: string }).service;
    const status = this.status(service);
    if (status === SERVICE_UNKNOWN) {
      throw notFound(
        `unknown service "${service}" (use "", "${SERVICE_NAME}", "${CAPTURE_HEALTH_NAME}" or "model/<name>" of a loaded model)`,
      );
    }
    return { status };
  };

  /** The Watch handler: the status now, then every change. */
  watch = (requests: AsyncIterable<Uint8Array>, cancelled: AbortSignal): AsyncIterable<Uint8Array> =>
    this.#watch(requests, cancelled);

  async *#watch(requests: AsyncIterable<Uint8Array>, cancelled: AbortSignal): AsyncIterable<Uint8Array> {
    let service: string | null = null;
    for await (const bytes of requests) {
      try {
        service = (health.request.decode(bytes) as unknown as { service: string }).service;
      } catch (error) {
        throw invalidArgument(`request is not a valid HealthCheckRequest: ${(error as Error).message}`);
      }
      break;
    }
    if (service === null) throw invalidArgument("Watch takes one HealthCheckRequest");
    let sent: number | null = null;
    while (!cancelled.aborted) {
      const status = this.status(service);
      if (status !== sent) {
        yield health.response.encode({ status }).finish();
        sent = status;
      }
      if (this.#stopping) return;
      await this.#nextChange(cancelled);
    }
  }

  /** Resolves at the next model or capture change, at the stop, or when the call is cancelled. */
  #nextChange(cancelled: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.registry.changes.removeEventListener("change", done);
        this.capture?.changes.removeEventListener("change", done);
        this.#stopped.removeEventListener("stop", done);
        cancelled.removeEventListener("abort", done);
        resolve();
      };
      this.registry.changes.addEventListener("change", done);
      this.capture?.changes.addEventListener("change", done);
      this.#stopped.addEventListener("stop", done);
      cancelled.addEventListener("abort", done);
    });
  }

  /** Everything becomes NOT_SERVING; watchers get that and their calls end. */
  stop(): void {
    this.#stopping = true;
    this.#stopped.dispatchEvent(new Event("stop"));
  }
}
