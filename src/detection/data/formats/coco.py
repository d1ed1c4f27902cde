"""COCO JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``categories``): config keys, reading and
writing (``CocoFormat``).

The reader is our own (``json`` + checks) rather than pycocotools' ``COCO()``: that one silently keeps the last
of duplicate image ids, raises a bare KeyError on an annotation without ``image_id``, does not check boxes and
prints to stdout. pycocotools stays the independent reference in the tests and for scoring.

Category ids may be any integers (COCO's own skip some); labels are contiguous (``classes[i]``, 1..K) and
``category_ids[i]`` maps label ``i`` back to the file's id. ``iscrowd=1`` objects are read as ``difficult``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from .common import (
    BadSample,
    DataFormat,
    FormatWriter,
    ReadPolicy,
    Record,
    SplitSource,
    check_classes,
    make_record,
    resolve_config_path,
)

KEYS = ("TRAIN_JSON", "TRAIN_IMG", "VALID_JSON", "VALID_IMG")


def load_json(path: Path, what: str = "COCO annotation file") -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); pass a COCO {what}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a COCO {what} (expected an object with an 'images' list)")
    if not isinstance(data.get("annotations", []), list):
        raise UserError(f"{path}: 'annotations' must be a list")
    return data


def categories(path: Path, data: dict[str, Any]) -> dict[int, str]:
    """{category id: name}, checked: integer ids and non-empty names, both unique."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{path}: no 'categories' list; a COCO file names its classes there")
    out: dict[int, str] = {}
    for k, c in enumerate(cats):
        cid, name = (c.get("id"), c.get("name")) if isinstance(c, dict) else (None, None)
        if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}: categories[{k}] needs an integer 'id' and a 'name', got {c!r}")
        if cid in out:
            raise UserError(f"{path}: category id {cid} is used twice ({out[cid]!r}, {name!r}); ids must be unique")
        if name in out.values():
            raise UserError(f"{path}: category name {name!r} is used twice; names must be unique")
        if name == "__background__":
            raise UserError(f"{path}: '__background__' is reserved; rename that category")
        out[cid] = name
    return out


def sources_from_config(cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str], list[int]]:
    """(train, valid, classes, category_ids) of a ``FORMAT: coco`` config (see :func:`class_mapping`)."""
    missing = [k for k in KEYS if raw.get(k) is None]
    if missing:
        raise UserError(f"{cfg_path}: missing key {', '.join(missing)} (FORMAT: coco needs TRAIN_JSON/VALID_JSON "
                        "annotation files and TRAIN_IMG/VALID_IMG image folders)")
    train = SplitSource("TRAIN_JSON", resolve_config_path(cfg_path, "TRAIN_IMG", raw["TRAIN_IMG"]),
                        json=resolve_config_path(cfg_path, "TRAIN_JSON", raw["TRAIN_JSON"], "file"))
    valid = SplitSource("VALID_JSON", resolve_config_path(cfg_path, "VALID_IMG", raw["VALID_IMG"]),
                        json=resolve_config_path(cfg_path, "VALID_JSON", raw["VALID_JSON"], "file"))
    classes, ids = class_mapping(cfg_path, raw, [train.json, valid.json])
    return [train], [valid], classes, ids


def classes_from_config(cfg_path: Path, raw: dict) -> list[str]:
    """The classes of a ``FORMAT: coco`` config without its image folders (inference): ``CLASSES`` when given,
    else the categories of the ``TRAIN_JSON`` file - the same list :func:`sources_from_config` gives."""
    if raw.get("CLASSES") is not None:
        return check_classes(str(cfg_path), raw["CLASSES"])
    fix = "or add CLASSES: [__background__, ...] to the config"
    if raw.get("TRAIN_JSON") is None:
        raise UserError(f"{cfg_path}: missing key TRAIN_JSON (FORMAT: coco takes its class names from that "
                        f"annotation file's categories); add it, {fix}")
    path = resolve_config_path(cfg_path, "TRAIN_JSON", raw["TRAIN_JSON"], "file",
                               fix=f"the class names come from its categories: fix the path, {fix}")
    return class_mapping(cfg_path, raw, [path])[0]


