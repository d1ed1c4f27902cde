"""The model-source option group: which checkpoint a command loads and what the user says about the model.

Every command that loads a checkpoint (evaluate, both inference commands, export, training's ``--eval-only``) takes
the same flags with the same meaning: ``--model`` and ``--imgsz``, plus the claims ``--model-name``, ``--config``
(its classes), ``--head``, ``--feature-extractor`` and ``--weights``. Claims are checked against this toolkit's
checkpoints and describe reference-project ones, which record nothing (``build.prepare_checkpoint``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..core.choices import FEATURE_EXTRACTORS, HEADS
from ..core.cli import config_from_args, parse_imgsz


@dataclass
class ModelSource:
    """A checkpoint path and the claims about its model (None: not claimed, the checkpoint's own is used).

    ``backbone_impl`` / ``arch_overrides`` have no flags here: training's ``--eval-only`` hands over its own
    ``--backbone-impl`` and ``--cfg`` architecture for reference-project checkpoints.
    """

    model: str | None = None
    model_name: str | None = None
    head: str | None = None
    feature_extractor: str | None = None
    weights: str | None = None
    imgsz: tuple[int, int] | None = None
    config: str | None = None  # a dataset YAML whose classes are claimed
    backbone_impl: str | None = None
    arch_overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.imgsz is not None:
            self.imgsz = parse_imgsz(self.imgsz)

    def expect(self, classes: list[str] | None = None) -> dict[str, Any]:
        """The claims as ``prepare_checkpoint``'s ``expect``; ``classes`` (``__background__`` first) replaces
        those of ``config``, which is read without its data folders."""
        if classes is None and self.config:
            from ..data.datasets import load_config_classes

            classes = load_config_classes(self.config)
        return {"model_name": self.model_name, "head": self.head, "feature_extractor": self.feature_extractor,
                "classes": classes, "backbone_impl": self.backbone_impl, "arch_overrides": self.arch_overrides}

    # ------------------------------------------------------------------ flags
    @classmethod
    def add_to(cls, parser: Any, *, model_help: str | None, required: bool = True, config: bool = True) -> None:
        """``--model`` (unless ``model_help`` is None: the command adds it itself), ``--imgsz`` and the claims;
        ``config=False`` for commands whose ``--config`` is their dataset."""
        if model_help is not None:
            parser.add_argument("--model", required=required, help=model_help)
        parser.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="SIZE",
                            help="model input size: SIZE | W H (one value: square; two at most); default: the "
                                 "checkpoint's (reference checkpoints: 640)")
        cls.add_claims_to(parser, config=config)

    @staticmethod
    def add_claims_to(parser: Any, config: bool = True) -> None:
        """The claim flags alone (a command that takes no ``--imgsz``, e.g. export)."""
        parser.add_argument("--model-name", default=None,
                            help="backbone name; checked against the checkpoint, required for reference-project ones")
        if config:
            parser.add_argument("--config", default=None,
                                help="dataset YAML (any form train_detection.py takes; its image folders need not "
                                     "exist): its classes are checked against the checkpoint; required for "
                                     "reference-project ones")
        parser.add_argument("--head", default=None, help=f"{' | '.join(HEADS)}; checked against the checkpoint")
        parser.add_argument("--feature-extractor", default=None,
                            help=f"{' | '.join(FEATURE_EXTRACTORS)}; checked against the checkpoint")
        parser.add_argument("--weights", default=None,
                            help="backbone weights; only needed for checkpoints saved without the backbone")

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict[str, Any], **extra: Any) -> ModelSource:
        return config_from_args(cls, args, **extra)
