"""Benchmark: Tune stages with Ray actors reused between trials (``resources.reuse_actors``) against a
fresh process per trial.

What it measures, on a local Ray started on loopback (``num_cpus=2``), the smoke preset's data (540
train / 60 val images), one CPU per trial (two run at once), the Winograd layer's default
implementation ("auto": the native kernels on CPU; before 2026-12-02, compiled per layer shape):

* **dbs_search** -- ``pipeline.run_dbs_search`` (spec section 6): an SWR AlexNet at width 0.125,
  ``--samples`` samples of ``--epochs`` epochs; the searched constants are the same seeded draws in
  every run (``pipeline.dbs_search_points``);
* **base** -- ``pipeline.run_base``: the smoke members (AlexNet, ConvPool-CNN-C, All-CNN-C at width
  0.125) as SWR-CNN and SWR-CNN+DBS, six trials, two at a time;

each with reuse on and off alternately (off first), ``--rounds`` times, in one Ray session.

Figure: wall seconds of each stage call and reused / fresh.  Where the time goes without reuse:
every trial's process imports torch and Ray Tune and loads the layer's kernels again (with the
compiled layer it also traced and compiled its Winograd layers again: inductor's on-disk cache spares
only the code generation).

    .venv/bin/python bench/dbs_search_reuse.py             # both stages, 2 rounds (~1.5 min)
    .venv/bin/python bench/dbs_search_reuse.py --quick     # 4 samples, 1 round

Result (``bench/results/dbs_search_reuse.json``, 2026-12-02, 2-core AMD EPYC VM, torch 2.14.1, Ray
2.60, the native layer):

    stage        fresh s        reused s      reused / fresh
    dbs_search   14.6, 12.2     4.1, 4.5      0.32
    base         13.3, 14.1     6.3, 6.2      0.46

Reuse changes no result: the same six searched constants, and every base trial's validation accuracy
the same to the last digit, in all four runs of each stage.  Before (2026-11-23, 2-core Intel Xeon VM,
the compiled layer): dbs_search 77.2 / 86.1 s fresh, 22.9 / 28.8 s reused (0.32); base 74.4 / 87.6 s
fresh, 46.2 / 51.1 s reused (0.60).
"""
from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported anywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Timer, hardware_line, load_average, provenance_block, write_result  # noqa: E402
from esdbs_ray.config import build_config  # noqa: E402
from esdbs_ray.data import load_dataset  # noqa: E402
from esdbs_ray.layout import ExperimentLayout  # noqa: E402
from esdbs_ray.pipeline import run_base, run_dbs_search  # noqa: E402


def run_stage(stage: str, cfg, layout, data) -> dict:
    if stage == "dbs_search":
        record = run_dbs_search(cfg, layout, data, progress=False)
        return {"best_val_accuracy": record["best_val_accuracy"], "configs": [t["config"] for t in record["trials"]]}
    results = run_base(cfg, layout, data, progress=False)
    return {"val_accuracy": {r.config["member"]: r.metrics.get("val_accuracy") for r in results}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 samples, 1 round")
    ap.add_argument("--stages", nargs="+", choices=("dbs_search", "base"), default=["dbs_search", "base"])
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="default bench/results/dbs_search_reuse.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 4, 1

    import ray

    t_all = time.perf_counter()
    load_start = load_average()
    overrides = {"resources": {"cpus_per_trial": 1}, "variants": ["SWR-CNN", "SWR-CNN+DBS"],
                 "dbs_search": {"model": "alexnet", "num_samples": args.samples, "epochs": args.epochs,
                                "grace_period": args.epochs}}
    base = build_config("smoke", None, overrides)
    data = load_dataset(base.dataset, subset=base.subset, test_subset=base.test_subset, seed=base.seed)
    print(f"dbs_search_reuse: {hardware_line()}\n  {data.describe()}\n  stages {args.stages}: DBS search {args.samples} "
          f"samples x {args.epochs} epochs; base {len(base.trials())} trials; 1 CPU per trial on a 2-CPU Ray", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    runs: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="esdbs-bench-reuse-"))
    try:
        for r in range(args.rounds):
            for stage in args.stages:
                for reuse in (False, True):  # fresh first: inductor's disk cache is warm for both after round 0
                    cfg = build_config("smoke", None, overrides, sets=[f"resources.reuse_actors={str(reuse).lower()}"])
                    load0 = load_average()
                    with Timer() as t:
                        out = run_stage(stage, cfg, ExperimentLayout.at(root / f"{stage}-r{r}-{reuse}"), data)
                    runs.append({"stage": stage, "round": r, "reuse_actors": reuse, "wall_s": t.seconds,
                                 "load_average": load0, **out})
                    print(f"  {stage:10s} round {r} reuse_actors={reuse!s:5}: {t.seconds:6.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    summary = {}
    for stage in args.stages:
        fresh = [x["wall_s"] for x in runs if x["stage"] == stage and not x["reuse_actors"]]
        reused = [x["wall_s"] for x in runs if x["stage"] == stage and x["reuse_actors"]]
        mine = [x for x in runs if x["stage"] == stage]
        key = "configs" if stage == "dbs_search" else "val_accuracy"
        summary[stage] = {"fresh_wall_s": fresh, "reused_wall_s": reused,
                          "reused_over_fresh": statistics.mean(reused) / statistics.mean(fresh),
                          "same_results_in_every_run": all(x[key] == mine[0][key] for x in mine)}
        s = summary[stage]
        print(f"{stage}: reused / fresh wall {s['reused_over_fresh']:.2f} (mean {statistics.mean(reused):.1f} s against "
              f"{statistics.mean(fresh):.1f} s); same {key} in every run: {s['same_results_in_every_run']}")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(preset="smoke", overrides=overrides, dataset=data.describe(),
                  winograd_impl=os.environ.get("ESDBS_WINOGRAD_IMPL", "auto"),
                  ray_init='ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")',
                  load_average_start=load_start)
    doc = {"benchmark": "dbs_search_reuse",
           "what": "wall time of pipeline.run_dbs_search and run_base with Tune reusing trial actors vs a fresh actor per trial",
           "wall_s": time.perf_counter() - t_all, "provenance": provenance_block(config), "summary": summary, "runs": runs}
    path = write_result("dbs_search_reuse", doc, args.out)
    print(f"wrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