def class_mapping(cfg_path: Path, raw: dict, files: Sequence[Path]) -> tuple[list[str], list[int]]:
    """(classes, category_ids) of a ``FORMAT: coco`` config whose annotation ``files`` come train first.

    Classes come from the first file's categories (sorted by id) unless ``CLASSES`` is given; a name must have the
    same id in every file, so one mapping serves predictions on any split.
    """
    cats = {f: categories(f, load_json(f)) for f in files}
    if raw.get("CLASSES") is not None:
        classes = check_classes(str(cfg_path), raw["CLASSES"])
    else:
        first = cats[files[0]]
        classes = ["__background__"] + [first[c] for c in sorted(first)]
    names = [f.name for f in files]
    ids: list[int] = [0]
    for name in classes[1:]:
        found = {p: next((i for i, n in c.items() if n == name), None) for p, c in cats.items()}
        known = {i for i in found.values() if i is not None}
        if not known:
            which = f"neither {' nor '.join(names)} has" if len(names) > 1 else f"{names[0]} does not have"
            raise UserError(f"{cfg_path}: CLASSES lists {name!r}, which {which} in 'categories'; fix the name")
        if len(known) > 1:
            ids_in = " and ".join(f"{i} in {p}" for p, i in found.items() if i is not None)
            raise UserError(f"{cfg_path}: category {name!r} has id {ids_in}; use the same ids in every file")
        ids.append(known.pop())
    clash = sorted({i for i in ids[1:] if ids.count(i) > 1})
    if clash:
        raise UserError(f"{cfg_path}: category id {clash[0]} names different classes in {' and '.join(names)}; "
                        "use one id per class in every file")
    return classes, ids


# ----------------------------------------------------------------------------------------------- reading
def _box(path: Path, k: int, ann: dict) -> list[float]:
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise BadSample(f"{path}: annotations[{k}] (image_id {ann.get('image_id')!r}) has bbox {bbox!r}; "
                        "expected [x, y, width, height] numbers")
    x, y, w, h = (float(v) for v in bbox)
    # a negative width/height is not a reversed box in COCO: it is empty (dropped and counted)
    return [x, y, x + max(w, 0.0), y + max(h, 0.0)]


def _image_path(folder: Path, file_name: str) -> Path | None:
    for p in (folder / file_name, folder / Path(file_name).name):
        if p.is_file():
            return p
    return None


