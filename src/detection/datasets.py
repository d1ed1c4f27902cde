"""Pascal VOC XML datasets: config loading, forgiving-but-never-silent parsing, DataLoader construction.

Policy (issue 4): every annotation XML is parsed once at construction (xml.etree is fast) and cached in
memory together with the image size read from the file header, so problems are reported before training
starts. Pixel decoding happens lazily in ``__getitem__``; a file that fails to decode follows the same
``skip_bad_samples`` policy (replaced by the next good sample, or a UserError naming the file).

Box convention: XML coordinates are taken as absolute pixel coordinates ``xmin, ymin, xmax, ymax`` (as the
seed did - no VOC "-1" shift), reordered if reversed and clamped to the *decoded* image size.
"""

from __future__ import annotations

import math
import os
import random
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from .errors import UserError
from .image_io import IMAGE_EXTS, image_size, read_image
from .transforms import DEFAULT_AUGMENT, build_transform
from .utils import REPO_ROOT

# ------------------------------------------------------------------------------------------------ config
@dataclass
class SplitSource:
    """One source of samples: a seed-style (images folder, annotations folder) pair or one VOCdevkit split."""

    key: str  # config key it came from, for messages
    images: Path | None = None
    annots: Path | None = None
    devkit_dir: Path | None = None  # e.g. VOCdevkit/VOC2007
    split: str | None = None  # e.g. trainval

    def describe(self) -> str:
        if self.devkit_dir is not None:
            return f"{self.devkit_dir} [{self.split}]"
        return f"{self.images} + {self.annots}"


@dataclass
class DataConfig:
    path: Path
    classes: list[str]
    train: list[SplitSource]
    valid: list[SplitSource]
    visualize_transformed_images: bool = False
    ignore_unknown_classes: bool = False
    skip_bad_samples: bool = False

    @property
    def num_classes(self) -> int:
        """Including __background__ (what torchvision detectors call num_classes)."""
        return len(self.classes)


