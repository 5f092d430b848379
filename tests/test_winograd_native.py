"""The native CPU kernels' build: cached per machine, shared by concurrent processes, rebuilt when the
cached file is broken, and a clear reason when they cannot be built.  (Their numerics are tested in
tests/test_winograd.py, against the reference layer.)"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esdbs_ray import winograd_native as native


@pytest.fixture
def own_build(monkeypatch, tmp_path):
    """A fresh kernel cache directory and a process state that has loaded nothing; restored after."""
    saved = dict(native._state)
    native._reset()
    cache = tmp_path / "kernels"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    yield cache
    with native._lock:
        native._state.clear()
        native._state.update(saved)


def _check_runs(lib) -> None:
    x = torch.randn(2, 3, 4, 5)
    u = torch.randn(16, 3, 2)
    y, saved, fused = native.forward(x, u, True)
    assert y.shape == (2, 2, 4, 5) and torch.isfinite(y).all()
    assert saved.shape == ((2, 4, 5, 3) if fused else (16, 2 * 2 * 3, 3))  # x (NHWC) or V


def test_first_use_builds_into_the_cache_and_later_loads_reuse_it(own_build):
    lib = native.library()
    st = native.status()
    assert st["loaded"] and st["built_here"] and st["build_seconds"] > 0
    path = Path(st["path"])
    assert path.parent == own_build and path.name.startswith("winograd_native-") and path.suffix == ".so"
    assert path.stat().st_mode & stat.S_IROTH  # readable by the other users of a shared cache
    assert [p.name for p in own_build.iterdir()] == [path.name]  # no temporary file left behind
    _check_runs(lib)
    mtime = path.stat().st_mtime_ns
    native._reset()
    native.library()
    assert not native.status()["built_here"] and native.status()["path"] == str(path)
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.long
def test_processes_starting_together_share_one_binary(own_build):
    """Ray trials start at once: each process either builds (to a temporary file, then renames) or
    finds the whole file; none loads a partial one."""
    code = ("import esdbs_ray.winograd_native as n, torch\n"
            "n.library(); y = n.forward(torch.randn(2, 3, 4, 4), torch.randn(16, 3, 2), True)[0]\n"
            "print(n.status()['path'])\n")
    env = {**os.environ, native.CACHE_ENV: str(own_build)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert [p.name for p in own_build.iterdir()] == [Path(paths.pop()).name]


def test_a_broken_cached_binary_is_rebuilt(own_build):
    # (a path this process never loaded: dlopen would hand back a loaded library by its name)
    path = own_build / native._binary_name(native._compiler())
    own_build.mkdir()
    path.write_bytes(b"\x7fELF truncated by a full disk")
    lib = native.library()
    assert native.status()["built_here"] and native.status()["path"] == str(path)
    assert path.stat().st_size > 1000
    _check_runs(lib)


@pytest.mark.parametrize("cxx, message", [
    ("false", "building winograd_native.cpp failed"),  # a compiler that fails
    ("/nonexistent/bin/g++", "does not run"),
])
def test_no_working_compiler_is_one_clear_reason(own_build, monkeypatch, cxx, message):
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(native.NativeUnavailable, match=message):
        native.library()
    # remembered: the next call says the same without trying again
    monkeypatch.setenv("CXX", "/nonexistent/again")
    with pytest.raises(native.NativeUnavailable, match=message):
        native.library()
    assert not native.status()["loaded"] and message.split()[0] in native.status()["error"]
    assert not own_build.exists() or not any(own_build.iterdir())  # no partial file


def test_an_unusable_cache_directory_falls_back_to_the_temp_dir(own_build, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(native.CACHE_ENV, str(blocker / "kernels"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    _check_runs(native.library())
    assert Path(native.status()["path"]).parent == tmp_path / "tmp" / f"esdbs_ray-{os.getuid()}"


@pytest.mark.parametrize("capability", ["avx2", pytest.param("default", marks=pytest.mark.long)])
def test_cpus_without_avx512_get_a_build_of_their_own_and_torch_bmm(own_build, capability):
    """On a CPU torch runs at AVX2 (or no vector extension) the library is built for that ISA, under
    another name, without its AVX-512 GEMMs: the passes run around torch.bmm, with the same results.
    (ATEN_CPU_CAPABILITY makes torch report the lower capability on this machine.)"""
    code = ("import torch, esdbs_ray.winograd_native as n, esdbs_ray.winograd as wg\n"
            "torch.manual_seed(0)\n"
            "x, u, g = torch.randn(3, 5, 7, 6), torch.randn(16, 5, 9), torch.randn(3, 9, 7, 6)\n"
            "def run(impl):\n"
            "    xx, uu = x.clone().requires_grad_(), u.clone().requires_grad_()\n"
            "    y = wg.winograd_relu_conv(xx, uu, impl=impl)\n"
            "    return [y.detach(), *torch.autograd.grad(y, (xx, uu), g)]\n"
            "for a, b in zip(run('native'), run('reference')):\n"
            "    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\n"
            "print(n.path(torch.float32, 5, 9), n.library().esdbs_wino_has_gemm(), n.status()['path'])\n")
    env = {**os.environ, native.CACHE_ENV: str(own_build), "ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path_, has_gemm, binary = r.stdout.split()
    assert (path_, has_gemm) == ("bmm", "0")
    assert Path(binary).parent == own_build
    if torch.backends.cpu.get_cpu_capability().lower() != capability:
        native.library()  # this process's own build (another ISA) sits beside it under its own name
        assert native.status()["path"] != binary


def test_a_cache_directory_that_refuses_the_file_is_one_clear_reason(own_build, monkeypatch):
    """Writable by its mode bits yet refusing the file (a full disk, a sticky shared directory):
    NativeUnavailable naming the directory, which "auto" turns into one warning and a fallback."""
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(native.tempfile, "mkstemp", full_disk)
    with pytest.raises(native.NativeUnavailable, match="cannot write the compiled kernels to .*No space left"):
        native.library()
