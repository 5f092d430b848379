"""Training-time augmentation of uint8 image batches, on the device the batches live on.

:class:`Augmenter` turns ``train.augment`` (:class:`~esdbs_ray.config.AugmentConfig`) into a
``torchvision.transforms.v2`` pipeline -- random resized crop, horizontal / vertical flips, colour
jitter, RandAugment or TrivialAugment (Wide), in the order the config lists them -- and applies it to
each uint8 batch ``[B, C, H, W]`` that the training :class:`~esdbs_ray.data.BatchIterator` gathers,
before normalisation.  Evaluation iterators have no augmenter: validation and test images are never
augmented.

**Each image draws its own parameters.**  A v2 transform called on a batch draws one set of
parameters for the whole batch (the same crop, the same flip for all 128 images), which would make the
images of a batch move together and shrink the variety augmentation is there for.  So the pipeline
runs image by image over the batch (on its device; the images are already there), which is what a
DataLoader worker would do, without the workers.

**Seeded and resumable.**  v2 draws its parameters from torch's global CPU generator.  The augmenter
owns a generator state of its own (seeded from the trial's seed, apart from the shuffling and
initialisation streams): around each batch it forks the global generator, installs its own state,
runs the pipeline and keeps the state it ended with.  So augmentation neither consumes nor disturbs
the global stream (dropout, initialisation), the same seed gives the same augmented batches, and
:meth:`Augmenter.state_dict` -- saved with the batch iterator in every checkpoint -- makes a resumed
run draw exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import AUGMENT_OPS, AugmentConfig
from .errors import UserError

__all__ = ["Augmenter", "build_augmenter", "augment_seed"]


def augment_seed(seed: int) -> int:
    """The augmentation stream's seed for a trial seed: a SeedSequence child, independent of the
    streams the trial seeds directly (``torch.manual_seed(seed)``, the shuffling generator)."""
    return int(np.random.SeedSequence([int(seed), 0xA06E]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _transforms(cfg: AugmentConfig, image_size: int) -> list:
    from torchvision.transforms import v2

    made = []
    for name in cfg.ops:
        if name == "random_resized_crop":
            made.append(v2.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                             antialias=True))
        elif name == "hflip":
            made.append(v2.RandomHorizontalFlip(cfg.hflip_p))
        elif name == "vflip":
            made.append(v2.RandomVerticalFlip(cfg.vflip_p))
        elif name == "color_jitter":
            made.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None,
                                       saturation=cfg.saturation or None, hue=cfg.hue or None))
        elif name == "randaugment":
            made.append(v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude))
        elif name == "trivialaugment":
            made.append(v2.TrivialAugmentWide())
        else:  # the config's Literal lists the names; this is a new name without a transform
            raise UserError(f"augment op {name!r} has no transform; known: {', '.join(AUGMENT_OPS)}")
    return made


class Augmenter:
    """``cfg.ops`` as one v2 pipeline, applied per image to uint8 batches; seeded, with a state dict."""

    def __init__(self, cfg: AugmentConfig, *, image_size: int, seed: int):
        from torchvision.transforms import v2

        self.cfg = cfg
        self.image_size = int(image_size)
        self.transform = v2.Compose(_transforms(cfg, self.image_size))
        self._state = torch.Generator().manual_seed(augment_seed(seed)).get_state()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"augmentation expects a uint8 batch [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        # devices=[]: only the CPU generator is forked -- v2 draws every parameter on the CPU, whatever
        # the images' device.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._state)
            out = torch.stack([self.transform(img) for img in x.unbind(0)])
            self._state = torch.get_rng_state()
        return out

    def state_dict(self) -> dict:
        return {"rng": self._state.clone(), "ops": list(self.cfg.ops)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("ops", [])) != list(self.cfg.ops):
            raise UserError(f"augmentation state is for ops {state.get('ops')}, this augmenter has {list(self.cfg.ops)}")
        self._state = state["rng"].clone()

    def __repr__(self) -> str:
        return f"Augmenter({list(self.cfg.ops)}, size {self.image_size})"


def build_augmenter(cfg: AugmentConfig, *, image_size: int, seed: int) -> Augmenter | None:
    """An :class:`Augmenter`, or None when ``cfg`` lists no ops."""
    return Augmenter(cfg, image_size=image_size, seed=seed) if cfg.ops else None
