"""The Winograd-ReLU layer's CPU kernels: ``winograd_native.cpp``, built once per machine, no per-shape compile.

What this gives the project: the layer's CPU path ("native" in :mod:`esdbs_ray.winograd`) as
shape-generic C++ loops -- input transform with ReLU, output transform, their adjoints, and on
AVX-512 CPUs the 16 GEMMs -- called from a custom autograd Function.  Two costs go away:

* compiling.  The inductor-compiled layer ("fused") does the same passes, compiled per layer shape:
  ~8 s of CPU per shape and ~7 s per process with a cold cache (2-core AMD EPYC, torch 2.14), so a
  4-layer SWR member paid ~45 CPU-s before its first step and the demo's 3 trials sharing 2 cores lost
  ~65 s of their first epoch.  This library compiles in 2-4 s, once per machine and compiler, whatever
  the shapes, and is cached on disk for every later process.
* MKL on CPUs it does not run AVX-512 code on.  On an AMD EPYC core MKL's sgemm peaks at 99 GF/s
  (2048^2) while oneDNN's 3x3 conv reaches 200 GF/s, and the 16 GEMMs were 80 % of the layer's step;
  the library's register-blocked AVX-512 GEMMs run them at 100-240 GF/s.  ``$ESDBS_NATIVE_MODE=bmm``
  hands them back to ``torch.bmm`` (also what runs without AVX-512, and in float64).
* memory traffic.  Few channels leave too little arithmetic to hide the 16 transformed values per
  2x2 output tile written and read between the passes: where C * K is small and the batch has enough
  tiles, the layer runs fused, band by band in L2 (``FUSED_MAX_CK`` below).

The same library holds the sparse layer's kernels (the products on a pruned U's nonzeros only, band
by band; AVX-512 in float32, portable loops elsewhere): :mod:`esdbs_ray.winograd_sparse` builds the
mask's index structure and calls them (``esdbs_wino_sparse_forward`` / ``_backward``), and
:mod:`esdbs_ray.winograd_chain` runs consecutive sparse layers and max-pools of an inference network in
their lane layout (``esdbs_wino_lane_chain``).

Evidence: ``bench/winograd.py`` (training step per registry layer shape against F.conv2d and the
compiled layer) and ``bench/throughput.py`` (models in the trainer).

How it is built: the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++`` on PATH), ``-O3``
with the vector ISA torch itself dispatches to (AVX-512 / AVX2 flags named explicitly, not
``-march=native``, so nodes of one kind sharing a cache directory share one binary), OpenMP from the
runtime torch ships (its ``libgomp``: one thread pool per process, sized by ``torch.get_num_threads()``
at every call).  The binary's name carries a hash of the source, the command and the compiler's
version; it is written to a temporary file and renamed, so concurrent processes (Ray trials starting
together) never see a partial file, at worst each compiles once; a cached file that does not load is
built again.  Where: ``$ESDBS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/esdbs_ray``
(``~/.cache/esdbs_ray``), else a directory in the system temp dir.

Calls go through ctypes on raw data pointers (the GIL is released while they run); the wrappers below
make every operand contiguous in the layout the kernels assume, and the kernels take float32 or
float64.  Every output element is computed by one thread in one order, so with the library's GEMMs a
step gives the same bits at any thread count.  A missing compiler or a failed build raises
:class:`NativeUnavailable` with the reason (and the compiler's output), which
:mod:`esdbs_ray.winograd` turns into one warning and a fallback.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["NativeUnavailable", "CACHE_ENV", "MODE_ENV", "MODES", "SOURCE", "library", "status", "mode", "path",
           "forward", "backward", "supports", "epilogue_bias"]

SOURCE = Path(__file__).with_name("winograd_native.cpp")
CACHE_ENV = "ESDBS_KERNEL_CACHE"
_ABI = 6  # esdbs_wino_abi_version() of the source this module calls
# How the library runs a step: "auto" (its AVX-512 GEMMs where compiled, fused band by band where
# measured faster), "fused" (fused wherever it can: C * K <= FUSED_MAX_CK), "unfused" (its GEMMs, the
# passes one after another) or "bmm" (torch.bmm for the GEMMs, what runs without AVX-512 and in
# float64).
MODE_ENV = "ESDBS_NATIVE_MODE"
MODES = ("auto", "fused", "unfused", "bmm")
# The fused layer keeps dU in 16 partial sums of 16 x C x K floats (zeroed, added, summed: traffic
# that does not shrink with the batch) and reads all of U once per band: C * K up to FUSED_MAX_CK,
# and "auto" takes it only with at least FUSED_MIN_TILES_PER_K * K tiles in the batch, where those
# costs stay under a quarter of the V traffic the fusion saves.  Measured (bench/winograd.py, 2-core
# AMD EPYC): fused 0.59-0.84x F.conv2d on the registry's shapes at batch 128; on 2x2-7x7 images with
# 64-128 channels at batch 64 the unfused passes were 1.3-3.3x faster.
FUSED_MAX_CK = 128 * 128
FUSED_MIN_TILES_PER_K = 64
_DTYPES = {torch.float32: 0, torch.float64: 1}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


_lock = threading.Lock()
_state: dict = {"lib": None, "error": None, "path": None, "build_seconds": None, "built_here": False}


# --------------------------------------------------------------------------------------------------
# build and load
# --------------------------------------------------------------------------------------------------
def _compiler() -> str:
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise NativeUnavailable("no C++ compiler found (set $CXX, or install g++)")


def _isa_flags() -> list[str]:
    """The vector ISA torch dispatches its own kernels to on this CPU."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"]
    if cap.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []  # baseline of the target (SSE2 on x86-64, NEON on aarch64)


