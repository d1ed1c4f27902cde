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
    _pinned: dict[tuple[int, ...], torch.Tensor] | None = None  # upload's reused pinned buffer (one size at a time)
    _upload_done: torch.cuda.Event | None = None  # when the last upload from that buffer finished

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

    def preprocess_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Original uint8 [3,H,W] images of one input size -> the resized ``[B,3,h,w]`` uint8 batch on the device.

        On a GPU, images of one original size (video frames, a camera) travel as one upload and are resized in one
        call: decoded frames are height x width x channel in memory (``[3,H,W]`` views of them), so they are stacked
        in that layout into a pinned buffer (one copy), uploaded without blocking and resized on the device as a
        channels-last batch. Elsewhere each image is resized on its own, as the validation loader does."""
        same = len({tuple(im.shape) for im in images}) == 1
        if self.device.type != "cuda" or not same or len(images) == 1 and images[0].device.type == "cuda":
            return torch.stack([self.preprocess(im) for im in images])
        return self.input_spec.preprocess(self.upload(images), self.keep_aspect)

    def upload(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Equal-size uint8 [3,H,W] host images -> one ``[B,3,H,W]`` device tensor (channels-last strides when the
        images are HWC views), through a reused pinned buffer."""
        hwc = all(im.permute(1, 2, 0).is_contiguous() for im in images)
        parts = [im.permute(1, 2, 0) if hwc else im for im in images]
        shape = (len(parts), *parts[0].shape)
        if self._pinned is None:
            self._pinned = {}
        buffers = self._pinned
        buf = buffers.get(shape)
        cuda = self.device.type == "cuda"
        if buf is None:
            buffers.clear()  # one size at a time (a folder of mixed sizes takes the per-image path)
            buf = buffers[shape] = torch.empty(shape, dtype=torch.uint8, pin_memory=cuda)
        elif self._upload_done is not None:  # the last upload from it must be over before reuse
            self._upload_done.synchronize()
        torch.stack(parts, out=buf)
        batch = buf.to(self.device, non_blocking=True) if cuda else buf.clone()
        if cuda:
            self._upload_done = torch.cuda.Event()
            self._upload_done.record()
        return batch.permute(0, 3, 1, 2) if hwc else batch

    def postprocess(self, raw: list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to original (H, W) coordinates as float32 CPU tensors: the batch's detections come back in
        one device-to-host copy, then map back on the host."""
        counts = [int(det["scores"].shape[0]) for det in raw]
        packed = torch.cat([torch.cat((det["boxes"].float(), det["scores"].float()[:, None],
                                       det["labels"].float()[:, None]), dim=1) for det in raw]).cpu()
        sizes = [(int(hw[0]), int(hw[1])) for hw in orig_sizes]
        if len(set(sizes)) == 1:  # frames of one video or camera: one mapping for the whole batch
            boxes = self.input_spec.boxes_to_original(packed[:, :4], sizes[0], self.keep_aspect).split(counts)
        else:
            boxes = [self.input_spec.boxes_to_original(part[:, :4], hw, self.keep_aspect)
                     for part, hw in zip(packed.split(counts), sizes)]
        scores, labels = packed[:, 4].split(counts), packed[:, 5].to(torch.int64).split(counts)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for original uint8 [3,H,W] images, in their own coordinates (batched by input size)."""
        results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(img.shape[-2:]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                batch = self.preprocess_batch([images[i] for i in chunk])
                preds = self.postprocess(self.forward(batch), [images[i].shape[-2:] for i in chunk])
                for i, p in zip(chunk, preds):
                    results[i] = p
        return results  # type: ignore[return-value]

    def _mode(self) -> str:
        """How images are resized, for ``describe``."""
        if self.keep_aspect:
            return "letterbox scale, aspect-preserving input"
        return "letterbox" if self.input_spec.letterbox else "stretch"
