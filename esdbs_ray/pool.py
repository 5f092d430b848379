"""Ensembles chosen from every model one or more experiments trained (spec section 5, "Pools").

What it achieves: ``esdbs stack`` weighs the three members of one group at one rung; an experiment
trains far more -- every rung of every member, every variant, the batch-size sweep, a growing member's
levels.  Here each of those with validation and test predictions is a *candidate*, identified by
(experiment, member, variant, rung or level), and an ensemble is chosen from all of them:

``caruana``
    Greedy selection with replacement on validation NLL (Caruana et al. 2004, the hyper-deep
    ensembles of Wenzel et al. 2020, AutoGluon's ``EnsembleSelection``): ``rounds`` rounds, each adding
    the candidate whose addition gives the lowest NLL of the running average; the weights are the
    counts of the best round (AutoGluon's ``use_best``), so the ensemble is never worse on validation
    NLL than the best single candidate.
``nll_topk``
    The convex NLL optimum with at most ``k`` nonzero weights.  Exact (the optimum over every support
    of at most ``k`` affordable candidates) when those supports number at most ``EXHAUSTIVE_SUPPORTS``,
    or when the result's Frank-Wolfe gap over the whole pool is zero (then it is the pool's uncapped
    optimum); otherwise greedy forward selection (gradient-screened) and swap search, started from
    the greedy support, Caruana's and every ``seed_supports`` one (the experiments' own stacks): never
    worse than the NLL optimum on any of them.
``equal_topk``
    Equal weights over the ``k`` candidates of lowest validation NLL (that fit the budget).
``best_single``
    The candidate with the best validation accuracy, ties to the lower NLL.

**Honest selection.**  Every method is also scored by K-fold cross-validation inside the validation
split (:func:`esdbs_ray.stacking.cross_validate`: weights fitted on K-1 folds, scored on the held-out
one); ``choose="cv"`` (the default) takes the method of lowest cross-validated NLL.  The test split only
reports.

**Budgets.**  A :class:`Budget` (``--budget-ms`` / ``--budget-macs``, costs from ``pool_cost.py``)
keeps only ensembles whose summed member cost fits: every method searches within it (a candidate with
no known cost never fits).  A candidate used several times (Caruana) runs once, so costs once.

**Reading predictions** (:func:`load_pool`): one prediction file at a time, each candidate's
probabilities appended to a raw float32 file that is then memory-mapped ([M, N, C] per split), so a
pool of 200 candidates x 10,000 images x 100 classes (1.6 GB a split) lives on disk, not in memory;
what the methods touch on every step -- each candidate's probability of the true class [N, M] and its
arg-max class -- is small and kept in memory.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from . import storage
from .errors import UserError
from .records import Rung
from .stacking import (EPS, CV_FOLDS, METHODS as STACK_FIT, _FitContext, _nll_opt_q, _stack_cv, choose_by_cv,
                       cross_validate, cv_folds_of)

__all__ = ["POOL_METHODS", "Candidate", "Pool", "Budget", "MethodResult", "PoolSelection", "load_pool", "select",
           "ensemble_metrics", "reference_stacks", "PoolError", "EXHAUSTIVE_SUPPORTS"]

POOL_METHODS = ("caruana", "nll_topk", "equal_topk", "best_single")
EXHAUSTIVE_SUPPORTS = 3000  # nll_topk enumerates every support when there are at most this many
_SCREEN = 6  # candidates refitted per greedy / swap step, the ones of steepest NLL descent
_GAP_TOL = 1e-9


class PoolError(UserError):
    """Experiments whose predictions cannot form one pool; the message names the problem."""


# --------------------------------------------------------------------------------------------------
# Candidates and their predictions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One trained model at one rung or level, with predictions on both splits."""

    id: str  # "<member>@<rung tag>", prefixed "<experiment label>:" when several experiments pool
    experiment: str  # the experiment's path or URI, as given
    member: str
    model: str
    variant: str
    group: str | None
    batch_size: int | None
    rung: Rung
    sparsity: float
    epoch: int
    file: str  # the prediction file it came from, relative to the experiment

    def to_dict(self) -> dict:
        return {"id": self.id, "experiment": self.experiment, "member": self.member, "model": self.model,
                "variant": self.variant, "group": self.group, "batch_size": self.batch_size, **self.rung.as_dict(),
                "level": self.rung.level, "rung": self.rung.text(), "sparsity": self.sparsity, "epoch": self.epoch,
                "file": self.file}


