// Configuration parsing: Edge Manager's keys as they are, typed edge_agent_* keys, clear errors.

import assert from "node:assert/strict";
import { DEFAULTS, parseConfig, parseMessageLimit } from "../src/config.ts";
import { StartupError } from "../src/errors.ts";
import { EDGE_MANAGER_STYLE_CONFIG } from "./helpers/edge_manager.ts";

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
  assert.equal(config.iotCredentialsEndpoint, "https://example.credentials.iot.us-west-2.amazonaws.com");
  assert.ok(ignoredKeys.includes("sagemaker_edge_provider_provider_path"));
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
    edge_agent_inline_run_max_us: 0,
  });
  assert.deepEqual(config.modelRoots, ["/data/models", "/opt/models"]);
  assert.equal(config.intraOpThreads, 2);
  assert.equal(config.allowSpinning, false);
  assert.equal(config.graphOptimization, "basic");
  assert.equal(config.socketMode, 0o600);
  assert.equal(config.shutdownGraceSeconds, 3);
  assert.equal(config.inlineRunMaxUs, 0);
  assert.equal(DEFAULTS.inlineRunMaxUs, 1000);
  assert.match(problems({ edge_agent_inline_run_max_us: 20_000 })[0], /"edge_agent_inline_run_max_us"/);
});

Deno.test("every problem is reported, each naming its key", () => {
  const found = problems({
    surprise: true,
    edge_agent_model_roots: [""],
    edge_agent_max_message_bytes: 1.5,
    edge_agent_socket_mode: "rw-rw----",
    sagemaker_edge_log_verbose: "maybe",
    edge_agent_onnxruntime_library: 7,
  });
  assert.equal(found.length, 6, found.join("\n"));
  assert.match(found[0], /unknown key "surprise"/);
  assert.match(found[1], /"edge_agent_model_roots" must be a list of paths/);
  assert.match(found[2], /"edge_agent_max_message_bytes" must be a whole number, got 1\.5/);
  assert.match(found[3], /"edge_agent_socket_mode" must be an octal file mode/);
  assert.match(found[4], /"sagemaker_edge_log_verbose" must be true or false, got "maybe"/);
  assert.match(found[5], /"edge_agent_onnxruntime_library" must be a path, got 7/);
});

Deno.test("a config that is not a JSON object is refused", () => {
  for (const raw of [null, [], "text", 3]) assert.match(problems(raw)[0], /must be a JSON object/);
});

/** Keys Edge Manager acted on that this agent does not use (the credentials keys are used elsewhere). */
const NOT_USED = [
  "sagemaker_edge_telemetry_libsystemd_path",
  "sagemaker_edge_core_config_path",
  "sagemaker_edge_core_endpoint_override",
  "sagemaker_edge_db_module_path",
  "sagemaker_edge_local_data_root_path",
  "sagemaker_edge_deployment_lib_path",
  "sagemaker_edge_model_deployment_poll_interval",
  "sagemaker_edge_dlr_backend_options",
];

Deno.test("an Edge Manager-style config: older names, numbers and booleans as strings, relative paths", () => {
  const { config, ignoredKeys, resolvedPaths } = parseConfig(EDGE_MANAGER_STYLE_CONFIG, "config", "/opt/edge");
  assert.equal(config.deviceName, "turbine-7", "sagemaker_edge_core_device_uuid is the device name");
  assert.equal(config.iotThingName, "turbine-7-thing");
  assert.equal(config.captureBufferSize, 30);
  assert.equal(config.captureBatchSize, 10);
  assert.equal(config.capturePushPeriodSeconds, 4);
  assert.equal(config.captureBase64EmbedLimit, 3072);
  assert.equal(config.capturePeriodicUploadPeriodSeconds, 3600);
  assert.equal(config.capturePeriodicUpload, false);
  assert.equal(config.rootCertsPath, "/opt/edge/agent/certificates/root");
  assert.equal(config.captureDiskPath, "/opt/edge/agent/capture");
  assert.deepEqual(resolvedPaths, {
    sagemaker_edge_core_root_certs_path: "/opt/edge/agent/certificates/root",
    sagemaker_edge_core_capture_data_disk_path: "/opt/edge/agent/capture",
    sagemaker_edge_provider_aws_ca_cert_file: "/opt/edge/agent/iot-credentials/AmazonRootCA1.pem",
    sagemaker_edge_provider_aws_cert_file: "/opt/edge/agent/iot-credentials/device.pem.crt",
    sagemaker_edge_provider_aws_cert_pk_file: "/opt/edge/agent/iot-credentials/private.pem.key",
  });
  for (const key of NOT_USED) assert.ok(ignoredKeys.includes(key), key);
  for (
    const key of [
      "sagemaker_edge_core_device_uuid",
      "sagemaker_edge_core_iot_thing_name",
      "sagemaker_edge_provider_provider",
      "sagemaker_edge_provider_aws_cert_file",
      "sagemaker_edge_provider_aws_iot_cred_endpoint",
    ]
  ) {
    assert.ok(!ignoredKeys.includes(key), `${key} is acted on`);
  }
});

