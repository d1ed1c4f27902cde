"""Anchor fit: the anchors are the model's own, and coverage equals a direct IoU computation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from src.detection.core.errors import UserError
from src.detection.data.datasets import DetectionDataset
from src.detection.data.formats.common import Record
from src.detection.modeling.anchor_fit import anchor_fit, dataset_input_boxes, default_anchors
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig

TINY_ARCH = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


@pytest.mark.parametrize("head,mode", [("retinanet", "multi"), ("retinanet", "last"), ("ssd", "multi")])
def test_anchors_are_the_models_own(head, mode):
    """The anchors the built model generates in its own training forward for a batch of this size."""
    cfg = DetectorConfig("dinov3_convnext_atto", 3, head=head, feature_extractor=mode, imgsz=(160, 96),
                         fpn_channels=64, arch_overrides=TINY_ARCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        model = build_detector(cfg, verbose=False).eval()
    seen = []  # whatever path the forward takes, its anchors come from this generator
    model.anchor_generator.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 96, 160, dtype=torch.uint8))
    used = seen[0]
    torch.testing.assert_close(default_anchors(cfg), used, rtol=0, atol=0)


def _square_boxes(rng, n, lo, hi, imgsz=640):
    s = rng.uniform(lo, hi, n)
    a = rng.uniform(0.6, 1.6, n)  # aspect h/w inside the anchors' 0.5..2
    w, h = s / np.sqrt(a), s * np.sqrt(a)
    x0, y0 = rng.uniform(0, imgsz - w), rng.uniform(0, imgsz - h)
    return torch.tensor(np.stack([x0, y0, x0 + w, y0 + h], 1), dtype=torch.float32)


@pytest.mark.parametrize("head", ["retinanet", "ssd"])
def test_coverage_equals_direct_iou(head):
    cfg = DetectorConfig("dinov3_convnext_tiny", 2, head=head, imgsz=(384, 384))
    anchors = default_anchors(cfg)
    rng = np.random.default_rng(0)
    inside = _square_boxes(rng, 200, 48, 300, 384)  # within the default anchor range (32..812 px)
    tiny = _square_boxes(rng, 200, 4, 12, 384)  # far below the smallest anchor (32 px)
    fit_in, fit_tiny = anchor_fit(inside, anchors), anchor_fit(tiny, anchors)
    for fit, boxes in ((fit_in, inside), (fit_tiny, tiny)):
        best = box_iou(boxes, anchors).max(dim=1).values  # the direct computation, one IoU matrix
        for t in (0.5, 0.4):
            assert fit.coverage[t] == (best >= t).float().mean().item()
        np.testing.assert_array_equal(fit.best_iou, best.numpy())
    assert fit_in.coverage[0.5] >= 0.9 and not fit_in.low and fit_in.suggested_sizes == ()
    assert fit_tiny.coverage[0.5] < 0.1 and fit_tiny.low
    assert all(4 <= s <= 12 for s in fit_tiny.suggested_sizes)
    assert "coverage is low" in fit_tiny.describe() and "coverage is low" not in fit_in.describe()
    print(f"\n{head}: inside {fit_in.describe()}\n{head}: tiny {fit_tiny.describe()}")


def test_dataset_boxes_in_input_pixels_and_sampling():
    recs = [Record(image=Path("/x/a.jpg"), name="a.jpg", boxes=np.array([[0, 0, 100, 50]], np.float32),
                   labels=np.array([1]), difficult=np.zeros(1, bool), size=(500, 1000))]
    ds = DetectionDataset(recs, ["__background__", "a"], name="train", verbose=False)
    # stretch to 640x640: x / 1000 * 640, y / 500 * 640; letterbox: one scale 0.64
    torch.testing.assert_close(dataset_input_boxes(ds, (640, 640)), torch.tensor([[0, 0, 64, 64.]]))
    torch.testing.assert_close(dataset_input_boxes(ds, (640, 640), letterbox=True), torch.tensor([[0, 0, 64, 32.]]))
    anchors = default_anchors(DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(640, 640)))
    boxes = _square_boxes(np.random.default_rng(1), 500, 8, 300)
    fit = anchor_fit(boxes, anchors, max_boxes=100)
    assert fit.n_boxes == 100 and fit.sampled_from == 500 and "a sample of 500" in fit.describe()


def test_fcos_is_refused():
    with pytest.raises(UserError, match="RetinaNet|retinanet"):
        default_anchors(DetectorConfig("dinov3_convnext_tiny", 2, head="fcos"))
