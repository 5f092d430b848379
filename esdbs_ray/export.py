"""``esdbs export EXP --out DIR``: a trained ensemble as one self-describing directory.

What it achieves: a run leaves its members' weights in Tune trial folders and its stacking weights in
``stacking*.json``; an export gathers what it takes to use the ensemble anywhere::

    DIR/manifest.json                 what it is: each member's registry name, width, conv kind and
                                      sparsity; input size, channels and normalisation; class names;
                                      stacking weights and method; provenance (run, config, revisions)
    DIR/members/<member>.safetensors  weights with the pruning masks folded in (masked weights are 0)
    DIR/members/<member>.onnx         the member as an ONNX graph: float32 pixels (N, C, H, W) in
                                      0..255 -> normalisation -> network -> softmax ``probs``

``ensemble.Ensemble.load(DIR)`` and ``esdbs predict`` use it; any ONNX runtime can use the graphs and
the manifest's weights alone.

Which weights: the trainer keeps each member's weights at the rung its stack uses
(``OUT/weights/<member>-tsNNNN.pt``, ``TrialSpec.export_sparsity``), since Tune keeps only the latest
checkpoints; an experiment from before that falls back on the member's last Tune checkpoint, which
serves the last rung only.  The stacking weights come from the run's ``stacking*.json`` when it
stacked that rung, else from an ``esdbs stack`` re-run of it, else they are fitted now (the NLL
optimum on that rung's validation predictions, as the report does).

The Winograd-ReLU layer trains through a custom autograd Function, which ONNX cannot trace; the
export swaps it for :func:`winograd_relu_plain`, the same arithmetic in plain tensor ops (pad,
strided tile extraction, the B^T d B additions, ReLU, a batched matmul with U, A^T M A, crop), equal
to the layer within float rounding (tests/test_export.py).  Adaptive pooling, whose ONNX form needs
shapes the tracer no longer sees after those reshapes, becomes fixed pooling for the export's input
size.  Every graph is checked against torch with onnxruntime at export time (max |difference| of
the probabilities <= 1e-4 on seeded random images, recorded in the manifest) or the export fails,
writing nothing.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from . import storage
from .checkpoint import check_state_dict, same_training, training_difference
from .config import ConfigError, PipelineConfig, parse_saved_config, slug
from .ensemble import FORMAT, FORMAT_VERSION, ExportError, build_model, fold_masks
from .layout import ExperimentLayout, ExportLayout, RunLayout, check_replace, replace_dir
from .records import MemberSummary, Rung

OPSET = 17
ONNX_TOLERANCE = 1e-4
CHECK_IMAGES = 32

__all__ = ["export_experiment", "winograd_relu_plain", "onnx_ready", "measure_latency", "OPSET", "ONNX_TOLERANCE"]


# --------------------------------------------------------------------------------------------------
# ONNX-exportable forms of the layers
# --------------------------------------------------------------------------------------------------
def winograd_relu_plain(x, u, bias=None, relu: bool = True):
    """``WinogradReLUConv2d``'s forward, Y = A^T [U ⊙ ReLU(B^T d B)] A, in plain tensor ops (NCHW).

    x (N, C, H, W), u (16, C, K) with tile position p = 4 i + j (i: row of B^T d B, j: column) as in
    ``winograd.py``.  Tiles are 4x4 at stride 2 over the input padded by 1 (and rounded up to whole
    tiles); the output is cropped back to H x W."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    k = u.shape[2]
    xp = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    r = [xp[:, :, i:i + 2 * th:2, :] for i in range(4)]  # tile rows at offset i
    rows = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]  # B^T d
    v = []
    for R in rows:
        q = [R[:, :, :, j:j + 2 * tw:2] for j in range(4)]
        v += [q[0] - q[2], q[1] + q[2], q[2] - q[1], q[1] - q[3]]  # (B^T d) B
    V = torch.stack(v)  # (16, N, C, th, tw)
    if relu:
        V = torch.relu(V)
    V = V.reshape(16, -1, c, th * tw)
    M = torch.matmul(u.transpose(1, 2).unsqueeze(1), V)  # (16, 1, K, C) @ (16, N, C, T) -> (16, N, K, T)
    m = [M[p] for p in range(16)]
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] over i, then over j
    T = [[m[j] + m[4 + j] + m[8 + j] for j in range(4)], [m[4 + j] - m[8 + j] - m[12 + j] for j in range(4)]]
    Y = torch.stack([torch.stack([t[0] + t[1] + t[2], t[1] - t[2] - t[3]]) for t in T])  # (a, b, N, K, T)
    Y = Y.reshape(2, 2, -1, k, th, tw).permute(2, 3, 4, 0, 5, 1).reshape(-1, k, 2 * th, 2 * tw)
    Y = Y[:, :, :h, :w]
    return Y if bias is None else Y + bias.view(1, -1, 1, 1)


