"""GPU placement: ``gpus_per_trial: auto`` packs fractions per device, counts an autoscaling cluster's
declared GPU workers, and a trial trains on CUDA only when Ray assigned it a GPU.

The Ray here is a local one on 127.0.0.1 that *declares* two GPUs (``num_gpus=2``): Ray schedules
against declared resources, so the requests, the packing and the GPU ids Ray hands each trial are
real, on a machine without a GPU."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from esdbs_ray.ray_env import (cluster_capacity, declared_node_types, gpus_per_trial, init_ray, pack_fraction,
                               trial_device)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("concurrent,gpus,share", [
    (3, 1, 1 / 3), (3, 2, 1 / 2), (2, 2, 1.0), (5, 2, 1 / 3), (8, 3, 1 / 3), (1, 4, 1.0), (3, 0, 0.0),
])
def test_fractions_pack_whole_trials_onto_each_device(concurrent, gpus, share):
    assert pack_fraction(concurrent, gpus) == pytest.approx(share)
    if gpus:  # what Ray can place: floor(1 / share) trials per device, on every device
        assert int(1 / share + 1e-9) * gpus >= concurrent


def test_auto_is_bounded_by_cpus_and_max_concurrent():
    cap = {"gpus": 1, "cpus": 16, "source": "live nodes"}
    assert gpus_per_trial("auto", 42, 2, capacity=cap) == pytest.approx(1 / 8)  # 8 trials fit the CPUs
    assert gpus_per_trial("auto", 42, 2, max_concurrent=4, capacity=cap) == pytest.approx(1 / 4)
    assert gpus_per_trial(0.5, 42, 2, capacity=cap) == 0.5 and gpus_per_trial(0, 3, 1, capacity=cap) == 0.0
    assert gpus_per_trial("auto", 3, 1, capacity={"gpus": 0, "cpus": 8}) == 0.0


def test_declared_gpu_workers_of_an_autoscaling_cluster_count(tmp_path):
    """cluster.yaml's GPU worker types (min_workers 0): the head has no GPU until they come up."""
    types = {t["name"]: t for t in declared_node_types(REPO / "cluster.yaml")}
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types, "cluster.yaml declares no GPU worker type"
    assert types["head.cpu"]["resources"].get("GPU", 0) == 0
    gpus = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types)
    assert gpus >= 2
    assert declared_node_types(tmp_path / "none.yaml") == []


def test_trial_device_follows_the_assignment_not_visibility():
    assert trial_device("auto", 0.5) == "cuda" and trial_device("auto", 0.0) == "cpu"
    assert trial_device("cpu", 1.0) == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        trial_device("cuda", 0.0)


@pytest.fixture
def gpu_ray(monkeypatch, tmp_path):
    """A fresh local Ray (loopback) declaring 2 GPUs and 3 CPUs, not the session's CPU-only one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(num_cpus=3, num_gpus=2)
    yield
    ray.shutdown()


def _probe(config):
    """A trainable reporting what the real trainable bases its device on."""
    import ray
    from ray import tune

    share = tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0)
    t0 = time.time()
    time.sleep(3.0)  # long enough for the trials to overlap if they were placed together
    tune.report({"share": share, "device": trial_device("auto", share), "gpu_ids": str(ray.get_gpu_ids()),
                 "start": t0, "end": time.time()})


@pytest.mark.slow
def test_three_trials_on_two_declared_gpus_run_at_once_each_on_its_gpu(gpu_ray, tmp_path):
    import sys

    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file

    cap = cluster_capacity(bootstrap=tmp_path / "no-bootstrap.yaml")
    assert cap["gpus"] == 2 and cap["source"] == "live nodes"
    share = gpus_per_trial("auto", 3, 1.0, capacity=cap)
    assert share == pytest.approx(0.5)  # the old even split (0.667) would run only two at a time
    tuner = tune.Tuner(tune.with_resources(_probe, {"cpu": 1, "gpu": share}),
                       param_space={"i": tune.grid_search([0, 1, 2])},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    assert not results.errors
    rows = [r.metrics for r in results]
    assert all(r["share"] == 0.5 and r["device"] == "cuda" for r in rows)
    assert all(r["gpu_ids"] not in ("[]", "") for r in rows)  # Ray gave each trial a device
    assert max(r["start"] for r in rows) < min(r["end"] for r in rows), "the three trials did not run at once"
    # a zero-GPU trial on the same GPU node trains on the CPU
    results = tune.Tuner(tune.with_resources(_probe, {"cpu": 1, "gpu": 0}),
                         run_config=tune.RunConfig(storage_path=str(tmp_path / "tune0"), verbose=0)).fit()
    assert not results.errors
    assert results[0].metrics["device"] == "cpu" and results[0].metrics["gpu_ids"] == "[]"
