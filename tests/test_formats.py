"""COCO JSON and YOLO readers (against pycocotools where it applies), Ultralytics data.yaml, category-id mapping,
ground truth for every format, and evaluation skipping an undecodable image instead of scoring a substitute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.detection.core.errors import UserError
from src.detection.data.datasets import (
    build_dataloader,
    build_datasets,
    load_config_classes,
    load_data_config,
    load_ground_truth,
)


def write_image(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ COCO
CATS = [{"id": 12, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "bird"}]  # ids not contiguous


def coco_file(path: Path, images: list[dict], anns: list[dict], cats=CATS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(anns):
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
        if isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4 and all(isinstance(v, (int, float)) for v in a["bbox"]):
            a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def coco_dataset(root: Path, valid_anns: list[dict] | None = None, valid_images: list[dict] | None = None,
                 extra: str = "") -> Path:
    """train: 2 images; valid: 3 images (one without objects) unless overridden."""
    for name in ("t1.jpg", "t2.jpg"):
        write_image(root / "train" / name)
    coco_file(root / "ann/train.json",
              [{"id": 1, "file_name": "t1.jpg", "width": 64, "height": 48},
               {"id": 2, "file_name": "t2.jpg", "width": 64, "height": 48}],
              [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 10]},
               {"image_id": 2, "category_id": 7, "bbox": [5, 5, 20, 20]}])
    if valid_images is None:
        valid_images = [{"id": 10, "file_name": "sub/v1.jpg", "width": 64, "height": 48},
                        {"id": 20, "file_name": "v2.jpg", "width": 64, "height": 48},
                        {"id": 30, "file_name": "v3.jpg", "width": 64, "height": 48}]
    for k, im in enumerate(valid_images):
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and not im.get("missing"):
            write_image(root / "valid" / im["file_name"], seed=k)
    if valid_anns is None:
        valid_anns = [{"image_id": 10, "category_id": 12, "bbox": [10.5, 4.25, 20, 30]},
                      {"image_id": 10, "category_id": 3, "bbox": [30, 20, 10, 8], "iscrowd": 1},
                      {"image_id": 20, "category_id": 7, "bbox": [0, 0, 64, 48]},
                      {"image_id": 20, "category_id": 12, "bbox": [40, 30, 12.5, 9]}]
    coco_file(root / "ann/valid.json", [{k: v for k, v in im.items() if k != "missing"} for im in valid_images],
              valid_anns)
    return write_yaml(root / "coco.yaml", "FORMAT: coco\nTRAIN_JSON: ann/train.json\nTRAIN_IMG: train\n"
                                          "VALID_JSON: ann/valid.json\nVALID_IMG: valid\n" + extra)


def test_coco_reader_matches_pycocotools_and_maps_category_ids(tmp_path):
    from pycocotools.coco import COCO

    cfg = load_data_config(coco_dataset(tmp_path))
    assert cfg.format == "coco"
    assert cfg.classes == ["__background__", "cat", "bird", "dog"]  # sorted by category id
    assert cfg.category_ids == [0, 3, 7, 12]
    assert [cfg.category_id(k) for k in (1, 2, 3)] == [3, 7, 12]
    assert [cfg.label_of(i) for i in (3, 7, 12)] == [1, 2, 3]
    with pytest.raises(UserError, match="category id 5 is not one of this dataset's ids"):
        cfg.label_of(5)
    _, valid = build_datasets(cfg, (32, 32), augment="none", splits=("valid",))
    assert len(valid) == 3 and valid.report.n_negatives == 1 and valid.report.n_difficult == 1

    ref = COCO(str(tmp_path / "ann/valid.json"))
    for i, rec in enumerate(valid.records):
        anns = ref.loadAnns(ref.getAnnIds(imgIds=[rec.image_id]))
        assert ref.imgs[rec.image_id]["file_name"] == rec.name
        got = valid.annotations(i)
        want = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(got["boxes"], want)
        assert [cfg.category_id(k) for k in got["labels"].tolist()] == [a["category_id"] for a in anns]
        assert got["difficult"].tolist() == [bool(a["iscrowd"]) for a in anns]
    # the training split leaves the crowd object out of the targets, evaluation keeps it flagged
    _, t = valid[0]
    assert t["labels"].tolist() == [3] and t["orig_labels"].tolist() == [3, 1] and t["orig_difficult"].tolist() == [False, True]


def test_coco_predictions_with_original_ids_score_like_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from src.detection.evaluation.metrics import score_predictions_json

    cfg = load_data_config(coco_dataset(tmp_path))
    gts = load_ground_truth(cfg, "valid")
    assert sorted(gts) == ["sub/v1.jpg", "v2.jpg", "v3.jpg"]
    by_id = load_ground_truth(cfg, "valid", key="image_id")
    assert sorted(by_id) == [10, 20, 30]
    assert sorted(load_ground_truth(cfg, "valid", exclude=["v2.jpg"])) == ["sub/v1.jpg", "v3.jpg"]
    with pytest.raises(UserError, match="only COCO datasets have image ids"):
        load_ground_truth(load_data_config(yolo_dataset(tmp_path / "y")), key="image_id")
    rng = np.random.default_rng(0)
    ours, theirs = [], []  # label-space rows for our scorer, original-id rows for pycocotools
    for (name, gt), image_id in zip(sorted(gts.items()), (10, 20, 30)):
        for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            for k in range(2):  # a near hit and a worse one, plus a false positive of another class
                x1, y1, x2, y2 = (v + float(rng.normal(0, 1 + 3 * k)) for v in box)
                bbox = [x1, y1, x2 - x1, y2 - y1]
                score = float(rng.uniform(0.2, 1))
                ours.append({"file_name": name, "category_id": label, "bbox": bbox, "score": score})
                theirs.append({"image_id": image_id, "category_id": cfg.category_id(label), "bbox": bbox, "score": score})
        bbox, score, label = [5.0, 5.0, 12.0, 9.0], 0.5, 2
        ours.append({"file_name": name, "category_id": label, "bbox": bbox, "score": score})
        theirs.append({"image_id": image_id, "category_id": cfg.category_id(label), "bbox": bbox, "score": score})
    result = score_predictions_json(ours, gts, cfg.classes, metric="coco")
    gt = COCO(str(tmp_path / "ann/valid.json"))
    ev = COCOeval(gt, gt.loadRes(theirs), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert result.map == pytest.approx(ev.stats[0], abs=1e-6)
    assert result.map50 == pytest.approx(ev.stats[1], abs=1e-6)


def test_coco_problems_are_clamped_dropped_or_counted(tmp_path):
    anns = [{"image_id": 10, "category_id": 12, "bbox": [-5, -5, 20, 20]},  # clamped
            {"image_id": 10, "category_id": 12, "bbox": [50, 40, 30, 30]},  # clamped
            {"image_id": 10, "category_id": 3, "bbox": [10, 10, 0, 5]},  # zero width -> dropped
            {"image_id": 10, "category_id": 3, "bbox": [10, 10, -4, 5]},  # negative width -> dropped
            {"image_id": 20, "category_id": 3, "bbox": [80, 10, 5, 5]},  # outside -> dropped
            {"image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no such image -> counted
            {"image_id": 20, "category_id": 7, "bbox": [1, 1, 5, 5]}]
    cfg = load_data_config(coco_dataset(tmp_path, anns))
    with pytest.warns(UserWarning, match=r"2 box\(es\) clamped.*3 box\(es\) dropped.*1 annotation\(s\) without an image"):
        _, valid = build_datasets(cfg, (32, 32), augment="none", splits=("valid",))
    torch.testing.assert_close(valid.annotations(0)["boxes"], torch.tensor([[0.0, 0, 15, 15], [50, 40, 64, 48]]))
    assert valid.report.unmatched_annotations[0].endswith("annotations[5] (image_id 99)")


@pytest.mark.parametrize("case", ["unknown_category", "duplicate_image_id", "missing_image", "bad_bbox", "no_file_name"])
def test_coco_bad_entries_error_naming_the_file_or_are_skipped_and_counted(tmp_path, case):
    images = [{"id": 10, "file_name": "v1.jpg", "width": 64, "height": 48},
              {"id": 20, "file_name": "v2.jpg", "width": 64, "height": 48}]
    anns = [{"image_id": 10, "category_id": 3, "bbox": [1, 1, 10, 10]},
            {"image_id": 20, "category_id": 3, "bbox": [1, 1, 10, 10]}]
    if case == "unknown_category":
        anns.append({"image_id": 20, "category_id": 99, "bbox": [1, 1, 5, 5]})
        pattern, flag = r"valid\.json: annotations\[2\] has category_id 99.*--ignore-unknown-classes", "ignore"
    elif case == "duplicate_image_id":
        images.append({"id": 20, "file_name": "v3.jpg", "width": 64, "height": 48})
        pattern, flag = r"valid\.json: image id 20 is used twice \(v2\.jpg, v3\.jpg\).*skip-bad-samples", "skip"
    elif case == "missing_image":
        images.append({"id": 30, "file_name": "gone.jpg", "missing": True})
        pattern, flag = r"valid\.json: image gone\.jpg \(id 30\) not found in .*skip-bad-samples", "skip"
    elif case == "bad_bbox":
        anns.append({"image_id": 20, "category_id": 3, "bbox": [1, "x", 5, 5]})
        pattern, flag = r"valid\.json: annotations\[2\] \(image_id 20\) has bbox .*skip-bad-samples", "skip"
    else:
        images.append({"id": 40})
        pattern, flag = r"valid\.json: images\[2\] lacks 'id' or 'file_name'.*skip-bad-samples", "skip"
    cfg = load_data_config(coco_dataset(tmp_path, anns, images))
    with pytest.raises(UserError, match=pattern) as exc:
        build_datasets(cfg, (32, 32), splits=("valid",))
    assert "\n" not in str(exc.value)
    kw = {"ignore_unknown_classes": True} if flag == "ignore" else {"skip_bad_samples": True}
    _, valid = build_datasets(cfg, (32, 32), splits=("valid",), verbose=False, **kw)
    if flag == "ignore":
        assert valid.report.unknown_classes == {"category_id 99": 1} and len(valid) == 2
    else:
        kept = ["v1.jpg"] if case == "bad_bbox" else ["v1.jpg", "v2.jpg"]  # a bad box makes its image bad
        assert len(valid.report.bad_files) == 1 and [r.name for r in valid.records] == kept
        assert valid.annotations(len(kept) - 1)["boxes"].shape == (1, 4)  # the first image with id 20 keeps its objects


def test_coco_config_classes_and_errors(tmp_path):
    cfg_path = coco_dataset(tmp_path, extra="CLASSES: [__background__, dog, cat]\n")
    cfg = load_data_config(cfg_path)
    assert cfg.classes == ["__background__", "dog", "cat"] and cfg.category_ids == [0, 12, 3]
    with pytest.raises(UserError, match=r"annotations\[2\] has category 'bird', which is not in CLASSES"):
        build_datasets(cfg, (32, 32), splits=("valid",))
    _, valid = build_datasets(cfg, (32, 32), splits=("valid",), ignore_unknown_classes=True, verbose=False)
    assert valid.report.unknown_classes == {"bird": 1}

    for text, pattern in [
        ("FORMAT: coco\nTRAIN_JSON: ann/train.json\n", r"coco\.yaml: missing key TRAIN_IMG, VALID_JSON, VALID_IMG"),
        ("FORMAT: cocoa\n", r"coco\.yaml: FORMAT 'cocoa' is not one of voc, coco, yolo"),
        ("FORMAT: coco\nTRAIN_JSON: ann/train.json\nTRAIN_IMG: train\nVALID_JSON: nope.json\nVALID_IMG: valid\n",
         r"coco\.yaml: VALID_JSON: file 'nope\.json' not found"),
        ("FORMAT: coco\nTRAIN_JSON: ann/train.json\nTRAIN_IMG: train\nVALID_JSON: ann/valid.json\nVALID_IMG: valid\n"
         "CLASSES: [__background__, zebra]\n", r"CLASSES lists 'zebra', which neither train\.json nor valid\.json has"),
    ]:
        cfg_path.write_text(text)
        with pytest.raises(UserError, match=pattern):
            load_data_config(cfg_path)
    (tmp_path / "ann/valid.json").write_text("{not json")
    cfg_path.write_text("FORMAT: coco\nTRAIN_JSON: ann/train.json\nTRAIN_IMG: train\nVALID_JSON: ann/valid.json\nVALID_IMG: valid\n")
    with pytest.raises(UserError, match=r"valid\.json: not valid JSON") as exc:
        load_data_config(cfg_path)
    assert "\n" not in str(exc.value)
    coco_file(tmp_path / "ann/valid.json", [], [], cats=[{"id": 5, "name": "cat"}])  # cat is 3 in train.json
    with pytest.raises(UserError, match=r"category 'cat' has id 3 in .*train\.json and 5 in .*valid\.json"):
        load_data_config(cfg_path)
    coco_file(tmp_path / "ann/valid.json", [], [], cats=[{"id": 3, "name": "fish"}])  # 3 is cat in train.json
    cfg_path.write_text(cfg_path.read_text() + "CLASSES: [__background__, cat, fish]\n")
    with pytest.raises(UserError, match="category id 3 names different classes"):
        load_data_config(cfg_path)


# ------------------------------------------------------------------------------------------------ YOLO
def yolo_dataset(root: Path, val_lines: dict[str, str] | None = None, names: str = "{0: cat, 1: dog}") -> Path:
    """Ultralytics layout under root/ds; images 64x48."""
    ds = root / "ds"
    write_image(ds / "images/train/a.jpg")
    (ds / "labels/train").mkdir(parents=True)
    (ds / "labels/train/a.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    if val_lines is None:
        val_lines = {"v1": "1 0.25 0.5 0.5 0.5\n0 0.75 0.25 0.125 0.25\n", "sub/v2": "\n"}
    for k, (stem, text) in enumerate(val_lines.items()):
        write_image(ds / f"images/val/{stem}.jpg", seed=k)
        if text is not None:
            (ds / f"labels/val/{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
            (ds / f"labels/val/{stem}.txt").write_text(text)
    return write_yaml(root / "cfg/data.yaml", f"path: ../ds\ntrain: images/train\nval: [images/val]\nnames: {names}\n")


def test_ultralytics_data_yaml_is_read_as_it_is(tmp_path):
    cfg = load_data_config(yolo_dataset(tmp_path))
    assert cfg.format == "yolo" and cfg.classes == ["__background__", "cat", "dog"] and cfg.category_ids is None
    assert cfg.category_id(2) == 2 and cfg.label_of(1) == 1
    _, valid = build_datasets(cfg, (32, 32), augment="none", splits=("valid",))
    assert [r.name for r in valid.records] == ["sub/v2.jpg", "v1.jpg"]
    torch.testing.assert_close(valid.annotations(1)["boxes"], torch.tensor([[0.0, 12, 32, 36], [44, 6, 52, 18]]))
    assert valid.annotations(1)["labels"].tolist() == [2, 1]
    assert valid.report.n_negatives == 1 and valid.report.problems() == []
    gts = load_ground_truth(cfg, "valid")
    assert sorted(gts) == ["sub/v2.jpg", "v1.jpg"] and gts["sub/v2.jpg"]["boxes"].shape == (0, 4)


def test_yolo_background_images_orphans_clamping_and_polygons(tmp_path):
    lines = {"v1": "0 0.9 0.5 0.4 0.2\n1 0.5 0.5 0 0.2\n",  # clamped at the right border; zero width dropped
             "v2": None,  # no label file: a background image
             "v3": "1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.3\n"}  # polygon -> its bounding box
    cfg_path = yolo_dataset(tmp_path, lines)
    ds = tmp_path / "ds"
    (ds / "labels/val/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (ds / "labels/val/classes.txt").write_text("cat\ndog\n")  # LabelImg's class list is not a label file
    with pytest.warns(UserWarning, match=r"1 box\(es\) clamped.*1 box\(es\) dropped.*1 annotation\(s\) without an "
                                         r"image.*1 image\(s\) without a label file"):
        _, valid = build_datasets(load_data_config(cfg_path), (32, 32), augment="none", splits=("valid",))
    assert len(valid) == 3 and valid.report.no_label_file == 1 and valid.report.n_negatives == 1
    torch.testing.assert_close(valid.annotations(0)["boxes"], torch.tensor([[44.8, 19.2, 64, 28.8]]))
    torch.testing.assert_close(valid.annotations(2)["boxes"], torch.tensor([[6.4, 4.8, 19.2, 19.2]]))
    assert "orphan.txt" in valid.report.unmatched_annotations[0]


@pytest.mark.parametrize("line,pattern", [
    ("0 0.5 0.5 0.2\n", r"v1\.txt line 1: 4 values; expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.9\n", r"v1\.txt line 1: 6 values"),
    ("0 32 24 10 10\n", r"v1\.txt line 1: value 32 outside \[0, 1\]"),
    ("0 0.5 -0.5 0.2 0.2\n", r"v1\.txt line 1: value -0\.5 outside \[0, 1\]"),
    ("0 0.5 abc 0.2 0.2\n", r"v1\.txt line 1: non-numeric value"),
    ("0.5 0.5 0.5 0.2 0.2\n", r"v1\.txt line 1: the class id must be an integer"),
])
def test_yolo_malformed_lines_error_naming_file_and_line_or_are_skipped(tmp_path, line, pattern):
    cfg = load_data_config(yolo_dataset(tmp_path, {"v1": line, "v2": "1 0.5 0.5 0.5 0.5\n"}))
    with pytest.raises(UserError, match=pattern + ".*skip-bad-samples") as exc:
        build_datasets(cfg, (32, 32), splits=("valid",))
    assert "\n" not in str(exc.value)
    _, valid = build_datasets(cfg, (32, 32), splits=("valid",), skip_bad_samples=True, verbose=False)
    assert [r.name for r in valid.records] == ["v2.jpg"] and len(valid.report.bad_files) == 1


def test_yolo_unknown_class_id_and_missing_labels(tmp_path):
    cfg = load_data_config(yolo_dataset(tmp_path, {"v1": "0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n"}))
    with pytest.raises(UserError, match=r"v1\.txt line 2: class id 2 is not in names \(ids 0\.\.1\).*--ignore-unknown"):
        build_datasets(cfg, (32, 32), splits=("valid",))
    _, valid = build_datasets(cfg, (32, 32), splits=("valid",), ignore_unknown_classes=True, verbose=False)
    assert valid.report.unknown_classes == {"class id 2": 1} and valid.annotations(0)["labels"].tolist() == [1]

    import shutil

    shutil.rmtree(tmp_path / "ds/labels/val")
    with pytest.raises(UserError, match=r"val: none of the 1 images in .*images/val has a label file \(looked for e\.g\. "
                                        r".*labels/val/v1\.txt\)"):
        build_datasets(cfg, (32, 32), splits=("valid",))


def test_yolo_format_config_with_labels_folder_and_list_file(tmp_path):
    write_image(tmp_path / "imgs/a.jpg")
    write_image(tmp_path / "imgs/b.png", seed=1)
    (tmp_path / "lbl").mkdir()
    (tmp_path / "lbl/a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "lbl/b.txt").write_text("0 0.25 0.25 0.5 0.5\n")
    (tmp_path / "val.txt").write_text("./imgs/b.png\n\n")
    cfg = load_data_config(write_yaml(tmp_path / "y.yaml", "FORMAT: yolo\nTRAIN_IMG: imgs\nTRAIN_LABELS: lbl\n"
                                      "VALID_IMG: val.txt\nVALID_LABELS: lbl\nCLASSES: [__background__, cat, dog]\n"))
    train, valid = build_datasets(cfg, (32, 32), augment="none")
    assert [r.name for r in train.records] == ["a.jpg", "b.png"] and [r.name for r in valid.records] == ["imgs/b.png"]
    torch.testing.assert_close(train.annotations(0)["boxes"], torch.tensor([[16.0, 12, 48, 36]]))
    assert valid.annotations(0)["labels"].tolist() == [1]


@pytest.mark.parametrize("text,pattern", [
    ("train: a\nval: b\nnames: [__background__, cat]\n", "names must not contain '__background__'"),
    ("train: a\nval: b\nnames: {0: cat, 2: dog}\n", r"names keys must be the class ids 0\.\.1"),
    ("train: a\nval: b\nnc: 3\nnames: [cat, dog]\n", "nc is 3 but names lists 2 classes"),
    ("train: a\nnames: [cat]\n", "missing key val"),
    ("train: nowhere\nval: nowhere\nnames: [cat]\n", r"train: path 'nowhere' not found"),
])
def test_ultralytics_config_errors(tmp_path, text, pattern):
    with pytest.raises(UserError, match=r"data\.yaml: " + pattern):
        load_data_config(write_yaml(tmp_path / "data.yaml", text))


# ------------------------------------------------------------------------------------------ all formats
def test_ground_truth_and_analyze_agree_across_formats(tmp_path, capsys):
    import re

    from src.detection.commands import analyze
    from src.detection.data import synthetic
    from src.detection.data.datasets import DetectionDataset, read_split

    def object_counts(text: str) -> dict[str, list[int]]:  # class -> [train objects, valid objects]
        rows = re.findall(r"^\| (\w+) \| (\d+) \(\d+\) \| (\d+) \(\d+\) \|$", text, re.M)
        return {m[0]: [int(m[1]), int(m[2])] for m in rows}

    gts, counts = {}, {}
    for fmt in ("voc", "coco", "yolo"):
        cfg = load_data_config(synthetic.generate_dataset(tmp_path / fmt, 3, 12, imgsz=64, seed=4, format=fmt))
        assert cfg.format == fmt and cfg.classes == synthetic.CLASSES
        gts[fmt] = load_ground_truth(cfg, "valid")
        stats = {}
        for split in ("train", "valid"):
            records, _ = read_split(cfg, split)
            stats[split] = analyze.dataset_stats(DetectionDataset(records, cfg.classes, verbose=False))
        counts[fmt] = object_counts(analyze.format_report(cfg.classes, stats))
    assert gts["voc"].keys() == gts["coco"].keys() == gts["yolo"].keys()
    for name, want in gts["voc"].items():
        for fmt in ("coco", "yolo"):
            torch.testing.assert_close(gts[fmt][name]["boxes"], want["boxes"], atol=1e-3, rtol=0)
            assert torch.equal(gts[fmt][name]["labels"], want["labels"])
        assert torch.equal(gts["coco"][name]["difficult"], want["difficult"])
    assert set(counts["voc"]) == {"circle", "square", "triangle"}
    assert counts["voc"] == counts["coco"] == counts["yolo"]
    assert sum(v[1] for v in counts["voc"].values()) == sum(len(g["labels"]) for g in gts["voc"].values())

    # the command on a YOLO data.yaml: table, problems and plots
    (tmp_path / "yolo/labels/val/valid_00000.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    assert analyze.main(["--config", str(tmp_path / "yolo/shapes.yaml"), "--out-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shapes.yaml: yolo dataset, 3 classes") and "class id 7 x1" in out
    assert (tmp_path / "plots/class_counts.png").is_file() and (tmp_path / "plots/box_stats.png").is_file()


# ------------------------------------------------------------------------------- evaluation skips bad images
def test_evaluation_skips_an_undecodable_image_instead_of_scoring_a_substitute(tmp_path):
    from src.detection.engine.loop import evaluate

    n = 4
    for i in range(n):
        write_image(tmp_path / f"valid/images/{i}.jpg", seed=i)
        (tmp_path / "valid/labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"valid/labels/{i}.xml").write_text(
            f"<annotation><object><name>cat</name><bndbox><xmin>{i}</xmin><ymin>1</ymin><xmax>{i + 20}</xmax>"
            "<ymax>30</ymax></bndbox></object></annotation>")
    good = (tmp_path / "valid/images/1.jpg").read_bytes()
    (tmp_path / "valid/images/1.jpg").write_bytes(good[: len(good) // 2])  # header intact, data truncated
    cfg_path = write_yaml(tmp_path / "c.yaml", "TRAIN_IMG: valid/images\nTRAIN_ANNOT: valid/labels\nVALID_IMG: "
                          "valid/images\nVALID_ANNOT: valid/labels\nCLASSES: [__background__, cat]\n")
    cfg = load_data_config(cfg_path)
    _, valid = build_datasets(cfg, (32, 32), augment="none", splits=("valid",))
    with pytest.raises(UserError, match=r"1\.jpg.*skip-bad-samples"):
        list(build_dataloader(valid, batch_size=2))

    _, valid = build_datasets(cfg, (32, 32), augment="none", splits=("valid",), skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping .*1\.jpg: cannot decode it \(not evaluated\)"):
        ids = [t["image_id"] for _, ts in build_dataloader(valid, batch_size=1) for t in ts]
    assert ids == [0, 2, 3]  # no substitute, no duplicate, no empty batch

    class Perfect(torch.nn.Module):
        """Predicts each image's ground truth, looked up by its content, so a scored image scores 1.0."""

        def forward(self, images):
            out = []
            for im in images:
                i = next(k for k in range(n) if k != 1 and torch.equal(valid[k][0], im))
                boxes = valid.annotations(i)["boxes"] * torch.tensor([32 / 64, 32 / 48, 32 / 64, 32 / 48])
                out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": torch.ones(len(boxes), dtype=torch.int64)})
            return out

    from src.detection.modeling.input_spec import InputSpec

    result = evaluate(Perfect(), build_dataloader(valid, batch_size=2), torch.device("cpu"), cfg.classes,
                      spec=InputSpec(imgsz=(32, 32)), metric="coco")
    assert result.n_images == n - 1 and result.map50 == pytest.approx(1.0)

    train, _ = build_datasets(cfg, (32, 32), augment="none", splits=("train",), skip_bad_samples=True)
    with pytest.warns(UserWarning, match="using the next image"):
        assert train[1][1]["image_id"] == 2  # training keeps substituting


