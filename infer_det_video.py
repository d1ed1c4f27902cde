"""Detect (and track) objects in a video, camera, stream or folder of frames:
``python infer_det_video.py --input video.mp4 --model best_model.pth [--track --save-json --save-mot]``."""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.infer_video import build_video_parser, infer_video, video_config_from_args

    summary = infer_video(video_config_from_args(build_video_parser().parse_args()))
    return 130 if summary["interrupted"] else 0  # interrupted: what was done is finalized, but the run is not complete


if __name__ == "__main__":
    run_cli(main)
