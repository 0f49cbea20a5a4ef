import subprocess
import sys

import pytest

from onnxcam.errors import UsageError
from onnxcam.providers import choose_providers, provider_loads


def test_cpu_always_last_and_loads():
    chosen = choose_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    assert provider_loads("CPUExecutionProvider")


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown execution provider 'nope'"):
        choose_providers(["nope"])


def test_no_loud_cuda_error_when_choosing_quietly():
    # onnxruntime-gpu prints an error when CUDA is asked for on a machine without it; the default
    # choice must stay silent whether or not CUDA is present.
    code = "from onnxcam.providers import choose_providers; print(choose_providers())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Error" not in done.stderr and "error" not in done.stderr.lower()
    assert done.stdout.strip().endswith("'CPUExecutionProvider']")
