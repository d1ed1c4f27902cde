"""F1-confidence curves and the best threshold on a hand-built case, and from a DetectionEvaluator."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from src.detection.evaluation.metrics import DetectionEvaluator
from src.detection.evaluation.thresholds import GRID, best_f1_threshold, f1_curves, f1_curves_from_evaluator

CLASSES = ["__background__", "cat", "dog"]


def test_best_threshold_hand_built():
    # scores 0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP, 0.3 FP with 4 ground truth boxes:
    # keep >=0.9: P 1, R .25 -> F1 .4;  >=0.8: .5/.25 -> .333;  >=0.7: .667/.5 -> .571;
    # >=0.6: .75/.75 -> .75 (best);  >=0.3: .6/.75 -> .667
    t, f1 = best_f1_threshold([0.3, 0.9, 0.7, 0.8, 0.6], [False, True, True, False, True], 4)
    assert t == pytest.approx(0.6)
    assert f1 == pytest.approx(0.75)
    assert best_f1_threshold([], [], 3) == (0.0, 0.0)
    assert best_f1_threshold([0.5], [True], 0) == (0.0, 0.0)


def test_curves_per_class_and_overall(tmp_path):
    # cat: 0.9 TP, 0.6 FP (2 GT); dog: 0.8 TP, 0.7 TP, 0.2 FP (3 GT); one ignored dog detection at 0.95
    scores = [0.9, 0.6, 0.8, 0.7, 0.2, 0.95]
    labels = [1, 1, 2, 2, 2, 2]
    tp = [True, False, True, True, False, False]
    ignored = [False] * 5 + [True]
    c = f1_curves(scores, labels, tp, [0, 2, 3], CLASSES, ignored=ignored)
    i = {t: int(np.argmin(np.abs(GRID - t))) for t in (0.5, 0.65, 0.75, 0.85, 0.1)}
    # cat at 0.5: 1 TP of 2 dets, 2 GT -> P .5 R .5 F1 .5; at 0.65: 1/1, R .5 -> F1 .667
    assert c.f1[0, i[0.5]] == pytest.approx(0.5)
    assert c.f1[0, i[0.65]] == pytest.approx(2 / 3)
    # dog at 0.65: 2/2, R 2/3 -> F1 .8; at 0.1: 2/3, 2/3 -> .667
    assert c.f1[1, i[0.65]] == pytest.approx(0.8)
    assert c.f1[1, i[0.1]] == pytest.approx(2 / 3)
    # overall at 0.65: 3 TP of 3 dets, 5 GT -> P 1 R .6 F1 .75; at 0.5: 3/4, .6 -> .667
    assert c.f1_all[i[0.65]] == pytest.approx(0.75)
    assert c.precision_all[i[0.5]] == pytest.approx(0.75)
    assert c.recall_all[i[0.5]] == pytest.approx(0.6)
    assert (c.best_threshold, c.best_f1) == (pytest.approx(0.7), pytest.approx(0.75))
    np.testing.assert_allclose(c.f1_mean[i[0.65]], (2 / 3 + 0.8) / 2)
    csv_path, png = c.save(tmp_path)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == len(GRID) and rows[65]["threshold"] == "0.65"
    assert float(rows[65]["f1_all"]) == pytest.approx(0.75) and float(rows[65]["f1_dog"]) == pytest.approx(0.8)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "0.700" in c.describe()


def test_from_evaluator_matches_direct_counts():
    ev = DetectionEvaluator(CLASSES, metric="voc12")
    gt = {"boxes": torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10.]]),
          "labels": torch.tensor([1, 1, 2]), "difficult": torch.tensor([False, False, False])}
    pred = {"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [41, 0, 50, 10], [70, 0, 80, 10.]]),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]), "labels": torch.tensor([1, 1, 2, 2])}
    ev.process([pred], [gt])
    c = f1_curves_from_evaluator(ev)
    # TP: 0.9 (cat), 0.7 (dog); FP: 0.8 (duplicate), 0.6 -> best: keep >= 0.7: P 2/3, R 2/3
    assert c.best_threshold == pytest.approx(0.7)
    assert c.best_f1 == pytest.approx(2 / 3)
    assert c.n_gt.tolist() == [2, 1]
