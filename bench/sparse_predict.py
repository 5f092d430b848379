"""Pruning that pays in `esdbs predict`: the quick preset's ensemble exported at 0, 30, 70 and 80 %
sparsity, predicting the 10,000 Fashion-MNIST test images, with the sparse Winograd-ReLU kernels
(``$ESDBS_NATIVE_SPARSE=auto``, the default) and their lane chains (``$ESDBS_NATIVE_CHAIN=auto``, the
default: consecutive sparse layers and max-pools in the kernels' lane layout), with the kernels but no
chains (``$ESDBS_NATIVE_CHAIN=off``), and without the kernels (``$ESDBS_NATIVE_SPARSE=off``).  The dense
ensemble also runs forced through the chains (the layers in chains given all-ones masks,
``$ESDBS_NATIVE_SPARSE=on``: they run on the sparse kernels at density 1, the other layers dense): the
chains' saved transposes and pooling passes are not sparsity's, and this says whether a dense network
would gain from them too (``dense_through_chains``, with its accuracy, which must be the dense one's).

Needs an experiment whose trials kept the weights of every rung::

    esdbs run --preset quick --set keep_weights=all --set 'train.sparsity_ladder=[0.3,0.7,0.8]' \\
        --set stack.sparsity=0.8 --out runs/quick-ladder
    python bench/sparse_predict.py runs/quick-ladder [--repeats 3]

For each rung: ``esdbs export --sparsity s`` (no ONNX), then ``Ensemble.predict_proba`` on the test
split, timed (median of ``--repeats`` after a warm-up batch) in the three modes, interleaved
(the machine is shared); the ensemble's accuracy is checked against the experiment's own Parquet
predictions at that rung with the export's weights (the run's numbers, to 1e-4).  Target (issue): the
80 %-pruned ensemble in <= 0.6x the dense ensemble's time.

Writes ``bench/results/sparse_predict.json`` with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, hardware_line, load_average, median, provenance_block, write_result  # noqa: E402

# mode -> ($ESDBS_NATIVE_SPARSE, $ESDBS_NATIVE_CHAIN)
MODES = {"auto": ("auto", "auto"), "no_chain": ("auto", "off"), "off": ("off", "auto")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--rungs", default="0,0.3,0.7,0.8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from esdbs_ray.data import load_dataset
    from esdbs_ray.ensemble import Ensemble
    from esdbs_ray.export import export_experiment
    from esdbs_ray.predictions import prediction_matrix, read_predictions
    from esdbs_ray.winograd import WinogradReLUConv2d
    from esdbs_ray.winograd_chain import LaneChain

    rungs = [float(s) for s in a.rungs.split(",")]
    times = {(s, m): [] for s in rungs for m in MODES}
    forced_accuracy = None
    test = load_dataset("fashion-mnist", seed=0).test
    order = np.argsort(test.indices)
    images, labels = test.images[order], test.labels[order]
    table = read_predictions(Path(a.experiment) / "predictions")
    print(hardware_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ensembles = {}
        for s in rungs:
            manifest = export_experiment(a.experiment, Path(tmp) / f"s{s:g}", sparsity=s, onnx=False)
            ensembles[s] = (Ensemble.load(Path(tmp) / f"s{s:g}", device="cpu", tune_allocator=True), manifest)
        forced = None
        if rungs[0] == 0:  # the dense ensemble, its chains' layers with all-ones masks: what chains give it
            forced = copy.deepcopy(ensembles[0][0])
            for model in forced.models.values():
                for chain in (m for m in model.modules() if isinstance(m, LaneChain)):
                    for layer in chain.stages:
                        if isinstance(layer, WinogradReLUConv2d):
                            layer.register_buffer("weight_mask", torch.ones_like(layer.weight))
            times[(0.0, "dense_through_chains")] = []
        for rep in range(a.repeats + 1):  # the first round is the warm-up
            if forced is not None:
                os.environ["ESDBS_NATIVE_SPARSE"], os.environ["ESDBS_NATIVE_CHAIN"] = "on", "auto"
                t0 = time.perf_counter()
                probs = forced.predict_proba(images, batch_size=a.batch_size)
                if rep:
                    times[(0.0, "dense_through_chains")].append(time.perf_counter() - t0)
                    forced_accuracy = float(np.mean(probs.argmax(1) == labels))
            for s in rungs:
                for mode in MODES:
                    os.environ["ESDBS_NATIVE_SPARSE"], os.environ["ESDBS_NATIVE_CHAIN"] = MODES[mode]
                    ens = ensembles[s][0]
                    t0 = time.perf_counter()
                    probs = ens.predict_proba(images, batch_size=a.batch_size)
                    if rep:
                        times[(s, mode)].append(time.perf_counter() - t0)
                    if rep == 1 and mode == "auto":
                        # the run's own numbers: its members' Parquet probabilities with the export's weights
                        names = ens.members
                        P, y, _ = prediction_matrix(table, "test", names, s)
                        want = float(np.mean(np.tensordot(ens.weights, P.astype(np.float64), axes=1).argmax(1) == y))
                        got = float(np.mean(probs.argmax(1) == labels))
                        rows.append({"rung": s, "accuracy": got, "run_accuracy": want})
            print(f"  round {rep}: " + ", ".join(f"{s:g}/{m} {times[(s, m)][-1]:.2f}s" for s in rungs for m in MODES
                                                 if times[(s, m)]) + f" (load {load_average()})", flush=True)
        os.environ.pop("ESDBS_NATIVE_SPARSE", None)
        os.environ.pop("ESDBS_NATIVE_CHAIN", None)
    dense = median(times[(rungs[0], "auto")])
    for r in rows:
        s = r["rung"]
        r.update(seconds=median(times[(s, "auto")]), seconds_no_chain=median(times[(s, "no_chain")]),
                 seconds_kernels_off=median(times[(s, "off")]))
        r.update(vs_dense=r["seconds"] / dense, vs_dense_no_chain=r["seconds_no_chain"] / dense,
                 vs_off=r["seconds"] / r["seconds_kernels_off"], ms_per_image=1000 * r["seconds"] / len(labels))
    print(format_table(rows, [("rung", "rung", "g"), ("s", "seconds", ".2f"), ("x dense", "vs_dense", ".3f"),
                              ("no chains", "vs_dense_no_chain", ".3f"),
                              ("x kernels off", "vs_off", ".3f"), ("accuracy", "accuracy", ".4f"),
                              ("run's", "run_accuracy", ".4f")]))
    last = rows[-1]
    print(f"{100 * last['rung']:.0f} %: {last['vs_dense']:.3f}x the dense ensemble's time (target <= 0.6)")
    doc = {"provenance": provenance_block(vars(a)), "images": len(labels), "rows": rows,
           "target": {"rung": last["rung"], "vs_dense": last["vs_dense"], "goal": 0.6, "met": last["vs_dense"] <= 0.6},
           "same_accuracy": all(abs(r["accuracy"] - r["run_accuracy"]) <= 1e-4 for r in rows)}
    if times.get((0.0, "dense_through_chains")):
        forced_s = median(times[(0.0, "dense_through_chains")])
        doc["dense_through_chains"] = {"seconds": forced_s, "vs_dense": forced_s / dense, "accuracy": forced_accuracy,
                                       "accuracy_dense": rows[0]["accuracy"], "last_rung_vs_it": last["seconds"] / forced_s}
        print(f"dense ensemble through the sparse kernels' chains (all-ones masks): {forced_s / dense:.3f}x its "
              f"time on the dense layers; the {100 * last['rung']:.0f} % rung takes "
              f"{last['seconds'] / forced_s:.3f}x that")
    print(f"-> {write_result('sparse_predict', doc, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
