"""Export a trained detector to ONNX (the body of ``python -m src.detection.export``).

Writes ``best_model.onnx`` and its description ``best_model.onnx.json`` (``sidecar.py``: the checkpoint's model
card with the export's input spec, the decoding thresholds and the graph's shapes; the same JSON is stored in the
ONNX metadata) next to the checkpoint, or into ``--out-dir`` / ``--output``. Run the result with ``infer_det_image.py --model best_model.onnx`` (or
``onnx_runtime.OnnxPredictor``).

What is in the graph and what is not (see ``onnx_runtime``): the graph does the model's own pre-processing
(uint8 -> float, mean/std, zero padding to the size multiple), backbone, neck and head, and returns the raw
per-anchor outputs plus the anchors. Decoding, score threshold, per-class NMS and top-k stay outside, in
torchvision's ``postprocess_detections`` (``onnx_runtime.DetectionDecoder``), because:

* it is the code the ``.pth`` path runs, so both paths keep the same boxes (in-graph ONNX NMS / TopK differ from
  torchvision's on ties and on the coordinate offset batched NMS uses), and
* the thresholds stay run-time settings (``--threshold``, ``--nms``, ``--max-det``) instead of export-time
  constants.

The TorchScript exporter (``dynamo=False``) is used: it exports all three heads on both backbone families with
dynamic batch and input size; the dynamo exporter failed on torchvision's anchor generators here.
Every file is written to a temporary name and moved into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint.build import prepare_checkpoint
from ..checkpoint.card import ModelCard
from ..core.choices import DEFAULT_OPSET, EXPORT_FORMATS, MAX_OPSET, MIN_OPSET
from ..core.cli import parse_imgsz
from ..core.errors import UserError
from ..core.io import atomic_paths
from ..core.paths import resolve_path
from ..core.runtime import select_device
from .onnx_runtime import HEAD_OUTPUTS, INPUT_NAME, output_names
from .options import checkpoint_claims
from .predictor import Predictor
from .sidecar import METADATA_KEY, OnnxDescription, sidecar_path

FORMATS = EXPORT_FORMATS
PROTOBUF_LIMIT = 2 * 1024 ** 3  # one ONNX file holds at most 2 GB (protobuf)


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ExportConfig:
    """Options of ``python -m src.detection.export`` (``commands.export.build_export_parser`` defines the flags)."""

    model: str
    format: str = "onnx"
    imgsz: tuple[int, int] | None = None
    batch: int = 1
    dynamic: bool = False
    half: bool = False
    opset: int = DEFAULT_OPSET
    out_dir: str | None = None
    output: str | None = None
    device: str = "auto"
    weights: str | None = None
    model_name: str | None = None
    config: str | None = None
    head: str | None = None
    feature_extractor: str | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r}: only {', '.join(FORMATS)} is supported")
        if self.imgsz is not None:
            self.imgsz = parse_imgsz(self.imgsz)
        if int(self.batch) < 1:
            raise UserError(f"--batch {self.batch}: at least 1")
        self.batch = int(self.batch)
        if not MIN_OPSET <= int(self.opset) <= MAX_OPSET:
            raise UserError(f"--opset {self.opset}: use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
        self.opset = int(self.opset)
        if self.output and not str(self.output).lower().endswith(".onnx"):
            raise UserError(f"--output {self.output}: the file name must end in .onnx")

    def expect(self) -> dict[str, Any]:
        """What the flags claim about the model (describes reference-project checkpoints, checks our own)."""
        return checkpoint_claims(self)


# ---------------------------------------------------------------------------------------------------- graph
class ExportGraph(nn.Module):
    """The exported part of a detector: resized uint8 [B,3,h,w] -> raw head outputs, anchors, level sizes.

    Exactly the first half of torchvision's RetinaNet/SSD/FCOS ``forward`` (transform, backbone, head, anchor
    generator) on the detector's own modules; ``onnx_runtime.DetectionDecoder`` is the second half.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.names = HEAD_OUTPUTS[detector.config.head]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        from torchvision.models.detection.image_list import ImageList

        det = self.detector
        image_list, _ = det.transform(images)
        x = image_list.tensors
        # The transform pads with Python-level arithmetic, which tracing freezes at the example's size; padding
        # again here (by 0 when already a multiple) is traced from the input shape, so dynamic sizes pad right.
        d = int(det.transform.size_divisible)
        x = F.pad(x, (0, -x.shape[-1] % d, 0, -x.shape[-2] % d))
        image_list = ImageList(x, image_list.image_sizes)
        features = list(det.backbone(x).values())
        head = det.head(features)
        anchors = det.anchor_generator(image_list, features)[0]
        level_sizes = torch.stack([torch.as_tensor(f.shape[-2] * f.shape[-1]) for f in features]).to(torch.int64)
        return (*(head[k] for k in self.names), anchors, level_sizes)


