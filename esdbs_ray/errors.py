"""The one exception type for what a user's input caused.

A bad config, data file, checkpoint, artifact, path or flag raises a :class:`UserError` (or one of its
subclasses: ``ConfigError``, ``DataError``, ``OutputError``, ``PredictionsError``, ...) whose message
names the key, file or flag.  ``esdbs`` prints it as one ``esdbs: error:`` line and exits 2; any other
exception is a bug or a failed run: one line with the path of its saved traceback, exit 1.

It is a ``ValueError`` so that code calling the library directly can keep catching bad values the
usual way.  No imports: every module may raise it, the CLI checks it before torch or Ray load.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Input the user can fix; the message names what is wrong and where."""
