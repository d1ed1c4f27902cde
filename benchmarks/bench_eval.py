"""Evaluation speed: our DetectionEvaluator vs torchmetrics MeanAveragePrecision with its default backend.

    python -m benchmarks.bench_eval [--images 5000] [--dets 100] [--reps 3] [--quick]

Both sides get the same synthetic ground truth / predictions (original-coordinate boxes, several classes, ~100
detections per image, some difficult objects passed as iscrowd) in the same process run; the median of several
repetitions is reported. Two baselines are timed, since they answer different questions:

* ``torchmetrics default``: ``MeanAveragePrecision()`` as a user would write it (pycocotools, no per-class AP),
* ``torchmetrics per-class``: the same with ``class_metrics=True`` - the same outputs as ours (per-class AP).

Ours computes COCO (incl. per-class AP and AP50) and VOC07/VOC12 (``metric="all"``) in the timed span.

Post-processing at evaluation settings (``postprocess_rows``, info rows): RetinaNet outputs for a batch of 8 at
640x640 (5 levels, 9 anchors per location, 20 classes), score threshold 0.05 and 1,000 candidates per level, with
scores as an early model gives them (a third of them above 0.05): torchvision's ``postprocess_detections`` (the
reference's per-image loop) against ours with its CPU NMS (per image, per class when there are many candidates) and
with one NMS call for the batch (the GPU's way); same detections checked.
``run(quick)`` returns rows ``{name, baseline, ours, ratio, goal}`` for the ``make bench`` aggregator.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch

from benchmarks.common import make_row, markdown_table, time_interleaved

GOAL = 4.0


def make_eval_set(
    n_images: int,
    n_classes: int = 6,
    dets_per_image: int = 100,
    seed: int = 0,
    absent_classes: int = 1,
    difficult_frac: float = 0.08,
    empty_frac: float = 0.1,
    mean_objects: float = 5.0,
) -> tuple[list[str], list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """A deterministic synthetic GT/prediction set in original image coordinates.

    Ground truth: 0..~15 objects per 640x480 image (``empty_frac`` images have none), sizes from ~6 px to ~400 px
    (small/medium/large all present), labels in 1..n_classes-1-absent_classes (the last ``absent_classes`` never
    appear in GT), ``difficult_frac`` of them difficult. Predictions: ~80 % of objects found with jittered boxes and
    higher scores, some duplicates, some with a wrong class, the rest random false positives padded up to
    ``dets_per_image`` with lower scores. Returns ``(classes, preds, gts)``.
    """
    rng = np.random.default_rng(seed)
    classes = ["__background__"] + [f"class{i}" for i in range(1, n_classes)]
    present = n_classes - 1 - absent_classes
    preds, gts = [], []
    W, H = 640.0, 480.0

    def random_boxes(n: int) -> np.ndarray:
        wh = np.exp(rng.uniform(np.log(6), np.log(400), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([W, H] - wh, 1)
        return np.concatenate([xy, xy + wh], 1)

    for _ in range(n_images):
        m = 0 if rng.uniform() < empty_frac else int(rng.poisson(mean_objects))
        gb = random_boxes(m)
        gl = rng.integers(1, present + 1, m)
        gd = rng.uniform(size=m) < difficult_frac
        found = rng.uniform(size=m) < 0.8
        dup = found & (rng.uniform(size=m) < 0.15)
        src = np.concatenate([np.nonzero(found)[0], np.nonzero(dup)[0]])
        wh = (gb[src, 2:] - gb[src, :2]) if m else np.zeros((0, 2))
        tb = gb[src] + rng.normal(0, 0.08, (len(src), 4)) * np.concatenate([wh, wh], 1)
        tl = gl[src].copy()
        wrong = rng.uniform(size=len(src)) < 0.1
        tl[wrong] = rng.integers(1, n_classes, wrong.sum())
        ts = rng.beta(5, 2, len(src))
        n_fp = max(dets_per_image - len(src), 0)
        fb = random_boxes(n_fp)
        fl = rng.integers(1, n_classes, n_fp)
        fs = rng.beta(1.2, 5, n_fp)
        db = np.clip(np.concatenate([tb, fb]), 0, [W, H, W, H])
        ok = (db[:, 2] > db[:, 0]) & (db[:, 3] > db[:, 1])
        preds.append({
            "boxes": torch.tensor(db[ok], dtype=torch.float32),
            "scores": torch.tensor(np.concatenate([ts, fs])[ok], dtype=torch.float32),
            "labels": torch.tensor(np.concatenate([tl, fl])[ok], dtype=torch.int64),
        })
        gts.append({
            "boxes": torch.tensor(gb, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(gl, dtype=torch.int64),
            "difficult": torch.tensor(gd, dtype=torch.bool),
        })
    return classes, preds, gts


def _time_ours(classes: list[str], preds: list, gts: list) -> tuple[float, float]:
    from src.detection.evaluation.metrics import DetectionEvaluator

    t = time.perf_counter()
    ev = DetectionEvaluator(classes, metric="all")
    ev.update(preds, gts)
    r = ev.compute()
    return time.perf_counter() - t, r.map


def _time_torchmetrics(preds: list, gts: list, class_metrics: bool) -> tuple[float, float]:
    from torchmetrics.detection import MeanAveragePrecision

    tm_gts = [{"boxes": g["boxes"], "labels": g["labels"], "iscrowd": g["difficult"].long()} for g in gts]
    t = time.perf_counter()
    m = MeanAveragePrecision(class_metrics=class_metrics)  # default backend: pycocotools
    m.warn_on_many_detections = False
    m.update(preds, tm_gts)
    r = m.compute()
    return time.perf_counter() - t, float(r["map"])


def run(quick: bool = False, images: int | None = None, dets: int = 100, reps: int | None = None) -> list[dict[str, Any]]:
    """Time both sides on the same data; rows ``{name, baseline, ours, ratio, goal}`` (median seconds)."""
    images = images or (500 if quick else 5000)
    reps = reps or (1 if quick else 3)
    warnings.filterwarnings("ignore", module="torchmetrics")
    classes, preds, gts = make_eval_set(images, dets_per_image=dets)
    n_det = sum(len(p["scores"]) for p in preds)
    ours, base, base_cls = [], [], []
    for _ in range(reps):
        t, ours_map = _time_ours(classes, preds, gts)
        ours.append(t)
        t, tm_map = _time_torchmetrics(preds, gts, class_metrics=False)
        base.append(t)
        t, _ = _time_torchmetrics(preds, gts, class_metrics=True)
        base_cls.append(t)
    # same data must give the same number, or the timing means nothing; torchmetrics' float32 default thresholds
    # shift its mAP by up to ~1e-3 from COCOeval's (ours equals pycocotools COCOeval, see tests/test_metrics.py)
    if abs(ours_map - tm_map) > 2e-3:
        raise RuntimeError(f"mAP differs: ours {ours_map:.6f} vs torchmetrics {tm_map:.6f}")
    o = statistics.median(ours)
    desc = f"{images} images, {n_det} dets"
    return [
        {"name": f"eval vs torchmetrics default ({desc})", "baseline": statistics.median(base), "ours": o,
         "ratio": statistics.median(base) / o, "goal": GOAL},
        {"name": f"eval vs torchmetrics class_metrics=True ({desc})", "baseline": statistics.median(base_cls),
         "ours": o, "ratio": statistics.median(base_cls) / o, "goal": GOAL},
        *postprocess_rows(quick),
    ]


def postprocess_rows(quick: bool = False, reps: int | None = None) -> list[dict[str, Any]]:
    """torchvision's RetinaNet post-processing vs ours on the CPU at evaluation settings (module docstring)."""
    from collections import OrderedDict

    from torch import nn
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead, _default_anchorgen

    from src.detection.modeling.postprocess import retinanet_postprocess

    class _NoBackbone(nn.Module):  # postprocess_detections needs a built model, never its backbone
        out_channels = 8

        def forward(self, x):  # pragma: no cover - never called
            return OrderedDict()

    batch, classes, size = (2, 20, 320) if quick else (8, 20, 640)
    strides = (8, 16, 32, 64, 128)  # torchvision's default RetinaNet anchors are for these levels
    model = RetinaNet(_NoBackbone(), classes, anchor_generator=_default_anchorgen(),
                      head=RetinaNetHead(8, 9, classes), score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
                      topk_candidates=1000).eval()
    grids = [(size // s, size // s) for s in strides]
    image_sizes = [(size, size)] * batch
    anchors = model.anchor_generator(ImageList(torch.zeros(batch, 3, size, size), image_sizes),
                                     [torch.zeros(batch, 8, h, w) for h, w in grids])
    g = torch.Generator().manual_seed(0)
    n = [h * w * 9 for h, w in grids]
    logits = [torch.randn(batch, k, classes, generator=g) - 3.4 for k in n]  # ~1/3 of the scores above 0.05
    deltas = [torch.randn(batch, k, 4, generator=g) * 0.3 for k in n]
    split_anchors = [list(a.split(n)) for a in anchors]
    settings = dict(box_coder=model.box_coder, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
                    topk_candidates=1000)

    def theirs():
        with torch.no_grad():
            return model.postprocess_detections({"cls_logits": logits, "bbox_regression": deltas}, split_anchors,
                                                image_sizes)

    def ours(per_image: bool):
        return retinanet_postprocess(logits, deltas, anchors[0], image_sizes, nms_per_image=per_image, **settings)

    a, b = theirs(), ours(True)
    for x, y in zip(a, b):  # the same detections (order of exactly equal scores aside)
        if len(x["scores"]) != len(y["scores"]) or not torch.allclose(x["scores"].sort().values,
                                                                       y["scores"].sort().values):
            raise RuntimeError("post-processing differs from torchvision's")
    times = time_interleaved({"theirs": theirs, "ours": lambda: ours(True), "one": lambda: ours(False)},
                             reps or (2 if quick else 5))
    where = f"RetinaNet {size}x{size}, {classes} classes, batch {batch}, score 0.05, 1,000 candidates per level, cpu"
    return [make_row("post-processing: torchvision per image vs ours (CPU: NMS per image, per class)", times["theirs"],
                     times["ours"], "info", "s", higher_is_better=False, note=where),
            make_row("post-processing: ours with one NMS for the batch vs per image, per class (CPU)", times["one"],
                     times["ours"], "info", "s", higher_is_better=False, note=where)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default 5000; 500 with --quick)")
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median reported; default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small run for smoke tests")
    args = ap.parse_args()
    print(markdown_table(run(quick=args.quick, images=args.images, dets=args.dets, reps=args.reps)))


if __name__ == "__main__":
    main()
