"""One batch in flight: ``Predictor.submit`` / ``PendingPrediction.result`` against ``predict`` and against the
batch-by-batch forward + post-processing (the oracle), and ``run_pipeline`` submitting batch k before collecting
batch k-1 (order, unreadable items, a failing source, predictors with only ``predict``).

The GPU side (streams, events, no host sync in ``submit``) is checked in tests/test_device_paths.py.
"""

from __future__ import annotations

import pytest
import torch

from src.detection.inference import pipeline
from src.detection.inference.pipeline import Item, run_pipeline
from src.detection.inference.predictor import Predictor
from src.detection.inference.slicing import SlicedPredictor

CLASSES = ["__background__", "a", "b", "c"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _spread(model):  # many confident candidates, so equality covers NMS and the top-k
    for m in model.head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pth", CLASSES, imgsz=(96, 64), letterbox=True,
                                prepare=_spread)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, device="cpu", score_thresh=0.05, batch_size=2)


def frame(h: int, w: int, seed: int) -> torch.Tensor:
    """A decoded-frame-like image: a [3,H,W] view of height x width x channel memory."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)


def mixed_images() -> list[torch.Tensor]:
    """Nine images of three original sizes, interleaved (with ``keep_aspect``: three input sizes)."""
    sizes = [(72, 120), (90, 60), (72, 120), (30, 120), (72, 120), (72, 120), (90, 60), (30, 120), (72, 120)]
    return [frame(h, w, seed) for seed, (h, w) in enumerate(sizes)]


def oracle(p: Predictor, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``predict`` as one synchronous pass per batch: group by input size, at most ``batch_size`` at a time,
    ``forward`` then ``postprocess``."""
    out: list = [None] * len(images)
    groups: dict = {}
    for i, im in enumerate(images):
        groups.setdefault(p.input_size(im.shape[-2:]), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), p.batch_size):
            chunk = idx[s:s + p.batch_size]
            preds = p.postprocess(p.forward(p.preprocess_batch([images[i] for i in chunk])),
                                  [images[i].shape[-2:] for i in chunk])
            for i, pred in zip(chunk, preds):
                out[i] = pred
    return out


