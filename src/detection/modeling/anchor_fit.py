"""Anchor fit: how many ground-truth boxes the anchors of a RetinaNet / SSD model cover, and RetinaNet anchors that
cover more.

A box is covered at IoU ``t`` when some anchor of the model (at the model's input size, in input pixels) overlaps it
with IoU >= ``t``; the report gives the fraction at 0.5 (RetinaNet's and SSD's positive threshold) and at 0.4
(RetinaNet's negative threshold). Boxes no anchor reaches only train through the matchers' low-quality matches,
so low coverage predicts missed objects - typically objects much smaller than the smallest anchor (4 x the finest
stride: 32 px on the default pyramid).

The anchors come from the anchor generator of the detector class itself (``heads.HEAD_TYPES[...].build``), fed the
feature-map sizes the model's levels have for the padded input: the same anchors the model trains with. When
coverage is low, ``fit_config`` tries RetinaNet ``--anchor-sizes`` / ``--anchor-ratios`` fitted to the boxes
(``candidate_anchors``) on the same boxes and suggests the best, with the coverage it reaches.
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


def _anchors_and_levels(model: nn.Module, imgsz: Sequence[int],
                        size_multiple: int | None = None) -> tuple[Tensor, list[tuple[int, int, int]]]:
    w, h = int(imgsz[0]), int(imgsz[1])
    m = size_multiple or model.config.input_spec.size_multiple
    hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
    # every level is the padded input / stride, rounded up for the stride-2 levels past the last backbone stride
    sizes = [(math.ceil(hp / s), math.ceil(wp / s)) for s in model.backbone.strides]
    feats = [torch.empty((1, 0, fh, fw)) for fh, fw in sizes]
    images = ImageList(torch.empty((1, 3, hp, wp)), [(h, w)])
    with torch.no_grad():
        anchors = model.anchor_generator(images, feats)[0].float()
    per_location = model.anchor_generator.num_anchors_per_location()
    return anchors, [(fh, fw, int(a)) for (fh, fw), a in zip(sizes, per_location)]


def model_anchors(model: nn.Module, imgsz: Sequence[int], size_multiple: int | None = None) -> Tensor:
    """The anchors ``[N, 4]`` (xyxy, input pixels) a built RetinaNet / SSD ``model`` uses for an input of
    ``imgsz`` (W, H): its ``anchor_generator`` on the feature sizes of its levels (``model.backbone.strides``) for
    the input padded to ``size_multiple`` (default: the model's input spec)."""
    return _anchors_and_levels(model, imgsz, size_multiple)[0]


def _stand_in_model(cfg: DetectorConfig) -> tuple[nn.Module, int]:
    if cfg.head not in ANCHOR_HEADS:
        raise UserError(f"--head {cfg.head}: the anchor fit applies to {' and '.join(ANCHOR_HEADS)} (FCOS assigns "
                        f"objects by location and size, not by anchor IoU)")
    entry = entry_point(cfg.model_name)
    shapes = FAMILIES[entry["family"]].output_shape(merge_arch(cfg.model_name, entry, cfg.arch_overrides))
    pyramid = build_neck(shapes[cfg.feature_extractor], cfg.feature_extractor, cfg.fpn_channels)
    return HEAD_TYPES[cfg.head].build(cfg, _StandIn(), pyramid), pyramid.size_multiple


def config_anchors(cfg: DetectorConfig) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """The anchors of the detector ``cfg`` describes, at ``cfg.imgsz``, without building its backbone, and their
    levels ``(H, W, anchors per location)`` for ``anchor_fit(levels=...)``."""
    model, multiple = _stand_in_model(cfg)
    return _anchors_and_levels(model, cfg.imgsz, multiple)


def default_anchors(cfg: DetectorConfig) -> Tensor:
    """The anchors of the detector ``cfg`` describes (``config_anchors`` without the levels)."""
    return config_anchors(cfg)[0]


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
class AnchorSuggestion:
    """Anchors for ``train_detection.py`` (RetinaNet) and the coverage they reach on the same boxes."""

    sizes: tuple[int, ...]
    ratios: tuple[float, ...]
    coverage: float  # at IoU 0.5

    @property
    def flags(self) -> str:
        return (f"--anchor-sizes {' '.join(map(str, self.sizes))} "
                f"--anchor-ratios {' '.join(f'{r:g}' for r in self.ratios)}")


@dataclass
class AnchorFit:
    """The fit of ``n_boxes`` boxes: ``coverage[t]`` = fraction with a best anchor IoU >= t; ``best_iou`` per box;
    anchor and box sizes as sqrt(area) in input pixels; when coverage at 0.5 is below ``LOW_COVERAGE``,
    ``fit_config`` adds the RetinaNet ``suggestion`` that covers the most of the same boxes, if one covers more."""

    n_boxes: int
    n_anchors: int
    best_iou: np.ndarray
    coverage: dict[float, float]
    anchor_size_range: tuple[float, float]
    box_size_quantiles: dict[int, float]  # percentile -> sqrt(area)
    sampled_from: int | None = None  # number of boxes the sample was drawn from, when sampled
    anchors_name: str = "the default anchors"
    head: str = "retinanet"
    suggestion: AnchorSuggestion | None = None

    @property
    def low(self) -> bool:
        return self.n_boxes > 0 and self.coverage[0.5] < LOW_COVERAGE

    def describe(self) -> str:
        """One line (two when coverage is low: what to change)."""
        if not self.n_boxes:
            return "anchor fit: no ground-truth boxes"
        cov = ", ".join(f"{100 * v:.1f}% at IoU >= {t:g}" for t, v in self.coverage.items())
        q = self.box_size_quantiles
        lo, hi = self.anchor_size_range
        of = f" (a sample of {self.sampled_from})" if self.sampled_from else ""
        line = (f"anchor fit: {cov} of {self.n_boxes} boxes{of} matched by {self.anchors_name} "
                f"({self.n_anchors}, sizes {lo:.0f}-{hi:.0f} px); box sizes sqrt(w*h) 10/50/90%: "
                f"{q[10]:.0f}/{q[50]:.0f}/{q[90]:.0f} px")
        if not self.low:
            return line
        small = float((np.sqrt(self._areas) < lo / math.sqrt(2)).mean()) if len(self._areas) else 0.0
        if self.suggestion is not None:
            advice = (f"train_detection.py {self.suggestion.flags} covers {100 * self.suggestion.coverage:.1f}% "
                      f"at IoU >= 0.5")
        elif self.head == "ssd":
            advice = ("SSD's default boxes follow its strides and --imgsz; RetinaNet's can be set "
                      "(`python -m src.detection.analyze --head retinanet` suggests them)")
        else:
            advice = "no other anchor sizes and ratios tried cover more of these boxes"
        line += f"\nanchor fit: coverage is low - {advice}"
        if small and (self.suggestion is None or self.suggestion.coverage < LOW_COVERAGE):
            line += (f"; {100 * small:.0f}% of boxes are well below the smallest anchor: train at a larger --imgsz "
                     f"or use sliced inference for small objects")
        return line

    _areas: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0), repr=False)


