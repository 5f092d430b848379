"""The paper's claims, each judged against one or several replicates of a run: reproduced, refuted,
inconclusive, or not run.

:func:`build_claims` turns the paper's numbers (``paper_numbers.PAPER[dataset]``) and the replicates --
experiments of one config that differ only in seed (or machine), or a single experiment -- into a
list of claims.  Each claim is a paired difference measured in every replicate (an accuracy A - B on
the same test images, a speed factor as ln r); :mod:`.seeds` aggregates them (mean, SE across the
replicates, the test-sampling SE beside it) and applies the verdict rule (``seeds.RULE``); ``RULES``
says what each kind of claim compares.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..records import Rung
from .experiment import (INCONCLUSIVE, MAIN_VARIANTS, NOT_RUN, REFUTED, REPRODUCED, SWEEP_VARIANTS, TIME_MARGIN,
                         Experiment)
from .seeds import Contrast, Estimate, across, judge, judge_speed

__all__ = ["build_claims", "order_line", "RULES", "VERDICTS"]

VERDICTS = (REPRODUCED, REFUTED, INCONCLUSIVE, NOT_RUN)


def _fmt_pct(a) -> str:
    return "n/a" if a is None else f"{100 * a:.2f}%"


def _paired(a: dict, b: dict) -> tuple[float, float | None]:
    """(a - b accuracy, paired standard error over the test images, or None)."""
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
    "better": "A beats B: the paired accuracy difference A - B on the same test images, in every replicate; "
              "the claimed direction is the paper's (A > B, or B >= A where the paper has A below B).",
    "gain": "A raises accuracy over B by about the paper's X points: as 'better', and reproduced only when the mean "
            "gain is also at least X/2; refuted when it falls 2 SE short of X/2.",
    "best": "V is the most accurate variant at sparsity s: V - W for every other variant W of the run at s, each "
            "beyond 2 SE above zero to reproduce it; any W beyond 2 SE above V refutes it.",
    "worst": "V is the least accurate variant at sparsity s: as 'best', the other way round.",
    "speed": f"a speed factor r (time of the reference / time of V) as ln r, in the paper's class of r: faster "
             f"(r >= {1 + TIME_MARGIN:g}), slower (r <= {1 - TIME_MARGIN:g}) or about the same; reproduced when "
             "mean ln r +- 2 SE lies within that class, refuted when it lies wholly outside it.  The SE is across "
             "the replicates, for one replicate the run's own timing noise (the median coefficient of variation of "
             "a fixed-batch trial's epoch times, x sqrt 2 for the ratio of two times).  Magnitudes are not expected "
             "to match (other hardware, scale, framework).  DBS claims are 'not run' when no DBS trial of any "
             "replicate ever changed its learning rate, momentum or batch size (nothing of DBS to test).",
    "least_drop": "C-CNN loses the least accuracy from the lowest to the highest common sparsity: drop(W) - "
                  "drop(C-CNN) for every other variant W, each beyond 2 SE above zero to reproduce it.",
}


def _claim(cid, text, paper, rule, ours="n/a", verdict=NOT_RUN, detail="", **stats):
    return {"id": cid, "claim": text, "paper": paper, "ours": ours, "verdict": verdict, "rule": rule,
            "detail": detail, "n": stats.get("n", 0), "difference": stats.get("difference", ""),
            "per_seed": stats.get("per_seed", ""), "test_se": stats.get("test_se", ""),
            "estimate": stats.get("estimate")}


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _stats(c: Contrast, *, unit: str = " pt") -> dict:
    """The numbers a claim shows: the difference +- its SE across the replicates, per replicate, the
    test-sampling SE; and the same as numbers (``estimate``)."""
    d = c.diff
    diff = f"{c.label}: {_pts(d.mean)}" + (f" ± {100 * d.se:.2f}" if d.se is not None else "") + f"{unit} (n={d.n})"
    tse = c.test_se_mean
    return {"n": d.n, "difference": diff, "per_seed": ", ".join(_pts(v) for v in d.values),
            "test_se": f"{100 * tse:.2f}{unit}" if tse is not None else "",
            "estimate": {"label": c.label, "mean": d.mean, "se": d.se, "n": d.n, "values": list(d.values),
                         "test_se": tse}}


def _one_seed_note(n: int) -> str:
    return "one seed: no SE across seeds, so an accuracy comparison stays inconclusive" if n == 1 else ""


def _contrast(R: Sequence[Experiment], a: tuple, b: tuple, label: str) -> tuple[Contrast | None, str]:
    """A - B per replicate (the paired accuracy difference), or (None, why)."""
    diffs, ses = [], []
    for i, e in enumerate(R):
        A, B = e.accuracy(*a), e.accuracy(*b)
        if A is None or B is None:
            missing = " and ".join(f"{g} at {s:g}" for (g, s), x in ((a, A), (b, B)) if x is None)
            return None, f"no accuracy for {missing}" + (f" in replicate {i + 1} of {len(R)}" if len(R) > 1 else "")
        d, se = _paired(A, B)
        diffs.append(d)
        ses.append(se)
    return Contrast(label, Estimate(tuple(diffs)), tuple(ses)), ""


def _mean_acc(R: Sequence[Experiment], g: tuple) -> float | None:
    est = across(R, lambda e: (e.accuracy(*g) or {}).get("acc"))
    return est.mean if est else None


def _better_claim(R, cid, text, paper_txt, a: tuple | None, b: tuple | None, *, gain: float | None = None,
                  sign: int = 1):
    rule = "gain" if gain is not None else "better"
    if a is None or b is None:
        return _claim(cid, text, paper_txt, rule, detail="a group or rung this needs is not in the run")
    c, why = _contrast(R, a, b, f"{a[0]} - {b[0]}")
    if c is None:
        return _claim(cid, text, paper_txt, rule, detail=why)
    ours = f"{_fmt_pct(_mean_acc(R, a))} vs {_fmt_pct(_mean_acc(R, b))}"
    verdict = judge([c], sign, gain=None if gain is None else gain / 100)
    notes = [_one_seed_note(c.diff.n)]
    if gain is not None and verdict == INCONCLUSIVE and c.diff.se is not None and sign * c.diff.mean > 0 \
            and 100 * c.diff.mean < gain / 2:
        notes.append(f"a gain below half of the paper's {gain:g} pt")
    if c.test_se_mean is None:
        notes.append("no per-sample predictions: no test-sampling SE")
    return _claim(cid, text, paper_txt, rule, ours, verdict, "; ".join(n for n in notes if n), **_stats(c))


def _rank_claim(R, cid, variant, s, paper_txt, worst=False):
    text = f"{variant} is the {'least' if worst else 'most'} accurate variant at {100 * s:g}% sparsity"
    rule = "worst" if worst else "best"
    present = [v for v in MAIN_VARIANTS if R[0].main_group(v) and all(e.accuracy(v, s) for e in R)]
    if variant not in present or len(present) < 2:
        return _claim(cid, text, paper_txt, rule, detail=f"the run has no {variant} (or < 2 variants) at {100 * s:g}%")
    means = {v: _mean_acc(R, (v, s)) for v in present}
    contrasts = [_contrast(R, (variant, s), (w, s), f"{variant} - {w}")[0] for w in present if w != variant]
    sign = -1 if worst else 1
    verdict = judge(contrasts, sign)
    # shown: the contrast with the closest competitor (by mean)
    closest = min(contrasts, key=lambda c: sign * c.diff.mean)
    ours = ", ".join(f"{v} {_fmt_pct(means[v])}" for v in sorted(means, key=lambda v: -means[v]))
    notes = [_one_seed_note(closest.diff.n)]
    if len(present) < len(MAIN_VARIANTS):
        notes.append(f"only {len(present)} of {len(MAIN_VARIANTS)} variants ran")
    if len(contrasts) > 1:
        notes.append("each other variant: " + "; ".join(
            f"{c.label.split(' - ')[1]} {_pts(c.diff.mean)}" + (f" ± {100 * c.diff.se:.2f}" if c.diff.se else "")
            for c in contrasts))
    return _claim(cid, text, paper_txt, rule, ours, verdict, "; ".join(n for n in notes if n), **_stats(closest))


def _speed_claim(R, cid, text, paper_r: float, ratio, ours_txt: str = "", detail="", margin: float = TIME_MARGIN):
    """``ratio(exp)``: our speed factor in one replicate (None: not measured)."""
    paper = f"{paper_r:.2f}x ({_speed_class(paper_r)})"
    est = across(R, lambda e: (lambda r: math.log(r) if r and r > 0 else None)(ratio(e)))
    if est is None:
        return _claim(cid, text, paper, "speed", detail=detail or "timings this needs are not in the run")
    cv = R[0].timing_noise()[0] if len(R) == 1 else None
    verdict, se = judge_speed(est, _speed_class(paper_r), margin, cv * math.sqrt(2) if cv is not None else None)
    r = math.exp(est.mean)
    ours = f"{r:.2f}x ({_speed_class(r, margin)})" + (f"; {ours_txt}" if ours_txt else "")
    if se is not None:
        lo, hi = math.exp(est.mean - 2 * se), math.exp(est.mean + 2 * se)
        what = "across seeds" if est.n > 1 else "from the run's timing noise (repeats)"
        difference = f"{r:.2f}x, ±2 SE {lo:.2f}-{hi:.2f}x ({what}; n={est.n})"
    else:
        difference = f"{r:.2f}x (n={est.n}; no timing noise measured)"
    stats = {"n": est.n, "difference": difference, "per_seed": ", ".join(f"{math.exp(v):.2f}x" for v in est.values),
             "estimate": {"label": "ln r", "mean": est.mean, "se": se, "n": est.n, "values": list(est.values),
                          "test_se": None}}
    return _claim(cid, text, paper, "speed", ours, verdict, detail, **stats)


def _overall_time(exp: Experiment, group: str, ladder: list[float]) -> dict | None:
    ts = [exp.time(group, s) for s in ladder]
    ts = [t for t in ts if t]
    if not ts:
        return None
    return {"sum": sum(t["sum"] for t in ts) / len(ts), "max": sum(t["max"] for t in ts) / len(ts), "n": len(ts)}


def _ratio(num, den):
    return num / den if num and den else None


def build_claims(replicates: Experiment | Sequence[Experiment], P: dict | None) -> list[dict]:
    """The paper's claims judged on ``replicates`` (one experiment, or several of one config)."""
    if P is None:
        return []
    R = [replicates] if isinstance(replicates, Experiment) else list(replicates)
    exp = R[0]  # the structure (groups, rungs, sweep) is the config's, shared by every replicate
    claims: list[dict] = []

    def nid(prefix: str) -> str:
        return f"{prefix}{sum(c['id'].startswith(prefix) for c in claims) + 1}"

    s_star = P["chosen_sparsity"]
    s_ours = exp.chosen_sparsity(s_star)
    margin = TIME_MARGIN
    acc_p = P["accuracy"][s_star]
    tno = P["tables"]

    def main(v, s):
        return (v, s) if exp.main_group(v) and s is not None else None

    # --- accuracy at the chosen sparsity
    claims.append(_rank_claim(R, "A1", "SWR-CNN+DBS", s_ours,
                              f"SWR-CNN+DBS {acc_p['SWR-CNN+DBS']}% is best at {100 * s_star:g}% (Fig. {P['figure']}a)"))
    claims[-1]["uses_dbs"] = True
    claims.append(_better_claim(
        R, "A2", f"Stacking with Winograd-ReLU and DBS (SWR-CNN+DBS) raises test accuracy over C-CNN by about "
                 f"{P['headline']['accuracy_gain']} points (abstract)",
        f"+{P['headline']['accuracy_gain']} pt ({acc_p['SWR-CNN+DBS']}% vs {acc_p['C-CNN']}% at {100 * s_star:g}%)",
        main("SWR-CNN+DBS", s_ours), main("C-CNN", s_ours), gain=P["headline"]["accuracy_gain"]))
    claims[-1]["uses_dbs"] = True
    for a, b in (("SC-CNN", "C-CNN"), ("SWR-CNN", "SC-CNN"), ("SWR-CNN+DBS", "SWR-CNN")):
        pa, pb = acc_p[a], acc_p[b]
        verb = "beats" if pa > pb else "does not beat"
        cl = _better_claim(R, nid("A"), f"{a} {verb} {b} at {100 * s_star:g}% sparsity",
                           f"{pa}% vs {pb}% ({pa - pb:+.2f} pt)", main(a, s_ours), main(b, s_ours),
                           sign=1 if pa > pb else -1)
        cl["dbs_effect"] = a.endswith("+DBS") and not b.endswith("+DBS")
        claims.append(cl)
    for s, v in sorted(P.get("best_at", {}).items()):
        if Rung(s) == Rung(s_star):
            continue
        quoted = P["accuracy"].get(s, {}).get(v)
        claims.append(_rank_claim(R, nid("A"), v, s, f"{v} best at {100 * s:g}%" + (f" ({quoted}%)" if quoted else "")))
        claims[-1]["uses_dbs"] = v.endswith("+DBS")
    for s, v in sorted(P.get("worst_at", {}).items()):
        quoted = P["accuracy"].get(s, {}).get(v)
        claims.append(_rank_claim(R, nid("A"), v, s, f"{v} worst at {100 * s:g}%" + (f" ({quoted}%)" if quoted else ""),
                                  worst=True))
    if P["title"].startswith(("Fashion", "CIFAR-10 ")):
        claims.append(_least_drop_claim(R, nid("A")))

    # --- batch size and DBS accuracy
    bs = exp.sweep_batch_sizes()
    for v in SWEEP_VARIANTS:
        pa = P["batch_accuracy"][v]
        lo_hi = f"{pa[64]}% at B=64 -> {pa[1024]}% at B=1024"
        lowers = pa[1024] < pa[64]
        text = f"Raising the batch size from 64 to 1024 {'lowers' if lowers else 'does not lower'} {v}'s accuracy"
        if len(bs) >= 2:
            lo, hi = exp.sweep_cell(v, bs[0]), exp.sweep_cell(v, bs[-1])
            cl = _better_claim(R, nid("B"), text, f"{lo_hi} (Fig. {P['figure']}b)", lo, hi, sign=1 if lowers else -1)
            if (bs[0], bs[-1]) != (64, 1024):
                cl["detail"] = (f"our sweep spans B={bs[0]}..{bs[-1]}; " + cl["detail"]).rstrip("; ")
        else:
            cl = _claim(nid("B"), text, lo_hi, "better", detail="the run swept fewer than two batch sizes")
        claims.append(cl)
    for v in SWEEP_VARIANTS:
        b0 = exp.main_group(v)["b0"] if exp.main_group(v) else 128
        ref = exp.sweep_cell(v, b0)
        p_ref = P["accuracy"][s_star][v]
        p_dbs = P["batch_accuracy"][v]["DBS"]
        claims.append(_better_claim(
            R, nid("B"), f"DBS raises {v}'s accuracy over a fixed batch of B0={b0}",
            f"{p_dbs}% vs {p_ref}% at {100 * s_star:g}%", exp.sweep_cell(v, "DBS"), ref,
            sign=1 if p_dbs > p_ref else -1))
        claims[-1]["dbs_effect"] = True

    # --- speed (each replicate's times against its own baseline)
    def base(e):
        return e.baseline()[0]

    for v in MAIN_VARIANTS:
        pr = P["sparsity_table"][v]["overall"][1]
        phrase = {"faster": "trains faster than", "slower": "trains slower than",
                  "about the same": "trains about as fast as"}[_speed_class(pr)]
        text = (f"Pruned {v}" + (" (time summed over its members)" if v != "C-CNN" else "")
                + f" {phrase} the dense C-CNN baseline (Table {tno[0]}, overall over the sparsity ladder)")

        def overall(e, v=v):
            lad = [s for s in e.rungs_of(v) if s > 0] if e.main_group(v) else []
            return _overall_time(e, v, lad) if lad else None

        par = across(R, lambda e: _ratio(base(e), (overall(e) or {}).get("max")))
        txt = (f"parallel (max over members): {par.mean:.2f}x" if par and exp.main_group(v)
               and len(exp.groups[v]["members"]) > 1 else "")
        claims.append(_speed_claim(R, nid("S"), text, pr, lambda e: _ratio(base(e), (overall(e) or {}).get("sum")),
                                   txt, margin=margin))
        claims[-1]["uses_dbs"] = v.endswith("+DBS")
    for v in SWEEP_VARIANTS:
        pt = P["batch_table"][v]
        b0 = exp.main_group(v)["b0"] if exp.main_group(v) else 128
        ref, dbs = exp.sweep_cell(v, b0), exp.sweep_cell(v, "DBS")

        def dbs_ratio(e, ref=ref, dbs=dbs):
            tr, td = (e.time(*ref) if ref else None), (e.time(*dbs) if dbs else None)
            return _ratio((tr or {}).get("sum"), (td or {}).get("sum"))

        claims.append(_speed_claim(
            R, nid("S"), f"DBS speeds {v} up over a fixed batch of B0={b0} (Table {tno[1]}: "
            f"{pt[128][1]:.2f}x -> {pt['DBS'][1]:.2f}x)", pt[128][0] / pt["DBS"][0], dbs_ratio, margin=margin))
        claims[-1]["dbs_effect"] = True
    ref_b = (64, 1024)
    for v in SWEEP_VARIANTS:
        pt = P["batch_table"][v]
        lo = exp.sweep_cell(v, bs[0]) if len(bs) >= 2 else None
        hi = exp.sweep_cell(v, bs[-1]) if len(bs) >= 2 else None

        def batch_ratio(e, lo=lo, hi=hi):
            tl, th = (e.time(*lo) if lo else None), (e.time(*hi) if hi else None)
            return _ratio((tl or {}).get("sum"), (th or {}).get("sum"))

        extra = f"B={bs[0]} -> B={bs[-1]}" if len(bs) >= 2 and (bs[0], bs[-1]) != ref_b else ""
        claims.append(_speed_claim(R, nid("S"), f"A larger batch (64 -> 1024) trains {v} faster per epoch",
                                   pt[ref_b[0]][0] / pt[ref_b[1]][0], batch_ratio, extra, margin=margin))

    # headline speed: SWR-CNN+DBS at the chosen sparsity vs the dense baseline
    def headline(e, key="sum"):
        t = e.time("SWR-CNN+DBS", s_ours) if e.main_group("SWR-CNN+DBS") and s_ours is not None else None
        return _ratio(base(e), (t or {}).get(key))

    par = across(R, lambda e: headline(e, "max"))
    claims.append(_speed_claim(
        R, nid("S"), f"SWR-CNN+DBS trains {P['headline']['speed']}x faster than the dense C-CNN baseline "
        "(abstract; summed member time)", P["headline"]["speed"], headline,
        f"parallel: {par.mean:.2f}x" if par else "", margin=margin))
    claims[-1]["uses_dbs"] = True

    acts = [e.dbs_activity() for e in R]
    if all(a is False for a, _ in acts):
        why = acts[0][1]
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


