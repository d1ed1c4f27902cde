"""Synthetic generator: deterministic, loadable in every format, and its boxes survive generator -> dataset -> batch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from src.detection.commands import synthetic as synthetic_command
from src.detection.data import synthetic
from src.detection.data.datasets import build_dataloader, build_datasets, load_data_config


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_per_seed(tmp_path):
    a = synthetic.generate_dataset(tmp_path / "a", 6, 2, imgsz=96, seed=1)
    b = synthetic.generate_dataset(tmp_path / "b", 6, 2, imgsz=96, seed=1)
    c = synthetic.generate_dataset(tmp_path / "c", 6, 2, imgsz=96, seed=2)
    da, db, dc = digest(a.parent), digest(b.parent), digest(c.parent)
    assert len(da) == 2 * (6 + 2) + 1 and da == db
    assert {k: v for k, v in da.items() if k.endswith(".jpg")} != {k: v for k, v in dc.items() if k.endswith(".jpg")}


def test_round_trip_generator_dataset_batch_gives_the_generated_boxes(tmp_path):
    n_train, n_valid, size, seed = 40, 4, 96, 3
    cfg_path = synthetic.generate_dataset(tmp_path / "shapes", n_train, n_valid, imgsz=size, seed=seed)
    # what the generator drew, recomputed from its RNG (independent of the XML writer/reader)
    expected = [synthetic.make_image(np.random.default_rng([seed, 0, i]), size)[1] for i in range(n_train)]
    cfg = load_data_config(cfg_path)
    assert cfg.classes == synthetic.CLASSES
    imgsz = (128, 64)  # non-square: x scaled by 4/3, y by 2/3
    train, _ = build_datasets(cfg, imgsz, augment="none", letterbox=False)
    assert len(train) == n_train and train.report.problems() == []
    loader = build_dataloader(train, batch_size=8, workers=0, shuffle=False, seed=0)
    scale = torch.tensor([128 / 96, 64 / 96, 128 / 96, 64 / 96])
    i = 0
    for images, targets in loader:
        assert images.shape[1:] == (3, 64, 128) and images.dtype == torch.uint8
        for t in targets:
            objs = expected[i]
            all_boxes = torch.tensor([o[1] for o in objs], dtype=torch.float32).reshape(-1, 4)
            difficult = torch.tensor([o[2] for o in objs], dtype=torch.bool)
            labels = torch.tensor([synthetic.CLASSES.index(o[0]) for o in objs], dtype=torch.int64)
            torch.testing.assert_close(t["orig_boxes"], all_boxes)
            assert torch.equal(t["orig_labels"], labels) and torch.equal(t["orig_difficult"], difficult)
            torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), all_boxes[~difficult] * scale)
            assert torch.equal(t["labels"], labels[~difficult])
            i += 1
    assert i == n_train


def test_dataset_has_the_promised_variety(tmp_path):
    cfg_path = synthetic.generate_dataset(tmp_path / "s", 80, 2, imgsz=128, seed=0)
    train, _ = build_datasets(load_data_config(cfg_path), (128, 128), augment="none")
    rep = train.report
    assert rep.n_negatives > 0 and rep.n_difficult > 0 and rep.n_objects > 2 * rep.n_images
    sides = []
    labels = []
    for k in range(len(train)):
        ann = train.annotations(k)
        b = ann["boxes"]
        sides += ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sqrt().tolist()
        labels += ann["labels"].tolist()
    assert min(sides) < 16 and max(sides) > 48  # small and large objects
    assert set(labels) == {1, 2, 3}


def test_cli_writes_a_loadable_config(tmp_path, capsys):
    import cv2

    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train", "3", "--valid", "2", "--imgsz", "64", "--seed", "5", "--video", "12"]
    assert synthetic_command.main(argv) == 0
    assert "shapes.yaml" in capsys.readouterr().out
    cap = cv2.VideoCapture(str(out / "demo.mp4"))
    frames = []
    while (ok := cap.read())[0]:
        frames.append(ok[1])
    cap.release()
    assert len(frames) == 12 and frames[0].shape == (64, 64, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1  # the shapes move
    cfg = load_data_config(out / "shapes.yaml")
    assert len(list(cfg.train[0].images.glob("*.jpg"))) == 3 and len(list(cfg.valid[0].annots.glob("*.xml"))) == 2


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_other_formats_hold_the_generated_boxes(tmp_path, fmt):
    from src.detection.data.datasets import load_ground_truth

    seed, size = 2, 80
    cfg = load_data_config(synthetic.generate_dataset(tmp_path / fmt, 2, 10, imgsz=size, seed=seed, format=fmt))
    assert cfg.format == fmt and cfg.classes == synthetic.CLASSES
    gts = load_ground_truth(cfg, "valid")
    assert sorted(gts) == [f"valid_{i:05d}.jpg" for i in range(10)]
    n_difficult = 0
    for i in range(10):
        objs = synthetic.make_image(np.random.default_rng([seed, 1, i]), size)[1]
        gt = gts[f"valid_{i:05d}.jpg"]
        want = torch.tensor([o[1] for o in objs], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(gt["boxes"], want, atol=1e-3, rtol=0)  # YOLO: 6 decimals of the image size
        assert gt["labels"].tolist() == [synthetic.CLASSES.index(o[0]) for o in objs]
        # COCO marks faint objects iscrowd (= difficult); YOLO has no such flag
        assert gt["difficult"].tolist() == [o[2] and fmt == "coco" for o in objs]
        n_difficult += sum(o[2] for o in objs)
    assert n_difficult > 0  # the flag check above saw a faint object
    layout = {"coco": ["annotations/train.json", "annotations/valid.json", "train/images/train_00000.jpg"],
              "yolo": ["images/train/train_00000.jpg", "labels/val/valid_00009.txt"]}[fmt]
    assert all((tmp_path / fmt / p).is_file() for p in layout)


def test_cli_format_and_out_dir(tmp_path, capsys):
    assert synthetic_command.main(["--out-dir", str(tmp_path / "y"), "--format", "yolo", "--train", "2", "--valid", "1",
                           "--imgsz", "64"]) == 0
    assert "(yolo)" in capsys.readouterr().out
    cfg = load_data_config(tmp_path / "y/shapes.yaml")
    assert cfg.format == "yolo" and cfg.classes == synthetic.CLASSES
    with pytest.raises(SystemExit):
        synthetic_command.main(["--out-dir", str(tmp_path / "z"), "--format", "xml"])
