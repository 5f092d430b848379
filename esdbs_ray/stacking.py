"""Weighted-average stacking of the members' softmax outputs (paper section 3.1, spec section 5).

The ensemble predicts ``p = sum_i w_i p_i`` with ``w`` on the probability simplex
(``w_i >= 0``, ``sum_i w_i = 1``).  The weights are fitted on the **validation** split (held out from
the training set) and never see the test split, which is only reported.

Methods (each returns a weight vector on the simplex):

``nll_optimal``
    The exact minimiser of the ensemble's validation negative log-likelihood (convex; see
    :func:`nll_optimal`), certified by its Frank-Wolfe duality gap.
``accuracy_search``
    Direct search of validation accuracy (a piecewise-constant function of ``w``): a simplex grid for
    K <= 3 or seeded Dirichlet samples for K > 3, then a pattern search, all started from the NLL
    optimum; ties go to the lower NLL.  Deterministic given ``seed``.
``tune_accuracy_search``
    The same objective as a Ray Tune search (one trial per weight vector).
``equal``, ``best_single``, ``caruana`` (Caruana et al. 2004 greedy ensemble selection with
replacement, NLL criterion; ``caruana_accuracy`` uses the accuracy criterion)
    Baselines.

:func:`stack` runs the methods on prediction arrays; :func:`esdbs_ray.stacking_run.stack_experiment`
reads ``<experiment>/predictions/*.parquet`` (:mod:`esdbs_ray.predictions`), stacks, and writes
``<experiment>/stacking.json``.  No Ray here: the Tune search is an adapter (``stacking_tune.py``).

Which weights the ensemble uses (``chosen``) is decided on validation data only, by the ``choose``
argument: ``"cv"`` (the config's and the command line's default): the method with the lowest
cross-validated NLL (below); ``"nll_optimal"`` (this function's default: the exact, smooth optimum),
``"accuracy_search"``, any other computed method, or ``"best_val"``: the computed method with the
highest validation accuracy, ties to the lower validation NLL, then to the earlier method in
``methods``.  Test metrics are computed after the weights are fixed and never feed back.

**Cross-validation inside the validation split** (spec section 5).  A method's validation score is
measured on the samples that fitted its weights, so it flatters the methods that fit most (a few
thousand validation images over-fit three weights measurably).  Every method is therefore also scored
by K-fold cross-validation (:func:`cv_folds_of`: stratified by label, seeded): its weights fitted on K-1
folds, the ensemble scored on the held-out fold; the held-out predictions of all K folds together give
``cv_accuracy`` and ``cv_nll`` over the whole validation split.  The weights the ensemble uses are
still fitted on all of it; the CV estimate judges the *method*.

Probabilities are floored at ``EPS = 1e-12`` inside logarithms, so an NLL is always finite.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from esdbs_ray.config import STACK_METHODS
from esdbs_ray.errors import UserError

__all__ = [
    "EPS",
    "DEFAULT_METHODS",
    "ALL_METHODS",
    "METHODS",
    "evaluate",
    "nll_optimal",
    "accuracy_search",
    "equal_weights",
    "best_single",
    "caruana_greedy",
    "stack",
    "format_stacking_table",
    "per_class_accuracy",
    "CV_FOLDS",
    "cv_folds_of",
    "cross_validate",
    "choose_by_cv",
]

EPS = 1e-12
CV_FOLDS = 5  # folds of the cross-validated estimate inside the validation split
DEFAULT_METHODS = STACK_METHODS  # what a run stacks with unless its config says otherwise
_SUM_TOL = 1e-6


# ----------------------------------------------------------------------------------------------------
# input checks and small helpers
# ----------------------------------------------------------------------------------------------------
def _check_py(P: Any, y: Any, what: str = "validation", names: Sequence[str] | None = None):
    P = np.asarray(P)
    if P.ndim != 3:
        raise UserError(f"{what} probabilities must have shape [K, N, C], got {P.shape}")
    K, N, C = P.shape
    if K < 2:
        raise UserError(f"stacking needs at least 2 members, got K={K}")
    if N < 1 or C < 2:
        raise UserError(f"{what} probabilities need N >= 1 samples and C >= 2 classes, got {P.shape}")
    finite = np.isfinite(P).all(axis=(1, 2))
    if not finite.all():
        bad = [names[k] if names else k for k in np.flatnonzero(~finite)]
        raise UserError(f"{what} probabilities of member(s) {bad} contain NaN or inf")
    if P.min() < 0:
        raise UserError(f"{what} probabilities contain negative values")
    y = np.asarray(y)
    if y.shape != (N,):
        raise UserError(f"{what} labels must have shape ({N},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{what} labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= C:
        raise UserError(f"{what} labels must lie in [0, {C}), got range [{y.min()}, {y.max()}]")
    return P, y.astype(np.int64)


def _check_weights(w: Any, K: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape != (K,):
        raise UserError(f"weights must have {K} entries, got {w.shape[0]}")
    if not np.all(np.isfinite(w)) or w.min() < -1e-12 or abs(w.sum() - 1.0) > _SUM_TOL:
        raise UserError(f"weights must lie on the simplex (>= 0, sum 1), got {w.tolist()}")
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def _true_class_probs(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Q[n, k] = max(P[k, n, y_n], EPS)`` in float64."""
    Q = P[:, np.arange(P.shape[1]), y].T.astype(np.float64)
    return np.maximum(Q, EPS, out=Q)


