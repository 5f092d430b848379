"""Hostile inputs by class: mutate every kind of file esdbs reads, run every command that reads it.

A *case* copies the parts of a small sandbox a command needs into a fresh directory (the committed
smoke experiment ``tests/data/legacy/smoke``, the train-one run ``tests/data/legacy/one``, an export
of the smoke run, an image folder, Fashion-MNIST idx files, CIFAR-10 batches, a config YAML, a DBS
constants file), mutates one file there -- truncated, random bytes, the wrong JSON type at a key,
huge values, deep nesting, YAML aliases and duplicate keys, links, ... -- and runs one ``esdbs``
command on it in a child of the fork server (``fuzz_server.py``).  The command must end, within the
case's time limit, in one of two ways:

(a) exit 0 with a correct result (each command's result is checked: the table parses, the weights
    sum to one, the report and the export are there, ...), unless the mutation is one that must be
    refused (a number no machine can honour, a label outside the classes); or
(b) exit 2 with exactly one stderr line, ``esdbs: error: ...``, naming the mutated file (and the key
    the mutation changed), and the case's directory unchanged (nothing written, nothing left).

Anything else -- an internal error (exit 1), a hang, a second stderr line, a file left behind, a
wrong result -- is a *finding*.  :func:`quick_cases` is a fixed, seeded selection that covers every
file kind and mutation class (``make test``); :func:`random_cases` draws without end (``bench/fuzz.py
--minutes 10``).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy"
SERVER = Path(__file__).resolve().parent / "fuzz_server.py"

TIMEOUT = 30.0  # seconds: a case still running then is a hang (a loaded 2-core machine, not a fast one)
MEMORY_GB = 4.0  # address space a case may add to the server's: an unbounded allocation fails, visibly
HUGE = 1e15  # a number at least this large must be refused wherever a config or flag takes a number


# --------------------------------------------------------------------------------------------------
# the fork server
# --------------------------------------------------------------------------------------------------
class Server:
    """A ``fuzz_server.py`` process: imports esdbs once, forks a child per case."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=str(REPO), env=env)
        hello = self.proc.stdout.readline()
        if not hello.strip():
            raise RuntimeError("the fuzz server did not start")

    def run(self, argv: list[str], cwd: Path, *, env: dict | None = None, timeout: float = TIMEOUT,
            read_only: list[str] = ()) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env or {}, "timeout": timeout,
                                          "memory_gb": MEMORY_GB, "read_only": list(read_only)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# the sandbox every case copies its parts from
# --------------------------------------------------------------------------------------------------
TRAIN = ["train-one", "--model", "alexnet", "--width", "0.125", "--epochs", "1", "--batch-size", "32", "--threads", "1"]
# the committed train-one run's flags (tests/test_legacy_artifacts.py): resuming its finished checkpoint
# trains nothing more
RESUME_ONE = ["train-one", "--model", "all_cnn_c", "--width", "0.125", "--conv", "winograd_relu", "--schedule", "dbs",
              "--epochs", "2", "--sparsity-ladder", "0.3", "--retrain-epochs", "1", "--subset", "600",
              "--test-subset", "300", "--threads", "1", "--resume", "--out", "one"]
CONFIG_YAML = """\
name: fuzz
subset: 600
members: [alexnet, all_cnn_c]
variants: [SWR-CNN+DBS, C-CNN]
variant_overrides: {C-CNN: {dropout: 0.2, l2: 0.01}}
train:
  width: 0.125
  epochs: 2
  sparsity_ladder: [0.3, 0.5]
  retrain_epochs: 1
  dbs: {b0: 64, lr0: 0.05, k: auto, double_every: 2}
  augment: {ops: [hflip], hflip_p: 0.5}
stack: {sparsity: 0.3, methods: [nll_optimal, equal], choose: nll_optimal}
batch_sweep: {batch_sizes: [128], sparsity: 0.3}
resources: {cpus_per_trial: 1, gpus_per_trial: auto}
dbs_search: {num_samples: 4, epochs: 3, grace_period: 1, space: {k: {loguniform: [0.01, 1.0]}, b0: {choice: [64, 128]}}}
tracking: {mlflow: {enabled: false, tags: {team: fuzz}}}
"""
DBS_CONSTANTS = {"constants": {"b0": 64, "lr0": 0.05, "k": 0.5, "v0": 0.4, "double_every": 1, "bmax_cap": 512}}


def _write_idx(path: Path, arr, magic: int) -> None:
    import numpy as np

    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + np.asarray(arr).astype(np.uint8).tobytes(), mtime=0))


def _write_cifar(root: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
                                        b"labels": [int(v) for v in np.arange(12) % 10]})
    _pickle(d / "test_batch", {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                               b"labels": [int(v) for v in np.arange(20) % 10]})
    _pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})


def _pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=4))


def _write_images(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def build_base(root: Path, server: Server) -> Path:
    """Every template a case may copy, under ``root``; the export is the smoke run's, made by esdbs."""
    import numpy as np

    from esdbs_ray.data import FASHION_MNIST_FILES

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(LEGACY / "smoke", root / "smoke")
    shutil.copytree(LEGACY / "one", root / "one")
    _write_images(root / "images")
    fm = root / "fm"
    fm.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("test", 40)):
        _write_idx(fm / (FASHION_MNIST_FILES[f"{split}_images"] + ".gz"), rng.integers(0, 256, (n, 28, 28)), 0x0803)
        _write_idx(fm / (FASHION_MNIST_FILES[f"{split}_labels"] + ".gz"), np.arange(n) % 10, 0x0801)
    _write_cifar(root / "cifar")
    (root / "config.yaml").write_text(CONFIG_YAML)
    (root / "dbs.json").write_text(json.dumps(DBS_CONSTANTS, indent=1))
    r = server.run(["export", "smoke", "--out", "export", "--no-onnx"], root, env={"ESDBS_CACHE": str(root / "cache")})
    if r["rc"] != 0:
        raise RuntimeError(f"the sandbox's export failed: {r['stderr'][-2000:]}")
    shutil.rmtree(root / "smoke" / "report", ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------------------
# commands, and what a correct result is
# --------------------------------------------------------------------------------------------------
def _ok_results(d: Path, r: dict) -> str | None:
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(r["stdout"]))
    except Exception as exc:
        return f"stdout is not CSV ({exc})"
    if list(df.columns[:2]) != ["kind", "group"] or df.empty:
        return "the CSV has no rows or not the table's columns"
    return None


def _ok_stack(d: Path, r: dict, name: str = "stack-out.json") -> str | None:
    files = [d / name] if name else sorted(d.glob("smoke/stack-2*.json"))
    try:
        st = json.loads(files[-1].read_text())
        w = st["ensemble"]["weights"]
        ok = abs(sum(w.values()) - 1) < 1e-6 and all(math.isfinite(v) and v >= 0 for v in w.values())
    except Exception as exc:
        return f"no stacking result ({type(exc).__name__}: {exc})"
    return None if ok else f"stacking weights {w} do not sum to 1"


def _ok_report(d: Path, r: dict, out: str = "report-out") -> str | None:
    for f in ("report.html", "report.md"):
        if not (d / out / f).is_file():
            return f"no {out}/{f}"
    return None


def _ok_export(d: Path, r: dict) -> str | None:
    from esdbs_ray.ensemble import read_manifest

    try:
        read_manifest(d / "export-out")
    except Exception as exc:
        return f"the export does not read back ({exc})"
    return None


def _ok_dry(d: Path, r: dict) -> str | None:
    return None if "trial(s) ->" in r["stdout"] else "no trial table on stdout"


