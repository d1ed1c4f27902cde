"""Label writers and dataset conversion: VOC -> COCO -> YOLO -> VOC keeps every box (within 1 px) and class name;
COCO ids survive; the written COCO JSON is what pycocotools reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.detection.commands.convert import ConvertOptions, convert_dataset, main
from src.detection.core.errors import UserError
from src.detection.data.annotations import LabelWriter
from src.detection.data.datasets import load_data_config, load_ground_truth, parse_voc_xml

CLASSES = ["__background__", "cat", "dog"]


def write_image(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def voc_dataset(root: Path) -> Path:
    """Float and border-touching boxes, a difficult object, an image without objects, jpg and png."""
    objects = {
        "train/a.jpg": [("cat", (1, 2, 30, 40), 0), ("dog", (10.5, 4.25, 64, 48), 0)],
        "train/b.png": [("dog", (0, 0, 5, 7), 1)],
        "valid/c.jpg": [("cat", (20, 10, 33.75, 47), 0), ("cat", (40, 1, 63, 20), 1), ("dog", (3, 3, 9, 9), 0)],
        "valid/d.jpg": [],
    }
    for k, (rel, objs) in enumerate(objects.items()):
        split, name = rel.split("/")
        write_image(root / split / "images" / name, seed=k)
        xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                      f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objs)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        (root / split / "labels" / (Path(name).stem + ".xml")).write_text(f"<annotation>{xml}</annotation>")
    cfg = root / "voc.yaml"
    cfg.write_text("TRAIN_IMG: train/images\nTRAIN_ANNOT: train/labels\nVALID_IMG: valid/images\n"
                   "VALID_ANNOT: valid/labels\nCLASSES: [__background__, cat, dog]\n")
    return cfg


def named_gt(cfg_path: Path) -> dict[str, dict[str, list]]:
    """{split/file: {"boxes", "classes", "difficult"}} with class names, for comparing across formats."""
    cfg = load_data_config(cfg_path)
    out = {}
    for split in ("train", "valid"):
        for name, gt in load_ground_truth(cfg, split).items():
            out[f"{split}/{name}"] = {"boxes": gt["boxes"], "classes": [cfg.classes[k] for k in gt["labels"].tolist()],
                                      "difficult": gt["difficult"].tolist()}
    return out


def test_round_trip_voc_coco_yolo_voc_keeps_boxes_and_class_names(tmp_path):
    from pycocotools.coco import COCO

    src = voc_dataset(tmp_path / "src")
    coco_cfg = convert_dataset(ConvertOptions(str(src), "coco", str(tmp_path / "c"))).config
    res = convert_dataset(ConvertOptions(str(coco_cfg), "yolo", str(tmp_path / "y")))
    assert res.lost_difficult == 2 and res.config.name == "data.yaml"
    voc_cfg = convert_dataset(ConvertOptions(str(res.config), "voc", str(tmp_path / "v"))).config

    original = named_gt(src)
    assert sum(len(g["classes"]) for g in original.values()) == 6
    for cfg_path, tol in ((coco_cfg, 1e-3), (res.config, 1e-3), (voc_cfg, 1.0)):
        got = named_gt(cfg_path)
        assert got.keys() == original.keys()
        for name, want in original.items():
            assert got[name]["classes"] == want["classes"], (cfg_path, name)
            torch.testing.assert_close(got[name]["boxes"], want["boxes"], atol=tol, rtol=0)
    assert named_gt(coco_cfg)["valid/c.jpg"]["difficult"] == [False, True, False]  # iscrowd keeps the flag
    assert named_gt(voc_cfg)["valid/c.jpg"]["difficult"] == [False, False, False]  # YOLO cannot hold it

    # the COCO files are what pycocotools reads; the data.yaml is Ultralytics' layout
    ref = COCO(str(tmp_path / "c/annotations/valid.json"))
    assert [c["name"] for c in ref.loadCats(ref.getCatIds())] == ["cat", "dog"]
    c_id = next(i for i, im in ref.imgs.items() if im["file_name"] == "c.jpg")
    assert [a["bbox"] for a in ref.loadAnns(ref.getAnnIds(imgIds=[c_id]))] == [[20, 10, 13.75, 37], [40, 1, 23, 19], [3, 3, 6, 6]]
    assert [a["iscrowd"] for a in ref.loadAnns(ref.getAnnIds(imgIds=[c_id]))] == [0, 1, 0]
    assert sorted(p.relative_to(tmp_path / "y").as_posix() for p in (tmp_path / "y").rglob("*") if p.is_file()) == [
        "data.yaml", "images/train/a.jpg", "images/train/b.png", "images/val/c.jpg", "images/val/d.jpg",
        "labels/train/a.txt", "labels/train/b.txt", "labels/val/c.txt", "labels/val/d.txt"]
    assert (tmp_path / "y/labels/train/a.txt").read_text().splitlines()[1] == "1 0.582031 0.544271 0.835938 0.911458"


def test_coco_source_keeps_ids_and_nested_names_flatten_for_voc(tmp_path):
    root = tmp_path / "src"
    write_image(root / "img/x/a.jpg")
    write_image(root / "img/y/a.jpg", seed=1)
    cats = [{"id": 40, "name": "dog"}, {"id": 17, "name": "cat"}]
    ann = {"images": [{"id": 501, "file_name": "x/a.jpg", "width": 64, "height": 48},
                      {"id": 502, "file_name": "y/a.jpg", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 501, "category_id": 40, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
                           {"id": 2, "image_id": 502, "category_id": 17, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0}],
           "categories": cats}
    (root / "a.json").write_text(json.dumps(ann))
    (root / "c.yaml").write_text("FORMAT: coco\nTRAIN_JSON: a.json\nTRAIN_IMG: img\nVALID_JSON: a.json\nVALID_IMG: img\n")
    out = convert_dataset(ConvertOptions(str(root / "c.yaml"), "coco", str(tmp_path / "c")))
    written = json.loads((tmp_path / "c/annotations/valid.json").read_text())
    assert sorted((c["id"], c["name"]) for c in written["categories"]) == [(17, "cat"), (40, "dog")]
    assert [im["id"] for im in written["images"]] == [501, 502]
    assert [a["category_id"] for a in written["annotations"]] == [40, 17]
    assert load_data_config(out.config).category_ids == [0, 17, 40]

    convert_dataset(ConvertOptions(str(root / "c.yaml"), "voc", str(tmp_path / "v")))
    assert sorted(p.name for p in (tmp_path / "v/valid/images").iterdir()) == ["x_a.jpg", "y_a.jpg"]
    gt = named_gt(tmp_path / "v/dataset.yaml")
    assert gt["valid/y_a.jpg"]["classes"] == ["cat"] and gt["valid/x_a.jpg"]["classes"] == ["dog"]


def test_images_are_hard_linked_or_copied_and_nothing_is_overwritten(tmp_path, capsys):
    src = voc_dataset(tmp_path / "src")
    assert main(["--config", str(src), "--to", "yolo", "--out-dir", str(tmp_path / "linked")]) == 0
    assert "4 hard-linked" in capsys.readouterr().out
    assert (tmp_path / "linked/images/train/a.jpg").stat().st_nlink == 2
    assert main(["--config", str(src), "--to", "coco", "--out-dir", str(tmp_path / "copied"), "--copy"]) == 0
    assert (tmp_path / "copied/train/images/a.jpg").stat().st_nlink == 1
    with pytest.raises(UserError, match=r"--out-dir .*copied exists and is not an empty folder"):
        main(["--config", str(src), "--to", "voc", "--out-dir", str(tmp_path / "copied")])
    (tmp_path / "src/valid/labels/c.xml").write_text("<annotation><object><name>zebra</name><bndbox><xmin>1</xmin>"
                                                     "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    with pytest.raises(UserError, match=r"c\.xml: class 'zebra' is not in CLASSES"):
        main(["--config", str(src), "--to", "voc", "--out-dir", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()  # read everything first: a problem leaves nothing behind
    assert main(["--config", str(src), "--to", "voc", "--out-dir", str(tmp_path / "v"), "--ignore-unknown-classes"]) == 0
    assert "1 object(s) of unknown classes skipped (zebra x1)" in capsys.readouterr().out


def test_label_writer_formats(tmp_path):
    from pycocotools.coco import COCO

    boxes = torch.tensor([[10.4, 5.0, 30.6, 20.0], [-3.0, 2.0, 8.0, 60.0], [5.2, 5.0, 5.4, 9.0]])
    labels, scores = torch.tensor([1, 2, 1]), torch.tensor([0.9, 0.5, 0.2])
    files = {}
    for fmt in ("voc", "coco", "yolo"):
        with LabelWriter(fmt, tmp_path / fmt, CLASSES) as w:
            w.add(tmp_path / "img/a.jpg", (48, 64), boxes, labels, scores, name="sub/a.jpg")
            w.add(tmp_path / "img/b.jpg", (48, 64), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
        files[fmt] = w.written
        assert w.skipped_boxes == (1 if fmt == "voc" else 0)  # 0.2 px wide: nothing left after rounding
    assert files["voc"] == [tmp_path / "voc/sub/a.xml", tmp_path / "voc/b.xml"]
    objects, size = parse_voc_xml(tmp_path / "voc/sub/a.xml")
    assert size == (48, 64) and objects == [("cat", [10, 5, 31, 20], False), ("dog", [0, 2, 8, 48], False)]
    assert parse_voc_xml(tmp_path / "voc/b.xml")[0] == []
    assert (tmp_path / "yolo/sub/a.txt").read_text().splitlines()[:2] == [
        "0 0.320312 0.260417 0.315625 0.312500", "1 0.062500 0.520833 0.125000 0.958333"]
    assert (tmp_path / "yolo/classes.txt").read_text() == "cat\ndog\n" and (tmp_path / "yolo/b.txt").read_text() == ""
    ref = COCO(str(tmp_path / "coco/annotations.json"))
    assert [im["file_name"] for im in ref.dataset["images"]] == ["sub/a.jpg", "b.jpg"]
    anns = ref.loadAnns(ref.getAnnIds(imgIds=[1]))
    assert [a["score"] for a in anns] == [0.9, 0.5, 0.2] and anns[1]["bbox"] == [0, 2, 8, 46]
    results = ref.loadRes(anns)  # also valid as a COCO results list
    assert len(results.getAnnIds()) == 3
