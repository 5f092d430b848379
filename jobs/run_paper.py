"""Ray Job: the paper's experiment on one dataset (preset ``paper-<dataset>``: its variants x members,
the sparsity ladder and the batch sweep beside DBS -- 42 Tune trials at the paper's scale).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python jobs/run_paper.py --print-runtime-env)" -- \\
        python jobs/run_paper.py --dataset cifar10 --out s3://BUCKET/esdbs/paper-cifar10

    ... --smoke --out /shared/esdbs/smoke     # the smoke preset: about a minute on 2 CPUs

Continue an interrupted run with ``--resume OUT`` (same --out).  ``--out`` must be storage every node
sees: s3://..., gs://..., or an absolute path on NFS.  The dataset is read by the job's driver on the
head node (--data-dir, $ESDBS_DATA, or the default places; see esdbs_ray/data.py).

Runtime environment (``RUNTIME_ENV``): the project checkout as ``working_dir`` (``--working-dir .``),
without .venv / runs / .git / build outputs.  The cluster's Python must already have the project's
dependencies (cluster.yaml's setup_commands install them), so no ``pip`` / ``conda`` field is needed.
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
    if a.resume:
        return ["run", "--resume", require_shared_path("--resume", a.resume), "--quiet"]
    argv = ["run", "--preset", "smoke" if a.smoke else f"paper-{a.dataset}",
            "--out", require_shared_path("--out", a.out), "--quiet"]
    if a.smoke:  # the smoke preset is Fashion-MNIST's; say which dataset it runs on
        argv[3:3] = ["--config", config_path]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    if a.dbs_constants:
        argv += ["--dbs-constants", a.dbs_constants]
    if a.dbs_search:
        argv.append("--dbs-search")
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--out", help="experiment directory: s3://..., gs://..., or an absolute path on NFS")
    p.add_argument("--resume", metavar="OUT", help="continue the interrupted run in OUT")
    p.add_argument("--data-dir", default=None, help="dataset directory on the head node")
    p.add_argument("--dbs-constants", default=None, help="JSON from jobs/dbs_search.py (a path the head node reads)")
    p.add_argument("--dbs-search", action="store_true", help="also run the DBS-constant search stage")
    p.add_argument("--smoke", action="store_true", help="the smoke preset (tiny subset, two epochs)")
    p.add_argument("--dry-run", action="store_true", help="print the esdbs command line and stop")
    p.add_argument("--print-runtime-env", action="store_true", help="print RUNTIME_ENV as JSON and stop")
    a = p.parse_args(argv)
    return run_job(p, a, lambda config: [esdbs_argv(a, config)],
                   missing=None if (a.out or a.resume) else "--out (or --resume) is required",
                   name=f"smoke-{a.dataset}", dataset=a.dataset)


if __name__ == "__main__":
    sys.exit(main())
