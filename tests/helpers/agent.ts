// Starts the real agent as a subprocess, with the permission flags a deployment gets, on a
// temporary socket, and talks to it through the real gRPC client.

import { join } from "node:path";
import { GrpcJsAgentClient as AgentClient } from "./grpcjs_client.ts";
import { parseConfig } from "../../src/config.ts";
import { agentPermissionFlags } from "../../src/permissions.ts";
import { testTrust } from "./signing.ts";

export const PROJECT_ROOT = new URL("../../", import.meta.url).pathname;
export const MAIN = join(PROJECT_ROOT, "main.ts");
/** The module config the executable is compiled with: agents under test resolve exactly its packages. */
export const COMPILE_CONFIG = join(PROJECT_ROOT, "deploy", "deno.compile.json");

export interface AgentProcess {
  dir: string;
  socket: string;
  modelsDir: string;
  client: AgentClient;
  process: Deno.ChildProcess;
  /** stderr so far, as text. */
  logs(): string;
  /**
   * The first log line that `match` accepts, waiting for it: the agent's stderr is read
   * asynchronously, so a line written before an answer may arrive after it.
   */
  logged(match: (line: Record<string, unknown>) => boolean, what: string, timeoutMs?: number): Promise<LogLine>;
  /** Sends `signal` and waits for exit. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

export type LogLine = Record<string, unknown>;

export interface StartOptions {
  /** Extra config keys (model roots default to <dir>/models). */
  config?: Record<string, unknown>;
  dir?: string;
  /** A command the agent runs under, e.g. setpriv with reduced capabilities. */
  wrapper?: string[];
  /** The deno executable (default: the one running the tests), e.g. an aarch64 build under qemu. */
  deno?: string;
  /** `deno` is a compiled agent. */
  compiled?: boolean;
  /** Environment variables added for the agent (e.g. S3 credentials). */
  env?: Record<string, string>;
  /** The agent gets `env` only, none of the tests' environment. */
  clearEnv?: boolean;
  /** The agent's working folder (relative config paths resolve against it); default: the tests'. */
  cwd?: string;
  /** Where the agent serves (default <dir>/agent.sock). */
  socket?: string;
  /** Arguments after `serve -a <socket> -c <config>`, e.g. ["-f", "-m", "1048576"]. */
  serveArgs?: string[];
}

/**
 * Writes `<dir>/config.json` from `raw` and returns the socket path and the `deno` arguments that
 * serve it on `<dir>/agent.sock` with exactly the permissions and packages the compiled executable
 * of that deployment gets.
 */
export async function agentDeployment(
  dir: string,
  raw: Record<string, unknown>,
  { socket = join(dir, "agent.sock"), cwd = Deno.cwd() }: { socket?: string; cwd?: string } = {},
): Promise<{ socket: string; configPath: string; args: string[] }> {
  const configPath = join(dir, "config.json");
  await Deno.writeTextFile(configPath, JSON.stringify(raw));
  const config = parseConfig(raw, "config", cwd).config;
  const flags = agentPermissionFlags({ socketPath: socket, configPath, config });
  return {
    socket,
    configPath,
    args: ["run", "--config", COMPILE_CONFIG, ...flags, MAIN, "serve", "-a", socket, "-c", configPath],
  };
}

