"""Sliced inference for large images: overlapping tiles (plus the whole image) through any predictor, boxes mapped
back and merged per class.

A detector resizes its input to its training size, so on a 4000 px image a 20 px object shrinks to 3 px and is lost.
Tiles of about the model's input size keep objects at their native scale; the whole image (``include_full``) keeps
the large objects that tiles cut apart. It pays when objects are small relative to the image; it costs one forward
per tile (all tiles of a call go through the wrapped predictor's batching).

    sliced = SlicedPredictor(predictor, slice_wh=(640, 640), overlap=0.2)
    detections = sliced.predict(images)  # same interface and output as predictor.predict
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from ..core.errors import UserError
from .base import can_submit

MERGES = ("nms", "wbf")


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` (fraction) between
    neighbours; the last tile ends at the border (never a sliver)."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    # spread the tiles evenly so the overlap is the same everywhere and the last one ends at the border
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tiles(hw: Sequence[int], slice_wh: Sequence[int], overlap: float) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` windows of an image of size (H, W)."""
    h, w = int(hw[0]), int(hw[1])
    tw, th = min(int(slice_wh[0]), w), min(int(slice_wh[1]), h)
    return [(x, y, x + tw, y + th) for y in tile_origins(h, th, overlap) for x in tile_origins(w, tw, overlap)]


