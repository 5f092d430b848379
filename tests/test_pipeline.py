"""End-to-end: the smoke preset through real Ray Tune on 127.0.0.1 (2 CPUs)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from esdbs_ray.config import ConfigError, PipelineConfig, TrainConfig, build_config
from esdbs_ray.presets import PRESETS

pytestmark = pytest.mark.slow
MEMBERS = ("alexnet", "convpool_cnn_c", "all_cnn_c")


def test_three_trials_finish_and_summary_is_complete(smoke_run):
    out, summary = smoke_run
    assert sorted(m["member"] for m in summary["members"]) == sorted(MEMBERS)
    for m in summary["members"]:
        assert m["variant"] == "SWR-CNN+DBS" and [r["target_sparsity"] for r in m["rungs"]] == [0.0, 0.5]
        assert abs(m["rungs"][-1]["sparsity"] - 0.5) < 0.01
    written = json.loads((out / "summary.json").read_text())
    assert written["provenance"]["git_revision"] and written["provenance"]["versions"]["torch"]
    assert (out / "config.yaml").is_file() and len(list((out / "members").glob("*.json"))) == 3


def test_parquet_predictions_read_back(smoke_run):
    out, summary = smoke_run
    files = sorted((out / "predictions").glob("*.parquet"))
    assert len(files) == 3 * 2  # three members x (dense rung + one pruning rung)
    for f in files:
        t = pq.read_table(f)
        splits = t.column("split").to_pylist()
        assert splits.count("val") == 60 and splits.count("test") == 300
        probs = np.stack(t.column("probs").to_numpy(zero_copy_only=False))
        assert probs.dtype == np.float32 and probs.shape[1] == 10
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        meta = t.schema.metadata
        assert b"config" in meta and b"git_revision" in meta


def test_stacking_weights_on_simplex_and_nll_not_worse_than_members(smoke_run):
    out, _ = smoke_run
    result = json.loads((out / "stacking.json").read_text())
    for name, method in result["methods"].items():
        w = np.array(list(method["weights"].values()))
        assert (w >= -1e-12).all() and abs(w.sum() - 1) < 1e-9, name
    best_member_nll = min(m["val_nll"] for m in result["members"].values())
    assert result["methods"]["nll_optimal"]["val_nll"] <= best_member_nll + 1e-9


def test_tensorboard_event_files_hold_the_tags(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = smoke_run
    # one run per member in OUT/tensorboard, named <group>/<member>
    tb_dirs = sorted({p.parent for p in (out / "tensorboard").glob("*/*/events.out.tfevents.*")})
    assert [(d.parent.name, d.name) for d in tb_dirs] == [("SWR-CNN+DBS", m) for m in sorted(MEMBERS)]
    acc = EventAccumulator(str(tb_dirs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "val/accuracy", "schedule/lr", "schedule/momentum", "schedule/batch_size",
                "schedule/noise_scale", "schedule/phase", "pruning/sparsity", "rung/test_accuracy"):
        assert tag in tags, tag
    assert len(acc.Scalars("val/accuracy")) == 3  # 2 dense epochs + 1 retraining epoch
    assert acc.PluginTagToContent("hparams") and "hparam/test_accuracy" in tags  # TensorBoard's HParams view
    # one stream per member, the trainer's: Tune's own TensorBoard logger is off, nothing under tune/
    assert not list((out / "tune").rglob("events.out.tfevents.*"))


def test_mlflow_holds_params_metrics_and_artifacts(smoke_run, capsys):
    """tracking.mlflow.enabled: each trial's run has its whole config and every epoch's metrics, the
    experiment's run the stacking and summary files, and `esdbs report` adds the report's files."""
    import mlflow

    from esdbs_ray.cli import main

    out, summary = smoke_run
    record = json.loads((out / "tracking.json").read_text())
    assert record["tracking_uri"] == (out / "mlruns").as_uri() and (out / "mlruns").is_dir()
    client = mlflow.MlflowClient(record["tracking_uri"])
    assert client.get_experiment(record["experiment_id"]).name == "smoke"
    assert sorted(record["trial_runs"]) == sorted(MEMBERS)
    for m in summary["members"]:
        run = client.get_run(record["trial_runs"][m["member"]])
        p = run.data.params
        assert p["member"] == m["member"] and p["variant"] == "SWR-CNN+DBS" and p["train.model"] == m["model"]
        assert p["train.width"] == "0.125" and p["train.conv"] == "winograd_relu" and p["train.dbs.b0"] == "128"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == [1, 2, 3]  # one per epoch
        assert sorted(h.value for h in history) == sorted(e["val_accuracy"] for e in json.loads(
            (out / "members" / f"{m['member']}.json").read_text())["history"])
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"{m['member']}.json"]
    run = client.get_run(record["run_id"])
    assert run.data.params["stack.choose"] == "cv" and run.data.params["train.width"] == "0.125"
    ens = summary["ensembles"]["SWR-CNN+DBS"]
    assert run.data.metrics["ensemble.SWR-CNN_DBS.test_accuracy"] == pytest.approx(ens["test_accuracy"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "summary.json", "stacking.json"}
    assert main(["report", out.as_uri()]) == 0  # a file:// URI, read through pyarrow.fs
    assert f"logged to run {record['run_id']}" in capsys.readouterr().out
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= report


def test_unknown_yaml_key_is_refused_and_out_untouched(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("members: [alexnet, all_cnn_c]\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.*unknown key.*'epochz'"):
        build_config(None, str(cfg))
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "run", "--config", str(cfg), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "epochz" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "run", "--preset", "smoke", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds files esdbs did not write" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("bad,match", [
    ({"variants": ["SWR-CNN", "XYZ"]}, r"variants.1='XYZ': Input should be 'C-CNN', .* or 'SRB-CNN\+DBS'"),
    ({"members": ["alexnet"]}, "at least two members"),
    ({"members": ["alexnet", "lenet"]}, "members.1.model='lenet': unsupported model; choose one of: alexnet"),
    ({"train": {"model": "vgg16"}}, "set by the pipeline"),
    ({"resources": {"cpus_per_trial": 0}}, "resources.cpus_per_trial=0: Input should be greater than 0"),
    ({"train": {"dbs": {"k": "fast"}}}, "k"),
])
def test_bad_config_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config("smoke", None, bad)


def test_dbs_search_space_takes_every_constant_the_schedule_takes():
    # constants without range metadata (an optional batch size, the schedule's named choices) too
    cfg = build_config("smoke", None, {"dbs_search": {"space": {
        "bmin": {"choice": [32, 64]}, "fall_noise": {"choice": ["binomial", "observed"]},
        "rung_lr": {"choice": ["lr0", "dense_end"]}, "k": {"loguniform": [0.01, 1.0]}}}})
    assert set(cfg.dbs_search.space) == {"bmin", "fall_noise", "rung_lr", "k"}
    with pytest.raises(ConfigError, match="fall_noise"):
        build_config("smoke", None, {"dbs_search": {"space": {"fall_noise": {"choice": ["sometimes"]}}}})


def test_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = build_config("quick")
    again = PipelineConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_valid_trials(preset):
    """A new preset is checked for free: it builds, survives YAML, and every trial's TrainConfig is valid."""
    import yaml

    cfg = build_config(preset)
    assert PipelineConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    trials = cfg.trials()
    assert trials and len({t.member for t in trials}) == len(trials)
    for t in trials:
        TrainConfig.from_dict(t.train.to_dict())  # raises on an invalid value
    if preset.startswith("paper-"):  # spec section 1: all four variants, the sweep beside DBS
        assert set(cfg.variants) == {"C-CNN", "SC-CNN", "SWR-CNN", "SWR-CNN+DBS"}
        groups = {g["group"] for g in cfg.groups()}
        assert {"C-CNN+DBS", "SC-CNN+DBS"} <= groups
        assert any(g.startswith("SWR-CNN@b") for g in groups)
        assert cfg.stack.sparsity in cfg.train.sparsity_ladder


