"""Class names: the 1000 ImageNet labels built in, or a user file.

A label file is plain text with one name per line (line i is class i), or JSON: a list of names,
or an object mapping indices to names (Keras' imagenet_class_index.json form, [wnid, name] pairs,
is understood too).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from .files import read_user_file

IMAGENET = "imagenet"
MAX_LABELS_BYTES = 64 * 2**20
MAX_CLASSES = 10_000_000


def imagenet_labels() -> list:
    text = resources.files("onnxcam").joinpath("data/imagenet_labels.txt").read_text(encoding="utf-8")
    return text.splitlines()


def load_labels(path=None) -> list:
    """The built-in ImageNet names when `path` is None or "imagenet", else the names in the file."""
    if path is None or path == IMAGENET:
        return imagenet_labels()
    path = Path(os.fspath(path))
    if not path.exists():
        raise UsageError(f"{path}: labels file not found")
    data = read_user_file(path, MAX_LABELS_BYTES, UsageError, "labels file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: cannot read the labels file ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return _json_labels(path, text)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UsageError(f"{path}: the labels file is empty")
    return [line.strip() for line in lines]


def _json_labels(path, text) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, list):
        return [_name(v) for v in data]
    if isinstance(data, dict):
        try:
            items = {int(k): _name(v) for k, v in data.items()}
        except ValueError:
            raise UsageError(f"{path}: a JSON labels object must map class indices to names") from None
        if items and max(items) >= MAX_CLASSES:  # {"1000000000": "x"} must not allocate a billion names
            raise UsageError(f"{path}: class index {max(items)} is beyond {MAX_CLASSES - 1}; is this a labels file?")
        labels = [""] * (max(items) + 1 if items else 0)
        for index, name in items.items():
            if index >= 0:
                labels[index] = name
        return labels
    raise UsageError(f"{path}: a JSON labels file must hold a list or an object")


def _name(value) -> str:
    if isinstance(value, (list, tuple)) and value:
        return str(value[-1])
    return str(value)


def label_for(labels, index: int) -> str:
    """The name of class `index`, or "" when the list has none for it."""
    if labels is not None and 0 <= index < len(labels):
        return labels[index]
    return ""


def labels_for_model(path, n_classes, on_warning=lambda message: None):
    """The labels to print for a model with `n_classes` outputs (None when unknown).

    Without a file: the ImageNet names for 1000 classes, and for 1001 with a background class
    first (TensorFlow's slim models); no names for other class counts, nor when the count is not
    known before running (a dynamic class axis, a segmenter's or detector's output): a name from
    the wrong list is worse than none.
    """
    if path is not None:
        names = load_labels(path)
        if n_classes and len(names) != n_classes:
            on_warning(f"{path}: holds {len(names)} labels but the model has {n_classes} classes")
        return names
    if n_classes == 1000:
        return imagenet_labels()
    if n_classes == 1001:
        return ["background"] + imagenet_labels()
    return None
