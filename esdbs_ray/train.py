"""Train one CNN: dense epochs under a (fixed or dynamic) batch-size schedule, then prune-and-retrain.

Pure PyTorch -- this module never imports Ray; ``trainable.py`` adapts it to Tune through
:class:`Hooks`.  One run is a sequence of epochs:

    epochs 0 .. E-1                       dense training                (rung "0 %")
    then for each sparsity s in the ladder: prune to s, retrain R epochs  (rung "s")
    or, for each threshold t of a basis ladder: BasisConv at t, fine-tune R epochs  (rung "t")

and each rung ends with validation + test evaluation, predictions and a kernel snapshot.  What a rung
does to the model is a :class:`~esdbs_ray.compression.Compression` (pruning or BasisConv, issue #16);
this loop only calls its hooks.  The schedule (``dbs.py``) decides learning rate, momentum and batch
size per epoch -- the cosine schedule (``cosine.py``) the learning rate of every step; the trainer
keeps a snapshot before every increase and restores it when the schedule's divergence guard fires.
Early stopping (on validation loss) may end the dense phase early with its best epoch's weights;
training batches may be augmented (``augment.py``), evaluation batches never are.

Every epoch writes an atomic checkpoint (model with its pruning masks, optimizer, schedule, batch
iterator and RNG states, config, history); resuming from it continues exactly as an uninterrupted run
with the same seed on CPU (tested).

Evidence (2 CPU cores, torch 2.14): ``esdbs train-one --dataset fashion-mnist --model alexnet --epochs 1
--subset 5000`` reaches 0.704-0.786 validation accuracy over seeds 0-4 at 1 and 2 threads on an Intel
Xeon (0.744 on an AMD EPYC, 0.692 on an H100 in bf16: one epoch of SGD rounds differently on every
CPU), about 20 s of training; tests/test_train.py runs it at half width against a bar set from that
spread.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import storage
from .augment import build_augmenter
from .config import TrainConfig
from .data import BatchIterator, DatasetBundle
from .cosine import CosineSchedule
from .dbs import build_schedule
from .layout import RunLayout
from .compression import build_compression, rung_counts
from .models import create_model
from .pruning import sparsity_accounting

CHECKPOINT = RunLayout.CHECKPOINT
_CHECKPOINT_KEYS = {"model", "optimizer", "schedule", "train_batches", "rng", "config", "state"}
__all__ = ["TrainConfig", "train", "evaluate", "build_model", "build_network", "build_optimizer", "PrintHooks", "Hooks", "CHECKPOINT"]


# --------------------------------------------------------------------------------------------------
# Hooks: how a caller (CLI, Tune trainable) observes a run
# --------------------------------------------------------------------------------------------------
class Hooks(Protocol):
    def on_epoch(self, record: dict, checkpoint_path: Path) -> None: ...

    def on_rung(self, rung: dict) -> None: ...


class PrintHooks:
    """Progress on the terminal, one line per epoch."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_epoch(self, r: dict, checkpoint_path: Path) -> None:
        print(
            f"{self.prefix}epoch {r['epoch'] + 1:3d}/{r['total_epochs']} [{r['phase']:>8}] "
            f"lr {r['lr']:.4f} m {r['momentum']:.3f} B {r['batch_size']:4d} | "
            f"train {r['train_loss']:.4f}/{r['train_accuracy']:.4f} val {r['val_loss']:.4f}/{r['val_accuracy']:.4f} | "
            f"sparsity {r['sparsity']:.2f} | {r['epoch_seconds']:.1f}s {r['samples_per_second']:.0f} img/s"
            + (f" | {r['decision']}" if r.get("decision") else "")
            + (" | guard: weights restored" if r.get("restored") else ""),
            flush=True,
        )

    def on_rung(self, rung: dict) -> None:
        if rung.get("basis_threshold") is not None:
            b = rung["basis"]
            print(f"{self.prefix}rung basis t={rung['basis_threshold']:g} ({b['retained_filters']}/"
                  f"{b['original_filters']} filters, conv mults x{b['mult_ratio']:.3f}, conv learnable "
                  f"/{b['conv_learnable_reduction']:.2f}): before fine-tuning val {rung['before_finetune']['val_accuracy']:.4f}"
                  f" | val {rung['val_accuracy']:.4f} test {rung['test_accuracy']:.4f}", flush=True)
            return
        print(
            f"{self.prefix}rung sparsity {rung['target_sparsity']:.2f} (pruned layers {rung['sparsity']:.3f}, "
            f"whole model {rung['model_sparsity']:.3f}, {rung['nonzero_weights']:,} nonzero weights): "
            f"val {rung['val_accuracy']:.4f} test {rung['test_accuracy']:.4f}",
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_network(model: str, *, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0,
                  width: float = 1.0, conv: str = "spatial", basis: Any = None, seed: int = 0,
                  winograd_impl: str = "auto") -> nn.Module:
    """The registry model with its convolutions in the form ``conv`` names: "spatial", "winograd_relu"
    (every eligible conv a Winograd-ReLU layer, run by ``winograd_impl``) or "basis_random" (``basis``:
    a BasisConfig).  The one place a member's network is built: training here, ``esdbs predict`` /
    ``export`` (ensemble.py)."""
    net = create_model(model, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       dropout=dropout, width=width)
    if conv == "winograd_relu":
        from .winograd import to_winograd_relu

        to_winograd_relu(net, impl=None if winograd_impl == "auto" else winograd_impl)
    elif conv == "basis_random":
        from .basisconv import to_basisconv_random

        if basis is None:
            raise ValueError("conv 'basis_random' needs the basis settings (train.basis)")
        to_basisconv_random(net, fraction=basis.fraction, which=basis.layers, seed=seed)
    elif conv != "spatial":
        raise ValueError(f"conv {conv!r}: choose one of spatial, winograd_relu, basis_random")
    return net


def build_model(cfg: TrainConfig, data: DatasetBundle) -> tuple[nn.Module, Any]:
    """The member's network (:func:`build_network`) and its compression strategy (pruning masks are
    registered now, before any checkpoint is loaded)."""
    model = build_network(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                          image_size=data.image_size, dropout=cfg.dropout, width=cfg.width, conv=cfg.conv,
                          basis=cfg.basis, seed=cfg.seed, winograd_impl=cfg.winograd_impl)
    return model, build_compression(cfg, model)


def _is_conv_weight(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return True
    from .winograd import WinogradReLUConv2d

    return isinstance(module, WinogradReLUConv2d)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return _build_adamw(cfg, model)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and _is_conv_weight(module) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 2.0 * cfg.l2}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.dbs.lr0, betas=(cfg.dbs.m0, 0.999))
    return torch.optim.SGD(groups, lr=cfg.dbs.lr0, momentum=cfg.dbs.m0)


