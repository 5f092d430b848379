"""The report's first screen: the run itself -- what was trained, each ensemble against its members,
the time, the stacking method chosen and why -- and the evaluation a user expects beside accuracy
(confusion matrix, per-class precision / recall / F1, calibration with a reliability diagram).

Reads the typed member records and the stacking files; the evaluation comes from a stacking file's
``evaluation`` block, or, for runs written before it existed, from the predictions at the stacked
rung with the file's chosen weights (:mod:`esdbs_ray.evaluation`).
"""
from __future__ import annotations

from pathlib import Path

from .experiment import NOT_RUN, Experiment, _f
from .render import Doc

__all__ = ["section_run", "section_evaluation", "run_title"]

_MODEL_NAMES = {"alexnet": "AlexNet", "convpool_cnn_c": "ConvPool-CNN-C", "all_cnn_c": "All-CNN-C",
                "vgg16": "VGG-16", "resnet32": "ResNet-32", "resnet50": "ResNet-50", "secnn": "SECNN"}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _n(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def run_title(exp: Experiment) -> str:
    """"smoke: SWR-CNN+DBS stack of AlexNet, ConvPool-CNN-C, All-CNN-C on fashion-mnist"."""
    name = exp.config.get("name") or exp.root.rstrip("/").rsplit("/", 1)[-1]
    configured = [m if isinstance(m, str) else (m or {}).get("model") for m in exp.config.get("members") or []]
    models = list(dict.fromkeys(_MODEL_NAMES.get(m, m) for m in configured + [m.model for m in exp.members] if m))
    groups = [g for g in (exp.main_variants or exp.groups) if len(exp.groups.get(g, {}).get("members", [])) > 1]
    what = (f"{', '.join(groups)} stack{'s' if len(groups) > 1 else ''} of " if groups else "") + ", ".join(models)
    return f"{name}: {what} on {exp.config.get('dataset') or 'an unnamed dataset'}"


def section_run(doc: Doc, exp: Experiment) -> bool:
    """The run at a glance; False when the directory holds no member records."""
    doc.h(2, "The run", "run")
    if not exp.members:
        doc.p(f"**{NOT_RUN}**: no member records in this directory (summary.json members, members/*.json).")
        return False
    s = exp.summary or {}
    train = exp.train_cfg
    ladder = train.get("sparsity_ladder") or []
    doc.p(f"{len(exp.members)} members trained as parallel Tune trials on {s.get('dataset') or exp.config.get('dataset')}: "
          f"width {train.get('width')}, {train.get('epochs')} dense epochs"
          + (f", then the sparsity ladder {', '.join(f'{100 * x:g}%' for x in ladder)} with "
             f"{train.get('retrain_epochs')} retraining epoch(s) per rung" if ladder else "")
          + f". Wall time {_n(_f(s.get('wall_seconds')), '.0f')} s (base stage {_n(_f(s.get('base_wall_seconds')), '.0f')} s).")
    for group, st in exp.stackings.items():
        names = list(st.get("member_names") or [])
        chosen = st.get("chosen")
        m = (st.get("methods") or {}).get(chosen) or {}
        rows = [[f"**ensemble** ({chosen})", _pct(_f(m.get("val_accuracy"))), _n(_f(m.get("val_nll"))),
                 f"**{_pct(_f(m.get('test_accuracy')))}**", _n(_f(m.get("test_nll"))),
                 " / ".join(f"{(m.get('weights') or {}).get(n, float('nan')):.3f}" for n in names)]]
        for n in names:
            r = (st.get("members") or {}).get(n) or {}
            rows.append([n, _pct(_f(r.get("val_accuracy"))), _n(_f(r.get("val_nll"))), _pct(_f(r.get("test_accuracy"))),
                         _n(_f(r.get("test_nll"))), ""])
        sp = st.get("sparsity")
        rung = "each member's last rung" if sp is None else f"{100 * sp:g}% sparsity"
        doc.table(["", "val acc", "val NLL", "test acc", "test NLL", "weights (" + ", ".join(names) + ")"], rows,
                  f"{group} at {rung}: the ensemble against its members ({st.get('n_val')} validation, "
                  f"{st.get('n_test')} test images)")
        doc.p(_why(st))
    if not exp.stackings:
        rows = [[m.member, m.group, _pct(m.val_accuracy), _pct(m.test_accuracy), f"{m.sparsity or 0:.3f}"]
                for m in exp.members]
        doc.table(["member", "group", "val acc", "test acc", "sparsity"], rows, "No stacking file: the members alone")
    return True


def _why(st: dict) -> str:
    """Which method the ensemble uses and on what evidence (validation data only)."""
    methods = st.get("methods") or {}
    chosen = st.get("chosen")
    rule = st.get("chosen_rule") or ""
    best_acc = max(methods, key=lambda k: (_f(methods[k].get("val_accuracy")) or 0.0), default=None)
    best_nll = min(methods, key=lambda k: (_f(methods[k].get("val_nll")) or float("inf")), default=None)
    text = f"Method: **{chosen}** ({rule or 'the config'}). "
    if best_nll:
        text += f"Lowest validation NLL: {best_nll} ({_n(_f(methods[best_nll].get('val_nll')))}); "
    if best_acc:
        text += (f"highest validation accuracy: {best_acc} ({_pct(_f(methods[best_acc].get('val_accuracy')))}). "
                 "The NLL optimum is exact and smooth; accuracy differences on a few thousand validation images are "
                 "mostly sampling noise, so the default rule does not chase them. Test numbers never choose.")
    scored = [k for k in methods if _f(methods[k].get("cv_nll")) is not None]
    if scored:  # the cross-validated estimate: weights judged on images that did not fit them
        gaps = ", ".join(f"{k} {_pct(_f(methods[k].get('val_accuracy')))} -> {_pct(_f(methods[k].get('cv_accuracy')))}"
                         for k in scored)
        text += (" Validation accuracy against its cross-validated estimate (weights fitted on the other folds of "
                 f"the validation split): {gaps}; a method that loses more than the others between the two fitted "
                 "the validation images' noise, and choose: cv takes the lowest cross-validated NLL.")
    return text


def _evaluation(exp: Experiment, group: str, st: dict) -> dict | None:
    ev = st.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("ensemble"), dict):
        return ev
    table = exp.table  # an older run: from its predictions at the stacked rung, with the file's weights
    names = list(st.get("member_names") or [])
    weights = ((st.get("methods") or {}).get(st.get("chosen")) or {}).get("weights") or {}
    if table is None or not names or set(weights) != set(names):
        return None
    try:
        from ..evaluation import evaluate_probs, weighted_probs
        from ..predictions import prediction_matrix

        P, y, _ = prediction_matrix(table, "test", names, st.get("sparsity"), variant=st.get("variant") or group,
                                    basis_threshold=st.get("basis_threshold"))
        return {"split": "test", "ensemble": evaluate_probs(weighted_probs([weights[n] for n in names], P), y).to_dict(),
                "members": {n: evaluate_probs(P[k], y).to_dict() for k, n in enumerate(names)}}
    except Exception as exc:  # an unusable file must not stop the report
        exp.problems.append(f"evaluation of {group}: {str(exc).splitlines()[0][:160]}")
        return None


