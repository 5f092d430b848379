"""Tests of the dynamic-batch-size schedule (esdbs_ray/dbs.py; spec/method.md §4).

Expected per-epoch values are written out by hand from B = Stepwise(RoundClip(η(1−m0)/(η0(1−m))·B0)),
with k = 0 in the scripted run so that the momentum curve is the straight line m = m0 + v0·t.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from esdbs_ray.dbs import (
    PHASES,
    DBSConfig,
    DBSSchedule,
    FixedSchedule,
    build_schedule,
    critical_k,
    format_plan,
    integrate_momentum_ode,
    momentum_at,
    momentum_curve,
    momentum_limit,
    ode_invariant,
    plan,
    run_noise,
    stepwise,
)
from esdbs_ray.analysis.figures import plot_momentum_curves

N = 54000  # Fashion-MNIST train split minus 6000 validation: N/10 = 5400 -> 5376, so Bmax = cap 1024


def run(sched, vals, finite=None):
    """Feed a scripted val-accuracy sequence; return (plans, guard flags)."""
    plans, guards = [], []
    for i, v in enumerate(vals):
        plans.append(sched.plan())
        guards.append(sched.step(v, True if finite is None else finite[i]))
    return plans, guards


def triples(plans):
    return [(p.phase, round(p.lr, 10), round(p.momentum, 10), p.batch_size, p.increase) for p in plans]


# -- one full scripted run, every phase, values by hand -------------------------------------------

# epochs=20 -> warm-up W = round(0.1 * 20) = 2 epochs; n = 2; k = 0 (m = 0.9 + 0.5 t), Bmin = B0 = 128;
# no val_size: SE = 0, so any dip of a level's last epoch below the previous level's best is a fall.
SCRIPT_VALS = [0.50, 0.60,               # warm-up
               0.65, 0.70, 0.72, 0.74,   # lr phase: 0.02 x2, 0.04 x2 (improving)
               0.73, 0.735,              # level 0.08: its last epoch is below 0.74 -> back to 0.04
               0.75, 0.76, 0.77, 0.80,   # momentum phase until B = Bmax
               0.79, 0.79, 0.79, 0.79, 0.79,  # 5 epochs without improvement -> plateau
               0.81, 0.82, 0.83]
SCRIPT_EXPECTED = [
    # phase, lr, momentum, batch, increase
    ("warmup", 0.01, 0.9, 128, True),      # epoch 0: lr_start
    ("warmup", 0.015, 0.9, 128, True),     # 0.01 + 0.01 * 1/2
    ("lr", 0.02, 0.9, 128, True),          # η0: B = B0
    ("lr", 0.02, 0.9, 128, False),
    ("lr", 0.04, 0.9, 256, True),          # doubled: B = 2 * 128
    ("lr", 0.04, 0.9, 256, False),
    ("lr", 0.08, 0.9, 512, True),          # doubled: B = 4 * 128; the dip here is not judged alone
    ("lr", 0.08, 0.9, 512, False),         # the level's last epoch: 0.735 < 0.74 -> fall
    ("momentum", 0.04, 0.9, 256, False),   # back to 0.04; momentum t = 0 -> m0
    ("momentum", 0.04, 0.925, 352, True),  # t = 1/20: raw 2 * 0.1/0.075 * 128 = 341.3 -> nearest 32: 352
    ("momentum", 0.04, 0.95, 512, True),   # t = 2/20: raw 2 * 2 * 128 = 512
    ("momentum", 0.04, 0.975, 1024, True),  # t = 3/20: raw 2 * 4 * 128 = 1024 = Bmax -> phase ends
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),    # 5th epoch without improvement
    ("hold", 0.004, 0.975, 1024, False),   # plateau: η * 0.1, B stays (spec §4.5)
    ("hold", 0.004, 0.975, 1024, False),
    ("hold", 0.004, 0.975, 1024, False),
]


def script_schedule(**kw):
    return DBSSchedule(DBSConfig(k=0.0), epochs=20, train_size=N, **kw)


def test_scripted_run_every_phase_by_hand():
    sched = script_schedule()
    assert sched.bmax == 1024 and sched.bmin == 128 and sched.warmup_epochs == 2
    plans, guards = run(sched, SCRIPT_VALS)
    assert triples(plans) == SCRIPT_EXPECTED
    assert [p.epoch for p in plans] == list(range(20))
    assert not any(guards)
    assert all(p.batch_size % 32 == 0 and 128 <= p.batch_size <= 1024 for p in plans)
    assert {p.phase for p in plans} <= set(PHASES)
    # every change says why; steady epochs say nothing
    decisions = [p.decision for p in plans]
    assert decisions[4].startswith("lr x2") and decisions[8].startswith("fall:") and "momentum phase" in decisions[8]
    assert decisions[12].startswith("Bmax 1024") and decisions[17].startswith("plateau:") and "B stays" in decisions[17]
    assert decisions[3] == decisions[5] == decisions[13] == ""


def test_default_plan_steadily_improving_by_hand():
    # epochs=30: W = 3 warm-up epochs (0.01, 0.01333, 0.01667), then doublings every 2 epochs until
    # B reaches Bmax = 1024 at η = 0.16; accuracy never falls, so no momentum phase.
    rows = plan(DBSConfig(), epochs=30, train_size=N)
    got = [(r["phase"], round(r["lr"], 6), r["momentum"], r["batch_size"]) for r in rows]
    expected = ([("warmup", 0.01, 0.9, 128), ("warmup", 0.013333, 0.9, 128), ("warmup", 0.016667, 0.9, 128)]
                + [("lr", 0.02, 0.9, 128)] * 2 + [("lr", 0.04, 0.9, 256)] * 2
                + [("lr", 0.08, 0.9, 512)] * 2 + [("lr", 0.16, 0.9, 1024)] * 2
                + [("hold", 0.16, 0.9, 1024)] * 19)
    assert got == expected
    assert set(rows[0]) >= {"epoch", "phase", "lr", "momentum", "batch_size", "noise_scale", "decision"}
    assert rows[5]["noise_scale"] == pytest.approx(0.02 * N / (128 * 0.1))  # 84.375 held throughout
    text = format_plan(rows)
    assert "hold" in text and "1024" in text and len(text.splitlines()) == 32


def test_lr_step_is_shortened_to_land_on_bmax():
    # cap 800: after 0.08 (B 512) a doubling would need B 1024; η stops at 0.02 * 800/128 = 0.125.
    rows = plan(DBSConfig(bmax_cap=800), epochs=30, train_size=N)
    assert [(r["phase"], round(r["lr"], 6), r["batch_size"]) for r in rows[7:13]] == [
        ("lr", 0.08, 512), ("lr", 0.08, 512), ("lr", 0.125, 800), ("lr", 0.125, 800),
        ("hold", 0.125, 800), ("hold", 0.125, 800)]
    assert rows[9]["noise_scale"] == pytest.approx(rows[3]["noise_scale"], rel=1e-12)


# -- the fall rule: judged once per level, beyond z standard errors (spec §4.2) ---------------------

VAL_SIZE = 900  # the CPU reference run's validation split: SE at a = 0.80 is 1.33 points


def lr_levels(vals, **cfg):
    """(lr, batch) per epoch for a DBS run with n = 1, no warm-up, 900 validation images."""
    sched = DBSSchedule(DBSConfig(warmup_frac=0.0, double_every=1, k=0.0, **cfg), epochs=len(vals) + 1,
                        train_size=N, val_size=VAL_SIZE)
    plans, _ = run(sched, vals)
    plans.append(sched.plan())
    return [(round(p.lr, 6), p.batch_size, p.phase) for p in plans]


def test_dips_within_one_standard_error_never_end_the_lr_phase():
    se = math.sqrt(0.8 * 0.2 / VAL_SIZE)
    # every level's epoch dips by one SE below the previous level's best (0.80): not a fall
    got = lr_levels([0.80, 0.80 - se, 0.80 - se, 0.80 - se])
    assert [g[:2] for g in got] == [(0.02, 128), (0.04, 256), (0.08, 512), (0.16, 1024), (0.16, 1024)]
    assert got[-1][2] == "hold"  # Bmax reached by doubling, the momentum phase has no room


def test_a_three_se_drop_is_a_fall_once_confirmed():
    se = math.sqrt(0.8 * 0.2 / VAL_SIZE)
    # level 0.04 drops 3 SE below 0.80 on its first epoch: one more epoch at 0.04 to confirm...
    got = lr_levels([0.80, 0.80 - 3 * se, 0.80 - 3 * se, 0.82])
    assert [g[:2] for g in got[:4]] == [(0.02, 128), (0.04, 256), (0.04, 256), (0.02, 128)]
    assert got[3][2] == "momentum"  # ...confirmed: back to 0.02, the momentum phase follows
    # ...or the second epoch recovers: the transient dip is forgiven and η doubles
    got = lr_levels([0.80, 0.80 - 3 * se, 0.80, 0.82])
    assert [g[:2] for g in got[:4]] == [(0.02, 128), (0.04, 256), (0.04, 256), (0.08, 512)]


def test_fall_z_is_the_tolerance():
    se = math.sqrt(0.8 * 0.2 / VAL_SIZE)
    vals = [0.80, 0.80 - 1.5 * se, 0.80 - 1.5 * se]
    # z = 2: 1.5 SE is noise
    assert [g[:2] for g in lr_levels(vals)] == [(0.02, 128), (0.04, 256), (0.08, 512), (0.16, 1024)]
    # z = 1: a fall, confirmed on the level's second epoch
    assert [g[:2] for g in lr_levels(vals, fall_z=1.0)] == [(0.02, 128), (0.04, 256), (0.04, 256), (0.02, 128)]
    # n = 2: the level is judged on its last epoch only, so a dip on its first epoch is ignored
    sched = DBSSchedule(DBSConfig(warmup_frac=0.0, k=0.0), epochs=10, train_size=N, val_size=VAL_SIZE)
    run(sched, [0.78, 0.80, 0.80 - 5 * se, 0.81])
    assert (sched.plan().lr, sched.plan().phase) == (0.08, "lr")


def test_momentum_phase_falls_only_on_two_dips_in_a_row():
    se = math.sqrt(0.8 * 0.2 / VAL_SIZE)
    sched = DBSSchedule(DBSConfig(warmup_frac=0.0, double_every=1, k=0.0, bmax_cap=2048), epochs=40,
                        train_size=N, val_size=VAL_SIZE)
    # fall at level 0.04 (confirmed), then the momentum phase at 0.02: m 0.9, 0.9125, 0.925, ...
    run(sched, [0.80, 0.75, 0.75, 0.80, 0.81, 0.81 - 3 * se, 0.81])  # (0.75: a fall, not a collapse)
    p = sched.plan()
    assert p.phase == "momentum" and p.momentum == pytest.approx(0.95)  # one dip did not end it
    run(sched, [0.81 - 3 * se, 0.81 - 3 * se])  # two in a row (m 0.95, 0.9625): m back to 0.9375,
    p = sched.plan()                               # the epoch before the first of them
    assert p.phase == "hold" and p.momentum == pytest.approx(0.9375) and p.decision.startswith("fall:")


def test_default_k_makes_the_momentum_phase_act():
    cfg = DBSConfig()
    assert cfg.k == "auto" and cfg.k_value == pytest.approx(critical_k(0.5, 0.9, 0.99))
    # the momentum curve of the default comes to rest at m_max (the paper's 1.6 stops at 0.9075)
    assert momentum_curve(cfg.k_value, 0.5, 0.9, 0.99, [0.5])[0] == pytest.approx(0.99, abs=1e-9)
    sched = DBSSchedule(cfg, epochs=40, train_size=N, val_size=VAL_SIZE)
    # warm-up 4 epochs, level 0.02 x2, level 0.04 falls on both epochs -> momentum at 0.02
    run(sched, [0.5, 0.6, 0.7, 0.75, 0.80, 0.81, 0.75, 0.75] + [0.82 + 0.001 * i for i in range(12)])
    p = sched.plan()
    assert p.phase == "hold" and p.batch_size == 1024  # m rose until B reached Bmax
    # (within Stepwise rounding of the m that gives exactly Bmax, 1 - 0.1 * 128/1024 = 0.9875)
    assert 0.985 < p.momentum <= 1 - 0.1 * 0.02 * 128 / (0.02 * 1024) + 1e-12


def test_momentum_phase_follows_the_ode_and_stops():
    cfg = DBSConfig(k=1.6)  # the paper's k: momentum tops out at ~0.9075 within ~3 % of the epochs
    sched = DBSSchedule(cfg, epochs=50, train_size=N)
    vals = [0.5 + 0.01 * i for i in range(9)] + [0.55, 0.55] + [0.6 + 0.01 * i for i in range(10)]
    plans, _ = run(sched, vals)
    mom = [p for p in plans if p.phase == "momentum"]
    start = mom[0].epoch
    assert mom[0].momentum == 0.9 and mom[0].lr == pytest.approx(0.04)  # fall at 0.08 -> 0.04
    for p in mom:
        m = momentum_at((p.epoch - start) / 50, 1.6, 0.5, 0.9, 0.99)
        assert p.momentum == m
        raw = 0.04 * 0.1 / (0.02 * (1 - m)) * 128
        assert p.batch_size == 32 * math.floor(raw / 32 + 0.5)
    held = [p for p in plans if p.epoch > mom[-1].epoch]
    assert held and all(p.phase == "hold" and p.momentum == mom[-1].momentum for p in held)
    assert mom[-1].momentum == pytest.approx(momentum_limit(1.6, 0.5, 0.9), abs=1e-9)
    assert held[0].batch_size == 288  # raw 2 * 0.1/0.0925 * 128 = 276.8 -> 288


def test_momentum_fall_reverts_to_momentum_before_the_dips():
    sched = script_schedule()
    vals = SCRIPT_VALS[:9] + [0.74, 0.74]  # epochs 9 (m 0.925) and 10 (m 0.95) both below the best 0.75
    run(sched, vals)
    p = sched.plan()
    assert (p.phase, round(p.momentum, 10), p.batch_size, p.increase) == ("hold", 0.9, 256, False)


def test_momentum_step_is_shortened_to_land_on_bmax():
    sched = DBSSchedule(DBSConfig(k=0.0, bmax_cap=800), epochs=20, train_size=N)
    plans, _ = run(sched, SCRIPT_VALS[:12])
    # t = 3/20 would give m 0.975 (raw 1024 > 800): m stops at 1 - 0.1 * 2 * 128/800 = 0.968.
    assert (plans[11].phase, plans[11].batch_size) == ("momentum", 800)
    assert plans[11].momentum == pytest.approx(0.968, abs=1e-12)
    assert sched.plan().phase == "hold" and sched.plan().batch_size == 800


def test_plateau_decays_lr_and_leaves_b():
    sched = script_schedule()
    plans, _ = run(sched, SCRIPT_VALS + [0.83] * 0)
    assert [(round(p.lr, 8), p.batch_size) for p in plans[15:19]] == [
        (0.04, 1024), (0.04, 1024), (0.004, 1024), (0.004, 1024)]
    # in the LR phase too: a plateau ends the raising and keeps the current B
    sched = DBSSchedule(DBSConfig(warmup_frac=0.0, double_every=3, plateau_patience=2), epochs=20, train_size=N)
    run(sched, [0.5, 0.6, 0.6, 0.6, 0.6])
    p = sched.plan()
    assert (p.phase, round(p.lr, 8), p.batch_size) == ("hold", 0.004, 256)


# -- pruning rungs (spec §4.5) ------------------------------------------------------------------------

def test_rung_start_restarts_the_plateau_and_the_lr():
    # 8 dense epochs, rungs at 8, 12, 16 (4 retraining epochs each); patience 2 so a rung can decay.
    cfg = DBSConfig(warmup_frac=0.0, double_every=1, plateau_patience=2, k=0.0)
    sched = DBSSchedule(cfg, epochs=20, train_size=N, val_size=6000, rung_starts=[8, 12, 16])
    dense = [0.80, 0.82, 0.84, 0.86, 0.87, 0.88, 0.89, 0.90]
    plans, _ = run(sched, dense + [0.70, 0.69, 0.69, 0.69] + [0.60, 0.61, 0.62, 0.63] + [0.5] * 4)
    starts = [plans[e] for e in (8, 12, 16)]
    assert len({round(p.lr, 12) for p in starts}) == 1  # every rung starts at the same η
    assert starts[0].lr == plans[7].lr and starts[0].batch_size == plans[7].batch_size == 1024
    assert all("plateau restarted" in p.decision for p in starts)
    # the pruned model is compared with itself: 0.70 < 0.90 is not "no improvement" at rung 1,
    # only its own two bad epochs (0.69, 0.69) decay η inside the rung; rung 2 starts at η again
    assert plans[9].lr == plans[10].lr == plans[8].lr
    assert plans[11].lr == pytest.approx(plans[8].lr * 0.1) and plans[12].lr == plans[8].lr
    assert plans[12].increase  # the reset raises η: the trainer snapshots before it
    assert all(p.batch_size == 1024 for p in plans[8:])  # B stays across rungs and decays
    assert all(p.phase == "hold" for p in plans[8:])
    # without the restart the dense best (0.90) would have decayed η twice along this ladder
    assert all(p.lr >= plans[8].lr * 0.1 for p in plans[8:])


def test_rung_lr_lr0_retrains_every_rung_at_most_at_lr0():
    # the same run with rung_lr: lr0 -- the dense phase peaks at 0.16 (B 1024); the rungs retrain at
    # 0.02 with B kept at 1024, and still all at one η
    cfg = DBSConfig(warmup_frac=0.0, double_every=1, plateau_patience=2, k=0.0, rung_lr="lr0")
    sched = DBSSchedule(cfg, epochs=20, train_size=N, val_size=6000, rung_starts=[8, 12, 16])
    plans, _ = run(sched, [0.80, 0.82, 0.84, 0.86, 0.87, 0.88, 0.89, 0.90] + [0.70] * 12)
    assert plans[7].lr == pytest.approx(0.16) and plans[7].batch_size == 1024
    assert [plans[e].lr for e in (8, 12, 16)] == [0.02] * 3 and all(p.batch_size == 1024 for p in plans[8:])
    assert "lr 0.02" in plans[8].decision
    # a dense phase that ended below η0 (decayed) keeps its own η
    sched = DBSSchedule(cfg.model_copy(update={"plateau_patience": 1}), epochs=8, train_size=N, val_size=6000,
                        rung_starts=[6])
    plans, _ = run(sched, [0.80, 0.79, 0.79, 0.79, 0.79, 0.79, 0.79])
    assert plans[2].decision.startswith("plateau") and plans[5].lr == pytest.approx(4e-6)
    assert plans[6].lr == pytest.approx(4e-7) and plans[6].batch_size == 256  # the decay at epoch 6 stands


def test_scaling_stops_at_the_first_rung():
    # n = 1 with 3 dense epochs: 0.02, 0.04, 0.08; the doubling planned for epoch 3 is cancelled
    cfg = DBSConfig(warmup_frac=0.0, double_every=1, k=0.0)
    sched = DBSSchedule(cfg, epochs=6, train_size=N, val_size=900, rung_starts=[3, 4, 5])
    plans, _ = run(sched, [0.70, 0.75, 0.78, 0.70, 0.72, 0.73])
    assert [(round(p.lr, 6), p.batch_size, p.phase) for p in plans] == [
        (0.02, 128, "lr"), (0.04, 256, "lr"), (0.08, 512, "lr"), (0.08, 512, "hold"), (0.08, 512, "hold"),
        (0.08, 512, "hold")]
    assert "scaling over" in plans[3].decision
    # fixed baselines restart too, and the ladder without dense epochs starts settled at η0
    fixed = FixedSchedule(cfg, epochs=4, train_size=N, batch_size=64, rung_starts=[0, 2])
    assert (fixed.plan().phase, fixed.plan().lr) == ("fixed", 0.02)


def test_noise_scale_constant_within_stepwise_rounding_auto_k_and_val_sizes():
    """As below, with the critical k ("auto") and validation splits of 500-6,000 images (the fall
    rule's standard error changes when the LR phase ends)."""
    rng = np.random.default_rng(0)
    for k in (0.0, 0.02, 0.05, 1.6, "auto"):
        for trial in range(5):
            cfg = DBSConfig(k=k, double_every=int(rng.integers(1, 4)))
            sched = DBSSchedule(cfg, epochs=40, train_size=N, val_size=int(rng.integers(500, 6000)))
            g0 = 0.02 * N / (128 * 0.1)
            acc, decayed = 0.3, False
            for e in range(40):
                p = sched.plan()
                if p.phase == "hold" and p.lr < 0.02:
                    decayed = True
                if p.phase in ("lr", "momentum") or (p.phase == "hold" and not decayed):
                    g = p.noise_scale(N)
                    assert abs(g / g0 - 1) <= 32 / (2 * p.batch_size) + 1e-12, (k, trial, p)
                acc += float(rng.normal(0.01, 0.01))  # mostly improving, sometimes falling
                sched.step(acc)


def test_stepwise_rounding():
    assert stepwise(341.33, 32, 128, 1024) == 352
    assert stepwise(335.9, 32, 128, 1024) == 320
    assert stepwise(336.0, 32, 128, 1024) == 352  # half up
    assert stepwise(50.0, 32, 128, 1024) == 128
    assert stepwise(5000.0, 32, 128, 1024) == 1024


def test_bmax_limits():
    cfg = DBSConfig()
    assert DBSSchedule(cfg, epochs=10, train_size=5000).bmax == 480  # 500 -> 480
    assert DBSSchedule(cfg, epochs=10, train_size=N, bmax_memory=300).bmax == 288
    small = DBSSchedule(cfg, epochs=10, train_size=1000)  # N/10 = 100 -> 96 < Bmin
    assert small.bmax == 128 and small.notes and "clamped" in small.notes[0]
    rows = plan(cfg, epochs=10, train_size=1000)
    assert all(r["batch_size"] == 128 for r in rows)


def test_noise_scale_constant_within_stepwise_rounding():
    rng = np.random.default_rng(0)
    for k in (0.0, 0.02, 0.05, 1.6):
        for trial in range(5):
            cfg = DBSConfig(k=k, double_every=int(rng.integers(1, 4)))
            sched = DBSSchedule(cfg, epochs=40, train_size=N)
            g0 = 0.02 * N / (128 * 0.1)
            acc, decayed = 0.3, False
            for e in range(40):
                p = sched.plan()
                if p.phase == "hold" and p.lr < 0.02:
                    decayed = True
                if p.phase in ("lr", "momentum") or (p.phase == "hold" and not decayed):
                    g = p.noise_scale(N)
                    assert abs(g / g0 - 1) <= 32 / (2 * p.batch_size) + 1e-12, (k, trial, p)
                acc += float(rng.normal(0.01, 0.01))  # mostly improving, sometimes falling
                sched.step(acc)


# -- the ODE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.02, 0.3, 1.6, 5.0])
def test_ode_invariant_conserved(k):
    t, y, dy = integrate_momentum_ode(k, 0.5, 0.9, 1.0)
    assert t[-1] == pytest.approx(1.0) and np.all(y > 0)
    e = ode_invariant(y, dy, k)
    # k = 0.02 turns at y ~ 2e-4 where y'' ~ 100: still ~4e-9 relative with dt = 1e-4
    assert np.max(np.abs(e - e[0])) <= 1e-8 * abs(e[0])
    # the turning point falls between grid samples: the sampled minimum is within ~y''·dt²/2 of the
    # exact y0·exp(−v0²/2k) (sharp turn for small k; momentum_curve bisects for the exact hold value)
    assert np.min(y) == pytest.approx(0.1 * math.exp(-0.25 / (2 * k)), rel=1e-6 if k >= 0.3 else 1e-3)


def test_momentum_curve_k0_is_linear_and_capped():
    t = np.array([0.0, 0.02, 0.05, 0.1, 0.15, 0.17, 0.18, 0.19, 0.2, 0.5])
    m = momentum_curve(0.0, 0.5, 0.9, 0.99, t)
    np.testing.assert_allclose(m[:6], 0.9 + 0.5 * t[:6], atol=1e-12)
    # would reach 1 at t = 0.2; capped at m_max from t = 0.18
    assert m[6] == pytest.approx(0.99, abs=1e-12) and np.all(m[7:] == 0.99)
    m1 = momentum_curve(0.0, 0.5, 0.9, 0.999, t)
    assert m1[8] == pytest.approx(0.999)  # cap at 0.999 reached before t = 0.2


def test_momentum_curve_monotone_held_and_capped():
    t = np.linspace(0, 1, 2001)
    for k in (0.0, 0.01, 0.05, 0.06, 0.5, 1.3, 1.6, 1.75):
        m = momentum_curve(k, 0.5, 0.9, 0.99, t)
        assert m[0] == 0.9
        assert np.all(np.diff(m) >= 0), k
        assert np.all(m <= 0.99)
        limit = min(0.99, momentum_limit(k, 0.5, 0.9))
        assert m[-1] == pytest.approx(limit, abs=1e-9), k
    kc = critical_k(0.5, 0.9, 0.99)
    assert 0.054 < kc < 0.0543
    assert momentum_curve(kc * 0.99, 0.5, 0.9, 0.99, [1.0])[0] == 0.99
    assert momentum_curve(kc * 1.01, 0.5, 0.9, 0.99, [1.0])[0] < 0.99
    assert momentum_limit(1.6, 0.5, 0.9) == pytest.approx(0.9075, abs=1e-4)  # spec §4.3
    assert momentum_curve(1.6, 0.0, 0.9, 0.99, [0.0, 0.5])[1] == 0.9  # v0 = 0: nothing rises
    with pytest.raises(ValueError):
        momentum_curve(1.6, 0.5, 0.9, 0.99, [-0.1])


# -- fall_noise: observed (the run's own epoch-to-epoch noise) -------------------------------------------

# Validation accuracy per epoch of the three SWR-CNN+DBS members of an H100 run at the paper's scale
# (bench/dbs_stack.py, preset paper-fashion-mnist with the ladder [0.2, 0.3]: 54,000 train / 6,000 val,
# 30 + 2 x 3 epochs, warm-up 4 epochs, n = 2, git f029d74), up to the epoch where the recorded schedule
# made the decision under test.  ConvPool-CNN-C's epoch 6 is the guarded epoch's own value (0.7982; the
# history records it after the restore).
H100 = dict(epochs=36, train_size=54000, val_size=6000, rung_starts=[30, 33])
H100_VALS = {
    "alexnet": [0.8738, 0.8923, 0.8940, 0.8850, 0.8962, 0.9083, 0.8810, 0.9097, 0.9072, 0.9062, 0.8652, 0.8965],
    "all_cnn_c": [0.8955, 0.8845, 0.8993, 0.9025, 0.8740, 0.8985, 0.8552, 0.8555, 0.9273, 0.9123, 0.9162],
    "convpool_cnn_c": [0.8473, 0.8732, 0.8012, 0.8568, 0.8758, 0.8997, 0.7982, 0.8505, 0.8763],
}


def h100_replay(member, fall_noise):
    sched = DBSSchedule(DBSConfig(fall_noise=fall_noise), **H100)
    run(sched, H100_VALS[member])
    p = sched.plan()
    return p.phase, round(p.lr, 6), round(p.momentum, 4), p.batch_size


def test_binomial_replay_gives_the_recorded_decisions():
    # What the H100 run did (spec §4.2 as written): AlexNet fell back from 0.16 (B 1024) to 0.08 (B 512)
    # on a 1.1 pt dip; All-CNN-C and ConvPool-CNN-C ended the momentum phase after two dips below the
    # best, B back at 128 for the remaining 25 epochs of each.
    assert h100_replay("alexnet", "binomial") == ("momentum", 0.08, 0.9, 512)
    assert h100_replay("all_cnn_c", "binomial") == ("hold", 0.02, 0.9, 128)
    assert h100_replay("convpool_cnn_c", "binomial") == ("hold", 0.02, 0.9, 128)


def test_observed_noise_keeps_scaling_through_the_same_dips():
    # The same values judged against the noise each member showed before its first doubling
    # (0.84 / 1.33 / 3.14 pt vs a binomial SE of 0.37-0.40 pt): AlexNet keeps Bmax, the other two keep
    # raising m (and B) -- All-CNN-C's fall at 0.04 (4.3 pt, > 2 x 1.33) is still a fall.
    assert h100_replay("alexnet", "observed") == ("hold", 0.16, 0.9, 1024)
    assert h100_replay("all_cnn_c", "observed") == ("momentum", 0.02, 0.9395, 224)
    assert h100_replay("convpool_cnn_c", "observed") == ("momentum", 0.02, 0.9269, 160)
    sched = DBSSchedule(DBSConfig(fall_noise="observed"), **H100)
    run(sched, H100_VALS["all_cnn_c"][:8])  # the decision names the noise it judged against
    assert sched.plan().decision.startswith("fall:") and "2 SE of 1.33 pt" in sched.plan().decision


def test_run_noise():
    assert run_noise([0.8, 0.9]) is None  # one difference says nothing
    assert run_noise([0.8, 0.8, 0.8, 0.8]) == 0.0
    # +-d around a level (d = 0.01): differences 2d, sigma^2 = (2d)^2 / 2 -> sigma = d sqrt(2)
    assert run_noise([0.80, 0.82, 0.80, 0.82, 0.80]) == pytest.approx(0.01 * math.sqrt(2))
    # a steady rise counts only its per-epoch step, not its range
    assert run_noise([0.70, 0.72, 0.74, 0.76, 0.78]) == pytest.approx(0.02 / math.sqrt(2))
    assert run_noise([0.8, float("nan"), 0.8, 0.8]) == 0.0  # a NaN epoch (guarded) is left out


def test_observed_noise_is_never_below_binomial_and_still_sees_a_real_fall():
    se = math.sqrt(0.8 * 0.2 / VAL_SIZE)
    # a quiet run (no epoch-to-epoch noise): observed = binomial, so 1.5 SE is tolerated, 3 SE is a fall
    assert lr_levels([0.80, 0.80 - 3 * se, 0.80 - 3 * se], fall_noise="observed")[:4] == \
        lr_levels([0.80, 0.80 - 3 * se, 0.80 - 3 * se])[:4]
    # warm-up values with 1 pt noise, then a 10 pt collapse-free slide at the doubled η: a fall
    sched = DBSSchedule(DBSConfig(fall_noise="observed", warmup_frac=0.2, k=0.0), epochs=20, train_size=N,
                        val_size=VAL_SIZE)
    run(sched, [0.80, 0.81, 0.80, 0.81, 0.82, 0.82, 0.73, 0.73])  # warm-up 4, level 0.02 x2, 0.04 x2
    p = sched.plan()
    assert (p.phase, p.lr) == ("momentum", 0.02) and p.decision.startswith("fall:")


def test_version_2_state_resumes():
    a = DBSSchedule(DBSConfig(), **H100)
    run(a, H100_VALS["alexnet"][:7])
    sd = json.loads(json.dumps(a.state_dict()))
    sd["version"] = 2
    del sd["state"]["ref_vals"]
    b = DBSSchedule(DBSConfig(), **H100)
    b.load_state_dict(sd)
    assert b.plan() == a.plan()
    assert run(b, H100_VALS["alexnet"][7:]) == run(a, H100_VALS["alexnet"][7:])
    sd["version"] = 1
    with pytest.raises(ValueError, match="version 1"):
        b.load_state_dict(sd)


# -- state dict ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,vals", [
    (script_schedule, SCRIPT_VALS),
    (lambda: DBSSchedule(DBSConfig(), epochs=20, train_size=N), SCRIPT_VALS),
    (lambda: DBSSchedule(DBSConfig(fall_noise="observed"), **H100), H100_VALS["all_cnn_c"]),
    (lambda: FixedSchedule(DBSConfig(), epochs=20, train_size=N, batch_size=256), SCRIPT_VALS),
])
def test_state_dict_round_trip_every_epoch(make, vals):
    for cut in range(len(vals)):
        a = make()
        run(a, vals[:cut])
        b = make()
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert b.plan() == a.plan() and b.plan() == b.plan()  # plan() is idempotent
        pa, ga = run(a, vals[cut:])
        pb, gb = run(b, vals[cut:])
        assert pa == pb and ga == gb


