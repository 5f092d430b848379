"""Model registry: the paper's base CNNs and stacking partners, by name.

Every architecture is written in *ReLU-into-conv* form: a convolution whose input is an activation is
a :class:`ReLUConv2d`, which applies the ReLU itself.  That is the spatial network the paper starts
from (conv -> BN -> ReLU -> conv ...), written so that the ReLU belongs to the layer that consumes it.
``winograd.to_winograd_relu`` then swaps every eligible ``ReLUConv2d`` (3x3, stride 1, padding 1)
for a Winograd-ReLU layer, which moves exactly that ReLU into the Winograd domain (paper eq. 2,
spec section 2) -- no graph surgery needed.  Max-pooling and dropout commute with ReLU
(both are monotone / positively homogeneous), so ``BN -> pool -> ReLUConv2d`` is the same function as
``BN -> ReLU -> pool -> conv``.

Builders follow timm/torchvision: ``@register_model`` on a few lines that call a private
``_create_*``; a duplicate name raises; ``create_model`` refuses unknown names, listing the choices.
``width`` scales every channel count (1.0 = the published widths), so CPU smoke runs can use the same
architecture at a fraction of the cost.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model_names import MODEL_NAMES

__all__ = ["ReLUConv2d", "StemConv2d", "two_channels_last", "register_model", "create_model", "list_models", "MODEL_REGISTRY", "SECNN", "SECNNBlock",
           "ResidualUnit"]


class ReLUConv2d(nn.Conv2d):
    """``conv(relu(x))``: a convolution that owns the ReLU applied to its input.

    A plain subclass of ``nn.Conv2d`` (same parameters, same state-dict keys), so pruning and
    initialisation treat it as any conv; only ``forward`` differs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.relu(x))


def _plain_conv_needed(x: torch.Tensor) -> bool:
    """Inside torch.compile (its own layout choices) or a torch.func transform (vmap, grad: batched
    inputs or weights, where channels-last queries are not implemented)."""
    if torch.compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None:
        return peek() is not None
    probe = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(probe and probe(x))


def two_channels_last(t: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) as (N, 2, H, W) in channels-last memory, the second channel zero: how a one-channel
    conv's input and weight are given to oneDNN's direct channels-last kernel (StemConv2d here,
    inference.ChannelsLastStem); one write, differentiable."""
    n, _, h, w = t.shape
    out = t.new_zeros((n, h, w, 2))
    out[..., 0] = t[:, 0]
    return out.permute(0, 3, 1, 2)


class StemConv2d(nn.Conv2d):
    """The image stem: ``nn.Conv2d`` (same parameters, same state-dict keys) that, on single-channel
    images on the CPU, returns channels-last activations.

    Why: a one-channel NCHW input gives a conv an ambiguous memory format, oneDNN answers in NCHW, and
    the stem's batch norm and max-pool then run torch's NCHW kernels -- the max-pool's several times
    slower than its channels-last one -- while the Winograd layer after them hands its input gradient back
    channels-last, so the backward converts too.  Run as a two-channel convolution (the second input
    channel and its weights zero) on a channels-last copy, the stem's output, and everything up to the
    first Winograd layer, is channels-last in both passes (``bench/stem_layout.py``).  The same values
    to float rounding; the weight's gradient flows through the concatenation.  RGB stems, CUDA,
    tracing and ONNX export, torch.compile and ``torch.func`` transforms take ``nn.Conv2d``'s own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.in_channels != 1 or x.dim() != 4 or x.device.type != "cpu" or self.groups != 1
                or self.padding_mode != "zeros" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or _plain_conv_needed(x)):
            return super().forward(x)
        return F.conv2d(two_channels_last(x), two_channels_last(self.weight), self.bias, self.stride, self.padding,
                        self.dilation)


