"""Anchor fit: the anchors are the model's own, torchvision's generator with the settings given, coverage equals a
direct IoU computation, and a suggestion delivers the coverage it promises."""

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
from src.detection.modeling.anchor_fit import (
    anchor_fit,
    config_anchors,
    dataset_input_boxes,
    default_anchors,
    fit_config,
)
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig

TINY_ARCH = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


@pytest.mark.parametrize("head,mode,anchors", [("retinanet", "multi", {}), ("retinanet", "last", {}), ("ssd", "multi", {}),
                                               ("retinanet", "multi", dict(anchor_sizes=(9, 20, 20, 90, 300),
                                                                           anchor_ratios=(0.4, 1.0, 1.5, 3.0)))])
def test_anchors_are_the_models_own(head, mode, anchors):
    """The anchors the built model generates in its own training forward for a batch of this size."""
    cfg = DetectorConfig("dinov3_convnext_atto", 3, head=head, feature_extractor=mode, imgsz=(160, 96),
                         fpn_channels=64, arch_overrides=TINY_ARCH, **anchors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        model = build_detector(cfg, verbose=False).eval()
    seen = []  # whatever path the forward takes, its anchors come from this generator
    model.anchor_generator.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 96, 160, dtype=torch.uint8))
    used = seen[0]
    torch.testing.assert_close(default_anchors(cfg), used, rtol=0, atol=0)


def _boxes(rng, n, lo, hi, imgsz=640, aspect=(0.6, 1.6)):
    """``n`` boxes of sqrt(area) in [lo, hi], aspect h/w in ``aspect``, some reaching past the image's edges."""
    s, a = rng.uniform(lo, hi, n), rng.uniform(*aspect, n)
    w, h = s / np.sqrt(a), s * np.sqrt(a)
    x0, y0 = (-0.1 * imgsz + rng.random(n) * np.maximum(1.1 * imgsz - 0.9 * v, 0) for v in (w, h))
    return torch.tensor(np.stack([x0, y0, x0 + w, y0 + h], 1), dtype=torch.float32)


@pytest.mark.parametrize("cfg", [
    DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(384, 384)),
    DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(320, 480), anchor_sizes=(12, 30, 50, 50, 300),
                   anchor_ratios=(0.25, 1.0, 3.0)),
    DetectorConfig("dinov3_convnext_tiny", 2, feature_extractor="last", imgsz=(416, 288)),
    DetectorConfig("dinov3_vits16", 2, imgsz=(256, 384)),
    DetectorConfig("dinov3_convnext_tiny", 2, head="ssd", imgsz=(384, 256)),
], ids=["retinanet", "retinanet-custom", "retinanet-last", "vit-retinanet", "ssd"])
def test_coverage_equals_direct_iou(cfg):
    """The fit checks a few anchors per box and level (the lattice shortcut); its best IoUs are torchvision's
    ``box_iou`` over all anchors: bit for bit with RetinaNet's integer anchors, within float rounding with SSD's."""
    anchors, levels = config_anchors(cfg)
    torch.testing.assert_close(anchors, default_anchors(cfg), rtol=0, atol=0)
    boxes = torch.cat([_boxes(np.random.default_rng(0), 300, 3, 400, max(cfg.imgsz), aspect=(0.2, 5)),
                       _boxes(np.random.default_rng(1), 100, 40, 200, max(cfg.imgsz))])
    best = box_iou(boxes, anchors).max(dim=1).values  # the direct computation, one IoU matrix
    for fit in (anchor_fit(boxes, anchors, levels=levels), anchor_fit(boxes, anchors)):
        if cfg.head == "retinanet":
            np.testing.assert_array_equal(fit.best_iou, best.numpy())
        else:
            np.testing.assert_allclose(fit.best_iou, best.numpy(), rtol=1e-6, atol=1e-6)
        for t in (0.5, 0.4):
            assert fit.coverage[t] == pytest.approx((best >= t).float().mean().item(), abs=1 / len(boxes))
    assert 0.05 < (best >= 0.5).float().mean() < 0.95  # boxes on both sides of the threshold


