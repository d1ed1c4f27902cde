"""Frame sources (video files, cameras, streams, folders of frames) and video writers that play in a browser.

Writers: H.264 yuv420p in mp4 through PyAV (its wheel ships FFmpeg with libx264) when the frame size is even -
what every browser plays; for odd sizes VP9 yuv420p in mp4 (VP9 allows odd sizes, H.264 4:2:0 does not), so the
output keeps the exact source size and every source pixel; OpenCV's writer (mp4v, ...) is the fallback when PyAV
is missing. ``Writer.describe()`` says which one was used.

Sources: video files decode through PyAV with FFmpeg's frame threading (several frames in flight on several cores)
when PyAV is installed, else (and for cameras, streams and rotated phone videos, which OpenCV turns upright)
through OpenCV. Every source counts the frames it read, so a file that ends before the frame count its container
announces (truncated, corrupt) is reported instead of passing for a complete run. OpenCV's own log lines are
silenced while a source is opened: a failure is reported in one line of ours.
"""

from __future__ import annotations

import fractions
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# FFmpeg's own log lines ("moov atom not found", ...) would break the one-line error contract; we report
# failures ourselves. Must be set before the first VideoCapture; a user's own setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

from ..core.choices import CODEC_CHOICES
from ..core.errors import UserError
from ..core.paths import resolve_path
from .image_io import IMAGE_EXTS, image_size

DEFAULT_FPS = 30.0
# OpenCV fallback: (fourcc, extension) in order of preference; mp4v is in every OpenCV FFmpeg build.
CV_CODECS = (("mp4v", ".mp4"), ("avc1", ".mp4"), ("XVID", ".avi"), ("MJPG", ".avi"))


# ============================================================================================== sources
@contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log lines (``[ WARN:0@4.3] ... cap_v4l.cpp``, ``[ERROR:...] obsensor...``) while a
    source is probed: a failure is expected there and reported by us in one line."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