def _iou_pairs(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``boxes[..., 4]`` with ``anchors[..., 4]`` elementwise, in the operations ``box_iou`` uses."""
    area1 = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area2 = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])
    wh = (torch.minimum(boxes[..., 2:], anchors[..., 2:]) - torch.maximum(boxes[..., :2], anchors[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1 + area2 - inter)


def _nearest(centers: Tensor, values: Tensor) -> Tensor:
    """Per row of ``centers`` [A, n] (ascending): the indices [A, B, 2] bracketing each of ``values`` [B]."""
    j = torch.searchsorted(centers, values.expand(len(centers), -1).contiguous())
    return torch.stack([(j - 1).clamp(0, centers.shape[1] - 1), j.clamp(0, centers.shape[1] - 1)], -1)


def _best_iou_on_lattice(boxes: Tensor, level: Tensor) -> Tensor | None:
    """Best IoU of each box with one level's anchors ``[H, W, A, 4]`` when they form a lattice (each anchor shape
    repeated on a grid of x and y offsets, as the RetinaNet and SSD generators place them), else None.

    For one anchor shape, the overlap of two intervals of fixed lengths only shrinks as their centres move apart,
    and IoU grows with the overlap, so the best anchor of a shape has the grid centres nearest the box's centre in x
    and in y: the two grid columns and two rows around it are checked, 4 anchors per shape instead of all of them.
    """
    x, y = level[0, :, :, 0::2], level[:, 0, :, 1::2]  # [W, A, 2] x1/x2 per column, [H, A, 2] y1/y2 per row
    if not (torch.equal(level[..., 0::2], x.expand_as(level[..., 0::2]))
            and torch.equal(level[..., 1::2], y[:, None].expand_as(level[..., 1::2]))):
        return None
    cx, cy = x.mean(-1).T.contiguous(), y.mean(-1).T.contiguous()  # [A, W], [A, H]
    if not (bool((cx.diff(dim=1) >= 0).all()) and bool((cy.diff(dim=1) >= 0).all())):
        return None
    a = torch.arange(cx.shape[0])[:, None, None, None]
    ix = _nearest(cx, (boxes[:, 0] + boxes[:, 2]) / 2)[..., :, None]  # [A, B, 2, 1]
    iy = _nearest(cy, (boxes[:, 1] + boxes[:, 3]) / 2)[..., None, :]  # [A, B, 1, 2]
    xs, ys = x[ix, a], y[iy, a]  # [A, B, 2, 1, 2], [A, B, 1, 2, 2]
    cand = torch.stack(torch.broadcast_tensors(xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]), -1)
    return _iou_pairs(boxes[None, :, None, None], cand).flatten(2).amax(dim=(0, 2))


def _best_iou(boxes: Tensor, anchors: Tensor, levels: Sequence[tuple[int, int, int]] | None) -> Tensor:
    if not len(boxes) or not len(anchors):
        return torch.zeros(len(boxes))
    parts, start = [], 0
    for h, w, a in levels if levels is not None and sum(h * w * a for h, w, a in levels) == len(anchors) else []:
        level = anchors[start:start + h * w * a]
        start += h * w * a
        best = _best_iou_on_lattice(boxes, level.view(h, w, a, 4))
        parts.append(best if best is not None else _best_iou(boxes, level, None))
    if parts:
        return torch.stack(parts).amax(dim=0)
    step = max(1, _CHUNK_ELEMENTS // len(anchors))
    return torch.cat([box_iou(boxes[i:i + step], anchors).amax(dim=1) for i in range(0, len(boxes), step)])


def _sample(boxes: Tensor, max_boxes: int | None, seed: int) -> tuple[Tensor, int | None]:
    """``boxes`` as float32 ``[M, 4]``, or a seeded sample of ``max_boxes`` of them (in their order) and ``M``."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if max_boxes is None or len(boxes) <= max_boxes:
        return boxes, None
    idx = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:max_boxes]
    return boxes[idx.sort().values], len(boxes)


