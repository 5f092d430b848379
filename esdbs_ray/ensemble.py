"""Use an exported ensemble: ``Ensemble.load(DIR).predict_proba(images)`` and ``esdbs predict``.

What it achieves: an ``esdbs export`` directory (``export.py``: a manifest, each member's weights as
safetensors with the pruning masks folded in, an ONNX graph per member) becomes a predictor that
needs neither Ray nor the experiment it came from.  :meth:`Ensemble.load` rebuilds each member from
the model registry (``models.create_model``, Winograd-ReLU layers where the member had them) and
loads its weights, checking every file against the manifest's SHA-256.  Predictions follow the
trainer's arithmetic exactly -- the same per-channel normalisation of uint8 pixels (``addcmul`` as in
``data.BatchIterator``), the same softmax, the stacking's float64 weighted average -- so an export
reproduces the run's ensemble: tests/test_export.py predicts the smoke run's Fashion-MNIST test images
and gets the run's ``stacking.json`` test accuracy and the members' Parquet probabilities back.

``esdbs predict DIR INPUT... --out preds.parquet`` reads an image folder, image files, or a dataset
split (``fashion-mnist:test``, ``cifar10:test``, ``cifar100:test``, ``imagefolder:PATH``), predicts in
batches (on the GPU when there is one) and writes one Parquet row per image: the ensemble's
probabilities, each member's, and the top-k labels.  Every input problem (a corrupt image, a folder
without images, a split whose classes are not the ensemble's) is one :class:`~esdbs_ray.data.DataError`
naming it, raised before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import IMAGE_SUFFIXES, DataError
from .layout import ExportLayout, read_marker
from .errors import UserError

FORMAT = "esdbs-ensemble"
FORMAT_VERSION = 1
DATASET_SPLIT = re.compile(r"^(fashion-mnist|cifar10|cifar100):(train|test)$")

__all__ = ["Ensemble", "ExportError", "Prediction", "Inputs", "read_inputs", "predict_to_parquet", "build_model",
           "fold_masks", "FORMAT", "FORMAT_VERSION"]


class ExportError(UserError):
    """An export directory, or an experiment to export, that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------------
# Members: registry model + folded weights
# --------------------------------------------------------------------------------------------------
def build_model(member: dict, num_classes: int, in_channels: int, image_size: int):
    """The registry model of a manifest (or TrainConfig) entry, Winograd-ReLU where it was, no masks
    (export refuses BasisConv members, so a manifest names spatial or winograd_relu)."""
    from .networks import build_network

    net = build_network(member["model"], num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        dropout=float(member.get("dropout", 0.0)), width=float(member.get("width", 1.0)),
                        conv=member.get("conv") or "spatial")
    for op in member.get("growth_ops") or []:  # a self-expanding member: its expansions, replayed
        from .expansion import apply_op

        apply_op(net, op["op"], int(op["block"]), int(op["amount"]))
    return net.eval()


def fold_masks(state: dict) -> dict:
    """A state dict with every ``weight_mask`` multiplied into its ``weight`` and dropped: the pruned
    weights are exact zeros (the trainer keeps them so), and a consumer needs no mask logic."""
    import torch

    out = {}
    for key, value in state.items():
        if key.endswith(".weight_mask"):
            continue
        mask = state.get(key[: -len("weight")] + "weight_mask") if key.endswith("weight") else None
        if mask is not None:
            value = value * mask.to(value.dtype)
        out[key] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalizer(mean: Sequence[float], std: Sequence[float], device):
    """(scale, shift) of the trainer's input normalisation (``data.normalizer``): bit-identical inputs."""
    from .data import normalizer

    return normalizer(mean, std, device)


