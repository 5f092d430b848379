"""BasisConv in the report: accuracy vs retained filters beside the paper's Table 2, the
issue's targets, and the compression methods side by side at equal multiplications.

What it gives: :func:`basis_sections` appends three sections to a report document and writes two PNG
figures, reading only an experiment's artifacts -- the members' rung records (``members`` of the
report's experiment object: ``filters``, ``conv_mults``, ``basis`` counts and ``before_finetune``
accuracies, written by ``train.py`` through ``compression.rung_counts``) and the Parquet predictions
(``table``, for ensemble accuracies and paired standard errors).  Nothing trains, Ray is not imported.

The functions take the report's :class:`~esdbs_ray.analysis.experiment.Experiment` and its ``Doc``
by duck typing; ``report.py`` calls :func:`basis_sections` for runs with BasisConv members.  The
experiment object needs
``members`` (list of member records: ``member``, ``group``, ``model``, ``config``, ``rungs``),
``groups`` ({name: {"members": [...], "variant": ...}}), ``table`` (predictions or None) and
``problems`` (a list this module appends to); the document needs ``h``, ``p``, ``table``, ``img``.

Definitions.  *Retained filters*: Q summed over every conv layer, 1x1 and unconverted convs counting
all their K filters, as the paper counts a network's filters (AlexNet's 1,152 = 64+192+384+256+256).
*Multiplications*: per image, by nonzero conv weights (``compression.conv_cost``), relative to the
dense spatial network the model stands for.  *Ensemble accuracy* of a group at a rung: NLL-optimal
stacking weights fitted on that rung's validation predictions, applied to its test predictions.
*Spatial twin* of a random-basis member: the spatial member of the same model, schedule and dense
epochs (its dense rung).  Differences carry their paired standard error over the test images (the
noise of the test estimate; each trial trained once, so training variance is not in it).

Evidence: ``tests/test_report.py::test_basis_sections_on_trained_members`` builds these sections on an
experiment directory of really trained tiny members (SC-CNN, SBC-CNN and SRB-CNN groups, trainer
predictions and summaries) and checks the tables and figures.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..records import DENSE, MemberSummary, Rung, RungResult
from .experiment import _f

__all__ = ["basis_sections", "has_basis_members", "section_accuracy_vs_filters", "section_targets", "section_equal_multiplications",
           "PAPER_TABLE2", "PAPER_SCRATCH"]

NOT_RUN = "not run"
# Tayyab & Mahalanobis, Table 2 (CIFAR-100, pre-trained networks compressed, then fine-tuned in two
# steps for 25 epochs): original filters, GFlops (multiplications in conv layers, billions), accuracy;
# the compressed network's t, filters, GFlops, a column printed without a header (it matches the
# pre-fine-tuning operating points of Fig. 2: "before_ft") and the accuracy after fine-tuning.
PAPER_TABLE2 = {
    "AlexNet": {"filters": 1152, "gflops": 0.24, "acc": 43.9, "t": 0.85, "c_filters": 358, "c_gflops": 0.085,
                "before_ft": 7.1, "c_acc": 42.5},
    "VGG16": {"filters": 4187, "gflops": 0.313, "acc": 68.7, "t": 0.85, "c_filters": 1855, "c_gflops": 0.18,
              "before_ft": 54.1, "c_acc": 67.3},
    "ResNet110": {"filters": 4096, "gflops": 0.253, "acc": 72.0, "t": 0.85, "c_filters": 1719, "c_gflops": 0.11,
                  "before_ft": 24.7, "c_acc": 69.9},
    "DenseNet190": {"filters": 20117, "gflops": 18.678, "acc": 82.8, "t": 0.70, "c_filters": 3525, "c_gflops": 3.5,
                    "before_ft": 14.2, "c_acc": 80.7},
}
# Section 4.5: trained from scratch with random bases and batch norm before the 1x1 layer (CIFAR-100).
PAPER_SCRATCH = {"AlexNet": {"acc": 43.9, "basis_acc": 42.5, "learnable_reduction": 7.2},
                 "VGG16": {"acc": 68.7, "basis_acc": 66.3, "learnable_reduction": 7.9}}
TARGETS = {"random_reduction": 5.0, "random_points": 2.0, "eigen_t": 0.9, "eigen_points": 1.0}


def _pct(a) -> str:
    return "n/a" if a is None else f"{100 * a:.2f}%"


def _pts(d, se=None) -> str:
    if d is None:
        return "n/a"
    return f"{100 * d:+.2f} pt" + (f" (SE {100 * se:.2f})" if se is not None else "")


# --------------------------------------------------------------------------------------------------
# reading the experiment
# --------------------------------------------------------------------------------------------------
def _is_basis_ladder(m: MemberSummary) -> bool:
    return any(r.rung.is_basis for r in m.rungs)


def _is_random_basis(m: MemberSummary) -> bool:
    return m.config.get("conv") == "basis_random"


def _has_counts(m: MemberSummary) -> bool:
    return bool(m.rungs) and all(r.conv_mults is not None for r in m.rungs)


def _dense_rung(m: MemberSummary) -> RungResult | None:
    return m.rung(DENSE)


def _filter_share(r: RungResult) -> float | None:
    if r.basis:
        return r.basis["retained_filters"] / r.basis["original_filters"]
    return r.filters / r.dense_filters if r.filters is not None and r.dense_filters else None


class _Accuracy:
    """Test accuracy of one member or one group's ensemble at a rung, with per-image correctness (for
    paired standard errors) when the predictions are there; cached per experiment."""

    def __init__(self, exp):
        self.exp = exp
        self.cache: dict = {}

    def __call__(self, group: str, names: list[str], key: Rung) -> dict | None:
        ck = (group, tuple(names), key)
        if ck not in self.cache:
            self.cache[ck] = self._compute(group, names, key)
        return self.cache[ck]

    def _compute(self, group, names, key):
        import numpy as np

        table = self.exp.table
        if table is None:
            return None
        try:
            from ..predictions import prediction_matrix
            from ..stacking import nll_optimal

            ts, kw = key.target_sparsity, dict(variant=group, basis_threshold=key.basis_threshold)
            Pt, yt, _ = prediction_matrix(table, "test", names, ts, **kw)
            if len(names) == 1:
                p = Pt[0]
            else:
                Pv, yv, _ = prediction_matrix(table, "val", names, ts, **kw)
                p = np.tensordot(np.asarray(nll_optimal(Pv, yv)), Pt.astype(np.float64), axes=1)
            correct = np.argmax(p, axis=1) == yt
            return {"acc": float(correct.mean()), "correct": correct, "labels": yt}
        except Exception as exc:  # an unusable file must not stop the report
            self.exp.problems.append(f"BasisConv report: {group} {key.text()}: {str(exc).splitlines()[0][:160]}")
            return None


def _paired(a: dict | None, b: dict | None) -> tuple[float | None, float | None]:
    import numpy as np

    if a is None or b is None:
        return None, None
    d = a["acc"] - b["acc"]
    ca, cb = a.get("correct"), b.get("correct")
    if ca is None or cb is None or len(ca) != len(cb) or not np.array_equal(a["labels"], b["labels"]) or len(ca) < 2:
        return d, None
    diff = ca.astype(np.float64) - cb.astype(np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def _member_acc(acc: _Accuracy, m: MemberSummary, key: Rung) -> dict | None:
    """From the predictions (with per-image correctness), else the rung record's test accuracy."""
    a = acc(m.group or m.variant, [m.member], key)
    if a is None:
        r = m.rung(key)
        v = r.test_accuracy if r else None
        a = None if v is None else {"acc": v, "correct": None, "labels": None}
    return a


