"""Ensembles chosen from a pool of candidates (pool.py, pool_cost.py, pool_run.py) and the cross-validated
estimate inside the validation split (stacking.py): exactness on pools, CV against a direct computation,
budgets and the front, bad input, and a pool selection exported and predicted."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from esdbs_ray import pool as PL
from esdbs_ray import predictions as pred
from esdbs_ray import stacking as S
from esdbs_ray.pool_cost import _on_front, make_budget
from test_stacking import synthetic_members

LEGACY = Path(__file__).parent / "data" / "legacy" / "smoke"


# --------------------------------------------------------------------------------------------------
# helpers: synthetic experiments on disk
# --------------------------------------------------------------------------------------------------
def _write_pool_experiment(exp: Path, P: np.ndarray, y: np.ndarray, n_val: int, *, rungs=(0.0, 0.5),
                           members_per_rung=None, test_index_shift=0, val_label_flip=False) -> list[str]:
    """``P`` [K * len(rungs), N, C]: candidate j is member j // len(rungs) at rung j % len(rungs)."""
    names = []
    K = P.shape[0] // len(rungs)
    for k in range(K):
        m = f"m{k}"
        for r, ts in enumerate(rungs):
            j = k * len(rungs) + r
            yv = y[:n_val].copy()
            if val_label_flip and j == P.shape[0] - 1:
                yv[0] = (yv[0] + 1) % P.shape[2]
            pred.write_predictions(
                pred.prediction_path(exp, m, ts),
                parts=[dict(split="val", probs=P[j, :n_val], labels=yv, indices=np.arange(n_val) * 3),
                       dict(split="test", probs=P[j, n_val:], labels=y[n_val:],
                            indices=np.arange(P.shape[1] - n_val) + test_index_shift)],
                model="alexnet", member=m, variant="SC-CNN", sparsity=ts, target_sparsity=ts, epoch=3 + r,
                metadata={"config": {"member": m}, "seed": 0, "git_revision": "abc", "versions": {}})
            names.append(f"{m}@ts{round(ts * 1000):04d}")
    return names


@pytest.fixture(scope="module")
def pool_data():
    P, y = synthetic_members(K=12, N=2600, seed=5, strengths=list(np.linspace(0.8, 2.6, 12)),
                             temps=[0.6, 1.0, 1.6, 0.8, 1.2, 0.7])
    return P, y, 1200


@pytest.fixture
def pool(tmp_path, pool_data):
    P, y, n_val = pool_data
    exp = tmp_path / "exp"
    _write_pool_experiment(exp, P, y, n_val)
    with PL.load_pool([str(exp)]) as p:
        yield p


# --------------------------------------------------------------------------------------------------
# cross-validation
# --------------------------------------------------------------------------------------------------
def test_folds_are_stratified_seeded_and_cover_every_sample_once():
    y = np.random.default_rng(0).integers(0, 7, 1003)
    f = S.cv_folds_of(y, 5, seed=3)
    assert np.array_equal(f, S.cv_folds_of(y, 5, seed=3)) and not np.array_equal(f, S.cv_folds_of(y, 5, seed=4))
    sizes = np.bincount(f, minlength=5)
    assert sizes.sum() == y.size and sizes.max() - sizes.min() <= 1
    for c in range(7):  # each class spread over the folds within one sample
        per = np.bincount(f[y == c], minlength=5)
        assert per.max() - per.min() <= 1
    with pytest.raises(ValueError, match="at least 2 folds"):
        S.cv_folds_of(y, 1)


def test_stack_cv_equals_a_direct_computation():
    P, y = synthetic_members(K=3, N=3000, seed=2)
    Pv, yv, Pt, yt = P[:, :1000], y[:1000], P[:, 1000:], y[1000:]
    r = S.stack(Pv, yv, Pt, yt, ["a", "b", "c"], methods=("nll_optimal", "equal", "best_single"), cv_folds=4, seed=1)
    fold = S.cv_folds_of(yv, 4, seed=1)
    for method, fit in (("nll_optimal", S.nll_optimal), ("equal", lambda P_, y_: S.equal_weights(P_)),
                        ("best_single", S.best_single)):
        correct, logs = 0, []
        for f in range(4):
            tr, te = fold != f, fold == f
            w = fit(Pv[:, tr], yv[tr])
            p = np.tensordot(w, Pv[:, te].astype(np.float64), axes=1)
            correct += int(np.sum(p.argmax(1) == yv[te]))
            logs.append(np.log(np.maximum(p[np.arange(p.shape[0]), yv[te]], S.EPS)))
        assert r["methods"][method]["cv_accuracy"] == pytest.approx(correct / yv.size, abs=1e-12)
        assert r["methods"][method]["cv_nll"] == pytest.approx(-np.concatenate(logs).mean(), rel=1e-9)
    # equal weights fit nothing: their CV figures are their validation figures
    assert r["methods"]["equal"]["cv_nll"] == pytest.approx(r["methods"]["equal"]["val_nll"], rel=1e-12)


