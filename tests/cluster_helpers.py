"""A two-node Ray cluster on 127.0.0.1 with its own token, for tests/test_cluster.py.

Built on ray_local.RayNode (process groups, stopped with RayNode.stop(), never `ray stop`).  The
cluster gets a fresh random token through $RAY_AUTH_TOKEN -- not ~/.ray/auth_token, which other Ray
users of this machine share -- and the virtual environment's bin/ on PATH, so a job's `python` is
the project's Python (as on a cluster whose setup installed the project).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ray_local


# `ray start --address` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("multi-node clusters
# are not supported on Windows and OSX"), and with =1 it "resolves" 127.0.0.1 to the machine's address
# (GCS unreachable there, and agents listening on it).  So the joining node runs Ray's CLI with that
# one check passed (the CLI module sees ENABLE_RAY_CLUSTER=True); address resolution in the CLI and
# every process it starts (env =0) stays on loopback.
_JOIN = """
import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as scripts
class CliConstants(types.ModuleType):
    def __getattr__(self, name):
        return getattr(rc, name)
cli_constants = CliConstants("ray_constants")
cli_constants.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = cli_constants
sys.argv = ["ray", *sys.argv[1:]]
scripts.main()
"""


class JoiningNode(ray_local.RayNode):
    """`ray start --block --address ADDR` on 127.0.0.1 (see _JOIN), a process group like RayNode."""

    def __init__(self, address: str, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _JOIN, "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
             "--disable-usage-stats", *args],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **ray_local.LOOPBACK_ENV, **(env or {})},
        )


@dataclass
class TokenCluster:
    address: str  # GCS, for ray.init / RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:PORT, for the job server and the state API
    token: str
    env: dict  # the environment a client of this cluster needs
    nodes: list = field(default_factory=list)
    cleanup: list = field(default_factory=list)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def http_get(url: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def alive_nodes(dashboard: str, token: str) -> int:
    try:
        status, body = http_get(f"{dashboard}/api/v0/nodes?limit=100", token)
    except OSError:
        return 0
    if status != 200:
        return 0
    rows = json.loads(body)["data"]["result"]["result"]
    return sum(1 for n in rows if n.get("state") == "ALIVE")


def start_token_cluster(tmp: Path, head_cpus: int = 1, worker_cpus: int = 1, timeout: float = 120.0) -> TokenCluster:
    """`ray start --head` (dashboard and job server on 127.0.0.1, token auth on) + one `ray start --address` node."""
    token = secrets.token_hex(32)
    venv_bin = str(Path(sys.executable).parent)
    env = {**ray_local.LOOPBACK_ENV, "RAY_AUTH_TOKEN": token,
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    port, dash_port = ray_local.free_port(), ray_local.free_port()
    cluster = TokenCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}", token, env)
    try:
        # The head too gets its own --temp-dir: its job drivers find the cluster's address in the head's
        # temp dir (RAY_ADDRESS=auto), which another test cluster on this machine must not overwrite.
        head_tmp = tempfile.mkdtemp(prefix="esdbs-ray-", dir="/tmp")
        cluster.cleanup.append(head_tmp)
        cluster.nodes.append(ray_local.RayNode(
            ["--head", "--port", str(port), "--num-cpus", str(head_cpus), "--temp-dir", head_tmp,
             "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
             "--ray-client-server-port", str(ray_local.free_port()), *_agent_ports()],
            tmp / "ray-head.log", env=env))
        _wait(lambda: alive_nodes(cluster.dashboard, token) >= 1, timeout, cluster.nodes[0], "head node")
        # Its own --temp-dir: two nodes sharing one session directory also share runtime_resources/,
        # and the second node's runtime-env agent unpacks a job's working_dir again over the first's --
        # deleting the directory the job's driver runs in (a one-machine artefact; real nodes have
        # their own disks).  Short path: Ray's Unix sockets live under it (108-byte limit).
        worker_tmp = tempfile.mkdtemp(prefix="esdbs-ray-", dir="/tmp")
        cluster.cleanup.append(worker_tmp)
        cluster.nodes.append(JoiningNode(cluster.address, ["--num-cpus", str(worker_cpus), "--temp-dir", worker_tmp,
                                                           *_agent_ports()], tmp / "ray-worker.log",
                                         env=env))
        _wait(lambda: alive_nodes(cluster.dashboard, token) >= 2, timeout, cluster.nodes[1], "second node")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _agent_ports() -> list[str]:
    # Each node's dashboard agent listens on 52365 by default: two nodes on one machine (or another Ray
    # user's node) would collide, and a head without its agent accepts no jobs ("No available agent").
    return ["--dashboard-agent-listen-port", str(ray_local.free_port()),
            "--metrics-export-port", str(ray_local.free_port())]


def _wait(ready, timeout: float, node, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if node.proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n" + node.log.read_text()[-3000:])
        time.sleep(1.0)
    raise TimeoutError(f"{what} not up in {timeout}s:\n" + node.log.read_text()[-3000:])


def read_results(trial_dir: Path) -> list[dict]:
    """A trial's reported rows so far (Tune's result.json, one JSON object per line)."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def main() -> int:
    """`python tests/cluster_helpers.py [--cpus N]`: a two-node rehearsal cluster on 127.0.0.1 until Ctrl-C.

    `ray start` twice cannot make one: on Linux Ray refuses a second node on loopback, and off
    loopback its ports would face the network.  This starts the same `ray start` processes the tests
    use (head with dashboard + token auth, one joined node), prints what a client needs, and stops
    both (process groups; never `ray stop`) on Ctrl-C or SIGTERM.
    """
    import argparse
    import signal as _signal

    p = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, default=1, help="CPUs of each node (default 1)")
    p.add_argument("--logs", default=None, help="directory for the nodes' logs (default: a temporary one)")
    a = p.parse_args()
    logs = Path(a.logs or tempfile.mkdtemp(prefix="esdbs-cluster-"))
    logs.mkdir(parents=True, exist_ok=True)
    cluster = start_token_cluster(logs, head_cpus=a.cpus, worker_cpus=a.cpus)
    _signal.signal(_signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print(f"two-node Ray cluster on 127.0.0.1 (logs in {logs}); Ctrl-C stops it\n"
              f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token}\n"
              f"  dashboard / job server: {cluster.dashboard}\n"
              f"  GCS (RAY_ADDRESS):      {cluster.address}", flush=True)
        while all(n.proc.poll() is None for n in cluster.nodes):
            time.sleep(1.0)
        print("a node exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
