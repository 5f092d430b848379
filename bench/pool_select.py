"""Time a pool selection: 200 synthetic candidates x 10,000 validation and 10,000 test images x 10 classes.

    .venv/bin/python bench/pool_select.py [--candidates 200] [--images 10000] [--classes 10] [--repeats 3]
                                          [--front] [--out bench/results/pool_select.json]

The candidates are written as an experiment's Parquet predictions (``predictions.write_predictions``,
one file per candidate, as the trainer writes them), then ``pool.load_pool`` streams them into the
memory-mapped split files and ``pool.select`` fits every method (caruana, nll_topk, equal_topk,
best_single) with its 5-fold cross-validated estimate, k = 5, 50 rounds -- what ``esdbs stack --pool``
does before costs and the front.  Timed: loading once, selection ``--repeats`` times (median and all);
``--front`` also times the front's budget ladder (10 budgets x 3 methods, each with CV) on random costs.
Peak resident memory is recorded beside the size of the mapped probabilities.  Target (reported, not
asserted): selection < 30 s on 2 cores.

Synthetic candidates: like ``tests/test_stacking.synthetic_members`` -- noisy softmax classifiers of
spread strengths and temperatures with partly shared noise -- generated one at a time (seeded).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, provenance_block, write_result  # noqa: E402

from esdbs_ray import predictions as pred  # noqa: E402
from esdbs_ray import pool as PL  # noqa: E402


def _candidate(rng, shared, y, C, strength, temp, rho=0.4):
    z = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=shared.shape) * 1.5
    z[np.arange(y.size), y] += strength
    z = z / temp
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def write_experiment(root: str, m: int, n: int, C: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, 2 * n)
    shared = rng.normal(size=(2 * n, C))
    for j in range(m):
        p = _candidate(rng, shared, y, C, strength=rng.uniform(1.0, 3.5), temp=rng.uniform(0.5, 1.8))
        pred.write_predictions(
            pred.prediction_path(root, f"c{j:03d}", 0.0),
            parts=[dict(split="val", probs=p[:n], labels=y[:n], indices=np.arange(n)),
                   dict(split="test", probs=p[n:], labels=y[n:], indices=np.arange(n))],
            model="alexnet", member=f"c{j:03d}", variant="SC-CNN", sparsity=0.0, target_sparsity=0.0, epoch=1,
            metadata={"seed": seed})


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--images", type=int, default=10_000, help="validation images (and as many test images)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--front", action="store_true", help="also time the front's budget ladder")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = {"candidates": a.candidates, "images": a.images, "classes": a.classes, "repeats": a.repeats,
           "methods": list(PL.POOL_METHODS), "k": 5, "rounds": 50, "cv_folds": 5}
    doc = {"provenance": provenance_block(cfg)}
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        t0 = time.perf_counter()
        write_experiment(tmp, a.candidates, a.images, a.classes)
        doc["write_seconds"] = round(time.perf_counter() - t0, 2)
        rss0 = _rss_gib()
        t0 = time.perf_counter()
        pool = PL.load_pool([tmp], workdir=tmp)
        doc["load_seconds"] = round(time.perf_counter() - t0, 2)
        doc["mapped_gib"] = round((pool.val.nbytes + pool.test.nbytes) / 2**30, 3)
        rng = np.random.default_rng(1)  # random costs: the front's ladder needs some
        costs = {"ms_per_image": rng.uniform(0.05, 0.5, pool.size), "macs": rng.uniform(1e6, 1e7, pool.size)}
        times, loads = [], []
        for _ in range(a.repeats):
            loads.append(load_average())
            t0 = time.perf_counter()
            sel = PL.select(pool, k=5, rounds=50, folds=5, costs=costs)
            times.append(round(time.perf_counter() - t0, 2))
            print(f"selection {times[-1]:.2f} s (load {loads[-1]})", flush=True)
        doc["select_seconds"] = times
        doc["select_seconds_median"] = statistics.median(times)
        doc["load_average_per_repeat"] = loads
        doc["methods"] = {m: {"seconds_full_fit": round(r.seconds, 3), "members": r.size,
                              "val_nll": round(r.val_nll, 5), "cv_nll": round(r.cv_nll, 5),
                              "cv_accuracy": round(r.cv_accuracy, 5), "test_accuracy": round(r.test_accuracy, 5),
                              **{k: v for k, v in r.info.items() if k in ("search", "exact", "best_round", "from")}}
                          for m, r in sel.methods.items()}
        doc["chosen"] = sel.chosen
        if a.front:
            from esdbs_ray.pool_cost import build_front
            from esdbs_ray.stacking import cv_folds_of

            t0 = time.perf_counter()
            rows = build_front(pool, costs, unconstrained=sel.methods, references={}, k=5, rounds=50,
                               folds=cv_folds_of(pool.y_val, 5, 0))
            doc["front_seconds"] = round(time.perf_counter() - t0, 2)
            doc["front_ensembles"] = len(rows)
        doc["peak_rss_gib"] = round(_rss_gib(), 3)
        doc["rss_before_load_gib"] = round(rss0, 3)
        pool.close()
    doc["target"] = {"select_seconds_below": 30, "met": doc["select_seconds_median"] < 30}
    path = write_result("pool_select", doc, a.out)
    print(f"load {doc['load_seconds']} s, select median {doc['select_seconds_median']} s (target < 30 s), "
          f"peak RSS {doc['peak_rss_gib']} GiB for {doc['mapped_gib']} GiB mapped -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
