"""Standalone evaluation.

    python -m src.detection.evaluate --model outputs/img_det/run_1/best_model.pth --config detection_configs/voc.yaml
    python -m src.detection.evaluate --predictions outputs/inference/run_1/predictions.json --config <yaml>

The first runs a checkpoint over the validation split; the second scores saved COCO-results-format predictions
(``file_name`` + ``category_id`` = class index in ``CLASSES`` + ``bbox`` [x, y, w, h] + ``score``) without a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .errors import UserError, run_cli
from .runtime import select_device
from .utils import increment_path, resolve_repo_path


def _report(result, out_dir: Path | Callable[[], Path] | None) -> None:
    from .metrics import format_table, save_results

    print(format_table(result))
    if callable(out_dir):  # created only now, so a failed evaluation leaves no empty run folder behind
        out_dir = out_dir()
    if out_dir is not None:
        paths = save_results(result, out_dir)
        print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")


def evaluate_checkpoint(model_path: str, config: str, *, metric: str = "coco", batch: int = 8, workers: int = 2,
                        device: str = "auto", out_dir: str | Path | Callable[[], Path] | None = None, score_thresh: float | None = None,
                        letterbox: bool | None = None):
    """Score a checkpoint on the validation split of ``config``; returns the metrics result."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .datasets import build_dataloader, build_datasets, load_data_config
    from .engine import evaluate

    dev = select_device(device)
    ckpt = load_checkpoint(model_path)
    data_cfg = load_data_config(config)
    classes = list(ckpt["meta"]["classes"])
    if list(data_cfg.classes) != classes:
        raise UserError(f"{config}: CLASSES {data_cfg.classes[1:]} differ from the checkpoint's {classes[1:]}; "
                        f"evaluate with the config the model was trained on")
    model, meta = model_from_checkpoint(ckpt, dev, overrides={"score_thresh": score_thresh})
    imgsz = tuple(meta["imgsz"])
    lb = bool(meta.get("letterbox", False)) if letterbox is None else letterbox
    _, valid_ds = build_datasets(data_cfg, imgsz=imgsz, augment="none", letterbox=lb, splits=("valid",))
    loader = build_dataloader(valid_ds, batch, workers)
    result = evaluate(model, loader, dev, classes, imgsz=imgsz, letterbox=lb, metric=metric)
    _report(result, Path(out_dir) if isinstance(out_dir, (str, Path)) else out_dir)
    return result


def evaluate_predictions(predictions: str, config: str, *, metric: str = "coco",
                         out_dir: str | Path | Callable[[], Path] | None = None):
    """Score a saved predictions JSON against the validation split's XML annotations (no model, no images)."""
    from .datasets import load_data_config, load_ground_truth
    from .metrics import score_predictions_json

    path = resolve_repo_path(predictions)
    if not path.is_file():
        raise UserError(f"--predictions {predictions} not found; pass a predictions.json written by infer_det_image.py")
    data_cfg = load_data_config(config)
    gts = load_ground_truth(data_cfg, split="valid")
    result = score_predictions_json(path, gts, data_cfg.classes, metric=metric)
    _report(result, Path(out_dir) if isinstance(out_dir, (str, Path)) else out_dir)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint (.pth) to evaluate on the validation split")
    src.add_argument("--predictions", help="predictions JSON (COCO results format with file_name) to score")
    p.add_argument("--config", required=True, help="dataset YAML")
    p.add_argument("--metric", default="all", choices=["coco", "voc07", "voc12", "all"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--score-thresh", type=float, default=None, help="override the checkpoint's score threshold")
    p.add_argument("--out-dir", default="outputs/eval", help="parent folder for per_class_ap.csv and plots")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    def out() -> Path:
        return increment_path(args.out_dir, args.name, "eval", exist_ok=True)

    if args.model:
        evaluate_checkpoint(args.model, args.config, metric=args.metric, batch=args.batch, workers=args.workers,
                            device=args.device, out_dir=out, score_thresh=args.score_thresh)
    else:
        evaluate_predictions(args.predictions, args.config, metric=args.metric, out_dir=out)
    return 0


if __name__ == "__main__":
    run_cli(main)