@dataclass
class Pool:
    """Every candidate's validation and test probabilities, aligned by sample index.

    ``val`` [M, N, C] and ``test`` [M, T, C] are float32 memory maps (read-only); ``val_true`` [N, M]
    each candidate's probability of the true class (float64), ``val_pred`` / ``test_pred`` [M, N]
    its arg-max class.  :meth:`close` (or ``with``) removes the mapped files."""

    candidates: list[Candidate]
    val: np.ndarray
    test: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    val_true: np.ndarray
    test_true: np.ndarray
    val_pred: np.ndarray
    test_pred: np.ndarray
    class_names: list[str] | None
    sources: list[dict]
    experiments: list[str]
    _workdir: str | None = None
    ids: list[str] = field(init=False)

    def __post_init__(self):
        self.ids = [c.id for c in self.candidates]

    @property
    def size(self) -> int:
        return len(self.candidates)

    def index(self, candidate_id: str) -> int:
        try:
            return self.ids.index(candidate_id)
        except ValueError:
            raise PoolError(f"no candidate {candidate_id!r} in the pool") from None

    def close(self) -> None:
        for name in ("val", "test"):
            m = getattr(self, name)
            if isinstance(m, np.memmap):
                m._mmap.close()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _experiment_label(root: str, taken: set[str]) -> str:
    base = os.path.basename(root.rstrip("/")) or "experiment"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def _trial_info(tree: storage.Tree) -> dict[str, tuple[str, int | None]]:
    """member -> (group, batch size of a batch-sweep group) from the experiment's config; {} without one."""
    from .stacking_run import _saved_config

    cfg = _saved_config(tree)
    return {t.member: (t.group, t.batch_size) for t in cfg.trials()} if cfg is not None else {}


