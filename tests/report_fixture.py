"""A small, realistic synthetic experiment directory, as ``esdbs run`` leaves it, for the report tests.

:func:`write_experiment` builds the experiment matrix from the real ``paper-fashion-mnist`` preset
(``PipelineConfig.groups()`` / ``trials()``: the four variants, a batch sweep, the DBS rows), then writes
what the pipeline writes -- ``config.yaml``, ``summary.json``, ``members/*.json``, Parquet predictions
per member per rung (``esdbs_ray.predictions.write_predictions``), ``stacking-<group>.json`` per
stacked group (``esdbs_ray.stacking_run.stack_experiment``), and per trial a Tune-like directory with
TensorBoard events (``torch.utils.tensorboard.SummaryWriter``: the trainer's scalar tags and, for
Winograd trials, the ``winograd_kernels`` image) -- with synthetic softmax outputs whose quality is
set per group and rung (``QUALITY``), and synthetic epoch times (``SECONDS``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

C = 10
N_TRAIN = 6000
# logit margin of the true class for a single model; the stacks' members get the same, their
# ensemble is better because the members' noise is partly independent.
QUALITY = {"C-CNN": 1.6, "SC-CNN": 1.9, "SWR-CNN": 2.0, "SWR-CNN+DBS": 2.4, "C-CNN+DBS": 1.7, "SC-CNN+DBS": 2.1}
BATCH_QUALITY = {64: 0.2, 128: 0.0, 256: -0.2, 512: -0.4, 1024: -0.6}  # larger batches: worse
MODEL_SECONDS = {"alexnet": 2.0, "convpool_cnn_c": 1.5, "all_cnn_c": 1.2}  # per epoch at B=128, dense
SWR_FACTOR, DBS_FACTOR = 0.9, 0.6
SETS = ["train.width=0.125", "train.sparsity_ladder=[0.3,0.6]", "batch_sweep.batch_sizes=[128,512]",
        "train.epochs=1", "train.retrain_epochs=1"]


def build_config(sets=None, preset="paper-fashion-mnist"):
    from esdbs_ray.config import build_config as _build

    return _build(preset, None, {"subset": N_TRAIN, "test_subset": 600}, sets=list(SETS if sets is None else sets))


def _probs(rng, labels, margin, shared):
    n = len(labels)
    z = 0.6 * shared + 0.8 * rng.normal(size=(n, C)) * 1.5
    z[np.arange(n), labels] += margin
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _seconds(trial, target):
    t = MODEL_SECONDS[trial["train"]["model"]] * (1 - 0.2 * target)
    if trial["train"]["conv"] == "winograd_relu":
        t *= SWR_FACTOR
    if trial["train"]["schedule"] == "dbs":
        t *= DBS_FACTOR
    b = trial["batch_size"]
    if b is not None:
        t *= (128 / b) ** 0.5
    return round(t, 4)


def _kernel_image():
    import torch

    from esdbs_ray.analysis.figures import plot_winograd_kernels

    g = torch.Generator().manual_seed(0)
    kernels = {}
    for s in (0.0, 0.3, 0.6):
        k = torch.randn(6, 6, 4, 4, generator=g)
        if s:
            k[k.abs() < k.abs().flatten().quantile(s)] = 0
        kernels[s] = k
    return plot_winograd_kernels(kernels)


def write_experiment(root, *, sets=None, n_val=400, n_test=600, seed=0, tensorboard=True, quality=None) -> dict:
    """Write the synthetic experiment under ``root`` (created); returns ``{"config", "trials", "summary"}``.

    ``quality`` overrides entries of :data:`QUALITY` (per variant logit margin)."""
    q = {**QUALITY, **(quality or {})}
    from esdbs_ray import predictions as pred
    from esdbs_ray.config import slug as _slug
    from esdbs_ray.stacking_run import stack_experiment

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = build_config(sets)
    cfgd = cfg.to_dict()
    (root / "config.yaml").write_text(yaml.safe_dump(cfgd, sort_keys=False))
    trials = [t.model_dump(mode="json") for t in cfg.trials()]  # plain dicts, as in Tune's files
    rng = np.random.default_rng(seed)
    val_idx = np.sort(rng.choice(N_TRAIN, n_val, replace=False))
    test_idx = np.arange(n_test)
    y_val, y_test = rng.integers(0, C, n_val), rng.integers(0, C, n_test)
    shared_val, shared_test = rng.normal(size=(n_val, C)), rng.normal(size=(n_test, C))
    image = _kernel_image() if tensorboard else None

    members = []
    for i, t in enumerate(trials):
        tr = t["train"]
        ladder = [0.0] + list(tr["sparsity_ladder"])
        margin0 = q[t["variant"]] + BATCH_QUALITY.get(t["batch_size"] or 128, 0.0)
        trial_dir = root / "tune" / "base" / f"{t['member']}_fixt0_{i:05d}"
        (trial_dir / "tb").mkdir(parents=True, exist_ok=True)
        rungs, epoch = [], 0
        for s in ladder:
            margin = margin0 - (1.5 * (s - 0.3) if s > 0.3 else 0.0) * (0.5 if t["variant"] == "C-CNN" else 1.0)
            pv = _probs(rng, y_val, margin, shared_val)
            pt = _probs(rng, y_test, margin, shared_test)
            sec = _seconds(t, s)
            pred.write_predictions(
                pred.prediction_path(root, t["member"], s),
                parts=[{"split": "val", "probs": pv, "labels": y_val, "indices": val_idx},
                       {"split": "test", "probs": pt, "labels": y_test, "indices": test_idx}],
                model=tr["model"], member=t["member"], variant=t["group"], sparsity=s * 0.98, target_sparsity=s,
                epoch=epoch, metadata={"config": tr, "seed": 0, "git_revision": "fixture", "versions": {}},
            )
            total = 16 * 9000 if tr["conv"] == "winograd_relu" else 9 * 9000  # Winograd: 16/9 the weights
            total += 50_000  # stem, 1x1 convs, classifier, batch norms: never pruned
            nonzero = total - int(s * 0.98 * (total - 50_000))
            rungs.append({"target_sparsity": s, "sparsity": s * 0.98, "model_sparsity": 1 - nonzero / total,
                          "nonzero_weights": nonzero, "total_weights": total,
                          "val_accuracy": float((pv.argmax(1) == y_val).mean()),
                          "test_accuracy": float((pt.argmax(1) == y_test).mean()), "mean_epoch_seconds": sec})
            epoch += 1
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            from esdbs_ray.run_record import TB_SCALARS

            w = SummaryWriter(str(trial_dir / "tb"))
            dbs = tr["schedule"] == "dbs"
            for e, r in enumerate(rungs):
                rec = {"train_loss": 1.0 / (e + 1), "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.2 / (e + 1),
                       "val_accuracy": r["val_accuracy"], "lr": 0.02 * (2 ** e if dbs else 1),
                       "momentum": 0.9 + (0.02 * e if dbs else 0.0),
                       "batch_size": (128 * 2 ** e if dbs else (t["batch_size"] or 128)), "noise_scale": 1.0,
                       "epoch_seconds": r["mean_epoch_seconds"], "samples_per_second": 1000.0,
                       "sparsity": r["sparsity"], "model_sparsity": r["model_sparsity"],
                       "nonzero_weights": r["nonzero_weights"]}
                for tag, key in TB_SCALARS.items():
                    w.add_scalar(tag, rec[key], e)
                w.add_scalar("schedule/phase", 1 if dbs else 4, e)
                step = int(round(r["target_sparsity"] * 100))
                w.add_scalar("rung/val_accuracy", r["val_accuracy"], step)
                w.add_scalar("rung/test_accuracy", r["test_accuracy"], step)
                w.add_scalar("rung/sparsity", r["sparsity"], step)
            if tr["conv"] == "winograd_relu":
                w.add_image("winograd_kernels", image, len(rungs) - 1, dataformats="HWC")
            w.close()
        # Tune's progress.csv: one row per epoch (a subset of its columns)
        dbs = tr["schedule"] == "dbs"
        lines = ["epoch,phase,lr,momentum,batch_size,epoch_seconds,val_accuracy,target_sparsity"]
        for e, r in enumerate(rungs):
            lines.append(f"{e},{'lr' if dbs else 'fixed'},{0.02 * (2 ** e if dbs else 1)},{0.9 + (0.02 * e if dbs else 0)},"
                         f"{128 * 2 ** e if dbs else (t['batch_size'] or 128)},{r['mean_epoch_seconds']},"
                         f"{r['val_accuracy']},{r['target_sparsity']}")
        (trial_dir / "progress.csv").write_text("\n".join(lines) + "\n")
        m = {"member": t["member"], "variant": t["variant"], "group": t["group"], "batch_size": t["batch_size"],
             "model": tr["model"], "val_accuracy": rungs[-1]["val_accuracy"], "test_accuracy": rungs[-1]["test_accuracy"],
             "sparsity": rungs[-1]["sparsity"], "epochs": len(rungs),
             "train_seconds": sum(r["mean_epoch_seconds"] for r in rungs), "steps": 100 * len(rungs),
             "mean_epoch_seconds": sum(r["mean_epoch_seconds"] for r in rungs) / len(rungs),
             "rungs": rungs, "trial_path": str(trial_dir), "config": tr}
        (root / "members").mkdir(exist_ok=True)
        history = [{"epoch": e, "lr": 0.02 * (2 ** e if dbs else 1), "momentum": 0.9,
                    "batch_size": 128 * 2 ** e if dbs else (t["batch_size"] or 128),
                    "decision": (f"lr x2 -> {0.02 * 2 ** e:g}, B {128 * 2 ** e}" if dbs and e else "")}
                   for e in range(len(rungs))]
        # the trainer's record also carries the schedule's Bmax (DBS) and the split sizes
        record = {**m, "history": history, "bmax": 1024 if dbs else None, "val_size": n_val}
        (root / "members" / f"{t['member']}.json").write_text(json.dumps(record, indent=2))
        members.append(m)

    groups = cfg.groups()
    ensembles = {}
    for g in groups:
        names = [t["member"] for t in trials if t["group"] == g["group"]]
        if len(names) < 2:
            continue
        s = cfg.stack.sparsity if g["group"] in cfg.variants else cfg.batch_sweep.sparsity
        fname = "stacking.json" if len(groups) == 1 else f"stacking-{_slug(g['group'])}.json"
        st = stack_experiment(root, sparsity=s, variant=g["group"], members=names,
                              methods=("nll_optimal", "equal", "best_single", "caruana"), output=root / fname)
        m = st["methods"][st["chosen"]]
        ensembles[g["group"]] = {"method": st["chosen"], "weights": m["weights"], "val_accuracy": m["val_accuracy"],
                                 "test_accuracy": m["test_accuracy"], "val_nll": m["val_nll"], "test_nll": m["test_nll"],
                                 "sparsity": s}
    summary = {
        "name": cfg.name, "experiment_dir": str(root),
        "dataset": f"fashion-mnist: train {N_TRAIN - n_val}, val {n_val}, test {n_test}, 10 classes, 1x28x28",
        "variants": list(cfg.variants), "groups": [g["group"] for g in groups], "members": sorted(members, key=lambda m: m["member"]),
        "ensembles": ensembles, "base_wall_seconds": 123.0, "wall_seconds": 130.0, "dbs_search": None, "config": cfgd,
        "provenance": {"git_revision": "fixture0", "versions": {"torch": "x", "ray": "y", "python": "3"},
                       "host": "fixture-host",
                       "device": {"cpu": "Fixture CPU", "cpu_count": 2, "torch_threads": 1}},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"config": cfg, "trials": trials, "summary": summary}
