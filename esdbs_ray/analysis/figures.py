"""Figures of the report (matplotlib, Agg backend; imported lazily so that ``import esdbs_ray.analysis`` is cheap).

Every function takes plain data (dicts of numbers) and a path, writes one PNG and returns the path.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

_STYLES = {"C-CNN": ("o", "-"), "SC-CNN": ("s", "-"), "SWR-CNN": ("^", "-"), "SWR-CNN+DBS": ("D", "--"),
           "C-CNN+DBS": ("v", "--"), "SC-CNN+DBS": ("P", "--")}
_COLORS = {"C-CNN": "#1f77b4", "SC-CNN": "#ff7f0e", "SWR-CNN": "#2ca02c", "SWR-CNN+DBS": "#d62728",
           "C-CNN+DBS": "#9467bd", "SC-CNN+DBS": "#8c564b"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def accuracy_vs_sparsity(path: str, ours: Mapping[str, Mapping[float, float | None]],
                         paper: Mapping[float, Mapping[str, float]] | None, *, title: str, ours_note: str,
                         paper_note: str) -> str:
    """Panel (a): test accuracy (%) vs sparsity per variant; ours left, the paper's quoted points right."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for v, curve in ours.items():
        pts = sorted((s, a) for s, a in curve.items() if _finite(a))
        if not pts:
            continue
        xs, ys = zip(*pts)
        mk, ls = _STYLES.get(v, ("o", "-"))
        ax.plot([100 * x for x in xs], ys, marker=mk, ls=ls, label=v, color=_COLORS.get(v), alpha=0.9)
    ax.set_title(f"ours: {ours_note}", fontsize=9)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax = axes[1]
    if paper:
        for v in ("C-CNN", "SC-CNN", "SWR-CNN", "SWR-CNN+DBS"):
            pts = sorted((s, d[v]) for s, d in paper.items() if v in d)
            if pts:
                xs, ys = zip(*pts)
                ax.plot([100 * x for x in xs], ys, ls="none", marker="s", ms=8, label=v, color=_COLORS.get(v))
        ax.legend(fontsize=8)
    ax.set_title(f"paper (values quoted in its text; {paper_note})", fontsize=9)
    ax.set_xlabel("sparsity (%)")
    ax.set_xlim(15, 85)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_batch(path: str, ours: Mapping[str, Mapping[object, float | None]],
                      paper: Mapping[str, Mapping[object, float]] | None, *, title: str, ours_note: str,
                      paper_note: str) -> str:
    """Panel (b): grouped bars, one group per variant, one bar per batch size (and DBS)."""
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))

    def bars(ax, data, note):
        variants = list(data)
        keys = []
        for v in variants:
            for k in data[v]:
                if k not in keys:
                    keys.append(k)
        keys = sorted([k for k in keys if k != "DBS"], key=float) + (["DBS"] if "DBS" in keys else [])
        width = 0.8 / max(len(keys), 1)
        cmap = plt.get_cmap("viridis")
        drawn = False
        vals = []
        for i, k in enumerate(keys):
            ys = [data[v].get(k) for v in variants]
            xs = np.arange(len(variants)) + (i - (len(keys) - 1) / 2) * width
            ok = [(x, y) for x, y in zip(xs, ys) if _finite(y)]
            if not ok:
                continue
            drawn = True
            vals += [y for _, y in ok]
            color = "#d62728" if k == "DBS" else cmap(i / max(len(keys) - 1, 1) * 0.85)
            ax.bar([x for x, _ in ok], [y for _, y in ok], width=width * 0.95, color=color,
                   label="DBS" if k == "DBS" else f"B={k}")
        ax.set_xticks(np.arange(len(variants)))
        ax.set_xticklabels(variants)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(note, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if drawn:
            lo, hi = min(vals), max(vals)
            pad = max(1.0, (hi - lo) * 0.15)
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
            ax.legend(fontsize=8, title="batch size", title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, fontsize=14)

    bars(axes[0], ours, f"ours: {ours_note}")
    bars(axes[1], paper or {}, f"paper (values quoted in its text; {paper_note})")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_vs_sparsity(path: str, ours: Mapping[str, Mapping[float, float | None]],
                     paper: Mapping[str, Mapping[object, tuple]] | None, *, title: str, ours_note: str) -> str:
    """Speed (baseline time / time) vs sparsity per variant, ours and the paper's tables."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, data, note in ((axes[0], ours, f"ours: {ours_note}"), (axes[1], None, "paper (its table)")):
        if data is None:
            data = {v: {s: sp for s, (_, sp) in rows.items() if s != "overall"} for v, rows in (paper or {}).items()}
        for v, curve in data.items():
            pts = sorted((s, a) for s, a in curve.items() if _finite(a))
            if pts:
                xs, ys = zip(*pts)
                mk, ls = _STYLES.get(v, ("o", "-"))
                ax.plot([100 * x for x in xs], ys, marker=mk, ls=ls, label=v, color=_COLORS.get(v), alpha=0.9)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speed (x, vs the dense single base model at B0)")
        ax.set_title(note, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines[1:]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dbs_schedule(path: str, traces: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], *, title: str) -> str:
    """Batch size, learning rate and momentum per epoch of the DBS trials (from their TensorBoard events)."""
    plt = _plt()
    tags = ("schedule/batch_size", "schedule/lr", "schedule/momentum")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, tag in zip(axes, tags):
        for name, tr in traces.items():
            pts = tr.get(tag) or []
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