def _plain_modules():
    import torch
    from torch import nn

    class WinogradPlain(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.weight, self.bias, self.relu = layer.weight, layer.bias, layer.relu

        def forward(self, x):
            return winograd_relu_plain(x, self.weight, self.bias, self.relu)

    class AdaptivePoolPlain(nn.Module):
        """Adaptive max/avg pooling for one known input size: PyTorch's bins (start = floor(i * in /
        out), end = ceil((i + 1) * in / out)) as slices, or one fixed pooling when the size divides."""

        def __init__(self, kind: str, size_in: tuple[int, int], size_out: tuple[int, int]):
            super().__init__()
            self.kind, self.size_in, self.size_out = kind, size_in, size_out

        def forward(self, x):
            (hi, wi), (ho, wo) = self.size_in, self.size_out
            reduce = torch.amax if self.kind == "max" else torch.mean
            if hi % ho == 0 and wi % wo == 0:
                kh, kw = hi // ho, wi // wo
                if self.kind == "max":
                    return torch.nn.functional.max_pool2d(x, (kh, kw))
                return torch.nn.functional.avg_pool2d(x, (kh, kw))
            rows = []
            for i in range(ho):
                a, b = (i * hi) // ho, -(-((i + 1) * hi) // ho)
                cols = []
                for j in range(wo):
                    c, d = (j * wi) // wo, -(-((j + 1) * wi) // wo)
                    cols.append(reduce(x[:, :, a:b, c:d], dim=(2, 3), keepdim=True))
                rows.append(torch.cat(cols, dim=3))
            return torch.cat(rows, dim=2)

    return WinogradPlain, AdaptivePoolPlain


def onnx_ready(model, sample):
    """A copy of ``model`` whose Winograd-ReLU layers and adaptive pools are in plain ops (shapes
    taken from one forward of ``sample``); the parameters are shared, the arithmetic the same."""
    import torch
    from torch import nn

    from .winograd import WinogradReLUConv2d

    WinogradPlain, AdaptivePoolPlain = _plain_modules()
    model = copy.deepcopy(model).eval()
    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: sizes.__setitem__(
                name, (tuple(i[0].shape[-2:]), tuple(o.shape[-2:])))))
    with torch.no_grad():
        model(sample)
    for h in hooks:
        h.remove()
    for name, m in list(model.named_modules()):
        if isinstance(m, WinogradReLUConv2d):
            new = WinogradPlain(m)
        elif name in sizes:
            new = AdaptivePoolPlain("max" if isinstance(m, nn.AdaptiveMaxPool2d) else "avg", *sizes[name])
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _member_graph(model, mean, std):
    """pixels (0..255) -> normalise as the trainer does -> model -> softmax."""
    import torch
    from torch import nn

    from .ensemble import _normalizer

    class Member(nn.Module):
        def __init__(self):
            super().__init__()
            scale, shift = _normalizer(mean, std, "cpu")
            self.model = model
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, pixels):
            return torch.softmax(self.model(pixels * self.scale + self.shift), dim=1)

    return Member().eval()


