"""Augmentation presets and the deterministic resize shared by training, evaluation and inference.

All box geometry is done by torchvision.transforms.v2 on ``tv_tensors.BoundingBoxes``; this module only
chooses and orders the transforms. Every pipeline ends at exactly ``imgsz`` = (W, H):

* stretch (default, the reference's behaviour): resize to (H, W) ignoring aspect ratio;
* letterbox: resize by ``min(W / w, H / h)`` keeping aspect ratio, then pad the **bottom and right** with
  ``PAD_VALUE`` up to (H, W). Padding only at bottom/right means the inverse mapping is a pure scale,
  so ``boxes_to_original`` needs no offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from ..core.choices import PRESETS
from ..core.errors import UserError

PAD_VALUE = 114  # grey padding (letterbox, zoom-out, multi-scale crop)

_FILL = {tv_tensors.Image: PAD_VALUE, "others": 0}


def letterbox_size(orig_size: Sequence[int], imgsz: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the aspect-preserving resize of an (H, W) image that fits inside imgsz (W, H)."""
    h0, w0 = int(orig_size[0]), int(orig_size[1])
    W, H = int(imgsz[0]), int(imgsz[1])
    scale = min(W / w0, H / h0)
    return min(H, max(1, round(h0 * scale))), min(W, max(1, round(w0 * scale)))


def _resized_size(orig_size: Sequence[int], imgsz: Sequence[int], letterbox: bool) -> tuple[int, int]:
    """(h, w) of the image content after the final resize (before letterbox padding)."""
    if letterbox:
        return letterbox_size(orig_size, imgsz)
    return int(imgsz[1]), int(imgsz[0])


class ResizeTo(v2.Transform):
    """Final geometric step: stretch or letterbox (pad bottom/right) to exactly imgsz (W, H).

    ``canvas`` (W, H), letterbox only: pad to this size instead of imgsz - the content keeps the letterbox scale of
    imgsz (inference's ``keep_aspect``: less padding to compute, the same scale the model was trained at).
    """

    def __init__(self, imgsz: Sequence[int], letterbox: bool = False, canvas: Sequence[int] | None = None) -> None:
        super().__init__()
        self.imgsz = (int(imgsz[0]), int(imgsz[1]))
        self.letterbox = bool(letterbox)
        if canvas is not None and not self.letterbox:
            raise ValueError("a canvas size only applies to letterbox resizing")
        self.canvas = self.imgsz if canvas is None else (int(canvas[0]), int(canvas[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h0, w0 = query_size(flat_inputs)
        h, w = _resized_size((h0, w0), self.imgsz, self.letterbox)
        if w > self.canvas[0] or h > self.canvas[1]:
            raise ValueError(f"canvas {self.canvas} is smaller than the resized content {(w, h)}")
        return {"size": [h, w], "pad": [0, 0, self.canvas[0] - w, self.canvas[1] - h]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = F.resize(inpt, params["size"], antialias=True)
        if self.letterbox and any(params["pad"]):
            fill = PAD_VALUE if isinstance(out, tv_tensors.Image) or type(out) is torch.Tensor else 0
            out = F.pad(out, params["pad"], fill=fill)
        return out


class SafeIoUCrop(v2.RandomIoUCrop):
    """RandomIoUCrop that leaves images without boxes alone (torchvision's would spin looking for a box)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0:
            return {}
        return super().make_params(flat_inputs)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params:
            return inpt
        return super().transform(inpt, params)


def build_transform(preset: str, imgsz: Sequence[int], letterbox: bool = False, train: bool = True) -> v2.Compose:
    """A v2 pipeline taking ``(image uint8 [3,H,W], {"boxes": BoundingBoxes, "labels": ...})``.

    ``train=False`` (or preset ``none``) gives the deterministic eval pipeline: just the final resize.
    """
    if preset not in PRESETS:
        raise UserError(f"--augment {preset!r} is not a preset; use one of {', '.join(PRESETS)}")
    W, H = int(imgsz[0]), int(imgsz[1])
    ops: list[v2.Transform] = []
    if train and preset == "flip":
        ops += [v2.RandomHorizontalFlip(p=0.5)]
    elif train and preset in ("ssd", "strong"):
        ops += [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=_FILL, side_range=(1.0, 4.0 if preset == "ssd" else 3.0), p=0.5),
            SafeIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
    ops.append(ResizeTo((W, H), letterbox))
    if train and preset == "strong":
        # multi-scale: rescale the imgsz image by 0.5-1.5x, then crop / pad back to exactly imgsz
        ops += [
            v2.ScaleJitter(target_size=(H, W), scale_range=(0.5, 1.5)),
            v2.RandomCrop((H, W), pad_if_needed=True, fill=_FILL),
        ]
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(ops)


def resize_image(image: torch.Tensor, imgsz: Sequence[int], letterbox: bool = False,
                 canvas: Sequence[int] | None = None) -> torch.Tensor:
    """Deterministic eval/inference resize of one uint8 [3,H,W] (or a batch [B,3,H,W]) to imgsz (W, H): the
    validation loader's final op (``ResizeTo``) applied to one image. ``canvas``: see ``ResizeTo``."""
    op = ResizeTo(imgsz, letterbox, canvas)
    out = op(tv_tensors.Image(image) if image.ndim == 3 else image)
    return out.as_subclass(torch.Tensor)


def boxes_to_original(
    boxes: torch.Tensor, orig_size: Sequence[int], imgsz: Sequence[int], letterbox: bool = False
) -> torch.Tensor:
    """Map xyxy boxes from model-input coordinates back to the original (H, W) image, clamped.

    Exact inverse of ``ResizeTo``: torchvision scales boxes by (w/w0, h/h0) of the actual resized content,
    and letterbox pads only bottom/right, so the inverse is a division by the same per-axis factors.
    """
    h0, w0 = int(orig_size[0]), int(orig_size[1])
    h, w = _resized_size((h0, w0), imgsz, letterbox)
    boxes = torch.as_tensor(boxes).as_subclass(torch.Tensor)
    scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=torch.float32, device=boxes.device)
    out = boxes.float() / scale
    out[..., 0::2] = out[..., 0::2].clamp(0, w0)
    out[..., 1::2] = out[..., 1::2].clamp(0, h0)
    return out