def test_choose_cv_takes_the_lowest_cv_nll_and_never_reads_the_test_split():
    P, y = synthetic_members(K=4, N=2400, seed=7)
    names = ["a", "b", "c", "d"]
    r = S.stack(P[:, :600], y[:600], P[:, 600:], y[600:], names, choose="cv")
    scored = {m: v["cv_nll"] for m, v in r["methods"].items()}
    assert r["chosen"] == min(scored, key=scored.get) and r["chosen_rule"].startswith("cv:")
    assert r["ensemble"]["cv_nll"] == r["methods"][r["chosen"]]["cv_nll"]
    r2 = S.stack(P[:, :600], y[:600], P[:, 600:], np.random.default_rng(1).permutation(y[600:]), names, choose="cv")
    assert r2["chosen"] == r["chosen"] and r2["methods"][r["chosen"]]["cv_nll"] == r["methods"][r["chosen"]]["cv_nll"]
    with pytest.raises(ValueError, match="cv_folds >= 2"):
        S.stack(P[:, :600], y[:600], P[:, 600:], y[600:], names, choose="cv", cv_folds=0)


# --------------------------------------------------------------------------------------------------
# exactness on pools
# --------------------------------------------------------------------------------------------------
def test_stacking_guarantees_hold_on_a_pool(pool):
    """The stacking methods' own guarantees, with the pool's 12 candidates as members."""
    Pv, yv = np.asarray(pool.val), pool.y_val
    w, info = S.nll_optimal(Pv, yv, return_info=True)
    opt = S.evaluate(w, Pv, yv)["nll"]
    assert info["duality_gap"] <= 1e-9
    assert all(opt <= S.evaluate(np.eye(pool.size)[k], Pv, yv)["nll"] + 1e-12 for k in range(pool.size))
    acc = S.accuracy_search(Pv, yv, seed=0, n_random=400)
    assert S.evaluate(acc, Pv, yv)["accuracy"] >= max(S.evaluate(w, Pv, yv)["accuracy"],
                                                      S.evaluate(S.best_single(Pv, yv), Pv, yv)["accuracy"])


def test_pool_figures_are_stackings_figures(pool):
    sel = PL.select(pool, k=3, rounds=20)
    Pv, Pt = np.asarray(pool.val), np.asarray(pool.test)
    for m, r in sel.methods.items():
        w = np.array([r.weights.get(c, 0.0) for c in pool.ids])
        assert abs(w.sum() - 1) < 1e-9 and np.all(w >= 0)
        v, t = S.evaluate(w, Pv, pool.y_val), S.evaluate(w, Pt, pool.y_test)
        assert (r.val_accuracy, r.test_accuracy) == (v["accuracy"], t["accuracy"]), m
        assert r.val_nll == pytest.approx(v["nll"], rel=1e-12) and r.test_nll == pytest.approx(t["nll"], rel=1e-12)


def test_nll_topk_is_exact_by_enumeration_and_at_the_uncapped_optimum(pool):
    Qf = np.maximum(pool.val_true, S.EPS)
    feas = PL._Feasible(None, pool.size)
    for k in (1, 2):
        w, info = PL.fit_nll_topk(Qf, feas, k)
        assert info["search"] == "exhaustive" and info["exact"] and np.count_nonzero(w) <= k
        brute = min(S._nll_opt_q(Qf[:, list(c)])[1]["nll"] if k > 1 else -np.log(Qf[:, c[0]]).mean()
                    for c in itertools.combinations(range(pool.size), k))
        assert PL._nll_of(Qf @ w) == pytest.approx(brute, abs=1e-10)
    # a cap at least the uncapped optimum's support: the pool's exact optimum
    w_all = S.nll_optimal(np.asarray(pool.val), pool.y_val)
    support = int(np.count_nonzero(w_all > 1e-9))
    w, info = PL.fit_nll_topk(Qf, feas, support + 1)
    assert PL._nll_of(Qf @ w) == pytest.approx(S.evaluate(w_all, pool.val, pool.y_val)["nll"], abs=1e-9)


