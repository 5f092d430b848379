"""Per-layer magnitude pruning with masks that only shrink (spec section 3).

Prunable layers are the 3x3 convolutions whose input is an activation:

* every :class:`~esdbs_ray.winograd.WinogradReLUConv2d` -- its Winograd-domain weight U (16 values per
  channel pair) is pruned, so the zeros are the ones the 16 per-position GEMMs multiply (SWR-CNN);
* every :class:`~esdbs_ray.models.ReLUConv2d` with a 3x3 kernel that was not converted (strided ones,
  and all of them in the spatial C-CNN / SC-CNN variants) -- its spatial 3x3 kernels are pruned.

The image stem (a plain ``nn.Conv2d``), 1x1 convolutions and linear layers are left dense.

Each prunable module carries its mask as a buffer ``weight_mask`` (same dtype as the weight, 1 = kept)
so masks travel in ``model.state_dict()``.  The trainer's order is: build model -> maybe
``to_winograd_relu`` -> ``Pruner(model)`` -> ``load_state_dict(checkpoint)``; ``Pruner`` therefore
registers all-ones masks up front so the keys match, and reuses masks that already exist.
A mask is stored in the weight's dtype rather than as bool so that ``apply_`` is a single fused
``_foreach_mul_`` with no per-step conversion, and stays correct after ``load_state_dict`` (which
copies into the existing buffers) or ``model.to(...)`` (which replaces them: tensors are looked up
afresh on every call rather than cached).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .models import ReLUConv2d
from .winograd import WinogradReLUConv2d

__all__ = ["Pruner", "sparsity_ladder", "DEFAULT_LADDER", "prunable_layers", "sparsity_accounting"]

DEFAULT_LADDER: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

# Optimizer state entries that are per-element companions of the weight (SGD momentum_buffer,
# Adam exp_avg / exp_avg_sq / max_exp_avg_sq, ...) are recognised by having the weight's shape.


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, WinogradReLUConv2d):
            out.append((name, m))
        elif isinstance(m, ReLUConv2d) and tuple(m.kernel_size) == (3, 3):
            out.append((name, m))
    return out


class Pruner:
    """Magnitude pruner over the prunable layers of ``model`` (see module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = prunable_layers(model)
        if not self.layers:
            raise ValueError("model has no prunable layers (3x3 ReLUConv2d or WinogradReLUConv2d)")
        for _, m in self.layers:
            w = m.weight
            mask = getattr(m, "weight_mask", None)
            if mask is None:
                m.register_buffer("weight_mask", torch.ones_like(w, memory_format=torch.contiguous_format))
            elif mask.shape != w.shape:
                raise ValueError(f"existing weight_mask has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
        self.apply_()

    # -- helpers -----------------------------------------------------------------------------------
    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights = [m.weight for _, m in self.layers]
        masks = [m.weight_mask if m.weight_mask.dtype == m.weight.dtype else m.weight_mask.to(m.weight.dtype)
                 for _, m in self.layers]
        return weights, masks

    # -- API ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> dict:
        """Prune every layer to ``sparsity`` (fraction of zeros) by weight magnitude; returns report().

        Only entries still alive compete: dead entries sort first, so masks only shrink.  A stable
        sort on |w| breaks ties by flat index, which makes the result deterministic; the exact count
        round(sparsity * numel) is pruned, so a layer's sparsity is within 0.5/numel of the target.
        A layer already sparser than the target is left as it is.
        """
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        for _, m in self.layers:
            w, mask = m.weight, m.weight_mask
            n = w.numel()
            target = int(round(float(sparsity) * n))
            alive = mask.reshape(-1) != 0
            if n - int(alive.sum()) >= target:
                continue
            score = w.detach().reshape(-1).abs().float()
            score = torch.where(alive, score, torch.full_like(score, -1.0))
            order = torch.sort(score, stable=True).indices
            new = torch.ones(n, dtype=torch.bool, device=mask.device)
            new[order[:target]] = False
            mask.copy_(new.view_as(mask).to(mask.dtype))
        self.apply_()
        return self.report()

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights and, given ``optimizer``, the pruned entries of its per-element
        state (momentum, Adam moments).  Call after every ``optimizer.step()``."""
        weights, masks = self._tensors()
        torch._foreach_mul_(weights, masks)
        if optimizer is None:
            return
        bufs, bmasks = [], []
        for w, mask in zip(weights, masks):
            state = optimizer.state.get(w)
            if not state:
                continue
            for v in state.values():
                if torch.is_tensor(v) and v.shape == w.shape and v.is_floating_point():
                    bufs.append(v)
                    bmasks.append(mask if v.dtype == mask.dtype else mask.to(v.dtype))
        if bufs:
            torch._foreach_mul_(bufs, bmasks)

    @torch.no_grad()
    def report(self) -> dict:
        """{"overall", "layers": {name: sparsity}, "prunable_params", "zero_params"} (mask-based)."""
        layers, total, zeros = {}, 0, 0
        for name, m in self.layers:
            n = m.weight_mask.numel()
            z = int((m.weight_mask == 0).sum())
            layers[name] = z / n
            total += n
            zeros += z
        return {"overall": zeros / total, "layers": layers, "prunable_params": total, "zero_params": zeros}


@torch.no_grad()
def sparsity_accounting(model: nn.Module) -> dict:
    """Sparsity of the pruned layers *and* of the whole model, with nonzero counts (spec §3).

    The nominal sparsity counts only the prunable 3x3 layers: at "80 %" an AlexNet keeps its stem,
    1x1 convs, classifier and batch norms dense, about 35 % of its parameters zero.  And at one
    nominal sparsity a Winograd layer keeps 16/9 as many nonzeros as the spatial layer it replaces
    (16 values per channel pair instead of 9), so comparisons of SC-CNN with SWR-CNN need the counts.
    Whole-model figures count every learnable parameter (weights, biases, batch-norm scales and
    shifts), zero wherever it is exactly 0.0; buffers (masks, running statistics) are not weights.

    Keys: ``sparsity`` (pruned layers, mask-based as in :meth:`Pruner.report`; 0 when nothing is
    prunable), ``pruned_layer_weights``, ``model_sparsity``, ``nonzero_weights``, ``total_weights``."""
    layers = prunable_layers(model)
    pruned_total = sum(m.weight.numel() for _, m in layers)
    pruned_zero = sum(int((m.weight_mask == 0).sum()) for _, m in layers if hasattr(m, "weight_mask"))
    total = zero = 0
    for p in model.parameters():
        total += p.numel()
        zero += int((p == 0).sum())
    return {"sparsity": pruned_zero / pruned_total if pruned_total else 0.0, "pruned_layer_weights": pruned_total,
            "model_sparsity": zero / total if total else 0.0, "nonzero_weights": total - zero, "total_weights": total}


def sparsity_ladder(spec: str | Sequence[float] | None = None) -> tuple[float, ...]:
    """Parse and validate a sparsity ladder: "0.2,0.3,..." or a sequence; None -> DEFAULT_LADDER.

    Each rung must be in [0, 1) and the rungs strictly increasing (masks only shrink).
    """
    if spec is None:
        return DEFAULT_LADDER
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not any(parts):
            raise ValueError(f"sparsity ladder is empty: {spec!r}")
        values = []
        for p in parts:
            try:
                values.append(float(p))
            except ValueError:
                raise ValueError(f"sparsity ladder: {p!r} is not a number (in {spec!r})") from None
    else:
        values = [float(v) for v in spec]
        if not values:
            raise ValueError("sparsity ladder is empty")
    prev = None
    for v in values:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity ladder: {v} is outside [0, 1)")
        if prev is not None and v <= prev:
            raise ValueError(f"sparsity ladder must be strictly increasing: {v} follows {prev}")
        prev = v
    return tuple(values)
