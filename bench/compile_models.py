"""Benchmark: every registry model in SWR form (Winograd-ReLU convs) compiled whole by torch.compile.

What it checks and measures, per model of ``esdbs_ray.models.list_models()`` on each device:

* that ``torch.compile(model, fullgraph=True)`` (inductor: Triton on CUDA, C++/OpenMP on CPU) compiles
  the SWR model's forward and -- through AOTAutograd -- backward without a graph break, and that one
  training step (forward, cross-entropy, backward) computes what the eager model with the hand-written
  reference layer computes: loss and every parameter gradient, in float64 (``--check-dtype``), to 1e-6
  of the model's largest gradient entry;
* the compile time (first compiled step) and the median step time, bf16 autocast on CUDA (the trainer's
  setting), of four variants measured round-robin: spatial eager (cuDNN / oneDNN), spatial compiled,
  SWR eager (each Winograd layer runs its own compiled kernel: the trainer's default) and SWR compiled
  whole.  ``swr_compiled_over_spatial_eager`` is what a user pays for training in the Winograd domain
  with whole-model compile against a plain cuDNN model.

Inputs have the Fashion-MNIST geometry 1x28x28 at width 1.0 (resnet50: 3x64x64, torchvision's widths),
batch ``--batch``.  Result: ``bench/results/compile_models.json`` (or ``--out``) with provenance.

    python bench/compile_models.py --devices cuda          # the GPU target
    python bench/compile_models.py --devices cpu --width 0.25 --models alexnet all_cnn_c

Measured (2026-11-23): on one H100 alexnet, all_cnn_c, vgg16 and convpool_cnn_c compile fullgraph
(46-78 s each; all_cnn_c equal to eager in float64 to 6e-15), resnet32 and resnet50 not finished in
the time given (bench/results/gpu-h100-2026-11-23/); SWR AlexNet at batch 128, bf16: 6.89 ms a step
compiled whole against 8.71 ms per-layer fused and 4.46 ms for the cuDNN model.  On a 2-core Xeon
(``--width 0.125 --check-only``, bench/results/compile_models.json) five models compile and match in
float64 to 1e-13; at width 0.25, batch 128, one thread (bench/results/compile_models_cpu_timed.json)
compiling whole speeds the spatial models up 1.24-1.38x and the SWR models by -6 % to +9 %.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import format_table, hardware_line, median, provenance_block, sync, write_result  # noqa: E402
from esdbs_ray.models import create_model, list_models  # noqa: E402
from esdbs_ray.winograd import IMPL_ENV, to_winograd_relu, tune_cpu_allocator, winograd_layers  # noqa: E402


def _geometry(name: str) -> tuple[int, int]:
    return (3, 64) if name == "resnet50" else (1, 28)


def _build(name: str, swr: bool, width: float, device, seed: int = 0):
    torch.manual_seed(seed)
    in_ch, size = _geometry(name)
    model = create_model(name, num_classes=10, in_channels=in_ch, image_size=size,
                         width=1.0 if name == "resnet50" else width)
    if swr:
        to_winograd_relu(model)
    return model.to(device).train()


def _step(model, x, y, amp: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        loss = F.cross_entropy(model(x).float(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def check_equal(name: str, width: float, device, batch: int, dtype: torch.dtype = torch.float64) -> dict:
    """The compiled SWR model's loss and gradients against the eager model's (hand-written reference
    layer), in float64 by default: then only real differences show -- in float32 a Winograd-domain ReLU
    that flips on a rounding difference moves a gradient entry by its whole size, and cuDNN's TF32
    convolutions (PyTorch's default for the non-Winograd convs) differ from inductor's kernels."""
    torch._dynamo.reset()
    eager = _build(name, True, width, device).to(dtype)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    in_ch, size = _geometry(name)
    torch.manual_seed(1)
    x = torch.randn(batch, in_ch, size, size, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    t = time.perf_counter()
    loss_c = _step(compiled, x, y, amp=False).detach()
    sync(device)
    compile_s = time.perf_counter() - t
    saved = os.environ.get(IMPL_ENV)
    os.environ[IMPL_ENV] = "reference"  # the eager side: the hand-written layer, nothing compiled
    try:
        loss_e = _step(eager, x, y, amp=False).detach()
    finally:
        if saved is None:
            del os.environ[IMPL_ENV]
        else:
            os.environ[IMPL_ENV] = saved
    # each parameter's difference over the largest gradient entry of the whole model: a parameter whose
    # true gradient is 0 (a conv bias before BatchNorm) has rounding noise of ~1e-16 on both sides
    scale = max(float(q.grad.abs().max()) for q in eager.parameters()) or 1.0
    worst, worst_name = 0.0, None
    for (n, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        d = float((p.grad - q.grad).abs().max()) / scale
        if d >= worst:
            worst, worst_name = d, n
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    loss_diff = abs(loss_e.item() - loss_c.item())
    return {"check_dtype": str(dtype).replace("torch.", ""), "check_compile_s": compile_s,
            "loss_eager": loss_e.item(), "loss_compiled": loss_c.item(), "loss_abs_diff": loss_diff,
            "grad_max_rel_diff": worst, "grad_worst_parameter": worst_name, "tolerance": tol,
            "equal": loss_diff <= tol * max(1.0, abs(loss_e.item())) and worst <= tol}


def time_variants(name: str, width: float, device, batch: int, repeats: int) -> dict:
    amp = device.type == "cuda"
    in_ch, size = _geometry(name)
    torch.manual_seed(2)
    x = torch.randn(batch, in_ch, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    torch._dynamo.reset()
    spatial, swr = _build(name, False, width, device), _build(name, True, width, device)
    variants = {"spatial_eager": spatial, "spatial_compiled": torch.compile(copy.deepcopy(spatial), fullgraph=True),
                "swr_eager": swr, "swr_compiled": torch.compile(copy.deepcopy(swr), fullgraph=True)}
    first = {}
    for k, m in variants.items():  # first call compiles; the second settles allocations
        sync(device)
        t = time.perf_counter()
        _step(m, x, y, amp)
        sync(device)
        first[k] = time.perf_counter() - t
        _step(m, x, y, amp)
    times = {k: [] for k in variants}
    for r in range(repeats):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            sync(device)
            t = time.perf_counter()
            _step(variants[k], x, y, amp)
            sync(device)
            times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"ms": ms, "first_call_s": first, "winograd_layers": len(winograd_layers(swr)),
            "swr_compiled_over_spatial_eager": ms["swr_compiled"] / ms["spatial_eager"],
            "swr_compiled_over_spatial_compiled": ms["swr_compiled"] / ms["spatial_compiled"],
            "swr_eager_over_spatial_eager": ms["swr_eager"] / ms["spatial_eager"],
            "swr_compiled_over_swr_eager": ms["swr_compiled"] / ms["swr_eager"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every registry model")
    ap.add_argument("--devices", nargs="*", default=None, help="cpu and/or cuda (default: cuda if present, else cpu)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--check-batch", type=int, default=16, help="batch of the equality check")
    ap.add_argument("--check-dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-only", action="store_true", help="the fp32 compile-and-match check, no step timings")
    ap.add_argument("--out", default=None, help="default bench/results/compile_models.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    models = args.models or list_models()
    names = args.devices or (["cuda"] if torch.cuda.is_available() else ["cpu"])
    config = {"models": models, "devices": names, "width": args.width, "batch": args.batch,
              "check_batch": args.check_batch, "repeats": args.repeats, "threads": args.threads,
              "check_only": args.check_only, "check_dtype": args.check_dtype}
    print(f"compile bench: {hardware_line()}; {config}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for dev in names:
        device = torch.device(dev)
        for name in models:
            row = {"device": dev, "model": name}
            try:
                row.update(check_equal(name, args.width, device, args.check_batch, getattr(torch, args.check_dtype)))
                row["compiles"] = True
                print(f"{dev:4s} {name:15s} compiles, equal={row['equal']} (loss diff {row['loss_abs_diff']:.1e}, "
                      f"grad rel {row['grad_max_rel_diff']:.1e}), {row['check_dtype']} compile {row['check_compile_s']:.0f}s", flush=True)
                if not args.check_only:
                    row.update(time_variants(name, args.width, device, args.batch, args.repeats))
            except Exception as e:  # a model that fails to compile is the finding: record it, go on
                row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
            rows.append(row)
            if row["compiles"] and "ms" in row:
                print(f"{dev:4s} {name:15s} equal={row['equal']} (grad rel {row['grad_max_rel_diff']:.1e}) | step ms "
                      + " ".join(f"{k} {v:.2f}" for k, v in row["ms"].items())
                      + f" | SWR compiled / spatial eager x{row['swr_compiled_over_spatial_eager']:.2f}"
                      + f" | compile {row['first_call_s']['swr_compiled']:.0f}s", flush=True)
            elif not row["compiles"]:
                print(f"{dev:4s} {name:15s} FAILED: {row['error'][:300]}", flush=True)
    ok = [r for r in rows if "ms" in r]
    summary = {dev: {"models": len([r for r in rows if r["device"] == dev]),
                     "compile_and_match": sum(r["compiles"] and r["equal"] for r in rows if r["device"] == dev),
                     "median_swr_compiled_over_spatial_eager": median(
                         r["swr_compiled_over_spatial_eager"] for r in ok if r["device"] == dev) if ok else None,
                     "median_swr_eager_over_spatial_eager": median(
                         r["swr_eager_over_spatial_eager"] for r in ok if r["device"] == dev) if ok else None}
               for dev in names}
    print()
    print(format_table([{"device": r["device"], "model": r["model"], "ok": r["compiles"] and r.get("equal", False),
                         **r.get("ms", {}),
                         "ratio": r.get("swr_compiled_over_spatial_eager")} for r in rows],
                       [("device", "device", ""), ("model", "model", ""), ("compiles+matches", "ok", ""),
                        ("spatial ms", "spatial_eager", ".2f"), ("spatial compiled", "spatial_compiled", ".2f"),
                        ("SWR ms", "swr_eager", ".2f"), ("SWR compiled", "swr_compiled", ".2f"),
                        ("SWR compiled / spatial", "ratio", ".2f")]))
    doc = {"benchmark": "compile_models",
           "what": "torch.compile(fullgraph) of every registry model in SWR form: fp32 equality with eager, "
                   "compile time, step time of spatial/SWR eager/compiled (bf16 autocast on CUDA)",
           "wall_s": time.perf_counter() - t0, "provenance": provenance_block(config), "summary": summary,
           "results": rows}
    path = write_result("compile_models", doc, args.out)
    print(f"wrote {path} in {doc['wall_s']:.0f}s; {summary}")
    return 0 if all(r["compiles"] and r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
