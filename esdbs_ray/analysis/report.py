"""``esdbs report EXPERIMENT_DIR``: the paper's tables, figures and claims, next to ours.

:func:`build_report` reads only the artifacts that ``esdbs run`` leaves in an experiment directory
(``config.yaml``, ``summary.json``, ``members/*.json``, ``predictions/*.parquet``, ``stacking*.json``,
``tune/base/<trial>/tb`` TensorBoard events and ``kernels.png``) -- from a local directory or a URI
(``s3://``, ``gs://``, ``file://``, any ``pyarrow.fs`` filesystem; ``experiment.py``) -- and writes
``<out_dir>/report.md``, a self-contained ``<out_dir>/report.html`` (figures embedded as base64 PNG
data URIs) and the PNG figures into a local ``out_dir`` (default ``EXPERIMENT_DIR/report`` for a local
experiment).  Module layout: ``experiment.py`` loads, ``claims.py`` judges the paper's claims,
``sections.py`` writes the sections (``basis.py`` BasisConv's, for runs with BasisConv
members), ``render.py`` renders Markdown and HTML, this module ties them.  Any missing
artifact turns the sections that need it into "not run"; nothing here trains, and Ray is never
imported.

Definitions (spec section 1): "Time" is training seconds per epoch (the trainer's ``epoch_seconds``,
forward + backward + optimizer, no evaluation), per rung the mean over that rung's retraining epochs
(the dense rung: its last dense epoch).  "Speed" is the baseline's time divided by it, the baseline
being the unpruned single base model (C-CNN, rung 0.0) at batch B0 in the same run.  A stack's time
is reported summed over its members (members trained one after another, the paper's setting) and as
the maximum over its members (members trained in parallel trials).

Ensemble accuracy of a stacked group: at the rung its ``stacking*.json`` was fitted on, the chosen
stacking weights; at every other rung, NLL-optimal weights (``esdbs_ray.stacking.nll_optimal``)
re-fitted on that rung's validation predictions.  Test predictions never choose weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..storage import Tree
from . import paper_numbers as PN
from .basis import basis_sections, has_basis_members
from .claims import build_claims
from .experiment import NOT_RUN, SWEEP_VARIANTS, TIME_MARGIN, Z, load_experiment
from .overview import run_title, section_evaluation, section_run
from .pool_section import has_pool, pool_section
from .render import Doc
from .self_expanding import has_growing_members, self_expanding_section
from .seeds import labels, load_replicates, section_replicates
from .sections import (_hardware, _means_and_errors, _scale_text, _section_accuracy, _section_batch_tables,
                       _section_claims,
                       _section_dbs_decisions, _section_classes, _section_dbs_trace, _section_kernels,
                       _section_members,
                       _section_momentum, _section_provenance, _section_sparsity_accounting,
                       _section_sparsity_tables, _section_stacking, _short_scale)

__all__ = ["build_report", "load_experiment", "TIME_MARGIN", "Z"]


def build_report(experiment_dir: str | os.PathLike | Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike | None = None, *, filesystem=None) -> dict:
    """Write ``report.md``, ``report.html`` (self-contained) and PNG figures for an experiment directory.

    Returns ``{"out_dir", "markdown", "html", "figures": {name: path or None}, "claims": [...],
    "sections": {name: "ok" | "not run"}, "problems": [...]}``.  Missing artifacts give "not run"
    sections; a directory without any esdbs artifact still yields a (mostly "not run") report.
    ``experiment_dir`` is a local path or a URI, or a path on ``filesystem`` (a ``pyarrow.fs``
    filesystem); ``out_dir`` is local and required for an experiment that is not.  Several directories
    (a list), or a multi-seed run's, are replicates of one config (:mod:`.seeds`): the claims, tables and
    figures aggregate them (mean, SE across them), the sections about one run show the first.
    """
    paths = [experiment_dir] if isinstance(experiment_dir, (str, os.PathLike)) else list(experiment_dir)
    tree = Tree(paths[0], filesystem)
    if not tree.is_dir():
        raise FileNotFoundError(f"{tree.root}: no such experiment directory")
    if out_dir is None:
        if not tree.local:
            raise ValueError(f"{tree.root} is not a local directory: name a local output directory for the report")
        out_dir = Path(tree.path()) / "report"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    R = load_replicates(paths, filesystem=filesystem)  # one config, or refused naming the keys
    exp = R[0]
    key = exp.dataset
    P = PN.PAPER.get(key) if key else None
    tno = P["tables"] if P else ("1/3/5", "2/4/6")
    fig_no = P["figure"] if P else "2-4"

    doc = Doc()
    title = f"esdbs report: {run_title(exp)}"
    doc.h(1, title)
    doc.p(f"Ours: {_hardware(exp)}; scale: {_scale_text(exp)}. Beside the paper: *Efficient Ensemble Sparse CNNs "
          f"with Dynamic Batch Size* (Zheng, Wang, Gupta), section {P['section'] if P else '4'}"
          + (f", {P['title']}" if P else "") + f"; its numbers: {PN.HARDWARE}.")
    if len(R) > 1:
        section_replicates(doc, R)
    figs: dict[str, str | None] = {}
    if len(R) == 1:  # the run first; replicates: what they share first, then one of them in detail
        run_ok = section_run(doc, exp)
        figs["reliability"] = section_evaluation(doc, exp, out)
    claims = build_claims(R, P)
    _section_claims(doc, R, P, claims)
    curves = _section_sparsity_tables(doc, R, P, tno[0])
    if any(v is not None for c in curves.values() for v in c.values()):  # no speeds without a baseline: no panel
        from . import figures

        bars = f"; error bars ± 1 SE across the {len(R)} replicates" if len(R) > 1 else ""
        means, errors = _means_and_errors(curves)
        figs["speed_vs_sparsity"] = figures.time_vs_sparsity(
            str(out / "speed_vs_sparsity.png"), means, P["sparsity_table"] if P else None,
            title="Speed vs sparsity (summed member time for stacks)", ours_note=_short_scale(exp) + bars,
            errors=errors)
        doc.img(figs["speed_vs_sparsity"], "speed vs sparsity",
                f"Speed vs sparsity, ours (left{bars}) and the paper's table (right)")
    _section_batch_tables(doc, R, P, tno[1])
    figs.update(_section_accuracy(doc, R, P, out, fig_no))
    if len(R) > 1:
        doc.h(2, f"One replicate in detail: {labels(R)[0]}", "one-replicate")
        doc.p(f"The sections from here on describe one replicate, {labels(R)[0]} (`{exp.root}`); the others' "
              "directories hold the same parts (`esdbs report` of one of them shows its own).")
        run_ok = section_run(doc, exp)
        figs["reliability"] = section_evaluation(doc, exp, out)
    figs.setdefault("accuracy_vs_sparsity", None)
    figs.setdefault("accuracy_vs_batch", None)
    figs["kernels"] = _section_kernels(doc, exp, out)
    figs["momentum"] = _section_momentum(doc, exp, out)
    figs["dbs_schedule"] = _section_dbs_trace(doc, exp, out)
    decisions_ok = _section_dbs_decisions(doc, exp)
    accounting_ok = _section_sparsity_accounting(doc, exp)
    _section_stacking(doc, exp)
    if has_pool(exp):  # ensembles chosen from every candidate: only where esdbs stack --pool ran
        figs.update(pool_section(doc, exp, out))
    basis = None
    if has_basis_members(exp):  # BasisConv: only in runs that trained BasisConv members
        basis = basis_sections(doc, exp, out)
        figs.update(basis["figures"])
    if has_growing_members(exp):  # self-expanding members: only in runs that trained them
        figs.update(self_expanding_section(doc, exp, out))
    classes_ok = _section_classes(doc, exp)
    _section_members(doc, exp)
    if P:
        doc.h(2, "Errata in the paper", "errata")
        doc.ul(PN.PAPER_ERRATA)
    _section_provenance(doc, exp)

    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(out))
    html_path.write_text(doc.html(title))
    sections = {
        "run": "ok" if run_ok else NOT_RUN,
        "claims": "ok" if claims else NOT_RUN,
        "sparsity_table": "ok" if curves else NOT_RUN,
        "batch_table": "ok" if any(exp.sweep_cell(v, b) for v in SWEEP_VARIANTS for b in [*exp.sweep_batch_sizes(), "DBS"]) else NOT_RUN,
        "stacking": "ok" if exp.stackings else NOT_RUN,
        "dbs_decisions": "ok" if decisions_ok else NOT_RUN,
        "sparsity_accounting": "ok" if accounting_ok else NOT_RUN,
        "classes": "ok" if classes_ok else NOT_RUN,
        **{f"figure:{k}": ("ok" if v else NOT_RUN) for k, v in figs.items()},
        **({"basis_targets": basis["sections"]["basis_targets"]} if basis else {}),
    }
    headline = [f"{g} ensemble test {100 * st['ensemble']['test_accuracy']:.2f}% ({st.get('chosen')}; members "
                + " / ".join(f"{100 * (st.get('members') or {}).get(n, {}).get('test_accuracy', float('nan')):.2f}"
                             for n in st.get("member_names") or []) + " %)"
                for g, st in exp.stackings.items() if isinstance(st.get("ensemble"), dict)]
    return {"out_dir": str(out), "markdown": str(md_path), "html": str(html_path), "figures": figs,
            "claims": claims, "sections": sections, "headline": headline,
            "problems": [f"{x}: {p}" if len(R) > 1 else p for x, e in zip(labels(R), R) for p in e.problems],
            "replicates": labels(R)}


def main(argv=None) -> int:  # python -m esdbs_ray.analysis.report EXPERIMENT_DIR [--out DIR]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m esdbs_ray.analysis.report")
    ap.add_argument("experiment_dir")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    r = build_report(a.experiment_dir, a.out)
    print(f"report: {r['html']}\n        {r['markdown']}")
    for c in r["claims"]:
        print(f"  [{c['verdict']:>14}] {c['id']}: {c['claim']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

