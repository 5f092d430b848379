"""Hostile inputs by class, not by case: the fuzz harness (``tests/fuzz_harness.py``) over every file esdbs reads.

A fixed, seeded selection -- every file kind (the smoke experiment's JSON, YAML, Parquet and weights
files, a train-one checkpoint, an export's manifest and safetensors, image files and folders,
Fashion-MNIST idx files, CIFAR batches, a config YAML, --set values, DBS constants, flags, submit's run
arguments) times every mutation class that fits it (truncated, random bytes, flipped bits, the wrong
JSON type at a key, a missing key, huge values, deep nesting, alias bombs, duplicate keys, a 3 MB
document, dangling links, link loops, directories and pipes in a file's place, values out of range),
each through a command that reads it -- must end every time in a correct result or in one
``esdbs: error:`` line naming the file (and key) with nothing written, within the case's time limit.
The long mode draws without end: ``python bench/fuzz.py --minutes 10``.
"""
from __future__ import annotations

import time

import pytest

import fuzz_harness as H


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    with H.Server() as server:
        yield server, H.build_base(work / "base", server), work


def test_the_selection_covers_every_file_kind_and_mutation_class(fuzz):
    _, base, _ = fuzz
    cases = H.quick_cases(base)
    families = {c.family for c in cases}
    import random

    for kind in H.KINDS.values():
        if kind.name == "checkpoint" and not H._have_fashion_mnist():
            continue
        assert {f"{m.kind}/{m.cls}" for m in kind.mutations(base, random.Random(0))} <= families, kind.name
        used = {c.argv[0] for c in cases if c.family.startswith(kind.name + "/")}
        assert used, kind.name
    for family in ("--set value/alias", "--set value/deep", "--set value/huge", "--set value/duplicate key",
                   "flags/dbs-plan", "submit/run arguments", "submit/plain http", "read-only/experiment",
                   "experiment directory/not an experiment", "failed start/image cache"):
        assert any(f == family for f in families), family
    classes = {f.split("/", 1)[1] for f in families}
    assert {"truncate", "random bytes", "wrong type", "huge", "deep", "alias", "duplicate key", "size", "link",
            "missing key", "content"} <= classes


@pytest.mark.slow
def test_hostile_inputs_end_in_a_result_or_one_line_naming_the_file(fuzz, request):
    server, base, work = fuzz
    cases = H.quick_cases(base)
    t0 = time.monotonic()
    outcomes = [H.run_case(server, base, work, c) for c in cases]
    seconds = time.monotonic() - t0
    found = [o for o in outcomes if o.findings]
    slowest = max(outcomes, key=lambda o: o.seconds)
    summary = (f"{len(outcomes)} cases ({len({c.family for c in cases})} file kind x mutation class families) in "
               f"{seconds:.1f} s, {len(found)} finding(s); slowest case {slowest.seconds:.1f} s ({slowest.case.id[:80]})")
    _report(request, summary)
    assert not found, "\n".join(f"{o.case.id}: {'; '.join(o.findings)}\n    {o.line[:300]}" for o in found)


def _report(request, line: str) -> None:
    """The harness's time and counts, for the session's terminal summary (conftest.py prints them; under
    pytest-xdist a worker's prints would not reach the terminal)."""
    factory = request.config._tmp_path_factory
    shared = factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        shared = shared.parent
    (shared / "fuzz-summary.txt").write_text(line + "\n")
