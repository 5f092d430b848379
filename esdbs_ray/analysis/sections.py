"""The report's sections: each writes its part of the document from an experiment (and the paper's
numbers), draws its figure where it has one, and says "not run" for what the run lacks."""
from __future__ import annotations

import json
from pathlib import Path

from . import paper_numbers as PN
from .claims import RULES, VERDICTS, _fmt_pct, _overall_time, order_line
from .experiment import MAIN_VARIANTS, NOT_RUN, SWEEP_VARIANTS, Experiment, _f, _tb_read
from .seeds import RULE, Estimate, across, labels, replicate_note
from ..records import RungResult
from .render import Doc

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


def _est(e, spec="{:.2f}", unit="", scale=1.0) -> str:
    """A cell: "n/a", a replicate's value, or the mean ± SE across the replicates."""
    return "n/a" if e is None else e.fmt(spec, scale, unit)


def _bases(R: list[Experiment]) -> list:
    return [e.baseline()[0] for e in R]


def _section_sparsity_tables(doc: Doc, R: list[Experiment], P: dict | None, tno) -> dict:
    """Tables 1/3/5: time and speed vs sparsity; returns the speed curves ({variant: {rung: Estimate}})."""
    exp = R[0]
    base, base_txt = exp.baseline()
    bases = _bases(R)
    doc.h(2, f"Table {tno}: training time and speed vs sparsity", "table-sparsity")
    curves = {}
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)] + [
        v for v in exp.main_variants if v not in MAIN_VARIANTS]
    if not variants:
        doc.p(f"**Ours: {NOT_RUN}** (no main variant groups in this run).")
    else:
        b = across(R, lambda e: e.baseline()[0])
        doc.p(f"Ours. Baseline: {base_txt}" + (f", {_est(b, '{:.3f}')} s/epoch." if b else ".") +
              " Time = mean training seconds per epoch of the rung's retraining epochs; stacks: summed over members "
              "(Σ) and the maximum over members (∥, members as parallel trials). Speed = baseline / time, in each "
              "replicate against its own baseline." + (f" Each cell: the mean ± SE across the {len(R)} replicates."
                                                         if len(R) > 1 else ""))
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
                    ts = [_overall_time(e, v, [x for x in e.rungs_of(v) if x > 0]) for e in R]
                else:
                    ts = [e.time(v, s) for e in R]
                ok = all(t is not None for t in ts)
                t_sum = Estimate(tuple(t["sum"] for t in ts)) if ok else None
                speed = Estimate(tuple(b_ / t["sum"] for b_, t in zip(bases, ts))) if ok and all(bases) else None
                par = Estimate(tuple(b_ / t["max"] for b_, t in zip(bases, ts))) if ok and all(bases) else None
                if t_sum is not None and s != "overall":
                    curves.setdefault(v, {})[s] = speed
                row += [_est(t_sum, "{:.3f}"), _est(speed, unit="x")]
                if stacked:
                    row.append(_est(par, unit="x"))
            rows.append(row)
        doc.table(headers, rows, f"Ours ({exp.config.get('name')}): seconds per epoch and speed vs sparsity "
                                 f"[{_hardware(exp)}; {_short_scale(exp)}" + (f"; {replicate_note(R)}]" if len(R) > 1
                                                                              else "]"))
        dense = exp.train_cfg.get("epochs")
        if base and isinstance(dense, int) and dense <= 1:
            doc.p(f"**Caution:** the run has {dense} dense epoch(s), so the baseline time is the trial's *first* epoch, "
                  "which carries start-up costs (thread pools, allocator, first-touch of the data); every speed "
                  "against it is biased upwards.")
        bw = across(R, lambda e: _f((e.summary or {}).get("base_wall_seconds")))
        if bw is not None:
            longest = max((m.train_seconds or 0.0 for e in R for m in e.members), default=0.0)
            # the seeds of one multi-seed run share its Tune experiment and its wall time
            shared = len(R) > 1 and all(e.trial_seed is not None for e in R) and len({e.trials.path() for e in R}) == 1
            doc.p(f"Measured wall time of the whole base stage (all {len(exp.members)} trials"
                  + (f" of each of the {len(R)} seeds, one Tune experiment" if shared else "")
                  + f" as parallel Tune trials, every rung and evaluation included): {_est(bw, '{:.0f}')} s."
                  + (f" **Not usable:** it is shorter than the longest trial's own training time ({longest:.0f} s), so "
                     "summary.json was written by a resumed run that timed only its own part." if bw.mean < longest else ""))
    if P:
        t = P["sparsity_table"]
        headers = ["sparsity"] + [x for v in MAIN_VARIANTS for x in (f"{v} time (s)", f"{v} speed")]
        rows = [[(_sp(s) if s != "overall" else "overall")] + [x for v in MAIN_VARIANTS for x in
                                                                (f"{t[v][s][0]:g}", f"{t[v][s][1]:.2f}x")]
                for s in list(PN.SPARSITIES) + ["overall"]]
        doc.table(headers, rows, f"The paper's Table {tno} ({PN.HARDWARE}; baseline {P['baseline_seconds']} s/epoch)")
    return curves


