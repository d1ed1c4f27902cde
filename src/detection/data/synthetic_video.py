"""Synthetic tracking clips with ground truth: shapes of ``synthetic.CLASSES`` that move, cross each other, leave
the frame for a while and pass behind an occluder, written as a video plus a MOTChallenge ``gt.txt``.

    from src.detection.data.synthetic_video import generate_tracking_video
    video, gt = generate_tracking_video("input/shapes/demo.mp4", n_frames=240, width=192)

Ground truth rows are ``frame,id,x,y,w,h,1,class,1`` (1-based frames, ``class`` = index into ``CLASSES``), one per
object and frame in which at least ``MIN_VISIBLE`` of the object's pixels can be seen (not hidden by a shape drawn
over it, by the occluder or by the frame edge); the box is the object's box clipped to the frame. Every clip depends
only on (seed, size, frame count).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..core.errors import UserError
from .synthetic import CLASSES, _background, _draw

MIN_VISIBLE = 0.5  # an object less than half visible has no ground-truth row (a detector cannot be asked for it)


@dataclass
class _Obj:
    oid: int
    cls: str
    w: int
    h: int
    pos: np.ndarray  # top-left (x, y), float
    vel: np.ndarray
    color: tuple[int, int, int]
    shape_seed: int  # keeps a triangle's apex the same in every frame
    leaves: bool  # bounces off walls beyond the frame edge, so it is out of sight for a few frames


def _objects(rng: np.random.Generator, width: int, height: int) -> list[_Obj]:
    short = min(width, height)
    n = int(rng.integers(4, 7))
    first = int(rng.integers(0, len(CLASSES) - 1))
    objs = []
    for k in range(n):
        cls = CLASSES[1 + (first + k) % (len(CLASSES) - 1)]
        side = int(rng.integers(max(12, short // 8), max(13, short // 4)))
        side -= side % 2  # circles: the box is exactly 2r wide
        w = side if cls != "triangle" else int(side * rng.uniform(0.8, 1.3))
        h = side
        speed = rng.uniform(1.0, 2.5) * short / 192
        angle = rng.uniform(0, 2 * np.pi)
        vel = np.array([np.cos(angle), np.sin(angle)]) * speed
        pos = np.array([rng.uniform(0, width - w), rng.uniform(0, height - h)])
        if k < 2:  # two objects on a collision course through the centre: a guaranteed crossing
            y = height / 2 - h / 2 + (k - 0.5) * h * 0.4
            pos = np.array([0.0 if k == 0 else width - w, y])
            vel = np.array([speed if k == 0 else -speed, 0.0])
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        objs.append(_Obj(k + 1, cls, w, h, pos, vel, color, int(rng.integers(0, 2**31)), leaves=k == 2))
    return objs


def _occluder(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, np.ndarray]:
    """A full-height textured pillar (x0, x1, pixels): objects moving sideways pass behind it."""
    band = max(8, min(width, height) // 10)
    x0 = int(width * rng.uniform(0.55, 0.7))
    tex = _background(rng, max(width, height))[:height, :band]
    return x0, min(width, x0 + band), tex[:, : min(width, x0 + band) - x0]


def clip_frames(n_frames: int, width: int = 256, height: int | None = None, seed: int = 0
                ) -> Iterator[tuple[np.ndarray, list[tuple[int, int, list[int]]]]]:
    """Yield ``(frame RGB uint8 [H,W,3], [(object id, class index, [x1, y1, x2, y2]), ...])`` per frame; the list
    holds the objects that are at least ``MIN_VISIBLE`` visible (boxes clipped to the frame)."""
    height = height or width
    if n_frames < 1:
        raise UserError(f"--video {n_frames}: give a positive number of frames")
    if min(width, height) < 48:
        raise UserError(f"video size {width}x{height}: use at least 48 pixels per side")
    rng = np.random.default_rng([seed, 3])
    background = _background(rng, max(width, height))[:height, :width]
    objs = _objects(rng, width, height)
    ox0, ox1, occ = _occluder(rng, width, height)
    pad = max(max(o.w, o.h) for o in objs) + 2  # masks on a padded canvas: the full shape even when off-frame
    canvas = np.zeros((height + 2 * pad, width + 2 * pad, 3), np.uint8)
    for _ in range(n_frames):
        frame = background.copy()
        masks = []
        for o in objs:
            box = np.array([o.pos[0], o.pos[1], o.pos[0] + o.w, o.pos[1] + o.h]).round()
            _draw(np.random.default_rng(o.shape_seed), frame, o.cls, box, faint=False, color=o.color)
            canvas[:] = 0
            _draw(np.random.default_rng(o.shape_seed), canvas, o.cls, box + pad, faint=False, color=(255, 255, 255))
            masks.append((box, canvas[:, :, 0] > 127))
        frame[:, ox0:ox1] = occ
        hidden = np.zeros(canvas.shape[:2], bool)
        hidden[:, :pad] = hidden[:, pad + width:] = hidden[:pad] = hidden[pad + height:] = True
        hidden[pad:pad + height, pad + ox0:pad + ox1] = True
        rows = []
        for o, (box, mask) in reversed(list(zip(objs, masks))):  # top-most first: it hides the ones below
            area = int(mask.sum())
            if area and (mask & ~hidden).sum() >= MIN_VISIBLE * area:
                x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
                x2, y2 = min(width, int(box[2])), min(height, int(box[3]))
                rows.append((o.oid, CLASSES.index(o.cls), [x1, y1, x2, y2]))
            hidden |= mask
        yield frame, sorted(rows)
        for o in objs:
            o.pos += o.vel
            for d, (size, extent) in enumerate(((o.w, width), (o.h, height))):
                lo, hi = (-1.5 * size, extent + 0.5 * size) if o.leaves else (0.0, float(extent - size))
                if not lo <= o.pos[d] <= hi:  # bounce
                    o.vel[d] = -o.vel[d]
                    o.pos[d] = np.clip(o.pos[d], lo, hi)


def write_mot_gt(path: str | os.PathLike, per_frame: list[list[tuple[int, int, list[int]]]]) -> Path:
    """MOTChallenge ground truth ``frame,id,x,y,w,h,1,class,1`` (frames 1-based)."""
    path = Path(path)
    lines = [f"{f},{oid},{x1},{y1},{x2 - x1},{y2 - y1},1,{cls},1"
             for f, rows in enumerate(per_frame, 1) for oid, cls, (x1, y1, x2, y2) in rows]
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def generate_tracking_video(path: str | os.PathLike, n_frames: int, width: int = 256, height: int | None = None,
                            seed: int = 0, fps: float = 24.0, codec: str = "auto") -> tuple[Path, Path]:
    """Write the clip to ``path`` (H.264 mp4 where available, see ``video_io.open_writer``) and its ground truth
    to ``<stem>_gt.txt`` beside it; returns (video path, gt path)."""
    from .video_io import open_writer

    height = height or width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = clip_frames(n_frames, width, height, seed)  # validates the arguments before any file exists
    gt: list[list[tuple[int, int, list[int]]]] = []
    writer = open_writer(path.with_suffix(""), fps, (width, height), codec=codec, quality="high")
    try:
        for frame, rows in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            gt.append(rows)
    finally:
        writer.close()
    if writer.path != path and writer.path.suffix != path.suffix:
        print(f"note: {path.name} written as {writer.path.name} ({writer.describe()})")
    return writer.path, write_mot_gt(writer.path.with_name(writer.path.stem + "_gt.txt"), gt)
