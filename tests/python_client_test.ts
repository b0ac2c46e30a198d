// Wire compatibility with a client in another language: Python grpcio, with stubs generated from
// proto/agent.proto at test time, drives the real agent over its Unix socket. What it observes must
// match what the Deno AgentClient gets from the same agent and what onnxruntime-node computes.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { type AgentProcess, type LogLine, parseLogs, PROJECT_ROOT, startAgent } from "./helpers/agent.ts";
import { floats } from "./helpers/assertions.ts";
import { generateStubs, PYTHON, pythonGrpcMissing } from "./helpers/python.ts";
import { identityModel, OnnxType, PADDLE_CLS, writeModelFolder } from "./helpers/onnx_models.ts";
import { enumValues, type Model, type TensorMetadata } from "../src/service/wire.ts";

const CLIENT = join(PROJECT_ROOT, "tests/python/edge_client.py");
const FLOAT32 = 5;
const INPUT_SHAPE = [1, 3, 48, 192];
const OUTPUT_NAME = "softmax_0.tmp_0";
const TOLERANCE = 1e-5;
const DATA_TYPE_NAMES = Object.fromEntries(
  Object.entries(enumValues("DataType")).map(([name, value]) => [value, name]),
);

const skipReason = await pythonGrpcMissing();
if (skipReason) console.log(`python_client_test skipped: ${skipReason}`);

/** A smooth, varied image-like input in [-1, 1] (PaddleOCR's normalized range). */
function makeInput(): Float32Array {
  const [, c, h, w] = INPUT_SHAPE;
  const data = new Float32Array(c * h * w);
  for (let ch = 0; ch < c; ch++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        data[(ch * h + y) * w + x] = Math.sin(x * 0.21 + ch) * Math.cos(y * 0.37 - ch * 0.5);
      }
    }
  }
  return data;
}

async function run(command: string, args: string[], timeoutMs: number): Promise<string> {
  const result = await new Deno.Command(command, {
    args,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(timeoutMs),
  }).output();
  const stdout = new TextDecoder().decode(result.stdout);
  if (!result.success) {
    const stderr = new TextDecoder().decode(result.stderr);
    throw new Error(`${command} ${args.join(" ")} failed (${result.code}):\n${stdout}\n${stderr}`);
  }
  return stdout;
}

interface PyMetadata {
  name: string;
  data_type: number;
  data_type_name: string;
  shape: number[];
}
interface PyModel {
  url: string;
  name: string;
  inputs: PyMetadata[];
  outputs: PyMetadata[];
}
interface Observed {
  list_before: PyModel[];
  loaded: PyModel;
  described: PyModel;
  list_loaded: PyModel[];
  outputs: (PyMetadata & { data: string; values?: number[] })[];
  list_after: PyModel[];
  unknown_model_error: { code: string; details: string };
}

/** A Deno-side Model in the shape the Python script prints, to compare the two directly. */
function asPyModel(model: Model): PyModel {
  const meta = (m: TensorMetadata) => ({
    name: new TextDecoder().decode(m.name),
    data_type: m.data_type,
    data_type_name: DATA_TYPE_NAMES[m.data_type],
    shape: [...m.shape],
  });
  return {
    url: model.url,
    name: model.name,
    inputs: model.input_tensor_metadatas.map(meta),
    outputs: model.output_tensor_metadatas.map(meta),
  };
}

