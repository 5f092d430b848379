"""The Triton Winograd-ReLU kernels (``impl="triton"``), checked without a GPU in Triton's interpreter.

``TRITON_INTERPRET=1`` runs the kernels' Python (numpy) semantics on CPU tensors: the same index
arithmetic, masks, transforms, block loops, dU splits and quadrant planes that the GPU compiles.  The
interpreter must be chosen before the kernels are defined, so ``bench/winograd_triton_check.py`` (the
check a GPU session runs with ``--device cuda``) runs in a subprocess; each of its checks carries its
tolerance, and every one is asserted here.  bf16 is the GPU run's: the interpreter's tl.dot
multiplies bf16's raw bits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:  # a CPU-only torch does not bring Triton: say so in the skip, these kernels go unchecked
    pytest.skip("Triton is missing (pip install triton; a CPU-only torch does not install it): the Triton "
                "Winograd-ReLU kernels are not checked", allow_module_level=True)

from esdbs_ray import winograd as wg  # noqa: E402
from esdbs_ray import winograd_triton as wt  # noqa: E402

CHECK = Path(__file__).resolve().parents[1] / "bench" / "winograd_triton_check.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(wt.BLOCKS_ENV, None)
    r = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert (r.returncode == 0) == rep["ok"]
    assert rep["ok"], f"failed checks: {rep['failed']}"
    return rep


def test_the_check_ran_the_interpreter_on_every_case(report):
    assert report["interpreted"] and report["device"] == "cpu"
    names = list(report["checks"])
    assert sum(n.startswith("fp32 ") and n.endswith(" du") for n in names) == 6
    assert any(n.startswith("float16 ") for n in names) and not any(n.startswith("bfloat16") for n in names)


@pytest.mark.parametrize("group", ["fp32 ", "float16 ", "other blocks", "blocks travel to the backward",
                                   "bitwise repeat", "du alone", "dx alone",
                                   "in-place change of the saved input is caught", "nan pattern", "empty batch",
                                   "model step"])
def test_checks_pass(report, group):
    rows = {k: v for k, v in report["checks"].items() if k.startswith(group)}
    assert rows, group
    bad = {k: v for k, v in rows.items() if not v["ok"]}
    assert not bad, bad


def test_a_check_that_fails_is_reported():
    """The checks' verdicts are not vacuous: a kernel made wrong (the dU sum halved) fails them."""
    code = ("import sys; sys.argv=['x','--device','cpu']; sys.path.insert(0, %r)\n"
            "import esdbs_ray.winograd_triton as wt\n"
            "orig = wt.backward\n"
            "def bad(*a, **k):\n"
            "    dx, du = orig(*a, **k)\n"
            "    return dx, (du * 0.5 if du is not None else None)\n"
            "wt.backward = bad\n"
            "import winograd_triton_check as c\n"
            "rep = c.run_checks('cpu', shapes=[(2, 5, 7, 5, 7, True)], extras=False)\n"
            "print('FAILED', len(rep['failed']), any(f.endswith(' du') for f in rep['failed']))\n") % str(CHECK.parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert "FAILED" in r.stdout, r.stderr[-3000:]
    n, du_failed = r.stdout.split("FAILED")[1].split()
    assert int(n) > 0 and du_failed == "True"


def test_outside_the_interpreter_cpu_tensors_are_refused_by_name():
    if wt.interpreted():
        pytest.skip("this process runs Triton's interpreter")
    x, u = torch.randn(2, 3, 4, 4), torch.randn(16, 3, 5)
    with pytest.raises(ValueError, match="impl 'triton' runs float32 / float16 / bfloat16 on CUDA"):
        wg.winograd_relu_conv(x, u, impl="triton")
    # "auto" never picks it (unmeasured on a GPU)
    assert wg.choose_impl(x, u) != "triton"


@pytest.mark.parametrize("value, match", [("16,32,16,4", "five integers"), ("24,32,16,4,1", "BT must be a power of two"),
                                          ("16,32,8,4,1", "BR must be a power of two"),
                                          ("16,32,16,3,1", "warps must be a power of two")])
def test_bad_block_override_names_the_variable(monkeypatch, value, match):
    monkeypatch.setenv(wt.BLOCKS_ENV, value)
    with pytest.raises(ValueError, match=match) as e:
        wt.blocks(32, 32)
    assert "ESDBS_TRITON_BLOCKS" in str(e.value)


def test_default_blocks_follow_the_layer_width(monkeypatch):
    monkeypatch.delenv(wt.BLOCKS_ENV, raising=False)
    assert wt.blocks(256, 256) == (16, 32, 16, 8, 2)
    assert wt.blocks(8, 4) == (16, 16, 16, 8, 2)


def test_without_triton_the_layer_says_what_is_missing(monkeypatch):
    import esdbs_ray

    monkeypatch.setitem(sys.modules, "esdbs_ray.winograd_triton", None)  # import now raises ImportError
    monkeypatch.delattr(esdbs_ray, "winograd_triton", raising=False)
    with pytest.raises(ValueError, match=r"impl 'triton' needs Triton \(pip install triton\)"):
        wg.winograd_relu_conv(torch.randn(2, 3, 4, 4), torch.randn(16, 3, 5), impl="triton")
