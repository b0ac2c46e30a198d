// PNG and JPEG files as model inputs for the client command line: decoded (pngjs, jpeg-js: maintained,
// pure JavaScript, no native build) to RGB, scaled to the input's height and width, and laid out as
// the model takes it: FLOAT32 NCHW with values in [0, 1], then (v - mean) / std per channel, or UINT8
// NHWC as they are; either in BGR order when asked. Anything else takes a .npy prepared by the user.

import { Buffer } from "node:buffer";

export interface RgbImage {
  width: number;
  height: number;
  /** RGBA, 8 bits per channel, row by row. */
  rgba: Uint8Array;
}

/** The codecs load with the first image: other client commands never hold them. */
export async function decodeImage(format: "png" | "jpeg", bytes: Uint8Array): Promise<RgbImage> {
  if (format === "png") {
    const { PNG } = await import("pngjs");
    const png = PNG.sync.read(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    return { width: png.width, height: png.height, rgba: new Uint8Array(png.data) };
  }
  const { default: jpeg } = await import("jpeg-js");
  const decoded = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true });
  return { width: decoded.width, height: decoded.height, rgba: decoded.data };
}

/** Nearest-neighbour sample of channel `c` at output pixel (x, y) of a `width` x `height` grid. */
function sample(image: RgbImage, width: number, height: number, x: number, y: number, c: number): number {
  const sx = Math.min(image.width - 1, Math.floor((x * image.width) / width));
  const sy = Math.min(image.height - 1, Math.floor((y * image.height) / height));
  return image.rgba[(sy * image.width + sx) * 4 + c];
}

/** Per-channel normalisation (in the model's channel order) and channel order. */
export interface ImageOptions {
  mean: [number, number, number];
  std: [number, number, number];
  bgr: boolean;
}

export const PLAIN_IMAGE: ImageOptions = { mean: [0, 0, 0], std: [1, 1, 1], bgr: false };

/**
 * The image as a tensor for an input of `shape` (-1 = take the image's size) and data type:
 * FLOAT32 [N,3,H,W] or UINT8 [N,H,W,3] (N = 1). Returns the shape used and the bytes.
 */
export function imageTensor(
  image: RgbImage,
  shape: number[],
  dataType: "FLOAT32" | "UINT8",
  options: ImageOptions = PLAIN_IMAGE,
): {
  shape: number[];
  data: Uint8Array;
} {
  if (shape.length !== 4) throw new Error(`an image fills a 4-D input; this one is [${shape}]`);
  const nchw = dataType === "FLOAT32";
  const [n, a, b, c] = shape.map((d, i) => (d >= 0 ? d : i === 0 ? 1 : -1));
  const channels = nchw ? a : c;
  if (n !== 1 || channels !== 3) {
    throw new Error(`an image fills [1,3,H,W] FLOAT32 or [1,H,W,3] UINT8 inputs; this one is [${shape}]`);
  }
  const normalised = options.mean.some((m) => m !== 0) || options.std.some((s) => s !== 1);
  if (!nchw && normalised) throw new Error("--mean and --std apply to FLOAT32 inputs; this one is UINT8");
  // Channel c of the tensor comes from source channel source[c] (RGBA order).
  const source = options.bgr ? [2, 1, 0] : [0, 1, 2];
  const height = (nchw ? b : a) > 0 ? (nchw ? b : a) : image.height;
  const width = (nchw ? c : b) > 0 ? (nchw ? c : b) : image.width;
  if (nchw) {
    const out = new Float32Array(3 * height * width);
    for (let ch = 0; ch < 3; ch++) {
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          const value = sample(image, width, height, x, y, source[ch]) / 255;
          out[(ch * height + y) * width + x] = (value - options.mean[ch]) / options.std[ch];
        }
      }
    }
    return { shape: [1, 3, height, width], data: new Uint8Array(out.buffer) };
  }
  const out = new Uint8Array(height * width * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let ch = 0; ch < 3; ch++) {
        out[(y * width + x) * 3 + ch] = sample(image, width, height, x, y, source[ch]);
      }
    }
  }
  return { shape: [1, height, width, 3], data: out };
}