def _resolve(cfg_path: Path, key: str, value: Any, kind: str = "folder") -> Path:
    """Relative paths: the config file's folder first, then the repository root."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise UserError(f"{cfg_path}: {key} must be a path string, got {value!r}")
    p = Path(str(value)).expanduser()
    candidates = [p] if p.is_absolute() else [cfg_path.parent / p, REPO_ROOT / p]
    for c in candidates:
        if (c.is_dir() if kind == "folder" else c.is_file()):
            return c.resolve()
    looked = " or ".join(str(c) for c in candidates)
    raise UserError(f"{cfg_path}: {key}: {kind} {value!r} not found (looked in {looked}); fix the path")


def _bool_key(cfg_path: Path, raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{cfg_path}: {key} must be true or false, got {value!r}")
    return value


def _devkit_sources(cfg_path: Path, raw: dict, key: str, root: Path) -> list[SplitSource]:
    sets = raw.get(key)
    if sets is None:
        raise UserError(f"{cfg_path}: missing key {key} (e.g. {key}: [[2007, trainval], [2012, trainval]])")
    if not isinstance(sets, list) or not sets or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[1], str) for s in sets
    ):
        raise UserError(f"{cfg_path}: {key} must be a list of [year, split] pairs, e.g. [[2007, test]]; got {sets!r}")
    out = []
    for year, split in sets:
        year_dir = next((d for d in (root / f"VOC{year}", root / str(year)) if d.is_dir()), None)
        if year_dir is None:
            raise UserError(f"{cfg_path}: {key}: no folder VOC{year} (or {year}) under VOC_ROOT {root}")
        listing = year_dir / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise UserError(f"{cfg_path}: {key}: split file {listing} not found; check the split name {split!r}")
        for sub in ("JPEGImages", "Annotations"):
            if not (year_dir / sub).is_dir():
                raise UserError(f"{cfg_path}: {key}: folder {year_dir / sub} not found; is {year_dir} a VOC year folder?")
        out.append(SplitSource(key=key, devkit_dir=year_dir, split=split))
    return out


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load and validate a dataset YAML (seed keys or VOCdevkit form, see detection_configs/README.md)."""
    cfg_path = Path(path).expanduser()
    if not cfg_path.is_absolute() and not cfg_path.is_file():
        cfg_path = REPO_ROOT / cfg_path
    if not cfg_path.is_file():
        raise UserError(f"--config {path}: file not found; pass a YAML such as detection_configs/voc.yaml")
    try:
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{cfg_path}: not valid YAML ({first}); fix the syntax")
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path}: expected a mapping of KEY: value, got {type(raw).__name__}")

    classes = raw.get("CLASSES")
    if classes is None:
        raise UserError(f"{cfg_path}: missing key CLASSES (a list starting with __background__)")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise UserError(f"{cfg_path}: CLASSES must be a list of class names, got {classes!r}")
    if not classes or classes[0] != "__background__":
        raise UserError(f"{cfg_path}: CLASSES must start with '__background__' (seed convention); add it first")
    if len(classes) < 2:
        raise UserError(f"{cfg_path}: CLASSES needs at least one real class after __background__")
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise UserError(f"{cfg_path}: CLASSES lists {', '.join(dupes)} more than once; remove the duplicates")

    if "VOC_ROOT" in raw:
        both = [k for k in ("TRAIN_IMG", "TRAIN_ANNOT", "VALID_IMG", "VALID_ANNOT") if k in raw]
        if both:
            raise UserError(f"{cfg_path}: VOC_ROOT and {', '.join(both)} are both set; use one form, not both")
        root = _resolve(cfg_path, "VOC_ROOT", raw["VOC_ROOT"])
        train = _devkit_sources(cfg_path, raw, "TRAIN_SETS", root)
        valid = _devkit_sources(cfg_path, raw, "VALID_SETS", root)
    else:
        missing = [k for k in ("TRAIN_IMG", "TRAIN_ANNOT", "VALID_IMG", "VALID_ANNOT") if raw.get(k) is None]
        if missing:
            raise UserError(
                f"{cfg_path}: missing key {', '.join(missing)} (give TRAIN_IMG/TRAIN_ANNOT/VALID_IMG/VALID_ANNOT "
                "folders, or VOC_ROOT with TRAIN_SETS/VALID_SETS)"
            )
        train = [SplitSource("TRAIN_IMG", _resolve(cfg_path, "TRAIN_IMG", raw["TRAIN_IMG"]),
                             _resolve(cfg_path, "TRAIN_ANNOT", raw["TRAIN_ANNOT"]))]
        valid = [SplitSource("VALID_IMG", _resolve(cfg_path, "VALID_IMG", raw["VALID_IMG"]),
                             _resolve(cfg_path, "VALID_ANNOT", raw["VALID_ANNOT"]))]
    return DataConfig(
        path=cfg_path.resolve(),
        classes=list(classes),
        train=train,
        valid=valid,
        visualize_transformed_images=_bool_key(cfg_path, raw, "VISUALIZE_TRANSFORMED_IMAGES", False),
        ignore_unknown_classes=_bool_key(cfg_path, raw, "IGNORE_UNKNOWN_CLASSES", False),
        skip_bad_samples=_bool_key(cfg_path, raw, "SKIP_BAD_SAMPLES", False),
    )


# ----------------------------------------------------------------------------------------------- listing
SampleSpec = tuple  # (image Path | None, xml Path | None) or (image, xml, problem str)


def _by_stem(folder: Path, exts: Sequence[str]) -> tuple[dict[str, Path], list[SampleSpec]]:
    found: dict[str, Path] = {}
    dupes: list[SampleSpec] = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in exts and p.is_file():
            if p.stem in found:
                dupes.append((p, None, f"{p.name} and {found[p.stem].name} share the stem {p.stem!r}"))
            else:
                found[p.stem] = p
    return found, dupes


