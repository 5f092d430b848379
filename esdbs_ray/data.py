"""Datasets by name, held whole in memory, with a batch iterator whose batch size can change any time.

Names: ``fashion-mnist`` (idx ``.gz`` files), ``cifar10`` / ``cifar100`` (torchvision's python pickle
batches), ``imagefolder:<path>`` (one folder per class, or train/val/test folders of them; JPEG, PNG,
..., resized to ``image_size``, decoded once and cached outside the folder; for a user's own photos
and fine-grained sets such as 10 Monkey Species).

Why in memory: the paper's datasets are small (Fashion-MNIST is 47 MB as uint8), a dynamic batch size
changes the batch between epochs and even within one, and Ray shares one copy of numpy arrays between
trials through its object store.  So a :class:`DatasetBundle` holds uint8 numpy arrays (zero-copy in
Ray's object store), and :class:`BatchIterator` moves them once to the training device and normalises
each batch on the fly -- no DataLoader workers, nothing re-created when the batch size changes.

The validation split is carved from the training set (seeded, stratified, default 10 %) unless an
image folder brings its own; the test set is only for final reporting.  Every failure to read a file raises :class:`DataError` with one line
naming the file and the problem.
"""
from __future__ import annotations

import errno
import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

__all__ = [
    "DataError",
    "Split",
    "DatasetBundle",
    "normalizer",
    "DATASETS",
    "load_dataset",
    "load_configured",
    "fashion_mnist_search_path",
    "BatchIterator",
]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:<path>")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DataError(UserError):
    """A dataset file is missing or unreadable; the message names the file and the problem."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    indices: np.ndarray  # int64 [N]: position in the source file's split (train or test)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.labels[idx], self.indices[idx])


@dataclass(frozen=True)
class DatasetBundle:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    def describe(self) -> str:
        return (
            f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
            f"{self.num_classes} classes, {self.in_channels}x{self.image_size}x{self.image_size} (from {self.source})"
        )


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    subset: int | None = None,
    test_subset: int | None = None,
    image_size: int = 64,
) -> DatasetBundle:
    """Load ``name`` and carve a stratified validation split from its training set.

    ``subset`` keeps a stratified sample of that many training images (before the validation split),
    ``test_subset`` likewise for the test set; both are for smoke runs.  ``image_size`` applies to
    image folders only.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    folder, given_val = None, None  # an image folder, and its own val/ split if it has one
    if name == "fashion-mnist":
        (tr_x, tr_y), (te_x, te_y), source = _load_fashion_mnist(data_dir)
        classes = FASHION_MNIST_CLASSES
    elif name in ("cifar10", "cifar100"):
        (tr_x, tr_y), (te_x, te_y), classes, source = _load_cifar(name, data_dir)
    elif name.startswith("imagefolder:"):
        folder = _load_image_folder(Path(name.split(":", 1)[1]), image_size, seed)
        (tr_x, tr_y), (te_x, te_y), classes, source = folder["train"], folder["test"], folder["classes"], folder["source"]
        given_val = folder["val"]
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")

    rng = np.random.default_rng(seed)
    train_all = Split(tr_x, tr_y.astype(np.int64), np.arange(len(tr_y), dtype=np.int64))
    test = Split(te_x, te_y.astype(np.int64), np.arange(len(te_y), dtype=np.int64))
    if subset is not None:
        train_all = train_all.take(_stratified_sample(train_all.labels, _check_subset(subset, len(train_all), "subset"), rng))
    if test_subset is not None:
        test = test.take(_stratified_sample(test.labels, _check_subset(test_subset, len(test), "test_subset"), rng))
    if given_val is not None:  # the folder's val/ split; val_fraction does not apply
        train = train_all
        val = Split(given_val[0], given_val[1].astype(np.int64), np.arange(len(given_val[1]), dtype=np.int64))
    else:
        val_idx = _stratified_sample(train_all.labels, max(1, int(round(val_fraction * len(train_all)))), rng)
        train_mask = np.ones(len(train_all), dtype=bool)
        train_mask[val_idx] = False
        train, val = train_all.take(np.flatnonzero(train_mask)), train_all.take(val_idx)

    if len(train) < 2 or len(val) < 1:
        raise DataError(f"{name}: too few images to train on: {len(train)} for training and {len(val)} for "
                        f"validation are left after the splits (test {len(test)})")
    # Per-channel statistics of the training split only (the test set never informs training).
    mean, std = _channel_stats(train.images)
    if folder is not None:
        folder["write_cache"]()
    return DatasetBundle(
        name=name, train=train, val=val, test=test, num_classes=len(classes), class_names=tuple(classes),
        mean=mean, std=std, source=str(source),
        info={"val_fraction": val_fraction, "seed": seed, "subset": subset, "test_subset": test_subset,
              # image folders: the files of each source split (relative paths; a split's indices
              # index its source's list -- a val carved from train, train's) and the cache file used
              **({"files": folder["files"], "cache": folder["cache"]} if folder is not None else {})},
    )



