"""Where everything of an experiment lives, and which directories esdbs may write into.

:class:`ExperimentLayout` names every path of an experiment directory (local path or ``pyarrow.fs``
URI); every module that reads or writes one asks it, so the layout is spelled here only::

    OUT/.esdbs.json              marker: made by esdbs, for what (experiment, report, run, dbs-search, export)
    OUT/config.yaml              the resolved config (a resumed run reads it back)
    OUT/tune/base/...            Tune's experiment: results, checkpoints, per-trial TensorBoard events
    OUT/tune/dbs_search/...      the DBS-constant search (when run)
    OUT/predictions/*.parquet    every member's val/test probabilities at every pruning rung
    OUT/members/<member>.json    each member's own training summary (per-epoch history, rungs)
    OUT/weights/<member>-tsNNNN.pt  each member's weights (masks included) at the rung its stack uses
    OUT/tensorboard/<group>/<member>/  each member's TensorBoard events (tensorboard --logdir OUT/tensorboard)
    OUT/mlruns/                  the MLflow file store, when tracking is on with no tracking URI
    OUT/tracking.json            which MLflow experiment and runs hold this run
    OUT/stacking[-<group>].json  stacking weights and metrics per method
    OUT/summary.json             the final table, with provenance
    OUT/dbs_constants.json       the DBS search's best constants (+ dbs_search.png, its trade-off)
    OUT/report/                  esdbs report

:class:`RunLayout` is the same for ``esdbs train-one`` (one model: checkpoint, summary, TensorBoard);
:class:`ExportLayout` for ``esdbs export`` (a self-describing ensemble: manifest, weights, ONNX graphs).

**Outputs** (:func:`claim_dir`): a command writes only into a directory that is new (or empty) or that
esdbs made for the same purpose -- the marker says so; anything else is refused with one line.
Continuing needs ``--resume``; replacing needs ``--force``, and a replaced experiment is moved aside
(renamed, atomically) rather than deleted.  A report is built in a temporary directory and swapped
into place (:func:`replace_dir`), keeping any file esdbs did not write.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .errors import UserError
from .records import Rung

MARKER = ".esdbs.json"
KINDS = ("experiment", "dbs-search", "run", "report", "export")


class OutputError(UserError):
    """An output path esdbs must not write to (not ours, a file, not writable, already holds results)."""


def _sparsity_tag(target_sparsity: float) -> str:
    return f"ts{round(float(target_sparsity) * 1000):04d}"


def safe_name(s: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "._+-") else "_" for c in str(s))


@dataclass(frozen=True)
class ExperimentLayout:
    root: str  # a normalised local path or URI

    # Names inside an experiment directory, relative to its root: the properties below join them to the
    # root; readers that walk an experiment through ``storage.Tree`` (results, export, tracking, the
    # report) take them as they are.
    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    TUNE = "tune"
    TUNE_BASE = (TUNE, "base")  # Tune's experiment name "base" under storage_path OUT/tune
    TUNE_DBS_SEARCH = (TUNE, "dbs_search")
    PREDICTIONS = "predictions"
    MEMBERS = "members"
    WEIGHTS = "weights"
    TENSORBOARD = "tensorboard"  # one run per member: <group>/<member>
    STACKING_GLOB = "stacking*.json"  # the run's own stacking files
    RESTACK_GLOB = "stack-*.json"  # esdbs stack's re-runs, newest last by name
    POOL_GLOB = "pool-*.json"  # esdbs stack --pool: ensembles chosen from every candidate (pool.py)
    POOL_COST = "candidate_costs.json"  # a pool's candidates' multiply-adds and measured times (pool_cost.py)

    @staticmethod
    def member_name(member: str) -> str:
        return f"{safe_name(member)}.json"

    @staticmethod
    def rung_weights_name(member: str, target_sparsity: float, level: int | None = None) -> str:
        return f"{safe_name(member)}-{_sparsity_tag(target_sparsity) if level is None else f'lv{level:02d}'}.pt"

    @staticmethod
    def stacking_name(group_slug: str | None = None) -> str:
        return f"stacking-{group_slug}.json" if group_slug else "stacking.json"

    # A multi-seed run (config ``seeds``): one experiment directory per seed, laid out as above, and the
    # one Tune experiment of all their trials in OUT/tune/base, a trial directory <member>_s<seed>_<id>.
    REPLICATE_GLOB = "seed-*"

    @staticmethod
    def replicate_name(seed: int) -> str:
        return f"seed-{int(seed)}"

    def replicate(self, seed: int) -> "ExperimentLayout":
        """Seed ``seed``'s experiment directory in a multi-seed run."""
        return ExperimentLayout(self._join(self.replicate_name(seed)))

    @staticmethod
    def trial_key(member: str, seed: int | None) -> str:
        """A base trial's Tune directory prefix and display name: the member's name, and in a multi-seed
        run its seed (member names hold no '_')."""
        return member if seed is None else f"{member}_s{int(seed)}"

    @classmethod
    def at(cls, path: str | os.PathLike) -> "ExperimentLayout":
        return cls(storage.normalize(path))

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def marker(self) -> str:
        return self._join(MARKER)

    @property
    def config(self) -> str:
        return self._join(self.CONFIG)

    @property
    def tune(self) -> str:
        return self._join(self.TUNE)

    @property
    def base(self) -> str:
        return self._join(*self.TUNE_BASE)

    @property
    def dbs_search(self) -> str:
        return self._join(*self.TUNE_DBS_SEARCH)

    @property
    def predictions(self) -> str:
        return self._join(self.PREDICTIONS)

    def prediction(self, member: str, target_sparsity: float, basis_threshold: float | None = None,
                   level: int | None = None) -> str:
        # a basis rung is named by its threshold t (<member>-bt0900.parquet), a level by its number (-lv02)
        return self._join(self.PREDICTIONS, f"{safe_name(member)}-{Rung(target_sparsity, basis_threshold, level).tag()}.parquet")

    @property
    def members(self) -> str:
        return self._join(self.MEMBERS)

    def member(self, member: str) -> str:
        return self._join(self.MEMBERS, self.member_name(member))

    @property
    def weights(self) -> str:
        return self._join(self.WEIGHTS)

    def rung_weights(self, member: str, target_sparsity: float, level: int | None = None) -> str:
        """The member's weights at the end of one rung (the trainer keeps the rung its stack uses) or
        of a growing member's level (kept for every level)."""
        return self._join(self.WEIGHTS, self.rung_weights_name(member, target_sparsity, level))

    @property
    def tensorboard(self) -> str:
        """``tensorboard --logdir`` this: the members' runs, named <group>/<member>."""
        return self._join(self.TENSORBOARD)

    def tensorboard_run(self, group: str | None, member: str) -> str:
        return self._join(self.TENSORBOARD, safe_name(group or "members"), safe_name(member))

    @property
    def mlruns(self) -> str:
        return self._join("mlruns")

    @property
    def tracking(self) -> str:
        return self._join("tracking.json")

    def stacking(self, group_slug: str | None = None) -> str:
        return self._join(self.stacking_name(group_slug))

    def stacking_rerun(self, tag: str) -> str:
        """A new file per ``esdbs stack`` call (the run's own stacking.json is never rewritten)."""
        return self._join(f"stack-{time.strftime('%Y%m%dT%H%M%S')}-{safe_name(tag)}.json")

    def pool_result(self, tag: str) -> str:
        """A new ``pool-<time>-<tag>.json`` per ``esdbs stack --pool`` call (its front beside it:
        the same name ending ``-front.parquet`` and ``-front.png``)."""
        return self._join(f"pool-{time.strftime('%Y%m%dT%H%M%S')}-{safe_name(tag)}.json")

    @property
    def summary(self) -> str:
        return self._join(self.SUMMARY)

    @property
    def dbs_constants(self) -> str:
        return self._join("dbs_constants.json")

    @property
    def dbs_search_figure(self) -> str:
        return self._join("dbs_search.png")

    @property
    def report(self) -> str:
        return self._join("report")

    # top-level names esdbs writes into an experiment (the rest of a directory is the user's)
    ENTRIES = ("config.yaml", "tune", "predictions", "members", "weights", "tensorboard", "summary.json",
               "dbs_constants.json",
               "dbs_search.png", "report", "mlruns", "tracking.json", MARKER)


