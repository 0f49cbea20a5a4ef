"""The bad-input matrix of issue 7: every case ends in the exact, documented behaviour.

For each case: one line on stderr naming the file/node/op and what to do, exit code 2 for a wrong
request and 1 for a failure, no traceback, no output files left behind, the input untouched.
Models are tiny graphs built with onnx.helper (milliseconds each); most cases go through click's
CliRunner, two through a real `onnxcam` subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcam import errors
from onnxcam.cli import main
from onnxcam.errors import (ImageError, InputError, LayerNotFoundError, ModelLoadError, NonFiniteError,
                            NotDifferentiableError, OnnxcamError, OutputError, UnsupportedModelError, UsageError)
from onnxcam.io import images as images_module
from onnxcam.modelio import load_model
from onnxcam.runtime import Explainer, lowered_ir_copy, onnxruntime_max_ir_version

# ------------------------------------------------------------------------------------ builders


def conv_net(classes=4, ir=8, opset=13, weight=None, batch="N", extra_nodes=(), head_input="relu",
             input_type=TensorProto.FLOAT, input_dims=None) -> onnx.ModelProto:
    """input [N,3,8,8] -> Conv 'conv0' -> Relu 'relu0' (tensor 'relu') -> [extra] -> GAP -> Flatten -> Gemm 'fc' -> logits."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32) if weight is None else weight
    g = (rng.standard_normal((classes, 6)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "W"], ["conv"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu0"), *extra_nodes,
             helper.make_node("GlobalAveragePool", [head_input], ["gap"], name="gap0"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat0"),
             helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1, name="fc")]
    dims = input_dims or [batch, 3, 8, 8]
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("input", input_type, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def quantized_net() -> onnx.ModelProto:
    """Float Conv/Relu, then QuantizeLinear -> QLinearConv -> DequantizeLinear before the head."""
    rng = np.random.default_rng(0)
    extra = [helper.make_node("QuantizeLinear", ["relu", "s", "z"], ["xq"], name="quant0"),
             helper.make_node("QLinearConv", ["xq", "s", "z", "Wq", "ws", "wz", "s", "z"], ["yq"], pads=[1, 1, 1, 1],
                              name="qconv0"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["deq"], name="dequant0")]
    model = conv_net(extra_nodes=extra, head_input="deq")
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.integers(-5, 5, (6, 6, 3, 3)).astype(np.int8), "Wq"),
        numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z"),
        numpy_helper.from_array(np.float32(0.1), "ws"), numpy_helper.from_array(np.int8(0), "wz")])
    return model


def conv_integer_net() -> onnx.ModelProto:
    """DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul between the Relu and the head."""
    rng = np.random.default_rng(0)
    extra = [helper.make_node("DynamicQuantizeLinear", ["relu"], ["xu", "xs", "xz"], name="dynquant0"),
             helper.make_node("ConvInteger", ["xu", "Wu", "xz"], ["ci"], pads=[1, 1, 1, 1], name="convint0"),
             helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT, name="cast0"),
             helper.make_node("Mul", ["cf", "sc"], ["scaled"], name="scale0")]
    model = conv_net(extra_nodes=extra, head_input="scaled")
    model.graph.initializer.extend([numpy_helper.from_array(rng.integers(0, 255, (6, 6, 3, 3)).astype(np.uint8), "Wu"),
                                    numpy_helper.from_array(np.float32(0.01), "sc")])
    return model


def save(model, path) -> Path:
    onnx.save(model, str(path))
    return Path(path)


def write_image(path, pixels, ext=None) -> Path:
    ok, buf = cv2.imencode(ext or Path(path).suffix, pixels)
    assert ok
    Path(path).write_bytes(buf.tobytes())
    return Path(path)