def _nll_batch(Q: np.ndarray, W: np.ndarray, chunk: int = 256) -> np.ndarray:
    """NLL of every row of ``W`` [M, K]."""
    out = np.empty(W.shape[0])
    for a in range(0, W.shape[0], chunk):
        S = Q @ W[a : a + chunk].T
        out[a : a + chunk] = -np.log(np.maximum(S, EPS)).mean(axis=0)
    return out


def evaluate(weights: Any, P: Any, y: Any) -> dict[str, float]:
    """``{"accuracy", "nll"}`` of the ensemble ``sum_k weights[k] * P[k]`` on labels ``y``.

    ``P`` is [K, N, C] softmax outputs; ``weights`` a K-vector on the simplex.  Ties in the arg-max
    go to the lowest class index (``numpy.argmax``).
    """
    P = np.asarray(P)
    if P.ndim != 3:
        raise UserError(f"probabilities must have shape [K, N, C], got {P.shape}")
    y = np.asarray(y).astype(np.int64)
    w = _check_weights(weights, P.shape[0])
    p = np.tensordot(w, P, axes=1)  # float64 [N, C]
    acc = float(np.mean(np.argmax(p, axis=1) == y))
    nll = float(-np.mean(np.log(np.maximum(p[np.arange(p.shape[0]), y], EPS))))
    return {"accuracy": acc, "nll": nll}


# ----------------------------------------------------------------------------------------------------
# NLL-optimal weights
# ----------------------------------------------------------------------------------------------------
def _nll_opt_q(Q: np.ndarray, tol: float = 1e-10, max_iter: int = 200) -> tuple[np.ndarray, dict]:
    N, K = Q.shape
    w = np.full(K, 1.0 / K)
    free = np.ones(K, dtype=bool)
    gap = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        s = Q @ w
        R = Q / s[:, None]
        r = R.mean(axis=0)  # = -gradient; r @ w == 1 exactly in exact arithmetic
        g = -r
        f = float(-np.mean(np.log(s)))
        gap = float(r.max() - r @ w)  # Frank-Wolfe gap >= f(w) - f*
        if gap <= tol:
            break
        F = np.flatnonzero(free)
        step_done = False
        if F.size > 1:
            # equality-constrained Newton step on the face {w_k = 0 for k not in F}
            RF = R[:, F]
            H = RF.T @ RF / N
            m = F.size
            A = np.zeros((m + 1, m + 1))
            A[:m, :m] = H
            A[:m, m] = 1.0
            A[m, :m] = 1.0
            rhs = np.concatenate([-g[F], [0.0]])
            dF = np.linalg.lstsq(A, rhs, rcond=None)[0][:m]
            dF -= dF.mean()  # stay exactly on sum(w) = 1
            slope = float(g[F] @ dF)
            if slope < -1e-15:
                d = np.zeros(K)
                d[F] = dF
                neg = d < 0
                ratio = np.full(K, math.inf)
                ratio[neg] = -w[neg] / d[neg]
                amax = float(ratio.min())
                a = min(1.0, amax)
                while a > 1e-12:
                    wn = w + a * d
                    if a == amax:  # the blocking member(s) leave the face exactly
                        wn[ratio <= amax * (1 + 1e-12)] = 0.0
                    wn = np.clip(wn, 0.0, None)
                    wn /= wn.sum()
                    fn = float(-np.mean(np.log(Q @ wn)))
                    if fn <= f + 1e-4 * a * slope:
                        w, step_done = wn, True
                        break
                    a *= 0.5
                if step_done:
                    free = w > 0
                    continue
        # Frank-Wolfe step towards the best vertex, exact line search (phi is convex in alpha)
        k = int(np.argmax(r))
        qv = Q[:, k] - s
        if np.mean(qv / Q[:, k]) >= 0:  # phi'(1) <= 0: the vertex itself is best on the segment
            alpha = 1.0
        else:
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if -np.mean(qv / (s + mid * qv)) < 0:
                    lo = mid
                else:
                    hi = mid
            alpha = lo
        if alpha <= 0.0:
            break
        w = (1 - alpha) * w
        w[k] += alpha
        w /= w.sum()
        free = w > 0
    s = Q @ w
    r = (Q / s[:, None]).mean(axis=0)
    gap = float(r.max() - r @ w)
    return w, {"iterations": it, "duality_gap": gap, "nll": float(-np.mean(np.log(s)))}


