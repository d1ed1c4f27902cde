"""The shared Predictor (checkpoint -> preprocess -> batched forward -> boxes in original coordinates) and the
flags both inference commands share."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .errors import UserError
from .runtime import PRECISIONS, Stopwatch, autocast_context, inference_precision, select_device
from .utils import REPO_ROOT, parse_imgsz

SIZE_MULTIPLE = 32  # aspect-preserving input sizes are rounded to the coarsest backbone stride


class Predictor:
    """Load a checkpoint once, then ``predict(images)`` -> boxes in the images' original coordinates.

    The checkpoint's metadata supplies model name, head, classes, imgsz, letterbox and normalization, so the
    checkpoint alone is enough. ``imgsz``, ``letterbox``, ``score_thresh``, ``nms``, ``max_det`` override it.
    ``expect`` holds what the user claimed on the command line (model_name, head, feature_extractor, classes);
    a contradiction with the checkpoint is a UserError rather than a silently different model.
    ``keep_aspect`` feeds each image at an aspect-preserving size whose long side is ``max(imgsz)`` (no square
    stretch, no padding to compute) - default: on for letterbox-trained checkpoints, where it sees exactly the
    letterboxed content without the padding.
    """

    def __init__(self, checkpoint: str | os.PathLike | dict, device: str | torch.device = "auto", half: bool = False,
                 imgsz: Sequence[int] | int | None = None, letterbox: bool | None = None,
                 score_thresh: float | None = None, nms: float | None = None, max_det: int | None = None,
                 batch_size: int = 8, precision: str | None = None, keep_aspect: bool | None = None,
                 channels_last: bool | None = None, weights: str | None = None, expect: dict[str, Any] | None = None,
                 compile: bool = False) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        self.checkpoint_path = ckpt.get("path", "checkpoint")
        _check_expectations(ckpt["meta"], expect or {}, self.checkpoint_path)
        # imgsz is not a model override: the detectors are fully convolutional, and SSD's number of levels is
        # fixed by the training imgsz (part of the weights). A different --imgsz only changes the input resize.
        overrides = {"score_thresh": score_thresh, "nms": nms, "max_det": max_det}
        self.model, self.meta = model_from_checkpoint(ckpt, self.device, overrides, weights=weights)
        self.classes: list[str] = list(self.meta["classes"])
        self.imgsz: tuple[int, int] = parse_imgsz(imgsz) if imgsz is not None else tuple(self.meta["imgsz"])
        self.meta["imgsz"] = self.imgsz
        self.letterbox = bool(self.meta.get("letterbox", False) if letterbox is None else letterbox)
        self.keep_aspect = self.letterbox if keep_aspect is None else bool(keep_aspect)
        self.batch_size = max(1, int(batch_size))
        backbone_params = sum(t.numel() for t in self.model.dino.parameters())
        self.precision = inference_precision(precision, self.device, backbone_params, half)
        # channels_last made the CPU forward slower here (0.3-0.9x, oneDNN reorders); it is the fast layout on CUDA.
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.dino = torch.compile(self.model.dino, dynamic=False)
        self.model_timer = Stopwatch(self.device)

    def _autocast(self):
        return autocast_context(self.device, self.precision)

    # ------------------------------------------------------------------ steps
    def input_size(self, orig_hw: Sequence[int]) -> tuple[int, int]:
        """Model input size (W, H) for an image of original size (H, W)."""
        if not self.keep_aspect:
            return self.imgsz
        h0, w0 = int(orig_hw[0]), int(orig_hw[1])
        side = max(self.imgsz)
        scale = side / max(h0, w0)
        w = max(SIZE_MULTIPLE, round(w0 * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        h = max(SIZE_MULTIPLE, round(h0 * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        return w, h

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """Original uint8 [3,H,W] -> resized uint8 model input on the device (resized on the GPU when there)."""
        from .transforms import resize_image

        size = self.input_size(image.shape[-2:])
        image = image.to(self.device, non_blocking=True)
        letterbox = self.letterbox and not self.keep_aspect
        return resize_image(image, size, letterbox)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detector forward on a resized uint8 batch [B,3,h,w]; boxes in input coordinates. Timed (synced)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self.model_timer.time(len(batch)), self._autocast():
            out = self.model(batch)
        return out

    def postprocess(self, raw: list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to original (H, W) coordinates as float32 CPU tensors."""
        from .transforms import boxes_to_original

        preds = []
        for det, hw in zip(raw, orig_sizes):
            size = self.input_size(hw)
            boxes = boxes_to_original(det["boxes"].float(), hw, size, self.letterbox and not self.keep_aspect)
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

    def describe(self) -> str:
        m = self.meta
        mode = "aspect-preserving" if self.keep_aspect else ("letterbox" if self.letterbox else "stretch")
        return (f"{m.get('model_name')} + {m.get('head')} ({m.get('feature_extractor')}), "
                f"{len(self.classes) - 1} classes, imgsz {self.imgsz[0]}x{self.imgsz[1]} {mode}, "
                f"{self.device} {self.precision}")


