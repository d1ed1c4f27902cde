"""The shared Predictor (checkpoint -> preprocess -> batched forward -> boxes in original coordinates), the typed
configuration both inference commands share (``PredictConfig``, ``add_predictor_args``, ``build_predictor``) and
the checkpoint-describing flags export shares too (``add_checkpoint_args``, ``checkpoint_claims``).

Public Predictor interface (``OnnxPredictor`` in onnx_runtime.py offers the same): ``classes``, ``meta``,
``input_spec``, ``keep_aspect``, ``score_thresh``, ``batch_size``, ``device``, ``precision``, ``model_timer``,
``input_size(orig_hw)``, ``preprocess(image)``, ``forward(batch)``, ``postprocess(raw, orig_sizes)``,
``predict(images)``, ``describe()``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint.format import (
    REFERENCE_FORMAT,
    describe_weights_source,
    load_checkpoint,
    model_from_checkpoint,
    prepare_checkpoint,
)
from ..core.cli import config_from_args, parse_imgsz
from ..core.errors import UserError
from ..core.paths import resolve_path
from ..core.runtime import PRECISIONS, Stopwatch, autocast_context, inference_precision, select_device

if TYPE_CHECKING:
    from ..modeling.model import InputSpec

# torch.compile backend for ``compile=True`` (tests swap in a counting backend).
COMPILE_BACKEND: Any = "inductor"


class PredictorBase:
    """What every predictor shares: resize through the input spec, map boxes back, batch by input size.

    Subclasses set ``input_spec``, ``keep_aspect``, ``device``, ``batch_size``, ``classes``, ``meta``,
    ``model_timer`` and implement ``forward`` (resized uint8 batch -> detections in input coordinates) and
    ``score_thresh``; PyTorch checkpoints and ONNX exports then preprocess and post-process identically.
    """

    input_spec: InputSpec
    keep_aspect: bool
    device: torch.device
    batch_size: int

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.input_spec.imgsz

    @property
    def letterbox(self) -> bool:
        return self.input_spec.letterbox

    def forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def input_size(self, orig_hw: Sequence[int]) -> tuple[int, int]:
        """Model input size (W, H) for an image of original size (H, W)."""
        return self.input_spec.input_size(orig_hw, self.keep_aspect)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """Original uint8 [3,H,W] -> resized uint8 model input on the device (resized on the GPU when there)."""
        return self.input_spec.preprocess(image.to(self.device, non_blocking=True), self.keep_aspect)

    def postprocess(self, raw: list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to original (H, W) coordinates as float32 CPU tensors."""
        preds = []
        for det, hw in zip(raw, orig_sizes):
            boxes = self.input_spec.boxes_to_original(det["boxes"].float(), hw, self.keep_aspect)
            preds.append({"boxes": boxes.cpu(), "scores": det["scores"].float().cpu(),
                          "labels": det["labels"].to(torch.int64).cpu()})
        return preds

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for original uint8 [3,H,W] images, in their own coordinates (batched by input size)."""
        results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(img.shape[-2:]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                batch = torch.stack([self.preprocess(images[i]) for i in chunk])
                preds = self.postprocess(self.forward(batch), [images[i].shape[-2:] for i in chunk])
                for i, p in zip(chunk, preds):
                    results[i] = p
        return results  # type: ignore[return-value]


class Predictor(PredictorBase):
    """Load a checkpoint once, then ``predict(images)`` -> boxes in the images' original coordinates.

    The checkpoint's input spec (``model.input_spec``: size, letterbox, size multiple, mean/std) drives
    preprocessing and the mapping back, through the same functions the validation loader and ``engine.evaluate``
    use, so the checkpoint alone is enough. ``imgsz``/``letterbox`` override the spec's size/resize mode,
    ``score_thresh``, ``nms``, ``max_det`` the detection settings (None = the checkpoint's, i.e. the evaluation
    ones). ``expect`` holds what the user claimed on the command line (model_name, head, feature_extractor,
    classes): a contradiction with the checkpoint is a UserError; for a reference-project checkpoint, which
    records nothing, they describe the model (see ``checkpoint.adopt_reference_checkpoint``).
    ``keep_aspect``: feed each image at the letterbox scale with padding only up to the model's size multiple
    (faster; not for SSD, whose default boxes need the training aspect ratio).
    """

    def __init__(self, checkpoint: str | os.PathLike | dict, device: str | torch.device = "auto", half: bool = False,
                 imgsz: Sequence[int] | int | None = None, letterbox: bool | None = None,
                 score_thresh: float | None = None, nms: float | None = None, max_det: int | None = None,
                 batch_size: int = 8, precision: str | None = None, keep_aspect: bool | None = None,
                 channels_last: bool | None = None, weights: str | None = None, expect: dict[str, Any] | None = None,
                 compile: bool = False) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        ckpt = prepare_checkpoint(ckpt, expect or {}, imgsz)
        # imgsz is not a model override: the detectors are fully convolutional, and SSD's number of levels is
        # fixed by the training imgsz (part of the weights). A different --imgsz only changes the input resize.
        overrides = {"score_thresh": score_thresh, "nms": nms, "max_det": max_det}
        self.model, self.meta = model_from_checkpoint(ckpt, self.device, overrides, weights=weights)
        self.classes: list[str] = list(self.meta["classes"])
        self.input_spec = self.model.input_spec.with_imgsz(imgsz).replace(letterbox=letterbox)
        self.keep_aspect = bool(keep_aspect)
        if self.keep_aspect:
            self.input_spec.check_keep_aspect()
        self.meta["imgsz"] = self.input_spec.imgsz
        self.meta["input"] = self.input_spec.to_dict()
        self.batch_size = max(1, int(batch_size))
        backbone_params = sum(t.numel() for t in self.model.dino.parameters())
        self.precision = inference_precision(precision, self.device, backbone_params, half)
        # channels_last made the CPU forward slower here (0.3-0.9x, oneDNN reorders); it is the fast layout on CUDA.
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            # The module forward actually calls: torchvision's detector runs self.backbone (DINOv3 + neck); the
            # box decoding / NMS after it is data-dependent Python that compiles to nothing useful.
            self.model.backbone.compile(backend=COMPILE_BACKEND, dynamic=False)
        self.model_timer = Stopwatch(self.device)

    # ------------------------------------------------------------------ settings
    @property
    def score_thresh(self) -> float:
        """Lowest score the model returns (its post-processing threshold)."""
        return float(self.model.score_thresh)

    def _autocast(self):
        return autocast_context(self.device, self.precision)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detector forward on a resized uint8 batch [B,3,h,w]; boxes in input coordinates. Timed (synced)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self.model_timer.time(len(batch)), self._autocast():
            out = self.model(batch)
        return out

    def describe(self) -> str:
        m, spec = self.meta, self.input_spec
        mode = "letterbox scale, aspect-preserving input" if self.keep_aspect else (
            "letterbox" if spec.letterbox else "stretch")
        source = ", reference-project checkpoint" if m.get("source") == REFERENCE_FORMAT else ""
        if "weights_source" in m:  # reference-project checkpoints record none
            source += f", backbone from {describe_weights_source(m['weights_source'])}"
        return (f"{m.get('model_name')} + {m.get('head')} ({m.get('feature_extractor')}{source}), "
                f"{len(self.classes) - 1} classes, imgsz {spec.imgsz[0]}x{spec.imgsz[1]} {mode}, "
                f"mean {tuple(round(v, 3) for v in spec.mean)}, {self.device} {self.precision}")


def filter_detections(pred: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The detections of ``pred`` scoring at least ``threshold`` (what is drawn / written as labels)."""
    keep = pred["scores"] >= threshold
    return {k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v for k, v in pred.items()}


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class PredictConfig:
    """Options shared by the image and video commands (``add_predictor_args`` defines the flags)."""

    model: str
    threshold: float = 0.5
    imgsz: tuple[int, int] | None = None
    model_name: str | None = None
    config: str | None = None
    head: str | None = None
    feature_extractor: str | None = None
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    half: bool = False
    batch: int | None = None
    letterbox: bool | None = None
    keep_aspect: bool = False
    nms: float | None = None
    max_det: int | None = None
    compile: bool = False
    out_dir: str | None = None
    show: bool = False
    no_save: bool = False

    def __post_init__(self) -> None:
        if self.imgsz is not None:
            self.imgsz = parse_imgsz(self.imgsz)
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise UserError(f"--threshold {self.threshold}: a score threshold is in [0, 1]")
        if self.batch is not None and int(self.batch) < 1:
            raise UserError(f"--batch {self.batch}: at least 1")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not valid; use one of {', '.join(PRECISIONS)}")

    def expect(self) -> dict[str, Any]:
        """What the flags claim about the model (checked against / describing the checkpoint)."""
        return checkpoint_claims(self)

    def resolved_out_dir(self) -> Path | None:
        """``--out-dir`` relative to the working directory first, then the repository root."""
        return resolve_path(self.out_dir) if self.out_dir else None