def _section_batch_tables(doc: Doc, R: list[Experiment], P: dict | None, tno) -> None:
    exp = R[0]
    bases = _bases(R)
    doc.h(2, f"Table {tno}: training time and speed vs batch size", "table-batch")
    s = exp.sweep_sparsity(P["chosen_sparsity"] if P else None)
    bs = exp.sweep_batch_sizes()
    cells = {(v, b): exp.sweep_cell(v, b) for v in SWEEP_VARIANTS for b in [*bs, "DBS"]}
    if not any(cells.values()):
        doc.p(f"**Ours: {NOT_RUN}** (no batch-size sweep groups in this run).")
    else:
        doc.p(f"Ours at {100 * s:g}% sparsity (config `batch_sweep.sparsity`). A B=B0 row of a variant that also ran "
              "as a main variant is that main group's rung (it is not re-run). Stacks: time summed over members (Σ), "
              "speed also for parallel members (∥)." + (f" Each cell: the mean ± SE across the {len(R)} replicates."
                                                        if len(R) > 1 else ""))
        headers = ["batch size"] + [x for v in SWEEP_VARIANTS for x in (f"{v} time Σ (s)", f"{v} speed Σ")
                                    + ((f"{v} speed ∥",) if v != "C-CNN" else ())]
        rows = []
        for b in [*bs, "DBS"]:
            row = [str(b) if b != "DBS" else "DBS (ours)"]
            for v in SWEEP_VARIANTS:
                c = cells[(v, b)]
                ts = [e.time(*c) if c else None for e in R]
                ok = all(t is not None for t in ts)
                speeds = ok and all(bases)
                row += [_est(Estimate(tuple(t["sum"] for t in ts)) if ok else None, "{:.3f}"),
                        _est(Estimate(tuple(b_ / t["sum"] for b_, t in zip(bases, ts))) if speeds else None, unit="x")]
                if v != "C-CNN":
                    row.append(_est(Estimate(tuple(b_ / t["max"] for b_, t in zip(bases, ts))) if speeds else None,
                                    unit="x"))
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


def _means_and_errors(curves: dict) -> tuple[dict, dict | None]:
    """{v: {k: Estimate}} -> the means and the SEs across the replicates (None for one replicate)."""
    means = {v: {k: (e.mean if e else None) for k, e in c.items()} for v, c in curves.items()}
    errors = {v: {k: (e.se if e else None) for k, e in c.items()} for v, c in curves.items()}
    return means, errors if any(x is not None for c in errors.values() for x in c.values()) else None


