"""What every command's parser shares: help that shows defaults once, no abbreviations, typed configs, and the
option groups several commands take (``RuntimeOptions``, ``OutputOptions``): each a dataclass that adds its flags
to a parser (``add_to``) and is built back from the parsed namespace (``from_args``), so a flag is defined once.
The model-source group, which names checkpoint claims, lives beside the checkpoint code (``checkpoint.source``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .choices import PRECISIONS
from .errors import UserError
from .paths import increment_path, resolve_path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` unless the help text already says it or
    the default is None or False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # None ("not given") and False (a switch that is off) say nothing a reader needs
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def new_parser(description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the toolkit's conventions: defaults in ``--help``, no prefix abbreviations
    (``--weight`` must never be taken for ``--weight-decay``)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    return argparse.ArgumentParser(description=description, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace | dict[str, Any], **extra: Any):
    """A config dataclass from a parsed namespace (or a dict of option values): the fields present in it (plus
    ``extra``)."""
    names = {f.name for f in fields(cls)}
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return cls(**{k: v for k, v in values.items() if k in names and k not in extra}, **extra)


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


def check_choice(flag: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    """One ``UserError`` line for a value outside ``allowed`` (configs read from files skip argparse's check)."""
    if value not in allowed:
        raise UserError(f"{flag} {value!r} is not valid; choose one of {', '.join(allowed)}")


def check_at_least(flag: str, value: Any, low: int) -> None:
    if value is not None and int(value) < low:
        raise UserError(f"{flag} {value}: must be at least {low}")


@dataclass
class RuntimeOptions:
    """Where and how a model runs: ``--device``, ``--precision``, ``--batch`` (None: the command's own rule) and
    ``--workers`` (data loading processes; None where a command loads no dataset)."""

    device: str = "auto"
    precision: str = "auto"
    batch: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        check_choice("--precision", self.precision, PRECISIONS)
        check_at_least("--batch", self.batch, 1)
        check_at_least("--workers", self.workers, 0)

    @classmethod
    def add_to(cls, parser: Any, *, precision_help: str, batch: int | None, batch_help: str,
               workers: int | None = None, workers_help: str = "data loading processes") -> None:
        """Add the flags to ``parser`` (or an argument group); ``workers=None`` leaves ``--workers`` out."""
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=precision_help)
        parser.add_argument("--batch", type=int, default=batch, help=batch_help)
        if workers is not None:
            parser.add_argument("--workers", type=int, default=workers, help=workers_help)

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict[str, Any], **extra: Any) -> RuntimeOptions:
        return config_from_args(cls, args, **extra)


@dataclass
class OutputOptions:
    """Where a command writes its run folder: ``<--out-dir>/<--name>``, or ``<--out-dir>/<stem>_N`` (the first
    free N) without ``--name``. ``--out-dir`` resolves like every path typed (``core.paths.resolve_path``)."""

    out_dir: str = "outputs"
    name: str | None = None
    exist_ok: bool = False

    @classmethod
    def add_to(cls, parser: Any, *, out_dir: str, out_dir_help: str, name_help: str,
               exist_ok_help: str | None = None) -> None:
        """Add ``--out-dir`` and ``--name`` (and ``--exist-ok`` when it has a help text) to ``parser``."""
        parser.add_argument("--out-dir", default=out_dir, help=out_dir_help)
        parser.add_argument("--name", default=None, help=name_help)
        if exist_ok_help is not None:
            parser.add_argument("--exist-ok", action="store_true", help=exist_ok_help)

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict[str, Any], **extra: Any) -> OutputOptions:
        return config_from_args(cls, args, **extra)

    def run_dir(self, stem: str) -> Path:
        """Create the run folder (only once the work is known to start: no empty folders after errors)."""
        return increment_path(self.out_dir, self.name, stem, exist_ok=self.exist_ok)

    def parent(self) -> Path:
        """The resolved ``--out-dir`` (where run folders are, e.g. for ``--resume`` to look in)."""
        return resolve_path(self.out_dir)