def _file_rungs(table, split: str) -> dict[Rung, tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """rung -> (indices, labels, probs [n, C], info) of one file's rows on one split, each rung at its
    latest epoch, rows sorted by sample index."""
    import pyarrow.compute as pc

    from .predictions import PredictionsError, _columns_np, _row_rungs, _rows_at

    t = table.filter(pc.equal(table["split"], split))
    if t.num_rows == 0:
        return {}
    cols = _columns_np(t)
    out = {}
    for member in sorted(set(cols["member"].tolist())):
        of_member = cols["member"] == member
        for rung in _row_rungs(cols, of_member):
            sel = of_member & _rows_at(cols, rung)
            epoch = int(cols["epoch"][sel].max())
            sel &= cols["epoch"] == epoch
            order = np.argsort(cols["index"][sel], kind="stable")
            idx = cols["index"][sel][order]
            if np.unique(idx).size != idx.size:
                raise PredictionsError(f"member {member!r}: duplicate {split!r} indices at {rung.text()}")
            out[(member, rung)] = (idx, cols["label"][sel][order], cols["probs"][sel][order],
                                   {"model": str(cols["model"][sel][0]), "variant": str(cols["variant"][sel][0]),
                                    "sparsity": round(float(np.mean(cols["sparsity"][sel])), 6), "epoch": epoch})
    return out


class _Split:
    """One split's reference (indices and labels of the first candidate) and its raw probability file."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.fh = open(path, "wb")
        self.index = self.labels = self.ref = None
        self.classes = None
        self.true, self.pred = [], []

    def add(self, cid: str, idx: np.ndarray, labels: np.ndarray, probs: np.ndarray, experiment: str) -> None:
        if self.index is None:
            self.index, self.labels, self.ref, self.classes = idx, labels, (cid, experiment), probs.shape[1]
        else:
            other, other_exp = self.ref
            where = (f"experiments {other_exp} and {experiment}" if other_exp != experiment
                     else f"experiment {experiment}")
            if probs.shape[1] != self.classes:
                raise PoolError(f"{where}: candidate {cid} has {probs.shape[1]} classes, {other} has {self.classes}")
            if idx.size != self.index.size or not np.array_equal(idx, self.index):
                raise PoolError(f"{where}: {cid} and {other} were scored on different {self.name} images "
                                f"({idx.size} vs {self.index.size}, {np.setdiff1d(idx, self.index).size} not shared); "
                                "a pool needs every candidate on the same validation and test images")
            if not np.array_equal(labels, self.labels):
                raise PoolError(f"{where}: {cid} and {other} disagree on {int(np.sum(labels != self.labels))} "
                                f"{self.name} labels; a pool needs the same labelled images")
        p = np.ascontiguousarray(probs, dtype=np.float32)
        self.fh.write(p.tobytes())
        self.true.append(p[np.arange(p.shape[0]), labels].astype(np.float64))
        self.pred.append(np.argmax(p, axis=1).astype(np.int32))

    def finish(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.fh.close()
        probs = np.memmap(self.path, dtype=np.float32, mode="r", shape=(m, self.index.size, self.classes))
        return probs, np.stack(self.true, axis=1), np.stack(self.pred)


def load_pool(experiments: Sequence[str | os.PathLike], *, workdir: str | None = None) -> Pool:
    """Every candidate of ``experiments`` (local paths or URIs): each prediction file is read, checked
    and appended to the memory-mapped split files, one file at a time.  Raises :class:`PoolError`
    (one line) for an unknown experiment, one without predictions, or candidates whose validation or
    test images or labels differ (also between experiments)."""
    from .predictions import prediction_sources, read_predictions

    if not experiments:
        raise PoolError("a pool needs at least one experiment")
    work = tempfile.mkdtemp(prefix="esdbs-pool-", dir=workdir)
    splits = {s: _Split(s, os.path.join(work, f"{s}.f32")) for s in ("val", "test")}
    candidates: list[Candidate] = []
    sources: list[dict] = []
    roots: list[str] = []
    taken: set[str] = set()
    try:
        trees = []
        for exp in experiments:
            tree = storage.Tree(exp)
            if not tree.is_dir():
                raise PoolError(f"{tree.root}: no such experiment directory")
            files = [n for n in tree.listdir("predictions", pattern="*.parquet", kind="file") if not n.startswith(".")]
            if not files:
                raise PoolError(f"{tree.root}: no predictions/*.parquet; is it an esdbs experiment?")
            trees.append((tree, files))
        several = len(trees) > 1
        for tree, files in trees:
            roots.append(tree.root)
            label = _experiment_label(tree.root, taken)
            trials = _trial_info(tree)
            for name in files:
                table = read_predictions(tree.path("predictions", name), filesystem=tree.fs)
                for s in prediction_sources(table):
                    sources.append({**s, "path": tree.uri("predictions", name)})
                val, test = _file_rungs(table, "val"), _file_rungs(table, "test")
                for key in sorted(set(val) & set(test), key=lambda k: (k[0], k[1].order())):
                    member, rung = key
                    (vi, vy, vp, info), (ti, ty, tp, _) = val[key], test[key]
                    cid = f"{label + ':' if several else ''}{member}@{rung.tag()}"
                    group, batch = trials.get(member, (info["variant"], None))
                    splits["val"].add(cid, vi, vy, vp, tree.root)
                    splits["test"].add(cid, ti, ty, tp, tree.root)
                    candidates.append(Candidate(id=cid, experiment=tree.root, member=member, model=info["model"],
                                                variant=info["variant"], group=group, batch_size=batch, rung=rung,
                                                sparsity=info["sparsity"], epoch=info["epoch"],
                                                file=f"predictions/{name}"))
        if not candidates:
            raise PoolError(f"{', '.join(roots)}: no model has both validation and test predictions")
        if len(candidates) < 2:
            raise PoolError(f"{', '.join(roots)}: a pool needs at least 2 candidates, found {candidates[0].id}")
        val, val_true, val_pred = splits["val"].finish(len(candidates))
        test, test_true, test_pred = splits["test"].finish(len(candidates))
    except BaseException:
        for s in splits.values():
            s.fh.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    names = {tuple(n) for n in ((s.get("metadata") or {}).get("class_names") for s in sources) if n}
    class_names = list(next(iter(names))) if len(names) == 1 else None
    return Pool(candidates=candidates, val=val, test=test, y_val=splits["val"].labels.astype(np.int64),
                y_test=splits["test"].labels.astype(np.int64), val_true=val_true, test_true=test_true,
                val_pred=val_pred, test_pred=test_pred, class_names=class_names, sources=sources,
                experiments=roots, _workdir=work)


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Limits on an ensemble's summed member costs: ``costs`` [D, M] (NaN: unknown, never fits),
    ``limits`` [D], ``names`` the D cost kinds ("ms_per_image", "macs")."""

    costs: np.ndarray
    limits: np.ndarray
    names: tuple[str, ...]

    def allowed(self, support: np.ndarray) -> np.ndarray:
        """Which candidates may join an ensemble of boolean ``support`` [M] and keep it within budget
        (its members always may: they are paid for)."""
        used = self.costs[:, support].sum(axis=1)
        with np.errstate(invalid="ignore"):
            fits = np.all(self.costs + used[:, None] <= self.limits[:, None] * (1 + 1e-12), axis=0)
        return support | fits

    def fits(self, members: Sequence[int] | np.ndarray) -> bool:
        used = self.costs[:, np.asarray(members, dtype=np.int64)].sum(axis=1)
        return bool(np.all(used <= self.limits * (1 + 1e-12)))


class _Feasible:
    """The budget a method searches within (everything fits without one)."""

    def __init__(self, budget: Budget | None, m: int):
        self.budget, self.m = budget, m

    def allowed(self, support: np.ndarray) -> np.ndarray:
        return np.ones(self.m, dtype=bool) if self.budget is None else self.budget.allowed(support)

    def fits(self, members) -> bool:
        return True if self.budget is None else self.budget.fits(members)


# --------------------------------------------------------------------------------------------------
# The methods: each fits weights [M] on rows of the validation split
# --------------------------------------------------------------------------------------------------
def _nll_of(s: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(s, EPS))))


