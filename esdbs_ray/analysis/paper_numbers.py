"""The paper's published numbers, transcribed from its section 4 (Tables 1-6, the text around
Figures 2-4) and its abstract, exactly as printed (the paper ships no raw data; figure curves are
only available where the text quotes a value).

Hardware and framework of every number here: one Nvidia RTX 2080 Ti, TensorFlow (paper section 4).

Times are training seconds per epoch; speeds are the paper's "x" factors, relative to the unpruned
single base model at batch 128 (``baseline_seconds``).  Accuracies are test accuracies in percent.

Inconsistencies inside the paper itself (kept as printed, listed in ``PAPER_ERRATA``):
- abstract: CIFAR-10 "2.86x"; no table has 2.86x (Table 4's DBS SWR-CNN row says 1.86x);
- CIFAR-100 "4.48%" gain: 73.29 (Fig. 4b, SWR-CNN with DBS) - 68.81 (Fig. 4a, C-CNN at 40 %);
  Fig. 4a's SWR-CNN+DBS at 40 % (73.26) gives 4.45;
- Table 6 text says DBS speeds C-CNN "to 3.30x", the table says 3.00x (54 s / 18 s);
- Table 6's B=128 SWR-CNN row (20 s, 2.70x) is Table 5's SWR-CNN+DBS at 40 %, not SWR-CNN (24 s, 2.25x);
- Fig. 3b: C-CNN accuracy *rises* from B=64 to B=1024 on CIFAR-10 (87.54 -> 87.99).
"""
from __future__ import annotations

HARDWARE = "1x Nvidia RTX 2080 Ti, TensorFlow"
SPARSITIES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
BATCH_SIZES = (64, 128, 256, 512, 1024)
VARIANTS = ("C-CNN", "SC-CNN", "SWR-CNN", "SWR-CNN+DBS")
SWEEP_VARIANTS = ("C-CNN", "SC-CNN", "SWR-CNN")


def _rows(keys, values):
    return {k: v for k, v in zip(keys, values)}


def _sparsity_table(rows: list[tuple], overall: tuple) -> dict:
    """rows: per sparsity (C time, C speed, SC time, SC speed, SWR time, SWR speed, DBS time, DBS speed)."""
    out = {v: {} for v in VARIANTS}
    for s, row in zip(SPARSITIES, rows):
        for i, v in enumerate(VARIANTS):
            out[v][s] = (row[2 * i], row[2 * i + 1])
    for i, v in enumerate(VARIANTS):
        out[v]["overall"] = (overall[2 * i], overall[2 * i + 1])
    return out


def _batch_table(rows: list[tuple]) -> dict:
    """rows: per batch size 64..1024 then DBS: (C time, C speed, SC time, SC speed, SWR time, SWR speed)."""
    out = {v: {} for v in SWEEP_VARIANTS}
    for b, row in zip((*BATCH_SIZES, "DBS"), rows):
        for i, v in enumerate(SWEEP_VARIANTS):
            out[v][b] = (row[2 * i], row[2 * i + 1])
    return out


