"""Detection confusion matrix at one IoU and one score threshold, with a background row and column.

Layout: rows are the true class, columns the predicted class, both ``classes[1:]`` followed by ``background``:

* ``matrix[t, p]`` - ground truth of class ``t`` matched by a detection of class ``p`` (the diagonal: correct);
* ``matrix[t, background]`` - ground truth of class ``t`` that no detection matched (missed objects);
* ``matrix[background, p]`` - detections of class ``p`` that matched no ground truth (false detections).

Ultralytics' ``ConfusionMatrix`` counts the same three kinds of cells (it stores predicted x true, the transpose);
row-normalising here (each true class sums to 1) is what its normalised plot shows per column.

Matching, per image, for detections with ``score >= score_thresh``: each detection's candidate is the ground truth
of its own class with the highest IoU when that IoU >= ``iou_thresh``, otherwise the ground truth of any class with
the highest IoU >= ``iou_thresh`` (a class confusion), otherwise none. Each ground truth goes to the highest-scoring
detection among its same-class claimants, or, if there are none, among its other-class claimants; every other
claimant is a false detection. This is the VOC devkit's greedy-by-score rule (a detection whose candidate is taken
already does not look further), extended to other classes, and computed without a per-box loop. So the diagonal
equals the VOC true positives (``metrics.voc_match``) among detections at or above the threshold. ``difficult``
ground truth is ignored as in the metrics: never counted as missed, and a detection whose candidate it is counts
nowhere.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from ..core.errors import UserError
from ..core.io import save_figure, write_text_atomic
from .evaluator import DatasetEvaluator

BACKGROUND = "background"


def _np(x: Any, dtype: Any, width: int | None = None) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(dtype, copy=False)
    return a.reshape(-1, width) if width else a.reshape(-1)


def match_image(det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, gt_difficult: np.ndarray, iou_thresh: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's matching for one image -> (``det_gt`` [D]: index of the ground truth each detection
    took, -1 for none; ``det_ignored`` [D]: the detection's candidate is difficult ground truth)."""
    n, m = len(det_scores), len(gt_labels)
    det_gt = np.full(n, -1, dtype=np.int64)
    ignored = np.zeros(n, dtype=bool)
    if n == 0 or m == 0:
        return det_gt, ignored
    iou = box_iou(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes)).numpy()
    rows = np.arange(n)
    same = det_labels[:, None] == gt_labels[None, :]
    j_same = np.where(same, iou, -1.0).argmax(axis=1)
    hit_same = np.where(same, iou, -1.0)[rows, j_same] >= iou_thresh
    j_any = iou.argmax(axis=1)
    hit_any = iou[rows, j_any] >= iou_thresh
    cand = np.where(hit_same, j_same, np.where(hit_any, j_any, -1))
    ignored = (cand >= 0) & gt_difficult[np.maximum(cand, 0)]
    claim = np.nonzero((cand >= 0) & ~ignored)[0]
    if claim.size:
        # same-class claimants first, then by score (stable: the earlier detection wins a tie)
        order = np.lexsort((-det_scores[claim], ~hit_same[claim]))
        claim = claim[order]
        _, first = np.unique(cand[claim], return_index=True)
        winners = claim[first]
        det_gt[winners] = cand[winners]
    return det_gt, ignored


