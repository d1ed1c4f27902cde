"""Video inference (the body of ``infer_det_video.py``): decode (thread) -> batched ``submit``/``result`` (one
batch in flight, ``pipeline.run_pipeline``) -> track (thread) -> draw and write per-frame results (thread; the same
one as tracking without ``--track``) -> encode (thread), with bounded queues; ``--no-save`` without ``--show`` neither draws nor encodes. ``summary.json``'s ``stages``
and the last line printed say where the time went per stage.

The detector returns detections down to the checkpoint's evaluation score threshold. Without ``--track`` those
scoring at least ``--threshold`` are drawn; with ``--track`` all of them feed ByteTrack (low scores help it keep
tracks through dips) and the tracked objects are drawn with their IDs (``tracking.py``). The output keeps the
source's fps and exact frame size (``video_io.open_writer``); Ctrl-C or a source that ends early still leaves a
finalized, playable video and a ``summary.json`` with the number of frames written; a file that ends before the
frames its container announces gets a warning there and on the terminal. A bad source fails before any output
file exists.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from ..core.errors import ToolkitWarning, UserError
from ..core.paths import increment_path
from ..data.video_io import CODEC_CHOICES, DEFAULT_FPS, FrameSource, Writer, open_source, open_writer
from .draw import bgr_to_tensor, draw_detections, draw_text, overlay_corner, overlay_size
from .options import PredictConfig, display_available
from .pipeline import BackgroundWorker, Item, StageClock, run_pipeline
from .predictor import build_predictor, filter_detections
from .tracking import TrackConfig, Tracked, Tracker


@dataclass
class VideoInferConfig:
    """Options of ``infer_det_video.py``: the shared ``PredictConfig`` plus the video command's own."""

    predict: PredictConfig
    input: str
    max_frames: int | None = None
    fps: float | None = None
    track: bool = False
    track_buffer: int = 30
    track_hold: int = 2
    save_json: bool = False
    save_mot: bool = False
    codec: str = "auto"

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"--max-frames {self.max_frames}: must be at least 1")
        if self.track_buffer < 0 or self.track_hold < 0:
            raise UserError(f"--track-buffer {self.track_buffer} / --track-hold {self.track_hold}: use 0 or more")
        if self.codec not in CODEC_CHOICES:
            raise UserError(f"--codec {self.codec!r}: choose from {', '.join(CODEC_CHOICES)}")


class FpsWindow:
    """The overlay's two rates over the same last ``window`` frames: model (each frame's share of its batch's
    model-stage time, ``pipeline.Item.model_seconds``) and end to end (frames reaching the drawing stage per
    second of wall time)."""

    def __init__(self, window: int = 30) -> None:
        self.window = window
        self.times: deque[float] = deque(maxlen=window + 1)
        self.model: deque[float] = deque(maxlen=window)

    def update(self, model_seconds: float, now: float | None = None) -> tuple[float, float]:
        """Add one frame; return (model FPS, end-to-end FPS) over the last ``window`` frames (0 until known)."""
        self.times.append(time.perf_counter() if now is None else now)
        self.model.append(model_seconds)
        n = len(self.times) - 1  # intervals between arrivals; the model shares of the same frames
        if n < 1:
            return 0.0, 0.0
        model_s = sum(list(self.model)[-n:])
        return (n / model_s if model_s > 0 else 0.0), n / max(self.times[-1] - self.times[0], 1e-9)

    def lines(self, model_fps: float, e2e_fps: float) -> list[str]:
        frames = len(self.times) - 1
        return [f"model: {model_fps:.1f} FPS", f"end-to-end: {e2e_fps:.1f} FPS", f"(last {frames} frames)"]


