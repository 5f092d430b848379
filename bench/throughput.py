"""Benchmark: training throughput (samples/s) of every registry model, spatial vs Winograd-ReLU conv.

What it measures: for each model of ``esdbs_ray.models.list_models()`` (resnet50 only with
``--include-resnet50``: torchvision's full-width network, 3x64x64 inputs, very slow on CPU) and each
batch size B in {64, 128, 256, 512, 1024}, the samples/s of the trainer's training step (gather +
normalise a uint8 batch as ``BatchIterator`` does, forward, cross-entropy, zero_grad, backward, SGD
momentum step) with spatial convolutions and after ``esdbs_ray.winograd.to_winograd_relu``.  Inputs
have the Fashion-MNIST geometry 1x28x28 (``--geometry cifar``: 3x32x32), random pixels (compute cost
does not depend on pixel values), models at ``--width`` 0.25 by default (the CPU smoke width; 1.0 =
published widths).  After warm-up steps, the spatial and the Winograd model of the same (model, B)
take timed steps in alternation (the order flips every round), so a change in machine load hits both
alike; samples/s = B / median step time.  The trainer does not call
``winograd.tune_cpu_allocator()`` and neither does this benchmark unless ``--malloc-tuning``.

Hardware: whatever it runs on, recorded in the JSON; the figures below are from a shared 2-core
Intel Xeon VM (torch 2.14.1, ``torch.set_num_threads(2)``) with other developers' jobs running
(load average 2-12 during the runs), so absolute samples/s are noisy; the winograd/spatial ratios are
measured side by side.

    .venv/bin/python bench/throughput.py --quick   # alexnet + resnet32, B 64/256 (~30 s idle, 3 min loaded)
    .venv/bin/python bench/throughput.py           # all models, 5 batch sizes (~11 min at load 5)
    .venv/bin/python bench/throughput.py --geometry cifar --include-resnet50 --width 0.5

Result (see ``bench/results/throughput.json``; filled in from the latest full run):
Latest full run (2026-11-21, ``python bench/throughput.py``: width 0.25, 1x28x28, threads 2, 1 warm-up
+ 2 timed steps per cell; 10.6 min wall at load average ~5-6 from other users' jobs):

    model           conv              B=64   B=128  B=256  B=512  B=1024
    alexnet         spatial           57.4   112.5  203.3  346.0  538.4
    alexnet         winograd_relu     26.0   49.8   90.9   146.4  194.5
    alexnet         winograd/spatial  x0.45  x0.44  x0.45  x0.42  x0.36
    all_cnn_c       spatial           50.4   96.2   167.5  250.9  251.0
    all_cnn_c       winograd_relu     25.7   47.7   78.6   117.4  121.1
    all_cnn_c       winograd/spatial  x0.51  x0.50  x0.47  x0.47  x0.48
    convpool_cnn_c  spatial           48.8   90.2   169.6  263.4  196.7
    convpool_cnn_c  winograd_relu     19.8   35.5   81.4   80.2   77.6
    convpool_cnn_c  winograd/spatial  x0.41  x0.39  x0.48  x0.30  x0.39
    resnet32        spatial           739.8  782.6  84.0   102.4  160.5
    resnet32        winograd_relu     279.8  241.8  24.6   34.6   50.0
    resnet32        winograd/spatial  x0.38  x0.31  x0.29  x0.34  x0.31
    vgg16           spatial           29.6   62.5   116.4  174.3  285.6
    vgg16           winograd_relu     13.5   27.6   41.7   72.6   92.5
    vgg16           winograd/spatial  x0.46  x0.44  x0.36  x0.42  x0.32

Winograd-ReLU training runs at 0.29-0.51x the spatial samples/s (median 0.42x) on this CPU -- a
stable ratio (an earlier run at load ~10 gave median 0.46x).  Absolute samples/s are dominated by
the machine's load, not by the model: samples/s grows ~linearly with B, i.e. a near-constant ~1 s
per step, and resnet32's B=64/128 cells (740-780/s) ran in a quiet moment.  Thread check (alexnet
spatial B=128, steps alternating in one process): 1 thread 996.7/s vs 2 threads 112.7/s -- on this
shared 2-vCPU VM, 2 OpenMP threads are ~9x *slower* than 1 (each parallel region waits for a
descheduled thread); use ``--threads 1`` for figures that reflect compute.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    Timer, format_table, hardware_line, load_average, median, provenance_block, write_result,
)
from esdbs_ray.models import create_model, list_models  # noqa: E402
from esdbs_ray.winograd import to_winograd_relu, tune_cpu_allocator, winograd_layers  # noqa: E402

BATCHES = (64, 128, 256, 512, 1024)
GEOMETRY = {"fmnist": (1, 28), "cifar": (3, 32)}
CONVS = ("spatial", "winograd_relu")


def build(name: str, conv: str, in_ch: int, size: int, width: float, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=in_ch, image_size=size, width=width)
    if conv == "winograd_relu":
        to_winograd_relu(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


class StepRunner:
    """One model's training step on batches drawn from a uint8 pool, exactly as the trainer runs it."""

    def __init__(self, model, opt, pool_x, pool_y, batch: int, seed: int = 0):
        self.model, self.opt, self.pool_x, self.pool_y, self.batch = model, opt, pool_x, pool_y, batch
        self.gen = torch.Generator().manual_seed(seed)
        c = pool_x.shape[1]
        self.scale = torch.full((1, c, 1, 1), 1.0 / (255.0 * 0.3))
        self.shift = torch.full((1, c, 1, 1), -0.3 / 0.3)

    def step(self) -> float:
        t = time.perf_counter()
        idx = torch.randint(0, len(self.pool_y), (self.batch,), generator=self.gen)
        x = torch.addcmul(self.shift, self.pool_x[idx].float(), self.scale)
        y = self.pool_y[idx]
        logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        loss.item()  # the trainer reads the loss back every epoch; here: make sure the step finished
        return time.perf_counter() - t


