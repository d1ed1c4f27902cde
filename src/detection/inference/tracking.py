"""Multi-object tracking of per-frame detections: ByteTrack IDs (the ``trackers`` package) plus temporal smoothing.

ByteTrack associates in two rounds: detections scoring at least ``threshold`` first, then the low-score ones
(down to whatever the detector returns - feed it the checkpoint's evaluation threshold, e.g. 0.05) with the tracks
left over, so an object whose score dips for a few frames keeps its track. New tracks start only from detections
at ``threshold`` or above and get an ID once seen in ``min_hits`` consecutive frames.

On top of the IDs, each track keeps (our own few lines, because supervision's ``DetectionsSmoother`` averages the
last N boxes - which lags a moving object by half the window - and drops a track in any frame without a detection):
- its box through an alpha-beta (constant-velocity) filter: no jitter, no lag on steady motion;
- its score as an exponential moving average, and its class by score-weighted vote (no class flicker);
- a short hold: a track whose detection is missing is drawn at its predicted box for up to ``hold`` frames
  (while that box stays mostly inside the frame), so a box does not vanish for a frame while the object stays;
- hysteresis: a track is shown while its smoothed score stays at or above ``keep_fraction x threshold``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

KEEP_FRACTION = 0.5  # shown while the smoothed score >= 0.5 x --threshold (measured: benchmarks/bench_tracking.py)


@dataclass
class TrackConfig:
    """Tracking settings; ``threshold`` is the drawing threshold (``--threshold``)."""

    threshold: float = 0.5
    fps: float = 30.0
    buffer: int = 30  # frames (at 30 fps) a lost track is remembered for re-association
    hold: int = 2  # frames a track is drawn at its predicted box while its detection is missing
    min_hits: int = 2  # consecutive frames before a new track gets an ID
    iou: float = 0.3  # min IoU of a track's prediction and a detection (0.3: fewest ID switches on the clip)
    box_gain: float = 0.6  # alpha-beta filter: weight of the new box (1 = no smoothing)
    velocity_gain: float = 0.2  # alpha-beta filter: weight of the new velocity estimate
    score_gain: float = 0.5  # EMA weight of the new score
    keep_fraction: float = KEEP_FRACTION


@dataclass
class Tracked:
    """One frame's tracked objects (arrays of equal length): boxes xyxy float32, smoothed scores, voted labels,
    track IDs (>= 1) and ``held`` (True: no detection this frame, the box is the track's prediction)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    held: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _State:
    box: np.ndarray  # cx, cy, w, h
    vel: np.ndarray
    score: float
    votes: dict[int, float] = field(default_factory=dict)
    misses: int = 0
    shown: bool = False


def _to_cxcywh(b: np.ndarray) -> np.ndarray:
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]], np.float64)


def _to_xyxy(s: np.ndarray) -> np.ndarray:
    w, h = max(s[2], 1e-3), max(s[3], 1e-3)
    return np.array([s[0] - w / 2, s[1] - h / 2, s[0] + w / 2, s[1] + h / 2], np.float32)


class Tracker:
    """``update(boxes, scores, labels)`` once per frame, in order -> ``Tracked``."""

    def __init__(self, cfg: TrackConfig, frame_size: tuple[int, int]) -> None:
        import supervision as sv
        from trackers import ByteTrackTracker

        self._sv = sv
        self.cfg = cfg
        self.width, self.height = frame_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._bytetrack = ByteTrackTracker(
                lost_track_buffer=cfg.buffer, frame_rate=cfg.fps, track_activation_threshold=cfg.threshold,
                minimum_consecutive_frames=cfg.min_hits, minimum_iou_threshold=cfg.iou,
                high_conf_det_threshold=cfg.threshold)
        # remembered as long as ByteTrack may still re-associate the track, then forgotten (bounded memory)
        self._forget_after = max(cfg.hold, math.ceil(cfg.buffer * cfg.fps / 30.0)) + 1
        self.states: dict[int, _State] = {}
        self.shown_ids: dict[int, int] = {}  # track ID -> label it had when last shown

    def _visible_fraction(self, box: np.ndarray) -> float:
        x1, y1, x2, y2 = box
        iw = max(0.0, min(x2, self.width) - max(x1, 0.0))
        ih = max(0.0, min(y2, self.height) - max(y1, 0.0))
        return iw * ih / max((x2 - x1) * (y2 - y1), 1e-6)

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Tracked:
        cfg = self.cfg
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        dets = self._sv.Detections(xyxy=boxes, confidence=np.asarray(scores, np.float32).reshape(-1),
                                   class_id=np.asarray(labels, np.int64).reshape(-1))
        result = self._bytetrack.update(dets)
        seen: set[int] = set()
        for box, score, label, tid in zip(result.xyxy, result.confidence, result.class_id, result.tracker_id):
            if tid < 0:
                continue  # not (yet) a confirmed track
            tid = int(tid) + 1  # trackers counts from 0; MOTChallenge IDs start at 1
            seen.add(tid)
            z = _to_cxcywh(box)
            st = self.states.get(tid)
            if st is None:  # a new ID: ByteTrack started it from a detection >= threshold within min_hits frames
                st = self.states[tid] = _State(z, np.zeros(4), max(float(score), cfg.threshold))
            elif st.misses > cfg.hold:  # back after a longer gap: restart the filter at the new box
                st.box = z
                st.score = cfg.score_gain * float(score) + (1 - cfg.score_gain) * st.score
            else:
                pred = st.box + st.vel
                resid = z - pred
                st.box = pred + cfg.box_gain * resid
                st.vel = st.vel + cfg.velocity_gain * resid
                st.score = cfg.score_gain * float(score) + (1 - cfg.score_gain) * st.score
            st.misses = 0
            st.votes[int(label)] = st.votes.get(int(label), 0.0) + float(score)
        out_boxes, out_scores, out_labels, out_ids, out_held = [], [], [], [], []
        for tid in list(self.states):
            st = self.states[tid]
            if tid not in seen:
                st.misses += 1
                st.box = st.box + st.vel  # coast along the last velocity
                if st.misses >= self._forget_after:
                    del self.states[tid]
                    continue
            box = _to_xyxy(st.box)
            held = tid not in seen
            if held and (st.misses > cfg.hold or not st.shown or self._visible_fraction(box) < 0.5):
                st.shown = False
                continue
            if not held:  # hysteresis: tracks start at >= threshold, and stay while >= keep_fraction x threshold
                st.shown = st.score >= cfg.keep_fraction * cfg.threshold
                if not st.shown:
                    continue
            label = max(st.votes, key=st.votes.get)
            self.shown_ids[tid] = label
            np.clip(box, [0, 0, 0, 0], [self.width, self.height, self.width, self.height], out=box)
            out_boxes.append(box)
            out_scores.append(st.score)
            out_labels.append(label)
            out_ids.append(tid)
            out_held.append(held)
        order = np.argsort(out_ids, kind="stable") if out_ids else np.zeros(0, int)
        return Tracked(np.asarray(out_boxes, np.float32).reshape(-1, 4)[order],
                       np.asarray(out_scores, np.float32)[order], np.asarray(out_labels, np.int64)[order],
                       np.asarray(out_ids, np.int64)[order], np.asarray(out_held, bool)[order])

    def unique_ids_per_label(self) -> dict[int, int]:
        """How many distinct track IDs were shown, by (voted) label."""
        counts: dict[int, int] = {}
        for label in self.shown_ids.values():
            counts[label] = counts.get(label, 0) + 1
        return counts
