"""YOLO text labels (one ``class cx cy w h`` line per object, normalized to [0, 1]): config keys, the Ultralytics
``data.yaml`` form, listing, parsing and writing (``YoloFormat``).

Label files are found by the Ultralytics rule (the last ``images`` folder in an image's path becomes ``labels``,
the extension ``.txt``; no ``images`` folder: the label lies beside the image) unless the config names a labels
folder. YOLO class id ``k`` is ``classes[k + 1]`` (``classes[0]`` is ``__background__``). A line with more than 6
values and an odd count is an Ultralytics polygon; its bounding box is used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import UserError
from ..image_io import IMAGE_EXTS
from .common import (
    BadSample,
    DataFormat,
    FormatWriter,
    ReadPolicy,
    Record,
    SplitSource,
    check_classes,
    classes_key,
    make_record,
    resolve_config_path,
)

KEYS = ("TRAIN_IMG", "VALID_IMG")
# YOLO exporters write 6 significant digits; a value that much past the image border is a rounding artefact
TOLERANCE = 1e-4
NOT_LABEL_FILES = {"classes.txt"}  # LabelImg writes the class names beside the labels
DECIMALS = 6  # Ultralytics writes 6 significant digits; 6 decimals keep boxes within 0.001 px at 1000 px


def is_ultralytics(raw: dict) -> bool:
    """An Ultralytics ``data.yaml``: ``names`` and ``train``/``val`` keys (lower case), no ``CLASSES``."""
    return "names" in raw and ("train" in raw or "val" in raw) and "CLASSES" not in raw


# ------------------------------------------------------------------------------------------------ config
def class_names(cfg_path: Path, raw: dict) -> list[str]:
    """``__background__`` + the ``names`` of an Ultralytics data.yaml (a list or an {id: name} mapping)."""
    names = raw["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise UserError(f"{cfg_path}: names keys must be the class ids 0..{len(names) - 1}, got {sorted(names)!r}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UserError(f"{cfg_path}: names must be a list (or {{id: name}} mapping) of class names, got {names!r}")
    if "__background__" in names:
        raise UserError(f"{cfg_path}: names must not contain '__background__' (it is added internally); remove it")
    nc = raw.get("nc")
    if nc is not None and nc != len(names):
        raise UserError(f"{cfg_path}: nc is {nc} but names lists {len(names)} classes; make them agree")
    return check_classes(str(cfg_path), ["__background__"] + list(names), "names")


def _entries(cfg_path: Path, key: str, value: Any, base: Path) -> list[SplitSource]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UserError(f"{cfg_path}: {key} is an empty list; name an image folder or a .txt list of images")
    return [SplitSource(key, resolve_config_path(cfg_path, key, v, "path", base)) for v in values]


def sources_from_ultralytics(cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str]]:
    """(train, valid, classes) of an Ultralytics data.yaml (``path``, ``train``, ``val``, ``names``)."""
    for key in ("train", "val"):
        if raw.get(key) is None:
            raise UserError(f"{cfg_path}: missing key {key} (an image folder or .txt list, relative to path)")
    base = resolve_config_path(cfg_path, "path", raw["path"]) if raw.get("path") else cfg_path.parent
    classes = class_names(cfg_path, raw)
    return _entries(cfg_path, "train", raw["train"], base), _entries(cfg_path, "val", raw["val"], base), classes


def sources_from_config(cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource]]:
    """(train, valid) of a ``FORMAT: yolo`` config: TRAIN_IMG / VALID_IMG (+ optional TRAIN_LABELS / VALID_LABELS)."""
    missing = [k for k in KEYS if raw.get(k) is None]
    if missing:
        raise UserError(f"{cfg_path}: missing key {', '.join(missing)} (FORMAT: yolo needs TRAIN_IMG/VALID_IMG image "
                        "folders; labels are found in the matching labels/ folders or TRAIN_LABELS/VALID_LABELS)")
    out = []
    for img_key, lbl_key in (("TRAIN_IMG", "TRAIN_LABELS"), ("VALID_IMG", "VALID_LABELS")):
        labels = resolve_config_path(cfg_path, lbl_key, raw[lbl_key]) if raw.get(lbl_key) is not None else None
        out.append([SplitSource(img_key, resolve_config_path(cfg_path, img_key, raw[img_key], "path"), labels)])
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------- listing
def label_path(image: Path) -> Path:
    """The Ultralytics rule: ``.../images/a/b.jpg`` -> ``.../labels/a/b.txt``; without ``images``: beside it."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _list_images(src: SplitSource) -> tuple[list[tuple[Path, str]], Path | None]:
    """[(image, name relative to the source)] and the folder label files are expected under (None for lists)."""
    root = src.images
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        labels_root = src.annots or label_path(root / "x").parent
        return [(p, p.relative_to(root).as_posix()) for p in files], labels_root
    if root.suffix.lower() != ".txt":
        raise UserError(f"{src.key}: {root} is neither an image folder nor a .txt list of images")
    out = []
    for line in root.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        p = Path(line).expanduser()
        p = p if p.is_absolute() else (root.parent / p)
        p = Path(os.path.normpath(p))
        name = p.relative_to(root.parent).as_posix() if p.is_relative_to(root.parent) else p.name
        out.append((p, name))
    return out, None


