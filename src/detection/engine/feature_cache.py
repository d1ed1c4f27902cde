"""Backbone feature cache: with a frozen backbone and deterministic (or flip-only) augmentation the backbone output
of every image never changes, so it is computed once (fp16) and later epochs run only neck + head. The validation
split is cached the same way (no flip), so evaluation runs only neck + head too.

Cached samples are exactly the live pipeline's: each variant is made by the training transform itself with its
random flip decided (flip first, then the resize / letterbox padding at the bottom-right), and the flip decision
for ``(seed, epoch, index)`` is the coin the live ``RandomHorizontalFlip`` draws for that sample.

A disk cache is kept in its folder with the content hash of everything its files depend on (``cache_key``), and a
later build with the same key (a resumed run, a restart in the same run folder) reuses it instead of running the
backbone again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from ..core.errors import UserError
from ..core.io import write_text_atomic
from ..core.runtime import autocast_context, unwrap
from ..data.sampling import sample_seed

FLIP_P = 0.5  # transforms.build_transform's RandomHorizontalFlip probability (checked when a cache is built)
DISK_FORMAT = 1  # the layout of a disk cache's files; part of its key
KEY_FILE = "cache.json"  # written last: a folder without it (an interrupted build) is never reused


def forced_flip(transform: Any, flip: bool) -> v2.Compose:
    """``transform`` (a training pipeline) with its random horizontal flip always / never applied; every other
    op is the same object in the same order, so a variant is exactly what the live pipeline gives for that coin."""
    ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    if flip and not any(isinstance(op, v2.RandomHorizontalFlip) for op in ops):
        raise ValueError("a mirrored cache variant needs a training transform with RandomHorizontalFlip (--augment flip)")
    out = []
    for op in ops:
        if isinstance(op, v2.RandomHorizontalFlip):
            if op.p != FLIP_P:
                raise ValueError(f"the feature cache assumes a flip probability of {FLIP_P}, got {op.p}")
            op = v2.RandomHorizontalFlip(p=1.0 if flip else 0.0)
        elif isinstance(op, v2.Transform) and any(isinstance(op, t) for t in _RANDOM_OPS):
            raise ValueError(f"{type(op).__name__} is random: the feature cache supports --augment none/flip only")
        out.append(op)
    return v2.Compose(out)


_RANDOM_OPS = (v2.RandomPhotometricDistort, v2.RandomZoomOut, v2.RandomIoUCrop, v2.ScaleJitter, v2.RandomCrop)


def is_flipped(seed: int, epoch: int, index: int) -> bool:
    """The live RandomHorizontalFlip's coin for sample ``index`` in ``epoch``: the first draw of torch's RNG after
    ``EpochSeededDataset`` seeded it from ``(seed, epoch, index)`` (``torch.rand(1) < p`` flips)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    return bool(torch.rand(1, generator=g) < FLIP_P)


