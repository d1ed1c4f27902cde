"""The PyTorch ``Predictor`` (checkpoint -> preprocess -> batched forward -> boxes in original coordinates) and
``build_predictor``, which builds the predictor the inference commands' typed configuration describes
(``options.PredictConfig``; the checkpoint-describing flags are ``checkpoint.source.ModelSource``'s, which export
shares).

``build_predictor`` returns a ``Predictor`` for a ``.pth`` and an ``onnx_runtime.OnnxPredictor`` for a ``.onnx``;
both follow ``base.PredictorBase``'s interface.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint.build import PreparedCheckpoint, build_model, prepare_checkpoint
from ..checkpoint.card import describe_weights_source
from ..core.errors import UserError
from ..core.graphs import GraphedFunction, graphs_supported
from ..core.paths import resolve_path
from ..core.runtime import Stopwatch, autocast_context, inference_precision, select_device
from .base import PredictorBase, score_floor
from .options import PredictConfig, auto_threshold


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

    @torch.inference_mode()
    def forward_start(self, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[int, int], tuple]:
        """``forward``'s fixed-shape part (normalize, backbone, neck, head: no host synchronisation, queued on a
        GPU), untimed; ``forward_finish`` decodes its output. A CUDA graph's outputs are its static buffers, which
        the next replay overwrites, so they are copied (a small share of the forward's time)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self._head_forward is not None:
            outputs, padded_hw, levels = self._head_forward(batch)
            return {k: v.clone() for k, v in outputs.items()}, padded_hw, levels
        with self._autocast():
            return self.model.head_forward(batch)

    @torch.inference_mode()
    def forward_finish(self, started: tuple[dict[str, torch.Tensor], tuple[int, int], tuple],
                       image_size: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """``forward_start``'s output -> detections in input coordinates (box decoding, NMS, top-k), untimed."""
        if self._head_forward is not None:  # as ``forward``: the graphed path decodes outside autocast
            return self.model.detect(started, image_size)
        with self._autocast():
            return self.model.detect(started, image_size)

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
