"""Batched target assignment and losses for torchvision's RetinaNet, FCOS and SSD heads.

torchvision matches anchors and computes these losses with a Python loop per image, ``nonzero`` / boolean-mask
indexing and host syncs (``.item()``, ``max(1, tensor)``); on a GPU those loops and syncs dominate a training step.
The functions here do the same work for a whole batch with fixed-shape tensor ops (``where``, ``gather``, masks,
``sort``), so they never read device values on the host and can run under ``torch.compile`` / CUDA graphs. They
reproduce torchvision's numbers (same formulas, same tie-breaking); torchvision's per-image code stays the oracle in
``tests/test_losses.py``.

Ground truth comes padded (see ``pad_targets``): ``gt_boxes [B, M, 4]`` xyxy, ``gt_labels [B, M]`` int64 and
``gt_valid [B, M]`` bool; padded entries are ignored. Anchors are ``[N, 4]`` (shared by every image) or
``[B, N, 4]``. Matched indices (``-1`` background, ``-2`` ignored) index the padded ``M`` axis. All loss arithmetic
is float32 whatever the head outputs' dtype.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder

BELOW_LOW_THRESHOLD = -1  # torchvision's Matcher codes
BETWEEN_THRESHOLDS = -2

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "PaddedTargets",
    "batched_box_iou",
    "fcos_loss",
    "fcos_matches",
    "pad_targets",
    "retinanet_loss",
    "retinanet_matches",
    "ssd_loss",
    "ssd_matches",
]


# ------------------------------------------------------------------------------------------------ targets
class PaddedTargets(NamedTuple):
    """A batch's ground truth padded to ``M`` boxes per image: ``boxes [B, M, 4]`` xyxy float32, ``labels [B, M]``
    int64, ``valid [B, M]`` bool (False for padding)."""

    boxes: Tensor
    labels: Tensor
    valid: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PaddedTargets":
        return PaddedTargets(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> "PaddedTargets":
        return PaddedTargets(*(t.pin_memory() for t in self))


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device | str | None = None,
                max_boxes: int | None = None) -> PaddedTargets:
    """torchvision-style target dicts (``boxes [k, 4]`` xyxy, ``labels [k]``) -> padded ``(boxes, labels, valid)``.

    ``boxes [B, M, 4]`` float32, ``labels [B, M]`` int64, ``valid [B, M]`` bool; each image's boxes come first, in
    their given order (matching ties resolve to the lowest index, as in torchvision). ``M`` is the largest count in
    the batch, or ``max_boxes`` for the same shapes every step. Runs on the host (data loading), not in the step.
    """
    counts = [int(t["boxes"].shape[0]) for t in targets]
    m = max(counts, default=0) if max_boxes is None else max_boxes
    if counts and max(counts) > m:
        raise ValueError(f"an image has {max(counts)} boxes, more than max_boxes={m}")
    if device is None:
        device = targets[0]["boxes"].device if len(targets) else "cpu"
    b = len(targets)
    boxes = torch.zeros(b * m, 4, dtype=torch.float32, device=device)
    labels = torch.zeros(b * m, dtype=torch.int64, device=device)
    valid = torch.zeros(b * m, dtype=torch.bool, device=device)
    if sum(counts):  # one copy per tensor for the whole batch: the slots of image i are i * m ... i * m + k_i - 1
        slots = torch.tensor([i * m + j for i, k in enumerate(counts) for j in range(k)], device=device)
        given = [t for t in targets if t["boxes"].shape[0]]
        boxes.index_copy_(0, slots, torch.cat([t["boxes"].as_subclass(Tensor) for t in given]).to(
            device=device, dtype=torch.float32))
        labels.index_copy_(0, slots, torch.cat([t["labels"] for t in given]).to(device=device, dtype=torch.int64))
        valid.index_fill_(0, slots, True)
    return PaddedTargets(boxes.view(b, m, 4), labels.view(b, m), valid.view(b, m))


def _prepare(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_labels: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """float32 ``[B|1, N, 4]`` anchors; at least one (invalid) gt column so reductions over M are defined."""
    anchors = anchors.float()
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0)
    gt_boxes = gt_boxes.float()
    if gt_boxes.shape[1] == 0:  # static shape: a batch padded to M=0 gets one padding column
        b = gt_boxes.shape[0]
        gt_boxes = gt_boxes.new_zeros(b, 1, 4)
        gt_valid = gt_valid.new_zeros(b, 1)
        gt_labels = None if gt_labels is None else gt_labels.new_zeros(b, 1)
    return anchors, gt_boxes, gt_valid, None if gt_labels is None else gt_labels.long()


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[B, M, N]`` of ``boxes1 [B, M, 4]`` and ``boxes2 [B|1, N, 4]``, bit-identical to ``box_ops.box_iou``.

    x and y overlaps are kept separate (no ``[B, M, N, 2]`` intermediates); the float ops are torchvision's.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    b1 = boxes1[:, :, None, :]
    b2 = boxes2[:, None, :, :]
    w = (torch.minimum(b1[..., 2], b2[..., 2]) - torch.maximum(b1[..., 0], b2[..., 0])).clamp(min=0)
    h = (torch.minimum(b1[..., 3], b2[..., 3]) - torch.maximum(b1[..., 1], b2[..., 1])).clamp(min=0)
    inter = w * h
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union


# ------------------------------------------------------------------------------------------------ matching
def _matcher(iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool) -> Tensor:
    """torchvision's ``Matcher`` on ``iou [B, M, N]``; invalid gt rows never match. Returns ``[B, N]`` int64."""
    valid = gt_valid[:, :, None]
    iou = torch.where(valid, iou, -1.0)  # below every real IoU, so padding never wins the max over gt
    matched_vals, all_matches = iou.max(dim=1)  # first index on ties, like torchvision
    matches = torch.where(matched_vals < low, BELOW_LOW_THRESHOLD,
                          torch.where(matched_vals < high, BETWEEN_THRESHOLDS, all_matches))
    if allow_low_quality_matches:
        # every anchor that is some gt's best (ties included, even at IoU 0) takes its best gt back
        highest = iou.max(dim=2, keepdim=True).values
        update = ((iou == highest) & valid).any(dim=1)
        matches = torch.where(update, all_matches, matches)
    return matches


