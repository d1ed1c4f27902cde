"""Tracking on the synthetic clip: per-frame detection vs ``--track`` (ByteTrack + smoothing), same detector, same
``--threshold``, scored against the clip's ground truth.

    python -m benchmarks.bench_tracking [--quick] [--checkpoint best_model.pth] [--frames N] [--threshold 0.5]

The detector is the demo's (``scripts/demo.sh``: frozen random-weight ``dinov3_convnext_atto`` + FCOS trained on
the synthetic shapes); pass ``--checkpoint`` to reuse one, else ``outputs/img_det/demo/best_model.pth`` is used
when ``make demo`` left it, else a smaller one is trained first (a few minutes on 2 CPU cores). The clip comes
from ``synthetic_video.generate_tracking_video`` (shapes that move, cross, leave the frame and pass behind an
occluder; MOTChallenge ground truth). Both runs go through ``video.process_video`` - decode thread, batched
forward, draw + H.264 encode - writing MOTChallenge rows, and are scored by the ``trackers`` package's evaluator
(HOTA, CLEAR MOTA / ID switches, IDF1; TrackEval's matching). Per-frame detections carry no identity, so for
their scores each detection gets an ID of its own.

Flicker (defined here): the fraction of ground-truth object-frames in which an object that stays visible loses
its drawn box for 1 or 2 frames and gets one back right after (per frame, ground truth and drawn boxes are matched
one-to-one at IoU >= 0.5). Goals: tracking cuts flicker at least in half; its end-to-end FPS stays >= 90 % of
per-frame detection's (runs interleaved, median of the repetitions).

The tracker alone (``tracker_rows``, no model, no video): ms per frame at about 30 concurrent tracks on a synthetic
detection sequence (objects that move, drop out for a frame, dip below the threshold; a few false positives), the
library's ``trackers.ByteTrackTracker`` (fed ``supervision.Detections``, as ``Tracker`` used to) against our
vectorized ``bytetrack.ByteTrack`` and against our whole ``Tracker.update`` (ByteTrack + smoothing), on the same
input, interleaved (informative: the ``--track`` goal, at most 10 % of end-to-end FPS, is ``bench_video``'s row;
the tracker runs in a thread of its own there, overlapping the other stages).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import make_row, markdown_table

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "outputs" / "img_det" / "demo" / "best_model.pth"
FPS_GOAL = 0.9
FLICKER_GOAL = 2.0
MATCH_IOU = 0.5


# ---------------------------------------------------------------------------------------------- flicker
def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [N,4] x b [M,4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def read_mot(path: Path) -> dict[int, np.ndarray]:
    """frame (1-based) -> rows [id, x1, y1, x2, y2] of a MOTChallenge file."""
    text = path.read_text().strip()
    data = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2) if text else np.zeros((0, 10))
    out: dict[int, np.ndarray] = {}
    for f in np.unique(data[:, 0]).astype(int) if len(data) else []:
        d = data[data[:, 0] == f]
        out[int(f)] = np.column_stack([d[:, 1], d[:, 2], d[:, 3], d[:, 2] + d[:, 4], d[:, 3] + d[:, 5]])
    return out


def covered(gt: dict[int, np.ndarray], hyp: dict[int, np.ndarray], n_frames: int) -> dict[int, dict[int, bool]]:
    """object id -> {frame: whether a drawn box matches it (one-to-one, IoU >= 0.5)} for its ground-truth frames."""
    from scipy.optimize import linear_sum_assignment

    out: dict[int, dict[int, bool]] = {}
    for f in range(1, n_frames + 1):
        g = gt.get(f, np.zeros((0, 5)))
        h = hyp.get(f, np.zeros((0, 5)))
        ious = _iou_matrix(g[:, 1:], h[:, 1:])
        hit = np.zeros(len(g), bool)
        if ious.size:
            rows, cols = linear_sum_assignment(-ious)
            hit[rows[ious[rows, cols] >= MATCH_IOU]] = True
        for oid, ok in zip(g[:, 0].astype(int), hit):
            out.setdefault(int(oid), {})[f] = bool(ok)
    return out


def flicker(cover: dict[int, dict[int, bool]]) -> tuple[float, int, int]:
    """(fraction, flickering object-frames, ground-truth object-frames): object-frames inside a run of 1-2
    unmatched frames that has matched frames of the same, continuously visible object on both sides."""
    bad = total = 0
    for frames in cover.values():
        total += len(frames)
        for f, ok in frames.items():
            if ok or (f - 1) not in frames:
                continue
            if not frames[f - 1]:
                continue  # count each gap once, from its first frame
            k = 0
            while (f + k) in frames and not frames[f + k]:
                k += 1
            if 1 <= k <= 2 and (f + k) in frames and frames[f + k]:
                bad += k
    return (bad / total if total else 0.0), bad, total


# ---------------------------------------------------------------------------------------------- runs
def train_checkpoint(out: Path, quick: bool) -> Path:
    """The demo recipe on a smaller synthetic set (so the bench stays within minutes on 2 cores)."""
    data = out / "shapes"
    n_train, epochs = (300, 4) if quick else (1000, 8)
    py = sys.executable
    subprocess.run([py, "-m", "src.detection.data.synthetic", "--out", str(data), "--train", str(n_train), "--valid",
                    "50", "--imgsz", "192", "--seed", "0"], cwd=REPO, check=True, capture_output=True, text=True)
    subprocess.run([py, "train_detection.py", "--config", str(data / "shapes.yaml"), "--model-name",
                    "dinov3_convnext_atto", "--head", "fcos", "--feature-extractor", "multi", "--fpn-channels", "64",
                    "--imgsz", "192", "--batch", "8", "--workers", "0", "--lr", "2e-3", "--scheduler", "cosine",
                    "--warmup-epochs", "0.5", "--epochs", str(epochs), "--augment", "flip", "--cache-features", "ram",
                    "--out-dir", str(out), "--name", "demo", "--exist-ok", "--seed", "0"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    return out / "demo" / "best_model.pth"


def evaluate(gt_path: Path, mot_path: Path, unique_ids: bool) -> dict[str, float]:
    from trackers.eval import evaluate_mot_sequence

    if not mot_path.read_text().strip():  # nothing drawn at all (the evaluator refuses empty files)
        return {"HOTA": 0.0, "MOTA": 0.0, "IDF1": 0.0, "IDSW": 0.0}
    if unique_ids:  # per-frame detections have no identity: each gets its own ID
        lines = [ln.split(",") for ln in mot_path.read_text().splitlines() if ln.strip()]
        mot_path = mot_path.with_name(mot_path.stem + "_ids.txt")
        mot_path.write_text("".join(",".join([p[0], str(i + 1)] + p[2:]) + "\n" for i, p in enumerate(lines)))
    r = evaluate_mot_sequence(gt_path, mot_path, metrics=["CLEAR", "HOTA", "Identity"])
    return {"HOTA": r.HOTA.HOTA, "MOTA": r.CLEAR.MOTA, "IDF1": r.Identity.IDF1, "IDSW": r.CLEAR.IDSW}


def run(quick: bool = False, checkpoint: str | None = None, frames: int | None = None, threshold: float = 0.5,
        reps: int | None = None) -> list[dict[str, Any]]:
    from src.detection.data.synthetic_video import generate_tracking_video
    from src.detection.data.video_io import open_source
    from src.detection.inference.predictor import PredictConfig, build_predictor
    from src.detection.inference.tracking import TrackConfig
    from src.detection.inference.video import process_video

    frames = frames or (120 if quick else 240)
    reps = reps or (1 if quick else 2)
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        tmp = Path(tmp)
        ckpt = Path(checkpoint) if checkpoint else DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else None
        trained = ckpt is None
        if ckpt is None:
            ckpt = train_checkpoint(tmp, quick)
        video, gt_path = generate_tracking_video(tmp / "clip.mp4", frames, width=192, seed=0, fps=24)
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = build_predictor(PredictConfig(model=str(ckpt), device="cpu", threshold=threshold),
                                        keep_low_scores=True)
        results: dict[bool, dict[str, Any]] = {False: {"fps": []}, True: {"fps": []}}
        for rep in range(reps + 1):  # round 0 warms up (oneDNN kernels, encoder) and is not timed
            for track in (False, True):
                mot = tmp / f"{'track' if track else 'plain'}.txt"
                cfg = TrackConfig(threshold=threshold, fps=24) if track else None
                s = process_video(predictor, open_source(str(video)), tmp / f"out_{int(track)}", threshold=threshold,
                                  track=cfg, mot_path=mot, progress=False)
                if rep:
                    results[track]["fps"].append(s["mean_end_to_end_fps"])
                    results[track]["model_fps"] = s["mean_model_fps"]
                    results[track]["track_ms"] = s.get("tracking", {}).get("ms_per_frame")
        gt = read_mot(gt_path)
        for track in (False, True):
            mot = tmp / f"{'track' if track else 'plain'}.txt"
            results[track]["flicker"] = flicker(covered(gt, read_mot(mot), frames))
            results[track]["metrics"] = evaluate(gt_path, mot, unique_ids=not track)
    return rows_from(results, frames, threshold, ckpt, trained, reps) + tracker_rows(quick)


# ---------------------------------------------------------------------------------------------- tracker alone
def synthetic_detections(n_frames: int, n_objects: int = 30, size: tuple[int, int] = (1280, 720),
                         seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame (boxes float32 xyxy, scores float32, labels int64) of ``n_objects`` boxes that move with noise and
    bounce off the borders; each frame 5 % of them are missed and 10 % score below 0.5, plus a false positive or so."""
    rng = np.random.default_rng(seed)
    w, h = size
    wh = rng.uniform(20, 80, (n_objects, 2))
    pos = rng.uniform(0, 1, (n_objects, 2)) * ([w, h] - wh)
    vel = rng.normal(0, 2, (n_objects, 2))
    labels = rng.integers(0, 5, n_objects)
    frames = []
    for _ in range(n_frames):
        pos += vel + rng.normal(0, 0.5, pos.shape)
        vel[(pos < 0) | (pos + wh > [w, h])] *= -1
        pos = np.clip(pos, 0, [w, h] - wh)
        seen = rng.random(n_objects) > 0.05
        boxes = np.concatenate([pos, pos + wh], 1)[seen] + rng.normal(0, 1, (int(seen.sum()), 4))
        scores = np.where(rng.random(len(boxes)) < 0.1, rng.uniform(0.1, 0.5, len(boxes)),
                          rng.uniform(0.5, 1, len(boxes)))
        n_fp = rng.poisson(1.0)
        fp = rng.uniform(0, 1, (n_fp, 2)) * [w - 60, h - 60]
        boxes = np.concatenate([boxes, np.concatenate([fp, fp + rng.uniform(10, 60, (n_fp, 2))], 1)])
        frames.append((boxes.astype(np.float32), np.concatenate([scores, rng.uniform(0.1, 0.9, n_fp)]).astype(
            np.float32), np.concatenate([labels[seen], rng.integers(0, 5, n_fp)])))
    return frames


