// A CaptureData request checked and turned into the record the spool keeps. Tensors get the same
// dtype/shape/length checks as Predict; data a request points at in shared memory is copied now,
// before the answer, since the client may change its segment as soon as it has one.

import { AgentError, invalidArgument, Status } from "../errors.ts";
import type { ModelInfo } from "../inference/models.ts";
import type { SharedMemoryReader } from "../inference/shm.ts";
import { bindInputs, type BoundInput, shmHandle } from "../inference/tensors.ts";
import type { AuxilaryData, CaptureDataRequest, Long } from "../service/wire.ts";
import type { CaptureAux, CaptureRecord, CaptureTensor } from "./record.ts";

const CAPTURE_ID = /^[A-Za-z0-9._:-]{1,128}$/;

export interface CaptureContext {
  model: ModelInfo;
  shm: SharedMemoryReader;
  clockSkewSeconds: number;
  nowMs: number;
}

export function captureRecord(request: CaptureDataRequest, context: CaptureContext): CaptureRecord {
  const id = request.capture_id;
  if (!CAPTURE_ID.test(id)) {
    throw invalidArgument(`capture_id "${id}" is invalid: use 1-128 characters of letters, digits and . _ : -`);
  }
  const { model } = context;
  return {
    captureId: id,
    modelName: model.name,
    modelVersion: model.version ?? "",
    inferenceTimestamp: timestamp(request, context),
    inputTensors: tensors(bindInputs(model.name, model.inputs, request.input_tensors, { requireAll: false }), context),
    outputTensors: tensors(
      bindInputs(model.name, model.outputs, request.output_tensors, { role: "output", requireAll: false }),
      context,
    ),
    inputs: request.inputs.map((aux, i) => auxiliary(aux, `inputs[${i}]`, context)),
    outputs: request.outputs.map((aux, i) => auxiliary(aux, `outputs[${i}]`, context)),
  };
}

function timestamp(request: CaptureDataRequest, context: CaptureContext): { seconds: number; nanos: number } {
  const stamp = request.inference_timestamp;
  if (!stamp) {
    const seconds = Math.floor(context.nowMs / 1000);
    return { seconds, nanos: (context.nowMs - seconds * 1000) * 1e6 };
  }
  const seconds = Number(typeof stamp.seconds === "number" ? stamp.seconds : (stamp.seconds as Long).toString());
  if (!Number.isSafeInteger(seconds) || seconds < 0 || stamp.nanos < 0 || stamp.nanos >= 1e9) {
    throw invalidArgument(`inference_timestamp ${stamp.seconds}s ${stamp.nanos}ns is not a valid time`);
  }
  const aheadSeconds = seconds - context.nowMs / 1000;
  if (aheadSeconds > context.clockSkewSeconds) {
    throw new AgentError(
      Status.OUT_OF_RANGE,
      `inference_timestamp is ${
        Math.round(aheadSeconds)
      } s in the future (more than the allowed ${context.clockSkewSeconds} s of clock skew)`,
    );
  }
  return { seconds, nanos: stamp.nanos };
}

function tensors(bound: BoundInput[], context: CaptureContext): CaptureTensor[] {
  return bound.map((input) => ({
    name: input.spec.name,
    dataType: input.spec.dataType.dataType,
    shape: input.shape,
    data: "handle" in input.source
      ? copyShared(context, input.label, input.source.handle, input.byteLength, input.spec.dataType.size)
      : input.source.bytes,
  }));
}

function auxiliary(aux: AuxilaryData, where: string, context: CaptureContext): CaptureAux {
  const label = `${where} "${aux.name}"`;
  let data: Uint8Array;
  if (aux.data === "shared_memory_handle" && aux.shared_memory_handle) {
    const handle = shmHandle(aux.shared_memory_handle);
    if (handle.size === 0n) {
      throw invalidArgument(`${label}: shared_memory_handle.size must say how many bytes to read`);
    }
    if (handle.size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalidArgument(`${label}: size ${handle.size} is too large`);
    }
    data = copyShared(context, label, handle, Number(handle.size), 1);
  } else if (aux.data === "byte_data" && aux.byte_data) {
    data = aux.byte_data;
  } else {
    throw invalidArgument(`${label}: carries no data (set byte_data or shared_memory_handle)`);
  }
  return { name: aux.name, encoding: aux.encoding, data };
}

/** Copies the bytes out of the client's segment; the mapping is released before returning. */
function copyShared(
  context: CaptureContext,
  label: string,
  handle: ReturnType<typeof shmHandle>,
  byteLength: number,
  elementSize: number,
): Uint8Array {
  const region = context.shm.open(label, handle, byteLength, elementSize);
  try {
    return region.bytes.slice();
  } finally {
    region.release();
  }
}