def _support_opt(Qf: np.ndarray, S: Sequence[int]) -> tuple[np.ndarray, float]:
    """The exact NLL optimum on support ``S`` (weights over S, its NLL)."""
    S = list(S)
    if len(S) == 1:
        return np.ones(1), _nll_of(Qf[:, S[0]])
    w, info = _nll_opt_q(Qf[:, S])
    return w, info["nll"]


def _dense(S: Sequence[int], wS: np.ndarray, m: int) -> np.ndarray:
    w = np.zeros(m)
    w[list(S)] = wS
    return w


def fit_caruana(Qf: np.ndarray, feas: _Feasible, rounds: int = 50) -> tuple[np.ndarray, dict]:
    """Greedy selection with replacement on NLL, weights of the best round (ties: the earliest)."""
    n, m = Qf.shape
    counts = np.zeros(m, dtype=np.int64)
    running = np.zeros(n)
    best_nll, best, best_round, order = math.inf, None, 0, []
    for t in range(1, rounds + 1):
        allowed = np.flatnonzero(feas.allowed(counts > 0))
        if allowed.size == 0:
            raise PoolError("no candidate fits the budget")
        nll = -np.log((running[:, None] + Qf[:, allowed]) / t).mean(axis=0)
        j = int(np.argmin(nll))
        k = int(allowed[j])
        counts[k] += 1
        running += Qf[:, k]
        order.append(k)
        if nll[j] < best_nll - 1e-12:
            best_nll, best, best_round = float(nll[j]), counts.copy(), t
    return best / best.sum(), {"rounds": rounds, "best_round": best_round, "order": order[:best_round]}


