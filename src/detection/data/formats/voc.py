"""Pascal VOC XML: config keys (folder pairs or VOCdevkit), listing, parsing, writing (``VocFormat``).

Box convention: XML coordinates are taken as absolute pixel coordinates ``xmin, ymin, xmax, ymax`` (as the
reference did - no VOC "-1" shift), reordered if reversed and clamped to the *decoded* image size.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from ..image_io import IMAGE_EXTS
from .common import (
    BadSample,
    DataFormat,
    FormatWriter,
    ReadPolicy,
    Record,
    SplitSource,
    classes_key,
    make_record,
    resolve_config_path,
)

FOLDER_KEYS = ("TRAIN_IMG", "TRAIN_ANNOT", "VALID_IMG", "VALID_ANNOT")


# ------------------------------------------------------------------------------------------------ config
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


def sources_from_config(cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource]]:
    """(train, valid) sources of a VOC config: the folder keys or VOC_ROOT + TRAIN_SETS/VALID_SETS."""
    if "VOC_ROOT" in raw:
        both = [k for k in FOLDER_KEYS if k in raw]
        if both:
            raise UserError(f"{cfg_path}: VOC_ROOT and {', '.join(both)} are both set; use one form, not both")
        root = resolve_config_path(cfg_path, "VOC_ROOT", raw["VOC_ROOT"])
        return _devkit_sources(cfg_path, raw, "TRAIN_SETS", root), _devkit_sources(cfg_path, raw, "VALID_SETS", root)
    missing = [k for k in FOLDER_KEYS if raw.get(k) is None]
    if missing:
        raise UserError(
            f"{cfg_path}: missing key {', '.join(missing)} (give TRAIN_IMG/TRAIN_ANNOT/VALID_IMG/VALID_ANNOT "
            "folders, or VOC_ROOT with TRAIN_SETS/VALID_SETS)"
        )
    train = [SplitSource("TRAIN_IMG", resolve_config_path(cfg_path, "TRAIN_IMG", raw["TRAIN_IMG"]),
                         resolve_config_path(cfg_path, "TRAIN_ANNOT", raw["TRAIN_ANNOT"]))]
    valid = [SplitSource("VALID_IMG", resolve_config_path(cfg_path, "VALID_IMG", raw["VALID_IMG"]),
                         resolve_config_path(cfg_path, "VALID_ANNOT", raw["VALID_ANNOT"]))]
    return train, valid


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
    """(image, xml) pairs matched by file stem; a missing side is None (the reader applies the policy)."""
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
def parse_voc_xml(path: Path) -> tuple[list[tuple[str, list[float], bool]], tuple[int, int] | None]:
    """-> ([(class name, [xmin, ymin, xmax, ymax] raw floats, difficult)], (H, W) from <size> or None)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BadSample(f"malformed XML {path} ({exc})") from None
    except OSError as exc:
        raise BadSample(f"cannot read XML {path} ({exc.strerror or exc})") from None
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise BadSample(f"malformed XML {path}: object #{k + 1} lacks <name> or <bndbox>")
        try:
            box = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise BadSample(f"malformed XML {path}: object #{k + 1} ({name}) has a missing or non-numeric coordinate") from None
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


def _read_one(spec: SampleSpec, policy: ReadPolicy) -> tuple[Record, tuple[int, int] | None]:
    img, xml = spec[0], spec[1]
    if len(spec) > 2 and spec[2]:
        raise BadSample(spec[2])
    if img is None:
        raise BadSample(f"annotation {xml} has no matching image (expected {Path(xml).stem}.jpg/.png/... beside the images)")
    if xml is None:  # a background image, as in every format (counted in the report)
        size = policy.header_size(Path(img))
        policy.report.no_label_file += 1
        return make_record(Path(img), Path(img).name, [], [], [], size), None
    objects, xml_size = parse_voc_xml(Path(xml))
    size = policy.header_size(Path(img))
    boxes, labels, difficult = [], [], []
    for name, box, diff in objects:
        if name not in policy.index:
            policy.unknown(name, f"{xml}: class {name!r} is not in CLASSES")
            continue
        boxes.append(box)
        labels.append(policy.index[name])
        difficult.append(diff)
    return make_record(Path(img), Path(img).name, boxes, labels, difficult, size, Path(xml)), xml_size


def read_voc(samples: Sequence[SampleSpec], policy: ReadPolicy) -> list[Record]:
    """Records of ``list_samples`` pairs; problems follow ``policy``."""
    records: list[Record] = []
    for spec in samples:
        try:
            rec, xml_size = _read_one(spec, policy)
        except BadSample as exc:
            policy.bad(spec[0] or spec[1], exc)
            continue
        policy.add(records, rec, xml_size)
    return records


# ----------------------------------------------------------------------------------------------- writing
def voc_tree(image_name: str, folder: str, hw: Sequence[int], objects: Sequence[tuple[str, Sequence[int], bool]]
             ) -> ET.Element:
    """The annotation of one image: ``objects`` as (class name, integer xyxy box, difficult)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = image_name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(hw[1]))
    ET.SubElement(size, "height").text = str(int(hw[0]))
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, k).text = str(int(v))
    ET.indent(root)
    return root


class VocWriter(FormatWriter):
    """One XML per image, ``out_dir/<name>.xml``; integer pixel boxes, as LabelImg/CVAT write them."""

    whole_pixels = True

    def add(self, image_path, name, hw, boxes, labels, scores, difficult, image_id):
        path = self.out_dir / Path(name).with_suffix(".xml")
        objects = [(self.classes[k], box, bool(d))
                   for box, k, d in zip(boxes.tolist(), labels.tolist(), difficult.tolist())]
        path.parent.mkdir(parents=True, exist_ok=True)
        tree = voc_tree(image_path.name, image_path.parent.name, hw, objects)
        ET.ElementTree(tree).write(path, encoding="utf-8", xml_declaration=False)
        return path


class VocFormat(DataFormat):
    """Pascal VOC: folder pairs (``TRAIN_IMG``/``TRAIN_ANNOT``/...) or a VOCdevkit, ``CLASSES`` in the config."""

    name = "voc"
    nested_names = False  # images and XML are matched by stem within one folder
    writer = VocWriter

    @classmethod
    def sources(cls, cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str], None]:
        classes = classes_key(cfg_path, raw)
        train, valid = sources_from_config(cfg_path, raw)
        return train, valid, classes, None

    @classmethod
    def read(cls, sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
        return read_voc(list_samples(sources), policy)

    @classmethod
    def dataset_config(cls, classes: Sequence[str]) -> dict[str, Any]:
        return {"TRAIN_IMG": "train/images", "TRAIN_ANNOT": "train/labels", "VALID_IMG": "valid/images",
                "VALID_ANNOT": "valid/labels", "CLASSES": list(classes)}
