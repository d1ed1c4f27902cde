"""The PyTorch ``Predictor`` (checkpoint -> preprocess -> batched forward -> boxes in original coordinates), the
typed configuration both inference commands share (``PredictConfig``, ``add_predictor_args``, ``build_predictor``)
and the checkpoint-describing flags export shares too (``add_checkpoint_args``, ``checkpoint_claims``).

``build_predictor`` returns a ``Predictor`` for a ``.pth`` and an ``onnx_runtime.OnnxPredictor`` for a ``.onnx``;
both follow ``base.PredictorBase``'s interface.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.build import PreparedCheckpoint, build_model, prepare_checkpoint
from ..checkpoint.card import describe_weights_source
from ..checkpoint.source import ModelSource
from ..core.cli import RuntimeOptions, config_from_args, parse_imgsz
from ..core.errors import UserError
from ..core.graphs import GraphedFunction, graphs_supported
from ..core.paths import resolve_path
from ..core.runtime import PRECISIONS, Stopwatch, autocast_context, inference_precision, select_device
from .base import PredictorBase, score_floor


class Predictor(PredictorBase):
    """Load a checkpoint once, then ``predict(images)`` -> boxes in the images' original coordinates.

    ``checkpoint``: a path, a payload (``checkpoint.load_checkpoint``) or a ``checkpoint.PreparedCheckpoint``, which
    is used as it is (``expect`` and ``imgsz`` were applied when it was prepared); a path or payload is prepared
    here, once. ``expect`` holds what the user claimed on the command line (model_name, head, feature_extractor,
    classes): a contradiction with the checkpoint is a UserError; for a reference-project checkpoint, which
    records nothing, they describe the model (see ``checkpoint.reference_card``).

    The checkpoint's input spec (``model.input_spec``: size, letterbox, size multiple, mean/std) drives
    preprocessing and the mapping back, through the same functions the validation loader and ``engine.evaluate``
    use, so the checkpoint alone is enough. ``imgsz``/``letterbox`` override the spec's size/resize mode,
    ``score_thresh``, ``nms``, ``max_det`` the detection settings (None = the checkpoint's, i.e. the evaluation
    ones). ``keep_aspect``: feed each image at the letterbox scale with padding only up to the model's size multiple
    (faster; not for SSD, whose default boxes need the training aspect ratio). ``compile``: torch.compile the
    backbone + neck, True with the inductor backend, else with ``compile`` as the backend (a name or callable).
    ``cuda_graphs``: replay the fixed-shape forward from a CUDA graph per input shape (default: on CUDA unless
    ``compile``; see ``core.graphs``).
    """

    def __init__(self, checkpoint: str | os.PathLike | dict | PreparedCheckpoint, device: str | torch.device = "auto",
                 imgsz: Sequence[int] | int | None = None, letterbox: bool | None = None,
                 score_thresh: float | None = None, nms: float | None = None, max_det: int | None = None,
                 batch_size: int = 8, precision: str | None = None, keep_aspect: bool | None = None,
                 channels_last: bool | None = None, weights: str | None = None, expect: dict[str, Any] | None = None,
                 compile: bool | str | Any = False, cuda_graphs: bool | None = None) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        ckpt = (checkpoint if isinstance(checkpoint, PreparedCheckpoint)
                else prepare_checkpoint(checkpoint, expect, imgsz))
        # imgsz is not a model override: the detectors are fully convolutional, and SSD's number of levels is
        # fixed by the training imgsz (part of the weights). A different --imgsz only changes the input resize.
        overrides = {"score_thresh": score_thresh, "nms": nms, "max_det": max_det}
        self.model = build_model(ckpt, self.device, overrides, weights=weights)
        self.input_spec = self.model.input_spec.with_imgsz(imgsz).replace(letterbox=letterbox)
        self.keep_aspect = bool(keep_aspect)
        if self.keep_aspect:
            self.input_spec.check_keep_aspect()
        self.card = ckpt.card.with_input(self.input_spec)
        self.classes: list[str] = self.card.classes
        self.batch_size = max(1, int(batch_size))
        backbone_params = sum(t.numel() for t in self.model.dino.parameters())
        self.precision = inference_precision(precision, self.device, backbone_params)
        # channels_last made the CPU forward slower here (0.3-0.9x, oneDNN reorders); it is the fast layout on CUDA.
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            # The module forward actually calls: torchvision's detector runs self.backbone (DINOv3 + neck); the
            # box decoding / NMS after it is data-dependent Python that compiles to nothing useful.
            self.model.backbone.compile(backend="inductor" if compile is True else compile, dynamic=False)
        # CUDA graphs for the fixed-shape part (normalize, backbone, neck, head): one launch instead of hundreds,
        # which is what batch-1 latency on a GPU is made of. Post-processing (data-dependent sizes) stays eager.
        use_graphs = graphs_supported(self.device) and not compile if cuda_graphs is None else bool(cuda_graphs)
        self.cuda_graphs = use_graphs and graphs_supported(self.device)
        self._head_forward = (GraphedFunction(self.model.head_forward, name="detector forward",
                                              context=lambda: autocast_context(self.device, self.precision, cache=False))
                              if self.cuda_graphs else None)
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
        with self.model_timer.time(len(batch)):
            if self._head_forward is not None:  # autocast is the graph's own (its cache off, as capture needs)
                return self.model.detect(self._head_forward(batch), batch.shape[-2:])
            with self._autocast():
                return self.model(batch)

    def describe(self) -> str:
        d, spec, prov = self.card.detector, self.input_spec, self.card.provenance
        if prov.is_reference:  # a reference checkpoint records no backbone source
            source = ", reference-project checkpoint"
        else:
            source = f", backbone from {describe_weights_source(prov.weights_source)}"
        return (f"{d.model_name} + {d.head} ({d.feature_extractor}{source}), "
                f"{len(self.classes) - 1} classes, imgsz {spec.imgsz[0]}x{spec.imgsz[1]} {self._mode()}, "
                f"mean {tuple(round(v, 3) for v in spec.mean)}, {self.device} {self.precision}")


def filter_detections(pred: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The detections of ``pred`` scoring at least ``threshold`` (what is drawn / written as labels)."""
    keep = pred["scores"] >= threshold
    return {k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v for k, v in pred.items()}


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class PredictConfig:
    """Options shared by the image and video commands (``add_predictor_args`` defines the flags).

    ``threshold``: the score a detection needs to be drawn, written to label files and counted; the model itself
    returns detections down to the checkpoint's evaluation threshold for predictions.json (``build_predictor``).
    ``"auto"``: the checkpoint's best-F1 threshold (``build_predictor`` replaces it by the number).
    ``slice`` (W, H): run on overlapping tiles of that size (``slicing.SlicedPredictor``), ``slice_overlap`` apart,
    plus the whole image with ``slice_full``, merged by ``slice_merge``.
    """

    model: str
    threshold: float | str = 0.5
    imgsz: tuple[int, int] | None = None
    model_name: str | None = None
    config: str | None = None
    head: str | None = None
    feature_extractor: str | None = None
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch: int | None = None
    letterbox: bool | None = None
    keep_aspect: bool = False
    nms: float | None = None
    max_det: int | None = None
    compile: bool = False
    cuda_graphs: bool | None = None
    out_dir: str | None = None
    show: bool = False
    no_save: bool = False
    slice: tuple[int, int] | None = None
    slice_overlap: float = 0.2
    slice_merge: str = "nms"
    slice_full: bool = True

    def __post_init__(self) -> None:
        if self.imgsz is not None:
            self.imgsz = parse_imgsz(self.imgsz)
        self.threshold = _threshold(self.threshold, error=UserError)
        if self.slice is not None:
            from .slicing import SlicedPredictor

            self.slice = (int(self.slice[0]), int(self.slice[1])) if len(self.slice) == 2 else tuple(self.slice)
            SlicedPredictor(None, self.slice, self.slice_overlap, merge=self.slice_merge)  # checks the settings
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


