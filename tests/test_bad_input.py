"""Bad input of every kind, through every sub-command: one ``esdbs: error:`` line, exit 2, nothing touched.

Each case runs ``esdbs_ray.cli.main`` in this process (fast: no interpreter start-up per case) from a
sandbox directory holding good and bad files of every format the commands read.  For each: exit
status 2, exactly one stderr line, starting ``esdbs: error:`` and naming the key or file, no
traceback, no Ray started, and a hash of the whole sandbox tree identical before and after.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

from esdbs_ray.cli import main


# --------------------------------------------------------------------------------------------------
# the sandbox: one of each bad thing
# --------------------------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels (PIL refuses it as a decompression bomb before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _image_folder(root: Path, bad: str | None) -> None:
    from PIL import Image

    for c, colour in (("cats", (200, 50, 50)), ("dogs", (50, 50, 200))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), colour).save(root / c / f"{i}.png")
    if bad == "corrupt":
        (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif bad == "bomb":
        _png_header_only(root / "dogs" / "huge.png", 40_000, 40_000)


def _cifar(root: Path, batch1: object) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    (d / "data_batch_1").write_bytes(batch1 if isinstance(batch1, bytes) else pickle.dumps(batch1))


def _export(root: Path) -> None:
    """A small real export (one untrained spatial AlexNet), as esdbs export writes one."""
    from safetensors.torch import save

    from esdbs_ray.ensemble import FORMAT, FORMAT_VERSION, _sha256, build_model
    from esdbs_ray.layout import MARKER

    (root / "members").mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"kind": "export"}))
    member = {"name": "alexnet", "model": "alexnet", "width": 0.125, "conv": "spatial", "dropout": 0.0}
    model = build_model(member, 10, 1, 28)
    (root / "members" / "alexnet.safetensors").write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    member.update(weights_file="members/alexnet.safetensors", weights_sha256=_sha256(root / "members" / "alexnet.safetensors"))
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "members": [member],
        "ensemble": {"method": "single member", "weights": {"alexnet": 1.0}},
        "task": {"num_classes": 10, "class_names": [f"c{i}" for i in range(10)]},
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.3], "std": [0.35]}}))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    import torch

    from esdbs_ray.layout import MARKER

    root = tmp_path_factory.mktemp("sandbox")
    (root / "a_file").write_text("just a file\n")
    (root / "confdir").mkdir()
    (root / "bad_yaml.yaml").write_text("train:\n  width: [1, 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "unknown_key.yaml").write_text("train:\n  epochz: 3\n")
    # YAML that is valid but hostile: a key given twice, aliases that expand 9**8-fold, deep nesting
    (root / "dup_key.yaml").write_text("train:\n  epochs: 3\n  width: 0.5\n  epochs: 4\n")
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (root / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    (root / "deep.yaml").write_text("train: {sparsity_ladder: " + "[" * 5000 + "]" * 5000 + "}\n")
    (root / "bad.json").write_text("{not json")
    (root / "existing.png").write_bytes(b"\x89PNG not really")
    (root / "existing.json").write_text("{}\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's own notes\n")
    (root / "empty").mkdir()
    for name, kind in (("experiment", "experiment"), ("report_dir", "report")):
        (root / name).mkdir()
        (root / name / MARKER).write_text(json.dumps({"kind": kind}))
        (root / name / "config.yaml").write_text("name: earlier\n")
    (root / "broken_exp").mkdir()
    (root / "broken_exp" / MARKER).write_text(json.dumps({"kind": "experiment"}))
    (root / "broken_exp" / "config.yaml").write_text("members: [alexnet\n")
    # saved configs that are no config: a directory, an empty file, a key this version does not know
    for name, make in (("dir_config_exp", lambda p: p.mkdir()), ("empty_config_exp", lambda p: p.write_text("")),
                       ("unknown_key_exp", lambda p: p.write_text("members: [alexnet]\ntrain: {epochz: 3}\n"))):
        (root / name).mkdir()
        (root / name / MARKER).write_text(json.dumps({"kind": "experiment"}))
        make(root / name / "config.yaml")
    # Fashion-MNIST with a truncated training file
    fm = root / "fmnist_truncated"
    fm.mkdir()
    for stem, payload in (("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + b"\x00" * 40),
                          ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + b"\x00" * 8),
                          ("t10k-images-idx3-ubyte", b"\x00\x00\x08\x03" + b"\x00" * 40),
                          ("t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01" + b"\x00" * 8)):
        (fm / f"{stem}.gz").write_bytes(gzip.compress(payload)[:-6])
    _cifar(root / "cifar_wrong_type", {b"data": "not an array", b"labels": [0, 1]})
    _cifar(root / "cifar_code", pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    _image_folder(root / "images_corrupt", "corrupt")
    _image_folder(root / "images_bomb", "bomb")
    (root / "images_one_class" / "cats").mkdir(parents=True)
    # own images: an empty class folder, a corrupt image in a val/ split, a test class
    # that training does not have
    _image_folder(root / "images_empty_class", None)
    (root / "images_empty_class" / "birds").mkdir()
    for part in ("train", "val", "test"):
        _image_folder(root / "images_split" / part, None)
    from PIL import Image

    Image.new("RGB", (12, 12), (9, 9, 9)).save(root / "images_split" / "val" / "cats" / "broken.png")
    (root / "images_split" / "val" / "cats" / "broken.png").write_bytes(
        (root / "images_split" / "val" / "cats" / "broken.png").read_bytes()[:30])
    for part in ("train", "test"):
        _image_folder(root / "images_extra_class" / part, None)
    (root / "images_extra_class" / "test" / "horses").mkdir()
    # train-one runs whose checkpoint is not one
    for name, payload in (("ckpt_list", [1, 2, 3]), ("ckpt_garbage", None), ("ckpt_other_config", "other")):
        d = root / name
        d.mkdir()
        (d / MARKER).write_text(json.dumps({"kind": "run"}))
        if payload is None:
            (d / "checkpoint.pt").write_bytes(b"PK\x03\x04 garbage")
        elif payload == "other":
            torch.save({"model": {}, "optimizer": {}, "schedule": {}, "train_batches": {}, "rng": torch.zeros(1),
                        "config": {"model": "vgg16"}, "state": {}}, d / "checkpoint.pt")
        else:
            torch.save(payload, d / "checkpoint.pt")
    (root / "run_without_ckpt").mkdir()
    (root / "run_without_ckpt" / MARKER).write_text(json.dumps({"kind": "run"}))
    # exports: a good one, one with a corrupt manifest, one whose weights file changed after export
    _export(root / "export_good")
    shutil.copytree(root / "export_good", root / "export_bad_manifest")
    (root / "export_bad_manifest" / "manifest.json").write_text('{"format": "esdbs-ensemble", "members": [')
    shutil.copytree(root / "export_good", root / "export_tampered")
    w = root / "export_tampered" / "members" / "alexnet.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    shutil.copytree(root / "export_good", root / "export_no_weights")
    (root / "export_no_weights" / "members" / "alexnet.safetensors").unlink()
    (root / "images_gray" / "c1").mkdir(parents=True)
    from PIL import Image

    Image.new("L", (28, 28), 7).save(root / "images_gray" / "c1" / "a.png")
    (root / "images_gray" / "c1" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        st = p.lstat()
        h.update(f"{st.st_mode}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the cases: (id, argv, a word the error must name)
# --------------------------------------------------------------------------------------------------
RUN = ["run", "--preset", "smoke", "--out", "new_exp"]
T1 = ["train-one", "--epochs", "1", "--subset", "100", "--test-subset", "40"]
CASES = [
    # run: --set, YAML, config values, cross-field checks
    ("set-bad-yaml", RUN + ["--set", "train.width=[1"], "--set train.width"),
    ("set-no-equals", RUN + ["--set", "train.width"], "--set"),
    ("set-bad-key", RUN + ["--set", "train..width=1"], "--set"),
    ("set-into-scalar", RUN + ["--set", "seed.x=1"], "seed"),
    ("config-missing", ["run", "--config", "missing.yaml", "--out", "new_exp"], "missing.yaml"),
    ("config-is-dir", ["run", "--config", "confdir", "--out", "new_exp"], "confdir"),
    ("config-bad-yaml", ["run", "--config", "bad_yaml.yaml", "--out", "new_exp"], "bad_yaml.yaml"),
    ("config-list", ["run", "--config", "list.yaml", "--out", "new_exp"], "list.yaml"),
    ("config-unknown-key", ["run", "--config", "unknown_key.yaml", "--out", "new_exp"], "epochz"),
    ("subset-fraction", RUN + ["--set", "subset=30.5"], "subset"),
    ("subset-too-small", RUN + ["--set", "subset=5"], "subset"),
    ("seed-text", RUN + ["--set", "seed=abc"], "seed"),
    ("stack-sparsity-range", RUN + ["--set", "stack.sparsity=1.5"], "stack.sparsity"),
    ("stack-sparsity-off-ladder", RUN + ["--set", "stack.sparsity=0.4"], "stack.sparsity"),
    ("stack-choose", RUN + ["--set", "stack.choose=best"], "stack.choose"),
    ("stack-tune-samples", RUN + ["--set", "stack.tune_samples=-1"], "stack.tune_samples"),
    ("dropout", RUN + ["--set", "train.dropout=1.5"], "train.dropout"),
    ("width-negative", RUN + ["--set", "train.width=-1"], "train.width"),
    ("width-nan", RUN + ["--set", "train.width=.nan"], "train.width"),
    ("l2-nan", RUN + ["--set", "train.l2=.nan"], "train.l2"),
    ("epochs-bool", RUN + ["--set", "train.epochs=true"], "train.epochs"),
    ("checkpoints-zero", RUN + ["--set", "checkpoints_to_keep=0"], "checkpoints_to_keep"),
    ("max-failures", RUN + ["--set", "max_failures=-5"], "max_failures"),
    ("search-samples", RUN + ["--set", "dbs_search.num_samples=-1"], "dbs_search.num_samples"),
    ("search-space", RUN + ["--set", "dbs_search.space={kk: {uniform: [0, 1]}}"], "kk"),
    ("variants-empty", RUN + ["--set", "variants=[]"], "variants"),
    ("variants-unknown", RUN + ["--set", "variants=[XYZ]"], "variants"),
    ("member-unknown", RUN + ["--set", "members=[alexnet, lenet]"], "lenet"),
    ("member-duplicate", RUN + ["--set", "members=[alexnet, alexnet]"], "duplicate"),
    ("train-per-trial-key", RUN + ["--set", "train.model=vgg16"], "train.model"),
    ("b0-not-multiple", RUN + ["--set", "train.dbs.b0=100"], "b0"),
    ("k-text", RUN + ["--set", "train.dbs.k=fast"], "train.dbs.k"),
    ("m-max-below-m0", RUN + ["--set", "train.dbs.m_max=0.5"], "m_max"),
    ("cpus-zero", RUN + ["--set", "resources.cpus_per_trial=0"], "resources.cpus_per_trial"),
    ("gpus-text", RUN + ["--set", "resources.gpus_per_trial=x"], "resources.gpus_per_trial"),
    ("ladder-decreasing", RUN + ["--set", "train.sparsity_ladder=[0.5, 0.3]"], "sparsity_ladder"),
    ("override-unknown", RUN + ["--set", "variant_overrides={C-CNN: {dropot: 0.1}}"], "dropot"),
    ("dataset-unknown", RUN + ["--set", "dataset=mnist"], "dataset"),
    ("preset-unknown", ["run", "--preset", "nosuch", "--out", "new_exp"], "--preset"),
    ("scale-zero", RUN + ["--scale", "0"], "--scale"),
    ("scale-two", RUN + ["--scale", "2"], "--scale"),
    ("num-cpus-zero", RUN + ["--num-cpus", "0"], "--num-cpus"),
    ("unknown-flag", RUN + ["--frobnicate"], "--frobnicate"),
    ("dbs-constants-missing", RUN + ["--dbs-constants", "missing.json"], "missing.json"),
    ("dbs-constants-bad-json", RUN + ["--dbs-constants", "bad.json"], "bad.json"),
    # run: output directories
    ("out-is-file", ["run", "--preset", "smoke", "--out", "a_file"], "a_file"),
    ("out-under-file", ["run", "--preset", "smoke", "--out", "a_file/sub"], "a_file"),
    ("out-foreign", ["run", "--preset", "smoke", "--out", "foreign"], "foreign"),
    ("out-existing-experiment", ["run", "--preset", "smoke", "--out", "experiment"], "--resume"),
    ("out-a-report", ["run", "--preset", "smoke", "--out", "report_dir"], "report_dir"),
    ("out-bad-uri", ["run", "--preset", "smoke", "--out", "nosuch://bucket/x"], "nosuch://"),
    ("resume-nothing", ["run", "--resume", "empty"], "--resume"),
    ("resume-broken-config", ["run", "--resume", "broken_exp"], "config.yaml: not valid YAML at line 2"),
    ("resume-config-is-a-dir", ["run", "--resume", "dir_config_exp"], "cannot read config.yaml"),
    ("resume-empty-config", ["run", "--resume", "empty_config_exp"], "config.yaml: empty"),
    ("resume-unknown-key", ["run", "--resume", "unknown_key_exp"], "config.yaml: train: unknown key(s) 'epochz'"),
    ("resume-with-preset", ["run", "--resume", "experiment", "--preset", "smoke"], "--resume"),
    # run: data files of every format
    ("fmnist-truncated", RUN + ["--data-dir", "fmnist_truncated"], "fmnist_truncated"),
    ("cifar-wrong-type", RUN + ["--set", "dataset=cifar10", "--data-dir", "cifar_wrong_type"], "data_batch_1"),
    ("cifar-pickled-code", RUN + ["--set", "dataset=cifar10", "--data-dir", "cifar_code"], "data_batch_1"),
    ("images-corrupt", RUN + ["--set", "dataset=imagefolder:images_corrupt"], "broken.jpg"),
    ("images-bomb", RUN + ["--set", "dataset=imagefolder:images_bomb"], "huge.png"),
    ("images-one-class", RUN + ["--set", "dataset=imagefolder:images_one_class"], "images_one_class"),
    ("images-missing", RUN + ["--set", "dataset=imagefolder:nowhere"], "nowhere"),
    # own images: folders, augmentation names, schedule and optimizer values
    ("images-empty-class", RUN + ["--set", "dataset=imagefolder:images_empty_class"], "birds: empty class folder"),
    ("images-corrupt-val", RUN + ["--set", "dataset=imagefolder:images_split"], "val/cats/broken.png"),
    ("images-extra-test-class", RUN + ["--set", "dataset=imagefolder:images_extra_class"], "horses"),
    ("fine-grained-no-folder", ["run", "--preset", "fine-grained", "--out", "new_exp"], "imagefolder:DIR"),
    ("augment-unknown", RUN + ["--set", "train.augment=[hflip, mixup]"], "train.augment"),
    ("augment-crop-scale", RUN + ["--set", "train.augment.crop_scale=[0.9, 0.1]"], "crop_scale"),
    ("augment-two-policies", RUN + ["--set", "train.augment=[randaugment, trivialaugment]"], "choose one"),
    ("lr-schedule-unknown", RUN + ["--set", "train.lr_schedule=linear"], "train.lr_schedule"),
    ("cosine-with-dbs", RUN + ["--set", "train.lr_schedule=cosine"], "lr_schedule"),
    ("cosine-final-frac", RUN + ["--set", "train.cosine.final_lr_frac=1.5"], "train.cosine.final_lr_frac"),
    ("weight-decay-with-sgd", RUN + ["--set", "train.weight_decay=0.05"], "weight_decay"),
    ("label-smoothing", RUN + ["--set", "train.label_smoothing=1"], "train.label_smoothing"),
    ("patience-negative", RUN + ["--set", "train.early_stopping.patience=-2"], "train.early_stopping.patience"),
    # BasisConv: the basis block, its ladder, the variants that need it, the stack's rung
    ("basis-unknown-key", RUN + ["--set", "train.basis.treshold=0.9"], "treshold"),
    ("basis-ladder-increasing", RUN + ["--set", "train.basis.ladder=[0.9, 0.95]"], "train.basis.ladder"),
    ("basis-ladder-zero", RUN + ["--set", "train.basis.ladder=[1.0, 0]"], "train.basis.ladder"),
    ("basis-ladder-above-one", RUN + ["--set", "train.basis.ladder=[1.5]"], "train.basis.ladder"),
    ("basis-fraction", RUN + ["--set", "train.basis.fraction=0"], "train.basis.fraction"),
    ("basis-layers", RUN + ["--set", "train.basis.layers=some"], "train.basis.layers"),
    ("basis-stage2-lr", RUN + ["--set", "train.basis.stage2_lr_scale=-1"], "train.basis.stage2_lr_scale"),
    ("basis-stage1-too-long", RUN + ["--set", "train.basis.ladder=[1.0]", "--set", "train.basis.stage1_epochs=3"],
     "basis.stage1_epochs"),
    ("basis-variant-no-ladder", RUN + ["--set", "variants=[SBC-CNN]"], "train.basis.ladder"),
    ("basis-stack-threshold-off-ladder", RUN + ["--set", "train.basis.ladder=[1.0, 0.9]", "--set",
                                                "stack.basis_threshold=0.8"], "stack.basis_threshold"),
    # train-one: values, outputs, checkpoints
    ("train-epochs-negative", ["train-one", "--epochs", "-1", "--out", "t"], "epochs"),
    ("train-conv", T1 + ["--conv", "fft", "--out", "t"], "conv"),
    ("train-model", T1 + ["--model", "lenet", "--out", "t"], "lenet"),
    ("train-k", T1 + ["--k", "fast", "--out", "t"], "--k"),
    ("train-ladder", T1 + ["--sparsity-ladder", "0.5,0.2", "--out", "t"], "sparsity_ladder"),
    ("train-augment", T1 + ["--augment", "hflip,mixup", "--out", "t"], "mixup"),
    ("train-lr-schedule", T1 + ["--lr-schedule", "cyclic", "--out", "t"], "lr_schedule"),
    ("train-smoothing", T1 + ["--label-smoothing", "-0.1", "--out", "t"], "label_smoothing"),
    ("train-basis-ladder", T1 + ["--basis-ladder", "0.8,0.9", "--out", "t"], "basis.ladder"),
    ("train-basis-ladder-with-pruning", T1 + ["--basis-ladder", "1.0", "--sparsity-ladder", "0.5", "--out", "t"],
     "basis.ladder"),
    ("train-basis-ladder-winograd", T1 + ["--basis-ladder", "1.0", "--conv", "winograd_relu", "--out", "t"],
     "basis.ladder"),
    ("train-basis-random-pruned", T1 + ["--conv", "basis_random", "--sparsity-ladder", "0.5", "--out", "t"],
     "sparsity_ladder"),
    ("train-basis-fraction", T1 + ["--conv", "basis_random", "--basis-fraction", "2", "--out", "t"], "basis.fraction"),
    ("train-out-file", T1 + ["--out", "a_file"], "a_file"),
    ("train-out-foreign", T1 + ["--out", "foreign"], "foreign"),
    ("train-out-earlier-run", T1 + ["--out", "ckpt_list"], "--resume"),
    ("train-resume-no-ckpt", T1 + ["--resume", "--out", "run_without_ckpt"], "checkpoint"),
    ("train-ckpt-not-dict", T1 + ["--resume", "--out", "ckpt_list"], "checkpoint.pt"),
    ("train-ckpt-garbage", T1 + ["--resume", "--out", "ckpt_garbage"], "checkpoint.pt"),
    ("train-ckpt-other-config", T1 + ["--resume", "--out", "ckpt_other_config"], "different config"),
    # dbs-plan, dbs-search, config
    ("plan-train-size", ["dbs-plan", "--epochs", "4", "--train-size", "0"], "--train-size"),
    ("plan-schedule", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--schedule", "cosine"], "--schedule"),
    ("plan-double-every", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--double-every", "0"], "double_every"),
    ("plan-figure-exists", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--figure", "existing.png"], "existing.png"),
    ("plan-figure-dir", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--figure", "confdir"], "confdir"),
    ("search-num-samples", ["dbs-search", "--preset", "smoke", "--num-samples", "0", "--out", "s"], "num_samples"),
    ("search-out-foreign", ["dbs-search", "--preset", "smoke", "--out", "foreign"], "foreign"),
    ("config-value", ["config", "--set", "train.width=0"], "train.width"),
    # stack and report
    ("stack-missing-dir", ["stack", "nowhere"], "nowhere"),
    ("stack-no-predictions", ["stack", "empty"], "empty"),
    ("stack-sparsity", ["stack", "experiment", "--sparsity", "1.5"], "--sparsity"),
    ("stack-choose-unknown", ["stack", "experiment", "--choose", "xx"], "--choose"),
    ("stack-output-exists", ["stack", "experiment", "--output", "existing.json"], "existing.json"),
    ("report-missing-dir", ["report", "nowhere"], "nowhere"),
    ("report-into-foreign", ["report", "experiment", "--out", "foreign"], "foreign"),
    ("report-over-report", ["report", "experiment", "--out", "report_dir"], "--force"),
    ("report-out-file", ["report", "experiment", "--out", "a_file"], "a_file"),
    # export: a directory that is no experiment, members without weights, outputs esdbs must not write
    ("export-missing-dir", ["export", "nowhere", "--out", "e"], "nowhere"),
    ("export-not-experiment", ["export", "empty", "--out", "e"], "config.yaml"),
    ("export-broken-config", ["export", "broken_exp", "--out", "e"], "config.yaml: not valid YAML at line 2"),
    ("export-config-is-a-dir", ["export", "dir_config_exp", "--out", "e"], "config.yaml: cannot read it"),
    ("export-empty-config", ["export", "empty_config_exp", "--out", "e"], "config.yaml: empty"),
    ("export-unknown-key", ["export", "unknown_key_exp", "--out", "e"], "config.yaml: train: unknown key(s) 'epochz'"),
    ("export-missing-members", ["export", "experiment", "--out", "e"], "alexnet"),
    ("export-unknown-variant", ["export", "experiment", "--variant", "XYZ", "--out", "e"], "XYZ"),
    ("export-sparsity", ["export", "experiment", "--sparsity", "1.5", "--out", "e"], "--sparsity"),
    ("export-out-foreign", ["export", "experiment", "--out", "foreign"], "foreign"),
    ("export-out-file", ["export", "experiment", "--out", "a_file"], "a_file"),
    ("export-over-export", ["export", "experiment", "--out", "export_good"], "--force"),
    # predict: wrong directory, corrupt manifest or weights, bad images and inputs, an existing output
    ("predict-missing-dir", ["predict", "nowhere", "images_gray", "--out", "p.parquet"], "nowhere"),
    ("predict-not-export", ["predict", "experiment", "images_gray", "--out", "p.parquet"], "not an esdbs export"),
    ("predict-bad-manifest", ["predict", "export_bad_manifest", "images_gray", "--out", "p.parquet"], "manifest.json"),
    ("predict-tampered", ["predict", "export_tampered", "images_gray", "--out", "p.parquet"], "SHA-256"),
    ("predict-no-weights", ["predict", "export_no_weights", "images_gray", "--out", "p.parquet"], "alexnet.safetensors"),
    ("predict-bad-image", ["predict", "export_good", "images_gray", "--out", "p.parquet"], "b.png"),
    ("predict-corrupt-jpeg", ["predict", "export_good", "images_corrupt", "--out", "p.parquet"], "broken.jpg"),
    ("predict-no-images", ["predict", "export_good", "empty", "--out", "p.parquet"], "empty"),
    ("predict-missing-input", ["predict", "export_good", "nowhere.png", "--out", "p.parquet"], "nowhere.png"),
    ("predict-unknown-split", ["predict", "export_good", "mnist:test", "--out", "p.parquet"], "mnist:test"),
    ("predict-wrong-classes", ["predict", "export_good", "imagefolder:images_corrupt", "--out", "p.parquet"], "cats"),
    ("predict-out-exists", ["predict", "export_good", "images_gray", "--out", "existing.json"], "existing.json"),
    ("predict-top-k", ["predict", "export_good", "images_gray", "--out", "p.parquet", "--top-k", "0"], "--top-k"),
    ("predict-device", ["predict", "export_good", "images_gray", "--out", "p.parquet", "--device", "tpu"], "tpu"),
    # results
    ("results-missing-dir", ["results", "nowhere"], "nowhere"),
    ("results-no-results", ["results", "experiment"], "no esdbs results"),
    ("results-format", ["results", "experiment", "--format", "xlsx"], "--format"),
    ("results-parquet-stdout", ["results", "experiment", "--format", "parquet"], "--out"),
    ("results-out-exists", ["results", "experiment", "--format", "csv", "--out", "existing.json"], "existing.json"),
    ("report-bad-uri", ["report", "nosuch://bucket/exp"], "nosuch://"),
    # submit: refused before anything is sent
    ("submit-no-out", ["submit", "--address", "http://127.0.0.1:9", "--", "--preset", "smoke"], "--out"),
    ("submit-relative-out", ["submit", "--address", "http://127.0.0.1:9", "--", "--out", "rel"], "--out"),
    # hostile inputs by class (tests/test_fuzz.py draws them for every file kind)
    ("yaml-duplicate-key", ["config", "--config", "dup_key.yaml"], "train.epochs: given twice"),
    ("yaml-billion-laughs", ["config", "--config", "laughs.yaml"], "aliases expand"),
    ("yaml-deep", ["config", "--config", "deep.yaml"], "train.sparsity_ladder"),
    ("set-alias-bomb", ["config", "--set", "train.sparsity_ladder=[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], "
                        + ", ".join(f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdef", "bcdefg"))
                        + "]"], "aliases expand"),
    ("set-epochs-huge", ["config", "--set", "train.epochs=" + "1" + "0" * 29], "train.epochs"),
    ("set-image-size-huge", ["config", "--set", "image_size=100000"], "image_size"),
    ("set-seed-huge", ["config", "--set", "seed=" + str(2 ** 70)], "seed"),
    ("plan-epochs-huge", ["dbs-plan", "--epochs", "100000000", "--train-size", "100"], "--epochs"),
    ("plan-train-size-one", ["dbs-plan", "--epochs", "4", "--train-size", "1"], "--train-size"),
    ("plan-val-accuracy", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--val-accuracy", "2.0"],
     "--val-accuracy"),
    ("plan-batch-constant-names-flag", ["dbs-plan", "--epochs", "4", "--train-size", "100", "--batch-size", "100"],
     "--batch-size"),
    ("report-no-experiment", ["report", "empty", "--out", "empty_report"], "holds no esdbs experiment"),
    ("submit-timeout-negative", ["submit", "--address", "http://127.0.0.1:9", "--timeout", "-5", "--", "--out",
                                 "/shared/x"], "--timeout"),
    ("submit-plain-http", ["submit", "--address", "http://192.0.2.1:8265", "--", "--out", "/shared/x"], "--insecure"),
    ("submit-unknown-preset", ["submit", "--address", "http://127.0.0.1:9", "--", "--preset", "nosuch", "--out",
                               "/shared/x"], "--preset"),
    ("submit-misspelt-key", ["submit", "--address", "http://127.0.0.1:9", "--", "--set", "train.epochz=1", "--out",
                             "/shared/x"], "epochz"),
    ("submit-unknown-flag", ["submit", "--address", "http://127.0.0.1:9", "--", "--frobnicate", "--out",
                             "/shared/x"], "--frobnicate"),
]


def test_there_are_at_least_fifty_cases_across_every_sub_command():
    from esdbs_ray.cli import build_parser

    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {c[1][0] for c in CASES} == commands


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, sandbox, capsys, monkeypatch):
    _, argv, names = case
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("ESDBS_CACHE", str(sandbox / "cache"))  # a decode cache written would show in the hash
    before = _tree_hash(sandbox)
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("esdbs: error: "), err
    assert names in lines[0], err
    assert "Traceback" not in err
    assert _tree_hash(sandbox) == before, f"{case[0]} changed the sandbox"
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "a rejected input started Ray"


def test_rejecting_a_config_imports_neither_torch_nor_ray(tmp_path):
    """Validation happens before anything heavy: the CLI refuses a bad config without torch or Ray."""
    import subprocess

    code = ("import sys; from esdbs_ray.cli import main; rc = main(['run', '--preset', 'smoke', '--set', "
            "'train.width=-1', '--out', 'x']); heavy = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "print(rc, heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert not (tmp_path / "x").exists()


def test_internal_errors_print_one_line_and_keep_the_traceback(monkeypatch, capsys, tmp_path):
    import esdbs_ray.cli as cli
    import esdbs_ray.cli_train as cli_train

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_train, "cmd_config", boom)
    monkeypatch.setattr(cli.tempfile, "tempdir", str(tmp_path))
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esdbs: internal error (KeyError)") and "ESDBS_DEBUG=1" in err[0]
    saved = Path(err[0].split("traceback: ")[1].split(";")[0])
    assert "Traceback" in saved.read_text() and "a bug" in saved.read_text()
    monkeypatch.setenv("ESDBS_DEBUG", "1")
    assert cli.main(["config"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("before", ["absent", "empty", "forced"])
def test_a_failed_start_takes_back_its_output_directory(tmp_path, before):
    """What claim_dir made -- a new directory, a marker in an empty one, an old output moved aside by
    --force -- is taken back, so the corrected command is not refused as "already holds an esdbs run"."""
    from esdbs_ray.layout import MARKER, claim_dir

    out = tmp_path / "out"
    if before == "empty":
        out.mkdir()
    elif before == "forced":
        out.mkdir()
        (out / MARKER).write_text(json.dumps({"kind": "run"}))
        (out / "summary.json").write_text("{}")
    snapshot = _tree_hash(tmp_path)
    claims: list = []
    claim_dir(out, "run", force=before == "forced", claims=claims)
    (out / "tb").mkdir()  # what a trainer makes before it fails
    (out / "tb" / "events").write_text("x")
    assert len(claims) == 1
    claims[0].undo()
    assert _tree_hash(tmp_path) == snapshot
    claim_dir(out, "run", force=before == "forced")  # the corrected command is not refused


def test_submit_checks_the_run_arguments_before_contacting_the_cluster(monkeypatch, capsys):
    """A misspelt key is refused here, by esdbs run's own validation: nothing is uploaded, the cluster
    is never asked (its client would fail on this closed port with "cannot reach")."""
    import esdbs_ray.submit as submit_mod

    def never(*a, **k):
        raise AssertionError("the cluster was contacted")

    monkeypatch.setattr(submit_mod, "_client", never)
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "--preset", "smoke", "--set",
                 "train.epochz=3", "--out", "/shared/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochz" in err[0]
