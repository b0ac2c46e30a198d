// End to end on an embedded default: start the agent on a temporary socket, load PaddleOCR's
// text-direction classifier, classify a synthetic text line and its 180-degree rotation through
// the real gRPC client, print the result and stop the agent.

import { enumValues } from "../src/service/wire.ts";
import { startAgent } from "../tests/helpers/agent.ts";
import { floats, tensor } from "../tests/helpers/assertions.ts";
import { PADDLE_CLS, writeModelFolder } from "../tests/helpers/onnx_models.ts";

const [H, W] = [48, 192];

/** A dark "text line" on white whose strokes sit low, like writing on a baseline; CHW, normalized. */
function textLine(rotated: boolean): Float32Array {
  const pixels = new Float32Array(3 * H * W);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const glyph = Math.floor(x / 12) % 2 === 0 && x % 12 < 8;
      const stroke = (y > 14 && y < 40 && glyph && (x % 4 < 2 || y > 34)) || (y > 6 && y < 14 && x % 24 < 3);
      const value = stroke ? 0 : 255;
      const [py, px] = rotated ? [H - 1 - y, W - 1 - x] : [y, x];
      for (let c = 0; c < 3; c++) pixels[c * H * W + py * W + px] = (value / 255 - 0.5) / 0.5;
    }
  }
  return pixels;
}

const agent = await startAgent();
try {
  // A signed package: the model and model.sig (OpenSSF Model Signing), signed by a development
  // certificate whose root the agent trusts.
  const modelDir = await writeModelFolder(agent.modelsDir, "text-direction", await Deno.readFile(PADDLE_CLS));
  console.log(`agent serving on ${agent.socket}`);
  const { model } = await agent.client.loadModel(modelDir, "text-direction");
  console.log(`loaded ${model.name} from ${model.url} (signature verified)`);
  for (const rotated of [false, true]) {
    const input = tensor("x", enumValues("DataType").FLOAT32, [1, 3, H, W], textLine(rotated));
    const started = performance.now();
    const { tensors } = await agent.client.predict("text-direction", [input]);
    const ms = (performance.now() - started).toFixed(1);
    const [upright, upsideDown] = floats(tensors[0].byte_data);
    console.log(
      `${rotated ? "rotated" : "upright"} text line: P(0°) = ${upright.toFixed(4)}, P(180°) = ${
        upsideDown.toFixed(4)
      } (${ms} ms)`,
    );
  }
} finally {
  const status = await agent.stop("SIGTERM");
  await Deno.remove(agent.dir, { recursive: true });
  console.log(`agent stopped (exit ${status.code})`);
  if (status.code !== 0) {
    console.error(agent.logs());
    Deno.exitCode = 1;
  }
}
