"""Memory of a long video run: peak RSS while the real video pipeline (``video.process_video``: decode thread ->
batched Predictor -> draw/encode thread, bounded queues) processes 2,000 frames; it must stay flat.

    python -m benchmarks.bench_video_memory [--quick] [--frames N]

RSS is sampled every 20 ms by a background thread (psutil). The row compares the peak RSS of the first half of
the run (after the first 10 % of frames: model warm-up, oneDNN caches, queue fill) with the peak of the second
half: a leak or an unbounded queue shows up as a second half above the first. A small detector
(``dinov3_convnext_atto`` at 128 px) keeps 2,000 frames within a minute or two on 2 CPU cores; what is measured -
buffers held per frame by the pipeline - does not depend on the model's size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.common import make_row, markdown_table

GOAL = 0.95  # second-half peak at most ~5 % above the first-half peak


class RssSampler:
    """Samples this process's resident set size in a background thread: ``samples`` = [(seconds, bytes)]."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, self._proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run(quick: bool = False, frames: int | None = None) -> list[dict[str, Any]]:
    """One row: peak RSS (MiB) of the first vs the second half of a ``frames``-frame video run."""
    from src.detection.checkpoint import build_payload, model_meta
    from src.detection.data.synthetic import CLASSES, generate_video
    from src.detection.inference.predictor import Predictor
    from src.detection.inference.video import open_source, process_video
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    frames = frames or (300 if quick else 2000)
    frame_size, imgsz = 256, 128
    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=len(CLASSES), imgsz=(imgsz, imgsz),
                         fpn_channels=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_detector(cfg, verbose=False).eval()
    payload = build_payload(model, model_meta(model, list(CLASSES), letterbox=False))
    with tempfile.TemporaryDirectory(prefix="bench_video_memory_") as tmp:
        video = generate_video(Path(tmp) / "long.mp4", frames, imgsz=frame_size, seed=0)
        predictor = Predictor(payload, device="cpu", batch_size=4)
        with RssSampler() as rss, contextlib.redirect_stderr(io.StringIO()):
            summary = process_video(predictor, open_source(str(video)), Path(tmp) / "out", progress=False)
    if summary["frames"] != frames:
        raise RuntimeError(f"video run wrote {summary['frames']} of {frames} frames")
    end = rss.samples[-1][0]
    start = 0.1 * end
    mid = start + (end - start) / 2
    first = [b / 2**20 for t, b in rss.samples if start <= t < mid]
    second = [b / 2**20 for t, b in rss.samples if t >= mid]
    # make_row takes medians of lists; the peaks are single numbers, so pass them as one-element lists
    row = make_row(f"peak RSS during a {frames}-frame video run: first half vs second half (cpu)",
                   [max(first)], [max(second)], GOAL, "MiB", higher_is_better=False,
                   note=f"flat = ratio ~1; {frame_size}x{frame_size} frames, dinov3_convnext_atto @{imgsz}, batch 4, "
                        f"{summary['mean_end_to_end_fps']:.0f} FPS end to end; overall peak "
                        f"{max(b for _, b in rss.samples) / 2**20:.0f} MiB, {len(rss.samples)} samples")
    row["baseline_spread"] = row["ours_spread"] = None  # one peak per half, no repetitions
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 frames instead of 2,000")
    ap.add_argument("--frames", type=int, default=None)
    args = ap.parse_args()
    print(markdown_table(run(quick=args.quick, frames=args.frames)))


if __name__ == "__main__":
    main()
