// Where S3 credentials come from: the environment (AWS_ACCESS_KEY_ID, ...), or the AWS IoT credentials
// provider (temporary credentials over mutual TLS with the device certificate, as Edge Manager devices
// hold no AWS keys). Credentials stay in memory only. A source that cannot give credentials throws
// CredentialsError; the capture service keeps captures spooled and retries, so inference never waits.

import type { Logger } from "../log.ts";

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  /** When temporary credentials stop working (ms since the epoch). */
  expiresAt?: number;
}

export interface CredentialSource {
  /** "environment" or "iot", for logs. */
  readonly kind: string;
  /** Credentials to sign the next request with; throws CredentialsError when there are none. */
  get(): Promise<S3Credentials>;
  /** S3 refused `used` as expired or invalid: the next get() fetches new ones at once. */
  invalidate(used: S3Credentials): void;
  stats(): CredentialStats;
}

export interface CredentialStats {
  /** When the credentials in use expire (ms since the epoch), or null (none, or they do not expire). */
  expiresAt: number | null;
  /** Successful and failed fetches from the credentials provider since start. */
  fetches: number;
  fetchFailures: number;
}

/** No credentials now; `reason` says why and what to do. */
export class CredentialsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CredentialsError";
  }
}

/** The environment variables environment credentials come from. */
export const AWS_CREDENTIAL_VARIABLES = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] as const;

function env(name: string): string | undefined {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined; // not granted: same as unset
  }
}

/** AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, read at each request. */
export class EnvironmentCredentials implements CredentialSource {
  readonly kind = "environment";

  get(): Promise<S3Credentials> {
    const accessKeyId = env("AWS_ACCESS_KEY_ID");
    const secretAccessKey = env("AWS_SECRET_ACCESS_KEY");
    if (!accessKeyId || !secretAccessKey) {
      return Promise.reject(
        new CredentialsError(
          "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) for the agent, " +
            "or the sagemaker_edge_provider_aws_* keys for the AWS IoT credentials provider",
        ),
      );
    }
    return Promise.resolve({ accessKeyId, secretAccessKey, sessionToken: env("AWS_SESSION_TOKEN") });
  }

  invalidate(): void {}

  stats(): CredentialStats {
    return { expiresAt: null, fetches: 0, fetchFailures: 0 };
  }
}

/** Fixed credentials (tests, tools). */
export class StaticCredentials implements CredentialSource {
  readonly kind = "static";
  constructor(private readonly credentials: S3Credentials) {}
  get(): Promise<S3Credentials> {
    return Promise.resolve(this.credentials);
  }
  invalidate(): void {}
  stats(): CredentialStats {
    return { expiresAt: null, fetches: 0, fetchFailures: 0 };
  }
}

export interface IotCredentialOptions {
  /** sagemaker_edge_provider_aws_iot_cred_endpoint: a whole URL or a bare host ("host" or "host:port"). */
  endpoint: string;
  /** The role alias when `endpoint` is a bare host: SageMakerEdge-<fleet name>, as Edge Manager's fleets create. */
  deviceFleetName: string;
  /** Sent as x-amzn-iot-thingname. */
  thingName: string;
  certFile: string;
  keyFile: string;
  /** Trusted CAs of the endpoint; default: the system's (AmazonRootCA1 is among them). */
  caFile?: string | null;
  logger: Logger;
  /** First retry delay after a failed fetch; doubles up to retryMaxMs, with jitter. */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** Per fetch; default 15 s. */
  timeoutMs?: number;
  now?: () => number;
}

/** The credentials URL for `endpoint` (a whole URL, or a bare host: then the fleet's role alias). */
export function iotCredentialsUrl(endpoint: string, deviceFleetName: string): URL {
  const bare = !/^https?:\/\//i.test(endpoint);
  const url = new URL(bare ? `https://${endpoint}` : endpoint);
  if (url.pathname === "/" || url.pathname === "") {
    url.pathname = `/role-aliases/${encodeURIComponent(`SageMakerEdge-${deviceFleetName}`)}/credentials`;
  }
  return url;
}

/** "host:port" of a credentials endpoint, as --allow-net names it. */
export function iotCredentialsHost(endpoint: string, deviceFleetName: string): string {
  const url = iotCredentialsUrl(endpoint, deviceFleetName);
  return `${url.hostname}:${url.port || (url.protocol === "http:" ? "80" : "443")}`;
}