def photo(h=16, w=20, channels=3, dtype=np.uint8):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 12, yy * 15, (xx + yy) * 6], -1)[:, :, :channels].astype(np.float64)
    if dtype == np.uint16:
        return (base * 257).astype(np.uint16)
    return np.clip(base, 0, 255).astype(np.uint8)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder) -> list:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, code, *fragments):
    """exit `code`, exactly one stderr line 'onnxcam: error: ...' holding every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors_ = [line for line in lines if line.startswith("onnxcam: error: ")]
    assert len(errors_) == 1, result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.stderr, result.output
    for fragment in fragments:
        assert fragment in errors_[0], (fragment, errors_[0])
    return errors_[0]


@pytest.fixture
def work(tmp_path):
    """A folder with a good model and a photo; returns a namespace-like dict."""
    model = save(conv_net(), tmp_path / "net.onnx")
    image = write_image(tmp_path / "photo.png", photo())
    return {"dir": tmp_path, "model": model, "image": image, "out": tmp_path / "out"}


def explain_fails(work, model, code, *fragments, extra=()):
    """`onnxcam explain MODEL photo -o out ...` fails as specified, writes nothing, leaves MODEL as it was."""
    before = digest(model) if Path(model).is_file() else None
    result = cli("explain", model, work["image"], "-o", work["out"], *extra)
    line = assert_error(result, code, *fragments)
    assert files_under(work["out"]) == [], files_under(work["out"])
    assert not work["out"].exists(), "a failed run must not leave an empty output folder behind"
    if before is not None:
        assert digest(model) == before
    return line


def test_the_good_model_explains(work):
    result = cli("explain", work["model"], work["image"], "-o", work["out"])
    assert result.exit_code == 0, result.output
    assert files_under(work["out"]) == ["photo_1_gradcam.npy", "photo_1_gradcam.png", "summary.jsonl"]


# ----------------------------------------------------------------------------- model files

def test_missing_model(work):
    explain_fails(work, work["dir"] / "absent.onnx", 1, "absent.onnx: no such file", "give the path of an .onnx model")


def test_model_is_a_directory(work):
    explain_fails(work, work["dir"], 1, f"{work['dir']}: is a directory, not an .onnx model file")


def test_empty_model(work):
    (work["dir"] / "empty.onnx").write_bytes(b"")
    explain_fails(work, work["dir"] / "empty.onnx", 1, "empty.onnx: the file is empty; re-export the model")


def test_truncated_protobuf(work):
    data = work["model"].read_bytes()
    (work["dir"] / "cut.onnx").write_bytes(data[: len(data) // 2])
    explain_fails(work, work["dir"] / "cut.onnx", 1, "cut.onnx: not a readable ONNX model (DecodeError)",
                  "is the file truncated or of another format?")


def test_random_bytes(work):
    (work["dir"] / "noise.onnx").write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    line = explain_fails(work, work["dir"] / "noise.onnx", 1, "noise.onnx: ")
    assert "not a readable ONNX model" in line or "holds no graph" in line


def test_image_renamed_to_onnx(work):
    shutil.copy(work["image"], work["dir"] / "photo.onnx")
    explain_fails(work, work["dir"] / "photo.onnx", 1, "photo.onnx: this is a PNG image, not an ONNX model")


def newest_ir() -> int:
    """The newest IR version this onnxruntime reads (13 for 1.31, 14 for 1.32), read off its own error."""
    newest = onnxruntime_max_ir_version()
    assert newest is not None, "onnxruntime no longer names its newest IR version in its error: update _IR_PATTERN"
    return newest


def test_ir_version_newer_than_onnxruntime_is_lowered_when_safe(work):
    """onnx 1.23 writes IR 14, onnxruntime 1.31 reads up to 13 (1.32 up to 14): a model labelled one
    newer than the runtime reads is relabelled (its opsets and types all exist at the runtime's IR),
    so it just works, with the same maps."""
    ir = newest_ir() + 1
    new = save(conv_net(ir=ir), work["dir"] / f"ir{ir}.onnx")
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(Explainer(new)(x).cam, Explainer(conv_net(ir=8))(x).cam)
    assert cli("explain", new, work["image"], "-o", work["out"]).exit_code == 0
    assert onnx.load(str(new)).ir_version == ir  # the input file is untouched


def test_ir_version_newer_than_onnxruntime_and_not_lowerable(work):
    """A model using a type newer than the runtime's IR (a float8 weight) cannot be relabelled."""
    newest = newest_ir()
    model = conv_net(ir=newest + 1)
    model.graph.initializer.append(helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [1], [1.0]))
    assert lowered_ir_copy(model, newest) is None
    path = save(model, work["dir"] / "newf8.onnx")
    explain_fails(work, path, 1, f"newf8.onnx: IR version {newest + 1} is newer than onnxruntime",
                  f"(up to {newest})", "upgrade onnxruntime", f"ir_version <= {newest}")


