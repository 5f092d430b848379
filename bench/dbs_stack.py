"""Benchmark: a whole stack with DBS vs the same stack at the fixed batch B0, same setup, one run.

What it answers (issue: "DBS that delivers the paper's speed-up at equal accuracy"): does the
SWR-CNN+DBS base stage finish faster than SWR-CNN at B0 = 128 on this machine's accelerator, at what
ensemble accuracy, and did every DBS member actually raise B?  The paper reports 1.55x on
Fashion-MNIST (Table 2: 11 s vs 17 s per epoch on an RTX 2080 Ti).

How: ``esdbs_ray.pipeline.run_pipeline`` runs the same preset twice in one process -- once with
``variants=[SWR-CNN+DBS]`` and once with ``variants=[SWR-CNN]`` (or the pair given by ``--variants``)
-- with the same members, data, epochs, ladder, resources and concurrency (all members of a stack as
parallel Tune trials, e.g. three 1/3-GPU trials), on a fresh local Ray each time.  The order
alternates over ``--repeats`` so neither variant always runs on a warmer machine.  Per run it records
the base stage's wall time (Tune start to last trial end), each member's training seconds, wall
seconds, optimizer steps and batch size per epoch (the B trajectory), the decision the schedule logged
for each change, member and ensemble accuracies; then the speed-up (fixed stage / DBS stage) and the
accuracy gap (DBS ensemble - fixed ensemble, test).

    python bench/dbs_stack.py --quick                           # CPU smoke: tiny subset (~6 min)
    python bench/dbs_stack.py --preset paper-fashion-mnist \\
        --set 'train.sparsity_ladder=[0.2,0.3]'                  # paper scale (a GPU job: ~10 min on an H100)
    python bench/dbs_stack.py ... --fall-noise binomial,observed  # the DBS stack once per fall rule
                                                                  # (train.dbs.fall_noise), one fixed twin

With several ``--fall-noise`` modes the DBS stack runs once per mode (labelled ``SWR-CNN+DBS
[observed]``, ...) beside one fixed-B0 run, and ``verdict`` holds one entry per DBS label.

Before the timed runs a warm-up stack (the DBS variant on 1,000 images, one epoch per phase) fills the
on-disk compile caches every trial process reads (inductor's FX graphs; Triton's kernels on CUDA):
without it the first timed stack pays every Winograd-ReLU layer's compile and the second none (on
2 CPU cores 144 s against 76 s for the same stack).  ``--no-warmup`` skips it.

``--resume`` keeps the runs already in the result file (same preset, overrides, scale, variants,
repeats and modes, else an error says which differs) and runs only the missing ones: a machine whose
commands are cut at 10 minutes runs the paper-scale comparison one stack per call, e.g. on the lent
GPU (``../shared/gpu/README.md``)::

    for i in 1 2 3; do python bench/dbs_stack.py --preset paper-fashion-mnist \\
        --set 'train.sparsity_ladder=[0.2,0.3]' --fall-noise binomial,observed --resume --max-runs 1; done

Measured (``bench/results/dbs_stack_cpu_quick.json``, 2-core Xeon, ``--quick --fall-noise
binomial,observed``, one repeat after the warm-up): the DBS stack 80.8 s against 97.9 s at B0 = 128
(1.21x), B 128 -> Bmax 256 (= N/10 of 2,700 images) in every member, ensemble 82.66 % vs 77.05 %; the two
fall rules decide alike here (one epoch per level: no run noise to measure).  Paper scale on an H100
(last session, before the warm-up existed; the DBS stack ran first and paid the compiles): 335.9 s,
94.39 %, Bmax reached by one member of three.

Targets (reported, not asserted): stage speed-up >= 1.55x, ensemble test accuracy no more than 0.2
points below the fixed-B0 stack, B reaches Bmax in every DBS member.  Results:
``bench/results/dbs_stack.json`` (or ``--result PATH``), with provenance and hardware.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, hardware_line, provenance_block, write_result  # noqa: E402
from esdbs_ray.provenance import git_revision  # noqa: E402


def _member_row(member: dict) -> dict:
    """One member's figures from the trainer's own summary (members/<member>.json holds the same)."""
    hist = member["history"]
    batches = [h["batch_size"] for h in hist]
    return {
        "member": member["member"], "variant": member["variant"], "test_accuracy": member["test_accuracy"],
        "val_accuracy": member["val_accuracy"], "train_seconds": member["train_seconds"],
        "steps": member["steps"], "epochs": len(hist), "batch_sizes": batches, "b_max_reached": max(batches),
        "bmax": member.get("bmax"), "lr": [h["lr"] for h in hist], "momentum": [h["momentum"] for h in hist],
        "decisions": [(h["epoch"], h["decision"]) for h in hist if h.get("decision")],
        "wall_seconds": member.get("wall_seconds"),
    }


def run_stack(preset: str, sets: list[str], variant: str, scale: float | None, workdir: Path,
              num_cpus: int | None, label: str | None = None) -> dict:
    import ray

    from esdbs_ray.config import build_config
    from esdbs_ray.pipeline import run_pipeline

    cfg = build_config(preset, None, None, scale=scale,
                       sets=[*sets, f"variants=[{variant}]", "batch_sweep.batch_sizes=[]"])
    label = label or variant
    out = workdir / "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, str(out), num_cpus=num_cpus, progress=False)
    wall = time.perf_counter() - t0
    ray.shutdown()
    from esdbs_ray.layout import ExperimentLayout

    layout = ExperimentLayout.at(out)
    members = []
    for m in summary["members"]:
        full = json.loads(Path(layout.member(m["member"])).read_text())
        members.append(_member_row(full))
    ens = next(iter(summary["ensembles"].values()), {})
    return {"variant": label, "base_stage_seconds": summary["base_wall_seconds"], "run_seconds": wall,
            "ensemble_test_accuracy": ens.get("test_accuracy"), "ensemble_val_accuracy": ens.get("val_accuracy"),
            "members": members, "summed_member_train_seconds": sum(m["train_seconds"] for m in members),
            "experiment_dir": str(out)}


def _document(config: dict, runs: list[dict], dbs_labels: list[str], fixed_variant: str) -> dict:
    return {"provenance": provenance_block(config), "runs": runs,
            "verdict": {label: _verdict(runs, label, fixed_variant) for label in dbs_labels}}


def _verdict(runs: list[dict], dbs_variant: str, fixed_variant: str) -> dict:
    def mean(variant, key):
        vals = [x[key] for x in runs if x["variant"] == variant and x[key] is not None]
        return sum(vals) / len(vals) if vals else None

    dbs_s, fixed_s = mean(dbs_variant, "base_stage_seconds"), mean(fixed_variant, "base_stage_seconds")
    dbs_acc, fixed_acc = mean(dbs_variant, "ensemble_test_accuracy"), mean(fixed_variant, "ensemble_test_accuracy")
    dbs_sum, fixed_sum = (mean(dbs_variant, "summed_member_train_seconds"),
                          mean(fixed_variant, "summed_member_train_seconds"))
    dbs_members = [m for x in runs if x["variant"] == dbs_variant for m in x["members"]]
    return {
        "stage_speedup": fixed_s / dbs_s if dbs_s and fixed_s else None,
        "summed_member_speedup": fixed_sum / dbs_sum if dbs_sum and fixed_sum else None,
        "ensemble_test_gap_points": None if dbs_acc is None or fixed_acc is None else 100 * (dbs_acc - fixed_acc),
        "every_dbs_member_reached_bmax": all(m["b_max_reached"] >= (m["bmax"] or 10**9) for m in dbs_members)
        if dbs_members else None,
        "every_dbs_member_raised_b": all(m["b_max_reached"] > m["batch_sizes"][0] for m in dbs_members)
        if dbs_members else None,
        "targets": {"stage_speedup": ">= 1.55", "ensemble_test_gap_points": ">= -0.2", "bmax": "every DBS member"},
    }


def _resumed_runs(result: str | None, config: dict) -> list[dict]:
    """The finished runs of an earlier call with the same settings (``--resume``)."""
    from bench.common import RESULTS

    path = Path(result) if result else RESULTS / "dbs_stack.json"
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
        theirs = doc["provenance"]["config"]
        runs = list(doc["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"dbs_stack: --resume: {path} is not a dbs_stack result ({e}); move it or drop --resume")
    for key, mine in config.items():
        if theirs.get(key) != mine:
            raise SystemExit(f"dbs_stack: --resume: {path} has {key}={theirs.get(key)!r}, this call {mine!r}: "
                             "the runs would not compare; use --result for a new file")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-fashion-mnist")
    ap.add_argument("--set", action="append", default=[], help="config override, as for esdbs run (repeatable)")
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--variants", default="SWR-CNN+DBS,SWR-CNN", help="the DBS stack, then its fixed-B0 twin")
    ap.add_argument("--repeats", type=int, default=1, help="run each variant this many times, order alternating")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 3,000 images, width 0.125, 3+1 epochs")
    ap.add_argument("--keep", default=None, help="keep the experiment directories here (default: deleted)")
    ap.add_argument("--result", default=None, help="JSON path (default bench/results/dbs_stack.json)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed warm-up stack that fills the compile caches first")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished runs of the result file (same settings) and run the rest")
    ap.add_argument("--max-runs", type=int, default=None, help="run at most this many stacks now (with --resume)")
    ap.add_argument("--fall-noise", default="binomial",
                    help="comma-separated train.dbs.fall_noise modes; the DBS stack runs once per mode")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.fall_noise.split(",") if m.strip()]
    if not modes or any(m not in ("binomial", "observed") for m in modes) or len(set(modes)) < len(modes):
        ap.error(f"--fall-noise {a.fall_noise!r}: a comma-separated list of distinct binomial, observed")
    sets = list(a.set)
    if a.quick:
        sets = ["subset=3000", "train.width=0.125", "train.epochs=3", "train.sparsity_ladder=[0.3]",
                "train.retrain_epochs=1", "train.dbs.double_every=1", "train.dbs.warmup_frac=0.0",
                "resources.cpus_per_trial=0.66", *sets]
    dbs_variant, fixed_variant = a.variants.split(",")
    # (label, variant, extra sets) per run of one repeat; a single mode keeps the plain variant name
    jobs = [(dbs_variant if len(modes) == 1 else f"{dbs_variant} [{m}]", dbs_variant,
             [f"train.dbs.fall_noise={m}"]) for m in modes] + [(fixed_variant, fixed_variant, [])]
    dbs_labels = [j[0] for j in jobs[:-1]]
    workdir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dbs-stack-"))
    config = {"preset": a.preset, "sets": sets, "scale": a.scale, "variants": [dbs_variant, fixed_variant],
              "repeats": a.repeats, "fall_noise": modes}
    runs: list[dict] = _resumed_runs(a.result, config) if a.resume else []
    done = {(x["repeat"], x["variant"]) for x in runs}
    budget = a.max_runs
    path = None
    warmup_s = None
    try:
        todo = [(r, j[0]) for r in range(a.repeats) for j in jobs if (r, j[0]) not in done]
        if a.warmup and todo and (budget is None or budget > 0):
            print(f"[dbs_stack] warm-up: {dbs_variant} on 1,000 images, untimed", flush=True)
            t0 = time.perf_counter()
            run_stack(a.preset, [*sets, "subset=1000", "test_subset=500", "train.epochs=1", "train.retrain_epochs=1"],
                      dbs_variant, a.scale, workdir / "warmup", a.num_cpus)
            warmup_s = time.perf_counter() - t0
        for r in range(a.repeats):
            for label, variant, extra in (jobs if r % 2 == 0 else jobs[::-1]):
                if (r, label) in done:
                    print(f"[dbs_stack] repeat {r + 1}/{a.repeats}: {label} (kept from the result file)", flush=True)
                    continue
                if budget is not None and budget <= 0:
                    continue
                budget = None if budget is None else budget - 1
                print(f"[dbs_stack] repeat {r + 1}/{a.repeats}: {label}", flush=True)
                # each run carries its own revision and device: with --resume they may come from several calls
                runs.append({"repeat": r, "git_revision": git_revision(), "device": hardware_line(),
                             "after_warmup_seconds": warmup_s, **run_stack(a.preset, [*sets, *extra], variant, a.scale, workdir / f"r{r}",
                                                      a.num_cpus, label=label)})
                # written after every run: a run cut short by a time limit keeps what finished
                path = write_result("dbs_stack", _document(config, runs, dbs_labels, fixed_variant), a.result)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = _document(config, runs, dbs_labels, fixed_variant)
    if path is None:  # nothing ran now (all kept, or --max-runs 0): the file still gets today's verdict
        path = write_result("dbs_stack", doc, a.result)
    verdict = doc["verdict"]
    rows = [{"variant": x["variant"], "repeat": x["repeat"], "stage s": x["base_stage_seconds"],
             "sum member s": x["summed_member_train_seconds"], "ensemble test": x["ensemble_test_accuracy"],
             "members B": "; ".join(f"{m['batch_sizes'][0]}->{m['b_max_reached']}" for m in x["members"]),
             "steps": sum(m["steps"] for m in x["members"])} for x in runs]
    print(hardware_line())
    print(format_table(rows, [("variant", "variant", ""), ("rep", "repeat", "d"), ("stage s", "stage s", ".1f"),
                              ("sum member s", "sum member s", ".1f"), ("ensemble test", "ensemble test", ".4f"),
                              ("B per member", "members B", ""), ("steps", "steps", "d")]))
    print(json.dumps(verdict, indent=2))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