/**
 * Problems of a private key file at start-up: readable by group or others is refused, as ssh does (it
 * is the device's identity). A missing file is not a start-up error: uploads wait until it appears.
 */
export async function keyFileProblems(keyFile: string): Promise<string[]> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(keyFile);
  } catch {
    return [];
  }
  const mode = (info.mode ?? 0) & 0o777;
  if (mode & 0o077) {
    return [
      `sagemaker_edge_provider_aws_cert_pk_file ${keyFile} is readable by group or others (mode ${
        mode.toString(8).padStart(4, "0")
      }): run chmod 600 ${keyFile}`,
    ];
  }
  return [];
}

/** The reason of a failed fetch, with its causes (TLS alerts hide there). */
function describe(error: unknown): string {
  const parts: string[] = [];
  for (let e = error; e instanceof Error && parts.length < 4; e = e.cause) {
    if (!parts.includes(e.message)) parts.push(e.message);
  }
  return parts.join(": ") || String(error);
}

/**
 * AWS IoT credentials provider: GET <endpoint>/role-aliases/<alias>/credentials over mutual TLS. The
 * certificate and key are read at each fetch, so replacing them on disk needs no restart. Credentials
 * are refreshed at 80% of their lifetime (at once when S3 refuses them); a failed fetch is retried
 * after a growing delay with jitter, and meanwhile credentials that have not expired stay in use.
 */
export class IotCredentials implements CredentialSource {
  readonly kind = "iot";
  readonly url: URL;
  private current: S3Credentials | null = null;
  private refreshAt = 0;
  private inFlight: Promise<S3Credentials> | null = null;
  private failures = 0;
  private retryAt = 0;
  private lastError = "";
  private counts = { fetches: 0, fetchFailures: 0 };
  private readonly now: () => number;

  constructor(private readonly o: IotCredentialOptions) {
    this.url = iotCredentialsUrl(o.endpoint, o.deviceFleetName);
    this.now = o.now ?? Date.now;
  }

  get(): Promise<S3Credentials> {
    const now = this.now();
    const current = this.current;
    const usable = current !== null && (current.expiresAt === undefined || now < current.expiresAt - 1000);
    if (usable && now < this.refreshAt) return Promise.resolve(current);
    if (this.inFlight) return usable ? Promise.resolve(current) : this.inFlight;
    if (now < this.retryAt) {
      if (usable) return Promise.resolve(current);
      return Promise.reject(new CredentialsError(this.lastError));
    }
    this.inFlight = this.fetch().finally(() => this.inFlight = null);
    this.inFlight.catch(() => {}); // callers that got the old credentials do not wait for it
    // Before expiry the old credentials serve while new ones come.
    return usable ? Promise.resolve(current) : this.inFlight;
  }

  invalidate(used: S3Credentials): void {
    if (
      this.current && this.current.accessKeyId === used.accessKeyId && this.current.sessionToken === used.sessionToken
    ) {
      this.current = null;
      this.refreshAt = 0;
      this.retryAt = 0;
    }
  }

  stats(): CredentialStats {
    return { expiresAt: this.current?.expiresAt ?? null, ...this.counts };
  }

  private async fetch(): Promise<S3Credentials> {
    try {
      const credentials = await this.request();
      const now = this.now();
      const lifetime = Math.max(0, (credentials.expiresAt ?? now + 3600_000) - now);
      this.current = credentials;
      this.refreshAt = now + lifetime * 0.8;
      this.counts.fetches++;
      if (this.failures > 0) this.o.logger.info("capture: credentials provider answers again", { url: this.url.href });
      this.failures = 0;
      this.retryAt = 0;
      this.lastError = ""; // the same failure later is news again
      return credentials;
    } catch (e) {
      this.counts.fetchFailures++;
      this.failures++;
      const delay = Math.min(this.o.retryMaxMs ?? 60_000, (this.o.retryBaseMs ?? 1000) * 2 ** (this.failures - 1));
      this.retryAt = this.now() + delay / 2 + Math.random() * delay / 2;
      const reason = e instanceof CredentialsError
        ? e.message
        : `credentials provider ${this.url.href}: ${describe(e)}`;
      if (reason !== this.lastError) this.o.logger.warn("capture: cannot get credentials", { reason });
      this.lastError = reason;
      throw new CredentialsError(reason);
    }
  }

