"""Detect (and track) objects in a video, camera, stream or folder of frames:
``python infer_det_video.py --input video.mp4 --model best_model.pth [--track --save-json --save-mot]``."""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.infer_video import main

    return main()


if __name__ == "__main__":
    run_cli(main)
