"""Small torch-built hierarchical transformers and MLP-mixers, shaped like the timm families whose
exports onnxcam must explain without help: LeViT (no LayerNorm, BatchNorm'd Linears, attention
that subsamples tokens), PVT-v2 (spatial-reduction attention, a depthwise conv in the MLP),
timm's Swin (NHWC maps, PatchMerging through 6-D Reshape/Transpose), ResMLP (affine norms, a
Linear across tokens) and CaiT (class-attention blocks after the self-attention ones).

Grids are read from the tensors' shapes at run time (h, w = x.shape...), so legacy exports with a
dynamic input size carry token counts that shape inference cannot give."""

from __future__ import annotations

import torch
from torch import nn


def heads_attention(q, k, v, heads):
    """Softmax attention of [N, Tq, C] queries over [N, Tk, C] keys/values, by heads."""
    n, tq, c = q.shape
    tk = k.shape[1]
    d = c // heads
    q = q.reshape(n, tq, heads, d).transpose(1, 2)
    k = k.reshape(n, tk, heads, d).transpose(1, 2)
    v = v.reshape(n, tk, heads, d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(n, tq, c)


class Residual(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, *grid):
        return x + self.inner(x, *grid)


# ---------------------------------------------------------------------- LeViT-like
class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over the flattened tokens."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out, bias=False)
        self.bn = nn.BatchNorm1d(dim_out)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape(y.shape)


class LeViTAttention(nn.Module):
    def __init__(self, dim, heads=2, subsample=False, dim_out=None):
        super().__init__()
        self.heads, self.subsample = heads, subsample
        dim_out = dim_out or dim
        self.q = LinearNorm(dim, dim)
        self.kv = LinearNorm(dim, dim * 2)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(dim, dim_out))

    def forward(self, x, h, w):
        k, v = self.kv(x).chunk(2, dim=-1)
        if self.subsample:  # queries from every second token in both directions
            x = x.reshape(x.shape[0], h, w, x.shape[2])[:, ::2, ::2].flatten(1, 2)
        return self.proj(heads_attention(self.q(x), k, v, self.heads))


class LeViTMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.act, self.down = LinearNorm(dim, dim * 2), nn.Hardswish(), LinearNorm(dim * 2, dim)

    def forward(self, x, h=None, w=None):
        return self.down(self.act(self.up(x)))


class AttnBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = LeViTAttention(dim)

    def forward(self, x, h, w):
        return self.attn(x, h, w)


