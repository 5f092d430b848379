"""Ray Job: the stacking search on a finished experiment's validation predictions.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python jobs/stack.py --print-runtime-env)" -- \\
        python jobs/stack.py --experiment s3://BUCKET/esdbs/paper-cifar10 --sparsity 0.3 --tune-samples 256

    ... --smoke --experiment /shared/esdbs/stack-smoke   # makes a smoke experiment there first if empty

Every method (NLL-optimal, accuracy search, equal, best single, Caruana) runs on the driver; with
``--tune-samples N`` the accuracy search also runs as a Tune experiment spread over the cluster.
Weights and metrics go to ``EXPERIMENT/stacking.json`` (or ``--output``).

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


def _has_summary(experiment: str) -> bool:
    from esdbs_ray import storage
    from esdbs_ray.layout import ExperimentLayout

    try:
        storage.read_bytes(ExperimentLayout.at(experiment).summary)
        return True
    except (FileNotFoundError, OSError):
        return False


def esdbs_argvs(a: argparse.Namespace) -> list[list[str]]:
    exp = require_shared_path("--experiment", a.experiment)
    runs = []
    if a.smoke and not _has_summary(exp):
        runs.append(["run", "--preset", "smoke", "--out", exp, "--quiet"])
    stack = ["stack", exp, "--choose", a.choose, "--seed", str(a.seed)]
    tune_samples = a.tune_samples if a.tune_samples is not None else (4 if a.smoke else 0)
    if tune_samples:
        stack += ["--tune-samples", str(tune_samples)]
    if a.sparsity is not None:
        stack += ["--sparsity", str(a.sparsity)]
    if a.variant:
        stack += ["--variant", a.variant]
    if a.output:
        stack += ["--output", require_shared_path("--output", a.output)]
    return runs + [stack]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", help="a finished `esdbs run` directory: s3://..., gs://..., or absolute")
    p.add_argument("--sparsity", type=float, default=None, help="rung to stack, e.g. 0.3 (default: last)")
    p.add_argument("--variant", default=None)
    p.add_argument("--tune-samples", type=int, default=None, help="accuracy search as a Tune experiment")
    p.add_argument("--choose", default="nll_optimal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="default: EXPERIMENT/stacking.json")
    p.add_argument("--smoke", action="store_true", help="create a smoke experiment first when EXPERIMENT has none")
    p.add_argument("--dry-run", action="store_true", help="print the esdbs command lines and stop")
    p.add_argument("--print-runtime-env", action="store_true", help="print RUNTIME_ENV as JSON and stop")
    a = p.parse_args(argv)
    return run_job(p, a, lambda _config: esdbs_argvs(a),
                   missing=None if a.experiment else "--experiment is required")


if __name__ == "__main__":
    sys.exit(main())