def _to_onnx(model, mean, std, shape) -> tuple[bytes, float]:
    """The member's ONNX graph and the largest |difference| between onnxruntime's and torch's
    probabilities on seeded random images; raises when it exceeds ONNX_TOLERANCE."""
    import onnxruntime as ort
    import torch

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (CHECK_IMAGES, *shape), generator=g).float()
    graph = _member_graph(onnx_ready(model, pixels[:2] / 255.0), mean, std)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter (dynamo=False): the dynamo exporter needs onnxscript besides onnx
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (pixels[:2],), buf, dynamo=False, opset_version=OPSET, input_names=["pixels"],
                          output_names=["probs"], dynamic_axes={"pixels": {0: "batch"}, "probs": {0: "batch"}})
    data = buf.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"pixels": pixels.numpy()})[0]
    reference = _member_graph(model, mean, std)
    with torch.no_grad():
        want = reference(pixels).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= ONNX_TOLERANCE:
        raise RuntimeError(f"the ONNX graph differs from torch by {diff:.3g} (> {ONNX_TOLERANCE:g})")
    return data, diff


# --------------------------------------------------------------------------------------------------
# Reading the experiment
# --------------------------------------------------------------------------------------------------
def _config(tree: storage.Tree) -> PipelineConfig:
    if not tree.is_dir():
        raise ExportError(f"{tree.root}: no such experiment directory")
    where = tree.uri(ExperimentLayout.CONFIG)
    try:
        text = tree.read_text(ExperimentLayout.CONFIG)
    except FileNotFoundError:
        raise ExportError(f"{where}: missing; is {tree.root} an esdbs experiment?") from None
    except ValueError as exc:  # not UTF-8
        raise ExportError(str(exc)) from None
    except OSError as exc:  # a directory, no permission
        raise ExportError(f"{where}: cannot read it ({exc.__class__.__name__})") from None
    try:
        return parse_saved_config(text, where)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def _choose_group(cfg: PipelineConfig, variant: str | None, tree: storage.Tree) -> str:
    groups = [g["group"] for g in cfg.groups()]
    if variant is not None:
        if variant not in groups:
            raise ExportError(f"--variant {variant!r}: not a group of {tree.root}; choose one of: {', '.join(groups)}")
        return variant
    stacked = [g for g in groups if sum(t.group == g for t in cfg.trials()) >= 2]
    if len(groups) == 1 or len(stacked) == 1:
        return groups[0] if len(groups) == 1 else stacked[0]
    raise ExportError(f"{tree.root} holds several groups; pass --variant, one of: {', '.join(groups)}")


def _load_torch(tree: storage.Tree, *parts: str):
    from .errors import UserError

    try:
        data = tree.read_bytes(*parts)
        return storage.torch_from_bytes(data, tree.uri(*parts), what="weights file")
    except FileNotFoundError:
        raise
    except UserError as exc:
        raise ExportError(str(exc)) from None


