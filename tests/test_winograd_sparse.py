"""The sparse Winograd-ReLU layer (esdbs_ray/winograd_sparse.py): the dense native layer's results on
the mask's nonzeros, forward and backward, at any density, size, batch (empty too), with and without
the ReLU, in float32 and float64, on the AVX-512 kernels and the portable ones; the same bits at any
thread count; the mask's structure rebuilt whenever the mask changes, by every route, and only then;
the automatic choice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esdbs_ray import winograd_native as native
from esdbs_ray import winograd_sparse as ws


def _lib_or_skip():
    try:
        return native.library()
    except native.NativeUnavailable as e:
        pytest.skip(f"native kernels unavailable: {e}")


@pytest.fixture(autouse=True)
def _library():
    _lib_or_skip()


def _mask(c: int, k: int, density: float, seed: int = 0, dtype=torch.float32, dead=()) -> torch.Tensor:
    """A random (16, C, K) mask keeping round(density * numel) entries; positions in `dead` all pruned."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(16 * c * k, dtype=dtype)
    keep = int(round(density * m.numel()))
    m[torch.randperm(m.numel(), generator=g)[:keep]] = 1
    m = m.view(16, c, k)
    for p in dead:
        m[p] = 0
    return m


def _sparse(x, u, mask, relu, gy, structure=None):
    """y, dx, dU of the sparse layer through autograd (its Function)."""
    s = ws.structure_for(mask) if structure is None else structure
    x = x.detach().requires_grad_()
    u = u.detach().requires_grad_()
    y = ws.WinogradSparseFn.apply(x, u, s, relu)
    dx, du = torch.autograd.grad(y, (x, u), gy)
    return y.detach(), dx, du


def _dense_native(x, u, relu, gy):
    """y, dx, dU of the dense native layer (what impl="native" runs)."""
    y, saved, fused = native.forward(x, u, relu)
    dx, du = native.backward(gy, saved, fused, u, tuple(x.shape), relu, True, True)
    return y, dx, du


def _reference(x, u, relu, gy):
    """y, dx, dU of winograd.py's reference layer in float64."""
    from esdbs_ray.winograd import winograd_relu_conv

    x = x.detach().double().requires_grad_()
    u = u.detach().double().requires_grad_()
    y = winograd_relu_conv(x, u, impl="reference", relu=relu)
    dx, du = torch.autograd.grad(y, (x, u), gy.double())
    return y.detach(), dx, du


def _assert_matches(got, want, mask, rtol=1e-4, atol_scale=2e-5):
    """got == want to float32 rounding; want's dU masked (the sparse layer's dU is 0 off the mask), and
    there exactly 0."""
    y, dx, du = got
    wy, wdx, wdu = want
    wdu = wdu * mask.to(wdu.dtype)
    for name, a, b in (("y", y, wy), ("dx", dx, wdx), ("dU", du, wdu)):
        b = b.to(a.dtype)
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * max(1.0, float(b.abs().max())), msg=name)
    assert bool((du[mask == 0] == 0).all()), "dU off the mask is not exactly 0"


