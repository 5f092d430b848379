"""The single-model trainer: resumption, divergence guard, pruning rungs, logs, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esdbs_ray.config import ConfigError, DBSConfig
from esdbs_ray.run_record import TB_SCALARS, RunRecorder
from esdbs_ray.train import Interrupted, TrainConfig, build_model, train


class Silent:
    def on_epoch(self, record, checkpoint_path):
        pass

    def on_rung(self, end):
        pass


def _recorded(tmp_path, cfg, data, variant):
    """Silent, and writing what an experiment's member writes (predictions into tmp_path)."""
    return [Silent(), RunRecorder(tmp_path, cfg, data, experiment=str(tmp_path), variant=variant)]


def _cfg(**kw):
    base = dict(model="convpool_cnn_c", width=0.125, epochs=2, subset=600, test_subset=200, eval_batch_size=500,
                dbs=DBSConfig(b0=64), seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_data():
    from esdbs_ray.data import load_dataset

    return load_dataset("fashion-mnist", subset=600, test_subset=200, seed=3)


@pytest.mark.parametrize("kw,stop", [
    (dict(schedule="dbs", conv="winograd_relu", sparsity_ladder=(0.4,), retrain_epochs=1, dropout=0.2), 0),
    (dict(schedule="fixed", conv="spatial"), 0),
    # BasisConv eigen ladder, cut after step one of the first basis rung: the resumed run
    # must rebuild the basis layers of the checkpoint's shapes, freeze what step two freezes (nothing)
    # and go on with the same optimizer, schedule and batches; the second rung then recompresses.
    pytest.param(dict(schedule="dbs", epochs=1, basis={"ladder": (1.0, 0.8)}, retrain_epochs=2, dropout=0.2), 1,
                 marks=pytest.mark.long),
], ids=["swr-dbs-pruned", "spatial-fixed", "basis-ladder"])
def test_resume_gives_the_uninterrupted_run(tmp_path, tiny_data, kw, stop):
    cfg = _cfg(**kw)
    full = train(cfg, tiny_data, tmp_path / "full", hooks=Silent())
    partial = train(cfg, tiny_data, tmp_path / "cut", hooks=Silent(), stop_after_epoch=stop)
    assert partial == Interrupted(stop)
    resumed = train(cfg, tiny_data, tmp_path / "cut", hooks=Silent(), resume_from=tmp_path / "cut")
    keys = ("train_loss", "val_loss", "val_accuracy", "lr", "momentum", "batch_size", "sparsity")
    for a, b in zip(full.history, resumed.history):
        assert {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}
    assert len(resumed.history) == cfg.total_epochs
    timing = ("train_seconds", "mean_epoch_seconds")  # rung records equal but for the machine's timings
    assert [{k: v for k, v in r.to_dict().items() if k not in timing} for r in full.rungs] == [
        {k: v for k, v in r.to_dict().items() if k not in timing} for r in resumed.rungs]
    wa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    # tensors, and a BasisConv layer's extra state (its basis kind, t, kept energy: plain values)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) if torch.is_tensor(wa[k]) else wa[k] == wb[k]
                                          for k in wa)
    if cfg.basis.ladder:  # the run did climb the ladder: the last rung's bases are in the model
        assert any(k.endswith(".basis") for k in wa) and resumed.rungs[-1].basis_threshold == 0.8


def test_resume_refuses_another_config(tmp_path, tiny_data):
    train(_cfg(epochs=1), tiny_data, tmp_path, hooks=Silent())
    with pytest.raises(ValueError, match="different config"):
        train(_cfg(epochs=1, l2=0.5), tiny_data, tmp_path, hooks=Silent(), resume_from=tmp_path)