# ----------------------------------------------------------------------------------------------- parsing
def parse_yolo_labels(path: Path) -> list[tuple[int, list[float], int]]:
    """-> [(class id, [cx, cy, w, h] normalized, line number)]; malformed lines raise BadSample."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadSample(f"cannot read label file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if not (len(parts) == 5 or (len(parts) >= 7 and len(parts) % 2 == 1)):
            raise BadSample(f"{path} line {n}: {len(parts)} values; expected 5 (class cx cy w h) or a polygon "
                            "(class x1 y1 x2 y2 x3 y3 ...)")
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise BadSample(f"{path} line {n}: non-numeric value in {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in values) or values[0] != int(values[0]):
            raise BadSample(f"{path} line {n}: the class id must be an integer and every value finite: {line.strip()!r}")
        coords = values[1:]
        bad = next((v for v in coords if not -TOLERANCE <= v <= 1 + TOLERANCE), None)
        if bad is not None:
            raise BadSample(f"{path} line {n}: value {bad:g} outside [0, 1]; YOLO coordinates are divided by the "
                            "image width/height (pixel coordinates?)")
        if len(coords) > 4:  # polygon -> its bounding box
            xs, ys = coords[0::2], coords[1::2]
            coords = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        out.append((int(values[0]), coords, n))
    return out


def _snap(v: float) -> float:
    """A corner past the border by no more than the writer's rounding is on the border (not a clamped box)."""
    return 0.0 if -TOLERANCE < v < 0 else 1.0 if 1 < v < 1 + TOLERANCE else v


