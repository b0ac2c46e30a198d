// Command line: `serve [-a <socket path>] [-c <config.json>] [-f] [-m <bytes>]` (Edge Manager's flags), and the
// publisher's and operator's tools. A compiled executable runs it with its deployment's socket and
// config as the defaults (see build.ts).

import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { DEFAULT_SOCKET_PATH, parseMessageLimit } from "./src/config.ts";
import { StartupError } from "./src/errors.ts";

/** What `-a`/`--socket` and `-c` default to. */
export interface Defaults {
  socket: string;
  config: string | null;
}

const SOURCE_DEFAULTS: Defaults = { socket: DEFAULT_SOCKET_PATH, config: null };

const usage = (defaults: Defaults) =>
  `usage:
  edge-agent serve [-a <socket path>] [-c <config.json>] [-f] [-m <bytes>]
  edge-agent trust init --out <dir>
  edge-agent package sign <folder> --key <key.pem> [--cert-chain <leaf-then-CAs.pem>] [--name N --version V --arch A]
  edge-agent package pack <folder> -o <file.tar.gz>
  edge-agent package verify <folder or .tar.gz> (--roots <pem or folder> | --public-key <pem>)
  edge-agent package deployment <folder> --key <key.pem> [--cert-chain <leaf-then-CAs.pem>]
  edge-agent client [--socket <path>] list | describe <model> | load <url> <name> | unload <name>
                    | predict <model> --input <name>=<file.npy|file.bin|image.png|image.jpg|->[:<d1>,...]
                      [--out <file.npy|->] [--mean m,m,m --std s,s,s --bgr]
                    | capture-status <id> | health [<service>]
                    | bench <model> --input ... [--concurrency N] [--seconds S]
                    | status [--metrics <unix:path|host:port>]

  serve            -a, --address: Unix socket (default ${defaults.socket}); -c, --config: config file${
    defaults.config ? ` (default ${defaults.config})` : ""
  };
                   -f, --force: remove a socket file already at the address, even one another process serves on;
                   -m, --max-message-bytes: gRPC message size limit (overrides edge_agent_max_message_bytes);
                   relative paths resolve against the working folder
  trust init       a development root, intermediate and code-signing leaf (for development only)
  package sign     writes model.sig (OpenSSF Model Signing v1.0): certificate method with --cert-chain,
                   key method without; --name/--version/--arch write edge-model.json first
  package deployment  fills in <folder>/deployment.json (each package's sha256 and size, serial + 1) and
                   signs it (deployment.json.sig) for the devices that pull deployments from that folder's copy
  client           --socket defaults to the serve default; an input or output of "-" is standard input or
                   output (.npy, PNG and JPEG are recognised by their contents); images become FLOAT32
                   [1,3,H,W] in [0, 1], then (v - mean) / std per channel, or UINT8 [1,H,W,3]; --bgr: BGR order
`;

function fail(message: string, code: number): never {
  console.error(message);
  Deno.exit(code);
}