Deno.test("the IoT thing name defaults to the device name, from either of its keys", () => {
  assert.equal(parseConfig({ sagemaker_edge_core_device_name: "d1" }).config.iotThingName, "d1");
  assert.equal(parseConfig({ sagemaker_edge_core_device_uuid: "d2" }).config.iotThingName, "d2");
  const both = parseConfig({ sagemaker_edge_core_device_name: "d3", sagemaker_edge_core_device_uuid: "d3" }).config;
  assert.equal(both.deviceName, "d3");
  for (const [name, uuid] of [["", "d4"], ["d4", ""]]) {
    const { config } = parseConfig({ sagemaker_edge_core_device_name: name, sagemaker_edge_core_device_uuid: uuid });
    assert.equal(config.deviceName, "d4", "a blank key does not override the other");
  }
});

Deno.test("device_name and device_uuid that differ stop start-up naming both", () => {
  const [problem] = problems({ sagemaker_edge_core_device_name: "a", sagemaker_edge_core_device_uuid: "b" });
  assert.match(
    problem,
    /keys "sagemaker_edge_core_device_name" \("a"\) and "sagemaker_edge_core_device_uuid" \("b"\) name the same setting/,
  );
});

Deno.test("strings that are not numbers or booleans are still refused, naming the key", () => {
  const found = problems({
    sagemaker_edge_core_capture_data_buffer_size: "thirty",
    sagemaker_edge_core_capture_data_batch_size: "10.5",
    sagemaker_edge_core_capture_data_push_period_seconds: "",
    sagemaker_edge_core_capture_data_base64_embed_limit: "4000",
    sagemaker_edge_core_capture_data_periodic_upload: "yes",
    sagemaker_edge_model_deployment_poll_interval: "daily",
    sagemaker_edge_core_iot_thing_name: 7,
  });
  assert.equal(found.length, 7, found.join("\n"));
  assert.match(found[0], /key "sagemaker_edge_core_capture_data_buffer_size" must be a whole number, got "thirty"/);
  assert.match(found[1], /"sagemaker_edge_core_capture_data_batch_size" must be a whole number, got "10.5"/);
  assert.match(found[2], /"sagemaker_edge_core_capture_data_push_period_seconds" must be a whole number, got ""/);
  assert.match(found[3], /"sagemaker_edge_core_capture_data_base64_embed_limit" must be at most 3072, got "4000"/);
  assert.match(found[4], /"sagemaker_edge_core_capture_data_periodic_upload" must be true or false, got "yes"/);
  assert.match(found[5], /"sagemaker_edge_model_deployment_poll_interval" must be a whole number, got "daily"/);
  assert.match(found[6], /"sagemaker_edge_core_iot_thing_name" must be a string, got 7/);
  assert.equal(parseConfig({ sagemaker_edge_log_verbose: "TRUE" }).config.logVerbose, true);
});

Deno.test("relative paths of this agent's keys resolve against the working folder too", () => {
  const { config, resolvedPaths } = parseConfig(
    { edge_agent_model_roots: ["models", "/abs/models"], edge_agent_state_dir: "../state" },
    "config",
    "/srv/agent",
  );
  assert.deepEqual(config.modelRoots, ["/srv/agent/models", "/abs/models"]);
  assert.equal(config.stateDir, "/srv/state");
  assert.deepEqual(Object.keys(resolvedPaths).sort(), ["edge_agent_model_roots", "edge_agent_state_dir"]);
  assert.equal(parseConfig({ edge_agent_state_dir: "/abs" }).resolvedPaths.edge_agent_state_dir, undefined);
});

Deno.test("-m is checked as edge_agent_max_message_bytes is", () => {
  assert.equal(parseMessageLimit("8388608"), 8388608);
  for (const bad of ["8MB", "100", "", "-5", "99999999999"]) {
    const result = parseMessageLimit(bad);
    assert.ok(typeof result === "object", bad);
    assert.match(result.problem, /^-m must be/);
  }
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
