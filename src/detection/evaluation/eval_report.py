"""One evaluation pass's full report: the metrics, a confusion matrix (IoU 0.5, one score threshold), the
F1-confidence curves with the best score threshold, and optionally the predictions of a few images for a picture
(``ReportingEvaluator`` -> ``EvalReport``).

Every scoring path builds it the same way: training's evaluation and ``evaluate --model`` feed it a model's
predictions with the loader's targets, ``evaluate --predictions`` the rows of a predictions file grouped per image
with the dataset's ground truth (``predictions.evaluate_predictions_report``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .confusion import ConfusionMatrix
from .evaluator import EvaluatorGroup
from .metrics import DetectionEvaluator, EvalResult
from .mosaic import PredictionSample
from .thresholds import F1Curves, f1_curves_from_evaluator

CONFUSION_IOU = 0.5


@dataclass
class EvalReport:
    """One evaluation pass: the metrics, the confusion matrix, the F1 curves (best threshold) and the sampled
    predictions (``{image_id: (prediction, ground truth)}``, original coordinates). ``score_floor``: the predictions
    held no detection scoring below it (a predictions file cut at a score threshold), so the F1 curves below it
    are not meaningful; None for a model's own pass."""

    result: EvalResult
    confusion: ConfusionMatrix
    f1: F1Curves
    samples: dict[int, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    score_floor: float | None = None

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """confusion_matrix.png/.csv, confusion_matrix_normalized.csv, f1_curve.png/.csv in ``out_dir``."""
        return [*self.confusion.save(out_dir), *self.f1.save(out_dir)]

    def threshold_meta(self) -> dict[str, float]:
        """The model-card keys that record the best threshold (``checkpoint.card``)."""
        return {"best_threshold": self.f1.best_threshold, "best_threshold_f1": self.f1.best_f1}


class ReportingEvaluator(EvaluatorGroup):
    """The metrics (``DetectionEvaluator``), a ``ConfusionMatrix`` at IoU 0.5 and ``score_thresh``, and a
    ``PredictionSample`` of ``sample_ids``, fed by one pass; ``report()`` after ``evaluate()``."""

    def __init__(self, classes: Sequence[str], metric: str, score_thresh: float, sample_ids: Sequence[int] = ()
                 ) -> None:
        self.detection = DetectionEvaluator(classes, metric=metric)
        self.confusion = ConfusionMatrix(classes, score_thresh=score_thresh, iou_thresh=CONFUSION_IOU)
        self.sample = PredictionSample(sample_ids)
        super().__init__(self.detection, self.confusion, self.sample)

    def report(self) -> EvalReport | None:
        """The last pass's report on rank 0 (None elsewhere: the results were gathered there)."""
        if self.results[0] is None:
            return None
        return EvalReport(self.results[0], self.confusion, f1_curves_from_evaluator(self.detection),
                          self.results[2] or {})
