"""Winograd-ReLU F(2x2, 3x3) as four hand-written Triton kernels: ``impl="triton"`` (CUDA).

What it is for: on the GPU the compiled layer ("fused": inductor's Triton kernels around cuBLAS)
measured 2.0x cuDNN at batch 128 in bf16 and 1.7x at batch 1024 (one H100, 2026-11-23,
``bench/results/gpu-h100-2026-11-23``).  That layer still writes the transformed input V and the
products M to memory (4x the input and 4x the output, each written and read back) and runs seven
kernels a step.  Here each pass keeps them on chip:

* forward, one kernel: a program owns BT tiles x BN output channels; over C in chunks of BR it loads
  the 4x4 input tiles (zero padding by masking), forms V = ReLU(B^T d B) in registers, and adds
  ``V[p] @ U[p]`` into 16 accumulators (one per tile position p, on the tensor cores); the output
  transform Y = A^T M A is its epilogue, which writes the cropped channels-last output.
* dx, two kernels: dM = A dY A^T is formed from dY as it is loaded; ``dM[p] @ U[p]^T`` goes into 16
  accumulators; the ReLU's mask is V > 0 with V recomputed from x (x is what is saved, a quarter of
  V); B dV B^T then gives each tile's 16 input-pixel contributions.  Tiles overlap by two pixels, so
  a pixel collects from up to four tiles: each tile writes into one of four planes by its quadrant
  (no two tiles of a plane meet), and a second small kernel sums the planes and crops.  Fixed order,
  no atomics: the same bits every run.
* dU, one kernel: per (C block, K block, T split) ``V[p]^T @ dM[p]`` summed over the split's tiles,
  V and dM recomputed from x and dY; the splits' partial sums are added by ``torch.sum`` (again a
  fixed order).

Block sizes are fixed per layer shape (:func:`blocks`), not autotuned, so that a run is reproducible;
``$ESDBS_TRITON_BLOCKS="BT,BN,BR,warps,stages"`` overrides them for a sweep (``bench/winograd.py``).

Status: correct against the reference layer in Triton's interpreter (``TRITON_INTERPRET=1``, CPU;
``bench/winograd_triton_check.py``, ``tests/test_winograd_triton.py``) in float32 and float16;
bfloat16, the trainer's autocast dtype, is checked on a GPU only (the interpreter's tl.dot multiplies
bf16's raw bits).  Nothing here has run on a GPU yet (none was lent when it was written), so "auto"
does not choose it; ``bench/winograd.py --devices cuda`` times it beside cuDNN and the compiled layer.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["supports", "interpreted", "blocks", "forward", "backward", "BLOCKS_ENV", "DTYPES"]

BLOCKS_ENV = "ESDBS_TRITON_BLOCKS"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in


# --------------------------------------------------------------------------------------------------
# the transforms, one axis at a time (the same expressions as winograd._bt_rows and friends)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bt(d0, d1, d2, d3):
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@triton.jit
def _bt_adj(g0, g1, g2, g3):
    return g0, g1 - g2 + g3, g1 + g2 - g0, -g3


@triton.jit
def _at(m0, m1, m2, m3):
    return m0 + m1 + m2, m1 - m2 - m3


@triton.jit
def _at_adj(g0, g1):
    return g0, g0 + g1, g0 - g1, -g1


@triton.jit
def _relu(v):
    return tl.where(v < 0, 0.0, v)  # NaN passes, as torch.relu


@triton.jit
def _gate(g, v):
    return tl.where(v <= 0, 0.0, g)  # threshold_backward: V <= 0 stops the gradient, NaN passes


@triton.jit
def _tiles(pid, T, TH, TW, BT: tl.constexpr):
    t = pid * BT + tl.arange(0, BT)
    n = t // (TH * TW)
    r = t - n * (TH * TW)
    i = r // TW
    return t < T, n, i, r - i * TW


@triton.jit
def _ld(ptr, base, row, col, H, W, CH, ch, tmask, chmask):
    """Pixel (row, col) of each tile's image, channels ``ch``: (BT, len(ch)) float32, 0 outside."""
    ok = tmask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    off = base + (row * W + col).to(tl.int64) * CH
    v = tl.load(ptr + off[:, None] + ch[None, :], mask=ok[:, None] & chmask[None, :], other=0.0)
    return v.to(tl.float32)


