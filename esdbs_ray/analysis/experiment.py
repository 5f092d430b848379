"""Loading an experiment for the report: every artifact ``esdbs run`` leaves, read through ``pyarrow.fs``.

:class:`Experiment` reads ``config.yaml``, ``summary.json``, ``members/*.json``, ``stacking*.json``,
``predictions/*.parquet``, Tune's ``progress.csv`` and the trials' TensorBoard events from a local
directory, a ``file://`` URI, ``s3://`` / ``gs://`` or any ``pyarrow.fs`` filesystem
(:class:`esdbs_ray.storage.Tree`); every part may be missing (the report then says "not run"), and
a corrupt file is noted in :attr:`Experiment.problems`, never raised.  Nothing here imports Ray or
the training code.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from ..layout import ExperimentLayout as L
from ..layout import safe_name
from ..records import MemberSummary, Rung, RungResult, number
from ..replicates import replicate_parent
from ..storage import Tree
from . import paper_numbers as PN

TIME_MARGIN = 0.05  # a speed within 5 % of another counts as "the same" (shared machines, timer noise)
Z = 1.96  # accuracy differences must exceed Z paired standard errors (about 5 %, two-sided)
NOT_RUN = "not run"
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
REFUTED = "refuted"  # beyond 2 SE across the seeds against the claim (analysis/seeds.py)
INCONCLUSIVE = "inconclusive"  # within 2 SE across the seeds, or one seed for a comparison of variants
MAIN_VARIANTS = PN.VARIANTS
SWEEP_VARIANTS = PN.SWEEP_VARIANTS


def _read_json(tree: Tree, *parts: str) -> Any:
    try:
        return tree.read_json(*parts)
    except (OSError, ValueError):
        return None


def _slug(name: str) -> str:
    return name.lower().replace("+", "-").replace("@", "-")


_f = number  # a number read from untyped JSON or YAML (stacking files, configs), or None


class Experiment:
    """Everything the report needs, read from an experiment directory; every part may be missing."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self.root = tree.root  # as given: a local path or a URI
        self.problems: list[str] = []  # what was missing or unreadable (shown in the report)
        # where the Tune trials are: here, or for one seed's experiment of a multi-seed run, the run's
        self.trials, self.trial_seed = tree, None
        run = replicate_parent(tree) if not tree.is_dir(*L.TUNE_BASE) else None
        if run is not None:
            self.trials, self.trial_seed = run
        self.config = self._config()
        self.summary = _read_json(tree, L.SUMMARY)
        if self.summary is None:
            self.problems.append("summary.json missing or unreadable")
        self.members = self._members()
        self.groups = self._groups()
        self.stackings = self._stackings()
        self._table = None
        self._table_loaded = False
        self._acc_cache: dict = {}

    # -- raw artifacts ----------------------------------------------------------------------------
    def _config(self) -> dict:
        import yaml

        try:
            d = yaml.safe_load(self.tree.read_text(L.CONFIG))
            if isinstance(d, dict):
                return d
        except (OSError, ValueError, yaml.YAMLError):
            pass
        self.problems.append("config.yaml missing or unreadable")
        s = _read_json(self.tree, L.SUMMARY)
        return (s or {}).get("config") or {}

    def _members(self) -> list[MemberSummary]:
        rows = [m for m in (self.summary or {}).get("members") or [] if isinstance(m, dict)]
        if not rows:
            for name in self.tree.listdir(L.MEMBERS, pattern="*.json", kind="file"):
                m = _read_json(self.tree, L.MEMBERS, name)
                if isinstance(m, dict) and "member" in m:
                    rows.append(m)
            if rows:
                self.problems.append("members taken from members/*.json (summary.json has none)")
        if not rows:
            self.problems.append("no member records (summary.json members / members/*.json)")
        return [MemberSummary.from_dict(m) for m in rows]

    def _groups(self) -> dict[str, dict]:
        groups: dict[str, dict] = {}
        for m in self.members:
            name = m.group or m.variant
            if not name:
                continue
            g = groups.setdefault(name, {"group": name, "variant": m.variant or name.split("@")[0],
                                         "batch_size": m.batch_size, "members": []})
            g["members"].append(m)
        for g in groups.values():
            b0s = {(m.config.get("dbs") or {}).get("b0") for m in g["members"]}
            b0s.discard(None)
            g["b0"] = g["batch_size"] if g["batch_size"] is not None else (min(b0s) if b0s else
                                                                              self.train_cfg.get("dbs", {}).get("b0", 128))
            g["dbs"] = g["variant"].endswith("+DBS")
        return groups

    def _stackings(self) -> dict[str, dict]:
        out = {}
        for name in self.tree.listdir(pattern=L.STACKING_GLOB, kind="file"):
            d = _read_json(self.tree, name)
            if not isinstance(d, dict) or "methods" not in d:
                self.problems.append(f"{name} unreadable")
                continue
            group = d.get("variant")
            if not group:
                if name == "stacking.json":
                    group = self._only_stacked_group()
                else:
                    slug = name[len("stacking-"):-len(".json")]
                    group = next((g for g in self.groups if _slug(g) == slug), None)
            if group:
                d["_file"] = name
                out[group] = d
        return out

    def _only_stacked_group(self) -> str | None:
        stacked = [g for g, d in self.groups.items() if len(d["members"]) >= 2]
        return stacked[0] if len(stacked) == 1 else None

    # -- derived config ---------------------------------------------------------------------------
    @property
    def train_cfg(self) -> dict:
        return self.config.get("train") or {}

    @property
    def dataset(self) -> str | None:
        return PN.dataset_key(self.config.get("dataset") or (self.summary or {}).get("dataset"))

    @property
    def main_variants(self) -> list[str]:
        """The run's main variants (full sparsity ladder at B0): config ``variants``."""
        vs = self.config.get("variants") or (self.summary or {}).get("variants")
        if isinstance(vs, str):
            vs = [vs]
        if not vs:  # no config: every variant-named group
            vs = [g for g, d in self.groups.items() if d["batch_size"] is None and g == d["variant"]]
        return [v for v in vs if v in self.groups]

    def main_group(self, variant: str) -> dict | None:
        g = self.groups.get(variant)
        return g if g and g["batch_size"] is None and variant in self.main_variants else None

    def chosen_sparsity(self, paper_s: float | None) -> float | None:
        s = (self.config.get("stack") or {}).get("sparsity")
        return _f(s) if s is not None else paper_s

    def sweep_sparsity(self, paper_s: float | None) -> float | None:
        s = (self.config.get("batch_sweep") or {}).get("sparsity")
        return _f(s) if s is not None else paper_s

    # -- predictions ------------------------------------------------------------------------------
    @property
    def table(self):
        if not self._table_loaded:
            self._table_loaded = True
            if not self.tree.listdir(L.PREDICTIONS, pattern="*.parquet", kind="file"):
                self.problems.append("no predictions/*.parquet: ensemble accuracies only where stacking*.json has them, "
                                     "no paired standard errors")
            else:
                try:
                    from esdbs_ray.predictions import read_predictions

                    self._table = read_predictions(self.tree.path(L.PREDICTIONS), filesystem=self.tree.fs)
                except Exception as exc:  # a corrupt file must not stop the report
                    self.problems.append(f"predictions unreadable: {str(exc).splitlines()[0]}")
        return self._table

    # -- per (group, rung) ------------------------------------------------------------------------
    def rung(self, member: MemberSummary, s: float) -> RungResult | None:
        """The member's sparsity rung ``s`` (not a basis rung)."""
        return member.rung(Rung(s))

    def rungs_of(self, group: str) -> list[float]:
        """The sparsity rungs every member of ``group`` reached (target sparsities)."""
        g = self.groups.get(group)
        if not g:
            return []
        sets = [{r.rung for r in m.rungs if not r.rung.is_basis} for m in g["members"]]
        return [r.target_sparsity for r in sorted(set.intersection(*sets))] if sets else []

    def time(self, group: str, s: float) -> dict | None:
        """{sum, max, n}: members' mean seconds per epoch at rung ``s`` (None if any member lacks it)."""
        g = self.groups.get(group)
        if not g:
            return None
        ts = []
        for m in g["members"]:
            r = self.rung(m, s)
            t = r.mean_epoch_seconds if r else None
            if t is None:
                return None
            ts.append(t)
        return {"sum": sum(ts), "max": max(ts), "n": len(ts)}

    def accuracy(self, group: str, s: float) -> dict | None:
        """{acc (fraction), correct (bool array or None), labels, source, weights}; None = not available."""
        k = (group, Rung(s))
        if k not in self._acc_cache:
            self._acc_cache[k] = self._accuracy(group, s)
        return self._acc_cache[k]

    def _stacking_at(self, group: str, s: float) -> dict | None:
        st = self.stackings.get(group)
        if not st:
            return None
        ss = st.get("sparsity")
        if ss is None:  # None = each member's last rung
            rungs = self.rungs_of(group)
            ss = rungs[-1] if rungs else None
        return st if ss is not None and Rung(ss) == Rung(s) else None

    def _accuracy(self, group: str, s: float) -> dict | None:
        import numpy as np

        g = self.groups.get(group)
        if not g or Rung(s).target_sparsity not in self.rungs_of(group):
            return None
        names = [m.member for m in g["members"]]
        st = self._stacking_at(group, s)
        weights, source = None, None
        if len(names) >= 2 and st:
            chosen = st.get("chosen")
            w = ((st.get("methods") or {}).get(chosen) or {}).get("weights")
            if w and set(w) == set(names):
                weights, source = [float(w[n]) for n in names], f"stacking weights ({chosen}, {st.get('_file')})"
        table = self.table
        if table is not None:
            try:
                from esdbs_ray.predictions import prediction_matrix

                Pt, yt, _ = prediction_matrix(table, "test", names, s, variant=group)
                if len(names) == 1:
                    p, source = Pt[0], "member predictions"
                    weights = [1.0]
                else:
                    if weights is None:
                        from esdbs_ray.stacking import nll_optimal

                        Pv, yv, _ = prediction_matrix(table, "val", names, s, variant=group)
                        weights = [float(x) for x in nll_optimal(Pv, yv)]
                        source = "NLL-optimal weights re-fitted on this rung's validation predictions"
                    p = np.tensordot(np.asarray(weights), Pt.astype(np.float64), axes=1)
                correct = np.argmax(p, axis=1) == yt
                return {"acc": float(correct.mean()), "correct": correct, "labels": yt, "source": source,
                        "weights": dict(zip(names, weights))}
            except Exception as exc:
                self.problems.append(f"{group} @ {s:g}: predictions unusable ({str(exc).splitlines()[0][:160]})")
        # fall back on the JSON records (no per-sample vector: no standard error)
        if len(names) == 1:
            r = self.rung(g["members"][0], s)
            a = r.test_accuracy if r else None
            return None if a is None else {"acc": a, "correct": None, "labels": None, "source": "member record",
                                           "weights": {names[0]: 1.0}}
        if st and _f(st.get("methods", {}).get(st.get("chosen"), {}).get("test_accuracy")) is not None:
            m = st["methods"][st["chosen"]]
            return {"acc": float(m["test_accuracy"]), "correct": None, "labels": None,
                    "source": f"{st.get('_file')} ({st['chosen']})", "weights": m.get("weights")}
        return None

    # -- sweep lookup -----------------------------------------------------------------------------
    def sweep_cell(self, variant: str, b) -> tuple[str, float] | None:
        """(group, rung) of the batch-size table's cell (variant, B or "DBS")."""
        s = self.sweep_sparsity(None)
        if s is None:
            return None
        if b == "DBS":
            g = self.groups.get(variant + "+DBS")
            return (variant + "+DBS", s) if g and Rung(s).target_sparsity in self.rungs_of(variant + "+DBS") else None
        name = f"{variant}@b{b}"
        if name in self.groups:
            return (name, s)
        main = self.main_group(variant)
        if main and main["b0"] == b and not main["dbs"]:
            return (variant, s)
        return None

    def sweep_batch_sizes(self) -> list[int]:
        bs = set((self.config.get("batch_sweep") or {}).get("batch_sizes") or [])
        bs |= {g["batch_size"] for g in self.groups.values() if g["batch_size"] is not None}
        return sorted(int(b) for b in bs)

    def baseline(self) -> tuple[float | None, str]:
        g = self.main_group("C-CNN")
        if g is None:
            return None, "no C-CNN group at B0 in this run: speeds cannot be computed"
        t = self.time("C-CNN", 0.0)
        if t is None:
            return None, "the C-CNN member has no dense rung (0.0) with mean_epoch_seconds"
        return t["sum"], f"C-CNN ({g['members'][0].model}), dense rung, B={g['b0']}"

    # -- trial directories and TensorBoard -------------------------------------------------------
    def trial_dir(self, member: MemberSummary) -> str | None:
        """The member's Tune trial directory, relative to :attr:`trials` (``tune/base/<member>_<id>``; a
        seed's experiment of a multi-seed run: the run's ``tune/base/<member>_s<seed>_<id>``).

        Looked up inside the experiment, never through ``trial_path``, which names the directory the
        run wrote (another machine's path, or a bucket the reader may not see)."""
        prefix = f"{L.trial_key(member.member, self.trial_seed)}_"
        hits = [n for n in self.trials.listdir(*L.TUNE_BASE, kind="dir") if n.startswith(prefix)]
        return "/".join((*L.TUNE_BASE, hits[0])) if hits else None

    def progress(self, member: MemberSummary) -> list[dict]:
        """The trial's per-epoch rows from Tune's progress.csv ([] when absent)."""
        key = ("progress", member.member)
        if key not in self._acc_cache:
            rows = []
            d = self.trial_dir(member)
            if d is not None and self.trials.is_file(d, "progress.csv"):
                try:
                    rows = list(csv.DictReader(io.StringIO(self.trials.read_text(d, "progress.csv"), newline="")))
                except (OSError, ValueError, csv.Error):
                    rows = []
            self._acc_cache[key] = rows
        return self._acc_cache[key]

    def timing_noise(self) -> tuple[float | None, int]:
        """Median coefficient of variation of epoch_seconds within fixed-schedule trials at one batch size
        (the same work every epoch, so its spread is the machine's timing noise); (cv, trials used)."""
        import statistics

        cvs = []
        for m in self.members:
            if m.config.get("schedule") == "dbs":
                continue
            by_b: dict = {}
            for r in self.progress(m):
                t = _f(r.get("epoch_seconds"))
                if t is not None:
                    by_b.setdefault(r.get("batch_size"), []).append(t)
            for ts in by_b.values():
                if len(ts) >= 2 and statistics.mean(ts) > 0:
                    cvs.append(statistics.stdev(ts) / statistics.mean(ts))
                    break
        return (statistics.median(cvs), len(cvs)) if cvs else (None, 0)

    @property
    def time_margin(self) -> float:
        cv, _ = self.timing_noise()
        return max(TIME_MARGIN, 2 * cv) if cv is not None else TIME_MARGIN

    def dbs_activity(self) -> tuple[bool | None, str]:
        """Did any DBS trial change its learning rate, momentum or batch size away from (lr0, m0, B0)?
        None when no DBS trial has a progress.csv."""
        seen, details = False, []
        for m in self.members:
            cfg = m.config
            if cfg.get("schedule") != "dbs":
                continue
            rows = self.progress(m)
            if not rows:
                continue
            seen = True
            d = cfg.get("dbs") or {}
            lr0, m0, b0 = _f(d.get("lr0")) or 0.0, _f(d.get("m0")) or 0.0, d.get("b0")
            bs = sorted({int(float(r["batch_size"])) for r in rows if _f(r.get("batch_size")) is not None})
            lrs = [_f(r.get("lr")) for r in rows if _f(r.get("lr")) is not None]
            ms = [_f(r.get("momentum")) for r in rows if _f(r.get("momentum")) is not None]
            active = (bs and bs != [b0]) or any(x > lr0 * (1 + 1e-9) for x in lrs) or any(x > m0 + 1e-9 for x in ms)
            if active:
                return True, f"{m.member}: batch sizes {bs}, lr up to {max(lrs):g}, momentum up to {max(ms):g}"
            details.append(m.member)
        if not seen:
            return None, "no progress.csv for the DBS trials"
        return False, (f"no DBS trial ({len(details)}) ever raised its learning rate above lr0, its momentum above m0 "
                       "or its batch size away from B0 (too few epochs for the schedule to act)")

    def member_record(self, member: MemberSummary) -> MemberSummary | None:
        """The trainer's whole summary of a member, members/<member>.json (None when absent)."""
        d = _read_json(self.tree, L.MEMBERS, L.member_name(member.member))
        return MemberSummary.from_dict(d) if isinstance(d, dict) else None

    def history(self, member: MemberSummary):
        """The member's per-epoch history (EpochRecords) from members/<member>.json ([] when absent)."""
        record = self.member_record(member)
        return record.history if record is not None else []

    def tb_events(self, member: MemberSummary) -> list[str]:
        """The member's TensorBoard event files: OUT/tensorboard/<group>/<member>, or for runs written
        before that, its Tune trial directory."""
        own = "/".join((L.TENSORBOARD, safe_name(member.group or member.variant or "members"), safe_name(member.member)))
        tree, d = (self.tree, own) if self.tree.is_dir(own) else (self.trials, self.trial_dir(member))
        if d is None:
            return []
        events = [e.path for e in tree.entries(d, recursive=True)
                  if e.base_name.startswith("events.out.tfevents.")]
        base = tree.path()
        # TensorBoard's reader wants local files: a remote tree's events are downloaded first
        return [tree.local_path(p[len(base):].lstrip("/") if base else p) for p in events]


def load_experiment(experiment_dir: str | os.PathLike, *, filesystem=None) -> Experiment:
    """An :class:`Experiment` from a local path, a URI, or a path on ``filesystem`` (pyarrow.fs)."""
    return Experiment(Tree(experiment_dir, filesystem))


def _tb_read(event_files: list[str], images: bool = False):
    """(scalars {tag: [(step, value)]}, images {tag: [png bytes]}) from TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    imgs: dict[str, list] = {}
    for f in event_files:
        try:
            acc = EventAccumulator(f, size_guidance={"scalars": 0, "images": 0 if images else 1,
                                                     "tensors": 1, "histograms": 1})
            acc.Reload()
            tags = acc.Tags()
            for t in tags.get("scalars", []):
                scalars.setdefault(t, []).extend((e.step, e.value) for e in acc.Scalars(t))
            if images:
                for t in tags.get("images", []):
                    imgs.setdefault(t, []).extend(e.encoded_image_string for e in acc.Images(t))
        except Exception:
            continue
    for t in scalars:
        dedup = dict(sorted(scalars[t]))
        scalars[t] = sorted(dedup.items())
    return scalars, imgs

