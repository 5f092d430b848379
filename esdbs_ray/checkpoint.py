"""A training run's checkpoint: what the loop needs to continue exactly where it stopped.

One file per run (``RunLayout.CHECKPOINT``), rewritten atomically after every epoch::

    model           state dict, pruning masks included
    optimizer       state dict
    schedule        the DBS / fixed / cosine schedule's state
    train_batches   the batch iterator's position and RNG
    rng             torch's CPU RNG state
    config          the TrainConfig as a dict: a checkpoint resumes only under the same config
    state           :class:`TrainState` as plain types (the file loads with ``weights_only=True``)

Resuming from it continues exactly as an uninterrupted run with the same seed on CPU
(``tests/test_train.py``); a checkpoint written before the state was typed still loads
(``tests/test_legacy_artifacts.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .errors import UserError
from .layout import RunLayout
from .records import EpochRecord, RungResult

__all__ = ["CHECKPOINT", "TrainState", "load_checkpoint", "save_checkpoint", "same_training", "EXECUTION_KEYS"]

CHECKPOINT = RunLayout.CHECKPOINT
_KEYS = {"model", "optimizer", "schedule", "train_batches", "rng", "config", "state"}

# Keys that choose how a step is computed, not what is trained: a run may resume under another value
# (a GPU run's checkpoint on a CPU node), and checkpoints from before a key existed lack it.
EXECUTION_KEYS = ("winograd_impl",)


@dataclass
class TrainState:
    """Everything besides the modules' own state that decides how a run goes on."""

    epoch: int = 0  # the next epoch to train
    history: list[EpochRecord] = field(default_factory=list)
    rungs: list[RungResult] = field(default_factory=list)
    levels: list[RungResult] = field(default_factory=list)  # a growing member's closed levels
    steps: int = 0
    train_seconds: float = 0.0
    snapshot: dict | None = None  # the divergence guard's pre-increase copy: {"model", "optimizer"}
    early: dict | None = None  # early stopping: the best epoch so far (and its weights during the dense phase)
    compression: dict | None = None  # what the compression strategy decided (basis: Q per layer)
    rung_start: dict | None = None  # basis: the rung's metrics right after compressing, for its record
    expansion: dict | None = None  # a growing member's controller: the operations applied, every check
    hooks: dict = field(default_factory=dict)  # what hooks keep across a resume, by hook name

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "history": [r.to_dict() for r in self.history],
                "rungs": [r.to_dict() for r in self.rungs], "levels": [r.to_dict() for r in self.levels],
                "steps": self.steps, "train_seconds": self.train_seconds, "snapshot": self.snapshot,
                "early": self.early, "compression": self.compression, "rung_start": self.rung_start,
                "expansion": self.expansion, "hooks": self.hooks}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        hooks = dict(d.get("hooks") or {})
        if d.get("kernels") and "record" not in hooks:  # written before hooks kept their own state
            hooks["record"] = {"kernels": d["kernels"]}
        return cls(epoch=int(d.get("epoch", 0)), history=[EpochRecord.from_dict(r) for r in d.get("history") or []],
                   rungs=[RungResult.from_dict(r) for r in d.get("rungs") or []],
                   levels=[RungResult.from_dict(r) for r in d.get("levels") or []], steps=int(d.get("steps", 0)),
                   train_seconds=float(d.get("train_seconds", 0.0)), snapshot=d.get("snapshot"), early=d.get("early"),
                   compression=d.get("compression"), rung_start=d.get("rung_start"), expansion=d.get("expansion"),
                   hooks=hooks)


def model_keys(config: dict) -> dict:
    """The part of a config that decides what is trained (execution keys left out)."""
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS}


def same_training(saved: Any, config: dict) -> bool:
    """Whether a config saved with a checkpoint or weights file trains what ``config`` (a TrainConfig's
    dict) trains.  The saved one is validated first, so a key added since (at its default) does not make
    an older file foreign; one that no longer validates is foreign."""
    from .config import TrainConfig

    if not isinstance(saved, dict):
        return False
    try:
        saved = TrainConfig.from_dict(saved).to_dict()
    except ValueError:
        return False
    return model_keys(saved) == model_keys(config)


def save_checkpoint(path: Path, *, model, optimizer, schedule, train_batches, config: dict, state: TrainState) -> None:
    import torch

    storage.save_torch(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "train_batches": train_batches.state_dict(), "rng": torch.get_rng_state(), "config": config,
        "state": state.to_dict(),
    })


def load_checkpoint(resume_from: str | Path, config: dict) -> dict:
    """The checkpoint at ``resume_from`` (a file, or a run directory holding one), refused with one line
    when it is not an esdbs checkpoint or was written by a different config."""
    path = Path(resume_from)
    path = path / CHECKPOINT if path.is_dir() else path
    ckpt = storage.load_torch(path)
    missing = sorted(_KEYS - set(ckpt)) if isinstance(ckpt, dict) else None
    if missing is None or missing:
        raise UserError(f"{path}: not an esdbs checkpoint ("
                        + (f"a {type(ckpt).__name__}, not a dict" if missing is None else f"lacks {missing}") + ")")
    if not same_training(ckpt.get("config"), config):
        raise UserError(f"{path}: checkpoint was written by a different config; refusing to resume")
    if not isinstance(ckpt["state"], dict):
        raise UserError(f"{path}: its training state is a {type(ckpt['state']).__name__}, not a dict")
    return ckpt
