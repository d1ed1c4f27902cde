"""Run an exported detector (``python -m src.detection.export``) with onnxruntime: ``OnnxPredictor``.

The ONNX graph takes the resized uint8 batch ``images`` [B,3,h,w] (RGB, 0..255) and does the model's own
pre-processing (uint8 -> float, normalization with the input spec's mean/std, zero padding to the size multiple),
backbone, neck and head. It returns the raw head outputs per anchor plus the anchors themselves:

* ``cls_logits`` [B,N,K], ``bbox_regression`` [B,N,4] (and ``bbox_ctrness`` [B,N,1] for FCOS), float32;
* ``anchors`` [N,4] (xyxy, input pixels; the same for every image of the batch);
* ``level_sizes`` [L] int64: feature-map locations (h_l * w_l) per pyramid level.

Box decoding, score threshold, per-class NMS and top-k (``DetectionDecoder``) run after the graph in PyTorch,
through the ``postprocess_detections`` of the detector class - the very code the ``.pth`` path
runs - so thresholds stay runtime settings (``--threshold``, ``--nms``, ``--max-det``) and the two paths differ
only by the float rounding of the head outputs. ``OnnxPredictor`` shares ``base.PredictorBase`` with the PyTorch
``Predictor``: the same resize, box mapping and batching (same ``InputSpec``).

The sidecar ``<model>.onnx.json`` (``sidecar.py``; also stored in the ONNX file's metadata) is the checkpoint's model
card plus the graph's shapes and the decoding thresholds.

With onnxruntime's CUDA provider the predictor works on the GPU end to end, as the PyTorch one does: frames are
uploaded and resized there, and the graph reads its input from and writes its outputs to GPU tensors through I/O
binding (``session.io_binding()``), so nothing travels back to the host before the final boxes. On the CPU the
graph takes and returns host arrays (``session.run``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.cli import parse_imgsz
from ..core.errors import UserError
from ..core.paths import resolve_path
from ..core.runtime import Stopwatch, select_device
from ..modeling.heads import ANCHOR_OUTPUTS, HEAD_TYPES
from .base import PredictorBase, score_floor
from .sidecar import OnnxDescription, read_sidecar

INPUT_NAME = "images"
# per head, the raw outputs per anchor its registry entry declares; every graph then returns EXTRA_OUTPUTS
HEAD_OUTPUTS = {name: kind.onnx_outputs for name, kind in HEAD_TYPES.items()}
EXTRA_OUTPUTS = ANCHOR_OUTPUTS


# onnxruntime's element types -> torch / numpy dtypes of the buffers outputs are bound to
_ORT_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16),
              "tensor(int64)": (torch.int64, np.int64), "tensor(int32)": (torch.int32, np.int32),
              "tensor(uint8)": (torch.uint8, np.uint8)}


def output_names(head: str) -> list[str]:
    """The graph's output names for a head, in order."""
    return list(HEAD_TYPES[head].output_names)


# ------------------------------------------------------------------------------------------------ decoding
class DetectionDecoder:
    """Raw head outputs + anchors -> detections in input coordinates: the head's registry entry decodes them
    (``HeadType.decode``) with the ``postprocess_detections`` of its detector class, so decoding,
    thresholding, NMS and top-k are exactly those of the PyTorch model with the same settings; it holds no weights.
    """

    def __init__(self, head: str, num_classes: int, score_thresh: float, nms: float, max_det: int,
                 topk_candidates: int) -> None:
        if head not in HEAD_TYPES:
            raise UserError(f"head {head!r} is not one of {', '.join(HEAD_TYPES)}; re-export the model")
        self.head = head
        self.kind = HEAD_TYPES[head]
        self.detector = self.kind.decoder(num_classes, score_thresh, nms, max_det, topk_candidates)

    @property
    def score_thresh(self) -> float:
        return float(self.detector.score_thresh)

    def __call__(self, outputs: dict[str, Tensor], image_size: Sequence[int]) -> list[dict[str, Tensor]]:
        """``outputs``: the graph's outputs by name (float32 CPU or GPU tensors); ``image_size`` (h, w): the
        unpadded input size every image of the batch has (boxes are clipped to it)."""
        return self.kind.decode(self.detector, outputs, image_size)


# ------------------------------------------------------------------------------------------------ predictor
def _onnxruntime(what: str):
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise UserError(f"{what}: running ONNX models needs the onnxruntime package "
                        f"(pip install -r requirements.txt)") from None
    return onnxruntime


