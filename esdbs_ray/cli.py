"""The ``esdbs`` command line: one sub-command per stage of the method.

    esdbs run         the whole method on Ray Tune: base members -> stacking (-> DBS search)
    esdbs train-one   train one CNN (spatial, Winograd-ReLU or random-basis BasisConv convs, fixed batch or
                      DBS, with a pruning ladder or a BasisConv eigen ladder)
    esdbs dbs-plan    preview the learning rate / momentum / batch size schedule a run would follow
    esdbs stack       search stacking weights on an experiment's Parquet predictions
    esdbs dbs-search  Tune experiment over the DBS constants
    esdbs report      report.md / report.html: our numbers beside the paper's
    esdbs results     one tidy table of every trial, rung and ensemble (table, CSV or Parquet)
    esdbs export      the trained ensemble as one directory: manifest, safetensors weights, ONNX graphs
    esdbs predict     an exported ensemble's probabilities for image files, folders or a dataset split
    esdbs config      print the resolved config, or its JSON Schema
    esdbs submit      submit ``esdbs run`` to a Ray cluster as a Ray Job

Config is validated here, once, into frozen pydantic models (``config.py``) before anything is written
or Ray starts.  Every error a user can cause ends as one ``esdbs: error: ...`` line and exit status 2;
an internal error prints one line with the path of its saved traceback (``ESDBS_DEBUG=1`` prints it
whole) and exits 1.  Outputs go only to new directories or to ones esdbs made for the same purpose;
``--force`` is the only way to replace (``layout.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .config import ConfigError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _k_arg(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _presets_help() -> str:
    from .presets import PRESETS

    return " | ".join(PRESETS)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``esdbs: error:`` line (exit 2) like every other error."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist | cifar10 | cifar100 | imagefolder:<path> (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files (else $ESDBS_DATA, system paths)")
    p.add_argument("--subset", type=int, default=None, help="stratified training subset size (smoke runs)")
    p.add_argument("--test-subset", type=int, default=None, help="stratified test subset size (smoke runs)")
    p.add_argument("--image-size", type=int, default=64, help="resize image-folder data to this size")
    p.add_argument("--seed", type=int, default=0)


def _add_schedule_args(p: argparse.ArgumentParser, default_schedule: str = "fixed") -> None:
    g = p.add_argument_group("schedule (fixed batch or DBS; spec section 4)")
    g.add_argument("--schedule", default=default_schedule, help=f"fixed | dbs (default {default_schedule})")
    g.add_argument("--batch-size", type=int, default=None, help="fixed batch size, and B0 for DBS (default 128)")
    g.add_argument("--lr", type=float, default=None, help="eta0, the learning rate after warm-up (default 0.02)")
    g.add_argument("--lr-start", type=float, default=None, help="warm-up start learning rate (default 0.01)")
    g.add_argument("--momentum", type=float, default=None, help="m0 (default 0.9)")
    g.add_argument("--warmup-frac", type=float, default=None)
    g.add_argument("--double-every", type=int, default=None, help="DBS: n, epochs between LR doublings")
    g.add_argument("--k", type=_k_arg, default=None,
                   help="DBS: momentum ODE constant k, or 'auto' (default: the critical k, m comes to rest at m_max)")
    g.add_argument("--v0", type=float, default=None, help="DBS: initial momentum velocity v0")
    g.add_argument("--m-max", type=float, default=None)
    g.add_argument("--bmax-cap", type=int, default=None)
    g.add_argument("--fall-z", type=float, default=None,
                   help="DBS: a fall must exceed this many standard errors of val accuracy (default 2)")
    g.add_argument("--fall-noise", choices=["binomial", "observed"], default=None,
                   help="DBS: one standard error is the binomial SE of the val estimate (default, spec "
                        "§4.2) or the larger of it and the run's own epoch-to-epoch noise")
    g.add_argument("--rung-lr", choices=["dense_end", "lr0"], default=None,
                   help="DBS: pruning rungs retrain at the dense phase's last learning rate (default, spec "
                        "§4.5) or at most at lr0")
    g.add_argument("--dbs-constants", default=None, help="JSON file of DBS constants (from esdbs dbs-search)")


_SCHEDULE_FLAGS = {"batch_size": "b0", "lr": "lr0", "lr_start": "lr_start", "momentum": "m0",
                   "warmup_frac": "warmup_frac", "double_every": "double_every", "k": "k", "v0": "v0",
                   "m_max": "m_max", "bmax_cap": "bmax_cap", "fall_z": "fall_z",
                   "fall_noise": "fall_noise", "rung_lr": "rung_lr"}


def _dbs_dict(args) -> dict:
    base = load_dbs_constants(args.dbs_constants) if getattr(args, "dbs_constants", None) else {}
    base.update({field: getattr(args, flag) for flag, field in _SCHEDULE_FLAGS.items() if getattr(args, flag) is not None})
    return base


def load_dbs_constants(path: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--dbs-constants {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"--dbs-constants {path}: is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--dbs-constants {path}: not valid JSON ({getattr(exc, 'msg', exc.__class__.__name__)})") from None
    constants = d.get("constants", d) if isinstance(d, dict) else None
    if not isinstance(constants, dict):
        raise ConfigError(f"--dbs-constants {path}: expected a JSON object of DBS constants")
    return constants


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esdbs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="the whole method on Ray Tune: base members -> stacking (-> DBS search)")
    _add_pipeline_args(p)
    p.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted run in DIR")
    p.add_argument("--force", action="store_true", help="replace an existing esdbs experiment in --out "
                   "(it is moved aside to OUT.replaced-TIME, not deleted)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the trial table; run nothing")
    p.add_argument("--dbs-search", action="store_true", help="also run the DBS-constant search stage")
    p.add_argument("--dbs-constants", default=None, help="JSON file of DBS constants (from esdbs dbs-search)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train-one", help="train one CNN and write summary.json + TensorBoard logs")
    _add_data_args(p)
    p.add_argument("--model", default="alexnet")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = published widths)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=0.0, help="L2 rate on conv weights (paper's convention)")
    p.add_argument("--optimizer", default="sgd", help="sgd | adam | adamw")
    p.add_argument("--conv", default="spatial", help="spatial | winograd_relu | basis_random (BasisConv from scratch)")
    p.add_argument("--epochs", type=int, required=True, help="dense epochs before the sparsity ladder")
    p.add_argument("--sparsity-ladder", type=_floats, default=(), help="e.g. 0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs per ladder rung")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace an earlier train-one run in --out (moved aside)")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier train-one run with --resume)")
    _add_schedule_args(p)
    _add_own_images_args(p)
    _add_basis_args(p)
    p.set_defaults(func=cmd_train_one)

    p = sub.add_parser("dbs-plan", help="show the schedule a run would follow (DBS unless --schedule fixed)")
    p.add_argument("--epochs", type=int, required=True, help="dense epochs before the sparsity ladder")
    p.add_argument("--train-size", type=int, required=True, help="images in the training split (N)")
    p.add_argument("--val-size", type=int, default=None,
                   help="images in the validation split, for the fall rule's standard error "
                        "(default: the 10 %% split that goes with --train-size, i.e. N/9)")
    p.add_argument("--sparsity-ladder", type=_floats, default=(), help="rungs, e.g. 0.2,0.3 (each restarts the plateau)")
    p.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs per ladder rung")
    p.add_argument("--val-accuracy", type=_floats, default=None, help="scripted validation accuracies a1,a2,...")
    p.add_argument("--json", action="store_true", help="one JSON object per epoch")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also draw η, m and B over epochs and the momentum ODE curve (a new file)")
    p.add_argument("--force", action="store_true", help="replace an existing --figure file")
    _add_schedule_args(p, default_schedule="dbs")
    p.set_defaults(func=cmd_dbs_plan)

    p = sub.add_parser("dbs-search", help="Tune experiment (ASHA) over the DBS constants; writes dbs_constants.json")
    _add_pipeline_args(p)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an earlier search in --out (moved aside)")
    p.set_defaults(func=cmd_dbs_search)

    p = sub.add_parser("stack", help="search stacking weights on EXPERIMENT_DIR's validation predictions")
    p.add_argument("experiment_dir", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("--sparsity", type=float, default=None, help="rung to stack (a fraction, e.g. 0.3); default: last")
    p.add_argument("--basis-threshold", type=float, default=None,
                   help="BasisConv rung to stack, by its t (e.g. 0.9; SBC-CNN groups); default: last")
    p.add_argument("--variant", default=None)
    p.add_argument("--tune-samples", type=int, default=0, help="also run the accuracy search as a Tune search")
    p.add_argument("--choose", default="nll_optimal", help="nll_optimal | accuracy_search | best_val | ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="a new JSON file (default: EXPERIMENT_DIR/stack-<time>-<variant>.json, a new file per call)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file (atomically)")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("report", help="report.md + report.html: our numbers beside the paper's tables and figures")
    p.add_argument("experiment_dir", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("--out", default=None, help="a local directory; default: EXPERIMENT_DIR/report for a local "
                   "experiment (a new directory, or --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier report there (swapped in atomically; "
                   "files esdbs did not write are kept)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="one tidy table of every trial, member, rung and ensemble of an experiment")
    p.add_argument("experiment_dir", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("--format", default="table", help="table | csv | parquet (default: table)")
    p.add_argument("--out", default=None, help="write to this new file instead of standard output "
                   "(required for parquet)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (atomically)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("export", help="the trained ensemble as one directory: manifest, safetensors, ONNX graphs")
    p.add_argument("experiment_dir", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("--variant", default=None, help="the group to export (default: the experiment's only stacked group)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="the rung to export, a fraction (default: the rung the stack used)")
    p.add_argument("--out", required=True, help="a new local directory")
    p.add_argument("--force", action="store_true", help="replace an earlier export there (swapped in atomically)")
    p.add_argument("--no-onnx", action="store_true", help="weights and manifest only (no ONNX graphs, no onnxruntime check)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="an exported ensemble's probabilities for images, folders or a dataset split")
    p.add_argument("export_dir", help="a directory written by esdbs export")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files and folders, or one of fashion-mnist:test, cifar10:test, cifar100:test "
                        "(or :train), imagefolder:PATH (one sub-folder per class)")
    p.add_argument("--out", required=True, help="a new Parquet file (or --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (atomically)")
    p.add_argument("--top-k", type=int, default=3, help="labels per image, most likely first (default 3)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--data-dir", default=None, help="where the dataset of a dataset split lies")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("config", help="print the resolved config (validated), or --schema its JSON Schema")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of a config file")
    p.add_argument("--config", default=None, help="YAML config (applied over the preset)")
    p.add_argument("--preset", default=None, help=f"{_presets_help()} (default: quick when no --config)")
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("submit", help="submit `esdbs run` to a Ray cluster as a Ray Job (token auth)")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds (exit 124)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then the arguments of `esdbs run`")
    p.set_defaults(func=cmd_submit)
    return parser


def _add_basis_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BasisConv (issue #16; config key train.basis)")
    g.add_argument("--basis-ladder", type=_floats, default=None,
                   help="eigen thresholds t, strictly decreasing in (0, 1], e.g. 1.0,0.95,0.9,0.85: after --epochs "
                        "of spatial training each rung converts every conv to its truncated eigen basis and fine-tunes "
                        "--retrain-epochs (coefficients first, then all non-basis parameters)")
    g.add_argument("--basis-stage1-epochs", type=int, default=None,
                   help="of each basis rung's epochs, how many train only the 1x1 coefficients (default 1)")
    g.add_argument("--basis-stage1-lr-scale", type=float, default=None, help="step one's learning-rate factor (default 1)")
    g.add_argument("--basis-stage2-lr-scale", type=float, default=None, help="step two's learning-rate factor (default 0.1)")
    g.add_argument("--basis-fraction", type=float, default=None,
                   help="--conv basis_random: Q = ceil(fraction * C_out) random basis filters per layer (default 1)")
    g.add_argument("--basis-layers", default=None, help="all (default: every conv, the stem too) | relu (stem stays spatial)")


_BASIS_FLAGS = {"basis_ladder": "ladder", "basis_stage1_epochs": "stage1_epochs", "basis_stage1_lr_scale": "stage1_lr_scale",
                "basis_stage2_lr_scale": "stage2_lr_scale", "basis_fraction": "fraction", "basis_layers": "layers"}


def _add_own_images_args(p: argparse.ArgumentParser) -> None:
    """train-one's flags for issue #17's keys (``esdbs run`` sets them as train.* config keys)."""
    g = p.add_argument_group("own images: augmentation, cosine schedule, AdamW, early stopping")
    g.add_argument("--augment", default="", help="comma-separated ops in order: random_resized_crop, hflip, vflip, "
                   "color_jitter, randaugment, trivialaugment (default: none)")
    g.add_argument("--lr-schedule", default="plateau", help="plateau | cosine (linear warm-up, cosine decay per step; "
                   "fixed batch only)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--patience", type=int, default=0, help="early stopping: epochs without a lower val loss (0: off)")


def _own_images_dict(args) -> dict:
    return dict(augment=[op.strip() for op in args.augment.split(",") if op.strip()], lr_schedule=args.lr_schedule,
                weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                early_stopping={"patience": args.patience})


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (applied over the preset)")
    p.add_argument("--preset", default=None, help=f"{_presets_help()} (default: quick when no --config)")
    p.add_argument("--out", default=None, help="experiment directory or URI (default: runs/<name>-<time>)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--scale", type=float, default=None, help="shrink epochs and training set by this factor (0, 1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.width=0.25 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")


def _pipeline_config(args, extra: dict | None = None):
    from .config import build_config

    overrides = dict(extra or {})
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "dbs_constants", None):
        overrides.setdefault("train", {})["dbs"] = load_dbs_constants(args.dbs_constants)
    if getattr(args, "dbs_search", False):
        overrides["run_dbs_search"] = True
    preset = args.preset or (None if args.config else "quick")
    return build_config(preset, args.config, overrides, scale=args.scale, sets=args.set)


def _default_out(name: str) -> str:
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_num_cpus(args) -> None:
    if getattr(args, "num_cpus", None) is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus={args.num_cpus}: must be >= 1")


def format_trials(cfg) -> str:
    rows = [f"{'member':<30} {'variant':<12} {'group':<16} {'model':<15} {'conv':<13} {'schedule':<8} "
            f"{'B0':>5} {'epochs':>6}  ladder"]
    for t in cfg.trials():
        tr = t.train
        ladder = list(tr.sparsity_ladder) or (f"basis t {list(tr.basis.ladder)}" if tr.basis.ladder else [])
        rows.append(f"{t.member:<30} {t.variant:<12} {t.group:<16} {tr.model:<15} {tr.conv:<13} {tr.schedule_kind:<8} "
                    f"{tr.dbs.b0:>5} {tr.total_epochs:>6}  {ladder}")
    return "\n".join(rows)


def cmd_run(args) -> int:
    import yaml

    from .pipeline import load_resumed_config, run_pipeline

    _check_num_cpus(args)
    if args.resume:
        given = [f for f, v in (("--config", args.config), ("--preset", args.preset), ("--out", args.out),
                                ("--scale", args.scale), ("--set", args.set), ("--force", args.force)) if v]
        if given:
            raise ConfigError(f"--resume DIR continues DIR with its saved config.yaml; drop {', '.join(given)}")
        cfg, out = load_resumed_config(args.resume), args.resume
    else:
        cfg = _pipeline_config(args)
        out = args.out or _default_out(cfg.name)
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(f"# {len(cfg.trials())} trial(s) -> {out}")
        print(format_trials(cfg))
        return 0
    run_pipeline(cfg, out, resume=bool(args.resume), force=args.force, address=args.address,
                 num_cpus=args.num_cpus, progress=not args.quiet)
    return 0


def cmd_config(args) -> int:
    import yaml

    if args.schema:
        from .config import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    cfg = _pipeline_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_dbs_search(args) -> int:
    from .layout import ExperimentLayout, claim_dir
    from .pipeline import load_data, run_dbs_search
    from .ray_env import init_ray

    _check_num_cpus(args)
    cfg = _pipeline_config(args)
    changes = {k: v for k, v in (("num_samples", args.num_samples), ("epochs", args.epochs)) if v is not None}
    if changes:
        from .config import validate

        cfg = validate(type(cfg), {**cfg.model_dump(), "dbs_search": {**cfg.dbs_search.model_dump(), **changes}})
    out = args.out or _default_out(cfg.name + "-dbs-search")
    claim_dir(out, "dbs-search", force=args.force, check_only=True)
    data = load_data(cfg)
    layout = ExperimentLayout(claim_dir(out, "dbs-search", force=args.force))
    init_ray(args.address, args.num_cpus)
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


def cmd_stack(args) -> int:
    from .config import STACK_METHODS
    from .layout import ExperimentLayout, claim_file
    from .stacking import format_stacking_table, stack_experiment

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity={args.sparsity}: a fraction in [0, 1) (e.g. 0.3 for 30 %)")
    if args.basis_threshold is not None and not 0.0 < args.basis_threshold <= 1.0:
        raise ConfigError(f"--basis-threshold={args.basis_threshold}: a threshold t in (0, 1] (e.g. 0.9)")
    if args.choose not in (*STACK_METHODS, "best_val"):
        raise ConfigError(f"--choose={args.choose!r}: choose one of {', '.join((*STACK_METHODS, 'best_val'))}")
    if args.tune_samples < 0:
        raise ConfigError(f"--tune-samples={args.tune_samples}: must be >= 0")
    layout = ExperimentLayout.at(args.experiment_dir)
    output = (claim_file(args.output, force=args.force) if args.output
              else layout.stacking_rerun(f"{args.variant or 'all'}-s{args.sparsity if args.sparsity is not None else 'last'}"
                                         + (f"-t{args.basis_threshold:g}" if args.basis_threshold is not None else "")))
    result = stack_experiment(layout.root, sparsity=args.sparsity, basis_threshold=args.basis_threshold,
                              variant=args.variant,
                              tune_samples=args.tune_samples, seed=args.seed, choose=args.choose, output=output,
                              storage_path=layout.tune)
    print(format_stacking_table(result))
    print(f"-> {output}")
    return 0


def cmd_train_one(args) -> int:
    from .config import TrainConfig, validate
    from .data import load_dataset
    from .layout import RunLayout, claim_dir
    from .provenance import device_info, provenance
    from .train import PrintHooks, train

    cfg = validate(TrainConfig, dict(
        dataset=args.dataset, data_dir=args.data_dir, subset=args.subset, test_subset=args.test_subset,
        image_size=args.image_size, model=args.model, width=args.width, dropout=args.dropout, conv=args.conv,
        optimizer=args.optimizer, l2=args.l2, epochs=args.epochs, schedule=args.schedule, dbs=_dbs_dict(args),
        sparsity_ladder=args.sparsity_ladder, retrain_epochs=args.retrain_epochs, seed=args.seed,
        threads=args.threads, device=args.device, **_own_images_dict(args),
        basis={key: getattr(args, flag) for flag, key in _BASIS_FLAGS.items() if getattr(args, flag) is not None},
    ))
    if args.resume and args.force:
        raise ConfigError("--resume continues a run, --force replaces it: pass one of them")
    checked = Path(claim_dir(args.out, "run", resume=args.resume, force=args.force, check_only=True))
    if args.resume and not RunLayout(checked).checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint at {RunLayout(checked).checkpoint}")
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        subset=cfg.subset, test_subset=cfg.test_subset, image_size=cfg.image_size)
    run = RunLayout(Path(claim_dir(args.out, "run", resume=args.resume, force=args.force)))
    print(data.describe(), flush=True)
    summary = train(cfg, data, run.root, hooks=PrintHooks(), resume_from=run.checkpoint if args.resume else None,
                    predictions_root=str(run.root), variant=_variant_name(cfg),
                    provenance={**provenance(), "device": device_info()})
    rung = (f"basis t={summary['basis_threshold']:g}" if summary.get("basis_threshold") is not None
            else f"sparsity {summary['sparsity']:.3f}")
    print(f"done: val {summary['val_accuracy']:.4f} test {summary['test_accuracy']:.4f} "
          f"{rung} in {summary['train_seconds']:.1f}s training -> {run.summary}")
    return 0


def _variant_name(cfg) -> str:
    dbs = "+DBS" if cfg.schedule == "dbs" else ""
    if cfg.conv == "winograd_relu":
        return "SWR-CNN" + dbs
    if cfg.conv == "basis_random":  # one member of SRB-CNN / SBC-CNN: the single-model labels
        return "RB-CNN" + dbs
    return ("BC-CNN" if cfg.basis.ladder else "C-CNN") + dbs


def cmd_dbs_plan(args) -> int:
    from .config import DBSConfig, validate
    from .dbs import SCHEDULE_KINDS, format_plan, plan

    if args.schedule not in SCHEDULE_KINDS:
        raise ConfigError(f"--schedule={args.schedule!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
    kind = args.schedule
    cfg = validate(DBSConfig, _dbs_dict(args), "schedule")
    for flag, low in (("epochs", 0), ("train_size", 1), ("val_size", 1), ("retrain_epochs", 0)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise ConfigError(f"--{flag.replace('_', '-')}={v}: must be >= {low}")
    ladder = tuple(args.sparsity_ladder)
    if any(not 0 < s < 1 for s in ladder) or list(ladder) != sorted(set(ladder)):
        raise ConfigError(f"--sparsity-ladder={list(ladder)}: strictly increasing fractions in (0, 1)")
    if ladder and args.retrain_epochs < 1:
        raise ConfigError("--retrain-epochs must be >= 1 with a --sparsity-ladder")
    total = args.epochs + len(ladder) * args.retrain_epochs
    if total < 1:
        raise ConfigError("nothing to plan: --epochs and the ladder give 0 epochs")
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
        from .dbs import plot_plan

        title = f"{kind}: N={args.train_size}, n_val={val_size}, B0={cfg.b0}, k={cfg.k_value:.4g}"
        path = plot_plan(rows, figure, title=title, k=cfg.k_value if kind == "dbs" else None,
                         v0=cfg.v0, m0=cfg.m0, m_max=cfg.m_max)
        print(f"figure -> {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    return submit(args.address, run_args, follow=not args.no_follow, timeout=args.timeout)


def _experiment_tree(path: str):
    """A readable experiment directory (local or URI), or a one-line error naming it."""
    from . import storage

    try:
        tree = storage.Tree(path)
        ok = tree.is_dir()
    except (ValueError, OSError) as exc:  # pyarrow: an unknown scheme, unreachable storage
        raise ConfigError(f"{path}: cannot open ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not ok:
        raise ConfigError(f"{path}: no such experiment directory")
    return tree


def cmd_report(args) -> int:
    from .analysis.report import build_report
    from .layout import replace_dir

    tree = _experiment_tree(args.experiment_dir)
    if args.out:
        out = Path(args.out)
    elif tree.local:
        out = Path(tree.path()) / "report"
    else:
        raise ConfigError(f"{args.experiment_dir} is not a local directory: pass --out DIR (a local directory) "
                          "for its report")
    result = replace_dir(out, lambda staging: build_report(tree.root, out_dir=staging), kind="report",
                         force=args.force)
    counts: dict[str, int] = {}
    for claim in result["claims"]:
        counts[claim["verdict"]] = counts.get(claim["verdict"], 0) + 1
    print(", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + f" -> {out / 'report.html'}")
    for problem in result["problems"]:
        print(f"note: {problem}")
    from .tracking import log_report

    run_id = log_report(tree.root, out)
    if run_id:
        print(f"MLflow: the report's files logged to run {run_id} (artifact path report/)")
    return 0


def cmd_results(args) -> int:
    from .layout import claim_file
    from .results import FORMATS, format_results, results_table

    if args.format not in FORMATS:
        raise ConfigError(f"--format={args.format!r}: choose one of {', '.join(FORMATS)}")
    if args.format == "parquet" and not args.out:
        raise ConfigError("--format parquet writes a binary file: pass --out FILE")
    out = claim_file(args.out, force=args.force, flag="--out") if args.out else None
    tree = _experiment_tree(args.experiment_dir)
    df = results_table(tree.root)
    data = format_results(df, args.format)
    for note in df.attrs.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if out:
        from . import storage

        storage.write_bytes(out, data)
        print(f"{len(df)} rows -> {out}")
    else:
        sys.stdout.write(data.decode())
    return 0


def cmd_export(args) -> int:
    from .export import export_experiment

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity={args.sparsity}: a fraction in [0, 1) (e.g. 0.3 for 30 %)")
    if not args.no_onnx:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"ONNX export needs {' and '.join(missing)}: pip install 'esdbs-ray[export]' "
                              "(or pass --no-onnx)")
    tree = _experiment_tree(args.experiment_dir)
    manifest = export_experiment(tree.root, args.out, variant=args.variant, sparsity=args.sparsity, force=args.force,
                                 onnx=not args.no_onnx)
    e = manifest["ensemble"]
    acc = f"; the run's test accuracy {e['test_accuracy']:.4f}" if e.get("test_accuracy") is not None else ""
    print(f"{manifest['group']}: {len(manifest['members'])} member(s) at sparsity {e['sparsity']:g}, "
          f"weights ({e['method']}) " + ", ".join(f"{m} {w:.3f}" for m, w in e["weights"].items()) + acc)
    for m in manifest["members"]:
        onnx = f", ONNX max |diff| {m['onnx_max_abs_diff']:.1e}" if "onnx_max_abs_diff" in m else ""
        print(f"  {m['name']}: {m['model']} width {m['width']:g} {m['conv']}, {m['nonzero_weights']:,} nonzero "
              f"weights (whole model {100 * m['model_sparsity']:.1f}% zero){onnx}")
    print(f"-> {args.out} (use: esdbs predict {args.out} INPUT --out preds.parquet)")
    return 0


def cmd_predict(args) -> int:
    from .ensemble import Ensemble, predict_to_parquet, read_inputs
    from .layout import claim_file

    if args.top_k < 1:
        raise ConfigError(f"--top-k={args.top_k}: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size}: must be >= 1")
    out = claim_file(args.out, force=args.force, flag="--out")
    ensemble = Ensemble.load(args.export_dir, device=args.device, tune_allocator=True)
    inputs = read_inputs(args.inputs, shape=ensemble.input_shape, class_names=ensemble.class_names,
                         data_dir=args.data_dir)
    meta = predict_to_parquet(ensemble, inputs, out, top_k=args.top_k, batch_size=args.batch_size)
    print(f"{meta['images']} images ({inputs.description}) in {meta['seconds']:.2f} s on {meta['device']} -> {out}")
    if meta["accuracy"]:
        a = meta["accuracy"]
        print(f"accuracy on {a['labelled']} labelled images: ensemble {a['ensemble']:.4f}; "
              + ", ".join(f"{m} {v:.4f}" for m, v in a["members"].items()))
    return 0


# --------------------------------------------------------------------------------------------------
# main: one line per error
# --------------------------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user's input causes (bad config, data, checkpoint, path, flag)."""
    from .data import DataError
    from .layout import OutputError

    # ValueError covers ExportError, ResultsError and PredictionsError
    errors: list[type[BaseException]] = [ConfigError, DataError, OutputError, _UsageError, FileNotFoundError,
                                         IsADirectoryError, NotADirectoryError, PermissionError, ValueError]
    try:
        from .submit import SubmitError

        errors.append(SubmitError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help, or argparse's own exit
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("esdbs: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"esdbs: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or the run itself failing: one line, the traceback kept in a file
        from .pipeline import RunFailed

        if os.environ.get("ESDBS_DEBUG") == "1":
            traceback.print_exc()
            return 1
        fd, path = tempfile.mkstemp(prefix="esdbs-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        kind = "run failed" if isinstance(exc, RunFailed) else f"internal error ({exc.__class__.__name__})"
        print(f"esdbs: {kind}: {_one_line(exc)} (traceback: {path}; ESDBS_DEBUG=1 prints it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
