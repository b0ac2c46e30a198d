// Every rpc and status code of the Agent service, against the real agent over its Unix socket.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as ort from "onnxruntime-node";
import { Status } from "../src/errors.ts";
import { enumValues, SERVICE_NAME } from "../src/service/wire.ts";
import { startAgent } from "./helpers/agent.ts";
import { signPackage } from "./helpers/signing.ts";
import { floats, nameOf, pseudoRandomFloats, rejectsWith, tensor } from "./helpers/assertions.ts";
import {
  addSubModel,
  identityModel,
  OnnxType,
  PADDLE_CLS,
  PADDLE_DET,
  stringModel,
  writeModelFolder,
} from "./helpers/onnx_models.ts";

const DataType = enumValues("DataType");

/** Wire DataType -> ONNX element type and a typed-array sample of that type's bytes. */
const TYPE_CASES: { name: string; onnx: number; sample: (n: number) => ArrayBufferView }[] = [
  { name: "UINT8", onnx: OnnxType.UINT8, sample: (n) => Uint8Array.from({ length: n }, (_, i) => 250 - i) },
  { name: "INT16", onnx: OnnxType.INT16, sample: (n) => Int16Array.from({ length: n }, (_, i) => -300 * i) },
  { name: "INT32", onnx: OnnxType.INT32, sample: (n) => Int32Array.from({ length: n }, (_, i) => -70000 * i) },
  {
    name: "INT64",
    onnx: OnnxType.INT64,
    sample: (n) => BigInt64Array.from({ length: n }, (_, i) => -(2n ** 40n) * BigInt(i)),
  },
  { name: "FLOAT16", onnx: OnnxType.FLOAT16, sample: (n) => Uint16Array.from({ length: n }, (_, i) => 0x3c00 + i) },
  { name: "FLOAT32", onnx: OnnxType.FLOAT, sample: (n) => Float32Array.from({ length: n }, (_, i) => i / 3 - 1) },
  { name: "FLOAT64", onnx: OnnxType.DOUBLE, sample: (n) => Float64Array.from({ length: n }, (_, i) => Math.PI * i) },
  { name: "INT8", onnx: OnnxType.INT8, sample: (n) => Int8Array.from({ length: n }, (_, i) => -i) },
  { name: "UINT16", onnx: OnnxType.UINT16, sample: (n) => Uint16Array.from({ length: n }, (_, i) => 65000 + i) },
  { name: "UINT32", onnx: OnnxType.UINT32, sample: (n) => Uint32Array.from({ length: n }, (_, i) => 4e9 + i) },
  {
    name: "UINT64",
    onnx: OnnxType.UINT64,
    sample: (n) => BigUint64Array.from({ length: n }, (_, i) => 2n ** 63n + BigInt(i)),
  },
  { name: "BOOL", onnx: OnnxType.BOOL, sample: (n) => Uint8Array.from({ length: n }, (_, i) => i % 2) },
  { name: "BFLOAT16", onnx: OnnxType.BFLOAT16, sample: (n) => Uint16Array.from({ length: n }, (_, i) => 0x3f80 + i) },
];

async function inProcess(modelPath: string, input: Float32Array, shape: number[]): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(modelPath);
  try {
    const result = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", input, shape) });
    return result[session.outputNames[0]].data as Float32Array;
  } finally {
    await session.release();
  }
}

function assertClose(actual: Float32Array, expected: Float32Array, tolerance: number): void {
  assert.equal(actual.length, expected.length, "element count");
  let worst = 0;
  for (let i = 0; i < actual.length; i++) worst = Math.max(worst, Math.abs(actual[i] - expected[i]));
  assert.ok(worst <= tolerance, `largest difference ${worst} exceeds ${tolerance}`);
}

