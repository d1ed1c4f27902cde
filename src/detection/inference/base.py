"""What every predictor shares (``PredictorBase``): resize through the input spec, map boxes back, batch by input
size. ``predictor.Predictor`` (PyTorch checkpoints) and ``onnx_runtime.OnnxPredictor`` (ONNX exports) differ only in
``forward``, so both preprocess and post-process identically.

Public predictor interface: ``card`` (``checkpoint.ModelCard``, with the predictor's input spec), ``meta`` (the card
as stored), ``classes``, ``input_spec``, ``keep_aspect``, ``score_thresh``, ``batch_size``, ``device``,
``precision``, ``model_timer``, ``input_size(orig_hw)``, ``preprocess(image)``, ``forward(batch)``,
``postprocess(raw, orig_sizes)``, ``predict(images)``, ``submit(images)`` (-> ``PendingPrediction``), ``describe()``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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


UPLOAD_BUFFERS = 2  # pinned buffers per batch shape: the next batch is filled while the last one may still upload


def can_submit(predictor: Any) -> bool:
    """Whether ``predictor`` has a ``submit`` of its own class (one call in flight), not only ``predict``. Looked up
    on the type: wrappers that forward unknown attributes (``SlicedPredictor``) would otherwise lend theirs."""
    return callable(getattr(type(predictor), "submit", None))


class _UploadBuffer:
    """One of ``upload``'s pinned host buffers and the event recorded right after its last upload (None: unused)."""

    def __init__(self, shape: tuple[int, ...], pinned: bool) -> None:
        self.host = torch.empty(shape, dtype=torch.uint8, pin_memory=pinned)
        self.uploaded: torch.cuda.Event | None = None


@dataclass
class _Launched:
    """A batch whose ``forward_start`` is queued on the GPU: its output, the batch's input size (h, w) and size, and
    the events recorded around it (its device time, read once they completed)."""

    raw: Any
    image_size: tuple[int, int]
    items: int
    events: tuple[torch.cuda.Event, torch.cuda.Event]


class PendingPrediction:
    """The detections of one ``PredictorBase.submit`` call. ``result()`` waits for them (the first call does the
    work, later calls return the same list) and returns what ``predict`` returns for the same images."""

    def __init__(self, count: int) -> None:
        self._results: list[dict[str, torch.Tensor] | None] = [None] * count
        # batches started and not yet finished: (image indices, the call finishing them), oldest first
        self._unfinished: deque[tuple[list[int], Callable[[], list[dict[str, torch.Tensor]]]]] = deque()

    def _add(self, indices: list[int], finish: Callable[[], list[dict[str, torch.Tensor]]], keep: int) -> None:
        """One more started batch; the oldest are finished until at most ``keep`` remain unfinished (each holds
        its forward's outputs on the device until then)."""
        self._unfinished.append((indices, finish))
        self._finish_oldest(keep)

    def _finish_oldest(self, keep: int) -> None:
        while len(self._unfinished) > keep:
            indices, finish = self._unfinished[0]
            for i, pred in zip(indices, finish()):
                self._results[i] = pred
            self._unfinished.popleft()

    def result(self) -> list[dict[str, torch.Tensor]]:
        self._finish_oldest(0)
        return self._results  # type: ignore[return-value]


