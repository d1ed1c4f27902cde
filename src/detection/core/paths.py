"""The one rule for paths a user types, and run folders.

Every path on a command line (inputs and output folders alike) resolves the same way: an absolute path as is; a
relative one against the working directory when it exists there (as every shell tool does), else against the
repository when it exists there (bundled configs such as ``detection_configs/voc.yaml``, the default ``outputs/``),
else against the working directory. Paths *inside* a dataset config are relative to that config file instead
(``config_relative_candidates``), falling back to the repository for configs written for the reference project.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_path(path: str | os.PathLike) -> Path:
    """A user-given path (see the module docstring): absolute, or relative to the working directory or repository."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists() or not (REPO_ROOT / p).exists():
        return p.absolute()
    return REPO_ROOT / p


def config_relative_candidates(base: Path, value: str | os.PathLike) -> list[Path]:
    """Where a path written inside a config file may be: as is when absolute, else beside the config (``base``),
    then in the repository."""
    p = Path(value).expanduser()
    return [p] if p.is_absolute() else [base / p, REPO_ROOT / p]


def load_dotenv_once() -> None:
    """Load ``<repo>/.env`` (DINOv3_REPO, DINOv3_WEIGHTS) without overriding the real environment."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is in requirements.txt
        return
    load_dotenv(REPO_ROOT / ".env", override=False)


def increment_path(parent: str | os.PathLike, name: str | None, default_stem: str, exist_ok: bool = False) -> Path:
    """A run folder under ``parent`` (resolved by :func:`resolve_path`): ``name`` if given, else ``<stem>_1``,
    ``<stem>_2``, ... (first free)."""
    parent = resolve_path(parent)
    if name:
        path = parent / name
        if path.exists() and not exist_ok and any(path.iterdir()):
            raise UserError(f"run folder {path} already exists; pick another --name or pass --exist-ok")
        path.mkdir(parents=True, exist_ok=True)
        return path
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(default_stem)}_(\d+)$")
    used = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.match(p.name))]
    n = max(used, default=0) + 1
    path = parent / f"{default_stem}_{n}"
    path.mkdir(parents=True, exist_ok=False)
    return path