def test_state_dict_refuses_other_settings():
    a = script_schedule()
    sd = a.state_dict()
    with pytest.raises(ValueError, match="epochs"):
        DBSSchedule(DBSConfig(k=0.0), epochs=21, train_size=N).load_state_dict(sd)
    with pytest.raises(ValueError, match="config"):
        DBSSchedule(DBSConfig(k=0.5), epochs=20, train_size=N).load_state_dict(sd)
    with pytest.raises(ValueError, match="kind"):
        FixedSchedule(DBSConfig(k=0.0), epochs=20, train_size=N, batch_size=128).load_state_dict(sd)


def test_state_keeps_bmax_of_the_run():
    a = DBSSchedule(DBSConfig(), epochs=10, train_size=N, bmax_memory=512)
    b = DBSSchedule(DBSConfig(), epochs=10, train_size=N)  # e.g. resumed on a bigger device
    b.load_state_dict(a.state_dict())
    assert b.bmax == 512


# -- divergence guard -----------------------------------------------------------------------------------

def test_guard_non_finite_loss_after_increase():
    sched = script_schedule()
    run(sched, SCRIPT_VALS[:4])
    p = sched.plan()
    assert (p.epoch, p.lr, p.batch_size, p.increase) == (4, 0.04, 256, True)
    assert sched.step(0.72, loss_finite=False) is True
    p = sched.plan()
    assert (p.phase, p.lr, p.momentum, p.batch_size, p.increase) == ("momentum", 0.02, 0.9, 128, False)
    # the LR phase ended: momentum rises from t = 0 at epoch 5 (m = 0.9 + 0.5/20)
    sched.step(0.71)
    assert sched.plan().momentum == pytest.approx(0.925) and sched.plan().batch_size == 160  # raw 170.7


