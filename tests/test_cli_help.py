"""``--help`` of every command: quick (heavy libraries are imported only after parsing) and readable (no
``(default: None)`` / ``(default: False)``); the parsers' choices (``core.choices``) match the registries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "cv2", "timm", "matplotlib"}
# The documented spelling of each command.
ENTRY = {
    "train": ["train_detection.py"],
    "evaluate": ["-m", "src.detection.evaluate"],
    "infer_image": ["infer_det_image.py"],
    "infer_video": ["infer_det_video.py"],
    "export": ["-m", "src.detection.export"],
    "analyze": ["-m", "src.detection.analyze"],
    "convert": ["-m", "src.detection.convert"],
    "synthetic": ["-m", "src.detection.synthetic"],
}


def help_run(command: str) -> tuple[str, set[str]]:
    """``command --help`` as a user types it: (help text, heavy top-level packages it imported, from
    ``-X importtime``'s list of every module imported)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *ENTRY[command], "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    return out.stdout, imported & HEAVY


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "analyze", "convert", "synthetic", "infer_image",
                                     "infer_video"])
def test_help_imports_no_heavy_library(command):
    text, imported = help_run(command)
    assert text.startswith("usage:") and "--help" in text
    assert imported == set(), f"--help imported {sorted(imported)}"


def test_help_run_sees_heavy_imports():
    """The check above can fail: a command that loads torch before parsing is caught."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True,
                         timeout=120)
    assert any(line.rpartition("|")[2].strip() == "torch" for line in out.stderr.splitlines())


def test_parser_choices_match_the_registries():
    from src.detection.core import choices
    from src.detection.data.transforms import build_transform
    from src.detection.engine.feature_cache import forced_flip
    from src.detection.modeling.entrypoints import ENTRYPOINTS, FAMILIES, merge_arch
    from src.detection.modeling.heads import HEAD_TYPES

    assert tuple(HEAD_TYPES) == choices.HEADS
    for family in ("vit", "convnext"):
        name, entry = next((n, e) for n, e in ENTRYPOINTS.items() if e["family"] == family)
        assert set(FAMILIES[family].output_shape(merge_arch(name, entry, None))) == set(choices.FEATURE_EXTRACTORS)
    # a preset is cacheable exactly when the feature cache can fix its randomness (a flip or nothing)
    for preset in choices.PRESETS:
        transform = build_transform(preset, (64, 64), train=True)
        try:
            forced_flip(transform, preset == "flip")
            cacheable = True
        except ValueError:
            cacheable = False
        assert cacheable == (preset in choices.CACHEABLE_AUGMENTS), preset


@pytest.mark.parametrize("command", ["analyze", "convert", "train", "evaluate", "export"])
def test_help_defaults_read_as_words(command, capsys):
    import importlib

    main = importlib.import_module(f"src.detection.commands.{command}").main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(None:" not in text