def section_evaluation(doc: Doc, exp: Experiment, out: Path) -> str | None:
    """Confusion matrix, per-class precision / recall / F1 and calibration of each stacked ensemble;
    returns the reliability diagram's path (None when nothing could be evaluated)."""
    doc.h(2, "Evaluation beyond accuracy", "evaluation")
    curves = {}
    for group, st in exp.stackings.items():
        ev = _evaluation(exp, group, st)
        if ev is None:
            continue
        e = ev["ensemble"]
        c = len(e["support"])
        labels = st.get("class_names") or (exp.members[0].class_names if exp.members else None) or []
        labels = labels if len(labels) == c else [str(i) for i in range(c)]
        doc.p(f"**{group}** ensemble on the {e['n']} test images: accuracy {_pct(e['accuracy'])}, macro F1 "
              f"{_n(e['macro_f1'])}, expected calibration error {_n(e['ece'])} (15 equal-width confidence bins); "
              "members: " + ", ".join(f"{n} ECE {_n(m['ece'])}, macro F1 {_n(m['macro_f1'])}"
                                      for n, m in ev["members"].items()) + ".")
        doc.table(["class", "precision", "recall", "F1", "images"],
                  [[labels[i], _n(e["precision"][i]), _n(e["recall"][i]), _n(e["f1"][i]), e["support"][i]]
                   for i in range(c)], f"{group} ensemble: per class (test split)")
        doc.table(["true \\ predicted", *labels], [[labels[i], *e["confusion"][i]] for i in range(c)],
                  f"{group} ensemble: confusion matrix (rows: true class; columns: predicted)")
        curves[f"{group} ensemble"] = e["reliability"]
        for n, m in ev["members"].items():
            curves[n] = m["reliability"]
    if not curves:
        doc.p(f"**{NOT_RUN}**: no stacked group with test predictions.")
        return None
    from . import figures

    path = figures.reliability(str(out / "reliability.png"), curves,
                               title="Reliability: accuracy vs confidence per bin (test split)")
    doc.img(path, "reliability diagram", "Reliability diagram: a calibrated model lies on the diagonal; dot size ~ "
                                         "images in the bin")
    return path
