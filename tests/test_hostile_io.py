"""Hostile files and signals (issue 15): outputs that are devices, FIFOs or the user's own photos,
inputs that never end or block, sizes that cannot be allocated, signals in the middle of a write,
NaN results in a later batch, class indices that are not integers.

Signals and devices go through a real `python -c ... onnxcam.cli.main()` subprocess; where a
signal must land at a precise moment, the wrapper slows one function down and touches a READY
file, so the test sends the signal exactly while a temporary file or folder exists.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from test_hardening import assert_error, cli, conv_net, digest, files_under, photo, save, write_image
from onnxcam.errors import ImageError, InputError
from onnxcam.io import files as files_module
from onnxcam.io.images import list_images, read_image
from onnxcam.io.pipeline import Record, write_summary
from onnxcam.runtime import Explainer

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

_WRAPPER = r"""
import sys
exec(sys.argv[1])
from onnxcam.cli import main
sys.argv = ["onnxcam"] + sys.argv[2:]
main()
"""


def onnxcam_process(args, patch="", env=None, **kwargs):
    """A real onnxcam process (this checkout's code) with `patch` run first."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-c", _WRAPPER, patch, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment, **kwargs)


def run_onnxcam(args, timeout=120, **kwargs):
    proc = onnxcam_process(args, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"onnxcam {' '.join(map(str, args))} hung for {timeout} s")
    return proc.returncode, out, err


def one_error_line(err: str, *fragments) -> str:
    lines = [line for line in err.splitlines() if line.startswith("onnxcam: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path):
    model = save(conv_net(), tmp_path / "net.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    image = write_image(photos / "photo.png", photo())
    return {"dir": tmp_path, "model": model, "photos": photos, "image": image, "out": tmp_path / "out"}


def _device_like_null(tmp_path) -> Path:
    """A character device to write to: as root a private twin of /dev/null (an unchecked rename
    would replace it, and must not replace the real one); otherwise /dev/null itself (no rename
    into /dev is possible without root)."""
    if not IS_ROOT:
        return Path("/dev/null")
    node = tmp_path / "null-device"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return node


# ------------------------------------------------------------------------------ outputs
def test_augment_to_a_device_or_a_fifo_is_refused_and_leaves_it_alone(work):
    device = _device_like_null(work["dir"])
    fifo = work["dir"] / "pipe.onnx"
    os.mkfifo(fifo)
    for target, kind in ((device, "character device"), (fifo, "FIFO")):
        code, out, err = run_onnxcam(["augment", work["model"], "-o", target])
        assert code == 1, err
        one_error_line(err, str(target), kind, "not a regular file")
        mode = os.stat(target).st_mode
        assert (stat.S_ISCHR(mode) if target == device else stat.S_ISFIFO(mode)), "the special file was replaced"
    assert not [p for p in work["dir"].iterdir() if p.name.endswith(".tmp")]


def test_augment_to_a_directory_is_refused(work):
    folder = work["dir"] / "folder.onnx"
    folder.mkdir()
    result = cli("augment", work["model"], "-o", folder)
    assert result.exit_code in (1, 2) and "folder.onnx" in result.stderr and "directory" in result.stderr
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_explaining_photos_into_their_own_folder_never_overwrites_a_photo(work):
    """cat.png's overlay for class 1 would be cat_1_gradcam.png, which is another photo of the folder."""
    photos = work["photos"]
    cat = write_image(photos / "cat.png", photo(16, 20))
    other = write_image(photos / "cat_1_gradcam.png", photo(12, 12)[::-1].copy())
    before = {p.name: digest(p) for p in photos.iterdir()}
    result = cli("explain", work["model"], photos, "-o", photos, "--class", "1")
    assert result.exit_code == 0, result.output
    for name, value in before.items():
        assert digest(photos / name) == value, f"the photo {name} was overwritten"
    records = [json.loads(line) for line in (photos / "summary.jsonl").read_text().splitlines()]
    by_image = {Path(r["image"]).name: r for r in records}
    assert Path(by_image["cat.png"]["overlay"]).name == "cat_1_gradcam-2.png"
    assert Path(by_image["cat_1_gradcam.png"]["overlay"]).name == "cat_1_gradcam_1_gradcam.png"
    assert (photos / "cat_1_gradcam-2.png").is_file() and (photos / "cat_1_gradcam-2.npy").is_file()
    assert cat.exists() and other.exists()


def test_an_output_name_taken_by_a_link_to_a_photo_or_a_folder_is_avoided(work):
    out = work["out"]
    out.mkdir()
    os.symlink(work["image"], out / "photo_1_gradcam.png")  # a link to the photo being explained
    (out / "photo_1_gradcam-2.png").mkdir()  # not a regular file
    before = digest(work["image"])
    result = cli("explain", work["model"], work["image"], "-o", out, "--class", "1")
    assert result.exit_code == 0, result.output
    assert digest(work["image"]) == before
    assert (out / "photo_1_gradcam-3.png").is_file() and (out / "photo_1_gradcam-2.png").is_dir()


def test_a_summary_path_that_is_an_input_or_a_fifo_is_refused_before_any_work(work):
    fake = write_image(work["photos"] / "summary.jsonl", photo(), ext=".png")  # a photo named like the summary
    before = digest(fake)
    result = cli("explain", work["model"], fake, work["image"], "-o", work["photos"])
    assert_error(result, 1, "summary.jsonl", "is one of the inputs")
    assert digest(fake) == before and sorted(p.name for p in work["photos"].iterdir()) == ["photo.png", "summary.jsonl"]
    work["out"].mkdir()
    os.mkfifo(work["out"] / "summary.jsonl")
    code, _, err = run_onnxcam(["explain", work["model"], work["image"], "-o", work["out"]], timeout=60)
    assert code == 1
    one_error_line(err, "summary.jsonl", "FIFO")
    assert sorted(p.name for p in work["out"].iterdir()) == ["summary.jsonl"]


# ------------------------------------------------------------------------------ inputs
def test_a_fifo_in_an_image_folder_is_skipped_not_waited_for(work):
    os.mkfifo(work["photos"] / "stuck.png")
    code, out, err = run_onnxcam(["explain", work["model"], work["photos"], "-o", work["out"]], timeout=120)
    assert code == 0, err
    assert "skipped 1 file" in err and "stuck.png" in err
    assert files_under(work["out"]) == ["photo_1_gradcam.npy", "photo_1_gradcam.png", "summary.jsonl"]


def test_a_fifo_or_a_device_named_as_an_image_is_refused_and_the_good_photos_are_explained(work):
    fifo = work["dir"] / "named.png"
    os.mkfifo(fifo)
    code, out, err = run_onnxcam(["explain", work["model"], "/dev/zero", fifo, work["image"], "-o", work["out"]],
                                 timeout=120)
    assert code == 1, err
    assert "/dev/zero: is a character device, not an image file" in err
    assert "named.png: is a FIFO (named pipe), not an image file" in err
    one_error_line(err, "2 of 3 images")
    assert files_under(work["out"]) == ["photo_1_gradcam.npy", "photo_1_gradcam.png", "summary.jsonl"]
    records = [json.loads(line) for line in (work["out"] / "summary.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["photo.png"]


def test_a_folder_link_to_a_device_is_skipped(work):
    os.symlink("/dev/zero", work["photos"] / "zero.jpg")
    found = list_images([work["photos"]])
    assert [p.name for p in found.images] == ["photo.png"] and [p.name for p in found.skipped] == ["zero.jpg"]


def test_a_file_too_large_to_be_an_image_within_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(200 * 2**20)  # sparse: costs no disk
    reads = []
    real_read = os.read
    monkeypatch.setattr(files_module.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(ImageError, match="huge.png: 200 MB is over the limit of 79 MB for this image file; raise --max-pixels"):
        read_image(sparse, max_pixels=1_000_000)
    assert reads == []


def test_an_impossible_input_size_is_refused_before_allocating(work):
    dynamic = save(conv_net(batch="N", input_dims=["N", 3, "H", "W"]), work["dir"] / "dyn.onnx")
    result = cli("explain", dynamic, work["image"], "-o", work["out"], "--size", "30000", "30000")
    assert_error(result, 2, "--size 30000 30000", "900 megapixels", "over the limit")
    assert not work["out"].exists()


# ------------------------------------------------------------------------------ signals
_SLOW_MODEL_WRITE = """
import os, time, onnxcam.modelio as m
_write = m.write_model
def slow(proto, f):
    _write(proto, f)
    f.flush()
    open(os.environ["READY"], "w").close()
    time.sleep(60)
m.write_model = slow
"""

_SLOW_SESSION_FROM_FILE = """
import os, time, onnxruntime as ort
_session = ort.InferenceSession
def slow(model, *args, **kwargs):
    if isinstance(model, str) and os.path.basename(os.path.dirname(model)).startswith("onnxcam-"):
        open(os.environ["READY"], "w").close()
        time.sleep(60)
    return _session(model, *args, **kwargs)
ort.InferenceSession = slow
"""

_SLOW_IMAGE_WRITE = """
import os, time, onnxcam.io.files as files
_permissions = files.default_permissions
def slow(path):
    _permissions(path)
    open(os.environ["READY"], "w").close()
    time.sleep(60)
files.default_permissions = slow
"""


def _signal_when_ready(args, patch, signum, ready, env=None):
    proc = onnxcam_process(args, patch=patch, env=dict(env or {}, READY=str(ready)))
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached the slow point: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the signal did not stop onnxcam")
    return proc.returncode, err


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_while_the_model_is_written_leaves_no_temporary_file(work, signum, code):
    out = work["dir"] / "aug.onnx"
    returncode, err = _signal_when_ready(["augment", work["model"], "-o", out], _SLOW_MODEL_WRITE, signum,
                                         work["dir"] / "READY")
    assert returncode == code, err
    one_error_line(err, "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name)
    assert sorted(p.name for p in work["dir"].iterdir()) == ["READY", "net.onnx", "photos"]


def test_sigterm_while_the_session_loads_from_its_temporary_folder_removes_the_folder(work):
    model = conv_net()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(9 * 2**20, np.float32), "ballast"))  # 36 MB
    big = save(model, work["dir"] / "big.onnx")
    tmpdir = work["dir"] / "tmpdir"
    tmpdir.mkdir()
    returncode, err = _signal_when_ready(["explain", big, work["image"], "-o", work["out"]], _SLOW_SESSION_FROM_FILE,
                                         signal.SIGTERM, work["dir"] / "READY", env={"TMPDIR": str(tmpdir)})
    assert returncode == 143, err
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("onnxcam-")] == []  # (the sandbox adds a file)
    assert not work["out"].exists()


def test_ctrl_c_while_an_overlay_is_written_leaves_no_temporary_file(work):
    returncode, err = _signal_when_ready(["explain", work["model"], work["image"], "-o", work["out"]],
                                         _SLOW_IMAGE_WRITE, signal.SIGINT, work["dir"] / "READY")
    assert returncode == 130, err
    one_error_line(err, "interrupted (Ctrl-C)")
    assert files_under(work["out"]) == [], (files_under(work["out"]), err)


def test_an_interrupt_right_after_the_temporary_file_is_created_still_removes_it(tmp_path, monkeypatch):
    """The window the issue found (mkstemp before the try): the interrupt lands as the create returns."""
    from onnxcam.io.files import atomic_path, temporary_directory

    real_open = os.open

    def open_then_interrupt(path, flags, *args):
        fd = real_open(path, flags, *args)
        if str(path).endswith(".tmp"):
            os.close(fd)
            raise KeyboardInterrupt
        return fd
    monkeypatch.setattr(files_module.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x.png") as tmp:
            Path(tmp).write_bytes(b"never")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with temporary_directory("onnxcam-test-"):
            raise KeyboardInterrupt
    monkeypatch.undo()
    with temporary_directory("onnxcam-test-") as folder:
        Path(folder, "f").write_text("x")
    assert not Path(folder).exists()


# ------------------------------------------------------------------------------ NaN in a later batch
def _nan_for_bright_photos():
    """conv_net whose logits gain NaN for photos whose mean normalised value is above 2 (a white
    photo): the Grad-CAM map stays finite (the NaN is added after the layer), the score does not."""
    model = conv_net()
    gemm = model.graph.node[-1]
    gemm.output[0] = "raw_logits"
    model.graph.node.extend([
        helper.make_node("ReduceMean", ["input"], ["brightness"], axes=[1, 2, 3], keepdims=0, name="bright"),
        helper.make_node("Greater", ["brightness", "two"], ["bright_flag"], name="gt"),
        helper.make_node("Unsqueeze", ["bright_flag", "one_axis"], ["flag2d"], name="unsq"),
        helper.make_node("Where", ["flag2d", "nan", "zero"], ["bump"], name="where"),
        helper.make_node("Add", ["raw_logits", "bump"], ["logits"], name="add_nan")])
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(2.0), "two"),
                                    numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
                                    numpy_helper.from_array(np.float32(np.nan), "nan"),
                                    numpy_helper.from_array(np.float32(0.0), "zero")])
    return model


def test_nan_for_one_photo_of_a_later_batch_keeps_the_others_and_writes_strict_json(work):
    model = save(_nan_for_bright_photos(), work["dir"] / "nan.onnx")
    photos = work["photos"]
    for name in ("p1", "p2", "p4"):
        write_image(photos / f"{name}.png", photo())
    write_image(photos / "p3.png", np.full((16, 20, 3), 255, np.uint8))
    work["image"].unlink()
    result = cli("explain", model, photos, "-o", work["out"], "--batch-size", "2")
    assert result.exit_code == 1, result.output
    assert "p3.png" in result.stderr and "NaN/Inf" in result.stderr
    assert_error(result, 1, "1 of 4 images")
    text = (work["out"] / "summary.jsonl").read_text()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in summary.jsonl")) for line in text.splitlines()]
    assert [Path(r["image"]).name for r in records] == ["p1.png", "p2.png", "p4.png"]
    assert not any(p.name.startswith("p3") for p in work["out"].iterdir())
    assert all(np.isfinite(r["score"]) for r in records)


def test_the_summary_writes_null_for_a_non_finite_number(tmp_path):
    record = Record(image="a.png", class_index=0, label="x", score=float("nan"), probability=float("inf"), rank=0,
                    method="gradcam", layer="relu", overlay="a_0.png", npy="a_0.npy")
    path = write_summary(tmp_path, [record])
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["score"] is None and loaded["probability"] is None and loaded["class_index"] == 0


# ------------------------------------------------------------------------------ class_index
@pytest.fixture(scope="module")
def explainer():
    return Explainer(conv_net(classes=4))


@pytest.mark.parametrize("bad", [1.7, -1.5, float("nan"), [0, 2.5], True, "1", 1e30])
def test_a_class_index_that_is_not_an_integer_is_refused(explainer, bad):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match="class"):
        explainer(x, class_index=bad)


def test_integral_floats_are_accepted_as_class_indices(explainer):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    result = explainer(x, class_index=np.array([1.0, 3.0]))
    assert list(result.class_index) == [1, 3]


# ------------------------------------------------------------------------------ labels files
def test_a_labels_file_that_is_a_device_or_a_fifo_or_huge_is_refused(work):
    fifo = work["dir"] / "labels.txt"
    os.mkfifo(fifo)
    for path, fragment in (("/dev/zero", "/dev/zero: is a character device, not a labels file"),
                           (fifo, "labels.txt: is a FIFO (named pipe), not a labels file")):
        code, _, err = run_onnxcam(["explain", work["model"], work["image"], "-o", work["out"], "--labels", path],
                                   timeout=60)
        assert code == 2, err
        one_error_line(err, fragment)
    assert not work["out"].exists()


def test_a_json_labels_object_with_an_absurd_index_is_refused_not_allocated(work):
    from onnxcam.errors import UsageError
    from onnxcam.io.labels import load_labels

    path = work["dir"] / "labels.json"
    path.write_text('{"0": "cat", "1000000000000": "dog"}')
    with pytest.raises(UsageError, match="class index 1000000000000 is beyond"):
        load_labels(path)


# ------------------------------------------------------------------------------ further cases
def test_a_model_path_that_is_a_fifo_or_a_device_is_refused_without_reading(work):
    fifo = work["dir"] / "model.onnx"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "model.onnx"), ("/dev/zero", "/dev/zero")):
        code, _, err = run_onnxcam(["augment", path, "-o", work["dir"] / "aug.onnx"], timeout=60)
        assert code == 1, err
        one_error_line(err, kind, "not a regular file")
    assert not (work["dir"] / "aug.onnx").exists()


