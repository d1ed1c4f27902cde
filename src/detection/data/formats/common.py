"""What every annotation format shares: the in-memory record, the problem report, the bad-sample / unknown-class
policy, box clamping, config path resolution, and the interface each format implements (``DataFormat`` with its
``FormatWriter``; the registry is ``formats.FORMATS``).

Readers parse annotations once (no pixel decoding) into :class:`Record` objects with raw absolute
``xmin, ymin, xmax, ymax`` boxes; :meth:`ReadPolicy.add` clamps them against the image header size and counts what
it changed, so every format reports problems the same way.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import UserError
from ...core.paths import config_relative_candidates
from ..image_io import UnreadableImage, image_size

SKIP_HINT = "skip bad samples (--skip-bad-samples / SKIP_BAD_SAMPLES: true)"
UNKNOWN_HINT = "--ignore-unknown-classes (IGNORE_UNKNOWN_CLASSES: true) to skip such objects"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class SplitSource:
    """One source of samples of a split.

    VOC: an (images folder, XML folder) pair or one VOCdevkit split. COCO: an images folder + ``json``.
    YOLO: ``images`` is a folder (searched recursively) or a ``.txt`` list of image paths; ``annots`` an optional
    labels folder (default: the Ultralytics rule, ``.../images/...`` -> ``.../labels/...``).
    """

    key: str  # config key it came from, for messages
    images: Path | None = None
    annots: Path | None = None
    devkit_dir: Path | None = None  # e.g. VOCdevkit/VOC2007
    split: str | None = None  # e.g. trainval
    json: Path | None = None  # COCO annotation file

    def describe(self) -> str:
        if self.devkit_dir is not None:
            return f"{self.devkit_dir} [{self.split}]"
        if self.json is not None:
            return f"{self.json} + {self.images}"
        return f"{self.images} + {self.annots}" if self.annots is not None else str(self.images)


def resolve_config_path(cfg_path: Path, key: str, value: Any, kind: str = "folder", base: Path | None = None,
                        fix: str = "fix the path") -> Path:
    """Relative paths: ``base`` (default: the config file's folder) first, then the repository root."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise UserError(f"{cfg_path}: {key} must be a path string, got {value!r}")
    candidates = config_relative_candidates(base or cfg_path.parent, str(value))
    checks = {"folder": Path.is_dir, "file": Path.is_file, "path": Path.exists}
    for c in candidates:
        if checks[kind](c):
            return c.resolve()
    looked = " or ".join(str(c) for c in candidates)
    raise UserError(f"{cfg_path}: {key}: {kind} {value!r} not found (looked in {looked}); {fix}")


def classes_key(cfg_path: Path, raw: dict) -> list[str]:
    """The ``CLASSES`` key of a config (VOC, ``FORMAT: yolo``), checked."""
    if raw.get("CLASSES") is None:
        raise UserError(f"{cfg_path}: missing key CLASSES (a list starting with __background__)")
    return check_classes(str(cfg_path), raw["CLASSES"])


def check_classes(where: str, classes: Any, key: str = "CLASSES") -> list[str]:
    """A ``__background__``-first list of unique, non-empty names."""
    if not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise UserError(f"{where}: {key} must be a list of class names, got {classes!r}")
    if not classes or classes[0] != "__background__":
        raise UserError(f"{where}: {key} must start with '__background__' (label 0 is the background); add it first")
    if len(classes) < 2:
        raise UserError(f"{where}: {key} needs at least one real class after __background__")
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise UserError(f"{where}: {key} lists {', '.join(dupes)} more than once; remove the duplicates")
    return list(classes)


# ----------------------------------------------------------------------------------------------- records
class BadSample(Exception):
    """Internal: a sample that is unusable as a whole (policy decides: error or skip)."""


@dataclass
class Record:
    image: Path
    name: str  # the key predictions are matched by: path relative to the split's image folder (VOC: file name)
    boxes: np.ndarray  # [N,4] float32 raw absolute xyxy (clamped again after decoding)
    labels: np.ndarray  # [N] int64 index into classes
    difficult: np.ndarray  # [N] bool (VOC difficult, COCO iscrowd)
    size: tuple[int, int]  # (H, W) from the image header
    annotation: Path | None = None  # the XML / label file / JSON it came from
    image_id: int | str | None = None  # COCO's image id


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
    size_mismatch: int = 0  # annotation's image size differs from the image file
    no_label_file: int = 0  # images without a label file / XML (kept as background images)
    unmatched_annotations: list[str] = field(default_factory=list)  # label files / COCO annotations without an image
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
        if self.unmatched_annotations:
            out.append(f"{len(self.unmatched_annotations)} annotation(s) without an image ignored "
                       f"(first: {self.unmatched_annotations[0]})")
        if self.no_label_file:
            out.append(f"{self.no_label_file} image(s) without a label file or XML, used as background images")
        if self.size_mismatch:
            out.append(f"{self.size_mismatch} annotated image size(s) differ from the image; the image size was used")
        return out


class ReadPolicy:
    """Applies the user's choices while a reader runs: unknown classes and bad samples stop with one line naming
    the file, or are skipped and counted in ``report``."""

    def __init__(self, classes: list[str], ignore_unknown_classes: bool = False, skip_bad_samples: bool = False):
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes) if i > 0}
        self.ignore_unknown_classes = ignore_unknown_classes
        self.skip_bad_samples = skip_bad_samples
        self.report = DataReport()

    def bad(self, where: Path | str | None, exc: BadSample) -> None:
        if not self.skip_bad_samples:
            raise UserError(f"{exc}; fix or remove it, or {SKIP_HINT}")
        self.report.bad_files.append((str(where), str(exc)))

    def unknown(self, key: str, message: str) -> None:
        """An object whose class is not in ``classes``: ``message`` names the file and the class."""
        if not self.ignore_unknown_classes:
            raise UserError(f"{message}; add it to the config, or pass {UNKNOWN_HINT}")
        self.report.unknown_classes[key] += 1

    def header_size(self, image: Path) -> tuple[int, int]:
        try:
            return image_size(image)
        except UnreadableImage as exc:
            raise BadSample(exc.problem) from None

    def add(self, records: list[Record], rec: Record, annotated_size: tuple[int, int] | None = None) -> None:
        """Count what clamping will change, then keep the record."""
        rep = self.report
        if annotated_size is not None and tuple(annotated_size) != tuple(rec.size):
            rep.size_mismatch += 1
        _, changed, keep = clamp_boxes(rec.boxes, rec.size)
        rep.clamped_boxes += int((changed & keep).sum())
        rep.dropped_boxes += int((~keep).sum())
        rep.n_objects += int(keep.sum())
        rep.n_difficult += int((keep & rec.difficult).sum())
        rep.n_negatives += int(keep.sum() == 0)
        rep.n_images += 1
        records.append(rec)


