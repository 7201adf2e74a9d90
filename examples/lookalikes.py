"""Look-alikes of the model families people deploy, for tests: YOLO (ultralytics v8) and timm's
RepVGG, DLA, HRNet and LeViT, built here with random weights and no downloads.

ultralytics and timm both require torchvision, whose wheels pin a newer torch than ours, so the
blocks are written out following their sources: the same module names and nesting (checkpoint
keys look like theirs), the same forward code where it matters to a BN folder — a shared SiLU
instance, split + concat, list slots assigned in place, a Detect head that caches anchors on
itself behind a shape check, timm's BatchNormAct2d (a BatchNorm2d subclass that runs its
activation inside forward), "same" padding computed from the input size, RepVGG's train-time
branches with an identity BN, DLA's residual root added in place, HRNet's fuse layers, and
LeViT's Linear → BatchNorm1d on flattened tokens with an attention-bias cache. Forwards are
written so that every model also scripts (ultralytics itself only traces).

Widths are test-sized; `fill` gives every BN real running statistics (examples/zoo.py). No
`from __future__ import annotations`: TorchScript reads these annotations as types.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo import fill_bn_stats

# -- ultralytics (YOLOv8) ----------------------------------------------------------------------


def autopad(k: int, p: Optional[int] = None, d: int = 1) -> int:
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """ultralytics.nn.modules.conv.Conv: Conv2d(bias=False) → BN → SiLU, one SiLU shared by all."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: Optional[int] = None, g: int = 1,
                 d: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: Tuple[int, int] = (3, 3),
                 e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions: chunk in two, grow a list, concat."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: List[torch.Tensor]):
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: a fixed 1×1 conv (no BN) over a softmax."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: List[torch.Tensor], strides: List[float], offset: float = 0.5):
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        h, w = feats[i].shape[2], feats[i].shape[3]
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


class Detect(nn.Module):
    """YOLOv8 head: per level a box and a class branch written back into the input list; anchors
    recomputed and cached on the module when the input shape changes; the box scale in place."""

    def __init__(self, nc: int = 4, ch: Tuple[int, ...] = (), strides: Tuple[float, ...] = ()):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), 16
        self.no = nc + self.reg_max * 4
        self.stride: List[float] = list(strides)
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)
        self.dynamic = False
        self.shape: List[int] = []
        self.anchors = torch.empty(0)
        self.strides = torch.empty(0)

    def forward(self, x: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        i = 0
        for box_branch, cls_branch in zip(self.cv2, self.cv3):
            x[i] = torch.cat((box_branch(x[i]), cls_branch(x[i])), 1)
            i += 1
        shape = list(x[0].shape)
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            anchors, strides = make_anchors(x, self.stride, 0.5)
            self.anchors, self.strides = anchors.transpose(0, 1), strides.transpose(0, 1)
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        anchor_points = self.anchors.unsqueeze(0)
        x1y1, x2y2 = anchor_points - lt, anchor_points + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1)
        dbox.mul_(self.strides)
        return torch.cat((dbox, cls.sigmoid()), 1), x


class DetectionModel(nn.Module):
    """yolov8n.yaml at width `w`: backbone, PAN neck and Detect, as `model.<i>` like ultralytics.
    ultralytics runs the layers from their `f` indices; this forward wires them explicitly so
    that it scripts."""

    def __init__(self, w: int = 8, nc: int = 4):
        super().__init__()
        layers = [
            Conv(3, w, 3, 2), Conv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1, True),            # 0-2   P2/4
            Conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 1, True),                            # 3-4   P3/8
            Conv(4 * w, 8 * w, 3, 2), C3(8 * w, 8 * w, 1, True),                             # 5-6   P4/16
            SPPF(8 * w, 8 * w, 5),                                                           # 7
            nn.Upsample(scale_factor=2.0, mode="nearest"), Concat(1), C2f(12 * w, 4 * w, 1),  # 8-10  P3 out
            Conv(4 * w, 4 * w, 3, 2), Concat(1), C2f(12 * w, 8 * w, 1),                       # 11-13 P4 out
            Detect(nc, (4 * w, 8 * w), (8.0, 16.0)),                                         # 14
        ]
        for i, m in enumerate(layers):
            m.i = i
        self.model = nn.Sequential(*layers)
        self.names = {k: f"class{k}" for k in range(nc)}
        self.args = {"imgsz": 64}
        self.yaml = {"nc": nc, "width": w}

    def forward(self, x):
        m = self.model
        p3 = m[4](m[3](m[2](m[1](m[0](x)))))
        p5 = m[7](m[6](m[5](p3)))
        n3 = m[10](m[9]([m[8](p5), p3]))
        n4 = m[13](m[12]([m[11](n3), p5]))
        return m[14]([n3, n4])


