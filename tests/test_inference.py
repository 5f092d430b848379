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
    prepared = prepare_for_inference(copy.deepcopy(model))  # folded, ReLUs moved in, stems channels-last
    with torch.inference_mode():
        got = prepared(torch.cat([x] * 5))  # 20 images: a whole group of 16 in the sparse kernels' lanes
    torch.testing.assert_close(got[:4], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


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


def test_relus_move_into_winograd_layers_and_stems_run_channels_last():
    """prepare_for_inference: an nn.ReLU or a ReLUConv2d's input ReLU right after a Winograd-ReLU layer
    moves into the layer (its output transform applies it), a single-channel stem runs as a
    channels-last two-channel convolution, and the network computes what it computed, pruned or not,
    on the sparse kernels or the dense ones."""
    from esdbs_ray.inference import ChannelsLastStem
    from esdbs_ray.models import ReLUConv2d
    from esdbs_ray.winograd import winograd_layers

    for name, moved in (("alexnet", 1), ("all_cnn_c", 3), ("convpool_cnn_c", 1)):
        model = _with_statistics(build_network(name, num_classes=10, in_channels=1, image_size=28, width=0.25,
                                               conv="winograd_relu"), seed=3)
        with torch.no_grad():
            for _, layer in winograd_layers(model):
                layer.weight.mul_((torch.rand_like(layer.weight) > 0.8).float())  # 80 % pruned
        x = torch.randn(19, 1, 28, 28)
        with torch.no_grad():
            want = model(x)
        prepared = prepare_for_inference(copy.deepcopy(model))
        assert sum(layer.out_relu for _, layer in winograd_layers(prepared)) == moved
        assert sum(isinstance(m, ChannelsLastStem) for m in prepared.modules()) == 1
        relu_convs = sum(type(m) is ReLUConv2d for m in model.modules())
        assert sum(type(m) is ReLUConv2d for m in prepared.modules()) == relu_convs - (moved if name != "alexnet" else 0)
        for sparse in ("on", "off"):
            with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
                mp.setenv("ESDBS_NATIVE_SPARSE", sparse)
                got = prepared(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert all(layer.ran["inference"].startswith("native") for _, layer in winograd_layers(prepared))
        assert prepared(x[:0]).shape == (0, 10)  # an empty batch


def test_channels_last_stem():
    from esdbs_ray.inference import ChannelsLastStem
    from esdbs_ray.models import ReLUConv2d

    torch.manual_seed(4)
    for conv in (nn.Conv2d(1, 24, 3, padding=1), ReLUConv2d(1, 16, 5, padding=2, bias=False),
                 nn.Conv2d(1, 8, 3, stride=2, padding=1)):
        x = torch.randn(3, 1, 11, 9)
        stem = ChannelsLastStem(conv)
        with torch.no_grad():
            want, got = conv(x), stem(x)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1-input-channel"):
        ChannelsLastStem(nn.Conv2d(2, 4, 3))
