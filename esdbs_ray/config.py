"""Every setting of esdbs, as typed, frozen pydantic models validated once at the edge.

One validation of the whole config -- CLI flags, YAML, ``--set``, ``--scale``, a Tune dict -- happens
before anything is written or Ray starts, and a bad value ends with one line that names the key path,
the value and what is allowed::

    esdbs: error: train.dbs.b0=100: must be a positive multiple of step=32
    esdbs: error: stack.choose='best': Input should be 'nll_optimal', 'accuracy_search', ...

Models (``extra="forbid"``: an unknown key is an error that lists the valid ones):

* :class:`DBSConfig`      the schedule's constants (spec §4), used by ``dbs.py``;
* :class:`BasisConfig`    BasisConv's eigen ladder and random basis, used by ``compression.py``;
* :class:`TrainSettings`  what a pipeline's ``train:`` block may set (every trial's template);
* :class:`TrainConfig`    one trial: the settings plus the per-trial keys the pipeline fills in
                          (model, conv, schedule, dataset, seed, ...), saved in every checkpoint;
* :class:`PipelineConfig` the whole method (members x variants, batch sweep, stacking, resources,
                          the DBS search, experiment tracking) with cross-field checks (stacking sparsity on the ladder,
                          a stacked variant needs two members, every trial's TrainConfig valid).

Also here: YAML loading, ``--set KEY=VALUE``, ``--scale``, and :func:`build_config` (preset, then YAML,
then flags).  This module imports neither torch nor Ray, so rejecting a config is quick
(``esdbs config --schema`` prints the JSON Schema for editor completion).
"""
from __future__ import annotations

import copy
import math
import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
                      WithJsonSchema, model_validator)

from .model_names import MODEL_NAMES
from .errors import UserError

__all__ = [
    "ConfigError", "DBSConfig", "TrainSettings", "TrainConfig", "MemberSpec", "ResourcesConfig", "StackConfig",
    "DBSSearchConfig", "BatchSweepConfig", "PipelineConfig", "TrialSpec", "TrackingConfig", "MLflowConfig",
    "MLFLOW_SCHEMES", "VARIANTS", "BASE_VARIANTS",
    "parse_variant", "format_validation_error", "validate", "load_yaml", "set_dotted", "apply_scale",
    "build_config", "json_schema", "PER_TRIAL_KEYS", "AugmentConfig", "CosineConfig", "EarlyStoppingConfig",
    "AUGMENT_OPS",
    "BasisConfig", "VARIANT_LADDERS", "variant_ladder",  # BasisConv
    "ExpansionConfig",  # self-expanding secnn members (esdbs_ray/expansion.py)
    "ExpansionSearchConfig", "EXPANSION_SEARCH_KEYS",  # esdbs run --expansion-search (expansion_search.py)
]


class ConfigError(UserError):
    """A config is invalid; the message names the key path, the value and what is allowed."""


# --------------------------------------------------------------------------------------------------
# Value types: numbers are numbers (not bools, not strings), integers are whole, floats are finite
# --------------------------------------------------------------------------------------------------
def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_numpy_number(v):
        raise ValueError("must be a number")
    return v


def _integer(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_numpy_number(v):
        raise ValueError("must be an integer")
    if isinstance(v, float) or (_is_numpy_number(v) and not float(v).is_integer()):
        if not math.isfinite(float(v)) or not float(v).is_integer():
            raise ValueError("must be an integer")
    return int(v)  # Tune and YAML may hand over 128.0


def _is_numpy_number(v: Any) -> bool:
    return type(v).__module__ == "numpy" and hasattr(v, "dtype") and v.dtype.kind in "iuf"


def _strict_bool(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _auto_or_number(v: Any) -> Any:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_numpy_number(v):
        raise ValueError("must be 'auto' or a number")
    return v


AutoOr = BeforeValidator(_auto_or_number)


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    kw = {}
    if lo is not None:
        kw["gt" if lo_open else "ge"] = lo
    if hi is not None:
        kw["lt" if hi_open else "le"] = hi
    return kw


# Upper bounds: what a machine can honour.  Every number of a config has one, so that a typo or a
# hostile file (epochs: 10**29, image_size: 100000 -- an 838 GiB first allocation) is refused here,
# naming the key, instead of hanging a run or failing deep inside it.  MAX_NUMBER bounds what has no
# bound of its own; the values that decide a run's time or memory have tighter ones:
MAX_NUMBER = 10 ** 9
# The paper trains 30-100 epochs; 10,000 epochs of Fashion-MNIST's 54,000 training images are
# 540 million images through a network, days on a GPU even for the smallest member.
MAX_EPOCHS = 10_000
# Images per step: 65,536 Fashion-MNIST images are 205 MB of float32 input, at 224 x 224 RGB 39 GB --
# beyond any one accelerator before a single activation is stored.
MAX_BATCH = 65_536
# Image folders are resized to image_size x image_size: one 3 x 1024 x 1024 float32 image is 12 MB,
# a batch of 128 of them 1.6 GB of input; the paper's largest input is 224.
MAX_IMAGE_SIZE = 1024
# The channel multiplier: parameters grow with its square; 16x the published widths makes ResNet-50 a
# 6-billion-parameter network.
MAX_WIDTH = 16.0
MAX_SEED = 2 ** 32 - 1  # numpy's and Ray's seeds are 32-bit
MAX_THREADS = 4096
MAX_RUNGS = 100  # rungs of one ladder (the paper's has 7)
MAX_TRIALS = 1000  # Tune trials of one run (members x groups)
MAX_MEMBERS = 64  # base CNNs of one stack
MAX_CLASSES = 100_000  # classes of one task (ImageNet-21k has ~22,000)
MAX_CHANNELS = 65_536  # channels of one layer a growing member may reach


def _float(**bounds):
    """A finite float within ``bounds`` (gt/ge/lt/le; at most MAX_NUMBER unless given): pydantic checks
    the bounds and writes them into the JSON Schema; the before-validator refuses bools and strings that
    lax mode would coerce."""
    if not {"lt", "le"} & set(bounds):
        bounds["le"] = MAX_NUMBER
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_number)]


def _int(**bounds):
    if not {"lt", "le"} & set(bounds):
        bounds["le"] = MAX_NUMBER
    return Annotated[int, Field(**bounds), BeforeValidator(_integer)]


Float = _float()
Int = _int()
Bool = Annotated[bool, BeforeValidator(_strict_bool)]
Fraction = _float(**_range(0.0, 1.0, hi_open=True))  # [0, 1)
OpenFraction = _float(**_range(0.0, 1.0, lo_open=True, hi_open=True))  # (0, 1)
PosFloat = _float(**_range(0.0, lo_open=True))
NonNegFloat = _float(**_range(0.0))
PosInt = _int(**_range(1))
NonNegInt = _int(**_range(0))
Epochs = _int(**_range(0, MAX_EPOCHS))
PosEpochs = _int(**_range(1, MAX_EPOCHS))
Batch = _int(**_range(1, MAX_BATCH))
Seed = _int(**_range(0, MAX_SEED))


class _Model(BaseModel):
    """Frozen, strict about keys; errors list the valid keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                                 f"{', '.join(cls.model_fields)}")
        elif not isinstance(data, cls):
            raise ValueError(f"expected a mapping, got {type(data).__name__}")
        return data

    def to_dict(self) -> dict:
        """Plain JSON/YAML types (tuples as lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Any, where: str = ""):
        return validate(cls, d, where)

    def replace(self, **changes):
        """A validated copy with ``changes`` (``model_copy`` would skip validation)."""
        return validate(type(self), {**self.model_dump(), **changes})


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line per pydantic error -- ``key.path=value: what is allowed`` -- joined by '; '."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "lax-or", "json-or")))]
        # union branches add their type names to the location; they say nothing to a user
        loc = [x for x in loc if x not in ("float", "int", "str", "literal['auto']", "constrained-float")]
        key = ".".join(([where] if where else []) + loc)
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not loc:  # a whole-model check: its message names the keys itself
            parts.append(f"{where}: {msg}" if where else msg)
        elif err["type"] in ("missing",):
            parts.append(f"{key}: missing (required)")
        elif err["type"] == "value_error" and msg.startswith("unknown key"):
            parts.append(f"{key or 'config'}: {msg}")
        elif "input" in err and not isinstance(err["input"], dict):
            parts.append(f"{key}={brief(err['input'])}: {msg}")
        else:
            parts.append(f"{key or 'config'}: {msg}")
    # a union ("auto" or a number) reports one error per branch: say it once, as alternatives
    merged: dict[str, str] = {}
    for part in dict.fromkeys(parts):
        head, _, msg = part.partition(": ")
        if head in merged:
            merged[head] += " or " + msg.removeprefix("Input should be ")
        else:
            merged[head] = msg
    return "; ".join(f"{h}: {m}" for h, m in merged.items())


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line quotes what it refuses, not a
    100,000-item list."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 12] + f"...<{len(text):,} chars>"