  private async request(): Promise<S3Credentials> {
    const o = this.o;
    const read = async (key: string, path: string) => {
      try {
        return await Deno.readTextFile(path);
      } catch (e) {
        throw new CredentialsError(`${key} ${path} cannot be read: ${(e as Error).message}`);
      }
    };
    const problems = await keyFileProblems(o.keyFile);
    if (problems.length) throw new CredentialsError(problems[0]);
    const cert = await read("sagemaker_edge_provider_aws_cert_file", o.certFile);
    const key = await read("sagemaker_edge_provider_aws_cert_pk_file", o.keyFile);
    const ca = o.caFile ? await read("sagemaker_edge_provider_aws_ca_cert_file", o.caFile) : null;
    let client: Deno.HttpClient;
    try {
      client = Deno.createHttpClient({ cert, key, ...(ca ? { caCerts: [ca] } : {}) });
    } catch (e) {
      throw new CredentialsError(
        `the device certificate ${o.certFile} or its key ${o.keyFile} cannot be used (are they a pair?): ${
          describe(e)
        }`,
      );
    }
    try {
      const response = await fetch(this.url, {
        client,
        headers: { "x-amzn-iot-thingname": o.thingName, accept: "application/json" },
        signal: AbortSignal.timeout(o.timeoutMs ?? 15_000),
      });
      const text = await response.text();
      if (!response.ok) {
        throw new CredentialsError(
          `credentials provider ${this.url.href} answered ${response.status}: ${text.slice(0, 200)}`,
        );
      }
      const credentials = parseCredentials(text, this.url.href);
      // Lifetime by the endpoint's clock (its Date header): a device clock that is off neither makes
      // fresh credentials look expired (a fetch per upload) nor keeps expired ones.
      const served = Date.parse(response.headers.get("date") ?? "");
      if (credentials.expiresAt !== undefined && Number.isFinite(served)) {
        credentials.expiresAt = this.now() + (credentials.expiresAt - served);
      }
      return credentials;
    } catch (e) {
      if (e instanceof CredentialsError) throw e;
      const detail = describe(e);
      throw new CredentialsError(
        `credentials provider ${this.url.href}: ${detail}${connectionHint(detail, o.certFile, o.caFile)}`,
      );
    } finally {
      client.close();
    }
  }
}

/** What to check for a failed connection to the credentials endpoint. */
function connectionHint(detail: string, certFile: string, caFile: string | null | undefined): string {
  // The endpoint sent a TLS alert: it does not accept the device certificate.
  if (/fatal alert|CertificateRequired|BadCertificate|UnknownCA/i.test(detail)) {
    return ` (the endpoint refused the device certificate ${certFile}: is it registered and active in AWS IoT, ` +
      `and issued by a CA the endpoint trusts?)`;
  }
  if (/invalid peer certificate|UnknownIssuer|NotValidForName|certificate/i.test(detail)) {
    return ` (the endpoint's certificate is not trusted: does ${
      caFile ?? "the system's CA store"
    } (sagemaker_edge_provider_aws_ca_cert_file) hold its CA, and is the endpoint name right?)`;
  }
  return " (is the endpoint reachable from this device?)";
}

function parseCredentials(text: string, from: string): S3Credentials {
  let body: { credentials?: Record<string, unknown> };
  try {
    body = JSON.parse(text);
  } catch {
    throw new CredentialsError(`credentials provider ${from}: the answer is not JSON: ${text.slice(0, 100)}`);
  }
  const c = body?.credentials ?? {};
  const str = (name: string) => (typeof c[name] === "string" && c[name] !== "" ? c[name] as string : null);
  const accessKeyId = str("accessKeyId");
  const secretAccessKey = str("secretAccessKey");
  if (!accessKeyId || !secretAccessKey) {
    throw new CredentialsError(
      `credentials provider ${from}: the answer lacks credentials.accessKeyId/secretAccessKey`,
    );
  }
  const expiration = str("expiration");
  const expiresAt = expiration ? Date.parse(expiration) : NaN;
  return {
    accessKeyId,
    secretAccessKey,
    sessionToken: str("sessionToken") ?? undefined,
    expiresAt: Number.isFinite(expiresAt) ? expiresAt : undefined,
  };
}
