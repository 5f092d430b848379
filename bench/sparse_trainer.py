"""Pruning that pays in the trainer: an SWR member's epoch time at each rung of a 20-80 % ladder
against its dense epoch, with the sparse Winograd-ReLU kernels (``$ESDBS_NATIVE_SPARSE=auto``, what
runs by default) and without them (``off``: every rung multiplies the dense layer's products).

Two runs of the same config (fixed batch, so every epoch does the same work but for the products)
trained interleaved epoch by epoch -- each resumes from its own checkpoint -- so that the machine's
load drifts hit both alike; a rung's figure is the median of its epochs' training seconds (the
trainer's ``epoch_seconds``: forward, backward and optimizer, no evaluation), against the median of
both runs' dense epochs (three each, after a warm-up one).  Target (issue): the
80 % rung's epoch <= 0.7x the dense epoch, with the sparse kernels.

    python bench/sparse_trainer.py                   # AlexNet at width 0.5, 12,000 images, ~7 min on 2 cores
    python bench/sparse_trainer.py --quick           # width 0.25, 3,000 images, 20/50/80 %

Writes ``bench/results/sparse_trainer.json`` (``sparse_trainer_quick.json`` with ``--quick``, so that the
two sizes' figures stand side by side) with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SilentHooks, format_table, hardware_line, load_average, median, provenance_block, write_result  # noqa: E402

from esdbs_ray.config import TrainConfig  # noqa: E402
from esdbs_ray.data import load_dataset  # noqa: E402
from esdbs_ray.train import train  # noqa: E402

MODES = ("auto", "off")  # $ESDBS_NATIVE_SPARSE: the sparse kernels where they pay / never


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--subset", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=4, help="dense epochs (the first is warm-up, not timed)")
    ap.add_argument("--ladder", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.width, a.subset, a.ladder, a.retrain_epochs = 0.25, 3000, "0.2,0.5,0.8", 1
    ladder = [float(x) for x in a.ladder.split(",")]
    cfg = TrainConfig(dataset="fashion-mnist", subset=a.subset, test_subset=1000, model=a.model, width=a.width,
                      conv="winograd_relu", schedule="fixed", epochs=a.epochs, sparsity_ladder=ladder,
                      retrain_epochs=a.retrain_epochs, dbs={"b0": a.batch, "warmup_frac": 0.0}, threads=a.threads,
                      eval_batch_size=1000, seed=0)
    data = load_dataset(cfg.dataset, subset=cfg.subset, test_subset=cfg.test_subset, seed=cfg.seed)
    print(f"{hardware_line()}\n{a.model} width {a.width}, {len(data.train)} training images, B {a.batch}, "
          f"ladder {ladder}", flush=True)
    hooks = {m: SilentHooks() for m in MODES}
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for e in range(cfg.total_epochs):
            for mode in MODES:
                os.environ["ESDBS_NATIVE_SPARSE"] = mode
                run = Path(tmp) / mode
                last = e == cfg.total_epochs - 1
                out = train(cfg, data, run, hooks=hooks[mode], resume_from=run if e else None,
                            stop_after_epoch=None if last else e)
                r = hooks[mode].records[-1]
                print(f"  epoch {e + 1}/{cfg.total_epochs} {mode:4s} sparsity {r['sparsity']:.2f} "
                      f"{r['epoch_seconds']:6.2f} s (load {load_average()})", flush=True)
                if last:
                    summaries[mode] = out
    os.environ.pop("ESDBS_NATIVE_SPARSE", None)
    # The dense epoch every rung is divided by: both modes' timed dense epochs (the same dense kernels
    # run in both), pooled -- a single epoch carries the machine's drift into every rung's figure.
    dense_epochs = [r["epoch_seconds"] for m in MODES for r in hooks[m].records[1:cfg.epochs]] \
        or [hooks[m].records[0]["epoch_seconds"] for m in MODES]
    dense = median(dense_epochs)
    rows = []
    for mode in MODES:
        recs = hooks[mode].records
        for rung in (0.0, *ladder):
            epochs = [r for r in recs if abs(r["target_sparsity"] - rung) < 1e-9 and r["epoch"] > 0]
            secs = median(r["epoch_seconds"] for r in epochs)
            rows.append({"mode": mode, "rung": rung, "epoch_seconds": secs, "vs_dense_epoch": secs / dense,
                         "epochs": len(epochs)})
    by = {(r["mode"], r["rung"]): r for r in rows}
    for r in rows:
        if r["mode"] == "auto":
            r["vs_off"] = r["epoch_seconds"] / by[("off", r["rung"])]["epoch_seconds"]
    paths = {name: layer for name, layer in (summaries["auto"].winograd_impl or {}).get("layers", {}).items()}
    print(format_table([r for r in rows if r["mode"] == "auto"],
                       [("rung", "rung", "g"), ("s/epoch", "epoch_seconds", ".2f"), ("x dense epoch", "vs_dense_epoch", ".3f"),
                        ("x kernels off", "vs_off", ".3f")]))
    target = by[("auto", ladder[-1])]["vs_dense_epoch"]
    print(f"{100 * ladder[-1]:.0f} % rung: {target:.3f}x the dense epoch (target <= 0.7); layer paths: {paths}")
    doc = {"provenance": provenance_block(vars(a)), "rows": rows, "layers": paths, "dense_epochs": dense_epochs,
           "target": {"rung": ladder[-1], "vs_dense_epoch": target, "goal": 0.7, "met": target <= 0.7},
           "accuracy": {m: {"val": summaries[m].val_accuracy, "test": summaries[m].test_accuracy} for m in MODES}}
    print(f"-> {write_result('sparse_trainer_quick' if a.quick else 'sparse_trainer', doc, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
