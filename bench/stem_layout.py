"""The image stem's memory layout in training: ``StemConv2d``'s channels-last path against ``nn.Conv2d``'s.

A single-channel NCHW image gives the stem conv an ambiguous memory format; oneDNN answers in NCHW, so
the stem's batch norm and max-pool run torch's NCHW kernels (the max-pool ~10x slower than on
channels-last) while the first Winograd layer hands its input gradient back channels-last.
``models.StemConv2d`` runs the stem as a two-channel channels-last convolution instead.  This measures a
member's training step (forward, backward, SGD and the masks) both ways, side by side in one process:
rounds alternate the two arms (the plain arm is ``nn.Conv2d.forward`` put back on the class), and a
config's figure is the median over rounds of the mean step time.

    python bench/stem_layout.py [--rounds 5] [--steps 10]

Writes ``bench/results/stem_layout.json`` with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, hardware_line, median, provenance_block, write_result  # noqa: E402

# (model, width, conv, sparsity): the trainer benchmark's member, the quick preset's members, a spatial one
CONFIGS = [("alexnet", 0.5, "winograd_relu", 0.0), ("alexnet", 0.5, "winograd_relu", 0.8),
           ("alexnet", 0.5, "spatial", 0.0), ("convpool_cnn_c", 0.25, "winograd_relu", 0.0),
           ("all_cnn_c", 0.25, "winograd_relu", 0.0), ("all_cnn_c", 0.25, "spatial", 0.0),
           ("secnn", 1.0, "spatial", 0.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch import nn

    from esdbs_ray.config import TrainConfig
    from esdbs_ray.data import BatchIterator, load_dataset
    from esdbs_ray.models import StemConv2d
    from esdbs_ray.pruning import Pruner
    from esdbs_ray.train import build_model, build_optimizer

    torch.set_num_threads(a.threads)
    data = load_dataset("fashion-mnist", subset=a.batch * 8, seed=0)
    batches = [b for b in BatchIterator(data.train, batch_size=a.batch, mean=data.mean, std=data.std, shuffle=True,
                                        seed=0) if len(b[1]) == a.batch]
    channels_last_forward = StemConv2d.forward
    print(f"{hardware_line()}\nB {a.batch}, {a.rounds} rounds x {a.steps} steps per arm", flush=True)
    rows = []
    for model_name, width, conv, sparsity in CONFIGS:
        cfg = TrainConfig(dataset="fashion-mnist", model=model_name, width=width, conv=conv, epochs=1,
                          dbs={"b0": a.batch, "warmup_frac": 0.0}, threads=a.threads, seed=0)
        model, _ = build_model(cfg, data)
        optimizer = build_optimizer(cfg, model)
        pruner = Pruner(model)
        if sparsity:
            pruner.prune_to(sparsity)
            pruner.apply_(optimizer)
        model.train()

        def steps(n):
            t0 = time.perf_counter()
            for i in range(n):
                x, y = batches[i % len(batches)]
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pruner.apply_(optimizer)
            return (time.perf_counter() - t0) / n

        times = {"channels_last": [], "nchw": []}
        try:
            for r in range(a.rounds):
                for arm in (("channels_last", "nchw") if r % 2 == 0 else ("nchw", "channels_last")):
                    StemConv2d.forward = channels_last_forward if arm == "channels_last" else nn.Conv2d.forward
                    steps(2)  # warm-up after the switch: oneDNN primitives for the layout
                    times[arm].append(steps(a.steps))
        finally:
            StemConv2d.forward = channels_last_forward
        cl, nchw = median(times["channels_last"]), median(times["nchw"])
        rows.append({"model": model_name, "width": width, "conv": conv, "sparsity": sparsity,
                     "step_ms_channels_last": 1e3 * cl, "step_ms_nchw": 1e3 * nchw, "ratio": cl / nchw,
                     "rounds": times})
        print(f"  {model_name} x{width} {conv} {sparsity:.0%}: channels-last {1e3 * cl:.1f} ms, "
              f"NCHW {1e3 * nchw:.1f} ms, {cl / nchw:.3f}x", flush=True)
    print(format_table(rows, [("model", "model", ""), ("width", "width", "g"), ("conv", "conv", ""),
                              ("sparsity", "sparsity", "g"), ("ms CL stem", "step_ms_channels_last", ".1f"),
                              ("ms NCHW stem", "step_ms_nchw", ".1f"), ("ratio", "ratio", ".3f")]))
    doc = {"provenance": provenance_block(vars(a)), "rows": rows}
    print("->", write_result("stem_layout", doc, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
