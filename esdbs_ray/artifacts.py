"""One reader per kind of file an experiment holds, each refusing what esdbs does not write.

``summary.json``, ``members/<member>.json``, ``stacking*.json`` / ``stack-*.json``, ``tracking.json``,
``config.yaml`` and the predictions' Parquet schemas: every reader parses the file (within
:data:`storage.JSON_MAX_DEPTH`), checks the type of every key the commands use, and raises
:class:`ArtifactError` -- one line naming the file and the key path -- for a file that is corrupt,
truncated or of the wrong type anywhere (``summary.json: members[0].rungs: expected a list of records,
got a number``).  Numbers are read leniently where the records do (absent or null: None); anything
else is checked, because the report, ``esdbs export``, ``stack`` and ``results`` index into it.

:func:`check_experiment` reads every artifact of an experiment this way before a command that reads
the experiment does any work or writes anything, and refuses a directory that holds no experiment.
Nothing here imports torch or Ray.
"""
from __future__ import annotations

import math
import re
from typing import Any

from . import storage
from .errors import UserError
from .layout import ExperimentLayout as L

__all__ = ["ArtifactError", "read_summary", "read_member", "read_stacking", "read_tracking", "check_experiment",
           "stacking_files"]


class ArtifactError(UserError):
    """A file of an experiment that is not what esdbs writes; the message names the file and key."""


# --------------------------------------------------------------------------------------------------
# a small type language for JSON documents
# --------------------------------------------------------------------------------------------------
def _name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(v), type(v).__name__)


class _Spec:
    nullable = True
    what = "a value"

    def check(self, v: Any, path: str) -> None:
        if v is None and self.nullable:
            return
        if not self.ok(v):
            raise _Bad(path, f"expected {self.what}{' or null' if self.nullable else ''}, got {_name(v)}")
        self.inner(v, path)

    def ok(self, v: Any) -> bool:
        return True

    def inner(self, v: Any, path: str) -> None:
        pass


class _Bad(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)


class Any_(_Spec):
    pass


