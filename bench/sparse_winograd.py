"""Benchmark: the sparse Winograd-ReLU layer (esdbs_ray/winograd_sparse.py) against the dense native layer and F.conv2d.

What it measures, per conv layer shape of the registry models (alexnet, convpool_cnn_c, all_cnn_c on
28x28 Fashion-MNIST images, vgg16 and resnet32 on 32x32 CIFAR images; width 0.25 -- the quick
preset -- and 1.0; every 3x3 stride-1 ReLUConv2d that ``to_winograd_relu`` converts, found by running
the model with hooks), at weight densities 1.0, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1 (U magnitude-pruned
per layer: the kept entries are the largest |U| of a kaiming-initialised layer):

* training step, batch 128: forward and backward (dx and dU) of the sparse layer
  (``WinogradSparseFn``), of the dense native layer (``winograd_native.forward`` / ``backward``,
  what ``impl="native"`` runs, with its own choice of fused or unfused passes) and of
  ``F.conv2d(F.relu(x), g, padding=1)`` with autograd (oneDNN);
* inference forward, batch 1000, no grad: ``sparse_forward``, ``winograd_native.forward`` and the
  conv.

Each shape's variants -- the dense layer, the conv and the sparse layer at every density -- run
round-robin, once per round, ``--repeats`` rounds after a warm-up call, so that machine load hits
them alike; figures are medians, ratios the medians of the per-round ratios.  The Winograd layers
take channels-last input (what the previous Winograd layer or batch norm hands them), the conv an
NCHW-contiguous one (what a spatial model feeds it).

Also: where the time goes (the sparse kernels' phase counters at inference density 0.2 and training
density 0.3, thread-milliseconds, and the dense layer's passes timed one by one), the crossover
density per shape (the largest density at which the sparse layer is at least as fast as the dense
one), and the rule ``esdbs_ray/winograd_sparse.py`` applies (``CROSSOVER``, ``should_run_sparse``):
per pass and per path the dense layer takes there (fused band by band, or unfused), the largest
tested density at which the sparse layer is faster in median by 5 % or more and at least as fast on
3 of 4 shapes of that class with C * K >= 64^2, and the smallest C * K from which on that holds.  ``--reanalyse FILE``
derives the summary and the rule again from a results file's measurements.

Targets (2 cores, AVX-512; medians over the shapes with C * K >= 64^2): inference forward at density
0.2 <= 0.45x the dense native layer; training step at density 0.3 <= 0.65x; at density 1.0 no slower
than the dense layer ("auto" stays dense there).

    python bench/sparse_winograd.py            # every shape, ~30-60 min on 2 loaded cores
    python bench/sparse_winograd.py --quick    # 4 shapes, 3 repeats: a smoke test

Results: ``bench/results/sparse_winograd.json`` (``--quick``: ``sparse_winograd_quick.json``), with
provenance (git revision, versions, CPU, load average).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import format_table, hardware_line, load_average, median, provenance_block, write_result  # noqa: E402
from esdbs_ray import winograd_native as native  # noqa: E402
from esdbs_ray import winograd_sparse as ws  # noqa: E402

DENSITIES = (1.0, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1)
MODELS = (("alexnet", 28, 1), ("convpool_cnn_c", 28, 1), ("all_cnn_c", 28, 1), ("vgg16", 32, 3), ("resnet32", 32, 3))
WIDTHS = (0.25, 1.0)
TARGET_CK = 64 * 64  # the targets' shapes: C * K at least this
TARGETS = {"inference_d0.2_vs_dense": 0.45, "training_d0.3_vs_dense": 0.65, "d1.0_auto_vs_dense": 1.0}
QUICK = [(64, 64, 8, 8), (128, 128, 16, 16), (96, 96, 28, 28), (512, 512, 4, 4)]


def registry_shapes() -> list[dict]:
    """The eligible conv layers of the registry models: one entry per (C, K, H, W) with the models and
    widths that have it and how many layers."""
    from esdbs_ray.models import ReLUConv2d, create_model
    from esdbs_ray.winograd import is_winograd_eligible

    found: dict[tuple, dict] = {}
    for name, size, cin in MODELS:
        for width in WIDTHS:
            model = create_model(name, num_classes=10, in_channels=cin, image_size=size, width=width).eval()
            seen = []
            hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(
                (mod.in_channels, mod.out_channels, inp[0].shape[2], inp[0].shape[3])))
                for m in model.modules() if isinstance(m, ReLUConv2d) and is_winograd_eligible(m)]
            with torch.no_grad():
                model(torch.zeros(2, cin, size, size))
            for h in hooks:
                h.remove()
            for shape in seen:
                e = found.setdefault(shape, {"c": shape[0], "k": shape[1], "h": shape[2], "w": shape[3],
                                             "models": [], "widths": [], "layers": 0})
                tag = f"{name}{size} w{width:g}"
                if tag not in e["models"]:
                    e["models"].append(tag)
                if width not in e["widths"]:
                    e["widths"].append(width)
                e["layers"] += 1
    return sorted(found.values(), key=lambda e: (e["c"] * e["k"], e["h"]))


def prune_to(u: torch.Tensor, density: float) -> torch.Tensor:
    """The mask keeping the round(density * numel) largest |u| (1 = kept), in u's dtype."""
    keep = int(round(density * u.numel()))
    mask = torch.zeros(u.numel(), dtype=u.dtype)
    if keep:
        mask[torch.argsort(u.abs().reshape(-1), descending=True, stable=True)[:keep]] = 1
    return mask.view_as(u)


