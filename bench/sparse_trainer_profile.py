"""Where an SWR member's training step goes, by module type: dense against an 80 %-pruned rung.

The profile beside ``bench/sparse_trainer.py``'s epoch ratio.  The same member (AlexNet at width 0.5,
Winograd-ReLU convolutions, B = 128, SGD as the trainer builds it) trains ``--steps`` steps on
Fashion-MNIST batches, first dense, then with its masks pruned to each ``--sparsity`` (magnitude
pruning of the trainer's ``Pruner``, the optimizer's state of pruned weights dropped as at a rung's
start).  Per step: forward, backward and the optimizer (with the masks' re-application) timed
apart; the forward split by leaf-module type with a pre-hook and a hook on every leaf (the native
Winograd kernels are ctypes calls torch's profiler does not see; the hooks time them inside their
layer); the backward split by autograd node with torch's profiler (a node's event spans the whole
node, the native backward inside the Winograd layer's node included).  It answers how far the sparse
Winograd layers can carry an epoch: what they take against the rest -- the stem, the fully
connected layers, pooling, batch norm, the optimizer -- which sparsity does not shrink.

    python bench/sparse_trainer_profile.py [--steps 20] [--sparsity 0.8]

Writes ``bench/results/sparse_trainer_profile.json`` with the provenance block of ``common.py``.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware_line, provenance_block, write_result  # noqa: E402

WINOGRAD_FWD = "WinogradReLUConv2d"


def _backward_node(name: str) -> str | None:
    """The autograd node of a profiler event's name ("autograd::engine::evaluate_function: XBackward0")."""
    prefix = "autograd::engine::evaluate_function: "
    return name[len(prefix):] if name.startswith(prefix) else None


def profile(model, optimizer, pruner, batches, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    fwd, start, timing = collections.Counter(), {}, [False]

    def pre(m, _inp):
        start[id(m)] = time.perf_counter()

    def post(m, _inp, _out):
        if timing[0]:
            fwd[type(m).__name__] += time.perf_counter() - start[id(m)]

    def step(i):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        pruner.apply_(optimizer)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    hooks = [h for mod in model.modules() if not list(mod.children())
             for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    phases, bwd = collections.Counter(), collections.Counter()
    model.train()
    try:
        for i in range(2):  # warm-up: kernels loaded, sparse structures built
            step(i)
        timing[0] = True
        for i in range(steps):  # timed: phases and the forward's modules
            for k, v in zip(("forward", "backward", "optimizer"), step(i)):
                phases[k] += v
        timing[0] = False
        # as many steps again under torch's profiler (one session: its start and stop log a line each)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                step(i)
        for ev in prof.events():
            node = _backward_node(ev.name)
            if node is not None:
                bwd[node] += ev.cpu_time_total / 1e6
    finally:
        for h in hooks:
            h.remove()
    per = {k: v / steps for k, v in phases.items()}
    return {"step_seconds": sum(per.values()), "phases": per,
            "forward_by_module": {k: v / steps for k, v in fwd.most_common()},
            "backward_by_node": {k: v / steps for k, v in bwd.most_common()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sparsity", default="0.8", help="comma-separated rungs to profile beside the dense step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from esdbs_ray.config import TrainConfig
    from esdbs_ray.data import BatchIterator, load_dataset
    from esdbs_ray.pruning import Pruner, prunable_layers
    from esdbs_ray.train import build_model, build_optimizer

    torch.set_num_threads(a.threads)
    cfg = TrainConfig(dataset="fashion-mnist", subset=4 * a.batch * 8, model=a.model, width=a.width,
                      conv="winograd_relu", schedule="fixed", epochs=1, dbs={"b0": a.batch, "warmup_frac": 0.0},
                      threads=a.threads, seed=0)
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    batches = list(BatchIterator(data.train, batch_size=a.batch, mean=data.mean, std=data.std, shuffle=True, seed=0))
    batches = [b for b in batches if len(b[1]) == a.batch]
    model, _ = build_model(cfg, data)
    optimizer = build_optimizer(cfg, model)
    pruner = Pruner(model)
    print(f"{hardware_line()}\n{a.model} width {a.width}, B {a.batch}, {a.steps} steps a row, "
          f"{len(prunable_layers(model))} prunable layers", flush=True)
    rows = []
    for s in [0.0, *(float(v) for v in a.sparsity.split(","))]:
        if s:
            pruner.prune_to(s)
            pruner.apply_(optimizer)
        r = {"sparsity": s, **profile(model, optimizer, pruner, batches, a.steps)}
        rows.append(r)
        print(f"sparsity {s:g}: {1e3 * r['step_seconds']:.1f} ms a step "
              + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in r["phases"].items()), flush=True)
        for k, v in list(r["forward_by_module"].items())[:6]:
            print(f"  forward  {k:34s} {1e3 * v:7.2f} ms")
        for k, v in list(r["backward_by_node"].items())[:8]:
            print(f"  backward {k:34s} {1e3 * v:7.2f} ms")
    dense = rows[0]

    def winograd(r):  # the Winograd layers' forward and backward
        return r["forward_by_module"].get(WINOGRAD_FWD, 0.0) + sum(
            v for k, v in r["backward_by_node"].items() if "Winograd" in k)

    for r in rows[1:]:
        w0, w1 = winograd(dense), winograd(r)
        r["vs_dense"] = {"step": r["step_seconds"] / dense["step_seconds"], "winograd_layers": w1 / w0 if w0 else None,
                         "rest": (r["step_seconds"] - w1) / (dense["step_seconds"] - w0)}
        r["winograd_share_of_dense_step"] = w0 / dense["step_seconds"]
        print(f"{r['sparsity']:g} vs dense: step {r['vs_dense']['step']:.3f}x; the Winograd layers (forward + backward) "
              f"{r['vs_dense']['winograd_layers']:.3f}x, {100 * w0 / dense['step_seconds']:.0f} % of the dense step; "
              f"the rest {r['vs_dense']['rest']:.3f}x")
    doc = {"provenance": provenance_block(vars(a)), "rows": rows,
           "note": "phases: wall times of `steps` steps without the profiler; backward nodes: torch's profiler over "
                   "`steps` more steps (its overhead included); forward modules: hooks over the timed steps"}
    print("->", write_result("sparse_trainer_profile", doc, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
