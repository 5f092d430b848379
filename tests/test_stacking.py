"""Weighted-average stacking: optimality of the NLL weights, accuracy search, baselines, Tune, experiments."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from esdbs_ray import predictions as pred
from esdbs_ray import stacking as S
from esdbs_ray.stacking_run import stack_experiment
from esdbs_ray.stacking_tune import tune_accuracy_search


def synthetic_members(K=3, N=2000, C=10, seed=0, strengths=None, temps=None, rho=0.3):
    """K noisy probabilistic classifiers of different strengths, with partly shared noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    strengths = list(np.linspace(1.5, 3.0, K)) if strengths is None else strengths
    temps = [0.6, 1.0, 1.6, 0.8, 1.2][:K] if temps is None else temps
    shared = rng.normal(size=(N, C))
    P = []
    for k in range(K):
        z = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=(N, C)) * 1.5
        z[np.arange(N), y] += strengths[k]
        z = z / temps[k % len(temps)]
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        P.append((p / p.sum(1, keepdims=True)).astype(np.float32))
    return np.stack(P), y


@pytest.fixture(scope="module")
def data():
    P, y = synthetic_members(N=4000, seed=0)
    return P[:, :2000], y[:2000], P[:, 2000:], y[2000:]


def _on_simplex(w, K):
    w = np.asarray(w)
    assert w.shape == (K,)
    assert np.all(w >= 0)
    assert abs(w.sum() - 1) < 1e-9


def test_every_method_returns_simplex_weights(data):
    Pv, yv, _, _ = data
    for w in (S.nll_optimal(Pv, yv), S.accuracy_search(Pv, yv), S.equal_weights(Pv), S.best_single(Pv, yv),
              S.caruana_greedy(Pv, yv), S.caruana_greedy(Pv, yv, metric="accuracy")):
        _on_simplex(w, 3)


def test_nll_optimal_is_the_optimum(data):
    Pv, yv, _, _ = data
    w, info = S.nll_optimal(Pv, yv, return_info=True)
    opt = S.evaluate(w, Pv, yv)["nll"]
    assert info["duality_gap"] <= 1e-9
    for k in range(3):
        assert opt <= S.evaluate(np.eye(3)[k], Pv, yv)["nll"]
    assert opt <= S.evaluate(S.equal_weights(Pv), Pv, yv)["nll"]
    # brute force on a fine simplex grid: nothing beats the optimum, and the grid's best is close to it
    Q = S._true_class_probs(Pv, yv)
    G = S._simplex_grid(3, 200)
    g = S._nll_batch(Q, G)
    assert g.min() >= opt - 1e-9
    assert g.min() - opt < 1e-4
    np.testing.assert_allclose(w, G[np.argmin(g)], atol=0.01)
    # a weight vector that is merely good is not accepted as the optimum
    assert S.evaluate(G[np.argmin(g)], Pv, yv)["nll"] > opt - 1e-12


def test_nll_optimal_on_the_boundary():
    """A useless member (uniform predictions) gets weight exactly 0; a dominant one can get weight 1."""
    P, y = synthetic_members(K=3, N=1500, seed=1)
    P[0] = 1.0 / P.shape[2]
    w, info = S.nll_optimal(P, y, return_info=True)
    assert w[0] == 0.0 and info["duality_gap"] <= 1e-9
    G = S._simplex_grid(3, 200)
    assert S._nll_batch(S._true_class_probs(P, y), G).min() >= S.evaluate(w, P, y)["nll"] - 1e-9
    P2 = P.copy()
    P2[1] = P2[0]
    w2 = S.nll_optimal(P2, y)  # two useless members: the third takes everything
    np.testing.assert_allclose(w2, [0, 0, 1], atol=1e-12)


def test_accuracy_search_beats_nll_optimal_and_best_single(data):
    Pv, yv, _, _ = data
    w = S.accuracy_search(Pv, yv, seed=0)
    acc = S.evaluate(w, Pv, yv)
    for other in (S.nll_optimal(Pv, yv), S.best_single(Pv, yv), S.equal_weights(Pv)):
        o = S.evaluate(other, Pv, yv)
        assert acc["accuracy"] >= o["accuracy"]
        if acc["accuracy"] == o["accuracy"]:
            assert acc["nll"] <= o["nll"] + 1e-12
    np.testing.assert_array_equal(w, S.accuracy_search(Pv, yv, seed=0))  # deterministic


