"""Scoring a checkpoint on a dataset's validation split, exactly as training evaluated it: ``evaluate --model`` and
training's ``--eval-only``.

The validation loader resizes with the checkpoint's input spec (``ResizeTo``), ``loop.evaluate`` maps boxes back
with it and feeds the evaluator, at the training run's evaluation precision (``--precision auto``; explicit values
override), so the result reproduces the run's results.csv.

The same pass also fills a confusion matrix (IoU 0.5, the model's evaluation score threshold), the F1-confidence
curves with the best score threshold, and optionally keeps the predictions of a few images for a picture
(``evaluation.eval_report``: ``ReportingEvaluator`` -> ``EvalReport``): training and ``evaluate --model`` both write
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.source import ModelSource
from ..core.cli import RuntimeOptions, check_choice
from ..core.errors import UserError
from ..core.paths import resolve_path
from ..core.runtime import amp_settings, inference_precision, select_device
from ..evaluation.eval_report import EvalReport, ReportingEvaluator
from ..evaluation.metrics import METRICS, EvalResult


@dataclass
class EvalConfig:
    """What ``evaluate_checkpoint`` scores: ``source`` (the checkpoint and claims about it) on the validation split
    of dataset ``config`` (None: the dataset the checkpoint's training run recorded). ``score_thresh`` None keeps the
    checkpoint's evaluation score threshold."""

    config: str | None
    source: ModelSource
    metric: str = "all"
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(batch=8, workers=2))
    score_thresh: float | None = None

    def __post_init__(self) -> None:
        if not self.source.model:
            raise UserError("pass --model <checkpoint.pth> to evaluate")
        if str(self.source.model).lower().endswith(".onnx"):  # the scorer runs the PyTorch model as training did
            raise UserError(f"--model {self.source.model}: an ONNX model is scored in two steps: python "
                            f"infer_det_image.py --model {self.source.model} -i <validation images> --no-save, then "
                            f"python -m src.detection.evaluate --predictions <its output folder>/predictions.json "
                            f"--config <dataset.yaml>")
        check_choice("--metric", self.metric, METRICS)


def _training_precision(train: dict[str, Any], device) -> str | None:
    """The precision a training run with recorded options ``train`` evaluated in, if it runs here."""
    amp = train.get("precision")
    if amp is None:
        return None
    try:
        dtype, _ = amp_settings(amp, device)
    except UserError:  # e.g. fp16 training evaluated on a CPU: fall back to the inference rule
        return None
    return {None: "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(None if dtype is None else str(dtype))


def dataset_config(config: str | None, payload: dict[str, Any]) -> str:
    """The dataset YAML to score on: ``config``, else the one the checkpoint's training run recorded (said in the
    log, so a default never passes silently)."""
    if config:
        return config
    from ..checkpoint import training_options

    recorded = training_options(payload).get("config")
    if not recorded:
        raise UserError(f"{payload.get('path', 'the checkpoint')} records no dataset; pass --config <dataset.yaml>")
    print(f"--config not given: using the dataset the checkpoint was trained on, {recorded}")
    return str(recorded)


def evaluate_checkpoint(cfg: EvalConfig) -> EvalResult:
    """Score ``cfg.source`` on the validation split of ``cfg.config``; returns the metrics result."""
    return evaluate_checkpoint_report(cfg).result


def evaluate_checkpoint_report(cfg: EvalConfig) -> EvalReport:
    """``evaluate_checkpoint`` with the confusion matrix and F1 curves of the same pass."""
    from ..checkpoint import build_model, load_checkpoint, prepare_checkpoint, training_options
    from ..data.datasets import build_dataloader, build_datasets, load_data_config
    from ..data.device_resize import deferred_view
    from .loop import evaluate

    src, run = cfg.source, cfg.runtime
    dev = select_device(run.device)
    payload = load_checkpoint(resolve_path(src.model))
    data_cfg = load_data_config(dataset_config(cfg.config, payload))
    # the dataset's classes are a claim --config cannot drop: checked against our checkpoints, describing reference ones
    ckpt = prepare_checkpoint(payload, src.expect(classes=data_cfg.classes), src.imgsz, required=("classes",))
    classes = ckpt.card.classes
    model = build_model(ckpt, dev, overrides={"score_thresh": cfg.score_thresh}, weights=src.weights)
    spec = model.input_spec.with_imgsz(src.imgsz)
    train = training_options(ckpt.payload)
    precision = run.precision
    if precision == "auto":
        precision = _training_precision(train, dev) or "auto"
    precision = inference_precision(precision, dev, sum(p.numel() for p in model.dino.parameters()))
    _, valid_ds = build_datasets(data_cfg, imgsz=spec.imgsz, augment="none", letterbox=spec.letterbox,
                                 ignore_unknown_classes=train.get("ignore_unknown_classes") or None,
                                 skip_bad_samples=train.get("skip_bad_samples") or None, splits=("valid",))
    if dev.type == "cuda":  # the loader workers only decode; the GPU resizes in batches
        valid_ds = deferred_view(valid_ds) or valid_ds
    loader = build_dataloader(valid_ds, run.batch or 8, run.workers or 0)
    evaluator = ReportingEvaluator(classes, cfg.metric, float(model.score_thresh))
    evaluate(model, loader, dev, classes, spec=spec, evaluator=evaluator, amp_dtype=precision)
    report = evaluator.report()
    assert report is not None  # a single process
    return report
