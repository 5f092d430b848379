"""Ray for esdbs: connect or start, and place trials on GPUs so that fractions pack.

* :func:`init_ray` connects to a cluster (``--address`` or ``$RAY_ADDRESS``), else starts a local Ray
  that listens on loopback only.
* :func:`gpus_per_trial` resolves ``resources.gpus_per_trial: auto``.  Ray packs fractional GPU
  requests per device: three trials asking 0.667 GPU each on two GPUs run two at a time (a device
  cannot hold 0.667 + 0.667), so ``auto`` asks 1 / ceil(concurrent trials / GPUs) -- three trials on two
  GPUs get 1/2 each (two on one device, one on the other) and all run at once; one GPU per trial when
  there are enough.  The GPUs counted are those of the cluster's live nodes, or, on an autoscaling
  cluster whose GPU workers are not up yet (cluster.yaml: ``min_workers: 0``), those its declared node
  types can bring (``~/ray_bootstrap_config.yaml`` on the head, written by ``ray up``): asking no GPU
  there would train everything on the head's CPUs.
* :func:`trial_device` is the device a trial trains on: CUDA only when Ray assigned the trial a GPU
  (Ray no longer hides ``CUDA_VISIBLE_DEVICES`` from zero-GPU workers, so "a GPU is visible" is not
  "this trial owns one").
"""
from __future__ import annotations

import contextlib
import logging

import math
import os
from pathlib import Path
from typing import Any

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = False) -> None:
    """Connect to a cluster (``address`` or ``$RAY_ADDRESS``), else start a local Ray on loopback only.
    ``quiet``: Ray's own notes (the local instance it started, token authentication on: what esdbs
    chose) stay out of the console; its errors do not."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local Ray serves this process only: keep all of it on loopback.  On Linux Ray would
        # otherwise "resolve" 127.0.0.1 to the machine's reachable address and listen there.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    # Workers run from a copy without .git: hand them the driver's revision -- unless the job that
    # runs this driver already set it (Ray refuses a job whose runtime_env is overridden).
    inherited = "ESDBS_GIT_REVISION" in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    from .provenance import git_revision

    env = None if inherited else {"env_vars": {"ESDBS_GIT_REVISION": git_revision()}}
    level = logging.ERROR if quiet else logging.INFO
    if quiet:
        logging.getLogger("ray").setLevel(level)
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level=level)
    else:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
        # address="local": start a fresh Ray, never attach to another one found on this machine.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=False, logging_level=level)


# --------------------------------------------------------------------------------------------------
# GPU placement
# --------------------------------------------------------------------------------------------------
def pack_fraction(concurrent: int, gpus: int) -> float:
    """GPU share per trial so that ``concurrent`` trials fit on ``gpus`` devices at once:
    1 / ceil(concurrent / gpus), or one GPU each when there are enough (0 without GPUs)."""
    if gpus <= 0 or concurrent <= 0:
        return 0.0
    return 1.0 / math.ceil(concurrent / gpus)


def declared_node_types(path: Path | str = BOOTSTRAP_CONFIG) -> list[dict[str, Any]]:
    """``[{"name", "resources", "max_workers"}]`` of an autoscaling cluster, from the cluster launcher's
    config on the head ([] where there is none, e.g. a local Ray or a cluster started by hand)."""
    import yaml

    p = Path(path).expanduser()
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return []
    types = (cfg or {}).get("available_node_types") or {}
    head = (cfg or {}).get("head_node_type")
    out = []
    for name, t in types.items():
        if not isinstance(t, dict):
            continue
        out.append({"name": name, "resources": dict(t.get("resources") or {}),
                    "max_workers": 1 if name == head else int(t.get("max_workers", 0) or 0)})
    return out


def cluster_capacity(bootstrap: Path | str = BOOTSTRAP_CONFIG) -> dict[str, Any]:
    """GPUs and CPUs the trials can have: the live nodes', or -- when no live node has a GPU -- the
    most the declared node types can bring.  ``{"gpus", "cpus", "source"}``."""
    import ray

    live = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n.get("Resources", {}).get("GPU", 0)) for n in live)
    cpus = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in live)
    if gpus > 0:
        return {"gpus": gpus, "cpus": cpus, "source": "live nodes"}
    types = declared_node_types(bootstrap)
    dgpus = sum(int(t["resources"].get("GPU", 0)) * t["max_workers"] for t in types)
    if dgpus > 0:
        dcpus = sum(float(t["resources"].get("CPU", 0)) * t["max_workers"] for t in types)
        return {"gpus": dgpus, "cpus": max(cpus, dcpus), "source": "declared node types (autoscaling)"}
    return {"gpus": 0, "cpus": cpus, "source": "live nodes"}


def gpus_per_trial(setting: float | str, n_trials: int, cpus_per_trial: float, max_concurrent: int = 0,
                   capacity: dict[str, Any] | None = None) -> float:
    """The GPU request of each trial: ``setting`` as given, or for ``"auto"`` the packing fraction for
    the trials that can run at once (bounded by ``max_concurrent`` and by the CPUs)."""
    if setting != "auto":
        return float(setting)
    cap = capacity if capacity is not None else cluster_capacity()
    if cap["gpus"] <= 0:
        return 0.0
    concurrent = n_trials
    if max_concurrent:
        concurrent = min(concurrent, max_concurrent)
    if cap.get("cpus"):
        concurrent = min(concurrent, max(1, int(cap["cpus"] // cpus_per_trial)))
    return pack_fraction(concurrent, int(cap["gpus"]))


def trial_device(requested: str, gpu_share: float) -> str:
    """The device a trial trains on: ``"cuda"`` exactly when Ray gave it a GPU share; an explicit
    ``device: cuda`` without one is an error, ``cpu`` is honoured."""
    if requested == "cpu":
        return "cpu"
    if gpu_share > 0:
        return "cuda"
    if requested == "cuda":
        raise ValueError("device 'cuda' requested but the trial was given no GPU "
                         "(resources.gpus_per_trial is 0, or the cluster has no GPU)")
    return "cpu"


@contextlib.contextmanager
def quiet_tune(verbose: bool):
    """Tune's own notes stay out of the console unless ``verbose``: its hint to resume with Python,
    the metrics it could not fetch from stopped trials, its checkpoint-frequency advice; and SIGTERM
    stops the trials as SIGINT does (Tune handles SIGINT only)."""
    import logging
    import signal

    loggers = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if verbose else logging.ERROR)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints its experiment box and a TensorBoard hint (at a path that
    # holds no event files) at any verbosity; the older one prints nothing at verbosity 0
    new_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    term = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        if new_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = new_output
        signal.signal(signal.SIGTERM, term)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tolerate_deleted_checkpoints() -> None:
    """Let a resumed run delete a checkpoint that is already gone.

    Tune deletes the checkpoints beyond ``num_to_keep`` when a trial reports a new one and saves its
    experiment state only every few seconds; a driver killed in between leaves a state that still
    lists a deleted checkpoint, and the resumed run dies deleting it again (FileNotFoundError in
    Ray's checkpoint manager).  A checkpoint already gone is what deleting it wants, so that error is
    ignored -- every other one still raises."""
    try:  # a private name of Ray's: where a later Ray moves it, resuming goes on without the tolerance
        from ray.train._internal import checkpoint_manager

        original = checkpoint_manager._delete_fs_path
    except (ImportError, AttributeError):
        return
    if getattr(original, "tolerates_missing", False):
        return

    def delete(fs, fs_path):
        try:
            original(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            pass

    delete.tolerates_missing = True
    checkpoint_manager._delete_fs_path = delete