Deno.test("Agent API over the Unix socket", async (t) => {
  const agent = await startAgent();
  const { client, modelsDir } = agent;
  try {
    const clsDir = join(modelsDir, "cls");
    await Deno.mkdir(clsDir);
    await Deno.copyFile(PADDLE_CLS, join(clsDir, "cls.onnx"));
    await signPackage(clsDir);
    // A single-file package: det.onnx signed as det.onnx.sig.
    await Deno.copyFile(PADDLE_DET, join(modelsDir, "det.onnx"));
    await signPackage(join(modelsDir, "det.onnx"));

    await t.step("ListModels is empty before any load", async () => {
      assert.deepEqual((await client.listModels()).models, []);
    });

    await t.step("LoadModel of a folder returns the model's tensor metadata from the session", async () => {
      const { model } = await client.loadModel(clsDir, "cls");
      assert.equal(model.name, "cls");
      assert.equal(model.url, clsDir);
      assert.equal(model.input_tensor_metadatas.length, 1);
      assert.equal(nameOf({ tensor_metadata: model.input_tensor_metadatas[0] }), "x");
      assert.equal(model.input_tensor_metadatas[0].data_type, DataType.FLOAT32);
      assert.deepEqual(model.input_tensor_metadatas[0].shape, [-1, 3, -1, -1]);
      assert.equal(nameOf({ tensor_metadata: model.output_tensor_metadatas[0] }), "softmax_0.tmp_0");
      assert.deepEqual(model.output_tensor_metadatas[0].shape, [-1, 2]);
    });

    await t.step("LoadModel of a file:// URL to a .onnx file", async () => {
      const { model } = await client.loadModel(`file://${join(modelsDir, "det.onnx")}`, "det");
      assert.deepEqual(model.input_tensor_metadatas[0].shape, [-1, 3, -1, -1]);
    });

    await t.step("ListModels and DescribeModel show loaded models", async () => {
      const names = (await client.listModels()).models.map((m) => m.name).sort();
      assert.deepEqual(names, ["cls", "det"]);
      const { model } = await client.describeModel("det");
      assert.equal(model.name, "det");
      assert.equal(model.url, `file://${join(modelsDir, "det.onnx")}`);
    });

    await t.step("Predict on PaddleOCR cls matches onnxruntime-node in-process", async () => {
      const shape = [1, 3, 48, 192];
      const input = pseudoRandomFloats(3 * 48 * 192, 7);
      const { tensors } = await client.predict("cls", [tensor("x", DataType.FLOAT32, shape, input)]);
      assert.equal(tensors.length, 1);
      assert.equal(nameOf(tensors[0]), "softmax_0.tmp_0");
      assert.equal(tensors[0].tensor_metadata!.data_type, DataType.FLOAT32);
      assert.deepEqual(tensors[0].tensor_metadata!.shape, [1, 2]);
      assertClose(floats(tensors[0].byte_data), await inProcess(PADDLE_CLS, input, shape), 1e-6);
    });

    await t.step("Predict matches by position when a tensor has no metadata name", async () => {
      const shape = [1, 3, 48, 96];
      const input = pseudoRandomFloats(3 * 48 * 96, 8);
      const { tensors } = await client.predict("cls", [tensor("", DataType.FLOAT32, shape, input)]);
      assertClose(floats(tensors[0].byte_data), await inProcess(PADDLE_CLS, input, shape), 1e-6);
    });

    await t.step("Predict with a request above gRPC's 4 MiB default (det at 640x640, 4.9 MB)", async () => {
      const shape = [1, 3, 640, 640];
      const input = pseudoRandomFloats(3 * 640 * 640, 9);
      const { tensors } = await client.predict("det", [tensor("x", DataType.FLOAT32, shape, input)]);
      assert.deepEqual(tensors[0].tensor_metadata!.shape, [1, 1, 640, 640]);
      assertClose(floats(tensors[0].byte_data), await inProcess(PADDLE_DET, input, shape), 1e-4);
    });

    await t.step("every DataType goes through an Identity model byte for byte", async () => {
      for (const [i, type] of TYPE_CASES.entries()) {
        const folder = await writeModelFolder(modelsDir, `id-${i}`, identityModel(type.onnx));
        const name = `identity-${type.name.toLowerCase()}`;
        const { model } = await client.loadModel(folder, name);
        assert.equal(model.input_tensor_metadatas[0].data_type, DataType[type.name], type.name);
        assert.deepEqual(model.input_tensor_metadatas[0].shape, [-1, 3]);
        const sample = type.sample(6);
        const { tensors } = await client.predict(name, [tensor("x", DataType[type.name], [2, 3], sample)]);
        assert.equal(nameOf(tensors[0]), "y");
        assert.equal(tensors[0].tensor_metadata!.data_type, DataType[type.name], type.name);
        assert.deepEqual(tensors[0].tensor_metadata!.shape, [2, 3]);
        assert.deepEqual(
          new Uint8Array(tensors[0].byte_data!),
          new Uint8Array(sample.buffer, sample.byteOffset, sample.byteLength),
          type.name,
        );
        await client.unloadModel(name);
      }
    });

    await t.step("Predict with two inputs and two outputs, inputs given out of order", async () => {
      await client.loadModel(await writeModelFolder(modelsDir, "addsub", addSubModel()), "addsub");
      const a = Float32Array.of(1, 2, 3, 4);
      const b = Float32Array.of(10, 20, 30, 40);
      const { tensors } = await client.predict("addsub", [
        tensor("b", DataType.FLOAT32, [2, 2], b),
        tensor("a", DataType.FLOAT32, [2, 2], a),
      ]);
      assert.deepEqual(tensors.map(nameOf), ["sum", "diff"]);
      assert.deepEqual([...floats(tensors[0].byte_data)], [11, 22, 33, 44]);
      assert.deepEqual([...floats(tensors[1].byte_data)], [-9, -18, -27, -36]);
      // Fixed shapes let a client leave the metadata out entirely: tensors match by position.
      const positional = await client.predict("addsub", [{ byte_data: new Uint8Array(a.buffer) }, {
        byte_data: new Uint8Array(b.buffer),
      }]);
      assert.deepEqual([...floats(positional.tensors[0].byte_data)], [11, 22, 33, 44]);
    });

    await t.step("LoadModel errors", async () => {
      const before = (await client.listModels()).models.map((m) => m.name).sort();
      await rejectsWith(client.loadModel(clsDir, "bad_name"), Status.INVALID_ARGUMENT, /model name "bad_name"/);
      await rejectsWith(client.loadModel(clsDir, "-x"), Status.INVALID_ARGUMENT, /model name/);
      await rejectsWith(client.loadModel(clsDir, "a".repeat(256)), Status.INVALID_ARGUMENT, /model name/);
      await rejectsWith(client.loadModel(clsDir, ""), Status.INVALID_ARGUMENT, /model name/);
      await rejectsWith(client.loadModel(clsDir, "cls"), Status.ALREADY_EXISTS, /cls/);
      await rejectsWith(client.loadModel(join(modelsDir, "missing"), "m1"), Status.NOT_FOUND, /does not exist/);
      await rejectsWith(client.loadModel("models/cls", "m1"), Status.INVALID_ARGUMENT, /absolute path/);
      await rejectsWith(client.loadModel("s3://bucket/model", "m1"), Status.INVALID_ARGUMENT, /only local paths/);
      await rejectsWith(client.loadModel("/etc", "m1"), Status.PERMISSION_DENIED, /outside the model roots/);
      await rejectsWith(
        client.loadModel(join(modelsDir, "..", "config.json"), "m1"),
        Status.PERMISSION_DENIED,
        /outside the model roots/,
      );
      const unsigned = await writeModelFolder(modelsDir, "unsigned", addSubModel(), { signed: false });
      await rejectsWith(
        client.loadModel(unsigned, "m1"),
        Status.FAILED_PRECONDITION,
        /is not signed: .*model\.sig is missing/,
      );
      const two = join(modelsDir, "two");
      await Deno.mkdir(two);
      await Deno.writeFile(join(two, "a.onnx"), addSubModel());
      await Deno.writeFile(join(two, "b.onnx"), addSubModel());
      await signPackage(two);
      await rejectsWith(client.loadModel(two, "m1"), Status.INVALID_ARGUMENT, /2 \.onnx files \(a\.onnx, b\.onnx\)/);
      const garbage = join(modelsDir, "garbage.onnx");
      await Deno.writeTextFile(garbage, "this is not a model");
      await signPackage(garbage);
      await rejectsWith(client.loadModel(garbage, "m1"), Status.FAILED_PRECONDITION, /ONNX Runtime/);
      const strings = await writeModelFolder(modelsDir, "strings", stringModel());
      await rejectsWith(client.loadModel(strings, "m1"), Status.FAILED_PRECONDITION, /x \(STRING\)/);
      // A symlink inside the roots that leads outside them is refused too.
      await Deno.symlink("/etc", join(modelsDir, "escape"));
      await rejectsWith(client.loadModel(join(modelsDir, "escape"), "m1"), Status.PERMISSION_DENIED, /outside/);
      // Failed loads leave nothing behind: the name is free and the list is unchanged.
      assert.deepEqual((await client.listModels()).models.map((m) => m.name).sort(), before);
      await client.loadModel(clsDir, "m1");
      await client.unloadModel("m1");
    });

    await t.step("Predict errors name the tensor and what was expected", async () => {
      const x = pseudoRandomFloats(3 * 48 * 192);
      const good = [1, 3, 48, 192];
      await rejectsWith(client.predict("nope", []), Status.NOT_FOUND, /model nope is not loaded/);
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT64, good, x)]),
        Status.INVALID_ARGUMENT,
        /tensor "x": data_type FLOAT64 but model cls input "x" is FLOAT32/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", 99, good, x)]),
        Status.INVALID_ARGUMENT,
        /data_type unknown \(99\)/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 4, 48, 192], x)]),
        Status.INVALID_ARGUMENT,
        /shape \[1,4,48,192\] does not fit model cls input "x" of shape \[-1,3,-1,-1\]/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, 48], x)]),
        Status.INVALID_ARGUMENT,
        /shape \[1,3,48\] does not fit/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, -48, 192], x)]),
        Status.INVALID_ARGUMENT,
        /dimension 2 is -48; a size is 0 or more, or -1/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, 48, 191], x)]),
        Status.INVALID_ARGUMENT,
        /byte_data holds 110592 bytes, but shape \[1,3,48,191\] of FLOAT32 needs 110016/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, [2147483647, 3, 2147483647, 2147483647], x)]),
        Status.INVALID_ARGUMENT,
        /needs more than can exist/,
      );
      await rejectsWith(
        client.predict("cls", [tensor("image", DataType.FLOAT32, good, x)]),
        Status.INVALID_ARGUMENT,
        /tensor "image": model cls has no input of that name \(inputs: x\)/,
      );
      await rejectsWith(client.predict("cls", []), Status.INVALID_ARGUMENT, /needs input\(s\) "x"/);
      await rejectsWith(
        client.predict("cls", [tensor("x", DataType.FLOAT32, good, x), tensor("x", DataType.FLOAT32, good, x)]),
        Status.INVALID_ARGUMENT,
        /input "x" is given twice/,
      );
      await rejectsWith(
        client.predict("cls", [{ byte_data: new Uint8Array(x.buffer) }]),
        Status.INVALID_ARGUMENT,
        /tensor #0: no tensor_metadata, and model cls input "x" has dynamic shape \[-1,3,-1,-1\]/,
      );
      await rejectsWith(
        client.predict("cls", [{
          tensor_metadata: { name: new TextEncoder().encode("x"), data_type: 5, shape: good },
        }]),
        Status.INVALID_ARGUMENT,
        /carries no data/,
      );
      await rejectsWith(
        client.predict("addsub", [tensor("a", DataType.FLOAT32, [2, 2], new Float32Array(4))]),
        Status.INVALID_ARGUMENT,
        /needs input\(s\) "b"/,
      );
    });

    await t.step("UnLoadModel removes the model; unknown names are NOT_FOUND", async () => {
      await client.unloadModel("det");
      await rejectsWith(client.unloadModel("det"), Status.NOT_FOUND, /det is not loaded/);
      await rejectsWith(client.describeModel("det"), Status.NOT_FOUND, /det is not loaded/);
      await rejectsWith(client.predict("det", []), Status.NOT_FOUND);
      assert.deepEqual((await client.listModels()).models.map((m) => m.name).sort(), ["addsub", "cls"]);
    });

    await t.step("a malformed message gets INVALID_ARGUMENT and the agent keeps serving", async () => {
      const raw = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure());
      try {
        const identity = (b: Uint8Array) => Buffer.from(b);
        // Field 2 (tensors) claims a length far beyond the message.
        const hostile = Uint8Array.of(0x12, 0xff, 0xff, 0xff, 0x0f, 0x01);
        const details = await rejectsWith(
          new Promise((resolve, reject) =>
            raw.makeUnaryRequest(
              `/${SERVICE_NAME}/Predict`,
              identity,
              identity,
              hostile,
              (error, value) => error ? reject(error) : resolve(value),
            )
          ),
          Status.INVALID_ARGUMENT,
          /not a valid PredictRequest/,
        );
        // The message type and protobuf's own reason (the length past the end), nothing internal.
        assert.equal(details, "request is not a valid PredictRequest message: index out of range");
      } finally {
        raw.close();
      }
      assert.ok((await client.listModels()).models.length > 0);
    });

    await t.step("every log line is one JSON object", () => {
      for (const line of agent.logs().trim().split("\n")) assert.doesNotThrow(() => JSON.parse(line), line);
    });
  } finally {
    const status = await agent.stop();
    assert.equal(status.code, 0, agent.logs());
    await Deno.remove(agent.dir, { recursive: true });
  }
});