ModelBuilder = Callable[..., nn.Module]
MODEL_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is not listed in esdbs_ray/model_names.py (config validation "
                             "checks names there without importing torch): add it")
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Module:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    model = MODEL_REGISTRY[name](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, dropout=dropout, width=width
    )
    _init_weights(model)
    return model


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width)))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# AlexNet with batch norm, adapted to 28x28 / 32x32 (paper section 4.1)
# --------------------------------------------------------------------------------------------------
# Five convolutions 64-192-384-256-256 and three FC layers as in Krizhevsky et al., with the changes
# small images need: a 5x5 stride-1 stem instead of 11x11/4, 3x3 kernels after it (so the four inner
# convs are Winograd-eligible), 2x2 max-pools, and a 1024-512 classifier with batch norm.
def _create_alexnet(num_classes, in_channels, image_size, dropout, width):
    c1, c2, c3, c4, c5, f1, f2 = (_ch(c, width) for c in (64, 192, 384, 256, 256, 1024, 512))
    side = image_size // 8
    pool_out = min(side, 6)
    features = nn.Sequential(
        StemConv2d(in_channels, c1, 5, padding=2, bias=False),
        nn.BatchNorm2d(c1),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
        ReLUConv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
        ReLUConv2d(c2, c3, 3, padding=1, bias=False),
        nn.BatchNorm2d(c3),
        ReLUConv2d(c3, c4, 3, padding=1, bias=False),
        nn.BatchNorm2d(c4),
        ReLUConv2d(c4, c5, 3, padding=1, bias=False),
        nn.BatchNorm2d(c5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(pool_out),
    )
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c5 * pool_out * pool_out, f1, bias=False),
        nn.BatchNorm1d(f1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(f1, f2, bias=False),
        nn.BatchNorm1d(f2),
        nn.ReLU(inplace=True),
        nn.Linear(f2, num_classes),
    )
    return nn.Sequential(features, classifier)


@register_model("alexnet")
def alexnet(**kw) -> nn.Module:
    return _create_alexnet(**kw)


