"""Background decode -> batched forward -> background sink, with bounded queues (flat memory on long videos)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .predictor import Predictor

_END = object()


class BackgroundIterator:
    """Iterate ``iterable`` in a daemon thread through a bounded queue (flat memory, overlapped I/O).

    Exceptions in the producer are re-raised in the consumer; ``close()`` stops the producer early.
    """

    def __init__(self, iterable: Iterable[Any], maxsize: int = 8, name: str = "producer") -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable: Iterable[Any]) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("__error__", exc, _END))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, tuple) and len(item) == 3 and item[0] == "__error__" and item[2] is _END:
            raise item[1]
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


class BackgroundWorker:
    """Run ``fn(item)`` for each ``submit``-ted item in one thread, in order, with a bounded queue."""

    def __init__(self, fn: Callable[[Any], None], maxsize: int = 4, name: str = "consumer") -> None:
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the submitting thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        self._check()
        self._q.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be processed; re-raise the first error."""
        self._q.put(_END)
        self._thread.join()
        self._check()


@dataclass
class Item:
    """One unit through the pipeline: the caller's ``data`` (original image/frame), its model input (None when
    it could not be read; ``error`` says why) and, after the forward, its prediction."""

    data: Any
    input: torch.Tensor | None
    orig_hw: tuple[int, int]
    error: str | None = None
    pred: dict[str, torch.Tensor] | None = None
    model_fps: float = 0.0


def run_pipeline(predictor: Predictor, items: Iterable[Item], sink: Callable[[Item], None],
                 batch_size: int | None = None, queue_size: int | None = None) -> None:
    """Decode/preprocess (``items``, iterated in a background thread) -> batched forward (this thread) ->
    ``sink`` (drawing/encoding, in another thread). Queues are bounded so memory stays flat on long videos.
    Items are delivered to ``sink`` in input order; unreadable ones (``input is None``) pass through untouched.

    When ``items`` ends early (a stop request, a closed stream) or a KeyboardInterrupt arrives, every item already
    taken from it still goes through the model and ``sink`` before this returns (or re-raises the interrupt), so
    the caller can finalize complete outputs; a second interrupt during that stops at once.
    """
    bs = batch_size or predictor.batch_size
    qsize = queue_size or 2 * bs
    source = BackgroundIterator(items, maxsize=qsize, name="decode")
    worker = BackgroundWorker(sink, maxsize=qsize, name="encode")
    pending: list[Item] = []  # decoded, waiting for a full batch
    ready: deque[Item] = deque()  # predicted (or unreadable), waiting for the sink

    def forward_pending() -> None:
        if not pending:
            return
        raw = predictor.forward(torch.stack([it.input for it in pending]))
        fps = len(pending) / predictor.model_timer.last if predictor.model_timer.last > 0 else 0.0
        for it, pred in zip(pending, predictor.postprocess(raw, [it.orig_hw for it in pending])):
            it.pred, it.model_fps, it.input = pred, fps, None
        ready.extend(pending)
        pending.clear()

    def flush() -> None:
        forward_pending()
        while ready:  # an item leaves ``ready`` only once the sink's queue took it
            worker.submit(ready[0])
            ready.popleft()

    try:
        for it in source:
            if it.input is None:
                forward_pending()
                ready.append(it)
                flush()
                continue
            if pending and pending[0].input.shape != it.input.shape:
                flush()
            pending.append(it)
            if len(pending) >= bs:
                flush()
    except KeyboardInterrupt:
        flush()
        raise
    else:
        flush()
    finally:
        source.close()
        worker.close()
