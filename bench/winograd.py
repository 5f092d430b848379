"""Benchmark: Winograd-ReLU F(2x2,3x3) layer vs the spatial 3x3 convolution it replaces.

What it measures, per eligible layer shape of the registry models (batch 128):

* training: forward and forward+backward time of ``WinogradReLUConv2d`` (dense Winograd GEMMs; its
  cost does not depend on sparsity) vs the spatial layer it replaces, ``F.conv2d(F.relu(x), g)``;
* inference at sparsity 0 / 40 / 80 %: ``F.conv2d`` vs dense Winograd vs the sparse path
  (``SparseWinogradInference``: per tile position, a CSR matrix of the nonzero (C_in, C_out) weights
  times the transformed input; all-zero positions skipped);
* multiplication counts: spatial 9·C·K per output pixel, Winograd 16·C·K·density per 2x2 output tile.

Hardware: whatever it runs on -- CPU with ``torch.set_num_threads(2)`` (the project's 2-core
machines), and CUDA too when present; the JSON records CPU model, thread count, torch version and
GPU name.  Each timing is the median of several repeats after a warm-up; the variants are run in
round-robin within each repeat so a change in machine load hits all of them alike.  Results go to
``bench/results/winograd.json`` and a table is printed.  Targets (reported, not asserted): training
step <= 1.5x F.conv2d at 0 % sparsity on CPU; sparse inference at >= 70 % sparsity faster than
F.conv2d.

    python bench/winograd.py            # full (~5 min on 2 cores)
    python bench/winograd.py --quick    # 3 shapes, fewer repeats (~1 min)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from esdbs_ray.winograd import (  # noqa: E402
    SparseWinogradInference,
    WinogradReLUConv2d,
    tune_cpu_allocator,
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
]
QUICK = ["alexnet28 w1 conv2", "vgg16-32 w1 conv2_2", "convpool28 w0.5 conv5"]
SPARSITIES = (0.0, 0.4, 0.8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_round_robin(fns: dict, repeats: int, device) -> dict:
    for f in fns.values():  # warm-up (allocator, oneDNN primitive cache, MKL threads)
        f()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
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


def bench_shape(label, c, k, hw, batch, repeats, device, sparse_modes=True) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, c, hw, hw, device=device)
    g = torch.empty(k, c, 3, 3, device=device)
    torch.nn.init.kaiming_normal_(g, mode="fan_out", nonlinearity="relu")
    g.requires_grad_()
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=False).to(device)
    with torch.no_grad():
        conv.weight.copy_(g)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=True)
    xg = x.clone().requires_grad_()
    gy = torch.randn(batch, k, hw, hw, device=device)

    def spatial_fwd():
        with torch.no_grad():
            F.conv2d(F.relu(x), g, padding=1)

    def spatial_step():
        F.conv2d(F.relu(xg), g, padding=1).backward(gy)

    def wino_fwd():
        with torch.no_grad():
            layer(x)

    def wino_step():
        layer(xg).backward(gy)

    train = _time_round_robin(
        {"spatial_fwd": spatial_fwd, "winograd_fwd": wino_fwd, "spatial_step": spatial_step,
         "winograd_step": wino_step}, repeats, device)
    xg.grad = g.grad = layer.weight.grad = None

    th = tw = (hw + 1) // 2
    out = {
        "label": label, "c_in": c, "c_out": k, "hw": hw, "batch": batch, "device": device.type,
        "train_ms": train,
        "fwd_ratio": train["winograd_fwd"] / train["spatial_fwd"],
        "step_ratio": train["winograd_step"] / train["spatial_step"],
        "mults_spatial": 9 * c * k * hw * hw * batch,
        "inference": {},
    }
    for s in SPARSITIES:
        sp_layer = WinogradReLUConv2d.from_conv2d(conv, relu=True)
        _prune_layer(sp_layer, s)
        fns = {"spatial": spatial_fwd,
               "winograd_dense": (lambda m=SparseWinogradInference(sp_layer, "dense"): m(x))}
        if sparse_modes and device.type == "cpu":  # torch's CSR matmul; on CUDA cuSPARSE is slower still
            fns["winograd_csr"] = lambda m=SparseWinogradInference(sp_layer, "csr"): m(x)
        t = _time_round_robin(fns, repeats, device)
        density = float((sp_layer.weight != 0).float().mean())
        out["inference"][f"{s:.1f}"] = {
            "ms": t,
            "density": density,
            "mults_winograd": int(16 * c * k * density * th * tw * batch),
            "mult_ratio_vs_spatial": 16 * density * th * tw / (9 * hw * hw),
            "dense_ratio": t["winograd_dense"] / t["spatial"],
            "csr_ratio": t["winograd_csr"] / t["spatial"] if "winograd_csr" in t else None,
        }
    return out


def hardware() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes, 3 repeats")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc malloc as is (fresh mmap pages for big buffers on every call)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "winograd.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    repeats = args.repeats or (3 if args.quick else 5)
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    t0 = time.perf_counter()
    results = []
    for device in devices:
        for label, c, k, hw in shapes:
            r = bench_shape(label, c, k, hw, args.batch, repeats, device)
            results.append(r)
            inf = r["inference"]
            csr = " ".join(f"{inf[s]['csr_ratio']:.2f}" if inf[s]["csr_ratio"] else "-" for s in inf)
            print(f"{device.type:4s} {label:24s} C{c:<4d}K{k:<4d}{hw:>3d}px | "
                  f"conv fwd {r['train_ms']['spatial_fwd']:7.1f} ms step {r['train_ms']['spatial_step']:7.1f} ms | "
                  f"wino fwd x{r['fwd_ratio']:.2f} step x{r['step_ratio']:.2f} | "
                  f"inf dense x{inf['0.0']['dense_ratio']:.2f} csr@0/40/80% x {csr}", flush=True)

    cpu = [r for r in results if r["device"] == "cpu"]
    step = statistics.median(r["step_ratio"] for r in cpu)
    csr80 = statistics.median(r["inference"]["0.8"]["csr_ratio"] for r in cpu)
    dense80 = statistics.median(r["inference"]["0.8"]["dense_ratio"] for r in cpu)
    summary = {
        "cpu_median_step_ratio": step,
        "cpu_median_fwd_ratio": statistics.median(r["fwd_ratio"] for r in cpu),
        "cpu_median_inference_csr_ratio_at_80": csr80,
        "cpu_median_inference_dense_ratio": dense80,
        "target_train_step_le_1.5x_conv": {"reached": step <= 1.5, "shapes_reaching": sum(r["step_ratio"] <= 1.5 for r in cpu),
                                           "of": len(cpu)},
        "target_sparse_inference_at_70pct_faster_than_conv": {
            "reached": min(csr80, dense80) < 1.0,
            "shapes_csr_faster_at_80": sum(r["inference"]["0.8"]["csr_ratio"] < 1.0 for r in cpu),
            "shapes_dense_winograd_faster": sum(r["inference"]["0.8"]["dense_ratio"] < 1.0 for r in cpu),
            "of": len(cpu)},
    }
    if len(devices) > 1:
        gpu = [r for r in results if r["device"] == "cuda"]
        summary["cuda_median_step_ratio"] = statistics.median(r["step_ratio"] for r in gpu)
        summary["cuda_median_fwd_ratio"] = statistics.median(r["fwd_ratio"] for r in gpu)
    doc = {
        "what": "WinogradReLUConv2d vs F.conv2d(relu(x)) per eligible layer shape; ratios are winograd / spatial time",
        "hardware": hardware(), "malloc_tuned": tuned, "batch": args.batch, "repeats": repeats,
        "quick": args.quick, "wall_s": time.perf_counter() - t0, "summary": summary, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