def _terminated_trials(exp: Path) -> list[str]:
    """Members whose trial Tune's saved experiment state records as TERMINATED."""
    done = []
    for f in exp.glob("experiment_state-*.json"):
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.append(trial["config"]["member"])
    return done


def test_interrupted_run_resumes_without_redoing_finished_trials(ray_address, tmp_path):
    out = tmp_path / "exp"
    cfg = tmp_path / "cfg.yaml"
    # Two CPUs, one per trial: two trials run while the third waits, so killing the driver after the
    # first trial ends leaves finished, running and pending trials.
    cfg.write_text("resources: {cpus_per_trial: 1}\n")
    cmd = [sys.executable, "-m", "esdbs_ray.cli", "run", "--preset", "smoke", "--config", str(cfg), "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    driver = subprocess.Popen(cmd + ["--out", str(out)], env=env, start_new_session=True,
                              stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and not finished:
        time.sleep(0.5)
        finished = _terminated_trials(out / "tune" / "base")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    assert finished, "no trial finished in time"
    os.killpg(driver.pid, signal.SIGKILL)  # Tune's saved state says a trial finished: kill the driver now
    driver.wait()
    first = {f"{m}-ts0500.parquet": (out / "predictions" / f"{m}-ts0500.parquet").stat().st_mtime_ns for m in finished}

    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "run", "--resume", str(out), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["members"]) == 3
    for name, mtime in first.items():  # a trial that had finished was not run again
        assert (out / "predictions" / name).stat().st_mtime_ns == mtime
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(out / "tune" / "base"))
    total = 3  # smoke: 2 dense epochs + 1 retraining epoch
    for path, trial_df in analysis.trial_dataframes.items():
        epochs = trial_df["epoch"].tolist()
        assert sorted(set(epochs)) == list(range(total)), epochs
        if Path(path).name.rsplit("_", 2)[0] in finished:  # finished before the kill: trained once, not again
            assert epochs == list(range(total)), f"a finished trial was trained again: {epochs}"
        # A trial running at the kill resumes from the last checkpoint Tune had saved in its state
        # (saved every 2 s), so it may repeat the epoch in flight -- never more than that.
        assert len(epochs) <= total + 1, epochs


