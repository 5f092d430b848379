"""compression.conv_cost: the multiplications, weights and filters every rung records,
against hand-computed formulas for spatial, pruned, Winograd-ReLU and BasisConv layers."""
import math

import torch
from torch import nn

from esdbs_ray.basisconv import BasisConv2d
from esdbs_ray.compression import conv_cost


def _net(conv: nn.Module) -> nn.Module:
    return nn.Sequential(conv, nn.Flatten())


def test_spatial_and_pruned_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)  # 8 x 8 input -> 8 x 8 output
    dense = conv_cost(_net(conv), (3, 8, 8))
    assert dense["conv_mults"] == dense["dense_conv_mults"] == 8 * 3 * 9 * 64
    assert dense["conv_weights"] == 8 * 27 + 8 and dense["filters"] == dense["dense_filters"] == 8
    assert dense["mult_ratio"] == 1.0
    with torch.no_grad():
        conv.weight.view(-1)[:100] = 0.0  # 100 of 216 weights pruned
    pruned = conv_cost(_net(conv), (3, 8, 8))
    assert pruned["conv_mults"] == (216 - 100) * 64 and pruned["dense_conv_mults"] == 216 * 64
    assert pruned["conv_weights"] == 116 + 8 and math.isclose(pruned["mult_ratio"], 116 / 216)


def test_winograd_counts_nonzero_domain_weights_per_tile():
    from esdbs_ray.winograd import WinogradReLUConv2d

    layer = WinogradReLUConv2d(4, 6)  # 3x3, padding 1
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:5] = 1.0  # 5 of 16 Winograd positions, every (C_in, C_out) pair
    c = conv_cost(_net(layer), (4, 6, 6))  # 6 x 6 output: 3 x 3 tiles of 2 x 2
    nnz = 5 * 4 * 6
    assert c["conv_mults"] == nnz * 9 and c["dense_conv_mults"] == 9 * 4 * 6 * 36
    assert c["filters"] == c["dense_filters"] == 6


def test_basisconv_counts_are_the_papers_formulas():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 10, 3, padding=1, bias=False)
    layer = BasisConv2d.from_conv(conv, rank=5)  # Q = 5, K = 10, N = 36
    c = conv_cost(_net(layer), (4, 7, 7))
    p, q, k, n = 49, 5, 10, 36
    assert c["conv_mults"] == q * n * p + k * q * p and c["dense_conv_mults"] == k * n * p
    assert c["conv_weights"] == k * q and c["dense_conv_weights"] == k * n  # the fixed basis is not learnable
    assert c["filters"] == q and c["dense_filters"] == k
    assert math.isclose(c["mult_ratio"], q / k + q / n)
