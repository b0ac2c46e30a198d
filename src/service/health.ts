// grpc.health.v1 (doc/health-checking.md): "" and the Agent service are SERVING while the agent
// serves and NOT_SERVING once it stops; "model/<name>" is SERVING while that model is loaded; "capture"
// is SERVING while captures reach their destination and NOT_SERVING while uploads cannot proceed
// (destination unreachable, credentials missing or refused: captures are kept meanwhile);
// "model/<name>@<version>" is SERVING while that version of the model is loaded; "deployment" (when
// deployments are on) is SERVING while every model of the last verified manifest is as it asks. Check
// answers NOT_FOUND for any other name; Watch sends SERVICE_UNKNOWN instead, as the protocol asks,
// and keeps the call open, sending each change until the client leaves or the agent stops.

import { invalidArgument, notFound } from "../errors.ts";
import type { ModelRegistry } from "../inference/models.ts";
import type { UploadState } from "../capture/service.ts";
import { health, SERVICE_NAME } from "./wire.ts";

const { SERVING, NOT_SERVING, SERVICE_UNKNOWN } = health.status;

/** The health entry of capture uploads. */
export const CAPTURE_HEALTH_NAME = "capture";
/** The health entry of deployments. */
export const DEPLOYMENT_HEALTH_NAME = "deployment";

/** What the capture entry reads: the upload state and its changes. */
export interface CaptureHealth {
  uploadState(): UploadState;
  readonly changes: EventTarget;
}

/** What the deployment entry reads. */
export interface DeploymentHealth {
  converged(): boolean;
  readonly changes: EventTarget;
}

export class HealthService {
  #stopping = false;
  readonly #stopped = new EventTarget();

  constructor(
    private readonly registry: ModelRegistry,
    private readonly capture: CaptureHealth | null = null,
    private readonly deployment: DeploymentHealth | null = null,
  ) {}

  status(service: string): number {
    if (service === CAPTURE_HEALTH_NAME && this.capture) {
      return this.#stopping || !this.capture.uploadState().ok ? NOT_SERVING : SERVING;
    }
    if (service === DEPLOYMENT_HEALTH_NAME && this.deployment) {
      return this.#stopping || !this.deployment.converged() ? NOT_SERVING : SERVING;
    }
    const model = service.startsWith("model/") ? service.slice("model/".length) : null;
    const at = model?.lastIndexOf("@") ?? -1;
    const known = service === "" || service === SERVICE_NAME ||
      (model !== null && at === -1 && this.registry.isLoaded(model)) ||
      (model !== null && at > 0 && this.#versionLoaded(model.slice(0, at), model.slice(at + 1)));
    if (!known) return SERVICE_UNKNOWN;
    return this.#stopping ? NOT_SERVING : SERVING;
  }

  #versionLoaded(name: string, version: string): boolean {
    return this.registry.isLoaded(name) && this.registry.describe(name).version === version;
  }

  /** The Check handler. */
  check = (request: unknown): { status: number } => {
    const service = (request as { service: string }).service;
    const status = this.status(service);
    if (status === SERVICE_UNKNOWN) {
      throw notFound(
        `unknown service "${service}" (use "", "${SERVICE_NAME}", "${CAPTURE_HEALTH_NAME}", "${DEPLOYMENT_HEALTH_NAME}", ` +
          `"model/<name>" or "model/<name>@<version>" of a loaded model)`,
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
        this.deployment?.changes.removeEventListener("change", done);
        this.#stopped.removeEventListener("stop", done);
        cancelled.removeEventListener("abort", done);
        resolve();
      };
      this.registry.changes.addEventListener("change", done);
      this.capture?.changes.addEventListener("change", done);
      this.deployment?.changes.addEventListener("change", done);
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
