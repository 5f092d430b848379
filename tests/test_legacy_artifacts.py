"""Experiments written by an earlier esdbs still read: a smoke experiment and a train-one checkpoint
committed from revision 1a70234 (``tests/data/legacy``), before results became typed records.

Every reader of an experiment -- ``esdbs results``, ``stack``, ``report``, ``export`` then ``predict`` --
runs on the old files and gives the numbers the old code wrote; the old checkpoint resumes and gives
back its summary.  A change to a record's JSON or Parquet form that old files do not follow fails here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from esdbs_ray.cli import main

LEGACY = Path(__file__).parent / "data" / "legacy"
MEMBERS = ("alexnet", "convpool_cnn_c", "all_cnn_c")


@pytest.fixture
def experiment(tmp_path):
    """A private copy: the commands below write into the experiment (stack files, reports)."""
    out = tmp_path / "smoke"
    shutil.copytree(LEGACY / "smoke", out)
    return out


def test_results_reads_the_old_experiment(experiment, capsys):
    assert main(["results", str(experiment), "--format", "csv"]) == 0
    import io

    import pandas as pd

    df = pd.read_csv(io.StringIO(capsys.readouterr().out))
    old = json.loads((experiment / "summary.json").read_text())
    trials = df[df["kind"] == "trial"].set_index("member")
    assert set(trials.index) == set(MEMBERS)
    for m in MEMBERS:
        member = json.loads((experiment / "members" / f"{m}.json").read_text())
        assert trials.loc[m, "test_accuracy"] == pytest.approx(member["test_accuracy"], abs=1e-12)
    rungs = df[df["kind"] == "rung"]
    assert sorted(set(rungs["target_sparsity"].round(6))) == [0.0, 0.5]
    ens = df[df["kind"] == "ensemble"]
    chosen = old["stacking"]["SWR-CNN+DBS"]["chosen"] if "stacking" in old and "SWR-CNN+DBS" in old["stacking"] \
        else json.loads((experiment / "stacking.json").read_text())["chosen"]
    assert chosen in set(ens["method"])


def test_stack_reproduces_the_old_weights(experiment, capsys):
    old = json.loads((experiment / "stacking.json").read_text())
    new_file = experiment / "restack.json"
    assert main(["stack", str(experiment), "--output", str(new_file)]) == 0
    new = json.loads(new_file.read_text())
    assert set(new["member_names"]) == set(old["member_names"]) and new["chosen"] == old["chosen"]
    for method, r in old["methods"].items():
        for name, w in r["weights"].items():
            assert new["methods"][method]["weights"][name] == pytest.approx(w, abs=1e-9), (method, name)
        assert new["methods"][method]["test_accuracy"] == r["test_accuracy"]
    assert {n: v["target_sparsity"] for n, v in new["rungs"].items()} == \
        {n: v["target_sparsity"] for n, v in old["rungs"].items()}


def test_report_reads_the_old_experiment(experiment):
    assert main(["report", str(experiment)]) == 0
    md = (experiment / "report" / "report.md").read_text()
    stacking = json.loads((experiment / "stacking.json").read_text())
    assert f"{100 * stacking['ensemble']['test_accuracy']:.2f}" in md


def test_export_then_predict_gives_the_old_test_accuracy(experiment, tmp_path):
    from esdbs_ray.ensemble import Ensemble
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    target = tmp_path / "ensemble"
    assert main(["export", str(experiment), "--out", str(target)]) == 0
    table = read_predictions(str(experiment / "predictions"))
    P, y, names = prediction_matrix(table, "test", list(MEMBERS), 0.5)
    rows = table.filter(__import__("pyarrow.compute", fromlist=["x"]).equal(table["split"], "test"))
    idx = np.unique(rows["index"].to_numpy())
    from esdbs_ray.data import load_dataset

    test = load_dataset("fashion-mnist", subset=600, test_subset=300, seed=0).test
    order = np.argsort(test.indices)
    assert np.array_equal(np.asarray(test.indices)[order], idx)
    images = test.images[order]
    ensemble = Ensemble.load(target, device="cpu")
    got = ensemble.member_proba(images)
    for k, m in enumerate(names):
        np.testing.assert_allclose(got[m], P[k], rtol=0, atol=1e-5)
    stacking = json.loads((experiment / "stacking.json").read_text())
    acc = float(np.mean(ensemble.combine(got).argmax(1) == y))
    assert abs(acc - stacking["methods"][stacking["chosen"]]["test_accuracy"]) <= 1e-4


def test_the_old_checkpoint_resumes_to_its_summary(tmp_path):
    """A finished run's checkpoint from before the typed state: resuming it trains nothing more and
    writes the same summary (rungs, history, accuracies)."""
    out = tmp_path / "one"
    shutil.copytree(LEGACY / "one", out)
    old = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    assert main(["train-one", "--model", "all_cnn_c", "--width", "0.125", "--conv", "winograd_relu", "--schedule",
                 "dbs", "--epochs", "2", "--sparsity-ladder", "0.3", "--retrain-epochs", "1", "--subset", "600",
                 "--test-subset", "300", "--threads", "1", "--resume", "--out", str(out)]) == 0
    new = json.loads((out / "summary.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "test_loss", "sparsity", "model_sparsity", "nonzero_weights",
                "epochs_run", "batch_size_range", "train_seconds", "steps"):
        assert new[key] == old[key], key
    assert new["rungs"] == old["rungs"]
    assert new["history"] == old["history"]
