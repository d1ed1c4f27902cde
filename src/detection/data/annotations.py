"""Label-file writers: boxes + class labels -> Pascal VOC XML, COCO JSON or YOLO text, for one stream of images.

Used by inference (pre-labelling), the synthetic generator and dataset conversion. Boxes are absolute
``xmin, ymin, xmax, ymax`` pixels of the original image; labels index ``classes`` (``classes[0]`` is
``__background__``). What each format can hold: VOC - integer pixels (as LabelImg/CVAT write them) and
``difficult``; COCO - float boxes, ``iscrowd`` for difficult, ``score`` when given; YOLO - normalized floats,
no difficult flag (such objects are written as ordinary ones and counted in ``lost_difficult``), no score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np
import torch

LABEL_FORMATS = ("voc", "coco", "yolo")
YOLO_DECIMALS = 6  # Ultralytics writes 6 significant digits; 6 decimals keep boxes within 0.001 px at 1000 px


def _voc_tree(image_name: str, folder: str, hw: Sequence[int], objects: Sequence[tuple[str, Sequence[int], bool]]
              ) -> ET.Element:
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


def _write_xml(path: Path, root: ET.Element) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def write_voc_xml(path: Path, image_path: Path, hw: Sequence[int], pred: dict[str, torch.Tensor],
                  classes: Sequence[str]) -> None:
    """Pascal VOC annotation for one image (pre-labelling): integer pixel boxes, as LabelImg/CVAT write them."""
    objects = []
    for box, label in zip(pred["boxes"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        if x2 > x1 and y2 > y1:
            objects.append((classes[label], (x1, y1, x2, y2), False))
    _write_xml(path, _voc_tree(image_path.name, image_path.parent.name, hw, objects))


def _as_array(x: Any, shape_tail: tuple[int, ...], dtype) -> np.ndarray:
    if x is None:
        return np.zeros((0,) + shape_tail, dtype)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype).reshape((-1,) + shape_tail)


class LabelWriter:
    """Label files of one format for a stream of images.

    ``LabelWriter(format, out_dir, classes, category_ids=None)``; ``add(image_path, (h, w), boxes, labels,
    scores=None, difficult=None, name=None, image_id=None)`` per image; ``close()`` (or a ``with`` block) writes
    what is written at the end (COCO's single JSON ``json_name``; YOLO's ``classes_file``, the class names one per
    line as LabelImg writes them, None: none) and returns every file written.

    ``name``: the image's path relative to its folder (default: the file name); VOC/YOLO write
    ``out_dir/<name>.xml|.txt`` and COCO records it as ``file_name``. ``category_ids[label]``: COCO category id of
    each label (default: the label). Boxes are clamped to the image; boxes with no area left (VOC: after rounding
    to pixels) are not written and are counted in ``skipped_boxes``.
    """

    def __init__(self, format: str, out_dir: str | Path, classes: Sequence[str],
                 category_ids: Sequence[int] | None = None, json_name: str = "annotations.json",
                 classes_file: str | None = "classes.txt") -> None:
        if format not in LABEL_FORMATS:
            raise ValueError(f"label format {format!r}: use one of {', '.join(LABEL_FORMATS)}")
        self.format, self.out_dir, self.classes = format, Path(out_dir), list(classes)
        self.category_ids = list(category_ids) if category_ids else list(range(len(self.classes)))
        self.json_path = self.out_dir / json_name
        self.classes_file = classes_file
        self.skipped_boxes = 0
        self.lost_difficult = 0
        self.written: list[Path] = []
        self._images: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []
        self._closed = False

    def __enter__(self) -> LabelWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def add(self, image_path: str | Path, hw: Sequence[int], boxes: Any, labels: Any, scores: Any = None,
            difficult: Any = None, name: str | None = None, image_id: int | None = None) -> Path | None:
        """Write (VOC/YOLO) or collect (COCO) one image's labels; returns the file written, if any."""
        image_path = Path(image_path)
        name = name or image_path.name
        h, w = int(hw[0]), int(hw[1])
        b = _as_array(boxes, (4,), np.float64)
        lab = _as_array(labels, (), np.int64)
        sc = _as_array(scores, (), np.float64) if scores is not None else None
        diff = _as_array(difficult, (), bool) if difficult is not None else np.zeros(len(lab), bool)
        b = np.stack([b[:, 0].clip(0, w), b[:, 1].clip(0, h), b[:, 2].clip(0, w), b[:, 3].clip(0, h)], 1)
        if self.format == "voc":
            b = b.round()
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (lab > 0) & (lab < len(self.classes))
        self.skipped_boxes += int((~keep).sum())
        b, lab, diff = b[keep], lab[keep], diff[keep]
        sc = sc[keep] if sc is not None else None
        if self.format == "voc":
            path = self.out_dir / Path(name).with_suffix(".xml")
            objects = [(self.classes[k], box, bool(d)) for box, k, d in zip(b.tolist(), lab.tolist(), diff.tolist())]
            _write_xml(path, _voc_tree(image_path.name, image_path.parent.name, (h, w), objects))
        elif self.format == "yolo":
            path = self.out_dir / Path(name).with_suffix(".txt")
            self.lost_difficult += int(diff.sum())
            cx, cy = (b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h
            bw, bh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
            f = f"{{:.{YOLO_DECIMALS}f}}"
            lines = [f"{k - 1} " + " ".join(f.format(v) for v in row)
                     for k, row in zip(lab.tolist(), np.stack([cx, cy, bw, bh], 1).tolist())]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
        else:
            iid = int(image_id) if image_id is not None else len(self._images) + 1
            self._images.append({"id": iid, "file_name": Path(name).as_posix(), "width": w, "height": h})
            for k, (box, label, d) in enumerate(zip(b.tolist(), lab.tolist(), diff.tolist())):
                x1, y1, x2, y2 = box
                ann = {"id": len(self._annotations) + 1, "image_id": iid, "category_id": self.category_ids[label],
                       "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                       "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": int(d)}
                if sc is not None:
                    ann["score"] = round(float(sc[k]), 5)
                self._annotations.append(ann)
            return None
        self.written.append(path)
        return path

    def close(self) -> list[Path]:
        if self._closed:
            return self.written
        self._closed = True
        if self.format == "coco":
            data = {"images": self._images, "annotations": self._annotations,
                    "categories": [{"id": self.category_ids[i], "name": c, "supercategory": ""}
                                   for i, c in enumerate(self.classes) if i > 0]}
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(data), encoding="utf-8")
            self.written.append(self.json_path)
        elif self.format == "yolo" and self.classes_file:
            path = self.out_dir / self.classes_file
            if path in self.written:  # an image named like the class list: its labels win
                return self.written
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(c + "\n" for c in self.classes[1:]), encoding="utf-8")
            self.written.append(path)
        return self.written


