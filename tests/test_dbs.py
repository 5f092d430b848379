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
    plot_momentum_curves,
    stepwise,
)

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

# epochs=20 -> warm-up W = round(0.1 * 20) = 2 epochs; n = 2; k = 0 (m = 0.9 + 0.5 t), Bmin = B0 = 128.
SCRIPT_VALS = [0.50, 0.60,               # warm-up
               0.65, 0.70, 0.72, 0.74,   # lr phase: 0.02 x2, 0.04 x2 (improving)
               0.73,                     # first epoch at 0.08 falls below 0.74 -> back to 0.04
               0.75, 0.76, 0.77, 0.80,   # momentum phase until B = Bmax
               0.79, 0.79, 0.79, 0.79, 0.79,  # 5 epochs without improvement -> plateau
               0.81, 0.82, 0.83, 0.84]
SCRIPT_EXPECTED = [
    # phase, lr, momentum, batch, increase
    ("warmup", 0.01, 0.9, 128, True),      # epoch 0: lr_start
    ("warmup", 0.015, 0.9, 128, True),     # 0.01 + 0.01 * 1/2
    ("lr", 0.02, 0.9, 128, True),          # η0: B = B0
    ("lr", 0.02, 0.9, 128, False),
    ("lr", 0.04, 0.9, 256, True),          # doubled: B = 2 * 128
    ("lr", 0.04, 0.9, 256, False),
    ("lr", 0.08, 0.9, 512, True),          # doubled: B = 4 * 128; val falls
    ("momentum", 0.04, 0.9, 256, False),   # back to 0.04; momentum t = 0 -> m0
    ("momentum", 0.04, 0.925, 352, True),  # t = 1/20: raw 2 * 0.1/0.075 * 128 = 341.3 -> nearest 32: 352
    ("momentum", 0.04, 0.95, 512, True),   # t = 2/20: raw 2 * 2 * 128 = 512
    ("momentum", 0.04, 0.975, 1024, True),  # t = 3/20: raw 2 * 4 * 128 = 1024 = Bmax -> phase ends
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),
    ("hold", 0.04, 0.975, 1024, False),    # 5th epoch without improvement
    ("hold", 0.004, 0.975, 128, False),    # plateau: η * 0.1; raw 0.2 * 4 * 128 = 102.4 -> Bmin 128
    ("hold", 0.004, 0.975, 128, False),
    ("hold", 0.004, 0.975, 128, False),
    ("hold", 0.004, 0.975, 128, False),
]


def script_schedule():
    return DBSSchedule(DBSConfig(k=0.0), epochs=20, train_size=N)


def test_scripted_run_every_phase_by_hand():
    sched = script_schedule()
    assert sched.bmax == 1024 and sched.bmin == 128 and sched.warmup_epochs == 2
    plans, guards = run(sched, SCRIPT_VALS)
    assert triples(plans) == SCRIPT_EXPECTED
    assert [p.epoch for p in plans] == list(range(20))
    assert not any(guards)
    assert all(p.batch_size % 32 == 0 and 128 <= p.batch_size <= 1024 for p in plans)
    assert {p.phase for p in plans} <= set(PHASES)


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
    assert set(rows[0]) >= {"epoch", "phase", "lr", "momentum", "batch_size", "noise_scale"}
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


def test_momentum_phase_follows_the_ode_and_stops():
    cfg = DBSConfig()  # k = 1.6: momentum tops out at ~0.9075 within ~3 % of the epochs
    sched = DBSSchedule(cfg, epochs=50, train_size=N)
    vals = [0.5 + 0.01 * i for i in range(9)] + [0.55] + [0.6 + 0.01 * i for i in range(10)]
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


def test_momentum_fall_reverts_to_previous_momentum():
    sched = script_schedule()
    vals = SCRIPT_VALS[:9] + [0.755]  # epoch 9 (m 0.95) falls below 0.76
    plans, _ = run(sched, vals)
    p = sched.plan()
    assert (p.phase, round(p.momentum, 10), p.batch_size, p.increase) == ("hold", 0.925, 352, False)


def test_momentum_step_is_shortened_to_land_on_bmax():
    sched = DBSSchedule(DBSConfig(k=0.0, bmax_cap=800), epochs=20, train_size=N)
    plans, _ = run(sched, SCRIPT_VALS[:11])
    # t = 3/20 would give m 0.975 (raw 1024 > 800): m stops at 1 - 0.1 * 2 * 128/800 = 0.968.
    assert (plans[10].phase, plans[10].batch_size) == ("momentum", 800)
    assert plans[10].momentum == pytest.approx(0.968, abs=1e-12)
    assert sched.plan().phase == "hold" and sched.plan().batch_size == 800