def _providers(device: str) -> tuple[list[Any], torch.device]:
    """onnxruntime execution providers for ``--device``, chosen by the device rule every command uses
    (``runtime.select_device``); ``auto`` falls back to the CPU when this onnxruntime has no CUDA provider."""
    ort = _onnxruntime(f"--device {device}")
    dev = select_device(device)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if dev.type == "cuda" and not has_cuda:
        if (device or "auto").lower() == "auto":
            return ["CPUExecutionProvider"], torch.device("cpu")
        raise UserError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                        f"(pip install onnxruntime-gpu); use --device cpu")
    if dev.type == "cuda":
        index = dev.index or 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cuda", index)
    return ["CPUExecutionProvider"], torch.device("cpu")


class OnnxPredictor(PredictorBase):
    """``Predictor`` for an exported ``.onnx`` model: same interface, same pre/post-processing, onnxruntime forward.

    ``imgsz``/``keep_aspect`` other than the export's need a ``--dynamic`` export (a static graph has one input
    size); ``score_thresh``, ``nms``, ``max_det`` override the exported defaults at run time. ``description``: the
    sidecar already read (``sidecar.read_sidecar``), else it is read here; ``expect``: the command line's claims,
    checked against its card as for a checkpoint.
    ``io_binding`` (default: with the CUDA provider) binds the graph's input and outputs to torch tensors on
    ``device`` instead of copying host arrays in and out; the steps' tensors then live on the GPU (``device``),
    else on the CPU.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", imgsz: Sequence[int] | int | None = None,
                 letterbox: bool | None = None, score_thresh: float | None = None, nms: float | None = None,
                 max_det: int | None = None, batch_size: int | None = None, keep_aspect: bool = False,
                 precision: str | None = None, threads: int | None = None, expect: dict[str, Any] | None = None,
                 description: OnnxDescription | None = None, io_binding: bool | None = None) -> None:
        ort = _onnxruntime(f"--model {model}")

        path = resolve_path(model)
        if not path.is_file():
            raise UserError(f"--model {model}: file not found; export one with python -m src.detection.export "
                            f"--model best_model.pth")
        self.model_path = path
        desc = description or read_sidecar(path)
        desc.card.check_matches(expect or {}, str(path))
        graph = desc.graph
        self.dynamic_hw = bool(graph.get("dynamic_hw"))
        self.static_batch: int | None = graph.get("batch")
        spec = desc.card.input
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
        on_gpu = self.provider == "CUDAExecutionProvider" and self.device_for_session.type == "cuda"
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        # with the CUDA provider and I/O binding the steps' tensors live on the GPU; else host arrays go in and out
        self.device = self.device_for_session if on_gpu and self.io_binding else torch.device("cpu")
        self._bound: dict[tuple[int, ...], dict[str, Tensor]] = {}  # output buffers per input shape
        th = desc.thresholds
        self.decoder = DetectionDecoder(desc.card.detector.head, desc.card.detector.num_classes,
                                        th["score_thresh"] if score_thresh is None else score_thresh,
                                        th["nms"] if nms is None else nms,
                                        th["max_det"] if max_det is None else max_det, th["topk_candidates"])
        self.card = desc.card.with_input(self.input_spec)
        self.classes: list[str] = self.card.classes
        default_batch = 8 if self.device_for_session.type == "cuda" else 1
        self.batch_size = max(1, int(self.static_batch or batch_size or default_batch))
        self.model_timer = Stopwatch(self.device)

    @classmethod
    def from_config(cls, cfg: Any, keep_low_scores: bool = False) -> OnnxPredictor:
        """From the commands' ``PredictConfig`` (see ``predictor.build_predictor``); the sidecar is read once."""
        path = resolve_path(cfg.model)
        desc = read_sidecar(path) if path.is_file() else None  # a missing file is reported by the constructor
        if desc is not None:  # --model-name / --head / the classes of --config are checked as for a checkpoint
            desc.card.check_matches(cfg.expect(), str(path))
        if cfg.weights:
            print(f"note: --weights {cfg.weights} ignored: the ONNX model contains the backbone")
        if cfg.compile:
            print("note: --compile ignored: onnxruntime optimizes the graph itself")
        eval_thresh = desc.thresholds.get("score_thresh", cfg.threshold) if desc is not None else cfg.threshold
        return cls(cfg.model, device=cfg.device, imgsz=cfg.imgsz, letterbox=cfg.letterbox,
                   score_thresh=score_floor(cfg.threshold, eval_thresh, keep_low_scores), nms=cfg.nms,
                   max_det=cfg.max_det, batch_size=cfg.batch, keep_aspect=cfg.keep_aspect, precision=cfg.precision,
                   description=desc)

    # ------------------------------------------------------------------ settings
    @property
    def score_thresh(self) -> float:
        """Lowest score the model returns (its post-processing threshold)."""
        return self.decoder.score_thresh

    # ------------------------------------------------------------------ steps
    def raw_outputs(self, batch: Tensor) -> dict[str, Tensor]:
        """The graph's outputs for a resized uint8 batch [B,3,h,w] (static-batch graphs: run in padded chunks)."""
        if self.io_binding:
            return self._raw_outputs_bound(batch)
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
        return self._merge(parts, n)

    def _merge(self, parts: list[dict[str, Tensor]], n: int) -> dict[str, Tensor]:
        merged = {k: torch.cat([p[k] for p in parts])[:n] for k in HEAD_OUTPUTS[self.decoder.head]}
        merged.update({k: parts[0][k] for k in EXTRA_OUTPUTS})
        return merged

    def _raw_outputs_bound(self, batch: Tensor) -> dict[str, Tensor]:
        """``raw_outputs`` through I/O binding: the graph reads the batch where it is (``device``) and writes into
        torch tensors there, allocated once per input shape (the first run of a shape learns the output shapes)."""
        x = batch.to(self.device).contiguous()
        n = x.shape[0]
        step = self.static_batch or n
        kind = self.device.type
        index = (self.device.index or 0) if kind == "cuda" else 0
        if kind == "cuda":  # the graph runs on onnxruntime's own stream: the batch must be complete on torch's
            torch.cuda.current_stream(self.device).synchronize()
        parts: list[dict[str, Tensor]] = []
        for s in range(0, n, step):
            chunk = x[s:s + step]
            if len(chunk) < step:  # a static batch is filled with copies of the last image, dropped in _merge
                chunk = torch.cat([chunk, chunk[-1:].expand(step - len(chunk), *chunk.shape[1:])]).contiguous()
            binding = self.session.io_binding()
            binding.bind_input(INPUT_NAME, kind, index, np.uint8, list(chunk.shape), chunk.data_ptr())
            outs = self._bound.get(tuple(chunk.shape))
            if outs is None:  # first run of this shape: onnxruntime allocates, we learn shapes and types
                for name in self.output_names:
                    binding.bind_output(name, kind, index)
                self.session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                values = binding.get_outputs()
                self._bound[tuple(chunk.shape)] = {
                    name: torch.empty(v.shape(), dtype=_ORT_TYPES[v.data_type()][0], device=self.device)
                    for name, v in zip(self.output_names, values)}
                parts.append({name: torch.from_numpy(v.numpy()).to(self.device)
                              for name, v in zip(self.output_names, values)})
                continue
            for name, t in outs.items():
                binding.bind_output(name, kind, index, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # written before torch reads them on its own stream
            # the buffers are reused by the next chunk: keep a chunk's head outputs when more chunks follow (_merge
            # copies them out in any case); the anchors are the same for every run of a shape
            parts.append({name: t.clone() if step < n and name not in EXTRA_OUTPUTS else t
                          for name, t in outs.items()})
        return self._merge(parts, n)

    def forward(self, batch: Tensor) -> list[dict[str, Tensor]]:
        """Graph + decoding on a resized uint8 batch [B,3,h,w]; boxes in input coordinates. Timed."""
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(f"expected a uint8 [B,3,H,W] batch, got {batch.dtype} {tuple(batch.shape)}")
        with self.model_timer.time(len(batch)):
            dets = self.decoder(self.raw_outputs(batch), batch.shape[-2:])
        return dets

    def describe(self) -> str:
        d, spec = self.card.detector, self.input_spec
        shape = "dynamic size" if self.dynamic_hw else f"batch {self.static_batch}" if self.static_batch else ""
        return (f"{d.model_name} + {d.head} ({d.feature_extractor}), "
                f"{len(self.classes) - 1} classes, imgsz {spec.imgsz[0]}x{spec.imgsz[1]} {self._mode()}, "
                f"ONNX {self.model_path.name} ({shape or 'dynamic batch'}) on onnxruntime {self.provider}"
                f"{' with I/O binding' if self.io_binding else ''} {self.precision}")


def _numpy_dtype(dtype: torch.dtype) -> type:
    return next(np_type for torch_type, np_type in _ORT_TYPES.values() if torch_type == dtype)
