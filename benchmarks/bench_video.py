"""Video pipeline: where the time goes on a 1280x720 H.264 clip, and how close end to end comes to its slowest stage.

    python -m benchmarks.bench_video [--quick] [--device cpu|cuda] [--frames N] [--reps N]

A generated 1280x720 H.264 clip (PyAV, smooth moving content) runs through ``video.process_video`` - decode thread
(PyAV, frame threads) -> batched ``Predictor.predict`` -> track / draw thread -> encode thread - and each stage is
also timed alone, in the same run, on the same frames:

* decode alone: the source's frames plus the BGR->RGB conversion the decode stage does;
* model alone: already decoded frames streamed through ``run_pipeline`` in the predictor's batches, one batch in
  flight (upload, resize, forward, post-processing, download), into a sink that does nothing;
* encode alone: H.264 encoding of already drawn frames (the writer the command uses).

Rows: end-to-end FPS without encoding (the JSON Lines / display path) and writing H.264, each against its slowest
stage alone (efficiency, goal >= 0.9: the stages overlap instead of adding up), the stage rates themselves, and
the ``--track`` cost (end-to-end FPS with tracking over without, goal >= 0.9 = at most 10 % slower). On CUDA the
absolute goals of a 16-core GPU machine are rows too (>= 350 FPS without encoding, >= 200 writing H.264).
``--device cpu`` uses a tiny detector and few frames (a smoke test of the rows); ``cuda`` the default detector
(``dinov3_convnext_tiny`` at 640, ``--quick``: a small one at 256).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.common import make_row, markdown_table

EFFICIENCY_GOAL = 0.9
TRACK_GOAL = 0.9
GPU_GOALS = {"no_encode": 350.0, "encode": 200.0}  # FPS, 1280x720 on an H200 machine (16 cores)
SIZE = (1280, 720)


def make_clip(path: Path, frames: int, fps: float = 30.0, seed: int = 0) -> Path:
    """A 1280x720 H.264 clip of smooth, moving content (compresses and decodes like real footage)."""
    from src.detection.data.video_io import open_writer

    rng = np.random.default_rng(seed)
    w, h = SIZE
    low = rng.integers(0, 256, (9, 16, 3)).astype(np.float32)
    background = cv2.resize(low, (w + 256, h), interpolation=cv2.INTER_CUBIC).astype(np.uint8)
    writer = open_writer(path.with_suffix(""), fps, SIZE, codec="h264")
    try:
        for i in range(frames):
            frame = np.ascontiguousarray(background[:, (4 * i) % 256:(4 * i) % 256 + w])
            for k in range(6):  # a few bright boxes that move across the frame
                x = int((60 + 210 * k + 7 * i) % (w - 120))
                y = int((90 + 97 * k + 3 * i) % (h - 120))
                cv2.rectangle(frame, (x, y), (x + 100, y + 100), (40 * k, 255 - 30 * k, 200), -1)
            writer.write(frame)
    finally:
        writer.close()
    return writer.path


def build_predictor(device: str, quick: bool) -> Any:
    """A random-weight detector at the size the device's rows are about (plumbing and speed, not accuracy)."""
    from src.detection.checkpoint import build_payload, model_meta
    from src.detection.data.synthetic import CLASSES
    from src.detection.inference.predictor import Predictor
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    if device == "cpu":
        cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=len(CLASSES), imgsz=(128, 128),
                             fpn_channels=64, arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    elif quick:
        cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=len(CLASSES), imgsz=(256, 256))
    else:
        cfg = DetectorConfig(model_name="dinov3_convnext_tiny", num_classes=len(CLASSES), imgsz=(640, 640))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_detector(cfg, verbose=False).eval()
    payload = build_payload(model, model_meta(model, list(CLASSES), letterbox=False))
    return Predictor(payload, device=device, batch_size=1 if device == "cpu" else 8)


def decode_alone(clip: Path, frames: int) -> float:
    """FPS of the decode stage's work alone: decode + BGR->RGB (as ``process_video``'s decode thread does it)."""
    from src.detection.data.video_io import open_source
    from src.detection.inference.draw import bgr_to_tensor

    source = open_source(str(clip))
    t0 = time.perf_counter()
    n = 0
    for _, _, frame in source.frames(frames):
        bgr_to_tensor(frame)
        n += 1
    return n / (time.perf_counter() - t0)


def model_alone(predictor: Any, images: list[torch.Tensor], frames: int) -> float:
    """FPS of the model stage alone: decoded frames streamed through ``run_pipeline`` (as ``process_video`` feeds
    the model: batch k+1 submitted before batch k's boxes are collected), with a sink that does nothing."""
    from benchmarks.common import stream_frames

    t0 = time.perf_counter()
    done = stream_frames(predictor, images, frames)
    return done / (time.perf_counter() - t0)


def encode_alone(frames_bgr: list[np.ndarray], frames: int, out: Path) -> float:
    """FPS of H.264 encoding (the command's writer) of already drawn frames."""
    from src.detection.data.video_io import open_writer

    writer = open_writer(out, 30.0, SIZE, codec="h264")
    t0 = time.perf_counter()
    try:
        for i in range(frames):
            writer.write(frames_bgr[i % len(frames_bgr)])
    finally:
        writer.close()
    return frames / (time.perf_counter() - t0)


