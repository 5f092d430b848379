"""A trained member as an inference network: batch norm folded into the convolution before it.

In eval mode a batch norm after a convolution is an affine map per output channel,
z = s * y + t with s = gamma / sqrt(var + eps) and t = beta - s * mean, and y is linear in the
convolution's weights, so the pair is one convolution with weights scaled by s and bias s * b + t:

* ``nn.Conv2d`` / ``ReLUConv2d`` / ``nn.Linear``: the weight's output-channel rows scaled;
* ``WinogradReLUConv2d``: the Winograd-domain weight U (16, C_in, C_out) scaled along C_out -- the
  output transform A^T (.) A is linear, so scaling each output channel's 16 products scales its
  output -- and a bias added after the transform.  Pruned (zero) weights stay zero, so a folded layer
  keeps its sparsity.

Pairs are found where the models build them: consecutive in an ``nn.Sequential`` (dropout between
them is the identity in eval mode), and ``convN`` / ``bnN`` attributes of a block (the ResNet block).
A folded network computes what the unfolded one computes in eval mode, to float rounding
(``tests/test_inference.py``, every registry model, spatial and Winograd-ReLU).  ``esdbs predict``
and :class:`esdbs_ray.ensemble.Ensemble` run members folded, under ``torch.inference_mode``.

:func:`prepare_for_inference` also removes passes over the activations that only cost memory
traffic, the network's function unchanged (to float rounding):

* a spatial ReLU right after a Winograd-ReLU layer -- an ``nn.ReLU``, or the input ReLU of a
  ``ReLUConv2d`` -- moves into the layer (``out_relu``), where the native kernels apply it, with the
  bias, in their output transform (:func:`fuse_output_relus`);
* a convolution of a single-channel image (the stems of the Fashion-MNIST models) runs as a
  two-channel one on a channels-last copy of its input, the second channel zero
  (:class:`ChannelsLastStem`): oneDNN then takes its direct channels-last kernel and writes the
  channels-last activations the Winograd layers and pooling read, instead of a blocked kernel whose
  output it reorders, and which the first Winograd layer transposed again;
* consecutive Winograd-ReLU layers and the max-pools among them run as one chain in the sparse
  kernels' lane layout where their masks make them run sparse (:mod:`esdbs_ray.winograd_chain`):
  the activations between them are not transposed to channels-last and back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import two_channels_last
from .winograd_chain import fuse_lane_chains

__all__ = ["fold_batchnorm", "fuse_output_relus", "ChannelsLastStem", "prepare_for_inference"]

_PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Identity)  # identities in eval mode


def _foldable(m: nn.Module) -> bool:
    from .winograd import WinogradReLUConv2d

    return isinstance(m, (nn.Conv2d, nn.Linear, WinogradReLUConv2d))


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    from .winograd import WinogradReLUConv2d

    s = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)) / torch.sqrt(
        bn.running_var.double() + bn.eps)
    t = (bn.bias.double() if bn.affine else 0.0) - s * bn.running_mean.double()
    w = layer.weight
    if isinstance(layer, WinogradReLUConv2d):  # U (16, C_in, C_out): scale along C_out
        w.copy_((w.double() * s.view(1, 1, -1)).to(w.dtype))
    else:  # (C_out, ...): scale the output rows
        w.copy_((w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    new = (s * b + t).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new, requires_grad=False)
    else:
        layer.bias.copy_(new)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution or linear layer into it (in place; the
    batch norm becomes ``nn.Identity``).  The model must be in eval mode.  Returns how many folded."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (batch norm's running statistics)")
    folded = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            last = None
            for name in names:
                m = parent._modules[name]
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and last is not None:
                    _fold(parent._modules[last], m)
                    parent._modules[name] = nn.Identity()
                    folded += 1
                    last = None
                elif _foldable(m):
                    last = name
                elif not isinstance(m, _PASS_THROUGH):
                    last = None
        else:  # blocks: convN followed by bnN
            for name, m in list(parent._modules.items()):
                if name.startswith("bn") and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    conv = parent._modules.get("conv" + name[2:])
                    if conv is not None and _foldable(conv):
                        _fold(conv, m)
                        parent._modules[name] = nn.Identity()
                        folded += 1
    return folded


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a plain ``nn.Conv2d`` (a ``ReLUConv2d`` without its input ReLU), sharing its parameters
    and buffers."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=False,
                      padding_mode=conv.padding_mode, device="meta")
    plain.weight, plain.bias = conv.weight, conv.bias
    for name, buf in conv.named_buffers(recurse=False):
        plain.register_buffer(name, buf)
    return plain.train(conv.training)


def fuse_output_relus(model: nn.Module) -> int:
    """Move every spatial ReLU that directly follows a Winograd-ReLU layer in an ``nn.Sequential``
    (eval mode's identities -- dropout, folded batch norms -- between them skipped) into the layer:
    ``layer.out_relu = True``; an ``nn.ReLU`` becomes ``nn.Identity``, a ``ReLUConv2d`` (whose forward
    is ``conv(relu(x))``) a plain ``nn.Conv2d``.  The ReLU of the Winograd domain of a following
    Winograd-ReLU layer is not this ReLU and stays.  In place; returns how many moved."""
    from .models import ReLUConv2d
    from .winograd import WinogradReLUConv2d

    moved = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        last = None
        for name in list(parent._modules):
            m = parent._modules[name]
            if isinstance(m, WinogradReLUConv2d):
                last = None if m.out_relu else m
                continue
            if isinstance(m, _PASS_THROUGH):
                continue
            if last is not None and isinstance(m, (nn.ReLU, ReLUConv2d)):
                last.out_relu = True
                parent._modules[name] = nn.Identity() if isinstance(m, nn.ReLU) else _plain_conv(m)
                moved += 1
            last = None
    return moved


class ChannelsLastStem(nn.Module):
    """A convolution of single-channel images (``nn.Conv2d``, or ``ReLUConv2d``: ReLU first) run as a
    two-channel one, the second channel zero, on a channels-last copy of its input; returns
    channels-last activations, so the first Winograd layer no longer copies its input to
    channels-last (oneDNN's blocked kernel for one input channel is several times slower than its
    direct channels-last one here)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        from .models import ReLUConv2d

        if conv.in_channels != 1 or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"ChannelsLastStem takes a 1-input-channel, zero-padded, ungrouped conv, got {conv}")
        self.relu = isinstance(conv, ReLUConv2d)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.register_buffer("weight", two_channels_last(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = two_channels_last(x.relu() if self.relu else x)
        return F.conv2d(x2, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _stems_to_channels_last(model: nn.Module) -> int:
    """Every CPU convolution of single-channel input (nn.Conv2d, StemConv2d or ReLUConv2d) as a ChannelsLastStem."""
    from .models import ReLUConv2d, StemConv2d

    count = 0
    for parent in list(model.modules()):
        for name, m in list(parent._modules.items()):
            if (type(m) in (nn.Conv2d, ReLUConv2d, StemConv2d) and m.in_channels == 1 and m.groups == 1
                    and m.padding_mode == "zeros" and m.weight.device.type == "cpu"):
                parent._modules[name] = ChannelsLastStem(m)
                count += 1
    return count


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, batch norm folded, no parameter asks for a gradient, every pruned Winograd-ReLU
    layer given back its mask (``weight_mask`` from the weights' zeros: an export folds the masks into
    the weights) so that the sparse kernels can run it where they pay, the spatial ReLUs after
    Winograd-ReLU layers moved into them and single-channel stems run channels-last (see the module's
    docstring); returns ``model``."""
    from .winograd import winograd_layers

    model.eval()
    fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in winograd_layers(model):
        if getattr(layer, "weight_mask", None) is None and bool((layer.weight == 0).any()):
            layer.register_buffer("weight_mask", (layer.weight != 0).to(layer.weight.dtype))
    fuse_output_relus(model)
    _stems_to_channels_last(model)
    fuse_lane_chains(model)
    return model
