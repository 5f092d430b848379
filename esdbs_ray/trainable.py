"""The thin Ray Tune adapter around :func:`esdbs_ray.train.train`.

A function trainable: it restores from ``tune.get_checkpoint()``, trains, and turns the trainer's hooks
into ``tune.report(metrics, checkpoint=...)`` once per epoch.  Everything about *how* to train lives in
``train.py``; this file only knows Tune.  Trials arrive as a member name (Tune's whole config, so its
tables and result files stay readable); the typed :class:`~esdbs_ray.config.TrialSpec` comes through
``tune.with_parameters``.

Artifacts: the trainer writes TensorBoard events into the trial's working directory, which Tune
uploads to the trial directory under ``storage_path`` (``SyncConfig(sync_artifacts=True)``); Parquet
predictions and the trainer's own summary go straight to the experiment directory through
``pyarrow.fs``, and so do the weights at the rung the member's stack uses (for ``esdbs export``);
checkpoints travel through Tune's checkpoint mechanism.  So a multi-node run needs
only a shared ``storage_path``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ray import tune

from . import storage
from .checkpoint import CHECKPOINT
from .config import TrainConfig, TrialSpec, validate
from .hooks import RungEnd
from .layout import ExperimentLayout
from .ray_env import trial_device
from .records import EpochRecord, MemberSummary
from .run_record import RunRecorder
from .train import train


class TuneHooks:
    """Forwards each epoch to Tune with its checkpoint; rung results ride along in the next report."""

    def __init__(self, member: str, seed: int | None = None):
        self.member = member
        self.seed = seed  # a multi-seed run's trials report their seed too
        self._rung: dict | None = None

    def on_rung(self, end: RungEnd) -> None:
        self._rung = end.result.to_dict()

    def on_epoch(self, record: EpochRecord, checkpoint: Path) -> None:
        metrics = {k: v for k, v in record.to_dict().items() if isinstance(v, (int, float, str, bool))}
        metrics["member"] = self.member
        if self.seed is not None:
            metrics["seed"] = self.seed
        if self._rung is not None:
            metrics.update({f"rung_{k}": v for k, v in self._rung.items() if isinstance(v, (int, float))})
            self._rung = None
        # Tune copies the reported directory into storage; a fresh directory per report keeps the
        # trainer's own checkpoint file out of Tune's hands.
        with tempfile.TemporaryDirectory(prefix="esdbs-ckpt-") as tmp:
            shutil.copy2(checkpoint, Path(tmp) / CHECKPOINT)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _run(cfg: TrainConfig, member: str, *, data, experiment_dir: str | None, group: str | None,
         provenance: dict, keep_weights: tuple[float, ...] = (), seed: int | None = None) -> MemberSummary:
    resources = tune.get_context().get_trial_resources().required_resources
    if not cfg.threads:
        import torch

        torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    # The device is what Ray assigned, not what is visible: a zero-GPU trial on a GPU node trains on
    # its CPUs (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for it).
    device = trial_device(cfg.device, resources.get("GPU", 0.0))
    workdir = Path(os.getcwd())  # Tune's trial working directory (synced to storage as artifacts)
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_from = workdir / "resume-checkpoint.pt"
            shutil.copy2(Path(d) / CHECKPOINT, resume_from)
    recorder = RunRecorder(workdir, cfg, data, experiment=experiment_dir, member=member, variant=group,
                           provenance=provenance, keep_weights=keep_weights)
    train(cfg, data, workdir, hooks=[recorder, TuneHooks(member, seed)], resume_from=resume_from, device=device)
    return recorder.summary


def train_member(config: dict, *, specs: dict, data, experiment_dir: str, provenance: dict) -> None:
    """Tune entry point of the base stage: ``config = {"member": name}`` with ``specs`` member -> TrialSpec;
    in a multi-seed run ``{"member": name, "seed": s}`` with ``specs`` and ``data`` by seed, the trial
    writing into its seed's experiment (OUT/seed-<s>/)."""
    seed = config.get("seed")
    if seed is not None:
        specs, data = specs[seed], data[seed]
        experiment_dir = ExperimentLayout(experiment_dir).replicate(seed).root
    spec: TrialSpec = specs[config["member"]]
    summary = _run(spec.train, spec.member, data=data, experiment_dir=experiment_dir, group=spec.group,
                   provenance=provenance, keep_weights=_kept_rungs(spec), seed=seed)
    # The trainer's own summary (per-epoch history, rungs, schedule decisions) goes straight to the
    # shared experiment directory, like the predictions: the driver reads it back, not Tune's
    # flattened metrics.
    summary = summary.replace(variant=spec.variant, group=spec.group, batch_size=spec.batch_size,
                              config=spec.train.to_dict())
    storage.write_json(ExperimentLayout(experiment_dir).member(spec.member), summary.to_dict())


def _kept_rungs(spec: TrialSpec) -> tuple[float, ...]:
    """The rungs whose weights the trial keeps: the stacked one, or with keep_weights "all" every rung."""
    if spec.export_sparsity is None:
        return ()
    if spec.keep_all_weights:
        return (0.0, *spec.train.sparsity_ladder) if spec.train.epochs else tuple(spec.train.sparsity_ladder)
    return (spec.export_sparsity,)


def train_dbs_trial(config: dict, *, data, base: dict, provenance: dict) -> None:
    """Tune entry point of the DBS-constant search: ``config`` holds the sampled DBS constants."""
    cfg = validate(TrainConfig, {**base, "dbs": {**(base.get("dbs") or {}), **config}}, "dbs_search sample")
    _run(cfg, "dbs-search", data=data, experiment_dir=None, group="SWR-CNN+DBS", provenance=provenance)
