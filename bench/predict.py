"""Predicting with an exported ensemble: 10,000 Fashion-MNIST test images through the quick preset's stack.

What it measures, on the machine it runs on:

* the wall time of ``esdbs predict``'s prediction step (``Ensemble.member_proba`` + the stacking's
  weighted average over all three members, batches of ``--batch-size``) for the whole test split,
  median of ``--repeats`` timed runs after one warm-up batch; the target is under 10 s on 2 CPU cores;
* the same with the Winograd-ReLU layer's other implementations: the eager reference
  (``ESDBS_WINOGRAD_IMPL=reference``) and the compiled one (``fused``), with the first batch's seconds,
  which for ``fused`` include the compile (or loading it from inductor's on-disk cache); the headline
  figure is what ``auto`` runs (``auto_impl``: the native kernels on CPU);
* the same with onnxruntime on the exported ONNX graphs (the graphs a consumer without torch uses);
* that the export reproduces the run: the ensemble's test accuracy against ``stacking.json``'s (the
  quick preset has no test subset, so both are on the same 10,000 images) and the largest difference
  from the members' Parquet probabilities.

Usage (the run first: ``esdbs run --preset quick --out runs/quick``, 2-4 minutes on 2 cores)::

    python bench/predict.py --experiment runs/quick              # exports to a temporary directory
    python bench/predict.py --export runs/quick-export           # an existing export (no experiment needed)
    taskset -c 0,1 python bench/predict.py --export DIR --threads 2   # pinned to 2 cores of a bigger machine

Writes ``bench/results/predict.json`` (``--out`` elsewhere) with the provenance block of ``common.py``
(CPU model, cores, load averages at start and end: on a shared machine the wall time moves with the
neighbours' load).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, hardware_line, provenance_block, write_result  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        out.append(t.seconds)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="a finished esdbs run (the quick preset's); exported first")
    src.add_argument("--export", help="an esdbs export directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime timing")
    ap.add_argument("--no-fused", action="store_true", help="skip the compiled Winograd layer's timing")
    ap.add_argument("--images", type=int, default=None, help="only the first N test images (a sanity run)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/predict.json)")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from esdbs_ray.ensemble import Ensemble, read_inputs

    export_dir, export_seconds, tmp = a.export, None, None
    if a.experiment:
        from esdbs_ray.export import export_experiment

        tmp = tempfile.TemporaryDirectory(prefix="esdbs-bench-export-")
        export_dir = str(Path(tmp.name) / "ensemble")
        with Timer() as t:
            export_experiment(a.experiment, export_dir)
        export_seconds = t.seconds
    ensemble = Ensemble.load(export_dir, device=a.device, tune_allocator=True)
    inputs = read_inputs(["fashion-mnist:test"], shape=ensemble.input_shape, class_names=ensemble.class_names)
    images, labels = inputs.images[: a.images], inputs.labels[: a.images]
    ensemble.member_proba(images[: a.batch_size], batch_size=a.batch_size)  # warm-up: allocator, thread pools
    result = {}

    def run():
        result["probs"] = ensemble.combine(ensemble.member_proba(images, batch_size=a.batch_size))

    seconds = _time(run, a.repeats)
    acc = float(np.mean(result["probs"].argmax(1) == labels))
    m = ensemble.manifest
    doc = {
        "what": "predict 10,000 Fashion-MNIST test images with an exported ensemble (all members + weighted average)",
        "target": "under 10 s on 2 CPU cores for the quick preset's ensemble",
        "images": int(len(images)), "batch_size": a.batch_size, "device": str(ensemble.device),
        "torch_threads": torch.get_num_threads(), "hardware_line": hardware_line(),
        "members": [{k: x.get(k) for k in ("name", "model", "width", "conv", "nonzero_weights", "model_sparsity")}
                    for x in m["members"]],
        "torch_seconds": seconds, "torch_seconds_median": statistics.median(seconds),
        "images_per_second": len(images) / statistics.median(seconds),
        "ensemble_test_accuracy": acc, "run_test_accuracy": m["ensemble"].get("test_accuracy"),
        "run_n_test": m["ensemble"].get("n_test"),
        # comparable only when the run tested on the same images (no test subset)
        "accuracy_difference": abs(acc - m["ensemble"]["test_accuracy"])
        if m["ensemble"].get("test_accuracy") is not None and m["ensemble"].get("n_test") == len(images) else None,
        "export_seconds": export_seconds,
    }
    if any(x.get("conv") == "winograd_relu" for x in m["members"]):
        # The Winograd-ReLU layer's other implementations beside what "auto" ran above (the native
        # kernels on CPU): the eager reference, and the compiled layer (inductor, per layer shape;
        # its first call compiles or loads inductor's on-disk cache).
        import os

        from esdbs_ray.winograd import IMPL_ENV, resolved_impls

        doc["auto_impl"] = resolved_impls(ensemble.device)["inference"]
        before = os.environ.get(IMPL_ENV)
        for impl in ("reference",) + (() if a.no_fused else ("fused",)):
            os.environ[IMPL_ENV] = impl
            with Timer() as t:
                ensemble.member_proba(images[: a.batch_size], batch_size=a.batch_size)
            f = _time(run, a.repeats)
            doc.update({f"{impl}_first_batch_seconds": t.seconds, f"{impl}_seconds": f,
                        f"{impl}_seconds_median": statistics.median(f),
                        f"{impl}_accuracy": float(np.mean(result["probs"].argmax(1) == labels))})
        if before is None:
            os.environ.pop(IMPL_ENV)
        else:
            os.environ[IMPL_ENV] = before
    if a.experiment:  # the members' own test probabilities from the run
        from esdbs_ray.predictions import prediction_matrix, read_predictions

        P, y, names = prediction_matrix(read_predictions(str(Path(a.experiment) / "predictions")), "test",
                                        ensemble.members, m["ensemble"]["sparsity"])
        if len(y) == len(labels):
            member = ensemble.member_proba(images, batch_size=a.batch_size)
            doc["max_abs_diff_vs_run_probs"] = float(max(np.abs(member[n] - P[k]).max() for k, n in enumerate(names)))
    if not a.no_onnx:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if a.threads:
            so.intra_op_num_threads = a.threads
        sessions = [ort.InferenceSession(str(Path(export_dir) / x["onnx_file"]), so, providers=["CPUExecutionProvider"])
                    for x in m["members"]]
        pixels = images.astype(np.float32)

        def run_onnx():
            for s in sessions:
                for b in range(0, len(pixels), a.batch_size):
                    s.run(["probs"], {"pixels": pixels[b:b + a.batch_size]})

        run_onnx()
        o = _time(run_onnx, a.repeats)
        doc.update(onnxruntime_seconds=o, onnxruntime_seconds_median=statistics.median(o))
    doc["provenance"] = provenance_block(vars(a))
    path = write_result("predict", doc, a.out)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("provenance", "members")}, indent=2))
    print(f"-> {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