def load_configured(cfg):
    """The dataset a config names (a TrainConfig or a PipelineConfig: dataset, data_dir, val_fraction,
    seed, subset, test_subset, image_size): what ``esdbs run``, ``train-one`` and ``export`` load."""
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        subset=cfg.subset, test_subset=cfg.test_subset, image_size=cfg.image_size)

def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images [N, C, H, W] in [0, 1], in chunks: a
    float copy of the whole split would take 4x its memory (1.2 GB for 2,000 images at 224 x 224)."""
    n, c = images.shape[:2]
    pixels = int(np.prod(images.shape[2:]))
    total, squares = np.zeros(c), np.zeros(c)
    for a in range(0, n, 512):
        chunk = images[a:a + 512].reshape(-1, c, pixels).astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2))
        squares += np.square(chunk).sum(axis=(0, 2))
    count = n * pixels
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(var) + 1e-6)


def _check_subset(n: int, total: int, what: str) -> int:
    if n < 20 or n > total:
        raise UserError(f"{what} must be between 20 and {total}, got {n}")
    return n


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices, each class represented in proportion to its frequency (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(labels))
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (idx format)
# --------------------------------------------------------------------------------------------------
def fashion_mnist_search_path(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: --data-dir, $ESDBS_DATA, Debian's package, torchvision's cache."""
    if data_dir is not None:  # an explicit directory is the only place looked at
        roots = [Path(data_dir)]
    else:
        roots = [Path(p) for p in [os.environ.get("ESDBS_DATA")] if p]
        roots += [Path("/usr/share/datasets/fashion-mnist"), _torchvision_cache()]
    found: list[Path] = []
    for root in roots:
        found += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    return found


