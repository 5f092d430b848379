import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esdbs_ray.data import FASHION_MNIST_FILES, BatchIterator, DataError, load_dataset

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, arr: np.ndarray, magic: int, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    for split, n in (("train", 200), ("test", 50)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = np.arange(n) % 10
        _write_idx(d / (FASHION_MNIST_FILES[f"{split}_images"] + ".gz"), x, 0x0803)
        _write_idx(d / (FASHION_MNIST_FILES[f"{split}_labels"] + ".gz"), y, 0x0801)
    return d


def test_real_fashion_mnist_split_is_stratified_and_disjoint(fmnist_small):
    b = fmnist_small
    assert b.train.images.dtype == np.uint8 and b.train.images.shape[1:] == (1, 28, 28)
    assert len(b.train) + len(b.val) == 3000 and len(b.test) == 1000
    assert not set(b.train.indices) & set(b.val.indices)
    counts = np.bincount(b.val.labels, minlength=10)
    assert counts.min() == counts.max() == 30  # Fashion-MNIST is balanced: 10 % of 300 per class
    assert 0.2 < b.mean[0] < 0.4 and 0.25 < b.std[0] < 0.45


def test_split_is_seeded(tiny_fmnist):
    a = load_dataset("fashion-mnist", data_dir=tiny_fmnist, seed=1)
    b = load_dataset("fashion-mnist", data_dir=tiny_fmnist, seed=1)
    c = load_dataset("fashion-mnist", data_dir=tiny_fmnist, seed=2)
    assert np.array_equal(a.val.indices, b.val.indices)
    assert not np.array_equal(a.val.indices, c.val.indices)


def test_env_var_lookup(tiny_fmnist, monkeypatch):
    monkeypatch.setenv("ESDBS_DATA", str(tiny_fmnist))
    b = load_dataset("fashion-mnist")
    assert len(b.train) + len(b.val) == 200 and str(tiny_fmnist) in b.source


def test_truncated_gzip_names_the_file(tiny_fmnist):
    f = tiny_fmnist / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("fashion-mnist", data_dir=tiny_fmnist)


def test_wrong_magic_and_count_mismatch(tiny_fmnist):
    f = tiny_fmnist / "t10k-labels-idx1-ubyte.gz"
    _write_idx(f, np.zeros((50, 2)), 0x0803)
    with pytest.raises(DataError, match="t10k-labels.*magic"):
        load_dataset("fashion-mnist", data_dir=tiny_fmnist)
    _write_idx(f, np.zeros(49), 0x0801)
    with pytest.raises(DataError, match="50 images but t10k-labels-idx1-ubyte.gz has 49 labels"):
        load_dataset("fashion-mnist", data_dir=tiny_fmnist)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_cli_truncated_gzip_is_one_line_error(tiny_fmnist, tmp_path):
    f = tiny_fmnist / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:20])
    r = subprocess.run(
        [sys.executable, "-m", "esdbs_ray.cli", "train-one", "--data-dir", str(tiny_fmnist), "--epochs", "1",
         "--out", str(tmp_path / "out")], capture_output=True, text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-labels-idx1-ubyte.gz" in lines[0] and "Traceback" not in r.stderr


def _write_cifar(root: Path, name: str, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for i in range(1, 6):
            _pickle(d / f"data_batch_{i}", {b"data": rng.integers(0, 256, (n_train // 5, 3072), dtype=np.uint8),
                                            b"labels": list(np.arange(n_train // 5) % 10)})
        _pickle(d / "test_batch", {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                                   b"labels": list(np.arange(n_test) % 10)})
        _pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for split, n in (("train", n_train * 10), ("test", n_test * 5)):
            _pickle(d / split, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                b"fine_labels": list(np.arange(n) % 100), b"coarse_labels": list(np.arange(n) % 20)})
        _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return d


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_torchvision_format(tmp_path, name, classes):
    _write_cifar(tmp_path, name)
    b = load_dataset(name, data_dir=tmp_path)
    assert b.num_classes == classes and b.in_channels == 3 and b.image_size == 32
    assert len(b.class_names) == classes


def test_cifar_refuses_code_in_pickle(tmp_path):
    d = _write_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _pickle(d / "data_batch_3", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="data_batch_3.*refusing"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_image_folder_and_unreadable_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("monkey_a", "monkey_b", "monkey_c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 256, (40 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    b = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=24)
    assert b.num_classes == 3 and b.image_size == 24 and b.in_channels == 3
    assert len(b.train) + len(b.val) + len(b.test) == 30
    (tmp_path / "imgs" / "monkey_b" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg: unreadable image"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=24)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="choose one of: fashion-mnist, cifar10"):
        load_dataset("mnist")


def test_batch_iterator_changes_batch_size_within_epoch(fmnist_small):
    it = BatchIterator(fmnist_small.val, batch_size=32, mean=fmnist_small.mean, std=fmnist_small.std, shuffle=True, seed=3)
    sizes, seen = [], []
    for i, (x, y) in enumerate(it):
        sizes.append(len(y))
        seen.append(y)
        if i == 2:
            it.batch_size = 64  # takes effect on the next batch, no new iterator
    assert sizes[:3] == [32, 32, 32] and sizes[3] == 64
    assert sum(sizes) == len(fmnist_small.val)
    assert torch.cat(seen).bincount().tolist() == np.bincount(fmnist_small.val.labels).tolist()


def test_batch_iterator_normalises_and_resumes(fmnist_small):
    b = fmnist_small
    it = BatchIterator(b.train, batch_size=len(b.train), mean=b.mean, std=b.std)
    x, _ = next(iter(it))
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    a = BatchIterator(b.train, batch_size=100, mean=b.mean, std=b.std, shuffle=True, seed=5)
    next(iter(a))  # advance the generator by one epoch
    state = a.state_dict()
    expect = [y for _, y in a]
    c = BatchIterator(b.train, batch_size=7, mean=b.mean, std=b.std, shuffle=True, seed=999)
    c.load_state_dict(state)
    got = [y for _, y in c]
    assert all(torch.equal(p, q) for p, q in zip(expect, got)) and len(expect) == len(got)
