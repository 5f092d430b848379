"""The Winograd-ReLU layer's maths and its autograd Functions (no choice of implementation here).

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

Layout.  The weight is stored as ``(16, C_in, C_out)`` and the transformed input as
``(16, N * tiles_h * tiles_w, C_in)``, so the forward GEMM is ``bmm(V, U)`` and both backward GEMMs
read the same buffers through transposed views (no copies).  Every intermediate keeps the channel
axis innermost (NHWC): the strided tile views then still have contiguous runs of C values and the
additions vectorise.  The layer's output is a channels-last tensor (NCHW shape, NHWC memory), which
batch norm, pooling and the next Winograd layer consume without a layout copy.

What is here: the transforms B^T, G, A^T; the reference layer (``_WinogradReLUFn``: a hand-written
backward on NHWC buffers written through strided ``out=`` views); the functional formulation that
``torch.compile`` traces (``_WinogradFunctionalFn``, and ``_winograd_traceable``, registered with dynamo
as one node); and the Functions over the native CPU kernels (:mod:`esdbs_ray.winograd_native`) and the
Triton kernels (:mod:`esdbs_ray.winograd_triton`).  Which one runs is :mod:`esdbs_ray.winograd_dispatch`'s
decision; the layer is :mod:`esdbs_ray.winograd`.

Evidence: ``bench/winograd.py`` (per registry layer shape, CPU and CUDA) and ``bench/throughput.py``
(models in a bare loop and in the trainer).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import warnings

import torch
import torch.nn.functional as F

from . import winograd_native as native
from .errors import UserError

__all__ = ["BT", "G", "AT", "spatial_to_winograd"]


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
# (a custom Function) rather than derived by autograd: autograd's gradient of the 16 per-position
# selects is a 16-way masked sum, and with the ReLU applied per position it saves 16 boolean masks
# instead of reusing V (both several times slower: bench/winograd.py).  Written out, backward saves
# only V (post-ReLU) and U, as the reference does.
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
        raise UserError(f"impl 'triton' needs Triton (pip install triton): {e}") from e
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
