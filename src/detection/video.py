"""Video inference: decode (thread) -> batched Predictor forward -> draw + encode (thread), bounded queues.

The output keeps the source's fps and frame size; the overlay shows model FPS (synchronised forward time) and
end-to-end FPS (frames written per wall-clock second). A bad source fails before any output file exists, and a
run that fails midway removes its partial output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

# FFmpeg's own log lines ("moov atom not found", ...) would break the one-line error contract; we report
# failures ourselves. Must be set before the first VideoCapture; a user's own setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

from .draw import bgr_to_tensor, draw_detections, draw_text
from .errors import UserError
from .pipeline import Item, run_pipeline
from .predictor import Predictor, add_predictor_args, display_available, predictor_from_args
from .utils import REPO_ROOT, increment_path

DEFAULT_FPS = 30.0
# (fourcc, extension) in order of preference; mp4v is in every OpenCV FFmpeg build, the others are fallbacks.
CODECS = (("mp4v", ".mp4"), ("avc1", ".mp4"), ("XVID", ".avi"), ("MJPG", ".avi"))


@dataclass
class VideoSource:
    """An opened capture whose first frame has already been decoded (so we know it really is a video)."""

    cap: cv2.VideoCapture
    name: str
    first: np.ndarray
    fps: float
    fps_known: bool
    total: int | None
    width: int
    height: int

    def frames(self, max_frames: int | None = None, stop: threading.Event | None = None) -> Iterator[np.ndarray]:
        """BGR frames from the first one on; ends at the end of the stream, ``max_frames`` or ``stop``."""
        n = 0
        frame: np.ndarray | None = self.first
        try:
            while frame is not None and (max_frames is None or n < max_frames):
                if stop is not None and stop.is_set():
                    return
                yield frame
                n += 1
                ok, frame = self.cap.read()
                if not ok:
                    frame = None
        finally:
            self.cap.release()


def open_source(source: str) -> VideoSource:
    """Open a video file, a camera index (``0``) or a stream URL; one-line UserError when it cannot be decoded."""
    if source.isdigit():
        target: Any = int(source)
        name = f"camera{source}"
    elif "://" in source:
        target = source
        name = "stream"
    else:
        path = Path(source).expanduser()
        if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path
        if not path.is_file():
            raise UserError(f"--input {source}: no such video file (or pass a camera index like 0, or a stream URL)")
        target, name = str(path), path.stem
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        cap.release()
        raise UserError(f"--input {source}: cannot open it as a video (unsupported, corrupt or unreachable)")
    ok, first = cap.read()
    if not ok or first is None or first.size == 0:
        cap.release()
        raise UserError(f"--input {source}: no frame could be decoded (empty, corrupt or unsupported video)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_known = math.isfinite(fps) and 0 < fps <= 1000
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = count if isinstance(target, str) and "://" not in target and count > 0 else None
    if first.ndim == 2:  # some grey-scale sources
        first = cv2.cvtColor(first, cv2.COLOR_GRAY2BGR)
    h, w = first.shape[:2]
    return VideoSource(cap, name, first, fps if fps_known else DEFAULT_FPS, fps_known, total, w, h)


def open_writer(stem: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, Path]:
    """A VideoWriter at ``stem`` + extension with the first codec this OpenCV build can encode."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a missing codec is expected, not news
    try:
        for fourcc, ext in CODECS:
            path = stem.with_suffix(ext)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
            if writer.isOpened():
                return writer, path
            writer.release()
            path.unlink(missing_ok=True)
    finally:
        cv2.utils.logging.setLogLevel(level)
    raise UserError(f"cannot encode video into {stem.parent}: none of the codecs {[c for c, _ in CODECS]} is "
                    f"available in this OpenCV build; use --no-save or install opencv-python")


