"""Lane chains (esdbs_ray/winograd_chain.py): consecutive sparse Winograd-ReLU layers and max-pools run
in the kernels' lane layout give the bits of their stages run one after another, on every registry
model, odd sizes, every pool the chain takes (NaN included), batches that are not whole groups, any
thread count; a layer that runs dense splits the chain; what is not inference runs the stages."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esdbs_ray import winograd_native as native
from esdbs_ray.inference import prepare_for_inference
from esdbs_ray.models import list_models
from esdbs_ray.networks import build_network
from esdbs_ray.winograd import WinogradReLUConv2d, winograd_layers
from esdbs_ray.winograd_chain import CHAIN_ENV, CHAIN_MIN_TILES, LaneChain, chain_mode, fuse_lane_chains, pool_supported
from esdbs_ray.winograd_sparse import kernels_vectorised
from test_inference import _with_statistics


@pytest.fixture(autouse=True)
def _kernels():
    try:
        native.library()
    except native.NativeUnavailable as e:
        pytest.skip(f"native kernels unavailable: {e}")
    if not kernels_vectorised():
        pytest.skip("the chains run on the vectorised (AVX-512) kernels only")


def _prune(model: nn.Module, density: float, seed: int) -> nn.Module:
    """Every Winograd-ReLU layer's U pruned at random to ``density`` (the masks from the zeros, as an
    export leaves them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in winograd_layers(model):
            layer.weight.mul_((torch.rand(layer.weight.shape, generator=g) < density).float())
    return model


