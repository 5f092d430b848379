"""What a pool's candidates cost to run, and the accuracy-cost front of the ensembles chosen from them.

Two costs per candidate (spec section 5, "Pools"):

* **multiply-adds** per image by its nonzero weights, machine-independent: the convolutions as
  :func:`esdbs_ray.compression.conv_cost` counts them (the trainer's rung records use the same count;
  a Winograd-ReLU layer's nonzero Winograd-domain weights x tiles, a spatial conv's nonzero weights x
  output pixels), plus the fully connected layers' nonzero weights;
* **measured milliseconds per image** at batch 256, as ``esdbs predict`` runs the member (batch norm
  folded, the layer implementation ``auto`` picks on this machine, sparse Winograd products where they
  pay): :func:`esdbs_ray.export.measure_latency`, the export manifest's own measurement, with the
  candidates timed in turn so that a change of load reaches them all alike.

Both are cached in the experiment (``OUT/candidate_costs.json``), the time per hardware (CPU model, device,
torch threads) with the load average when it was measured; a weights file that changed is measured
again.  A candidate whose weights the run did not keep (``keep_weights: stacked``) has multiply-adds
(from its rung record) but no measured time, so an ``--budget-ms`` never admits it.

The **front** (:func:`build_front`): the methods of ``pool.py`` run under a ladder of budgets (and
every single candidate, and the experiments' own stacks), each ensemble with its cross-validated
accuracy; the front is the ensembles no other beats on both cost and CV accuracy (the choice is the
validation split's; test accuracy is reported beside it).  Written as JSON (in the pool file), Parquet
and a PNG.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import storage
from .layout import ExperimentLayout
from .pool import Budget, MethodResult, Pool, PoolError, fit_method

__all__ = ["CandidateCost", "candidate_costs", "model_macs", "hardware", "FRONT_METHODS", "build_front",
           "front_table", "plot_front", "cost_arrays"]

FRONT_METHODS = ("caruana", "nll_topk", "equal_topk")
COST_FORMAT = 1


@dataclass(frozen=True)
class CandidateCost:
    """A candidate's multiply-adds per image and measured ms per image (None: unknown, and why)."""

    id: str
    macs: float | None
    ms_per_image: float | None
    measured: str | None  # "now" | "cache" | None
    note: str | None = None


def hardware() -> dict[str, Any]:
    """What a measured time belongs to: the CPU model, the device and torch's thread count."""
    import torch

    from .provenance import cpu_model

    hw = {"hardware": cpu_model(), "device": "cpu", "torch_threads": torch.get_num_threads()}
    hw["key"] = f"{hw['hardware']} | {hw['device']} | {hw['torch_threads']} thread(s)"
    return hw


def model_macs(model, shape: tuple[int, int, int]) -> int:
    """Multiply-adds per image by nonzero weights: :func:`~esdbs_ray.compression.conv_cost`'s conv
    multiplications plus each fully connected layer's nonzero weights (one multiply-add each)."""
    import torch
    from torch import nn

    from .compression import conv_cost

    linear = sum(int(torch.count_nonzero(m.weight)) for m in model.modules() if isinstance(m, nn.Linear))
    return int(conv_cost(model, shape)["conv_mults"]) + linear


def _linear_macs(spec, shape: tuple[int, int, int], num_classes: int) -> int:
    """The fully connected layers of a member's architecture (never pruned: every weight counts)."""
    from torch import nn

    from .networks import build_network

    net = build_network(spec.train.model, num_classes=num_classes, in_channels=shape[0], image_size=shape[1],
                        width=spec.train.width, conv="spatial")
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))


def _load_cache(tree: storage.Tree) -> dict:
    try:
        cache = tree.read_json(ExperimentLayout.POOL_COST)
    except (OSError, ValueError):
        return {}
    return cache.get("candidates", {}) if isinstance(cache, dict) and cache.get("format") == COST_FORMAT else {}