# --------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Output of :meth:`Ensemble.predict`: ``probs`` (N, C) float64 ensemble probabilities,
    ``member_probs`` {member: (N, C) float32}, ``top_k`` (N, k) class indices (most likely first),
    ``top_k_probs`` (N, k), and the class names."""

    probs: np.ndarray
    member_probs: dict[str, np.ndarray]
    top_k: np.ndarray
    top_k_probs: np.ndarray
    class_names: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.top_k[:, 0]

    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]


@dataclass
class Ensemble:
    """A loaded ``esdbs export`` directory.  ``weights[i]`` belongs to ``members[i]``."""

    root: Path
    manifest: dict
    models: dict[str, Any]
    device: Any
    members: list[str] = field(init=False)
    weights: np.ndarray = field(init=False)

    def __post_init__(self):
        self.members = [m["name"] for m in self.manifest["members"]]
        w = self.manifest["ensemble"]["weights"]
        self.weights = np.array([float(w[m]) for m in self.members], dtype=np.float64)
        inp = self.manifest["input"]
        self.input_shape = (int(inp["channels"]), int(inp["height"]), int(inp["width"]))
        self.class_names = list(self.manifest["task"]["class_names"])
        self._scale, self._shift = _normalizer(inp["mean"], inp["std"], self.device)

    def __repr__(self) -> str:
        members = ", ".join(f"{m} {w:.3f}" for m, w in zip(self.members, self.weights))
        c, h, w = self.input_shape
        return (f"Ensemble({self.manifest.get('group')!r}: {members}; {len(self.class_names)} classes, "
                f"input {c}x{h}x{w}, on {self.device}; {self.root})")

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto", verify: bool = True,
             tune_allocator: bool = False) -> "Ensemble":
        """Load an export directory; ``device`` "auto" (CUDA when available), "cpu" or "cuda".
        ``verify`` checks every file against the manifest's SHA-256 first.  ``tune_allocator``: on a
        CPU, keep freed memory in the process (``winograd.tune_cpu_allocator``, process-wide) -- the
        Winograd layers' large buffers otherwise cost a page fault per 4 KiB on every batch, 1.5-3x
        their arithmetic; ``esdbs predict`` turns it on."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        from .inference import prepare_for_inference

        manifest, layout = read_manifest(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device not in ("cpu", "cuda"):
            raise ExportError(f"--device={device!r}: choose auto, cpu or cuda")
        elif device == "cuda" and not torch.cuda.is_available():
            raise ExportError("--device=cuda: CUDA is not available on this machine")
        inp, task = manifest["input"], manifest["task"]
        if tune_allocator and device == "cpu" and any(m.get("conv") == "winograd_relu" for m in manifest["members"]):
            from .winograd import tune_cpu_allocator

            tune_cpu_allocator()
        models = {}
        for m in manifest["members"]:
            file = _member_file(layout, m, "weights_file")
            if verify and _sha256(file) != m.get("weights_sha256"):
                raise ExportError(f"{file}: does not match the manifest's SHA-256 (changed or truncated)")
            try:
                state = load_safetensors(file.read_bytes())
            except (SafetensorError, ValueError, OSError) as exc:
                raise ExportError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
            bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
            if bad is not None:
                raise ExportError(f"{file}: tensor {bad!r} holds NaN or infinite values")
            try:
                model = build_model(m, int(task["num_classes"]), int(inp["channels"]), int(inp["height"]))
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # growth operations that do not apply
                raise ExportError(f"{layout.manifest}: member {m['name']!r} does not describe a {m['model']!r} "
                                  f"({' '.join(str(exc).split())[:200]})") from None
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ExportError(f"{file}: does not fit registry model {m['model']!r} "
                                  f"({' '.join(str(exc).split())[:300]})") from None
            models[m["name"]] = prepare_for_inference(model.to(device))  # eval, batch norm folded
        return cls(root=layout.root, manifest=manifest, models=models, device=torch.device(device))

    # -- inputs ------------------------------------------------------------------------------------
    def _as_pixels(self, images) -> "torch.Tensor":  # noqa: F821
        """Images as a float32 tensor of pixel values (0..255), (N, C, H, W), on the CPU."""
        import torch

        if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (int, float)):
            if hasattr(images[0], "convert"):  # PIL images
                images = np.stack([_pil_to_array(im, self.input_shape) for im in images])
            else:
                images = np.stack([np.asarray(im) for im in images])
        if not isinstance(images, torch.Tensor):
            images = np.asarray(images)
            if not images.flags.writeable:  # torch wraps numpy memory; a read-only array would warn
                images = images.copy()
        t = torch.as_tensor(images)
        if t.dim() == 3 and self.input_shape[0] == 1:
            t = t.unsqueeze(1)
        if t.dim() != 4 or tuple(t.shape[1:]) != self.input_shape:
            raise UserError(f"images of shape {tuple(t.shape)}: expected (N, {', '.join(map(str, self.input_shape))})"
                             + (" or (N, H, W)" if self.input_shape[0] == 1 else ""))
        if t.dtype == torch.uint8:
            return t
        if t.is_floating_point():
            return t.float() * 255.0  # floats are taken as [0, 1] (torchvision's ToTensor convention)
        raise UserError(f"images of dtype {t.dtype}: expected uint8 pixels or floats in [0, 1]")

    # -- prediction --------------------------------------------------------------------------------
    def member_proba(self, images, *, batch_size: int = 1000, progress=None) -> dict[str, np.ndarray]:
        """Each member's softmax output, {member: (N, C) float32}; ``progress(done, total)`` after each batch."""
        import torch

        pixels = self._as_pixels(images)
        out = {m: [] for m in self.members}
        with torch.inference_mode():
            for a in range(0, len(pixels), batch_size):
                x = torch.addcmul(self._shift, pixels[a:a + batch_size].to(self.device).float(), self._scale)
                for m in self.members:
                    out[m].append(self.models[m](x).float().softmax(1).cpu())
                if progress is not None:
                    progress(min(a + batch_size, len(pixels)), len(pixels))
        c = len(self.class_names)
        return {m: (torch.cat(v).numpy() if v else np.zeros((0, c), np.float32)) for m, v in out.items()}

    def combine(self, member_probs: dict[str, np.ndarray]) -> np.ndarray:
        """The stacking's weighted average, in float64 as ``stacking.evaluate`` computes it."""
        return np.tensordot(self.weights, np.stack([member_probs[m] for m in self.members]).astype(np.float64), axes=1)

    def predict_proba(self, images, *, batch_size: int = 1000) -> np.ndarray:
        """The ensemble's probabilities, (N, C) float64."""
        return self.combine(self.member_proba(images, batch_size=batch_size))

    def predict(self, images, *, top_k: int = 3, batch_size: int = 1000, progress=None) -> Prediction:
        member = self.member_proba(images, batch_size=batch_size, progress=progress)
        probs = self.combine(member)
        k = max(1, min(int(top_k), probs.shape[1]))
        # a stable sort on -p keeps numpy's arg-max rule: ties go to the lower class index
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return Prediction(probs=probs, member_probs=member, top_k=top,
                          top_k_probs=np.take_along_axis(probs, top, axis=1), class_names=self.class_names)


