"""The evaluation a user expects beside accuracy, checked against a direct computation: confusion
matrix, per-class precision / recall / F1, expected calibration error and its reliability bins; the
trainer's running ECE equals the one computed from the probabilities it kept."""
from __future__ import annotations

import numpy as np
import pytest

from esdbs_ray.evaluation import ECE_BINS, evaluate_probs


def _direct(probs, labels, bins):
    """Loops over images, as a textbook would."""
    n, c = probs.shape
    cm = [[0] * c for _ in range(c)]
    for p, y in zip(probs, labels):
        cm[y][int(np.argmax(p))] += 1
    prec, rec, f1 = [], [], []
    for k in range(c):
        predicted = sum(cm[i][k] for i in range(c))
        actual = sum(cm[k])
        p = cm[k][k] / predicted if predicted else None
        r = cm[k][k] / actual if actual else None
        prec.append(p)
        rec.append(r)
        f1.append(None if p is None or r is None else (0.0 if p + r == 0 else 2 * p * r / (p + r)))
    ece = 0.0
    for b in range(bins):
        members = [i for i in range(n) if min(int(probs[i].max() * bins), bins - 1) == b]
        if members:
            conf = sum(probs[i].max() for i in members) / len(members)
            acc = sum(int(np.argmax(probs[i]) == labels[i]) for i in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return cm, prec, rec, f1, ece


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_a_direct_computation(seed):
    rng = np.random.default_rng(seed)
    c = 5
    logits = rng.normal(size=(300, c)) * rng.uniform(0.2, 4.0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, c - 1, size=300)  # the last class never occurs: its recall is undefined
    probs[:3] = np.eye(c)[[0, 1, c - 1]]  # top probability exactly 1: the last bin
    ev = evaluate_probs(probs, labels, bins=10)
    cm, prec, rec, f1, ece = _direct(probs, labels, 10)
    assert ev.confusion == cm and ev.support == [sum(r) for r in cm]
    assert ev.precision == pytest.approx(prec) and ev.recall[:-1] == pytest.approx(rec[:-1]) and ev.recall[-1] is None
    assert ev.f1[:-1] == pytest.approx(f1[:-1]) and ev.f1[-1] is None
    assert ev.ece == pytest.approx(ece, abs=1e-12)
    assert ev.accuracy == pytest.approx(np.trace(np.array(cm)) / 300)
    assert sum(b["count"] for b in ev.reliability) == 300 and ev.reliability[-1]["count"] >= 3
    assert ev.macro_f1 == pytest.approx(np.mean(f1[:-1]))


def test_a_perfectly_calibrated_classifier_has_ece_zero_and_a_confident_wrong_one_its_confidence():
    labels = np.array([0, 1, 0, 1])
    assert evaluate_probs(np.eye(2)[labels], labels).ece == 0.0
    assert evaluate_probs(np.eye(2)[1 - labels], labels).ece == pytest.approx(1.0)


def test_the_trainers_running_ece_matches_its_kept_probabilities():
    import torch

    from esdbs_ray.data import BatchIterator, Split
    from esdbs_ray.train import evaluate

    torch.manual_seed(0)
    images = torch.randint(0, 255, (97, 1, 8, 8), dtype=torch.uint8).numpy()
    labels = np.random.default_rng(0).integers(0, 3, 97)
    split = Split(images=images, labels=labels, indices=np.arange(97))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    scores = evaluate(model, BatchIterator(split, batch_size=20, mean=(0.5,), std=(0.25,)), keep_probs=True)
    assert scores.ece == pytest.approx(evaluate_probs(scores.probs, labels, bins=ECE_BINS).ece, abs=1e-6)
