"""Packaging (issue 14, point 14): the resolved dependencies name exactly one ONNX Runtime
distribution, the one already installed (else the CPU build), so pip never puts onnxruntime and
onnxruntime-gpu side by side."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnxcam import install

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("onnxcam_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


def _requirements(tmp_path, **env) -> list:
    """Requires-Dist of the project's metadata as the build backend writes it (PEP 517 hook)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "onnxcam", src / "onnxcam", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import setuptools.build_meta as b, pathlib; pathlib.Path('meta').mkdir(); "
            "d = b.prepare_metadata_for_build_wheel('meta'); "
            "print(pathlib.Path('meta', d, 'METADATA').read_text())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("Requires-Dist:")]


def _ort(requirements) -> list:
    names = set(install.ORT_DISTRIBUTIONS)
    return [r for r in requirements if r.split(">")[0].split("=")[0].split(";")[0].split("[")[0].strip() in names]


def test_metadata_requires_exactly_the_installed_ort_distribution(tmp_path):
    installed = [d.split()[0] for d in install.ort_distributions()]
    assert len(installed) == 1, f"this environment holds {installed}: exactly one ONNX Runtime distribution expected"
    ort = _ort(_requirements(tmp_path))
    assert len(ort) == 1, ort  # one requirement, not one per platform marker
    assert ";" not in ort[0] and ort[0].startswith(installed[0] + ">="), ort


def test_the_override_and_the_cpu_default(tmp_path):
    assert _ort(_requirements(tmp_path, ONNXCAM_ONNXRUNTIME="onnxruntime")) == ["onnxruntime>=1.17"]
    setup = _setup_module()
    assert setup.ort_requirement([]) == "onnxruntime>=1.17"  # nothing installed: the CPU build
    assert setup.ort_requirement(["onnxruntime"]) == "onnxruntime>=1.17"
    assert setup.ort_requirement(["onnxruntime-gpu"]) == "onnxruntime-gpu>=1.17"
    assert setup.ort_requirement(["onnxruntime-directml"]) == "onnxruntime-directml>=1.17"
    assert setup.ort_requirement(["onnxruntime", "onnxruntime-gpu"]) == "onnxruntime-gpu>=1.17"
    assert setup.ort_requirement([], "onnxruntime-gpu") == "onnxruntime-gpu>=1.17"
    with pytest.raises(SystemExit, match="not an ONNX Runtime distribution"):
        setup.ort_requirement([], "onnxruntime-gpux")
    assert setup.ORT_DISTRIBUTIONS == install.ORT_DISTRIBUTIONS


def test_setup_sees_the_installed_distribution():
    assert _setup_module().installed_ort_distributions() == [d.split()[0] for d in install.ort_distributions()]


def test_two_installed_distributions_are_reported_with_the_repair(monkeypatch):
    assert install.duplicate_ort_message() is None  # this environment is sound
    monkeypatch.setattr(install, "ort_distributions", lambda: ["onnxruntime 1.32.0", "onnxruntime-gpu 1.31.1"])
    message = install.duplicate_ort_message()
    assert "2 ONNX Runtime distributions" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in message