def _swap_search(Qf: np.ndarray, S: list[int], nll: float, k: int, feas: _Feasible,
                 max_passes: int = 8) -> tuple[list[int], float]:
    """Swap one member of ``S`` for an outside candidate while that lowers the NLL optimum (the
    candidates tried per member: the ``_SCREEN`` of steepest descent from the support without it)."""
    m = Qf.shape[1]
    for _ in range(max_passes):
        improved = False
        for i in list(S):
            rest = [j for j in S if j != i]
            if rest:  # descent from the rest's optimum; from nothing: the single candidates' log-likelihood
                w_rest, _ = _support_opt(Qf, rest)
                grad = (Qf / (Qf[:, rest] @ w_rest)[:, None]).mean(axis=0)
            else:
                grad = np.log(Qf).mean(axis=0)
            mask = np.zeros(m, dtype=bool)
            mask[rest] = True
            allowed = feas.allowed(mask) & ~mask
            allowed[i] = False
            cands = np.flatnonzero(allowed)
            for c in cands[np.argsort(-grad[cands], kind="stable")][:_SCREEN]:
                trial = rest + [int(c)]
                if len(trial) > k or not feas.fits(trial):
                    continue
                _, f = _support_opt(Qf, trial)
                if f < nll - 1e-10:
                    S, nll, improved = sorted(trial), f, True
                    break
            if improved:
                break
        if not improved:
            break
    return S, nll


def fit_nll_topk(Qf: np.ndarray, feas: _Feasible, k: int = 5,
                 seed_supports: Sequence[Sequence[int]] = ()) -> tuple[np.ndarray, dict]:
    """The convex NLL optimum with at most ``k`` nonzero weights (see the module docstring)."""
    n, m = Qf.shape
    affordable = np.flatnonzero(feas.allowed(np.zeros(m, dtype=bool)))
    if affordable.size == 0:
        raise PoolError("no candidate fits the budget")
    k = int(min(k, affordable.size))
    supports = sum(math.comb(affordable.size, j) for j in range(1, k + 1)) if feas.budget is not None \
        else math.comb(affordable.size, k)
    if supports <= EXHAUSTIVE_SUPPORTS:
        best_nll, best = math.inf, None
        sizes = range(1, k + 1) if feas.budget is not None else (k,)
        for j in sizes:
            for S in itertools.combinations(affordable.tolist(), j):
                if not feas.fits(S):
                    continue
                wS, f = _support_opt(Qf, S)
                if f < best_nll - 1e-12:
                    best_nll, best = f, (list(S), wS)
        return _dense(best[0], best[1], m), {"k": k, "search": "exhaustive", "supports": supports, "exact": True}
    # greedy forward selection: each step refits the candidates of steepest descent
    singles = -np.log(Qf).mean(axis=0)
    S = [int(affordable[np.argmin(singles[affordable])])]
    nll = float(singles[S[0]])
    while len(S) < k:
        wS, _ = _support_opt(Qf, S)
        grad = (Qf / (Qf[:, S] @ wS)[:, None]).mean(axis=0)
        mask = np.zeros(m, dtype=bool)
        mask[S] = True
        cands = np.flatnonzero(feas.allowed(mask) & ~mask)
        best_f, best_c = nll, None
        for c in cands[np.argsort(-grad[cands], kind="stable")][:_SCREEN]:
            if not feas.fits(S + [int(c)]):
                continue
            _, f = _support_opt(Qf, S + [int(c)])
            if f < best_f - 1e-12:
                best_f, best_c = f, int(c)
        if best_c is None:
            break
        S, nll = sorted(S + [best_c]), best_f
    starts = [("greedy", S, nll)]
    for seed in seed_supports:
        seed = sorted({int(j) for j in seed})
        if 0 < len(seed) <= k and feas.fits(seed):
            starts.append(("seed", seed, _support_opt(Qf, seed)[1]))
    best_nll, best_S, origin = math.inf, None, None
    for name, S0, f0 in starts:
        S1, f1 = _swap_search(Qf, list(S0), f0, k, feas)
        if f1 < best_nll - 1e-12:
            best_nll, best_S, origin = f1, S1, name
    wS, f = _support_opt(Qf, best_S)
    w = _dense(best_S, wS, m)
    s = Qf @ w
    gap = float((Qf / s[:, None]).mean(axis=0).max() - 1.0)  # 0 at the pool's uncapped optimum
    exact = gap <= _GAP_TOL and feas.budget is None
    return w, {"k": k, "search": "greedy+swap", "from": origin, "supports": supports, "pool_gap": gap, "exact": exact}


