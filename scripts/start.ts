// `deno task start [-a <socket>] [-c <config.json>]`: serves from source with exactly the permissions
// the executable of that deployment gets. It reads the config, derives the permission flags the same
// way a deployment profile does (src/permissions.ts), and runs `deno run <flags> main.ts serve` with
// them, so the agent may read, write and reach only what the config names.
// Relative paths are taken from the folder the task was started in (deno task runs in the project
// root and names the caller's folder in INIT_CWD). Without -c, root gets the built-in defaults
// (/var/lib/edge-agent); any other user gets folders of their own (see userDefaults).

import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { DEFAULT_SOCKET_PATH, DEFAULTS, loadConfigFile, parseConfig } from "../src/config.ts";
import { StartupError } from "../src/errors.ts";
import { agentPermissionFlags } from "../src/permissions.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const USAGE = "usage: deno task start [-a <socket path>] [-c <config.json>]";

export interface Environment {
  uid: number;
  cwd: string;
  env: Record<string, string | undefined>;
}

export interface Plan {
  socket: string;
  configPath: string | null;
  /** The config written for a user without -c, to be created before the agent starts. */
  userConfig: { path: string; raw: Record<string, unknown> } | null;
  flags: string[];
  /** `deno` arguments that serve the deployment. */
  args: string[];
}

/**
 * Where a user other than root keeps the agent's state and models when no config is given
 * (XDG base directories): state in $XDG_STATE_HOME/edge-agent (~/.local/state/edge-agent), model
 * roots [$XDG_DATA_HOME/edge-agent/models] (~/.local/share/edge-agent/models).
 */
export function userDefaults(env: Record<string, string | undefined>): { path: string; raw: Record<string, unknown> } {
  const home = env.HOME;
  const stateHome = env.XDG_STATE_HOME || (home && join(home, ".local", "state"));
  const dataHome = env.XDG_DATA_HOME || (home && join(home, ".local", "share"));
  if (!stateHome || !dataHome) {
    throw new StartupError(["no -c given and neither HOME nor XDG_STATE_HOME/XDG_DATA_HOME is set: give -c <config>"]);
  }
  const base = join(stateHome, "edge-agent");
  return {
    path: join(base, "config.json"),
    raw: {
      edge_agent_state_dir: join(base, "state"),
      edge_agent_model_roots: [join(dataHome, "edge-agent", "models")],
    },
  };
}

/** What to run for these arguments; throws StartupError naming what is wrong. */
export async function plan(args: string[], where: Environment): Promise<Plan> {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: { address: { type: "string", short: "a" }, config: { type: "string", short: "c" } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    throw new StartupError([`${(error as Error).message}\n${USAGE}`]);
  }
  const socket = resolve(where.cwd, values.address ?? DEFAULT_SOCKET_PATH);
  const userConfig = values.config === undefined && where.uid !== 0 ? userDefaults(where.env) : null;
  const configPath = values.config !== undefined ? resolve(where.cwd, values.config) : userConfig?.path ?? null;
  let config = DEFAULTS;
  if (userConfig) {
    config = parseConfig(userConfig.raw, `config ${userConfig.path}`).config;
  } else if (configPath) {
    config = (await loadConfigFile(configPath)).config;
  }
  const flags = agentPermissionFlags({ socketPath: socket, configPath, config });
  return {
    socket,
    configPath,
    userConfig,
    flags,
    args: ["run", ...flags, MAIN, "serve", "-a", socket, ...(configPath ? ["-c", configPath] : [])],
  };
}

/** Writes the user's default config (kept if it already says the same) and makes its model root. */
async function writeUserConfig(userConfig: { path: string; raw: Record<string, unknown> }): Promise<void> {
  const text = JSON.stringify(userConfig.raw, null, 2) + "\n";
  await Deno.mkdir(join(userConfig.path, ".."), { recursive: true });
  for (const root of userConfig.raw.edge_agent_model_roots as string[]) await Deno.mkdir(root, { recursive: true });
  if (await Deno.readTextFile(userConfig.path).catch(() => null) !== text) {
    await Deno.writeTextFile(userConfig.path, text);
  }
  console.error(`edge-agent start: no -c given; user defaults in ${userConfig.path}`);
}

if (import.meta.main) {
  const env = Deno.env.toObject();
  let planned: Plan;
  try {
    planned = await plan(Deno.args, { uid: Deno.uid() ?? 0, cwd: env.INIT_CWD ?? Deno.cwd(), env });
    if (planned.userConfig) await writeUserConfig(planned.userConfig);
  } catch (error) {
    if (!(error instanceof StartupError) && !(error instanceof Deno.errors.PermissionDenied)) throw error;
    const problems = error instanceof StartupError ? error.problems : [(error as Error).message];
    console.error(`edge-agent start: cannot start:\n${problems.map((p) => `  ${p}`).join("\n")}`);
    Deno.exit(2);
  }
  console.error(`edge-agent start: deno ${planned.args.join(" ")}`);
  const agent = new Deno.Command(Deno.execPath(), { args: planned.args, stdin: "null" }).spawn();
  // Stop signals go on to the agent, which stops cleanly; this process exits with its code.
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    Deno.addSignalListener(signal, () => {
      try {
        agent.kill(signal);
      } catch { /* already exited */ }
    });
  }
  Deno.exit((await agent.status).code);
}
