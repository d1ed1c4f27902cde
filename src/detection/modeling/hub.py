"""``--backbone-impl hub``: the official DINOv3 code, loaded with ``torch.hub`` from a local clone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.paths import load_dotenv_once, resolve_path

CLONE = "https://github.com/facebookresearch/dinov3.git"


def hub_repo(repo_dir: str | os.PathLike | None = None) -> Path:
    """The official clone: ``repo_dir`` (``--repo-dir``), else ``DINOv3_REPO`` from the environment or ``.env``;
    resolved as every user path (``core.paths.resolve_path``) and checked to hold ``hubconf.py``."""
    if repo_dir:
        repo, flag = str(repo_dir), f"--repo-dir {repo_dir}"
    else:
        load_dotenv_once()
        repo = os.environ.get("DINOv3_REPO", "")
        flag = f"DINOv3_REPO={repo}"
        if not repo:
            raise UserError(f"--backbone-impl hub needs the official code: git clone {CLONE} dinov3/dinov3 and set "
                            f"DINOv3_REPO=dinov3/dinov3 in .env or pass --repo-dir (or use --backbone-impl timm)")
    path = resolve_path(repo)
    if not (path / "hubconf.py").is_file():
        raise UserError(f"{flag}: no hubconf.py in {path}; clone {CLONE} there (or use --backbone-impl timm)")
    return path


def build_hub(repo: Path, hub_function: str, overrides: dict[str, Any] | None, weights_path: Path | None
              ) -> nn.Module:
    """The official model ``hub_function`` (official constructor ``overrides``; Meta's ``.pth`` or random weights)."""
    kwargs: dict[str, Any] = dict(overrides or {})
    if weights_path is None:
        kwargs["pretrained"] = False
    else:
        kwargs["weights"] = str(weights_path)
    try:
        return torch.hub.load(str(repo), hub_function, source="local", **kwargs)
    except ModuleNotFoundError as exc:  # the clone's own dependencies are not part of this toolkit's
        missing = exc.name or str(exc)
        raise UserError(f"official DINOv3 code in {repo} needs the Python module {missing!r}, which is not installed; "
                        f"pip install -r {repo / 'requirements.txt'}") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"official DINOv3 code in {repo} could not build {hub_function} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