def retinanet_matches(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, *, fg_iou: float = 0.5,
                      bg_iou: float = 0.4, allow_low_quality_matches: bool = True) -> Tensor:
    """``[B, N]`` matched gt index per anchor as ``RetinaNet.compute_loss`` assigns it (-1 bg, -2 ignored)."""
    anchors, gt_boxes, gt_valid, _ = _prepare(anchors, gt_boxes, gt_valid)
    iou = batched_box_iou(gt_boxes, anchors)
    return _matcher(iou, gt_valid, fg_iou, bg_iou, allow_low_quality_matches)


def ssd_matches(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, *, iou_thresh: float = 0.5) -> Tensor:
    """``[B, N]`` matched gt index per default box as SSD's ``SSDMatcher`` assigns it (-1 background).

    Each gt also takes its best default box (first on ties); when several gt share one, the highest gt index wins
    (torchvision's ``matches[best] = arange(M)`` writes in order on the CPU).
    """
    anchors, gt_boxes, gt_valid, _ = _prepare(anchors, gt_boxes, gt_valid)
    iou = batched_box_iou(gt_boxes, anchors)
    matches = _matcher(iou, gt_valid, iou_thresh, iou_thresh, False)
    m = iou.shape[1]
    best_anchor = iou.max(dim=2).indices  # [B, M], first on ties
    gt_index = torch.where(gt_valid, torch.arange(m, device=iou.device), -1)
    # the highest gt index claiming each anchor (amax is order-independent, so deterministic on any device)
    forced = torch.full_like(matches, -1).scatter_reduce_(1, best_anchor, gt_index, reduce="amax")
    return torch.where(forced >= 0, forced, matches)


