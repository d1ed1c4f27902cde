"""Label files for a stream of images, in any registered format (``formats.FORMATS``): boxes + class labels ->
Pascal VOC XML, COCO JSON or YOLO text.

Used by inference (pre-labelling), the synthetic generator and dataset conversion. Boxes are absolute
``xmin, ymin, xmax, ymax`` pixels of the original image; labels index ``classes`` (``classes[0]`` is
``__background__``). What each format can hold: VOC - integer pixels (as LabelImg/CVAT write them) and
``difficult``; COCO - float boxes, ``iscrowd`` for difficult, ``score`` when given; YOLO - normalized floats,
no difficult flag (such objects are written as ordinary ones and counted in ``lost_difficult``), no score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formats import FORMATS

LABEL_FORMATS = tuple(FORMATS)


def _as_array(x: Any, shape_tail: tuple[int, ...], dtype) -> np.ndarray:
    if x is None:
        return np.zeros((0,) + shape_tail, dtype)
    if hasattr(x, "detach"):  # a torch tensor (torch itself is not imported: convert's --help stays quick)
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
    to pixels) are not written and are counted in ``skipped_boxes``. The format's own part is its
    ``FormatWriter``.
    """

    def __init__(self, format: str, out_dir: str | Path, classes: Sequence[str],
                 category_ids: Sequence[int] | None = None, json_name: str = "annotations.json",
                 classes_file: str | None = "classes.txt") -> None:
        if format not in FORMATS:
            raise ValueError(f"label format {format!r}: use one of {', '.join(FORMATS)}")
        self.format, self.out_dir, self.classes = format, Path(out_dir), list(classes)
        self.category_ids = list(category_ids) if category_ids else list(range(len(self.classes)))
        self._writer = FORMATS[format].writer(self.out_dir, self.classes, self.category_ids, json_name, classes_file)
        self.json_path = self._writer.json_path
        self.classes_file = classes_file
        self.skipped_boxes = 0
        self.written: list[Path] = []
        self._closed = False

    @property
    def lost_difficult(self) -> int:
        """Difficult objects written as ordinary ones (the format has no such flag)."""
        return self._writer.lost_difficult

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
        if self._writer.whole_pixels:
            b = b.round()
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (lab > 0) & (lab < len(self.classes))
        self.skipped_boxes += int((~keep).sum())
        sc = sc[keep] if sc is not None else None
        path = self._writer.add(image_path, name, (h, w), b[keep], lab[keep], sc, diff[keep], image_id)
        if path is not None:
            self.written.append(path)
        return path

    def close(self) -> list[Path]:
        if self._closed:
            return self.written
        self._closed = True
        self.written.extend(self._writer.close(self.written))
        return self.written
