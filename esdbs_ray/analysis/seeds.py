"""Verdicts that survive another seed: one report over several runs of one config (replicates).

A replicate is one experiment directory: a seed's directory of a multi-seed run (``esdbs run --seeds
0,1,2`` writes OUT/seed-<s>/), or a one-seed run; ``esdbs report DIR [DIR...]`` takes any of them, a
multi-seed run's directory standing for its seeds (:func:`load_replicates`).  They must share the
config but for the seed (and where it ran: ``IGNORED``); anything else is refused with one line
naming the keys (:func:`config_differences`).

What is aggregated:

* every cell of the paper's tables and figures: the mean over the replicates and the standard error
  across them, sd / sqrt(n) (:class:`Estimate`);
* every claim: its paired difference in each replicate (A - B on the same test images, the ratio of two
  times as ln r), their mean and SE across the replicates -- the training noise, which a second seed
  or CPU changes -- and beside it, labelled, the test-sampling SE: the paired standard error over the
  test images within a replicate (its mean over the replicates), which is all one seed can show.

The verdict rule (:func:`judge`, stated in the report by :data:`RULE`):

* *reproduced* when the mean difference is beyond ``Z`` SE across the replicates in the claimed
  direction, *refuted* when it is beyond ``Z`` SE against it, otherwise *inconclusive*, shown with n and
  the difference and its SE;
* one replicate (no SE across seeds) is always inconclusive for the accuracy claims, which compare
  variants; the speed claims of one replicate use the repeats within it instead: the run's timing
  noise (the median coefficient of variation of a fixed-batch trial's epoch times) as the SE of ln r.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UserError
from ..layout import ExperimentLayout as L
from ..replicates import replicate_dirs
from ..storage import Tree, join
from .experiment import INCONCLUSIVE, REFUTED, REPRODUCED, Experiment, _f
from .render import Doc

__all__ = ["Estimate", "Contrast", "judge", "judge_speed", "load_replicates", "replicate_trees", "config_differences",
           "labels", "across", "replicate_note", "section_replicates", "ReplicateError", "Z", "REFUTED", "INCONCLUSIVE",
           "RULE", "IGNORED"]

Z = 2.0  # a difference counts beyond Z standard errors across the replicates

# Config keys that may differ between the replicates of one report: the seed, and what says where and how
# a run ran rather than what it trained (a second machine's data path, its resources, bookkeeping).
IGNORED = ("name", "seed", "seeds", "data_dir", "resources", "tracking", "max_failures", "checkpoints_to_keep",
           "keep_weights", "members.*.seed")

RULE = (f"**The verdict rule.** Each claim is a paired difference measured in every replicate (seed): "
        f"accuracy A - B on the same test images, or a speed factor r as ln r. **Reproduced** only when the mean "
        f"over the replicates is beyond {Z:g} standard errors across them (sd / sqrt(n)) in the claimed direction, "
        f"**refuted** only when it is beyond {Z:g} SE against it; otherwise **inconclusive**, shown with n and the "
        "difference +- its SE. One replicate gives no SE across seeds: its accuracy claims, which compare variants, "
        "are always inconclusive; its speed claims take the SE from the repeats within the run (the epoch-to-epoch "
        "timing noise). The test-sampling SE (the paired SE over the test images, which one seed can show) is kept "
        "beside it and labelled: it leaves out the training noise that a second seed or another CPU changes.")


class ReplicateError(UserError):
    """Experiments that cannot be reported together; the message names them and the keys."""


@dataclass(frozen=True)
class Estimate:
    """One quantity measured once per replicate: its mean and the standard error across them."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def sd(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def se(self) -> float | None:
        """sd / sqrt(n), None for one replicate."""
        return None if self.sd is None else self.sd / math.sqrt(self.n)

    def fmt(self, spec: str = "{:.2f}", scale: float = 1.0, unit: str = "") -> str:
        """"87.03%" for one replicate, "86.91 ± 0.24%" for several."""
        if self.se is None:
            return spec.format(scale * self.mean) + unit
        return f"{spec.format(scale * self.mean)} ± {spec.format(scale * self.se)}{unit}"


def across(exps: Sequence[Experiment], fn: Callable[[Experiment], float | None]) -> Estimate | None:
    """``fn`` of every replicate as an :class:`Estimate`; None when any replicate lacks it."""
    values = [fn(e) for e in exps]
    return None if not values or any(v is None for v in values) else Estimate(tuple(float(v) for v in values))


