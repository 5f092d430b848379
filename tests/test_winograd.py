"""Winograd-ReLU layer: exactness against F.conv2d, gradients, model conversion, sparse inference,
the functional and compiled (fused) implementations and their automatic choice."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esdbs_ray.winograd as wg
import esdbs_ray.winograd_dispatch as wd
import esdbs_ray.winograd_math as wm
import esdbs_ray.winograd_native as native
from esdbs_ray.models import ReLUConv2d, StemConv2d, create_model, list_models
from esdbs_ray.winograd import (
    G,
    SparseWinogradInference,
    WinogradReLUConv2d,
    is_winograd_eligible,
    to_winograd_relu,
    winograd_layers,
    winograd_relu_conv,
)
from esdbs_ray.analysis.figures import plot_winograd_kernels

def _native_gemm() -> bool:
    try:
        return bool(native.library().esdbs_wino_has_gemm())
    except native.NativeUnavailable:
        return False


# the implementations that run eagerly without compiling: the C++ kernels (the CPU default) and the
# hand-written reference
EAGER_IMPLS = ["native", "reference"]

SHAPES = [  # (N, C_in, C_out, H, W): odd, degenerate and typical sizes
    (1, 3, 4, 5, 7),
    (1, 2, 3, 1, 1),
    (2, 8, 16, 28, 28),
    (1, 16, 8, 7, 7),
    (3, 5, 6, 2, 3),
    (1, 4, 4, 6, 1),
]


@pytest.mark.parametrize("impl", EAGER_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_no_relu_equals_conv2d(shape, impl):
    n, c, k, h, w = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False, impl=impl)
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


@pytest.mark.parametrize("impl", EAGER_IMPLS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("hw", [(5, 3), (4, 4), (1, 2)])
def test_gradcheck(relu, hw, impl):
    torch.manual_seed(3)
    x = torch.randn(2, 2, *hw, dtype=torch.float64, requires_grad=True)
    u = torch.randn(16, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u, b: winograd_relu_conv(x, u, b, relu, impl), (x, u, b))


@pytest.mark.parametrize("impl", EAGER_IMPLS)
def test_gradcheck_channels_last_input(impl):
    torch.manual_seed(4)
    x = torch.randn(1, 3, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    u = torch.randn(16, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u: winograd_relu_conv(x, u, None, True, impl), (x, u))


@pytest.mark.parametrize("impl", EAGER_IMPLS)
@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])
def test_output_allows_inplace_ops(hw, impl):
    # e.g. nn.ReLU(inplace=True) right after the layer: the output must not be a Function-made view
    torch.manual_seed(10)
    layer = WinogradReLUConv2d(3, 4, impl=impl)
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
    stems = {n: m for n, m in model.named_modules() if type(m) in (nn.Conv2d, StemConv2d)}
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


@pytest.mark.parametrize("shape", [(2, 8, 16, 7, 7), (1, 3, 4, 5, 8), (18, 5, 9, 6, 7)])
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
    for mode in ("native", "csr", "dense"):  # native: the sparse kernels; csr, dense: references
        sp = SparseWinogradInference(layer, mode=mode)
        torch.testing.assert_close(sp(x), ref, rtol=1e-4, atol=1e-5)
    assert SparseWinogradInference(layer).nnz == int(mask.sum())
    assert SparseWinogradInference(layer).structure.skipped == (5,)
    layer.out_relu = True  # a following ReLU moved into the layer (prepare_for_inference)
    for mode in ("native", "csr", "dense"):
        torch.testing.assert_close(SparseWinogradInference(layer, mode=mode)(x), torch.relu(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_out_relu_is_relu_after_the_bias(impl):
    """A layer with out_relu (a following ReLU moved in) computes relu(conv + bias), with gradients
    in training and in its output transform's epilogue in inference."""
    torch.manual_seed(9)
    layer = WinogradReLUConv2d(6, 7, bias=True, impl=impl)
    nn.init.normal_(layer.bias)
    x = torch.randn(17, 6, 5, 6, requires_grad=True)
    want = torch.relu(layer(x))
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    layer.out_relu = True
    got = layer(x)
    (gx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, gx_want)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want.detach(), rtol=1e-5, atol=1e-5)
    assert "out_relu=True" in repr(layer)


