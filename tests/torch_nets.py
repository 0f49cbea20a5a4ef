"""Small torch architectures for tests (plain torch: no torchvision in CI), and their export."""

from __future__ import annotations

import onnx
import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """ResNet-style: conv-bn-relu stem, MaxPool 3x3/2, residual blocks, GAP, Linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 48, 2)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class TinyMobileNetV3(nn.Module):
    """MobileNetV3-style: HardSwish, depthwise convs, SE with Hardsigmoid and broadcast Mul,
    ReLU6, a 1x1 head conv after pooling and a Softmax output (the score is its logit input)."""

    def __init__(self, classes=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU6(), SqueezeExcite(16), nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.block2 = nn.Sequential(nn.Conv2d(24, 72, 1, bias=False), nn.BatchNorm2d(72), nn.Hardswish(),
                                    nn.Conv2d(72, 72, 5, 2, 2, groups=72, bias=False), nn.BatchNorm2d(72),
                                    nn.Hardswish(), SqueezeExcite(72), nn.Conv2d(72, 40, 1, bias=False),
                                    nn.BatchNorm2d(40))
        self.last = nn.Sequential(nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.head = nn.Sequential(nn.Conv2d(96, 128, 1), nn.Hardswish())
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.last(self.block2(self.block1(self.stem(x))))
        x = self.head(nn.functional.adaptive_avg_pool2d(x, 1))
        return torch.softmax(self.fc(torch.flatten(x, 1)), dim=1)

    def logits(self, x):
        x = self.last(self.block2(self.block1(self.stem(x))))
        x = self.head(nn.functional.adaptive_avg_pool2d(x, 1))
        return self.fc(torch.flatten(x, 1))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so that inference BN is not the identity, and He (fan-in)
    initialised convolutions: torch's default init shrinks activations block after block in
    depthwise nets until every CAM is zero, which would make CAM comparisons vacuous."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def export(model: nn.Module, path, size=64, opset=13, dynamic_spatial=False) -> str:
    """Legacy torch.onnx export with a dynamic batch; IR version capped for onnxruntime."""
    x = torch.randn(2, 3, size, size)
    axes = {0: "N", 2: "H", 3: "W"} if dynamic_spatial else {0: "N"}
    torch.onnx.export(model, x, str(path), opset_version=opset, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": axes, "output": {0: "N"}}, dynamo=False)
    proto = onnx.load(str(path))
    if proto.ir_version > 8:
        proto.ir_version = 8
        onnx.save(proto, str(path))
    return str(path)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT-style: patch embedding, class token, position embedding, pre-norm blocks, head on x[:, 0]."""

    def __init__(self, size=64, patch=8, dim=32, depth=2, heads=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class WindowBlock(nn.Module):
    """Swin-style block: tokens [N, h*w, C], attention inside non-overlapping windows (window
    partition and reverse by Reshape/Transpose), pre-norm, MLP; no class token."""

    def __init__(self, dim, heads, grid, window):
        super().__init__()
        self.grid, self.window = grid, window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        n, t, c = x.shape
        g, w = self.grid, self.window
        y = self.norm1(x).reshape(n, g // w, w, g // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        y = self.attn(y).reshape(n, g // w, g // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, t, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    def __init__(self, size=64, patch=8, dim=32, heads=4, window=4, classes=10):
        super().__init__()
        grid = size // patch
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(WindowBlock(dim, heads, grid, window), WindowBlock(dim, heads, grid, window))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))