def read_coco(sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
    """Records of every image listed in the sources' JSON files (images without annotations are negatives).
    Labels follow category *names* (``policy.classes``), so each file may number its categories its own way."""
    records: list[Record] = []
    for src in sources:
        path = src.json
        d = load_json(path)
        names = categories(path, d)
        label_of = {cid: policy.index.get(name) for cid, name in names.items()}
        images: dict[Any, dict] = {}
        for k, im in enumerate(d["images"]):
            if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)) or not isinstance(im.get("file_name"), str):
                policy.bad(path, BadSample(f"{path}: images[{k}] lacks 'id' or 'file_name'"))
                continue
            if im["id"] in images:
                policy.bad(path, BadSample(f"{path}: image id {im['id']!r} is used twice ({images[im['id']]['file_name']}"
                                           f", {im['file_name']}); the later one was not read"))
                continue
            images[im["id"]] = im
        anns: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
        for k, ann in enumerate(d.get("annotations", [])):
            iid = ann.get("image_id") if isinstance(ann, dict) else None
            if not isinstance(iid, (int, str)) or iid not in images:
                policy.report.unmatched_annotations.append(f"{path}: annotations[{k}] (image_id {iid!r})")
                continue
            anns[iid].append((k, ann))
        for iid, im in images.items():
            try:
                image = _image_path(src.images, im["file_name"])
                if image is None:
                    raise BadSample(f"{path}: image {im['file_name']} (id {iid}) not found in {src.images}")
                size = policy.header_size(image)
                boxes, labels, difficult = [], [], []
                for k, ann in anns.get(iid, []):
                    box = _box(path, k, ann)
                    cid = ann.get("category_id")
                    label = label_of.get(cid) if isinstance(cid, int) else None
                    if label is None:
                        if isinstance(cid, int) and cid in names:
                            policy.unknown(names[cid], f"{path}: annotations[{k}] has category {names[cid]!r}, "
                                                       "which is not in CLASSES")
                        else:
                            policy.unknown(f"category_id {cid!r}", f"{path}: annotations[{k}] has category_id "
                                                                   f"{cid!r}, which 'categories' does not list")
                        continue
                    boxes.append(box)
                    labels.append(label)
                    difficult.append(bool(ann.get("iscrowd", 0)))
            except BadSample as exc:
                policy.bad(path, exc)
                continue
            hw = (im.get("height"), im.get("width"))
            annotated = hw if all(isinstance(v, int) for v in hw) else None
            policy.add(records, make_record(image, im["file_name"], boxes, labels, difficult, size, path,
                                            image_id=iid), annotated)
    return records


# ----------------------------------------------------------------------------------------------- writing
class CocoWriter(FormatWriter):
    """One JSON for the stream (``json_path``, written by ``close``): float boxes, ``iscrowd`` for difficult,
    ``score`` when given; ``file_name`` is the image's ``name``, ``category_id`` the label's ``category_ids`` entry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._images: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []

    def add(self, image_path, name, hw, boxes, labels, scores, difficult, image_id):
        h, w = hw
        iid = int(image_id) if image_id is not None else len(self._images) + 1
        self._images.append({"id": iid, "file_name": Path(name).as_posix(), "width": w, "height": h})
        for k, (box, label, d) in enumerate(zip(boxes.tolist(), labels.tolist(), difficult.tolist())):
            x1, y1, x2, y2 = box
            ann = {"id": len(self._annotations) + 1, "image_id": iid, "category_id": self.category_ids[label],
                   "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                   "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": int(d)}
            if scores is not None:
                ann["score"] = round(float(scores[k]), 5)
            self._annotations.append(ann)
        return None

    def close(self, written):
        data = {"images": self._images, "annotations": self._annotations,
                "categories": [{"id": self.category_ids[i], "name": c, "supercategory": ""}
                               for i, c in enumerate(self.classes) if i > 0]}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(data), encoding="utf-8")
        return [self.json_path]


class CocoFormat(DataFormat):
    """``FORMAT: coco``: TRAIN_JSON / TRAIN_IMG / VALID_JSON / VALID_IMG; the classes come from the categories."""

    name = "coco"
    has_image_ids = True
    writer = CocoWriter

    @classmethod
    def sources(cls, cfg_path: Path, raw: dict) -> tuple[list[SplitSource], list[SplitSource], list[str], list[int]]:
        return sources_from_config(cfg_path, raw)

    @classmethod
    def classes(cls, cfg_path: Path, raw: dict) -> list[str]:
        return classes_from_config(cfg_path, raw)

    @classmethod
    def read(cls, sources: Sequence[SplitSource], policy: ReadPolicy) -> list[Record]:
        return read_coco(sources, policy)

    @classmethod
    def split_layout(cls, out: Path, split: str) -> tuple[Path, Path]:
        return out / split / "images", out / "annotations"

    @classmethod
    def dataset_config(cls, classes: Sequence[str]) -> dict[str, Any]:
        # the classes come from the JSON categories
        return {"FORMAT": "coco", "TRAIN_JSON": "annotations/train.json", "TRAIN_IMG": "train/images",
                "VALID_JSON": "annotations/valid.json", "VALID_IMG": "valid/images"}
