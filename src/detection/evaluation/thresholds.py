"""F1-confidence curves per class and overall, and the score threshold that maximises overall F1.

Input: every detection's score, label and VOC true-positive flag at IoU 0.5 (``metrics.voc_match``, which
``DetectionEvaluator`` keeps), plus the number of non-difficult ground truth boxes per class. The matching is
greedy in descending score, so a detection's flag does not depend on lower-scoring detections: the flags hold at
every threshold, and precision / recall at threshold ``t`` are counts over the detections with ``score >= t``.

"Overall" pools all classes (total true positives, detections and ground truth): the F1 a single threshold applied
to every detection actually gives. Ultralytics picks its threshold on the mean of the per-class curves instead;
both are in ``f1_curve.csv`` (``f1_all`` and ``f1_mean``), the best threshold uses ``f1_all``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import save_figure, write_text_atomic

GRID = np.round(np.linspace(0.0, 1.0, 101), 2)  # thresholds of the curves and the CSV (exact hundredths)


def _counts(scores: np.ndarray, tp: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, detections) with ``score >= t`` for each threshold ``t``."""
    order = np.argsort(-scores, kind="stable")
    s, ctp = scores[order], np.concatenate(([0], np.cumsum(tp[order])))
    n_kept = len(s) - np.searchsorted(s[::-1], thresholds, side="left")  # s[::-1] is ascending
    return ctp[n_kept], n_kept


def _prf(tp: np.ndarray, n_det: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = np.divide(tp, n_det, out=np.zeros(len(tp)), where=n_det > 0)
    recall = tp / n_gt if n_gt else np.zeros(len(tp))
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(tp)), where=denom > 0)
    return precision, recall, f1


def best_f1_threshold(scores: Any, tp: Any, n_gt: int) -> tuple[float, float]:
    """(threshold, F1): the score threshold (keep ``score >= threshold``) with the highest F1 over the pooled
    detections, searched over every distinct score (exact, not on a grid); the highest such threshold on ties.
    (0.0, 0.0) when there are no detections or no ground truth."""
    scores, tp = np.asarray(scores, np.float64).reshape(-1), np.asarray(tp, bool).reshape(-1)
    if not len(scores) or not n_gt:
        return 0.0, 0.0
    candidates = np.unique(scores)[::-1]  # descending: argmax then returns the highest threshold on ties
    ctp, n_det = _counts(scores, tp, candidates)
    f1 = _prf(ctp, n_det, n_gt)[2]
    i = int(np.argmax(f1))
    return float(candidates[i]), float(f1[i])


