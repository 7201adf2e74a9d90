"""Look-alikes of the ways deployed models spell "Conv then BatchNorm" other than nn.Conv2d →
nn.BatchNorm2d, for tests (tests/torchfold/test_spellings.py): random weights, test widths, real
BN statistics, no downloads.

- `frozen_bn`: a resnet18 built with torchvision's `FrozenBatchNorm2d` as `norm_layer` (BN as
  buffers and a hand-written per-channel affine: the backbone of every torchvision detector).
- `frozen_bn_d2`: detectron2's ResNet pieces: its `Conv2d` (an nn.Conv2d that runs its `norm`
  inside forward, behind a `numel()` check torch.fx cannot trace) with detectron2's
  `FrozenBatchNorm2d`: F.batch_norm when no gradient is needed (eager inference), the affine with
  `.to(dtype)` casts otherwise (what torch.jit.trace and torch.export record: the conv's output
  requires grad while they trace).
- `conv3d_simple`: torchvision's video r3d with `Conv3DSimple`, an nn.Conv3d subclass that only
  overrides __init__.
- `same_pad`: Hugging Face's EfficientNet: Conv2d(padding="same"/"valid") everywhere, and an
  embeddings forward that checks the input's channel count (as HF's ResNet embeddings do), which
  torch.fx cannot trace.
- `batchnorm_act`: timm's ReXNet: ConvNormAct blocks whose BN is timm's BatchNormAct2d (normalize,
  drop, act in one module; examples/lookalikes.py), SE with its own BN.
- `qat_intrinsic` / `qat_prepared`: a net fused with torch.ao's `fuse_modules_qat` (ConvBn2d,
  ConvBnReLU2d containers), and the same after `prepare_qat` (fake-quantized QAT modules) with
  the float head left unprepared (qconfig None), observers and BN statistics frozen as QAT
  evaluation does.
- `hrnet`: timm's HRNet at test width: parallel branches at three resolutions fused by upsampling
  and strided convs and summed, transitions whose Identity entries are never called.
- `yolo`: ultralytics YOLOv8 (examples/lookalikes.py), whose Detect head torch.fx cannot trace.

Classes are written following their sources (same module names and forward code where it
matters to a BN folder). No `from __future__ import annotations`: TorchScript reads annotations.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import lookalikes
from zoo import fill_bn_stats

# -- torchvision FrozenBatchNorm2d and a resnet18 built with it ----------------------------------


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: batch statistics and affine parameters fixed, as
    buffers; the forward is the per-channel affine written out."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # move reshapes to the beginning to make it fuser-friendly (torchvision's comment)
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class TvBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, with its norm_layer argument."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TvResNet(nn.Module):
    """torchvision.models.resnet.ResNet (BasicBlock) at width `w`, with `norm_layer`."""

    def __init__(self, layers: Tuple[int, ...] = (2, 2, 2, 2), w: int = 4, num_classes: int = 10,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self._norm_layer = norm_layer
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(w, layers[0])
        self.layer2 = self._make_layer(2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), norm_layer(planes))
        layers = [TvBasicBlock(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes
        layers += [TvBasicBlock(self.inplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def frozen_bn(w: int = 4, seed: int = 0) -> nn.Module:
    """resnet18(norm_layer=FrozenBatchNorm2d), loaded from a trained BatchNorm2d twin's state_dict
    as torchvision detectors load ImageNet weights."""
    torch.manual_seed(seed)
    trained = fill_bn_stats(TvResNet(w=w), (3, 32, 32), steps=2, batch=4, seed=seed)
    frozen = TvResNet(w=w, norm_layer=FrozenBatchNorm2d)
    frozen.load_state_dict(trained.state_dict(), strict=True)
    return frozen.eval()


# -- detectron2: Conv2d with its norm inside, FrozenBatchNorm2d ----------------------------------


class D2FrozenBatchNorm2d(nn.Module):
    """detectron2.layers.FrozenBatchNorm2d: F.batch_norm when no gradient is needed (inference),
    the affine with dtype casts otherwise."""

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)
        self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if x.requires_grad:
            # When gradients are needed, F.batch_norm will use extra memory
            # because its backward op computes gradients for weight/bias as well.
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            scale = scale.reshape(1, -1, 1, 1)
            bias = bias.reshape(1, -1, 1, 1)
            out_dtype = x.dtype  # may be half
            return x * scale.to(out_dtype) + bias.to(out_dtype)
        else:
            # When gradients are not needed, F.batch_norm is a single fused op
            # and provide more optimization opportunities.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                                eps=self.eps)

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Every BatchNorm2d of `module` replaced by a frozen one with its statistics."""
        res = module
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            res = cls(module.num_features)
            if module.affine:
                res.weight.data = module.weight.data.clone().detach()
                res.bias.data = module.bias.data.clone().detach()
            res.running_mean.data = module.running_mean.data
            res.running_var.data = module.running_var.data
            res.eps = module.eps
        else:
            for name, child in module.named_children():
                new_child = cls.convert_frozen_batchnorm(child)
                if new_child is not child:
                    res.add_module(name, new_child)
        return res


