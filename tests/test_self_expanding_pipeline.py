"""Self-expanding members through the whole pipeline: growing secnn members as Tune trials on the session's
Ray, their levels in the Parquet predictions and weights, ``esdbs stack / results / export`` addressing
a level, ``esdbs run --expansion-search``, and the config around them (member names, per-member seeds,
the search's section, one-line errors)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from esdbs_ray.cli import main
from esdbs_ray.config import ConfigError, PipelineConfig, build_config, parse_variant, slug
from esdbs_ray.presets import PRESETS

# Two growing members of one model (the second named secnn-2, seed 1), tau 1: every check grows (a
# candidate adds non-negative terms to eta, almost surely some > 0), cooldown 0: a check after every
# dense epoch but the last.  The search tries tau 1 (grows) and tau 50 (never does).
SE_SMOKE = """
name: se-smoke
subset: 600
test_subset: 300
members: [secnn, {model: secnn, seed: 1}]
variants: [SC-CNN]
train:
  width: 0.5
  epochs: 3
  optimizer: adam
  eval_batch_size: 500
  dbs: {b0: 64, lr0: 0.002, lr_start: 0.002, warmup_frac: 0.0}
  expansion: {enabled: true, tau: 1.0, cooldown: 0, score_samples: 96, n_init: 2, penalty: 0.0}
expansion_search:
  epochs: 2
  space: {tau: {grid: [1.0, 50.0]}, penalty: {grid: [0.0]}}
resources: {cpus_per_trial: 1}
"""


@pytest.fixture(scope="session")
def se_run(ray_address, tmp_path_factory, request):
    """``esdbs run --config SE_SMOKE --expansion-search`` on the session's Ray, once per test run (xdist
    workers share it through a file lock, as conftest's smoke_run)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        shared = shared.parent
    root = shared / "se-run"
    root.mkdir(exist_ok=True)
    out = root / "exp"
    with FileLock(str(shared / "se-run.lock")):
        if not (out / "expansion_search.json").is_file():
            cfg = root / "se.yaml"
            cfg.write_text(SE_SMOKE)
            r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "run", "--config", str(cfg), "--expansion-search",
                                "--out", str(out), "--quiet"], env={**os.environ, "RAY_ADDRESS": ray_address},
                               capture_output=True, text=True, timeout=600)
            (root / "run.log").write_text(r.stdout + r.stderr)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, (root / "run.log").read_text()


def _members(out) -> dict:
    return {json.loads(f.read_text())["member"]: json.loads(f.read_text()) for f in (out / "members").glob("*.json")}


# --------------------------------------------------------------------------------------------------
# growing members as Tune trials
# --------------------------------------------------------------------------------------------------
def test_growing_members_grow_and_their_levels_reach_the_parquet_files(se_run):
    import pyarrow.compute as pc

    from esdbs_ray.predictions import prediction_matrix, read_predictions

    out, _ = se_run
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(m["member"] for m in summary["members"]) == ["secnn", "secnn-2"]
    members = _members(out)
    assert {n: m["config"]["seed"] for n, m in members.items()} == {"secnn": 0, "secnn-2": 1}
    table = read_predictions(out / "predictions")
    for name, m in members.items():
        ops = m["expansion"]["ops"]
        assert len(ops) == 2, (name, m["expansion"]["checks"])  # grew at epochs 0 and 1
        levels = m["levels"]
        assert [lv["level"] for lv in levels] == [0, 1, 2]
        assert [lv["params"] for lv in levels] == sorted({lv["params"] for lv in levels})  # each level larger
        for lv in levels:
            rows = table.filter(pc.and_(pc.equal(table["member"], name), pc.equal(table["level"], lv["level"])))
            assert rows.num_rows == m["val_size"] + m["test_size"]  # the level's val and test predictions
            assert set(rows["params"].to_pylist()) == {lv["params"]}
            P, y, _ = prediction_matrix(table, "test", [name], None, level=lv["level"])
            assert abs(float((P[0].argmax(1) == y).mean()) - lv["test_accuracy"]) < 1e-9
            assert (out / "weights" / f"{name}-lv{lv['level']:02d}.pt").is_file()
    # the members' seeds reached their trials: the two seed networks predict differently
    a, _, _ = prediction_matrix(table, "test", ["secnn"], None, level=0)
    b, _, _ = prediction_matrix(table, "test", ["secnn-2"], None, level=0)
    assert not np.allclose(a, b)
    # and the group's stack is of the grown networks (the dense rung, the last level)
    stacking = json.loads((out / "stacking.json").read_text())
    assert sorted(stacking["member_names"]) == ["secnn", "secnn-2"]


