"""The ``esdbs`` command line: one sub-command per stage of the method.

    esdbs run         the whole method on Ray Tune: base members -> stacking (-> DBS search)
    esdbs train-one   train one CNN (spatial, Winograd-ReLU or random-basis BasisConv convs, fixed batch or
                      DBS, with a pruning ladder or a BasisConv eigen ladder)
    esdbs dbs-plan    preview the learning rate / momentum / batch size schedule a run would follow
    esdbs stack       search stacking weights on an experiment's Parquet predictions
    esdbs dbs-search  Tune experiment over the DBS constants
    esdbs report      report.md / report.html: our numbers beside the paper's
    esdbs results     one tidy table of every trial, rung and ensemble (table, CSV or Parquet)
    esdbs export      the trained ensemble as one directory: manifest, safetensors weights, ONNX graphs
    esdbs predict     an exported ensemble's probabilities for image files, folders or a dataset split
    esdbs config      print the resolved config, or its JSON Schema
    esdbs submit      submit ``esdbs run`` to a Ray cluster as a Ray Job

Config is validated here, once, into frozen pydantic models (``config.py``) before anything is written
or Ray starts.  Every error a user can cause ends as one ``esdbs: error: ...`` line and exit status 2;
an internal error prints one line with the path of its saved traceback (``ESDBS_DEBUG=1`` prints it
whole) and exits 1.  Outputs go only to new directories or to ones esdbs made for the same purpose;
``--force`` is the only way to replace (``layout.py``).
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback

from . import cli_results, cli_train
from .cli_common import Parser

# the sub-commands, in the order ``esdbs --help`` lists them
_ORDER = ("run", "train-one", "dbs-plan", "stack", "dbs-search", "report", "results", "export", "predict", "config",
          "submit")


def build_parser() -> Parser:
    from . import __version__

    parser = Parser(prog="esdbs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"esdbs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    adders = {**cli_train.COMMANDS, **cli_results.COMMANDS}
    for name in _ORDER:
        adders[name](sub)
    return parser


# --------------------------------------------------------------------------------------------------
# main: one line per error
# --------------------------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user's input causes: :class:`~esdbs_ray.errors.UserError` (bad config, data,
    checkpoint, artifact, path, flag) and the file-system errors of a path the user named."""
    from .errors import UserError

    return (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


MAX_ERROR_CHARS = 1000  # the whole line stays well under 2,000 characters


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    text = " ".join(text.split())
    # a value quoted from a hostile file can be megabytes long: the line keeps its head, which names
    # the file and the key, and says how much was cut
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]} ... ({len(text) - MAX_ERROR_CHARS:,} characters more)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the usage and the command list, as --help gives them
        build_parser().print_help()
        return 2
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help, or argparse's own exit
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("esdbs: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"esdbs: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or the run itself failing: one line, the traceback kept in a file
        from .pipeline import RunFailed, RunInterrupted

        if isinstance(exc, RunInterrupted):  # a stop signal: the trials' state is saved, say how to go on
            print(f"esdbs: {exc}", file=sys.stderr)
            return 130

        if os.environ.get("ESDBS_DEBUG") == "1":
            traceback.print_exc()
            return 1
        fd, path = tempfile.mkstemp(prefix="esdbs-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        kind = "run failed" if isinstance(exc, RunFailed) else f"internal error ({exc.__class__.__name__})"
        print(f"esdbs: {kind}: {_one_line(exc)} (traceback: {path}; ESDBS_DEBUG=1 prints it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
