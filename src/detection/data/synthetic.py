"""Synthetic shapes dataset in Pascal VOC XML, COCO JSON or YOLO layout (used by the demo and the tests).

    python -m src.detection.synthetic --out-dir input/shapes --train 400 --valid 100 [--format voc|coco|yolo]
        [--imgsz 256] [--seed 0] [--video N]

writes JPEG images and labels in the format's layout (``DataFormat.split_layout``; voc:
``<out>/{train,valid}/{images,labels}``) and ``<out>/shapes.yaml`` whose paths are relative to the YAML itself
(for yolo an Ultralytics data.yaml; YOLO cannot mark difficult objects, so faint ones are ordinary objects there). Images: coloured circles, squares and triangles (random colours) on smooth
noisy textures; sizes from ~8 px to half the image; overlaps allowed up to IoU 0.3 (later shapes occlude
earlier ones); ~5% of objects are faint (alpha-blended, low contrast) and marked ``difficult``; ~8% of
images have no objects. Every image depends only on (seed, split, index), so output is deterministic.
``--video N`` adds ``<out>/demo.mp4`` (N frames of shapes that move, cross and pass behind an occluder) and its
MOTChallenge ground truth ``<out>/demo_gt.txt`` (``synthetic_video.py``).
Box coordinates are integers: the tight bounding box of the drawn pixels' defining geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..core.errors import UserError
from .annotations import LabelWriter
from .formats import FORMATS

CLASSES = ["__background__", "circle", "square", "triangle"]
EMPTY_FRACTION = 0.08
DIFFICULT_FRACTION = 0.05
MAX_OBJECTS = 6
MAX_OVERLAP_IOU = 0.3


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field + fine noise + a few thin lines: texture the model must ignore."""
    g = int(rng.integers(2, 6))
    low = rng.integers(30, 226, size=(g, g, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    amp = int(rng.integers(6, 25))  # uniform integer noise: as good a texture as Gaussian, 10x cheaper
    img += rng.integers(-amp, amp + 1, size=(size, size, 3), dtype=np.int16)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), color, 1, cv2.LINE_AA)
    return img


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _draw(rng: np.random.Generator, img: np.ndarray, cls: str, box: np.ndarray, faint: bool,
          color: tuple[int, int, int] | None = None) -> None:
    x1, y1, x2, y2 = (int(v) for v in box)
    if color is None:
        # random colour, re-drawn a few times until it stands out from the background under the box
        bg = img[y1:y2, x1:x2].reshape(-1, 3).mean(0)
        for _ in range(8):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            if np.abs(np.array(color) - bg).sum() > 120:
                break
    layer = img.copy() if faint else img
    if cls == "circle":
        # a filled circle of radius r centred at (cx, cy) covers [cx - r, cx + r]
        r = (x2 - x1) // 2
        cv2.circle(layer, (x1 + r, y1 + r), r, color, -1, cv2.LINE_AA)
    elif cls == "square":
        cv2.rectangle(layer, (x1, y1), (x2, y2), color, -1)
    else:
        apex = int(rng.integers(x1, x2 + 1))
        pts = np.array([[apex, y1], [x2, y2], [x1, y2]], np.int32)
        cv2.fillPoly(layer, [pts], color, cv2.LINE_AA)
    if faint:
        cv2.addWeighted(layer, 0.35, img, 0.65, 0, dst=img)


