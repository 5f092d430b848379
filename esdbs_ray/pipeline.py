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

# The paper's variants (section 4; spec section 1): base variant -> (conv, stacked?).  Any of them
# takes a "+DBS" suffix for the dynamic batch size schedule ("SWR-CNN+DBS" is the paper's method;
# "C-CNN+DBS" and "SC-CNN+DBS" are the DBS rows of its Tables 2/4/6).
BASE_VARIANTS: dict[str, tuple[str, bool]] = {
    "C-CNN": ("spatial", False),
    "SC-CNN": ("spatial", True),
    "SWR-CNN": ("winograd_relu", True),
}
VARIANTS = tuple(v + s for v in BASE_VARIANTS for s in ("", "+DBS"))


def parse_variant(name: str) -> tuple[str, str, bool]:
    """variant name -> (conv, schedule, stacked?)"""
    base, dbs = (name[: -len("+DBS")], True) if name.endswith("+DBS") else (name, False)
    if base not in BASE_VARIANTS:
        raise ConfigError(f"unsupported variant {name!r}; choose from {', '.join(VARIANTS)}")
    conv, stacked = BASE_VARIANTS[base]
    return conv, "dbs" if dbs else "fixed", stacked


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
class BatchSweepConfig:
    """The paper's batch-size tables (2/4/6): fixed batch sizes, and DBS, at one chosen sparsity.

    Each (variant, B) trains like the main trials but stops its ladder at ``sparsity``; a trial that a
    main trial already covers (same variant at the reference batch size B0) is not run twice."""

    batch_sizes: tuple[int, ...] = ()
    variants: tuple[str, ...] = ("C-CNN", "SC-CNN", "SWR-CNN")
    with_dbs: bool = True  # also each variant with the DBS schedule (the tables' "DBS (ours)" row)
    sparsity: float = 0.3

    def __post_init__(self):
        for v in self.variants:
            parse_variant(v)
        if any(b < 2 for b in self.batch_sizes):
            raise ConfigError(f"batch_sweep.batch_sizes must be >= 2, got {list(self.batch_sizes)}")


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
    # Per-variant TrainConfig overrides, e.g. the paper's regularisation: {"C-CNN": {"dropout": 0.2, "l2": 0.01}}.
    # A base name ("C-CNN") also applies to its "+DBS" form.
    variant_overrides: dict = field(default_factory=dict)
    batch_sweep: BatchSweepConfig = field(default_factory=BatchSweepConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    dbs_search: DBSSearchConfig = field(default_factory=DBSSearchConfig)
    run_dbs_search: bool = False
    checkpoints_to_keep: int = 2
    max_failures: int = 2

    def __post_init__(self):
        for v in self.variants:
            parse_variant(v)
        for v, over in self.variant_overrides.items():
            parse_variant(v)
            _strict(TrainConfig, over, f"variant_overrides.{v}")
            bad = sorted(set(over) & set(_PER_TRIAL))
            if bad:
                raise ConfigError(f"variant_overrides.{v}: {bad} are set by the pipeline")
        if not self.members:
            raise ConfigError("members: at least one member is required")
        names = [m.model for m in self.members]
        if len(set(names)) != len(names):
            raise ConfigError(f"members: duplicate model names {names}; give each member a distinct model")
        if any(parse_variant(v)[2] for v in self.variants) and len(self.members) < 2:
            raise ConfigError("members: a stacked variant needs at least two members")
        if self.batch_sweep.batch_sizes and self.batch_sweep.sparsity not in (0.0, *self.train.sparsity_ladder):
            raise ConfigError(f"batch_sweep.sparsity {self.batch_sweep.sparsity} is not on train.sparsity_ladder "
                              f"{list(self.train.sparsity_ladder)}")
        for spec in self.trials():  # validates every trial's TrainConfig now, at the edge
            TrainConfig.from_dict(spec["train"])

    # -- per-trial configs -------------------------------------------------------------------------
    def groups(self) -> list[dict]:
        """Each group is a set of trials stacked together: a variant, at B0 or at a swept batch size."""
        groups = [{"group": v, "variant": v, "batch_size": None, "ladder": self.train.sparsity_ladder}
                  for v in self.variants]
        sweep = self.batch_sweep
        if sweep.batch_sizes:
            short = tuple(s for s in self.train.sparsity_ladder if s <= sweep.sparsity)
            for v in sweep.variants:
                for b in sweep.batch_sizes:
                    if not (b == self.train.dbs.b0 and v in self.variants):
                        groups.append({"group": f"{v}@b{b}", "variant": v, "batch_size": b, "ladder": short})
                if sweep.with_dbs and v + "+DBS" not in self.variants:
                    groups.append({"group": v + "+DBS", "variant": v + "+DBS", "batch_size": None, "ladder": short})
        return groups

    def trials(self) -> list[dict]:
        specs = []
        groups = self.groups()
        for g in groups:
            conv, schedule, stacked = parse_variant(g["variant"])
            base = g["variant"].removesuffix("+DBS")
            for m in (self.members if stacked else self.members[:1]):
                train = self.train.to_dict()
                for key in (base, g["variant"]):
                    train.update(self.variant_overrides.get(key, {}))
                train.update(m.overrides)
                train.update(model=m.model, conv=conv, schedule=schedule, dataset=self.dataset, data_dir=self.data_dir,
                             subset=self.subset, test_subset=self.test_subset, val_fraction=self.val_fraction,
                             image_size=self.image_size, seed=self.seed, sparsity_ladder=list(g["ladder"]))
                if g["batch_size"] is not None:
                    train["dbs"] = {**train["dbs"], "b0": g["batch_size"]}
                member = m.model if len(groups) == 1 else f"{_slug(g['group'])}-{m.model}"
                specs.append({"member": member, "variant": g["variant"], "group": g["group"],
                              "batch_size": g["batch_size"], "stacked": stacked, "train": train})
        return specs

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["members"] = [{"model": m.model, **m.overrides} if m.overrides else m.model for m in self.members]
        d["variants"] = list(self.variants)
        d["train"] = {k: v for k, v in self.train.to_dict().items() if k not in _PER_TRIAL}
        d["stack"]["methods"] = list(self.stack.methods)
        d["batch_sweep"] = {**d["batch_sweep"], "batch_sizes": list(self.batch_sweep.batch_sizes),
                            "variants": list(self.batch_sweep.variants)}
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
            if "batch_sweep" in d:
                b = _strict(BatchSweepConfig, d["batch_sweep"], "batch_sweep")
                for key in ("batch_sizes", "variants"):
                    if key in b:
                        b[key] = tuple(b[key])
                d["batch_sweep"] = BatchSweepConfig(**b)
            if "variant_overrides" in d and not isinstance(d["variant_overrides"], dict):
                raise ConfigError("variant_overrides: expected a mapping of variant -> train options")
            if "dbs_search" in d:
                d["dbs_search"] = DBSSearchConfig(**_strict(DBSSearchConfig, d["dbs_search"], "dbs_search"))
            return cls(**d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config: {exc}") from None


def _slug(name: str) -> str:
    return name.lower().replace("+", "-").replace("@", "-")


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _paper_matrix(dataset: str, base_model: str, *, epochs: int, sparsity: float, c_cnn: dict, stacked: dict) -> dict:
    """One row of spec section 1: the four variants, the 20-80 % ladder, the batch-size sweep at the
    paper's chosen sparsity, and the paper's regularisation (C-CNN's, the stacked models')."""
    return {
        "name": f"paper-{dataset}", "dataset": dataset,
        "members": [base_model, "convpool_cnn_c", "all_cnn_c"],
        "variants": ["C-CNN", "SC-CNN", "SWR-CNN", "SWR-CNN+DBS"],
        "variant_overrides": {"C-CNN": c_cnn},
        "train": {"width": 1.0, "epochs": epochs, "sparsity_ladder": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                  "retrain_epochs": 3, **stacked},
        "batch_sweep": {"batch_sizes": [64, 128, 256, 512, 1024], "sparsity": sparsity},
        "stack": {"sparsity": sparsity},
        "resources": {"cpus_per_trial": 2},
    }


# smoke: seconds per trial, for tests and CI.  quick: the demo, <= 10 minutes on a 2-core CPU
# machine.  paper: the paper's scale (published widths, the full ladder), for GPU clusters.
PRESETS: dict[str, dict] = {
    "smoke": {
        "name": "smoke", "subset": 600, "test_subset": 300,
        "train": {"width": 0.125, "epochs": 2, "sparsity_ladder": [0.5], "retrain_epochs": 1, "l2": 0.001,
                  "eval_batch_size": 500},
        "resources": {"cpus_per_trial": 0.5},
    },
    # quick: the demo on a 2-core CPU machine. Winograd-ReLU layers run at ~0.45x the speed of
    # F.conv2d there (bench/results/throughput.json), and ConvPool-CNN-C keeps three convs at full
    # 28x28 resolution, so it trains one dense epoch fewer than its partners.
    "quick": {
        "name": "quick", "subset": 20000,
        "members": ["alexnet", {"model": "convpool_cnn_c", "epochs": 2}, "all_cnn_c"],
        "train": {"width": 0.25, "epochs": 3, "sparsity_ladder": [0.3], "retrain_epochs": 1, "l2": 0.001,
                  "dbs": {"b0": 128, "warmup_frac": 0.0}},
        "stack": {"sparsity": 0.3},
        "resources": {"cpus_per_trial": 0.66},
    },
    # The paper's experiment matrix (spec section 1) per dataset at the paper's scale; `--scale`
    # shrinks epochs and the training set for a CPU run.
    "paper-fashion-mnist": _paper_matrix("fashion-mnist", "alexnet", epochs=30, sparsity=0.3,
                                         c_cnn={"dropout": 0.2, "l2": 0.01}, stacked={"dropout": 0.0, "l2": 0.001}),
    "paper-cifar10": _paper_matrix("cifar10", "vgg16", epochs=40, sparsity=0.4,
                                   c_cnn={"dropout": 0.2, "l2": 0.01}, stacked={"dropout": 0.0, "l2": 0.001}),
    "paper-cifar100": _paper_matrix("cifar100", "resnet32", epochs=40, sparsity=0.4,
                                    c_cnn={"dropout": 0.1, "l2": 0.001}, stacked={"dropout": 0.1, "l2": 0.01}),
    # The reference run of analysis/results/fashion-mnist-cpu/: the paper-fashion-mnist matrix (all
    # four variants, the three members, the batch sweep beside DBS) shrunk to finish within 60 minutes
    # on a 2-core CPU machine.  Every reduction is here, none in code:
    # - 9,000 training images (10 % for validation).  At 12,000 the projected wall time was 59-64
    #   minutes: a Winograd-ReLU ConvPool-CNN-C epoch takes ~2 minutes on a third of the machine, and
    #   each of the 28 trials evaluates the full 10,000-image test set at every rung.
    # - width 0.25, 3 dense epochs, the ladder 30/60/80 % (the paper's stacking point and the
    #   sparsities its claims name) with 1 retraining epoch per rung.
    # - the batch sweep at the ends of the paper's range, 64 and 1024 (B0 = 128 comes from the main
    #   groups).
    # - DBS doubling the learning rate every epoch (with n = 2 a 6-epoch schedule doubles it at most
    #   twice) and no warm-up: 10 % of 6 epochs rounds to one whole epoch at half the learning rate,
    #   and when that epoch's val accuracy beats the first epoch at η0 (by 2 of 1,200 images in a
    #   first attempt) the fall rule (spec §4.2) ends the LR phase before DBS ever raises the batch.
    # - three single-thread trials sharing the two cores: on this VM one thread per process is the
    #   fastest use of a core (bench/throughput.py).
    "paper-fashion-mnist-cpu": _merge(
        _paper_matrix("fashion-mnist", "alexnet", epochs=3, sparsity=0.3,
                      c_cnn={"dropout": 0.2, "l2": 0.01}, stacked={"dropout": 0.0, "l2": 0.001}),
        {"name": "paper-fashion-mnist-cpu", "subset": 9000,
         "train": {"width": 0.25, "sparsity_ladder": [0.3, 0.6, 0.8], "retrain_epochs": 1,
                   "dbs": {"double_every": 1, "warmup_frac": 0.0}},
         "batch_sweep": {"batch_sizes": [64, 1024]},
         "resources": {"cpus_per_trial": 0.66}}),
    "paper": {
        "name": "paper",
        "train": {"width": 1.0, "epochs": 30, "sparsity_ladder": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                  "retrain_epochs": 3, "l2": 0.001, "dropout": 0.0},
        "stack": {"sparsity": 0.3},
        "resources": {"cpus_per_trial": 2},
    },
}


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


_TRAIN_SIZES = {"fashion-mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}


def apply_scale(d: dict, scale: float) -> dict:
    """Shrink a config dict for a smaller machine: epochs and retraining epochs by ``scale`` (at least
    one each) and, below 1, the training set to ``scale`` of its size (a stratified subset)."""
    if not 0.0 < scale <= 1.0:
        raise ConfigError(f"--scale must be in (0, 1], got {scale}")
    d = copy.deepcopy(d)
    train = d.setdefault("train", {})
    base = TrainConfig()
    for key in ("epochs", "retrain_epochs"):
        train[key] = max(1, int(round(train.get(key, getattr(base, key)) * scale)))
    n = _TRAIN_SIZES.get(d.get("dataset", "fashion-mnist"))
    if scale < 1.0 and n and not d.get("subset"):
        d["subset"] = int(n * scale)
    return d


def set_dotted(d: dict, assignment: str) -> dict:
    """Apply ``key.sub=value`` (value parsed as YAML) to a nested config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    node = d
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
    node[parts[-1]] = value
    return d


def build_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None,
                 *, scale: float | None = None, sets: list[str] | None = None) -> PipelineConfig:
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
    if scale is not None:
        d = apply_scale(d, scale)
    for assignment in sets or ():
        d = set_dotted(d, assignment)
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
    # Workers run from a copy without .git: hand them the driver's revision -- unless the job that
    # runs this driver already set it (Ray refuses a job whose runtime_env is overridden).
    inherited = "ESDBS_GIT_REVISION" in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = None if inherited else {"env_vars": {"ESDBS_GIT_REVISION": _git_revision()}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
        # address="local": start a fresh Ray, never attach to another one found on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=env, log_to_driver=False)


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


_abs = storage.normalize


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
    """One stacking search per group of two or more members: ``stacking.json`` when there is a single
    group, else ``stacking-<group>.json``."""
    from .stacking import stack_experiment

    trials = cfg.trials()
    groups = [g["group"] for g in cfg.groups()]
    results = {}
    for group in groups:
        names = [t["member"] for t in trials if t["group"] == group]
        if len(names) < 2:
            continue
        sparsity = cfg.stack.sparsity if group in cfg.variants else cfg.batch_sweep.sparsity
        filename = "stacking.json" if len(groups) == 1 else f"stacking-{_slug(group)}.json"
        results[group] = stack_experiment(
            out, sparsity=sparsity, variant=group, members=names, methods=cfg.stack.methods,
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
    members = _collect_members(results, out)

    stacking = run_stack(cfg, out)
    dbs_best = run_dbs_search(cfg, out, data) if cfg.run_dbs_search else None

    summary = {
        "name": cfg.name, "experiment_dir": out, "dataset": data.describe(), "variants": list(cfg.variants),
        "groups": [g["group"] for g in cfg.groups()],
        "members": members,
        "ensembles": {v: _ensemble_row(r) for v, r in stacking.items()},
        # After --resume these time the resumed part only (flagged by "resumed").
        "base_wall_seconds": base_seconds, "wall_seconds": time.perf_counter() - t0, "resumed": resume,
        "dbs_search": dbs_best, "config": cfg.to_dict(), "provenance": {**provenance(), "device": device_info()},
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    print(format_summary(summary), flush=True)
    return summary


def _collect_members(results, out: str) -> list[dict]:
    """Each trial's own summary (written by the trainable to OUT/members/), with Tune's wall time;
    ``summary.json`` keeps these rows without the per-epoch history."""
    rows = []
    for r in results:
        spec = r.config["trial"]
        m = json.loads(storage.read_bytes(storage.join(out, "members", f"{spec['member']}.json")))
        m.pop("history", None)
        m.update(trial_path=r.path, wall_seconds=(r.metrics or {}).get("time_total_s"), config=spec["train"])
        rows.append(m)
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
    lines.append(f"TensorBoard: tensorboard --logdir {storage.join(summary['experiment_dir'], 'tune')} --host 127.0.0.1")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Stage: DBS-constant search (spec section 6)
# --------------------------------------------------------------------------------------------------
def _pareto(trials: list[dict]) -> list[int]:
    """Indices (into ``trials``) of the time-to-accuracy front: no other trial is both faster and
    more accurate at the end of the budget."""
    front = []
    for i, t in enumerate(trials):
        dominated = any(o["val_accuracy"] >= t["val_accuracy"] and (o["train_seconds"] or 0) <= (t["train_seconds"] or 0)
                        and (o["val_accuracy"], o["train_seconds"]) != (t["val_accuracy"], t["train_seconds"])
                        for o in trials)
        if not dominated:
            front.append(i)
    return front


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
        raise RuntimeError("no DBS-search trial ran the whole epoch budget (ASHA stopped them all)")
    best = max(finished, key=lambda t: (t["val_accuracy"], -(t["train_seconds"] or 0.0)))
    constants = dataclasses.replace(cfg.train.dbs, **best["config"]).to_dict()
    record = {"constants": constants, "best_val_accuracy": best["val_accuracy"], "objective":
              "validation accuracy at the last epoch of the budget (trials ASHA stopped early excluded)",
              "best_train_seconds": best["train_seconds"], "best_total_steps": best["total_steps"],
              "model": s.model, "epochs": s.epochs, "trials": trials, "provenance": provenance()}
    for i in _pareto(finished):
        finished[i]["pareto"] = True
    from .dbs import plot_search

    plot_search(trials, best, storage.join(out, "dbs_search.png"))
    storage.write_json(storage.join(out, "dbs_constants.json"), record)
    return record