def fit_equal_topk(Qf: np.ndarray, feas: _Feasible, k: int = 5) -> tuple[np.ndarray, dict]:
    """Equal weights over the ``k`` candidates of lowest NLL that fit the budget (ties: lower index)."""
    m = Qf.shape[1]
    nll = -np.log(Qf).mean(axis=0)
    chosen: list[int] = []
    for j in np.argsort(nll, kind="stable"):
        if len(chosen) == k:
            break
        if feas.fits(chosen + [int(j)]):
            chosen.append(int(j))
    if not chosen:
        raise PoolError("no candidate fits the budget")
    return _dense(chosen, np.full(len(chosen), 1.0 / len(chosen)), m), {"k": len(chosen)}


def fit_best_single(Qf: np.ndarray, correct: np.ndarray, feas: _Feasible) -> tuple[np.ndarray, dict]:
    """The affordable candidate of highest accuracy on the fitting rows, ties to lower NLL, then index."""
    m = Qf.shape[1]
    ok = np.flatnonzero(feas.allowed(np.zeros(m, dtype=bool)))
    if ok.size == 0:
        raise PoolError("no candidate fits the budget")
    hits = correct[ok].sum(axis=1)
    nll = -np.log(Qf[:, ok]).mean(axis=0)
    top = np.flatnonzero(hits == hits.max())
    j = int(ok[top[np.argmin(nll[top])]])
    return _dense([j], np.ones(1), m), {}


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def ensemble_probs(P: np.ndarray, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``sum_k w_k P[k]`` in float64 over the support only (rows of a memory map are read on demand)."""
    out = None
    for k in np.flatnonzero(w > 0):
        block = (P[k] if rows is None else P[k][rows]).astype(np.float64)
        out = w[k] * block if out is None else out + w[k] * block
    return out


def _split_metrics(P, true, y, w) -> dict[str, float]:
    acc = float(np.mean(np.argmax(ensemble_probs(P, w), axis=1) == y))
    return {"accuracy": acc, "nll": _nll_of(true @ w)}


def ensemble_metrics(pool: Pool, w: np.ndarray) -> dict[str, float]:
    """Validation and test accuracy and NLL of the ensemble ``w`` [M] (as :func:`stacking.evaluate`)."""
    v = _split_metrics(pool.val, pool.val_true, pool.y_val, w)
    t = _split_metrics(pool.test, pool.test_true, pool.y_test, w)
    return {"val_accuracy": v["accuracy"], "val_nll": v["nll"], "test_accuracy": t["accuracy"], "test_nll": t["nll"]}


@dataclass(frozen=True)
class MethodResult:
    """One method's ensemble: weights by candidate id (nonzero only), its figures and its cost."""

    method: str
    weights: dict[str, float]
    val_accuracy: float
    val_nll: float
    cv_accuracy: float | None
    cv_nll: float | None
    cv_fold_nll: list[float] | None
    test_accuracy: float
    test_nll: float
    ms_per_image: float | None
    macs: float | None
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.weights)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("weights", "val_accuracy", "val_nll", "cv_accuracy", "cv_nll",
                                           "cv_fold_nll", "test_accuracy", "test_nll", "ms_per_image", "macs",
                                           "seconds")}
        return {"members": self.size, **d, **self.info}


@dataclass(frozen=True)
class PoolSelection:
    """What :func:`select` chose, and every method's result."""

    methods: dict[str, MethodResult]
    chosen: str
    chosen_rule: str
    folds: int
    seed: int
    k: int
    rounds: int
    budget: dict | None

    @property
    def ensemble(self) -> MethodResult:
        return self.methods[self.chosen]


def _cost_of(costs: Mapping[str, np.ndarray] | None, w: np.ndarray, name: str) -> float | None:
    if not costs or name not in costs:
        return None
    c = costs[name][w > 0]
    return None if np.any(np.isnan(c)) else float(c.sum())