def validate(cls, data: Any, where: str = ""):
    """``cls.model_validate(data)``, with a :class:`ConfigError` naming the key path on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


# --------------------------------------------------------------------------------------------------
# DBS (spec §4)
# --------------------------------------------------------------------------------------------------
class DBSConfig(_Model):
    """Constants of the DBS schedule (paper §3.4 defaults; k and v0 are searched, spec §6)."""

    lr_start: PosFloat = 0.01  # warm-up start
    lr0: PosFloat = 0.02  # reference η0 after warm-up
    m0: Fraction = 0.9  # reference momentum
    b0: Batch = 128  # reference batch size B0
    bmin: Batch | None = None  # None -> b0 (Algorithm 1 line 2)
    bmax_cap: Batch = 1024  # user cap on Bmax
    warmup_frac: Fraction = 0.1
    double_every: PosEpochs = 2  # n: LR doubles every n epochs in the LR phase
    # "auto": the critical k for (v0, m0, m_max), at which m comes to rest exactly at m_max (spec §4.3):
    # the paper's k = 1.6 tops m out at 0.9075, less than one 32-step of B.  A number overrides it.
    k: Annotated[Union[Literal["auto"], NonNegFloat], AutoOr] = "auto"
    v0: NonNegFloat = 0.5
    m_max: OpenFraction = 0.99
    plateau_patience: PosEpochs = 5
    plateau_factor: _float(**_range(0.0, 1.0, lo_open=True)) = 0.1
    step: Batch = 32  # Stepwise multiple
    collapse_drop: _float(**_range(0.0, 1.0, lo_open=True)) = 0.1  # val drop right after an increase
    fall_z: NonNegFloat = 2.0  # a fall must exceed this many standard errors of the val estimate (spec §4.2)
    # What "one standard error" is: "binomial" (spec §4.2) sqrt(a (1 - a) / n_val), the test-sample noise
    # of one accuracy; "observed" the larger of that and the epoch-to-epoch noise the run itself shows
    # before its first doubling (dbs.DBSSchedule._se): on an H100 at paper scale that noise was 2-9x
    # the binomial SE and ended the LR phase of two of three members on noise.
    fall_noise: Literal["binomial", "observed"] = "binomial"
    # The learning rate every pruning rung retrains at: "dense_end" (spec §4.5) the dense phase's last
    # η -- its peak when the dense phase is too short to plateau (CPU presets: 3 epochs) -- or "lr0",
    # at most the reference η0 (B stays, so the noise scale falls as on a plateau).
    rung_lr: Literal["dense_end", "lr0"] = "dense_end"

    @model_validator(mode="after")
    def _cross(self) -> "DBSConfig":
        if not self.lr_start <= self.lr0:
            raise ValueError(f"lr_start={self.lr_start}: must be <= lr0={self.lr0}")
        if not self.m0 < self.m_max:
            raise ValueError(f"m_max={self.m_max}: must be > m0={self.m0}")
        if self.b0 % self.step:
            raise ValueError(f"b0={self.b0}: must be a positive multiple of step={self.step}")
        if self.bmin is not None and (self.bmin % self.step or self.bmin > self.b0):
            raise ValueError(f"bmin={self.bmin}: must be a multiple of step={self.step} that is <= b0={self.b0}")
        return self

    @property
    def bmin_eff(self) -> int:
        return self.b0 if self.bmin is None else self.bmin

    @property
    def k_value(self) -> float:
        """k as a number: "auto" is the critical k (v0, m0, m_max) of ``dbs.critical_k``."""
        if self.k == "auto":
            return self.v0 * self.v0 / (2.0 * math.log((1.0 - self.m0) / (1.0 - self.m_max)))
        return float(self.k)


# --------------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------------
# basis_random: every eligible conv a BasisConv2d with a fixed random orthonormal basis,
# trained from scratch (train.basis.fraction / layers say how many basis filters and which convs).
Conv = Literal["spatial", "winograd_relu", "basis_random"]
Optimizer = Literal["sgd", "adam", "adamw"]  # adamw: own images
Schedule = Literal["fixed", "dbs"]
Device = Literal["auto", "cpu", "cuda"]
# the Winograd-ReLU layer's implementations (esdbs_ray.winograd.IMPLS; a test keeps the two equal)
WinogradImpl = Literal["auto", "native", "fused", "triton", "reference", "functional"]
DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100")


def _dataset(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a dataset name")
    if v in DATASET_NAMES or (v.startswith("imagefolder:") and len(v) > len("imagefolder:")):
        return v
    raise ValueError(f"unknown dataset; choose one of: {', '.join(DATASET_NAMES)}, imagefolder:<path>")


def _model_name(v: Any) -> str:
    if v not in MODEL_NAMES:
        raise ValueError(f"unsupported model; choose one of: {', '.join(MODEL_NAMES)}")
    return v


def _ladder(v: Any) -> tuple:
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)):
        raise ValueError("must be a list of sparsities")
    return tuple(v)


def _increasing(v: tuple) -> tuple:
    if list(v) != sorted(set(v)):
        raise ValueError("must be strictly increasing (masks only shrink)")
    return v


def _decreasing(v: tuple) -> tuple:
    if list(v) != sorted(set(v), reverse=True):
        raise ValueError("must be strictly decreasing (each rung keeps at most the previous rung's basis)")
    return v


DatasetName = Annotated[str, AfterValidator(_dataset), Field(max_length=4096)]
PathText = Annotated[str, Field(max_length=4096)]
ModelName = Annotated[str, AfterValidator(_model_name)]
Ladder = Annotated[tuple[OpenFraction, ...], BeforeValidator(_ladder), Field(max_length=MAX_RUNGS),
                   AfterValidator(_increasing)]
Threshold = _float(**_range(0.0, 1.0, lo_open=True))  # (0, 1]: an eigenvalue share; 1.0 is lossless
BasisLadder = Annotated[tuple[Threshold, ...], BeforeValidator(_ladder), Field(max_length=MAX_RUNGS),
                        AfterValidator(_decreasing)]

# --------------------------------------------------------------------------------------------------
# Own images: augmentation, cosine schedule, early stopping
# --------------------------------------------------------------------------------------------------
# Augmentation ops, applied in the order listed (torchvision.transforms.v2; ``augment.py``).
AugmentOp = Literal["random_resized_crop", "hflip", "vflip", "color_jitter", "randaugment", "trivialaugment"]
AUGMENT_OPS: tuple[str, ...] = AugmentOp.__args__
Probability = _float(**_range(0.0, 1.0))


def _augment_short_forms(v: Any) -> Any:
    """``augment: [hflip, trivialaugment]`` or ``augment: hflip`` is ``{ops: [...]}``; none / [] is off."""
    if v is None or v == "none" or v == []:
        return {"ops": []}
    if isinstance(v, str):
        return {"ops": [v]}
    if isinstance(v, (list, tuple)):
        return {"ops": list(v)}
    return v


class AugmentConfig(_Model):
    """Training-time augmentation (never at evaluation): the ops in the order given, each image of a
    batch drawing its own parameters from a seeded generator that travels in the checkpoint."""

    ops: tuple[AugmentOp, ...] = ()
    crop_scale: tuple[_float(**_range(0.0, 1.0, lo_open=True)), _float(**_range(0.0, 1.0, lo_open=True))] = (0.35, 1.0)
    crop_ratio: tuple[PosFloat, PosFloat] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.5
    brightness: NonNegFloat = 0.2  # factor drawn from [1 - b, 1 + b], as v2.ColorJitter
    contrast: NonNegFloat = 0.2
    saturation: NonNegFloat = 0.2
    hue: _float(**_range(0.0, 0.5)) = 0.0  # 0: off (v2's hue shift costs ~4x the other three together)
    randaugment_ops: _int(**_range(1, 14)) = 2
    randaugment_magnitude: _int(**_range(0, 30)) = 9  # of v2.RandAugment's 31 magnitude bins

    @model_validator(mode="before")
    @classmethod
    def _short(cls, data: Any) -> Any:
        return _augment_short_forms(data)

    @model_validator(mode="after")
    def _cross(self):
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops: {list(self.ops)} names an op twice")
        if {"randaugment", "trivialaugment"} <= set(self.ops):
            raise ValueError("ops: randaugment and trivialaugment are two policies for the same job; choose one")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale={list(self.crop_scale)}: must be [low, high] with low <= high")
        if self.crop_ratio[0] > self.crop_ratio[1]:
            raise ValueError(f"crop_ratio={list(self.crop_ratio)}: must be [low, high] with low <= high")
        return self


class CosineConfig(_Model):
    """Linear warm-up then cosine decay, per optimizer step (``lr_schedule: cosine``; ``cosine.py``).

    The peak is ``dbs.lr0`` and the warm-up runs from ``dbs.lr_start`` over ``dbs.warmup_frac`` of the
    dense phase's steps, the keys every schedule reads; these two set the ends of the decay."""

    final_lr_frac: Fraction = 0.0  # the decay ends at final_lr_frac * lr0
    rung_lr_frac: _float(**_range(0.0, 1.0, lo_open=True)) = 0.1  # each rung's retraining restarts at this * lr0

    @model_validator(mode="after")
    def _order(self):
        if self.rung_lr_frac < self.final_lr_frac:
            raise ValueError(f"rung_lr_frac={self.rung_lr_frac}: must be >= final_lr_frac={self.final_lr_frac} "
                             "(a rung's cosine decays from the one to the other)")
        return self