def test_guard_collapse_after_increase():
    sched = script_schedule()
    run(sched, SCRIPT_VALS[:4])  # best 0.70
    assert sched.step(0.60) is True  # 0.10 below the best, right after the doubling
    p = sched.plan()
    assert (p.phase, p.lr, p.batch_size) == ("momentum", 0.02, 128)
    assert sched.state_dict()["state"]["best"] == 0.70  # the guarded epoch is void


def test_small_drop_is_a_fall_not_a_collapse():
    sched = script_schedule()
    run(sched, SCRIPT_VALS[:4])
    assert sched.step(0.65) is False  # 0.05 below: not a collapse; the level's first epoch is not judged
    assert (sched.plan().phase, sched.plan().lr) == ("lr", 0.04)
    assert sched.step(0.65) is False  # the level's last epoch is below 0.70: the fall rule, weights kept
    p = sched.plan()
    assert (p.phase, p.lr, p.batch_size) == ("momentum", 0.02, 128)


def test_guard_in_momentum_phase_and_repeat():
    sched = script_schedule()
    run(sched, SCRIPT_VALS[:9])  # epoch 9 runs m 0.925, B 352 (increase)
    assert sched.step(float("nan")) is True  # NaN accuracy counts as divergence
    p = sched.plan()
    assert (p.phase, p.lr, round(p.momentum, 10), p.batch_size) == ("hold", 0.04, 0.9, 256)
    assert p.decision.startswith("guard: NaN")
    # a second divergence with nothing left to undo cuts η by plateau_factor; B stays
    assert sched.step(0.5, loss_finite=False) is True
    p = sched.plan()
    assert (p.phase, round(p.lr, 10), round(p.momentum, 10), p.batch_size) == ("hold", 0.004, 0.9, 256)