def _fitter(method: str, pool: Pool, feas: _Feasible, *, k: int, rounds: int,
            seed_supports: Sequence[Sequence[int]]) -> Callable[[np.ndarray], tuple[np.ndarray, dict]]:
    Qf_all = np.maximum(pool.val_true, EPS)

    def fit(rows: np.ndarray) -> tuple[np.ndarray, dict]:
        Qf = Qf_all[rows]
        if method == "caruana":
            return fit_caruana(Qf, feas, rounds)
        if method == "nll_topk":
            return fit_nll_topk(Qf, feas, k, seed_supports)
        if method == "equal_topk":
            return fit_equal_topk(Qf, feas, k)
        if method == "best_single":
            return fit_best_single(Qf, pool.val_pred[:, rows] == pool.y_val[rows][None, :], feas)
        raise PoolError(f"unknown pool method {method!r}; choose from {', '.join(POOL_METHODS)}")

    return fit


def fit_method(pool: Pool, method: str, *, budget: Budget | None = None, k: int = 5, rounds: int = 50,
               folds: np.ndarray | None = None, seed_supports: Sequence[Sequence[int]] = (),
               costs: Mapping[str, np.ndarray] | None = None) -> MethodResult:
    """Fit ``method`` on the whole validation split (and, with ``folds``, its K-fold estimate)."""
    feas = _Feasible(budget, pool.size)
    fit = _fitter(method, pool, feas, k=k, rounds=rounds, seed_supports=seed_supports)
    t0 = time.perf_counter()
    w, info = fit(np.arange(pool.y_val.size))
    seconds = time.perf_counter() - t0
    cv = {"cv_accuracy": None, "cv_nll": None, "cv_fold_nll": None}
    if folds is not None:
        cv = cross_validate(lambda rows: fit(rows)[0], lambda wf, rows: pool.val_true[rows] @ wf,
                            lambda wf, rows: np.argmax(ensemble_probs(pool.val, wf, rows), axis=1), pool.y_val, folds)
    info = {k_: v for k_, v in info.items() if k_ != "order"} | (
        {"order": [pool.ids[j] for j in info["order"]]} if "order" in info else {})
    return MethodResult(method=method, weights={pool.ids[j]: float(w[j]) for j in np.flatnonzero(w > 0)},
                        **ensemble_metrics(pool, w), **cv, ms_per_image=_cost_of(costs, w, "ms_per_image"),
                        macs=_cost_of(costs, w, "macs"), seconds=seconds, info=info)


