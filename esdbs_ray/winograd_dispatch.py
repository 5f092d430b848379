"""Which implementation runs a Winograd-ReLU layer, and the compiled ("fused") one.

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

:func:`winograd_relu_conv` is the functional entry point (autocast policy, bias, dtype checks); the
layer (:class:`esdbs_ray.winograd.WinogradReLUConv2d`) calls it.  :func:`resolved_impls` is what a
member's summary records.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import types
import warnings
from typing import Callable

import torch
from torch.utils._triton import has_triton

from . import winograd_native as native
from .errors import UserError
from .winograd_math import (_triton_module, _winograd_traceable, _WinogradFunctionalFn, _WinogradNativeFn,
                            _WinogradReLUFn, _WinogradTritonFn)

__all__ = ["IMPLS", "IMPL_ENV", "choose_impl", "check_impl_runs", "default_impl", "fused_compile_log",
           "resolved_impls", "winograd_relu_conv", "tune_cpu_allocator"]


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
        raise UserError(f"{what} must be one of {', '.join(IMPLS)}; got {impl!r}")
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
        raise UserError(f"{what}='native' runs float32 / float64 on CPU; this run computes {dtype} on {dev}")
    if impl == "triton" and (dev != "cuda" or dtype not in _triton_module().DTYPES):  # (names a missing Triton)
        raise UserError(f"{what}='triton' runs float32 / float16 / bfloat16 on CUDA; this run computes "
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
    # dynamic -- generic kernels, slower and far longer to compile.  One static graph per layer
    # shape, batch dynamic.
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
    impl: str | None = None, mask: torch.Tensor | None = None, out_relu: bool = False,
) -> torch.Tensor:
    """Functional form: x (N, C_in, H, W), u (16, C_in, C_out) -> (N, C_out, H, W).

    The result is channels-last in memory (NCHW shape, NHWC strides): converting back would cost a
    full copy per layer, and batch norm, pooling and the next Winograd layer all take channels-last
    input directly.  ``impl``: "auto" (default, or ``$ESDBS_WINOGRAD_IMPL``), "native", "fused",
    "triton", "reference" or "functional"; see :func:`choose_impl`.  Under autocast the layer computes in the autocast
    dtype (e.g. bf16 on CUDA), all of it, like the GEMM-bound ops autocast lowers.  ``mask``: the pruning
    mask of ``u`` (1 = kept; ``u`` is zero elsewhere): where the native kernels run and the mask is sparse
    enough, the 16 products run on its nonzeros only (:mod:`esdbs_ray.winograd_sparse`).  ``out_relu``:
    a spatial ReLU after the bias, ``relu(conv + bias)`` (the network's own ReLU after the layer, moved
    in by :func:`esdbs_ray.inference.prepare_for_inference`); where nothing records gradients the native
    kernels write bias and ReLU in their output transform, no pass over the output of their own.
    """
    return run_layer(x, u, bias, relu, impl, mask, out_relu)[0]


def run_layer(x, u, bias=None, relu=True, impl=None, mask=None, out_relu=False) -> tuple[torch.Tensor, str]:
    """:func:`winograd_relu_conv`, and which path ran it: the implementation, with "native" as
    "native-sparse" or "native-dense" (what a member's summary records per layer)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (16, {x.shape[1]}, C_out), got {tuple(u.shape)}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Custom Functions run outside autocast: apply its policy for GEMM-bound ops here.
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _winograd_run(x, u, bias, relu, impl, dtype, mask, out_relu)
    if x.dtype != u.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from weight dtype {u.dtype}")
    return _winograd_run(x, u, bias, relu, impl, x.dtype, mask, out_relu)


def _recording(*tensors) -> bool:
    """Whether autograd records an op on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _winograd_run(x, u, bias, relu, impl, dtype, mask=None, out_relu=False) -> tuple[torch.Tensor, str]:
    if torch.compiler.is_compiling():  # part of the caller's graph (checked first: no env reads traced)
        y, choice = _winograd_traceable(x.to(dtype), u.to(dtype), relu), "functional"
    else:
        requested = default_impl() if impl is None else _check_impl(impl)
        choice = choose_impl(x, u, requested, dtype)
        y = _fused(x, u, relu, dtype, strict=requested == "fused") if choice == "fused" else None
        if y is None:
            x, u = x.to(dtype), u.to(dtype)
            if choice == "native" and not native.supports(x, u):
                raise ValueError(f"impl 'native' runs float32 / float64 on CPU; got {dtype} on {x.device.type}")
            if choice == "native":
                from .winograd_sparse import native_inference, sparse_conv_or_none

                if not _recording(x, u, bias):  # inference: bias and ReLU in the kernels' output transform
                    y, sparse = native_inference(x, u, mask, relu, bias, out_relu)
                    return y, "native-sparse" if sparse else "native-dense"
                y = sparse_conv_or_none(x, u, mask, relu)
                choice = "native-dense" if y is None else "native-sparse"
            if y is None:
                fn = {"native-dense": _WinogradNativeFn, "functional": _WinogradFunctionalFn,
                      "triton": _WinogradTritonFn}.get(choice, _WinogradReLUFn)
                y = fn.apply(x, u, relu)
    if bias is not None:
        b = bias.to(dtype).view(1, -1, 1, 1)
        # in place when nothing records it (inference, a folded batch norm's bias): no second buffer
        y = y.add_(b) if not _recording(y, b) else y + b
    if out_relu:
        y = y.relu_() if not _recording(y) else torch.relu(y)
    return y, choice


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