def _member_weights(tree: storage.Tree, spec, sparsity: float, level: int | None = None) -> dict:
    """{"state", "input" (or None), "source", "epoch", "growth_ops"} of one member at rung ``sparsity``
    (or at a growing member's ``level``)."""
    train = spec.train
    name = ExperimentLayout.rung_weights_name(spec.member, sparsity, level)
    if tree.is_file(ExperimentLayout.WEIGHTS, name):
        w = _load_torch(tree, ExperimentLayout.WEIGHTS, name)
        where = tree.uri(ExperimentLayout.WEIGHTS, name)
        if not isinstance(w, dict):
            raise ExportError(f"{where}: not an esdbs weights file")
        missing = [k for k in ("model", "config", "input") if k not in w]
        if missing:
            raise ExportError(f"{where}: not an esdbs weights file (no {', '.join(map(repr, missing))})")
        differs = training_difference(w["config"], train.to_dict())
        if differs:
            raise ExportError(f"{where}: written by a different config than {spec.member}'s ({differs})")
        _check_weights(w, where)
        return {"state": w["model"], "input": w["input"], "source": f"weights/{name}", "epoch": w.get("epoch"),
                "growth_ops": list(w.get("growth_ops") or [])}
    if level is not None:
        raise ExportError(f"member {spec.member!r}: no weights at level {level} ({tree.uri(ExperimentLayout.WEIGHTS, name)})")
    # An experiment from before the trainer kept rung weights: the last Tune checkpoint, last rung only.
    last = train.sparsity_ladder[-1] if train.sparsity_ladder else 0.0
    trials = [d for d in tree.listdir(*ExperimentLayout.TUNE_BASE, kind="dir") if d.startswith(f"{spec.member}_")]
    base, ckpt_name = "/".join(ExperimentLayout.TUNE_BASE), RunLayout.CHECKPOINT
    checkpoints = sorted((c for d in trials for c in (f"{base}/{d}/{x}" for x in
                                                      tree.listdir(*ExperimentLayout.TUNE_BASE, d,
                                                                   pattern="checkpoint_*", kind="dir"))),
                         key=lambda c: int(c.rsplit("_", 1)[1]) if c.rsplit("_", 1)[1].isdigit() else -1)
    weights_uri = tree.uri(ExperimentLayout.WEIGHTS, name)
    if not checkpoints or not tree.is_file(checkpoints[-1], ckpt_name):
        raise ExportError(f"member {spec.member!r}: no weights at rung {sparsity:g} ({weights_uri}) and "
                          f"no Tune checkpoint in {tree.uri(*ExperimentLayout.TUNE_BASE)}; did the trial run?")
    if Rung(last) != Rung(sparsity):
        raise ExportError(f"member {spec.member!r}: no weights at rung {sparsity:g} ({weights_uri}); "
                          f"its last Tune checkpoint holds rung {last:g} only (pass --sparsity {last:g})")
    ckpt = _load_torch(tree, checkpoints[-1], ckpt_name)
    ckpt_uri = tree.uri(checkpoints[-1], ckpt_name)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ExportError(f"{ckpt_uri}: not an esdbs checkpoint")
    if not same_training(ckpt["config"], train.to_dict()):
        raise ExportError(f"{ckpt_uri}: written by a different config than {spec.member}'s")
    if (ckpt.get("state") or {}).get("epoch") != train.total_epochs:
        raise ExportError(f"{ckpt_uri}: the trial did not finish "
                          f"(epoch {(ckpt.get('state') or {}).get('epoch')} of {train.total_epochs})")
    return {"state": ckpt["model"], "input": None, "source": f"{checkpoints[-1]}/{ckpt_name}", "growth_ops": [],
            "epoch": train.total_epochs - 1}


def _check_weights(w: dict, where: str) -> None:
    """A rung's weights file as the trainer writes it (``run_record._save_weights``), each part refused
    naming its key: a state dict of finite tensors, the input's size and normalisation, the growth."""
    from .artifacts import Dct, Lst, Num, Obj, Str, check
    from .config import MAX_CLASSES, MAX_IMAGE_SIZE

    check_state_dict(w["model"], f"{where}: model", ExportError)
    stats = Lst(Num(nullable=False, finite=True), nullable=False)
    check({k: v for k, v in w.items() if k != "model"}, Obj({
        "input": Obj({"in_channels": Num(nullable=False, lo=1, hi=64), "image_size": Num(nullable=False, lo=8, hi=MAX_IMAGE_SIZE),
                      "mean": stats, "std": stats, "class_names": Lst(Str(nullable=False), nullable=False),
                      "dataset": Str()}, required=("in_channels", "image_size", "mean", "std", "class_names")),
        "epoch": Num(lo=0), "growth_ops": Lst(Obj({"op": Str(nullable=False), "block": Num(nullable=False, lo=0),
                                                   "amount": Num(nullable=False, lo=0)}, nullable=False)),
        "config": Dct()}, nullable=False), where)
    info = w["input"]
    if info is None:
        return
    c = info["in_channels"]
    if not isinstance(c, int) or not isinstance(info["image_size"], int):
        raise ExportError(f"{where}: input: in_channels and image_size must be whole numbers")
    if len(info["mean"]) != c or len(info["std"]) != c or min(info["std"]) <= 0:
        raise ExportError(f"{where}: input: mean and std must have {c} value(s) each, std positive")
    if not 2 <= len(info["class_names"]) <= MAX_CLASSES:
        raise ExportError(f"{where}: input.class_names: {len(info['class_names'])} classes; a classifier has 2 to {MAX_CLASSES:,}")


def _input_from_data(cfg: PipelineConfig) -> dict:
    """The input normalisation of a run whose weights files do not carry it: the dataset, loaded as
    the run loaded it (its statistics are those of the run's training split)."""
    from .data import load_configured

    data = load_configured(cfg)
    return {"mean": list(data.mean), "std": list(data.std), "class_names": list(data.class_names),
            "in_channels": data.in_channels, "image_size": data.image_size, "dataset": data.describe()}


