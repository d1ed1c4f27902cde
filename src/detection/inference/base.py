"""What every predictor shares (``PredictorBase``): resize through the input spec, map boxes back, batch by input
size. ``predictor.Predictor`` (PyTorch checkpoints) and ``onnx_runtime.OnnxPredictor`` (ONNX exports) differ only in
``forward``, so both preprocess and post-process identically.

Public predictor interface: ``card`` (``checkpoint.ModelCard``, with the predictor's input spec), ``meta`` (the card
as stored), ``classes``, ``input_spec``, ``keep_aspect``, ``score_thresh``, ``batch_size``, ``device``,
``precision``, ``model_timer``, ``input_size(orig_hw)``, ``preprocess(image)``, ``forward(batch)``,
``postprocess(raw, orig_sizes)``, ``predict(images)``, ``describe()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..checkpoint.card import ModelCard
    from ..modeling.input_spec import InputSpec


def score_floor(threshold: float, eval_thresh: float, keep_low_scores: bool) -> float:
    """The lowest score a predictor is built to return: ``threshold`` (``--threshold``), or with
    ``keep_low_scores`` down to the model's evaluation threshold too (predictions files that score like
    ``evaluate --model``)."""
    return min(threshold, float(eval_thresh)) if keep_low_scores else threshold


class PredictorBase:
    """Subclasses set ``card``, ``input_spec``, ``keep_aspect``, ``device``, ``batch_size``, ``classes``,
    ``model_timer`` and implement ``forward`` (resized uint8 batch -> detections in input coordinates) and
    ``score_thresh``."""

    card: ModelCard
    input_spec: InputSpec
    keep_aspect: bool
    device: torch.device
    batch_size: int

    @property
    def meta(self) -> dict[str, Any]:
        """The card as a checkpoint stores it (``classes``, ``category_ids``, ``input``, ...)."""
        return self.card.to_dict()

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.input_spec.imgsz

    @property
    def letterbox(self) -> bool:
        return self.input_spec.letterbox

    @property
    def score_thresh(self) -> float:
        raise NotImplementedError

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

    def _mode(self) -> str:
        """How images are resized, for ``describe``."""
        if self.keep_aspect:
            return "letterbox scale, aspect-preserving input"
        return "letterbox" if self.input_spec.letterbox else "stretch"
