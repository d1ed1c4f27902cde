"""Anchor fit: how many ground-truth boxes the default anchors of a RetinaNet / SSD model cover.

A box is covered at IoU ``t`` when some anchor of the model (at the model's input size, in input pixels) overlaps it
with IoU >= ``t``; the report gives the fraction at 0.5 (RetinaNet's and SSD's positive threshold) and at 0.4
(RetinaNet's negative threshold). Boxes no anchor reaches only train through the matchers' low-quality matches,
so low coverage predicts missed objects - typically objects much smaller than the smallest anchor (4 x the finest
stride: 32 px on the default pyramid).

The anchors come from the anchor generator of the detector class itself (``heads.HEAD_TYPES[...].build``), fed the
feature-map sizes the model's levels have for the padded input: the same anchors the model trains with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from ..core.errors import UserError
from ..data.transforms import letterbox_size
from .config import DetectorConfig
from .entrypoints import FAMILIES, entry_point, merge_arch
from .heads import HEAD_TYPES
from .necks import build_neck

THRESHOLDS = (0.5, 0.4)
LOW_COVERAGE = 0.9  # below this fraction at IoU 0.5 the report suggests anchor sizes
ANCHOR_HEADS = ("retinanet", "ssd")  # FCOS assigns by location and scale range, not by anchor IoU
_CHUNK_ELEMENTS = 2 ** 24  # boxes x anchors per IoU block (64 MiB of float32)


class _StandIn(nn.Module):
    """Backbone stand-in: building the head needs only the neck's levels, never DINOv3 itself."""


def model_anchors(model: nn.Module, imgsz: Sequence[int], size_multiple: int | None = None) -> Tensor:
    """The anchors ``[N, 4]`` (xyxy, input pixels) a built RetinaNet / SSD ``model`` uses for an input of
    ``imgsz`` (W, H): its ``anchor_generator`` on the feature sizes of its levels (``model.backbone.strides``) for
    the input padded to ``size_multiple`` (default: the model's input spec)."""
    w, h = int(imgsz[0]), int(imgsz[1])
    m = size_multiple or model.config.input_spec.size_multiple
    hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
    # every level is the padded input / stride, rounded up for the stride-2 levels past the last backbone stride
    feats = [torch.empty((1, 0, math.ceil(hp / s), math.ceil(wp / s))) for s in model.backbone.strides]
    images = ImageList(torch.empty((1, 3, hp, wp)), [(h, w)])
    with torch.no_grad():
        return model.anchor_generator(images, feats)[0].float()


def default_anchors(cfg: DetectorConfig) -> Tensor:
    """The anchors of the detector ``cfg`` describes, at ``cfg.imgsz``, without building its backbone."""
    if cfg.head not in ANCHOR_HEADS:
        raise UserError(f"--head {cfg.head}: the anchor fit applies to {' and '.join(ANCHOR_HEADS)} (FCOS assigns "
                        f"objects by location and size, not by anchor IoU)")
    entry = entry_point(cfg.model_name)
    shapes = FAMILIES[entry["family"]].output_shape(merge_arch(cfg.model_name, entry, cfg.arch_overrides))
    pyramid = build_neck(shapes[cfg.feature_extractor], cfg.feature_extractor, cfg.fpn_channels)
    model = HEAD_TYPES[cfg.head].build(cfg, _StandIn(), pyramid)
    return model_anchors(model, cfg.imgsz, pyramid.size_multiple)


def boxes_to_input(boxes: Tensor, orig_hw: Sequence[int], imgsz: Sequence[int], letterbox: bool = False) -> Tensor:
    """Original-image xyxy boxes -> model-input pixels (the forward of ``transforms.boxes_to_original``)."""
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    h, w = letterbox_size((h0, w0), imgsz) if letterbox else (int(imgsz[1]), int(imgsz[0]))
    scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=torch.float32)
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


def dataset_input_boxes(ds: Any, imgsz: Sequence[int], letterbox: bool = False) -> Tensor:
    """Every (clamped, non-empty) ground-truth box of a ``DetectionDataset`` in model-input pixels ``[M, 4]``."""
    out = [boxes_to_input(ds.annotations(i)["boxes"], ds.records[i].size, imgsz, letterbox) for i in range(len(ds))]
    return torch.cat(out) if out else torch.zeros((0, 4))


