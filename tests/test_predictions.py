"""The predictions Parquet schema: round trip, atomic writes, clear errors, member alignment."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esdbs_ray import predictions as P

C = 10
META = {"config": {"lr": 0.02, "model": "alexnet"}, "seed": 3, "git_revision": "deadbeef",
        "versions": {"torch": "2.x", "ray": "2.x", "python": "3.11"}}


def _probs(rng, n, c=C):
    z = rng.normal(size=(n, c))
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _parts(rng, n_val=120, n_test=80, val_index=None):
    val_index = np.arange(1000, 1000 + n_val) if val_index is None else val_index
    return [
        dict(split="val", probs=_probs(rng, len(val_index)), labels=val_index % C, indices=val_index),
        dict(split="test", probs=_probs(rng, n_test), labels=np.arange(n_test) % C, indices=np.arange(n_test)),
    ]


def _write(path, rng, member="alexnet", ts=0.8, epoch=5, **kw):
    parts = kw.pop("parts", None) or _parts(rng)
    return P.write_predictions(
        path, parts=parts, model=member.split("-")[-1], member=member, variant="SWR-CNN",
        sparsity=ts - 0.005, target_sparsity=ts, epoch=epoch, metadata=META, **kw,
    )


def test_round_trip_schema_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    path = P.prediction_path(tmp_path, "alexnet", 0.8)
    assert path.endswith(os.path.join("predictions", "alexnet-ts0800.parquet"))
    written = _write(path, rng)
    assert written == path and os.path.exists(path)

    t = P.read_predictions(path)
    assert t.num_rows == 200
    splits = t["split"].to_pylist()
    assert splits.count("val") == 120 and splits.count("test") == 80
    # read tables carry the optional columns (basis_threshold: null where not a BasisConv rung; level
    # and params: null where not a growing member's level) so files of every kind concatenate; the
    # file itself keeps the canonical schema
    want = P.prediction_schema(C)
    for f in P.OPTIONAL_FIELDS:
        want = want.append(f)
    assert t.schema.remove_metadata().equals(want)
    for name in ("basis_threshold", "level", "params"):
        assert t[name].null_count == t.num_rows
    assert t.schema.field("probs").type == pa.list_(pa.float32(), C)
    probs = np.asarray(t["probs"].to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    md = P.read_metadata(path)
    for k, v in META.items():
        assert md[k] == v
    assert md["created"] and md["num_classes"] == C and md["esdbs_predictions_schema"] == P.SCHEMA_VERSION
    # raw Parquet key-value metadata is JSON
    raw = pq.ParquetFile(path).metadata.metadata
    assert json.loads(raw[b"config"]) == META["config"]
    src = P.prediction_sources(t)
    assert src[0]["path"] == path and src[0]["metadata"]["seed"] == 3

    pv, yv, names = P.prediction_matrix(t, "val")
    assert pv.shape == (1, 120, C) and names == ["alexnet"]
    np.testing.assert_array_equal(yv, np.arange(1000, 1120) % C)


def test_single_block_with_split_column(tmp_path):
    rng = np.random.default_rng(1)
    n = 50
    split = np.array(["val"] * 30 + ["test"] * 20)
    idx = np.r_[np.arange(30), np.arange(20)]
    out = P.write_predictions(
        tmp_path / "a.parquet", probs=_probs(rng, n), labels=idx % C, indices=idx, split=split,
        model="allcnnc", member="m1-allcnnc", variant="SC-CNN", sparsity=0.5, target_sparsity=0.5, epoch=1,
        metadata=META,
    )
    t = P.read_predictions(out)
    assert t["split"].to_pylist().count("test") == 20
    assert set(t["member"].to_pylist()) == {"m1-allcnnc"}


def test_uri_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    uri = "file://" + str(tmp_path / "exp" / "predictions" / "x.parquet")
    assert _write(uri, rng) == uri
    t = P.read_predictions("file://" + str(tmp_path / "exp" / "predictions"))
    assert t.num_rows == 200
    assert P.prediction_sources(t)[0]["path"].endswith("exp/predictions/x.parquet")
    assert [f for f in os.listdir(tmp_path / "exp" / "predictions")] == ["x.parquet"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(probs=np.ones((5, C), np.float32)), "sum to 1"),
        (dict(probs=np.full((5, C), np.nan, np.float32)), "NaN"),
        (dict(probs=np.full((5,), 0.1)), "shape"),
        (dict(labels=np.array([0, 1, 2, 3, C])), r"\[0, 10\)"),
        (dict(labels=np.array([0, 1, 2])), "labels must have shape"),
        (dict(indices=np.array([0, 0, 1, 2, 3])), "duplicate indices"),
        (dict(split="training"), "unknown split"),
        (dict(sparsity=80.0), "fraction"),
        (dict(metadata={"config": object()}), "JSON"),
    ],
)
def test_bad_input_raises_and_leaves_existing_file(tmp_path, bad, message):
    rng = np.random.default_rng(3)
    path = tmp_path / "p.parquet"
    _write(str(path), rng)
    before = path.read_bytes()
    kw = dict(probs=_probs(rng, 5), labels=np.arange(5), indices=np.arange(5), split="val", model="m",
              member="m", variant="v", sparsity=0.5, target_sparsity=0.5, epoch=0, metadata=META)
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        P.write_predictions(path, **kw)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.parquet"]


def test_failed_replace_leaves_file_and_no_temp(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    path = tmp_path / "p.parquet"
    _write(str(path), rng)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _write(str(path), rng, epoch=9)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.parquet"]
    # a successful overwrite leaves no temp file either
    _write(str(path), rng, epoch=9)
    assert os.listdir(tmp_path) == ["p.parquet"]
    assert set(P.read_predictions(path)["epoch"].to_pylist()) == {9}


def test_corrupt_and_foreign_files_are_named(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "predictions"
    good = P.prediction_path(tmp_path, "a", 0.5)
    _write(good, rng, member="a", ts=0.5)
    data = open(good, "rb").read()

    trunc = d / "b-ts0500.parquet"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(P.PredictionsError, match="b-ts0500.parquet"):
        P.read_predictions(d)
    trunc.write_bytes(b"not a parquet file at all")
    with pytest.raises(P.PredictionsError, match="b-ts0500.parquet"):
        P.read_predictions(d)
    trunc.unlink()

    foreign = d / "c.parquet"
    pq.write_table(pa.table({"index": [1, 2], "score": [0.1, 0.2]}), foreign)
    with pytest.raises(P.PredictionsError, match=r"c\.parquet.*missing column"):
        P.read_predictions(d)
    foreign.unlink()

    # another class count in the same directory
    P.write_predictions(
        d / "d.parquet", probs=_probs(rng, 4, 3), labels=np.arange(4) % 3, indices=np.arange(4), split="val",
        model="m", member="d", variant="v", sparsity=0.5, target_sparsity=0.5, epoch=0,
    )
    with pytest.raises(P.PredictionsError, match=r"d\.parquet: column 'probs': 3 classes, but .*a-ts0500\.parquet has 10"):
        P.read_predictions(d)


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictions found"):
        P.read_predictions(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".x.parquet.123.tmp").write_bytes(b"junk")  # temp files are ignored
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet files in .*empty"):
        P.read_predictions(tmp_path / "empty")


def test_prediction_matrix_rungs_alignment_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    for m in ("m0-alexnet", "m1-allcnnc", "m2-convpoolcnnc"):
        for ts, ep in ((0.5, 3), (0.8, 7)):
            _write(P.prediction_path(tmp_path, m, ts), rng, member=m, ts=ts, epoch=ep)
    # an older epoch of rung 0.8 for one member, in another file: the latest epoch wins
    _write(str(tmp_path / "predictions" / "old.parquet"), rng, member="m0-alexnet", ts=0.8, epoch=6)
    t = P.read_predictions(P.predictions_dir(tmp_path))

    probs, labels, names, info = P.prediction_matrix(t, "test", return_info=True)
    assert probs.shape == (3, 80, C) and names == ["m0-alexnet", "m1-allcnnc", "m2-convpoolcnnc"]
    assert all(v["target_sparsity"] == 0.8 and v["epoch"] == 7 for v in info.values())
    assert info["m0-alexnet"]["sparsity"] == pytest.approx(0.795, abs=1e-6)

    probs, _, names, info = P.prediction_matrix(t, "val", members=["m2-convpoolcnnc", "m0-alexnet"], sparsity=0.5,
                                                return_info=True)
    assert names == ["m2-convpoolcnnc", "m0-alexnet"] and info["m0-alexnet"]["epoch"] == 3

    with pytest.raises(P.PredictionsError, match=r"available: sparsity 0.5, sparsity 0.8$"):
        P.prediction_matrix(t, "val", sparsity=0.7)
    with pytest.raises(P.PredictionsError, match="available"):
        P.prediction_matrix(t, "val", members=["resnet32"])
    with pytest.raises(P.PredictionsError, match="available splits"):
        P.prediction_matrix(t, "train")

    rungs = P.prediction_rungs(t, "val")
    assert len(rungs) == 7 and all(r["num_rows"] == 120 for r in rungs)


def test_prediction_matrix_mismatched_members(tmp_path):
    rng = np.random.default_rng(7)
    _write(P.prediction_path(tmp_path, "a", 0.8), rng, member="a")
    _write(P.prediction_path(tmp_path, "b", 0.8), rng, member="b",
           parts=_parts(rng, val_index=np.arange(1000, 1119)))  # one validation row short
    t = P.read_predictions(P.predictions_dir(tmp_path))
    with pytest.raises(P.PredictionsError, match=r"'a' and 'b' have different 'val' index sets"):
        P.prediction_matrix(t, "val")
    P.prediction_matrix(t, "test")  # the test rows do agree
