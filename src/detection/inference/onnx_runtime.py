"""Run an exported detector (``python -m src.detection.export``) with onnxruntime: ``OnnxPredictor``.

The ONNX graph takes the resized uint8 batch ``images`` [B,3,h,w] (RGB, 0..255) and does the model's own
pre-processing (uint8 -> float, normalization with the input spec's mean/std, zero padding to the size multiple),
backbone, neck and head. It returns the raw head outputs per anchor plus the anchors themselves:

* ``cls_logits`` [B,N,K], ``bbox_regression`` [B,N,4] (and ``bbox_ctrness`` [B,N,1] for FCOS), float32;
* ``anchors`` [N,4] (xyxy, input pixels; the same for every image of the batch);
* ``level_sizes`` [L] int64: feature-map locations (h_l * w_l) per pyramid level.

Box decoding, score threshold, per-class NMS and top-k (``DetectionDecoder``) run after the graph in PyTorch,
through torchvision's own ``postprocess_detections`` of the detector class - the very code the ``.pth`` path
runs - so thresholds stay runtime settings (``--threshold``, ``--nms``, ``--max-det``) and the two paths differ
only by the float rounding of the head outputs. ``OnnxPredictor`` shares ``predictor.PredictorBase`` with the PyTorch
``Predictor``: the same resize, box mapping and batching (same ``InputSpec``).

The sidecar ``<model>.onnx.json`` (also stored in the ONNX file's metadata) describes the model: classes, input
spec, thresholds, head, model name, toolkit version and the graph's shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint.format import prepare_checkpoint
from ..core.cli import parse_imgsz
from ..core.errors import UserError
from ..core.paths import resolve_path
from ..core.runtime import Stopwatch
from .predictor import PredictorBase

SIDECAR_FORMAT = "dinov3-detection-onnx"
SIDECAR_VERSION = 1
METADATA_KEY = "dinov3_detection"  # the sidecar's JSON, also stored in the ONNX file's metadata_props
INPUT_NAME = "images"
HEAD_OUTPUTS = {"retinanet": ("cls_logits", "bbox_regression"), "ssd": ("cls_logits", "bbox_regression"),
                "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness")}
EXTRA_OUTPUTS = ("anchors", "level_sizes")


def output_names(head: str) -> list[str]:
    """The graph's output names for a head, in order."""
    return [*HEAD_OUTPUTS[head], *EXTRA_OUTPUTS]


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``best_model.onnx`` -> ``best_model.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


# ------------------------------------------------------------------------------------------------ decoding
class _NoModule(nn.Module):
    """Stand-in backbone/head: the decoding-only detector below never runs them."""

    out_channels = 0


class DetectionDecoder:
    """Raw head outputs + anchors -> detections in input coordinates, by torchvision's ``postprocess_detections``.

    The detector class of the head (``model.DinoRetinaNet`` / ``DinoSSD`` / ``DinoFCOS``, which also mask the
    background class) is built around stand-in modules, so its decoding, thresholding, NMS and top-k are exactly
    those of the PyTorch model with the same settings; it holds no weights.
    """

    def __init__(self, head: str, num_classes: int, score_thresh: float, nms: float, max_det: int,
                 topk_candidates: int) -> None:
        from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

        from ..modeling.model import DinoFCOS, DinoRetinaNet, DinoSSD

        if head not in HEAD_OUTPUTS:
            raise UserError(f"head {head!r} is not one of {', '.join(HEAD_OUTPUTS)}; re-export the model")
        self.head = head
        common = dict(score_thresh=float(score_thresh), nms_thresh=float(nms), detections_per_img=int(max_det),
                      topk_candidates=int(topk_candidates), head=_NoModule())
        if head == "retinanet":
            self.detector = DinoRetinaNet(_NoModule(), num_classes, **common)
        elif head == "fcos":
            self.detector = DinoFCOS(_NoModule(), num_classes, **common)
        else:  # SSD's default-box generator is only a constructor argument here: the anchors come from the graph
            self.detector = DinoSSD(_NoModule(), DefaultBoxGenerator([[2]]), (32, 32), num_classes, **common)
        self.detector.eval()

    @property
    def score_thresh(self) -> float:
        return float(self.detector.score_thresh)

    def __call__(self, outputs: dict[str, Tensor], image_size: Sequence[int]) -> list[dict[str, Tensor]]:
        """``outputs``: the graph's outputs by name (float32 CPU or GPU tensors); ``image_size`` (h, w): the
        unpadded input size every image of the batch has (boxes are clipped to it)."""
        head_outputs = {k: outputs[k].float() for k in HEAD_OUTPUTS[self.head]}
        anchors = outputs["anchors"].float()
        n = head_outputs["cls_logits"].shape[0]
        sizes = [(int(image_size[0]), int(image_size[1]))] * n
        with torch.inference_mode():
            if self.head == "ssd":
                return self.detector.postprocess_detections(head_outputs, [anchors] * n, sizes)
            # the per-level split RetinaNet.forward / FCOS.forward do before their postprocess_detections
            hw = [int(v) for v in outputs["level_sizes"].tolist()]
            per_location = head_outputs["cls_logits"].shape[1] // sum(hw)
            per_level = [v * per_location for v in hw]
            split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
            return self.detector.postprocess_detections(split, [list(anchors.split(per_level))] * n, sizes)


