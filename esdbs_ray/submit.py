"""``esdbs submit``: run ``esdbs run`` on a Ray cluster as a Ray Job, with the cluster's token.

    esdbs submit --address http://127.0.0.1:8265 -- --preset paper --out s3://bucket/esdbs/paper

The job's entry point is ``python -m esdbs_ray.cli run <run args>``, run by the cluster's Python in a
copy of ``working_dir`` (the project checkout; ``.venv``, ``runs/``, ``.git`` ... are left out), so the
cluster runs exactly the code on the submitter's disk.  :func:`submit` prints the job id, follows
the job's logs and returns the job's status as an exit code.

Token authentication (``RAY_AUTH_MODE=token`` on the cluster): the token is ``token=`` when given,
else looked up in Ray's order (:func:`find_token`): ``$RAY_AUTH_TOKEN``, the file
``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.  It is sent as ``Authorization: Bearer <token>`` -- and only over the address
given, which should be the dashboard reached through an SSH tunnel (``ray dashboard cluster.yaml``)
or a private network, never a port open to the world.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import UserError

# Never uploaded with the job (Ray also honours .gitignore / .rayignore in working_dir).
EXCLUDES = [
    ".venv", "venv", ".git", "runs", "results", "build", "dist", "__pycache__", "*.egg-info",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", "*.pt", "*.parquet",
    "events.out.tfevents.*", ".whl", ".gl",
]
# Exit codes: the job's terminal status, or what kept us from knowing it.
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 124, 130
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError):
    """The job could not be submitted or followed (cluster unreachable, token refused, bad arguments)."""


def runtime_env(working_dir: str | os.PathLike = ".", env_vars: dict | None = None) -> dict:
    """The job's runtime_env: the project checkout as working_dir, minus the heavy or private parts."""
    from .provenance import git_revision

    wd = Path(working_dir).expanduser().resolve()
    if not (wd / "esdbs_ray" / "__init__.py").is_file():
        raise SubmitError(f"working_dir {wd} is not the esdbs_ray project checkout (no esdbs_ray/__init__.py)")
    # The job's copy has no .git: the revision travels as ESDBS_GIT_REVISION.  esdbs's driver passes
    # the same variable in its own ray.init(runtime_env=...); Ray refuses a job/driver overlap unless
    # RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (the values are equal, so the merge changes nothing).
    env = {"ESDBS_GIT_REVISION": git_revision(), "PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    env.update(env_vars or {})
    return {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": env}


# What every jobs/ entry point declares for `ray job submit --working-dir .`: the checkout minus EXCLUDES.
JOB_RUNTIME_ENV = {"working_dir": ".", "excludes": EXCLUDES, "env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}}


def job_runtime_env() -> dict:
    """JOB_RUNTIME_ENV plus the revision of the checkout it is printed from (the job's copy has no .git)."""
    from .provenance import git_revision

    return {**JOB_RUNTIME_ENV, "env_vars": {**JOB_RUNTIME_ENV["env_vars"], "ESDBS_GIT_REVISION": git_revision()}}


def entrypoint(run_args: Sequence[str]) -> str:
    return "python -m esdbs_ray.cli run " + shlex.join(list(run_args))


def check_run_args(run_args: Sequence[str]) -> list[str]:
    """Fail here, not on the cluster: the job must be told where to write, as a path every node sees.

    A relative ``--out`` (or none: ``runs/...``) would land in the job's temporary working directory
    on the head node, which Ray deletes; so ``--out`` / ``--resume`` must be absolute paths (a shared
    file system) or URIs (``s3://``, ``gs://``).
    """
    args = list(run_args)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "run":
        args = args[1:]

    def value(flag: str) -> str | None:
        for i, a in enumerate(args):
            if a == flag:
                if i + 1 >= len(args):
                    raise SubmitError(f"{flag} needs a value")
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None

    out, resume = value("--out"), value("--resume")
    if out is None and resume is None:
        raise SubmitError("pass --out DIR (an absolute path on shared storage, or s3://... / gs://...) "
                          "so the results outlive the job")
    for flag, path in (("--out", out), ("--resume", resume)):
        if path is not None:
            require_shared_path(flag, path)
    for flag in ("--config", "--dbs-constants"):
        path = value(flag)
        if path is not None and "://" not in path and os.path.isabs(path):
            print(f"esdbs submit: note: {flag} {path} is read on the cluster's head node, not here; "
                  "a path relative to the project directory travels with the job", file=sys.stderr)
    return args


def require_shared_path(flag: str, path: str) -> str:
    """A results path a Ray Job may write: a URI (s3://, gs://, file://) or an absolute path (NFS)."""
    if "://" not in path and not os.path.isabs(path):
        raise SubmitError(f"{flag} {path!r} is relative: in a Ray Job it would land in the job's temporary "
                          "working directory, which Ray deletes; give an absolute path on storage every node "
                          "shares (NFS) or a URI (s3://..., gs://...)")
    return path


def find_token() -> str | None:
    """The token Ray's clients would send, looked up as Ray does (env, then token file, then default
    file) but read fresh on every call: Ray's own loader caches the first token a process saw."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file") from None
        return None


def check_address(address: str, *, insecure: bool = False) -> str:
    """The dashboard address, refused when it is plain http to another machine: the token would cross
    the network in clear (``Authorization: Bearer``).  https, or http to this machine (an SSH tunnel:
    ``ray dashboard cluster.yaml``), pass; ``insecure`` lets plain http through with a warning."""
    from urllib.parse import urlsplit

    url = address if "://" in address else "http://" + address
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError as exc:
        raise SubmitError(f"--address {address}: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise SubmitError(f"--address {address}: expected http(s)://HOST:PORT of the cluster's dashboard")
    if parts.scheme == "http" and not _loopback(host):
        if not insecure:
            raise SubmitError(f"--address {address}: plain http to another machine would send the cluster's token "
                              "in clear; use https://, an SSH tunnel to 127.0.0.1 (`ray dashboard cluster.yaml`), or "
                              "--insecure on a network you trust")
        print(f"esdbs submit: warning: --insecure: the token goes to {host} over plain http, unencrypted",
              file=sys.stderr, flush=True)
    return url


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _ray_logs(verbose: bool):
    """Ray's client logs each packaging and upload step at INFO on stderr; esdbs says what happened in
    its own lines, so Ray's appear only with --verbose."""
    import logging

    logger = logging.getLogger("ray")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _auth_headers(token: str | None) -> dict:
    token = (token if token is not None else find_token() or "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _explicit_address():
    """Ray lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override the address argument; here the
    address the user typed wins (RAY_ADDRESS usually names a GCS, not the job server)."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str, token: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = "http://" + address
    headers = _auth_headers(token)
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        where = ("copy the head node's ~/.ray/auth_token (`ray get-auth-token` there) to ~/.ray/auth_token here, "
                 "or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
        if exc.message.startswith("Authentication failed"):  # HTTP 403: a token, not this cluster's
            raise SubmitError(f"{address} refused the token (HTTP 403): it is not this cluster's token; {where}") from None
        if exc.message.startswith("Authentication required"):  # HTTP 401: no token sent
            raise SubmitError(f"{address} refused the request (HTTP 401): the cluster requires its token; {where}") from None
        raise SubmitError(f"no token for {address} found here (RAY_AUTH_MODE=token); {where}") from None
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({exc}); is the cluster up, and is the "
                          "SSH tunnel open (`ray dashboard cluster.yaml`)?") from None
    except Exception as exc:  # invalid URL, TLS, a proxy answering HTML ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SubmitError(f"cannot use the Ray job server at {address}: {first}") from None


async def _tail(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _follow(client, job_id: str, timeout: float | None, out) -> str | None:
    """Stream the job's logs until it ends; its final status, or None when ``timeout`` ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        asyncio.run(asyncio.wait_for(_tail(client, job_id, out), timeout))
    except asyncio.TimeoutError:
        return None
    except RuntimeError as exc:  # the log stream broke (e.g. the dashboard restarted): poll instead
        print(f"esdbs submit: log stream ended ({str(exc).splitlines()[0]}); polling the job's status",
              file=sys.stderr)
    # The stream closes when the job ends; its status may take a moment to follow.
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(1.0)


def submit(address: str, run_args: Sequence[str], *, token: str | None = None, working_dir: str | os.PathLike = ".",
           follow: bool = True, timeout: float | None = None, verbose: bool = False) -> int:
    """Submit ``esdbs run <run_args>`` to the cluster whose dashboard is ``address`` (http://HOST:8265).

    Prints the job id; with ``follow`` streams the job's logs and returns 0 when the job SUCCEEDED,
    1 when it FAILED or was STOPPED, 124 when ``timeout`` seconds passed first (the job keeps
    running).  Without ``follow`` returns 0 once the job is accepted.  Raises :class:`SubmitError`
    (a RuntimeError) when the cluster is unreachable, refuses the token, or the arguments would
    lose the results.
    """
    from ray.exceptions import AuthenticationError

    if timeout is not None and not 0 < timeout < float("inf"):
        raise SubmitError(f"--timeout={timeout}: seconds, a positive number")
    args = check_run_args(run_args)
    env = runtime_env(working_dir)
    with _ray_logs(verbose):
        client = _client(address, token)
        try:
            job_id = client.submit_job(entrypoint=entrypoint(args), runtime_env=env,
                                       metadata={"submitted_by": "esdbs submit"})
        except AuthenticationError as exc:
            raise SubmitError(f"{address} refused the job: {exc.message.splitlines()[0]}") from None
        except RuntimeError as exc:
            raise SubmitError(f"{address} did not accept the job: {str(exc).splitlines()[0]}") from None
    print(f"esdbs submit: job {job_id} submitted to {address}", flush=True)
    follow_hint = f"ray job logs --follow {job_id} --address {address}"
    if not follow:
        print(f"esdbs submit: follow it with `{follow_hint}`", flush=True)
        return EXIT_SUCCEEDED
    try:
        status = _follow(client, job_id, timeout, sys.stdout)
    except KeyboardInterrupt:
        print(f"\nesdbs submit: stopped following; job {job_id} keeps running. Follow: `{follow_hint}`; "
              f"stop: `ray job stop {job_id} --address {address}`", file=sys.stderr, flush=True)
        raise
    if status is None:
        print(f"esdbs submit: job {job_id} still running after {timeout:.0f}s; follow: `{follow_hint}`",
              file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    message = ""
    if status != "SUCCEEDED":
        with contextlib.suppress(Exception):
            message = client.get_job_info(job_id).message or ""
    print(f"esdbs submit: job {job_id} {status}" + (f": {message}" if message else ""), file=sys.stderr, flush=True)
    return EXIT_SUCCEEDED if status == "SUCCEEDED" else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``python -m esdbs_ray.submit --address URL [--no-follow] [--timeout S] -- <esdbs run args>``
    (the same as ``esdbs submit``, for a checkout whose cli.py does not have it yet)."""
    import argparse

    p = argparse.ArgumentParser(prog="esdbs submit", description=main.__doc__)
    p.add_argument("--address", required=True, help="the cluster's dashboard, http://HOST:8265")
    p.add_argument("--working-dir", default=".", help="the project checkout to upload (default: .)")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    p.add_argument("--insecure", action="store_true", help="allow plain http to another machine")
    p.add_argument("--verbose", action="store_true", help="Ray's own log lines on stderr")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then the arguments of `esdbs run`")
    a = p.parse_args(argv)
    try:
        check_address(a.address, insecure=a.insecure)
        return submit(a.address, a.run_args, working_dir=a.working_dir, follow=not a.no_follow, timeout=a.timeout,
                      verbose=a.verbose)
    except SubmitError as exc:
        print(f"esdbs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
