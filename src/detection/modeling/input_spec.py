"""The input specification: how an image becomes model input and how boxes go back to the original image."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from torch import Tensor

from ..core.cli import parse_imgsz
from ..core.errors import UserError
from ..data.transforms import boxes_to_original as _boxes_to_original
from ..data.transforms import letterbox_size, resize_image

# The LVD-1689M (ImageNet) statistics: what a config that names no weights family normalizes with.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes model input and how boxes come back: the one description shared by training-time
    evaluation, ``evaluate``, both inference commands and checkpoints (``meta["input"]``).

    * ``imgsz`` (W, H): every image is resized to it, stretched or (``letterbox``) aspect-preserving with grey
      padding at the bottom/right (``transforms.ResizeTo``, the same op the validation loader uses);
    * ``size_multiple``: the model zero-pads its input to a multiple of this (16 for ViT ``last``, 32 for ConvNeXt
      and for the pyramids) - read from the built backbone, never assumed;
    * ``mean``/``std``: the normalization the model applies (per backbone weight family: LVD-1689M or SAT-493M);
    * ``fixed_aspect``: SSD default boxes are fractions of the input tensor, so such a model must always see
      inputs of the training aspect ratio (no ``keep_aspect``, no ``--imgsz`` of another shape).
    """

    imgsz: tuple[int, int]
    letterbox: bool = False
    size_multiple: int = 32
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    fixed_aspect: bool = False

    def __post_init__(self) -> None:
        set_ = partial(object.__setattr__, self)  # frozen: normalise the types once, here
        set_("imgsz", parse_imgsz(self.imgsz))
        set_("letterbox", bool(self.letterbox))
        set_("size_multiple", int(self.size_multiple))
        set_("mean", tuple(float(v) for v in self.mean))
        set_("std", tuple(float(v) for v in self.std))
        set_("fixed_aspect", bool(self.fixed_aspect))
        if self.size_multiple < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"invalid input spec {self}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain lists / numbers (``weights_only``- and YAML-safe)."""
        return {"imgsz": list(self.imgsz), "letterbox": self.letterbox, "size_multiple": self.size_multiple,
                "mean": list(self.mean), "std": list(self.std), "fixed_aspect": self.fixed_aspect}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> InputSpec:
        """A copy with ``changes`` (None values ignored, so optional CLI overrides pass straight through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_imgsz(self, imgsz: Sequence[int] | int | None, flag: str = "--imgsz") -> InputSpec:
        """The spec at another input size; a fixed-aspect (SSD) model only accepts the training aspect ratio."""
        if imgsz is None:
            return self
        w, h = parse_imgsz(imgsz)
        W, H = self.imgsz
        if self.fixed_aspect and abs(w * H - h * W) > 0.01 * W * H:
            raise UserError(f"{flag} {w} {h}: this SSD model was trained at {W}x{H} and its default boxes are "
                            f"fractions of the input, so the input must keep the aspect ratio {W}:{H} "
                            f"(e.g. {flag} {2 * W} {2 * H}); or drop {flag}")
        return self.replace(imgsz=(w, h))

    # ------------------------------------------------------------------ geometry
    def input_size(self, orig_hw: Sequence[int], keep_aspect: bool = False) -> tuple[int, int]:
        """(W, H) of the model input for an image of original size (H, W).

        ``keep_aspect`` (inference speed option): the letterbox content at the letterbox scale
        ``min(W / w0, H / h0)``, with the padding cut down to the next multiple of ``size_multiple`` instead of
        ``imgsz`` - same scale as a letterbox-trained model saw, less padding to compute.
        """
        if not keep_aspect:
            return self.imgsz
        self.check_keep_aspect()
        h, w = letterbox_size(orig_hw, self.imgsz)
        m = self.size_multiple
        W, H = self.imgsz
        return min(math.ceil(w / m) * m, math.ceil(W / m) * m), min(math.ceil(h / m) * m, math.ceil(H / m) * m)

    def preprocess(self, image: Tensor, keep_aspect: bool = False) -> Tensor:
        """Original uint8 [3,H,W] (or a batch of equal sizes) -> uint8 model input (normalization is the model's)."""
        if not keep_aspect:
            return resize_image(image, self.imgsz, self.letterbox)
        return resize_image(image, self.imgsz, letterbox=True, canvas=self.input_size(image.shape[-2:], True))

    def boxes_to_original(self, boxes: Tensor, orig_hw: Sequence[int], keep_aspect: bool = False) -> Tensor:
        """xyxy boxes in model-input coordinates -> the original (H, W) image's, clamped (inverse of preprocess)."""
        return _boxes_to_original(boxes, orig_hw, self.imgsz, self.letterbox or keep_aspect)

    def check_keep_aspect(self) -> None:
        """UserError when ``keep_aspect`` cannot be used: fixed-aspect SSD models, and models that see stretched
        inputs (trained without ``--letterbox``): ``keep_aspect`` feeds letterboxed content at another scale and
        shape than they learned, which costs most of their accuracy."""
        if self.fixed_aspect:
            raise UserError("--keep-aspect: this SSD model's default boxes are fractions of the input, so it must "
                            f"see the training aspect ratio {self.imgsz[0]}:{self.imgsz[1]}; drop --keep-aspect")
        if not self.letterbox:
            raise UserError("--keep-aspect: this model was trained on stretched inputs (without --letterbox) and "
                            "would see letterboxed ones, losing most of its accuracy; drop --keep-aspect (it suits "
                            "checkpoints trained with --letterbox)")

    def describe(self) -> str:
        mode = "letterbox" if self.letterbox else "stretch"
        return f"{self.imgsz[0]}x{self.imgsz[1]} {mode}, pad /{self.size_multiple}"

