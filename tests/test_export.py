"""Using a trained ensemble: the Winograd layer's plain-ops form, `esdbs export` -> `esdbs predict` on the
session's smoke run (real Fashion-MNIST), the ONNX graphs against torch, `esdbs results` on local paths and
URIs, and `esdbs stack` on a URI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from esdbs_ray.cli import main

MEMBERS = ("alexnet", "convpool_cnn_c", "all_cnn_c")


# --------------------------------------------------------------------------------------------------
# The Winograd-ReLU layer as plain ops (what ONNX sees)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(28, 28), (7, 7), (5, 9), (8, 3)])
@pytest.mark.parametrize("relu,bias", [(True, False), (False, True)])
def test_plain_winograd_matches_the_layer(hw, relu, bias):
    from esdbs_ray.export import winograd_relu_plain
    from esdbs_ray.winograd import WinogradReLUConv2d

    torch.manual_seed(0)
    layer = WinogradReLUConv2d(6, 5, relu=relu, bias=bias)
    if bias:
        torch.nn.init.normal_(layer.bias)
    with torch.no_grad():
        layer.weight[3] = 0.0  # a pruned tile position
    x = torch.randn(4, 6, *hw)
    with torch.no_grad():
        want = layer(x)
        got = winograd_relu_plain(x, layer.weight, layer.bias, relu)
    assert got.shape == want.shape == (4, 5, *hw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not relu:  # and with ReLU off it is the spatial convolution it was converted from (spec §2)
        conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
        layer2 = WinogradReLUConv2d.from_conv2d(conv, relu=False)
        with torch.no_grad():
            torch.testing.assert_close(winograd_relu_plain(x, layer2.weight, layer2.bias, False), conv(x),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,size", [("alexnet", 28), ("all_cnn_c", 32), ("convpool_cnn_c", 28), ("vgg16", 28)])
def test_onnx_ready_model_equals_the_model(name, size):
    """A registry model, Winograd-converted, with its Winograd layers in plain ops and its adaptive pools
    fixed for the input size: the same function.  (The export checks each graph with onnxruntime:
    test_export_then_predict_reproduces_the_run.)"""
    from esdbs_ray.export import onnx_ready
    from esdbs_ray.models import create_model
    from esdbs_ray.winograd import WinogradReLUConv2d, to_winograd_relu

    torch.manual_seed(0)
    model = to_winograd_relu(create_model(name, num_classes=10, in_channels=1, image_size=size, width=0.125)).eval()
    x = torch.randn(4, 1, size, size)
    ready = onnx_ready(model, x[:2])
    assert not any(isinstance(m, (WinogradReLUConv2d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveAvgPool2d))
                   for m in ready.modules())
    with torch.no_grad():
        torch.testing.assert_close(ready(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool,size_in", [(torch.nn.AdaptiveMaxPool2d(3), (7, 7)), (torch.nn.AdaptiveAvgPool2d((2, 3)), (5, 7)),
                                          (torch.nn.AdaptiveMaxPool2d(2), (6, 4))])
def test_adaptive_pools_become_fixed_ops(pool, size_in):
    """PyTorch's adaptive bins, dividing or not (7 -> 3 overlaps its bins), as slices or fixed pooling."""
    from esdbs_ray.export import onnx_ready

    model = torch.nn.Sequential(torch.nn.Identity(), pool)
    x = torch.randn(2, 3, *size_in)
    ready = onnx_ready(model, x)
    assert not isinstance(ready[1], type(pool))
    with torch.no_grad():
        torch.testing.assert_close(ready(x), model(x))


# --------------------------------------------------------------------------------------------------
# export -> predict on the smoke run
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fm_test():
    """The whole Fashion-MNIST test file, in its order."""
    from esdbs_ray.data import load_dataset

    return load_dataset("fashion-mnist", seed=0).test


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    out, _ = smoke_run
    target = tmp_path_factory.mktemp("export") / "ensemble"
    assert main(["export", str(out), "--out", str(target)]) == 0
    return out, target


def _run_test_subset(out):
    """The run's test rows (the smoke preset's 300-image stratified test subset): indices, labels, and
    each member's probabilities from the Parquet predictions, at the stacked rung."""
    from esdbs_ray.predictions import prediction_matrix, read_predictions

    table = read_predictions(str(out / "predictions"))
    P, y, names = prediction_matrix(table, "test", list(MEMBERS), 0.5)
    rows = table.filter(pc.and_(pc.equal(table["split"], "test"), pc.equal(table["member"], MEMBERS[0])))
    rows = rows.filter(pc.greater(rows["target_sparsity"], 0.25))
    return np.sort(rows["index"].to_numpy()), y, dict(zip(names, P))