def test_accuracy_oracle_matches_evaluate(data):
    Pv, yv, _, _ = data
    oracle = S._AccuracyOracle(Pv, yv)
    W = np.random.default_rng(0).dirichlet(np.ones(3), 100)
    W = np.concatenate([W, np.eye(3), np.full((1, 3), 1 / 3)])
    expected = [round(S.evaluate(w, Pv, yv)["accuracy"] * len(yv)) for w in W]
    np.testing.assert_array_equal(oracle.counts(W), expected)


def test_best_single_and_caruana(data):
    Pv, yv, _, _ = data
    accs = [S.evaluate(np.eye(3)[k], Pv, yv)["accuracy"] for k in range(3)]
    assert np.argmax(S.best_single(Pv, yv)) == int(np.argmax(accs))
    for metric in ("nll", "accuracy"):
        for rounds in (7, 50):
            w, info = S.caruana_greedy(Pv, yv, rounds=rounds, metric=metric, return_info=True)
            _on_simplex(w, 3)
            np.testing.assert_allclose(w * rounds, np.round(w * rounds), atol=1e-9)
            assert len(info["order"]) == rounds
    # the first pick is the best single member by the criterion
    _, info = S.caruana_greedy(Pv, yv, rounds=1, metric="accuracy", return_info=True)
    assert info["order"][0] == int(np.argmax(accs))


