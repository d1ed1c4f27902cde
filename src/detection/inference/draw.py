"""Drawing detections with OpenCV on BGR uint8 frames (video) and RGB tensors (images).

Line width and font scale follow the image size so labels stay readable on thumbnails and on 4K frames.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import cache

import cv2
import numpy as np
import torch

_FONT = cv2.FONT_HERSHEY_SIMPLEX


@cache
def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class index (golden-ratio hue steps, bright and saturated)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _style(height: int, width: int) -> tuple[int, float, int]:
    """(box line width, font scale, text thickness) for an image of this size."""
    short = max(1, min(height, width))
    line = max(1, round(short / 320))
    scale = max(0.35, short / 1000)
    return line, scale, max(1, round(scale * 1.5))


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = bg
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def draw_detections(frame: np.ndarray, boxes: np.ndarray | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                    scores: Sequence[float] | torch.Tensor, classes: Sequence[str],
                    ids: Sequence[int] | None = None) -> np.ndarray:
    """Draw boxes with ``class score`` labels onto a BGR uint8 ``frame`` in place (and return it).

    With track ``ids`` the label reads ``#id class score`` and the colour follows the ID instead of the class."""
    h, w = frame.shape[:2]
    line, scale, thick = _style(h, w)
    boxes = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    ids = [int(i) for i in ids] if ids is not None else [None] * len(labels)
    for box, label, score, tid in zip(boxes.reshape(-1, 4), labels, scores, ids):
        color = class_color(int(label) if tid is None else tid)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(frame, (x1, y1), (x2, y2), color, line, cv2.LINE_AA)
        name = classes[label] if 0 <= label < len(classes) else str(label)
        text = f"{name} {score:.2f}" if tid is None else f"#{tid} {name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        # Label above the box, or inside it when the box touches the top edge.
        ty = y1 - base - 2 if y1 - th - base - 2 >= 0 else y1 + th + 2
        tx = min(max(0, x1), max(0, w - tw - 2))
        cv2.rectangle(frame, (tx, ty - th - 2), (tx + tw + 2, ty + base), color, -1)
        cv2.putText(frame, text, (tx + 1, ty), _FONT, scale, _text_color(color), thick, cv2.LINE_AA)
    return frame


def draw_text(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Overlay status lines (e.g. FPS) in the top-left corner on a dark background."""
    h, w = frame.shape[:2]
    _, scale, thick = _style(h, w)
    y = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        cv2.rectangle(frame, (0, y), (tw + 8, y + th + base + 8), (0, 0, 0), -1)
        cv2.putText(frame, text, (4, y + th + 4), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
        y += th + base + 8
    return frame


def tensor_to_bgr(image: torch.Tensor) -> np.ndarray:
    """uint8 RGB ``[3,H,W]`` tensor -> contiguous BGR ``[H,W,3]`` array for OpenCV."""
    return np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy()[:, :, ::-1])


def bgr_to_tensor(frame: np.ndarray) -> torch.Tensor:
    """BGR ``[H,W,3]`` uint8 array (OpenCV) -> RGB uint8 ``[3,H,W]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(frame[:, :, ::-1])).permute(2, 0, 1)


def draw_on_image(image: torch.Tensor, pred: dict[str, torch.Tensor], classes: Sequence[str]) -> np.ndarray:
    """Annotated BGR copy of an RGB uint8 tensor image, ready for ``cv2.imwrite``."""
    return draw_detections(tensor_to_bgr(image), pred["boxes"], pred["labels"], pred["scores"], classes)
