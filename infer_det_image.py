"""Detect objects in images: ``python infer_det_image.py --input <file|folder|glob> --model best_model.pth``."""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.infer_image import build_image_parser, image_config_from_args, infer_images

    summary = infer_images(image_config_from_args(build_image_parser().parse_args()))
    return 0 if summary["complete"] else 130  # interrupted: what was done is written, but the run is not complete


if __name__ == "__main__":
    run_cli(main)
