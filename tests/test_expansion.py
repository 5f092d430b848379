"""Self-expanding secnn (esdbs_ray/expansion.py): function-preserving growth, the natural expansion
score, the controller, the optimizer state, checkpoints."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esdbs_ray import expansion as E
from esdbs_ray.config import ConfigError, ExpansionConfig, TrainConfig
from esdbs_ray.models import SECNN, ReLUConv2d, StemConv2d, create_model
from esdbs_ray.pruning import Pruner, prunable_layers
from esdbs_ray.winograd import WinogradReLUConv2d, is_winograd_eligible, to_winograd_relu

SIZE = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(n=48, seed=0, classes=4, dtype=torch.float64):
    g = _gen(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    x[y == 1] += 0.5  # something to learn
    return x, y


def _trained(dropout=0.0, dtype=torch.float64, steps=4, classes=4, layer_in=None, seed=0):
    """A small secnn (8 channels per block) after a few SGD steps, so BN statistics and weights are not
    at their init; ``layer_in``: a block that gets a residual unit with nonzero alpha first.  A fresh
    copy of one cached network per arguments (float64 convolutions are slow on CPU)."""
    key = (dropout, dtype, steps, classes, layer_in, seed)
    if key not in _TRAINED:
        _TRAINED[key] = _train_small(*key)
    return copy.deepcopy(_TRAINED[key])


_TRAINED: dict = {}


def _train_small(dropout, dtype, steps, classes, layer_in, seed):
    torch.manual_seed(seed)
    m = create_model("secnn", num_classes=classes, in_channels=1, image_size=SIZE, dropout=dropout,
                     width=0.25).to(dtype)
    if layer_in is not None:
        E.add_layer(m, layer_in, generator=_gen(99))
    x, y = _data(classes=classes, dtype=dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    if layer_in is not None:
        with torch.no_grad():
            m.blocks[layer_in].layers[0].alpha.uniform_(0.3, 0.8, generator=_gen(5))
    return m


def _bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


OPS = [("widen", 0, 3), ("widen", 1, 2), ("widen", 2, 5), ("add_layer", 1, 1), ("add_layer", 2, 1)]


# --------------------------------------------------------------------------------------------------
# the registry model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_secnn_is_the_published_seed_network(channels, size):
    m = create_model("secnn", num_classes=10, in_channels=channels, image_size=size)
    assert isinstance(m, SECNN) and m.architecture() == {"widths": [16, 16, 16], "layers": [0, 0, 0]}
    convs = [b.conv for b in m.blocks]
    assert type(convs[0]) is StemConv2d and all(type(c) is ReLUConv2d and is_winograd_eligible(c) for c in convs[1:])
    assert all(isinstance(b.drop, nn.Dropout2d) and isinstance(b.pool, nn.MaxPool2d) for b in m.blocks)
    assert m(torch.randn(2, channels, size, size)).shape == (2, 10)
    wide = create_model("secnn", num_classes=10, in_channels=1, image_size=28, width=2.0)
    assert wide.architecture()["widths"] == [32] * 3


# --------------------------------------------------------------------------------------------------
# function preservation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,block,amount", OPS)
def test_expansion_preserves_the_function_in_eval_mode(op, block, amount):
    m = _trained(layer_in=1)  # block 1 holds a residual unit with nonzero alpha: widening it must keep it
    x, _ = _data(seed=1)
    m.eval()
    with torch.no_grad():
        ref = m(x)
    before = count = E.count_params(m)
    change = E.apply_op(m, op, block, amount, _gen(3))
    assert change.params_before == before and change.params_after == E.count_params(m) > count
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    arch = m.architecture()
    if op == "widen":
        assert arch["widths"][block] == 8 + amount
    else:
        assert arch["layers"][block] == 1 + (block == 1)


@pytest.mark.parametrize("op,block,amount", OPS)
def test_expansion_preserves_the_function_and_bn_statistics_in_train_mode(op, block, amount):
    """Train mode, dropout 0: batch statistics of the new channels never reach the old ones; after one
    training forward the old channels' running statistics are the same as without the expansion."""
    m = _trained(layer_in=1)
    grown = copy.deepcopy(m)
    E.apply_op(grown, op, block, amount, _gen(3))
    x, _ = _data(seed=2)
    m.train(), grown.train()
    torch.testing.assert_close(grown(x), m(x), rtol=0, atol=1e-12)
    old, new = _bn_state(m), _bn_state(grown)
    assert set(old) <= set(new)
    for k, v in old.items():
        torch.testing.assert_close(new[k][tuple(slice(0, s) for s in v.shape)], v, rtol=0, atol=1e-12, msg=k)