@pytest.mark.parametrize("opset", [9, 22])
def test_opset_outside_the_supported_range(work, opset):
    path = save(conv_net(opset=opset, ir=10), work["dir"] / f"op{opset}.onnx")
    explain_fails(work, path, 1, f"op{opset}.onnx: opset {opset} is outside the supported range 11-21",
                  "re-export the model with an opset in that range")


def test_custom_domain_op_on_the_path(work):
    model = conv_net()
    model.graph.node[1].op_type, model.graph.node[1].domain = "FancyRelu", "com.acme"
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    path = save(model, work["dir"] / "custom.onnx")
    explain_fails(work, path, 1, "node 'relu0' (com.acme::FancyRelu", "custom-domain op",
                  "Pick a target layer nearer the output")
    with pytest.raises(NotDifferentiableError) as info:
        Explainer(path)
    assert info.value.problems and "relu0" in info.value.problems[0]


@pytest.mark.parametrize("variant", ["int64 input", "3-D input"])
def test_no_float_4d_input(work, variant):
    if variant == "int64 input":
        model = conv_net(input_type=TensorProto.INT64)
    else:
        model = conv_net(input_dims=["N", 3, 8])
    path = save(model, work["dir"] / "no4d.onnx")
    explain_fails(work, path, 1, "no4d.onnx: the model has no 4-D floating-point input", "onnxcam explains image models")


def test_no_differentiable_path_to_the_score(work):
    model = conv_net()
    model.graph.node[4].input[0] = "constant_features"  # the Gemm no longer reads the image
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 6), np.float32), "constant_features"))
    path = save(model, work["dir"] / "nopath.onnx")
    explain_fails(work, path, 1, "nopath.onnx: found no 4-D feature map with spatial size > 1 on a differentiable "
                  "path to the score", "name a target tensor with --layer")


def test_quantized_qlinearconv_on_the_path(work):
    path = save(quantized_net(), work["dir"] / "q.onnx")
    explain_fails(work, path, 1, "does not depend on 'relu'", "cut at node 'quant0' (QuantizeLinear: quantized op, "
                  "explain the float model instead)", extra=("--layer", "relu"))


def test_quantized_convinteger_on_the_path(work):
    path = save(conv_integer_net(), work["dir"] / "ci.onnx")
    explain_fails(work, path, 1, "cut at node 'dynquant0' (DynamicQuantizeLinear: quantized op",
                  extra=("--layer", "relu"))


def test_integer_only_path(work):
    extra = [helper.make_node("Cast", ["relu"], ["as_int"], to=TensorProto.INT32, name="to_int"),
             helper.make_node("Cast", ["as_int"], ["back"], to=TensorProto.FLOAT, name="to_float")]
    path = save(conv_net(extra_nodes=extra, head_input="back"), work["dir"] / "intpath.onnx")
    explain_fails(work, path, 1, "does not depend on 'relu'", "cut at node 'to_int' (Cast: integer output, no gradient)",
                  "pick a layer that feeds the chosen output", extra=("--layer", "relu"))


def test_unknown_layer_suggests_close_matches(work):
    explain_fails(work, work["model"], 2, "net.onnx: layer 'rellu' is not a tensor of the model; did you mean 'relu'?",
                  extra=("--layer", "rellu"))
    with pytest.raises(LayerNotFoundError):
        Explainer(work["model"], layer="rellu")


