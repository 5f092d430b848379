"""The fuzz harness's fork server: imports esdbs once, then runs each case's command in a forked child.

Why a server: a case is one ``esdbs`` command on one mutated file, and hundreds of them must fit in
seconds each -- a fresh interpreter per case costs the 3-4 s of importing torch, pyarrow and the
CLI.  A child forked from a process that has imported them starts in milliseconds.  The server is a
process of its own (not the pytest process), so a child's file descriptors 1 and 2 are the real
standard output and error of the command -- pytest's capture objects are not inherited -- and a
child that hangs or allocates without bound is killed or refused by its own limits, not the suite.

Protocol: one JSON object per line on stdin ``{"argv", "cwd", "env", "timeout", "memory_gb",
"read_only"}``, one JSON object per line on stdout ``{"rc", "timed_out", "seconds", "stdout",
"stderr", "error"}``.  ``rc`` is what ``esdbs_ray.cli.main`` returned; ``read_only``: paths the child
sees through a read-only bind mount (a private mount namespace; root only) or, for other users,
with their write permission removed.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

CLONE_NEWNS = 0x00020000
OUTPUT_LIMIT = 64 * 1024  # bytes of each stream sent back (a runaway print stays bounded)


def _preload() -> None:
    """Import what the commands import, before any thread exists (a forked child inherits modules,
    not threads, so nothing here may start one)."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import yaml  # noqa: F401

    import esdbs_ray.cli  # noqa: F401
    import esdbs_ray.cli_results  # noqa: F401
    import esdbs_ray.cli_train  # noqa: F401
    import esdbs_ray.config  # noqa: F401
    import esdbs_ray.data  # noqa: F401
    import esdbs_ray.ensemble  # noqa: F401
    import esdbs_ray.export  # noqa: F401
    import esdbs_ray.predictions  # noqa: F401
    import esdbs_ray.results  # noqa: F401
    import esdbs_ray.stacking_run  # noqa: F401
    import esdbs_ray.train  # noqa: F401
    import esdbs_ray.analysis.report  # noqa: F401


def _read_only(paths: list[str]) -> None:
    """Make ``paths`` unwritable for this child only."""
    if not paths:
        return
    if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount in a private namespace
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        subprocess.run(["mount", "--make-rprivate", "/"], check=True, capture_output=True)
        for p in paths:
            subprocess.run(["mount", "--bind", p, p], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True, capture_output=True)
    else:
        for p in paths:
            for root, dirs, files in os.walk(p):
                for name in [*dirs, *files]:
                    q = os.path.join(root, name)
                    if not os.path.islink(q):
                        os.chmod(q, os.stat(q).st_mode & ~0o222)
            os.chmod(p, os.stat(p).st_mode & ~0o222)


def _child(case: dict, out_path: str, err_path: str) -> None:
    os.setpgrp()  # the server kills the whole group on a timeout
    code = 99
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
        _read_only(case.get("read_only") or [])
        limit = int(case.get("memory_gb", 0) * 2**30)
        if limit:  # address space: the server's own plus the allowance
            with open("/proc/self/statm") as fh:
                base = int(fh.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (base + limit, base + limit))
        from esdbs_ray.cli import main

        rc = main(list(case["argv"]))
        code = rc if isinstance(rc, int) and 0 <= rc < 256 else 98
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 97
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 96  # an exception escaped main(): never acceptable
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _tail(path: str) -> tuple[str, int]:
    """The stream's text (its middle cut out when long: a cut line is marked, not split) and its count
    of non-empty lines."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return "", 0
    lines = sum(1 for x in data.splitlines() if x.strip())
    if len(data) > OUTPUT_LIMIT:
        data = data[:OUTPUT_LIMIT // 2] + b"[...]" + data[-OUTPUT_LIMIT // 2:]
    return data.decode(errors="replace"), lines


def run_case(case: dict, scratch: str) -> dict:
    out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(case, out_path, err_path)
    deadline = t0 + float(case.get("timeout", 30))
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            for sig in (signal.SIGKILL,):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    stdout, _ = _tail(out_path)
    stderr, n_err = _tail(err_path)
    return {"rc": rc, "timed_out": timed_out, "seconds": round(seconds, 3), "stdout": stdout, "stderr": stderr,
            "stderr_lines": n_err}


def main() -> int:
    import tempfile

    _preload()
    scratch = tempfile.mkdtemp(prefix="esdbs-fuzz-server-")
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = run_case(json.loads(line), scratch)
        except Exception as exc:  # the server itself failed on this case: say so, keep serving
            reply = {"rc": None, "timed_out": False, "seconds": 0.0, "stdout": "", "stderr": "",
                     "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