def _threshold(value: Any, error: type[Exception] = argparse.ArgumentTypeError) -> float | str:
    """``--threshold``: a score in [0, 1] or ``auto`` (the checkpoint's best-F1 threshold)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"--threshold {value}: pass a score in [0, 1] or auto") from None
    if not 0.0 <= number <= 1.0:
        raise error(f"--threshold {value}: a score threshold is in [0, 1] (or auto)")
    return number


def auto_threshold(card: Any, model: str) -> float:
    """What ``--threshold auto`` means for a model with card ``card``: its stored best-F1 threshold."""
    if card is None or card.best_threshold is None:
        raise UserError(f"--threshold auto: {model} stores no best score threshold (trained before it was recorded, "
                        f"or a reference-project checkpoint); pass a number, e.g. the one python -m "
                        f"src.detection.evaluate --model <checkpoint> prints, or retrain")
    f1 = "" if card.best_threshold_f1 is None else f" (F1 {card.best_threshold_f1:.3f})"
    print(f"--threshold auto: {card.best_threshold:.3f}, the checkpoint's best-F1 score threshold on its "
          f"validation split{f1}")
    return float(card.best_threshold)


def predict_config_from_args(args: argparse.Namespace) -> PredictConfig:
    return config_from_args(PredictConfig, args)


class HalfAction(argparse.Action):
    """``--half``: the older spelling of ``--precision fp16``, folded into ``precision`` while parsing (an explicit
    ``--precision`` wins, typed before or after it), so nothing below the parser knows it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, "auto") == "auto":
            setattr(namespace, self.dest, "fp16")