def bench_model_batch(name: str, batch: int, args, in_ch: int, size: int, width: float) -> list[dict]:
    torch.manual_seed(1)
    pool_x = torch.randint(0, 256, (max(2048, batch), in_ch, size, size), dtype=torch.uint8)
    pool_y = torch.randint(0, 10, (len(pool_x),))
    runners, info = {}, {}
    for conv in CONVS:
        model, opt = build(name, conv, in_ch, size, width)
        runners[conv] = StepRunner(model, opt, pool_x, pool_y, batch)
        info[conv] = {"parameters": sum(p.numel() for p in model.parameters()),
                      "winograd_layers": len(winograd_layers(model))}
    slow = name == "resnet50"
    warmup = 1 if (slow or args.quick or batch >= 128) else 2
    rounds = 1 if slow else max(args.min_steps, math.ceil(args.min_samples / batch))
    load0 = load_average()
    with Timer() as wall:
        for _ in range(warmup):
            for conv in CONVS:
                runners[conv].step()
        times = {conv: [] for conv in CONVS}
        for r in range(rounds):
            for conv in (CONVS if r % 2 == 0 else CONVS[::-1]):
                times[conv].append(runners[conv].step())
    rows = []
    for conv in CONVS:
        med = median(times[conv])
        rows.append({"model": name, "batch": batch, "conv": conv, "width": width if name != "resnet50" else 1.0,
                     "input": f"{in_ch}x{size}x{size}", "warmup_steps": warmup, "timed_steps": rounds,
                     "median_step_s": med, "min_step_s": min(times[conv]), "step_s": times[conv],
                     "samples_per_s": batch / med, **info[conv], "load_average": load0})
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    for r in rows:
        r["winograd_over_spatial"] = ratio
    print(f"{name:15s} B {batch:5d} | spatial {rows[0]['samples_per_s']:8.1f}/s  winograd_relu "
          f"{rows[1]['samples_per_s']:8.1f}/s  (x{ratio:.2f})  [{rounds} timed steps each, {wall.seconds:.0f}s, "
          f"load {load0[0] if load0 else '?'}]", flush=True)
    return rows


def thread_check(args, in_ch: int, size: int, batch: int = 128, rounds: int = 3) -> dict:
    """alexnet, spatial, B=128: torch threads 1 vs ``args.threads``, steps alternating (same process)."""
    model, opt = build("alexnet", "spatial", in_ch, size, args.width)
    torch.manual_seed(1)
    pool_x = torch.randint(0, 256, (2048, in_ch, size, size), dtype=torch.uint8)
    runner = StepRunner(model, opt, pool_x, torch.randint(0, 10, (2048,)), batch)
    settings = sorted({1, args.threads})
    times = {t: [] for t in settings}
    for r in range(rounds + 1):
        for t in (settings if r % 2 == 0 else settings[::-1]):
            torch.set_num_threads(t)
            dt = runner.step()
            if r:  # round 0 is warm-up
                times[t].append(dt)
    torch.set_num_threads(args.threads)
    out = {"model": "alexnet", "conv": "spatial", "batch": batch, "timed_steps": rounds,
           "samples_per_s": {str(t): batch / median(v) for t, v in times.items()}, "load_average": load_average()}
    print("thread check (alexnet spatial B=128): " + ", ".join(f"{t} thread(s) {v:.1f}/s" for t, v in
                                                               out["samples_per_s"].items()), flush=True)
    return out