def _section_accuracy(doc: Doc, R: list[Experiment], P: dict | None, out: Path, fig_no) -> dict:
    exp = R[0]
    figs = {}
    bars = f"; error bars ± 1 SE across the {len(R)} replicates" if len(R) > 1 else ""
    doc.h(2, f"Figure {fig_no}: test accuracy", "accuracy")
    variants = [v for v in MAIN_VARIANTS if exp.main_group(v)]
    sources = set()
    curves: dict[str, dict] = {}
    rungs = sorted({s for v in variants for s in exp.rungs_of(v)})
    for v in variants:
        for s in exp.rungs_of(v):
            curves.setdefault(v, {})[s] = across(R, lambda e: 100 * e.accuracy(v, s)["acc"] if e.accuracy(v, s) else None)
            for e in R:
                a = e.accuracy(v, s)
                if a and len(e.groups[v]["members"]) > 1:
                    sources.add(a["source"])
    doc.h(3, f"({fig_no}a) accuracy vs sparsity")
    if variants:
        doc.p("Stacked variants: ensemble accuracy from the Parquet predictions. " + "; ".join(sorted(sources)) + "."
              + (f" Each cell: the mean ± SE across the {len(R)} replicates." if len(R) > 1 else ""))
        rows = [[_sp(s)] + [_est(curves[v].get(s), unit="%") for v in variants] for s in rungs]
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
        means, errors = _means_and_errors(curves)
        figs["accuracy_vs_sparsity"] = figures.accuracy_vs_sparsity(
            str(path), means, P["accuracy"] if P else None, title=f"Fig. {fig_no}a: test accuracy vs sparsity",
            ours_note=_short_scale(exp) + bars, paper_note=PN.HARDWARE, errors=errors)
    doc.img(figs.get("accuracy_vs_sparsity"), f"Figure {fig_no}a",
            f"Fig. {fig_no}a: test accuracy vs sparsity, ours (left{bars}) and the paper's quoted values (right)")

    # (b) vs batch size
    doc.h(3, f"({fig_no}b) accuracy vs batch size")
    bs = exp.sweep_batch_sizes()
    s = exp.sweep_sparsity(P["chosen_sparsity"] if P else None)
    bcurves: dict[str, dict] = {}
    for v in SWEEP_VARIANTS:
        for b in [*bs, "DBS"]:
            c = exp.sweep_cell(v, b)
            a = across(R, lambda e: 100 * e.accuracy(*c)["acc"] if c and e.accuracy(*c) else None)
            if a:
                bcurves.setdefault(v, {})[b] = a
    if bcurves:
        rows = [[str(b) if b != "DBS" else "DBS"] + [_est(bcurves.get(v, {}).get(b), unit="%") for v in SWEEP_VARIANTS]
                for b in [*bs, "DBS"]]
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
    if sum(len(c) for c in bcurves.values()) >= 2:  # one bar is a table's job
        means, errors = _means_and_errors(bcurves)
        figs["accuracy_vs_batch"] = figures.accuracy_vs_batch(
            str(out / f"fig{fig_no}b_accuracy_vs_batch.png"), {v: means.get(v, {}) for v in SWEEP_VARIANTS}, pb,
            title=f"Fig. {fig_no}b: test accuracy vs batch size",
            ours_note=f"{100 * s:g}% sparsity; {_short_scale(exp)}{bars}", paper_note=PN.HARDWARE, errors=errors)
    doc.img(figs.get("accuracy_vs_batch"), f"Figure {fig_no}b",
            f"Fig. {fig_no}b: test accuracy vs batch size, ours (left{bars}) and the paper's quoted values (right)")
    return figs


def _short_scale(exp: Experiment) -> str:
    t = exp.train_cfg
    return (f"subset {exp.config.get('subset')}, width {t.get('width')}, {t.get('epochs')}+"
            f"{t.get('retrain_epochs')}/rung epochs")


