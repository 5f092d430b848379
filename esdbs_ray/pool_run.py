"""``esdbs stack EXP [EXP...] --pool``: an ensemble chosen from every candidate of the experiments.

:func:`pool_experiments` loads the pool (:func:`esdbs_ray.pool.load_pool`), costs its candidates
(``pool_cost.py``: multiply-adds, and ms per image measured here and cached in each experiment), maps
the experiments' own stacks into it, selects (every method with its cross-validated estimate; the
budget, when given, limits every method), builds the accuracy-cost front and writes, beside the first
experiment's stacking files::

    pool-<time>-<tag>.json           candidates, methods (val / CV / test, cost), the choice, the
                                     experiments' stacks, the comparison with the paper's stack, the front
    pool-<time>-<tag>-front.parquet  every ensemble considered, with its costs and front flags
    pool-<time>-<tag>-front.png      the front: CV accuracy (chooses) and test accuracy (reports) vs cost

``esdbs export --stack pool-....json`` exports the chosen ensemble (``export_pool``).
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np

from . import storage
from .layout import ExperimentLayout
from .pool import (EPS, POOL_METHODS, MethodResult, Pool, PoolError, load_pool, reference_stacks, select,
                   support_of)
from .pool_cost import build_front, candidate_costs, cost_arrays, front_table, make_budget, plot_front
from .stacking import CV_FOLDS, cv_folds_of

__all__ = ["pool_experiments", "format_pool", "export_pool", "PAPER_STACK", "CHEAP_FRACTION", "NEAR_POINTS"]

PAPER_STACK = "SWR-CNN+DBS"  # the paper's stack: the reference the pool's choice is compared with
CHEAP_FRACTION = 1 / 3  # a "cheap" ensemble costs at most this share of the paper stack's measured time
NEAR_POINTS = 0.005  # ... and is "near" it within half a point of test accuracy


class _Rerun:
    def __repr__(self) -> str:
        return "RERUN"


RERUN = _Rerun()


def _candidate_rows(pool: Pool, costs) -> list[dict]:
    rows = []
    for j, (c, cost) in enumerate(zip(pool.candidates, costs)):
        rows.append({**c.to_dict(),
                     "val_accuracy": float(np.mean(pool.val_pred[j] == pool.y_val)),
                     "val_nll": float(-np.mean(np.log(np.maximum(pool.val_true[:, j], EPS)))),
                     "test_accuracy": float(np.mean(pool.test_pred[j] == pool.y_test)),
                     "test_nll": float(-np.mean(np.log(np.maximum(pool.test_true[:, j], EPS)))),
                     "macs": cost.macs, "ms_per_image": cost.ms_per_image, "cost_measured": cost.measured,
                     "cost_note": cost.note})
    return rows


def _reference_key(references: dict[str, MethodResult], wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted not in references:
            raise PoolError(f"--reference {wanted!r}: no such stack in the experiments; stacks: "
                            f"{', '.join(references) or 'none'}")
        return wanted
    paper = [k for k in references if k.split(":")[-1] == PAPER_STACK]
    return (paper or list(references) or [None])[0]


def _comparison(chosen: MethodResult, ref: MethodResult | None, front: list[dict] | None) -> dict | None:
    """The chosen ensemble against the paper's stack (validation NLL, test accuracy), and the cheapest
    ensemble of the front within ``NEAR_POINTS`` of the stack's test accuracy at no more than
    ``CHEAP_FRACTION`` of its measured cost (None when there is none: the closest one says why)."""
    if ref is None:
        return None
    out = {"val_nll": {"chosen": chosen.val_nll, "stack": ref.val_nll,
                       "chosen_at_most_stack": chosen.val_nll <= ref.val_nll + 1e-12},
           "test_accuracy": {"chosen": chosen.test_accuracy, "stack": ref.test_accuracy,
                             "difference": chosen.test_accuracy - ref.test_accuracy},
           "cost": {"chosen_ms_per_image": chosen.ms_per_image, "stack_ms_per_image": ref.ms_per_image,
                    "chosen_macs": chosen.macs, "stack_macs": ref.macs}}
    if front is not None and ref.ms_per_image is not None:
        limit = CHEAP_FRACTION * ref.ms_per_image
        cheap = [r for r in front if r.get("front_ms") and r["ms_per_image"] is not None and r["ms_per_image"] <= limit]
        near = [r for r in cheap if r["test_accuracy"] >= ref.test_accuracy - NEAR_POINTS - 1e-12]
        best_cheap = max(cheap, key=lambda r: (r["test_accuracy"], -r["ms_per_image"]), default=None)
        out["cheap"] = {
            "rule": f"an ensemble of the front (on measured ms) at <= {CHEAP_FRACTION:.3g} of the stack's measured "
                    f"cost within {100 * NEAR_POINTS:g} pt of its test accuracy",
            "cost_limit_ms": limit, "found": bool(near),
            "ensemble": _brief(min(near, key=lambda r: r["ms_per_image"])) if near else None,
            "best_under_limit": _brief(best_cheap) if best_cheap else None}
    return out


def _brief(r: dict) -> dict:
    return {k: r.get(k) for k in ("label", "members", "weights", "ms_per_image", "macs", "cv_accuracy",
                                  "test_accuracy", "val_nll")}


def pool_experiments(experiments: Sequence[str | os.PathLike], *, methods: Sequence[str] = POOL_METHODS, k: int = 5,
                     rounds: int = 50, folds: int = CV_FOLDS, seed: int = 0, choose: str = "cv",
                     budget_ms: float | None = None, budget_macs: float | None = None, measure: bool = True,
                     remeasure: bool = False, front: bool = True, front_levels: int = 10,
                     reference: str | None = None, output: Any = RERUN,
                     log: Callable[[str], None] | None = None) -> dict:
    """Choose an ensemble from every candidate of ``experiments``; write the pool file (``output``: a
    path, or ``RERUN`` for a new ``pool-<time>-<tag>.json`` in the first experiment) and its front.
    Returns the pool file's content, with ``"output"`` naming it."""
    for name, v in (("--budget-ms", budget_ms), ("--budget-macs", budget_macs)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise PoolError(f"{name}={v}: a positive number")
    with load_pool(experiments) as pool:
        if log:
            log(f"pool: {pool.size} candidates from {len(pool.experiments)} experiment(s); "
                f"{pool.y_val.size} validation, {pool.y_test.size} test images")
        costs, hw = candidate_costs(pool, measure=measure, remeasure=remeasure, log=log)
        arrays = cost_arrays(costs)
        if budget_ms is not None and np.all(np.isnan(arrays["ms_per_image"])):
            raise PoolError("--budget-ms: no candidate has a measured time (their weights were not kept: run with "
                            "keep_weights: all, or time them here without --no-measure)")
        budget = make_budget(arrays, ms=budget_ms, macs=budget_macs)
        fold = cv_folds_of(pool.y_val, folds, seed) if folds else None
        references = reference_stacks(pool, folds=fold, seed=seed, costs=arrays)
        seeds = [support_of(pool, r) for r in references.values()]
        sel = select(pool, methods=methods, k=k, rounds=rounds, folds=folds, seed=seed, choose=choose,
                     budget=budget, seed_supports=seeds, costs=arrays)
        rows = None
        if front:
            rows = build_front(pool, arrays, unconstrained=sel.methods, references=references, folds=fold, k=k,
                               rounds=rounds, seed_supports=seeds, levels=front_levels, log=log)
            for r in rows:
                r["chosen"] = r["kind"] == "selection" and r["label"] == sel.chosen
        ref_key = _reference_key(references, reference)
        result = {
            "kind": "pool", "experiments": list(pool.experiments), "n_candidates": pool.size,
            "n_val": int(pool.y_val.size), "n_test": int(pool.y_test.size), "num_classes": int(pool.val.shape[2]),
            "class_names": pool.class_names, "candidates": _candidate_rows(pool, costs),
            "cv": {"folds": sel.folds, "seed": sel.seed, "stratified": True} if sel.folds else None,
            "k": sel.k, "rounds": sel.rounds, "budget": sel.budget, "hardware": hw,
            "methods": {m: r.to_dict() for m, r in sel.methods.items()}, "chosen": sel.chosen,
            "chosen_rule": sel.chosen_rule,
            "ensemble": {"method": sel.chosen, **sel.ensemble.to_dict()},
            "references": {g: {**r.to_dict(), "method": r.method} for g, r in references.items()},
            "reference": ref_key,
            "comparison": _comparison(sel.ensemble, references.get(ref_key), rows),
        }
    from .provenance import provenance

    result["provenance"] = {"this": provenance(), "sources": [
        {"path": s["path"], "git_revision": (s.get("metadata") or {}).get("git_revision"),
         "seed": (s.get("metadata") or {}).get("seed")} for s in pool.sources]}
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if output is RERUN:
        tag = "all" if budget is None else "-".join(
            f"{'ms' if n == 'ms_per_image' else 'macs'}{v:g}" for n, v in sel.budget.items())
        output = ExperimentLayout(pool.experiments[0]).pool_result(tag)
    output = str(output)
    stem = output[:-5] if output.endswith(".json") else output
    if rows is not None:
        import io

        buf = io.BytesIO()
        front_table(rows).to_parquet(buf, index=False)
        storage.write_bytes(stem + "-front.parquet", buf.getvalue())
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_front(os.path.join(tmp, "front.png"), rows,
                             title=f"{pool.size} candidates: ensembles by cost ({hw['hardware']})")
            if png is not None:
                with open(png, "rb") as fh:
                    storage.write_bytes(stem + "-front.png", fh.read())
        result["front"] = {"parquet": os.path.basename(stem + "-front.parquet"),
                           "figure": os.path.basename(stem + "-front.png") if png else None, "ensembles": len(rows),
                           "front_ms": [_brief(r) for r in sorted(rows, key=lambda r: r["ms_per_image"] or 0)
                                        if r.get("front_ms")],
                           "front_macs": [_brief(r) for r in sorted(rows, key=lambda r: r["macs"] or 0)
                                          if r.get("front_macs")]}
    storage.write_bytes(output, json.dumps(result, indent=2, allow_nan=False, default=_json_default).encode())
    result["output"] = output
    return result


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _pct(v) -> str:
    return f"{100 * v:.2f}" if v is not None else ""


def _cost(r: dict) -> str:
    ms = f"{r['ms_per_image']:.4f}" if r.get("ms_per_image") is not None else "-"
    macs = f"{r['macs'] / 1e6:.2f}" if r.get("macs") is not None else "-"
    return f"{ms:>9} {macs:>8}"


def format_pool(result: dict) -> str:
    """The pool file as text: the methods (members, cost, val / CV / test), the stacks, the comparison
    with the paper's stack, the front on measured time."""
    head = (f"{'':2}{'method':<26}{'members':>7} {'ms/img':>9} {'MMACs':>8}{'val acc':>9}{'val nll':>9}{'cv acc':>9}"
            f"{'cv nll':>9}{'test acc':>9}{'test nll':>9}")
    cv = result.get("cv") or {}
    lines = [f"pool: {result['n_candidates']} candidates ({result['n_val']} validation, {result['n_test']} test "
             f"images); cv: {cv.get('folds', 0)} folds; k={result['k']}, rounds={result['rounds']}"
             + (f"; budget {result['budget']}" if result.get("budget") else ""), head, "-" * len(head)]

    def line(mark, name, r):
        num = lambda key: f"{r[key]:>9.4f}" if r.get(key) is not None else f"{'':>9}"  # noqa: E731
        return (f"{mark:2}{name:<26}{r['members']:>7} {_cost(r)}{num('val_accuracy')}{num('val_nll')}"
                f"{num('cv_accuracy')}{num('cv_nll')}{num('test_accuracy')}{num('test_nll')}")

    for m, r in result["methods"].items():
        lines.append(line("*" if m == result["chosen"] else "", m, r))
    for g, r in (result.get("references") or {}).items():
        lines.append(line(">" if g == result.get("reference") else "", f"stack {g}", r))
    lines.append("-" * len(head))
    e = result["ensemble"]
    lines.append(f"chosen ({result['chosen_rule']}): {result['chosen']}: "
                 + ", ".join(f"{c} {w:.3f}" for c, w in sorted(e["weights"].items(), key=lambda kv: -kv[1])))
    comp = result.get("comparison")
    if comp:
        v, t = comp["val_nll"], comp["test_accuracy"]
        lines.append(f"against the stack {result['reference']} (>): validation NLL {v['chosen']:.4f} vs {v['stack']:.4f} "
                     f"({'at most' if v['chosen_at_most_stack'] else 'ABOVE'} the stack's); test accuracy "
                     f"{_pct(t['chosen'])} vs {_pct(t['stack'])} % ({100 * t['difference']:+.2f} pt)")
        ch = comp.get("cheap")
        if ch:
            if ch["found"]:
                c = ch["ensemble"]
                lines.append(f"cheap: {c['label']} ({c['members']} member(s)) at {c['ms_per_image']:.4f} ms/image "
                             f"(limit {ch['cost_limit_ms']:.4f}) tests {_pct(c['test_accuracy'])} %")
            else:
                b = ch["best_under_limit"]
                lines.append(f"cheap: none of the front within {ch['cost_limit_ms']:.4f} ms/image is within 0.5 pt "
                             + (f"(best there: {b['label']}, {_pct(b['test_accuracy'])} %)" if b else "(none that cheap)"))
    fr = result.get("front")
    if fr:
        lines.append(f"front on measured time ({fr['ensembles']} ensembles considered; {fr['parquet']}, {fr['figure']}):")
        for r in fr["front_ms"]:
            lines.append(f"  {r['ms_per_image']:.4f} ms  cv {_pct(r['cv_accuracy'])}  test {_pct(r['test_accuracy'])}  "
                         f"{r['members']} member(s): {r['label']}")
    return "\n".join(lines)


def export_pool(pool_file: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, onnx: bool = True) -> dict:
    """Export a pool file's chosen ensemble: each member from its experiment at its rung or level, with
    its own weights; the manifest's weights are the selection's.  Refused, naming the member, when a
    member's weights were not kept or the members' input normalisations differ."""
    from .export import _config, _member_weights, _rung_model, write_export
    from .ensemble import ExportError
    from .layout import check_replace
    from .records import Rung

    check_replace(out, kind="export", force=force)
    where = str(pool_file)
    try:
        result = json.loads(storage.read_bytes(where))
        weights = result["ensemble"]["weights"]
        cands = {c["id"]: c for c in result["candidates"]}
        members = [cands[i] for i in weights]
    except FileNotFoundError:
        raise ExportError(f"--stack {where}: no such file") from None
    except (KeyError, TypeError, AttributeError, ValueError):  # ValueError: not JSON, not UTF-8
        raise ExportError(f"--stack {where}: not a pool file (esdbs stack --pool writes them)") from None
    if result.get("kind") != "pool":
        raise ExportError(f"--stack {where}: not a pool file (esdbs stack --pool writes them)")
    models, entries, info, runs = {}, [], None, {}
    for c in members:
        tree = storage.Tree(c["experiment"])
        cfg = _config(tree)
        spec = next((t for t in cfg.trials() if t.member == c["member"]), None)
        if spec is None:
            raise ExportError(f"{c['id']}: no member {c['member']!r} in {tree.root}'s config")
        if spec.train.basis.ladder or spec.train.conv == "basis_random":
            raise ExportError(f"{c['id']}: a BasisConv member; esdbs export does not export BasisConv models yet")
        rung = Rung.of(c)
        w = _member_weights(tree, spec, rung.target_sparsity, rung.level)
        inp = w["input"]
        if inp is None:
            raise ExportError(f"{tree.uri(w['source'])}: carries no input normalisation; re-run the experiment")
        if info is None:
            info = inp
        elif (list(inp["mean"]), list(inp["std"]), inp["image_size"], list(inp["class_names"])) != \
                (list(info["mean"]), list(info["std"]), info["image_size"], list(info["class_names"])):
            raise ExportError(f"{c['id']}: its input normalisation or classes differ from the other members' "
                              "(experiments trained on different data); an export normalises once")
        shape = (int(inp["in_channels"]), int(inp["image_size"]), int(inp["image_size"]))
        model, entry = _rung_model(tree, spec, w, rung.target_sparsity, rung.level, len(inp["class_names"]), shape,
                                   name=c["id"])
        entry["experiment"] = tree.root
        models[c["id"]] = model
        entries.append(entry)
        runs.setdefault(tree.root, cfg)
    e = result["ensemble"]
    ensemble = {"method": f"pool: {e['method']}", "weights": {i: float(weights[i]) for i in weights}, "sparsity": None,
                "level": None, "val_accuracy": e.get("val_accuracy"), "val_nll": e.get("val_nll"),
                "cv_accuracy": e.get("cv_accuracy"), "test_accuracy": e.get("test_accuracy"),
                "test_nll": e.get("test_nll"), "n_val": result.get("n_val"), "n_test": result.get("n_test"),
                "source": os.path.basename(where)}
    first = next(iter(runs.values()))
    run = {"experiment": list(runs), "pool_file": where, "config": first.to_dict() if len(runs) == 1 else None}
    return write_export(out, name=f"pool-{first.name}", group="pool", variant=None, dataset=first.dataset, info=info,
                        models=models, members=entries, ensemble=ensemble, run=run, onnx=onnx, force=force)
