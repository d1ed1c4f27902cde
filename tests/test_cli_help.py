"""``--help`` of the training, evaluation and dataset commands: quick (heavy libraries are imported only after
parsing) and readable (no ``(default: None)`` / ``(default: False)``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "cv2", "timm", "matplotlib")

# The training and evaluation parsers take their choices and defaults from modules that import torch at the top
# (modeling.config -> modeling.heads, data.transforms, checkpoint.source, engine.feature_cache): strict xfail until
# those choices live in torch-free modules.
NEEDS_TORCH_FREE_CHOICES = pytest.mark.xfail(strict=True, reason="parser choices still come from torch modules")


def help_run(command: str) -> tuple[str, set[str]]:
    """``command``'s ``main(["--help"])`` in a fresh interpreter: (help text, heavy modules imported by then)."""
    code = (f"import sys\nfrom src.detection.commands.{command} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('IMPORTED', *[m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text, _, imported = out.stdout.rpartition("IMPORTED")
    return text, set(imported.split())


@pytest.mark.parametrize("command", ["analyze", "convert",
                                     pytest.param("train", marks=NEEDS_TORCH_FREE_CHOICES),
                                     pytest.param("evaluate", marks=NEEDS_TORCH_FREE_CHOICES)])
def test_help_imports_no_heavy_library(command):
    text, imported = help_run(command)
    assert "usage:" in text and "--config" in text
    assert imported == set(), f"--help imported {sorted(imported)}"


@pytest.mark.parametrize("command", ["analyze", "convert", "train", "evaluate"])
def test_help_defaults_read_as_words(command, capsys):
    import importlib

    main = importlib.import_module(f"src.detection.commands.{command}").main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(None:" not in text