@pytest.mark.parametrize("name,key", [("coco_example.yaml", "TRAIN_IMG: folder 'input/coco/train2017'"),
                                      ("yolo_example.yaml", "path: folder 'input/my_yolo_dataset'")])
def test_shipped_example_configs(name, key):
    from src.detection.core.paths import REPO_ROOT
    with pytest.raises(UserError, match=rf"{name}: {key} not found"):
        load_data_config(REPO_ROOT / "detection_configs" / name)


# ------------------------------------------------------------------------------------------- classes only
def voc_pairs_dataset(root: Path) -> Path:
    for split in ("train", "valid"):
        write_image(root / f"data/{split}/images/a.jpg")
        (root / f"data/{split}/labels").mkdir(parents=True)
    return write_yaml(root / "voc.yaml", "TRAIN_IMG: data/train/images\nTRAIN_ANNOT: data/train/labels\n"
                                         "VALID_IMG: data/valid/images\nVALID_ANNOT: data/valid/labels\n"
                                         "CLASSES: [__background__, cat, dog]\n")


@pytest.mark.parametrize("form,expected", [
    ("voc", ["__background__", "cat", "dog"]),
    ("coco", ["__background__", "cat", "bird", "dog"]),  # categories sorted by id
    ("coco_classes", ["__background__", "dog", "cat"]),
    ("ultralytics_dict", ["__background__", "cat", "dog"]),
    ("ultralytics_list", ["__background__", "dog", "cat"]),
])
def test_config_classes_without_the_data_folders(tmp_path, form, expected):
    """Inference reads the classes of every config form training takes, as training does, with the image and label
    folders gone (a COCO config keeps its TRAIN_JSON: the names are there)."""
    if form == "voc":
        cfg = voc_pairs_dataset(tmp_path)
    elif form.startswith("coco"):
        cfg = coco_dataset(tmp_path, extra="CLASSES: [__background__, dog, cat]\n" if form == "coco_classes" else "")
    else:
        cfg = yolo_dataset(tmp_path, names="{0: cat, 1: dog}" if form == "ultralytics_dict" else "[dog, cat]")
    assert load_data_config(cfg).classes == expected  # what a checkpoint trained on it records
    for folder in ("data", "train", "valid", "ds", "ann/valid.json"):
        target = tmp_path / folder
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
    with pytest.raises(UserError, match="not found"):
        load_data_config(cfg)
    assert load_config_classes(cfg) == expected


