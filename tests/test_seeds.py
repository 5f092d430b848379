"""Seeds as replicates: the aggregation and the verdict rule (analysis/seeds.py) against a direct
computation, reports and results of several directories (refused when their configs differ), and
``esdbs run --seeds`` as one real Tune experiment on 127.0.0.1."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import report_fixture as F
from esdbs_ray.analysis.seeds import (INCONCLUSIVE, REFUTED, Contrast, Estimate, ReplicateError, config_differences,
                                      judge, judge_speed, load_replicates)
from esdbs_ray.analysis.report import build_report
from esdbs_ray.cli import main
from esdbs_ray.config import build_config

REPRODUCED = "reproduced"


# --------------------------------------------------------------------------------------------------
# the numbers and the rule, against a direct computation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [(0.010, 0.012, 0.014), (0.5, -0.25, 0.125, 2.0), (3.0, 3.0)])
def test_estimate_is_the_mean_and_the_standard_error_across_replicates(values):
    e = Estimate(values)
    assert e.n == len(values) and e.mean == pytest.approx(np.mean(values))
    assert e.se == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert Estimate((0.7,)).se is None and Estimate((0.7,)).fmt("{:.1f}") == "0.7"
    assert Estimate((1.0, 3.0)).fmt("{:.2f}", unit="%") == "2.00 ± 1.00%"


def _contrast(values, test_se=None):
    return Contrast("A - B", Estimate(tuple(values)), tuple(test_se or [None] * len(values)))


def test_verdict_rule_beyond_two_standard_errors_across_seeds():
    # mean 0.012, SE 0.00115: 10 SE above zero
    clear = _contrast([0.010, 0.012, 0.014], [0.003, 0.003, 0.006])
    assert judge([clear], 1) == REPRODUCED and judge([clear], -1) == REFUTED
    assert clear.test_se_mean == pytest.approx(0.004)
    # a mean 1.5 SE from zero: neither
    d = np.array([0.02, -0.01, 0.02])
    assert abs(d.mean()) / (d.std(ddof=1) / math.sqrt(3)) < 2
    assert judge([_contrast(d)], 1) == INCONCLUSIVE == judge([_contrast(d)], -1)
    # one seed is inconclusive for a comparison however large, and whatever its test-sampling SE
    assert judge([_contrast([0.2], [0.001])], 1) == INCONCLUSIVE
    # every contrast must hold ("best"); one clearly against refutes
    assert judge([clear, _contrast([0.01, 0.03, 0.02])], 1) == REPRODUCED
    assert judge([clear, _contrast(d)], 1) == INCONCLUSIVE
    assert judge([clear, _contrast([-0.01, -0.012, -0.014])], 1) == REFUTED
    # a claimed gain of 2.66 pt: the mean must reach half of it; 2 SE short of half refutes it
    assert judge([_contrast([0.020, 0.021, 0.022])], 1, gain=0.0266) == REPRODUCED
    assert judge([_contrast([0.003, 0.004, 0.005])], 1, gain=0.0266) == REFUTED
    assert judge([_contrast([0.005, 0.013, 0.021])], 1, gain=0.0266) == INCONCLUSIVE


def test_speed_verdicts_by_class_over_seeds_or_repeats():
    margin = 0.05
    faster = Estimate(tuple(math.log(r) for r in (1.40, 1.50, 1.45)))
    assert judge_speed(faster, "faster", margin)[0] == REPRODUCED
    assert judge_speed(faster, "slower", margin)[0] == REFUTED
    assert judge_speed(faster, "about the same", margin)[0] == REFUTED
    # straddling 1 + margin: inconclusive
    near = Estimate(tuple(math.log(r) for r in (0.98, 1.12, 1.06)))
    assert judge_speed(near, "faster", margin)[0] == INCONCLUSIVE
    # one replicate: the run's timing noise as the SE (repeats); none measured -> inconclusive
    one = Estimate((math.log(1.5),))
    assert judge_speed(one, "faster", margin, se_repeats=0.05) == (REPRODUCED, 0.05)
    assert judge_speed(one, "faster", margin, se_repeats=0.5)[0] == INCONCLUSIVE
    assert judge_speed(one, "faster", margin)[0] == INCONCLUSIVE


def test_config_differences_leave_out_the_seed_and_the_machine():
    a = build_config("paper-fashion-mnist-cpu").to_dict()
    b = build_config("paper-fashion-mnist-cpu", sets=["seed=3", "resources.cpus_per_trial=2", "data_dir=/x"]).to_dict()
    assert config_differences(a, b) == []
    c = build_config("paper-fashion-mnist-cpu", sets=["train.width=0.5", "subset=3000", "seed=1"]).to_dict()
    assert config_differences(a, c) == ["subset", "train.width"]
    m = build_config("self-expanding-fashion-mnist-cpu")
    assert config_differences(m.to_dict(), m.replicate(2).to_dict()) == []  # members' own seeds move with the run's


# --------------------------------------------------------------------------------------------------
# synthetic replicates with known per-seed differences
# --------------------------------------------------------------------------------------------------
# SWR-CNN's logit margin is 2.0; SWR-CNN+DBS's per seed: clearly above it, or scattered around it
CLEAR = (2.5, 2.6, 2.7)
SCATTERED = (2.3, 1.7, 2.05)


def _replicates(root: Path, dbs_quality) -> list[Path]:
    dirs = []
    for s, q in enumerate(dbs_quality):
        d = root / f"seed{s}"
        F.write_experiment(d, sets=[*F.SETS, f"seed={s}"], seed=s, tensorboard=False, quality={"SWR-CNN+DBS": q})
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def clear(tmp_path_factory):
    return _replicates(tmp_path_factory.mktemp("clear"), CLEAR)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    return _replicates(tmp_path_factory.mktemp("scattered"), SCATTERED)


def _stack_correct(d: Path, group: str, s: float) -> np.ndarray:
    """Per test image: is the group's ensemble right (its stacking file's chosen weights at rung s)?"""
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    st = json.loads((d / f"stacking-{group.lower().replace('+', '-')}.json").read_text())
    w = st["methods"][st["chosen"]]["weights"]
    names = st["member_names"]
    P, y, _ = prediction_matrix(read_predictions(d / "predictions"), "test", names, s, variant=group)
    return np.argmax(np.tensordot(np.array([w[n] for n in names]), P.astype(np.float64), axes=1), axis=1) == y


def _direct(dirs, a="SWR-CNN+DBS", b="SWR-CNN", s=0.3):
    """The claim A - B computed here: per seed the paired difference and its test-sampling SE."""
    diffs, ses = [], []
    for d in dirs:
        x = _stack_correct(d, a, s).astype(float) - _stack_correct(d, b, s).astype(float)
        diffs.append(x.mean())
        ses.append(x.std(ddof=1) / math.sqrt(len(x)))
    diffs = np.array(diffs)
    return diffs, diffs.std(ddof=1) / math.sqrt(len(diffs)), float(np.mean(ses))


def test_claims_and_cells_equal_a_direct_computation(clear, tmp_path):
    diffs, se, test_se = _direct(clear)
    r = build_report([str(d) for d in clear], tmp_path / "rep")
    a5 = next(c for c in r["claims"] if c["id"] == "A5")
    assert a5["claim"].startswith("SWR-CNN+DBS beats SWR-CNN") and a5["n"] == 3
    est = a5["estimate"]
    assert est["values"] == pytest.approx(list(diffs)) and est["mean"] == pytest.approx(diffs.mean())
    assert est["se"] == pytest.approx(se) and est["test_se"] == pytest.approx(test_se)
    assert diffs.mean() > 2 * se and a5["verdict"] == REPRODUCED
    assert f"{100 * diffs.mean():+.2f} ± {100 * se:.2f} pt (n=3)" in a5["difference"]
    assert a5["test_se"] == f"{100 * test_se:.2f} pt"
    # a cell of Fig. 2a's table: the mean and SE across seeds of the stack's accuracy
    accs = np.array([_stack_correct(d, "SWR-CNN+DBS", 0.3).mean() for d in clear]) * 100
    md = Path(r["markdown"]).read_text()
    cell = f"{accs.mean():.2f} ± {accs.std(ddof=1) / math.sqrt(3):.2f}%"
    lines = md.splitlines()
    table = lines[lines.index("*Ours: test accuracy*"):]
    row = next(line for line in table if line.startswith("| 30% |"))
    assert [c.strip() for c in row.strip("|").split("|")][4] == cell  # sparsity, C-CNN, SC-CNN, SWR-CNN, SWR-CNN+DBS
    assert r["replicates"] == ["seed 0", "seed 1", "seed 2"] and "## Replicates" in md
    assert "**The verdict rule.**" in md and "test-sampling SE" in md
    assert "error bars ± 1 SE across the 3 replicates" in md
    for name in ("accuracy_vs_sparsity", "accuracy_vs_batch", "speed_vs_sparsity"):
        assert Path(r["figures"][name]).read_bytes()[:4] == b"\x89PNG"


def test_a_difference_that_scatters_across_seeds_is_inconclusive(scattered, tmp_path):
    diffs, se, test_se = _direct(scattered)
    assert abs(diffs.mean()) <= 2 * se  # the direct computation: within 2 SE of zero
    assert max(diffs) > 2 * test_se  # though one seed alone, by its test-sampling SE, would look decided
    r = build_report([str(d) for d in scattered], tmp_path / "rep")
    by_id = {c["id"]: c for c in r["claims"]}
    assert by_id["A5"]["verdict"] == INCONCLUSIVE and by_id["B6"]["verdict"] == INCONCLUSIVE
    assert by_id["A5"]["estimate"]["se"] == pytest.approx(se)


def test_several_directories_of_different_configs_are_refused_in_one_line(clear, tmp_path, capsys):
    other = tmp_path / "wide"
    F.write_experiment(other, sets=[*F.SETS, "train.width=0.25", "seed=5"], tensorboard=False)
    for cmd in (["report", str(clear[0]), str(other), "--out", str(tmp_path / "r")],
                ["results", str(clear[0]), str(other)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("esdbs: error: ") and "differ in train.width" in err[0], err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert main(["report", str(clear[0]), str(clear[0]), "--out", str(tmp_path / "r")]) == 2
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(ReplicateError):
        load_replicates([clear[0], other])


def test_results_of_several_seeds_in_one_table(clear, tmp_path, capsys):
    assert main(["results", *map(str, clear), "--format", "csv"]) == 0
    import io

    import pandas as pd

    df = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(df.columns[:2]) == ["replicate", "seed"] and sorted(df["seed"].unique()) == [0, 1, 2]
    one = df[df["seed"] == 1].drop(columns=["replicate", "seed"]).reset_index(drop=True)
    assert main(["results", str(clear[1]), "--format", "csv"]) == 0
    alone = pd.read_csv(io.StringIO(capsys.readouterr().out))
    pd.testing.assert_frame_equal(one, alone, check_dtype=False)


# --------------------------------------------------------------------------------------------------
# esdbs run --seeds: one Tune experiment, one experiment directory per seed
# --------------------------------------------------------------------------------------------------
def test_one_seed_keeps_the_plain_layout():
    cfg = build_config("smoke", sets=["seeds=[4]"])
    assert cfg.seed == 4 and cfg.seeds == () and "seeds" not in cfg.to_dict()
    assert cfg.replicates() == [cfg]
    three = build_config("smoke", sets=["seeds=2,0,1"])
    assert three.seeds == (0, 1, 2) and three.seed == 0 and three.to_dict()["seeds"] == [0, 1, 2]
    assert [r.seed for r in three.replicates()] == [0, 1, 2] and all(not r.seeds for r in three.replicates())


@pytest.mark.slow
def test_run_with_seeds_is_one_tune_experiment_with_a_directory_per_seed(ray_address, tmp_path, capsys):
    from ray.tune import ExperimentAnalysis

    from esdbs_ray.pipeline import run_pipeline

    cfg = build_config("smoke", sets=["members=[alexnet,all_cnn_c]", "seeds=[0,1]", "train.epochs=1",
                                      "resources.cpus_per_trial=1"])
    out = tmp_path / "run"
    summary = run_pipeline(cfg, str(out), address=ray_address, progress=False)
    assert summary["seeds"] == [0, 1] and summary["replicates"] == {"0": "seed-0", "1": "seed-1"}
    # one Tune experiment: every (member, seed), the seed in the trial's config and directory name
    analysis = ExperimentAnalysis(str(out / "tune" / "base"))
    got = sorted((t.config["member"], t.config["seed"]) for t in analysis.trials)
    assert got == [("alexnet", 0), ("alexnet", 1), ("all_cnn_c", 0), ("all_cnn_c", 1)]
    for t in analysis.trials:
        assert re.fullmatch(rf"{t.config['member']}_s{t.config['seed']}_\w+", Path(t.path).name), t.path
    assert all(t.last_result.get("seed") == t.config["seed"] for t in analysis.trials)
    val = {}
    for s in (0, 1):
        d = out / f"seed-{s}"
        # each seed's directory is that seed's config run alone: its own config, members, stack and summary
        assert build_config(None, str(d / "config.yaml")) == cfg.replicate(s)
        own = json.loads((d / "summary.json").read_text())
        assert own["config"]["seed"] == s and sorted(m["member"] for m in own["members"]) == ["alexnet", "all_cnn_c"]
        st = json.loads((d / "stacking.json").read_text())
        assert sorted(st["member_names"]) == ["alexnet", "all_cnn_c"]
        assert all(Path(p["path"]).parent == d / "predictions" for p in st["provenance"])  # its own members only
        import pyarrow.parquet as pq

        t = pq.read_table(next((d / "predictions").glob("alexnet-ts0000.parquet"))).to_pandas()
        val[s] = sorted(t[t["split"] == "val"]["index"])
    assert val[0] != val[1]  # each seed's own split
    # the readers take the run: results per seed, a report across the seeds
    assert main(["results", str(out), "--format", "csv", "--columns", "replicate,seed,kind,member"]) == 0
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 replicates: seed 0, seed 1" in printed and (out / "report" / "report.html").is_file()
    # one seed's directory reads alone too, its trials found in the run's Tune experiment
    assert main(["results", str(out / "seed-1"), "--format", "csv"]) == 0
    assert "alexnet_s1_" in capsys.readouterr().out
    assert main(["stack", str(out)]) == 2
    assert "is a multi-seed run: name one seed's experiment" in capsys.readouterr().err