PAPER: dict[str, dict] = {
    "fashion-mnist": {
        "title": "Fashion-MNIST (AlexNet)", "section": "4.1", "base_model": "AlexNet",
        "tables": (1, 2), "figure": 2, "baseline_seconds": 17, "chosen_sparsity": 0.3,
        # Table 1
        "sparsity_table": _sparsity_table(
            [(12, 1.42, 37, 0.46, 17, 1.00, 11, 1.55),
             (12, 1.42, 37, 0.46, 17, 1.00, 11, 1.55),
             (12, 1.42, 36, 0.47, 16, 1.06, 11, 1.55),
             (11, 1.55, 37, 0.46, 17, 1.00, 11, 1.55),
             (11, 1.55, 37, 0.46, 16, 1.06, 10, 1.7),
             (11, 1.55, 36, 0.47, 16, 1.06, 10, 1.7),
             (11, 1.55, 37, 0.46, 16, 1.06, 10, 1.7)],
            (11.42, 1.49, 36.71, 0.46, 16.43, 1.03, 10.57, 1.61)),
        # Table 2 (at 30 % sparsity)
        "batch_table": _batch_table(
            [(20, 0.85, 53, 0.32, 24, 0.71),
             (12, 1.42, 37, 0.46, 17, 1.00),
             (7, 2.43, 28, 0.61, 13, 1.31),
             (5, 3.4, 22, 0.77, 10, 1.70),
             (3, 5.67, 21, 0.81, 8, 2.13),
             (6, 2.83, 24, 0.71, 11, 1.55)]),
        # Fig. 2a, as quoted in the text: {sparsity: {variant: accuracy}}
        "accuracy": {0.3: {"C-CNN": 90.83, "SC-CNN": 92.29, "SWR-CNN": 92.45, "SWR-CNN+DBS": 93.49},
                     0.6: {"C-CNN": 89.49}, 0.8: {"SWR-CNN+DBS": 90.94}},
        # Fig. 2b, as quoted: {variant: {batch size or "DBS": accuracy}}
        "batch_accuracy": {"C-CNN": {64: 90.62, 1024: 89.51, "DBS": 90.97},
                           "SC-CNN": {64: 90.87, 1024: 88.02, "DBS": 93.35},
                           "SWR-CNN": {64: 90.95, 1024: 88.34, "DBS": 93.49}},
        "best_at": {0.6: "C-CNN", 0.8: "SWR-CNN+DBS"},  # "outperforms other models" at these sparsities
        "headline": {"speed": 1.55, "accuracy_gain": 2.66},
    },
    "cifar10": {
        "title": "CIFAR-10 (VGG-16)", "section": "4.2", "base_model": "VGG-16",
        "tables": (3, 4), "figure": 3, "baseline_seconds": 26, "chosen_sparsity": 0.4,
        # Table 3
        "sparsity_table": _sparsity_table(
            [(19, 1.37, 41, 0.63, 18, 1.44, 15, 1.73),
             (19, 1.37, 41, 0.63, 18, 1.44, 14, 1.86),
             (18, 1.44, 40, 0.65, 18, 1.44, 14, 1.86),
             (18, 1.44, 40, 0.65, 18, 1.44, 14, 1.86),
             (18, 1.44, 40, 0.65, 18, 1.44, 13, 2.00),
             (18, 1.44, 39, 0.67, 17, 1.53, 13, 2.00),
             (18, 1.44, 39, 0.67, 17, 1.53, 12, 2.17)],
            (18.3, 1.42, 40.0, 0.65, 17.71, 1.47, 13.57, 1.92)),
        # Table 4 (at 40 % sparsity)
        "batch_table": _batch_table(
            [(28, 0.93, 62, 0.42, 28, 0.93),
             (18, 1.44, 40, 0.65, 18, 1.44),
             (13, 2.00, 32, 0.81, 15, 1.73),
             (11, 2.36, 28, 0.93, 13, 2.00),
             (9, 2.89, 27, 0.96, 12, 2.17),
             (13, 2.00, 29, 0.90, 14, 1.86)]),
        "accuracy": {0.4: {"C-CNN": 88.36, "SC-CNN": 88.34, "SWR-CNN": 89.02, "SWR-CNN+DBS": 89.73},
                     0.6: {"C-CNN": 88.42}, 0.8: {"C-CNN": 83.65}},
        "batch_accuracy": {"C-CNN": {64: 87.54, 1024: 87.99, "DBS": 88.54},
                           "SC-CNN": {64: 86.87, 1024: 67.73, "DBS": 88.67},
                           "SWR-CNN": {64: 87.50, 1024: 68.91, "DBS": 89.73}},
        "best_at": {0.2: "SWR-CNN+DBS", 0.5: "SWR-CNN+DBS", 0.6: "C-CNN", 0.8: "C-CNN"},
        "headline": {"speed": 2.86, "accuracy_gain": 1.37},
    },
    "cifar100": {
        "title": "CIFAR-100 (ResNet-32)", "section": "4.3", "base_model": "ResNet-32",
        "tables": (5, 6), "figure": 4, "baseline_seconds": 54, "chosen_sparsity": 0.4,
        # Table 5
        "sparsity_table": _sparsity_table(
            [(28, 1.93, 51, 1.06, 25, 2.16, 21, 2.57),
             (28, 1.93, 51, 1.06, 25, 2.16, 21, 2.57),
             (29, 1.86, 49, 1.10, 24, 2.25, 20, 2.7),
             (28, 1.93, 53, 1.02, 26, 2.08, 22, 2.45),
             (29, 1.86, 53, 1.02, 26, 2.08, 22, 2.45),
             (30, 1.8, 51, 1.06, 25, 2.16, 21, 2.57),
             (28, 1.93, 49, 1.1, 24, 2.25, 20, 2.7)],
            (28.57, 1.89, 51, 1.06, 25, 2.16, 21, 2.57)),
        # Table 6 (at 40 % sparsity)
        "batch_table": _batch_table(
            [(49, 1.10, 90, 0.60, 53, 1.02),
             (29, 1.86, 49, 1.10, 20, 2.70),
             (20, 2.70, 34, 1.59, 14, 3.86),
             (14, 3.86, 25, 2.16, 11, 4.91),
             (12, 4.50, 22, 2.45, 10, 5.40),
             (18, 3.00, 29, 1.86, 13, 4.15)]),
        "accuracy": {0.4: {"C-CNN": 68.81, "SC-CNN": 72.12, "SWR-CNN": 72.56, "SWR-CNN+DBS": 73.26},
                     0.8: {"C-CNN": 59.62}},
        "batch_accuracy": {"C-CNN": {64: 70.00, 1024: 42.71, "DBS": 68.98},
                           "SC-CNN": {64: 70.72, 1024: 62.64, "DBS": 72.33},
                           "SWR-CNN": {64: 71.04, 1024: 63.49, "DBS": 73.29}},
        # "Our SWR-CNN + DBS has the best testing accuracy for all sparsity"; C-CNN worst at 80 %
        "best_at": {s: "SWR-CNN+DBS" for s in SPARSITIES},
        "worst_at": {0.8: "C-CNN"},
        "headline": {"speed": 4.15, "accuracy_gain": 4.48},
    },
}

