// The page's logic: an onnxcam-augmented model in onnxruntime-web explains the picked images.
// The model computes the map itself; this file only preprocesses, feeds and draws.
import * as ort from "./node_modules/onnxruntime-web/dist/ort.min.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;

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
const ALPHA = 0.5;
const TOP = 5;

const $ = (id) => document.getElementById(id);

// The image's pixels at the model's size, RGBA; no colour conversion, so a PNG at the model's
// size arrives byte for byte as in Python.
async function readPixels(file, width, height) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { colorSpace: "srgb" });
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

// RGBA -> planar float32 [3, H, W], in float32 arithmetic as numpy (each step rounded to float32).
function toChw(rgba, plane, preset, out, offset) {
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const scale = f(preset.scale), mean = f(preset.mean[c]), std = f(preset.std[c]);
    for (let i = 0; i < plane; i++) out[offset + c * plane + i] = f(f(f(rgba[4 * i + c] * scale) - mean) / std);
  }
}

function jet(t) {
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  return [clamp(1.5 - Math.abs(4 * t - 3)), clamp(1.5 - Math.abs(4 * t - 2)), clamp(1.5 - Math.abs(4 * t - 1))];
}

function drawOverlay(rgba, cam, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const colour = jet(cam[i]);
    for (let c = 0; c < 3; c++) image.data[4 * i + c] = Math.round((1 - ALPHA) * rgba[4 * i + c] + ALPHA * 255 * colour[c]);
    image.data[4 * i + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

function topClasses(logits, k) {
  const max = Math.max(...logits);
  const exps = Array.from(logits, (v) => Math.exp(v - max));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((e, index) => ({ index, probability: e / total }))
    .sort((a, b) => b.probability - a.probability).slice(0, k);
}

function parseClasses(text, n) {
  const classes = String(text).split(",").map((s) => Number(s.trim()));
  if (classes.some((k) => !Number.isInteger(k) || k < -1)) throw new Error(`class: integers >= -1, got ${text}`);
  if (classes.length === 1) return new Array(n).fill(classes[0]);
  if (classes.length !== n) throw new Error(`${classes.length} classes for ${n} images`);
  return classes;
}

async function backend(ep) {
  if (ep !== "webgpu") return ["wasm"];
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
  if (!adapter) return null;
  return ["webgpu"];
}

function feedsFor(session, imageName, pixels, shape, classes) {
  const [n, , height, width] = shape;
  const feeds = { [imageName]: new ort.Tensor("float32", pixels, shape) };
  for (const name of session.inputNames.filter((name) => name.startsWith("onnxcam_"))) {
    if (name === CLASS_INPUT) feeds[name] = new ort.Tensor("int64", BigInt64Array.from(classes, BigInt), [n]);
    else if (AUTOMATIC_INT_INPUTS.includes(name)) feeds[name] = new ort.Tensor("int64", new BigInt64Array(n).fill(-1n), [n]);
    else if (name === MASK_INPUT) feeds[name] = new ort.Tensor("float32", new Float32Array(height * width), [1, height, width]);
    else throw new Error(`the model takes ${name}; this page explains classifiers and does not feed it`);
  }
  if (!session.inputNames.includes(CLASS_INPUT) && classes.some((k) => k !== -1)) {
    throw new Error(`the model has no ${CLASS_INPUT} input, so a class cannot be chosen; re-augment it with a current onnxcam`);
  }
  return feeds;
}

// Explain `imageFiles` with the augmented model `modelBytes`; draws into #results and returns
// the numbers (also for the headless check, which reads window.onnxcamResult).
export async function explain({ modelBytes, imageFiles, classText, presetName, ep, labels }) {
  const providers = await backend(ep);
  if (!providers) return { skipped: "no WebGPU adapter in this browser" };
  const session = await ort.InferenceSession.create(modelBytes, { executionProviders: providers });
  const image = session.inputMetadata.find((m) => !m.name.startsWith("onnxcam_"));
  const [, channels, height, width] = image.shape;
  if (channels !== 3 || !Number.isInteger(height) || !Number.isInteger(width)) {
    throw new Error(`this page feeds NCHW RGB images of a fixed size; the input ${image.name} is [${image.shape}]`);
  }
  const n = imageFiles.length, plane = height * width;
  const preset = PRESETS[presetName];
  const classes = parseClasses(classText, n);
  const pixels = new Float32Array(n * 3 * plane);
  const rgbas = [];
  for (let i = 0; i < n; i++) {
    rgbas.push(await readPixels(imageFiles[i], width, height));
    toChw(rgbas[i], plane, preset, pixels, i * 3 * plane);
  }
  const scores = session.outputMetadata.find((m) => !m.name.startsWith("onnxcam_") && m.shape?.length === 2);
  if (Number.isInteger(scores?.shape[1]) && classes.some((k) => k >= scores.shape[1])) {
    throw new Error(`class ${classText} is out of range: ${scores.name} has classes 0..${scores.shape[1] - 1}`);
  }
  const feeds = feedsFor(session, image.name, pixels, [n, 3, height, width], classes);
  const started = performance.now();
  const out = await session.run(feeds);
  const milliseconds = performance.now() - started;

  const logitsName = session.outputNames.find((name) => !name.startsWith("onnxcam_") && out[name].dims.length === 2);
  const cams = out.onnxcam_cam.data;
  const result = { ep: providers[0], shape: [n, height, width], milliseconds, classIndex: [], score: [], top: [] };
  const results = $("results");
  results.replaceChildren();
  for (let i = 0; i < n; i++) {
    const cam = cams.subarray(i * plane, (i + 1) * plane);
    const explained = Number(out.onnxcam_class_index.data[i]);
    result.classIndex.push(explained);
    result.score.push(out.onnxcam_score.data[i]);
    const numClasses = logitsName ? out[logitsName].dims[1] : 0;
    const top = logitsName ? topClasses(out[logitsName].data.subarray(i * numClasses, (i + 1) * numClasses), TOP) : [];
    result.top.push(top);
    const name = (k) => (labels && labels[k] ? `${k} ${labels[k]}` : `${k}`);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.innerText = `${imageFiles[i].name}: explained ${name(explained)} (score ${result.score[i].toFixed(3)})\n` +
      top.map((t) => `${name(t.index)}: ${(100 * t.probability).toFixed(1)} %`).join("\n");
    figure.append(drawOverlay(rgbas[i], cam, width, height), caption);
    results.append(figure);
  }
  result.cams = cams;
  return result;
}

async function onExplain() {
  const status = $("status");
  status.className = "";
  window.onnxcamResult = undefined;
  try {
    const modelFile = $("model").files[0], imageFiles = [...$("images").files];
    if (!modelFile || imageFiles.length === 0) throw new Error("pick an augmented model and at least one image");
    status.innerText = "Running…";
    const labelsFile = $("labels").files[0];
    const result = await explain({
      modelBytes: new Uint8Array(await modelFile.arrayBuffer()), imageFiles, classText: $("class").value,
      presetName: $("preset").value, ep: $("ep").value,
      labels: labelsFile ? (await labelsFile.text()).split(/\r?\n/) : null,
    });
    status.innerText = result.skipped ? `Skipped: ${result.skipped}.` : `Done with ${result.ep} in ${result.milliseconds.toFixed(0)} ms.`;
    window.onnxcamResult = result;
  } catch (err) {
    status.className = "error";
    status.innerText = `Error: ${err.message ?? err}`;
    window.onnxcamResult = { error: String(err.message ?? err) };
  }
}

$("explain").addEventListener("click", onExplain);
window.onnxcamReady = true;
