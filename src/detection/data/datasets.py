"""Detection datasets: the dataset config (Pascal VOC XML, COCO JSON, YOLO text labels, Ultralytics data.yaml), the
torch Dataset, DataLoader construction and ground truth for scoring saved predictions.

Policy: every annotation is parsed once at construction by the format's reader (``formats/``), together with the
image size read from the file header, so problems are reported before training starts. Pixel decoding happens
lazily in ``__getitem__``; a file that fails to decode follows ``skip_bad_samples``: a UserError naming the file,
or - in training - the next good sample instead, and - in evaluation (``drop_bad_images``) - no sample at all
(``None``, dropped by ``collate_fn``), so no image is scored twice and the skipped image's ground truth is not
scored either.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from ..core.choices import DEFAULT_AUGMENT
from ..core.errors import ToolkitWarning, UserError
from ..core.io import read_yaml
from ..core.paths import resolve_path
from .device_resize import collate_pending
from .formats import FORMATS, yolo
from .formats.common import (  # re-exported: the reader's building blocks are part of this module's API
    SKIP_HINT,
    BadSample,
    DataReport,
    ReadPolicy,
    Record,
    SplitSource,
    clamp_boxes,
)
from .formats.voc import parse_voc_xml
from .image_io import image_size, read_image, undecodable_images
from .transforms import build_transform

__all__ = [
    "FORMATS", "BadSample", "DataConfig", "DataReport", "DetectionDataset", "ReadPolicy", "Record", "SplitSource",
    "build_dataloader", "build_datasets", "clamp_boxes", "collate_fn", "drop_undecodable", "image_size",
    "load_config_classes", "load_data_config", "load_ground_truth", "parse_voc_xml", "read_image", "read_split",
    "save_transformed_samples",
]


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    path: Path
    classes: list[str]
    train: list[SplitSource]
    valid: list[SplitSource]
    visualize_transformed_images: bool = False
    ignore_unknown_classes: bool = False
    skip_bad_samples: bool = False
    format: str = "voc"
    # COCO: the annotation file's category id of each label (index 0, __background__, is 0); None elsewhere
    category_ids: list[int] | None = None

    @property
    def num_classes(self) -> int:
        """Including __background__ (what torchvision detectors call num_classes)."""
        return len(self.classes)

    def category_id(self, label: int) -> int:
        """The id to write for ``label`` in COCO-style output: the user's COCO category id, else the label itself."""
        label = int(label)
        if not 1 <= label < len(self.classes):
            raise ValueError(f"label {label} outside 1..{len(self.classes) - 1}")
        return self.category_ids[label] if self.category_ids else label

    def label_of(self, category_id: int) -> int:
        """Inverse of :meth:`category_id`; UserError for an id the dataset does not have."""
        ids = self.category_ids or list(range(len(self.classes)))
        if isinstance(category_id, int) and category_id in ids[1:]:
            return ids.index(category_id, 1)
        raise UserError(f"{self.path}: category id {category_id!r} is not one of this dataset's ids {ids[1:]}")


