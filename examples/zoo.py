"""Standard networks for tests and benchmarks, built here with no downloads.

torchvision cannot be installed beside our pinned torch, so resnet18/50, mobilenet_v2 and
efficientnet_b0 are written out following torchvision's architectures (same layer shapes,
Conv-BN ordering, depthwise and squeeze-excitation blocks); a `width` knob shrinks them for
tests. Weights are random; `fill_bn_stats` runs a few training-mode batches so the BN
running statistics are real, and randomizes γ/β so every BN does something.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], width: int = 64, num_classes: int = 1000, bn: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        cin, stages = width, []
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(width: int = 64, num_classes: int = 1000) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], width, num_classes)


def resnet50(width: int = 64, num_classes: int = 1000) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], width, num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000) -> nn.Module:
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    c = lambda v: max(8, int(v * width_mult + 4) // 8 * 8)  # noqa: E731  (torchvision's _make_divisible)
    cin, last = c(32), c(1280) if width_mult > 1 else 1280
    layers = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
    for t, ch, n, s in setting:
        for i in range(n):
            layers.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
            cin = c(ch)
    layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * s


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, cin // 4)), conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def efficientnet_b0(width_mult: float = 1.0, num_classes: int = 1000) -> nn.Module:
    setting = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
               (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    c = lambda v: max(8, int(v * width_mult + 4) // 8 * 8)  # noqa: E731
    cin = c(32)
    layers = [conv_bn(3, cin, 3, 2, act=nn.SiLU)]
    for e, k, s, ch, n in setting:
        for i in range(n):
            layers.append(MBConv(cin, c(ch), k, s if i == 0 else 1, e))
            cin = c(ch)
    last = 4 * cin
    layers.append(conv_bn(cin, last, 1, act=nn.SiLU))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))


def dcgan_generator(nz: int = 64, ngf: int = 32, channels: int = 3) -> nn.Module:
    """DCGAN generator: ConvTranspose2d → BN → ReLU stacks, input [N, nz, 1, 1] → [N, 3, 32, 32]."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False, groups=2), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh(),
    )


def mlp(features: int = 64, hidden: int = 128, layers: int = 2, num_classes: int = 10) -> nn.Module:
    blocks, cin = [], features
    for _ in range(layers):
        blocks += [nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        cin = hidden
    return nn.Sequential(*blocks, nn.Linear(cin, num_classes))


def mlp_6x1024() -> nn.Module:
    return mlp(1024, 1024, 6, 1000)


# name → (builder at full size, builder at test size, input shape without batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "resnet18": (resnet18, lambda: resnet18(width=8, num_classes=10), (3, 224, 224), (3, 64, 64)),
    "resnet50": (resnet50, lambda: resnet50(width=8, num_classes=10), (3, 224, 224), (3, 64, 64)),
    "mobilenet_v2": (mobilenet_v2, lambda: mobilenet_v2(0.25, 10), (3, 224, 224), (3, 64, 64)),
    "efficientnet_b0": (efficientnet_b0, lambda: efficientnet_b0(0.25, 10), (3, 224, 224), (3, 64, 64)),
    "dcgan": (dcgan_generator, lambda: dcgan_generator(16, 8), (64, 1, 1), (16, 1, 1)),
    "mlp": (mlp, lambda: mlp(16, 32, 2, 10), (64,), (16,)),
    "mlp_6x1024": (mlp_6x1024, lambda: mlp(64, 64, 6, 10), (1024,), (64,)),
}


def build(name: str, small: bool = True, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A model with filled BN statistics, in eval mode, and its input shape (no batch dim)."""
    full, test, full_shape, test_shape = MODELS[name]
    torch.manual_seed(seed)
    model, shape = (test(), test_shape) if small else (full(), full_shape)
    return fill_bn_stats(model, shape, seed=seed), shape


@torch.no_grad()
def fill_bn_stats(model: nn.Module, input_shape: tuple[int, ...], steps: int = 3, batch: int = 8,
                  seed: int = 0) -> nn.Module:
    """Training-mode forward passes on random data (real running statistics), random γ/β."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the passes
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    model.train()
    for _ in range(steps):
        model(torch.randn(batch, *input_shape, generator=g) * 1.5 + 0.3)
    return model.eval()


def no_bn_twin(model: nn.Module) -> nn.Module:
    """The same network with every BN replaced by Identity: the limit of what folding can reach."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return twin


def export_onnx(model: nn.Module, example: torch.Tensor, path, opset: int = 17):
    """Export with BN nodes kept (eval mode, no constant folding), dynamic batch, input 'input'."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset)
    return path
