"""The whole method as Ray Tune experiments: base members -> stacking (-> DBS-constant search).

``esdbs run`` validates a :class:`~esdbs_ray.config.PipelineConfig` once (``config.build_config``), and:

1. **base** -- one Tune experiment, one trial per (variant, member), in parallel: GPU actors (whole or
   packed fractional GPUs, ``ray_env.gpus_per_trial``) when the cluster has GPUs, CPU workers
   otherwise.  Each trial trains its CNN, prunes along the ladder and leaves checkpoints, TensorBoard
   events, Parquet predictions and its own summary (``members/<member>.json``).
2. **stack** -- weights for the weighted-average ensemble, searched on validation predictions only
   (``stacking.py``), one ``stacking[-<group>].json`` per group of two or more members.
3. **dbs-search** (when asked) -- a Tune experiment with ASHA over the DBS constants (spec §6), scored
   on the last epoch of the budget; the best constants land in ``dbs_constants.json``, which
   ``esdbs run --dbs-constants`` reuses.

Tracking (``tracking.py``): one TensorBoard stream per trial (the trainer's; Tune's own TBX logger is
off) and, when ``tracking.mlflow.enabled``, MLflow runs for every trial and for the experiment.

Where everything goes is :class:`~esdbs_ray.layout.ExperimentLayout` (a local path or a ``pyarrow.fs``
URI shared by all nodes).  The dataset is loaded once by the driver and reaches the trials through
Ray's object store (``tune.with_parameters``): trials never re-read or decompress files.  Trials cross
into Tune as typed :class:`~esdbs_ray.config.TrialSpec` objects, keyed by member name.
"""
from __future__ import annotations

import os
import time

import yaml

from . import storage, tracking
from .config import ConfigError, PipelineConfig, parse_saved_config, slug
from .layout import ExperimentLayout, claim_dir
from .layout import ExperimentLayout as L
from .ray_env import cluster_capacity, gpus_per_trial, init_ray, quiet_tune, tolerate_deleted_checkpoints
from .replicates import run_summary, seed_layouts, seed_summary, trial_finished, trial_order, trials_by_seed


class RunFailed(RuntimeError):
    """Trials failed (the run itself, not the user's input)."""


class RunInterrupted(Exception):
    """A stop signal (SIGINT, SIGTERM) ended the run; Tune saved the trials' state."""

    def __init__(self, experiment: str):
        super().__init__(f"interrupted; the trials' state is saved: esdbs run --resume {experiment}")
        self.experiment = experiment


def _resources(cfg: PipelineConfig, n_trials: int) -> dict:
    r = cfg.resources
    setting = r.gpus_per_trial
    capacity = cluster_capacity() if setting == "auto" else None
    gpu = gpus_per_trial(setting, n_trials, r.cpus_per_trial, r.max_concurrent_trials, capacity)
    if capacity:
        print(f"[esdbs] {n_trials} trial(s): {gpu:g} GPU each ({capacity['gpus']} GPU(s) from "
              f"{capacity['source']}), {r.cpus_per_trial:g} CPU each", flush=True)
    return {"cpu": r.cpus_per_trial, "gpu": gpu}