def test_guard_in_warmup_ends_scaling():
    sched = script_schedule()
    assert sched.step(0.5) is False
    assert sched.step(0.5, loss_finite=False) is True  # epoch 1 raised η to 0.015
    p = sched.plan()
    assert (p.phase, p.lr, p.batch_size) == ("hold", 0.01, 128)


def test_fixed_schedule():
    cfg = DBSConfig()
    sched = build_schedule("fixed", cfg, epochs=20, train_size=N, batch_size=512)
    vals = [0.5 + 0.01 * i for i in range(8)] + [0.5] * 5 + [0.6]
    plans, guards = run(sched, vals)
    assert [(p.phase, round(p.lr, 10), p.momentum, p.batch_size) for p in plans[:4]] == [
        ("warmup", 0.01, 0.9, 512), ("warmup", 0.015, 0.9, 512), ("fixed", 0.02, 0.9, 512),
        ("fixed", 0.02, 0.9, 512)]
    assert [round(p.lr, 10) for p in plans[12:14]] == [0.02, 0.002]  # plateau after 5 bad epochs
    assert [p.increase for p in plans[:4]] == [True, True, True, False]
    assert not any(guards)
    # the guard still works on a non-finite loss: back to before the last increase (0.015)...
    sched = FixedSchedule(cfg, epochs=20, train_size=N, batch_size=512)
    run(sched, [0.5, 0.6, 0.7, 0.8])
    assert sched.step(0.8, loss_finite=False) is True
    assert sched.plan().lr == pytest.approx(0.015) and sched.plan().phase == "fixed"
    # ...and then cuts η
    assert sched.step(0.8, loss_finite=False) is True
    assert sched.plan().lr == pytest.approx(0.0015) and sched.plan().batch_size == 512