def measure_latency(models: dict, shape: tuple[int, int, int],
                    batches: tuple[tuple[int, int], ...] = ((1, 20), (256, 3))) -> dict:
    """Milliseconds per image of the members as ``esdbs predict`` runs them (batch norm folded, no
    gradients, the default layer implementation), at each (batch, repetitions) of ``batches``, on this
    machine: median of timed batches after a warm-up one.  The repetitions go round the members in
    turn, so a change in the machine's load reaches every member alike (the pool's candidates are
    compared with each other by these times)."""
    import statistics

    import torch

    from .inference import prepare_for_inference
    from .provenance import cpu_model

    out = {"hardware": cpu_model(), "device": "cpu", "torch_threads": torch.get_num_threads(), "members": {}}
    prepared = {name: prepare_for_inference(copy.deepcopy(model).cpu()) for name, model in models.items()}
    for batch, reps in batches:
        x = torch.randn(batch, *shape)
        times: dict[str, list[float]] = {name: [] for name in prepared}
        with torch.inference_mode():
            for m in prepared.values():
                m(x)
            for _ in range(reps):
                for name, m in prepared.items():
                    t0 = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t0)
        total = 0.0
        for name in prepared:
            ms = 1000 * statistics.median(times[name]) / batch
            out["members"].setdefault(name, {})[f"batch_{batch}_ms_per_image"] = round(ms, 4)
            total += ms
        out[f"batch_{batch}_ms_per_image"] = round(total, 4)
    return out


def _rung_of(info) -> Rung | None:
    try:
        return Rung.of(info) if isinstance(info, dict) else None
    except ValueError:
        return None


def _stacking(tree: storage.Tree, cfg: PipelineConfig, group: str, names: list[str], sparsity: float,
              level: int | None = None) -> dict:
    """Weights of the group's stack at ``sparsity`` (or ``level``): the run's stacking file, an
    ``esdbs stack`` re-run, or the NLL optimum fitted now on the rung's validation predictions."""
    want = Rung(sparsity, level=level)
    if len(names) == 1:
        return {"method": "single member", "weights": {names[0]: 1.0}, "source": None}
    own = ExperimentLayout.stacking_name(None if len(cfg.groups()) == 1 else slug(group))
    candidates = [own] + sorted(tree.listdir(pattern=ExperimentLayout.RESTACK_GLOB, kind="file"), reverse=True)
    for name in candidates:
        try:
            st = tree.read_json(name)
        except (OSError, ValueError):
            continue
        if not isinstance(st, dict) or set(st.get("member_names") or []) != set(names):
            continue
        if name != own and st.get("variant") not in (group, None):
            continue
        rungs = st.get("rungs") or {}
        if not all(_rung_of(rungs.get(n)) == want for n in names):
            continue
        chosen = st.get("chosen")
        m = (st.get("methods") or {}).get(chosen) or {}
        if set(m.get("weights") or {}) != set(names):
            continue
        return {"method": chosen, "weights": {n: float(m["weights"][n]) for n in names}, "source": name,
                **{k: m.get(k) for k in ("val_accuracy", "val_nll", "test_accuracy", "test_nll")},
                "n_val": st.get("n_val"), "n_test": st.get("n_test")}
    from .predictions import prediction_matrix, read_predictions
    from .stacking import evaluate, nll_optimal

    table = read_predictions(tree.path(ExperimentLayout.PREDICTIONS), filesystem=tree.fs)
    Pv, yv, _ = prediction_matrix(table, "val", names, sparsity, variant=group, level=level)
    Pt, yt, _ = prediction_matrix(table, "test", names, sparsity, variant=group, level=level)
    w = nll_optimal(Pv, yv)
    v, t = evaluate(w, Pv, yv), evaluate(w, Pt, yt)
    return {"method": "nll_optimal", "weights": dict(zip(names, map(float, w))), "source": "fitted at export",
            "val_accuracy": v["accuracy"], "val_nll": v["nll"], "test_accuracy": t["accuracy"], "test_nll": t["nll"],
            "n_val": int(len(yv)), "n_test": int(len(yt))}