def test_layer_not_connected_to_the_output(work):
    model = conv_net()
    model.graph.node.append(helper.make_node("Sigmoid", ["input"], ["side"], name="side0"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    path = save(model, work["dir"] / "side.onnx")
    explain_fails(work, path, 1, "the score tensor 'logits' does not depend on 'side'",
                  "pick a layer that feeds the chosen output", extra=("--layer", "side", "--output", "logits"))


def test_unknown_output_suggests_close_matches(work):
    explain_fails(work, work["model"], 2, "output 'logit' is not in the model; did you mean 'logits'?",
                  extra=("--output", "logit"))


def test_layers_command_shares_the_errors(work):
    assert_error(cli("layers", work["dir"] / "absent.onnx"), 1, "absent.onnx: no such file")
    assert_error(cli("layers", work["model"], "--output", "logit"), 2, "did you mean 'logits'?")


# ----------------------------------------------------------------------------- external data

def external_model(folder: Path, name="ext") -> Path:
    """conv_net with its weights in `name`.data beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(conv_net(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{name}.data", size_threshold=0)
    return path


def set_external(path: Path, key: str, value: str, tensor="W") -> None:
    model = onnx.load(str(path), load_external_data=False)
    init = next(t for t in model.graph.initializer if t.name == tensor)
    for entry in init.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        init.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


@pytest.fixture
def no_reads_of(monkeypatch):
    """Records every Python-level open() of the given paths (audit hook): proof that nothing is read."""
    watched, opened = set(), []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                target = os.path.realpath(os.fsdecode(args[0]))
            except Exception:
                return
            if target in watched:
                opened.append(target)

    sys.addaudithook(hook)  # hooks cannot be removed; an empty watch set makes it inert
    yield watched, opened
    watched.clear()


def test_external_data_loads(tmp_path):
    model = load_model(external_model(tmp_path / "m"))
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (6, 3, 3, 3)


def test_external_data_file_missing(tmp_path):
    path = external_model(tmp_path / "m")
    (tmp_path / "m" / "ext.data").unlink()
    with pytest.raises(ModelLoadError, match=r"ext\.onnx: external data file 'ext\.data' of tensor '\w+' is missing; "
                                             "keep the data files beside the model"):
        load_model(path)
    assert_error(cli("explain", path, write_image(tmp_path / "x.png", photo())), 1, "is missing")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_escaping_the_folder_is_refused_before_any_read(tmp_path, how, no_reads_of):
    watched, opened = no_reads_of
    path = external_model(tmp_path / "m")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)  # big enough that a read would succeed if it were attempted
    watched.add(os.path.realpath(secret))
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[how]
    if how == "symlink":
        os.symlink(secret, tmp_path / "m" / "link.bin")
    set_external(path, "location", location)
    with pytest.raises(ModelLoadError, match=r"ext\.onnx: tensor 'W' points at external data .* outside the model's "
                                             r"folder; refused"):
        load_model(path)
    assert opened == []
    before = digest(path)
    result = cli("explain", path, write_image(tmp_path / "x.png", photo()), "-o", tmp_path / "out")
    assert_error(result, 1, "outside the model's folder; refused")
    assert opened == [] and digest(path) == before and not (tmp_path / "out").exists()


def test_external_data_that_is_a_fifo_is_refused(tmp_path):
    path = external_model(tmp_path / "m")
    os.mkfifo(tmp_path / "m" / "pipe.data")  # reading it would block forever
    set_external(path, "location", "pipe.data")
    with pytest.raises(ModelLoadError, match="'pipe.data' of tensor 'W' is not a regular file; refused"):
        load_model(path)


@pytest.mark.parametrize("key,value,message", [
    ("length", "999999", r"external weight data does not match the model \(External data length \(999999\) exceeds"),
    ("offset", "999999", r"external weight data does not match the model \(External data offset \(999999\) exceeds"),
    ("length", "4", r"tensor 'W' of shape \[6, 3, 3, 3\] holds 4 bytes, expected 648"),
    ("offset", "-5", r"external data offset '-5', not a non-negative integer"),
    ("length", "abc", r"external data length 'abc', not a non-negative integer"),
])
def test_external_data_wrong_length_or_offset(tmp_path, key, value, message):
    path = external_model(tmp_path / "m")
    set_external(path, key, value)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


# ----------------------------------------------------------------------------- run-time inputs

@pytest.fixture(scope="module")
def explainer():
    return Explainer(conv_net())


@pytest.fixture(scope="module")
def static_explainer():
    return Explainer(conv_net(batch=1))


def test_class_index_out_of_range(explainer, work):
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match=r"class index 4 is out of range: use 0\.\.3, or -1 for the top class"):
        explainer(x, class_index=4)
    with pytest.raises(InputError, match=r"class index -2 is out of range"):
        explainer(x, class_index=[0, -2])
    assert InputError.exit_code == 2
    np.testing.assert_array_equal(explainer(x, class_index=-1).class_index, explainer(x).class_index)
    explain_fails(work, work["model"], 2, "class index 7 is out of range", "net.onnx has 4 classes; use 0..3",
                  extra=("--class", "7"))
    explain_fails(work, work["model"], 2, "--class must be a class index >= 0, got -2", extra=("--class", "-2"))


def test_wrong_batch_shape_dtype_for_a_static_model(static_explainer):
    good = np.zeros((1, 3, 8, 8), np.float32)
    assert static_explainer(good).cam.shape == (1, 8, 8)
    # A batch of 2 for a batch-1 model is explained one image at a time (see test_ux.py).
    assert static_explainer(np.zeros((2, 3, 8, 8), np.float32)).cam.shape == (2, 8, 8)
    with pytest.raises(InputError, match=r"expects shape .* got \(1, 3, 9, 8\)"):
        static_explainer(np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(InputError, match=r"must be a 4-D batch \(NCHW\); got shape \(3, 8, 8\)"):
        static_explainer(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="must be floating point; got int64"):
        static_explainer(np.zeros((1, 3, 8, 8), np.int64))
    with pytest.raises(InputError, match="class_index must be one int or 1 ints"):
        static_explainer(good, class_index=[0, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_the_input(explainer, bad):
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 2, 3, 4] = bad
    with pytest.raises(InputError, match="input 'input' contains NaN or Inf values"):
        explainer(x)


def test_a_model_whose_weights_give_nan(work):
    path = save(conv_net(weight=np.full((6, 3, 3, 3), np.nan, np.float32)), work["dir"] / "nanw.onnx")
    with pytest.raises(NonFiniteError, match=r"nanw\.onnx: the model's own output 'logits' is NaN/Inf for image\(s\) "
                                             r"0, 1 of the batch although the input is finite; check the model's weights"):
        Explainer(path)(np.ones((2, 3, 8, 8), np.float32))
    assert issubclass(NonFiniteError, UnsupportedModelError)
    explain_fails(work, path, 1, "nanw.onnx: the model's own output 'logits' is NaN/Inf")


def test_gradient_overflow_is_reported_not_returned(work):
    """Finite outputs whose gradients overflow: the map would be NaN; the error says so."""
    extra = [helper.make_node("Mul", ["relu", "huge"], ["big"], name="amplify"),
             helper.make_node("Mul", ["big", "tiny"], ["back"], name="attenuate")]
    model = conv_net(extra_nodes=extra, head_input="back")
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(1e30), "huge"),
                                    numpy_helper.from_array(np.float32(1e-30), "tiny")])
    explainer = Explainer(model, layer="big")
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    try:
        result = explainer(x)
    except NonFiniteError as exc:
        assert "NaN/Inf" in str(exc)
    else:
        assert np.all(np.isfinite(result.cam))


# ----------------------------------------------------------------------------- images

def test_unreadable_image(work):
    (work["dir"] / "notes.png").write_text("not a picture\n")
    result = cli("explain", work["model"], work["dir"] / "notes.png", "-o", work["out"])
    assert_error(result, 1, "notes.png: not an image OpenCV can read")
    assert files_under(work["out"]) == []


@pytest.mark.parametrize("ext,reason", [(".png", "PNG ends before its IEND chunk"),
                                        (".jpg", "JPEG ends before its end-of-image marker")])
def test_truncated_image(work, ext, reason):
    data = write_image(work["dir"] / f"full{ext}", photo(64, 64)).read_bytes()
    (work["dir"] / f"cut{ext}").write_bytes(data[: len(data) // 2])
    result = cli("explain", work["model"], work["dir"] / f"cut{ext}", "-o", work["out"])
    assert_error(result, 1, f"cut{ext}: {reason}; the file is damaged or was cut short")
    assert files_under(work["out"]) == []


def test_zero_size_image(work):
    (work["dir"] / "zero.jpg").write_bytes(b"")
    assert_error(cli("explain", work["model"], work["dir"] / "zero.jpg", "-o", work["out"]), 1,
                 "zero.jpg: the file is empty (0 bytes)")
    # A header that claims 0 x 5 pixels.
    data = bytearray(write_image(work["dir"] / "ok.png", photo()).read_bytes())
    data[16:24] = struct.pack(">II", 0, 5)
    (work["dir"] / "nopixels.png").write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"nopixels\.png: the image has no pixels \(0x5\)"):
        images_module.read_image(work["dir"] / "nopixels.png")


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "16-bit", "palette"])
def test_unusual_but_valid_images_are_explained(work, kind):
    if kind == "palette":
        path = palette_png(work["dir"] / "palette.png")
    else:
        pixels = {"grayscale": photo(channels=1)[:, :, 0], "rgba": np.dstack([photo(), np.full((16, 20), 128, np.uint8)]),
                  "16-bit": photo(dtype=np.uint16)}[kind]
        path = write_image(work["dir"] / f"{kind}.png", pixels)
    result = cli("explain", work["model"], path, "-o", work["out"])
    assert result.exit_code == 0, result.output
    assert len([f for f in files_under(work["out"]) if f.endswith(".npy")]) == 1
    heat = np.load(next(work["out"].glob("*.npy")))
    assert heat.shape == (16, 20) and np.all(np.isfinite(heat))


def palette_png(path) -> Path:
    """An 8-bit palette PNG (colour type 3) written by hand: 20 x 16, 4 colours."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    rows = b"".join(b"\0" + bytes((x // 5) % 4 for x in range(20)) for _ in range(16))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 16, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0]))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
    return Path(path)


def huge_png_header(path, width=20000, height=20000) -> Path:
    """A PNG whose header claims width x height (400 megapixels) with a token IDAT: what a
    decompression bomb looks like to a reader that trusts the header."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
    return Path(path)


def huge_jpeg_header(path, small: bytes, width=20000, height=20000) -> Path:
    """A real small JPEG with its start-of-frame size rewritten."""
    data = bytearray(small)
    i = 2
    while True:
        marker, (length,) = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xC2:
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            break
        i += 2 + length
    Path(path).write_bytes(bytes(data))
    return Path(path)


def test_20000_square_image_is_refused_from_its_header_before_decoding(work, monkeypatch):
    import resource

    png = huge_png_header(work["dir"] / "bomb.png")
    jpg = huge_jpeg_header(work["dir"] / "bomb.jpg", write_image(work["dir"] / "s.jpg", photo()).read_bytes())
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded a refused image"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in (png, jpg):
        with pytest.raises(ImageError, match=rf"{path.name}: 20000x20000 pixels is 400.0 megapixels \(400,000,000 "
                                             r"pixels\), over the limit of 100.0 megapixels \(100,000,000 pixels\) "
                                             r"\(--max-pixels counts pixels\); raise it with --max-pixels"):
            images_module.read_image(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000  # KiB: nothing was allocated
    result = cli("explain", work["model"], png, "-o", work["out"])
    assert_error(result, 1, "bomb.png: 20000x20000 pixels is 400.0 megapixels", "--max-pixels")
    assert files_under(work["out"]) == []


def test_pixel_limit_can_be_raised_and_lowered(work):
    image = write_image(work["dir"] / "p.png", photo(16, 20))
    assert_error(cli("explain", work["model"], image, "-o", work["out"], "--max-pixels", "100"), 1,
                 "p.png: 20x16 pixels is 320 pixels, over the limit of 100 pixels")
    assert cli("explain", work["model"], image, "-o", work["out"], "--max-pixels", "320").exit_code == 0
    assert_error(cli("explain", work["model"], image, "-o", work["dir"] / "o2", "--max-pixels", "0"), 2,
                 "--max-pixels must be at least 1")


def test_folder_with_non_images_mixed_in(work):
    folder = work["dir"] / "mixed"
    folder.mkdir()
    write_image(folder / "a.png", photo())
    write_image(folder / "b.jpg", photo())
    (folder / "notes.txt").write_text("x")
    (folder / "data.csv").write_text("1,2")
    result = cli("explain", work["model"], folder, "-o", work["out"])
    assert result.exit_code == 0, result.output
    assert "onnxcam: warning: skipped 2 file(s) that are not images" in result.stderr
    assert len((work["out"] / "summary.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- outputs

def test_unwritable_output_directory(work, monkeypatch):
    blocker = work["dir"] / "a-file"
    blocker.write_text("x")
    assert_error(cli("explain", work["model"], work["image"], "-o", blocker / "sub"), 1,
                 "a-file/sub: cannot create the output directory")
    locked = work["dir"] / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked and mode & os.W_OK else real_access(p, mode, **k))
    assert_error(cli("explain", work["model"], work["image"], "-o", locked), 1, "locked: output directory is not writable")
    assert_error(cli("augment", work["model"], "-o", locked / "x.onnx"), 1, "locked: output directory is not writable")
    assert files_under(locked) == []


def test_output_equal_to_the_input_model_is_refused(work):
    before = digest(work["model"])
    assert_error(cli("augment", work["model"], "-o", work["model"]), 1,
                 "net.onnx: refusing to overwrite the input model or its data; choose another output path")
    os.link(work["model"], work["dir"] / "hardlink.onnx")
    os.symlink(work["model"], work["dir"] / "symlink.onnx")
    for alias in ("hardlink.onnx", "symlink.onnx"):
        assert_error(cli("augment", work["model"], "-o", work["dir"] / alias), 1, "refusing to overwrite the input model")
    assert digest(work["model"]) == before
    assert sorted(p.name for p in work["dir"].iterdir()) == ["hardlink.onnx", "net.onnx", "photo.png", "symlink.onnx"]


def test_output_equal_to_the_input_models_external_data_is_refused(tmp_path):
    path = external_model(tmp_path)
    before = digest(tmp_path / "ext.data")
    assert_error(cli("augment", path, "-o", tmp_path / "ext.data"), 1, "refusing to overwrite the input model or its data")
    assert digest(tmp_path / "ext.data") == before


@pytest.mark.parametrize("where", ["replace", "write"])
def test_disk_full_while_explaining_leaves_no_partial_files(work, monkeypatch, where):
    from onnxcam.io import files

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "replace":
        monkeypatch.setattr(files.os, "replace", no_space)
    else:
        real_open = open

        class Full:
            def __init__(self, path, *args, **kwargs):
                self.f = real_open(path, *args, **kwargs)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # half of it lands, then the disk is full
                no_space()

        monkeypatch.setattr(files, "open", Full, raising=False)  # the writer's open() of its temp file
    result = cli("explain", work["model"], work["image"], "-o", work["out"])
    assert_error(result, 1, "photo_1_gradcam.png: cannot write (No space left on device)")
    assert files_under(work["out"]) == []


def test_disk_full_while_saving_a_model_leaves_no_partial_file(work, monkeypatch):
    from onnxcam import modelio

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = modelio.write_model

    def half_then_full(proto, f):  # the streaming writer gets half-way, then the disk is full
        real_write(proto, f)
        f.flush()
        f.truncate(f.tell() // 2)
        no_space()

    out = work["dir"] / "aug.onnx"
    for patch in ((modelio.os, "replace", no_space), (modelio, "write_model", half_then_full)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            assert_error(cli("augment", work["model"], "-o", out), 1, "aug.onnx: could not write the model "
                                                                          "(No space left on device)")
        assert sorted(p.name for p in work["dir"].iterdir()) == ["net.onnx", "photo.png"]


def test_a_failed_run_keeps_an_existing_output_folder_and_its_files(work):
    work["out"].mkdir()
    (work["out"] / "keep.txt").write_text("mine")
    assert_error(cli("explain", work["model"], work["image"], "-o", work["out"], "--class", "9"), 2, "class index 9")
    assert files_under(work["out"]) == ["keep.txt"]


# ----------------------------------------------------------------------------- the error API

def test_hierarchy_and_exit_codes():
    assert all(issubclass(c, OnnxcamError) for c in (UsageError, ModelLoadError, UnsupportedModelError, ImageError,
                                                     OutputError, NotDifferentiableError, NonFiniteError,
                                                     LayerNotFoundError, InputError))
    assert {c: c.exit_code for c in (UsageError, LayerNotFoundError, InputError)} == dict.fromkeys(
        (UsageError, LayerNotFoundError, InputError), 2)
    for c in (ModelLoadError, UnsupportedModelError, NotDifferentiableError, NonFiniteError, ImageError, OutputError):
        assert c.exit_code == 1
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Errors and exit codes")[1].split("\n## ")[0]
    documented = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
                  and issubclass(getattr(errors, name), OnnxcamError) and name != "OnnxcamError"}
    for name in documented:
        assert f"`{name}`" in section, f"{name} is not in the README's error table"


def test_a_malformed_graph_is_an_unsupported_model_error_naming_the_problem():
    """A node reading a tensor nothing produces: onnxcam's graph code would fail with a KeyError
    deep inside; the checker's diagnosis is the message instead."""
    from onnxcam import augment as augment_model

    model = conv_net()
    model.graph.node[2].input[0] = "ghost"
    with pytest.raises(UnsupportedModelError, match=r"model: node 'gap0' \(GlobalAveragePool\) reads tensor 'ghost' "
                                                    "that no node, input or initializer produces; the graph is malformed"):
        augment_model(model)
    model = conv_net()
    model.graph.node[1].output[0] = "conv"  # two producers of 'conv'
    with pytest.raises(UnsupportedModelError, match=r"tensor 'conv' is produced by both node 'conv0' \(Conv\) and "
                                                    r"node 'relu0' \(Relu\)"):
        Explainer(model)


# ----------------------------------------------------------------------------- real subprocesses

@pytest.fixture(scope="module")
def entry_point():
    exe = shutil.which("onnxcam") or str(Path(sys.executable).parent / "onnxcam")
    if not os.path.isfile(exe):
        pytest.skip("the onnxcam entry point is not installed (pip install -e .)")
    return exe


def test_entry_point_one_line_errors_and_exit_codes(entry_point, work):
    newest = newest_ir()
    model = conv_net(ir=newest + 1)
    model.graph.initializer.append(helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [1], [1.0]))
    cases = [
        ((work["dir"] / "absent.onnx", work["image"]), 1, "absent.onnx: no such file"),
        ((save(model, work["dir"] / "new.onnx"), work["image"]), 1,
         f"IR version {newest + 1} is newer than onnxruntime"),
        ((work["model"], work["image"], "--layer", "rellu"), 2, "did you mean 'relu'?"),
    ]
    for args, code, text in cases:
        proc = subprocess.run([entry_point, "explain", *map(str, args), "-o", str(work["out"])], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxcam: error: ") and text in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert not work["out"].exists()