def nll_optimal(P_val: Any, y_val: Any, *, tol: float = 1e-10, max_iter: int = 200, return_info: bool = False):
    """Weights on the simplex minimising the ensemble's validation NLL ``-mean_n log(sum_k w_k p_kn[y_n])``.

    **Convexity.**  For each sample, ``w -> sum_k w_k p_kn[y_n]`` is linear in ``w`` and ``-log`` is
    convex, so each term (a convex function of an affine map) is convex in ``w``; a mean of convex
    functions is convex, and the simplex is a convex set.  So every local minimum is global and
    the optimum value is exact (the minimiser is unique unless members are linearly dependent on the
    true-class probabilities).

    **Algorithm.**  Active-set Newton: equality-constrained Newton steps (analytic gradient
    ``-mean_n q_n / s_n`` and Hessian ``mean_n q_n q_n^T / s_n^2``, with ``s_n = q_n . w``) on the face of
    the simplex spanned by the members with positive weight, with a backtracking line search that drops
    a member when its weight reaches 0; when the face is solved, a Frank-Wolfe step with exact line
    search towards the vertex of steepest descent lets a member back in.  It stops when the
    Frank-Wolfe duality gap ``max_k mean_n(q_nk / s_n) - 1``, an upper bound on ``NLL(w) - NLL*``, is
    below ``tol``.  K=3, N=10,000 takes about a millisecond.

    ``return_info`` adds ``{"iterations", "duality_gap", "nll"}``.
    """
    P, y = _check_py(P_val, y_val)
    w, info = _nll_opt_q(_true_class_probs(P, y), tol=tol, max_iter=max_iter)
    return (w, info) if return_info else w