def test_resume_under_another_layer_implementation_or_from_before_the_key(tmp_path, tiny_data):
    # winograd_impl says how a step is computed, not what is trained: a checkpoint resumes under
    # another value, and one written before the key existed (its config lacks it) resumes too
    cfg = _cfg(epochs=2, conv="winograd_relu", winograd_impl="reference")
    assert train(cfg, tiny_data, tmp_path, hooks=Silent(), stop_after_epoch=0) == Interrupted(0)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["winograd_impl"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    resumed = train(_cfg(epochs=2, conv="winograd_relu", winograd_impl="native"), tiny_data, tmp_path,
                    hooks=Silent(), resume_from=tmp_path)
    assert len(resumed.history) == 2 and resumed.winograd_impl["training"] == "native"


def test_guard_restores_the_snapshot_on_nan_loss(tmp_path, tiny_data, monkeypatch):
    # A loss that turns NaN (as a diverging run's does: a learning rate of 1e9 gives inf or NaN or
    # only 1e14, depending on float rounding) and NaN gradients with it; the guard must put back the
    # weights from before that epoch (epoch 0 always snapshots).
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    cfg = _cfg(epochs=1, dbs=DBSConfig(b0=64, warmup_frac=0.0))
    torch.manual_seed(cfg.seed)
    initial, _ = build_model(cfg, tiny_data)
    summary = train(cfg, tiny_data, tmp_path, hooks=Silent())
    record = summary.history[0]
    assert not np.isfinite(record.train_loss) and record.restored
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    for k, v in initial.state_dict().items():
        assert torch.equal(after[k], v), k


def test_pruning_rungs_predictions_and_tensorboard(tmp_path, tiny_data, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import esdbs_ray.train as train_mod
    from esdbs_ray.predictions import read_predictions

    evaluated = []  # which split each evaluation ran on: the val split once per epoch, rung ends included
    real_evaluate = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda m, b, **kw: (
        evaluated.append("val" if len(b) == len(tiny_data.val) else "test"), real_evaluate(m, b, **kw))[1])
    cfg = _cfg(epochs=1, conv="winograd_relu", sparsity_ladder=(0.3, 0.6), retrain_epochs=1, schedule="dbs")
    s = train(cfg, tiny_data, tmp_path, hooks=_recorded(tmp_path, cfg, tiny_data, "SWR-CNN+DBS"))
    assert evaluated == ["val", "test"] * 3 and not any(h.restored for h in s.history)
    assert [r.target_sparsity for r in s.rungs] == [0.0, 0.3, 0.6]
    for r in s.rungs:
        assert abs(r.sparsity - r.target_sparsity) <= 0.005
        assert 0.0 <= r.test_accuracy <= 1.0 and r.layer_sparsity if r.target_sparsity else True
    table = read_predictions(tmp_path / "predictions")
    assert table.num_rows == 3 * (len(tiny_data.val) + len(tiny_data.test))
    from esdbs_ray.predictions import prediction_matrix

    # the val probabilities written are those of the epoch's own evaluation
    for r, h in zip(s.rungs, s.history):
        probs, labels, _ = prediction_matrix(table, "val", sparsity=r.target_sparsity)
        assert r.val_accuracy == h.val_accuracy == pytest.approx(float((probs[0].argmax(1) == labels).mean()))
    # whole-model sparsity and nonzero counts beside the pruned layers' (spec §3), also in Parquet metadata
    for r in s.rungs[1:]:
        assert 0 < r.model_sparsity < r.sparsity and r.nonzero_weights < r.total_weights
        assert r.total_weights - r.nonzero_weights >= r.sparsity * r.pruned_layer_weights - 1
    from esdbs_ray.predictions import read_metadata

    meta = read_metadata(sorted((tmp_path / "predictions").glob("*.parquet"))[-1])
    assert meta["sparsity_accounting"]["nonzero_weights"] == s.rungs[-1].nonzero_weights
    # every schedule decision is logged per epoch: the rung starts say the plateau restarted
    assert [h.decision.split(":")[0] for h in s.history[1:]] == ["rung 1", "rung 2"]
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "epochs", "train_seconds", "config", "rungs", "history"):
        assert key in written
    assert written["config"]["sparsity_ladder"] == [0.3, 0.6]
    assert (tmp_path / "kernels.png").stat().st_size > 1000
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(TB_SCALARS) <= set(acc.Tags()["scalars"])
    assert "winograd_kernels" in acc.Tags()["images"]
    assert [e.value for e in acc.Scalars("schedule/batch_size")] == [h.batch_size for h in s.history]