def anchor_fit(boxes: Tensor, anchors: Tensor, thresholds: Sequence[float] = THRESHOLDS,
               max_boxes: int | None = None, seed: int = 0,
               levels: Sequence[tuple[int, int, int]] | None = None) -> AnchorFit:
    """The fit of ``boxes`` ``[M, 4]`` to ``anchors`` ``[N, 4]`` (both xyxy, model-input pixels). ``max_boxes``:
    estimate on a seeded random sample of that many boxes (large datasets). ``levels``: the anchors' ``(H, W,
    anchors per location)`` per level (``config_anchors``), which makes the fit cost a few anchors per box and level
    instead of all of them (the same best IoUs)."""
    boxes, sampled_from = _sample(boxes, max_boxes, seed)
    anchors = torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 4)
    best_np = _best_iou(boxes, anchors, levels).numpy()
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).numpy()
    areas = wh[:, 0] * wh[:, 1]
    a_wh = (anchors[:, 2:] - anchors[:, :2]).numpy()
    a_size = np.sqrt(a_wh[:, 0] * a_wh[:, 1]) if len(anchors) else np.zeros(1)
    sizes = np.sqrt(areas) if len(areas) else np.zeros(1)
    return AnchorFit(
        n_boxes=len(boxes), n_anchors=len(anchors), best_iou=best_np,
        coverage={float(t): float((best_np >= t).mean()) if len(best_np) else 0.0 for t in thresholds},
        anchor_size_range=(float(a_size.min()), float(a_size.max())),
        box_size_quantiles={p: float(np.percentile(sizes, p)) for p in (10, 50, 90)},
        sampled_from=sampled_from, _areas=areas)