def test_an_added_layer_is_exact_in_train_mode_with_dropout():
    """Adding a layer draws no dropout mask, so with dropout 0.2 and the same RNG state the outputs stay
    equal (a widening changes Dropout2d's draw: it is exact for dropout 0, the test above)."""
    m = _trained(dropout=0.2)
    grown = copy.deepcopy(m)
    E.add_layer(grown, 0, generator=_gen(1))
    x, _ = _data(seed=3)
    m.train(), grown.train()
    torch.manual_seed(7)
    ref = m(x)
    torch.manual_seed(7)
    torch.testing.assert_close(grown(x), ref, rtol=0, atol=1e-12)


def test_expansion_keeps_old_parameters_and_initialises_new_ones_as_specified():
    m = _trained(layer_in=1)
    old = {k: v.detach().clone() for k, v in m.state_dict().items()}
    E.widen(m, 1, 3, generator=_gen(4))
    new = m.state_dict()
    for k, v in old.items():
        torch.testing.assert_close(new[k][tuple(slice(0, s) for s in v.shape)], v, rtol=0, atol=0, msg=k)
    b = m.blocks[1]
    assert b.conv.weight[8:].abs().min() > 0  # fresh incoming weights
    assert b.conv.weight[8:].std().item() == pytest.approx(math.sqrt(2 / (11 * 9)), rel=0.2)  # He, fan_out
    assert (b.bn.weight[8:] == 1).all() and (b.bn.bias[8:] == 0).all()
    assert (b.bn.running_mean[8:] == 0).all() and (b.bn.running_var[8:] == 1).all()
    assert (m.blocks[2].conv.weight[:, 8:] == 0).all()  # zero outgoing weights
    unit = b.layers[0]
    assert (unit.conv.weight[:8, 8:] == 0).all() and unit.conv.weight[8:].abs().min() > 0
    assert (unit.alpha[8:] == 0).all() and unit.conv.in_channels == unit.conv.out_channels == 11
    E.widen(m, 2, 2, generator=_gen(4))
    assert (m.head[-1].weight[:, 8:] == 0).all() and m.head[-1].in_features == 10


@pytest.mark.parametrize("op,block,amount", OPS)
def test_expansion_preserves_the_function_of_a_net_already_converted_to_winograd_relu(op, block, amount):
    """On a net whose 3x3 ReLUConv2d are Winograd-ReLU layers (relu=True, the real conversion): the ops
    grow the Winograd-domain weights (new ones G g G^T of He kernels, zero outgoing), a new unit's conv
    is a Winograd-ReLU layer too, and the function is unchanged in eval and train mode."""
    m = _trained(layer_in=1)
    to_winograd_relu(m, impl="functional")
    m.blocks[1].layers[0].conv.impl = "functional"
    x, _ = _data(seed=4)
    ref = copy.deepcopy(m)
    E.apply_op(m, op, block, amount, _gen(3))
    assert sum(isinstance(mod, ReLUConv2d) and is_winograd_eligible(mod) for mod in m.modules()) == 0
    for train in (False, True):
        m.train(train), ref.train(train)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-10)


def test_a_grown_spatial_net_converts_and_prunes():
    """Growth runs on spatial convs, then the member is converted and pruned (spec 2.5): every new 3x3
    conv is eligible; each converted with relu=False after a spatial ReLU (an exact re-parametrisation)
    the grown net computes the same function; to_winograd_relu and the Pruner take it."""
    m = _trained()
    E.add_layer(m, 2, generator=_gen(1))
    E.widen(m, 1, 4, generator=_gen(2))
    E.add_layer(m, 1, generator=_gen(3))
    with torch.no_grad():
        for unit in (m.blocks[1].layers[0], m.blocks[2].layers[0]):
            unit.alpha.fill_(0.5)
    m.eval()
    x, _ = _data(seed=5)
    eligible = [n for n, mod in m.named_modules() if is_winograd_eligible(mod)]
    assert eligible == ["blocks.1.conv", "blocks.1.layers.0.conv", "blocks.2.conv", "blocks.2.layers.0.conv"]
    exact = copy.deepcopy(m)
    for name in eligible:
        parent, _, child = name.rpartition(".")
        setattr(exact.get_submodule(parent), child, nn.Sequential(  # ReLUConv2d = conv(relu(x))
            nn.ReLU(), WinogradReLUConv2d.from_conv2d(m.get_submodule(name), relu=False, impl="functional")))
    with torch.no_grad():
        torch.testing.assert_close(exact(x), m(x), rtol=1e-9, atol=1e-10)
    to_winograd_relu(m, impl="reference")
    pruner = Pruner(m)
    assert [n for n, _ in pruner.layers] == eligible
    report = pruner.prune_to(0.5)
    assert report["overall"] == pytest.approx(0.5, abs=0.01)
    out = m(x)
    assert torch.isfinite(out).all()