class EarlyStoppingConfig(_Model):
    """Stop the dense phase when validation loss has not improved for ``patience`` epochs and go on
    with the best epoch's weights (also when the phase ends without stopping).  0 = off."""

    patience: Epochs = 0
    min_delta: NonNegFloat = 0.0  # an improvement must lower validation loss by more than this


# Keys of TrainConfig that the pipeline sets per trial; a pipeline config sets them elsewhere.
PER_TRIAL_KEYS = ("model", "conv", "schedule", "dataset", "data_dir", "subset", "test_subset", "val_fraction",
                  "image_size", "seed")


class BasisConfig(_Model):
    """BasisConv (Tayyab & Mahalanobis, ``esdbs_ray/basisconv.py``).

    ``ladder``: the eigen ladder, thresholds t (cumulative eigenvalue share per layer, section 4.2)
    strictly decreasing in (0, 1].  After the dense epochs each rung re-expresses every eligible conv
    of the trained spatial model (a BasisConv layer of the previous rung: its current effective
    filters) in its truncated eigen basis and fine-tunes for ``retrain_epochs``: the first
    ``stage1_epochs`` train only the 1x1 coefficients (the paper's step one), the rest every non-basis
    parameter (step two, section 4.3), at the schedule's learning rate times ``stage1_lr_scale`` /
    ``stage2_lr_scale`` (the paper: 0.1 then 5e-4).  Each rung is evaluated, checkpointed and its
    predictions written like a sparsity rung, identified by its t (``basis_threshold``).
    ``fraction`` / ``layers``: for ``conv: basis_random`` Q = ceil(fraction * C_out) random basis
    filters per layer (capped at C_in k k); which convs become BasisConv layers (``all`` the paper's
    "each convolution layer", the image stem included; ``relu`` keeps the stem spatial) -- also for
    the eigen ladder.
    """

    ladder: BasisLadder = ()
    stage1_epochs: Epochs = 1  # of each rung's retrain_epochs: coefficients only
    stage1_lr_scale: PosFloat = 1.0
    # Step two moves every non-basis parameter of a model that step one already brought back close to
    # its dense accuracy; the paper drops the rate 200-fold (0.1 -> 5e-4), bench/basisconv.py used 5x.
    stage2_lr_scale: PosFloat = 0.1
    fraction: _float(**_range(0.0, 1.0, lo_open=True)) = 1.0
    layers: Literal["all", "relu"] = "all"


class ExpansionConfig(_Model):
    """Self-expanding ``secnn`` members (``../shared/spec/self-expanding.md``; ``esdbs_ray/expansion.py``).

    At the end of every ``check_every``-th dense epoch, once ``cooldown`` epochs have passed since the
    last expansion, the natural expansion score eta of the network and of every candidate (each block
    widened by ``widen_channels``; a residual layer added to each block, ``n_init`` initialisations)
    is computed on ``score_samples`` training images; the best candidate's eta * exp(-penalty * dp^2)
    (dp: parameters added) over the current eta must exceed ``tau`` for the network to grow.
    ``damping``: lambda = damping * mean Fisher diagonal of the current network; ``score_chunk``:
    per-sample gradients computed at once (memory); ``calibration_samples``: images that set a new BN
    channel's running statistics.  Limits: ``max_params``, ``max_layers_per_block``, ``max_width``."""

    enabled: Bool = False
    tau: _float(**_range(1.0)) = 2.0
    check_every: PosEpochs = 1
    cooldown: Epochs = 5
    widen_channels: _int(**_range(1, 1024)) = 4
    n_init: _int(**_range(1, 64)) = 4
    score_samples: _int(**_range(2, 10 ** 6)) = 1024
    score_chunk: Batch = 256
    calibration_samples: _int(**_range(2, 10 ** 6)) = 256
    damping: _float(**_range(0.0, lo_open=True)) = 1e-3
    penalty: NonNegFloat = 1e-8
    max_params: PosInt = 200_000
    max_layers_per_block: _int(**_range(0, 1000)) = 4
    max_width: _int(**_range(1, MAX_CHANNELS)) = 256


class TrainSettings(_Model):
    """What a pipeline's ``train:`` block (and a member's or variant's overrides) may set."""

    width: _float(**_range(0.0, MAX_WIDTH, lo_open=True)) = 1.0  # channel multiplier (1.0 = published widths)
    dropout: Fraction = 0.0
    optimizer: Optimizer = "sgd"
    # L2 rate in the paper's (Keras) convention, loss += l2 * sum(w^2) over conv weights, i.e. an
    # SGD weight decay of 2 * l2 on convolution weights (spatial or Winograd-domain) only.
    l2: NonNegFloat = 0.0
    epochs: Epochs = 10  # dense epochs before the sparsity ladder
    dbs: DBSConfig = DBSConfig()  # lr/momentum/B0/warm-up/plateau for both schedules
    sparsity_ladder: Ladder = ()
    retrain_epochs: Epochs = 2
    threads: _int(**_range(1, MAX_THREADS)) | None = None
    device: Device = "auto"
    amp: Bool = True  # bf16 autocast on CUDA; ignored on CPU
    # conv: winograd_relu -- which implementation runs the layer: "auto" ($ESDBS_WINOGRAD_IMPL, else the
    # device's default: native on CPU, fused on CUDA); "triton" (CUDA) the hand-written kernels
    winograd_impl: WinogradImpl = "auto"
    eval_batch_size: Batch = 1000
    kernel_layer: _int(**_range(0, 10_000)) = 0  # which Winograd layer Fig. 5a shows
    # --- own images; cross-field checks in TrainConfig._own_images (overrides are partial) ---
    # "plateau": the paper's schedules (warm-up, then lr0 with the plateau rule; DBS its own rules);
    # "cosine": linear warm-up then cosine decay per step, for fixed-batch trials (variants without +DBS).
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    cosine: CosineConfig = CosineConfig()
    weight_decay: NonNegFloat = 0.0  # AdamW's decoupled decay on conv and linear weights (not BN, biases)
    label_smoothing: Fraction = 0.0  # training loss only: validation loss (early stopping) stays the plain NLL
    augment: AugmentConfig = AugmentConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    basis: BasisConfig = BasisConfig()  # BasisConv: the eigen ladder, the random basis
    expansion: ExpansionConfig = ExpansionConfig()  # self-expanding secnn (expansion.py); model secnn only

    @model_validator(mode="after")
    def _ladder_retrains(self):
        if self.sparsity_ladder and self.retrain_epochs < 1:
            raise ValueError("retrain_epochs must be >= 1 when sparsity_ladder is set (each rung retrains)")
        if self.basis.ladder and self.retrain_epochs < 1:
            raise ValueError("retrain_epochs must be >= 1 when basis.ladder is set (each rung fine-tunes)")
        if self.basis.ladder and self.basis.stage1_epochs > self.retrain_epochs:
            raise ValueError(f"basis.stage1_epochs={self.basis.stage1_epochs}: must be <= retrain_epochs="
                             f"{self.retrain_epochs} (step one is the first part of each basis rung)")
        return self