def _bool_key(cfg_path: Path, raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{cfg_path}: {key} must be true or false, got {value!r}")
    return value


def _read_config(path: str | os.PathLike) -> tuple[Path, dict, str]:
    """(resolved path, raw mapping, format): the FORMAT key (voc by default); an Ultralytics data.yaml is yolo."""
    cfg_path = resolve_path(path)
    raw = read_yaml(path, "--config", "pass a dataset YAML such as detection_configs/voc.yaml")
    if yolo.is_ultralytics(raw):
        return cfg_path, raw, "yolo"
    fmt = raw.get("FORMAT", "voc")
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise UserError(f"{cfg_path}: FORMAT {fmt!r} is not one of {', '.join(FORMATS)}")
    return cfg_path, raw, fmt.lower()


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load and validate a dataset YAML: ``FORMAT: voc`` (default; folder pairs or VOCdevkit), ``coco`` or ``yolo``,
    or an Ultralytics data.yaml as it is (see detection_configs/README.md)."""
    cfg_path, raw, fmt = _read_config(path)
    train, valid, classes, category_ids = FORMATS[fmt].sources(cfg_path, raw)
    return DataConfig(
        path=cfg_path.resolve(),
        classes=list(classes),
        train=train,
        valid=valid,
        visualize_transformed_images=_bool_key(cfg_path, raw, "VISUALIZE_TRANSFORMED_IMAGES", False),
        ignore_unknown_classes=_bool_key(cfg_path, raw, "IGNORE_UNKNOWN_CLASSES", False),
        skip_bad_samples=_bool_key(cfg_path, raw, "SKIP_BAD_SAMPLES", False),
        format=fmt,
        category_ids=category_ids,
    )


def load_config_classes(path: str | os.PathLike) -> list[str]:
    """The classes (``__background__`` first, as ``load_data_config`` gives them and checkpoints record them) of any
    dataset YAML ``load_data_config`` takes, without needing its image or label folders: for inference and export.
    A COCO config without ``CLASSES`` still needs its TRAIN_JSON file, whose categories name the classes."""
    cfg_path, raw, fmt = _read_config(path)
    return FORMATS[fmt].classes(cfg_path, raw)


def read_split(data_cfg: DataConfig, split: str, ignore_unknown_classes: bool | None = None,
               skip_bad_samples: bool | None = None) -> tuple[list[Record], DataReport]:
    """Parse one split's annotations with the config's reader (None flags -> the config's keys)."""
    if split not in ("train", "valid"):
        raise UserError(f"split {split!r}: use train or valid")
    policy = ReadPolicy(
        data_cfg.classes,
        data_cfg.ignore_unknown_classes if ignore_unknown_classes is None else ignore_unknown_classes,
        data_cfg.skip_bad_samples if skip_bad_samples is None else skip_bad_samples,
    )
    sources = data_cfg.train if split == "train" else data_cfg.valid
    return FORMATS[data_cfg.format].read(sources, policy), policy.report


# ----------------------------------------------------------------------------------------------- dataset
class DetectionDataset(Dataset):
    """Parsed samples -> ``(image uint8 [3,h,w], target)`` (see docs/ARCHITECTURE.md), whatever the file format.

    ``records``: a reader's output (``read_split``). ``transform``: a ``build_transform`` pipeline (None keeps the
    original image and coordinates). Difficult objects are left out of the training targets unless
    ``include_difficult``; they are always in ``orig_*`` with ``orig_difficult`` set. ``drop_bad_images``
    (evaluation): an image that cannot be decoded gives ``None`` instead of the next sample.
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        transform: Any = None,
        include_difficult: bool = False,
        skip_bad_samples: bool = False,
        drop_bad_images: bool = False,
        report: DataReport | None = None,
        name: str = "dataset",
        verbose: bool = True,
    ) -> None:
        self.classes = list(classes)
        self.records = list(records)
        self.transform = transform
        self.include_difficult = include_difficult
        self.skip_bad_samples = skip_bad_samples
        self.drop_bad_images = drop_bad_images
        self.name = name
        self.report = report if report is not None else DataReport(n_images=len(self.records))
        self._bad_indices: set[int] = set()
        if verbose:
            problems = self.report.problems()
            if problems:
                warnings.warn(f"{name}: " + "; ".join(problems), ToolkitWarning, stacklevel=3)

    # -- access
    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_paths(self) -> list[Path]:
        return [r.image for r in self.records]

    def annotations(self, i: int, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Clamped original-coordinate boxes/labels/difficult of sample ``i`` without decoding the image."""
        rec = self.records[i]
        boxes, _, keep = clamp_boxes(rec.boxes, size or rec.size)
        return {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(rec.labels[keep]),
            "difficult": torch.from_numpy(rec.difficult[keep]),
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        n = len(self.records)
        for attempt in range(n):
            j = (i + attempt) % n
            if j in self._bad_indices:
                if self.drop_bad_images:
                    return None
                continue
            try:
                image = read_image(self.records[j].image)
            except UserError as exc:
                if not self.skip_bad_samples:
                    raise UserError(f"{exc} (or skip bad samples: --skip-bad-samples / SKIP_BAD_SAMPLES: true)") from None
                self._bad_indices.add(j)
                what = "not evaluated" if self.drop_bad_images else "using the next image"
                warnings.warn(f"{self.name}: skipping {self.records[j].image}: cannot decode it ({what})",
                              ToolkitWarning, stacklevel=2)
                if self.drop_bad_images:
                    return None
                continue
            return self._make(j, image)
        raise UserError(f"{self.name}: no sample could be decoded; check the image files")

    def _make(self, j: int, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = image.shape[-2:]
        ann = self.annotations(j, (h, w))  # clamp against the decoded size (the truth)
        train_mask = torch.ones_like(ann["difficult"]) if self.include_difficult else ~ann["difficult"]
        boxes = tv_tensors.BoundingBoxes(ann["boxes"][train_mask], format="XYXY", canvas_size=(h, w))
        labels = ann["labels"][train_mask]
        if self.transform is not None:
            image, tgt = self.transform(tv_tensors.Image(image), {"boxes": boxes, "labels": labels})
            image, boxes, labels = image.as_subclass(torch.Tensor), tgt["boxes"], tgt["labels"]
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": j,
            "orig_size": (int(h), int(w)),
            "orig_boxes": ann["boxes"],
            "orig_labels": ann["labels"],
            "orig_difficult": ann["difficult"],
        }
        if self.transform is not None and "resize" in tgt:  # the image is resized later (``device_resize``)
            target["resize"] = tgt["resize"]
        return image, target


def drop_undecodable(ds: DetectionDataset, skip_bad_samples: bool, progress: bool = True, verbose: bool = True,
                     find: Callable[..., list[tuple[Path, str]]] = undecodable_images) -> int:
    """Decode every image of ``ds`` now (a progress bar when ``progress``), so a corrupt or truncated file stops a
    run before it starts (a UserError naming the files) or, with ``skip_bad_samples``, is left out of ``ds`` and
    counted in its report (one warning when ``verbose``). Returns how many were left out. ``find(paths, desc=,
    show=)`` lists the undecodable ones in the order given (default: ``undecodable_images``; distributed training
    shares the work between its processes)."""
    bad = find(ds.image_paths, desc=f"decoding {ds.name} images", show=progress)
    if not bad:
        return 0
    if not skip_bad_samples:
        names = ", ".join(str(p) for p, _ in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{ds.name}: {len(bad)} image(s) cannot be decoded (corrupt or truncated): {names}; replace "
                        f"or remove them, or {SKIP_HINT}")
    gone = {p for p, _ in bad}
    rep = ds.report
    for rec in ds.records:
        if rec.image in gone:  # take the record out of the counts ReadPolicy.add made
            _, _, keep = clamp_boxes(rec.boxes, rec.size)
            rep.n_images -= 1
            rep.n_objects -= int(keep.sum())
            rep.n_difficult -= int((keep & rec.difficult).sum())
            rep.n_negatives -= int(keep.sum() == 0)
    ds.records = [r for r in ds.records if r.image not in gone]
    rep.bad_files += [(str(p), reason) for p, reason in bad]
    if verbose:
        warnings.warn(f"{ds.name}: skipping {len(bad)} image(s) that cannot be decoded (first: {bad[0][0]})",
                      ToolkitWarning, stacklevel=2)
    return len(bad)


# ------------------------------------------------------------------------------------------- building
def build_datasets(
    data_cfg: DataConfig,
    imgsz: Sequence[int],
    augment: str = DEFAULT_AUGMENT,
    letterbox: bool = False,
    include_difficult: bool = False,
    ignore_unknown_classes: bool | None = None,
    skip_bad_samples: bool | None = None,
    verbose: bool = True,
    splits: Sequence[str] = ("train", "valid"),
) -> tuple[DetectionDataset | None, DetectionDataset | None]:
    """(train, valid) datasets; ``None`` flags fall back to the config's IGNORE_UNKNOWN_CLASSES / SKIP_BAD_SAMPLES.

    The train split gets the ``augment`` preset, valid the deterministic eval resize; a valid image that cannot
    be decoded is dropped (never replaced). A split left out of ``splits`` is returned as None (and not parsed).
    """
    skip = data_cfg.skip_bad_samples if skip_bad_samples is None else skip_bad_samples
    out: list[DetectionDataset | None] = []
    for split, sources, train in (("train", data_cfg.train, True), ("valid", data_cfg.valid, False)):
        if split not in splits:
            out.append(None)
            continue
        records, report = read_split(data_cfg, split, ignore_unknown_classes, skip)
        ds = DetectionDataset(records, data_cfg.classes, build_transform(augment, imgsz, letterbox, train=train),
                              include_difficult=include_difficult, skip_bad_samples=skip, drop_bad_images=not train,
                              report=report, name=f"{data_cfg.path.name} {split}", verbose=verbose)
        if len(ds) == 0:
            where = ", ".join(s.describe() for s in sources)
            raise UserError(f"{data_cfg.path}: the {split} split has no usable samples ({where}); check the paths")
        out.append(ds)
    return out[0], out[1]


def load_ground_truth(
    data_cfg: DataConfig,
    split: str = "valid",
    ignore_unknown_classes: bool | None = None,
    skip_bad_samples: bool | None = None,
    key: str = "file_name",
    exclude: Iterable[str | int] = (),
) -> dict[str | int, dict[str, torch.Tensor]]:
    """``{image: {"boxes", "labels", "difficult"}}`` in original coordinates, from the annotations only (no pixel
    decoding) - for scoring saved predictions against a split. Labels are indices into ``data_cfg.classes``.

    ``key="file_name"``: the image's path relative to its split folder (COCO: the JSON's ``file_name``; VOC: the
    file name). ``key="image_id"``: COCO's image ids (COCO configs only), for results files without file names.
    ``exclude``: keys to leave out - images the predictor could not read, so their objects do not count as missed.
    """
    if key not in ("file_name", "image_id"):
        raise ValueError(f"key {key!r}: use file_name or image_id")
    if key == "image_id" and not FORMATS[data_cfg.format].has_image_ids:
        raise UserError(f"{data_cfg.path}: only COCO datasets have image ids; match predictions by file_name")
    records, report = read_split(data_cfg, split, ignore_unknown_classes, skip_bad_samples)
    ds = DetectionDataset(records, data_cfg.classes, report=report, name=f"{data_cfg.path.name} {split}")
    out: dict[str | int, dict[str, torch.Tensor]] = {}
    skip = set(exclude)
    for i, rec in enumerate(ds.records):
        k = rec.name if key == "file_name" else rec.image_id
        if k in skip:
            continue
        if k in out:
            raise UserError(f"{data_cfg.path}: two {split} images are named {k}; file names must be unique to match predictions")
        out[k] = ds.annotations(i)
    return out


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict] | None]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict]]:
    """Stack images to uint8 [B,3,H,W] (all equal after a resize transform); a list if sizes differ; a
    ``device_resize.ResizeBatch`` (and the targets in its order) for samples whose resize is left to the device.
    ``None`` samples (images evaluation could not decode) are left out; a batch of only those gives ([], [])."""
    failed = next((b for b in batch if isinstance(b, _WorkerFailure)), None)
    if failed is not None:
        return failed  # type: ignore[return-value]
    batch = [b for b in batch if b is not None]
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if targets and "resize" in targets[0]:  # resized later, on the device (``device_resize``)
        return collate_pending(images, targets)
    if images and all(im.shape == images[0].shape for im in images):
        return torch.stack(images), targets
    return images, targets