@dataclass
class AnchorFit:
    """The fit of ``n_boxes`` boxes: ``coverage[t]`` = fraction with a best anchor IoU >= t; ``best_iou`` per box;
    anchor and box sizes as sqrt(area) in input pixels; ``suggested_sizes`` (and aspect ratios) when coverage at
    0.5 is below ``LOW_COVERAGE``."""

    n_boxes: int
    n_anchors: int
    best_iou: np.ndarray
    coverage: dict[float, float]
    anchor_size_range: tuple[float, float]
    box_size_quantiles: dict[int, float]  # percentile -> sqrt(area)
    suggested_sizes: tuple[int, ...] = ()
    suggested_aspect_ratios: tuple[float, ...] = ()
    sampled_from: int | None = None  # number of boxes the sample was drawn from, when sampled

    @property
    def low(self) -> bool:
        return self.n_boxes > 0 and self.coverage[0.5] < LOW_COVERAGE

    def describe(self) -> str:
        """One line (two when coverage is low: the suggestion)."""
        if not self.n_boxes:
            return "anchor fit: no ground-truth boxes"
        cov = ", ".join(f"{100 * v:.1f}% at IoU >= {t:g}" for t, v in self.coverage.items())
        q = self.box_size_quantiles
        lo, hi = self.anchor_size_range
        of = f" (a sample of {self.sampled_from})" if self.sampled_from else ""
        line = (f"anchor fit: {cov} of {self.n_boxes} boxes{of} matched by the default anchors "
                f"({self.n_anchors}, sizes {lo:.0f}-{hi:.0f} px); box sizes sqrt(w*h) 10/50/90%: "
                f"{q[10]:.0f}/{q[50]:.0f}/{q[90]:.0f} px")
        if self.low:
            small = float((np.sqrt(self._areas) < lo / math.sqrt(2)).mean()) if len(self._areas) else 0.0
            line += (f"\nanchor fit: coverage is low - suggested anchor sizes {list(self.suggested_sizes)} px, aspect "
                     f"ratios {list(self.suggested_aspect_ratios)}; {100 * small:.0f}% of boxes are well below the "
                     f"smallest anchor: train at a larger --imgsz or use sliced inference for small objects")
        return line

    _areas: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0), repr=False)


def anchor_fit(boxes: Tensor, anchors: Tensor, thresholds: Sequence[float] = THRESHOLDS,
               max_boxes: int | None = None, seed: int = 0) -> AnchorFit:
    """The fit of ``boxes`` ``[M, 4]`` to ``anchors`` ``[N, 4]`` (both xyxy, model-input pixels). ``max_boxes``:
    estimate on a seeded random sample of that many boxes (large datasets)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    anchors = torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 4)
    sampled_from = None
    if max_boxes is not None and len(boxes) > max_boxes:
        idx = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:max_boxes]
        boxes, sampled_from = boxes[idx.sort().values], len(boxes)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(anchors)))
    best = torch.cat([box_iou(boxes[i:i + step], anchors).amax(dim=1) for i in range(0, len(boxes), step)]) \
        if len(boxes) and len(anchors) else torch.zeros(len(boxes))
    best_np = best.numpy()
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).numpy()
    areas = wh[:, 0] * wh[:, 1]
    a_wh = (anchors[:, 2:] - anchors[:, :2]).numpy()
    a_size = np.sqrt(a_wh[:, 0] * a_wh[:, 1]) if len(anchors) else np.zeros(1)
    sizes = np.sqrt(areas) if len(areas) else np.zeros(1)
    fit = AnchorFit(
        n_boxes=len(boxes), n_anchors=len(anchors), best_iou=best_np,
        coverage={float(t): float((best_np >= t).mean()) if len(best_np) else 0.0 for t in thresholds},
        anchor_size_range=(float(a_size.min()), float(a_size.max())),
        box_size_quantiles={p: float(np.percentile(sizes, p)) for p in (10, 50, 90)},
        sampled_from=sampled_from, _areas=areas)
    if fit.low:
        # sizes spread over the boxes' own size distribution; ratios from their aspect quantiles
        fit.suggested_sizes = tuple(sorted({max(1, round(float(v))) for v in np.percentile(sizes, (10, 30, 50, 70, 90))}))
        aspect = wh[:, 1] / np.maximum(wh[:, 0], 1e-6)  # torchvision's aspect ratio is height / width
        fit.suggested_aspect_ratios = tuple(sorted({round(float(v), 2) for v in np.percentile(aspect, (10, 50, 90))}))
    return fit
