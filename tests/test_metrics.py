"""Evaluation metrics: COCO numbers equal pycocotools (and torchmetrics), VOC equals a plain-loop devkit reference
and hand-computed cases, edge cases, merging, reporting and scoring saved predictions."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

from benchmarks.bench_eval import make_eval_set, run
from benchmarks.common import markdown_table
from src.detection.core.errors import UserError
from src.detection.evaluation.metrics import DetectionEvaluator, score_predictions_json, voc_ap
from src.detection.evaluation.report import format_table, save_results

CLASSES = ["__background__", "cat", "dog", "bird"]


@pytest.fixture(scope="module")
def eval_set():
    # ~50 images, hundreds of boxes, 5 classes of which the last never appears in GT, ~8 % difficult,
    # empty images, jittered TPs, duplicates, wrong classes, random FPs and misses (see make_eval_set)
    classes, preds, gts = make_eval_set(50, n_classes=6, dets_per_image=25, seed=123)
    n_gt = sum(len(g["labels"]) for g in gts)
    assert n_gt > 200 and sum(int(g["difficult"].sum()) for g in gts) > 5
    assert any(len(g["labels"]) == 0 for g in gts)
    return classes, preds, gts


@pytest.fixture(scope="module")
def result_all(eval_set):
    classes, preds, gts = eval_set
    ev = DetectionEvaluator(classes, metric="all")
    ev.update(preds[:20], gts[:20])  # several updates: streaming
    ev.update(preds[20:], gts[20:])
    return ev.compute()


def _coco_reference(classes, preds, gts):
    """pycocotools COCOeval on a COCO json built the obvious way: difficult -> iscrowd=1, area = box w*h."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        images.append({"id": i, "width": 640, "height": 480})
        for b, lab, d in zip(g["boxes"].tolist(), g["labels"].tolist(), g["difficult"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [b[0], b[1], w, h], "area": w * h,
                         "category_id": lab, "iscrowd": int(d)})
        for b, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            dets.append({"image_id": i, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s, "category_id": lab})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": n} for c, n in enumerate(classes) if c]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _voc_reference(classes, preds, gts):
    """The Pascal VOC devkit (VOCevaldet.m / VOCap.m) in plain loops: class -> (ap07, ap12)."""
    out = {}
    for c in range(1, len(classes)):
        dets = []
        for i, p in enumerate(preds):
            for b, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                if lab == c:
                    dets.append((s, i, b))
        dets.sort(key=lambda d: -d[0])
        gt = {i: [(b, d) for b, lab, d in zip(g["boxes"].tolist(), g["labels"].tolist(), g["difficult"].tolist())
                  if lab == c] for i, g in enumerate(gts)}
        npos = sum(1 for i in gt for _, d in gt[i] if not d)
        if npos == 0:
            continue
        taken = {i: [False] * len(gt[i]) for i in gt}
        tp, fp = [], []
        for _, i, b in dets:
            ovmax, jmax = -math.inf, -1
            for j, (gb, _) in enumerate(gt[i]):
                ov = _iou(b, gb)
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax >= 0.5:
                if gt[i][jmax][1]:
                    continue  # difficult: neither TP nor FP
                if not taken[i][jmax]:
                    taken[i][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp))
        ap07 = 0.0
        for k in range(11):
            ap07 += max([p for r, p in zip(rec, prec) if r >= k / 10], default=0.0) / 11
        mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        ap12 = sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])
        out[c] = (ap07, ap12)
    return out


