"""How a caller observes a training run: the hook protocol, a list of hooks, and terminal progress.

The trainer (``train.py``) calls, in order: ``on_start`` once (the epoch it starts from and what
hooks kept in a resumed checkpoint), ``on_rung`` at the end of every rung, ``on_epoch`` after every
epoch's checkpoint, ``on_end`` with the summary.  Hooks that write predictions ask for the
validation and test probabilities with ``wants_probs``.  The artifact writer
(``run_record.RunRecorder``), Tune's reporter (``trainable.TuneHooks``) and :class:`PrintHooks` are
the implementations; :class:`HookList` runs several.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

from .records import EpochRecord, MemberSummary, RungResult

__all__ = ["Hooks", "HookList", "PrintHooks", "RungEnd"]


@dataclass(frozen=True)
class RungEnd:
    """The end of a rung, as hooks see it: its record, the model as it ends the rung, and (when a hook
    asked for them) the validation and test softmax outputs in the data's split order."""

    result: RungResult
    index: int  # -1 for the dense rung, else the ladder position
    model: Any  # torch.nn.Module
    val_probs: Any = None  # numpy [N_val, C]
    test_probs: Any = None  # numpy [N_test, C]
    last: bool = False  # the run's final rung
    growth_ops: tuple = ()  # a growing member's expansions so far: what rebuilds its architecture


@runtime_checkable
class Hooks(Protocol):
    def on_epoch(self, record: EpochRecord, checkpoint: Path) -> None: ...

    def on_rung(self, end: RungEnd) -> None: ...


class HookList:
    """Several hooks as one; each may leave out the calls it does not need."""

    name = "hooks"

    def __init__(self, hooks: Iterable[Any]):
        self.hooks = [h for h in hooks if h is not None]

    @classmethod
    def of(cls, hooks) -> "HookList":
        if isinstance(hooks, HookList):
            return hooks
        return cls(hooks if isinstance(hooks, (list, tuple)) else [hooks])

    @property
    def wants_probs(self) -> bool:
        return any(getattr(h, "wants_probs", False) for h in self.hooks)

    def _call(self, method: str, *args) -> None:
        for h in self.hooks:
            fn = getattr(h, method, None)
            if fn is not None:
                fn(*args)

    def on_start(self, start_epoch: int, kept: dict) -> None:
        """``kept``: what each hook's ``state_dict()`` returned at the checkpoint resumed from, by name."""
        for h in self.hooks:
            if hasattr(h, "load_state_dict") and getattr(h, "name", None) in kept:
                h.load_state_dict(kept[h.name])
        self._call("on_start", start_epoch)

    def on_rung(self, end: RungEnd) -> None:
        self._call("on_rung", end)

    def on_epoch(self, record: EpochRecord, checkpoint: Path) -> None:
        self._call("on_epoch", record, checkpoint)

    def on_end(self, summary: MemberSummary) -> None:
        self._call("on_end", summary)

    def close(self) -> None:
        """The run stopped before its end (``stop_after_epoch``): release what hooks hold open."""
        self._call("close")

    def state_dict(self) -> dict:
        return {h.name: h.state_dict() for h in self.hooks if hasattr(h, "state_dict") and getattr(h, "name", None)}


class PrintHooks:
    """Progress on the terminal, one line per epoch and per rung."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_epoch(self, r: EpochRecord, checkpoint: Path) -> None:
        print(
            f"{self.prefix}epoch {r.epoch + 1:3d}/{r.total_epochs} [{r.phase:>8}] "
            f"lr {r.lr:.4f} m {r.momentum:.3f} B {r.batch_size:4d} | "
            f"train {r.train_loss:.4f}/{r.train_accuracy:.4f} val {r.val_loss:.4f}/{r.val_accuracy:.4f} | "
            f"sparsity {r.sparsity:.2f} | {r.epoch_seconds:.1f}s {r.samples_per_second:.0f} img/s"
            + (f" | {r.decision}" if r.decision else "")
            + (" | guard: weights restored" if r.restored else ""),
            flush=True,
        )

    def on_rung(self, end: RungEnd) -> None:
        r = end.result
        if r.level is not None:
            print(f"{self.prefix}level {r.level} ({r.params:,} parameters): val {r.val_accuracy:.4f} test "
                  f"{r.test_accuracy:.4f} | {r.expansion}", flush=True)
            return
        if r.basis_threshold is not None:
            b = r.basis
            print(f"{self.prefix}rung basis t={r.basis_threshold:g} ({b['retained_filters']}/"
                  f"{b['original_filters']} filters, conv mults x{b['mult_ratio']:.3f}, conv learnable "
                  f"/{b['conv_learnable_reduction']:.2f}): before fine-tuning val {r.before_finetune['val_accuracy']:.4f}"
                  f" | val {r.val_accuracy:.4f} test {r.test_accuracy:.4f}", flush=True)
            return
        print(
            f"{self.prefix}rung sparsity {r.target_sparsity:.2f} (pruned layers {r.sparsity:.3f}, "
            f"whole model {r.model_sparsity:.3f}, {r.nonzero_weights:,} nonzero weights): "
            f"val {r.val_accuracy:.4f} test {r.test_accuracy:.4f}",
            flush=True,
        )
