"""The options both inference commands share, free of heavy imports so ``--help`` is instant: ``PredictConfig``,
``add_predictor_args`` / ``predict_config_from_args``, ``--threshold`` parsing (``auto``: the checkpoint's best-F1
threshold, ``auto_threshold``), the claims a command makes about its checkpoint (``checkpoint_claims``, shared with
export) and whether a window can be shown (``display_available``). ``predictor.build_predictor`` turns a
``PredictConfig`` into a predictor."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.source import ModelSource
from ..core.choices import PRECISIONS
from ..core.cli import RuntimeOptions, config_from_args, parse_imgsz
from ..core.errors import UserError
from ..core.paths import resolve_path


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
    if card.best_threshold_f1 is not None and not card.best_threshold_f1 > 0:
        raise UserError(f"--threshold auto: {model} found no correct detection on its validation split at any "
                        f"threshold (F1 0), so it has no best threshold; pass a number, e.g. --threshold 0.5")
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


def checkpoint_claims(cfg: Any) -> dict[str, Any]:
    """What ``ModelSource``'s claim flags (fields of ``cfg``) say about the model; classes read from ``--config``
    (``__background__`` first, the form checkpoints record)."""
    from ..data.datasets import load_config_classes

    config = getattr(cfg, "config", None)
    return {"model_name": getattr(cfg, "model_name", None), "head": getattr(cfg, "head", None),
            "feature_extractor": getattr(cfg, "feature_extractor", None),
            "classes": load_config_classes(config) if config else None}



def display_available() -> tuple[bool, str]:
    """Whether ``cv2.imshow`` can open a window here, and why not."""
    import cv2

    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and "NONE" in gui[0].upper():
        return False, "this OpenCV build has no GUI support (opencv-python-headless); pip install opencv-python"
    return True, ""