def test_swr_training_runs_the_native_layer_by_default(tmp_path, tiny_data, monkeypatch):
    # The trainer does nothing special: under "auto" every WinogradReLUConv2d runs the native CPU
    # kernels, in training steps and in evaluation, and nothing is compiled per layer shape.
    import esdbs_ray.winograd as wg
    import esdbs_ray.winograd_dispatch as wd
    import esdbs_ray.winograd_sparse as ws
    from esdbs_ray.winograd_math import _WinogradNativeFn

    calls = []
    real_apply = _WinogradNativeFn.apply

    def apply(x, u, relu):
        calls.append(((*x.shape[1:], u.shape[2]), torch.is_grad_enabled()))
        return real_apply(x, u, relu)

    monkeypatch.setattr(_WinogradNativeFn, "apply", staticmethod(apply))
    # evaluation: the native kernels with bias in their output transform, no autograd Function
    real_inference = ws.native_inference

    def native_inference(x, u, mask, relu, bias=None, out_relu=False):
        calls.append(((*x.shape[1:], u.shape[2]), torch.is_grad_enabled()))
        return real_inference(x, u, mask, relu, bias, out_relu)

    monkeypatch.setattr(ws, "native_inference", native_inference)
    monkeypatch.setenv(wg.IMPL_ENV, "auto")
    wd._reset_fused_state()
    try:
        cfg = _cfg(epochs=1, conv="winograd_relu")
        summary = train(cfg, tiny_data, tmp_path, hooks=Silent())
        impl = summary.winograd_impl  # the summary says what ran
        assert (impl["training"], impl["inference"], impl["dtype"]) == ("native", "native", "float32")
        assert Path(impl["native"]["binary"]).is_file()
        model, _ = build_model(cfg, tiny_data)
        shapes = set()
        for _, layer in wg.winograd_layers(model):
            layer.register_forward_hook(lambda m, inp, out: shapes.add((*inp[0].shape[1:], m.out_channels)))
        model(torch.zeros(2, 1, 28, 28))
        assert shapes and {s for s, grad in calls if grad} == shapes  # training steps
        assert {s for s, grad in calls if not grad} == shapes  # evaluation
        assert wg.fused_compile_log() == []
    finally:
        wd._reset_fused_state()


def test_winograd_impl_key_chooses_the_layer_implementation(tmp_path, tiny_data, monkeypatch):
    # train.winograd_impl beats $ESDBS_WINOGRAD_IMPL (the process-wide switch) and the summary says so
    import typing

    import esdbs_ray.winograd as wg
    from esdbs_ray.config import WinogradImpl

    assert typing.get_args(WinogradImpl) == wg.IMPLS
    ran = []
    from esdbs_ray.winograd_math import _WinogradReLUFn

    real_apply = _WinogradReLUFn.apply
    monkeypatch.setattr(_WinogradReLUFn, "apply", staticmethod(lambda *a: ran.append(1) or real_apply(*a)))
    monkeypatch.setenv(wg.IMPL_ENV, "native")
    summary = train(_cfg(epochs=1, conv="winograd_relu", winograd_impl="reference"), tiny_data, tmp_path,
                    hooks=Silent())
    assert (summary.winograd_impl["training"], summary.winograd_impl["inference"]) == ("reference", "reference")
    assert ran


