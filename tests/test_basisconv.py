"""BasisConv: exactness at t = 1, the threshold rule, fixed bases under optimizers, counts, round trips."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esdbs_ray.basisconv import (
    BasisConv2d,
    basis_layers,
    coefficient_parameters,
    compression_report,
    filter_spectrum,
    is_basis_eligible,
    layer_counts,
    non_basis_parameters,
    recompress,
    retained_count,
    set_fine_tuning_stage,
    to_basisconv,
    to_basisconv_like,
    to_basisconv_random,
)
from esdbs_ray.models import ReLUConv2d, StemConv2d, create_model, list_models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: a second thread buys nothing, and on a loaded shared machine each
    # OpenMP barrier waits for the other thread to be scheduled (measured 10 ms per batch norm call).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


SIDE = 16  # small images keep the training tests fast; every registry CNN here is fully convolutional


def _small(name: str = "all_cnn_c", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=1, image_size=SIDE, width=0.25)


# --------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------
LAYERS = [  # (C_in, C_out, kernel, stride, padding, dilation, bias, ReLUConv2d, (H, W))
    (3, 8, 3, 1, 1, 1, False, False, (7, 6)),  # K < N = 27
    (2, 24, 3, 1, 1, 1, True, True, (5, 5)),  # K > N = 18: rank N
    (4, 6, 5, 2, 2, 1, False, True, (9, 8)),  # strided 5x5
    (3, 5, 3, 1, 2, 2, True, False, (8, 8)),  # dilated
    (1, 16, 3, 1, 0, 1, False, False, (6, 6)),  # 1-channel stem, no padding
    (8, 4, (1, 3), 1, (0, 1), 1, False, False, (5, 5)),  # rectangular kernel
]


@pytest.mark.parametrize("case", LAYERS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}")
def test_t1_layer_equals_conv(case):
    c_in, c_out, k, s, p, d, bias, relu, hw = case
    torch.manual_seed(0)
    conv = (ReLUConv2d if relu else nn.Conv2d)(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    layer = BasisConv2d.from_conv(conv, threshold=1.0)
    n = conv.weight[0].numel()
    assert layer.num_basis == min(c_out, n) and layer.input_relu == relu
    assert layer.energy == pytest.approx(1.0)
    x = torch.randn(2, c_in, *hw)
    assert _rel(layer(x), conv(x)) < 1e-5
    assert _rel(layer.to_conv()(x), conv(x)) < 1e-5


def test_t1_rank_deficient_layer_keeps_only_nonzero_eigenvalues():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 12, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(12, 5) @ torch.randn(5, 18)).view(12, 2, 3, 3))
    layer = BasisConv2d.from_conv(conv, threshold=1.0)
    assert layer.num_basis == 5
    x = torch.randn(1, 2, 6, 6)
    assert _rel(layer(x), conv(x)) < 1e-5


def test_input_relu_stays_in_front():
    torch.manual_seed(2)
    conv = ReLUConv2d(3, 4, 3, padding=1)
    layer = BasisConv2d.from_conv(conv, threshold=1.0)
    x = torch.randn(1, 3, 5, 5)
    ref = F.conv2d(x.relu(), conv.weight, conv.bias, padding=1)
    assert _rel(layer(x), ref) < 1e-5
    assert _rel(layer(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) > 0.1


def _spectrum_conv(k: int, c: int, decay: float, seed: int) -> nn.Conv2d:
    """A conv whose filter matrix has singular values decay**i (well separated shares)."""
    g = torch.Generator().manual_seed(seed)
    n = c * 9
    u = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, min(k, n), generator=g, dtype=torch.float64))[0]
    s = decay ** torch.arange(min(k, n), dtype=torch.float64)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_((u[:, : len(s)] * s @ v.T).view(k, c, 3, 3))
    return conv


@pytest.mark.parametrize("k,c,decay", [(16, 4, 0.8), (40, 2, 0.9), (24, 3, None)])
def test_retained_count_matches_numpy_eigen(k, c, decay):
    conv = _spectrum_conv(k, c, decay, seed=3) if decay else nn.Conv2d(c, k, 3, padding=1)
    x = conv.weight.detach().double().numpy().reshape(k, -1).T  # filters as columns (N x K)
    lam, vecs = np.linalg.eigh(x @ x.T)
    lam, vecs = lam[::-1], vecs[:, ::-1]
    share = np.cumsum(lam) / lam.sum()
    nonzero = int((lam > lam[0] * 1e-10).sum())
    for t in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        expect = nonzero if t == 1.0 else int(np.argmax(share >= t)) + 1
        layer = BasisConv2d.from_conv(conv, threshold=t)
        assert layer.num_basis == expect, t
        assert layer.energy == pytest.approx(share[expect - 1], abs=1e-9)
        # the basis is the leading eigenvectors (up to sign), stored as filters
        b = layer.basis.double().view(expect, -1).numpy()
        np.testing.assert_allclose(np.abs(np.sum(b * vecs[:, :expect].T, 1)), 1.0, atol=1e-5)
    lam_t, _, rank = filter_spectrum(conv.weight)
    np.testing.assert_allclose(lam_t.numpy(), lam[: len(lam_t)], rtol=1e-8, atol=1e-12 * lam[0])
    assert rank == nonzero
    assert retained_count(lam_t, 1.0, rank) == nonzero
    # eigenvalues below the rank tolerance never count, even where their share passes the slack
    assert retained_count(torch.tensor([1.0, 1e-9, 0.0]), 1.0, rank=1) == 1
    assert retained_count(torch.tensor([1.0, 1e-9, 0.0]), 1.0) == 2
    assert retained_count(torch.tensor([0.6, 0.3, 0.1]), 0.9) == 2  # a share exactly at t counts


def test_exact_rank_and_completion_beyond_the_filters():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # K = 4 < N = 36
    assert BasisConv2d.from_conv(conv, rank=3).num_basis == 3
    layer = BasisConv2d.from_conv(conv, rank=10)  # 6 zero-eigenvalue directions added
    b = layer.basis.view(10, -1)
    torch.testing.assert_close(b @ b.T, torch.eye(10), atol=1e-5, rtol=0)
    x = torch.randn(1, 4, 5, 5)
    assert _rel(layer(x), conv(x)) < 1e-5


def test_truncation_error_is_the_dropped_energy():
    conv = _spectrum_conv(16, 4, 0.8, seed=5)
    layer = BasisConv2d.from_conv(conv, threshold=0.9)
    w, _ = layer.effective_weight_and_bias()
    ref = conv.weight.detach().double()
    err = float((w.double() - ref).square().sum() / ref.square().sum())
    assert err == pytest.approx(1.0 - layer.energy, abs=1e-6)
    assert 1.0 - layer.energy <= 0.1 + 1e-9


def test_random_basis_is_orthonormal_and_seeded():
    layer = BasisConv2d.random(16, 32, 20, 3, padding=1, seed=0)
    b = layer.basis.view(20, -1)
    torch.testing.assert_close(b @ b.T, torch.eye(20), atol=1e-5, rtol=0)
    assert layer.bn is not None and layer.kind == "random"
    assert torch.equal(BasisConv2d.random(16, 32, 20, 3, seed=0).basis, layer.basis)
    assert not torch.allclose(BasisConv2d.random(16, 32, 20, 3, seed=1).basis, layer.basis)
    # coefficients: He init with fan-in Q
    assert layer.coefficients.std().item() == pytest.approx((2 / 20) ** 0.5, rel=0.25)
    model = to_basisconv_random(_small(), fraction=0.5, seed=0)
    for _, m in basis_layers(model):
        b = m.basis.view(m.num_basis, -1)
        torch.testing.assert_close(b @ b.T, torch.eye(m.num_basis), atol=1e-5, rtol=0)


def test_bn_folding_in_eval_mode():
    torch.manual_seed(6)
    layer = BasisConv2d.random(3, 5, 7, 3, padding=1, bias=True, input_relu=True, seed=2)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 2)
        layer.bn.bias.normal_()
        layer.projection.bias.normal_()
    layer.train()
    for _ in range(3):
        layer(torch.randn(4, 3, 6, 6) * 2 + 1)  # running statistics away from (0, 1)
    layer.eval()
    x = torch.randn(2, 3, 6, 6)
    assert _rel(layer.to_conv()(x), layer(x)) < 1e-5
    re = layer.recompress(threshold=1.0)
    assert re.bn is None and re.num_basis <= 7 and re.input_relu
    assert _rel(re(x), layer(x)) < 1e-5


# --------------------------------------------------------------------------------------------------
# registry models
# --------------------------------------------------------------------------------------------------
def _model(name: str):
    torch.manual_seed(0)
    if name == "resnet50":
        return create_model(name, num_classes=10, in_channels=3, image_size=32, width=1.0), (1, 3, 32, 32)
    return create_model(name, num_classes=10, in_channels=1, image_size=28, width=0.25), (2, 1, 28, 28)


@pytest.mark.parametrize("name", list_models())
def test_t1_registry_model_equals_original(name):
    model, shape = _model(name)
    model.eval()
    eligible = [n for n, m in model.named_modules() if is_basis_eligible(m)]
    one_by_one = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    stem = next(n for n, m in model.named_modules() if type(m) in (nn.Conv2d, StemConv2d) and m.kernel_size != (1, 1))
    assert stem in eligible
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    assert to_basisconv(model, threshold=1.0) is model
    assert [n for n, _ in basis_layers(model)] == eligible
    modules = dict(model.named_modules())
    assert all(modules[n] is m for n, m in one_by_one.items())  # 1x1 convs untouched
    assert not any(is_basis_eligible(m) for n, m in model.named_modules() if ".projection" not in n)
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-5


def test_which_relu_keeps_the_stem_spatial():
    model = _small("alexnet")
    stem = model[0][0]
    to_basisconv(model, threshold=1.0, which="relu")
    assert model[0][0] is stem and type(stem) is StemConv2d
    assert len(basis_layers(model)) == 4 and all(m.input_relu for _, m in basis_layers(model))


# --------------------------------------------------------------------------------------------------
# fine-tuning: the basis never moves
# --------------------------------------------------------------------------------------------------
def _converted(kind: str) -> nn.Module:
    model = _small()
    return to_basisconv(model, threshold=0.9) if kind == "eigen" else to_basisconv_random(model, fraction=0.5)


def _steps(model, params, opt: str, steps: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if opt == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        optimizer = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
    model.train()
    losses = []
    x, y = torch.randn(12, 1, SIDE, SIDE, generator=g), torch.randint(0, 10, (12,), generator=g)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("stage", [1, 2])
def test_basis_fixed_through_optimizer_steps(opt, stage):
    model = _converted("eigen")
    bases = {n: m.basis.clone() for n, m in basis_layers(model)}
    coeff_ids = {id(p) for p in coefficient_parameters(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = set_fine_tuning_stage(model, stage)
    expect = coeff_ids if stage == 1 else {id(p) for p in non_basis_parameters(model)}
    assert {id(p) for p in params} == expect
    assert len(non_basis_parameters(model)) == len(list(model.parameters()))
    _steps(model, params, opt)
    for n, m in basis_layers(model):
        assert torch.equal(m.basis, bases[n]), n
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    coeff_names = {n for n, p in model.named_parameters() if id(p) in coeff_ids}
    assert coeff_names <= changed
    if stage == 1:
        assert changed == coeff_names
    else:
        assert changed - coeff_names  # batch norms and the rest train too


def test_stage1_with_an_optimizer_over_all_parameters():
    # the trainer's optimizer holds every parameter (with weight decay): frozen ones must stay put
    model = _converted("random")
    bases = {n: m.basis.clone() for n, m in basis_layers(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    coeff_ids = {id(p) for p in set_fine_tuning_stage(model, 1)}
    _steps(model, list(model.parameters()), "sgd")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) != (id(p) in coeff_ids), n
    assert all(torch.equal(m.basis, bases[n]) for n, m in basis_layers(model))
    assert not any(p is m.basis for p in model.parameters() for _, m in basis_layers(model))
    set_fine_tuning_stage(model, 2)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ["eigen", "random"])
def test_converted_models_train(kind):
    model = _converted(kind)
    losses = _steps(model, set_fine_tuning_stage(model, 2), "sgd", steps=8)
    assert losses[-1] < 0.6 * losses[0], losses


# --------------------------------------------------------------------------------------------------
# recompression, state dict
# --------------------------------------------------------------------------------------------------
def test_recompression_ladder_never_grows():
    model = to_basisconv(_small(), threshold=1.0)
    qs = [m.num_basis for _, m in basis_layers(model)]
    _steps(model, set_fine_tuning_stage(model, 2), "sgd", steps=2)
    model.eval()
    x = torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        ref = model(x)
        to_basisconv(model, threshold=1.0)  # lossless rebuild of the fine-tuned filters
        assert _rel(model(x), ref) < 1e-5
    for t in (0.95, 0.9):
        to_basisconv(model, threshold=t)
        new = [m.num_basis for _, m in basis_layers(model)]
        assert all(a <= b for a, b in zip(new, qs)) and sum(new) < sum(qs), (t, qs, new)
        assert all(m.threshold == t for _, m in basis_layers(model))
        _steps(model, set_fine_tuning_stage(model, 1), "sgd", steps=1)
        qs = new
    recompress(model, rank=2)
    assert all(m.num_basis == 2 for _, m in basis_layers(model))


@pytest.mark.parametrize("kind", ["eigen", "random"])
def test_state_dict_round_trip(kind):
    model = _converted(kind)
    _steps(model, set_fine_tuning_stage(model, 2), "sgd", steps=1)  # moves BN running statistics too
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = _small(seed=1)
    with pytest.raises(RuntimeError):
        copy.deepcopy(fresh).load_state_dict(sd)
    to_basisconv_like(fresh, sd)
    fresh.load_state_dict(sd)
    fresh.eval()
    x = torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for (_, a), (_, b) in zip(basis_layers(fresh), basis_layers(model)):
        assert (a.kind, a.threshold, a.energy, a.num_basis) == (b.kind, b.threshold, b.energy, b.num_basis)
        assert (a.bn is None) == (b.bn is None)


# --------------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------------
def test_counts_match_hand_computed_formula():
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=True)
    layer = BasisConv2d.from_conv(conv, rank=3)
    # N = 2*9 = 18, P = 5*5 = 25, K = 4, Q = 3
    rep = compression_report(nn.Sequential(layer), (2, 5, 5))
    row = rep["layers"]["0"]
    assert row["out_hw"] == [5, 5] and row["N"] == 18
    assert (row["retained_filters"], row["original_filters"]) == (3, 4)
    assert row["original_mults"] == 4 * 18 * 25 == 1800
    assert (row["basis_mults"], row["projection_mults"], row["mults"]) == (1350, 300, 1650)
    assert (row["learnable"], row["original_learnable"], row["paper_learnable"]) == (16, 76, 12)
    assert row["stored"] == 54 + 12 + 4
    assert row["mult_ratio_formula"] == pytest.approx(3 / 4 + 3 / 18) == pytest.approx(1650 / 1800)
    assert row["learnable_reduction_formula"] == pytest.approx(18 / 3)
    assert rep["model"]["learnable"] == 16 and rep["model"]["original_learnable"] == 76
    # strided, from scratch with batch norm: P = 3*3, learnable adds the 2Q batch-norm affine
    rnd = BasisConv2d.random(2, 4, 3, 3, stride=2, padding=1, seed=0)
    row = layer_counts(rnd, (3, 3))
    assert (row["original_mults"], row["mults"]) == (4 * 18 * 9, 3 * 18 * 9 + 4 * 3 * 9)
    assert (row["learnable"], row["paper_learnable"]) == (12 + 6, 12)
    assert compression_report(nn.Sequential(rnd), (2, 5, 5))["layers"]["0"]["out_hw"] == [3, 3]


@pytest.mark.parametrize("kind", ["eigen", "random"])
def test_model_report_adds_up(kind):
    spatial = _small()
    base = compression_report(spatial, (1, SIDE, SIDE))
    assert base["totals"]["mult_ratio"] == 1.0 and not base["basis_totals"]["layers"]
    model = _converted(kind)
    model.train()
    rep = compression_report(model, (1, SIDE, SIDE))
    assert model.training and all(m.training for m in model.modules())  # modes restored
    rows = rep["layers"].values()
    assert rep["totals"]["mults"] == sum(r["mults"] for r in rows)
    assert rep["totals"]["original_mults"] == base["totals"]["mults"]
    assert rep["totals"]["original_filters"] == base["totals"]["retained_filters"]
    assert rep["model"]["learnable"] == sum(p.numel() for p in model.parameters())
    assert rep["model"]["original_learnable"] == sum(p.numel() for p in spatial.parameters())
    assert rep["basis_totals"]["layers"] == len(basis_layers(model)) == 7
    assert rep["basis_totals"]["learnable_reduction"] > 4


# --------------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3)), "exactly one"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3), threshold=0.9, rank=2), "exactly one"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3), threshold=0.0), "threshold"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3), threshold=1.5), "threshold"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3), rank=0), "rank"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 3, 3), rank=19), "rank"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), threshold=1.0), "groups"),
        (lambda: BasisConv2d.from_conv(nn.Conv2d(2, 2, 3, padding_mode="reflect"), threshold=1.0), "padding_mode"),
        (lambda: BasisConv2d.from_conv(nn.Linear(2, 2), threshold=1.0), "Conv2d"),
        (lambda: BasisConv2d(torch.zeros(3, 2, 3), 4), "4-D"),
        (lambda: BasisConv2d(torch.zeros(3, 2, 3, 3), 0), "out_channels"),
        (lambda: BasisConv2d(torch.zeros(3, 2, 3, 3), 4, stride=0), "stride"),
        (lambda: BasisConv2d(torch.zeros(3, 2, 3, 3), 4, padding=-1), "padding"),
        (lambda: BasisConv2d.random(2, 4, 19, 3), "num_basis"),
        (lambda: BasisConv2d.random(2, 4, 3, 3, seed=0, generator=torch.Generator()), "at most one"),
        (lambda: BasisConv2d.random(2, 4, 3, 3)(torch.zeros(1, 3, 5, 5)), "expected input"),
        (lambda: to_basisconv(nn.Sequential(nn.Conv2d(2, 3, 3))), "exactly one"),
        (lambda: to_basisconv(nn.Sequential(nn.Conv2d(2, 3, 3)), threshold=0.9, which="stem"), "which"),
        (lambda: to_basisconv(nn.Sequential(nn.Conv2d(2, 3, 3)), fraction=1.5), "fraction"),
        (lambda: to_basisconv_random(nn.Sequential(nn.Conv2d(2, 3, 3))), "exactly one"),
        (lambda: set_fine_tuning_stage(nn.Sequential(nn.Conv2d(2, 3, 3)), 3), "stage"),
        (lambda: set_fine_tuning_stage(nn.Sequential(nn.Conv2d(2, 3, 3)), 1), "no BasisConv2d"),
        (lambda: compression_report(nn.Sequential(nn.Conv2d(2, 3, 3)), (2, 2, 5, 5)), "input_shape"),
    ],
)
def test_bad_arguments_raise(call, word):
    with pytest.raises(ValueError, match=word):
        call()

