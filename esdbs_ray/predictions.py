"""Model predictions on disk: one Parquet schema shared by the trainer, the stacker and the analysis.

Every pruning rung of every trial saves the softmax outputs of its model on the validation split and
on the test split (spec section 3: "each rung is evaluated, checkpointed and its predictions saved").
The stacker (:mod:`esdbs_ray.stacking`) reads them back, aligns the members row by row and fits the
ensemble weights on the validation rows only.

Schema (one row per sample, per split, per member, per rung)
-------------------------------------------------------------

=================== ============================================ =========================================
column              Arrow type                                   meaning
=================== ============================================ =========================================
``index``           ``int64``                                    sample index within its *source* split:
                                                                 for ``"val"`` the index into the original
                                                                 training set (the validation split is
                                                                 held out from it), for ``"test"`` the
                                                                 index into the test set
``label``           ``int64`` (``int16``/``int32`` accepted on   true class, ``0 <= label < C``
                    read, widened)
``split``           ``string``                                   ``"val"`` | ``"test"`` (``"train"`` also
                                                                 allowed)
``model``           ``string``                                   registry name (``"alexnet"``, ...)
``member``          ``string``                                   stack member id (``"alexnet"``,
                                                                 ``"m0-alexnet"``, ...); unique within an
                                                                 experiment
``variant``         ``string``                                   ``"C-CNN"`` | ``"SC-CNN"`` | ``"SWR-CNN"``
                                                                 | ``"SWR-CNN+DBS"`` or any free string
``sparsity``        ``float32``                                  achieved sparsity, a fraction in [0, 1]
``target_sparsity`` ``float32``                                  the rung's target, a fraction in [0, 1]
``epoch``           ``int32``                                    training epoch the predictions come from
``probs``           ``fixed_size_list<float32>[C]``              softmax output; rows sum to 1 (±1e-3)
                    (``pa.list_(pa.float32(), C)``)
``basis_threshold`` ``float32``, optional                        BasisConv rungs only: the
                                                                 rung's eigenvalue-share threshold t in
                                                                 (0, 1]; such a rung's target_sparsity
                                                                 is 0.0 (it prunes nothing)
=================== ============================================ =========================================

A rung is identified by ``(target_sparsity, basis_threshold)``: sparsity rungs and the dense rung have
no ``basis_threshold`` (the column is absent from their files, which keep the layout of every earlier
file); :func:`read_predictions` always returns the column, null where a file lacks it, and
:func:`prediction_matrix` selects basis rungs with ``basis_threshold=`` (see ``compression.py``).

Key-value metadata of the Parquet file (each value JSON-encoded; written from ``metadata=``):
``config`` (dict: the trial config), ``seed``, ``git_revision``, ``versions`` (dict: torch / ray /
python / ...), ``created`` (ISO-8601 UTC timestamp, filled in when absent), plus
``esdbs_predictions_schema`` (the schema version, ``"1"``) and ``num_classes``.  Any extra
JSON-serialisable keys are kept too.

Only Parquet and JSON are ever read: nothing is unpickled.

Writing is atomic: a local path is written to a hidden temp file in the same directory, flushed, and
``os.replace``-d over the target; a URI (``s3://``, ``gs://``, ``file://``, ...) goes through
``pyarrow.fs.FileSystem.from_uri``: written to a temp key then moved, or written directly when the
filesystem cannot move (object stores publish an object only when its upload completes).  Validation
happens before any I/O, so a bad call leaves an existing file untouched.

Typical use (the trainer, after each rung)::

    write_predictions(
        prediction_path(experiment_dir, member, target_sparsity),
        parts=[dict(split="val", probs=pv, labels=yv, indices=iv),
               dict(split="test", probs=pt, labels=yt, indices=it)],
        model="alexnet", member="alexnet", variant="SWR-CNN",
        sparsity=0.79, target_sparsity=0.8, epoch=41,
        metadata={"config": cfg, "seed": 0, "git_revision": rev, "versions": versions},
    )
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from esdbs_ray import storage
from esdbs_ray.errors import UserError
from esdbs_ray.records import Rung

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "PredictionsError",
    "prediction_schema",
    "build_table",
    "write_predictions",
    "read_predictions",
    "read_metadata",
    "prediction_sources",
    "prediction_matrix",
    "prediction_rungs",
    "prediction_path",
    "predictions_dir",
    "atomic_write_bytes",
    "read_bytes",
    "is_uri",
    "join_path",
]

SCHEMA_VERSION = "1"
SPLITS = ("train", "val", "test")
PROB_SUM_TOL = 1e-3
_SCHEMA_KEY = "esdbs_predictions_schema"
_SOURCES_KEY = b"esdbs_sources"
_STR_COLUMNS = ("split", "model", "member", "variant")


class PredictionsError(UserError):
    """A prediction file or prediction array that does not follow the schema."""


def prediction_schema(num_classes: int) -> pa.Schema:
    """The canonical Arrow schema for ``num_classes`` classes (no metadata)."""
    if int(num_classes) < 1:
        raise PredictionsError(f"num_classes must be >= 1, got {num_classes}")
    return pa.schema(
        [
            pa.field("index", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("member", pa.string(), nullable=False),
            pa.field("variant", pa.string(), nullable=False),
            pa.field("sparsity", pa.float32(), nullable=False),
            pa.field("target_sparsity", pa.float32(), nullable=False),
            pa.field("epoch", pa.int32(), nullable=False),
            pa.field("probs", pa.list_(pa.float32(), int(num_classes)), nullable=False),
        ]
    )


_COLUMNS = tuple(prediction_schema(1).names)
# Optional columns: written only when given, always present (null where absent) in what is read back.
OPTIONAL_FIELDS = (pa.field("basis_threshold", pa.float32(), nullable=True),
                   pa.field("level", pa.int32(), nullable=True), pa.field("params", pa.int64(), nullable=True))
_OPTIONAL = tuple(f.name for f in OPTIONAL_FIELDS)


def _read_schema(num_classes: int) -> pa.Schema:
    """The schema of tables returned by :func:`read_predictions`: the canonical one plus the optional columns."""
    schema = prediction_schema(num_classes)
    for f in OPTIONAL_FIELDS:
        schema = schema.append(f)
    return schema


# ----------------------------------------------------------------------------------------------------
# paths and filesystems
# ----------------------------------------------------------------------------------------------------
# One implementation of paths and atomic writes for the whole package lives in storage.py.
is_uri = storage.is_uri
join_path = storage.join
atomic_write_bytes = storage.write_bytes
read_bytes = storage.read_bytes
_resolve = storage.filesystem


def predictions_dir(experiment_dir: str | os.PathLike) -> str:
    """``<experiment_dir>/predictions``: where the trainer writes and the stacker reads."""
    from .layout import ExperimentLayout

    return ExperimentLayout(str(experiment_dir)).predictions


def prediction_path(experiment_dir: str | os.PathLike, member: str, target_sparsity: float,
                    basis_threshold: float | None = None, level: int | None = None) -> str:
    """Canonical file for one member's rung: ``<dir>/predictions/<member>-ts0800.parquet``, or
    ``<member>-bt0900.parquet`` for the basis rung at t = 0.9.

    One file per (member, rung) holding both splits; a later epoch of the same rung overwrites it
    (atomically), so the file always holds the rung's latest predictions.
    """
    from .layout import ExperimentLayout

    ts = float(target_sparsity)
    if not 0.0 <= ts <= 1.0:
        raise PredictionsError(f"target_sparsity must be a fraction in [0, 1], got {target_sparsity}")
    if basis_threshold is not None and not 0.0 < float(basis_threshold) <= 1.0:
        raise PredictionsError(f"basis_threshold must be in (0, 1], got {basis_threshold}")
    return ExperimentLayout(str(experiment_dir)).prediction(member, ts, basis_threshold, level)


# ----------------------------------------------------------------------------------------------------
# validation and table building
# ----------------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _encode_metadata(metadata: Mapping[str, Any] | None, num_classes: int) -> dict[bytes, bytes]:
    md = dict(metadata or {})
    md.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for key in ("config", "seed", "git_revision", "versions"):
        md.setdefault(key, None)
    md[_SCHEMA_KEY] = SCHEMA_VERSION
    md["num_classes"] = int(num_classes)
    out: dict[bytes, bytes] = {}
    for k, v in md.items():
        if not isinstance(k, str):
            raise PredictionsError(f"metadata keys must be strings, got {k!r}")
        try:
            out[k.encode()] = json.dumps(v, default=_json_default, allow_nan=False, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise PredictionsError(f"metadata[{k!r}] is not JSON-serialisable: {e}") from None
    return out


def _decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode(errors="replace")
        if key.startswith("ARROW:") or key == "pandas" or k == _SOURCES_KEY:
            continue
        try:
            out[key] = storage.parse_json(v, key)
        except UserError:  # not JSON, nested too deep, a number of too many digits: kept as text
            out[key] = v.decode(errors="replace")
    return out


def _check_fraction(name: str, v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise PredictionsError(f"{name} must be a fraction in [0, 1], got {v!r}")
    return a


def _broadcast(name: str, v: Any, n: int, kind: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim == 0:
        a = np.full(n, a.item() if kind != "str" else str(a.item()), dtype=object if kind == "str" else None)
    if a.shape != (n,):
        raise PredictionsError(f"{name} must be a scalar or have shape ({n},), got shape {a.shape}")
    return a


def _validate_part(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    for k in ("probs", "labels", "indices", "split", "model", "member", "variant", "sparsity",
              "target_sparsity", "epoch"):
        if part.get(k) is None:
            raise PredictionsError(f"{where}: missing {k!r}")
    probs = np.asarray(part["probs"])
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 1:
        raise PredictionsError(f"{where}: probs must have shape [N, C] with N, C >= 1, got {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise PredictionsError(f"{where}: probs must be floating point, got dtype {probs.dtype}")
    n, c = probs.shape
    if not np.all(np.isfinite(probs)):
        bad = int(np.count_nonzero(~np.isfinite(probs).all(axis=1)))
        raise PredictionsError(f"{where}: probs contain NaN or inf ({bad} of {n} rows)")
    if probs.min() < 0:
        raise PredictionsError(f"{where}: probs contain negative values (min {probs.min():.3g})")
    sums = probs.sum(axis=1, dtype=np.float64)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > PROB_SUM_TOL:
        i = int(np.argmax(np.abs(sums - 1.0)))
        raise PredictionsError(
            f"{where}: probs rows must sum to 1 within {PROB_SUM_TOL} (softmax outputs, not logits); "
            f"row {i} sums to {sums[i]:.6g}"
        )
    labels = np.asarray(part["labels"])
    if labels.shape != (n,):
        raise PredictionsError(f"{where}: labels must have shape ({n},) to match probs, got {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or (labels.size and np.all(labels == np.round(labels)))):
        raise PredictionsError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= c:
        raise PredictionsError(
            f"{where}: labels must lie in [0, {c}) for {c} classes, got range [{labels.min()}, {labels.max()}]"
        )
    indices = np.asarray(part["indices"])
    if indices.shape != (n,):
        raise PredictionsError(f"{where}: indices must have shape ({n},) to match probs, got {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise PredictionsError(f"{where}: indices must be integers, got dtype {indices.dtype}")
    indices = indices.astype(np.int64)
    if indices.min() < 0:
        raise PredictionsError(f"{where}: indices must be >= 0")
    split = _broadcast("split", part["split"], n, "str").astype(str)
    bad_splits = sorted(set(split.tolist()) - set(SPLITS))
    if bad_splits:
        raise PredictionsError(f"{where}: unknown split(s) {bad_splits}; expected one of {list(SPLITS)}")
    for s in np.unique(split):
        idx = indices[split == s]
        if np.unique(idx).size != idx.size:
            raise PredictionsError(f"{where}: duplicate indices within split {s!r}")
    out = {"index": indices, "label": labels, "split": split, "probs": probs.astype(np.float32)}
    for k in ("model", "member", "variant"):
        v = _broadcast(k, part[k], n, "str").astype(str)
        if any(x == "" for x in np.unique(v)):
            raise PredictionsError(f"{where}: {k} must be a non-empty string")
        out[k] = v
    out["sparsity"] = _check_fraction("sparsity", _broadcast("sparsity", part["sparsity"], n, "num")).astype(np.float32)
    out["target_sparsity"] = _check_fraction(
        "target_sparsity", _broadcast("target_sparsity", part["target_sparsity"], n, "num")
    ).astype(np.float32)
    ep = _broadcast("epoch", part["epoch"], n, "num")
    if not np.issubdtype(ep.dtype, np.integer) or ep.min() < 0:
        raise PredictionsError(f"{where}: epoch must be a non-negative integer, got {part['epoch']!r}")
    out["epoch"] = ep.astype(np.int32)
    if part.get("basis_threshold") is not None:
        bt = np.asarray(_broadcast("basis_threshold", part["basis_threshold"], n, "num"), dtype=np.float64)
        if not np.all(np.isfinite(bt)) or np.any(bt <= 0) or np.any(bt > 1):
            raise PredictionsError(f"{where}: basis_threshold must be in (0, 1], got {part['basis_threshold']!r}")
        out["basis_threshold"] = bt.astype(np.float32)
    for k, dtype in (("level", np.int32), ("params", np.int64)):  # a growing member's levels
        if part.get(k) is not None:
            v = _broadcast(k, part[k], n, "num")
            if not np.issubdtype(v.dtype, np.integer) or v.min() < 0:
                raise PredictionsError(f"{where}: {k} must be a non-negative integer, got {part[k]!r}")
            out[k] = v.astype(dtype)
    return out


def build_table(
    *,
    parts: Sequence[Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **fields: Any,
) -> pa.Table:
    """Validate and assemble a predictions table (see :func:`write_predictions` for the arguments)."""
    if parts is None:
        parts = [{}]
    elif any(fields.get(k) is not None for k in ("probs", "labels", "indices")):
        raise PredictionsError("give probs/labels/indices either at top level or inside parts, not both")
    if isinstance(parts, Mapping) or len(parts) == 0:
        raise PredictionsError("parts must be a non-empty list of dicts")
    validated = []
    for i, p in enumerate(parts):
        merged = {**{k: v for k, v in fields.items() if v is not None}, **dict(p)}
        where = f"part {i} ({merged.get('split')!r})" if len(parts) > 1 else "predictions"
        validated.append(_validate_part(merged, where))
    c = validated[0]["probs"].shape[1]
    for i, v in enumerate(validated):
        if v["probs"].shape[1] != c:
            raise PredictionsError(f"part {i}: {v['probs'].shape[1]} classes, part 0 has {c}")
    cols = {k: np.concatenate([v[k] for v in validated]) for k in _COLUMNS}
    optional = [k for k in _OPTIONAL if any(k in v for v in validated)]
    for k in optional:
        if not all(k in v for v in validated):
            raise PredictionsError(f"{k} given for some parts but not all")
        cols[k] = np.concatenate([v[k] for v in validated])
    # the same (split, member, rung, index) twice across parts would be ambiguous
    key = np.rec.fromarrays([cols["split"], cols["member"], cols["target_sparsity"], cols["epoch"], cols["index"]])
    if np.unique(key).size != key.size:
        raise PredictionsError("duplicate (split, member, target_sparsity, epoch, index) rows across parts")
    schema = prediction_schema(c)
    for f in OPTIONAL_FIELDS:
        if f.name in optional:
            schema = schema.append(f)
    arrays = []
    for f in schema:
        if f.name == "probs":
            flat = pa.array(cols["probs"].reshape(-1), type=pa.float32())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, c))
        else:
            arrays.append(pa.array(cols[f.name].tolist() if f.name in _STR_COLUMNS else cols[f.name], type=f.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table.replace_schema_metadata(_encode_metadata(metadata, c))


def write_predictions(
    path_or_uri: str | os.PathLike,
    *,
    probs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    split: str | Sequence[str] | np.ndarray | None = None,
    parts: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    member: str | None = None,
    variant: str | None = None,
    sparsity: float | None = None,
    target_sparsity: float | None = None,
    epoch: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    basis_threshold: float | None = None,
    level: int | None = None,
    params: int | None = None,
) -> str:
    """Validate and atomically write one predictions Parquet file; returns the path/URI written.

    Two ways to give the rows:

    * one block: ``probs`` [N, C] (softmax), ``labels`` [N], ``indices`` [N] and ``split`` (a string,
      or one per row);
    * several blocks: ``parts=[{"split": "val", "probs": ..., "labels": ..., "indices": ...},
      {"split": "test", ...}]``; any other column (``sparsity``, ``epoch``, ...) may also be given per
      part, overriding the top-level value.

    ``model``, ``member``, ``variant``, ``sparsity``, ``target_sparsity``, ``epoch`` are scalars (or
    per-row arrays); ``basis_threshold`` likewise, given only by a BasisConv rung (adds the column).  ``metadata`` holds ``config``, ``seed``, ``git_revision``, ``versions`` (and
    anything else JSON-serialisable).  Raises :class:`PredictionsError` (a ``ValueError``) naming the
    problem before touching the filesystem.
    """
    table = build_table(
        parts=parts, metadata=metadata, probs=probs, labels=labels, indices=indices, split=split,
        model=model, member=member, variant=variant, sparsity=sparsity,
        target_sparsity=target_sparsity, epoch=epoch, basis_threshold=basis_threshold, level=level, params=params,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return atomic_write_bytes(path_or_uri, sink.getvalue().to_pybytes())


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def _list_parquet(fs: pafs.FileSystem, p: str, shown: str) -> list[str]:
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no predictions found: {shown} does not exist")
    if info.type == pafs.FileType.File:
        return [p]
    entries = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    named = [e for e in entries if e.base_name.endswith(".parquet") and not e.base_name.startswith(".")]
    odd = sorted(e.base_name for e in named if e.type != pafs.FileType.File)
    if odd:  # a link to nowhere, a pipe, a directory: named, not skipped
        raise PredictionsError(f"{shown}: {', '.join(odd[:5])}: not a readable file (a directory, a pipe, or a "
                               "link that leads nowhere)")
    files = sorted(e.path for e in named)
    if not files:
        raise FileNotFoundError(f"no predictions found: no *.parquet files in {shown}")
    return files


def _shown(fs: pafs.FileSystem, p: str, source: str) -> str:
    if is_uri(source):
        scheme = source.split("://", 1)[0]
        return f"{scheme}://{p}" if scheme != "file" else f"file://{p}"
    return p


def _check_schema(schema: pa.Schema, shown: str) -> int:
    names = set(schema.names)
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise PredictionsError(f"{shown}: not a predictions file: missing column(s) {missing}")
    version = (schema.metadata or {}).get(_SCHEMA_KEY.encode())
    if version is not None and _decode_metadata({b"v": version}).get("v") != SCHEMA_VERSION:
        raise PredictionsError(f"{shown}: predictions schema version {version[:40]!r}, this code reads {SCHEMA_VERSION!r}")
    pt = schema.field("probs").type
    if not pa.types.is_fixed_size_list(pt) or not pa.types.is_floating(pt.value_type):
        raise PredictionsError(f"{shown}: column 'probs' must be fixed_size_list<float32>[C], got {pt}")
    expected = prediction_schema(pt.list_size)
    for f in expected:
        got = schema.field(f.name).type
        ok = (
            got == f.type
            or (f.name in ("label", "index", "epoch") and pa.types.is_integer(got))
            or (f.name in _STR_COLUMNS and (pa.types.is_string(got) or pa.types.is_large_string(got)))
            or (f.name in ("sparsity", "target_sparsity") and pa.types.is_floating(got))
            or f.name == "probs"
        )
        if not ok:
            raise PredictionsError(f"{shown}: column {f.name!r} has type {got}, expected {f.type}")
    return pt.list_size


def read_metadata(path_or_uri: str | os.PathLike) -> dict[str, Any]:
    """The decoded key-value metadata of one predictions file (reads only the footer)."""
    fs, p = _resolve(path_or_uri)
    shown = _shown(fs, p, str(path_or_uri))
    try:
        schema = pq.read_schema(p, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise PredictionsError(f"{shown}: cannot read Parquet file ({e})") from None
    return _decode_metadata(schema.metadata)


def read_predictions(path_or_dir_or_uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """Read one predictions file, or every ``*.parquet`` in a directory (not recursive), as one table.

    ``filesystem``: read ``path_or_dir_or_uri`` as a path on this ``pyarrow.fs`` filesystem (a
    :class:`esdbs_ray.storage.Tree`'s) instead of resolving it as a local path or URI.

    Each file's schema is checked and its columns cast to the canonical types; a corrupt, truncated or
    schema-mismatched file raises :class:`PredictionsError` naming the file; an empty directory or a
    missing path raises ``FileNotFoundError`` naming it.  Files must agree on the number of classes.
    The per-file metadata survives as :func:`prediction_sources` of the returned table.
    """
    source = str(path_or_dir_or_uri)
    fs, p = (filesystem, source) if filesystem is not None else _resolve(source)
    files = _list_parquet(fs, p, _shown(fs, p, source))
    tables, sources, num_classes = [], [], None
    for fp in files:
        shown = _shown(fs, fp, source)
        try:
            t = pq.read_table(fp, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            raise PredictionsError(f"{shown}: cannot read Parquet file (corrupt or truncated?): {e}") from None
        c = _check_schema(t.schema, shown)
        if num_classes is None:
            num_classes = c
        elif c != num_classes:
            raise PredictionsError(f"{shown}: column 'probs': {c} classes, but {_shown(fs, files[0], source)} has "
                                   f"{num_classes}")
        meta = _decode_metadata(t.schema.metadata)
        try:
            t = t.select(list(_COLUMNS) + [k for k in _OPTIONAL if k in t.schema.names]).replace_schema_metadata(None)
            for f in OPTIONAL_FIELDS:
                if f.name not in t.schema.names:
                    t = t.append_column(f, pa.nulls(t.num_rows, f.type))
            t = t.select(_read_schema(c).names).cast(_read_schema(c))
        except (pa.ArrowException, ValueError) as e:
            raise PredictionsError(f"{shown}: columns cannot be cast to the predictions schema: {e}") from None
        _check_rows(t, shown)
        tables.append(t)
        members = sorted(set(t["member"].to_pylist()))
        sources.append({"path": shown, "num_rows": t.num_rows, "members": members, "metadata": meta})
    table = pa.concat_tables(tables)
    return table.replace_schema_metadata({_SOURCES_KEY: json.dumps(sources, default=_json_default).encode()})


def _check_rows(t: pa.Table, shown: str) -> None:
    """What the schema cannot say: every value in its range, each bad column named with its first bad
    rows (a file written by hand, or changed since, must not stack as if it were the trainer's)."""
    if t.num_rows == 0:
        raise PredictionsError(f"{shown}: no rows")
    for name in (*_COLUMNS, "basis_threshold", "level", "params"):
        if name in _COLUMNS and t[name].null_count:
            raise PredictionsError(f"{shown}: column {name!r} has {t[name].null_count} null value(s)")

    def bad(name: str, mask: np.ndarray, what: str) -> None:
        rows = np.flatnonzero(mask)
        if rows.size:
            raise PredictionsError(f"{shown}: column {name!r}: {rows.size} of {t.num_rows} rows {what} "
                                   f"(rows {', '.join(map(str, rows[:5]))}{', ...' if rows.size > 5 else ''})")

    c = t.schema.field("probs").type.list_size
    p = t["probs"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, c).astype(np.float64)
    finite = np.isfinite(p).all(axis=1)
    bad("probs", ~finite, "are not finite")
    bad("probs", (p < 0).any(axis=1), "hold negative probabilities")
    bad("probs", np.abs(p.sum(axis=1) - 1.0) > PROB_SUM_TOL, f"do not sum to 1 within {PROB_SUM_TOL}")
    label = t["label"].to_numpy()
    bad("label", (label < 0) | (label >= c), f"are outside 0..{c - 1}")
    bad("index", t["index"].to_numpy() < 0, "are negative")
    bad("epoch", t["epoch"].to_numpy() < 0, "are negative")
    split = np.asarray(t["split"].to_pylist(), dtype=object)
    bad("split", ~np.isin(split, SPLITS), f"are not one of {', '.join(SPLITS)}")
    for name in ("model", "member", "variant"):
        bad(name, np.asarray([not v for v in t[name].to_pylist()]), "are empty")
    for name in ("sparsity", "target_sparsity"):
        v = t[name].to_numpy().astype(np.float64)
        bad(name, ~(np.isfinite(v) & (v >= 0) & (v <= 1)), "are not fractions in [0, 1]")
    bt = t["basis_threshold"].to_numpy(zero_copy_only=False).astype(np.float64)
    bad("basis_threshold", ~np.isnan(bt) & ~((bt > 0) & (bt <= 1)), "are not in (0, 1]")
    lv = t["level"].to_numpy(zero_copy_only=False).astype(np.float64)
    bad("level", ~np.isnan(lv) & (lv < 0), "are negative")
    key = np.rec.fromarrays([split.astype(str), np.asarray(t["member"].to_pylist(), dtype=str),
                             t["target_sparsity"].to_numpy(), np.nan_to_num(bt, nan=-1.0), np.nan_to_num(lv, nan=-1.0),
                             t["epoch"].to_numpy(), t["index"].to_numpy()])
    _, first = np.unique(key, return_index=True)
    dup = np.ones(len(key), bool)
    dup[first] = False
    bad("index", dup, "repeat an index of their split, member and rung")


def _files_of(table: pa.Table, *members: str) -> str:
    """' (in a.parquet, b.parquet)': the files a table read ``members`` from, for an error line."""
    try:
        files = [s["path"] for s in prediction_sources(table) if set(members) & set(s.get("members") or [])]
    except (ValueError, TypeError, KeyError):
        files = []
    names = sorted({str(f).replace("\\", "/").rsplit("/", 1)[-1] for f in files if f})
    return f" (in {', '.join(names)})" if names else ""


def prediction_sources(table: pa.Table) -> list[dict[str, Any]]:
    """Per-file provenance of a table from :func:`read_predictions`: path, num_rows, members, metadata."""
    raw = (table.schema.metadata or {}).get(_SOURCES_KEY)
    if raw is not None:
        return json.loads(raw)
    return [{"path": None, "num_rows": table.num_rows,
             "members": sorted(set(table["member"].to_pylist())), "metadata": _decode_metadata(table.schema.metadata)}]


# ----------------------------------------------------------------------------------------------------
# aligning members
# ----------------------------------------------------------------------------------------------------
def _columns_np(table: pa.Table) -> dict[str, np.ndarray]:
    cols = {}
    for name in ("basis_threshold", "level"):  # null -> NaN: "not a basis rung", "not a level"
        if name in table.schema.names:
            cols[name] = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            cols[name] = np.full(table.num_rows, np.nan)
    for name in _COLUMNS:
        if name == "probs":
            c = table.schema.field("probs").type.list_size
            flat = table["probs"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            cols[name] = flat.reshape(-1, c)
        elif name in _STR_COLUMNS:
            cols[name] = np.asarray(table[name].to_pylist(), dtype=object)
        else:
            cols[name] = table[name].to_numpy()
    return cols


def prediction_rungs(table: pa.Table, split: str | None = None) -> list[dict[str, Any]]:
    """Distinct (member, model, variant, split, target_sparsity, basis_threshold, epoch) groups with their
    row counts (``basis_threshold`` None for sparsity and dense rungs)."""
    keys = ["member", "model", "variant", "split", "target_sparsity", "epoch"]
    if "basis_threshold" in table.schema.names:
        keys.insert(5, "basis_threshold")
    if "level" in table.schema.names:
        keys.insert(5, "level")
    t = table if split is None else table.filter(pc.equal(table["split"], split))
    g = t.group_by(keys).aggregate([("index", "count")]).to_pylist()
    for r in g:
        r["num_rows"] = r.pop("index_count")
        r["target_sparsity"] = round(float(r["target_sparsity"]), 6)
        bt = r.get("basis_threshold")
        r["basis_threshold"] = None if bt is None else round(float(bt), 6)
    return sorted(g, key=lambda r: (r["member"], r["split"], Rung.of(r).order(), r["epoch"]))


def _row_rungs(cols: dict[str, np.ndarray], sel: np.ndarray) -> list[Rung]:
    ts = cols["target_sparsity"][sel].astype(np.float64)
    bt, lv = cols["basis_threshold"][sel], cols["level"][sel]
    return sorted({Rung(t, None if np.isnan(b) else b, None if np.isnan(v) else int(v))
                   for t, b, v in set(zip(ts.tolist(), bt.tolist(), lv.tolist()))})


def _rows_at(cols: dict[str, np.ndarray], rung: Rung) -> np.ndarray:
    """Rows of ``rung``, by the package's one rule: values rounded as :class:`Rung` rounds them."""
    at = np.round(cols["target_sparsity"].astype(np.float64), 6) == rung.target_sparsity
    bt, lv = cols["basis_threshold"], cols["level"]
    at &= np.isnan(bt) if rung.basis_threshold is None else np.round(bt, 6) == rung.basis_threshold
    return at & (np.isnan(lv) if rung.level is None else lv == rung.level)


def prediction_matrix(
    table: pa.Table,
    split: str,
    members: Sequence[str] | None = None,
    sparsity: float | None = None,
    *,
    variant: str | None = None,
    return_info: bool = False,
    basis_threshold: float | None = None,
    level: int | None = None,
):
    """Stack the members' predictions on one split, aligned by ``index``.

    Returns ``(probs [K, N, C] float32, labels [N] int64, member_names)`` with rows sorted by
    ``index`` (and, when ``return_info``, a 4th item: per member the rung used).  ``members`` defaults
    to every member present, sorted by name.  Rung: with ``sparsity=None`` each member's last rung
    (highest ``target_sparsity``; for a BasisConv member its smallest ``basis_threshold``: see
    :meth:`~esdbs_ray.records.Rung.order`); otherwise the rung whose ``target_sparsity`` equals ``sparsity`` and which is
    not a basis rung, or, with ``basis_threshold``, the basis rung of that t (and of ``sparsity`` when
    given); an error lists the available rungs.  Within a rung the latest ``epoch`` is used.  ``variant`` filters rows first (required when a member appears under several variants).
    Errors name the members whose index sets or labels differ.
    """
    if sparsity is not None and not 0.0 <= float(sparsity) <= 1.0:
        raise PredictionsError(f"sparsity must be a fraction in [0, 1] (e.g. 0.8 for 80 %), got {sparsity}")
    if basis_threshold is not None and not 0.0 < float(basis_threshold) <= 1.0:
        raise PredictionsError(f"basis_threshold must be in (0, 1], got {basis_threshold}")
    t = table
    if variant is not None:
        t = t.filter(pc.equal(t["variant"], variant))
        if t.num_rows == 0:
            raise PredictionsError(
                f"no rows with variant {variant!r}; available: {sorted(set(table['variant'].to_pylist()))}"
            )
    t_split = t.filter(pc.equal(t["split"], split))
    if t_split.num_rows == 0:
        raise PredictionsError(
            f"no rows for split {split!r}; available splits: {sorted(set(t['split'].to_pylist()))}"
        )
    cols = _columns_np(t_split)
    available = sorted(set(cols["member"].tolist()))
    if members is None:
        members = available
    else:
        members = list(members)
        missing = [m for m in members if m not in available]
        if missing:
            raise PredictionsError(f"member(s) {missing} have no {split!r} rows; available: {available}")
        if len(set(members)) != len(members):
            raise PredictionsError(f"duplicate member names in {members}")
    probs_list, labels_ref, index_ref, info = [], None, None, {}
    for m in members:
        sel = cols["member"] == m
        variants = sorted(set(cols["variant"][sel].tolist()))
        if len(variants) > 1:
            raise PredictionsError(f"member {m!r} appears under several variants {variants}; pass variant=")
        rungs = _row_rungs(cols, sel)
        if sparsity is None and basis_threshold is None and level is None:
            want = rungs[-1]
        else:
            hits = [r for r in rungs if r.matches(sparsity, basis_threshold, level)]
            if not hits:
                asked = " and ".join(x for x in (f"target_sparsity {sparsity}" if sparsity is not None else "",
                                                 f"basis_threshold {basis_threshold}" if basis_threshold is not None
                                                 else "", f"level {level}" if level is not None else "") if x)
                raise PredictionsError(
                    f"member {m!r} has no rung with {asked} on split {split!r}; "
                    f"available: {', '.join(r.text() for r in rungs)}"
                )
            want = hits[0]
        sel &= _rows_at(cols, want)
        last_epoch = int(cols["epoch"][sel].max())
        sel &= cols["epoch"] == last_epoch
        idx = cols["index"][sel]
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        if np.unique(idx).size != idx.size:
            raise PredictionsError(
                f"member {m!r}: duplicate indices on split {split!r} at {want.text()}, epoch {last_epoch} "
                "(two files for the same rung?)"
            )
        lab = cols["label"][sel][order]
        p = cols["probs"][sel][order]
        if index_ref is None:
            index_ref, labels_ref, ref_member = idx, lab, m
        else:
            if idx.size != index_ref.size or not np.array_equal(idx, index_ref):
                only_a = np.setdiff1d(index_ref, idx).size
                only_b = np.setdiff1d(idx, index_ref).size
                raise PredictionsError(
                    f"members {ref_member!r} and {m!r} have different {split!r} index sets "
                    f"({index_ref.size} vs {idx.size} rows; {only_a} only in {ref_member!r}, {only_b} only in {m!r})"
                    + _files_of(table, ref_member, m)
                )
            if not np.array_equal(lab, labels_ref):
                raise PredictionsError(
                    f"members {ref_member!r} and {m!r} disagree on {int(np.sum(lab != labels_ref))} {split!r} labels"
                    + _files_of(table, ref_member, m)
                )
        probs_list.append(p)
        info[m] = {
            "target_sparsity": want.target_sparsity,
            "basis_threshold": want.basis_threshold,
            "level": want.level,
            "sparsity": round(float(np.mean(cols["sparsity"][sel])), 6),
            "epoch": last_epoch,
            "model": str(cols["model"][sel][0]),
            "variant": str(cols["variant"][sel][0]),
            "num_rows": int(idx.size),
        }
    probs = np.stack(probs_list).astype(np.float32, copy=False)
    out = (probs, labels_ref.astype(np.int64), list(members))
    return out + (info,) if return_info else out