def _twin(exp, m: MemberSummary) -> MemberSummary | None:
    """The spatial member of the same model, schedule and dense epochs as ``m`` (its dense rung is the
    twin); basis-ladder members first (their dense rung is exactly that), then any spatial one."""
    cands = [o for o in exp.members if o is not m and o.model == m.model
             and o.config.get("conv") == "spatial" and _dense_rung(o) is not None
             and all(o.config.get(k) == m.config.get(k) for k in ("schedule", "epochs", "width"))
             and o.batch_size is None]
    cands.sort(key=lambda o: (not _is_basis_ladder(o), o.member))
    return cands[0] if cands else None


def _chosen_threshold(exp, m: MemberSummary) -> float | None:
    want = _f(((exp.config or {}).get("stack") or {}).get("basis_threshold"))
    want = None if want is None else Rung(0.0, want).basis_threshold
    ts = sorted({r.basis_threshold for r in m.rungs if r.rung.is_basis})
    if not ts:
        return None
    return want if want in ts else ts[0]  # None / absent: the last (smallest t) rung, as stacking does


def _main_groups(exp) -> list[str]:
    """Groups at the reference batch size (no batch-sweep groups), in a stable order."""
    return sorted(g for g, d in exp.groups.items() if d.get("batch_size") is None and "@" not in g)


