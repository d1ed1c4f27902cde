"""Train a detector on a frozen DINOv3 backbone: ``python train_detection.py --help`` (``src/detection/commands/train.py``)."""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.train import main

    return main()


if __name__ == "__main__":
    run_cli(main)
