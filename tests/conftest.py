import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest

# Tests run on CPU with a small, fixed thread count so results do not depend on the host's core count.
# Under pytest-xdist (`make test` runs two workers) each worker gets one thread: two workers x two
# threads would oversubscribe a 2-core machine.  Tests with a bar on a trained model set it from runs
# measured at both 1 and 2 threads.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# The suite trains as users do: the Winograd layer's default ("auto") runs the native CPU kernels,
# built once per machine (~1 s) and cached; the tests of the compiled layer (tests/test_winograd.py)
# ask for it explicitly.  ESDBS_WINOGRAD_IMPL=reference runs the suite on the reference layer.
os.environ.setdefault("ESDBS_WINOGRAD_IMPL", "auto")
# Inductor compiles in a pool of one subprocess per core by default: beside a second xdist worker and
# the Ray trials of another test that oversubscribes the 2 cores; the compiling tests compile serially.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# Ray reads its auth mode and node-address policy once per process: set them before any test touches
# Ray, so every Ray the tests start or join is on loopback with token authentication.
import ray_local  # noqa: E402

os.environ.update(ray_local.LOOPBACK_ENV)


@pytest.fixture(scope="session")
def fmnist_small():
    """A small stratified Fashion-MNIST bundle (the real data, read once per session)."""
    from esdbs_ray.data import load_dataset

    return load_dataset("fashion-mnist", subset=3000, test_subset=1000, seed=0)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """A real single-node Ray head (2 CPUs) on 127.0.0.1 for the whole session; its address."""
    import ray_local

    for k, v in ray_local.LOOPBACK_ENV.items():
        os.environ[k] = v
    node, address, _ = ray_local.start_head(tmp_path_factory.mktemp("ray"), num_cpus=2)
    os.environ["RAY_ADDRESS"] = address
    yield address
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    node.stop()


@pytest.fixture(scope="session")
def smoke_run(ray_address, tmp_path_factory, request):
    """The smoke preset through real Ray Tune, with MLflow tracking on, once per test run: the pipeline,
    export/predict, results and tracking tests all read this one run.  Under pytest-xdist the workers
    share it: the first to ask runs it (on its own Ray), the others wait on a file lock and read it."""
    import json

    from filelock import FileLock

    from esdbs_ray.config import build_config
    from esdbs_ray.pipeline import run_pipeline

    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: the session's common parent
        shared = shared.parent
    out = shared / "smoke-run" / "smoke"
    with FileLock(str(shared / "smoke-run.lock")):
        if not (out / "summary.json").is_file():
            cfg = build_config("smoke", sets=["tracking.mlflow.enabled=true"])
            run_pipeline(cfg, str(out), address=ray_address, progress=False)
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture
def ray_connected(ray_address):
    """This test process connected to the session's Ray (and disconnected afterwards)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)
    yield ray_address


@pytest.fixture(autouse=True, scope="module")
def _disconnect_ray_after_module():
    """A module that connected this process to Ray (run_pipeline does) leaves it disconnected; the
    clusters themselves belong to their fixtures."""
    yield
    import sys as _sys

    ray = _sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()



def pytest_terminal_summary(terminalreporter, config):
    """The fuzz harness's time and counts (tests/test_fuzz.py writes them; a worker's own prints would
    not reach this terminal under pytest-xdist)."""
    if hasattr(config, "workerinput"):
        return
    path = config._tmp_path_factory.getbasetemp() / "fuzz-summary.txt"
    if path.is_file():
        terminalreporter.write_sep("-", "fuzz harness")
        terminalreporter.write_line(path.read_text().strip())