def read_yolo(sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
    """Records of every image in the sources; an image without a label file is a background image (counted)."""
    n_names = len(policy.classes) - 1
    records: list[Record] = []
    for src in sources:
        images, labels_root = _list_images(src)
        used: set[Path] = set()
        for image, name in images:
            lbl = (src.annots / (name if labels_root else Path(name).name)).with_suffix(".txt") \
                if src.annots is not None else label_path(image)
            try:
                if not image.is_file():
                    raise BadSample(f"image {image} listed in {src.images} not found")
                size = policy.header_size(image)
                rows = []
                if lbl.is_file():
                    used.add(lbl.resolve())
                    rows = parse_yolo_labels(lbl)
                else:
                    policy.report.no_label_file += 1
                h, w = size
                boxes, labels = [], []
                for k, (cx, cy, bw, bh), n in rows:
                    if not 0 <= k < n_names:
                        policy.unknown(f"class id {k}", f"{lbl} line {n}: class id {k} is not in names (ids 0..{n_names - 1})")
                        continue
                    corners = [_snap(cx - bw / 2), _snap(cy - bh / 2), _snap(cx + bw / 2), _snap(cy + bh / 2)]
                    boxes.append([corners[0] * w, corners[1] * h, corners[2] * w, corners[3] * h])
                    labels.append(k + 1)
            except BadSample as exc:
                policy.bad(image, exc)
                continue
            policy.add(records, make_record(image, name, boxes, labels, [False] * len(labels), size,
                                            lbl if lbl.is_file() else None))
        if images and not used:
            example = (src.annots / Path(images[0][1]).name).with_suffix(".txt") if src.annots else label_path(images[0][0])
            raise UserError(f"{src.key}: none of the {len(images)} images in {src.images} has a label file (looked for "
                            f"e.g. {example}); YOLO labels go in a labels/ folder mirroring images/")
        if labels_root is not None and labels_root.is_dir():
            for txt in sorted(labels_root.rglob("*.txt")):
                if txt.name not in NOT_LABEL_FILES and txt.resolve() not in used:
                    policy.report.unmatched_annotations.append(f"label file {txt} has no image")
    return records


# ----------------------------------------------------------------------------------------------- writing
class YoloWriter(FormatWriter):
    """One text file per image, ``out_dir/<name>.txt`` (normalized floats, no difficult flag, no score), and
    ``classes_file`` (the class names one per line, as LabelImg writes them; None: none) at the end."""

    def add(self, image_path, name, hw, boxes, labels, scores, difficult, image_id):
        h, w = hw
        b = boxes
        path = self.out_dir / Path(name).with_suffix(".txt")
        self.lost_difficult += int(difficult.sum())
        cx, cy = (b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h
        bw, bh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
        f = f"{{:.{DECIMALS}f}}"
        lines = [f"{k - 1} " + " ".join(f.format(v) for v in row)
                 for k, row in zip(labels.tolist(), np.stack([cx, cy, bw, bh], 1).tolist())]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
        return path

    def close(self, written):
        if not self.classes_file:
            return []
        path = self.out_dir / self.classes_file
        if path in written:  # an image named like the class list: its labels win
            return []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(c + "\n" for c in self.classes[1:]), encoding="utf-8")
        return [path]


class YoloFormat(DataFormat):
    """``FORMAT: yolo`` (TRAIN_IMG / VALID_IMG, optional TRAIN_LABELS / VALID_LABELS, ``CLASSES``) or an Ultralytics
    ``data.yaml`` as it is; written in the Ultralytics layout with a ``data.yaml``."""

    name = "yolo"
    config_name = "data.yaml"
    toolkit_keys = False  # a plain Ultralytics data.yaml
    writer = YoloWriter

    @classmethod
    def sources(cls, cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str], None]:
        if is_ultralytics(raw):
            return (*sources_from_ultralytics(cfg_path, raw), None)
        classes = classes_key(cfg_path, raw)
        train, valid = sources_from_config(cfg_path, raw)
        return train, valid, classes, None

    @classmethod
    def classes(cls, cfg_path: Path, raw: dict) -> list[str]:
        return class_names(cfg_path, raw) if is_ultralytics(raw) else classes_key(cfg_path, raw)

    @classmethod
    def read(cls, sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
        return read_yolo(sources, policy)

    @classmethod
    def split_layout(cls, out: Path, split: str) -> tuple[Path, Path]:
        sub = "train" if split == "train" else "val"
        return out / "images" / sub, out / "labels" / sub

    @classmethod
    def dataset_config(cls, classes: Sequence[str]) -> dict[str, Any]:
        # an Ultralytics data.yaml without `path`: Ultralytics then resolves train/val against the file's folder
        names = list(classes[1:])
        return {"train": "images/train", "val": "images/val", "nc": len(names), "names": names}