class D2Conv2d(nn.Conv2d):
    """detectron2.layers.Conv2d: an nn.Conv2d that also runs its `norm` and `activation`."""

    def __init__(self, *args, **kwargs):
        norm = kwargs.pop("norm", None)
        activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        if not torch.jit.is_scripting():
            if x.numel() == 0 and self.training:
                # empty inputs (pytorch issue 12013 in detectron2's comment)
                assert not isinstance(self.norm, torch.nn.SyncBatchNorm), "SyncBatchNorm does not support empty inputs!"
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class D2BasicStem(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 8):
        super().__init__()
        self.conv1 = D2Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                              norm=nn.BatchNorm2d(out_channels))

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu_(x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class D2BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = D2Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                     norm=nn.BatchNorm2d(out_channels))
        self.conv1 = D2Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False,
                              norm=nn.BatchNorm2d(out_channels))
        self.conv2 = D2Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                              norm=nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


class D2ResNet(nn.Module):
    """detectron2's ResNet (BasicBlock, res2-res4) at width `w`; the last feature map pooled into
    a linear head so the output is one tensor."""

    def __init__(self, w: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = D2BasicStem(3, w)
        self.res2 = D2BasicBlock(w, w)
        self.res3 = D2BasicBlock(w, 2 * w, 2)
        self.res4 = D2BasicBlock(2 * w, 4 * w, 2)
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.res4(self.res3(self.res2(self.stem(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def frozen_bn_d2(w: int = 4, seed: int = 0) -> nn.Module:
    """Trained with BatchNorm2d, then frozen with detectron2's convert_frozen_batchnorm."""
    torch.manual_seed(seed)
    trained = fill_bn_stats(D2ResNet(w), (3, 32, 32), steps=2, batch=4, seed=seed)
    return D2FrozenBatchNorm2d.convert_frozen_batchnorm(trained).eval()


# -- torchvision video r3d: Conv3DSimple ----------------------------------------------------------


class Conv3DSimple(nn.Conv3d):
    """torchvision.models.video.resnet.Conv3DSimple: only __init__ is its own."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: Optional[int] = None, stride: int = 1,
                 padding: int = 1):
        super().__init__(in_channels=in_planes, out_channels=out_planes, kernel_size=(3, 3, 3), stride=stride,
                         padding=padding, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> Tuple[int, int, int]:
        return stride, stride, stride


class VideoBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        super().__init__()
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.conv1(x)
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        out = self.relu(out)
        return out


class BasicStem(nn.Sequential):
    """The r3d stem: a plain nn.Conv3d (3×7×7, stride 1×2×2) → BatchNorm3d → ReLU."""

    def __init__(self, w: int = 4):
        super().__init__(nn.Conv3d(3, w, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                         nn.BatchNorm3d(w), nn.ReLU(inplace=True))


class VideoResNet(nn.Module):
    """torchvision.models.video.resnet.VideoResNet as r3d_18 (Conv3DSimple in every block), one
    block per stage at width `w`."""

    def __init__(self, layers: Tuple[int, ...] = (1, 1, 1, 1), w: int = 4, num_classes: int = 10):
        super().__init__()
        self.inplanes = w
        self.stem = BasicStem(w)
        self.layer1 = self._make_layer(Conv3DSimple, w, layers[0], stride=1)
        self.layer2 = self._make_layer(Conv3DSimple, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(Conv3DSimple, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(Conv3DSimple, 8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(8 * w, num_classes)

    def _make_layer(self, conv_builder, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            ds_stride = conv_builder.get_downsample_stride(stride)
            downsample = nn.Sequential(nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=ds_stride, bias=False),
                                       nn.BatchNorm3d(planes))
        layers = [VideoBasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes
        layers += [VideoBasicBlock(self.inplanes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


def conv3d_simple(w: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fill_bn_stats(VideoResNet(w=w), (3, 4, 16, 16), steps=2, batch=4, seed=seed)


# -- Hugging Face EfficientNet: padding="same" in a forward fx cannot trace ----------------------

BN_EPS, BN_MOMENTUM = 1e-3, 0.99  # HF EfficientNetConfig's batch_norm_eps, batch_norm_momentum


def correct_pad(kernel_size: int, adjust: bool = True) -> Tuple[int, int, int, int]:
    correct = (kernel_size // 2, kernel_size // 2)
    if adjust:
        return (correct[1] - 1, correct[1], correct[0] - 1, correct[0])
    return (correct[1], correct[1], correct[0], correct[0])


class EfficientNetEmbeddings(nn.Module):
    """Zero pad (0, 1, 0, 1), a "valid" stride-2 conv, BN, SiLU; the channel check of HF's
    ResNet embeddings makes this forward (and every forward that calls it) untraceable by fx."""

    def __init__(self, num_channels: int, out_dim: int):
        super().__init__()
        self.num_channels = num_channels
        self.padding = nn.ZeroPad2d(padding=(0, 1, 0, 1))
        self.convolution = nn.Conv2d(num_channels, out_dim, kernel_size=3, stride=2, padding="valid", bias=False)
        self.batchnorm = nn.BatchNorm2d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.activation = nn.SiLU()

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set in "
                             "the configuration.")
        features = self.padding(pixel_values)
        features = self.convolution(features)
        features = self.batchnorm(features)
        return self.activation(features)


class EfficientNetDepthwiseConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, depth_multiplier: int = 1, kernel_size: int = 3, stride: int = 1,
                 padding="valid", dilation: int = 1, bias: bool = True, padding_mode: str = "zeros"):
        out_channels = in_channels * depth_multiplier
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, groups=in_channels, bias=bias, padding_mode=padding_mode)


class EfficientNetExpansionLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.expand_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, padding="same", bias=False)
        self.expand_bn = nn.BatchNorm2d(num_features=out_dim, eps=BN_EPS)
        self.expand_act = nn.SiLU()

    def forward(self, hidden_states):
        return self.expand_act(self.expand_bn(self.expand_conv(hidden_states)))


class EfficientNetDepthwiseLayer(nn.Module):
    def __init__(self, in_dim: int, stride: int, kernel_size: int, adjust_padding: bool = True):
        super().__init__()
        self.stride = stride
        conv_pad = "valid" if self.stride == 2 else "same"
        padding = correct_pad(kernel_size, adjust=adjust_padding)
        self.depthwise_conv_pad = nn.ZeroPad2d(padding=padding)
        self.depthwise_conv = EfficientNetDepthwiseConv2d(in_dim, kernel_size=kernel_size, stride=stride,
                                                          padding=conv_pad, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(num_features=in_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.depthwise_act = nn.SiLU()

    def forward(self, hidden_states):
        if self.stride == 2:
            hidden_states = self.depthwise_conv_pad(hidden_states)
        hidden_states = self.depthwise_conv(hidden_states)
        hidden_states = self.depthwise_norm(hidden_states)
        return self.depthwise_act(hidden_states)


class EfficientNetSqueezeExciteLayer(nn.Module):
    def __init__(self, in_dim: int, expand_dim: int, expand: bool = False):
        super().__init__()
        self.dim = expand_dim if expand else in_dim
        self.dim_se = max(1, int(in_dim * 0.25))
        self.squeeze = nn.AdaptiveAvgPool2d(output_size=1)
        self.reduce = nn.Conv2d(self.dim, self.dim_se, kernel_size=1, padding="same")
        self.expand = nn.Conv2d(self.dim_se, self.dim, kernel_size=1, padding="same")
        self.act_reduce = nn.SiLU()
        self.act_expand = nn.Sigmoid()

    def forward(self, hidden_states):
        inputs = hidden_states
        hidden_states = self.act_reduce(self.reduce(self.squeeze(hidden_states)))
        hidden_states = self.act_expand(self.expand(hidden_states))
        return torch.mul(inputs, hidden_states)


class EfficientNetFinalBlockLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int, id_skip: bool):
        super().__init__()
        self.apply_dropout = stride == 1 and not id_skip
        self.project_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, padding="same", bias=False)
        self.project_bn = nn.BatchNorm2d(num_features=out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dropout = nn.Dropout(p=0.2)

    def forward(self, embeddings, hidden_states):
        hidden_states = self.project_bn(self.project_conv(hidden_states))
        if self.apply_dropout:
            hidden_states = self.dropout(hidden_states)
            hidden_states = hidden_states + embeddings
        return hidden_states


class EfficientNetBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int, expand_ratio: int, kernel_size: int, id_skip: bool,
                 adjust_padding: bool = True):
        super().__init__()
        self.expand_ratio = expand_ratio
        self.expand = self.expand_ratio != 1
        expand_in_dim = in_dim * expand_ratio
        if self.expand:
            self.expansion = EfficientNetExpansionLayer(in_dim, expand_in_dim)
        dim = expand_in_dim if self.expand else in_dim
        self.depthwise_conv = EfficientNetDepthwiseLayer(dim, stride, kernel_size, adjust_padding)
        self.squeeze_excite = EfficientNetSqueezeExciteLayer(in_dim, expand_in_dim, expand=self.expand)
        self.projection = EfficientNetFinalBlockLayer(dim, out_dim, stride, id_skip)

    def forward(self, hidden_states):
        embeddings = hidden_states
        if self.expand_ratio != 1:
            hidden_states = self.expansion(hidden_states)
        hidden_states = self.depthwise_conv(hidden_states)
        hidden_states = self.squeeze_excite(hidden_states)
        return self.projection(embeddings, hidden_states)


class EfficientNetForImageClassification(nn.Module):
    """HF's EfficientNet at test width: embeddings, MBConv blocks (stage = (expand, kernel, stride,
    out, repeats); the first block of a stage has id_skip, the others a residual), top conv, a
    global average pool (HF's AvgPool2d(hidden_dim, ceil_mode=True) does the same here) and a
    classifier."""

    STAGES = ((1, 3, 1, 4, 1), (4, 3, 2, 8, 2), (4, 5, 2, 12, 1))

    def __init__(self, w: int = 8, num_classes: int = 10):
        super().__init__()
        self.embeddings = EfficientNetEmbeddings(3, w)
        blocks, cin = [], w
        for expand, k, stride, cout, repeats in self.STAGES:
            for j in range(repeats):
                blocks.append(EfficientNetBlock(cin, cout, stride if j == 0 else 1, expand, k, id_skip=j == 0))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.top_conv = nn.Conv2d(cin, 4 * cin, kernel_size=1, padding="same", bias=False)
        self.top_bn = nn.BatchNorm2d(4 * cin, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.top_act = nn.SiLU()
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=0.2)
        self.classifier = nn.Linear(4 * cin, num_classes)

    def forward(self, pixel_values):
        hidden_states = self.embeddings(pixel_values)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.top_act(self.top_bn(self.top_conv(hidden_states)))
        pooled_output = self.pooler(hidden_states)
        pooled_output = pooled_output.reshape(pooled_output.shape[:2])
        return self.classifier(self.dropout(pooled_output))


def same_pad(w: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fill_bn_stats(EfficientNetForImageClassification(w), (3, 32, 32), steps=2, batch=4, seed=seed)


# -- timm ReXNet: BatchNormAct2d ----------------------------------------------------------------


class ConvNormAct(nn.Module):
    """timm's ConvNormAct with an activation choice: conv → BatchNormAct2d (act inside the BN)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 apply_act: bool = True, act_layer=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = lookalikes.BatchNormAct2d(cout, apply_act=apply_act, act_layer=act_layer)

    def forward(self, x):
        return self.bn(self.conv(x))


class SEWithNorm(nn.Module):
    """timm.models.rexnet.SEWithNorm: a 1×1 conv with bias, a plain BatchNorm2d, ReLU, 1×1, gate."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(rd_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class LinearBottleneck(nn.Module):
    """timm.models.rexnet.LinearBottleneck: expand (SiLU), depthwise (no act), SE, ReLU6,
    project; the shortcut is added to the first in_chs channels only."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, exp_ratio: float = 1.0, se_ratio: float = 0.0):
        super().__init__()
        self.use_shortcut = stride == 1 and in_chs <= out_chs
        self.in_channels = in_chs
        self.out_channels = out_chs
        if exp_ratio != 1.0:
            dw_chs = int(round(in_chs * exp_ratio))
            self.conv_exp = ConvNormAct(in_chs, dw_chs, act_layer=nn.SiLU)
        else:
            dw_chs = in_chs
            self.conv_exp = None
        self.conv_dw = ConvNormAct(dw_chs, dw_chs, kernel_size=3, stride=stride, groups=dw_chs, apply_act=False)
        self.se = SEWithNorm(dw_chs, int(dw_chs * se_ratio)) if se_ratio > 0 else None
        self.act_dw = nn.ReLU6()
        self.conv_pwl = ConvNormAct(dw_chs, out_chs, 1, apply_act=False)
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.act_dw(x)
        x = self.conv_pwl(x)
        if self.use_shortcut:
            x = torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)
        return x


class RexNet(nn.Module):
    """timm's ReXNet at test width: stem, LinearBottlenecks whose width grows by 2 a block,
    a 1×1 ConvNormAct, a classifier head."""

    BLOCKS = ((8, 10, 1, 1.0, 0.0), (10, 12, 2, 6.0, 0.0), (12, 14, 1, 6.0, 1 / 12), (14, 16, 2, 6.0, 1 / 12))

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2, act_layer=nn.SiLU)
        self.features = nn.Sequential(*(LinearBottleneck(i, o, s, e, se) for i, o, s, e, se in self.BLOCKS),
                                      ConvNormAct(16, 32, 1, act_layer=nn.SiLU))
        self.head = lookalikes.ClassifierHead(32, num_classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def batchnorm_act(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fill_bn_stats(RexNet(), (3, 32, 32), steps=2, batch=8, seed=seed)


# -- torch.ao: fused intrinsic containers, and after prepare_qat ---------------------------------


class QatNet(nn.Module):
    """The quantized backbone between QuantStub and DeQuantStub: a Conv-BN-ReLU stem, a residual
    block of Conv-BN-ReLU and Conv-BN; then a head kept in float (Conv-BN-ReLU, pool, Linear), as
    QAT models often keep their head. Written to be fused by `fuse_modules_qat`."""

    FUSE = [["stem", "stem_bn", "stem_relu"], ["conv1", "bn1", "relu1"], ["conv2", "bn2"],
            ["head", "head_bn", "head_relu"]]

    def __init__(self, w: int = 8, num_classes: int = 10):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.stem, self.stem_bn, self.stem_relu = nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, 1, 1), nn.BatchNorm2d(w)
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.dequant = torch.ao.quantization.DeQuantStub()
        self.head, self.head_bn = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w)
        self.head_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(self.quant(x))))
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        x = self.dequant(self.add.add(x, y))
        x = self.head_relu(self.head_bn(self.head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def qat_intrinsic(w: int = 8, seed: int = 0) -> nn.Module:
    """Trained, then fused for QAT: ConvBnReLU2d / ConvBn2d containers, Identity where BN and
    ReLU were. Not yet prepared: plain float modules that fold."""
    torch.manual_seed(seed)
    model = fill_bn_stats(QatNet(w), (3, 16, 16), steps=2, batch=4, seed=seed)
    return torch.ao.quantization.fuse_modules_qat(model.train(), QatNet.FUSE).eval()


@torch.no_grad()
def qat_prepared(w: int = 8, seed: int = 0) -> nn.Module:
    """`qat_intrinsic` after prepare_qat (x86 QAT qconfig; the head, after DeQuantStub, left in
    float) and a few training steps; then observers and BN statistics frozen and eval, as QAT is
    evaluated."""
    model = qat_intrinsic(w, seed).train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    model.head.qconfig = model.fc.qconfig = None
    model = torch.ao.quantization.prepare_qat(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16, generator=g))
    model.apply(torch.ao.quantization.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    return model.eval()


def qat_modules(model: nn.Module) -> List[str]:
    """Names of the QAT conv-BN modules (fake-quantized weights, BN inside)."""
    qat = torch.ao.nn.intrinsic.qat
    return [n for n, m in model.named_modules() if isinstance(m, (qat.ConvBn2d, qat.ConvBnReLU2d))]


# -- timm HRNet --------------------------------------------------------------------------------


class HrBottleneck(nn.Module):
    """timm's resnet Bottleneck as HRNet's head uses it (expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class HrBasicBlock(nn.Module):
    """timm's resnet BasicBlock (conv1/bn1/act1, conv2/bn2, act2)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class HighResolutionModule(nn.Module):
    """timm.models.hrnet.HighResolutionModule: a BasicBlock per branch, then every output the
    sum of all branches brought to its resolution (1×1 conv + BN + nearest upsampling from
    below, chains of 3×3/2 conv + BN from above, Identity for itself)."""

    def __init__(self, num_in_chs: List[int]):
        super().__init__()
        self.num_in_chs = list(num_in_chs)
        self.num_branches = len(num_in_chs)
        self.branches = nn.ModuleList(nn.Sequential(HrBasicBlock(c, c)) for c in num_in_chs)
        self.fuse_layers = self._make_fuse_layers()
        self.fuse_act = nn.ReLU(False)

    def _make_fuse_layers(self) -> nn.ModuleList:
        c = self.num_in_chs
        fuse_layers = []
        for i in range(self.num_branches):
            fuse_layer = []
            for j in range(self.num_branches):
                if j > i:
                    fuse_layer.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, 1, 0, bias=False), nn.BatchNorm2d(c[i]),
                                                    nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    fuse_layer.append(nn.Identity())
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            conv3x3s.append(nn.Sequential(nn.Conv2d(c[j], c[i], 3, 2, 1, bias=False),
                                                          nn.BatchNorm2d(c[i])))
                        else:
                            conv3x3s.append(nn.Sequential(nn.Conv2d(c[j], c[j], 3, 2, 1, bias=False),
                                                          nn.BatchNorm2d(c[j]), nn.ReLU(False)))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        x_fuse = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y = None
            for j, f in enumerate(fuse_outer):
                if y is None:
                    y = f(x[j])
                else:
                    y = y + f(x[j])
            x_fuse.append(self.fuse_act(y))
        return x_fuse


class SequentialList(nn.Sequential):
    def forward(self, x) -> List[torch.Tensor]:
        for module in self:
            x = module(x)
        return x


def transition(pre: List[int], cur: List[int]) -> nn.ModuleList:
    """timm's _make_transition_layer: Identity where a branch keeps its width, a 3×3/2 conv for a
    new branch."""
    layers: List[nn.Module] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(nn.Identity() if c == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
        else:
            layers.append(nn.Sequential(nn.Conv2d(pre[-1], c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True)))
    return nn.ModuleList(layers)


class HighResolutionNet(nn.Module):
    """timm's HRNet at test width `w`: stem (÷4), a Bottleneck layer, stage 2 with two branches,
    stage 3 with three, and the classification head (incre Bottlenecks, strided downsamp convs
    with bias, final 1×1 conv). transition2's Identity entries are skipped, never called, as timm's
    `stages` does: `t(yl[-1]) if not isinstance(t, nn.Identity) else yl[i]`."""

    def __init__(self, w: int = 4, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w, w, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.act2 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(HrBottleneck(w, w, downsample=nn.Sequential(
            nn.Conv2d(w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w))))
        chs2, chs3 = [w, 2 * w], [w, 2 * w, 4 * w]
        self.transition1 = transition([4 * w], chs2)
        self.stage2 = SequentialList(HighResolutionModule(chs2))
        self.transition2 = transition(chs2, chs3)
        self.stage3 = SequentialList(HighResolutionModule(chs3))
        head_chs = [w // 2, w, 2 * w]
        self.incre_modules = nn.ModuleList(nn.Sequential(HrBottleneck(c, h, downsample=nn.Sequential(
            nn.Conv2d(c, 4 * h, 1, bias=False), nn.BatchNorm2d(4 * h)))) for c, h in zip(chs3, head_chs))
        self.downsamp_modules = nn.ModuleList(nn.Sequential(
            nn.Conv2d(4 * head_chs[i], 4 * head_chs[i + 1], 3, 2, 1, bias=True), nn.BatchNorm2d(4 * head_chs[i + 1]),
            nn.ReLU(inplace=True)) for i in range(len(head_chs) - 1))
        self.num_features = 16 * w
        self.final_layer = nn.Sequential(nn.Conv2d(4 * head_chs[-1], self.num_features, 1, bias=True),
                                         nn.BatchNorm2d(self.num_features), nn.ReLU(inplace=True))
        self.global_pool = lookalikes.ClassifierHead(self.num_features, num_classes)

    def stages(self, x) -> List[torch.Tensor]:
        x = self.layer1(x)
        xl = [t(x) for i, t in enumerate(self.transition1)]
        yl = self.stage2(xl)
        xl = [t(yl[-1]) if not isinstance(t, nn.Identity) else yl[i] for i, t in enumerate(self.transition2)]
        return self.stage3(xl)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        yl = self.stages(x)
        y = None
        for i, incre in enumerate(self.incre_modules):
            if y is None:
                y = incre(yl[i])
            else:
                down = self.downsamp_modules[i - 1]
                y = incre(yl[i]) + down.forward(y)
        return self.global_pool(self.final_layer(y))


def hrnet(w: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fill_bn_stats(HighResolutionNet(w), (3, 32, 32), steps=2, batch=4, seed=seed)


def yolo(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lookalikes.fill(lookalikes.yolo(), (3, 32, 32), seed)


# name → (builder, input shape without batch)
SPELLINGS: Dict[str, Tuple] = {
    "frozen_bn": (frozen_bn, (3, 32, 32)),
    "frozen_bn_d2": (frozen_bn_d2, (3, 32, 32)),
    "conv3d_simple": (conv3d_simple, (3, 4, 16, 16)),
    "same_pad": (same_pad, (3, 32, 32)),
    "batchnorm_act": (batchnorm_act, (3, 32, 32)),
    "qat_intrinsic": (qat_intrinsic, (3, 16, 16)),
    "qat_prepared": (qat_prepared, (3, 16, 16)),
    "hrnet": (hrnet, (3, 32, 32)),
    "yolo": (yolo, (3, 32, 32)),
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[int, ...]]:
    """A look-alike in eval mode with real BN statistics, and its input shape (no batch dim)."""
    factory, shape = SPELLINGS[name]
    return factory(seed=seed), shape


