"""Scoring a saved predictions file (``evaluate --predictions``) against a dataset's validation split, without a
model or images.

The file is COCO results format (``file_name`` + ``category_id`` + ``bbox`` [x, y, w, h] + ``score``), as the image
command writes it; ``category_id`` is the class index in ``CLASSES``, or for a COCO dataset its own category id.
The image command records beside it (``summary.json``) the lowest score it kept and the images it could not read;
those images are left out of the ground truth, and a file cut at a display threshold is scored with a warning.

The rows, grouped per image, feed the evaluator ``evaluate --model`` uses (``eval_report.ReportingEvaluator``) with
the ground truth, both in original image coordinates, so the report is the same: the metrics, the confusion matrix
and the F1 curves with the best score threshold.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import ToolkitWarning, UserError
from ..core.paths import resolve_path
from .eval_report import EvalReport, ReportingEvaluator
from .metrics import EvalResult, predictions_per_image

# A predictions file whose lowest score is above this was most likely cut at a display threshold.
CUT_SUSPECT_SCORE = 0.25


def _recorded_summary(path: Path) -> dict[str, Any] | None:
    """The ``summary.json`` the image command wrote beside predictions file ``path``; None when there is none."""
    summary = path.parent / "summary.json"
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or Path(str(data.get("predictions", ""))).name != path.name:
        return None
    return data


def recorded_score_floor(path: Path) -> float | None:
    """The lowest score a predictions file was written with, as the image command records it beside the file
    (``summary.json``: ``predictions_score_floor``); None when nothing records it."""
    floor = (_recorded_summary(path) or {}).get("predictions_score_floor")
    return float(floor) if isinstance(floor, (int, float)) else None


def recorded_unreadable(path: Path) -> list[str]:
    """The images inference could not read (``summary.json``: ``unreadable``, paths relative to its --input)."""
    names = (_recorded_summary(path) or {}).get("unreadable")
    return [str(n) for n in names] if isinstance(names, list) else []


def leave_out(gts: dict[Any, Any], names: list[str]) -> list[Any]:
    """Remove ``names`` from ground truth ``gts`` - matched like predictions are (exact key, else the one key with
    that base name), since the names are relative to inference's --input; returns the removed keys."""
    by_base: dict[str, list[Any]] = {}
    for k in gts:
        by_base.setdefault(Path(str(k)).name, []).append(k)
    removed = []
    for name in names:
        cands = [name] if name in gts else by_base.get(Path(name).name, [])
        if len(cands) == 1 and cands[0] in gts:
            removed.append(cands[0])
            del gts[cands[0]]
    return removed


def _warn_if_cut(path: Path, eval_floor: float) -> float | None:
    """Warn (once, one line) when the predictions were cut at a score threshold; returns the cut, if any."""
    floor = recorded_score_floor(path)
    if floor is not None:
        if floor > eval_floor + 1e-9:
            warnings.warn(f"{path.name} holds only detections scoring >= {floor:g} (cut when it was written); mAP "
                          f"counts no lower-scored detections and is underestimated - re-run infer_det_image.py "
                          f"with --threshold {eval_floor:g} or lower", ToolkitWarning, stacklevel=3)
            return floor
        return None
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = rows.get("annotations", []) if isinstance(rows, dict) else rows
    scores = [r["score"] for r in rows if isinstance(r, dict) and isinstance(r.get("score"), (int, float))]
    if scores and min(scores) >= CUT_SUSPECT_SCORE:
        warnings.warn(f"{path.name}: the lowest score is {min(scores):.3g}, so it looks cut at a score threshold "
                      f"(older infer_det_image.py files keep only detections >= --threshold); mAP is underestimated - "
                      f"re-run infer_det_image.py to keep low-scored detections", ToolkitWarning, stacklevel=3)
        return min(scores)
    return None


def _confusion_threshold(recorded_floor: float | None, eval_floor: float) -> float:
    """The score threshold of the confusion matrix of a predictions file: the lowest score its writer kept
    (``recorded_score_floor``: the image command keeps detections down to the model's evaluation threshold, which
    ``evaluate --model`` counts from), else the default evaluation threshold ``eval_floor``."""
    if recorded_floor is not None and 0.0 <= recorded_floor <= 1.0:
        return recorded_floor
    return eval_floor


def evaluate_predictions(predictions: str | os.PathLike, config: str | os.PathLike,
                         metric: str = "all") -> EvalResult:
    """Score the predictions JSON ``predictions`` against the validation split of dataset YAML ``config``.

    A file cut at a score threshold (see ``recorded_score_floor``) is scored as it is, with a warning.
    """
    return evaluate_predictions_report(predictions, config, metric).result


def evaluate_predictions_report(predictions: str | os.PathLike, config: str | os.PathLike,
                                metric: str = "all", score_thresh: float | None = None) -> EvalReport:
    """``evaluate_predictions`` with the confusion matrix (IoU 0.5, at ``_confusion_threshold``) and the F1 curves,
    as ``evaluate --model`` reports them; ``score_floor`` is the score the file was cut at, if it was.
    ``score_thresh``: score only detections above it, as a model's evaluation score threshold does (``--threshold``);
    the matrix then counts from it too, when it is above the file's own floor."""
    from ..data.datasets import load_data_config, load_ground_truth
    from ..modeling.config import DetectorConfig

    if score_thresh is not None and not 0.0 <= score_thresh < 1.0:
        raise UserError(f"--threshold {score_thresh}: a score threshold must be in [0, 1)")
    path = resolve_path(predictions)
    if not path.is_file():
        raise UserError(f"--predictions {predictions} not found; pass a predictions.json written by "
                        f"infer_det_image.py")
    data_cfg = load_data_config(config)
    # Not load_ground_truth(exclude=...): the names inference recorded are relative to its --input and are matched
    # to the ground truth like the predictions are (exact, else unique base name).
    gts = load_ground_truth(data_cfg, split="valid")
    unreadable = leave_out(gts, recorded_unreadable(path))
    if unreadable:
        print(f"note: {len(unreadable)} images inference could not read are not scored (e.g. {unreadable[0]})")
    # predictions.json carries a COCO dataset's own category ids (see inference.images.coco_results)
    preds = predictions_per_image(path, gts, data_cfg.classes,
                                  label_of=data_cfg.label_of if data_cfg.category_ids else None)
    eval_floor = DetectorConfig.__dataclass_fields__["score_thresh"].default
    matrix_floor = _confusion_threshold(recorded_score_floor(path), eval_floor)
    if score_thresh is not None:
        preds = [{k: v[p["scores"] > score_thresh] for k, v in p.items()} for p in preds]
        matrix_floor = max(matrix_floor, score_thresh)
    evaluator = ReportingEvaluator(data_cfg.classes, metric, matrix_floor)
    evaluator.process(preds, list(gts.values()))
    evaluator.evaluate()
    report = evaluator.report()
    assert report is not None  # a single process
    cut = _warn_if_cut(path, eval_floor)
    if cut is not None:
        print(f"note: scored predictions cut at score >= {cut:g}")
    report.score_floor = cut
    return report