# --------------------------------------------------------------------------------------------------
# Stage: base
# --------------------------------------------------------------------------------------------------
def run_base(cfg: PipelineConfig, layout: ExperimentLayout, data, *, resume: bool = False, progress: bool = True,
             verbose: bool = False):
    """``progress``: one line per member-epoch (progress.py); ``verbose``: Tune's own tables instead.

    A multi-seed config (``seeds``) runs every seed's trials in this one experiment, Tune's config of a
    trial ``{"member": name, "seed": s}``; ``data`` is then ``{seed: dataset}``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .progress import Progress
    from .provenance import provenance
    from .trainable import train_member

    by_seed = trials_by_seed(cfg)
    keyed = {L.trial_key(m, s): t for s, specs in by_seed.items() for m, t in specs.items()}
    trainable = tune.with_resources(
        tune.with_parameters(train_member, specs=by_seed if cfg.seeds else by_seed[None], data=data,
                             experiment_dir=layout.root, provenance=provenance()),
        _resources(cfg, len(keyed)),
    )
    # Tune saves its experiment state (which trials finished, their latest checkpoints) every 10 s or
    # more by default; a driver killed in between would rerun work on --resume.  A few trials make
    # the save cheap, so save often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    shown = [Progress({k: t.train.total_epochs for k, t in keyed.items()})] if progress and not verbose else []
    if resume and tune.Tuner.can_restore(layout.base):
        tolerate_deleted_checkpoints()
        # the run's callbacks come back with it (a progress printer too, when the run had one)
        tuner = tune.Tuner.restore(layout.base, trainable, resume_unfinished=True, resume_errored=True)
    else:
        order = trial_order(by_seed, _cost)  # longest first
        space = ({"param_space": {"member": None, "seed": None},
                  "search": {"num_samples": len(order), "search_alg": BasicVariantGenerator(
                      points_to_evaluate=[{"member": m, "seed": s} for m, s in order])}}
                 if cfg.seeds else {"param_space": {"member": tune.grid_search([m for m, _ in order])}, "search": {}})
        tuner = tune.Tuner(
            trainable,
            param_space=space["param_space"],
            tune_config=tune.TuneConfig(
                **space["search"],
                max_concurrent_trials=cfg.resources.max_concurrent_trials or None,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                reuse_actors=cfg.resources.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=ExperimentLayout.TUNE_BASE[-1], storage_path=layout.tune,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                sync_config=tune.SyncConfig(sync_artifacts=True),
                # the trainer's TensorBoard stream only; MLflow runs when tracking is on
                callbacks=[*tracking.tune_callbacks(cfg, layout.root, keyed), *shown],
                verbose=1 if verbose else 0,
            ),
        )
    with quiet_tune(verbose):
        results = tuner.fit()
    if any(r.error is None and not trial_finished(cfg, layout, r) for r in results):
        raise RunInterrupted(layout.root)  # a stop signal ended the trials early; their state is saved
    if results.errors:
        raise RunFailed(f"{len(results.errors)} base trial(s) failed: "
                        + "; ".join(str(e).splitlines()[0] for e in results.errors))
    return results


def _cost(spec) -> float:
    """A trial's rough cost for ordering: epochs x (Winograd trials run slower on CPUs) x width."""
    return spec.train.total_epochs * (2.0 if spec.train.conv == "winograd_relu" else 1.0) * spec.train.width


def _trial_name(trial) -> str:
    return f"{L.trial_key(trial.config['member'], trial.config.get('seed'))}_{trial.trial_id}"


# --------------------------------------------------------------------------------------------------
# Stage: stack
# --------------------------------------------------------------------------------------------------
def run_stack(cfg: PipelineConfig, layout: ExperimentLayout) -> dict[str, dict]:
    """One stacking search per group of two or more members: ``stacking.json`` when there is a single
    group, else ``stacking-<group>.json``."""
    from .stacking_run import stack_experiment

    trials = cfg.trials()
    groups = [g["group"] for g in cfg.groups()]
    results = {}
    for group in groups:
        names = [t.member for t in trials if t.group == group]
        if len(names) < 2:
            continue
        # a group's rung is on its own ladder: a basis rung by its t (SBC-CNN), SRB-CNN has only one
        sparsity, basis_threshold = cfg.stack_rung(group, next(t.variant for t in trials if t.group == group))
        results[group] = stack_experiment(
            layout.root, sparsity=sparsity, basis_threshold=basis_threshold, variant=group, members=names,
            methods=cfg.stack.methods,
            tune_samples=cfg.stack.tune_samples, seed=cfg.seed, choose=cfg.stack.choose, cv_folds=cfg.stack.cv_folds,
            storage_path=layout.tune, output=layout.stacking(None if len(groups) == 1 else slug(group)),
        )
    return results


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------
def load_resumed_config(out: str) -> PipelineConfig:
    from .config import YAML_MAX_BYTES
    from .errors import UserError

    layout = ExperimentLayout.at(out)
    try:
        text = storage.read_bytes(layout.config, max_bytes=YAML_MAX_BYTES).decode()
    except FileNotFoundError:
        raise ConfigError(f"--resume {out}: no config.yaml there; is it an esdbs experiment directory?") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--resume {out}: config.yaml is not text (not UTF-8)") from None
    except UserError as exc:  # a directory, a pipe, a link to nowhere, too large
        raise ConfigError(f"--resume {out}: cannot read config.yaml ({str(exc).split(': ', 1)[-1]})") from None
    except OSError as exc:  # no permission
        raise ConfigError(f"--resume {out}: cannot read config.yaml ({exc.__class__.__name__})") from None
    try:
        return parse_saved_config(text, "config.yaml")
    except ConfigError as exc:
        raise ConfigError(f"--resume {out}: {exc}") from None