# --------------------------------------------------------------------------------------------------
# section 1: accuracy vs retained filters, the paper's Table 2 beside ours
# --------------------------------------------------------------------------------------------------
def section_accuracy_vs_filters(doc, exp, out_dir, acc: _Accuracy | None = None) -> str | None:
    acc = acc or _Accuracy(exp)
    doc.h(2, "BasisConv: accuracy vs retained filters (the paper's Table 2 beside ours)", "basisconv")
    ladder = [m for m in exp.members if _is_basis_ladder(m) and m.rungs]
    random = [m for m in exp.members if _is_random_basis(m) and m.rungs]
    if not ladder and not random:
        doc.p(f"**{NOT_RUN}**: no BasisConv trial in this run (variants SBC-CNN / SRB-CNN, or "
              "`esdbs train-one --basis-ladder` / `--conv basis_random`).")
        doc.img(None, "BasisConv accuracy vs filters", "Accuracy vs retained filters")
        return None
    curves: dict[str, list] = {}  # label -> [(filter share, acc after, acc before)]
    rows = []
    for m in ladder:
        pts = []
        for r in m.rungs:
            share, a = _filter_share(r), r.test_accuracy
            before = (r.before_finetune or {}).get("test_accuracy")
            if share is not None and a is not None:
                pts.append((share, a, before, r.basis_threshold))
        curves[f"{m.member}"] = pts
        dense, t = _dense_rung(m), _chosen_threshold(exp, m)
        r = m.rung(Rung(0.0, t))
        if dense and r and r.basis:
            b = r.basis
            rows.append([m.member, f"{b['original_filters']:,}", f"{dense.conv_mults / 1e6:.2f}",
                         _pct(dense.test_accuracy), f"{t:g}", f"{b['retained_filters']:,}",
                         f"{b['conv_mults'] / 1e6:.2f}", _pct((r.before_finetune or {}).get('test_accuracy')),
                         _pct(r.test_accuracy), f"{b['original_filters'] / b['retained_filters']:.2f}x",
                         f"{dense.conv_mults / b['conv_mults']:.2f}x"])
    # the stack's ensemble along the ladder
    ens: dict[str, list] = {}
    for g in _main_groups(exp):
        ms = exp.groups[g]["members"]
        if len(ms) < 2 or not all(_is_basis_ladder(m) for m in ms):
            continue
        keys = sorted(set.intersection(*[{r.rung for r in m.rungs} for m in ms]), key=lambda k: (k.is_basis, -(k.basis_threshold or 0)))
        names = [m.member for m in ms]
        pts = []
        for k in keys:
            a = acc(g, names, k)
            rs = [m.rung(k) for m in ms]
            if a is None or any(r is None for r in rs):
                continue
            b = [r.basis for r in rs]
            retained = sum(x["retained_filters"] if x else r.filters for x, r in zip(b, rs))
            original = sum(x["original_filters"] if x else r.dense_filters for x, r in zip(b, rs))
            pts.append((retained / original, a["acc"], None, k.basis_threshold))
        if pts:
            ens[g] = pts
            tk = _chosen_threshold(exp, ms[0])
            at = [p for p in pts if p[3] == tk]
            d = [p for p in pts if p[3] is None]
            if at and d:
                rows.append([f"{g} ensemble ({len(ms)} members)", "", "", _pct(d[0][1]), f"{tk:g}", "", "", "",
                             _pct(at[0][1]), f"{1 / at[0][0]:.2f}x", ""])
    doc.p("Each BasisConv-ladder member: the trained spatial model (100 % of its filters), then one point per rung "
          "t of `train.basis.ladder` after its two-step fine-tuning (solid) and right after the conversion "
          "(hollow: the paper's Fig. 2 curve). Retained filters: Q summed over every conv layer, unconverted 1x1 "
          "convs counting all their filters, as the paper counts AlexNet's 1,152.")
    paper_rows = [[f"paper: {name} (CIFAR-100)", f"{p['filters']:,}", f"{1000 * p['gflops']:.0f}", f"{p['acc']}%",
                   f"{p['t']:g}", f"{p['c_filters']:,}", f"{1000 * p['c_gflops']:.0f}", f"{p['before_ft']}%",
                   f"{p['c_acc']}%", f"{p['filters'] / p['c_filters']:.2f}x", f"{p['gflops'] / p['c_gflops']:.2f}x"]
                  for name, p in PAPER_TABLE2.items()]
    doc.table(["model", "filters", "conv mults (M)", "accuracy", "t", "filters", "conv mults (M)",
               "before fine-tuning", "after fine-tuning", "filters ÷", "mults ÷"], paper_rows + rows,
              "Table 2 of Tayyab & Mahalanobis (pre-trained CIFAR-100 networks; their 'before fine-tuning' column is "
              "printed without a header, it matches Fig. 2's operating points) and ours (each member at the rung the "
              "stack uses: stack.basis_threshold, else the smallest t; multiplications per image)")
    if random:
        rrows = [[f"paper: {n} (CIFAR-100)", f"{p['acc']}%", f"{p['basis_acc']}%", _pts((p['basis_acc'] - p['acc']) / 100),
                  f"{p['learnable_reduction']}x", ""] for n, p in PAPER_SCRATCH.items()]
        for m in random:
            r = _dense_rung(m) or m.rungs[-1]
            b = r.basis or {}
            tw = _twin(exp, m)
            a, t = _member_acc(acc, m, r.rung), (_member_acc(acc, tw, DENSE) if tw else None)
            d, se = _paired(a, t)
            rrows.append([m.member, _pct(t["acc"]) if t else "no twin in this run", _pct(a["acc"] if a else None),
                          _pts(d, se), f"{_f(b.get('conv_learnable_reduction')) or 0:.2f}x",
                          f"{_f(b.get('model_learnable_reduction')) or 0:.2f}x"])
        doc.table(["model", "spatial twin", "random basis", "difference", "learnable conv parameters ÷",
                   "learnable parameters ÷ (whole model)"], rrows,
                  "Trained from scratch with fixed random orthonormal bases (paper section 4.5: AlexNet and VGG16 on "
                  "CIFAR-100) and ours (SRB-CNN members against their spatial twin; paired SE over test images)")
    path = str(Path(out_dir) / "basis_accuracy_vs_filters.png")
    _plot_filters(path, curves, ens, random, acc)
    doc.img(path, "BasisConv accuracy vs retained filters",
            "BasisConv: test accuracy vs retained filters, ours (left; solid after fine-tuning, hollow before, "
            "black: the stack's ensemble, squares: random-basis members) and the paper's Table 2 (right)")
    return path


