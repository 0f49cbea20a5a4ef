#!/usr/bin/env node
// Explain PNG images with an onnxcam-augmented model in onnxruntime-node: for each image, the
// overlay <stem>_<class>.png and the raw map <stem>_<class>.npy (float32 [H, W] in [0, 1] at the
// model input's resolution), and one JSON line on stdout. No onnxcam code runs here: the model
// computes its own map.
//
//   node explain.mjs MODEL.cam.onnx IMAGE.png... [--class=K | --class=K1,K2,...] [--preset NAME]
//                    [--out DIR] [--alpha A]
//
// --class=-1 (the default) explains each image's top class. All images go through the model as
// one batch, so they must share a size or be resized (bilinear) to the model's input size.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, extname, join } from "node:path";
import { parseArgs } from "node:util";
import ort from "onnxruntime-node";
import pngjs from "pngjs";

// x = (pixel * scale - mean) / std per RGB channel, as onnxcam's presets (onnxcam/io/preprocess.py).
const PRESETS = {
  imagenet: { scale: 1 / 255, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] },
  symmetric: { scale: 1 / 127.5, mean: [1, 1, 1], std: [1, 1, 1] },
  unit: { scale: 1 / 255, mean: [0, 0, 0], std: [1, 1, 1] },
  raw: { scale: 1, mean: [0, 0, 0], std: [1, 1, 1] },
};

// The augmented-model contract (README): the run-time choices, fed on every run; -1 = automatic.
const CLASS_INPUT = "onnxcam_class";
const AUTOMATIC_INT_INPUTS = ["onnxcam_box", "onnxcam_step"];
const MASK_INPUT = "onnxcam_mask";

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

function readRgb(path) {
  let png;
  try {
    png = pngjs.PNG.sync.read(readFileSync(path));
  } catch (err) {
    fail(`${path}: not a readable PNG (${err.message})`);
  }
  const rgb = new Uint8Array(png.width * png.height * 3);
  for (let i = 0; i < png.width * png.height; i++) {
    rgb.set(png.data.subarray(4 * i, 4 * i + 3), 3 * i);  // drop alpha
  }
  return { width: png.width, height: png.height, rgb };
}

// Bilinear resize with half-pixel centres (cv2.INTER_LINEAR) of `channels` interleaved planes.
function resizeBilinear(src, sw, sh, dw, dh, channels) {
  if (sw === dw && sh === dh) return src;
  const dst = new Float32Array(dw * dh * channels);
  for (let y = 0; y < dh; y++) {
    const fy = Math.min(Math.max((y + 0.5) * (sh / dh) - 0.5, 0), sh - 1);
    const y0 = Math.floor(fy), y1 = Math.min(y0 + 1, sh - 1), wy = fy - y0;
    for (let x = 0; x < dw; x++) {
      const fx = Math.min(Math.max((x + 0.5) * (sw / dw) - 0.5, 0), sw - 1);
      const x0 = Math.floor(fx), x1 = Math.min(x0 + 1, sw - 1), wx = fx - x0;
      for (let c = 0; c < channels; c++) {
        const at = (yy, xx) => src[(yy * sw + xx) * channels + c];
        const top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx;
        const bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx;
        dst[(y * dw + x) * channels + c] = top * (1 - wy) + bottom * wy;
      }
    }
  }
  return dst;
}

// RGB pixels -> planar float32 [3, H, W], computed in float32 exactly as numpy does
// ((pixel * float32(scale) - mean) / std, each step rounded to float32).
function toChw(rgb, width, height, preset, out, offset) {
  const f = Math.fround, plane = width * height;
  for (let c = 0; c < 3; c++) {
    const scale = f(preset.scale), mean = f(preset.mean[c]), std = f(preset.std[c]);
    for (let i = 0; i < plane; i++) {
      const pixel = Math.round(rgb[3 * i + c]);
      out[offset + c * plane + i] = f(f(f(pixel * scale) - mean) / std);
    }
  }
}

// Jet colour map (blue -> red), the default of onnxcam's overlays.
function jet(t) {
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  return [clamp(1.5 - Math.abs(4 * t - 3)), clamp(1.5 - Math.abs(4 * t - 2)), clamp(1.5 - Math.abs(4 * t - 1))];
}

function writeOverlay(path, image, cam, camWidth, camHeight, alpha) {
  const heat = resizeBilinear(cam, camWidth, camHeight, image.width, image.height, 1);
  const png = new pngjs.PNG({ width: image.width, height: image.height });
  for (let i = 0; i < image.width * image.height; i++) {
    const colour = jet(heat[i]);
    for (let c = 0; c < 3; c++) {
      png.data[4 * i + c] = Math.round((1 - alpha) * image.rgb[3 * i + c] + alpha * 255 * colour[c]);
    }
    png.data[4 * i + 3] = 255;
  }
  writeFileSync(path, pngjs.PNG.sync.write(png));
}

// A float32 array as a .npy file (format 1.0), readable by numpy.load.
function writeNpy(path, data, shape) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")},), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";  // pad to a multiple of 64 bytes
  const prefix = Buffer.alloc(10);
  prefix.write("\x93NUMPY", 0, "latin1");
  prefix.writeUInt8(1, 6);
  prefix.writeUInt16LE(header.length, 8);
  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  writeFileSync(path, Buffer.concat([prefix, Buffer.from(header, "latin1"), body]));
}

