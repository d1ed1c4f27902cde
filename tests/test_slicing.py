"""Sliced inference: tiles cover the image, boxes map back and merge, and small objects are found far more often."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.ops import box_iou

from src.detection.core.errors import UserError
from src.detection.inference.base import PredictorBase
from src.detection.inference.slicing import SlicedPredictor, tile_origins, tiles, weighted_box_fusion
from src.detection.modeling.input_spec import InputSpec

MIN_PX = 7  # the fake model sees an object only when it is at least this many pixels wide and high in its input


class BlobPredictor(PredictorBase):
    """A real predictor pipeline (resize to 640x640 through the input spec, batching, boxes back to the original)
    whose "model" reports every bright blob of at least MIN_PX x MIN_PX input pixels."""

    def __init__(self):
        self.input_spec = InputSpec((640, 640))
        self.keep_aspect = False
        self.device = torch.device("cpu")
        self.batch_size = 8
        self.forward_images = 0

    @property
    def score_thresh(self) -> float:
        return 0.5

    def forward(self, batch):
        self.forward_images += len(batch)
        out = []
        for img in batch:
            lab, _ = ndimage.label(img[0].numpy() > 127)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)
                     if s[0].stop - s[0].start >= MIN_PX and s[1].stop - s[1].start >= MIN_PX]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


def _scene(n=60, size=2048, seed=0):
    rng = np.random.default_rng(seed)
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    boxes = []
    while len(boxes) < n:
        s = int(rng.integers(12, 25))  # 12..24 px objects
        x, y = (int(v) for v in rng.integers(0, size - s, 2))
        b = torch.tensor([[x, y, x + s, y + s]], dtype=torch.float32)
        if boxes and box_iou(b, torch.cat(boxes)).max() > 0 or any(
                (abs(x - o[0, 0]) < 40 and abs(y - o[0, 1]) < 40) for o in boxes):
            continue  # well separated, so blobs never touch after resizing
        img[:, y:y + s, x:x + s] = 255
        boxes.append(b)
    return img, torch.cat(boxes)


def _recall(pred, gt):
    if not len(pred["boxes"]):
        return 0.0
    return (box_iou(gt, pred["boxes"]).max(dim=1).values >= 0.5).float().mean().item()


def test_sliced_recall_at_least_twice_whole_image():
    img, gt = _scene()
    base = BlobPredictor()
    whole = base.predict([img])[0]
    sliced = SlicedPredictor(base, (640, 640), overlap=0.2).predict([img])[0]
    r_whole, r_sliced = _recall(whole, gt), _recall(sliced, gt)
    print(f"\nrecall@0.5 whole {r_whole:.2f}, sliced {r_sliced:.2f} ({len(sliced['boxes'])} detections, {len(gt)} objects)")
    assert r_sliced >= 0.95
    assert r_sliced >= 2 * r_whole
    # merged: one detection per object, except partial cuts at tile borders that another tile sees whole
    assert len(sliced["boxes"]) <= 1.25 * len(gt)
    wbf = SlicedPredictor(base, (640, 640), overlap=0.2, merge="wbf").predict([img])[0]
    assert _recall(wbf, gt) >= 0.95 and len(wbf["boxes"]) <= len(sliced["boxes"])


def test_tiles_cover_and_batch_through_the_predictor():
    assert tile_origins(2048, 640, 0.2) == [0, 469, 939, 1408]
    assert tile_origins(500, 640, 0.2) == [0]
    win = tiles((1000, 1500), (640, 640), 0.25)
    covered = torch.zeros(1000, 1500, dtype=torch.bool)
    for x0, y0, x1, y1 in win:
        assert x1 - x0 == 640 and y1 - y0 == 640
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    base = BlobPredictor()
    sliced = SlicedPredictor(base, (640, 640), overlap=0.25, include_full=False)
    small = torch.zeros(3, 300, 400, dtype=torch.uint8)
    out = sliced.predict([torch.zeros(3, 1000, 1500, dtype=torch.uint8), small])
    assert base.forward_images == len(win) + 1  # the small image is one view, no duplicate whole image
    assert len(out) == 2 and out[1]["boxes"].shape == (0, 4)
    assert sliced.batch_size == 8 and "sliced 640x640" in sliced.describe()  # the wrapped predictor's attributes


def test_boxes_map_back_to_image_coordinates():
    img = torch.zeros(3, 1200, 1200, dtype=torch.uint8)
    img[:, 900:940, 1000:1030] = 255  # only in the bottom-right tiles
    out = SlicedPredictor(BlobPredictor(), (600, 600), overlap=0.1, include_full=False).predict([img])[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[1000, 900, 1030, 940.]]), atol=1.0, rtol=0)


def test_weighted_box_fusion():
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [0, 0, 10, 10], [50, 50, 60, 60.]])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.5])
    labels = torch.tensor([1, 1, 2, 1])
    b, s, lab = weighted_box_fusion(boxes, scores, labels, 0.5)
    assert lab.tolist() == [1, 2, 1] and s.tolist() == pytest.approx([0.9, 0.8, 0.5])
    # the class-1 pair fuses to the score-weighted mean: x0 = (0 * .9 + 2 * .3) / 1.2
    torch.testing.assert_close(b[0], torch.tensor([0.5, 0, 10.5, 10]))


def test_bad_options():
    with pytest.raises(UserError, match="--slice "):
        SlicedPredictor(BlobPredictor(), (16, 640))
    with pytest.raises(UserError, match="--slice-overlap"):
        SlicedPredictor(BlobPredictor(), (640, 640), overlap=1.0)
    with pytest.raises(UserError, match="nms, wbf"):
        SlicedPredictor(BlobPredictor(), (640, 640), merge="mean")
