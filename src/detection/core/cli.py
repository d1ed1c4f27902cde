"""What every command's parser shares: help that shows defaults once, no abbreviations, typed configs."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from .errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def new_parser(description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the toolkit's conventions: defaults in ``--help``, no prefix abbreviations
    (``--weight`` must never be taken for ``--weight-decay``)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    return argparse.ArgumentParser(description=description, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """A config dataclass from a parsed namespace: the fields present in it (plus ``extra``)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def parse_imgsz(values: list[int] | tuple[int, ...] | int) -> tuple[int, int]:
    """``--imgsz 640`` or ``--imgsz 640 480`` -> (width, height)."""
    if isinstance(values, int):
        values = [values]
    values = list(values)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 32:
        raise UserError(f"--imgsz {values}: give one size or WIDTH HEIGHT, each at least 32")
    return int(values[0]), int(values[1])
