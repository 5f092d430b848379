"""Benchmark: the Winograd-ReLU F(2x2,3x3) layer -- native, reference, fused -- vs the spatial 3x3 conv it replaces.

What it measures, per eligible layer shape of the registry models (batch 128):

* training step (forward + backward, weight and input gradients) of ``winograd_relu_conv`` with
  ``impl="native"`` (CPU only: the C++ kernels of ``esdbs_ray/winograd_native.cpp``, what "auto" runs
  on CPU: fused band by band where C * K <= 128^2, else the passes one after another; both timed,
  ``native_unfused`` the latter), ``impl="reference"`` (hand-written autograd Function,
  eager) and ``impl="fused"`` (the functional formulation compiled by inductor per layer shape:
  C++/OpenMP on CPU, Triton on CUDA), and on CUDA ``impl="triton"`` (the hand-written Triton kernels
  of ``esdbs_ray/winograd_triton.py``; ``--triton-blocks`` adds other block configurations beside
  the default) against ``F.conv2d(F.relu(x), g, padding=1)`` (oneDNN on CPU, cuDNN on CUDA).  Every
  variant runs on the same input twice: NCHW-contiguous (how a spatial model feeds its convs; the
  headline ratio) and channels-last (how a Winograd layer is fed by the Winograd
  layer before it, and cuDNN's fast layout), each ratio against the conv on the same layout and
  against the NCHW conv;
* forward time (no grad) of the conv, the reference and what "auto" runs for inference (native on
  CPU, fused on CUDA);
* the compile time of the fused layer per shape (first call: forward and backward graphs);
* on CPU, inference at sparsity 0 / 40 / 80 %: ``F.conv2d`` vs dense Winograd vs the sparse path
  (``SparseWinogradInference``: per tile position a CSR matrix of the nonzero weights), unless
  ``--no-inference``.

Devices: CPU with ``torch.set_num_threads(--threads)`` (2: the project's machines), and CUDA when
present, fp32 and bf16 autocast (the trainer's CUDA setting), all in one JSON,
``bench/results/winograd.json``, with provenance (git revision, versions, CPU/GPU, load average).
Timings are medians of ``--repeats`` round-robin rounds (every variant once per round, so a change
in machine load hits all alike) after a warm-up call that also compiles.  Targets (reported, not
asserted), for what "auto" runs: CPU training step <= 1.0x F.conv2d (median over shapes); CUDA <= 1.5x
cuDNN.

    python bench/winograd.py                      # CPU (+ CUDA if present), ~15 min on 2 loaded cores
    python bench/winograd.py --quick              # 3 shapes, 3 repeats, no sparse inference
    python bench/winograd.py --devices cuda       # GPU only
    python bench/winograd.py --devices cuda --quick --triton-blocks 16,32,16,4,1 32,32,16,8,2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._triton import has_triton  # noqa: E402

from bench.common import format_table, hardware_line, median, provenance_block, sync, write_result  # noqa: E402
from esdbs_ray import winograd_native as native  # noqa: E402
from esdbs_ray.winograd import (  # noqa: E402
    SparseWinogradInference,
    WinogradReLUConv2d,
    fused_compile_log,
    tune_cpu_allocator,
    winograd_relu_conv,
)

# (label, C_in, C_out, H=W) -- eligible layers of the registry models at their paper image sizes.
SHAPES = [
    ("alexnet28 w1 conv2", 64, 192, 14),
    ("alexnet28 w1 conv3", 192, 384, 7),
    ("alexnet28 w0.5 conv2", 32, 96, 14),
    ("vgg16-32 w1 conv1_2", 64, 64, 32),
    ("vgg16-32 w1 conv2_2", 128, 128, 16),
    ("vgg16-32 w1 conv3_2", 256, 256, 8),
    ("vgg16-32 w1 conv4_2", 512, 512, 4),
    ("convpool28 w1 conv2", 96, 96, 28),
    ("convpool28 w1 conv5", 192, 192, 14),
    ("convpool28 w0.5 conv5", 96, 96, 14),
    ("resnet32-32 stage1", 16, 16, 32),
    # the CPU demo's and reference run's width (0.25): few channels, where memory traffic rules
    ("alexnet28 w0.25 conv2", 16, 48, 14),
    ("convpool28 w0.25 conv2", 24, 24, 28),
    ("resnet32-32 w0.25 stage1", 4, 4, 32),
    ("resnet32-32 w0.25 stage2", 8, 8, 16),
]
QUICK = ["alexnet28 w1 conv2", "vgg16-32 w1 conv2_2", "convpool28 w0.5 conv5"]
SPARSITIES = (0.0, 0.4, 0.8)
TARGETS = {"cpu": 1.0, "cuda": 1.5}  # "auto"'s training step / conv (NCHW), median over shapes
AUTO = {"cpu": "native", "cuda": "fused"}  # what "auto" runs on each device (float32)


def impls(device: torch.device) -> tuple[str, ...]:
    """The implementations timed on a device: the native kernels exist on CPU only, the hand-written
    Triton kernels (``impl="triton"``) on CUDA only."""
    if device.type == "cpu":
        return ("native", "reference", "fused")
    return ("reference", "fused") + (("triton",) if has_triton() else ())


def _with_env(name: str, value: str, fn):
    """Run fn with $name set to value (the layers read their switches at every call)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _time_round_robin(fns: dict, repeats: int, device) -> dict:
    """Median ms per function; one warm-up call each (compiles, fills caches)."""
    for f in fns.values():
        f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _prune_layer(layer: WinogradReLUConv2d, sparsity: float) -> None:
    with torch.no_grad():
        w = layer.weight
        k = int(round(sparsity * w.numel()))
        if k:
            thr = w.abs().reshape(-1).kthvalue(k).values
            mask = (w.abs() > thr).to(w.dtype)
        else:
            mask = torch.ones_like(w)
        w.mul_(mask)
    layer.register_buffer("weight_mask", mask)