@dataclass(frozen=True)
class RunLayout:
    """``esdbs train-one --out DIR``: one model's run."""

    root: Path
    CHECKPOINT = "checkpoint.pt"

    @property
    def checkpoint(self) -> Path:
        return self.root / self.CHECKPOINT

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels.png"

    @property
    def marker(self) -> Path:
        return self.root / MARKER


@dataclass(frozen=True)
class ExportLayout:
    """``esdbs export --out DIR``: one ensemble, self-describing (``esdbs_ray/export.py``)."""

    root: Path
    MANIFEST = "manifest.json"

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def members(self) -> Path:
        return self.root / "members"

    def member_weights(self, member: str) -> Path:
        return self.members / f"{safe_name(member)}.safetensors"

    def member_onnx(self, member: str) -> Path:
        return self.members / f"{safe_name(member)}.onnx"

    @property
    def marker(self) -> Path:
        return self.root / MARKER


# --------------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------------
def read_marker(root: str) -> dict | None:
    """The marker of a directory (local or URI), None when there is none or it is unreadable."""
    try:
        d = json.loads(storage.read_bytes(storage.join(root, MARKER)))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("kind") in KINDS else None


def write_marker(root: str, kind: str) -> None:
    from .provenance import git_revision

    storage.write_json(storage.join(root, MARKER), {"kind": kind, "tool": "esdbs",
                                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "git_revision": git_revision()})


