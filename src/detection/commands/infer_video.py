"""``infer_det_video.py``: detect (and track) objects in a video, camera, stream or folder of frames (the body is
``inference.video``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..core.choices import CODEC_CHOICES
from ..core.cli import config_from_args, new_parser
from ..core.errors import run_cli
from ..inference.options import add_predictor_args, predict_config_from_args

if TYPE_CHECKING:
    from ..inference.video import VideoInferConfig


def build_video_parser() -> argparse.ArgumentParser:
    parser = new_parser(description="Detect (and track) objects in a video, camera, stream or folder of frames.")
    g = parser.add_argument_group("input")
    g.add_argument("-i", "--input", required=True,
                   help="video file, folder of frames (natural name order), camera index (0) or stream URL")
    g.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    g.add_argument("--fps", type=float, default=None,
                   help="frame rate of the input; None = the video's own (30 for folders of frames)")
    add_predictor_args(parser, command="video")
    g = parser.add_argument_group("tracking")
    g.add_argument("--track", action="store_true",
                   help="link detections into tracks (ByteTrack) and draw track IDs; boxes and scores are smoothed")
    g.add_argument("--track-buffer", type=int, default=30,
                   help="frames (at 30 fps) a lost track is remembered so the object gets its ID back")
    g.add_argument("--track-hold", type=int, default=2,
                   help="frames a tracked box is still drawn at its predicted place when its detection is missing")
    g = parser.add_argument_group("per-frame results and video file")
    g.add_argument("--save-json", action="store_true",
                   help="write <out-dir>/<name>.jsonl: one line per frame (index, time, boxes, scores, classes, IDs)")
    g.add_argument("--save-mot", action="store_true",
                   help="write <out-dir>/<name>.mot.txt in MOTChallenge format (frame,id,x,y,w,h,score,-1,-1,-1)")
    g.add_argument("--codec", choices=CODEC_CHOICES, default="auto",
                   help="auto: H.264 yuv420p mp4 (VP9 for odd frame sizes, exact size kept); opencv: OpenCV's writer")
    return parser


def video_config_from_args(args: argparse.Namespace) -> VideoInferConfig:
    from ..inference.video import VideoInferConfig  # after parsing: --help does not load OpenCV

    return config_from_args(VideoInferConfig, args, predict=predict_config_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = video_config_from_args(build_video_parser().parse_args(argv))
    from ..inference.video import infer_video

    summary = infer_video(cfg)
    return 130 if summary["interrupted"] else 0  # interrupted: what was done is finalized, but the run is not complete


if __name__ == "__main__":
    run_cli(main)
