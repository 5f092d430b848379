"""Figures (matplotlib, Agg backend; imported lazily so that ``import esdbs_ray.analysis`` is cheap): the
report's, the DBS schedule's (``esdbs dbs-plan --figure``, the DBS search's trade-off) and the
Winograd-domain kernels a run records (paper Fig. 5a).

Every function takes plain data (dicts of numbers, arrays) and a path, writes one PNG and returns the
path (the kernel figure also returns the image, for TensorBoard).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..winograd import WinogradReLUConv2d

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


def _yerr(errors, v, keys) -> list[float] | None:
    """The error bars of curve ``v`` at ``keys`` (0 where unknown), None without any."""
    e = (errors or {}).get(v) or {}
    bars = [float(e[k]) if _finite(e.get(k)) else 0.0 for k in keys]
    return bars if any(bars) else None


def accuracy_vs_sparsity(path: str, ours: Mapping[str, Mapping[float, float | None]],
                         paper: Mapping[float, Mapping[str, float]] | None, *, title: str, ours_note: str,
                         paper_note: str, errors: Mapping[str, Mapping[float, float | None]] | None = None) -> str:
    """Panel (a): test accuracy (%) vs sparsity per variant; ours left (``errors``: error bars, e.g. the
    SE across seeds), the paper's quoted points right."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for v, curve in ours.items():
        pts = sorted((s, a) for s, a in curve.items() if _finite(a))
        if not pts:
            continue
        xs, ys = zip(*pts)
        mk, ls = _STYLES.get(v, ("o", "-"))
        ax.errorbar([100 * x for x in xs], ys, yerr=_yerr(errors, v, xs), marker=mk, ls=ls, label=v,
                    color=_COLORS.get(v), alpha=0.9, capsize=3)
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
                      paper_note: str, errors: Mapping[str, Mapping[object, float | None]] | None = None) -> str:
    """Panel (b): grouped bars, one group per variant, one bar per batch size (and DBS); ``errors``: error
    bars on ours."""
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))

    def bars(ax, data, note, errors=None):
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
            ok = [(x, y, v) for x, y, v in zip(xs, ys, variants) if _finite(y)]
            if not ok:
                continue
            drawn = True
            err = [((errors or {}).get(v) or {}).get(k) for _, _, v in ok]
            err = [float(e) if _finite(e) else 0.0 for e in err]
            vals += [y + e for (_, y, _), e in zip(ok, err)] + [y - e for (_, y, _), e in zip(ok, err)]
            color = "#d62728" if k == "DBS" else cmap(i / max(len(keys) - 1, 1) * 0.85)
            ax.bar([x for x, _, _ in ok], [y for _, y, _ in ok], width=width * 0.95, color=color,
                   yerr=err if any(err) else None, capsize=3, label="DBS" if k == "DBS" else f"B={k}")
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

    bars(axes[0], ours, f"ours: {ours_note}", errors)
    bars(axes[1], paper or {}, f"paper (values quoted in its text; {paper_note})")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_vs_sparsity(path: str, ours: Mapping[str, Mapping[float, float | None]],
                     paper: Mapping[str, Mapping[object, tuple]] | None, *, title: str, ours_note: str,
                     errors: Mapping[str, Mapping[float, float | None]] | None = None) -> str:
    """Speed (baseline time / time) vs sparsity per variant, ours (``errors``: error bars) and the paper's
    tables."""
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
                ax.errorbar([100 * x for x in xs], ys, yerr=_yerr(errors, v, xs) if data is ours else None, marker=mk,
                            ls=ls, label=v, color=_COLORS.get(v), alpha=0.9, capsize=3)
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
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"), ("P", "--")]
    for ax, tag in zip(axes, tags):
        for i, (name, tr) in enumerate(traces.items()):
            pts = tr.get(tag) or []
            if pts:
                xs, ys = zip(*pts)
                mk, ls = styles[i % len(styles)]
                # members that followed the same schedule overlap: later ones thinner, hollow, on top
                ax.plot(xs, ys, marker=mk, ls=ls, lw=2.6 - 0.5 * min(i, 4), ms=9 - min(i, 4), mfc="none",
                        label=name, zorder=2 + i)
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


