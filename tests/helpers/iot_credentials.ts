// Real certificates (openssl CLI) and a local AWS IoT credentials provider stand-in
// (tests/python/iot_credentials_server.py: Python's ssl, client certificate required) for the
// credentials tests.

import { join } from "node:path";
import { PYTHON } from "./python.ts";

const SERVER_SCRIPT = new URL("../python/iot_credentials_server.py", import.meta.url).pathname;

export interface Pki {
  dir: string;
  /** The CA of the endpoint and of the device certificate. */
  caFile: string;
  serverCert: string;
  serverKey: string;
  /** The device's certificate and key (mode 0600), signed by the CA. */
  deviceCert: string;
  deviceKey: string;
  /** A device certificate and key signed by another CA, which the endpoint does not trust. */
  rogueCert: string;
  rogueKey: string;
}

async function openssl(cwd: string, ...args: string[]): Promise<void> {
  const { success, stderr } = await new Deno.Command("openssl", { args, cwd, stdout: "null", stderr: "piped" })
    .output();
  if (!success) throw new Error(`openssl ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
}

/** A P-256 key and a certificate for `cn` signed by `ca` (or self-signed CA when `ca` is null). */
async function issue(dir: string, name: string, cn: string, ca: string | null, ext: string): Promise<void> {
  await openssl(dir, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", `${name}.key`);
  await Deno.chmod(join(dir, `${name}.key`), 0o600);
  if (ca === null) {
    await openssl(
      dir,
      ...["req", "-x509", "-new", "-key", `${name}.key`, "-out", `${name}.pem`, "-days", "2", "-subj", `/CN=${cn}`],
      ...["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    );
    return;
  }
  await openssl(dir, "req", "-new", "-key", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`);
  await Deno.writeTextFile(join(dir, `${name}.ext`), ext);
  await openssl(
    dir,
    ...["x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}.pem`, "-CAkey", `${ca}.key`, "-CAcreateserial"],
    ...["-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`],
  );
}

/** A CA, a server certificate for 127.0.0.1/localhost, a device certificate, and a rogue device. */
export async function makePki(dir: string): Promise<Pki> {
  await Deno.mkdir(dir, { recursive: true });
  await issue(dir, "ca", "Test Root CA", null, "");
  await issue(dir, "rogue-ca", "Rogue CA", null, "");
  const server = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
  await issue(dir, "server", "localhost", "ca", server);
  await issue(dir, "device", "thing-1", "ca", "extendedKeyUsage=clientAuth\n");
  await issue(dir, "rogue", "thing-1", "rogue-ca", "extendedKeyUsage=clientAuth\n");
  const f = (name: string) => join(dir, name);
  return {
    dir,
    caFile: f("ca.pem"),
    serverCert: f("server.pem"),
    serverKey: f("server.key"),
    deviceCert: f("device.pem"),
    deviceKey: f("device.key"),
    rogueCert: f("rogue.pem"),
    rogueKey: f("rogue.key"),
  };
}

export interface Fetch {
  path: string;
  thing: string;
  subject: string;
}

/** The credentials endpoint on 127.0.0.1. */
export class CredentialsEndpoint {
  private stderrText = "";
  private constructor(
    readonly port: number,
    private readonly process: Deno.ChildProcess,
    /** Requests answered, in order. */
    readonly fetches: Fetch[],
  ) {}

  /**
   * Starts it; `lifetime` seconds of each credentials, `keys` the access key ids in order (the last
   * repeats), `port` a fixed port (e.g. to start it later on a port the agent already knows).
   */
  static async start(pki: Pki, options: { lifetime?: number; keys?: string[]; port?: number } = {}) {
    const process = new Deno.Command(PYTHON, {
      args: [
        SERVER_SCRIPT,
        ...["--cert", pki.serverCert, "--key", pki.serverKey, "--client-ca", pki.caFile],
        ...["--port", String(options.port ?? 0), "--lifetime", String(options.lifetime ?? 3600)],
        ...["--keys", (options.keys ?? ["S3RVER"]).join(",")],
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const lines = process.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    const fetches: Fetch[] = [];
    const ready = Promise.withResolvers<number>();
    (async () => {
      for (;;) {
        const { value, done } = await lines.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line.startsWith("ready ")) ready.resolve(Number(line.slice(6)));
          else fetches.push(JSON.parse(line));
        }
      }
      ready.reject(new Error("the credentials endpoint exited before it was ready"));
    })();
    const port = await ready.promise;
    const endpoint = new CredentialsEndpoint(port, process, fetches);
    (async () => {
      for await (const text of process.stderr.pipeThrough(new TextDecoderStream())) endpoint.stderrText += text;
    })();
    return endpoint;
  }

  get url(): string {
    return `https://127.0.0.1:${this.port}`;
  }

  /** What the endpoint wrote on stderr (refused handshakes). */
  stderr(): string {
    return this.stderrText;
  }

  async stop(): Promise<void> {
    try {
      this.process.kill("SIGTERM");
    } catch { /* already gone */ }
    await this.process.status;
  }
}