def _openmp_flags() -> list[str]:
    # Link torch's own OpenMP runtime where it ships one: the process then has one thread pool.
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():
        return ["-fopenmp", f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    return ["-fopenmp"]


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "esdbs_ray"


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.access(d, os.W_OK | os.X_OK)
    except OSError:
        return False


_CXXFLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]


def _compile(cxx: str, out: Path) -> None:
    cmd = [*shlex.split(cxx), *_CXXFLAGS, *_isa_flags(), *_openmp_flags(), "-o", str(out), str(SOURCE)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"running the C++ compiler failed: {e}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip()[-2000:]
        raise NativeUnavailable(f"building {SOURCE.name} failed ({shlex.join(cmd)}):\n{tail}")


def _binary_name(cxx: str) -> str:
    try:
        version = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"the C++ compiler {cxx!r} does not run: {e}") from None
    h = hashlib.sha256()
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        raise NativeUnavailable(f"cannot read {SOURCE}: {e}") from None
    flags = " ".join(_CXXFLAGS + _isa_flags() + _openmp_flags())
    for part in (source, cxx.encode(), version.encode(), flags.encode(),
                 sys.platform.encode(), torch.__version__.encode()):
        h.update(part)
        h.update(b"\0")
    return f"winograd_native-{h.hexdigest()[:20]}.so"


