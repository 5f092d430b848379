"""The Winograd-ReLU layer on a pruned U: the 16 products on the nonzero weights only (native CPU kernels).

What this gives the project: a member pruned to density d runs about d of the layer's
multiplications instead of all of them.  The pruning mask (``weight_mask``, 1 = kept) only zeroes
weights; the dense native layer (:mod:`esdbs_ray.winograd_native`) still multiplies every entry of U.
Here the mask's index structure drives sparse kernels in ``winograd_native.cpp``:

* forward   M_p = V_p U_p with U_p compressed per output channel (for each output channel k, the
  input channels c its nonzeros read);
* backward  dV_p = dM_p U_p^T through the same nonzeros by input channel;
* dU only at the mask's entries (a dot product of a row of V_p and a row of dM_p over the tiles per
  nonzero); dU is exactly 0 elsewhere.

The products vectorise along the tiles, as XNNPACK's sparse inference does (Elsen et al. 2020,
"Fast Sparse ConvNets"): each multiply-add is one weight times 16 tiles, the tile planes held
channel-major band by band in cache (the kernels' comments say how).  Positions p whose weights are
all pruned are skipped.  The values are U's own at every call; only the index structure is built
from the mask, once per mask version (:func:`structure_for`).

Where it pays is chosen by :func:`should_run_sparse` from the layer's density and shape, with the
crossover measured by ``bench/sparse_winograd.py`` (``bench/results/sparse_winograd.json``);
:func:`sparse_conv_or_none` applies that rule for a layer call.

Results: the dense native path's to float rounding (sums in another order), forward and backward;
the same bits at any thread count (every output element computed by one thread in one order, dU's
per-group partial sums added in group order; groups fixed by the batch, not by the threads).  One
difference by design: a NaN activation times a pruned weight is not computed, so it reaches the
output only through the weights kept.  float32 runs the AVX-512 kernels where the library has them
(``esdbs_wino_has_gemm``), float64 and other CPUs portable loops with the same results.

The autograd Function saves x (NHWC; x itself when it is channels-last) and U, and computes V again
in the backward, as the fused dense layer does: no (16, tiles, C) buffer per layer lives between
forward and backward.

Switch: ``$ESDBS_NATIVE_SPARSE`` = "auto" (default: :func:`should_run_sparse`), "on" (sparse
wherever a mask is given, any density or dtype: tests, benchmarks) or "off" (never).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch

from . import winograd_native as native

__all__ = [
    "SPARSE_ENV", "SPARSE_MODES", "PHASES", "CROSSOVER", "DENSITY_SLACK", "SparseStructure", "structure_for",
    "forget", "clear_cache", "cache_info", "sparse_mode", "should_run_sparse", "kernels_vectorised",
    "WinogradSparseFn", "sparse_forward", "sparse_backward", "sparse_conv_or_none", "native_inference", "profiling",
]

SPARSE_ENV = "ESDBS_NATIVE_SPARSE"
SPARSE_MODES = ("auto", "on", "off")

# The kernels' phases, in the order of their profile counters (esdbs_wino_sparse_phases()): pack
# (gather U's values; in the backward also zero dU's partial sums), the input transform and its
# V -> V^T transposes, the forward products, the output transform (with its transposes of the four
# output pixels), the output adjoint (dM^T, with its transposes of the four gradient pixels), the dU
# products alone (dx not needed), the dV products (with dU's in the same pass when both are needed),
# the dV^T transposes and the input adjoint, dU's group sums and scatter.  transpose_m and
# transpose_dm stay 0: those transposes are counted in output_transform and output_adjoint.
PHASES = ("pack", "input_transform", "transpose_v", "products_fwd", "transpose_m", "output_transform",
          "output_adjoint", "transpose_dm", "products_du", "products_dv", "transpose_dv", "input_adjoint",
          "du_reduce")

# The rule of should_run_sparse: per pass, and per path the dense native layer would take for the
# layer ("fused": band by band in cache, where C * K <= 128^2 and the batch has >= 64 K tiles;
# "unfused" otherwise), the density at or below which the sparse layer runs; and the smallest C * K
# for which it does.  Derived by bench/sparse_winograd.py (bench/results/sparse_winograd.json,
# "crossover"): the largest tested density at which the sparse layer was faster than the dense one
# by 5 % or more in median and at least as fast on 3 of 4 shapes of that class (C * K >= 64^2), the
# smaller where two runs differ -- except training / unfused, 0.6 where that rule gives 0.5 (0.8 before
# the forward's lane layout): inside the trainer (bench/sparse_trainer.py and
# bench/sparse_trainer_profile.py; AlexNet's Winograd layers all take the unfused path at B = 128) the
# layers at density 0.6 were faster than dense every time, and 0.6 is not one of the densities the
# layer benchmark tests (the figures: commit messages, README).
CROSSOVER = {"training": {"fused": 0.3, "unfused": 0.6}, "inference": {"fused": 0.3, "unfused": 0.7},
             "min_ck": 64}

# A layer pruned to a rung's density keeps a whole number of entries, so its density lands a few
# millionths either side of the rung's: the thresholds are rungs' densities, and a layer pruned to one
# takes the same path whichever way its rounding went.
DENSITY_SLACK = 1e-3

_DTYPES = {torch.float32: 0, torch.float64: 1}


# --------------------------------------------------------------------------------------------------
# the mask's structure
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Order:
    """The nonzeros in the kernels' storage order for one pass (int32, contiguous, CPU): per position
    p, column segment j, row r: ``ptr`` (16, S, R + 1) global starts (``ptr[p, j, R]``: the
    segment's end), ``idx`` each nonzero's column, ``flat`` its index into U (16, C, K)."""

    ptr: torch.Tensor
    idx: torch.Tensor
    flat: torch.Tensor


@dataclass(frozen=True, eq=False)
class SparseStructure:
    """The nonzeros of a (16, C, K) mask, as the kernels read them.

    ``nnz_per_position``: the 16 counts; ``skipped``: the positions without a nonzero (their products
    are skipped); ``density``.  The index arrays are built on first use (:meth:`by_k` for the
    forward, :meth:`by_c` for the backward) from the mask as it was when the structure was made: per
    position, the nonzeros by output row (k, or c) and within a row by column, stored a column
    segment (``esdbs_wino_sparse_segment()`` channels) at a time -- the order the products read them."""

    c: int
    k: int
    nnz: int
    nnz_per_position: tuple[int, ...]
    _kept: torch.Tensor = field(repr=False)  # (16, C, K) bool, a private copy
    _orders: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def density(self) -> float:
        return self.nnz / (16 * self.c * self.k)

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(p for p, n in enumerate(self.nnz_per_position) if n == 0)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseStructure":
        """The structure of ``mask`` (16, C, K), any dtype and device: nonzero = kept."""
        if mask.dim() != 3 or mask.shape[0] != 16:
            raise ValueError(f"mask must have shape (16, C, K), got {tuple(mask.shape)}")
        _, c, k = mask.shape
        if c == 0 or k == 0:
            raise ValueError(f"mask has an empty channel axis: {tuple(mask.shape)}")
        if 16 * c * k >= 2**31:
            raise ValueError(f"mask too large for the kernels' 32-bit indices: {tuple(mask.shape)}")
        kept = (mask.detach() != 0).to("cpu", copy=True)
        per_p = kept.sum((1, 2), dtype=torch.int64)
        return cls(c=int(c), k=int(k), nnz=int(per_p.sum()), nnz_per_position=tuple(int(v) for v in per_p),
                   _kept=kept)

    def by_k(self) -> _Order:
        """The forward's order: rows are output channels k, columns input channels c."""
        return self._order("k")

    def by_c(self) -> _Order:
        """The backward's order: rows are input channels c, columns output channels k."""
        return self._order("c")

    def _order(self, rows: str) -> _Order:
        order = self._orders.get(rows)
        if order is None:
            with self._lock:
                order = self._orders.get(rows)
                if order is None:
                    seg = int(native.library().esdbs_wino_sparse_segment())
                    kept = self._kept.transpose(1, 2) if rows == "k" else self._kept  # (16, R, columns)
                    order = self._orders[rows] = _segment_major(kept, seg, rows == "k", self.c, self.k)
        return order


def _segment_major(kept: torch.Tensor, seg: int, transposed: bool, c: int, k: int) -> _Order:
    """(16, R, L) kept entries -> their storage order: per position, column segment (``seg``
    columns), row, column."""
    _, R, L = kept.shape
    S = -(-L // seg)
    padded = torch.zeros((16, R, S * seg), dtype=torch.bool)
    padded[:, :, :L] = kept
    view = padded.view(16, R, S, seg).permute(0, 2, 1, 3).contiguous()  # (16, S, R, seg)
    nz = view.nonzero()  # row-major: (p, j, r, column within the segment)
    p, r, col = nz[:, 0], nz[:, 2], nz[:, 1] * seg + nz[:, 3]
    cc, kk = (col, r) if transposed else (r, col)
    flat = (p * c + cc) * k + kk
    counts = view.sum(3, dtype=torch.int64)  # (16, S, R)
    ends = counts.reshape(-1).cumsum(0).view(16, S, R)
    ptr = torch.empty((16, S, R + 1), dtype=torch.int64)
    ptr[:, :, 1:] = ends
    ptr[:, :, 0] = ends[:, :, 0] - counts[:, :, 0]
    return _Order(ptr=ptr.to(torch.int32).contiguous(), idx=col.to(torch.int32).contiguous(),
                  flat=flat.to(torch.int32).contiguous())


# A cache per mask tensor, keyed on what any change to it changes: its storage pointer and version
# counter (bumped by every in-place op on it: the Pruner's copy_, load_state_dict's copy_, a user's
# masked_fill_ or index assignment), shape, strides, dtype and device; model.to() and
# load_state_dict(assign=True) put a new tensor in the buffer, a new entry.  An entry goes when its
# tensor is freed.  Writes that bypass torch's version counter (through ``.data``, ``.numpy()``, or a
# tensor of inference mode, which has no counter: its contents are compared instead) are caught
# only as said; call :func:`forget` after such a write.
_cache: dict[int, tuple] = {}
_cache_lock = threading.Lock()
_builds = {"count": 0}


def _key(mask: torch.Tensor):
    try:
        version = mask._version
    except RuntimeError:  # an inference-mode tensor: no version counter
        version = None
    return (mask.data_ptr(), version, tuple(mask.shape), tuple(mask.stride()), mask.storage_offset(), mask.dtype,
            str(mask.device))


def _drop(ident: int):
    def callback(_ref):
        with _cache_lock:
            entry = _cache.get(ident)
            if entry is not None and entry[0] is _ref:
                del _cache[ident]
    return callback


def structure_for(layer_or_mask) -> SparseStructure | None:
    """The structure of a layer's ``weight_mask`` (or of a mask tensor), built on first use and again
    only when the mask changed; None for a layer without a mask."""
    mask = layer_or_mask if isinstance(layer_or_mask, torch.Tensor) else getattr(layer_or_mask, "weight_mask", None)
    if mask is None:
        return None
    ident, key = id(mask), _key(mask)
    with _cache_lock:
        entry = _cache.get(ident)
    if entry is not None and entry[0]() is mask and entry[1] == key:
        copy = entry[3]
        if copy is None or torch.equal(copy, mask):  # (a copy only where there is no version counter)
            return entry[2]
    structure = SparseStructure.from_mask(mask)
    copy = mask.detach().clone() if key[1] is None else None
    ref = weakref.ref(mask, _drop(ident))
    with _cache_lock:
        _cache[ident] = (ref, key, structure, copy)
        _builds["count"] += 1
    return structure


def forget(mask: torch.Tensor | None = None) -> None:
    """Drop the cached structure of ``mask`` (all of them with None): after a write the version
    counter does not see."""
    with _cache_lock:
        if mask is None:
            _cache.clear()
        else:
            _cache.pop(id(mask), None)


def clear_cache() -> None:
    forget(None)


def cache_info() -> dict:
    """{"entries": cached structures, "builds": structures built by this process}."""
    with _cache_lock:
        return {"entries": len(_cache), "builds": _builds["count"]}


# --------------------------------------------------------------------------------------------------
# the choice
# --------------------------------------------------------------------------------------------------
def sparse_mode() -> str:
    """``$ESDBS_NATIVE_SPARSE``: "auto" (default), "on" or "off"."""
    choice = os.environ.get(SPARSE_ENV, "").strip().lower() or "auto"
    if choice not in SPARSE_MODES:
        raise ValueError(f"${SPARSE_ENV} must be one of {', '.join(SPARSE_MODES)}; got {choice!r}")
    return choice


def kernels_vectorised() -> bool:
    """Whether the library's sparse kernels run vectorised (AVX-512, float32) on this machine."""
    try:
        return bool(native.library().esdbs_wino_has_gemm())
    except native.NativeUnavailable:
        return False


def should_run_sparse(density: float, c: int, k: int, tiles: int, training: bool) -> bool:
    """Whether a C -> K layer at this weight density runs faster sparse than dense: for a training
    step (forward and backward) or an inference forward over ``tiles`` 2x2 output tiles
    (N * ceil(H/2) * ceil(W/2)), float32 on the AVX-512 kernels.

    The rule (``CROSSOVER``): sparse when C * K >= CROSSOVER["min_ck"] and the density is at most the
    threshold of the pass for the path the dense native layer would take (``winograd_native.path``:
    fused band by band -- the stronger competitor -- or unfused).  The thresholds are where the
    sparse layer's time crossed the dense layer's in bench/sparse_winograd.py, recorded in
    bench/results/sparse_winograd.json ("crossover"); below min_ck the transforms, which the sparse
    layer does not shorten, outweigh the products."""
    if tiles <= 0 or c * k < CROSSOVER["min_ck"]:
        return False
    try:
        dense = native.path(torch.float32, c, k, tiles)
    except native.NativeUnavailable:
        return False
    threshold = CROSSOVER["training" if training else "inference"]["fused" if dense == "fused" else "unfused"]
    return threshold > 0 and density <= threshold + DENSITY_SLACK


# --------------------------------------------------------------------------------------------------
# the kernels' calls
# --------------------------------------------------------------------------------------------------
_profile: dict = {"buf": None}


@contextlib.contextmanager
def profiling():
    """``with profiling() as prof: ...``: the seconds the kernels spent per phase (summed over
    threads) in the block, ``prof`` a dict phase -> seconds filled when the block ends (benchmarks)."""
    lib = native.library()
    n = lib.esdbs_wino_sparse_phases()
    if n != len(PHASES):
        raise RuntimeError(f"the library counts {n} phases, this module names {len(PHASES)}")
    buf = (ctypes.c_double * n)()
    before, _profile["buf"] = _profile["buf"], buf
    out: dict = {}
    try:
        yield out
    finally:
        _profile["buf"] = before
        out.update({name: float(buf[i]) for i, name in enumerate(PHASES)})


def _prof_ptr():
    buf = _profile["buf"]
    return None if buf is None else ctypes.cast(buf, ctypes.c_void_p)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    h = t.permute(0, 2, 3, 1)
    return h if h.is_contiguous() else h.contiguous()


def _check(x: torch.Tensor, u: torch.Tensor, structure: SparseStructure) -> None:
    if x.dim() != 4 or u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != x.shape[1]:
        raise ValueError(f"x (N, C, H, W) and u (16, C, K) expected, got {tuple(x.shape)} and {tuple(u.shape)}")
    if (structure.c, structure.k) != tuple(u.shape[1:]):
        raise ValueError(f"the structure is of a (16, {structure.c}, {structure.k}) mask, u is {tuple(u.shape)}")
    if not native.supports(x, u):
        raise ValueError(f"the sparse layer runs float32 / float64 on CPU, one dtype; got x {x.dtype} on "
                         f"{x.device.type}, u {u.dtype} on {u.device.type}")


def sparse_forward(x: torch.Tensor, u: torch.Tensor, structure: SparseStructure, relu: bool,
                   bias: torch.Tensor | None = None, out_relu: bool = False, lanes: bool = True) -> torch.Tensor:
    """x (N, C, H, W), u (16, C, K) -> y (N, K, H, W) channels-last, on the nonzeros of ``structure``
    (U's entries off it are not read).  No autograd: inference (or :class:`WinogradSparseFn`).
    ``bias`` (K values) and ``out_relu``: the inference epilogue, y = [ReLU](y + bias), written by the
    output transform.  ``lanes``: whole groups of 16 images in the kernels' lane layout (the same
    results; False: every tile in the band layout -- tests)."""
    _check(x, u, structure)
    return _forward(_nhwc(x), u.contiguous(), structure, relu, tuple(x.shape), bias, out_relu, lanes)


def _forward(xh: torch.Tensor, u: torch.Tensor, s: SparseStructure, relu: bool, shape, bias=None, out_relu=False,
             lanes=True) -> torch.Tensor:
    lib = native.library()
    n, c, h, w = shape
    y = torch.empty((n, s.k, h, w), dtype=xh.dtype, device=xh.device, memory_format=torch.channels_last)
    b = native.epilogue_bias(bias, y)
    o = s.by_k()
    lib.esdbs_wino_sparse_forward(_DTYPES[xh.dtype], xh.data_ptr(), u.data_ptr(), y.data_ptr(), n, h, w, c, s.k,
                                  o.ptr.data_ptr(), o.idx.data_ptr(), o.flat.data_ptr(), int(relu),
                                  torch.get_num_threads(), _prof_ptr(), None if b is None else b.data_ptr(),
                                  int(out_relu), int(lanes))
    return y


def sparse_backward(gy: torch.Tensor, xh: torch.Tensor, u: torch.Tensor, structure: SparseStructure, relu: bool,
                    need_x: bool = True, need_u: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx channels-last, dU (16, C, K), 0 off the structure) of :func:`sparse_forward` for
    the output gradient gy (N, K, H, W), any layout; ``xh`` the input as NHWC (N, H, W, C)."""
    lib = native.library()
    n, h, w, c = xh.shape
    dt = xh.dtype
    xh = xh.contiguous()
    u = u.contiguous()
    gh = _nhwc(gy.to(dt))
    dx = torch.empty((n, c, h, w), dtype=dt, device=xh.device, memory_format=torch.channels_last) if need_x else None
    du = torch.empty((16, c, structure.k), dtype=dt, device=xh.device) if need_u else None
    if need_x or need_u:
        o = structure.by_c()
        lib.esdbs_wino_sparse_backward(_DTYPES[dt], xh.data_ptr(), gh.data_ptr(), u.data_ptr(),
                                       dx.data_ptr() if need_x else None, du.data_ptr() if need_u else None,
                                       n, h, w, c, structure.k, o.ptr.data_ptr(), o.idx.data_ptr(),
                                       o.flat.data_ptr(), int(relu), int(need_x), int(need_u),
                                       torch.get_num_threads(), _prof_ptr())
    return dx, du


class WinogradSparseFn(torch.autograd.Function):
    """The layer without bias on the sparse kernels: ``WinogradSparseFn.apply(x, u, structure, relu)``
    -> y (N, K, H, W) channels-last, as the dense native layer returns it.  Saves x and U (not V);
    the gradient of U is 0 off the structure."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, structure: SparseStructure, relu: bool) -> torch.Tensor:
        _check(x, u, structure)
        xh, uc = _nhwc(x), u.contiguous()
        y = _forward(xh, uc, structure, relu, tuple(x.shape))
        # A channels-last x is its own NHWC buffer: save x itself then, so that autograd's version
        # check names an in-place change of x after the layer (a saved view of it would not)
        ctx.x_is_saved = xh.data_ptr() == x.data_ptr() and xh.numel() > 0
        ctx.save_for_backward(x if ctx.x_is_saved else xh, u)
        ctx.structure, ctx.relu = structure, relu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # opaque kernels: no double backward
    def backward(ctx, grad_out: torch.Tensor):
        xh, u = ctx.saved_tensors
        if ctx.x_is_saved:
            xh = xh.permute(0, 2, 3, 1)
        dx, du = sparse_backward(grad_out, xh, u, ctx.structure, ctx.relu, ctx.needs_input_grad[0],
                                 ctx.needs_input_grad[1])
        return dx, du, None, None


def _chosen(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None, training: bool) -> SparseStructure | None:
    """The mask's structure where the sparse kernels run this call, else None: a mask, tensors the
    native kernels take, and ``$ESDBS_NATIVE_SPARSE`` "on", or "auto" with float32 on the vectorised
    kernels and :func:`should_run_sparse` true for the mask's density, the shape and the pass."""
    mode = sparse_mode()
    if mode == "off" or mask is None or not native.supports(x, u) or tuple(mask.shape) != tuple(u.shape):
        return None
    if mode == "auto" and (x.dtype != torch.float32 or not kernels_vectorised()):
        return None
    structure = structure_for(mask)
    if mode == "auto":
        n, _, h, w = x.shape
        if not should_run_sparse(structure.density, structure.c, structure.k, n * ((h + 1) // 2) * ((w + 1) // 2),
                                 training):
            return None
    return structure


def sparse_conv_or_none(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None, relu: bool) -> torch.Tensor | None:
    """The layer (no bias) on the sparse kernels where they are chosen (:func:`_chosen`; training:
    whether autograd records this call), else None (run the dense native layer)."""
    structure = _chosen(x, u, mask, torch.is_grad_enabled() and (x.requires_grad or u.requires_grad))
    return None if structure is None else WinogradSparseFn.apply(x, u, structure, relu)


def native_inference(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None, relu: bool,
                     bias: torch.Tensor | None = None, out_relu: bool = False) -> tuple[torch.Tensor, bool]:
    """The layer's inference forward on the native kernels, y = [ReLU](conv + bias) with bias and
    ReLU written by the output transform: on the sparse kernels where :func:`_chosen` picks them for an
    inference pass, else the dense native layer.  Returns (y channels-last, whether it ran sparse).
    No autograd (the caller checked that nothing records it)."""
    structure = _chosen(x, u, mask, False)
    if structure is None:
        return native.forward(x, u, relu, bias, out_relu)[0], False
    return sparse_forward(x, u, structure, relu, bias, out_relu), True