def fcos_matches(anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, gt_valid: Tensor, *,
                 center_sampling_radius: float = 1.5) -> Tensor:
    """``[B, N]`` matched gt index per anchor point as ``FCOS.compute_loss`` assigns it (-1 background).

    Center sampling, per-level scale ranges from the anchor sizes, and the smallest gt wins through torchvision's own
    ``match * (1e8 - area)`` score (float32 rounding there makes near-equal areas tie; the first index wins).
    """
    anchors, gt_boxes, gt_valid, _ = _prepare(anchors, gt_boxes, gt_valid)
    n = anchors.shape[1]
    centers = (anchors[..., :2] + anchors[..., 2:]) / 2  # [B|1, N, 2]
    sizes = anchors[..., 2] - anchors[..., 0]  # [B|1, N]
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
    x, y = centers[..., 0, None], centers[..., 1, None]  # [B|1, N, 1]
    x0, y0, x1, y1 = (gt_boxes[:, None, :, i] for i in range(4))  # [B, 1, M]
    # center sampling: the point is within radius * anchor size of the gt center (Chebyshev distance)
    center_dist = torch.maximum((x - gt_centers[:, None, :, 0]).abs(), (y - gt_centers[:, None, :, 1]).abs())
    match = center_dist < center_sampling_radius * sizes[..., None]
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    match &= torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0  # inside the gt
    # each level covers a range of regression distances; the first has no floor, the last no ceiling
    pos = torch.arange(n, device=anchors.device)
    lower = torch.where(pos < num_anchors_per_level[0], 0.0, sizes * 4)
    upper = torch.where(pos >= n - num_anchors_per_level[-1], float("inf"), sizes * 8)
    reach = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    match &= (reach > lower[..., None]) & (reach < upper[..., None])
    match &= gt_valid[:, None, :]
    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # [B, M]
    score = match.to(torch.float32) * (1e8 - areas[:, None, :])
    best, matched = score.max(dim=2)
    return torch.where(best < 1e-5, -1, matched)


# ------------------------------------------------------------------------------------------------ helpers
def _gather_gt(values: Tensor, matches: Tensor) -> Tensor:
    """``values [B, M, ...]`` at ``matches [B, N]`` (negative -> index 0; mask the result)."""
    idx = matches.clamp(min=0)
    if values.dim() == 2:
        return values.gather(1, idx)
    return values.gather(1, idx[..., None].expand(*idx.shape, values.shape[-1]))


def _one_hot(labels: Tensor, foreground: Tensor, num_classes: int) -> Tensor:
    """float one-hot ``[B, N, C]`` of ``labels`` where ``foreground``; labels outside [0, C) give a zero row."""
    classes = torch.arange(num_classes, device=labels.device)
    return ((labels[..., None] == classes) & foreground[..., None]).to(torch.float32)