def test_evaluate_by_hand():
    P = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.4, 0.6], [0.6, 0.4]]], dtype=np.float32)
    y = np.array([0, 0])
    r = S.evaluate([0.5, 0.5], P, y)
    assert r["accuracy"] == 0.5
    assert r["nll"] == pytest.approx(-(np.log(0.65) + np.log(0.4)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="simplex"):
        S.evaluate([0.7, 0.7], P, y)


@pytest.mark.parametrize("K", [2, 5])
def test_stack_any_k(K):
    P, y = synthetic_members(K=K, N=1200, seed=K)
    names = [f"m{k}" for k in range(K)]
    r = S.stack(P[:, :800], y[:800], P[:, 800:], y[800:], names,
                methods=S.DEFAULT_METHODS + ("caruana_accuracy",))
    assert set(r["methods"]) == set(S.DEFAULT_METHODS) | {"caruana_accuracy"}
    for m in r["methods"].values():
        assert list(m["weights"]) == names
        _on_simplex(list(m["weights"].values()), K)
    nll = r["methods"]["nll_optimal"]["val_nll"]
    assert all(nll <= r["members"][n]["val_nll"] + 1e-12 for n in names)
    assert r["methods"]["accuracy_search"]["val_accuracy"] >= r["methods"]["nll_optimal"]["val_accuracy"]
    assert r["methods"]["accuracy_search"]["val_accuracy"] >= r["methods"]["best_single"]["val_accuracy"]
    assert r["chosen"] == "nll_optimal"
    json.dumps(r, allow_nan=False)
    table = S.format_stacking_table(r)
    assert "accuracy_search" in table and "member m0" in table


def test_stack_input_errors(data):
    Pv, yv, Pt, yt = data
    with pytest.raises(ValueError, match="at least 2 members"):
        S.stack(Pv[:1], yv, Pt[:1], yt, ["a"])
    with pytest.raises(ValueError, match="at least 2 members"):
        S.nll_optimal(Pv[:1], yv)
    bad = Pv.copy()
    bad[1, 5, 3] = np.nan
    with pytest.raises(ValueError, match=r"member\(s\) \['b'\].*NaN"):
        S.stack(bad, yv, Pt, yt, ["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct names"):
        S.stack(Pv, yv, Pt, yt, ["a", "a", "c"])
    with pytest.raises(ValueError, match="unknown stacking method"):
        S.stack(Pv, yv, Pt, yt, ["a", "b", "c"], methods=("magic",))
    with pytest.raises(ValueError, match="test probabilities"):
        S.stack(Pv, yv, Pt[:2], yt, ["a", "b", "c"])


def test_choose_rule_uses_validation_only(data):
    Pv, yv, Pt, yt = data
    names = ["a", "b", "c"]
    r = S.stack(Pv, yv, Pt, yt, names, choose="best_val")
    best = max(r["methods"], key=lambda m: (r["methods"][m]["val_accuracy"], -r["methods"][m]["val_nll"]))
    assert r["chosen"] == best
    r2 = S.stack(Pv, yv, Pt, np.random.default_rng(0).permutation(yt), names, choose="best_val")
    assert r2["chosen"] == r["chosen"]
    for m in r["methods"]:
        assert r2["methods"][m]["weights"] == r["methods"][m]["weights"]


# --------------------------------------------------------------------------------------------------
# experiments on disk
# --------------------------------------------------------------------------------------------------
def _write_experiment(exp, P, y, n_val, test_labels=None, members=("m0-alexnet", "m1-allcnnc", "m2-convpoolcnnc")):
    test_labels = y[n_val:] if test_labels is None else test_labels
    for k, m in enumerate(members):
        for ts in (0.5, 0.8):
            pred.write_predictions(
                pred.prediction_path(exp, m, ts),
                parts=[dict(split="val", probs=P[k, :n_val], labels=y[:n_val], indices=np.arange(n_val) * 5),
                       dict(split="test", probs=P[k, n_val:], labels=test_labels, indices=np.arange(P.shape[1] - n_val))],
                model=m.split("-")[1], member=m, variant="SC-CNN", sparsity=ts, target_sparsity=ts, epoch=10,
                metadata={"config": {"member": m}, "seed": k, "git_revision": "abc123", "versions": {"ray": "x"}},
            )
    return list(members)


def test_stack_experiment_writes_json_and_ignores_test_labels(tmp_path):
    P, y = synthetic_members(N=1800, seed=3)
    n_val = 1000
    exp = tmp_path / "exp"
    names = _write_experiment(exp, P, y, n_val)
    r = stack_experiment(exp)
    out = exp / "stacking.json"
    assert out.exists()
    on_disk = json.loads(out.read_text())
    assert on_disk["chosen"] == "nll_optimal" and on_disk["member_names"] == names
    for m in S.DEFAULT_METHODS:
        assert {"weights", "val_accuracy", "val_nll", "test_accuracy", "test_nll", "seconds"} <= set(on_disk["methods"][m])
    assert all(v["target_sparsity"] == 0.8 for v in on_disk["rungs"].values())
    assert {p["metadata"]["git_revision"] for p in on_disk["provenance"]} == {"abc123"}
    assert len(on_disk["provenance"]) == 6
    assert [f for f in os.listdir(exp) if f.startswith(".")] == []

    # same numbers as stack() on the arrays
    direct = S.stack(P[:, :n_val], y[:n_val], P[:, n_val:], y[n_val:], names)
    for m in S.DEFAULT_METHODS:
        for n in names:
            assert r["methods"][m]["weights"][n] == pytest.approx(direct["methods"][m]["weights"][n], abs=1e-9)

    # permuting the test labels changes test metrics, never the weights or the choice
    exp2 = tmp_path / "exp2"
    _write_experiment(exp2, P, y, n_val, test_labels=np.random.default_rng(9).permutation(y[n_val:]))
    r2 = stack_experiment(exp2, sparsity=0.8)
    assert r2["chosen"] == r["chosen"]
    for m in S.DEFAULT_METHODS:
        assert r2["methods"][m]["weights"] == r["methods"][m]["weights"]
        assert r2["methods"][m]["val_accuracy"] == r["methods"][m]["val_accuracy"]
    assert r2["methods"]["nll_optimal"]["test_accuracy"] != r["methods"]["nll_optimal"]["test_accuracy"]

    r3 = stack_experiment("file://" + str(exp), sparsity=0.5, methods=("nll_optimal", "equal"))
    assert set(r3["methods"]) == {"nll_optimal", "equal"} and r3["sparsity"] == 0.5
    assert "nll_optimal" in S.format_stacking_table(r3)


def test_stack_experiment_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no predictions found.*predictions"):
        stack_experiment(tmp_path / "nothing")
    P, y = synthetic_members(N=600, seed=4)
    exp = tmp_path / "exp"
    _write_experiment(exp, P, y, 400)
    # a fourth member with a different validation split
    pred.write_predictions(
        pred.prediction_path(exp, "m3-resnet32", 0.8),
        parts=[dict(split="val", probs=P[0, :400], labels=y[:400], indices=np.arange(400) * 5 + 1),
               dict(split="test", probs=P[0, 400:], labels=y[400:], indices=np.arange(200))],
        model="resnet32", member="m3-resnet32", variant="SC-CNN", sparsity=0.8, target_sparsity=0.8, epoch=10,
    )
    with pytest.raises(ValueError, match="different 'val' index sets"):
        stack_experiment(exp)
    r = stack_experiment(exp, members=["m0-alexnet", "m1-allcnnc"], methods=("nll_optimal",))
    assert r["member_names"] == ["m0-alexnet", "m1-allcnnc"]


# --------------------------------------------------------------------------------------------------
# Ray Tune
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_accuracy_search_with_real_ray(tmp_path, data, ray_connected):
    import ray

    Pv, yv, Pt, yt = data
    w, info = tune_accuracy_search(Pv, yv, num_samples=16, seed=0, storage_path=tmp_path / "tune",
                                     return_info=True)
    assert ray.is_initialized()  # the caller's Ray is left running
    r = S.stack(Pv, yv, Pt, yt, ["a", "b", "c"], methods=("nll_optimal",), tune_samples=8,
                storage_path=str(tmp_path / "tune2"))
    _on_simplex(w, 3)
    assert info["trials"] == 16
    ev = S.evaluate(w, Pv, yv)
    assert info["val_accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)
    assert info["val_nll"] == pytest.approx(ev["nll"], rel=1e-9)
    # the NLL optimum is one of the trials, so the search is at least as accurate
    assert ev["accuracy"] >= S.evaluate(S.nll_optimal(Pv, yv), Pv, yv)["accuracy"]
    assert (tmp_path / "tune").is_dir()
    t = r["methods"]["tune_accuracy_search"]
    assert t["trials"] == 8
    # the search writes no TensorBoard files beside the members' runs
    assert not list((tmp_path / "tune2").rglob("events.out.tfevents.*"))
    _on_simplex(list(t["weights"].values()), 3)
    assert t["val_accuracy"] >= r["methods"]["nll_optimal"]["val_accuracy"]


def test_every_configurable_method_is_implemented():
    """One registry: the names a config may ask for (config.STACK_METHODS) are the implemented ones'."""
    from esdbs_ray.config import STACK_CHOICES, STACK_METHODS

    assert set(STACK_METHODS) <= set(S.METHODS) and S.DEFAULT_METHODS == STACK_METHODS
    assert set(STACK_CHOICES) - set(S.METHODS) == {"best_val", "cv"}


def test_stack_and_results_agree_on_members_files_and_the_chosen_ensemble(tmp_path, capsys):
    """`esdbs stack` lists members in the config's order, names its file by what it stacked and says so
    in the file; `esdbs results` then shows each stacking file's methods under a reference to the file,
    one chosen method per file, weights in the config's order, within 120 columns."""
    import shutil
    from pathlib import Path

    from esdbs_ray.cli import main

    exp = tmp_path / "exp"
    shutil.copytree(Path(__file__).parent / "data" / "legacy" / "smoke", exp)
    config_order = ["alexnet", "convpool_cnn_c", "all_cnn_c"]
    assert main(["stack", str(exp)]) == 0
    out = capsys.readouterr().out
    written = Path(out.strip().splitlines()[-1].removeprefix("-> "))
    assert written.parent == exp and written.name.startswith("stack-") and written.name.endswith(
        "-swr-cnn-dbs-ts0500.json")
    st = json.loads(written.read_text())
    assert st["member_names"] == config_order and list(st["methods"]["equal"]["weights"]) == config_order
    assert st["variant"] == "SWR-CNN+DBS" and st["sparsity"] == 0.5 and st["basis_threshold"] is None
    assert main(["results", str(exp)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert max(map(len, table)) <= 120, max(table, key=len)
    assert table[0].startswith("SWR-CNN+DBS: members alexnet, convpool_cnn_c, all_cnn_c")
    assert "val loss" in table[1] and "weights" in table[1]
    files = sorted(p.name for p in exp.glob("stack*.json"))
    refs = dict(line.strip().split(" ", 1) for line in table if line.startswith("  ["))  # "[1]" -> file
    assert sorted(refs.values()) == files
    for ref in refs:
        rows = [ln for ln in table if ln.startswith("ensemble") and ln.endswith(ref)]
        assert len(rows) == len(st["methods"]) and sum("* " in ln for ln in rows) == 1, rows
    chosen = next(ln for ln in table if ln.startswith("ensemble") and "* nll_optimal" in ln)
    w = st["methods"]["nll_optimal"]["weights"]
    assert " ".join(f"{w[m]:.3f}" for m in config_order) in chosen


def test_results_columns_view_shows_the_asked_columns_rounded_and_refuses_unknown_ones(capsys):
    """`esdbs results --columns`: an aligned table of exactly those columns, floats at 4 decimals, empty
    cells for values a row does not have; an unknown column is one error line naming it."""
    from pathlib import Path

    import pandas as pd

    from esdbs_ray.cli import main
    from esdbs_ray.results import results_table

    exp = Path(__file__).parent / "data" / "legacy" / "smoke"
    assert main(["results", str(exp), "--columns", "kind,member,test_accuracy,test_ece"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind", "member", "test_accuracy", "test_ece"]
    df = results_table(str(exp))
    rung = df[df["kind"] == "rung"].iloc[0]
    row = next(ln for ln in lines[1:] if ln.split()[:2] == ["rung", rung["member"]])
    assert row.split()[2] == f"{rung['test_accuracy']:.4f}"
    assert len(row.split()) == 3 + (0 if pd.isna(rung["test_ece"]) else 1)
    assert main(["results", str(exp), "--columns", "kind,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]
