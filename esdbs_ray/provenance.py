"""Provenance stamped on every result: git revision, package versions, host and device."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_revision() -> str:
    """HEAD of the checkout the package runs from, ``+dirty`` when it has uncommitted changes.

    Ray workers run from a copy of the working directory without ``.git``; the driver passes its
    revision down through ``ESDBS_GIT_REVISION`` so results still name the code that made them.
    """
    if os.environ.get("ESDBS_GIT_REVISION"):
        return os.environ["ESDBS_GIT_REVISION"]
    try:
        rev = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "ray", "numpy", "pyarrow", "esdbs_ray"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed here: leave it out rather than fail a run
            pass
    return out


def device_info() -> dict[str, str | int]:
    import torch

    info: dict[str, str | int] = {"cpu": cpu_model(), "cpu_count": os.cpu_count() or 0,
                                  "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    return {
        "git_revision": git_revision(),
        "versions": versions(),
        "host": socket.gethostname(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