def predict_config_from_args(args: argparse.Namespace) -> PredictConfig:
    return config_from_args(PredictConfig, args)


def add_predictor_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by infer_det_image.py and infer_det_video.py (the reference's names first)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="detector checkpoint (.pth from train_detection.py or the reference project; .onnx export)")
    g.add_argument("--threshold", "--score-thresh", dest="threshold", type=float, default=0.5,
                   help="minimum score of a drawn detection (and of saved label files)")
    g.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="N",
                   help="model input size W [H]; default: the checkpoint's (reference checkpoints: 640)")
    add_checkpoint_args(g)
    g.add_argument("--nms", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's)")
    g.add_argument("--max-det", type=int, default=None, help="max detections per image (default: the checkpoint's)")
    g.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's letterbox/stretch resize (default: as trained)")
    g.add_argument("--keep-aspect", action="store_true",
                   help="faster: letterbox scale with padding only to the model's size multiple (not for SSD)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision; auto = fp32 on CUDA (fp16 with --half), bf16 on CPUs with native "
                        "bf16 for backbones >= 20M parameters, else fp32")
    g.add_argument("--half", action="store_true", help="fp16 autocast on CUDA (same as --precision fp16)")
    g.add_argument("--batch", type=int, default=None, help="images per forward (default: 8 on CUDA, 1 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone + neck (slow first batch)")
    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=None,
                   help="output folder, relative to the working directory (default: outputs/inference/<run>_N)")
    g.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    g.add_argument("--no-save", action="store_true", help="do not write annotated images/video")


