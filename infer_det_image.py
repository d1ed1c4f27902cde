"""Detect objects in images: ``python infer_det_image.py --input <file|folder|glob> --model best_model.pth``."""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.infer_image import main

    return main()


if __name__ == "__main__":
    run_cli(main)
