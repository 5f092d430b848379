"""What ``esdbs run`` prints: while trials train one line per member-epoch, with the whole run's
progress and an ETA -- instead of Tune's boxed tables (those come back with ``--verbose``).

A Tune callback (the Tune adapter of the console): it reads each reported result -- the trainer's
epoch record plus the rung fields the trainable attaches -- and prints, e.g.::

    [esdbs]  25% 3/12 epochs, ETA 1:40 | alexnet        epoch 3/4 dense  val 0.8812 B  512 lr 0.0800 | lr phase: level 2

and one line when a trial ends (its last rung's validation and test accuracy) or fails.  The ETA is
the remaining member-epochs at the rate seen so far (epochs of different members cost differently:
it is a rough figure and says so by rounding).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from ray import tune

from .layout import ExperimentLayout
from .records import MemberSummary, RungResult

__all__ = ["Progress", "format_summary", "summary_line"]

_DECISION_WIDTH = 60


class Progress(tune.Callback):
    """``total_epochs``: member -> epochs its trial trains (a resumed trial's earlier epochs count as done
    when they are reported again)."""

    def __init__(self, total_epochs: dict[str, int], stream: TextIO | None = None):
        self.total = dict(total_epochs)
        self.done: dict[str, set[int]] = {m: set() for m in self.total}
        self.stream = stream
        self.t0: float | None = None
        self.width = max((len(m) for m in self.total), default=8)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment (a resumed run gets them back): no stream,
        # and the rate starts afresh
        return {**self.__dict__, "stream": None, "t0": None}

    def _print(self, text: str) -> None:
        print(f"[esdbs] {text}", file=self.stream or sys.stdout, flush=True)

    def _overall(self) -> str:
        done, total = sum(len(d) for d in self.done.values()), sum(self.total.values())
        elapsed = time.monotonic() - (self.t0 or time.monotonic())
        eta = ""
        if 0 < done < total and elapsed > 0:
            left = (total - done) * elapsed / done
            eta = f", ETA {_clock(left)}"
        return f"{100 * done / max(total, 1):3.0f}% {done}/{total} epochs{eta}"

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.t0 is None:
            self.t0 = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        member = _key(trial, result)
        if member not in self.total or "epoch" not in result:
            return
        if self.t0 is None:
            self.t0 = time.monotonic()
        epoch = int(result["epoch"])
        self.done[member].add(epoch)
        target = result.get("target_sparsity") or 0.0
        rung = f"rung {100 * target:.0f}%" if target else "dense"
        if result.get("basis_threshold") is not None:
            rung = f"basis t={result['basis_threshold']:g}"
        decision = str(result.get("decision") or "")
        if len(decision) > _DECISION_WIDTH:
            decision = decision[:_DECISION_WIDTH - 3] + "..."
        line = (f"{self._overall()} | {member:<{self.width}} epoch {epoch + 1}/{self.total[member]} {rung:<9} "
                f"val {result.get('val_accuracy', float('nan')):.4f} B {int(result.get('batch_size', 0)):4d} "
                f"lr {result.get('lr', float('nan')):.4f}" + (f" | {decision}" if decision else ""))
        self._print(line)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        member = _key(trial, last)
        if member in self.total:
            self.done[member] = set(range(self.total[member]))
            acc = last.get("rung_test_accuracy")
            self._print(f"{self._overall()} | {member} done" + (f": test {acc:.4f} at its last rung" if acc else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        member = _key(trial)
        self._print(f"{member}: trial failed (Tune retries it up to max_failures; see its error.txt)")


def _key(trial, result: dict | None = None) -> str | None:
    """The trial's name in ``total_epochs``: its member's, with its seed in a multi-seed run."""
    config = trial.config or {}
    member = (result or {}).get("member") or config.get("member")
    return None if member is None else ExperimentLayout.trial_key(member, config.get("seed"))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------------------------------
# the end of a run
# --------------------------------------------------------------------------------------------------
def _or(x, default):
    return default if x is None else x


def format_summary(summary: dict) -> str:
    """The run's table: each member at the rung its stack uses, each group's ensemble, where it all is."""
    lines = [f"{'member':<28} {'variant':<12} {'val acc':>8} {'test acc':>8} {'sparsity':>8} {'B':>10} {'s/epoch':>8}"]
    stack = summary["config"]["stack"]
    for m in map(MemberSummary.from_dict, summary["members"]):
        # the rung the stack uses: by target sparsity, or by threshold t for a BasisConv ladder
        r = m.stacked_rung(stack.get("sparsity"), stack.get("basis_threshold")) or m.final or RungResult()
        b = m.batch_size_range or ["?", "?"]
        shown = f"t={r.basis_threshold:g}" if r.basis_threshold is not None else f"{r.sparsity or 0.0:.3f}"
        nan = float("nan")
        lines.append(f"{m.member:<28} {m.variant:<12} {_or(r.val_accuracy, nan):8.4f} "
                     f"{_or(r.test_accuracy, nan):8.4f} {shown:>8} "
                     f"{str(b[0]) + '-' + str(b[1]):>10} {m.mean_epoch_seconds:8.1f}")
    for variant, e in summary["ensembles"].items():
        lines.append(f"{'ensemble (' + e['method'] + ')':<28} {variant:<12} {e['val_accuracy']:8.4f} "
                     f"{e['test_accuracy']:8.4f}")
    lines.append(f"wall time {summary['wall_seconds']:.0f}s (base stage {summary['base_wall_seconds']:.0f}s); "
                 f"results in {summary['experiment_dir']}")
    lines.append(f"TensorBoard: tensorboard --logdir {ExperimentLayout(summary['experiment_dir']).tensorboard} "
                 "--host 127.0.0.1")
    return "\n".join(lines)


def summary_line(summary: dict) -> str:
    """``--quiet``: one line -- each group's ensemble test accuracy, the time, where the results are."""
    ens = "; ".join(f"{g} ensemble test {e['test_accuracy']:.4f}" for g, e in summary["ensembles"].items())
    return (f"{ens or 'no ensemble'}; {summary['wall_seconds']:.0f} s; results in {summary['experiment_dir']}")
