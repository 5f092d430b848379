"""A member's network, built the same way for training and for inference.

The trainer (``train.py``), the export (``export.py``) and ``esdbs predict`` (``ensemble.py``) all build
a member here: the registry model (``models.py``) with its convolutions in the form its config names.
Nothing here trains, writes files or knows about Ray.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import create_model
from .errors import UserError

__all__ = ["CONV_FORMS", "build_network", "pick_device"]

CONV_FORMS = ("spatial", "winograd_relu", "basis_random")


def pick_device(name: str) -> torch.device:
    """"auto" is CUDA where there is one, else the CPU; "cuda" without CUDA is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_network(model: str, *, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0,
                  width: float = 1.0, conv: str = "spatial", basis: Any = None, seed: int = 0,
                  winograd_impl: str = "auto") -> nn.Module:
    """The registry model with its convolutions in the form ``conv`` names: "spatial", "winograd_relu"
    (every eligible conv a Winograd-ReLU layer, run by ``winograd_impl``) or "basis_random" (``basis``:
    a BasisConfig)."""
    net = create_model(model, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       dropout=dropout, width=width)
    if conv == "winograd_relu":
        from .winograd import to_winograd_relu

        to_winograd_relu(net, impl=None if winograd_impl == "auto" else winograd_impl)
    elif conv == "basis_random":
        from .basisconv import to_basisconv_random

        if basis is None:
            raise UserError("conv 'basis_random' needs the basis settings (train.basis)")
        to_basisconv_random(net, fraction=basis.fraction, which=basis.layers, seed=seed)
    elif conv != "spatial":
        raise UserError(f"conv {conv!r}: choose one of {', '.join(CONV_FORMS)}")
    return net