def _img(boxes, labels, difficult=None, scores=None):
    """One image as a gt dict (scores None) or a prediction dict."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    d = {"boxes": b, "labels": torch.tensor(labels, dtype=torch.int64)}
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    else:
        d["difficult"] = torch.tensor(difficult if difficult is not None else [False] * len(labels))
    return d


def _evaluate(preds, gts, metric="all", classes=CLASSES):
    ev = DetectionEvaluator(classes, metric=metric)
    ev.update(preds, gts)
    return ev.compute()


# ------------------------------------------------------------------------------------------------------ COCO
def test_coco_equals_pycocotools(eval_set, result_all):
    classes, preds, gts = eval_set
    ref = _coco_reference(classes, preds, gts)
    r = result_all
    ours = [r.map, r.map50, r.map75, r.map_small, r.map_medium, r.map_large, r.mar_100]
    theirs = [ref.stats[i] for i in (0, 1, 2, 3, 4, 5, 8)]
    assert all(x > 0.05 for x in theirs)  # a real, non-degenerate case
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    prec = ref.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area=all, maxDets=100
    for k, row in enumerate(r.per_class):
        p = prec[:, :, k]
        if not (p > -1).any():  # class absent from GT: COCO -1, ours NaN
            assert row["n_gt"] == 0 and math.isnan(row["ap"]) and math.isnan(row["ap50"])
            continue
        assert row["ap"] == pytest.approx(p[p > -1].mean(), abs=1e-6)
        assert row["ap50"] == pytest.approx(p[0][p[0] > -1].mean(), abs=1e-6)
    assert sum(math.isnan(row["ap"]) for row in r.per_class) == 1
    # means are over classes present in GT
    assert r.map == pytest.approx(np.nanmean([row["ap"] for row in r.per_class]), abs=1e-9)
    assert r.map50 == pytest.approx(np.nanmean([row["ap50"] for row in r.per_class]), abs=1e-9)


def test_coco_equals_torchmetrics_faster_coco_eval(eval_set, result_all):
    from torchmetrics.detection import MeanAveragePrecision

    classes, preds, gts = eval_set
    # torchmetrics' default thresholds are float32 (recall 0.01 -> 0.0099999998), which moves its mAP off
    # pycocotools' by ~1e-3 here; with COCOeval's own float64 thresholds it is the same computation as ours.
    m = MeanAveragePrecision(backend="faster_coco_eval", class_metrics=True, iou_type="bbox", box_format="xyxy",
                             iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
                             rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    m.warn_on_many_detections = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.update(preds, [{"boxes": g["boxes"], "labels": g["labels"], "iscrowd": g["difficult"].long()} for g in gts])
        tm = m.compute()
    assert result_all.map == pytest.approx(float(tm["map"]), abs=1e-6)
    assert result_all.map50 == pytest.approx(float(tm["map_50"]), abs=1e-6)
    assert result_all.map75 == pytest.approx(float(tm["map_75"]), abs=1e-6)
    assert result_all.map_small == pytest.approx(float(tm["map_small"]), abs=1e-6)
    per_class = dict(zip(tm["classes"].tolist(), tm["map_per_class"].tolist()))
    for c, row in enumerate(result_all.per_class, start=1):
        if c in per_class and per_class[c] >= 0:
            assert row["ap"] == pytest.approx(per_class[c], abs=1e-6)
        else:
            assert math.isnan(row["ap"])


def test_difficult_detection_is_not_a_false_positive_for_coco():
    gts = [_img([[10, 10, 60, 60], [100, 100, 150, 150]], [1, 1], [False, True])]
    base = [_img([[11, 11, 60, 60]], [1], scores=[0.9])]
    on_difficult = [_img([[11, 11, 60, 60], [100, 100, 150, 150]], [1, 1], scores=[0.9, 0.95])]
    elsewhere = [_img([[11, 11, 60, 60], [300, 300, 350, 350]], [1, 1], scores=[0.9, 0.95])]
    a, b, c = _evaluate(base, gts), _evaluate(on_difficult, gts), _evaluate(elsewhere, gts)
    assert a.map50 == pytest.approx(1.0) and b.map50 == pytest.approx(1.0)
    assert b.voc07 == pytest.approx(1.0) and b.voc12 == pytest.approx(1.0)
    assert c.map50 < 0.6 and c.voc12 == pytest.approx(0.5)  # the same det away from the difficult gt is a FP
    assert a.per_class[0]["n_gt"] == 1


# ------------------------------------------------------------------------------------------------------- VOC
def test_voc_equals_plain_loop_devkit_reference(eval_set, result_all):
    classes, preds, gts = eval_set
    ref = _voc_reference(classes, preds, gts)
    for c, row in enumerate(result_all.per_class, start=1):
        if c not in ref:
            assert math.isnan(row["ap_voc07"]) and row["class"] not in result_all.pr_curves
            continue
        assert row["ap_voc07"] == pytest.approx(ref[c][0], abs=1e-9)
        assert row["ap_voc12"] == pytest.approx(ref[c][1], abs=1e-9)
    assert result_all.voc07 == pytest.approx(np.mean([v[0] for v in ref.values()]), abs=1e-9)
    assert result_all.voc12 == pytest.approx(np.mean([v[1] for v in ref.values()]), abs=1e-9)
    assert 0.3 < result_all.voc07 < 0.95


def test_voc_ap_hand_computed():
    # 2 gts, 3 dets ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # 11-point: r in 0..0.5 -> 1 (6 points), r in 0.6..1 -> 2/3 (5 points)
    assert voc_ap(rec, prec, use_07=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # area: 0.5 * 1 + 0.5 * 2/3
    assert voc_ap(rec, prec, use_07=False) == pytest.approx(0.5 + 1 / 3)
    # recall exactly 3/10 reaches the 0.3 point (exact tenths): 4 of 11 points
    assert voc_ap(np.array([0.1, 0.2, 0.3]), np.ones(3), use_07=True) == pytest.approx(4 / 11)
    assert voc_ap(np.array([0.1, 0.2, 0.3]), np.ones(3), use_07=False) == pytest.approx(0.3)
    assert voc_ap(np.zeros(0), np.zeros(0), use_07=True) == 0.0


def test_voc_hand_computed_through_evaluator():
    gts = [_img([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 1])]
    preds = [_img([[0, 0, 10, 10], [100, 100, 110, 110], [21, 21, 40, 40]], [1, 1, 1], scores=[0.9, 0.8, 0.7])]
    r = _evaluate(preds, gts)
    row = r.per_class[0]
    assert row["n_gt"] == 2
    assert row["ap_voc07"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert row["ap_voc12"] == pytest.approx(5 / 6)
    rec, prec = r.pr_curves["cat"]
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3])
    assert r.voc07 == pytest.approx(row["ap_voc07"])  # dog/bird have no GT: excluded from the mean
    assert math.isnan(r.per_class[1]["ap_voc07"]) and "dog" not in r.pr_curves


def test_voc_duplicate_and_devkit_argmax_rule():
    # duplicate on the same gt -> FP
    gts = [_img([[0, 0, 10, 10]], [1])]
    r = _evaluate([_img([[0, 0, 10, 10], [0, 0, 10, 9]], [1, 1], scores=[0.9, 0.8])], gts, metric="voc12")
    np.testing.assert_allclose(r.pr_curves["cat"][1], [1.0, 0.5])
    # devkit rule: a det whose best-IoU gt is already taken is a FP even if another gt overlaps it >= .5
    gts = [_img([[0, 0, 100, 100], [20, 0, 120, 100]], [1, 1])]
    d2 = [8, 0, 108, 100]  # IoU .85 with gt0 (taken by d1), .71 with gt1
    r = _evaluate([_img([[0, 0, 100, 100], d2], [1, 1], scores=[0.9, 0.8])], gts, metric="voc07")
    np.testing.assert_allclose(r.pr_curves["cat"][0], [0.5, 0.5])
    # a det of another class never matches
    r = _evaluate([_img([[0, 0, 100, 100]], [2], scores=[0.9])], gts, metric="voc07")
    assert r.per_class[0]["ap_voc07"] == 0.0 and math.isnan(r.per_class[1]["ap_voc07"])


# ------------------------------------------------------------------------------------------------ edge cases
def test_images_without_gt_make_false_positives():
    gts = [_img([[0, 0, 50, 50]], [1]), _img([], [])]
    hit = _img([[0, 0, 50, 50]], [1], scores=[0.5])
    clean = _evaluate([hit, _img([], [], scores=[])], gts)
    noisy = _evaluate([hit, _img([[5, 5, 30, 30]], [1], scores=[0.9])], gts)
    assert clean.map50 == pytest.approx(1.0) and clean.voc12 == pytest.approx(1.0)
    assert noisy.voc12 == pytest.approx(0.5) and noisy.map50 == pytest.approx(0.5, abs=0.01)


def test_no_predictions_at_all(eval_set):
    classes, _, gts = eval_set
    empty = [_img([], [], scores=[]) for _ in gts]
    r = _evaluate(empty, gts, classes=classes)
    assert r.map == 0.0 and r.map50 == 0.0 and r.voc07 == 0.0 and r.voc12 == 0.0
    assert [row["ap"] == 0.0 for row in r.per_class[:-1]] == [True] * (len(classes) - 2)
    assert math.isnan(r.per_class[-1]["ap"])  # absent class stays NaN, not 0


def test_nothing_evaluated_and_all_difficult():
    r = DetectionEvaluator(CLASSES, "all").compute()
    assert r.n_images == 0 and math.isnan(r.map) and math.isnan(r.voc07) and r.pr_curves == {}
    # only difficult objects: nothing to find, and a det on them is not a FP
    gts = [_img([[0, 0, 20, 20], [30, 30, 60, 60]], [1, 2], [True, True])]
    r = _evaluate([_img([[0, 0, 20, 20]], [1], scores=[0.9])], gts)
    assert all(row["n_gt"] == 0 for row in r.per_class)
    assert math.isnan(r.map) and math.isnan(r.map50) and math.isnan(r.voc07)
    # all-difficult image next to a normal one: the det on the difficult gt changes nothing
    gts2 = gts + [_img([[0, 0, 50, 50]], [1])]
    base = _evaluate([_img([], [], scores=[]), _img([[0, 0, 50, 50]], [1], scores=[0.5])], gts2)
    with_det = _evaluate([_img([[0, 0, 20, 20]], [1], scores=[0.9]), _img([[0, 0, 50, 50]], [1], scores=[0.5])], gts2)
    assert base.summary() == pytest.approx(with_det.summary(), nan_ok=True)
    assert with_det.map == pytest.approx(1.0) and with_det.voc07 == pytest.approx(1.0)


def test_metric_selection_and_primary(eval_set, result_all):
    classes, preds, gts = eval_set
    ev = DetectionEvaluator(classes, metric="voc07")
    ev.update(preds, gts)
    assert ev.state_dict()["state"]["det_boxes"] == []  # VOC keeps no boxes after matching
    r = ev.compute()
    assert math.isnan(r.map) and math.isnan(r.per_class[0]["ap50"])
    assert r.voc07 == pytest.approx(result_all.voc07) and r.primary == r.voc07
    assert result_all.primary == result_all.map


def test_merge_and_state_dict_equal_single_evaluator(eval_set, result_all):
    classes, preds, gts = eval_set
    a, b = DetectionEvaluator(classes, "all"), DetectionEvaluator(classes, "all")
    a.update(preds[:17], gts[:17])
    b.update(preds[17:], gts[17:])
    a.merge(b)  # what sync() does with all_gather_object'ed state dicts, in rank order
    merged = a.compute()
    assert merged.summary() == pytest.approx(result_all.summary())
    d = DetectionEvaluator(classes, "all")
    d.update(preds[:17], gts[:17])
    d.merge(b.state_dict())  # a state dict, as all_gather_object hands it over
    assert d.compute().summary() == pytest.approx(result_all.summary())
    c = DetectionEvaluator(classes, "all")
    c.merge(a.state_dict())
    assert c.n_images == 50 and c.compute().voc07 == pytest.approx(result_all.voc07)
    c.sync()  # no process group: a no-op
    assert c.n_images == 50
    c.reset()
    assert c.n_images == 0
    with pytest.raises(ValueError, match="different class lists"):
        DetectionEvaluator(CLASSES).merge(a)
    with pytest.raises(ValueError, match="metric='all' state into a metric='voc07'"):
        DetectionEvaluator(classes, "voc07").merge(a)


def test_evaluator_interface_over_batches_and_loader_targets(eval_set, result_all):
    """reset / process / evaluate (the interface training, ``evaluate --model`` and ``evaluate --predictions`` use):
    batch by batch, with ground truth as dicts or as the data loader's targets (``orig_*``), the same result."""
    from src.detection.evaluation.evaluator import DatasetEvaluator

    classes, preds, gts = eval_set
    ev = DetectionEvaluator(classes, "all")
    assert isinstance(ev, DatasetEvaluator)
    ev.process(preds[:3], gts[:3])
    ev.reset()  # a new evaluation forgets the last one
    loader_targets = [{"orig_boxes": g["boxes"], "orig_labels": g["labels"], "orig_difficult": g["difficult"],
                       "boxes": g["boxes"] * 0.5} for g in gts]  # the resized boxes are not what is scored
    for start in range(0, len(preds), 8):
        batch = slice(start, start + 8)
        ev.process(preds[batch], loader_targets[batch] if start % 16 else gts[batch])
    result = ev.evaluate()  # no process group: this process's images
    assert result.n_images == len(preds) and result.summary() == pytest.approx(result_all.summary())


