"""What a training run produces, as typed records: the epoch, the rung, the member's summary.

The trainer makes them; the artifact writer (``run_record.py``), the Tune adapter, the pipeline,
``esdbs results``, ``export`` and the report read them.  Each serialises to the JSON the project has
always written (``members/<member>.json``, ``summary.json``, a train-one ``summary.json``) and reads
back from it, including files written before these types existed (absent keys become ``None``;
``tests/test_legacy_artifacts.py`` reads a committed experiment from that time).

:class:`Rung` is the identity of a member's operating point, with one equality rule for the whole
package: target sparsity and BasisConv threshold rounded to 6 decimals (a float32 Parquet column and a
float64 config value of the same rung compare equal; two rungs 1e-6 apart are the same rung).

No torch and no Ray here: the report and the CLI read records without the training stack.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from .errors import UserError

__all__ = ["Rung", "DENSE", "EpochRecord", "RungResult", "MemberSummary", "RecordError", "number", "rung_key_fields"]

_DIGITS = 6


class RecordError(UserError):
    """A record whose JSON has the wrong type at a key; the message names the key path."""


def number(x: Any) -> float | None:
    """A finite float, or None (absent, null, NaN, not a number): how records read numbers."""
    if isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = number(x)
    return None if v is None else int(v)


# --------------------------------------------------------------------------------------------------
# Rung identity
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rung:
    """A rung: ``(target_sparsity, basis_threshold, level)``.

    The dense rung is ``Rung(0.0)``; a sparsity rung ``Rung(s)``; a BasisConv rung ``Rung(0.0, t)`` (it
    prunes nothing, so its target sparsity is honestly 0, and its threshold t tells the rungs apart);
    a self-expanding member's level k -- the network as it was before its k-th expansion, the last
    level the grown one -- ``Rung(0.0, level=k)``.  Values are rounded on construction, so ``==``,
    ``hash`` and sorting agree everywhere."""

    target_sparsity: float = 0.0
    basis_threshold: float | None = None
    level: int | None = None

    def __post_init__(self):
        ts = number(self.target_sparsity)
        if ts is None or not 0.0 <= ts <= 1.0:
            raise ValueError(f"target_sparsity must be a fraction in [0, 1], got {self.target_sparsity!r}")
        object.__setattr__(self, "target_sparsity", round(ts, _DIGITS))
        if self.basis_threshold is not None:
            bt = number(self.basis_threshold)
            if bt is None or not 0.0 < bt <= 1.0:
                raise ValueError(f"basis_threshold must be in (0, 1], got {self.basis_threshold!r}")
            object.__setattr__(self, "basis_threshold", round(bt, _DIGITS))
        if self.level is not None:
            if isinstance(self.level, bool) or number(self.level) is None or int(self.level) != self.level \
                    or self.level < 0:
                raise ValueError(f"level must be an integer >= 0, got {self.level!r}")
            object.__setattr__(self, "level", int(self.level))

    @classmethod
    def of(cls, record: Mapping[str, Any] | Any) -> "Rung":
        """The rung of a record: a mapping or an object with ``target_sparsity`` / ``basis_threshold``
        (absent or null basis threshold: not a basis rung)."""
        get = record.get if isinstance(record, Mapping) else (lambda k, d=None: getattr(record, k, d))
        bt = get("basis_threshold", None)
        bt = None if bt is None or (isinstance(bt, float) and math.isnan(bt)) else bt
        level = get("level", None)
        level = None if level is None or (isinstance(level, float) and math.isnan(level)) else level
        return cls(get("target_sparsity", 0.0) or 0.0, bt, level)

    @property
    def is_basis(self) -> bool:
        return self.basis_threshold is not None

    @property
    def is_level(self) -> bool:
        return self.level is not None

    def order(self) -> tuple:
        """Sort key from the least to the most compressed rung: a growing member's levels, the dense
        rung, then the sparsity rungs by target, or the basis rungs by decreasing t (a member climbs
        one ladder, never both)."""
        return (self.target_sparsity, 0.0 if self.basis_threshold is None else 2.0 - self.basis_threshold,
                -1.0 / (1 + self.level) if self.level is not None else 0.0)

    def __lt__(self, other: "Rung") -> bool:
        return self.order() < other.order()

    def text(self) -> str:
        if self.is_level:
            return f"level {self.level}"
        return f"basis t={self.basis_threshold:g}" if self.is_basis else f"sparsity {self.target_sparsity:g}"

    def tag(self) -> str:
        """The file-name tag: ``ts0800`` (sparsity 0.8), ``bt0900`` (basis t = 0.9) or ``lv02`` (level 2)."""
        if self.is_level:
            return f"lv{self.level:02d}"
        if self.is_basis:
            return f"bt{round(self.basis_threshold * 1000):04d}"
        return f"ts{round(self.target_sparsity * 1000):04d}"

    def as_dict(self) -> dict:
        d = {"target_sparsity": self.target_sparsity, "basis_threshold": self.basis_threshold}
        if self.level is not None:
            d["level"] = self.level
        return d

    def matches(self, target_sparsity: float | None = None, basis_threshold: float | None = None,
                level: int | None = None) -> bool:
        """Whether this rung is the one a user asked for: ``target_sparsity`` None = any target;
        ``basis_threshold`` None = a rung that is not a basis rung; ``level`` None = not a level."""
        if (self.is_level if level is None else self.level != level):
            return False
        want_ts = None if target_sparsity is None else Rung(target_sparsity).target_sparsity
        if want_ts is not None and self.target_sparsity != want_ts:
            return False
        if basis_threshold is None:
            return not self.is_basis
        return self.basis_threshold == Rung(0.0, basis_threshold).basis_threshold


DENSE = Rung()


def rung_key_fields(rungs: Iterable[Rung]) -> list[dict]:
    return [r.as_dict() for r in rungs]


# --------------------------------------------------------------------------------------------------
# Records: dataclasses that read and write their historical JSON form
# --------------------------------------------------------------------------------------------------
class _Record:
    """Shared JSON form: every field by name; ``_OPTIONAL`` fields are left out while None (they were
    written only when they applied); unknown keys of a read file are kept in ``extra`` and written back.

    Reading is lenient about numbers (absent, null or not a number: None, as old files need) and strict
    about everything else: a text, flag, mapping or list field holding another type is a
    :class:`RecordError` naming the key path (``rungs[1].layer_sparsity: expected a mapping, got
    list``), never a value that breaks a reader later."""

    _OPTIONAL: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in self._OPTIONAL:
                continue
            out[f.name] = _plain(v)
        out.update(getattr(self, "extra", None) or {})
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = ""):
        if not isinstance(d, Mapping):
            raise RecordError(f"{where or cls.__name__}: expected a JSON object, got {_type_name(d)}")
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        kw = {name: _read_field(f, d.get(name), f"{where}.{name}" if where else name)
              for name, f in known.items() if name in d}
        if any(f.name == "extra" for f in fields(cls)):
            kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)


def _plain(v):
    if isinstance(v, _Record):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# The JSON types a field's annotation admits (annotations are strings here: __future__ annotations).
_TYPES = {"str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _type_name(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def _read_field(f: dataclasses.Field, v, where: str):
    kind = f.metadata.get("kind")
    if kind == "float":
        return number(v)
    if kind == "int":
        return _int(v)
    if isinstance(kind, type) and issubclass(kind, _Record):
        if v is None:
            return []
        if not isinstance(v, list):
            raise RecordError(f"{where}: expected a list of records, got {_type_name(v)}")
        return [kind.from_dict(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if kind == "float_or_nan":  # kept as written (NaN marks a diverged epoch), but a number or nothing
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RecordError(f"{where}: expected a number, got {_type_name(v)}")
        return v
    names = [t.strip() for t in str(f.type).split("|")]
    if "Any" in names:
        return v
    allowed = tuple(t for n in names for t in _TYPES.get(n, ()))
    if v is None and "None" in names:
        return v
    if allowed and not isinstance(v, allowed):
        want = " or ".join(_type_name(t()) for t in allowed) + (" or null" if "None" in names else "")
        raise RecordError(f"{where}: expected {want}, got {_type_name(v)}")
    items = f.metadata.get("items")
    if items is not None and isinstance(v, list):
        for i, x in enumerate(v):
            if not isinstance(x, items) or isinstance(x, bool):
                raise RecordError(f"{where}[{i}]: expected {'text' if items is str else 'a number'}, got {_type_name(x)}")
    return v


def _float(default=None):
    return field(default=default, metadata={"kind": "float"})


def _int_field(default=None):
    return field(default=default, metadata={"kind": "int"})


@dataclass(frozen=True)
class EpochRecord(_Record):
    """One epoch of a member: what the schedule set, what training and validation measured, the
    model's sparsity after it, and why the schedule did what it did (``decision``)."""

    epoch: int = _int_field(0)
    total_epochs: int = _int_field(0)
    phase: str = ""
    lr: float = _float()
    momentum: float = _float()
    batch_size: int = _int_field()
    noise_scale: float = _float()
    train_loss: float | None = field(default=None, metadata={"kind": "float_or_nan"})  # NaN: a diverged epoch
    train_accuracy: float = _float()
    val_loss: float | None = field(default=None, metadata={"kind": "float_or_nan"})
    val_accuracy: float = _float()
    epoch_seconds: float = _float()
    samples_per_second: float = _float()
    steps: int = _int_field()
    total_steps: int = _int_field()
    train_seconds: float = _float()
    sparsity: float = _float()
    model_sparsity: float = _float()
    nonzero_weights: int = _int_field()
    target_sparsity: float = _float(0.0)
    basis_threshold: float | None = _float()  # basis ladders only
    fine_tuning_stage: int | None = _int_field()  # basis ladders only: 1 coefficients, 2 the rest
    restored: bool = False
    decision: str = ""
    lr_scale: float | None = _float()  # the optimizer ran at lr * lr_scale (basis fine-tuning steps)
    params: int | None = _int_field()  # growing members: learnable parameters after the epoch's check
    expansion_ratio: float | None = _float()  # growing members: the best candidate's score over eta_current
    expansion: str | None = None  # growing members: what the check did (widen / add_layer), if it grew
    early_stopping: str | None = None
    best_epoch: int | None = _int_field()
    best_val_loss: float | None = _float()
    best_val_accuracy: float | None = _float()
    extra: dict = field(default_factory=dict)

    _OPTIONAL = ("basis_threshold", "fine_tuning_stage", "lr_scale", "params", "expansion_ratio", "expansion",
                 "early_stopping", "best_epoch", "best_val_loss", "best_val_accuracy")