# ----------------------------------------------------------------------------------------------------
# accuracy search
# ----------------------------------------------------------------------------------------------------
class _AccuracyOracle:
    """Counts correct validation predictions for many weight vectors at once.

    Sample n is correct for ``w`` iff for every class c != y_n, ``w . D[:, n, c] > 0`` (c < y_n) or
    ``>= 0`` (c > y_n), with ``D[k, n, c] = P[k, n, y_n] - P[k, n, c]`` (numpy's first-index arg-max
    rule).  Since ``w . D`` lies between ``min_k D`` and ``max_k D`` on the simplex, most samples are
    right (or wrong) for every ``w``; only the *contested* (sample, class) pairs are kept, and of those
    only the Pareto-minimal ones (a pair whose margins are componentwise >= another pair's of the same
    sample is implied by it).  Exact ties may be judged differently from :func:`evaluate` in degenerate
    cases; reported metrics always come from :func:`evaluate`.
    """

    def __init__(self, P: np.ndarray, y: np.ndarray):
        K, N, C = P.shape
        Py = P[:, np.arange(N), y].astype(np.float64)
        D = Py[:, :, None] - P.astype(np.float64)  # [K, N, C]
        strict = np.arange(C)[None, :] < y[:, None]  # [N, C]
        not_y = np.arange(C)[None, :] != y[:, None]
        dmin, dmax = D.min(axis=0), D.max(axis=0)
        always_ok = np.where(strict, dmin > 0, dmin >= 0) | ~not_y
        never_ok = np.where(strict, dmax <= 0, dmax < 0) & not_y
        wrong = never_ok.any(axis=1)
        right = always_ok.all(axis=1) & ~wrong
        self.base = int(right.sum())
        contested = ~(right | wrong)
        self.n_contested = int(contested.sum())
        self.N = N
        rows = np.flatnonzero(contested)
        pair = ~always_ok[rows]  # [Nc, C] contested pairs of contested samples
        L = int(pair.sum(axis=1).max()) if rows.size else 0
        # pad each sample's contested pairs to L slots, sorted so that real pairs come first
        order = np.argsort(~pair, axis=1, kind="stable")[:, :L]  # [Nc, L] class ids
        valid = np.take_along_axis(pair, order, axis=1)
        Dp = np.moveaxis(D[:, rows, :], 0, -1)  # [Nc, C, K]
        Dp = np.take_along_axis(Dp, order[:, :, None], axis=1)  # [Nc, L, K]
        keep = valid.copy()
        chunk = max(1, 4_000_000 // max(1, L * L * K))
        for a in range(0, rows.size, chunk):
            d = Dp[a : a + chunk]
            v = valid[a : a + chunk]
            le = (d[:, None, :, :] <= d[:, :, None, :]).all(-1)  # le[n, i, j]: pair j <= pair i
            lt = (d[:, None, :, :] < d[:, :, None, :]).any(-1)
            j_first = np.arange(L)[None, :] < np.arange(L)[:, None]  # j < i: breaks exact duplicates
            dominated = (le & (lt | j_first[None]) & v[:, None, :]).any(-1)
            keep[a : a + chunk] &= ~dominated
        # bucket the samples by their number of kept pairs L: bucket L holds D as [K, L * n_L] (slot-major),
        # so "all pairs of a sample are satisfied" is a cheap .all() over a small axis
        n_keep = keep.sum(axis=1)
        slot_order = np.argsort(~keep, axis=1, kind="stable")  # kept slots first
        self.buckets = []
        for L_b in np.unique(n_keep):
            sel = np.flatnonzero(n_keep == L_b)
            sl = slot_order[sel, :L_b]  # [n_L, L_b]
            d = np.take_along_axis(Dp[sel], sl[:, :, None], axis=1)  # [n_L, L_b, K]
            cls = np.take_along_axis(order[sel], sl, axis=1)  # [n_L, L_b]
            st = strict[rows[sel][:, None], cls]
            # ok iff S > thr: thr 0 for strict pairs, the most negative subnormal for non-strict (S >= 0)
            thr = np.where(st, 0.0, -5e-324)
            Dm = np.ascontiguousarray(np.transpose(d, (2, 1, 0)).reshape(K, -1))  # [K, L_b * n_L]
            self.buckets.append((int(L_b), sel.size, Dm, np.ascontiguousarray(thr.T.reshape(-1))))
        self.n_pairs = int(n_keep.sum())

    def counts(self, W: np.ndarray, chunk: int | None = None) -> np.ndarray:
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        if chunk is None:  # keep the [chunk, L * n_L] margin block in cache (10x faster than large blocks)
            widest = max((b[2].shape[1] for b in self.buckets), default=1)
            chunk = int(np.clip(2**20 // (8 * widest), 8, 256))
        out = np.full(W.shape[0], self.base, dtype=np.int64)
        for a in range(0, W.shape[0], chunk):
            Wc = W[a : a + chunk]
            for L_b, n_L, Dm, thr in self.buckets:
                ok = (Wc @ Dm) > thr  # [m, L_b * n_L]
                if L_b > 1:
                    ok = ok.reshape(Wc.shape[0], L_b, n_L).all(axis=1)
                out[a : a + chunk] += ok.sum(axis=1)
        return out


def _simplex_grid(K: int, steps: int) -> np.ndarray:
    if K == 2:
        a = np.arange(steps + 1) / steps
        return np.stack([a, 1 - a], axis=1)
    pts = [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.asarray(pts, dtype=np.float64) / steps


def _best_lex(counts: np.ndarray, nlls: np.ndarray) -> int:
    """Index of the highest count, ties to the lowest NLL, then to the first."""
    top = np.flatnonzero(counts == counts.max())
    return int(top[np.argmin(nlls[top])])


def accuracy_search(
    P_val: Any,
    y_val: Any,
    *,
    seed: int = 0,
    init: Any = None,
    grid_steps: int | None = None,
    n_random: int | None = None,
    max_moves: int = 400,
    return_info: bool = False,
):
    """Weights on the simplex maximising validation accuracy; ties go to the lower validation NLL.

    Accuracy is piecewise constant in ``w``, so it is searched directly: candidates are ``init``
    (default: the NLL optimum), equal weights, every single member, and a simplex grid of step
    ``1/grid_steps`` (K <= 3; default 200 for K=2, 60 for K=3) or ``n_random`` seeded Dirichlet samples
    (K > 3; default 3000, half uniform on the simplex, half concentrated around ``init``); the best
    one is then refined by a pattern search that moves weight between pairs of members with shrinking
    steps (0.05 down to 0.0005), accepting a move when it raises accuracy or keeps it and lowers the
    NLL.  Deterministic given ``seed``.  ``return_info`` adds ``{"candidates", "contested_samples"}``.
    """
    P, y = _check_py(P_val, y_val)
    K = P.shape[0]
    Q = _true_class_probs(P, y)
    oracle = _AccuracyOracle(P, y)
    rng = np.random.default_rng(seed)
    w0 = _check_weights(init, K) if init is not None else _nll_opt_q(Q)[0]
    cands = [w0[None, :], np.full((1, K), 1.0 / K), np.eye(K)]
    if K <= 3:
        cands.append(_simplex_grid(K, grid_steps or (200 if K == 2 else 60)))
    else:
        n = n_random or 3000
        cands.append(rng.dirichlet(np.ones(K), size=n - n // 2))
        cands.append(rng.dirichlet(50.0 * w0 + 0.5, size=n // 2))
    W = np.concatenate(cands)
    counts = oracle.counts(W)
    top = np.flatnonzero(counts == counts.max())
    if top.size > 2000:  # NLL tie-break among a large plateau: keep the init and a seeded subset
        keep = rng.choice(top, size=2000, replace=False)
        top = np.unique(np.r_[keep, top[top == 0]])
    nlls = _nll_batch(Q, W[top])
    i = int(top[np.argmin(nlls)])
    w, best_c, best_nll = W[i].copy(), int(counts[i]), float(nlls.min())
    n_evals = W.shape[0]

    # pattern search: move mass delta from member j to member k
    pairs = [(j, k) for j in range(K) for k in range(K) if j != k]
    moves = 0
    for delta in (0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005):
        while moves < max_moves:
            moves += 1
            C = np.repeat(w[None, :], len(pairs), axis=0)
            for r, (j, k) in enumerate(pairs):
                dm = min(delta, w[j])
                C[r, j] -= dm
                C[r, k] += dm
            C = np.clip(C, 0, None)
            C /= C.sum(axis=1, keepdims=True)
            cc = oracle.counts(C)
            cn = _nll_batch(Q, C)
            n_evals += C.shape[0]
            b = _best_lex(cc, cn)
            if cc[b] > best_c or (cc[b] == best_c and cn[b] < best_nll - 1e-12):
                w, best_c, best_nll = C[b].copy(), int(cc[b]), float(cn[b])
            else:
                break
    w = np.clip(w, 0, None)
    w /= w.sum()
    # final decision with the exact evaluate() among the search result and the guaranteed candidates,
    # so the result is never worse than the NLL optimum or the best single member, even on exact ties
    finals = [w, w0, *np.eye(K)]
    scores = [evaluate(c, P, y) for c in finals]
    b = _best_lex(np.array([round(sc["accuracy"] * y.size) for sc in scores]), np.array([sc["nll"] for sc in scores]))
    w = finals[b]
    info = {"candidates": int(n_evals), "contested_samples": oracle.n_contested,
            "val_correct": int(round(scores[b]["accuracy"] * y.size))}
    return (w, info) if return_info else w


# ----------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------
def equal_weights(P_val: Any, y_val: Any = None) -> np.ndarray:
    """``1/K`` for every member."""
    K = np.asarray(P_val).shape[0]
    if K < 2:
        raise UserError(f"stacking needs at least 2 members, got K={K}")
    return np.full(K, 1.0 / K)


def best_single(P_val: Any, y_val: Any) -> np.ndarray:
    """The vertex of the member with the best validation accuracy (ties: lower NLL, then lower index)."""
    P, y = _check_py(P_val, y_val)
    K = P.shape[0]
    correct = (np.argmax(P, axis=2) == y[None, :]).sum(axis=1)
    nlls = -np.log(_true_class_probs(P, y)).mean(axis=0)
    w = np.zeros(K)
    w[_best_lex(correct, nlls)] = 1.0
    return w


def caruana_greedy(P_val: Any, y_val: Any, rounds: int = 50, metric: str = "nll", return_info: bool = False):
    """Caruana et al. (2004) ensemble selection with replacement; weights = counts / rounds.

    Starting from the empty ensemble, each round adds (with replacement) the member whose addition
    gives the best validation ``metric`` for the running average -- ``"nll"`` (lower is better, ties
    to the lower index) or ``"accuracy"`` (ties to the lower NLL, then the lower index) -- as in
    auto-sklearn's and AutoGluon's ``EnsembleSelection`` (without their random tie-breaking, so the
    result is deterministic).  ``return_info`` adds ``{"order": [member index per round]}``.
    """
    P, y = _check_py(P_val, y_val)
    if metric not in ("nll", "accuracy"):
        raise UserError(f"metric must be 'nll' or 'accuracy', got {metric!r}")
    if int(rounds) < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")
    K, N, _ = P.shape
    Q = _true_class_probs(P, y)
    counts = np.zeros(K, dtype=np.int64)
    Sq = np.zeros(N)
    S = np.zeros(P.shape[1:]) if metric == "accuracy" else None
    order = []
    for t in range(1, int(rounds) + 1):
        nll = -np.log((Sq[:, None] + Q) / t).mean(axis=0)
        if metric == "nll":
            k = int(np.argmin(nll))
        else:
            correct = np.array([np.sum(np.argmax(S + P[j], axis=1) == y) for j in range(K)])
            k = _best_lex(correct, nll)
            S += P[k]
        counts[k] += 1
        Sq += Q[:, k]
        order.append(k)
    w = counts / float(rounds)
    return (w, {"order": order}) if return_info else w


# ----------------------------------------------------------------------------------------------------
# the methods, by name
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FitContext:
    """What a method may use besides the validation predictions."""

    seed: int = 0
    init: np.ndarray | None = None  # the NLL optimum, once computed: the searches start from it
    tune_samples: int = 0
    storage_path: Any = None
    caruana_rounds: int = 50
    ray_init_kwargs: Mapping[str, Any] | None = None


# name -> fit(P_val, y_val, ctx) -> (weights, method-specific info for the stacking JSON)
METHODS: dict[str, Callable[[np.ndarray, np.ndarray, _FitContext], tuple[np.ndarray, dict]]] = {}


def _method(name: str):
    def register(fit):
        METHODS[name] = fit
        return fit

    return register


@_method("nll_optimal")
def _fit_nll_optimal(P, y, ctx):
    w, info = nll_optimal(P, y, return_info=True)
    return w, {"duality_gap": info["duality_gap"], "iterations": info["iterations"]}


@_method("accuracy_search")
def _fit_accuracy_search(P, y, ctx):
    w, info = accuracy_search(P, y, seed=ctx.seed, init=ctx.init, return_info=True)
    return w, {"candidates": info["candidates"], "seeded_from": "nll_optimal"}


@_method("equal")
def _fit_equal(P, y, ctx):
    return equal_weights(P), {}


@_method("best_single")
def _fit_best_single(P, y, ctx):
    return best_single(P, y), {}


@_method("caruana")
def _fit_caruana(P, y, ctx):
    return caruana_greedy(P, y, rounds=ctx.caruana_rounds, metric="nll"), {"rounds": ctx.caruana_rounds, "metric": "nll"}


@_method("caruana_accuracy")
def _fit_caruana_accuracy(P, y, ctx):
    w = caruana_greedy(P, y, rounds=ctx.caruana_rounds, metric="accuracy")
    return w, {"rounds": ctx.caruana_rounds, "metric": "accuracy"}


# "tune_accuracy_search": registered by esdbs_ray.stacking_tune, the Tune adapter (this module never
# imports Ray); esdbs_ray.stacking_run, which stacks experiments, imports it.
TUNE_METHOD = "tune_accuracy_search"
ALL_METHODS = (*METHODS, TUNE_METHOD)


# ----------------------------------------------------------------------------------------------------
# cross-validation inside the validation split
# ----------------------------------------------------------------------------------------------------
def cv_folds_of(y: Any, folds: int = CV_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold id in ``[0, folds)`` of every sample: each class's samples in a seeded random order dealt
    round the folds, each class starting where the previous one stopped, so every fold holds each class
    in proportion and the fold sizes differ by at most one."""
    y = np.asarray(y)
    folds = int(folds)
    if folds < 2:
        raise UserError(f"cross-validation needs at least 2 folds, got {folds}")
    if y.size < folds:
        raise UserError(f"{folds}-fold cross-validation needs at least {folds} validation samples, got {y.size}")
    rng = np.random.default_rng(seed)
    out = np.empty(y.size, dtype=np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        out[idx] = (start + np.arange(idx.size)) % folds
        start = (start + idx.size) % folds
    return out


def cross_validate(fit: Callable[[np.ndarray], np.ndarray], true_probs: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   predict: Callable[[np.ndarray, np.ndarray], np.ndarray], y: np.ndarray,
                   fold: np.ndarray) -> dict[str, Any]:
    """The K-fold estimate of one method: for each fold, ``w = fit(train_rows)``; the held-out rows are
    scored with ``true_probs(w, rows)`` (the ensemble's probability of the true class) and
    ``predict(w, rows)`` (its arg-max class).  Returns ``{"cv_accuracy", "cv_nll", "cv_fold_nll"}``
    over the held-out predictions of every fold together (every sample scored once, by weights that
    never saw it)."""
    n_correct, log_sum, per_fold = 0, 0.0, []
    for f in range(int(fold.max()) + 1):
        test = np.flatnonzero(fold == f)
        w = fit(np.flatnonzero(fold != f))
        q = np.maximum(true_probs(w, test), EPS)
        n_correct += int(np.sum(predict(w, test) == y[test]))
        log_sum += float(np.sum(np.log(q)))
        per_fold.append(float(-np.mean(np.log(q))))
    return {"cv_accuracy": n_correct / y.size, "cv_nll": -log_sum / y.size, "cv_fold_nll": per_fold}


def choose_by_cv(results: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> str | None:
    """The method with the lowest ``cv_nll`` (spec section 5: NLL first), ties to the higher
    ``cv_accuracy``, then to the earlier in ``order``; None when no method has a CV estimate."""
    scored = [m for m in order if results[m].get("cv_nll") is not None]
    if not scored:
        return None
    return min(scored, key=lambda m: (round(results[m]["cv_nll"], 12), -results[m]["cv_accuracy"], order.index(m)))


def _stack_cv(method: str, Pv: np.ndarray, yv: np.ndarray, fold: np.ndarray, ctx: "_FitContext") -> dict[str, Any]:
    """:func:`cross_validate` of one stacking method on [K, N, C] validation predictions (the searches
    start from each fold's own NLL optimum, as on the whole split)."""
    Q = _true_class_probs(Pv, yv)

    def fit(rows):
        P, y = Pv[:, rows], yv[rows]
        fctx = ctx
        if method in ("accuracy_search",):
            fctx = dataclasses.replace(ctx, init=_nll_opt_q(Q[rows])[0])
        return _check_weights(METHODS[method](P, y, fctx)[0], Pv.shape[0])

    return cross_validate(fit, lambda w, rows: Q[rows] @ w,
                          lambda w, rows: np.argmax(np.tensordot(w, Pv[:, rows], axes=1), axis=1), yv, fold)


# ----------------------------------------------------------------------------------------------------
# stacking driver
# ----------------------------------------------------------------------------------------------------
def _metrics(w: np.ndarray, Pv, yv, Pt, yt) -> dict[str, float]:
    v, t = evaluate(w, Pv, yv), evaluate(w, Pt, yt)
    return {"val_accuracy": v["accuracy"], "val_nll": v["nll"], "test_accuracy": t["accuracy"], "test_nll": t["nll"]}


def stack(
    P_val: Any,
    y_val: Any,
    P_test: Any,
    y_test: Any,
    member_names: Sequence[str],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    tune_samples: int = 0,
    storage_path: str | os.PathLike | None = None,
    seed: int = 0,
    choose: str = "nll_optimal",
    caruana_rounds: int = 50,
    ray_init_kwargs: Mapping[str, Any] | None = None,
    cv_folds: int = CV_FOLDS,
) -> dict[str, Any]:
    """Fit every method in ``methods`` on the validation split and report validation and test metrics,
    and the ``cv_folds``-fold cross-validated estimate inside the validation split (0: none).

    ``P_val`` [K, N, C], ``P_test`` [K, M, C] (same member order as ``member_names``), labels [N], [M].
    ``tune_samples > 0`` adds ``"tune_accuracy_search"`` with that many trials (``storage_path`` for
    the Tune experiment).  ``accuracy_search`` and the Tune search start from the ``nll_optimal``
    weights when those are computed (their ``seconds`` then exclude the NLL fit).

    Returns a JSON-serialisable dict::

        {"member_names": [...], "num_classes": C, "n_val": N, "n_test": M, "seed": seed,
         "members": {name: {val_accuracy, val_nll, test_accuracy, test_nll}},
         "methods": {method: {weights: {name: w}, val_accuracy, val_nll, cv_accuracy, cv_nll, cv_fold_nll,
                              test_accuracy, test_nll, seconds, ...method-specific info}},
         "cv": {"folds", "seed"} or None,
         "chosen": method, "chosen_rule": "...",
         "ensemble": {"method", "weights", val/cv/test accuracy and nll of the chosen method}}

    ``choose`` selects ``chosen`` from validation results only (see the module docstring); the Tune
    search has no CV estimate (it would be K more Tune experiments) and is never chosen by ``"cv"``.
    """
    names = [str(m) for m in member_names]
    Pv, yv = _check_py(P_val, y_val, "validation", names)
    Pt, yt = _check_py(P_test, y_test, "test", names)
    K, _, C = Pv.shape
    if Pt.shape[0] != K or Pt.shape[2] != C:
        raise UserError(f"validation probabilities are {Pv.shape} but test probabilities are {Pt.shape}")
    if len(names) != K or len(set(names)) != K:
        raise UserError(f"member_names must be {K} distinct names, got {names}")
    methods = list(dict.fromkeys(methods))
    if tune_samples and TUNE_METHOD not in methods:
        methods.append(TUNE_METHOD)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"unknown stacking method(s) {unknown}; choose from {list(ALL_METHODS)}")
    if TUNE_METHOD in methods and TUNE_METHOD not in METHODS:
        raise UserError(f"{TUNE_METHOD} runs on Ray Tune: import esdbs_ray.stacking_tune first "
                         "(esdbs_ray.stacking_run does)")
    if not methods:
        raise UserError("no stacking methods requested")
    cv_folds = int(cv_folds)
    if choose == "cv" and (cv_folds < 2 or yv.size < 2 * cv_folds):
        raise UserError(f"choose='cv' needs cv_folds >= 2 and at least 2 validation samples per fold, got "
                        f"{cv_folds} folds of {yv.size} samples")
    fold = cv_folds_of(yv, cv_folds, seed) if cv_folds >= 2 and yv.size >= 2 * cv_folds else None

    out: dict[str, Any] = {
        "member_names": names,
        "num_classes": int(C),
        "n_val": int(Pv.shape[1]),
        "n_test": int(Pt.shape[1]),
        "seed": int(seed),
        "members": {},
        "methods": {},
        "cv": {"folds": cv_folds, "seed": int(seed), "stratified": True} if fold is not None else None,
    }
    for k, n in enumerate(names):
        e = np.zeros(K)
        e[k] = 1.0
        out["members"][n] = _metrics(e, Pv, yv, Pt, yt)

    ctx = _FitContext(seed=int(seed), tune_samples=int(tune_samples), storage_path=storage_path,
                      caruana_rounds=int(caruana_rounds), ray_init_kwargs=ray_init_kwargs)
    order = sorted(methods, key=lambda m: m != "nll_optimal")  # the NLL optimum seeds the searches
    for m in order:
        t0 = time.perf_counter()
        w, extra = METHODS[m](Pv, yv, ctx)
        if m == "nll_optimal":
            ctx = dataclasses.replace(ctx, init=w)
        seconds = time.perf_counter() - t0
        w = _check_weights(w, K)
        cv = _stack_cv(m, Pv, yv, fold, ctx) if fold is not None and m != TUNE_METHOD else {}
        out["methods"][m] = {
            "weights": {n: float(x) for n, x in zip(names, w)},
            **_metrics(w, Pv, yv, Pt, yt),
            **cv,
            "seconds": seconds,
            **extra,
        }
    out["methods"] = {m: out["methods"][m] for m in methods}  # report in the requested order

    if choose == "best_val":
        ranked = sorted(methods, key=lambda m: (-out["methods"][m]["val_accuracy"], out["methods"][m]["val_nll"],
                                                 methods.index(m)))
        chosen = ranked[0]
        rule = "best_val: highest validation accuracy, ties to lower validation NLL"
    elif choose == "cv":
        chosen = choose_by_cv(out["methods"], methods)
        if chosen is None:
            raise UserError(f"choose='cv': no method with a cross-validated estimate among {methods}")
        rule = (f"cv: lowest {cv_folds}-fold cross-validated NLL inside the validation split (weights fitted on "
                f"{cv_folds - 1} folds, scored on the held-out one), ties to higher CV accuracy")
    elif choose in out["methods"]:
        chosen = choose
        rule = f"fixed: {choose}"
    else:
        raise UserError(f"choose={choose!r} is not a computed method ({methods}) nor 'best_val' or 'cv'")
    out["chosen"] = chosen
    out["chosen_rule"] = rule
    out["ensemble"] = {"method": chosen, **{k: v for k, v in out["methods"][chosen].items()
                                            if k in ("weights", "val_accuracy", "val_nll", "cv_accuracy", "cv_nll",
                                                     "test_accuracy", "test_nll")}}
    return out


def per_class_accuracy(weights: Mapping[str, float], P_test: Any, y_test: Any,
                       member_names: Sequence[str]) -> dict[str, Any]:
    """Test accuracy per true class (recall) of the weighted ensemble and of each member:
    ``{"support": [n_c], "ensemble": [acc_c], "members": {name: [acc_c]}}`` (None for a class without
    test images)."""
    P, y = np.asarray(P_test), np.asarray(y_test)
    C = P.shape[2]
    support = np.bincount(y, minlength=C)

    def recall(pred: np.ndarray) -> list[float | None]:
        hits = np.bincount(y[pred == y], minlength=C)
        return [float(h / n) if n else None for h, n in zip(hits, support)]

    w = np.asarray([weights[n] for n in member_names], dtype=np.float64)
    ensemble = np.tensordot(w, P.astype(np.float64), axes=1).argmax(1)
    return {"support": support.tolist(), "ensemble": recall(ensemble),
            "members": {n: recall(P[k].argmax(1)) for k, n in enumerate(member_names)}}


def format_stacking_table(result: Mapping[str, Any]) -> str:
    """A plain-text table: one row per method (``*`` marks the chosen one), then one per member."""
    names = list(result["member_names"])
    head = (f"{'':2}{'method':<22}{'weights':<{max(30, 11 * len(names))}}{'val acc':>9}{'val nll':>9}{'cv acc':>9}"
            f"{'cv nll':>9}{'test acc':>10}{'test nll':>10}{'seconds':>10}")
    lines = [head, "-" * len(head)]
    wcol = max(30, 11 * len(names))

    def cv(r, key):  # the Tune search, and files written before the estimate, have none
        return f"{r[key]:>9.4f}" if r.get(key) is not None else f"{'':>9}"

    for m, r in result["methods"].items():
        ws = " ".join(f"{r['weights'][n]:.3f}" for n in names)
        mark = "*" if m == result.get("chosen") else " "
        lines.append(
            f"{mark:2}{m:<22}{ws:<{wcol}}{r['val_accuracy']:>9.4f}{r['val_nll']:>9.4f}{cv(r, 'cv_accuracy')}"
            f"{cv(r, 'cv_nll')}{r['test_accuracy']:>10.4f}{r['test_nll']:>10.4f}{r['seconds']:>10.4f}"
        )
    lines.append("-" * len(head))
    for n in names:
        r = result["members"][n]
        lines.append(
            f"{'':2}{'member ' + n:<22}{'':<{wcol}}{r['val_accuracy']:>9.4f}{r['val_nll']:>9.4f}{'':>18}"
            f"{r['test_accuracy']:>10.4f}{r['test_nll']:>10.4f}{'':>10}"
        )
    lines.append(f"weights in member order: {', '.join(names)}; chosen ({result.get('chosen_rule', '')}): {result.get('chosen')}")
    if result.get("cv"):
        lines.append(f"cv: {result['cv']['folds']}-fold cross-validation inside the validation split (each method's "
                     "weights fitted on the other folds); test: reported only")
    return "\n".join(lines)
