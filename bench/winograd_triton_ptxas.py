"""Benchmark without a GPU: the Triton Winograd-ReLU kernels compiled for an H100, their registers and spills.

What it measures: ``esdbs_ray/winograd_triton.py``'s three GEMM kernels (forward, dx, dU) compiled
ahead of time by Triton for ``sm_90a`` (no GPU needed: Triton lowers to PTX, the ptxas that ships
with Triton assembles it), for each block configuration and dtype, and what ptxas reports: registers
a thread, stack frame and spill bytes.  A kernel that spills keeps part of its accumulators in local
memory, which on the GPU costs memory traffic the fused kernels exist to avoid; the default blocks
(:func:`esdbs_ray.winograd_triton.blocks`) are the configuration that spills least here.  It says
nothing about speed: ``bench/winograd.py --devices cuda --triton-blocks ...`` times configurations
on a GPU.

    python bench/winograd_triton_ptxas.py                 # default sweep, bf16 and fp32, ~5 min on 2 cores
    python bench/winograd_triton_ptxas.py --configs 16,32,16,4,1 32,32,32,4,2 --dtypes bf16

Result: ``bench/results/winograd_triton_ptxas.json``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import format_table, provenance_block, write_result  # noqa: E402

DEFAULT_CONFIGS = ["16,32,16,8,2", "16,16,16,8,2", "16,32,16,4,1", "16,16,16,4,1", "16,32,32,4,2", "32,32,16,4,1",
                   "32,32,32,4,2", "32,32,32,8,2", "64,32,32,8,2"]
INTS = ("H", "W", "C", "K", "TH", "TW", "T")


def _signatures(dt: str) -> dict:
    from esdbs_ray import winograd_triton as wt
    ints = {k: "i32" for k in INTS}
    return {
        "forward": (wt._fwd_kernel, {"x_ptr": f"*{dt}", "u_ptr": f"*{dt}", "y_ptr": f"*{dt}", **ints}),
        "dx": (wt._dx_kernel, {"g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "x_ptr": f"*{dt}", "p_ptr": f"*{dt}",
                               "NIMG": "i32", **ints}),
        "du": (wt._du_kernel, {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "part_ptr": "*fp32", **ints, "SPLIT": "i32"}),
    }


def compile_one(fn, signature: dict, constexprs: dict, warps: int, stages: int, arch: int, workdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = Path(workdir) / f"{fn.__name__}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    r = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                       capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(spill.group(1)) if spill else None,
            "spill_store_bytes": int(spill.group(2)) if spill else None,
            "spill_load_bytes": int(spill.group(3)) if spill else None,
            "compile_s": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="BT,BN,BR,WARPS,STAGES")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32-tf32", "fp32-ieee"],
                    choices=["bf16", "fp16", "fp32-tf32", "fp32-ieee"],
                    help="fp32-ieee: float32 GEMMs in full precision (FMA), what torch's default matmul setting "
                         "gives; fp32-tf32: on the tensor cores, as with TF32 allowed")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    ap.add_argument("--out", default=None, help="result path (default bench/results/winograd_triton_ptxas.json)")
    args = ap.parse_args(argv)
    configs = []
    for c in args.configs:
        try:
            bt, bn, br, warps, stages = (int(v) for v in c.split(","))
        except ValueError:
            ap.error(f"--configs: {c!r} is not five integers BT,BN,BR,WARPS,STAGES")
        configs.append((bt, bn, br, warps, stages))
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for dt in args.dtypes:
            for kernel, (fn, sig) in _signatures(dt.split("-")[0]).items():
                for bt, bn, br, warps, stages in configs:
                    consts = {"RELU": True, "PREC": "tf32" if dt == "fp32-tf32" else "ieee", "BT": bt, "BN": bn, "BR": br}
                    row = {"kernel": kernel, "dtype": dt, "BT": bt, "BN": bn, "BR": br, "warps": warps, "stages": stages}
                    try:
                        row.update(compile_one(fn, sig, consts, warps, stages, args.arch, work))
                    except Exception as e:  # noqa: BLE001 - a configuration Triton rejects is a result too
                        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    rows.append(row)
                    print(row, flush=True)
    ok = [r for r in rows if "error" not in r]
    best = {}
    for r in ok:
        key = f"{r['kernel']}_{r['dtype']}"
        if key not in best or (r["stack_bytes"], r["registers"]) < (best[key]["stack_bytes"], best[key]["registers"]):
            best[key] = r
    print(format_table(ok, [("kernel", "kernel", ""), ("dtype", "dtype", ""), ("BT", "BT", ""), ("BN", "BN", ""),
                            ("BR", "BR", ""), ("warps", "warps", ""), ("stages", "stages", ""),
                            ("registers", "registers", ""), ("stack B", "stack_bytes", ""),
                            ("spill st B", "spill_store_bytes", "")]))
    doc = {"benchmark": "winograd_triton_ptxas",
           "what": f"registers and spills (ptxas -v, sm_{args.arch}a) of the Triton Winograd-ReLU kernels per block "
                   "configuration; compiled ahead of time, nothing run",
           "wall_s": time.perf_counter() - t0,
           "provenance": provenance_block(vars(args)),
           "least_spilling": best,
           "results": rows}
    path = write_result("winograd_triton_ptxas", doc, args.out)
    print(f"wrote {path} in {doc['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
