// A small S3 client: PutObject, GetObject and ListObjects on fetch, signed by AWS's own SigV4 signer
// (@smithy/signature-v4, the one inside @aws-sdk/client-s3).
//
// Why not @aws-sdk/client-s3 itself: the agent runs with scoped permissions (permissions.ts: named hosts,
// named AWS_* variables, named folders). Loading the SDK reads many other environment variables
// (AWS_LAMBDA_*, AWS_PROFILE, AWS_*_CHECKSUM_*, ...) and os.release(), so it fails with NotCapable unless
// the agent gets unscoped --allow-env and --allow-sys; it would also search ~/.aws and, without explicit
// credentials, the instance metadata address. The signer alone needs no permission at all.

import { CredentialsError, type CredentialSource, type S3Credentials, StaticCredentials } from "./credentials.ts";

export type { S3Credentials } from "./credentials.ts";

export interface S3Options {
  bucket: string;
  region: string;
  /** e.g. "http://127.0.0.1:4568" for s3rver or MinIO; default https://s3.<region>.amazonaws.com. */
  endpoint?: string;
  /** Bucket in the path (http://host/bucket/key) instead of the host name (needed by MinIO and s3rver). */
  forcePathStyle?: boolean;
  /** Fixed credentials or a source asked before each request (credentials.ts). */
  credentials: S3Credentials | CredentialSource;
  /** Per request; default 30 s. */
  requestTimeoutMs?: number;
}

/**
 * An S3 request that failed; `transient` when retrying may help (network, 5xx, throttling, clock skew,
 * credentials missing or refused); `credentials` when the credentials are the problem.
 */
export class S3Error extends Error {
  constructor(
    message: string,
    readonly status: number | null,
    readonly code: string | null,
    readonly transient: boolean,
    readonly credentials = false,
  ) {
    super(message);
    this.name = "S3Error";
  }
}

const encoder = new TextEncoder();
const hex = (bytes: ArrayBuffer) => Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");

export async function sha256Hex(data: Uint8Array | string): Promise<string> {
  const bytes = typeof data === "string" ? encoder.encode(data) : data;
  return hex(await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>));
}

