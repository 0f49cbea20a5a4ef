"""Fetch real-world test models without installing the packages that ship them.

`rapidocr_model(name)` takes an ONNX file out of the rapidocr-onnxruntime wheel. Installing that
package would pull in the CPU `onnxruntime`, which clobbers `onnxruntime-gpu`, so the wheel is only
downloaded (`pip download --no-deps`) and opened as a zip. Everything lives in ~/.cache/onnxcam/
(or $ONNXCAM_CACHE); calls are idempotent and files appear atomically (write to a temporary
file in the same directory, then rename).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onnxcam.io.files import atomic_write_bytes

RAPIDOCR_PACKAGE = "rapidocr-onnxruntime"
RAPIDOCR_VERSION = "1.4.4"
RAPIDOCR_WHEEL = f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-py3-none-any.whl"


class FetchError(RuntimeError):
    """The model could not be downloaded."""


class NetworkUnavailable(FetchError):
    """The package index could not be reached at all (offline machine, no proxy...)."""


# pip's messages when it cannot reach the index (urllib3/requests errors and resolver failures).
_NETWORK_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
                    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
                    "ProxyError", "ConnectTimeoutError", "ReadTimeoutError", "Connection refused",
                    "Could not fetch URL")


def cache_dir() -> Path:
    path = Path(os.environ.get("ONNXCAM_CACHE", Path.home() / ".cache" / "onnxcam"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rapidocr_wheel(cache: Path) -> Path:
    wheel = cache / RAPIDOCR_WHEEL
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    # Download into a private directory, then move the wheel into place atomically, so that a
    # concurrent or interrupted download never leaves a half-written wheel under the final name.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--timeout", "20", "--retries", "1", f"{RAPIDOCR_PACKAGE}=={RAPIDOCR_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            output = proc.stderr + proc.stdout
            tail = " | ".join(output.strip().splitlines()[-3:])
            error = NetworkUnavailable if any(m in output for m in _NETWORK_MARKERS) else FetchError
            raise error(f"`pip {' '.join(cmd[3:])}` failed: {tail}")
        os.replace(got[0], wheel)
    return wheel


def rapidocr_model(name: str) -> Path:
    """Path to `rapidocr_onnxruntime/models/<name>` from the rapidocr-onnxruntime wheel."""
    cache = cache_dir()
    target = cache / "rapidocr" / name
    if target.is_file():
        return target
    wheel = _rapidocr_wheel(cache)
    member = f"rapidocr_onnxruntime/models/{name}"
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(member)
        except KeyError:
            models = sorted(n.rsplit("/", 1)[-1] for n in zf.namelist() if n.startswith("rapidocr_onnxruntime/models/"))
            raise FileNotFoundError(f"{member} is not in {wheel.name}; it has {models}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return target


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["ch_ppocr_mobile_v2.0_cls_infer.onnx"]:
        print(rapidocr_model(arg))
