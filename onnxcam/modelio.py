"""Loading and saving ONNX models with clear errors, the input's IR version kept, atomic writes.

Loading is defensive: a file that is not ONNX, an external-data entry that points outside the
model's folder (checked before anything is read) and a weight whose byte count does not match its
shape all end in a ModelLoadError naming the file and the tensor. `graph_errors` turns a crash of
onnxcam's graph code on a malformed graph into an UnsupportedModelError that says what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import onnx

from .io.files import atomic_path, check_output_file, default_permissions, temporary_directory
from .errors import ModelLoadError, OnnxcamError, OutputError, UnsupportedModelError

# 2 GB protobuf limit: larger models must keep their weights in external data.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(model, load_external_data: bool = True) -> onnx.ModelProto:
    """Return a ModelProto from a path or a ModelProto; raise ModelLoadError with a clear message."""
    if isinstance(model, onnx.ModelProto):
        _check_tensor_sizes(model, "model")
        return model
    path = Path(os.fspath(model))
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file; give the path of an .onnx model") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot open the model ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelLoadError(f"{path}: is a directory, not an .onnx model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path}: is not a regular file; give the path of an .onnx model")
    if info.st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; re-export the model")
    try:
        proto = read_model(path)
    except Exception as exc:  # protobuf raises DecodeError and others
        kind = _sniff(path)
        if kind:
            raise ModelLoadError(f"{path}: this is {kind}, not an ONNX model; give the path of an .onnx file") from None
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
            raise ModelLoadError(f"{path}: external weight data does not match the model "
                                 f"({_first_line(exc)}); save the model and its data file together again") from None
    _check_tensor_sizes(proto, path)
    return proto


def read_model(path) -> onnx.ModelProto:
    """Parse an .onnx file (external data not loaded) holding at most one weight's bytes extra.

    `onnx.load` reads the whole file, then parses it: the weights twice at the end. Here the
    top-level fields are walked: everything but the graph, and the graph's fields but its
    initializers, are gathered and parsed by protobuf as usual; each initializer is read and
    parsed alone. The result equals what `onnx.load` gives (a test checks it); a file this walk
    cannot follow is handed to `onnx.load`, whose error is the one reported."""
    try:
        return _read_streaming(path)
    except _NotStreamable:
        return onnx.load(str(path), load_external_data=False)


class _NotStreamable(Exception):
    pass


def _read_streaming(path) -> onnx.ModelProto:
    size = os.path.getsize(path)
    proto = onnx.ModelProto()
    model_fields, graph_fields = bytearray(), bytearray()
    with open(path, "rb") as f:
        while f.tell() < size:
            start = f.tell()
            key = _read_varint(f)
            if key != _GRAPH_TAG[0]:
                model_fields += _raw_field(f, start, key & 7, size)
                continue
            length = _read_varint(f)
            end = f.tell() + length
            if end > size:
                raise _NotStreamable
            while f.tell() < end:
                inner_start = f.tell()
                inner_key = _read_varint(f)
                if inner_key != _INITIALIZER_TAG[0]:
                    graph_fields += _raw_field(f, inner_start, inner_key & 7, end)
                    continue
                length = _read_varint(f)
                if f.tell() + length > end:
                    raise _NotStreamable
                proto.graph.initializer.add().ParseFromString(f.read(length))  # one weight at a time
            if f.tell() != end:
                raise _NotStreamable
    # Merge, not parse: parsing would clear the initializers already in place. The gathered bytes
    # hold no initializer and no graph field, so merging them is what a full parse does.
    proto.MergeFromString(bytes(model_fields))
    proto.graph.MergeFromString(bytes(graph_fields))
    return proto


def _raw_field(f, start: int, wire: int, limit: int) -> bytes:
    """The bytes of one field (key and value) that began at `start`; `f` is past its key."""
    if wire == 0:
        _read_varint(f)
    elif wire == 1:
        f.seek(8, os.SEEK_CUR)
    elif wire == 2:
        length = _read_varint(f)
        f.seek(length, os.SEEK_CUR)
    elif wire == 5:
        f.seek(4, os.SEEK_CUR)
    else:  # groups (3, 4) and invalid wire types: not in ONNX files
        raise _NotStreamable
    end = f.tell()
    if end > limit:
        raise _NotStreamable
    f.seek(start)
    return f.read(end - start)


def _read_varint(f) -> int:
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            raise _NotStreamable
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise _NotStreamable


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"PK\x03\x04", "a zip archive (a .pt/.pth or .npz?)"),
          (b"\x80\x02", "a Python pickle (a PyTorch checkpoint?)"), (b"\x93NUMPY", "a numpy .npy file"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"))


def _sniff(path) -> str:
    """What a file that is not ONNX looks like, from its first bytes ("" when unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return ""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    return ""


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_tensor_sizes(proto: onnx.ModelProto, path) -> None:
    """Every weight stored as raw bytes must hold exactly prod(dims) elements (a corrupt or
    mismatched data file otherwise surfaces later as an obscure reshape error)."""
    for tensor in _all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not loaded (load_external_data=False)
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}; "
                                 "the file is corrupt, re-export the model")
        if not tensor.HasField("raw_data"):
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except Exception:
            continue  # sub-byte or unknown types: left to the runtime
        if tensor.data_type in _PACKED_TYPES or itemsize == 0:
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} of shape {list(tensor.dims)} holds "
                                 f"{len(tensor.raw_data)} bytes, expected {expected}; the file or its external "
                                 "data is corrupt or does not belong to this model")