function parseClasses(text, n) {
  const classes = String(text).split(",").map((s) => Number(s.trim()));
  if (classes.some((k) => !Number.isInteger(k) || k < -1)) fail(`--class takes integers >= -1, got ${text}`);
  if (classes.length === 1) return new Array(n).fill(classes[0]);
  if (classes.length !== n) fail(`--class lists ${classes.length} classes for ${n} images`);
  return classes;
}

function parseCommandLine() {
  try {
    return parseArgs({
      allowPositionals: true,
      options: {
        class: { type: "string", default: "-1" },
        preset: { type: "string", default: "imagenet" },
        out: { type: "string", default: "." },
        alpha: { type: "string", default: "0.5" },
      },
    });
  } catch (err) {
    fail(`${err.message.split("\n")[0]} (a negative class is written --class=-1)`);
  }
}

async function main() {
  const { values: opts, positionals } = parseCommandLine();
  const [modelPath, ...imagePaths] = positionals;
  if (!modelPath || imagePaths.length === 0) fail("usage: explain.mjs MODEL.cam.onnx IMAGE.png... [--class K]");
  const preset = PRESETS[opts.preset] ?? fail(`unknown preset ${opts.preset} (${Object.keys(PRESETS).join(", ")})`);
  const classes = parseClasses(opts.class, imagePaths.length);
  const alpha = Number(opts.alpha);
  if (!(alpha >= 0 && alpha <= 1)) fail(`--alpha must be between 0 and 1, got ${opts.alpha}`);

  const session = await ort.InferenceSession.create(modelPath);
  if (!session.outputNames.includes("onnxcam_cam")) fail(`${modelPath} has no onnxcam_cam output: augment it with onnxcam first`);
  const image = session.inputMetadata.find((m) => !m.name.startsWith("onnxcam_")) ?? fail(`${modelPath} has no image input`);
  const [, channels, height, width] = image.shape;
  if (channels !== 3 || !Number.isInteger(height) || !Number.isInteger(width)) {
    fail(`${modelPath}: this example feeds NCHW RGB images of a fixed size; the input ${image.name} is [${image.shape}]`);
  }

  // The batch: every image decoded, resized to the model's size and normalised into one tensor.
  const n = imagePaths.length, plane = height * width;
  const pixels = new Float32Array(n * 3 * plane);
  const images = imagePaths.map((path, i) => {
    const img = readRgb(path);
    toChw(resizeBilinear(img.rgb, img.width, img.height, width, height, 3), width, height, preset, pixels, i * 3 * plane);
    return img;
  });
  const scores = session.outputMetadata.find((m) => !m.name.startsWith("onnxcam_") && m.shape?.length === 2);
  const numClasses = scores?.shape[1];
  if (Number.isInteger(numClasses) && classes.some((k) => k >= numClasses)) {
    fail(`--class ${opts.class}: out of range; ${scores.name} has classes 0..${numClasses - 1} (-1 = the top class)`);
  }
  const feeds = { [image.name]: new ort.Tensor("float32", pixels, [n, 3, height, width]) };
  for (const name of session.inputNames.filter((name) => name.startsWith("onnxcam_"))) {
    if (name === CLASS_INPUT) feeds[name] = new ort.Tensor("int64", BigInt64Array.from(classes, BigInt), [n]);
    else if (AUTOMATIC_INT_INPUTS.includes(name)) feeds[name] = new ort.Tensor("int64", new BigInt64Array(n).fill(-1n), [n]);
    else if (name === MASK_INPUT) feeds[name] = new ort.Tensor("float32", new Float32Array(plane), [1, height, width]);
    else fail(`${modelPath} takes ${name}; this example explains classifiers and does not know how to feed it`);
  }
  if (!session.inputNames.includes(CLASS_INPUT) && classes.some((k) => k !== -1)) {
    // Older augmented models hide onnxcam_class behind an initializer: a feed would be ignored.
    fail(`${modelPath} has no ${CLASS_INPUT} input, so a class cannot be chosen; re-augment it with a current onnxcam`);
  }

  const out = await session.run(feeds);
  const cams = out.onnxcam_cam.data, explained = out.onnxcam_class_index.data, explainedScores = out.onnxcam_score.data;
  mkdirSync(opts.out, { recursive: true });
  images.forEach((img, i) => {
    const cam = cams.subarray(i * plane, (i + 1) * plane);
    const stem = `${basename(imagePaths[i], extname(imagePaths[i]))}_${explained[i]}`;
    const mapPath = join(opts.out, `${stem}.npy`), overlayPath = join(opts.out, `${stem}.png`);
    writeNpy(mapPath, cam, [height, width]);
    writeOverlay(overlayPath, img, cam, width, height, alpha);
    console.log(JSON.stringify({ image: imagePaths[i], class_index: Number(explained[i]), score: explainedScores[i],
                                 map: mapPath, overlay: overlayPath }));
  });
}

await main().catch((err) => fail(err.message));
