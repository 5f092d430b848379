import pytest
import torch
from torch import nn

from esdbs_ray.models import ReLUConv2d, StemConv2d, create_model, list_models, register_model

GEOMETRIES = [(1, 28), (3, 32)]


def _width(name):
    return 1.0 if name == "resnet50" else 0.25


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels,size", GEOMETRIES)
def test_output_shape_and_backward(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size, dropout=0.1, width=_width(name))
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_stem_is_spatial_and_inner_convs_own_their_relu(name):
    model = create_model(name, num_classes=10, in_channels=1, image_size=28, width=_width(name))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert type(convs[0]) is StemConv2d  # the image stem has no preceding activation
    assert sum(isinstance(m, ReLUConv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) for m in convs) >= 1


@pytest.mark.parametrize("channels,bias,stride", [(1, False, 1), (1, True, 2), (3, False, 1)])
def test_stem_conv_equals_conv2d_and_runs_channels_last(channels, bias, stride):
    """The stem's channels-last path (single-channel images on the CPU) gives nn.Conv2d's values and
    gradients to float rounding and channels-last activations; RGB stems are nn.Conv2d's own path."""
    torch.manual_seed(3)
    stem = StemConv2d(channels, 8, 5, stride=stride, padding=2, bias=bias)
    ref = nn.Conv2d(channels, 8, 5, stride=stride, padding=2, bias=bias)
    ref.load_state_dict(stem.state_dict())
    x = torch.randn(4, channels, 13, 11)
    y, y_ref = stem(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == (channels == 1)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(stem.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(stem.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert list(stem.state_dict()) == list(ref.state_dict())  # checkpoints read either way


def test_stem_conv_under_torch_func_takes_the_plain_path():
    """Per-sample gradients (the expansion score's torch.func) see nn.Conv2d's computation."""
    stem = StemConv2d(1, 4, 3, padding=1)
    x = torch.randn(5, 1, 6, 6)
    params = dict(stem.named_parameters())

    def loss(p, xi):
        return torch.func.functional_call(stem, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    direct = torch.stack([torch.autograd.grad(stem(xi[None]).square().sum(), stem.weight)[0] for xi in x])
    torch.testing.assert_close(per_sample["weight"], direct, rtol=1e-4, atol=1e-5)
    # an ensemble's stems vmapped over their stacked weights, the images shared (batched weights only)
    stems = [StemConv2d(1, 4, 3, padding=1) for _ in range(3)]
    stacked, _ = torch.func.stack_module_state(stems)
    ys = torch.func.vmap(lambda p, xs: torch.func.functional_call(stem, p, (xs,)), in_dims=(0, None))(stacked, x)
    torch.testing.assert_close(ys, torch.stack([s(x) for s in stems]), rtol=1e-5, atol=1e-5)


def test_relu_conv_equals_relu_then_conv():
    conv = ReLUConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x.relu(), conv.weight, conv.bias, padding=1))


def test_duplicate_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("alexnet")(lambda **kw: None)
    with pytest.raises(ValueError, match="unknown model 'lenet'.*alexnet"):
        create_model("lenet", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="model_names.py"):
        register_model("lenet")(lambda **kw: None)


def test_the_torch_free_name_list_is_the_registry():
    """Config validation checks names against model_names.MODEL_NAMES without importing torch."""
    from esdbs_ray.model_names import MODEL_NAMES

    assert sorted(MODEL_NAMES) == list_models()


def test_width_scales_parameters():
    small = create_model("alexnet", num_classes=10, in_channels=1, image_size=28, width=0.25)
    big = create_model("alexnet", num_classes=10, in_channels=1, image_size=28, width=0.5)
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())
