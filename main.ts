// Command line: `serve [-a <socket path>] [-c <config.json>]`, Edge Manager's two flags.

import { parseArgs } from "node:util";
import { DEFAULT_SOCKET_PATH } from "./src/config.ts";
import { StartupError } from "./src/errors.ts";

const USAGE = `usage: edge-agent serve [-a <socket path>] [-c <config.json>]

  -a, --address  Unix socket to serve on (default ${DEFAULT_SOCKET_PATH})
  -c, --config   configuration file (default: built-in defaults)
`;

function fail(message: string, code: number): never {
  console.error(message);
  Deno.exit(code);
}

async function main(args: string[]): Promise<void> {
  const [command, ...rest] = args;
  if (command === undefined || command === "-h" || command === "--help" || command === "help") {
    console.log(USAGE);
    return;
  }
  if (command !== "serve") fail(`unknown command "${command}"\n\n${USAGE}`, 2);
  let values;
  try {
    ({ values } = parseArgs({
      args: rest,
      options: {
        address: { type: "string", short: "a" },
        config: { type: "string", short: "c" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    fail(`${(error as Error).message}\n\n${USAGE}`, 2);
  }
  // Loaded only to serve, so usage errors need no permissions at all.
  const { serve } = await import("./src/agent.ts");
  try {
    await serve({ socketPath: values.address ?? DEFAULT_SOCKET_PATH, configPath: values.config ?? null });
  } catch (error) {
    if (error instanceof StartupError) {
      fail(`edge-agent: cannot start:\n${error.problems.map((p) => `  ${p}`).join("\n")}`, 2);
    }
    throw error;
  }
}

if (import.meta.main) await main(Deno.args);