def tracker_rows(quick: bool = False, frames: int | None = None, reps: int | None = None,
                 n_objects: int = 30) -> list[dict[str, Any]]:
    """ms per frame of the tracker alone: the library's ByteTrack vs ours, and vs our whole ``Tracker.update``."""
    import warnings

    import supervision as sv
    from trackers import ByteTrackTracker

    from benchmarks.common import time_interleaved
    from src.detection.inference.bytetrack import ByteTrack
    from src.detection.inference.tracking import TrackConfig, Tracker

    frames = frames or (100 if quick else 300)
    reps = reps or (3 if quick else 7)
    cfg = TrackConfig(threshold=0.5, fps=30)
    kwargs = dict(lost_track_buffer=cfg.buffer, frame_rate=cfg.fps, track_activation_threshold=cfg.threshold,
                  minimum_consecutive_frames=cfg.min_hits, minimum_iou_threshold=cfg.iou,
                  high_conf_det_threshold=cfg.threshold)
    data = synthetic_detections(frames, n_objects)

    def library() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracker = ByteTrackTracker(**kwargs)
        for boxes, scores, labels in data:
            tracker.update(sv.Detections(xyxy=boxes, confidence=scores, class_id=labels))

    def ours_bytetrack() -> None:
        tracker = ByteTrack(**kwargs)
        for boxes, scores, _ in data:
            tracker.update(boxes, scores)

    def ours_tracker() -> None:
        tracker = Tracker(cfg, (1280, 720))
        for boxes, scores, labels in data:
            tracker.update(boxes, scores, labels)

    times = time_interleaved({"library": library, "bytetrack": ours_bytetrack, "tracker": ours_tracker}, reps)
    ms = {k: [1000 * t / frames for t in v] for k, v in times.items()}
    where = f"{frames}-frame synthetic sequence, {n_objects} objects (~{n_objects} tracks), {reps} interleaved runs, cpu"
    bare = make_row("tracker alone, ms/frame: trackers.ByteTrackTracker vs our ByteTrack", ms["library"],
                    ms["bytetrack"], 0, "ms", higher_is_better=False, note=where)
    bare["goal"] = "info"
    whole = make_row("tracker alone, ms/frame: trackers.ByteTrackTracker vs our whole Tracker.update (+ smoothing)",
                     ms["library"], ms["tracker"], 0, "ms", higher_is_better=False,
                     note=f"{where}; a frame at 350 FPS is 2.86 ms")
    whole["goal"] = "info"
    return [bare, whole]