class TrainConfig(TrainSettings):
    """One trial's whole config; travels into every checkpoint."""

    dataset: DatasetName = "fashion-mnist"
    data_dir: PathText | None = None
    subset: _int(**_range(20)) | None = None  # stratified training subset for smoke runs
    test_subset: _int(**_range(20)) | None = None
    val_fraction: OpenFraction = 0.1
    image_size: _int(**_range(8, MAX_IMAGE_SIZE)) = 64  # image folders only
    model: ModelName = "alexnet"
    conv: Conv = "spatial"
    schedule: Schedule = "fixed"
    seed: Seed = 0

    @model_validator(mode="after")
    def _something_to_train(self):
        if self.basis.ladder and self.sparsity_ladder:
            raise ValueError(f"basis.ladder={list(self.basis.ladder)}: cannot be combined with sparsity_ladder="
                             f"{list(self.sparsity_ladder)}; one compression ladder per trial")
        if self.basis.ladder and self.conv != "spatial":
            raise ValueError(f"basis.ladder={list(self.basis.ladder)}: needs conv='spatial' (it compresses a "
                             f"trained spatial model), got conv={self.conv!r}")
        if self.sparsity_ladder and self.conv == "basis_random":
            raise ValueError(f"sparsity_ladder={list(self.sparsity_ladder)}: conv='basis_random' leaves no "
                             "spatial 3x3 convolution to prune (every one is a BasisConv layer)")
        if self.total_epochs < 1:
            raise ValueError("nothing to train: epochs + len(sparsity_ladder or basis.ladder) * retrain_epochs "
                             "must be >= 1")
        if self.total_epochs > MAX_EPOCHS:
            raise ValueError(f"epochs + len(ladder) * retrain_epochs = {self.total_epochs}: at most {MAX_EPOCHS:,} "
                             "epochs per trial")
        return self

    @model_validator(mode="after")
    def _expansion(self):
        if self.expansion.enabled and self.model != "secnn":
            raise ValueError(f"expansion.enabled=True: growth needs model 'secnn' (the self-expanding CNN), "
                             f"got model={self.model!r}")
        if self.expansion.enabled and self.conv == "basis_random":
            raise ValueError("expansion.enabled=True: growth acts on spatial or Winograd-ReLU convs, not on "
                             "conv='basis_random'")
        return self

    @model_validator(mode="after")
    def _own_images(self):
        """The own-images keys against the rest of the trial."""
        if self.lr_schedule == "cosine" and self.schedule == "dbs":
            raise ValueError("lr_schedule='cosine' is for fixed-batch trials; DBS sets the learning rate itself "
                             "(use a variant without +DBS, or lr_schedule: plateau for it)")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"weight_decay={self.weight_decay} is AdamW's decoupled decay: set optimizer: adamw "
                             f"(sgd and adam take the paper's l2)")
        if self.l2 and self.optimizer == "adamw":
            raise ValueError(f"l2={self.l2} is the paper's coupled L2 for sgd/adam; adamw takes weight_decay")
        return self

    @property
    def schedule_kind(self) -> str:
        """The trainer's schedule: "dbs", "fixed" (warm-up + plateau; ``dbs.build_schedule``) or "cosine"
        (``cosine.CosineSchedule``)."""
        return "cosine" if self.schedule == "fixed" and self.lr_schedule == "cosine" else self.schedule

    @property
    def ladder_rungs(self) -> int:
        """Rungs after the dense epochs: the sparsity ladder's or the basis ladder's (never both)."""
        return len(self.sparsity_ladder) or len(self.basis.ladder)

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.ladder_rungs * self.retrain_epochs

    def rung_starts(self) -> list[int]:
        """First epoch of each ladder rung (where the trainer compresses and the schedule restarts)."""
        return [self.epochs + i * self.retrain_epochs for i in range(self.ladder_rungs)]

    def rung_of(self, epoch: int) -> int:
        """The ladder rung ``epoch`` belongs to; -1 for the dense epochs."""
        return (epoch - self.epochs) // self.retrain_epochs if epoch >= self.epochs else -1

    def rung_ends(self) -> dict[int, float]:
        """Last epoch of each rung -> its target sparsity (0.0 for the dense phase, if it has epochs, and
        for basis rungs, which do not prune: those are told apart by their threshold, see ``rung_of``)."""
        ends = {self.epochs - 1: 0.0} if self.epochs else {}
        for i in range(self.ladder_rungs):
            ends[self.epochs + (i + 1) * self.retrain_epochs - 1] = (
                self.sparsity_ladder[i] if self.sparsity_ladder else 0.0)
        return ends


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
# The paper's variants (section 4; spec section 1): base variant -> (conv, stacked?).  Any of them
# takes a "+DBS" suffix for the dynamic batch size schedule ("SWR-CNN+DBS" is the paper's method;
# "C-CNN+DBS" and "SC-CNN+DBS" are the DBS rows of its Tables 2/4/6).
# BasisConv stacks, stacked and weighted like the others:
#   SBC-CNN  "stacked BasisConv CNN": the members train as spatial CNNs for train.epochs, then climb
#            train.basis.ladder (eigen basis of each trained conv, two-step fine-tuning per rung);
#   SRB-CNN  "stacked random-basis CNN": the members train from scratch with fixed random orthonormal
#            bases (conv basis_random) for train.epochs; no ladder.
BASE_VARIANTS: dict[str, tuple[str, bool]] = {
    "C-CNN": ("spatial", False),
    "SC-CNN": ("spatial", True),
    "SWR-CNN": ("winograd_relu", True),
    "SBC-CNN": ("spatial", True),
    "SRB-CNN": ("basis_random", True),
}
# Which ladder a base variant's trials climb after the dense epochs: "sparsity" (train.sparsity_ladder,
# the default), "basis" (train.basis.ladder) or None (dense training only).
VARIANT_LADDERS: dict[str, str | None] = {"SBC-CNN": "basis", "SRB-CNN": None}
VARIANTS = tuple(v + s for v in BASE_VARIANTS for s in ("", "+DBS"))
Variant = Literal["C-CNN", "C-CNN+DBS", "SC-CNN", "SC-CNN+DBS", "SWR-CNN", "SWR-CNN+DBS",
                  "SBC-CNN", "SBC-CNN+DBS", "SRB-CNN", "SRB-CNN+DBS"]
# The stacking methods a config may run (stacking.METHODS implements each, a test checks it), and
# the rules ``choose`` may pick the ensemble's by.
STACK_METHODS = ("nll_optimal", "accuracy_search", "equal", "best_single", "caruana")
StackMethod = Literal[STACK_METHODS]
STACK_CHOICES = (*STACK_METHODS, "best_val", "cv")


def parse_variant(name: str) -> tuple[str, str, bool]:
    """variant name -> (conv, schedule, stacked?)"""
    base, dbs = (name[: -len("+DBS")], True) if name.endswith("+DBS") else (name, False)
    if base not in BASE_VARIANTS:
        raise ConfigError(f"unsupported variant {name!r}; choose from {', '.join(VARIANTS)}")
    conv, stacked = BASE_VARIANTS[base]
    return conv, "dbs" if dbs else "fixed", stacked


def variant_ladder(name: str) -> str | None:
    """"sparsity", "basis" or None: the ladder the variant's trials climb (see VARIANT_LADDERS)."""
    parse_variant(name)
    return VARIANT_LADDERS.get(name.removesuffix("+DBS"), "sparsity")