# ------------------------------------------------------------------------------------------------ sidecar
def read_sidecar(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The export's description: ``<model>.onnx.json``, else the copy in the ONNX file's metadata."""
    path = Path(onnx_path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{side}: not valid JSON ({exc.__class__.__name__}); re-export the model with "
                            f"python -m src.detection.export") from None
    else:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a broken file
            raise UserError(f"--model {path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise UserError(f"--model {path}: no {side.name} beside it and no description inside; export the "
                            f"model with python -m src.detection.export (it writes both)")
        meta = json.loads(props[METADATA_KEY])
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{side}: not a description written by python -m src.detection.export; re-export the model")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > SIDECAR_VERSION:
        raise UserError(f"{side}: format_version {meta.get('format_version')!r}, this toolkit reads "
                        f"1..{SIDECAR_VERSION}; use the toolkit version that exported it "
                        f"({meta.get('toolkit_version', '?')})")
    return meta


# ------------------------------------------------------------------------------------------------ predictor
def _onnxruntime(what: str):
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise UserError(f"{what}: running ONNX models needs the onnxruntime package "
                        f"(pip install -r requirements.txt)") from None
    return onnxruntime


def _providers(device: str) -> tuple[list[Any], torch.device]:
    """onnxruntime execution providers for ``--device`` (auto: CUDA when onnxruntime has it, else CPU)."""
    ort = _onnxruntime(f"--device {device}")
    name = (device or "auto").lower()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if name == "cpu" or (name == "auto" and not has_cuda):
        return ["CPUExecutionProvider"], torch.device("cpu")
    if name == "auto" or name.startswith("cuda"):
        if not has_cuda:
            raise UserError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                            f"(pip install onnxruntime-gpu); use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cuda", index)
    raise UserError(f"--device {device!r} is not valid; use auto, cpu, cuda or cuda:N")


class OnnxPredictor(PredictorBase):
    """``Predictor`` for an exported ``.onnx`` model: same interface, same pre/post-processing, onnxruntime forward.

    ``imgsz``/``keep_aspect`` other than the export's need a ``--dynamic`` export (a static graph has one input
    size); ``score_thresh``, ``nms``, ``max_det`` override the exported defaults at run time.
    Tensors given to and returned by the steps live on the CPU (``device``); onnxruntime copies to its provider.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", imgsz: Sequence[int] | int | None = None,
                 letterbox: bool | None = None, score_thresh: float | None = None, nms: float | None = None,
                 max_det: int | None = None, batch_size: int | None = None, keep_aspect: bool = False,
                 precision: str | None = None, threads: int | None = None) -> None:
        from ..modeling.model import InputSpec

        ort = _onnxruntime(f"--model {model}")

        path = resolve_path(model)
        if not path.is_file():
            raise UserError(f"--model {model}: file not found; export one with python -m src.detection.export "
                            f"--model best_model.pth")
        self.model_path = path
        meta = read_sidecar(path)
        graph = meta["graph"]
        self.dynamic_hw = bool(graph.get("dynamic_hw"))
        self.static_batch: int | None = graph.get("batch")
        spec = InputSpec.from_dict(meta["input"])
        if imgsz is not None and parse_imgsz(imgsz) != spec.imgsz and not self.dynamic_hw:
            raise UserError(f"--imgsz {' '.join(map(str, parse_imgsz(imgsz)))}: {path.name} was exported for "
                            f"{spec.imgsz[0]}x{spec.imgsz[1]} only; drop --imgsz or re-export with --imgsz "
                            f"(or --dynamic)")
        self.input_spec = spec.with_imgsz(imgsz).replace(letterbox=letterbox)
        self.keep_aspect = bool(keep_aspect)
        if self.keep_aspect:
            self.input_spec.check_keep_aspect()
            if not self.dynamic_hw:
                raise UserError(f"--keep-aspect: {path.name} was exported for one input size; drop --keep-aspect "
                                f"or re-export with --dynamic")
        self.precision = str(graph.get("precision", "fp32"))
        if precision not in (None, "auto", self.precision):
            raise UserError(f"--precision {precision}: {path.name} was exported in {self.precision}; drop "
                            f"--precision or re-export (python -m src.detection.export, --half for fp16)")
        providers, self.device_for_session = _providers(device)
        options = ort.SessionOptions()
        # the same thread budget as the PyTorch path, so their speeds compare
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--model {model}: onnxruntime cannot load it ({first}); re-export it") from None
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # steps' tensors stay on the CPU: onnxruntime takes and returns host arrays
        self.device = torch.device("cpu")
        th = meta["thresholds"]
        self.decoder = DetectionDecoder(meta["head"], int(meta["num_classes"]),
                                        th["score_thresh"] if score_thresh is None else score_thresh,
                                        th["nms"] if nms is None else nms,
                                        th["max_det"] if max_det is None else max_det, th["topk_candidates"])
        self.classes: list[str] = list(meta["classes"])
        self.meta = dict(meta)
        self.meta["imgsz"] = self.input_spec.imgsz
        self.meta["input"] = self.input_spec.to_dict()
        default_batch = 8 if self.device_for_session.type == "cuda" else 1
        self.batch_size = max(1, int(self.static_batch or batch_size or default_batch))
        self.model_timer = Stopwatch(self.device)

    @classmethod
    def from_config(cls, cfg: Any, keep_low_scores: bool = False) -> OnnxPredictor:
        """From the commands' ``PredictConfig`` (see ``predictor.build_predictor``)."""
        path = resolve_path(cfg.model)
        meta = read_sidecar(path) if path.is_file() else None
        if meta is not None:  # --model-name / --head / the classes of --config are checked as for a checkpoint
            prepare_checkpoint({"format": SIDECAR_FORMAT, "meta": meta, "path": str(path)}, cfg.expect())
        if cfg.weights:
            print(f"note: --weights {cfg.weights} ignored: the ONNX model contains the backbone")
        if cfg.compile:
            print("note: --compile ignored: onnxruntime optimizes the graph itself")
        if cfg.half and (meta or {}).get("graph", {}).get("precision") != "fp16":
            print("note: --half ignored: this ONNX model was exported in fp32 (export with --half for fp16)")
        eval_thresh = float((meta or {}).get("thresholds", {}).get("score_thresh", cfg.threshold))
        score_thresh = min(cfg.threshold, eval_thresh) if keep_low_scores else cfg.threshold
        return cls(cfg.model, device=cfg.device, imgsz=cfg.imgsz, letterbox=cfg.letterbox, score_thresh=score_thresh,
                   nms=cfg.nms, max_det=cfg.max_det, batch_size=cfg.batch, keep_aspect=cfg.keep_aspect,
                   precision=cfg.precision)

    # ------------------------------------------------------------------ settings
    @property
    def score_thresh(self) -> float:
        """Lowest score the model returns (its post-processing threshold)."""
        return self.decoder.score_thresh

    # ------------------------------------------------------------------ steps
    def raw_outputs(self, batch: Tensor) -> dict[str, Tensor]:
        """The graph's outputs for a resized uint8 batch [B,3,h,w] (static-batch graphs: run in padded chunks)."""
        x = batch.cpu().contiguous().numpy()
        n = x.shape[0]
        step = self.static_batch or n
        parts: list[dict[str, Tensor]] = []
        for s in range(0, n, step):
            chunk = x[s:s + step]
            if len(chunk) < step:  # a static batch is filled with copies of the last image, dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            out = self.session.run(self.output_names, {INPUT_NAME: chunk})
            parts.append({k: torch.from_numpy(v) for k, v in zip(self.output_names, out)})
        merged = {k: torch.cat([p[k] for p in parts])[:n] for k in HEAD_OUTPUTS[self.decoder.head]}
        merged.update({k: parts[0][k] for k in EXTRA_OUTPUTS})
        return merged

    def forward(self, batch: Tensor) -> list[dict[str, Tensor]]:
        """Graph + decoding on a resized uint8 batch [B,3,h,w]; boxes in input coordinates. Timed."""
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(f"expected a uint8 [B,3,H,W] batch, got {batch.dtype} {tuple(batch.shape)}")
        with self.model_timer.time(len(batch)):
            dets = self.decoder(self.raw_outputs(batch), batch.shape[-2:])
        return dets

    def describe(self) -> str:
        m, spec = self.meta, self.input_spec
        mode = "letterbox scale, aspect-preserving input" if self.keep_aspect else (
            "letterbox" if spec.letterbox else "stretch")
        shape = "dynamic size" if self.dynamic_hw else f"batch {self.static_batch}" if self.static_batch else ""
        return (f"{m.get('model_name')} + {m.get('head')} ({m.get('feature_extractor')}), "
                f"{len(self.classes) - 1} classes, imgsz {spec.imgsz[0]}x{spec.imgsz[1]} {mode}, "
                f"ONNX {self.model_path.name} ({shape or 'dynamic batch'}) on onnxruntime {self.provider} "
                f"{self.precision}")
