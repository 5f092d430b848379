"""Where a lane chain pays: each chain of the registry's networks, its layers pruned at random to a
density, run in the lanes with every layer sparse, against its stages one by one (each layer on the
path ``auto`` picks for it alone: sparse under the per-layer crossover, else dense; torch's max-pools).

    python bench/sparse_chain.py [--densities 1,0.8,0.7,0.5,0.3] [--rounds 7] [--quick]

Networks: AlexNet, ConvPool-CNN-C and All-CNN-C at the quick preset's width (1/4) and at full width on
1x28x28 images, VGG-16 at 1/4 width on 3x32x32 (the chains ``prepare_for_inference`` forms); batch
1,000 at 1/4 width and 256 at full width; random weights, batch-norm statistics and masks (each layer
keeps round(density x entries)).  Each chain is timed on its own input (captured in a forward of the
network), the two modes interleaved round by round, min of the rounds -- those on maps of fewer than
``winograd_chain.CHAIN_MIN_TILES`` tiles too, which the rule keeps out of chains (the evidence for it).
Per density, over the chains the rule forms: the median of chain / stages, and how many chains the
chain ran faster on.  The crossover
(``crossover``): the largest density at which the chains took 0.95x their stages' time or less in
median and no more than their stages' time on at least three quarters of them -- the rule of
``bench/sparse_winograd.py``'s per-layer crossover -- which is ``winograd_chain.CHAIN_CROSSOVER``.

Writes ``bench/results/sparse_chain.json`` with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, hardware_line, median, provenance_block, write_result  # noqa: E402

# (network, width, input channels, image size, batch)
NETWORKS = [("alexnet", 0.25, 1, 28, 1000), ("convpool_cnn_c", 0.25, 1, 28, 1000), ("all_cnn_c", 0.25, 1, 28, 1000),
            ("vgg16", 0.25, 3, 32, 1000), ("alexnet", 1.0, 1, 28, 256), ("convpool_cnn_c", 1.0, 1, 28, 256),
            ("all_cnn_c", 1.0, 1, 28, 256)]


def chains_of(name: str, width: float, cin: int, size: int, batch: int, density: float, seed: int):
    """The prepared network's chains, each with its input: [(label, chain, x, layers, tiles)], tiles the
    fewest 2x2 tiles a map of the chain's layers has (what winograd_chain.CHAIN_MIN_TILES is about)."""
    import torch
    from torch import nn

    from esdbs_ray.inference import prepare_for_inference
    from esdbs_ray.networks import build_network
    from esdbs_ray.winograd import WinogradReLUConv2d, winograd_layers
    from esdbs_ray.winograd_chain import LaneChain

    g = torch.Generator().manual_seed(seed)
    model = build_network(name, num_classes=10, in_channels=cin, image_size=size, width=width, conv="winograd_relu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
        for _, layer in winograd_layers(model):
            w = layer.weight.view(-1)
            keep = torch.randperm(w.numel(), generator=g)[:int(round(density * w.numel()))]
            mask = torch.zeros_like(w)
            mask[keep] = 1
            w.mul_(mask)
    model = prepare_for_inference(model.eval())
    for _, layer in winograd_layers(model):  # density 1: a mask too (all ones), so that "on" runs it sparse
        if getattr(layer, "weight_mask", None) is None:
            layer.register_buffer("weight_mask", torch.ones_like(layer.weight))
    found, inputs, hooks = [], {}, []
    for path, m in model.named_modules():
        if isinstance(m, LaneChain):
            found.append((path, m))
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, p=path: inputs.__setitem__(p, inp[0].clone())))
    os.environ["ESDBS_NATIVE_CHAIN"] = "off"
    with torch.inference_mode():
        model(torch.randn(batch, cin, size, size, generator=g))
    for h in hooks:  # (not while timing: a copy of the input per call)
        h.remove()
    out = []
    for path, m in found:
        layers = [s for s in m.stages if isinstance(s, WinogradReLUConv2d)]
        shape = "-".join(f"{s.in_channels}x{s.out_channels}" if isinstance(s, WinogradReLUConv2d) else "pool"
                         for s in m.stages if isinstance(s, (WinogradReLUConv2d, nn.MaxPool2d)))
        label = f"{name}@{width:g}.{path} [{shape}] {tuple(inputs[path].shape[2:])}"
        h, w = inputs[path].shape[2:]
        tiles = []
        for s in m.stages:  # each layer's map, the pools shrinking them
            if isinstance(s, WinogradReLUConv2d):
                tiles.append(((h + 1) // 2) * ((w + 1) // 2))
            elif isinstance(s, nn.MaxPool2d):
                k, st, p = s.kernel_size, s.stride, s.padding
                h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        out.append((label, m, inputs[path], len(layers), min(tiles)))
    return out


def time_chain(chain, x, rounds: int) -> tuple[float, float, list]:
    """min over rounds of (stages one by one with auto's per-layer choice, the chain all sparse)."""
    import torch

    modes = {"stages": ("auto", "off"), "chain": ("on", "auto")}
    times = {k: [] for k in modes}
    plan = None
    with torch.inference_mode():
        for r in range(rounds + 1):
            for k, (sparse, ch) in modes.items():
                os.environ["ESDBS_NATIVE_SPARSE"], os.environ["ESDBS_NATIVE_CHAIN"] = sparse, ch
                t0 = time.perf_counter()
                chain(x)
                if r:
                    times[k].append(time.perf_counter() - t0)
                if k == "chain":
                    plan = chain.last_plan
    return min(times["stages"]), min(times["chain"]), plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--densities", default="1,0.8,0.7,0.5,0.3")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="1/4 width networks only, 3 rounds")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from esdbs_ray.winograd_dispatch import tune_cpu_allocator

    from esdbs_ray import winograd_chain

    tune_cpu_allocator()
    # every chain timed in the lanes, also those on maps the rule keeps out (CHAIN_MIN_TILES): the
    # evidence for that rule; the summary and the crossover count the chains the rule forms
    min_tiles, winograd_chain.CHAIN_MIN_TILES = winograd_chain.CHAIN_MIN_TILES, 0
    if a.quick:
        a.rounds = 3
    densities = [float(d) for d in a.densities.split(",")]
    nets = [n for n in NETWORKS if not a.quick or n[1] < 1]
    print(hardware_line(), flush=True)
    rows = []
    for d in densities:
        for i, (name, width, cin, size, batch) in enumerate(nets):
            for label, chain, x, nlayers, tiles in chains_of(name, width, cin, size, batch, d, seed=100 + i):
                stages, chained, plan = time_chain(chain, x, a.rounds)
                ran = all(kind == "chain" for kind, _ in plan)
                rows.append({"density": d, "chain": label, "layers": nlayers, "batch": int(x.shape[0]),
                             "tiles_per_image": tiles, "rule_chains_it": tiles >= min_tiles,
                             "stages_ms": 1e3 * stages, "chain_ms": 1e3 * chained, "ratio": chained / stages,
                             "ran_as_one_chain": ran})
                print(f"  d {d:g} {label}: {rows[-1]['ratio']:.3f}x ({1e3 * stages:.1f} -> {1e3 * chained:.1f} ms)",
                      flush=True)
    os.environ.pop("ESDBS_NATIVE_SPARSE", None)
    os.environ.pop("ESDBS_NATIVE_CHAIN", None)
    summary = []
    for d in densities:
        r = [row["ratio"] for row in rows if row["density"] == d and row["rule_chains_it"]]
        summary.append({"density": d, "median_ratio": median(r), "faster": sum(v <= 1.0 for v in r), "chains": len(r)})
    print(format_table(summary, [("density", "density", "g"), ("chain / stages (median)", "median_ratio", ".3f"),
                                 ("chains faster", "faster", "d"), ("of", "chains", "d")]))
    passing = [s["density"] for s in summary if s["median_ratio"] <= 0.95 and 4 * s["faster"] >= 3 * s["chains"]]
    crossover = max(passing) if passing else 0.0
    print(f"crossover (the chains' layers run sparse at or below): {crossover:g}")
    doc = {"provenance": provenance_block(vars(a)), "torch_threads": torch.get_num_threads(), "rows": rows,
           "summary": summary, "crossover": crossover}
    print(f"-> {write_result('sparse_chain', doc, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