def make_image(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[str, list[int], bool]]]:
    """One image and its objects [(class, [xmin, ymin, xmax, ymax], difficult)]."""
    img = _background(rng, imgsz)
    objects: list[tuple[str, list[int], bool]] = []
    if rng.random() < EMPTY_FRACTION:
        return img, objects
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    min_side = max(8, imgsz // 16)  # 16 px at 256: still COCO-"small", but learnable by the demo
    for _ in range(n * 4):  # a few tries per object to respect the overlap limit
        if len(objects) == n:
            break
        cls = CLASSES[1 + int(rng.integers(0, len(CLASSES) - 1))]
        # log-uniform sizes: many small objects, some large
        side = int(np.exp(rng.uniform(np.log(min_side), np.log(imgsz // 2))))
        w = side if cls in ("circle", "square") else int(side * rng.uniform(0.7, 1.4))
        w = min(max(w, min_side), imgsz - 2)
        if cls == "circle":
            w -= w % 2  # even width: the box is exactly 2r wide
        h = w if cls in ("circle", "square") else side
        x1 = int(rng.integers(0, imgsz - w))
        y1 = int(rng.integers(0, imgsz - h))
        box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
        if any(_iou(box, np.array(o[1], np.float32)) > MAX_OVERLAP_IOU for o in objects):
            continue
        faint = bool(rng.random() < DIFFICULT_FRACTION)
        _draw(rng, img, cls, box, faint)
        objects.append((cls, [int(v) for v in box], faint))
    return img, objects


def generate_dataset(
    out: str | os.PathLike, n_train: int, n_valid: int, imgsz: int = 256, seed: int = 0, quality: int = 95,
    format: str = "voc",
) -> Path:
    """Write the dataset and its config; returns the config path (``<out>/shapes.yaml``)."""
    if n_train < 1 or n_valid < 1:
        raise UserError(f"--train {n_train} / --valid {n_valid}: both must be at least 1")
    if imgsz < 64:
        raise UserError(f"--imgsz {imgsz}: use at least 64 pixels")
    if format not in FORMATS:
        raise UserError(f"--format {format}: use one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    out = Path(out)
    for split_id, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        img_dir, lbl_dir = fmt.split_layout(out, split)
        img_dir.mkdir(parents=True, exist_ok=True)
        with LabelWriter(format, lbl_dir, CLASSES, json_name=f"{split}.json", classes_file=None) as writer:
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, i])
                img, objects = make_image(rng, imgsz)
                name = f"{split}_{i:05d}.jpg"
                cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
                writer.add(img_dir / name, img.shape[:2], [o[1] for o in objects],
                           [CLASSES.index(o[0]) for o in objects], difficult=[o[2] for o in objects], name=name)
    cfg = fmt.dataset_config(CLASSES)
    if fmt.toolkit_keys:
        cfg["VISUALIZE_TRANSFORMED_IMAGES"] = False
    cfg_path = out / "shapes.yaml"
    header = (f"# Synthetic shapes ({format}): {n_train} train / {n_valid} valid, {imgsz}px, seed {seed}. "
              "Paths are relative to this file.\n")
    cfg_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return cfg_path


def generate_video(path: str | os.PathLike, n_frames: int, imgsz: int = 256, seed: int = 0, fps: int = 24) -> Path:
    """A short mp4 of shapes drifting and bouncing over a fixed textured background (video inference demo)."""
    if n_frames < 1:
        raise UserError(f"--video {n_frames}: give a positive number of frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    background = _background(rng, imgsz)
    shapes = []
    for k in range(int(rng.integers(3, 6))):
        cls = CLASSES[1 + k % (len(CLASSES) - 1)]
        side = int(rng.integers(imgsz // 8, imgsz // 3)) // 2 * 2
        pos = rng.uniform(0, imgsz - side, 2)
        vel = rng.uniform(-3, 3, 2) * imgsz / 256
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shapes.append([cls, side, pos, vel, color, int(rng.integers(0, 2**31))])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (imgsz, imgsz))
    if not writer.isOpened():
        raise UserError(f"{path}: OpenCV cannot write mp4 (mp4v codec missing); pip install opencv-python "
                        f"(see requirements.txt)")
    try:
        for _ in range(n_frames):
            frame = background.copy()
            for shape in shapes:
                cls, side, pos, vel, color, shape_seed = shape
                box = np.array([pos[0], pos[1], pos[0] + side, pos[1] + side]).round()
                # a per-shape generator keeps the triangle's apex the same in every frame
                _draw(np.random.default_rng(shape_seed), frame, cls, box, faint=False, color=color)
                pos += vel
                for d in range(2):  # bounce off the borders
                    if not 0 <= pos[d] <= imgsz - side:
                        vel[d] = -vel[d]
                        pos[d] = np.clip(pos[d], 0, imgsz - side)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
