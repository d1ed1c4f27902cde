"""Standalone evaluation.

    python -m src.detection.evaluate --model outputs/img_det/run_1/best_model.pth --config detection_configs/voc.yaml
    python -m src.detection.evaluate --predictions outputs/inference/run_1/predictions.json --config <yaml>

The first runs a checkpoint over the validation split exactly as training evaluated it (same resize op, same box
mapping, same precision), so it reproduces the run's results.csv; the second scores saved COCO-results-format
predictions (``file_name`` + ``category_id`` + ``bbox`` [x, y, w, h] + ``score``) without a model; ``category_id``
is the class index in ``CLASSES``, or for a COCO dataset its own category id (as infer_det_image.py writes it).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.cli import config_from_args, new_parser, parse_imgsz
from ..core.errors import ToolkitWarning, UserError, run_cli
from ..core.paths import increment_path, resolve_path
from ..core.runtime import PRECISIONS, amp_settings, inference_precision, select_device

METRICS = ("coco", "voc07", "voc12", "all")
# A predictions file whose lowest score is above this was most likely cut at a display threshold.
CUT_SUSPECT_SCORE = 0.25


@dataclass
class EvalConfig:
    """Options of ``python -m src.detection.evaluate`` (one of ``model`` / ``predictions``)."""

    config: str
    model: str | None = None
    predictions: str | None = None
    metric: str = "all"
    batch: int = 8
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    threshold: float | None = None
    out_dir: str | None = "outputs/eval"
    name: str | None = None
    model_name: str | None = None  # reference-project checkpoints only (they record no model description)
    head: str | None = None
    imgsz: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.predictions is None):
            raise UserError("pass exactly one of --model (a checkpoint) or --predictions (a predictions JSON)")
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
        if self.imgsz is not None:
            self.imgsz = parse_imgsz(self.imgsz)


def _report(result, out_dir: Path | Callable[[], Path] | None) -> None:
    from ..evaluation.report import format_table, save_results

    print(format_table(result))
    if callable(out_dir):  # created only now, so a failed evaluation leaves no empty run folder behind
        out_dir = out_dir()
    if out_dir is not None:
        paths = save_results(result, out_dir)
        print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")


def _training_options(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The training run's recorded options (``train_config``, or ``args`` in older checkpoints); {} if none."""
    for key in ("train_config", "args"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return {}


def _training_precision(ckpt: dict[str, Any], device) -> str | None:
    """The precision the training run evaluated in (its recorded ``--precision``/``--amp``), if it runs here."""
    train = _training_options(ckpt)
    amp = train.get("precision", train.get("amp"))
    if amp is None:
        return None
    try:
        dtype, _ = amp_settings(amp, device)
    except UserError:  # e.g. fp16 training evaluated on a CPU: fall back to the inference rule
        return None
    return {None: "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(None if dtype is None else str(dtype))


def evaluate_checkpoint(cfg: EvalConfig, *, out_dir: str | Path | Callable[[], Path] | None = None):
    """Score a checkpoint on the validation split of ``cfg.config``; returns the metrics result.

    The same path as training's per-epoch evaluation: the validation loader resizes with the checkpoint's
    ``InputSpec`` (``ResizeTo``), ``engine.evaluate`` maps boxes back with it, at the training run's evaluation
    precision (``--precision auto``; explicit values override).
    """
    from ..checkpoint.format import load_checkpoint, model_from_checkpoint, prepare_checkpoint
    from ..data.datasets import build_dataloader, build_datasets, load_data_config
    from ..engine.loop import evaluate

    dev = select_device(cfg.device)
    ckpt = load_checkpoint(resolve_path(cfg.model))
    data_cfg = load_data_config(cfg.config)
    ckpt = prepare_checkpoint(ckpt, {"model_name": cfg.model_name, "head": cfg.head}
                              | ({"classes": data_cfg.classes} if ckpt.get("meta") is None else {}), cfg.imgsz)
    classes = list(ckpt["meta"]["classes"])
    if list(data_cfg.classes) != classes:
        raise UserError(f"{cfg.config}: CLASSES {data_cfg.classes[1:]} differ from the checkpoint's {classes[1:]}; "
                        f"evaluate with the config the model was trained on")
    model, _ = model_from_checkpoint(ckpt, dev, overrides={"score_thresh": cfg.threshold})
    spec = model.input_spec.with_imgsz(cfg.imgsz)
    precision = cfg.precision
    if precision == "auto":
        precision = _training_precision(ckpt, dev) or "auto"
    precision = inference_precision(precision, dev, sum(p.numel() for p in model.dino.parameters()))
    args = _training_options(ckpt)
    _, valid_ds = build_datasets(data_cfg, imgsz=spec.imgsz, augment="none", letterbox=spec.letterbox,
                                 ignore_unknown_classes=args.get("ignore_unknown_classes") or None,
                                 skip_bad_samples=args.get("skip_bad_samples") or None, splits=("valid",))
    loader = build_dataloader(valid_ds, cfg.batch, cfg.workers)
    result = evaluate(model, loader, dev, classes, spec=spec, metric=cfg.metric, amp_dtype=precision)
    _report(result, Path(out_dir) if isinstance(out_dir, (str, Path)) else out_dir)
    return result


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
                          f"with --threshold {eval_floor:g} or lower", ToolkitWarning, stacklevel=2)
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
                      f"re-run infer_det_image.py to keep low-scored detections", ToolkitWarning, stacklevel=2)
        return min(scores)
    return None


