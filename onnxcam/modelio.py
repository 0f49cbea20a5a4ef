"""Loading and saving ONNX models with clear errors, the input's IR version kept, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import ModelLoadError, OutputError

# 2 GB protobuf limit: larger models must keep their weights in external data.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(model, load_external_data: bool = True) -> onnx.ModelProto:
    """Return a ModelProto from a path or a ModelProto; raise ModelLoadError with a clear message."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(os.fspath(model))
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; give the path of an .onnx model")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an .onnx model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; re-export the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelLoadError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file truncated or of another format?"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{path}: parsed, but holds no graph; is this really an ONNX model?")
    if load_external_data and _uses_external_data(proto):
        _check_external_locations(proto, path.parent, path)
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: external weight data could not be read ({exc}); "
                                 "keep the data files beside the model") from None
    return proto


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto))


def _all_tensors(proto):
    from onnx.external_data_helper import _get_all_tensors
    return _get_all_tensors(proto)


def _check_external_locations(proto, base_dir: Path, path: Path) -> None:
    """Refuse external-data locations that escape the model's folder, before reading anything."""
    base = base_dir.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} points at external data {location!r} "
                                 "outside the model's folder; refused")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} points at external data {location!r} "
                                 "outside the model's folder; refused")
        if not target.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")


def save_model(proto: onnx.ModelProto, out_path, refuse=()) -> Path:
    """Write `proto` to `out_path` atomically (temp file + rename); keep external data for > 2 GB.

    `refuse` lists paths that must never be overwritten (the user's input model).
    """
    out = Path(os.fspath(out_path))
    for other in refuse:
        if other is not None and Path(os.fspath(other)).exists() and out.exists() \
                and out.resolve() == Path(os.fspath(other)).resolve():
            raise OutputError(f"{out}: refusing to overwrite the input model; choose another output path")
    out_dir = out.parent if str(out.parent) else Path(".")
    if not out_dir.exists():
        raise OutputError(f"{out_dir}: output directory does not exist")
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"{out_dir}: output directory is not writable")
    large = proto.ByteSize() > _PROTOBUF_LIMIT if _fits_bytesize(proto) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        if large:
            data_name = out.name + ".data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{out}: could not write the model ({exc.strerror or exc})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return out


def _fits_bytesize(proto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:
        return False


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def serialize_for_runtime(proto: onnx.ModelProto) -> bytes:
    """Bytes an InferenceSession accepts (models under 2 GB)."""
    return proto.SerializeToString()
