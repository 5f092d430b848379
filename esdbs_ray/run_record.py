"""What a training run writes besides its checkpoint: one hook that records the run.

:class:`RunRecorder` is given to :func:`esdbs_ray.train.train` beside the Tune or terminal hooks and
writes, into the run directory (``RunLayout``) and, for a member of an experiment, into the experiment
directory (``ExperimentLayout``, local or a URI):

* TensorBoard: every epoch's metrics (:data:`TB_SCALARS`), the schedule's phase and decisions, early
  stopping notes, per-rung accuracy and sparsity, the Winograd-domain kernel figure and the HParams
  view's settings and final figures -- for a member of an experiment in ``OUT/tensorboard/<group>/
  <member>`` (copied there after every epoch), for ``train-one`` in the run's ``tb/``;
* Parquet predictions (``predictions.py``) of the validation and test splits at the end of every rung;
* the weights at the rungs named in ``keep_weights`` (what ``esdbs export`` packages);
* ``kernels.png`` (paper Fig. 5a: a Winograd layer's 4x4 kernels at each rung) and ``summary.json``.

The kernel snapshots of earlier rungs are its only state; they travel in the checkpoint
(``state_dict``), so a resumed run draws the same figure.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import storage
from .hooks import RungEnd
from .layout import ExperimentLayout, RunLayout
from .records import EpochRecord, MemberSummary, Rung

__all__ = ["RunRecorder", "TB_SCALARS"]

TB_SCALARS = {  # TensorBoard tag -> epoch record field
    "train/loss": "train_loss", "train/accuracy": "train_accuracy", "val/loss": "val_loss",
    "val/accuracy": "val_accuracy", "schedule/lr": "lr", "schedule/momentum": "momentum",
    "schedule/batch_size": "batch_size", "schedule/noise_scale": "noise_scale", "perf/epoch_seconds": "epoch_seconds",
    "perf/samples_per_second": "samples_per_second", "pruning/sparsity": "sparsity",
    "pruning/model_sparsity": "model_sparsity", "pruning/nonzero_weights": "nonzero_weights",
}
_GROWTH_CODES = {None: 0, "widen": 1, "add_layer": 2}  # growth/op scalar: what a check did
_PHASE_CODES = {"warmup": 0, "lr": 1, "momentum": 2, "hold": 3, "fixed": 4, "cosine": 5}  # schedule/phase scalar
_BASIS_TB = ("threshold", "val_accuracy", "test_accuracy", "filter_ratio", "mult_ratio", "conv_learnable_reduction")


class RunRecorder:
    """The run's artifacts.  ``experiment``: the experiment directory whose ``predictions/`` and
    ``weights/`` receive this member's files (None: no predictions, e.g. a DBS-search trial);
    ``member`` / ``variant`` / ``provenance`` label them; ``keep_weights``: target sparsities whose
    final weights are saved (checkpoints keep only the latest epoch)."""

    name = "record"

    def __init__(self, run_dir: str | Path, cfg, data, *, experiment: str | None = None, member: str | None = None,
                 variant: str | None = None, provenance: dict | None = None, keep_weights: tuple[float, ...] = ()):
        self.run = RunLayout(Path(run_dir))
        self.cfg, self.data = cfg, data
        self.experiment = experiment
        self.member = member or cfg.model
        self.variant = variant
        self.provenance = provenance or {}
        self.keep_weights = {Rung(s) for s in keep_weights}
        self.kernels: dict[float, Any] = {}
        self.writer = None
        self._mirror: tuple[Path, str] | None = None  # (local events, the experiment's copy)
        self.summary: MemberSummary | None = None

    @property
    def wants_probs(self) -> bool:
        return self.experiment is not None

    def state_dict(self) -> dict:
        return {"kernels": self.kernels}

    def load_state_dict(self, state: dict) -> None:
        self.kernels = dict((state or {}).get("kernels") or {})

    def on_start(self, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run.root.mkdir(parents=True, exist_ok=True)
        if self.experiment is not None and self.experiment != str(self.run.root):
            # A member of an experiment: the events are written here and copied after every epoch to
            # the experiment's tensorboard/<group>/<member>/ (any storage pyarrow writes), so that
            # `tensorboard --logdir OUT/tensorboard` names the runs by group and member; kept out of
            # the trial directory, which Tune would copy to storage a second time.
            local = Path(tempfile.mkdtemp(prefix="esdbs-tb-"))
            self._mirror = (local, ExperimentLayout(self.experiment).tensorboard_run(self.variant, self.member))
        else:
            local = self.run.tensorboard
        self.writer = SummaryWriter(str(local), purge_step=start_epoch)

    def on_epoch(self, r: EpochRecord, checkpoint: Path) -> None:
        for tag, key in TB_SCALARS.items():
            self.writer.add_scalar(tag, getattr(r, key), r.epoch)
        self.writer.add_scalar("schedule/phase", _PHASE_CODES.get(r.phase, -1), r.epoch)
        if r.decision:
            self.writer.add_text("schedule/decision", r.decision, r.epoch)
        if r.early_stopping:
            self.writer.add_text("early_stopping", r.early_stopping, r.epoch)
        if r.params is not None:  # a growing member's check: size, the best candidate's ratio, what it did
            self.writer.add_scalar("growth/params", r.params, r.epoch)
            if r.expansion_ratio is not None:
                self.writer.add_scalar("growth/best_ratio", r.expansion_ratio, r.epoch)
            self.writer.add_scalar("growth/op", _GROWTH_CODES.get(r.expansion, 0), r.epoch)
        self.writer.flush()
        self._copy_events()

    def _copy_events(self) -> None:
        if self._mirror is None:
            return
        local, remote = self._mirror
        for f in local.glob("events.out.tfevents.*"):
            storage.write_bytes(storage.join(remote, f.name), f.read_bytes())

    def on_rung(self, end: RungEnd) -> None:
        r, rung = end.result, end.result.rung
        if rung.is_level:  # a growing member's level: its own scalars, predictions and weights (export)
            for tag, v in (("val_accuracy", r.val_accuracy), ("test_accuracy", r.test_accuracy), ("params", r.params)):
                self.writer.add_scalar(f"level/{tag}", v, rung.level)
            if self.experiment is not None:
                self._write_predictions(end)
                self._save_weights(end)
            return
        if not rung.is_basis:
            step = int(round(rung.target_sparsity * 100))
            for tag, v in (("val_accuracy", r.val_accuracy), ("test_accuracy", r.test_accuracy),
                           ("sparsity", r.sparsity), ("model_sparsity", r.model_sparsity)):
                self.writer.add_scalar(f"rung/{tag}", v, step)
        else:  # basis rungs all have target sparsity 0: step = the rung's number (1, 2, ...), t a scalar of its own
            values = (rung.basis_threshold, r.val_accuracy, r.test_accuracy, r.basis["filter_ratio"],
                      r.basis["mult_ratio"], r.basis["conv_learnable_reduction"])
            for tag, v in zip(_BASIS_TB, values):
                self.writer.add_scalar(f"basis_rung/{tag}", v, end.index + 1)
        if self.experiment is not None:
            self._write_predictions(end)
            if rung in self.keep_weights and not rung.is_basis:
                self._save_weights(end)
        if self.cfg.conv == "winograd_relu":
            self._snapshot_kernels(end.model, rung)

    def on_end(self, summary: MemberSummary) -> None:
        self.summary = summary.replace(member=self.member, variant=self.variant, provenance=self.provenance)
        if self.kernels and summary.history:
            from .analysis.figures import plot_winograd_kernels

            image = plot_winograd_kernels(self.kernels, self.run.kernels)
            self.writer.add_image("winograd_kernels", image, summary.history[-1].epoch, dataformats="HWC")
        self._hparams(summary)
        self.close()
        storage.write_json(self.run.summary, self.summary.to_dict())

    def _hparams(self, summary: MemberSummary) -> None:
        """TensorBoard's HParams view: the member's settings beside its final figures, in its own run."""
        from torch.utils.tensorboard.summary import hparams

        cfg = self.cfg
        settings = {"member": self.member, "group": self.variant or "", "model": cfg.model, "width": cfg.width,
                    "conv": cfg.conv, "schedule": cfg.schedule, "b0": cfg.dbs.b0, "lr0": cfg.dbs.lr0,
                    "epochs": cfg.epochs, "ladder": ",".join(f"{s:g}" for s in cfg.sparsity_ladder) or "none",
                    "seed": cfg.seed}
        metrics = {f"hparam/{k}": v for k, v in (("val_accuracy", summary.val_accuracy),
                                                 ("test_accuracy", summary.test_accuracy),
                                                 ("sparsity", summary.sparsity)) if v is not None}
        for s in hparams(settings, metrics):
            self.writer._get_file_writer().add_summary(s)
        last = summary.history[-1].epoch if summary.history else 0
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, last)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._copy_events()
            if self._mirror is not None:
                shutil.rmtree(self._mirror[0], ignore_errors=True)
            self.writer = None

    # -- the rung's files -------------------------------------------------------------------------
    def _write_predictions(self, end: RungEnd) -> None:
        from .predictions import prediction_path, write_predictions

        r, rung, data = end.result, end.result.rung, self.data
        parts = [
            {"split": "val", "probs": end.val_probs, "labels": data.val.labels, "indices": data.val.indices},
            {"split": "test", "probs": end.test_probs, "labels": data.test.labels, "indices": data.test.indices},
        ]
        counts = {"sparsity": r.sparsity, "pruned_layer_weights": r.pruned_layer_weights,
                  "model_sparsity": r.model_sparsity, "nonzero_weights": r.nonzero_weights,
                  "total_weights": r.total_weights}
        write_predictions(
            prediction_path(self.experiment, self.member, rung.target_sparsity, basis_threshold=rung.basis_threshold,
                            level=rung.level),
            parts=parts, model=self.cfg.model, member=self.member, variant=self.variant or "", sparsity=r.sparsity,
            target_sparsity=rung.target_sparsity, basis_threshold=rung.basis_threshold, level=rung.level,
            params=r.params, epoch=r.epoch,
            metadata={"config": self.cfg.to_dict(), "seed": self.cfg.seed, "sparsity_accounting": counts,
                      "class_names": list(data.class_names), **({"basis": r.basis} if r.basis else {}),
                      **self.provenance},
        )

    def _save_weights(self, end: RungEnd) -> None:
        """The model (pruning masks included) at the end of a rung, with what a consumer of the weights
        needs to feed it: the input normalisation and the class names."""
        data, rung = self.data, end.result.rung
        storage.save_torch(ExperimentLayout(self.experiment).rung_weights(self.member, rung.target_sparsity, rung.level), {
            "model": {k: v.detach().cpu() for k, v in end.model.state_dict().items()}, "config": self.cfg.to_dict(),
            "epoch": end.result.epoch, "target_sparsity": rung.target_sparsity, "level": rung.level,
            "growth_ops": list(end.growth_ops),  # what rebuilds a grown architecture (expansion.apply_op)
            "input": {"mean": list(data.mean), "std": list(data.std), "class_names": list(data.class_names),
                      "in_channels": data.in_channels, "image_size": data.image_size, "dataset": data.describe()},
        })

    def _snapshot_kernels(self, model, rung: Rung) -> None:
        from .winograd import winograd_layers

        layers = winograd_layers(model)
        if layers:
            _, layer = layers[min(self.cfg.kernel_layer, len(layers) - 1)]
            self.kernels[float(rung.target_sparsity)] = layer.kernels_4x4()[:6, :6].detach().float().cpu().clone()
