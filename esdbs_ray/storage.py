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


def read_bytes(path: str | os.PathLike, *, max_bytes: int | None = None) -> bytes:
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(str(path))
        return _read_remote(fs, key, str(path), max_bytes)
    return read_local(_local(path), max_bytes=max_bytes)


def _read_remote(fs, key: str, name: str, max_bytes: int | None) -> bytes:
    """An object of a pyarrow filesystem, refused before reading when it is larger than ``max_bytes``."""
    if max_bytes is not None:
        size = fs.get_file_info(key).size
        if size is not None and size > max_bytes:
            raise UserError(f"{name}: {size:,} bytes, more than the {max_bytes:,} this kind of file may have")
    with fs.open_input_stream(key) as fh:
        data = fh.read(max_bytes + 1) if max_bytes is not None else fh.read()
    if max_bytes is not None and len(data) > max_bytes:
        raise UserError(f"{name}: more than the {max_bytes:,} bytes this kind of file may have")
    return data


def check_regular(path: str | os.PathLike) -> int:
    """The size of a local regular file, or one line naming what it is instead.

    Absent -> ``FileNotFoundError`` (callers treat optional files as absent); a link that leads
    nowhere or in a loop, a directory, a pipe or a device -> :class:`UserError`: reading a pipe
    would wait forever for a writer, and a link that leads nowhere is a broken file, not an
    absent one."""
    import errno
    import stat

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise UserError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist") from None
        raise FileNotFoundError(errno.ENOENT, "no such file", str(p)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{p}: a symbolic link loop") from None
        if exc.errno == errno.ENOTDIR:
            raise FileNotFoundError(errno.ENOENT, "no such file (a parent is a file)", str(p)) from None
        raise UserError(f"{p}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{p}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise UserError(f"{p}: {kind}, not a regular file (not read: it could block forever)")
    return st.st_size


def read_local(path: str | os.PathLike, *, max_bytes: int | None = None) -> bytes:
    """A local regular file's bytes (:func:`check_regular`), refused naming it when it is larger than
    ``max_bytes`` -- before reading, so a huge file costs nothing."""
    size = check_regular(path)
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"{path}: {size:,} bytes, more than the {max_bytes:,} this kind of file may have")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1) if max_bytes is not None else fh.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew while we looked
        raise UserError(f"{path}: more than the {max_bytes:,} bytes this kind of file may have")
    return data


# JSON the project reads: nesting beyond this is refused (its own files nest 7 levels), so no reader
# recurses without bound.
JSON_MAX_DEPTH = 64


def _json_path(text: str, *, max_depth: int | None = None) -> str:
    """Where JSON ``text`` first nests deeper than ``max_depth`` or, without it, holds a number of more
    digits than Python converts: its key path for an error line (``a.b[0][0]...: ``), found by a scan of
    brackets, keys and long numbers (only when the parser gave up)."""
    import re

    token = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{},]|-?\d{4000,}')
    stack: list[list] = []  # per open container: [kind, key or index]

    def here() -> str:
        parts = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for _, k in stack if k is not None).lstrip(".")
        return (parts if len(parts) <= 120 else parts[:100] + "...") + ": " if parts else ""

    for m in token.finditer(text):
        t = m.group()
        if t in "[{":
            if max_depth is not None and len(stack) >= max_depth:
                return here()
            stack.append([t, 0 if t == "[" else None])
        elif t in "]}":
            if stack:
                stack.pop()
        elif t == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] += 1
        elif t.startswith('"'):
            if t.endswith(":") and stack and stack[-1][0] == "{":
                stack[-1][1] = t[1:t.rindex('"')][:60]
        elif max_depth is None:  # a long number
            return here()
    return ""


def parse_json(data: bytes | str, where: str, *, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """JSON text (NaN and Infinity allowed: a diverged epoch's loss is written as NaN), refused with one
    line naming ``where``: not UTF-8, not JSON, a number with more digits than Python converts, or
    nested deeper than ``max_depth``."""
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{where}: {_json_path(data, max_depth=max_depth)}nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise UserError(f"{where}: {_json_path(data)}not valid JSON ({str(exc).split(';')[0]})") from None
    stack = [(doc, 1, "")]
    while stack:
        x, d, path = stack.pop()
        if d > max_depth:
            shown = path if len(path) <= 120 else path[:100] + "..."
            raise UserError(f"{where}: {shown.lstrip('.')}: nested deeper than {max_depth} levels")
        if isinstance(x, dict):
            stack.extend((v, d + 1, f"{path}.{k}") for k, v in x.items() if isinstance(v, (dict, list)))
        elif isinstance(x, list):
            stack.extend((v, d + 1, f"{path}[{i}]") for i, v in enumerate(x) if isinstance(v, (dict, list)))
    return doc


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
    return torch_from_bytes(read_bytes(path), path, map_location=map_location)


def torch_from_bytes(data: bytes, where: Any, *, map_location="cpu", what: str = "checkpoint") -> Any:
    """A torch file's object (``weights_only=True``), or one line naming ``where``.  torch's warnings
    about the file (an unusual pickle protocol, ...) are not printed: the error line says it all."""
    import io
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message carries terminal colour codes
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        if first.startswith("Weights only load failed"):
            first = "the weights-only loader refused it: not tensors and plain containers"
        raise UserError(f"{where}: not a readable {what} ({first[:200]})") from None


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

    def read_bytes(self, *parts: str, max_bytes: int | None = None) -> bytes:
        import pyarrow.fs as pafs

        p = self.path(*parts)
        if self.local:  # links, pipes and devices named, not followed into a hang
            try:
                return read_local(p, max_bytes=max_bytes)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.uri(*parts)}: no such file") from None
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri(*parts)}: no such file")
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(f"{self.uri(*parts)}: is a directory, not a file")
        return _read_remote(self.fs, p, self.uri(*parts), max_bytes)

    def read_text(self, *parts: str) -> str:
        try:
            return self.read_bytes(*parts).decode()
        except UnicodeDecodeError:
            raise UserError(f"{self.uri(*parts)}: not UTF-8 text") from None

    def read_json(self, *parts: str) -> Any:
        return parse_json(self.read_bytes(*parts), self.uri(*parts))

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


