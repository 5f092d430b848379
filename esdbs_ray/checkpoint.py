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

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .errors import UserError
from .layout import RunLayout
from .records import EpochRecord, RecordError, RungResult

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
        def records(kind, key):
            v = d.get(key) or []
            if not isinstance(v, list):
                raise RecordError(f"{key}: expected a list of records, got {type(v).__name__}")
            return [kind.from_dict(r, f"{key}[{i}]") for i, r in enumerate(v)]

        return cls(epoch=int(d.get("epoch", 0)), history=records(EpochRecord, "history"),
                   rungs=records(RungResult, "rungs"), levels=records(RungResult, "levels"), steps=int(d.get("steps", 0)),
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
    return training_difference(saved, config) is None


def training_difference(saved: Any, config: dict) -> str | None:
    """None when ``saved`` trains what ``config`` trains (:func:`same_training`), else where they part,
    naming the key: ``config.dbs.b0: 64 here, 128 in the file`` or why the saved one is no config."""
    from .config import TrainConfig, brief

    if not isinstance(saved, dict):
        return f"config: a {type(saved).__name__}, not a mapping"
    try:
        saved = TrainConfig.from_dict(saved).to_dict()
    except ValueError as exc:
        return f"config: not a valid config ({str(exc)[:300]})"
    a, b = model_keys(saved), model_keys(config)
    if a == b:
        return None
    stack = [("config", a, b)]
    while stack:
        path, x, y = stack.pop()
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), reverse=True):
                if x.get(k) != y.get(k):
                    stack.append((f"{path}.{k}", x.get(k), y.get(k)))
            continue
        if x != y:
            return f"{path}: {brief(y, 40)} here, {brief(x, 40)} in the file"
    return "config: differs"


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
    differs = training_difference(ckpt.get("config"), config)
    if differs:
        raise UserError(f"{path}: checkpoint was written by a different config ({differs}); refusing to resume")
    _check_parts(ckpt, path, config)
    return ckpt


def check_state_dict(state: Any, where: str, error: type[UserError] = UserError) -> None:
    """A model's state dict as torch writes it -- names to tensors, a module's ``get_extra_state`` (a
    BasisConv layer's basis settings) whatever it returns -- with finite floating-point values; else
    one line: ``where``, the entry, what is wrong."""
    import torch

    if not isinstance(state, dict):
        raise error(f"{where}: expected a state dict of tensors, got {type(state).__name__}")
    bad = next((k for k, v in state.items() if not isinstance(k, str)
                or not (isinstance(v, torch.Tensor) or k.endswith("._extra_state"))), None)
    if bad is not None:
        what = f"a {type(state[bad]).__name__}" if isinstance(bad, str) else f"a key of type {type(bad).__name__}"
        raise error(f"{where}.{str(bad)[:80]}: expected a tensor, got {what}")
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise error(f"{where}.{k}: holds NaN or infinite values")


def _check_parts(ckpt: dict, path: Path, config: dict) -> None:
    """The types of what the trainer restores, each refused naming its key: a state dict of tensors, the
    optimizer's and the batches' state as torch writes them, a state whose epoch is one of this run's."""
    import torch

    def fail(key: str, what: str):
        raise UserError(f"{path}: {key}: {what}")

    check_state_dict(ckpt["model"], f"{path}: model")
    opt = ckpt["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        fail("optimizer", "expected an optimizer state dict (state, param_groups)")
    for name in ("schedule", "train_batches"):
        if not isinstance(ckpt[name], dict):
            fail(name, f"expected a mapping, got {type(ckpt[name]).__name__}")
    tb = ckpt["train_batches"]
    if not isinstance(tb.get("generator"), torch.Tensor) or isinstance(tb.get("batch_size"), bool) \
            or not isinstance(tb.get("batch_size"), int) or not 1 <= tb["batch_size"]:
        fail("train_batches", "expected the batch iterator's generator state and a positive batch size")
    if not isinstance(ckpt["rng"], torch.Tensor) or ckpt["rng"].dtype != torch.uint8:
        fail("rng", "expected torch's RNG state (a byte tensor)")
    state = ckpt["state"]
    if not isinstance(state, dict):
        fail("state", f"its training state is a {type(state).__name__}, not a dict")
    total = config.get("epochs", 0) + max(len(config.get("sparsity_ladder") or ()),
                                          len((config.get("basis") or {}).get("ladder") or ())) * config.get(
        "retrain_epochs", 0)
    for key, lo, hi in (("epoch", 0, total), ("steps", 0, None)):
        v = state.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            fail(f"state.{key}", f"expected a whole number in [{lo}, {hi if hi is not None else '...'}], got {v!r}"[:200])
    ts = state.get("train_seconds", 0.0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        fail("state.train_seconds", f"expected a number, got {type(ts).__name__}")
    for key in ("snapshot", "early", "compression", "rung_start", "expansion", "hooks"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            fail(f"state.{key}", f"expected a mapping, got {type(state[key]).__name__}")
    try:
        restored = TrainState.from_dict(state)
    except RecordError as exc:
        fail("state", str(exc))
    if restored.epoch > 0 and not restored.history:  # the summary is made of these records
        fail("state.history", f"no epoch records, but the checkpoint is after epoch {restored.epoch}")


@contextmanager
def restoring(path, key: str):
    """Where the trainer loads a checkpoint's part into its objects: a part that does not fit them
    (another shape, a missing entry) is one line naming the file and the part, not a traceback."""
    try:
        yield
    except UserError as exc:  # a part's own reader refused it (a schedule's config): name the file and part
        if str(path) in str(exc):
            raise
        raise UserError(f"{path}: {key}: {exc}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{path}: {key}: does not fit this run ({text})") from None