def _plot_filters(path, curves, ens, random, acc) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, pts) in enumerate(sorted(curves.items())):
        c = colors[i % len(colors)]
        pts = sorted(pts, key=lambda p: -p[0])
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=c, label=label)
        before = [p for p in pts if p[2] is not None]
        ax.plot([100 * p[0] for p in before], [100 * p[2] for p in before], "o--", mfc="none", color=c, alpha=0.7)
        for p in pts:
            if p[3] is not None:
                ax.annotate(f"t={p[3]:g}", (100 * p[0], 100 * p[1]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    for g, pts in ens.items():
        pts = sorted(pts, key=lambda p: -p[0])
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "s-", color="black", lw=2, label=f"{g} ensemble")
    for j, m in enumerate(random):
        r = m.rungs[-1]
        share, a = _filter_share(r), r.test_accuracy
        if share is not None and a is not None:
            ax.plot([100 * share], [100 * a], "s", ms=9, color=colors[(len(curves) + j) % len(colors)],
                    label=f"{m.member} (random basis)")
    ax.set(xlabel="retained filters (% of the network's)", ylabel="test accuracy (%)", title="ours")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, (name, p) in enumerate(PAPER_TABLE2.items()):
        c = colors[i % len(colors)]
        share = 100 * p["c_filters"] / p["filters"]
        bx.plot([100, share], [p["acc"], p["c_acc"]], "o-", color=c, label=f"{name} (t={p['t']:g})")
        bx.plot([share], [p["before_ft"]], "o", mfc="none", color=c)
    bx.set(xlabel="retained filters (%)", ylabel="test accuracy (%)",
           title="paper, Table 2 (CIFAR-100; hollow: before fine-tuning)")
    bx.invert_xaxis()
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# section 2: the targets
# --------------------------------------------------------------------------------------------------
def section_targets(doc, exp, acc: _Accuracy | None = None) -> list[dict]:
    """BasisConv's two targets on this run's members; returns the rows (also shown as a table)."""
    acc = acc or _Accuracy(exp)
    doc.h(3, "BasisConv targets")
    rows = []
    for m in exp.members:
        if _is_random_basis(m) and m.rungs:
            r = m.rungs[-1]
            red = _f((r.basis or {}).get("conv_learnable_reduction"))
            tw = _twin(exp, m)
            a, t = _member_acc(acc, m, r.rung), (_member_acc(acc, tw, DENSE) if tw else None)
            d, se = _paired(a, t)
            held = None if d is None or red is None else (red >= TARGETS["random_reduction"]
                                                          and d >= -TARGETS["random_points"] / 100)
            rows.append({"target": f"random basis: >= {TARGETS['random_reduction']:g}x fewer learnable conv parameters "
                                   f"within {TARGETS['random_points']:g} pt of its spatial twin",
                         "member": m.member, "twin": tw.member if tw else None, "reduction": red,
                         "diff": d, "se": se, "held": held})
        if _is_basis_ladder(m):
            r = m.rung(Rung(0.0, TARGETS["eigen_t"]))
            dense = _dense_rung(m)
            if r is None or dense is None:
                continue
            a, b = _member_acc(acc, m, r.rung), _member_acc(acc, m, DENSE)
            d, se = _paired(a, b)
            rows.append({"target": f"eigen ladder at t = {TARGETS['eigen_t']:g} within {TARGETS['eigen_points']:g} pt "
                                   "of the trained spatial member after fine-tuning",
                         "member": m.member, "twin": f"{m.member} (dense rung)",
                         "reduction": _f((r.basis or {}).get("conv_learnable_reduction")), "diff": d, "se": se,
                         "held": None if d is None else d >= -TARGETS["eigen_points"] / 100})
    if not rows:
        doc.p(f"**{NOT_RUN}**: no random-basis member and no basis ladder with a t = {TARGETS['eigen_t']:g} rung.")
        return rows
    doc.table(["target", "member", "against", "learnable conv parameters ÷", "difference", "held"],
              [[r["target"], r["member"], r["twin"] or "no spatial twin in this run",
                "n/a" if r["reduction"] is None else f"{r['reduction']:.2f}x", _pts(r["diff"], r["se"]),
                "n/a" if r["held"] is None else ("held" if r["held"] else "not held")] for r in rows],
              "Differences with their paired SE over the test images (test-set noise only: each trial trained once). "
              "A basis-ladder member had its fine-tuning epochs on top of the dense ones it is compared with.")
    return rows


# --------------------------------------------------------------------------------------------------
# section 3: the compression methods at equal multiplications
# --------------------------------------------------------------------------------------------------
def _method(exp, group: str) -> str:
    ms = exp.groups[group]["members"]
    cfg = ms[0].config if ms else {}
    if cfg.get("conv") == "basis_random":
        how = "random basis (from scratch)"
    elif any(_is_basis_ladder(m) for m in ms):
        how = "BasisConv eigen ladder"
    elif cfg.get("conv") == "winograd_relu":
        how = "Winograd-domain pruning"
    else:
        how = "magnitude pruning" if cfg.get("sparsity_ladder") else "dense"
    return f"{group}: {how}"


def _group_curve(exp, acc: _Accuracy, group: str) -> list[tuple]:
    """[(mult ratio, ensemble or member accuracy, rung key)] of a group, sorted by multiplications."""
    ms = exp.groups[group]["members"]
    if not ms or not all(_has_counts(m) for m in ms):
        return []
    keys = set.intersection(*[{r.rung for r in m.rungs} for m in ms])
    names = [m.member for m in ms]
    pts = []
    for k in keys:
        rs = [m.rung(k) for m in ms]
        a = acc(group, names, k)
        if a is None and len(ms) == 1:
            a = {"acc": rs[0].test_accuracy}
        if a is None or a["acc"] is None:
            continue
        pts.append((sum(r.conv_mults for r in rs) / sum(r.dense_conv_mults for r in rs), a["acc"], k))
    return sorted(pts)


def _interpolate(pts: list[tuple], x: float) -> float | None:
    """Accuracy at ``x`` multiplications by linear interpolation between neighbouring rungs; None
    outside the curve's range (no extrapolation)."""
    if not pts:
        return None
    for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if abs(pts[0][0] - x) < 1e-9 else None


def section_equal_multiplications(doc, exp, out_dir, acc: _Accuracy | None = None) -> str | None:
    acc = acc or _Accuracy(exp)
    doc.h(2, "Compression methods at equal multiplications", "compression-methods")
    groups = [g for g in _main_groups(exp) if _group_curve(exp, acc, g)]
    if len(groups) < 2:
        doc.p(f"**{NOT_RUN}**: fewer than two groups with per-rung multiplication counts (runs written before "
              "esdbs counted them have none).")
        doc.img(None, "compression methods", "Accuracy vs multiplications per compression method")
        return None
    curves = {g: _group_curve(exp, acc, g) for g in groups}
    by_model: dict[str, dict[str, list]] = {}
    for g in groups:
        for m in exp.groups[g]["members"]:
            pts = sorted((r.conv_mults / r.dense_conv_mults, r.test_accuracy, r.rung)
                         for r in m.rungs if r.test_accuracy is not None)
            by_model.setdefault(m.model or m.member, {})[g] = pts
    doc.p("Multiplications by nonzero conv weights per image, relative to the dense spatial network of the same "
          "members (`compression.conv_cost`: pruned spatial convs count their nonzero weights x output pixels, "
          "Winograd-ReLU layers their nonzero Winograd-domain weights x tiles -- transforms not counted --, BasisConv "
          "Q N P + K Q P). Stacked groups: summed over members, ensemble accuracy with NLL-optimal weights fitted on "
          "each rung's validation predictions.")
    for g in groups:
        doc.p(f"- {_method(exp, g)}: " + ", ".join(
            f"{'t=' + format(k.basis_threshold, 'g') if k.is_basis else 'sparsity ' + format(k.target_sparsity, 'g')}: "
            f"x{x:.3f} mults, {_pct(a)}" for x, a, k in curves[g]))
    # at equal multiplications: every other group interpolated at each BasisConv operating point
    refs = [g for g in groups if any(_is_basis_ladder(m) or _is_random_basis(m) for m in exp.groups[g]["members"])]
    for g in refs:
        others = [o for o in groups if o != g]
        rows = []
        for x, a, k in curves[g]:
            if not k.is_basis and not any(_is_random_basis(m) for m in exp.groups[g]["members"]):
                continue  # the dense rung of a basis ladder is a spatial model, not a BasisConv operating point
            row = [f"{g} {'t=' + format(k.basis_threshold, 'g') if k.is_basis else '(random basis)'}", f"x{x:.3f}", _pct(a)]
            for o in others:
                v = _interpolate(curves[o], x)
                row.append(_pct(v) if v is not None else f"n/a (covers x{curves[o][0][0]:.2f}-x{curves[o][-1][0]:.2f})")
            rows.append(row)
        if rows:
            doc.table(["operating point", "mults", "accuracy"] + others, rows,
                      f"{_method(exp, g)} against the other methods at the same multiplications: their accuracy "
                      "interpolated linearly between neighbouring rungs (n/a outside the range a ladder covers: no "
                      "extrapolation)")
    path = str(Path(out_dir) / "compression_equal_mults.png")
    _plot_mults(path, curves, by_model, exp)
    doc.img(path, "compression methods at equal multiplications",
            "Test accuracy vs conv multiplications (relative to the dense spatial network), per compression method: "
            "each member model alone and the stacks' ensembles")
    return path


def _plot_mults(path, curves, by_model, exp) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ensembles / single-member groups", curves)] + [(f"member {k}", v) for k, v in sorted(by_model.items())]
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = sorted(curves)
    for ax, (title, cs) in zip(axes.flat, panels):
        for g, pts in sorted(cs.items()):
            c = colors[order.index(g) % len(colors)] if g in order else None
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=c, label=_method(exp, g), ms=4)
        ax.set(title=title, xlabel="conv multiplications (x dense spatial)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# entry point for the report
# --------------------------------------------------------------------------------------------------
def has_basis_members(exp) -> bool:
    """Whether the run trained a BasisConv member (an eigen ladder or random bases)."""
    return any(_is_basis_ladder(m) or _is_random_basis(m) for m in exp.members)


def basis_sections(doc, exp, out_dir) -> dict[str, Any]:
    """Append the BasisConv sections to ``doc``; returns ``{"figures": {name: path or None},
    "targets": [rows], "sections": {name: "ok" | "not run"}}``."""
    acc = _Accuracy(exp)
    filters = section_accuracy_vs_filters(doc, exp, out_dir, acc)
    targets = section_targets(doc, exp, acc) if filters else []
    mults = section_equal_multiplications(doc, exp, out_dir, acc)
    figures = {"basis_accuracy_vs_filters": filters, "compression_equal_mults": mults}
    return {"figures": figures, "targets": targets,
            "sections": {f"figure:{k}": "ok" if v else NOT_RUN for k, v in figures.items()}
            | {"basis_targets": "ok" if targets else NOT_RUN}}
