"""The report's "Pool ensembles" section: the newest ``pool-*.json`` of the experiment (``esdbs stack
--pool``, ``esdbs_ray/pool_run.py``) -- every method's validation, cross-validated and test figures
and cost, the chosen ensemble against the paper's 3-member stack, and the accuracy-cost front.

Only experiments where a pool was selected get the section; it reads the pool file and its front
figure, nothing else (no refitting: the pool file holds every number)."""
from __future__ import annotations

from pathlib import Path

from ..layout import ExperimentLayout
from .experiment import Experiment
from .render import Doc

__all__ = ["has_pool", "pool_section"]


def _pool_files(exp: Experiment) -> list[str]:
    return sorted(exp.tree.listdir(pattern=ExperimentLayout.POOL_GLOB, kind="file"))


def has_pool(exp: Experiment) -> bool:
    return bool(_pool_files(exp))


def _pct(v) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "n/a"


def _num(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def _row(name: str, r: dict) -> list[str]:
    macs = r.get("macs")
    return [name, str(r.get("members", "")), _num(r.get("ms_per_image"), ".4f"),
            _num(macs / 1e6 if isinstance(macs, (int, float)) else None, ".2f"), _pct(r.get("val_accuracy")),
            _num(r.get("val_nll"), ".4f"), _pct(r.get("cv_accuracy")), _num(r.get("cv_nll"), ".4f"),
            _pct(r.get("test_accuracy")), _num(r.get("test_nll"), ".4f")]


def pool_section(doc: Doc, exp: Experiment, out: Path) -> dict[str, str | None]:
    """Write the section from the newest pool file; returns {"pool_front": figure path or None}."""
    doc.h(2, "Pool ensembles", "pool")
    name = _pool_files(exp)[-1]
    try:
        p = exp.tree.read_json(name)
        methods, cands = p["methods"], {c["id"]: c for c in p["candidates"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        exp.problems.append(f"{name}: unreadable pool file ({str(exc).splitlines()[0][:120]})")
        doc.p(f"**not run**: {name} is not a readable pool file.")
        return {"pool_front": None}
    cv = p.get("cv") or {}
    hw = p.get("hardware") or {}
    load = hw.get("load_average")
    doc.p(f"`esdbs stack --pool` ({name}): an ensemble chosen from **{p['n_candidates']} candidates** -- every "
          f"member, variant, rung and level of {len(p.get('experiments') or [])} experiment(s) with predictions -- "
          f"by {cv.get('folds', 0)}-fold cross-validation inside the {p['n_val']} validation images (weights fitted "
          f"on the other folds; the test split only reports). Costs: multiply-adds per image by nonzero weights "
          f"(Winograd-ReLU layers counted in the Winograd domain) and ms per image at batch 256 as `esdbs predict` "
          f"runs the member on {hw.get('hardware', 'this machine')} ({hw.get('torch_threads', '?')} torch threads"
          + (f", load average {load[0]:.1f}" if load else "") + ")"
          + (f"; budget {p['budget']}" if p.get("budget") else "") + ".")
    rows = [_row(("* " if m == p["chosen"] else "") + m, r) for m, r in methods.items()]
    rows += [_row(("> " if g == p.get("reference") else "") + f"stack {g} ({r.get('method', '')})", r)
             for g, r in (p.get("references") or {}).items()]
    doc.table(["method", "members", "ms/image", "MMACs", "val acc", "val NLL", "CV acc", "CV NLL", "test acc",
               "test NLL"], rows,
              f"`*` chosen ({p.get('chosen_rule')}); `>` the paper's stack it is compared with")
    e = p["ensemble"]
    doc.table(["candidate", "variant", "rung", "weight", "ms/image", "MMACs", "test acc alone"],
              [[c, cands.get(c, {}).get("group") or cands.get(c, {}).get("variant", ""), cands.get(c, {}).get("rung", ""),
                f"{w:.3f}", _num(cands.get(c, {}).get("ms_per_image"), ".4f"),
                _num((cands.get(c, {}).get("macs") or 0) / 1e6, ".2f"), _pct(cands.get(c, {}).get("test_accuracy"))]
               for c, w in sorted(e["weights"].items(), key=lambda kv: -kv[1])],
              f"The chosen ensemble ({p['chosen']})")
    comp = p.get("comparison")
    if comp:
        v, t = comp["val_nll"], comp["test_accuracy"]
        text = (f"Against the paper's stack ({p.get('reference')}): validation NLL {v['chosen']:.4f} vs {v['stack']:.4f} "
                f"({'at most' if v['chosen_at_most_stack'] else '**above**'} the stack's); test accuracy "
                f"{_pct(t['chosen'])} vs {_pct(t['stack'])} ({100 * t['difference']:+.2f} pt), measured cost "
                f"{_num(comp['cost']['chosen_ms_per_image'], '.4f')} vs {_num(comp['cost']['stack_ms_per_image'], '.4f')} "
                "ms per image.")
        ch = comp.get("cheap")
        if ch and ch["found"]:
            c = ch["ensemble"]
            text += (f" At most a third of the stack's measured cost ({ch['cost_limit_ms']:.4f} ms): {c['label']} "
                     f"({c['members']} member(s), {c['ms_per_image']:.4f} ms) tests {_pct(c['test_accuracy'])}, within "
                     "0.5 pt of the stack.")
        elif ch:
            b = ch.get("best_under_limit")
            text += (f" No ensemble of the front at most a third of the stack's measured cost ({ch['cost_limit_ms']:.4f} "
                     "ms) is within 0.5 pt of its test accuracy" + (f"; the best there, {b['label']}, tests "
                                                                   f"{_pct(b['test_accuracy'])}." if b else "."))
        doc.p(text)
    front = (p.get("front") or {}).get("front_ms") or []
    if front:
        doc.table(["ms/image", "MMACs", "members", "CV acc", "test acc", "ensemble"],
                  [[_num(r.get("ms_per_image"), ".4f"), _num((r.get("macs") or 0) / 1e6, ".2f"), str(r.get("members")),
                    _pct(r.get("cv_accuracy")), _pct(r.get("test_accuracy")), r.get("label")] for r in front],
                  f"The accuracy-cost front on measured time: no other ensemble considered "
                  f"({p['front']['ensembles']}) is both cheaper and better on CV accuracy")
    path = None
    fig = (p.get("front") or {}).get("figure")
    if fig:
        try:
            data = exp.tree.read_bytes(fig)
            path = str(out / "pool_front.png")
            Path(path).write_bytes(data)
        except OSError:
            exp.problems.append(f"{fig}: the pool's front figure is missing")
    doc.img(path, "pool front", "Ensembles of the pool by cost: cross-validated accuracy (left, what chooses) and "
                                "test accuracy (right, what reports); the front in red, the experiments' stacks as stars")
    return {"pool_front": path}