def yolo(w: int = 8, nc: int = 4) -> nn.Module:
    return DetectionModel(w, nc)


# -- timm building blocks ----------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: a BatchNorm2d whose forward also runs drop + act."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True,
                 act_layer=nn.ReLU):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        return self.act(x)


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size: List[int], stride: List[int], dilation: List[int]):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TensorFlow "same" padding from the input's size, which
    torch.fx cannot trace (it unpacks x.size())."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)

    def forward(self, x):
        x = pad_same(x, list(self.kernel_size), list(self.stride), list(self.dilation))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvNormAct(nn.Module):
    """timm.layers.conv_bn_act.ConvNormAct: conv → BatchNormAct2d (act inside the BN)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, apply_act: bool = True,
                 same: bool = False):
        super().__init__()
        self.conv = Conv2dSame(cin, cout, k, stride, groups) if same else \
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act)

    def forward(self, x):
        return self.bn(self.conv(x))


# -- timm RepVGG (byobnet) ---------------------------------------------------------------------


class RepVggBlock(nn.Module):
    """Train-time RepVGG: kxk and 1×1 conv branches plus an identity BN on the input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        use_ident = cin == cout and stride == 1
        self.identity = BatchNormAct2d(cout, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, groups, apply_act=False)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, groups, apply_act=False)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv: Optional[nn.Conv2d] = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x = x + identity
        return self.act(self.attn(x))


class ClassifierHead(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.global_pool(x)))


class RepVgg(nn.Module):
    """timm ByobNet as repvgg_a0 at test width: a "same"-padded stem, then RepVGG stages."""

    def __init__(self, w: int = 8, depths: Tuple[int, ...] = (1, 2, 2), num_classes: int = 10):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 32, 32), "num_classes": num_classes}
        self.stem = ConvNormAct(3, w, 3, 2, same=True)
        stages, cin = [], w
        for i, depth in enumerate(depths):
            cout = w * 2 ** i
            stages.append(nn.Sequential(*(RepVggBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1)
                                          for j in range(depth))))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.final_conv = nn.Identity()
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x):
        return self.head(self.final_conv(self.stages(self.stem(x))))


def repvgg(w: int = 8, num_classes: int = 10) -> nn.Module:
    return RepVgg(w, num_classes=num_classes)


# -- timm DLA and HRNet: multi-branch -----------------------------------------------------------


class DlaBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class DlaRoot(nn.Module):
    """Concatenate the children, 1×1 conv + BN, add the first child in place."""

    def __init__(self, cin: int, cout: int, residual: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, x: List[torch.Tensor]):
        children = x
        x = self.bn(self.conv(torch.cat(x, 1)))
        if self.residual:
            x += children[0]
        return self.relu(x)


class DlaTree(nn.Module):
    """A level-1 DLA tree: two blocks, a downsampled, projected bottom, and a root."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.tree1 = DlaBasic(cin, cout, stride)
        self.tree2 = DlaBasic(cout, cout, 1)
        self.root = DlaRoot(2 * cout + cin, cout)
        self.downsample = nn.MaxPool2d(stride, stride=stride)
        self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        bottom = self.downsample(x)
        shortcut = self.project(bottom)
        x1 = self.tree1(x, shortcut)
        x2 = self.tree2(x1)
        return self.root([x2, x1, bottom])


class HrFuse(nn.Module):
    """HRNet's fuse layer for two branches: up (1×1 conv + BN, nearest ×2) and down (3×3/2 + BN)."""

    def __init__(self, c_hi: int, c_lo: int):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(c_lo, c_hi, 1, bias=False), nn.BatchNorm2d(c_hi),
                                nn.Upsample(scale_factor=2.0, mode="nearest"))
        self.down = nn.Sequential(nn.Conv2d(c_hi, c_lo, 3, 2, 1, bias=False), nn.BatchNorm2d(c_lo))
        self.relu = nn.ReLU()

    def forward(self, hi, lo) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.relu(hi + self.up(lo)), self.relu(self.down(hi) + lo)


