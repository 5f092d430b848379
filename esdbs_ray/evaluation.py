"""How good a classifier's probabilities are, beyond accuracy: confusion matrix, per-class precision,
recall and F1, and calibration (expected calibration error and the reliability diagram's bins).

Numpy only: the stacking run (``stacking_run.py``: the ensemble and each member on the test split),
the trainer's rung records (``test_ece``), ``esdbs predict`` (when the inputs have labels) and the
report all call :func:`evaluate_probs`.  Definitions, as scikit-learn and Guo et al. (2017, "On
Calibration of Modern Neural Networks") give them:

* confusion ``C[i, j]``: images of true class i predicted as j (arg-max, ties to the lower class);
* precision_c = C[c, c] / sum_i C[i, c], recall_c = C[c, c] / sum_j C[c, j], F1 their harmonic mean;
  None where the denominator is 0 (a class never predicted, or without images);
* ECE = sum_b (n_b / n) |accuracy_b - confidence_b| over ``bins`` equal-width bins of the top
  probability (a probability of exactly 1 falls in the last bin, 0 in the first).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["Evaluation", "evaluate_probs", "confusion_matrix", "expected_calibration_error", "weighted_probs",
           "ECE_BINS"]

ECE_BINS = 15


@dataclass(frozen=True)
class Evaluation:
    """One classifier on one labelled set."""

    n: int
    accuracy: float
    confusion: list[list[int]]  # [true class][predicted class]
    precision: list[float | None]
    recall: list[float | None]
    f1: list[float | None]
    support: list[int]
    macro_f1: float | None
    ece: float
    reliability: list[dict]  # per bin: lo, hi, count, confidence (mean top probability), accuracy

    def to_dict(self) -> dict:
        return asdict(self)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return c


def _bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((confidence * bins).astype(np.int64), 0, bins - 1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """(ECE, the reliability diagram's bins) of softmax outputs ``probs`` [N, C] against ``labels``."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = _bins(confidence, bins)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    n = max(len(labels), 1)
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / n)
    table = [{"lo": b / bins, "hi": (b + 1) / bins, "count": int(count[b]),
              "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
              "accuracy": float(acc_sum[b] / count[b]) if count[b] else None} for b in range(bins)]
    return ece, table


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(a / b) if b else None for a, b in zip(num, den)]


def evaluate_probs(probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
                   bins: int = ECE_BINS) -> Evaluation:
    """The :class:`Evaluation` of softmax outputs ``probs`` [N, C] on integer ``labels`` [N]."""
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be [N, C] for {labels.shape[0]} labels, got {probs.shape}")
    c = int(num_classes or probs.shape[1])
    cm = confusion_matrix(labels, probs.argmax(axis=1), c)
    tp = np.diag(cm).astype(np.float64)
    precision, recall = _ratio(tp, cm.sum(axis=0)), _ratio(tp, cm.sum(axis=1))
    f1 = [None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0) for p, r in zip(precision, recall)]
    present = [v for v, s in zip(f1, cm.sum(axis=1)) if s and v is not None]
    ece, table = expected_calibration_error(probs, labels, bins)
    return Evaluation(n=int(labels.size), accuracy=float(np.trace(cm) / max(labels.size, 1)), confusion=cm.tolist(),
                      precision=precision, recall=recall, f1=f1, support=cm.sum(axis=1).tolist(),
                      macro_f1=float(np.mean(present)) if present else None, ece=ece, reliability=table)


def weighted_probs(weights: Sequence[float], member_probs: np.ndarray) -> np.ndarray:
    """The ensemble's probabilities: sum_k w_k P_k over members' [K, N, C] outputs."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.asarray(member_probs, dtype=np.float64), axes=1)
