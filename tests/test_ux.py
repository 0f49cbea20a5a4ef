"""What a new user meets (issue 14): one test per rough edge, on tiny models built in milliseconds.

Each test names the point of the issue it covers; each fails on the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import UsageError
from onnxcam.runtime import Explainer
from ux_models import photo, save, tiny_classifier, write_photo

README = Path(__file__).resolve().parent.parent / "README.md"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def work(tmp_path):
    model = save(tiny_classifier(preset="unit"), tmp_path / "tiny.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.png", seed=1)
    write_photo(photos / "b.png", 40, 56, seed=2)
    return {"dir": tmp_path, "model": model, "photos": photos, "out": tmp_path / "out"}


def summary(out):
    return [json.loads(line) for line in (Path(out) / "summary.jsonl").read_text().splitlines()]


def files(out):
    return sorted(p.name for p in Path(out).iterdir() if p.is_file())


# ---------------------------------------------------------------- several methods, names, summary
def test_several_methods_layers_file_names_and_the_recorded_options(work):
    """Point 2 of the goal: one run, several methods and layers; <stem>_<class>_<method>[_<layer>];
    summary.jsonl records model path and SHA-256, preset, size, resize, layers, method,
    counterfactual, version."""
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--method",
                 "gradcam,layercam", "--layer", "r1", "--layer", "r2", "--class", "2", "--size", "32", "32")
    assert result.exit_code == 0, result.output
    expected = {f"a_2_{m}{suffix}.{ext}" for m in ("gradcam", "layercam") for suffix in ("", "_r1", "_r2")
                for ext in ("png", "npy")}
    assert set(files(work["out"])) == expected | {"summary.jsonl"}
    records = summary(work["out"])
    assert {(r["method"], r["layer"]) for r in records} == {(m, l) for m in ("gradcam", "layercam")
                                                           for l in ("fused", "r1", "r2")}
    options = records[0]["options"]
    assert options["model"] == str(work["model"])
    assert options["model_sha256"] == hashlib.sha256(Path(work["model"]).read_bytes()).hexdigest()
    assert options["preset"] == "unit" and options["preset_source"] == "model metadata"
    assert options["size"] == [32, 32] and options["resize"] == "direct" and options["layers"] == ["r1", "r2"]
    assert options["methods"] == ["gradcam", "layercam"] and options["counterfactual"] is False
    assert options["onnxcam_version"] == onnxcam.__version__
    # the per-layer maps are real and differ between layers (r1 is 32x32, r2 is 16x16)
    r1, r2 = np.load(work["out"] / "a_2_gradcam_r1.npy"), np.load(work["out"] / "a_2_gradcam_r2.npy")
    # an input-space method beside layer methods over several layers: one map, no layer in its name
    mixed = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["dir"] / "mixed", "--method",
                "gradcam,saliency", "--layer", "r1", "--layer", "r2", "--class", "2", "--size", "32", "32")
    assert mixed.exit_code == 0, mixed.output
    assert {(r["method"], r["layer"]) for r in summary(work["dir"] / "mixed")} == {
        ("gradcam", "fused"), ("gradcam", "r1"), ("gradcam", "r2"), ("saliency", "")}
    assert (work["dir"] / "mixed" / "a_2_saliency.npy").is_file()
    assert r1.shape == r2.shape == (48, 64) and r1.max() > 0.5 and r2.max() > 0.5
    assert np.abs(r1 - r2).max() > 0.05


def test_files_are_never_silently_overwritten(work):
    """Issue point 7: a second run into the same folder is refused (naming the file) unless
    --overwrite; another --method writes other file names."""
    image = work["photos"] / "a.png"
    assert cli("explain", work["model"], image, "-o", work["out"], "--class", "1").exit_code == 0
    first = (work["out"] / "a_1_gradcam.png").read_bytes()
    again = cli("explain", work["model"], image, "-o", work["out"], "--class", "1", "--method", "layercam")
    assert again.exit_code == 1
    assert "summary.jsonl: exists" in again.stderr and "--overwrite" in again.stderr
    assert cli("explain", work["model"], image, "-o", work["out"], "--class", "1", "--method", "layercam",
               "--overwrite").exit_code == 0
    assert {"a_1_gradcam.png", "a_1_layercam.png"} <= set(files(work["out"]))
    assert (work["out"] / "a_1_gradcam.png").read_bytes() == first
    assert [r["method"] for r in summary(work["out"])] == ["layercam"]
    # two photos with one stem: the second's files get a suffix, and the run says so
    write_photo(work["photos"] / "a.jpg", seed=5)
    twins = cli("explain", work["model"], work["photos"] / "a.png", work["photos"] / "a.jpg", "-o",
                work["dir"] / "twins", "--class", "1")
    assert twins.exit_code == 0, twins.output
    assert "two images are named 'a'" in twins.stderr and "a-2_" in twins.stderr
    assert {"a_1_gradcam.png", "a-2_1_gradcam.png"} <= set(files(work["dir"] / "twins"))


# ---------------------------------------------------------------- the 14 points
def test_1_all_zero_counterfactual_map_warns_and_is_named(tmp_path):
    """Every cell argues for the class (positive head after a Relu): the counterfactual map is
    exactly zero. Say so, naming image, class, method and the reason; file names and summary
    tell the run apart from a normal one."""
    model = save(tiny_classifier(preset="unit", positive_head=True), tmp_path / "pos.onnx")
    image = write_photo(tmp_path / "p.png")
    result = cli("explain", model, image, "-o", tmp_path / "out", "--counterfactual", "--class", "3")
    assert result.exit_code == 0, result.output
    heat = np.load(tmp_path / "out" / "p_3_gradcam-counterfactual.npy")
    assert np.all(heat == 0)
    warning = [line for line in result.stderr.splitlines() if "all zero" in line]
    assert len(warning) == 1
    assert all(part in warning[0] for part in ("p.png", "class 3", "gradcam", "--counterfactual", "argues for"))
    (record,) = summary(tmp_path / "out")
    assert record["all_zero"] is True and record["options"]["counterfactual"] is True
    normal = cli("explain", model, image, "-o", tmp_path / "out2", "--class", "3")
    assert normal.exit_code == 0 and "all zero" not in normal.stderr  # the control: a normal map is not zero
    assert np.load(tmp_path / "out2" / "p_3_gradcam.npy").max() > 0.9


def test_2_preset_printed_recorded_and_warned_when_unknown(work):
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"])
    assert result.exit_code == 0, result.output
    assert re.search(r"preset unit \(.*\): named by the model's metadata", result.stdout)
    assert summary(work["out"])[0]["options"]["preset_source"] == "model metadata"
    plain = save(tiny_classifier(), work["dir"] / "plain.onnx")
    result = cli("explain", plain, work["photos"] / "a.png", "-o", work["dir"] / "o2")
    assert "preset imagenet" in result.stdout and "the default" in result.stdout
    assert "names no preprocessing preset" in result.stderr and "--preset" in result.stderr
    result = cli("explain", plain, work["photos"] / "a.png", "-o", work["dir"] / "o3", "--preset", "raw")
    assert "preset raw" in result.stdout and "warning" not in result.stderr
    text = " ".join(README.read_text().split())
    assert "metadata wins over the default" in text and "onnxcam.preset" in text


def test_3_augmented_model_refused_up_front(work):
    aug = work["dir"] / "m.cam.onnx"
    assert cli("augment", work["model"], "-o", aug).exit_code == 0
    for args in (("augment", aug, "-o", work["dir"] / "mm.onnx"), ("explain", aug, work["photos"] / "a.png",
                                                                    "-o", work["out"])):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "already augmented by onnxcam" in result.stderr and "the original model" in result.stderr
    assert not (work["dir"] / "mm.onnx").exists()
    listed = cli("layers", aug)
    assert listed.exit_code == 2 and "already augmented by onnxcam" in listed.stderr


@pytest.mark.parametrize("name", ["onnxcam_cam", "onnxcam_class", "onnxcam_score"])
def test_3_a_models_own_tensor_with_a_reserved_name(name):
    model = tiny_classifier(rename={"r2": name})
    with pytest.raises(UsageError, match=rf"tensor\(s\) named '{name}'.*reserves names starting with 'onnxcam_'"):
        onnxcam.augment(model)


def test_4_debug_is_accepted_after_the_command(work):
    result = cli("layers", work["model"], "--debug")
    assert result.exit_code == 0, result.output
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--debug", "--class", "0")
    assert result.exit_code == 0, result.output
    result = cli("layers", work["dir"] / "missing.onnx", "--debug")  # --debug: the exception, not a line
    assert result.exit_code == 1 and "missing.onnx" in str(result.exception)


def test_5_top_k_beyond_the_classes_is_a_usage_error(work):
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--top-k", "6")
    assert result.exit_code == 2
    assert "--top-k 6 is more than the 5 classes" in result.stderr
    assert not work["out"].exists()
    assert cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--top-k", "5").exit_code == 0
    assert len(summary(work["out"])) == 5


def test_6_methods_coincide_before_global_pooling_and_say_why(work):
    image = work["photos"] / "a.png"
    at_pool = cli("explain", work["model"], image, "-o", work["out"], "--method", "gradcam,xgradcam,hirescam",
                  "--layer", "r2")
    assert at_pool.exit_code == 0, at_pool.output
    a, b = np.load(work["out"] / f"a_{summary(work['out'])[0]['class_index']}_gradcam.npy"), None
    b = np.load(work["out"] / f"a_{summary(work['out'])[0]['class_index']}_xgradcam.npy")
    assert a.max() > 0.9 and np.abs(a - b).max() < 1e-4
    assert "gradcam and xgradcam give the same map" in at_pool.stderr
    assert "global average pooling" in at_pool.stderr
    earlier = cli("explain", work["model"], image, "-o", work["dir"] / "o2", "--method", "gradcam,xgradcam",
                  "--layer", "r1")
    assert earlier.exit_code == 0 and "give the same map" not in earlier.stderr
    text = " ".join(README.read_text().split())
    assert "coincide" in text and "constant over space" in text


def test_8_results_are_printed_for_the_images_that_worked(work):
    (work["photos"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    result = cli("explain", work["model"], work["photos"], "-o", work["out"])
    assert result.exit_code == 1
    assert "a.png" in result.stdout and "b.png" in result.stdout  # the table of what succeeded
    assert "broken.png" in result.stderr and "1 of 3 images could not be read" in result.stderr


def test_9_units_in_the_pixel_limit(work):
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--max-pixels", "1000")
    assert result.exit_code == 1
    assert "64x48 pixels is 3,072 pixels, over the limit of 1,000 pixels" in result.stderr


def test_10_layers_node_column_measured_sizes_and_filters(work):
    result = cli("layers", work["model"], "--size", "32", "48")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header == ["tensor", "node", "op", "shape", "h", "x", "w"]
    rows = {}
    for line in result.stdout.splitlines()[2:]:
        tokens = line.split()
        if tokens and "candidate" not in line:
            rows[tokens[1] if tokens[0] == "*" else tokens[0]] = line
    assert rows["r2"].startswith("*")
    assert "[1, 8, 16, 24]" in rows["r2"] and "16x24" in rows["r2"] and "relu2" in rows["r2"]
    assert "[1, 8, 32, 48]" in rows["r1"] and "conv1" in rows["c1"]
    assert "at input size 32x48 pixels" in result.stdout
    relu = cli("layers", work["model"], "--op", "relu").stdout
    assert "r1" in relu and "r2" in relu and "Conv " not in relu and "2 of 5 candidate" in relu
    big = cli("layers", work["model"], "--min-size", "200").stdout  # 224x224 by default: r1 224, r2 112
    assert "r1" in big and "r2" not in big
    grep = cli("layers", work["model"], "--grep", "conv2").stdout
    assert "c2" in grep and "r1" not in grep


def test_11_preprocess_helper_and_float64(work):
    from onnxcam.runtime import PrecisionWarning

    batch, geometry = onnxcam.preprocess(work["photos"] / "a.png", work["model"], size=(32, 32))
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0  # the model's metadata says "unit"
    assert geometry.original == (48, 64)
    explainer = Explainer(work["model"])
    result = explainer(batch)
    assert geometry.to_original(result.cam[0]).shape == (48, 64)
    with pytest.warns(PrecisionWarning, match="float64; converted to float32"):
        wide = explainer(batch.astype(np.float64))
    np.testing.assert_array_equal(wide.cam, result.cam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(batch)  # float32: no note
    several, geometries = onnxcam.preprocess([photo(30, 40), work["photos"] / "b.png"], explainer, size=(32, 32))
    assert several.shape == (2, 3, 32, 32) and [g.original for g in geometries] == [(30, 40), (40, 56)]
    with pytest.warns(UserWarning, match="names no preset"):
        onnxcam.preprocess(photo(), tiny_classifier())


def test_11_readme_python_api_block_runs(work, monkeypatch):
    """The README's Python API example, executed as written against a tiny model."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    block = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    save(tiny_classifier(preset="unit"), work["dir"] / "model.onnx")
    write_photo(work["dir"] / "photo.jpg")
    monkeypatch.chdir(work["dir"])
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["result"].cam.shape[0] == namespace["batch"].shape[0]