# --------------------------------------------------------------------------------------------------
# VGG-16 with batch norm, CIFAR variant (paper section 4.2)
# --------------------------------------------------------------------------------------------------
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _create_vgg(cfg, num_classes, in_channels, image_size, dropout, width):
    layers: list[nn.Module] = []
    c_in, first = in_channels, True
    for v in cfg:
        if v == "M":
            # ceil_mode keeps 28x28 inputs alive through five pools (28-14-7-4-2-1).
            layers += [nn.MaxPool2d(2, ceil_mode=True)]
            continue
        c_out = _ch(v, width)
        conv_cls = StemConv2d if first else ReLUConv2d
        layers += [conv_cls(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        c_in, first = c_out, False
    layers += [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    hidden = _ch(512, width)
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(c_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    return nn.Sequential(nn.Sequential(*layers), classifier)


@register_model("vgg16")
def vgg16(**kw) -> nn.Module:
    return _create_vgg(_VGG16, **kw)


# --------------------------------------------------------------------------------------------------
# ResNet-32 for CIFAR (He et al. 2015, section 4.2: 3 stages x 5 basic blocks, 16-32-64 channels)
# --------------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """Basic block taking the *pre-activation* sum of the previous block.

    ``relu(x)`` feeds the shortcut; ``conv1`` is a ReLUConv2d that applies the same ReLU itself, so a
    Winograd conversion moves that ReLU into the Winograd domain for the residual branch while the
    shortcut keeps the spatial one.  Mathematically identical to the post-add-ReLU block of He et al.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = ReLUConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = ReLUConv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in  # option A shortcut: subsample + zero channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.relu(x)
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))) + shortcut


def _create_cifar_resnet(depth, num_classes, in_channels, image_size, dropout, width):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    widths = [_ch(c, width) for c in (16, 32, 64)]
    layers: list[nn.Module] = [
        StemConv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
    ]
    c_in = widths[0]
    for stage, c_out in enumerate(widths):
        for i in range(n):
            layers.append(_BasicBlock(c_in, c_out, stride=2 if (stage > 0 and i == 0) else 1))
            c_in = c_out
    layers += [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
    return nn.Sequential(nn.Sequential(*layers), nn.Linear(c_in, num_classes))


@register_model("resnet32")
def resnet32(**kw) -> nn.Module:
    return _create_cifar_resnet(32, **kw)


# --------------------------------------------------------------------------------------------------
# ConvPool-CNN-C and All-CNN-C (Springenberg et al. 2014, table 2), with batch norm
# --------------------------------------------------------------------------------------------------
# Model C's 3x3 "valid" conv before the 1x1 layers is padded here (padding 1) so that 28x28 inputs
# keep a spatial map and the layer stays Winograd-eligible.
def _create_springenberg(all_conv, num_classes, in_channels, image_size, dropout, width):
    a, b = _ch(96, width), _ch(192, width)

    def conv(c_in, c_out, k=3, stride=1, first=False):
        cls = StemConv2d if first else ReLUConv2d
        return [cls(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]

    def reduce(c):  # All-CNN-C: stride-2 conv; ConvPool-CNN-C: extra conv, then 3x3/2 max-pool
        if all_conv:
            return conv(c, c, stride=2)
        return conv(c, c) + [nn.MaxPool2d(3, stride=2, padding=1)]

    layers = (
        conv(in_channels, a, first=True) + conv(a, a) + reduce(a) + [nn.Dropout(dropout)]
        + conv(a, b) + conv(b, b) + reduce(b) + [nn.Dropout(dropout)]
        + conv(b, b) + conv(b, b, k=1)
        + [ReLUConv2d(b, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    )
    return nn.Sequential(*layers)


@register_model("convpool_cnn_c")
def convpool_cnn_c(**kw) -> nn.Module:
    return _create_springenberg(False, **kw)


@register_model("all_cnn_c")
def all_cnn_c(**kw) -> nn.Module:
    return _create_springenberg(True, **kw)


# --------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision's), for image-folder data such as 10 Monkey Species
# --------------------------------------------------------------------------------------------------
def _create_resnet50(num_classes, in_channels, image_size, dropout, width):
    from torchvision.models import resnet50 as tv_resnet50
    from torchvision.models.resnet import Bottleneck

    if width != 1.0:
        raise ValueError("resnet50 is torchvision's architecture and supports width=1.0 only")

    class _ReLUInputBottleneck(Bottleneck):
        # torchvision's Bottleneck with the ReLU between bn1 and conv2 owned by conv2 (a ReLUConv2d).
        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            out = self.bn3(self.conv3(self.relu(out)))
            return self.relu(out + identity)

    net = tv_resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = StemConv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    for block in net.modules():
        if isinstance(block, Bottleneck):
            old = block.conv2
            block.conv2 = ReLUConv2d(
                old.in_channels, old.out_channels, 3, stride=old.stride, padding=1, bias=False
            )
            block.__class__ = _ReLUInputBottleneck
    net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
    return net


@register_model("resnet50")
def resnet50(**kw) -> nn.Module:
    return _create_resnet50(**kw)


# --------------------------------------------------------------------------------------------------
# SE-CNN: the seed network of the self-expanding CNN (../shared/spec/self-expanding.md)
# --------------------------------------------------------------------------------------------------
# The published base network is three blocks Conv3x3 -> Dropout2d -> BN -> LeakyReLU(0.2) -> MaxPool2
# of 16 channels and a small head.  Here, in ReLU-into-conv form: block = conv -> Dropout2d -> BN ->
# [residual units] -> MaxPool2, the activation owned by the next conv (a ReLUConv2d, Winograd-ReLU
# eligible) or the head.  Two differences from the paper, both for the Winograd-ReLU method: ReLU
# instead of LeakyReLU(0.2) (the Winograd-ReLU layer moves exactly a ReLU into the Winograd domain;
# max-pooling commutes with it, so BN -> pool -> ReLUConv2d is BN -> ReLU -> pool -> conv), and the head
# is ReLU -> global average pool -> Dropout(dropout / 2) -> Linear, one head for 28x28 and 32x32
# inputs whose input width is the last block's (a widening adds columns to it; the paper's conv and
# dense dropouts are 0.1 / 0.05).  ``expansion.py`` grows it (``widen`` / ``add_layer``).
class ResidualUnit(nn.Module):
    """``x + alpha * BN(conv3x3(relu(x)))`` with a per-channel ``alpha``: the layer an expansion adds
    before a block's pooling; ``alpha`` starts at 0, so the unit starts as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ReLUConv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha.view(1, -1, 1, 1) * self.bn(self.conv(x))


class SECNNBlock(nn.Module):
    """conv -> Dropout2d -> BN -> residual units (``layers``, none at first) -> MaxPool2."""

    def __init__(self, conv: nn.Conv2d, dropout: float):
        super().__init__()
        self.conv = conv
        self.drop = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.layers = nn.ModuleList()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.drop(self.conv(x)))
        for unit in self.layers:
            x = unit(x)
        return self.pool(x)


class SECNN(nn.Module):
    """The self-expanding CNN: ``blocks`` (SECNNBlock) and ``head`` (``head[-1]`` the classifier)."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], dropout: float):
        super().__init__()
        convs, c_in = [], in_channels
        for i, c in enumerate(widths):
            cls = StemConv2d if i == 0 else ReLUConv2d  # the image stem has no preceding activation
            convs.append(cls(c_in, c, 3, padding=1, bias=False))
            c_in = c
        self.blocks = nn.ModuleList(SECNNBlock(conv, dropout) for conv in convs)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout / 2),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def architecture(self) -> dict:
        """``{"widths": [...], "layers": [...]}``: each block's channels and residual units."""
        return {"widths": [b.bn.num_features for b in self.blocks], "layers": [len(b.layers) for b in self.blocks]}


@register_model("secnn")
def secnn(num_classes, in_channels, image_size, dropout, width) -> nn.Module:
    return SECNN(in_channels, num_classes, tuple(_ch(16, width) for _ in range(3)), dropout)
