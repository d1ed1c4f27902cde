"""Batched detection post-processing for torchvision's RetinaNet, FCOS and SSD heads.

torchvision's ``postprocess_detections`` loops in Python over images x pyramid levels (x classes for SSD), selects
candidates with boolean-mask indexing and ``where`` / ``nonzero`` and runs one NMS per image: on a GPU that is about
2,900 operator launches and 200 host syncs for a batch of 8, far more time than the head itself. The functions here
do the same work for the whole batch with fixed-shape tensor ops:

* scores at or below ``score_thresh`` become ``-inf`` and a ``topk(min(topk_candidates, N_l * C))`` per image and
  level keeps the candidates torchvision keeps (a validity mask marks the ``-inf`` fillers);
* boxes are decoded (``box_coder.decode_single`` / ``BoxLinearCoder.decode`` arithmetic, op for op) and clipped to
  each image's own size;
* one ``torchvision.ops.nms`` call serves the whole batch: boxes are shifted along x by their label and along y by
  their image, so boxes of different images or classes never overlap; the invalid fillers get a group of their own
  (a virtual image ``B``), so they can never suppress a real candidate, and are dropped afterwards. On CPU (no
  syncs to save there, and an NMS costs the square of its input) the default is one ``nms`` call per image instead,
  on its valid candidates only, and per class above ``PER_CLASS_NMS_MIN`` of them; ``nms_per_image`` chooses;
* the survivors are regrouped per image with stable sorts (keeping NMS's descending-score order), cut to
  ``detections_per_img`` and split with a single ``tolist`` of the per-image counts, the only host sync (plus the
  one inside CUDA ``nms`` itself, which needs it to size its output).

The results equal torchvision's (same candidates, same order, boxes and scores to float rounding); torchvision's
per-image code stays the oracle in ``tests/test_postprocess.py``. Only exactly equal scores may come out in another
order (or, at a ``topk`` / NMS boundary, as another of the tied candidates): torchvision leaves their order to
non-stable sorts, here it is fixed (level, then ``topk`` order; NMS sorts stably). All arithmetic is float32 whatever the inputs'
dtype; outputs are on the inputs' device.

Inputs per level are lists (torchvision's ``split_head_outputs``): ``cls_logits [B, N_l, C]``, ``bbox_regression
[B, N_l, 4]`` (``bbox_ctrness [B, N_l, 1]`` for FCOS) and ``anchors [N_l, 4]`` shared by all images or ``[B, N_l, 4]``.
Head outputs may instead be given unsplit (``[B, N, ...]`` with ``N = sum N_l``); the level sizes then come from the
anchors. ``split_levels`` does torchvision's split when a list is wanted.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder
from torchvision.ops import nms

__all__ = ["fcos_postprocess", "retinanet_postprocess", "split_levels", "ssd_postprocess"]

Detections = list[dict[str, Tensor]]


def split_levels(tensor: Tensor, num_anchors_per_level: Sequence[int]) -> list[Tensor]:
    """``tensor [B, N, ...]`` (or anchors ``[N, 4]`` when ``dim`` is 2) split along the anchor axis into levels.

    The same split torchvision's ``forward`` applies to ``head_outputs`` (``split(num_anchors_per_level, dim=1)``)
    and to each image's anchors (``dim=0``) before ``postprocess_detections``; views, no copies.
    """
    dim = 0 if tensor.dim() == 2 else 1
    return list(tensor.split(list(num_anchors_per_level), dim=dim))


# ---------------------------------------------------------------------------------------------------------- helpers
def _levels(x: Tensor | Sequence[Tensor]) -> Tensor:
    """Per-level ``[B, N_l, ...]`` tensors as one float32 ``[B, N, ...]`` (a tensor passes through)."""
    if isinstance(x, Tensor):
        return x.float()
    return (x[0] if len(x) == 1 else torch.cat(list(x), dim=1)).float()


def _anchors(anchors: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """Anchors as one float32 ``[N, 4]`` or ``[B, N, 4]`` tensor, and the number of anchors per level."""
    if isinstance(anchors, Tensor):
        anchors = [anchors]
    sizes = [int(a.shape[-2]) for a in anchors]
    dim = anchors[0].dim() - 2
    cat = anchors[0] if len(anchors) == 1 else torch.cat(list(anchors), dim=dim)
    return cat.float(), sizes


def _take(values: Tensor, idx: Tensor) -> Tensor:
    """``values [B, N, D]`` (or ``[N, D]``, shared by the batch) at anchor indices ``idx [B, K]`` -> ``[B, K, D]``."""
    if values.dim() == 2:
        return values[idx]
    return values.gather(1, idx.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _div(t: Tensor, a: float, b: float) -> Tensor:
    """``t[..., 0] / a`` and ``t[..., 1] / b`` (python scalars, as torchvision divides)."""
    if a == b:
        return t / a
    return torch.cat((t[..., :1] / a, t[..., 1:] / b), dim=-1)


def _decode(box_coder, rel_codes: Tensor, anchors: Tensor) -> Tensor:
    """Boxes ``[..., 4]`` from offsets and anchors of the same shape, torchvision's arithmetic op for op.

    ``BoxCoder.decode_single`` builds two device tensors from Python scalars (a host-to-device copy each) and
    ``BoxLinearCoder.decode`` splits coordinates one by one; this computes x and y together with Python scalars.
    """
    if type(box_coder) is BoxCoder:
        wx, wy, ww, wh = box_coder.weights
        size = anchors[..., 2:] - anchors[..., :2]
        ctr = anchors[..., :2] + 0.5 * size
        d_wh = _div(rel_codes[..., 2:], ww, wh).clamp(max=box_coder.bbox_xform_clip)
        pred_ctr = _div(rel_codes[..., :2], wx, wy) * size + ctr
        half = 0.5 * (torch.exp(d_wh) * size)
        return torch.cat((pred_ctr - half, pred_ctr + half), dim=-1)
    if type(box_coder) is BoxLinearCoder:
        ctr = 0.5 * (anchors[..., :2] + anchors[..., 2:])
        if box_coder.normalize_by_size:
            size = anchors[..., 2:] - anchors[..., :2]
            rel_codes = rel_codes * torch.cat((size, size), dim=-1)
        return torch.cat((ctr - rel_codes[..., :2], ctr + rel_codes[..., 2:]), dim=-1)
    shape = rel_codes.shape  # any other coder: its own decode_single on flattened boxes
    return box_coder.decode_single(rel_codes.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(shape)


def _clip(boxes: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """``boxes [B, K, 4]`` clamped to ``[0, w] x [0, h]`` of each image (``clip_boxes_to_image`` per image)."""
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32)
    if boxes.device.type == "cuda":
        limits = limits.pin_memory()  # a pageable copy would wait for the stream
    limits = limits.to(boxes.device, non_blocking=True)
    return boxes.clamp(min=0).minimum(limits[:, None, :])


def _select_levels(scores: Tensor, sizes: Sequence[int], score_thresh: float,
                   topk_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's per-level candidate selection for ``scores [B, N, C]`` with fixed shapes.

    Per image and level: scores ``> score_thresh``, then the best ``min(topk_candidates, #kept)`` in descending
    order. Here every level keeps ``min(topk_candidates, N_l * C)`` slots and the ones beyond ``#kept`` are marked
    invalid. Returns ``scores [B, K]`` (``-inf`` where invalid), anchor indices ``[B, K]`` into the concatenated
    levels and labels ``[B, K]``.
    """
    num_classes = scores.shape[-1]
    masked = torch.where(scores > score_thresh, scores, float("-inf"))  # NaN fails "> thresh" too
    values, flat_idx, start = [], [], 0
    for level, n in zip(masked.split(list(sizes), dim=1), sizes):
        v, i = level.reshape(level.shape[0], -1).topk(min(topk_candidates, n * num_classes), dim=1)
        values.append(v)
        flat_idx.append(i + start * num_classes)
        start += n
    values = torch.cat(values, dim=1)
    flat_idx = torch.cat(flat_idx, dim=1)
    return values, torch.div(flat_idx, num_classes, rounding_mode="floor"), flat_idx % num_classes