def weighted_box_fusion(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted box fusion per class: in descending score, each box joins the first cluster of its class whose
    fused box it overlaps with IoU > ``iou``, else starts one; a cluster's box is the score-weighted mean of its
    members, its score the highest member score (one object seen by several views stays as confident as its best
    view)."""
    order = torch.argsort(scores, descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    fused: list[Tensor] = []
    weights: list[Tensor] = []
    best: list[Tensor] = []
    cluster_labels: list[int] = []
    sums = torch.zeros((0, 4))
    for b, s, lab in zip(boxes, scores, labels.tolist()):
        j = -1
        if fused:
            current = torch.stack(fused)
            ious = box_iou(b[None], current)[0]
            ious[torch.tensor(cluster_labels) != lab] = -1
            k = int(torch.argmax(ious))
            j = k if ious[k] > iou else -1
        if j < 0:
            fused.append(b.clone())
            weights.append(s.clone())
            best.append(s.clone())
            cluster_labels.append(lab)
            sums = torch.cat([sums, (b * s)[None]])
        else:
            sums[j] += b * s
            weights[j] = weights[j] + s
            fused[j] = sums[j] / weights[j]
    if not fused:
        return boxes[:0], scores[:0], labels[:0]
    return torch.stack(fused), torch.stack(best), torch.tensor(cluster_labels, dtype=labels.dtype)


class SlicedPredictor:
    """Wraps a predictor (``inference.base.PredictorBase`` or anything with ``predict(images)``): ``predict`` runs
    it on the tiles of every image (and the whole images with ``include_full``) in one call, shifts the tile boxes
    to image coordinates and merges them per class (``merge``: ``nms`` - torchvision ``batched_nms`` - or ``wbf``,
    weighted box fusion) at IoU ``merge_iou``, keeping at most ``max_det`` per image (None: all). Every other
    attribute is the wrapped predictor's, so it stands in for it."""

    def __init__(self, predictor: Any, slice_wh: Sequence[int], overlap: float = 0.2, include_full: bool = True,
                 merge: str = "nms", merge_iou: float = 0.5, max_det: int | None = None) -> None:
        if len(slice_wh) != 2 or min(int(v) for v in slice_wh) < 32:
            raise UserError(f"--slice {' '.join(str(v) for v in slice_wh)}: give the tile WIDTH HEIGHT in pixels, "
                            f"each at least 32 (e.g. --slice 640 640)")
        if not 0.0 <= overlap < 1.0:
            raise UserError(f"--slice-overlap {overlap}: use a fraction in [0, 1), e.g. 0.2")
        if merge not in MERGES:
            raise UserError(f"--slice-merge {merge!r}: choose one of {', '.join(MERGES)}")
        if not 0.0 < merge_iou <= 1.0:
            raise UserError(f"slice merge IoU {merge_iou}: use a value in (0, 1]")
        self.predictor = predictor
        self.slice_wh = (int(slice_wh[0]), int(slice_wh[1]))
        self.overlap = float(overlap)
        self.include_full = bool(include_full)
        self.merge = merge
        self.merge_iou = float(merge_iou)
        self.max_det = max_det

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this wrapper lacks: the wrapped predictor's (classes, card, device, ...)
        if name == "predictor":
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def describe(self) -> str:
        inner = self.predictor.describe() if hasattr(self.predictor, "describe") else type(self.predictor).__name__
        full = " + whole image" if self.include_full else ""
        return (f"{inner}; sliced {self.slice_wh[0]}x{self.slice_wh[1]} tiles, overlap {self.overlap:g}{full}, "
                f"{self.merge} merge at IoU {self.merge_iou:g}")

    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for original uint8 [3,H,W] images, in their own coordinates (as ``predictor.predict``)."""
        return self.submit(images).result()

    def submit(self, images: Sequence[Tensor]) -> SlicedPending:
        """Start ``predict(images)``: every view goes to the wrapped predictor's ``submit`` (when it has one, so a
        pipeline keeps one call in flight as it does unsliced); ``result()`` merges the views' detections."""
        views: list[Tensor] = []
        owner: list[tuple[int, int, int]] = []  # (image index, x0, y0) per view
        for i, img in enumerate(images):
            windows = tiles(img.shape[-2:], self.slice_wh, self.overlap)
            if len(windows) == 1:  # the image fits one tile: the tile is the whole image
                views.append(img)
                owner.append((i, 0, 0))
                continue
            if self.include_full:
                views.append(img)
                owner.append((i, 0, 0))
            for x0, y0, x1, y1 in windows:
                views.append(img[..., y0:y1, x0:x1])
                owner.append((i, x0, y0))
        if not views:
            started: Any = []
        elif can_submit(self.predictor):
            started = self.predictor.submit(views)
        else:
            started = self.predictor.predict(views)
        return SlicedPending(self, len(images), owner, started)

    def _merge(self, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not parts:
            return {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        boxes = torch.cat([p["boxes"] for p in parts]).float()
        scores = torch.cat([p["scores"] for p in parts]).float()
        labels = torch.cat([p["labels"] for p in parts]).to(torch.int64)
        if len(parts) > 1 and len(boxes):
            if self.merge == "nms":
                keep = batched_nms(boxes, scores, labels, self.merge_iou)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            else:
                boxes, scores, labels = weighted_box_fusion(boxes, scores, labels, self.merge_iou)
        order = torch.argsort(scores, descending=True)[: self.max_det]
        return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


class SlicedPending:
    """``SlicedPredictor.submit``'s result: ``result()`` collects the views' detections (waiting for the wrapped
    predictor's own pending call, if any), shifts them to image coordinates and merges them per image."""

    def __init__(self, sliced: SlicedPredictor, count: int, owner: list[tuple[int, int, int]], started: Any) -> None:
        self._sliced, self._count, self._owner, self._started = sliced, count, owner, started
        self._results: list[dict[str, Tensor]] | None = None

    def result(self) -> list[dict[str, Tensor]]:
        if self._results is None:
            preds = self._started if isinstance(self._started, list) else self._started.result()
            per_image: list[list[dict[str, Tensor]]] = [[] for _ in range(self._count)]
            for (i, x0, y0), p in zip(self._owner, preds):
                shift = torch.tensor([x0, y0, x0, y0], dtype=p["boxes"].dtype, device=p["boxes"].device)
                per_image[i].append({"boxes": p["boxes"] + shift, "scores": p["scores"], "labels": p["labels"]})
            self._results = [self._sliced._merge(parts) for parts in per_image]
        return self._results