def test_autocast_cpu_bf16():
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    # (the reference: "auto" would compile the layer for bf16 training on CPU, 10 s for this test)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False, impl="reference")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_cuda_autocast_matches_conv(impl):
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda()
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False, impl=impl)
    x = torch.randn(4, 16, 13, 9, device="cuda")
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_matches_reference():
    torch.manual_seed(16)
    x = torch.randn(6, 16, 13, 9, device="cuda")
    u = torch.randn(16, 16, 24, device="cuda") * (torch.rand(16, 16, 24, device="cuda") > 0.5)
    gy = torch.randn(6, 24, 13, 9, device="cuda")
    for a, b in zip(_fwd_bwd("fused", x, u, True, gy), _fwd_bwd("reference", x, u, True, gy)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # "auto" runs the fused layer for inference on CUDA
        assert wg.choose_impl(x, u, "auto") == "fused"


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


# ------------------------------------------------------------------------------------------------
# functional formulation (what torch.compile traces), implementation choice, the fused layer
# ------------------------------------------------------------------------------------------------
def _fwd_bwd(impl, x, u, relu, gy, bias=None):
    x = x.detach().requires_grad_()
    u = u.detach().requires_grad_()
    y = winograd_relu_conv(x, u, bias, relu, impl)
    dx, du = torch.autograd.grad(y, (x, u), gy)
    return y.detach(), dx, du


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("hw", [(5, 3), (4, 4), (1, 2)])
def test_functional_gradcheck(relu, hw):
    # the functional path's backward is written out (not derived by autograd): check it numerically
    torch.manual_seed(3)
    x = torch.randn(2, 2, *hw, dtype=torch.float64, requires_grad=True)
    u = torch.randn(16, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u, b: winograd_relu_conv(x, u, b, relu, "functional"), (x, u, b))


@pytest.mark.parametrize("impl", ["functional", "native"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_impl_matches_reference(shape, relu, impl):
    n, c, k, h, w = shape
    torch.manual_seed(11)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    u = torch.randn(16, c, k)
    gy = torch.randn(n, k, h, w)
    ref = _fwd_bwd("reference", x, u, relu, gy)
    out = _fwd_bwd(impl, x, u, relu, gy)
    for a, b in zip(out, ref):
        # float32 sums of up to N * tiles terms in another order (the native GEMMs): tolerance relative
        # to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))
    assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(3, 17, 19, 9, 11), (2, 1, 2, 4, 4)], ids=lambda s: "x".join(map(str, s)))
def test_native_matches_reference_in_float64(shape, relu):
    """float64, so only real differences show: NCHW input, a pruned U with a whole tile position at 0,
    a bias, and channel counts off the vector width (17, 19)."""
    n, c, k, h, w = shape
    torch.manual_seed(17)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    u = torch.randn(16, c, k, dtype=torch.float64) * (torch.rand(16, c, k, dtype=torch.float64) > 0.5)
    u[3] = 0
    b = torch.randn(k, dtype=torch.float64)
    gy = torch.randn(n, k, h, w, dtype=torch.float64)
    for a, r in zip(_fwd_bwd("native", x, u, relu, gy, b), _fwd_bwd("reference", x, u, relu, gy, b)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_native_takes_any_incoming_gradient_layout():
    # y.sum().backward() hands the layer an expanded (stride-0) gradient; a spatial layer after it an
    # NCHW one: both are copied into the layout the kernels read, never read wrongly
    torch.manual_seed(18)
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    u = torch.randn(16, 4, 7, requires_grad=True)
    for impl in ("native", "reference"):
        x.grad = u.grad = None
        winograd_relu_conv(x, u, impl=impl).sum().backward()
        if impl == "native":
            got = (x.grad.clone(), u.grad.clone())
    torch.testing.assert_close(got[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], u.grad, rtol=1e-5, atol=1e-5)
    gy = torch.randn(3, 7, 5, 6).transpose(2, 3).contiguous().transpose(2, 3)  # neither NCHW nor NHWC
    for a, r in zip(_fwd_bwd("native", x, u, True, gy), _fwd_bwd("reference", x, u, True, gy)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("n", [5, 21])  # fewer images than the fused backward's 16 groups, and more
def test_native_result_does_not_depend_on_the_thread_count(monkeypatch, mode, n):
    """Every output element of every pass is computed by one thread in one order (images, rows of
    tiles, output blocks of the GEMMs, the fused backward's dU groups are the units of work), so with
    the library's own GEMMs the layer gives the same bits at any thread count; with torch.bmm the
    same up to MKL's rounding."""
    monkeypatch.setenv(native.MODE_ENV, mode)
    torch.manual_seed(19)
    x = torch.randn(n, 8, 9, 9)
    u = torch.randn(16, 8, 70)  # 70 output channels: two GEMM column blocks, a masked tail
    gy = torch.randn(n, 70, 9, 9)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(_fwd_bwd("native", x, u, True, gy))
            assert torch.equal(outs[-1][2], _fwd_bwd("native", x, u, True, gy)[2])  # and run to run
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            if native.path(torch.float32, 8, 70, n * 25) != "bmm":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


needs_native_gemm = pytest.mark.skipif(not _native_gemm(), reason="the native GEMMs are compiled for AVX-512 CPUs only")


@needs_native_gemm
@pytest.mark.parametrize("t, n, k", [(1, 1, 1), (5, 3, 7), (239, 17, 16), (241, 24, 33), (487, 48, 48),
                                     (100, 64, 49), (50, 96, 96), (13, 130, 65), (300, 8, 129)])
def test_native_gemms_match_float64(t, n, k):
    """Both GEMMs against float64: row counts off the micro-tile heights (tails of 8/4/2/1 rows),
    widths across the 16/32/48/64-column block shapes and past one block, reductions of 1 to 130."""
    torch.manual_seed(20)
    lib = native.library()
    a, b, g = torch.randn(16, t, n), torch.randn(16, n, k), torch.randn(16, t, k)
    nn_ = native._bmm(lib, 2, a, b)
    tn = native._bmm_tn(lib, 2, a, g)
    eps = torch.finfo(torch.float32).eps
    for got, exact, bound, terms in ((nn_, a.double() @ b.double(), a.double().abs() @ b.double().abs(), n),
                                     (tn, a.double().transpose(1, 2) @ g.double(),
                                      a.double().abs().transpose(1, 2) @ g.double().abs(), t)):
        # float32 summation of `terms` products: |error| <= terms * eps * sum |products| (any order);
        # a wrong element (a missed or doubled term, a masked lane) is off by a whole product
        err = (got.double() - exact).abs()
        assert float((err - terms * eps * bound).max()) <= 0, float((err / bound.clamp_min(1e-30)).max())


@needs_native_gemm
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 6, 7, 9), (1, 2, 3, 1, 1), (20, 16, 16, 8, 8), (2, 24, 24, 28, 28),
                                   (17, 3, 70, 5, 5), (1, 128, 128, 40, 40), (2, 8, 8, 1, 30)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_native_layer_matches_float64(shape, relu, monkeypatch):
    """The fused layer (band by band, V computed again in the backward) against the reference in
    float64: odd sizes, one image and more than the 16 dU groups, bands spanning images (small
    images) and images spanning bands (128 channels at 40x40), a masked channel tail."""
    n, c, k, h, w = shape
    monkeypatch.setenv(native.MODE_ENV, "fused")  # also where "auto" would not (too few tiles)
    assert native.path(torch.float32, c, k, 1) == "fused"
    torch.manual_seed(22)
    x, u, gy = torch.randn(n, c, h, w), torch.randn(16, c, k) * (torch.rand(16, c, k) > 0.3), torch.randn(n, k, h, w)
    got = _fwd_bwd("native", x, u, relu, gy)
    exact = _fwd_bwd("reference", x.double(), u.double(), relu, gy.double())
    for a, b in zip(got, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


@needs_native_gemm
def test_fused_native_layer_saves_its_input_not_v():
    """The fused forward keeps x (N*H*W*C values) for the backward, not V (16 per 2x2 tile, 4x x)."""
    x = torch.randn(8, 8, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert native.path(torch.float32, 8, 12, 8 * 10 * 10) == "fused"  # auto's choice here
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = winograd_relu_conv(x, torch.randn(16, 8, 12, requires_grad=True), impl="native")
    assert sorted(saved) == sorted([x.numel(), 16 * 8 * 12])
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@needs_native_gemm
def test_fused_backward_without_one_of_the_gradients(monkeypatch):
    monkeypatch.setenv(native.MODE_ENV, "fused")
    torch.manual_seed(23)
    x, u, gy = torch.randn(3, 6, 7, 7), torch.randn(16, 6, 5), torch.randn(3, 5, 7, 7)
    ref = _fwd_bwd("reference", x, u, True, gy)
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(winograd_relu_conv(xg, u, impl="native"), (xg,), gy)  # a frozen U
    ug = u.clone().requires_grad_()
    (du,) = torch.autograd.grad(winograd_relu_conv(x, ug, impl="native"), (ug,), gy)  # the first layer
    torch.testing.assert_close(dx, ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(du, ref[2], rtol=1e-4, atol=1e-4)


def test_native_modes(monkeypatch):
    torch.manual_seed(21)
    x, u, gy = torch.randn(3, 5, 6, 7), torch.randn(16, 5, 9), torch.randn(3, 9, 6, 7)
    auto = _fwd_bwd("native", x, u, True, gy)
    tiles = 3 * 3 * 4  # N * ceil(H/2) * ceil(W/2)
    if _native_gemm():  # auto: fused with enough tiles per output channel, unfused with few
        assert native.path(torch.float32, 5, 9, 64 * 9) == "fused"
        assert native.path(torch.float32, 5, 9, 64 * 9 - 1) == "unfused"
        assert native.path(torch.float32, 129, 128, 1 << 30) == "unfused"  # C * K past the fused limit
    for mode, path in (("fused", "fused"), ("unfused", "unfused"), ("bmm", "bmm")):
        monkeypatch.setenv(native.MODE_ENV, mode)
        assert native.path(torch.float32, 5, 9, tiles) == (path if _native_gemm() else "bmm")
        for a, b in zip(_fwd_bwd("native", x, u, True, gy), auto):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert native.path(torch.float64, 5, 9) == "bmm"
    monkeypatch.setenv(native.MODE_ENV, "mkl")
    with pytest.raises(ValueError, match="ESDBS_NATIVE_MODE must be one of auto, fused, unfused, bmm; got 'mkl'"):
        _fwd_bwd("native", x, u, True, gy)


@pytest.mark.parametrize("mode", ["fused", "unfused", "bmm"])
def test_native_lets_nan_through_like_the_reference(monkeypatch, mode):
    """ReLU(NaN) is NaN in torch: a diverged activation must reach the loss (the trainer's divergence
    guard looks for it), not come out of the layer as zeros."""
    monkeypatch.setenv(native.MODE_ENV, mode)
    x, u = torch.randn(2, 3, 6, 6), torch.randn(16, 3, 4)
    x[0, 1, 2, 3] = float("nan")
    ref, got = (winograd_relu_conv(x, u, impl=i) for i in ("reference", "native"))
    assert torch.isnan(got).any()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))


@pytest.mark.parametrize("mode", ["fused", "unfused", "bmm"])
def test_native_empty_batch(monkeypatch, mode):
    """N = 0 (an empty last shard, say): an empty output and a zero weight gradient, as torch gives."""
    monkeypatch.setenv(native.MODE_ENV, mode)
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    u = torch.randn(16, 3, 4, requires_grad=True)
    y = winograd_relu_conv(x, u, impl="native")
    assert y.shape == (0, 4, 6, 6)
    dx, du = torch.autograd.grad(y, (x, u), torch.randn(0, 4, 6, 6))
    assert dx.shape == x.shape and torch.equal(du, torch.zeros_like(u))


def test_native_refuses_double_backward():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    u = torch.randn(16, 3, 4, requires_grad=True)
    # a gradient penalty: the second derivative would go through the kernels, which autograd cannot
    # see; an error, not a silently missing term
    (dx,) = torch.autograd.grad((winograd_relu_conv(x, u, impl="native") ** 2).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dx.square().sum().backward()


def test_native_refuses_what_it_does_not_compute():
    x = torch.randn(2, 3, 4, 4)
    u = torch.randn(16, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="impl 'native' runs float32 / float64 on CPU; got torch.bfloat16"):
            winograd_relu_conv(x, u, impl="native")
        assert winograd_relu_conv(x, u, impl="auto").dtype == torch.bfloat16  # auto takes another impl
    with pytest.raises(ValueError, match="native"):
        winograd_relu_conv(x.half(), u.half(), impl="native")


def test_choose_impl_policy(monkeypatch, fresh_fused_state):
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    u = torch.randn(16, 3, 5, requires_grad=True)
    monkeypatch.setenv(wg.IMPL_ENV, "auto")
    assert wg.choose_impl(x, u) == "native"  # CPU training step
    assert wg.choose_impl(x[:1], u) == "native"  # no compiled graph to specialise
    with torch.no_grad():
        assert wg.choose_impl(x, u) == "native"  # CPU inference: nothing to compile either
    assert wg.choose_impl(x.double(), u.double()) == "native"
    # other dtypes (CPU autocast's bf16): the compiled layer for training, the reference for inference
    assert wg.choose_impl(x, u, dtype=torch.bfloat16) == "fused"
    assert wg.choose_impl(x.detach(), u.detach(), dtype=torch.bfloat16) == "reference"
    for impl in ("native", "reference", "functional", "fused", "triton"):
        assert wg.choose_impl(x, u, impl) == impl
    monkeypatch.setenv(wg.IMPL_ENV, "Functional")
    assert wg.choose_impl(x, u) == "functional" and wg.choose_impl(x, u, "auto") == "native"
    monkeypatch.setenv(wg.IMPL_ENV, "cudnn")
    with pytest.raises(ValueError, match=wg.IMPL_ENV):
        wg.choose_impl(x, u)
    with pytest.raises(ValueError, match="impl"):
        wg.choose_impl(x, u, "fast")
    with pytest.raises(ValueError, match="impl"):
        WinogradReLUConv2d(3, 4, impl="fast")


def test_choose_impl_without_the_native_kernels(monkeypatch, fresh_fused_state):
    """No C++ compiler for the native kernels: one warning, then the compiled layer for CPU training
    and the reference for inference and a batch of one, as before the native kernels existed."""
    def unavailable():
        raise native.NativeUnavailable("no C++ compiler found (set $CXX, or install g++)")

    monkeypatch.setattr(native, "library", unavailable)
    monkeypatch.setenv(wg.IMPL_ENV, "auto")
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    u = torch.randn(16, 3, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable .no C.. compiler found"):
        assert wg.choose_impl(x, u) == "fused"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert wg.choose_impl(x[:1], u) == "reference"
        with torch.no_grad():
            assert wg.choose_impl(x, u) == "reference"
        with pytest.raises(native.NativeUnavailable, match="compiler"):
            winograd_relu_conv(x, u, impl="native")  # asked for explicitly: the reason surfaces


@pytest.mark.parametrize("impl", ["native", "reference", "functional", "fused", "auto"])
def test_bad_input_raises_for_every_impl(impl):
    u = torch.randn(16, 3, 4)
    with pytest.raises(ValueError, match="weight"):
        winograd_relu_conv(torch.randn(2, 5, 4, 4), u, impl=impl)
    with pytest.raises(ValueError, match="4-D"):
        winograd_relu_conv(torch.randn(3, 4, 4), u, impl=impl)
    with pytest.raises(ValueError, match="dtype"):
        winograd_relu_conv(torch.randn(2, 3, 4, 4, dtype=torch.float64), u, impl=impl)


@pytest.fixture
def fresh_fused_state():
    wd._reset_fused_state()
    yield
    wd._reset_fused_state()


def test_failed_compile_falls_back_with_one_warning(monkeypatch, fresh_fused_state):
    attempts = []

    def broken_entry(key, relu, dtype):
        attempts.append(key)

        def run(x, u):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(wd, "_fused_entry", broken_entry)
    monkeypatch.setattr(wd, "_native_available", lambda: False)  # auto trains on the compiled layer
    monkeypatch.setenv(wg.IMPL_ENV, "auto")
    torch.manual_seed(12)
    layer = WinogradReLUConv2d(3, 4)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="reference implementation"):
        y = layer(x)
    torch.testing.assert_close(y, winograd_relu_conv(x, layer.weight, impl="reference"))
    y.sum().backward()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning, no second attempt: the device is marked as failing
    assert len(attempts) == 1
    with pytest.raises(RuntimeError, match="InvalidCxxCompiler"):
        winograd_relu_conv(x, layer.weight, impl="fused")  # asked for explicitly: the error surfaces


@pytest.fixture(scope="module")
def fused_runs():
    """The compiled layer, two variants compiled once for the module (~20 s each on 2 cores with a cold
    inductor cache, ~3 s warm): relu on an odd size with a pruned U and two batch sizes; relu off
    on an even size with U = G g G^T."""
    from torch._dynamo.utils import counters

    wd._reset_fused_state()
    torch.manual_seed(13)
    c, k = 5, 6
    u = torch.randn(16, c, k)
    mask = (torch.rand_like(u) > 0.6).float()
    mask[7] = 0  # a whole tile position pruned
    u = u * mask
    runs = {"pruned": []}
    graphs0 = counters["stats"]["unique_graphs"]
    for n in (3, 6):  # the second batch size must reuse the compiled graph
        x = torch.randn(n, c, 7, 5)  # NCHW input, odd size
        gy = torch.randn(n, k, 7, 5)
        runs["pruned"].append(((x, u, gy), _fwd_bwd("fused", x, u, True, gy), _fwd_bwd("reference", x, u, True, gy)))
    runs["graphs_for_two_batch_sizes"] = counters["stats"]["unique_graphs"] - graphs0
    runs["compiles_for_two_batch_sizes"] = len(wg.fused_compile_log())
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    layer = WinogradReLUConv2d.from_conv2d(conv, relu=False)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 8, 6, 6)
    runs["no_relu"] = ((x, conv, layer.weight.detach(), gy),
                       _fwd_bwd("fused", x, layer.weight, False, gy), _fwd_bwd("reference", x, layer.weight, False, gy))
    runs["log"] = wg.fused_compile_log()
    yield runs
    wd._reset_fused_state()


def test_fused_matches_reference_pruned_odd_size(fused_runs):
    for _, fused, ref in fused_runs["pruned"]:
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fused_runs["pruned"][0][1][0].is_contiguous(memory_format=torch.channels_last)
    # the pruned position gets a weight gradient like any other (the mask is the trainer's business)
    assert fused_runs["pruned"][0][1][2][7].abs().sum() > 0


def test_fused_batch_size_change_does_not_recompile(fused_runs):
    assert fused_runs["compiles_for_two_batch_sizes"] == 1
    assert fused_runs["graphs_for_two_batch_sizes"] == 1
    assert [r["key"][-1] for r in fused_runs["log"]] == ["train", "train"]


def test_fused_without_relu_equals_conv2d(fused_runs):
    (x, conv, u, gy), fused, ref = fused_runs["no_relu"]
    xg = x.detach().requires_grad_()
    y = F.conv2d(xg, conv.weight, padding=1)
    (dx,) = torch.autograd.grad(y, (xg,), gy)
    torch.testing.assert_close(fused[0], y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1], dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-4, atol=1e-5)


def _swr_model(name: str):
    if name == "resnet50":
        model = create_model(name, num_classes=10, in_channels=3, image_size=32, width=1.0)
        shape = (4, 3, 32, 32)
    else:
        model = create_model(name, num_classes=10, in_channels=1, image_size=28, width=0.125)
        shape = (4, 1, 28, 28)
    return to_winograd_relu(model).double(), shape


def _sgd_step(model, x, y, lr=0.05):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        torch._foreach_add_([p for p in model.parameters()], [p.grad for p in model.parameters()], alpha=-lr)
    return loss.detach()


# Opt-in: torchvision's full-width ResNet-50 takes 70-100 s to trace on 2 loaded cores, and the
# inductor compile of a whole model 30 s (warm cache) to 5 min (cold); the layer's own compiled path
# is covered above.  ESDBS_TEST_HEAVY=1 runs them.
HEAVY = os.environ.get("ESDBS_TEST_HEAVY") == "1"
heavy = pytest.mark.skipif(not HEAVY, reason="heavy compile test: set ESDBS_TEST_HEAVY=1")
# dynamo traces loss.backward() inside a fullgraph compile only with this switch (torch >= 2.9 or so)
traces_backward = pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                                     reason="this torch cannot trace backward() in a fullgraph compile")


@traces_backward
# resnet32 (28 s to trace on a loaded core: 31 layers of the same op kinds as the others) and resnet50
# under ESDBS_TEST_HEAVY=1; every other registry model, and any new one, in the default suite.
@pytest.mark.parametrize("name", [pytest.param(n, marks=heavy) if n in ("resnet50", "resnet32") else n
                                  for n in list_models()])
def test_training_step_compiles_fullgraph(name):
    """forward + backward + SGD step of every SWR registry model as one graph: no graph break, no
    functionalisation error (AOTAutograd traces forward and backward as for inductor), and the step
    computes what the eager reference computes (float64, so only real differences show)."""
    import copy

    torch._dynamo.reset()  # each model's step gets fresh cache entries, never a recompile-limit fallback
    torch.manual_seed(14)
    model, shape = _swr_model(name)
    model.train()
    eager = copy.deepcopy(model)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 10, (shape[0],))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss = torch.compile(_sgd_step, fullgraph=True, backend="aot_eager")(model, x, y)
    ref = _sgd_step(eager, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=n)
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=n)


