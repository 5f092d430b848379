"""``esdbs run --expansion-search``: a Tune experiment over the growth settings of a self-expanding member.

Why: with the natural expansion score of ``expansion.py`` the paper's threshold tau = 2 never lets
``secnn`` grow on Fashion-MNIST (the best candidate's eta ratio stays near 1.1-1.2), and the size penalty
on raw parameter counts decides whether a layer can ever be added to a wide block.  Spec §2.2: pick
the default from a search over tau and the penalty.  This stage is that search, for any config with a
growing member.

What it runs: every point of ``expansion_search.space`` (grid kinds crossed, sampled kinds drawn
from a generator seeded by the first seed, ``num_samples`` times) for each of ``seeds`` seeds
(``expansion_search.seed`` or the member's, +1, ...), as one Tune trial each: the member's own trial config (the member
``expansion_search.member`` names, else the first growing one) with those growth settings,
``epochs`` dense epochs and no ladder.  Trials train through ``trainable._run`` -- the base stage's
trainer and reporting -- and write nothing into the experiment but Tune's files; each reports one
final row with the grown network's size and its growth.  No early stopping: a setting that grows late
would be judged before its growth was trained.

The choice (``choose``): per setting the mean over seeds of the validation accuracy at the last epoch
and of the final parameter count; among the settings whose mean accuracy is within one standard
error of the best (the binomial SE of the best's estimate over seeds x validation images), the one
with the fewest parameters -- the one-standard-error rule: growth is bought only where it shows on
validation.  ``OUT/expansion_search.json`` holds every trial, every setting, the choice and the
rule; ``OUT/expansion_search.png`` accuracy against final parameters.  Test accuracy is recorded, never
used to choose.
"""
from __future__ import annotations

import itertools
import json
import math

from . import storage
from .config import PipelineConfig, TrainConfig, validate
from .layout import ExperimentLayout
from .ray_env import cluster_capacity, gpus_per_trial

__all__ = ["SearchFailed", "run_expansion_search", "search_points", "choose", "train_expansion_trial", "RESULT", "FIGURE", "RULE",
           "TUNE_NAME", "format_search"]

RESULT = "expansion_search.json"
FIGURE = "expansion_search.png"
TUNE_NAME = "expansion_search"  # Tune's experiment under OUT/tune
RULE = ("validation accuracy at the last epoch, mean over seeds; among the settings within one standard error "
        "(binomial, of the best setting's mean) of the best, the one with the fewest final parameters")


class SearchFailed(RuntimeError):
    """Trials of the search failed (the run, not the user's input)."""


