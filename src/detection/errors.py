"""One exception type for user mistakes and one CLI wrapper that turns it into a single line."""

from __future__ import annotations

import sys
import warnings
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, wrong checkpoint, ...).

    The message must be one line that names the file (or flag) and says how to fix it.
    CLIs print it as ``error: <message>`` and exit with status 2 - never a traceback.
    """


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI ``main`` and exit: 0 on success, 2 with one line on UserError, 130 on Ctrl-C."""
    # Warnings meant for users (random weights, skipped samples) print as one line, without source excerpts.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"WARNING: {message}\n".replace(
        "WARNING: WARNING: ", "WARNING: ")
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
