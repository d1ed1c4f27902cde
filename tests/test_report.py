"""Plots are written headless as real, non-blank PNGs, including the awkward inputs training produces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from benchmarks.bench_eval import make_eval_set
from src.detection.evaluation.metrics import DetectionEvaluator, EvalResult
from src.detection.evaluation.report import plot_per_class_ap, plot_pr_curves, plot_training_curves


def _check_png(path, min_size=(300, 200)):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1]
    assert img.std() > 5  # something is drawn, not a blank canvas
    return img


@pytest.fixture(scope="module")
def result():
    classes, preds, gts = make_eval_set(12, n_classes=5, dets_per_image=10, seed=7)
    ev = DetectionEvaluator(classes, metric="all")
    ev.update(preds, gts)
    return ev.compute()


def test_eval_plots(result, tmp_path):
    bars = plot_per_class_ap(result, tmp_path / "sub" / "per_class_ap.png")
    curves = plot_pr_curves(result, tmp_path / "pr_curves.png")
    assert bars == tmp_path / "sub" / "per_class_ap.png"
    _check_png(bars)
    _check_png(curves)
    # more classes -> a taller bar chart, so labels stay readable
    many = EvalResult(metric="all", per_class=[{"class": f"c{i}", "n_gt": 1, "ap50": 0.5, "ap": 0.3,
                                                 "ap_voc07": 0.5, "ap_voc12": 0.5} for i in range(30)])
    tall = np.asarray(Image.open(plot_per_class_ap(many, tmp_path / "many.png")))
    assert tall.shape[0] > np.asarray(Image.open(bars)).shape[0] * 2


def test_eval_plots_voc_only_and_empty(tmp_path):
    classes, preds, gts = make_eval_set(5, n_classes=3, dets_per_image=5, seed=1)
    ev = DetectionEvaluator(classes, metric="voc12")
    ev.update(preds, gts)
    _check_png(plot_per_class_ap(ev.compute(), tmp_path / "voc_bars.png"))
    empty = DetectionEvaluator(["__background__", "a"], metric="all").compute()  # no images at all
    _check_png(plot_pr_curves(empty, tmp_path / "empty_pr.png"))
    _check_png(plot_per_class_ap(empty, tmp_path / "empty_bars.png"))


def test_pr_curve_with_many_points(tmp_path):
    n = 50_000
    rec = np.linspace(0, 1, n)
    res = EvalResult(metric="voc07", per_class=[{"class": "a", "n_gt": n, "ap50": math.nan, "ap": math.nan,
                                                "ap_voc07": 0.5, "ap_voc12": 0.5}],
                     pr_curves={"a": (rec, 1 - rec)})
    _check_png(plot_pr_curves(res, tmp_path / "pr.png"))


def test_training_curves(tmp_path):
    # rows as read back from results.csv: strings, evaluation every 2 epochs (empty / 'nan' map otherwise)
    rows = [
        {"epoch": "1", "train_loss": "2.5", "loss_classification": "1.5", "loss_bbox_regression": "1.0",
         "map": "", "map50": "", "map75": "", "lr": "0.0001"},
        {"epoch": "2", "train_loss": "1.8", "loss_classification": "1.0", "loss_bbox_regression": "0.8",
         "map": "0.21", "map50": "0.45", "map75": "0.18", "lr": "0.0001"},
        {"epoch": 3, "train_loss": 1.2, "loss_classification": 0.7, "loss_bbox_regression": 0.5,
         "map": float("nan"), "map50": float("nan"), "lr": 5e-5},
        {"epoch": 4, "train_loss": 1.0, "loss_classification": 0.6, "loss_bbox_regression": 0.4,
         "map": 0.33, "map50": 0.61, "map75": 0.3, "lr": 1e-5},
    ]
    paths = plot_training_curves(rows, tmp_path / "run")
    assert [p.name for p in paths] == ["train_loss.png", "map.png"]
    for p in paths:
        _check_png(p)


def test_training_curves_single_epoch_and_no_eval(tmp_path):
    one = [{"epoch": 1, "train_loss": 2.0, "loss_classification": 1.2, "map": 0.1, "map50": 0.2, "lr": 1e-4}]
    paths = plot_training_curves(one, tmp_path / "one")
    # the single point is drawn (marker), so the map plot differs from the "no evaluation yet" placeholder
    no_eval = plot_training_curves([{"epoch": 1, "train_loss": 2.0, "map": ""}], tmp_path / "none")
    a = _check_png(paths[1])
    b = _check_png(no_eval[1])
    assert a.shape != b.shape or np.abs(a - b).mean() > 1
    _check_png(plot_training_curves([], tmp_path / "empty")[0])


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions save, drawn and kept open for inspection."""
    from src.detection.evaluation import report

    figures = []
    save = report._save

    def keep(fig, path):
        fig.canvas.draw()
        fig.renderer = fig.canvas.get_renderer()  # closing the figure detaches its canvas
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return figures


def test_single_epoch_plots_have_one_whole_epoch_tick(tmp_path, kept_figures):
    one = [{"epoch": 1, "train_loss": 2.0, "map": 0.1, "map50": 0.2, "map75": 0.05, "lr": 1e-4}]
    plot_training_curves(one, tmp_path)
    for fig in kept_figures:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        visible = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert visible == [1.0], (fig.axes[0].get_title(), visible)


def test_per_class_legend_covers_no_bar(tmp_path, kept_figures):
    # every class at AP 1.0: the bars reach the right edge, where a legend inside the axes would sit
    full = EvalResult(metric="all", map=1.0, map50=1.0,
                      per_class=[{"class": f"c{i}", "n_gt": 3, "ap50": 1.0, "ap": 1.0, "ap_voc07": 1.0,
                                  "ap_voc12": 1.0} for i in range(4)])
    plot_per_class_ap(full, tmp_path / "ap.png")
    ax = kept_figures[0].axes[0]
    renderer = kept_figures[0].renderer
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert bars and not any(legend.overlaps(b) for b in bars)