# --------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------
def _rung_model(tree: storage.Tree, t, w: dict, rung: float, level: int | None, num_classes: int,
                shape: tuple[int, int, int], name: str | None = None):
    """One member's registry model with the weights ``w`` (:func:`_member_weights`) loaded, masks
    folded in, and its manifest entry (``name``: the member's name in the export, default its own)."""
    try:
        state = fold_masks(w["state"])
    except (RuntimeError, TypeError, ValueError) as exc:  # a mask of another shape than its weight
        raise ExportError(f"{tree.uri(w['source'])}: its pruning masks do not fit their weights "
                          f"({' '.join(str(exc).split())[:200]})") from None
    entry = {"name": name or t.member, "model": t.train.model, "width": t.train.width, "conv": t.train.conv,
             "dropout": t.train.dropout, "schedule": t.train.schedule, "variant": t.variant,
             "target_sparsity": rung, "epoch": w["epoch"], "weights_source": w["source"],
             **({"level": level, "growth_ops": w["growth_ops"]} if w["growth_ops"] or level is not None else {})}
    try:
        model = build_model(entry, num_classes, shape[0], shape[1])
    except (ValueError, KeyError, IndexError) as exc:  # growth operations that do not apply to the model
        raise ExportError(f"{tree.uri(w['source'])}: does not describe a {t.train.model!r} "
                          f"({' '.join(str(exc).split())[:200]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{tree.uri(w['source'])}: does not fit registry model {t.train.model!r} "
                          f"({' '.join(str(exc).split())[:300]})") from None
    from .pruning import sparsity_accounting

    counts = sparsity_accounting(model)  # no masks after folding: whole-model figures count zeros
    entry.update(model_sparsity=counts["model_sparsity"], nonzero_weights=counts["nonzero_weights"],
                 total_weights=counts["total_weights"])
    try:
        rec = MemberSummary.from_dict(tree.read_json(ExperimentLayout.MEMBERS,
                                                     ExperimentLayout.member_name(t.member))).rung(
            Rung(rung, level=level))
        if rec is not None:
            entry.update(sparsity=rec.sparsity, val_accuracy=rec.val_accuracy, test_accuracy=rec.test_accuracy)
    except (OSError, ValueError):
        pass  # the member's own summary is informative only
    return model, entry


def write_export(out: str | os.PathLike, *, name: str, group: str, variant: str | None, dataset: str, info: dict,
                 models: dict, members: list[dict], ensemble: dict, run: dict, onnx: bool, force: bool) -> dict:
    """Time the members (:func:`measure_latency`), write the manifest, each member's safetensors and ONNX
    graph into the new directory ``out`` (built aside, then renamed); returns the manifest."""
    shape = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
    latency = measure_latency(models, shape)
    from .provenance import provenance

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "group": group,
        "variant": variant,
        "task": {"dataset": dataset, "num_classes": len(info["class_names"]),
                 "class_names": list(info["class_names"])},
        "input": {"layout": "NCHW", "channels": shape[0], "height": shape[1], "width": shape[2],
                  "color": "L" if shape[0] == 1 else "RGB", "dtype": "uint8 pixels 0..255",
                  "mean": list(info["mean"]), "std": list(info["std"]),
                  "normalization": "x = (pixels / 255 - mean) / std, per channel (mean, std of the run's training split)",
                  "resize": f"bilinear to {shape[1]}x{shape[2]} (as esdbs reads image folders)",
                  "source": info.get("dataset")},
        "members": members,
        "latency": latency,
        "ensemble": {**ensemble, "combine": "probs = sum_m weights[m] * softmax_m(x)"},
        "onnx": {"opset": OPSET, "input": "pixels: float32 (batch, C, H, W), values 0..255",
                 "output": "probs: float32 (batch, num_classes), softmax", "tolerance": ONNX_TOLERANCE,
                 "check": f"max |onnxruntime - torch| of the probabilities on {CHECK_IMAGES} seeded random images"}
        if onnx else None,
        "provenance": {**run, "export": provenance()},
    }

    def build(staging: Path) -> dict:
        from safetensors.torch import save as save_safetensors

        from .ensemble import _sha256

        layout = ExportLayout(staging)
        layout.members.mkdir()
        for entry in members:
            model = models[entry["name"]]
            wfile = layout.member_weights(entry["name"])
            wfile.write_bytes(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                                               metadata={"format": "pt", "esdbs.member": entry["name"]}))
            entry.update(weights_file=str(wfile.relative_to(staging)), weights_sha256=_sha256(wfile))
            if onnx:
                data, diff = _to_onnx(model, info["mean"], info["std"], shape)
                ofile = layout.member_onnx(entry["name"])
                ofile.write_bytes(data)
                entry.update(onnx_file=str(ofile.relative_to(staging)), onnx_sha256=_sha256(ofile),
                             onnx_max_abs_diff=diff)
        layout.manifest.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest

    return replace_dir(out, build, kind="export", force=force)