def test_resume_tolerates_a_checkpoint_deleted_after_the_last_state_save(tmp_path):
    # Tune deletes the checkpoints beyond num_to_keep, then saves its state seconds later: a driver
    # killed in between resumes with a state that lists a checkpoint already gone.
    from ray import tune
    from ray.train import Checkpoint
    from ray.train._internal import checkpoint_manager
    from ray.train._internal.session import _TrainingResult

    from esdbs_ray.ray_env import tolerate_deleted_checkpoints

    def result(i):
        return _TrainingResult(checkpoint=Checkpoint(str(tmp_path / f"checkpoint_{i:06d}")), metrics={"epoch": i})

    (tmp_path / "checkpoint_000001").mkdir()
    restored = checkpoint_manager._CheckpointManager(tune.CheckpointConfig(num_to_keep=1))
    restored.register_checkpoint(result(0))  # the state still lists checkpoint 0; its directory is gone
    original = checkpoint_manager._delete_fs_path
    try:
        with pytest.raises(FileNotFoundError):  # Ray alone dies here
            restored.register_checkpoint(result(1))
        restored = checkpoint_manager._CheckpointManager(tune.CheckpointConfig(num_to_keep=1))
        restored.register_checkpoint(result(0))
        tolerate_deleted_checkpoints()
        restored.register_checkpoint(result(1))
        assert [r.checkpoint.path for r in restored.best_checkpoint_results] == [str(tmp_path / "checkpoint_000001")]
        (tmp_path / "checkpoint_000002").mkdir()
        restored.register_checkpoint(result(2))  # an existing one is still deleted
        assert not (tmp_path / "checkpoint_000001").exists()
    finally:
        checkpoint_manager._delete_fs_path = original


def test_dbs_search_writes_constants_that_run_reuses(ray_address, tmp_path):
    import yaml

    from esdbs_ray.cli_common import load_dbs_constants
    from esdbs_ray.data import load_dataset
    from esdbs_ray.layout import ExperimentLayout
    from esdbs_ray.pipeline import dbs_search_points, run_dbs_search
    from esdbs_ray.ray_env import init_ray

    # one CPU per trial on the 2-CPU Ray: the third sample runs in an actor a finished one leaves
    cfg = build_config("smoke", None, {"dbs_search": {"model": "alexnet", "num_samples": 3, "epochs": 2,
                                                      "grace_period": 1}, "resources": {"cpus_per_trial": 1}})
    data = load_dataset(cfg.dataset, subset=cfg.subset, test_subset=cfg.test_subset, seed=cfg.seed)
    init_ray(ray_address)
    record = run_dbs_search(cfg, ExperimentLayout.at(tmp_path), data, progress=False)
    assert len(record["trials"]) == 3 and all(t["val_accuracy"] is not None for t in record["trials"])
    # the samples are the seeded draws: the same config searches the same constants again
    points = dbs_search_points(cfg.dbs_search.space, 3, cfg.seed)
    assert sorted(json.dumps(t["config"], sort_keys=True) for t in record["trials"]) == sorted(
        json.dumps(p, sort_keys=True) for p in points) and record["seed"] == cfg.seed
    # the objective is the last epoch of the budget, among the trials that ran all of it (spec §6)
    finished = [t for t in record["trials"] if t["completed"]]
    assert finished and all(t["epochs"] == 2 for t in finished)
    assert record["best_val_accuracy"] == max(t["val_accuracy"] for t in finished)
    assert "last epoch" in record["objective"]
    from ray.tune import ExperimentAnalysis

    last = {}  # each trial's last reported val accuracy, from Tune's own result files
    for trial_df in ExperimentAnalysis(str(tmp_path / "tune" / "dbs_search")).trial_dataframes.values():
        last[round(float(trial_df["val_accuracy"].iloc[-1]), 12)] = len(trial_df)
    assert all(last.get(round(t["val_accuracy"], 12)) == t["epochs"] for t in record["trials"])
    assert all(t["train_seconds"] > 0 and t["total_steps"] > 0 for t in record["trials"])
    assert (tmp_path / "dbs_search.png").stat().st_size > 5000
    constants = load_dbs_constants(str(tmp_path / "dbs_constants.json"))
    for key in cfg.dbs_search.space:  # the searched constants come from the best trial
        assert key in constants
    reused = build_config("smoke", None, {"train": {"dbs": constants}})
    assert reused.train.dbs.k == constants["k"] and reused.train.dbs.b0 == constants["b0"]
    yaml.safe_dump(reused.to_dict())  # and it serialises into config.yaml


