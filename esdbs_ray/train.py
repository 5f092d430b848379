"""Train one CNN: dense epochs under a (fixed or dynamic) batch-size schedule, then a compression ladder.

Pure PyTorch -- this module never imports Ray, and writes nothing but its checkpoint.  One run is a
sequence of epochs:

    epochs 0 .. E-1                       dense training                (rung "0 %")
    then for each sparsity s in the ladder: prune to s, retrain R epochs  (rung "s")
    or, for each threshold t of a basis ladder: BasisConv at t, fine-tune R epochs  (rung "t")

and each rung ends with a test evaluation and a :class:`~esdbs_ray.records.RungResult`.  What a rung
does to the model is a :class:`~esdbs_ray.compression.Compression` (pruning or BasisConv); the loop
only calls its hooks.  The schedule (``dbs.py``, ``cosine.py``) decides learning rate, momentum and
batch size; the loop keeps a snapshot before every increase and restores it when the schedule's
divergence guard fires.  Early stopping (on validation loss) may end the dense phase early with its
best epoch's weights.  Training batches may be augmented (``augment.py``), evaluation batches never.

Everything a run writes besides the checkpoint -- TensorBoard, Parquet predictions, rung weights, the
kernel figure, the summary -- is a hook's job (``run_record.RunRecorder``); progress goes to Tune's
reporter or the terminal (``hooks.py``).  Every epoch writes an atomic checkpoint (``checkpoint.py``);
resuming from it continues exactly as an uninterrupted run with the same seed on CPU (tested).

Evidence: ``tests/test_train.py`` trains AlexNet at half width for one epoch of 3,000 Fashion-MNIST
images against a bar set from the spread over seeds 0-4 at 1 and 2 threads on Intel Xeon and AMD EPYC
CPUs (validation accuracy 0.70-0.79); ``bench/throughput.py`` times the loop against a bare one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .augment import build_augmenter
from .checkpoint import TrainState, load_checkpoint, restoring, save_checkpoint
from .compression import build_compression, rung_counts
from .config import TrainConfig
from .cosine import CosineSchedule
from .data import BatchIterator, DatasetBundle
from .dbs import build_schedule
from .evaluation import ECE_BINS
from .hooks import HookList, PrintHooks, RungEnd
from .layout import RunLayout
from .networks import build_network, pick_device
from .pruning import sparsity_accounting
from .records import EpochRecord, MemberSummary, Rung, RungResult
from .run_record import RunRecorder

__all__ = ["TrainConfig", "train", "Interrupted", "Scores", "evaluate", "build_model", "build_optimizer"]


@dataclass(frozen=True)
class Interrupted:
    """What :func:`train` returns when ``stop_after_epoch`` cut it short (tests of resumption)."""

    after_epoch: int


def train(cfg: TrainConfig, data: DatasetBundle, run_dir: str | Path, *, hooks=None,
          resume_from: str | Path | None = None, device: str | None = None,
          stop_after_epoch: int | None = None) -> MemberSummary | Interrupted:
    """Train per ``cfg``; the checkpoint goes to ``run_dir``.  ``hooks``: one hook or a list (default:
    progress on the terminal and a :class:`RunRecorder` of ``run_dir``).  ``resume_from``: a checkpoint
    file or a directory holding one.  ``device`` overrides ``cfg.device`` (the device Ray assigned:
    not part of the run's identity).  Returns the member's summary."""
    if hooks is None:
        hooks = [PrintHooks(), RunRecorder(run_dir, cfg, data)]
    hooks = HookList.of(hooks)
    t = _Trainer(cfg, data, Path(run_dir), device, resume_from)
    state, rung_ends = t.state, cfg.rung_ends()
    hooks.on_start(state.epoch, state.hooks)
    for epoch in range(state.epoch, cfg.total_epochs):
        if epoch < state.epoch:  # early stopping ended the dense phase: on to the first rung, or done
            continue
        # --- compress at the first epoch of each ladder rung (prune, or BasisConv at the rung's t)
        rung_index = cfg.rung_of(epoch)
        if rung_index >= 0 and epoch == cfg.rung_starts()[rung_index]:
            t.start_rung(rung_index)
        lr_scale = t.compression.begin_epoch(t.model, epoch)  # which parameters train (basis: step one / two)

        # --- schedule: lr, momentum, batch size for this epoch; snapshot before an increase
        plan = t.schedule.plan()
        t.set_hyperparameters(plan.lr * lr_scale, plan.momentum)
        t.train_batches.batch_size = plan.batch_size
        if plan.increase or state.snapshot is None:
            state.snapshot = copy.deepcopy({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()})

        # --- train one epoch (a per-step schedule gives each step its learning rate)
        stats = t.train_epoch(epoch, lr_scale)

        # --- validate; the schedule's guard may restore the pre-increase snapshot.  At a rung's end the
        # probabilities are kept for its predictions, so the rung does not evaluate the same weights again.
        keep = hooks.wants_probs and (epoch in rung_ends or (cfg.early_stopping.patience > 0 and epoch < cfg.epochs)
                                      or t.growth_due(epoch))
        val = t.evaluate(t.val_batches, keep)
        restored = t.schedule.step(val.accuracy, math.isfinite(stats.loss) and math.isfinite(val.loss))
        if restored:  # the latest pre-increase snapshot stays valid: after a restore nothing increases
            t.model.load_state_dict(state.snapshot["model"])
            t.optimizer.load_state_dict(state.snapshot["optimizer"])
            val = t.evaluate(t.val_batches, keep)
        val_now = val  # of the weights the model holds now

        # --- early stopping (dense phase): may restore the best epoch's weights and end the phase here
        early = _early_stopping(cfg, state, t.model, epoch, val.loss) if cfg.early_stopping.patience else None
        best = None
        if early is not None and early.restored:
            best = val_now = t.evaluate(t.val_batches, keep)

        # --- record; a growing member's check (an expansion first closes the level it ends)
        record = t.record(epoch, plan, stats, val, lr_scale, restored, early, best)
        if t.growth_due(epoch):
            record = t.check_growth(record, val_now, keep, hooks)
        state.history.append(record)
        stopped = early is not None and early.stop
        next_epoch = cfg.epochs if stopped else epoch + 1  # a stop jumps to the first rung (or the end)
        if stopped:
            t.schedule.skip_to(next_epoch)

        # --- end of a rung: test evaluation, the rung's record, its predictions and weights (hooks)
        if epoch in rung_ends or stopped:
            end = t.finish_rung(epoch, rung_index, val_now, keep, last=next_epoch == cfg.total_epochs)
            hooks.on_rung(end)
            if rung_index < 0 and t.growth is not None:  # the grown network is the last level
                hooks.on_rung(t.last_level(end))

        # --- checkpoint (atomic), then tell the hooks
        state.epoch = next_epoch
        state.compression = t.compression.state_dict()
        state.expansion = t.growth.state_dict() if t.growth is not None else None
        state.hooks = hooks.state_dict()
        t.save()
        hooks.on_epoch(record, t.run.checkpoint)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            hooks.close()
            return Interrupted(epoch)

    # --- the summary: the final rung's figures, every rung and epoch, what ran it
    summary = t.summary()
    hooks.on_end(summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, data: DatasetBundle, growth=None) -> tuple[nn.Module, Any]:
    """The member's network (:func:`~esdbs_ray.networks.build_network`; a growing member's grown as
    ``growth``, a resumed controller, says) and its compression strategy (pruning masks are registered
    now, before any checkpoint is loaded)."""
    model = build_network(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                          image_size=data.image_size, dropout=cfg.dropout, width=cfg.width, conv=cfg.conv,
                          basis=cfg.basis, seed=cfg.seed, winograd_impl=cfg.winograd_impl)
    if growth is not None:
        growth.rebuild(model)
    return model, build_compression(cfg, model)


def _is_conv_weight(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return True
    from .winograd import WinogradReLUConv2d

    return isinstance(module, WinogradReLUConv2d)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or Adam with the paper's L2 on conv weights only (loss += l2 * sum(w^2): weight decay 2 l2);
    AdamW with decoupled decay on every weight of ndim >= 2 (batch norm and biases exempt: decaying a
    BN scale towards 0 only fights the normalisation).  Adam's beta1 is m0."""
    if cfg.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.dbs.lr0, betas=(cfg.dbs.m0, 0.999))
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and _is_conv_weight(module) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 2.0 * cfg.l2}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.dbs.lr0, betas=(cfg.dbs.m0, 0.999))
    return torch.optim.SGD(groups, lr=cfg.dbs.lr0, momentum=cfg.dbs.m0)


