"""What a person sees of `esdbs run`: a line per member-epoch instead of Tune's tables, and a stop signal
that ends the run with the command that resumes it (real processes, real signals, a real local Ray)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _esdbs(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "esdbs_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_run_prints_a_line_per_epoch_and_its_table(tmp_path):
    out = tmp_path / "exp"
    p = _esdbs("run", "--preset", "smoke", "--out", str(out))
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    lines = (stdout + stderr).strip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    progress = [ln for ln in lines if ln.startswith("[esdbs]") and "epochs" in ln and " epoch " in ln]
    summary = json.loads((out / "summary.json").read_text())
    total = sum(m["epochs"] for m in summary["members"])
    assert len(progress) == total  # one per member-epoch
    assert progress[-1].startswith(f"[esdbs] 100% {total}/{total} epochs")
    shown = "\n".join(lines)
    for tune_text in ("╭", "Trial status", "driver_artifacts", "Tuner.restore", "Token authentication"):
        assert tune_text not in shown, tune_text
    ens = summary["ensembles"]["SWR-CNN+DBS"]
    assert f"{ens['test_accuracy']:.4f}" in lines[-3]  # the ensemble row of the final table


@pytest.mark.long
def test_a_stop_signal_ends_the_run_with_the_command_that_resumes_it(tmp_path):
    out = tmp_path / "exp"
    p = _esdbs("run", "--preset", "smoke", "--out", str(out))
    deadline = time.monotonic() + 300
    seen = []
    for line in p.stdout:  # wait until the trials train: the first epoch is reported
        seen.append(line)
        if " epoch " in line or time.monotonic() > deadline:
            break
    assert any(" epoch " in s for s in seen), "".join(seen)
    os.kill(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr[-3000:]
    err = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert err[-1] == f"esdbs: interrupted; the trials' state is saved: esdbs run --resume {out}", stderr[-3000:]
    assert "Tuner.restore" not in stdout + stderr and "Traceback" not in stdout + stderr
    # it stopped: no stacking, no summary; what resumes it is there
    assert not (out / "stacking.json").exists() and not (out / "summary.json").exists()
    assert (out / "config.yaml").is_file() and (out / "tune" / "base").is_dir()