# ----------------------------------------------------------------------------------------- dataset layout
def split_layout(format: str, out: Path, split: str) -> tuple[Path, Path]:
    """Where a written dataset keeps a split ("train"/"valid"): (images folder, labels folder or COCO JSON folder).

    voc: ``out/<split>/{images,labels}``; coco: ``out/<split>/images`` + ``out/annotations/<split>.json``;
    yolo: the Ultralytics layout ``out/images/{train,val}`` + ``out/labels/{train,val}``.
    """
    if format == "yolo":
        sub = "train" if split == "train" else "val"
        return out / "images" / sub, out / "labels" / sub
    if format == "coco":
        return out / split / "images", out / "annotations"
    return out / split / "images", out / split / "labels"


def dataset_config(format: str, classes: Sequence[str]) -> dict[str, Any]:
    """The dataset YAML (paths relative to the YAML in ``split_layout``'s folder) that ``--config`` accepts."""
    if format == "yolo":
        # an Ultralytics data.yaml without `path`: Ultralytics then resolves train/val against the file's folder
        names = list(classes[1:])
        return {"train": "images/train", "val": "images/val", "nc": len(names), "names": names}
    if format == "coco":  # classes come from the JSON categories
        return {"FORMAT": "coco", "TRAIN_JSON": "annotations/train.json", "TRAIN_IMG": "train/images",
                "VALID_JSON": "annotations/valid.json", "VALID_IMG": "valid/images"}
    return {"TRAIN_IMG": "train/images", "TRAIN_ANNOT": "train/labels", "VALID_IMG": "valid/images",
            "VALID_ANNOT": "valid/labels", "CLASSES": list(classes)}

