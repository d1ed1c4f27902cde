"""Image inference (the body of ``infer_det_image.py``): find images, predict, draw, write JSON / label files.

``predictions.json`` (COCO results format, full precision) keeps every detection down to the checkpoint's
evaluation score threshold, so ``evaluate --predictions`` on it scores like ``evaluate --model``; the annotated
images and label files hold only detections scoring at least ``--threshold``. ``category_id`` is the training
dataset's own COCO id when it had them (``category_name`` is always written too), so the file also scores with
pycocotools against the original annotation file (matching ``image_id`` by ``file_name``: ours count the input
images from 1). ``summary.json`` records the lowest score kept in the JSON (``predictions_score_floor``) and the
images that could not be read (``unreadable``), which ``evaluate --predictions`` leaves out of the ground truth, and
whether every image found was done (``complete``, ``images_done`` of ``images_found``; false after Ctrl-C).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.paths import increment_path
from ..data.annotations import LABEL_FORMATS, LabelWriter
from ..data.image_io import find_images, read_image
from .options import PredictConfig, display_available
from .pipeline import Item, run_pipeline
from .predictor import build_predictor, filter_detections


@dataclass
class ImageInferConfig:
    """Options of ``infer_det_image.py``: the shared ``PredictConfig`` plus the image command's own."""

    predict: PredictConfig
    input: str
    recursive: bool = False
    save_labels: bool = False
    save_format: str = "voc"

    def __post_init__(self) -> None:
        if self.save_format not in LABEL_FORMATS:
            raise UserError(f"--save-format {self.save_format!r}: use one of {', '.join(LABEL_FORMATS)}")


def coco_results(image_id: int, file_name: str, pred: dict[str, torch.Tensor], classes: Sequence[str],
                 category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """COCO results-format rows (bbox = [x, y, w, h] in original pixels, full precision so that scoring the file
    reproduces the model's own evaluation) plus file and class names. ``category_id`` is the training dataset's own
    COCO id of the class when the checkpoint records them (``category_ids``), else the label index."""
    rows = []
    for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = box
        rows.append({"image_id": image_id, "file_name": file_name,
                     "category_id": int(category_ids[label]) if category_ids else int(label),
                     "category_name": classes[label] if 0 <= label < len(classes) else str(label),
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return rows


def infer_images(cfg: ImageInferConfig) -> dict[str, Any]:
    """The body of infer_det_image.py: predict every image, write annotated images / predictions.json / labels.

    Returns the summary. A KeyboardInterrupt (Ctrl-C) ends the run early: the images already done are written as
    usual and the summary says ``"complete": false`` (the command then exits with 130).
    """
    import cv2
    from tqdm import tqdm

    from .draw import draw_on_image

    pc = cfg.predict
    files, root = find_images(cfg.input, cfg.recursive)
    predictor = build_predictor(pc, keep_low_scores=True)
    out_dir = pc.resolved_out_dir() or increment_path("outputs/inference", None, "run")
    out_dir.mkdir(parents=True, exist_ok=True)
    show = False
    if pc.show:
        show, why = display_available()
        if not show:
            print(f"note: --show ignored: {why}")
    category_ids = predictor.meta.get("category_ids")  # a COCO training set's own ids
    labels = (LabelWriter(cfg.save_format, out_dir / "labels", predictor.classes, category_ids)
              if cfg.save_labels else None)

    def load(i_path: tuple[int, Path]) -> Item:
        i, path = i_path
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        try:
            image = read_image(path)
        except UserError as exc:
            return Item(data=(i, path, rel, None), input=None, orig_hw=(0, 0), error=str(exc))
        return Item(data=(i, path, rel, image), input=image, orig_hw=(int(image.shape[1]), int(image.shape[2])))

    results: list[dict[str, Any]] = []
    skipped: list[Path] = []
    counts = {"images": 0, "detections": 0}
    bar = tqdm(total=len(files), unit="img", desc="inference")

    def sink(item: Item) -> None:
        i, path, rel, image = item.data
        bar.update(1)
        if item.error is not None:
            skipped.append(rel)
            tqdm.write(f"skipped {path}: {item.error}")
            return
        counts["images"] += 1
        results.extend(coco_results(i + 1, rel.as_posix(), item.pred, predictor.classes, category_ids))
        pred = filter_detections(item.pred, pc.threshold)
        counts["detections"] += len(pred["boxes"])
        if labels is not None:
            labels.add(path, item.orig_hw, pred["boxes"], pred["labels"], scores=pred["scores"],
                       name=rel.as_posix(), image_id=i + 1)
        if not pc.no_save or show:
            frame = draw_on_image(image, pred, predictor.classes)
            if not pc.no_save:
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(target), frame):
                    cv2.imwrite(str(target.with_suffix(".jpg")), frame)
            if show:
                cv2.imshow("detections", frame)
                cv2.waitKey(1)

    t0 = time.perf_counter()
    interrupted = False
    try:
        run_pipeline(predictor, (load(x) for x in enumerate(files)), sink)
    except KeyboardInterrupt:  # Ctrl-C: the images already taken are finished; write what is done
        interrupted = True
    finally:
        bar.close()
        if labels is not None:
            labels.close()
        if show:
            cv2.destroyAllWindows()
    elapsed = time.perf_counter() - t0
    pred_path = out_dir / "predictions.json"
    pred_path.write_text(json.dumps(results))
    done = counts["images"] + len(skipped)
    summary = {"complete": not interrupted, "images_found": len(files), "images_done": done,
               "images": counts["images"], "skipped": len(skipped), "detections": counts["detections"],
               "unreadable": [rel.as_posix() for rel in skipped],
               "threshold": pc.threshold, "predictions": str(pred_path),
               "predictions_detections": len(results), "predictions_score_floor": predictor.score_thresh,
               "model_images_per_s": round(predictor.model_timer.rate, 3),
               "end_to_end_images_per_s": round(counts["images"] / elapsed, 3) if elapsed > 0 else 0.0,
               "out_dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    print(f"{counts['images']} images{note}, {counts['detections']} detections >= {pc.threshold}; "
          f"model {summary['model_images_per_s']:.2f} img/s, end-to-end {summary['end_to_end_images_per_s']:.2f} "
          f"img/s; results in {out_dir} (predictions.json keeps scores >= {predictor.score_thresh:g} for evaluation)")
    if interrupted:
        print(f"interrupted: {done} of {len(files)} images done; predictions.json and summary.json hold only those "
              f'("complete": false)')
    elif counts["images"] == 0:
        raise UserError(f"--input {cfg.input}: none of the {len(files)} images could be read")
    return summary
