"""Dynamic batch size (DBS): the per-epoch schedule of learning rate, momentum and batch size.

Paper §3.4 / Algorithm 1 / §5.3, closed by ``spec/method.md`` §4.  Pure Python + numpy: no torch, no
ray, so the trainer, the CLI (``esdbs dbs-plan``) and the tests share one deterministic state machine
whose state is a small JSON-serialisable dict saved in every checkpoint.

**Noise scale.**  Smith & Le treat SGD with momentum m, learning rate η and batch B on N examples as
a stochastic differential equation whose gradient-noise scale is g = η/(1 − m) · (N/B − 1), about
η N / (B (1 − m)) for B ≪ N (paper eq. 15-16).  DBS first warms η up to the reference η0, then raises η
(doubling every n epochs) and afterwards m, and at every epoch picks the batch that keeps g at its
value at the reference point (η0, m0, B0):
B = Stepwise(RoundClip(η (1 − m0) / (η0 (1 − m)) · B0, Bmin, Bmax)).  A larger batch means fewer
optimizer steps per epoch (faster epochs) at the same noise, i.e. the same implicit regularisation.

**Momentum ODE.**  The momentum rises like an electron approaching a like-charged plate: with
y = 1 − m the distance to m = 1, y''·y = k (paper eq. 17-18), i.e. y'' = k / y, a repulsion that brakes
the approach harder the closer m gets to 1.  Time is the proportion of total epochs since the momentum
phase began, y(0) = 1 − m0, y'(0) = −v0.  Multiplying by y' shows that E = ½ y'² − k ln y is conserved,
so y turns round at y_min = y0 · exp(−v0² / (2k)): momentum tops out at 1 − (1 − m0) e^{−v0²/(2k)}
(≈ 0.9075 for the paper's m0 = 0.9, v0 = 0.5, k = 1.6), and reaches m_max only for
k ≤ v0² / (2 ln((1 − m0)/(1 − m_max))) (≈ 0.054 for m_max = 0.99).  We integrate numerically (RK4 at a
fixed step of 1e-4 in proportion-of-epochs units), keep m non-decreasing (hold at the turning point,
y' ≥ 0) and cap it at m_max; k = 0 gives the straight line m = m0 + v0 t.

**Default k.**  The paper's k = 1.6 (in "proportion of epochs" time) moves B by less than one step
of 32, so the momentum phase does nothing.  ``k = "auto"`` takes the critical k for (v0, m0, m_max), at
which the ODE's turning point is exactly m_max: m comes to rest at m_max, at proportion ≈ 0.26 of the
epochs for the defaults (k = 0 reaches it at 0.18).

Phases (the closed set :data:`PHASES`):

``warmup``    η rises linearly from ``lr_start`` to ``lr0`` over W = round(warmup_frac · epochs)
              epochs (half up, possibly 0)
              (epoch e of the warm-up uses lr_start + (lr0 − lr_start) · e / W, so the first epoch
              after the warm-up is the first at η0); B = B0, m = m0.
``lr``        η doubles every ``double_every`` epochs, m = m0, B by the formula.
``momentum``  η fixed, m follows the ODE, B by the formula.
``hold``      nothing rises any more (scaling ended); only the plateau rule changes η, and B stays.
``fixed``     the fixed-batch baselines after their warm-up: η0 (plateau-decayed), m0, constant B.

Every epoch's plan carries a ``decision``: why its values are what they are (a doubling, a dip being
confirmed, a fall, Bmax, a plateau, a rung start, the guard); the trainer logs it per epoch.

Decisions where the spec leaves room (each also marked in the code):

* **Stepwise** rounds to the *nearest* multiple of ``step`` (half up), in one rounding (a separate
  Round to an integer first could double-round), so the noise scale is off by at most step / (2B).
  Bmin and Bmax are themselves multiples of ``step`` (``b0`` and ``bmin`` are validated to be, Bmax is
  rounded down), so the result stays inside [Bmin, Bmax].
* **LR-phase fall** (spec §4.2): judged once per level, on the level's last epoch: a fall is that
  epoch's val accuracy below the previous level's best by more than ``fall_z`` standard errors,
  SE = sqrt(a (1 − a) / n_val) at a = that best.  A level of one epoch (n = 1) whose epoch dips is
  not judged on it alone: it gets one more epoch at the same η, and only a second dip is a fall.  A
  fall sends η back to the previous level and the momentum phase follows.  The first level (η0) has
  no previous level and is never judged.  The validation size comes from the trainer (``val_size``);
  without it SE = 0 (any dip counts), as in ``plan()`` when no size is given.
  ``fall_noise: observed`` (ours, not the spec's default) takes as one SE the larger of that and the
  epoch-to-epoch noise of the run's own val accuracies over the warm-up and the first level
  (:func:`run_noise`, frozen at the first doubling, used once there are 3 values): the binomial SE is
  the noise of the image sample, not of where SGD's iterate is when the epoch ends, which on an H100
  was 2-9x larger and ended two of three members' scaling on noise.
* **Momentum-phase fall**: every momentum epoch is an increase, so one epoch below best − z·SE does
  not count alone; two in a row are a fall: m goes back to its value before the first of them and
  scaling ends (→ ``hold``).
* **Reaching Bmax**: a step whose formula batch would exceed Bmax is shortened to the η (or m) that
  gives exactly Bmax, so the noise scale is still kept; that phase then ends.  In the LR phase the
  last level still runs its n epochs under the fall rule (a fall sends η back and the momentum phase
  follows); otherwise, with B at Bmax, the momentum phase is skipped (raising m would need B > Bmax).
* **Momentum time**: the first momentum epoch is t = 0 (m = m0); epoch e uses
  t = (e − start) / epochs.  The phase ends (→ ``hold``) when m stops rising (turning point or
  m_max) or B reaches Bmax.
* **Plateau** (spec §4.5; no improvement of val accuracy for ``plateau_patience`` epochs; "improve" =
  strictly above the best): η *= plateau_factor, **B stays**, the counter resets, and any phase still
  raising things (warmup/lr/momentum) ends → ``hold`` (``fixed`` for the baselines): raising η again
  after a decay would undo it.
* **Pruning rungs** (``rung_starts``, spec §4.5): scaling happens in the dense phase only -- at the
  first rung anything still rising stops where it is (a pruning step's dip would read as a fall) --
  and every rung starts at the same η, the one the dense phase ended with (``rung_lr: lr0``, ours: at
  most η0), with the plateau's best and patience restarted: a pruned model is compared with itself,
  not with the dense best.
* **Divergence guard** (ours, spec §4.6): :meth:`step` returns True — restore the snapshot — when the
  loss was non-finite (any epoch: the weights are unusable), when the val accuracy is NaN, or when the
  epoch ran with raised values (``increase``) and its val accuracy is ≥ ``collapse_drop`` below the
  best.
  The schedule goes back to the values before the most recent increase (never above the current ones,
  so a plateau decay is not undone), ends the phase in progress (warmup/momentum → ``hold``,
  lr → ``momentum``; baselines → ``fixed``), and the guarded epoch is void for the best accuracy and
  the plateau counter.  If there is nothing left to undo (a second guard before any new increase) η is cut
  by ``plateau_factor`` so the trainer does not replay the same divergence.
* Epoch 0 always has ``increase=True`` so the trainer always holds a snapshot to restore.
* Bmax = min(bmax_cap, largest multiple of step ≤ N/10, bmax_memory) rounded down to a multiple of
  ``step``; if it is below Bmin it is clamped to Bmin (recorded in ``schedule.notes``).  The value is
  stored in the state dict, so a resumed run keeps the Bmax it started with even on another device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import DBSConfig

__all__ = [
    "PHASES",
    "DBSConfig",
    "EpochPlan",
    "DBSSchedule",
    "FixedSchedule",
    "build_schedule",
    "momentum_curve",
    "momentum_at",
    "integrate_momentum_ode",
    "ode_invariant",
    "momentum_limit",
    "critical_k",
    "stepwise",
    "formula_batch",
    "plan",
    "format_plan",
    "val_standard_error",
    "run_noise",
]

PHASES = ("warmup", "lr", "momentum", "hold", "fixed")
SCHEDULE_KINDS = ("dbs", "fixed")  # what dbs-plan previews and build_schedule builds; "cosine" is cosine.py's
_STATE_VERSION = 3  # 2: fall tolerance, rung restarts, B stays on a plateau; 3: observed fall noise
_READABLE_VERSIONS = (2, 3)  # a version-2 state resumes as 3 with no observed values (binomial runs only)

# ----------------------------------------------------------------------------------------------
# The batch formula
# ----------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; a schedule should not depend on the parity of a value.
    return int(math.floor(x + 0.5))


def stepwise(b: float, step: int, bmin: int, bmax: int) -> int:
    """Stepwise(RoundClip(b, bmin, bmax)): nearest multiple of ``step`` (half up), kept in [bmin, bmax].

    Rounds once, straight to the multiple: Algorithm 1's Round to an integer first would double-round
    (335.9 -> 336 -> 352 instead of 320) and break the |B − b| <= step/2 bound on the noise error.
    ``bmin`` and ``bmax`` are multiples of ``step`` here, so the result cannot leave the interval."""
    b = min(max(b, bmin), bmax)  # Clip
    return min(max(step * _round_half_up(b / step), bmin), bmax)  # Round + Stepwise


def _raw_batch(cfg: DBSConfig, lr: float, m: float) -> float:
    """η (1 − m0) / (η0 (1 − m)) · B0: the batch that keeps the reference noise scale."""
    return lr * (1.0 - cfg.m0) / (cfg.lr0 * (1.0 - m)) * cfg.b0


def formula_batch(cfg: DBSConfig, lr: float, m: float, bmax: int) -> int:
    """The DBS batch size for (η, m) (Algorithm 1 lines 2-4)."""
    return stepwise(_raw_batch(cfg, lr, m), cfg.step, cfg.bmin_eff, bmax)


def noise_scale(lr: float, momentum: float, batch_size: int, train_size: int) -> float:
    """g = η N / (B (1 − m)) (paper eq. 16)."""
    return lr * train_size / (batch_size * (1.0 - momentum))


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch runs with.  ``increase``: lr, momentum or batch is higher than in the previous
    epoch (always True at epoch 0) -- the trainer snapshots weights + optimizer before such an epoch."""

    epoch: int
    lr: float
    momentum: float
    batch_size: int
    phase: str
    increase: bool
    decision: str = ""  # why this epoch's values are what they are ("" when nothing changed)

    def noise_scale(self, train_size: int) -> float:
        return noise_scale(self.lr, self.momentum, self.batch_size, train_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# The momentum ODE  y'' y = k,  y = 1 - m
# ----------------------------------------------------------------------------------------------

_ODE_DT = 1e-4  # fixed RK4 step in proportion-of-epochs units: global error ~dt^4, far below rounding


def ode_invariant(y: Any, dy: Any, k: float) -> Any:
    """½ y'² − k ln y: conserved along solutions of y'' = k / y (a test helper)."""
    return 0.5 * np.asarray(dy) ** 2 - k * np.log(np.asarray(y))


def momentum_limit(k: float, v0: float, m0: float) -> float:
    """The momentum at the ODE's turning point, 1 − (1 − m0) e^{−v0²/(2k)} (uncapped; 1.0 for k = 0)."""
    if k == 0:
        return 1.0 if v0 > 0 else m0
    return 1.0 - (1.0 - m0) * math.exp(-v0 * v0 / (2.0 * k))


def critical_k(v0: float, m0: float, m_max: float) -> float:
    """The largest k for which momentum still reaches ``m_max``: v0² / (2 ln((1 − m0)/(1 − m_max)))."""
    return v0 * v0 / (2.0 * math.log((1.0 - m0) / (1.0 - m_max)))


def _rk4(y: float, dy: float, h: float, k: float) -> tuple[float, float] | None:
    """One RK4 step of (y, y')' = (y', k/y); None if a stage would put y at or below 0."""
    if y <= 0:
        return None
    a1y, a1v = dy, k / y
    y2 = y + 0.5 * h * a1y
    if y2 <= 0:
        return None
    a2y, a2v = dy + 0.5 * h * a1v, k / y2
    y3 = y + 0.5 * h * a2y
    if y3 <= 0:
        return None
    a3y, a3v = dy + 0.5 * h * a2v, k / y3
    y4 = y + h * a3y
    if y4 <= 0:
        return None
    a4y, a4v = dy + h * a3v, k / y4
    yn = y + h / 6.0 * (a1y + 2 * a2y + 2 * a3y + a4y)
    if yn <= 0:
        return None
    return yn, dy + h / 6.0 * (a1v + 2 * a2v + 2 * a3v + a4v)


def integrate_momentum_ode(k: float, v0: float, m0: float, t_end: float,
                           dt: float = _ODE_DT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw RK4 solution (t, y, y') of y'' y = k, y(0) = 1 − m0, y'(0) = −v0 on [0, t_end].

    No hold and no cap (that is :func:`momentum_curve`'s job); stops early if y would reach 0."""
    n = max(1, int(math.ceil(t_end / dt - 1e-9)))
    h = t_end / n
    ts, ys, dys = [0.0], [1.0 - m0], [-v0]
    y, dy = ys[0], dys[0]
    for i in range(1, n + 1):
        nxt = _rk4(y, dy, h, k)
        if nxt is None:
            break
        y, dy = nxt
        ts.append(i * h)
        ys.append(y)
        dys.append(dy)
    return np.array(ts), np.array(ys), np.array(dys)


@dataclass(frozen=True)
class _OdeTable:
    ys: tuple[float, ...]  # y on the grid i * _ODE_DT, up to the hold point
    dys: tuple[float, ...]
    hold_t: float | None  # from here on m is constant (turning point or m_max); None: not within t_end
    hold_m: float


@functools.lru_cache(maxsize=64)
def _ode_table(k: float, v0: float, m0: float, m_max: float, t_end: float) -> _OdeTable:
    y_cap = 1.0 - m_max
    y, dy = 1.0 - m0, -v0
    if dy >= 0:  # v0 = 0: nothing pushes m up
        return _OdeTable((y,), (dy,), 0.0, m0)
    ys, dys = [y], [dy]
    n = int(math.ceil(t_end / _ODE_DT)) + 1
    for i in range(n):
        nxt = _rk4(y, dy, _ODE_DT, k)
        if nxt is None or nxt[0] <= y_cap:
            # Reaches m_max inside this cell (or y would hit 0: clamp at m_max as well).
            return _OdeTable(tuple(ys), tuple(dys), (i + 1) * _ODE_DT, m_max)
        if nxt[1] >= 0:
            # Turning point inside this cell: bisect the partial step for y' = 0 and hold there, so m
            # is continuous and never decreases.
            lo, hi = 0.0, _ODE_DT
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                part = _rk4(y, dy, mid, k)
                if part is not None and part[1] < 0:
                    lo = mid
                else:
                    hi = mid
            part = _rk4(y, dy, hi, k)
            y_turn = min(part[0] if part is not None else y, y)
            return _OdeTable(tuple(ys), tuple(dys), i * _ODE_DT + hi, min(m_max, 1.0 - y_turn))
        y, dy = nxt
        ys.append(y)
        dys.append(dy)
    return _OdeTable(tuple(ys), tuple(dys), None, float("nan"))


def momentum_at(t: float, k: float, v0: float, m0: float, m_max: float) -> float:
    """Momentum at proportion-of-epochs time ``t`` >= 0 since the momentum phase began."""
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"proportion must be finite and >= 0, got {t!r}")
    table = _ode_table(float(k), float(v0), float(m0), float(m_max), float(max(1.0, math.ceil(t))))
    if table.hold_t is not None and t >= table.hold_t:
        return table.hold_m
    i = min(int(t / _ODE_DT), len(table.ys) - 1)
    h = t - i * _ODE_DT
    if h <= 0:
        y = table.ys[i]
    else:  # partial RK4 step from the grid point below: exact to the same order between grid points
        part = _rk4(table.ys[i], table.dys[i], h, k)
        if part is None:
            return m_max
        y = part[0]
    return min(m_max, 1.0 - y)


def momentum_curve(k: float, v0: float, m0: float, m_max: float, proportions: np.ndarray) -> np.ndarray:
    """m(t) for each proportion t of total epochs since the momentum phase began.

    RK4 of y'' y = k with y = 1 − m, y(0) = 1 − m0, y'(0) = −v0; m is held once y' >= 0 (never
    decreases) and capped at m_max (also if y would reach 0)."""
    p = np.asarray(proportions, dtype=float)
    return np.array([momentum_at(float(t), k, v0, m0, m_max) for t in p.ravel()]).reshape(p.shape)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

_RAISING = ("warmup", "lr", "momentum")  # phases in which something may still rise


def val_standard_error(accuracy: float, val_size: int | None) -> float:
    """SE of a validation accuracy ``a`` measured on ``n`` images, sqrt(a (1 − a) / n) (0 if n unknown).

    The fall rule (spec §4.2) tolerates dips within ``fall_z`` of these: at 900 images and a = 0.85 one
    SE is 1.2 points, at 6,000 images 0.46 -- a zero-tolerance rule ends the LR phase on noise."""
    if not val_size:
        return 0.0
    a = min(max(float(accuracy), 0.0), 1.0)
    return math.sqrt(a * (1.0 - a) / val_size)


def run_noise(values: Sequence[float]) -> float | None:
    """Epoch-to-epoch noise of a validation accuracy, from the run's own values (``fall_noise:
    observed``): von Neumann's mean square successive difference, sigma^2 = sum (x[i+1] - x[i])^2 /
    (2 (n - 1)).  Differences cancel a slow trend (the warm-up's rise) that the plain SD would count as
    noise; a trend still left inflates sigma a little, i.e. errs towards tolerance.  None below 3 values.

    Why not the binomial SE alone: it measures which 900 or 6,000 images were drawn, not where SGD's
    iterate happens to be at the end of an epoch.  On an H100 at paper scale (6,000 val images) this
    estimate over the warm-up and the first level gives 0.84 / 1.33 / 3.14 pt for AlexNet / All-CNN-C /
    ConvPool-CNN-C against a binomial SE of 0.37-0.40 pt, and dips of that size ended their scaling
    (tests/test_dbs.py replays them)."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if len(vals) < 3:
        return None
    d = np.diff(np.asarray(vals, dtype=float))
    return float(math.sqrt(float(np.sum(d * d)) / (2.0 * (len(vals) - 1))))


def check_schedule_args(cfg: DBSConfig, *, epochs: int, train_size: int, val_size: int | None,
                        rung_starts: Sequence[int], **positive: int) -> list[int]:
    """The checks every schedule kind makes of its arguments (``positive``: more integers >= 1, e.g. a
    fixed batch size); returns the rung starts as a list of ints."""
    if not isinstance(cfg, DBSConfig):
        raise ValueError(f"cfg must be a DBSConfig, got {type(cfg).__name__}")
    for name, v in (("epochs", epochs), ("train_size", train_size), *positive.items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1):
        raise ValueError(f"val_size={val_size!r}: must be None or an integer >= 1")
    starts = [int(e) for e in rung_starts]
    if starts != sorted(set(starts)) or any(not 0 <= e < epochs for e in starts):
        raise ValueError(f"rung_starts={list(rung_starts)!r}: must be increasing epochs in [0, {epochs})")
    return starts


def load_schedule_state(d: dict[str, Any], *, identity: dict[str, Any], keys: Sequence[str],
                        versions: Sequence[int], normalise: dict[str, Any], what: str = "schedule") -> dict[str, Any]:
    """The checks every schedule kind makes of a saved state ``d`` before taking it: a version it reads,
    the same identity (kind, settings, sizes; ``normalise``: key -> function bringing a saved value
    into today's form, e.g. a config dict with new defaults), and every state key present.  Returns the
    state dict (a copy)."""
    if d.get("version") not in versions:
        raise ValueError(f"{what} state version {d.get('version')!r}, expected {versions[-1]} "
                         "(written by an older esdbs: start the run again)")
    for key, value in identity.items():
        theirs = d.get(key)
        if key in normalise:
            theirs = normalise[key](theirs)
        if theirs != value:
            raise ValueError(f"schedule state has {key}={theirs!r}, this schedule has {value!r}: "
                             "build the schedule with the checkpoint's settings")
    state = dict(d["state"])
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"schedule state lacks key(s) {missing}")
    return state


class _Schedule:
    """Shared machinery: warm-up, rung restarts, plateau rule, divergence guard, state dict.

    Mutable state lives in ``self._s`` (a flat dict of JSON types), so ``state_dict`` is a copy of it and
    the plan for the current epoch is stored, not recomputed: :meth:`plan` is idempotent.  ``decision``
    says why the current epoch's values are what they are (empty when nothing changed)."""

    kind = ""
    _guard_end: dict[str, str] = {}  # phase -> phase that follows when the guard ends it
    _settled = "hold"  # the phase once nothing rises any more (plateau, rung start, ...)

    def __init__(self, cfg: DBSConfig, *, epochs: int, train_size: int, val_size: int | None = None,
                 rung_starts: Sequence[int] = ()) -> None:
        starts = check_schedule_args(cfg, epochs=epochs, train_size=train_size, val_size=val_size,
                                     rung_starts=rung_starts)
        self.cfg = cfg
        self.epochs = epochs
        self.train_size = train_size
        self.val_size = val_size
        self.rung_starts = tuple(starts)
        # Warm-up length: round half up, possibly 0.
        self.warmup_epochs = _round_half_up(cfg.warmup_frac * epochs)
        self.notes: list[str] = []

    # -- hooks ---------------------------------------------------------------------------------
    def _formula(self, lr: float, m: float) -> int:
        raise NotImplementedError

    def _after_warmup(self) -> tuple[str, float, float, int, str]:
        """(phase, lr, m, batch, decision) of the first epoch after the warm-up."""
        raise NotImplementedError

    def _phase_step(self, val: float, last_scaling_epoch: bool) -> tuple[str, float, float, int, str]:
        """(phase, lr, m, batch, decision) for the next epoch after one in a post-warm-up phase."""
        s = self._s
        return s["phase"], s["lr"], s["m"], s["batch"], ""

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state fields (JSON types)."""
        return {}

    def _observe(self, val: float) -> None:
        """Every epoch's val accuracy, before the schedule moves on (not called for a guarded epoch)."""

    # -- common --------------------------------------------------------------------------------
    def _warmup_lr(self, e: int) -> float:
        cfg = self.cfg
        return cfg.lr_start + (cfg.lr0 - cfg.lr_start) * e / self.warmup_epochs

    def _se(self, accuracy: float) -> float:
        return val_standard_error(accuracy, self.val_size)

    def _tolerance(self, ref: float) -> tuple[float, str]:
        """(bar, text): a val accuracy below ``bar`` is a dip beyond ``fall_z`` SE of ``ref``."""
        z, se = self.cfg.fall_z, self._se(ref)
        return ref - z * se, f"- {z:g} SE of {100 * se:.2f} pt"

    def _init_state(self) -> None:
        self._s = {"epoch": 0, "best": None, "bad_epochs": 0, "rung": -1, "rung_lr": None, **self._extra_state()}
        if self.rung_starts[:1] == (0,):  # no dense epochs: nothing to scale, the ladder starts at once
            phase, lr, m, batch = self._settled, self.cfg.lr0, self.cfg.m0, self._formula(self.cfg.lr0, self.cfg.m0)
            self._s.update(rung=0, rung_lr=lr)
            decision = "no dense epochs: the ladder starts at lr0"
        elif self.warmup_epochs > 0:
            phase, lr, m, batch = "warmup", self._warmup_lr(0), self.cfg.m0, self._formula(self.cfg.lr0, self.cfg.m0)
            decision = f"warm-up 1/{self.warmup_epochs}"
        else:
            phase, lr, m, batch, decision = self._after_warmup()
        self._s.update(phase=phase, lr=lr, m=m, batch=batch, decision=decision,
                       increase=True,  # epoch 0: so the trainer always has a snapshot to restore
                       pre_lr=lr, pre_m=m, pre_batch=batch)  # values before the most recent increase

    def plan(self) -> EpochPlan:
        s = self._s
        return EpochPlan(epoch=s["epoch"], lr=s["lr"], momentum=s["m"], batch_size=s["batch"],
                         phase=s["phase"], increase=s["increase"], decision=s["decision"])

    def step(self, val_accuracy: float, loss_finite: bool = True) -> bool:
        """End of the current epoch: feed its val accuracy; advance. True = restore the snapshot."""
        s, cfg = self._s, self.cfg
        val = float(val_accuracy)
        best = s["best"]
        cur = (s["lr"], s["m"], s["batch"])
        nxt = s["epoch"] + 1
        collapse = s["increase"] and best is not None and val <= best - cfg.collapse_drop + 1e-12
        guard = (not loss_finite) or math.isnan(val) or collapse
        if guard:
            # Back to the values before the most recent increase, never above the current ones (a
            # plateau decay since then stays); the epoch is void for best and the plateau counter.
            lr, m, batch = min(cur[0], s["pre_lr"]), min(cur[1], s["pre_m"]), min(cur[2], s["pre_batch"])
            if (lr, m) == cur[:2]:
                lr *= cfg.plateau_factor  # nothing left to undo: do not replay the divergence
            phase = self._guard_end.get(s["phase"], s["phase"])
            if phase == "momentum" and s["phase"] != "momentum":
                self._start_momentum(nxt)
            why = ("non-finite loss" if not loss_finite else "NaN val accuracy" if math.isnan(val)
                   else f"val {val:.4f} collapsed from best {best:.4f} after an increase")
            decision = f"guard: {why} -> weights restored; lr {lr:.4g}, m {m:.4g}, B {batch}"
        else:
            self._observe(val)
            if best is None or val > best:
                s["best"], s["bad_epochs"] = val, 0
            else:
                s["bad_epochs"] += 1
            last_scaling = bool(self.rung_starts) and nxt == self.rung_starts[0]
            if s["phase"] == "warmup" and nxt < self.warmup_epochs:
                phase, lr, m, batch = "warmup", self._warmup_lr(nxt), cur[1], cur[2]
                decision = f"warm-up {nxt + 1}/{self.warmup_epochs}"
            elif s["phase"] == "warmup":
                phase, lr, m, batch, decision = self._after_warmup()
            else:
                phase, lr, m, batch, decision = self._phase_step(val, last_scaling)
            if s["bad_epochs"] >= cfg.plateau_patience:
                # Plateau (spec §4.5): nothing rises, η decays, B stays -- the noise scale falls as it
                # does for a fixed batch, so DBS and fixed-batch runs anneal alike.
                lr, m, batch = min(lr, cur[0]) * cfg.plateau_factor, min(m, cur[1]), min(batch, cur[2])
                s["bad_epochs"] = 0
                if phase in _RAISING:
                    phase = self._settled
                decision = (f"plateau: no improvement on {s['best']:.4f} for {cfg.plateau_patience} epochs "
                            f"-> lr x{cfg.plateau_factor:g} = {lr:.4g}, B stays {batch}")
        if nxt in self.rung_starts:
            phase, lr, m, batch, decision = self._start_rung(nxt, phase, lr, m, batch, cur, decision)
        increase = lr > cur[0] * (1 + 1e-12) or m > cur[1] + 1e-15 or batch > cur[2]
        if increase:
            s["pre_lr"], s["pre_m"], s["pre_batch"] = cur
        s.update(epoch=nxt, phase=phase, lr=lr, m=m, batch=batch, increase=increase, decision=decision)
        return guard

    def _start_rung(self, e: int, phase: str, lr: float, m: float, batch: int, cur: tuple, decision: str):
        """A pruning rung starts at epoch ``e`` (spec §4.5): scaling is over (nothing rises across a
        pruning step: the pruned model's dip would read as a fall), every rung starts at the same η --
        the one the dense phase ended with -- and the plateau's best and patience restart, so a pruned
        model is compared with itself and the ladder measures pruning, not learning-rate decay."""
        s = self._s
        i = self.rung_starts.index(e)
        was_raising = phase in _RAISING
        if was_raising:
            lr, m, batch, phase = min(lr, cur[0]), min(m, cur[1]), min(batch, cur[2]), self._settled
        if s["rung_lr"] is None:  # fixed for the whole ladder at the first rung
            s["rung_lr"] = lr if self.cfg.rung_lr == "dense_end" else min(lr, self.cfg.lr0)
        s.update(rung=i, best=None, bad_epochs=0)
        note = (f"rung {i + 1}: {'scaling over, ' if was_raising else ''}plateau restarted, "
                f"lr {s['rung_lr']:.4g}, m {m:.4g}, B {batch}")
        return phase, s["rung_lr"], m, batch, (decision + "; " if decision else "") + note

    def _start_momentum(self, e: int) -> None:
        pass

    # -- own images: per-step learning rates, early stopping --------------------------------------
    def step_lrs(self) -> None:
        """Per-step learning rates of the current epoch; None: the epoch runs at ``plan().lr``
        (``cosine.CosineSchedule`` returns one value per step)."""
        return None

    def skip_to(self, epoch: int) -> None:
        """Jump to ``epoch``: early stopping ended the dense phase (``train.py``), so the next epoch
        trained is the first rung's, or none.  A rung start restarts the rung as :meth:`step` does."""
        s = self._s
        if not s["epoch"] <= epoch <= self.epochs:
            raise ValueError(f"skip_to({epoch}): must be between the current epoch {s['epoch']} and {self.epochs}")
        cur = (s["lr"], s["m"], s["batch"])
        phase, lr, m, batch, decision = s["phase"], *cur, "early stopping ended the dense phase"
        if epoch in self.rung_starts:
            phase, lr, m, batch, decision = self._start_rung(epoch, phase, lr, m, batch, cur, decision)
        s.update(epoch=epoch, phase=phase, lr=lr, m=m, batch=batch, increase=False, decision=decision)

    # -- persistence ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.cfg.to_dict(), "epochs": self.epochs,
                "train_size": self.train_size, "val_size": self.val_size, "rung_starts": list(self.rung_starts)}

    def state_dict(self) -> dict[str, Any]:
        d = self._identity()
        d.update(version=_STATE_VERSION, state=dict(self._s), notes=list(self.notes))
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        d = self._upgrade(d)
        state = load_schedule_state(d, identity=self._identity(), keys=list(self._s), versions=_READABLE_VERSIONS,
                                    normalise={"config": lambda c: DBSConfig.from_dict(c).to_dict()})
        if state["phase"] not in PHASES:
            raise ValueError(f"schedule state has unknown phase {state['phase']!r}; phases: {PHASES}")
        self._s = state
        self.notes = list(d.get("notes", []))
        self._after_load()

    def _after_load(self) -> None:
        pass

    def _upgrade(self, d: dict[str, Any]) -> dict[str, Any]:
        """A saved state of an older readable version in today's form (nothing to do by default)."""
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plan()})"


class DBSSchedule(_Schedule):
    """The dynamic-batch-size schedule (spec §4): warm-up → lr → momentum → hold, plateau throughout.

    ``val_size``: images in the validation split (the fall rule's standard error); ``rung_starts``:
    first epochs of the pruning rungs; ``bmax_memory``: the largest batch that fits in accelerator
    memory, when known."""

    kind = "dbs"
    _guard_end = {"warmup": "hold", "lr": "momentum", "momentum": "hold"}

    def __init__(self, cfg: DBSConfig, *, epochs: int, train_size: int, val_size: int | None = None,
                 rung_starts: Sequence[int] = (), bmax_memory: int | None = None) -> None:
        super().__init__(cfg, epochs=epochs, train_size=train_size, val_size=val_size, rung_starts=rung_starts)
        if bmax_memory is not None and (isinstance(bmax_memory, bool) or not isinstance(bmax_memory, int)
                                        or bmax_memory < 1):
            raise ValueError(f"bmax_memory={bmax_memory!r}: must be None or an integer >= 1")
        self.bmin = cfg.bmin_eff
        n10 = (train_size // (10 * cfg.step)) * cfg.step  # largest multiple of step <= N/10
        limits = {"bmax_cap": cfg.bmax_cap, "N/10": n10}
        if bmax_memory is not None:
            limits["memory"] = bmax_memory
        bmax = (min(limits.values()) // cfg.step) * cfg.step
        if bmax < self.bmin:
            self.notes.append(f"Bmax={bmax} from {limits} is below Bmin={self.bmin}; clamped to Bmin")
            bmax = self.bmin
        self.bmax = bmax
        self.k = cfg.k_value
        self._init_state()

    def _after_load(self) -> None:
        self.bmax = int(self._s["bmax"])  # the run keeps the Bmax it started with

    def _upgrade(self, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("version") == 2 and isinstance(d.get("state"), dict):  # v2 had no observed values
            d = {**d, "state": {"ref_vals": [], **d["state"]}}
        return d

    def _formula(self, lr: float, m: float) -> int:
        return formula_batch(self.cfg, lr, m, self.bmax)

    def _lr_at_bmax(self, m: float) -> float:
        cfg = self.cfg
        return cfg.lr0 * (self.bmax / cfg.b0) * (1.0 - m) / (1.0 - cfg.m0)

    def _m_at_bmax(self, lr: float) -> float:
        cfg = self.cfg
        return 1.0 - (1.0 - cfg.m0) * lr * cfg.b0 / (cfg.lr0 * self.bmax)

    def _observe(self, val: float) -> None:
        # The run's noise at its reference point: warm-up and the first LR level, frozen at the first
        # doubling (later levels move with η, and a doubling's own dip is what is being judged).
        s = self._s
        if s["phase"] in ("warmup", "lr") and s["prev_level_lr"] is None:
            s["ref_vals"].append(val)

    def _se(self, accuracy: float) -> float:
        """One standard error of a val accuracy (``fall_noise``): the binomial SE of spec §4.2, or the
        larger of it and the run's observed epoch-to-epoch noise (:func:`run_noise`)."""
        se = val_standard_error(accuracy, self.val_size)
        if self.cfg.fall_noise == "observed":
            sigma = run_noise(self._s["ref_vals"])
            if sigma is not None:
                se = max(se, sigma)
        return se

    def _extra_state(self) -> dict[str, Any]:
        return {"bmax": self.bmax,
                "ref_vals": [],  # val accuracies before the first doubling (fall_noise: observed)
                "level_epochs": 0,  # LR phase: epochs finished at the current η level
                "prev_level_lr": None,  # LR phase: the level before the last doubling
                "prev_level_best": None,  # LR phase: best val accuracy of that level
                "level_best": None,  # LR phase: best val accuracy of the current level
                "mom_start": None,  # momentum phase: its first epoch (t = 0)
                "mom_prev_m": None,  # momentum phase: m of the epoch before the current one
                "mom_dips": 0,  # momentum phase: consecutive epochs below best - z SE
                "mom_safe_m": None}  # momentum phase: m before the first of those epochs

    def _after_warmup(self) -> tuple[str, float, float, int, str]:
        cfg = self.cfg
        self._s.update(level_epochs=0, prev_level_lr=None, prev_level_best=None, level_best=None)
        return "lr", cfg.lr0, cfg.m0, self._formula(cfg.lr0, cfg.m0), f"lr phase: level lr0 {cfg.lr0:g}"

    def _start_momentum(self, e: int) -> None:
        self._s.update(mom_start=e, mom_prev_m=None, mom_dips=0, mom_safe_m=None)

    def _phase_step(self, val: float, last_scaling_epoch: bool) -> tuple[str, float, float, int, str]:
        s, cfg = self._s, self.cfg
        e, phase, lr, m, batch = s["epoch"], s["phase"], s["lr"], s["m"], s["batch"]
        if phase == "lr":
            # A fall is judged once per level, on the level's last epoch, against the previous level's
            # best minus z standard errors; the first epoch after an increase does not count alone
            # (a doubling of η causes a transient dip of its own), so a level of one epoch that dips is
            # given one more epoch to confirm it.
            s["level_epochs"] += 1
            s["level_best"] = val if s["level_best"] is None else max(s["level_best"], val)
            ref = s["prev_level_best"]
            bar, tol = (None, "") if ref is None else self._tolerance(ref)
            dipped = bar is not None and val < bar
            if s["level_epochs"] < cfg.double_every and not last_scaling_epoch:
                return "lr", lr, m, batch, ""
            if dipped and s["level_epochs"] == 1:
                if last_scaling_epoch:
                    return "lr", lr, m, batch, ""  # one dip is not a fall; the rung start ends scaling
                return "lr", lr, m, batch, (f"lr phase: val {val:.4f} < {bar:.4f} (best of lr {s['prev_level_lr']:.4g}"
                                            f" {ref:.4f} {tol}) on the first epoch after the increase: "
                                            "one more epoch at this level to confirm")
            if dipped:
                # Back to the last level that did not lower val accuracy; the momentum phase follows.
                back = s["prev_level_lr"]
                self._start_momentum(e + 1)
                return "momentum", back, m, self._formula(back, m), (
                    f"fall: val {val:.4f} < {bar:.4f} (best of lr {back:.4g} {ref:.4f} {tol}) at lr "
                    f"{lr:.4g} -> back to lr {back:.4g}; momentum phase")
            if last_scaling_epoch:
                return "lr", lr, m, batch, ""
            if batch >= self.bmax:
                return "hold", lr, m, batch, f"Bmax {self.bmax} reached at lr {lr:.4g}: scaling ends"
            new_lr = 2.0 * lr
            if _raw_batch(cfg, new_lr, m) > self.bmax:
                new_lr = self._lr_at_bmax(m)  # shorten the step to land exactly on Bmax
            s.update(prev_level_lr=lr, prev_level_best=s["level_best"], level_best=None, level_epochs=0)
            new_b = self._formula(new_lr, m)
            return "lr", new_lr, m, new_b, (f"lr x{new_lr / lr:.3g} -> {new_lr:.4g}, B {new_b} (level {lr:.4g} "
                                            f"held: best {s['prev_level_best']:.4f})")
        if phase == "momentum":
            best = s["best"]
            bar, tol = self._tolerance(best)
            if val < bar:
                s["mom_dips"] += 1
                if s["mom_dips"] == 1:
                    s["mom_safe_m"] = s["mom_prev_m"] if s["mom_prev_m"] is not None else m
            else:
                s["mom_dips"], s["mom_safe_m"] = 0, None
            if s["mom_dips"] >= 2:  # two epochs in a row: a fall, not one epoch's transient
                back = s["mom_safe_m"]
                return "hold", lr, back, self._formula(lr, back), (
                    f"fall: val {val:.4f} < {bar:.4f} (best {best:.4f} {tol}) twice -> m back to "
                    f"{back:.4g}; scaling ends")
            if batch >= self.bmax:
                return "hold", lr, m, batch, f"Bmax {self.bmax} reached at m {m:.4g}: scaling ends"
            t = (e + 1 - s["mom_start"]) / self.epochs
            new_m = momentum_at(t, self.k, cfg.v0, cfg.m0, cfg.m_max)
            if new_m <= m:
                return "hold", lr, m, batch, f"momentum stopped rising at m {m:.4g}: scaling ends"
            if _raw_batch(cfg, lr, new_m) > self.bmax:
                new_m = max(m, self._m_at_bmax(lr))  # shorten the step to land exactly on Bmax
            s["mom_prev_m"] = m
            new_b = self._formula(lr, new_m)
            return "momentum", lr, new_m, new_b, f"m {m:.4g} -> {new_m:.4g}, B {new_b}"
        return phase, lr, m, batch, ""  # hold: nothing rises; B stays


class FixedSchedule(_Schedule):
    """The fixed-batch baselines (B in {64, ..., 1024}): same warm-up, then η0 at m0, plateau rule and
    rung restarts, constant B; the guard still fires on a non-finite loss."""

    kind = "fixed"
    _guard_end = {"warmup": "fixed"}
    _settled = "fixed"

    def __init__(self, cfg: DBSConfig, *, epochs: int, train_size: int, batch_size: int,
                 val_size: int | None = None, rung_starts: Sequence[int] = ()) -> None:
        super().__init__(cfg, epochs=epochs, train_size=train_size, val_size=val_size, rung_starts=rung_starts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self.batch_size = batch_size
        self._init_state()

    def _identity(self) -> dict[str, Any]:
        d = super()._identity()
        d["batch_size"] = self.batch_size
        return d

    def _formula(self, lr: float, m: float) -> int:
        return self.batch_size

    def _after_warmup(self) -> tuple[str, float, float, int, str]:
        return "fixed", self.cfg.lr0, self.cfg.m0, self.batch_size, f"lr0 {self.cfg.lr0:g}, fixed B {self.batch_size}"


def build_schedule(kind: str, cfg: DBSConfig, *, epochs: int, train_size: int, val_size: int | None = None,
                   rung_starts: Sequence[int] = (), batch_size: int | None = None,
                   bmax_memory: int | None = None) -> _Schedule:
    """``kind`` "dbs" -> :class:`DBSSchedule`; "fixed" -> :class:`FixedSchedule` (needs batch_size).
    The third kind, "cosine", lives in ``cosine.py`` (which builds on this module); the trainer picks."""
    if kind == "dbs":
        return DBSSchedule(cfg, epochs=epochs, train_size=train_size, val_size=val_size, rung_starts=rung_starts,
                           bmax_memory=bmax_memory)
    if kind == "fixed":
        if batch_size is None:
            raise ValueError("schedule kind 'fixed' needs batch_size")
        return FixedSchedule(cfg, epochs=epochs, train_size=train_size, batch_size=batch_size, val_size=val_size,
                             rung_starts=rung_starts)
    raise ValueError(f"unknown schedule kind {kind!r}; choices: {list(SCHEDULE_KINDS)}")


# ----------------------------------------------------------------------------------------------
# Simulation, table, figure
# ----------------------------------------------------------------------------------------------


def plan(cfg: DBSConfig, *, epochs: int, train_size: int, kind: str = "dbs",
         batch_size: int | None = None, val_accuracies: Sequence[float] | None = None,
         bmax_memory: int | None = None, val_size: int | None = None,
         rung_starts: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Simulate the schedule a run would follow, one dict per epoch.

    Validation accuracy is assumed to improve every epoch unless ``val_accuracies`` is given; after the
    end of a shorter sequence it keeps improving (closing 5 % of the gap to 1 per epoch).  With steadily
    improving accuracy the LR phase never falls, so the momentum phase only shows with a sequence that
    dips.  ``val_size`` sets the fall rule's standard error (None: any dip counts).  Keys: epoch, phase,
    lr, momentum, batch_size, noise_scale, increase, decision, val_accuracy."""
    sched = build_schedule(kind, cfg, epochs=epochs, train_size=train_size, batch_size=batch_size,
                           bmax_memory=bmax_memory, val_size=val_size, rung_starts=rung_starts)
    given = list(val_accuracies or [])
    rows, best = [], None
    for e in range(epochs):
        p = sched.plan()
        if e < len(given):
            val = float(given[e])
        elif best is None:
            val = 0.1
        else:
            val = best + (1.0 - best) * 0.05 if best < 1.0 else best + 1e-3
        best = val if best is None else max(best, val)
        rows.append({"epoch": p.epoch, "phase": p.phase, "lr": p.lr, "momentum": p.momentum,
                     "batch_size": p.batch_size, "noise_scale": p.noise_scale(train_size),
                     "increase": p.increase, "decision": p.decision, "val_accuracy": val})
        sched.step(val)
    return rows


def format_plan(rows: Sequence[dict[str, Any]]) -> str:
    """A readable table of :func:`plan` rows (or a trainer's history), with each epoch's decision."""
    head = (f"{'epoch':>5}  {'phase':<8}  {'lr':>9}  {'momentum':>8}  {'batch':>5}  {'noise':>9}  {'val':>6}  "
            "decision")
    lines = [head, "-" * len(head)]
    for r in rows:
        val = r.get("val_accuracy")
        lines.append(f"{r['epoch']:>5}  {r['phase']:<8}  {r['lr']:>9.5f}  {r['momentum']:>8.5f}  "
                     f"{r['batch_size']:>5}  {r['noise_scale']:>9.3f}  "
                     f"{'' if val is None else format(val, '.4f'):>6}  {r.get('decision', '')}")
    return "\n".join(lines)
