"""Winograd-ReLU convolution F(2x2, 3x3) with its weights living in the Winograd domain.

What this gives the project: a drop-in replacement for every 3x3 / stride-1 / padding-1 convolution
whose input is an activation (a :class:`esdbs_ray.models.ReLUConv2d`), computing the paper's eq. 2

    Y = A^T [ Prune(U) ⊙ ReLU(B^T d B) ] A,        summed over input channels,

so that pruning acts on the 16 Winograd-domain weights that are actually multiplied, and the
sparsity survives into the arithmetic (spec section 2).

The maths.  Lavin & Gray's minimal filtering F(2x2, 3x3) computes a 2x2 output tile of a 3x3
cross-correlation from a 4x4 input tile d as  Y = A^T [(G g G^T) ⊙ (B^T d B)] A  (paper eq. 1), with
16 multiplications instead of 36.  The transforms B^T, G, A^T below are rational and tiny; B^T and A^T
hold only 0 and ±1, so the data and output transforms are additions.  Input tiles overlap by 2 pixels
(stride 2).  Summed over input channels the 16 element-wise products become 16 independent matrix
products, one per tile position: M[p] = U[p] (C_out x C_in) @ V[p] (C_in x tiles).  In the plain
Winograd layer a sparse spatial kernel g gives a dense G g G^T, and ReLU'd (sparse) activations d give
a dense B^T d B, so neither kind of sparsity reaches the GEMM.  Liu, Pool, Han & Dally, "Efficient
Sparse-Winograd Convolutional Neural Networks" (ICLR 2018) fix both: the weight U is learned and
pruned directly in the Winograd domain, and the ReLU is applied *after* the input transform
(paper eq. 2).  The layer is then no longer equivalent to any spatial conv; with ``relu=False`` and an
unpruned U = G g G^T it is exactly ``F.conv2d(x, g, padding=1)`` up to rounding, which the tests check.

Implementations (``impl=`` on the layer or :func:`winograd_relu_conv`, else ``$ESDBS_WINOGRAD_IMPL``,
else "auto", which :func:`choose_impl` resolves):

* "native" -- CPU, float32 / float64: the four transform passes, and on AVX-512 CPUs the 16 GEMMs,
  as shape-generic C++ loops (:mod:`esdbs_ray.winograd_native`, built once per machine in ~2 s and
  cached on disk; elsewhere the GEMMs are ``torch.bmm``); nothing is compiled per layer shape.
  "auto" runs it for training and inference on CPU; where it cannot be built (no C++ compiler) it
  warns once and "auto" takes the rules below.
* "fused" -- the functional formulation below compiled by ``torch.compile`` (inductor: C++/OpenMP on
  CPU, Triton on CUDA), one static graph per layer shape with the batch dimension dynamic, so the DBS
  schedule's batch sizes and short last batches never recompile.  Inductor fuses the transforms: one
  loop nest reads each 4x4 input tile once and writes the 16 planes of V = ReLU(B^T d B), one bmm does
  the 16 GEMMs, one kernel writes Y = A^T M A cropped and channels-last; the backward is one kernel
  for A dY A^T, two bmm, and one for the ReLU mask, B dV B^T and the overlap-add.  "auto" runs it on
  CUDA, and for CPU training without the native kernels or in other dtypes; when compiling fails (no
  C++ compiler, no Triton) it warns once and falls back to the reference.
* "triton" -- CUDA, float32 / float16 / bfloat16: four hand-written Triton kernels
  (:mod:`esdbs_ray.winograd_triton`) that keep V and M on chip -- the forward is one kernel (input
  transform, ReLU, the 16 GEMMs on the tensor cores, output transform), the backward three -- and
  save x instead of V.  Checked against the reference in Triton's interpreter; not yet timed on a
  GPU, so "auto" does not choose it (``bench/winograd.py --devices cuda`` times it).
* "reference" -- a custom ``autograd.Function`` with a hand-written backward on NHWC buffers written
  through strided ``out=`` views, saving only the post-ReLU transformed input (eager only).
* "functional" -- the compile-friendly formulation run eagerly; inside any ``torch.compile`` trace the
  layer always takes it, so a whole model compiles with ``fullgraph=True``, forward and backward
  (every registry model is tested).

Layout.  The weight is stored as ``(16, C_in, C_out)`` and the transformed input as
``(16, N * tiles_h * tiles_w, C_in)``, so the forward GEMM is ``bmm(V, U)`` and both backward GEMMs
read the same buffers through transposed views (no copies).  Every intermediate keeps the channel
axis innermost (NHWC): the strided tile views then still have contiguous runs of C values and the
additions vectorise.  The layer's output is a channels-last tensor (NCHW shape, NHWC memory), which
batch norm, pooling and the next Winograd layer consume without a layout copy.

Evidence: ``bench/winograd.py`` (per registry layer shape, CPU and CUDA) and ``bench/throughput.py``
(models in a bare loop and in the trainer).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import threading
import time
import types
import warnings
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._triton import has_triton

from . import winograd_native as native
from .models import ReLUConv2d

__all__ = [
    "BT", "G", "AT",
    "WinogradReLUConv2d",
    "winograd_relu_conv",
    "IMPLS",
    "IMPL_ENV",
    "choose_impl",
    "default_impl",
    "fused_compile_log",
    "resolved_impls",
    "SparseWinogradInference",
    "to_winograd_relu",
    "winograd_layers",
    "is_winograd_eligible",
    "spatial_to_winograd",
    "plot_winograd_kernels",
    "tune_cpu_allocator",
]

# Lavin & Gray F(2x2, 3x3) transforms (kept for reference, G for weight conversion; the data and
# output transforms are hand-expanded into additions below).
BT = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
AT = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])


def spatial_to_winograd(g: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) spatial kernels -> (16, C_in, C_out) Winograd-domain weights G g G^T."""
    if g.dim() != 4 or tuple(g.shape[-2:]) != (3, 3):
        raise ValueError(f"g must have shape (C_out, C_in, 3, 3), got {tuple(g.shape)}")
    Gm = G.to(device=g.device, dtype=g.dtype)
    u = torch.einsum("ia,kcab,jb->ijck", Gm, g, Gm)
    return u.reshape(16, g.shape[1], g.shape[0]).contiguous()