def test_winograd_impl_this_device_cannot_run_fails_before_training(tmp_path, tiny_data):
    with pytest.raises(ValueError, match=r"train.winograd_impl='triton' runs float32 / float16 / bfloat16 on CUDA; "
                                         r"this run computes torch.float32 on cpu"):
        train(_cfg(epochs=1, conv="winograd_relu", winograd_impl="triton", device="cpu"), tiny_data, tmp_path,
              hooks=Silent())
    assert not any(tmp_path.iterdir())  # nothing was written
    with pytest.raises(ConfigError, match=r"^winograd_impl='cudnn': Input should be 'auto', 'native', 'fused', "
                                          r"'triton', 'reference' or 'functional'$"):
        TrainConfig.from_dict({"winograd_impl": "cudnn"})


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match=r"^conv='fft': Input should be 'spatial', 'winograd_relu' or 'basis_random'$"):
        TrainConfig.from_dict({"conv": "fft"})
    with pytest.raises(ConfigError, match=r"sparsity_ladder=\[0.5, 0.3\]: must be strictly increasing"):
        TrainConfig.from_dict({"sparsity_ladder": [0.5, 0.3]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch'; valid keys: width, dropout"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match=r"retrain_epochs must be >= 1 when sparsity_ladder is set"):
        TrainConfig.from_dict({"sparsity_ladder": [0.5], "retrain_epochs": 0})


@pytest.mark.long
@pytest.mark.slow
def test_train_one_cli_done_when(tmp_path):
    """`esdbs train-one` end to end: one epoch of AlexNet on 5,000 images learns, logs, and refuses to
    overwrite its run.

    The foundation issue's command at half width and on a 2,000-image test subset: the same path
    through the CLI, data, trainer, TensorBoard and summary at a quarter of the cost.  One epoch of SGD
    from one seed follows a different path on every CPU (kernels round differently) and every thread
    count, so the bar is set by the measured spread, not by one run's figure.  Measured val accuracy of
    exactly this command on an Intel Xeon, seeds 0-4 x 2 and 1 torch threads: 0.804 0.774 0.776 0.736
    0.776 / 0.806 0.792 0.778 0.770 0.788 (0.736-0.806).  At full width (the original command) the
    same grid gave 0.704-0.786, an AMD EPYC 0.744 and an H100 in bf16 0.692: machines move it by about
    as much as seeds do.  Chance is 0.10; 0.60 is six times chance and 13 points below the lowest run."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "train-one", "--dataset", "fashion-mnist", "--model",
                        "alexnet", "--width", "0.5", "--epochs", "1", "--subset", "5000", "--test-subset", "2000",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.60
    assert list((out / "tb").glob("events.out.tfevents.*"))
    again = subprocess.run([sys.executable, "-m", "esdbs_ray.cli", "train-one", "--epochs", "1", "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already holds an esdbs run" in again.stderr and "--resume" in again.stderr


@pytest.mark.long
def test_basis_ladder_rungs_predictions_and_counts(tmp_path, tiny_data):
    """BasisConv: one trial climbs the eigen ladder; each rung is evaluated, counted and predicted."""
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    cfg = _cfg(epochs=1, basis={"ladder": (1.0, 0.9, 0.7), "stage1_epochs": 1}, retrain_epochs=2)
    s = train(cfg, tiny_data, tmp_path, hooks=_recorded(tmp_path, cfg, tiny_data, "SBC-CNN"))
    assert [(r.target_sparsity, r.basis_threshold) for r in s.rungs] == [
        (0.0, None), (0.0, 1.0), (0.0, 0.9), (0.0, 0.7)]
    dense, *rungs = s.rungs
    assert dense.basis is None and dense.mult_ratio == 1.0
    # t = 1.0 loses nothing: right after the conversion the model classifies as the trained one did
    assert rungs[0].before_finetune["test_accuracy"] == dense.test_accuracy
    assert rungs[0].direct_conversion["test_accuracy"] == dense.test_accuracy
    filters = [r.basis["retained_filters"] for r in rungs]
    assert filters == sorted(filters, reverse=True) and filters[-1] < filters[0]
    for r in rungs:
        b = r.basis
        assert b["original_filters"] == dense.filters and b["conv_mults"] == r.conv_mults
        assert b["conv_learnable"] < b["original_conv_learnable"] or r.basis_threshold == 1.0
        assert all(layer["energy"] >= r.basis_threshold - 1e-6 for layer in b["layers"].values())
    assert rungs[-1].mult_ratio < rungs[0].mult_ratio
    # the paper's two steps per rung: coefficients at stage1_lr_scale, then everything at stage2_lr_scale
    assert [h.fine_tuning_stage for h in s.history] == [None, 1, 2, 1, 2, 1, 2]
    assert [h.lr_scale or 1.0 for h in s.history] == [1.0, 1.0, 0.1, 1.0, 0.1, 1.0, 0.1]
    assert s.compression == "basis" and s.basis_threshold == 0.7 and s.basis == rungs[-1].basis
    # predictions: one file per rung, a basis rung named and selected by its t
    names = sorted(p.name for p in (tmp_path / "predictions").glob("*.parquet"))
    assert names == ["convpool_cnn_c-bt0700.parquet", "convpool_cnn_c-bt0900.parquet",
                     "convpool_cnn_c-bt1000.parquet", "convpool_cnn_c-ts0000.parquet"]
    table = read_predictions(tmp_path / "predictions")
    _, _, _, info = prediction_matrix(table, "test", None, None, return_info=True)
    assert info["convpool_cnn_c"]["basis_threshold"] == 0.7  # the last rung: the smallest t
    P, y, _ = prediction_matrix(table, "test", None, 0.0, basis_threshold=0.9)
    assert abs(float((P[0].argmax(1) == y).mean()) - rungs[1].test_accuracy) < 1e-9


def test_basis_random_trains_with_fixed_bases(tmp_path, tiny_data):
    """`conv: basis_random` trains from scratch: bases never move, the rest does; counts recorded."""
    from esdbs_ray.basisconv import basis_layers

    cfg = _cfg(epochs=2, conv="basis_random", basis={"fraction": 0.5})
    s = train(cfg, tiny_data, tmp_path, hooks=Silent())
    fresh, _ = build_model(cfg, tiny_data)  # same seed: the bases the run started from
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    layers = basis_layers(fresh)
    assert layers and all(m.bn is not None for _, m in layers)  # batch norm before the 1x1 (section 4.5)
    for name, m in layers:
        assert torch.equal(trained[f"{name}.basis"], m.basis)
        assert not torch.equal(trained[f"{name}.projection.weight"], m.projection.weight)
    (rung,) = s.rungs
    b = rung.basis
    assert s.compression == "dense" and b["basis_layers"] == len(layers)
    assert b["retained_filters"] < b["original_filters"] and b["conv_learnable_reduction"] > 2.0
    assert rung.conv_mults == b["conv_mults"] < rung.dense_conv_mults


@pytest.mark.parametrize("flags,want", [
    (["--conv", "basis_random", "--basis-fraction", "0.5", "--basis-layers", "relu"],
     {"conv": "basis_random", "basis": {"fraction": 0.5, "layers": "relu"}}),
    (["--basis-ladder", "1.0,0.8", "--retrain-epochs", "2", "--basis-stage2-lr-scale", "0.01"],
     {"conv": "spatial", "basis": {"ladder": [1.0, 0.8], "stage2_lr_scale": 0.01}}),
], ids=["random", "ladder"])
def test_train_one_basis_flags(tmp_path, flags, want):
    from esdbs_ray.cli import main

    out = tmp_path / "run"
    code = main(["train-one", "--dataset", "fashion-mnist", "--model", "convpool_cnn_c", "--width", "0.125",
                 "--epochs", "1", "--subset", "300", "--test-subset", "100", "--batch-size", "64", "--out", str(out), *flags])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["conv"] == want["conv"]
    assert {k: s["config"]["basis"][k] for k in want["basis"]} == want["basis"]
    assert len(s["rungs"]) == 1 + len(want["basis"].get("ladder", ())) and s["basis"]


def test_build_network_names_the_conv_it_cannot_build():
    from esdbs_ray.networks import build_network

    shape = dict(num_classes=10, in_channels=1, image_size=28, width=0.125)
    with pytest.raises(ValueError, match="conv 'winograd'.*spatial, winograd_relu, basis_random"):
        build_network("alexnet", conv="winograd", **shape)
    with pytest.raises(ValueError, match="needs the basis settings"):
        build_network("alexnet", conv="basis_random", **shape)
    from esdbs_ray.winograd import winograd_layers

    assert winograd_layers(build_network("alexnet", conv="winograd_relu", **shape))
    assert not winograd_layers(build_network("alexnet", **shape))
