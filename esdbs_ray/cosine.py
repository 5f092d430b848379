"""Linear warm-up, then cosine decay: a fixed-batch schedule whose learning rate moves every step.

The third schedule kind beside ``fixed`` and ``dbs`` (the trainer builds it when ``lr_schedule: cosine``), with their
interface -- :meth:`CosineSchedule.plan` / :meth:`~CosineSchedule.step` / ``state_dict`` -- plus
:meth:`~CosineSchedule.step_lrs`, the learning rate of each optimizer step of the current epoch, which
the trainer writes into the optimizer before every step (a float into two param groups: nothing
measurable beside a forward and backward pass).  Pure Python: no torch, no Ray.

**The curve** (nanoGPT's ``get_lr``; Loshchilov & Hutter's SGDR without restarts in the dense phase).
With T the steps of a cycle, W of them warm-up, peak η_p, start η_s and end η_e:

    η(s) = η_s + (η_p − η_s) · s / W                         for 0 <= s < W
    η(s) = η_e + ½ (η_p − η_e) (1 + cos(π (s − W) / (T − W)))   for W <= s < T

so the first step runs at η_s, the first step after the warm-up at η_p, and the last step just above
η_e (the decay reaches η_e where the next step would be: no step is spent at a zero learning rate).
A half cosine spends little time at the peak and little at the end, and most of it in between; unlike
the plateau rule it needs no validation signal, so it also works on a validation split of a few
hundred images where a plateau is mostly noise.

**Cycles.**  The dense phase is one cycle: W = round(warmup_frac · T) steps from ``dbs.lr_start`` to
``dbs.lr0``, then the decay to ``cosine.final_lr_frac · lr0``.  Each pruning rung (``rung_starts``)
retrains in a cycle of its own without warm-up, from ``cosine.rung_lr_frac · lr0`` to the same end:
retraining at the dense phase's final, near-zero rate would barely move the pruned network, and
retraining with a rewound, larger rate recovers more accuracy than fine-tuning at the final one
(Renda, Frankle & Carbin, ICLR 2020, "learning-rate rewinding").

**Steps per epoch** are known in advance: the batch is fixed, and :func:`train_steps` is the batch
iterator's own rule (a trailing batch of one sample is skipped; a test holds the two together).

**Guard** (as the fixed schedule's): a non-finite training loss or a NaN validation accuracy makes
:meth:`step` return True (the trainer restores its snapshot), and the rest of the run's learning
rates are multiplied by ``dbs.plateau_factor``, so the divergence is not replayed.  The plateau rule
does not apply: the cosine is the decay.  ``increase`` (the trainer snapshots before such an epoch) is
True at epoch 0 and whenever an epoch's first learning rate is above the previous epoch's last
(warm-up epochs, rung restarts).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .config import CosineConfig, DBSConfig
from .dbs import EpochPlan, _round_half_up, check_schedule_args, load_schedule_state

__all__ = ["CosineSchedule", "cosine_lr", "train_steps"]

_STATE_VERSION = 1


def train_steps(train_size: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch of ``train_size`` images at ``batch_size`` (the batch
    iterator skips a trailing batch of a single sample: batch norm cannot train on it)."""
    full, rest = divmod(int(train_size), int(batch_size))
    return full + (1 if rest >= 2 else 0)


