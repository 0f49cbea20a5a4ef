"""Build-time choice of the ONNX Runtime distribution onnxcam depends on (everything else is in
pyproject.toml).

ONNX Runtime ships as several distributions (onnxruntime, onnxruntime-gpu, -directml, -openvino,
...) that all install the same `onnxruntime` package. Two of them side by side overwrite each
other's files and break when either is upgraded or removed. So onnxcam depends on exactly one:

1. the one named by the environment variable ONNXCAM_ONNXRUNTIME (e.g. onnxruntime-gpu), else
2. the one already installed in the target environment (a CUDA user's onnxruntime-gpu stays), else
3. onnxruntime, the CPU build (the GPU build is a 300 MB download a CPU-only user does not need).

Under pip's build isolation the build runs in a temporary environment, so the target environment is
asked in a subprocess of the same interpreter with the isolation's path overrides removed.
"""

import json
import os
import subprocess
import sys

from setuptools import setup

ORT_MIN = "1.17"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-cann",
                     "onnxruntime-training")
BASE = ["onnx>=1.14", "onnx-graphsurgeon>=0.5", "numpy>=1.23", "opencv-python-headless>=4.6", "click>=8.0"]

_PROBE = ("import json, importlib.metadata as m; names = %r; found = []\n"
          "for n in names:\n"
          "    try: m.distribution(n); found.append(n)\n"
          "    except m.PackageNotFoundError: pass\n"
          "print(json.dumps(found))")


def installed_ort_distributions():
    """The ONNX Runtime distributions installed in the environment pip installs into."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE % (ORT_DISTRIBUTIONS,)], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return []


def ort_requirement(installed, override=None):
    """The one ONNX Runtime requirement: the override, else the installed distribution, else the CPU one."""
    if override:
        if override not in ORT_DISTRIBUTIONS:
            raise SystemExit(f"ONNXCAM_ONNXRUNTIME={override!r} is not an ONNX Runtime distribution; use one of "
                             f"{', '.join(ORT_DISTRIBUTIONS)}")
        return f"{override}>={ORT_MIN}"
    chosen = [name for name in ORT_DISTRIBUTIONS if name in installed]
    # Several already installed (the broken state) -> keep the first non-CPU one; onnxcam warns at run time.
    accelerated = [name for name in chosen if name != "onnxruntime"]
    return f"{(accelerated or chosen or ['onnxruntime'])[0]}>={ORT_MIN}"


if __name__ == "__main__":
    override = os.environ.get("ONNXCAM_ONNXRUNTIME", "").strip() or None
    setup(install_requires=BASE + [ort_requirement(installed_ort_distributions() if not override else [], override)])