def read_manifest(path: str | os.PathLike) -> tuple[dict, ExportLayout]:
    """The manifest of an export directory, checked: format, version, every key the loader uses, its
    type and range (one line naming the manifest and the key), the members and their files."""
    from . import storage
    from .artifacts import ArtifactError, Dct, Lst, Num, Obj, Str, check
    from .config import MAX_CLASSES, MAX_IMAGE_SIZE, MAX_WIDTH
    from .model_names import MODEL_NAMES

    root = Path(path)
    layout = ExportLayout(root.resolve())
    if not root.is_dir():
        raise ExportError(f"{path}: no such export directory")
    marker = read_marker(str(root))
    if not layout.manifest.exists() and not layout.manifest.is_symlink():
        what = f"an esdbs {marker['kind']}" if marker else "no manifest.json"
        raise ExportError(f"{path}: not an esdbs export ({what}; make one with esdbs export EXP --out DIR)")
    try:
        manifest = storage.parse_json(storage.read_local(layout.manifest, max_bytes=64 * 2 ** 20), str(layout.manifest))
    except UserError as exc:  # a pipe, a link to nowhere, not JSON, nested too deep
        raise ExportError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{layout.manifest}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{layout.manifest}: format_version {str(manifest.get('format_version'))[:40]}, this esdbs "
                          f"reads {FORMAT_VERSION}")
    count = Num(nullable=False, lo=1)
    stats = Lst(Num(nullable=False, finite=True), nullable=False)
    try:
        check(manifest, Obj({
            "members": Lst(Obj({
                "name": Str(nullable=False), "model": Str(nullable=False), "conv": Str(nullable=False),
                "width": Num(finite=True, lo=0.0, hi=MAX_WIDTH), "dropout": Num(finite=True, lo=0.0, hi=1.0),
                "weights_file": Str(nullable=False), "weights_sha256": Str(nullable=False, pattern="[0-9a-f]{64}", what="a SHA-256 in hex"),
                "growth_ops": Lst(Obj({"op": Str(nullable=False), "block": Num(nullable=False, lo=0),
                                       "amount": Num(nullable=False, lo=0)}, nullable=False))},
                nullable=False, required=("name", "model", "conv", "weights_file", "weights_sha256")), nullable=False),
            "ensemble": Obj({"weights": Dct(Num(nullable=False, finite=True, lo=0.0, hi=1.0), nullable=False)},
                            nullable=False, required=("weights",)),
            "input": Obj({"channels": count, "height": count, "width": count, "mean": stats, "std": stats},
                         nullable=False, required=("channels", "height", "width", "mean", "std")),
            "task": Obj({"num_classes": count, "class_names": Lst(Str(nullable=False), nullable=False)},
                        nullable=False, required=("num_classes", "class_names")),
        }, nullable=False, required=("members", "ensemble", "input", "task")), str(layout.manifest))
    except ArtifactError as exc:
        raise ExportError(str(exc)) from None
    members, weights = manifest["members"], manifest["ensemble"]["weights"]
    inp, task = manifest["input"], manifest["task"]
    names = [m["name"] for m in members]
    shape = [inp[k] for k in ("channels", "height", "width")]
    classes = task["class_names"]
    if not members or len(set(names)) != len(names):
        raise ExportError(f"{layout.manifest}: members must be a non-empty list of distinct names, got {names[:10]}")
    for i, m in enumerate(members):
        if m["model"] not in MODEL_NAMES or m.get("conv", "spatial") not in ("spatial", "winograd_relu", None):
            raise ExportError(f"{layout.manifest}: members[{i}]: model {str(m['model'])[:40]!r} with conv "
                              f"{str(m.get('conv'))[:40]!r} is not one esdbs builds")
    if set(weights) != set(names) or abs(sum(weights.values()) - 1.0) > 1e-6:
        raise ExportError(f"{layout.manifest}: ensemble.weights must be one non-negative number per member summing "
                          f"to 1, got {str(weights)[:200]}")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in (*shape, task["num_classes"])) \
            or shape[0] > 64 or not 8 <= min(shape[1:]) <= max(shape[1:]) <= MAX_IMAGE_SIZE:
        raise ExportError(f"{layout.manifest}: input: channels, height and width must be whole numbers (channels "
                          f"1-64, sides 8-{MAX_IMAGE_SIZE}), got {shape}")
    if len(inp["mean"]) != shape[0] or len(inp["std"]) != shape[0] or min(inp["std"]) <= 0 \
            or len(classes) != task["num_classes"] or not 2 <= len(classes) <= MAX_CLASSES:
        raise ExportError(f"{layout.manifest}: input/task fields disagree (channels {shape[0]}, "
                          f"{len(inp['mean'])} means and {len(inp['std'])} positive stds, {len(classes)} class names, "
                          f"num_classes {task['num_classes']})")
    return manifest, layout