@triton.jit
def _comb(a, b, SUB: tl.constexpr):
    if SUB:
        return a - b
    else:
        return a + b


@triton.jit
def _input_row(x_ptr, base, r0, c0, H, W, C, c, tmask, cmask, I: tl.constexpr, RELU: tl.constexpr):
    """Row I of V = [ReLU](B^T d B) for the 4x4 tiles at (r0, c0): 4 (BT, BC) tensors v[I][0..3].

    Row I of B^T combines two input rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.  One row at a time
    keeps 8 loaded pixels and 4 transformed values live instead of 16 and 16 (the register file
    holds the 16 accumulators too); the pixels a row loads again come from L1."""
    if I == 0:
        ra, rb, SUB = 0, 2, True
    elif I == 1:
        ra, rb, SUB = 1, 2, False
    elif I == 2:
        ra, rb, SUB = 2, 1, True
    else:
        ra, rb, SUB = 1, 3, True
    p0 = _comb(_ld(x_ptr, base, r0 + ra, c0, H, W, C, c, tmask, cmask),
               _ld(x_ptr, base, r0 + rb, c0, H, W, C, c, tmask, cmask), SUB)
    p1 = _comb(_ld(x_ptr, base, r0 + ra, c0 + 1, H, W, C, c, tmask, cmask),
               _ld(x_ptr, base, r0 + rb, c0 + 1, H, W, C, c, tmask, cmask), SUB)
    p2 = _comb(_ld(x_ptr, base, r0 + ra, c0 + 2, H, W, C, c, tmask, cmask),
               _ld(x_ptr, base, r0 + rb, c0 + 2, H, W, C, c, tmask, cmask), SUB)
    p3 = _comb(_ld(x_ptr, base, r0 + ra, c0 + 3, H, W, C, c, tmask, cmask),
               _ld(x_ptr, base, r0 + rb, c0 + 3, H, W, C, c, tmask, cmask), SUB)
    v0, v1, v2, v3 = _bt(p0, p1, p2, p3)
    if RELU:
        v0, v1, v2, v3 = _relu(v0), _relu(v1), _relu(v2), _relu(v3)
    return v0, v1, v2, v3


@triton.jit
def _grad_halves(g_ptr, base, r0, c0, H, W, K, k, tmask, kmask):
    """The 2x2 output gradient of each tile at (r0, c0) with A applied along columns: s[a][j], 8 tensors."""
    s00, s01, s02, s03 = _at_adj(_ld(g_ptr, base, r0, c0, H, W, K, k, tmask, kmask),
                                 _ld(g_ptr, base, r0, c0 + 1, H, W, K, k, tmask, kmask))
    s10, s11, s12, s13 = _at_adj(_ld(g_ptr, base, r0 + 1, c0, H, W, K, k, tmask, kmask),
                                 _ld(g_ptr, base, r0 + 1, c0 + 1, H, W, K, k, tmask, kmask))
    return s00, s01, s02, s03, s10, s11, s12, s13


@triton.jit
def _grad_row(s0, s1, I: tl.constexpr):
    """Row I of dM = A dY A^T from the column halves s[0][j], s[1][j]: A's rows (1,0) (1,1) (1,-1) (0,-1)."""
    if I == 0:
        return s0
    elif I == 1:
        return s0 + s1
    elif I == 2:
        return s0 - s1
    else:
        return -s1