class LeViTLike(nn.Module):
    """Conv stem (stride 8), attention + MLP residual blocks, attention that subsamples the queries
    (stride 16 after it), mean over tokens, head. No LayerNorm anywhere."""

    def __init__(self, dim=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), nn.Conv2d(8, 16, 3, 2, 1), nn.Hardswish(),
                                  nn.Conv2d(16, dim, 3, 2, 1))
        self.blocks1 = nn.ModuleList([Residual(AttnBlock(dim)), Residual(LeViTMlp(dim))])
        self.down = LeViTAttention(dim, subsample=True, dim_out=2 * dim)
        self.blocks2 = nn.ModuleList([Residual(AttnBlock(2 * dim)), Residual(LeViTMlp(2 * dim))])
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stem(x)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks1:
            x = block(x, h, w)
        x = self.down(x, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
        for block in self.blocks2:
            x = block(x, h, w)
        return self.head(x.mean(1))


# ---------------------------------------------------------------------- PVT-like
class SRAttention(nn.Module):
    """PVT-v2's attention: keys and values from a strided conv of the token map (sr > 1)."""

    def __init__(self, dim, heads=2, sr=1):
        super().__init__()
        self.heads, self.sr = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.reduce = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        n, t, c = x.shape
        source = x
        if self.sr > 1:
            grid = x.transpose(1, 2).reshape(n, c, h, w)
            source = self.norm(self.reduce(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.proj(heads_attention(self.q(x), k, v, self.heads))


class MixFFN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim * 2), nn.Linear(dim * 2, dim)
        self.dw = nn.Conv2d(dim * 2, dim * 2, 3, 1, 1, groups=dim * 2)

    def forward(self, x, h, w):
        y = self.fc1(x)
        n, t, c = y.shape
        y = self.dw(y.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(nn.functional.gelu(y))


class PVTBlock(nn.Module):
    def __init__(self, dim, sr):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SRAttention(dim, sr=sr)
        self.norm2, self.mlp = nn.LayerNorm(dim), MixFFN(dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


class PVTLike(nn.Module):
    """Overlapping patch embeddings (stride 4, then 8), a block with spatial-reduction attention,
    two blocks at the last stage, final norm, mean over tokens."""

    def __init__(self, classes=10):
        super().__init__()
        self.embed1, self.norm_e1 = nn.Conv2d(3, 16, 7, 4, 3), nn.LayerNorm(16)
        self.stage1 = nn.ModuleList([PVTBlock(16, sr=2)])
        self.norm1 = nn.LayerNorm(16)
        self.embed2, self.norm_e2 = nn.Conv2d(16, 32, 3, 2, 1), nn.LayerNorm(32)
        self.stage2 = nn.ModuleList([PVTBlock(32, sr=1), PVTBlock(32, sr=1)])
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.embed1(x)
        n, c, h, w = x.shape
        x = self.norm_e1(x.flatten(2).transpose(1, 2))
        for block in self.stage1:
            x = block(x, h, w)
        x = self.norm1(x).transpose(1, 2).reshape(n, c, h, w)
        x = self.embed2(x)
        n, c, h, w = x.shape
        x = self.norm_e2(x.flatten(2).transpose(1, 2))
        for block in self.stage2:
            x = block(x, h, w)
        return self.head(self.norm(x).mean(1))


# ---------------------------------------------------------------------- timm-Swin-like (NHWC)
class SwinBlockNHWC(nn.Module):
    """timm's Swin block on [N, H, W, C]: window partition and reverse through 6-D views."""

    def __init__(self, dim, window=2, heads=2):
        super().__init__()
        self.window, self.heads = window, heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        n, h, w, c = x.shape
        s = self.window
        y = self.norm1(x).reshape(n, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        y = self.proj(heads_attention(q, k, v, self.heads))
        y = y.reshape(n, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """timm's: [N, H, W, C] -> [N, H/2, 2, W/2, 2, C] -> [N, H/2, W/2, 2, 2, C] -> [N, H/2, W/2, 4C]."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinNHWC(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.patch, self.patch_norm = nn.Conv2d(3, 16, 4, 4), nn.LayerNorm(16)
        self.stage1 = nn.Sequential(SwinBlockNHWC(16))
        self.merge = PatchMerging(16)
        self.stage2 = nn.Sequential(SwinBlockNHWC(32), SwinBlockNHWC(32))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean((1, 2)))


# ---------------------------------------------------------------------- ResMLP-like
class Affine(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        return self.alpha * x + self.beta


class ResMLPBlock(nn.Module):
    def __init__(self, dim, tokens):
        super().__init__()
        self.norm1, self.cross = Affine(dim), nn.Linear(tokens, tokens)
        self.norm2 = Affine(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.ls1, self.ls2 = nn.Parameter(torch.rand(dim) * 0.5 + 0.5), nn.Parameter(torch.rand(dim) * 0.5 + 0.5)

    def forward(self, x):
        x = x + self.ls1 * self.cross(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ls2 * self.mlp(self.norm2(x))


class ResMLPLike(nn.Module):
    def __init__(self, size=64, patch=8, dim=24, classes=10):
        super().__init__()
        tokens = (size // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(ResMLPBlock(dim, tokens), ResMLPBlock(dim, tokens))
        self.norm = Affine(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


# ---------------------------------------------------------------------- CaiT-like
class SelfAttentionBlock(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(heads_attention(q, k, v, self.heads))
        return x + self.mlp(self.norm2(x))


class ClassAttentionBlock(nn.Module):
    """CaiT's: only the class token queries; the patch tokens are keys and values."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.q, self.kv = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj, self.norm2 = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x, cls):
        u = self.norm1(torch.cat([cls, x], dim=1))
        k, v = self.kv(u).chunk(2, dim=-1)
        cls = cls + self.proj(heads_attention(self.q(u[:, :1]), k, v, self.heads))
        return cls + self.mlp(self.norm2(cls))


class CaiTLike(nn.Module):
    def __init__(self, size=64, patch=8, dim=24, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.Sequential(SelfAttentionBlock(dim), SelfAttentionBlock(dim))
        self.blocks_token_only = nn.ModuleList([ClassAttentionBlock(dim), ClassAttentionBlock(dim)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2) + self.pos)
        cls = self.cls.expand(x.shape[0], -1, -1)
        for block in self.blocks_token_only:
            cls = block(x, cls)
        return self.head(self.norm(torch.cat([cls, x], dim=1))[:, 0])


class PatchTransformer(nn.Module):
    """A ViT without class token or position embedding: any input size works, and a patch grid
    floors H / 16 and W / 16 (100 x 60 -> 6 x 3 tokens: not the input's aspect ratio)."""

    def __init__(self, dim=24, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.Sequential(SelfAttentionBlock(dim), SelfAttentionBlock(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from the identity (torch's defaults make
    inference BN a no-op, and a comparison through it less telling), and He-initialised
    convolutions (torch's default shrinks activations layer after layer until the biases dominate
    and every token looks alike: a near-constant map whose min-max scaling amplifies float noise)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()
