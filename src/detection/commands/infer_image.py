"""``infer_det_image.py``: detect objects in images with a trained checkpoint (the body is ``inference.images``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.cli import config_from_args, new_parser
from ..core.errors import run_cli
from ..data.annotations import LABEL_FORMATS
from ..inference.options import add_predictor_args, predict_config_from_args

if TYPE_CHECKING:
    from ..inference.images import ImageInferConfig


def build_image_parser() -> argparse.ArgumentParser:
    parser = new_parser(description="Detect objects in images with a trained checkpoint.")
    g = parser.add_argument_group("input")
    g.add_argument("-i", "--input", required=True, help="image file, folder or glob (quote it)")
    g.add_argument("--recursive", action="store_true", help="also search subfolders of a folder --input")
    add_predictor_args(parser)
    g = parser.add_argument_group("label files (pre-labelling)")
    g.add_argument("--save-labels", "--save-xml", dest="save_labels", action="store_true",
                   help="write the detections >= --threshold as label files under <out-dir>/labels")
    g.add_argument("--save-format", choices=LABEL_FORMATS, default="voc",
                   help="label format: voc (one XML per image), coco (labels/annotations.json), yolo (one .txt per "
                        "image + classes.txt)")
    return parser


def image_config_from_args(args: argparse.Namespace) -> ImageInferConfig:
    from ..inference.images import ImageInferConfig  # after parsing: --help does not load the image pipeline

    return config_from_args(ImageInferConfig, args, predict=predict_config_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = image_config_from_args(build_image_parser().parse_args(argv))
    from ..inference.images import infer_images

    summary = infer_images(cfg)
    return 0 if summary["complete"] else 130  # interrupted: what was done is written, but the run is not complete


def __getattr__(name: str) -> Any:
    """``infer_images`` as a name of this module too, loaded on first use."""
    if name == "infer_images":
        from ..inference.images import infer_images

        return infer_images
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    run_cli(main)
