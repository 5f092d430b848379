"""``esdbs report EXPERIMENT_DIR``: the paper's tables, figures and claims, next to ours.

:func:`build_report` reads only the artifacts that ``esdbs run`` leaves in an experiment directory
(``config.yaml``, ``summary.json``, ``members/*.json``, ``predictions/*.parquet``, ``stacking*.json``,
``tune/base/<trial>/tb`` TensorBoard events and ``kernels.png``) and writes
``<out_dir>/report.md``, a self-contained ``<out_dir>/report.html`` (figures embedded as base64 PNG
data URIs) and the PNG figures (``out_dir`` defaults to ``EXPERIMENT_DIR/report``).  Any missing
artifact turns the sections that need it into "not run"; nothing here trains, and Ray is never
imported.

Definitions (spec section 1): "Time" is training seconds per epoch (the trainer's ``epoch_seconds``,
forward + backward + optimizer, no evaluation), per rung the mean over that rung's retraining epochs
(the dense rung: its last dense epoch).  "Speed" is the baseline's time divided by it, the baseline
being the unpruned single base model (C-CNN, rung 0.0) at batch B0 in the same run.  A stack's time
is reported summed over its members (members trained one after another, the paper's setting) and as
the maximum over its members (members trained in parallel trials).

Ensemble accuracy of a stacked group: at the rung its ``stacking*.json`` was fitted on, the chosen
stacking weights; at every other rung, NLL-optimal weights (``esdbs_ray.stacking.nll_optimal``)
re-fitted on that rung's validation predictions.  Test predictions never choose weights.
"""
from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from . import paper_numbers as PN

__all__ = ["build_report", "load_experiment", "TIME_MARGIN", "Z"]

TIME_MARGIN = 0.05  # a speed within 5 % of another counts as "the same" (shared machines, timer noise)
Z = 1.96  # accuracy differences must exceed Z paired standard errors (about 5 %, two-sided)
NOT_RUN = "not run"
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
MAIN_VARIANTS = PN.VARIANTS
SWEEP_VARIANTS = PN.SWEEP_VARIANTS


# ==================================================================================================
# Loading
# ==================================================================================================
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _slug(name: str) -> str:
    return name.lower().replace("+", "-").replace("@", "-")


