// What the crash test and its writer subprocess agree on (kept free of npm imports: the writer starts fast).

import { createLogger } from "../../src/log.ts";
import type { CaptureOptions, CaptureRecord } from "../../src/capture/mod.ts";
import type { S3Options } from "../../src/capture/s3.ts";

export const quiet = createLogger(false, () => 0);

/** Every fourth capture has an output over the 3 KB embed limit: a separate tensor object. */
export const crashOutputBytes = (id: string) => (Number(id.split("-").at(-1)) % 4 === 0 ? 5000 : 64);

export function crashRecord(id: string): CaptureRecord {
  const n = crashOutputBytes(id);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + id.length) & 0xff;
  return {
    captureId: id,
    modelName: "crash-model",
    inferenceTimestamp: { seconds: 1_717_000_000, nanos: 0 },
    inputTensors: [{ name: "x", dataType: 5, shape: [4], data: new Uint8Array(16).fill(id.length) }],
    outputTensors: [{ name: "y", dataType: 0, shape: [n], data: out }],
    inputs: [],
    outputs: [],
  };
}

/**
 * The capture service on `stateDir` uploading to the local S3 on `port`: the writer and the check after
 * its last round must agree on the layout; batching and retries are each one's own.
 */
export function crashServiceOptions(
  stateDir: string,
  port: number,
  tuning: Pick<CaptureOptions, "bufferSize" | "batchSize" | "pushPeriodSeconds" | "retryBaseMs" | "retryMaxMs">,
): CaptureOptions {
  return {
    stateDir,
    deviceFleetName: "fleet",
    deviceName: "device",
    folderPrefix: "crash",
    destination: "Cloud",
    s3: crashS3Options(port),
    logger: quiet,
    ...tuning,
  };
}

export function crashS3Options(port: number): S3Options {
  return {
    bucket: "captures",
    region: "us-east-1",
    endpoint: `http://127.0.0.1:${port}`,
    forcePathStyle: true,
    credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
    requestTimeoutMs: 5000,
  };
}
