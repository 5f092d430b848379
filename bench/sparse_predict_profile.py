"""Where `esdbs predict`'s time goes, by module type: the quick ensemble exported dense and at 80 %.

The profile beside ``bench/sparse_predict.py``'s ratio: each member's folded inference network runs
the test images in batches of 1,000 under ``torch.inference_mode``, with a forward pre-hook and hook on
every leaf module adding its wall time to its type (the native Winograd kernels are ctypes calls that
torch's profiler does not see; the hooks time them inside their layer's forward).  It answers how far
the sparse Winograd layers can carry the ensemble: what they take against the rest (stems, 1x1 and
strided convolutions, pooling), which sparsity does not shrink; and each Winograd layer's shape and
time, dense and pruned (``winograd_layer_ratios``).  That per-layer profile runs the stages one by
one (``$ESDBS_NATIVE_CHAIN=off``); a second pass per rung runs them as ``esdbs predict`` does, the
sparse layers and the max-pools among them in lane chains (:mod:`esdbs_ray.winograd_chain`), each
chain timed as one module (``LaneChain``: at the dense rung its stages, which then run one by one;
``chains``).

    python bench/sparse_predict_profile.py runs/quick-ladder [--images 3000] [--rungs 0,0.8]

Needs the experiment of ``bench/sparse_predict.py`` (every rung's weights kept).  Writes
``bench/results/sparse_predict_profile.json`` with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance_block, write_result  # noqa: E402


def load_rung(experiment: str, sparsity: float, tmp: Path):
    from esdbs_ray.ensemble import Ensemble
    from esdbs_ray.export import export_experiment

    out = tmp / f"s{sparsity:g}"
    export_experiment(experiment, out, sparsity=sparsity, onnx=False)
    return Ensemble.load(out, device="cpu", tune_allocator=True)


def profile_rung(ens, sparsity: float, images, chains: bool) -> dict:
    import os

    import torch

    os.environ["ESDBS_NATIVE_CHAIN"] = "auto" if chains else "off"
    ens.predict_proba(images[:1000])  # warm-up: kernels loaded, sparse structures built
    x = torch.addcmul(ens._shift, ens._as_pixels(images).float(), ens._scale)
    seconds, start = collections.Counter(), {}
    layers: dict[str, dict] = {}  # each Winograd layer: its shape and time
    names = {id(mod): f"{member}.{path}" for member in ens.members
             for path, mod in ens.models[member].named_modules()}

    inside = [0]  # LaneChain calls open (chains on: a chain is timed as one module, its stages not)

    def pre(m, _inp):
        start[id(m)] = time.perf_counter()
        inside[0] += chains and type(m).__name__ == "LaneChain"

    def post(m, inp, _out):
        dt = time.perf_counter() - start[id(m)]
        if chains and type(m).__name__ == "LaneChain":
            inside[0] -= 1
        elif inside[0]:
            return
        seconds[type(m).__name__] += dt
        if type(m).__name__ == "WinogradReLUConv2d":
            n, c, h, w = inp[0].shape
            e = layers.setdefault(names[id(m)], {"c": c, "k": m.out_channels, "h": h, "w": w, "seconds": 0.0})
            e["seconds"] += dt

    hooks = [h for name in ens.members for mod in ens.models[name].modules()
             if not list(mod.children()) or chains and type(mod).__name__ == "LaneChain"
             for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name in ens.members:
            for a in range(0, len(x), 1000):
                ens.models[name](x[a:a + 1000])
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    os.environ.pop("ESDBS_NATIVE_CHAIN", None)
    return {"sparsity": sparsity, "chains": chains, "seconds": total,
            "by_module": {k: {"seconds": v, "share": v / total} for k, v in seconds.most_common()},
            "outside_leaf_modules": total - sum(seconds.values()), "winograd_layers": layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--rungs", default="0,0.8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from esdbs_ray.data import load_dataset

    images = load_dataset("fashion-mnist", seed=0).test.images[:args.images]
    rungs = [float(s) for s in args.rungs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ensembles = {s: load_rung(args.experiment, s, Path(tmp)) for s in rungs}
        rows = [profile_rung(ensembles[s], s, images, False) for s in rungs]
        chained = [profile_rung(ensembles[s], s, images, True) for s in rungs]
    for r in rows + chained:
        print(f"sparsity {r['sparsity']:g}, chains {'on' if r['chains'] else 'off'}: {r['seconds']:.2f} s for "
              f"{args.images} images")
        for k, v in r["by_module"].items():
            if v["share"] >= 0.005:
                print(f"  {k:28s} {v['seconds']:6.2f} s {100 * v['share']:5.1f} %")
    doc = {"provenance": provenance_block(vars(args)), "images": args.images, "rows": rows, "chains": chained}
    if len(rows) > 1:
        dense, last = rows[0], rows[-1]
        w = "WinogradReLUConv2d"
        doc["winograd_ratio"] = last["by_module"][w]["seconds"] / dense["by_module"][w]["seconds"]
        doc["rest_ratio"] = ((last["seconds"] - last["by_module"][w]["seconds"])
                             / (dense["seconds"] - dense["by_module"][w]["seconds"]))
        doc["total_ratio"] = last["seconds"] / dense["seconds"]
        print(f"{last['sparsity']:g} vs {dense['sparsity']:g}: total {doc['total_ratio']:.3f}x, Winograd layers "
              f"{doc['winograd_ratio']:.3f}x, the rest {doc['rest_ratio']:.3f}x")
        doc["winograd_layer_ratios"] = {}
        for name, e in dense["winograd_layers"].items():
            if name in last["winograd_layers"]:
                ratio = last["winograd_layers"][name]["seconds"] / e["seconds"]
                doc["winograd_layer_ratios"][name] = ratio
                print(f"  {name:40s} {e['c']:4d}x{e['k']:<4d} @{e['h']}x{e['w']:<3d} dense {1e3 * e['seconds']:7.1f} ms"
                      f"  {ratio:.3f}x")
    if len(chained) > 1 and "LaneChain" in chained[0]["by_module"]:
        dense, last, c = chained[0], chained[-1], "LaneChain"
        doc["chain_ratio"] = last["by_module"][c]["seconds"] / dense["by_module"][c]["seconds"]
        doc["chain_rest_ratio"] = ((last["seconds"] - last["by_module"][c]["seconds"])
                                   / (dense["seconds"] - dense["by_module"][c]["seconds"]))
        doc["chain_total_ratio"] = last["seconds"] / dense["seconds"]
        print(f"chains on, {last['sparsity']:g} vs {dense['sparsity']:g}: total {doc['chain_total_ratio']:.3f}x, "
              f"the chains' stages {doc['chain_ratio']:.3f}x (their share of the dense time "
              f"{dense['by_module'][c]['share']:.2f}), the rest {doc['chain_rest_ratio']:.3f}x")
    print("->", write_result("sparse_predict_profile", doc, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
