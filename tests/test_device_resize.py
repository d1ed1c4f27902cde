"""Images resized on the device (``data.device_resize``) equal the loader-resized pipeline: same flips, same boxes,
same pixels (on the CPU; the GPU's within rounding is in test_device_paths.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.detection.data.datasets import DetectionDataset, Record, build_dataloader, collate_fn
from src.detection.data.device_resize import (
    ResizeBatch,
    defer_resize,
    deferred_view,
)
from src.detection.data.sampling import EpochSampler, EpochSeededDataset
from src.detection.data.transforms import build_transform

CLASSES = ["__background__", "cat", "dog"]
SIZES = [(90, 120), (120, 90), (90, 120), (64, 64), (90, 120), (120, 90), (50, 200), (90, 120)]  # (H, W)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(SIZES):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        n = i % 4  # 0..3 boxes, including images without any
        x0 = rng.uniform(0, w / 2, n)
        y0 = rng.uniform(0, h / 2, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(0.3, w / 2, n), y0 + rng.uniform(0.3, h / 2, n)], 1)
        out.append(Record(image=Path(path), name=path.name, boxes=boxes.astype(np.float32).reshape(-1, 4),
                          labels=rng.integers(1, 3, n).astype(np.int64), difficult=np.zeros(n, bool), size=(h, w)))
    return out


def _dataset(records, preset: str, letterbox: bool, train: bool = True) -> DetectionDataset:
    return DetectionDataset(records, CLASSES, build_transform(preset, (96, 80), letterbox, train=train), verbose=False)


def _batches(ds, epoch: int = 1, batch: int = 4):
    sampler = EpochSampler(len(ds), seed=3, shuffle=True)
    sampler.set_epoch(epoch)
    return list(build_dataloader(EpochSeededDataset(ds, 3), batch, sampler=sampler))


@pytest.mark.parametrize("preset", ["none", "flip", "ssd"])
@pytest.mark.parametrize("letterbox", [False, True])
def test_device_resize_equals_the_loader_resize(records, preset, letterbox):
    live = _dataset(records, preset, letterbox)
    view = deferred_view(live)
    assert view is not None and live.transform is not view.transform
    flips = 0
    for epoch in (1, 2):
        for (images, targets), (pending, moved) in zip(_batches(live, epoch), _batches(view, epoch)):
            assert isinstance(pending, ResizeBatch) and len(pending) == len(targets)
            flips += sum(p.flip for _, p in pending.groups)
            resized = pending.to("cpu")
            by_id = {t["image_id"]: k for k, t in enumerate(targets)}
            for k, t in enumerate(moved):  # the batch is regrouped by size: match samples by image id
                j = by_id[t["image_id"]]
                assert torch.equal(resized[k], images[j])
                assert torch.equal(t["boxes"], targets[j]["boxes"]) and torch.equal(t["labels"], targets[j]["labels"])
                assert "resize" not in t and t["orig_size"] == targets[j]["orig_size"]
    if preset == "flip":
        assert flips > 0  # the coin came up heads somewhere: the mirrored path was compared too


def test_groups_are_one_source_size_and_operation(records):
    view = deferred_view(_dataset(records, "flip", False))
    samples = [EpochSeededDataset(view, 0)[(1, i)] for i in range(len(records))]
    batch, targets = collate_fn(samples)
    keys = [(tuple(images.shape[1:]), p) for images, p in batch.groups]
    assert len(keys) == len(set(keys)) and sum(len(g) for g, _ in batch.groups) == len(records)
    sizes = [tuple(images.shape[-2:]) for images, _ in batch.groups for _ in range(len(images))]
    assert sizes == [tuple(t["orig_size"]) for t in targets]  # targets follow the regrouped order


def test_eval_pipeline_defers_and_strong_does_not(records):
    assert deferred_view(_dataset(records, "none", True, train=False)) is not None
    assert defer_resize(build_transform("strong", (96, 80))) is None
    assert deferred_view(_dataset(records, "strong", False)) is None


def test_pinned_batch_keeps_its_groups(records):
    batch, _ = collate_fn([EpochSeededDataset(deferred_view(_dataset(records, "flip", True)), 0)[(1, i)]
                           for i in range(4)])
    if not torch.cuda.is_available():
        pytest.skip("pinning needs CUDA")
    pinned = batch.pin_memory()
    assert all(g.is_pinned() for g, _ in pinned.groups) and torch.equal(pinned.to("cpu"), batch.to("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("letterbox", [False, True])
def test_gpu_resize_matches_the_cpu_within_rounding_without_a_sync(records, letterbox):
    view = deferred_view(_dataset(records, "flip", letterbox))
    batch, _ = collate_fn([EpochSeededDataset(view, 1)[(1, i)] for i in range(len(records))])
    pinned = batch.pin_memory()
    pinned.to("cuda", non_blocking=True)  # warm-up: kernels loaded, caching allocator filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = pinned.to("cuda", non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    diff = (on_gpu.cpu().int() - batch.to("cpu").int()).abs()
    assert on_gpu.shape == (len(records), 3, 80, 96) and int(diff.max()) <= 1  # GPU interpolation rounds apart