@dataclass(frozen=True)
class RungResult(_Record):
    """The end of a rung: the model's sparsity, validation and test metrics, training time, and the
    multiplications and weights beside the dense spatial network (``compression.rung_counts``)."""

    target_sparsity: float = _float(0.0)
    basis_threshold: float | None = _float()
    level: int | None = _int_field()  # a growing member's level (the network before its level-th expansion)
    params: int | None = _int_field()  # learnable parameters (levels)
    expansion: str | None = None  # levels: the decision that ended the level
    sparsity: float = _float()
    model_sparsity: float = _float()
    nonzero_weights: int = _int_field()
    total_weights: int = _int_field()
    pruned_layer_weights: int = _int_field()
    layer_sparsity: dict = field(default_factory=dict)
    epoch: int = _int_field(0)
    val_accuracy: float = _float()
    val_loss: float = _float()
    test_accuracy: float = _float()
    test_loss: float = _float()
    val_ece: float | None = _float()  # expected calibration error (evaluation.py)
    test_ece: float | None = _float()
    train_seconds: float = _float()
    steps: int = _int_field()
    mean_epoch_seconds: float = _float()
    conv_mults: int = _int_field()
    dense_conv_mults: int = _int_field()
    conv_weights: int = _int_field()
    dense_conv_weights: int = _int_field()
    filters: int = _int_field()
    dense_filters: int = _int_field()
    mult_ratio: float | None = _float()
    basis: dict | None = None
    before_finetune: dict | None = None  # basis: the rung's accuracy right after truncation
    direct_conversion: dict | None = None  # basis: the trained spatial model converted at this t
    extra: dict = field(default_factory=dict)

    _OPTIONAL = ("level", "params", "expansion", "val_ece", "test_ece", "before_finetune", "direct_conversion")

    @property
    def rung(self) -> Rung:
        return Rung.of(self)


