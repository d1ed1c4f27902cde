"""File IO every part shares: one atomic write (checkpoints, exports, CSV, YAML) and one YAML reader."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from .errors import UserError
from .paths import resolve_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed, fsynced and moved onto
    ``path`` in one ``os.replace``. On any exception the temporary file is removed and an existing ``path`` is left
    untouched. The file gets the permissions a plain ``open`` would give (``mkstemp`` creates 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths`` for writers that need a file name (ONNX, a library's ``save``);
    all are moved into place together when the block ends cleanly, and removed on any exception."""
    finals = [Path(p) for p in paths]
    temps = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, final in zip(temps, finals):
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """Write a matplotlib figure atomically (format from the suffix) and close it: the one place plots are saved."""
    import matplotlib.pyplot as plt  # here: core imports no plotting library at start-up

    path = Path(path)
    try:
        with atomic_paths(path) as (tmp,):
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    finally:
        plt.close(fig)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def read_yaml(path: str | os.PathLike, flag: str, hint: str, expected: str = "a mapping of KEY: value") -> dict:
    """The mapping in the YAML file ``path`` (given as ``flag``; resolved by ``paths.resolve_path``).

    Every problem is one UserError line naming the flag and file: not found (``hint`` says what to pass), not UTF-8,
    not valid YAML (with the line of the problem), or not ``expected`` (a mapping).
    """
    p = resolve_path(path)
    if not p.is_file():
        what = "a folder, not a YAML file" if p.is_dir() else "file not found"
        raise UserError(f"{flag} {path}: {what}; {hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {p}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{flag} {p}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{flag} {p}: not valid YAML ({problem}{where}); fix the syntax") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise UserError(f"{flag} {p}: expected {expected}, got {got}")
    return data