def test_bmin_floor_and_multiples():
    cfg = DBSConfig(bmin=64, k=0.0)
    sched = DBSSchedule(cfg, epochs=20, train_size=N)
    vals = SCRIPT_VALS[:11] + [0.79] * 5 + [0.78] * 4 + [0.77] * 2
    plans, _ = run(sched, vals)
    # first plateau: 0.004 -> raw 102.4 -> 96 (nearest multiple of 32, above Bmin 64);
    # second plateau: 0.0004 -> raw 10.24 -> Bmin 64.
    assert [(round(p.lr, 8), p.batch_size) for p in plans[15:22]] == [
        (0.04, 1024), (0.004, 96), (0.004, 96), (0.004, 96), (0.004, 96), (0.004, 96), (0.0004, 64)]
    assert plans[0].batch_size == 128  # warm-up runs at B0, not Bmin


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


# -- state dict ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,vals", [
    (script_schedule, SCRIPT_VALS),
    (lambda: DBSSchedule(DBSConfig(), epochs=20, train_size=N), SCRIPT_VALS),
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
    assert sched.step(0.65) is False  # 0.05 below: the LR-phase fall rule, weights kept
    p = sched.plan()
    assert (p.phase, p.lr, p.batch_size) == ("momentum", 0.02, 128)


def test_guard_in_momentum_phase_and_repeat():
    sched = script_schedule()
    run(sched, SCRIPT_VALS[:9])  # epoch 9 runs m 0.95, B 512 (increase)
    assert sched.step(float("nan")) is True  # NaN accuracy counts as divergence
    p = sched.plan()
    assert (p.phase, p.lr, round(p.momentum, 10), p.batch_size) == ("hold", 0.04, 0.925, 352)
    # a second divergence with nothing left to undo cuts η by plateau_factor
    assert sched.step(0.5, loss_finite=False) is True
    p = sched.plan()
    assert (p.phase, round(p.lr, 10), round(p.momentum, 10)) == ("hold", 0.004, 0.925)
    assert p.batch_size == 128  # raw 0.2 * 0.1/0.075 * 128 = 34 -> Bmin


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
    rows = plan(DBSConfig(k=0.0), epochs=20, train_size=N, val_accuracies=SCRIPT_VALS[:7])
    assert rows[6]["lr"] == pytest.approx(0.08) and rows[7]["phase"] == "momentum"
    assert [r["val_accuracy"] for r in rows[7:]] == sorted(r["val_accuracy"] for r in rows[7:])
    assert rows[7]["val_accuracy"] > 0.74


# -- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("lr0", 0.0), ("lr_start", 0.05), ("lr_start", -1.0), ("m0", 1.0), ("m_max", 0.85), ("m_max", 1.0),
    ("b0", 100), ("b0", 0), ("bmin", 48), ("bmin", 256), ("bmax_cap", 0), ("warmup_frac", 1.0),
    ("double_every", 0), ("k", -0.1), ("v0", -0.5), ("plateau_patience", 0), ("plateau_factor", 0.0),
    ("plateau_factor", 1.5), ("step", 0), ("collapse_drop", 0.0), ("b0", 128.5), ("b0", True),
    ("lr0", "0.02"), ("k", float("nan")),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DBSConfig\.{field}="):
        DBSConfig(**{field: value})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = DBSConfig(k=0.05, b0=256.0)  # integral float accepted, stored as int
    assert cfg.b0 == 256 and isinstance(cfg.b0, int)
    assert DBSConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown DBSConfig key\(s\) \['kk'\].*valid keys"):
        DBSConfig.from_dict({"kk": 1.0})


def test_build_schedule_errors():
    with pytest.raises(ValueError, match=r"choices: \['dbs', 'fixed'\]"):
        build_schedule("cosine", DBSConfig(), epochs=10, train_size=N)
    with pytest.raises(ValueError, match="batch_size"):
        build_schedule("fixed", DBSConfig(), epochs=10, train_size=N)
    with pytest.raises(ValueError, match="epochs"):
        DBSSchedule(DBSConfig(), epochs=0, train_size=N)
    assert isinstance(build_schedule("dbs", DBSConfig(), epochs=10, train_size=N), DBSSchedule)


def test_plot_momentum_curves(tmp_path):
    out = plot_momentum_curves(str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 10_000 and out.endswith("m.png")