def test_stack_results_and_export_address_a_level(se_run, tmp_path, capsys):
    import pandas as pd

    out, _ = se_run
    members = _members(out)
    assert main(["stack", str(out), "--level", "1", "--output", str(tmp_path / "lv1.json")]) == 0
    st = json.loads((tmp_path / "lv1.json").read_text())
    assert st["level"] == 1 and sorted(st["member_names"]) == ["secnn", "secnn-2"]
    for name, m in st["members"].items():  # the stack's member figures are those of level 1
        assert m["test_accuracy"] == pytest.approx(members[name]["levels"][1]["test_accuracy"])

    assert main(["results", str(out), "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    df = pd.read_csv(tmp_path / "r.csv")
    levels = df[df["kind"] == "level"]
    assert sorted(zip(levels["member"], levels["level"].astype(int))) == [
        (n, k) for n in ("secnn", "secnn-2") for k in range(3)]
    assert (levels["params"] > 0).all()

    assert main(["export", str(out), "--level", "1", "--out", str(tmp_path / "export"), "--no-onnx"]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["ensemble"]["level"] == 1
    assert [len(m["growth_ops"]) for m in manifest["members"]] == [1, 1]
    capsys.readouterr()
    assert main(["export", str(out), "--level", "7", "--out", str(tmp_path / "nope"), "--no-onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "level 7" in err and len(err.splitlines()) == 1 and not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------------------------------
# the expansion search
# --------------------------------------------------------------------------------------------------
def test_the_expansion_search_stage_records_every_setting_and_the_choice(se_run):
    from esdbs_ray.expansion_search import choose

    out, log = se_run
    record = json.loads((out / "expansion_search.json").read_text())
    assert record["member"] == "secnn" and record["epochs"] == 2 and record["seeds"] == 1
    by_tau = {t["setting"]["tau"]: t for t in record["trials"]}
    assert sorted(by_tau) == [1.0, 50.0]
    grew, kept = by_tau[1.0], by_tau[50.0]
    assert grew["expansions"] == 1 and grew["params"] > grew["base_params"]  # one check (epoch 0 of 2)
    assert kept["expansions"] == 0 and kept["params"] == kept["base_params"] and kept["checks"] == 1
    assert all(0.0 <= t["val_accuracy"] <= 1.0 and t["train_seconds"] > 0 for t in record["trials"])
    settings, chosen = choose(record["trials"])  # the record's choice is the rule's
    assert record["chosen"] == chosen["setting"] and len(record["settings"]) == 2
    assert (out / "expansion_search.png").stat().st_size > 5000
    assert (out / "tune" / "expansion_search").is_dir()
    assert "expansion search (secnn, 2 epochs, 1 seed(s)): chosen tau" in log
    assert "--set train.expansion.tau=" in log


def _trial(tau, seed, acc, params, n=1000):
    return {"setting": {"tau": tau, "penalty": 0.0}, "seed": seed, "val_accuracy": acc, "val_size": n,
            "params": params, "base_params": 100, "expansions": 0, "checks": 1}


def test_the_choice_is_the_smallest_network_within_one_standard_error_of_the_best():
    from esdbs_ray.expansion_search import choose

    # SE of the best (mean 0.90 over 2 x 1000 images) = sqrt(0.9 * 0.1 / 2000) = 0.0067
    trials = [_trial(1.05, 0, 0.905, 900), _trial(1.05, 1, 0.895, 1100),  # best: 0.900, 1000 params
              _trial(1.2, 0, 0.896, 500), _trial(1.2, 1, 0.896, 500),     # 0.896: within one SE, smaller
              _trial(2.0, 0, 0.880, 100), _trial(2.0, 1, 0.884, 100)]     # 0.882: outside
    settings, chosen = choose(trials)
    assert chosen["setting"]["tau"] == 1.2 and chosen["params"] == 500
    se = {s["setting"]["tau"]: s for s in settings}
    assert se[1.05]["val_se"] == pytest.approx(math.sqrt(0.9 * 0.1 / 2000))
    assert [se[t]["within_one_se"] for t in (1.05, 1.2, 2.0)] == [True, True, False]
    # a smaller network beyond the band is never chosen; the best alone is chosen when nothing is near it
    settings, chosen = choose([_trial(1.05, 0, 0.95, 900), _trial(2.0, 0, 0.80, 100)])
    assert chosen["setting"]["tau"] == 1.05


def test_search_points_cross_the_grid_and_draw_the_rest_from_the_seed():
    from esdbs_ray.expansion_search import search_points

    space = {"tau": {"grid": [1.1, 2.0]}, "penalty": {"loguniform": [1e-10, 1e-7]}, "cooldown": {"choice": [1, 3]}}
    a = search_points(space, 2, seed=10, seeds=3)
    assert len(a) == 2 * 2 * 3 and a == search_points(space, 2, seed=10, seeds=3)
    assert a != search_points(space, 2, seed=11, seeds=3)
    assert sorted({p["seed"] for p in a}) == [10, 11, 12] and {p["tau"] for p in a} == {1.1, 2.0}
    assert all(1e-10 <= p["penalty"] <= 1e-7 and p["cooldown"] in (1, 3) for p in a)
    # each setting is trained with every seed, the same setting for all of them
    for i in range(0, len(a), 3):
        assert len({json.dumps({k: v for k, v in p.items() if k != "seed"}) for p in a[i:i + 3]}) == 1


# --------------------------------------------------------------------------------------------------
# members: names, seeds; the config's errors
# --------------------------------------------------------------------------------------------------
def test_repeated_models_get_unique_stable_names_and_their_own_seeds():
    cfg = build_config("smoke", overrides={"members": [
        "secnn", {"model": "secnn", "seed": 1}, "alexnet", {"model": "secnn", "name": "wide", "width": 0.5, "seed": 2},
        {"model": "secnn", "seed": 3}], "seed": 7})
    assert cfg.member_names() == ["secnn", "secnn-2", "alexnet", "wide", "secnn-3"]
    trials = {t.member: t.train for t in cfg.trials()}
    assert {m: t.seed for m, t in trials.items()} == {"secnn": 7, "secnn-2": 1, "alexnet": 7, "wide": 2, "secnn-3": 3}
    assert trials["wide"].width == 0.5 and trials["secnn"].width == cfg.train.width
    # a name and a seed survive the config.yaml round trip; an unnamed member stays a bare model name
    again = PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and cfg.to_dict()["members"][2] == "alexnet"
    # several groups: <group>-<name>
    two = build_config("smoke", overrides={"members": ["secnn", {"model": "secnn", "seed": 1}],
                                           "variants": ["SC-CNN", "C-CNN"]})
    assert [t.member for t in two.trials()] == ["sc-cnn-secnn", "sc-cnn-secnn-2", "c-cnn-secnn"]


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if not p.startswith("self-expanding")))
def test_existing_presets_keep_their_member_names(preset):
    """Tests and committed results name members by model (<group>-<model> with several groups)."""
    cfg = build_config(preset)
    groups = cfg.groups()
    want = []
    for g in groups:
        stacked = parse_variant(g["variant"])[2]
        for m in (cfg.members if stacked else cfg.members[:1]):
            want.append(m.model if len(groups) == 1 else f"{slug(g['group'])}-{m.model}")
    assert [t.member for t in cfg.trials()] == want


def test_the_self_expanding_presets():
    cpu = build_config("self-expanding-fashion-mnist-cpu")
    assert [(t.member, t.train.seed, t.train.model, t.train.expansion.enabled) for t in cpu.trials()] == [
        (f"secnn-s{i}", i, "secnn", True) for i in range(3)]
    assert cpu.expansion_search_trial().member == "secnn-s0" and cpu.expansion_search.seed not in (0, 1, 2)
    cifar = build_config("self-expanding-cifar10")
    t = cifar.trials()[0].train
    assert len(cifar.trials()) == 5 and cifar.dataset == "cifar10"
    assert (t.optimizer, t.dbs.lr0, t.dbs.b0, t.epochs, t.dropout, t.augment.ops) == (
        "adam", 0.002, 512, 300, 0.1, ("hflip",))
    assert (t.dbs.plateau_patience, t.dbs.plateau_factor, t.expansion.cooldown, t.expansion.widen_channels) == (
        15, 0.5, 5, 4)


@pytest.mark.parametrize("bad,match", [
    ({"members": ["secnn", "secnn"]}, r"members: duplicate members 0 and 1 \(secnn\).*seed"),
    ({"members": ["alexnet", {"model": "alexnet", "seed": 0}]}, "duplicate members"),  # seed 0 is the config's
    ({"members": ["secnn", {"model": "alexnet", "name": "secnn"}]}, r"members.1: two members named 'secnn'"),
    ({"members": ["secnn", {"model": "secnn", "seed": 1}, {"model": "alexnet", "name": "secnn-2"}]},
     "two members named 'secnn-2'"),
    ({"members": [{"model": "secnn", "name": "a/b"}, "alexnet"]}, r"members.0.name='a/b'"),
    ({"members": [{"model": "secnn", "seed": -1}, "alexnet"]}, r"members.0.seed=-1"),
    ({"train": {"seed": 3}}, "set by the pipeline"),
    ({"members": [{"model": "secnn", "dbs": {"b0": 64}, "seed": 1.5}, "alexnet"]}, "members.0.seed"),
    ({"run_expansion_search": True}, "run_expansion_search: needs a growing member"),
    ({"run_expansion_search": True, "members": ["secnn", "alexnet"], "train": {"expansion": {"enabled": True}}},
     "model 'secnn'"),  # alexnet cannot grow: refused by its trial, not silently skipped
    ({"expansion_search": {"member": "vgg"}}, "expansion_search.member='vgg': no such member"),
    ({"expansion_search": {"space": {"lr0": {"grid": [0.1]}}}}, "'lr0' is not a searchable growth setting"),
    ({"expansion_search": {"space": {"tau": {"grid": [0.5, 2]}}}}, r"tau.grid: tau=0.5"),
    ({"expansion_search": {"space": {"penalty": {"loguniform": [0, 1e-8]}}}}, "bounds must be > 0"),
    ({"expansion_search": {"space": {"tau": {"uniform": [2, 1.5]}}}}, "low must be < high"),
    ({"expansion_search": {"space": {}}}, "non-empty mapping"),
    ({"expansion_search": {"seeds": 0}}, "expansion_search.seeds=0"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match) as exc:
        build_config("smoke", None, bad)
    assert "\n" not in str(exc.value)


def test_expansion_search_without_a_growing_member_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["run", "--preset", "smoke", "--expansion-search", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esdbs: error: run_expansion_search: needs a growing member") and "\n" not in err
    assert not out.exists()
    (tmp_path / "old").mkdir()
    assert main(["run", "--resume", str(tmp_path / "old"), "--expansion-search"]) == 2
    assert "drop --expansion-search" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the report's section and the evidence script
# --------------------------------------------------------------------------------------------------
def _baselines(members: dict, grown_minus_scratch: float, grown_minus_seed: float, ratio: float) -> dict:
    """A self_expanding_baselines.json for the run's members, with chosen differences and time ratio."""
    out = {}
    for i, (name, m) in enumerate(sorted(members.items())):
        lv = m["levels"]
        g = lv[-1]["test_accuracy"] + 0.001 * i  # the seeds differ a little
        runs = [{"level": x["level"], "params": x["params"], "test_accuracy": g - grown_minus_scratch,
                 "wall_seconds": 10.0, "cpu_seconds": 10.0, "train_seconds": 9.0} for x in lv]
        runs[0]["test_accuracy"] = g - grown_minus_seed
        summed = {"wall_seconds": 10.0 * len(runs), "cpu_seconds": 10.0 * len(runs), "train_seconds": 9.0 * len(runs)}
        grow = {"test_accuracy": g, "params": lv[-1]["params"], "wall_seconds": ratio * summed["wall_seconds"],
                "cpu_seconds": ratio * summed["cpu_seconds"]}
        out[name] = {"seed": m["config"]["seed"], "ops": m["expansion"]["ops"], "rerun_grew_the_same": True,
                     "experiment_levels": lv, "growing": grow, "levels": runs, "levels_summed": summed,
                     "time_ratio": {k: ratio for k in summed}, "final_from_scratch": runs[-1],
                     "seed_architecture": runs[0]}
    return {"workers": 2, "threads": 1, "members": out, "runs": []}


def test_the_report_section_judges_the_claims_on_the_baselines(se_run, tmp_path):
    import shutil

    from esdbs_ray.analysis.report import build_report

    out, _ = se_run
    exp = tmp_path / "exp"
    shutil.copytree(out, exp, ignore=shutil.ignore_patterns("tune", "tensorboard", "weights"))
    r = build_report(exp, tmp_path / "report-bare")
    md = (tmp_path / "report-bare" / "report.md").read_text()
    assert "## Self-expanding members" in md and "| secnn-2 | 1 | 2 |" in md  # the levels table
    assert "| SE1 |" in md and md.count("| not run |") >= 3  # no baselines: every claim not run
    assert "### Search over the growth settings" in md and "Chosen: tau" in md
    assert r["sections"]["figure:self_expanding"] == "ok"
    assert (tmp_path / "report-bare" / "self_expanding_accuracy_vs_params.png").stat().st_size > 10000
    # grown 8 pt above its architecture from scratch and 5 pt above the seed, in a third of the time (300
    # test images: an SE of ~2 pt)
    (exp / "self_expanding_baselines.json").write_text(json.dumps(_baselines(_members(out), 0.08, 0.05, 0.33)))
    build_report(exp, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| SE1 |" in md and "reproduced (improves)" in md
    se2 = next(line for line in md.splitlines() if line.startswith("| SE2 |"))
    se3 = next(line for line in md.splitlines() if line.startswith("| SE3 |"))
    assert "| reproduced |" in se2 and "+5." in se2 and "| reproduced |" in se3 and "0.33x" in se3
    assert "CIFAR-10 (published; another dataset)" in md and "62,698" in md


def test_the_verdict_rules():
    from esdbs_ray.analysis.self_expanding import verdicts

    members = {n: {"config": {"seed": i}, "expansion": {"ops": []},
                   "levels": [{"level": 0, "params": 100, "test_accuracy": 0.80},
                              {"level": 1, "params": 200, "test_accuracy": 0.85}]} for i, n in enumerate("abc")}
    by_id = lambda rows: {r["id"]: r["verdict"] for r in rows}  # noqa: E731
    # 10,000 test images: the binomial SE of the difference of means is ~0.3 pt
    assert by_id(verdicts(_baselines(members, 0.0, 0.05, 0.4), 10_000)) == {
        "SE1": "reproduced (maintains)", "SE2": "reproduced", "SE3": "reproduced"}
    assert by_id(verdicts(_baselines(members, -0.03, 0.002, 1.0), 10_000)) == {
        "SE1": "not reproduced", "SE2": "not reproduced", "SE3": "not reproduced"}
    assert set(by_id(verdicts(None, 10_000)).values()) == {"not run"}


def test_the_evidence_script_builds_each_level_afresh():
    """bench/self_expanding.py: a level's architecture is the grown one, every layer initialised anew
    (not the growing run's zero outgoing weights), level 0 the seed network as the run starts it."""
    import torch

    from esdbs_ray.config import TrainConfig
    from esdbs_ray.expansion import apply_op, count_params
    from esdbs_ray.networks import build_network

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from bench.self_expanding import architecture_of

    class Data:
        num_classes, in_channels, image_size = 10, 1, 28

    cfg = TrainConfig.from_dict({"model": "secnn", "width": 0.5, "seed": 3, "epochs": 1})
    ops = [{"op": "widen", "block": 1, "amount": 4}, {"op": "add_layer", "block": 0, "amount": 1}]
    torch.manual_seed(3)
    grown = build_network("secnn", num_classes=10, in_channels=1, image_size=28, width=0.5)
    for op in ops:
        apply_op(grown, op["op"], op["block"], op["amount"])
    fresh = architecture_of(ops, cfg, Data)
    assert fresh.architecture() == grown.architecture() and count_params(fresh) == count_params(grown)
    w = fresh.blocks[2].conv.weight.detach()  # the widened block's consumer: its new input columns are not zero
    assert float(w[:, -4:].abs().sum()) > 0 and float(grown.blocks[2].conv.weight.detach()[:, -4:].abs().sum()) == 0
    torch.manual_seed(3)
    seed = build_network("secnn", num_classes=10, in_channels=1, image_size=28, width=0.5)
    assert all(torch.equal(a, b) for a, b in zip(seed.state_dict().values(), architecture_of([], cfg, Data).state_dict().values()))