def _f(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _key(s) -> float:
    return round(float(s), 6)


class Experiment:
    """Everything the report needs, read from an experiment directory; every part may be missing."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[str] = []  # what was missing or unreadable (shown in the report)
        self.config = self._config()
        self.summary = _read_json(root / "summary.json")
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
            d = yaml.safe_load((self.root / "config.yaml").read_text())
            if isinstance(d, dict):
                return d
        except (OSError, yaml.YAMLError):
            pass
        self.problems.append("config.yaml missing or unreadable")
        s = _read_json(self.root / "summary.json")
        return (s or {}).get("config") or {}

    def _members(self) -> list[dict]:
        rows = list((self.summary or {}).get("members") or [])
        if not rows:
            for p in sorted((self.root / "members").glob("*.json")):
                m = _read_json(p)
                if isinstance(m, dict) and "member" in m:
                    rows.append(m)
            if rows:
                self.problems.append("members taken from members/*.json (summary.json has none)")
        if not rows:
            self.problems.append("no member records (summary.json members / members/*.json)")
        return rows

    def _groups(self) -> dict[str, dict]:
        groups: dict[str, dict] = {}
        for m in self.members:
            name = m.get("group") or m.get("variant")
            if not name:
                continue
            g = groups.setdefault(name, {"group": name, "variant": m.get("variant") or name.split("@")[0],
                                         "batch_size": m.get("batch_size"), "members": []})
            g["members"].append(m)
        for g in groups.values():
            b0s = {((m.get("config") or {}).get("dbs") or {}).get("b0") for m in g["members"]}
            b0s.discard(None)
            g["b0"] = g["batch_size"] if g["batch_size"] is not None else (min(b0s) if b0s else
                                                                              self.train_cfg.get("dbs", {}).get("b0", 128))
            g["dbs"] = g["variant"].endswith("+DBS")
        return groups

    def _stackings(self) -> dict[str, dict]:
        out = {}
        for p in sorted(self.root.glob("stacking*.json")):
            d = _read_json(p)
            if not isinstance(d, dict) or "methods" not in d:
                self.problems.append(f"{p.name} unreadable")
                continue
            group = d.get("variant")
            if not group:
                if p.name == "stacking.json":
                    group = self._only_stacked_group()
                else:
                    slug = p.stem[len("stacking-"):]
                    group = next((g for g in self.groups if _slug(g) == slug), None)
            if group:
                d["_file"] = p.name
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
            pdir = self.root / "predictions"
            if not pdir.is_dir() or not any(pdir.glob("*.parquet")):
                self.problems.append("no predictions/*.parquet: ensemble accuracies only where stacking*.json has them, "
                                     "no paired standard errors")
            else:
                try:
                    from esdbs_ray.predictions import read_predictions

                    self._table = read_predictions(str(pdir))
                except Exception as exc:  # a corrupt file must not stop the report
                    self.problems.append(f"predictions unreadable: {str(exc).splitlines()[0]}")
        return self._table

    # -- per (group, rung) ------------------------------------------------------------------------
    def rung(self, member: dict, s: float) -> dict | None:
        for r in member.get("rungs") or []:
            if _f(r.get("target_sparsity")) is not None and abs(float(r["target_sparsity"]) - s) < 1e-6:
                return r
        return None

    def rungs_of(self, group: str) -> list[float]:
        g = self.groups.get(group)
        if not g:
            return []
        sets = [{_key(r["target_sparsity"]) for r in m.get("rungs") or [] if _f(r.get("target_sparsity")) is not None}
                for m in g["members"]]
        return sorted(set.intersection(*sets)) if sets else []

    def time(self, group: str, s: float) -> dict | None:
        """{sum, max, n}: members' mean seconds per epoch at rung ``s`` (None if any member lacks it)."""
        g = self.groups.get(group)
        if not g:
            return None
        ts = []
        for m in g["members"]:
            r = self.rung(m, s)
            t = _f(r.get("mean_epoch_seconds")) if r else None
            if t is None:
                return None
            ts.append(t)
        return {"sum": sum(ts), "max": max(ts), "n": len(ts)}

    def accuracy(self, group: str, s: float) -> dict | None:
        """{acc (fraction), correct (bool array or None), labels, source, weights}; None = not available."""
        k = (group, _key(s))
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
        return st if ss is not None and abs(float(ss) - s) < 1e-6 else None

    def _accuracy(self, group: str, s: float) -> dict | None:
        import numpy as np

        g = self.groups.get(group)
        if not g or _key(s) not in self.rungs_of(group):
            return None
        names = [m["member"] for m in g["members"]]
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
            a = _f(r.get("test_accuracy")) if r else None
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
            return (variant + "+DBS", s) if g and _key(s) in self.rungs_of(variant + "+DBS") else None
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
        return t["sum"], f"C-CNN ({g['members'][0].get('model')}), dense rung, B={g['b0']}"

    # -- trial directories and TensorBoard -------------------------------------------------------
    def trial_dir(self, member: dict) -> Path | None:
        hits = sorted(glob.glob(str(self.root / "tune" / "base" / f"{glob.escape(member['member'])}_*")))
        hits = [h for h in hits if os.path.isdir(h)]
        # only inside the experiment directory (``trial_path`` may point at the directory it was written in)
        return Path(hits[0]) if hits else None

    def progress(self, member: dict) -> list[dict]:
        """The trial's per-epoch rows from Tune's progress.csv ([] when absent)."""
        key = ("progress", member["member"])
        if key not in self._acc_cache:
            rows = []
            d = self.trial_dir(member)
            if d is not None and (d / "progress.csv").is_file():
                import csv

                try:
                    with open(d / "progress.csv", newline="") as f:
                        rows = list(csv.DictReader(f))
                except (OSError, csv.Error):
                    rows = []
            self._acc_cache[key] = rows
        return self._acc_cache[key]

    def timing_noise(self) -> tuple[float | None, int]:
        """Median coefficient of variation of epoch_seconds within fixed-schedule trials at one batch size
        (the same work every epoch, so its spread is the machine's timing noise); (cv, trials used)."""
        import statistics

        cvs = []
        for m in self.members:
            if (m.get("config") or {}).get("schedule") == "dbs":
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
            cfg = m.get("config") or {}
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
                return True, f"{m['member']}: batch sizes {bs}, lr up to {max(lrs):g}, momentum up to {max(ms):g}"
            details.append(m["member"])
        if not seen:
            return None, "no progress.csv for the DBS trials"
        return False, (f"no DBS trial ({len(details)}) ever raised its learning rate above lr0, its momentum above m0 "
                       "or its batch size away from B0 (too few epochs for the schedule to act)")

    def history(self, member: dict) -> list[dict]:
        """The member's per-epoch history from members/<member>.json ([] when absent)."""
        d = _read_json(self.root / "members" / f"{member.get('member')}.json")
        h = (d or {}).get("history") if isinstance(d, dict) else None
        return h if isinstance(h, list) else []

    def tb_events(self, member: dict) -> list[str]:
        d = self.trial_dir(member)
        if d is None:
            return []
        return sorted(glob.glob(str(d / "**" / "events.out.tfevents.*"), recursive=True))


def load_experiment(experiment_dir: str | os.PathLike) -> Experiment:
    return Experiment(Path(experiment_dir))


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


# ==================================================================================================
# Claims
# ==================================================================================================
def _fmt_pct(a) -> str:
    return "n/a" if a is None else f"{100 * a:.2f}%"


def _paired(a: dict, b: dict) -> tuple[float, float | None]:
    """(a - b accuracy, paired standard error or None)."""
    import numpy as np

    d = a["acc"] - b["acc"]
    ca, cb = a.get("correct"), b.get("correct")
    if ca is None or cb is None or len(ca) != len(cb) or not np.array_equal(a["labels"], b["labels"]):
        return d, None
    diff = ca.astype(np.float64) - cb.astype(np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None


def _speed_class(r: float, margin: float = TIME_MARGIN) -> str:
    return "faster" if r >= 1 + margin else ("slower" if r <= 1 - margin else "about the same")


RULES = {
    "better": f"A beats B: reproduced when our accuracy difference A - B is > 0 and exceeds {Z} paired standard "
              "errors (from the per-sample test predictions; sign only when those are missing).",
    "gain": f"A raises accuracy over B by about the paper's X points: reproduced when our gain is > 0, exceeds {Z} "
            "paired standard errors, and is at least half of the paper's X.",
    "best": "V is the most accurate variant at sparsity s: reproduced when V ranks first among the variants of this "
            "run at s (ties count as first); the margin over the runner-up and its standard error are shown.",
    "worst": "V is the least accurate variant at sparsity s: reproduced when V ranks last among the variants at s.",
    "speed": f"a speed factor r (time of the reference / time of V) is classed as faster (r >= 1 + margin), slower "
             f"(r <= 1 - margin) or about the same; the paper's r with margin {TIME_MARGIN:g}, ours with margin "
             f"max({TIME_MARGIN:g}, 2 x this run's timing noise: the median coefficient of variation of epoch times "
             "within fixed-batch trials, from their progress.csv); reproduced when the classes agree.  Magnitudes are "
             "not expected to match (other hardware, scale, framework).  DBS claims are 'not run' when no DBS trial "
             "ever changed its learning rate, momentum or batch size (nothing of DBS to test).",
    "least_drop": "C-CNN loses the least accuracy from the lowest to the highest common sparsity: reproduced when its "
                  "drop is the smallest of the variants.",
}


def _claim(cid, text, paper, rule, ours="n/a", verdict=NOT_RUN, detail=""):
    return {"id": cid, "claim": text, "paper": paper, "ours": ours, "verdict": verdict, "rule": rule,
            "detail": detail}


def _better_claim(exp: Experiment, cid, text, paper_txt, a: tuple | None, b: tuple | None, *, gain: float | None = None):
    rule = "gain" if gain is not None else "better"
    if a is None or b is None:
        return _claim(cid, text, paper_txt, rule, detail="a group or rung this needs is not in the run")
    A, B = exp.accuracy(*a), exp.accuracy(*b)
    if A is None or B is None:
        missing = " and ".join(f"{g} at {s:g}" for (g, s), x in ((a, A), (b, B)) if x is None)
        return _claim(cid, text, paper_txt, rule, detail=f"no accuracy for {missing}")
    d, se = _paired(A, B)
    ours = f"{_fmt_pct(A['acc'])} vs {_fmt_pct(B['acc'])}: {100 * d:+.2f} pt" + (f" (SE {100 * se:.2f})" if se else "")
    ok = d > 0 and (se is None or d > Z * se)
    detail = ""
    if d > 0 and se is not None and d <= Z * se:
        detail = "right direction but within noise"
    if gain is not None and ok and 100 * d < gain / 2:
        ok, detail = False, f"gain below half of the paper's {gain:g} pt"
    if se is None:
        detail = (detail + "; " if detail else "") + "sign only (no per-sample predictions)"
    return _claim(cid, text, paper_txt, rule, ours, REPRODUCED if ok else NOT_REPRODUCED, detail)


def _rank_claim(exp: Experiment, cid, variant, s, paper_txt, worst=False):
    text = f"{variant} is the {'least' if worst else 'most'} accurate variant at {100 * s:g}% sparsity"
    rule = "worst" if worst else "best"
    accs = {v: exp.accuracy(v, s) for v in MAIN_VARIANTS if exp.main_group(v)}
    accs = {v: a for v, a in accs.items() if a is not None}
    if variant not in accs or len(accs) < 2:
        return _claim(cid, text, paper_txt, rule, detail=f"the run has no {variant} (or < 2 variants) at {100 * s:g}%")
    order = sorted(accs, key=lambda v: accs[v]["acc"], reverse=not worst)
    top = order[0]
    ok = accs[variant]["acc"] == accs[top]["acc"]
    other = order[1] if top == variant else top
    d, se = _paired(accs[variant], accs[other])
    ours = ", ".join(f"{v} {_fmt_pct(accs[v]['acc'])}" for v in sorted(accs, key=lambda v: -accs[v]["acc"]))
    detail = f"{variant} - {other}: {100 * d:+.2f} pt" + (f" (SE {100 * se:.2f})" if se else "")
    if len(accs) < len(MAIN_VARIANTS):
        detail += f"; only {len(accs)} of {len(MAIN_VARIANTS)} variants ran"
    return _claim(cid, text, paper_txt, rule, ours, REPRODUCED if ok else NOT_REPRODUCED, detail)


def _speed_claim(cid, text, paper_r: float, ours_r: float | None, ours_txt: str = "", detail="",
                 margin: float = TIME_MARGIN):
    if ours_r is None:
        return _claim(cid, text, f"{paper_r:.2f}x ({_speed_class(paper_r)})", "speed",
                      detail=detail or "timings this needs are not in the run")
    ok = _speed_class(paper_r) == _speed_class(ours_r, margin)
    return _claim(cid, text, f"{paper_r:.2f}x ({_speed_class(paper_r)})",
                  "speed", f"{ours_r:.2f}x ({_speed_class(ours_r, margin)})" + (f"; {ours_txt}" if ours_txt else ""),
                  REPRODUCED if ok else NOT_REPRODUCED, detail)


def _overall_time(exp: Experiment, group: str, ladder: list[float]) -> dict | None:
    ts = [exp.time(group, s) for s in ladder]
    ts = [t for t in ts if t]
    if not ts:
        return None
    return {"sum": sum(t["sum"] for t in ts) / len(ts), "max": sum(t["max"] for t in ts) / len(ts), "n": len(ts)}


def build_claims(exp: Experiment, P: dict | None) -> list[dict]:
    if P is None:
        return []
    claims: list[dict] = []

    def nid(prefix: str) -> str:
        return f"{prefix}{sum(c['id'].startswith(prefix) for c in claims) + 1}"

    s_star = P["chosen_sparsity"]
    s_ours = exp.chosen_sparsity(s_star)
    base, _ = exp.baseline()
    margin = exp.time_margin
    acc_p = P["accuracy"][s_star]
    tno = P["tables"]

    def main(v, s):
        return (v, s) if exp.main_group(v) and s is not None else None

    # --- accuracy at the chosen sparsity
    claims.append(_rank_claim(exp, "A1", "SWR-CNN+DBS", s_ours,
                              f"SWR-CNN+DBS {acc_p['SWR-CNN+DBS']}% is best at {100 * s_star:g}% (Fig. {P['figure']}a)"))
    claims[-1]["uses_dbs"] = True
    claims.append(_better_claim(
        exp, "A2", f"Stacking with Winograd-ReLU and DBS (SWR-CNN+DBS) raises test accuracy over C-CNN by about "
                   f"{P['headline']['accuracy_gain']} points (abstract)",
        f"+{P['headline']['accuracy_gain']} pt ({acc_p['SWR-CNN+DBS']}% vs {acc_p['C-CNN']}% at {100 * s_star:g}%)",
        main("SWR-CNN+DBS", s_ours), main("C-CNN", s_ours), gain=P["headline"]["accuracy_gain"]))
    claims[-1]["uses_dbs"] = True
    for i, (a, b) in enumerate((("SC-CNN", "C-CNN"), ("SWR-CNN", "SC-CNN"), ("SWR-CNN+DBS", "SWR-CNN"))):
        pa, pb = acc_p[a], acc_p[b]
        verb = "beats" if pa > pb else "does not beat"
        cl = _better_claim(exp, nid("A"), f"{a} {verb} {b} at {100 * s_star:g}% sparsity",
                           f"{pa}% vs {pb}% ({pa - pb:+.2f} pt)", main(a, s_ours), main(b, s_ours))
        if pa <= pb and cl["verdict"] != NOT_RUN:  # the paper says A does not beat B: invert the verdict
            cl["verdict"] = NOT_REPRODUCED if cl["verdict"] == REPRODUCED and "within noise" not in cl["detail"] else REPRODUCED
            cl["rule"] = "better"
            cl["detail"] = ("inverted: reproduced when A does not significantly beat B; " + cl["detail"]).rstrip("; ")
        cl["dbs_effect"] = a.endswith("+DBS") and not b.endswith("+DBS")
        claims.append(cl)
    for s, v in sorted(P.get("best_at", {}).items()):
        if abs(s - s_star) < 1e-9:
            continue
        quoted = P["accuracy"].get(s, {}).get(v)
        claims.append(_rank_claim(exp, nid("A"), v, s, f"{v} best at {100 * s:g}%"
                                  + (f" ({quoted}%)" if quoted else "")))
        claims[-1]["uses_dbs"] = v.endswith("+DBS")
    for s, v in sorted(P.get("worst_at", {}).items()):
        quoted = P["accuracy"].get(s, {}).get(v)
        claims.append(_rank_claim(exp, nid("A"), v, s, f"{v} worst at {100 * s:g}%"
                                  + (f" ({quoted}%)" if quoted else ""), worst=True))
    if P["title"].startswith(("Fashion", "CIFAR-10 ")):
        claims.append(_least_drop_claim(exp, nid("A")))

    # --- batch size and DBS accuracy
    bs = exp.sweep_batch_sizes()
    for v in SWEEP_VARIANTS:
        pa = P["batch_accuracy"][v]
        lo_hi = f"{pa[64]}% at B=64 -> {pa[1024]}% at B=1024"
        lowers = pa[1024] < pa[64]
        text = f"Raising the batch size from 64 to 1024 {'lowers' if lowers else 'does not lower'} {v}'s accuracy"
        if len(bs) >= 2:
            lo, hi = exp.sweep_cell(v, bs[0]), exp.sweep_cell(v, bs[-1])
            cl = _better_claim(exp, nid("B"), text, f"{lo_hi} (Fig. {P['figure']}b)", lo, hi)
            if (bs[0], bs[-1]) != (64, 1024):
                cl["detail"] = (f"our sweep spans B={bs[0]}..{bs[-1]}; " + cl["detail"]).rstrip("; ")
            if not lowers and cl["verdict"] != NOT_RUN:
                cl["verdict"] = NOT_REPRODUCED if cl["verdict"] == REPRODUCED else REPRODUCED
                cl["detail"] = "inverted (the paper shows no drop); " + cl["detail"]
        else:
            cl = _claim(nid("B"), text, lo_hi, "better", detail="the run swept fewer than two batch sizes")
        claims.append(cl)
    for v in SWEEP_VARIANTS:
        b0 = exp.main_group(v)["b0"] if exp.main_group(v) else 128
        ref = exp.sweep_cell(v, b0)
        p_ref = P["accuracy"][s_star][v]
        claims.append(_better_claim(
            exp, nid("B"), f"DBS raises {v}'s accuracy over a fixed batch of B0={b0}",
            f"{P['batch_accuracy'][v]['DBS']}% vs {p_ref}% at {100 * s_star:g}%", exp.sweep_cell(v, "DBS"), ref))
        claims[-1]["dbs_effect"] = True

    # --- speed
    for v in MAIN_VARIANTS:
        pr = P["sparsity_table"][v]["overall"][1]
        phrase = {"faster": "trains faster than", "slower": "trains slower than",
                  "about the same": "trains about as fast as"}[_speed_class(pr)]
        text = (f"Pruned {v}" + (" (time summed over its members)" if v != "C-CNN" else "")
                + f" {phrase} the dense C-CNN baseline")
        text += f" (Table {tno[0]}, overall over the sparsity ladder)"
        lad = [s for s in exp.rungs_of(v) if s > 0] if exp.main_group(v) else []
        ot = _overall_time(exp, v, lad) if lad else None
        r = base / ot["sum"] if base and ot else None
        txt = f"parallel (max over members): {base / ot['max']:.2f}x" if r and ot["n"] and len(
            exp.groups[v]["members"]) > 1 else ""
        claims.append(_speed_claim(nid("S"), text, pr, r, txt, margin=margin))
        claims[-1]["uses_dbs"] = v.endswith("+DBS")
    for v in SWEEP_VARIANTS:
        pt = P["batch_table"][v]
        p_r = pt[128][0] / pt["DBS"][0]
        b0 = exp.main_group(v)["b0"] if exp.main_group(v) else 128
        ref, dbs = exp.sweep_cell(v, b0), exp.sweep_cell(v, "DBS")
        tr, td = (exp.time(*ref) if ref else None), (exp.time(*dbs) if dbs else None)
        r = tr["sum"] / td["sum"] if tr and td else None
        claims.append(_speed_claim(
            nid("S"), f"DBS speeds {v} up over a fixed batch of B0={b0} (Table {tno[1]}: "
            f"{pt[128][1]:.2f}x -> {pt['DBS'][1]:.2f}x)", p_r, r, margin=margin))
        claims[-1]["dbs_effect"] = True
    ref_b = (64, 1024)
    for v in SWEEP_VARIANTS:
        pt = P["batch_table"][v]
        p_r = pt[ref_b[0]][0] / pt[ref_b[1]][0]
        if len(bs) >= 2:
            lo, hi = exp.sweep_cell(v, bs[0]), exp.sweep_cell(v, bs[-1])
            tl, th = (exp.time(*lo) if lo else None), (exp.time(*hi) if hi else None)
            r = tl["sum"] / th["sum"] if tl and th else None
            extra = f"B={bs[0]} -> B={bs[-1]}" if (bs[0], bs[-1]) != ref_b else ""
        else:
            r, extra = None, ""
        claims.append(_speed_claim(nid("S"), f"A larger batch (64 -> 1024) trains {v} faster per epoch",
                                   p_r, r, extra, margin=margin))
    # headline speed: SWR-CNN+DBS at the chosen sparsity vs the dense baseline
    t = exp.time("SWR-CNN+DBS", s_ours) if exp.main_group("SWR-CNN+DBS") and s_ours is not None else None
    claims.append(_speed_claim(
        nid("S"), f"SWR-CNN+DBS trains {P['headline']['speed']}x faster than the dense C-CNN baseline "
        "(abstract; summed member time)", P["headline"]["speed"], base / t["sum"] if base and t else None,
        f"parallel: {base / t['max']:.2f}x" if base and t else "", margin=margin))
    claims[-1]["uses_dbs"] = True

    active, why = exp.dbs_activity()
    if active is False:
        for c in claims:
            if c.get("dbs_effect") and c["verdict"] != NOT_RUN:
                c["verdict"] = NOT_RUN
                c["detail"] = f"DBS never acted in this run ({why}); " + c["detail"]
            elif c.get("uses_dbs"):
                c["detail"] = ("DBS never acted in this run: the +DBS group trained like its fixed-batch twin; "
                               + c["detail"]).rstrip("; ")
    for c in claims:
        c.pop("dbs_effect", None)
        c.pop("uses_dbs", None)
    return claims


def _least_drop_claim(exp: Experiment, cid: str) -> dict:
    text = "C-CNN loses the least accuracy as sparsity grows (section 5.1)"
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)]
    common = None
    for v in variants:
        rs = {s for s in exp.rungs_of(v) if s > 0}
        common = rs if common is None else common & rs
    if not variants or "C-CNN" not in variants or not common or len(common) < 2:
        return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop",
                      detail="needs C-CNN and two common pruned rungs")
    lo, hi = min(common), max(common)
    drops = {}
    for v in variants:
        a, b = exp.accuracy(v, lo), exp.accuracy(v, hi)
        if a and b:
            drops[v] = a["acc"] - b["acc"]
    if "C-CNN" not in drops or len(drops) < 2:
        return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop", detail="accuracies missing")
    ok = drops["C-CNN"] <= min(drops.values())
    ours = "drop " + ", ".join(f"{v} {100 * d:.2f} pt" for v, d in drops.items()) + f" ({100 * lo:g}% -> {100 * hi:g}%)"
    return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop", ours,
                  REPRODUCED if ok else NOT_REPRODUCED)