def test_config_classes_of_a_coco_config_without_its_annotation_file(tmp_path):
    cfg = coco_dataset(tmp_path)
    (tmp_path / "ann/train.json").unlink()
    with pytest.raises(UserError, match=r"coco\.yaml: TRAIN_JSON: file 'ann/train\.json' not found .*class names "
                                        r"come from its categories.*add CLASSES") as exc:
        load_config_classes(cfg)
    assert "\n" not in str(exc.value)
    write_yaml(cfg, "FORMAT: coco\nVALID_JSON: ann/valid.json\n")
    with pytest.raises(UserError, match=r"coco\.yaml: missing key TRAIN_JSON .*add CLASSES"):
        load_config_classes(cfg)
    write_yaml(cfg, "FORMAT: coco\nCLASSES: [__background__, cat]\n")  # names given: no file needed
    assert load_config_classes(cfg) == ["__background__", "cat"]


def test_config_classes_of_the_shipped_configs():
    import yaml

    from src.detection.core.paths import REPO_ROOT

    configs = REPO_ROOT / "detection_configs"
    raw = yaml.safe_load((configs / "voc.yaml").read_text())  # its data folders are not shipped
    assert load_config_classes("detection_configs/voc.yaml") == raw["CLASSES"] and len(raw["CLASSES"]) == 21
    assert load_config_classes(configs / "yolo_example.yaml") == ["__background__", "cat", "dog"]
    with pytest.raises(UserError, match=r"coco_example\.yaml: TRAIN_JSON: file .*instances_train2017\.json' not found"):
        load_config_classes(configs / "coco_example.yaml")


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", ["voc", "coco", "yolo"])
def test_every_format_round_trips_through_its_registry_writer_and_reader(tmp_path, name):
    """Records written with the format's writer (``LabelWriter``), in its layout and with its dataset config, read
    back by its reader: same images, boxes (VOC: whole pixels; YOLO: 6 decimals), labels and difficult flags (YOLO
    has none: such objects come back as ordinary ones and are counted)."""
    import yaml

    from src.detection.data.annotations import LabelWriter
    from src.detection.data.datasets import read_split
    from src.detection.data.formats import FORMATS

    fmt = FORMATS[name]
    classes = ["__background__", "cat", "dog"]
    out = tmp_path / "out"
    samples = {"train": [("a.jpg", (48, 64), [[3.0, 4.0, 30.0, 40.0], [10.0, 1.0, 64.0, 20.0]], [1, 2], [False, True]),
                         ("b.jpg", (40, 50), [], [], [])],
               "valid": [("c.jpg", (48, 64), [[0.0, 0.0, 12.0, 9.0]], [2], [False])]}
    lost = 0
    for split, items in samples.items():
        img_dir, lbl_dir = fmt.split_layout(out, split)
        with LabelWriter(name, lbl_dir, classes, json_name=f"{split}.json", classes_file=None) as writer:
            for file, (h, w), boxes, labels, difficult in items:
                write_image(img_dir / file, w=w, h=h)
                writer.add(img_dir / file, (h, w), boxes, labels, difficult=difficult)
        assert writer.skipped_boxes == 0
        lost += writer.lost_difficult
    assert lost == (1 if name == "yolo" else 0)
    config = write_yaml(out / fmt.config_name, yaml.safe_dump(fmt.dataset_config(classes)))

    cfg = load_data_config(config)
    assert cfg.format == name and cfg.classes == classes
    for split, items in samples.items():
        records, report = read_split(cfg, split)
        assert not report.problems()
        assert [(r.name, r.size) for r in records] == [(file, hw) for file, hw, *_ in items]
        for rec, (_, _, boxes, labels, difficult) in zip(records, items):
            np.testing.assert_allclose(rec.boxes, np.asarray(boxes, np.float32).reshape(-1, 4), atol=1e-3)
            assert rec.labels.tolist() == labels
            assert rec.difficult.tolist() == ([False] * len(labels) if name == "yolo" else difficult)
