"""Image files: the one list of image extensions, decoding to RGB uint8 tensors, header sizes, file discovery."""

from __future__ import annotations

import functools
import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..core.errors import UserError
from ..core.paths import resolve_path

if TYPE_CHECKING:
    import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# torch, torchvision and OpenCV are imported by the decoding functions, not here: the dataset readers (and so
# `analyze` / `convert --help`) need only the extensions and header sizes of this module.


class UnreadableImage(UserError):
    """An image whose header cannot be read; ``problem`` is the message without the advice, for callers that give
    their own."""

    def __init__(self, problem: str, advice: str = "replace or remove it") -> None:
        super().__init__(f"{problem}; {advice}")
        self.problem, self.advice = problem, advice

    def __reduce__(self):
        return type(self), (self.problem, self.advice)


# --------------------------------------------------------------------------------------------- images
@functools.cache
def _torchvision_decoder():
    """torchvision's ``decode_image`` (None without it). torchvision 0.29 deprecates its image codecs in favour of
    torchcodec but they are still the fastest here (benchmarks/bench_decode.py); OpenCV is the fallback."""
    try:
        from torchvision.io import decode_image
    except ImportError:  # pragma: no cover - future torchvision without image codecs
        return None
    return decode_image


def _decode_torchvision(data: bytes) -> torch.Tensor:
    import torch
    from torchvision.io import ImageReadMode

    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():  # the deprecation notice is re-issued on every call (and pytest shows it)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torchvision_decoder()(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _decode_cv2(data: bytes) -> torch.Tensor:
    import cv2
    import torch

    # IMREAD_COLOR applies EXIF orientation and converts grey/alpha/palette to 3 channels (BGR)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("OpenCV could not decode it")
    return torch.from_numpy(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to an RGB uint8 tensor [3, H, W] with EXIF orientation applied.

    JPEG/PNG through torchvision (libjpeg-turbo/libpng, fastest here: benchmarks/bench_decode.py); WebP, BMP and
    anything torchvision rejects through OpenCV. Unreadable or truncated files raise UserError.
    """
    import cv2
    import torch
    from torchvision.transforms.v2.functional import to_dtype

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror or exc}; check the file exists and is readable") from None
    if not data:
        raise UserError(f"image {path} is empty (0 bytes); replace or remove it")
    decoders = ([_decode_torchvision] if _torchvision_decoder() is not None else []) + [_decode_cv2]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        decoders = [_decode_cv2]  # torchvision ignores WebP EXIF orientation; OpenCV applies it (and is as fast)
    for decode in decoders:
        try:
            img = decode(data)
            if img.dtype != torch.uint8:  # 16-bit PNG
                img = to_dtype(img, torch.uint8, scale=True)
            if img.ndim == 3 and img.shape[0] == 3 and img.shape[1] > 0 and img.shape[2] > 0:
                return img
        except (RuntimeError, ValueError, cv2.error):
            continue
    raise UserError(f"cannot decode image {path} (corrupt, truncated or unsupported format); replace or remove it")


def undecodable_images(paths: Sequence[Path], desc: str = "decoding images", show: bool = True,
                       workers: int | None = None) -> list[tuple[Path, str]]:
    """``(path, reason)`` of the images ``read_image`` cannot decode, in the order given. Every file is decoded
    fully (a header check misses a truncated file) by a thread pool: the decoders release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def check(path: Path) -> tuple[Path, str] | None:
        try:
            read_image(path)
        except UserError as exc:
            return Path(path), str(exc)
        return None

    bad = []
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=desc, unit="img", leave=False,
                                                   disable=not show) as bar:
        for found in pool.map(check, paths):
            bar.update()
            if found is not None:
                bad.append(found)
    return bad


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the file header only (no pixel decoding); UnreadableImage if it fails."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format in ("JPEG", "WEBP", "PNG", "TIFF") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot read image {path}: {exc}") from None
    return h, w


def find_images(source: str, recursive: bool = False) -> tuple[list[Path], Path]:
    """Image files named by ``--input`` (a file, a folder or a glob) and the folder names are relative to."""
    is_glob = any(c in source for c in "*?[")
    path = Path(source).expanduser() if is_glob else resolve_path(source)
    if is_glob:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else path.parent
    elif path.is_dir():
        it = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in it if p.is_file())
        root = path
    elif path.is_file():
        return [path], path.parent
    else:
        raise UserError(f"--input {source}: no such file or folder")
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    if not images:
        hint = "" if recursive or is_glob else " (add --recursive to search subfolders)"
        raise UserError(f"--input {source}: no images ({', '.join(IMAGE_EXTS)}) found{hint}")
    return images, root
