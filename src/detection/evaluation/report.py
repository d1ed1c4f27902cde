"""Reporting: metric tables, per-class CSV and PNG plots for evaluation (per-class AP, PR curves) and training
(losses, mAP per epoch). Metrics are computed in metrics.py; this module only presents them.

Headless: the Agg backend is selected before pyplot is imported, so this works without a display.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..core.io import save_figure  # noqa: E402

if TYPE_CHECKING:
    from .metrics import EvalResult

_MAX_CURVE_POINTS = 2000  # PR curves can have 100k+ points; the picture does not need them


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(x: Any) -> float:
    """results.csv values arrive as strings ('' when an epoch had no evaluation); anything unusable -> NaN."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def plot_per_class_ap(result: EvalResult, path: str | os.PathLike) -> Path:
    """Horizontal bars per class: COCO AP@[.5:.95] and AP@.5 (or VOC07/VOC12 when COCO was not computed).

    Classes without ground truth get no bar and are marked "no GT".
    """
    if result.metric in ("coco", "all"):
        series = [("AP@[.5:.95]", "ap", result.map), ("AP@.5", "ap50", result.map50)]
    else:
        series = [(name, key, getattr(result, result.metric))
                  for name, key in (("VOC07 AP@.5", "ap_voc07"), ("VOC12 AP@.5", "ap_voc12"))
                  if key.endswith(result.metric)]
    rows = result.per_class
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.38 * len(rows) + 1.2)))
    if not rows:
        _empty(ax, "no classes")
        return _save(fig, path)
    y = np.arange(len(rows))
    h = 0.8 / len(series)
    colors = ["tab:blue", "tab:orange"]
    for i, (name, key, mean) in enumerate(series):
        vals = np.array([r[key] for r in rows], dtype=float)
        label = f"{name} (mean {mean:.3f})" if math.isfinite(mean) else name
        bars = ax.barh(y + (i - (len(series) - 1) / 2) * h, np.nan_to_num(vals), height=h, color=colors[i], label=label)
        for bar, v in zip(bars, vals):
            if math.isfinite(v):
                ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.2f}", va="center", fontsize=8)
    for yi, r in zip(y, rows):
        if r["n_gt"] == 0:
            ax.text(0.01, yi, "no GT", va="center", fontsize=8, color="gray")
    ax.set_yticks(y, [f"{r['class']} ({r['n_gt']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("average precision")
    ax.set_title("Per-class AP (class (#GT))")
    ax.grid(axis="x", alpha=0.3)
    # above the plot, so it never covers a bar (the last class's bar sits where an inner legend would)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=len(series), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_pr_curves(result: EvalResult, path: str | os.PathLike) -> Path:
    """Precision-recall curves at IoU .5 (VOC matching), one line per class with ground truth."""
    fig, ax = plt.subplots(figsize=(8, 6))
    ap_key = "ap50" if result.metric in ("coco", "all") else f"ap_{result.metric}"
    aps = {r["class"]: r[ap_key] for r in result.per_class}
    curves = result.pr_curves
    if not curves:
        _empty(ax, "no ground truth: no precision-recall curves")
        return _save(fig, path)
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, (name, (recall, precision)) in enumerate(curves.items()):
        recall, precision = np.asarray(recall), np.asarray(precision)
        if len(recall) > _MAX_CURVE_POINTS:
            idx = np.unique(np.linspace(0, len(recall) - 1, _MAX_CURVE_POINTS).astype(int))
            recall, precision = recall[idx], precision[idx]
        # start at recall 0 so a curve with one detection is still a visible line
        recall = np.concatenate(([0.0], recall))
        precision = np.concatenate(([precision[0] if len(precision) else 0.0], precision))
        ap = aps.get(name, math.nan)
        label = f"{name} (AP50 {ap:.3f})" if math.isfinite(ap) else name
        ax.plot(recall, precision, color=cmap(i % cmap.N), lw=1.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)


def _epoch_axes(ax, ylabel: str, title: str, epochs: np.ndarray) -> None:
    """Shared styling of the per-epoch training plots: whole-epoch ticks, half an epoch of margin (so one epoch is
    the tick 1, not an autoscaled 0.945..1.050)."""
    ax.set_xlabel("epoch")
    finite = epochs[np.isfinite(epochs)]
    if len(finite):
        ax.set_xlim(finite.min() - 0.5, finite.max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_training_curves(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """``train_loss.png`` (epoch-mean total loss and each ``loss_*`` component) and ``map.png`` (mAP@[.5:.95],
    mAP@.5, mAP@.75 per evaluated epoch) from results.csv rows.

    Values may be strings (read back from the CSV); epochs without evaluation (empty / NaN map) are skipped in
    map.png. Markers are drawn so a single epoch is visible.
    """
    out = Path(out_dir)
    epochs = np.array([_finite(r.get("epoch", i + 1)) for i, r in enumerate(rows)])

    fig, ax = plt.subplots(figsize=(8, 5))
    loss_keys = ["train_loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    drawn = False
    for key in loss_keys:
        vals = np.array([_finite(r.get(key)) for r in rows])
        ok = np.isfinite(vals) & np.isfinite(epochs)
        if ok.any():
            total = key == "train_loss"
            ax.plot(epochs[ok], vals[ok], marker="o", ms=4, lw=2.5 if total else 1.5,
                    color="black" if total else None, label="total" if total else key[len("loss_"):])
            drawn = True
    if drawn:
        _epoch_axes(ax, "loss (epoch mean)", "Training loss", epochs)
    else:
        _empty(ax, "no loss values yet")
    loss_png = _save(fig, out / "train_loss.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    scored = np.zeros(len(epochs), bool)
    for key, label, style in (("map", "mAP@[.5:.95]", "-"), ("map50", "mAP@.5", "-"), ("map75", "mAP@.75", "--")):
        vals = np.array([_finite(r.get(key)) for r in rows])
        ok = np.isfinite(vals) & np.isfinite(epochs)
        if ok.any():
            ax.plot(epochs[ok], vals[ok], style, marker="o", ms=4, label=label)
            drawn = True
            scored |= ok
    if drawn:
        _epoch_axes(ax, "mAP", "Validation mAP", epochs[scored])
        ax.set_ylim(0, 1)
    else:
        _empty(ax, "no evaluation yet")
    map_png = _save(fig, out / "map.png")
    return [loss_png, map_png]


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _columns(result: EvalResult) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    if result.metric in ("coco", "all"):
        cols += [("AP50", "ap50"), ("AP", "ap")]
    if result.metric in ("voc07", "all"):
        cols.append(("VOC07", "ap_voc07"))
    if result.metric in ("voc12", "all"):
        cols.append(("VOC12", "ap_voc12"))
    return cols


def format_table(result: EvalResult) -> str:
    """A plain-text table: class, #GT, AP50, AP [, VOC07, VOC12], then the mean over classes with ground truth.

    The 'all' row holds COCO's own mAP@.5 / mAP@[.5:.95] (equal to the mean of the class rows) and the VOC means.
    """
    cols = _columns(result)
    width = max([len("class")] + [len(r["class"]) for r in result.per_class] + [len("all")])
    head = f"{'class':<{width}}  {'#GT':>6}" + "".join(f"  {h:>6}" for h, _ in cols)
    lines = [head, "-" * len(head)]
    for r in result.per_class:
        lines.append(f"{r['class']:<{width}}  {r['n_gt']:>6}" + "".join(f"  {_fmt(r[k]):>6}" for _, k in cols))
    overall = {"ap50": result.map50, "ap": result.map, "ap_voc07": result.voc07, "ap_voc12": result.voc12}
    total = sum(r["n_gt"] for r in result.per_class)
    lines.append("-" * len(head))
    lines.append(f"{'all':<{width}}  {total:>6}" + "".join(f"  {_fmt(overall[k]):>6}" for _, k in cols))
    return "\n".join(lines)


def save_results(result: EvalResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``per_class_ap.csv`` (one row per class + a final ``all`` row), ``per_class_ap.png`` and
    ``pr_curves.png`` into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "per_class_ap.csv"
    keys = ["class", "n_gt", "ap50", "ap", "ap_voc07", "ap_voc12"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in result.per_class:
            w.writerow([r["class"], r["n_gt"]] + [_csv(r[k]) for k in keys[2:]])
        w.writerow(["all", sum(r["n_gt"] for r in result.per_class)]
                   + [_csv(x) for x in (result.map50, result.map, result.voc07, result.voc12)])
    return [csv_path, plot_per_class_ap(result, out / "per_class_ap.png"),
            plot_pr_curves(result, out / "pr_curves.png")]


def _csv(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"