def candidate_costs(pool: Pool, *, measure: bool = True, remeasure: bool = False, reps: int = 5, batch: int = 256,
                    log: Callable[[str], None] | None = None) -> tuple[list[CandidateCost], dict]:
    """Every candidate's cost, from the experiments' caches or computed now (``measure``: time those
    with weights and no time for this hardware; ``remeasure``: time them all again).  Returns the costs
    in the pool's order and the hardware they were measured on (with the load average)."""
    from .export import _input_from_data, _member_weights, _rung_model, measure_latency
    from .stacking_run import _saved_config

    hw = hardware()
    out: dict[str, CandidateCost] = {}
    for root in pool.experiments:
        tree = storage.Tree(root)
        cands = [c for c in pool.candidates if c.experiment == root]
        cache = _load_cache(tree)
        cfg = _saved_config(tree)
        if cfg is None:  # predictions without the run's config: no architecture to count or time
            for c in cands:
                out[c.id] = CandidateCost(id=c.id, macs=None, ms_per_image=None, measured=None,
                                          note="no readable config.yaml in the experiment")
            continue
        specs = {t.member: t for t in cfg.trials()}
        changed, models, shape, unweighted = False, {}, None, []
        for c in cands:
            key = f"{c.member}@{c.rung.tag()}"
            spec = specs.get(c.member)
            wname = ExperimentLayout.rung_weights_name(c.member, c.rung.target_sparsity, c.rung.level)
            wbytes = tree.fs.get_file_info(tree.path(ExperimentLayout.WEIGHTS, wname)).size \
                if spec is not None and not c.rung.is_basis and tree.is_file(ExperimentLayout.WEIGHTS, wname) else None
            entry = cache.get(key) if isinstance(cache.get(key), dict) else None
            if entry is not None and entry.get("weights_bytes") != wbytes:
                entry = None  # the weights changed since they were counted and timed
            if entry is None or (wbytes is not None and measure and (remeasure or hw["key"] not in entry.get("measured", {}))):
                entry = dict(entry or {}, weights_bytes=wbytes, measured=dict((entry or {}).get("measured", {})))
                if wbytes is not None:
                    w = _member_weights(tree, spec, c.rung.target_sparsity, c.rung.level)
                    if w["input"] is None:
                        raise PoolError(f"{tree.uri(w['source'])}: carries no input size; re-run the experiment")
                    shape = (int(w["input"]["in_channels"]), int(w["input"]["image_size"]), int(w["input"]["image_size"]))
                    model, _ = _rung_model(tree, spec, w, c.rung.target_sparsity, c.rung.level,
                                           len(w["input"]["class_names"]), shape, name=key)
                    entry["macs"] = model_macs(model, shape)
                    entry["weights_source"] = w["source"]
                    if measure:
                        models[key] = model
                else:
                    unweighted.append((c, key, spec))
                cache[key] = entry
                changed = True
        for c, key, spec in unweighted:  # after the weights: any of them gives the input size
            if cache[key].get("macs") is None:
                if shape is None:
                    info = _input_from_data(cfg)
                    shape = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
                cache[key]["macs"] = _record_macs(tree, c, spec, shape, len(pool.class_names or []) or
                                                  int(pool.val.shape[2]))
        if models:
            if log:
                log(f"timing {len(models)} candidate(s) of {tree.root} at batch {batch}, {reps} rounds ...")
            lat = measure_latency(models, shape, batches=((batch, reps),))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for key, r in lat["members"].items():
                cache[key]["measured"][hw["key"]] = {
                    "ms_per_image": r[f"batch_{batch}_ms_per_image"], "batch": batch, "rounds": reps,
                    "hardware": hw["hardware"], "device": hw["device"], "torch_threads": hw["torch_threads"],
                    "load_average": load, "when": when, "candidates_timed_together": len(models)}
        if changed:
            try:
                storage.write_json(storage.join(tree.root, ExperimentLayout.POOL_COST),
                                   {"format": COST_FORMAT, "candidates": cache})
            except OSError as exc:  # a read-only experiment: the costs are used, not kept
                if log:
                    log(f"note: {tree.uri(ExperimentLayout.POOL_COST)} not written ({exc.__class__.__name__})")
        for c in cands:
            e = cache[f"{c.member}@{c.rung.tag()}"]
            m = (e.get("measured") or {}).get(hw["key"])
            fresh = bool(models) and f"{c.member}@{c.rung.tag()}" in models
            out[c.id] = CandidateCost(id=c.id, macs=e.get("macs"), ms_per_image=m["ms_per_image"] if m else None,
                                      measured=("now" if fresh else "cache") if m else None,
                                      note=None if m else ("no weights kept for this rung" if e.get("weights_bytes")
                                                           is None else "not timed on this hardware"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return [out[c.id] for c in pool.candidates], {**hw, "load_average": list(load) if load else None}


def _record_macs(tree: storage.Tree, c, spec, shape: tuple[int, int, int], num_classes: int) -> int | None:
    """A candidate without kept weights: its rung record's conv multiplications plus the architecture's
    fully connected layers (None when the record is missing)."""
    from .records import MemberSummary

    try:
        rec = MemberSummary.from_dict(tree.read_json(ExperimentLayout.MEMBERS,
                                                     ExperimentLayout.member_name(c.member))).rung(c.rung)
    except (OSError, ValueError):
        return None
    if rec is None or rec.conv_mults is None or spec is None:
        return None
    return int(rec.conv_mults) + _linear_macs(spec, shape, num_classes)


def cost_arrays(costs: Sequence[CandidateCost]) -> dict[str, np.ndarray]:
    """{"ms_per_image", "macs"}: [M] float arrays, NaN where unknown."""
    return {"ms_per_image": np.array([np.nan if c.ms_per_image is None else c.ms_per_image for c in costs]),
            "macs": np.array([np.nan if c.macs is None else float(c.macs) for c in costs])}


def make_budget(costs: Mapping[str, np.ndarray], *, ms: float | None = None, macs: float | None = None) -> Budget | None:
    names, limits = [], []
    for name, limit in (("ms_per_image", ms), ("macs", macs)):
        if limit is not None:
            names.append(name)
            limits.append(float(limit))
    if not names:
        return None
    return Budget(costs=np.stack([costs[n] for n in names]), limits=np.array(limits), names=tuple(names))


# --------------------------------------------------------------------------------------------------
# The front
# --------------------------------------------------------------------------------------------------
def _single(pool: Pool, j: int, costs: Mapping[str, np.ndarray]) -> MethodResult:
    """One candidate alone: nothing is fitted, so its cross-validated figures are its validation ones."""
    from .pool import ensemble_metrics

    w = np.zeros(pool.size)
    w[j] = 1.0
    m = ensemble_metrics(pool, w)
    return MethodResult(method="single", weights={pool.ids[j]: 1.0}, **m, cv_accuracy=m["val_accuracy"],
                        cv_nll=m["val_nll"], cv_fold_nll=None,
                        ms_per_image=None if np.isnan(costs["ms_per_image"][j]) else float(costs["ms_per_image"][j]),
                        macs=None if np.isnan(costs["macs"][j]) else float(costs["macs"][j]), seconds=0.0)


def _on_front(points: list[dict], axis: str) -> list[bool]:
    """Pareto-optimal points on (``axis`` cost: lower, CV accuracy: higher, then CV NLL: lower)."""
    order = sorted((i for i, p in enumerate(points) if p[axis] is not None and p["cv_accuracy"] is not None),
                   key=lambda i: (points[i][axis], -points[i]["cv_accuracy"], points[i]["cv_nll"]))
    flags = [False] * len(points)
    best = -np.inf
    for i in order:
        if points[i]["cv_accuracy"] > best + 1e-12:
            flags[i] = True
            best = points[i]["cv_accuracy"]
    return flags


def build_front(pool: Pool, costs: Mapping[str, np.ndarray], *, unconstrained: Mapping[str, MethodResult],
                references: Mapping[str, MethodResult], folds: np.ndarray | None, k: int, rounds: int,
                seed_supports: Sequence[Sequence[int]] = (), levels: int = 10,
                log: Callable[[str], None] | None = None) -> list[dict]:
    """Every ensemble considered (singles, the methods under a ladder of ``levels`` budgets on each
    known cost, the unconstrained selection, the experiments' stacks), each a row with its figures,
    its costs and ``front_ms`` / ``front_macs`` flags."""
    rows: list[dict] = []
    seen: set = set()

    def add(kind: str, label: str, r: MethodResult, budget: dict | None = None) -> None:
        key = tuple(sorted((c, round(w, 9)) for c, w in r.weights.items()))
        if key in seen and kind == "budget":
            return
        seen.add(key)
        rows.append({"kind": kind, "label": label, "method": r.method, "budget": budget, "members": r.size,
                     "weights": dict(r.weights), "ms_per_image": r.ms_per_image, "macs": r.macs,
                     **{f: getattr(r, f) for f in ("val_accuracy", "val_nll", "cv_accuracy", "cv_nll",
                                                   "test_accuracy", "test_nll")}})

    for name, r in references.items():
        add("stack", f"stack {name}", r)
    for m, r in unconstrained.items():
        add("selection", m, r)
    for j in range(pool.size):
        add("single", pool.ids[j], _single(pool, j, costs))
    for axis in ("ms_per_image", "macs"):
        known = costs[axis][~np.isnan(costs[axis])]
        tops = [r[axis] for r in rows if r["kind"] != "single" and r[axis] is not None]
        if known.size < 2:
            continue
        top = max(tops) if tops else float(np.sort(known)[-k:].sum())  # no ensemble priced: k dearest singles
        grid = np.geomspace(float(known.min()) * 1.05, top, levels)
        t0 = time.perf_counter()
        for b in grid:
            budget = make_budget(costs, **({"ms": b} if axis == "ms_per_image" else {"macs": b}))
            for m in FRONT_METHODS:
                try:
                    r = fit_method(pool, m, budget=budget, k=k, rounds=rounds, folds=folds,
                                   seed_supports=seed_supports, costs=costs)
                except PoolError:  # nothing fits this budget
                    continue
                add("budget", f"{m} <= {b:.4g} {'ms' if axis == 'ms_per_image' else 'MACs'}", r,
                    {axis: float(b)})
        if log:
            log(f"front on {axis}: {levels} budgets x {len(FRONT_METHODS)} methods in {time.perf_counter() - t0:.1f} s")
    for axis, flag in (("ms_per_image", "front_ms"), ("macs", "front_macs")):
        for r, f in zip(rows, _on_front(rows, axis)):
            r[flag] = f
    return rows


def front_table(rows: Sequence[dict]):
    """The front's rows as a pandas DataFrame (weights as JSON text), for Parquet."""
    import json

    import pandas as pd

    cols = ["kind", "label", "method", "members", "ms_per_image", "macs", "val_accuracy", "val_nll", "cv_accuracy",
            "cv_nll", "test_accuracy", "test_nll", "front_ms", "front_macs", "weights", "budget"]
    df = pd.DataFrame([{**r, "weights": json.dumps(r["weights"]), "budget": json.dumps(r["budget"])} for r in rows],
                      columns=cols)
    for c in ("ms_per_image", "macs", "val_accuracy", "val_nll", "cv_accuracy", "cv_nll", "test_accuracy", "test_nll"):
        df[c] = df[c].astype("float64")
    df["members"] = df["members"].astype("Int64")
    return df


def plot_front(path: str, rows: Sequence[dict], *, title: str) -> str | None:
    """Two panels per known cost (ms per image, multiply-adds): cross-validated accuracy (what
    chooses) and test accuracy (what reports) against cost, log scale; every ensemble grey, the front
    joined, the experiments' stacks as stars, the chosen ensemble ringed (None: no cost is known)."""
    from .analysis.figures import _plt

    axes_used = [a for a in ("ms_per_image", "macs") if any(r[a] is not None for r in rows)]
    if not axes_used:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(axes_used), 2, figsize=(11, 4.2 * len(axes_used)), squeeze=False)
    for row, axis in zip(axes, axes_used):
        flag = "front_ms" if axis == "ms_per_image" else "front_macs"
        for ax, score, name in ((row[0], "cv_accuracy", "cross-validated accuracy (chooses)"),
                                (row[1], "test_accuracy", "test accuracy (reports)")):
            pts = [r for r in rows if r[axis] is not None and r[score] is not None]
            ax.scatter([r[axis] for r in pts if r["kind"] == "single"], [r[score] for r in pts if r["kind"] == "single"],
                       s=14, color="0.7", label="single candidates")
            ax.scatter([r[axis] for r in pts if r["kind"] == "budget"], [r[score] for r in pts if r["kind"] == "budget"],
                       s=14, color="#9ecae1", label="ensembles under a budget")
            front = sorted((r for r in pts if r.get(flag)), key=lambda r: r[axis])
            ax.plot([r[axis] for r in front], [r[score] for r in front], "-o", color="#d62728", ms=4,
                    label="front (on CV accuracy)")
            for r in pts:
                if r["kind"] == "stack":
                    ax.scatter([r[axis]], [r[score]], marker="*", s=180, color="black", zorder=5, label=r["label"])
                if r["kind"] == "selection" and r.get("chosen"):
                    ax.scatter([r[axis]], [r[score]], s=160, facecolors="none", edgecolors="#2ca02c", lw=2,
                               zorder=6, label=f"chosen: {r['label']}")
            ax.set_xscale("log")
            ax.set_xlabel("ms per image (batch 256, this machine)" if axis == "ms_per_image" else
                          "multiply-adds per image (nonzero weights)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            lo = min((r[score] for r in pts if r.get(flag) or r["kind"] in ("stack", "selection")), default=None)
            if lo is not None:
                ax.set_ylim(max(0.0, lo - 0.03), None)
        row[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