def _member_file(layout: ExportLayout, member: dict, key: str) -> Path:
    rel = member.get(key)
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in Path(rel).parts:
        raise ExportError(f"{layout.manifest}: member {member.get('name')!r} has no valid {key} ({rel!r})")
    p = layout.root / rel
    if not p.is_file():
        raise ExportError(f"{p}: missing (member {member.get('name')!r} of {layout.manifest})")
    return p


# --------------------------------------------------------------------------------------------------
# Inputs of `esdbs predict`
# --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Images to predict: uint8 (N, C, H, W), labels (-1 where unknown), where each came from."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]
    indices: np.ndarray
    description: str


def _pil_to_array(im, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    c, h, w = shape
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)  # as data.py reads image folders for training
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def _read_image(path: Path, shape) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if shape[0] == 3 and shape[1] == shape[2]:
        # an RGB model at S x S is what image folders train: decode exactly as training did (EXIF
        # orientation, JPEG draft, palette and alpha handling, the same resize)
        from .data import _decode

        return _decode(path, shape[1])
    try:
        with Image.open(path) as im:
            return _pil_to_array(ImageOps.exif_transpose(im), shape)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused, too many pixels for an image ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({str(exc) or type(exc).__name__})") from None


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no images (JPEG, PNG, BMP, WebP, TIFF) in this folder")
    return files


