"""Self-expanding CNN members: ``secnn`` grows while it trains, where the natural expansion score says
a wider block or one more layer would let training make more progress, and every growth leaves the
network's function exactly as it was (../shared/spec/self-expanding.md, section 2).

Evidence: ``tests/test_expansion.py`` checks both expansion operations preserve the outputs to float
rounding -- eval and train mode, BN running statistics included, spatial and Winograd-ReLU layers --,
the score against a per-sample loop in float64, the controller's rules (tau, cooldown, check interval,
limits, size penalty, determinism), the optimizer state carried over, and that a run checkpointed
after growing and resumed grows and trains exactly as an uninterrupted one.  ``bench/expansion.py``
times one check against one training epoch (``bench/results/expansion.json``).

The parts, and what the trainer calls (``GrowthController`` at the end of the file):

* **Operations** on a :class:`~esdbs_ray.models.SECNN` (its ``blocks``; ``head[-1]`` the classifier):
  :func:`widen` adds ``c`` output channels to block ``b``: fresh He-initialised incoming weights (the
  block's conv, and the new rows of its residual units' convs), **zero outgoing weights** (the next
  block's conv or the classifier, and the residual convs' old rows), new BN channels at gamma 1, beta 0
  with fresh running statistics (mean 0, var 1; the controller then estimates them on the scoring
  sample, :func:`calibrate_new_bn`), residual ``alpha`` 0 for the new channels.  :func:`add_layer`
  appends a :class:`~esdbs_ray.models.ResidualUnit` ``x + alpha * BN(conv3x3(relu(x)))`` with
  ``alpha = 0`` before the block's pooling.  Old parameters, BN statistics (``num_batches_tracked``
  too) and, through :func:`carry_optimizer_state`, optimizer state are kept.  Both work on spatial
  convs and on layers already converted to Winograd-ReLU (new weights are G g G^T of He-initialised
  3x3 kernels, a new unit's conv is converted like its neighbours), and keep pruning masks in step
  (new entries kept).  Each returns a :class:`Change`: the grown and added parameters (for the
  optimizer), the entries whose gradient can be nonzero at the start (for the score), the new BN
  channels (for calibration) and the parameter counts.
  *Exactness*: in eval mode the new channels never reach an old one or the output (zero weights, zero
  alpha), so outputs are equal to rounding.  In train mode batch norm normalises each channel by its own
  batch statistics, so old channels' outputs and running statistics are unchanged too; the one
  exception is dropout: ``Dropout2d`` draws one number per (sample, channel), so after a widening
  the same RNG state gives the old channels other masks -- a widened net equals the old one in train
  mode for dropout 0 (or any fixed mask), and an added layer (which draws nothing) for any dropout.
* **The score** (:func:`natural_expansion_score`): eta = sum_j gbar_j^2 / (F_jj + lambda), over a fixed
  scoring sample of n training images, gbar the mean gradient of the cross-entropy, F_jj the mean of
  the per-sample squared gradients (``torch.func.functional_call`` + ``vmap(grad)``, in chunks,
  accumulated in float64), lambda = ``damping`` * mean_j F_jj of the *current* network (one lambda for
  the current network and every candidate of a check, so their etas are sums of comparable terms).
  Batch norm runs in eval mode (running statistics), dropout off: a train-mode BN makes each sample's
  loss depend on the rest of its batch, so a per-sample gradient is not defined; with running
  statistics the samples are independent, and gbar is exactly the gradient of the mean loss.
  *Candidates* are scored on the expanded network at its function-preserving start.  There every old
  entry's per-sample gradient equals the current network's (same function, and the new channels
  reach nothing), and the new incoming weights, new BN parameters and a new unit's conv have zero
  gradient (their outputs are multiplied by zero weights or alpha), so eta_candidate = eta_current +
  the terms of the entries ``Change.live`` names (outgoing weights, alpha), at the current network's
  lambda (the tests check this sum against the whole score of the expanded network, by a per-sample
  loop).  A check (:func:`check_scores`) computes these per-sample gradients one of two ways, the
  same numbers (both checked against the per-sample loop in float64): "func", ``torch.func`` on the
  network and on each expanded copy (used for Winograd-ReLU nets), and "activations" (spatial nets,
  the default there) from one eval-mode forward and backward of the current network per chunk --
  with independent samples the batch backward gives each sample's own gradient at every layer, so a
  conv's per-sample weight gradient is its input's patches times its output gradient, a BN's and
  alpha's likewise, and a candidate's live entries are the current network's gradient at the
  insertion point times the new units' activations (dL/dalpha = sum_hw dL/dz * BN(conv(relu(z))),
  the n_init new convs of a block as one convolution).  On 2 cores this is 0.48 s a check instead
  of 2.5 s with "func" (15 candidates, 1,024 images, the seed network; best of 3 in one process).
* **The controller** (:class:`GrowthController`): at the end of an epoch, when ``(epoch + 1) %
  check_every == 0`` and at least ``cooldown`` epochs have passed since the last expansion, it scores
  the current network and, for every block, a widening by ``widen_channels`` and ``n_init``
  initialisations of a new layer (within ``max_width``, ``max_layers_per_block``, ``max_params``); a
  candidate's score is eta * exp(-penalty * dp^2) (dp: parameters added), and the best is applied
  when its score over eta_current exceeds ``tau``: at most one expansion per check.  Every random
  draw comes from a generator seeded by (seed, epoch, operation, block, initialisation), so a check
  takes nothing from the global RNG and a run is deterministic given its seed.  Its
  :meth:`~GrowthController.state_dict` holds the operations applied and every decision, so a resumed
  run rebuilds the grown architecture (:meth:`~GrowthController.rebuild`) before loading the weights,
  and grows on exactly as the uninterrupted run.

What the trainer does (a sketch; ``decide`` / ``commit`` instead of ``step`` to close a level -- evaluate,
checkpoint, predict with the network as it is -- between the decision and the growth)::

    growth = GrowthController.from_config(cfg, data, device) if cfg.expansion.enabled else None
    # resume, after build_model and before the optimizer / Pruner see the parameters:
    growth.load_state_dict(ckpt["state"]["expansion"]); growth.rebuild(model); model.load_state_dict(...)
    # end of every dense epoch, after validation:
    d = growth.step(model, epoch)            # None: no check due; d.decision: one line for the record
    if d is not None and d.expanded:
        optimizer = carry_optimizer_state(optimizer, build_optimizer(cfg, model), d.change)
        # and: the divergence guard's snapshot, any Pruner / compiled model are of the old shapes
    state["expansion"] = growth.state_dict()  # in every checkpoint

This module is pure PyTorch (no Ray).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import SECNN, ReLUConv2d, ResidualUnit
from .winograd import AT, BT, WinogradReLUConv2d, spatial_to_winograd

__all__ = [
    "Change", "widen", "add_layer", "apply_op", "calibrate_new_bn", "count_params",
    "Score", "natural_expansion_score", "candidate_increments", "check_scores", "carry_optimizer_state",
    "CandidateScore", "ExpansionDecision", "GrowthController", "scoring_sample", "OPS",
]

OPS = ("widen", "add_layer")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Expansion operations
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Change:
    """What one expansion changed.

    ``grown``: (old parameter, new parameter) pairs -- the new one holds the old values in its leading
    slice (growth appends along dimensions); ``added``: parameters that did not exist; ``live``:
    (parameter, index) of the new entries whose gradient can be nonzero at the function-preserving
    start (the score's candidate terms); ``bn``: (BatchNorm2d, channel slice) of new BN channels."""

    op: str
    block: int
    amount: int
    params_before: int
    params_after: int
    grown: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    added: list[nn.Parameter] = field(default_factory=list)
    live: list[tuple[nn.Parameter, tuple]] = field(default_factory=list)
    bn: list[tuple[nn.BatchNorm2d, slice]] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before


def _check_model(model: nn.Module, block: int) -> None:
    if not isinstance(model, SECNN):
        raise TypeError(f"expansion needs the secnn model (models.SECNN), got {type(model).__name__}")
    if not 0 <= block < len(model.blocks):
        raise ValueError(f"block {block}: the model has blocks 0..{len(model.blocks) - 1}")


def _he(shape: Sequence[int], fan: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Kaiming-normal values (ReLU gain, fan as the registry's init: fan_out), drawn on the CPU from
    ``generator`` so the draw is the same on every device and leaves the global RNG alone."""
    w = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * math.sqrt(2.0 / fan)
    return w.to(device=like.device, dtype=like.dtype)


def _padded(t: torch.Tensor, shape: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    out = t.new_full(tuple(shape), fill)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _set_param(module: nn.Module, name: str, value: torch.Tensor, change: Change) -> nn.Parameter:
    old = getattr(module, name)
    new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    change.grown.append((old, new))
    return new


def _grow_mask(module: nn.Module) -> None:
    """A pruning mask (``weight_mask``, pruning.Pruner) follows its weight; new entries are kept (1)."""
    mask = getattr(module, "weight_mask", None)
    if mask is not None and mask.shape != module.weight.shape:
        module.weight_mask = _padded(mask, module.weight.shape, 1.0)


def _grow_out(conv: nn.Module, c: int, generator, change: Change) -> None:
    """Add ``c`` output channels to a conv with fresh He-initialised incoming weights."""
    w = conv.weight.detach()
    if isinstance(conv, WinogradReLUConv2d):  # (16, C_in, C_out): G g G^T of fresh 3x3 kernels
        c_in, c_out = conv.in_channels, conv.out_channels
        g = _he((c, c_in, 3, 3), (c_out + c) * 9, generator, w)
        _set_param(conv, "weight", torch.cat([w, spatial_to_winograd(g)], 2), change)
    else:
        c_out, c_in, kh, kw = w.shape
        _set_param(conv, "weight", torch.cat([w, _he((c, c_in, kh, kw), (c_out + c) * kh * kw, generator, w)], 0),
                   change)
    if conv.bias is not None:
        _set_param(conv, "bias", _padded(conv.bias.detach(), (c_out + c,)), change)
    conv.out_channels = c_out + c
    _grow_mask(conv)


def _grow_in(layer: nn.Module, c: int, change: Change) -> tuple:
    """Add ``c`` input channels with zero weights; returns the index of the new (live) entries."""
    w = layer.weight.detach()
    if isinstance(layer, WinogradReLUConv2d):
        c_in = layer.in_channels
        _set_param(layer, "weight", _padded(w, (16, c_in + c, w.shape[2])), change)
        index = (slice(None), slice(c_in, None))
    elif isinstance(layer, nn.Linear):
        c_in = layer.in_features
        _set_param(layer, "weight", _padded(w, (w.shape[0], c_in + c)), change)
        layer.in_features = c_in + c
        index = (slice(None), slice(c_in, None))
    else:
        c_in = layer.in_channels
        _set_param(layer, "weight", _padded(w, (w.shape[0], c_in + c, *w.shape[2:])), change)
        index = (slice(None), slice(c_in, None))
    if not isinstance(layer, nn.Linear):
        layer.in_channels = c_in + c
    _grow_mask(layer)
    return index


def _grow_bn(bn: nn.BatchNorm2d, c: int, change: Change) -> None:
    n = bn.num_features
    _set_param(bn, "weight", _padded(bn.weight.detach(), (n + c,), 1.0), change)
    _set_param(bn, "bias", _padded(bn.bias.detach(), (n + c,), 0.0), change)
    bn.running_mean = _padded(bn.running_mean, (n + c,), 0.0)
    bn.running_var = _padded(bn.running_var, (n + c,), 1.0)
    bn.num_features = n + c
    change.bn.append((bn, slice(n, n + c)))


def _grow_unit(unit: ResidualUnit, c: int, generator, change: Change) -> None:
    """Widen a residual unit from C to C + c channels: new output rows He-initialised over every input,
    old rows' weights from the new inputs zero (outgoing weights of the new channels: live), alpha 0."""
    conv, w = unit.conv, unit.conv.weight.detach()
    c_old = unit.alpha.numel()
    n = c_old + c
    if isinstance(conv, WinogradReLUConv2d):
        rows = spatial_to_winograd(_he((c, n, 3, 3), n * 9, generator, w))  # (16, n, c)
        new = torch.cat([_padded(w, (16, n, c_old)), rows], 2)
        live = (slice(None), slice(c_old, None), slice(0, c_old))
    else:
        kh, kw = w.shape[2:]
        rows = _he((c, n, kh, kw), n * kh * kw, generator, w)
        new = torch.cat([_padded(w, (c_old, n, kh, kw)), rows], 0)
        live = (slice(0, c_old), slice(c_old, None))
    p = _set_param(conv, "weight", new, change)
    conv.in_channels = conv.out_channels = n
    _grow_mask(conv)
    change.live.append((p, live))
    _grow_bn(unit.bn, c, change)
    _set_param(unit, "alpha", _padded(unit.alpha.detach(), (n,), 0.0), change)


def widen(model: SECNN, block: int, channels: int, *, generator: torch.Generator | None = None) -> Change:
    """Widen ``block`` of ``model`` by ``channels``, in place, preserving its function (module docstring)."""
    _check_model(model, block)
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    before = count_params(model)
    change = Change("widen", block, channels, before, before)
    b = model.blocks[block]
    _grow_out(b.conv, channels, generator, change)
    _grow_bn(b.bn, channels, change)
    for unit in b.layers:
        _grow_unit(unit, channels, generator, change)
    consumer = model.blocks[block + 1].conv if block + 1 < len(model.blocks) else model.head[-1]
    index = _grow_in(consumer, channels, change)
    change.live.append((consumer.weight, index))
    change.params_after = count_params(model)
    return change


def add_layer(model: SECNN, block: int, *, generator: torch.Generator | None = None) -> Change:
    """Append a residual unit (alpha 0) to ``block`` before its pooling, in place; the unit's conv is
    He-initialised from ``generator`` and is a Winograd-ReLU layer when the block's conv is one."""
    _check_model(model, block)
    b = model.blocks[block]
    before = count_params(model)
    c = b.bn.num_features
    ref = b.bn.weight
    with torch.random.fork_rng(devices=[]):  # the modules' default init draws are overwritten: not from the global RNG
        unit = ResidualUnit(c).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            unit.conv.weight.copy_(_he(unit.conv.weight.shape, c * 9, generator, ref))
        if isinstance(b.conv, WinogradReLUConv2d):
            unit.conv = WinogradReLUConv2d.from_conv2d(unit.conv, relu=True, impl=b.conv.impl)
    if any(hasattr(m, "weight_mask") for m in model.modules()):  # pruning masks: the new conv's, all kept
        unit.conv.register_buffer("weight_mask", torch.ones_like(unit.conv.weight))
    unit.train(b.training)
    b.layers.append(unit)
    change = Change("add_layer", block, 1, before, count_params(model))
    change.added = list(unit.parameters())
    change.live = [(unit.alpha, ())]
    change.bn = [(unit.bn, slice(0, c))]
    return change


def apply_op(model: SECNN, op: str, block: int, amount: int, generator: torch.Generator | None = None) -> Change:
    """``widen(model, block, amount)`` or ``add_layer(model, block)`` by name."""
    if op == "widen":
        return widen(model, block, amount, generator=generator)
    if op == "add_layer":
        return add_layer(model, block, generator=generator)
    raise ValueError(f"unknown expansion op {op!r}; choose one of: {', '.join(OPS)}")


@torch.no_grad()
def calibrate_new_bn(model: nn.Module, change: Change, x: torch.Tensor) -> None:
    """Set the running statistics of the expansion's new BN channels to their statistics on ``x``
    (one eval-mode forward; a BN's input is measured just before it runs, so later new channels see
    calibrated earlier ones).  The function is unchanged (new channels reach nothing); what changes
    is what the scoring -- eval-mode BN -- and the first evaluations see of the new channels: the
    normalisation training will give them, instead of mean 0 / var 1."""
    if not change.bn:
        return

    def hook(idx):
        def pre(module, args):
            mean, var = _channel_stats(args[0][:, idx])
            module.running_mean[idx] = mean.to(module.running_mean.dtype)
            module.running_var[idx] = var.to(module.running_var.dtype)
        return pre

    handles = [bn.register_forward_pre_hook(hook(idx)) for bn, idx in change.bn]
    try:
        with _eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# The natural expansion score
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """eta = sum gbar^2 / (F + lam) over ``numel`` entries; ``f_mean`` the mean F over them."""

    eta: float
    lam: float
    f_mean: float
    numel: int
    samples: int


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _winograd_plain_forward(self: WinogradReLUConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's eq. 2, Y = A^T [U . ReLU(B^T d B)] A per 4x4 tile (stride 2), in plain torch ops that
    ``torch.func`` transforms (slow, for the scoring only; the tests check it against the layer)."""
    n, c, h, w = x.shape
    u = self.weight.to(x.dtype)
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    d = torch.stack([torch.stack([xp[:, :, a:a + 2 * th:2, b:b + 2 * tw:2] for b in range(4)], -1)
                     for a in range(4)], -2)  # (N, C, th, tw, 4, 4): tile (y, x) at offset (a, b)
    bt, at = BT.to(x), AT.to(x)
    v = torch.einsum("ia,ncyxab,jb->ncyxij", bt, d, bt)
    if self.relu:
        v = torch.relu(v)
    m = torch.einsum("ncyxp,pck->nkyxp", v.reshape(n, c, th, tw, 16), u).reshape(n, k, th, tw, 4, 4)
    y = torch.einsum("ai,nkyxij,bj->nkyaxb", at, m, at).reshape(n, k, 2 * th, 2 * tw)[:, :, :h, :w]
    return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


@contextlib.contextmanager
def _vmappable(model: nn.Module) -> Iterator[None]:
    """Winograd-ReLU layers run as autograd Functions, which ``torch.func`` cannot transform: for the
    scoring they compute the same formula in plain torch ops."""
    layers = [m for m in model.modules() if isinstance(m, WinogradReLUConv2d)]
    for m in layers:
        m.forward = _winograd_plain_forward.__get__(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def natural_expansion_score(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, damping: float = 1e-3, lam: float | None = None,
    select: dict[str, tuple] | None = None, chunk: int = 256,
) -> Score:
    """eta = sum_j gbar_j^2 / (F_jj + lam) on the sample ``(x, y)`` (module docstring).

    ``select``: parameter name -> index of the entries to sum (``()`` the whole tensor); None: every
    trainable parameter.  ``lam``: the damping itself; None: ``damping * mean F`` over the selected
    entries.  Per-sample gradients with ``torch.func`` in chunks of ``chunk`` samples, BN in eval mode."""
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    if select is None:
        select = {n: () for n, p in named.items() if p.requires_grad}
    unknown = sorted(set(select) - set(named))
    if unknown:
        raise ValueError(f"select names unknown parameters {unknown}")
    n = int(x.shape[0])
    if n < 1 or int(y.shape[0]) != n:
        raise ValueError(f"need a non-empty sample with one label per image, got {tuple(x.shape)} / {tuple(y.shape)}")
    consts = {k: v.detach() for k, v in named.items()}
    consts.update(dict(model.named_buffers()))

    def loss(sel, xi, yi):
        out = functional_call(model, {**consts, **sel}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    s1: dict[str, torch.Tensor] = {}
    s2: dict[str, torch.Tensor] = {}
    with _eval_mode(model), _vmappable(model):
        for i in range(0, n, chunk):
            g = per_sample({k: consts[k] for k in select}, x[i:i + chunk], y[i:i + chunk])
            for k, idx in select.items():
                gk = g[k][(slice(None), *idx)].double()
                s1[k] = s1.get(k, 0) + gk.sum(0)
                s2[k] = s2.get(k, 0) + gk.square().sum(0)
    return _score_from_sums([[s1[k], s2[k]] for k in s1], n, damping=damping, lam=lam)


def _live_select(model: nn.Module, change: Change) -> dict[str, tuple]:
    names = {id(p): k for k, p in model.named_parameters()}
    return {names[id(p)]: idx for p, idx in change.live}


def candidate_increments(
    model: SECNN, candidates: Sequence[tuple[SECNN, Change]], x: torch.Tensor, y: torch.Tensor, *, lam: float,
    chunk: int = 256, calibration: int = 256, method: str = "auto",
) -> list[float]:
    """For each ``(expanded copy of model, its Change)``: the sum of gbar^2 / (F + lam) over the live new
    entries -- what the candidate adds to the current network's eta (module docstring), its new BN
    channels normalised by their statistics on ``x[:calibration]`` (:func:`calibrate_new_bn`).
    ``method``: see :func:`check_scores`."""
    method = _method(model, method)
    if method == "func":
        out = []
        for cand, change in candidates:
            calibrate_new_bn(cand, change, x[:calibration])
            out.append(natural_expansion_score(cand, x, y, lam=lam, select=_live_select(cand, change),
                                               chunk=chunk).eta)
        return out
    _, sums = _activation_pass(model, candidates, x, y, chunk=chunk, calibration=calibration, current=False)
    return [_eta(acc, int(x.shape[0]), lam) for acc in sums]


def check_scores(
    model: SECNN, candidates: Sequence[tuple[SECNN, Change]], x: torch.Tensor, y: torch.Tensor, *,
    damping: float = 1e-3, chunk: int = 256, calibration: int = 256, method: str = "auto",
) -> tuple[Score, list[float]]:
    """What one check needs: the current network's :class:`Score` (its lambda = ``damping`` * mean F) and
    each candidate's increment (:func:`candidate_increments`) at that lambda.

    ``method``: "func" -- :func:`natural_expansion_score` (``torch.func`` per-sample gradients) on the
    network and on each expanded copy's live entries: a per-sample forward and backward of every copy.
    "activations" -- every per-sample gradient from one eval-mode forward and backward of the current
    network per chunk (samples are independent with BN in eval mode, so the batch backward gives each
    sample's own gradient at every layer): a conv's per-sample weight gradient from its input and output
    gradient, a BN's and alpha's from theirs, and at the function-preserving start a candidate's live
    entries from the current network's gradient at the insertion point times the new units'
    activations (dL/dalpha = sum_hw dL/dz * BN(conv(relu(z))); an outgoing weight's, the consumer's
    per-sample weight gradient from the new channels' input).  The same numbers (the tests check both
    against a per-sample loop in float64) at a fraction of the cost.  "auto": "activations" for
    spatial networks, "func" with Winograd-ReLU layers."""
    if _method(model, method) == "func":
        current = natural_expansion_score(model, x, y, damping=damping, chunk=chunk)
        return current, candidate_increments(model, candidates, x, y, lam=current.lam, chunk=chunk,
                                             calibration=calibration, method="func")
    n = int(x.shape[0])
    cur, sums = _activation_pass(model, candidates, x, y, chunk=chunk, calibration=calibration, current=True)
    current = _score_from_sums(cur, n, damping=damping)
    return current, [_eta(acc, n, current.lam) for acc in sums]


def _method(model: nn.Module, method: str) -> str:
    winograd = any(isinstance(m, WinogradReLUConv2d) for m in model.modules())
    if method == "auto":
        return "func" if winograd else "activations"
    if method not in ("func", "activations"):
        raise ValueError(f"method {method!r}: choose auto, func or activations")
    if method == "activations" and winograd:
        raise ValueError("method 'activations' needs spatial convs; use 'func' for Winograd-ReLU layers")
    return method


def _eta(acc: list[list[torch.Tensor]] | None, n: int, lam: float) -> float:
    return sum(float(((a / n).square() / (b / n + lam)).sum()) for a, b in acc or ())


def _score_from_sums(acc: list[list[torch.Tensor]], n: int, *, damping: float, lam: float | None = None) -> Score:
    """:class:`Score` from per-entry sums [sum g, sum g^2] over ``n`` samples."""
    numel = sum(a.numel() for a, _ in acc)
    f_mean = sum(float(b.sum()) for _, b in acc) / n / max(numel, 1)
    if lam is None:
        lam = damping * f_mean
    if not lam > 0:
        raise ValueError(f"the damping lambda must be > 0, got {lam} (damping={damping}, mean F={f_mean})")
    return Score(eta=_eta(acc, n, lam), lam=float(lam), f_mean=f_mean, numel=numel, samples=n)


def _accumulate(acc: list | None, grads: list[torch.Tensor]) -> list:
    """Add a chunk's per-sample gradients (N, ...) to [sum g, sum g^2]: the chunk's sums in the
    gradients' dtype, the running sums in float64."""
    if acc is None:
        acc = [[torch.zeros(g.shape[1:], dtype=torch.float64, device=g.device) for _ in range(2)] for g in grads]
    for a, g in zip(acc, grads):
        a[0] += g.sum(0)
        a[1] += g.square().sum(0)
    return acc


def _activation_pass(model: SECNN, candidates, x, y, *, chunk: int, calibration: int, current: bool):
    """The "activations" method: sums [sum g, sum g^2] per entry of the current network (if ``current``)
    and of each candidate's live entries."""
    units: dict[int, list[int]] = {}  # block -> its add_layer candidates: their convs run as one
    for k, (_, change) in enumerate(candidates):
        if change.op == "add_layer":
            units.setdefault(change.block, []).append(k)
    # per block with new units: per sample sum_hw dL/dz * t and sum_hw dL/dz; the moments of t on the
    # calibration images (their BN statistics)
    acc = {b: {"gt": [], "gsum": [], "s": 0.0, "ss": 0.0, "m": 0} for b in units}
    stats: list = [None] * len(candidates)  # a widening's new BN channels' (mean, var) on x[:calibration]
    sums: list = [None] * len(candidates)
    cur = None
    with contextlib.ExitStack() as stack:
        for cand, _ in candidates:
            stack.enter_context(_eval_mode(cand))
        for i in range(0, int(x.shape[0]), chunk):
            rec = _capture(model, x[i:i + chunk], y[i:i + chunk], backward=True)
            if i == 0 and any(change.op == "widen" for _, change in candidates):
                calib = rec if calibration <= chunk else _capture(model, x[:calibration], y[:calibration], False)
                for k, (cand, change) in enumerate(candidates):
                    if change.op == "widen":
                        stats[k] = _channel_stats(_new_pre_bn(model, cand, change, calib)[:calibration])
                del calib
            if current:
                cur = _accumulate(cur, _param_grads(model, rec))
            for k, (cand, change) in enumerate(candidates):
                if change.op == "widen":
                    sums[k] = _accumulate(sums[k], _widen_grads(model, cand, change, stats[k], rec))
            for b, ks in units.items():
                gz, z, a = rec["gz"][b], rec["z"][b], acc[b]
                for j in range(0, len(z), _SUB):
                    t = _unit_convs(candidates, ks, z[j:j + _SUB])  # (n, G, C, H, W)
                    a["gt"].append((t * gz[j:j + _SUB].unsqueeze(1)).sum((3, 4)))
                    keep = min(len(t), calibration - (i + j))
                    if keep > 0:
                        tc = t[:keep].double()
                        a["s"] = a["s"] + tc.sum((0, 3, 4))
                        a["ss"] = a["ss"] + tc.square().sum((0, 3, 4))
                        a["m"] += keep * t.shape[3] * t.shape[4]
                a["gsum"].append(gz.sum((2, 3)))
    for b, ks in units.items():
        # x + alpha * r, r = BN(t) = (t - mean) * scale + beta: dL/dalpha = sum_hw dL/dz * r, per channel
        a = acc[b]
        gt, gsum = torch.cat(a["gt"]), torch.cat(a["gsum"])  # (N, G, C), (N, C)
        mean = a["s"] / a["m"]
        var = (a["ss"] - a["s"] * mean) / (a["m"] - 1)  # unbiased, as calibrate_new_bn
        for g, k in enumerate(ks):
            bn, idx = candidates[k][1].bn[0]
            scale = (bn.weight[idx].detach() / torch.sqrt(var[g].to(gt.dtype) + bn.eps))
            grad = scale * (gt[:, g] - mean[g].to(gt.dtype) * gsum) + bn.bias[idx].detach() * gsum
            sums[k] = _accumulate(None, [grad])
    return cur, sums


_SUB = 32  # samples per convolution of the new units: t stays in cache for the product (2x faster than 256)


def _unit_convs(candidates, ks: list[int], z: torch.Tensor) -> torch.Tensor:
    """(N, G, C, H, W): the new units' conv outputs ``conv(relu(z))`` of the add_layer candidates ``ks``
    (all of one block), as one convolution with their weights stacked."""
    convs = [candidates[k][0].blocks[candidates[k][1].block].layers[-1].conv for k in ks]
    w = torch.cat([c.weight.detach() for c in convs])
    c0 = convs[0]
    t = F.conv2d(F.relu(z), w, None, c0.stride, c0.padding, c0.dilation)
    return t.view(t.shape[0], len(ks), -1, *t.shape[2:])


def _channel_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (dim 1) mean and unbiased variance over samples and positions (in h's dtype)."""
    var, mean = torch.var_mean(h.detach(), dim=(0, 2, 3), unbiased=True)
    return mean, var


def _capture(model: SECNN, x: torch.Tensor, y: torch.Tensor, backward: bool) -> dict:
    """One eval-mode forward of the current network recording every conv's, BN's, linear layer's and
    residual unit's input ("in") and output ("out") by module, and each block's pool input ("z", by
    block); with ``backward`` also the gradients of the summed loss -- each sample's own -- with respect
    to every recorded output ("g") and pool input ("gz")."""
    rec: dict = {"in": {}, "out": {}, "z": {}}

    def keep(module, args, out):
        rec["in"][module], rec["out"][module] = args[0], out

    handles = [m.register_forward_hook(keep) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ResidualUnit))]
    for b, block in enumerate(model.blocks):
        handles.append(block.pool.register_forward_hook(
            lambda module, args, out, b=b: rec["z"].__setitem__(b, args[0])))
    try:
        with _eval_mode(model), torch.set_grad_enabled(backward):
            logits = model(x)
            if backward:
                outs = list(rec["out"].items()) + [(("z", b), z) for b, z in rec["z"].items()]
                grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [t for _, t in outs])
                rec["g"] = {k: g for (k, _), g in zip(outs, grads) if not isinstance(k, tuple)}
                rec["gz"] = {k[1]: g for (k, _), g in zip(outs, grads) if isinstance(k, tuple)}
    finally:
        for h in handles:
            h.remove()
    return {k: {m: t.detach() for m, t in v.items()} for k, v in rec.items()}


def _conv_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) if isinstance(conv, ReLUConv2d) else x


def _per_sample_conv_weight_grad(conv: nn.Conv2d, inp: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """(N, C_out, C_in * kh * kw): each sample's gradient of a conv's weight, from its input and output grad."""
    cols = F.unfold(inp, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return torch.einsum("nol,nkl->nok", gy.flatten(2), cols)


@torch.no_grad()
def _param_grads(model: SECNN, rec: dict) -> list[torch.Tensor]:
    """Per-sample gradients (N, *shape) of every trainable parameter of the current network."""
    grads: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            g = rec["g"][m]
            w = _per_sample_conv_weight_grad(m, _conv_input(m, rec["in"][m]), g)
            grads[id(m.weight)] = w.view(w.shape[0], *m.weight.shape)
            if m.bias is not None:
                grads[id(m.bias)] = g.sum((2, 3))
        elif isinstance(m, nn.BatchNorm2d):
            g = rec["g"][m]  # d gamma = sum_hw g * (x - mean) / sqrt(var + eps), without the normalised x
            gsum = g.sum((2, 3))
            gx = torch.einsum("nchw,nchw->nc", g, rec["in"][m])
            grads[id(m.weight)] = (gx - m.running_mean * gsum) / torch.sqrt(m.running_var + m.eps)
            grads[id(m.bias)] = gsum
        elif isinstance(m, nn.Linear):
            g = rec["g"][m]
            grads[id(m.weight)] = g[:, :, None] * rec["in"][m][:, None, :]
            if m.bias is not None:
                grads[id(m.bias)] = g
        elif isinstance(m, ResidualUnit):
            grads[id(m.alpha)] = (rec["g"][m] * rec["out"][m.bn]).sum((2, 3))
    params = [p for p in model.parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grads]
    if missing:
        raise ValueError(f"method 'activations' has no per-sample gradient for {missing}; use method 'func'")
    return [grads[id(p)] for p in params]


def _new_pre_bn(model: SECNN, cand: SECNN, change: Change, rec: dict) -> torch.Tensor:
    """A widening's new channels before their BN: the block conv's new rows on the block's input."""
    conv = cand.blocks[change.block].conv
    old = conv.out_channels - change.amount
    w = conv.weight[old:].detach()
    bias = None if conv.bias is None else conv.bias[old:].detach()
    inp = rec["in"][model.blocks[change.block].conv]
    return F.conv2d(_conv_input(conv, inp), w, bias, conv.stride, conv.padding, conv.dilation)


@torch.no_grad()
def _widen_grads(model: SECNN, cand: SECNN, change: Change, stats, rec: dict) -> list[torch.Tensor]:
    """Per-sample gradients (N, ...) of a widening's live entries, in the order of ``change.live``."""
    b = change.block
    block = cand.blocks[b]
    bn, idx = change.bn[0]
    mean, var = (t.to(rec["out"][model.head[-1]].dtype).view(1, -1, 1, 1) for t in stats)
    scale = (bn.weight[idx] / torch.sqrt(var.view(-1) + bn.eps)).view(1, -1, 1, 1)
    new = (_new_pre_bn(model, cand, change, rec) - mean) * scale + bn.bias[idx].view(1, -1, 1, 1)  # BN'd
    grads = []
    inp = F.relu(new)  # the new channels pass every unit unchanged (alpha 0): each unit conv sees relu(new)
    for unit, cur_unit in zip(block.layers, model.blocks[b].layers):
        g = _per_sample_conv_weight_grad(unit.conv, inp, rec["g"][cur_unit.conv])
        grads.append(g.view(g.shape[0], g.shape[1], change.amount, *unit.conv.kernel_size))
    pooled = block.pool(new)
    if b + 1 < len(cand.blocks):
        consumer = cand.blocks[b + 1].conv
        g = _per_sample_conv_weight_grad(consumer, _conv_input(consumer, pooled), rec["g"][model.blocks[b + 1].conv])
        grads.append(g.view(g.shape[0], g.shape[1], change.amount, *consumer.kernel_size))
    else:
        feat = cand.head[:-1](pooled)  # ReLU, global pool, flatten, dropout (eval): the classifier's input
        grads.append(rec["g"][model.head[-1]][:, :, None] * feat[:, None, :])
    return grads


def scoring_sample(split: Any, mean, std, n: int, seed: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``min(n, len(split))`` training images drawn without replacement by ``seed``, normalised as the
    trainer's batches are: ``(x, y, indices)`` (a ``data.Split`` of the training split, never val/test)."""
    from .data import normalizer

    rng = np.random.default_rng([int(seed), 0x5ECC])
    idx = np.sort(rng.choice(len(split.labels), size=min(int(n), len(split.labels)), replace=False))
    scale, shift = normalizer(mean, std, torch.device(device))
    x = torch.from_numpy(np.ascontiguousarray(split.images[idx])).to(device)
    y = torch.from_numpy(np.ascontiguousarray(split.labels[idx])).to(device)
    return torch.addcmul(shift, x.float(), scale), y, idx


# --------------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------------
def _carry(v: Any, old_shape: torch.Size, new_shape: torch.Size) -> Any:
    if torch.is_tensor(v):
        if v.shape == old_shape and old_shape != new_shape:
            return _padded(v, new_shape, 0.0)
        return v.clone()
    return copy.deepcopy(v)


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                          change: Change | None) -> torch.optim.Optimizer:
    """``new`` (built over the expanded model's parameters, same param groups as ``old``) with ``old``'s
    hyperparameters per group and its state: unchanged parameters keep theirs, a grown parameter gets
    its old state with every per-element tensor (momentum, Adam moments) padded with zeros at the new
    entries (scalars such as Adam's ``step`` kept), new parameters start with none (fresh).  With Adam
    a grown tensor's new entries thus start with zero moments but the tensor's step count: their first
    update is about 1/sqrt(1 - beta2) times a fresh one's."""
    if len(old.param_groups) != len(new.param_groups):
        raise ValueError(f"the new optimizer has {len(new.param_groups)} param groups, the old one "
                         f"{len(old.param_groups)}: build both the same way")
    for go, gn in zip(old.param_groups, new.param_groups):
        gn.update({k: copy.deepcopy(v) for k, v in go.items() if k != "params"})
    grown = {id(o): n for o, n in (change.grown if change is not None else ())}
    present = {id(p) for g in new.param_groups for p in g["params"]}
    for p, st in old.state.items():
        target = grown.get(id(p), p)
        if id(target) in present and st:
            new.state[target] = {k: _carry(v, p.shape, target.shape) for k, v in st.items()}
    return new


# --------------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateScore:
    """One candidate of a check: ``eta`` on the expanded network, ``score = eta * penalty``,
    ``ratio = score / eta_current``; ``init`` the initialisation's index (add_layer) or 0."""

    op: str
    block: int
    amount: int
    init: int
    params_added: int
    eta: float
    penalty: float
    score: float
    ratio: float

    def label(self) -> str:
        if self.op == "widen":
            return f"widen block {self.block} by {self.amount}"
        return f"add layer to block {self.block} (init {self.init})"


@dataclass(frozen=True)
class ExpansionDecision:
    """The record of one check.  ``op`` None: no expansion (then ``block`` etc. name the best candidate,
    if any).  ``decision``: one line, e.g. "widen block 2 by 4: eta ratio 2.31 > tau 2.0".
    ``seconds`` (the check's wall time) and ``change`` (the applied :class:`Change`, for
    :func:`carry_optimizer_state`; not saved) take no part in comparisons."""

    epoch: int
    op: str | None
    block: int | None
    amount: int | None
    init: int | None
    params_before: int
    params_after: int
    score_current: float
    score_best: float | None
    ratio: float | None
    tau: float
    lam: float
    candidates: tuple[CandidateScore, ...]
    decision: str
    architecture: dict
    seconds: float = field(default=0.0, compare=False)
    change: Change | None = field(default=None, compare=False, repr=False)

    @property
    def expanded(self) -> bool:
        return self.op is not None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "change"}
        d["candidates"] = [dataclasses.asdict(c) for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExpansionDecision":
        d = dict(d)
        d["candidates"] = tuple(CandidateScore(**c) for c in d["candidates"])
        return cls(**d)


_OP_CODES = {"widen": 1, "add_layer": 2}


def _generator(seed: int, epoch: int, op: str, block: int, init: int) -> torch.Generator:
    s = np.random.SeedSequence([int(seed), int(epoch), _OP_CODES[op], int(block), int(init)])
    return torch.Generator().manual_seed(int(s.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))


class GrowthController:
    """Decides, at the end of an epoch, whether and how ``secnn`` grows (module docstring).

    ``settings``: an ``ExpansionConfig`` (or any object with its fields); ``x``, ``y``: the fixed scoring
    sample (normalised training images and labels, :func:`scoring_sample`); ``seed``: the run's seed;
    ``stop_epoch``: no check at or after this epoch (the trainer: the last dense epoch, so that every
    expansion is trained).  The trainer calls :meth:`step` every epoch, carries the optimizer state
    over after an expansion, and checkpoints :meth:`state_dict`."""

    def __init__(self, settings: Any, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
                 stop_epoch: int | None = None, sample_indices: Sequence[int] | None = None, method: str = "auto"):
        self.cfg = settings
        self.method = method  # how candidates are scored: candidate_increments
        self.x, self.y = x, y
        self.seed = int(seed)
        self.stop_epoch = stop_epoch
        self.sample_indices = None if sample_indices is None else [int(i) for i in sample_indices]
        self.ops: list[dict] = []  # applied expansions, in order: {"epoch", "op", "block", "amount", "init"}
        self.history: list[ExpansionDecision] = []  # every check
        self.last_expansion: int | None = None
        self.base_architecture: dict | None = None

    # -- construction from a trial's config ---------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, data: Any, device: torch.device | str = "cpu") -> "GrowthController":
        """From a ``TrainConfig`` (``cfg.expansion``, ``cfg.seed``, ``cfg.epochs``) and the trial's
        ``DatasetBundle``: the scoring sample is ``cfg.expansion.score_samples`` images of the training
        split, drawn by the seed."""
        e = cfg.expansion
        x, y, idx = scoring_sample(data.train, data.mean, data.std, e.score_samples, cfg.seed, device)
        return cls(e, x, y, seed=cfg.seed, stop_epoch=cfg.epochs - 1, sample_indices=idx)

    # -- when ---------------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether the check runs at the end of ``epoch`` (0-based)."""
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return False
        if (epoch + 1) % self.cfg.check_every:
            return False
        return self.last_expansion is None or epoch - self.last_expansion >= self.cfg.cooldown

    # -- the check ----------------------------------------------------------------------------------
    def step(self, model: SECNN, epoch: int) -> ExpansionDecision | None:
        """At the end of ``epoch``: None when no check is due; else :meth:`decide` and :meth:`commit`
        -- ``model`` grows in place if the decision says so -- and the decision, whose ``change`` is the
        applied :class:`Change` (for :func:`carry_optimizer_state`), None without an expansion."""
        decision = self.decide(model, epoch)
        if decision is None:
            return None
        change = self.commit(model, decision)
        return dataclasses.replace(self.history[-1], change=change)

    def decide(self, model: SECNN, epoch: int) -> ExpansionDecision | None:
        """The check alone: score the network and the candidates, choose; ``model`` and the controller's
        state are left as they are (a trainer that closes a level before growing evaluates and saves the
        network here, then calls :meth:`commit`).  None when no check is due at ``epoch``."""
        if not self.due(epoch):
            return None
        t0 = time.perf_counter()
        cfg = self.cfg
        arch = model.architecture()
        before = count_params(model)
        options, copies = [], []
        for b in range(len(model.blocks)):
            ops = []
            if arch["widths"][b] + cfg.widen_channels <= cfg.max_width:
                ops.append(("widen", cfg.widen_channels, 0))
            if arch["layers"][b] < cfg.max_layers_per_block:
                ops += [("add_layer", 1, i) for i in range(cfg.n_init)]
            for op, amount, init in ops:
                cand = copy.deepcopy(model)
                change = apply_op(cand, op, b, amount, _generator(self.seed, epoch, op, b, init))
                if change.params_after <= cfg.max_params:
                    options.append((op, b, amount, init, change.params_added))
                    copies.append((cand, change))
        current, incs = check_scores(model, copies, self.x, self.y, damping=cfg.damping, chunk=cfg.score_chunk,
                                     calibration=cfg.calibration_samples, method=self.method)
        grown_arch = [cand.architecture() for cand, _ in copies]
        del copies
        cands = [self._scored(current, *o, inc) for o, inc in zip(options, incs)]
        k = max(range(len(cands)), key=lambda i: cands[i].score) if cands else None  # first of equals
        best = cands[k] if cands else None
        grow = best is not None and best.ratio > cfg.tau
        if best is None:
            text = "no expansion: no candidate within the limits"
        elif grow:
            text = f"{best.label()}: eta ratio {best.ratio:.3g} > tau {cfg.tau:g}"
        else:
            text = f"no expansion: best {best.label()}, eta ratio {best.ratio:.3g} <= tau {cfg.tau:g}"
        return ExpansionDecision(
            epoch=epoch, op=best.op if grow else None, block=best.block if best else None,
            amount=best.amount if best else None, init=best.init if best else None, params_before=before,
            params_after=before + (best.params_added if grow else 0), score_current=current.eta,
            score_best=best.score if best else None, ratio=best.ratio if best else None, tau=float(cfg.tau),
            lam=current.lam, candidates=tuple(cands), decision=text,
            architecture=grown_arch[k] if grow else arch, seconds=time.perf_counter() - t0)

    def commit(self, model: SECNN, decision: ExpansionDecision) -> Change | None:
        """Record ``decision`` (from :meth:`decide` on this ``model``) and, if it expands, apply it: the
        operation with the candidate's initialisation, the new BN channels calibrated on the scoring
        sample.  Returns the applied :class:`Change`, None without an expansion."""
        if self.history and decision.epoch <= self.history[-1].epoch:
            raise ValueError(f"decision of epoch {decision.epoch} after one of epoch {self.history[-1].epoch}")
        if self.base_architecture is None:  # the first check committed: the network is the seed network
            self.base_architecture = copy.deepcopy(model.architecture())
        change = None
        if decision.expanded:
            t0 = time.perf_counter()
            change = apply_op(model, decision.op, decision.block, decision.amount,
                              _generator(self.seed, decision.epoch, decision.op, decision.block, decision.init))
            calibrate_new_bn(model, change, self.x[: self.cfg.calibration_samples])
            if change.params_after != decision.params_after or model.architecture() != decision.architecture:
                raise ValueError(f"the decision ({decision.decision}) was made for another network")
            self.ops.append({"epoch": decision.epoch, "op": decision.op, "block": decision.block,
                             "amount": decision.amount, "init": decision.init})
            self.last_expansion = decision.epoch
            decision = dataclasses.replace(decision, seconds=decision.seconds + time.perf_counter() - t0)
        self.history.append(dataclasses.replace(decision, change=None))
        return change

    def _scored(self, current: Score, op: str, block: int, amount: int, init: int, dp: int,
                inc: float) -> CandidateScore:
        eta = current.eta + inc
        penalty = math.exp(-self.cfg.penalty * float(dp) ** 2)
        score = eta * penalty
        ratio = score / current.eta if current.eta > 0 else (math.inf if score > 0 else 0.0)
        return CandidateScore(op=op, block=block, amount=amount, init=init, params_added=dp, eta=eta,
                              penalty=penalty, score=score, ratio=ratio)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python: the operations applied, every decision, the last expansion's epoch, the
        architectures before and after growth, the scoring sample's indices."""
        return {"version": 1, "seed": self.seed, "ops": copy.deepcopy(self.ops),
                "history": [d.to_dict() for d in self.history], "last_expansion": self.last_expansion,
                "base_architecture": copy.deepcopy(self.base_architecture),
                "sample_indices": self.sample_indices}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"expansion state of version {state.get('version')!r}; this code reads version 1")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"expansion state of seed {state['seed']}, this controller's seed is {self.seed}")
        if (self.sample_indices is not None and state.get("sample_indices") is not None
                and list(state["sample_indices"]) != self.sample_indices):
            raise ValueError("expansion state was scored on another sample of the training split")
        self.ops = copy.deepcopy(list(state["ops"]))
        self.history = [ExpansionDecision.from_dict(d) for d in state["history"]]
        self.last_expansion = state["last_expansion"]
        self.base_architecture = copy.deepcopy(state["base_architecture"])

    def rebuild(self, model: SECNN) -> SECNN:
        """Replay the applied operations on a freshly built seed ``model`` (in place; returns it), so
        that the checkpoint's weights, BN statistics and optimizer state fit; the values drawn here are
        overwritten by ``model.load_state_dict``.  Call before building the optimizer."""
        if self.base_architecture is not None and model.architecture() != self.base_architecture:
            raise ValueError(f"rebuild needs the seed network {self.base_architecture}, got {model.architecture()}")
        for op in self.ops:
            apply_op(model, op["op"], op["block"], op["amount"],
                     _generator(self.seed, op["epoch"], op["op"], op["block"], op["init"]))
        return model

    @property
    def expansions(self) -> list[ExpansionDecision]:
        return [d for d in self.history if d.expanded]
