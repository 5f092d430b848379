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
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_batchnorm", "prepare_for_inference"]

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


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, batch norm folded, no parameter asks for a gradient, and every pruned Winograd-ReLU
    layer given back its mask (``weight_mask`` from the weights' zeros: an export folds the masks into
    the weights) so that the sparse kernels can run it where they pay; returns ``model``."""
    from .winograd import winograd_layers

    model.eval()
    fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in winograd_layers(model):
        if getattr(layer, "weight_mask", None) is None and bool((layer.weight == 0).any()):
            layer.register_buffer("weight_mask", (layer.weight != 0).to(layer.weight.dtype))
    return model