def _section_kernels(doc: Doc, exp: Experiment, out: Path) -> str | None:
    doc.h(2, "Figure 5a: Winograd-domain kernels at each sparsity", "kernels")
    order = ["SWR-CNN+DBS", "SWR-CNN", "C-CNN+DBS", "SC-CNN+DBS"]
    cands = sorted(
        (m for m in exp.members if m.config.get("conv") == "winograd_relu"),
        key=lambda m: (order.index(m.group) if m.group in order else len(order), m.member))
    # prefer the paper's choice of layer owner: the base model of the stack (first member)
    first = (exp.config.get("members") or [None])[0]
    first_models = [first.get("model") if isinstance(first, dict) else first]
    cands.sort(key=lambda m: 0 if m.model in first_models else 1)
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
                doc.p(f"From the TensorBoard image `winograd_kernels` of trial {m.member} (group {m.group}, "
                      f"model {m.model}); rows: first 6 output channels, columns: first 6 input channels of its "
                      f"Winograd layer {m.config.get('kernel_layer', 0)}; pruned values in black.")
                doc.img(str(path), "Figure 5a", "Fig. 5a: Winograd-domain kernels (ours)")
                return str(path)
        d = exp.trial_dir(m)
        if d is not None and exp.trials.is_file(d, "kernels.png"):
            path.write_bytes(exp.trials.read_bytes(d, "kernels.png"))
            doc.p(f"From `kernels.png` of trial {m.member} (group {m.group}, model {m.model}).")
            doc.img(str(path), "Figure 5a", "Fig. 5a: Winograd-domain kernels (ours)")
            return str(path)
    doc.img(None, "Figure 5a", "Fig. 5a (no Winograd trial with a kernel image in this run)")
    return None


def _section_momentum(doc: Doc, exp: Experiment, out: Path) -> str | None:
    doc.h(2, "Figure 5b: momentum increase for several k", "momentum")
    dbs = exp.train_cfg.get("dbs") or {}
    try:
        from .figures import plot_momentum_curves

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
        if m.config.get("schedule") != "dbs":
            continue
        ev = exp.tb_events(m)
        if not ev:
            continue
        try:
            sc, _ = _tb_read(ev)
        except Exception:
            continue
        if sc.get("schedule/batch_size"):
            traces[m.member] = sc
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
          "validation data). CV: each method's weights fitted on the other folds of the validation split and scored "
          "on the held-out one, so it is not flattered by the images that fitted them (blank in files from before).")
    for group, st in exp.stackings.items():
        names = list(st.get("member_names") or [])
        rows = []
        for meth, r in (st.get("methods") or {}).items():
            ws = " / ".join(f"{(r.get('weights') or {}).get(n, float('nan')):.3f}" for n in names)
            cv = [_fmt_pct(_f(r.get("cv_accuracy"))), _n(_f(r.get("cv_nll")), "{:.4f}")] \
                if r.get("cv_accuracy") is not None else ["", ""]
            rows.append([("* " if meth == st.get("chosen") else "") + meth, ws,
                         _fmt_pct(_f(r.get("val_accuracy"))), _n(_f(r.get("val_nll")), "{:.4f}"), *cv,
                         _fmt_pct(_f(r.get("test_accuracy"))), _n(_f(r.get("test_nll")), "{:.4f}")])
        for n in names:
            r = (st.get("members") or {}).get(n) or {}
            rows.append([f"member {n}", "", _fmt_pct(_f(r.get("val_accuracy"))), _n(_f(r.get("val_nll")), "{:.4f}"),
                         "", "", _fmt_pct(_f(r.get("test_accuracy"))), _n(_f(r.get("test_nll")), "{:.4f}")])
        sp = st.get("sparsity")
        doc.table(["method", "weights (" + ", ".join(names) + ")", "val acc", "val NLL", "CV acc", "CV NLL", "test acc",
                   "test NLL"], rows,
                  f"{group} ({st.get('_file')}; rung {'last' if sp is None else _sp(sp)}; n_val={st.get('n_val')}, "
                  f"n_test={st.get('n_test')})")


