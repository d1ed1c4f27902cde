"""Annotation writers: one place that turns boxes + class names into label files (Pascal VOC XML)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree as ET

import torch


def write_voc_xml(path: Path, image_path: Path, hw: Sequence[int], pred: dict[str, torch.Tensor],
                  classes: Sequence[str]) -> None:
    """Pascal VOC annotation for one image (pre-labelling): integer pixel boxes, as LabelImg/CVAT write them."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = image_path.parent.name
    ET.SubElement(root, "filename").text = image_path.name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(hw[1]))
    ET.SubElement(size, "height").text = str(int(hw[0]))
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for box, label in zip(pred["boxes"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        if x2 <= x1 or y2 <= y1:
            continue
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(bb, k).text = str(v)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)