def reliability(path: str, curves: Mapping[str, Sequence[Mapping]], *, title: str) -> str:
    """Reliability diagram: per model (ensembles first), accuracy against mean confidence of each
    non-empty bin, dot area ~ images in it, and the diagonal of perfect calibration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="calibrated")
    total = max((sum(b["count"] for b in bins) for bins in curves.values()), default=1) or 1
    for i, (label, bins) in enumerate(curves.items()):
        pts = [(b["confidence"], b["accuracy"], b["count"]) for b in bins if b["count"]]
        if not pts:
            continue
        ensemble = "ensemble" in label
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if ensemble else "--", color="black" if ensemble else
                f"C{i % 10}", lw=2 if ensemble else 1, label=label, zorder=3 if ensemble else 2)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[8 + 400 * p[2] / total for p in pts],
                   color="black" if ensemble else f"C{i % 10}", alpha=0.6, zorder=3 if ensemble else 2)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# the DBS schedule
# --------------------------------------------------------------------------------------------------
def plot_plan(rows: Sequence[dict[str, Any]], path: str, *, title: str = "", k: float | None = None,
              v0: float = 0.5, m0: float = 0.9, m_max: float = 0.99) -> str:
    """η, m and B over epochs (from :func:`plan` rows or a trainer's history), phases shaded; with ``k``
    a fourth panel shows the momentum ODE curve for that k (paper Fig. 5b)."""
    import numpy as np

    from ..dbs import momentum_curve

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    panels = [("lr", "learning rate η", True), ("momentum", "momentum m", False), ("batch_size", "batch size B", False)]
    n = len(panels) + (k is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    colours = {"warmup": "#fde2b3", "lr": "#cfe3f7", "momentum": "#d8f0d2", "hold": "#eeeeee", "fixed": "#eeeeee"}
    for ax, (key, label, log) in zip(axes, panels):
        ys = [r[key] for r in rows]
        ax.step(ep + [ep[-1] + 1], ys + ys[-1:], where="post", color="black", lw=1.4)
        for r in rows:
            ax.axvspan(r["epoch"], r["epoch"] + 1, color=colours.get(r["phase"], "white"), lw=0)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for p, c in colours.items() if p != "fixed"]
    axes[0].legend(handles, [p for p in colours if p != "fixed"], fontsize=7, loc="lower right")
    if k is not None:
        t = np.linspace(0.0, 0.4, 201)
        axes[-1].plot(t, momentum_curve(k, v0, m0, m_max, t), color="C2")
        axes[-1].axhline(m_max, color="grey", lw=0.8, ls="--")
        axes[-1].set_title(f"momentum ODE y''y = k, k = {k:.4g}", fontsize=10)
        axes[-1].set_xlabel("proportion of epochs since the momentum phase began")
        axes[-1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    from .. import storage

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    return storage.write_bytes(path, buf.getvalue())  # temporary file + rename: never half a PNG


def plot_momentum_curves(path: str, ks: Sequence[float] = (0, 1.3, 1.45, 1.6, 1.75), v0: float = 0.5,
                         m0: float = 0.9, m_max: float = 0.99,
                         extra_scale_ks: Sequence[float] = (0.01, 0.03, 0.05, 0.1, 0.2, 0.4),
                         t_end: float = 0.4) -> str:
    """Paper Fig. 5b (momentum vs proportion of epochs for the paper's k) plus a panel at a scale of k
    where momentum does approach m_max (k <= critical_k ~ 0.054 for the defaults reaches it)."""
    import numpy as np

    from ..dbs import critical_k, momentum_curve, momentum_limit

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.linspace(0.0, t_end, 401)
    kc = critical_k(v0, m0, m_max)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, group, title in (
        (axes[0], ks, f"paper's k (Fig. 5b): k>0 tops out at 1-(1-m0)e^(-v0^2/2k), e.g. "
                      f"{momentum_limit(1.6, v0, m0):.4f} for k=1.6"),
        (axes[1], extra_scale_ks, f"k on the scale where m approaches m_max={m_max}: "
                                  f"k <= {kc:.4f} reaches it"),
    ):
        for k in group:
            ax.plot(t, momentum_curve(k, v0, m0, m_max, t), label=f"k={k:g}")
        ax.axhline(m_max, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("proportion of total epochs since the momentum phase began")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("momentum coefficient m")
    fig.suptitle(f"y'' y = k, y = 1 - m, y(0) = {1 - m0:g}, y'(0) = -{v0:g}; m held at the turning "
                 f"point, capped at {m_max}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_search(trials: Sequence[dict[str, Any]], best: dict[str, Any], path: str) -> str:
    """The DBS search's time-to-accuracy trade-off: last-epoch validation accuracy against training
    seconds per trial (trials ASHA stopped early hollow; the front of the finished ones joined; the
    chosen constants circled)."""

    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import storage

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    done = [t for t in trials if t.get("completed")]
    stopped = [t for t in trials if not t.get("completed")]
    ax.scatter([t["train_seconds"] for t in done], [t["val_accuracy"] for t in done], color="C0",
               label="ran the whole budget")
    if stopped:
        ax.scatter([t["train_seconds"] for t in stopped], [t["val_accuracy"] for t in stopped], facecolors="none",
                   edgecolors="grey", label="stopped early by ASHA (not eligible)")
    front = sorted((t for t in done if t.get("pareto")), key=lambda t: t["train_seconds"])
    if front:
        ax.plot([t["train_seconds"] for t in front], [t["val_accuracy"] for t in front], color="C0", lw=0.8)
    ax.scatter([best["train_seconds"]], [best["val_accuracy"]], s=160, facecolors="none", edgecolors="C3",
               label="chosen (best last-epoch val accuracy)")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("validation accuracy at the trial's last epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    return storage.write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Winograd-domain kernels (paper Fig. 5a)
# --------------------------------------------------------------------------------------------------
def plot_winograd_kernels(
    layer_or_kernels_by_sparsity: WinogradReLUConv2d | torch.Tensor | Mapping[float, torch.Tensor],
    path: str | None = None,
    *,
    in_channels: int = 6,
    out_channels: int = 6,
    title: str | None = None,
    cmap: str = "RdBu_r",
    zero_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
    dpi: int = 100,
) -> np.ndarray:
    """Grid of 4x4 Winograd-domain kernels (first ``out_channels`` rows x ``in_channels`` columns),
    one panel per sparsity side by side; exact zeros (pruned) drawn in ``zero_color`` (black).

    Accepts a layer, a (C_out, C_in, 4, 4) tensor, or a dict {sparsity: tensor}.  Saves a PNG to
    ``path`` when given and returns the figure as an HWC uint8 RGB array (for TensorBoard).
    """
    import numpy as np
    import torch

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    src = layer_or_kernels_by_sparsity
    from ..winograd import WinogradReLUConv2d

    if isinstance(src, WinogradReLUConv2d):
        k = src.kernels_4x4()
        if hasattr(src, "weight_mask"):
            k = k * src.weight_mask.detach().permute(2, 1, 0).reshape(k.shape).to(k.dtype)
        src = {float((k == 0).float().mean()): k}
    elif isinstance(src, torch.Tensor):
        src = {float((src == 0).float().mean()): src}
    if not isinstance(src, Mapping) or not src:
        raise ValueError("layer_or_kernels_by_sparsity must be a layer, a tensor or a non-empty dict")
    panels = []
    for s, k in sorted(src.items()):
        k = torch.as_tensor(k).detach().float().cpu()
        if k.dim() != 4 or tuple(k.shape[-2:]) != (4, 4):
            raise ValueError(f"kernels for sparsity {s} must be (C_out, C_in, 4, 4), got {tuple(k.shape)}")
        panels.append((s, k[:out_channels, :in_channels].numpy()))
    vmax = max(float(np.abs(p).max()) for _, p in panels) or 1.0
    colormap = plt.get_cmap(cmap)

    gap = 1
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (s, k) in enumerate(panels):
        ko, ki = k.shape[:2]
        img = np.ones((ko * (4 + gap) - gap, ki * (4 + gap) - gap, 3))  # white gaps
        for o in range(ko):
            for c in range(ki):
                tile = k[o, c]
                rgb = colormap(0.5 + 0.5 * tile / vmax)[..., :3]
                rgb[tile == 0] = zero_color
                img[o * (4 + gap): o * (4 + gap) + 4, c * (4 + gap): c * (4 + gap) + 4] = rgb
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"sparsity {100 * s:.0f}%")
        ax.set_xlabel("input channel")
        ax.set_ylabel("output channel")
        ax.set_xticks([c * (4 + gap) + 1.5 for c in range(ki)], [str(c) for c in range(ki)])
        ax.set_yticks([o * (4 + gap) + 1.5 for o in range(ko)], [str(o) for o in range(ko)])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        fig.savefig(path)
    return arr
