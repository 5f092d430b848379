"""Stacking weights searched as a Ray Tune experiment: the Tune adapter of :mod:`esdbs_ray.stacking`.

``tune_accuracy_search`` is the accuracy search of ``stacking.accuracy_search`` run as one Tune trial
per weight vector, for users who want to watch (or distribute) the search on their cluster; the
stacking maths itself never imports Ray.  ``stacking.stack`` runs it as the method
``"tune_accuracy_search"`` when asked for (``esdbs stack --tune-samples N``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from . import storage
from .tracking import no_tune_tensorboard
from .stacking import METHODS, TUNE_METHOD, _best_lex, _check_py, _check_weights, _nll_opt_q, _true_class_probs, evaluate

__all__ = ["tune_accuracy_search"]


def _weights_from_config(config: Mapping[str, Any], K: int) -> np.ndarray:
    """``u_k ~ U[0, 1)`` -> ``e_k = -log(1 - u_k) ~ Exp(1)`` -> ``w = e / sum(e) ~ Dirichlet(1)``."""
    u = np.array([float(config[f"u{k}"]) for k in range(K)])
    e = -np.log1p(-np.clip(u, 0.0, 1.0 - 1e-16))
    if e.sum() <= 0:
        return np.full(K, 1.0 / K)
    return e / e.sum()


def _config_from_weights(w: np.ndarray) -> dict[str, float]:
    """Inverse of :func:`_weights_from_config` (up to scale): ``u_k = 1 - exp(-w_k)``."""
    return {f"u{k}": float(-np.expm1(-wk)) for k, wk in enumerate(w)}


def _tune_trainable(config: dict, P: np.ndarray = None, y: np.ndarray = None) -> None:
    from ray import tune

    w = _weights_from_config(config, P.shape[0])
    m = evaluate(w, P, y)
    tune.report({"val_accuracy": m["accuracy"], "val_nll": m["nll"], **{f"w{k}": float(v) for k, v in enumerate(w)}})


def tune_accuracy_search(
    P_val: Any,
    y_val: Any,
    num_samples: int = 64,
    seed: int = 0,
    *,
    storage_path: str | os.PathLike | None = None,
    name: str | None = None,
    init: Any = None,
    cpus_per_trial: float = 1.0,
    max_concurrent_trials: int | None = None,
    ray_init_kwargs: Mapping[str, Any] | None = None,
    return_info: bool = False,
):
    """Validation-accuracy search over the simplex as a Ray Tune experiment.

    Each trial is one weight vector: K variables ``u_k ~ tune.uniform(0, 1)`` mapped to
    ``w = e / sum(e)`` with ``e_k = -log(1 - u_k)`` (so ``w`` is uniform on the simplex, Dirichlet(1)).
    The first trials are the NLL optimum (``init``, computed when None) and equal weights
    (``points_to_evaluate``); the rest are sampled by ``BasicVariantGenerator(random_state=seed)``.
    The probability arrays reach the trials through the object store (``tune.with_parameters``); each
    trial reports ``{"val_accuracy", "val_nll", "w0", ...}``.  Best trial: highest accuracy, ties to the
    lower NLL.  Any trial error raises ``RuntimeError``.

    Uses the Ray instance already running in this process if there is one; otherwise starts a local
    one on 127.0.0.1 (``ray_init_kwargs`` passed on, e.g. ``num_cpus``) and shuts it down afterwards.
    ``storage_path`` is where Tune keeps the experiment (a temporary directory, deleted afterwards,
    when None).  ``return_info`` adds ``{"trials", "val_accuracy", "val_nll", "storage_path"}``.
    """
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    P, y = _check_py(P_val, y_val)
    K = P.shape[0]
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    w0 = _check_weights(init, K) if init is not None else _nll_opt_q(_true_class_probs(P, y))[0]
    points = [_config_from_weights(w0), _config_from_weights(np.full(K, 1.0 / K))][:num_samples]

    started = False
    tmp_storage = None
    if storage_path is None:
        tmp_storage = tempfile.mkdtemp(prefix="esdbs-tune-stacking-")
        storage_path = tmp_storage
    else:
        storage_path = storage.normalize(storage_path)
    try:
        if not ray.is_initialized():
            from esdbs_ray.ray_env import init_ray  # $RAY_ADDRESS, else a local Ray on loopback

            init_ray(num_cpus=(ray_init_kwargs or {}).get("num_cpus"))
            started = True
        trainable = tune.with_resources(
            tune.with_parameters(_tune_trainable, P=np.ascontiguousarray(P), y=y), {"cpu": cpus_per_trial}
        )
        tuner = tune.Tuner(
            trainable,
            param_space={f"u{k}": tune.uniform(0.0, 1.0) for k in range(K)},
            tune_config=tune.TuneConfig(
                num_samples=num_samples,
                search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=seed),
                max_concurrent_trials=max_concurrent_trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name or f"stacking-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}",
                storage_path=str(storage_path),
                verbose=0,
                # no TensorBoard files of its own: the experiment's tensorboard/ holds the members' runs
                callbacks=[no_tune_tensorboard()],
            ),
        )
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"{len(results.errors)} Tune trial(s) failed: {results.errors[0]!r}")
        rows = []
        for r in results:
            m = r.metrics or {}
            if "val_accuracy" not in m:
                raise RuntimeError(f"Tune trial {r.path} reported no val_accuracy")
            rows.append((m["val_accuracy"], m["val_nll"], _weights_from_config(r.config, K)))
    finally:
        if started:
            ray.shutdown()
        if tmp_storage is not None:
            shutil.rmtree(tmp_storage, ignore_errors=True)
    acc = np.array([r[0] for r in rows])
    nll = np.array([r[1] for r in rows])
    best = _best_lex(acc, nll)
    w = rows[best][2]
    info = {
        "trials": len(rows),
        "val_accuracy": float(acc[best]),
        "val_nll": float(nll[best]),
        "storage_path": None if tmp_storage else str(storage_path),
    }
    return (w, info) if return_info else w


def _fit(P, y, ctx):
    w, info = tune_accuracy_search(P, y, num_samples=ctx.tune_samples or 64, seed=ctx.seed,
                                   storage_path=ctx.storage_path, init=ctx.init,
                                   ray_init_kwargs=ctx.ray_init_kwargs, return_info=True)
    return w, {"trials": info["trials"]}


METHODS[TUNE_METHOD] = _fit
