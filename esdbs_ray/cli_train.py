"""The ``esdbs`` sub-commands that train or plan: run, train-one, dbs-plan, dbs-search, config, submit.

Each ``add_*`` adds its parser to the sub-command set; each ``cmd_*`` runs it.  Heavy modules (torch,
Ray, the trainer, the pipeline) are imported inside the commands, so ``esdbs --help`` and a refused
config never load them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_common import (add_pipeline_args, check_num_cpus, config_flags, default_out, flag_error, flag_values,
                         load_dbs_constants, pipeline_config)
from .config import ConfigError, DBSConfig, TrainConfig

__all__ = ["COMMANDS", "TRAIN_ONE_FLAGS", "SCHEDULE_FLAGS", "OWN_IMAGES_FLAGS", "BASIS_FLAGS", "format_trials"]

# train-one's flags: the TrainConfig key each sets, and its help (type, choices and default: the config's)
TRAIN_ONE_FLAGS = {
    "--dataset": ("dataset", "fashion-mnist | cifar10 | cifar100 | imagefolder:<path>"),
    "--data-dir": ("data_dir", "directory holding the dataset files (else $ESDBS_DATA, system paths)"),
    "--subset": ("subset", "stratified training subset size (smoke runs)"),
    "--test-subset": ("test_subset", "stratified test subset size (smoke runs)"),
    "--image-size": ("image_size", "resize image-folder data to this size"),
    "--seed": ("seed", "seed of the validation split, the initialisation and the batch order"),
    "--model": ("model", "registry model"),
    "--width": ("width", "channel multiplier (1.0 = published widths)"),
    "--dropout": ("dropout", "dropout before the classifier"),
    "--l2": ("l2", "L2 rate on conv weights (paper's convention: loss += l2 * sum(w^2))"),
    "--optimizer": ("optimizer", "the optimizer"),
    "--conv": ("conv", "the convolutions' form (basis_random: BasisConv from scratch)"),
    "--epochs": ("epochs", "dense epochs before the sparsity ladder"),
    "--sparsity-ladder": ("sparsity_ladder", "pruning rungs, e.g. 0.2,0.3,0.4,0.5,0.6,0.7,0.8"),
    "--retrain-epochs": ("retrain_epochs", "retraining epochs per ladder rung"),
    "--threads": ("threads", "torch CPU threads"),
    "--device": ("device", "where to train"),
}
# the schedule (spec section 4); dbs-plan takes the dbs.* ones
SCHEDULE_FLAGS = {
    "--batch-size": ("dbs.b0", "fixed batch size, and B0 for DBS"),
    "--lr": ("dbs.lr0", "eta0, the learning rate after warm-up"),
    "--lr-start": ("dbs.lr_start", "warm-up start learning rate"),
    "--momentum": ("dbs.m0", "m0, the momentum"),
    "--warmup-frac": ("dbs.warmup_frac", "fraction of the dense epochs spent warming up"),
    "--double-every": ("dbs.double_every", "DBS: n, epochs between learning-rate doublings"),
    "--k": ("dbs.k", "DBS: momentum ODE constant k, or 'auto' (the critical k: m comes to rest at m_max)"),
    "--v0": ("dbs.v0", "DBS: initial momentum velocity v0"),
    "--m-max": ("dbs.m_max", "DBS: the momentum's ceiling"),
    "--bmax-cap": ("dbs.bmax_cap", "DBS: the largest batch the schedule may reach"),
    "--fall-z": ("dbs.fall_z", "DBS: a fall must exceed this many standard errors of val accuracy"),
    "--fall-noise": ("dbs.fall_noise", "DBS: one standard error is the binomial SE of the val estimate (spec "
                                       "§4.2) or the larger of it and the run's own epoch-to-epoch noise"),
    "--rung-lr": ("dbs.rung_lr", "DBS: pruning rungs retrain at the dense phase's last learning rate (spec "
                                 "§4.5) or at most at lr0"),
}
OWN_IMAGES_FLAGS = {
    "--augment": ("augment.ops", "comma-separated augmentation ops, in order (default: none)"),
    "--lr-schedule": ("lr_schedule", "cosine: linear warm-up, cosine decay per step (fixed batch only)"),
    "--weight-decay": ("weight_decay", "AdamW's decoupled weight decay"),
    "--label-smoothing": ("label_smoothing", "label smoothing of the training loss"),
    "--patience": ("early_stopping.patience", "early stopping: epochs without a lower val loss (0: off)"),
}
BASIS_FLAGS = {
    "--basis-ladder": ("basis.ladder", "eigen thresholds t, strictly decreasing in (0, 1], e.g. 1.0,0.95,0.9,0.85: "
                                       "after --epochs of spatial training each rung converts every conv to its "
                                       "truncated eigen basis and fine-tunes --retrain-epochs"),
    "--basis-stage1-epochs": ("basis.stage1_epochs", "of each basis rung's epochs, how many train only the 1x1 "
                                                     "coefficients"),
    "--basis-stage1-lr-scale": ("basis.stage1_lr_scale", "step one's learning-rate factor"),
    "--basis-stage2-lr-scale": ("basis.stage2_lr_scale", "step two's learning-rate factor"),
    "--basis-fraction": ("basis.fraction", "--conv basis_random: Q = ceil(fraction * C_out) random basis filters "
                                           "per layer"),
    "--basis-layers": ("basis.layers", "all: every conv, the stem too; relu: the stem stays spatial"),
}
ALL_TRAIN_FLAGS = {**TRAIN_ONE_FLAGS, **SCHEDULE_FLAGS, **OWN_IMAGES_FLAGS, **BASIS_FLAGS}
PLAN_FLAGS = {flag: (path[len("dbs."):], text) for flag, (path, text) in SCHEDULE_FLAGS.items()}


def _dbs_constants_arg(g) -> None:
    g.add_argument("--dbs-constants", default=None, help="JSON file of DBS constants (from esdbs dbs-search)")


# --------------------------------------------------------------------------------------------------
# run, config, dbs-search, submit
# --------------------------------------------------------------------------------------------------
def add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole method on Ray Tune: base members -> stacking (-> DBS search)")
    add_pipeline_args(p)
    p.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted run in DIR")
    p.add_argument("--force", action="store_true", help="replace an existing esdbs experiment in --out "
                   "(it is moved aside to OUT.replaced-TIME, not deleted)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, the trial table and the "
                   "cost in trial-epochs; run nothing")
    p.add_argument("--calibrate", action="store_true", help="with --dry-run: also time a training step of each "
                   "member here (a few seconds) and estimate the wall time on this machine")
    p.add_argument("--dbs-search", action="store_true", help="also run the DBS-constant search stage")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="train the whole matrix once per seed (e.g. 0,1,2) as trials of one Tune experiment, each "
                        "seed's experiment in OUT/seed-<s>/ (config key seeds); esdbs report OUT judges the claims "
                        "across them")
    p.add_argument("--expansion-search", action="store_true",
                   help="also run the expansion search stage: a Tune search over the growth settings (tau, penalty; "
                        "config section expansion_search) of the config's growing member; writes "
                        "expansion_search.json, whose chosen values a run takes with --set train.expansion.tau=...")
    _dbs_constants_arg(p)
    p.set_defaults(func=cmd_run)


def format_trials(cfg) -> str:
    rows = [f"{'member':<30} {'variant':<12} {'group':<16} {'model':<15} {'conv':<13} {'schedule':<8} "
            f"{'B0':>5} {'epochs':>6}  ladder"]
    for t in cfg.trials():
        tr = t.train
        ladder = list(tr.sparsity_ladder) or (f"basis t {list(tr.basis.ladder)}" if tr.basis.ladder else [])
        rows.append(f"{t.member:<30} {t.variant:<12} {t.group:<16} {tr.model:<15} {tr.conv:<13} {tr.schedule_kind:<8} "
                    f"{tr.dbs.b0:>5} {tr.total_epochs:>6}  {ladder}")
    return "\n".join(rows)


# training images per dataset (before the validation split), for a cost estimate without reading the data
_TRAIN_IMAGES = {"fashion-mnist": 60000, "cifar10": 50000, "cifar100": 50000}


def cost_line(cfg, calibrate: bool = False) -> str:
    """The run's cost: trial-epochs and image-epochs from the config alone; with ``calibrate``, a wall
    time on this machine from one timed training step per member (synthetic images, the member's B0),
    the trials sharing the cores as Tune places them (every seed's trials)."""
    trials = [t for r in cfg.replicates() for t in r.trials()]
    images = cfg.subset or _TRAIN_IMAGES.get(cfg.dataset)
    epochs = sum(t.train.total_epochs for t in trials)
    line = f"# cost: {epochs} trial-epochs"
    if images:
        line += f", {epochs * images * (1 - cfg.val_fraction):,.0f} training images through a network"
    if not calibrate or not images:
        return line + ("" if calibrate else " (--calibrate for a wall-time estimate here)")
    import os

    import torch

    cores = os.cpu_count() or 1
    threads = max(1, int(cfg.resources.cpus_per_trial))  # what the trainable gives each trial
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = sum(_step_seconds(t.train, cfg) * t.train.total_epochs * images * (1 - cfg.val_fraction)
                      / t.train.dbs.b0 for t in trials)
    finally:
        torch.set_num_threads(previous)
    concurrent = max(1, min(len(trials), int(cores / max(cfg.resources.cpus_per_trial, 1e-9))))
    streams = max(1.0, min(concurrent, cores / threads))  # trials beyond the cores share them
    return line + (f"; about {seconds / streams / 60:.0f} min of training on these {cores} cores (one timed "
                   f"step per member at B0 and {threads} thread(s); evaluation and DBS's larger batches not counted)")


def _step_seconds(train, cfg) -> float:
    import time

    import torch
    import torch.nn.functional as F

    from .networks import build_network

    side = cfg.image_size if str(cfg.dataset).startswith("imagefolder:") else (28 if cfg.dataset == "fashion-mnist" else 32)
    channels = 1 if cfg.dataset == "fashion-mnist" else 3
    model = build_network(train.model, num_classes=10, in_channels=channels, image_size=side, width=train.width,
                          conv=train.conv, basis=train.basis, seed=train.seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(train.dbs.b0, channels, side, side), torch.zeros(train.dbs.b0, dtype=torch.long)
    times = []
    for _ in range(3):  # the first step pays one-time costs (allocation, kernel loading)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def run_request(args, *, local: bool = True):
    """``esdbs run``'s arguments as (config, output), validated: what ``run`` and ``submit`` (before it
    uploads anything) both check.  ``local`` False: files the arguments name are read on the cluster
    (``submit``): a --resume directory or a --config / --dbs-constants file that is not here is not read,
    and the config is then (None, out)."""
    from .pipeline import load_resumed_config

    check_num_cpus(args)
    if args.resume:
        given = [f for f, v in (("--config", args.config), ("--preset", args.preset), ("--out", args.out),
                                ("--scale", args.scale), ("--set", args.set), ("--force", args.force),
                                ("--expansion-search", args.expansion_search), ("--seeds", args.seeds)) if v]
        if given:
            raise ConfigError(f"--resume DIR continues DIR with its saved config.yaml; drop {', '.join(given)}")
        if not local and not Path(args.resume).is_dir():
            return None, args.resume
        return load_resumed_config(args.resume), args.resume
    if args.expansion_search:  # validated with the rest: the config must have a growing member
        args.set = [*args.set, "run_expansion_search=true"]
    if args.seeds is not None:  # validated with the rest (config key seeds: integers, none twice)
        args.set = [*args.set, f"seeds={args.seeds.strip()!r}"]
    if not local and any(p and "://" not in p and not Path(p).is_file() for p in (args.config, args.dbs_constants)):
        return None, args.out
    cfg = pipeline_config(args)
    return cfg, args.out or default_out(cfg.name)


def cmd_run(args) -> int:
    import yaml

    from .pipeline import run_pipeline

    cfg, out = run_request(args)
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(f"# {len(cfg.trials())} trial(s) -> {out}" + (
            f"; once per seed {', '.join(map(str, cfg.seeds))}: {len(cfg.trials()) * len(cfg.seeds)} trials, each "
            "seed's in OUT/seed-<s>/" if cfg.seeds else ""))
        print(format_trials(cfg))
        print(cost_line(cfg, calibrate=args.calibrate))
        if cfg.run_expansion_search:
            s = cfg.expansion_search
            from .expansion_search import search_points

            n = len(search_points(s.space, s.num_samples, 0, s.seeds))
            print(f"# expansion search: {n} trial(s) of {s.epochs} epochs, member "
                  f"{cfg.expansion_search_trial().member}, over {', '.join(s.space)}")
        return 0
    run_pipeline(cfg, out, resume=bool(args.resume), force=args.force, address=args.address,
                 num_cpus=args.num_cpus, progress=not args.quiet, verbose=args.verbose)
    if cfg.run_expansion_search:
        _expansion_search_stage(cfg, out, quiet=args.quiet)
    return 0


def _expansion_search_stage(cfg, out: str, *, quiet: bool) -> None:
    """After the base and stacking stages (Ray is up, the directory claimed): the expansion search."""
    from .data import load_configured
    from .expansion_search import SearchFailed, format_search, run_expansion_search
    from .layout import ExperimentLayout
    from .pipeline import RunFailed

    layout = ExperimentLayout.at(out)
    try:
        record = run_expansion_search(cfg, layout, load_configured(cfg), progress=not quiet)
    except SearchFailed as exc:
        raise RunFailed(str(exc)) from None
    chosen = ", ".join(f"{k} {v:g}" for k, v in record["chosen"].items())
    if not quiet:
        print(format_search(record))
    print(f"[esdbs] expansion search ({record['member']}, {record['epochs']} epochs, {record['seeds']} seed(s)): "
          f"chosen {chosen} -> {layout.root}/expansion_search.json (reuse: "
          + " ".join(f"--set train.expansion.{k}={_yaml_number(v)}" for k, v in record["chosen"].items()) + ")",
          flush=True)


def _yaml_number(v) -> str:
    """``v`` as --set reads it back as a number: YAML takes 1e-09 for text, 1.0e-09 for a float."""
    if isinstance(v, int):
        return str(v)
    text = repr(float(v))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def add_config(sub) -> None:
    from .cli_common import presets_help

    p = sub.add_parser("config", help="print the resolved config (validated), or --schema its JSON Schema")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of a config file")
    p.add_argument("--config", default=None, help="YAML config (applied over the preset)")
    p.add_argument("--preset", default=None, help=f"{presets_help()} (default: quick when no --config)")
    p.add_argument("--scale", type=float, default=None, help="shrink epochs and training set by this factor (0, 1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.set_defaults(func=cmd_config)


def cmd_config(args) -> int:
    import yaml

    if args.schema:
        from .config import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    cfg = pipeline_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def add_dbs_search(sub) -> None:
    p = sub.add_parser("dbs-search", help="Tune experiment (ASHA) over the DBS constants; writes dbs_constants.json")
    add_pipeline_args(p)
    p.add_argument("--num-samples", type=int, default=None, help="DBS constant sets to try (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each trial's budget (default: the config's)")
    p.add_argument("--force", action="store_true", help="replace an earlier search in --out (moved aside)")
    p.set_defaults(func=cmd_dbs_search)


def cmd_dbs_search(args) -> int:
    from .data import load_configured
    from .layout import ExperimentLayout, claim_dir
    from .pipeline import run_dbs_search
    from .ray_env import init_ray

    check_num_cpus(args)
    cfg = pipeline_config(args)
    changes = {k: v for k, v in (("num_samples", args.num_samples), ("epochs", args.epochs)) if v is not None}
    if changes:
        from .config import validate

        cfg = validate(type(cfg), {**cfg.model_dump(), "dbs_search": {**cfg.dbs_search.model_dump(), **changes}})
    out = args.out or default_out(cfg.name + "-dbs-search")
    claim_dir(out, "dbs-search", force=args.force, check_only=True)
    data = load_configured(cfg)
    claims: list = []
    layout = ExperimentLayout(claim_dir(out, "dbs-search", force=args.force, claims=claims))
    try:
        init_ray(args.address, args.num_cpus, quiet=not args.verbose)
    except BaseException:  # the search never started: the directory goes back to what it was
        for claim in claims:
            claim.undo()
        raise
    record = run_dbs_search(cfg, layout, data, progress=not args.quiet)
    print(f"{'last-epoch val':>14} {'epochs':>6} {'train s':>8} {'steps':>7}  front  constants")
    for t in sorted(record["trials"], key=lambda t: t["train_seconds"] or 0.0):
        mark = "*" if t.get("pareto") else ("stopped" if not t["completed"] else "")
        print(f"{t['val_accuracy']:14.4f} {t['epochs']:6d} {t['train_seconds'] or 0:8.1f} {t['total_steps'] or 0:7d}  "
              f"{mark:>5}  {json.dumps(t['config'])}")
    print(json.dumps(record["constants"], indent=2))
    print(f"best last-epoch val accuracy {record['best_val_accuracy']:.4f} ({record['best_train_seconds']:.1f} s); "
          f"trade-off figure -> {layout.dbs_search_figure}; constants -> {layout.dbs_constants} "
          f"(reuse: esdbs run --dbs-constants {layout.dbs_constants})")
    return 0


def add_submit(sub) -> None:
    import argparse

    p = sub.add_parser("submit", help="submit `esdbs run` to a Ray cluster as a Ray Job (token auth)")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds (exit 124)")
    p.add_argument("--insecure", action="store_true", help="allow plain http to an address that is not this "
                   "machine (the cluster's token then travels unencrypted); default: refused")
    p.add_argument("--verbose", action="store_true", help="Ray's own log lines (packaging, upload) on stderr")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then the arguments of `esdbs run`")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args) -> int:
    import math

    from .submit import check_address, submit

    if args.timeout is not None and not (math.isfinite(args.timeout) and 0 < args.timeout <= 10 ** 7):
        raise ConfigError(f"--timeout={args.timeout}: seconds, a positive number (at most 10,000,000)")
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    check_address(args.address, insecure=args.insecure)
    check_run_args_locally(run_args)  # what the cluster would refuse, refused before anything is uploaded
    return submit(args.address, run_args, follow=not args.no_follow, timeout=args.timeout, verbose=args.verbose)


def check_run_args_locally(run_args: list[str]) -> None:
    """``esdbs run``'s own parser and config validation on a job's arguments, here: an unknown flag,
    preset or key, a value out of range fails now, naming it, instead of in a job on the cluster."""
    from .cli_common import Parser

    args = list(run_args)
    if args[:1] == ["run"]:
        args = args[1:]
    parser = Parser(prog="esdbs")
    add_run(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    run_request(parser.parse_args(["run", *args]), local=False)


# --------------------------------------------------------------------------------------------------
# train-one
# --------------------------------------------------------------------------------------------------
def add_train_one(sub) -> None:
    p = sub.add_parser("train-one", help="train one CNN and write summary.json + TensorBoard logs")
    config_flags(p, TrainConfig, TRAIN_ONE_FLAGS, required=("--epochs",))
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace an earlier train-one run in --out (moved aside)")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier train-one run with --resume)")
    g = p.add_argument_group("schedule (fixed batch or DBS; spec section 4)")
    config_flags(g, TrainConfig, {"--schedule": ("schedule", "fixed batch, or DBS")})
    config_flags(g, TrainConfig, SCHEDULE_FLAGS)
    _dbs_constants_arg(g)
    config_flags(p.add_argument_group("own images: augmentation, cosine schedule, AdamW, early stopping"),
                 TrainConfig, OWN_IMAGES_FLAGS)
    config_flags(p.add_argument_group("BasisConv (config key train.basis)"), TrainConfig, BASIS_FLAGS)
    p.set_defaults(func=cmd_train_one)


def _with_source(named: ConfigError, exc: ConfigError, args) -> ConfigError:
    """An error no given flag explains, when a --dbs-constants file was read: it names the file too."""
    if named is exc and getattr(args, "dbs_constants", None):
        return ConfigError(f"--dbs-constants {args.dbs_constants}: {exc}")
    return named


def train_config(args) -> TrainConfig:
    """The TrainConfig train-one's flags give (over --dbs-constants), refused naming the flag."""
    from .config import validate

    flags = {**ALL_TRAIN_FLAGS, "--schedule": ("schedule", "")}
    base = {"dbs": load_dbs_constants(args.dbs_constants)} if args.dbs_constants else {}
    try:
        return validate(TrainConfig, flag_values(args, TrainConfig, flags, base))
    except ConfigError as exc:
        raise _with_source(flag_error(exc, flags, args=args), exc, args) from None


def cmd_train_one(args) -> int:
    from .data import load_configured
    from .hooks import PrintHooks
    from .layout import RunLayout, claim_dir
    from .provenance import device_info, provenance
    from .run_record import RunRecorder
    from .train import train

    cfg = train_config(args)
    if args.resume and args.force:
        raise ConfigError("--resume continues a run, --force replaces it: pass one of them")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available on this machine")
    checked = Path(claim_dir(args.out, "run", resume=args.resume, force=args.force, check_only=True))
    if args.resume and not RunLayout(checked).checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint at {RunLayout(checked).checkpoint}")
    if args.resume:  # a checkpoint that cannot resume this run is refused before the data loads
        from .checkpoint import load_checkpoint

        load_checkpoint(RunLayout(checked).checkpoint, cfg.to_dict())
    data = load_configured(cfg)
    claims: list = []
    run = RunLayout(Path(claim_dir(args.out, "run", resume=args.resume, force=args.force, claims=claims)))
    print(data.describe(), flush=True)
    try:
        recorder = RunRecorder(run.root, cfg, data, experiment=str(run.root), variant=variant_name(cfg),
                               provenance={**provenance(), "device": device_info()})
        summary = train(cfg, data, run.root, hooks=[PrintHooks(), recorder],
                        resume_from=run.checkpoint if args.resume else None)
    except BaseException:
        if not run.checkpoint.exists():  # it failed before its first epoch ended: nothing to resume, take it back
            for claim in claims:
                claim.undo()
        raise
    rung = (f"basis t={summary.basis_threshold:g}" if summary.basis_threshold is not None
            else f"sparsity {summary.sparsity:.3f}")
    print(f"done: val {summary.val_accuracy:.4f} test {summary.test_accuracy:.4f} "
          f"{rung} in {summary.train_seconds:.1f}s training -> {run.summary}")
    return 0


def variant_name(cfg) -> str:
    dbs = "+DBS" if cfg.schedule == "dbs" else ""
    if cfg.conv == "winograd_relu":
        return "SWR-CNN" + dbs
    if cfg.conv == "basis_random":  # one member of SRB-CNN / SBC-CNN: the single-model labels
        return "RB-CNN" + dbs
    return ("BC-CNN" if cfg.basis.ladder else "C-CNN") + dbs


# --------------------------------------------------------------------------------------------------
# dbs-plan
# --------------------------------------------------------------------------------------------------
def add_dbs_plan(sub) -> None:
    from .cli_common import floats

    p = sub.add_parser("dbs-plan", help="show the schedule a run would follow (DBS unless --schedule fixed)")
    p.add_argument("--epochs", type=int, required=True, help="dense epochs before the sparsity ladder")
    p.add_argument("--train-size", type=int, required=True, help="images in the training split (N)")
    p.add_argument("--val-size", type=int, default=None,
                   help="images in the validation split, for the fall rule's standard error "
                        "(default: the 10 %% split that goes with --train-size, i.e. N/9)")
    p.add_argument("--sparsity-ladder", type=floats, default=(), help="rungs, e.g. 0.2,0.3 (each restarts the plateau)")
    p.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs per ladder rung (default 2)")
    p.add_argument("--val-accuracy", type=floats, default=None, help="scripted validation accuracies a1,a2,...")
    p.add_argument("--json", action="store_true", help="one JSON object per epoch")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also draw η, m and B over epochs and the momentum ODE curve (a new file)")
    p.add_argument("--force", action="store_true", help="replace an existing --figure file")
    g = p.add_argument_group("schedule (spec section 4)")
    g.add_argument("--schedule", default="dbs", help="fixed | dbs (default dbs)")
    config_flags(g, DBSConfig, PLAN_FLAGS)
    _dbs_constants_arg(g)
    p.set_defaults(func=cmd_dbs_plan)


def cmd_dbs_plan(args) -> int:
    from .config import MAX_EPOCHS, MAX_NUMBER, MAX_RUNGS, brief, validate
    from .dbs import SCHEDULE_KINDS, format_plan, plan

    if args.schedule not in SCHEDULE_KINDS:
        raise ConfigError(f"--schedule={args.schedule!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
    kind = args.schedule
    base = load_dbs_constants(args.dbs_constants) if args.dbs_constants else {}
    try:
        cfg = validate(DBSConfig, flag_values(args, DBSConfig, PLAN_FLAGS, base), "schedule")
    except ConfigError as exc:
        raise _with_source(flag_error(exc, PLAN_FLAGS, prefix="schedule.", args=args), exc, args) from None
    # bounded before any work: the plan is a row per epoch (the config's limits, MAX_EPOCHS epochs);
    # a training split needs two images (data.py refuses fewer)
    for flag, low, high in (("epochs", 0, MAX_EPOCHS), ("train_size", 2, MAX_NUMBER), ("val_size", 1, MAX_NUMBER),
                            ("retrain_epochs", 0, MAX_EPOCHS)):
        v = getattr(args, flag)
        if v is not None and not low <= v <= high:
            raise ConfigError(f"--{flag.replace('_', '-')}={brief(v)}: must be in [{low}, {high:,}]")
    ladder = tuple(args.sparsity_ladder)
    if len(ladder) > MAX_RUNGS:
        raise ConfigError(f"--sparsity-ladder: {len(ladder):,} rungs; at most {MAX_RUNGS}")
    if any(not 0 < s < 1 for s in ladder) or list(ladder) != sorted(set(ladder)):
        raise ConfigError(f"--sparsity-ladder={list(ladder)}: strictly increasing fractions in (0, 1)")
    if ladder and args.retrain_epochs < 1:
        raise ConfigError("--retrain-epochs must be >= 1 with a --sparsity-ladder")
    total = args.epochs + len(ladder) * args.retrain_epochs
    if total < 1:
        raise ConfigError("nothing to plan: --epochs and the ladder give 0 epochs")
    if total > MAX_EPOCHS:
        raise ConfigError(f"--epochs + rungs x --retrain-epochs = {total:,} epochs; at most {MAX_EPOCHS:,}")
    accuracies = list(args.val_accuracy or ())
    if len(accuracies) > MAX_EPOCHS or any(not 0.0 <= a <= 1.0 for a in accuracies):  # NaN fails both
        raise ConfigError(f"--val-accuracy: {len(accuracies)} value(s), each an accuracy in [0, 1] (a fraction)")
    val_size = args.val_size if args.val_size is not None else max(1, round(args.train_size / 9))
    figure = None
    if args.figure:
        from .layout import claim_file

        figure = claim_file(args.figure, force=args.force, flag="--figure")
    rows = plan(cfg, epochs=total, train_size=args.train_size, kind=kind, batch_size=cfg.b0,
                val_accuracies=list(args.val_accuracy) if args.val_accuracy else None, val_size=val_size,
                rung_starts=[args.epochs + i * args.retrain_epochs for i in range(len(ladder))])
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{kind} schedule: {total} epochs, N = {args.train_size}, {val_size} validation images "
              f"(a fall must exceed {cfg.fall_z:g} SE, {cfg.fall_noise}), k = {cfg.k_value:.4g}")
        print(format_plan(rows))
    if figure:
        from .analysis.figures import plot_plan

        title = f"{kind}: N={args.train_size}, n_val={val_size}, B0={cfg.b0}, k={cfg.k_value:.4g}"
        path = plot_plan(rows, figure, title=title, k=cfg.k_value if kind == "dbs" else None,
                         v0=cfg.v0, m0=cfg.m0, m_max=cfg.m_max)
        print(f"figure -> {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


COMMANDS = {"run": add_run, "train-one": add_train_one, "dbs-plan": add_dbs_plan, "dbs-search": add_dbs_search,
            "config": add_config, "submit": add_submit}
