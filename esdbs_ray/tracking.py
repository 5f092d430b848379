"""Experiment tracking: MLflow through Ray Tune's own callback, and one TensorBoard stream per trial.

What it achieves:

* **MLflow** (``tracking: {mlflow: {enabled: true}}``): every trial is an MLflow run holding the
  trial's whole config as params (member, variant, group and every ``train.*`` key, not only Tune's
  one-key search space) and every epoch's metrics (``ray.air.integrations.mlflow.MLflowLoggerCallback``,
  the Tune callback Ray 2.60 ships; it runs on the driver).  After the stacking, one more run for the
  experiment itself holds the pipeline config as params, the ensembles' and members' accuracies as
  metrics, and ``config.yaml``, ``summary.json`` and ``stacking*.json`` as artifacts (each member's
  ``members/<member>.json`` goes to its trial's run); ``esdbs report`` adds the report's files.
  ``OUT/tracking.json`` names the MLflow experiment and runs.  With no ``tracking_uri`` the store is
  MLflow's file store in the experiment directory (``OUT/mlruns``), which the light ``mlflow-skinny``
  serves; MLflow 3 keeps that store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is
  set for it here.
* **TensorBoard**: the trainer writes one event stream per trial (``tb/`` in the trial directory);
  Tune would add a second one of its own whenever tensorboardX is installed: it adds a
  ``TBXLoggerCallback`` unless the run config holds one.  :func:`tune_callbacks` gives it one that
  writes nothing, so Tune's CSV and JSON loggers (which ``ExperimentAnalysis``, ``esdbs results`` and
  the report read) stay and only the second stream goes -- also for a resumed run, whose callbacks
  Tune restores from its saved state.

Evidence: tests/test_pipeline.py reads the smoke run's MLflow store back with ``MlflowClient``
(params, per-epoch metric histories, artifacts, the report's files) and finds exactly one event
stream per trial.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from . import storage
from .config import ConfigError, PipelineConfig
from .layout import ExperimentLayout as L

_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
_MAX_PARAM = 6000  # MLflow's limit on a param value


# --------------------------------------------------------------------------------------------------
# Where MLflow writes
# --------------------------------------------------------------------------------------------------
def settings(cfg: PipelineConfig, experiment_root: str) -> dict | None:
    """``{"tracking_uri", "experiment_name", "tags"}`` of an experiment, None when MLflow is off.

    Raises :class:`ConfigError` when MLflow is on but cannot work: not installed, or no tracking URI
    for an experiment at a URI (a file store must be a local directory)."""
    m = cfg.tracking.mlflow
    if not m.enabled:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.mlflow.enabled=true: MLflow is not installed; "
                          "pip install 'esdbs-ray[tracking]' (mlflow-skinny) or switch tracking off")
    uri = m.tracking_uri
    if uri is None:
        if storage.is_uri(experiment_root):
            raise ConfigError(f"tracking.mlflow.tracking_uri: required for an experiment at a URI ({experiment_root}); "
                              "the default store (OUT/mlruns) is a local directory")
        from .layout import ExperimentLayout

        uri = Path(ExperimentLayout.at(experiment_root).mlruns).as_uri()
    elif "://" not in uri and not uri.startswith(("file:", "databricks", "sqlite:")):
        uri = Path(uri).resolve().as_uri()  # a bare path: a file store, as an absolute file: URI
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless told to keep serving it (it is in maintenance
        # mode); mlflow-skinny has no database store, and a file store needs no server.
        os.environ.setdefault(_FILE_STORE_ENV, "true")
    return {"tracking_uri": uri, "experiment_name": m.experiment_name or cfg.name,
            "tags": {"esdbs.experiment_dir": experiment_root, **m.tags}}


def _client(uri: str):
    import mlflow

    if uri.startswith("file:"):
        os.environ.setdefault(_FILE_STORE_ENV, "true")
    return mlflow.MlflowClient(tracking_uri=uri)


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_MAX_PARAM]
    return out


def trial_params(spec) -> dict[str, str]:
    """An MLflow run's params for one trial: its place in the run and its whole TrainConfig."""
    return _flat({"member": spec.member, "variant": spec.variant, "group": spec.group,
                  "batch_size": spec.batch_size, "train": spec.train.to_dict()})


# --------------------------------------------------------------------------------------------------
# Tune callbacks
# --------------------------------------------------------------------------------------------------
def tune_callbacks(cfg: PipelineConfig, experiment_root: str, specs: dict | None = None) -> list:
    """The loggers of a Tune stage besides Tune's CSV and JSON: a TensorBoard logger that writes
    nothing (no second stream) and, when MLflow is on, Ray's MLflow callback logging each trial's
    params (``specs``: member -> TrialSpec) and per-epoch metrics."""
    callbacks = [no_tune_tensorboard()]
    s = settings(cfg, experiment_root)
    if s is not None:
        callbacks.append(_mlflow_callback(s, {m: trial_params(t) for m, t in (specs or {}).items()}))
    return callbacks