def _build(replace_cached: bool = False) -> Path:
    """The cached binary's path, compiling it first if no process has yet (or, with
    ``replace_cached``, again: the cached file would not load)."""
    cxx = _compiler()
    name = _binary_name(cxx)
    dirs = [_cache_dir(), Path(tempfile.gettempdir()) / f"esdbs_ray-{os.getuid()}"]
    if not replace_cached:
        for d in dirs:
            if (d / name).exists():
                return d / name
    d = next((d for d in dirs if _writable(d)), None)
    if d is None:
        raise NativeUnavailable(f"no writable directory for the compiled kernels (tried {', '.join(map(str, dirs))}; "
                                f"set ${CACHE_ENV})")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cannot write the compiled kernels to {d}: {e}") from None
    try:
        t0 = time.perf_counter()
        _compile(cxx, Path(tmp))
        os.chmod(tmp, 0o755)  # readable by every user of a shared cache directory
        os.replace(tmp, d / name)  # atomic: a concurrent process sees no file or the whole one
        _state["build_seconds"], _state["built_here"] = time.perf_counter() - t0, True
    except OSError as e:  # a full disk, a sticky shared directory: say so, and auto falls back
        raise NativeUnavailable(f"cannot write the compiled kernels to {d}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return d / name


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:  # not a shared object, or one without our symbols
        raise NativeUnavailable(f"loading {path} failed: {e}") from None
    if lib.esdbs_wino_abi_version() != _ABI:
        raise NativeUnavailable(f"{path} has ABI {lib.esdbs_wino_abi_version()}, this module calls {_ABI}")
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for fn in ("esdbs_wino_abi_version", "esdbs_wino_has_gemm"):
        getattr(lib, fn).restype = ci
        getattr(lib, fn).argtypes = []
    if lib.esdbs_wino_has_gemm():
        for fn, args in (("esdbs_wino_gemm_nn", [vp, vp, vp, i64, i64, i64, i64, ci]),
                         ("esdbs_wino_gemm_tn", [vp, vp, vp, i64, i64, i64, i64, ci]),
                         ("esdbs_wino_fused_forward", [vp, vp, vp, i64, i64, i64, i64, i64, ci, ci, vp, ci]),
                         ("esdbs_wino_fused_backward", [vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, ci, ci, ci, ci])):
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = None
    for fn, args in (("esdbs_wino_input_transform", [ci, vp, vp, i64, i64, i64, i64, ci, ci]),
                     ("esdbs_wino_output_transform", [ci, vp, vp, i64, i64, i64, i64, ci, vp, ci]),
                     ("esdbs_wino_output_transform_adjoint", [ci, vp, vp, i64, i64, i64, i64, ci]),
                     ("esdbs_wino_input_transform_adjoint", [ci, vp, vp, vp, i64, i64, i64, i64, ci, ci]),
                     # the sparse layer (esdbs_ray/winograd_sparse.py)
                     ("esdbs_wino_sparse_forward", [ci, vp, vp, vp, i64, i64, i64, i64, i64, vp, vp, vp, ci, ci, vp,
                                                    vp, ci, ci]),
                     ("esdbs_wino_sparse_backward", [ci, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, vp, vp, vp, ci,
                                                     ci, ci, ci, vp]),
                     # chains of sparse layers and max-pools in the lane layout (esdbs_ray/winograd_chain.py)
                     ("esdbs_wino_lane_chain", [vp, vp, i64, i64, i64, i64, ci, vp, vp, ci, vp])):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = None
    lib.esdbs_wino_sparse_phases.argtypes, lib.esdbs_wino_sparse_phases.restype = [], ci
    lib.esdbs_wino_sparse_segment.argtypes, lib.esdbs_wino_sparse_segment.restype = [], i64
    lib.esdbs_wino_sparse_band_tiles.argtypes, lib.esdbs_wino_sparse_band_tiles.restype = [i64, i64, ci, ci], i64
    return lib


def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); :class:`NativeUnavailable` if that is not possible here."""
    lib = _state["lib"]
    if lib is not None:
        return lib
    with _lock:
        if _state["lib"] is None:
            if _state["error"] is not None:
                raise NativeUnavailable(_state["error"])
            try:
                if not sys.platform.startswith("linux"):
                    raise NativeUnavailable(f"the native kernels are built for Linux only (this is {sys.platform})")
                path = _build()
                try:
                    lib = _load(path)
                except NativeUnavailable:
                    if _state["built_here"]:
                        raise
                    # a cached file that does not load (truncated by a full disk, say): build it again
                    path = _build(replace_cached=True)
                    lib = _load(path)
                _state["path"], _state["lib"] = str(path), lib
            except NativeUnavailable as e:
                _state["error"] = str(e)
                raise
    return _state["lib"]


def status() -> dict:
    """Whether the kernels are loaded, from where, what building them cost in this process, or why not."""
    return {k: _state[k] for k in ("path", "error", "build_seconds", "built_here")} | {"loaded": _state["lib"] is not None}


def _reset() -> None:
    """Forget the loaded library and any failure (tests)."""
    with _lock:
        _state.update(lib=None, error=None, path=None, build_seconds=None, built_here=False)


# --------------------------------------------------------------------------------------------------
# the layer's passes
# --------------------------------------------------------------------------------------------------
def supports(x: torch.Tensor, u: torch.Tensor) -> bool:
    """Tensors the kernels take: CPU, float32 or float64, one dtype."""
    return x.device.type == "cpu" and u.device.type == "cpu" and x.dtype in _DTYPES and u.dtype == x.dtype


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> its (N, H, W, C) view, copied only when that is not contiguous already."""
    h = t.permute(0, 2, 3, 1)
    return h if h.is_contiguous() else h.contiguous()


def mode() -> str:
    """``$ESDBS_NATIVE_MODE``: "auto" (default), "fused", "unfused" or "bmm"."""
    choice = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if choice not in MODES:
        raise ValueError(f"${MODE_ENV} must be one of {', '.join(MODES)}; got {choice!r}")
    return choice


def _own_gemm(lib, dtype: torch.dtype) -> bool:
    """Whether the library's GEMMs run: compiled (AVX-512), float32, and not turned off."""
    return mode() != "bmm" and dtype == torch.float32 and bool(lib.esdbs_wino_has_gemm())


def _fused(lib, dtype: torch.dtype, c: int, k: int, tiles: int) -> bool:
    m = mode()
    if m not in ("auto", "fused") or not _own_gemm(lib, dtype) or c * k > FUSED_MAX_CK:
        return False
    return m == "fused" or tiles >= FUSED_MIN_TILES_PER_K * k


def path(dtype: torch.dtype = torch.float32, c: int = 16, k: int = 16, tiles: int = 1 << 20) -> str:
    """How a step of a C -> K layer over ``tiles`` 2x2 output tiles (N * ceil(H/2) * ceil(W/2)) in
    ``dtype`` runs: "fused", "unfused" (the library's GEMMs) or "bmm" (the passes around torch.bmm)."""
    lib = library()
    return "fused" if _fused(lib, dtype, c, k, tiles) else "unfused" if _own_gemm(lib, dtype) else "bmm"