def test_nll_topk_search_is_never_worse_than_its_starting_supports(pool, monkeypatch):
    monkeypatch.setattr(PL, "EXHAUSTIVE_SUPPORTS", 0)  # force the greedy + swap search
    Qf = np.maximum(pool.val_true, S.EPS)
    feas = PL._Feasible(None, pool.size)
    seeds = [[0, 5, 9], [9, 10, 11]]
    w, info = PL.fit_nll_topk(Qf, feas, 3, seeds)
    assert info["search"] == "greedy+swap" and np.count_nonzero(w) <= 3
    f = PL._nll_of(Qf @ w)
    for s in seeds:
        assert f <= S._nll_opt_q(Qf[:, s])[1]["nll"] + 1e-12
    singles = -np.log(Qf).mean(axis=0)
    assert f <= singles.min() + 1e-12
    exhaustive = min(S._nll_opt_q(Qf[:, list(c)])[1]["nll"] for c in itertools.combinations(range(pool.size), 3))
    assert f >= exhaustive - 1e-10  # the search is a heuristic: at best the enumeration's optimum


def test_caruana_keeps_its_best_round(pool):
    Qf = np.maximum(pool.val_true, S.EPS)
    feas = PL._Feasible(None, pool.size)
    w1, _ = PL.fit_caruana(Qf, feas, rounds=1)
    assert np.argmax(w1) == np.argmin(-np.log(Qf).mean(axis=0))
    w, info = PL.fit_caruana(Qf, feas, rounds=40)
    assert PL._nll_of(Qf @ w) <= PL._nll_of(Qf @ w1) + 1e-12
    counts = np.bincount(info["order"], minlength=pool.size)
    assert np.allclose(w, counts / info["best_round"]) and len(info["order"]) == info["best_round"]
    # the same rounds as stacking's Caruana (no budget, deterministic ties) up to the best round
    ref = S.caruana_greedy(np.asarray(pool.val), pool.y_val, rounds=info["best_round"])
    assert np.allclose(ref, w)


# --------------------------------------------------------------------------------------------------
# budgets and the front
# --------------------------------------------------------------------------------------------------
def test_every_method_keeps_to_the_budget(pool):
    rng = np.random.default_rng(0)
    costs = {"ms_per_image": rng.uniform(0.1, 1.0, pool.size), "macs": rng.uniform(1e5, 1e6, pool.size)}
    costs["ms_per_image"][3] = np.nan  # unknown: never fits
    budget = make_budget(costs, ms=1.2, macs=1.5e6)
    sel = PL.select(pool, k=4, rounds=30, budget=budget, costs=costs)
    for m, r in sel.methods.items():
        idx = [pool.index(c) for c in r.weights]
        assert 3 not in idx, m
        assert costs["ms_per_image"][idx].sum() <= 1.2 + 1e-9 and costs["macs"][idx].sum() <= 1.5e6 + 1e-3, m
        assert r.ms_per_image == pytest.approx(costs["ms_per_image"][idx].sum())
    cheapest = np.nanmin(costs["ms_per_image"])
    tight = PL.select(pool, methods=("caruana", "best_single"), budget=make_budget(costs, ms=cheapest * 1.0001),
                      costs=costs)
    assert all(r.size == 1 for r in tight.methods.values())
    with pytest.raises(PL.PoolError, match="no candidate fits the budget"):
        PL.select(pool, methods=("caruana",), budget=make_budget(costs, ms=cheapest / 2), costs=costs)


def test_front_flags_only_undominated_points():
    pts = [{"ms_per_image": 1.0, "cv_accuracy": 0.80, "cv_nll": 0.5},
           {"ms_per_image": 2.0, "cv_accuracy": 0.85, "cv_nll": 0.4},
           {"ms_per_image": 2.5, "cv_accuracy": 0.84, "cv_nll": 0.3},  # dearer and worse than the one before
           {"ms_per_image": 0.5, "cv_accuracy": 0.70, "cv_nll": 0.9},
           {"ms_per_image": 1.0, "cv_accuracy": 0.79, "cv_nll": 0.4},  # same cost, worse
           {"ms_per_image": None, "cv_accuracy": 0.99, "cv_nll": 0.1},  # unknown cost: not on the front
           {"ms_per_image": 3.0, "cv_accuracy": 0.90, "cv_nll": 0.2}]
    assert _on_front(pts, "ms_per_image") == [True, True, False, True, False, False, True]