def evaluate_predictions(cfg: EvalConfig, *, out_dir: str | Path | Callable[[], Path] | None = None):
    """Score a saved predictions JSON against the validation split's annotations (no model, no images).

    A file cut at a score threshold (see ``recorded_score_floor``) is scored as it is, with a warning.
    """
    from ..data.datasets import load_data_config, load_ground_truth
    from ..evaluation.metrics import score_predictions_json
    from ..modeling.model import DetectorConfig

    path = resolve_path(cfg.predictions)
    if not path.is_file():
        raise UserError(f"--predictions {cfg.predictions} not found; pass a predictions.json written by "
                        f"infer_det_image.py")
    data_cfg = load_data_config(cfg.config)
    # Not load_ground_truth(exclude=...): the names inference recorded are relative to its --input and are matched
    # to the ground truth like the predictions are (exact, else unique base name).
    gts = load_ground_truth(data_cfg, split="valid")
    unreadable = leave_out(gts, recorded_unreadable(path))
    if unreadable:
        print(f"note: {len(unreadable)} images inference could not read are not scored (e.g. {unreadable[0]})")
    # predictions.json carries a COCO dataset's own category ids (see infer_image.coco_results)
    result = score_predictions_json(path, gts, data_cfg.classes, metric=cfg.metric,
                                    label_of=data_cfg.label_of if data_cfg.category_ids else None)
    cut = _warn_if_cut(path, DetectorConfig.__dataclass_fields__["score_thresh"].default)
    if cut is not None:
        print(f"note: scored predictions cut at score >= {cut:g}")
    _report(result, Path(out_dir) if isinstance(out_dir, (str, Path)) else out_dir)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint (.pth) to evaluate on the validation split")
    src.add_argument("--predictions", help="predictions JSON (COCO results format with file_name) to score")
    p.add_argument("--config", required=True, help="dataset YAML (its validation split is scored)")
    p.add_argument("--metric", default="all", choices=METRICS, help="COCO mAP, Pascal VOC07/VOC12 AP@.5, or all")
    p.add_argument("--batch", type=int, default=8, help="images per forward (--model)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (--model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (--model)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision (--model); auto = what the training run evaluated with")
    p.add_argument("--threshold", "--score-thresh", dest="threshold", type=float, default=None,
                   help="override the checkpoint's evaluation score threshold (--model)")
    p.add_argument("--out-dir", default="outputs/eval",
                   help="parent folder of the result folder (per_class_ap.csv, plots), relative to the working "
                        "directory")
    p.add_argument("--name", default=None, help="result folder name (default: eval_N)")
    g = p.add_argument_group("reference-project checkpoints (they record no model description)")
    g.add_argument("--model-name", default=None, help="backbone entry point the reference run used")
    g.add_argument("--head", default=None, help="retinanet | ssd (default: read from the weights)")
    g.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="N", help="W [H] (reference default 640)")
    return p



def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    return config_from_args(EvalConfig, args)


def main() -> int:
    cfg = eval_config_from_args(build_parser().parse_args())

    def out() -> Path:
        return increment_path(resolve_path(cfg.out_dir), cfg.name, "eval", exist_ok=True)

    if cfg.model:
        evaluate_checkpoint(cfg, out_dir=out)
    else:
        evaluate_predictions(cfg, out_dir=out)
    return 0


if __name__ == "__main__":
    run_cli(main)