def select(pool: Pool, *, methods: Sequence[str] = POOL_METHODS, k: int = 5, rounds: int = 50,
           folds: int = CV_FOLDS, seed: int = 0, choose: str = "cv", budget: Budget | None = None,
           seed_supports: Sequence[Sequence[int]] = (), costs: Mapping[str, np.ndarray] | None = None
           ) -> PoolSelection:
    """Fit every method in ``methods`` on the pool's validation split, with its ``folds``-fold
    cross-validated estimate, and choose one by ``choose``: ``"cv"`` (lowest CV NLL), ``"best_val"``
    (highest validation accuracy, ties to lower NLL) or a method's name.  ``costs`` ({"ms_per_image",
    "macs"}: [M] arrays) give each ensemble its cost; ``budget`` limits it."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in POOL_METHODS]
    if unknown or not methods:
        raise PoolError(f"unknown pool method(s) {unknown}; choose from {', '.join(POOL_METHODS)}")
    if not 1 <= int(k) <= 1000 or not 1 <= int(rounds) <= 100_000:
        raise PoolError(f"k={k} and rounds={rounds}: k in [1, 1000], rounds in [1, 100000]")
    if choose not in ("cv", "best_val", *methods):
        raise PoolError(f"choose={choose!r}: cv, best_val or one of {', '.join(methods)}")
    n = pool.y_val.size
    if folds and n < 2 * int(folds):
        raise PoolError(f"{folds}-fold cross-validation needs at least {2 * int(folds)} validation images, got {n}")
    fold = cv_folds_of(pool.y_val, int(folds), seed) if folds else None
    results = {m: fit_method(pool, m, budget=budget, k=int(k), rounds=int(rounds), folds=fold,
                             seed_supports=seed_supports, costs=costs) for m in methods}
    if choose == "cv":
        chosen = choose_by_cv({m: r.to_dict() for m, r in results.items()}, methods)
        if chosen is None:
            raise PoolError("choose='cv' needs the cross-validated estimate: folds >= 2")
        rule = (f"cv: lowest {folds}-fold cross-validated NLL inside the validation split (weights fitted on "
                f"{int(folds) - 1} folds, scored on the held-out one), ties to higher CV accuracy")
    elif choose == "best_val":
        chosen = min(methods, key=lambda m: (-results[m].val_accuracy, results[m].val_nll, methods.index(m)))
        rule = "best_val: highest validation accuracy, ties to lower validation NLL"
    else:
        chosen, rule = choose, f"fixed: {choose}"
    return PoolSelection(methods=results, chosen=chosen, chosen_rule=rule, folds=int(folds or 0), seed=int(seed),
                         k=int(k), rounds=int(rounds),
                         budget=None if budget is None else dict(zip(budget.names, map(float, budget.limits))))


# --------------------------------------------------------------------------------------------------
# The experiments' own stacks, as ensembles of the pool
# --------------------------------------------------------------------------------------------------
def reference_stacks(pool: Pool, *, folds: np.ndarray | None = None, seed: int = 0,
                     costs: Mapping[str, np.ndarray] | None = None) -> dict[str, MethodResult]:
    """Each experiment's own stacks (its ``stacking*.json``: the run's stacking stage) as ensembles of
    the pool: the stack's members at its rung, its chosen weights, its figures recomputed on the pool's
    arrays and its method cross-validated like the pool's (refitted on the stack's members per fold).
    Keyed by ``group`` (``<label>:<group>`` with several experiments)."""
    from .layout import ExperimentLayout

    out: dict[str, MethodResult] = {}
    by_key = {(c.experiment, c.member, c.rung): j for j, c in enumerate(pool.candidates)}
    several = len(pool.experiments) > 1
    for root in pool.experiments:
        tree = storage.Tree(root)
        for name in sorted(tree.listdir(pattern=ExperimentLayout.STACKING_GLOB, kind="file")):
            try:
                st = tree.read_json(name)
                names = list(st["member_names"])
                rungs = [Rung.of(st["rungs"][n]) for n in names]
                chosen = st["chosen"]
                weights = st["methods"][chosen]["weights"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a stacking file this code can map: the pool goes on without it
            idx = [by_key.get((root, n, r)) for n, r in zip(names, rungs)]
            if any(i is None for i in idx):
                continue
            w = np.zeros(pool.size)
            for i, n in zip(idx, names):
                w[i] = float(weights[n])
            if w.sum() <= 0:
                continue
            w /= w.sum()
            cv = {"cv_accuracy": None, "cv_nll": None, "cv_fold_nll": None}
            if folds is not None and chosen in STACK_FIT:
                Pv = np.stack([np.asarray(pool.val[i]) for i in idx])
                cv = _stack_cv(chosen, Pv, pool.y_val, folds, _FitContext(seed=seed))
            group = st.get("variant") or name
            key = f"{os.path.basename(root.rstrip('/'))}:{group}" if several else group
            out[key] = MethodResult(method=chosen, weights={pool.ids[i]: float(w[i]) for i in idx if w[i] > 0},
                                    **ensemble_metrics(pool, w), **cv, ms_per_image=_cost_of(costs, w, "ms_per_image"),
                                    macs=_cost_of(costs, w, "macs"), seconds=0.0,
                                    info={"file": tree.uri(name), "stack_members": [pool.ids[i] for i in idx],
                                          "variant": st.get("variant"), "file_test_accuracy":
                                          (st["methods"][chosen] or {}).get("test_accuracy")})
    return out


def support_of(pool: Pool, result: MethodResult) -> list[int]:
    return [pool.index(c) for c in result.weights]