class _WorkerFailure:
    """A UserError raised in a DataLoader worker, carried back as data: torch would re-raise it as a new UserError
    whose message holds the worker's whole traceback, and CLIs print one line."""

    def __init__(self, message: str) -> None:
        self.message = message


class _CatchUserErrors(Dataset):
    """Wraps a dataset read by worker processes: a UserError becomes a ``_WorkerFailure`` sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except UserError as exc:
            return _WorkerFailure(str(exc))


class _Loader(DataLoader):
    """A DataLoader whose worker-side UserErrors come back as the original one line (see ``_WorkerFailure``), and
    which leaves out batches whose every image was dropped (so consumers never see an empty batch)."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _WorkerFailure):
                raise UserError(batch.message)
            if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], list) and not batch[1]:
                continue
            yield batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy seeds from it
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """Deterministic DataLoader. With ``distributed`` the sampler is a DistributedSampler: call
    ``loader.sampler.set_epoch(epoch)`` every epoch so shuffling changes. An explicit ``sampler`` (e.g. the
    training engine's epoch-keyed one) replaces both."""
    if batch_size < 1:
        raise UserError(f"--batch {batch_size}: must be at least 1")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if sampler is None and distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return _Loader(
        _CatchUserErrors(dataset) if workers > 0 else dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def save_transformed_samples(dataset: DetectionDataset, out_dir: str | os.PathLike, n: int = 4) -> list[Path]:
    """Write ``n`` augmented samples with their training boxes drawn (VISUALIZE_TRANSFORMED_IMAGES)."""
    from torchvision.utils import draw_bounding_boxes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(min(n, len(dataset))):
        image, target = dataset[k * max(1, len(dataset) // max(n, 1))]
        names = [dataset.classes[int(c)] for c in target["labels"]]
        drawn = image if not names else draw_bounding_boxes(
            image, target["boxes"].as_subclass(torch.Tensor), labels=names, colors="yellow", width=2)
        path = out_dir / f"transformed_{k}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths
