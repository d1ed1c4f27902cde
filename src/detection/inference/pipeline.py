"""Background decode -> batched ``submit``/``result`` (one batch in flight) -> background sink, with bounded queues
(flat memory on long videos).

Each stage runs in its own thread and clocks its own busy time (``StageClock``), so a run can say where its time
went: the slowest stage bounds the end-to-end rate, and end-to-end over that bound is how well the stages overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .base import can_submit

if TYPE_CHECKING:
    from .base import PredictorBase

_END = object()


class StageClock:
    """Busy seconds and items of one pipeline stage (thread-safe enough: each clock is written by one thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.items = 0

    def add(self, seconds: float, items: int = 1) -> None:
        self.seconds += seconds
        self.items += items

    def time(self, items: int = 1) -> _Timed:
        return _Timed(self, items)

    @property
    def ms_per_item(self) -> float:
        return 1000.0 * self.seconds / self.items if self.items else 0.0

    def summary(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 4), "items": self.items, "ms_per_frame": round(self.ms_per_item, 3),
                "fps_alone": round(self.items / self.seconds, 2) if self.seconds > 0 else None}


class _Timed:
    def __init__(self, clock: StageClock, items: int) -> None:
        self.clock, self.items = clock, items

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> bool:
        self.clock.add(time.perf_counter() - self.t0, self.items)
        return False


class _TimedIterator:
    """``iterable`` with the time each ``next`` takes added to ``clock`` (the work of the producing stage)."""

    def __init__(self, iterable: Iterable[Any], clock: StageClock) -> None:
        self._it, self._clock = iter(iterable), clock

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            item = next(self._it)
        except StopIteration:
            self._clock.seconds += time.perf_counter() - t0
            raise
        self._clock.add(time.perf_counter() - t0)
        return item


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

    def queued(self) -> bool:
        """Whether ``next`` has something waiting (an item, the end or an error) and returns without blocking."""
        return not self._q.empty()

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
    """One unit through the pipeline: the caller's ``data`` (original image/frame), the image to predict (``input``:
    original uint8 [3,H,W], RGB, on any device; None when it could not be read, ``error`` says why) and, after
    the forward, its prediction. ``model_seconds``: this item's share of the time its batch kept the pipeline's
    model stage busy (``submit`` and ``result``, or ``predict``: upload, resize, forward, post-processing,
    download, and waiting for the device)."""

    data: Any
    input: torch.Tensor | None
    orig_hw: tuple[int, int]
    error: str | None = None
    pred: dict[str, torch.Tensor] | None = None
    model_seconds: float = 0.0


@dataclass
class _Submitted:
    """A batch handed to the predictor: its items, what ``submit`` returned (or ``predict``'s detections), the
    seconds that took, and the unreadable items taken after it (they leave right after it)."""

    batch: list[Item]
    prediction: Any
    seconds: float
    after: list[Item] = field(default_factory=list)


def run_pipeline(predictor: PredictorBase, items: Iterable[Item], sink: Callable[[Item], None],
                 batch_size: int | None = None, queue_size: int | None = None,
                 clocks: dict[str, StageClock] | None = None) -> dict[str, StageClock]:
    """Decode (``items``, iterated in a background thread) -> batches through the predictor (this thread) ->
    ``sink`` (drawing/encoding, in another thread). Queues are bounded so memory stays flat on long videos.
    Items are delivered to ``sink`` in input order; unreadable ones (``input is None``) pass through untouched.

    One batch stays in flight: batch k is submitted (``predictor.submit``), then batch k-1 collected
    (``result()``) and handed to the sink, so the device works on batch k while this thread and the decode
    thread prepare batch k+1; when no decoded item is waiting, the batch in flight is collected at once (nothing
    to overlap, and a live source's frames are not held back). A predictor with only ``predict`` (e.g.
    ``slicing.SlicedPredictor``) runs each batch to the end before the next.

    Returns the stage clocks ``decode`` (producing items), ``model`` (busy in ``submit`` + ``result``, or
    ``predict``) and ``sink`` (filled into ``clocks`` when given, so they survive an interrupt).

    When ``items`` ends early (a stop request, a closed stream), raises, or a KeyboardInterrupt arrives, every item
    already taken from it still goes through the model and ``sink`` before this returns (or re-raises), so the
    caller can finalize complete outputs; a second interrupt during that stops at once.
    """
    bs = batch_size or predictor.batch_size
    qsize = queue_size or 2 * bs
    clocks = clocks if clocks is not None else {}
    for key in ("decode", "model", "sink"):
        clocks.setdefault(key, StageClock())
    sink_clock = clocks["sink"]
    # looked up on the class: a wrapper forwarding unknown attributes (SlicedPredictor) would hand out the wrapped
    # predictor's submit, which skips the wrapper
    overlapped = can_submit(predictor)

    def timed_sink(item: Item) -> None:
        with sink_clock.time():
            sink(item)

    source = BackgroundIterator(_TimedIterator(items, clocks["decode"]), maxsize=qsize, name="decode")
    worker = BackgroundWorker(timed_sink, maxsize=qsize, name="sink")
    pending: list[Item] = []  # decoded, waiting for a full batch
    in_flight: list[_Submitted] = []  # submitted, not yet collected: one batch between calls
    ready: deque[Item] = deque()  # predicted (or unreadable), waiting for the sink

    def collect(keep: int = 0) -> None:
        """The oldest batches in flight -> ``ready`` (with their predictions, then the unreadable items taken after
        them) until at most ``keep`` remain. A batch leaves ``in_flight`` only once its items are in ``ready``."""
        while len(in_flight) > keep:
            done = in_flight[0]
            t0 = time.perf_counter()
            preds = done.prediction.result() if overlapped else done.prediction  # boxes on the CPU: batch done
            seconds = done.seconds + time.perf_counter() - t0
            clocks["model"].add(seconds, len(done.batch))
            for it, pred in zip(done.batch, preds):
                it.pred, it.model_seconds, it.input = pred, seconds / len(done.batch), None
            ready.extend(done.batch)
            ready.extend(done.after)
            in_flight.pop(0)

    def submit_pending() -> None:
        """``pending`` -> a batch in flight, then the one before it is collected (after the submit, so that the
        device has the new batch queued while this thread waits for and hands out the previous one)."""
        if not pending:
            return
        inputs = [it.input for it in pending]
        t0 = time.perf_counter()
        prediction = predictor.submit(inputs) if overlapped else predictor.predict(inputs)  # type: ignore[arg-type]
        in_flight.append(_Submitted(pending[:], prediction, time.perf_counter() - t0))
        pending.clear()
        collect(keep=1 if overlapped else 0)  # without submit nothing runs in the background: hand it out now

    def flush() -> None:
        while ready:  # an item leaves ``ready`` only once the sink's queue took it
            worker.submit(ready[0])
            ready.popleft()

    def finish() -> None:
        submit_pending()
        collect()
        flush()

    source_error: Exception | None = None
    try:
        while True:
            if in_flight and not source.queued():
                # nothing decoded to prepare while the device works: hand the batch out now, not a batch later (a
                # camera's frames would wait that long)
                collect()
                flush()
            try:
                it = next(source)
            except StopIteration:
                break
            except Exception as exc:  # the source failed: the items it gave before still go through
                source_error = exc
                break
            if it.input is None:
                submit_pending()
                if in_flight:  # it leaves after the batch in flight, which was taken before it
                    in_flight[-1].after.append(it)
                else:
                    ready.append(it)
                flush()
                continue
            pending.append(it)  # ``submit`` / ``predict`` group images of different input sizes themselves
            if len(pending) >= bs:
                submit_pending()
                flush()
    except KeyboardInterrupt:
        finish()
        raise
    else:
        finish()
        if source_error is not None:
            raise source_error
    finally:
        source.close()
        worker.close()
    return clocks