def _torchvision_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchvision"


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir):
    searched = fashion_mnist_search_path(data_dir)
    for directory in searched:
        paths = {k: _find_idx(directory, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if any(paths.values()):
            missing = [FASHION_MNIST_FILES[k] + ".gz" for k, p in paths.items() if p is None]
            if missing:
                raise DataError(f"{directory}: Fashion-MNIST incomplete, missing {', '.join(missing)}")
            train = _read_idx_pair(paths["train_images"], paths["train_labels"])
            test = _read_idx_pair(paths["test_images"], paths["test_labels"])
            return train, test, directory
    raise DataError(
        "Fashion-MNIST not found (looked in: " + ", ".join(str(p) for p in searched) + "). "
        "Install it with `apt-get install dataset-fashion-mnist` (Debian), run `make setup`, "
        "or pass --data-dir DIR holding the four idx .gz files."
    )


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    # both headers first: shapes and counts are checked before a byte of data is read, so a header that
    # promises billions of items (or a gzip stream that inflates to gigabytes) costs nothing
    with _IdxFile(images_path, 0x0803) as images, _IdxFile(labels_path, 0x0801) as labels:
        if len(images.dims) != 3 or images.dims[1:] != (28, 28):
            raise DataError(f"{images_path}: images of shape {'x'.join(map(str, images.dims[1:]))}, Fashion-MNIST's "
                            "are 28x28")
        if len(labels.dims) != 1:
            raise DataError(f"{labels_path}: {len(labels.dims)} dimensions, a label file has 1")
        if images.dims[0] != labels.dims[0]:
            raise DataError(f"{images_path}: {images.dims[0]} images but {labels_path.name} has {labels.dims[0]} labels")
        if images.dims[0] > IDX_MAX_ITEMS:
            raise DataError(f"{images_path}: {images.dims[0]:,} images, more than the {IDX_MAX_ITEMS:,} esdbs holds in "
                            "memory")
        x, y = images.data(), labels.data()
    check_labels(y, len(FASHION_MNIST_CLASSES), labels_path)
    return x[:, None, :, :], y


def check_labels(labels: np.ndarray, num_classes: int, where) -> None:
    """Every label a class index in [0, num_classes), or one line listing the bad entries."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        shown = ", ".join(f"#{i}: {int(labels[i])}" for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(f"{where}: {bad.size} of {labels.size} labels outside 0..{num_classes - 1} ({shown})")


# A dataset is held whole in memory: 10 million 28 x 28 images are 7.8 GB (Fashion-MNIST has 70,000).
IDX_MAX_ITEMS = 10_000_000


class _IdxFile:
    """An idx file (gzip or raw), its header read on opening; :meth:`data` reads exactly the bytes the
    header promises and refuses a file that holds fewer or more."""

    def __init__(self, path: Path, expected_magic: int):
        self.path, self.expected_magic, self.fh = path, expected_magic, None

    def __enter__(self):
        from . import storage

        path = self.path
        try:
            storage.check_regular(path)
            self.fh = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
            head = self.fh.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: too short to be an idx file ({len(head)} bytes)")
            magic = struct.unpack(">I", head)[0]
            if magic != self.expected_magic:
                raise DataError(f"{path}: wrong idx magic number 0x{magic:08x}, expected 0x{self.expected_magic:08x}")
            ndim = magic & 0xFF
            shape = self.fh.read(4 * ndim)
            if len(shape) < 4 * ndim:
                raise DataError(f"{path}: header cut short ({len(shape) + 4} bytes)")
            self.dims = struct.unpack(f">{ndim}I", shape)
        except DataError:
            self.__exit__()
            raise
        except UserError as exc:
            self.__exit__()
            raise DataError(str(exc)) from None
        except (OSError, EOFError, zlib.error) as exc:
            self.__exit__()
            raise DataError(f"{path}: cannot read ({_reason(exc)}); the file is truncated or corrupt") from None
        return self

    def data(self) -> np.ndarray:
        expected = int(np.prod(self.dims, dtype=object))
        try:
            raw = self.fh.read(expected + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{self.path}: cannot read ({_reason(exc)}); the file is truncated or corrupt") from None
        if len(raw) != expected:
            raise DataError(f"{self.path}: header promises {expected} bytes of data, file holds "
                            f"{len(raw) if len(raw) <= expected else 'more'}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.dims).copy()

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python pickle batches)
# --------------------------------------------------------------------------------------------------
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: dicts, lists, bytes and numpy arrays only -- never arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    from . import storage

    try:
        storage.check_regular(path)  # not a pipe, not a link to nowhere
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except UserError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # truncated, not a pickle, or a forbidden class
        raise DataError(f"{path}: not a readable CIFAR batch ({_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _load_cifar(name: str, data_dir):
    folder, train_files, test_files, meta_file, label_key, names_key = _CIFAR[name]
    roots = [Path(data_dir)] if data_dir is not None else [Path(p) for p in [os.environ.get("ESDBS_DATA")] if p] + [
        Path(f"/usr/share/datasets/{name}"), _torchvision_cache(),
    ]
    for root in roots:
        directory = root / folder
        if directory.is_dir():
            break
    else:
        raise DataError(
            f"{name} not found (looked for {folder}/ in: " + ", ".join(str(r) for r in roots) + "). "
            f"Pass --data-dir DIR containing {folder}/ (torchvision's format)."
        )

    def read(files):
        xs, ys = [], []
        for f in files:
            batch = _unpickle(directory / f)
            if b"data" not in batch or label_key not in batch:
                raise DataError(f"{directory / f}: missing {b'data'!r} or {label_key!r}")
            x = _integers(batch[b"data"], directory / f, "data")
            y = _integers(batch[label_key], directory / f, label_key.decode())
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{directory / f}: data has shape {x.shape}, expected (N, 3072)")
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DataError(f"{directory / f}: data holds values in [{x.min()}, {x.max()}], pixels are 0..255")
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise DataError(f"{directory / f}: {x.shape[0]} images but {y.shape[0] if y.ndim else 0} labels")
            check_labels(y, len(classes), f"{directory / f}: {label_key.decode()}")
            xs.append(x.astype(np.uint8).reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    meta = _unpickle(directory / meta_file)
    names = meta.get(names_key, [])
    if not isinstance(names, (list, tuple)):
        raise DataError(f"{directory / meta_file}: {names_key!r} is a {type(names).__name__}, expected a list of names")
    try:
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except UnicodeDecodeError:
        raise DataError(f"{directory / meta_file}: {names_key.decode()}: class names are not UTF-8 text") from None
    if len(classes) < 2:
        raise DataError(f"{directory / meta_file}: {names_key.decode()}: {len(classes)} class names, a classifier "
                        "needs at least 2")
    train, test = read(train_files), read(test_files)
    return train, test, classes, directory


def _integers(value, path: Path, key: str) -> np.ndarray:
    """A batch's array of whole numbers (int64), or one line naming the file and key: text, floats,
    ragged or nested lists and numbers beyond int64 are refused, never cast."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DataError(f"{path}: {key} is not an array of numbers ({_reason(exc)[:100]})") from None
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.ndim == 1):  # [] reads as float64
        what = "text, objects or numbers beyond 64 bits" if a.dtype.kind in "OUSV" else a.dtype.name
        raise DataError(f"{path}: {key} is not an array of whole numbers ({what})")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise DataError(f"{path}: {key} holds numbers beyond 64 bits")
    return a.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Image folders (one sub-folder per class), decoded once and cached
# --------------------------------------------------------------------------------------------------
# Layouts: root/{train,val,test}/<class>/ (each split given), root/{train,training}/<class>/ with
# root/{test,testing,val,valid,validation}/<class>/ (10 Monkey Species' training/ + validation/: the
# second folder is the held-out test set, validation is carved from training), or root/<class>/ alone
# (20 % of each class, seeded, becomes the test set).  Class names come from the training folder.
_TRAIN_DIRS = ("train", "training")
_VAL_DIRS = ("val", "valid", "validation")
_TEST_DIRS = ("test", "testing")
# Bumped whenever decoding changes (resize, orientation, colour conversion), so no old cache is read.
_IMAGE_CACHE_VERSION = 1


def image_cache_dir() -> Path:
    """Where decoded image folders are cached: ``$ESDBS_CACHE``, else ``$XDG_CACHE_HOME/esdbs``, else
    ``~/.cache/esdbs`` -- never inside the user's image folder (which may be read-only, shared, or
    under version control, and whose file list keys the cache)."""
    if os.environ.get("ESDBS_CACHE"):
        return Path(os.environ["ESDBS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "esdbs"


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / d for d in names if (root / d).is_dir()), None)


def _image_folder_parts(root: Path) -> dict[str, Path]:
    """{"train": dir, "val": dir (optional), "test": dir (optional)} or {"all": root}."""
    train = _first_dir(root, _TRAIN_DIRS)
    val, test = _first_dir(root, _VAL_DIRS), _first_dir(root, _TEST_DIRS)
    if train is not None and val is not None and test is not None:
        return {"train": train, "val": val, "test": test}
    if train is not None and (test or val) is not None:
        return {"train": train, "test": test or val}
    return {"all": root}


def _sub_dirs(directory: Path) -> list[str]:
    names = []
    broken = []
    for d in directory.iterdir():
        if d.name.startswith(".") or d.name == "__MACOSX":
            continue
        if d.is_dir():
            names.append(d.name)
        elif d.is_symlink() and not d.exists():  # a link that leads nowhere or in a loop: a class lost
            broken.append(d.name)
    if broken:
        raise DataError(f"{directory}: {_unreadable(directory, sorted(broken))}")
    return sorted(names)


def _unreadable(folder: Path, names: list[str]) -> str:
    """What is wrong with entries of ``folder`` that cannot be read, listed (at most five)."""
    def what(name: str) -> str:
        p = folder / name
        if p.is_symlink():
            try:
                p.stat()
            except OSError as exc:
                return "a symbolic link loop" if exc.errno == errno.ELOOP else f"a link to {os.readlink(p)}, which does not exist"
        return "not a regular file (a pipe, socket or device)"

    shown = "; ".join(f"{n}: {what(n)}" for n in names[:5]) + ("; ..." if len(names) > 5 else "")
    return f"{len(names)} unreadable entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _class_dirs(directory: Path) -> list[str]:
    classes = _sub_dirs(directory)
    if len(classes) < 2:
        raise DataError(f"{directory}: expected one sub-folder per class (at least 2), found {len(classes)}")
    return classes


def _list_images(directory: Path, classes: list[str]) -> list[tuple[int, Path]]:
    """(label, file) for every image in ``directory/<class>/``, sorted; hidden files (macOS's ``._x.jpg``
    resource forks look like JPEGs) and other suffixes are left out, sub-folders are not searched."""
    extra = sorted(set(_sub_dirs(directory)) - set(classes))
    if extra:
        raise DataError(f"{directory}: class folder(s) {', '.join(extra)} are not in the training folder's classes "
                        f"({', '.join(classes)})")
    out = []
    for label, cls in enumerate(classes):
        folder = directory / cls
        if not folder.is_dir():
            raise DataError(f"{folder}: class folder missing (classes come from the training folder)")
        candidates = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        files = sorted(p for p in candidates if p.is_file())
        # sub-folders are not searched; anything else that is not a readable file is named, not skipped
        broken = sorted(p.name for p in candidates if not p.is_file() and not p.is_dir())
        if broken:
            raise DataError(f"{folder}: {_unreadable(folder, broken)}")
        if not files:
            raise DataError(f"{folder}: empty class folder, no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        out += [(label, f) for f in files]
    return out


def _cache_key(root: Path, listing: dict[str, list[tuple[int, Path]]], image_size: int) -> str:
    """sha256 of what decoding depends on: the file list (relative paths, sizes, modification times),
    the classes' order (labels), the size and the decoder's version.  A changed, added or removed image
    gives a new key; the folder's own location does not enter, so a moved or copied folder hits."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([_IMAGE_CACHE_VERSION, int(image_size)]).encode())
    for part in sorted(listing):
        for label, f in listing[part]:
            st = f.stat()
            h.update(json.dumps([part, label, f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:32]


def _decode(path: Path, image_size: int) -> np.ndarray:
    """One image as uint8 [3, S, S]: EXIF orientation applied (phone photos), squashed to S x S."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 M pixels (a 108-megapixel phone photo is a photo, and the draft
            # below decodes a JPEG at a fraction of that); above twice that it refuses the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # JPEG: decode at the smallest DCT scale still >= S (4-8x faster on photos, same result
                # after the resize to S up to rounding); other formats ignore the draft.
                im.draft("RGB", (image_size, image_size))
                im = ImageOps.exif_transpose(im)
                if im.mode in ("P", "PA", "LA", "La", "I;16", "I"):
                    im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
                # Squashed to a square, aspect ratio not kept (the ResNet report's practice): the whole
                # subject stays in the picture, and random resized crops vary the aspect in training.
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused, too many pixels for an image of this kind ({_reason(exc)})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({_reason(exc)})") from None


class _Progress:
    """A one-line progress bar on a terminal's stderr (nothing when stderr is not a terminal: logs and
    captured output get the summary line only)."""

    def __init__(self, total: int, what: str):
        import sys
        import time

        self.total, self.what, self.done = total, what, 0
        self.stream = sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self._clock = time.perf_counter

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if self.live and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r{self.what} [{bar:<30}] {self.done}/{self.total} {now - self.t0:.1f}s")
            self.stream.flush()

    def close(self, ok: bool) -> float:
        if self.live:  # end the bar's line, or clear it so an error line starts clean
            self.stream.write("\n" if ok else "\r\033[K")
            self.stream.flush()
        return self._clock() - self.t0


def _decode_all(files: list[Path], image_size: int, what: str) -> np.ndarray:
    """Decode every file (threads: Pillow releases the GIL while decoding), in order, with a bar."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    bar = _Progress(len(files), what)
    ok = False
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        for i, arr in enumerate(pool.map(lambda f: _decode(f, image_size), files)):
            out[i] = arr
            bar.update()
        ok = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a bad image ends the decode now, not after the rest
        seconds = bar.close(ok)
    print(f"[esdbs] decoded {len(files):,} images at {image_size}x{image_size} in {seconds:.1f}s", flush=True)
    return out


def _read_cache(path: Path, parts: list[str], classes: list[str]) -> dict | None:
    """The cached arrays, or None when the file is absent, unreadable or not what this key expects."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if list(z["classes"]) != classes:
                return None
            out = {p: (z[f"{p}_images"], z[f"{p}_labels"], [str(f) for f in z[f"{p}_files"]]) for p in parts}
    except (OSError, KeyError, ValueError, EOFError, zlib.error):
        return None
    for x, y, f in out.values():
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y) or len(y) != len(f):
            return None
    return out


def _write_cache(path: Path, arrays: dict, classes: list[str]) -> None:
    """Write atomically (a temporary file in the cache directory, then rename); a cache that cannot
    be written costs the next run a decode, never this run its data."""
    import sys
    import tempfile

    payload = {"classes": np.asarray(classes)}
    for part, (x, y, files) in arrays.items():
        payload.update({f"{part}_images": x, f"{part}_labels": y, f"{part}_files": np.asarray(files)})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        print(f"[esdbs] note: image cache not written ({path.parent}: {_reason(exc)}); set ESDBS_CACHE to a "
              "writable directory to skip decoding next time", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _load_image_folder(root: Path, image_size: int, seed: int) -> dict:
    """Decode (or read from the cache) an image folder: {"train", "test", "val" (None unless the folder
    has one), "classes", "source", "cache", "files"}; each split an (images, labels) pair."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (point to yours with --set dataset=imagefolder:DIR)")
    parts = _image_folder_parts(root)
    classes = _class_dirs(parts.get("train", root))
    listing = {part: _list_images(d, classes) for part, d in parts.items()}
    key = _cache_key(root, listing, image_size)
    cache = image_cache_dir() / "imagefolder" / f"{key}.npz"
    arrays = _read_cache(cache, list(listing), classes)
    if arrays is None:
        files = [f for part in listing for _, f in listing[part]]
        decoded = _decode_all(files, image_size, f"decoding {root.name or root}")
        arrays, pos = {}, 0
        for part, items in listing.items():
            labels = np.asarray([label for label, _ in items], dtype=np.int64)
            arrays[part] = (decoded[pos:pos + len(items)], labels, [f.relative_to(root).as_posix() for _, f in items])
            pos += len(items)
        decoded_arrays = arrays
    else:
        decoded_arrays = None
    if "all" in arrays:
        x, y, files = arrays["all"]
        test_idx = _stratified_sample(y, max(1, len(y) // 5), np.random.default_rng(seed + 10_007))
        mask = np.ones(len(y), bool)
        mask[test_idx] = False
        train, test = (x[mask], y[mask]), (x[test_idx], y[test_idx])
        files = {"train": [files[i] for i in np.flatnonzero(mask)], "test": [files[i] for i in test_idx]}
        val = None
    else:
        train, test = arrays["train"][:2], arrays["test"][:2]
        val = arrays["val"][:2] if "val" in arrays else None
        files = {part: arrays[part][2] for part in arrays}
    # The cache is written by the caller once the whole request has been checked (write_cache): a
    # refused request leaves nothing behind, not even a cache entry.
    return {"train": train, "val": val, "test": test, "classes": tuple(classes), "source": root,
            "cache": str(cache), "files": files,
            "write_cache": (lambda: _write_cache(cache, decoded_arrays, classes)) if decoded_arrays is not None
            else (lambda: None)}


# --------------------------------------------------------------------------------------------------
# Batch iterator
# --------------------------------------------------------------------------------------------------
def normalizer(mean, std, device="cpu"):
    """(scale, shift), (1, C, 1, 1) float32 tensors on ``device``, with normalised = pixels * scale +
    shift for uint8 pixels: the trainer's batches, ``esdbs predict`` and the ONNX export all use these,
    so their inputs are bit-identical."""
    import torch

    std_t = torch.tensor(list(std), dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
    shift = (-torch.tensor(list(mean), dtype=torch.float32) / std_t).view(1, -1, 1, 1).to(device)
    return scale, shift


class BatchIterator:
    """Normalised batches from an in-memory split; ``batch_size`` may change between or within epochs.

    The uint8 images move to ``device`` once; each batch is gathered by index and normalised there.
    Shuffling draws from its own ``torch.Generator`` (CPU), whose state is part of
    :meth:`state_dict`, so a resumed run sees the same batches as an uninterrupted one.  A trailing
    batch of one sample is skipped in training (batch norm cannot train on it).

    ``augment`` (training only; ``augment.Augmenter``) maps each gathered uint8 batch to an augmented
    one on the device, before normalisation; its random state travels in :meth:`state_dict` too.
    """

    def __init__(self, split: Split, *, batch_size: int, mean, std, device="cpu", shuffle=False, seed=0,
                 augment=None):
        import torch

        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.device = torch.device(device)
        self._images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
        self._labels = torch.from_numpy(np.ascontiguousarray(split.labels)).to(self.device)
        self._scale, self._shift = normalizer(mean, std, self.device)
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        import torch

        n = len(self)
        order = torch.randperm(n, generator=self._gen).to(self.device) if self.shuffle else None
        pos = 0
        while pos < n:
            end = min(n, pos + self.batch_size)  # read batch_size anew for every batch
            if self.shuffle and end - pos < 2:
                break
            if order is None:
                x, y = self._images[pos:end], self._labels[pos:end]
            else:
                idx = order[pos:end]
                x, y = self._images[idx], self._labels[idx]
            pos = end
            if self.augment is not None:
                x = self.augment(x)
            yield torch.addcmul(self._shift, x.float(), self._scale), y

    def state_dict(self) -> dict:
        state = {"generator": self._gen.get_state(), "batch_size": self.batch_size}
        if self.augment is not None:
            state["augment"] = self.augment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if ("augment" in state) != (self.augment is not None):
            raise UserError("batch iterator state " + ("has" if "augment" in state else "lacks")
                             + " an augmentation state, this iterator " + ("does not augment" if self.augment is None
                                                                            else "augments"))
        self._gen.set_state(state["generator"])
        self.batch_size = int(state["batch_size"])
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])
