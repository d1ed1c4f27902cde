"""One exception type for user mistakes and one CLI wrapper that turns it into a single line."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn


class ToolkitWarning(UserWarning):
    """Warnings meant for the person at the shell (random weights, skipped samples): CLIs print them as one line."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, wrong checkpoint, ...).

    The message must be one line that names the file (or flag) and says how to fix it.
    CLIs print it as ``error: <message>`` and exit with status 2 - never a traceback.
    """


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI ``main`` and exit: 0 on success, 2 with one line on UserError, 130 on Ctrl-C.

    ToolkitWarnings print as one ``WARNING:`` line while ``main`` runs."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored on exit: library users keep Python's default display
            code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` & co. closed early: not an error of ours
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - silences the interpreter's flush at exit
        sys.exit(0)
    sys.exit(int(code or 0))


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One ``WARNING: ...`` line for ToolkitWarnings (no source excerpt); Python's display for the rest."""
    if issubclass(category, ToolkitWarning):
        text = str(message)
        print(text if text.startswith("WARNING: ") else f"WARNING: {text}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)