export async function main(args: string[], defaults: Defaults = SOURCE_DEFAULTS): Promise<void> {
  const USAGE = usage(defaults);
  const [command, ...rest] = args;
  if (command === undefined || command === "-h" || command === "--help" || command === "help") {
    console.log(USAGE);
    return;
  }
  if (command === "trust" || command === "package") return await publisher(command, rest, USAGE);
  if (command === "client") return await client(rest, defaults.socket, USAGE);
  if (command !== "serve") fail(`unknown command "${command}"\n\n${USAGE}`, 2);
  let values;
  try {
    ({ values } = parseArgs({
      args: rest,
      options: {
        address: { type: "string", short: "a" },
        config: { type: "string", short: "c" },
        force: { type: "boolean", short: "f", default: false },
        "max-message-bytes": { type: "string", short: "m" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    fail(`${(error as Error).message}\n\n${USAGE}`, 2);
  }
  const limit = values["max-message-bytes"] === undefined ? undefined : parseMessageLimit(values["max-message-bytes"]);
  if (typeof limit === "object") fail(`${limit.problem}\n\n${USAGE}`, 2);
  // Loaded only to serve, so usage errors need no permissions at all.
  const { serve } = await import("./src/agent.ts");
  const config = values.config ?? defaults.config;
  try {
    // Absolute from here on: the start-up log and permission messages name the files for sure.
    await serve({
      socketPath: resolve(values.address ?? defaults.socket),
      configPath: config === null ? null : resolve(config),
      removeExistingSocket: values.force,
      maxMessageBytes: limit,
    });
  } catch (error) {
    if (error instanceof StartupError) {
      fail(`edge-agent: cannot start:\n${error.problems.map((p) => `  ${p}`).join("\n")}`, 2);
    }
    throw error;
  }
}

/** client sub-commands: try a running agent by hand. */
async function client(args: string[], defaultSocket: string, USAGE: string): Promise<void> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        socket: { type: "string", default: defaultSocket },
        input: { type: "string", multiple: true, default: [] },
        out: { type: "string", short: "o" },
        concurrency: { type: "string", default: "1" },
        metrics: { type: "string" },
        seconds: { type: "string", default: "10" },
        mean: { type: "string" },
        std: { type: "string" },
        bgr: { type: "boolean", default: false },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (error) {
    fail(`${(error as Error).message}\n\n${USAGE}`, 2);
  }
  const { values, positionals: [action, first, second] } = parsed;
  if (values.input.filter((i) => /^[^=]+=-(:|$)/.test(i)).length > 1) {
    fail("client: only one --input can come from standard input (-)", 2);
  }
  const cli = await import("./src/client/client_cli.ts");
  const need = (value: string | undefined, what: string): string =>
    value ?? fail(`client ${action}: ${what}\n\n${USAGE}`, 2);
  try {
    const image = cli.parseImageOptions(values.mean, values.std, values.bgr);
    const inputs = () => values.input.map((text) => cli.parseInput(text, image));
    const output = await cli.withClient(values.socket, (agent) => {
      switch (action) {
        case "list":
          return cli.list(agent);
        case "describe":
          return cli.describe(agent, need(first, "name the model"));
        case "load":
          return cli.load(agent, need(first, "name the package url"), need(second, "name the model"));
        case "unload":
          return cli.unload(agent, need(first, "name the model"));
        case "predict":
          if (values.input.length === 0) fail("client predict: give at least one --input <name>=<file>", 2);
          return cli.predict(
            agent,
            need(first, "name the model"),
            inputs(),
            values.out ?? null,
          );
        case "capture-status":
          return cli.captureStatus(agent, need(first, "name the capture id"));
        case "health":
          return cli.checkHealth(agent, first ?? "");
        case "status":
          return cli.status(agent, values.metrics ?? null);
        case "bench": {
          if (values.input.length === 0) fail("client bench: give at least one --input <name>=<file>", 2);
          const concurrency = Number(values.concurrency);
          const seconds = Number(values.seconds);
          if (!Number.isInteger(concurrency) || concurrency < 1 || !(seconds > 0)) {
            fail("client bench: --concurrency must be a whole number >= 1 and --seconds > 0", 2);
          }
          return cli.bench(
            values.socket,
            need(first, "name the model"),
            inputs(),
            concurrency,
            seconds,
          );
        }
        default:
          fail(`unknown client command "${action ?? ""}"\n\n${USAGE}`, 2);
      }
    });
    // With --out -, standard output carries the .npy; the summary goes to standard error.
    if (values.out === "-") console.error(output);
    else console.log(output);
  } catch (error) {
    if (error instanceof cli.ClientCommandError) fail(`edge-agent: ${error.message}`, 1);
    throw error;
  }
}

/** trust/package sub-commands: the publisher's tools. */
async function publisher(command: string, args: string[], USAGE: string): Promise<void> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        out: { type: "string", short: "o" },
        key: { type: "string" },
        "cert-chain": { type: "string" },
        name: { type: "string" },
        version: { type: "string" },
        arch: { type: "string" },
        roots: { type: "string" },
        "public-key": { type: "string" },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (error) {
    fail(`${(error as Error).message}\n\n${USAGE}`, 2);
  }
  const { values, positionals: [action, target] } = parsed;
  const cli = await import("./src/packages/cli.ts");
  const need = (value: string | undefined, what: string): string =>
    value ?? fail(`${command} ${action}: ${what}\n\n${USAGE}`, 2);
  try {
    let output: string;
    if (command === "trust" && action === "init") {
      output = await cli.trustInit(need(values.out, "--out <dir> is required"));
    } else if (command === "package" && action === "sign") {
      output = await cli.packageSign({
        folder: need(target, "name the package folder"),
        key: need(values.key, "--key <key.pem> is required"),
        certChain: values["cert-chain"],
        name: values.name,
        version: values.version,
        arch: values.arch,
      });
    } else if (command === "package" && action === "pack") {
      output = await cli.packagePack(
        need(target, "name the package folder"),
        need(values.out, "-o <file.tar.gz> is required"),
      );
    } else if (command === "package" && action === "deployment") {
      output = await cli.packageDeployment({
        folder: need(target, "name the folder holding deployment.json"),
        key: need(values.key, "--key <key.pem> is required"),
        certChain: values["cert-chain"],
      });
    } else if (command === "package" && action === "verify") {
      output = await cli.packageVerify({
        target: need(target, "name the package folder or archive"),
        roots: values.roots,
        publicKey: values["public-key"],
      });
    } else {
      fail(`unknown command "${command} ${action ?? ""}"\n\n${USAGE}`, 2);
    }
    console.log(output);
  } catch (error) {
    if (error instanceof cli.CommandError) fail(`edge-agent: ${error.message}`, 1);
    throw error;
  }
}

if (import.meta.main) await main(Deno.args);
