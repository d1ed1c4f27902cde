"""The choices and defaults the command-line parsers offer, in a module that imports nothing heavy: ``--help`` and a
mistyped flag are answered before torch, OpenCV or timm load. The modules that implement each choice import it from
here (tests/test_cli_help.py checks every registry against its tuple).
"""

from __future__ import annotations

from .errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # core.runtime's precision rules

HEADS = ("retinanet", "ssd", "fcos")  # modeling.heads.HEAD_TYPES, in its order
FEATURE_EXTRACTORS = ("multi", "last")  # the output maps modeling.entrypoints declares
BACKBONE_IMPLS = ("timm", "hub")

PRESETS = ("none", "flip", "ssd", "strong")  # data.transforms.build_transform's augmentation presets
DEFAULT_AUGMENT = "flip"

METRICS = ("coco", "voc07", "voc12", "all")  # evaluation.metrics.DetectionEvaluator

CODEC_CHOICES = ("auto", "h264", "vp9", "opencv")  # data.video_io.open_writer

EXPORT_FORMATS = ("onnx",)  # inference.export
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.14 runs it
MIN_OPSET, MAX_OPSET = 14, 20  # 20: the TorchScript exporter's newest

# Augmentations whose backbone features engine.feature_cache can store: none, or a flip it stores both ways.
CACHEABLE_AUGMENTS = ("none", "flip")


def check_cacheable(augment: str, trains_backbone: bool) -> None:
    """UserError unless ``--cache-features`` can work: a frozen backbone and a cacheable augmentation."""
    if trains_backbone:
        raise UserError("--cache-features needs a frozen backbone; drop --cache-features, or --fine-tune / "
                        "--unfreeze-last (the backbone's features change while it trains)")
    if augment not in CACHEABLE_AUGMENTS:
        raise UserError(f"--cache-features works with --augment none or flip (got {augment!r}): other augmentations "
                        f"change the image every epoch, so its features cannot be reused")