def order_line(exp: Experiment, P: dict | None) -> str:
    if P is None:
        return "No published numbers for this dataset: no order to compare."
    s = P["chosen_sparsity"]
    paper = sorted(P["accuracy"][s], key=lambda v: -P["accuracy"][s][v])
    s_ours = exp.chosen_sparsity(s)
    accs = {v: exp.accuracy(v, s_ours) for v in MAIN_VARIANTS if exp.main_group(v)}
    accs = {v: a["acc"] for v, a in accs.items() if a}
    if len(accs) < 2:
        return f"Accuracy order at {100 * s:g}%: paper {' > '.join(paper)}; ours not run."
    ours = sorted(accs, key=lambda v: -accs[v])
    common = [v for v in paper if v in accs]
    pairs = agree = 0
    for i in range(len(common)):
        for j in range(i + 1, len(common)):
            pairs += 1
            agree += (accs[common[i]] > accs[common[j]])
    same = [v for v in paper if v in accs] == ours and len(set(accs.values())) == len(accs)
    chain = ours[0]
    for a, b in zip(ours, ours[1:]):
        chain += (" = " if accs[a] == accs[b] else " > ") + b
    return (f"Accuracy order at {100 * s:g}% sparsity (ours at {100 * s_ours:g}%): paper {' > '.join(paper)}; ours "
            f"{chain} -- {'the same order' if same else 'a different order'} "
            f"({agree} of {pairs} pairs ordered as in the paper).")