@dataclass
class F1Curves:
    """Precision, recall and F1 against the score threshold ``thresholds`` (``GRID``), per class and overall."""

    classes: list[str]  # real classes (no __background__), one row each in the per-class arrays
    thresholds: np.ndarray  # [T]
    precision: np.ndarray  # [C, T]
    recall: np.ndarray  # [C, T]
    f1: np.ndarray  # [C, T]
    n_gt: np.ndarray  # [C]
    precision_all: np.ndarray  # [T], pooled over classes
    recall_all: np.ndarray
    f1_all: np.ndarray
    best_threshold: float  # exact, from every distinct score (``best_f1_threshold``)
    best_f1: float
    best_precision: float = float("nan")  # pooled, at exactly ``best_threshold``
    best_recall: float = float("nan")

    @property
    def f1_mean(self) -> np.ndarray:
        """Mean of the per-class F1 curves over the classes with ground truth (Ultralytics' "all classes")."""
        has = self.n_gt > 0
        return self.f1[has].mean(axis=0) if has.any() else np.zeros(len(self.thresholds))

    @property
    def found(self) -> bool:
        """Whether some threshold gives a correct detection (F1 > 0): else no threshold is better than another."""
        return bool(self.best_f1 > 0)

    def describe(self) -> str:
        if not self.found:
            return "best score threshold: none - no detection is correct at IoU 0.5 at any threshold (F1 0)"
        return (f"best score threshold {self.best_threshold:.3f}: F1 {self.best_f1:.3f} over all classes "
                f"(precision {self.best_precision:.3f}, recall {self.best_recall:.3f})")

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["threshold", "precision_all", "recall_all", "f1_all", "f1_mean", *(f"f1_{c}" for c in self.classes)])
        f1_mean = self.f1_mean
        for t in range(len(self.thresholds)):
            w.writerow([f"{self.thresholds[t]:.2f}", *(f"{v:.6f}" for v in (
                self.precision_all[t], self.recall_all[t], self.f1_all[t], f1_mean[t], *self.f1[:, t]))])
        return buf.getvalue()

    def save(self, out_dir: str | os.PathLike, prefix: str = "f1_curve") -> list[Path]:
        """``<prefix>.csv`` and ``<prefix>.png`` in ``out_dir`` (atomic); returns the paths."""
        out = Path(out_dir)
        return [write_text_atomic(out / f"{prefix}.csv", self.to_csv()), self.plot(out / f"{prefix}.png")]

    def plot(self, path: str | os.PathLike) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 6))
        with_gt = [i for i in range(len(self.classes)) if self.n_gt[i] > 0]
        legend = len(with_gt) <= 20
        for i in with_gt:
            ax.plot(self.thresholds, self.f1[i], lw=1, alpha=0.8 if legend else 0.4,
                    color=None if legend else "grey", label=self.classes[i] if legend else None)
        ax.plot(self.thresholds, self.f1_all, lw=3, color="tab:blue",
                label=f"all classes: F1 {self.best_f1:.3f} at {self.best_threshold:.3f}")
        ax.axvline(self.best_threshold, color="tab:blue", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("score threshold")
        ax.set_ylabel("F1 (IoU 0.5)")
        ax.set_title("F1-confidence curve")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110, bbox_inches="tight")


def f1_curves(scores: Any, labels: Any, tp: Any, n_gt: Any, classes: Sequence[str], ignored: Any = None,
              thresholds: np.ndarray = GRID) -> F1Curves:
    """The curves for pooled detections: ``scores`` / ``labels`` (1..K-1) / ``tp`` flags, per detection;
    ``n_gt`` [K] non-difficult ground truth per label (index 0, background, unused); ``classes`` with
    ``__background__`` first; ``ignored`` detections (on difficult ground truth) count nowhere."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    tp = np.asarray(tp, bool).reshape(-1)
    n_gt = np.asarray(n_gt, np.int64).reshape(-1)
    if ignored is not None:
        keep = ~np.asarray(ignored, bool).reshape(-1)
        scores, labels, tp = scores[keep], labels[keep], tp[keep]
    names = list(classes)[1:]
    per = [_prf(*_counts(scores[labels == c], tp[labels == c], thresholds), int(n_gt[c]))
           for c in range(1, len(names) + 1)]
    total = int(n_gt[1:].sum())
    p_all, r_all, f_all = _prf(*_counts(scores, tp, thresholds), total)
    best_t, best_f = best_f1_threshold(scores, tp, total)
    # precision / recall at exactly the best threshold (the grid's nearest point may hold other detections)
    best_p, best_r, _ = _prf(*_counts(scores, tp, np.array([best_t])), total)
    stack = (lambda k: np.stack([p[k] for p in per])) if per else (lambda k: np.zeros((0, len(thresholds))))
    return F1Curves(names, np.asarray(thresholds, np.float64), stack(0), stack(1), stack(2), n_gt[1:len(names) + 1],
                    p_all, r_all, f_all, best_t, best_f, float(best_p[0]), float(best_r[0]))


def f1_curves_from_evaluator(evaluator: Any) -> F1Curves:
    """The curves of everything a ``metrics.DetectionEvaluator`` has processed (after ``evaluate()`` on rank 0 it
    holds every rank's images)."""
    state = evaluator.state_dict()
    s = state["state"]

    def cat(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(s[key]) if s[key] else np.zeros(0, dtype)

    return f1_curves(cat("det_scores", np.float32), cat("det_labels", np.int64), cat("det_tp", bool),
                     state["n_gt"], state["classes"], ignored=cat("det_ignored", bool))
