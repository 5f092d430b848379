"""A self-expanding member in the trainer: every expansion first closes a level -- evaluated, its
predictions (with level and parameter count) and weights written --, the grown network is the last
level, the run resumes through growth exactly, and a level's weights rebuild its network for
inference (what `esdbs export --level` packages)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esdbs_ray.config import TrainConfig
from esdbs_ray.run_record import RunRecorder
from esdbs_ray.train import Interrupted, train


class Silent:
    def on_epoch(self, record, checkpoint):
        pass


def _cfg(**kw):
    # tau 1: every check expands (a candidate adds non-negative terms to eta, almost surely some > 0), so the
    # run grows on every CPU; cooldown 0: at every dense epoch but the last
    base = {"model": "secnn", "width": 0.5, "epochs": 3, "seed": 0, "eval_batch_size": 500, "optimizer": "adam",
            "dbs": {"b0": 64}, "sparsity_ladder": [0.5], "retrain_epochs": 1,
            "expansion": {"enabled": True, "tau": 1.0, "cooldown": 0, "score_samples": 96, "n_init": 2,
                          "penalty": 0.0}}
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def data():
    from esdbs_ray.data import load_dataset

    return load_dataset("fashion-mnist", subset=600, test_subset=200, seed=0)


def _run(cfg, data, out, **kw):
    rec = RunRecorder(out, cfg, data, experiment=str(out), variant="SE-CNN")
    return train(cfg, data, out, hooks=[Silent(), rec], **kw)


def test_levels_are_closed_written_and_resumed(data, tmp_path):
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    cfg = _cfg()
    s = _run(cfg, data, tmp_path / "full")
    ops = s.expansion["ops"]
    assert len(ops) == 2 and [lv.level for lv in s.levels] == [0, 1, 2]  # two expansions, three levels
    params = [lv.params for lv in s.levels]
    assert params == sorted(params) and params[0] < params[-1]
    last = s.levels[-1]
    dense = s.rungs[0]
    assert (last.test_accuracy, last.epoch) == (dense.test_accuracy, dense.epoch)  # the grown net = dense rung
    assert [h.params for h in s.history[:2]] == params[1:] and s.history[0].expansion in ("widen", "add_layer")
    assert "eta ratio" in s.history[0].decision
    # predictions and weights per level
    table = read_predictions(tmp_path / "full" / "predictions")
    for lv in s.levels:
        P, y, _ = prediction_matrix(table, "test", ["secnn"], None, level=lv.level)
        assert abs(float((P[0].argmax(1) == y).mean()) - lv.test_accuracy) < 1e-9
        rows = table.filter(__import__("pyarrow.compute", fromlist=["x"]).equal(table["level"], lv.level))
        assert set(rows["params"].to_pylist()) == {lv.params}
        assert (tmp_path / "full" / "weights" / f"secnn-lv{lv.level:02d}.pt").is_file()
    # interrupted after the first expansion, resumed: the same growth, the same numbers
    assert _run(cfg, data, tmp_path / "cut", stop_after_epoch=0) == Interrupted(0)
    r = _run(cfg, data, tmp_path / "cut", resume_from=tmp_path / "cut")
    assert r.expansion["ops"] == ops
    drop = ("train_seconds", "mean_epoch_seconds")
    assert [{k: v for k, v in lv.to_dict().items() if k not in drop} for lv in r.levels] == \
        [{k: v for k, v in lv.to_dict().items() if k not in drop} for lv in s.levels]
    assert [h.val_loss for h in r.history] == [h.val_loss for h in s.history]


def test_a_levels_weights_rebuild_its_network(data, tmp_path):
    """The weights file of a level and its growth operations give back the level's network: the
    export's build_model (registry model, expansions replayed, batch norm folded) predicts the level's
    test probabilities."""
    from esdbs_ray.data import BatchIterator
    from esdbs_ray.ensemble import build_model
    from esdbs_ray.inference import prepare_for_inference
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    cfg = _cfg(epochs=2, sparsity_ladder=[], retrain_epochs=0)
    s = _run(cfg, data, tmp_path)
    lv = s.levels[-1]
    w = torch.load(tmp_path / "weights" / f"secnn-lv{lv.level:02d}.pt", weights_only=True)
    assert len(w["growth_ops"]) == lv.level
    entry = {"model": "secnn", "width": cfg.width, "conv": cfg.conv, "growth_ops": w["growth_ops"]}
    model = build_model(entry, data.num_classes, data.in_channels, data.image_size)
    model.load_state_dict({k: v for k, v in w["model"].items() if not k.endswith("weight_mask")}, strict=False)
    prepare_for_inference(model)
    probs = []
    with torch.inference_mode():
        for x, _ in BatchIterator(data.test, batch_size=500, mean=data.mean, std=data.std):
            probs.append(model(x).softmax(1))
    P, y, _ = prediction_matrix(read_predictions(tmp_path / "predictions"), "test", ["secnn"], None, level=lv.level)
    order = np.argsort(data.test.indices)
    np.testing.assert_allclose(torch.cat(probs).numpy()[order], P[0], rtol=0, atol=1e-5)