def rows_from(results: dict[bool, dict[str, Any]], frames: int, threshold: float, ckpt: Path, trained: bool,
              reps: int) -> list[dict[str, Any]]:
    plain, track = results[False], results[True]
    where = (f"{frames}-frame 192x192 synthetic clip, demo FCOS ({'trained for the bench' if trained else ckpt}), "
             f"--threshold {threshold}, cpu")
    (pf, pbad, total), (tf, tbad, _) = plain["flicker"], track["flicker"]
    floor = 0.5 / max(total, 1)  # half an object-frame: keeps the ratio finite when tracking removes all flicker
    rows = [{"name": "flicker: per-frame detection vs --track (object-frames in 1-2 frame drop-outs)",
             "baseline": pf, "ours": tf, "ratio": pf / max(tf, floor) if pf else math.nan,
             "pass": tf <= pf / FLICKER_GOAL if pf else None, "goal": f">= {FLICKER_GOAL:g}x",
             "unit": "", "note": f"{pbad} vs {tbad} of {total} ground-truth object-frames; {where}"}]
    fps = make_row("end-to-end FPS: per-frame detection vs --track", plain["fps"], track["fps"], FPS_GOAL, "FPS",
                   higher_is_better=True,
                   note=f"decode + model + draw + H.264 encode, {reps} interleaved runs each; tracker "
                        f"{track['track_ms']:.2f} ms/frame; model {plain['model_fps']:.0f} FPS")
    rows.append(fps)
    for key, higher in (("HOTA", True), ("MOTA", True), ("IDF1", True), ("IDSW", False)):
        b, o = float(plain["metrics"][key]), float(track["metrics"][key])
        ratio = (o / b if higher else b / o) if b > 0 and o > 0 else math.nan
        rows.append({"name": f"{key}: per-frame detection (one ID per detection) vs --track", "baseline": b,
                     "ours": o, "ratio": ratio, "goal": "info", "unit": "",
                     "note": "trackers.eval (TrackEval matching, IoU 0.5 for MOTA/IDF1)"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 frames, one timed run each, smaller detector")
    ap.add_argument("--checkpoint", default=None,
                    help="detector to use; default: outputs/img_det/demo/best_model.pth, else train one")
    ap.add_argument("--frames", type=int, default=None, help="clip length (default 240; 120 with --quick)")
    ap.add_argument("--threshold", type=float, default=0.5, help="--threshold of both runs")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per side (default 2; 1 with --quick)")
    args = ap.parse_args()
    print(markdown_table(run(quick=args.quick, checkpoint=args.checkpoint, frames=args.frames,
                             threshold=args.threshold, reps=args.reps)))


if __name__ == "__main__":
    main()
