"""Stacking an experiment: its Parquet predictions in, ``stacking*.json`` out.

:func:`stack_experiment` reads ``<experiment>/predictions/*.parquet`` (:mod:`esdbs_ray.predictions`),
aligns the members at one rung, runs :func:`esdbs_ray.stacking.stack` (every method, the Tune search
too: this module imports the adapter that registers it) and writes the result atomically.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import pyarrow.compute as pc

from . import predictions as _pred
from . import stacking_tune  # noqa: F401  registers the "tune_accuracy_search" method
from . import storage
from .config import slug
from .evaluation import evaluate_probs, weighted_probs
from .layout import ExperimentLayout
from .records import Rung
from .stacking import CV_FOLDS, DEFAULT_METHODS, per_class_accuracy, stack

__all__ = ["stack_experiment", "config_member_order", "config_stack_settings", "RERUN"]


def stack_experiment(
    experiment_dir_or_uri: str | os.PathLike,
    *,
    sparsity: float | None = None,
    variant: str | None = None,
    members: Sequence[str] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    tune_samples: int = 0,
    seed: int = 0,
    choose: str = "nll_optimal",
    storage_path: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    ray_init_kwargs: Mapping[str, Any] | None = None,
    basis_threshold: float | None = None,
    level: int | None = None,
    cv_folds: int = CV_FOLDS,
) -> dict[str, Any]:
    """Stack the members found in ``<experiment>/predictions/*.parquet``; write ``<experiment>/stacking.json``.

    ``sparsity`` picks the rung (a target-sparsity fraction; None = each member's last rung),
    ``basis_threshold`` a BasisConv rung by its t (``predictions.prediction_matrix``),
    ``variant`` / ``members`` filter the rows.  The result of :func:`stack` gains ``"sparsity"``,
    ``"rungs"`` (per member: target and achieved sparsity, epoch, model, variant), ``"provenance"``
    (per prediction file: path, members, and its metadata: config, seed, git revision, versions),
    ``"experiment"``, ``"created"``, ``"class_names"`` (from the prediction files' metadata; None when
    absent or inconsistent) and ``"per_class"`` (:func:`per_class_accuracy` of the chosen ensemble and
    the members on the test split).  The JSON is written atomically (``output`` overrides the
    path); the dict is returned.  Raises ``FileNotFoundError`` naming the directory when there are no
    predictions, ``ValueError`` for mismatched members or NaN probabilities.
    """
    exp = storage.normalize(experiment_dir_or_uri)
    pdir = _pred.predictions_dir(exp)
    table = _pred.read_predictions(pdir)
    if members is None:  # the config's order (as the run's own stacks, the report and the export use)
        present = set(table.filter(pc.equal(table["split"], "val"))["member"].to_pylist()) if variant is None \
            else set(table.filter(pc.equal(table["variant"], variant))["member"].to_pylist())
        members = [m for m in config_member_order(exp) if m in present] + sorted(present - set(config_member_order(exp)))
    Pv, yv, names, info_v = _pred.prediction_matrix(table, "val", members, sparsity, variant=variant, return_info=True,
                                                    basis_threshold=basis_threshold, level=level)
    Pt, yt, names_t, info_t = _pred.prediction_matrix(table, "test", names, sparsity, variant=variant, return_info=True,
                                                      basis_threshold=basis_threshold, level=level)
    for n in names:
        a, b = info_v[n], info_t[n]
        rung = ("target_sparsity", "basis_threshold", "level", "epoch")
        if tuple(a[k] for k in rung) != tuple(b[k] for k in rung):
            raise ValueError(
                f"member {n!r}: validation predictions are from rung {a['target_sparsity']} (basis t "
                f"{a['basis_threshold']}) epoch {a['epoch']} but test predictions from rung {b['target_sparsity']} "
                f"(basis t {b['basis_threshold']}) epoch {b['epoch']}"
            )
    result = stack(
        Pv, yv, Pt, yt, names, methods=methods, tune_samples=tune_samples, storage_path=storage_path,
        seed=seed, choose=choose, ray_init_kwargs=ray_init_kwargs, cv_folds=cv_folds,
    )
    used = set(names)
    # what was stacked, also when it was not asked for: the members' one group and one rung
    groups = {info_v[n]["variant"] for n in names}
    rungs = {Rung.of(info_v[n]) for n in names}
    rung = next(iter(rungs)) if len(rungs) == 1 else None
    result["experiment"] = exp
    result["sparsity"] = float(sparsity) if sparsity is not None else (rung.target_sparsity if rung else None)
    result["basis_threshold"] = (float(basis_threshold) if basis_threshold is not None
                                 else (rung.basis_threshold if rung else None))
    result["level"] = level if level is not None else (rung.level if rung else None)
    result["variant"] = variant or (next(iter(groups)) if len(groups) == 1 else None)
    result["rungs"] = info_v
    result["provenance"] = [s for s in _pred.prediction_sources(table) if used & set(s["members"])]
    result["class_names"] = _class_names(result["provenance"], Pt.shape[2])
    result["per_class"] = per_class_accuracy(result["ensemble"]["weights"], Pt, yt, names)
    w = [result["ensemble"]["weights"][n] for n in names]
    result["evaluation"] = {  # the test split: confusion, per-class precision / recall / F1, calibration
        "split": "test", "ensemble": evaluate_probs(weighted_probs(w, Pt), yt).to_dict(),
        "members": {n: evaluate_probs(Pt[k], yt).to_dict() for k, n in enumerate(names)}}
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = json.dumps(result, indent=2, allow_nan=False, default=_pred._json_default).encode()
    if output is None:
        output = ExperimentLayout(exp).stacking()
    elif output is RERUN:  # esdbs stack: a new file per call, named by what it stacked
        tag = f"{slug(result['variant'] or 'all')}-{rung.tag() if rung else 'mixed'}"
        output = ExperimentLayout(exp).stacking_rerun(tag)
    _pred.atomic_write_bytes(output, data)
    result["output"] = str(output)
    return result


class _Rerun:
    """``output=RERUN``: a new ``stack-<time>-<group>-<rung>.json`` beside the run's own stacking files."""

    def __repr__(self) -> str:
        return "RERUN"


RERUN = _Rerun()


def config_member_order(experiment: str | storage.Tree) -> list[str]:
    """The members in the order of the experiment's config (its trials); [] without a readable config.
    ``experiment``: a local path or URI, or a :class:`~esdbs_ray.storage.Tree` (any pyarrow filesystem)."""
    cfg = _saved_config(experiment)
    return [t.member for t in cfg.trials()] if cfg is not None else []


def _saved_config(experiment: str | storage.Tree):
    """The experiment's config, None when absent, not text or not a config (ConfigError is a ValueError)."""
    from .config import parse_saved_config

    tree = experiment if isinstance(experiment, storage.Tree) else storage.Tree(experiment)
    try:
        return parse_saved_config(tree.read_text(ExperimentLayout.CONFIG), "config.yaml")
    except (OSError, ValueError):
        return None


def config_stack_settings(experiment: str | storage.Tree):
    """The experiment's ``stack:`` settings (a :class:`~esdbs_ray.config.StackConfig`), None without a
    readable config: ``esdbs stack`` re-runs a stack the way the run chose (an experiment from before
    ``choose: cv`` keeps the rule it was run with)."""
    cfg = _saved_config(experiment)
    return cfg.stack if cfg is not None else None


def _class_names(sources: Sequence[Mapping[str, Any]], num_classes: int) -> list[str] | None:
    """The class names the trainer wrote into the prediction files' metadata, when they all agree."""
    found = {tuple(n) for n in ((s.get("metadata") or {}).get("class_names") for s in sources) if n}
    if len(found) == 1:
        names = list(next(iter(found)))
        return names if len(names) == num_classes else None
    return None