# ---------------------------------------------------------------------------------------------------- export
def _output_path(cfg: ExportConfig, checkpoint: Path) -> Path:
    if cfg.output:
        return resolve_path(cfg.output)
    folder = resolve_path(cfg.out_dir) if cfg.out_dir else checkpoint.parent
    return folder / (checkpoint.stem + ".onnx")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def _check_exportable(card: ModelCard, where: str) -> None:
    if card.detector.backbone_impl != "timm":
        raise UserError(f"--model {where}: built with --backbone-impl {card.detector.backbone_impl}; only the timm "
                        f"implementation is exported (the official code is a torch.hub checkout this export does "
                        f"not trace); train with --backbone-impl timm, which loads the same weights")


def _max_rel_diff(ref: Tensor, got: Tensor) -> float:
    """max |ref - got| relative to the largest |ref| (1 where ref is all small), inf on a shape mismatch."""
    if tuple(ref.shape) != tuple(got.shape):
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    ref, got = ref.double(), got.double()
    return float((ref - got).abs().max() / max(1.0, float(ref.abs().max())))


def half_unverified(why: str) -> str:
    """What an fp16 export without a check leaves open, and how to get the check."""
    return (f"{why}, and only that provider runs an fp16 graph: the graph passed onnx.checker, but its outputs were "
            f"NOT compared with PyTorch's (an fp16 overflow or a wrong kernel would go unnoticed); pip install "
            f"onnxruntime-gpu and export again to check it, or compare its boxes with the .pth's on a few images")


