"""ByteTrack with all tracks' Kalman filters held as stacked arrays: a drop-in for ``trackers.ByteTrackTracker``.

It computes exactly what ``trackers.ByteTrackTracker`` (2.6) computes as we configure it - the corner-based
``XYXYStateEstimator`` (state x1, y1, x2, y2 and their velocities), plain IoU, fixed-rate mode (no timestamps) -
with the same two-stage association (``scipy``'s ``linear_sum_assignment``), the same track lifecycle (pruning,
immature tracks, IDs allocated from 0, ``-1`` for unconfirmed tracks) and the same output order. The library keeps
one Python Kalman filter object per track and predicts and updates them one at a time with small numpy calls:
at 30 tracks that alone costs more than a frame's budget at a few hundred FPS. Here all tracks' states are
stacked arrays and each step is a fixed number of whole-array numpy operations, whatever the number of tracks;
plain arrays in and out, no ``supervision.Detections``.

``trackers.ByteTrackTracker`` stays a dependency: it is the oracle ``tests/test_bytetrack.py`` compares against,
frame by frame (IDs, order and the Kalman states themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

_DIM = 8  # x1, y1, x2, y2, vx1, vy1, vx2, vy2
# The library's ByteTrack tuning: its filter defaults (identity) x 0.01 for Q and x 0.1 for R, and P starts as the
# identity; in fixed-rate mode Q is that one-frame Q (no gap scaling) and nothing depends on the box size. F couples
# each corner only to its own velocity and H = [I 0], so with these P0, Q and R the 8x8 covariance is the same
# 2x2 (position, velocity) block for each of the four coordinates, and the gain the same for all four. Only that
# block is stored and computed, elementwise, adding the same terms in the same order as the library's 8x8
# products (equal to the last bit).
_Q = 0.01
_R = 0.1
_Q22 = np.array([[_Q, 0.0], [0.0, _Q]])[:, :, None]
_EMPTY_INT = np.zeros(0, np.int64)
_EMPTY_INT.flags.writeable = False


def max_frames_without_update(lost_track_buffer: int, frame_rate: float) -> int:
    """Missed frames a track survives: ``lost_track_buffer`` is in 30 FPS frames (as the library scales it)."""
    if lost_track_buffer < 0:
        raise ValueError("lost_track_buffer must be greater than or equal to 0")
    if not math.isfinite(frame_rate) or frame_rate <= 0:
        raise ValueError("frame_rate must be a finite positive value")
    if lost_track_buffer == 0:
        return 0
    scaled = frame_rate / 30.0 * lost_track_buffer
    if not math.isfinite(scaled):
        raise ValueError("frame_rate / 30.0 * lost_track_buffer must be finite")
    return max(1, math.ceil(scaled))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given coordinate-major, a (4, N) x b (4, M) float64 (rows x1, y1, x2, y2), as float32 with
    ``supervision.box_iou_batch``'s arithmetic (float64, then rounded): association compares these values, so
    they must round the same way."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return np.zeros((a.shape[1], b.shape[1]), np.float32)
    wh = np.minimum(a[2:, :, None], b[2:, None, :])  # (2, N, M): the intersection's width and height
    wh -= np.maximum(a[:2, :, None], b[:2, None, :])
    np.maximum(wh, 0.0, out=wh)
    inter = wh[0] * wh[1]
    side_a, side_b = a[2:] - a[:2], b[2:] - b[:2]
    union = (side_a[0] * side_a[1])[:, None] + side_b[0] * side_b[1]
    union -= inter
    out = np.zeros(inter.shape, np.float32)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _associate(similarity: np.ndarray, threshold: float, assign: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the optimal assignment (``assign``: scipy's ``linear_sum_assignment``, as the library),
    pairs below ``threshold`` dropped; rows ascending."""
    if similarity.shape[0] == 0 or similarity.shape[1] == 0:
        return _EMPTY_INT, _EMPTY_INT
    rows, cols = assign(similarity, maximize=True)
    ok = similarity[rows, cols] >= threshold  # float32 against the threshold rounded to float32, as the library
    if np.count_nonzero(ok) < len(ok):
        rows, cols = rows[ok], cols[ok]
    return rows, cols


def _others(n: int, taken: np.ndarray) -> np.ndarray:
    """0 .. n-1 without ``taken``, ascending."""
    if len(taken) == 0:
        return np.arange(n)
    used = np.zeros(n, bool)
    used[taken] = True
    return (~used).nonzero()[0]