@triton.jit
def _zeros16(R: tl.constexpr, N: tl.constexpr):
    """The 16 accumulators, one per tile position (SSA values: one zero tensor serves them all)."""
    z = tl.zeros((R, N), tl.float32)
    return z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z


@triton.jit
def _mac(acc, a, b_ptrs, b_mask, PREC: tl.constexpr):
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    return tl.dot(a.to(b.dtype), b, acc=acc, input_precision=PREC)


@triton.jit
def _mac_tn(acc, a, b, dt: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(tl.trans(a.to(dt)), b.to(dt), acc=acc, input_precision=PREC)


@triton.jit
def _store(ptr, base, row, col, H, W, CH, ch, tmask, chmask, val):
    ok = tmask & (row < H) & (col < W)
    off = base + (row * W + col).to(tl.int64) * CH
    tl.store(ptr + off[:, None] + ch[None, :], val.to(ptr.dtype.element_ty), mask=ok[:, None] & chmask[None, :])


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
# The 16 accumulators a[i][j] (one per tile position p = 4i + j) are separate variables because a
# Triton loop carries named values, not lists; each row of positions is formed and multiplied
# before the next one is loaded (see _input_row).
@triton.jit
def _fwd_kernel(x_ptr, u_ptr, y_ptr, H, W, C, K, TH, TW, T, RELU: tl.constexpr, PREC: tl.constexpr,
                BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    tmask, n, i, j = _tiles(tl.program_id(0), T, TH, TW, BT)
    k = tl.program_id(1) * BN + tl.arange(0, BN)
    kmask = k < K
    xbase = n.to(tl.int64) * H * W * C
    CK = C * K
    a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = _zeros16(BT, BN)
    for c0 in range(0, C, BR):
        c = c0 + tl.arange(0, BR)
        cmask = c < C
        w = u_ptr + c[:, None] * K + k[None, :]  # U[p][c, k]
        wm = cmask[:, None] & kmask[None, :]
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 0, RELU)
        a00 = _mac(a00, v0, w + 0 * CK, wm, PREC)
        a01 = _mac(a01, v1, w + 1 * CK, wm, PREC)
        a02 = _mac(a02, v2, w + 2 * CK, wm, PREC)
        a03 = _mac(a03, v3, w + 3 * CK, wm, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 1, RELU)
        a10 = _mac(a10, v0, w + 4 * CK, wm, PREC)
        a11 = _mac(a11, v1, w + 5 * CK, wm, PREC)
        a12 = _mac(a12, v2, w + 6 * CK, wm, PREC)
        a13 = _mac(a13, v3, w + 7 * CK, wm, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 2, RELU)
        a20 = _mac(a20, v0, w + 8 * CK, wm, PREC)
        a21 = _mac(a21, v1, w + 9 * CK, wm, PREC)
        a22 = _mac(a22, v2, w + 10 * CK, wm, PREC)
        a23 = _mac(a23, v3, w + 11 * CK, wm, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 3, RELU)
        a30 = _mac(a30, v0, w + 12 * CK, wm, PREC)
        a31 = _mac(a31, v1, w + 13 * CK, wm, PREC)
        a32 = _mac(a32, v2, w + 14 * CK, wm, PREC)
        a33 = _mac(a33, v3, w + 15 * CK, wm, PREC)
    # Y = A^T M A: rows (over i) per column j, then columns
    q00, q10 = _at(a00, a10, a20, a30)
    q01, q11 = _at(a01, a11, a21, a31)
    q02, q12 = _at(a02, a12, a22, a32)
    q03, q13 = _at(a03, a13, a23, a33)
    y00, y01 = _at(q00, q01, q02, q03)
    y10, y11 = _at(q10, q11, q12, q13)
    ybase = n.to(tl.int64) * H * W * K
    _store(y_ptr, ybase, 2 * i, 2 * j, H, W, K, k, tmask, kmask, y00)
    _store(y_ptr, ybase, 2 * i, 2 * j + 1, H, W, K, k, tmask, kmask, y01)
    _store(y_ptr, ybase, 2 * i + 1, 2 * j, H, W, K, k, tmask, kmask, y10)
    _store(y_ptr, ybase, 2 * i + 1, 2 * j + 1, H, W, K, k, tmask, kmask, y11)


# --------------------------------------------------------------------------------------------------
# backward: dx (tile contributions into four quadrant planes, then their sum) and dU
# --------------------------------------------------------------------------------------------------
@triton.jit
def _plane_store(p_ptr, NIMG, HP, WP, C, n, row, col, c, tmask, cmask, val, QA: tl.constexpr, QB: tl.constexpr):
    off = ((QA * 2 + QB) * NIMG + n).to(tl.int64) * HP * WP * C + (row * WP + col).to(tl.int64) * C
    tl.store(p_ptr + off[:, None] + c[None, :], val.to(p_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _dx_kernel(g_ptr, u_ptr, x_ptr, p_ptr, NIMG, H, W, C, K, TH, TW, T, RELU: tl.constexpr,
               PREC: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    tmask, n, i, j = _tiles(tl.program_id(0), T, TH, TW, BT)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = c < C
    gbase = n.to(tl.int64) * H * W * K
    CK = C * K
    a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = _zeros16(BT, BN)
    for k0 in range(0, K, BR):
        k = k0 + tl.arange(0, BR)
        kmask = k < K
        s00, s01, s02, s03, s10, s11, s12, s13 = _grad_halves(g_ptr, gbase, 2 * i, 2 * j, H, W, K, k, tmask, kmask)
        w = u_ptr + c[None, :] * K + k[:, None]  # U[p]^T[k, c]
        wm = kmask[:, None] & cmask[None, :]
        a00 = _mac(a00, _grad_row(s00, s10, 0), w + 0 * CK, wm, PREC)
        a01 = _mac(a01, _grad_row(s01, s11, 0), w + 1 * CK, wm, PREC)
        a02 = _mac(a02, _grad_row(s02, s12, 0), w + 2 * CK, wm, PREC)
        a03 = _mac(a03, _grad_row(s03, s13, 0), w + 3 * CK, wm, PREC)
        a10 = _mac(a10, _grad_row(s00, s10, 1), w + 4 * CK, wm, PREC)
        a11 = _mac(a11, _grad_row(s01, s11, 1), w + 5 * CK, wm, PREC)
        a12 = _mac(a12, _grad_row(s02, s12, 1), w + 6 * CK, wm, PREC)
        a13 = _mac(a13, _grad_row(s03, s13, 1), w + 7 * CK, wm, PREC)
        a20 = _mac(a20, _grad_row(s00, s10, 2), w + 8 * CK, wm, PREC)
        a21 = _mac(a21, _grad_row(s01, s11, 2), w + 9 * CK, wm, PREC)
        a22 = _mac(a22, _grad_row(s02, s12, 2), w + 10 * CK, wm, PREC)
        a23 = _mac(a23, _grad_row(s03, s13, 2), w + 11 * CK, wm, PREC)
        a30 = _mac(a30, _grad_row(s00, s10, 3), w + 12 * CK, wm, PREC)
        a31 = _mac(a31, _grad_row(s01, s11, 3), w + 13 * CK, wm, PREC)
        a32 = _mac(a32, _grad_row(s02, s12, 3), w + 14 * CK, wm, PREC)
        a33 = _mac(a33, _grad_row(s03, s13, 3), w + 15 * CK, wm, PREC)
    if RELU:  # the mask V > 0, V recomputed from x (not saved)
        xbase = n.to(tl.int64) * H * W * C
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 0, False)
        a00, a01, a02, a03 = _gate(a00, v0), _gate(a01, v1), _gate(a02, v2), _gate(a03, v3)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 1, False)
        a10, a11, a12, a13 = _gate(a10, v0), _gate(a11, v1), _gate(a12, v2), _gate(a13, v3)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 2, False)
        a20, a21, a22, a23 = _gate(a20, v0), _gate(a21, v1), _gate(a22, v2), _gate(a23, v3)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 3, False)
        a30, a31, a32, a33 = _gate(a30, v0), _gate(a31, v1), _gate(a32, v2), _gate(a33, v3)
    # B dV B^T: columns (over j) per row i -> r[i][b], then rows -> d[a][b]
    r00, r01, r02, r03 = _bt_adj(a00, a01, a02, a03)
    r10, r11, r12, r13 = _bt_adj(a10, a11, a12, a13)
    r20, r21, r22, r23 = _bt_adj(a20, a21, a22, a23)
    r30, r31, r32, r33 = _bt_adj(a30, a31, a32, a33)
    d00, d10, d20, d30 = _bt_adj(r00, r10, r20, r30)
    d01, d11, d21, d31 = _bt_adj(r01, r11, r21, r31)
    d02, d12, d22, d32 = _bt_adj(r02, r12, r22, r32)
    d03, d13, d23, d33 = _bt_adj(r03, r13, r23, r33)
    # offset (a, b) of tile (i, j) is padded pixel (2i + a, 2j + b), in plane (a // 2, b // 2)
    HP = 2 * TH + 2
    WP = 2 * TW + 2
    r = 2 * i
    s = 2 * j
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 0, s + 0, c, tmask, cmask, d00, 0, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 0, s + 1, c, tmask, cmask, d01, 0, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 0, s + 2, c, tmask, cmask, d02, 0, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 0, s + 3, c, tmask, cmask, d03, 0, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 1, s + 0, c, tmask, cmask, d10, 0, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 1, s + 1, c, tmask, cmask, d11, 0, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 1, s + 2, c, tmask, cmask, d12, 0, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 1, s + 3, c, tmask, cmask, d13, 0, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 2, s + 0, c, tmask, cmask, d20, 1, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 2, s + 1, c, tmask, cmask, d21, 1, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 2, s + 2, c, tmask, cmask, d22, 1, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 2, s + 3, c, tmask, cmask, d23, 1, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 3, s + 0, c, tmask, cmask, d30, 1, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 3, s + 1, c, tmask, cmask, d31, 1, 0)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 3, s + 2, c, tmask, cmask, d32, 1, 1)
    _plane_store(p_ptr, NIMG, HP, WP, C, n, r + 3, s + 3, c, tmask, cmask, d33, 1, 1)