class ConfusionMatrix(DatasetEvaluator):
    """Accumulates the confusion matrix over images (a ``DatasetEvaluator``).

    >>> cm = ConfusionMatrix(["__background__", "cat", "dog"], score_thresh=0.25)
    >>> cm.process(preds, targets)      # per batch, original coordinates (loader targets or ground-truth dicts)
    >>> cm.evaluate()                   # all ranks' counts on rank 0 (None elsewhere); also cm.matrix
    >>> cm.save(run_dir)                # confusion_matrix.png / .csv and confusion_matrix_normalized.csv
    """

    def __init__(self, classes: Sequence[str], score_thresh: float = 0.25, iou_thresh: float = 0.5) -> None:
        classes = list(classes)
        if len(classes) < 2 or classes[0] != "__background__":
            raise UserError(f"CLASSES {classes[:3]}...: the list must start with '__background__' followed by at "
                            f"least one class")
        if not 0.0 <= score_thresh <= 1.0:
            raise UserError(f"confusion matrix score threshold {score_thresh}: use a value in [0, 1]")
        if not 0.0 < iou_thresh <= 1.0:
            raise UserError(f"confusion matrix IoU threshold {iou_thresh}: use a value in (0, 1]")
        self.classes = classes
        self.score_thresh = float(score_thresh)
        self.iou_thresh = float(iou_thresh)
        self.reset()

    @property
    def labels(self) -> list[str]:
        """Row / column names: the real classes, then ``background``."""
        return self.classes[1:] + [BACKGROUND]

    def reset(self) -> None:
        k = len(self.classes)  # K-1 real classes + background
        self.matrix = np.zeros((k, k), dtype=np.int64)

    def update(self, preds: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]]) -> None:
        """Add images: preds ``{"boxes", "scores", "labels"}``, gts ``{"boxes", "labels", "difficult"?}``."""
        if len(preds) != len(gts):
            raise ValueError(f"update(): {len(preds)} prediction dicts but {len(gts)} ground-truth dicts")
        k = len(self.classes)
        bg = k - 1  # matrix index of background; class c (1..K-1) sits at c - 1
        flat: list[np.ndarray] = []
        for p, g in zip(preds, gts):
            ds = _np(p["scores"], np.float32)
            keep = ds >= self.score_thresh
            db, dl, ds = _np(p["boxes"], np.float32, 4)[keep], _np(p["labels"], np.int64)[keep], ds[keep]
            gb, gl = _np(g["boxes"], np.float32, 4), _np(g["labels"], np.int64)
            gd = _np(g["difficult"], bool) if g.get("difficult") is not None else np.zeros(len(gl), bool)
            for name, lab in (("prediction", dl), ("ground-truth", gl)):
                if lab.size and (lab.min() < 1 or lab.max() >= k):
                    raise ValueError(f"update(): {name} label outside 1..{k - 1} (classes[0] is __background__)")
            det_gt, ignored = match_image(db, ds, dl, gb, gl, gd, self.iou_thresh)
            gt_pred = np.full(len(gl), bg, dtype=np.int64)  # missed unless a detection took it
            took = det_gt >= 0
            gt_pred[det_gt[took]] = dl[took] - 1
            counted = ~gd
            flat.append((gl[counted] - 1) * k + gt_pred[counted])
            false = ~took & ~ignored
            flat.append(bg * k + dl[false] - 1)
        if flat:
            self.matrix += np.bincount(np.concatenate(flat), minlength=k * k).reshape(k, k)

    def process(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        """:meth:`update` with loader targets (``orig_boxes`` / ``orig_labels`` / ``orig_difficult``) or
        ground-truth dicts."""
        gts = [{"boxes": t["orig_boxes"], "labels": t["orig_labels"], "difficult": t.get("orig_difficult")}
               if "orig_boxes" in t else t for t in targets]
        self.update(predictions, gts)

    def evaluate(self) -> np.ndarray | None:
        """The counts summed over every rank: on rank 0, None on the others (plain process: the counts)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.matrix)
            self.matrix = np.sum(gathered, axis=0)
            if dist.get_rank():
                return None
        return self.matrix

    # ------------------------------------------------------------------ presentation
    def normalized(self) -> np.ndarray:
        """Row-normalised (each true class sums to 1; the background row is normalised over its false detections);
        all-zero rows stay 0."""
        m = self.matrix.astype(np.float64)
        total = m.sum(axis=1, keepdims=True)
        return np.divide(m, total, out=np.zeros_like(m), where=total > 0)

    def to_csv(self, normalize: bool = False) -> str:
        values = self.normalized() if normalize else self.matrix
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["true \\ predicted", *self.labels])
        for name, row in zip(self.labels, values):
            w.writerow([name, *(f"{v:.6f}" if normalize else int(v) for v in row)])
        return buf.getvalue()

    def save(self, out_dir: str | os.PathLike, prefix: str = "confusion_matrix") -> list[Path]:
        """``<prefix>.csv`` (counts), ``<prefix>_normalized.csv`` and ``<prefix>.png`` (counts and row-normalised
        side by side) in ``out_dir``, each written atomically; returns the paths."""
        out = Path(out_dir)
        paths = [write_text_atomic(out / f"{prefix}.csv", self.to_csv()),
                 write_text_atomic(out / f"{prefix}_normalized.csv", self.to_csv(normalize=True))]
        paths.append(self.plot(out / f"{prefix}.png"))
        return paths

    def plot(self, path: str | os.PathLike) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = len(self.labels)
        side = min(24.0, max(4.0, 0.45 * k + 2.0))
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
        annotate = k <= 30
        for ax, values, title, fmt in ((axes[0], self.matrix, "counts", "d"),
                                       (axes[1], self.normalized(), "row-normalised", ".2f")):
            im = ax.imshow(values, cmap="Blues", vmin=0)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks(range(k), self.labels, rotation=90)
            ax.set_yticks(range(k), self.labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"Confusion matrix, {title} (IoU {self.iou_thresh:g}, score >= {self.score_thresh:g})",
                         fontsize=9)
            if annotate:
                top = float(values.max()) or 1.0
                for (i, j), v in np.ndenumerate(values):
                    if v:
                        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                                color="white" if v > 0.6 * top else "black")
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)