def cache_key(model, dataset, indices: Sequence[int], flip: bool, device: torch.device,
              amp_dtype: torch.dtype | None) -> str | None:
    """Content hash of what cached maps and targets depend on: each image's path, size and modification time and
    its annotation (the parsed record), the classes and the dataset's transform (size, letterbox, flip), the
    backbone (name, implementation, feature maps, input normalization, the weights file's path, size and time, or
    the weights themselves when randomly initialised) and the precision and device type it runs with. Not the
    seed: the flip coin is drawn when reading. None for a dataset without records (nothing to key on)."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    model = unwrap(model)
    cfg = model.config
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        h.update(repr(parts).encode())

    add(DISK_FORMAT, flip, device.type, str(amp_dtype), [int(i) for i in indices])
    add(cfg.model_name, cfg.backbone_impl, cfg.feature_extractor, cfg.arch_overrides, tuple(cfg.imgsz),
        cfg.letterbox, cfg.mean, cfg.std, cfg.size_multiple)
    add(repr(getattr(dataset, "transform", None)), list(getattr(dataset, "classes", [])),
        *(getattr(dataset, k, None) for k in ("include_difficult", "skip_bad_samples", "drop_bad_images")))
    source = getattr(model.dino, "weights_source", None)
    add(source, _file_stamp(source.get("path")) if source and source.get("path") else None)
    if not source:  # random init: the weights themselves (small models, tests)
        for name, tensor in model.dino.state_dict().items():
            add(name, tuple(tensor.shape), str(tensor.dtype))
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for i in dict.fromkeys(int(i) for i in indices):
        r = records[i]
        add(str(r.image), _file_stamp(r.image), r.name, tuple(r.size), r.image_id, str(r.annotation))
        for array in (r.boxes, r.labels, r.difficult):
            h.update(memoryview(array.tobytes()))
    return h.hexdigest()


def _file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _as_list(batch: list) -> list:
    return batch


def _plain_target(target: dict[str, Any]) -> dict[str, Any]:
    """Targets as plain tensors / numbers (weights_only-safe; BoundingBoxes -> Tensor)."""
    out = {}
    for k, v in target.items():
        out[k] = v.as_subclass(torch.Tensor).clone() if isinstance(v, torch.Tensor) else v
    return out


class FeatureCache(Dataset):
    """Cached backbone maps for a list of dataset indices.

    ``cache[(epoch, i)]`` (or ``cache[i]`` without flip) returns ``(features, target)``; ``cache.batch(keys)`` a
    whole batch ``(level maps [B,C,h,w] fp16, targets)`` - in RAM mode one ``index_select`` per level, no per-sample
    work. ``flip=True`` stores each image and its mirror; which one a key gets is the live pipeline's coin.
    """

    def __init__(self, mode: str, flip: bool, seed: int, cache_dir: Path | None = None):
        if mode not in ("ram", "disk"):
            raise UserError(f"--cache-features {mode!r}: use ram or disk")
        self.mode, self.flip, self.seed = mode, flip, seed
        self.cache_dir = cache_dir
        self.indices: list[int] = []  # unique dataset indices, in storage order
        self.row: dict[int, int] = {}  # dataset index -> storage row
        # RAM mode: per level one [V * N, C, h, w] fp16 tensor, variant v (0 plain, 1 mirrored) of storage row r at
        # v * N + r, so a batch mixing both variants is still one gather per level
        self.levels: list[torch.Tensor] = []
        self.targets: dict[bool, list[dict[str, Any]]] = {}
        self.dropped: set[int] = set()
        self.nbytes = 0
        self.key: str | None = None  # disk mode: the content hash the folder's files were built for
        self.reused = False  # disk mode: the last build found its files already there

    # -- building
    @torch.inference_mode()
    def build(self, model, dataset, indices: Sequence[int], device: torch.device, batch_size: int, workers: int = 0,
              amp_dtype: torch.dtype | None = None, show: bool = True) -> None:
        """Run the frozen backbone once over ``dataset[indices]`` - each variant through ``dataset``'s own transform
        with the flip decided - and store fp16 maps. Repeated indices (DDP padding) are computed once; samples the
        dataset drops (``None``: undecodable evaluation images) are left out, as the live loader leaves them out.

        Disk mode: a folder already holding a complete cache with the same ``cache_key`` is reused as it is
        (``reused``); any other folder is rebuilt."""
        self.indices = list(dict.fromkeys(int(i) for i in indices))
        self.row = {i: r for r, i in enumerate(self.indices)}
        self.dropped: set[int] = set()
        self.nbytes, self.reused = 0, False
        if self.mode == "disk":
            assert self.cache_dir is not None
            self.key = cache_key(model, dataset, self.indices, self.flip, device, amp_dtype)
            if self._load_disk_state():
                self.reused = True
                return
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
        variants = (False, True) if self.flip else (False,)
        self.levels = []
        for flipped in variants:
            view = copy.copy(dataset)
            if getattr(dataset, "transform", None) is not None:
                view.transform = forced_flip(dataset.transform, flipped)
            loader = DataLoader(torch.utils.data.Subset(view, self.indices), batch_size=batch_size, shuffle=False,
                                num_workers=workers, collate_fn=_as_list)
            targets: list[dict[str, Any] | None] = [None] * len(self.indices)
            offset = int(flipped) * len(self.indices)
            position = 0
            desc = f"caching backbone features{' (mirrored)' if flipped else ''}"
            for samples in tqdm(loader, desc=desc, disable=not show, leave=False):
                start = position
                position += len(samples)
                good = [(start + j, s) for j, s in enumerate(samples) if s is not None]
                self.dropped.update(self.indices[start + j] for j, s in enumerate(samples) if s is None)
                if not good:
                    continue
                with autocast_context(device, amp_dtype):
                    feats = model.backbone_features(torch.stack([s[0] for _, s in good]).to(device))
                feats = [f.to("cpu", torch.float16) for f in feats]
                if self.mode == "ram" and not self.levels:
                    self.levels = [torch.empty((len(variants) * len(self.indices), *f.shape[1:]),
                                               dtype=torch.float16) for f in feats]
                for k, (r, sample) in enumerate(good):
                    target = _plain_target(sample[1])
                    if self.mode == "ram":
                        for store, f in zip(self.levels, feats):
                            store[offset + r].copy_(f[k])
                        targets[r] = target
                    else:
                        torch.save(([f[k].clone() for f in feats], target),
                                   self.cache_dir / f"{self.indices[r]}_{int(flipped)}.pt")
                self.nbytes += sum(f.numel() * f.element_size() for f in feats)
            if self.mode == "ram":
                self.targets[flipped] = targets  # type: ignore[assignment]
        if self.mode == "disk" and self.key is not None:
            write_text_atomic(self.cache_dir / KEY_FILE, json.dumps(
                {"key": self.key, "indices": self.indices, "dropped": sorted(self.dropped), "nbytes": self.nbytes}))

    def _load_disk_state(self) -> bool:
        """Take ``dropped`` / ``nbytes`` from a complete disk cache built for ``self.key``; False if there is none."""
        if self.key is None:
            return False
        try:
            state = json.loads((self.cache_dir / KEY_FILE).read_text())
        except (OSError, ValueError):
            return False
        if state.get("key") != self.key or state.get("indices") != self.indices:
            return False
        dropped = {int(i) for i in state.get("dropped", [])}
        variants = (0, 1) if self.flip else (0,)
        if not all((self.cache_dir / f"{i}_{v}.pt").is_file() for i in self.indices if i not in dropped
                   for v in variants):
            return False
        self.dropped, self.nbytes = dropped, int(state.get("nbytes", 0))
        return True

    def place(self, device: torch.device, share: float = 0.5) -> str:
        """Keep a RAM cache where the training step reads it fastest: in the GPU's memory when it takes at most
        ``share`` of what is free there (a batch is then one gather on the device, no copy), else in pinned host
        memory (batches copy without blocking). Returns where it went, for the log."""
        if self.mode != "ram" or not self.levels or device.type != "cuda":
            return "host memory"
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(t.numel() * t.element_size() for t in self.levels)
        if size <= share * free:
            self.levels = [t.to(device) for t in self.levels]
            return f"{device} memory"
        self.levels = [t.pin_memory() for t in self.levels]
        return (f"pinned host memory ({size / 2**30:.1f} GiB does not fit in half of the GPU's free "
                f"{free / 2**30:.1f} GiB)")

    # -- reading
    def flipped(self, key) -> tuple[int, bool]:
        """``(dataset index, mirrored?)`` for a key ``(epoch, index)`` or a plain ``index`` (never mirrored)."""
        if isinstance(key, (tuple, list)):
            epoch, index = int(key[0]), int(key[1])
            return index, self.flip and is_flipped(self.seed, epoch, index)
        return int(key), False

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> tuple[list[torch.Tensor], dict[str, Any]]:
        index, flipped = self.flipped(key)
        if self.mode == "ram":
            r = self.row[index]
            return [level[int(flipped) * len(self.indices) + r] for level in self.levels], self.targets[flipped][r]
        return torch.load(self.cache_dir / f"{index}_{int(flipped)}.pt", weights_only=True)

    def batch(self, keys: Sequence) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """Level maps ``[B,C,h,w]`` (fp16, CPU) and targets for ``keys`` (dropped samples left out)."""
        if self.dropped:
            keys = [k for k in keys if self.flipped(k)[0] not in self.dropped]
        if self.mode != "ram":
            items = [self[k] for k in keys]
            return [torch.stack(level) for level in zip(*(it[0] for it in items))], [it[1] for it in items]
        resolved = [self.flipped(k) for k in keys]
        n = len(self.indices)
        rows = torch.tensor([int(f) * n + self.row[i] for i, f in resolved])
        device = self.levels[0].device
        if device.type == "cuda":  # a pageable host-to-device copy would wait for the stream
            rows = rows.pin_memory().to(device, non_blocking=True)
        feats = [level.index_select(0, rows) for level in self.levels]
        return feats, [self.targets[f][self.row[i]] for i, f in resolved]


def collate_cached(batch, imgsz: tuple[int, int]):
    """``(zero uint8 images [B,3,H,W], targets, [level maps [B,C,h,w]])`` - the images only carry the size."""
    feats = [torch.stack(level) for level in zip(*(item[0] for item in batch))]
    targets = [item[1] for item in batch]
    w, h = imgsz
    images = torch.zeros((len(batch), 3, h, w), dtype=torch.uint8)
    return images, targets, feats


class CachedBatches:
    """Batches ``(zero images, targets, level maps)`` over a RAM ``FeatureCache`` in ``sampler`` order.

    Replaces a DataLoader: there is nothing to decode, and a batch is one gather per level (on the GPU when the
    cache was ``place``d there). The zero image batch only carries the input size (anchors, clipping) and is
    allocated once, where the maps are.
    """

    def __init__(self, cache: FeatureCache, sampler: Iterable, batch_size: int, imgsz: tuple[int, int],
                 pin_memory: bool = False):
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size
        device = cache.levels[0].device if cache.levels else torch.device("cpu")
        # maps already pinned or on the device need no per-batch pinning
        self.pin_memory = pin_memory and device.type == "cpu" and not (cache.levels and cache.levels[0].is_pinned())
        w, h = imgsz
        self.images = torch.zeros((batch_size, 3, h, w), dtype=torch.uint8, device=device)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]], list[torch.Tensor]]]:
        keys = list(self.sampler)
        for start in range(0, len(keys), self.batch_size):
            feats, targets = self.cache.batch(keys[start:start + self.batch_size])
            if not targets:
                continue
            if self.pin_memory:
                feats = [f.pin_memory() for f in feats]
            yield self.images[:len(targets)], targets, feats