def test_12_crop_regions_are_nan_in_the_map(work):
    result = cli("explain", work["model"], work["photos"] / "a.png", "-o", work["out"], "--resize", "crop",
                 "--size", "32", "32")
    assert result.exit_code == 0, result.output
    heat = np.load(summary(work["out"])[0]["npy"])
    assert heat.shape == (48, 64)
    assert np.isnan(heat[:, :4]).all() and np.isnan(heat[:, -4:]).all()  # 64 wide, the crop saw ~42 columns
    assert np.isfinite(heat[8:40, 16:48]).all() and np.nanmax(heat) > 0.5
    assert "NaN in the `.npy`" in README.read_text()


def test_13_save_npy_none_or_float16(work):
    image = work["photos"] / "a.png"
    assert cli("explain", work["model"], image, "-o", work["out"], "--class", "2", "--save-npy", "none").exit_code == 0
    assert files(work["out"]) == ["a_2_gradcam.png", "summary.jsonl"] and summary(work["out"])[0]["npy"] is None
    out16 = work["dir"] / "o16"
    assert cli("explain", work["model"], image, "-o", out16, "--class", "2", "--save-npy", "float16").exit_code == 0
    half = np.load(out16 / "a_2_gradcam.npy")
    assert half.dtype == np.float16 and half.shape == (48, 64) and half.max() > 0.5