def _native_mode(mode: str, fn):
    """Run fn with $ESDBS_NATIVE_MODE set to mode (the native layer reads it at every call)."""
    return _with_env(native.MODE_ENV, mode, fn)


def bench_training(label, c, k, hw, batch, repeats, device, amp: bool, triton_blocks=()) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, c, hw, hw, device=device)
    xs = {"nchw": x.clone().requires_grad_(),
          "nhwc": x.contiguous(memory_format=torch.channels_last).requires_grad_()}
    g = torch.empty(k, c, 3, 3, device=device)
    torch.nn.init.kaiming_normal_(g, mode="fan_out", nonlinearity="relu")
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=False).to(device)
    with torch.no_grad():
        conv.weight.copy_(g)
    g.requires_grad_()
    u = WinogradReLUConv2d.from_conv2d(conv).weight
    dt = torch.bfloat16 if amp else torch.float32
    gys = {"nchw": torch.randn(batch, k, hw, hw, device=device, dtype=dt)}
    gys["nhwc"] = gys["nchw"].contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def step(fn, layout):
        def run():
            with ctx():
                y = fn(xs[layout])
            y.backward(gys[layout])
        return run

    def fwd(fn):
        def run():
            with torch.no_grad(), ctx():
                fn(x)
        return run

    conv_fn = lambda t: F.conv2d(F.relu(t), g, padding=1)  # noqa: E731
    impl_fns = {impl: (lambda t, impl=impl: winograd_relu_conv(t, u, impl=impl)) for impl in impls(device)}
    if device.type == "cpu":  # the native kernels' unfused path beside what "auto" picks (fused or not)
        impl_fns["native_unfused"] = lambda t: _native_mode("unfused", lambda: winograd_relu_conv(t, u, impl="native"))
    if "triton" in impl_fns:  # other block configurations of the Triton kernels beside the default
        for cfg in triton_blocks:
            impl_fns[f"triton@{cfg}"] = (lambda t, cfg=cfg: _with_env(
                "ESDBS_TRITON_BLOCKS", cfg, lambda: winograd_relu_conv(t, u, impl="triton")))
    fns = {}
    for layout in ("nchw", "nhwc"):
        fns[f"conv_{layout}"] = step(conv_fn, layout)
        for impl, fn in impl_fns.items():
            fns[f"{impl}_{layout}"] = step(fn, layout)
    fns["conv_fwd"] = fwd(conv_fn)
    fns["reference_fwd"] = fwd(impl_fns["reference"])
    # what "auto" runs for inference: the native kernels on CPU, the fused layer on CUDA
    fns[f"{AUTO[device.type]}_fwd"] = fwd(impl_fns[AUTO[device.type]])
    n_compiles = len(fused_compile_log())
    ms = _time_round_robin(fns, repeats, device)
    compiles = fused_compile_log()[n_compiles:]
    out = {"label": label, "c_in": c, "c_out": k, "hw": hw, "batch": batch, "device": device.type,
           "dtype": "bf16-autocast" if amp else "fp32", "ms": ms,
           "compile_s": {str(r["key"][-1]): r["seconds"] for r in compiles},
           "compile_s_total": sum(r["seconds"] for r in compiles), "impls": list(impl_fns)}
    for impl in impl_fns:
        out[f"{impl}_step_ratio"] = ms[f"{impl}_nchw"] / ms["conv_nchw"]
        out[f"{impl}_step_ratio_nhwc"] = ms[f"{impl}_nhwc"] / ms["conv_nhwc"]
        out[f"{impl}_nhwc_vs_conv_nchw"] = ms[f"{impl}_nhwc"] / ms["conv_nchw"]
    for impl in ("reference", AUTO[device.type]):
        out[f"{impl}_fwd_ratio"] = ms[f"{impl}_fwd"] / ms["conv_fwd"]
    if "native_nchw" in ms:
        out["native_over_fused_step"] = ms["native_nchw"] / ms["fused_nchw"]
        out["native_path"] = native.path(torch.float32, c, k)  # what "auto" ran: fused, unfused or bmm
        out["native_over_unfused_step"] = ms["native_nchw"] / ms["native_unfused_nchw"]
    return out


