// `edge-agent client`: every sub-command against a real agent, with .npy files NumPy reads and writes,
// and the error paths a person trying a model by hand meets.

import assert from "node:assert/strict";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { readNpy, writeNpy } from "../src/client/npy.ts";
import { COMPILE_CONFIG, MAIN, withAgent } from "./helpers/agent.ts";
import { entryPath, writeEntry } from "../build.ts";
import { parseConfig } from "../src/config.ts";
import { profileFlags, profileFor } from "../src/permissions.ts";
import { floats, pseudoRandomFloats, tensor } from "./helpers/assertions.ts";
import { identityModel, OnnxType, PADDLE_CLS, PADDLE_DET, writeModelFolder } from "./helpers/onnx_models.ts";
import { PYTHON, pythonGrpcMissing } from "./helpers/python.ts";

/** The independent reference: onnxruntime-node in this process, on the same model file and input. */
async function reference(model: string, input: Float32Array, shape: number[]): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(model);
  try {
    const outputs = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", input, shape) });
    return outputs[session.outputNames[0]].data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Equal to within ONNX Runtime's run-to-run differences (thread splits change float sums slightly). */
function assertClose(actual: Float32Array, expected: Float32Array, tolerance = 1e-5) {
  assert.equal(actual.length, expected.length);
  let worst = 0;
  for (let i = 0; i < actual.length; i++) worst = Math.max(worst, Math.abs(actual[i] - expected[i]));
  assert.ok(worst <= tolerance, `largest difference ${worst}`);
}

async function client(socket: string, ...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-net",
      MAIN,
      "client",
      "--socket",
      socket,
      ...args,
    ],
  }).output();
  return { code: out.code, stdout: new TextDecoder().decode(out.stdout), stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("client: list, load, describe, predict (.npy and .bin, --out), capture-status, health, unload", async () => {
  await withAgent({}, async (agent) => {
    const s = agent.socket;
    assert.match((await client(s, "list")).stdout, /no models loaded/);
    const folder = await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
    const loaded = await client(s, "load", folder, "cls");
    assert.equal(loaded.code, 0, loaded.stderr);
    assert.match(loaded.stdout, /input {2}x FLOAT32 \[-1,3,-1,-1\]/);
    assert.match((await client(s, "describe", "cls")).stdout, /output softmax_0\.tmp_0 FLOAT32 \[-1,2\]/);
    assert.match((await client(s, "list")).stdout, /^cls /m);

    const input = pseudoRandomFloats(3 * 48 * 192, 5);
    const expected = await reference(PADDLE_CLS, input, [1, 3, 48, 192]);
    const npy = join(agent.dir, "x.npy");
    await Deno.writeFile(
      npy,
      writeNpy({ dataType: "FLOAT32", shape: [1, 3, 48, 192], data: new Uint8Array(input.buffer) }),
    );
    const out = join(agent.dir, "y.npy");
    const predicted = await client(s, "predict", "cls", "--input", `x=${npy}`, "--out", out);
    assert.equal(predicted.code, 0, predicted.stderr);
    assert.match(predicted.stdout, /softmax_0\.tmp_0 FLOAT32 \[1,2\]\n {2}#[01]: [\d.]+\n {2}#[01]: [\d.]+/);
    const saved = readNpy(await Deno.readFile(out));
    assert.deepEqual([saved.dataType, saved.shape], ["FLOAT32", [1, 2]]);
    assertClose(floats(saved.data), expected);

    const bin = join(agent.dir, "x.bin");
    await Deno.writeFile(bin, new Uint8Array(input.buffer));
    assert.equal((await client(s, "predict", "cls", "--input", `x=${bin}:1,3,48,192`)).code, 0);

    const benched = await client(s, "bench", "cls", "--input", `x=${npy}`, "--concurrency", "2", "--seconds", "1");
    assert.equal(benched.code, 0, benched.stderr);
    assert.match(benched.stdout, /cls: \d+ calls in [\d.]+ s from 2 connection\(s\)\n {2}throughput [\d.]+\/s\n/);
    assert.match(benched.stdout, /latency ms: p50 [\d.]+ {2}p90 [\d.]+ {2}p99 [\d.]+ {2}max [\d.]+/);

    assert.match((await client(s, "capture-status", "nope")).stdout, /nope: NOT_FOUND/);
    assert.match((await client(s, "health")).stdout, /agent: SERVING/);
    assert.match((await client(s, "health", "model/cls")).stdout, /model\/cls: SERVING/);

    const bad = join(agent.dir, "bad.npy");
    await Deno.writeTextFile(bad, "not numpy");
    const errors: [string[], RegExp][] = [
      [["predict", "nope", "--input", `x=${npy}`], /NOT_FOUND: model nope is not loaded/],
      [["predict", "cls", "--input", `x=${bin}`], /shape \[-1,3,-1,-1\] is dynamic: give the shape/],
      [["predict", "cls", "--input", `image=${npy}`], /model cls has no such input \(inputs: x\)/],
      [
        ["predict", "cls", "--input", `x=${bin}:1,3,48,100`],
        /INVALID_ARGUMENT: tensor "x": byte_data holds 110592 bytes/,
      ],
      [["predict", "cls", "--input", `x=${bad}`], /bad\.npy: not a \.npy file \(bad magic\)/],
      [["predict", "cls", "--input", `x=${join(agent.dir, "missing.npy")}`], /missing\.npy: No such file/],
      [["health", "model/nope"], /NOT_FOUND: unknown service "model\/nope"/],
    ];
    for (const [args, message] of errors) {
      const result = await client(s, ...args);
      assert.equal(result.code, 1, `${args.join(" ")}: ${result.stdout}`);
      assert.match(result.stderr, message, args.join(" "));
      assert.doesNotMatch(result.stderr, /\bat \w+ \(/, "no stack trace");
    }
    assert.match((await client(s, "unload", "cls")).stdout, /unloaded cls/);
    assert.equal((await client(s, "bogus")).code, 2);
  });
});

const skip = await pythonGrpcMissing();
if (skip) console.log(`skipping the NumPy .npy interop test: ${skip}`);

Deno.test({
  name: ".npy files interoperate with NumPy both ways",
  ignore: skip !== null,
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      const ours = join(dir, "ours.npy");
      await Deno.writeFile(
        ours,
        writeNpy({
          dataType: "INT16",
          shape: [2, 3],
          data: new Uint8Array(new Int16Array([1, -2, 3, -4, 5, -6]).buffer),
        }),
      );
      const theirs = join(dir, "theirs.npy");
      const script = `import numpy as np, sys
a = np.load(sys.argv[1]); assert a.dtype == np.int16 and a.shape == (2, 3) and a.tolist() == [[1,-2,3],[-4,5,-6]], a
np.save(sys.argv[2], np.arange(12, dtype=np.float64).reshape(3, 4) / 8)`;
      const out = await new Deno.Command(PYTHON, { args: ["-c", script, ours, theirs] }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const array = readNpy(await Deno.readFile(theirs));
      assert.deepEqual([array.dataType, array.shape], ["FLOAT64", [3, 4]]);
      assert.deepEqual(
        [...new Float64Array(new Uint8Array(array.data).buffer)],
        Array.from({ length: 12 }, (_, i) => i / 8),
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("client status: models, Predict rate and latency from the metrics endpoint, capture backlog", async () => {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-status-" });
  const metrics = `unix:${join(dir, "metrics.sock")}`;
  try {
    await withAgent({ config: { edge_agent_metrics: metrics } }, async (agent) => {
      const folder = await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
      await agent.client.loadModel(folder, "cls");
      const image = [tensor("x", 5, [1, 3, 48, 192], new Float32Array(3 * 48 * 192))];
      for (let i = 0; i < 10; i++) await agent.client.predict("cls", image);
      // Predicts keep flowing while status samples its one-second rate.
      let flowing = true;
      const load = (async () => {
        while (flowing) await agent.client.predict("cls", image);
      })();
      const shown = await client(agent.socket, "status", "--metrics", metrics);
      flowing = false;
      await load;
      assert.equal(shown.code, 0, shown.stderr);
      assert.match(shown.stdout, /^1 model\(s\) loaded/);
      const row = /^ {2}cls +(\d+) +([\d.]+) +([\d.]+) +(\d+)$/m.exec(shown.stdout);
      assert.ok(row, shown.stdout);
      assert.ok(Number(row[1]) > 0, "a rate while predicts flow");
      assert.ok(Number(row[2]) > 0 && Number(row[3]) >= Number(row[2]), "p99 >= p50 > 0");
      assert.ok(Number(row[4]) >= 10);
      assert.match(shown.stdout, /^captures: 0 pending, 0 uploaded, 0 failed, spool \d+ bytes$/m);
      const plain = await client(agent.socket, "status");
      assert.match(plain.stdout, /^1 model\(s\) loaded\n {2}cls /);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("client predict takes PNG and JPEG images: UINT8 NHWC, FLOAT32 NCHW in [0, 1] or normalised, BGR, scaled", async () => {
  const { PNG } = await import("pngjs");
  const jpeg = (await import("jpeg-js")).default;
  await withAgent({}, async (agent) => {
    const [w, h] = [6, 4];
    const png = new PNG({ width: w, height: h });
    for (let i = 0; i < w * h; i++) png.data.set([i * 10, 255 - i, (i * 37) % 256, 255], i * 4);
    const pngFile = join(agent.dir, "image.png");
    await Deno.writeFile(pngFile, PNG.sync.write(png));
    const rgb = Uint8Array.from({ length: w * h * 3 }, (_, k) => png.data[Math.floor(k / 3) * 4 + (k % 3)]);

    const nhwc = await writeModelFolder(agent.modelsDir, "nhwc", identityModel(OnnxType.UINT8, [1, "h", "w", 3]));
    await agent.client.loadModel(nhwc, "nhwc");
    const out = join(agent.dir, "nhwc.npy");
    const asIs = await client(agent.socket, "predict", "nhwc", "--input", `x=${pngFile}`, "--out", out);
    assert.equal(asIs.code, 0, asIs.stderr);
    const saved = readNpy(await Deno.readFile(out));
    assert.deepEqual(saved.shape, [1, h, w, 3]);
    assert.deepEqual(saved.data, rgb);

    const nchw = await writeModelFolder(agent.modelsDir, "nchw", identityModel(OnnxType.FLOAT, [1, 3, "h", "w"]));
    await agent.client.loadModel(nchw, "nchw");
    const scaledOut = join(agent.dir, "nchw.npy");
    // Asked for 8x12: every source pixel becomes a 2x2 block (nearest neighbour).
    const scaled = await client(
      agent.socket,
      "predict",
      "nchw",
      "--input",
      `x=${pngFile}:1,3,8,12`,
      "--out",
      scaledOut,
    );
    assert.equal(scaled.code, 0, scaled.stderr);
    const planes = readNpy(await Deno.readFile(scaledOut));
    assert.deepEqual(planes.shape, [1, 3, 8, 12]);
    const values = floats(planes.data);
    for (const [c, y, x] of [[0, 0, 0], [1, 3, 5], [2, 7, 11], [0, 5, 8]]) {
      const source = rgb[((Math.floor(y / 2)) * w + Math.floor(x / 2)) * 3 + c];
      assert.equal(values[(c * 8 + y) * 12 + x], Math.fround(source / 255), `channel ${c} at ${x},${y}`);
    }

    // PaddleOCR-style normalisation in BGR order: (v / 255 - 0.5) / 0.5 with channels reversed.
    const normalisedOut = join(agent.dir, "normalised.npy");
    const normalised = await client(
      agent.socket,
      "predict",
      "nchw",
      "--input",
      `x=${pngFile}`,
      "--mean",
      "0.5,0.4,0.3",
      "--std",
      "0.5,0.25,0.2",
      "--bgr",
      "--out",
      normalisedOut,
    );
    assert.equal(normalised.code, 0, normalised.stderr);
    const bgr = floats(readNpy(await Deno.readFile(normalisedOut)).data);
    const [mean, std] = [[0.5, 0.4, 0.3], [0.5, 0.25, 0.2]];
    for (const [c, y, x] of [[0, 0, 0], [1, 2, 3], [2, 3, 5]]) {
      const source = rgb[(y * w + x) * 3 + (2 - c)];
      assert.equal(
        bgr[(c * h + y) * w + x],
        Math.fround((source / 255 - mean[c]) / std[c]),
        `${c},${y},${x}`,
      );
    }
    const swappedOut = join(agent.dir, "bgr.npy");
    assert.equal(
      (await client(agent.socket, "predict", "nhwc", "--input", `x=${pngFile}`, "--bgr", "--out", swappedOut)).code,
      0,
    );
    const swapped = readNpy(await Deno.readFile(swappedOut)).data;
    assert.deepEqual(swapped, rgb.map((_, k) => rgb[k - (k % 3) + (2 - (k % 3))]));
    for (
      const [args, message] of [
        [["nhwc", "--mean", "0.5,0.5,0.5"], /--mean and --std apply to FLOAT32 inputs; this one is UINT8/],
        [["nchw", "--std", "1,0,1"], /--std 1,0,1: a channel's std cannot be 0/],
        [["nchw", "--mean", "0.5,0.5"], /--mean 0\.5,0\.5: give three numbers, one per channel/],
      ] as const
    ) {
      const refused = await client(agent.socket, "predict", args[0], "--input", `x=${pngFile}`, ...args.slice(1));
      assert.equal(refused.code, 1, args.join(" "));
      assert.match(refused.stderr, message);
    }

    const jpegFile = join(agent.dir, "image.jpg");
    await Deno.writeFile(jpegFile, jpeg.encode({ width: w, height: h, data: png.data }, 95).data);
    const fromJpeg = await client(agent.socket, "predict", "nhwc", "--input", `x=${jpegFile}`);
    assert.equal(fromJpeg.code, 0, fromJpeg.stderr);
    assert.match(fromJpeg.stdout, /y UINT8 \[1,4,6,3\]/);

    const wrong = await client(agent.socket, "predict", "nchw", "--input", `x=${pngFile}:1,1,4,6`);
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /an image fills \[1,3,H,W\] FLOAT32 or \[1,H,W,3\] UINT8 inputs/);
  });
});

Deno.test("the executable's client: its deployment's socket by default, its permissions, files through - when outside them", async () => {
  await withAgent({}, async (agent) => {
    // What `deno task build` compiles for this deployment, run by deno with the same flags and packages.
    const configPath = join(agent.dir, "config.json");
    const profile = profileFor(
      agent.socket,
      configPath,
      parseConfig(JSON.parse(await Deno.readTextFile(configPath))).config,
    );
    const entry = entryPath(join(agent.dir, "edge-agent-test"));
    await writeEntry(profile, entry);
    const executable = async (args: string[], stdin?: Uint8Array) => {
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "--config", COMPILE_CONFIG, ...profileFlags(profile), entry, ...args],
        stdin: stdin ? "piped" : "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      if (stdin) {
        const writer = child.stdin.getWriter();
        await writer.write(stdin);
        await writer.close();
      }
      const out = await child.output();
      return { code: out.code, stdout: out.stdout, stderr: new TextDecoder().decode(out.stderr) };
    };
    try {
      const listed = await executable(["client", "list"]);
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(new TextDecoder().decode(listed.stdout), /no models loaded/, "the profile's socket is the default");
      const folder = await writeModelFolder(agent.modelsDir, "cls", await Deno.readFile(PADDLE_CLS));
      assert.equal((await executable(["client", "load", folder, "cls"])).code, 0);

      // A file outside the deployment's folders: refused with the way round it.
      const outside = await Deno.makeTempDir();
      try {
        const input = pseudoRandomFloats(3 * 48 * 192, 9);
        const npyBytes = writeNpy({ dataType: "FLOAT32", shape: [1, 3, 48, 192], data: new Uint8Array(input.buffer) });
        const npy = join(outside, "x.npy");
        await Deno.writeFile(npy, npyBytes);
        const refused = await executable(["client", "predict", "cls", "--input", `x=${npy}`]);
        assert.equal(refused.code, 1);
        assert.match(
          refused.stderr,
          new RegExp(
            `x\\.npy: this executable may read only its deployment's folders; pipe the file in instead: --input x=- < ${npy}`,
          ),
        );
        const unwritable = await executable([
          "client",
          "predict",
          "cls",
          "--input",
          "x=-",
          "--out",
          join(outside, "y.npy"),
        ], npyBytes);
        assert.equal(unwritable.code, 1);
        assert.match(unwritable.stderr, /may write only its state folder; write to standard output instead: --out - >/);

        // Through standard input and output: .npy recognised by its contents, summary on stderr.
        const piped = await executable(["client", "predict", "cls", "--input", "x=-", "--out", "-"], npyBytes);
        assert.equal(piped.code, 0, piped.stderr);
        const saved = readNpy(piped.stdout);
        assert.deepEqual(saved.shape, [1, 2]);
        assertClose(floats(saved.data), await reference(PADDLE_CLS, input, [1, 3, 48, 192]));
        assert.match(piped.stderr, /saved softmax_0\.tmp_0 FLOAT32 \[1,2\] to standard output/);

        const raw = await executable(
          ["client", "predict", "cls", "--input", "x=-:1,3,48,192"],
          new Uint8Array(input.buffer),
        );
        assert.equal(raw.code, 0, raw.stderr);
        assert.match(new TextDecoder().decode(raw.stdout), /softmax_0\.tmp_0 FLOAT32 \[1,2\]/);
      } finally {
        await Deno.remove(outside, { recursive: true });
      }

      const elsewhere = await executable(["client", "--socket", join(agent.dir, "other.sock"), "list"]);
      assert.equal(elsewhere.code, 1);
      assert.match(elsewhere.stderr, /may connect only to the socket its deployment profile names/);
    } finally {
      await Deno.remove(entry);
    }
  });
});

Deno.test("client predict summarises a large image-shaped output (PP-OCR det, [1,1,640,640]) from .npy and image inputs", async () => {
  const { PNG } = await import("pngjs");
  await withAgent({}, async (agent) => {
    const folder = await writeModelFolder(agent.modelsDir, "det", await Deno.readFile(PADDLE_DET));
    await agent.client.loadModel(folder, "det");
    const shape = [1, 3, 640, 640];
    // A 320x320 PNG of bands and blocks; the client scales it to 640x640 (each pixel a 2x2 block).
    const side = 320;
    const png = new PNG({ width: side, height: side });
    for (let y = 0; y < side; y++) {
      for (let x = 0; x < side; x++) {
        const ink = (y % 40 < 12 && x % 24 < 16) ? 20 : 235;
        png.data.set([ink, ink, (x + y) % 256, 255], (y * side + x) * 4);
      }
    }
    const image = join(agent.dir, "page.png");
    await Deno.writeFile(image, PNG.sync.write(png));
    const fromImage = new Float32Array(3 * 640 * 640);
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < 640; y++) {
        for (let x = 0; x < 640; x++) {
          fromImage[(c * 640 + y) * 640 + x] = png.data[((y >> 1) * side + (x >> 1)) * 4 + c] / 255;
        }
      }
    }
    const npy = join(agent.dir, "page.npy");
    const fromNpy = pseudoRandomFloats(3 * 640 * 640, 21);
    await Deno.writeFile(npy, writeNpy({ dataType: "FLOAT32", shape, data: new Uint8Array(fromNpy.buffer) }));

    for (const [argument, input] of [[`x=${npy}`, fromNpy], [`x=${image}:1,3,640,640`, fromImage]] as const) {
      const out = join(agent.dir, "map.npy");
      const predicted = await client(agent.socket, "predict", "det", "--input", argument, "--out", out);
      assert.equal(predicted.code, 0, predicted.stderr);
      const expected = await reference(PADDLE_DET, input, shape);
      const saved = readNpy(await Deno.readFile(out));
      assert.deepEqual([saved.dataType, saved.shape], ["FLOAT32", [1, 1, 640, 640]]);
      assertClose(floats(saved.data), expected, 1e-4);
      let [min, max, sum] = [Infinity, -Infinity, 0];
      for (const v of expected) [min, max, sum] = [Math.min(min, v), Math.max(max, v), sum + v];
      const summary = /sigmoid_0\.tmp_0 FLOAT32 \[1,1,640,640\]: min (\S+), max (\S+), mean (\S+)/.exec(
        predicted.stdout,
      );
      assert.ok(summary, predicted.stdout);
      assert.ok(max > min, "a map with text and background");
      const shownValues: [string, number][] = [[summary[1], min], [summary[2], max], [
        summary[3],
        sum / expected.length,
      ]];
      for (const [shown, value] of shownValues) {
        assert.ok(Math.abs(Number(shown) - value) < 1e-4, `${shown} vs ${value}`);
      }
    }
  });
});