SHAPES = [  # (N, C, K, H, W): odd sizes, one pixel, more channels than a column segment (128) each way
    (2, 3, 5, 5, 7),
    (1, 17, 33, 9, 11),
    (3, 8, 6, 1, 1),
    (2, 140, 24, 3, 5),
    (2, 20, 150, 6, 5),
    (5, 16, 16, 7, 4),
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_dense_native_and_float64_reference(shape, density, relu):
    n, c, k, h, w = shape
    torch.manual_seed(1)
    mask = _mask(c, k, density, seed=2)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    u = torch.randn(16, c, k) * mask  # pruned entries exactly 0, as the Pruner keeps them
    gy = torch.randn(n, k, h, w)
    got = _sparse(x, u, mask, relu, gy)
    _assert_matches(got, _dense_native(x, u, relu, gy), mask)
    _assert_matches(got, _reference(x, u, relu, gy), mask)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_float64_matches_reference_tightly(density, relu):
    """float64 runs the portable kernels: only real differences show."""
    torch.manual_seed(3)
    n, c, k, h, w = 3, 19, 140, 7, 5
    mask = _mask(c, k, density, seed=4, dtype=torch.float64, dead=(3, 9))
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    u = torch.randn(16, c, k, dtype=torch.float64) * mask
    gy = torch.randn(n, k, h, w, dtype=torch.float64)
    got = _sparse(x, u, mask, relu, gy)
    assert all(t.dtype == torch.float64 for t in got)
    _assert_matches(got, _reference(x, u, relu, gy), mask, rtol=1e-12, atol_scale=1e-12)


def test_values_off_the_mask_are_not_read():
    """The structure is the mask's; the values U's at the call.  An entry off the mask that is not 0
    (before the Pruner zeroes it) is left out, as if pruned."""
    torch.manual_seed(5)
    mask = _mask(9, 12, 0.4, seed=6)
    x, gy = torch.randn(2, 9, 6, 6), torch.randn(2, 12, 6, 6)
    u = torch.randn(16, 9, 12)
    got = _sparse(x, u, mask, True, gy)
    _assert_matches(got, _dense_native(x, u * mask, True, gy), mask)


def test_empty_batch():
    mask = _mask(6, 7, 0.5)
    x = torch.randn(0, 6, 5, 5, requires_grad=True)
    u = (torch.randn(16, 6, 7) * mask).requires_grad_()
    y = ws.WinogradSparseFn.apply(x, u, ws.structure_for(mask), True)
    assert y.shape == (0, 7, 5, 5)
    dx, du = torch.autograd.grad(y, (x, u), torch.randn(0, 7, 5, 5))
    assert dx.shape == (0, 6, 5, 5) and du.shape == (16, 6, 7)
    assert bool((du == 0).all())
    assert ws.sparse_forward(x.detach(), u.detach(), ws.structure_for(mask), False).shape == (0, 7, 5, 5)


def test_skipped_positions():
    """Positions without a nonzero are skipped; the others still computed exactly."""
    mask = _mask(10, 11, 0.6, seed=7, dead=(0, 5, 6, 15))
    s = ws.structure_for(mask)
    assert s.skipped == (0, 5, 6, 15)
    assert s.nnz == int(mask.sum()) and s.density == s.nnz / mask.numel()
    assert s.nnz_per_position == tuple(int(v) for v in mask.sum((1, 2)))
    torch.manual_seed(8)
    x, gy = torch.randn(2, 10, 9, 9), torch.randn(2, 11, 9, 9)
    u = torch.randn(16, 10, 11) * mask
    _assert_matches(_sparse(x, u, mask, True, gy), _reference(x, u, True, gy), mask)


@pytest.mark.parametrize("need", ["x", "u"])
def test_one_gradient_only(need):
    """A frozen U (dx only) or the first layer (dU only) run their own kernels: the same results."""
    torch.manual_seed(9)
    mask = _mask(12, 140, 0.3, seed=10)
    x, gy = torch.randn(3, 12, 6, 7), torch.randn(3, 140, 6, 7)
    u = torch.randn(16, 12, 140) * mask
    want = _sparse(x, u, mask, True, gy)
    xx = x.clone().requires_grad_(need == "x")
    uu = u.clone().requires_grad_(need == "u")
    y = ws.WinogradSparseFn.apply(xx, uu, ws.structure_for(mask), True)
    (g,) = torch.autograd.grad(y, (xx if need == "x" else uu,), gy)
    torch.testing.assert_close(g, want[1] if need == "x" else want[2], rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(11)
    mask = _mask(3, 4, 0.5, seed=12, dtype=torch.float64)
    s = ws.structure_for(mask)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    u = (torch.randn(16, 3, 4, dtype=torch.float64) * mask).requires_grad_()
    for relu in (False, True):
        assert torch.autograd.gradcheck(lambda x, u: ws.WinogradSparseFn.apply(x, u, s, relu), (x, u))


def test_same_bits_at_any_thread_count():
    """Bands (forward) and fixed image groups (backward) are the units of work, dU's group sums added
    in group order: the same bits at 1, 2 and 3 threads, and run to run."""
    torch.manual_seed(13)
    mask = _mask(24, 150, 0.3, seed=14)
    x, gy = torch.randn(21, 24, 9, 9), torch.randn(21, 150, 9, 9)
    u = torch.randn(16, 24, 150) * mask
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(_sparse(x, u, mask, True, gy))
            again = _sparse(x, u, mask, True, gy)
            assert all(torch.equal(a, b) for a, b in zip(outs[-1], again))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            assert torch.equal(a, b)


def test_a_broken_structure_is_caught():
    """The checks above would see a wrong structure: one nonzero dropped, or one moved, changes the
    results beyond the tolerance."""
    torch.manual_seed(15)
    mask = _mask(8, 9, 0.5, seed=16)
    x, gy = torch.randn(2, 8, 6, 6), torch.randn(2, 9, 6, 6)
    u = torch.randn(16, 8, 9) * mask
    want = _reference(x, u, True, gy)
    good = ws.SparseStructure.from_mask(mask)
    _assert_matches(_sparse(x, u, mask, True, gy, good), want, mask)
    for corrupt in ("drop", "move"):
        bad = ws.SparseStructure.from_mask(mask)
        for order in (bad.by_k(), bad.by_c()):
            if corrupt == "drop":  # the first nonzero's weight read from a pruned entry (value 0)
                off = int((mask.reshape(-1) == 0).nonzero()[0])
                order.flat[0] = off
            else:  # the first nonzero's column moved to another channel
                order.idx[0] = (int(order.idx[0]) + 1) % (9 if order is bad.by_k() else 8)
        with pytest.raises(AssertionError):
            _assert_matches(_sparse(x, u, mask, True, gy, bad), want, mask)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_portable_build_gives_the_same_results(tmp_path, capability):
    """Built for AVX2 or no vector ISA (no AVX-512 kernels: esdbs_wino_has_gemm() == 0) the sparse layer
    runs its portable loops: the same results in float32."""
    code = (
        "import torch, esdbs_ray.winograd_native as n, esdbs_ray.winograd_sparse as ws\n"
        "from esdbs_ray.winograd import winograd_relu_conv\n"
        "torch.manual_seed(0)\n"
        "m = (torch.rand(16, 20, 140) < 0.3).float()\n"
        "x, u, g = torch.randn(3, 20, 7, 6), torch.randn(16, 20, 140) * m, torch.randn(3, 140, 7, 6)\n"
        "def run(f):\n"
        "    xx, uu = x.clone().requires_grad_(), u.clone().requires_grad_()\n"
        "    y = f(xx, uu)\n"
        "    return [y.detach(), *torch.autograd.grad(y, (xx, uu), g)]\n"
        "s = ws.structure_for(m)\n"
        "got = run(lambda a, b: ws.WinogradSparseFn.apply(a, b, s, True))\n"
        "want = run(lambda a, b: winograd_relu_conv(a, b, impl='reference'))\n"
        "want[2] = want[2] * m\n"
        "for a, b in zip(got, want):\n"
        "    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)\n"
        "assert bool((got[2][m == 0] == 0).all())\n"
        "print(n.library().esdbs_wino_has_gemm(), ws.kernels_vectorised())\n"
    )
    env = {**os.environ, native.CACHE_ENV: str(tmp_path / "kernels"), "ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["0", "False"]


# --------------------------------------------------------------------------------------------------
# the inference forward: whole groups of 16 images in the lane layout, bias and ReLU in the epilogue
# --------------------------------------------------------------------------------------------------
INFER_SHAPES = [  # (N, C, K, H, W): 2 groups of 16 and a tail of 3; one group exactly; odd sizes; wide
    (35, 5, 7, 7, 9),
    (16, 24, 24, 28, 28),
    (17, 140, 20, 3, 5),
    (33, 16, 150, 1, 1),
    (20, 9, 33, 34, 3),
]


def _epilogue(y, bias, out_relu):
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return torch.relu(y) if out_relu else y


@pytest.mark.parametrize("tiles", [16, 32, 48, 64, 80, 96, 112, 128, 144, 250])
def test_forward_every_block_width(tiles):
    """The products take blocks of 16 to 128 tiles (one to eight vectors a kept weight): with one tile
    an image and a band of all the tiles, every width is run; each gives the float64 reference's
    results, and the lane layout, which cuts the tiles into other blocks, the same bits."""
    c = k = 8  # few channels: bands of 256 tiles
    torch.manual_seed(40)
    mask = _mask(c, k, 0.3, seed=41)
    x, u = torch.randn(tiles, c, 2, 2), torch.randn(16, c, k) * mask
    s = ws.structure_for(mask)
    bands = ws.sparse_forward(x, u, s, True, lanes=False)
    ref = _reference(x, u, True, torch.zeros(tiles, k, 2, 2))[0]
    torch.testing.assert_close(bands, ref.float(), rtol=1e-4, atol=2e-5 * max(1.0, float(ref.abs().max())))
    assert torch.equal(ws.sparse_forward(x, u, s, True), bands)


@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("shape", INFER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_inference_forward_lanes_and_epilogue(shape, density):
    """The lane layout gives the band layout's bits; with bias and an output ReLU the dense native
    layer's epilogue's bits, and both the float64 reference's results."""
    n, c, k, h, w = shape
    torch.manual_seed(30)
    mask = _mask(c, k, density, seed=31, dead=(4,))
    x = torch.randn(n, c, h, w)
    u = torch.randn(16, c, k) * mask
    bias = torch.randn(k)
    s = ws.structure_for(mask)
    for relu in (True, False):
        plain = ws.sparse_forward(x, u, s, relu)
        assert plain.is_contiguous(memory_format=torch.channels_last)
        ref = _reference(x, u, relu, torch.zeros(n, k, h, w))[0]
        torch.testing.assert_close(plain, ref.float(), rtol=1e-4, atol=2e-5 * max(1.0, float(ref.abs().max())))
        for b, out_relu in ((None, False), (bias, False), (None, True), (bias, True)):
            lanes = ws.sparse_forward(x, u, s, relu, b, out_relu)
            bands = ws.sparse_forward(x, u, s, relu, b, out_relu, lanes=False)
            assert torch.equal(lanes, bands)
            assert torch.equal(lanes, _epilogue(plain, b, out_relu))  # the epilogue: torch's ops, same order
            dense = native.forward(x, u, relu, b, out_relu)[0]
            assert torch.equal(dense, _epilogue(native.forward(x, u, relu)[0], b, out_relu))
            torch.testing.assert_close(lanes, dense, rtol=1e-4, atol=2e-5 * max(1.0, float(dense.abs().max())))


def test_inference_forward_float64_and_thread_counts():
    """float64 (the portable loops) to the reference's precision; float32 the same bits at 1, 2 and 3
    threads (a group is one thread's)."""
    torch.manual_seed(32)
    n, c, k, h, w = 37, 20, 30, 9, 7
    mask = _mask(c, k, 0.3, seed=33, dtype=torch.float64)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    u = torch.randn(16, c, k, dtype=torch.float64) * mask
    bias = torch.randn(k, dtype=torch.float64)
    got = ws.sparse_forward(x, u, ws.structure_for(mask), True, bias, True)
    want = _epilogue(_reference(x, u, True, torch.zeros(n, k, h, w))[0], bias, True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dense = native.forward(x, u, True, bias, True)[0]  # float64: torch.bmm between the library's passes
    assert torch.equal(dense, _epilogue(native.forward(x, u, True)[0], bias, True))
    x, u, bias, mask = x.float(), u.float(), bias.float(), mask.float()
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(ws.sparse_forward(x, u, ws.structure_for(mask), True, bias, True))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_native_inference_chooses_and_applies_the_epilogue(monkeypatch):
    torch.manual_seed(34)
    mask = _mask(64, 64, 0.1, seed=35)
    x, u, bias = torch.randn(20, 64, 6, 6), torch.randn(16, 64, 64) * mask, torch.randn(64)
    want = _epilogue(native.forward(x, u, True)[0], bias, True)
    for mode in ("on", "off", "auto"):
        monkeypatch.setenv(ws.SPARSE_ENV, mode)
        y, sparse = ws.native_inference(x, u, mask, True, bias, True)
        expect_sparse = mode == "on" or (mode == "auto" and ws.kernels_vectorised()
                                         and ws.should_run_sparse(0.1, 64, 64, 20 * 9, False))
        assert sparse == expect_sparse
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    y, sparse = ws.native_inference(x, u, None, True, bias, True)  # no mask: dense, bit for bit
    assert not sparse and torch.equal(y, want)
    y, _ = ws.native_inference(x[:0], u, mask, True, bias, True)  # an empty batch
    assert y.shape == (0, 64, 6, 6)


# --------------------------------------------------------------------------------------------------
# the structure cache: rebuilt when the mask changes, by every route, and only then
# --------------------------------------------------------------------------------------------------
def _layer(c=6, k=7):
    from esdbs_ray.winograd import WinogradReLUConv2d

    torch.manual_seed(20)
    return WinogradReLUConv2d(c, k)


def test_unchanged_mask_reuses_its_structure():
    layer = _layer()
    layer.register_buffer("weight_mask", _mask(6, 7, 0.5))
    s = ws.structure_for(layer)
    builds = ws.cache_info()["builds"]
    for _ in range(3):
        assert ws.structure_for(layer) is s
        assert ws.structure_for(layer.weight_mask) is s
    assert ws.cache_info()["builds"] == builds
    assert ws.structure_for(torch.nn.Linear(2, 2)) is None  # no mask


def test_pruner_changes_are_seen():
    from esdbs_ray.pruning import Pruner

    layer = _layer()
    model = torch.nn.Sequential(layer)
    pruner = Pruner(model)  # all-ones masks
    assert ws.structure_for(layer).density == 1.0
    pruner.prune_to(0.5)  # copy_ into the existing buffer
    s = ws.structure_for(layer)
    assert abs(s.density - 0.5) < 0.01 and s.nnz == int(layer.weight_mask.sum())
    pruner.apply_()  # weights zeroed, the mask untouched: the same structure
    assert ws.structure_for(layer) is s
    pruner.prune_to(0.8)
    assert abs(ws.structure_for(layer).density - 0.2) < 0.01


def test_load_state_dict_is_seen():
    from esdbs_ray.pruning import Pruner

    a, b = _layer(), _layer()
    Pruner(torch.nn.Sequential(a)).prune_to(0.7)
    Pruner(torch.nn.Sequential(b))
    s = ws.structure_for(b)
    assert s.density == 1.0
    buffer = b.weight_mask
    b.load_state_dict(a.state_dict())
    assert b.weight_mask is buffer  # copied into the same tensor ...
    s2 = ws.structure_for(b)
    assert s2 is not s and s2.nnz == int(a.weight_mask.sum())  # ... and seen


def test_module_to_is_seen():
    layer = _layer()
    layer.register_buffer("weight_mask", _mask(6, 7, 0.4))
    s = ws.structure_for(layer)
    layer.to(torch.float64)  # a new buffer tensor
    s2 = ws.structure_for(layer)
    assert s2 is not s and s2.nnz == s.nnz


def test_in_place_edits_are_seen():
    layer = _layer()
    layer.register_buffer("weight_mask", torch.ones(16, 6, 7))
    s = ws.structure_for(layer)
    layer.weight_mask[0, 0, 0] = 0  # index assignment
    s1 = ws.structure_for(layer)
    assert s1 is not s and s1.nnz == s.nnz - 1
    layer.weight_mask.masked_fill_(torch.arange(7) < 3, 0.0)
    s2 = ws.structure_for(layer)
    assert s2.nnz == 16 * 6 * 4
    with torch.no_grad():
        layer.weight_mask.mul_(0)
    assert ws.structure_for(layer).nnz == 0


def test_edits_past_the_version_counter():
    """A tensor made in inference mode has no version counter: its contents are compared instead.
    A write through .data bypasses the counter: forget() drops the cached structure."""
    with torch.inference_mode():
        m = torch.ones(16, 3, 4)
    s = ws.structure_for(m)
    with torch.inference_mode():
        m[1, 1, 1] = 0
    assert ws.structure_for(m).nnz == s.nnz - 1
    m2 = torch.ones(16, 3, 4)
    s = ws.structure_for(m2)
    m2.data[0, 0, 0] = 0
    assert ws.structure_for(m2) is s  # not seen (documented) ...
    ws.forget(m2)
    assert ws.structure_for(m2).nnz == s.nnz - 1  # ... until forgotten


def test_structure_goes_with_its_mask():
    before = ws.cache_info()["entries"]
    m = torch.ones(16, 2, 2)
    ws.structure_for(m)
    assert ws.cache_info()["entries"] == before + 1
    del m
    assert ws.cache_info()["entries"] == before


def test_structure_saved_by_forward_is_the_one_backward_uses():
    """A mask changed between forward and backward (the Pruner after a step) does not change the
    backward of that forward: the Function keeps the forward's structure."""
    torch.manual_seed(21)
    mask = _mask(5, 6, 0.6, seed=22)
    x, gy = torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(2, 6, 6, 6)
    u = (torch.randn(16, 5, 6) * mask).requires_grad_()
    y = ws.WinogradSparseFn.apply(x, u, ws.structure_for(mask), True)
    mask.mul_(0)
    (du,) = torch.autograd.grad(y, (u,), gy)
    assert bool((du != 0).any())


def test_input_changed_in_place_after_forward_is_caught():
    """A channels-last x is saved as itself: an in-place change before the backward raises."""
    mask = _mask(4, 5, 0.5)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    xx = x * 1.0
    y = ws.WinogradSparseFn.apply(xx, torch.randn(16, 4, 5) * mask, ws.structure_for(mask), True)
    xx.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --------------------------------------------------------------------------------------------------
# the choice
# --------------------------------------------------------------------------------------------------
def test_should_run_sparse_rule():
    """Sparse at or below the pass's threshold for the path the dense layer would take (fused band by
    band where C * K <= 128^2 and the batch has many tiles, else unfused), from min_ck on."""
    rule = ws.CROSSOVER
    c = 64
    k = max(2, -(-rule["min_ck"] // c))
    paths = {native.path(torch.float32, c, k, tiles) for tiles in (1, 1 << 20)}
    assert paths == {"fused", "unfused"} or not ws.kernels_vectorised()  # both classes exercised
    for training in (True, False):
        for tiles in (1, 1 << 20):
            path = "fused" if native.path(torch.float32, c, k, tiles) == "fused" else "unfused"
            t = rule["training" if training else "inference"][path]
            assert 0.0 <= t < 1.0  # density 1: dense, always
            assert ws.should_run_sparse(t, c, k, tiles, training) == (t > 0)
            # a layer pruned to the threshold's density, its kept entries rounded either way
            assert ws.should_run_sparse(t + 1e-5, c, k, tiles, training) == (t > 0)
            assert ws.should_run_sparse(t - 1e-5, c, k, tiles, training) == (t > 0)
            assert not ws.should_run_sparse(t + 0.01, c, k, tiles, training)
            assert not ws.should_run_sparse(1.0, c, k, tiles, training)
        assert not ws.should_run_sparse(0.01, c, k, 0, training)  # no tiles
        if rule["min_ck"] > 1:
            assert not ws.should_run_sparse(0.01, 1, rule["min_ck"] - 1, 1 << 20, training)


def test_sparse_conv_or_none_follows_the_switch(monkeypatch):
    torch.manual_seed(23)
    mask = _mask(64, 64, 0.1, seed=24)
    x, u = torch.randn(2, 64, 6, 6), torch.randn(16, 64, 64) * mask
    monkeypatch.setenv(ws.SPARSE_ENV, "off")
    assert ws.sparse_conv_or_none(x, u, mask, True) is None
    monkeypatch.setenv(ws.SPARSE_ENV, "on")
    y = ws.sparse_conv_or_none(x, u, mask, True)
    torch.testing.assert_close(y, native.forward(x, u, True)[0], rtol=1e-4, atol=1e-4)
    assert ws.sparse_conv_or_none(x, u, None, True) is None  # no mask: dense
    assert ws.sparse_conv_or_none(x, u, torch.ones(16, 64, 65), True) is None  # not this weight's mask
    assert ws.sparse_conv_or_none(x.double(), u.double(), mask, True) is not None  # "on": any dtype
    monkeypatch.setenv(ws.SPARSE_ENV, "auto")
    got = ws.sparse_conv_or_none(x, u, mask, True)
    assert (got is not None) == (ws.kernels_vectorised() and ws.should_run_sparse(0.1, 64, 64, 2 * 9, False))
    assert ws.sparse_conv_or_none(x, u, torch.ones(16, 64, 64), True) is None  # density 1: dense
    assert ws.sparse_conv_or_none(x.double(), u.double(), mask, True) is None  # auto: float32 only
    monkeypatch.setenv(ws.SPARSE_ENV, "sometimes")
    with pytest.raises(ValueError, match=ws.SPARSE_ENV):
        ws.sparse_conv_or_none(x, u, mask, True)


def test_rejects_what_it_cannot_run():
    mask = _mask(4, 5, 0.5)
    s = ws.structure_for(mask)
    with pytest.raises(ValueError, match="structure"):
        ws.sparse_forward(torch.randn(1, 4, 3, 3), torch.randn(16, 4, 6), s, True)
    with pytest.raises(ValueError, match="float32 / float64"):
        ws.sparse_forward(torch.randn(1, 4, 3, 3).half(), torch.randn(16, 4, 5).half(), s, True)
    with pytest.raises(ValueError, match="16, C, K"):
        ws.SparseStructure.from_mask(torch.ones(4, 5))


def test_profiling_counts_the_phases():
    mask = _mask(16, 16, 0.5)
    x, u = torch.randn(2, 16, 8, 8, requires_grad=True), (torch.randn(16, 16, 16) * mask).requires_grad_()
    with ws.profiling() as prof:
        ws.WinogradSparseFn.apply(x, u, ws.structure_for(mask), True).sum().backward()
    assert set(prof) == set(ws.PHASES)
    assert all(v >= 0 for v in prof.values())
    assert prof["products_fwd"] > 0 and prof["input_transform"] > 0
