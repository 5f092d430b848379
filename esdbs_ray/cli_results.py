"""The ``esdbs`` sub-commands that use what a run left: stack, report, results, export, predict.

Each ``add_*`` adds its parser to the sub-command set; each ``cmd_*`` runs it (heavy imports inside).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cli_common import experiment_tree
from .config import ConfigError

# esdbs stack --tune-samples: accuracy-search samples as a Tune search (the config's stack.tune_samples bound)
MAX_TUNE_SAMPLES = 10 ** 6

__all__ = ["COMMANDS"]


def add_stack(sub) -> None:
    p = sub.add_parser("stack", help="search stacking weights on EXPERIMENT_DIR's validation predictions")
    p.add_argument("experiment_dir", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("more_experiments", nargs="*", metavar="EXPERIMENT_DIR",
                   help="--pool: more experiments whose candidates join the pool (same validation and test images)")
    p.add_argument("--sparsity", type=float, default=None, help="rung to stack (a fraction, e.g. 0.3); default: last")
    p.add_argument("--basis-threshold", type=float, default=None,
                   help="BasisConv rung to stack, by its t (e.g. 0.9; SBC-CNN groups); default: last")
    p.add_argument("--level", type=int, default=None,
                   help="a self-expanding member's level to stack (0: the seed network; default: not a level)")
    p.add_argument("--variant", default=None, help="the group to stack (default: every member present)")
    p.add_argument("--tune-samples", type=int, default=0, help="also run the accuracy search as a Tune search")
    p.add_argument("--choose", default=None,
                   help="which method's weights the ensemble uses: a method, best_val, or cv (the lowest "
                        "cross-validated NLL inside the validation split); default: the experiment's stack.choose "
                        "(cv for a new config)")
    p.add_argument("--cv-folds", type=int, default=None,
                   help="folds of the cross-validated estimate (default: the experiment's stack.cv_folds, 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the accuracy searches (default 0)")
    p.add_argument("--output", default=None,
                   help="a new JSON file (default: EXPERIMENT_DIR/stack-<time>-<group>-<rung>.json, a new file per "
                        "call, e.g. stack-20261206T101500-swr-cnn-dbs-ts0300.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file (atomically)")
    pool = p.add_argument_group("pool", "an ensemble chosen from every model the experiments trained (every "
                                "member, variant, rung and level with predictions): esdbs stack EXP [EXP...] --pool")
    pool.add_argument("--pool", action="store_true", help="select from every candidate (writes pool-<time>-<tag>.json, "
                      "its front as -front.parquet and -front.png)")
    pool.add_argument("--budget-ms", type=float, default=None,
                      help="only ensembles whose members' measured ms per image (batch 256, here) sum to at most this")
    pool.add_argument("--budget-macs", type=float, default=None,
                      help="only ensembles whose members' multiply-adds per image (nonzero weights) sum to at most this")
    pool.add_argument("--k", type=int, default=5, help="at most k members for nll_topk and equal_topk (default 5)")
    pool.add_argument("--rounds", type=int, default=50, help="rounds of the greedy selection (default 50)")
    pool.add_argument("--reference", default=None,
                      help="the stack the choice is compared with (default: the SWR-CNN+DBS group's)")
    pool.add_argument("--no-measure", action="store_true", help="time no candidate here (cached times only)")
    pool.add_argument("--remeasure", action="store_true", help="time every candidate again, ignoring the cache")
    pool.add_argument("--no-front", action="store_true", help="skip the accuracy-cost front (the budget ladder)")
    p.set_defaults(func=cmd_stack)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md + report.html: our numbers beside the paper's tables and figures")
    p.add_argument("experiment_dir", nargs="+", metavar="EXPERIMENT_DIR",
                   help="a local directory or a URI (s3://, gs://, file://); several (or a multi-seed run's): "
                        "replicates of one config, reported together (mean and SE across them; configs that differ "
                        "but for the seed are refused)")
    p.add_argument("--out", default=None, help="a local directory; default: EXPERIMENT_DIR/report for a local "
                   "experiment (a new directory, or --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier report there (swapped in atomically; "
                   "files esdbs did not write are kept)")
    p.set_defaults(func=cmd_report)


def add_results(sub) -> None:
    p = sub.add_parser("results", help="one tidy table of every trial, member, rung and ensemble of an experiment")
    p.add_argument("experiment_dir", nargs="+", metavar="EXPERIMENT_DIR",
                   help="a local directory or a URI (s3://, gs://, file://); several (or a multi-seed run's): "
                        "replicates of one config, one after another with the columns replicate and seed first")
    p.add_argument("--format", default="table", help="table | csv | parquet (default: table)")
    p.add_argument("--columns", default=None, help="the table's columns instead of its default view, comma-"
                   "separated (any of csv's; e.g. kind,member,target_sparsity,test_accuracy,wall_seconds)")
    p.add_argument("--out", default=None, help="write to this new file instead of standard output "
                   "(required for parquet)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (atomically)")
    p.set_defaults(func=cmd_results)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="the trained ensemble as one directory: manifest, safetensors, ONNX graphs")
    p.add_argument("experiment_dir", nargs="?", help="a local directory or a URI (s3://, gs://, file://)")
    p.add_argument("--stack", default=None, metavar="FILE",
                   help="a pool file (esdbs stack --pool): export its chosen ensemble, each member from its own "
                        "experiment and rung (no EXPERIMENT_DIR)")
    p.add_argument("--variant", default=None, help="the group to export (default: the experiment's only stacked group)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="the rung to export, a fraction (default: the rung the stack used)")
    p.add_argument("--level", type=int, default=None, help="a self-expanding group's level to export (its weights "
                   "and architecture at that level; 0: the seed network)")
    p.add_argument("--out", required=True, help="a new local directory")
    p.add_argument("--force", action="store_true", help="replace an earlier export there (swapped in atomically)")
    p.add_argument("--no-onnx", action="store_true", help="weights and manifest only (no ONNX graphs, no onnxruntime check)")
    p.set_defaults(func=cmd_export)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="an exported ensemble's probabilities for images, folders or a dataset split")
    p.add_argument("export_dir", help="a directory written by esdbs export")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files and folders, or one of fashion-mnist:test, cifar10:test, cifar100:test "
                        "(or :train), imagefolder:PATH (one sub-folder per class)")
    p.add_argument("--out", required=True, help="a new Parquet file (or --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (atomically)")
    p.add_argument("--top-k", type=int, default=3, help="labels per image, most likely first (default 3)")
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (default 1000)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--data-dir", default=None, help="where the dataset of a dataset split lies")
    p.set_defaults(func=cmd_predict)



def cmd_stack(args) -> int:
    if args.pool or args.more_experiments:
        return cmd_pool(args)
    from .artifacts import check_experiment
    from .config import MAX_SEED, STACK_CHOICES
    from .layout import ExperimentLayout, check_writable, claim_file
    from .stacking import format_stacking_table
    from .stacking_run import RERUN, stack_experiment

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity={args.sparsity}: a fraction in [0, 1) (e.g. 0.3 for 30 %)")
    if args.basis_threshold is not None and not 0.0 < args.basis_threshold <= 1.0:
        raise ConfigError(f"--basis-threshold={args.basis_threshold}: a threshold t in (0, 1] (e.g. 0.9)")
    if args.choose is not None and args.choose not in STACK_CHOICES:
        raise ConfigError(f"--choose={args.choose!r}: choose one of {', '.join(STACK_CHOICES)}")
    if args.cv_folds is not None and not 2 <= args.cv_folds <= 100:
        raise ConfigError(f"--cv-folds={args.cv_folds}: must be in [2, 100]")
    if not 0 <= args.tune_samples <= MAX_TUNE_SAMPLES:
        raise ConfigError(f"--tune-samples={args.tune_samples}: must be in [0, {MAX_TUNE_SAMPLES:,}]")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed={args.seed}: must be in [0, {MAX_SEED}]")
    if args.level is not None and not 0 <= args.level <= 1000:
        raise ConfigError(f"--level={args.level}: must be in [0, 1000]")
    tree = experiment_tree(args.experiment_dir)
    _one_seed(args.experiment_dir)
    layout = ExperimentLayout.at(args.experiment_dir)
    if args.output:
        output = claim_file(args.output, force=args.force)
    else:  # a new stack-<time>-<tag>.json inside the experiment: it must take one
        check_writable(layout.root, flag="EXPERIMENT_DIR")
        output = RERUN
    check_experiment(tree, only=("config", "predictions"))
    from .stacking_run import config_stack_settings

    settings = config_stack_settings(layout.root)  # re-run the stack by the rule the run chose by
    choose = args.choose or (settings.choose if settings else "cv")
    cv_folds = args.cv_folds or (settings.cv_folds if settings else 5)
    result = stack_experiment(layout.root, sparsity=args.sparsity, basis_threshold=args.basis_threshold,
                              level=args.level, variant=args.variant,
                              tune_samples=args.tune_samples, seed=args.seed, choose=choose, output=output,
                              storage_path=layout.tune, cv_folds=cv_folds)
    print(format_stacking_table(result))
    print(f"-> {result['output']}")
    return 0


def checked_replicates(trees, only=None):
    """The experiments of ``trees`` (a multi-seed run's directory standing for its seeds'), each read
    with the typed readers first (``artifacts.check_experiment``): a corrupt file is one line naming it,
    before any other reader sees it or anything is written."""
    from .analysis.seeds import replicate_trees
    from .artifacts import KINDS, check_experiment

    for t in trees:
        check_experiment(t, only=only or KINDS)
    replicates = replicate_trees([t.root for t in trees])  # several: one config but for the seed
    given = {t.path() for t in trees}
    for t in replicates:
        if t.path() not in given:
            check_experiment(t, only=only or KINDS)
    return replicates


def cmd_report(args) -> int:
    from .analysis.report import build_report
    from .layout import replace_dir

    trees = [experiment_tree(d) for d in args.experiment_dir]
    checked_replicates(trees)  # every artifact the report reads, before anything is written
    tree = trees[0]
    if args.out:
        out = Path(args.out)
    elif tree.local:
        out = Path(tree.path()) / "report"
    else:
        raise ConfigError(f"{tree.root} is not a local directory: pass --out DIR (a local directory) "
                          "for its report")
    result = replace_dir(out, lambda staging: build_report([t.root for t in trees], out_dir=staging), kind="report",
                         force=args.force)
    if len(result["replicates"]) > 1:
        print(f"{len(result['replicates'])} replicates: {', '.join(result['replicates'])}")
    counts: dict[str, int] = {}
    for claim in result["claims"]:
        counts[claim["verdict"]] = counts.get(claim["verdict"], 0) + 1
    for line in result["headline"]:
        print(line)
    print("claims: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + f" -> {out / 'report.html'}")
    for problem in result["problems"]:
        print(f"note: {problem}")
    from .tracking import log_report

    run_id = log_report(tree.root, out)
    if run_id:
        print(f"MLflow: the report's files logged to run {run_id} (artifact path report/)")
    return 0


def cmd_results(args) -> int:
    from .layout import claim_file
    from .analysis.experiment import Experiment
    from .analysis.seeds import labels
    from .results import FORMATS, format_results, replicate_results, results_table

    if args.format not in FORMATS:
        raise ConfigError(f"--format={args.format!r}: choose one of {', '.join(FORMATS)}")
    if args.format == "parquet" and not args.out:
        raise ConfigError("--format parquet writes a binary file: pass --out FILE")
    out = claim_file(args.out, force=args.force, flag="--out") if args.out else None
    trees = [experiment_tree(d) for d in args.experiment_dir]
    tree = trees[0]
    replicates = checked_replicates(trees, only=("config", "summary", "members", "stacking"))
    if len(replicates) == 1:
        df = results_table(tree.root)
    else:
        exps = [Experiment(t) for t in replicates]
        df = replicate_results([t.root for t in replicates], labels(exps), [e.config.get("seed") for e in exps])
    data = format_results(df, args.format, [c.strip() for c in args.columns.split(",")] if args.columns else None)
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
    if args.stack or args.experiment_dir is None:
        return cmd_export_pool(args)
    from .artifacts import check_experiment
    from .export import export_experiment

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity={args.sparsity}: a fraction in [0, 1) (e.g. 0.3 for 30 %)")
    _check_onnx(args)
    tree = experiment_tree(args.experiment_dir)
    check_experiment(tree, only=("config", "summary", "members", "stacking"))
    _one_seed(tree.root)
    manifest = export_experiment(tree.root, args.out, variant=args.variant, sparsity=args.sparsity, force=args.force,
                                 onnx=not args.no_onnx, level=args.level)
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
    from .config import MAX_BATCH
    from .ensemble import Ensemble, predict_to_parquet, read_inputs
    from .layout import claim_file

    if not 1 <= args.top_k <= 10_000:
        raise ConfigError(f"--top-k={args.top_k}: must be in [1, 10000]")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ConfigError(f"--batch-size={args.batch_size}: must be in [1, {MAX_BATCH}]")
    out = claim_file(args.out, force=args.force, flag="--out")
    ensemble = Ensemble.load(args.export_dir, device=args.device, tune_allocator=True)
    inputs = read_inputs(args.inputs, shape=ensemble.input_shape, class_names=ensemble.class_names,
                         data_dir=args.data_dir)
    meta = predict_to_parquet(ensemble, inputs, out, top_k=args.top_k, batch_size=args.batch_size,
                              progress=_progress_bar if sys.stderr.isatty() else None)
    print(f"{meta['images']} images ({inputs.description}) in {meta['seconds']:.2f} s on {meta['device']} -> {out}")
    if meta["accuracy"]:
        a = meta["accuracy"]
        e = meta["evaluation"]["ensemble"]
        print(f"accuracy on {a['labelled']} labelled images: ensemble {a['ensemble']:.4f} (macro F1 "
              f"{e['macro_f1']:.4f}, ECE {e['ece']:.4f}); " + ", ".join(f"{m} {v:.4f}" for m, v in a["members"].items()))
    return 0


def _progress_bar(done: int, total: int) -> None:
    """One line on a terminal, rewritten after each batch."""
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r[esdbs] predict [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images", end=end,
          file=sys.stderr, flush=True)


def _one_seed(path: str) -> None:
    """Refuse a multi-seed run's own directory where one experiment is meant, naming its seeds'."""
    from .replicates import replicate_dirs
    from .storage import Tree, join

    try:
        dirs = replicate_dirs(Tree(path))
    except (ValueError, OSError):  # unreadable: the command's own checks name it
        return
    if dirs:
        raise ConfigError(f"{path} is a multi-seed run: name one seed's experiment, e.g. {join(path, dirs[0])} "
                          f"(its seeds: {', '.join(dirs)})")


def _check_onnx(args) -> None:
    if not args.no_onnx:
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"ONNX export needs {' and '.join(missing)}: pip install 'esdbs-ray[export]' "
                              "(or pass --no-onnx)")


def cmd_pool(args) -> int:
    """esdbs stack EXP [EXP...] --pool: pool_run.pool_experiments, printed by format_pool."""
    from .layout import claim_file
    from .pool import POOL_METHODS
    from .pool_run import RERUN, format_pool, pool_experiments

    if not args.pool:
        raise ConfigError("several experiments are stacked together only with --pool")
    for flag, v in (("--sparsity", args.sparsity), ("--basis-threshold", args.basis_threshold),
                    ("--level", args.level), ("--variant", args.variant)):
        if v is not None:
            raise ConfigError(f"{flag}: --pool takes every rung, level and group as candidates; drop {flag}")
    if args.tune_samples:
        raise ConfigError("--tune-samples: the pool's methods do not include the Tune search; drop it")
    if args.choose is not None and args.choose not in ("cv", "best_val", *POOL_METHODS):
        raise ConfigError(f"--choose={args.choose!r}: with --pool choose cv, best_val or one of {', '.join(POOL_METHODS)}")
    if not 1 <= args.k <= 1000 or not 1 <= args.rounds <= 100_000:
        raise ConfigError(f"--k={args.k}, --rounds={args.rounds}: k in [1, 1000], rounds in [1, 100000]")
    if args.cv_folds is not None and not 2 <= args.cv_folds <= 100:
        raise ConfigError(f"--cv-folds={args.cv_folds}: must be in [2, 100]")
    for flag, v in (("--budget-ms", args.budget_ms), ("--budget-macs", args.budget_macs)):
        if v is not None and not (v > 0 and v < float("inf")):
            raise ConfigError(f"{flag}={v}: a positive number")
    output = claim_file(args.output, force=args.force) if args.output else RERUN
    result = pool_experiments([args.experiment_dir, *args.more_experiments], k=args.k, rounds=args.rounds,
                              folds=args.cv_folds or 5, seed=args.seed, choose=args.choose or "cv",
                              budget_ms=args.budget_ms, budget_macs=args.budget_macs, measure=not args.no_measure,
                              remeasure=args.remeasure, front=not args.no_front, reference=args.reference,
                              output=output, log=lambda m: print(f"[esdbs] {m}", file=sys.stderr, flush=True))
    print(format_pool(result))
    print(f"-> {result['output']}")
    return 0


def cmd_export_pool(args) -> int:
    """esdbs export --stack POOL_FILE --out DIR: the pool's chosen ensemble, exported."""
    from .pool_run import export_pool

    if not args.stack:
        raise ConfigError("export needs EXPERIMENT_DIR, or --stack FILE (a pool file of esdbs stack --pool)")
    if args.experiment_dir is not None or args.variant or args.sparsity is not None or args.level is not None:
        raise ConfigError("--stack FILE names every member, its experiment and rung: drop EXPERIMENT_DIR, --variant, "
                          "--sparsity and --level")
    _check_onnx(args)
    manifest = export_pool(args.stack, args.out, force=args.force, onnx=not args.no_onnx)
    e = manifest["ensemble"]
    acc = f"; the pool's test accuracy {e['test_accuracy']:.4f}" if e.get("test_accuracy") is not None else ""
    print(f"pool ensemble ({e['method']}): {len(manifest['members'])} member(s), weights "
          + ", ".join(f"{m} {w:.3f}" for m, w in e["weights"].items()) + acc)
    print(f"-> {args.out} (use: esdbs predict {args.out} INPUT --out preds.parquet)")
    return 0


COMMANDS = {"stack": add_stack, "report": add_report, "results": add_results, "export": add_export, "predict": add_predict}