class RateMeter:
    """Frames per second over a sliding window of the last ``window`` frames."""

    def __init__(self, window: int = 30) -> None:
        self.times: deque[float] = deque(maxlen=window + 1)

    def tick(self) -> float:
        self.times.append(time.perf_counter())
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def process_video(predictor: Predictor, source: VideoSource, out_stem: Path | None, max_frames: int | None = None,
                  show: bool = False, progress: bool = True, overlay: bool = True) -> dict[str, Any]:
    """Run the detector over ``source``; write the annotated video to ``out_stem``.<ext> (None: don't write).

    Returns the summary (frames, mean model FPS, mean end-to-end FPS, output path, ...).
    """
    from tqdm import tqdm

    writer = out_path = None
    if out_stem is not None:
        writer, out_path = open_writer(out_stem, source.fps, (source.width, source.height))
    total = source.total if max_frames is None else min(source.total or max_frames, max_frames)
    bar = tqdm(total=total, unit="frame", desc="video", disable=not progress)
    e2e = RateMeter()
    stop = threading.Event()
    written = 0
    interrupted = False

    def prepare(frame: np.ndarray) -> Item:
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return Item(data=frame, input=predictor.preprocess(bgr_to_tensor(frame)), orig_hw=frame.shape[:2])

    def sink(item: Item) -> None:
        nonlocal written
        frame = item.data
        pred = item.pred
        draw_detections(frame, pred["boxes"], pred["labels"], pred["scores"], predictor.classes)
        fps = e2e.tick()
        if overlay:
            draw_text(frame, [f"model {item.model_fps:.1f} FPS", f"end-to-end {fps:.1f} FPS"])
        if writer is not None:
            writer.write(frame)
        written += 1
        bar.update(1)
        if show:
            cv2.imshow("detections", frame)
            if cv2.waitKey(1) & 0xFF == ord("q"):
                stop.set()

    t0 = time.perf_counter()
    ok = False
    try:
        try:
            run_pipeline(predictor, (prepare(f) for f in source.frames(max_frames, stop)), sink)
        except KeyboardInterrupt:  # camera/stream runs end with Ctrl-C: keep what was written
            interrupted = True
        ok = written > 0
    finally:
        elapsed = time.perf_counter() - t0
        bar.close()
        stop.set()
        source.cap.release()
        if writer is not None:
            writer.release()
            if not ok and out_path is not None:
                out_path.unlink(missing_ok=True)
        if show:
            cv2.destroyAllWindows()
    model_fps = predictor.model_timer.rate
    e2e_fps = written / elapsed if elapsed > 0 else 0.0
    return {"source": source.name, "frames": written, "width": source.width, "height": source.height,
            "fps": source.fps, "fps_from_source": source.fps_known,
            "mean_model_fps": round(model_fps, 3), "mean_end_to_end_fps": round(e2e_fps, 3),
            "end_to_end_over_model": round(e2e_fps / model_fps, 3) if model_fps else 0.0,
            "seconds": round(elapsed, 3), "interrupted": interrupted,
            "output": str(out_path) if out_path is not None else None, "device": str(predictor.device),
            "precision": predictor.precision, "batch": predictor.batch_size}


def infer_video(args: argparse.Namespace) -> dict[str, Any]:
    """The body of infer_det_video.py."""
    source = open_source(args.input)  # fail on a bad video before loading the model or creating folders
    try:
        if args.max_frames is not None and args.max_frames < 1:
            raise UserError(f"--max-frames {args.max_frames}: must be at least 1")
        predictor = predictor_from_args(args)
        if not source.fps_known:
            print(f"note: {args.input} reports no frame rate; writing at {DEFAULT_FPS:g} fps")
        show = False
        if args.show:
            show, why = display_available()
            if not show:
                print(f"note: --show ignored: {why}")
        out_dir = Path(args.out_dir) if args.out_dir else increment_path("outputs/inference", None, "video")
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = None if args.no_save else out_dir / source.name
        summary = process_video(predictor, source, stem, max_frames=args.max_frames, show=show)
    finally:
        source.cap.release()
    summary["summary"] = str(out_dir / "summary.json")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['frames']} frames{' (interrupted)' if summary['interrupted'] else ''} at "
          f"{summary['width']}x{summary['height']} {summary['fps']:g} fps; model {summary['mean_model_fps']:.2f} FPS, "
          f"end-to-end {summary['mean_end_to_end_fps']:.2f} FPS; video: {summary['output'] or '(not saved)'}; "
          f"summary: {summary['summary']}")
    return summary


def build_video_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect objects in a video, camera or stream.")
    parser.add_argument("--input", required=True, help="video file, camera index (0) or stream URL")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    add_predictor_args(parser)
    return parser