def _section_claims(doc: Doc, R: list[Experiment], P: dict | None, claims: list[dict]) -> None:
    exp = R[0]
    doc.h(2, "The paper's claims and our verdicts", "claims")
    if P is None:
        doc.p(f"**{NOT_RUN}**: the dataset ({exp.config.get('dataset')}) is not one of the paper's.")
        return
    counts = {k: sum(c["verdict"] == k for c in claims) for k in VERDICTS}
    doc.p(", ".join(f"{counts[k]} {k}" for k in VERDICTS) + f", over {replicate_note(R)}. Our numbers come from "
          "this run's scale and hardware (see Provenance), the paper's from full-scale training on "
          f"{PN.HARDWARE}; a small run can only test directions, not magnitudes.")
    doc.p(RULE)
    doc.p(order_line(R, P))
    noise = []
    for label, e in zip(labels(R), R):
        cv, n = e.timing_noise()
        noise.append((f"{label}: " if len(R) > 1 else "") + (
            f"{100 * cv:.1f}% ({n} fixed-batch trials)" if cv is not None else "not measured (no fixed-batch trial "
                                                                                "with a progress.csv)"))
    doc.p("Timing noise (the median within-trial coefficient of variation of epoch times): " + "; ".join(noise) + ".")
    acts = [e.dbs_activity() for e in R]
    if any(a is not None for a, _ in acts):
        acted = [a for a, _ in acts if a is not None]
        doc.p(f"DBS activity: {'the schedule acted' if any(acted) else '**the schedule never acted**'} "
              f"({next(why for a, why in acts if a is not None and a == any(acted))}).")
    judged = [c for c in claims if c["verdict"] != NOT_RUN]
    across_what = "across seeds" if len(R) > 1 else "(one seed: none across seeds)"
    if judged:
        doc.table(["id", "claim", "paper", "ours", f"difference ± SE {across_what}", "per seed",
                   "test-sampling SE", "verdict", "rule", "note"],
                  [[c["id"], c["claim"], c["paper"], c["ours"], c["difference"], c["per_seed"], c["test_se"],
                    c["verdict"], c["rule"], c["detail"]] for c in judged])
    skipped = [c["id"] for c in claims if c["verdict"] == NOT_RUN]
    if skipped:
        doc.p(f"Not run ({len(skipped)}): {', '.join(skipped)} -- this run lacks a group, rung, batch size or "
              "timing they need (the paper's whole matrix: `--preset paper-fashion-mnist-cpu`).")
    doc.p("What each kind of claim compares:")
    doc.ul([f"**{k}**: {v}" for k, v in RULES.items()] +
           ["**not run**: the run lacks a group, rung or artifact the claim needs."])


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
            if not rs or any(r is None or r.model_sparsity is None for r in rs):
                continue
            nz = sum(r.nonzero_weights or 0 for r in rs)
            tot = sum(r.total_weights or 0 for r in rs)
            rows.append([v, _sp(s), _sp(sum(r.sparsity or 0.0 for r in rs) / len(rs)),
                         _sp(1 - nz / tot) if tot else "n/a", f"{nz:,}", f"{tot:,}"])
    if not rows:
        doc.p(f"**{NOT_RUN}** (members' rungs carry no whole-model counts: written by an older esdbs)")
        return False
    doc.table(["variant", "nominal", "pruned layers", "whole model", "nonzero weights", "weights"], rows,
              "Stacks: summed over members (pruned-layer sparsity averaged). The paper states the nominal figure only.")
    return True


def _max_of(values) -> str:
    """The largest of a history's recorded values ("?" when none was recorded: old or damaged files)."""
    known = [v for v in values if v is not None]
    return f"{max(known):.4g}" if known else "?"