@triton.jit
def _overlap_kernel(p_ptr, dx_ptr, NIMG, H, W, C, TH, TW, BP: tl.constexpr, BC: tl.constexpr):
    """dx[n, h, w] = the four planes' sum at padded pixel (h + 1, w + 1), where each was written."""
    pix = tl.program_id(0) * BP + tl.arange(0, BP)
    pmask = pix < NIMG * H * W
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    n = pix // (H * W)
    rem = pix - n * (H * W)
    hp = rem // W + 1
    wp = rem - (hp - 1) * W + 1
    HP = 2 * TH + 2
    WP = 2 * TW + 2
    acc = tl.zeros((BP, BC), tl.float32)
    for q in tl.static_range(4):
        qa = q // 2
        qb = q % 2
        ok = pmask & (hp >= 2 * qa) & (hp < 2 * qa + 2 * TH) & (wp >= 2 * qb) & (wp < 2 * qb + 2 * TW)
        off = (q * NIMG + n).to(tl.int64) * HP * WP * C + (hp * WP + wp).to(tl.int64) * C
        acc += tl.load(p_ptr + off[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    out = pix.to(tl.int64) * C
    tl.store(dx_ptr + out[:, None] + c[None, :], acc.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _du_kernel(x_ptr, g_ptr, part_ptr, H, W, C, K, TH, TW, T, SPLIT, RELU: tl.constexpr, PREC: tl.constexpr,
               BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    DT = x_ptr.dtype.element_ty  # the GEMM's input dtype: the layer's
    c = tl.program_id(0) * BR + tl.arange(0, BR)
    cmask = c < C
    k = tl.program_id(1) * BN + tl.arange(0, BN)
    kmask = k < K
    split = tl.program_id(2)
    a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = _zeros16(BR, BN)
    nblocks = tl.cdiv(T, BT)
    for blk in range(split, nblocks, SPLIT):
        tmask, n, i, j = _tiles(blk, T, TH, TW, BT)
        xbase = n.to(tl.int64) * H * W * C
        gbase = n.to(tl.int64) * H * W * K
        s00, s01, s02, s03, s10, s11, s12, s13 = _grad_halves(g_ptr, gbase, 2 * i, 2 * j, H, W, K, k, tmask, kmask)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 0, RELU)
        a00 = _mac_tn(a00, v0, _grad_row(s00, s10, 0), DT, PREC)
        a01 = _mac_tn(a01, v1, _grad_row(s01, s11, 0), DT, PREC)
        a02 = _mac_tn(a02, v2, _grad_row(s02, s12, 0), DT, PREC)
        a03 = _mac_tn(a03, v3, _grad_row(s03, s13, 0), DT, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 1, RELU)
        a10 = _mac_tn(a10, v0, _grad_row(s00, s10, 1), DT, PREC)
        a11 = _mac_tn(a11, v1, _grad_row(s01, s11, 1), DT, PREC)
        a12 = _mac_tn(a12, v2, _grad_row(s02, s12, 1), DT, PREC)
        a13 = _mac_tn(a13, v3, _grad_row(s03, s13, 1), DT, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 2, RELU)
        a20 = _mac_tn(a20, v0, _grad_row(s00, s10, 2), DT, PREC)
        a21 = _mac_tn(a21, v1, _grad_row(s01, s11, 2), DT, PREC)
        a22 = _mac_tn(a22, v2, _grad_row(s02, s12, 2), DT, PREC)
        a23 = _mac_tn(a23, v3, _grad_row(s03, s13, 2), DT, PREC)
        v0, v1, v2, v3 = _input_row(x_ptr, xbase, 2 * i - 1, 2 * j - 1, H, W, C, c, tmask, cmask, 3, RELU)
        a30 = _mac_tn(a30, v0, _grad_row(s00, s10, 3), DT, PREC)
        a31 = _mac_tn(a31, v1, _grad_row(s01, s11, 3), DT, PREC)
        a32 = _mac_tn(a32, v2, _grad_row(s02, s12, 3), DT, PREC)
        a33 = _mac_tn(a33, v3, _grad_row(s03, s13, 3), DT, PREC)
    CK = C * K
    base = part_ptr + split.to(tl.int64) * 16 * CK + c[:, None] * K + k[None, :]
    om = cmask[:, None] & kmask[None, :]
    tl.store(base + 0 * CK, a00, mask=om)
    tl.store(base + 1 * CK, a01, mask=om)
    tl.store(base + 2 * CK, a02, mask=om)
    tl.store(base + 3 * CK, a03, mask=om)
    tl.store(base + 4 * CK, a10, mask=om)
    tl.store(base + 5 * CK, a11, mask=om)
    tl.store(base + 6 * CK, a12, mask=om)
    tl.store(base + 7 * CK, a13, mask=om)
    tl.store(base + 8 * CK, a20, mask=om)
    tl.store(base + 9 * CK, a21, mask=om)
    tl.store(base + 10 * CK, a22, mask=om)
    tl.store(base + 11 * CK, a23, mask=om)
    tl.store(base + 12 * CK, a30, mask=om)
    tl.store(base + 13 * CK, a31, mask=om)
    tl.store(base + 14 * CK, a32, mask=om)
    tl.store(base + 15 * CK, a33, mask=om)


# --------------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------------
def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was
    imported): then they take CPU tensors, which is how the tests check them without a GPU."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def supports(x: torch.Tensor, u: torch.Tensor) -> bool:
    dev_ok = x.device.type == "cuda" or (interpreted() and x.device.type == "cpu")
    return dev_ok and x.dtype in DTYPES and u.dtype == x.dtype and u.device == x.device


def _pow2(v: int, lo: int, hi: int) -> int:
    p = lo
    while p < hi and p < v:
        p *= 2
    return p


def blocks(cols: int, red: int, override: str | None = None) -> tuple[int, int, int, int, int]:
    """(BT tiles, BN output columns, BR reduction chunk, warps, pipeline stages) for a kernel whose
    output block has ``cols`` columns and whose reduction runs over ``red``.

    Chosen from what ptxas reports for sm_90a (``bench/winograd_triton_ptxas.py``,
    ``bench/results/winograd_triton_ptxas.json``: the kernels compiled for an H100 on a machine
    without one; no timing): each kernel holds 16 accumulators plus the pointers and masks of its
    4x4 tile loads, and every configuration with 32 or 64 tiles a program spilled (0.4-12 KB of stack
    a thread).  16 tiles x 32 columns x 16 channels at 8 warps and 2 stages spilled least over the
    dtypes: 0-56 bytes a thread in bf16, 0-104 in TF32, none in full-precision float32 (where 4 warps,
    one stage spilled 0.4-0.8 KB).  Narrow layers (16 columns or fewer) take 16-wide blocks (tl.dot's
    least; 0-208 bytes at 8 warps).  A GPU times others beside it: ``bench/winograd.py --triton-blocks``.  ``override``: a "BT,BN,BR,warps,stages" string, else
    ``$ESDBS_TRITON_BLOCKS``, else the default."""
    env = (os.environ.get(BLOCKS_ENV, "") if override is None else override).strip()
    if env:
        try:
            bt, bn, br, warps, stages = (int(v) for v in env.split(","))
        except ValueError:
            raise ValueError(f"${BLOCKS_ENV} must be five integers 'BT,BN,BR,warps,stages'; got {env!r}") from None
        for name, v in (("BT", bt), ("BN", bn), ("BR", br)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"${BLOCKS_ENV}: {name} must be a power of two >= 16; got {v}")
        if warps < 1 or warps & (warps - 1) or stages < 1:
            raise ValueError(f"${BLOCKS_ENV}: warps must be a power of two and stages >= 1; got {warps}, {stages}")
        return bt, bn, br, warps, stages
    return 16, _pow2(cols, 16, 32), 16, 8, 2


def _prec(dtype: torch.dtype) -> str:
    """float32 follows torch's matmul setting, as the reference's bmm does: full precision (FMA, not
    the tensor cores) unless TF32 is allowed.  ``fp32_precision`` answers for the legacy switch too,
    where reading ``allow_tf32`` raises once the new API has been used."""
    if dtype != torch.float32:
        return "ieee"
    m = torch.backends.cuda.matmul
    mode = getattr(m, "fp32_precision", None)
    return "tf32" if (mode == "tf32" if mode is not None else m.allow_tf32) else "ieee"


def _on(device: torch.device):
    """Triton launches on the *current* CUDA device and stream: make that x's device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _geometry(shape):
    n, c, h, w = shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    return n, c, h, w, th, tw, n * th * tw


def _check(x: torch.Tensor, u: torch.Tensor) -> None:
    if not supports(x, u):
        raise ValueError(f"impl 'triton' runs float32 / float16 / bfloat16 on CUDA; got x {x.dtype} on "
                         f"{x.device.type}, weight {u.dtype} on {u.device.type}")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> its (N, H, W, C) contiguous view (free when t is channels-last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def forward(x: torch.Tensor, u: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x (N, C, H, W), u (16, C, K) -> (y (N, K, H, W) channels-last, x as (N, H, W, C), plan).

    ``plan`` (block override and float32 precision as they were here) goes to :func:`backward`, so
    that a step's backward runs as its forward did whatever changes in between."""
    _check(x, u)
    n, c, h, w, th, tw, t = _geometry(x.shape)
    k = u.shape[2]
    xh, u = _nhwc(x), u.contiguous()
    plan = {"blocks": os.environ.get(BLOCKS_ENV, ""), "prec": _prec(x.dtype)}
    y = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if t and k:
        bt, bn, br, warps, stages = blocks(k, c, plan["blocks"])
        grid = (triton.cdiv(t, bt), triton.cdiv(k, bn))
        with _on(x.device):
            _fwd_kernel[grid](xh, u, y, h, w, c, k, th, tw, t, RELU=relu, PREC=plan["prec"], BT=bt, BN=bn, BR=br,
                              num_warps=warps, num_stages=stages)
    return y, xh, plan


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def backward(gy: torch.Tensor, xh: torch.Tensor, u: torch.Tensor, shape, relu: bool, need_x: bool,
             need_u: bool, plan: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx (N, C, H, W) channels-last, du (16, C, K)) of :func:`forward`; xh and plan as it
    returned them."""
    with _on(xh.device):
        return _backward(gy, xh, u, shape, relu, need_x, need_u, plan or {"blocks": None, "prec": _prec(xh.dtype)})


def _backward(gy, xh, u, shape, relu, need_x, need_u, plan):
    n, c, h, w, th, tw, t = _geometry(shape)
    k = u.shape[2]
    gh = _nhwc(gy.to(xh.dtype))
    u = u.contiguous()
    prec = plan["prec"]
    dx = du = None
    if need_x:
        dx = torch.empty((n, c, h, w), dtype=xh.dtype, device=xh.device, memory_format=torch.channels_last)
        if t and c:
            planes = torch.empty((4, n, 2 * th + 2, 2 * tw + 2, c), dtype=xh.dtype, device=xh.device)
            bt, bn, br, warps, stages = blocks(c, k, plan["blocks"])
            if k:
                _dx_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bn))](
                    gh, u, xh, planes, n, h, w, c, k, th, tw, t, RELU=relu, PREC=prec, BT=bt, BN=bn, BR=br,
                    num_warps=warps, num_stages=stages)
            else:
                planes.zero_()
            bc = _pow2(c, 16, 64)
            _overlap_kernel[(triton.cdiv(n * h * w, 64), triton.cdiv(c, bc))](
                planes, dx, n, h, w, c, th, tw, BP=64, BC=bc, num_warps=4)
    if need_u:
        if t == 0 or c == 0 or k == 0:
            du = torch.zeros_like(u)
        else:
            bt, bn, br, warps, stages = blocks(k, c, plan["blocks"])  # dU's block: BR input channels x BN outputs
            grid_ck = triton.cdiv(c, br) * triton.cdiv(k, bn)
            tblocks = triton.cdiv(t, bt)
            # enough programs to fill the GPU twice over, within 64 MiB of partial sums; fixed by the
            # shape and the device, so the order of the sum (and the bits) is too
            split = max(1, min(tblocks, triton.cdiv(2 * _sm_count(xh.device), grid_ck),
                               (64 << 20) // (16 * c * k * 4)))
            part = torch.empty((split, 16, c, k), dtype=torch.float32, device=xh.device)
            _du_kernel[(triton.cdiv(c, br), triton.cdiv(k, bn), split)](
                xh, gh, part, h, w, c, k, th, tw, t, split, RELU=relu, PREC=prec, BT=bt, BN=bn, BR=br,
                num_warps=warps, num_stages=stages)
            du = part.sum(0).to(u.dtype)
    return dx, du
