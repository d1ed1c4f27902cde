"""Detect objects in a video, camera or stream: ``python infer_det_video.py --input video.mp4 --model best_model.pth``."""

from src.detection.errors import run_cli


def main() -> int:
    from src.detection.video import build_video_parser, infer_video

    infer_video(build_video_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