def bench_inference(label, c, k, hw, batch, repeats, device) -> dict:
    """CPU: F.conv2d vs dense Winograd vs CSR-sparse Winograd, no grad, at each sparsity."""
    torch.manual_seed(0)
    x = torch.randn(batch, c, hw, hw, device=device)
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=False).to(device)
    th = tw = (hw + 1) // 2
    out = {"label": label, "c_in": c, "c_out": k, "hw": hw, "batch": batch, "device": device.type, "sparsity": {}}
    for s in SPARSITIES:
        layer = WinogradReLUConv2d.from_conv2d(conv, relu=True)
        _prune_layer(layer, s)
        fns = {"spatial": lambda: F.conv2d(F.relu(x), conv.weight, padding=1),
               "winograd_dense": (lambda m=SparseWinogradInference(layer, "dense"): m(x)),
               "winograd_csr": (lambda m=SparseWinogradInference(layer, "csr"): m(x))}
        with torch.no_grad():
            t = _time_round_robin(fns, repeats, device)
        density = float((layer.weight != 0).float().mean())
        out["sparsity"][f"{s:.1f}"] = {
            "ms": t, "density": density,
            "mults_winograd": int(16 * c * k * density * th * tw * batch),
            "mult_ratio_vs_spatial": 16 * density * th * tw / (9 * hw * hw),
            "dense_ratio": t["winograd_dense"] / t["spatial"],
            "csr_ratio": t["winograd_csr"] / t["spatial"],
        }
    return out


