"""Backbone feature cache: with a frozen backbone and deterministic (or flip-only) augmentation the backbone output
of every training image never changes, so it is computed once (fp16) and later epochs run only neck + head.

Horizontal flips are exact: the flipped image's features are computed and cached too (flipping a feature map is
*not* the same as the features of the flipped image).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from .errors import UserError
from .sampling import sample_seed

CACHEABLE_AUGMENTS = ("none", "flip")


def check_cacheable(augment: str, fine_tune: bool) -> None:
    if fine_tune:
        raise UserError("--cache-features needs a frozen backbone; drop --fine-tune or --cache-features")
    if augment not in CACHEABLE_AUGMENTS:
        raise UserError(f"--cache-features works with --augment none or flip (got {augment!r}): other augmentations "
                        f"change the image every epoch, so its features cannot be reused")


class FeatureCache(Dataset):
    """Cached backbone maps for a fixed list of dataset indices; ``cache[(epoch, i)]`` returns
    ``(features, target)`` with the flip decided by ``(seed, epoch, i)`` when ``flip`` is on."""

    def __init__(self, mode: str, flip: bool, seed: int, cache_dir: Path | None = None):
        if mode not in ("ram", "disk"):
            raise UserError(f"--cache-features {mode!r}: use ram or disk")
        self.mode, self.flip, self.seed = mode, flip, seed
        self.cache_dir = cache_dir
        self.ram: dict[tuple[int, bool], tuple[list[torch.Tensor], dict]] = {}
        self.indices: list[int] = []
        self.nbytes = 0

    # -- building
    @torch.inference_mode()
    def build(self, model, dataset: Dataset, indices: list[int], device: torch.device, batch_size: int,
              workers: int, collate_fn, amp_dtype: torch.dtype | None = None, show: bool = True) -> None:
        """Run the frozen backbone once over ``dataset[indices]`` (deterministic transform) and store fp16 maps."""
        self.indices = list(indices)
        if self.mode == "disk":
            assert self.cache_dir is not None
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
        subset = torch.utils.data.Subset(dataset, self.indices)
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn)
        position = 0
        variants = (False, True) if self.flip else (False,)
        for images, targets in tqdm(loader, desc="caching backbone features", disable=not show, leave=False):
            images = images.to(device)
            for flipped in variants:
                batch = images.flip(-1) if flipped else images
                ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
                with ctx:
                    feats = model.backbone_features(batch)
                feats = [f.to("cpu", torch.float16) for f in feats]
                for j, target in enumerate(targets):
                    boxes = F.horizontal_flip(target["boxes"]) if flipped else target["boxes"]
                    item = ([f[j].clone() for f in feats],
                            {"boxes": boxes.as_subclass(torch.Tensor).clone(), "labels": target["labels"].clone()})
                    self.nbytes += sum(f.numel() * f.element_size() for f in item[0])
                    self._put(self.indices[position + j], flipped, item)
            position += len(targets)

    def _put(self, index: int, flipped: bool, item) -> None:
        if self.mode == "ram":
            self.ram[(index, flipped)] = item
        else:
            torch.save(item, self.cache_dir / f"{index}_{int(flipped)}.pt")

    def _get(self, index: int, flipped: bool):
        if self.mode == "ram":
            return self.ram[(index, flipped)]
        return torch.load(self.cache_dir / f"{index}_{int(flipped)}.pt", weights_only=True)

    # -- reading
    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, index = key
        flipped = False
        if self.flip:  # same coin as RandomHorizontalFlip(0.5), but keyed on (seed, epoch, index)
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            flipped = bool(torch.rand((), generator=g) < 0.5)
        return self._get(index, flipped)


def collate_cached(batch, imgsz: tuple[int, int]):
    """``(zero uint8 images [B,3,H,W], targets, [level maps [B,C,h,w]])`` - the images only carry the size."""
    feats = [torch.stack(level) for level in zip(*(item[0] for item in batch))]
    targets = [item[1] for item in batch]
    w, h = imgsz
    images = torch.zeros((len(batch), 3, h, w), dtype=torch.uint8)
    return images, targets, feats