def make_record(image: Path, name: str, boxes: list, labels: list, difficult: list, size: tuple[int, int],
                annotation: Path | None = None, image_id: int | str | None = None) -> Record:
    return Record(Path(image), name, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                  np.asarray(difficult, bool), size, annotation, image_id)


# ------------------------------------------------------------------------------------------------ formats
class FormatWriter:
    """One format's label files for a stream of images, driven by ``annotations.LabelWriter`` (which clamps the
    boxes and drops empty ones first): ``add`` writes or collects one image's labels, ``close`` writes what is
    written at the end. ``lost_difficult``: difficult objects the format cannot mark (written as ordinary ones)."""

    whole_pixels = False  # boxes are rounded to whole pixels before empty ones are dropped

    def __init__(self, out_dir: Path, classes: Sequence[str], category_ids: Sequence[int], json_name: str,
                 classes_file: str | None) -> None:
        self.out_dir, self.classes, self.category_ids = Path(out_dir), list(classes), list(category_ids)
        self.json_path = self.out_dir / json_name
        self.classes_file = classes_file
        self.lost_difficult = 0

    def add(self, image_path: Path, name: str, hw: tuple[int, int], boxes: np.ndarray, labels: np.ndarray,
            scores: np.ndarray | None, difficult: np.ndarray, image_id: int | None) -> Path | None:
        """One image's kept objects (``boxes`` [N,4] xyxy pixels, ``labels`` 1..K); the file written, if any."""
        raise NotImplementedError

    def close(self, written: Sequence[Path]) -> list[Path]:
        """Files written at the end (``written``: those written so far)."""
        return []


class DataFormat:
    """An annotation format: its reader (config keys -> sources -> records) and its writer, plus the dataset layout
    and config the toolkit writes in it (``convert``, ``synthetic``)."""

    name = ""
    config_name = "dataset.yaml"  # the file a written dataset's config goes to
    has_image_ids = False  # records carry the file's image ids (``Record.image_id``)
    toolkit_keys = True  # a written config may carry the toolkit's own keys (VISUALIZE_TRANSFORMED_IMAGES, ...)
    nested_names = True  # images may sit in sub-folders of a split's image folder
    writer: type[FormatWriter] = FormatWriter

    @classmethod
    def sources(cls, cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str],
                                                          list[int] | None]:
        """(train sources, valid sources, classes, category ids or None) of a dataset config in this format."""
        raise NotImplementedError

    @classmethod
    def classes(cls, cfg_path: Path, raw: dict) -> list[str]:
        """The config's classes without needing its image or label folders (inference, export)."""
        return classes_key(cfg_path, raw)

    @classmethod
    def read(cls, sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
        """Records of every sample of ``sources``; problems follow ``policy``."""
        raise NotImplementedError

    @classmethod
    def split_layout(cls, out: Path, split: str) -> tuple[Path, Path]:
        """Where a written dataset keeps a split ("train"/"valid"): (images folder, labels folder or JSON folder)."""
        return out / split / "images", out / split / "labels"

    @classmethod
    def dataset_config(cls, classes: Sequence[str]) -> dict[str, Any]:
        """The dataset YAML for ``split_layout`` (paths relative to the YAML in ``out``) that ``--config`` accepts."""
        raise NotImplementedError