# --------------------------------------------------------------------------------------------------
# transforms: additions on strided views of channels-last buffers
# --------------------------------------------------------------------------------------------------
# Every buffer keeps the channel axis innermost (NHWC), so each strided tile view still has a
# contiguous inner run of C (or K) values and the additions vectorise; with NCHW the inner run would
# be a stride-2 walk over a handful of tile columns, which measured 3-5x slower.
def _pad_nhwc(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """x (N, C, H, W), any memory format -> zero-padded (N, 2th+2, 2tw+2, C) contiguous."""
    n, c, h, w = x.shape
    xp = x.new_empty((n, 2 * th + 2, 2 * tw + 2, c))
    # zero only the border: top row, bottom rows (padding 1 + round-up), left column, right columns
    xp[:, 0].zero_()
    xp[:, h + 1 :].zero_()
    xp[:, 1 : h + 1, 0].zero_()
    xp[:, 1 : h + 1, w + 1 :].zero_()
    xp[:, 1 : h + 1, 1 : w + 1].copy_(x.permute(0, 2, 3, 1))
    return xp


def _input_transform(xp: torch.Tensor, th: int, tw: int, relu: bool) -> torch.Tensor:
    """Padded input (N, 2th+2, 2tw+2, C) -> V = [ReLU](B^T d B) as (16, N*th*tw, C)."""
    n, _, wp, c = xp.shape
    # Row pass: tile row i, offset k reads padded row 2i+k, i.e. a stride-2 view starting at k.
    r = [xp[:, k : k + 2 * th : 2] for k in range(4)]
    R = xp.new_empty((4, n, th, wp, c))
    torch.sub(r[0], r[2], out=R[0])
    torch.add(r[1], r[2], out=R[1])
    torch.sub(r[2], r[1], out=R[2])
    torch.sub(r[1], r[3], out=R[3])
    # Column pass, vectorised over the 4 row results, written straight into the GEMM layout.
    q = [R[:, :, :, k : k + 2 * tw : 2] for k in range(4)]
    V = xp.new_empty((16, n * th * tw, c))
    Vn = V.view(4, 4, n, th, tw, c)
    torch.sub(q[0], q[2], out=Vn[:, 0])
    torch.add(q[1], q[2], out=Vn[:, 1])
    torch.sub(q[2], q[1], out=Vn[:, 2])
    torch.sub(q[1], q[3], out=Vn[:, 3])
    if relu:
        torch.relu_(V)
    return V


def _output_transform(
    M: torch.Tensor, n: int, th: int, tw: int, transposed: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """M (16, N*th*tw, K) [or (16, K, N*th*tw) if transposed] -> Y = A^T M A, (N, 2th, 2tw, K).

    ``out``: an (N, 2th, 2tw, K) contiguous tensor (or view) to write into.
    """
    if transposed:
        k = M.shape[1]
        Mv = M.view(4, 4, k, n, th, tw).permute(0, 1, 3, 4, 5, 2)
    else:
        k = M.shape[2]
        Mv = M.view(4, 4, n, th, tw, k)
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] on rows (vectorised over the 4 columns), then on columns.
    T = M.new_empty((2, 4, n, th, tw, k))
    torch.add(Mv[0], Mv[1], out=T[0]).add_(Mv[2])
    torch.sub(Mv[1], Mv[2], out=T[1]).sub_(Mv[3])
    out = M.new_empty((n, th, 2, tw, 2, k)) if out is None else out.view(n, th, 2, tw, 2, k)
    ov = out.permute(2, 4, 0, 1, 3, 5)  # (a, b, N, th, tw, K)
    torch.add(T[:, 0], T[:, 1], out=ov[:, 0]).add_(T[:, 2])
    torch.sub(T[:, 1], T[:, 2], out=ov[:, 1]).sub_(T[:, 3])
    return out.view(n, 2 * th, 2 * tw, k)


def _output_transform_adjoint(gh: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Gradient of _output_transform: dY (N, 2th, 2tw, K) -> dM = A dY A^T as (16, N*th*tw, K)."""
    n, k = gh.shape[0], gh.shape[3]
    gv = gh.view(n, th, 2, tw, 2, k).permute(2, 4, 0, 1, 3, 5)  # (a, b, N, th, tw, K)
    # Columns of A^T are (1,0), (1,1), (1,-1), (0,-1): the adjoint sends output b to positions j.
    S = gh.new_empty((2, 4, n, th, tw, k))
    S[:, 0].copy_(gv[:, 0])
    torch.add(gv[:, 0], gv[:, 1], out=S[:, 1])
    torch.sub(gv[:, 0], gv[:, 1], out=S[:, 2])
    torch.neg(gv[:, 1], out=S[:, 3])
    dM = gh.new_empty((4, 4, n, th, tw, k))
    dM[0].copy_(S[0])
    torch.add(S[0], S[1], out=dM[1])
    torch.sub(S[0], S[1], out=dM[2])
    torch.neg(S[1], out=dM[3])
    return dM.view(16, n * th * tw, k)


def _input_transform_adjoint(dV: torch.Tensor, n: int, th: int, tw: int) -> torch.Tensor:
    """Gradient of _input_transform (without the ReLU): dV (16, N*th*tw, C) -> d(padded input).

    B^T's rows give the 1-D adjoint d0 = g0, d1 = g1 - g2 + g3, d2 = g1 + g2 - g0, d3 = -g3; tiles
    overlap by two, so padded index 2m collects d0 of tile m and d2 of tile m-1, and index 2m+1
    collects d1 of tile m and d3 of tile m-1 (overlap-add).  Returns (N, 2th+2, 2tw+2, C).
    """
    c = dV.shape[2]
    hp, wp = 2 * th + 2, 2 * tw + 2
    gv = dV.view(4, 4, n, th, tw, c)  # (i, j, N, th, tw, C)
    # Column adjoint + overlap-add along W; E[i] is an (N, th, Wp, C) image per row offset i.
    E = dV.new_empty((4, n, th, tw + 1, 2, c))
    E[:, :, :, tw].zero_()
    e0, e1 = E[:, :, :, :, 0], E[:, :, :, :, 1]
    torch.sub(gv[:, 1], gv[:, 2], out=e1[:, :, :, :tw]).add_(gv[:, 3])
    e0[:, :, :, :tw].copy_(gv[:, 0])
    e0[:, :, :, 1:].add_(gv[:, 1]).add_(gv[:, 2]).sub_(gv[:, 0])
    e1[:, :, :, 1:].sub_(gv[:, 3])
    Ev = E.view(4, n, th, wp, c)
    # Row adjoint + overlap-add along H.
    D = dV.new_empty((n, th + 1, 2, wp, c))
    D[:, th].zero_()
    d0, d1 = D[:, :, 0], D[:, :, 1]
    torch.sub(Ev[1], Ev[2], out=d1[:, :th]).add_(Ev[3])
    d0[:, :th].copy_(Ev[0])
    d0[:, 1:].add_(Ev[1]).add_(Ev[2]).sub_(Ev[0])
    d1[:, 1:].sub_(Ev[3])
    return D.view(n, hp, wp, c)


def _tiles(h: int, w: int) -> tuple[int, int]:
    return (h + 1) // 2, (w + 1) // 2


def _forward_nhwc(x: torch.Tensor, u: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W), u (16, C, K) -> (y as an (N, K, H, W) channels-last view, V)."""
    n, _, h, w = x.shape
    th, tw = _tiles(h, w)
    V = _input_transform(_pad_nhwc(x, th, tw), th, tw, relu)
    M = torch.bmm(V, u)
    # The result must be a base tensor, not a view of a scratch buffer: autograd forbids in-place
    # ops (e.g. a following ReLU(inplace=True)) on views created inside a custom Function.
    y = torch.empty((n, u.shape[2], h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if (2 * th, 2 * tw) == (h, w):
        _output_transform(M, n, th, tw, out=y.permute(0, 2, 3, 1))
    else:  # odd sizes: whole tiles first, then crop (one copy of the output)
        y.permute(0, 2, 3, 1).copy_(_output_transform(M, n, th, tw)[:, :h, :w])
    return y, V


class _WinogradReLUFn(torch.autograd.Function):
    """The layer without bias.  Hand-written backward so every intermediate keeps the GEMM-friendly
    layout; only the (post-ReLU) transformed input is saved, 4x the input's size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, relu: bool) -> torch.Tensor:
        y, V = _forward_nhwc(x, u, relu)
        ctx.save_for_backward(V, u)
        ctx.dims = (x.shape, relu)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        V, u = ctx.saved_tensors
        (n, c, h, w), relu = ctx.dims
        th, tw = _tiles(h, w)
        k = u.shape[2]
        g = grad_out.permute(0, 2, 3, 1)  # free when the incoming gradient is channels-last
        if (2 * th, 2 * tw) == (h, w) and g.is_contiguous():
            gh = g
        else:
            gh = grad_out.new_empty((n, 2 * th, 2 * tw, k))
            gh[:, h:].zero_()
            gh[:, :h, w:].zero_()
            gh[:, :h, :w].copy_(g)
        dM = _output_transform_adjoint(gh, th, tw)
        du = torch.bmm(V.transpose(1, 2), dM) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dV = torch.bmm(dM, u.transpose(1, 2))
            if relu:
                # V holds ReLU(B^T d B): V > 0 exactly where the pre-activation was positive.
                dV = torch.ops.aten.threshold_backward(dV, V, 0)
            dxp = _input_transform_adjoint(dV, n, th, tw)
            dx = dxp[:, 1 : h + 1, 1 : w + 1].permute(0, 3, 1, 2)
        return dx, du, None


# --------------------------------------------------------------------------------------------------
# functional formulation: what torch.compile traces (whole-model compiles, and the fused path)
# --------------------------------------------------------------------------------------------------
# The same F(2x2, 3x3) maths as above with no out=, no in-place and no views written into, so that
# dynamo can trace it and inductor can fuse it.  The shapes of the expressions are chosen for
# inductor: the 16 tile positions are separate (N, th, tw, C) tensors that one torch.stack gathers,
# which inductor lowers to ONE loop nest writing all 16 planes (a horizontally fused ConcatKernel).
# Tiles are read from an even/odd view of the padded image (unbind of the parity axes plus
# contiguous slices), not from stride-2 slices: the backward of a stride-2 slice is a scatter that
# inductor lowers to modulo-masked loads, of an unbind a stack.  The backward is written out
# (a custom Function) rather than derived by autograd, for two measured reasons (2-core Xeon,
# C = K = 96, 28x28, B = 128): autograd's gradient of the 16 per-position selects is a 16-way masked
# sum (200 ms against 30 ms for the written-out stack), and with the ReLU applied per position it
# saves 16 boolean masks, written by scalar stores, instead of reusing V (the forward kernel took 1 s
# instead of 45 ms).  Written out, backward saves only V (post-ReLU) and U, as the reference does.
def _bt_rows(d0, d1, d2, d3):
    """B^T applied along one axis: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _bt_adjoint(g0, g1, g2, g3):
    """B (the adjoint of B^T): the columns of B^T as sums."""
    return g0, g1 - g2 + g3, g1 + g2 - g0, -g3


def _at_rows(m0, m1, m2, m3):
    """A^T applied along one axis: (m0 + m1 + m2, m1 - m2 - m3)."""
    return m0 + m1 + m2, m1 - m2 - m3


def _at_adjoint(g0, g1):
    """A (the adjoint of A^T)."""
    return g0, g0 + g1, g0 - g1, -g1


def _interleave(q: list, n: int, th: int, tw: int) -> torch.Tensor:
    """q[a][b]: (N, th, tw, C) -> (N, 2th, 2tw, C) with out[:, 2i+a, 2j+b] = q[a][b][:, i, j].

    Written as a select on the parity of the output index (torch.where against a 2-element arange)
    so that inductor emits one pointwise kernel over the output, fused with the crop and layout
    copy that follow; nested stacks would materialise the inner stack first."""
    c = q[0][0].shape[-1]
    dev = q[0][0].device
    a0 = torch.arange(2, device=dev).view(1, 1, 2, 1, 1, 1) == 0
    b0 = torch.arange(2, device=dev).view(1, 1, 1, 1, 2, 1) == 0
    e = [[t.view(n, th, 1, tw, 1, c) for t in row] for row in q]
    out = torch.where(a0, torch.where(b0, e[0][0], e[0][1]), torch.where(b0, e[1][0], e[1][1]))
    return out.reshape(n, 2 * th, 2 * tw, c)


def _functional_forward(x: torch.Tensor, u: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W), u (16, C, K) -> (y (N, K, H, W) channels-last, V (16, N*th*tw, C))."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = _tiles(h, w)
    # zero-pad to whole tiles (1 before, 1 + round-up after), channels innermost
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    # E[p][q]: padded rows of parity p, columns of parity q, (N, th+1, tw+1, C); tile (i, j) at
    # offset (a, b) is padded pixel (2i+a, 2j+b) = E[a%2][b%2][:, i + a//2, j + b//2].
    E = [r.unbind(3) for r in xp.reshape(n, th + 1, 2, tw + 1, 2, c).unbind(2)]
    d = [[E[a % 2][b % 2][:, a // 2: a // 2 + th, b // 2: b // 2 + tw] for b in range(4)] for a in range(4)]
    rows = [_bt_rows(*(d[a][b] for a in range(4))) for b in range(4)]  # rows[b][i]
    v = [t for i in range(4) for t in _bt_rows(*(rows[b][i] for b in range(4)))]  # v[4i + j]
    if relu:
        v = [torch.relu(t) for t in v]
    V = torch.stack(v).reshape(16, n * th * tw, c)
    M = torch.bmm(V, u).reshape(16, n, th, tw, k).unbind(0)
    cols = [_at_rows(*(M[4 * i + j] for i in range(4))) for j in range(4)]  # cols[j][a]
    Y = [list(_at_rows(*(cols[j][a] for j in range(4)))) for a in range(2)]  # Y[a][b]
    y = _interleave(Y, n, th, tw)[:, :h, :w].permute(0, 3, 1, 2)
    # a fresh tensor, not a view made inside a custom Function (in-place ops after the layer)
    return y.clone(memory_format=torch.channels_last), V


def _functional_backward(gy: torch.Tensor, V: torch.Tensor, u: torch.Tensor, shape, relu: bool,
                         need_x: bool, need_u: bool):
    """Gradients (dx, du) of _functional_forward; gy (N, K, H, W) any layout."""
    n, c, h, w = shape
    k = u.shape[2]
    th, tw = _tiles(h, w)
    g = F.pad(gy.permute(0, 2, 3, 1), (0, 0, 0, 2 * tw - w, 0, 2 * th - h))  # (N, 2th, 2tw, K)
    G = [r.unbind(3) for r in g.reshape(n, th, 2, tw, 2, k).unbind(2)]  # G[a][b]: (N, th, tw, K)
    s = [_at_adjoint(*G[a]) for a in range(2)]  # s[a][j]
    cols = [_at_adjoint(*(s[a][j] for a in range(2))) for j in range(4)]  # cols[j][i]
    dM = torch.stack([cols[j][i] for i in range(4) for j in range(4)]).reshape(16, n * th * tw, k)
    du = torch.bmm(V.transpose(1, 2), dM) if need_u else None
    if not need_x:
        return None, du
    dV = torch.bmm(dM, u.transpose(1, 2))
    if relu:  # V holds ReLU(B^T d B): V > 0 exactly where the pre-activation was positive
        dV = torch.where(V > 0, dV, 0.0)
    dv = dV.reshape(16, n, th, tw, c).unbind(0)
    r = [_bt_adjoint(*(dv[4 * i + j] for j in range(4))) for i in range(4)]  # r[i][b]
    D = [_bt_adjoint(*(r[i][b] for i in range(4))) for b in range(4)]  # D[b][a]: tile offset (a, b)

    def shift(t, a, b):  # tile i's offset-a pixel is padded row 2(i + a//2) + a%2: shift by a//2
        return F.pad(t, (0, 0, b // 2, 1 - b // 2, a // 2, 1 - a // 2))

    # overlap-add: padded pixel (2m + p, 2m' + q) collects offsets a in {p, p+2}, b in {q, q+2}
    P = [shift(D[q][p], p, q) + shift(D[q + 2][p], p, q + 2) + shift(D[q][p + 2], p + 2, q)
         + shift(D[q + 2][p + 2], p + 2, q + 2) for p in range(2) for q in range(2)]
    # parity-major stack (one fused loop nest), then one copy into the cropped NHWC image; measured
    # 80 ms against 102 ms for an interleave by torch.where (same shape as above)
    dxp = torch.stack(P).reshape(2, 2, n, th + 1, tw + 1, c).permute(2, 3, 0, 4, 1, 5)
    dxp = dxp.reshape(n, 2 * th + 2, 2 * tw + 2, c)
    dx = dxp[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2).clone(memory_format=torch.channels_last)
    return dx, du


class _WinogradFunctionalFn(torch.autograd.Function):
    """The layer without bias, functional: traceable by dynamo, fusable by inductor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, relu: bool) -> torch.Tensor:
        y, V = _functional_forward(x, u, relu)
        ctx.save_for_backward(V, u)
        ctx.shape = tuple(x.shape)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        V, u = ctx.saved_tensors
        dx, du = _functional_backward(grad_out, V, u, ctx.shape, ctx.relu,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, du, None


class _WinogradNativeFn(torch.autograd.Function):
    """The layer without bias on the native CPU kernels (:mod:`esdbs_ray.winograd_native`): the
    reference's passes, each one loop over memory, saving V (post-ReLU) and U; or, fused, all passes
    band by band in cache, saving x and U."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, relu: bool) -> torch.Tensor:
        y, saved, fused = native.forward(x, u, relu)
        ctx.save_for_backward(saved, u)
        ctx.shape, ctx.relu, ctx.fused = tuple(x.shape), relu, fused
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels are opaque to autograd: no double backward
    def backward(ctx, grad_out: torch.Tensor):
        saved, u = ctx.saved_tensors
        dx, du = native.backward(grad_out, saved, ctx.fused, u, ctx.shape, ctx.relu, ctx.needs_input_grad[0],
                                 ctx.needs_input_grad[1])
        return dx, du, None


def _triton_module():
    """esdbs_ray.winograd_triton, imported on first use: importing Triton costs every process ~1 s
    and only a CUDA run (or the interpreter's tests) needs it."""
    try:
        from . import winograd_triton
    except ImportError as e:
        raise ValueError(f"impl 'triton' needs Triton (pip install triton): {e}") from e
    return winograd_triton


class _WinogradTritonFn(torch.autograd.Function):
    """The layer without bias on the hand-written Triton kernels (:mod:`esdbs_ray.winograd_triton`):
    one kernel forward, three backward, V and M never in memory; saves x (NHWC) and U."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, relu: bool) -> torch.Tensor:
        y, xh, plan = _triton_module().forward(x, u, relu)
        # A channels-last x is its own NHWC buffer: save x itself then, so that autograd's version
        # check names an in-place change of x after the layer (a saved view of it would not)
        ctx.x_is_saved = xh.data_ptr() == x.data_ptr() and xh.numel() > 0
        ctx.save_for_backward(x if ctx.x_is_saved else xh, u)
        ctx.shape, ctx.relu, ctx.plan = tuple(x.shape), relu, plan
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # opaque kernels: no double backward
    def backward(ctx, grad_out: torch.Tensor):
        xh, u = ctx.saved_tensors
        if ctx.x_is_saved:
            xh = xh.permute(0, 2, 3, 1)  # contiguous: x is channels-last
        dx, du = _triton_module().backward(grad_out, xh, u, ctx.shape, ctx.relu, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1], ctx.plan)
        return dx, du, None


def _winograd_traceable(x: torch.Tensor, u: torch.Tensor, relu: bool) -> torch.Tensor:
    """The functional layer as one node for dynamo, traced by AOTAutograd: a training step of a
    model compiles in half the time of dynamo tracing every addition (0.8 s against 1.5 s per
    layer, aot_eager backend, 2-core Xeon), and no Python state of the dispatch gets into guards.
    Registered with dynamo (``allow_in_graph``) by :func:`_when_dynamo_imported`."""
    return _WinogradFunctionalFn.apply(x, u, relu)


def _allow_traceable_in_graph() -> None:
    torch.compiler.allow_in_graph(_winograd_traceable)


class _DynamoImportHook(importlib.abc.MetaPathFinder):
    """Runs ``_allow_traceable_in_graph`` right after ``torch._dynamo`` is imported, by whoever.

    ``allow_in_graph`` imports dynamo, 1.6-2 s of CPU (2-core Xeon): every process that imports this
    module paid it, also those that neither compile nor train -- the ``esdbs run`` driver, which
    imports the trainable (a process that trains imports dynamo anyway: torch.optim's
    ``Optimizer.__init__`` does).  Dynamo's registry is keyed by the function's id, so the
    registration only has to happen before dynamo first traces a model, and every compile imports
    dynamo first: the hook wraps its loader once and then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch._dynamo":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, from the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _allow_traceable_in_graph()
        except Exception as e:  # noqa: BLE001 - never fail the caller's import of dynamo over this
            warnings.warn(f"Winograd-ReLU: registering the layer with dynamo failed ({type(e).__name__}: {e}); "
                          "a compiled model traces through it instead (slower to compile)", RuntimeWarning)

    def __getattr__(self, name):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, name)


def _when_dynamo_imported() -> None:
    if "torch._dynamo" in sys.modules:
        _allow_traceable_in_graph()
    elif not any(isinstance(f, _DynamoImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _DynamoImportHook())


_when_dynamo_imported()


# --------------------------------------------------------------------------------------------------
# implementation choice: native (C++ kernels, CPU) / fused (compiled) / triton (hand-written, CUDA) /
# reference (hand-written, eager) / functional (eager)
# --------------------------------------------------------------------------------------------------
IMPLS = ("auto", "native", "fused", "triton", "reference", "functional")
IMPL_ENV = "ESDBS_WINOGRAD_IMPL"

_fused_lock = threading.Lock()
_fused_fns: dict[tuple, Callable] = {}
_fused_broken: dict[str, str] = {}  # device type -> why compiling failed there (auto then falls back)
_fused_compiles: list[dict] = []  # one record per compiled variant: its key and first-call seconds
_native_warned: list[bool] = []  # the one warning that the native kernels are unavailable was given


def default_impl() -> str:
    """The implementation a layer with ``impl=None`` asks for: ``$ESDBS_WINOGRAD_IMPL`` or "auto"."""
    return _check_impl(os.environ.get(IMPL_ENV, "").strip().lower() or "auto", f"${IMPL_ENV}")


def _check_impl(impl: str, what: str = "impl") -> str:
    if impl not in IMPLS:
        raise ValueError(f"{what} must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def _native_available() -> bool:
    """Whether the native kernels load here (built on first use); warns once when they do not."""
    try:
        native.library()
        return True
    except native.NativeUnavailable as e:
        if not _native_warned:
            _native_warned.append(True)
            first = str(e).strip().splitlines()[0]
            warnings.warn(f"Winograd-ReLU: the native CPU kernels are unavailable ({first}); training on CPU "
                          f"compiles the layer per shape instead (fused), inference runs the reference. "
                          f"Set {IMPL_ENV}=reference to skip both attempts.", RuntimeWarning, stacklevel=4)
        return False


def choose_impl(x: torch.Tensor, u: torch.Tensor, impl: str | None = None, dtype: torch.dtype | None = None) -> str:
    """What ``winograd_relu_conv(x, u, impl=impl)`` runs: "native", "fused", "triton", "reference" or "functional".

    ``dtype``: the dtype the layer computes in (autocast's; default ``x.dtype``).  Inside a
    torch.compile trace always "functional" (the caller's compile fuses it).  "auto" picks "native"
    (the C++ kernels, no per-shape compile) on CPU in float32 / float64, for training and inference;
    "fused" (this layer compiled by inductor) on CUDA, and for CPU training steps in other dtypes or
    where the native kernels cannot be built; "reference" otherwise: CPU inference without the native
    kernels (one compile per layer shape and mode costs 10-20 s on 2 cores, more than an evaluation
    pass saves), a batch of one (it would specialise the compiled graph), other devices, and a device
    where compiling failed once.  "triton" runs only when asked for.
    """
    if torch.compiler.is_compiling():
        return "functional"
    impl = default_impl() if impl is None else _check_impl(impl)
    if impl != "auto":
        return impl
    dev = x.device.type
    compute = x.dtype if dtype is None else dtype
    if dev == "cpu" and compute in (torch.float32, torch.float64) and _native_available():
        return "native"
    if dev not in ("cpu", "cuda") or dev in _fused_broken or x.shape[0] < 2:
        return "reference"
    if dev == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)):
        return "reference"
    return "fused"


def check_impl_runs(impl: str, device: torch.device | str, dtype: torch.dtype, what: str = "impl") -> None:
    """Raise ValueError, naming ``what``, when ``impl`` cannot run on ``device`` in ``dtype`` (checked
    before training starts rather than at the first step)."""
    impl = _check_impl(impl, what)
    dev = torch.device(device).type
    if impl == "native" and not (dev == "cpu" and dtype in (torch.float32, torch.float64)):
        raise ValueError(f"{what}='native' runs float32 / float64 on CPU; this run computes {dtype} on {dev}")
    if impl == "triton" and (dev != "cuda" or dtype not in _triton_module().DTYPES):  # (names a missing Triton)
        raise ValueError(f"{what}='triton' runs float32 / float16 / bfloat16 on CUDA; this run computes "
                         f"{dtype} on {dev}")


def resolved_impls(device: torch.device | str, dtype: torch.dtype = torch.float32, impl: str | None = None) -> dict:
    """What a layer with ``impl`` (None: the default) runs on ``device`` computing in ``dtype``, for a
    training step and for inference, and the native kernels' state: stamped on every SWR member's
    summary, so a result says which implementation made it."""
    dev = torch.device(device)
    x = torch.zeros(2, 1, 2, 2, device=dev)
    u = torch.zeros(16, 1, 1, device=dev, requires_grad=True)
    with torch.enable_grad():
        training = choose_impl(x, u, impl, dtype=dtype)
    with torch.no_grad():
        inference = choose_impl(x, u, impl, dtype=dtype)
    out = {"training": training, "inference": inference, "dtype": str(dtype).replace("torch.", "")}
    if "native" in (training, inference):
        st = native.status()
        out["native"] = {"binary": st["path"], "built_here_s": st["build_seconds"], "mode": native.mode(),
                         # who runs the GEMMs: the library's AVX-512 kernels, fused or not, or torch.bmm
                         "small_layers": native.path(dtype, 16, 16), "large_layers": native.path(dtype, 256, 256)}
    return out


def fused_compile_log() -> list[dict]:
    """One record per compiled variant so far: key fields and the seconds its first call took
    (compile of forward and backward plus one run)."""
    return [dict(r) for r in _fused_compiles]


def _fused_entry(key: tuple, relu: bool, dtype: torch.dtype) -> Callable:
    def entry(x, u):
        return _winograd_traceable(x.to(dtype), u.to(dtype), relu)

    # A fresh code object per variant: dynamo keeps compiled graphs per code object, falls back to
    # eager after recompile_limit (8) of them, and on the second layer shape would make C, H, W
    # dynamic -- generic kernels measured 10-30 % slower (median 1.12x against 0.89x F.conv2d over
    # the bench shapes) and 100 s to compile.  One static graph per layer shape, batch dynamic.
    name = "winograd_relu_fused_" + "_".join(str(v).replace("torch.", "").replace(".", "_") for v in key)
    name = "".join(ch if ch.isalnum() else "_" for ch in name)
    code = entry.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    fn = types.FunctionType(code, entry.__globals__, name, None, entry.__closure__)
    return torch.compile(fn, fullgraph=True, dynamic=None)


def _eager_backward_compile():
    # Compile the backward together with the forward so that a failure shows up here, where the
    # reference path can take over, and not in loss.backward().
    cfg = getattr(torch._functorch, "config", None)
    if cfg is not None and hasattr(cfg, "force_non_lazy_backward_lowering"):
        return cfg.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _fused(x: torch.Tensor, u: torch.Tensor, relu: bool, dtype: torch.dtype, strict: bool) -> torch.Tensor | None:
    """Run the compiled layer; None (after one warning) when compiling fails and not ``strict``."""
    dev = x.device.type
    training = torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)
    # The compiled kernels read channels-last input: an NCHW input is transposed by aten first.
    # Inductor's own transposing loads in the input-transform kernel measured 3x slower than the
    # transform after aten's copy (C = 96, 28x28, B = 128, 2 cores), and one layout halves compiles.
    x = x.contiguous(memory_format=torch.channels_last)
    key = (dev, x.device.index, str(dtype).replace("torch.", ""), "relu" if relu else "norelu",
           *x.shape[1:], u.shape[2], "train" if training else "infer")
    try:
        if dev == "cuda" and not has_triton():
            raise RuntimeError("Triton is not installed")
        with _fused_lock:
            fn = _fused_fns.get(key)
            first = fn is None
            if first:
                fn = _fused_fns[key] = _fused_entry(key, relu, dtype)
        if x.shape[0] >= 2:
            torch._dynamo.mark_dynamic(x, 0)  # one graph for every batch size >= 2
        if not first:
            return fn(x, u)
        t0 = time.perf_counter()
        with _eager_backward_compile() if training else contextlib.nullcontext():
            y = fn(x, u)
        _fused_compiles.append({"key": key, "seconds": time.perf_counter() - t0})
        return y
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so once
        if strict:
            raise
        with _fused_lock:
            _fused_fns.pop(key, None)
            first_failure = dev not in _fused_broken
            _fused_broken[dev] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if first_failure:
            warnings.warn(
                f"Winograd-ReLU: compiling the fused layer failed on {dev} ({_fused_broken[dev]}); using the "
                f"reference implementation on {dev} from now on. Set {IMPL_ENV}=reference to skip the attempt.",
                RuntimeWarning, stacklevel=4)
        return None


def _reset_fused_state() -> None:
    """Forget compiled variants and failures, and the native kernels' warning (tests)."""
    with _fused_lock:
        _fused_fns.clear()
        _fused_broken.clear()
        _fused_compiles.clear()
        _native_warned.clear()


def winograd_relu_conv(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = True,
    impl: str | None = None,
) -> torch.Tensor:
    """Functional form: x (N, C_in, H, W), u (16, C_in, C_out) -> (N, C_out, H, W).

    The result is channels-last in memory (NCHW shape, NHWC strides): converting back would cost a
    full copy per layer, and batch norm, pooling and the next Winograd layer all take channels-last
    input directly.  ``impl``: "auto" (default, or ``$ESDBS_WINOGRAD_IMPL``), "native", "fused",
    "triton", "reference" or "functional"; see :func:`choose_impl`.  Under autocast the layer computes in the autocast
    dtype (e.g. bf16 on CUDA), all of it, like the GEMM-bound ops autocast lowers.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (16, {x.shape[1]}, C_out), got {tuple(u.shape)}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Custom Functions run outside autocast: apply its policy for GEMM-bound ops here.
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _winograd_run(x, u, bias, relu, impl, dtype)
    if x.dtype != u.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from weight dtype {u.dtype}")
    return _winograd_run(x, u, bias, relu, impl, x.dtype)


def _winograd_run(x, u, bias, relu, impl, dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # part of the caller's graph (checked first: no env reads traced)
        y = _winograd_traceable(x.to(dtype), u.to(dtype), relu)
    else:
        requested = default_impl() if impl is None else _check_impl(impl)
        choice = choose_impl(x, u, requested, dtype)
        y = _fused(x, u, relu, dtype, strict=requested == "fused") if choice == "fused" else None
        if y is None:
            x, u = x.to(dtype), u.to(dtype)
            if choice == "native" and not native.supports(x, u):
                raise ValueError(f"impl 'native' runs float32 / float64 on CPU; got {dtype} on {x.device.type}")
            fn = {"native": _WinogradNativeFn, "functional": _WinogradFunctionalFn,
                  "triton": _WinogradTritonFn}.get(choice, _WinogradReLUFn)
            y = fn.apply(x, u, relu)
    if bias is not None:
        y = y + bias.to(dtype).view(1, -1, 1, 1)
    return y


class WinogradReLUConv2d(nn.Module):
    """3x3 / stride 1 / padding 1 convolution computed as Y = A^T [U ⊙ ReLU(B^T d B)] A (eq. 2).

    ``weight`` is the Winograd-domain tensor U of shape (16, C_in, C_out) (tile position first);
    ``kernels_4x4()`` gives the (C_out, C_in, 4, 4) copy used in figures.  With ``relu=False`` this is
    an exact re-parametrisation of a spatial 3x3 conv (when U = G g G^T).  ``impl`` picks the
    implementation (None: ``$ESDBS_WINOGRAD_IMPL`` or "auto"; see :func:`choose_impl`); it is not part
    of the state dict.
    """

    kernel_size = (3, 3)
    stride = (1, 1)
    padding = (1, 1)

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True, bias: bool = False,
                 device=None, dtype=None, impl: str | None = None):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be > 0, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels, self.relu = in_channels, out_channels, relu
        self.impl = None if impl is None else _check_impl(impl)
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(16, in_channels, out_channels, **fk))
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as the spatial models (kaiming fan_out on the 3x3 kernel), then mapped through G.
        g = torch.empty(self.out_channels, self.in_channels, 3, 3, device=self.weight.device,
                        dtype=self.weight.dtype)
        nn.init.kaiming_normal_(g, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.weight.copy_(spatial_to_winograd(g))
            if self.bias is not None:
                self.bias.zero_()

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, relu: bool = True, impl: str | None = None) -> "WinogradReLUConv2d":
        """Initialise U = G g G^T from a 3x3 / stride-1 / padding-1 ``nn.Conv2d`` (bias copied)."""
        why = _ineligible_reason(conv)
        if why:
            raise ValueError(f"conv: {why}")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, relu=relu, bias=conv.bias is not None,
                    device=w.device, dtype=w.dtype, impl=impl)
        with torch.no_grad():
            layer.weight.copy_(spatial_to_winograd(w.detach()))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        layer.train(conv.training)
        return layer

    def kernels_4x4(self) -> torch.Tensor:
        """(C_out, C_in, 4, 4) copy of the Winograd-domain kernels (detached)."""
        return self.weight.detach().permute(2, 1, 0).reshape(self.out_channels, self.in_channels, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_relu_conv(x, self.weight, self.bias, self.relu, self.impl)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), "
                f"relu={self.relu}, bias={self.bias is not None}, domain=winograd F(2x2,3x3)"
                + (f", impl={self.impl}" if self.impl else ""))


# --------------------------------------------------------------------------------------------------
# sparse inference
# --------------------------------------------------------------------------------------------------
class SparseWinogradInference:
    """Inference-only evaluation of a pruned Winograd-ReLU layer that skips the pruned weights.

    ``mode="csr"``: per tile position p, the nonzero entries of U[p]^T (C_out x C_in) are kept in a
    CSR matrix and multiplied by the transformed input V[p] (C_in x tiles), so the multiplications
    per 2x2 output tile are 16 C_in C_out density; positions whose weights are all pruned are
    skipped outright.  On CPU torch's CSR product (MKL sparse BLAS) runs far below dense GEMM
    throughput, so this path only pays off at very high sparsity; see bench/winograd.py.
    ``mode="dense"``: the packed dense bmm of the training path (reference).
    """

    def __init__(self, layer: WinogradReLUConv2d, mode: str = "csr"):
        if mode not in ("csr", "dense"):
            raise ValueError(f"mode must be 'csr' or 'dense', got {mode!r}")
        self.mode, self.relu = mode, layer.relu
        u = layer.weight.detach()
        if hasattr(layer, "weight_mask"):
            u = u * layer.weight_mask.to(u.dtype)
        self.u = u.contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.c, self.k = u.shape[1:]
        self.nnz = int((u != 0).sum())
        self.density = self.nnz / u.numel()
        if mode == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, not actionable
                warnings.simplefilter("ignore", UserWarning)
                self.w = [u[p].t().contiguous().to_sparse_csr() if bool((u[p] != 0).any()) else None
                          for p in range(16)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        th, tw = _tiles(h, w)
        xp = _pad_nhwc(x, th, tw)
        if self.mode == "dense":
            y = _output_transform(torch.bmm(_input_transform(xp, th, tw, self.relu), self.u), n, th, tw)
        else:
            # torch's CSR x dense product wants a row-major dense operand: one transposing copy
            # (measured cheaper than writing the transform's strided output transposed).
            Vt = _input_transform(xp, th, tw, self.relu).transpose(1, 2).contiguous()  # (16, C, T)
            Mt = Vt.new_empty((16, self.k, Vt.shape[2]))
            for p, wp in enumerate(self.w):
                if wp is None:
                    Mt[p].zero_()
                else:
                    torch.mm(wp, Vt[p], out=Mt[p])
            y = _output_transform(Mt, n, th, tw, transposed=True)
        y = y[:, :h, :w].permute(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


def tune_cpu_allocator() -> bool:
    """Keep freed CPU memory in glibc's heap instead of returning it to the OS (process-wide, opt-in).

    The layer allocates a few buffers of 4x the activation size per call.  glibc serves blocks over
    32 MiB with fresh ``mmap`` pages and unmaps them on free, so every step pays a page fault (and a
    kernel zeroing) per 4 KiB touched -- measured at 1.5-3x the cost of the arithmetic in the
    memory-bound transforms on CPU.  ``mallopt(M_MMAP_MAX, 0)`` + a high ``M_TRIM_THRESHOLD`` makes
    the steady state reuse the same pages.  Memory is then not returned to the OS until exit.
    Returns False where glibc is not available (e.g. macOS, musl); a no-op for CUDA tensors.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# model conversion
# --------------------------------------------------------------------------------------------------
def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _ineligible_reason(conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"expected an nn.Conv2d, got {type(conv).__name__}"
    if _pair(conv.kernel_size) != (3, 3):
        return f"kernel_size must be 3x3, got {conv.kernel_size}"
    if _pair(conv.stride) != (1, 1):
        return f"stride must be 1, got {conv.stride}"
    if conv.padding not in ("same",) and _pair(conv.padding) != (1, 1):
        return f"padding must be 1, got {conv.padding}"
    if _pair(conv.dilation) != (1, 1):
        return f"dilation must be 1, got {conv.dilation}"
    if conv.groups != 1:
        return f"groups must be 1, got {conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode must be 'zeros', got {conv.padding_mode!r}"
    return None


def is_winograd_eligible(module: nn.Module) -> bool:
    """True for a ReLUConv2d that is 3x3, stride 1, padding 1, dilation 1, groups 1, zero padding."""
    return isinstance(module, ReLUConv2d) and _ineligible_reason(module) is None


def to_winograd_relu(model: nn.Module, impl: str | None = None) -> nn.Module:
    """Replace, in place, every eligible ReLUConv2d by a WinogradReLUConv2d(relu=True, impl=impl);
    returns model.

    The ReLUConv2d's own input ReLU is exactly the spatial ReLU that moves into the Winograd domain
    (see models.py).  Strided / 1x1 ReLUConv2d and plain nn.Conv2d (the image stem) stay spatial.
    """
    targets = [(name, m) for name, m in model.named_modules() if is_winograd_eligible(m)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, WinogradReLUConv2d.from_conv2d(conv, relu=True, impl=impl))
    return model


def winograd_layers(model: nn.Module) -> list[tuple[str, WinogradReLUConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WinogradReLUConv2d)]


# --------------------------------------------------------------------------------------------------
# figure (paper Fig. 5a)
# --------------------------------------------------------------------------------------------------
def plot_winograd_kernels(
    layer_or_kernels_by_sparsity: WinogradReLUConv2d | torch.Tensor | Mapping[float, torch.Tensor],
    path: str | None = None,
    *,
    in_channels: int = 6,
    out_channels: int = 6,
    title: str | None = None,
    cmap: str = "RdBu_r",
    zero_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
    dpi: int = 100,
) -> np.ndarray:
    """Grid of 4x4 Winograd-domain kernels (first ``out_channels`` rows x ``in_channels`` columns),
    one panel per sparsity side by side; exact zeros (pruned) drawn in ``zero_color`` (black).

    Accepts a layer, a (C_out, C_in, 4, 4) tensor, or a dict {sparsity: tensor}.  Saves a PNG to
    ``path`` when given and returns the figure as an HWC uint8 RGB array (for TensorBoard).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    src = layer_or_kernels_by_sparsity
    if isinstance(src, WinogradReLUConv2d):
        k = src.kernels_4x4()
        if hasattr(src, "weight_mask"):
            k = k * src.weight_mask.detach().permute(2, 1, 0).reshape(k.shape).to(k.dtype)
        src = {float((k == 0).float().mean()): k}
    elif isinstance(src, torch.Tensor):
        src = {float((src == 0).float().mean()): src}
    if not isinstance(src, Mapping) or not src:
        raise ValueError("layer_or_kernels_by_sparsity must be a layer, a tensor or a non-empty dict")
    panels = []
    for s, k in sorted(src.items()):
        k = torch.as_tensor(k).detach().float().cpu()
        if k.dim() != 4 or tuple(k.shape[-2:]) != (4, 4):
            raise ValueError(f"kernels for sparsity {s} must be (C_out, C_in, 4, 4), got {tuple(k.shape)}")
        panels.append((s, k[:out_channels, :in_channels].numpy()))
    vmax = max(float(np.abs(p).max()) for _, p in panels) or 1.0
    colormap = plt.get_cmap(cmap)

    gap = 1
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (s, k) in enumerate(panels):
        ko, ki = k.shape[:2]
        img = np.ones((ko * (4 + gap) - gap, ki * (4 + gap) - gap, 3))  # white gaps
        for o in range(ko):
            for c in range(ki):
                tile = k[o, c]
                rgb = colormap(0.5 + 0.5 * tile / vmax)[..., :3]
                rgb[tile == 0] = zero_color
                img[o * (4 + gap): o * (4 + gap) + 4, c * (4 + gap): c * (4 + gap) + 4] = rgb
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"sparsity {100 * s:.0f}%")
        ax.set_xlabel("input channel")
        ax.set_ylabel("output channel")
        ax.set_xticks([c * (4 + gap) + 1.5 for c in range(ki)], [str(c) for c in range(ki)])
        ax.set_yticks([o * (4 + gap) + 1.5 for o in range(ko)], [str(o) for o in range(ko)])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        fig.savefig(path)
    return arr