def _bmm(lib, nt: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (16, T, n) @ b (16, n, K), both contiguous."""
    if not _own_gemm(lib, a.dtype):
        return torch.bmm(a, b)
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    lib.esdbs_wino_gemm_nn(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.shape[0], a.shape[1], a.shape[2], b.shape[2], nt)
    return out


def _bmm_tn(lib, nt: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (16, T, C)^T @ b (16, T, K) -> (16, C, K), both contiguous."""
    if not _own_gemm(lib, a.dtype):
        return torch.bmm(a.transpose(1, 2), b)
    out = a.new_empty((a.shape[0], a.shape[2], b.shape[2]))
    lib.esdbs_wino_gemm_tn(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.shape[0], a.shape[1], a.shape[2], b.shape[2], nt)
    return out


def epilogue_bias(bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """A layer's bias as the kernels' epilogue reads it: K contiguous values of y's dtype (None: none)."""
    if bias is None:
        return None
    b = bias.detach().to(dtype=y.dtype, device=y.device).reshape(-1).contiguous()
    if b.numel() != y.shape[1]:
        raise ValueError(f"bias has {b.numel()} values for {y.shape[1]} output channels")
    return b


def forward(x: torch.Tensor, u: torch.Tensor, relu: bool, bias: torch.Tensor | None = None,
            out_relu: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """x (N, C, H, W), u (16, C, K) -> (y (N, K, H, W) channels-last, saved, fused).

    ``saved`` is what :func:`backward` needs besides U: V = [ReLU](B^T d B) as (16, N*th*tw, C), or,
    when ``fused``, x itself as NHWC (the fused backward computes V again, band by band).
    ``bias`` (K values) and ``out_relu``: the inference epilogue, y = [ReLU](y + bias) written by the
    output transform (no gradient flows through them here: inference, or a caller that adds its own)."""
    lib = library()
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    nt, dt = torch.get_num_threads(), _DTYPES[x.dtype]
    xh = _nhwc(x)
    u = u.contiguous()
    # a base tensor, not a view: autograd forbids in-place ops on views made inside a custom Function
    y = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    b = epilogue_bias(bias, y)
    bp = None if b is None else b.data_ptr()
    if _fused(lib, x.dtype, c, k, n * th * tw):
        lib.esdbs_wino_fused_forward(xh.data_ptr(), u.data_ptr(), y.data_ptr(), n, h, w, c, k, int(relu), nt, bp,
                                     int(out_relu))
        return y, xh, True
    V = x.new_empty((16, n * th * tw, c))
    lib.esdbs_wino_input_transform(dt, xh.data_ptr(), V.data_ptr(), n, h, w, c, int(relu), nt)
    M = _bmm(lib, nt, V, u)
    lib.esdbs_wino_output_transform(dt, M.data_ptr(), y.data_ptr(), n, h, w, k, nt, bp, int(out_relu))
    return y, V, False


def backward(gy: torch.Tensor, saved: torch.Tensor, fused: bool, u: torch.Tensor, shape, relu: bool, need_x: bool,
             need_u: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, du) of :func:`forward` for the output gradient gy (N, K, H, W), any layout;
    ``saved`` and ``fused`` as :func:`forward` returned them."""
    lib = library()
    n, c, h, w = shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    nt, dt = torch.get_num_threads(), _DTYPES[saved.dtype]
    saved = saved.contiguous()  # as forward made it, unless a saved-tensors hook unpacked it otherwise
    gh = _nhwc(gy.to(saved.dtype))
    if fused:
        ut = u.transpose(1, 2).contiguous()
        dx = (torch.empty((n, c, h, w), dtype=saved.dtype, device=saved.device, memory_format=torch.channels_last)
              if need_x else None)
        du = saved.new_empty((16, c, k)) if need_u else None
        lib.esdbs_wino_fused_backward(saved.data_ptr(), gh.data_ptr(), ut.data_ptr(), dx.data_ptr() if need_x else None,
                                      du.data_ptr() if need_u else None, n, h, w, c, k, int(relu), int(need_x),
                                      int(need_u), nt)
        return dx, du
    V = saved
    dM = V.new_empty((16, n * th * tw, k))
    lib.esdbs_wino_output_transform_adjoint(dt, gh.data_ptr(), dM.data_ptr(), n, h, w, k, nt)
    du = _bmm_tn(lib, nt, V, dM) if need_u else None
    if not need_x:
        return None, du
    dV = _bmm(lib, nt, dM, u.transpose(1, 2).contiguous())
    del dM
    dx = torch.empty((n, c, h, w), dtype=V.dtype, device=V.device, memory_format=torch.channels_last)
    lib.esdbs_wino_input_transform_adjoint(dt, dV.data_ptr(), V.data_ptr(), dx.data_ptr(), n, h, w, c, int(relu), nt)
    return dx, du