def test_layer_is_one_graph_node_though_dynamo_is_imported_after_the_package():
    """Importing the package leaves dynamo unimported (1.6-2 s of the start of every process that
    neither compiles nor trains, such as the `esdbs run` driver), and a later compile still sees the
    layer as one node (allow_in_graph), not traced through."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import esdbs_ray.winograd as wg, esdbs_ray.trainable\n"
        "assert 'torch._dynamo' not in sys.modules, 'importing the package imported dynamo'\n"
        "graphs = []\n"
        "def backend(gm, inputs):\n"
        "    graphs.append(gm)\n"
        "    return gm.forward\n"
        "layer = wg.WinogradReLUConv2d(3, 4, impl='functional')\n"
        "torch.compile(layer, fullgraph=True, backend=backend)(torch.randn(2, 3, 6, 6))\n"
        "print(sorted(getattr(n.target, '__name__', str(n.target)) for n in graphs[0].graph.nodes\n"
        "             if n.op == 'call_function'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'_winograd_traceable'" in r.stdout, r.stdout


def test_failed_dynamo_registration_warns_and_the_import_goes_on(monkeypatch):
    """The hook's loader runs the real loader, then registers; a registration that fails costs a
    warning, never the caller's import of dynamo."""
    import types

    ran = []

    class Loader:
        def exec_module(self, module):
            ran.append(module.__name__)

        def get_source(self, name):
            return "# source"

    def broken():
        raise RuntimeError("registry moved")

    monkeypatch.setattr(wm, "_allow_traceable_in_graph", broken)
    loader = wm._RegisterAfterExec(Loader())
    with pytest.warns(RuntimeWarning, match="registering the layer with dynamo failed.*registry moved"):
        loader.exec_module(types.ModuleType("fake_dynamo"))
    assert ran == ["fake_dynamo"] and loader.get_source("x") == "# source"  # the real loader's methods


@heavy
@traces_backward
def test_training_step_of_small_model_compiles_with_inductor():
    """The same step compiled for real (inductor kernels for the whole model) against eager."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(15)
    model = to_winograd_relu(create_model("all_cnn_c", num_classes=10, in_channels=1, image_size=28, width=0.125))
    model.train()
    eager = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss = torch.compile(_sgd_step, fullgraph=True)(model, x, y)
    ref = _sgd_step(eager, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * float(q.grad.abs().max()), msg=n)