def _overrides(v: Any) -> dict:
    """A partial TrainSettings: known keys, each value valid (checked against the whole template later)."""
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of train settings")
    bad = sorted(set(v) & set(PER_TRIAL_KEYS))
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be set here: they are set by the pipeline "
                         "(use members / top-level keys)")
    unknown = sorted(set(v) - set(TrainSettings.model_fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(TrainSettings.model_fields)}")
    try:  # each value valid on its own now, even for a variant no trial uses
        TrainSettings.model_validate({k: v[k] for k in v if k not in ("sparsity_ladder", "retrain_epochs")})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None
    return dict(v)


Overrides = Annotated[dict[str, Any], BeforeValidator(_overrides)]


# A member's name: its trials' names, file names (predictions, weights, members/<name>.json) and Tune's.
MemberName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]
_MEMBER_KEYS = ("model", "name", "seed")  # a member mapping's own keys; the rest are its train settings


class MemberSpec(_Model):
    """One base CNN of the stack; ``overrides`` are train settings for this member only.

    ``name``: the member's (and its trials') name; None gives the model's name, and a model's second,
    third, ... unnamed member ``<model>-2``, ``<model>-3`` (:meth:`PipelineConfig.member_names`).
    ``seed``: this member's initialisation, batch order and growth draws (None: the config's ``seed``);
    the validation split is the config's for every member, so their predictions stack."""

    model: ModelName
    name: MemberName | None = None
    seed: Seed | None = None
    overrides: Overrides = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"model": data}
        if isinstance(data, dict) and "overrides" not in data and "model" in data:
            return {**{k: data[k] for k in _MEMBER_KEYS if k in data},
                    "overrides": {k: v for k, v in data.items() if k not in _MEMBER_KEYS}}
        if not isinstance(data, (dict, cls)):
            raise ValueError(f"a member is a model name or a mapping with 'model', got {data!r}")
        return data

    def to_yaml(self) -> Any:
        own = {k: v for k, v in (("name", self.name), ("seed", self.seed)) if v is not None}
        return {"model": self.model, **own, **self.overrides} if own or self.overrides else self.model


# What a user writes for a member: a model name, or a mapping with "model" and train settings.
_MEMBER_SCHEMA = {"anyOf": [
    {"type": "string", "enum": list(MODEL_NAMES)},
    {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string", "enum": list(MODEL_NAMES)},
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", "maxLength": 64},
        "seed": {"type": "integer", "minimum": 0}}},
]}


class ResourcesConfig(_Model):
    cpus_per_trial: _float(**_range(0.0, MAX_THREADS, lo_open=True)) = 1.0
    # "auto": trials share the GPUs so that fractions pack (1 / ceil(trials per GPU)); 0 forces CPU.
    gpus_per_trial: Annotated[Union[Literal["auto"], _float(**_range(0.0, 1024))], AutoOr] = "auto"
    max_concurrent_trials: _int(**_range(0, MAX_TRIALS)) = 0  # 0 = as many as resources allow
    # A finished trial's Ray actor runs the next pending trial of the same resources (base stage and
    # DBS search), keeping its imports, CUDA context and compiled Winograd layers
    # (bench/dbs_search_reuse.py); false starts a fresh process per trial.
    reuse_actors: bool = True


class StackConfig(_Model):
    sparsity: Fraction | None = None  # which rung the ensemble uses; None = each member's last rung
    # Which rung the basis-ladder groups (SBC-CNN) stack, by its threshold t; None = each member's last
    # (most compressed) rung.  Groups of the sparsity ladder use ``sparsity``; SRB-CNN has one rung.
    basis_threshold: Threshold | None = None
    methods: tuple[StackMethod, ...] = STACK_METHODS
    tune_samples: _int(**_range(0, 10 ** 6)) = 0  # > 0 adds the accuracy search run as a Tune experiment
    # Which method's weights the ensemble uses: "cv" the lowest K-fold cross-validated NLL inside the
    # validation split (spec section 5: fitted weights over-fit the split that fitted them).
    choose: Literal[STACK_CHOICES] = "cv"
    cv_folds: _int(**_range(2, 100)) = 5

    @model_validator(mode="after")
    def _choose_is_run(self):
        if not self.methods:
            raise ValueError("methods: at least one stacking method")
        if self.choose not in ("best_val", "cv") and self.choose not in self.methods:
            raise ValueError(f"choose={self.choose!r} is not among methods {list(self.methods)}")
        return self


_SEARCH_KINDS = {"uniform": 2, "loguniform": 2, "choice": 1, "randint": 2}


def field_adapter(model: type[BaseModel], key: str) -> TypeAdapter:
    """A validator of one field of ``model``: its type with its constraints (ranges, lengths)."""
    info = model.model_fields[key]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