class _DenseNative(torch.autograd.Function):
    """The dense native layer as impl="native" runs it (esdbs_ray.winograd._WinogradNativeFn)."""

    @staticmethod
    def forward(ctx, x, u, relu):
        y, saved, fused = native.forward(x, u, relu)
        ctx.save_for_backward(saved, u)
        ctx.shape, ctx.relu, ctx.fused = tuple(x.shape), relu, fused
        return y

    @staticmethod
    def backward(ctx, gy):
        saved, u = ctx.saved_tensors
        dx, du = native.backward(gy, saved, ctx.fused, u, ctx.shape, ctx.relu, True, True)
        return dx, du, None


def _round_robin(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each function, ``repeats`` interleaved rounds after one
    warm-up call each.  (CPU time, summed over threads, leaves out the time other processes hold the
    cores -- a check on the wall figures on a shared machine -- but counts OpenMP's spin-waits.)"""
    for f in fns.values():
        f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def _ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) (the two measured in the same round)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _dense_passes(x: torch.Tensor, u: torch.Tensor, repeats: int) -> dict:
    """The dense native forward's passes one by one (unfused: input transform, the 16 GEMMs, output
    transform), ms, medians: where its time goes."""
    lib = native.library()
    n, c, h, w = x.shape
    k = u.shape[2]
    nt = torch.get_num_threads()
    xh = x.permute(0, 2, 3, 1).contiguous()
    tiles = n * ((h + 1) // 2) * ((w + 1) // 2)
    out: dict[str, list[float]] = {"input_transform": [], "gemm": [], "output_transform": []}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        V = x.new_empty((16, tiles, c))
        lib.esdbs_wino_input_transform(0, xh.data_ptr(), V.data_ptr(), n, h, w, c, 1, nt)
        t1 = time.perf_counter()
        M = native._bmm(lib, nt, V, u)
        t2 = time.perf_counter()
        y = torch.empty((n, k, h, w), memory_format=torch.channels_last)
        lib.esdbs_wino_output_transform(0, M.data_ptr(), y.data_ptr(), n, h, w, k, nt, None, 0)
        t3 = time.perf_counter()
        for key, v in zip(out, (t1 - t0, t2 - t1, t3 - t2)):
            out[key].append(v)
        del V, M, y
    return {key: statistics.median(v[1:]) * 1e3 for key, v in out.items()}


def _sparse_profile(fn, repeats: int) -> dict:
    """The sparse kernels' phase counters for fn (thread-seconds -> ms), medians of ``repeats`` calls."""
    runs = []
    for _ in range(repeats):
        with ws.profiling() as prof:
            fn()
        runs.append(prof)
    return {k: statistics.median(r[k] for r in runs) * 1e3 for k in ws.PHASES}


def bench_shape(e: dict, train_batch: int, infer_batch: int, repeats: int, densities, profile: bool) -> dict:
    c, k, h, w = e["c"], e["k"], e["h"], e["w"]
    torch.manual_seed(0)
    g = torch.empty(k, c, 3, 3)
    torch.nn.init.kaiming_normal_(g, mode="fan_out", nonlinearity="relu")
    from esdbs_ray.winograd import spatial_to_winograd

    u_full = spatial_to_winograd(g)
    masks = {d: prune_to(u_full, d) for d in densities}
    us = {d: (u_full * m).contiguous() for d, m in masks.items()}
    structs = {d: ws.structure_for(m) for d, m in masks.items()}
    for s in structs.values():  # index arrays built before timing (once per mask, not per step)
        s.by_k(), s.by_c()
    out = {**e, "tiles_train": train_batch * ((h + 1) // 2) * ((w + 1) // 2),
           "tiles_infer": infer_batch * ((h + 1) // 2) * ((w + 1) // 2),
           "native_path": native.path(torch.float32, c, k, train_batch * ((h + 1) // 2) * ((w + 1) // 2)),
           "native_path_infer": native.path(torch.float32, c, k, infer_batch * ((h + 1) // 2) * ((w + 1) // 2)),
           "densities": {}}

    # training step, batch train_batch
    x = torch.randn(train_batch, c, h, w)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    gy = torch.randn(train_batch, k, h, w).contiguous(memory_format=torch.channels_last)
    gy_nchw = gy.contiguous()
    g_req = g.clone().requires_grad_()
    u_dense = u_full.clone().requires_grad_()
    u_req = {d: u.clone().requires_grad_() for d, u in us.items()}

    def step_dense():
        _DenseNative.apply(x_cl, u_dense, True).backward(gy)

    def step_conv():
        F.conv2d(F.relu(x_nchw), g_req, padding=1).backward(gy_nchw)

    def step_sparse(d):
        return lambda: ws.WinogradSparseFn.apply(x_cl, u_req[d], structs[d], True).backward(gy)

    fns = {"dense": step_dense, "conv": step_conv, **{f"sparse@{d}": step_sparse(d) for d in densities}}
    train, train_cpu = _round_robin(fns, repeats)
    train_prof = _sparse_profile(step_sparse(0.3), 3) if profile and 0.3 in densities else None
    del x_cl, x_nchw, gy, gy_nchw, g_req, u_dense, u_req

    # inference forward, batch infer_batch
    xi = torch.randn(infer_batch, c, h, w)
    xi_cl = xi.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fns = {"dense": lambda: native.forward(xi_cl, u_full, True),
               "conv": lambda: F.conv2d(F.relu(xi), g, padding=1),
               **{f"sparse@{d}": (lambda d=d: ws.sparse_forward(xi_cl, us[d], structs[d], True)) for d in densities}}
        infer, infer_cpu = _round_robin(fns, repeats)
        infer_prof = dense_prof = None
        if profile and 0.2 in densities:
            infer_prof = _sparse_profile(lambda: ws.sparse_forward(xi_cl, us[0.2], structs[0.2], True), 3)
            dense_prof = _dense_passes(xi_cl, u_full, 3)
    tiles_t, tiles_i = out["tiles_train"], out["tiles_infer"]
    for d in densities:
        key = f"sparse@{d}"
        s = structs[d]
        out["densities"][f"{d:g}"] = {
            "density": s.density, "nnz": s.nnz, "skipped_positions": len(s.skipped),
            "train_ms": {v: statistics.median(train[v]) * 1e3 for v in ("dense", "conv", key)},
            "infer_ms": {v: statistics.median(infer[v]) * 1e3 for v in ("dense", "conv", key)},
            "train_vs_dense": _ratio(train, key, "dense"), "train_vs_conv": _ratio(train, key, "conv"),
            "infer_vs_dense": _ratio(infer, key, "dense"), "infer_vs_conv": _ratio(infer, key, "conv"),
            "cpu_train_vs_dense": _ratio(train_cpu, key, "dense"), "cpu_infer_vs_dense": _ratio(infer_cpu, key, "dense"),
            "auto_sparse_train": ws.should_run_sparse(s.density, c, k, tiles_t, True),
            "auto_sparse_infer": ws.should_run_sparse(s.density, c, k, tiles_i, False),
        }
    out["dense_vs_conv_train"] = _ratio(train, "dense", "conv")
    out["dense_vs_conv_infer"] = _ratio(infer, "dense", "conv")
    for mode in ("train", "infer"):  # the largest density at which sparse is at least as fast as dense
        fast = [d for d in densities if out["densities"][f"{d:g}"][f"{mode}_vs_dense"] <= 1.0]
        out[f"crossover_{mode}"] = max(fast) if fast else None
    if train_prof:
        out["profile_train_d0.3_ms"] = train_prof
    if infer_prof:
        out["profile_infer_d0.2_ms"] = infer_prof
        out["dense_passes_infer_ms"] = dense_prof
    return out


MODES = {"train": "training", "infer": "inference"}


def _dense_path(r: dict, mode: str) -> str:
    """How the dense native layer ran this shape in this pass: "fused" or "unfused"."""
    key = "native_path" if mode == "train" else "native_path_infer"
    path = r.get(key) or native.path(torch.float32, r["c"], r["k"], r["tiles_train" if mode == "train" else "tiles_infer"])
    return "fused" if path == "fused" else "unfused"


def _chooses_sparse(rule: dict, r: dict, mode: str, density: float) -> bool:
    """should_run_sparse's rule (CROSSOVER's form) applied to a measured shape."""
    return r["c"] * r["k"] >= rule["min_ck"] and density <= rule[MODES[mode]][_dense_path(r, mode)]


def _auto_ratio(r: dict, d: str, mode: str, rule: dict | None = None) -> float:
    """What auto runs against the dense layer: the sparse ratio where it chooses sparse, else 1.  The
    choice: the module's rule as it was in this run (``auto_sparse_*``), or ``rule``."""
    e = r["densities"][d]
    sparse = e[f"auto_sparse_{mode}"] if rule is None else _chooses_sparse(rule, r, mode, e["density"])
    return e[f"{mode}_vs_dense"] if sparse else 1.0


WIN_MARGIN = 0.95  # a median ratio this far under 1 at least: on a shared machine a tie is noise


def _wins(rs: list[dict], key: str, mode: str) -> bool:
    """The sparse layer at density `key` is faster than the dense one on these shapes: median ratio
    <= WIN_MARGIN, and at least as fast on 3 of 4 shapes or more."""
    v = [r["densities"][key][f"{mode}_vs_dense"] for r in rs]
    return bool(v) and median(v) <= WIN_MARGIN and sum(x <= 1.0 for x in v) * 4 >= len(v) * 3


def crossover(rows: list[dict], densities) -> dict:
    """The rule of should_run_sparse (winograd_sparse.CROSSOVER): per pass and per path the dense
    layer takes there ("fused": band by band in cache, the stronger; "unfused"), the largest tested
    density at which the sparse layer wins (``_wins``) on the shapes with C * K >= 64^2; then min_ck,
    the smallest C * K from which on it wins on every (pass, path) class at those densities."""
    big = [r for r in rows if r["c"] * r["k"] >= TARGET_CK]
    out: dict = {"per_class": {}}
    rule: dict = {}
    for mode in ("train", "infer"):
        rule[MODES[mode]] = {}
        for path in ("fused", "unfused"):
            rs = [r for r in big if _dense_path(r, mode) == path]
            ok = [d for d in densities if _wins(rs, f"{d:g}", mode)]
            rule[MODES[mode]][path] = max(ok) if ok else 0.0
            out["per_class"][f"{mode}_{path}"] = {
                "shapes": [f"{r['c']}x{r['k']}@{r['h']}x{r['w']}" for r in rs], "threshold": rule[MODES[mode]][path],
                "median_vs_dense": {f"{d:g}": median(r["densities"][f"{d:g}"][f"{mode}_vs_dense"] for r in rs)
                                    for d in densities},
                "shapes_sparse_faster": {f"{d:g}": sum(r["densities"][f"{d:g}"][f"{mode}_vs_dense"] <= 1.0 for r in rs)
                                         for d in densities}}
    rule["min_ck"] = TARGET_CK
    for ck in sorted({r["c"] * r["k"] for r in rows}):
        rs = [r for r in rows if r["c"] * r["k"] >= ck]
        if all(not [r for r in rs if _dense_path(r, m) == path] or rule[MODES[m]][path] == 0.0
               or _wins([r for r in rs if _dense_path(r, m) == path], f"{rule[MODES[m]][path]:g}", m)
               for m in MODES for path in ("fused", "unfused")):
            rule["min_ck"] = ck
            break
    out["per_shape"] = {f"{r['c']}x{r['k']}@{r['h']}x{r['w']}": {m: r[f"crossover_{m}"] for m in MODES} for r in rows}
    out["rule"] = rule
    return out


def summarise(rows: list[dict], densities, rule: dict) -> dict:
    big = [r for r in rows if r["c"] * r["k"] >= TARGET_CK]
    groups = {"all_ck_ge_4096": big}
    for width in WIDTHS:
        groups[f"w{width:g}_ck_ge_4096"] = [r for r in big if width in r["widths"]]
    groups["all_shapes"] = rows
    out: dict = {}
    for name, rs in groups.items():
        if not rs:
            continue
        g = {"shapes": len(rs)}
        for d in densities:
            key = f"{d:g}"
            g[f"d{key}"] = {m: median(r["densities"][key][m] for r in rs)
                            for m in ("infer_vs_dense", "train_vs_dense", "infer_vs_conv", "train_vs_conv",
                                      "cpu_infer_vs_dense", "cpu_train_vs_dense")}
            for mode in ("infer", "train"):
                g[f"d{key}"][f"auto_{mode}_vs_dense"] = median(_auto_ratio(r, key, mode, rule) for r in rs)
                g[f"d{key}"][f"auto_{mode}_vs_dense_rule_in_run"] = median(_auto_ratio(r, key, mode) for r in rs)
        g["dense_vs_conv_train"] = median(r["dense_vs_conv_train"] for r in rs)
        g["dense_vs_conv_infer"] = median(r["dense_vs_conv_infer"] for r in rs)
        out[name] = g
    s = out.get("all_ck_ge_4096")
    if s and "d0.2" in s and "d0.3" in s and "d1" in s:
        got = {"inference_d0.2_vs_dense": s["d0.2"]["infer_vs_dense"],
               "training_d0.3_vs_dense": s["d0.3"]["train_vs_dense"],
               "d1.0_auto_vs_dense": max(s["d1"]["auto_infer_vs_dense"], s["d1"]["auto_train_vs_dense"])}
        out["targets"] = {k: {"target": TARGETS[k], "median": v, "met": v <= TARGETS[k]} for k, v in got.items()}
        out["targets"]["per_width"] = {
            name: {"inference_d0.2_vs_dense": g["d0.2"]["infer_vs_dense"],
                   "training_d0.3_vs_dense": g["d0.3"]["train_vs_dense"],
                   "inference_d0.2_vs_conv": g["d0.2"]["infer_vs_conv"],
                   "training_d0.3_vs_conv": g["d0.3"]["train_vs_conv"],
                   "d1_infer_vs_dense": g["d1"]["infer_vs_dense"], "d1_train_vs_dense": g["d1"]["train_vs_dense"],
                   "d1_auto_vs_dense": max(g["d1"]["auto_infer_vs_dense"], g["d1"]["auto_train_vs_dense"]),
                   "d1_infer_vs_conv": g["d1"]["infer_vs_conv"], "d1_train_vs_conv": g["d1"]["train_vs_conv"],
                   "dense_vs_conv_infer": g["dense_vs_conv_infer"], "dense_vs_conv_train": g["dense_vs_conv_train"],
                   "shapes": g["shapes"]}
            for name, g in out.items() if name.startswith("w") or name == "all_ck_ge_4096"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 shapes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--infer-batch", type=int, default=1000)
    ap.add_argument("--shapes", nargs="*", default=None, metavar="CxKxHxW", help="only these shapes")
    ap.add_argument("--no-malloc-tuning", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reanalyse", default=None, metavar="JSON",
                    help="derive the summary and crossover again from a results file's measurements, no timing")
    args = ap.parse_args(argv)
    if args.reanalyse:
        doc = json.loads(Path(args.reanalyse).read_text())
        doc["crossover"] = crossover(doc["results"], DENSITIES)
        doc["summary"] = summarise(doc["results"], DENSITIES, doc["crossover"]["rule"])
        doc["provenance"]["reanalysed_by"] = " ".join(sys.argv)
        print(json.dumps({"targets": doc["summary"].get("targets"), "rule": doc["crossover"]["rule"]}, indent=1))
        path = Path(args.out or args.reanalyse)
        from esdbs_ray import storage

        storage.write_json(path, doc)
        print(f"wrote {path}")
        return 0

    from esdbs_ray.winograd import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = registry_shapes()
    if args.quick:
        shapes = [e for e in shapes if (e["c"], e["k"], e["h"], e["w"]) in QUICK]
    if args.shapes:
        want = {tuple(int(v) for v in s.split("x")) for s in args.shapes}
        shapes = [e for e in shapes if (e["c"], e["k"], e["h"], e["w"]) in want]
    config = {"train_batch": args.train_batch, "infer_batch": args.infer_batch, "repeats": repeats,
              "threads": args.threads, "quick": args.quick, "densities": list(DENSITIES), "malloc_tuned": tuned,
              "shapes": [f"{e['c']}x{e['k']}@{e['h']}x{e['w']}" for e in shapes],
              "vectorised_kernels": ws.kernels_vectorised(), "crossover_in_use": dict(ws.CROSSOVER),
              "load_average_start": load_average()}
    print(f"sparse winograd bench: {hardware_line()}; {len(shapes)} shapes, {repeats} repeats", flush=True)
    t0 = time.perf_counter()
    rows = []
    for e in shapes:
        r = bench_shape(e, args.train_batch, args.infer_batch, repeats, DENSITIES, profile=True)
        rows.append(r)
        dd = r["densities"]
        print(f"C{r['c']:<4d}K{r['k']:<4d}{r['h']:>3d}px ({r['native_path']:7s}) dense/conv train x{r['dense_vs_conv_train']:.2f}"
              f" infer x{r['dense_vs_conv_infer']:.2f} | sparse/dense train "
              + " ".join(f"{d}:{dd[d]['train_vs_dense']:.2f}" for d in dd) + " | infer "
              + " ".join(f"{d}:{dd[d]['infer_vs_dense']:.2f}" for d in dd), flush=True)
    cross = crossover(rows, DENSITIES)
    summary = summarise(rows, DENSITIES, cross["rule"])
    table = []
    for r in rows:
        dd = r["densities"]
        table.append({"shape": f"{r['c']}x{r['k']}@{r['h']}", "ck": "*" if r["c"] * r["k"] >= TARGET_CK else "",
                      "widths": ",".join(f"{w:g}" for w in r["widths"]),
                      "i02": dd["0.2"]["infer_vs_dense"], "t03": dd["0.3"]["train_vs_dense"],
                      "i1": dd["1"]["infer_vs_dense"], "t1": dd["1"]["train_vs_dense"],
                      "ic02": dd["0.2"]["infer_vs_conv"], "tc03": dd["0.3"]["train_vs_conv"],
                      "xi": r["crossover_infer"], "xt": r["crossover_train"]})
    print()
    print(format_table(table, [("shape", "shape", ""), ("C*K>=64^2", "ck", ""), ("widths", "widths", ""),
                               ("infer d.2/dense", "i02", ".2f"), ("train d.3/dense", "t03", ".2f"),
                               ("infer d1/dense", "i1", ".2f"), ("train d1/dense", "t1", ".2f"),
                               ("infer d.2/conv", "ic02", ".2f"), ("train d.3/conv", "tc03", ".2f"),
                               ("crossover infer", "xi", ""), ("crossover train", "xt", "")]))
    doc = {
        "benchmark": "sparse_winograd",
        "what": "sparse Winograd-ReLU layer (winograd_sparse) vs the dense native layer and F.conv2d(relu(x)) per "
                "registry layer shape and weight density: training step (batch 128, fwd+bwd) and inference forward "
                "(batch 1000); ratios are medians over interleaved rounds of per-round time ratios",
        "wall_s": time.perf_counter() - t0,
        "provenance": provenance_block(config),
        "summary": summary,
        "crossover": cross,
        "results": rows,
    }
    print(json.dumps({"summary": summary.get("targets"), "crossover": cross["rule"]},
                     indent=1))
    path = write_result("sparse_winograd_quick" if args.quick and not args.out else "sparse_winograd", doc, args.out)
    print(f"wrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
