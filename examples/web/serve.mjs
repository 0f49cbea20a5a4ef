// A static file server for this folder on 127.0.0.1 only (the page, app.mjs and onnxruntime-web
// from node_modules). It sends the cross-origin-isolation headers, so onnxruntime-web may use
// wasm threads (SharedArrayBuffer).
//
//   node serve.mjs [PORT]        then open http://127.0.0.1:PORT/
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL(".", import.meta.url));
const TYPES = { ".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript",
                ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css",
                ".onnx": "application/octet-stream", ".txt": "text/plain" };

export function startServer(port = 0) {
  const server = createServer((request, response) => {
    const path = decodeURIComponent(new URL(request.url, "http://127.0.0.1").pathname);
    const file = normalize(join(ROOT, path === "/" ? "index.html" : path));
    let size = -1;
    try {
      if (file.startsWith(ROOT) && !file.slice(ROOT.length).split(sep).includes("..")) size = statSync(file).isFile() ? statSync(file).size : -1;
    } catch {
      size = -1;
    }
    if (size < 0) {
      response.writeHead(404).end("not found");
      return;
    }
    response.writeHead(200, {
      "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
      "Content-Length": size,
      "Cross-Origin-Opener-Policy": "same-origin",
      "Cross-Origin-Embedder-Policy": "require-corp",
    });
    createReadStream(file).pipe(response);
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const server = await startServer(Number(process.argv[2] ?? 8080));
  console.log(`serving ${ROOT} at http://127.0.0.1:${server.address().port}/`);
}