# ---------------------------------------------------------------- fixed-batch models
@pytest.mark.parametrize("fixed", [1, 4])
def test_fixed_batch_models_are_explained_in_chunks(fixed, tmp_path):
    dynamic = Explainer(tiny_classifier(batch="N", height=16, width=16))
    pinned = Explainer(tiny_classifier(batch=fixed, height=16, width=16))
    x = np.random.default_rng(3).random((6, 3, 16, 16), dtype=np.float32)
    want = dynamic(x, class_index=[0, 1, 2, 3, 4, 0])
    got = pinned(x, class_index=[0, 1, 2, 3, 4, 0])
    assert got.cam.shape == (6, 16, 16) and want.cam.max() > 0.5
    np.testing.assert_allclose(got.cam, want.cam, atol=1e-6)
    np.testing.assert_array_equal(got.class_index, want.class_index)
    np.testing.assert_allclose(got.outputs["logits"], want.outputs["logits"], atol=1e-6)
    # and through the CLI (batches of 8 photos by default)
    save(tiny_classifier(batch=fixed, height=16, width=16, preset="unit"), tmp_path / "fixed.onnx")
    for i in range(3):
        write_photo(tmp_path / "in" / f"{i}.png" if (tmp_path / "in").exists() else _mkdir(tmp_path / "in") / f"{i}.png",
                    seed=i)
    result = cli("explain", tmp_path / "fixed.onnx", tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(summary(tmp_path / "out")) == 3


def _mkdir(path):
    path.mkdir()
    return path
