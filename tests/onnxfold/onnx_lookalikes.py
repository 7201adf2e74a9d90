"""Torch look-alikes of the architectures issue 15 is about, built here with no downloads.

- `levit`: timm's LeViT (Graham et al. 2021) as timm writes it: ConvNorm stem, LinearNorm
  (`bn(linear(x).flatten(0, 1)).reshape_as(x)`) in every attention and MLP, attention
  downsampling, NormLinear heads. `levit(LEVIT_128)` has LeViT-128's layer shapes and its 64 BNs.
- `repvgg`: RepVGG (Ding et al. 2021) in its train-time form, Conv3×3+BN + Conv1×1+BN + BN(x)
  summed; `repvgg(REPVGG_A0)` has repvgg_a0's 22 blocks, 44 Convs and 61 BNs.
- `reparameterize_model`: the deploy form, made by hand in torch (float64) the way timm's
  `reparameterize_model` and the RepVGG paper do it: an independent reference for bnfold's merge.
Weights are random; BN statistics come from a few training-mode batches (zoo.fill_bn_stats).
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import zoo  # noqa: E402
from lookalikes import LevitMlp as Mlp  # noqa: E402 — the torch look-alikes' blocks, shared
from lookalikes import LevitResidual as Residual  # noqa: E402
from lookalikes import LinearNorm  # noqa: E402

fill_bn_stats = zoo.fill_bn_stats


# -- LeViT -----------------------------------------------------------------------------------------


class NormLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn, self.linear = nn.BatchNorm1d(cin), nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(self.bn(x))


def conv_norm(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout))


class Attention(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, attn_ratio: float, tokens: int):
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, dim))
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.1)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)) * self.scale + self.bias
        x = (attn.softmax(-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class AttentionDownsample(nn.Module):
    def __init__(self, cin: int, cout: int, key_dim: int, heads: int, resolution: int):
        super().__init__()
        self.heads, self.key_dim, self.val_dim, self.resolution = heads, key_dim, 4 * key_dim, resolution
        self.out_resolution = (resolution - 1) // 2 + 1
        self.scale = key_dim ** -0.5
        self.kv = LinearNorm(cin, heads * (key_dim + self.val_dim))
        self.q = LinearNorm(cin, heads * key_dim)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, cout))
        self.bias = nn.Parameter(torch.randn(heads, self.out_resolution ** 2, resolution ** 2) * 0.1)

    def forward(self, x):
        b, n, c = x.shape
        k, v = self.kv(x).view(b, n, self.heads, -1).split([self.key_dim, self.val_dim], dim=3)
        sub = x.view(b, self.resolution, self.resolution, c)[:, ::2, ::2].reshape(b, -1, c)
        q = self.q(sub).view(b, -1, self.heads, self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k.permute(0, 2, 3, 1)) * self.scale + self.bias
        x = (attn.softmax(-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, -1, self.heads * self.val_dim)
        return self.proj(x)


@dataclass(frozen=True)
class LevitConfig:
    img_size: int
    dims: tuple[int, ...]
    heads: tuple[int, ...]
    depths: tuple[int, ...]
    key_dim: int = 16
    num_classes: int = 1000


LEVIT_128 = LevitConfig(224, (128, 256, 384), (4, 6, 8), (4, 4, 4))
LEVIT_TINY = LevitConfig(32, (16, 24), (2, 3), (1, 1), key_dim=4, num_classes=10)


class Levit(nn.Module):
    def __init__(self, cfg: LevitConfig):
        super().__init__()
        d = cfg.dims[0]
        self.stem = nn.Sequential(conv_norm(3, d // 8), nn.Hardswish(), conv_norm(d // 8, d // 4), nn.Hardswish(),
                                  conv_norm(d // 4, d // 2), nn.Hardswish(), conv_norm(d // 2, d))
        resolution = cfg.img_size // 16
        layers: list[nn.Module] = []
        for i, (dim, heads, depth) in enumerate(zip(cfg.dims, cfg.heads, cfg.depths)):
            if i > 0:
                layers.append(AttentionDownsample(cfg.dims[i - 1], dim, cfg.key_dim, cfg.dims[i - 1] // cfg.key_dim,
                                                  resolution))
                resolution = (resolution - 1) // 2 + 1
                layers.append(Residual(Mlp(dim, 2 * dim)))
            for _ in range(depth):
                layers.append(Residual(Attention(dim, cfg.key_dim, heads, 2, resolution ** 2)))
                layers.append(Residual(Mlp(dim, 2 * dim)))
        self.stages = nn.Sequential(*layers)
        self.head, self.head_dist = NormLinear(cfg.dims[-1], cfg.num_classes), NormLinear(cfg.dims[-1], cfg.num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x).flatten(2).transpose(1, 2)).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def levit(cfg: LevitConfig = LEVIT_TINY, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    shape = (3, cfg.img_size, cfg.img_size)
    return fill_bn_stats(Levit(cfg), shape, seed=seed), shape


# -- RepVGG ----------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride, groups)
        self.one = _conv_bn(cin, cout, 1, stride, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()
        self.deploy: nn.Conv2d | None = None

    def forward(self, x):
        if self.deploy is not None:
            return self.act(self.deploy(x))
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


@dataclass(frozen=True)
class RepVGGConfig:
    img_size: int
    widths: tuple[int, ...]  # stem, then one per stage
    layers: tuple[int, ...]
    groups: tuple[int, ...] = (1, 1, 1, 1)
    num_classes: int = 1000


# repvgg_a0: width multipliers (0.75, 0.75, 0.75, 2.5) on (64, 128, 256, 512), layers (2, 4, 14, 1)
REPVGG_A0 = RepVGGConfig(224, (48, 48, 96, 192, 1280), (2, 4, 14, 1))
REPVGG_TINY = RepVGGConfig(32, (8, 8, 16, 16), (2, 3, 1), groups=(1, 2, 1), num_classes=10)


class RepVGG(nn.Module):
    def __init__(self, cfg: RepVGGConfig):
        super().__init__()
        blocks = [RepVGGBlock(3, cfg.widths[0], 2)]
        cin = cfg.widths[0]
        for width, n, groups in zip(cfg.widths[1:], cfg.layers, cfg.groups):
            for j in range(n):
                blocks.append(RepVGGBlock(cin, width, 2 if j == 0 else 1, groups if j > 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, cfg.num_classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def repvgg(cfg: RepVGGConfig = REPVGG_TINY, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    shape = (3, cfg.img_size, cfg.img_size)
    return fill_bn_stats(RepVGG(cfg), shape, seed=seed), shape


@torch.no_grad()
def _fold(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var.double() + bn.eps).sqrt()
    scale = bn.weight.double() / std
    return kernel.double() * scale.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * scale


@torch.no_grad()
def reparameterize_model(model: nn.Module) -> nn.Module:
    """The deploy form: each block one 3×3 Conv with K₃·s₃ + pad(K₁·s₁) + I·s_id and b₃ + b₁ + b_id."""
    deploy = copy.deepcopy(model)
    for block in deploy.modules():
        if not isinstance(block, RepVGGBlock) or block.deploy is not None:
            continue
        conv = block.dense[0]
        kernel, bias = _fold(conv.weight, block.dense[1])
        k1, b1 = _fold(block.one[0].weight, block.one[1])
        kernel, bias = kernel + F.pad(k1, [1, 1, 1, 1]), bias + b1
        if block.identity is not None:
            per_group = conv.in_channels // conv.groups
            eye = torch.zeros(conv.out_channels, per_group, 3, 3, dtype=torch.float64)
            channels = torch.arange(conv.out_channels)
            eye[channels, channels % per_group, 1, 1] = 1.0
            k_id, b_id = _fold(eye, block.identity)
            kernel, bias = kernel + k_id, bias + b_id
        block.deploy = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups)
        block.deploy.weight.copy_(kernel.float())
        block.deploy.bias.copy_(bias.float())
        del block.dense, block.one, block.identity
        block.identity = None
    return deploy


# -- export ----------------------------------------------------------------------------------------


def export_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TorchScript exporter, BN kept (eval, no constant folding), dynamic batch."""
    return zoo.export_onnx(model, example, path)


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """torch.export-based exporter with optimize=False: parameters computed from constants at run time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, optimize=False, verbose=False)
    program.save(str(path))
    return path
