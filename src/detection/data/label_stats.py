"""What the labels of a split look like, as one picture (``labels.png``): objects per class, box width / height
and aspect-ratio histograms, objects per image and a heat map of box centres.

Read from the annotations only (``DetectionDataset.annotations``: clamped, original-image pixels), never from
decoded images, so it is fast on any dataset size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import save_figure

HEATMAP_BINS = 50


@dataclass
class LabelStats:
    """One entry per object (``labels``, ``widths``, ``heights`` in original pixels, ``centers`` as fractions of
    the image width / height) and per image (``objects_per_image``). ``classes[0]`` is ``__background__``."""

    classes: list[str]
    labels: np.ndarray  # [N] int64, 1..K-1
    widths: np.ndarray  # [N] float32
    heights: np.ndarray  # [N] float32
    centers: np.ndarray  # [N, 2] float32 in [0, 1]
    objects_per_image: np.ndarray  # [I] int64

    @classmethod
    def from_dataset(cls, ds: Any) -> LabelStats:
        """The statistics of a ``DetectionDataset`` (its records' sizes and clamped annotations)."""
        labels, boxes, sizes, per_image = [], [], [], []
        for i in range(len(ds)):
            ann = ds.annotations(i)
            h, w = ds.records[i].size
            b = ann["boxes"].numpy().reshape(-1, 4)
            labels.append(ann["labels"].numpy().reshape(-1))
            boxes.append(b)
            sizes.append(np.broadcast_to(np.array([w, h], np.float32), (len(b), 2)))
            per_image.append(len(b))
        return cls.from_arrays(ds.classes, labels, boxes, sizes, per_image)

    @classmethod
    def from_arrays(cls, classes: list[str], labels: list[np.ndarray], boxes: list[np.ndarray],
                    image_wh: list[np.ndarray], objects_per_image: list[int]) -> LabelStats:
        """From per-image arrays: labels [n], xyxy boxes [n, 4], the image's (W, H) per box [n, 2]."""
        def cat(xs: list[np.ndarray], shape: tuple[int, ...], dt: Any) -> np.ndarray:
            return np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)

        b = cat(boxes, (0, 4), np.float32)
        wh = cat(image_wh, (0, 2), np.float32)
        centers = ((b[:, :2] + b[:, 2:]) / 2) / np.maximum(wh, 1e-6)
        return cls(list(classes), cat(labels, (0,), np.int64), b[:, 2] - b[:, 0], b[:, 3] - b[:, 1],
                   centers.clip(0, 1), np.asarray(objects_per_image, np.int64))

    @property
    def class_counts(self) -> np.ndarray:
        """Objects per real class [K-1]."""
        return np.bincount(self.labels, minlength=len(self.classes))[1:len(self.classes)]

    def plot(self, path: str | os.PathLike, title: str = "") -> Path:
        """``labels.png``: the six panels, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.classes[1:]
        fig, axes = plt.subplots(2, 3, figsize=(16, 9))
        ax = axes[0, 0]
        ax.bar(np.arange(len(names)), self.class_counts, color="tab:blue")
        if len(names) <= 40:
            turn = len(names) > 5
            ax.set_xticks(np.arange(len(names)), names, rotation=45 if turn else 0, ha="right" if turn else "center",
                          fontsize=8)
        ax.set_ylabel("objects")
        ax.set_title(f"objects per class ({len(self.labels)} in all)")
        n = len(self.labels)
        for ax, values, what in ((axes[0, 1], self.widths, "box width [px]"),
                                 (axes[0, 2], self.heights, "box height [px]")):
            if n:
                ax.hist(values, bins=_log_bins(values), color="tab:blue")
                ax.set_xscale("log")
            ax.set_title(f"{what} (median {np.median(values) if n else 0:.0f})")
            ax.set_ylabel("objects")
        ax = axes[1, 0]
        if n:
            ax.hist(np.log2(self.widths / np.maximum(self.heights, 1e-6)), bins=40, color="tab:blue")
        ax.set_title("aspect ratio log2(width / height)")
        ax.set_ylabel("objects")
        ax = axes[1, 1]
        opi = self.objects_per_image
        top = int(opi.max()) if len(opi) else 0
        ax.hist(opi, bins=np.arange(top + 2) - 0.5 if top < 60 else 60, color="tab:blue")
        ax.set_title(f"objects per image (mean {opi.mean() if len(opi) else 0:.2f}, "
                     f"{int((opi == 0).sum())} images without)")
        ax.set_ylabel("images")
        ax = axes[1, 2]
        heat, _, _ = np.histogram2d(self.centers[:, 1], self.centers[:, 0], bins=HEATMAP_BINS, range=[[0, 1], [0, 1]])
        im = ax.imshow(heat, extent=(0, 1, 1, 0), cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title("box centres (fraction of image width / height)")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return save_figure(fig, path, dpi=100)


def _log_bins(values: np.ndarray) -> np.ndarray:
    lo, hi = max(float(values.min()), 0.5), max(float(values.max()), 1.0)
    return np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 2, 40)
