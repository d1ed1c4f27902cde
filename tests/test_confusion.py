"""Confusion matrix: a hand-computed case, the diagonal against the VOC matching of the metrics, the files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from src.detection.core.errors import UserError
from src.detection.evaluation.confusion import ConfusionMatrix
from src.detection.evaluation.metrics import voc_match

CLASSES = ["__background__", "cat", "dog"]
CAT, DOG = 1, 2


def _img(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, difficult=None):
    gt = {"boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4),
          "labels": torch.tensor(gt_labels, dtype=torch.int64),
          "difficult": torch.tensor(difficult if difficult is not None else [False] * len(gt_labels))}
    pred = {"boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(det_scores, dtype=torch.float32),
            "labels": torch.tensor(det_labels, dtype=torch.int64)}
    return pred, gt


def _hand_case():
    a, b, c, d = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]
    img1 = _img([a, b, c, d], [CAT, DOG, CAT, DOG],
                [a, a, b, c, d, [100, 100, 120, 120]], [0.9, 0.8, 0.7, 0.6, 0.3, 0.95],
                [CAT, DOG, CAT, CAT, DOG, DOG], difficult=[False, False, True, False])
    img2 = _img([a], [CAT], [[50, 50, 60, 60]], [0.55], [CAT])
    # overlapping cat F and dog G (IoU 0.667): a dog detection on F prefers its own class G
    f, g = [0, 0, 10, 10], [2, 0, 12, 10]
    img3 = _img([f, g], [CAT, DOG], [f, g], [0.9, 0.8], [DOG, DOG])
    return [img1, img2, img3]


def test_hand_computed_case():
    cm = ConfusionMatrix(CLASSES, score_thresh=0.5)
    for pred, gt in _hand_case():
        cm.update([pred], [gt])
    # rows true (cat, dog, background), columns predicted (cat, dog, background)
    #  img1: d1 cat on A: cat/cat; d2 dog on A: A taken by its own class -> false dog; d3 cat on dog B: dog/cat;
    #        d4 cat on difficult C: ignored; d5 dog 0.3 below threshold -> D missed; d6 dog on nothing: false dog
    #  img2: cat A missed, cat detection on nothing: false cat
    #  img3: dog 0.9 takes dog G (own class first, though F overlaps more); cat F missed; dog 0.8 on G: false dog
    expected = np.array([[1, 0, 2],
                         [1, 1, 1],
                         [1, 3, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    np.testing.assert_allclose(cm.normalized(), expected / np.maximum(expected.sum(1, keepdims=True), 1))
    assert cm.labels == ["cat", "dog", "background"]
    # batching does not change anything
    batched = ConfusionMatrix(CLASSES, score_thresh=0.5)
    preds, gts = zip(*_hand_case())
    batched.update(list(preds), list(gts))
    np.testing.assert_array_equal(batched.matrix, expected)


def test_loader_targets_and_files(tmp_path):
    cm = ConfusionMatrix(CLASSES, score_thresh=0.5)
    preds, gts = zip(*_hand_case())
    targets = [{"orig_boxes": g["boxes"], "orig_labels": g["labels"], "orig_difficult": g["difficult"],
                "boxes": torch.zeros(0, 4)} for g in gts]
    cm.process(list(preds), targets)
    assert cm.evaluate() is cm.matrix
    paths = cm.save(tmp_path)
    assert [p.name for p in paths] == ["confusion_matrix.csv", "confusion_matrix_normalized.csv",
                                       "confusion_matrix.png"]
    rows = list(csv.reader(open(paths[0])))
    assert rows[0] == ["true \\ predicted", "cat", "dog", "background"]
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), cm.matrix)
    norm = np.array([r[1:] for r in list(csv.reader(open(paths[1])))[1:]], dtype=float)
    np.testing.assert_allclose(norm.sum(1), [1, 1, 1], atol=1e-5)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_diagonal_equals_voc_true_positives():
    """Same-class matching is the metrics' VOC rule: the diagonal is its TP count above the threshold."""
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(CLASSES, score_thresh=0.4)
    tps = np.zeros(3, np.int64)
    for _ in range(30):
        m, n = rng.integers(0, 6), rng.integers(0, 10)
        xy = rng.uniform(0, 60, (m, 2))
        gb = np.concatenate([xy, xy + rng.uniform(8, 30, (m, 2))], 1).astype(np.float32)
        gl = rng.integers(1, 3, m)
        gd = rng.random(m) < 0.15
        src = rng.integers(0, max(m, 1), n)
        jitter = rng.normal(0, 4, (n, 4))
        db = (gb[src] + jitter if m else rng.uniform(0, 80, (n, 4))).astype(np.float32)
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        ds = rng.random(n).astype(np.float32)
        dl = rng.integers(1, 3, n)
        cm.update([{"boxes": db, "scores": ds, "labels": dl}], [{"boxes": gb, "labels": gl, "difficult": gd}])
        keep = ds >= 0.4
        tp, _ = voc_match(db[keep], ds[keep], dl[keep], gb, gl, gd)
        tps += np.bincount(dl[keep][tp], minlength=3)
    np.testing.assert_array_equal(np.diag(cm.matrix)[:2], tps[1:])
    assert cm.matrix.sum() > 50 and cm.matrix[:2, :2].sum() > np.diag(cm.matrix)[:2].sum()  # confusions occurred


def test_bad_arguments():
    with pytest.raises(UserError, match="__background__"):
        ConfusionMatrix(["cat", "dog"])
    with pytest.raises(UserError, match="score threshold"):
        ConfusionMatrix(CLASSES, score_thresh=1.5)
