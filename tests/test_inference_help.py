"""What ``--help`` of the inference and export commands promises: each command's own meaning of the shared flags,
what the default output folder is called, and that ``--imgsz`` takes one size or two."""

from __future__ import annotations

import re

import pytest

from src.detection.commands.export import build_export_parser
from src.detection.commands.infer_image import build_image_parser
from src.detection.commands.infer_video import build_video_parser
from src.detection.core.errors import UserError
from src.detection.inference.options import predict_config_from_args


def option_help(parser, flag: str) -> str:
    """The help entry of ``flag`` as printed, on one line."""
    text = parser.format_help()
    block = re.search(rf"\n  {re.escape(flag)}\b(.*?)(?=\n  -|\Z)", text, re.S)
    assert block, f"{flag} not in --help"
    return " ".join(block.group(0).split())


def test_video_help_describes_what_the_video_command_does():
    video, image = build_video_parser(), build_image_parser()
    threshold = option_help(video, "--threshold")
    assert "label files" not in threshold and "--save-json" in threshold and "--track" in threshold
    assert "label files" in option_help(image, "--threshold")
    assert "outputs/inference/video_N" in option_help(video, "--out-dir") and "<run>" not in video.format_help()
    assert "outputs/inference/run_N" in option_help(image, "--out-dir")
    assert "--letterbox" in option_help(video, "--keep-aspect")


@pytest.mark.parametrize("build", [build_video_parser, build_image_parser, build_export_parser])
def test_imgsz_says_one_size_or_two(build):
    parser = build()
    entry = option_help(parser, "--imgsz")
    assert entry.startswith("--imgsz SIZE") and "SIZE | W H" in entry and "N [N" not in parser.format_help()


def test_imgsz_with_three_values_is_one_line():
    args = build_video_parser().parse_args(["-i", "v.mp4", "--model", "m.pth", "--imgsz", "640", "480", "320"])
    with pytest.raises(UserError, match="--imgsz.*one size or WIDTH HEIGHT"):
        predict_config_from_args(args)


def test_no_verify_does_not_read_as_verification_off():
    entry = option_help(build_export_parser(), "--no-verify")
    assert "(default: True)" not in entry and "default: it is checked" in entry