# Above this many candidate slots per image, CPU NMS runs per class on the valid ones: its cost is the square of its
# input, and a class's candidates never suppress another's (torchvision's batched_nms switches at 1,000 boxes on a
# CPU too).
PER_CLASS_NMS_MIN = 1000


def _image_nms(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, nms_thresh: float) -> Tensor:
    """One image's kept candidate indices in NMS's own order (descending score; equal scores by index, as its
    stable sort leaves them; ``boxes`` already shifted apart per label): one ``nms`` call over its candidate slots;
    with more slots than ``PER_CLASS_NMS_MIN``, one over its valid candidates, or one per label when those are
    more than that too. It reads those sizes on the host: the CPU path, where that costs nothing."""
    if len(scores) <= PER_CLASS_NMS_MIN:  # few candidates: one call, the invalid ones cost one pass
        return nms(boxes, scores, nms_thresh)
    idx = valid.nonzero().squeeze(1)
    if len(idx) <= PER_CLASS_NMS_MIN:
        return idx[nms(boxes[idx], scores[idx], nms_thresh)]
    idx_labels = labels[idx]
    idx = idx[idx_labels.argsort(stable=True)]  # grouped by label, index order within a group
    grouped_boxes, grouped_scores = boxes[idx], scores[idx]
    parts, start = [], 0
    for n in idx_labels.bincount().tolist():
        if n:
            parts.append(nms(grouped_boxes[start:start + n], grouped_scores[start:start + n], nms_thresh) + start)
            start += n
    keep = idx[torch.cat(parts)].sort().values  # index order, then a stable sort by score: one nms call's order
    return keep[scores[keep].sort(descending=True, stable=True).indices]