# ==================================================================================================
# Document model: a list of blocks rendered to Markdown and HTML
# ==================================================================================================
class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level, text, anchor=None):
        self.blocks.append(("h", level, text, anchor))

    def p(self, text):
        self.blocks.append(("p", text))

    def ul(self, items):
        self.blocks.append(("ul", list(items)))

    def table(self, headers, rows, caption=None):
        self.blocks.append(("table", headers, rows, caption))

    def img(self, path, alt, caption):
        self.blocks.append(("img", path, alt, caption))

    def pre(self, text):
        self.blocks.append(("pre", text))

    def markdown(self, out_dir: Path) -> str:
        lines = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                lines += [b[1], ""]
            elif kind == "ul":
                lines += [f"- {x}" for x in b[1]] + [""]
            elif kind == "table":
                _, headers, rows, caption = b
                if caption:
                    lines += [f"*{caption}*", ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                lines.append("")
            elif kind == "img":
                _, path, alt, caption = b
                if path:
                    lines += [f"![{alt}]({os.path.relpath(path, out_dir)})", "", f"*{caption}*", ""]
                else:
                    lines += [f"*{caption}: {NOT_RUN}*", ""]
            elif kind == "pre":
                lines += ["```", b[1], "```", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                aid = f' id="{b[3]}"' if b[3] else ""
                body.append(f"<h{b[1]}{aid}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                _, headers, rows, caption = b
                cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in headers)
                trs = "".join("<tr>" + "".join(f"<td{_cls(c)}>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>')
            elif kind == "img":
                _, path, alt, caption = b
                if path:
                    data = base64.b64encode(Path(path).read_bytes()).decode()
                    body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
                                f'data-file="{html.escape(os.path.basename(path))}"><figcaption>{_inline(caption)}'
                                "</figcaption></figure>")
                else:
                    body.append(f'<p class="notrun"><em>{_inline(caption)}: {NOT_RUN}</em></p>')
            elif kind == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;
color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
caption{caption-side:top;text-align:left;font-style:italic;padding:4px 0}
td.ok{background:#e3f6e3}td.bad{background:#fbe3e3}td.nr{background:#eee;color:#666}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#444}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}h2{border-bottom:1px solid #ddd;margin-top:1.6em}
.notrun{color:#777}
"""


_NUMERIC = re.compile(r"[-+]?\d[\d.,]*\s*(%|x|s|pt)?|n/a")


def _cls(c) -> str:
    c = str(c)
    v = {REPRODUCED: ' class="ok"', NOT_REPRODUCED: ' class="bad"', NOT_RUN: ' class="nr"'}.get(c, "")
    return v or (' class="num"' if _NUMERIC.fullmatch(c.strip()) else "")


def _md_cell(c) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return t


# ==================================================================================================
# Sections
# ==================================================================================================
def _n(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _sp(s) -> str:
    return "dense (0%)" if s == 0 else f"{100 * s:g}%"


def _scale_text(exp: Experiment) -> str:
    t = exp.train_cfg
    c = exp.config
    ds = (exp.summary or {}).get("dataset") or c.get("dataset")
    return (f"{ds}; subset={c.get('subset')}, test_subset={c.get('test_subset')}, width={t.get('width')}, "
            f"dense epochs={t.get('epochs')}, retrain epochs/rung={t.get('retrain_epochs')}, "
            f"ladder={t.get('sparsity_ladder')}, B0={(t.get('dbs') or {}).get('b0', 128)}, "
            f"members={c.get('members')}")


def _hardware(exp: Experiment) -> str:
    prov = (exp.summary or {}).get("provenance") or {}
    dev = prov.get("device") or {}
    if not dev:
        return "unknown (no provenance in summary.json)"
    parts = [str(dev.get("cpu") or "cpu ?"), f"{dev.get('cpu_count')} CPUs"]
    cpus = (exp.config.get("resources") or {}).get("cpus_per_trial")
    if cpus and not dev.get("cuda_device"):
        # The driver's own thread count says nothing about the trials: each runs
        # max(1, int(cpus_per_trial)) torch threads (esdbs_ray.trainable).
        n = max(1, int(cpus))
        parts.append(f"Tune trials at cpus_per_trial={cpus:g} ({n} torch thread{'s' * (n > 1)} each)")
    else:
        parts.append(f"torch threads {dev.get('torch_threads')}")
    if dev.get("cuda_device"):
        parts.insert(0, str(dev["cuda_device"]))
    return ", ".join(parts) + ", PyTorch " + str((prov.get("versions") or {}).get("torch", "?"))


def _section_sparsity_tables(doc: Doc, exp: Experiment, P: dict | None, base, base_txt, tno) -> dict:
    """Tables 1/3/5: time and speed vs sparsity; returns the speed curves for a figure."""
    doc.h(2, f"Table {tno}: training time and speed vs sparsity", "table-sparsity")
    curves = {}
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)] + [
        v for v in exp.main_variants if v not in MAIN_VARIANTS]
    if not variants:
        doc.p(f"**Ours: {NOT_RUN}** (no main variant groups in this run).")
    else:
        doc.p(f"Ours. Baseline: {base_txt}" + (f", {base:.3f} s/epoch." if base else ".") +
              " Time = mean training seconds per epoch of the rung's retraining epochs; stacks: summed over members "
              "(Σ) and the maximum over members (∥, members as parallel trials). Speed = baseline / time.")
        rungs = sorted({s for v in variants for s in exp.rungs_of(v)})
        headers = ["sparsity"]
        for v in variants:
            stacked = len(exp.groups[v]["members"]) > 1
            headers += [f"{v} time Σ (s)", f"{v} speed Σ"] + ([f"{v} speed ∥"] if stacked else [])
        rows = []
        for s in rungs + ["overall"]:
            row = [_sp(s) if s != "overall" else "overall (pruned rungs)"]
            for v in variants:
                stacked = len(exp.groups[v]["members"]) > 1
                if s == "overall":
                    t = _overall_time(exp, v, [x for x in exp.rungs_of(v) if x > 0])
                else:
                    t = exp.time(v, s)
                if t is not None and s != "overall":
                    curves.setdefault(v, {})[s] = base / t["sum"] if base else None
                row += [_n(t["sum"], "{:.3f}") if t else "n/a",
                        (_n(base / t["sum"]) + "x") if (t and base) else "n/a"]
                if stacked:
                    row.append((_n(base / t["max"]) + "x") if (t and base) else "n/a")
            rows.append(row)
        doc.table(headers, rows, f"Ours ({exp.config.get('name')}): seconds per epoch and speed vs sparsity "
                                 f"[{_hardware(exp)}; {_short_scale(exp)}]")
        dense = exp.train_cfg.get("epochs")
        if base and isinstance(dense, int) and dense <= 1:
            doc.p(f"**Caution:** the run has {dense} dense epoch(s), so the baseline time is the trial's *first* epoch, "
                  "which carries start-up costs (thread pools, allocator, first-touch of the data); every speed "
                  "against it is biased upwards.")
        bw = _f((exp.summary or {}).get("base_wall_seconds"))
        if bw is not None:
            longest = max((_f(m.get("train_seconds")) or 0.0 for m in exp.members), default=0.0)
            doc.p(f"Measured wall time of the whole base stage (all {len(exp.members)} trials as parallel Tune trials, "
                  f"every rung and evaluation included): {bw:.0f} s."
                  + (f" **Not usable:** it is shorter than the longest trial's own training time ({longest:.0f} s), so "
                     "summary.json was written by a resumed run that timed only its own part." if bw < longest else ""))
    if P:
        t = P["sparsity_table"]
        headers = ["sparsity"] + [x for v in MAIN_VARIANTS for x in (f"{v} time (s)", f"{v} speed")]
        rows = [[(_sp(s) if s != "overall" else "overall")] + [x for v in MAIN_VARIANTS for x in
                                                                (f"{t[v][s][0]:g}", f"{t[v][s][1]:.2f}x")]
                for s in list(PN.SPARSITIES) + ["overall"]]
        doc.table(headers, rows, f"The paper's Table {tno} ({PN.HARDWARE}; baseline {P['baseline_seconds']} s/epoch)")
    return curves


def _section_batch_tables(doc: Doc, exp: Experiment, P: dict | None, base, tno) -> None:
    doc.h(2, f"Table {tno}: training time and speed vs batch size", "table-batch")
    s = exp.sweep_sparsity(P["chosen_sparsity"] if P else None)
    bs = exp.sweep_batch_sizes()
    cells = {(v, b): exp.sweep_cell(v, b) for v in SWEEP_VARIANTS for b in [*bs, "DBS"]}
    if not any(cells.values()):
        doc.p(f"**Ours: {NOT_RUN}** (no batch-size sweep groups in this run).")
    else:
        doc.p(f"Ours at {100 * s:g}% sparsity (config `batch_sweep.sparsity`). A B=B0 row of a variant that also ran "
              "as a main variant is that main group's rung (it is not re-run). Stacks: time summed over members (Σ), "
              "speed also for parallel members (∥).")
        headers = ["batch size"] + [x for v in SWEEP_VARIANTS for x in (f"{v} time Σ (s)", f"{v} speed Σ")
                                    + ((f"{v} speed ∥",) if v != "C-CNN" else ())]
        rows = []
        for b in [*bs, "DBS"]:
            row = [str(b) if b != "DBS" else "DBS (ours)"]
            for v in SWEEP_VARIANTS:
                c = cells[(v, b)]
                t = exp.time(*c) if c else None
                row += [_n(t["sum"], "{:.3f}") if t else "n/a", (_n(base / t["sum"]) + "x") if (t and base) else "n/a"]
                if v != "C-CNN":
                    row.append((_n(base / t["max"]) + "x") if (t and base) else "n/a")
            rows.append(row)
        doc.table(headers, rows, f"Ours: seconds per epoch and speed vs batch size [{_hardware(exp)}] (group used per cell: "
                  + "; ".join(f"{v}/{b}: {c[0]}" for (v, b), c in cells.items() if c) + ")")
    if P:
        t = P["batch_table"]
        headers = ["batch size"] + [x for v in SWEEP_VARIANTS for x in (f"{v} time (s)", f"{v} speed")]
        rows = [[str(b) if b != "DBS" else "DBS (ours)"] + [x for v in SWEEP_VARIANTS for x in
                                                             (f"{t[v][b][0]:g}", f"{t[v][b][1]:.2f}x")]
                for b in [*PN.BATCH_SIZES, "DBS"]]
        doc.table(headers, rows, f"The paper's Table {tno} at {100 * P['chosen_sparsity']:g}% sparsity ({PN.HARDWARE})")


def _section_accuracy(doc: Doc, exp: Experiment, P: dict | None, out: Path, fig_no) -> dict:
    figs = {}
    doc.h(2, f"Figure {fig_no}: test accuracy", "accuracy")
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)]
    sources = set()
    curves: dict[str, dict] = {}
    rungs = sorted({s for v in variants for s in exp.rungs_of(v)})
    for v in variants:
        for s in exp.rungs_of(v):
            a = exp.accuracy(v, s)
            curves.setdefault(v, {})[s] = 100 * a["acc"] if a else None
            if a and len(exp.groups[v]["members"]) > 1:
                sources.add(a["source"])
    doc.h(3, f"({fig_no}a) accuracy vs sparsity")
    if variants:
        doc.p("Stacked variants: ensemble accuracy from the Parquet predictions. " + "; ".join(sorted(sources)) + ".")
        rows = [[_sp(s)] + [(_n(curves[v].get(s)) + "%") if curves[v].get(s) is not None else "n/a" for v in variants]
                for s in rungs]
        doc.table(["sparsity"] + variants, rows, "Ours: test accuracy")
    else:
        doc.p(f"**Ours: {NOT_RUN}.**")
    if P:
        rows = [[_sp(s)] + [f"{d[v]}%" if v in d else "" for v in MAIN_VARIANTS] for s, d in sorted(P["accuracy"].items())]
        doc.table(["sparsity"] + list(MAIN_VARIANTS), rows,
                  f"The paper's accuracies quoted in section {P['section']} (Fig. {fig_no}a; {PN.HARDWARE})")
    path = out / f"fig{fig_no}a_accuracy_vs_sparsity.png"
    from . import figures

    if variants:
        figs["accuracy_vs_sparsity"] = figures.accuracy_vs_sparsity(
            str(path), curves, P["accuracy"] if P else None, title=f"Fig. {fig_no}a: test accuracy vs sparsity",
            ours_note=_short_scale(exp), paper_note=PN.HARDWARE)
    doc.img(figs.get("accuracy_vs_sparsity"), f"Figure {fig_no}a",
            f"Fig. {fig_no}a: test accuracy vs sparsity, ours (left) and the paper's quoted values (right)")

    # (b) vs batch size
    doc.h(3, f"({fig_no}b) accuracy vs batch size")
    bs = exp.sweep_batch_sizes()
    s = exp.sweep_sparsity(P["chosen_sparsity"] if P else None)
    bcurves: dict[str, dict] = {}
    for v in SWEEP_VARIANTS:
        for b in [*bs, "DBS"]:
            c = exp.sweep_cell(v, b)
            a = exp.accuracy(*c) if c else None
            if a:
                bcurves.setdefault(v, {})[b] = 100 * a["acc"]
    if bcurves:
        rows = [[str(b) if b != "DBS" else "DBS"] + [(_n(bcurves.get(v, {}).get(b)) + "%")
                                                     if bcurves.get(v, {}).get(b) is not None else "n/a"
                                                     for v in SWEEP_VARIANTS] for b in [*bs, "DBS"]]
        doc.table(["batch size"] + list(SWEEP_VARIANTS), rows, f"Ours: test accuracy at {100 * s:g}% sparsity")
    else:
        doc.p(f"**Ours: {NOT_RUN}** (no batch-size sweep).")
    pb = None
    if P:
        pb = {v: {**{b: a for b, a in P["batch_accuracy"][v].items()},
                  128: P["accuracy"][P["chosen_sparsity"]][v]} for v in SWEEP_VARIANTS}
        rows = [[str(b)] + [f"{pb[v][b]}%" if b in pb[v] else "" for v in SWEEP_VARIANTS]
                for b in (64, 128, 1024, "DBS")]
        doc.table(["batch size"] + list(SWEEP_VARIANTS), rows,
                  f"The paper's accuracies quoted in section {P['section']} (Fig. {fig_no}b; B=128 from Fig. {fig_no}a)")
    if bcurves:
        figs["accuracy_vs_batch"] = figures.accuracy_vs_batch(
            str(out / f"fig{fig_no}b_accuracy_vs_batch.png"), {v: bcurves.get(v, {}) for v in SWEEP_VARIANTS}, pb,
            title=f"Fig. {fig_no}b: test accuracy vs batch size", ours_note=f"{100 * s:g}% sparsity; {_short_scale(exp)}",
            paper_note=PN.HARDWARE)
    doc.img(figs.get("accuracy_vs_batch"), f"Figure {fig_no}b",
            f"Fig. {fig_no}b: test accuracy vs batch size, ours (left) and the paper's quoted values (right)")
    return figs


def _short_scale(exp: Experiment) -> str:
    t = exp.train_cfg
    return (f"subset {exp.config.get('subset')}, width {t.get('width')}, {t.get('epochs')}+"
            f"{t.get('retrain_epochs')}/rung epochs")


def _section_kernels(doc: Doc, exp: Experiment, out: Path) -> str | None:
    doc.h(2, "Figure 5a: Winograd-domain kernels at each sparsity", "kernels")
    order = ["SWR-CNN+DBS", "SWR-CNN", "C-CNN+DBS", "SC-CNN+DBS"]
    cands = sorted(
        (m for m in exp.members if ((m.get("config") or {}).get("conv") == "winograd_relu")),
        key=lambda m: (order.index(m.get("group")) if m.get("group") in order else len(order), m["member"]))
    # prefer the paper's choice of layer owner: the base model of the stack (first member)
    first = (exp.config.get("members") or [None])[0]
    first_models = [first.get("model") if isinstance(first, dict) else first]
    cands.sort(key=lambda m: 0 if m.get("model") in first_models else 1)
    path = out / "fig5a_kernels.png"
    for m in cands:
        events = exp.tb_events(m)
        if events:
            try:
                _, imgs = _tb_read(events, images=True)
            except Exception:
                imgs = {}
            if imgs.get("winograd_kernels"):
                path.write_bytes(imgs["winograd_kernels"][-1])
                doc.p(f"From the TensorBoard image `winograd_kernels` of trial {m['member']} (group {m.get('group')}, "
                      f"model {m.get('model')}); rows: first 6 output channels, columns: first 6 input channels of its "
                      f"Winograd layer {(m.get('config') or {}).get('kernel_layer', 0)}; pruned values in black.")
                doc.img(str(path), "Figure 5a", "Fig. 5a: Winograd-domain kernels (ours)")
                return str(path)
        d = exp.trial_dir(m)
        if d is not None and (d / "kernels.png").is_file():
            shutil.copyfile(d / "kernels.png", path)
            doc.p(f"From `kernels.png` of trial {m['member']} (group {m.get('group')}, model {m.get('model')}).")
            doc.img(str(path), "Figure 5a", "Fig. 5a: Winograd-domain kernels (ours)")
            return str(path)
    doc.img(None, "Figure 5a", "Fig. 5a (no Winograd trial with a kernel image in this run)")
    return None


def _section_momentum(doc: Doc, exp: Experiment, out: Path) -> str | None:
    doc.h(2, "Figure 5b: momentum increase for several k", "momentum")
    dbs = exp.train_cfg.get("dbs") or {}
    try:
        from esdbs_ray.dbs import plot_momentum_curves

        kw = {k: dbs[k] for k in ("v0", "m0", "m_max") if isinstance(dbs.get(k), (int, float))}
        path = plot_momentum_curves(str(out / "fig5b_momentum.png"), **kw)
    except Exception as exc:
        doc.p(f"Could not draw the curves: {exc}")
        doc.img(None, "Figure 5b", "Fig. 5b")
        return None
    doc.p("y'' y = k with y = 1 - m (spec section 4), integrated numerically by `esdbs_ray.dbs`; constants from this "
          f"run's config ({', '.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}). The paper picks k ≈ 1.60.")
    doc.img(path, "Figure 5b", "Fig. 5b: momentum coefficient vs proportion of epochs")
    return path


def _section_dbs_trace(doc: Doc, exp: Experiment, out: Path) -> str | None:
    doc.h(2, "DBS schedule as trained (TensorBoard)", "dbs-trace")
    traces = {}
    for m in exp.members:
        if (m.get("config") or {}).get("schedule") != "dbs":
            continue
        ev = exp.tb_events(m)
        if not ev:
            continue
        try:
            sc, _ = _tb_read(ev)
        except Exception:
            continue
        if sc.get("schedule/batch_size"):
            traces[m["member"]] = sc
    if not traces:
        doc.img(None, "DBS schedule", "Batch size / learning rate / momentum per epoch of the DBS trials")
        return None
    from . import figures

    path = figures.dbs_schedule(str(out / "dbs_schedule.png"), traces, title="DBS trials: schedule per epoch")
    doc.img(path, "DBS schedule", "Batch size, learning rate and momentum per epoch of every DBS trial "
                                  "(TensorBoard tags schedule/*)")
    return path


def _section_stacking(doc: Doc, exp: Experiment) -> None:
    doc.h(2, "Stacking", "stacking")
    if not exp.stackings:
        doc.p(f"**{NOT_RUN}**: no stacking*.json in the experiment directory.")
        return
    doc.p("Weights fitted on the validation split only; `*` marks the method the ensemble uses (chosen on "
          "validation data).")
    for group, st in exp.stackings.items():
        names = list(st.get("member_names") or [])
        rows = []
        for meth, r in (st.get("methods") or {}).items():
            ws = " / ".join(f"{(r.get('weights') or {}).get(n, float('nan')):.3f}" for n in names)
            rows.append([("* " if meth == st.get("chosen") else "") + meth, ws,
                         _fmt_pct(_f(r.get("val_accuracy"))), _n(_f(r.get("val_nll")), "{:.4f}"),
                         _fmt_pct(_f(r.get("test_accuracy"))), _n(_f(r.get("test_nll")), "{:.4f}")])
        for n in names:
            r = (st.get("members") or {}).get(n) or {}
            rows.append([f"member {n}", "", _fmt_pct(_f(r.get("val_accuracy"))), _n(_f(r.get("val_nll")), "{:.4f}"),
                         _fmt_pct(_f(r.get("test_accuracy"))), _n(_f(r.get("test_nll")), "{:.4f}")])
        sp = st.get("sparsity")
        doc.table(["method", "weights (" + ", ".join(names) + ")", "val acc", "val NLL", "test acc", "test NLL"], rows,
                  f"{group} ({st.get('_file')}; rung {'last' if sp is None else _sp(sp)}; n_val={st.get('n_val')}, "
                  f"n_test={st.get('n_test')})")


def _section_classes(doc: Doc, exp: Experiment) -> bool:
    """Test accuracy per class, by name, of each stacked ensemble and its members (issue #17: a user's
    own classes; the names come from the prediction files through stacking*.json)."""
    doc.h(2, "Accuracy per class", "classes")
    shown = False
    for group, st in exp.stackings.items():
        pc, names = st.get("per_class"), st.get("class_names")
        if not pc:
            continue
        members = list(st.get("member_names") or [])
        labels = names or [f"class {i}" for i in range(len(pc["support"]))]
        rows = [[labels[c], pc["support"][c], _fmt_pct(_f(pc["ensemble"][c]))]
                + [_fmt_pct(_f(pc["members"][m][c])) for m in members] for c in range(len(pc["support"]))]
        doc.table(["class", "test images", f"ensemble ({st.get('chosen')})", *members], rows,
                  f"{group}: test accuracy of each true class (recall)" + ("" if names else "; no class names recorded"))
        shown = True
    if not shown:
        doc.p(f"**{NOT_RUN}** (no stacking*.json with per-class results)")
    return shown


def _section_claims(doc: Doc, exp: Experiment, P: dict | None, claims: list[dict]) -> None:
    doc.h(2, "The paper's claims and our verdicts", "claims")
    if P is None:
        doc.p(f"**{NOT_RUN}**: the dataset ({exp.config.get('dataset')}) is not one of the paper's.")
        return
    counts = {k: sum(c["verdict"] == k for c in claims) for k in (REPRODUCED, NOT_REPRODUCED, NOT_RUN)}
    doc.p(f"{counts[REPRODUCED]} reproduced, {counts[NOT_REPRODUCED]} not reproduced, {counts[NOT_RUN]} not run. "
          "Our numbers come from this run's scale and hardware (see Provenance), the paper's from full-scale "
          f"training on {PN.HARDWARE}; a small run can only test directions, not magnitudes.")
    doc.p(f"Every trial trained once (seed {exp.config.get('seed', '?')}). The standard errors of the accuracy "
          "claims are those of the test sample (paired over the same images); they leave out the run-to-run "
          "variance of training itself, which one seed cannot measure, so an accuracy verdict decided by a point "
          "or two is provisional until more seeds agree.")
    doc.p(order_line(exp, P))
    cv, n = exp.timing_noise()
    doc.p(f"Timing noise of this run: " + (f"median within-trial coefficient of variation of epoch times {100 * cv:.1f}% "
                                         f"({n} fixed-batch trials)" if cv is not None else "unknown (no progress.csv)")
          + f"; our speed factors count as faster/slower only beyond ±{100 * exp.time_margin:.0f}%.")
    active, why = exp.dbs_activity()
    if active is not None:
        doc.p(f"DBS activity: {'the schedule acted' if active else '**the schedule never acted**'} ({why}).")
    doc.table(["id", "claim", "paper", "ours", "verdict", "rule", "note"],
              [[c["id"], c["claim"], c["paper"], c["ours"], c["verdict"], c["rule"], c["detail"]] for c in claims])
    doc.p("Verdict rules:")
    doc.ul([f"**{k}**: {v}" for k, v in RULES.items()] +
           [f"**not run**: the run lacks a group, rung or artifact the claim needs."])


def _section_provenance(doc: Doc, exp: Experiment) -> None:
    doc.h(2, "Provenance", "provenance")
    s = exp.summary or {}
    prov = s.get("provenance") or {}
    doc.ul([
        f"experiment: `{exp.root}` (name {exp.config.get('name')})",
        f"git revision: {prov.get('git_revision', 'unknown')}",
        f"versions: {json.dumps(prov.get('versions') or {}, sort_keys=True)}",
        f"host: {prov.get('host', 'unknown')}",
        f"hardware (ours): {_hardware(exp)}",
        f"hardware (paper): {PN.HARDWARE}",
        f"scale (ours): {_scale_text(exp)}",
        f"wall time: base stage {_n(_f(s.get('base_wall_seconds')), '{:.0f}')} s (members trained as parallel Tune "
        f"trials), whole run {_n(_f(s.get('wall_seconds')), '{:.0f}')} s",
    ])
    if exp.problems:
        doc.p("Missing or unusable artifacts:")
        doc.ul(exp.problems)
    import yaml

    doc.p("Config (config.yaml):")
    doc.pre(yaml.safe_dump(exp.config, sort_keys=False) if exp.config else NOT_RUN)


def _section_sparsity_accounting(doc: Doc, exp: Experiment) -> bool:
    """Nominal (pruned-layer) sparsity beside whole-model sparsity and nonzero counts, per main variant."""
    doc.h(2, "Sparsity: pruned layers vs the whole model", "sparsity-accounting")
    rows = []
    for v in exp.main_variants:
        g = exp.main_group(v)
        if not g:
            continue
        for s in exp.rungs_of(v):
            rs = [exp.rung(m, s) for m in g["members"]]
            if not rs or any(r is None or _f(r.get("model_sparsity")) is None for r in rs):
                continue
            nz = sum(int(r.get("nonzero_weights") or 0) for r in rs)
            tot = sum(int(r.get("total_weights") or 0) for r in rs)
            rows.append([v, _sp(s), _sp(sum(_f(r["sparsity"]) for r in rs) / len(rs)),
                         _sp(1 - nz / tot) if tot else "n/a", f"{nz:,}", f"{tot:,}"])
    if not rows:
        doc.p(f"**{NOT_RUN}** (members' rungs carry no whole-model counts: written by an older esdbs)")
        return False
    doc.table(["variant", "nominal", "pruned layers", "whole model", "nonzero weights", "weights"], rows,
              "Stacks: summed over members (pruned-layer sparsity averaged). The paper states the nominal figure only.")
    return True


def _section_dbs_decisions(doc: Doc, exp: Experiment) -> bool:
    """What the DBS schedule did in each DBS trial: the batch-size range and every logged decision."""
    doc.h(2, "DBS decisions per trial", "dbs-decisions")
    rows = []
    for m in exp.members:
        cfg = m.get("config") or {}
        if cfg.get("schedule") != "dbs":
            continue
        hist = exp.history(m)
        if not hist:
            continue
        bs = [int(h["batch_size"]) for h in hist]
        top = max(bs)
        first_top = next(h["epoch"] for h in hist if int(h["batch_size"]) == top)
        decisions = "; ".join(f"e{h['epoch']}: {h['decision']}" for h in hist
                              if h.get("decision") and not h["decision"].startswith(("warm-up", "lr phase: level")))
        rows.append([m["member"], f"{bs[0]} -> {top} (epoch {first_top})", f"{max(h['lr'] for h in hist):.4g}",
                     f"{max(h['momentum'] for h in hist):.4g}", decisions or "none"])
    if not rows:
        doc.p(f"**{NOT_RUN}** (no DBS trial with a per-epoch history in members/)")
        return False
    doc.table(["member", "B (first -> largest)", "max lr", "max m", "decisions (epoch: why)"], rows)
    return True


def _section_members(doc: Doc, exp: Experiment) -> None:
    doc.h(2, "Members", "members")
    if not exp.members:
        doc.p(f"**{NOT_RUN}**")
        return
    rows = []
    for m in exp.members:
        rungs = "; ".join(f"{_sp(float(r['target_sparsity']))}: {_fmt_pct(_f(r.get('test_accuracy')))}, "
                          f"{_n(_f(r.get('mean_epoch_seconds')), '{:.2f}')} s"
                          for r in m.get("rungs") or [] if _f(r.get("target_sparsity")) is not None)
        last = (m.get("rungs") or [{}])[-1]
        rows.append([m.get("member"), m.get("group"), m.get("model"), ((m.get("config") or {}).get("conv")),
                     m.get("batch_size") or f"B0={((m.get('config') or {}).get('dbs') or {}).get('b0')}"
                     + (" DBS" if (m.get("config") or {}).get("schedule") == "dbs" else ""),
                     m.get("epochs"), _n(_f(m.get("train_seconds")), "{:.1f}"), m.get("steps"),
                     _sp(_f(last.get("sparsity"))) if _f(last.get("sparsity")) is not None else "n/a",
                     _sp(_f(last.get("model_sparsity"))) if _f(last.get("model_sparsity")) is not None else "n/a",
                     f"{last['nonzero_weights']:,}" if isinstance(last.get("nonzero_weights"), int) else "n/a", rungs])
    doc.table(["member", "group", "model", "conv", "batch", "epochs", "train s", "steps", "pruned layers",
               "whole model", "nonzero weights", "rungs (test acc, s/epoch)"], rows,
              "Sparsity at the last rung: of the pruned 3x3 layers (the nominal figure) and of every learnable "
              "parameter (stem, 1x1 convs, classifier and batch norms stay dense); a Winograd layer keeps 16/9 as many "
              "nonzeros as the spatial layer it replaces at the same nominal sparsity (spec §3).")


# ==================================================================================================
# Entry point
# ==================================================================================================
def build_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Write ``report.md``, ``report.html`` (self-contained) and PNG figures for an experiment directory.

    Returns ``{"out_dir", "markdown", "html", "figures": {name: path or None}, "claims": [...],
    "sections": {name: "ok" | "not run"}, "problems": [...]}``.  Missing artifacts give "not run"
    sections; a directory without any esdbs artifact still yields a (mostly "not run") report.
    """
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such experiment directory")
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    exp = Experiment(root)
    key = exp.dataset
    P = PN.PAPER.get(key) if key else None
    tno = P["tables"] if P else ("1/3/5", "2/4/6")
    fig_no = P["figure"] if P else "2-4"
    base, base_txt = exp.baseline()

    doc = Doc()
    title = f"esdbs report: {exp.config.get('name', root.name)}" + (f" -- {P['title']}" if P else "")
    doc.h(1, title)
    doc.p(f"Paper: *Efficient Ensemble Sparse CNNs with Dynamic Batch Size* (Zheng, Wang, Gupta), section "
          f"{P['section'] if P else '4'}. Paper's numbers: {PN.HARDWARE}. Ours: {_hardware(exp)}; scale: {_scale_text(exp)}.")
    claims = build_claims(exp, P)
    figs: dict[str, str | None] = {}
    _section_claims(doc, exp, P, claims)
    curves = _section_sparsity_tables(doc, exp, P, base, base_txt, tno[0])
    if curves:
        from . import figures

        figs["speed_vs_sparsity"] = figures.time_vs_sparsity(
            str(out / "speed_vs_sparsity.png"), curves, P["sparsity_table"] if P else None,
            title="Speed vs sparsity (summed member time for stacks)", ours_note=_short_scale(exp))
        doc.img(figs["speed_vs_sparsity"], "speed vs sparsity", "Speed vs sparsity, ours (left) and the paper's table (right)")
    _section_batch_tables(doc, exp, P, base, tno[1])
    figs.update(_section_accuracy(doc, exp, P, out, fig_no))
    figs.setdefault("accuracy_vs_sparsity", None)
    figs.setdefault("accuracy_vs_batch", None)
    figs["kernels"] = _section_kernels(doc, exp, out)
    figs["momentum"] = _section_momentum(doc, exp, out)
    figs["dbs_schedule"] = _section_dbs_trace(doc, exp, out)
    decisions_ok = _section_dbs_decisions(doc, exp)
    accounting_ok = _section_sparsity_accounting(doc, exp)
    _section_stacking(doc, exp)
    classes_ok = _section_classes(doc, exp)
    _section_members(doc, exp)
    if P:
        doc.h(2, "Errata in the paper", "errata")
        doc.ul(PN.PAPER_ERRATA)
    _section_provenance(doc, exp)

    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(out))
    html_path.write_text(doc.html(title))
    sections = {
        "claims": "ok" if claims else NOT_RUN,
        "sparsity_table": "ok" if curves else NOT_RUN,
        "batch_table": "ok" if any(exp.sweep_cell(v, b) for v in SWEEP_VARIANTS for b in [*exp.sweep_batch_sizes(), "DBS"]) else NOT_RUN,
        "stacking": "ok" if exp.stackings else NOT_RUN,
        "classes": "ok" if classes_ok else NOT_RUN,
        "dbs_decisions": "ok" if decisions_ok else NOT_RUN,
        "sparsity_accounting": "ok" if accounting_ok else NOT_RUN,
        **{f"figure:{k}": ("ok" if v else NOT_RUN) for k, v in figs.items()},
    }
    return {"out_dir": str(out), "markdown": str(md_path), "html": str(html_path), "figures": figs,
            "claims": claims, "sections": sections, "problems": list(exp.problems)}


def main(argv=None) -> int:  # python -m analysis.report EXPERIMENT_DIR [--out DIR]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m analysis.report")
    ap.add_argument("experiment_dir")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    r = build_report(a.experiment_dir, a.out)
    print(f"report: {r['html']}\n        {r['markdown']}")
    for c in r["claims"]:
        print(f"  [{c['verdict']:>14}] {c['id']}: {c['claim']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
