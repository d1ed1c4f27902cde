"""One exception type for user mistakes, one CLI wrapper that turns it into a single line, and SIGTERM taken as
Ctrl-C inside that wrapper."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn


class ToolkitWarning(UserWarning):
    """Warnings meant for the person at the shell (random weights, skipped samples): CLIs print them as one line."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, wrong checkpoint, ...).

    The message must be one line that names the file (or flag) and says how to fix it.
    CLIs print it as ``error: <message>`` and exit with status 2 - never a traceback.
    """


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI ``main`` and exit: 0 on success, 2 with one line on UserError, 130 on Ctrl-C or SIGTERM.

    ToolkitWarnings print as one ``WARNING:`` line while ``main`` runs."""
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One ``WARNING: ...`` line for ToolkitWarnings (no source excerpt); Python's display for the rest. Written
    through ``tqdm.write``, which lifts any progress bar on the stream first, so a warning never lands on the bar."""
    from tqdm import tqdm

    if issubclass(category, ToolkitWarning):
        text = str(message)
        text = text if text.startswith("WARNING: ") else f"WARNING: {text}"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
    tqdm.write(text, file=file or sys.stderr)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM (what ``kill`` and job schedulers send) raises KeyboardInterrupt in the main thread,
    so a command stops as on Ctrl-C: it writes what is done and says how to continue. Elsewhere than the main
    thread (signals cannot be handled there) it does nothing; forked children (data loader workers) that inherit
    the handler end at once, as they would without it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