def _batched_nms_split(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, nms_thresh: float,
                       detections_per_img: int, nms_per_image: bool | None) -> Detections:
    """NMS per image and class for candidates ``[B, K, ...]``; per-image dicts, best first.

    Equal to running ``batched_nms`` on each image's valid candidates and keeping the first ``detections_per_img``.
    """
    batch, k = scores.shape
    device = boxes.device
    flat_boxes, flat_scores, flat_valid = boxes.reshape(-1, 4), scores.reshape(-1), valid.reshape(-1)
    flat_labels = labels.reshape(-1)
    if flat_scores.numel() == 0:
        empty = {"boxes": flat_boxes, "scores": flat_scores, "labels": flat_labels}
        return [dict(empty) for _ in range(batch)]

    # Group = (image, label). Boxes lie in [0, max]; shifting x by label * (max + 1) and y by image * (max + 1) puts
    # different groups side by side (IoU 0), so one NMS equals one per group. Invalid slots (score -inf, last in NMS
    # order) form an image of their own, so they never suppress a real candidate, and all get one unit box with
    # label 0: the first suppresses the others, which keeps NMS's own work (CUDA: one pass per kept box) small.
    invalid = ~flat_valid
    image = torch.arange(batch, device=device)[:, None].expand(batch, k).reshape(-1).masked_fill(invalid, batch)
    unit_box = (torch.arange(4, device=device) >= 2).to(flat_boxes.dtype)  # (0, 0, 1, 1), no host-to-device copy
    nms_boxes = torch.where(flat_valid[:, None], flat_boxes, unit_box)
    shift = torch.stack((flat_labels.masked_fill(invalid, 0), image), dim=1).to(nms_boxes) * (nms_boxes.max() + 1)
    nms_boxes = nms_boxes + shift.repeat(1, 2)
    if nms_per_image is None:
        nms_per_image = device.type == "cpu"
    if nms_per_image:  # each call costs (its boxes)^2, and a CPU has no syncs to save
        keep = torch.cat([_image_nms(b, s, lab, v, nms_thresh) + i * k for i, (b, s, lab, v) in
                          enumerate(zip(nms_boxes.view(batch, k, 4), flat_scores.view(batch, k),
                                        flat_labels.view(batch, k), flat_valid.view(batch, k)))])
    else:
        keep = nms(nms_boxes, flat_scores, nms_thresh)  # invalid scores are -inf already

    # keep is in descending score order (per image when per image); stable sorts regroup it per image without
    # changing that order, then the ones past detections_per_img go to the bin (index batch) with the invalid.
    kept_image, order = image[keep].sort(stable=True)
    keep = keep[order]
    counts = torch.zeros(batch + 1, dtype=torch.int64, device=device).scatter_add_(
        0, kept_image, torch.ones_like(kept_image))
    rank = torch.arange(keep.numel(), device=device) - (counts.cumsum(0) - counts)[kept_image]
    kept_image, order = kept_image.masked_fill(rank >= detections_per_img, batch).sort(stable=True)
    keep = keep[order]
    counts = torch.zeros(batch + 1, dtype=torch.int64, device=device).scatter_add_(
        0, kept_image, torch.ones_like(kept_image))

    sizes = counts.tolist()  # the one host sync: output sizes
    parts = [t.split(sizes) for t in (flat_boxes[keep], flat_scores[keep], flat_labels[keep])]
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(*(p[:batch] for p in parts))]


