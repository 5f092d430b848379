"""The thin Ray Tune adapter around :func:`esdbs_ray.train.train`.

A function trainable: it restores from ``tune.get_checkpoint()``, trains, and turns the trainer's hooks
into ``tune.report(metrics, checkpoint=...)`` once per epoch (and marks rung ends in the metrics).
Everything about *how* to train lives in ``train.py``; this file only knows Tune.

Artifacts: the trainer writes TensorBoard events and ``summary.json`` into the trial's working
directory, which Tune uploads to the trial directory under ``storage_path`` (``SyncConfig(
sync_artifacts=True)``); Parquet predictions go straight to ``<experiment>/predictions/`` through
``pyarrow.fs``; checkpoints travel through Tune's checkpoint mechanism.  So a multi-node run needs
only a shared ``storage_path``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ray import tune

from . import storage
from .train import CHECKPOINT, TrainConfig, train


class TuneHooks:
    """Forwards each epoch to Tune with its checkpoint; rung results ride along in the next report."""

    def __init__(self, member: str):
        self.member = member
        self._rung: dict | None = None

    def on_rung(self, rung: dict) -> None:
        self._rung = rung

    def on_epoch(self, record: dict, checkpoint_path: Path) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
        metrics["member"] = self.member
        if self._rung is not None:
            metrics.update({f"rung_{k}": v for k, v in self._rung.items() if isinstance(v, (int, float))})
            self._rung = None
        # Tune copies the reported directory into storage; a fresh directory per report keeps the
        # trainer's own checkpoint file out of Tune's hands.
        with tempfile.TemporaryDirectory(prefix="esdbs-ckpt-") as tmp:
            shutil.copy2(checkpoint_path, Path(tmp) / CHECKPOINT)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_member(config: dict, *, data, experiment_dir: str | None, provenance: dict) -> None:
    """Tune entry point: ``config["trial"] = {"member": id, "train": TrainConfig dict, "variant": name}``."""
    config = config.get("trial", config)
    cfg = TrainConfig.from_dict(config["train"])
    member = config["member"]
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    if not cfg.threads:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
    workdir = Path(os.getcwd())  # Tune's trial working directory (synced to storage as artifacts)
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_from = workdir / "resume-checkpoint.pt"
            shutil.copy2(Path(d) / CHECKPOINT, resume_from)
    summary = train(
        cfg, data, workdir, hooks=TuneHooks(member), resume_from=resume_from,
        predictions_root=experiment_dir, member=member, variant=config.get("group", config.get("variant")), provenance=provenance,
    )
    if experiment_dir is not None:
        # The trainer's own summary (per-epoch history, rungs, schedule decisions) goes straight to the
        # shared experiment directory, like the predictions: the driver reads it back, not Tune's
        # flattened metrics.
        summary.update(variant=config["variant"], group=config.get("group", config["variant"]),
                       batch_size=config.get("batch_size"))
        storage.write_json(storage.join(experiment_dir, "members", f"{member}.json"), summary)


def train_dbs_trial(config: dict, *, data, base: dict, provenance: dict) -> None:
    """Tune entry point of the DBS-constant search: ``config`` holds the sampled DBS constants."""
    train_cfg = dict(base)
    dbs = dict(train_cfg.get("dbs") or {})
    dbs.update(config)
    train_cfg["dbs"] = dbs
    train_member({"member": "dbs-search", "variant": "SWR-CNN+DBS", "train": train_cfg},
                 data=data, experiment_dir=None, provenance=provenance)
