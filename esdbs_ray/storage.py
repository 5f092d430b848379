"""Atomic writes to local paths or ``pyarrow.fs`` URIs (s3://, gs://, file://, NFS paths).

Nothing already written is lost when a write fails: local files go to a temporary file in the same
directory, then ``os.replace`` (atomic on POSIX); object stores publish a key only when its upload
completes, so a direct write there is atomic already.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
        raise ValueError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
