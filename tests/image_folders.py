"""Image folders made of real photographs: Fashion-MNIST's clothes, written as image files.

The tests of the own-images recipe need a user's folder -- one sub-folder per class of
PNG/JPEG files -- with real content, not noise: a recipe that "learns" on noise proves nothing.  So
these helpers take Zalando's product photographs from the real Fashion-MNIST files and save them as
files, optionally enlarged and saved as JPEG like a camera's (which also makes decoding cost what a
photo's does).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from esdbs_ray.data import FASHION_MNIST_CLASSES, _load_fashion_mnist


def class_folder_names(classes=range(10)) -> list[str]:
    """Fashion-MNIST's class names as folder names ("T-shirt/top" -> "T-shirt_top")."""
    return [FASHION_MNIST_CLASSES[c].replace("/", "_") for c in classes]


def fashion_photos(per_class: int, classes=range(10), *, offset: int = 0, split: str = "train"):
    """``per_class`` real images (uint8 28x28) of each class, the first ones after ``offset`` in file order."""
    (tr_x, tr_y), (te_x, te_y), _ = _load_fashion_mnist(None)
    x, y = (tr_x, tr_y) if split == "train" else (te_x, te_y)
    out = {}
    for c in classes:
        idx = np.flatnonzero(y == c)[offset:offset + per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} images after offset {offset}")
        out[c] = x[idx, 0]
    return out


def write_folder(root: Path, per_class: int, classes=range(10), *, offset: int = 0, size: int | None = None,
                 fmt: str = "png", split: str = "train") -> Path:
    """``root/<class name>/<i>.<fmt>``: ``per_class`` real photographs per class; ``size`` enlarges them
    (bicubic, RGB) as a camera's pictures would be; returns ``root``."""
    from PIL import Image

    names = class_folder_names(classes)
    for name, (c, images) in zip(names, fashion_photos(per_class, classes, offset=offset, split=split).items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(images):
            im = Image.fromarray(arr)
            if size is not None:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            im.save(d / f"{offset + i:05d}.{fmt}", quality=90) if fmt == "jpg" else im.save(d / f"{offset + i:05d}.{fmt}")
    return root


def write_split_folder(root: Path, per_class: dict[str, int], classes=range(10), **kw) -> Path:
    """``root/{train,val,test}/<class>/``: disjoint real photographs per split (test from the test file)."""
    offset = 0
    for part, n in per_class.items():
        if part == "test":
            write_folder(root / part, n, classes, split="test", **kw)
        else:
            write_folder(root / part, n, classes, offset=offset, **kw)
            offset += n
    return root
