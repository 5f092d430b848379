"""What the ``esdbs`` sub-commands share: the parser class, argument types, config flags derived from
the typed config, and the pipeline's common options.  Nothing here imports torch or Ray.

**Config flags.**  A sub-command's flags that set config keys (``train-one``'s, ``dbs-plan``'s) are a
table of flag -> (config key, help); the type, the choices and the default come from the pydantic
field, and the values are validated by the model itself, so the CLI repeats no default and no
range.  A value the model refuses is reported naming the flag and the key.
"""
from __future__ import annotations

import argparse
import json
import time
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

from .config import ConfigError
from .errors import UserError

__all__ = ["Parser", "UsageError", "config_flags", "flag_values", "flag_error", "load_dbs_constants",
           "experiment_tree", "add_pipeline_args", "pipeline_config", "default_out", "check_num_cpus",
           "presets_help"]


class UsageError(UserError):
    """A command line argparse refuses."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``esdbs: error:`` line (exit 2) like every other error."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def presets_help() -> str:
    from .presets import PRESETS

    return " | ".join(PRESETS)


# --------------------------------------------------------------------------------------------------
# flags derived from the config's fields
# --------------------------------------------------------------------------------------------------
def _field(model: type, path: str):
    """The pydantic FieldInfo of a dotted key ("dbs.b0") of ``model``."""
    *parents, last = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[last]


def _literal_choices(annotation) -> tuple | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
        inner = typing.get_args(arg)
        if inner and typing.get_origin(inner[0]) is Literal:  # Annotated[Literal[...], ...]
            return typing.get_args(inner[0])
    return None


def _scalar_types(annotation) -> set:
    """The plain types a field's annotation admits (through Optional, Annotated, unions, Literals)."""
    if annotation in (int, float, str, bool):
        return {annotation}
    if typing.get_origin(annotation) is Literal:
        return {type(v) for v in typing.get_args(annotation)}
    out = set()
    for arg in typing.get_args(annotation):
        out |= _scalar_types(arg)
    return out