def _dense_postprocess(scores: Tensor, bbox_regression: Tensor | Sequence[Tensor], anchors: Tensor,
                       sizes: list[int], image_sizes: Sequence[tuple[int, int]], box_coder, score_thresh: float,
                       nms_thresh: float, detections_per_img: int, topk_candidates: int,
                       mask_background: bool, nms_per_image: bool | None) -> Detections:
    """RetinaNet / FCOS after scoring: ``scores [B, N, C]`` per anchor and class."""
    if len(image_sizes) != scores.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {scores.shape[0]}")
    if scores.shape[1] != sum(sizes):
        raise ValueError(f"head outputs have {scores.shape[1]} anchors, the anchors {sum(sizes)}")
    if mask_background:
        scores[..., 0] = 0.0  # sigmoid(-inf): exactly what a -inf background logit gives
    values, anchor_idx, labels = _select_levels(scores, sizes, score_thresh, topk_candidates)
    boxes = _decode(box_coder, _take(_levels(bbox_regression), anchor_idx), _take(anchors, anchor_idx))
    boxes = _clip(boxes, image_sizes)
    return _batched_nms_split(boxes, values, labels, values > score_thresh, nms_thresh, detections_per_img,
                              nms_per_image)


# ---------------------------------------------------------------------------------------------------------- public
def retinanet_postprocess(cls_logits: Tensor | Sequence[Tensor], bbox_regression: Tensor | Sequence[Tensor],
                          anchors: Tensor | Sequence[Tensor], image_sizes: Sequence[tuple[int, int]], *,
                          box_coder: BoxCoder, score_thresh: float, nms_thresh: float, detections_per_img: int,
                          topk_candidates: int, mask_background: bool = False,
                          nms_per_image: bool | None = None) -> Detections:
    """Batched ``RetinaNet.postprocess_detections``.

    Args:
        cls_logits: per level ``[B, N_l, C]`` (or all levels concatenated, ``[B, N, C]``).
        bbox_regression: per level ``[B, N_l, 4]`` (or ``[B, N, 4]``).
        anchors: per level ``[N_l, 4]`` shared by every image, or ``[B, N_l, 4]``; they define the levels.
        image_sizes: ``(height, width)`` per image, for clipping.
        box_coder: the head's ``BoxCoder``.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: the model's settings.
        mask_background: class 0 (``__background__``) scores 0, as if its logit were ``-inf``, so it never takes a
            slot (what our detectors do before torchvision's post-processing).
        nms_per_image: one ``nms`` call per image instead of one for the batch (same result). ``None``: per image
            on CPU, where an NMS costs the square of its input and there are no host syncs to save; one call for the
            whole batch on accelerators (one host sync instead of one per image).

    Returns:
        Per image ``{"boxes" [k, 4] float32, "scores" [k] float32, "labels" [k] int64}``, best score first, as
        torchvision returns them.
    """
    anchors, sizes = _anchors(anchors)
    scores = torch.sigmoid(_levels(cls_logits))
    return _dense_postprocess(scores, bbox_regression, anchors, sizes, image_sizes, box_coder, score_thresh,
                              nms_thresh, detections_per_img, topk_candidates, mask_background,
                              nms_per_image)