def _normalize_out(path: str | os.PathLike, flag: str) -> str:
    """A local path or a URI pyarrow understands; anything else is refused naming the flag."""
    root = storage.normalize(path)
    if storage.is_uri(root):
        import pyarrow.fs as pafs

        try:
            pafs.FileSystem.from_uri(root)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise OutputError(f"{flag} {root}: not a storage URI esdbs can write ({str(exc).splitlines()[0]})") from None
    return root


def _is_empty(root: str) -> bool | None:
    """True: absent or empty; False: holds something; for URIs also True when the prefix is empty."""
    if storage.is_uri(root):
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(root)
        info = fs.get_file_info(key)
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type == pafs.FileType.File:
            raise OutputError(f"{root} is a file, not a directory")
        return not fs.get_file_info(pafs.FileSelector(key, allow_not_found=True, recursive=False))
    p = Path(root)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{root} is a file, not a directory; choose a directory path for the output")
    return not p.exists() or not any(p.iterdir())


def check_writable(root: str, flag: str | None = None) -> None:
    """Fail now, naming the path (and ``flag``), if a local output directory cannot be created or
    written: a parent that is a file, no permission, a read-only file system."""
    if storage.is_uri(root):
        return
    p = Path(root)
    parent = next((q for q in [p, *p.parents] if q.exists()), None)
    lead = f"{flag} {root}" if flag else root
    if parent is None or not parent.is_dir():
        raise OutputError(f"{lead}: a parent of this path is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{lead}: not writable ({parent} does not allow writing"
                          + ("; it is on a read-only file system)" if _read_only_fs(parent) else ")"))


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Claim:
    """What :func:`claim_dir` made of a directory, and how to take it back: a command whose start fails
    (before its work has begun) leaves ``--out`` as it found it, so the corrected command is not
    refused as "already holds an esdbs run"."""

    def __init__(self, root: str, existed: bool, aside: str | None):
        self.root, self.existed, self.aside = root, existed, aside

    def undo(self) -> None:
        if storage.is_uri(self.root):
            import pyarrow.fs as pafs

            fs, key = pafs.FileSystem.from_uri(self.root)
            try:  # the prefix was empty before the claim: what is under it now was written by this command
                fs.delete_dir_contents(key, missing_dir_ok=True)
            except OSError:
                pass
            return
        p = Path(self.root)
        if self.existed:  # it was empty: empty it again
            for child in list(p.iterdir()) if p.is_dir() else []:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        if self.aside is not None:  # --force moved the old output aside: it comes back
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
            os.rename(self.aside, self.root)
            print(f"[esdbs] the previous output is back in {self.root}", flush=True)


