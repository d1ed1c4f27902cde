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


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _overlay_style(height: int, width: int) -> tuple[float, int, int]:
    """(font scale, thickness, margin) of status lines: smaller than labels, never below a legible size."""
    short = max(1, min(height, width))
    scale = max(0.35, short / 1400)
    return scale, max(1, round(scale * 1.5)), max(2, round(short / 200))


def overlay_size(frame_hw: tuple[int, int], lines: Sequence[str]) -> tuple[int, int]:
    """(width, height) in pixels of the status box ``draw_text`` draws for ``lines`` on a frame of this size."""
    scale, thick, pad = _overlay_style(*frame_hw)
    sizes = [cv2.getTextSize(t, _FONT, scale, thick) for t in lines]
    return (max((tw for (tw, _), _ in sizes), default=0) + 2 * pad,
            sum(th + base + pad for (_, th), base in sizes) + pad)


def label_regions(frame_hw: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """xyxy regions each detection occupies once drawn: its box plus the label strip above it."""
    h, w = frame_hw
    _, scale, thick = _style(h, w)
    (_, th), base = cv2.getTextSize("Ag 0.00", _FONT, scale, thick)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    boxes[:, 1] -= th + base + 4
    return boxes


def overlay_corner(frame_hw: tuple[int, int], size: tuple[int, int], boxes: np.ndarray,
                   previous: str | None = None) -> str:
    """The corner where a status box of ``size`` (w, h) hides the least of the drawn detections (``boxes`` xyxy,
    label strips included). The ``previous`` corner is kept unless another hides less than half as much, so
    the box does not jump around from frame to frame."""
    h, w = frame_hw
    bw, bh = size
    regions = label_regions(frame_hw, boxes)

    def hidden(corner: str) -> float:
        x0 = 0 if corner.endswith("left") else w - bw
        y0 = 0 if corner.startswith("top") else h - bh
        iw = np.clip(np.minimum(regions[:, 2], x0 + bw) - np.maximum(regions[:, 0], x0), 0, None)
        ih = np.clip(np.minimum(regions[:, 3], y0 + bh) - np.maximum(regions[:, 1], y0), 0, None)
        return float((iw * ih).sum())

    cost = {c: hidden(c) for c in CORNERS}
    best = min(CORNERS, key=lambda c: cost[c])  # ties: the first in CORNERS (top-left, where people look)
    if previous in cost and (cost[previous] == 0 or cost[best] >= 0.5 * cost[previous]):
        return previous  # type: ignore[return-value]
    return best


def draw_text(frame: np.ndarray, lines: Sequence[str], corner: str = "top-left") -> np.ndarray:
    """Overlay status lines (e.g. FPS) in a ``corner`` on a dark background, sized to the frame."""
    h, w = frame.shape[:2]
    scale, thick, pad = _overlay_style(h, w)
    bw, bh = overlay_size((h, w), lines)
    x0 = 0 if corner.endswith("left") else max(0, w - bw)
    y0 = 0 if corner.startswith("top") else max(0, h - bh)
    cv2.rectangle(frame, (x0, y0), (x0 + bw - 1, y0 + bh - 1), (0, 0, 0), -1)
    y = y0 + pad
    for text in lines:
        (_, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        cv2.putText(frame, text, (x0 + pad, y + th), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
        y += th + base + pad
    return frame


def tensor_to_bgr(image: torch.Tensor) -> np.ndarray:
    """uint8 RGB ``[3,H,W]`` tensor -> contiguous BGR ``[H,W,3]`` array for OpenCV."""
    return np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy()[:, :, ::-1])


def bgr_to_rgb(frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BGR ``[H,W,3]`` uint8 (OpenCV) -> RGB, into ``out`` when given. One pass of ``cv2.cvtColor``: a copy
    through a negative-stride view (``frame[:, :, ::-1]``) costs ~40x more on a 720p frame."""
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB, dst=out)


def bgr_to_tensor(frame: np.ndarray) -> torch.Tensor:
    """BGR ``[H,W,3]`` uint8 array (OpenCV) -> RGB uint8 ``[3,H,W]`` tensor (a view of one converted copy)."""
    return torch.from_numpy(bgr_to_rgb(frame)).permute(2, 0, 1)


def draw_on_image(image: torch.Tensor, pred: dict[str, torch.Tensor], classes: Sequence[str]) -> np.ndarray:
    """Annotated BGR copy of an RGB uint8 tensor image, ready for ``cv2.imwrite``."""
    return draw_detections(tensor_to_bgr(image), pred["boxes"], pred["labels"], pred["scores"], classes)