def test_expansion_keeps_pruning_masks_in_step():
    m = _trained()
    Pruner(m).prune_to(0.3)
    E.widen(m, 1, 2, generator=_gen(1))
    E.add_layer(m, 1, generator=_gen(2))
    for _, layer in prunable_layers(m):
        assert layer.weight_mask.shape == layer.weight.shape
    assert (m.blocks[2].conv.weight_mask[:, 8:] == 1).all() and (m.blocks[1].layers[0].conv.weight_mask == 1).all()
    Pruner(m).prune_to(0.5)


def test_ops_refuse_other_models_and_bad_arguments():
    with pytest.raises(TypeError, match="secnn"):
        E.widen(create_model("alexnet", num_classes=3, in_channels=1, image_size=28, width=0.25), 0, 2)
    m = create_model("secnn", num_classes=3, in_channels=1, image_size=28, width=0.25)
    with pytest.raises(ValueError, match="blocks 0..2"):
        E.add_layer(m, 3)
    with pytest.raises(ValueError, match="unknown expansion op"):
        E.apply_op(m, "deepen", 0, 1)


# --------------------------------------------------------------------------------------------------
# the natural expansion score
# --------------------------------------------------------------------------------------------------
def _loop_score(model, x, y, lam=None, damping=1e-3):
    """The definition, one sample at a time with autograd (eval mode), in the model's dtype."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    s1 = [torch.zeros_like(p) for p in params]
    s2 = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for a, b, gi in zip(s1, s2, g):
            a += gi
            b += gi * gi
    n = len(y)
    f_mean = sum(float(b.sum()) for b in s2) / n / sum(p.numel() for p in params)
    lam = damping * f_mean if lam is None else lam
    return sum(float(((a / n) ** 2 / (b / n + lam)).sum()) for a, b in zip(s1, s2)), lam


def test_score_equals_a_per_sample_loop_in_float64():
    m = _trained(layer_in=2)
    x, y = _data(n=20, seed=6)
    ref, lam = _loop_score(m, x, y)
    s = E.natural_expansion_score(m, x, y, damping=1e-3, chunk=7)  # chunks of 7: 3 uneven chunks
    assert s.samples == 20 and s.numel == E.count_params(m)
    assert s.lam == pytest.approx(lam, rel=1e-12)
    assert s.eta == pytest.approx(ref, rel=1e-10)
    # a much larger damping gives a smaller score: lambda enters as defined
    assert E.natural_expansion_score(m, x, y, damping=10.0).eta < 0.5 * s.eta
    m.train()  # the scoring runs in eval mode and restores the mode it found
    E.natural_expansion_score(m, x, y)
    assert m.training and all(mod.training for mod in m.modules())


def test_the_activation_method_gives_the_loops_score():
    """check_scores' default for spatial nets: every per-sample gradient from one batch forward and
    backward per chunk (conv, BN, alpha, linear), equal to the loop and to torch.func."""
    m = _trained(layer_in=1)  # a residual unit: its conv, BN and alpha are parameters too
    x, y = _data(n=20, seed=6)
    ref, lam = _loop_score(m, x, y)
    for method in ("activations", "func"):
        current, incs = E.check_scores(m, [], x, y, damping=1e-3, chunk=7, method=method)
        assert incs == [] and current.numel == E.count_params(m)
        assert current.eta == pytest.approx(ref, rel=1e-10) and current.lam == pytest.approx(lam, rel=1e-12)
    to_winograd_relu(m, impl="reference")
    with pytest.raises(ValueError, match="'activations' needs spatial convs"):
        E.check_scores(m, [], x, y, method="activations")


def test_controller_decides_alike_with_either_method():
    a, b = _trained(), _trained()
    x, y = _data(n=16, seed=10)
    da = E.GrowthController(_settings(tau=1.0), x, y, seed=3, method="func").step(a, 0)
    db = E.GrowthController(_settings(tau=1.0), x, y, seed=3, method="activations").step(b, 0)
    assert (da.op, da.block, da.init) == (db.op, db.block, db.init)
    assert [c.eta for c in da.candidates] == pytest.approx([c.eta for c in db.candidates], rel=1e-9)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("op,block,amount", OPS)
def test_candidate_score_is_the_current_plus_its_live_entries(op, block, amount):
    """At the function-preserving start only ``Change.live`` entries (outgoing weights, alpha) have a
    gradient; the old entries' terms are the current network's: the controller's shortcut equals the
    whole score of the expanded network, computed by the per-sample loop."""
    m = _trained(layer_in=1)
    x, y = _data(n=16, seed=7)
    current = E.natural_expansion_score(m, x, y)
    grown = copy.deepcopy(m)
    change = E.apply_op(grown, op, block, amount, _gen(8))
    E.calibrate_new_bn(grown, change, x)
    whole, _ = _loop_score(grown, x, y, lam=current.lam)
    live = E.natural_expansion_score(grown, x, y, lam=current.lam, select=E._live_select(grown, change))
    assert live.eta > 0
    assert current.eta + live.eta == pytest.approx(whole, rel=1e-10)
    # the controller's two ways: torch.func on the expanded copy; the current network's activations
    for method in ("func", "activations"):
        fresh = copy.deepcopy(m)
        ch = E.apply_op(fresh, op, block, amount, _gen(8))
        inc, = E.candidate_increments(m, [(fresh, ch)], x, y, lam=current.lam, chunk=5, calibration=16,
                                      method=method)
        assert inc == pytest.approx(live.eta, rel=1e-9), method


def test_score_of_a_winograd_relu_net_equals_the_loop():
    """The scoring runs Winograd-ReLU layers through their plain-op formula (torch.func cannot transform
    the layer's autograd Functions); the loop runs the layer itself."""
    m = _trained()
    to_winograd_relu(m, impl="reference")
    x, y = _data(n=10, seed=8)
    ref, _ = _loop_score(m, x, y)
    assert E.natural_expansion_score(m, x, y).eta == pytest.approx(ref, rel=1e-9)
    assert all(type(mod).forward is mod.forward.__func__ for mod in m.modules()
               if isinstance(mod, WinogradReLUConv2d))  # the layers' own forward is back


def test_calibration_sets_only_the_new_channels_running_statistics():
    m = _trained()
    x, _ = _data(seed=9)
    old = _bn_state(m)
    change = E.widen(m, 1, 3, generator=_gen(1))
    E.calibrate_new_bn(m, change, x)
    bn = m.blocks[1].bn
    torch.testing.assert_close(bn.running_mean[:8], old["blocks.1.bn.running_mean"], rtol=0, atol=0)
    m.eval()
    h = {}
    handle = bn.register_forward_pre_hook(lambda mod, a: h.setdefault("x", a[0]))
    with torch.no_grad():
        m(x)
    handle.remove()
    new = h["x"][:, 8:]
    torch.testing.assert_close(bn.running_mean[8:], new.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var[8:], new.transpose(0, 1).reshape(3, -1).var(1), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# the controller
# --------------------------------------------------------------------------------------------------
def _settings(**kw):
    base = dict(enabled=True, tau=2.0, cooldown=0, check_every=1, n_init=2, score_samples=16, score_chunk=16,
                calibration_samples=16, penalty=0.0)
    return ExpansionConfig(**{**base, **kw})


def _controller(**kw):
    x, y = _data(n=16, seed=10)
    return E.GrowthController(_settings(**kw), x, y, seed=3)


def test_controller_expands_exactly_when_the_best_ratio_exceeds_tau():
    probe = _controller(tau=1e6).step(_trained(), 0)
    assert probe is not None and not probe.expanded and "<= tau" in probe.decision
    assert len(probe.candidates) == 3 * (1 + 2)  # per block: a widening, n_init=2 new layers
    r = probe.ratio
    best = max(probe.candidates, key=lambda c: c.score)
    assert r == best.ratio == pytest.approx(best.score / probe.score_current) and r > 1
    below = _controller(tau=r * 0.999)
    m = _trained()
    d = below.step(m, 0)
    assert d.expanded and (d.op, d.block) == (best.op, best.block)
    assert d.decision.startswith(best.label()) and f"> tau {r * 0.999:g}" in d.decision
    assert d.params_after == E.count_params(m) > d.params_before
    assert below.ops == [{"epoch": 0, "op": best.op, "block": best.block, "amount": best.amount, "init": best.init}]
    m2 = _trained()
    d2 = _controller(tau=r * 1.001).step(m2, 0)
    assert not d2.expanded and d2.params_after == d2.params_before == E.count_params(m2)


def test_controller_checks_on_its_interval_and_after_the_cooldown():
    c = _controller(tau=1.0, cooldown=3, check_every=2)
    m = _trained()
    checked = {}
    for epoch in range(12):
        d = c.step(m, epoch)
        checked[epoch] = None if d is None else d.expanded
    # checks at epochs 1, 3, 5, ... (every 2nd epoch's end); tau 1 grows at every check; then 3 epochs off
    assert checked == {0: None, 1: True, 2: None, 3: None, 4: None, 5: True, 6: None, 7: None, 8: None,
                       9: True, 10: None, 11: None}
    assert [o["epoch"] for o in c.ops] == [1, 5, 9]
    c2 = _controller(tau=1.0, cooldown=0)
    c2.stop_epoch = 2
    assert [c2.step(_trained(), e) is not None for e in range(4)] == [True, True, False, False]


def test_controller_respects_the_limits():
    d = _controller(tau=1.0, max_width=8, max_layers_per_block=1).step(_trained(), 0)  # no room to widen
    assert {c.op for c in d.candidates} == {"add_layer"}
    d = _controller(tau=1.0, max_layers_per_block=0).step(_trained(), 0)
    assert {c.op for c in d.candidates} == {"widen"}
    m = _trained()
    limit = E.count_params(m) + 300  # below every candidate's size
    d = _controller(tau=1.0, max_params=limit).step(m, 0)
    assert d.candidates == () and not d.expanded and d.decision == "no expansion: no candidate within the limits"
    c = _controller(tau=1.0, max_layers_per_block=1, max_width=8)
    m = _trained()
    for epoch in range(3):
        assert c.step(m, epoch).expanded
    assert m.architecture() == {"widths": [8, 8, 8], "layers": [1, 1, 1]}
    assert not c.step(m, 3).expanded and c.history[-1].candidates == ()


def test_controller_size_penalty():
    d0 = _controller(tau=1e6).step(_trained(), 0)
    penalty = 1e-7
    d = _controller(tau=1e6, penalty=penalty).step(_trained(), 0)
    for a, b in zip(d0.candidates, d.candidates):
        assert b.eta == pytest.approx(a.eta, rel=1e-12)
        assert b.penalty == pytest.approx(math.exp(-penalty * b.params_added ** 2))
        assert b.score == pytest.approx(b.eta * b.penalty) and b.score < a.score
    # the decision is the candidate of largest penalised score; a penalty can stop a growth
    d = _controller(tau=1.0, penalty=penalty).step(_trained(), 0)
    best = max(d.candidates, key=lambda c: c.score)
    assert d.expanded and (d.op, d.block, d.init) == (best.op, best.block, best.init)
    assert _controller(tau=1.0).step(_trained(), 0).expanded
    d = _controller(tau=1.0, penalty=1e-4).step(_trained(), 0)
    assert not d.expanded and all(c.ratio < 1.0 for c in d.candidates)


def test_controller_is_deterministic_given_the_seed_and_leaves_the_global_rng_alone():
    runs = []
    for _ in range(2):
        m = _trained()
        c = _controller(tau=1.0, cooldown=2)
        state = torch.get_rng_state()
        ds = [c.step(m, e) for e in range(4)]
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((ds, m.state_dict()))
    (d1, s1), (d2, s2) = runs
    assert d1 == d2 and [d and d.expanded for d in d1] == [True, None, True, None]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    # another seed draws other initialisations for the same candidate
    a, b = _trained(), _trained()
    E.GrowthController(_settings(tau=1.0, max_layers_per_block=0), *_data(n=16, seed=10), seed=3).step(a, 0)
    E.GrowthController(_settings(tau=1.0, max_layers_per_block=0), *_data(n=16, seed=10), seed=4).step(b, 0)
    assert a.architecture() == b.architecture()
    assert any(pa.shape == pb.shape and not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_decide_leaves_the_network_and_the_controller_alone_until_commit():
    """A trainer closes a level (evaluates, saves the network as it is) between decide and commit."""
    m, ref = _trained(), _trained()
    c, c_ref = _controller(tau=1.0), _controller(tau=1.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = c.decide(m, 0)
    assert d.expanded and d.change is None and c.history == [] and c.ops == [] and c.due(0)
    assert m.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    change = c.commit(m, d)
    d_ref = c_ref.step(ref, 0)
    assert c.history == c_ref.history == [d] and c.ops == c_ref.ops and d_ref == d
    assert change.params_after == d.params_after == E.count_params(m) and m.architecture() == d.architecture
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="after one of epoch 0"):
        c.commit(m, d)


def test_decision_record_round_trips():
    d = _controller(tau=1.0).step(_trained(), 0)
    back = E.ExpansionDecision.from_dict(d.to_dict())
    assert back == d and back.change is None and d.change is not None
    import json

    json.dumps(d.to_dict())  # plain types


# --------------------------------------------------------------------------------------------------
# optimizer state
# --------------------------------------------------------------------------------------------------
def _groups(model):  # as train.build_optimizer: conv weights decay, the rest does not
    decay = [p for mod in model.modules() for n, p in mod.named_parameters(recurse=False)
             if n == "weight" and isinstance(mod, (nn.Conv2d, WinogradReLUConv2d))]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": 1e-4}, {"params": [p for p in model.parameters() if id(p) not in ids],
                                                     "weight_decay": 0.0}]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("op", ["widen", "add_layer"])
def test_optimizer_state_is_kept_for_old_parameters_and_fresh_for_new_ones(kind, op):
    make = (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)) if kind == "sgd" else (
        lambda p: torch.optim.Adam(p, lr=1e-3))
    m = _trained(layer_in=1)
    x, y = _data(seed=11)
    opt = make(_groups(m))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    opt.param_groups[0]["lr"] = 0.123  # set by a schedule: must carry over
    old_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                 for p in m.parameters()}
    old_shapes = {id(p): p.shape for p in m.parameters()}
    change = E.apply_op(m, op, 1, 3, _gen(1))
    new = E.carry_optimizer_state(opt, make(_groups(m)), change)
    assert new.param_groups[0]["lr"] == 0.123
    grown = {id(n): o for o, n in change.grown}
    added = {id(p) for p in change.added}
    assert added or grown
    for p in m.parameters():
        st = new.state.get(p, {})
        if id(p) in added:
            assert not st  # fresh
            continue
        src = id(grown[id(p)]) if id(p) in grown else id(p)
        assert st.keys() == old_state[src].keys()
        for k, v in st.items():
            ref = old_state[src][k]
            if torch.is_tensor(v) and v.shape == p.shape:
                lead = tuple(slice(0, s) for s in old_shapes[src])
                torch.testing.assert_close(v[lead], ref, rtol=0, atol=0)
                rest = v.clone()
                rest[lead] = 0
                assert (rest == 0).all()  # new entries start at zero
            else:
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ref))
    new.zero_grad()
    F.cross_entropy(m(x), y).backward()
    new.step()  # the carried state has the grown shapes


