"""The examples in examples/ (Node, the browser, C++) against onnxcam's Python Explainer.

Each example runs as a user runs it (a subprocess: `node explain.mjs`, the CMake-built `explain`,
the page driven in headless Chromium) on the real EfficientNet-Lite0, freshly exported and
augmented here, with skimage's chelsea (a cat) and coffee photos; its maps must equal the
Explainer's within 1e-5 for the top class and for class 281 (tabby cat), at batch 1 and 2, and for
one class per image. (Class 281 on the coffee photo is not asked: a class with no evidence in the
image has a map of tiny gradients, where float32 kernels of wasm and native builds already differ
by 9e-6 after normalisation.)

The tools (node/npm, cmake and a C++ compiler, Debian's chromium) are installed by .ci/run. A
missing one fails the test under CI (CI set) and skips it with what to install elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxcam
from onnxcam.io.images import read_image
from onnxcam.io.preprocess import Preprocessor

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is part of the dev extra")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHROMIUM = "/usr/bin/chromium"
MAP_TOLERANCE = 1e-5
PRESET = "symmetric"  # the demo EfficientNet-Lite0's preprocessing
CASES = {  # name: (photos in the batch, --class)
    "top-class-batch1": (["chelsea"], "-1"),
    "class281-batch1": (["chelsea"], "281"),
    "top-class-batch2": (["chelsea", "coffee"], "-1"),
    "class281-batch2": (["chelsea", "chelsea_mirrored"], "281"),
    "per-image-classes-batch2": (["chelsea", "coffee"], "281,-1"),
}


def require(tool: str, how: str) -> str:
    path = shutil.which(tool) if not os.path.isabs(tool) else (tool if os.access(tool, os.X_OK) else None)
    if path:
        return path
    message = f"{tool} is missing: {how} (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(command, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def npm_ci(folder: Path):
    require("npm", "install Node.js 18+ and npm")
    if not (folder / "node_modules").is_dir():
        run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The real EfficientNet-Lite0 (exported once), its augmented twin, the photos as 224x224 PNGs
    and the Python Explainer's result for every case."""
    import cv2
    from onnxcam import demo_export

    folder = tmp_path_factory.mktemp("examples")
    original = demo_export.export(folder / "efficientnet-lite0.onnx")
    augmented = folder / "efficientnet-lite0.cam.onnx"
    import onnx
    onnx.save(onnxcam.augment(str(original)), augmented)
    photos = {}
    for name in ("chelsea", "coffee"):
        rgb = cv2.resize(getattr(skimage_data, name)(), (224, 224), interpolation=cv2.INTER_AREA)
        for variant, pixels in ((name, rgb), (f"{name}_mirrored", rgb[:, ::-1])):
            photos[variant] = folder / f"{variant}.png"
            cv2.imwrite(str(photos[variant]), np.ascontiguousarray(pixels[:, :, ::-1]))
    explainer = onnxcam.Explainer(str(original))
    expected = {}
    for case, (names, class_text) in CASES.items():
        batch, _ = Preprocessor(size=(224, 224), preset=PRESET).batch(read_image(photos[n]) for n in names)
        result = explainer(batch, class_index=[int(k) for k in class_text.split(",")])
        # A comparison must not pass on flat maps: the reference is a real, peaked map.
        assert result.cam.min() < 0.05 and result.cam.max() > 0.95 and result.cam.std() > 0.1
        expected[case] = result
    assert expected["top-class-batch1"].class_index[0] != 281, "class 281 must differ from the top class"
    return {"original": original, "augmented": augmented, "photos": photos, "expected": expected, "folder": folder}


def assert_same(case, maps, classes, demo):
    expected = demo["expected"][case]
    np.testing.assert_array_equal(np.asarray(classes), expected.class_index)
    assert maps.shape == expected.cam.shape
    difference = float(np.max(np.abs(maps - expected.cam)))
    print(f"{case}: max map difference from Python {difference:.3g}")  # shown with pytest -rP
    assert difference <= MAP_TOLERANCE, f"{case}: map differs from Python's by {difference:.3g}"


@pytest.fixture(scope="module")
def node_example():
    require("node", "install Node.js 18+")
    npm_ci(EXAMPLES / "node")
    return EXAMPLES / "node"


@pytest.mark.parametrize("case", CASES)
def test_node_example_matches_python(node_example, demo, case, tmp_path):
    names, class_text = CASES[case]
    done = run(["node", "explain.mjs", demo["augmented"], *(demo["photos"][n] for n in names),
                f"--class={class_text}", "--preset", PRESET, "--out", tmp_path], cwd=node_example)
    records = [json.loads(line) for line in done.stdout.splitlines()]
    maps = np.stack([np.load(r["map"]) for r in records])
    assert all(Path(r["overlay"]).stat().st_size > 0 for r in records)
    assert_same(case, maps, [r["class_index"] for r in records], demo)