def test_dbs_search_points_are_seeded_draws_from_the_space():
    from esdbs_ray.pipeline import dbs_search_points

    space = build_config("smoke").dbs_search.space
    a, b, c = (dbs_search_points(space, 6, seed) for seed in (0, 0, 1))
    assert a == b and a != c and len(a) == 6 and len({json.dumps(p, sort_keys=True) for p in a}) == 6
    for p in a + c:
        assert set(p) == set(space)
        for key, spec in space.items():
            (kind, args), = spec.items()
            if kind == "choice":
                assert p[key] in args, (key, p[key])
            else:
                assert args[0] <= p[key] <= args[1], (key, p[key])


def test_dbs_plan_cli_json_and_figure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "dbs-plan", "--epochs", "8", "--train-size", "54000",
                        "--schedule", "dbs", "--double-every", "1", "--json", "--figure", str(tmp_path / "m.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["epoch"] for row in rows] == list(range(8))
    assert {"epoch", "phase", "lr", "momentum", "batch_size", "noise_scale"} <= set(rows[0])
    assert all(row["batch_size"] % 32 == 0 for row in rows)
    assert (tmp_path / "m.png").stat().st_size > 10_000
    # DBS is the default; the val size for the fall rule defaults to the 10 % split of --train-size
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "dbs-plan", "--epochs", "12", "--train-size", "54000",
                        "--sparsity-ladder", "0.2,0.3", "--retrain-epochs", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("dbs schedule: 16 epochs, N = 54000, 6000 validation images")
    assert " lr " in r.stdout and "rung 1: " in r.stdout and "rung 2: plateau restarted" in r.stdout
    # an existing figure is never overwritten
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "dbs-plan", "--epochs", "8", "--train-size", "54000",
                        "--figure", str(tmp_path / "m.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_basis_variants_build_their_trials():
    """BasisConv's variants: SBC-CNN climbs train.basis.ladder (and no sparsity ladder), SRB-CNN trains
    random bases without a ladder, the pruning variants keep the sparsity ladder; +DBS works for both."""
    cfg = build_config("basisconv-fashion-mnist-cpu", sets=["variants=[SC-CNN, SBC-CNN, SRB-CNN+DBS]"])
    trials = {}
    for t in cfg.trials():
        trials.setdefault(t.group, []).append(t)
    assert set(trials) == {"SC-CNN", "SBC-CNN", "SRB-CNN+DBS"} and all(len(v) == 3 for v in trials.values())
    for t in trials["SBC-CNN"]:
        tr = t.train
        assert (tr.conv, tr.schedule, tr.sparsity_ladder) == ("spatial", "fixed", ())
        assert tr.basis.ladder == (1.0, 0.95, 0.9, 0.85) and tr.total_epochs == tr.epochs + 4 * tr.retrain_epochs
        assert t.export_sparsity is None  # BasisConv members keep no export weights (esdbs export refuses them)
    for t in trials["SRB-CNN+DBS"]:
        tr = t.train
        assert (tr.conv, tr.schedule, tr.sparsity_ladder, tr.basis.ladder) == ("basis_random", "dbs", (), ())
        assert tr.total_epochs == tr.epochs
    for t in trials["SC-CNN"]:
        assert t.train.sparsity_ladder == (0.3, 0.6, 0.8) and t.train.basis.ladder == ()