def _check_expectations(meta: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    flags = {"model_name": "--model-name", "head": "--head", "feature_extractor": "--feature-extractor",
             "classes": "--config CLASSES"}
    for key, flag in flags.items():
        want = expect.get(key)
        if want is None:
            continue
        have = meta.get(key)
        if key == "classes":
            want, have = list(want), list(have or [])
        if want != have:
            shown_want = want if key != "classes" else f"{len(want) - 1} classes {want[1:4]}..."
            shown_have = have if key != "classes" else f"{len(have) - 1} classes {have[1:4]}..."
            raise UserError(f"{flag} {shown_want} contradicts checkpoint {where} ({shown_have}); drop the flag "
                            f"(the checkpoint's metadata is used) or pass the matching checkpoint")


def add_predictor_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by infer_det_image.py and infer_det_video.py (the seed's names first)."""
    parser.add_argument("--model", required=True, help="detector checkpoint (.pth from train_detection.py)")
    parser.add_argument("--imgsz", type=int, nargs="+", default=None,
                        help="model input size W [H]; default: the checkpoint's")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of a drawn/saved detection")
    parser.add_argument("--model-name", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--config", default=None, help="dataset YAML; its CLASSES are checked against the checkpoint")
    parser.add_argument("--head", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--feature-extractor", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights; only needed for checkpoints saved without the backbone")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 autocast on CUDA (bf16 on CPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast precision; auto = fp32 on CUDA (fp16 with --half), bf16 on CPUs with native "
                             "bf16 for backbones >= 20M parameters, else fp32")
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default 8 on CUDA, 1 on CPU)")
    parser.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                        help="override the checkpoint's letterbox/stretch resize")
    parser.add_argument("--keep-aspect", action=argparse.BooleanOptionalAction, default=None,
                        help="aspect-preserving input size, long side = max(imgsz) (default: on for letterbox models)")
    parser.add_argument("--nms", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's)")
    parser.add_argument("--max-det", type=int, default=None, help="max detections per image")
    parser.add_argument("--out-dir", default=None, help="output folder (default: outputs/inference/<run>_N)")
    parser.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    parser.add_argument("--no-save", action="store_true", help="do not write annotated images/video")


def config_classes(config: str) -> list[str]:
    """CLASSES of a dataset YAML (only the class list; the data folders need not exist for inference)."""
    import yaml

    path = Path(config)
    if not path.is_file() and not path.is_absolute():
        path = REPO_ROOT / config
    if not path.is_file():
        raise UserError(f"--config {config}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {config}: not valid YAML ({type(exc).__name__})") from None
    classes = data.get("CLASSES") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise UserError(f"--config {config}: no CLASSES list; add CLASSES: [__background__, ...]")
    return [str(c) for c in classes]


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """Build the Predictor from the shared flags, with notes for flags that do nothing here."""
    expect = {"model_name": args.model_name, "head": args.head, "feature_extractor": args.feature_extractor,
              "classes": config_classes(args.config) if args.config else None}
    device = select_device(args.device)
    if args.half and device.type != "cuda" and args.precision is None:
        print("note: --half is for CUDA; on CPU it means bf16 autocast where the CPU supports it")
    batch = args.batch or (8 if device.type == "cuda" else 1)
    ckpt = load_checkpoint(args.model)
    if args.weights and ckpt["meta"].get("includes_backbone", True):
        print(f"note: --weights {args.weights} ignored: the checkpoint already contains the backbone weights")
        args.weights = None
    predictor = Predictor(ckpt, device=device, half=args.half, imgsz=args.imgsz, letterbox=args.letterbox,
                          score_thresh=args.threshold, nms=args.nms, max_det=args.max_det, batch_size=batch,
                          precision=args.precision, keep_aspect=args.keep_aspect, weights=args.weights,
                          expect=expect)
    print(f"model: {predictor.describe()}")
    return predictor


def display_available() -> tuple[bool, str]:
    """Whether ``cv2.imshow`` can open a window here, and why not."""
    import cv2

    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and "NONE" in gui[0].upper():
        return False, "this OpenCV build has no GUI support (opencv-python-headless)"
    return True, ""