def test_fit_without_a_lattice_falls_back_to_all_anchors():
    cfg = DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(256, 256))
    anchors, levels = config_anchors(cfg)
    shuffled = anchors[torch.randperm(len(anchors), generator=torch.Generator().manual_seed(0))]
    boxes = _boxes(np.random.default_rng(2), 200, 8, 200, 256)
    best = box_iou(boxes, shuffled).max(dim=1).values
    np.testing.assert_array_equal(anchor_fit(boxes, shuffled, levels=levels).best_iou, best.numpy())


@pytest.mark.parametrize("head", ["retinanet", "ssd"])
def test_low_coverage_suggests_retinanet_anchors_that_cover_more(head):
    cfg = DetectorConfig("dinov3_convnext_tiny", 2, head=head, imgsz=(384, 384))
    rng = np.random.default_rng(0)
    inside = _boxes(rng, 200, 48, 300, 384)  # within the default anchor range (32..812 px)
    small = _boxes(rng, 400, 12, 30, 384, aspect=(2, 4))  # tall and below the smallest anchor (32 px)
    fit_in, fit_small = fit_config(inside, cfg), fit_config(small, cfg)
    assert not fit_in.low and fit_in.suggestion is None and "coverage is low" not in fit_in.describe()
    assert fit_small.low and "coverage is low" in fit_small.describe()
    print(f"\n{head}: inside {fit_in.describe()}\n{head}: small {fit_small.describe()}")
    if head == "ssd":  # SSD's default boxes cannot be set: the line points to RetinaNet's
        assert fit_small.suggestion is None and "--head retinanet" in fit_small.describe()
        return
    s = fit_small.suggestion
    assert s is not None and s.coverage > fit_small.coverage[0.5] + 0.2
    assert f"train_detection.py --anchor-sizes {' '.join(map(str, s.sizes))} --anchor-ratios" in fit_small.describe()
    assert len(s.sizes) == 5 and max(s.ratios) > 2  # one base size per level; the boxes' own tall ratios
    # what the suggestion promises is what a model built with those settings gets
    applied = fit_config(small, DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(384, 384), anchor_sizes=s.sizes,
                                               anchor_ratios=s.ratios))
    assert applied.coverage[0.5] == s.coverage and "--anchor-sizes/--anchor-ratios anchors" in applied.describe()