def probe_video(path: str | Path) -> dict[str, Any]:
    """What a written file really holds, read back by OpenCV: width, height, frame count (container metadata)."""
    cap = cv2.VideoCapture(str(path))
    try:
        return {"width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT))}
    finally:
        cap.release()


def frame_records(index: int, timestamp: float, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  classes: list[str], ids: np.ndarray | None = None, held: np.ndarray | None = None
                  ) -> tuple[str, list[str]]:
    """One JSON Lines record (frame index from 0, timestamp in seconds, boxes xyxy in source pixels) and the
    MOTChallenge rows ``frame,id,x,y,w,h,score,-1,-1,-1`` (frames from 1; id -1 without tracking) of a frame."""
    dets, mot = [], []
    for k, (box, score, label) in enumerate(zip(boxes.tolist(), scores.tolist(), labels.tolist())):
        x1, y1, x2, y2 = (round(v, 2) for v in box)
        det: dict[str, Any] = {"box": [x1, y1, x2, y2], "score": round(score, 4), "label": int(label),
                               "class": classes[label] if 0 <= label < len(classes) else str(label)}
        tid = -1
        if ids is not None:
            tid = int(ids[k])
            det["track_id"] = tid
            det["predicted"] = bool(held[k]) if held is not None else False
        dets.append(det)
        mot.append(f"{index + 1},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1")
    record = json.dumps({"frame": index, "time": round(timestamp, 4), "detections": dets})
    return record, mot


STAGE_ORDER = ("decode", "model", "track", "draw", "results", "encode")


def process_video(predictor: Any, source: FrameSource, out_stem: Path | None, max_frames: int | None = None,
                  show: bool = False, progress: bool = True, overlay: bool = True, threshold: float | None = None,
                  track: TrackConfig | None = None, json_path: Path | None = None, mot_path: Path | None = None,
                  codec: str = "auto") -> dict[str, Any]:
    """Run the detector over ``source``; write the annotated video to ``out_stem``.<ext> (None: don't write),
    per-frame JSON Lines to ``json_path`` and MOTChallenge rows to ``mot_path`` (None: don't).

    Stages, each in its own thread with bounded queues between them: decode (+ BGR->RGB into the model's input
    buffer) -> batched ``predictor.submit`` (one batch in flight) -> track -> results, draw -> encode. Nothing is
    drawn when there is neither a video to write nor a window to show, and nothing encoded without a video to
    write. The summary's ``stages`` says where the time went (busy ms per frame of each stage; the slowest bounds
    the end-to-end rate).

    ``threshold``: draw detections scoring at least this (None: all the predictor returns); ``track``: link them
    into tracks instead. Returns the summary; a KeyboardInterrupt ends the run early with everything finalized.
    """
    from tqdm import tqdm

    tracker = Tracker(track, (source.width, source.height)) if track is not None else None
    writer: Writer | None = None
    if out_stem is not None:
        writer = open_writer(out_stem, source.fps, (source.width, source.height), codec=codec)
    files: list[IO[str]] = []
    json_file = mot_file = None
    if json_path is not None:
        json_file = open(json_path, "w", encoding="utf-8")
        files.append(json_file)
    if mot_path is not None:
        mot_file = open(mot_path, "w", encoding="utf-8")
        files.append(mot_file)
    total = source.total if max_frames is None else min(source.total or max_frames, max_frames)
    bar = tqdm(total=total, unit="frame", desc="video", disable=not progress)
    window = FpsWindow()
    stop = threading.Event()
    done = {"frames": 0, "detections": 0}
    corner: list[str | None] = [None]
    interrupted = False
    classes = list(predictor.classes)
    clocks: dict[str, StageClock] = {k: StageClock() for k in STAGE_ORDER}
    draw = writer is not None or show
    qsize = 2 * predictor.batch_size

    def prepare(indexed: tuple[int, float, np.ndarray]) -> Item:
        # in the decode thread: one cv2.cvtColor pass gives the model's RGB input as an HWC array, which the
        # predictor uploads as it is (a [3,H,W] view, no reordering copy); the BGR frame is drawn on and encoded
        index, timestamp, frame = indexed
        return Item(data=(index, timestamp, frame), input=bgr_to_tensor(frame), orig_hw=frame.shape[:2])

    def encode(frame: np.ndarray) -> None:
        with clocks["encode"].time():
            writer.write(frame)  # type: ignore[union-attr]

    encoder = BackgroundWorker(encode, maxsize=qsize, name="encode") if writer is not None else None

    def sink(item: Item) -> None:
        pred = item.pred
        if tracker is not None:
            with clocks["track"].time():
                tracked: Tracked = tracker.update(pred["boxes"].numpy(), pred["scores"].numpy(),
                                                  pred["labels"].numpy())
            drawer.submit((item, tracked.boxes, tracked.scores, tracked.labels, tracked.ids, tracked.held))
            return
        if threshold is not None:
            pred = filter_detections(pred, threshold)
        output((item, pred["boxes"].numpy(), pred["scores"].numpy(), pred["labels"].numpy(), None, None))

    def output(work: tuple) -> None:
        """One frame's results, drawing and hand-over to the encoder (with tracking, in a thread of its own: the
        tracker's Python overlaps the drawing instead of adding to it)."""
        item, boxes, scores, labels, ids, held = work
        index, timestamp, frame = item.data
        done["detections"] += len(boxes)
        if json_file is not None or mot_file is not None:
            with clocks["results"].time():
                record, mot = frame_records(index, timestamp, boxes, scores, labels, classes, ids, held)
                if json_file is not None:
                    json_file.write(record + "\n")
                if mot_file is not None and mot:
                    mot_file.write("\n".join(mot) + "\n")
        if draw:
            with clocks["draw"].time():
                model_fps, e2e_fps = window.update(item.model_seconds)
                if overlay:  # drawn first, in the corner it hides least: the detections' labels stay on top
                    lines = window.lines(model_fps, e2e_fps)
                    size = overlay_size(frame.shape[:2], lines)
                    corner[0] = overlay_corner(frame.shape[:2], size, boxes, corner[0])
                    draw_text(frame, lines, corner[0])
                draw_detections(frame, boxes, labels, scores, classes, ids=ids)
            if encoder is not None:
                encoder.submit(frame)  # the frame itself: drawn in place, encoded once, never copied
            if show:
                cv2.imshow("detections", frame)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    stop.set()
        done["frames"] += 1
        bar.update(1)

    drawer = BackgroundWorker(output, maxsize=qsize, name="draw") if tracker is not None else None
    t0 = time.perf_counter()
    ok = False
    try:
        try:
            try:
                try:
                    run_pipeline(predictor, (prepare(f) for f in source.frames(max_frames, stop)), sink,
                                 clocks=clocks)
                finally:
                    if drawer is not None:
                        drawer.close()  # every tracked frame drawn and handed to the encoder
            finally:
                if encoder is not None:
                    encoder.close()  # every drawn frame encoded before the container is finalized
        except KeyboardInterrupt:  # Ctrl-C (or a source that raises it): keep and finalize what was written
            interrupted = True
        ok = done["frames"] > 0
    finally:
        elapsed = time.perf_counter() - t0
        bar.close()
        stop.set()
        source.close()
        for f in files:
            f.close()
        if writer is not None:
            writer.close()
            if not ok:
                writer.path.unlink(missing_ok=True)
        if show:
            cv2.destroyAllWindows()
    model_fps = predictor.model_timer.rate
    frames = done["frames"]
    e2e_fps = frames / elapsed if elapsed > 0 else 0.0
    stages = stage_summary(clocks, predictor.model_timer, frames, elapsed)
    warnings_: list[str] = []
    short = None if interrupted else source.shortfall()
    if short:
        warnings_.append(short)
    summary: dict[str, Any] = {
        "source": source.name, "frames": frames, "width": source.width, "height": source.height,
        "fps": source.fps, "fps_from_source": source.fps_known, "interrupted": interrupted,
        "frames_expected": source.total, "frames_read": source.read, "decoder": source.decoder,
        "skipped_unreadable_frames": list(source.skipped), "warnings": warnings_,
        "mean_model_fps": round(model_fps, 3), "mean_end_to_end_fps": round(e2e_fps, 3),
        "end_to_end_over_model": round(e2e_fps / model_fps, 3) if model_fps else 0.0,
        "seconds": round(elapsed, 3), "stages": stages, "threshold": threshold,
        "detections_drawn": done["detections"],
        "output": str(writer.path) if writer is not None and ok else None,
        "video": None, "json": str(json_path) if json_path else None, "mot": str(mot_path) if mot_path else None,
        "device": str(getattr(predictor, "device", "")), "precision": getattr(predictor, "precision", None),
        "batch": predictor.batch_size}
    if writer is not None and ok:
        summary["video"] = {**writer.info(), "written": probe_video(writer.path)}
    if tracker is not None:
        per_label = tracker.unique_ids_per_label()
        summary["tracking"] = {
            "tracker": "ByteTrack (trackers) + alpha-beta box / EMA score smoothing",
            "detections_fed_from_score": getattr(predictor, "score_thresh", None),
            "threshold": track.threshold, "buffer_frames": track.buffer, "hold_frames": track.hold,
            "min_hits": track.min_hits, "unique_track_ids": sum(per_label.values()),
            "unique_track_ids_per_class": {classes[k] if 0 <= k < len(classes) else str(k): v
                                           for k, v in sorted(per_label.items())},
            "ms_per_frame": round(clocks["track"].ms_per_item, 3)}
    return summary


def stage_summary(clocks: dict[str, StageClock], model_timer: Any, frames: int, wall: float) -> dict[str, Any]:
    """Where the time went: each stage that ran, its busy time (ms per frame, and the FPS it would reach alone),
    the model's forward share (``model_timer``), wall time, and end-to-end FPS over the slowest stage's bound."""
    out: dict[str, Any] = {k: clocks[k].summary() for k in STAGE_ORDER if clocks[k].items}
    if "model" in out and model_timer.items:
        out["model"]["forward_ms_per_frame"] = round(1000.0 * model_timer.seconds / model_timer.items, 3)
    ran = {k: clocks[k].ms_per_item for k in out}
    slowest = max(ran, key=ran.get) if ran else None
    e2e = frames / wall if wall > 0 else 0.0
    bound = 1000.0 / ran[slowest] if slowest and ran[slowest] > 0 else 0.0
    out["wall"] = {"seconds": round(wall, 4), "ms_per_frame": round(1000.0 * wall / frames, 3) if frames else None,
                   "end_to_end_fps": round(e2e, 2)}
    out["slowest_stage"] = slowest
    out["end_to_end_over_slowest_stage"] = round(e2e / bound, 3) if bound else None
    return out


def stage_line(stages: dict[str, Any]) -> str:
    """One line: busy ms per frame of each stage, then wall time and end-to-end FPS."""
    parts = []
    for k in STAGE_ORDER:
        if k not in stages:
            continue
        text = f"{k} {stages[k]['ms_per_frame']:.2f}"
        if k == "model" and "forward_ms_per_frame" in stages[k]:
            text += f" (forward {stages[k]['forward_ms_per_frame']:.2f})"
        parts.append(text)
    wall = stages["wall"]
    ratio = stages.get("end_to_end_over_slowest_stage")
    tail = (f"; slowest: {stages['slowest_stage']}, end to end at {ratio:.0%} of its rate"
            if ratio is not None else "")
    per_frame = f"{wall['ms_per_frame']:.2f} ms/frame = " if wall["ms_per_frame"] else ""
    return (f"time per frame (ms, busy per stage): {' | '.join(parts) or 'none'} -> wall {per_frame}"
            f"{wall['end_to_end_fps']:.1f} FPS{tail}")


def infer_video(cfg: VideoInferConfig) -> dict[str, Any]:
    """The body of infer_det_video.py."""
    pc = cfg.predict
    source = open_source(cfg.input, cfg.fps)  # fail on a bad input before loading the model or creating folders
    try:
        predictor = build_predictor(pc, keep_low_scores=True)
        if not source.fps_known:
            print(f"note: {cfg.input} reports no frame rate; writing at {DEFAULT_FPS:g} fps (set --fps)")
        show = False
        if pc.show:
            show, why = display_available()
            if not show:
                print(f"note: --show ignored: {why}")
        out_dir = pc.resolved_out_dir() or increment_path("outputs/inference", None, "video")
        stem = None if pc.no_save else out_dir / source.name
        if stem is not None and getattr(source, "files", None) is None:
            src_path = Path(cfg.input).resolve()
            if src_path.parent == out_dir.resolve() and src_path.stem == source.name:
                raise UserError(f"--out-dir {pc.out_dir}: the annotated video would overwrite the input "
                                f"{cfg.input}; pick another --out-dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        track = None
        if cfg.track:
            track = TrackConfig(threshold=pc.threshold, fps=source.fps, buffer=cfg.track_buffer,
                                hold=cfg.track_hold)
            print(f"tracking: ByteTrack over detections >= {predictor.score_thresh:g}; tracks start at "
                  f">= {pc.threshold:g} (--threshold)")
        summary = process_video(
            predictor, source, stem, max_frames=cfg.max_frames, show=show, threshold=pc.threshold, track=track,
            json_path=out_dir / f"{source.name}.jsonl" if cfg.save_json else None,
            mot_path=out_dir / f"{source.name}.mot.txt" if cfg.save_mot else None, codec=cfg.codec)
    finally:
        source.close()
    summary["summary"] = str(out_dir / "summary.json")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["video"]:
        v = summary["video"]
        print(f"video: {v['codec']} {v['pixel_format']} {v['written']['width']}x{v['written']['height']} "
              f"via {v['backend']} -> {v['path']}")
    tracks = ""
    if "tracking" in summary:
        per = summary["tracking"]["unique_track_ids_per_class"]
        classes = f" ({', '.join(f'{k} {n}' for k, n in per.items())})" if per else ""
        tracks = f"; {summary['tracking']['unique_track_ids']} tracks{classes}"
    skipped = summary["skipped_unreadable_frames"]
    expected = summary["frames_expected"]
    of = f" of {expected} announced" if expected and summary["warnings"] else ""  # a truncated file
    print(f"{summary['frames']}{of} frames{' (interrupted)' if summary['interrupted'] else ''}"
          f"{f', {len(skipped)} unreadable skipped' if skipped else ''} at {summary['width']}x{summary['height']} "
          f"{summary['fps']:g} fps; model {summary['mean_model_fps']:.2f} FPS, end-to-end "
          f"{summary['mean_end_to_end_fps']:.2f} FPS{tracks}; video: {summary['output'] or '(not saved)'}; "
          f"summary: {summary['summary']}")
    print(stage_line(summary["stages"]))
    for note in summary["warnings"]:
        warnings.warn(note, ToolkitWarning, stacklevel=2)
    return summary
