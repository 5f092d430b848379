"""How a trial compresses its model along a ladder: one small strategy per kind of ladder.

What this gives the trainer: ``train.py`` runs the dense epochs, then one rung of ``retrain_epochs``
per ladder value, and knows nothing of masks or bases.  It asks its :class:`Compression` to

* ``start_rung(model, i, optimizer)`` at a rung's first epoch: compress one step; True when the
  model's parameters were replaced (the trainer then rebuilds the optimizer and retakes the divergence
  guard's snapshot, whose state dict would no longer fit the model);
* ``begin_epoch(model, epoch)`` before every epoch: which parameters train and the learning-rate
  scale, derived from the epoch alone, so a resumed run sets exactly what the uninterrupted one did;
* ``after_step(optimizer)`` after every optimizer step (pruning: masked weights back to zero);
* ``restore_structure(model, state_dict)`` before a checkpoint is loaded (data-dependent layer shapes),
  ``state_dict()`` / ``load_state_dict()`` for what it decided (travels in the checkpoint);
* ``start_metrics(model, i, evaluate)`` right after compressing, when ``evaluate_at_start``;
* ``rung_key(i)``, ``epoch_fields(epoch)``, ``layer_sparsity()`` for the records.

:class:`SparsityLadder` is magnitude pruning (spec §3, :class:`~esdbs_ray.pruning.Pruner`);
:class:`BasisLadder` is BasisConv's eigen ladder (:mod:`esdbs_ray.basisconv`) with the
paper's two-step fine-tuning inside each rung; :class:`Dense` trains without a ladder (also
``conv: basis_random``, whose random bases are fixed from the first epoch).

**Rung identity** : the pair ``(target_sparsity, basis_threshold)``.  A
sparsity rung is ``(s, None)``, the dense rung ``(0.0, None)``, a basis rung ``(0.0, t)``: it prunes
nothing, so its target sparsity is honestly 0, and its threshold t tells the rungs apart.  The pair is
in every rung record, in the Parquet predictions (column ``basis_threshold``, written only by basis
rungs so sparsity files keep schema 1's layout; file ``<member>-bt0900.parquet`` beside
``<member>-ts0800.parquet``) and in stacking's rung selection (``basis_threshold=``; the "last rung" of
a basis member is its smallest t).

**Counts** (:func:`rung_counts`, every rung of every trial): multiplications by nonzero conv weights
for one image -- spatial convs: nonzero weights x output pixels; Winograd-ReLU layers: nonzero
Winograd-domain weights x tiles (the element-wise products of eq. 2; the transforms multiply by
constants and are not counted); BasisConv: Q N P + K Q P (the paper's count, section 2.1) -- beside
the dense spatial network the model stands for, so the compression methods can be compared at equal
multiplications; plus, for models with BasisConv layers, retained filters and learnable parameters per
layer and in total (:func:`esdbs_ray.basisconv.compression_report`).

Evidence: ``tests/test_train.py`` (a basis ladder yields one rung per t with fewer retained filters at
each, predictions per rung; resumed in the middle of a rung it equals the uninterrupted run;
``basis_random`` trains with its bases untouched) and ``tests/test_compression.py`` (the counts against
hand-computed formulas for spatial, masked, Winograd and BasisConv layers).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .basisconv import (BasisConv2d, basis_layers, compression_report, conv_units, filter_spectrum,
                        is_basis_eligible, layer_counts, output_sizes, retained_count, set_fine_tuning_stage,
                        to_basisconv, to_basisconv_like)

__all__ = ["Compression", "Dense", "SparsityLadder", "BasisLadder", "build_compression", "conv_cost",
           "rung_counts"]


class Compression:
    """No ladder: every hook is a no-op (the base class the ladders override)."""

    kind = "dense"
    evaluate_at_start = False  # evaluate right after compressing, before any fine-tuning (basis: Fig. 2)

    def __init__(self, cfg, model: nn.Module):
        self.cfg = cfg

    def restore_structure(self, model: nn.Module, state_dict: dict) -> None:
        pass

    def start_rung(self, model: nn.Module, rung: int, optimizer) -> bool:
        return False

    def begin_epoch(self, model: nn.Module, epoch: int) -> float:
        return 1.0

    def after_step(self, optimizer) -> None:
        pass

    def start_metrics(self, model: nn.Module, rung: int, evaluate) -> dict:
        """Fields for the rung record measured right after ``start_rung`` (``evaluate(model)`` gives
        {"val_accuracy", "test_accuracy"}); only called when ``evaluate_at_start``."""
        return {}

    def rung_key(self, rung: int) -> dict:
        return {"target_sparsity": 0.0, "basis_threshold": None}

    def epoch_fields(self, epoch: int) -> dict:
        return {"target_sparsity": self.rung_key(self.cfg.rung_of(epoch))["target_sparsity"]}

    def layer_sparsity(self) -> dict:
        return {}

    def state_dict(self) -> dict | None:
        """What the strategy decided that a resumed run must reuse (saved in the checkpoint's state)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


Dense = Compression


class SparsityLadder(Compression):
    """Magnitude pruning to ``sparsity_ladder[i]`` at rung i; masks only shrink (spec §3)."""

    kind = "sparsity"

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        from .pruning import Pruner

        self.pruner = Pruner(model)  # registers the mask buffers now, so a checkpoint's keys match

    def start_rung(self, model: nn.Module, rung: int, optimizer) -> bool:
        self.pruner.prune_to(self.cfg.sparsity_ladder[rung])
        self.pruner.apply_(optimizer)  # momentum of the newly pruned weights goes too
        return False

    def after_step(self, optimizer) -> None:
        self.pruner.apply_(optimizer)

    def rung_key(self, rung: int) -> dict:
        return {"target_sparsity": self.cfg.sparsity_ladder[rung] if rung >= 0 else 0.0, "basis_threshold": None}

    def layer_sparsity(self) -> dict:
        return self.pruner.report()["layers"]


class BasisLadder(Compression):
    """BasisConv's eigen ladder (paper sections 2.1, 4.2-4.3), t keeping the paper's meaning.

    At the first rung the trained spatial model fixes, per eligible conv and per t of ``basis.ladder``,
    Q_l(t): the smallest count of eigenvectors of *that* layer's filters whose eigenvalues reach the
    share t (section 4.2).  Rung i then truncates every layer to its leading Q_l(t_i) eigen-directions:
    the spatial conv at rung 0, the previous rung's fine-tuned BasisConv layer (re-decomposed from its
    effective filters) after that.  So "t = 0.9" retains what the paper's t = 0.9 retains on the trained
    network, not 0.9 of an already truncated layer's energy (a ladder of relative shares would compound:
    1.0, 0.95, 0.9, 0.85 would end near 0.73).  Within the rung, step one trains the 1x1 coefficients
    for ``basis.stage1_epochs``, step two every non-basis parameter (section 4.3).

    Recorded per rung (``start_metrics``): the accuracy right after the truncation, before any
    fine-tuning of the rung, and -- computed once, at the first rung, from a copy of the trained spatial
    model -- the direct conversion at each t without fine-tuning: the paper's Fig. 2 curve and the
    pre-fine-tuning column of its Table 2.
    """

    kind = "basis"
    evaluate_at_start = True

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.plan: dict | None = None  # {"q": {layer: [Q_l(t) per rung]}, "direct": [metrics per t] | None}
        self._spatial: nn.Module | None = None  # the trained spatial model, until its direct conversions ran

    def state_dict(self) -> dict:
        return {"plan": self.plan}

    def load_state_dict(self, state: dict | None) -> None:
        self.plan = (state or {}).get("plan")

    def restore_structure(self, model: nn.Module, state_dict: dict) -> None:
        to_basisconv_like(model, state_dict)  # a checkpoint's Q per layer cannot be re-derived

    def start_rung(self, model: nn.Module, rung: int, optimizer) -> bool:
        ladder = self.cfg.basis.ladder
        if self.plan is None:  # rung 0: the trained spatial model decides every rung's Q per layer
            self._spatial = copy.deepcopy(model)
            convs = [(n, m) for n, m in model.named_modules() if is_basis_eligible(m, self.cfg.basis.layers)]
            q = {}
            for name, conv in convs:
                lam, _, rank = filter_spectrum(conv.weight)
                q[name] = [retained_count(lam, t, rank) for t in ladder]
            self.plan = {"q": q, "direct": None}
            layers = [(n, BasisConv2d.from_conv(m, rank=q[n][rung])) for n, m in convs]
        else:  # later rungs: the fine-tuned layer's own leading directions, never more than it has
            layers = [(n, m.recompress(rank=min(self.plan["q"][n][rung], m.num_basis))) for n, m in basis_layers(model)]
        for name, layer in layers:
            layer.threshold = ladder[rung]
            _set_module(model, name, layer)
        return True  # new modules, new parameter objects

    def start_metrics(self, model: nn.Module, rung: int, evaluate) -> dict:
        out = {"before_finetune": evaluate(model)}
        if self._spatial is not None:
            self.plan["direct"] = [evaluate(to_basisconv(copy.deepcopy(self._spatial), threshold=t,
                                                         which=self.cfg.basis.layers))
                                   for t in self.cfg.basis.ladder]
            self._spatial = None
        if self.plan.get("direct"):
            out["direct_conversion"] = self.plan["direct"][rung]
        return out

    def _stage(self, epoch: int) -> int | None:
        rung = self.cfg.rung_of(epoch)
        if rung < 0:
            return None
        return 1 if epoch - self.cfg.rung_starts()[rung] < self.cfg.basis.stage1_epochs else 2

    def begin_epoch(self, model: nn.Module, epoch: int) -> float:
        stage = self._stage(epoch)
        if stage is None:
            return 1.0
        # Frozen parameters get no gradient, so the optimizer (over all parameters) skips them: no
        # momentum, no weight decay.  requires_grad is not in a state dict: set from the epoch every time.
        set_fine_tuning_stage(model, stage)
        return self.cfg.basis.stage1_lr_scale if stage == 1 else self.cfg.basis.stage2_lr_scale

    def rung_key(self, rung: int) -> dict:
        return {"target_sparsity": 0.0, "basis_threshold": self.cfg.basis.ladder[rung] if rung >= 0 else None}

    def epoch_fields(self, epoch: int) -> dict:
        return {**super().epoch_fields(epoch), "basis_threshold": self.rung_key(self.cfg.rung_of(epoch))["basis_threshold"],
                "fine_tuning_stage": self._stage(epoch)}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build_compression(cfg, model: nn.Module) -> Compression:
    """The strategy for ``cfg`` (a TrainConfig): at most one of its ladders is set (config.py checks)."""
    if cfg.sparsity_ladder:
        return SparsityLadder(cfg, model)
    if cfg.basis.ladder:
        return BasisLadder(cfg, model)
    return Dense(cfg, model)


# --------------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def conv_cost(model: nn.Module, input_shape) -> dict:
    """Per image, summed over every convolution (see the module docstring for what is counted):
    ``conv_mults`` multiplications by nonzero weights, ``conv_weights`` nonzero learnable conv
    parameters (BasisConv: coefficients, bias and batch norm; the fixed basis is not learnable),
    ``filters`` (BasisConv: the retained Q), each beside ``dense_*``, the dense spatial network the
    model stands for; ``mult_ratio`` = conv_mults / dense_conv_mults."""
    from .winograd import WinogradReLUConv2d

    units = conv_units(model, (BasisConv2d, WinogradReLUConv2d, nn.Conv2d))
    out_hw = output_sizes(model, units, input_shape)
    t = dict.fromkeys(("conv_mults", "dense_conv_mults", "conv_weights", "dense_conv_weights", "filters",
                       "dense_filters"), 0)
    for name, m in units:
        if name not in out_hw:  # a layer the forward pass does not reach
            continue
        h, w = out_hw[name]
        bias = 0 if getattr(m, "bias", None) is None else m.bias.numel()
        if isinstance(m, BasisConv2d):
            r = layer_counts(m, (h, w))
            row = (r["mults"], r["original_mults"], r["learnable"], r["original_learnable"], r["retained_filters"],
                   r["original_filters"])
        elif isinstance(m, WinogradReLUConv2d):
            # weight U is (16, C_in, C_out): each nonzero entry multiplies one transformed input value
            # per 2x2 output tile (odd sizes are padded to whole tiles, as the layer computes them).
            tiles = math.ceil(h / 2) * math.ceil(w / 2)
            nnz = int(torch.count_nonzero(m.weight))
            dense = 9 * m.in_channels * m.out_channels
            row = (nnz * tiles, dense * h * w, nnz + bias, dense + bias, m.out_channels, m.out_channels)
        else:
            nnz = int(torch.count_nonzero(m.weight))
            row = (nnz * h * w, m.weight.numel() * h * w, nnz + bias, m.weight.numel() + bias, m.out_channels,
                   m.out_channels)
        for key, v in zip(t, row):
            t[key] += int(v)
    t["mult_ratio"] = t["conv_mults"] / t["dense_conv_mults"] if t["dense_conv_mults"] else None
    return t


def basis_counts(model: nn.Module, input_shape) -> dict | None:
    """Retained filters, multiplications and learnable parameters of a model with BasisConv layers
    (None without): per layer (Q, K, N, the eigenvalue share kept) and the conv / whole-model totals of
    :func:`~esdbs_ray.basisconv.compression_report` against the spatial model it stands for."""
    if not basis_layers(model):
        return None
    rep = compression_report(model, input_shape)
    t, m = rep["totals"], rep["model"]
    return {
        "layers": {n: {"kind": r["kind"], "Q": r["retained_filters"], "K": r["original_filters"], "N": r["N"],
                       "energy": r["energy"]} for n, r in rep["layers"].items() if r["kind"] != "spatial"},
        "basis_layers": rep["basis_totals"]["layers"],
        "retained_filters": t["retained_filters"], "original_filters": t["original_filters"],
        "filter_ratio": t["filter_ratio"], "conv_mults": t["mults"], "original_conv_mults": t["original_mults"],
        "mult_ratio": t["mult_ratio"], "conv_learnable": t["learnable"],
        "original_conv_learnable": t["original_learnable"], "conv_learnable_reduction": t["learnable_reduction"],
        "paper_learnable_reduction": t["paper_learnable_reduction"], "model_learnable": m["learnable"],
        "original_model_learnable": m["original_learnable"], "model_learnable_reduction": m["learnable_reduction"],
    }


def rung_counts(model: nn.Module, input_shape) -> dict:
    """What a rung record carries beside accuracy: :func:`conv_cost` (flat) and ``basis`` (or None)."""
    return {**conv_cost(model, input_shape), "basis": basis_counts(model, input_shape)}