def add_checkpoint_args(group: Any) -> None:
    """Add to ``group`` (a parser or argument group) what a command that loads a checkpoint may be told about the
    model (inference, export): the same flags with the same meaning everywhere. They are checked against our
    checkpoints and describe reference-project ones, which record nothing; ``checkpoint_claims`` turns the parsed
    values into ``prepare_checkpoint``'s ``expect``."""
    from ..modeling.model import FEATURE_EXTRACTORS, HEADS

    group.add_argument("--model-name", default=None,
                       help="backbone name; checked against the checkpoint, required for reference-project ones")
    group.add_argument("--config", default=None,
                       help="dataset YAML (any form train_detection.py takes; its image folders need not exist): its "
                            "classes are checked against the checkpoint; required for reference-project ones")
    group.add_argument("--head", default=None, help=f"{' | '.join(HEADS)}; checked against the checkpoint")
    group.add_argument("--feature-extractor", default=None,
                       help=f"{' | '.join(FEATURE_EXTRACTORS)}; checked against the checkpoint")
    group.add_argument("--weights", default=None,
                       help="backbone weights; only needed for checkpoints saved without the backbone")


def checkpoint_claims(cfg: Any) -> dict[str, Any]:
    """What ``add_checkpoint_args``' flags (fields of ``cfg``) claim about the model; classes read from ``--config``
    (``__background__`` first, the form checkpoints record)."""
    from ..data.datasets import load_config_classes

    config = getattr(cfg, "config", None)
    return {"model_name": getattr(cfg, "model_name", None), "head": getattr(cfg, "head", None),
            "feature_extractor": getattr(cfg, "feature_extractor", None),
            "classes": load_config_classes(config) if config else None}


def build_predictor(cfg: PredictConfig, keep_low_scores: bool = False, verbose: bool = True):
    """The predictor ``cfg`` describes: a ``Predictor`` for a .pth, an ``OnnxPredictor`` for a .onnx file.

    By default the model returns detections down to ``cfg.threshold``; ``keep_low_scores`` keeps them down to the
    checkpoint's evaluation score threshold (for predictions files that score like ``evaluate --model``) - then
    filter with ``filter_detections(pred, cfg.threshold)`` before drawing.
    """
    if str(cfg.model).lower().endswith(".onnx"):
        try:
            from .onnx_runtime import OnnxPredictor
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith("onnx_runtime"):
                raise UserError(f"--model {cfg.model}: ONNX models are not supported by this installation; pass a "
                                f".pth checkpoint") from None
            raise UserError(f"--model {cfg.model}: ONNX inference needs the {exc.name} package "
                            f"(pip install -r requirements.txt)") from None
        predictor = OnnxPredictor.from_config(cfg, keep_low_scores=keep_low_scores)
    else:
        predictor = _build_torch_predictor(cfg, keep_low_scores)
    if verbose:
        print(f"model: {predictor.describe()}")
    return predictor


def _build_torch_predictor(cfg: PredictConfig, keep_low_scores: bool) -> Predictor:
    device = select_device(cfg.device)
    if cfg.half and device.type != "cuda" and cfg.precision == "auto":
        print("note: --half is for CUDA; on CPU it means bf16 autocast where the CPU supports it")
    batch = cfg.batch or (8 if device.type == "cuda" else 1)
    ckpt = prepare_checkpoint(load_checkpoint(resolve_path(cfg.model)), cfg.expect(), cfg.imgsz)
    weights = cfg.weights
    if weights and ckpt["meta"].get("includes_backbone", True):
        print(f"note: --weights {weights} ignored: the checkpoint already contains the backbone weights")
        weights = None
    eval_thresh = float(ckpt["meta"].get("score_thresh", cfg.threshold))
    score_thresh = min(cfg.threshold, eval_thresh) if keep_low_scores else cfg.threshold
    return Predictor(ckpt, device=device, half=cfg.half, imgsz=cfg.imgsz, letterbox=cfg.letterbox,
                     score_thresh=score_thresh, nms=cfg.nms, max_det=cfg.max_det, batch_size=batch,
                     precision=cfg.precision, keep_aspect=cfg.keep_aspect, weights=weights, compile=cfg.compile)


def display_available() -> tuple[bool, str]:
    """Whether ``cv2.imshow`` can open a window here, and why not."""
    import cv2

    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and "NONE" in gui[0].upper():
        return False, "this OpenCV build has no GUI support (opencv-python-headless); pip install opencv-python"
    return True, ""