class DlaHrNet(nn.Module):
    """A DLA level-1 tree between a "same"-padded stem and an HRNet two-branch fuse stage."""

    def __init__(self, w: int = 8, num_classes: int = 10):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 32, 32), "num_classes": num_classes}
        self.base_layer = ConvNormAct(3, w, 3, 1, same=True)
        self.level1 = DlaTree(w, 2 * w, 2)
        self.branch_lo = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * w),
                                       nn.ReLU(inplace=True))
        self.fuse = HrFuse(2 * w, 4 * w)
        self.head = ClassifierHead(6 * w, num_classes)

    def forward(self, x):
        hi = self.level1(self.base_layer(x))
        hi, lo = self.fuse(hi, self.branch_lo(hi))
        return self.head(torch.cat((F.avg_pool2d(hi, 2), lo), 1))


def dla_hrnet(w: int = 8, num_classes: int = 10) -> nn.Module:
    return DlaHrNet(w, num_classes)


# -- timm LeViT --------------------------------------------------------------------------------


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0):
        super().__init__()
        self.linear = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """Linear → BatchNorm1d over the tokens of [B, N, C]: flatten(0, 1), normalize, reshape_as."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """The head: BatchNorm1d on pooled features, then Linear (BN before the layer: kept)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(0.0)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class LevitAttention(nn.Module):
    attention_bias_cache: Dict[str, torch.Tensor]

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int):
        super().__init__()
        self.num_heads, self.key_dim, self.scale = num_heads, key_dim, key_dim ** -0.5
        self.val_dim = 2 * key_dim
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(num_heads * self.val_dim, dim))
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        self.attention_biases = nn.Parameter(torch.randn(num_heads, resolution ** 2) * 0.1)
        self.register_buffer("attention_bias_idxs", rel_pos[0] * resolution + rel_pos[1], persistent=False)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * self.scale + self.get_attention_biases(x.device)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_dim * self.num_heads)
        return self.proj(x)


class LevitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


class LevitResidual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class Levit(nn.Module):
    """LeViT at test size: a ConvNorm stem (÷16), attention + MLP blocks on tokens, a distilled head."""

    def __init__(self, img_size: int = 32, dim: int = 16, key_dim: int = 4, num_heads: int = 2, depth: int = 2,
                 num_classes: int = 10):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, img_size, img_size), "num_classes": num_classes}
        self.stem = nn.Sequential(ConvNorm(3, dim // 4, 3, 2, 1), nn.Hardswish(), ConvNorm(dim // 4, dim // 2, 3, 2, 1),
                                  nn.Hardswish(), ConvNorm(dim // 2, dim, 3, 2, 1), nn.Hardswish(),
                                  ConvNorm(dim, dim, 3, 2, 1))
        resolution = img_size // 16
        blocks = []
        for _ in range(depth):
            blocks += [LevitResidual(LevitAttention(dim, key_dim, num_heads, resolution)),
                       LevitResidual(LevitMlp(dim, 2 * dim))]
        self.blocks = nn.Sequential(*blocks)
        self.head = NormLinear(dim, num_classes)
        self.head_dist = NormLinear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.blocks(x).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def levit(img_size: int = 32, num_classes: int = 10) -> nn.Module:
    return Levit(img_size, num_classes=num_classes)


# name → (factory, input shape without batch)
FAMILIES = {
    "yolo": (yolo, (3, 64, 64)),
    "repvgg": (repvgg, (3, 32, 32)),
    "dla_hrnet": (dla_hrnet, (3, 32, 32)),
    "levit": (levit, (3, 32, 32)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A family member with real BN statistics, in eval mode, and its input shape."""
    factory, shape = FAMILIES[name]
    torch.manual_seed(seed)
    model = factory()
    return fill(model, shape, seed), shape


def fill(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    model = fill_bn_stats(model, shape, steps=2, batch=4, seed=seed)
    for m in model.modules():  # a cache filled while filling statistics is not part of the model
        if isinstance(m, LevitAttention):
            m.attention_bias_cache = {}
    return model
