// Request shapes as Edge Manager's clients send them: -1 copied from ListModels where the model's
// dimension is fixed or dynamic, settled from the data's length as reshape does.

import assert from "node:assert/strict";
import { ElementType } from "../ffi/onnxruntime.ts";
import { AgentError, Status } from "../src/errors.ts";
import { bindInputs, firstTensorBytesOffset, type TensorSpec, toSpecs } from "../src/inference/tensors.ts";
import { messageType, type Tensor } from "../src/service/wire.ts";

const FLOAT32 = 5;
const encoder = new TextEncoder();

function spec(shape: number[]): TensorSpec[] {
  return toSpecs([{ name: "x", elementType: ElementType.FLOAT, shape }]).specs;
}

function bytesTensor(shape: number[] | null, bytes: number): Tensor {
  return {
    ...(shape ? { tensor_metadata: { name: encoder.encode("x"), data_type: FLOAT32, shape } } : {}),
    data: "byte_data",
    byte_data: new Uint8Array(bytes),
  } as Tensor;
}

function shmTensor(shape: number[], size: number): Tensor {
  return {
    tensor_metadata: { name: encoder.encode("x"), data_type: FLOAT32, shape },
    data: "shared_memory_handle",
    shared_memory_handle: { size, offset: 0, segment_id: 7 },
  } as Tensor;
}

function shapeOf(model: number[], tensor: Tensor): number[] {
  return bindInputs("cls", spec(model), [tensor])[0].shape;
}

function refused(model: number[], tensor: Tensor): string {
  try {
    bindInputs("cls", spec(model), [tensor]);
  } catch (error) {
    assert.ok(error instanceof AgentError);
    assert.equal(error.code, Status.INVALID_ARGUMENT);
    return error.message;
  }
  assert.fail("expected INVALID_ARGUMENT");
}

Deno.test("one -1 where the model's dimension is dynamic is settled from the byte length", () => {
  assert.deepEqual(shapeOf([-1, 3, -1, -1], bytesTensor([-1, 3, 48, 192], 4 * 3 * 48 * 192)), [1, 3, 48, 192]);
  assert.deepEqual(shapeOf([-1, 3, -1, -1], bytesTensor([2, 3, -1, 192], 4 * 2 * 3 * 48 * 192)), [2, 3, 48, 192]);
  // Zero elements are a valid length: the open dimension is 0.
  assert.deepEqual(shapeOf([-1, 3], bytesTensor([-1, 3], 0)), [0, 3]);
  // Without metadata the model's own shape is used, and its one dynamic dimension is settled too.
  assert.deepEqual(shapeOf([-1, 3], bytesTensor(null, 4 * 3 * 5)), [5, 3]);
});

Deno.test("-1 where the model's dimension is fixed takes the fixed size", () => {
  assert.deepEqual(shapeOf([-1, 3, -1, -1], bytesTensor([1, -1, 48, 192], 4 * 3 * 48 * 192)), [1, 3, 48, 192]);
  // ListModels metadata of a fully fixed model copied as it is, with -1 in the fixed places.
  assert.deepEqual(shapeOf([1, 3, 4, 4], bytesTensor([-1, -1, -1, -1], 4 * 48)), [1, 3, 4, 4]);
  // Fixed -1s filled first, then the one dynamic dimension settled.
  assert.deepEqual(shapeOf([-1, 3, 8], bytesTensor([-1, -1, -1], 4 * 24 * 2)), [2, 3, 8]);
});

Deno.test("more than one open -1 names the dimensions the client must give", () => {
  const message = refused([-1, 3, -1, -1], bytesTensor([-1, 3, -1, -1], 4 * 3 * 48 * 192));
  assert.match(message, /tensor "x": shape \[-1,3,-1,-1\] leaves dimensions 0, 2, 3 of model cls input "x"/);
  assert.match(message, /give the sizes of dimensions 0, 2, 3 \(one may stay -1\)/);
  assert.doesNotMatch(message, /does not fit/, "the old message said the model's own shape does not fit it");
  assert.match(
    refused([-1, 3, -1, -1], bytesTensor(null, 4 * 3 * 48 * 192)),
    /no tensor_metadata, and model cls input "x" has dynamic shape \[-1,3,-1,-1\]/,
  );
});

Deno.test("a byte length that does not divide evenly is refused, naming the sizes", () => {
  assert.match(
    refused([-1, 3, -1, -1], bytesTensor([-1, 3, 48, 191], 4 * 3 * 48 * 192)),
    /shape \[-1,3,48,191\] of FLOAT32: byte_data holds 110592 bytes, which is not a whole multiple of the 110016 bytes each step of dimension 0 takes/,
  );
  // Another dimension of size 0 leaves nothing to divide by.
  assert.match(refused([-1, -1], bytesTensor([0, -1], 8)), /not settled by the 0 bytes each step of dimension 1/);
});

Deno.test("shared memory: a handle's size settles a -1; size 0 cannot", () => {
  const bound = bindInputs("cls", spec([-1, 3]), [shmTensor([-1, 3], 4 * 3 * 6)]);
  assert.deepEqual(bound[0].shape, [6, 3]);
  assert.equal(bound[0].byteLength, 72);
  assert.match(
    refused([-1, 3], shmTensor([-1, 3], 0)),
    /dimension 0 is -1, and shared_memory_handle\.size is 0, so nothing settles it/,
  );
});

Deno.test("shapes that cannot fit are still refused", () => {
  assert.match(refused([-1, 3, -1, -1], bytesTensor([1, 4, 48, 192], 4)), /does not fit model cls input "x"/);
  assert.match(refused([-1, 3, -1, -1], bytesTensor([1, 3, 48], 4)), /does not fit/);
  assert.match(refused([-1, 3, -1, -1], bytesTensor([1, 3, -48, 192], 4)), /dimension 2 is -48; a size is 0 or more/);
  assert.match(
    refused([-1, 3, -1, -1], bytesTensor([1, 3, 48, 191], 4 * 3 * 48 * 192)),
    /byte_data holds 110592 bytes, but shape \[1,3,48,191\] of FLOAT32 needs 110016/,
  );
});

Deno.test("the first tensor's bytes are found in a PredictRequest's first bytes, however the client laid out its fields", () => {
  const PredictRequest = messageType("PredictRequest");
  const tensor = {
    tensor_metadata: { name: encoder.encode("x"), data_type: FLOAT32, shape: [1, 3, 640, 640] },
    byte_data: new Uint8Array(300).fill(7),
  };
  // protobufjs writes repeated shape values one field each.
  const ours = PredictRequest.encode({ name: "det", tensors: [tensor] }).finish();
  const at = firstTensorBytesOffset(ours.subarray(0, 256))!;
  assert.deepEqual(new Uint8Array(ours.subarray(at, at + 300)), tensor.byte_data);
  // grpcio (proto3 encoders) packs them: the bytes start two bytes earlier, at 30.
  const packed = Uint8Array.from(
    "0a03646574129480ac020a0d0a017810051a06010380058005228080ac02".match(/../g)!.map((h) => parseInt(h, 16)),
  );
  assert.equal(firstTensorBytesOffset(packed), 30);
  // Cut before the bytes start, or not a PredictRequest: no answer rather than a wrong one.
  assert.equal(firstTensorBytesOffset(packed.subarray(0, 20)), null);
  assert.equal(firstTensorBytesOffset(Uint8Array.of(0xff, 0xff, 0xff)), null);
  assert.equal(firstTensorBytesOffset(new Uint8Array(0)), null);
});
