"""What Tune's own files say about an experiment's trials: the Tune adapter of ``esdbs results``.

:func:`tune_trials` reads ``tune/base`` with Tune's ``ExperimentAnalysis`` (through the experiment's
``pyarrow.fs`` filesystem): per member its trial id, status, iterations, wall time and wall time per
epoch.  Everything else ``esdbs results`` shows comes from the project's own JSON; an experiment
without ``tune/`` (copied without it, or written by hand) still tabulates, with these columns empty.
"""
from __future__ import annotations

from .layout import ExperimentLayout as L
from .replicates import replicate_parent
from .storage import Tree

__all__ = ["tune_trials"]


def tune_trials(tree: Tree) -> tuple[dict[str, dict], list[str]]:
    """member -> {trial_id, status, iterations, wall_seconds, wall_by_epoch, trial_dir} from Tune's
    experiment analysis (its JSON state and result files), and notes on what was missing.  One seed's
    experiment of a multi-seed run: its trials in the run's Tune experiment (``trial_dir`` from there)."""
    seed, up = None, ""
    if not tree.is_dir(*L.TUNE_BASE):
        run = replicate_parent(tree)
        if run is None:
            return {}, [f"{tree.uri(*L.TUNE_BASE)}: no Tune experiment (trial ids and wall times left empty)"]
        (tree, seed), up = run, "../"
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(tree.path(*L.TUNE_BASE), storage_filesystem=tree.fs)
        frames = analysis.trial_dataframes
    except Exception as exc:  # Tune's own error types; the JSON still gives every other column
        return {}, [f"{tree.uri(*L.TUNE_BASE)}: Tune's experiment analysis failed ({str(exc).splitlines()[0][:200]})"]
    out = {}
    base = tree.path()
    for t in analysis.trials:
        member = (t.config or {}).get("member")
        if member is None or (t.config or {}).get("seed") != seed:
            continue
        df = frames.get(t.trial_id)
        if df is None:
            df = frames.get(t.path)
        wall_by_epoch = {}
        if df is not None and "epoch" in df and "time_total_s" in df:
            for e, w in zip(df["epoch"], df["time_total_s"]):
                wall_by_epoch[int(e)] = float(w)  # a repeated epoch (after a restart) keeps its latest time
        last = t.last_result or {}
        rel = t.path[len(base):].lstrip("/") if base and t.path.startswith(base) else t.path
        out[member] = {"trial_id": t.trial_id, "status": t.status, "iterations": last.get("training_iteration"),
                       "wall_seconds": last.get("time_total_s"), "wall_by_epoch": wall_by_epoch, "trial_dir": up + rel}
    return out, []
