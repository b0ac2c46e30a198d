// Python with Debian's gRPC (python3-grpcio, python3-grpc-tools, python3-numpy): the second-language
// client of the tests and the benchmark, with stubs generated from proto/agent.proto.

import { join } from "node:path";

export const PYTHON = "/usr/bin/python3";
const PROTO_DIR = new URL("../../proto/", import.meta.url).pathname;

/** Why this machine cannot run the Python gRPC client, or null. */
export async function pythonGrpcMissing(): Promise<string | null> {
  try {
    const { success, stderr } = await new Deno.Command(PYTHON, {
      args: ["-c", "import grpc, grpc_tools.protoc, numpy"],
      stdout: "null",
      stderr: "piped",
    }).output();
    if (success) return null;
    const lastLine = new TextDecoder().decode(stderr).trim().split("\n").pop();
    return `${PYTHON} lacks grpc, grpc_tools or numpy (${lastLine})`;
  } catch (error) {
    return `${PYTHON} cannot be run (${(error as Error).message})`;
  }
}

/**
 * Generates <name>_pb2*.py from proto/agent.proto (and any further `protos`) into `<dir>/stubs`;
 * returns that folder.
 */
export async function generateStubs(dir: string, protos: string[] = []): Promise<string> {
  const stubs = join(dir, "stubs");
  await Deno.mkdir(stubs);
  const { success, stderr } = await new Deno.Command(PYTHON, {
    args: [
      "-m",
      "grpc_tools.protoc",
      `-I${PROTO_DIR}`,
      `--python_out=${stubs}`,
      `--grpc_python_out=${stubs}`,
      ...["agent.proto", ...protos].map((name) => join(PROTO_DIR, name)),
    ],
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!success) throw new Error(`grpc_tools.protoc failed:\n${new TextDecoder().decode(stderr)}`);
  return stubs;
}