def read_inputs(items: Sequence[str], *, shape: tuple[int, int, int], class_names: Sequence[str],
                data_dir: str | None = None) -> Inputs:
    """What ``esdbs predict`` is given: one dataset split, or image files and folders (searched
    recursively; an image in a sub-folder named after a class is labelled with it)."""
    items = list(items)
    if len(items) == 1 and DATASET_SPLIT.match(items[0]):
        return _dataset_split(items[0], shape, class_names, data_dir)
    if len(items) == 1 and items[0].startswith("imagefolder:"):
        return _labelled_folder(Path(items[0].split(":", 1)[1]), items[0], shape, class_names)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += _image_files(p)
        elif p.is_file():
            files.append(p)
        elif ":" in item and not p.exists():
            raise DataError(f"{item}: not a file, a folder or a dataset split (fashion-mnist:test, cifar10:test, "
                            "cifar100:test, imagefolder:PATH)")
        else:
            raise DataError(f"{item}: no such image file or folder")
    classes = {n: i for i, n in enumerate(class_names)}
    images = np.stack([_read_image(f, shape) for f in files])
    labels = np.array([classes.get(f.parent.name, -1) for f in files], dtype=np.int64)
    return Inputs(images, labels, [str(f) for f in files], np.arange(len(files), dtype=np.int64),
                  f"{len(files)} image file(s)")


def _dataset_split(spec: str, shape, class_names, data_dir) -> Inputs:
    from .data import load_dataset

    name, split = DATASET_SPLIT.match(spec).groups()
    data = load_dataset(name, data_dir=data_dir, seed=0)
    if split == "test":
        part = data.test
        images, labels, indices = part.images, part.labels, part.indices
    else:  # the whole training file: load_dataset carved a validation split out of it, put it back in order
        indices = np.concatenate([data.train.indices, data.val.indices])
        order = np.argsort(indices)
        images = np.concatenate([data.train.images, data.val.images])[order]
        labels = np.concatenate([data.train.labels, data.val.labels])[order]
        indices = indices[order]
    if tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{spec}: images are {'x'.join(map(str, images.shape[1:]))}, the ensemble takes "
                        f"{'x'.join(map(str, shape))}")
    if list(data.class_names) != list(class_names):
        raise DataError(f"{spec}: classes {list(data.class_names)[:4]}... are not the ensemble's "
                        f"{list(class_names)[:4]}...")
    return Inputs(np.ascontiguousarray(images), labels.astype(np.int64), [spec] * len(labels),
                  indices.astype(np.int64), f"{spec} ({len(labels)} images)")


def _labelled_folder(root: Path, spec: str, shape, class_names) -> Inputs:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = {n: i for i, n in enumerate(class_names)}
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in folders if d.name not in classes]
    if not folders or unknown:
        raise DataError(f"{root}: expected one sub-folder per class, named as the ensemble's classes "
                        f"({', '.join(list(class_names)[:6])}{', ...' if len(class_names) > 6 else ''})"
                        + (f"; unknown: {', '.join(unknown[:5])}" if unknown else ""))
    files = [f for d in folders for f in _image_files(d)]
    images = np.stack([_read_image(f, shape) for f in files])
    labels = np.array([classes[f.relative_to(root).parts[0]] for f in files], dtype=np.int64)
    return Inputs(images, labels, [str(f) for f in files], np.arange(len(files), dtype=np.int64),
                  f"{spec} ({len(files)} images in {len(folders)} class folders)")