def _mlflow_callback(s: dict, params: dict[str, dict]):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class ESDBSMLflowLoggerCallback(MLflowLoggerCallback):
        """Ray's callback, with each run named after its member and holding the trial's whole config
        (Tune's config is only ``{"member": name}``; the TrialSpec travels through with_parameters)."""

        def __init__(self, params_by_member: dict[str, dict], **kwargs):
            super().__init__(**kwargs)
            self.params_by_member = params_by_member

        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                member = str(trial.config.get("member", trial))
                if trial.config.get("seed") is not None:  # a multi-seed run: the member at one seed
                    member = L.trial_key(member, trial.config["seed"])
                tags = {**self.tags, "trial_name": str(trial), "esdbs.member": member, "esdbs.kind": "trial"}
                run = self.mlflow_util.start_run(tags=tags, run_name=member)
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=run.info.run_id,
                                            params_to_log=self.params_by_member.get(member) or trial.config)

    return ESDBSMLflowLoggerCallback(params, tracking_uri=s["tracking_uri"], experiment_name=s["experiment_name"],
                                     tags=s["tags"])


def no_tune_tensorboard():
    from ray.tune.logger import TBXLoggerCallback

    class NoTuneTensorBoard(TBXLoggerCallback):
        """Takes the place of the TensorBoard logger Tune adds unless one is given, and writes nothing:
        the trainer writes each trial's one stream (with its own tags, images and text)."""

        _SAVED_FILE_TEMPLATES = []

        def __init__(self):  # no tensorboardX writer
            pass

        def log_trial_start(self, trial):
            pass

        def log_trial_result(self, iteration, trial, result):
            pass

        def log_trial_end(self, trial, failed=False):
            pass

    return NoTuneTensorBoard()


# --------------------------------------------------------------------------------------------------
# The experiment's own run: config, results, artifacts
# --------------------------------------------------------------------------------------------------
def _metric_key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def log_experiment(cfg: PipelineConfig, layout, summary: dict) -> dict | None:
    """After the stacking: one MLflow run for the experiment (params: the pipeline config; metrics:
    ensembles and members; artifacts: config.yaml, summary.json, stacking*.json), each member's
    summary as an artifact of its trial's run, and ``OUT/tracking.json``.  Returns that record."""
    s = settings(cfg, layout.root)
    if s is None:
        return None
    from mlflow.entities import Metric, Param

    client = _client(s["tracking_uri"])
    exp = client.get_experiment_by_name(s["experiment_name"])
    exp_id = exp.experiment_id if exp else client.create_experiment(s["experiment_name"])
    run = client.create_run(exp_id, run_name=f"{cfg.name} (experiment)",
                            tags={**s["tags"], "esdbs.kind": "experiment"})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in _flat(cfg.to_dict()).items()]
    metrics = [Metric(_metric_key(f"ensemble.{group}.{k}"), float(e[k]), 0, 0)
               for group, e in (summary.get("ensembles") or {}).items()
               for k in ("val_accuracy", "test_accuracy", "val_nll", "test_nll") if e.get(k) is not None]
    for m in summary.get("members") or []:
        for k in ("test_accuracy", "sparsity", "model_sparsity", "train_seconds", "wall_seconds"):
            if isinstance(m.get(k), (int, float)):
                metrics.append(Metric(_metric_key(f"member.{m['member']}.{k}"), float(m[k]), 0, 0))
    for k in ("wall_seconds", "base_wall_seconds"):
        if isinstance(summary.get(k), (int, float)):
            metrics.append(Metric(k, float(summary[k]), 0, 0))
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
    tree = storage.Tree(layout.root)
    names = [L.CONFIG, L.SUMMARY] + tree.listdir(pattern=L.STACKING_GLOB, kind="file")
    for name in names:
        if tree.is_file(name):
            client.log_artifact(run_id, tree.local_path(name))
    # each member's own summary (per-epoch history, rungs) beside its trial's metrics
    trial_runs = {}
    filt = f"tags.`esdbs.experiment_dir` = '{layout.root}' and tags.`esdbs.kind` = 'trial'"
    for r in client.search_runs([exp_id], filter_string=filt, max_results=5000):
        member = r.data.tags.get("esdbs.member")
        if member and member not in trial_runs:  # newest first: a resumed trial's latest run
            trial_runs[member] = r.info.run_id
            name = L.member_name(member)
            if tree.is_file(L.MEMBERS, name):
                client.log_artifact(r.info.run_id, tree.local_path(L.MEMBERS, name))
    client.set_terminated(run_id)
    record = {"tracking_uri": s["tracking_uri"], "experiment_name": s["experiment_name"], "experiment_id": exp_id,
              "run_id": run_id, "trial_runs": trial_runs}
    storage.write_json(layout.tracking, record)
    return record


def log_report(experiment_root: str, report_dir: str | os.PathLike) -> str | None:
    """Add a report's files to the experiment's MLflow run (named in ``tracking.json``); returns the
    run id, or None when the experiment was not tracked."""
    from .layout import ExperimentLayout

    try:
        record = json.loads(storage.read_bytes(ExperimentLayout.at(experiment_root).tracking))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("run_id") or importlib.util.find_spec("mlflow") is None:
        return None
    client = _client(record["tracking_uri"])
    client.log_artifacts(record["run_id"], str(report_dir), artifact_path="report")
    return record["run_id"]