def _section_dbs_decisions(doc: Doc, exp: Experiment) -> bool:
    """What the DBS schedule did in each DBS trial: the batch-size range and every logged decision."""
    doc.h(2, "DBS decisions per trial", "dbs-decisions")
    rows, rules = [], set()
    for m in exp.members:
        cfg = m.config
        if cfg.get("schedule") != "dbs":
            continue
        record = exp.member_record(m)
        hist = [h for h in (record.history if record else []) if h.batch_size is not None]
        if not hist:
            continue
        dbs = cfg.get("dbs") or {}
        # runs written before fall_noise existed judged falls against the binomial SE
        rules.add((dbs.get("fall_z", 2.0), dbs.get("fall_noise", "binomial"), record.val_size))
        bs = [h.batch_size for h in hist]
        top = max(bs)
        first_top = next(h.epoch for h in hist if h.batch_size == top)
        bmax = record.bmax
        at_bmax = f"{sum(b >= bmax for b in bs)} of {len(bs)}" if bmax else "?"
        decisions = "; ".join(f"e{h.epoch}: {h.decision}" for h in hist
                              if h.decision and not h.decision.startswith(("warm-up", "lr phase: level")))
        rows.append([m.member, f"{bs[0]} -> {top} (epoch {first_top})", str(bmax or "?"), at_bmax,
                     _max_of([h.lr for h in hist]), _max_of([h.momentum for h in hist]),
                     decisions or "none"])
    if not rows:
        doc.p(f"**{NOT_RUN}** (no DBS trial with a per-epoch history in members/)")
        return False
    what = {"binomial": "binomial SE of {n} validation images",
            "observed": "the larger of the binomial SE and the run's own epoch-to-epoch noise"}
    doc.p("Fall rule: " + "; ".join(f"a dip must exceed {z:g} SE, {noise} ({what[noise].format(n=n)})"
                                    for z, noise, n in sorted(rules, key=str))
          + " (spec §4.2; `train.dbs.fall_z`, `train.dbs.fall_noise`).")
    doc.table(["member", "B (first -> largest)", "Bmax", "epochs at Bmax", "max lr", "max m", "decisions (epoch: why)"],
              rows)
    return True


def _section_classes(doc: Doc, exp: Experiment) -> bool:
    """Test accuracy per class, by name, of each stacked ensemble and its members (a user's
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


def _section_members(doc: Doc, exp: Experiment) -> None:
    doc.h(2, "Members", "members")
    if not exp.members:
        doc.p(f"**{NOT_RUN}**")
        return
    rows = []
    for m in exp.members:
        rungs = "; ".join(f"{_sp(r.target_sparsity)}: {_fmt_pct(r.test_accuracy)}, "
                          f"{_n(r.mean_epoch_seconds, '{:.2f}')} s"
                          for r in m.rungs if r.target_sparsity is not None)
        last = m.final or RungResult(target_sparsity=None)
        rows.append([m.member, m.group, m.model, m.config.get("conv"),
                     m.batch_size or f"B0={(m.config.get('dbs') or {}).get('b0')}"
                     + (" DBS" if m.config.get("schedule") == "dbs" else ""),
                     m.epochs, _n(m.train_seconds, "{:.1f}"), m.steps,
                     _sp(last.sparsity) if last.sparsity is not None else "n/a",
                     _sp(last.model_sparsity) if last.model_sparsity is not None else "n/a",
                     f"{last.nonzero_weights:,}" if last.nonzero_weights is not None else "n/a", rungs])
    doc.table(["member", "group", "model", "conv", "batch", "epochs", "train s", "steps", "pruned layers",
               "whole model", "nonzero weights", "rungs (test acc, s/epoch)"], rows,
              "Sparsity at the last rung: of the pruned 3x3 layers (the nominal figure) and of every learnable "
              "parameter (stem, 1x1 convs, classifier and batch norms stay dense); a Winograd layer keeps 16/9 as many "
              "nonzeros as the spatial layer it replaces at the same nominal sparsity (spec §3).")