def test_invalid_inputs():
    with pytest.raises(UserError, match="__background__"):
        DetectionEvaluator(["cat", "dog"])
    with pytest.raises(UserError, match="--metric"):
        DetectionEvaluator(CLASSES, metric="voc")
    ev = DetectionEvaluator(CLASSES)
    with pytest.raises(ValueError, match="outside 1..3"):
        ev.update([_img([[0, 0, 1, 1]], [0], scores=[0.5])], [_img([], [])])
    with pytest.raises(ValueError, match="same length"):
        ev.update([_img([[0, 0, 1, 1]], [1, 1], scores=[0.5])], [_img([], [])])
    with pytest.raises(ValueError, match="2 prediction dicts but 1"):
        ev.update([_img([], [], scores=[])] * 2, [_img([], [])])


# ------------------------------------------------------------------------------------------------- reporting
def test_format_table_and_save_results(result_all, tmp_path):
    table = format_table(result_all)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "#GT", "AP50", "AP", "VOC07", "VOC12"]
    row1 = result_all.per_class[0]
    assert lines[2].split() == [row1["class"], str(row1["n_gt"]), f"{row1['ap50']:.3f}", f"{row1['ap']:.3f}",
                                f"{row1['ap_voc07']:.3f}", f"{row1['ap_voc12']:.3f}"]
    assert lines[-2 - 1].split()[2:] == ["-"] * 4  # the class without GT
    assert lines[-1].split()[:4] == ["all", str(sum(r["n_gt"] for r in result_all.per_class)),
                                     f"{result_all.map50:.3f}", f"{result_all.map:.3f}"]
    paths = save_results(result_all, tmp_path / "eval")
    assert [p.name for p in paths] == ["per_class_ap.csv", "per_class_ap.png", "pr_curves.png"]
    with open(paths[0]) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == [r["class"] for r in result_all.per_class] + ["all"]
    assert float(rows[0]["ap"]) == pytest.approx(row1["ap"], abs=1e-6)
    assert rows[-2]["ap"] == "" and float(rows[-1]["ap"]) == pytest.approx(result_all.map, abs=1e-6)
    assert all(p.stat().st_size > 5000 for p in paths[1:])
    voc_only = DetectionEvaluator(CLASSES, "voc12").compute()
    assert format_table(voc_only).splitlines()[0].split() == ["class", "#GT", "VOC12"]