def search_points(space: dict, num_samples: int, seed: int, seeds: int = 1) -> list[dict]:
    """The trials of a search: every grid combination x ``num_samples`` draws of the sampled kinds
    (seeded by ``seed``), each for seeds ``seed`` .. ``seed + seeds - 1``; a point is a dict of growth
    settings plus ``"seed"``.  Drawn here, not by Tune (whose sampling is unseeded)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    grid = {k: list(next(iter(s.values()))) for k, s in space.items() if "grid" in s}
    sampled = {k: s for k, s in space.items() if "grid" not in s}
    out = []
    for _ in range(num_samples):
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            for key, spec in sampled.items():
                kind, args = next(iter(spec.items()))
                if kind == "choice":
                    point[key] = args[rng.randint(len(args))]
                elif kind == "uniform":
                    point[key] = float(rng.uniform(*args))
                elif kind == "loguniform":
                    point[key] = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
                else:  # randint: [low, high)
                    point[key] = int(rng.randint(args[0], args[1]))
            point = {k: point[k] for k in space}  # the space's order
            out.extend({**point, "seed": seed + i} for i in range(seeds))
    return out


def _key(point: dict) -> str:
    return json.dumps({k: v for k, v in point.items() if k != "seed"}, sort_keys=True)


def choose(trials: list[dict]) -> tuple[list[dict], dict]:
    """Settings (trials grouped by growth settings, means over seeds) and the chosen one (module doc).
    A trial is ``{"setting": {...}, "seed", "val_accuracy", "val_size", "params", ...}``."""
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(_key(t["setting"]), []).append(t)
    settings = []
    for ts in groups.values():
        acc = sum(t["val_accuracy"] for t in ts) / len(ts)
        n = sum(t["val_size"] for t in ts)
        settings.append({"setting": ts[0]["setting"], "seeds": sorted(t["seed"] for t in ts), "val_accuracy": acc,
                         "val_se": math.sqrt(max(acc * (1 - acc), 0.0) / max(n, 1)),
                         "test_accuracy": _mean([t.get("test_accuracy") for t in ts]),
                         "params": _mean([t["params"] for t in ts]), "base_params": ts[0].get("base_params"),
                         "expansions": _mean([t["expansions"] for t in ts]), "checks": _mean([t["checks"] for t in ts]),
                         "train_seconds": _mean([t.get("train_seconds") for t in ts])})
    best = max(settings, key=lambda s: s["val_accuracy"])
    bar = best["val_accuracy"] - best["val_se"]
    for s in settings:
        s["within_one_se"] = s["val_accuracy"] >= bar
    chosen = min((s for s in settings if s["within_one_se"]), key=lambda s: (s["params"], -s["val_accuracy"]))
    return settings, chosen


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def train_expansion_trial(config: dict, *, data, base: dict, provenance: dict) -> None:
    """Tune entry point: ``config["point"]`` holds the growth settings and the seed."""
    from ray import tune

    from .trainable import _run

    point = dict(config["point"])
    seed = point.pop("seed")
    cfg = validate(TrainConfig, {**base, "seed": seed, "expansion": {**base["expansion"], **point}},
                   "expansion_search sample")
    summary = _run(cfg, "expansion-search", data=data, experiment_dir=None, group="expansion-search",
                   provenance=provenance)
    ops = (summary.expansion or {}).get("ops") or []
    levels = summary.levels
    final = levels[-1] if levels else None
    # a check is an epoch whose record carries the best candidate's ratio (whether or not it grew)
    checks = sum(h.expansion_ratio is not None for h in summary.history)
    tune.report({"final": True, "val_accuracy": summary.val_accuracy, "test_accuracy": summary.test_accuracy,
                 "params": final.params if final else None, "base_params": levels[0].params if levels else None,
                 "expansions": len(ops), "checks": checks, "train_seconds": summary.train_seconds,
                 "ops": json.dumps([f"{o['op']} block {o['block']} (epoch {o['epoch']})" for o in ops])})


def _resources(cfg: PipelineConfig, n_trials: int) -> dict:
    r = cfg.resources
    capacity = cluster_capacity() if r.gpus_per_trial == "auto" else None
    gpu = gpus_per_trial(r.gpus_per_trial, n_trials, r.cpus_per_trial, r.max_concurrent_trials, capacity)
    return {"cpu": r.cpus_per_trial, "gpu": gpu}


def run_expansion_search(cfg: PipelineConfig, layout: ExperimentLayout, data, *, progress: bool = True) -> dict:
    """The stage: Tune experiment ``OUT/tune/expansion_search``, then ``expansion_search.json`` and its
    figure; returns the record."""
    from ray import tune

    from . import tracking
    from .provenance import provenance

    s = cfg.expansion_search
    trial = cfg.expansion_search_trial()
    if trial is None:  # the config's validation refuses this already; a direct caller may not have validated
        raise ValueError("the expansion search needs a growing member (model secnn with expansion.enabled)")
    name = trial.member
    base = trial.train.model_dump()
    base.update(epochs=s.epochs, sparsity_ladder=[], basis={**base["basis"], "ladder": []},
                early_stopping={**base["early_stopping"], "patience": 0})
    points = search_points(s.space, s.num_samples, trial.train.seed if s.seed is None else s.seed, s.seeds)
    trainable = tune.with_resources(
        tune.with_parameters(train_expansion_trial, data=data, base=base, provenance=provenance()),
        _resources(cfg, len(points)))
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials or None,
                                    trial_dirname_creator=lambda t: f"growth_{t.trial_id}",
                                    reuse_actors=cfg.resources.reuse_actors),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=layout.tune,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=tracking.tune_callbacks(cfg, layout.root),
                                  verbose=1 if progress else 0),
    )
    results = tuner.fit()
    if results.errors:
        raise SearchFailed(f"{len(results.errors)} expansion-search trial(s) failed: "
                           + "; ".join(str(e).splitlines()[0] for e in results.errors))
    trials = []
    for r in results:
        m = r.metrics or {}
        if not m.get("final"):
            raise SearchFailed(f"expansion-search trial {r.path} ended without its final report")
        point = dict(r.config["point"])
        trials.append({"setting": {k: point[k] for k in s.space}, "seed": point["seed"],
                       "val_accuracy": m["val_accuracy"], "val_size": len(data.val),
                       "test_accuracy": m.get("test_accuracy"), "params": m["params"], "base_params": m["base_params"],
                       "expansions": m["expansions"], "checks": m["checks"], "train_seconds": m["train_seconds"],
                       "wall_seconds": m.get("time_total_s"), "ops": json.loads(m["ops"])})
    trials.sort(key=lambda t: (_key(t["setting"]), t["seed"]))
    settings, chosen = choose(trials)
    record = {"member": name, "epochs": s.epochs, "seeds": s.seeds, "space": s.space, "objective": RULE,
              "chosen": chosen["setting"], "chosen_summary": chosen, "settings": settings, "trials": trials,
              "train": {k: base[k] for k in ("width", "optimizer", "dropout", "dbs")}, "data": data.describe(),
              "provenance": provenance()}
    plot_search(settings, chosen, storage.join(layout.root, FIGURE))
    storage.write_json(storage.join(layout.root, RESULT), record)
    return record


def format_search(record: dict) -> str:
    """The search as a table (the CLI prints it), chosen setting marked."""
    keys = list(record["space"])
    rows = [f"{'  '.join(f'{k:>9}' for k in keys)}  {'val acc':>8} {'SE':>6} {'params':>8} {'grew':>5}  1-SE"]
    for st in sorted(record["settings"], key=lambda x: [x["setting"][k] for k in keys]):
        mark = "chosen" if st["setting"] == record["chosen"] else ("yes" if st["within_one_se"] else "")
        values = "  ".join(f"{st['setting'][k]:>9g}" for k in keys)
        rows.append(f"{values}  {st['val_accuracy']:8.4f} {st['val_se']:6.4f} {st['params']:8.0f} "
                    f"{st['expansions']:5.1f}  {mark}")
    return "\n".join(rows)


def plot_search(settings: list[dict], chosen: dict, path: str) -> str:
    """Mean last-epoch validation accuracy against mean final parameters per setting, the one-SE band
    of the best shaded, the chosen setting circled."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    keys = list(settings[0]["setting"]) if settings else []
    best = max(settings, key=lambda s: s["val_accuracy"])
    ax.axhspan(best["val_accuracy"] - best["val_se"], best["val_accuracy"], color="C2", alpha=0.12,
               label="within one SE of the best")
    for i, s in enumerate(settings):
        label = ", ".join(f"{k} {s['setting'][k]:g}" for k in keys)
        ax.errorbar([s["params"]], [s["val_accuracy"]], yerr=[s["val_se"]], fmt="o", ms=4, color=f"C{i % 10}",
                    label=label)
    ax.scatter([chosen["params"]], [chosen["val_accuracy"]], s=180, facecolors="none", edgecolors="C3", lw=1.5,
               label="chosen", zorder=5)
    ax.set_xlabel("final parameters (mean over seeds)")
    ax.set_ylabel("validation accuracy, last epoch (mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
    return path