def test_an_output_name_that_is_a_link_to_someone_elses_file_replaces_the_link_not_the_file(work):
    """out/photo_1_gradcam.png is a symbolic link to a file outside the run, its .npy a hard link to
    another: refused as an earlier run's files; with --overwrite the outputs replace the links
    (atomic rename), the files they pointed at are untouched."""
    victim, other = work["dir"] / "victim.txt", work["dir"] / "other.txt"
    victim.write_text("keep me")
    other.write_text("keep me too")
    out = work["out"]
    out.mkdir()
    os.symlink(victim, out / "photo_1_gradcam.png")
    os.link(other, out / "photo_1_gradcam.npy")
    refused = cli("explain", work["model"], work["image"], "-o", out, "--class", "1")  # an earlier run's files?
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    result = cli("explain", work["model"], work["image"], "-o", out, "--class", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep me" and other.read_text() == "keep me too"
    png = out / "photo_1_gradcam.png"
    assert not png.is_symlink() and png.read_bytes()[:4] == b"\x89PNG"


def test_a_photo_hard_linked_under_an_output_name_is_not_overwritten(work):
    out = work["out"]
    out.mkdir()
    os.link(work["image"], out / "photo_1_gradcam.npy")  # the same file as the photo, under the .npy output's name
    before = digest(work["image"])
    result = cli("explain", work["model"], work["image"], "-o", out, "--class", "1")
    assert result.exit_code == 0, result.output
    assert digest(work["image"]) == before and digest(out / "photo_1_gradcam.npy") == before
    assert (out / "photo_1_gradcam-2.png").is_file() and (out / "photo_1_gradcam-2.npy").is_file()
