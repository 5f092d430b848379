"""Benchmark: training throughput (samples/s) of every registry model, spatial vs Winograd-ReLU conv,
in a bare training loop and in the trainer, on CPU and (when present) CUDA.

What it measures, per device:

* bare loop: for each model of ``esdbs_ray.models.list_models()`` (resnet50 only with
  ``--include-resnet50``: torchvision's full-width network, 3x64x64 inputs, very slow on CPU) and each
  batch size B in {64, 128, 256, 512, 1024}, the samples/s of a training step as the trainer runs it
  (gather + normalise a uint8 batch as ``BatchIterator`` does, forward, cross-entropy, zero_grad,
  backward, SGD momentum step; bf16 autocast on CUDA) with spatial convolutions and after
  ``esdbs_ray.winograd.to_winograd_relu`` (the layer's default implementation: "auto", i.e. the
  native C++ kernels on CPU, the compiled layer on CUDA).  After warm-up steps (which compile), the spatial and the
  Winograd model of the same (model, B) take timed steps in alternation (the order flips every
  round), so a change in machine load hits both alike; samples/s = B / median step time;
* trainer: ``esdbs_ray.train.train`` on a synthetic dataset of the same geometry (random pixels:
  compute does not depend on them), fixed schedule at ``--trainer-batch``, ``--trainer-steps`` steps
  per epoch, ``--trainer-epochs`` epochs; samples/s of the epochs after the first (the first
  compiles) beside the bare loop's at the same B, so the trainer's overhead is visible, and the SWR
  epoch time over the SC (spatial) epoch time.

Inputs have the Fashion-MNIST geometry 1x28x28 (``--geometry cifar``: 3x32x32), models at ``--width``
0.25 on CPU by default (the CPU smoke width; 1.0 = published widths) and ``--cuda-width`` 1.0 on
CUDA.  ``winograd.tune_cpu_allocator()`` is called first (the trainer calls it for Winograd runs on
CPU, and it is process-wide) unless ``--no-malloc-tuning``.

Hardware: whatever it runs on, recorded in the JSON.

    .venv/bin/python bench/throughput.py --quick   # alexnet + resnet32, B 64/256, trainer at B 128
    .venv/bin/python bench/throughput.py           # all models, 5 batch sizes
    .venv/bin/python bench/throughput.py --geometry cifar --include-resnet50 --width 0.5

Result (``bench/results/throughput.json``): the latest run is the full one (2026-12-02, width 0.25,
1x28x28, 2 threads, 2 timed steps per cell, load average 1.4-1.8, the layer's default on CPU: the
native kernels with their AVX-512 GEMMs), on a 2-vCPU AMD EPYC VM (samples/s, SWR / spatial):

    model           B=64   B=128  B=256  B=512  B=1024  trainer B=128: SWR epoch / SC epoch
    alexnet         x1.18  x1.17  x1.21  x1.15  x1.14   x0.85
    all_cnn_c       x1.10  x1.08  x1.14  x1.06  x0.99   x0.77
    convpool_cnn_c  x1.29  x1.31  x1.29  x1.24  x1.20   x0.79
    resnet32        x0.72  x0.65  x0.64  x0.64  x0.59   x1.43
    vgg16           x1.31  x1.32  x1.29  x1.25  x1.20   x0.79

So on this CPU an SWR member trains faster than its spatial twin, as the paper's Winograd argument
says it should (16 multiplications per 2x2 tile against 36), except ResNet-32 at width 0.25 (4-16
channels), where the transforms' memory traffic (16 values per 2x2 output tile, 4x the activation)
outweighs the GEMMs.  Before the native kernels (2026-11-23, ``--quick``, 2-vCPU Intel Xeon, the
compiled layer): AlexNet x0.93-0.97 (epoch x1.01), ResNet-32 x0.52-0.54 (epoch x1.93); before the
compiled layer (2026-11-21, eager reference layer) 0.29-0.51x across all five models.  On a shared VM
2 OpenMP threads were once measured ~9x slower than 1 (a descheduled thread stalls every parallel
region); the thread check in the JSON says which way it goes on the machine at hand.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    SilentHooks, Timer, format_table, hardware_line, load_average, median, provenance_block, sync, write_result,
)
from esdbs_ray.models import create_model, list_models  # noqa: E402
from esdbs_ray.winograd import fused_compile_log, to_winograd_relu, tune_cpu_allocator, winograd_layers  # noqa: E402

BATCHES = (64, 128, 256, 512, 1024)
GEOMETRY = {"fmnist": (1, 28), "cifar": (3, 32)}
CONVS = ("spatial", "winograd_relu")


def build(name: str, conv: str, in_ch: int, size: int, width: float, device, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=in_ch, image_size=size, width=width)
    if conv == "winograd_relu":
        to_winograd_relu(model)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


class StepRunner:
    """One model's training step on batches drawn from a uint8 pool on the device, as the trainer runs it."""

    def __init__(self, model, opt, pool_x, pool_y, batch: int, device, seed: int = 0):
        self.model, self.opt, self.batch, self.device = model, opt, batch, device
        self.pool_x, self.pool_y = pool_x.to(device), pool_y.to(device)
        self.gen = torch.Generator().manual_seed(seed)
        c = pool_x.shape[1]
        self.scale = torch.full((1, c, 1, 1), 1.0 / (255.0 * 0.3), device=device)
        self.shift = torch.full((1, c, 1, 1), -0.3 / 0.3, device=device)
        self.amp = device.type == "cuda"  # the trainer's default on CUDA: bf16 autocast

    def step(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        idx = torch.randint(0, len(self.pool_y), (self.batch,), generator=self.gen).to(self.device)
        x = torch.addcmul(self.shift, self.pool_x[idx].float(), self.scale)
        y = self.pool_y[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        loss.item()  # the trainer reads the loss back every epoch; here: make sure the step finished
        return time.perf_counter() - t


def _pool(batch: int, in_ch: int, size: int):
    torch.manual_seed(1)
    pool_x = torch.randint(0, 256, (max(2048, batch), in_ch, size, size), dtype=torch.uint8)
    return pool_x, torch.randint(0, 10, (len(pool_x),))


def bench_model_batch(name: str, batch: int, args, in_ch: int, size: int, width: float, device) -> list[dict]:
    pool_x, pool_y = _pool(batch, in_ch, size)
    runners, info = {}, {}
    for conv in CONVS:
        model, opt = build(name, conv, in_ch, size, width, device)
        runners[conv] = StepRunner(model, opt, pool_x, pool_y, batch, device)
        info[conv] = {"parameters": sum(p.numel() for p in model.parameters()),
                      "winograd_layers": len(winograd_layers(model))}
    slow = name == "resnet50" and device.type == "cpu"
    warmup = 2  # the first Winograd step compiles (fused layer), the second settles allocations
    rounds = 1 if slow else max(args.min_steps, math.ceil(args.min_samples / batch))
    load0 = load_average()
    n_compiles = len(fused_compile_log())
    with Timer() as wall:
        for _ in range(warmup):
            for conv in CONVS:
                runners[conv].step()
        compile_s = sum(r["seconds"] for r in fused_compile_log()[n_compiles:])
        times = {conv: [] for conv in CONVS}
        for r in range(rounds):
            for conv in (CONVS if r % 2 == 0 else CONVS[::-1]):
                times[conv].append(runners[conv].step())
    rows = []
    for conv in CONVS:
        med = median(times[conv])
        rows.append({"device": device.type, "model": name, "batch": batch, "conv": conv, "width": width,
                     "input": f"{in_ch}x{size}x{size}", "warmup_steps": warmup, "timed_steps": rounds,
                     "median_step_s": med, "min_step_s": min(times[conv]), "step_s": times[conv],
                     "samples_per_s": batch / med, **info[conv], "load_average": load0,
                     "compile_s": compile_s if conv == "winograd_relu" else 0.0})
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    for r in rows:
        r["winograd_over_spatial"] = ratio
    print(f"{device.type:4s} {name:15s} B {batch:5d} | spatial {rows[0]['samples_per_s']:8.1f}/s  winograd_relu "
          f"{rows[1]['samples_per_s']:8.1f}/s  (x{ratio:.2f})  [{rounds} timed steps each, compile {compile_s:.0f}s, "
          f"{wall.seconds:.0f}s, load {load0[0] if load0 else '?'}]", flush=True)
    return rows


def synthetic_bundle(in_ch: int, size: int, n_train: int, n_eval: int, seed: int = 0):
    """Random uint8 images in the DatasetBundle the trainer takes (compute does not depend on pixels)."""
    from esdbs_ray.data import DatasetBundle, Split

    rng = np.random.default_rng(seed)

    def split(n):
        return Split(rng.integers(0, 256, (n, in_ch, size, size), dtype=np.uint8),
                     rng.integers(0, 10, n).astype(np.int64), np.arange(n, dtype=np.int64))

    return DatasetBundle(name="synthetic", train=split(n_train), val=split(n_eval), test=split(n_eval),
                         num_classes=10, class_names=tuple(str(i) for i in range(10)),
                         mean=(0.3,) * in_ch, std=(0.3,) * in_ch, source="random pixels")


def trainer_vs_bare(name: str, args, in_ch: int, size: int, width: float, device) -> list[dict]:
    """samples/s of train() (epochs after the first) and of the bare loop at the same batch size."""
    from esdbs_ray.config import DBSConfig, TrainConfig
    from esdbs_ray.train import train

    batch, steps, epochs = args.trainer_batch, args.trainer_steps, args.trainer_epochs
    data = synthetic_bundle(in_ch, size, batch * steps, batch)
    rows = []
    for conv in CONVS:
        # the config names a real dataset (the typed config accepts no other); train() runs on ``data``
        cfg = TrainConfig(dataset="fashion-mnist", model=name, width=width, conv=conv, epochs=epochs, schedule="fixed",
                          dbs=DBSConfig(b0=batch), eval_batch_size=batch, device=device.type, seed=0)
        hooks = SilentHooks()
        n_compiles = len(fused_compile_log())
        with tempfile.TemporaryDirectory() as tmp, Timer() as wall:
            train(cfg, data, tmp, hooks=hooks)
        recs = hooks.records
        steady = recs[1:] or recs
        rows.append({"device": device.type, "model": name, "conv": conv, "batch": batch, "width": width,
                     "steps_per_epoch": steps, "epochs": epochs,
                     "trainer_samples_per_s": median(r["samples_per_second"] for r in steady),
                     "trainer_epoch_s": median(r["epoch_seconds"] for r in steady),
                     "first_epoch_s": recs[0]["epoch_seconds"], "wall_s": wall.seconds,
                     "compile_s": sum(r["seconds"] for r in fused_compile_log()[n_compiles:]),
                     "load_average": load_average()})
    bare = {r["conv"]: r for r in bench_model_batch(name, batch, args, in_ch, size, width, device)}
    for r in rows:
        r["bare_samples_per_s"] = bare[r["conv"]]["samples_per_s"]
        r["trainer_over_bare"] = r["trainer_samples_per_s"] / r["bare_samples_per_s"]
    swr_over_sc = rows[1]["trainer_epoch_s"] / rows[0]["trainer_epoch_s"]
    for r in rows:
        r["swr_epoch_over_sc_epoch"] = swr_over_sc
    print(f"{device.type:4s} {name:15s} trainer B {batch} | " + "  ".join(
        f"{r['conv']} {r['trainer_samples_per_s']:.1f}/s (bare {r['bare_samples_per_s']:.1f}/s, x{r['trainer_over_bare']:.2f})"
        for r in rows) + f" | SWR epoch / SC epoch x{swr_over_sc:.2f}", flush=True)
    return rows


def thread_check(args, in_ch: int, size: int, batch: int = 128, rounds: int = 3) -> dict:
    """alexnet, spatial, B=128: torch threads 1 vs ``args.threads``, steps alternating (same process)."""
    device = torch.device("cpu")
    model, opt = build("alexnet", "spatial", in_ch, size, args.width, device)
    pool_x, pool_y = _pool(batch, in_ch, size)
    runner = StepRunner(model, opt, pool_x, pool_y, batch, device)
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


def summarise(rows: list[dict], trainer_rows: list[dict], models: list[str], batches: list[int]) -> dict:
    out = {}
    for dev in sorted({r["device"] for r in rows} | {r["device"] for r in trainer_rows}):
        by = {(r["model"], r["batch"], r["conv"]): r["samples_per_s"] for r in rows if r["device"] == dev}
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
            tr = {r["conv"]: r for r in trainer_rows if r["device"] == dev and r["model"] == m}
            if tr:
                table[m]["trainer"] = {conv: {k: tr[conv][k] for k in ("batch", "trainer_samples_per_s",
                                                                       "bare_samples_per_s", "trainer_over_bare",
                                                                       "trainer_epoch_s", "compile_s")}
                                       for conv in tr}
                table[m]["trainer"]["swr_epoch_over_sc_epoch"] = tr["winograd_relu"]["swr_epoch_over_sc_epoch"]
        ratios = [v for m in table for v in table[m]["winograd_over_spatial"].values()]
        epoch = [table[m]["trainer"]["swr_epoch_over_sc_epoch"] for m in table if "trainer" in table[m]]
        over = [table[m]["trainer"][c]["trainer_over_bare"] for m in table if "trainer" in table[m] for c in CONVS]
        out[dev] = {"models": table, "median_winograd_over_spatial": median(ratios) if ratios else None,
                    "median_swr_epoch_over_sc_epoch": median(epoch) if epoch else None,
                    "target_swr_epoch_le_1.2x_sc": ({"reached": median(epoch) <= 1.2,
                                                     "models_reaching": sum(e <= 1.2 for e in epoch), "of": len(epoch)}
                                                    if epoch else None),
                    "median_trainer_over_bare": median(over) if over else None}
    return out


def format_summary(summary: dict, batches: list[int]) -> str:
    rows = []
    for dev, d in summary.items():
        for m, t in d["models"].items():
            for conv in CONVS:
                row = {"device": dev, "model": m, "conv": conv}
                row.update({f"B{b}": t[conv]["samples_per_s"][str(b)] for b in batches})
                if "trainer" in t:
                    row["trainer"] = t["trainer"][conv]["trainer_samples_per_s"]
                    row["bare"] = t["trainer"][conv]["bare_samples_per_s"]
                rows.append(row)
            row = {"device": dev, "model": m, "conv": "winograd/spatial"}
            row.update({f"B{b}": (f"x{t['winograd_over_spatial'][str(b)]:.2f}" if str(b) in t["winograd_over_spatial"]
                                  else None) for b in batches})
            if "trainer" in t:
                row["trainer"] = f"epoch x{t['trainer']['swr_epoch_over_sc_epoch']:.2f}"
            rows.append(row)
    cols = ([("device", "device", ""), ("model", "model", ""), ("conv", "conv", "")]
            + [(f"B={b}", f"B{b}", ".1f") for b in batches] + [("trainer", "trainer", ".1f"), ("bare", "bare", ".1f")])
    return format_table(rows, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="alexnet + resnet32 at B 64/256, 2 timed steps")
    ap.add_argument("--models", nargs="*", default=None, help="default: every registry model except resnet50")
    ap.add_argument("--include-resnet50", action="store_true", help="add resnet50 (3x64x64, width 1.0)")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--devices", nargs="*", default=None, help="cpu and/or cuda (default: cpu, and cuda if present)")
    ap.add_argument("--geometry", choices=sorted(GEOMETRY), default="fmnist")
    ap.add_argument("--width", type=float, default=0.25, help="channel multiplier on CPU (default 0.25)")
    ap.add_argument("--cuda-width", type=float, default=1.0, help="channel multiplier on CUDA (default 1.0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-samples", type=int, default=None, help="timed samples per (model, B, conv) at least")
    ap.add_argument("--min-steps", type=int, default=2, help="timed steps per (model, B, conv) at least")
    ap.add_argument("--trainer-batch", type=int, default=128)
    ap.add_argument("--trainer-steps", type=int, default=8, help="steps per trainer epoch")
    ap.add_argument("--trainer-epochs", type=int, default=3, help="trainer epochs (the first is left out)")
    ap.add_argument("--no-trainer", action="store_true", help="skip the trainer-vs-bare-loop section")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="do not call winograd.tune_cpu_allocator()")
    ap.add_argument("--out", default=None, help="default bench/results/throughput.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    if args.min_samples is None:
        args.min_samples = 128
    models = args.models or ([m for m in ("alexnet", "resnet32")] if args.quick
                             else [m for m in list_models() if m != "resnet50"])
    if args.include_resnet50 and "resnet50" not in models:
        models.append("resnet50")
    batches = args.batches or ([64, 256] if args.quick else list(BATCHES))
    names = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    in_ch, size = GEOMETRY[args.geometry]
    config = {"models": models, "batches": batches, "devices": names, "geometry": args.geometry,
              "input": f"{in_ch}x{size}x{size}", "width": args.width, "cuda_width": args.cuda_width,
              "threads": args.threads, "min_samples": args.min_samples, "min_steps": args.min_steps,
              "malloc_tuned": tuned, "quick": args.quick, "optimizer": "SGD momentum 0.9",
              "cuda": "bf16 autocast (the trainer's default)", "winograd_impl": "auto (the layer's default)",
              "trainer": None if args.no_trainer else {"batch": args.trainer_batch, "steps_per_epoch": args.trainer_steps,
                                                       "epochs": args.trainer_epochs, "schedule": "fixed",
                                                       "data": "synthetic uint8, same geometry"},
              "resnet50": "3x64x64, width 1.0, 1 timed step on CPU"}
    print(f"throughput: {hardware_line()}\n  models {models}, B {batches}, devices {names}, input "
          f"{in_ch}x{size}x{size}, width {args.width} (CUDA {args.cuda_width}), threads {args.threads}", flush=True)

    load_start = load_average()
    t0 = time.perf_counter()
    threads_check = None if args.quick or "cpu" not in names else thread_check(args, in_ch, size)
    rows, trainer_rows = [], []
    for dev_name in names:
        device = torch.device(dev_name)
        width = args.cuda_width if device.type == "cuda" else args.width
        for name in models:
            geo = (3, 64, 1.0) if name == "resnet50" else (in_ch, size, width)
            for b in batches:
                rows += bench_model_batch(name, b, args, *geo, device)
            if not args.no_trainer and name != "resnet50":
                trainer_rows += trainer_vs_bare(name, args, *geo, device)
    summary = summarise(rows, trainer_rows, models, batches)
    print()
    print(format_summary(summary, batches))
    doc = {
        "benchmark": "throughput",
        "what": "training samples/s per model, batch size, conv and device in a bare loop (gather+normalise, fwd, "
                "CE, backward, SGD; spatial and winograd_relu steps interleaved; samples/s = B / median step time), "
                "and in esdbs_ray.train.train beside the bare loop at one batch size",
        "wall_s": time.perf_counter() - t0,
        "provenance": provenance_block({**config, "load_average_start": load_start}),
        "summary": summary,
        "thread_check": threads_check,
        "results": rows,
        "trainer": trainer_rows,
    }
    path = write_result("throughput", doc, args.out)
    print(f"\nwrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
