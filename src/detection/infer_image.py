"""The image-inference command (``infer_det_image.py``): find images, predict, draw, write JSON / label files."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .annotations import write_voc_xml
from .errors import UserError
from .image_io import find_images, read_image
from .pipeline import Item, run_pipeline
from .predictor import add_predictor_args, display_available, predictor_from_args
from .utils import increment_path


def coco_results(image_id: int, file_name: str, pred: dict[str, torch.Tensor], classes: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """COCO results-format rows (bbox = [x, y, w, h] in original pixels) plus file and class names."""
    rows = []
    for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = box
        rows.append({"image_id": image_id, "file_name": file_name, "category_id": int(label),
                     "category_name": classes[label] if 0 <= label < len(classes) else str(label),
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                     "score": round(float(score), 5)})
    return rows


def infer_images(args: argparse.Namespace) -> dict[str, Any]:
    """The body of infer_det_image.py: predict every image, write annotated images / predictions.json / XML."""
    import cv2
    from tqdm import tqdm

    from .draw import draw_on_image

    files, root = find_images(args.input, args.recursive)
    predictor = predictor_from_args(args)
    out_dir = Path(args.out_dir) if args.out_dir else increment_path("outputs/inference", None, "run")
    out_dir.mkdir(parents=True, exist_ok=True)
    show = False
    if args.show:
        show, why = display_available()
        if not show:
            print(f"note: --show ignored: {why}")

    def load(i_path: tuple[int, Path]) -> Item:
        i, path = i_path
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        try:
            image = read_image(path)
        except UserError as exc:
            return Item(data=(i, path, rel, None), input=None, orig_hw=(0, 0), error=str(exc))
        return Item(data=(i, path, rel, image), input=predictor.preprocess(image),
                    orig_hw=(int(image.shape[1]), int(image.shape[2])))

    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    counts = {"images": 0, "detections": 0}
    bar = tqdm(total=len(files), unit="img", desc="inference")

    def sink(item: Item) -> None:
        i, path, rel, image = item.data
        bar.update(1)
        if item.error is not None:
            skipped.append(str(path))
            tqdm.write(f"skipped {path}: {item.error}")
            return
        pred = item.pred
        counts["images"] += 1
        counts["detections"] += len(pred["boxes"])
        results.extend(coco_results(i + 1, rel.as_posix(), pred, predictor.classes))
        if args.save_xml:
            write_voc_xml(out_dir / "labels" / rel.with_suffix(".xml"), path, item.orig_hw, pred, predictor.classes)
        if not args.no_save or show:
            frame = draw_on_image(image, pred, predictor.classes)
            if not args.no_save:
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(target), frame):
                    cv2.imwrite(str(target.with_suffix(".jpg")), frame)
            if show:
                cv2.imshow("detections", frame)
                cv2.waitKey(1)

    t0 = time.perf_counter()
    try:
        run_pipeline(predictor, (load(x) for x in enumerate(files)), sink)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    pred_path = out_dir / "predictions.json"
    pred_path.write_text(json.dumps(results, indent=1))
    summary = {"images": counts["images"], "skipped": len(skipped), "detections": counts["detections"],
               "model_images_per_s": round(predictor.model_timer.rate, 3),
               "end_to_end_images_per_s": round(counts["images"] / elapsed, 3) if elapsed > 0 else 0.0,
               "out_dir": str(out_dir), "predictions": str(pred_path)}
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    print(f"{counts['images']} images{note}, {counts['detections']} detections >= {args.threshold}; "
          f"model {summary['model_images_per_s']:.2f} img/s, end-to-end {summary['end_to_end_images_per_s']:.2f} "
          f"img/s; results in {out_dir}")
    if counts["images"] == 0:
        raise UserError(f"--input {args.input}: none of the {len(files)} images could be read")
    return summary


def build_image_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect objects in images with a trained checkpoint.")
    parser.add_argument("--input", required=True, help="image file, folder or glob (quote it)")
    parser.add_argument("--recursive", action="store_true", help="also search subfolders of a folder --input")
    parser.add_argument("--save-xml", action="store_true", help="write one Pascal VOC XML per image (labels/)")
    add_predictor_args(parser)
    return parser