def list_samples(sources: Iterable[SplitSource]) -> list[SampleSpec]:
    """(image, xml) pairs matched by file stem; a missing side is None (the dataset applies the policy)."""
    out: list[SampleSpec] = []
    for src in sources:
        if src.devkit_dir is not None:
            images, dupes = _by_stem(src.devkit_dir / "JPEGImages", IMAGE_EXTS)
            annots, _ = _by_stem(src.devkit_dir / "Annotations", (".xml",))
            listing = src.devkit_dir / "ImageSets" / "Main" / f"{src.split}.txt"
            ids = [ln.split()[0] for ln in listing.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for i in ids:
                img = images.get(i)
                if img is None:
                    out.append((None, annots.get(i), f"image {i} listed in {listing} not found in JPEGImages"))
                else:
                    out.append((img, annots.get(i)))
        else:
            images, dupes = _by_stem(src.images, IMAGE_EXTS)
            annots, _ = _by_stem(src.annots, (".xml",))
            for stem in sorted(set(images) | set(annots)):
                out.append((images.get(stem), annots.get(stem)))
        out.extend(dupes)
    return out


# ----------------------------------------------------------------------------------------------- parsing
class BadSample(Exception):
    """Internal: a sample that is unusable as a whole (policy decides: error or skip)."""


def parse_voc_xml(path: Path) -> tuple[list[tuple[str, list[float], bool]], tuple[int, int] | None]:
    """-> ([(class name, [xmin, ymin, xmax, ymax] raw floats, difficult)], (H, W) from <size> or None)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BadSample(f"malformed XML {path} ({exc})")
    except OSError as exc:
        raise BadSample(f"cannot read XML {path} ({exc.strerror or exc})")
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise BadSample(f"malformed XML {path}: object #{k + 1} lacks <name> or <bndbox>")
        try:
            box = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise BadSample(f"malformed XML {path}: object #{k + 1} ({name}) has a missing or non-numeric coordinate")
        if not all(math.isfinite(v) for v in box):
            raise BadSample(f"malformed XML {path}: object #{k + 1} ({name}) has a non-finite coordinate")
        diff = (obj.findtext("difficult") or "0").strip()
        objects.append((name, box, diff not in ("0", "", "false", "False")))
    size = None
    try:
        sz = root.find("size")
        if sz is not None:
            size = (int(float(sz.findtext("height"))), int(float(sz.findtext("width"))))
    except (TypeError, ValueError):
        size = None  # <size> is informational only; the decoded image is the truth
    return objects, size


def clamp_boxes(boxes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder reversed corners and clamp to an (H, W) image.

    Returns (clamped boxes, changed mask, keep mask) - keep is False for boxes with no area left.
    """
    h, w = size
    b = boxes.astype(np.float32).reshape(-1, 4)
    out = np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                    np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], axis=1)
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    changed = (out != b).any(axis=1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, changed, keep


@dataclass
class DataReport:
    """What parsing found; printed once as a summary instead of one warning per box."""

    n_images: int = 0
    n_negatives: int = 0
    n_objects: int = 0  # kept objects, difficult included
    n_difficult: int = 0
    clamped_boxes: int = 0
    dropped_boxes: int = 0
    size_mismatch: int = 0  # XML <size> differs from the image file
    unknown_classes: Counter = field(default_factory=Counter)
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def problems(self) -> list[str]:
        out = []
        if self.clamped_boxes:
            out.append(f"{self.clamped_boxes} box(es) clamped to the image (float/negative/outside/reversed)")
        if self.dropped_boxes:
            out.append(f"{self.dropped_boxes} box(es) dropped (no area after clamping)")
        if self.unknown_classes:
            names = ", ".join(f"{k} x{v}" for k, v in self.unknown_classes.most_common())
            out.append(f"{sum(self.unknown_classes.values())} object(s) of unknown classes skipped ({names})")
        if self.bad_files:
            first = self.bad_files[0][1]
            out.append(f"{len(self.bad_files)} bad sample(s) skipped (first: {first})")
        if self.size_mismatch:
            out.append(f"{self.size_mismatch} XML <size> value(s) differ from the image; the image size was used")
        return out


@dataclass
class _Record:
    image: Path
    xml: Path
    boxes: np.ndarray  # [N,4] float32 raw XML values (clamped again after decoding)
    labels: np.ndarray  # [N] int64
    difficult: np.ndarray  # [N] bool
    size: tuple[int, int]  # (H, W) from the header


class VOCDataset(Dataset):
    """Pascal VOC XML samples -> ``(image uint8 [3,h,w], target)`` (see docs/ARCHITECTURE.md).

    ``samples``: (image, xml) pairs, as ``list_samples`` returns. ``transform``: a ``build_transform`` pipeline
    (None keeps the original image and coordinates). Difficult objects are left out of the training targets
    unless ``include_difficult``; they are always in ``orig_*`` with ``orig_difficult`` set.
    """

    def __init__(
        self,
        samples: Sequence[SampleSpec],
        classes: Sequence[str],
        transform: Any = None,
        include_difficult: bool = False,
        ignore_unknown_classes: bool = False,
        skip_bad_samples: bool = False,
        name: str = "dataset",
        verbose: bool = True,
    ) -> None:
        self.classes = list(classes)
        self.transform = transform
        self.include_difficult = include_difficult
        self.skip_bad_samples = skip_bad_samples
        self.name = name
        self.report = DataReport()
        self.records: list[_Record] = []
        index = {c: i for i, c in enumerate(self.classes)}
        for spec in samples:
            try:
                self.records.append(self._parse(spec, index, ignore_unknown_classes))
            except BadSample as exc:
                if not skip_bad_samples:
                    raise UserError(f"{exc}; fix or remove it, or skip bad samples (--skip-bad-samples / SKIP_BAD_SAMPLES: true)")
                self.report.bad_files.append((str(spec[0] or spec[1]), str(exc)))
        self.report.n_images = len(self.records)
        self._bad_indices: set[int] = set()
        if verbose:
            problems = self.report.problems()
            if problems:
                warnings.warn(f"{name}: " + "; ".join(problems), stacklevel=2)

    def _parse(self, spec: SampleSpec, index: dict[str, int], ignore_unknown: bool) -> _Record:
        img, xml = spec[0], spec[1]
        if len(spec) > 2 and spec[2]:
            raise BadSample(spec[2])
        if img is None:
            raise BadSample(f"annotation {xml} has no matching image (expected {Path(xml).stem}.jpg/.png/... beside the images)")
        if xml is None:
            raise BadSample(f"image {img} has no annotation XML ({Path(img).stem}.xml); an image without objects still needs an XML")
        objects, xml_size = parse_voc_xml(Path(xml))
        try:
            size = image_size(img)
        except UserError as exc:
            raise BadSample(str(exc).split("; replace")[0])
        if xml_size is not None and xml_size != size:
            self.report.size_mismatch += 1
        boxes, labels, difficult = [], [], []
        for name, box, diff in objects:
            if name not in index or name == "__background__":
                if not ignore_unknown:
                    raise UserError(
                        f"{xml}: class {name!r} is not in CLASSES; add it to the config, or pass "
                        "--ignore-unknown-classes (IGNORE_UNKNOWN_CLASSES: true) to skip such objects"
                    )
                self.report.unknown_classes[name] += 1
                continue
            boxes.append(box)
            labels.append(index[name])
            difficult.append(diff)
        rec = _Record(Path(img), Path(xml), np.asarray(boxes, np.float32).reshape(-1, 4),
                      np.asarray(labels, np.int64), np.asarray(difficult, bool), size)
        _, changed, keep = clamp_boxes(rec.boxes, size)
        self.report.clamped_boxes += int((changed & keep).sum())
        self.report.dropped_boxes += int((~keep).sum())
        self.report.n_objects += int(keep.sum())
        self.report.n_difficult += int((keep & rec.difficult).sum())
        self.report.n_negatives += int(keep.sum() == 0)
        return rec

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(self.records)
        for attempt in range(n):
            j = (i + attempt) % n
            if j in self._bad_indices:
                continue
            try:
                image = read_image(self.records[j].image)
            except UserError as exc:
                if not self.skip_bad_samples:
                    raise UserError(f"{exc} (or skip bad samples: --skip-bad-samples / SKIP_BAD_SAMPLES: true)")
                self._bad_indices.add(j)
                warnings.warn(f"{self.name}: skipping {self.records[j].image}: cannot decode it", stacklevel=2)
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
        return image, target


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
) -> tuple[VOCDataset | None, VOCDataset | None]:
    """(train, valid) datasets; ``None`` flags fall back to the config's IGNORE_UNKNOWN_CLASSES / SKIP_BAD_SAMPLES.

    The train split gets the ``augment`` preset, valid the deterministic eval resize. A split left out of
    ``splits`` is returned as None (and not parsed).
    """
    ignore = data_cfg.ignore_unknown_classes if ignore_unknown_classes is None else ignore_unknown_classes
    skip = data_cfg.skip_bad_samples if skip_bad_samples is None else skip_bad_samples
    out: list[VOCDataset | None] = []
    for split, sources, train in (("train", data_cfg.train, True), ("valid", data_cfg.valid, False)):
        if split not in splits:
            out.append(None)
            continue
        samples = list_samples(sources)
        ds = VOCDataset(samples, data_cfg.classes, build_transform(augment, imgsz, letterbox, train=train),
                        include_difficult=include_difficult, ignore_unknown_classes=ignore,
                        skip_bad_samples=skip, name=f"{data_cfg.path.name} {split}", verbose=verbose)
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
) -> dict[str, dict[str, torch.Tensor]]:
    """``{image file name: {"boxes", "labels", "difficult"}}`` in original coordinates, from the XMLs only
    (no pixel decoding) - for scoring saved predictions against a split."""
    if split not in ("train", "valid"):
        raise UserError(f"split {split!r}: use train or valid")
    ds = VOCDataset(
        list_samples(data_cfg.train if split == "train" else data_cfg.valid), data_cfg.classes,
        ignore_unknown_classes=data_cfg.ignore_unknown_classes if ignore_unknown_classes is None else ignore_unknown_classes,
        skip_bad_samples=data_cfg.skip_bad_samples if skip_bad_samples is None else skip_bad_samples,
        name=f"{data_cfg.path.name} {split}",
    )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i, rec in enumerate(ds.records):
        if rec.image.name in out:
            raise UserError(f"{data_cfg.path}: two {split} images are named {rec.image.name}; file names must be unique to match predictions")
        out[rec.image.name] = ds.annotations(i)
    return out


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict]]:
    """Stack images to uint8 [B,3,H,W] (all equal after a resize transform); a list if sizes differ."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), targets
    return images, targets


class _Loader(DataLoader):
    """A DataLoader whose worker-side UserErrors come back as the original one line.

    torch re-raises worker exceptions as ``UserError("Caught UserError in DataLoader worker...<traceback>")``;
    CLIs must print one line, so keep only the original message.
    """

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as exc:
                text = str(exc)
                if "DataLoader worker" not in text:
                    raise
                last = [ln for ln in text.splitlines() if ln.strip()][-1]
                raise UserError(last.split("UserError: ", 1)[-1]) from None
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
        dataset,
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


def save_transformed_samples(dataset: VOCDataset, out_dir: str | os.PathLike, n: int = 4) -> list[Path]:
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