def test_zero_warmup_starts_in_lr_phase():
    sched = DBSSchedule(DBSConfig(warmup_frac=0.0), epochs=10, train_size=N)
    p = sched.plan()
    assert (p.phase, p.lr, p.batch_size, p.increase) == ("lr", 0.02, 128, True)


def test_plan_continues_improving_after_short_sequence():
    rows = plan(DBSConfig(k=0.0), epochs=20, train_size=N, val_accuracies=SCRIPT_VALS[:8])
    assert rows[7]["lr"] == pytest.approx(0.08) and rows[8]["phase"] == "momentum"
    assert [r["val_accuracy"] for r in rows[8:]] == sorted(r["val_accuracy"] for r in rows[8:])
    assert rows[8]["val_accuracy"] > 0.74


# -- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("lr0", 0.0), ("lr_start", 0.05), ("lr_start", -1.0), ("m0", 1.0), ("m_max", 0.85), ("m_max", 1.0),
    ("b0", 100), ("b0", 0), ("bmin", 48), ("bmin", 256), ("bmax_cap", 0), ("warmup_frac", 1.0),
    ("double_every", 0), ("k", -0.1), ("v0", -0.5), ("plateau_patience", 0), ("plateau_factor", 0.0),
    ("plateau_factor", 1.5), ("step", 0), ("collapse_drop", 0.0), ("b0", 128.5), ("b0", True),
    ("lr0", "0.02"), ("k", float("nan")), ("fall_z", -1.0), ("fall_noise", "loud"), ("rung_lr", "peak"), ("k", "fast"),
])
def test_bad_config_names_the_field(field, value):
    from esdbs_ray.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^(train\.dbs\.{field}=|train\.dbs: {field}=)"):
        DBSConfig.from_dict({field: value}, "train.dbs")


def test_config_dict_round_trip_and_unknown_keys():
    cfg = DBSConfig(k=0.05, b0=256.0)  # integral float accepted, stored as int
    assert cfg.b0 == 256 and isinstance(cfg.b0, int)
    assert DBSConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'kk'; valid keys: lr_start, lr0"):
        DBSConfig.from_dict({"kk": 1.0})


def test_build_schedule_errors():
    with pytest.raises(ValueError, match=r"choices: \['dbs', 'fixed'\]"):
        build_schedule("cyclic", DBSConfig(), epochs=10, train_size=N)
    with pytest.raises(ValueError, match="batch_size"):
        build_schedule("fixed", DBSConfig(), epochs=10, train_size=N)
    with pytest.raises(ValueError, match="epochs"):
        DBSSchedule(DBSConfig(), epochs=0, train_size=N)
    assert isinstance(build_schedule("dbs", DBSConfig(), epochs=10, train_size=N), DBSSchedule)


def test_plot_momentum_curves(tmp_path):
    out = plot_momentum_curves(str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 10_000 and out.endswith("m.png")
