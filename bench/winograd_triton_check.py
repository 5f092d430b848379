"""Correctness of the Triton Winograd-ReLU kernels (``impl="triton"``) against the reference layer.

Forward and both gradients for a set of small shapes (one program; several tile blocks, channel
chunks, output blocks and dU splits; odd sizes; a 1x1 image; narrow and wide layers), float32
against the float64 reference, float16 (and bfloat16 on a GPU) against it too; another block
configuration; bitwise repeatability; one gradient alone; NaN; an empty batch; a two-layer model's
training step.  Each check is a number and the tolerance it must meet; ``ok`` is all of them.

Two uses:

* on a GPU (``--device cuda``): the check a GPU session runs before timing the kernels;
* without one, in Triton's interpreter (``TRITON_INTERPRET=1 ... --device cpu``): the kernels'
  numpy semantics on CPU tensors, which is how ``tests/test_winograd_triton.py`` checks them.  The
  interpreter's tl.dot is wrong for bfloat16 (it multiplies the raw uint16 bits), so bf16 is checked
  on a GPU only.

    TRITON_INTERPRET=1 python bench/winograd_triton_check.py --device cpu     # ~35 s on 2 cores
    python bench/winograd_triton_check.py --device cuda --out $OUT/triton_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (N, C, K, H, W, relu); the interpreter runs each program in numpy (~0.1 s), so they are few and small
SHAPES = [(2, 5, 7, 5, 7, True), (2, 5, 7, 5, 7, False), (3, 40, 36, 9, 10, True), (2, 16, 16, 4, 4, False),
          (1, 3, 20, 1, 1, True), (2, 33, 70, 6, 3, True)]
TOL = {"fp32": 2e-6, "half": 1e-2, "model": 1e-5}  # relative to the largest entry of the reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_checks(device: str, shapes=SHAPES, extras: bool = True) -> dict:
    """The checks on ``device``; ``shapes`` and ``extras`` (all but the per-shape float32 checks) to run fewer."""
    from esdbs_ray import winograd as wg
    from esdbs_ray import winograd_triton as wt

    dev = torch.device(device)
    if dev.type == "cpu" and not wt.interpreted():
        raise SystemExit("on CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    checks: dict[str, dict] = {}

    def check(name: str, value, tol=None, expect=None):
        ok = value <= tol if tol is not None else value == expect
        checks[name] = {"value": value, **({"tol": tol} if tol is not None else {"expect": expect}), "ok": bool(ok)}

    def grads(impl, x, u, gy, relu, need=(True, True)):
        x = x.clone().requires_grad_(need[0])
        u = u.clone().requires_grad_(need[1])
        y = wg.winograd_relu_conv(x, u, relu=relu, impl=impl)
        y.backward(gy.to(y.dtype))
        return y.detach(), x.grad, u.grad

    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, dtype=dtype).to(dev)

    for n, c, k, h, w, relu in shapes:
        x, u, gy = randn(n, c, h, w), randn(16, c, k) * 0.3, randn(n, k, h, w)
        ref = grads("reference", x, u, gy, relu)
        got = grads("triton", x.float(), u.float(), gy.float(), relu)
        key = f"fp32 {n}x{c}x{h}x{w}->{k} relu={relu}"
        for name, a, b in zip(("y", "dx", "du"), got, ref):
            check(f"{key} {name}", _rel(a, b), TOL["fp32"])
        check(f"{key} output channels-last", got[0].is_contiguous(memory_format=torch.channels_last), expect=True)
        check(f"{key} dtypes", [str(t.dtype) for t in got], expect=["torch.float32"] * 3)

    if not extras:
        return _report(dev, wt, checks)

    # half precision (2^-11 per rounding, a few roundings deep) against float64; without the ReLU,
    # whose mask flips on rounding and would make dx's largest error meaningless
    x, u, gy = randn(2, 24, 6, 7), randn(16, 24, 20) * 0.3, randn(2, 20, 6, 7)
    halves = [torch.float16] + ([torch.bfloat16] if dev.type == "cuda" else [])
    for dt in halves:
        name = str(dt).replace("torch.", "")
        ref = grads("reference", x, u, gy, False)
        got = grads("triton", x.to(dt), u.to(dt), gy.to(dt), False)
        for what, a, b in zip(("y", "dx", "du"), got, ref):
            check(f"{name} {what}", _rel(a, b), TOL["half"] * (4 if dt == torch.bfloat16 else 1))
        check(f"{name} dtypes", [str(t.dtype) for t in got], expect=[str(dt)] * 3)
        yr = grads("reference", x, u, gy, True)[0]
        yt = grads("triton", x.to(dt), u.to(dt), gy.to(dt), True)[0]
        check(f"{name} relu y", _rel(yt, yr), TOL["half"] * (4 if dt == torch.bfloat16 else 1))

    # another block configuration (what a GPU sweep sets) gives the same result; the same bits every
    # run (no atomics, fixed dU splits); one gradient alone equals it computed with the other
    x, u, gy = randn(2, 20, 6, 7).float(), (randn(16, 20, 18) * 0.3).float(), randn(2, 18, 6, 7).float()
    base = grads("triton", x, u, gy, True)
    other_blocks = {wt.BLOCKS_ENV: "32,32,32,4,2"}
    with mock.patch.dict(os.environ, other_blocks):
        other = grads("triton", x, u, gy, True)
    check("other blocks", max(_rel(a, b) for a, b in zip(other, base)), TOL["fp32"])
    # the blocks a forward ran with are the ones its backward runs with (set around the forward only)
    xg, ug = x.clone().requires_grad_(), u.clone().requires_grad_()
    with mock.patch.dict(os.environ, other_blocks):
        yg = wg.winograd_relu_conv(xg, ug, impl="triton")
    yg.backward(gy)
    check("blocks travel to the backward", torch.equal(xg.grad, other[1]) and torch.equal(ug.grad, other[2]),
          expect=True)
    again = grads("triton", x, u, gy, True)
    check("bitwise repeat", all(torch.equal(a, b) for a, b in zip(again, base)), expect=True)
    check("du alone", torch.equal(grads("triton", x, u, gy, True, need=(False, True))[2], base[2]), expect=True)
    check("dx alone", torch.equal(grads("triton", x, u, gy, True, need=(True, False))[1], base[1]), expect=True)

    # a channels-last input changed in place after the layer: autograd's version check says so
    xc = randn(2, 6, 5, 5).float().contiguous(memory_format=torch.channels_last).requires_grad_()
    xi = xc * 1.0  # a non-leaf, channels-last
    yi = wg.winograd_relu_conv(xi, randn(16, 6, 4).float(), impl="triton")
    xi.add_(1.0)
    try:
        yi.sum().backward()
        caught = "no error"
    except RuntimeError as e:
        caught = "modified by an inplace operation" in str(e)
    check("in-place change of the saved input is caught", caught, expect=True)

    # NaN passes the ReLU as in the reference; an empty batch gives an empty output and a zero dU
    xn, un = randn(2, 6, 5, 5).float(), randn(16, 6, 4).float()
    xn[0, 1, 2, 3] = float("nan")
    a, b = wg.winograd_relu_conv(xn, un, impl="triton"), wg.winograd_relu_conv(xn, un, impl="reference")
    check("nan pattern", bool(torch.equal(a.isnan(), b.isnan()) and a.isnan().any()), expect=True)
    xe = torch.zeros(0, 6, 5, 5, device=dev, requires_grad=True)
    ue = randn(16, 6, 4).float().requires_grad_()
    ye = wg.winograd_relu_conv(xe, ue, impl="triton")
    ye.sum().backward()
    check("empty batch", [list(ye.shape), list(xe.grad.shape), ue.grad.abs().sum().item()],
          expect=[[0, 4, 5, 5], [0, 6, 5, 5], 0.0])

    # a two-layer model with bias and batch norm: every parameter's gradient, against the model's
    # largest gradient entry (the first conv's bias feeds a batch norm: its true gradient is 0, so
    # both sides hold rounding noise there)
    def model(impl):
        torch.manual_seed(1)
        return torch.nn.Sequential(wg.WinogradReLUConv2d(4, 8, bias=True, impl=impl), torch.nn.BatchNorm2d(8),
                                   wg.WinogradReLUConv2d(8, 6, impl=impl), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(6, 3)).to(dev)
    xb, yb = randn(4, 4, 7, 7).float(), torch.tensor([0, 1, 2, 0], device=dev)
    mr, mt = model("reference"), model("triton")
    for m in (mr, mt):
        torch.nn.functional.cross_entropy(m(xb), yb).backward()
    scale = max(p.grad.abs().max().item() for p in mr.parameters())
    diff = max((pt.grad - pr.grad).abs().max().item() for pr, pt in zip(mr.parameters(), mt.parameters()))
    check("model step gradients", diff / scale, TOL["model"])

    return _report(dev, wt, checks)


def _report(dev, wt, checks: dict) -> dict:
    return {"device": dev.type, "interpreted": wt.interpreted(), "blocks_default": wt.blocks(32, 32),
            "ok": all(c["ok"] for c in checks.values()), "failed": [k for k, c in checks.items() if not c["ok"]],
            "checks": checks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    report = run_checks(args.device)
    text = json.dumps(report, indent=1)
    if args.out:
        from esdbs_ray.storage import write_text  # temp file + rename
        write_text(args.out, text + "\n")
    print(text)
    print("OK" if report["ok"] else f"FAILED: {', '.join(report['failed'])}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