def _ok_predict(d: Path, r: dict) -> str | None:
    import numpy as np
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(d / "pred.parquet")
        p = np.asarray(t["probs"].to_pylist(), dtype=np.float64)
    except Exception as exc:
        return f"no predictions ({type(exc).__name__}: {exc})"
    if not len(p) or not np.all(np.isfinite(p)) or np.abs(p.sum(1) - 1).max() > 1e-4:
        return "the predicted probabilities are not finite rows summing to 1"
    return None


def _ok_train(d: Path, r: dict, out: str = "run-out") -> str | None:
    try:
        s = json.loads((d / out / "summary.json").read_text())
        a = s["test_accuracy"]
    except Exception as exc:
        return f"no summary ({type(exc).__name__}: {exc})"
    return None if isinstance(a, float) and 0 <= a <= 1 else f"test accuracy {a!r}"


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)


def _ok_config(d: Path, r: dict) -> str | None:
    import yaml

    from esdbs_ray.config import PipelineConfig

    try:
        cfg = yaml.safe_load(r["stdout"])
        PipelineConfig.model_validate(cfg)
    except Exception as exc:
        return f"the printed config does not validate ({type(exc).__name__})"
    big = [x for x in _numbers(cfg) if abs(x) >= HUGE or x != x]
    return f"accepted a number no machine can honour ({big[0]!r})" if big else None


def _ok_plan(d: Path, r: dict) -> str | None:
    out = r["stdout"]
    return None if "schedule:" in out and "nan" not in out.lower() else "no plan on stdout"


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    needs: tuple[str, ...]  # templates copied into the case directory
    ok: Callable[[Path, dict], str | None]


COMMANDS = {
    "results": Command(("results", "smoke", "--format", "csv"), ("smoke",), _ok_results),
    "stack": Command(("stack", "smoke", "--output", "stack-out.json"), ("smoke",), _ok_stack),
    "report": Command(("report", "smoke", "--out", "report-out"), ("smoke",), _ok_report),
    "export": Command(("export", "smoke", "--out", "export-out", "--no-onnx"), ("smoke",), _ok_export),
    "resume-dry-run": Command(("run", "--resume", "smoke", "--dry-run"), ("smoke",), _ok_dry),
    "predict": Command(("predict", "export", "images", "--out", "pred.parquet"), ("export", "images"), _ok_predict),
    "predict-fm": Command(("predict", "export", "fashion-mnist:test", "--data-dir", "fm", "--out", "pred.parquet"),
                          ("export", "fm"), _ok_predict),
    "train-fm": Command((*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "fm", "--out", "run-out"), ("fm",),
                        _ok_train),
    "train-images": Command((*TRAIN, "--dataset", "imagefolder:images", "--image-size", "16", "--out", "run-out"),
                            ("images",), _ok_train),
    "train-cifar": Command((*TRAIN, "--dataset", "cifar10", "--data-dir", "cifar", "--subset", "40", "--out",
                            "run-out"), ("cifar",), _ok_train),
    "resume-one": Command(tuple(RESUME_ONE), ("one",), lambda d, r: _ok_train(d, r, "one")),
    "config": Command(("config", "--config", "config.yaml"), ("config.yaml",), _ok_config),
    "dry-run": Command(("run", "--config", "config.yaml", "--dry-run", "--out", "new-run"), ("config.yaml",), _ok_dry),
    "plan": Command(("dbs-plan", "--epochs", "4", "--train-size", "1000", "--dbs-constants", "dbs.json"), ("dbs.json",),
                    _ok_plan),
}


# --------------------------------------------------------------------------------------------------
# mutations
# --------------------------------------------------------------------------------------------------
@dataclass
class Mutation:
    """One change to one file: ``apply(case_dir)``; what the error must name; whether success is wrong."""

    kind: str  # the file kind ("summary.json", "parquet", "config YAML", ...)
    cls: str  # the mutation class ("truncate", "wrong type", "huge", "deep", "alias", "link", ...)
    path: str  # the mutated file, relative to the case directory
    what: str  # the mutation in words
    apply: Callable[[Path], None]
    key: str | None = None  # the key (or column, or flag) it changed
    must_fail: bool = False  # success would be wrong (e.g. a number no machine can honour)
    names: tuple[str, ...] = ()  # the error must name one of these (default: the file's name)


def _readable_key(path: tuple) -> str | None:
    keys = [str(p) for p in path if not isinstance(p, int)]
    return keys[-1] if keys else None


def json_paths(doc, limit: int = 400) -> list[tuple]:
    """Paths to the values of a JSON document (lists: their first two and last items)."""
    out, stack = [], [((), doc)]
    while stack and len(out) < limit:
        path, v = stack.pop()
        if path:
            out.append(path)
        if len(path) >= 7:
            continue
        if isinstance(v, dict):
            stack += [(path + (k,), x) for k, x in reversed(list(v.items()))]
        elif isinstance(v, list):
            idx = sorted({0, 1, len(v) - 1} & set(range(len(v))))
            stack += [(path + (i,), v[i]) for i in reversed(idx)]
    return out


def get_at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def set_at(doc, path, value):
    if not path:
        return value
    get_at(doc, path[:-1])[path[-1]] = value
    return doc


def delete_at(doc, path):
    parent = get_at(doc, path[:-1])
    del parent[path[-1]]
    return doc


WRONG = (None, True, 0, -1, 2.5, "x", "", [], {}, [1, 2], {"x": 1})


def _wrong_for(v, rng: random.Random):
    choices = [w for w in WRONG if type(w) is not type(v)]
    return rng.choice(choices)


def _huge_for(v, rng: random.Random):
    if isinstance(v, bool) or v is None:
        return rng.choice([10 ** 30, 1e308])
    if isinstance(v, (int, float)):
        return rng.choice([10 ** 30, -10 ** 30, 1e308, -1e308, float("nan"), float("inf"), 10 ** 5000])
    if isinstance(v, str):
        return "x" * rng.choice([10 ** 5, 10 ** 6])
    if isinstance(v, list):
        return (v or [1]) * rng.choice([20_000, 100_000])
    return {f"k{i}": i for i in range(50_000)}