export async function startAgent(options: StartOptions = {}): Promise<AgentProcess> {
  const dir = options.dir ?? await Deno.makeTempDir({ prefix: "edge-agent-test-" });
  const modelsDir = join(dir, "models");
  await Deno.mkdir(modelsDir, { recursive: true });
  const deployment = await agentDeployment(dir, {
    edge_agent_model_roots: [modelsDir],
    edge_agent_state_dir: join(dir, "state"),
    sagemaker_edge_core_root_certs_path: (await testTrust()).rootFile,
    ...options.config,
  }, { socket: options.socket, cwd: options.cwd });
  const { socket } = deployment;
  // A compiled agent has its permissions and entry point built in; it takes the serve arguments only.
  const args = options.compiled ? deployment.args.slice(deployment.args.indexOf(MAIN) + 1) : deployment.args;
  const [command, ...prefix] = [...(options.wrapper ?? []), options.deno ?? Deno.execPath()];
  const process = new Deno.Command(command, {
    args: [...prefix, ...args, ...(options.serveArgs ?? [])],
    env: options.env,
    clearEnv: options.clearEnv,
    cwd: options.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  })
    .spawn();
  const output = collect(process);
  const ready = await waitForLine(output, (line) => line.includes('"msg":"serving"'), process);
  if (!ready) {
    const status = await process.status;
    throw new Error(`agent exited (${status.code}) before serving:\n${output.text()}`);
  }
  const client = new AgentClient(socket);
  let stopped: Promise<Deno.CommandStatus> | null = null;
  return {
    dir,
    socket,
    modelsDir,
    client,
    process,
    logs: output.text,
    async logged(match, what, timeoutMs = 30_000) {
      const deadline = performance.now() + timeoutMs;
      // Each line is parsed once; lines that are not the agent's own (not JSON) are passed over.
      for (let next = 0;;) {
        for (; next < output.lines.length; next++) {
          const text = output.lines[next];
          const line = text.startsWith("{") ? JSON.parse(text) as LogLine : null;
          if (line && match(line)) return line;
        }
        if (performance.now() > deadline) throw new Error(`no log line ${what} in ${timeoutMs} ms:\n${output.text()}`);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    },
    stop(signal: Deno.Signal = "SIGTERM") {
      if (!stopped) {
        client.close();
        try {
          process.kill(signal);
        } catch { /* already exited */ }
        stopped = Promise.all([process.status, output.done]).then(([status]) => status);
      }
      return stopped;
    },
  };
}

interface Collected {
  text(): string;
  lines: string[];
  done: Promise<void>;
  changed: EventTarget;
}

function collect(process: Deno.ChildProcess): Collected {
  const chunks: string[] = [];
  const lines: string[] = [];
  const changed = new EventTarget();
  // Each stream has its own decoder and partial line: a chunk of stdout must not split a stderr line.
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    let partial = "";
    for await (const chunk of stream) {
      const text = decoder.decode(chunk, { stream: true });
      chunks.push(text);
      partial += text;
      const parts = partial.split("\n");
      partial = parts.pop()!;
      lines.push(...parts);
      changed.dispatchEvent(new Event("line"));
    }
  };
  const done = Promise.all([drain(process.stderr), drain(process.stdout)]).then(() => {
    changed.dispatchEvent(new Event("line"));
  });
  return { text: () => chunks.join(""), lines, done, changed };
}

/** Resolves true once a line matches, false if the process's output ends first. */
function waitForLine(
  output: Collected,
  match: (line: string) => boolean,
  process: Deno.ChildProcess,
): Promise<boolean> {
  return new Promise((resolve) => {
    let finished = false;
    const check = () => {
      if (output.lines.some(match)) resolve(true);
      else if (finished) resolve(false);
    };
    output.changed.addEventListener("line", check);
    output.done.then(() => {
      finished = true;
      check();
    });
    process.status.then(() =>
      setTimeout(() => {
        finished = true;
        check();
      }, 200)
    );
    check();
  });
}

/** Runs `fn` against a fresh agent, then checks it stops cleanly (exit 0) and removes its folder. */
export async function withAgent(options: StartOptions, fn: (agent: AgentProcess) => Promise<void>): Promise<void> {
  const agent = await startAgent(options);
  let failure: unknown = null;
  try {
    await fn(agent);
  } catch (error) {
    failure = error;
  }
  const status = await agent.stop();
  await Deno.remove(agent.dir, { recursive: true });
  if (failure) throw failure;
  if (status.code !== 0) throw new Error(`agent exited with ${status.code}:\n${agent.logs()}`);
}

/**
 * The agent's own log lines that `match` accepts (lines that are not JSON, such as ONNX Runtime's, passed
 * over), once `ready` holds for them: a line written before an answer may arrive after it.
 */
export async function loggedLines(
  agent: AgentProcess,
  match: (line: LogLine) => boolean,
  ready: (lines: LogLine[]) => boolean,
  what: string,
): Promise<LogLine[]> {
  const lines = () =>
    agent.logs().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as LogLine).filter(match);
  await agent.logged(() => ready(lines()), what);
  return lines();
}

/** Log lines of the agent parsed as JSON (every line must be JSON). */
export function parseLogs(text: string): Record<string, unknown>[] {
  return text.split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l));
}
