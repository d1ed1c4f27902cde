"""Frame sources (video files, cameras, streams, folders of frames) and video writers that play in a browser.

Writers: H.264 yuv420p in mp4 through PyAV (its wheel ships FFmpeg with libx264) when the frame size is even -
what every browser plays; for odd sizes VP9 yuv420p in mp4 (VP9 allows odd sizes, H.264 4:2:0 does not), so the
output keeps the exact source size and every source pixel; OpenCV's writer (mp4v, ...) is the fallback when PyAV
is missing. ``Writer.describe()`` says which one was used.
"""

from __future__ import annotations

import fractions
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# FFmpeg's own log lines ("moov atom not found", ...) would break the one-line error contract; we report
# failures ourselves. Must be set before the first VideoCapture; a user's own setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

from ..core.errors import UserError
from ..core.paths import resolve_path
from .image_io import IMAGE_EXTS, image_size

DEFAULT_FPS = 30.0
CODEC_CHOICES = ("auto", "h264", "vp9", "opencv")
# OpenCV fallback: (fourcc, extension) in order of preference; mp4v is in every OpenCV FFmpeg build.
CV_CODECS = (("mp4v", ".mp4"), ("avc1", ".mp4"), ("XVID", ".avi"), ("MJPG", ".avi"))


# ============================================================================================== sources
@dataclass
class FrameSource:
    """Frames of one input. ``frames()`` yields ``(index, timestamp seconds, BGR uint8 frame)``; ``live`` sources
    (cameras, streams) are stamped with the wall clock since their first frame, the others with index / fps."""

    name: str
    fps: float
    fps_known: bool
    total: int | None
    width: int
    height: int
    live: bool = False
    skipped: list[str] = field(default_factory=list)  # unreadable frames of a folder (named, then skipped)

    def frames(self, max_frames: int | None = None, stop: threading.Event | None = None
               ) -> Iterator[tuple[int, float, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VideoSource(FrameSource):
    """An OpenCV capture whose first frame has already been decoded (so we know it really is a video)."""

    def __init__(self, cap: cv2.VideoCapture, first: np.ndarray, **kw: Any) -> None:
        super().__init__(**kw)
        self.cap = cap
        self.first = first

    def frames(self, max_frames=None, stop=None):
        n = 0
        frame: np.ndarray | None = self.first
        t0 = time.perf_counter()
        try:
            while frame is not None and (max_frames is None or n < max_frames):
                if stop is not None and stop.is_set():
                    return
                if frame.ndim == 2:  # some grey-scale sources
                    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
                yield n, (time.perf_counter() - t0) if self.live else n / self.fps, frame
                n += 1
                ok, frame = self.cap.read()
                if not ok:
                    frame = None
        finally:
            self.cap.release()

    def close(self) -> None:
        self.cap.release()


def _natural_key(path: Path) -> list[Any]:
    """frame2 before frame10: numbers in names compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class FolderSource(FrameSource):
    """A folder of frames, in natural name order (frame2 < frame10); every frame must have the first one's size."""

    def __init__(self, files: list[Path], **kw: Any) -> None:
        super().__init__(**kw)
        self.files = files

    def frames(self, max_frames=None, stop=None):
        n = 0
        for path in self.files:
            if (max_frames is not None and n >= max_frames) or (stop is not None and stop.is_set()):
                return
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                self.skipped.append(path.name)
                continue
            yield n, n / self.fps, frame
            n += 1


def open_source(source: str, fps: float | None = None) -> FrameSource:
    """A video file, a folder of frames, a camera index (``0``) or a stream URL; one-line UserError when it
    cannot be read. ``fps`` overrides the source's frame rate (folders have none: default 30)."""
    if fps is not None and not (math.isfinite(fps) and 0 < fps <= 1000):
        raise UserError(f"--fps {fps}: give a frame rate between 0 and 1000")
    if source.isdigit():
        target: Any = int(source)
        name, live = f"camera{source}", True
    elif "://" in source:
        target, name, live = source, "stream", True
    else:
        path = resolve_path(source)
        if path.is_dir():
            return _open_folder(source, path, fps)
        if not path.is_file():
            raise UserError(f"--input {source}: no such video file or folder of frames (or pass a camera index "
                            f"like 0, or a stream URL)")
        target, name, live = str(path), path.stem, False
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        cap.release()
        raise UserError(f"--input {source}: cannot open it as a video (unsupported, corrupt or unreachable)")
    ok, first = cap.read()
    if not ok or first is None or first.size == 0:
        cap.release()
        raise UserError(f"--input {source}: no frame could be decoded (empty, corrupt or unsupported video)")
    src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_known = math.isfinite(src_fps) and 0 < src_fps <= 1000
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = count if not live and count > 0 else None
    h, w = first.shape[:2]
    rate = fps or (src_fps if fps_known else DEFAULT_FPS)
    return VideoSource(cap, first, name=name, fps=rate, fps_known=fps_known or fps is not None, total=total,
                       width=w, height=h, live=live)


def _open_folder(source: str, path: Path, fps: float | None) -> FolderSource:
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
    if not files:
        raise UserError(f"--input {source}: a folder without frames ({', '.join(IMAGE_EXTS)}); pass a video file "
                        f"or a folder of images")
    h, w = image_size(files[0])
    for f in files[1:]:  # header reads only: cheap, and a mismatch is caught before any output exists
        try:
            size = image_size(f)
        except UserError:
            continue  # unreadable: skipped (and named) when its turn comes
        if size != (h, w):
            raise UserError(f"--input {source}: frame {f.name} is {size[1]}x{size[0]} but {files[0].name} is "
                            f"{w}x{h}; a video needs one frame size (resize the frames or split the folder)")
    return FolderSource(files, name=path.name, fps=fps or DEFAULT_FPS, fps_known=fps is not None,
                        total=len(files), width=w, height=h)


# ============================================================================================== writers
class Writer:
    """Common interface: ``write(bgr frame)``, ``close()`` (finalizes the container), ``path``, ``frames``."""

    path: Path
    codec: str
    pix_fmt: str
    size: tuple[int, int]
    fps: float
    frames: int = 0
    backend: str = ""

    def write(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.codec} {self.pix_fmt} {self.size[0]}x{self.size[1]} via {self.backend}"

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "codec": self.codec, "pixel_format": self.pix_fmt, "width": self.size[0],
                "height": self.size[1], "fps": self.fps, "backend": self.backend, "frames": self.frames}


class PyAVWriter(Writer):
    """mp4 through PyAV: libx264 (yuv420p) or libvpx-vp9 (yuv420p, odd sizes allowed)."""

    OPTIONS = {  # quality: (normal, high); x264 veryfast is a few ms per frame at 1080p on one core
        "libx264": ({"preset": "veryfast", "crf": "20"}, {"preset": "medium", "crf": "14"}),
        "libvpx-vp9": ({"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "row-mt": "1"},
                       {"deadline": "good", "cpu-used": "4", "crf": "18", "b": "0", "row-mt": "1"}),
    }

    def __init__(self, path: Path, codec: str, fps: float, size: tuple[int, int], quality: str = "normal") -> None:
        import av

        self._av = av
        self.path, self.codec, self.pix_fmt, self.size, self.fps = path, codec, "yuv420p", size, fps
        self.backend = f"PyAV {av.__version__}"
        self.frames = 0
        rate = fractions.Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
        # +faststart: the index goes first, so a browser can start playing before the whole file has loaded
        self._container = av.open(str(path), "w", options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height = size
            self._stream.pix_fmt = self.pix_fmt
            self._stream.options = dict(self.OPTIONS[codec][quality == "high"])
            self._stream.codec_context.open()  # fail here (unsupported size/options), not on the first frame
        except Exception:
            self._container.close()
            path.unlink(missing_ok=True)
            raise

    def write(self, frame: np.ndarray) -> None:
        vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():  # flush the encoder's delayed frames
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None


class OpenCVWriter(Writer):
    def __init__(self, writer: cv2.VideoWriter, path: Path, fourcc: str, fps: float, size: tuple[int, int]) -> None:
        self._writer, self.path, self.codec, self.fps, self.size = writer, path, fourcc, fps, size
        self.pix_fmt = "yuv420p" if fourcc in ("mp4v", "avc1", "XVID") else "yuvj420p"
        self.backend = f"OpenCV {cv2.__version__}"
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        self._writer.release()


def pyav_codecs() -> set[str]:
    """Encoders PyAV can use here (empty without PyAV)."""
    try:
        import av
    except ImportError:
        return set()
    return set(av.codecs_available) & {"libx264", "libvpx-vp9"}


def open_writer(stem: Path, fps: float, size: tuple[int, int], codec: str = "auto", quality: str = "normal"
                ) -> Writer:
    """A writer at ``stem`` + extension. ``codec``: auto (H.264 for even sizes, VP9 for odd ones, OpenCV when
    PyAV cannot), h264, vp9 or opencv."""
    if codec not in CODEC_CHOICES:
        raise UserError(f"--codec {codec!r}: choose from {', '.join(CODEC_CHOICES)}")
    w, h = size
    available = pyav_codecs()
    if codec == "auto":
        wanted = ["libx264", "libvpx-vp9"] if w % 2 == 0 and h % 2 == 0 else ["libvpx-vp9"]
        wanted = [c for c in wanted if c in available]
    elif codec == "opencv":
        wanted = []
    else:
        name = {"h264": "libx264", "vp9": "libvpx-vp9"}[codec]
        if name not in available:
            raise UserError(f"--codec {codec}: this install has no {name} encoder (pip install av); use --codec auto")
        if name == "libx264" and (w % 2 or h % 2):
            raise UserError(f"--codec h264: {w}x{h} is odd and H.264 yuv420p needs even sizes; use --codec auto "
                            f"(VP9 keeps the exact size)")
        wanted = [name]
    for name in wanted:
        try:
            return PyAVWriter(stem.with_suffix(".mp4"), name, fps, size, quality)
        except Exception:  # noqa: BLE001 - an encoder that cannot open here: try the next one
            continue
    return _opencv_writer(stem, fps, size)


def _opencv_writer(stem: Path, fps: float, size: tuple[int, int]) -> OpenCVWriter:
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a missing codec is expected, not news
    try:
        for fourcc, ext in CV_CODECS:
            path = stem.with_suffix(ext)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
            if writer.isOpened():
                return OpenCVWriter(writer, path, fourcc, fps, size)
            writer.release()
            path.unlink(missing_ok=True)
    finally:
        cv2.utils.logging.setLogLevel(level)
    raise UserError(f"cannot encode video into {stem.parent}: neither PyAV (pip install av) nor OpenCV's codecs "
                    f"{[c for c, _ in CV_CODECS]} are available; use --no-save")
