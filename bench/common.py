"""Shared helpers of the benchmarks in ``bench/``: provenance header, timing, JSON results, tables.

Every benchmark writes ``bench/results/<name>.json`` (atomically, through ``esdbs_ray.storage``) with a
``provenance`` block -- git revision, package versions, host, CPU model, core count, torch threads,
and the 1/5/15-minute load averages at start (``load_average_start``, taken when the benchmark imports
this module) and end -- because our CPU machines are shared: a number
taken while another developer's job runs is only comparable with numbers taken side by side in the
same run, which is how every ratio in these benchmarks is measured.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"

SHARED_MACHINE_NOTE = (
    "Measured on a shared CPU machine: absolute figures move with other users' load (see load_average); "
    "ratios are measured side by side in one run (interleaved where stated), so they are the figures to compare."
)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# The load when the benchmark started (benchmarks import this module first).  provenance_block is
# mostly called when the results are written, so the load it reads then is the end's, not the start's.
START_LOAD = load_average()


def hardware() -> dict[str, Any]:
    """CPU model, cores, torch threads, CPU capability, GPU if any, current load average."""
    import torch

    from esdbs_ray.provenance import cpu_model, device_info

    info = dict(device_info())
    info.update(cpu_model=cpu_model(), machine=platform.machine(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), load_average=load_average())
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def hardware_line(hw: dict[str, Any] | None = None) -> str:
    hw = hw or hardware()
    gpu = f", GPU {hw['cuda_device']}" if hw.get("cuda_device") else ""
    return (f"{hw['cpu_model']} ({hw['cpu_count']} cores{gpu}), torch threads {hw['torch_threads']}, "
            f"load average {hw.get('load_average')}")


def provenance_block(config: dict[str, Any]) -> dict[str, Any]:
    """What every results JSON carries: git revision, versions, host, hardware, the benchmark's config,
    the load average when the benchmark started (``load_average_start``: taken when this module was
    imported, or the config's own ``load_average_start``) and when this block was made
    (``load_average_now``; ``write_result`` adds ``load_average_end``)."""
    from esdbs_ray.provenance import provenance

    hw = hardware()
    now = hw.pop("load_average", None)
    start = config.get("load_average_start", START_LOAD) if isinstance(config, dict) else START_LOAD
    return {**provenance(), "hardware": hw, "config": config, "command": " ".join(sys.argv),
            "load_average_start": start, "load_average_now": now, "note": SHARED_MACHINE_NOTE}


def write_result(name: str, doc: dict[str, Any], out: str | os.PathLike | None = None) -> str:
    """Atomically write ``doc`` to ``out`` or ``bench/results/<name>.json``; stamps the end load average."""
    from esdbs_ray import storage

    doc.setdefault("provenance", {})["load_average_end"] = load_average()
    path = Path(out) if out else RESULTS / f"{name}.json"
    return storage.write_json(path, doc)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on CPU."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards (perf_counter)."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


@contextmanager
def threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards); None leaves it alone."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def median(values: Iterable[float]) -> float:
    v = [x for x in values if x == x]
    return statistics.median(v) if v else float("nan")


class SilentHooks:
    """Trainer hooks that print nothing and keep each epoch's record with the wall time of its report."""

    def __init__(self):
        self.records: list[dict] = []
        self.report_times: list[float] = []
        self.rungs: list[dict] = []

    def on_epoch(self, record, checkpoint_path) -> None:
        self.report_times.append(time.perf_counter())
        self.records.append(record.to_dict())

    def on_rung(self, end) -> None:
        self.rungs.append(end.result.to_dict())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table.  ``columns``: (header, key, format spec such as ``'.4f'`` or ``''``);
    a missing / None value prints as ``-``; a string value is printed as is."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        line = []
        for _, key, spec in columns:
            v = r.get(key)
            if v is None:
                line.append("-")
            elif isinstance(v, str) or not spec:
                line.append(str(v))
            else:
                line.append(format(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if j and not _is_text(rows, columns[i][1]) else s.ljust(w)
                             for i, (s, w) in enumerate(zip(c, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _is_text(rows, key) -> bool:
    return any(isinstance(r.get(key), str) for r in rows)
