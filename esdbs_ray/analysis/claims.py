"""The paper's claims, each judged against an experiment: reproduced, not reproduced, or not run.

:func:`build_claims` turns the paper's numbers (``paper_numbers.PAPER[dataset]``) and an
:class:`~esdbs_ray.analysis.experiment.Experiment` into a list of claims with the rule that decided
each verdict (``RULES``): accuracy claims need a difference beyond ``Z`` paired standard errors of
the per-sample test predictions, speed claims compare classes (faster / about the same / slower)
with a margin that grows with the run's own timing noise.
"""
from __future__ import annotations

import math

from ..records import Rung
from .experiment import (MAIN_VARIANTS, NOT_REPRODUCED, NOT_RUN, REPRODUCED, SWEEP_VARIANTS, TIME_MARGIN, Z,
                         Experiment)

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
        if Rung(s) == Rung(s_star):
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