def test_node_example_refuses_a_class_out_of_range(node_example, demo, tmp_path):
    done = subprocess.run(["node", "explain.mjs", str(demo["augmented"]), str(demo["photos"]["chelsea"]),
                           "--class=1000", "--out", str(tmp_path)], cwd=node_example, capture_output=True, text=True)
    assert done.returncode == 2 and "out of range" in done.stderr and "0..999" in done.stderr, done.stderr
    assert "at " not in done.stderr, "one line, no stack trace"
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def cpp_example(tmp_path_factory):
    require("cmake", "apt-get install cmake")
    require("c++", "apt-get install g++")
    build = tmp_path_factory.mktemp("cpp-build")
    source = EXAMPLES / "cpp"
    run(["bash", source / "fetch_headers.sh"])
    run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}"])
    run(["cmake", "--build", build])
    return build / "explain"


@pytest.mark.parametrize("case", CASES)
def test_cpp_example_matches_python(cpp_example, demo, case, tmp_path):
    names, class_text = CASES[case]
    batch, _ = Preprocessor(size=(224, 224), preset=PRESET).batch(read_image(demo["photos"][n]) for n in names)
    np.save(tmp_path / "batch.npy", batch)
    done = run([cpp_example, demo["augmented"], tmp_path / "batch.npy", tmp_path / "maps.npy", "--class", class_text])
    classes = [json.loads(line)["class_index"] for line in done.stdout.splitlines()]
    assert_same(case, np.load(tmp_path / "maps.npy"), classes, demo)


def test_cpp_example_refuses_a_class_out_of_range(cpp_example, demo, tmp_path):
    batch, _ = Preprocessor(size=(224, 224), preset=PRESET).batch([read_image(demo["photos"]["chelsea"])])
    np.save(tmp_path / "batch.npy", batch)
    done = subprocess.run([str(cpp_example), str(demo["augmented"]), str(tmp_path / "batch.npy"), str(tmp_path / "maps.npy"),
                           "--class", "1000"], capture_output=True, text=True)
    assert done.returncode == 2 and "out of range" in done.stderr and "0..999" in done.stderr, done.stderr
    assert not (tmp_path / "maps.npy").exists()


def test_cpp_make_batch_is_onnxcams_preprocessing(demo, tmp_path):
    """The README's route to the C++ example's input: make_batch.py writes what the test feeds."""
    photos = [demo["photos"][n] for n in ("chelsea", "coffee")]
    run([sys.executable, EXAMPLES / "cpp" / "make_batch.py", tmp_path / "b.npy", *photos, "--preset", PRESET])
    expected, _ = Preprocessor(size=(224, 224), preset=PRESET).batch(read_image(p) for p in photos)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), expected)


@pytest.fixture(scope="module")
def web_example():
    require("node", "install Node.js 18+")
    require(CHROMIUM, "apt-get install chromium")
    npm_ci(EXAMPLES / "web")
    return EXAMPLES / "web"


def run_page(web_example, demo, names, class_text, out, ep="wasm") -> dict:
    done = run(["node", "check.mjs", "--model", demo["augmented"], "--out", out, f"--class={class_text}",
                "--preset", PRESET, "--ep", ep, "--chromium", CHROMIUM, *(demo["photos"][n] for n in names)],
               cwd=web_example)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_web_example_matches_python(web_example, demo, case, tmp_path):
    names, class_text = CASES[case]
    result = run_page(web_example, demo, names, class_text, tmp_path)
    assert result["ep"] == "wasm"
    assert_same(case, np.load(tmp_path / "maps.npy"), result["classIndex"], demo)
    assert len(result["top"][0]) == 5 and result["top"][0][0]["index"] == demo["expected"]["top-class-batch1"].class_index[0]


def test_web_example_on_webgpu_when_offered(web_example, demo, tmp_path):
    """WebGPU through Chromium's software adapter (SwiftShader): compared when the browser offers
    an adapter, skipped with the browser's answer otherwise."""
    result = run_page(web_example, demo, ["chelsea"], "-1", tmp_path, ep="webgpu")
    if result.get("skipped"):
        pytest.skip(f"WebGPU: {result['skipped']}")
    assert result["ep"] == "webgpu"
    assert_same("top-class-batch1", np.load(tmp_path / "maps.npy"), result["classIndex"], demo)


def readme_snippets(language: str):
    """The README's fenced `language` blocks in "Running the augmented model from plain ONNX
    Runtime": (example file named on the first line, [chunks between `// ...` lines])."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running the augmented model from plain ONNX Runtime", 1)[1].split("\n## ", 1)[0]
    for block in section.split(f"```{language}\n")[1:]:
        lines = block.split("```", 1)[0].splitlines()
        assert lines[0].startswith("// examples/"), f"the README's {language} snippet must name its example file first"
        chunks, chunk = [], []
        for line in lines[1:] + ["// ..."]:
            if line.strip() == "// ...":
                chunks, chunk = chunks + ["\n".join(chunk)] * bool(chunk), []
            else:
                chunk.append(line)
        yield EXAMPLES.parent / lines[0][3:].strip(), chunks


@pytest.mark.parametrize("language", ["js", "cpp"])
def test_readme_snippets_are_the_examples_code(language):
    snippets = list(readme_snippets(language))
    assert snippets, f"the README has no {language} snippet"
    for path, chunks in snippets:
        source = path.read_text(encoding="utf-8")
        for chunk in chunks:
            assert chunk in source, f"README {language} snippet drifted from {path.name}:\n{chunk}"
