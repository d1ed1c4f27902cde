"""``build_detector(cfg)``: the one builder of detectors, used by training, inference, evaluation and benchmarks.

A DINOv3 backbone (frozen unless configured otherwise) -> a neck on the maps it declares (``necks.build_neck``) ->
the configured head from the registry (``heads.HEAD_TYPES``: torchvision RetinaNet / SSD / FCOS). Images reach the
model already resized by ``InputSpec.preprocess``; the model's transform (``transform.DetectionTransform``) only
normalizes and pads, so detections come back in input coordinates and ``model.input_spec.boxes_to_original`` maps
them to the original image.
"""

from __future__ import annotations

import dataclasses
import os

from ..core.errors import UserError
from .backbones import build_backbone
from .config import DetectorConfig
from .detector import DinoDetector, count_parameters
from .heads import HEAD_TYPES
from .necks import build_neck
from .transform import DetectionTransform


def build_detector(cfg: DetectorConfig, weights: str | None = None, verbose: bool = True,
                   repo_dir: str | os.PathLike | None = None) -> DinoDetector:
    """Build the detector ``cfg`` describes on a DINOv3 backbone (``weights``: see ``weight_formats.open_weights``;
    ``repo_dir``: the official DINOv3 clone for ``backbone_impl="hub"``, see ``hub.hub_repo``).

    Prints the reference's two lines (total / trainable parameters) unless ``verbose=False``.
    """
    dino = build_backbone(cfg.model_name, weights=weights, impl=cfg.backbone_impl, fine_tune=cfg.fine_tune,
                          arch_overrides=cfg.arch_overrides, repo_dir=repo_dir)
    head = HEAD_TYPES[cfg.head]
    pyramid = build_neck(dino.output_shape()[cfg.feature_extractor], cfg.feature_extractor, cfg.fpn_channels)
    model = head.build(cfg, dino, pyramid)
    divisible = pyramid.size_multiple
    if cfg.size_multiple is not None and cfg.size_multiple != divisible:
        raise UserError(f"the configuration expects inputs padded to /{cfg.size_multiple}, but {cfg.model_name} "
                        f"({cfg.feature_extractor}) pads to /{divisible}; was the checkpoint written by another version?")
    n_convs, separable = head.tower(cfg)
    # mean/std: the configuration's (a checkpoint's record) or the statistics of the backbone's weight family
    model.config = dataclasses.replace(cfg, mean=cfg.mean or tuple(dino.mean), std=cfg.std or tuple(dino.std),
                                       size_multiple=divisible, head_convs=n_convs, head_separable=separable)
    spec = model.config.input_spec
    model.transform = DetectionTransform(spec.mean, spec.std, spec.size_multiple, spec.imgsz)
    if verbose:
        total, trainable = count_parameters(model)
        print(f"{total:,} total parameters.")
        print(f"{trainable:,} training parameters.")
    return model
