"""Standalone evaluation.

    python -m src.detection.evaluate --model outputs/img_det/run_1/best_model.pth --config detection_configs/voc.yaml
    python -m src.detection.evaluate --predictions outputs/inference/run_1/predictions.json --config <yaml>

The first runs a checkpoint over the validation split exactly as training evaluated it (same resize op, same box
mapping, same precision), so it reproduces the run's results.csv; the second scores saved COCO-results-format
predictions (``file_name`` + ``category_id`` + ``bbox`` [x, y, w, h] + ``score``) without a model; ``category_id``
is the class index in ``CLASSES``, or for a COCO dataset its own category id (as infer_det_image.py writes it).

Both print the metrics table and the best score threshold (highest F1 over all classes at IoU 0.5), and write into
a new result folder per_class_ap.csv, the per-class AP and PR-curve plots, the confusion matrix at IoU 0.5
(confusion_matrix.png/.csv, confusion_matrix_normalized.csv) and the F1-threshold curves (f1_curve.png/.csv). The
matrix counts detections scoring at least the model's evaluation threshold (--model) or the lowest score the
predictions file was written with (--predictions; the default evaluation threshold when nothing records it). For a
predictions file cut at a score threshold, the best-threshold line says that the curve below the cut is not
meaningful.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.source import ModelSource
from ..core.choices import METRICS
from ..core.cli import OutputOptions, RuntimeOptions, new_parser
from ..core.errors import run_cli

if TYPE_CHECKING:  # imported where used: after parsing, so --help and flag errors skip them
    from ..engine.evaluation import EvalConfig
    from ..evaluation.eval_report import EvalReport
    from ..evaluation.metrics import EvalResult


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint (.pth) to evaluate on the validation split")
    src.add_argument("--predictions", help="predictions JSON (COCO results format with file_name) to score")
    p.add_argument("--config", required=True, help="dataset YAML (its validation split is scored)")
    p.add_argument("--metric", default="all", choices=METRICS, help="COCO mAP, Pascal VOC07/VOC12 AP@.5, or all")
    p.add_argument("--threshold", "--score-thresh", dest="threshold", type=float, default=None,
                   help="evaluation score threshold: --model, instead of the checkpoint's; --predictions, score "
                        "only the detections above it")
    OutputOptions.add_to(p, out_dir="outputs/eval", name_help="result folder name (default: eval_N)",
                         out_dir_help="parent folder of the result folder (per_class_ap.csv, plots), relative to "
                                      "the working directory")
    g = p.add_argument_group("runtime (--model)")
    RuntimeOptions.add_to(g, precision_help="autocast precision; auto = what the training run evaluated with",
                          batch=8, batch_help="images per forward", workers=2)
    g = p.add_argument_group("the checkpoint's model (--model; needed for reference-project checkpoints, which "
                             "record no model description)")
    ModelSource.add_to(g, model_help=None, config=False)
    return p


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The ``--model`` evaluation a parsed command line describes (its ``--config`` is the dataset, not a claim)."""
    from ..engine.evaluation import EvalConfig

    return EvalConfig(config=args.config, source=ModelSource.from_args(args, config=None), metric=args.metric,
                      runtime=RuntimeOptions.from_args(args), score_thresh=args.threshold)


def report(result: EvalResult, out: OutputOptions | None, evaluation: EvalReport | None = None) -> None:
    """Print the table; write per_class_ap.csv and the plots into a new result folder under ``out`` (with
    ``evaluation``: also the confusion matrix and the F1 curve, and the best threshold line)."""
    from ..evaluation.report import format_table, save_results

    print(format_table(result))
    if evaluation is not None:
        notes = [f"IoU 0.5; inference: --threshold {evaluation.f1.best_threshold:.3f}"] if evaluation.f1.found else []
        floor = evaluation.score_floor
        if floor is not None:  # F1 at a threshold t counts only detections >= t: exact above the cut, unknown below
            notes.append(f"the predictions hold no detection scoring below {floor:g}, so the F1 curve below it is "
                         f"not meaningful and a lower threshold may do better")
        print(evaluation.f1.describe() + (f" ({'; '.join(notes)})" if notes else ""))
    if out is not None:
        out_dir: Path = out.run_dir("eval")  # created only now: a failed evaluation leaves no folder behind
        paths = save_results(result, out_dir)
        if evaluation is not None:
            paths += evaluation.save(out_dir)
        print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..engine.evaluation import evaluate_checkpoint_report
    from ..evaluation.predictions import evaluate_predictions_report

    if args.model:
        evaluation = evaluate_checkpoint_report(eval_config_from_args(args))
    else:
        evaluation = evaluate_predictions_report(args.predictions, args.config, args.metric, args.threshold)
    report(evaluation.result, OutputOptions.from_args(args, exist_ok=True), evaluation)
    return 0


if __name__ == "__main__":
    run_cli(main)
