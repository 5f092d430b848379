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


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(_local(base).joinpath(*parts))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(str(path))
        fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(key) as out:
            out.write(data)
        return str(path)
    target = _local(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


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
