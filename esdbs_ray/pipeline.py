"""The whole method as Ray Tune experiments: base members -> stacking (-> DBS-constant search).

``esdbs run`` builds a :class:`PipelineConfig` once (preset, then YAML overrides, then flags), and:

1. **base** -- one Tune experiment, one trial per (variant, member), in parallel: GPU actors (whole or
   fractional GPUs) when the cluster has GPUs, CPU workers otherwise.  Each trial trains its CNN,
   prunes along the ladder and leaves checkpoints, TensorBoard events and Parquet predictions.
2. **stack** -- weights for the weighted-average ensemble, searched on validation predictions only
   (``stacking.py``), one ``stacking[-<variant>].json`` per variant with two or more members.
3. **dbs-search** (when asked) -- a Tune experiment with ASHA over the DBS constants (spec section 6);
   the best constants land in ``dbs_constants.json``, which ``esdbs run --dbs-constants`` reuses.

The experiment directory (local path or a ``pyarrow.fs`` URI shared by all nodes)::

    OUT/config.yaml            the resolved config (a resumed run reads it back)
    OUT/tune/base/...          Tune's experiment: results, checkpoints, per-trial TensorBoard events
    OUT/predictions/*.parquet  every member's val/test probabilities at every pruning rung
    OUT/members/<member>.json  each member's training summary
    OUT/stacking*.json         stacking weights and metrics per method
    OUT/summary.json           the final table, with provenance

The dataset is loaded once by the driver and reaches the trials through Ray's object store
(``tune.with_parameters``): trials never re-read or decompress files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import storage
from .dbs import DBSConfig
from .train import TrainConfig

# variant -> (conv, schedule, stacked?)   (paper section 4; spec section 1)
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "C-CNN": ("spatial", "fixed", False),
    "SC-CNN": ("spatial", "fixed", True),
    "SWR-CNN": ("winograd_relu", "fixed", True),
    "SWR-CNN+DBS": ("winograd_relu", "dbs", True),
}
# Keys of TrainConfig that the pipeline sets per trial; a config must not set them in `train:`.
_PER_TRIAL = ("model", "conv", "schedule", "dataset", "data_dir", "subset", "test_subset", "val_fraction",
              "image_size", "seed")


class ConfigError(ValueError):
    """A pipeline config is invalid; the message names the key and the problem."""


def _strict(cls, d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(known))}")
    return dict(d)


@dataclass(frozen=True)
class MemberSpec:
    """One base CNN of the stack; ``overrides`` are TrainConfig fields for this member only."""

    model: str
    overrides: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, item: Any, where: str) -> "MemberSpec":
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, dict) and "model" in item:
            rest = {k: v for k, v in item.items() if k != "model"}
            bad = sorted(set(rest) & set(_PER_TRIAL))
            if bad:
                raise ConfigError(f"{where}: {bad} cannot be set per member")
            return cls(str(item["model"]), rest)
        raise ConfigError(f"{where}: a member is a model name or a mapping with 'model', got {item!r}")


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    # "auto": when the cluster has GPUs, the members share them evenly (three members on one GPU
    # get 1/3 each; with more GPUs than members, one GPU each); 0 forces CPU training.
    gpus_per_trial: float | str = "auto"
    max_concurrent_trials: int = 0  # 0 = as many as resources allow

    def __post_init__(self):
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"resources.cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial != "auto" and not (isinstance(self.gpus_per_trial, (int, float)) and self.gpus_per_trial >= 0):
            raise ConfigError(f"resources.gpus_per_trial must be 'auto' or a number >= 0, got {self.gpus_per_trial!r}")


@dataclass(frozen=True)
class StackConfig:
    sparsity: float | None = None  # which rung the ensemble uses; None = each member's last rung
    methods: tuple[str, ...] = ("nll_optimal", "accuracy_search", "equal", "best_single", "caruana")
    tune_samples: int = 0  # > 0 adds the accuracy search run as a Tune experiment
    choose: str = "nll_optimal"


@dataclass(frozen=True)
class DBSSearchConfig:
    model: str = "alexnet"
    num_samples: int = 8
    epochs: int = 6
    grace_period: int = 2
    # spec section 6: (k, v0, n, warm-up fraction, B0, Bmax cap, eta0)
    space: dict = field(default_factory=lambda: {
        "k": {"loguniform": [0.005, 2.0]},
        "v0": {"uniform": [0.1, 1.0]},
        "double_every": {"choice": [1, 2, 3]},
        "warmup_frac": {"choice": [0.0, 0.1, 0.2]},
        "b0": {"choice": [64, 128, 256]},
        "bmax_cap": {"choice": [512, 1024, 2048]},
        "lr0": {"loguniform": [0.01, 0.1]},
    })


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "esdbs"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    subset: int | None = None
    test_subset: int | None = None
    val_fraction: float = 0.1
    image_size: int = 64
    seed: int = 0
    members: tuple[MemberSpec, ...] = (MemberSpec("alexnet"), MemberSpec("convpool_cnn_c"), MemberSpec("all_cnn_c"))
    variants: tuple[str, ...] = ("SWR-CNN+DBS",)
    train: TrainConfig = field(default_factory=TrainConfig)  # template; per-trial keys are set by the pipeline
    stack: StackConfig = field(default_factory=StackConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    dbs_search: DBSSearchConfig = field(default_factory=DBSSearchConfig)
    run_dbs_search: bool = False
    checkpoints_to_keep: int = 2
    max_failures: int = 2

    def __post_init__(self):
        for v in self.variants:
            if v not in VARIANTS:
                raise ConfigError(f"variants: unsupported variant {v!r}; choose from {', '.join(VARIANTS)}")
        if not self.members:
            raise ConfigError("members: at least one member is required")
        names = [m.model for m in self.members]
        if len(set(names)) != len(names):
            raise ConfigError(f"members: duplicate model names {names}; give each member a distinct model")
        if any(VARIANTS[v][2] for v in self.variants) and len(self.members) < 2:
            raise ConfigError("members: a stacked variant needs at least two members")
        for spec in self.trials():  # validates every trial's TrainConfig now, at the edge
            TrainConfig.from_dict(spec["train"])

    # -- per-trial configs -------------------------------------------------------------------------
    def trials(self) -> list[dict]:
        specs = []
        for variant in self.variants:
            conv, schedule, stacked = VARIANTS[variant]
            members = self.members if stacked else self.members[:1]
            for m in members:
                train = self.train.to_dict()
                train.update(m.overrides)
                train.update(model=m.model, conv=conv, schedule=schedule, dataset=self.dataset, data_dir=self.data_dir,
                             subset=self.subset, test_subset=self.test_subset, val_fraction=self.val_fraction,
                             image_size=self.image_size, seed=self.seed)
                specs.append({"member": member_id(variant, m.model, len(self.variants)), "variant": variant,
                              "train": train})
        return specs

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["members"] = [{"model": m.model, **m.overrides} if m.overrides else m.model for m in self.members]
        d["variants"] = list(self.variants)
        d["train"] = {k: v for k, v in self.train.to_dict().items() if k not in _PER_TRIAL}
        d["stack"]["methods"] = list(self.stack.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        d = _strict(cls, d, "config")
        try:
            if "members" in d:
                if not isinstance(d["members"], (list, tuple)):
                    raise ConfigError("members: expected a list")
                d["members"] = tuple(MemberSpec.parse(m, f"members[{i}]") for i, m in enumerate(d["members"]))
            if "variants" in d:
                d["variants"] = tuple([d["variants"]] if isinstance(d["variants"], str) else d["variants"])
            if "train" in d:
                t = _strict(TrainConfig, d["train"], "train")
                bad = sorted(set(t) & set(_PER_TRIAL))
                if bad:
                    raise ConfigError(f"train: {bad} are set by the pipeline (use members / top-level keys)")
                if "dbs" in t:
                    t["dbs"] = DBSConfig.from_dict(_strict(DBSConfig, t["dbs"], "train.dbs"))
                if "sparsity_ladder" in t:
                    t["sparsity_ladder"] = tuple(t["sparsity_ladder"] or ())
                d["train"] = TrainConfig(**t)
            if "stack" in d:
                s = _strict(StackConfig, d["stack"], "stack")
                if "methods" in s:
                    s["methods"] = tuple(s["methods"])
                d["stack"] = StackConfig(**s)
            if "resources" in d:
                d["resources"] = ResourcesConfig(**_strict(ResourcesConfig, d["resources"], "resources"))
            if "dbs_search" in d:
                d["dbs_search"] = DBSSearchConfig(**_strict(DBSSearchConfig, d["dbs_search"], "dbs_search"))
            return cls(**d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config: {exc}") from None


def member_id(variant: str, model: str, n_variants: int) -> str:
    if n_variants == 1:
        return model
    return f"{variant.lower().replace('+', '-').replace('_', '-')}-{model}"


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
# smoke: seconds per trial, for tests and CI.  quick: the demo, <= 10 minutes on a 2-core CPU
# machine.  paper: the paper's scale (published widths, the full ladder), for GPU clusters.
PRESETS: dict[str, dict] = {
    "smoke": {
        "name": "smoke", "subset": 600, "test_subset": 300,
        "train": {"width": 0.125, "epochs": 2, "sparsity_ladder": [0.5], "retrain_epochs": 1, "l2": 0.001,
                  "eval_batch_size": 500},
        "resources": {"cpus_per_trial": 0.5},
    },
    "quick": {
        "name": "quick",
        "train": {"width": 0.25, "epochs": 3, "sparsity_ladder": [0.3], "retrain_epochs": 1, "l2": 0.001,
                  "dbs": {"b0": 128, "warmup_frac": 0.0, "double_every": 1}},
        "stack": {"sparsity": 0.3},
        "resources": {"cpus_per_trial": 0.66},
    },
    "paper": {
        "name": "paper",
        "train": {"width": 1.0, "epochs": 30, "sparsity_ladder": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                  "retrain_epochs": 3, "l2": 0.001, "dropout": 0.0},
        "stack": {"sparsity": 0.3},
        "resources": {"cpus_per_trial": 2},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return d


def build_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None) -> PipelineConfig:
    d: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[preset])
    if yaml_path is not None:
        try:
            d = _merge(d, load_yaml(yaml_path))
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
    d = _merge(d, overrides or {})
    try:
        return PipelineConfig.from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"{yaml_path}: {exc}" if yaml_path else str(exc)) from None


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address`` or ``$RAY_ADDRESS``), else start a local Ray on loopback only."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local Ray serves this process only: keep all of it on loopback.  On Linux Ray would
        # otherwise "resolve" 127.0.0.1 to the machine's reachable address and listen there.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"ESDBS_GIT_REVISION": _git_revision()}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=env,
                 log_to_driver=False)


def _git_revision() -> str:
    from .provenance import git_revision

    return git_revision()


def _gpus_per_trial(cfg: PipelineConfig, n_trials: int) -> float:
    if cfg.resources.gpus_per_trial != "auto":
        return float(cfg.resources.gpus_per_trial)
    import ray

    total = ray.cluster_resources().get("GPU", 0)
    if total <= 0:
        return 0.0
    return min(1.0, total / n_trials) if total < n_trials else 1.0


def _abs(path: str) -> str:
    return path if storage.is_uri(path) else str(Path(path.removeprefix("file://")).resolve())


# --------------------------------------------------------------------------------------------------
# Stage: base
# --------------------------------------------------------------------------------------------------
def run_base(cfg: PipelineConfig, out: str, data, *, resume: bool = False, progress: bool = True):
    from ray import tune

    from .provenance import provenance
    from .trainable import train_member

    trials = cfg.trials()
    gpus = _gpus_per_trial(cfg, len(trials))
    resources = {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus}
    trainable = tune.with_resources(
        tune.with_parameters(train_member, data=data, experiment_dir=out, provenance=provenance()), resources
    )
    tune_dir = storage.join(out, "tune")
    exp_path = storage.join(tune_dir, "base")
    # Tune saves its experiment state (which trials finished, their latest checkpoints) every 10 s or
    # more by default; a driver killed in between would rerun work on --resume.  A few trials make
    # the save cheap, so save often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if resume and tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.resources.max_concurrent_trials or None,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name="base", storage_path=tune_dir,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                sync_config=tune.SyncConfig(sync_artifacts=True),
                verbose=1 if progress else 0,
            ),
        )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} base trial(s) failed: " + "; ".join(str(e).splitlines()[0] for e in results.errors))
    return results


def _trial_name(trial) -> str:
    return f"{trial.config['trial']['member']}_{trial.trial_id}"


# --------------------------------------------------------------------------------------------------
# Stage: stack
# --------------------------------------------------------------------------------------------------
def run_stack(cfg: PipelineConfig, out: str) -> dict[str, dict]:
    from .stacking import stack_experiment

    results = {}
    for variant in cfg.variants:
        conv, schedule, stacked = VARIANTS[variant]
        if not stacked:
            continue
        names = [s["member"] for s in cfg.trials() if s["variant"] == variant]
        filename = "stacking.json" if len(cfg.variants) == 1 else f"stacking-{variant.lower().replace('+', '-')}.json"
        results[variant] = stack_experiment(
            out, sparsity=cfg.stack.sparsity, variant=variant, members=names, methods=cfg.stack.methods,
            tune_samples=cfg.stack.tune_samples, seed=cfg.seed, choose=cfg.stack.choose,
            storage_path=storage.join(out, "tune"), output=storage.join(out, filename),
        )
    return results


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------
def prepare_out(out: str, cfg: PipelineConfig, resume: bool) -> str:
    """Refuse to start over an existing experiment (nothing in it is touched); write config.yaml."""
    out = _abs(out)
    config_path = storage.join(out, "config.yaml")
    if not resume:
        if storage.is_uri(out):
            import pyarrow.fs as pafs

            fs, key = pafs.FileSystem.from_uri(config_path)
            exists = fs.get_file_info(key).type != pafs.FileType.NotFound
        else:
            exists = Path(out).exists() and any(Path(out).iterdir())
        if exists:
            raise ConfigError(f"{out} already exists and is not empty; pass --resume {out} to continue it, "
                              "or choose another --out")
        storage.write_text(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def load_resumed_config(out: str) -> PipelineConfig:
    path = storage.join(_abs(out), "config.yaml")
    try:
        d = yaml.safe_load(storage.read_bytes(path).decode())
    except FileNotFoundError:
        raise ConfigError(f"--resume {out}: no config.yaml there; is it an esdbs experiment directory?") from None
    return PipelineConfig.from_dict(d)


def run_pipeline(cfg: PipelineConfig, out: str, *, resume: bool = False, address: str | None = None,
                 num_cpus: int | None = None, progress: bool = True) -> dict:
    from .data import load_dataset
    from .provenance import device_info, provenance

    out = prepare_out(out, cfg, resume)
    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        subset=cfg.subset, test_subset=cfg.test_subset, image_size=cfg.image_size)
    print(f"[esdbs] {data.describe()}", flush=True)
    print(f"[esdbs] variants {', '.join(cfg.variants)}; members {', '.join(m.model for m in cfg.members)} -> {out}", flush=True)
    init_ray(address, num_cpus)

    results = run_base(cfg, out, data, resume=resume, progress=progress)
    base_seconds = time.perf_counter() - t0
    members = _collect_members(results)
    for m in members:
        storage.write_json(storage.join(out, "members", f"{m['member']}.json"), m)

    stacking = run_stack(cfg, out)
    dbs_best = run_dbs_search(cfg, out, data) if cfg.run_dbs_search else None

    summary = {
        "name": cfg.name, "experiment_dir": out, "dataset": data.describe(), "variants": list(cfg.variants),
        "members": members,
        "ensembles": {v: _ensemble_row(r) for v, r in stacking.items()},
        "base_wall_seconds": base_seconds, "wall_seconds": time.perf_counter() - t0,
        "dbs_search": dbs_best, "config": cfg.to_dict(), "provenance": {**provenance(), "device": device_info()},
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    print(format_summary(summary), flush=True)
    return summary


def _collect_members(results) -> list[dict]:
    rows = []
    for r in results:
        spec = r.config["trial"]
        history = r.metrics_dataframe
        last = r.metrics
        rung_rows = history[history["rung_test_accuracy"].notna()] if "rung_test_accuracy" in history else history.iloc[0:0]
        rungs = [
            {"target_sparsity": float(x["rung_target_sparsity"]), "sparsity": float(x["rung_sparsity"]),
             "val_accuracy": float(x["rung_val_accuracy"]), "test_accuracy": float(x["rung_test_accuracy"]),
             "mean_epoch_seconds": float(x["rung_mean_epoch_seconds"])}
            for _, x in rung_rows.iterrows()
        ]
        rows.append({
            "member": spec["member"], "variant": spec["variant"], "model": spec["train"]["model"],
            "val_accuracy": rungs[-1]["val_accuracy"] if rungs else last.get("val_accuracy"),
            "test_accuracy": rungs[-1]["test_accuracy"] if rungs else None,
            "sparsity": last.get("sparsity"), "epochs": int(last.get("epoch", -1)) + 1,
            "train_seconds": last.get("train_seconds"), "steps": last.get("total_steps"),
            "mean_epoch_seconds": float(history["epoch_seconds"].mean()),
            "rungs": rungs, "trial_path": r.path, "config": spec["train"],
        })
    return sorted(rows, key=lambda m: m["member"])


def _ensemble_row(stacking: dict) -> dict:
    chosen = stacking["chosen"]
    m = stacking["methods"][chosen]
    return {"method": chosen, "weights": m["weights"], "val_accuracy": m["val_accuracy"],
            "test_accuracy": m["test_accuracy"], "val_nll": m["val_nll"], "test_nll": m["test_nll"],
            "sparsity": stacking.get("sparsity")}


def format_summary(summary: dict) -> str:
    lines = [f"{'member':<28} {'variant':<12} {'val acc':>8} {'test acc':>8} {'sparsity':>8} {'s/epoch':>8}"]
    for m in summary["members"]:
        at = [r for r in m["rungs"] if r["target_sparsity"] == (summary["config"]["stack"]["sparsity"] or -1)]
        r = at[0] if at else (m["rungs"][-1] if m["rungs"] else {})
        lines.append(f"{m['member']:<28} {m['variant']:<12} {r.get('val_accuracy', float('nan')):8.4f} "
                     f"{r.get('test_accuracy', float('nan')):8.4f} {r.get('sparsity', 0.0):8.3f} {m['mean_epoch_seconds']:8.1f}")
    for variant, e in summary["ensembles"].items():
        lines.append(f"{'ensemble (' + e['method'] + ')':<28} {variant:<12} {e['val_accuracy']:8.4f} "
                     f"{e['test_accuracy']:8.4f} {'':>8} {'':>8}")
    lines.append(f"wall time {summary['wall_seconds']:.0f}s (base stage {summary['base_wall_seconds']:.0f}s); "
                 f"results in {summary['experiment_dir']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Stage: DBS-constant search (spec section 6)
# --------------------------------------------------------------------------------------------------
def _search_space(space: dict) -> dict:
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice,
              "randint": tune.randint}
    out = {}
    for key, spec in space.items():
        if key not in {f.name for f in dataclasses.fields(DBSConfig)}:
            raise ConfigError(f"dbs_search.space: {key!r} is not a DBS constant")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in makers):
            raise ConfigError(f"dbs_search.space.{key}: expected one of {sorted(makers)} mapping to its arguments")
        kind, args = next(iter(spec.items()))
        out[key] = makers[kind](args) if kind == "choice" else makers[kind](*args)
    return out


def run_dbs_search(cfg: PipelineConfig, out: str, data, *, progress: bool = True) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .provenance import provenance
    from .trainable import train_dbs_trial

    s = cfg.dbs_search
    base = cfg.train.to_dict()
    base.update(model=s.model, conv="winograd_relu", schedule="dbs", epochs=s.epochs, sparsity_ladder=[],
                dataset=cfg.dataset, subset=cfg.subset, test_subset=cfg.test_subset, val_fraction=cfg.val_fraction,
                image_size=cfg.image_size, seed=cfg.seed, data_dir=cfg.data_dir)
    trainable = tune.with_resources(
        tune.with_parameters(train_dbs_trial, data=data, base=base, provenance=provenance()),
        {"cpu": cfg.resources.cpus_per_trial, "gpu": _gpus_per_trial(cfg, 1) and min(1.0, _gpus_per_trial(cfg, 1))},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=_search_space(s.space),
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", num_samples=s.num_samples,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=s.epochs, grace_period=s.grace_period),
        ),
        run_config=tune.RunConfig(name="dbs_search", storage_path=storage.join(out, "tune"),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  verbose=1 if progress else 0),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} DBS-search trial(s) failed")
    best = results.get_best_result(metric="val_accuracy", mode="max", scope="all")
    constants = dataclasses.replace(cfg.train.dbs, **{k: best.config[k] for k in s.space}).to_dict()
    trials = [
        {"config": {k: r.config[k] for k in s.space}, "val_accuracy": r.metrics.get("val_accuracy"),
         "epochs": r.metrics.get("training_iteration"), "train_seconds": r.metrics.get("train_seconds"),
         "total_steps": r.metrics.get("total_steps")}
        for r in results if r.metrics
    ]
    record = {"constants": constants, "best_val_accuracy": best.metrics["val_accuracy"],
              "model": s.model, "epochs": s.epochs, "trials": trials, "provenance": provenance()}
    storage.write_json(storage.join(out, "dbs_constants.json"), record)
    return record