@dataclass(frozen=True)
class Contrast:
    """A paired difference (``label``: "A - B") in every replicate, with each replicate's test-sampling SE."""

    label: str
    diff: Estimate
    test_se: tuple[float | None, ...] = ()

    @property
    def test_se_mean(self) -> float | None:
        known = [s for s in self.test_se if s is not None]
        return sum(known) / len(known) if known else None

    def beyond(self, sign: int, threshold: float = 0.0) -> int:
        """+1 when the mean is beyond Z SE from ``threshold`` in the direction ``sign``, -1 when beyond it
        against, 0 otherwise (and for one replicate)."""
        se = self.diff.se
        if se is None:
            return 0
        d = sign * (self.diff.mean - threshold)
        return 1 if d > Z * se else (-1 if d < -Z * se else 0)


def judge(contrasts: Sequence[Contrast], sign: int = 1, *, gain: float | None = None) -> str:
    """The verdict of a claim that every contrast lies in direction ``sign`` (+1: A > B).

    Reproduced when every contrast is beyond Z SE across the replicates in that direction -- and, for a
    claimed ``gain`` (the paper's points, as a fraction), the mean is at least half of it; refuted when
    any contrast is beyond Z SE against it, or the gain falls Z SE short of half the paper's; else
    inconclusive (always, for one replicate)."""
    if not contrasts or any(c.diff.se is None for c in contrasts):
        return INCONCLUSIVE
    sides = [c.beyond(sign) for c in contrasts]
    if -1 in sides or (gain is not None and any(c.beyond(sign, gain / 2) == -1 for c in contrasts)):
        return REFUTED
    if all(s == 1 for s in sides) and (gain is None or all(sign * c.diff.mean >= gain / 2 for c in contrasts)):
        return REPRODUCED
    return INCONCLUSIVE


SPEED_CLASSES = ("faster", "about the same", "slower")


def speed_range(cls: str, margin: float) -> tuple[float, float]:
    """The class's range of ln r: faster r >= 1 + margin, slower r <= 1 - margin, else about the same."""
    hi, lo = math.log(1 + margin), math.log(1 - margin)
    return {"faster": (hi, math.inf), "slower": (-math.inf, lo), "about the same": (lo, hi)}[cls]


def judge_speed(log_r: Estimate, claimed: str, margin: float,
                se_repeats: float | None = None) -> tuple[str, float | None]:
    """(verdict, SE used) of a speed claim: r = time of the reference / time of V, judged as ln r.

    Reproduced when the whole interval mean +- Z SE lies in the claimed class's range, refuted when it
    lies wholly outside it, else inconclusive.  The SE is across the replicates; for one replicate,
    ``se_repeats`` (the run's own timing noise), and without that inconclusive."""
    se = log_r.se if log_r.n > 1 else se_repeats
    if se is None:
        return INCONCLUSIVE, None
    lo, hi = log_r.mean - Z * se, log_r.mean + Z * se
    a, b = speed_range(claimed, margin)
    if a <= lo and hi <= b:
        return REPRODUCED, se
    if hi < a or lo > b:
        return REFUTED, se
    return INCONCLUSIVE, se


# --------------------------------------------------------------------------------------------------
# loading replicates and checking that they belong together
# --------------------------------------------------------------------------------------------------
def _expand(path: str | os.PathLike, filesystem) -> list[Tree]:
    tree = Tree(path, filesystem)
    if not tree.is_dir():
        raise FileNotFoundError(f"{tree.root}: no such experiment directory")
    dirs = replicate_dirs(tree)
    if dirs is None:
        return [tree]
    missing = [d for d in dirs if not tree.is_dir(d)]
    if missing:
        raise ReplicateError(f"{tree.root}: a multi-seed run without {', '.join(missing)} (interrupted? esdbs run "
                             f"--resume {tree.root})")
    return [Tree(join(tree.root, d)) if filesystem is None else Tree(tree.path(d), filesystem) for d in dirs]


def replicate_trees(paths: Sequence[str | os.PathLike], *, filesystem=None) -> list[Tree]:
    """The experiment directories of ``paths``, a multi-seed run's directory standing for its seeds'.

    Raises :class:`ReplicateError` with one line -- before anything is written -- when a directory is
    given twice or two configs differ in anything but the keys of :data:`IGNORED`."""
    trees = [t for p in paths for t in _expand(p, filesystem)]
    seen: set[str] = set()
    for t in trees:
        if t.path() in seen:
            raise ReplicateError(f"{t.root}: given twice (a multi-seed run's directory stands for its seeds)")
        seen.add(t.path())
    if len(trees) > 1:
        configs = [_saved_config(t) for t in trees]
        for t, c in zip(trees, configs):
            if not c:
                raise ReplicateError(f"{t.root}: no config (config.yaml or summary.json); cannot tell whether it is "
                                     "a run of the same config as the others")
        for t, c in zip(trees[1:], configs[1:]):
            keys = config_differences(configs[0], c)
            if keys:
                shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                raise ReplicateError(f"{trees[0].root} and {t.root} differ in {shown}: one report takes runs of one "
                                     "config that differ only in seed (or machine)")
    return trees


