"""Augmentation presets keep boxes on their pixels; resize/letterbox and boxes_to_original are exact inverses."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as F

from src.detection.core.errors import UserError
from src.detection.data.transforms import (
    PAD_VALUE,
    PRESETS,
    boxes_to_original,
    build_transform,
    letterbox_size,
    resize_image,
)


def scene(h: int = 60, w: int = 90, box=(20, 10, 50, 40)):
    """A dark image with one bright rectangle, its box and a mask of the same rectangle."""
    img = torch.full((3, h, w), 30, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 220
    mask = torch.zeros((1, h, w), dtype=torch.uint8)
    mask[:, y1:y2, x1:x2] = 1
    boxes = tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(h, w))
    return tv_tensors.Image(img), boxes, tv_tensors.Mask(mask)


def test_flip_preset_flipped_box_is_the_mirrored_box():
    image, boxes, _ = scene()
    t = build_transform("flip", (90, 60), letterbox=False, train=True)  # imgsz == image size: flip only
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, tgt = t(image, {"boxes": boxes, "labels": torch.tensor([1])})
        got = tgt["boxes"].as_subclass(torch.Tensor)[0]
        if torch.equal(out, F.horizontal_flip(image)):
            seen.add("flipped")
            torch.testing.assert_close(got, torch.tensor([90 - 50, 10, 90 - 20, 40.0]))
        else:
            assert torch.equal(out, image)
            seen.add("kept")
            torch.testing.assert_close(got, torch.tensor([20, 10, 50, 40.0]))
        # the box still sits on the bright pixels
        x1, y1, x2, y2 = got.int().tolist()
        assert out[:, y1:y2, x1:x2].min() == 220
    assert seen == {"flipped", "kept"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("letterbox", [False, True])
def test_presets_end_at_imgsz_and_boxes_follow_the_pixels(preset, letterbox):
    """The mask rides through the same geometric ops as the box: the box must stay its bounding box."""
    image, boxes, mask = scene()
    t = build_transform(preset, (64, 48), letterbox=letterbox, train=True)
    kept = 0
    for seed in range(15):
        torch.manual_seed(seed)
        out, tgt = t(image, {"boxes": boxes, "labels": torch.tensor([2]), "masks": mask})
        assert out.shape == (3, 48, 64) and out.dtype == torch.uint8
        b = tgt["boxes"]
        assert b.canvas_size == (48, 64) and len(b) == len(tgt["labels"]) == len(tgt["masks"])
        if len(b):
            kept += 1
            assert tgt["labels"].tolist() == [2]
            assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= 64).all() and (b[:, 1::2] <= 48).all()
            m = tgt["masks"].as_subclass(torch.Tensor)
            if m.any():
                # masks are resized with nearest neighbour: allow ~1.5 px at the output scale
                torch.testing.assert_close(b.as_subclass(torch.Tensor), masks_to_boxes(m).float() +
                                           torch.tensor([0, 0, 1, 1.0]), atol=2.0, rtol=0)
    assert kept >= 8  # the crops must not throw the object away most of the time


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_accept_images_without_boxes(preset):
    image, _, _ = scene()
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(60, 90))
    out, tgt = build_transform(preset, (32, 32), train=True)(image, {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)})
    assert out.shape == (3, 32, 32) and tgt["boxes"].shape == (0, 4)


def test_eval_transform_is_deterministic_resize():
    image, boxes, _ = scene()
    t = build_transform("strong", (45, 30), letterbox=False, train=False)
    out, tgt = t(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert torch.equal(out.as_subclass(torch.Tensor), resize_image(image.as_subclass(torch.Tensor), (45, 30), False))
    torch.testing.assert_close(tgt["boxes"].as_subclass(torch.Tensor), torch.tensor([[10, 5, 25, 20.0]]))


def test_letterbox_keeps_aspect_and_pads_bottom_right():
    img = torch.full((3, 50, 100), 7, dtype=torch.uint8)
    out = resize_image(img, (64, 64), letterbox=True)
    assert out.shape == (3, 64, 64) and letterbox_size((50, 100), (64, 64)) == (32, 64)
    assert (out[:, :32] == 7).all() and (out[:, 32:] == PAD_VALUE).all()
    tall = resize_image(torch.zeros((3, 100, 20), dtype=torch.uint8), (64, 32), letterbox=True)
    assert tall.shape == (3, 32, 64) and (tall[:, :, 7:] == PAD_VALUE).all() and (tall[:, :, :6] == 0).all()
    batch = resize_image(torch.zeros((2, 3, 50, 100), dtype=torch.uint8), (40, 30), letterbox=False)
    assert batch.shape == (2, 3, 30, 40)


@pytest.mark.parametrize("letterbox", [False, True])
@pytest.mark.parametrize("orig,imgsz", [((60, 90), (64, 48)), ((375, 500), (640, 640)), ((333, 201), (97, 131))])
def test_boxes_to_original_inverts_the_eval_geometry(letterbox, orig, imgsz):
    h, w = orig
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(20, 2, generator=gen) * torch.tensor([w * 0.2, h * 0.2]) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    t = build_transform("none", imgsz, letterbox=letterbox, train=False)
    image = tv_tensors.Image(torch.zeros((3, h, w), dtype=torch.uint8))
    out, tgt = t(image, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=orig),
                         "labels": torch.ones(20, dtype=torch.int64)})
    assert out.shape[-2:] == (imgsz[1], imgsz[0])
    back = boxes_to_original(tgt["boxes"], orig, imgsz, letterbox)
    torch.testing.assert_close(back, boxes, atol=1e-4, rtol=1e-5)


def test_boxes_to_original_clamps_predictions_in_the_padding():
    # letterbox 100x50 -> 64x64: content is 64x32, rows 32..63 are padding
    pred = torch.tensor([[-3.0, 10, 70, 60]])
    back = boxes_to_original(pred, (50, 100), (64, 64), letterbox=True)
    torch.testing.assert_close(back, torch.tensor([[0.0, 15.625, 100, 50]]))


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="--augment 'mosaic'.*none, flip, ssd, strong"):
        build_transform("mosaic", (64, 64))