def run(quick: bool = False, device: str = "cpu", frames: int | None = None, reps: int | None = None
        ) -> list[dict[str, Any]]:
    """All rows on ``device``. On the CPU the model runs on one thread: its OpenMP threads would otherwise spin
    against the decode and encode threads for the same cores (on 2 shared cores: 30x slower forwards)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, device, frames, reps)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: str, frames: int | None, reps: int | None) -> list[dict[str, Any]]:
    from src.detection.data.video_io import open_source
    from src.detection.inference.draw import bgr_to_tensor, draw_detections
    from src.detection.inference.tracking import TrackConfig
    from src.detection.inference.video import process_video

    device = str(device)
    kind = torch.device(device).type
    frames = frames or (24 if kind == "cpu" and quick else 48 if kind == "cpu" else 120 if quick else 300)
    reps = reps or (1 if quick else 2)
    predictor = build_predictor(device, quick)
    samples: dict[str, list[float]] = {k: [] for k in ("decode", "model", "encode", "e2e_no_encode", "e2e_encode",
                                                       "e2e_encode_track", "e2e_no_encode_track")}
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        tmp = Path(tmp)
        clip = make_clip(tmp / "clip.mp4", frames)
        decoded = [f for _, _, f in open_source(str(clip)).frames(min(frames, 32))]
        images = [bgr_to_tensor(f) for f in decoded]
        drawn = []
        for f in decoded:
            f = f.copy()
            preds = predictor.predict([bgr_to_tensor(f)])[0]
            drawn.append(draw_detections(f, preds["boxes"][:10], preds["labels"][:10], preds["scores"][:10],
                                         predictor.classes))

        def video(encode: bool, track: bool) -> dict[str, Any]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return process_video(predictor, open_source(str(clip)), tmp / "out" if encode else None,
                                     threshold=0.5, progress=False, json_path=None if encode else tmp / "f.jsonl",
                                     track=TrackConfig(threshold=0.5, fps=30.0) if track else None)

        video(True, False)  # warm-up: kernels, CUDA graphs, encoder
        model_alone(predictor, images, min(frames, 4 * predictor.batch_size))
        for _ in range(reps):  # interleaved, so every figure sees the same machine load
            samples["decode"].append(decode_alone(clip, frames))
            samples["model"].append(model_alone(predictor, images, frames))
            samples["encode"].append(encode_alone(drawn, frames, tmp / "enc"))
            for key, encode, track in (("e2e_no_encode", False, False), ("e2e_encode", True, False),
                                       ("e2e_encode_track", True, True), ("e2e_no_encode_track", False, True)):
                s = video(encode, track)
                if s["frames"] != frames:
                    raise RuntimeError(f"video run read {s['frames']} of {frames} frames")
                samples[key].append(s["mean_end_to_end_fps"])
                stages[key] = s["stages"]
    return rows_from(samples, stages, device, kind, frames, predictor, quick)


def _stage_note(stages: dict[str, Any]) -> str:
    from src.detection.inference.video import stage_line

    return stage_line(stages).replace("time per frame (ms, busy per stage): ", "in the run, ms/frame busy: ")


def rows_from(samples: dict[str, list[float]], stages: dict[str, Any], device: str, kind: str, frames: int,
              predictor: Any, quick: bool) -> list[dict[str, Any]]:
    med = {k: float(np.median(v)) for k, v in samples.items()}
    what = (f"{frames} frames 1280x720 H.264, {predictor.card.detector.model_name} @{predictor.imgsz[0]}, "
            f"batch {predictor.batch_size}, {predictor.precision} ({device})")
    rows = []
    for key, label, slow_keys in (("e2e_no_encode", "without encoding (JSON Lines / display path)",
                                   ("decode", "model")),
                                  ("e2e_encode", "writing H.264", ("decode", "model", "encode"))):
        slowest = min(slow_keys, key=lambda k: med[k])
        row = make_row(f"video end to end {label} vs its slowest stage alone ({slowest}) ({kind})",
                       samples[slowest], samples[key], EFFICIENCY_GOAL, "FPS", higher_is_better=True,
                       note=f"efficiency; {what}; {_stage_note(stages[key])}")
        rows.append(row)
    for key in ("decode", "model", "encode"):
        alone = {"decode": "PyAV decode + BGR->RGB",
                 "model": "run_pipeline, one batch in flight: upload, resize, forward, post-process, download",
                 "encode": "libx264 of drawn frames"}[key]
        row = make_row(f"stage alone: {key} ({kind})", samples[key], samples[key], "info", "FPS",
                       higher_is_better=True, note=f"{alone}; {what}")
        row["baseline"], row["baseline_spread"], row["ratio"] = math.nan, None, math.nan
        rows.append(row)
    for key, base in (("e2e_encode_track", "e2e_encode"), ("e2e_no_encode_track", "e2e_no_encode")):
        track_ms = stages[key].get("track", {}).get("ms_per_frame", math.nan)
        rows.append(make_row(f"--track cost: end-to-end FPS with / without tracking, "
                             f"{'writing H.264' if 'encode_' in key and 'no_' not in key else 'no encoding'} ({kind})",
                             samples[base], samples[key], TRACK_GOAL, "FPS", higher_is_better=True,
                             note=f"goal: at most 10 % slower; tracker {track_ms:.2f} ms/frame in its thread; {what}"))
    if kind == "cuda" and not quick:
        for key, goal_key, label in (("e2e_no_encode", "no_encode", "without encoding"),
                                     ("e2e_encode", "encode", "writing H.264")):
            row = make_row(f"video end to end {label}: goal FPS vs ours ({kind})", [GPU_GOALS[goal_key]],
                           samples[key], 1.0, "FPS", higher_is_better=True,
                           note=f"absolute goal on an H200 machine (16 cores); {what}")
            row["baseline_spread"] = None
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames, one repetition (and a small GPU model)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--frames", type=int, default=None, help="clip length (default: 48 on cpu, 300 on cuda)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every measurement (default 2; 1 quick)")
    args = ap.parse_args(argv)
    print(markdown_table(run(quick=args.quick, device=args.device, frames=args.frames, reps=args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