def _verify(graph: ExportGraph, onnx_file: Path, example: Tensor, names: list[str], half: bool) -> dict[str, Any]:
    """Run the export with onnxruntime on ``example`` and compare every output with PyTorch's."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise UserError("checking the export needs the onnxruntime package: pip install -r requirements.txt "
                        "(or pass --no-verify)") from None

    providers = ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if example.device.type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    elif half:  # onnxruntime's CPU provider lacks fp16 kernels for most of the graph
        return {"skipped": half_unverified(f"this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                                          f"(it has {', '.join(available)})")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_file), options, providers=providers)
    if half and session.get_providers()[0] != "CUDAExecutionProvider":  # installed, but it could not start here
        return {"skipped": half_unverified(f"onnxruntime {ort.__version__}'s CUDAExecutionProvider could not "
                                          f"start (CUDA / cuDNN libraries it needs are missing)")}
    got = session.run(names, {INPUT_NAME: example.cpu().numpy()})
    with torch.inference_mode():
        ref = graph(example)
    diffs = {n: _max_rel_diff(r.float().cpu(), torch.from_numpy(g).float()) for n, r, g in zip(names, ref, got)}
    tol = 5e-2 if half else 1e-3
    bad = {n: d for n, d in diffs.items() if not d <= tol}
    if bad:
        raise UserError(f"the exported graph does not reproduce PyTorch (relative differences {bad}, tolerance "
                        f"{tol:g}); nothing was written - please report this with the checkpoint's model name/head")
    return {"max_rel_diff": {n: float(f"{d:.3g}") for n, d in diffs.items()}, "tolerance": tol,
            "provider": session.get_providers()[0]}


def export_onnx(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.model``; returns ``{"onnx", "sidecar", "seconds", "verification", ...}``."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise UserError("--format onnx needs the onnx package: pip install -r requirements.txt") from None
    checkpoint = resolve_path(cfg.model)
    if checkpoint.suffix.lower() == ".onnx":
        raise UserError(f"--model {cfg.model} is already an ONNX file; pass the .pth checkpoint it came from")
    if cfg.half and (not torch.cuda.is_available() or cfg.device == "cpu"):
        where = "--device cpu" if cfg.device == "cpu" else "no CUDA GPU is visible here"
        raise UserError(f"--half: an fp16 export is traced on a CUDA GPU ({where}); drop --half (fp32 runs "
                        f"everywhere) or export on a GPU machine")
    device = select_device(("cuda" if cfg.half else "cpu") if cfg.device == "auto" else cfg.device)
    ckpt = prepare_checkpoint(checkpoint, cfg.expect(), cfg.imgsz)
    _check_exportable(ckpt.card, str(checkpoint))
    out = _output_path(cfg, checkpoint)
    if out.resolve() == checkpoint.resolve():
        raise UserError(f"--output {out} would overwrite the checkpoint; choose another name")
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    predictor = Predictor(ckpt, device=device, imgsz=cfg.imgsz, precision="fp32", channels_last=False,
                          weights=cfg.weights, batch_size=cfg.batch)
    model = predictor.model.eval()
    spec = predictor.input_spec
    head = model.config.head
    n_bytes = sum(t.numel() * (2 if cfg.half else t.element_size()) for t in model.state_dict().values())
    if n_bytes > PROTOBUF_LIMIT * 0.95:
        raise UserError(f"--model {cfg.model}: {n_bytes / 1e9:.1f} GB of weights do not fit one ONNX file "
                        f"(protobuf's 2 GB limit); export a smaller backbone")
    if cfg.half:
        model.half()
    graph = ExportGraph(model).eval()
    names = output_names(head)
    dynamic_hw = cfg.dynamic and not spec.fixed_aspect
    if cfg.dynamic and spec.fixed_aspect:
        print("note: --dynamic on an SSD model: dynamic batch only; its default boxes are fractions of the export "
              f"size {spec.imgsz[0]}x{spec.imgsz[1]}, so the input size stays fixed")
    w, h = spec.imgsz
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (cfg.batch, 3, h, w), generator=gen, dtype=torch.uint8).to(device)
    dynamic_axes = None
    if cfg.dynamic:
        image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
        per_anchor = {0: "batch", 1: "anchors"} if dynamic_hw else {0: "batch"}
        dynamic_axes = {INPUT_NAME: image_axes, **{n: per_anchor for n in HEAD_OUTPUTS[head]}}
        if dynamic_hw:
            dynamic_axes["anchors"] = {0: "anchors"}

    with atomic_paths(out, sidecar_path(out)) as (tmp_onnx, tmp_json):
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer / deprecation chatter; the result is checked below
                torch.onnx.export(graph, (example,), str(tmp_onnx), dynamo=False, opset_version=cfg.opset,
                                  input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
        except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise UserError(f"--model {cfg.model}: ONNX export of this {model.config.model_name}/{head} failed at "
                            f"opset {cfg.opset} ({type(exc).__name__}: {_first_line(exc)}); try another --opset "
                            f"or run the .pth") from None
        proto = onnx.load(str(tmp_onnx))
        onnx.checker.check_model(proto)
        verification = _verify(graph, tmp_onnx, example, names, cfg.half) if cfg.verify else {"skipped": "--no-verify"}
        sidecar = OnnxDescription(
            predictor.card,
            graph={"input": INPUT_NAME, "outputs": names, "batch": None if cfg.dynamic else cfg.batch,
                   "dynamic_hw": dynamic_hw, "opset": cfg.opset, "precision": "fp16" if cfg.half else "fp32",
                   "postprocess": "onnx_runtime.DetectionDecoder (torchvision postprocess_detections)"},
            thresholds={"score_thresh": float(model.score_thresh), "nms": float(model.nms_thresh),
                        "max_det": int(model.detections_per_img), "topk_candidates": int(model.topk_candidates)},
            extra={"exported_from": str(checkpoint), "verification": verification})
        text = json.dumps(sidecar.to_dict(), indent=1)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, text
        onnx.save(proto, str(tmp_onnx))
        tmp_json.write_text(text)
    return {"onnx": out, "sidecar": sidecar_path(out), "seconds": time.perf_counter() - t0,
            "verification": verification, "input_shape": list(example.shape), "dynamic_hw": dynamic_hw,
            "mb": out.stat().st_size / 1e6}