def _search_space(v: Any) -> dict:
    if not isinstance(v, dict) or not v:
        raise ValueError("expected a non-empty mapping of DBS constant -> {kind: arguments}")
    for key, spec in v.items():
        if key not in DBSConfig.model_fields:
            raise ValueError(f"{key!r} is not a DBS constant; choose from {', '.join(DBSConfig.model_fields)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _SEARCH_KINDS):
            raise ValueError(f"{key}: expected one of {sorted(_SEARCH_KINDS)} mapping to its arguments")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, (list, tuple)) or (kind != "choice" and len(args) != 2) or not args:
            raise ValueError(f"{key}.{kind}: expected a list of {'values' if kind == 'choice' else '[low, high]'}")
        if kind != "choice" and not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"{key}.{kind}: bounds must be numbers")
        if kind != "choice" and not args[0] < args[1]:
            raise ValueError(f"{key}.{kind}: low must be < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"{key}.loguniform: bounds must be > 0")
        if len(args) > 1000:
            raise ValueError(f"{key}.{kind}: {len(args):,} values; at most 1,000")
        check = field_adapter(DBSConfig, key)
        for a in args:  # every value (or bound) must be one the constant takes
            try:
                check.validate_python(a)
            except ValidationError as exc:
                raise ValueError(f"{key}.{kind}: {format_validation_error(exc)}") from None
    return dict(v)


class DBSSearchConfig(_Model):
    model: ModelName = "alexnet"
    num_samples: _int(**_range(1, MAX_TRIALS)) = 8
    epochs: PosEpochs = 6
    grace_period: PosEpochs = 2
    # spec section 6: (k, v0, n, warm-up fraction, B0, Bmax cap, eta0)
    space: Annotated[dict[str, Any], BeforeValidator(_search_space)] = Field(default_factory=lambda: {
        "k": {"loguniform": [0.005, 2.0]},
        "v0": {"uniform": [0.1, 1.0]},
        "double_every": {"choice": [1, 2, 3]},
        "warmup_frac": {"choice": [0.0, 0.1, 0.2]},
        "b0": {"choice": [64, 128, 256]},
        "bmax_cap": {"choice": [512, 1024, 2048]},
        "lr0": {"loguniform": [0.01, 0.1]},
    })

    @model_validator(mode="after")
    def _grace(self):
        if self.grace_period > self.epochs:
            raise ValueError(f"grace_period={self.grace_period} exceeds epochs={self.epochs}")
        return self


# What the expansion search may vary: the growth settings that decide when and how a member grows.
EXPANSION_SEARCH_KEYS = ("tau", "penalty", "cooldown", "check_every", "widen_channels", "n_init", "damping")


def _expansion_space(v: Any) -> dict:
    """Growth setting -> {uniform|loguniform|randint: [low, high]} or {choice|grid: [values]}, each value
    one the setting takes (``grid``: every value is tried, ``choice``: drawn)."""
    if not isinstance(v, dict) or not v:
        raise ValueError("expected a non-empty mapping of growth setting -> {kind: arguments}")
    kinds = {**_SEARCH_KINDS, "grid": 1}
    for key, spec in v.items():
        if key not in EXPANSION_SEARCH_KEYS:
            raise ValueError(f"{key!r} is not a searchable growth setting; choose from {', '.join(EXPANSION_SEARCH_KEYS)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds):
            raise ValueError(f"{key}: expected one of {sorted(kinds)} mapping to its arguments")
        kind, args = next(iter(spec.items()))
        listed = kind in ("choice", "grid")
        if not isinstance(args, (list, tuple)) or not args or (not listed and len(args) != 2):
            raise ValueError(f"{key}.{kind}: expected a list of {'values' if listed else '[low, high]'}")
        if not listed and not args[0] < args[1]:
            raise ValueError(f"{key}.{kind}: low must be < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"{key}.loguniform: bounds must be > 0")
        for a in args:  # every value (or bound) must be one the setting accepts
            try:
                ExpansionConfig.model_validate({key: a})
            except ValidationError as exc:
                raise ValueError(f"{key}.{kind}: {format_validation_error(exc)}") from None
    return dict(v)


class ExpansionSearchConfig(_Model):
    """``esdbs run --expansion-search``: a Tune experiment over the growth settings (``space``) of one
    growing member -- ``member`` by name, else the first with ``train.expansion.enabled`` -- each
    setting trained with ``seeds`` seeds (``seed``, +1, ...; None: the member's seed) for ``epochs`` dense
    epochs, every trial to the end (no early stopping: growth late in a run would be cut off).  The choice: the setting
    with the fewest final parameters among those whose mean validation accuracy at the last epoch is
    within one standard error of the best (``expansion_search.py``)."""

    member: MemberName | None = None
    epochs: PosEpochs = 6
    seeds: _int(**_range(1, 100)) = 1
    # Seeds apart from the members' keep the run's members out of the choice of their own settings.
    seed: Seed | None = None
    num_samples: _int(**_range(1, MAX_TRIALS)) = 1  # draws of the space: every grid point this many times, sampled kinds drawn anew
    space: Annotated[dict[str, Any], BeforeValidator(_expansion_space)] = Field(default_factory=lambda: {
        "tau": {"grid": [1.05, 1.1, 1.2, 1.5, 2.0]},
        "penalty": {"grid": [0.0, 1e-9, 1e-8]},
    })


class BatchSweepConfig(_Model):
    """The paper's batch-size tables (2/4/6): fixed batch sizes, and DBS, at one chosen sparsity.

    Each (variant, B) trains like the main trials but stops its ladder at ``sparsity``; a trial that a
    main trial already covers (same variant at the reference batch size B0) is not run twice."""

    batch_sizes: Annotated[tuple[_int(**_range(2, MAX_BATCH)), ...], Field(max_length=32)] = ()
    variants: tuple[Literal["C-CNN", "SC-CNN", "SWR-CNN"], ...] = ("C-CNN", "SC-CNN", "SWR-CNN")
    with_dbs: Bool = True  # also each variant with the DBS schedule (the tables' "DBS (ours)" row)
    sparsity: Fraction = 0.3


class TrialSpec(_Model):
    """One Tune trial: which member of which group, and its whole TrainConfig.

    ``export_sparsity``: the rung whose weights the trainer keeps for ``esdbs export`` -- the rung the
    group's stack uses (the trainer keeps only its latest checkpoints)."""

    member: str
    variant: Variant
    group: str
    batch_size: Batch | None = None
    stacked: Bool
    train: TrainConfig
    export_sparsity: Fraction | None = None
    keep_all_weights: Bool = False  # keep the weights of every rung of the ladder, not only export_sparsity's


# --------------------------------------------------------------------------------------------------
# Experiment tracking
# --------------------------------------------------------------------------------------------------
# Schemes of the tracking URIs MLflow serves (its stores and its REST client); a bare path is a file store.
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")


def _tracking_uri(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a directory path or a URI such as http://HOST:5000 or file:///PATH")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", v)
    if m and len(m.group(1)) > 1 and m.group(1).split("+")[0].lower() not in MLFLOW_SCHEMES:
        raise ValueError(f"unsupported scheme {m.group(1)!r}; choose a path or one of: "
                         + ", ".join(f"{x}:" for x in MLFLOW_SCHEMES))
    return v


class MLflowConfig(_Model):
    """MLflow through Ray Tune's MLflowLoggerCallback: per-trial params and per-epoch metrics; the
    stacking, summary and report files as artifacts of the experiment's own run."""

    enabled: Bool = False
    # None: a file store in the experiment directory (OUT/mlruns); else a path or a tracking server URI
    tracking_uri: Annotated[str, Field(max_length=4096), AfterValidator(_tracking_uri)] | None = None
    experiment_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # None: the config's name
    tags: Annotated[dict[Annotated[str, Field(max_length=250)], Annotated[str, Field(max_length=5000)]],
                    Field(max_length=100)] = Field(default_factory=dict)


class TrackingConfig(_Model):
    mlflow: MLflowConfig = MLflowConfig()


class PipelineConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")] = "esdbs"
    dataset: DatasetName = "fashion-mnist"
    data_dir: PathText | None = None
    subset: _int(**_range(20)) | None = None
    test_subset: _int(**_range(20)) | None = None
    val_fraction: OpenFraction = 0.1
    image_size: _int(**_range(8, MAX_IMAGE_SIZE)) = 64
    seed: Seed = 0
    members: Annotated[tuple[Annotated[MemberSpec, WithJsonSchema(_MEMBER_SCHEMA)], ...], Field(max_length=MAX_MEMBERS)] = (
        MemberSpec(model="alexnet"), MemberSpec(model="convpool_cnn_c"), MemberSpec(model="all_cnn_c"))
    variants: Annotated[tuple[Variant, ...], Field(max_length=len(VARIANTS))] = ("SWR-CNN+DBS",)
    train: TrainSettings = TrainSettings()  # template; per-trial keys are set by the pipeline
    # Per-variant train overrides, e.g. the paper's regularisation: {"C-CNN": {"dropout": 0.2, "l2": 0.01}}.
    # A base name ("C-CNN") also applies to its "+DBS" form.
    variant_overrides: dict[Variant, Overrides] = Field(default_factory=dict)
    batch_sweep: BatchSweepConfig = BatchSweepConfig()
    stack: StackConfig = StackConfig()
    resources: ResourcesConfig = ResourcesConfig()
    dbs_search: DBSSearchConfig = DBSSearchConfig()
    run_dbs_search: Bool = False
    expansion_search: ExpansionSearchConfig = ExpansionSearchConfig()  # esdbs run --expansion-search
    run_expansion_search: Bool = False
    tracking: TrackingConfig = TrackingConfig()
    checkpoints_to_keep: _int(**_range(1, 1000)) = 2
    max_failures: _int(**_range(0, 1000)) = 2
    # Which rungs' weights each trial keeps for `esdbs export` (OUT/weights/): "stacked" the rung its
    # group's stack uses; "all" every rung of its ladder (exports at any sparsity; MBs per rung).
    keep_weights: Literal["stacked", "all"] = "stacked"
    # Replicates: the whole matrix once per seed, as trials of one Tune experiment, each seed's
    # experiment in OUT/seed-<s>/ (:meth:`replicate`).  () is one run at ``seed``; given, ``seed`` is
    # their smallest.  Stored sorted.
    seeds: tuple[NonNegInt, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _shapes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("variants"), str):
                data["variants"] = [data["variants"]]
            data.update(_seeds(data.get("seeds"), data.get("seed", 0)))
            train = data.get("train")
            if isinstance(train, dict):
                bad = sorted(set(train) & set(PER_TRIAL_KEYS))
                if bad:
                    raise ValueError(f"train.{bad[0]}: set by the pipeline for each trial, not in train: "
                                     "(members: choose the models; dataset, seed, subset, ... are top-level keys)")
        return data

    @model_validator(mode="after")
    def _cross(self):
        if not self.members:
            raise ValueError("members: at least one member is required")
        if not self.variants:
            raise ValueError("variants: at least one variant is required; choose from " + ", ".join(VARIANTS))
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: duplicates in {list(self.variants)}")
        trains = [(m.model, m.overrides, self.seed if m.seed is None else m.seed) for m in self.members]
        for i, t in enumerate(trains):
            if t in trains[:i]:
                raise ValueError(f"members: duplicate members {trains.index(t)} and {i} ({t[0]}): both would train "
                                 "the same network with the same seed; give one another seed: or other settings")
        names = self.member_names()
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"members.{i}: two members named {n!r}; give each a distinct name: (repeats of a "
                                 "model are named <model>-2, <model>-3, ...)")
        if any(parse_variant(v)[2] for v in self.variants) and len(self.members) < 2:
            raise ValueError("members: a stacked variant needs at least two members")
        for v in self.variants:
            if variant_ladder(v) == "basis" and not self.train.basis.ladder:
                raise ValueError(f"variants: {v} compresses its members along train.basis.ladder, which is empty; "
                                 "set it, e.g. train.basis.ladder=[1.0, 0.95, 0.9, 0.85]")
        bt = self.stack.basis_threshold
        if bt is not None and bt not in self.train.basis.ladder:
            raise ValueError(f"stack.basis_threshold={bt}: not a rung of train.basis.ladder "
                             f"{list(self.train.basis.ladder)}")
        ladder = self.train.sparsity_ladder
        if self.stack.sparsity is not None and self.stack.sparsity not in (0.0, *ladder):
            raise ValueError(f"stack.sparsity={self.stack.sparsity} is not a rung of train.sparsity_ladder "
                             f"{list(ladder)} (or 0.0, the dense rung)")
        if self.batch_sweep.batch_sizes and self.batch_sweep.sparsity not in (0.0, *ladder):
            raise ValueError(f"batch_sweep.sparsity={self.batch_sweep.sparsity} is not a rung of "
                             f"train.sparsity_ladder {list(ladder)}")
        n_trials = len(self.groups()) * len(self.members)
        if n_trials > MAX_TRIALS:
            raise ValueError(f"{n_trials:,} trials (groups x members): at most {MAX_TRIALS:,} in one run")
        self.trials()  # every trial's TrainConfig is valid now, at the edge
        for seed in self.seeds:  # and every seed's (members' own seeds shift with it)
            self.replicate(seed)
        search = self.expansion_search
        if search.member is not None and search.member not in names:
            raise ValueError(f"expansion_search.member={search.member!r}: no such member; members: {', '.join(names)}")
        if self.run_expansion_search and self.expansion_search_trial() is None:
            raise ValueError("run_expansion_search: needs a growing member (model secnn with expansion.enabled: true)"
                             + (f"; member {search.member!r} does not grow" if search.member else ""))
        return self

    # -- per-trial configs -------------------------------------------------------------------------
    def groups(self) -> list[dict]:
        """Each group is a set of trials stacked together: a variant, at B0 or at a swept batch size."""
        # A variant climbs one ladder (VARIANT_LADDERS): the sparsity ladder or train.basis.ladder.
        groups = [{"group": v, "variant": v, "batch_size": None,
                   "ladder": self.train.sparsity_ladder if variant_ladder(v) == "sparsity" else (),
                   "basis_ladder": self.train.basis.ladder if variant_ladder(v) == "basis" else ()}
                  for v in self.variants]
        sweep = self.batch_sweep
        if sweep.batch_sizes:
            short = tuple(s for s in self.train.sparsity_ladder if s <= sweep.sparsity)
            for v in sweep.variants:
                for b in sweep.batch_sizes:
                    if not (b == self.train.dbs.b0 and v in self.variants):
                        groups.append({"group": f"{v}@b{b}", "variant": v, "batch_size": b, "ladder": short,
                                       "basis_ladder": ()})
                if sweep.with_dbs and v + "+DBS" not in self.variants:
                    groups.append({"group": v + "+DBS", "variant": v + "+DBS", "batch_size": None, "ladder": short,
                                   "basis_ladder": ()})
        return groups

    def stack_rung(self, group: str, variant: str) -> tuple[float | None, float | None]:
        """The rung a group's stack uses, ``(target sparsity, basis threshold t)``, None meaning "the
        last rung": the stacking stage and the trainer's kept weights (``esdbs export``) both ask here,
        so the weights kept are those of the rung that was stacked."""
        ladder = variant_ladder(variant)
        if ladder == "basis":
            return None, self.stack.basis_threshold
        if ladder != "sparsity":
            return None, None
        return (self.stack.sparsity if group in self.variants else self.batch_sweep.sparsity), None

    def member_names(self) -> list[str]:
        """Each member's name, in order: its ``name``, else its model's, the second, third, ... unnamed
        member of one model ``<model>-2``, ``<model>-3`` (a config of distinct models names its members
        by their models, as it always has)."""
        seen: dict[str, int] = {}
        names = []
        for m in self.members:
            if m.name is None:
                seen[m.model] = seen.get(m.model, 0) + 1
            names.append(m.name or (m.model if seen[m.model] == 1 else f"{m.model}-{seen[m.model]}"))
        return names

    def expansion_search_trial(self) -> TrialSpec | None:
        """The trial whose settings ``--expansion-search`` varies: ``expansion_search.member`` (else the
        first growing member) in the first group that trains it; None if that member does not grow."""
        want = self.expansion_search.member
        single = len(self.groups()) == 1
        for t in self.trials():
            name = t.member if single else t.member.removeprefix(f"{slug(t.group)}-")
            if want is None or name == want:
                if t.train.expansion.enabled:
                    return t
                if want is not None:
                    return None
        return None

    def trials(self) -> list[TrialSpec]:
        specs = []
        groups = self.groups()
        names = self.member_names()
        for g in groups:
            conv, schedule, stacked = parse_variant(g["variant"])
            base = g["variant"].removesuffix("+DBS")
            # keep the weights of the rung this group's stack uses (None there: the last rung); BasisConv
            # members are not exported (esdbs export refuses them), so they keep none
            export, _ = self.stack_rung(g["group"], g["variant"])
            if export is None:
                export = g["ladder"][-1] if g["ladder"] else 0.0
            if g["basis_ladder"] or conv == "basis_random":
                export = None
            for m, name in zip(self.members if stacked else self.members[:1], names):
                train = self.train.model_dump()
                for key in (base, g["variant"]):
                    train.update(self.variant_overrides.get(key, {}))
                train.update(m.overrides)
                train.update(model=m.model, conv=conv, schedule=schedule, dataset=self.dataset, data_dir=self.data_dir,
                             subset=self.subset, test_subset=self.test_subset, val_fraction=self.val_fraction,
                             image_size=self.image_size, seed=self.seed if m.seed is None else m.seed,
                             sparsity_ladder=list(g["ladder"]),
                             basis={**train["basis"], "ladder": list(g["basis_ladder"])})
                if g["batch_size"] is not None:
                    train["dbs"] = {**train["dbs"], "b0": g["batch_size"]}
                member = name if len(groups) == 1 else f"{slug(g['group'])}-{name}"
                where = f"trial {member} (members / variant_overrides / train)"
                specs.append(validate(TrialSpec, {"member": member, "variant": g["variant"], "group": g["group"],
                                                  "batch_size": g["batch_size"], "stacked": stacked,
                                                  "train": train, "export_sparsity": export,
                                                  "keep_all_weights": self.keep_weights == "all"}, where))
        return specs

    # -- replicates (seeds) ------------------------------------------------------------------------
    def replicate(self, seed: int) -> "PipelineConfig":
        """The config of seed ``seed``'s experiment in a multi-seed run: what ``--set seed=<seed>`` runs
        alone.  A member with a seed of its own keeps its distance from the run's: its seed moves by
        ``seed - self.seed`` (kept as it was, the replicates' members would differ only by the split)."""
        shift = seed - self.seed
        d = self.to_dict()
        d.pop("seeds", None)
        d["seed"] = seed
        d["members"] = [m.replace(seed=m.seed + shift).to_yaml() if m.seed is not None else m.to_yaml()
                        for m in self.members]
        return validate(PipelineConfig, d, f"seed {seed}")

    def replicates(self) -> list["PipelineConfig"]:
        """One config per seed of the run: itself when it has no ``seeds``."""
        return [self.replicate(s) for s in self.seeds] if self.seeds else [self]

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = self.model_dump(mode="json")
        d["members"] = [m.to_yaml() for m in self.members]
        if not self.seeds:  # a one-seed run's config.yaml reads as it always has
            del d["seeds"]
        return d


def _seeds(seeds: Any, seed: Any) -> dict:
    """``seeds`` (a list, one number, or "0,1,2") as the sorted list the model keeps, and ``seed`` their
    smallest; one seed is a plain run at that seed (``seeds`` empty)."""
    if seeds is None or (isinstance(seeds, (list, tuple)) and not seeds):
        return {}
    if isinstance(seeds, str):
        try:
            seeds = [int(v) for v in seeds.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"seeds={seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)):
        raise ValueError(f"seeds={str(seeds)[:60]}: expected a list of integers >= 0, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)}: a seed given twice")
    ordered = sorted(seeds)
    return {"seed": ordered[0], "seeds": ordered if len(ordered) > 1 else []}


def slug(name: str) -> str:
    return name.lower().replace("+", "-").replace("@", "-")


# --------------------------------------------------------------------------------------------------
# YAML, --set, --scale, building a config
# --------------------------------------------------------------------------------------------------
# Limits of every YAML esdbs reads (--config, --set values, an experiment's config.yaml).  A resolved
# config is ~3 kB, nests 5 levels (dbs_search.space.k.loguniform[0]) and uses no aliases; the limits
# leave room for hand-written files and stop what only a hostile file does: nesting that overflows
# the parser's recursion, aliases that expand exponentially (the "billion laughs": 9 aliases of 9
# aliases ... are 9**9 nodes once expanded), a file too large to parse in seconds.
YAML_MAX_BYTES = 256 * 1024
YAML_MAX_DEPTH = 32
YAML_MAX_ALIASES = 100
YAML_MAX_NODES = 100_000  # nodes of the document with every alias expanded


class _YAMLLimit(Exception):
    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.mark = mark


def _key_path(parts) -> str:
    """``train.dbs.k: `` for an error line (nothing at the top level)."""
    text = "".join(p for p in parts if p).lstrip(".")
    if len(text) > 120:
        text = text[:100] + "..."
    return f"{text}: " if text else ""


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits on depth, aliases and their expansion, and no duplicate keys
    (PyYAML keeps the last value of a key given twice, silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list[str] = []  # the key path of the node being composed
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > YAML_MAX_ALIASES:
                raise _YAMLLimit(f"{_key_path(self._path)}more than {YAML_MAX_ALIASES} aliases",
                                 self.peek_event().start_mark)
        self._path.append(f"[{index}]" if isinstance(index, int) else
                          f".{index.value}" if isinstance(index, yaml.ScalarNode) else "")
        try:
            if len(self._path) > YAML_MAX_DEPTH:
                raise _YAMLLimit(f"{_key_path(self._path)}nested deeper than {YAML_MAX_DEPTH} levels",
                                 self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        self._root = node
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    where = _key_path(_path_to(self._root, node) + [f".{key}"])
                    raise _YAMLLimit(f"{where}given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                                     "say it once", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _construct_int(loader, node):
    """YAML's integers, but a number of more digits than Python converts is refused naming its key."""
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:
        where = _key_path(_path_to(loader._root, node))
        raise _YAMLLimit(f"{where}a number of {len(node.value):,} characters", node.start_mark) from None


_LimitedLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _check_expansion(root) -> None:
    """Refuse a node graph that aliases expand beyond YAML_MAX_NODES, or that contains itself."""
    def children(n):
        if isinstance(n, yaml.SequenceNode):
            return n.value
        if isinstance(n, yaml.MappingNode):
            return [x for kv in n.value for x in kv]
        return []

    size: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        k = id(node)
        if done:
            active.discard(k)
            size[k] = 1 + sum(size[id(c)] for c in children(node))
            if size[k] > YAML_MAX_NODES:
                raise _YAMLLimit(f"{_key_path(_path_to(root, node))}aliases expand to more than "
                                 f"{YAML_MAX_NODES:,} values", node.start_mark)
            continue
        if k in size:
            continue
        active.add(k)
        stack.append((node, True))
        for c in children(node):
            if id(c) in active:
                raise _YAMLLimit("an alias refers to a collection that contains it", c.start_mark)
            if id(c) not in size:
                stack.append((c, False))


def _path_to(root, target) -> list[str]:
    """The first key path from ``root`` to ``target`` (each node visited once: aliases are not followed
    into their expansion)."""
    seen, queue = {id(root)}, [(root, [])]
    while queue:
        node, path = queue.pop(0)
        if node is target:
            return path
        if isinstance(node, yaml.MappingNode):
            kids = [(v, f".{k.value}" if isinstance(k, yaml.ScalarNode) else "") for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            kids = [(v, f"[{i}]") for i, v in enumerate(node.value)]
        else:
            kids = []
        for child, label in kids:
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((child, path + [label]))
    return []


def parse_yaml(text: str, where: str):
    """Any YAML value, within the limits above; every error names ``where`` (and the line)."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than the {YAML_MAX_BYTES:,} a config may have")
    loader = None
    try:
        loader = _LimitedLoader(text)  # its reader refuses control characters already
        return loader.get_single_data()
    except _YAMLLimit as exc:
        line = f" at line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise ConfigError(f"{where}: refused{line}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{line} ({getattr(exc, 'problem', None) or exc})") from None
    except ValueError as exc:  # an integer of more than 4300 digits, a date out of range
        raise ConfigError(f"{where}: not valid YAML ({str(exc).split(';')[0]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml_mapping(text: str, where: str) -> dict:
    """YAML text whose top level is a mapping (empty text: ``{}``); errors name ``where`` and the line."""
    d = parse_yaml(text, where)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(d).__name__}")
    return d


def load_yaml(path: str) -> dict:
    from . import storage

    try:
        data = storage.read_local(path, max_bytes=YAML_MAX_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UserError as exc:  # a directory, a pipe, a link to nowhere, too large
        raise ConfigError(str(exc).replace("this kind of file", "a config")) from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read the config file (not UTF-8 text)") from None
    return parse_yaml_mapping(text, path)


def parse_saved_config(text: str, where: str) -> PipelineConfig:
    """An experiment's saved ``config.yaml`` (what ``esdbs run`` wrote) as the validated config: the one
    reader behind ``--resume`` and ``esdbs export``; every error names ``where`` (the file's path)."""
    d = parse_yaml_mapping(text, where)
    if not d:
        raise ConfigError(f"{where}: empty; an experiment's config.yaml holds the whole resolved config")
    try:
        return validate(PipelineConfig, d)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_TRAIN_SIZES = {"fashion-mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}


def apply_scale(d: dict, scale: float) -> dict:
    """Shrink a config dict for a smaller machine: epochs and retraining epochs by ``scale`` (at least
    one each) and, below 1, the training set to ``scale`` of its size (a stratified subset)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
        raise ConfigError(f"--scale={scale!r}: must be in (0, 1]")
    d = copy.deepcopy(d)
    train = d.setdefault("train", {})
    if not isinstance(train, dict):
        raise ConfigError("train: expected a mapping")
    defaults = TrainSettings()
    for key in ("epochs", "retrain_epochs"):
        v = train.get(key, getattr(defaults, key))
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"train.{key}={v!r}: must be an integer")
        train[key] = max(1, int(round(v * scale)))
    n = _TRAIN_SIZES.get(d.get("dataset", "fashion-mnist"))
    if scale < 1.0 and n and not d.get("subset"):
        d["subset"] = int(n * scale)
        if d["subset"] < 20:
            raise ConfigError(f"--scale={scale!r}: leaves {d['subset']} of {n:,} training images; at least 20 "
                              f"(a scale of at least {20 / n:.2g})")
    return d


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_+-]*(\.[A-Za-z_][A-Za-z0-9_+-]*)*$")


def set_dotted(d: dict, assignment: str) -> dict:
    """Apply ``key.sub=value`` (value parsed as YAML) to a nested config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {brief(assignment)}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not _KEY.match(key) or key.count(".") >= YAML_MAX_DEPTH:
        raise ConfigError(f"--set {brief(assignment)}: {brief(key)} is not a dotted key such as train.width")
    value = parse_yaml(raw, f"--set {key}")
    node = d
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
    node[parts[-1]] = value
    return d


def build_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None,
                 *, scale: float | None = None, sets: list[str] | None = None) -> PipelineConfig:
    """Preset, then the YAML file, then ``overrides``, ``--scale`` and ``--set`` -- validated once."""
    from .presets import PRESETS, deep_merge

    d: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: unknown; choose one of: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[preset])
    if yaml_path is not None:
        d = deep_merge(d, load_yaml(yaml_path))
    d = deep_merge(d, overrides or {})
    if scale is not None:
        d = apply_scale(d, scale)
    for assignment in sets or ():
        d = set_dotted(d, assignment)
    try:
        return validate(PipelineConfig, d)
    except ConfigError as exc:
        raise ConfigError(f"{yaml_path}: {exc}" if yaml_path else str(exc)) from None


def json_schema() -> dict:
    """The JSON Schema of a pipeline config (for editor completion of YAML files)."""
    schema = PipelineConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "esdbs pipeline config"
    return schema
