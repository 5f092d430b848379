"""Ray Job: the DBS-constant search (ASHA over k, v0, n, warm-up, B0, Bmax, eta0; spec section 6).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python jobs/dbs_search.py --print-runtime-env)" -- \\
        python jobs/dbs_search.py --dataset cifar10 --out s3://BUCKET/esdbs/dbs-search-cifar10

    ... --smoke --out /shared/esdbs/dbs-smoke     # two samples, two epochs, the smoke subset

The best constants land in ``OUT/dbs_constants.json``; reuse them with
``python jobs/run_paper.py --dbs-constants OUT/dbs_constants.json`` (a path the head node reads).
``--out`` must be storage every node sees: s3://..., gs://..., or an absolute path on NFS.

Runtime environment (``RUNTIME_ENV``): the project checkout as ``working_dir`` (``--working-dir .``),
without .venv / runs / .git / build outputs; the cluster's Python already has the dependencies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working_dir

from jobs._support import (  # noqa: E402
    EXCLUDES, RUNTIME_ENV, SubmitError, job_runtime_env as runtime_env, require_shared_path, run_job,
)
DATASETS = ("fashion-mnist", "cifar10", "cifar100")


def esdbs_argv(a: argparse.Namespace, config_path: str) -> list[str]:
    argv = ["dbs-search", "--preset", "smoke" if a.smoke else a.preset, "--config", config_path,
            "--out", require_shared_path("--out", a.out), "--quiet"]
    num_samples, epochs = a.num_samples, a.epochs
    if a.smoke:
        num_samples, epochs = num_samples or 2, epochs or 2
    if num_samples:
        argv += ["--num-samples", str(num_samples)]
    if epochs:
        argv += ["--epochs", str(epochs)]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--preset", default="paper", choices=("quick", "paper"), help="model width / data (default: paper)")
    p.add_argument("--out", required=False, help="s3://..., gs://..., or an absolute path on NFS")
    p.add_argument("--num-samples", type=int, default=None, help="sampled constant sets (default: the config's 8)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per sample (default: the config's 6)")
    p.add_argument("--data-dir", default=None, help="dataset directory on the head node")
    p.add_argument("--smoke", action="store_true", help="smoke preset, 2 samples x 2 epochs")
    p.add_argument("--dry-run", action="store_true", help="print the esdbs command line and stop")
    p.add_argument("--print-runtime-env", action="store_true", help="print RUNTIME_ENV as JSON and stop")
    a = p.parse_args(argv)
    name = f"{'smoke' if a.smoke else a.preset}-{a.dataset}-dbs-search"
    return run_job(p, a, lambda config: [esdbs_argv(a, config)], missing=None if a.out else "--out is required",
                   name=name, dataset=a.dataset)


if __name__ == "__main__":
    sys.exit(main())