Deno.test("requests above edge_agent_max_message_bytes get RESOURCE_EXHAUSTED, and the agent keeps serving", async () => {
  const agent = await startAgent({ config: { edge_agent_max_message_bytes: 1024 * 1024 } });
  try {
    await agent.client.loadModel(
      await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS)),
      "cls",
    );
    const big = pseudoRandomFloats(3 * 48 * 2048);
    await rejectsWith(
      agent.client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, 48, 2048], big)]),
      Status.RESOURCE_EXHAUSTED,
    );
    const small = pseudoRandomFloats(3 * 48 * 192);
    const { tensors } = await agent.client.predict("cls", [tensor("x", DataType.FLOAT32, [1, 3, 48, 192], small)]);
    assert.deepEqual(tensors[0].tensor_metadata!.shape, [1, 2]);
  } finally {
    assert.equal((await agent.stop()).code, 0);
    await Deno.remove(agent.dir, { recursive: true });
  }
});

Deno.test("loading past edge_agent_model_memory_budget_bytes is RESOURCE_EXHAUSTED until memory is freed", async () => {
  const clsBytes = (await Deno.stat(PADDLE_CLS)).size;
  const agent = await startAgent({ config: { edge_agent_model_memory_budget_bytes: clsBytes + 1000 } });
  try {
    const first = await writeModelFolder(agent.modelsDir, "first", await Deno.readFile(PADDLE_CLS));
    const second = await writeModelFolder(agent.modelsDir, "second", await Deno.readFile(PADDLE_CLS));
    await agent.client.loadModel(first, "first");
    await rejectsWith(agent.client.loadModel(second, "second"), Status.RESOURCE_EXHAUSTED, /memory budget/);
    assert.deepEqual((await agent.client.listModels()).models.map((m) => m.name), ["first"]);
    await agent.client.unloadModel("first");
    await agent.client.loadModel(second, "second");
  } finally {
    assert.equal((await agent.stop()).code, 0);
    await Deno.remove(agent.dir, { recursive: true });
  }
});