def candidate_anchors(boxes: Tensor, cfg: DetectorConfig, n_levels: int) -> list[DetectorConfig]:
    """RetinaNet anchor settings fitted to ``boxes`` (input pixels) for ``cfg``'s model with ``n_levels`` levels.

    Sizes: with the pyramid, base sizes at evenly spaced quantiles of the boxes' sqrt(area) (the middle of a
    level's 3 octave scales on the quantile), or the default 4 x stride pattern scaled down or up to the boxes'
    10th percentile; with the single ``last`` level, its sizes at 5 quantiles. Ratios: the default 0.5 / 1 / 2, or
    the boxes' own 10/50/90 % height / width."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6).numpy()
    sizes = np.sqrt(wh[:, 0] * wh[:, 1])
    if cfg.feature_extractor == "last":
        size_sets = [tuple(sorted({max(1, round(float(v))) for v in np.percentile(sizes, (10, 30, 50, 70, 90))}))]
    else:
        octave = 2 ** (1 / 3)
        quantile = np.maximum.accumulate(np.percentile(sizes, np.linspace(10, 90, n_levels)) / octave)
        first = np.percentile(sizes, 10) / octave
        size_sets = [tuple(max(1, round(float(v))) for v in quantile),
                     tuple(max(1, round(float(first * 2 ** i))) for i in range(n_levels))]
    own = tuple(sorted({max(0.01, round(float(v), 2)) for v in np.percentile(wh[:, 1] / wh[:, 0], (10, 50, 90))}))
    ratio_sets = [(0.5, 1.0, 2.0), own] if own != (0.5, 1.0, 2.0) else [own]
    return [dataclasses.replace(cfg, anchor_sizes=s, anchor_ratios=r) for s in dict.fromkeys(size_sets)
            for r in ratio_sets]


def fit_config(boxes: Tensor, cfg: DetectorConfig, max_boxes: int | None = None, seed: int = 0) -> AnchorFit:
    """``anchor_fit`` of ``boxes`` (input pixels) to the anchors of ``cfg``'s model; when coverage is low and the
    head is RetinaNet, ``suggestion`` holds the ``candidate_anchors`` setting that covers the most of the same boxes,
    if it covers more than ``cfg``'s own."""
    anchors, levels = config_anchors(cfg)
    fit = anchor_fit(boxes, anchors, max_boxes=max_boxes, seed=seed, levels=levels)
    custom = cfg.anchor_sizes is not None or cfg.anchor_ratios is not None
    fit.anchors_name, fit.head = ("the --anchor-sizes/--anchor-ratios anchors" if custom else "the default anchors",
                                  cfg.head)
    if fit.low and cfg.head == "retinanet":
        sample, _ = _sample(boxes, max_boxes, seed)  # the boxes of the fit above
        best = fit.coverage[0.5]
        for candidate in candidate_anchors(sample, cfg, len(levels)):
            c_anchors, c_levels = config_anchors(candidate)
            coverage = anchor_fit(sample, c_anchors, levels=c_levels).coverage[0.5]
            if coverage > best:
                best = coverage
                fit.suggestion = AnchorSuggestion(candidate.anchor_sizes, candidate.anchor_ratios, coverage)
    return fit
