"""Consecutive sparse Winograd-ReLU layers and max-pools of an inference network, run as one chain in
the native kernels' lane layout.

What this gives the project: a pruned member's stages stop paying, between each other, for what does
not shrink with the density.  The sparse forward (:mod:`esdbs_ray.winograd_sparse`) holds 16 images
side by side in its vectors (the "lane layout"); run alone, every layer transposes its channels-last
input into that layout and its output back out of it, and a max-pool between two layers reads and
writes the channels-last activations through memory once more.  :class:`LaneChain` runs a run of
stages -- sparse layers and the max-pools among them, as a network's ``nn.Sequential`` lists them --
on one group of 16 images at a time in the lanes (``esdbs_wino_lane_chain`` in
``winograd_native.cpp``): one transpose in, one out, and a pool that is a maximum of whole vectors.

Same results: every stage's arithmetic is the one-stage path's in the same order, so a chain gives the
same bits as its stages run one after another on the sparse kernels (the sparse forward, torch's
``max_pool2d``); ``tests/test_winograd_chain.py`` compares them bit for bit on every registry model.
A layer that runs sparse only inside a chain (``CHAIN_CROSSOVER``) gives the dense layer's results to
float rounding, as the sparse kernels do.

When a chain runs (checked at every call, as the layers' own choice is): inference (eval mode, no
autocast, nothing records gradients; an ONNX export or a trace runs the stages one by one), float32
on CPU, the vectorised kernels, and per layer the sparse kernels chosen for this pass
(``winograd_sparse._chosen``: its mask's density under the crossover, ``$ESDBS_NATIVE_SPARSE``), or in a chain up to
``CHAIN_CROSSOVER`` (:func:`chain_structure`).  A layer that runs dense splits the run:
the stages on either side of it run as chains where two or more remain with a layer among them, the
rest one by one; so does a stage whose activations for 16 images take more than
``LANE_IMAGE_MAX_BYTES``.  A batch's last N mod 16 images run the chain's stages one by one, its
layers on the sparse kernels as in the chain (every image of a batch gets the same arithmetic); a
batch of fewer than 16 images runs the stages on their own paths.

:func:`fuse_lane_chains` (called by :func:`esdbs_ray.inference.prepare_for_inference`) puts the
chains into a network.  Switch: ``$ESDBS_NATIVE_CHAIN`` = "auto" (default) or "off" (the stages one by
one: benchmarks, and a user who wants the per-layer profile).
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from . import winograd_native as native
from .winograd_sparse import (CROSSOVER, DENSITY_SLACK, _chosen, _nhwc, _prof_ptr, kernels_vectorised, sparse_forward,
                              sparse_mode, structure_for)

__all__ = ["CHAIN_ENV", "CHAIN_MODES", "LANE_IMAGE_MAX_BYTES", "CHAIN_CROSSOVER", "CHAIN_MIN_TILES", "chain_mode",
           "chain_structure", "LaneChain", "fuse_lane_chains", "pool_supported"]

CHAIN_ENV = "ESDBS_NATIVE_CHAIN"
CHAIN_MODES = ("auto", "off")
_PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Identity)  # identities in eval mode
# A chain holds two lane images of a group (16 images of a stage's input or output) per thread; a
# stage whose lane image is larger runs on its own: the chain's gain is the activations staying in
# the caches between stages, and the memory is the threads' (16 of them on a large node).
LANE_IMAGE_MAX_BYTES = 16 << 20
# Inside a chain a layer runs sparse at a density up to CHAIN_CROSSOVER even where, alone, it would run
# dense (winograd_sparse.CROSSOVER): in the lanes it saves the transposes in and out, and the pools
# beside it their passes, which the per-layer crossover counts against the sparse layer.  Derived by
# bench/sparse_chain.py (bench/results/sparse_chain.json, "crossover": the largest tested density at
# which the registry's chains, all sparse, took <= 0.95x their stages' time on auto's per-layer paths
# in median and no more on 3 of 4 of them; the chains of few channels gain far more than that, the
# wide ones less).  A layer whose image has fewer than CHAIN_MIN_TILES 2x2 tiles stays out of chains:
# there the lanes' fixed costs per group and stage outweigh what they save (the same benchmark:
# VGG-16's 2x2 maps took longer as a chain at every density, its 4x4 ones about as long).
CHAIN_CROSSOVER = 0.5
CHAIN_MIN_TILES = 4


def _lane_bytes(c: int, h: int, w: int) -> int:
    """A group's lane image of C x H x W activations (float32): H rows of 2 ceil(W / 2) + 2 columns."""
    return h * (2 * ((w + 1) // 2) + 2) * c * 16 * 4


def chain_mode() -> str:
    """``$ESDBS_NATIVE_CHAIN``: "auto" (default) or "off"."""
    choice = os.environ.get(CHAIN_ENV, "").strip().lower() or "auto"
    if choice not in CHAIN_MODES:
        raise ValueError(f"${CHAIN_ENV} must be one of {', '.join(CHAIN_MODES)}; got {choice!r}")
    return choice


def _square(v) -> int | None:
    """An int, or a pair of equal ints, as one int; None otherwise."""
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1] and isinstance(v[0], int):
        return v[0]
    return None


def _pool_params(m: nn.Module) -> tuple[int, int, int] | None:
    if type(m) is not nn.MaxPool2d or m.ceil_mode or m.return_indices or _square(m.dilation) != 1:
        return None
    k, s, p = _square(m.kernel_size), _square(m.stride if m.stride is not None else m.kernel_size), _square(m.padding)
    if k is None or s is None or p is None or k < 1 or s < 1 or p < 0 or 2 * p > k:
        return None
    return k, s, p


def pool_supported(m: nn.Module) -> bool:
    """Whether a chain runs this module as a max-pool: an ``nn.MaxPool2d`` with square window, stride
    and padding, no dilation, floor mode, no indices."""
    return _pool_params(m) is not None


def chain_structure(x: torch.Tensor, layer: nn.Module):
    """The mask's structure where ``layer`` runs sparse inside a chain on input ``x`` (its shape, dtype
    and device), else None: where the layer alone would (``winograd_sparse._chosen``), and with
    ``$ESDBS_NATIVE_SPARSE`` "auto" also at densities up to ``CHAIN_CROSSOVER`` (C * K at least the
    per-layer rule's ``min_ck``); never on images of fewer than ``CHAIN_MIN_TILES`` tiles."""
    from .winograd_dispatch import choose_impl

    n, c, h, w = x.shape
    u, mask = layer.weight, getattr(layer, "weight_mask", None)
    if (c != u.shape[1] or u.dtype != torch.float32 or ((h + 1) // 2) * ((w + 1) // 2) < CHAIN_MIN_TILES
            or choose_impl(x, u, layer.impl, torch.float32) != "native"):
        return None
    chosen = _chosen(x, u, mask, False)
    if chosen is not None or sparse_mode() != "auto" or mask is None or tuple(mask.shape) != tuple(u.shape):
        return chosen
    s = structure_for(mask)
    return s if s.density <= CHAIN_CROSSOVER + DENSITY_SLACK and s.c * s.k >= CROSSOVER["min_ck"] else None


def _is_layer(m: nn.Module) -> bool:
    from .winograd import WinogradReLUConv2d

    return isinstance(m, WinogradReLUConv2d)


class LaneChain(nn.Module):
    """Stages (``WinogradReLUConv2d`` layers and supported ``nn.MaxPool2d``) run one after another,
    in the lane layout where they can be (see the module's docstring); an inference module of a
    prepared network (eval mode, batch norm folded).  ``last_plan`` says how the last call ran:
    one entry per segment, "chain" or "modules", with its stages' indices."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        for m in stages:
            if not (_is_layer(m) or pool_supported(m) or isinstance(m, _PASS_THROUGH)):
                raise ValueError(f"a lane chain takes Winograd-ReLU layers, square max-pools and eval mode's "
                                 f"identities (dropout, nn.Identity), got {m}")
        self.stages = nn.ModuleList(stages)
        # the stages' mode (a new module's is training; an nn.Identity's, as a folded batch norm leaves, says nothing)
        self.training = any(m.training for m in stages if not isinstance(m, nn.Identity))
        self.last_plan: list[tuple[str, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        structures: dict = {}  # stage index -> its mask's structure, for the layers that run sparse
        plan = self._plan(x, structures) if self._runnable(x) else [("modules", list(range(len(self.stages))))]
        self.last_plan = [(kind, tuple(idx)) for kind, idx in plan]
        for kind, idx in plan:
            x = self._chain(x, idx, structures) if kind == "chain" else self._modules_run(x, idx)
        return x

    # ------------------------------------------------------------------------------------------
    def _runnable(self, x: torch.Tensor) -> bool:
        if (chain_mode() == "off" or self.training or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export() or torch.is_autocast_enabled("cpu")):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # autograd records the stages: the layers' own paths
        if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] < 16 or 0 in x.shape:
            return False
        return kernels_vectorised()

    def _plan(self, x: torch.Tensor, structures: dict) -> list[tuple[str, list[int]]]:
        """Segments of stages: ("chain", [i, ...]) runs in the lanes, ("modules", [i, ...]) one by one;
        ``structures`` gets the structure of every layer that runs sparse."""
        n, c, h, w = x.shape
        ok = []
        for i, m in enumerate(self.stages):
            if _is_layer(m):
                u = m.weight
                chosen = chain_structure(x.new_zeros(()).expand(n, c, h, w), m)  # (a probe: the shape, no memory)
                fits = max(_lane_bytes(c, h, w), _lane_bytes(u.shape[2], h, w)) <= LANE_IMAGE_MAX_BYTES
                ok.append(chosen is not None and fits)
                if ok[-1]:
                    structures[i] = chosen
                c = u.shape[2]
            elif isinstance(m, _PASS_THROUGH):
                ok.append(True)
            else:
                params = _pool_params(m)
                if params is None:  # changed since the chain was made: the stages one by one
                    return [("modules", list(range(len(self.stages))))]
                k, s, p = params
                h0, w0 = h, w
                h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
                if h < 1 or w < 1:  # torch raises on this: let it
                    return [("modules", list(range(len(self.stages))))]
                ok.append(_lane_bytes(c, h0, w0) <= LANE_IMAGE_MAX_BYTES)
        plan: list[tuple[str, list[int]]] = []
        run: list[int] = []

        def close():
            real = [i for i in run if not isinstance(self.stages[i], _PASS_THROUGH)]
            if len(real) >= 2 and any(_is_layer(self.stages[i]) for i in real):
                plan.append(("chain", list(run)))
            elif run:
                plan.append(("modules", list(run)))
            run.clear()

        for i, good in enumerate(ok):
            if good:
                run.append(i)
            else:
                close()
                plan.append(("modules", [i]))
        close()
        merged: list[tuple[str, list[int]]] = []  # neighbouring "modules" segments as one
        for kind, idx in plan:
            if merged and kind == "modules" and merged[-1][0] == "modules":
                merged[-1][1].extend(idx)
            else:
                merged.append((kind, idx))
        return merged

    def _modules_run(self, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        for i in idx:
            x = self.stages[i](x)
        return x

    def _chain(self, x: torch.Tensor, idx: list[int], structures: dict) -> torch.Tensor:
        n, c, h, w = x.shape
        whole = n // 16 * 16
        real = [i for i in idx if not isinstance(self.stages[i], _PASS_THROUGH)]  # (eval mode: identities)
        desc = (ctypes.c_int64 * (8 * len(real)))()
        ptrs = (ctypes.c_void_p * (5 * len(real)))()
        keep = []  # the tensors whose pointers the call reads
        for j, i in enumerate(real):
            m = self.stages[i]
            if _is_layer(m):
                u = m.weight.detach().contiguous()
                s = structures[i]
                o = s.by_k()
                b = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
                desc[8 * j:8 * j + 4] = [0, s.k, int(m.relu), int(getattr(m, "out_relu", False))]
                for q, t in enumerate((u, o.ptr, o.idx, o.flat, b)):
                    ptrs[5 * j + q] = None if t is None else t.data_ptr()
                keep += [u, o, b]
                c = s.k
                m.ran["inference"] = "native-sparse"
            else:
                k, st, p = _pool_params(m)
                desc[8 * j:8 * j + 4] = [1, k, st, p]
                h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        y = torch.empty((n, c, h, w), dtype=x.dtype, memory_format=torch.channels_last)
        xh = _nhwc(x)
        native.library().esdbs_wino_lane_chain(xh.data_ptr(), y.data_ptr(), whole, x.shape[2], x.shape[3],
                                               x.shape[1], len(real), desc, ptrs, torch.get_num_threads(),
                                               _prof_ptr())
        if whole < n:  # the last images, fewer than a group: the stages one by one, the layers sparse
            y[whole:] = self._sparse_stages(x[whole:], real, structures)
        return y

    def _sparse_stages(self, x: torch.Tensor, real: list[int], structures: dict) -> torch.Tensor:
        """The stages one by one, each layer on the sparse kernels with the chain's structure (the
        band layout: the lanes' bits), so that every image of a batch gets the same arithmetic -- also
        a layer that runs sparse only inside the chain."""
        for i in real:
            m = self.stages[i]
            if _is_layer(m):
                x = sparse_forward(x, m.weight.detach(), structures[i], m.relu, m.bias,
                                   getattr(m, "out_relu", False))
            else:
                x = m(x)
        return x


def fuse_lane_chains(model: nn.Module) -> int:
    """Replace, in place, every run of two or more stages -- ``WinogradReLUConv2d`` layers and supported
    ``nn.MaxPool2d`` (:func:`pool_supported`), with eval mode's identities between them (dropout,
    ``nn.Identity``: kept in the chain, in order, so that the stages one by one are the network's
    modules in its order) -- with at least one layer among them, in an ``nn.Sequential``, by one
    :class:`LaneChain` at the first stage's place (the others become ``nn.Identity``).  For a prepared
    network: its state dict's keys change (``features.3.weight`` -> ``features.2.stages.1.weight``),
    and hooks on a stage do not fire while a chain runs it.  Returns how many chains."""
    count = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        run: list[str] = []

        def close():
            nonlocal count
            while run and isinstance(parent._modules[run[-1]], _PASS_THROUGH):  # trailing identities stay out
                run.pop()
            stages = [parent._modules[nm] for nm in run]
            real = [m for m in stages if not isinstance(m, _PASS_THROUGH)]
            if len(real) >= 2 and any(_is_layer(m) for m in real):
                parent._modules[run[0]] = LaneChain(stages)
                for nm in run[1:]:
                    parent._modules[nm] = nn.Identity()
                count += 1
            run.clear()

        for nm in names:
            m = parent._modules[nm]
            if _is_layer(m) or pool_supported(m) or (run and isinstance(m, _PASS_THROUGH)):
                run.append(nm)
            elif not isinstance(m, _PASS_THROUGH):
                close()
        close()
    return count
