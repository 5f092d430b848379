"""What every ``jobs/`` entry point shares: the runtime environment it declares and the body that
prints or runs its ``esdbs`` command lines.  The jobs' own module, so that ``esdbs_ray.submit`` (used
by ``esdbs submit``) never imports the CLI back."""
from __future__ import annotations

from pathlib import Path

from esdbs_ray.submit import (  # noqa: F401  (re-exported for the entry points)
    EXCLUDES, JOB_RUNTIME_ENV as RUNTIME_ENV, SubmitError, job_runtime_env, require_shared_path,
)


def run_job(parser, a, build, *, missing: str | None = None, name: str | None = None,
            dataset: str | None = None) -> int:
    """The shared body of every jobs/ entry point.

    ``--print-runtime-env`` prints :func:`job_runtime_env` (run it where you submit from: it stamps
    your checkout's revision); else ``missing`` (a required-argument message) stops with a usage
    error; else ``build(config_path)`` gives the ``esdbs`` command lines -- ``config_path`` is a
    ``{name, dataset}`` YAML when ``name`` is given -- which are printed and run in order (only
    printed with ``--dry-run``)."""
    import json
    import tempfile

    if a.print_runtime_env:
        print(json.dumps(job_runtime_env()))
        return 0
    if missing:
        parser.error(missing)
    with tempfile.TemporaryDirectory(prefix="esdbs-job-") as tmp:
        config = None
        if name is not None:
            config = Path(tmp) / "dataset.yaml"
            config.write_text(json.dumps({"name": name, "dataset": dataset}) + "\n")  # JSON is YAML
        try:
            runs = build(str(config) if config else None)
        except SubmitError as exc:
            parser.error(str(exc))
        from esdbs_ray.cli import main as esdbs

        for args in runs:
            print("esdbs " + " ".join(args), flush=True)
            if not a.dry_run and (rc := esdbs(args)):
                return rc
    return 0