def test_export_is_self_describing(exported):
    out, target = exported
    manifest = json.loads((target / "manifest.json").read_text())
    stacking = json.loads((out / "stacking.json").read_text())
    assert manifest["format"] == "esdbs-ensemble" and manifest["group"] == "SWR-CNN+DBS"
    assert json.loads((target / ".esdbs.json").read_text())["kind"] == "export"
    assert manifest["ensemble"]["weights"] == pytest.approx(stacking["methods"][stacking["chosen"]]["weights"])
    assert manifest["ensemble"]["method"] == stacking["chosen"] and manifest["ensemble"]["sparsity"] == 0.5
    assert manifest["task"]["class_names"][0] == "T-shirt/top" and manifest["input"]["channels"] == 1
    assert manifest["provenance"]["config"]["name"] == "smoke"
    lat = manifest["latency"]  # measured at export, on the export's machine, as predict runs the members
    assert lat["hardware"] and set(lat["members"]) == set(MEMBERS)
    for b in (1, 256):
        per = [lat["members"][m][f"batch_{b}_ms_per_image"] for m in MEMBERS]
        assert all(v > 0 for v in per) and lat[f"batch_{b}_ms_per_image"] == pytest.approx(sum(per), rel=1e-3)
    from safetensors.torch import load_file

    for m in manifest["members"]:
        assert m["model"] in MEMBERS and m["conv"] == "winograd_relu" and m["width"] == 0.125
        assert m["weights_source"] == f"weights/{m['name']}-ts0500.pt"  # the rung the stack used
        assert m["onnx_max_abs_diff"] <= 1e-4
        state = load_file(target / m["weights_file"])
        assert not any(k.endswith("weight_mask") for k in state)  # masks folded into the weights
        kept = torch.load(out / m["weights_source"], weights_only=True)["model"]
        for k, v in kept.items():
            if k.endswith(".weight_mask"):
                w = state[k[: -len("_mask")]]
                assert torch.all(w[v == 0] == 0) and 0.45 < float((w == 0).float().mean()) < 0.55
        params = [t for k, t in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert sum(int((t != 0).sum()) for t in params) == m["nonzero_weights"]


def test_export_then_predict_reproduces_the_run(exported, fm_test):
    """Predicting the run's Fashion-MNIST test images gives back each member's Parquet probabilities and the
    run's ensemble test accuracy (stacking.json) to 1e-4; the ONNX graphs agree with torch to 1e-4."""
    import onnxruntime as ort

    from esdbs_ray.ensemble import Ensemble

    out, target = exported
    idx, y, member_probs = _run_test_subset(out)
    test = fm_test  # the full test file; the run used a subset of it
    images = test.images[idx]
    assert np.array_equal(test.labels[idx], y)
    ensemble = Ensemble.load(target, device="cpu")
    got = ensemble.member_proba(images)
    for m in MEMBERS:
        np.testing.assert_allclose(got[m], member_probs[m], rtol=0, atol=1e-5)
    stacking = json.loads((out / "stacking.json").read_text())
    acc = float(np.mean(ensemble.combine(got).argmax(1) == y))
    assert abs(acc - stacking["methods"][stacking["chosen"]]["test_accuracy"]) <= 1e-4
    pred = ensemble.predict(images[:50], top_k=3)
    assert pred.top_k.shape == (50, 3) and np.all(pred.top_k_probs[:, 0] >= pred.top_k_probs[:, 1])
    # the ONNX graphs: pixels in, probabilities out, as torch computes them
    for m in ensemble.manifest["members"]:
        session = ort.InferenceSession(str(target / m["onnx_file"]), providers=["CPUExecutionProvider"])
        onnx_probs = session.run(["probs"], {"pixels": images[:100].astype(np.float32)})[0]
        assert np.abs(onnx_probs - got[m["name"]][:100]).max() <= 1e-4, m["name"]


def test_predict_cli_on_image_files(exported, fm_test, tmp_path, capsys):
    """`esdbs predict` on a folder of PNGs (class sub-folders give labels) equals the API on the same
    pixels; the Parquet holds the ensemble's and each member's probabilities and the top-k labels."""
    from PIL import Image

    from esdbs_ray.ensemble import Ensemble

    out, target = exported
    test = fm_test
    names = json.loads((target / "manifest.json").read_text())["task"]["class_names"]
    folder = tmp_path / "images"
    files = []
    for i in range(12):
        d = folder / names[int(test.labels[i])].replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        files.append(d / f"{i:03d}.png")
        Image.fromarray(test.images[i, 0]).save(files[-1])
    preds = tmp_path / "preds.parquet"
    assert main(["predict", str(target), str(folder), "--out", str(preds), "--top-k", "2"]) == 0
    assert "12 images" in capsys.readouterr().out
    t = pq.read_table(preds)
    assert t.num_rows == 12 and t.schema.field("probs").type.list_size == 10
    assert {f"probs.{m}" for m in MEMBERS} <= set(t.column_names)
    order = [sorted(map(str, files)).index(str(f)) for f in files]  # the CLI reads files in sorted order
    ensemble = Ensemble.load(target, device="cpu")
    want = ensemble.predict_proba(test.images[:12])
    got = np.stack(t["probs"].to_numpy(zero_copy_only=False))[order]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert t["top_k"].type.list_size == 2 and t["prediction"].to_pylist() == [row[0] for row in t["top_k"].to_pylist()]
    labels = t["label_name"].to_pylist()  # "T-shirt/top" cannot be a folder name: that image is unlabelled
    for i in range(12):
        name = names[int(test.labels[i])]
        assert labels[order[i]] == (None if "/" in name else name)
    meta = json.loads(t.schema.metadata[b"esdbs_predict"])
    assert meta["members"] == list(MEMBERS) and meta["images"] == 12
    # an existing --out is not replaced without --force; a corrupt image stops before anything is written
    assert main(["predict", str(target), str(folder), "--out", str(preds)]) == 2
    assert "exists" in capsys.readouterr().err
    (folder / "Bag").mkdir(exist_ok=True)
    (folder / "Bag" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    new = tmp_path / "new.parquet"
    assert main(["predict", str(target), str(folder), "--out", str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esdbs: error: ") and "zz-broken.png" in err[0]
    assert not new.exists()


def test_predict_reads_a_dataset_split(exported):
    from esdbs_ray.ensemble import Ensemble, read_inputs

    _, target = exported
    e = Ensemble.load(target, device="cpu", verify=False)
    inputs = read_inputs(["fashion-mnist:test"], shape=e.input_shape, class_names=e.class_names)
    assert inputs.images.shape == (10_000, 1, 28, 28) and inputs.images.dtype == np.uint8
    assert np.array_equal(inputs.indices, np.arange(10_000)) and set(inputs.labels.tolist()) == set(range(10))


def test_export_refuses_a_rung_without_weights_and_a_tampered_file(exported, tmp_path):
    from esdbs_ray.ensemble import Ensemble, ExportError
    from esdbs_ray.export import export_experiment

    out, target = exported
    with pytest.raises(ExportError, match="no weights at rung 0.*last Tune checkpoint holds rung 0.5"):
        export_experiment(out, tmp_path / "dense", sparsity=0.0)
    assert not (tmp_path / "dense").exists()
    copy = tmp_path / "copy"
    shutil.copytree(target, copy)
    f = next((copy / "members").glob("alexnet.safetensors"))
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ExportError, match="alexnet.safetensors: does not match the manifest's SHA-256"):
        Ensemble.load(copy)


# --------------------------------------------------------------------------------------------------
# results and stack from URIs
# --------------------------------------------------------------------------------------------------
def test_results_table_is_the_same_for_a_path_and_its_uris(smoke_run, tmp_path, capsys):
    from esdbs_ray.results import COLUMNS, results_table

    out, summary = smoke_run
    local = results_table(out)
    uri = results_table(out.as_uri())  # file://
    # the same directory through a pyarrow filesystem object: a local-path shortcut would fail here
    sub = results_table("", filesystem=pafs.SubTreeFileSystem(str(out), pafs.LocalFileSystem()))
    assert list(local.columns) == list(COLUMNS)
    assert local.equals(uri) and local.equals(sub)
    trials, rungs, ens = (local[local.kind == k] for k in ("trial", "rung", "ensemble"))
    assert sorted(trials.member) == sorted(MEMBERS) and set(trials.status) == {"TERMINATED"}
    assert len(rungs) == 2 * len(MEMBERS) and sorted(set(rungs.target_sparsity)) == [0.0, 0.5]
    for m in summary["members"]:
        t = trials[trials.member == m["member"]].iloc[0]
        assert t.test_accuracy == m["test_accuracy"] and t.steps == m["steps"] and t.wall_seconds == m["wall_seconds"]
        r = rungs[(rungs.member == m["member"]) & (rungs.target_sparsity == 0.5)].iloc[0]
        assert r.nonzero_weights == m["rungs"][-1]["nonzero_weights"] and r.model_sparsity == m["rungs"][-1]["model_sparsity"]
        assert (r.batch_min, r.batch_max) == (128, 128) and r.wall_seconds <= t.wall_seconds
    chosen = ens[ens.chosen.astype(bool)]
    assert len(chosen) == 1 and chosen.iloc[0].test_accuracy == summary["ensembles"]["SWR-CNN+DBS"]["test_accuracy"]
    assert chosen.iloc[0].nonzero_weights == sum(m["rungs"][-1]["nonzero_weights"] for m in summary["members"])
    # the CLI: table on stdout, CSV and Parquet files (new files only)
    assert main(["results", out.as_uri()]) == 0
    assert "ensemble" in capsys.readouterr().out
    assert main(["results", str(out), "--format", "parquet", "--out", str(tmp_path / "r.parquet")]) == 0
    back = pq.read_table(tmp_path / "r.parquet").to_pandas()
    assert len(back) == len(local) and list(back.columns) == list(COLUMNS)
    assert main(["results", str(out), "--format", "csv", "--out", str(tmp_path / "r.parquet")]) == 2


def test_stack_reads_a_uri(smoke_run, tmp_path):
    out, _ = smoke_run
    target = tmp_path / "stack.json"
    assert main(["stack", out.as_uri(), "--output", str(target)]) == 0
    st = json.loads(target.read_text())
    own = json.loads((out / "stacking.json").read_text())
    assert st["methods"]["nll_optimal"]["weights"] == pytest.approx(own["methods"]["nll_optimal"]["weights"])
    assert st["ensemble"]["test_accuracy"] == own["ensemble"]["test_accuracy"]
