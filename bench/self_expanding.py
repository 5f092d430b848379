"""Evidence for self-expanding members: each level's architecture trained from scratch, beside the growing run.

What it answers (../shared/spec/self-expanding.md §2.6), for every growing member of an experiment
(``esdbs run --preset self-expanding-fashion-mnist-cpu``):

* **"maintains and improves performance"**: the grown member against (a) its final architecture trained
  from scratch for the same epochs and (b) the seed architecture trained unchanged -- same seed, data,
  epochs, optimizer and schedule;
* **"one run instead of several"**: the one growing run's time against the summed time of training
  every level's architecture separately (the seed network, each intermediate one, the final one).

How: the member's own trial config (``members/<member>.json``) through the trainer
(``esdbs_ray.train.train``), in worker processes of one torch thread each, the data split of the
experiment (its ``config.yaml``).  A level's architecture is the seed ``secnn`` with the member's first
k growth operations replayed, then every layer initialised afresh as the registry initialises ``secnn``
(He-normal convs, BN at 1 / 0, PyTorch's linear default; a residual unit's alpha at 0, as the unit is
defined), and trained without growth; level 0 is the seed network exactly as the growing run started
it.  The growing run itself is trained again here, so that both sides of the time comparison run in
the same processes at the same time: the jobs of a member are queued together (the growing run first,
then the final, the seed and the intermediate architectures), and two workers take them from one
queue, so a growing run always trains beside that member's from-scratch runs (interleaved: the shared
machine's load falls on both sides).  The rerun must grow as the experiment's trial did (the trainer
is deterministic on CPU at a fixed thread count); the record says whether it did.  Times: wall seconds
of each ``train`` call (checks, level evaluations and checkpoints included), its process CPU seconds,
and the trainer's training-loop seconds.

    python bench/self_expanding.py runs/se                 # writes runs/se/self_expanding_baselines.json
    python bench/self_expanding.py runs/se --search runs/se-search   # also copies its expansion_search.*
    esdbs report runs/se --out analysis/results/self-expanding-fashion-mnist

Results: ``EXPERIMENT/self_expanding_baselines.json`` (read by ``esdbs report``'s self-expanding
section, ``esdbs_ray/analysis/self_expanding.py``), with provenance and the load averages at every
job's start and end.  Measured figures: ``analysis/results/self-expanding-fashion-mnist/README.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, load_average, provenance_block  # noqa: E402

RESULT = "self_expanding_baselines.json"
_DATA = None  # each worker's dataset, loaded once


def _init_worker(pipeline: dict, threads: int) -> None:
    import torch

    from esdbs_ray.config import PipelineConfig
    from esdbs_ray.data import load_configured

    global _DATA
    torch.set_num_threads(threads)
    _DATA = load_configured(PipelineConfig.from_dict(pipeline))


def architecture_of(ops: list[dict], cfg, data):
    """The seed network with ``ops`` replayed and, when there are any, every layer initialised afresh."""
    import torch
    from torch import nn

    from esdbs_ray.expansion import apply_op
    from esdbs_ray.models import _init_weights
    from esdbs_ray.networks import build_network

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                          image_size=data.image_size, dropout=cfg.dropout, width=cfg.width, conv=cfg.conv,
                          seed=cfg.seed)
    if not ops:
        return model
    for op in ops:
        apply_op(model, op["op"], int(op["block"]), int(op["amount"]))
    torch.manual_seed(cfg.seed)
    _init_weights(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return model


def _job(job: dict) -> dict:
    """One training run in a worker: the growing run, or one level's architecture from scratch."""
    import torch

    import esdbs_ray.train as T
    from esdbs_ray.compression import build_compression
    from esdbs_ray.config import TrainConfig
    from esdbs_ray.expansion import count_params

    from bench.common import SilentHooks

    cfg = TrainConfig.from_dict(job["config"])
    build = T.build_model
    if job["kind"] == "level":
        cfg = cfg.replace(expansion={**cfg.expansion.model_dump(), "enabled": False})

        def build_level(c, data, growth=None):
            model = architecture_of(job["ops"], c, data)
            return model, build_compression(c, model)

        T.build_model = build_level
    hooks = SilentHooks()
    load0 = load_average()
    try:
        with tempfile.TemporaryDirectory(prefix="se-bench-") as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            s = T.train(cfg, _DATA, tmp, hooks=[hooks])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        T.build_model = build
    out = {**{k: job[k] for k in ("kind", "member", "seed", "level")}, "ops": job["ops"],
           "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "train_seconds": round(s.train_seconds, 3),
           "checks": sum(h.expansion_ratio is not None for h in s.history), "val_accuracy": s.val_accuracy, "test_accuracy": s.test_accuracy, "epochs": s.epochs_run,
           "load_average_start": load0, "load_average_end": load_average(), "torch_threads": torch.get_num_threads()}
    if job["kind"] == "growing":
        out["grown_ops"] = (s.expansion or {}).get("ops") or []
        out["levels"] = [{"level": lv.level, "params": lv.params, "epoch": lv.epoch, "val_accuracy": lv.val_accuracy,
                          "test_accuracy": lv.test_accuracy, "train_seconds": lv.train_seconds} for lv in s.levels]
        out["params"] = s.levels[-1].params if s.levels else None
    else:
        out["params"] = count_params(architecture_of(job["ops"], cfg, _DATA))
    what = "growing run" if job["kind"] == "growing" else f"level {job['level']} from scratch"
    print(f"  {job['member']} {what}: "
          f"{wall:.0f} s wall, test {s.test_accuracy:.4f}, {out['params']} params, load {load0}", flush=True)
    return out


