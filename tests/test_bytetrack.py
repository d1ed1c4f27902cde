"""The vectorized ByteTrack against its oracle, ``trackers.ByteTrackTracker``, on seeded random sequences.

Per frame: the same (detection index, tracker ID) pairs in the same order, and the same tracks alive with the same
IDs, counters and Kalman states (the states catch a wrong covariance or noise long before it changes an ID).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from src.detection.inference.bytetrack import ByteTrack
from src.detection.inference.tracking import TrackConfig, Tracker

sv = pytest.importorskip("supervision")
trackers = pytest.importorskip("trackers")


def random_sequence(seed: int, n_frames: int, thresholds: tuple[float, ...], size: float = 400.0):
    """Frames of (boxes float32 (M, 4), scores float32 (M,)): objects that move with noise, appear, leave, hide
    for a few frames and come back, cross each other; scores on both sides of every threshold (and exactly on
    them); empty frames, crowded frames, duplicate boxes, false positives; detections in random order."""
    rng = np.random.default_rng(seed)
    objects: list[dict] = []
    frames = []
    for _ in range(n_frames):
        if rng.random() < 0.15 or len(objects) < 3:
            wh = rng.uniform(15, 60, 2)
            objects.append({"pos": rng.uniform(0, size - 60, 2), "wh": wh, "vel": rng.normal(0, 3, 2),
                            "life": int(rng.integers(5, 150)), "hidden": 0})
        boxes, scores = [], []
        for o in objects:
            o["vel"] += rng.normal(0, 0.3, 2)
            o["pos"] += o["vel"]
            o["wh"] = np.clip(o["wh"] + rng.normal(0, 0.5, 2), 5, 90)
            o["life"] -= 1
            if o["hidden"] > 0:
                o["hidden"] -= 1
                continue
            if rng.random() < 0.05:
                o["hidden"] = int(rng.integers(1, 6))
                continue
            box = np.concatenate([o["pos"], o["pos"] + o["wh"]]) + rng.normal(0, 1.0, 4)
            boxes.append(box)
            scores.append(_score(rng, thresholds))
            if rng.random() < 0.03:  # a duplicate, same box, its own score
                boxes.append(box.copy())
                scores.append(_score(rng, thresholds))
        objects = [o for o in objects if o["life"] > 0 and -100 < o["pos"][0] < size + 100]
        n_fp = int(rng.integers(20, 50)) if rng.random() < 0.03 else int(rng.poisson(0.7))
        for _ in range(n_fp):
            p = rng.uniform(0, size, 2)
            boxes.append(np.concatenate([p, p + rng.uniform(5, 60, 2)]))
            scores.append(_score(rng, thresholds))
        if rng.random() < 0.04:
            boxes, scores = [], []
        order = rng.permutation(len(boxes))
        frames.append((np.asarray(boxes, np.float32).reshape(-1, 4)[order],
                       np.asarray(scores, np.float32).reshape(-1)[order]))
    return frames


def _score(rng: np.random.Generator, thresholds: tuple[float, ...]) -> float:
    u = rng.random()
    if u < 0.08:  # on a threshold, or the float32 step below it
        t = np.float32(rng.choice(thresholds))
        return float(t if rng.random() < 0.5 else np.nextafter(t, np.float32(0)))
    return float(rng.uniform(0.5, 1.0) if u < 0.7 else rng.uniform(0.02, 0.7))


CONFIGS = [  # min_hits, buffer, frame_rate, iou, activation threshold, high-score threshold
    (1, 30, 30.0, 0.3, 0.5, 0.5),
    (2, 30, 30.0, 0.1, 0.6, 0.5),
    (3, 1, 15.0, 0.3, 0.5, 0.6),
    (2, 0, 30.0, 0.3, 0.5, 0.5),
    (1, 30, 60.0, 0.1, 0.5, 0.6),
    (3, 30, 15.0, 0.1, 0.6, 0.6),
    (2, 1, 60.0, 0.3, 0.6, 0.5),
    (1, 0, 15.0, 0.1, 0.6, 0.6),
    (2, 30, 30.0, 0.3, 0.7, 0.7),  # float32(0.7) < 0.7: the split compares in float32, activation in float64
]


def _kwargs(min_hits, buffer, frame_rate, iou, act, high) -> dict:
    return dict(lost_track_buffer=buffer, frame_rate=frame_rate, track_activation_threshold=act,
                minimum_consecutive_frames=min_hits, minimum_iou_threshold=iou, high_conf_det_threshold=high)


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    """Equal shapes and every element within ``tol`` relative to its magnitude (at least 1)."""
    return a.shape == b.shape and bool((np.abs(a - b) <= tol * np.maximum(np.abs(b), 1.0)).all())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "hits{}-buf{}-fps{:g}-iou{}-act{}-high{}".format(*c))
def test_matches_trackers_bytetrack(config) -> None:
    kwargs = _kwargs(*config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = trackers.ByteTrackTracker(**kwargs)
    ours = ByteTrack(**kwargs)
    frames = random_sequence(seed=CONFIGS.index(config), n_frames=200,
                             thresholds=(config[4], config[5]))
    n_ids = 0
    for f, (boxes, scores) in enumerate(frames):
        dets = sv.Detections(xyxy=boxes, confidence=scores, class_id=np.arange(len(boxes)))  # class_id: the index
        expected = oracle.update(dets)
        idx, ids = ours.update(boxes, scores)
        assert idx.tolist() == expected.class_id.tolist(), f"frame {f}"
        assert ids.tolist() == expected.tracker_id.tolist(), f"frame {f}"
        assert _close(boxes[idx], expected.xyxy, 1e-6), f"frame {f}"
        # the same tracks, in the same order, with the same counters and Kalman states
        assert len(ours) == len(oracle.tracks), f"frame {f}"
        assert ours.tracker_ids.tolist() == [t.tracker_id for t in oracle.tracks], f"frame {f}"
        assert ours.time_since_update.tolist() == [t.time_since_update for t in oracle.tracks], f"frame {f}"
        assert ours.consecutive_updates.tolist() == [
            t.number_of_successful_consecutive_updates for t in oracle.tracks], f"frame {f}"
        if len(ours):
            kf = [t.state_estimator.kf for t in oracle.tracks]
            assert _close(ours.means, np.stack([k.state[:, 0] for k in kf]), 1e-9), f"frame {f}"
            assert _close(ours.covariances, np.stack([k.state_covariance for k in kf]), 1e-9), f"frame {f}"
        n_ids = max(n_ids, int(ids.max(initial=-1)) + 1)
    assert n_ids > 10  # the sequence exercised confirmation, not just empty output


def test_empty_and_scoreless_input() -> None:
    bt = ByteTrack(minimum_consecutive_frames=1, track_activation_threshold=0.5)
    idx, ids = bt.update(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    assert idx.shape == ids.shape == (0,) and idx.dtype == ids.dtype == np.int64
    box = np.array([[10, 10, 50, 50]], np.float32)
    assert bt.update(box)[1].tolist() == [-1]  # no scores: all 1, a new track
    assert bt.update(box + 1)[1].tolist() == [0]
    with pytest.raises(ValueError):
        bt.update(np.array([[0, 0, np.nan, 1]], np.float32), np.ones(1, np.float32))


def test_state_stays_bounded_on_a_long_sequence() -> None:
    """Tracks that leave are pruned from the stacked arrays (and from the smoothing state): memory does not grow
    with the length of the video, and a few empty frames past the buffer leave nothing behind."""
    tracker = Tracker(TrackConfig(threshold=0.5, buffer=10), (400, 400))
    bt = tracker._bytetrack
    sizes, states = [], []
    for boxes, scores in random_sequence(seed=7, n_frames=800, thresholds=(0.5,)):
        tracker.update(boxes, scores, np.zeros(len(boxes), np.int64))
        sizes.append(len(bt))
        states.append(len(tracker._ids))
    assert bt._next_id > 80  # many tracks came and went
    assert max(sizes) < 80 and max(states) < 80
    assert np.mean(sizes[-250:]) < 2 * np.mean(sizes[:250]) + 5
    for _ in range(bt.maximum_frames_without_update + 1):
        tracker.update(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert len(bt) == 0 and bt.state.shape[-1] == bt.cov.shape[-1] == 0
    assert bt.means.shape == (0, 8) and bt.covariances.shape == (0, 8, 8)
    assert len(tracker._ids) == 0 and tracker._votes.shape[0] == 0