# --------------------------------------------------------------------------------------------------
# checkpoints: rebuild, resume
# --------------------------------------------------------------------------------------------------
def _run(epochs, stop_after=None, resume=None, dropout=0.1):
    """A tiny trainer: SGD with momentum, dropout, growth checks at each epoch's end."""
    x, y = _data(n=32, seed=12, dtype=torch.float32)
    torch.manual_seed(0)
    m = create_model("secnn", num_classes=4, in_channels=1, image_size=SIZE, dropout=dropout, width=0.25)
    ctl = E.GrowthController(_settings(tau=1.0, cooldown=2, n_init=2), x[:16], y[:16], seed=0)
    start = 0
    if resume is not None:
        ctl.load_state_dict(resume["expansion"])
        ctl.rebuild(m)
        m.load_state_dict(resume["model"])
    opt = torch.optim.SGD(_groups(m), lr=0.05, momentum=0.9)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        start = resume["epoch"]
    for epoch in range(start, epochs):
        m.train()
        for i in range(0, 32, 8):
            opt.zero_grad()
            F.cross_entropy(m(x[i:i + 8]), y[i:i + 8]).backward()
            opt.step()
        d = ctl.step(m, epoch)
        if d is not None and d.expanded:
            opt = E.carry_optimizer_state(opt, torch.optim.SGD(_groups(m), lr=0.05, momentum=0.9), d.change)
        if stop_after is not None and epoch == stop_after:
            return copy.deepcopy({"model": m.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                                  "expansion": ctl.state_dict(), "epoch": epoch + 1})
    return m, ctl