def test_pool_run_writes_the_file_its_front_and_compares_with_the_stack(tmp_path, pool_data, capsys):
    """A pool over an experiment with a stacking.json: the stack is mapped into the pool with its own
    figures, the K-capped NLL optimum is at most its validation NLL (it starts from the stack's
    support), the front is written as Parquet and PNG, and the CLI prints the table."""
    import pandas as pd

    from esdbs_ray.cli import main
    from esdbs_ray.stacking_run import stack_experiment

    P, y, n_val = pool_data
    exp = tmp_path / "exp"
    _write_pool_experiment(exp, P, y, n_val)
    st = stack_experiment(exp, sparsity=0.5, members=["m0", "m2", "m5"], methods=("nll_optimal", "equal"),
                          choose="nll_optimal")
    assert main(["stack", str(exp), "--pool", "--k", "3", "--rounds", "20", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "nll_topk" in out and "stack SC-CNN" in out
    written = Path(out.strip().splitlines()[-1].removeprefix("-> "))
    r = json.loads(written.read_text())
    assert written.name.startswith("pool-") and r["n_candidates"] == 12 and r["chosen"] in PL.POOL_METHODS
    ref = r["references"]["SC-CNN"]
    assert ref["test_accuracy"] == st["ensemble"]["test_accuracy"] and ref["val_nll"] == pytest.approx(
        st["ensemble"]["val_nll"], rel=1e-12)
    assert ref["stack_members"] == ["m0@ts0500", "m2@ts0500", "m5@ts0500"] and set(ref["weights"]) <= set(
        ref["stack_members"])
    assert r["methods"]["nll_topk"]["val_nll"] <= ref["val_nll"] + 1e-12
    assert r["reference"] == "SC-CNN" and r["comparison"]["test_accuracy"]["stack"] == ref["test_accuracy"]
    for m in r["methods"].values():
        assert m["cv_accuracy"] is not None and m["test_accuracy"] is not None
    df = pd.read_parquet(str(written)[:-5] + "-front.parquet")
    assert df["front_macs"].sum() == 0 and not df["macs"].notna().any()  # no config: no costs, no front
    assert r["front"]["figure"] is None and not Path(str(written)[:-5] + "-front.png").exists()
    # choose a method, a budget without costs
    assert main(["stack", str(exp), "--pool", "--choose", "equal_topk", "--no-measure", "--no-front",
                 "--output", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["chosen"] == "equal_topk"


# --------------------------------------------------------------------------------------------------
# reading predictions
# --------------------------------------------------------------------------------------------------
def test_load_pool_maps_every_candidate_and_removes_its_files(tmp_path, pool_data):
    P, y, n_val = pool_data
    exp = tmp_path / "exp"
    names = _write_pool_experiment(exp, P[:6], y, n_val)
    p = PL.load_pool([str(exp)])
    work = p._workdir
    assert isinstance(p.val, np.memmap) and p.val.shape == (6, n_val, 10) and p.test.shape == (6, y.size - n_val, 10)
    assert sorted(p.ids) == sorted(names)
    for j, c in enumerate(p.candidates):
        k = int(c.member[1:]) * 2 + (1 if c.rung.target_sparsity else 0)
        np.testing.assert_array_equal(p.val[j], P[k, :n_val])
        np.testing.assert_array_equal(p.test[j], P[k, n_val:])
        assert c.epoch == 3 + (1 if c.rung.target_sparsity else 0) and c.variant == "SC-CNN"
    np.testing.assert_array_equal(p.y_val, y[:n_val])
    p.close()
    assert not Path(work).exists()


def test_two_experiments_pool_when_their_images_agree(tmp_path, pool_data):
    P, y, n_val = pool_data
    _write_pool_experiment(tmp_path / "a", P[:4], y, n_val)
    _write_pool_experiment(tmp_path / "b", P[4:8], y, n_val)
    with PL.load_pool([str(tmp_path / "a"), str(tmp_path / "b")]) as p:
        assert p.size == 8 and {i.split(":")[0] for i in p.ids} == {"a", "b"}


@pytest.mark.parametrize("problem, match", [
    ("unknown", r"no such experiment directory"),
    ("empty", r"no predictions/\*\.parquet"),
    ("test-set", r"experiments .* were scored on different test images"),
    ("labels", r"disagree on 1 val labels"),
])
def test_bad_pools_are_one_clear_line(tmp_path, pool_data, problem, match, capsys):
    from esdbs_ray.cli import main

    P, y, n_val = pool_data
    a, b = tmp_path / "a", tmp_path / "b"
    _write_pool_experiment(a, P[:4], y, n_val)
    if problem == "empty":
        b.mkdir()
    elif problem == "test-set":
        _write_pool_experiment(b, P[4:8], y, n_val, test_index_shift=1)
    elif problem == "labels":
        _write_pool_experiment(b, P[4:8], y, n_val, val_label_flip=True)
    with pytest.raises(PL.PoolError, match=match):
        PL.load_pool([str(a), str(b)])
    assert main(["stack", str(a), str(b), "--pool", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esdbs:") and len(err[0]) < 400, err


def test_pool_flags_are_checked_before_anything_runs(tmp_path, capsys):
    from esdbs_ray.cli import main

    for argv, match in ((["stack", "a", "b"], "only with --pool"),
                        (["stack", "a", "--pool", "--sparsity", "0.3"], "--pool takes every rung"),
                        (["stack", "a", "--pool", "--budget-ms", "-1"], "--budget-ms=-1.0: a positive number"),
                        (["stack", "a", "--pool", "--choose", "nll_optimal"], "with --pool choose cv"),
                        (["export", "--out", str(tmp_path / "x")], "--stack FILE"),
                        (["export", "--stack", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")],
                         "no such file")):
        assert main(argv) == 2, argv
        assert match in capsys.readouterr().err, argv


# --------------------------------------------------------------------------------------------------
# a pool selection of a real experiment, exported and predicted
# --------------------------------------------------------------------------------------------------
def test_pool_selection_exports_and_predicts_its_test_accuracy(tmp_path, capsys):
    """The legacy smoke experiment (real Fashion-MNIST, weights kept at the 50 % rung): a pool under a
    time budget (only candidates with weights are timed, so only they fit), exported with each member's
    own weights, predicted on the run's test images: the pool file's test accuracy exactly."""
    from esdbs_ray.cli import main
    from esdbs_ray.data import load_dataset
    from esdbs_ray.ensemble import Ensemble

    exp = tmp_path / "smoke"
    shutil.copytree(LEGACY, exp)
    assert main(["stack", str(exp), "--pool", "--budget-ms", "1000", "--no-front", "--choose", "equal_topk",
                 "--output", str(tmp_path / "pool.json")]) == 0
    r = json.loads((tmp_path / "pool.json").read_text())
    assert all(c.endswith("@ts0500") for c in r["ensemble"]["weights"]) and len(r["ensemble"]["weights"]) == 3
    costs = json.loads((exp / "candidate_costs.json").read_text())["candidates"]
    assert costs["alexnet@ts0000"]["weights_bytes"] is None and costs["alexnet@ts0000"]["macs"] > 0
    member = json.loads((exp / "members" / "alexnet.json").read_text())
    rung = next(x for x in member["rungs"] if x["target_sparsity"] == 0.5)
    assert costs["alexnet@ts0500"]["macs"] > rung["conv_mults"]  # the conv count, plus the linear layers
    assert main(["export", "--stack", str(tmp_path / "pool.json"), "--out", str(tmp_path / "ens"), "--no-onnx"]) == 0
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["group"] == "pool" and [m["name"] for m in manifest["members"]] == list(r["ensemble"]["weights"])
    test = load_dataset("fashion-mnist", subset=600, test_subset=300, seed=0).test
    ens = Ensemble.load(tmp_path / "ens", device="cpu")
    acc = float(np.mean(ens.predict_proba(test.images).argmax(1) == np.asarray(test.labels)))
    assert abs(acc - r["ensemble"]["test_accuracy"]) <= 1e-9
    # the report's pool section reads the newest pool file
    shutil.copy(tmp_path / "pool.json", exp / "pool-20990101T000000-all.json")
    assert main(["report", str(exp)]) == 0
    assert "## Pool ensembles" in (exp / "report" / "report.md").read_text()