def export_experiment(experiment: str | os.PathLike, out: str | os.PathLike, *, variant: str | None = None,
                      sparsity: float | None = None, force: bool = False, filesystem=None,
                      onnx: bool = True, level: int | None = None) -> dict:
    """Export one group's ensemble of ``experiment`` (a local path, a URI, or a path on ``filesystem``)
    into the new local directory ``out``; returns the manifest.  Everything is read and checked before
    anything is written; the directory appears whole or not at all (built aside, then renamed)."""
    check_replace(out, kind="export", force=force)
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ExportError(f"--sparsity={sparsity}: a fraction in [0, 1) (e.g. 0.3 for 30 %)")
    tree = storage.Tree(experiment, filesystem)
    cfg = _config(tree)
    group = _choose_group(cfg, variant, tree)
    specs = [t for t in cfg.trials() if t.group == group]
    names = [t.member for t in specs]
    if specs[0].train.basis.ladder or specs[0].train.conv == "basis_random":
        # Their layers' shapes (Q per layer) come from training, and ensemble.build_model rebuilds
        # registry models only: exporting BasisConv members would need the shapes in the manifest.
        raise ExportError(f"group {group!r} has BasisConv members ({specs[0].variant}): esdbs export does not "
                          "export BasisConv models yet; choose another group with --variant")
    rung = float(sparsity if sparsity is not None else (0.0 if level is not None else specs[0].export_sparsity))
    ladder = (0.0, *specs[0].train.sparsity_ladder) if specs[0].train.epochs else specs[0].train.sparsity_ladder
    if level is not None and (sparsity not in (None, 0.0) or not specs[0].train.expansion.enabled):
        raise ExportError(f"--level {level}: group {group!r} " + ("has no self-expanding members" if not
                          specs[0].train.expansion.enabled else "levels are not pruned: drop --sparsity"))
    if level is None and Rung(rung) not in {Rung(s) for s in ladder}:
        raise ExportError(f"--sparsity {rung:g}: not a rung of group {group!r} (rungs: {', '.join(f'{s:g}' for s in ladder)})")

    loaded = {t.member: _member_weights(tree, t, rung, level) for t in specs}
    info = next((w["input"] for w in loaded.values() if w["input"]), None) or _input_from_data(cfg)
    stack = _stacking(tree, cfg, group, names, rung, level)
    shape = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
    models, members = {}, []
    for t in specs:
        model, entry = _rung_model(tree, t, loaded[t.member], rung, level, len(info["class_names"]), shape)
        models[t.member] = model
        members.append(entry)
    try:
        summary = tree.read_json(ExperimentLayout.SUMMARY)
    except (OSError, ValueError):
        summary = {}
    ensemble = {"method": stack["method"], "weights": stack["weights"], "sparsity": rung, "level": level,
                **{k: stack.get(k) for k in ("val_accuracy", "val_nll", "test_accuracy", "test_nll", "n_val", "n_test",
                                              "source")}}
    run = {"experiment": tree.root, "run_git_revision": (summary.get("provenance") or {}).get("git_revision"),
           "run_versions": (summary.get("provenance") or {}).get("versions"), "config": cfg.to_dict()}
    return write_export(out, name=cfg.name, group=group, variant=specs[0].variant, dataset=cfg.dataset, info=info,
                        models=models, members=members, ensemble=ensemble, run=run, onnx=onnx, force=force)
