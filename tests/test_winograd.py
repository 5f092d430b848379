"""Winograd-ReLU layer: exactness against F.conv2d, gradients, model conversion, sparse inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esdbs_ray.models import ReLUConv2d, create_model, list_models
from esdbs_ray.winograd import (
    G,
    SparseWinogradInference,
    WinogradReLUConv2d,
    is_winograd_eligible,
    plot_winograd_kernels,
    to_winograd_relu,
    winograd_layers,
    winograd_relu_conv,
)

SHAPES = [  # (N, C_in, C_out, H, W): odd, degenerate and typical sizes
    (1, 3, 4, 5, 7),
    (1, 2, 3, 1, 1),
    (2, 8, 16, 28, 28),
    (1, 16, 8, 7, 7),
    (3, 5, 6, 2, 3),
    (1, 4, 4, 6, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_no_relu_equals_conv2d(shape):
    n, c, k, h, w = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False)
    x = torch.randn(n, c, h, w)
    torch.testing.assert_close(layer(x), F.conv2d(x, conv.weight, padding=1), rtol=1e-4, atol=1e-5)


def test_from_conv2d_with_bias_equals_conv2d():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=True)
    nn.init.normal_(conv.bias)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False)
    assert layer.bias is not None
    x = torch.randn(2, 6, 9, 4)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)


def test_relu_is_applied_in_winograd_domain():
    # With ReLU the layer is A^T[U ⊙ ReLU(B^T d B)]A, not conv(relu(x)): on a nonnegative input the
    # transformed tile still has negative entries, so the two must differ; on a constant input every
    # tile transform is nonnegative-or-zero except the ones ReLU clips, so check against eq. 2 directly.
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=True)
    x = torch.rand(1, 3, 4, 4)  # nonnegative: spatial relu is the identity
    y = layer(x)
    assert not torch.allclose(y, conv(x), atol=1e-4)
    # Reference eq. 2 on the single 4x4 tile that produces the top-left 2x2 output block.
    BT = torch.tensor([[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
    AT = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])
    d = F.pad(x, (1, 1, 1, 1))[0, :, 0:4, 0:4]  # (C, 4, 4)
    v = torch.relu(BT @ d @ BT.T)
    u = layer.kernels_4x4()  # (K, C, 4, 4)
    ref = torch.einsum("ia,kcab,jb->kij", AT, u * v.unsqueeze(0), AT)
    torch.testing.assert_close(y[0, :, 0:2, 0:2], ref, rtol=1e-4, atol=1e-5)


def test_kernels_4x4_is_G_g_GT():
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv)
    ref = torch.einsum("ia,kcab,jb->kcij", G, conv.weight.detach(), G)
    torch.testing.assert_close(layer.kernels_4x4(), ref)
    assert layer.weight.shape == (16, 3, 2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("hw", [(5, 3), (4, 4), (1, 2)])
def test_gradcheck(relu, hw):
    torch.manual_seed(3)
    x = torch.randn(2, 2, *hw, dtype=torch.float64, requires_grad=True)
    u = torch.randn(16, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u, b: winograd_relu_conv(x, u, b, relu), (x, u, b))


def test_gradcheck_channels_last_input():
    torch.manual_seed(4)
    x = torch.randn(1, 3, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    u = torch.randn(16, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u: winograd_relu_conv(x, u, None, True), (x, u))


@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])
def test_output_allows_inplace_ops(hw):
    # e.g. nn.ReLU(inplace=True) right after the layer: the output must not be a Function-made view
    torch.manual_seed(10)
    layer = WinogradReLUConv2d(3, 4)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    y = layer(x)
    y.relu_().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_fresh_init_matches_spatial_kaiming_scale():
    torch.manual_seed(5)
    layer = WinogradReLUConv2d(64, 64)
    # kaiming fan_out on the 3x3 kernel: std sqrt(2 / (9 * 64)); the corner Winograd positions are
    # exactly g's corners, so they carry that std.
    corners = layer.kernels_4x4()[:, :, [0, 0, 3, 3], [0, 3, 0, 3]]
    assert abs(corners.std().item() - (2 / (9 * 64)) ** 0.5) < 0.01


@pytest.mark.parametrize(
    "conv, word",
    [
        (nn.Conv2d(3, 3, 5, padding=2), "kernel_size"),
        (nn.Conv2d(3, 3, 3, stride=2, padding=1), "stride"),
        (nn.Conv2d(3, 3, 3, padding=0), "padding"),
        (nn.Conv2d(3, 3, 3, padding=1, dilation=2), "dilation"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups"),
        (nn.Linear(3, 3), "Conv2d"),
    ],
)
def test_from_conv2d_rejects_unsupported(conv, word):
    with pytest.raises(ValueError, match=word):
        WinogradReLUConv2d.from_conv2d(conv)


def test_wrong_input_channels_raise():
    layer = WinogradReLUConv2d(3, 4)
    with pytest.raises(ValueError, match="weight"):
        layer(torch.randn(1, 5, 4, 4))


def _model(name: str):
    if name == "resnet50":
        return create_model(name, num_classes=10, in_channels=3, image_size=32, width=1.0), (2, 3, 32, 32)
    return create_model(name, num_classes=10, in_channels=1, image_size=28, width=0.25), (2, 1, 28, 28)


@pytest.mark.parametrize("name", list_models())
def test_to_winograd_relu_every_registry_model(name):
    torch.manual_seed(0)
    model, shape = _model(name)
    eligible = [n for n, m in model.named_modules() if is_winograd_eligible(m)]
    kept_relu = {n for n, m in model.named_modules() if isinstance(m, ReLUConv2d) and not is_winograd_eligible(m)}
    stems = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    assert eligible and stems

    assert to_winograd_relu(model) is model
    converted = winograd_layers(model)
    assert [n for n, _ in converted] == eligible
    assert all(m.relu for _, m in converted)
    # stem and non-eligible convs are untouched
    modules = dict(model.named_modules())
    for n, m in stems.items():
        assert modules[n] is m
    assert {n for n, m in modules.items() if isinstance(m, ReLUConv2d)} == kept_relu
    assert not any(is_winograd_eligible(m) for m in model.modules())

    x = torch.randn(*shape)
    out = model(x)
    assert out.shape == (shape[0], 10)
    out.logsumexp(1).sum().backward()
    for _, m in converted:
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
        assert m.weight.grad.abs().sum() > 0


def test_to_winograd_relu_keeps_strided_and_1x1_spatial():
    model = create_model("all_cnn_c", num_classes=10, in_channels=1, image_size=28, width=0.25)
    to_winograd_relu(model)
    kinds = [(tuple(m.kernel_size), tuple(m.stride)) for m in model.modules() if isinstance(m, ReLUConv2d)]
    assert ((3, 3), (2, 2)) in kinds and ((1, 1), (1, 1)) in kinds
    assert ((3, 3), (1, 1)) not in kinds


@pytest.mark.parametrize("shape", [(2, 8, 16, 7, 7), (1, 3, 4, 5, 8)])
def test_sparse_inference_matches_layer(shape):
    n, c, k, h, w = shape
    torch.manual_seed(6)
    layer = WinogradReLUConv2d(c, k, bias=True)
    nn.init.normal_(layer.bias)
    mask = (torch.rand_like(layer.weight) > 0.75).float()
    mask[5] = 0  # one tile position entirely pruned: skipped by the CSR path
    layer.register_buffer("weight_mask", mask)
    with torch.no_grad():
        layer.weight.mul_(mask)
    x = torch.randn(n, c, h, w)
    ref = layer(x)
    for mode in ("csr", "dense"):
        sp = SparseWinogradInference(layer, mode=mode)
        torch.testing.assert_close(sp(x), ref, rtol=1e-4, atol=1e-5)
    assert SparseWinogradInference(layer).nnz == int(mask.sum())


def test_autocast_cpu_bf16():
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_conv():
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda()
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False)
    x = torch.randn(4, 16, 13, 9, device="cuda")
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad is not None


def _black_pixels(img: np.ndarray) -> int:
    return int((img.sum(axis=2) == 0).sum())


def test_plot_winograd_kernels(tmp_path):
    torch.manual_seed(9)
    k = torch.randn(8, 8, 4, 4)
    pruned = k * (torch.rand_like(k) > 0.6)
    path = tmp_path / "k.png"
    img = plot_winograd_kernels({0.0: k, 0.6: pruned}, path)
    assert path.stat().st_size > 0
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    # zeros are drawn black: same layout and title, more black pixels when entries are pruned
    dense_img = plot_winograd_kernels({0.0: k}, None)
    pruned_img = plot_winograd_kernels({0.0: pruned}, None)
    assert dense_img.shape == pruned_img.shape
    assert _black_pixels(pruned_img) > _black_pixels(dense_img) + 100
    # a layer is accepted too
    assert plot_winograd_kernels(WinogradReLUConv2d(3, 2), tmp_path / "l.png").ndim == 3