def plan(experiment: Path) -> tuple[dict, list[dict], dict]:
    """The experiment's pipeline config, the jobs (queued member by member) and the growing members."""
    import yaml

    pipeline = yaml.safe_load((experiment / "config.yaml").read_text())
    members = {}
    for f in sorted((experiment / "members").glob("*.json")):
        m = json.loads(f.read_text())
        if (m.get("expansion") or {}).get("ops") is not None and m.get("levels"):
            members[m["member"]] = m
    if not members:
        raise SystemExit(f"{experiment}: no growing members (members/*.json with levels)")
    jobs = []
    for name, m in members.items():
        ops = m["expansion"]["ops"]
        base = {"member": name, "seed": m["config"]["seed"], "config": m["config"]}
        last = len(ops)
        jobs.append({**base, "kind": "growing", "level": None, "ops": ops})
        for k in [last, 0, *range(1, last)] if last else [0]:
            jobs.append({**base, "kind": "level", "level": k, "ops": ops[:k]})
    return pipeline, jobs, members


def summarise(results: list[dict], members: dict) -> dict:
    out = {}
    for name, m in members.items():
        rs = [r for r in results if r["member"] == name]
        grow = next(r for r in rs if r["kind"] == "growing")
        levels = sorted((r for r in rs if r["kind"] == "level"), key=lambda r: r["level"])
        summed = {k: round(sum(r[k] for r in levels), 3) for k in ("wall_seconds", "cpu_seconds", "train_seconds")}
        out[name] = {
            "seed": grow["seed"], "ops": m["expansion"]["ops"], "rerun_grew_the_same": grow["grown_ops"] == m["expansion"]["ops"],
            "experiment_levels": [{k: lv.get(k) for k in ("level", "params", "epoch", "val_accuracy", "test_accuracy")}
                                  for lv in m["levels"]],
            "growing": grow, "levels": levels, "levels_summed": summed,
            "time_ratio": {k: round(grow[k] / summed[k], 4) if summed[k] else None for k in summed},
            "final_from_scratch": levels[-1], "seed_architecture": levels[0],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="an experiment directory of esdbs run with growing members")
    ap.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--search", default=None, help="an experiment holding the expansion search to copy in")
    ap.add_argument("--members", nargs="*", default=None, help="only these growing members")
    a = ap.parse_args(argv)
    experiment = Path(a.experiment)
    pipeline, jobs, members = plan(experiment)
    if a.members:
        members = {k: v for k, v in members.items() if k in a.members}
        jobs = [j for j in jobs if j["member"] in members]
    print(f"{len(jobs)} runs of {len(members)} growing member(s), {a.workers} workers x {a.threads} thread(s)", flush=True)
    prov = provenance_block({"experiment": str(experiment), "workers": a.workers, "threads": a.threads})
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(a.workers, initializer=_init_worker, initargs=(pipeline, a.threads), maxtasksperchild=1) as pool:
        results = pool.map(_job, jobs, chunksize=1)
    doc = {"provenance": prov, "experiment": str(experiment), "workers": a.workers, "threads": a.threads,
           "wall_seconds": round(time.perf_counter() - t0, 1), "members": summarise(results, members), "runs": results}
    doc["provenance"]["load_average_end"] = load_average()
    from esdbs_ray import storage

    storage.write_json(experiment / RESULT, doc)
    if a.search:
        for name in ("expansion_search.json", "expansion_search.png"):
            shutil.copy2(Path(a.search) / name, experiment / name)
    rows = []
    for name, s in doc["members"].items():
        rows.append({"member": name, "levels": len(s["levels"]), "grown": s["growing"]["test_accuracy"],
                     "final scratch": s["final_from_scratch"]["test_accuracy"],
                     "seed arch": s["seed_architecture"]["test_accuracy"], "params": s["growing"]["params"],
                     "grow s": s["growing"]["wall_seconds"], "levels s": s["levels_summed"]["wall_seconds"],
                     "ratio": s["time_ratio"]["wall_seconds"], "same growth": str(s["rerun_grew_the_same"])})
    print(format_table(rows, [("member", "member", ""), ("levels", "levels", "d"), ("grown test", "grown", ".4f"),
                              ("final arch scratch", "final scratch", ".4f"), ("seed arch", "seed arch", ".4f"),
                              ("params", "params", "d"), ("growing run s", "grow s", ".0f"),
                              ("levels summed s", "levels s", ".0f"), ("ratio", "ratio", ".3f"),
                              ("rerun grew the same", "same growth", "")]))
    print(f"-> {experiment / RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
