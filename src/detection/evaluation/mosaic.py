"""Pictures of what a model sees and predicts: validation images with ground truth beside predictions
(``val_pred_epoch_N.jpg``), and augmented training samples with their boxes (``train_batch0.jpg``).

``PredictionSample`` is a ``DatasetEvaluator`` that keeps the predictions of a fixed set of validation images during
the evaluation pass (no second forward); ``prediction_mosaic`` / ``batch_mosaic`` draw HxWx3 uint8 RGB arrays (what
the experiment loggers take) and ``save_jpg`` writes one atomically.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..core.io import atomic_write
from .evaluator import DatasetEvaluator

GT_COLOR = (0, 220, 0)
PANEL = 320  # longest side of one picture in a mosaic, in pixels


def sample_ids(n: int, k: int) -> list[int]:
    """``k`` dataset indices spread evenly over ``n`` images (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _cpu(d: dict[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(d[k]).detach().cpu() for k in keys if d.get(k) is not None}


class PredictionSample(DatasetEvaluator):
    """Keeps the predictions and original-coordinate ground truth of the images whose ``image_id`` (the dataset
    index the loader's targets carry) is in ``image_ids``. ``evaluate()`` returns ``{image_id: (prediction,
    ground truth)}`` gathered from every rank on rank 0 (None on the others)."""

    def __init__(self, image_ids: Sequence[int]) -> None:
        self.image_ids = [int(i) for i in image_ids]
        self._wanted = set(self.image_ids)
        self.reset()

    def reset(self) -> None:
        self.items: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def process(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        for p, t in zip(predictions, targets):
            i = int(t.get("image_id", -1))
            if i in self._wanted:
                gt = {"boxes": t["orig_boxes"], "labels": t["orig_labels"]} if "orig_boxes" in t else t
                self.items[i] = (_cpu(p, ("boxes", "scores", "labels")), _cpu(gt, ("boxes", "labels")))

    def evaluate(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] | None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.items)
            if dist.get_rank():
                return None
            self.items = {k: v for part in gathered for k, v in part.items()}
        return {i: self.items[i] for i in self.image_ids if i in self.items}


def class_color(label: int) -> tuple[int, int, int]:
    """A stable RGB colour per class (golden-ratio hue steps), never the ground truth's green."""
    hue = (0.55 + label * 0.618033988749895) % 1.0
    if abs(hue - 0.33) < 0.06:
        hue = (hue + 0.12) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _fit(image: torch.Tensor, boxes: torch.Tensor, panel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image scaled so its longest side is ``panel`` px, and its boxes with it."""
    h, w = image.shape[-2:]
    s = panel / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = TF.resize(image, [nh, nw], antialias=True)
    scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
    return image, boxes.float().reshape(-1, 4) * scale


def draw(image: torch.Tensor, boxes: Any, labels: Any, classes: Sequence[str], scores: Any = None,
         color: tuple[int, int, int] | None = None, panel: int = PANEL) -> torch.Tensor:
    """``image`` (uint8 [3,H,W]) scaled to ``panel`` px with the boxes drawn: ``class`` or ``class score``
    labels, one colour per class (or ``color`` for all)."""
    import cv2  # OpenCV's text: ~20x faster than PIL's font rendering, which dominated a mosaic's cost

    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    image, boxes = _fit(torch.as_tensor(image), boxes, panel)
    if not len(boxes):
        return image
    names = [classes[c] if 0 <= c < len(classes) else str(c) for c in labels]
    if scores is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, torch.as_tensor(scores).reshape(-1).tolist())]
    canvas = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    h = canvas.shape[0]
    for (x1, y1, x2, y2), c, name in zip(boxes.round().int().tolist(), labels, names):
        rgb = color or class_color(c)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), rgb, 2)
        (tw, th), base = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = y1 if y1 - th - base >= 0 else min(h - 1, y1 + th + base)  # above the box, or inside at the top
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw, ty), rgb, -1)
        dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140
        cv2.putText(canvas, name, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0) if dark else (255, 255, 255), 1, cv2.LINE_AA)
    return torch.from_numpy(canvas).permute(2, 0, 1)


def _grid(panels: list[torch.Tensor], cols: int, pad: int = 4) -> np.ndarray:
    """Panels (uint8 [3,h,w], any sizes up to the cell) on a white grid, ``cols`` per row -> HxWx3 uint8."""
    if not panels:
        return np.full((PANEL, PANEL, 3), 255, np.uint8)
    cell_h = max(p.shape[1] for p in panels)
    cell_w = max(p.shape[2] for p in panels)
    rows = math.ceil(len(panels) / cols)
    out = torch.full((3, rows * (cell_h + pad) + pad, cols * (cell_w + pad) + pad), 255, dtype=torch.uint8)
    for k, p in enumerate(panels):
        r, c = divmod(k, cols)
        y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        out[:, y:y + p.shape[1], x:x + p.shape[2]] = p
    return out.permute(1, 2, 0).contiguous().numpy()


def prediction_mosaic(images: Sequence[torch.Tensor], ground_truth: Sequence[dict[str, Any]],
                      predictions: Sequence[dict[str, Any]], classes: Sequence[str], threshold: float,
                      pairs_per_row: int = 2, panel: int = PANEL) -> np.ndarray:
    """Per image, ground truth (green) beside the predictions scoring at least ``threshold`` -> HxWx3 uint8."""
    panels = []
    for image, gt, pred in zip(images, ground_truth, predictions):
        keep = torch.as_tensor(pred["scores"]).reshape(-1) >= threshold
        panels.append(draw(image, gt["boxes"], gt["labels"], classes, color=GT_COLOR, panel=panel))
        panels.append(draw(image, torch.as_tensor(pred["boxes"]).reshape(-1, 4)[keep],
                           torch.as_tensor(pred["labels"]).reshape(-1)[keep], classes,
                           scores=torch.as_tensor(pred["scores"]).reshape(-1)[keep], panel=panel))
    return _grid(panels, 2 * pairs_per_row)


def batch_mosaic(samples: Sequence[tuple[torch.Tensor, dict[str, Any]]], classes: Sequence[str], cols: int = 4,
                 panel: int = PANEL) -> np.ndarray:
    """Augmented training samples ``(image uint8 [3,H,W], target)`` with their training boxes -> HxWx3 uint8."""
    return _grid([draw(img, t["boxes"], t["labels"], classes, panel=panel) for img, t in samples], cols)


def save_jpg(array: np.ndarray, path: str | os.PathLike, quality: int = 90) -> Path:
    """Write an HxWx3 uint8 RGB array as JPEG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=quality)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return Path(path)
