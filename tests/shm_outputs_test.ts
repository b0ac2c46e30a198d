// Outputs by shared memory (PredictRequest.output_locations): the real agent, a Python grpcio client
// over the real Unix socket, real SysV segments and POSIX objects. Every output written into a segment
// must equal the bytes the same request gets back without output_locations, and nothing outside the
// output's bytes, or anything at all on an error, may change in the client's segment.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Status } from "../src/errors.ts";
import { AgentClient } from "../src/client/client.ts";
import { enumValues } from "../src/service/wire.ts";
import { type AgentProcess, loggedLines, PROJECT_ROOT, startAgent } from "./helpers/agent.ts";
import { floats, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";
import {
  addSubModel,
  buildModel,
  OnnxType,
  PADDLE_CLS,
  PADDLE_DET,
  slowModel,
  writeModelFolder,
} from "./helpers/onnx_models.ts";
import { sysvAttachments, SysvSegment } from "./helpers/shm_segments.ts";

const CLIENT = join(PROJECT_ROOT, "tests/python/shm_outputs_client.py");
const DataType = enumValues("DataType");
const DET_OUTPUT_BYTES = 640 * 640 * 4;

const pythonMissing = await pythonGrpcMissing();
if (pythonMissing) console.log(`shm_outputs_test: the grpcio cases are skipped: ${pythonMissing}`);

/**
 * As root the agent runs without the capabilities that bypass IPC and file permissions, so a read-only
 * segment is read-only to it as to any other user.
 */
const UNPRIVILEGED = Deno.uid() === 0
  ? ["setpriv", "--bounding-set=-ipc_owner,-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
  : undefined;

/** Stubs from Edge Manager's agent.proto: ours without the additions to PredictRequest. */
async function edgeManagerStubs(dir: string): Promise<string> {
  const proto = await Deno.readTextFile(join(PROJECT_ROOT, "proto/agent.proto"));
  const original = proto.replace(/^\s*repeated OutputLocation output_locations = 3;\n/m, "");
  assert.notEqual(original, proto, "the addition to PredictRequest is where this test expects it");
  const protoDir = join(dir, "em-proto");
  const stubs = join(dir, "em-stubs");
  await Deno.mkdir(protoDir);
  await Deno.mkdir(stubs);
  await Deno.writeTextFile(join(protoDir, "agent.proto"), original);
  const { success, stderr } = await new Deno.Command(PYTHON, {
    args: [
      "-m",
      "grpc_tools.protoc",
      `-I${protoDir}`,
      `--python_out=${stubs}`,
      `--grpc_python_out=${stubs}`,
      "agent.proto",
    ],
    stderr: "piped",
  }).output();
  assert.ok(success, new TextDecoder().decode(stderr));
  return stubs;
}

async function loadModels(agent: AgentProcess): Promise<void> {
  const { client, modelsDir } = agent;
  await client.loadModel(await writeModelFolder(modelsDir, "det", await Deno.readFile(PADDLE_DET)), "det");
  await client.loadModel(await writeModelFolder(modelsDir, "cls", await Deno.readFile(PADDLE_CLS)), "cls");
  await client.loadModel(await writeModelFolder(modelsDir, "addsub", addSubModel()), "addsub");
}

// deno-lint-ignore no-explicit-any
type Json = any;

const hex = (values: number[]) =>
  Array.from(new Uint8Array(Float32Array.from(values).buffer), (b) => b.toString(16).padStart(2, "0")).join("");

/** The agent's debug line of each OK Predict, in order, once `ready` holds for them. */
function predictLogsOnce(agent: AgentProcess, ready: (logs: Json[]) => boolean, what: string): Promise<Json[]> {
  const isOkPredict = (l: Json) => l.msg === "rpc" && l.rpc === "Predict" && l.code === "OK";
  return loggedLines(agent, isOkPredict, ready, what) as Promise<Json[]>;
}

/** Runs the Python client; its JSON output. */
async function python(args: string[]): Promise<Json> {
  const { success, stdout, stderr } = await new Deno.Command(PYTHON, {
    args: [CLIENT, ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  assert.ok(success, new TextDecoder().decode(stderr));
  return JSON.parse(new TextDecoder().decode(stdout));
}

for (const kind of ["sysv", "posix"] as const) {
  Deno.test({
    name: `outputs by ${kind === "sysv" ? "SysV" : "POSIX"} shared memory from grpcio`,
    ignore: pythonMissing !== null,
    async fn() {
      const prefix = `/edge_agent_out_${Deno.pid}_`;
      const agent = await startAgent({
        config: {
          edge_agent_shared_memory: kind,
          edge_agent_shm_posix_prefix: prefix,
          sagemaker_edge_log_verbose: true,
        },
        wrapper: UNPRIVILEGED,
      });
      try {
        await loadModels(agent);
        const detInput = join(agent.dir, "det-input.bin");
        const input = pseudoRandomFloats(3 * 640 * 640, 2);
        await Deno.writeFile(detInput, new Uint8Array(input.buffer));
        const r = await python([
          ...["--stubs", await generateStubs(agent.dir), "--socket", agent.socket],
          ...["--kind", kind, "--posix-prefix", prefix, "--det-input", detInput],
        ]);
        const em = await python([
          "--stubs",
          await edgeManagerStubs(agent.dir),
          "--socket",
          agent.socket,
          "--edge-manager",
        ]);

        // det, inputs and outputs by shared memory: the output equals the bytes path exactly, the response
        // points at it and carries no bytes, and the 64 sentinel bytes around it are untouched.
        const detBytes = r.det.bytes.tensors[0];
        assert.equal(detBytes.data, "byte_data");
        assert.equal(detBytes.hex.length, 2 * DET_OUTPUT_BYTES);
        for (const round of r.det.shm) {
          const [out] = round.answer.tensors;
          assert.deepEqual(
            { name: out.name, shape: out.shape, data: out.data, handle: out.handle },
            {
              name: detBytes.name,
              shape: detBytes.shape,
              data: "shared_memory_handle",
              handle: { segment_id: r.det.segment_id, offset: 64, size: DET_OUTPUT_BYTES },
            },
          );
          assert.ok(round.segment.hex === detBytes.hex, "det's output in shared memory equals its bytes");
          assert.ok(round.segment.untouched_outside, "nothing written outside the output");
        }
        // cls: a dynamic output shape, by index 0, size 0 (up to the end of an 8-byte segment).
        assert.equal(r.cls.shm.tensors[0].data, "shared_memory_handle");
        assert.deepEqual(r.cls.shm.tensors[0].handle.size, 8);
        assert.equal(r.cls.segment.hex, r.cls.bytes.tensors[0].hex);

        // One request, "sum" into shared memory and "diff" as bytes.
        const [sum, diff] = r.mixed.answer.tensors;
        assert.deepEqual(sum, {
          name: "sum",
          shape: [2, 2],
          data: "shared_memory_handle",
          handle: { segment_id: r.mixed.segment_id, offset: 16, size: 16 },
        });
        assert.equal(r.mixed.segment.hex, hex([11, 22, 33, 44]));
        assert.ok(r.mixed.segment.untouched_outside);
        assert.deepEqual(diff, { name: "diff", shape: [2, 2], data: "byte_data", hex: hex([-9, -18, -27, -36]) });
        assert.deepEqual(r.both_outputs.answer.tensors.map((t: Json) => t.handle.offset), [0, 16]);
        assert.equal(r.both_outputs.segment.hex, hex([11, 22, 33, 44, -9, -18, -27, -36]));

        const refused = (
          answer: Json,
          code: keyof typeof Status,
          message: RegExp,
        ) => {
          assert.equal(answer.code, code, JSON.stringify(answer));
          assert.match(answer.details, message);
        };
        refused(
          r.too_small_fixed.answer,
          "INVALID_ARGUMENT",
          /output "sum": shape \[2,2\] of FLOAT32 needs 16 bytes, but shared_memory_handle gives 12 bytes of room at offset 0 in segment \d+ \(size 12\)/,
        );
        refused(
          r.too_small_end.answer,
          "INVALID_ARGUMENT",
          /needs 16 bytes, but .* gives 8 bytes of room at offset 56/,
        );
        refused(
          r.too_small_dynamic.answer,
          "INVALID_ARGUMENT",
          /output "softmax_0.tmp_0": shape \[1,2\] of FLOAT32 needs 8 bytes, but .* gives 4 bytes/,
        );
        refused(r.too_small_with_other.answer, "INVALID_ARGUMENT", /output "diff": .* needs 16 bytes/);
        for (
          const c of ["too_small_fixed", "too_small_end", "too_small_dynamic", "too_small_with_other", "read_only"]
        ) {
          assert.ok(r[c].untouched, `${c}: the segment is untouched`);
        }
        const segmentName = kind === "sysv"
          ? `segment ${r.read_only.segment_id}`
          : `shared memory object ${prefix}\\d+`;
        refused(
          r.read_only.answer,
          "PERMISSION_DENIED",
          new RegExp(`output "sum": the agent may not write ${segmentName} .*grant .* write access`),
        );
        assert.equal(r.revoked.granted.code, "OK");
        refused(r.revoked.denied, "PERMISSION_DENIED", /output "sum": the agent may not write/);
        assert.ok(r.revoked.untouched, "nothing written once write access is taken away");
        refused(
          r.gone.answer,
          "INVALID_ARGUMENT",
          new RegExp(
            `output "sum": ${
              kind === "sysv" ? "segment " : `shared memory object ${prefix}`
            }${r.gone.segment_id} not found`,
          ),
        );
        const [wrapsTo4, wrapsTo0, hugeSize, offsetPastEnd] = r.overflow.answers;
        refused(
          wrapsTo4,
          "INVALID_ARGUMENT",
          /offset 18446744073709551604 \+ 16 bytes runs past the end of segment \d+, which holds 64 bytes/,
        );
        refused(
          wrapsTo0,
          "INVALID_ARGUMENT",
          /offset 9223372036854775808 \+ 9223372036854775808 bytes runs past the end/,
        );
        refused(hugeSize, "INVALID_ARGUMENT", /offset 16 \+ 18446744073709551615 bytes runs past the end/);
        refused(
          offsetPastEnd,
          "INVALID_ARGUMENT",
          /offset 18446744073709551600 runs past the end of segment \d+, which holds 64/,
        );
        assert.ok(r.overflow.untouched);
        refused(
          r.unknown_output,
          "INVALID_ARGUMENT",
          /output "product"\): model addsub has no output of that name \(outputs: sum, diff\)/,
        );
        refused(r.index_out_of_range, "INVALID_ARGUMENT", /index 2, but model addsub has 2 output\(s\)/);
        refused(r.twice, "INVALID_ARGUMENT", /output "sum": output_locations names it twice/);
        refused(
          r.overlap,
          "INVALID_ARGUMENT",
          /output "diff": its room \[8, 24\) in segment \d+ overlaps output "sum"'s/,
        );
        refused(r.misaligned, "INVALID_ARGUMENT", /offset 2 in segment \d+ is not a multiple of the element size 4/);
        assert.ok(r.overlap_untouched);

        // Edge Manager's client: the same request bytes as ours, and outputs as bytes.
        assert.equal(em.has_output_locations, false);
        assert.equal(em.request_hex, r.addsub_request_hex);
        assert.deepEqual(em.tensors, [
          { name: "sum", data: "byte_data", hex: hex([11, 22, 33, 44]) },
          { name: "diff", data: "byte_data", hex: hex([-9, -18, -27, -36]) },
        ]);

        // det's output shape is dynamic: copied after the first Run, written in place by ORT once known.
        const isDet = (l: Json) => l.sharedMemoryOutputs > 0 && l.sharedMemoryInputs > 0;
        const isAddsub = (l: Json) => l.sharedMemoryOutputs === 2;
        const all = await predictLogsOnce(
          agent,
          (logs) => logs.filter(isDet).length >= 2 && logs.filter(isAddsub).length >= 1,
          "for det's two Predicts and addsub's",
        );
        const logs = all.filter(isDet);
        assert.deepEqual(logs.map((l) => l.copiedOutputs), [1, 0], "det: copied, then written in place");
        // addsub's shapes are fixed: always in place.
        const fixed = all.filter(isAddsub);
        assert.deepEqual(fixed.map((l) => l.copiedOutputs), [0]);
      } finally {
        const status = await agent.stop();
        await Deno.remove(agent.dir, { recursive: true });
        assert.equal(status.code, 0, agent.logs());
      }
    },
  });
}

Deno.test("the agent's own client asks for outputs in shared memory; a cancelled Run detaches them once", async () => {
  const segments: SysvSegment[] = [];
  // Attached per request, so the attachment count shows when the agent lets go.
  const agent = await startAgent({ config: { edge_agent_sysv_keep_attached_seconds: 0 } });
  const client = new AgentClient(agent.socket);
  try {
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    const out = new SysvSegment(32);
    segments.push(out);
    const { tensors } = await client.predict("addsub", [
      tensor("a", DataType.FLOAT32, [2, 2], Float32Array.of(1, 2, 3, 4)),
      tensor("b", DataType.FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1)),
    ], [{ name: "diff", shared_memory_handle: { segment_id: out.id, offset: 16, size: 16 } }]);
    assert.deepEqual([...floats(tensors[0].byte_data)], [2, 3, 4, 5]);
    assert.equal(tensors[1].data, "shared_memory_handle");
    assert.equal(String(tensors[1].shared_memory_handle!.size), "16");
    assert.deepEqual([...floats(out.read(16, 16))], [0, 1, 2, 3]);
    assert.equal(sysvAttachments(out.id), 1, "only this test's attachment is left");

    // A Run cancelled by its deadline, writing into a segment: the agent detaches it, once.
    const n = 512;
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "slow", slowModel(n, 60)), "slow");
    const slowOut = new SysvSegment(n * n * 4);
    segments.push(slowOut);
    const x = new Float32Array(n * n);
    const request = {
      name: "slow",
      tensors: [tensor("x", DataType.FLOAT32, [n, n], x)],
      output_locations: [{ index: 0, shared_memory_handle: { segment_id: slowOut.id, offset: 0, size: 0 } }],
    };
    await rejectsWith(client.call("Predict", request, 50), Status.DEADLINE_EXCEEDED);
    for (let i = 0; i < 100 && sysvAttachments(slowOut.id) !== 1; i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(sysvAttachments(slowOut.id), 1, "the agent detached the cancelled Run's segment");
    // It still serves, into the same segment.
    x.fill(3);
    const done = await client.predict("slow", request.tensors, request.output_locations);
    assert.equal(done.tensors[0].data, "shared_memory_handle");
    assert.deepEqual([...floats(slowOut.read(0, 16))], [3, 3, 3, 3]);
    assert.equal(sysvAttachments(slowOut.id), 1);
  } finally {
    client.close();
    const status = await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    for (const segment of segments) segment.remove();
    assert.equal(status.code, 0, agent.logs());
  }
});

Deno.test("an output may not overlap an input read from the same segment", async () => {
  const segments: SysvSegment[] = [];
  const agent = await startAgent();
  try {
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "addsub", addSubModel()), "addsub");
    const shared = new SysvSegment(64).write(0, Float32Array.of(1, 2, 3, 4));
    segments.push(shared);
    const a = {
      tensor_metadata: { name: new TextEncoder().encode("a"), data_type: DataType.FLOAT32, shape: [2, 2] },
      shared_memory_handle: { segment_id: shared.id, offset: 0, size: 0 },
    };
    const b = tensor("b", DataType.FLOAT32, [2, 2], Float32Array.of(1, 1, 1, 1));
    await rejectsWith(
      agent.client.predict("addsub", [a, b], [{
        name: "sum",
        shared_memory_handle: { segment_id: shared.id, offset: 8, size: 16 },
      }]),
      Status.INVALID_ARGUMENT,
      /output "sum": its room \[8, 24\) in segment \d+ overlaps tensor "a"'s/,
    );
    // Right after the input: fine.
    await agent.client.predict("addsub", [a, b], [{
      name: "sum",
      shared_memory_handle: { segment_id: shared.id, offset: 16, size: 16 },
    }]);
    assert.deepEqual([...floats(shared.read(16, 16))], [2, 3, 4, 5]);
  } finally {
    const status = await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    for (const segment of segments) segment.remove();
    assert.equal(status.code, 0, agent.logs());
  }
});