def test_custom_anchors_are_torchvisions_generator_with_those_sizes():
    """Base size b per level -> torchvision's 3 octave scales (b, b 2^1/3, b 2^2/3); with no setting, the anchors
    of torchvision's own RetinaNet (``_default_anchorgen``) on the same levels."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.retinanet import _default_anchorgen

    def torchvision_anchors(generator, imgsz, strides):
        feats = [torch.empty((1, 0, -(-imgsz[1] // s), -(-imgsz[0] // s))) for s in strides]
        return generator(ImageList(torch.empty((1, 3, imgsz[1], imgsz[0])), [imgsz[::-1]]), feats)[0]

    strides = (8, 16, 32, 64, 128)
    default = DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(384, 256))
    torch.testing.assert_close(default_anchors(default), torchvision_anchors(_default_anchorgen(), (384, 256), strides),
                               rtol=0, atol=0)
    bases, ratios = (10, 24, 24, 100, 333), (0.3, 1.0)
    custom = DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(384, 256), anchor_sizes=bases, anchor_ratios=ratios)
    sizes = tuple((b, int(b * 2 ** (1 / 3)), int(b * 2 ** (2 / 3))) for b in bases)
    expected = torchvision_anchors(AnchorGenerator(sizes, (ratios,) * 5), (384, 256), strides)
    torch.testing.assert_close(default_anchors(custom), expected, rtol=0, atol=0)
    last = DetectorConfig("dinov3_convnext_tiny", 2, feature_extractor="last", imgsz=(384, 256),
                          anchor_sizes=(16, 48), anchor_ratios=(1.0,))
    torch.testing.assert_close(default_anchors(last),
                               torchvision_anchors(AnchorGenerator(((16, 48),), ((1.0,),)), (384, 256), (32,)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("changes,match", [
    (dict(anchor_sizes=(16, 32)), "this pyramid has 5 levels .* give one base size per level"),
    (dict(head="fcos", anchor_sizes=(16,) * 5), "only RetinaNet has anchors to set .*drop it"),
    (dict(head="ssd", anchor_ratios=(1.0,)), "only RetinaNet .*SSD head's default boxes"),
    (dict(anchor_sizes=(16, 0, 64, 128, 256)), "--anchor-sizes 16 0 64 128 256: give one or more positive"),
    (dict(anchor_ratios=(float("nan"),)), "--anchor-ratios nan: give one or more positive"),
])
def test_anchor_settings_are_checked(changes, match):
    with pytest.raises(UserError, match=match):
        default_anchors(DetectorConfig("dinov3_convnext_tiny", 2, **changes))


def test_dataset_boxes_in_input_pixels_and_sampling():
    recs = [Record(image=Path("/x/a.jpg"), name="a.jpg", boxes=np.array([[0, 0, 100, 50]], np.float32),
                   labels=np.array([1]), difficult=np.zeros(1, bool), size=(500, 1000))]
    ds = DetectionDataset(recs, ["__background__", "a"], name="train", verbose=False)
    # stretch to 640x640: x / 1000 * 640, y / 500 * 640; letterbox: one scale 0.64
    torch.testing.assert_close(dataset_input_boxes(ds, (640, 640)), torch.tensor([[0, 0, 64, 64.]]))
    torch.testing.assert_close(dataset_input_boxes(ds, (640, 640), letterbox=True), torch.tensor([[0, 0, 64, 32.]]))
    anchors = default_anchors(DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(640, 640)))
    boxes = _boxes(np.random.default_rng(1), 500, 8, 300)
    fit = anchor_fit(boxes, anchors, max_boxes=100)
    assert fit.n_boxes == 100 and fit.sampled_from == 500 and "a sample of 500" in fit.describe()


def test_fcos_is_refused():
    with pytest.raises(UserError, match="RetinaNet|retinanet"):
        default_anchors(DetectorConfig("dinov3_convnext_tiny", 2, head="fcos"))


def test_analyze_suggests_flags_that_deliver_the_coverage_it_promises(tmp_path, run_main):
    """The suggestion line names train_detection.py flags; analyze given those flags reports that coverage."""
    import re

    from src.detection.commands import analyze
    from src.detection.data.synthetic import generate_dataset

    config = generate_dataset(tmp_path / "shapes", 30, 4, imgsz=96, seed=0)
    common = ["--config", config, "--imgsz", "96", "--out", tmp_path / "plots"]
    first = run_main(analyze.main, common)
    assert first.returncode == 0, first.stderr
    low = re.search(r"coverage is low - train_detection.py (--anchor-sizes [\d ]+ --anchor-ratios [\d. ]+) covers "
                    r"([\d.]+)% at IoU >= 0.5", first.stdout)
    now = float(re.search(r"anchor fit: ([\d.]+)% at IoU >= 0.5", first.stdout).group(1))
    assert low is not None and float(low.group(2)) > now, first.stdout
    second = run_main(analyze.main, [*common, *low.group(1).split()])
    assert second.returncode == 0, second.stderr
    assert f"anchor fit: {low.group(2)}% at IoU >= 0.5" in second.stdout
    assert "matched by the --anchor-sizes/--anchor-ratios anchors" in second.stdout
    bad = run_main(analyze.main, [*common, "--head", "fcos", "--anchor-sizes", "8"])
    assert bad.returncode == 2 and "only RetinaNet has anchors to set" in bad.stderr


def test_candidates_stay_valid_settings_for_extreme_boxes():
    """Boxes flatter than 1:100 or of a pixel: every candidate is still a setting the model can be built with."""
    from src.detection.modeling.anchor_fit import candidate_anchors

    flat = torch.tensor([[0, 0, 300, 1], [10, 10, 410, 11.5], [5, 5, 6, 6], [0, 0, 0.5, 0.5]])
    cfg = DetectorConfig("dinov3_convnext_tiny", 2, imgsz=(416, 416))
    for candidate in candidate_anchors(flat, cfg, 5):
        assert min(candidate.anchor_ratios) >= 0.01 and min(candidate.anchor_sizes) >= 1
        assert len(config_anchors(candidate)[0]) > 0
