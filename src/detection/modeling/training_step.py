"""The detector's training losses for a whole batch, without torchvision's per-image loops.

``detection_losses(model, images, gt_boxes, gt_labels, gt_valid)`` runs what ``model(images, targets)`` runs in
training mode (transform, frozen backbone, neck, head, anchors, matching, losses) and returns the same loss dict,
but matching and losses go through ``losses.py`` on padded ground truth: no Python loop over images, no host
synchronisation, the same shapes every step (so the step can be compiled). Anchors depend only on shapes, so they
are computed once per input shape and reused.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from .losses import fcos_loss, retinanet_loss, ssd_loss


def _anchors(model: nn.Module, image_list, features: list[Tensor]) -> Tensor:
    """The anchors of one image (``[N, 4]``, identical for every image of a fixed-size batch), cached per shape."""
    key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features),
           image_list.tensors.device)
    cache = model.__dict__.setdefault("_anchor_cache", {})
    if key not in cache:
        first = type(image_list)(image_list.tensors[:1], image_list.image_sizes[:1])
        cache[key] = model.anchor_generator(first, [f[:1] for f in features])[0].detach()
    return cache[key]


def detection_losses(model: nn.Module, images: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     gt_valid: Tensor) -> dict[str, Tensor]:
    """Training losses of a RetinaNet / FCOS / SSD detector built by ``build_detector`` for a ``[B, 3, H, W]``
    batch of equal-size images and padded ground truth (``losses.pad_targets``), keyed as torchvision keys them."""
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = _anchors(model, image_list, features)
    if isinstance(model, RetinaNet):
        matcher = model.proposal_matcher
        return retinanet_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, gt_boxes,
                              gt_labels, gt_valid, box_coder=model.head.regression_head.box_coder,
                              fg_iou=matcher.high_threshold, bg_iou=matcher.low_threshold,
                              allow_low_quality_matches=matcher.allow_low_quality_matches,
                              loss_type=model.head.regression_head._loss_type)
    if isinstance(model, FCOS):
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        return fcos_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], head_outputs["bbox_ctrness"],
                         anchors, per_level, gt_boxes, gt_labels, gt_valid, box_coder=model.box_coder,
                         center_sampling_radius=model.center_sampling_radius)
    if isinstance(model, SSD):
        return ssd_loss(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors, gt_boxes, gt_labels,
                        gt_valid, box_coder=model.box_coder, iou_thresh=model.proposal_matcher.high_threshold,
                        neg_to_pos_ratio=model.neg_to_pos_ratio)
    raise TypeError(f"no batched loss for {type(model).__name__}")
