"""Inference networks: batch norm folded into the convolution before it computes what the unfolded
network computes in eval mode, for every registry model, spatial and Winograd-ReLU, and keeps the
pruned weights' zeros."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esdbs_ray.inference import fold_batchnorm, prepare_for_inference
from esdbs_ray.models import list_models
from esdbs_ray.networks import build_network


def _with_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters and running statistics, as a trained network has (fresh ones are 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("conv", ["spatial", "winograd_relu"])
@pytest.mark.parametrize("name", list_models())
def test_folding_preserves_the_function(name, conv):
    size = 32 if name in ("vgg16", "resnet32", "resnet50") else 28
    torch.manual_seed(0)
    width = 1.0 if name == "resnet50" else 0.125  # torchvision's architecture: published widths only
    model = _with_statistics(build_network(name, num_classes=10, in_channels=1, image_size=size, width=width,
                                           conv=conv), seed=1)
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(4, 1, size, size)
    with torch.no_grad():
        want = model(x)
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert n > 0 and n + left == bns
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_folded_winograd_layer_keeps_its_zeros_and_training_mode_is_refused():
    from esdbs_ray.winograd import winograd_layers

    model = _with_statistics(build_network("alexnet", num_classes=10, in_channels=1, image_size=28, width=0.25,
                                           conv="winograd_relu"), seed=2)
    _, layer = winograd_layers(model)[0]
    with torch.no_grad():
        layer.weight[:, :, ::2] = 0.0
    zeros = layer.weight == 0
    prepare_for_inference(model)
    assert torch.equal(layer.weight == 0, zeros) and layer.bias is not None
    assert torch.equal(layer.weight_mask == 0, zeros)  # the mask back from the zeros: the sparse kernels' input
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())