def summarise(rows: list[dict], models: list[str], batches: list[int]) -> dict:
    by = {(r["model"], r["batch"], r["conv"]): r["samples_per_s"] for r in rows}
    table = {}
    for m in models:
        table[m] = {}
        for conv in CONVS:
            vals = {b: by.get((m, b, conv)) for b in batches}
            best_b = max((b for b in batches if vals[b]), key=lambda b: vals[b], default=None)
            table[m][conv] = {"samples_per_s": {str(b): vals[b] for b in batches}, "best_batch": best_b,
                              "best_samples_per_s": vals[best_b] if best_b else None}
        table[m]["winograd_over_spatial"] = {
            str(b): by[(m, b, "winograd_relu")] / by[(m, b, "spatial")] for b in batches
            if (m, b, "spatial") in by and (m, b, "winograd_relu") in by}
    return table


def format_summary(table: dict, batches: list[int]) -> str:
    rows = []
    for m, t in table.items():
        for conv in CONVS:
            row = {"model": m, "conv": conv}
            row.update({f"B{b}": t[conv]["samples_per_s"][str(b)] for b in batches})
            rows.append(row)
        row = {"model": m, "conv": "winograd/spatial"}
        row.update({f"B{b}": (f"x{t['winograd_over_spatial'][str(b)]:.2f}" if str(b) in t["winograd_over_spatial"]
                              else None) for b in batches})
        rows.append(row)
    cols = [("model", "model", ""), ("conv", "conv", "")] + [(f"B={b}", f"B{b}", ".1f") for b in batches]
    return format_table(rows, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="alexnet + resnet32 at B 64/256, 2 timed steps")
    ap.add_argument("--models", nargs="*", default=None, help="default: every registry model except resnet50")
    ap.add_argument("--include-resnet50", action="store_true", help="add resnet50 (3x64x64, width 1.0, 1 timed step)")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--geometry", choices=sorted(GEOMETRY), default="fmnist")
    ap.add_argument("--width", type=float, default=0.25, help="channel multiplier (default 0.25 for CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-samples", type=int, default=None, help="timed samples per (model, B, conv) at least")
    ap.add_argument("--min-steps", type=int, default=2, help="timed steps per (model, B, conv) at least")
    ap.add_argument("--malloc-tuning", action="store_true", help="call winograd.tune_cpu_allocator() first")
    ap.add_argument("--out", default=None, help="default bench/results/throughput.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tuned = tune_cpu_allocator() if args.malloc_tuning else False
    if args.min_samples is None:
        args.min_samples = 128
    models = args.models or ([m for m in ("alexnet", "resnet32")] if args.quick
                             else [m for m in list_models() if m != "resnet50"])
    if args.include_resnet50 and "resnet50" not in models:
        models.append("resnet50")
    batches = args.batches or ([64, 256] if args.quick else list(BATCHES))
    in_ch, size = GEOMETRY[args.geometry]
    config = {"models": models, "batches": batches, "geometry": args.geometry, "input": f"{in_ch}x{size}x{size}",
              "width": args.width, "threads": args.threads, "min_samples": args.min_samples,
              "min_steps": args.min_steps, "malloc_tuned": tuned, "quick": args.quick,
              "optimizer": "SGD momentum 0.9", "resnet50": "3x64x64, width 1.0, 1 warm-up + 1 timed step"}
    print(f"throughput: {hardware_line()}\n  models {models}, B {batches}, input {in_ch}x{size}x{size}, "
          f"width {args.width}, threads {args.threads}", flush=True)

    load_start = load_average()
    t0 = time.perf_counter()
    threads_check = None if args.quick else thread_check(args, in_ch, size)
    rows = []
    for name in models:
        for b in batches:
            if name == "resnet50":
                rows += bench_model_batch(name, b, args, 3, 64, 1.0)
            else:
                rows += bench_model_batch(name, b, args, in_ch, size, args.width)
    table = summarise(rows, models, batches)
    print()
    print(format_summary(table, batches))
    doc = {
        "benchmark": "throughput",
        "what": "training samples/s (trainer's step: gather+normalise, fwd, CE, backward, SGD) per model, batch "
                "size and conv; spatial and winograd_relu steps interleaved; samples/s = B / median step time",
        "wall_s": time.perf_counter() - t0,
        "provenance": provenance_block({**config, 'load_average_start': load_start}),
        "summary": table,
        "thread_check": threads_check,
        "results": rows,
    }
    path = write_result("throughput", doc, args.out)
    print(f"\nwrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