def summarise(rows: list[dict]) -> dict:
    out = {}
    for dev, dt in sorted({(r["device"], r["dtype"]) for r in rows}):
        rs = [r for r in rows if (r["device"], r["dtype"]) == (dev, dt)]
        target, auto = TARGETS[dev], AUTO[dev]
        keys = [f"{impl}_{what}" for impl in impls(torch.device(dev))
                for what in ("step_ratio", "step_ratio_nhwc", "nhwc_vs_conv_nchw")]
        keys += [k for k in ("native_unfused_step_ratio", "reference_fwd_ratio", f"{auto}_fwd_ratio",
                             "native_over_fused_step", "native_over_unfused_step") if k in rs[0]]
        keys += [f"{impl}_step_ratio" for impl in rs[0].get("impls", ()) if impl.startswith("triton@")]
        s = {key: median(r[key] for r in rs) for key in dict.fromkeys(keys)}
        if "triton_step_ratio" in s:  # the hand-written kernels, which "auto" does not run until measured
            s[f"target_triton_step_le_{target}x_conv"] = {
                "reached": s["triton_step_ratio"] <= target,
                "shapes_reaching": sum(r["triton_step_ratio"] <= target for r in rs), "of": len(rs)}
        s["fused_over_reference_step"] = median(r["ms"]["fused_nchw"] / r["ms"]["reference_nchw"] for r in rs)
        s["fused_compile_s_per_shape_median"] = median(r["compile_s_total"] for r in rs)
        s["fused_compile_s_total"] = sum(r["compile_s_total"] for r in rs)
        s["auto_impl"] = auto
        s[f"target_{auto}_step_le_{target}x_conv"] = {
            "reached": s[f"{auto}_step_ratio"] <= target,
            "shapes_reaching": sum(r[f"{auto}_step_ratio"] <= target for r in rs), "of": len(rs)}
        out[f"{dev}_{dt}"] = s
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes, 3 repeats, no sparse inference")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", nargs="*", default=None, help="cpu and/or cuda (default: cpu, and cuda if present)")
    ap.add_argument("--cuda-dtypes", nargs="*", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                    help="on CUDA: fp32 and/or bf16 autocast (the trainer's setting)")
    ap.add_argument("--no-inference", action="store_true", help="skip the CPU sparse-inference section")
    ap.add_argument("--triton-blocks", nargs="*", default=[], metavar="BT,BN,BR,WARPS,STAGES",
                    help="on CUDA: also time impl='triton' with these block configurations (the default's beside)")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc malloc as is (fresh mmap pages for big buffers on every call)")
    ap.add_argument("--out", default=None, help="default bench/results/winograd.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    repeats = args.repeats or (3 if args.quick else 5)
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    names = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    devices = [torch.device(d) for d in names]
    config = {"batch": args.batch, "repeats": repeats, "threads": args.threads, "quick": args.quick,
              "devices": names, "cuda_dtypes": args.cuda_dtypes, "triton_blocks": args.triton_blocks,
              "shapes": [s[0] for s in shapes], "malloc_tuned": tuned,
              "inference": not (args.quick or args.no_inference)}
    print(f"winograd bench: {hardware_line()}; devices {names}, batch {args.batch}, {repeats} repeats", flush=True)

    t0 = time.perf_counter()
    rows, inference = [], []
    for device in devices:
        for amp in ([d == "bf16" for d in args.cuda_dtypes] if device.type == "cuda" else (False,)):
            for label, c, k, hw in shapes:
                r = bench_training(label, c, k, hw, args.batch, repeats, device, amp, args.triton_blocks)
                rows.append(r)
                native = f"native x{r['native_step_ratio']:.2f} " if "native_step_ratio" in r else ""
                print(f"{device.type:4s} {r['dtype']:13s} {label:22s} C{c:<4d}K{k:<4d}{hw:>3d}px | conv step "
                      f"{r['ms']['conv_nchw']:7.1f} ms | step/conv: {native}reference x{r['reference_step_ratio']:.2f} "
                      f"fused x{r['fused_step_ratio']:.2f} "
                      + "".join(f"{i} x{r[i + '_step_ratio']:.2f} " for i in r["impls"] if i.startswith("triton"))
                      + f"(NHWC: x{r['reference_step_ratio_nhwc']:.2f} "
                      f"x{r['fused_step_ratio_nhwc']:.2f}) | fwd ref x{r['reference_fwd_ratio']:.2f} | "
                      f"fused compile {r['compile_s_total']:.0f}s", flush=True)
        if device.type == "cpu" and config["inference"]:
            for label, c, k, hw in shapes:
                r = bench_inference(label, c, k, hw, args.batch, repeats, device)
                inference.append(r)
                sp = r["sparsity"]
                print(f"cpu  inference {label:22s} dense x{sp['0.0']['dense_ratio']:.2f} | csr@0/40/80% x "
                      + " ".join(f"{sp[s]['csr_ratio']:.2f}" for s in sp), flush=True)

    summary = summarise(rows)
    if inference:
        csr80 = median(r["sparsity"]["0.8"]["csr_ratio"] for r in inference)
        dense80 = median(r["sparsity"]["0.8"]["dense_ratio"] for r in inference)
        summary["cpu_inference"] = {
            "median_csr_ratio_at_80": csr80, "median_dense_ratio_at_80": dense80,
            "target_sparse_inference_at_70pct_faster_than_conv": {
                "reached": min(csr80, dense80) < 1.0,
                "shapes_csr_faster_at_80": sum(r["sparsity"]["0.8"]["csr_ratio"] < 1.0 for r in inference),
                "of": len(inference)}}
    table = [{"device": f"{r['device']} {r['dtype']}", "shape": r["label"], "conv_ms": r["ms"]["conv_nchw"],
              "native": r.get("native_step_ratio", float("nan")), "path": r.get("native_path", "-"),
              "unfused": r.get("native_unfused_step_ratio", float("nan")), "ref": r["reference_step_ratio"],
              "fused": r["fused_step_ratio"], "triton": r.get("triton_step_ratio", float("nan")),
              "native_nhwc": r.get("native_step_ratio_nhwc", float("nan")),
              "fused_nhwc": r["fused_step_ratio_nhwc"], "compile_s": r["compile_s_total"]} for r in rows]
    print()
    print(format_table(table, [("device", "device", ""), ("shape", "shape", ""), ("conv step ms", "conv_ms", ".1f"),
                               ("native/conv", "native", ".2f"), ("native path", "path", ""),
                               ("unfused/conv", "unfused", ".2f"), ("reference/conv", "ref", ".2f"),
                               ("fused/conv", "fused", ".2f"), ("triton/conv", "triton", ".2f"),
                               ("NHWC native/conv", "native_nhwc", ".2f"),
                               ("NHWC fused/conv", "fused_nhwc", ".2f"), ("fused compile s", "compile_s", ".1f")]))
    doc = {
        "benchmark": "winograd",
        "what": "training step (fwd+bwd) of winograd_relu_conv -- native (CPU), reference and fused -- vs "
                "F.conv2d(relu(x)) per eligible layer shape; ratios are winograd / conv time, medians of "
                "interleaved repeats",
        "wall_s": time.perf_counter() - t0,
        "provenance": provenance_block(config),
        "summary": summary,
        "results": rows,
        "inference": inference,
    }
    import json

    print(json.dumps(summary, indent=1))
    path = write_result("winograd", doc, args.out)
    print(f"wrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