Deno.test("an output whose shape changes for the same input shapes is still right: ORT refuses the old shape, the agent copies", async () => {
  const segments: SysvSegment[] = [];
  const agent = await startAgent({ config: { sagemaker_edge_log_verbose: true } });
  try {
    // NonZero: the output's shape [1, k] depends on the input's values, not only on its shape.
    const model = buildModel({
      inputs: [["x", OnnxType.FLOAT, [4]]],
      outputs: [["y", OnnxType.INT64, [1, "k"]]],
      nodes: [{ op: "NonZero", inputs: ["x"], outputs: ["y"] }],
    });
    await agent.client.loadModel(await writeModelFolder(agent.modelsDir, "nonzero", model), "nonzero");
    const out = new SysvSegment(32);
    segments.push(out);
    const predict = (values: number[]) =>
      agent.client.predict("nonzero", [tensor("x", DataType.FLOAT32, [4], Float32Array.from(values))], [{
        shared_memory_handle: { segment_id: out.id, offset: 0, size: 0 },
      }]);
    const indexes = async (values: number[]) => {
      const { tensors } = await predict(values);
      const size = Number(tensors[0].shared_memory_handle!.size);
      return { shape: tensors[0].tensor_metadata!.shape, values: [...new BigInt64Array(out.read(0, size).buffer)] };
    };
    assert.deepEqual(await indexes([0, 5, 0, 7]), { shape: [1, 2], values: [1n, 3n] });
    assert.deepEqual(await indexes([0, 0, 0, 9]), { shape: [1, 1], values: [3n] });
    assert.deepEqual(await indexes([1, 2, 0, 3]), { shape: [1, 3], values: [0n, 1n, 3n] });
    assert.deepEqual(await indexes([1, 2, 0, 3]), { shape: [1, 3], values: [0n, 1n, 3n] });
    const copied = (await predictLogsOnce(agent, (logs) => logs.length >= 4, "for four Predicts")).map((l) =>
      l.copiedOutputs
    );
    // The shape seen first is tried once, refused by ORT, and then never preallocated for these inputs again.
    assert.deepEqual(copied, [1, 1, 1, 1]);
  } finally {
    const status = await agent.stop();
    await Deno.remove(agent.dir, { recursive: true });
    for (const segment of segments) segment.remove();
    assert.equal(status.code, 0, agent.logs());
  }
});