@dataclass
class FrameSource:
    """Frames of one input. ``frames()`` yields ``(index, timestamp seconds, BGR uint8 frame)``; ``live`` sources
    (cameras, streams) are stamped with the wall clock since their first frame, the others with index / fps.

    ``total``: the frame count the container announces (None: unknown, live); ``read``: frames yielded so far;
    ``ended``: why the last ``frames()`` stopped (``"end"`` of the input, ``"max_frames"``, ``"stopped"``, or a
    decoding error's first line) - with ``total`` it tells a complete file from a truncated one (``shortfall``)."""

    name: str
    fps: float
    fps_known: bool
    total: int | None
    width: int
    height: int
    live: bool = False
    skipped: list[str] = field(default_factory=list)  # unreadable frames of a folder (named, then skipped)
    read: int = 0
    ended: str | None = None
    decoder: str = ""

    def frames(self, max_frames: int | None = None, stop: threading.Event | None = None
               ) -> Iterator[tuple[int, float, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def shortfall(self) -> str | None:
        """A one-line note when the input ended before the frames its container announces (truncated or corrupt
        file), else None. Meaningful once ``frames()`` has finished."""
        if self.live or not self.total or self.ended in ("max_frames", "stopped", None):
            return None
        if self.read + len(self.skipped) >= self.total:
            return None
        why = "" if self.ended == "end" else f" ({self.ended})"
        return (f"{self.name}: the input ended after {self.read} of the {self.total} frames it announces{why}; "
                f"the file is probably truncated or corrupt, so the output covers only those frames")

    def _yield_frames(self, decoded: Iterator[np.ndarray], max_frames: int | None, stop: threading.Event | None
                      ) -> Iterator[tuple[int, float, np.ndarray]]:
        """Number, stamp and count ``decoded`` frames; record why they ended."""
        self.read, self.ended = 0, None
        t0 = time.perf_counter()
        while True:
            if max_frames is not None and self.read >= max_frames:
                self.ended = "max_frames"
                return
            if stop is not None and stop.is_set():
                self.ended = "stopped"
                return
            try:
                frame = next(decoded, None)
            except Exception as exc:  # noqa: BLE001 - a decoding error mid-file ends the input; reported by shortfall
                text = str(exc).strip()
                self.ended = f"decoding failed: {text.splitlines()[0][:120] if text else type(exc).__name__}"
                return
            if frame is None:
                self.ended = "end"
                return
            if frame.ndim == 2:  # some grey-scale sources
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            n = self.read
            self.read += 1
            yield n, (time.perf_counter() - t0) if self.live else n / self.fps, frame


class VideoSource(FrameSource):
    """An OpenCV capture whose first frame has already been decoded (so we know it really is a video)."""

    def __init__(self, cap: cv2.VideoCapture, first: np.ndarray, **kw: Any) -> None:
        super().__init__(**kw)
        self.cap = cap
        self.first = first
        self.decoder = f"OpenCV {cv2.__version__}"

    def _decode(self) -> Iterator[np.ndarray]:
        yield self.first
        while True:
            ok, frame = self.cap.read()
            if not ok or frame is None:
                return
            yield frame

    def frames(self, max_frames=None, stop=None):
        try:
            yield from self._yield_frames(self._decode(), max_frames, stop)
        finally:
            self.cap.release()

    def close(self) -> None:
        self.cap.release()


class PyAVSource(FrameSource):
    """A video file decoded by PyAV with frame threading; its first frame has already been decoded."""

    def __init__(self, container: Any, stream: Any, first: np.ndarray, rest: Iterator[Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.container, self.stream, self.first, self._rest = container, stream, first, rest
        import av

        self.decoder = f"PyAV {av.__version__} ({stream.codec_context.name}, frame threads)"

    def _decode(self) -> Iterator[np.ndarray]:
        yield self.first
        for frame in self._rest:
            # bgr24: what OpenCV draws on and the encoder takes; swscale converts straight into the array
            yield frame.to_ndarray(format="bgr24")

    def frames(self, max_frames=None, stop=None):
        try:
            yield from self._yield_frames(self._decode(), max_frames, stop)
        finally:
            self.close()

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None


def _natural_key(path: Path) -> list[Any]:
    """frame2 before frame10: numbers in names compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class FolderSource(FrameSource):
    """A folder of frames, in natural name order (frame2 < frame10); every frame must have the first one's size."""

    def __init__(self, files: list[Path], **kw: Any) -> None:
        super().__init__(**kw)
        self.files = files
        self.decoder = f"OpenCV {cv2.__version__} imread"

    def _decode(self) -> Iterator[np.ndarray]:
        for path in self.files:
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                self.skipped.append(path.name)
                continue
            yield frame

    def frames(self, max_frames=None, stop=None):
        self.skipped.clear()
        yield from self._yield_frames(self._decode(), max_frames, stop)


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
        opened = _open_pyav(source, path, fps)
        if opened is not None:
            return opened
    with quiet_opencv():
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            if isinstance(target, int):
                raise UserError(f"--input {source}: no camera {source} (none found, or it is in use); pass a video "
                                f"file, a folder of frames or a stream URL")
            raise UserError(f"--input {source}: cannot open it as a video (unsupported, corrupt or unreachable)")
        ok, first = cap.read()
    if not ok or first is None or first.size == 0:
        cap.release()
        if isinstance(target, int):
            raise UserError(f"--input {source}: camera {source} opened but delivered no frame (in use by another "
                            f"program, or not a camera)")
        raise UserError(f"--input {source}: no frame could be decoded (empty, corrupt or unsupported video)")
    src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_known = math.isfinite(src_fps) and 0 < src_fps <= 1000
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = count if not live and count > 0 else None
    h, w = first.shape[:2]
    rate = fps or (src_fps if fps_known else DEFAULT_FPS)
    return VideoSource(cap, first, name=name, fps=rate, fps_known=fps_known or fps is not None, total=total,
                       width=w, height=h, live=live)


def _open_pyav(source: str, path: Path, fps: float | None) -> PyAVSource | None:
    """``path`` through PyAV (frame-threaded decoding), or None to let OpenCV try: no PyAV, no video stream, a
    container PyAV cannot read, or a rotated video (OpenCV applies the rotation, PyAV does not)."""
    try:
        import av
    except ImportError:
        return None
    try:
        container = av.open(str(path))
    except Exception:  # noqa: BLE001 - not a container PyAV reads: OpenCV decides (and reports it)
        return None
    try:
        if not container.streams.video:
            container.close()
            return None
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: several frames decode at once on several cores
        frames = container.decode(stream)
        first_frame = next(frames, None)
        if first_frame is None or getattr(first_frame, "rotation", 0):
            container.close()
            return None
        first = first_frame.to_ndarray(format="bgr24")
    except Exception:  # noqa: BLE001 - undecodable with PyAV: OpenCV decides
        container.close()
        return None
    rate = stream.average_rate or stream.guessed_rate
    src_fps = float(rate) if rate else 0.0
    fps_known = math.isfinite(src_fps) and 0 < src_fps <= 1000
    total = int(stream.frames or 0) or None
    h, w = first.shape[:2]
    return PyAVSource(container, stream, first, frames, name=path.stem, fps=fps or (src_fps if fps_known else
                      DEFAULT_FPS), fps_known=fps_known or fps is not None, total=total, width=w, height=h)


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
