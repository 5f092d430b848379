"""Time every stacking method: K=3 members, N=10,000 validation samples, 10 classes (synthetic, seeded).

    .venv/bin/python bench/stacking.py [--repeats 5] [--tune-samples 32] [--no-tune]

Two synthetic regimes: "cnn-like" (members around 88-93 % accuracy, mostly agreeing, like the paper's
CIFAR-10 / Fashion-MNIST members) and "hard" (members around 35-65 %, most samples contested: the
worst case for the accuracy search).  The direct methods are timed in-process (best and median of
``--repeats``); the Ray Tune search is timed separately (Ray start-up reported apart from the search).
Writes ``bench/results/stacking.json`` and prints a table.  Target (reported, not asserted): all
direct methods together < 1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esdbs_ray import stacking as S  # noqa: E402
from esdbs_ray.stacking_tune import tune_accuracy_search  # noqa: E402

DIRECT = {
    "nll_optimal": lambda P, y: S.nll_optimal(P, y),
    "accuracy_search": lambda P, y: S.accuracy_search(P, y, seed=0),
    "equal": lambda P, y: S.equal_weights(P),
    "best_single": lambda P, y: S.best_single(P, y),
    "caruana": lambda P, y: S.caruana_greedy(P, y, rounds=50, metric="nll"),
    "caruana_accuracy": lambda P, y: S.caruana_greedy(P, y, rounds=50, metric="accuracy"),
}
DEFAULT_SET = ("nll_optimal", "accuracy_search", "equal", "best_single", "caruana")


def synthetic(K=3, N=10_000, C=10, seed=0, regime="cnn-like"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    if regime == "cnn-like":
        strengths, temps, rho, noise = [4.6, 5.0, 5.4], [0.5, 0.8, 1.2], 0.5, 1.5
    else:
        strengths, temps, rho, noise = [1.0, 1.8, 2.6], [0.5, 1.0, 2.0], 0.2, 1.5
    shared = rng.normal(size=(N, C))
    P = []
    for k in range(K):
        z = (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=(N, C))) * noise
        z[np.arange(N), y] += strengths[k % 3]
        z /= temps[k % 3]
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        P.append((p / p.sum(1, keepdims=True)).astype(np.float32))
    return np.stack(P), y


def time_direct(P, y, repeats):
    out = {}
    for name, fn in DIRECT.items():
        fn(P, y)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            w = fn(P, y)
            ts.append(time.perf_counter() - t0)
        ev = S.evaluate(w, P, y)
        out[name] = {"best_s": min(ts), "median_s": statistics.median(ts), "val_accuracy": ev["accuracy"],
                     "val_nll": ev["nll"], "weights": [round(float(x), 6) for x in w]}
    return out


def time_tune(P, y, samples, seed=0):
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            w, info = tune_accuracy_search(P, y, num_samples=samples, seed=seed, storage_path=d, return_info=True)
            t_search = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"num_samples": samples, "ray_init_s": t_init, "search_s": t_search, "per_trial_s": t_search / samples,
            "val_accuracy": info["val_accuracy"], "val_nll": info["val_nll"],
            "weights": [round(float(x), 6) for x in w]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--tune-samples", type=int, default=32)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stacking.json"))
    args = ap.parse_args(argv)

    import ray

    results = {
        "benchmark": "stacking",
        "K": 3, "N_val": args.n, "classes": args.classes, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "ray": ray.__version__},
        "target": "all direct methods (default set) together < 1 s (reported, not asserted)",
        "regimes": {},
    }
    for regime in ("cnn-like", "hard"):
        P, y = synthetic(N=args.n, C=args.classes, regime=regime)
        members = [S.evaluate(np.eye(3)[k], P, y)["accuracy"] for k in range(3)]
        oracle = S._AccuracyOracle(P, y)
        direct = time_direct(P, y, args.repeats)
        total_default = sum(direct[m]["best_s"] for m in DEFAULT_SET)
        total_all = sum(v["best_s"] for v in direct.values())
        results["regimes"][regime] = {
            "member_val_accuracy": members, "contested_samples": oracle.n_contested, "contested_pairs": oracle.n_pairs,
            "direct": direct, "direct_default_total_s": total_default, "direct_all_total_s": total_all,
            "meets_target": total_default < 1.0,
        }
        print(f"\n== {regime}: K=3, N={args.n}, C={args.classes}; member accuracies "
              f"{', '.join(f'{a:.4f}' for a in members)}; contested samples {oracle.n_contested}")
        print(f"{'method':<20}{'best ms':>10}{'median ms':>11}{'val acc':>9}{'val nll':>9}  weights")
        for name, r in direct.items():
            print(f"{name:<20}{r['best_s'] * 1e3:>10.2f}{r['median_s'] * 1e3:>11.2f}{r['val_accuracy']:>9.4f}"
                  f"{r['val_nll']:>9.4f}  {r['weights']}")
        print(f"default set total {total_default * 1e3:.1f} ms (target < 1000 ms); all direct {total_all * 1e3:.1f} ms")
    if not args.no_tune:
        P, y = synthetic(N=args.n, C=args.classes, regime="cnn-like")
        t = time_tune(P, y, args.tune_samples)
        results["tune_accuracy_search"] = t
        print(f"\n== Ray Tune search (cnn-like), {t['num_samples']} trials on {min(2, os.cpu_count() or 1)} CPUs: "
              f"ray.init {t['ray_init_s']:.1f} s, search {t['search_s']:.1f} s ({t['per_trial_s']:.2f} s/trial), "
              f"val acc {t['val_accuracy']:.4f}, nll {t['val_nll']:.4f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
