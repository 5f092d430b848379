"""Self-expanding members in the report: the levels, accuracy against parameters, and the published claims.

What it gives: :func:`self_expanding_section` appends a section to a report document and writes one
PNG figure, for runs with growing ``secnn`` members (:func:`has_growing_members`).  It reads only an
experiment's artifacts: the members' records (``levels``: each level's parameters and val / test
figures; ``expansion``: the operations), the Parquet predictions (the members stacked level by
level), and two optional files beside them --

* ``self_expanding_baselines.json`` (``bench/self_expanding.py``): every level's architecture trained
  from scratch for the same epochs -- the seed architecture and the final grown one among them -- and
  the growing run trained again beside them (interleaved), with times;
* ``expansion_search.json`` (``esdbs run --expansion-search``): the search over tau and the penalty.

Nothing trains, Ray is not imported.

Verdicts on the published claims (../shared/spec/self-expanding.md §1, §2.6), each over the seeds
(one growing member per seed), a difference judged against ``Z`` standard errors, the SE being the
larger of the spread over seeds (SD of the per-seed differences / sqrt(seeds)) and the test sample's
(binomial, two accuracies on the same images, averaged over the seeds):

* *"maintains performance"*: the grown member against its final architecture trained from scratch --
  reproduced unless it is worse by more than Z SE ("and improves" when better by more than Z SE);
* *"improves performance"*: the grown member against the seed architecture trained unchanged --
  reproduced when better by more than Z SE;
* *"one run instead of several"*: the growing run's wall time against the summed wall time of training
  every level's architecture separately, both measured side by side -- reproduced when the one run
  takes less (beyond the report's timing margin); beside it, how far each level's checkpoint from the
  one run falls short of (or beats) its architecture trained for all the epochs.

The published CIFAR-10 numbers stand beside ours, marked as another dataset.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..records import MemberSummary
from .basis import _pct, _pts  # the same figures, written the same way
from .experiment import NOT_REPRODUCED, NOT_RUN, REPRODUCED, TIME_MARGIN, Z, _read_json

__all__ = ["has_growing_members", "self_expanding_section", "PUBLISHED", "BASELINES", "SEARCH", "verdicts"]

BASELINES = "self_expanding_baselines.json"
SEARCH = "expansion_search.json"
# "Self-Expanding Convolutional Neural Networks" (2024), CIFAR-10, mean of 5 trials (spec section 1):
# accuracy reached at a parameter count, and the best.
PUBLISHED = {"dataset": "CIFAR-10", "trials": 5, "epochs": 300, "tau": 2.0,
             "points": [(11_360, 0.70, "70 %"), (33_655, 0.80, "80 %"), (62_698, 0.841, "best, 84.1 %")]}


def growing_members(exp) -> list[MemberSummary]:
    return sorted((m for m in exp.members if m.levels), key=lambda m: m.member)


def has_growing_members(exp) -> bool:
    return bool(growing_members(exp)) or any(
        ((m.config or {}).get("expansion") or {}).get("enabled") for m in exp.members)


# --------------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------------
def _diff_stats(pairs: list[tuple[float, float]], n_test: int | None) -> tuple[float | None, float | None]:
    """Mean of a - b over seeds and its SE: the larger of the spread over seeds and the test sample's."""
    if not pairs:
        return None, None
    d = [a - b for a, b in pairs]
    mean = sum(d) / len(d)
    se_seeds = (math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    se_test = 0.0
    if n_test:
        var = sum(a * (1 - a) + b * (1 - b) for a, b in pairs) / len(pairs) / n_test
        se_test = math.sqrt(var / len(pairs))
    return mean, max(se_seeds, se_test)


def verdicts(base: dict | None, n_test: int | None) -> list[dict]:
    """The three claims judged on ``self_expanding_baselines.json`` (module docstring)."""
    rows = []
    members = (base or {}).get("members") or {}
    grown = [(s["growing"]["test_accuracy"], s["final_from_scratch"]["test_accuracy"]) for s in members.values()]
    seed = [(s["growing"]["test_accuracy"], s["seed_architecture"]["test_accuracy"]) for s in members.values()]
    d, se = _diff_stats(grown, n_test)
    if d is None:
        v = NOT_RUN
    elif d > Z * se:
        v = f"{REPRODUCED} (improves)"
    elif d >= -Z * se:
        v = f"{REPRODUCED} (maintains)"
    else:
        v = NOT_REPRODUCED
    rows.append({"id": "SE1", "claim": "growing maintains (and even improves) performance: the grown network "
                 "against its final architecture trained from scratch, same epochs", "ours": _pts(d, se), "verdict": v,
                 "rule": f"not worse by more than {Z} SE (improves: better by more than {Z} SE)"})
    d, se = _diff_stats(seed, n_test)
    v = NOT_RUN if d is None else (REPRODUCED if d > Z * se else NOT_REPRODUCED)
    rows.append({"id": "SE2", "claim": "growing improves performance: the grown network against the seed "
                 "architecture trained unchanged, same epochs", "ours": _pts(d, se), "verdict": v,
                 "rule": f"better by more than {Z} SE"})
    ratios = [s["growing"]["wall_seconds"] / s["levels_summed"]["wall_seconds"] for s in members.values()
              if s["levels_summed"]["wall_seconds"]]
    if ratios:
        r = sum(ratios) / len(ratios)
        v = REPRODUCED if r <= 1 - TIME_MARGIN else NOT_REPRODUCED
        ours = f"{r:.2f}x the summed time (per seed {', '.join(f'{x:.2f}' for x in ratios)})"
    else:
        v, ours = NOT_RUN, "n/a"
    rows.append({"id": "SE3", "claim": "one growing run instead of training each level's architecture separately",
                 "ours": ours, "verdict": v,
                 "rule": f"the growing run's wall time below the levels' summed wall time by more than {TIME_MARGIN:.0%}"})
    return rows


# --------------------------------------------------------------------------------------------------
# the section
# --------------------------------------------------------------------------------------------------
def self_expanding_section(doc, exp, out: Path) -> dict[str, str | None]:
    """Append the "Self-expanding members" section; returns ``{"self_expanding": figure path or None}``."""
    members = growing_members(exp)
    base = _read_json(exp.tree, BASELINES)
    search = _read_json(exp.tree, SEARCH)
    doc.h(2, "Self-expanding members", "self-expanding")
    if not members:
        doc.p(f"**{NOT_RUN}**: the run has members configured to grow but no member record with levels.")
        return {"self_expanding": None}
    e = (members[0].config or {}).get("expansion") or {}
    cfg = members[0].config or {}
    doc.p(f"{len(members)} growing `secnn` member(s) (seeds {', '.join(str((m.config or {}).get('seed')) for m in members)}), "
          f"{cfg.get('epochs')} epochs each, a check every {e.get('check_every')} epoch(s) after a cooldown of "
          f"{e.get('cooldown')}, tau {e.get('tau')}, penalty {e.get('penalty')}, widening by {e.get('widen_channels')} "
          f"channels, {e.get('n_init')} initialisations of a new layer, the natural expansion score on "
          f"{e.get('score_samples')} training images. Each expansion first closes a *level*: the network as it was, "
          "evaluated and its predictions kept (`esdbs stack --level K`, `esdbs export --level K`); the last level "
          "is the grown network.")
    n_test = members[0].test_size
    rows = []
    for m in members:
        for lv in m.levels:
            rows.append([m.member, (m.config or {}).get("seed"), lv.level, f"{lv.params:,}" if lv.params else "n/a",
                         lv.epoch + 1, _pct(lv.val_accuracy), _pct(lv.test_accuracy), lv.expansion or ""])
    doc.table(["member", "seed", "level", "parameters", f"closed after epoch (of {cfg.get('epochs')})", "val", "test",
              "what ended it"], rows, "Levels of the growing members")
    _levels_stacked(doc, exp, members)
    fig = _figure(str(out / "self_expanding_accuracy_vs_params.png"), members, base)
    doc.img(fig, "accuracy vs parameters", "Test accuracy against parameters: each growing member level by level "
            "(solid), every level's architecture trained from scratch for the same epochs (dashed, hollow), the "
            "seed and final architectures among them; right: the published CIFAR-10 numbers (another dataset)")
    _baselines(doc, base, members)
    claims = verdicts(base, n_test)
    doc.h(3, "The published claims", "self-expanding-claims")
    doc.table(["id", "claim", "ours", "verdict", "rule"],
              [[c["id"], c["claim"], c["ours"], c["verdict"], c["rule"]] for c in claims])
    doc.p(f"SE: the larger of the spread over the {len(members)} seeds and the test sample's binomial SE. "
          + ("" if base else f"The comparisons are {NOT_RUN}: no `{BASELINES}` in the experiment "
             "(`python bench/self_expanding.py EXPERIMENT` trains the architectures from scratch)."))
    _published(doc, members, exp.dataset, base)
    _search(doc, search)
    return {"self_expanding": fig}


def _levels_stacked(doc, exp, members) -> None:
    """The members stacked at each level they all reached (NLL-optimal weights on validation)."""
    table = exp.table
    if table is None or len(members) < 2:
        return
    from ..predictions import prediction_matrix
    from ..stacking import evaluate, nll_optimal

    names = [m.member for m in members]
    common = min(len(m.levels) for m in members)
    rows = []
    for k in range(common):
        try:
            Pv, yv, _ = prediction_matrix(table, "val", names, None, level=k)
            Pt, yt, _ = prediction_matrix(table, "test", names, None, level=k)
        except Exception as exc:  # a level missing from the predictions: say so, go on
            exp.problems.append(f"level {k} not stacked: {str(exc).splitlines()[0]}")
            continue
        w = nll_optimal(Pv, yv)
        best = max(m.levels[k].test_accuracy for m in members)
        rows.append([k, " / ".join(f"{m.levels[k].params:,}" for m in members), _pct(evaluate(w, Pt, yt)["accuracy"]),
                     _pct(best), " ".join(f"{x:.2f}" for x in w)])
    if rows:
        doc.table(["level", "parameters (per member)", "stack test", "best member test", "weights"], rows,
                  "The members stacked level by level (weights fitted on validation)")


def _baselines(doc, base: dict | None, members) -> None:
    if not base:
        return
    rows, times = [], []
    for name, s in sorted(base["members"].items()):
        g, f, z = s["growing"], s["final_from_scratch"], s["seed_architecture"]
        rows.append([name, s["seed"], f"{g['params']:,}", _pct(g["test_accuracy"]), _pct(f["test_accuracy"]),
                     _pts(g["test_accuracy"] - f["test_accuracy"]), f"{z['params']:,}", _pct(z["test_accuracy"]),
                     _pts(g["test_accuracy"] - z["test_accuracy"]), "yes" if s["rerun_grew_the_same"] else "**no**"])
        gaps = []
        by_level = {r["level"]: r for r in s["levels"]}
        for lv in s["experiment_levels"]:
            r = by_level.get(lv["level"])
            if r is not None and lv.get("test_accuracy") is not None:
                gaps.append(lv["test_accuracy"] - r["test_accuracy"])
        times.append([name, len(s["levels"]), f"{g['wall_seconds']:.0f}", f"{s['levels_summed']['wall_seconds']:.0f}",
                      f"{s['time_ratio']['wall_seconds']:.2f}", f"{s['time_ratio']['cpu_seconds']:.2f}",
                      _pts(sum(gaps) / len(gaps)) if gaps else "n/a"])
    doc.table(["member", "seed", "grown params", "grown test", "final arch. from scratch", "grown - scratch",
               "seed params", "seed arch. unchanged", "grown - seed", "rerun grew the same"], rows,
              "The grown networks against fixed architectures (same seed, data, epochs, optimizer, schedule)")
    load = sorted({x for r in base.get("runs", []) for x in (r.get("load_average_start") or [])[:1]})
    doc.table(["member", "levels", "growing run (s)", "levels trained separately, summed (s)", "ratio (wall)",
               "ratio (CPU)", "level checkpoint - same architecture trained fully (mean)"], times,
              f"One run instead of several ({base.get('workers')} worker processes x {base.get('threads')} thread(s), "
              "jobs interleaved; 1-minute load average at the jobs' starts "
              + (f"{load[0]:.1f}-{load[-1]:.1f}" if load else "n/a") + ")")


def _published(doc, members, dataset: str | None, base: dict | None = None) -> None:
    final = [m.levels[-1] for m in members]
    acc = sum(lv.test_accuracy for lv in final) / len(final)
    params = sum(lv.params for lv in final) / len(final)
    # The seed network's figure is the seed architecture trained for all the epochs where the baselines
    # exist: a growing run's level 0 closes at its first check, one epoch in, and would understate it.
    # (only where the baselines cover every growing member: the two means are over the same seeds)
    covered = (base or {}).get("members") or {}
    scratch = [covered[m.member]["seed_architecture"] for m in members if m.member in covered]
    if scratch and len(scratch) == len(members):
        seed_acc, seed_params = sum(r["test_accuracy"] for r in scratch) / len(scratch), scratch[0]["params"]
        seed_what = "seed architecture trained unchanged"
    else:
        seed = [m.levels[0] for m in members]
        seed_acc, seed_params = sum(lv.test_accuracy for lv in seed) / len(seed), seed[0].params
        seed_what = f"seed network at level 0 (closed after epoch {seed[0].epoch + 1})"
    rows = [[f"{PUBLISHED['dataset']} (published; another dataset)", f"{PUBLISHED['trials']} trials, "
             f"{PUBLISHED['epochs']} epochs, tau {PUBLISHED['tau']:g}",
             "; ".join(f"{label} at {p:,} parameters" for p, _, label in PUBLISHED["points"])],
            [f"{dataset or 'this run'} (ours)", f"{len(members)} seeds, {members[0].dense_epochs} epochs",
             f"{seed_what} {_pct(seed_acc)} at {seed_params:,} parameters; "
             f"grown {_pct(acc)} at {params:,.0f} parameters (means over seeds)"]]
    doc.table(["data", "set-up", "accuracy at parameters"], rows,
              "The published numbers beside ours: different datasets, not comparable in magnitude")


def _search(doc, search: dict | None) -> None:
    if not search:
        return
    keys = list(search.get("space") or {})
    chosen = search.get("chosen") or {}
    doc.h(3, "Search over the growth settings", "self-expanding-search")
    doc.p(f"`esdbs run --expansion-search`: member {search.get('member')}, {search.get('epochs')} epochs, "
          f"{search.get('seeds')} seed(s) per setting; choice: {search.get('objective')}. Chosen: "
          + ", ".join(f"{k} {v:g}" for k, v in chosen.items()) + ".")
    rows = []
    for s in sorted(search.get("settings") or [], key=lambda s: [s["setting"][k] for k in keys]):
        rows.append([*(f"{s['setting'][k]:g}" for k in keys), _pct(s["val_accuracy"]), f"{100 * s['val_se']:.2f}",
                     f"{s['params']:,.0f}", f"{s['expansions']:.1f}", _pct(s.get("test_accuracy")),
                     "chosen" if s["setting"] == chosen else ("yes" if s.get("within_one_se") else "")])
    doc.table([*keys, "val (mean)", "SE (pt)", "final params", "expansions", "test (not used)", "within 1 SE"], rows)


def _figure(path: str, members, base: dict | None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    scratch = (base or {}).get("members") or {}
    for i, m in enumerate(members):
        c = f"C{i % 10}"
        ax.plot([lv.params for lv in m.levels], [100 * lv.test_accuracy for lv in m.levels], "-o", color=c, ms=4,
                label=f"{m.member} (seed {(m.config or {}).get('seed')}), grown level by level")
        s = scratch.get(m.member)
        if s:
            lv = sorted(s["levels"], key=lambda r: r["params"])
            ax.plot([r["params"] for r in lv], [100 * r["test_accuracy"] for r in lv], "--o", color=c, ms=6,
                    mfc="none", alpha=0.8, label=f"{m.member}: each level's architecture from scratch")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ours: {(members[0].dataset or '').split(' (from ')[0]}"[:90], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ps = PUBLISHED["points"]
    ax2.plot([p for p, _, _ in ps], [100 * a for _, a, _ in ps], "s-", color="grey")
    for p, a, label in ps:
        ax2.annotate(label, (p, 100 * a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax2.set_xlabel("parameters")
    ax2.set_title(f"published: {PUBLISHED['dataset']} (another dataset), mean of {PUBLISHED['trials']} trials",
                  fontsize=9)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
