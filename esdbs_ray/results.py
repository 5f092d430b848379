"""``esdbs results EXP``: one tidy table of everything a run measured, for a local path or a URI.

One row per observation, one column per quantity (``COLUMNS``):

* ``kind="trial"``    one per Tune trial: its member, Tune's status, iterations and wall time
  (``ExperimentAnalysis``), the final rung's accuracy, loss and sparsity, steps, training seconds, the
  batch-size range it trained at;
* ``kind="level"``    one per level of a self-expanding member (the network before each expansion,
  then the grown one): its parameter count and validation and test figures;
* ``kind="rung"``     one per member and pruning rung: validation and test accuracy and loss, the
  sparsity of the pruned layers and of the whole model, nonzero weights, steps and training seconds
  up to the rung, Tune's wall time at the rung's last epoch, the batch-size range within the rung;
* ``kind="ensemble"`` one per stacking file and method (``chosen`` marks the one the ensemble uses):
  weights, validation and test accuracy and NLL (in the ``*_loss`` columns: a member's loss is its
  mean cross-entropy, the same quantity), the cross-validated estimate inside the validation split
  (``cv_accuracy``, ``cv_loss``: weights fitted on the other folds; empty in files written before
  it), and the members' summed weights and steps at that rung.

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

from .errors import UserError
from .layout import ExperimentLayout as L
from .records import EpochRecord, MemberSummary, Rung, RungResult
from .stacking_run import config_member_order
from .storage import Tree
from .tune_analysis import tune_trials

COLUMNS = (
    "kind", "group", "variant", "member", "model", "conv", "schedule", "batch_size", "method", "chosen",
    "trial_id", "status", "iterations", "epoch", "target_sparsity", "basis_threshold", "level", "params", "sparsity",
    "model_sparsity",
    "nonzero_weights", "total_weights", "val_accuracy", "val_loss", "cv_accuracy", "cv_loss", "test_accuracy",
    "test_loss", "test_ece", "steps",
    "train_seconds", "mean_epoch_seconds", "wall_seconds", "batch_min", "batch_max", "weights", "source",
)
FORMATS = ("table", "csv", "parquet")

__all__ = ["results_table", "replicate_results", "format_results", "COLUMNS", "FORMATS", "ResultsError"]


class ResultsError(UserError):
    """Not an experiment esdbs can tabulate; the message names it."""


def _members(tree: Tree) -> tuple[list[MemberSummary], list[str]]:
    rows, notes = [], []
    for name in tree.listdir(L.MEMBERS, pattern="*.json", kind="file"):
        try:
            m = MemberSummary.from_dict(tree.read_json(L.MEMBERS, name))
        except (OSError, ValueError) as exc:
            notes.append(f"{tree.uri(L.MEMBERS, name)}: unreadable ({exc})")
            continue
        if m.member:
            rows.append(m)
    if not rows:  # an experiment copied without members/: summary.json has the rows, not the history
        try:
            rows = [MemberSummary.from_dict(m) for m in (tree.read_json(L.SUMMARY).get("members") or [])
                    if isinstance(m, dict)]
            if rows:
                notes.append("members/ missing: rows from summary.json (no per-rung batch sizes)")
        except (OSError, ValueError, AttributeError):
            pass
    return rows, notes


def _batch_range(history: list[EpochRecord], epochs: range | None = None) -> tuple[Any, Any]:
    bs = [h.batch_size for h in history if h.batch_size is not None and (epochs is None or h.epoch in epochs)]
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
    tune, tune_notes = tune_trials(tree)
    notes += tune_notes
    rows: list[dict] = []
    by_member = {m.member: m for m in members}
    config_order = {name: i for i, name in enumerate(config_member_order(tree))}
    position = {m.member: (config_order.get(m.member, len(config_order)), m.member) for m in members}
    for m in sorted(members, key=lambda m: (str(m.group), position[m.member])):
        cfg = m.config or {}
        t = tune.get(m.member, {})
        history = m.history
        common = {"group": m.group, "variant": m.variant, "member": m.member, "model": m.model,
                  "conv": cfg.get("conv"), "schedule": cfg.get("schedule"),
                  "batch_size": m.batch_size or (cfg.get("dbs") or {}).get("b0"),
                  "trial_id": t.get("trial_id"), "status": t.get("status"), "source": t.get("trial_dir")}
        final = m.final or RungResult(target_sparsity=None)
        lo, hi = _batch_range(history) if history else tuple(m.batch_size_range or (None, None))
        rows.append({**common, "kind": "trial", "iterations": t.get("iterations"),
                     "epoch": (history[-1].epoch if history else (m.epochs or 0) - 1),
                     "target_sparsity": final.target_sparsity, "basis_threshold": final.basis_threshold,
                     "sparsity": m.sparsity, "model_sparsity": m.model_sparsity, "nonzero_weights": m.nonzero_weights,
                     "total_weights": m.total_weights, "val_accuracy": m.val_accuracy,
                     "val_loss": history[-1].val_loss if history else None,
                     "test_accuracy": m.test_accuracy, "test_loss": m.test_loss, "steps": m.steps,
                     "train_seconds": m.train_seconds, "mean_epoch_seconds": m.mean_epoch_seconds,
                     "wall_seconds": t.get("wall_seconds", m.wall_seconds), "batch_min": lo, "batch_max": hi})
        first = 0
        for r in m.rungs:
            end = r.epoch if r.epoch is not None else first
            lo, hi = _batch_range(history, range(first, end + 1))
            rows.append({**common, "kind": "rung", "epoch": end, "rung": r.rung,
                         **{k: getattr(r, k) for k in ("target_sparsity", "basis_threshold", "sparsity",
                                                       "model_sparsity", "nonzero_weights", "total_weights",
                                                       "val_accuracy", "val_loss", "test_accuracy", "test_loss",
                                                       "test_ece", "steps", "train_seconds", "mean_epoch_seconds")},
                         "wall_seconds": (t.get("wall_by_epoch") or {}).get(end), "batch_min": lo, "batch_max": hi})
            first = end + 1
        for r in m.levels:  # a growing member's levels: the network before each expansion, then the grown one
            rows.append({**common, "kind": "level", "epoch": r.epoch, "rung": r.rung, "level": r.level,
                         "params": r.params, **{k: getattr(r, k) for k in (
                             "target_sparsity", "sparsity", "model_sparsity", "nonzero_weights", "total_weights",
                             "val_accuracy", "val_loss", "test_accuracy", "test_loss", "test_ece", "steps",
                             "train_seconds")},
                         "wall_seconds": (t.get("wall_by_epoch") or {}).get(r.epoch)})
    rung_rows = {(r["member"], r["rung"]): r for r in rows if r["kind"] in ("rung", "level")}
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
        group = st.get("variant") or next((by_member[n].group for n in names if n in by_member), None)
        keys = [_stacked_rung(info.get(n)) for n in names]
        parts = [rung_rows.get((n, k)) for n, k in zip(names, keys)]
        have = all(p is not None for p in parts)
        one = names and len(set(keys)) == 1  # every member stacked at the same rung
        agg: dict[str, Any] = keys[0].as_dict() if one and keys[0] is not None else \
            {"target_sparsity": None, "basis_threshold": None}
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
        evaluation = st.get("evaluation") if isinstance(st.get("evaluation"), dict) else {}
        for method, r in st["methods"].items():
            rows.append({"kind": "ensemble", "group": group, "variant": group,
                         "member": "+".join(sorted(names, key=lambda n: position.get(n, (0, n)))),
                         "method": method, "chosen": method == st.get("chosen"), **agg,
                         "val_accuracy": r.get("val_accuracy"), "val_loss": r.get("val_nll"),
                         "cv_accuracy": r.get("cv_accuracy"), "cv_loss": r.get("cv_nll"),
                         "test_accuracy": r.get("test_accuracy"), "test_loss": r.get("test_nll"),
                         # the stacking file evaluates its chosen ensemble only
                         "test_ece": (evaluation.get("ensemble") or {}).get("ece") if method == st.get("chosen") else None,
                         "weights": json.dumps(_in_order(r.get("weights"), position)), "source": name})
    order = {"trial": 0, "level": 1, "rung": 2, "ensemble": 3}
    rows.sort(key=lambda r: (str(r.get("group")), order[r["kind"]], position.get(r.get("member"), (0, str(r.get("member")))),
                             -1.0 if r.get("target_sparsity") is None else float(r["target_sparsity"]),
                             0.0 if r.get("basis_threshold") is None else 2.0 - float(r["basis_threshold"]),
                             str(r.get("source")), str(r.get("method"))))
    df = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=list(COLUMNS))
    for c in ("batch_size", "iterations", "epoch", "level", "params", "nonzero_weights", "total_weights", "steps",
              "batch_min", "batch_max"):
        df[c] = df[c].astype("Int64")
    for c in ("target_sparsity", "basis_threshold", "sparsity", "model_sparsity", "val_accuracy", "val_loss",
              "cv_accuracy", "cv_loss", "test_accuracy",
              "test_loss", "test_ece", "train_seconds", "mean_epoch_seconds", "wall_seconds"):
        df[c] = df[c].astype("float64")
    df["chosen"] = df["chosen"].astype("boolean")
    df.attrs["notes"] = notes
    df.attrs["experiment"] = tree.root
    return df


def format_results(df, fmt: str, columns: list[str] | None = None) -> bytes:
    """``table``: per group, each member's rungs and each stacking file's methods, with validation and
    test accuracy and loss and the ensembles' weights, fitting 120 columns (``columns``: an aligned
    table of those columns instead); ``csv``: every column; ``parquet``: every column with its type
    (nullable integers stay integers)."""
    if fmt == "csv":
        return df.to_csv(index=False).encode()
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    if fmt != "table":
        raise ResultsError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if columns:
        unknown = [c for c in columns if c not in (*REPLICATE_COLUMNS, *COLUMNS)]
        if unknown:
            raise ResultsError(f"--columns: unknown {unknown}; choose from {', '.join(COLUMNS)}")
        def cell(v) -> str:
            # floats at 4 decimals as in the default view (csv / parquet keep every digit)
            return "" if not _present(v) else f"{v:.4f}" if isinstance(v, float) else str(v)

        shown = df[list(columns)].astype(object).map(cell)
        return (shown.to_string(index=False) + "\n").encode()
    if "replicate" in df.columns:  # several replicates: a block each
        blocks = [f"== {r} ==\n" + _compact(df[df["replicate"] == r]) for r in dict.fromkeys(df["replicate"])]
        return "\n".join(blocks).encode()
    return _compact(df).encode()


def _present(v) -> bool:
    """Neither None, nor pandas' NA, nor NaN."""
    import pandas as pd

    return v is not None and not pd.isna(v)


