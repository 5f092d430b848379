"""``esdbs results EXP``: one tidy table of everything a run measured, for a local path or a URI.

One row per observation, one column per quantity (``COLUMNS``):

* ``kind="trial"``    one per Tune trial: its member, Tune's status, iterations and wall time
  (``ExperimentAnalysis``), the final rung's accuracy, loss and sparsity, steps, training seconds, the
  batch-size range it trained at;
* ``kind="rung"``     one per member and pruning rung: validation and test accuracy and loss, the
  sparsity of the pruned layers and of the whole model, nonzero weights, steps and training seconds
  up to the rung, Tune's wall time at the rung's last epoch, the batch-size range within the rung;
* ``kind="ensemble"`` one per stacking file and method (``chosen`` marks the one the ensemble uses):
  weights, validation and test accuracy and NLL (in the ``*_loss`` columns: a member's loss is its
  mean cross-entropy, the same quantity), and the members' summed weights and steps at that rung.

Sources: Tune's experiment analysis of ``tune/base`` (trial ids, status, wall times) and the project's
JSON (``members/<member>.json``: per-epoch history and rungs; ``stacking*.json``; ``stack-*.json``
re-runs), read through ``pyarrow.fs`` (:class:`esdbs_ray.storage.Tree`) so that ``s3://``,
``gs://``, ``file://`` and local experiments give the same table (tests/test_export.py compares a
local path with its ``file://`` URI and with a ``SubTreeFileSystem`` view).  Paths in the table are
relative to the experiment.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .layout import ExperimentLayout as L
from .storage import Tree

COLUMNS = (
    "kind", "group", "variant", "member", "model", "conv", "schedule", "batch_size", "method", "chosen",
    "trial_id", "status", "iterations", "epoch", "target_sparsity", "basis_threshold", "sparsity", "model_sparsity",
    "nonzero_weights", "total_weights", "val_accuracy", "val_loss", "test_accuracy", "test_loss", "steps",
    "train_seconds", "mean_epoch_seconds", "wall_seconds", "batch_min", "batch_max", "weights", "source",
)
TABLE_COLUMNS = ("kind", "group", "member", "method", "target_sparsity", "basis_threshold", "val_accuracy",
                 "test_accuracy", "test_loss",
                 "sparsity", "model_sparsity", "nonzero_weights", "steps", "wall_seconds", "batch_min", "batch_max")
FORMATS = ("table", "csv", "parquet")

__all__ = ["results_table", "format_results", "COLUMNS", "FORMATS", "ResultsError"]


class ResultsError(ValueError):
    """Not an experiment esdbs can tabulate; the message names it."""


def _tune(tree: Tree) -> tuple[dict[str, dict], list[str]]:
    """member -> {trial_id, status, iterations, wall_seconds, wall_by_epoch, trial_dir} from Tune's
    experiment analysis (its JSON state and result files), and notes on what was missing."""
    if not tree.is_dir(*L.TUNE_BASE):
        return {}, [f"{tree.uri('tune', 'base')}: no Tune experiment (trial ids and wall times left empty)"]
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(tree.path(*L.TUNE_BASE), storage_filesystem=tree.fs)
        frames = analysis.trial_dataframes
    except Exception as exc:  # Tune's own error types; the JSON still gives every other column
        return {}, [f"{tree.uri('tune', 'base')}: Tune's experiment analysis failed ({str(exc).splitlines()[0][:200]})"]
    out = {}
    base = tree.path()
    for t in analysis.trials:
        member = (t.config or {}).get("member")
        if member is None:
            continue
        df = frames.get(t.trial_id)
        if df is None:
            df = frames.get(t.path)
        wall_by_epoch = {}
        if df is not None and "epoch" in df and "time_total_s" in df:
            for e, w in zip(df["epoch"], df["time_total_s"]):
                wall_by_epoch[int(e)] = float(w)  # a repeated epoch (after a restart) keeps its latest time
        last = t.last_result or {}
        rel = t.path[len(base):].lstrip("/") if base and t.path.startswith(base) else t.path
        out[member] = {"trial_id": t.trial_id, "status": t.status, "iterations": last.get("training_iteration"),
                       "wall_seconds": last.get("time_total_s"), "wall_by_epoch": wall_by_epoch, "trial_dir": rel}
    return out, []


def _members(tree: Tree) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for name in tree.listdir(L.MEMBERS, pattern="*.json", kind="file"):
        try:
            m = tree.read_json(L.MEMBERS, name)
        except (OSError, ValueError) as exc:
            notes.append(f"{tree.uri('members', name)}: unreadable ({exc})")
            continue
        if isinstance(m, dict) and m.get("member"):
            rows.append(m)
    if not rows:  # an experiment copied without members/: summary.json has the rows, not the history
        try:
            rows = [m for m in (tree.read_json(L.SUMMARY).get("members") or []) if isinstance(m, dict)]
            if rows:
                notes.append("members/ missing: rows from summary.json (no per-rung batch sizes)")
        except (OSError, ValueError, AttributeError):
            pass
    return rows, notes


def _batch_range(history: list[dict], epochs: range | None = None) -> tuple[Any, Any]:
    bs = [int(h["batch_size"]) for h in history if "batch_size" in h and (epochs is None or h.get("epoch") in epochs)]
    return (min(bs), max(bs)) if bs else (None, None)


def results_table(experiment: str | os.PathLike, *, filesystem=None):
    """The table as a pandas DataFrame with :data:`COLUMNS`; ``df.attrs["notes"]`` lists what was
    missing.  Raises :class:`ResultsError` when ``experiment`` holds no esdbs results."""
    import pandas as pd

    tree = Tree(experiment, filesystem)
    if not tree.is_dir():
        raise ResultsError(f"{tree.root}: no such experiment directory")
    members, notes = _members(tree)
    if not members:
        raise ResultsError(f"{tree.root}: no esdbs results (no members/*.json or summary.json members)")
    tune, tune_notes = _tune(tree)
    notes += tune_notes
    rows: list[dict] = []
    by_member = {m["member"]: m for m in members}
    for m in sorted(members, key=lambda m: (str(m.get("group")), m["member"])):
        cfg = m.get("config") or {}
        t = tune.get(m["member"], {})
        history = m.get("history") or []
        common = {"group": m.get("group"), "variant": m.get("variant"), "member": m["member"], "model": m.get("model"),
                  "conv": cfg.get("conv"), "schedule": cfg.get("schedule"),
                  "batch_size": m.get("batch_size") or (cfg.get("dbs") or {}).get("b0"),
                  "trial_id": t.get("trial_id"), "status": t.get("status"), "source": t.get("trial_dir")}
        rungs = [r for r in m.get("rungs") or [] if isinstance(r, dict)]
        final = rungs[-1] if rungs else {}
        lo, hi = _batch_range(history) if history else tuple(m.get("batch_size_range") or (None, None))
        rows.append({**common, "kind": "trial", "iterations": t.get("iterations"),
                     "epoch": (history[-1]["epoch"] if history else (m.get("epochs") or 0) - 1),
                     "target_sparsity": final.get("target_sparsity"), "basis_threshold": final.get("basis_threshold"),
                     "sparsity": m.get("sparsity"),
                     "model_sparsity": m.get("model_sparsity"), "nonzero_weights": m.get("nonzero_weights"),
                     "total_weights": m.get("total_weights"), "val_accuracy": m.get("val_accuracy"),
                     "val_loss": history[-1].get("val_loss") if history else None,
                     "test_accuracy": m.get("test_accuracy"), "test_loss": m.get("test_loss"), "steps": m.get("steps"),
                     "train_seconds": m.get("train_seconds"), "mean_epoch_seconds": m.get("mean_epoch_seconds"),
                     "wall_seconds": t.get("wall_seconds", m.get("wall_seconds")), "batch_min": lo, "batch_max": hi})
        first = 0
        for r in rungs:
            end = int(r.get("epoch", first))
            lo, hi = _batch_range(history, range(first, end + 1))
            rows.append({**common, "kind": "rung", "epoch": end,
                         **{k: r.get(k) for k in ("target_sparsity", "basis_threshold", "sparsity", "model_sparsity",
                                                  "nonzero_weights",
                                                  "total_weights", "val_accuracy", "val_loss", "test_accuracy",
                                                  "test_loss", "steps", "train_seconds", "mean_epoch_seconds")},
                         "wall_seconds": (t.get("wall_by_epoch") or {}).get(end), "batch_min": lo, "batch_max": hi})
            first = end + 1
    # a rung is (target sparsity, basis threshold): BasisConv rungs (issue #16) all have target 0
    rung_rows = {(r["member"], *_rung_key(r)): r for r in rows
                 if r["kind"] == "rung" and r.get("target_sparsity") is not None}
    for name in tree.listdir(pattern=L.STACKING_GLOB, kind="file") + tree.listdir(pattern=L.RESTACK_GLOB, kind="file"):
        try:
            st = tree.read_json(name)
        except (OSError, ValueError) as exc:
            notes.append(f"{tree.uri(name)}: unreadable ({exc})")
            continue
        if not isinstance(st, dict) or not isinstance(st.get("methods"), dict):
            notes.append(f"{tree.uri(name)}: not a stacking result")
            continue
        names = list(st.get("member_names") or [])
        info = st.get("rungs") or {}
        group = st.get("variant") or next((by_member[n].get("group") for n in names if n in by_member), None)
        keys = [_rung_key({"target_sparsity": -1, **(info.get(n) or {})}) for n in names]
        parts = [rung_rows.get((n, *k)) for n, k in zip(names, keys)]
        have = all(p is not None for p in parts)
        one = names and len(set(keys)) == 1  # every member stacked at the same rung
        agg: dict[str, Any] = dict(zip(("target_sparsity", "basis_threshold"), keys[0] if one else (None, None)))
        if have and parts:
            nz = sum(int(p["nonzero_weights"] or 0) for p in parts)
            tot = sum(int(p["total_weights"] or 0) for p in parts)
            walls = [p["wall_seconds"] for p in parts if p["wall_seconds"] is not None]
            agg.update(sparsity=sum(float(p["sparsity"] or 0) for p in parts) / len(parts),
                       model_sparsity=(1 - nz / tot) if tot else None, nonzero_weights=nz, total_weights=tot,
                       steps=sum(int(p["steps"] or 0) for p in parts),
                       train_seconds=sum(float(p["train_seconds"] or 0) for p in parts),
                       wall_seconds=max(walls) if len(walls) == len(parts) else None,
                       batch_min=min((p["batch_min"] for p in parts if p["batch_min"] is not None), default=None),
                       batch_max=max((p["batch_max"] for p in parts if p["batch_max"] is not None), default=None))
        for method, r in st["methods"].items():
            rows.append({"kind": "ensemble", "group": group, "variant": group, "member": "+".join(names),
                         "method": method, "chosen": method == st.get("chosen"), **agg,
                         "val_accuracy": r.get("val_accuracy"), "val_loss": r.get("val_nll"),
                         "test_accuracy": r.get("test_accuracy"), "test_loss": r.get("test_nll"),
                         "weights": json.dumps(r.get("weights"), sort_keys=True), "source": name})
    order = {"trial": 0, "rung": 1, "ensemble": 2}
    rows.sort(key=lambda r: (str(r.get("group")), order[r["kind"]], str(r.get("member")),
                             -1.0 if r.get("target_sparsity") is None else float(r["target_sparsity"]),
                             0.0 if r.get("basis_threshold") is None else 2.0 - float(r["basis_threshold"]),
                             str(r.get("source")), str(r.get("method"))))
    df = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=list(COLUMNS))
    for c in ("batch_size", "iterations", "epoch", "nonzero_weights", "total_weights", "steps", "batch_min", "batch_max"):
        df[c] = df[c].astype("Int64")
    for c in ("target_sparsity", "basis_threshold", "sparsity", "model_sparsity", "val_accuracy", "val_loss",
              "test_accuracy",
              "test_loss", "train_seconds", "mean_epoch_seconds", "wall_seconds"):
        df[c] = df[c].astype("float64")
    df["chosen"] = df["chosen"].astype("boolean")
    df.attrs["notes"] = notes
    df.attrs["experiment"] = tree.root
    return df


def format_results(df, fmt: str) -> bytes:
    """``table``: the main columns, aligned, for a terminal; ``csv``: every column; ``parquet``: every
    column with its type (nullable integers stay integers)."""
    if fmt == "csv":
        return df.to_csv(index=False).encode()
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    import pandas as pd

    shown = df[list(TABLE_COLUMNS)].copy()
    for c in ("target_sparsity", "basis_threshold", "val_accuracy", "test_accuracy", "test_loss", "sparsity",
              "model_sparsity"):
        shown[c] = shown[c].map(lambda v: "" if v != v or v is None else f"{v:.4f}")
    shown["wall_seconds"] = shown["wall_seconds"].map(lambda v: "" if v != v or v is None else f"{v:.1f}")
    shown["method"] = [("* " if c is not None and c is not pd.NA and bool(c) else "") + (m if isinstance(m, str) else "")
                       for m, c in zip(df["method"], df["chosen"].astype(object))]
    return (shown.fillna("").astype(str).to_string(index=False) + "\n").encode()


def _rung_key(r: dict) -> tuple:
    """(target sparsity, basis threshold or None), rounded: how a rung is named (compression.py)."""
    bt = r.get("basis_threshold")
    return round(float(r["target_sparsity"]), 6), None if bt is None else round(float(bt), 6)