# --------------------------------------------------------------------------------------------------
# Writing predictions
# --------------------------------------------------------------------------------------------------
def prediction_table(ensemble: Ensemble, inputs: Inputs, pred: Prediction, *, seconds: float):
    """One row per image: source, index, label (when known), the ensemble's prediction and top-k,
    ``probs`` (the ensemble), ``probs.<member>`` (each member); metadata: the ensemble, the inputs,
    accuracies when labels are known."""
    import pyarrow as pa

    from .provenance import provenance

    n, c = pred.probs.shape
    k = pred.top_k.shape[1]
    known = inputs.labels >= 0
    names = ensemble.class_names

    def fixed(a: np.ndarray, size: int, typ) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1), type=typ), size)

    cols = {
        "source": pa.array(inputs.sources, pa.string()),
        "index": pa.array(inputs.indices, pa.int64()),
        "label": pa.array(np.where(known, inputs.labels, 0), pa.int64(), mask=~known),
        "label_name": pa.array([names[y] if y >= 0 else None for y in inputs.labels], pa.string()),
        "prediction": pa.array(pred.labels.astype(np.int64), pa.int64()),
        "prediction_name": pa.array(pred.label_names(), pa.string()),
        "top_k": fixed(pred.top_k.astype(np.int32), k, pa.int32()),
        "top_k_names": pa.array([[names[i] for i in row] for row in pred.top_k], pa.list_(pa.string())),
        "top_k_probs": fixed(pred.top_k_probs.astype(np.float32), k, pa.float32()),
        "probs": fixed(pred.probs.astype(np.float32), c, pa.float32()),
    }
    for m in ensemble.members:
        cols[f"probs.{m}"] = fixed(pred.member_probs[m].astype(np.float32), c, pa.float32())
    accuracy = evaluation = None
    if known.any():
        from .evaluation import evaluate_probs

        y = inputs.labels[known]
        accuracy = {"ensemble": float(np.mean(pred.labels[known] == y)), "labelled": int(known.sum()),
                    "members": {m: float(np.mean(pred.member_probs[m][known].argmax(1) == y)) for m in ensemble.members}}
        # the labelled images: confusion, per-class precision / recall / F1, calibration (evaluation.py)
        evaluation = {"ensemble": evaluate_probs(pred.probs[known], y, c).to_dict(),
                      "members": {m: evaluate_probs(pred.member_probs[m][known], y, c).to_dict()
                                  for m in ensemble.members}}
    meta = {"export_dir": str(ensemble.root), "name": ensemble.manifest.get("name"),
            "group": ensemble.manifest.get("group"), "members": ensemble.members,
            "weights": dict(zip(ensemble.members, ensemble.weights.tolist())),
            "method": ensemble.manifest["ensemble"].get("method"), "class_names": names, "inputs": inputs.description,
            "images": n, "seconds": seconds, "device": str(ensemble.device), "accuracy": accuracy,
            "evaluation": evaluation, **provenance()}
    table = pa.table(cols)
    return table.replace_schema_metadata({"esdbs_predict": json.dumps(meta)}), meta


def predict_to_parquet(ensemble: Ensemble, inputs: Inputs, out: str, *, top_k: int = 3,
                       batch_size: int = 1000, progress=None) -> dict:
    """Predict ``inputs`` and write the Parquet file ``out`` atomically; returns the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import storage

    t0 = time.perf_counter()
    pred = ensemble.predict(inputs.images, top_k=top_k, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    table, meta = prediction_table(ensemble, inputs, pred, seconds=seconds)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(out, sink.getvalue().to_pybytes())
    return meta