# -------------------------------------------------------------------------------------- saved predictions JSON
def test_score_predictions_json_equals_evaluator(eval_set, result_all, tmp_path):
    classes, preds, gts = eval_set
    names = [f"img_{i:03d}.jpg" for i in range(len(gts))]
    records = []
    for name, p in zip(names, preds):
        for b, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            records.append({"file_name": f"run/images/{name}", "category_id": lab,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(records))
    r = score_predictions_json(path, dict(zip(names, gts)), classes)
    assert r.map == pytest.approx(result_all.map, abs=1e-6)  # xywh round trip in float64
    assert r.voc07 == pytest.approx(result_all.voc07, abs=1e-6)
    assert [x["n_gt"] for x in r.per_class] == [x["n_gt"] for x in result_all.per_class]
    # images with GT but no predictions count as misses
    r2 = score_predictions_json([d for d in records if not d["file_name"].endswith("img_000.jpg")],
                                dict(zip(names, gts)), classes, metric="voc07")
    assert r2.voc07 <= r.voc07


def test_score_predictions_json_errors(tmp_path):
    gts = {"a.jpg": _img([[0, 0, 10, 10]], [1])}
    det = {"file_name": "a.jpg", "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}
    assert score_predictions_json([det], gts, CLASSES).map == pytest.approx(1.0)
    with pytest.raises(UserError, match="not found"):
        score_predictions_json(tmp_path / "missing.json", gts, CLASSES)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        score_predictions_json(bad, gts, CLASSES)
    with pytest.raises(UserError, match="not in the ground truth .*'b.jpg'"):
        score_predictions_json([{**det, "file_name": "b.jpg"}], gts, CLASSES)
    with pytest.raises(UserError, match="category_id 0; use our label index 1..3"):
        score_predictions_json([{**det, "category_id": 0}], gts, CLASSES)
    with pytest.raises(UserError, match="lacks bbox"):
        score_predictions_json([{"file_name": "a.jpg"}], gts, CLASSES)


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_runs_in_tiny_mode():
    rows = run(quick=True, images=30, dets=20, reps=1)
    assert [set(r) for r in rows[:2]] == [{"name", "baseline", "ours", "ratio", "goal"}] * 2
    assert all(r["ours"] > 0 and r["baseline"] > 0 and r["goal"] == 4.0 for r in rows[:2])
    assert [r["name"].split(":")[0] for r in rows[2:]] == ["post-processing"] * 2  # torchvision's, checked equal
    assert all(r["ours"] > 0 and r["baseline"] > 0 and r["goal"] == "info" for r in rows[2:])
    assert markdown_table(rows).count("\n") == 1 + len(rows)



def test_sync_gathers_every_rank(eval_set, result_all, monkeypatch):
    """sync() under a (simulated) 2-rank process group: this rank ends up with both ranks' images.

    A real gloo run costs ~30 s of process start-up on this machine; the engine's DDP test covers that path."""
    classes, preds, gts = eval_set
    other = DetectionEvaluator(classes, "all")
    other.update(preds[1::2], gts[1::2])

    def all_gather_object(out, obj):
        out[0], out[1] = obj, other.state_dict()

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    ev = DetectionEvaluator(classes, "all")
    ev.update(preds[0::2], gts[0::2])
    ev.sync()
    r = ev.compute()
    assert r.n_images == 50
    # image order differs from the single-process run; the numbers do not
    assert r.summary() == pytest.approx(result_all.summary(), abs=1e-9)