def _run(model, x, mode: str, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv(CHAIN_ENV, mode)
    with torch.inference_mode():
        return model(x)


def _chains(model) -> list[LaneChain]:
    return [m for m in model.modules() if isinstance(m, LaneChain)]


@pytest.mark.parametrize("name", list_models())
def test_chains_give_the_stages_bits_on_every_registry_model(name, monkeypatch):
    size = 32 if name in ("vgg16", "resnet32", "resnet50") else 28
    width = 1.0 if name == "resnet50" else 0.125
    torch.manual_seed(0)
    model = build_network(name, num_classes=10, in_channels=1, image_size=size, width=width, conv="winograd_relu")
    model = prepare_for_inference(_prune(_with_statistics(model, 1), 0.2, 2))
    x = torch.randn(37, 1, size, size)  # two whole groups and 5 images
    want = _run(model, x, "off", monkeypatch)
    sizes = {}
    for chain in _chains(model):
        chain.register_forward_pre_hook(lambda m, inp: sizes.__setitem__(id(m), inp[0].shape[2:]))
    got = _run(model, x, "auto", monkeypatch)
    assert torch.equal(got, want)
    if name in ("alexnet", "all_cnn_c", "convpool_cnn_c", "vgg16"):  # layers in a row in an nn.Sequential
        assert any(c.last_plan[0][0] == "chain" for c in _chains(model))
    for chain in _chains(model):  # every chain ran in the lanes as one piece, but on maps of few tiles
        h, w = sizes[id(chain)]
        kind = "chain" if ((h + 1) // 2) * ((w + 1) // 2) >= CHAIN_MIN_TILES else "modules"
        assert chain.last_plan == [(kind, tuple(range(len(chain.stages))))]


def _layer(c: int, k: int, density: float, seed: int, bias: bool = True, out_relu: bool = False,
           relu: bool = True) -> WinogradReLUConv2d:
    g = torch.Generator().manual_seed(seed)
    layer = WinogradReLUConv2d(c, k, bias=bias, relu=relu)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        if density < 1:
            mask = (torch.rand(layer.weight.shape, generator=g) < density).float()
            layer.weight.mul_(mask)
            layer.register_buffer("weight_mask", mask)
        if bias:
            layer.bias.copy_(torch.randn(k, generator=g))
    layer.out_relu = out_relu
    return layer.eval().requires_grad_(False)


def _net(*mods) -> nn.Sequential:
    net = nn.Sequential(*mods).eval()
    assert fuse_lane_chains(net) == 1
    return net


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0), (3, 3, 0), (1, 1, 0), (3, 2, 0)])
@pytest.mark.parametrize("hw", [(9, 7), (12, 12), (5, 11)])
def test_pools_in_the_lanes(k, s, p, hw, monkeypatch):
    """A pool between layers, at the chain's start and at its end, on odd sizes: torch's max_pool2d's
    bits, a NaN in a window included (it wins, as in torch)."""
    h, w = hw
    torch.manual_seed(3)
    pool = nn.MaxPool2d(k, s, p)
    nets = [_net(_layer(5, 20, 0.3, 4), nn.Dropout(0.5), copy.deepcopy(pool), _layer(20, 17, 0.2, 5, out_relu=True)),
            _net(copy.deepcopy(pool), _layer(5, 18, 0.3, 6)),
            _net(_layer(5, 18, 0.3, 7, out_relu=True), _layer(18, 33, 0.2, 8), copy.deepcopy(pool))]
    x = torch.randn(35, 5, h, w)
    x[3, 2, 1, 1] = float("nan")
    x[20, 4, h - 1, w - 1] = float("nan")
    for net in nets:
        want = _run(net, x, "off", monkeypatch)
        got = _run(net, x, "auto", monkeypatch)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if ((ho + 1) // 2) * ((wo + 1) // 2) >= CHAIN_MIN_TILES:  # (else the layer after the pool stays out)
            assert all(kind == "chain" for kind, _ in _chains(net)[0].last_plan)
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_the_chain_computes_the_network_to_float64_precision(monkeypatch):
    """The chain against the stages in float64 (torch's and the portable kernels' arithmetic)."""
    net = _net(_layer(3, 24, 0.25, 9), _layer(24, 24, 0.2, 10, out_relu=True), nn.MaxPool2d(3, 2, 1),
               _layer(24, 40, 0.2, 11, bias=False), _layer(40, 16, 0.3, 12, relu=False))
    x = torch.randn(48, 3, 15, 13)
    got = _run(net, x, "auto", monkeypatch)
    ref = _run(copy.deepcopy(net).double(), x.double(), "off", monkeypatch)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_a_dense_layer_splits_the_chain_and_batches_of_any_size_run(monkeypatch):
    torch.manual_seed(13)
    stages = [_layer(8, 24, 0.2, 14), nn.MaxPool2d(2), _layer(24, 24, 1.0, 15), _layer(24, 24, 0.2, 16),
              _layer(24, 32, 0.2, 17), nn.MaxPool2d(3, 2, 1)]
    net = _net(*stages)
    chain = _chains(net)[0]
    x = torch.randn(40, 8, 14, 14)
    want = _run(net, x, "off", monkeypatch)
    assert chain.last_plan == [("modules", (0, 1, 2, 3, 4, 5))]
    assert torch.equal(_run(net, x, "auto", monkeypatch), want)
    # the dense layer (no mask) runs alone; the pool before it with it, one stage each side
    assert chain.last_plan == [("chain", (0, 1)), ("modules", (2,)), ("chain", (3, 4, 5))]
    for n in (0, 1, 15, 16, 17):
        xs = x[:n].clone()
        assert torch.equal(_run(net, xs, "auto", monkeypatch), _run(net, xs, "off", monkeypatch))
    _run(net, x[:15], "auto", monkeypatch)  # fewer than a group: the stages on their own paths
    assert chain.last_plan == [("modules", (0, 1, 2, 3, 4, 5))]


def test_the_same_bits_at_any_thread_count(monkeypatch):
    net = _net(_layer(16, 32, 0.2, 18), _layer(32, 32, 0.2, 19), nn.MaxPool2d(2))
    x = torch.randn(80, 16, 10, 10)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(_run(net, x, "auto", monkeypatch))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert _chains(net)[0].last_plan == [("chain", (0, 1, 2))]
    assert torch.equal(outs[0], _run(net, x, "off", monkeypatch))


def test_what_is_not_inference_runs_the_stages(monkeypatch):
    net = _net(_layer(8, 16, 0.2, 20), _layer(16, 16, 0.2, 21))
    chain = _chains(net)[0]
    x = torch.randn(32, 8, 6, 6, requires_grad=True)
    monkeypatch.setenv(CHAIN_ENV, "auto")
    y = net(x)  # autograd records: the layers' own paths
    assert chain.last_plan == [("modules", (0, 1))] and y.requires_grad
    net64 = copy.deepcopy(net).double()
    with torch.inference_mode():
        net64(x.detach().double())  # float64: the stages
    assert _chains(net64)[0].last_plan == [("modules", (0, 1))]
    monkeypatch.setenv("ESDBS_NATIVE_SPARSE", "off")  # no sparse layer: nothing to chain
    with torch.inference_mode():
        net(x.detach())
    assert chain.last_plan == [("modules", (0, 1))]


def test_fusing_finds_the_runs_and_the_switch_is_checked(monkeypatch):
    net = nn.Sequential(_layer(4, 8, 0.2, 22), nn.MaxPool2d(2, ceil_mode=True), _layer(8, 8, 0.2, 23), nn.Dropout(),
                        nn.MaxPool2d(2), nn.ReLU(), _layer(8, 8, 0.2, 24), nn.MaxPool2d(2)).eval()
    assert not pool_supported(net[1]) and pool_supported(net[4])
    assert fuse_lane_chains(net) == 2  # (2, 3, 4) and (6, 7); layer 0 alone is no chain
    assert isinstance(net[0], WinogradReLUConv2d) and isinstance(net[2], LaneChain) and isinstance(net[6], LaneChain)
    assert all(isinstance(net[i], nn.Identity) for i in (3, 4, 7))
    assert [type(m) for m in net[2].stages] == [WinogradReLUConv2d, nn.Dropout, nn.MaxPool2d]  # in order
    # a trailing identity stays out of the chain
    tail = nn.Sequential(_layer(4, 8, 0.2, 28), _layer(8, 8, 0.2, 29), nn.Dropout(), nn.ReLU()).eval()
    assert fuse_lane_chains(tail) == 1 and isinstance(tail[2], nn.Dropout) and len(tail[0].stages) == 2
    x = torch.randn(20, 4, 16, 16)
    assert torch.equal(_run(net, x, "auto", monkeypatch), _run(net, x, "off", monkeypatch))
    with pytest.raises(ValueError, match="lane chain takes"):
        LaneChain([nn.ReLU()])
    monkeypatch.setenv(CHAIN_ENV, "sometimes")
    with pytest.raises(ValueError, match=CHAIN_ENV):
        chain_mode()


def test_stages_too_large_for_the_lanes_run_on_their_own(monkeypatch):
    """A stage whose 16 images' activations exceed LANE_IMAGE_MAX_BYTES (here lowered) leaves the chain."""
    import esdbs_ray.winograd_chain as wc

    net = _net(_layer(8, 16, 0.2, 25), nn.MaxPool2d(2), _layer(16, 16, 0.2, 26), _layer(16, 16, 0.2, 27))
    chain = _chains(net)[0]
    x = torch.randn(20, 8, 10, 10)
    want = _run(net, x, "off", monkeypatch)
    monkeypatch.setattr(wc, "LANE_IMAGE_MAX_BYTES", 100_000)  # 16 x 16 channels at 10 x 10: 122,880 bytes
    assert torch.equal(_run(net, x, "auto", monkeypatch), want)
    assert chain.last_plan == [("modules", (0, 1)), ("chain", (2, 3))]


def test_what_the_layers_would_record_or_cast_runs_the_stages(monkeypatch):
    """A bias that asks for its gradient, CPU autocast, training mode (dropout in its place: the
    chain keeps the network's order) and a pool changed after fusing: the stages one by one, the
    results theirs."""
    torch.manual_seed(30)
    net = _net(_layer(8, 16, 0.2, 31), nn.Dropout(0.5), _layer(16, 16, 0.2, 32), nn.MaxPool2d(2))
    chain = _chains(net)[0]
    x = torch.randn(32, 8, 8, 8)
    monkeypatch.setenv(CHAIN_ENV, "auto")
    net[0].stages[0].bias.requires_grad_(True)
    y = net(x)
    assert y.requires_grad and chain.last_plan == [("modules", (0, 1, 2, 3))]
    y.sum().backward()
    assert net[0].stages[0].bias.grad is not None
    net[0].stages[0].bias.requires_grad_(False)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert chain.last_plan == [("modules", (0, 1, 2, 3))]
    net.train()
    torch.manual_seed(33)
    a = net(x.clone())
    torch.manual_seed(33)
    monkeypatch.setenv(CHAIN_ENV, "off")
    b = net(x.clone())
    assert torch.equal(a, b) and chain.last_plan == [("modules", (0, 1, 2, 3))]
    net.eval()
    net[0].stages[3].ceil_mode = True  # no longer a pool the chain takes
    want = _run(net, x, "off", monkeypatch)
    assert torch.equal(_run(net, x, "auto", monkeypatch), want)
    assert chain.last_plan == [("modules", (0, 1, 2, 3))]


def test_inside_a_chain_layers_run_sparse_up_to_the_chain_crossover(monkeypatch):
    """A layer that alone runs dense (a density under CHAIN_CROSSOVER on the fused path, whose per-layer
    threshold is 0.3) runs sparse inside a chain: the bits of the stages forced onto the sparse
    kernels, for every image of the batch (the last N mod 16 too), and the dense result to float
    rounding; above CHAIN_CROSSOVER, and on maps of fewer than CHAIN_MIN_TILES tiles, the stages one
    by one."""
    from esdbs_ray.winograd_chain import CHAIN_CROSSOVER, CHAIN_MIN_TILES
    from esdbs_ray.winograd_sparse import should_run_sparse

    assert 0.3 < CHAIN_CROSSOVER < 0.8 and CHAIN_MIN_TILES == 4
    inside, above = CHAIN_CROSSOVER - 0.05, CHAIN_CROSSOVER + 0.1
    x = torch.randn(40, 24, 28, 28)  # the last 8 images, alone, would run dense too
    for n in (40, 8):
        assert not should_run_sparse(inside, 24, 24, n * 14 * 14, training=False)  # alone: dense
    net = _net(_layer(24, 24, inside, 34), _layer(24, 24, inside, 35, out_relu=True, relu=False),
               nn.MaxPool2d(3, 2, 1))
    chain = _chains(net)[0]
    dense = _run(net, x, "off", monkeypatch)
    got = _run(net, x, "auto", monkeypatch)
    assert chain.last_plan == [("chain", (0, 1, 2))]
    monkeypatch.setenv("ESDBS_NATIVE_SPARSE", "on")
    assert torch.equal(got, _run(net, x, "off", monkeypatch))  # the stages on the sparse kernels
    monkeypatch.delenv("ESDBS_NATIVE_SPARSE")
    assert not torch.equal(got, dense)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
    above = _net(_layer(24, 24, above, 36), _layer(24, 24, above, 37))
    _run(above, x, "auto", monkeypatch)
    assert _chains(above)[0].last_plan == [("modules", (0, 1))]
    tiny = _net(_layer(24, 24, 0.2, 38), _layer(24, 24, 0.2, 39))  # 2 x 2 images: one tile each
    xt = torch.randn(40, 24, 2, 2)
    assert torch.equal(_run(tiny, xt, "auto", monkeypatch), _run(tiny, xt, "off", monkeypatch))
    assert _chains(tiny)[0].last_plan == [("modules", (0, 1))]