# Types packed below one byte per element (INT4/UINT4, FLOAT4, INT2/UINT2): numpy's itemsize lies.
_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2")
                 if hasattr(onnx.TensorProto, n)}


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
        if "\0" in location:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has a malformed external data location; refused")
        if not location or os.path.isabs(location):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} points at external data {location!r} "
                                 "outside the model's folder; refused")
        for key in ("offset", "length"):
            if key in info and not info[key].isdigit():
                raise ModelLoadError(f"{path}: tensor {tensor.name!r} has external data {key} {info[key]!r}, not a "
                                     "non-negative integer; the model file is corrupt")
        try:
            target = (base / location).resolve()
        except (OSError, RuntimeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} points at external data {location!r} that cannot "
                                 "be resolved (a symlink loop?); refused") from None
        if base != target and base not in target.parents:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} points at external data {location!r} "
                                 "outside the model's folder; refused")
        if not target.exists():
            raise ModelLoadError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing; "
                                 "keep the data files beside the model")
        if not stat.S_ISREG(target.stat().st_mode):
            raise ModelLoadError(f"{path}: external data {location!r} of tensor {tensor.name!r} is not a regular "
                                 "file; refused")


def save_model(proto: onnx.ModelProto, out_path, refuse=()) -> Path:
    """Write `proto` to `out_path` atomically (temp file + rename); keep external data for > 2 GB.

    `refuse` lists paths that must never be overwritten (the user's input model).
    """
    out = Path(os.fspath(out_path))
    for other in refuse:
        if other is not None and _same_file(out, other):
            raise OutputError(f"{out}: refusing to overwrite the input model or its data; choose another output path")
    out_dir = out.parent if str(out.parent) else Path(".")
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: output directory does not exist")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name for the model")
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"{out_dir}: output directory is not writable")
    if weight_bytes(proto) > _PROTOBUF_LIMIT - 2**26:  # leave room for the graph itself
        return _save_with_external_data(proto, out, refuse)
    with atomic_path(out, "could not write the model") as tmp:
        with open(tmp, "wb") as f:
            write_model(proto, f)
    return out