def test_state_dict_round_trip_rebuilds_the_grown_architecture():
    ckpt = _run(8, stop_after=4)
    assert len(ckpt["expansion"]["ops"]) >= 2
    m = create_model("secnn", num_classes=4, in_channels=1, image_size=SIZE, dropout=0.1, width=0.25)
    c = E.GrowthController(_settings(tau=1.0, cooldown=2, n_init=2), *_data(n=16, seed=12, dtype=torch.float32), seed=0)
    c.load_state_dict(ckpt["expansion"])
    c.rebuild(m)
    m.load_state_dict(ckpt["model"])  # strict: every grown shape and every added unit is there
    assert m.architecture() == c.history[-1].architecture
    assert c.state_dict() == ckpt["expansion"]
    with pytest.raises(ValueError, match="seed network"):
        c.rebuild(m)  # already grown
    with pytest.raises(ValueError, match="seed"):
        E.GrowthController(_settings(), *_data(n=16, seed=12), seed=1).load_state_dict(ckpt["expansion"])


def test_resumed_run_grows_and_trains_as_the_uninterrupted_one():
    m_ref, c_ref = _run(9)
    assert len(c_ref.ops) >= 3  # grows before and after the interruption
    ckpt = _run(9, stop_after=3)
    assert 0 < len(ckpt["expansion"]["ops"]) < len(c_ref.ops)
    m, c = _run(9, resume=ckpt)
    assert c.ops == c_ref.ops and c.history == c_ref.history
    ref = m_ref.state_dict()
    assert m.state_dict().keys() == ref.keys()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
