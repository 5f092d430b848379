"""A multi-seed run (config ``seeds``, ``esdbs run --seeds 0,1,2``): each seed's config, directory and trials.

The matrix is trained once per seed as trials of ONE Tune experiment (``OUT/tune/base``, a trial's
Tune config ``{"member": name, "seed": s}`` and its directory ``<member>_s<seed>_<id>``), so that Ray
spreads every seed's trials over the cluster.  Each seed's artifacts go to ``OUT/seed-<s>/``, laid out
as the experiment its own config (:meth:`~esdbs_ray.config.PipelineConfig.replicate`) leaves when run
alone -- members, predictions, weights, TensorBoard, stacking files, summary -- so every reader (``esdbs
report``, ``results``, ``stack``, ``export``) takes a seed's directory as it is, and each seed's
members stack among themselves, never with another seed's.  ``OUT/config.yaml`` holds the whole
config (``seeds`` included) and ``OUT/summary.json`` where each seed's experiment is.

A one-seed config is the plain layout: no ``seed-<s>/``, Tune's config ``{"member": name}``.
"""
from __future__ import annotations

import json
from typing import Callable

import yaml

from . import storage
from .config import PipelineConfig, TrialSpec
from .layout import ExperimentLayout, write_marker
from .records import MemberSummary

__all__ = ["trials_by_seed", "trial_order", "trial_finished", "seed_layouts", "seed_summary", "run_summary", "replicate_dirs",
           "replicate_parent"]


def trials_by_seed(cfg: PipelineConfig) -> dict[int | None, dict[str, TrialSpec]]:
    """seed -> member -> its trial; the key is None for a one-seed config."""
    return {r.seed if cfg.seeds else None: {t.member: t for t in r.trials()} for r in cfg.replicates()}


def trial_order(by_seed: dict[int | None, dict[str, TrialSpec]],
                cost: Callable[[TrialSpec], float]) -> list[tuple[str, int | None]]:
    """(member, seed) of every trial, the costliest first (the run does not end with one slow trial
    alone on the machine); among trials of one cost, seed by seed, so every seed's trials spread over
    the run."""
    seeds = list(by_seed)
    return sorted(((m, s) for s, specs in by_seed.items() for m in specs),
                  key=lambda ms: (-cost(by_seed[ms[1]][ms[0]]), seeds.index(ms[1])))


def seed_layouts(cfg: PipelineConfig, layout: ExperimentLayout) -> dict[int, ExperimentLayout]:
    """Where each seed's experiment goes: the run's own directory for one seed, else OUT/seed-<s>/ --
    marked and given its seed's config.yaml (once: a resumed run keeps what is there)."""
    if not cfg.seeds:
        return {cfg.seed: layout}
    out = {}
    for r in cfg.replicates():
        where = out[r.seed] = layout.replicate(r.seed)
        if not storage.Tree(where.root).is_file(ExperimentLayout.CONFIG):
            write_marker(where.root, "experiment")
            storage.write_text(where.config, yaml.safe_dump(r.to_dict(), sort_keys=False))
    return out


def run_summary(cfg: PipelineConfig, layout: ExperimentLayout, **fields) -> dict:
    """A multi-seed run's own ``summary.json``: its seeds, where each seed's experiment is, the whole
    config; ``fields``: the times, provenance, ..."""
    return {"name": cfg.name, "experiment_dir": layout.root, "seeds": list(cfg.seeds),
            "replicates": {str(s): ExperimentLayout.replicate_name(s) for s in cfg.seeds}, **fields,
            "config": cfg.to_dict()}


def trial_finished(cfg: PipelineConfig, layout: ExperimentLayout, result) -> bool:
    """Whether a base trial's Tune result is a finished member: Tune's "done", or the member's summary
    in its seed's experiment -- the trial's last write.  Tune can restore a trial it had finished with
    a last result that lacks "done" (its state saved between the two)."""
    if (result.metrics or {}).get("done"):
        return True
    where = layout.replicate(result.config["seed"]) if cfg.seeds else layout
    return storage.Tree(where.root).is_file(ExperimentLayout.MEMBERS, ExperimentLayout.member_name(result.config["member"]))


def replicate_dirs(tree: storage.Tree) -> list[str] | None:
    """The seed directories (names under ``tree``) of a multi-seed run's directory, in seed order; None
    when ``tree`` is not one (no config.yaml with ``seeds``)."""
    from .config import YAML_MAX_BYTES, parse_yaml

    try:  # within the YAML limits (depth, aliases, size): an unreadable config is not a multi-seed run's
        d = parse_yaml(tree.read_bytes(ExperimentLayout.CONFIG, max_bytes=YAML_MAX_BYTES).decode(), ExperimentLayout.CONFIG)
    except (OSError, ValueError):  # ConfigError, UserError, UnicodeDecodeError are ValueErrors
        return None
    seeds = d.get("seeds") if isinstance(d, dict) else None
    if not isinstance(seeds, list) or len(seeds) < 2:
        return None
    return [ExperimentLayout.replicate_name(s) for s in sorted(seeds) if isinstance(s, int)]


def seed_summary(cfg: PipelineConfig, layout: ExperimentLayout, results, stacking: dict[str, dict], *, dataset: str,
                 base_seconds: float, resumed: bool, provenance: dict) -> dict:
    """One seed's ``summary.json`` (a one-seed run's own): the members (each trial's own summary from
    OUT/members/, with Tune's wall time, without the per-epoch history), each group's ensemble, the
    times -- ``wall_seconds`` and ``dbs_search`` filled in at the end of the run -- config, provenance.
    After --resume the times are the resumed part's (flagged by ``resumed``); the seeds of a multi-seed
    run share the base stage's wall time."""
    rows = []
    for r in results:
        m = MemberSummary.from_dict(json.loads(storage.read_bytes(layout.member(r.config["member"]))))
        rows.append(m.replace(trial_path=r.path, wall_seconds=(r.metrics or {}).get("time_total_s")).row())
    return {"name": cfg.name, "experiment_dir": layout.root, "dataset": dataset, "variants": list(cfg.variants),
            "groups": [g["group"] for g in cfg.groups()], "members": sorted(rows, key=lambda m: m["member"]),
            "ensembles": {v: _ensemble_row(r) for v, r in stacking.items()},
            "base_wall_seconds": base_seconds, "wall_seconds": None, "resumed": resumed, "dbs_search": None,
            "config": cfg.to_dict(), "provenance": provenance}


def _ensemble_row(stacking: dict) -> dict:
    chosen = stacking["chosen"]
    m = stacking["methods"][chosen]
    return {"method": chosen, "weights": m["weights"], "val_accuracy": m["val_accuracy"],
            "test_accuracy": m["test_accuracy"], "val_nll": m["val_nll"], "test_nll": m["test_nll"],
            "sparsity": stacking.get("sparsity"), "basis_threshold": stacking.get("basis_threshold")}


def replicate_parent(tree: storage.Tree) -> tuple[storage.Tree, int] | None:
    """(the run's directory, the seed) when ``tree`` is one seed's experiment of a multi-seed run (its
    Tune trials are the run's, in <run>/tune/base); None otherwise."""
    name = tree.base.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("seed-") or not name[len("seed-"):].isdigit():
        return None
    parent = storage.Tree(tree.base.rstrip("/").rsplit("/", 1)[0] or "/", filesystem=tree.fs)
    dirs = replicate_dirs(parent)
    return (parent, int(name[len("seed-"):])) if dirs and name in dirs else None