/** RFC 3986 percent-encoding as SigV4 wants it: everything but A-Z a-z 0-9 - _ . ~ (and "/" when asked). */
export function uriEncode(text: string, keepSlash: boolean): string {
  let out = "";
  for (const byte of encoder.encode(text)) {
    const c = String.fromCharCode(byte);
    if (/[A-Za-z0-9\-_.~]/.test(c) || (keepSlash && c === "/")) out += c;
    else out += "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

export interface SignInput {
  method: string;
  url: URL;
  /** Headers to sign besides host, x-amz-date, x-amz-content-sha256 (and x-amz-security-token). */
  headers?: Record<string, string>;
  payloadHash: string;
  credentials: S3Credentials;
  region: string;
  service?: string;
  date?: Date;
}

/**
 * Signs a request (SigV4, header form). `url.pathname` must already be URI-encoded as S3 wants (each
 * segment once); query parameters are canonicalised by the signer. Returns the headers to send.
 */
export async function signRequest(input: SignInput): Promise<Record<string, string>> {
  const { credentials, url } = input;
  // Loaded at the first request: an agent capturing to disk never holds the signer.
  const [{ Hash }, { SignatureV4 }] = await Promise.all([import("@smithy/hash-node"), import("@smithy/signature-v4")]);
  const signer = new SignatureV4({
    service: input.service ?? "s3",
    region: input.region,
    credentials: {
      accessKeyId: credentials.accessKeyId,
      secretAccessKey: credentials.secretAccessKey,
      sessionToken: credentials.sessionToken,
    },
    sha256: Hash.bind(null, "sha256"),
    uriEscapePath: false, // S3 signs the path as sent
  });
  const signed = await signer.sign({
    method: input.method,
    protocol: url.protocol,
    hostname: url.hostname,
    port: url.port ? Number(url.port) : undefined,
    path: url.pathname,
    query: Object.fromEntries(url.searchParams),
    headers: {
      ...Object.fromEntries(Object.entries(input.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v.trim()])),
      host: url.host,
      "x-amz-content-sha256": input.payloadHash,
    },
  }, { signingDate: input.date });
  const headers = { ...signed.headers };
  delete headers.host; // fetch sets it from the URL
  return headers;
}

/** The S3Error code when the credential source has none to give (no request was sent). */
export const CREDENTIALS_UNAVAILABLE = "CredentialsUnavailable";

/** Codes of S3 answers that refuse the credentials: fetch new ones and retry, never give the capture up. */
const CREDENTIAL_CODES = new Set([
  "ExpiredToken",
  "InvalidToken",
  "TokenRefreshRequired",
  "InvalidAccessKeyId",
  "SignatureDoesNotMatch",
  "AccessDenied",
]);

/** Retrying may succeed: server errors, throttling, timeouts, and errors fixed by time (clock, token). */
function transientStatus(status: number, code: string | null): boolean {
  return status >= 500 || status === 429 || status === 408 || (code !== null && CREDENTIAL_CODES.has(code)) ||
    code === "RequestTimeTooSkewed" || code === "RequestTimeout" || code === "SlowDown" || code === "OperationAborted";
}

export class S3Client {
  readonly credentials: CredentialSource;
  private readonly base: URL;
  private readonly pathStyle: boolean;

  constructor(private readonly options: S3Options) {
    const c = options.credentials;
    this.credentials = "get" in c ? c : new StaticCredentials(c);
    this.base = new URL(options.endpoint ?? `https://s3.${options.region}.amazonaws.com`);
    // Dotted bucket names do not match the wildcard certificate of virtual-hosted style.
    this.pathStyle = options.forcePathStyle ?? options.bucket.includes(".");
  }

  /** The request URL of `key` (encoded once per segment, as S3's canonical URI is). */
  objectUrl(key = ""): URL {
    const url = new URL(this.base);
    const path = uriEncode(key, true);
    if (this.pathStyle) {
      url.pathname = `${url.pathname.replace(/\/$/, "")}/${uriEncode(this.options.bucket, false)}/${path}`;
    } else {
      url.hostname = `${this.options.bucket}.${url.hostname}`;
      url.pathname = `${url.pathname.replace(/\/$/, "")}/${path}`;
    }
    return url;
  }

  private async request(
    method: string,
    url: URL,
    body: Uint8Array | null,
    headers: Record<string, string> = {},
    signal?: AbortSignal,
    timeoutMs = this.options.requestTimeoutMs ?? 30_000,
  ): Promise<Response> {
    const payloadHash = await sha256Hex(body ?? new Uint8Array());
    let credentials: S3Credentials;
    try {
      credentials = await this.credentials.get();
    } catch (e) {
      const message = e instanceof CredentialsError ? e.message : String(e);
      throw new S3Error(message, null, CREDENTIALS_UNAVAILABLE, true, true);
    }
    const signed = await signRequest({
      method,
      url,
      headers,
      payloadHash,
      credentials,
      region: this.options.region,
    });
    const timeout = AbortSignal.timeout(timeoutMs);
    let response: Response;
    try {
      response = await fetch(url, {
        method,
        headers: signed,
        body: body as Uint8Array<ArrayBuffer> | null,
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
      });
    } catch (e) {
      throw new S3Error(`S3 ${method} ${url.pathname}: ${(e as Error).message}`, null, null, true);
    }
    if (response.ok || (method === "GET" && response.status === 404)) return response;
    const text = await response.text().catch(() => "");
    const code = /<Code>([^<]*)<\/Code>/.exec(text)?.[1] ?? null;
    const message = /<Message>([^<]*)<\/Message>/.exec(text)?.[1] ?? text.slice(0, 200);
    const refused = code !== null && CREDENTIAL_CODES.has(code);
    // Expired or revoked temporary credentials: the next request fetches new ones.
    if (refused) this.credentials.invalidate(credentials);
    throw new S3Error(
      `S3 ${method} ${url.pathname}: ${response.status} ${code ?? ""} ${message}`.trim(),
      response.status,
      code,
      transientStatus(response.status, code),
      refused,
    );
  }

  /** PutObject; resolves once S3 answered 200 (the object is stored). */
  async putObject(key: string, body: Uint8Array, contentType: string, signal?: AbortSignal): Promise<void> {
    const response = await this.request("PUT", this.objectUrl(key), body, { "content-type": contentType }, signal);
    await response.body?.cancel();
  }

  /** GetObject; null when there is no such key. */
  async getObject(key: string, signal?: AbortSignal): Promise<Uint8Array | null> {
    const response = await this.request("GET", this.objectUrl(key), null, {}, signal);
    if (response.status === 404) {
      await response.body?.cancel();
      return null;
    }
    return new Uint8Array(await response.arrayBuffer());
  }

  /**
   * GetObject from byte `offset` on, as a stream (Range: a download resumes where it stopped). The
   * answer is 206, or 200 when the server sends the whole object; null when there is no such key.
   * `timeoutMs` bounds the whole transfer.
   */
  async getObjectFrom(key: string, offset: number, timeoutMs: number, signal?: AbortSignal): Promise<Response | null> {
    const headers: Record<string, string> = offset > 0 ? { range: `bytes=${offset}-` } : {};
    const response = await this.request("GET", this.objectUrl(key), null, headers, signal, timeoutMs);
    if (response.status !== 404) return response;
    await response.body?.cancel();
    return null;
  }

  /**
   * Every key under `prefix` (ListObjects, paging with marker=<last key>). Version 1 rather than V2 because
   * s3rver under Deno fails any truncated V2 page: it encrypts continuation tokens with DES, which Deno's
   * node:crypto lacks. (Only tests and tools list; uploads never do.)
   */
  async listKeys(prefix: string): Promise<string[]> {
    const keys: string[] = [];
    for (let truncated = true; truncated;) {
      const url = this.objectUrl("");
      // Encoded here as SigV4 canonicalises it (URLSearchParams would write spaces as "+").
      const params = [["prefix", prefix]];
      if (keys.length) params.push(["marker", keys[keys.length - 1]]);
      url.search = params.map(([k, v]) => `${uriEncode(k, false)}=${uriEncode(v, false)}`).join("&");
      const response = await this.request("GET", url, null);
      const xml = await response.text();
      if (response.status === 404) throw new S3Error(`S3 list: bucket not found`, 404, "NoSuchBucket", false);
      const page = [...xml.matchAll(/<Key>([^<]*)<\/Key>/g)].map((m) => unescapeXml(m[1]));
      keys.push(...page);
      truncated = page.length > 0 && /<IsTruncated>true<\/IsTruncated>/.test(xml);
    }
    return keys;
  }
}

function unescapeXml(s: string): string {
  return s.replace(/&(lt|gt|quot|apos|amp|#\d+|#x[0-9a-fA-F]+);/g, (_, e: string) => {
    if (e[0] === "#") return String.fromCodePoint(e[1] === "x" ? parseInt(e.slice(2), 16) : parseInt(e.slice(1)));
    return ({ lt: "<", gt: ">", quot: '"', apos: "'", amp: "&" } as Record<string, string>)[e];
  });
}
