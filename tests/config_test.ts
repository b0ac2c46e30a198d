// Configuration parsing: Edge Manager's keys as they are, typed edge_agent_* keys, clear errors.

import assert from "node:assert/strict";
import { DEFAULTS, parseConfig } from "../src/config.ts";
import { StartupError } from "../src/errors.ts";

function problems(raw: unknown): string[] {
  try {
    parseConfig(raw);
  } catch (error) {
    assert.ok(error instanceof StartupError);
    return error.problems;
  }
  assert.fail("expected the config to be refused");
}

Deno.test("an empty config gives the documented defaults", () => {
  const { config, ignoredKeys } = parseConfig({});
  assert.deepEqual(config, DEFAULTS);
  assert.deepEqual(ignoredKeys, []);
  assert.equal(config.maxMessageBytes, 64 * 1024 * 1024);
  assert.equal(config.socketMode, 0o660);
});

Deno.test("Edge Manager's sample config is accepted as it is", () => {
  const { config, ignoredKeys } = parseConfig({
    sagemaker_edge_core_device_name: "device-name",
    sagemaker_edge_core_device_fleet_name: "fleet-name",
    sagemaker_edge_core_region: "us-west-2",
    sagemaker_edge_core_root_certs_path: "/etc/edge-agent/certificates",
    sagemaker_edge_provider_provider: "Aws",
    sagemaker_edge_provider_provider_path: "/opt/edge/lib/libprovider_aws.so",
    sagemaker_edge_provider_aws_ca_cert_file: "/opt/edge/iot-credentials/AmazonRootCA1.pem",
    sagemaker_edge_provider_aws_cert_file: "/opt/edge/iot-credentials/device.pem.crt",
    sagemaker_edge_provider_aws_cert_pk_file: "/opt/edge/iot-credentials/private.pem.key",
    sagemaker_edge_provider_aws_iot_cred_endpoint: "https://example.credentials.iot.us-west-2.amazonaws.com",
    sagemaker_edge_core_capture_data_destination: "Cloud",
    sagemaker_edge_provider_s3_bucket_name: "sagemaker-bucket",
    sagemaker_edge_core_capture_data_buffer_size: 30,
    sagemaker_edge_core_capture_data_batch_size: 10,
    sagemaker_edge_core_capture_data_push_period_seconds: 4000,
    sagemaker_edge_core_folder_prefix: "sample-capture-data",
    sagemaker_edge_core_capture_data_base64_embed_limit: 2,
    sagemaker_edge_log_verbose: "false",
  });
  assert.equal(config.deviceName, "device-name");
  assert.equal(config.deviceFleetName, "fleet-name");
  assert.equal(config.region, "us-west-2");
  assert.equal(config.rootCertsPath, "/etc/edge-agent/certificates");
  assert.equal(config.logVerbose, false);
  assert.ok(ignoredKeys.includes("sagemaker_edge_provider_aws_iot_cred_endpoint"));
  assert.equal(config.captureDestination, "Cloud");
  assert.equal(config.s3Bucket, "sagemaker-bucket");
  assert.equal(config.captureBufferSize, 30);
  assert.ok(!ignoredKeys.includes("sagemaker_edge_core_device_name"));
});

Deno.test("edge_agent_* keys set typed values", () => {
  const { config } = parseConfig({
    edge_agent_onnxruntime_library: "/opt/ort/libonnxruntime.so.1",
    edge_agent_model_roots: ["/data/models", "/opt/models"],
    edge_agent_state_dir: "/data/state",
    edge_agent_max_message_bytes: 8 * 1024 * 1024,
    edge_agent_model_memory_budget_bytes: 100_000_000,
    edge_agent_intra_op_threads: 2,
    edge_agent_inter_op_threads: 1,
    edge_agent_allow_spinning: false,
    edge_agent_graph_optimization: "basic",
    edge_agent_cpu_mem_arena: false,
    edge_agent_socket_mode: "0600",
    edge_agent_shutdown_grace_seconds: 3,
  });
  assert.deepEqual(config.modelRoots, ["/data/models", "/opt/models"]);
  assert.equal(config.intraOpThreads, 2);
  assert.equal(config.allowSpinning, false);
  assert.equal(config.graphOptimization, "basic");
  assert.equal(config.socketMode, 0o600);
  assert.equal(config.shutdownGraceSeconds, 3);
});

Deno.test("every problem is reported, each naming its key", () => {
  const found = problems({
    surprise: true,
    edge_agent_model_roots: ["relative/path"],
    edge_agent_max_message_bytes: 1.5,
    edge_agent_socket_mode: "rw-rw----",
    sagemaker_edge_log_verbose: "maybe",
    edge_agent_onnxruntime_library: 7,
  });
  assert.equal(found.length, 6, found.join("\n"));
  assert.match(found[0], /unknown key "surprise"/);
  assert.match(found[1], /"edge_agent_model_roots" must be a list of absolute paths/);
  assert.match(found[2], /"edge_agent_max_message_bytes" must be a whole number, got 1\.5/);
  assert.match(found[3], /"edge_agent_socket_mode" must be an octal file mode/);
  assert.match(found[4], /"sagemaker_edge_log_verbose" must be true or false, got "maybe"/);
  assert.match(found[5], /"edge_agent_onnxruntime_library" must be an absolute path, got 7/);
});

Deno.test("a config that is not a JSON object is refused", () => {
  for (const raw of [null, [], "text", 3]) assert.match(problems(raw)[0], /must be a JSON object/);
});

Deno.test("the gRPC server's bounds are typed keys; the total message budget must hold one message", () => {
  const { config } = parseConfig({
    edge_agent_max_connections: 8,
    edge_agent_idle_connection_seconds: 5,
    edge_agent_max_concurrent_streams: 10,
    edge_agent_max_header_list_bytes: 8192,
    edge_agent_control_frames_per_second: 100,
    edge_agent_max_pending_write_bytes: 65536,
    edge_agent_max_buffered_message_bytes: 128 * 1024 * 1024,
  });
  assert.deepEqual(
    [config.maxConnections, config.idleConnectionSeconds, config.maxConcurrentStreams, config.maxHeaderListBytes],
    [8, 5, 10, 8192],
  );
  assert.deepEqual([config.controlFramesPerSecond, config.maxPendingWriteBytes], [100, 65536]);
  assert.deepEqual(problems({ edge_agent_max_connections: 0 }), [
    'config: key "edge_agent_max_connections" must be at least 1, got 0',
  ]);
  assert.match(
    problems({ edge_agent_max_message_bytes: 8192, edge_agent_max_buffered_message_bytes: 4096 })[0],
    /"edge_agent_max_buffered_message_bytes" \(4096\) must be at least "edge_agent_max_message_bytes" \(8192\)/,
  );
});