def fcos_postprocess(cls_logits: Tensor | Sequence[Tensor], bbox_regression: Tensor | Sequence[Tensor],
                     bbox_ctrness: Tensor | Sequence[Tensor], anchors: Tensor | Sequence[Tensor],
                     image_sizes: Sequence[tuple[int, int]], *, box_coder: BoxLinearCoder, score_thresh: float,
                     nms_thresh: float, detections_per_img: int, topk_candidates: int,
                     mask_background: bool = False, nms_per_image: bool | None = None) -> Detections:
    """Batched ``FCOS.postprocess_detections``: scores are ``sqrt(sigmoid(cls) * sigmoid(ctrness))``.

    Arguments as ``retinanet_postprocess`` (``mask_background``, ``nms_per_image`` included), plus
    ``bbox_ctrness`` per level ``[B, N_l, 1]`` (or ``[B, N, 1]``); ``box_coder`` is the head's ``BoxLinearCoder``.
    """
    anchors, sizes = _anchors(anchors)
    scores = torch.sqrt(torch.sigmoid(_levels(cls_logits)) * torch.sigmoid(_levels(bbox_ctrness)))
    return _dense_postprocess(scores, bbox_regression, anchors, sizes, image_sizes, box_coder, score_thresh,
                              nms_thresh, detections_per_img, topk_candidates, mask_background,
                              nms_per_image)


def ssd_postprocess(bbox_regression: Tensor, cls_logits: Tensor, anchors: Tensor | Sequence[Tensor],
                    image_sizes: Sequence[tuple[int, int]], *, box_coder: BoxCoder, score_thresh: float,
                    nms_thresh: float, detections_per_img: int, topk_candidates: int,
                    nms_per_image: bool | None = None) -> Detections:
    """Batched ``SSD.postprocess_detections``.

    Args:
        bbox_regression: ``[B, N, 4]``.
        cls_logits: ``[B, N, C]``; softmax over classes, class 0 (background) is never a detection.
        anchors: ``[N, 4]`` shared by every image or ``[B, N, 4]`` (a per-image list of ``[N, 4]``, as SSD's
            ``forward`` holds them, is stacked).
        image_sizes, box_coder, score_thresh, nms_thresh, detections_per_img, topk_candidates, nms_per_image: as
            ``retinanet_postprocess``. Per image and foreground class: scores ``> score_thresh``, then the best
            ``min(topk_candidates, #kept)``.

    Returns:
        Per image ``{"boxes", "scores", "labels"}``, best score first, as torchvision returns them.
    """
    if not isinstance(anchors, Tensor):
        anchors = torch.stack(list(anchors))
    anchors = anchors.float()
    batch, n, num_classes = cls_logits.shape
    if len(image_sizes) != batch:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {batch}")
    if anchors.shape[-2] != n:
        raise ValueError(f"head outputs have {n} anchors, the anchors {anchors.shape[-2]}")
    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, N]
    masked = torch.where(scores > score_thresh, scores, float("-inf"))
    values, anchor_idx = masked.topk(min(topk_candidates, n), dim=-1)  # [B, C-1, k]
    k = values.shape[-1]
    labels = torch.arange(1, num_classes, device=values.device)[:, None].expand(num_classes - 1, k).reshape(1, -1)
    labels = labels.expand(batch, -1)
    values, anchor_idx = values.reshape(batch, -1), anchor_idx.reshape(batch, -1)
    if anchors.dim() == 2:
        anchors = anchors.expand(batch, -1, -1)
    boxes = _clip(_decode(box_coder, bbox_regression.float(), anchors), image_sizes)  # all N, as torchvision
    boxes = _take(boxes, anchor_idx)
    return _batched_nms_split(boxes, values, labels, values > score_thresh, nms_thresh, detections_per_img,
                              nms_per_image)
