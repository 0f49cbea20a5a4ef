// Drive the page in headless Chromium as a user would: pick the model and the images, press
// Explain, read the maps back. Writes DIR/maps.npy (float32 [N, H, W]), DIR/result.json and a
// screenshot DIR/page.png; prints the result (without the maps) as one JSON line.
//
//   node check.mjs --model MODEL.cam.onnx --out DIR [--class K[,K...]] [--preset P] [--ep wasm|webgpu]
//                  [--labels FILE] [--chromium /usr/bin/chromium] IMAGE...
//
// The page is served on 127.0.0.1 only; the browser gets a fresh profile and no network services.
// --ep webgpu asks Chromium for a software WebGPU adapter (SwiftShader); when none is offered the
// result is {"skipped": ...} and the exit code 0: WebGPU is optional, wasm is not.
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { startServer } from "./serve.mjs";

const QUIET_CHROMIUM = ["--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync"];
const WEBGPU = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"];

function writeNpy(path, bytes, shape) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")},), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const prefix = Buffer.alloc(10);
  prefix.write("\x93NUMPY", 0, "latin1");
  prefix.writeUInt8(1, 6);
  prefix.writeUInt16LE(header.length, 8);
  writeFileSync(path, Buffer.concat([prefix, Buffer.from(header, "latin1"), bytes]));
}

const { values: opts, positionals: images } = parseArgs({
  allowPositionals: true,
  options: {
    model: { type: "string" }, out: { type: "string" }, class: { type: "string", default: "-1" },
    preset: { type: "string", default: "imagenet" }, ep: { type: "string", default: "wasm" },
    labels: { type: "string" }, chromium: { type: "string", default: "/usr/bin/chromium" },
    timeout: { type: "string", default: "300" },
  },
});
if (!opts.model || !opts.out || images.length === 0) {
  console.error("usage: check.mjs --model MODEL.cam.onnx --out DIR [--class K] [--preset P] [--ep wasm|webgpu] IMAGE...");
  process.exit(2);
}

const server = await startServer(0);
const profile = mkdtempSync(join(tmpdir(), "onnxcam-chromium-"));
let context;
let exitCode = 0;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium, headless: true,
    args: [...QUIET_CHROMIUM, ...(opts.ep === "webgpu" ? WEBGPU : ["--disable-gpu"])],
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.on("console", (message) => console.error(`[page ${message.type()}] ${message.text()}`));
  page.on("pageerror", (error) => console.error(`[page error] ${error.message}`));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => window.onnxcamReady === true);
  await page.setInputFiles("#model", resolve(opts.model));
  await page.setInputFiles("#images", images.map((image) => resolve(image)));
  if (opts.labels) await page.setInputFiles("#labels", resolve(opts.labels));
  await page.fill("#class", opts.class);
  await page.selectOption("#preset", opts.preset);
  await page.selectOption("#ep", opts.ep);
  await page.click("#explain");
  await page.waitForFunction(() => window.onnxcamResult !== undefined, null, { timeout: Number(opts.timeout) * 1000 });
  const result = await page.evaluate(() => {
    const { cams, ...rest } = window.onnxcamResult;
    if (!cams) return rest;
    const bytes = new Uint8Array(cams.buffer, cams.byteOffset, cams.byteLength);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return { ...rest, camsBase64: btoa(binary) };
  });
  result.browser = context.browser()?.version() ?? (await page.evaluate(() => navigator.userAgent));
  mkdirSync(opts.out, { recursive: true });
  await page.screenshot({ path: join(opts.out, "page.png"), fullPage: true });
  if (result.camsBase64) {
    writeNpy(join(opts.out, "maps.npy"), Buffer.from(result.camsBase64, "base64"), result.shape);
    delete result.camsBase64;
  }
  writeFileSync(join(opts.out, "result.json"), JSON.stringify(result, null, 1));
  if (result.error) {
    console.error(`error: the page reported: ${result.error}`);
    exitCode = 1;
  } else if (result.skipped) {
    console.error(`note: ${opts.ep} skipped: ${result.skipped}`);
  }
  console.log(JSON.stringify(result));
} finally {
  await context?.close();
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(exitCode);