def _build_adamw(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (issue #17): decoupled weight decay on every conv and linear weight (ndim >= 2, Winograd
    weights included); batch norm and biases are exempt (decaying a BN scale towards 0 only fights the
    normalisation).  beta1 is m0, as for Adam."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.dbs.lr0, betas=(cfg.dbs.m0, 0.999))


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, momentum: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        if "momentum" in g:
            g["momentum"] = momentum
        else:
            g["betas"] = (momentum, g["betas"][1])


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchIterator, *, keep_probs: bool = False, amp: bool = False) -> dict:
    model.eval()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    probs = []
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        if keep_probs:
            probs.append(logits.softmax(1).cpu())
    n = len(batches)
    out = {"loss": loss_sum.item() / n, "accuracy": correct.item() / n}
    if keep_probs:
        out["probs"] = torch.cat(probs).numpy()
    return out


def probe_max_batch(model: nn.Module, sample: torch.Tensor, num_classes: int, cap: int, step: int = 32) -> int:
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


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    data: DatasetBundle,
    out_dir: str | Path,
    *,
    hooks: Hooks | None = None,
    resume_from: str | Path | None = None,
    predictions_root: str | None = None,
    member: str | None = None,
    variant: str | None = None,
    provenance: dict | None = None,
    stop_after_epoch: int | None = None,
    device: str | None = None,
    keep_weights: tuple[float, ...] = (),
) -> dict:
    """Train per ``cfg`` and return the summary (also written to ``out_dir/summary.json``).

    ``resume_from``: a checkpoint file or a directory holding ``checkpoint.pt``.  ``predictions_root``:
    the experiment directory (local path or URI) whose ``predictions/`` receives each rung's Parquet.  ``stop_after_epoch`` ends the run
    after that epoch index as if interrupted (tests of resumption).  ``device`` overrides ``cfg.device``
    (the Tune adapter passes the device Ray assigned; it is not part of the run's identity).
    ``keep_weights``: rungs (target sparsities) whose final weights are saved beside the predictions
    (``ExperimentLayout.rung_weights``), for ``esdbs export``: checkpoints keep only the latest epochs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunLayout(out_dir)
    hooks = hooks or PrintHooks()
    member = member or cfg.model
    provenance = provenance or {}

    # --- setup: determinism, device, model, optimizer, schedule, batches, logging
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(device or cfg.device)
    amp = cfg.amp and device.type == "cuda"
    if cfg.conv == "winograd_relu":
        from .winograd import check_impl_runs

        # a layer implementation this device cannot run fails here, naming the key, not in a step
        check_impl_runs(cfg.winograd_impl, device, torch.bfloat16 if amp else torch.float32, "train.winograd_impl")
    if device.type == "cpu" and cfg.conv == "winograd_relu":
        from .winograd import tune_cpu_allocator

        tune_cpu_allocator()  # reuse the transforms' large buffers instead of page-faulting each step
    model, compression = build_model(cfg, data)
    ckpt = _load_checkpoint(resume_from, cfg) if resume_from is not None else None
    if ckpt is not None:  # basis layers of the checkpoint's shapes, before the optimizer sees the parameters
        compression.restore_structure(model, ckpt["model"])
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    train_batches = BatchIterator(data.train, batch_size=cfg.dbs.b0, mean=data.mean, std=data.std,
                                  device=device, shuffle=True, seed=cfg.seed,
                                  augment=build_augmenter(cfg.augment, image_size=data.image_size, seed=cfg.seed))
    val_batches = BatchIterator(data.val, batch_size=cfg.eval_batch_size, mean=data.mean, std=data.std, device=device)
    test_batches = BatchIterator(data.test, batch_size=cfg.eval_batch_size, mean=data.mean, std=data.std, device=device)
    bmax_memory = None
    if device.type == "cuda" and cfg.schedule == "dbs":
        bmax_memory = probe_max_batch(model, next(iter(val_batches))[0], data.num_classes, cfg.dbs.bmax_cap, cfg.dbs.step)
    sizes = dict(epochs=cfg.total_epochs, train_size=len(data.train), val_size=len(data.val),
                 rung_starts=cfg.rung_starts(), batch_size=cfg.dbs.b0)
    if cfg.schedule_kind == "cosine":
        schedule = CosineSchedule(cfg.dbs, cfg.cosine, **sizes)
    else:
        schedule = build_schedule(cfg.schedule_kind, cfg.dbs, bmax_memory=bmax_memory, **sizes)
    # Everything below travels in the checkpoint; "snapshot" is the divergence guard's pre-increase copy.
    state = {"epoch": 0, "history": [], "rungs": [], "steps": 0, "train_seconds": 0.0, "kernels": {}, "snapshot": None}

    # --- resume: everything that decides the future comes back from the checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        train_batches.load_state_dict(ckpt["train_batches"])
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        compression.load_state_dict(state.get("compression"))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run.tensorboard), purge_step=state["epoch"])
    rung_ends = cfg.rung_ends()

    for epoch in range(state["epoch"], cfg.total_epochs):
        if epoch < state["epoch"]:  # early stopping ended the dense phase: on to the first rung, or done
            continue
        # --- compress at the first epoch of each ladder rung (prune, or BasisConv at the rung's t)
        rung_index = cfg.rung_of(epoch)
        if rung_index >= 0 and epoch == cfg.rung_starts()[rung_index]:
            if compression.start_rung(model, rung_index, optimizer):
                # New parameter objects: a new optimizer (a compressed model is fine-tuned afresh, as
                # the paper does), and the guard's snapshot must be of the new structure.
                optimizer = build_optimizer(cfg, model)
                state["snapshot"] = None
            if compression.evaluate_at_start:  # the rung's operating point before fine-tuning
                state["rung_start"] = compression.start_metrics(model, rung_index, lambda m: {
                    f"{k}_accuracy": evaluate(m, b, amp=amp)["accuracy"] for k, b in (("val", val_batches),
                                                                                      ("test", test_batches))})
        lr_scale = compression.begin_epoch(model, epoch)  # which parameters train (basis: step one / two)

        # --- schedule: lr, momentum, batch size for this epoch; snapshot before an increase
        plan = schedule.plan()
        set_hyperparameters(optimizer, plan.lr * lr_scale, plan.momentum)
        train_batches.batch_size = plan.batch_size
        if plan.increase or state.get("snapshot") is None:
            state["snapshot"] = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

        # --- train one epoch (a per-step schedule gives each step its learning rate)
        step_lrs = schedule.step_lrs()
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = steps = 0
        for x, y in train_batches:
            if step_lrs is not None:
                for g in optimizer.param_groups:
                    g["lr"] = step_lrs[steps] * lr_scale
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            compression.after_step(optimizer)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_loss = loss_sum.item() / max(seen, 1)
        if step_lrs is not None and steps != len(step_lrs):  # the schedule's step count is the iterator's rule
            raise RuntimeError(f"epoch {epoch} ran {steps} steps, the schedule planned {len(step_lrs)}")

        # --- validate; the schedule's guard may restore the pre-increase snapshot.  At a rung's end the
        # probabilities are kept for its predictions, so the rung does not evaluate the same weights again.
        keep = predictions_root is not None and (
            epoch in rung_ends or (cfg.early_stopping.patience > 0 and epoch < cfg.epochs))  # a stop ends the dense phase
        val = evaluate(model, val_batches, keep_probs=keep, amp=amp)
        restored = schedule.step(val["accuracy"], math.isfinite(train_loss) and math.isfinite(val["loss"]))
        if restored:  # the latest pre-increase snapshot stays valid: after a restore nothing increases
            model.load_state_dict(state["snapshot"]["model"])
            optimizer.load_state_dict(state["snapshot"]["optimizer"])
            val = evaluate(model, val_batches, keep_probs=keep, amp=amp)
        val_now = val  # of the weights the model holds now

        # --- early stopping (dense phase): may restore the best epoch's weights and end the phase here
        early = _early_stopping(cfg, state, model, epoch, val["loss"]) if cfg.early_stopping.patience else None
        if early is not None and early["restored"]:
            val_restored = val_now = evaluate(model, val_batches, keep_probs=keep, amp=amp)

        # --- record and log
        sparsity = sparsity_accounting(model)
        state["steps"] += steps
        state["train_seconds"] += epoch_seconds
        record = {
            "epoch": epoch, "total_epochs": cfg.total_epochs, "phase": plan.phase, "lr": plan.lr,
            "momentum": plan.momentum, "batch_size": plan.batch_size,
            "noise_scale": plan.noise_scale(len(data.train)), "train_loss": train_loss,
            "train_accuracy": correct.item() / max(seen, 1), "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "epoch_seconds": epoch_seconds, "samples_per_second": seen / max(epoch_seconds, 1e-9),
            "steps": steps, "total_steps": state["steps"], "train_seconds": state["train_seconds"],
            "sparsity": sparsity["sparsity"], "model_sparsity": sparsity["model_sparsity"],
            "nonzero_weights": sparsity["nonzero_weights"], **compression.epoch_fields(epoch),
            "restored": bool(restored), "decision": plan.decision,
        }
        if lr_scale != 1.0:  # "lr" is the schedule's; the optimizer ran at lr * lr_scale
            record["lr_scale"] = lr_scale
        if early is not None:
            record["early_stopping"] = early["note"]
            if early["restored"]:
                record.update(best_epoch=early["best_epoch"], best_val_loss=val_restored["loss"],
                              best_val_accuracy=val_restored["accuracy"])
        state["history"].append(record)
        for tag, key in TB_SCALARS.items():
            writer.add_scalar(tag, record[key], epoch)
        writer.add_scalar("schedule/phase", _PHASE_CODES.get(plan.phase, -1), epoch)
        if plan.decision:
            writer.add_text("schedule/decision", plan.decision, epoch)
        if early is not None and early["note"]:
            writer.add_text("early_stopping", early["note"], epoch)
        stopped = early is not None and early["stop"]
        next_epoch = cfg.epochs if stopped else epoch + 1  # a stop jumps to the first rung (or the end)
        if stopped:
            schedule.skip_to(next_epoch)

        # --- end of a rung: test evaluation, predictions, kernels
        if epoch in rung_ends or stopped:
            rung_sparsity = rung_ends.get(epoch, 0.0)
            rung = _finish_rung(cfg, data, model, compression, val_now, test_batches, amp, epoch, rung_index,
                                record, writer, state, predictions_root, member, variant, provenance)
            hooks.on_rung(rung)
            # weights are kept by target sparsity: a basis rung (target 0, named by its t) is not one
            if (predictions_root is not None and rung.get("basis_threshold") is None
                    and any(abs(rung_sparsity - k) < 1e-9 for k in keep_weights)):
                _save_rung_weights(predictions_root, member, cfg, data, model, epoch, rung_sparsity)
            if next_epoch == cfg.total_epochs and state["kernels"]:
                _kernel_figure(run.kernels, state["kernels"], writer, epoch)

        # --- checkpoint (atomic), then tell the caller
        state["epoch"] = next_epoch
        state["compression"] = compression.state_dict()
        ckpt_path = run.checkpoint
        storage.save_torch(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "train_batches": train_batches.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict(),
            "state": state,
        })
        writer.flush()
        hooks.on_epoch(record, ckpt_path)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            writer.close()
            return {"interrupted_after_epoch": epoch}

    # --- final: summary.json and the kernel figure
    summary = _summary(cfg, data, state, compression, provenance, member, variant, device)
    summary["bmax"] = getattr(schedule, "bmax", None)  # DBS: the largest batch the schedule may reach
    if cfg.conv == "winograd_relu":  # which implementation of the layer trained and evaluated it
        from .winograd import resolved_impls

        summary["winograd_impl"] = resolved_impls(device, torch.bfloat16 if amp else torch.float32,
                                                  None if cfg.winograd_impl == "auto" else cfg.winograd_impl)
    writer.close()
    storage.write_json(run.summary, summary)
    return summary


TB_SCALARS = {  # TensorBoard tag -> epoch record key
    "train/loss": "train_loss", "train/accuracy": "train_accuracy", "val/loss": "val_loss",
    "val/accuracy": "val_accuracy", "schedule/lr": "lr", "schedule/momentum": "momentum",
    "schedule/batch_size": "batch_size", "schedule/noise_scale": "noise_scale", "perf/epoch_seconds": "epoch_seconds",
    "perf/samples_per_second": "samples_per_second", "pruning/sparsity": "sparsity",
    "pruning/model_sparsity": "model_sparsity", "pruning/nonzero_weights": "nonzero_weights",
}
_PHASE_CODES = {"warmup": 0, "lr": 1, "momentum": 2, "hold": 3, "fixed": 4, "cosine": 5}  # schedule/phase scalar


def _early_stopping(cfg: TrainConfig, state: dict, model: nn.Module, epoch: int, val_loss: float) -> dict | None:
    """Early stopping on validation loss in the dense phase (issue #17); None after it.

    Keeps the best epoch's weights (lowest validation loss, by more than ``min_delta``) in ``state``,
    so they travel in the checkpoint.  At ``patience`` epochs without improvement -- or at the dense
    phase's last epoch -- the best weights go back into ``model`` when they are not the current ones,
    and the phase ends: ``stop`` is True when epochs were left out.  Returns ``{"stop", "restored",
    "best_epoch", "note"}``."""
    if epoch >= cfg.epochs:
        return None
    es = cfg.early_stopping
    e = state.setdefault("early", {"best_epoch": None, "best_val_loss": None, "bad_epochs": 0, "weights": None,
                                   "stopped_epoch": None})
    if math.isfinite(val_loss) and (e["best_val_loss"] is None or val_loss < e["best_val_loss"] - es.min_delta):
        e.update(best_epoch=epoch, best_val_loss=val_loss, bad_epochs=0,
                 weights={k: v.detach().clone() for k, v in model.state_dict().items()})
    else:
        e["bad_epochs"] += 1
    stop = e["bad_epochs"] >= es.patience and epoch < cfg.epochs - 1
    if not (stop or epoch == cfg.epochs - 1):
        return {"stop": False, "restored": False, "best_epoch": e["best_epoch"], "note": ""}
    restored = e["best_epoch"] is not None and e["best_epoch"] != epoch
    if restored:
        model.load_state_dict(e["weights"])
    if stop:
        e["stopped_epoch"] = epoch
    e["weights"] = None  # the phase is over: the copy is no longer needed in checkpoints
    best = "no finite val loss" if e["best_val_loss"] is None else f"no val loss below {e['best_val_loss']:.4f}"
    why = (f"{best} - {es.min_delta:g} for {es.patience} epochs: dense phase stopped after epoch {epoch}"
           if stop else "dense phase ended")
    return {"stop": stop, "restored": restored, "best_epoch": e["best_epoch"],
            "note": why + (f"; weights of epoch {e['best_epoch']} (best val loss) restored" if restored else "")}


def _load_checkpoint(resume_from, cfg: TrainConfig) -> dict:
    ckpt_path = Path(resume_from)
    ckpt_path = ckpt_path / CHECKPOINT if ckpt_path.is_dir() else ckpt_path
    ckpt = storage.load_torch(ckpt_path)
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt)) if isinstance(ckpt, dict) else None
    if missing is None or missing:
        raise ValueError(f"{ckpt_path}: not an esdbs checkpoint ("
                         + (f"a {type(ckpt).__name__}, not a dict" if missing is None else f"lacks {missing}") + ")")
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or _model_keys(saved) != _model_keys(cfg.to_dict()):
        raise ValueError(f"{ckpt_path}: checkpoint was written by a different config; refusing to resume")
    return ckpt


# Keys that choose how a step is computed, not what is trained: a run may resume under another value
# (a GPU run's checkpoint on a CPU node), and checkpoints from before a key existed lack it.
_EXECUTION_KEYS = ("winograd_impl",)


def _model_keys(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _EXECUTION_KEYS}


def _finish_rung(cfg, data, model, compression, val, test_batches, amp, epoch, rung_index, record, writer,
                 state, predictions_root, member, variant, provenance) -> dict:
    """``val``: the evaluation of the model's current weights on the validation split (with ``probs``
    when predictions are written)."""
    test = evaluate(model, test_batches, keep_probs=predictions_root is not None, amp=amp)
    layers = compression.layer_sparsity() if rung_index >= 0 else {}
    counts = sparsity_accounting(model)
    key = compression.rung_key(rung_index)
    target, threshold = key["target_sparsity"], key["basis_threshold"]
    rung = {
        **key, "sparsity": counts["sparsity"], "model_sparsity": counts["model_sparsity"],
        "nonzero_weights": counts["nonzero_weights"], "total_weights": counts["total_weights"],
        "pruned_layer_weights": counts["pruned_layer_weights"], "layer_sparsity": layers,
        "epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "train_seconds": state["train_seconds"], "steps": state["steps"],
        # the dense rung comes first, so all epochs so far are its own (fewer than cfg.epochs after a stop)
        "mean_epoch_seconds": _rung_epoch_seconds(state["history"], len(state["history"]) if rung_index < 0
                                                  else cfg.retrain_epochs, skip_first=rung_index < 0),
        # multiplications, weights and filters beside the dense spatial network (compression.py)
        **rung_counts(model, (data.in_channels, data.image_size, data.image_size)),
    }
    rung.update(state.pop("rung_start", None) or {})  # basis: accuracy before fine-tuning, direct conversion
    state["rungs"].append(rung)
    if threshold is None:
        writer.add_scalar("rung/val_accuracy", val["accuracy"], int(round(target * 100)))
        writer.add_scalar("rung/test_accuracy", test["accuracy"], int(round(target * 100)))
        writer.add_scalar("rung/sparsity", counts["sparsity"], int(round(target * 100)))
        writer.add_scalar("rung/model_sparsity", counts["model_sparsity"], int(round(target * 100)))
    else:  # basis rungs all have target sparsity 0: step = the rung's number (1, 2, ...), t a scalar of its own
        for tag, v in (("threshold", threshold), ("val_accuracy", val["accuracy"]), ("test_accuracy", test["accuracy"]),
                       ("filter_ratio", rung["basis"]["filter_ratio"]), ("mult_ratio", rung["basis"]["mult_ratio"]),
                       ("conv_learnable_reduction", rung["basis"]["conv_learnable_reduction"])):
            writer.add_scalar(f"basis_rung/{tag}", v, rung_index + 1)
    if predictions_root is not None:
        from .predictions import prediction_path, write_predictions

        parts = [
            {"split": "val", "probs": val["probs"], "labels": data.val.labels, "indices": data.val.indices},
            {"split": "test", "probs": test["probs"], "labels": data.test.labels, "indices": data.test.indices},
        ]
        write_predictions(
            prediction_path(predictions_root, member, target, basis_threshold=threshold), parts=parts, model=cfg.model,
            member=member, variant=variant or "", sparsity=counts["sparsity"], target_sparsity=target,
            basis_threshold=threshold, epoch=epoch,
            metadata={"config": cfg.to_dict(), "seed": cfg.seed, "sparsity_accounting": counts,
                      "class_names": list(data.class_names),
                      **({"basis": rung["basis"]} if rung["basis"] else {}), **provenance},
        )
    if cfg.conv == "winograd_relu":
        from .winograd import winograd_layers

        layers = winograd_layers(model)
        if layers:
            _, layer = layers[min(cfg.kernel_layer, len(layers) - 1)]
            state["kernels"][float(target)] = layer.kernels_4x4()[:6, :6].detach().float().cpu().clone()
    return rung


def _save_rung_weights(root, member, cfg, data, model, epoch, target) -> None:
    """The model (pruning masks included) at the end of a rung, with what a consumer of the weights
    needs to feed it: the input normalisation and the class names."""
    from .layout import ExperimentLayout

    storage.save_torch(ExperimentLayout(root).rung_weights(member, target), {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": cfg.to_dict(),
        "epoch": epoch, "target_sparsity": target,
        "input": {"mean": list(data.mean), "std": list(data.std), "class_names": list(data.class_names),
                  "in_channels": data.in_channels, "image_size": data.image_size, "dataset": data.describe()},
    })


def _rung_epoch_seconds(history: list[dict], n: int, skip_first: bool) -> float:
    """Mean training seconds per epoch over a rung's epochs; the run's first epoch (start-up, lazy
    initialisation) is left out when the rung has others."""
    epochs = history[-n:]
    if skip_first and len(epochs) > 1 and epochs[0]["epoch"] == 0:
        epochs = epochs[1:]
    return sum(h["epoch_seconds"] for h in epochs) / len(epochs)


def _kernel_figure(path: Path, kernels: dict, writer, step: int) -> None:
    from .winograd import plot_winograd_kernels

    image = plot_winograd_kernels(kernels, path)
    writer.add_image("winograd_kernels", image, step, dataformats="HWC")


def _summary(cfg, data, state, compression, provenance, member, variant, device) -> dict:
    history, rungs = state["history"], state["rungs"]
    final = rungs[-1] if rungs else {}
    return {
        "member": member, "variant": variant, "model": cfg.model, "dataset": data.describe(),
        "epochs": cfg.total_epochs, "dense_epochs": cfg.epochs,
        # the final rung's figure: the model as it ends (early stopping may have restored an earlier epoch)
        "val_accuracy": final.get("val_accuracy", history[-1]["val_accuracy"]), "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"), "sparsity": final.get("sparsity", 0.0),
        "model_sparsity": final.get("model_sparsity", 0.0), "nonzero_weights": final.get("nonzero_weights"),
        "total_weights": final.get("total_weights"), "compression": compression.kind,
        "basis_threshold": final.get("basis_threshold"), "basis": final.get("basis"),
        "batch_size_range": [min(h["batch_size"] for h in history), max(h["batch_size"] for h in history)],
        "train_seconds": state["train_seconds"], "steps": state["steps"],
        "mean_epoch_seconds": state["train_seconds"] / max(len(history), 1),
        "rungs": rungs, "history": history, "config": cfg.to_dict(), "device": str(device),
        "train_size": len(data.train), "val_size": len(data.val), "test_size": len(data.test),
        "provenance": provenance,
        # issue #17: class names (reports, predictions), epochs actually trained, early stopping
        "class_names": list(data.class_names), "epochs_run": len(history),
        "early_stopping": {k: v for k, v in (state.get("early") or {}).items() if k != "weights"} or None,
    }