def assert_same(ours: list[dict[str, torch.Tensor]], theirs: list[dict[str, torch.Tensor]]) -> None:
    assert len(ours) == len(theirs)
    assert sum(len(d["scores"]) for d in theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() == {"boxes", "scores", "labels"}
        assert a["boxes"].dtype == a["scores"].dtype == torch.float32 and a["labels"].dtype == torch.int64
        assert a["boxes"].device.type == "cpu"
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ submit / result
@pytest.mark.parametrize("keep_aspect", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_submit_result_equals_predict_and_the_batch_by_batch_oracle(checkpoint, keep_aspect, batch_size):
    p = Predictor(checkpoint, device="cpu", score_thresh=0.05, batch_size=batch_size, keep_aspect=keep_aspect)
    images = mixed_images()  # more images than batch_size, several sizes
    assert len({p.input_size(im.shape[-2:]) for im in images}) == (3 if keep_aspect else 1)
    expected = oracle(p, images)
    # the boxes are in each image's own coordinates: they reach beyond the model's input size
    assert max(float(d["boxes"][:, 0::2].max()) for d in expected if len(d["boxes"])) > 96
    timed = p.model_timer.items
    pending = p.submit(images)
    got = pending.result()
    assert p.model_timer.items == timed + len(images)
    assert_same(got, expected)
    assert pending.result() is got  # collected once
    assert_same(p.predict(images), expected)
    assert_same(p.submit(images[3:4]).result(), oracle(p, images[3:4]))  # a single image (a batch of its own)


def test_several_submits_before_any_result_equal_sequential_predict(predictor):
    images = mixed_images()
    calls = [images[:3], images[3:4], images[4:9], images[1:2]]
    expected = [predictor.predict(c) for c in calls]
    pendings = [predictor.submit(c) for c in calls]
    for i in reversed(range(len(calls))):  # collected in any order: each call's detections are its own
        assert_same(pendings[i].result(), expected[i])


def test_split_forward_equals_forward(predictor):
    batch = predictor.preprocess_batch([frame(72, 120, s) for s in range(3)])
    started = predictor.forward_start(batch)
    later = predictor.forward_start(predictor.preprocess_batch([frame(72, 120, 9)] * 3))  # started in between
    theirs = predictor.forward(batch)
    ours = predictor.forward_finish(started, batch.shape[-2:])
    assert len(predictor.forward_finish(later, batch.shape[-2:])) == 3
    assert sum(len(d["scores"]) for d in theirs) > 0
    for a, b in zip(ours, theirs):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ run_pipeline
class Recorder:
    """Stands in for a predictor: logs every ``submit`` / ``result`` / ``predict`` with the batch's first item."""

    def __init__(self, inner) -> None:
        self.inner, self.batch_size, self.log = inner, inner.batch_size, []
        self.images: list[list[torch.Tensor]] = []

    def predict(self, images):
        self.log.append(("predict", len(self.images)))
        self.images.append(list(images))
        return self.inner.predict(images)

    def submit(self, images):
        n = len(self.images)
        self.log.append(("submit", n))
        self.images.append(list(images))
        pending = self.inner.submit(images)
        log = self.log

        class Pending:
            def result(self):
                log.append(("result", n))
                return pending.result()

        return Pending()


class PredictOnly(Recorder):
    submit = None  # type: ignore[assignment]


def make_items(images, unreadable=(), fail_after=None, exc=RuntimeError):
    """Items 0..n-1 (``unreadable`` indices have no input); the source raises ``exc`` instead of item ``fail_after``."""
    def gen():
        for i, im in enumerate(images):
            if i == fail_after:
                raise exc("source failed")
            if i in unreadable:
                yield Item(data=i, input=None, orig_hw=(0, 0), error=f"broken {i}")
            else:
                yield Item(data=i, input=im, orig_hw=tuple(im.shape[-2:]))
    return gen()


def expected_batches(n: int, bs: int, unreadable=()) -> list[list[int]]:
    """The batches run_pipeline forms: runs of readable items between unreadable ones, cut every ``bs``."""
    batches, run = [], []
    for i in range(n):
        if i in unreadable:
            batches += [run[s:s + bs] for s in range(0, len(run), bs)]
            run = []
        else:
            run.append(i)
    return batches + [run[s:s + bs] for s in range(0, len(run), bs)]


def check_delivery(seen, images, predictor, batches, unreadable=()):
    """Every taken item reached the sink once, in order, unreadable ones untouched, the others with what
    ``predict`` gives for their batch."""
    taken = sorted({i for b in batches for i in b} | set(unreadable))
    assert [it.data for it in seen] == taken
    by_index = {it.data: it for it in seen}
    for i in unreadable:
        assert by_index[i].pred is None and by_index[i].error == f"broken {i}"
    for batch in batches:
        assert_same([by_index[i].pred for i in batch], predictor.predict([images[i] for i in batch]))
        assert all(by_index[i].input is None and by_index[i].model_seconds > 0 for i in batch)


@pytest.mark.parametrize("unreadable", [(), (0, 3, 4, 9, 13)])
def test_pipeline_keeps_one_batch_in_flight_in_order(predictor, monkeypatch, unreadable):
    """With decoded items always waiting, batch k+1 is submitted before batch k is collected."""
    monkeypatch.setattr(pipeline.BackgroundIterator, "queued", lambda self: True)
    images = [frame(72, 120, s) if s % 5 else frame(90, 60, s) for s in range(14)]
    rec = Recorder(predictor)
    seen: list[Item] = []
    clocks = run_pipeline(rec, make_items(images, unreadable), seen.append, batch_size=3)
    batches = expected_batches(len(images), 3, unreadable)
    position = {id(im): i for i, im in enumerate(images)}
    assert [[position[id(im)] for im in b] for b in rec.images] == batches
    n = len(batches)
    assert rec.log == [("submit", 0)] + [e for k in range(1, n) for e in (("submit", k), ("result", k - 1))] + [
        ("result", n - 1)]
    check_delivery(seen, images, predictor, batches, unreadable)
    readable = len(images) - len(unreadable)
    assert clocks["model"].items == readable and clocks["sink"].items == len(images)
    assert sum(it.model_seconds for it in seen) == pytest.approx(clocks["model"].seconds)


def test_pipeline_collects_at_once_when_nothing_is_decoded(predictor, monkeypatch):
    """A live source: nothing waits in the decode queue, so no batch is held back behind the next one."""
    monkeypatch.setattr(pipeline.BackgroundIterator, "queued", lambda self: False)
    images = [frame(72, 120, s) for s in range(7)]
    rec = Recorder(predictor)
    seen: list[Item] = []
    run_pipeline(rec, make_items(images), seen.append, batch_size=3)
    assert rec.log == [("submit", 0), ("result", 0), ("submit", 1), ("result", 1), ("submit", 2), ("result", 2)]
    check_delivery(seen, images, predictor, expected_batches(7, 3))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("fail_after", [4, 6, 7])
def test_failing_source_still_delivers_every_taken_item(predictor, monkeypatch, exc, fail_after):
    """The error reaches the caller after the items taken before it went through model and sink (the batch in
    flight and the unfinished one included)."""
    monkeypatch.setattr(pipeline.BackgroundIterator, "queued", lambda self: True)
    images = [frame(72, 120, s) for s in range(10)]
    seen: list[Item] = []
    with pytest.raises(exc, match="source failed"):
        run_pipeline(Recorder(predictor), make_items(images, (2,), fail_after=fail_after, exc=exc), seen.append,
                     batch_size=2)
    check_delivery(seen, images, predictor, expected_batches(fail_after, 2, (2,)), (2,))


def test_predictor_without_submit_runs_each_batch_to_the_end(predictor, monkeypatch):
    monkeypatch.setattr(pipeline.BackgroundIterator, "queued", lambda self: True)
    images = [frame(72, 120, s) for s in range(5)]
    rec = PredictOnly(predictor)
    seen: list[Item] = []
    run_pipeline(rec, make_items(images, (1,)), seen.append, batch_size=2)
    assert rec.log == [("predict", 0), ("predict", 1), ("predict", 2)]
    check_delivery(seen, images, predictor, [[0], [2, 3], [4]], (1,))


def test_sliced_predictor_keeps_one_batch_in_flight(predictor, monkeypatch):
    """``SlicedPredictor`` forwards unknown attributes to the predictor it wraps: the pipeline must go through its
    own ``submit`` (tiles + merge), which submits each batch's tiles in one call to the wrapped ``submit`` and
    collects them one batch later, as unsliced runs do."""
    monkeypatch.setattr(pipeline.BackgroundIterator, "queued", lambda self: True)
    rec = Recorder(predictor)
    sliced = SlicedPredictor(rec, (64, 48), overlap=0.2)
    images = [frame(72, 120, s) for s in range(6)]
    seen: list[Item] = []
    run_pipeline(sliced, make_items(images), seen.append, batch_size=2)
    assert [it.data for it in seen] == list(range(6))
    assert rec.log == [("submit", 0), ("submit", 1), ("result", 0), ("submit", 2), ("result", 1), ("result", 2)]
    assert all(len(call) > 2 for call in rec.images)  # a batch's tiles (and whole images), not its two images
    reference = SlicedPredictor(PredictOnly(predictor), (64, 48), overlap=0.2)
    for s in (0, 2, 4):
        assert_same([seen[i].pred for i in (s, s + 1)], reference.predict(images[s:s + 2]))