def claim_dir(path: str | os.PathLike, kind: str, *, resume: bool = False, force: bool = False,
              flag: str = "--out", check_only: bool = False, claims: list | None = None) -> str:
    """Decide whether ``path`` may receive a ``kind`` output, and mark it; returns the normalised path.

    New or empty -> created and marked.  Marked for ``kind`` -> ``resume`` continues it, ``force``
    moves it aside (``<name>.replaced-<time>``, nothing deleted) and starts afresh; neither -> refused.
    Anything else -> refused: esdbs never writes into a directory it did not make for this purpose.
    ``check_only``: refuse now if it would be refused, but write nothing (call again to claim);
    ``claims``: a list that receives the :class:`Claim` (not for ``resume``: a resumed output is the
    user's work, never taken back)."""
    root = _normalize_out(path, flag)
    check_writable(root)
    empty = _is_empty(root)
    marker = None if empty else read_marker(root)
    if resume:
        if empty or marker is None or marker.get("kind") != kind:
            raise OutputError(f"--resume {root}: no esdbs {kind} there to continue")
        return root
    if not empty:
        if marker is None or marker.get("kind") != kind:
            what = f"an esdbs {marker['kind']}" if marker else "files esdbs did not write"
            raise OutputError(f"{flag} {root} holds {what}; choose a new or empty directory")
        if not force:
            raise OutputError(f"{flag} {root} already holds an esdbs {kind}; pass --resume {root} to continue it, "
                              "--force to replace it (the old one is moved aside), or choose another directory")
        if storage.is_uri(root):
            raise OutputError(f"--force {root}: replacing is supported for local directories only")
        if check_only:
            return root
        aside = f"{root.rstrip('/')}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(root, aside)
        print(f"[esdbs] the previous {kind} in {root} was moved to {aside}", flush=True)
    else:
        aside = None
    if check_only:
        return root
    existed = not storage.is_uri(root) and Path(root).exists() and aside is None
    if not storage.is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    if claims is not None:
        claims.append(Claim(root, existed, aside))
    write_marker(root, kind)
    return root


def claim_file(path: str | os.PathLike, *, force: bool = False, flag: str = "--output") -> str:
    """A single output file: new, or replaced (atomically, by the writer) only with ``force``."""
    root = storage.normalize(path)
    if not storage.is_uri(root):
        p = Path(root)
        if p.is_dir():
            raise OutputError(f"{flag} {root} is a directory; name a file")
        if p.exists() and not force:
            raise OutputError(f"{flag} {root} exists; choose a new path or pass --force to replace it")
        check_writable(str(p.parent))
    return root


def check_replace(target: str | os.PathLike, *, kind: str, force: bool = False,
                  flag: str = "--out") -> tuple[Path, dict | None]:
    """Refuse now, writing nothing, what :func:`replace_dir` would refuse; returns the local target
    and the marker already there (None when new or empty)."""
    if storage.is_uri(target):  # before Path(), which would fold "s3://b" into "s3:/b"
        raise OutputError(f"{flag} {target}: a {kind} is written to a local directory; name one")
    target = Path(storage.normalize(target))
    check_writable(str(target))
    empty = _is_empty(str(target))
    old_marker = None if empty else read_marker(str(target))
    if not empty:
        if old_marker is None or old_marker.get("kind") != kind:
            what = f"an esdbs {old_marker['kind']}" if old_marker else "files esdbs did not write"
            raise OutputError(f"{flag} {target} holds {what}; choose a new or empty directory")
        if not force:
            raise OutputError(f"{flag} {target} already holds an esdbs {kind}; pass --force to replace it")
    return target, old_marker


def replace_dir(target: str | os.PathLike, build, *, kind: str, force: bool = False, flag: str = "--out") -> str:
    """Build a directory output (``build(staging_dir)`` writes into a fresh temporary directory), then
    swap it into place: a reader sees the old or the new, never half of either.  An existing ``target``
    must be esdbs's own ``kind`` output and needs ``force``; files in it that esdbs did not write
    (not in the new output, not the old marker's) are carried over, never deleted."""
    target, old_marker = check_replace(target, kind=kind, force=force, flag=flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    os.chmod(staging, 0o777 & ~storage._UMASK)  # mkdtemp makes 0700; the output is an ordinary directory
    try:
        result = build(staging)
        write_marker(str(staging), kind)
        written = set(os.listdir(staging))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "d")
            os.rename(staging, target)
            ours = set((old_marker or {}).get("files", [])) | written | {MARKER}
            for name in os.listdir(old / "d"):
                if name not in ours:
                    os.rename(old / "d" / name, target / name)  # the user's files stay
            shutil.rmtree(old)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # remember what esdbs wrote, so a later --force knows what is its own
    storage.write_json(target / MARKER, {**(read_marker(str(target)) or {"kind": kind}), "files": sorted(written)})
    return result