def _num(v, spec: str) -> str:
    return format(v, spec) if _present(v) else ""


def _compact(df) -> str:
    """The default view: a block per group; trial rows (Tune's status, wall time) only in csv/parquet."""
    sources: dict[str, int] = {}
    width = max([len(str(m)) for m in df.loc[df["kind"].isin(("rung", "level")), "member"]] + [6])
    head = (f"{'kind':<8} {'member':<{width}} {'method':<17} {'rung':>6} {'val acc':>7} {'val loss':>8} "
            f"{'cv acc':>6} {'test acc':>8} {'test loss':>9} {'ECE':>6} weights")
    out = []
    for group in dict.fromkeys(df["group"]):
        g = df[df["group"] == group]
        members = [m for m in dict.fromkeys(g.loc[g["kind"].isin(("rung", "level")), "member"])]
        out += ["", f"{group}: members {', '.join(members)} (ensemble weights in this order)", head]
        for r in g[g["kind"] != "trial"].itertuples(index=False):
            rung = (f"t={r.basis_threshold:g}" if _present(r.basis_threshold)
                    else f"L{r.level}" if _present(r.level) else _num(r.target_sparsity, "g"))
            if r.kind == "ensemble":
                src = sources.setdefault(r.source, len(sources) + 1)
                w = json.loads(r.weights) if isinstance(r.weights, str) else {}
                method = ("* " if _present(r.chosen) and bool(r.chosen) else "  ") + str(r.method)
                tail = " " + " ".join(f"{w[m]:.3f}" for m in members if m in w) + f" [{src}]"
                member = ""
            else:
                method, tail, member = "", "", r.member
            out.append(f"{r.kind:<8} {member:<{width}} {method:<17} {rung:>6} {_num(r.val_accuracy, '.4f'):>7} "
                       f"{_num(r.val_loss, '.4f'):>8} {_num(r.cv_accuracy, '.4f'):>6} {_num(r.test_accuracy, '.4f'):>8} "
                       f"{_num(r.test_loss, '.4f'):>9} "
                       f"{_num(r.test_ece, '.4f'):>6}" + tail)
    if sources:
        out += ["", "* the method whose weights the file's ensemble uses; cv acc: its accuracy with weights",
                "fitted on the other folds of the validation split (cross-validated); [n] the stacking file:"]
        out += [f"  [{i}] {name}" for name, i in sources.items()]
    return "\n".join(line.rstrip() for line in out[1:]) + "\n"


REPLICATE_COLUMNS = ("replicate", "seed")


def replicate_results(experiments, labels, seeds, *, filesystem=None):
    """``esdbs results DIR DIR ...`` (replicates of one config, or a multi-seed run): each experiment's
    :func:`results_table`, one after another, with the columns ``replicate`` (``labels``) and ``seed``
    first; notes lead with the replicate's label."""
    import pandas as pd

    frames, notes = [], []
    for root, label, seed in zip(experiments, labels, seeds):
        df = results_table(root, filesystem=filesystem)
        df.insert(0, "seed", seed)
        df.insert(0, "replicate", label)
        notes += [f"{label}: {n}" for n in df.attrs.get("notes", [])]
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["seed"] = out["seed"].astype("Int64")
    out.attrs["notes"] = notes
    return out


def _in_order(weights, position: dict) -> dict | None:
    if not isinstance(weights, dict):
        return weights
    return {k: weights[k] for k in sorted(weights, key=lambda n: position.get(n, (0, n)))}


def _stacked_rung(info: Any) -> Rung | None:
    """The rung a stacking file says a member was stacked at (None when it does not say)."""
    try:
        return Rung.of(info) if isinstance(info, dict) and info.get("target_sparsity") is not None else None
    except ValueError:
        return None