class PredictorBase:
    """Subclasses set ``card``, ``input_spec``, ``keep_aspect``, ``device``, ``batch_size``, ``classes``,
    ``model_timer`` and implement ``forward`` (resized uint8 batch -> detections in input coordinates) and
    ``score_thresh``; ``forward_start`` / ``forward_finish`` (the forward in two parts, the first free of host
    synchronisation) let ``submit`` return before the device is done on a GPU."""

    card: ModelCard
    input_spec: InputSpec
    keep_aspect: bool
    device: torch.device
    batch_size: int
    _upload_buffers: list[_UploadBuffer] | None = None  # upload's pinned buffers, taken in turn (one shape at a time)
    _upload_turn: int = 0
    _upload_stream: torch.cuda.Stream | None = None  # uploads run beside the forwards, not queued behind them
    _detect_stream: torch.cuda.Stream | None = None  # forward_finish runs beside the next batch's forward

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

    def forward_start(self, batch: torch.Tensor) -> Any:
        """The part of ``forward`` that needs no host synchronisation (on a GPU: queued, not waited for), or None
        where the forward does not split; ``forward_finish(started, batch.shape[-2:])`` then gives ``forward``'s
        detections. The output must stay valid until then, whatever else is started meanwhile."""
        return None

    def forward_finish(self, started: Any, image_size: Sequence[int]) -> list[dict[str, torch.Tensor]]:
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
        images are HWC views), through pinned buffers taken in turn.

        On a GPU the copy runs on a stream of its own, which the current stream waits for: an upload is not queued
        behind the forward before it, and a buffer is refilled once its own last upload is over (never waiting for
        a forward). One batch shape at a time: a new shape frees the old buffers."""
        hwc = all(im.permute(1, 2, 0).is_contiguous() for im in images)
        parts = [im.permute(1, 2, 0) if hwc else im for im in images]
        shape = (len(parts), *parts[0].shape)
        cuda = self.device.type == "cuda"
        buffers = self._upload_buffers
        if not buffers or tuple(buffers[0].host.shape) != shape:  # (a folder of mixed sizes takes the per-image path)
            buffers = self._upload_buffers = [_UploadBuffer(shape, cuda) for _ in range(UPLOAD_BUFFERS if cuda else 1)]
        buf = buffers[self._upload_turn % len(buffers)]
        self._upload_turn += 1
        if buf.uploaded is not None:
            buf.uploaded.synchronize()
        torch.stack(parts, out=buf.host)
        batch = self._to_device(buf) if cuda else buf.host.clone()
        return batch.permute(0, 3, 1, 2) if hwc else batch

    def _to_device(self, buf: _UploadBuffer) -> torch.Tensor:
        """``buf``'s pinned batch on the device, copied on the upload stream without blocking the host; the current
        stream waits for the copy, and the copy's memory is kept from reuse until the current stream is done."""
        current = torch.cuda.current_stream(self.device)
        if self._upload_stream is None:
            self._upload_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._upload_stream):
            batch = buf.host.to(self.device, non_blocking=True)
            buf.uploaded = torch.cuda.Event()
            buf.uploaded.record(self._upload_stream)
        current.wait_event(buf.uploaded)
        batch.record_stream(current)
        return batch

    def postprocess(self, raw: list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to original (H, W) coordinates as float32 CPU tensors: the batch's detections come back in
        one device-to-host copy, then map back on the host."""
        packed, counts, copied = self._download(raw)
        if copied is not None:
            copied.synchronize()
        return self._to_original(packed, counts, orig_sizes)

    def _download(self, raw: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[int], torch.cuda.Event | None]:
        """``postprocess``'s device part: the batch's detections packed as ``[N, 6]`` float32 rows (box, score,
        label) on the host, with the number per image. From a GPU the copy goes to pinned memory without blocking;
        read it after the returned event (recorded on the current stream) completed."""
        counts = [int(det["scores"].shape[0]) for det in raw]
        packed = torch.cat([torch.cat((det["boxes"].float(), det["scores"].float()[:, None],
                                       det["labels"].float()[:, None]), dim=1) for det in raw])
        if packed.device.type != "cuda":
            return packed.cpu(), counts, None
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(packed.device))
        return host, counts, copied

    def _to_original(self, packed: torch.Tensor, counts: list[int], orig_sizes: Sequence[Sequence[int]]
                     ) -> list[dict[str, torch.Tensor]]:
        """``postprocess``'s host part: ``_download``'s rows split per image, boxes mapped to original coordinates."""
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
        return self.submit(images).result()

    def submit(self, images: Sequence[torch.Tensor]) -> PendingPrediction:
        """Start ``predict(images)``; ``result()`` of the returned ``PendingPrediction`` gives what ``predict``
        gives. Keep one call in flight (submit the next batch, then collect this one) to overlap host and device.

        On a GPU each batch (images of one input size, at most ``batch_size``) is uploaded, resized and run through
        ``forward_start`` here, none of which waits for the device, so the caller's host work (decoding, drawing,
        filling the next batch) overlaps it (a call of several batches finishes each but the last one as the next
        one starts). ``result()`` runs ``forward_finish`` (whose NMS reads sizes back to the
        host) on a side stream, so it waits for its own batch only, not for one submitted after it, copies the
        detections to pinned host memory without blocking, waits for that copy, then maps the boxes back. On a CPU
        (nothing to overlap with), and where the forward does not split (``forward_start`` returns None), the whole
        ``forward`` runs here and ``result()`` only maps the boxes back."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(img.shape[-2:]), []).append(i)
        pending = PendingPrediction(len(images))
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                sizes = [tuple(images[i].shape[-2:]) for i in chunk]
                started = self._start(self.preprocess_batch([images[i] for i in chunk]))
                # a call of many batches keeps one unfinished: its device memory stays that of two batches
                pending._add(chunk, partial(self._finish, started, sizes), keep=1)
        return pending

    def _start(self, batch: torch.Tensor) -> _Launched | list[dict[str, torch.Tensor]]:
        """On a GPU, ``forward_start`` on a resized batch between two timing events; elsewhere, or where the forward
        does not split, the whole (self-timed) ``forward``."""
        if self.device.type != "cuda":
            return self.forward(batch)
        current = torch.cuda.current_stream(self.device)
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record(current)
        raw = self.forward_start(batch)
        if raw is None:
            return self.forward(batch)
        events[1].record(current)
        return _Launched(raw, (int(batch.shape[-2]), int(batch.shape[-1])), len(batch), events)

    def _finish(self, started: _Launched | list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                ) -> list[dict[str, torch.Tensor]]:
        """``_start``'s batch -> ``postprocess``'s detections, its forward time added to ``model_timer``."""
        if not isinstance(started, _Launched):  # the whole forward ran (and was timed) in _start
            return self.postprocess(started, orig_sizes)
        if self._detect_stream is None:
            self._detect_stream = torch.cuda.Stream(self.device)
        stream = self._detect_stream
        stream.wait_event(started.events[1])
        with torch.cuda.stream(stream):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            dets = self.forward_finish(started.raw, started.image_size)
            end.record(stream)
            packed, counts, copied = self._download(dets)
        copied.synchronize()  # type: ignore[union-attr]
        # model_timer as ``forward`` fills it, from the events instead of synchronising the device twice a batch
        seconds = (started.events[0].elapsed_time(started.events[1]) + begin.elapsed_time(end)) / 1000.0
        timer = self.model_timer  # type: ignore[attr-defined]
        timer.last = seconds
        timer.seconds += seconds
        timer.items += started.items
        return self._to_original(packed, counts, orig_sizes)

    def _mode(self) -> str:
        """How images are resized, for ``describe``."""
        if self.keep_aspect:
            return "letterbox scale, aspect-preserving input"
        return "letterbox" if self.input_spec.letterbox else "stretch"