def _save_with_external_data(proto: onnx.ModelProto, out: Path, refuse=()) -> Path:
    """Models over 2 GB: `out` plus its weights in `out.data`. Both are written in a private folder
    beside `out` (removed on any failure or signal, so no partial data file is left), then renamed
    into place, the data first. (onnx's saver moves the weights out of `proto`, as before.)"""
    data = out.with_name(out.name + ".data")
    for other in refuse:
        if other is not None and _same_file(data, other):
            raise OutputError(f"{data}: refusing to overwrite the input model's data; choose another output path")
    check_output_file(data)
    try:
        with temporary_directory(f".{out.name}.", parent=out.parent if str(out.parent) else ".") as folder:
            staged = Path(folder) / out.name
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            for path in (staged, staged.with_name(data.name)):
                default_permissions(path)
            os.replace(staged.with_name(data.name), data)
            os.replace(staged, out)
    except OSError as exc:
        raise OutputError(f"{out}: could not write the model ({exc.strerror or exc})") from None
    return out


def write_model(proto: onnx.ModelProto, f) -> None:
    """Serialise `proto` to the binary file `f` holding at most one weight's bytes extra.

    `onnx.save_model` builds the whole file in memory first, and protobuf's serialiser holds a
    message twice while it does (its own buffer, then the Python bytes): with the model itself,
    every weight three times. Protobuf lets a message's fields come in any order, so the model
    is written as its fields without the graph, then the graph field: its length, its fields
    without the initializers, and each initializer as its small fields followed by its raw bytes
    (read once). The bytes parse to exactly `proto` (a test checks it)."""
    graph = proto.graph
    head = _copy_fields(proto, onnx.ModelProto(), skip="graph")
    graph_bytes = _copy_fields(graph, onnx.GraphProto(), skip="initializer").SerializeToString()
    pieces = [_tensor_pieces(tensor) for tensor in graph.initializer]
    sizes = [len(fields) + (0 if raw is None else 1 + len(_varint(raw)) + raw) for fields, raw in pieces]
    graph_length = len(graph_bytes) + sum(1 + len(_varint(n)) + n for n in sizes)
    f.write(head.SerializeToString())
    f.write(_GRAPH_TAG + _varint(graph_length) + graph_bytes)
    for tensor, (fields, raw_length), size in zip(graph.initializer, pieces, sizes):
        f.write(_INITIALIZER_TAG + _varint(size) + fields)
        if raw_length is not None:
            raw = tensor.raw_data
            if len(raw) != raw_length:  # load_model checks sizes; never write a corrupt file anyway
                raise OutputError(f"tensor {tensor.name!r} holds {len(raw)} bytes, expected {raw_length}")
            f.write(_RAW_DATA_TAG + _varint(raw_length))
            f.write(raw)
            del raw


def _tensor_pieces(tensor):
    """(serialised fields other than raw_data, length of raw_data or None when it is not set)."""
    if not tensor.HasField("raw_data"):
        return tensor.SerializeToString(), None
    fields = _copy_fields(tensor, onnx.TensorProto(), skip="raw_data").SerializeToString()
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 0
    if tensor.data_type in _PACKED_TYPES or itemsize == 0:
        return fields, len(tensor.raw_data)
    return fields, int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# Protobuf keys (field number << 3 | wire type 2, length-delimited): ModelProto.graph = 7,