class Scores(NamedTuple):
    loss: float
    accuracy: float
    probs: Any = None  # numpy [N, C] softmax outputs, when asked for
    ece: float | None = None  # expected calibration error (evaluation.py's bins)


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchIterator, *, keep_probs: bool = False, amp: bool = False) -> Scores:
    model.eval()
    dev = batches.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    conf_sum, hit_sum = (torch.zeros(ECE_BINS, device=dev, dtype=torch.float64) for _ in range(2))
    probs = []
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        hit = logits.argmax(1) == y
        correct += hit.sum()
        p = logits.softmax(1)
        conf = p.max(1).values.double()
        which = (conf * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        conf_sum += torch.bincount(which, weights=conf, minlength=ECE_BINS)
        hit_sum += torch.bincount(which, weights=hit.double(), minlength=ECE_BINS)
        if keep_probs:
            probs.append(p.cpu())
    n = len(batches)
    ece = float((hit_sum - conf_sum).abs().sum().item() / max(n, 1))
    return Scores(loss_sum.item() / n, correct.item() / n, torch.cat(probs).numpy() if keep_probs else None, ece)


def probe_max_batch(model: nn.Module, sample: torch.Tensor, cap: int, step: int = 32) -> int:
    """Largest multiple of ``step`` <= cap whose forward+backward fits in accelerator memory (by trying).

    Only meaningful on CUDA (spec section 4, Bmax); the model's weights are restored afterwards."""
    state = copy.deepcopy(model.state_dict())
    lo, hi = 0, cap // step  # in units of step; lo fits (0 trivially), find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            x = sample[:1].expand(mid * step, *sample.shape[1:]).contiguous()
            loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long, device=x.device))
            loss.backward()
            lo = mid
        except torch.OutOfMemoryError:
            hi = mid - 1
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    model.load_state_dict(state)
    return max(step, lo * step)