PAPER_ERRATA = [
    "Abstract: CIFAR-10 speed-up '2.86x' appears in no table (Table 4's DBS SWR-CNN row is 1.86x; "
    "Table 3's best is 2.17x).",
    "Abstract: CIFAR-100 '+4.48%' is 73.29 (Fig. 4b, SWR-CNN with DBS) - 68.81 (C-CNN at 40%); with "
    "Fig. 4a's SWR-CNN+DBS at 40% (73.26) it is +4.45.",
    "Table 6 text: DBS speeds C-CNN up 'to 3.30x'; the table prints 18 s / 3.00x.",
    "Table 6 row B=128, SWR-CNN (20 s, 2.70x) equals Table 5's SWR-CNN+DBS at 40%, not SWR-CNN (24 s, 2.25x).",
    "Fig. 3b (CIFAR-10): C-CNN accuracy rises from B=64 (87.54%) to B=1024 (87.99%), against the "
    "'larger batch lowers accuracy' pattern of the other panels.",
    "Fig. 2 caption: (a) is labelled 'with different batch sizes' but shows sparsity.",
]


def dataset_key(name: str | None) -> str | None:
    """Map a dataset name (config or summary) to a key of PAPER."""
    if not name:
        return None
    n = str(name).lower().replace("_", "-")
    if "fashion" in n:
        return "fashion-mnist"
    if "cifar100" in n.replace("-", "") or "cifar-100" in n:
        return "cifar100"
    if "cifar10" in n.replace("-", ""):
        return "cifar10"
    return None