class ByteTrack:
    """``update(boxes, scores)`` once per frame -> (detection indices, tracker IDs), in ``trackers``' output order.

    Arguments as ``trackers.ByteTrackTracker``'s (same defaults). Track ``i`` is column ``i`` of the state arrays,
    in the library's track-list order (creation order, pruned tracks removed): ``state[0, :, i]`` its box (x1, y1,
    x2, y2), ``state[1, :, i]`` its velocity, ``cov[:, :, i]`` its 2x2 (position, velocity) covariance (the same
    for every coordinate). Tracks run along the last axis so that every step is a few whole-array operations;
    ``means`` (N, 8) and ``covariances`` (N, 8, 8) give the library's layout.
    """

    def __init__(self, lost_track_buffer: int = 30, frame_rate: float = 30.0, track_activation_threshold: float = 0.7,
                 minimum_consecutive_frames: int = 2, minimum_iou_threshold: float = 0.1,
                 high_conf_det_threshold: float = 0.6) -> None:
        from scipy.optimize import linear_sum_assignment  # here: importing the video pipeline needs no scipy

        self._assign = linear_sum_assignment
        self.maximum_frames_without_update = max_frames_without_update(lost_track_buffer, frame_rate)
        self.minimum_consecutive_frames = minimum_consecutive_frames
        self.minimum_iou_threshold = minimum_iou_threshold
        self.track_activation_threshold = track_activation_threshold
        self.high_conf_det_threshold = high_conf_det_threshold
        self.reset()

    def reset(self) -> None:
        """Forget all tracks and restart IDs from 0."""
        self.state = np.zeros((2, 4, 0))
        self.cov = np.zeros((2, 2, 0))
        self.tracker_ids = np.zeros(0, np.int64)  # -1 until the track is confirmed
        self.time_since_update = np.zeros(0, np.int64)  # frames since the last matched detection
        self.consecutive_updates = np.zeros(0, np.int64)  # matched frames in a row (a new track counts its first)
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.tracker_ids)

    @property
    def means(self) -> np.ndarray:
        """The tracks' Kalman means (N, 8): box, then velocity."""
        return self.state.reshape(_DIM, -1).T.copy()

    @property
    def covariances(self) -> np.ndarray:
        """The tracks' full Kalman covariances (N, 8, 8); zero between coordinates."""
        return np.kron(self.cov.transpose(2, 0, 1), np.eye(4))

    def update(self, boxes: np.ndarray, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One frame: ``boxes`` (M, 4) xyxy, ``scores`` (M,) (None: all 1) -> (indices into ``boxes``, IDs), int64.

        Every detection comes back once: matched ones with their track's ID (``-1`` while the track is not
        confirmed), then unmatched low-score ones and unmatched high-score ones with ``-1``.
        """
        det = np.array(np.asarray(boxes).reshape(-1, 4).T, np.float64, order="C")  # (4, M), like the state
        m = det.shape[1]
        # the thresholds compare in the scores' own dtype (float32 from a detector), exactly as the library does
        scores = np.ones(m, np.float32) if scores is None else np.asarray(scores).reshape(-1)
        if len(scores) != m:
            raise ValueError(f"{m} boxes but {len(scores)} scores")
        if np.count_nonzero(np.isfinite(det)) != 4 * m:
            raise ValueError("boxes contain non-finite values (NaN or inf)")
        n = len(self.tracker_ids)
        if n == 0 and m == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)

        if n:  # predict every track one frame ahead: x = F x, P = F P F' + Q (F P's rows first, then its columns)
            self.state[0] += self.state[1]
            cov = self.cov
            cov[0] += cov[1]
            cov[:, 0] += cov[:, 1]
            cov += _Q22
            self.consecutive_updates[self.time_since_update > 0] = 0
            self.time_since_update += 1

        high = scores >= self.high_conf_det_threshold
        high_idx = high.nonzero()[0]
        n_high = len(high_idx)
        # high-score detections first: a pair's IoU is the same whichever subset it is computed in, so one matrix
        # serves both stages
        order = high_idx if n_high == m else np.concatenate([high_idx, (~high).nonzero()[0]])
        iou = box_iou(self.state[0], det[:, order] if n_high < m else det)
        # stage 1: high-score detections against all tracks; stage 2: low-score ones against the tracks left
        tracks, matched = _associate(iou[:, :n_high], self.minimum_iou_threshold, self._assign)
        if n_high < m and len(tracks) < n:
            rest = _others(n, tracks)
            rows, cols = _associate(iou[rest, n_high:], self.minimum_iou_threshold, self._assign)
            if len(rows):
                tracks = np.concatenate([tracks, rest[rows]])
                matched = np.concatenate([matched, cols + n_high])
        dets = order[matched]

        if len(tracks):
            self._kalman_update(tracks, det[:, dets])
            self.time_since_update[tracks] = 0
            consecutive = self.consecutive_updates[tracks] + 1
            self.consecutive_updates[tracks] = consecutive
            ids = self.tracker_ids[tracks]
            new = ((consecutive >= self.minimum_consecutive_frames) & (ids == -1)).nonzero()[0]
            if len(new):  # IDs in match order: stage 1 first, then stage 2
                ids[new] = np.arange(self._next_id, self._next_id + len(new))
                self._next_id += len(new)
                self.tracker_ids[tracks] = ids
        else:
            ids = np.zeros(0, np.int64)

        if len(dets) == m:
            unmatched = _EMPTY_INT
        else:  # low-score ones, then high-score ones, each ascending
            free = np.zeros(m, bool)
            free[dets] = True
            np.logical_not(free, out=free)
            unmatched_high = (free & high).nonzero()[0]
            unmatched = unmatched_high if n_high == m else np.concatenate([(free & ~high).nonzero()[0],
                                                                            unmatched_high])
            # only high-score ones at the activation threshold start tracks (compared as Python floats)
            spawn = unmatched_high[scores[unmatched_high].astype(np.float64) >= self.track_activation_threshold]
            if len(spawn):
                self._spawn(det[:, spawn])

        if len(tracks) < n:  # lost past the buffer, or unconfirmed and lost: gone (confirmation is sticky)
            tsu = self.time_since_update
            alive = (tsu <= self.maximum_frames_without_update) & (
                (self.tracker_ids != -1) | (self.consecutive_updates >= self.minimum_consecutive_frames) | (tsu == 0))
            if np.count_nonzero(alive) < len(alive):
                self.state, self.cov = self.state[:, :, alive], self.cov[:, :, alive]
                self.tracker_ids, self.time_since_update = self.tracker_ids[alive], tsu[alive]
                self.consecutive_updates = self.consecutive_updates[alive]

        if not len(unmatched):
            return dets, ids
        return np.concatenate([dets, unmatched]), np.concatenate([ids, np.full(len(unmatched), -1, np.int64)])

    def _spawn(self, boxes: np.ndarray) -> None:
        """New tracks at ``boxes`` (4, K): zero velocity, P = I, one update counted, no ID yet."""
        k = boxes.shape[1]
        state = np.zeros((2, 4, k))
        state[0] = boxes
        cov = np.zeros((2, 2, k))
        cov[0, 0] = cov[1, 1] = 1.0
        self.state = np.concatenate([self.state, state], axis=2)
        self.cov = np.concatenate([self.cov, cov], axis=2)
        self.tracker_ids = np.concatenate([self.tracker_ids, np.full(k, -1, np.int64)])
        self.time_since_update = np.concatenate([self.time_since_update, np.zeros(k, np.int64)])
        self.consecutive_updates = np.concatenate([self.consecutive_updates, np.ones(k, np.int64)])

    def _kalman_update(self, tracks: np.ndarray, z: np.ndarray) -> None:
        """Kalman update (Joseph form, as the library) of tracks ``tracks`` with their measurements ``z`` (4, K).

        With P = [[p00, p01], [p10, p11]] and the gain k = (p00, p10) / (p00 + r): x += k (z - x0);
        A = (I - kH) P; P = A (I - kH)' + k r k'. It runs on all tracks, in place, the others with a zero gain and
        innovation, which leaves them exactly as they are: at a few dozen tracks that is cheaper than gathering and
        scattering the matched ones.
        """
        cov = self.cov
        inv_s = np.zeros(len(self.tracker_ids))
        inv_s[tracks] = 1.0
        inv_s /= cov[0, 0] + _R
        gain = cov[:, 0] * inv_s  # (2, N)
        innovation = np.zeros(self.state.shape[1:])
        innovation[:, tracks] = z - self.state[0][:, tracks]
        self.state += gain[:, None] * innovation
        ikh = -gain  # the rows of I - kH: [1 - k0, 0], [-k1, 1]
        ikh[0] += 1.0
        a = ikh[:, None] * cov[0]
        a[1] += cov[1]
        np.multiply(a[:, 0, None], ikh, out=cov)
        cov[:, 1] += a[:, 1]
        cov += (gain * _R)[:, None] * gain
