"""Atomic writes to local paths or ``pyarrow.fs`` URIs (s3://, gs://, file://, NFS paths).

Nothing already written is lost when a write fails: local files go to a temporary file in the same
directory, then ``os.replace`` (atomic on POSIX); object stores publish a key only when its upload
completes, so a direct write there is atomic already.

Reading: :class:`Tree` reads a directory through a ``pyarrow.fs`` filesystem, whichever it is, so the
report, ``esdbs results`` and ``esdbs export`` read a bucket the way they read a local run.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from .errors import UserError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def normalize(path: str | os.PathLike) -> str:
    """URIs as given; local and ``file://`` paths as absolute local paths."""
    return str(path) if is_uri(path) else str(_local(path).resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(_local(base).joinpath(*parts))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    if is_uri(path):
        return _write_uri(str(path), data)
    target = _local(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path) if str(path).startswith("file://") else str(target)


def _write_uri(uri: str, data: bytes) -> str:
    """Temp key + move where the filesystem can move (HDFS, NFS through pyarrow); object stores
    cannot, and publish an object only once its upload completes, so a direct write is atomic there."""
    import uuid

    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, key = pafs.FileSystem.from_uri(uri)
    parent, name = key.rsplit("/", 1) if "/" in key else ("", key)
    if parent:
        try:
            fs.create_dir(parent, recursive=True)
        except (OSError, NotImplementedError):
            pass  # object stores have no directories
    tmp = f"{parent + '/' if parent else ''}.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, key)
    except (OSError, NotImplementedError, pa.ArrowNotImplementedError):
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        with fs.open_output_stream(key) as out:
            out.write(data)
    return uri


def filesystem(path: str | os.PathLike):
    """``(pyarrow filesystem, path on it)`` for a local path, ``file://`` path or URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(_local(path).resolve())


_filesystem = filesystem  # Tree's `filesystem` argument shadows the name


def read_bytes(path: str | os.PathLike) -> bytes:
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(str(path))
        with fs.open_input_stream(key) as fh:
            return fh.read()
    return _local(path).read_bytes()


def write_json(path: str | os.PathLike, obj: Any) -> str:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode())


def _jsonable(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_torch(path: str | os.PathLike, obj: Any) -> str:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike, map_location="cpu") -> Any:
    """Checkpoints load with ``weights_only=True``: tensors and plain containers, never arbitrary code."""
    import io

    import torch

    try:
        return torch.load(io.BytesIO(read_bytes(path)), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------------
# Reading a directory tree on any filesystem
# --------------------------------------------------------------------------------------------------
class Tree:
    """A read-only view of a directory on a ``pyarrow.fs`` filesystem: a local path, a ``file://``
    URI, ``s3://`` / ``gs://`` / ..., or any ``filesystem`` passed in with a path on it.

    Every read goes through the filesystem object -- local paths too -- so a local run exercises the
    same code as a bucket (tests pass a ``SubTreeFileSystem``, on which a local-path shortcut would
    fail).  Libraries that insist on a local file (TensorBoard's event reader) get one from
    :meth:`local_path`, downloaded into a temporary directory when the tree is not local.
    """

    def __init__(self, root: str | os.PathLike, filesystem=None):
        import pyarrow.fs as pafs

        if filesystem is not None:
            self.fs, self.base = filesystem, str(root).rstrip("/")
            self.root = str(root)
        else:
            self.root = normalize(root)
            self.fs, self.base = _filesystem(self.root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._tmp = None

    def path(self, *parts: str) -> str:
        """The path of ``parts`` on :attr:`fs`."""
        parts = [p for p in parts if p]
        return "/".join([self.base, *parts]) if self.base else "/".join(parts)

    def uri(self, *parts: str) -> str:
        """How to name ``parts`` to a person (the root as given, joined)."""
        return join(self.root, *[p for p in parts if p]) if parts else self.root

    def _type(self, *parts: str):
        return self.fs.get_file_info(self.path(*parts)).type

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self._type(*parts) != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self._type(*parts) == pafs.FileType.File

    def is_dir(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self._type(*parts) == pafs.FileType.Directory

    def read_bytes(self, *parts: str) -> bytes:
        import pyarrow.fs as pafs

        p = self.path(*parts)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri(*parts)}: no such file")
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(f"{self.uri(*parts)}: is a directory, not a file")
        with self.fs.open_input_stream(p) as fh:
            return fh.read()

    def read_text(self, *parts: str) -> str:
        try:
            return self.read_bytes(*parts).decode()
        except UnicodeDecodeError:
            raise UserError(f"{self.uri(*parts)}: not UTF-8 text") from None

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(self.read_text(*parts))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.uri(*parts)}: not valid JSON ({exc.msg} at line {exc.lineno})") from None

    def entries(self, *parts: str, recursive: bool = False) -> list:
        """FileInfo of what lies under ``parts`` ([] when it is missing), sorted by path."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True, recursive=recursive)
        try:
            return sorted(self.fs.get_file_info(sel), key=lambda e: e.path)
        except (NotADirectoryError, OSError):
            return []

    def listdir(self, *parts: str, pattern: str = "*", kind: str | None = None) -> list[str]:
        """Names under ``parts`` matching the glob ``pattern`` (``kind``: "file" or "dir" only), sorted;
        hidden names (a leading dot) are left out."""
        import fnmatch

        import pyarrow.fs as pafs

        want = {"file": pafs.FileType.File, "dir": pafs.FileType.Directory}.get(kind)
        return sorted(e.base_name for e in self.entries(*parts)
                      if not e.base_name.startswith(".") and fnmatch.fnmatchcase(e.base_name, pattern)
                      and (want is None or e.type == want))

    def local_path(self, *parts: str) -> str:
        """A local file holding ``parts``: the file itself when the tree is local, else a copy in a
        temporary directory that lives as long as this object."""
        if self.local:
            return self.path(*parts)
        import tempfile
        import weakref

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="esdbs-tree-")
            weakref.finalize(self, self._tmp.cleanup)
        target = Path(self._tmp.name).joinpath(*[p for p in "/".join(parts).split("/") if p])
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(*parts))
        return str(target)