def load_replicates(paths: Sequence[str | os.PathLike], *, filesystem=None) -> list[Experiment]:
    """:func:`replicate_trees`, each read as an :class:`Experiment`."""
    return [Experiment(t) for t in replicate_trees(paths, filesystem=filesystem)]


def _saved_config(tree: Tree) -> dict:
    """The run's config as saved (config.yaml, else summary.json's copy); {} when neither reads."""
    import yaml

    try:
        d = yaml.safe_load(tree.read_text(L.CONFIG))
        if isinstance(d, dict):
            return d
    except (OSError, ValueError, yaml.YAMLError):
        pass
    try:
        d = tree.read_json(L.SUMMARY)
    except (OSError, ValueError):
        return {}
    return (d.get("config") or {}) if isinstance(d, dict) else {}


def _ignored(path: str) -> bool:
    parts = path.split(".")
    for pattern in IGNORED:
        q = pattern.split(".")
        if len(parts) >= len(q) and all(a in ("*", b) for a, b in zip(q, parts)):
            return True
    return False


def config_differences(a: dict, b: dict) -> list[str]:
    """The dotted keys in which two saved configs differ, leaving out :data:`IGNORED`; a member given as a
    model name equals the mapping holding only that model."""
    out: list[str] = []

    def norm_member(m):
        return {"model": m} if isinstance(m, str) else m

    def walk(x, y, path: str) -> None:
        if path and _ignored(path):
            return
        if path == "members" and isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (mx, my) in enumerate(zip(x, y)):
                walk(norm_member(mx), norm_member(my), f"members.{i}")
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(dict.fromkeys([*x, *y])):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
            return
        if x != y:
            out.append(path or "config")

    walk(a, b, "")
    return out


def labels(exps: Sequence[Experiment]) -> list[str]:
    """A short name per replicate: "seed 1", and where the machines differ "seed 1 (<CPU>)"."""
    def cpu(e):
        dev = ((e.summary or {}).get("provenance") or {}).get("device") or {}
        return str(dev.get("cuda_device") or dev.get("cpu") or "?")

    cpus = [cpu(e) for e in exps]
    seeds = [e.config.get("seed", "?") for e in exps]
    out = [f"seed {s}" + (f" ({c})" if len(set(cpus)) > 1 else "") for s, c in zip(seeds, cpus)]
    # the same seed on the same machine twice (a repeat): number them
    return [x if out.count(x) == 1 else f"{x} #{out[:i + 1].count(x)}" for i, x in enumerate(out)]


def replicate_note(exps: Sequence[Experiment]) -> str:
    """One sentence: how many replicates, which seeds, on what."""
    if len(exps) == 1:
        return f"one replicate ({labels(exps)[0]})"
    return f"{len(exps)} replicates ({', '.join(labels(exps))})"


def section_replicates(doc: Doc, R: Sequence[Experiment]) -> None:
    """The replicates a report aggregates: each one's directory, seed, machine, revision and time."""
    doc.h(2, "Replicates", "replicates")
    doc.p(f"This report aggregates {replicate_note(R)}: runs of one config that differ only in seed (or the "
          "machine they ran on; config keys that may differ: " + ", ".join(f"`{k}`" for k in IGNORED) + "). "
          "Every table cell and figure point is the mean over them with its standard error across them; every "
          "claim is judged on the differences measured in each (the verdict rule, under the claims).")
    groups = [g for g in R[0].main_variants if len(R[0].groups.get(g, {}).get("members", [])) > 1]
    rows = []
    for label, e in zip(labels(R), R):
        prov = (e.summary or {}).get("provenance") or {}
        dev = prov.get("device") or {}
        wall = _f((e.summary or {}).get("base_wall_seconds"))
        ens = []
        for g in groups:
            st = e.stackings.get(g) or {}
            m = (st.get("methods") or {}).get(st.get("chosen")) or {}
            acc = _f(m.get("test_accuracy"))
            ens.append("n/a" if acc is None else f"{100 * acc:.2f}%")
        rows.append([label, f"`{e.root}`", str(dev.get("cuda_device") or dev.get("cpu") or "?"),
                     str(prov.get("git_revision", "?"))[:12], "n/a" if wall is None else f"{wall:.0f}", *ens])
    doc.table(["replicate", "directory", "machine", "git revision", "base stage (s)",
               *[f"{g} ensemble test" for g in groups]], rows,
              "Each replicate's own stacks at its stacking rung (stacking*.json; each seed's members stacked among "
              "themselves)")