def _sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2) -> Tensor:
    """``torchvision.ops.sigmoid_focal_loss(reduction="none")``, same float ops."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * loss


def _encode(box_coder: BoxCoder, gt: Tensor, anchors: Tensor) -> Tensor:
    """``BoxCoder.encode_single(gt, anchors)`` on ``[..., 4]`` (Python-float weights: no host-to-device copy)."""
    wx, wy, ww, wh = box_coder.weights
    ex_w = anchors[..., 2] - anchors[..., 0]
    ex_h = anchors[..., 3] - anchors[..., 1]
    ex_x = anchors[..., 0] + 0.5 * ex_w
    ex_y = anchors[..., 1] + 0.5 * ex_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_x = gt[..., 0] + 0.5 * gt_w
    gt_y = gt[..., 1] + 0.5 * gt_h
    return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                        ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=-1)


def _decode(box_coder: BoxCoder, codes: Tensor, anchors: Tensor) -> Tensor:
    """``BoxCoder.decode_single(codes, anchors)`` on ``[..., 4]``."""
    wx, wy, ww, wh = box_coder.weights
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = torch.clamp(codes[..., 2] / ww, max=box_coder.bbox_xform_clip)
    dh = torch.clamp(codes[..., 3] / wh, max=box_coder.bbox_xform_clip)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=-1)


def _iou_losses(boxes1: Tensor, boxes2: Tensor, loss_type: str, eps: float) -> Tensor:
    """Elementwise ``generalized / distance / complete_box_iou_loss(reduction="none")`` over ``[..., 4]``."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    ix = torch.min(x2, x2g) - torch.max(x1, x1g)
    iy = torch.min(y2, y2g) - torch.max(y1, y1g)
    intsct = torch.where((iy > 0) & (ix > 0), ix * iy, 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsct
    iou = intsct / (union + eps)
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    if loss_type == "giou":
        area_c = (xc2 - xc1) * (yc2 - yc1)
        return 1 - (iou - ((area_c - union) / (area_c + eps)))
    diagonal = ((xc2 - xc1) ** 2) + ((yc2 - yc1) ** 2) + eps
    centers = (((x2 + x1) / 2 - (x1g + x2g) / 2) ** 2) + (((y2 + y1) / 2 - (y1g + y2g) / 2) ** 2)
    loss = 1 - iou + (centers / diagonal)
    if loss_type == "diou":
        return loss
    v = (4 / (torch.pi**2)) * torch.pow((torch.atan((x2g - x1g) / (y2g - y1g)) - torch.atan((x2 - x1) / (y2 - y1))), 2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return loss + alpha * v


def _box_loss(loss_type: str, box_coder: BoxCoder, anchors: Tensor, gt: Tensor, regression: Tensor,
              beta: float, eps: float) -> Tensor:
    """torchvision's ``_box_loss`` per anchor, summed over the 4 coordinates where it sums them: ``[B, N]``."""
    if loss_type in ("l1", "smooth_l1"):
        target = _encode(box_coder, gt, anchors)
        if loss_type == "l1":
            return F.l1_loss(regression, target, reduction="none").sum(-1)
        return F.smooth_l1_loss(regression, target, reduction="none", beta=beta).sum(-1)
    if loss_type in ("giou", "diou", "ciou"):
        return _iou_losses(_decode(box_coder, regression, anchors), gt, loss_type, eps)
    raise ValueError(f"unsupported box loss {loss_type!r} (l1, smooth_l1, giou, diou, ciou)")


# ------------------------------------------------------------------------------------------------ losses
def retinanet_loss(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, gt_boxes: Tensor,
                   gt_labels: Tensor, gt_valid: Tensor, *, box_coder: BoxCoder | None = None, fg_iou: float = 0.5,
                   bg_iou: float = 0.4, allow_low_quality_matches: bool = True, loss_type: str = "l1",
                   beta_smooth_l1: float = 1.0, iou_loss_eps: float = 1e-7) -> dict[str, Tensor]:
    """``RetinaNet.compute_loss`` for a batch: ``{"classification", "bbox_regression"}``.

    ``cls_logits [B, N, C]``, ``bbox_regression [B, N, 4]``. Classification: sigmoid focal loss over the anchors
    that are not ignored, one-hot of the gt label (class 0 included), / max(1, foreground) per image, mean over
    images. Regression: ``loss_type`` (torchvision's ``RetinaNetRegressionHead._loss_type``: "l1" by default, "giou"
    in the v2 recipe) over foreground anchors, / max(1, foreground) per image, mean over images. ``box_coder``
    defaults to torchvision's ``BoxCoder((1, 1, 1, 1))``.
    """
    box_coder = box_coder or BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchors, gt_boxes, gt_valid, gt_labels = _prepare(anchors, gt_boxes, gt_valid, gt_labels)
    cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
    batch = cls_logits.shape[0]
    with torch.no_grad():
        iou = batched_box_iou(gt_boxes, anchors)
        matches = _matcher(iou, gt_valid, fg_iou, bg_iou, allow_low_quality_matches)
    foreground = matches >= 0
    num_foreground = foreground.sum(dim=1).clamp(min=1)  # [B]

    target = _one_hot(_gather_gt(gt_labels, matches), foreground, cls_logits.shape[-1])
    focal = _sigmoid_focal_loss(cls_logits, target)
    focal = torch.where((matches != BETWEEN_THRESHOLDS)[..., None], focal, 0.0)
    classification = (focal.sum(dim=(1, 2)) / num_foreground).sum() / batch

    # background anchors regress onto themselves: finite everywhere, then masked out
    anchors = anchors.expand(batch, -1, -1)
    matched_gt = torch.where(foreground[..., None], _gather_gt(gt_boxes, matches), anchors)
    box = _box_loss(loss_type, box_coder, anchors, matched_gt, bbox_regression, beta_smooth_l1, iou_loss_eps)
    box = torch.where(foreground, box, 0.0)
    regression = (box.sum(dim=1) / num_foreground).sum() / max(1, batch)
    return {"classification": classification, "bbox_regression": regression}


def fcos_loss(cls_logits: Tensor, bbox_regression: Tensor, bbox_ctrness: Tensor, anchors: Tensor,
              num_anchors_per_level: Sequence[int], gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, *,
              box_coder: BoxLinearCoder | None = None, center_sampling_radius: float = 1.5) -> dict[str, Tensor]:
    """``FCOS.compute_loss`` for a batch: ``{"classification", "bbox_regression", "bbox_ctrness"}``.

    ``cls_logits [B, N, C]``, ``bbox_regression [B, N, 4]``, ``bbox_ctrness [B, N, 1]``; ``num_anchors_per_level``
    are Python ints (static). Sigmoid focal loss over all anchors, GIoU over foreground, centerness BCE over
    foreground, each / max(1, foreground of the whole batch). ``box_coder`` defaults to
    ``BoxLinearCoder(normalize_by_size=True)`` like ``FCOSHead``.
    """
    box_coder = box_coder or BoxLinearCoder(normalize_by_size=True)
    anchors, gt_boxes, gt_valid, gt_labels = _prepare(anchors, gt_boxes, gt_valid, gt_labels)
    cls_logits, bbox_regression, bbox_ctrness = cls_logits.float(), bbox_regression.float(), bbox_ctrness.float()
    batch = cls_logits.shape[0]
    with torch.no_grad():
        matches = fcos_matches(anchors, num_anchors_per_level, gt_boxes, gt_valid,
                               center_sampling_radius=center_sampling_radius)
    foreground = matches >= 0
    num_foreground = foreground.sum().clamp(min=1)

    target = _one_hot(_gather_gt(gt_labels, matches), foreground, cls_logits.shape[-1])
    classification = _sigmoid_focal_loss(cls_logits, target).sum() / num_foreground

    anchors = anchors.expand(batch, -1, -1)
    matched_gt = torch.where(foreground[..., None], _gather_gt(gt_boxes, matches), anchors)
    pred_boxes = box_coder.decode(bbox_regression, anchors)
    giou = torch.where(foreground, _iou_losses(pred_boxes, matched_gt, "giou", 1e-7), 0.0)
    regression = giou.sum() / num_foreground

    with torch.no_grad():
        reg_targets = box_coder.encode(anchors, matched_gt)
        left_right, top_bottom = reg_targets[..., 0::2], reg_targets[..., 1::2]  # slices: a list index is a host copy
        ctrness_target = torch.sqrt((left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                                    * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]))
        ctrness_target = torch.where(foreground, ctrness_target, 0.0)
    bce = F.binary_cross_entropy_with_logits(bbox_ctrness.squeeze(dim=2), ctrness_target, reduction="none")
    ctrness = torch.where(foreground, bce, 0.0).sum() / num_foreground
    return {"classification": classification, "bbox_regression": regression, "bbox_ctrness": ctrness}


def ssd_loss(bbox_regression: Tensor, cls_logits: Tensor, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
             gt_valid: Tensor, *, box_coder: BoxCoder | None = None, iou_thresh: float = 0.5,
             neg_to_pos_ratio: float = 3.0) -> dict[str, Tensor]:
    """``SSD.compute_loss`` (with SSD's matching) for a batch: ``{"bbox_regression", "classification"}``.

    ``bbox_regression [B, N, 4]``, ``cls_logits [B, N, C]`` (softmax over C, class 0 = background). Smooth L1 over
    matched default boxes; cross entropy over positives (label > 0) plus the ``neg_to_pos_ratio`` x positives
    hardest other boxes per image, ranked by torchvision's own descending sort; both / max(1, matched boxes of the
    batch). ``neg_to_pos_ratio`` is torchvision's ``(1 - positive_fraction) / positive_fraction``; ``box_coder``
    defaults to SSD's ``BoxCoder((10, 10, 5, 5))``.
    """
    box_coder = box_coder or BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchors, gt_boxes, gt_valid, gt_labels = _prepare(anchors, gt_boxes, gt_valid, gt_labels)
    cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
    batch, n, num_classes = cls_logits.shape
    with torch.no_grad():
        matches = ssd_matches(anchors, gt_boxes, gt_valid, iou_thresh=iou_thresh)
    matched = matches >= 0
    num_foreground = matched.sum().clamp(min=1)

    anchors = anchors.expand(batch, -1, -1)
    matched_gt = torch.where(matched[..., None], _gather_gt(gt_boxes, matches), anchors)
    target_regression = _encode(box_coder, matched_gt, anchors)
    box = F.smooth_l1_loss(bbox_regression, target_regression, reduction="none").sum(-1)
    regression = torch.where(matched, box, 0.0).sum() / num_foreground

    cls_targets = torch.where(matched, _gather_gt(gt_labels, matches), 0)
    cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1),
                               reduction="none").view(batch, n)
    # hard negative mining exactly as torchvision: positives (label > 0) go last, the top 3 x positives are kept
    positive = cls_targets > 0
    num_negative = neg_to_pos_ratio * positive.sum(1, keepdim=True)
    with torch.no_grad():
        negative_loss = torch.where(positive, -float("inf"), cls_loss)
        _, order = negative_loss.sort(1, descending=True)
        # the rank of each box in that order (the inverse permutation; torchvision sorts ``order`` a second time)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    negative = rank < num_negative
    classification = (torch.where(positive, cls_loss, 0.0).sum() + torch.where(negative, cls_loss, 0.0).sum())
    return {"bbox_regression": regression, "classification": classification / num_foreground}