def test_expansion_config():
    cfg = TrainConfig(model="secnn", expansion={"enabled": True, "tau": 1.5})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.expansion.tau == 1.5
    old = TrainConfig().to_dict()
    del old["expansion"]  # a config (checkpoint) from before the key: the default
    assert TrainConfig.from_dict(old).expansion == ExpansionConfig() and not ExpansionConfig().enabled
    with pytest.raises(ConfigError, match=r"^expansion.enabled=True: growth needs model 'secnn'.*'alexnet'"):
        TrainConfig.from_dict({"model": "alexnet", "expansion": {"enabled": True}})
    TrainConfig.from_dict({"model": "alexnet", "expansion": {"enabled": False, "tau": 3}})  # off: any model
    with pytest.raises(ConfigError, match=r"^expansion.tau=0.5: .*greater than or equal to 1"):
        TrainConfig.from_dict({"model": "secnn", "expansion": {"tau": 0.5}})
    with pytest.raises(ConfigError, match=r"^expansion.n_init=0"):
        TrainConfig.from_dict({"model": "secnn", "expansion": {"n_init": 0}})
    with pytest.raises(ConfigError, match="basis_random"):
        TrainConfig.from_dict({"model": "secnn", "conv": "basis_random", "expansion": {"enabled": True}})


def test_controller_from_a_train_config():
    import numpy as np

    from esdbs_ray.data import DatasetBundle, Split

    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8), rng.integers(0, 3, n), np.arange(n))

    train = split(50)
    data = DatasetBundle("synthetic", train, split(50), split(50), 3, ("a", "b", "c"), (0.5,), (0.25,))
    cfg = TrainConfig(model="secnn", epochs=6, seed=5, expansion={"enabled": True, "score_samples": 20})
    c = E.GrowthController.from_config(cfg, data)
    assert c.x.shape == (20, 1, SIZE, SIZE) and c.stop_epoch == 5 and c.seed == 5
    idx = c.sample_indices
    assert len(set(idx)) == 20 and idx == E.GrowthController.from_config(cfg, data).sample_indices
    torch.testing.assert_close(c.x, (torch.from_numpy(train.images[idx]).float() / 255 - 0.5) / 0.25)
    assert torch.equal(c.y, torch.from_numpy(train.labels[idx]))  # the training split, never val or test
    assert E.GrowthController.from_config(cfg.replace(expansion={"score_samples": 500}), data).x.shape[0] == 50
