"""Multi-object tracking of per-frame detections: ByteTrack IDs (``bytetrack.py``: the ``trackers`` package's
ByteTrack with its Kalman filters vectorized) plus temporal smoothing.

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
from dataclasses import dataclass

import numpy as np

from .bytetrack import ByteTrack

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


# Box conversions as small products (fewer numpy calls): every output is the sum of two exact terms (halves and
# +-1 multiples), so for boxes of any ordinary size it rounds exactly as (x1 + x2) / 2, x2 - x1, cx - w / 2 would.
_XYXY_TO_CXCYWH = np.array([[0.5, 0, -1, 0], [0, 0.5, 0, -1], [0.5, 0, 1, 0], [0, 0.5, 0, 1]], np.float32)
_CXCYWH_TO_XYXY = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]])
_NEVER = np.iinfo(np.int64).max
_MIN_CXCYWH = np.array([-np.inf, -np.inf, 1e-3, 1e-3])  # boxes are drawn at least 1e-3 wide and high


class Tracker:
    """``update(boxes, scores, labels)`` once per frame, in order -> ``Tracked``.

    Each track's smoothing state is a row of a few arrays (rows in the order the tracks first got an ID), so a
    frame is a fixed number of whole-array numpy operations however many objects there are.
    """

    def __init__(self, cfg: TrackConfig, frame_size: tuple[int, int]) -> None:
        self.cfg = cfg
        self.width, self.height = frame_size
        self._bytetrack = ByteTrack(
            lost_track_buffer=cfg.buffer, frame_rate=cfg.fps, track_activation_threshold=cfg.threshold,
            minimum_consecutive_frames=cfg.min_hits, minimum_iou_threshold=cfg.iou,
            high_conf_det_threshold=cfg.threshold)
        # remembered as long as ByteTrack may still re-associate the track, then forgotten (bounded memory)
        self._forget_after = max(cfg.hold, math.ceil(cfg.buffer * cfg.fps / 30.0)) + 1
        self._keep_score = cfg.keep_fraction * cfg.threshold
        self._frame_max = np.array([self.width, self.height], np.float32)
        self._frame_max4 = np.tile(self._frame_max, 2)
        self._ids = np.zeros(0, np.int64)
        self._box = np.zeros((0, 4))  # cx, cy, w, h
        self._vel = np.zeros((0, 4))
        self._score = np.zeros(0)
        self._misses = np.zeros(0, np.int64)
        self._shown = np.zeros(0, bool)
        self._label = np.zeros(0, np.int64)  # the voted label
        self._in_id_order = True  # rows sorted by ID (they are, unless an ID forgotten here came back)
        # class votes: summed scores per (track, label column), -inf where the track never had that label; a tie
        # goes to the label the track had first (the frame of its first vote), as a dict's max() in insertion order
        self._votes = np.zeros((0, 0))
        self._first_vote = np.zeros((0, 0), np.int64)
        self._label_col: dict[int, int] = {}
        self._col_label = np.zeros(0, np.int64)
        self._frame = 0
        self.shown_ids: dict[int, int] = {}  # track ID -> label it had when last shown

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Tracked:
        cfg = self.cfg
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
        self._frame += 1
        idx, tids = self._bytetrack.update(boxes, scores)
        confirmed = tids >= 0  # -1: not (yet) a confirmed track
        if np.count_nonzero(confirmed) < len(tids):
            idx, tids = idx[confirmed], tids[confirmed]
        tids = tids + 1  # trackers counts from 0; MOTChallenge IDs start at 1
        z = (boxes[idx] @ _XYXY_TO_CXCYWH).astype(np.float64)  # in float32, like the boxes
        score = scores[idx].astype(np.float64)
        label = labels[idx]

        n = len(self._ids)
        rows, new = self._rows_of(tids)
        old = rows if new is None else rows[~new]
        if n:
            # alpha-beta filter on every row at once: the rows seen again move toward their new box, the others
            # (zero residual) coast along their velocity
            pred = self._box + self._vel
            target = pred.copy()
            target[old] = z if new is None else z[~new]
            resid = target - pred
            restart = old[self._misses[old] > cfg.hold]
            if len(restart):  # back after a longer gap: restart at the new box, keep the velocity
                resid[restart] = 0.0
            self._box = pred + cfg.box_gain * resid
            if len(restart):
                self._box[restart] = target[restart]
            self._vel += cfg.velocity_gain * resid
            s_old = score if new is None else score[~new]
            self._score[old] = cfg.score_gain * s_old + (1 - cfg.score_gain) * self._score[old]
            self._misses += 1
            self._misses[old] = 0
        if new is not None:  # new IDs: ByteTrack started them from detections >= threshold within min_hits frames
            self._append(tids[new], z[new], np.maximum(score[new], cfg.threshold))
        self._vote(rows, label, score, new)

        gone = self._misses >= self._forget_after
        if np.count_nonzero(gone):
            self._keep(~gone)
        held = self._misses > 0
        xyxy = (np.maximum(self._box, _MIN_CXCYWH) @ _CXCYWH_TO_XYXY).astype(np.float32)
        # drawn at the prediction while recently shown, within hold and mostly inside the frame
        show_held = held & self._shown & (self._misses <= cfg.hold)
        maybe = show_held.nonzero()[0]
        if len(maybe):
            show_held[maybe[self._visible_fraction(xyxy[maybe]) < 0.5]] = False
        # hysteresis: tracks start at >= threshold, and stay while >= keep_fraction x threshold
        self._shown = np.where(held, show_held, self._score >= self._keep_score)
        out = self._shown.nonzero()[0]
        ids, label = self._ids[out], self._label[out]
        self.shown_ids.update(zip(ids.tolist(), label.tolist()))
        if not self._in_id_order:  # output by ID
            order = ids.argsort(kind="stable")
            out, ids, label = out[order], ids[order], label[order]
        box = np.minimum(np.maximum(xyxy[out], 0), self._frame_max4)
        return Tracked(box, self._score[out].astype(np.float32), label, ids, held[out])

    def _rows_of(self, tids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of track IDs ``tids``, new rows numbered after the existing ones, and which are new (None: none)."""
        n = len(self._ids)
        if not n:
            return np.arange(len(tids)), (np.ones(len(tids), bool) if len(tids) else None)
        if self._in_id_order:
            rows = self._ids.searchsorted(tids)
            known = self._ids[np.minimum(rows, n - 1)] == tids
        else:
            same = tids[:, None] == self._ids
            known, rows = np.logical_or.reduce(same, axis=1), same.argmax(axis=1)
        if np.count_nonzero(known) == len(tids):
            return rows, None
        new = ~known
        rows[new] = np.arange(n, n + np.count_nonzero(new))
        return rows, new

    def _append(self, ids: np.ndarray, box: np.ndarray, score: np.ndarray) -> None:
        k, n_labels = len(ids), self._votes.shape[1]
        # rows are in creation order; new IDs come in increasing order, but an ID forgotten here may come back
        if len(self._ids) and ids[0] < self._ids[-1] or np.count_nonzero(ids[1:] < ids[:-1]):
            self._in_id_order = False
        self._ids = np.concatenate([self._ids, ids])
        self._box = np.concatenate([self._box, box])
        self._vel = np.concatenate([self._vel, np.zeros((k, 4))])
        self._score = np.concatenate([self._score, score])
        self._misses = np.concatenate([self._misses, np.zeros(k, np.int64)])
        self._shown = np.concatenate([self._shown, np.zeros(k, bool)])
        self._label = np.concatenate([self._label, np.zeros(k, np.int64)])
        self._votes = np.concatenate([self._votes, np.full((k, n_labels), -np.inf)])
        self._first_vote = np.concatenate([self._first_vote, np.zeros((k, n_labels), np.int64)])

    def _keep(self, keep: np.ndarray) -> None:
        self._ids, self._box, self._vel = self._ids[keep], self._box[keep], self._vel[keep]
        self._score, self._misses, self._shown = self._score[keep], self._misses[keep], self._shown[keep]
        self._label, self._votes, self._first_vote = self._label[keep], self._votes[keep], self._first_vote[keep]
        if not self._in_id_order:
            self._in_id_order = not np.count_nonzero(self._ids[1:] < self._ids[:-1])

    def _vote(self, rows: np.ndarray, labels: np.ndarray, scores: np.ndarray, new: np.ndarray | None) -> None:
        """Add ``scores`` to the votes of rows ``rows`` for ``labels`` and update the rows' voted labels (``new``:
        which rows were just created, None: none)."""
        if not len(rows):
            return
        get = self._label_col.get
        cols = [get(label, -1) for label in labels.tolist()]
        if -1 in cols:
            for i, label in enumerate(labels.tolist()):
                if cols[i] == -1:
                    cols[i] = self._label_col.get(label, -1)
                    if cols[i] == -1:  # a label never seen before: a new column
                        cols[i] = self._label_col[label] = len(self._label_col)
                        self._col_label = np.append(self._col_label, label)
                        self._votes = np.pad(self._votes, ((0, 0), (0, 1)), constant_values=-np.inf)
                        self._first_vote = np.pad(self._first_vote, ((0, 0), (0, 1)))
        cols = np.asarray(cols)
        votes = self._votes[rows, cols]
        # a vote >= 0 for a row's current label keeps it the winner; only other votes (new rows, other labels,
        # first votes among them) need the rows' votes looked at again
        recount = (labels != self._label[rows]) | ~(scores >= 0)
        if new is not None:
            recount |= new
        recount = recount.nonzero()[0]
        if len(recount):
            first = recount[votes[recount] == -np.inf]
            self._first_vote[rows[first], cols[first]] = self._frame
            votes[first] = 0.0
        self._votes[rows, cols] = votes + scores
        if len(recount):
            recount = rows[recount]
            votes = self._votes[recount]
            tied = votes == votes.max(axis=1)[:, None]
            first_vote = np.where(tied, self._first_vote[recount], _NEVER)
            self._label[recount] = self._col_label[first_vote.argmin(axis=1)]

    def _visible_fraction(self, box: np.ndarray) -> np.ndarray:
        """Fraction of each float32 xyxy box inside the frame (in float32)."""
        inside = np.minimum(box[:, 2:], self._frame_max) - np.maximum(box[:, :2], 0)
        np.maximum(inside, 0, out=inside)
        side = box[:, 2:] - box[:, :2]
        return inside[:, 0] * inside[:, 1] / np.maximum(side[:, 0] * side[:, 1], np.float32(1e-6))

    def unique_ids_per_label(self) -> dict[int, int]:
        """How many distinct track IDs were shown, by (voted) label."""
        counts: dict[int, int] = {}
        for label in self.shown_ids.values():
            counts[label] = counts.get(label, 0) + 1
        return counts