@dataclass(frozen=True)
class MemberSummary(_Record):
    """A member's training run: its final figures (the last rung's), every rung, every epoch, and the
    provenance.  The pipeline adds ``group`` and ``batch_size`` and, for the run's summary, drops
    ``history``; absent fields read as None."""

    member: str = ""
    variant: str | None = None
    model: str | None = None
    dataset: Any = None
    epochs: int | None = _int_field()
    dense_epochs: int | None = _int_field()
    val_accuracy: float | None = _float()
    test_accuracy: float | None = _float()
    test_loss: float | None = _float()
    sparsity: float | None = _float()
    model_sparsity: float | None = _float()
    nonzero_weights: int | None = _int_field()
    total_weights: int | None = _int_field()
    compression: str | None = None
    basis_threshold: float | None = _float()
    basis: dict | None = None
    batch_size_range: list | None = field(default=None, metadata={"items": (int, float)})
    train_seconds: float | None = _float()
    steps: int | None = _int_field()
    mean_epoch_seconds: float | None = _float()
    rungs: list = field(default_factory=list, metadata={"kind": RungResult})
    levels: list = field(default_factory=list, metadata={"kind": RungResult})  # growing members
    expansion: dict | None = None  # growing members: every check and the operations applied
    history: list = field(default_factory=list, metadata={"kind": EpochRecord})
    config: dict = field(default_factory=dict)
    device: str | None = None
    train_size: int | None = _int_field()
    val_size: int | None = _int_field()
    test_size: int | None = _int_field()
    provenance: dict = field(default_factory=dict)
    class_names: list | None = field(default=None, metadata={"items": str})
    epochs_run: int | None = _int_field()
    early_stopping: dict | None = None
    bmax: int | None = _int_field()
    winograd_impl: dict | None = None
    group: str | None = None
    batch_size: int | None = _int_field()
    trial_path: str | None = None
    wall_seconds: float | None = _float()
    extra: dict = field(default_factory=dict)

    _OPTIONAL = ("expansion", "winograd_impl", "group", "batch_size", "trial_path", "wall_seconds")

    def rung(self, rung: Rung) -> RungResult | None:
        """The record of ``rung`` (a level too), None when the member did not reach it."""
        return next((r for r in (self.levels if rung.is_level else self.rungs) if r.rung == rung), None)

    @property
    def final(self) -> RungResult | None:
        return self.rungs[-1] if self.rungs else None

    def replace(self, **changes) -> "MemberSummary":
        return dataclasses.replace(self, **changes)

    def row(self) -> dict:
        """The JSON form without the per-epoch history: the member's row in an experiment's summary."""
        d = self.to_dict()
        d.pop("history", None)
        return d

    def stacked_rung(self, sparsity: float | None, basis_threshold: float | None) -> RungResult | None:
        """The rung a stack configured with ``stack.sparsity`` / ``stack.basis_threshold`` uses: a basis
        member's by its t, any other's by its target sparsity; None asked = the last rung."""
        basis = any(r.rung.is_basis for r in self.rungs)
        want = basis_threshold if basis else sparsity
        if want is None:
            return self.final
        return self.rung(Rung(0.0, want) if basis else Rung(want))