def cosine_lr(step: int, *, total: int, warmup: int, peak: float, start: float, end: float) -> float:
    """The learning rate of step ``step`` (0-based) of a cycle of ``total`` steps (module docstring)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    if total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / (total - warmup))
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * t))


class CosineSchedule:
    """Warm-up + cosine per step in the dense phase; a cosine restart per pruning rung (module docstring)."""

    kind = "cosine"

    def __init__(self, cfg: DBSConfig, cosine: CosineConfig | None = None, *, epochs: int, train_size: int,
                 batch_size: int, val_size: int | None = None, rung_starts: Sequence[int] = ()) -> None:
        starts = check_schedule_args(cfg, epochs=epochs, train_size=train_size, val_size=val_size,
                                     rung_starts=rung_starts, batch_size=batch_size)
        cosine = CosineConfig() if cosine is None else cosine
        if not isinstance(cosine, CosineConfig):
            raise ValueError(f"cosine must be a CosineConfig, got {type(cosine).__name__}")
        if train_steps(train_size, batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} leaves no training step on {train_size} images")
        self.cfg, self.cosine = cfg, cosine
        self.epochs, self.train_size, self.batch_size, self.val_size = epochs, train_size, batch_size, val_size
        self.rung_starts = tuple(starts)
        self.steps_per_epoch = train_steps(train_size, batch_size)
        # Cycles: (first epoch, epochs, warm-up steps, peak); the dense phase first when it has epochs.
        bounds = ([0] if not starts or starts[0] > 0 else []) + starts + [epochs]
        self.cycles: list[tuple[int, int, int, float]] = []
        for first, nxt in zip(bounds, bounds[1:]):
            total = (nxt - first) * self.steps_per_epoch
            if first in self.rung_starts:
                self.cycles.append((first, nxt - first, 0, cosine.rung_lr_frac * cfg.lr0))
            else:  # the dense phase: warm-up, at most all steps but the last
                warmup = min(_round_half_up(cfg.warmup_frac * total), total - 1)
                self.cycles.append((first, nxt - first, warmup, cfg.lr0))
        self.warmup_steps = self.cycles[0][2]
        self.notes: list[str] = []
        self._s: dict[str, Any] = {"epoch": 0, "scale": 1.0, "guards": 0, "decision": self._opening()}

    # -- the curve ----------------------------------------------------------------------------
    def _cycle(self, epoch: int) -> tuple[int, int, int, float]:
        return next(c for c in reversed(self.cycles) if c[0] <= epoch)

    def lr_at(self, epoch: int, i: int) -> float:
        """Learning rate of step ``i`` of ``epoch`` before the guard's scale."""
        first, n, warmup, peak = self._cycle(epoch)
        return cosine_lr((epoch - first) * self.steps_per_epoch + i, total=n * self.steps_per_epoch, warmup=warmup,
                         peak=peak, start=self.cfg.lr_start, end=self.cosine.final_lr_frac * self.cfg.lr0)

    def step_lrs(self) -> list[float]:
        """The learning rate of each optimizer step of the current epoch (``steps_per_epoch`` values)."""
        e, scale = self._s["epoch"], self._s["scale"]
        return [scale * self.lr_at(e, i) for i in range(self.steps_per_epoch)]

    def _opening(self) -> str:
        first, n, warmup, peak = self.cycles[0]
        end = self.cosine.final_lr_frac * self.cfg.lr0
        if first in self.rung_starts:
            return f"no dense epochs: cosine from {peak:.4g} to {end:.4g} per rung"
        return (f"warm-up {warmup} steps {self.cfg.lr_start:.4g} -> {peak:.4g}, then cosine to {end:.4g} over "
                f"{n * self.steps_per_epoch - warmup} steps ({self.steps_per_epoch} per epoch)")

    # -- the schedule interface ---------------------------------------------------------------
    def plan(self) -> EpochPlan:
        e = self._s["epoch"]
        scale = self._s["scale"]
        first, _, warmup, _ = self._cycle(e)
        lr = scale * self.lr_at(e, 0)
        if e == 0:
            increase = True  # so the trainer always holds a snapshot to restore
        else:
            increase = lr > scale * self.lr_at(e - 1, self.steps_per_epoch - 1) * (1 + 1e-12)
        phase = "warmup" if (e - first) * self.steps_per_epoch < warmup else "cosine"
        return EpochPlan(epoch=e, lr=lr, momentum=self.cfg.m0, batch_size=self.batch_size, phase=phase,
                         increase=increase, decision=self._s["decision"])

    def step(self, val_accuracy: float, loss_finite: bool = True) -> bool:
        """End of the current epoch: True = restore the snapshot (a non-finite loss or NaN accuracy)."""
        s = self._s
        val = float(val_accuracy)
        guard = (not loss_finite) or math.isnan(val)
        nxt = s["epoch"] + 1
        decision = ""
        if guard:
            s["scale"] *= self.cfg.plateau_factor
            s["guards"] += 1
            why = "non-finite loss" if not loss_finite else "NaN val accuracy"
            decision = (f"guard: {why} -> weights restored; learning rates x{s['scale']:.4g} for the rest of "
                        "the run")
        if nxt in self.rung_starts:
            decision = (decision + "; " if decision else "") + self._rung_note(nxt)
        s.update(epoch=nxt, decision=decision)
        return guard

    def _rung_note(self, e: int) -> str:
        _, n, _, peak = self._cycle(e)
        i = self.rung_starts.index(e)
        return (f"rung {i + 1}: cosine restarts at {self._s['scale'] * peak:.4g} -> "
                f"{self._s['scale'] * self.cosine.final_lr_frac * self.cfg.lr0:.4g} over {n} epoch(s)")

    def skip_to(self, epoch: int) -> None:
        """Jump to ``epoch`` (the first rung after early stopping ended the dense phase, or the end)."""
        if not self._s["epoch"] <= epoch <= self.epochs:
            raise ValueError(f"skip_to({epoch}): must be between the current epoch {self._s['epoch']} and {self.epochs}")
        note = self._rung_note(epoch) if epoch in self.rung_starts else ""
        self._s.update(epoch=epoch, decision=note)

    # -- persistence --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.cfg.to_dict(), "cosine": self.cosine.to_dict(),
                "epochs": self.epochs, "train_size": self.train_size, "batch_size": self.batch_size,
                "val_size": self.val_size, "rung_starts": list(self.rung_starts)}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "version": _STATE_VERSION, "state": dict(self._s), "notes": list(self.notes)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._s = load_schedule_state(d, identity=self._identity(), keys=list(self._s), versions=(_STATE_VERSION,),
                                      what="cosine schedule",
                                      normalise={"config": lambda c: DBSConfig.from_dict(c).to_dict(),
                                                 "cosine": lambda c: CosineConfig.from_dict(c).to_dict()})
        self.notes = list(d.get("notes", []))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plan()})"
