// The capture core: durable spool, status index, batching, uploads to Disk or S3 (see service.ts).

export { type CaptureOptions, CaptureService, type CaptureStats, type CaptureStatus } from "./service.ts";
export {
  AuxEncoding,
  type CaptureAux,
  type CaptureRecord,
  type CaptureTensor,
  decodeRecord,
  type Timestamp,
} from "./record.ts";
export { type Destination, DestinationError, DiskDestination, S3Destination } from "./destination.ts";
export { S3Client, type S3Credentials, S3Error, type S3Options } from "./s3.ts";
export {
  batchFolder,
  CAPTURE_LAYOUTS,
  type CaptureLayout,
  encodeComponent,
  hourFolder,
  manifestKey,
  MAX_BASE64_EMBED_LIMIT,
  tensorKey,
} from "./layout.ts";
export {
  CredentialsError,
  type CredentialSource,
  EnvironmentCredentials,
  IotCredentials,
  StaticCredentials,
} from "./credentials.ts";
export { benchCaptureAppends, type CaptureBenchOptions, type CaptureBenchResult } from "./bench.ts";