def _coerce(text: str, annotation):
    """A flag's text as the value the field takes: a number where the field takes numbers (the
    models accept no numeric strings), else the text; the model then validates it."""
    kinds = _scalar_types(annotation)
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def _is_sequence(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    return any(_is_sequence(a) for a in typing.get_args(annotation) if a is not type(None))


def config_flags(parser, model: type, flags: Mapping[str, tuple[str, str]], *, required: tuple[str, ...] = (),
                 show_default: bool = True) -> None:
    """Add ``flags`` (flag -> (key of ``model``, help)) to ``parser``: a list-valued key takes
    comma-separated values; the help names the choices and the default of the field."""
    for flag, (path, text) in flags.items():
        info = _field(model, path)
        choices = _literal_choices(info.annotation)
        extra = []
        if choices and len(choices) <= 8:
            extra.append(" | ".join(map(str, choices)))
        default = info.get_default(call_default_factory=True)
        if show_default and flag not in required and default not in (None, (), []):
            extra.append(f"default {default if not isinstance(default, tuple) else ','.join(map(str, default))}")
        suffix = f" ({'; '.join(extra)})" if extra else ""
        parser.add_argument(flag, dest=_dest(flag), metavar=flag.lstrip("-").upper().replace("-", "_"),
                            default=None, required=flag in required, help=text + suffix)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def flag_values(args, model: type, flags: Mapping[str, tuple[str, str]], base: dict | None = None) -> dict:
    """The nested config dict the given flags set (flags not given are left out: the model's
    defaults apply), laid over ``base``."""
    out = json.loads(json.dumps(base or {}))
    for flag, (path, _) in flags.items():
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        annotation = _field(model, path).annotation
        if _is_sequence(annotation):
            value = [_coerce(v.strip(), annotation) for v in value.split(",") if v.strip()]
        else:
            value = _coerce(value, annotation)
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flag_error(exc: ConfigError, flags: Mapping[str, tuple[str, str]], prefix: str = "", args=None) -> ConfigError:
    """The model's error, led by the flag whose key it names (``--width: width=-1.0: ...``), also when a
    block's own check names it (``dbs: b0=100: ...`` -> ``--batch-size``); with ``args``, only a flag
    that was given (a value from --dbs-constants is not the flag's)."""
    text = str(exc)
    for flag, (path, _) in sorted(flags.items(), key=lambda kv: -len(kv[1][0])):
        if args is not None and getattr(args, _dest(flag), None) is None:
            continue
        key = prefix + path
        parent, _, last = key.rpartition(".")
        heads = (f"{key}=", f"{key}:", f"{key} ") + ((f"{parent}: {last}=", f"{parent}: {last}:") if parent else ())
        if text.startswith(heads):
            return ConfigError(f"{flag}: {text}")
    return exc


# --------------------------------------------------------------------------------------------------
# shared options and inputs
# --------------------------------------------------------------------------------------------------
def load_dbs_constants(path: str) -> dict:
    """A DBS constants file (``esdbs dbs-search``'s ``dbs_constants.json``, or its ``constants``), each
    constant a key of the DBS config with a value it takes: refused naming the file and the key."""
    from pydantic import ValidationError

    from . import storage
    from .config import DBSConfig, field_adapter, format_validation_error

    try:
        d = storage.parse_json(storage.read_local(path, max_bytes=1 << 20), f"--dbs-constants {path}")
    except FileNotFoundError:
        raise ConfigError(f"--dbs-constants {path}: file not found") from None
    except UserError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith("--dbs-constants") else f"--dbs-constants {text}") from None
    constants = d.get("constants", d) if isinstance(d, dict) else None
    if not isinstance(constants, dict):
        raise ConfigError(f"--dbs-constants {path}: expected a JSON object of DBS constants")
    for key, value in constants.items():
        info = DBSConfig.model_fields.get(key)
        if info is None:
            raise ConfigError(f"--dbs-constants {path}: {str(key)[:60]!r} is not a DBS constant; choose from "
                              f"{', '.join(DBSConfig.model_fields)}")
        try:
            field_adapter(DBSConfig, key).validate_python(value)
        except ValidationError as exc:
            raise ConfigError(f"--dbs-constants {path}: {format_validation_error(exc, key)}") from None
    return constants


def experiment_tree(path: str):
    """A readable experiment directory (local or URI), or a one-line error naming it."""
    from . import storage

    try:
        tree = storage.Tree(path)
        ok = tree.is_dir()
    except (ValueError, OSError) as exc:  # pyarrow: an unknown scheme, unreachable storage
        raise ConfigError(f"{path}: cannot open ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not ok:
        raise ConfigError(f"{path}: no such experiment directory")
    return tree


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (applied over the preset)")
    p.add_argument("--preset", default=None, help=f"{presets_help()} (default: quick when no --config)")
    p.add_argument("--out", default=None, help="experiment directory or URI (default: runs/<name>-<time>)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--data-dir", default=None, help="where the dataset files lie (else $ESDBS_DATA, system paths)")
    p.add_argument("--scale", type=float, default=None, help="shrink epochs and training set by this factor (0, 1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.width=0.25 (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="print only the final line (and errors)")
    g.add_argument("--verbose", action="store_true", help="Tune's own trial tables and Ray's notes, instead of "
                   "esdbs's line per member-epoch")


def pipeline_config(args, extra: dict | None = None):
    from .config import build_config

    overrides = dict(extra or {})
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "dbs_constants", None):
        overrides.setdefault("train", {})["dbs"] = load_dbs_constants(args.dbs_constants)
    if getattr(args, "dbs_search", False):
        overrides["run_dbs_search"] = True
    preset = args.preset or (None if args.config else "quick")
    return build_config(preset, args.config, overrides, scale=args.scale, sets=args.set)


def default_out(name: str) -> str:
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_num_cpus(args) -> None:
    if getattr(args, "num_cpus", None) is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus={args.num_cpus}: must be >= 1")


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def any_of(values: Any) -> str:
    return ", ".join(map(str, values))