def run_pipeline(cfg: PipelineConfig, out: str, *, resume: bool = False, force: bool = False,
                 address: str | None = None, num_cpus: int | None = None, progress: bool = True,
                 verbose: bool = False) -> dict:
    """``progress`` False: only the final line (``--quiet``); ``verbose``: Tune's tables and Ray's notes."""
    from .progress import format_summary, summary_line
    from .provenance import device_info, provenance

    t0 = time.perf_counter()
    # Everything that can be refused is refused before anything is written: the output directory is
    # checked, the data loads, and only then is the directory claimed (a failed load leaves nothing).
    claim_dir(out, "experiment", resume=resume, force=force, check_only=True)
    tracking.settings(cfg, storage.normalize(out))  # MLflow on but unusable: refused now
    from .data import load_configured

    # one experiment per seed: the run itself, or OUT/seed-<s>/ of a multi-seed run (each what the
    # seed's config run alone leaves, so that every reader takes it as it is)
    replicates = {r.seed: r for r in cfg.replicates()}
    data = {s: load_configured(r) for s, r in replicates.items()}
    claims: list = []
    layout = ExperimentLayout(claim_dir(out, "experiment", resume=resume, force=force, claims=claims))
    try:  # until Ray is up nothing has run: a failure takes the new directory back
        if not resume:
            storage.write_text(layout.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        where = seed_layouts(cfg, layout)
        if progress:
            for d in dict.fromkeys(d.describe() for d in data.values()):
                print(f"[esdbs] {d}", flush=True)
            print(f"[esdbs] variants {', '.join(cfg.variants)}; members {', '.join(m.model for m in cfg.members)}"
                  + (f"; seeds {', '.join(map(str, cfg.seeds))}" if cfg.seeds else "") + f" -> {layout.root}",
                  flush=True)
        init_ray(address, num_cpus, quiet=not verbose)
    except BaseException:
        for claim in claims:
            claim.undo()
        raise

    results = run_base(cfg, layout, data if cfg.seeds else data[cfg.seed], resume=resume, progress=progress,
                       verbose=verbose)
    base_seconds = time.perf_counter() - t0
    summaries = {}
    for s, r in replicates.items():  # each seed's members stack among themselves
        mine = [x for x in results if x.config.get("seed") == (s if cfg.seeds else None)]
        summaries[s] = seed_summary(r, where[s], mine, run_stack(r, where[s]), dataset=data[s].describe(),
                                    base_seconds=base_seconds, resumed=resume,
                                    provenance={**provenance(), "device": device_info()})
    summary = summaries[cfg.seed] if not cfg.seeds else run_summary(
        cfg, layout, base_wall_seconds=base_seconds, resumed=resume, provenance=summaries[cfg.seed]["provenance"])
    summary["dbs_search"] = run_dbs_search(cfg, layout, data[cfg.seed]) if cfg.run_dbs_search else None
    for s in replicates:
        summaries[s]["wall_seconds"] = time.perf_counter() - t0
        storage.write_json(where[s].summary, summaries[s])
        print(format_summary(summaries[s]) if progress else summary_line(summaries[s]), flush=True)
    if cfg.seeds:
        summary["wall_seconds"] = time.perf_counter() - t0
        storage.write_json(layout.summary, summary)
    tracked = tracking.log_experiment(cfg, layout, summary)
    if tracked:
        print(f"[esdbs] MLflow: experiment {tracked['experiment_name']!r} at {tracked['tracking_uri']} "
              f"(run {tracked['run_id']}; {len(tracked['trial_runs'])} trial runs)", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------
# Stage: DBS-constant search (spec §6)
# --------------------------------------------------------------------------------------------------
def _search_space(space: dict) -> dict:
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice, "randint": tune.randint}
    return {key: makers[kind](args) if kind == "choice" else makers[kind](*args)
            for key, spec in space.items() for kind, args in spec.items()}


def dbs_search_points(space: dict, n: int, seed: int) -> list[dict]:
    """The ``n`` DBS-constant samples of a search, drawn from ``space`` with ``seed``.

    Drawn here and handed to Tune as the points to evaluate: Tune's own sampling draws from an
    unseeded generator, so the same config searched twice tried different constants."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    domains = _search_space(space)
    return [dict(spec) for _ in range(n) for _, spec in generate_variants(domains, random_state=rng)]


def _pareto(trials: list[dict]) -> list[int]:
    """Indices of the time-to-accuracy front: no other trial is both faster and more accurate at the
    end of the budget."""
    def dominates(o, t):
        return (o["val_accuracy"] >= t["val_accuracy"] and o["train_seconds"] <= t["train_seconds"]
                and (o["val_accuracy"], o["train_seconds"]) != (t["val_accuracy"], t["train_seconds"]))
    return [i for i, t in enumerate(trials) if not any(dominates(o, t) for o in trials)]


def run_dbs_search(cfg: PipelineConfig, layout: ExperimentLayout, data, *, progress: bool = True) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .analysis.figures import plot_search
    from .provenance import provenance
    from .trainable import train_dbs_trial

    s = cfg.dbs_search
    base = cfg.train.model_dump()
    base.update(model=s.model, conv="winograd_relu", schedule="dbs", epochs=s.epochs, sparsity_ladder=[],
                dataset=cfg.dataset, subset=cfg.subset, test_subset=cfg.test_subset, val_fraction=cfg.val_fraction,
                image_size=cfg.image_size, seed=cfg.seed, data_dir=cfg.data_dir)
    trainable = tune.with_resources(
        tune.with_parameters(train_dbs_trial, data=data, base=base, provenance=provenance()),
        _resources(cfg, s.num_samples),
    )
    points = dbs_search_points(s.space, s.num_samples, cfg.seed)
    tuner = tune.Tuner(
        trainable,
        param_space=_search_space(s.space),
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", num_samples=s.num_samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=points),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=s.epochs, grace_period=s.grace_period),
            # every sample trains the same model: a reused actor keeps its compiled layers
            reuse_actors=cfg.resources.reuse_actors,
        ),
        run_config=tune.RunConfig(name=ExperimentLayout.TUNE_DBS_SEARCH[-1], storage_path=layout.tune,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=tracking.tune_callbacks(cfg, layout.root),
                                  verbose=1 if progress else 0),  # a search is one table, no progress lines
    )
    results = tuner.fit()
    if results.errors:
        raise RunFailed(f"{len(results.errors)} DBS-search trial(s) failed")
    # Objective (spec §6): validation accuracy at the *last* epoch of the budget.  A trial's best epoch
    # would reward a schedule that peaked early and then fell apart, and a trial ASHA stopped never
    # faced the end of the budget: only trials that ran every epoch compete.
    trials = [
        {"config": {k: r.config[k] for k in s.space}, "val_accuracy": r.metrics.get("val_accuracy"),
         "epochs": r.metrics.get("training_iteration"), "completed": r.metrics.get("training_iteration") == s.epochs,
         "train_seconds": r.metrics.get("train_seconds"), "wall_seconds": r.metrics.get("time_total_s"),
         "total_steps": r.metrics.get("total_steps"), "batch_size": r.metrics.get("batch_size")}
        for r in results if r.metrics
    ]
    finished = [t for t in trials if t["completed"] and t["val_accuracy"] is not None]
    if not finished:
        raise RunFailed("no DBS-search trial ran the whole epoch budget (ASHA stopped them all)")
    for i in _pareto(finished):
        finished[i]["pareto"] = True
    best = max(finished, key=lambda t: (t["val_accuracy"], -t["train_seconds"]))
    constants = cfg.train.dbs.replace(**best["config"]).to_dict()
    record = {"constants": constants, "best_val_accuracy": best["val_accuracy"], "objective":
              "validation accuracy at the last epoch of the budget (trials ASHA stopped early excluded)",
              "best_train_seconds": best["train_seconds"], "best_total_steps": best["total_steps"],
              "model": s.model, "epochs": s.epochs, "seed": cfg.seed, "trials": trials, "provenance": provenance()}
    plot_search(trials, best, layout.dbs_search_figure)
    storage.write_json(layout.dbs_constants, record)
    return record
