"""Training and evaluation images resized on the device: the loader decodes (and runs the augmentations that need
the whole image: photometric distortion, zoom-out, IoU crop), the final flip / resize / letterbox of the image
happen on the GPU in a few batched calls, and the boxes go through the very same torchvision transforms as before.

``defer_resize(transform)`` turns a ``build_transform`` pipeline into one whose tail (the flip of ``--augment
flip``, ``ResizeTo`` and the final ``SanitizeBoundingBoxes``) is applied to the targets at once and to the image
later: the sample keeps its image at the decoded size and records a ``PendingResize``. ``collate_fn`` then groups a
batch's samples by source size and pending operation into a ``ResizeBatch``, which the training loop moves like a
tensor: ``batch.to(device, non_blocking=True)`` uploads each group (pinned, without blocking), flips and resizes
it there in one call and returns the ``[B,3,H,W]`` uint8 batch, the images in the same order as the targets.

The flip coin is drawn exactly as ``v2.RandomHorizontalFlip`` draws it (``torch.rand(1) < p``) and the image ops
are the ones ``ResizeTo`` runs, so a deferred sample equals the loader-resized one: boxes identical, pixels equal
on the CPU and within rounding on a GPU (tests). The ``strong`` preset rescales and crops after the resize, which
needs the resized image in the loader, so it keeps resizing there (``defer_resize`` returns None).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import ResizeTo, resize_image


class PendingResize(NamedTuple):
    """What is left to do to a sample's image: mirror it, then resize it to ``imgsz`` (W, H), letterboxed or not."""

    flip: bool
    imgsz: tuple[int, int]
    letterbox: bool


def finish_resize(images: torch.Tensor, pending: PendingResize) -> torch.Tensor:
    """Apply ``pending`` to uint8 ``[3,h,w]`` or ``[G,3,h,w]`` images of one size, on whatever device they are:
    the loader's own ops (``F.horizontal_flip``, then ``ResizeTo``)."""
    if pending.flip:
        images = images.flip(-1)
    return resize_image(images, pending.imgsz, pending.letterbox)


class _ResizeLater:
    """Pipeline tail acting on the targets only: the flip coin (as ``v2.RandomHorizontalFlip`` draws it), the
    resize and the sanitize go through torchvision's box transforms; the image is returned as it is and the
    target records the ``PendingResize`` under ``"resize"``."""

    def __init__(self, flip_p: float | None, resize: ResizeTo, sanitize: v2.SanitizeBoundingBoxes | None) -> None:
        self.flip_p, self.resize, self.sanitize = flip_p, resize, sanitize

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        flip = self.flip_p is not None and bool(torch.rand(1) < self.flip_p)
        boxes = target["boxes"]
        if flip:
            boxes = F.horizontal_flip(boxes)
        boxes = self.resize(boxes)
        target = {**target, "boxes": boxes}
        if self.sanitize is not None:
            target = self.sanitize(target)
        target["resize"] = PendingResize(flip, self.resize.imgsz, self.resize.letterbox)
        return image, target

    def __repr__(self) -> str:  # part of the feature cache key through the dataset's transform repr
        return f"_ResizeLater(flip_p={self.flip_p}, resize={self.resize.imgsz}, letterbox={self.resize.letterbox})"


def defer_resize(transform: Any) -> v2.Compose | None:
    """``transform`` (a ``build_transform`` pipeline) with its tail deferred to the device (see the module
    docstring), or None when something after the resize needs the resized image (``--augment strong``)."""
    ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    at = next((i for i, op in enumerate(ops) if isinstance(op, ResizeTo)), None)
    if at is None or ResizeTo in {type(op) for op in ops[at + 1:]}:
        return None
    after = ops[at + 1:]
    if len(after) > 1 or (after and not isinstance(after[0], v2.SanitizeBoundingBoxes)):
        return None
    head, flip_p = ops[:at], None
    if head and isinstance(head[-1], v2.RandomHorizontalFlip) and len(head) == 1:  # --augment flip: flip later too
        flip_p, head = float(head[-1].p), []
    return v2.Compose([*head, _ResizeLater(flip_p, ops[at], after[0] if after else None)])


def deferred_view(dataset: Any) -> Any:
    """A shallow copy of ``dataset`` (a ``DetectionDataset``) whose samples leave their image resize to the device,
    or None when its transform cannot be deferred. The original keeps resizing in the loader (pictures, caches)."""
    transform = getattr(dataset, "transform", None)
    deferred = defer_resize(transform) if transform is not None else None
    if deferred is None:
        return None
    view = copy.copy(dataset)
    view.transform = deferred
    return view


class ResizeBatch:
    """A collated batch of images still to be resized: ``groups`` of ``(uint8 [G,3,h,w] images, PendingResize)``
    in the order of the batch's targets. Moves like a tensor (``to``, ``pin_memory``) and becomes one."""

    def __init__(self, groups: list[tuple[torch.Tensor, PendingResize]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return sum(len(images) for images, _ in self.groups)

    def pin_memory(self) -> ResizeBatch:  # called by the DataLoader's pin-memory thread
        return ResizeBatch([(images.pin_memory(), pending) for images, pending in self.groups])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The resized ``[B,3,H,W]`` uint8 batch on ``device``: one upload, flip and resize per group."""
        out = [finish_resize(images.to(device, non_blocking=non_blocking), pending)
               for images, pending in self.groups]
        return out[0] if len(out) == 1 else torch.cat(out)


def collate_pending(images: Sequence[torch.Tensor], targets: Sequence[dict[str, Any]]
                    ) -> tuple[ResizeBatch, list[dict[str, Any]]]:
    """Samples with a pending resize -> a ``ResizeBatch`` and the targets reordered to match it: samples of one
    source size and operation become one stacked group (few uploads and resize calls per batch)."""
    groups: dict[tuple, list[int]] = {}
    for i, (image, target) in enumerate(zip(images, targets)):
        groups.setdefault((tuple(image.shape), target["resize"]), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    batch = ResizeBatch([(torch.stack([images[i] for i in idx]), key[1]) for key, idx in groups.items()])
    out = []
    for i in order:
        target = dict(targets[i])
        del target["resize"]
        out.append(target)
    return batch, out

