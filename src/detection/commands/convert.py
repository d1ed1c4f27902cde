"""Dataset conversion between Pascal VOC XML, COCO JSON and YOLO text labels.

    python -m src.detection.convert --config data.yaml --to voc|coco|yolo --out-dir DIR [--copy]

Reads both splits with the same reader training uses (boxes clamped to the image, problems reported), then writes
the images (hard-linked where the file system allows, else copied) and labels in the target format, plus a config
that ``--config`` accepts:

- voc:  ``DIR/{train,valid}/{images,labels}`` + ``DIR/dataset.yaml`` (folder form; nested names are flattened
  with ``_`` because VOC matches images and XML by stem in one folder)
- coco: ``DIR/{train,valid}/images`` + ``DIR/annotations/{train,valid}.json`` + ``DIR/dataset.yaml``
  (``FORMAT: coco``; a COCO source keeps its category and image ids)
- yolo: ``DIR/images/{train,val}`` + ``DIR/labels/{train,val}`` + ``DIR/data.yaml`` (Ultralytics layout)

Class names and order are kept. VOC rounds boxes to whole pixels; YOLO has no difficult/iscrowd flag (such objects
become ordinary ones, and the count is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..core.cli import new_parser
from ..core.errors import UserError, run_cli
from ..core.paths import resolve_path
from ..data.annotations import LABEL_FORMATS, LabelWriter
from ..data.formats import FORMATS
from ..data.formats.common import clamp_boxes

if TYPE_CHECKING:
    from ..data.datasets import DataConfig


@dataclass
class ConvertOptions:
    config: str
    to: str
    out_dir: str
    copy: bool = False
    ignore_unknown_classes: bool | None = None
    skip_bad_samples: bool | None = None


@dataclass
class ConvertResult:
    config: Path
    images: dict[str, int]
    objects: dict[str, int]
    skipped_boxes: int
    lost_difficult: int
    linked: int
    copied: int


def _place(src: Path, dst: Path, copy: bool, counts: dict[str, int]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            counts["linked"] += 1
            return
        except OSError:  # another file system, or links not supported: copy instead
            pass
    shutil.copy2(src, dst)
    counts["copied"] += 1


def _target_name(name: str, used: set[str], flat: bool) -> str:
    """``name`` (a path relative to the split folder), flattened for VOC, made unique by stem within the split."""
    p = Path(name.replace("/", "_")) if flat else Path(name)
    cand, k = p, 1
    while cand.with_suffix("").as_posix().lower() in used:  # lower: a.jpg and A.png collide on some file systems
        cand = p.with_name(f"{p.stem}_{k}{p.suffix}")
        k += 1
    used.add(cand.with_suffix("").as_posix().lower())
    return cand.as_posix()


def _write_config(to: str, out: Path, cfg: DataConfig) -> Path:
    fmt = FORMATS[to]
    path = out / fmt.config_name
    text = f"# {to.upper()} dataset converted from {cfg.path}. Paths are relative to this file.\n"
    path.write_text(text + yaml.safe_dump(fmt.dataset_config(cfg.classes), sort_keys=False), encoding="utf-8")
    return path


def convert_dataset(opts: ConvertOptions) -> ConvertResult:
    """Write the config's train and valid splits in format ``opts.to`` under ``opts.out_dir``."""
    if opts.to not in LABEL_FORMATS:
        raise UserError(f"--to {opts.to}: use one of {', '.join(LABEL_FORMATS)}")
    from ..data.datasets import load_data_config, read_split  # after parsing: --help does not import torch

    cfg = load_data_config(opts.config)
    out = resolve_path(opts.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out-dir {opts.out_dir}: {out} exists and is not an empty folder; pick a new folder")
    # read both splits before writing anything, so a problem stops the conversion with nothing written
    splits = {s: read_split(cfg, s, opts.ignore_unknown_classes, opts.skip_bad_samples) for s in ("train", "valid")}
    for split, (records, report) in splits.items():
        for line in report.problems():
            print(f"{split}: {line}")
        if not records:
            raise UserError(f"{cfg.path}: the {split} split has no usable samples; nothing to convert")
    counts = {"linked": 0, "copied": 0}
    images, objects, skipped, lost = {}, {}, 0, 0
    for split, (records, _) in splits.items():
        img_dir, lbl_dir = FORMATS[opts.to].split_layout(out, split)
        keep_ids = FORMATS[cfg.format].has_image_ids and len({r.image_id for r in records}) == len(records) \
            and all(isinstance(r.image_id, int) for r in records)
        writer = LabelWriter(opts.to, lbl_dir, cfg.classes, cfg.category_ids, json_name=f"{split}.json",
                             classes_file=None)
        used: set[str] = set()
        n_obj = 0
        with writer:
            for rec in records:
                name = _target_name(rec.name, used, flat=not FORMATS[opts.to].nested_names)
                _place(rec.image, img_dir / name, opts.copy, counts)
                boxes, _, keep = clamp_boxes(rec.boxes, rec.size)
                n_obj += int(keep.sum())
                writer.add(img_dir / name, rec.size, boxes[keep], rec.labels[keep], difficult=rec.difficult[keep],
                           name=name, image_id=rec.image_id if keep_ids else None)
        images[split], objects[split] = len(records), n_obj
        skipped += writer.skipped_boxes
        lost += writer.lost_difficult
    path = _write_config(opts.to, out, cfg)
    return ConvertResult(path, images, objects, skipped, lost, counts["linked"], counts["copied"])


def build_parser() -> argparse.ArgumentParser:
    ap = new_parser(description="Convert a detection dataset between Pascal VOC XML, COCO JSON and YOLO.")
    ap.add_argument("--config", required=True,
                    help="source dataset YAML (VOC, FORMAT: coco / yolo, or an Ultralytics data.yaml)")
    ap.add_argument("--to", required=True, choices=LABEL_FORMATS, help="target annotation format")
    ap.add_argument("--out-dir", "--out", dest="out_dir", required=True, help="new (or empty) output folder")
    ap.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    ap.add_argument("--ignore-unknown-classes", action="store_true", default=None,
                    help="skip (and count) objects of classes the config does not list instead of stopping (off: "
                         "the config's IGNORE_UNKNOWN_CLASSES decides)")
    ap.add_argument("--skip-bad-samples", action="store_true", default=None,
                    help="skip (and count) unreadable or malformed samples instead of stopping (off: the config's "
                         "SKIP_BAD_SAMPLES decides)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = convert_dataset(ConvertOptions(args.config, args.to, args.out_dir, args.copy,
                                         args.ignore_unknown_classes, args.skip_bad_samples))
    how = f"{res.linked} hard-linked, {res.copied} copied" if res.linked else f"{res.copied} copied"
    print(f"wrote {res.images['train']} train / {res.images['valid']} valid images ({how}), "
          f"{res.objects['train'] + res.objects['valid']} objects; config {res.config}")
    if res.skipped_boxes:
        print(f"note: {res.skipped_boxes} box(es) smaller than a pixel after rounding were not written")
    if res.lost_difficult:
        print(f"note: {res.lost_difficult} difficult/iscrowd object(s) written as ordinary objects (YOLO has no such flag)")
    return 0


if __name__ == "__main__":
    run_cli(main)
