"""The fuzz harness's long mode: hostile inputs, drawn without end, until the time is up.

``tests/test_fuzz.py`` runs a fixed selection in ``make test`` (every file kind and mutation class);
this draws round after round of every mutation of every kind (``tests/fuzz_harness.py``), each round
with a new seed, each case a command on one mutated file in a forked child with its own time and
memory limits, and stops after ``--minutes``.  A finding -- an internal error, a hang, more than one
stderr line, an error that does not name the file (and key), something written by a refused command,
a wrong result -- is printed as it happens; the mutated case directory is kept (``--keep``: every
case's) so it can be replayed with ``esdbs`` by hand.

Usage::

    python bench/fuzz.py --minutes 10                 # rounds with seeds 1, 2, ...
    python bench/fuzz.py --minutes 10 --seed 100 --work /tmp/fuzz

Writes ``bench/results/fuzz.json`` (``--out`` elsewhere): minutes, rounds, cases per family, the
findings with their case ids and error lines, the slowest cases.  Exit status 1 when anything was
found.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import provenance_block, write_result  # noqa: E402

import fuzz_harness as H  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1, help="the first round's seed (then +1 per round)")
    ap.add_argument("--work", default=None, help="where case directories go (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=H.TIMEOUT, help="seconds a case may run (default %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep every case directory, not only those with findings")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/fuzz.json)")
    a = ap.parse_args(argv)

    import os

    os.environ["ESDBS_FUZZ_KEEP"] = "1"  # a case with a finding keeps its directory for replaying
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="esdbs-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + 60 * a.minutes
    outcomes: list[H.Outcome] = []
    rounds = 0
    with H.Server() as server:
        base = H.build_base(work / "base", server)
        seed = a.seed
        while time.monotonic() < deadline:
            cases = H.random_cases(base, seed)
            rounds += 1
            for case in cases:
                if time.monotonic() >= deadline:
                    break
                case.id = f"s{seed}-{case.id}"
                o = H.run_case(server, base, work, case, timeout=a.timeout, keep=a.keep)
                outcomes.append(o)
                if o.findings:
                    print(f"FINDING {case.id}: {'; '.join(o.findings)}\n    {o.line[:300]}", flush=True)
            print(f"[fuzz] round {rounds} (seed {seed}): {len(outcomes)} cases, "
                  f"{sum(bool(o.findings) for o in outcomes)} findings, {(time.monotonic() - t0) / 60:.1f} min",
                  flush=True)
            seed += 1
    minutes = (time.monotonic() - t0) / 60
    found = [o for o in outcomes if o.findings]
    doc = {
        "provenance": provenance_block({"minutes": a.minutes, "first_seed": a.seed, "timeout_s": a.timeout,
                                        "memory_gb": H.MEMORY_GB}),
        "minutes": round(minutes, 2), "rounds": rounds, "cases": len(outcomes), "findings": len(found),
        "families": H.summarize(outcomes),
        "finding_cases": [{"id": o.case.id, "rc": o.rc, "findings": o.findings, "line": o.line,
                           "argv": o.case.argv} for o in found],
        "slowest": [{"id": o.case.id, "seconds": o.seconds, "rc": o.rc}
                    for o in sorted(outcomes, key=lambda o: -o.seconds)[:10]],
        "work": str(work),
    }
    path = write_result("fuzz", doc, a.out)
    print(f"fuzz: {len(outcomes)} cases in {minutes:.1f} min ({rounds} rounds), {len(found)} findings -> {path}")
    if not found and not a.keep and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
