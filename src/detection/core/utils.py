"""Small shared helpers: repository paths, YAML files, run folders, seeding, image sizes."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[3]


def load_dotenv_once() -> None:
    """Load ``<repo>/.env`` (DINOv3_REPO, DINOv3_WEIGHTS) without overriding the real environment."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is in requirements.txt
        return
    load_dotenv(REPO_ROOT / ".env", override=False)


def resolve_repo_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay; relative ones are taken relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def resolve_path(path: str | os.PathLike) -> Path:
    """A user-given path: absolute as is; relative to the working directory when it exists there (as every shell
    tool does), else to the repository root (bundled configs such as ``detection_configs/voc.yaml``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p.absolute() if not p.is_absolute() else p
    return REPO_ROOT / p


def read_yaml(path: str | os.PathLike, flag: str, hint: str, expected: str = "a mapping of KEY: value") -> dict:
    """The mapping in the YAML file ``path`` (given as ``flag``; resolved by :func:`resolve_path`).

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


def increment_path(parent: str | os.PathLike, name: str | None, default_stem: str, exist_ok: bool = False) -> Path:
    """A run folder under ``parent``: ``name`` if given, else ``<stem>_1``, ``<stem>_2``, ... (first free)."""
    parent = resolve_repo_path(parent)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