class _EpochStats(NamedTuple):
    loss: float
    accuracy: float
    seen: int
    steps: int
    seconds: float


class _Early(NamedTuple):
    stop: bool
    restored: bool
    best_epoch: int | None
    note: str


class _Trainer:
    """One run's model, optimizer, schedule, batches and state, with the steps the loop takes."""

    def __init__(self, cfg: TrainConfig, data: DatasetBundle, run_dir: Path, device: str | None,
                 resume_from: str | Path | None):
        self.cfg, self.data, self.run = cfg, data, RunLayout(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # --- determinism, device, model, optimizer, schedule, batches
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(device or cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        if cfg.conv == "winograd_relu":
            from .winograd import check_impl_runs, tune_cpu_allocator

            # a layer implementation this device cannot run fails here, naming the key, not in a step
            check_impl_runs(cfg.winograd_impl, self.device, self.compute_dtype, "train.winograd_impl")
            if self.device.type == "cpu":
                tune_cpu_allocator()  # reuse the transforms' large buffers instead of page-faulting each step
        ckpt = load_checkpoint(resume_from, cfg.to_dict()) if resume_from is not None else None
        self.growth = None  # a self-expanding member's controller (expansion.py)
        if cfg.expansion.enabled:
            from .expansion import GrowthController

            self.growth = GrowthController.from_config(cfg, data, self.device)
            if ckpt is not None and ckpt["state"].get("expansion"):
                with restoring(resume_from, "state.expansion"):
                    self.growth.load_state_dict(ckpt["state"]["expansion"])  # the architecture it grew
        self.model, self.compression = build_model(cfg, data, self.growth)
        if ckpt is not None:  # basis layers of the checkpoint's shapes, before the optimizer sees the parameters
            with restoring(resume_from, "model"):
                self.compression.restore_structure(self.model, ckpt["model"])
        self.model.to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        batches = dict(mean=data.mean, std=data.std, device=self.device)
        self.train_batches = BatchIterator(data.train, batch_size=cfg.dbs.b0, shuffle=True, seed=cfg.seed,
                                           augment=build_augmenter(cfg.augment, image_size=data.image_size,
                                                                   seed=cfg.seed), **batches)
        self.val_batches = BatchIterator(data.val, batch_size=cfg.eval_batch_size, **batches)
        self.test_batches = BatchIterator(data.test, batch_size=cfg.eval_batch_size, **batches)
        bmax_memory = None
        if self.device.type == "cuda" and cfg.schedule == "dbs":
            bmax_memory = probe_max_batch(self.model, next(iter(self.val_batches))[0], cfg.dbs.bmax_cap, cfg.dbs.step)
        sizes = dict(epochs=cfg.total_epochs, train_size=len(data.train), val_size=len(data.val),
                     rung_starts=cfg.rung_starts(), batch_size=cfg.dbs.b0)
        if cfg.schedule_kind == "cosine":
            self.schedule = CosineSchedule(cfg.dbs, cfg.cosine, **sizes)
        else:
            self.schedule = build_schedule(cfg.schedule_kind, cfg.dbs, bmax_memory=bmax_memory, **sizes)
        self.state = TrainState()
        # --- resume: everything that decides the future comes back from the checkpoint
        if ckpt is not None:
            for key, restore in (("model", self.model.load_state_dict), ("optimizer", self.optimizer.load_state_dict),
                                 ("schedule", self.schedule.load_state_dict),
                                 ("train_batches", self.train_batches.load_state_dict), ("rng", torch.set_rng_state)):
                with restoring(resume_from, key):
                    restore(ckpt[key])
            with restoring(resume_from, "state"):
                self.state = TrainState.from_dict(ckpt["state"])
                self.compression.load_state_dict(self.state.compression)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.amp else torch.float32

    def set_hyperparameters(self, lr: float, momentum: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if "momentum" in g:
                g["momentum"] = momentum
            else:
                g["betas"] = (momentum, g["betas"][1])

    def evaluate(self, batches: BatchIterator, keep_probs: bool = False) -> Scores:
        return evaluate(self.model, batches, keep_probs=keep_probs, amp=self.amp)

    def start_rung(self, rung_index: int) -> None:
        if self.compression.start_rung(self.model, rung_index, self.optimizer):
            # New parameter objects: a new optimizer (a compressed model is fine-tuned afresh, as the
            # paper does), and the guard's snapshot must be of the new structure.
            self.optimizer = build_optimizer(self.cfg, self.model)
            self.state.snapshot = None
        if self.compression.evaluate_at_start:  # the rung's operating point before fine-tuning
            self.state.rung_start = self.compression.start_metrics(self.model, rung_index, lambda m: {
                f"{k}_accuracy": evaluate(m, b, amp=self.amp).accuracy
                for k, b in (("val", self.val_batches), ("test", self.test_batches))})

    def train_epoch(self, epoch: int, lr_scale: float) -> _EpochStats:
        model, optimizer, device = self.model, self.optimizer, self.device
        step_lrs = self.schedule.step_lrs()
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = steps = 0
        for x, y in self.train_batches:
            if step_lrs is not None:
                for g in optimizer.param_groups:
                    g["lr"] = step_lrs[steps] * lr_scale
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.compression.after_step(optimizer)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if step_lrs is not None and steps != len(step_lrs):  # the schedule's step count is the iterator's rule
            raise RuntimeError(f"epoch {epoch} ran {steps} steps, the schedule planned {len(step_lrs)}")
        self.state.steps += steps
        self.state.train_seconds += seconds
        return _EpochStats(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen, steps, seconds)

    def record(self, epoch: int, plan, stats: _EpochStats, val: Scores, lr_scale: float, restored: bool,
               early: _Early | None, best: Scores | None) -> EpochRecord:
        counts = sparsity_accounting(self.model)
        fields = self.compression.epoch_fields(epoch)
        return EpochRecord(
            epoch=epoch, total_epochs=self.cfg.total_epochs, phase=plan.phase, lr=plan.lr, momentum=plan.momentum,
            batch_size=plan.batch_size, noise_scale=plan.noise_scale(len(self.data.train)), train_loss=stats.loss,
            train_accuracy=stats.accuracy, val_loss=val.loss, val_accuracy=val.accuracy, epoch_seconds=stats.seconds,
            samples_per_second=stats.seen / max(stats.seconds, 1e-9), steps=stats.steps,
            total_steps=self.state.steps, train_seconds=self.state.train_seconds, sparsity=counts["sparsity"],
            model_sparsity=counts["model_sparsity"], nonzero_weights=counts["nonzero_weights"],
            target_sparsity=fields["target_sparsity"], basis_threshold=fields.get("basis_threshold"),
            fine_tuning_stage=fields.get("fine_tuning_stage"), restored=bool(restored), decision=plan.decision,
            # "lr" is the schedule's; the optimizer ran at lr * lr_scale
            lr_scale=lr_scale if lr_scale != 1.0 else None,
            early_stopping=early.note if early is not None else None,
            best_epoch=early.best_epoch if best is not None else None,
            best_val_loss=best.loss if best is not None else None,
            best_val_accuracy=best.accuracy if best is not None else None,
            extra={k: v for k, v in fields.items() if k not in ("target_sparsity", "basis_threshold",
                                                                 "fine_tuning_stage")},
        )

    def finish_rung(self, epoch: int, rung_index: int, val: Scores, keep_probs: bool, last: bool) -> RungEnd:
        """``val``: the evaluation of the model's current weights on the validation split."""
        test = self.evaluate(self.test_batches, keep_probs)
        history = self.state.history
        # the dense rung comes first, so all epochs so far are its own (fewer than cfg.epochs after a stop)
        epochs = history[-(len(history) if rung_index < 0 else self.cfg.retrain_epochs):]
        if rung_index < 0 and len(epochs) > 1 and epochs[0].epoch == 0:
            epochs = epochs[1:]  # the run's first epoch (start-up, lazy initialisation) is left out
        start = self.state.rung_start or {}
        self.state.rung_start = None
        result = self._result(epoch, Rung.of(self.compression.rung_key(rung_index)), val, test,
                              layer_sparsity=self.compression.layer_sparsity() if rung_index >= 0 else {},
                              mean_epoch_seconds=sum(h.epoch_seconds for h in epochs) / len(epochs),
                              before_finetune=start.get("before_finetune"),
                              direct_conversion=start.get("direct_conversion"))
        self.state.rungs.append(result)
        return RungEnd(result, rung_index, self.model, val.probs, test.probs, last,
                       growth_ops=tuple(self.growth.ops) if self.growth is not None else ())

    def _result(self, epoch: int, rung: Rung, val: Scores, test: Scores, **extra) -> RungResult:
        """The record of the model as it is: sparsity, validation and test figures, training so far, and
        the multiplications and weights beside the dense spatial network (compression.py)."""
        return RungResult(
            **rung.as_dict(), **sparsity_accounting(self.model), epoch=epoch, val_accuracy=val.accuracy,
            val_loss=val.loss, test_accuracy=test.accuracy, test_loss=test.loss, val_ece=val.ece, test_ece=test.ece,
            train_seconds=self.state.train_seconds, steps=self.state.steps,
            **rung_counts(self.model, (self.data.in_channels, self.data.image_size, self.data.image_size)), **extra)

    # -- growing members ----------------------------------------------------------------------------
    def growth_due(self, epoch: int) -> bool:
        return self.growth is not None and self.growth.due(epoch)

    def check_growth(self, record: EpochRecord, val: Scores, keep_probs: bool, hooks) -> EpochRecord:
        """The controller's check at the end of the record's epoch.  Before an expansion the network as
        it is closes a level (evaluated on test, its predictions and weights written by the hooks); then
        it grows, the optimizer keeping its state for the old parameters, and whatever holds the old
        shapes (the divergence guard's snapshot, early stopping's best weights) starts afresh."""
        from .expansion import carry_optimizer_state, count_params

        d = self.growth.decide(self.model, record.epoch)
        if d.expanded:
            hooks.on_rung(self._level_end(record.epoch, val, keep_probs, d.decision))
            change = self.growth.commit(self.model, d)
            self.model.to(self.device)
            self.optimizer = carry_optimizer_state(self.optimizer, build_optimizer(self.cfg, self.model), change)
            self.compression = build_compression(self.cfg, self.model)  # masks for the new layers too
            self.state.snapshot = self.state.early = None
        return dataclasses.replace(record, params=count_params(self.model), expansion_ratio=d.ratio,
                                   expansion=d.op, decision="; ".join(x for x in (record.decision, d.decision) if x))

    def _level_end(self, epoch: int, val: Scores, keep_probs: bool, why: str) -> RungEnd:
        from .expansion import count_params

        test = self.evaluate(self.test_batches, keep_probs)
        level = Rung(0.0, level=len(self.growth.ops))
        result = self._result(epoch, level, val, test, params=count_params(self.model), expansion=why)
        self.state.levels.append(result)
        return RungEnd(result, -1, self.model, val.probs, test.probs, growth_ops=tuple(self.growth.ops))

    def last_level(self, end: RungEnd) -> RungEnd:
        """The dense phase's end closes the last level: the grown network, the dense rung's evaluation."""
        from .expansion import count_params

        r = dataclasses.replace(end.result, level=len(self.growth.ops), params=count_params(self.model),
                                expansion="the grown network (end of the dense phase)")
        self.state.levels.append(r)
        return dataclasses.replace(end, result=r, last=False, growth_ops=tuple(self.growth.ops))

    def save(self) -> None:
        save_checkpoint(self.run.checkpoint, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                        train_batches=self.train_batches, config=self.cfg.to_dict(), state=self.state)

    def summary(self) -> MemberSummary:
        cfg, data, state = self.cfg, self.data, self.state
        history, rungs = state.history, state.rungs
        final = rungs[-1] if rungs else None
        impl = None
        if cfg.conv == "winograd_relu":  # which implementation of the layer trained and evaluated it
            from .winograd import resolved_impls

            from .winograd import winograd_layers

            impl = resolved_impls(self.device, self.compute_dtype,
                                  None if cfg.winograd_impl == "auto" else cfg.winograd_impl)
            # per layer: the weights' density and the path its last training step and evaluation took
            # (native-sparse where the sparse kernels pay, native-dense, or another implementation)
            impl["layers"] = {name: {"density": round(float((layer.weight != 0).float().mean()), 6), **layer.ran}
                              for name, layer in winograd_layers(self.model)}
        return MemberSummary(
            member=cfg.model, variant=None, model=cfg.model, dataset=data.describe(), epochs=cfg.total_epochs,
            dense_epochs=cfg.epochs,
            # the final rung's figures: the model as it ends (early stopping may have restored an earlier epoch)
            val_accuracy=final.val_accuracy if final else history[-1].val_accuracy,
            test_accuracy=final.test_accuracy if final else None, test_loss=final.test_loss if final else None,
            sparsity=final.sparsity if final else 0.0, model_sparsity=final.model_sparsity if final else 0.0,
            nonzero_weights=final.nonzero_weights if final else None,
            total_weights=final.total_weights if final else None, compression=self.compression.kind,
            basis_threshold=final.basis_threshold if final else None, basis=final.basis if final else None,
            batch_size_range=[min(h.batch_size for h in history), max(h.batch_size for h in history)],
            train_seconds=state.train_seconds, steps=state.steps,
            mean_epoch_seconds=state.train_seconds / max(len(history), 1), rungs=list(rungs),
            levels=list(state.levels), expansion=self._expansion_summary(), history=list(history),
            config=cfg.to_dict(), device=str(self.device), train_size=len(data.train), val_size=len(data.val),
            test_size=len(data.test), provenance={}, class_names=list(data.class_names), epochs_run=len(history),
            early_stopping={k: v for k, v in (state.early or {}).items() if k != "weights"} or None,
            bmax=getattr(self.schedule, "bmax", None),  # DBS: the largest batch the schedule may reach
            winograd_impl=impl,
        )

    def _expansion_summary(self) -> dict | None:
        if self.growth is None:
            return None
        return {"ops": list(self.growth.ops), "checks": [d.to_dict() for d in self.growth.history]}


def _early_stopping(cfg: TrainConfig, state: TrainState, model: nn.Module, epoch: int, val_loss: float) -> _Early | None:
    """Early stopping on validation loss in the dense phase; None after it.

    Keeps the best epoch's weights (lowest validation loss, by more than ``min_delta``) in the state,
    so they travel in the checkpoint.  At ``patience`` epochs without improvement -- or at the dense
    phase's last epoch -- the best weights go back into ``model`` when they are not the current ones,
    and the phase ends: ``stop`` is True when epochs were left out."""
    if epoch >= cfg.epochs:
        return None
    es = cfg.early_stopping
    if state.early is None:
        state.early = {"best_epoch": None, "best_val_loss": None, "bad_epochs": 0, "weights": None,
                       "stopped_epoch": None}
    e = state.early
    if math.isfinite(val_loss) and (e["best_val_loss"] is None or val_loss < e["best_val_loss"] - es.min_delta):
        e.update(best_epoch=epoch, best_val_loss=val_loss, bad_epochs=0,
                 weights={k: v.detach().clone() for k, v in model.state_dict().items()})
    else:
        e["bad_epochs"] += 1
    stop = e["bad_epochs"] >= es.patience and epoch < cfg.epochs - 1
    if not (stop or epoch == cfg.epochs - 1):
        return _Early(False, False, e["best_epoch"], "")
    restored = e["best_epoch"] is not None and e["best_epoch"] != epoch
    if restored:
        model.load_state_dict(e["weights"])
    if stop:
        e["stopped_epoch"] = epoch
    e["weights"] = None  # the phase is over: the copy is no longer needed in checkpoints
    best = "no finite val loss" if e["best_val_loss"] is None else f"no val loss below {e['best_val_loss']:.4f}"
    why = (f"{best} - {es.min_delta:g} for {es.patience} epochs: dense phase stopped after epoch {epoch}"
           if stop else "dense phase ended")
    return _Early(stop, restored, e["best_epoch"],
                  why + (f"; weights of epoch {e['best_epoch']} (best val loss) restored" if restored else ""))