def _least_drop_claim(R: Sequence[Experiment], cid: str) -> dict:
    text = "C-CNN loses the least accuracy as sparsity grows (section 5.1)"
    exp = R[0]
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)]
    common = None
    for v in variants:
        rs = {s for s in exp.rungs_of(v) if s > 0}
        common = rs if common is None else common & rs
    if not variants or "C-CNN" not in variants or not common or len(common) < 2:
        return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop",
                      detail="needs C-CNN and two common pruned rungs")
    lo, hi = min(common), max(common)

    def drop(e, v):
        a, b = e.accuracy(v, lo), e.accuracy(v, hi)
        return a["acc"] - b["acc"] if a and b else None

    drops = {v: across(R, lambda e, v=v: drop(e, v)) for v in variants}
    drops = {v: d for v, d in drops.items() if d is not None}
    if "C-CNN" not in drops or len(drops) < 2:
        return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop", detail="accuracies missing")
    base = drops["C-CNN"].values
    contrasts = [Contrast(f"drop {v} - drop C-CNN", Estimate(tuple(x - c for x, c in zip(d.values, base))))
                 for v, d in drops.items() if v != "C-CNN"]
    closest = min(contrasts, key=lambda c: c.diff.mean)
    ours = ("drop " + ", ".join(f"{v} {100 * d.mean:.2f} pt" for v, d in drops.items())
            + f" ({100 * lo:g}% -> {100 * hi:g}%)")
    return _claim(cid, text, "C-CNN's drop is the smallest", "least_drop", ours, judge(contrasts, 1),
                  _one_seed_note(closest.diff.n), **_stats(closest))


def order_line(replicates: Experiment | Sequence[Experiment], P: dict | None) -> str:
    if P is None:
        return "No published numbers for this dataset: no order to compare."
    R = [replicates] if isinstance(replicates, Experiment) else list(replicates)
    exp = R[0]
    s = P["chosen_sparsity"]
    paper = sorted(P["accuracy"][s], key=lambda v: -P["accuracy"][s][v])
    s_ours = exp.chosen_sparsity(s)
    accs = {v: _mean_acc(R, (v, s_ours)) for v in MAIN_VARIANTS if exp.main_group(v)}
    accs = {v: a for v, a in accs.items() if a is not None}
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
    mean = " (means over the replicates)" if len(R) > 1 else ""
    return (f"Accuracy order at {100 * s:g}% sparsity (ours at {100 * s_ours:g}%{mean}): paper {' > '.join(paper)}; "
            f"ours {chain} -- {'the same order' if same else 'a different order'} "
            f"({agree} of {pairs} pairs ordered as in the paper).")