# GraphProto.initializer = 5, TensorProto.raw_data = 9.
_GRAPH_TAG = bytes([(7 << 3) | 2])
_INITIALIZER_TAG = bytes([(5 << 3) | 2])
_RAW_DATA_TAG = bytes([(9 << 3) | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _copy_fields(source, target, skip: str):
    """`target` with every field of `source` set except `skip` (no copy of the skipped field)."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in source.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf < 5.28
            repeated = field.label == FieldDescriptor.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target


def input_files(model_path) -> list:
    """The model file and the external data files it names: what an output must never overwrite."""
    if model_path is None or isinstance(model_path, onnx.ModelProto):
        return []
    path = Path(os.fspath(model_path))
    files = [path]
    try:
        proto = read_model(path)
    except Exception:
        return files
    for tensor in _all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value and "\0" not in entry.value:
                files.append(path.parent / entry.value)
    return files


def _same_file(a, b) -> bool:
    """True when `a` and `b` name one file (same path, a symlink or a hard link to it)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return Path(os.fspath(a)).resolve() == Path(os.fspath(b)).resolve()
        except (OSError, RuntimeError, ValueError):
            return False




@contextlib.contextmanager
def graph_errors(proto: onnx.ModelProto, label="model"):
    """Turn a crash of onnxcam's graph code into an UnsupportedModelError when the graph is at fault.

    onnxcam's graph walkers assume a well-formed graph; on a malformed one (a node reading a tensor
    nothing produces, an attribute of the wrong type...) they may fail with KeyError, ValueError
    and the like. When that happens the ONNX checker says what is wrong with the graph, and that is
    the message. When the checker finds the graph valid the crash is onnxcam's bug and propagates.
    """
    try:
        yield
    except OnnxcamError:
        raise
    except Exception as exc:
        problem = graph_problem(proto)
        if problem is not None:
            raise UnsupportedModelError(f"{label}: the graph is malformed ({problem}); fix or re-export the "
                                        "model (onnx.checker.check_model explains)") from exc
        if type(exc).__module__.startswith("onnxruntime"):
            # onnxcam runs the model to learn shapes the file does not state; ORT refused it.
            first = " ".join(str(exc).split())[:400]
            raise UnsupportedModelError(f"{label}: ONNX Runtime cannot run this model ({first}); check that it runs "
                                        "in onnxruntime on its own") from exc
        raise


def graph_problem(proto: onnx.ModelProto):
    """One line saying why `proto` is not a valid ONNX graph, or None when the checker accepts it."""
    try:
        if weight_bytes(proto) > _PROTOBUF_LIMIT - 2**26:
            return None  # the in-memory checker cannot take it; the runtime will say
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, and anything a garbage proto makes the checker raise
        text = " ".join(str(exc).replace("==> Context:", ";").split())
        return (text or type(exc).__name__)[:400]
    return None


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes held in initializers, from their shapes: ByteSize() serialises the whole message and
    even len(raw_data) copies the bytes (each most of a second on VGG16) just to choose between
    memory and external data. Sizes agree with the data: load_model checks that."""
    total = 0
    for tensor in proto.graph.initializer:
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except Exception:
            itemsize = 8
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def check_graph_structure(proto: onnx.ModelProto, label="model") -> None:
    """Refuse a main graph whose wiring is broken, with the node at fault named: a node reading a
    tensor that nothing produces, two producers of one tensor, an output nothing computes. ONNX
    Runtime refuses these too; catching them first gives the message instead of a confusing one
    from the graph analysis. (Subgraphs may read outer names and are left to the runtime.)"""
    graph = proto.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    available |= {t.values.name for t in graph.sparse_initializer}
    producer = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in producer or out in available:
                first = producer.get(out)
                by = f"node {first.name!r} ({first.op_type})" if first is not None else "a graph input or initializer"
                raise UnsupportedModelError(f"{label}: tensor {out!r} is produced by both {by} and node {node.name!r} "
                                            f"({node.op_type}); the graph is malformed, re-export the model")
            producer[out] = node
    known = available | set(producer)
    for node in graph.node:
        for name in node.input:
            if name not in known:
                raise UnsupportedModelError(f"{label}: node {node.name!r} ({node.op_type}) reads tensor {name!r} that no "
                                            "node, input or initializer produces; the graph is malformed, re-export "
                                            "the model")
    for out in graph.output:
        if out.name not in known:
            raise UnsupportedModelError(f"{label}: graph output {out.name!r} is not computed by any node; the graph "
                                        "is malformed, re-export the model")
    from .autodiff.graph import nodes_in_cycles

    stuck = nodes_in_cycles(graph)
    if stuck:
        names = ", ".join(f"{n.name or '(unnamed)'!r} ({n.op_type})" for n in stuck[:4])
        raise UnsupportedModelError(f"{label}: the graph has a cycle: node(s) {names}{' ...' if len(stuck) > 4 else ''} "
                                    "depend on their own outputs; the graph is malformed, re-export the model")
