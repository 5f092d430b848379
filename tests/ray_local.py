"""Real Ray processes for tests, on loopback only, stopped by process group (never `ray stop`).

`ray start --node-ip-address 127.0.0.1` alone still advertises the machine's own address on Linux
(Ray "resolves" loopback to a reachable IP); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray
component -- GCS, raylet, agents, dashboard -- on 127.0.0.1.

Token authentication is Ray's default (2.52+).  `ray start` refuses to start without a token, and the
token it looks for is ~/.ray/auth_token -- which exists only once something (a local `ray.init()`)
has generated it.  So a fresh machine failed every test that starts a head before any test had
called `ray.init()`, and the tests depended on the user's own token.  Every Ray of this test session
uses one random token of its own instead, passed through $RAY_AUTH_TOKEN (which Ray reads before
the file); nothing is written to ~/.ray.
"""
from __future__ import annotations

import os
import secrets
import signal
import tempfile
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One `ray start --block` process group (a head or a worker node)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **LOOPBACK_ENV, **(env or {})},
        )

    temp_dir: str | None = None  # removed when the node stops

    def stop(self) -> None:
        """SIGKILL the node's process group, then remove its temp dir.

        Not SIGTERM first: `ray start --block` takes ~34 s to exit on SIGTERM (measured: a bare 2-CPU
        head on 127.0.0.1), so a grace period only ever ran out -- 5 s per node, each on a test
        worker's critical path.  Nothing a test reads is in memory by then.  Ray's worker processes
        run in process groups of their own and exit when their raylet is gone."""
        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        finally:
            if self.temp_dir:
                import shutil

                shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(tmp: Path, num_cpus: int = 2, dashboard: bool = False) -> tuple[RayNode, str, int | None]:
    port = free_port()
    # Its own --temp-dir: a head started with the default one writes its address to
    # /tmp/ray/ray_current_cluster, where a job driver on another test cluster of this machine (pytest-xdist
    # runs two workers) resolves "auto" -- and connects to the wrong cluster with the wrong token.
    # Short path: Ray's Unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="esdbs-ray-", dir="/tmp")
    args = ["--head", "--port", str(port), "--num-cpus", str(num_cpus), "--temp-dir", temp_dir]
    dash_port = None
    if dashboard:
        dash_port = free_port()
        args += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port)]
    else:
        args += ["--include-dashboard", "false"]
    node = RayNode(args, tmp / "ray-head.log")
    node.temp_dir = temp_dir
    address = f"127.0.0.1:{port}"
    wait_for_nodes(address, 1)
    return node, address, dash_port


def wait_for_nodes(address: str, n: int, timeout: float = 90.0) -> None:
    """Wait until the cluster at `address` has `n` alive nodes (asked from a separate process)."""
    code = (
        "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False);"
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                           env={**os.environ, **LOOPBACK_ENV}, timeout=60)
        if r.returncode == 0 and r.stdout.strip().splitlines() and int(r.stdout.strip().splitlines()[-1]) >= n:
            return
        time.sleep(1.0)
    raise TimeoutError(f"Ray at {address} did not reach {n} node(s) in {timeout}s")