class Num(_Spec):
    """A number (not true/false); NaN allowed where the writer writes it (a diverged loss)."""

    what = "a number"

    def __init__(self, nullable: bool = True, finite: bool = False, lo: float | None = None, hi: float | None = None):
        self.nullable, self.finite, self.lo, self.hi = nullable, finite, lo, hi

    def ok(self, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return not self.finite
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    def check(self, v, path):
        if v is None and self.nullable:
            return
        if not self.ok(v):
            bounds = f" in [{self.lo:g}, {self.hi:g}]" if self.lo is not None and self.hi is not None else ""
            got = _name(v) if isinstance(v, bool) or not isinstance(v, (int, float)) else repr(v)[:40]
            raise _Bad(path, f"expected {'a finite ' if self.finite else 'a '}number{bounds}"
                             f"{' or null' if self.nullable else ''}, got {got}")


class Str(_Spec):
    what = "text"

    def __init__(self, nullable: bool = True, pattern: str | None = None, what: str | None = None):
        self.nullable, self.pattern = nullable, None if pattern is None else re.compile(pattern)
        if what is not None:
            self.what = what

    def ok(self, v):
        return isinstance(v, str) and (self.pattern is None or self.pattern.fullmatch(v) is not None)


class Bool(_Spec):
    what = "true or false"

    def __init__(self, nullable: bool = True):
        self.nullable = nullable

    def ok(self, v):
        return isinstance(v, bool)


class Lst(_Spec):
    what = "a list"

    def __init__(self, item: _Spec = Any_(), nullable: bool = True):
        self.item, self.nullable = item, nullable

    def ok(self, v):
        return isinstance(v, list)

    def inner(self, v, path):
        for i, x in enumerate(v):
            self.item.check(x, f"{path}[{i}]")


class Dct(_Spec):
    """A mapping of text keys to values of one kind."""

    what = "a mapping"

    def __init__(self, value: _Spec = Any_(), nullable: bool = True):
        self.value, self.nullable = value, nullable

    def ok(self, v):
        return isinstance(v, dict)

    def inner(self, v, path):
        for k, x in v.items():
            self.value.check(x, f"{path}.{k}" if path else str(k))


class Obj(_Spec):
    """A mapping with known keys, each of its kind (absent is fine; other keys are kept, unchecked)."""

    what = "a mapping"

    def __init__(self, fields: dict[str, _Spec], nullable: bool = True, required: tuple[str, ...] = ()):
        self.fields, self.nullable, self.required = fields, nullable, required

    def ok(self, v):
        return isinstance(v, dict)

    def inner(self, v, path):
        for k in self.required:
            if k not in v:
                raise _Bad(f"{path}.{k}" if path else k, "missing")
        for k, spec in self.fields.items():
            if k in v:
                spec.check(v[k], f"{path}.{k}" if path else k)


class Model(_Spec):
    """A config block, validated by its pydantic model (config.py)."""

    what = "a mapping"

    def __init__(self, model: str, nullable: bool = True):
        self.model, self.nullable = model, nullable

    def ok(self, v):
        return isinstance(v, dict)

    def inner(self, v, path):
        from . import config

        try:
            config.validate(getattr(config, self.model), v)
        except config.ConfigError as exc:
            raise _Bad(path, str(exc)) from None


class Member(_Spec):
    """A member's record (records.MemberSummary), its config a valid TrainConfig."""

    what = "a mapping"

    def __init__(self, nullable: bool = False):
        self.nullable = nullable

    def ok(self, v):
        return isinstance(v, dict)

    def inner(self, v, path):
        from .records import MemberSummary, RecordError

        try:
            MemberSummary.from_dict(v, path)
        except RecordError as exc:
            raise _Bad("", str(exc)) from None
        if "config" in v:
            Model("TrainConfig").check(v["config"], f"{path}.config" if path else "config")
        if "member" in v and not (isinstance(v["member"], str) and v["member"]):
            raise _Bad(f"{path}.member" if path else "member", "expected a non-empty name")


def check(doc: Any, spec: _Spec, where: str) -> Any:
    """``doc`` if it fits ``spec``, else :class:`ArtifactError` naming ``where`` and the key path."""
    try:
        spec.check(doc, "")
    except _Bad as exc:
        raise ArtifactError(f"{where}: {exc}") from None
    except RecursionError:
        raise ArtifactError(f"{where}: nested too deeply") from None
    return doc


# --------------------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------------------
_METRICS = {k: Num() for k in ("val_accuracy", "val_nll", "test_accuracy", "test_nll", "seconds")}
_WEIGHTS = Dct(Num(nullable=False, finite=True, lo=0.0, hi=1.0))
_METHOD = Obj({"weights": _WEIGHTS, **_METRICS}, nullable=False)
_RUNG_INFO = Obj({"target_sparsity": Num(finite=True, lo=0.0, hi=1.0), "basis_threshold": Num(finite=True, lo=0.0, hi=1.0),
                  "level": Num(finite=True, lo=0), "sparsity": Num(), "epoch": Num(), "model": Str(),
                  "variant": Str(), "num_rows": Num()}, nullable=False)
_EVALUATION = Obj({"split": Str(), "ensemble": Dct(Any_()), "members": Dct(Dct(Any_()))})
STACKING = Obj({
    "member_names": Lst(Str(nullable=False)), "num_classes": Num(), "n_val": Num(), "n_test": Num(), "seed": Num(),
    "members": Dct(Obj({**_METRICS}, nullable=False)),
    "methods": Dct(_METHOD, nullable=False),
    "chosen": Str(), "chosen_rule": Str(),
    "ensemble": Obj({"method": Str(), "weights": _WEIGHTS, **_METRICS}),
    "experiment": Str(), "sparsity": Num(finite=True, lo=0.0, hi=1.0), "basis_threshold": Num(finite=True, lo=0.0, hi=1.0),
    "level": Num(finite=True, lo=0), "variant": Str(), "rungs": Dct(_RUNG_INFO),
    "provenance": Lst(Obj({"path": Str(), "num_rows": Num(), "members": Lst(Str()), "metadata": Dct(Any_())},
                          nullable=False)),
    "class_names": Lst(Str(nullable=False)),
    "per_class": Obj({"support": Lst(Num()), "ensemble": Lst(Num()), "members": Dct(Lst(Num()))}),
    "evaluation": _EVALUATION, "created": Str(),
}, nullable=False, required=("methods",))

SUMMARY = Obj({
    "name": Str(), "experiment_dir": Str(), "dataset": Str(), "variants": Lst(Str(nullable=False)),
    "groups": Lst(Str(nullable=False)), "members": Lst(Member()),
    "ensembles": Dct(Obj({"method": Str(), "weights": _WEIGHTS, **_METRICS,
                          "sparsity": Num(finite=True, lo=0.0, hi=1.0), "basis_threshold": Num(finite=True, lo=0.0, hi=1.0)},
                         nullable=False)),
    "base_wall_seconds": Num(), "wall_seconds": Num(), "resumed": Bool(), "dbs_search": Dct(Any_()),
    "config": Model("PipelineConfig"),
    "provenance": Obj({"git_revision": Str(), "versions": Dct(Str()), "host": Str(), "created": Str(),
                       "device": Dct(Any_())}),
}, nullable=False)

TRACKING = Obj({"run_id": Str(), "tracking_uri": Str(), "experiment_name": Str(), "experiment_id": Str(),
                "trial_runs": Dct(Any_())}, nullable=False)


def _read_json(tree: storage.Tree, *parts: str) -> Any:
    try:
        return tree.read_json(*parts)
    except FileNotFoundError:
        raise
    except UserError as exc:
        raise ArtifactError(str(exc)) from None
    except OSError as exc:
        raise ArtifactError(f"{tree.uri(*parts)}: cannot read ({exc.strerror or type(exc).__name__})") from None


def read_summary(tree: storage.Tree) -> dict | None:
    """The experiment's ``summary.json``, checked; None when there is none."""
    try:
        doc = _read_json(tree, L.SUMMARY)
    except FileNotFoundError:
        return None
    return check(doc, SUMMARY, tree.uri(L.SUMMARY))


def read_member(tree: storage.Tree, name: str):
    """``members/<name>`` as a :class:`~esdbs_ray.records.MemberSummary`, checked."""
    from .records import MemberSummary

    doc = check(_read_json(tree, L.MEMBERS, name), Member(), tree.uri(L.MEMBERS, name))
    return MemberSummary.from_dict(doc)


def read_stacking(tree: storage.Tree, name: str) -> dict:
    """A ``stacking*.json`` or ``stack-*.json``, checked: its methods' weights numbers in [0, 1], ..."""
    return check(_read_json(tree, name), STACKING, tree.uri(name))


def read_tracking(tree: storage.Tree) -> dict | None:
    try:
        doc = _read_json(tree, "tracking.json")
    except FileNotFoundError:
        return None
    return check(doc, TRACKING, tree.uri("tracking.json"))


def stacking_files(tree: storage.Tree) -> list[str]:
    """The run's stacking files and ``esdbs stack``'s re-runs, by name."""
    return tree.listdir(pattern=L.STACKING_GLOB) + tree.listdir(pattern=L.RESTACK_GLOB)


KINDS = ("config", "summary", "members", "stacking", "tracking", "predictions")


def check_experiment(tree: storage.Tree, *, only: tuple[str, ...] = KINDS) -> None:
    """Read the experiment's artifacts of the kinds ``only`` (a command reads those) with their readers;
    the first that is not what esdbs writes is an :class:`ArtifactError` naming it.  A directory with
    none of an experiment's files is refused whatever ``only`` says: a report, a table or an export of
    nothing helps no one."""
    from .config import parse_saved_config

    present = {"config": tree.exists(L.CONFIG), "summary": tree.exists(L.SUMMARY),
               "members": bool(tree.listdir(L.MEMBERS, pattern="*.json")), "stacking": bool(stacking_files(tree)),
               "tracking": tree.exists("tracking.json"),
               "predictions": bool(tree.listdir(L.PREDICTIONS, pattern="*.parquet"))}
    if not any(present.values()):
        raise ArtifactError(f"{tree.root}: holds no esdbs experiment (no config.yaml, summary.json, members/*.json, "
                            "stacking*.json or predictions/*.parquet)")
    if "config" in only and present["config"]:
        where = tree.uri(L.CONFIG)
        try:
            text = tree.read_bytes(L.CONFIG, max_bytes=_yaml_limit())
        except UserError as exc:  # a directory, a pipe, a link to nowhere, too large
            raise ArtifactError(f"{where}: cannot read it ({str(exc).split(': ', 1)[-1]})") from None
        except OSError as exc:
            raise ArtifactError(f"{where}: cannot read ({exc.strerror or type(exc).__name__})") from None
        try:
            parse_saved_config(text.decode(), where)
        except UnicodeDecodeError:
            raise ArtifactError(f"{where}: not UTF-8 text") from None
    if "summary" in only:
        read_summary(tree)
    if "members" in only:
        for name in tree.listdir(L.MEMBERS, pattern="*.json"):
            read_member(tree, name)
    if "stacking" in only:
        for name in stacking_files(tree):
            read_stacking(tree, name)
    if "tracking" in only:
        read_tracking(tree)
    if "predictions" in only and present["predictions"]:
        _check_prediction_files(tree)


def _yaml_limit() -> int:
    from .config import YAML_MAX_BYTES

    return YAML_MAX_BYTES


def _check_prediction_files(tree: storage.Tree) -> None:
    """Every predictions file read and checked (``predictions.read_predictions``)."""
    from .predictions import read_predictions

    read_predictions(tree.path(L.PREDICTIONS), filesystem=tree.fs)