function assertClose(actual: number[], expected: number[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  actual.forEach((v, i) => {
    assert.ok(Math.abs(v - expected[i]) <= TOLERANCE, `${what}[${i}]: ${v} vs ${expected[i]}`);
  });
}

Deno.test({
  name: "a Python grpcio client with stubs from proto/agent.proto gets the same results as the Deno client and ORT",
  ignore: skipReason !== null,
  async fn() {
    const work = await Deno.makeTempDir({ prefix: "edge-agent-python-" });
    let agent: AgentProcess | null = null;
    try {
      const stubs = await generateStubs(work);

      const input = makeInput();
      const inputBytes = new Uint8Array(input.buffer);
      const inputPath = join(work, "input.bin");
      await Deno.writeFile(inputPath, inputBytes);

      // Verbose: the Predict log line says whether the input was copied.
      agent = await startAgent({ dir: join(work, "agent"), config: { sagemaker_edge_log_verbose: true } });
      const modelUrl = await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));

      const stdout = await run(PYTHON, [
        CLIENT,
        `--stubs=${stubs}`,
        `--socket=${agent.socket}`,
        `--model-url=${modelUrl}`,
        "--name=cls",
        `--input=${inputPath}`,
        "--input-name=x",
        `--shape=${INPUT_SHAPE.join(",")}`,
      ], 120_000);
      const py = JSON.parse(stdout) as Observed;

      // Lifecycle as Python saw it.
      const expectedModel: PyModel = {
        url: modelUrl,
        name: "cls",
        inputs: [{ name: "x", data_type: FLOAT32, data_type_name: "FLOAT32", shape: [-1, 3, -1, -1] }],
        outputs: [{ name: OUTPUT_NAME, data_type: FLOAT32, data_type_name: "FLOAT32", shape: [-1, 2] }],
      };
      assert.deepEqual(py.list_before, []);
      assert.deepEqual(py.loaded, expectedModel);
      assert.deepEqual(py.described, expectedModel);
      assert.deepEqual(py.list_loaded, [expectedModel]);
      assert.deepEqual(py.list_after, []);
      assert.equal(py.unknown_model_error.code, "NOT_FOUND", py.unknown_model_error.details);

      assert.equal(py.outputs.length, 1);
      const [pyOut] = py.outputs;
      assert.deepEqual(
        { name: pyOut.name, data_type: pyOut.data_type, shape: pyOut.shape, data: pyOut.data },
        { name: OUTPUT_NAME, data_type: FLOAT32, shape: [1, 2], data: "byte_data" },
      );
      const pyValues = pyOut.values!;
      assert.equal(pyValues.length, 2);
      // A softmax: a wrong byte order or offset would not sum to one.
      assertClose([pyValues[0] + pyValues[1]], [1], "softmax sum");
      // grpcio packs the shape, which leaves the tensor's bytes at an odd offset of the message: the
      // agent placed the message so they are aligned, and ORT read them where they arrived.
      const isPredict = (l: LogLine) => l.msg === "rpc" && l.rpc === "Predict" && l.code === "OK";
      await agent.logged(isPredict, "of the Python client's Predict");
      const predicts = parseLogs(agent.logs()).filter(isPredict);
      assert.equal(predicts.length, 1);
      assert.equal(predicts[0].copiedInputs, 0, "the input was copied");

      // The Deno client, same agent, same input, same model folder (Python unloaded it).
      const loaded = await agent.client.loadModel(modelUrl, "cls");
      assert.deepEqual(asPyModel(loaded.model), expectedModel);
      const response = await agent.client.predict("cls", [{
        tensor_metadata: { name: new TextEncoder().encode("x"), data_type: FLOAT32, shape: INPUT_SHAPE },
        byte_data: inputBytes,
      }]);
      assert.equal(response.tensors.length, 1);
      const denoOut = response.tensors[0];
      assert.equal(new TextDecoder().decode(denoOut.tensor_metadata!.name), OUTPUT_NAME);
      assert.equal(denoOut.tensor_metadata!.data_type, FLOAT32);
      assert.deepEqual([...denoOut.tensor_metadata!.shape], [1, 2]);
      assertClose(pyValues, [...floats(denoOut.byte_data)], "python vs deno client");
      await agent.client.unloadModel("cls");

      // onnxruntime-node in-process: the reference the agent's FFI path must agree with.
      const session = await ort.InferenceSession.create(PADDLE_CLS);
      try {
        const results = await session.run({ x: new ort.Tensor("float32", input, INPUT_SHAPE) });
        const reference = results[OUTPUT_NAME];
        assert.deepEqual([...reference.dims], [1, 2]);
        assertClose(pyValues, Array.from(reference.data as Float32Array), "python vs onnxruntime-node");
      } finally {
        await session.release();
      }
    } catch (error) {
      if (agent) console.error(`agent logs:\n${agent.logs()}`);
      throw error;
    } finally {
      await agent?.stop();
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "a Python client predicts through SysV (ctypes shmget/shmat) and POSIX (multiprocessing.shared_memory) segments",
  ignore: skipReason !== null,
  async fn() {
    const work = await Deno.makeTempDir({ prefix: "edge-agent-python-shm-" });
    const posixPrefix = `/edge_agent_py_${Deno.pid}_`;
    let agent: AgentProcess | null = null;
    try {
      const stubs = await generateStubs(work);
      agent = await startAgent({
        dir: join(work, "agent"),
        config: { edge_agent_shared_memory: "both", edge_agent_shm_posix_prefix: posixPrefix },
      });
      const folder = await writeModelFolder(agent.modelsDir, "id", identityModel(OnnxType.FLOAT, ["n", 3]));
      await agent.client.loadModel(folder, "id");
      const stdout = await run(PYTHON, [
        join(PROJECT_ROOT, "tests/python/shm_client.py"),
        `--stubs=${stubs}`,
        `--socket=${agent.socket}`,
        "--model=id",
        `--posix-prefix=${posixPrefix}`,
      ], 60_000);
      const observed = JSON.parse(stdout) as Record<"sysv" | "posix", { input: number[]; output: number[] }>;
      for (const kind of ["sysv", "posix"] as const) {
        assert.equal(observed[kind].output.length, 6, kind);
        assert.deepEqual(observed[kind].output, observed[kind].input, kind);
      }
      assert.notDeepEqual(observed.sysv.output, observed.posix.output);
    } catch (error) {
      if (agent) console.error(`agent logs:\n${agent.logs()}`);
      throw error;
    } finally {
      await agent?.stop();
      await Deno.remove(work, { recursive: true });
    }
  },
});