def add_predictor_args(parser: argparse.ArgumentParser, command: str = "image") -> None:
    """Flags shared by infer_det_image.py (``command="image"``) and infer_det_video.py (``"video"``), the
    reference's names first; the help says what each command does with them."""
    g = parser.add_argument_group("model")
    ModelSource.add_to(g, model_help="detector checkpoint (.pth from train_detection.py or the reference project; "
                                     ".onnx export)")
    imgsz = parser._option_string_actions["--imgsz"]  # one value or two, though argparse shows N [N ...]
    imgsz.metavar = "SIZE"
    imgsz.help = ("model input size: SIZE | W H (one value: square; two at most); default: the checkpoint's "
                  "(reference checkpoints: 640)")
    video = command == "video"
    g.add_argument("--threshold", "--score-thresh", dest="threshold", type=_threshold, default=0.5,
                   help="score a detection needs to be drawn, counted and written to --save-json / --save-mot; "
                        "with --track, the score a track starts from (lower ones keep tracks alive); auto: the "
                        "checkpoint's best-F1 threshold" if video else
                        "score a detection needs to be drawn, counted and written to label files (--save-labels); "
                        "predictions.json keeps detections down to the checkpoint's evaluation threshold; auto: the "
                        "best-F1 threshold training stored in the checkpoint")
    g.add_argument("--nms", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's)")
    g.add_argument("--max-det", type=int, default=None, help="max detections per image (default: the checkpoint's)")
    g.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's letterbox/stretch resize (default: as trained)")
    g.add_argument("--keep-aspect", action="store_true",
                   help="faster: letterbox scale with padding only to the model's size multiple; for checkpoints "
                        "trained with --letterbox (others refuse it), not SSD")
    g = parser.add_argument_group("sliced inference (small objects in large images)")
    g.add_argument("--slice", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="run the model on overlapping W x H pixel tiles (about the model's input size) and merge "
                        "the boxes: finds objects the whole-image resize shrinks away; one forward per tile")
    g.add_argument("--slice-overlap", type=float, default=0.2, help="overlap between neighbouring tiles (fraction)")
    g.add_argument("--slice-merge", default="nms", choices=("nms", "wbf"),
                   help="merge the tiles' boxes by class-wise NMS or weighted box fusion")
    g.add_argument("--slice-full", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the whole image (keeps large objects that tiles cut apart)")
    g = parser.add_argument_group("runtime")
    RuntimeOptions.add_to(g, precision_help="autocast precision; auto = a fixed rule per device (README: image "
                                            "inference), so a checkpoint gives the same boxes on the same machine",
                          batch=None, batch_help="images per forward (default: 8 on CUDA, 1 on CPU)")
    g.add_argument("--half", dest="precision", action=HalfAction, help="older spelling of --precision fp16 (CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone + neck (slow first batch)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the forward from a CUDA graph per input size: one launch instead of hundreds, "
                        "the batch-1 / camera speed-up on a GPU (default: on with CUDA unless --compile)")
    g = parser.add_argument_group("output")
    stem = "video" if video else "run"
    g.add_argument("--out-dir", default=None,
                   help=f"output folder, relative to the working directory (default: outputs/inference/{stem}_N, "
                        f"the first N not taken yet)")
    g.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    g.add_argument("--no-save", action="store_true",
                   help="write no annotated video (nothing drawn or encoded unless --show)" if video else
                   "write no annotated images")


def add_checkpoint_args(group: Any) -> None:
    """Add to ``group`` (a parser or argument group) what a command that loads a checkpoint may be told about the
    model (inference, export): the same flags with the same meaning everywhere. They are checked against our
    checkpoints and describe reference-project ones, which record nothing; ``checkpoint_claims`` turns the parsed
    values into ``prepare_checkpoint``'s ``expect``."""
    ModelSource.add_claims_to(group)


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
        if cfg.threshold == "auto":
            from .sidecar import read_sidecar

            path = resolve_path(cfg.model)
            cfg.threshold = auto_threshold(read_sidecar(path).card if path.is_file() else None, cfg.model)
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
    if cfg.slice is not None:
        from .slicing import SlicedPredictor

        d = predictor.card.detector  # tiles merge at the model's own NMS IoU; the merged boxes are all kept
        predictor = SlicedPredictor(predictor, cfg.slice, overlap=cfg.slice_overlap, include_full=cfg.slice_full,
                                    merge=cfg.slice_merge, merge_iou=d.nms if cfg.nms is None else cfg.nms,
                                    max_det=cfg.max_det)
    if verbose:
        print(f"model: {predictor.describe()}")
    return predictor


def _build_torch_predictor(cfg: PredictConfig, keep_low_scores: bool) -> Predictor:
    device = select_device(cfg.device)
    batch = cfg.batch or (8 if device.type == "cuda" else 1)
    ckpt = prepare_checkpoint(resolve_path(cfg.model), cfg.expect(), cfg.imgsz)
    if cfg.threshold == "auto":
        cfg.threshold = auto_threshold(ckpt.card, cfg.model)
    weights = cfg.weights
    if weights and ckpt.card.provenance.includes_backbone:
        print(f"note: --weights {weights} ignored: the checkpoint already contains the backbone weights")
        weights = None
    score_thresh = score_floor(cfg.threshold, ckpt.card.detector.score_thresh, keep_low_scores)
    return Predictor(ckpt, device=device, imgsz=cfg.imgsz, letterbox=cfg.letterbox,
                     score_thresh=score_thresh, nms=cfg.nms, max_det=cfg.max_det, batch_size=batch,
                     precision=cfg.precision, keep_aspect=cfg.keep_aspect, weights=weights, compile=cfg.compile,
                     cuda_graphs=cfg.cuda_graphs)


def display_available() -> tuple[bool, str]:
    """Whether ``cv2.imshow`` can open a window here, and why not."""
    import cv2

    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and "NONE" in gui[0].upper():
        return False, "this OpenCV build has no GUI support (opencv-python-headless); pip install opencv-python"
    return True, ""