def _short(v) -> str:
    """A value in a case's name: huge ones by their size."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10 ** 40:
        return f"a {len(str(abs(v))) if abs(v) < 10 ** 4000 else 'many'}-digit integer"
    if isinstance(v, (str, list, dict)) and len(v) > 40:
        return f"a {type(v).__name__} of {len(v)}"
    return repr(v)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _json_dump(doc) -> str:
    return json.dumps(doc, allow_nan=True, indent=1)


def _dump_with_huge_ints(doc) -> str:
    old = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else None
    try:
        if old is not None:
            sys.set_int_max_str_digits(0)
        return _json_dump(doc)
    finally:
        if old is not None:
            sys.set_int_max_str_digits(old)


# --- byte-level and file-system mutations, for any file -------------------------------------------
def byte_mutations(kind: str, rel: str, rng: random.Random) -> list[Mutation]:
    out = []

    def truncate(d, frac=rng.random()):
        p = d / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * frac)])

    def garbage(d, n=rng.choice([0, 1, 7, 512, 4096]), seed=rng.random()):
        (d / rel).write_bytes(random.Random(seed).randbytes(n))

    def flip(d, seed=rng.random()):
        p = d / rel
        data = bytearray(p.read_bytes())
        r = random.Random(seed)
        for _ in range(max(1, len(data) // 200)):
            if data:
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
        p.write_bytes(bytes(data))

    out += [Mutation(kind, "truncate", rel, "truncated", truncate),
            Mutation(kind, "random bytes", rel, "replaced by random bytes", garbage),
            Mutation(kind, "bit flips", rel, "bits flipped", flip)]
    out += link_mutations(kind, rel)
    return out


def link_mutations(kind: str, rel: str) -> list[Mutation]:
    def dangling(d):
        p = d / rel
        p.unlink()
        p.symlink_to(d / "does-not-exist")

    def loop(d):
        p = d / rel
        p.unlink()
        p.symlink_to(p.name)  # a link to itself: ELOOP

    def directory(d):
        p = d / rel
        p.unlink()
        p.mkdir()

    def fifo(d):
        p = d / rel
        p.unlink()
        os.mkfifo(p)  # opening it for reading would wait for a writer that never comes

    return [Mutation(kind, "link", rel, "a dangling symlink", dangling),
            Mutation(kind, "link", rel, "a symlink loop", loop),
            Mutation(kind, "link", rel, "a directory", directory),
            Mutation(kind, "link", rel, "a named pipe", fifo)]


# --- JSON documents --------------------------------------------------------------------------------
def json_mutations(kind: str, rel: str, doc, rng: random.Random, n: int = 6) -> list[Mutation]:
    """Structure-aware mutations of one JSON document: the wrong type at a key, a deleted key, huge
    values, deep nesting, a wrong top level; plus the byte-level ones."""
    paths = json_paths(doc)
    out = byte_mutations(kind, rel, rng)

    def write(d, new, huge_ints=False):
        (d / rel).write_text(_dump_with_huge_ints(new) if huge_ints else _json_dump(new))

    for path in rng.sample(paths, min(n, len(paths))):
        import copy

        old = get_at(doc, path)
        key = _readable_key(path)
        where = ".".join(map(str, path))
        wrong = _wrong_for(old, rng)
        out.append(Mutation(kind, "wrong type", rel, f"{where} = {_short(wrong)}", key=key,
                            apply=lambda d, p=path, w=wrong: write(d, set_at(copy.deepcopy(doc), p, w))))
        huge = _huge_for(old, rng)
        out.append(Mutation(kind, "huge", rel, f"{where} = {_short(huge)}", key=key,
                            apply=lambda d, p=path, h=huge: write(d, set_at(copy.deepcopy(doc), p, h), True)))
        if isinstance(path[-1], str):
            out.append(Mutation(kind, "missing key", rel, f"{where} deleted", key=key,
                                apply=lambda d, p=path: write(d, delete_at(copy.deepcopy(doc), p))))

        def deep(d, p=path, depth=rng.choice([200, 5000, 100_000])):
            text = _json_dump(set_at(copy.deepcopy(doc), p, "@@DEEP@@"))
            (d / rel).write_text(text.replace('"@@DEEP@@"', _deep(depth)))

        out.append(Mutation(kind, "deep", rel, f"{where} nested {'deep'}", deep, key=key))
    for top in ([], [doc] if isinstance(doc, dict) else {}, 7, "x", None):
        out.append(Mutation(kind, "wrong type", rel, f"the whole document is {json.dumps(top)[:20]}",
                            lambda d, t=top: write(d, t)))
    return out


# --- YAML -------------------------------------------------------------------------------------------
def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def _bomb_value(levels: int = 8) -> str:
    """One YAML flow value whose aliases expand 9**levels-fold."""
    parts = ["&b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def yaml_mutations(kind: str, rel: str, text: str, rng: random.Random, n: int = 5) -> list[Mutation]:
    import copy

    import yaml

    doc = yaml.safe_load(text)
    paths = json_paths(doc)
    out = byte_mutations(kind, rel, rng)

    def write_doc(d, new):
        (d / rel).write_text(yaml.safe_dump(new, sort_keys=False, width=10 ** 9))

    def write_text(d, t):
        (d / rel).write_text(t)

    for path in rng.sample(paths, min(n, len(paths))):
        old = get_at(doc, path)
        key = _readable_key(path)
        where = ".".join(map(str, path))
        wrong = _wrong_for(old, rng)
        out.append(Mutation(kind, "wrong type", rel, f"{where} = {_short(wrong)}", key=key,
                            apply=lambda d, p=path, w=wrong: write_doc(d, set_at(copy.deepcopy(doc), p, w))))
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            big = rng.choice(["1" + "0" * 29, "1e308", ".inf", "-1" + "0" * 29, "9" * 5000])
            out.append(Mutation(kind, "huge", rel, f"{where} = {big[:40]}", key=key, must_fail=True,
                                apply=lambda d, p=path, b=big: write_text(
                                    d, yaml.safe_dump(set_at(copy.deepcopy(doc), p, "@@BIG@@"), sort_keys=False,
                                                      width=10 ** 9).replace("'@@BIG@@'", b))))

        def deep(d, p=path, depth=rng.choice([100, 2000, 50_000])):
            t = yaml.safe_dump(set_at(copy.deepcopy(doc), p, "@@DEEP@@"), sort_keys=False, width=10 ** 9)
            (d / rel).write_text(t.replace("'@@DEEP@@'", _deep(depth)))

        out.append(Mutation(kind, "deep", rel, f"{where} nested deep", deep, key=key))

        def bomb(d, p=path):
            t = yaml.safe_dump(set_at(copy.deepcopy(doc), p, "@@BOMB@@"), sort_keys=False, width=10 ** 9)
            (d / rel).write_text(t.replace("'@@BOMB@@'", _bomb_value()))

        out.append(Mutation(kind, "alias", rel, f"{where} = an alias bomb", bomb, key=key))
        if isinstance(path[-1], str) and len(path) >= 1:
            def dup(d, p=path):
                # JSON is YAML: a flow mapping that names the key twice, the second value valid
                t = json.dumps(doc)
                parent = json.dumps(get_at(doc, p[:-1]))
                k = json.dumps(p[-1])
                twice = "{" + k + ": " + json.dumps(get_at(doc, p)) + ", " + parent[1:]
                (d / rel).write_text(t.replace(parent, twice, 1) if parent in t else t)

            out.append(Mutation(kind, "duplicate key", rel, f"{where} twice", dup, key=key, must_fail=True))
    out += [
        Mutation(kind, "alias", rel, "a billion laughs at the top level", lambda d: write_text(d, _billion_laughs())),
        Mutation(kind, "size", rel, "a 3 MB list", lambda d: write_text(d, text + "\nmembers: [" + ", ".join(
            ["alexnet"] * 400_000) + "]\n")),
        Mutation(kind, "wrong type", rel, "a python object tag", lambda d: write_text(
            d, "name: !!python/object/apply:os.system ['echo pwned']\n")),
        Mutation(kind, "wrong type", rel, "an unhashable key", lambda d: write_text(d, "? [a, b]\n: c\n")),
        Mutation(kind, "wrong type", rel, "a date for a name", lambda d: write_text(d, text + "\nname: 2001-12-14\n")),
        Mutation(kind, "random bytes", rel, "not UTF-8", lambda d: (d / rel).write_bytes(b"name: \xff\xfe\n")),
    ]
    return out


# --------------------------------------------------------------------------------------------------
# file kinds: each with the mutations that fit it and the commands that read it
# --------------------------------------------------------------------------------------------------
@dataclass
class Kind:
    name: str
    commands: tuple[str, ...]
    mutations: Callable[[Path, random.Random], list[Mutation]]  # (base sandbox, rng) -> mutations


def _doc(base: Path, rel: str):
    return json.loads((base / rel).read_text())


def _smoke_json(rel: str, kind: str):
    return lambda base, rng: json_mutations(kind, rel, _doc(base, rel), rng)


# --- Parquet predictions -------------------------------------------------------------------------
def parquet_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = f"smoke/predictions/{rng.choice(['alexnet', 'convpool_cnn_c', 'all_cnn_c'])}-ts{rng.choice(['0000', '0500'])}.parquet"
    kind = "predictions Parquet"
    table = pq.read_table(base / rel)

    def rewrite(d, fn):
        t = fn(table)
        pq.write_table(t, d / rel)

    def col(name, values, typ=None):
        def fn(t):
            i = t.schema.get_field_index(name)
            arr = pa.array(values(t), type=typ) if typ is not None else pa.array(values(t))
            return t.set_column(i, pa.field(name, arr.type), arr)
        return fn

    n = table.num_rows
    c = table.schema.field("probs").type.list_size
    probs = np.asarray(table["probs"].to_pylist(), dtype=np.float32)

    def probs_col(p, size=c):
        return lambda t: t.set_column(t.schema.get_field_index("probs"), "probs",
                                      pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1), pa.float32()), size))

    labels = np.asarray(table["label"])
    out = byte_mutations(kind, rel, rng)
    out += [
        Mutation(kind, "content", rel, "labels + 100", lambda d: rewrite(d, col("label", lambda t: labels + 100)),
                 key="label"),
        Mutation(kind, "content", rel, "labels -1", lambda d: rewrite(d, col("label", lambda t: labels * 0 - 1)),
                 key="label"),
        Mutation(kind, "content", rel, "probs NaN", lambda d: rewrite(d, probs_col(np.full_like(probs, np.nan))),
                 key="probs"),
        Mutation(kind, "content", rel, "probs negative", lambda d: rewrite(d, probs_col(-probs)), key="probs"),
        Mutation(kind, "content", rel, "probs x3", lambda d: rewrite(d, probs_col(probs * 3)), key="probs"),
        Mutation(kind, "content", rel, "one class more", lambda d: rewrite(d, probs_col(
            np.concatenate([probs, np.zeros((n, 1), np.float32)], 1), c + 1)), key="probs"),
        Mutation(kind, "content", rel, "duplicate indices", lambda d: rewrite(d, col("index", lambda t: np.zeros(n, np.int64))),
                 key="index"),
        Mutation(kind, "content", rel, "negative indices", lambda d: rewrite(d, col("index", lambda t: -1 - np.arange(n))),
                 key="index"),
        Mutation(kind, "content", rel, "an unknown split", lambda d: rewrite(d, col("split", lambda t: ["bogus"] * n)),
                 key="split"),
        Mutation(kind, "content", rel, "target sparsity 7", lambda d: rewrite(
            d, col("target_sparsity", lambda t: np.full(n, 7.0, np.float32))), key="target_sparsity"),
        Mutation(kind, "content", rel, "target sparsity NaN", lambda d: rewrite(
            d, col("target_sparsity", lambda t: np.full(n, np.nan, np.float32))), key="target_sparsity"),
        Mutation(kind, "content", rel, "epoch -5", lambda d: rewrite(d, col("epoch", lambda t: np.full(n, -5, np.int32))),
                 key="epoch"),
        Mutation(kind, "content", rel, "no rows", lambda d: rewrite(d, lambda t: t.slice(0, 0))),
        Mutation(kind, "content", rel, "an empty member name", lambda d: rewrite(d, col("member", lambda t: [""] * n)),
                 key="member"),
        Mutation(kind, "wrong type", rel, "labels as text", lambda d: rewrite(
            d, col("label", lambda t: [str(x) for x in labels])), key="label"),
        Mutation(kind, "wrong type", rel, "probs as a plain list", lambda d: rewrite(
            d, lambda t: t.set_column(t.schema.get_field_index("probs"), "probs", pa.array([[1.0]] * n))), key="probs"),
        Mutation(kind, "missing key", rel, "no label column", lambda d: rewrite(d, lambda t: t.drop_columns(["label"])),
                 key="label"),
        Mutation(kind, "wrong type", rel, "metadata not JSON", lambda d: rewrite(
            d, lambda t: t.replace_schema_metadata({b"esdbs_predictions_schema": b"\xff{", b"config": b"[[["}))),
        Mutation(kind, "huge", rel, "schema version 10**30", lambda d: rewrite(
            d, lambda t: t.replace_schema_metadata({**(t.schema.metadata or {}),
                                                    b"esdbs_predictions_schema": b"1" + b"0" * 30}))),
    ]
    return out


# --- torch files: rung weights, the train-one checkpoint -----------------------------------------
def torch_mutations(kind: str, rel: str, base: Path, rng: random.Random) -> list[Mutation]:
    import torch

    obj = torch.load(base / rel, map_location="cpu", weights_only=True)
    out = byte_mutations(kind, rel, rng)

    def rewrite(d, fn):
        import copy

        new = fn(copy.deepcopy(obj))
        torch.save(new, d / rel)

    paths = [p for p in json_paths(_tensor_free(obj), limit=300)]
    for path in rng.sample(paths, min(8, len(paths))):
        old = get_at(obj, path)
        key = _readable_key(path)
        where = ".".join(map(str, path))
        if isinstance(old, torch.Tensor):
            choices = [("a tensor of another shape", lambda t: torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else
                        torch.zeros(3)),
                       ("NaN values", lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t),
                       ("a list", lambda t: [1, 2, 3]),
                       ("an integer tensor", lambda t: torch.ones(t.shape, dtype=torch.int64))]
            what, fn = rng.choice(choices)
            out.append(Mutation(kind, "wrong type", rel, f"{where} = {what}", key=key,
                                apply=lambda d, p=path, f=fn: rewrite(d, lambda o: set_at(o, p, f(get_at(o, p))))))
        else:
            wrong = _wrong_for(old, rng)
            out.append(Mutation(kind, "wrong type", rel, f"{where} = {_short(wrong)}", key=key,
                                apply=lambda d, p=path, w=wrong: rewrite(d, lambda o: set_at(o, p, w))))
            if isinstance(old, (int, float)) and not isinstance(old, bool):
                big = rng.choice([10 ** 12, -10 ** 12, 1e308, float("nan")])
                out.append(Mutation(kind, "huge", rel, f"{where} = {big!r}", key=key,
                                    apply=lambda d, p=path, b=big: rewrite(d, lambda o: set_at(o, p, b))))
        if isinstance(path[-1], str):
            out.append(Mutation(kind, "missing key", rel, f"{where} deleted", key=key,
                                apply=lambda d, p=path: rewrite(d, lambda o: delete_at(o, p))))
    out.append(Mutation(kind, "wrong type", rel, "the whole file is a list", lambda d: torch.save([1, 2], d / rel)))
    out.append(Mutation(kind, "wrong type", rel, "a plain pickle (protocol 4)", lambda d: (d / rel).write_bytes(
        pickle.dumps({"model": 1, "config": [1, 2]}, protocol=4))))
    return out


def _tensor_free(obj):
    """The same structure with tensors as placeholders (paths into a torch object)."""
    import torch

    if isinstance(obj, dict):
        return {k: _tensor_free(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tensor_free(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return 0
    return obj


# --- the export: manifest and safetensors ------------------------------------------------------
def manifest_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    return json_mutations("export manifest", "export/manifest.json", _doc(base, "export/manifest.json"), rng, n=8)


def safetensors_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    """A member's weights changed *and* the manifest's SHA-256 updated to match: the loader itself
    must refuse what it reads."""
    import torch
    from safetensors.torch import load, save

    manifest = _doc(base, "export/manifest.json")
    member = rng.choice(manifest["members"])
    rel = "export/" + member["weights_file"]
    kind = "export safetensors"
    state = load((base / rel).read_bytes())

    def reseal(d):
        m = json.loads((d / "export/manifest.json").read_text())
        h = hashlib.sha256((d / rel).read_bytes()).hexdigest()
        for e in m["members"]:
            if e["name"] == member["name"]:
                e["weights_sha256"] = h
        (d / "export/manifest.json").write_text(json.dumps(m))

    def change(d, fn):
        new = fn(dict(state))
        (d / rel).write_bytes(save(new))
        reseal(d)

    name = rng.choice(sorted(state))
    out = []
    for what, fn, key in (("a tensor of another shape", lambda s: {**s, name: torch.zeros(3)}, name),
                          ("NaN weights", lambda s: {**s, name: torch.full_like(s[name], float("nan"))
                                                     if s[name].is_floating_point() else s[name]}, name),
                          ("a tensor missing", lambda s: {k: v for k, v in s.items() if k != name}, name),
                          ("an extra tensor", lambda s: {**s, "extra.weight": torch.zeros(2)}, "extra.weight")):
        out.append(Mutation(kind, "content", rel, f"{name}: {what}", lambda d, f=fn: change(d, f), key=key))

    def truncated(d):
        p = d / rel
        p.write_bytes(p.read_bytes()[: rng.randrange(1, 200)])
        reseal(d)

    def header(d):
        p = d / rel
        data = p.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        p.write_bytes(struct.pack("<Q", n) + b"{" + data[9:])
        reseal(d)

    out += [Mutation(kind, "truncate", rel, "truncated, hash updated", truncated),
            Mutation(kind, "random bytes", rel, "header not JSON, hash updated", header)]
    return out


# --- images, Fashion-MNIST idx files, CIFAR batches ----------------------------------------------
def image_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    import numpy as np
    from PIL import Image

    cls = rng.choice(["cats", "dogs"])
    rel = f"images/{cls}/{rng.randrange(5)}.png"
    kind = "image file"
    out = byte_mutations(kind, rel, rng)

    def save(d, im, name=rel, **kw):
        im.save(d / name, **kw)

    def bomb(d):
        def chunk(kind_: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind_ + data + struct.pack(">I", zlib.crc32(kind_ + data) & 0xFFFFFFFF)
        ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
        (d / rel).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                              + chunk(b"IEND", b""))

    out += [
        Mutation(kind, "huge", rel, "a PNG declaring 60000x60000 pixels", bomb),
        Mutation(kind, "content", rel, "16-bit greyscale", lambda d: save(d, Image.fromarray(
            np.full((16, 16), 60000, np.uint16)))),
        Mutation(kind, "content", rel, "1x1 pixel", lambda d: save(d, Image.new("RGB", (1, 1)))),
        Mutation(kind, "content", rel, "1x4000 pixels", lambda d: save(d, Image.new("L", (1, 4000)))),
        Mutation(kind, "content", rel, "palette with transparency", lambda d: save(
            d, Image.new("P", (16, 16)), transparency=0)),
        Mutation(kind, "content", rel, "a CMYK JPEG named .png", lambda d: save(d, Image.new("CMYK", (16, 16)),
                                                                                 format="JPEG")),
        Mutation(kind, "content", rel, "an empty file", lambda d: (d / rel).write_bytes(b"")),
    ]
    folder = f"images/{cls}"

    def class_link(d):
        shutil.rmtree(d / folder)
        (d / folder).symlink_to(d / "nowhere")

    def class_loop(d):
        shutil.rmtree(d / folder)
        (d / folder).symlink_to(cls)

    def empty_class(d):
        for p in (d / folder).iterdir():
            p.unlink()

    def nested(d):
        (d / folder / "sub").mkdir()
        shutil.copy(d / rel, d / folder / "sub" / "x.png")

    def stray_file(d):
        (d / "images" / "notes.png").write_bytes(b"not a class")

    out += [Mutation("image folder", "link", folder, "a class folder as a dangling link", class_link, names=(cls,)),
            Mutation("image folder", "link", folder, "a class folder as a link loop", class_loop, names=(cls,)),
            Mutation("image folder", "content", folder, "an empty class folder", empty_class, names=(cls,)),
            Mutation("image folder", "content", folder, "a sub-folder in a class", nested, names=(cls,)),
            Mutation("image folder", "content", "images", "a file beside the class folders", stray_file,
                     names=("notes.png", "images"))]
    return out


def idx_mutations(base: Path, rng: random.Random) -> list[Mutation]:

    from esdbs_ray.data import FASHION_MNIST_FILES

    part = rng.choice(["train", "test"])
    which = rng.choice(["images", "labels"])
    rel = f"fm/{FASHION_MNIST_FILES[f'{part}_{which}']}.gz"
    kind = "Fashion-MNIST idx"
    raw = gzip.decompress((base / rel).read_bytes())
    n = struct.unpack(">I", raw[4:8])[0]
    out = byte_mutations(kind, rel, rng)

    def write_raw(d, data):
        (d / rel).write_bytes(gzip.compress(data, mtime=0))

    out += [
        Mutation(kind, "content", rel, "wrong magic", lambda d: write_raw(d, b"\x00\x00\x08\x07" + raw[4:])),
        Mutation(kind, "huge", rel, "a header promising 4 billion items", lambda d: write_raw(
            d, raw[:4] + struct.pack(">I", 2 ** 32 - 1) + raw[8:])),
        Mutation(kind, "huge", rel, "a gzip bomb (2 GB of zeros)", lambda d: (d / rel).write_bytes(
            _gzip_zeros(raw[:4] + struct.pack(">I", 2 ** 31 - 1) + raw[8:4 + 4 * (raw[3])], 2 * 10 ** 9))),
        Mutation(kind, "content", rel, "no items", lambda d: write_raw(d, raw[:4] + struct.pack(">I", 0)
                                                                      + raw[8:4 + 4 * raw[3]])),
        Mutation(kind, "content", rel, "one item fewer", lambda d: write_raw(
            d, raw[:4] + struct.pack(">I", n - 1) + raw[8:len(raw) - (len(raw) - 4 - 4 * raw[3]) // n])),
        Mutation(kind, "content", rel, "not gzip", lambda d: (d / rel).write_bytes(raw)),
    ]
    if which == "labels":
        out += [Mutation(kind, "content", rel, "a label of 200", lambda d: write_raw(
            d, raw[:-1] + bytes([200])), must_fail=True),
                Mutation(kind, "content", rel, "every label 0", lambda d: write_raw(d, raw[:8] + bytes(n)))]
    else:
        out += [Mutation(kind, "content", rel, "1x1 images", lambda d: write_raw(
            d, raw[:8] + struct.pack(">II", 1, 1) + bytes(n)))]
    return out


def _gzip_zeros(header: bytes, size: int) -> bytes:
    """A gzip stream of ``header`` then ``size`` zero bytes, compressed once and repeated (fast)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(header)]
    block = bytes(1 << 20)
    for _ in range(size // len(block)):
        out.append(c.compress(block))
    out.append(c.flush())
    return b"".join(out)


def cifar_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    import numpy as np

    name = rng.choice(["data_batch_1", "data_batch_3", "test_batch", "batches.meta"])
    rel = f"cifar/cifar-10-batches-py/{name}"
    kind = "CIFAR batch"
    obj = pickle.loads((base / rel).read_bytes())
    out = byte_mutations(kind, rel, rng)

    def write(d, new):
        _pickle(d / rel, new)

    if name == "batches.meta":
        out += [Mutation(kind, "wrong type", rel, "label_names a string", lambda d: write(d, {b"label_names": "cats"}),
                         key="label_names"),
                Mutation(kind, "content", rel, "two class names", lambda d: write(d, {b"label_names": [b"a", b"b"]}),
                         key="label_names", must_fail=True),
                Mutation(kind, "content", rel, "names not UTF-8", lambda d: write(d, {b"label_names": [b"\xff"] * 10}),
                         key="label_names"),
                Mutation(kind, "wrong type", rel, "a list", lambda d: write(d, [1, 2]))]
        return out
    data, labels = obj[b"data"], obj[b"labels"]
    out += [
        Mutation(kind, "content", rel, "a label of 10", lambda d: write(d, {**obj, b"labels": [10] + labels[1:]}),
                 key="labels", must_fail=True),
        Mutation(kind, "content", rel, "a label of -1", lambda d: write(d, {**obj, b"labels": [-1] + labels[1:]}),
                 key="labels", must_fail=True),
        Mutation(kind, "huge", rel, "a label of 2**70", lambda d: write(d, {**obj, b"labels": [2 ** 70] + labels[1:]}),
                 key="labels"),
        Mutation(kind, "wrong type", rel, "labels as text", lambda d: write(d, {**obj, b"labels": "0123"}),
                 key="labels"),
        Mutation(kind, "wrong type", rel, "labels as floats", lambda d: write(d, {**obj, b"labels": [0.5] * len(labels)}),
                 key="labels"),
        Mutation(kind, "content", rel, "one label fewer", lambda d: write(d, {**obj, b"labels": labels[:-1]}),
                 key="labels"),
        Mutation(kind, "content", rel, "pixels of 300", lambda d: write(d, {**obj, b"data": data.astype(np.int64) + 300}),
                 key="data", must_fail=True),
        Mutation(kind, "content", rel, "rows of 3071 values", lambda d: write(d, {**obj, b"data": data[:, :-1]}),
                 key="data"),
        Mutation(kind, "wrong type", rel, "data as text", lambda d: write(d, {**obj, b"data": "pixels"}), key="data"),
        Mutation(kind, "deep", rel, "data nested 100000 deep", lambda d: (d / rel).write_bytes(
            _deep_pickle({**obj, b"data": "@@"}, 100_000)), key="data"),
        Mutation(kind, "missing key", rel, "no labels", lambda d: write(d, {b"data": data}), key="labels"),
    ]
    return out


def _deep_pickle(obj: dict, depth: int) -> bytes:
    """``obj`` pickled with its "@@" value replaced by a list nested ``depth`` deep, written as opcodes
    (pickling such a list would overflow the C stack of this process)."""
    out = [b"\x80\x03}"]
    for k, v in obj.items():
        out.append(pickle.dumps(k, protocol=3)[2:-1])
        out.append(b"(" * depth + b"l" * depth if v == "@@" else pickle.dumps(v, protocol=3)[2:-1])
        out.append(b"s")
    return b"".join(out) + b"."


# --- config YAML, --set values, DBS constants, flags --------------------------------------------
def config_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    return yaml_mutations("config YAML", "config.yaml", (base / "config.yaml").read_text(), rng)


def saved_config_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    return yaml_mutations("saved config.yaml", "smoke/config.yaml", (base / "smoke/config.yaml").read_text(), rng, n=4)


SET_KEYS = ("train.epochs", "train.width", "image_size", "seed", "train.dbs.b0", "train.sparsity_ladder", "members",
            "stack.sparsity", "resources.cpus_per_trial", "train.augment.ops", "tracking.mlflow.tags", "subset",
            "train.expansion.max_width", "dbs_search.num_samples", "batch_sweep.batch_sizes", "train.eval_batch_size",
            "train.dbs.bmax_cap", "train.threads", "train.retrain_epochs", "name")


def set_values(rng: random.Random) -> list[tuple[str, str, str, bool]]:
    """(class, value, what, must_fail) for ``--set KEY=VALUE``."""
    return [("huge", "1" + "0" * 29, "10**29", True), ("huge", "1e308", "1e308", True),
            ("huge", "9" * 5000, "a 5000-digit number", True), ("huge", "100000", "100000", False),
            ("deep", _deep(rng.choice([100, 3000, 100_000])), "nested lists", False),
            ("alias", _bomb_value(), "an alias bomb", False),
            ("size", "[" + ", ".join(["0.5"] * 200_000) + "]", "a 200000-item list", False),
            ("duplicate key", "{a: 1, a: 2}", "a mapping with a duplicate key", True),
            ("wrong type", "!!python/object/apply:os.system [x]", "a python tag", False),
            ("wrong type", "x" * 100_000, "a 100 kB string", False)]


def dbs_constants_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    return json_mutations("DBS constants JSON", "dbs.json", _doc(base, "dbs.json"), rng, n=5)


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    mutation: Mutation | None
    argv: list[str]
    needs: tuple[str, ...]
    ok: Callable[[Path, dict], str | None]
    names: tuple[str, ...]  # the error line must contain one of these
    key: str | None = None  # ... and this, when given
    must_fail: bool = False
    read_only: tuple[str, ...] = ()
    cwd_repo: bool = False  # run in the repository (submit uploads its working directory)
    family: str = ""


KINDS: dict[str, Kind] = {
    "summary.json": Kind("summary.json", ("report", "export", "results"), _smoke_json("smoke/summary.json", "summary.json")),
    "member summary": Kind("member summary", ("report", "export", "results"), lambda b, r: _member_mutations(b, r)),
    "stacking.json": Kind("stacking.json", ("report", "export", "results"), _smoke_json("smoke/stacking.json", "stacking.json")),
    "stack re-run JSON": Kind("stack re-run JSON", ("export", "results"),
                              _smoke_json("smoke/stack-20261206T213340-all-slast.json", "stack re-run JSON")),
    "predictions Parquet": Kind("predictions Parquet", ("stack", "report", "results", "export"), parquet_mutations),
    "rung weights": Kind("rung weights", ("export",), lambda b, r: torch_mutations(
        "rung weights", f"smoke/weights/{r.choice(['alexnet', 'convpool_cnn_c', 'all_cnn_c'])}-ts0500.pt", b, r)),
    "saved config.yaml": Kind("saved config.yaml", ("resume-dry-run", "export", "stack", "results", "report"),
                              saved_config_mutations),
    "checkpoint": Kind("checkpoint", ("resume-one",), lambda b, r: torch_mutations("checkpoint", "one/checkpoint.pt", b, r)),
    "export manifest": Kind("export manifest", ("predict",), manifest_mutations),
    "export safetensors": Kind("export safetensors", ("predict",), safetensors_mutations),
    "image file": Kind("image file", ("predict", "train-images"), image_mutations),
    "Fashion-MNIST idx": Kind("Fashion-MNIST idx", ("train-fm", "predict-fm"), idx_mutations),
    "CIFAR batch": Kind("CIFAR batch", ("train-cifar",), cifar_mutations),
    "config YAML": Kind("config YAML", ("config", "dry-run"), config_mutations),
    "DBS constants JSON": Kind("DBS constants JSON", ("plan",), dbs_constants_mutations),
}


def _member_mutations(base: Path, rng: random.Random) -> list[Mutation]:
    rel = f"smoke/members/{rng.choice(['alexnet', 'convpool_cnn_c', 'all_cnn_c'])}.json"
    return json_mutations("member summary", rel, _doc(base, rel), rng, n=8)


def _case(m: Mutation, command: str, n: int) -> Case:
    c = COMMANDS[command]
    names = m.names or (Path(m.path).name,)
    return Case(id=f"{n:04d} {m.kind}: {m.path}: {m.what} -> {command}", mutation=m, argv=list(c.argv), needs=c.needs,
                ok=c.ok, names=names, key=m.key, must_fail=m.must_fail, family=f"{m.kind}/{m.cls}")


def _set_cases(rng: random.Random, n0: int, count: int) -> list[Case]:
    out = []
    values = set_values(rng)
    # one value of every class first, then random draws: the suite's selection covers every class
    classes = sorted({v[0] for v in values})
    firsts = [rng.choice([v for v in values if v[0] == c]) for c in classes]
    for i in range(max(count, len(firsts))):
        cls, value, what, must_fail = firsts[i] if i < len(firsts) else rng.choice(values)
        key = rng.choice(SET_KEYS)
        argv = ["config", "--preset", "smoke", "--set", f"{key}={value}"]
        must = must_fail and (cls == "duplicate key" or key not in ("name", "members", "train.augment.ops",
                                                                   "tracking.mlflow.tags"))
        out.append(Case(id=f"{n0 + i:04d} --set {key}={what}", mutation=None, argv=argv, needs=(), ok=_ok_config,
                        names=(key, "--set"), must_fail=must, family=f"--set value/{cls}"))
    return out


def _flag_cases(n0: int) -> list[Case]:
    """Numbers given as flags: bounded before any work, refused naming the flag."""
    plan = ["dbs-plan", "--epochs", "4", "--train-size", "1000"]
    rows = [
        (["dbs-plan", "--epochs", "100000000", "--train-size", "1000"], "--epochs"),
        (["dbs-plan", "--epochs", "4", "--train-size", "1"], "--train-size"),
        (["dbs-plan", "--epochs", "4", "--train-size", str(10 ** 30)], "--train-size"),
        (plan + ["--val-accuracy", "2.0"], "--val-accuracy"),
        (plan + ["--val-accuracy", "nan"], "--val-accuracy"),
        (plan + ["--val-size", "0"], "--val-size"),
        (plan + ["--retrain-epochs", "1000000000", "--sparsity-ladder", "0.5"], "--retrain-epochs"),
        (plan + ["--batch-size", str(10 ** 12)], "--batch-size"),
        (plan + ["--lr", "1e308"], "--lr"),
        (plan + ["--sparsity-ladder", ",".join(f"0.{i:06d}" for i in range(1, 20_000))], "--sparsity-ladder"),
        (["stack", "smoke", "--seed", str(10 ** 30)], "--seed"),
        (["stack", "smoke", "--tune-samples", str(10 ** 12)], "--tune-samples"),
        (["predict", "export", "images", "--out", "pred.parquet", "--batch-size", str(10 ** 15)], "--batch-size"),
        (["predict", "export", "images", "--out", "pred.parquet", "--top-k", str(10 ** 15)], "--top-k"),
        (["config", "--preset", "paper-fashion-mnist", "--scale", "1e-300"], "--scale"),
        ([*TRAIN[:6], "1000000000", *TRAIN[7:], "--dataset", "fashion-mnist", "--data-dir", "fm", "--out", "run-out"],
         "--epochs"),
        ([*TRAIN, "--dataset", "imagefolder:images", "--image-size", "100000", "--out", "run-out"], "--image-size"),
        ([*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "fm", "--seed", str(2 ** 70), "--out", "run-out"], "--seed"),
    ]
    needs = {"dbs-plan": (), "stack": ("smoke",), "predict": ("export", "images"), "config": (),
             "train-one": ("images", "fm")}
    return [Case(id=f"{n0 + i:04d} flag {flag}: {' '.join(a[:8])[:80]}", mutation=None, argv=a, needs=needs[a[0]],
                 ok=lambda d, r: None, names=(flag,), must_fail=True, family=f"flags/{a[0]}")
            for i, (a, flag) in enumerate(rows)]


def _submit_cases(n0: int) -> list[Case]:
    """Run arguments a cluster would refuse, refused here before anything is uploaded; the address
    is a closed port, so a case that is not refused locally ends in "cannot reach"."""
    addr = f"http://127.0.0.1:{closed_port()}"
    rows = [
        (["--preset", "nosuch", "--out", "/shared/x"], "--preset"),
        (["--preset", "smoke", "--frobnicate", "--out", "/shared/x"], "--frobnicate"),
        (["--preset", "smoke", "--set", "train.epochz=3", "--out", "/shared/x"], "epochz"),
        (["--preset", "smoke", "--set", "train.epochs=" + "1" + "0" * 29, "--out", "/shared/x"], "train.epochs"),
        (["--preset", "smoke", "--scale", "7", "--out", "/shared/x"], "--scale"),
        (["--resume", "/shared/x", "--preset", "smoke"], "--resume"),
    ]
    out = [Case(id=f"{n0 + i:04d} submit {' '.join(a)}", mutation=None,
                argv=["submit", "--address", addr, "--no-follow", "--", *a], needs=(), ok=lambda d, r: None,
                names=(flag,), must_fail=True, cwd_repo=True, family="submit/run arguments")
           for i, (a, flag) in enumerate(rows)]
    out += [Case(id=f"{n0 + len(rows):04d} submit --timeout -5", mutation=None,
                 argv=["submit", "--address", addr, "--timeout", "-5", "--", "--preset", "smoke", "--out", "/shared/x"],
                 needs=(), ok=lambda d, r: None, names=("--timeout",), must_fail=True, cwd_repo=True,
                 family="submit/flags"),
            Case(id=f"{n0 + len(rows) + 1:04d} submit over plain http to another host", mutation=None,
                 argv=["submit", "--address", "http://192.0.2.1:8265", "--no-follow", "--", "--preset", "smoke",
                       "--out", "/shared/x"], needs=(), ok=lambda d, r: None, names=("--insecure",), must_fail=True,
                 cwd_repo=True, family="submit/plain http")]
    return out


def _special_cases(n0: int) -> list[Case]:
    """Classes that are about a command's behaviour, not one mutated file: read-only experiments, a
    failed start, a directory that holds no experiment."""
    import torch

    out = []
    ro = ("smoke",)
    for cmd, argv, ok, must in (
            ("stack", ["stack", "smoke"], None, True),
            ("report", ["report", "smoke"], None, True),
            ("results", ["results", "smoke", "--format", "csv"], _ok_results, False),
            ("export", ["export", "smoke", "--out", "export-out", "--no-onnx"], _ok_export, False)):
        out.append(Case(id=f"{n0 + len(out):04d} read-only experiment -> {cmd}", mutation=None, argv=argv,
                        needs=("smoke",), ok=ok or (lambda d, r: None), names=("smoke",), must_fail=must, read_only=ro,
                        family="read-only/experiment"))
    for cmd in ("report", "results", "stack", "export"):
        argv = {"report": ["report", "empty-dir", "--out", "report-out"], "results": ["results", "empty-dir"],
                "stack": ["stack", "empty-dir", "--output", "s.json"],
                "export": ["export", "empty-dir", "--out", "e", "--no-onnx"]}[cmd]
        out.append(Case(id=f"{n0 + len(out):04d} a directory that holds no experiment -> {cmd}", mutation=Mutation(
            "experiment directory", "not an experiment", "empty-dir", "an empty directory",
            lambda d: (d / "empty-dir" / "notes").mkdir(parents=True)), argv=argv, needs=(), ok=lambda d, r: None,
            names=("empty-dir",), must_fail=True, family="experiment directory/not an experiment"))
    if not torch.cuda.is_available():  # a start that fails after the output was claimed
        out.append(Case(id=f"{n0 + len(out):04d} train-one --device cuda on a machine without CUDA", mutation=None,
                        argv=[*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "fm", "--device", "cuda", "--out",
                              "run-out"], needs=("fm",), ok=lambda d, r: None, names=("cuda",), must_fail=True,
                        family="failed start/train-one"))
    out.append(Case(id=f"{n0 + len(out):04d} too few images after the split (the image cache)", mutation=Mutation(
        "image folder", "content", "images", "one image per class", _one_image_per_class),
        argv=[*TRAIN, "--dataset", "imagefolder:images", "--image-size", "16", "--out", "run-out"], needs=("images",),
        ok=lambda d, r: None, names=("images",), must_fail=True, family="failed start/image cache"))
    return out


def _one_image_per_class(d: Path) -> None:
    for c in ("cats", "dogs"):
        for p in sorted((d / "images" / c).iterdir())[1:]:
            p.unlink()


# Relative cost of a command's successful run (a refused one is quick): the suite's selection runs
# each kind's mutations through its cheapest reader, and every other reader once.
COST = {"results": 1, "stack": 1, "resume-dry-run": 1, "config": 1, "dry-run": 1, "plan": 1, "report": 3,
        "predict-fm": 3, "train-fm": 3, "train-images": 3, "train-cifar": 3, "predict": 4, "export": 5, "resume-one": 5}


def mutation_cases(base: Path, seed: int, per_class: int | None = None) -> list[Case]:
    """For every file kind: its mutations (drawn with ``seed``).  ``per_class`` None (the long mode):
    every mutation, each through one of the kind's readers in turn; else that many of each mutation
    class, through the kind's cheapest reader, every other reader taking one of them."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for kind in KINDS.values():
        if kind.name == "checkpoint" and not _have_fashion_mnist():
            continue
        muts = kind.mutations(base, rng)
        if per_class is None:
            rng.shuffle(muts)
            for i, m in enumerate(muts):
                cases.append(_case(m, kind.commands[(i + seed) % len(kind.commands)], len(cases)))
            continue
        by_class: dict[tuple[str, str], list[Mutation]] = {}  # a kind's readers also see files of another kind
        for m in muts:
            by_class.setdefault((m.kind, m.cls), []).append(m)
        chosen = []
        for cls in sorted(by_class):
            rng.shuffle(by_class[cls])
            chosen += by_class[cls][:per_class]
        cheapest = min(kind.commands, key=lambda c: COST[c])
        others = [c for c in kind.commands if c != cheapest]
        picks = rng.sample(range(len(chosen)), min(len(others), len(chosen)))
        for i, m in enumerate(chosen):
            command = others[picks.index(i)] if i in picks else cheapest
            cases.append(_case(m, command, len(cases)))
    return cases


def _have_fashion_mnist() -> bool:
    from esdbs_ray.data import fashion_mnist_search_path

    return any((p / "train-images-idx3-ubyte.gz").is_file() or (p / "train-images-idx3-ubyte").is_file()
               for p in fashion_mnist_search_path())


def quick_cases(base: Path, seed: int = 0) -> list[Case]:
    """The suite's selection: every kind x mutation class (one or two each), --set values, flags,
    submit's run arguments, read-only and failed-start cases."""
    cases = mutation_cases(base, seed, per_class=1)
    rng = random.Random(seed + 1)
    cases += _set_cases(rng, len(cases), 12)
    cases += _flag_cases(len(cases))
    cases += _submit_cases(len(cases))
    cases += _special_cases(len(cases))
    return cases


def random_cases(base: Path, seed: int) -> list[Case]:
    """One round of the long mode: every mutation of every kind drawn with ``seed``, and more --set values."""
    cases = mutation_cases(base, seed)
    cases += _set_cases(random.Random(seed), len(cases), 30)
    random.Random(seed).shuffle(cases)
    return cases


# --------------------------------------------------------------------------------------------------
# running and judging a case
# --------------------------------------------------------------------------------------------------
def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class Outcome:
    case: Case
    rc: int | None
    seconds: float
    findings: list[str] = field(default_factory=list)
    line: str = ""


def run_case(server: Server, base: Path, work: Path, case: Case, timeout: float = TIMEOUT, keep: bool = False) -> Outcome:
    d = work / f"case-{case.id.split()[0]}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for need in case.needs:
        src = base / need
        (shutil.copytree(src, d / need, symlinks=True) if src.is_dir() else shutil.copy2(src, d / need))
    if case.mutation is not None:
        case.mutation.apply(d)
    before = tree_hash(d)
    cwd = REPO if case.cwd_repo else d
    res = server.run(case.argv, cwd, env={"ESDBS_CACHE": str(d / "cache")}, timeout=timeout, read_only=[str(d / p) for p in case.read_only])
    out = Outcome(case, res.get("rc"), res.get("seconds", 0.0))
    err_lines = [x for x in res.get("stderr", "").splitlines() if x.strip()]
    n_lines = res.get("stderr_lines", len(err_lines))
    out.line = err_lines[-1][:300] if err_lines else ""
    f = out.findings
    if res.get("error"):
        f.append(f"the fuzz server failed: {res['error']}")
    elif res["timed_out"]:
        f.append(f"hang: still running after {timeout:.0f} s")
    elif res["rc"] == 0:
        if case.must_fail:
            f.append("accepted: exit 0 where the input must be refused")
        else:
            problem = case.ok(d, res)
            if problem:
                f.append(f"exit 0 with a wrong result: {problem}")
    elif res["rc"] == 2:
        if n_lines != 1 or not err_lines[0].startswith("esdbs: error: "):
            f.append(f"exit 2 with {n_lines} stderr lines: " + " | ".join(x[:160] for x in err_lines[:3]))
        elif len(err_lines[0]) > 2000:
            f.append(f"exit 2 with an error line of {len(err_lines[0]):,} characters")
        else:
            line = err_lines[0]
            if not any(n in line for n in case.names):
                f.append(f"the error does not name {' or '.join(case.names)}")
            if case.key and case.key not in line and not case.cwd_repo:
                f.append(f"the error does not name the key {case.key!r}")
            if case.cwd_repo and "cannot reach" in line:
                f.append("not checked here: submitted (or tried to) before refusing")
        if not case.cwd_repo and tree_hash(d) != before:
            f.append("exit 2 but the case's directory changed (something was written or left behind)")
    elif res["rc"] == 1:
        f.append("internal error: " + (err_lines[-1][:200] if err_lines else "(no stderr)"))
    else:
        f.append(f"exit status {res['rc']}: " + (err_lines[-1][:200] if err_lines else ""))
    if not keep and not (f and os.environ.get("ESDBS_FUZZ_KEEP")):
        _rmtree(d)
    return out


def _rmtree(d: Path) -> None:
    def onerror(fn, path, exc):
        try:
            os.chmod(os.path.dirname(path), 0o755)
            os.chmod(path, 0o755)
            fn(path)
        except OSError:
            pass
    shutil.rmtree(d, onerror=onerror)


def summarize(outcomes: list[Outcome]) -> dict:
    fams: dict[str, dict] = {}
    for o in outcomes:
        s = fams.setdefault(o.case.family, {"cases": 0, "findings": 0})
        s["cases"] += 1
        s["findings"] += bool(o.findings)
    return fams
