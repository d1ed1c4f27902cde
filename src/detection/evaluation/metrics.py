"""Detection metrics: COCO-style mAP (faster-coco-eval) and Pascal VOC AP@.5, per class, streaming.

Conventions (see docs/ARCHITECTURE.md, Conventions):

* Everything is in ORIGINAL image coordinates, ``xyxy`` pixels, labels are indices into ``classes`` with
  ``classes[0] == "__background__"`` (real classes 1..K-1; the COCO ``category_id`` is the same index).
* ``difficult`` ground truth is ignored: for COCO it is passed as ``iscrowd=1`` (a detection on it is neither TP
  nor FP, COCO's crowd rule); for VOC a detection whose best-overlap ground truth is difficult is dropped.
* Streaming: ``update`` keeps only boxes/scores/labels as small numpy arrays (and the VOC TP flags, decided per
  image right away), never images, so thousands of images fit easily.

COCO part: the COCO datasets are built here with vectorized numpy and evaluated with ``faster_coco_eval``'s
``COCOeval_faster`` - the same backend torchmetrics' ``MeanAveragePrecision(backend="faster_coco_eval")`` calls.
torchmetrics builds the COCO dicts with a Python call per box and re-runs the whole evaluation once per class for
``class_metrics=True``; here per-class AP / AP50 are read from the one ``eval["precision"]`` array (identical to
COCOeval's per-category summary), which is what makes evaluation several times faster. tests/test_metrics.py
checks equality with pycocotools ``COCOeval`` and with torchmetrics to 1e-6.

VOC part (implemented here; no library does it well): the official devkit rule - detections in descending score
order, each takes the ground truth of its class with the highest IoU in its image; IoU >= 0.5 and that ground truth
not yet taken -> TP, taken -> FP, difficult -> ignored, IoU < 0.5 -> FP. IoU uses continuous coordinates (no
"+1 pixel", like torchvision and COCO), so VOC and COCO AP50 see the same overlaps. VOC07 = 11-point interpolated
AP (recall thresholds 0, 0.1, ..., 1.0 as exact tenths), VOC12 = area under the monotone precision envelope.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from ..core.choices import METRICS
from ..core.errors import UserError
from .evaluator import DatasetEvaluator

VOC_IOU = 0.5


@dataclass
class EvalResult:
    """Output of :meth:`DetectionEvaluator.compute`. NaN means "not computed" or "no ground truth"."""

    metric: str
    map: float = math.nan  # COCO AP@[.5:.95], all areas, 100 dets
    map50: float = math.nan
    map75: float = math.nan
    map_small: float = math.nan
    map_medium: float = math.nan
    map_large: float = math.nan
    mar_100: float = math.nan
    voc07: float = math.nan  # mean over classes with (non-difficult) ground truth
    voc12: float = math.nan
    n_images: int = 0
    seconds: float = math.nan  # wall time of the evaluation, filled in by the caller (engine.evaluate)
    # one row per real class: {"class", "n_gt" (non-difficult), "ap50", "ap", "ap_voc07", "ap_voc12"}
    per_class: list[dict[str, Any]] = field(default_factory=list)
    # class name -> (recall, precision) at IoU .5 (VOC matching), only for classes with ground truth
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def primary(self) -> float:
        """The number to rank checkpoints by: COCO mAP, or the VOC AP that was asked for."""
        return {"voc07": self.voc07, "voc12": self.voc12}.get(self.metric, self.map)

    def summary(self) -> dict[str, float]:
        """The scalar metrics (for results.csv / logging)."""
        keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_100", "voc07", "voc12")
        return {k: getattr(self, k) for k in keys}


def _nan(x: float) -> float:
    """COCO marks 'no ground truth' with -1; we use NaN so it can never be averaged in by mistake."""
    return math.nan if x is None or x < 0 else float(x)


def _np(x: Any, dtype: Any, boxes: bool = False) -> np.ndarray:
    """Tensor / list / array -> CPU numpy (boxes as [N, 4], everything else flat)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x if x is not None else [], dtype=dtype)
    return a.reshape(-1, 4) if boxes else a.reshape(-1)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07: bool) -> float:
    """AP from a PR curve (detections in descending score order).

    ``use_07``: VOC2007 11-point interpolation - mean over r in {0, .1, ..., 1} of the best precision at recall >= r
    (0 if never reached). Otherwise VOC2010+: area under the precision envelope (precision made monotone from the
    right), summed where recall changes.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07:
        # exact tenths (k/10), so a recall of 3/10 reaches the 0.3 threshold (np.arange(0, 1.1, .1) has 0.30000000000000004)
        ap = 0.0
        for t in np.arange(11) / 10:
            reached = precision[recall >= t]
            ap += reached.max() if reached.size else 0.0
        return float(ap / 11)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_match(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_difficult: np.ndarray,
    iou_thresh: float = VOC_IOU,
) -> tuple[np.ndarray, np.ndarray]:
    """VOC devkit matching for one image, all classes at once -> (tp, ignored) boolean flags per detection.

    Each detection's candidate is the same-class ground truth with the highest IoU (first on ties), whether or not
    it is taken already. Among detections with IoU >= thresh on a non-difficult candidate, the highest-scoring one
    per ground truth is the TP (equivalent to the devkit's sequential loop, since the candidate does not depend on
    what is already taken). Detections on a difficult candidate are ignored; all others are FP.
    """
    n = len(det_scores)
    tp = np.zeros(n, dtype=bool)
    ignored = np.zeros(n, dtype=bool)
    if n == 0 or len(gt_labels) == 0:
        return tp, ignored
    iou = box_iou(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes)).numpy()
    iou[det_labels[:, None] != gt_labels[None, :]] = -1.0  # other classes never match
    jmax = iou.argmax(axis=1)
    hit = iou[np.arange(n), jmax] >= iou_thresh
    ignored = hit & gt_difficult[jmax]
    cand = np.nonzero(hit & ~gt_difficult[jmax])[0]
    if cand.size:
        cand = cand[np.argsort(-det_scores[cand], kind="stable")]
        _, first = np.unique(jmax[cand], return_index=True)
        tp[cand[first]] = True
    return tp, ignored


class DetectionEvaluator(DatasetEvaluator):
    """Accumulates per-image predictions and ground truth; ``compute()`` gives COCO and/or VOC metrics.

    >>> ev = DetectionEvaluator(["__background__", "cat", "dog"], metric="all")
    >>> ev.process(preds, targets)  # per batch: lists of per-image dicts, original image coordinates
    >>> result = ev.evaluate()      # all ranks' images under DDP; the result on rank 0, None elsewhere
    ``update`` / ``compute`` are the same on this process's images only; ``state_dict()`` / ``merge()`` move
    state by hand.
    """

    def __init__(self, classes: Sequence[str], metric: str = "coco") -> None:
        classes = list(classes)
        if not classes or classes[0] != "__background__" or len(classes) < 2:
            raise UserError(
                f"CLASSES {classes[:3]}...: the list must start with '__background__' followed by at least one class"
            )
        if metric not in METRICS:
            raise UserError(f"--metric {metric!r} is not valid; use one of {', '.join(METRICS)}")
        self.classes = classes
        self.metric = metric
        self.use_coco = metric in ("coco", "all")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        # per image, one entry each; det_* are always kept (VOC needs scores/labels/flags), boxes only for COCO
        self._state: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "det_boxes", "det_scores", "det_labels", "det_tp", "det_ignored", "gt_boxes", "gt_labels", "gt_difficult"
            )
        }
        self._n_gt = np.zeros(len(self.classes), dtype=np.int64)  # non-difficult ground truth per class

    @property
    def n_images(self) -> int:
        return len(self._state["det_scores"])

    def state_dict(self) -> dict[str, Any]:
        """Plain picklable state (numpy arrays), e.g. for ``torch.distributed.all_gather_object``."""
        return {"classes": self.classes, "metric": self.metric, "n_gt": self._n_gt.copy(),
                "state": {k: list(v) for k, v in self._state.items()}}

    def merge(self, other: DetectionEvaluator | dict[str, Any]) -> None:
        """Append another evaluator's images (or a ``state_dict``, e.g. another rank's) to this one."""
        state = other.state_dict() if isinstance(other, DetectionEvaluator) else other
        if list(state["classes"]) != self.classes:
            raise ValueError("cannot merge evaluators with different class lists")
        if (state["metric"] in ("coco", "all")) != self.use_coco:  # one side kept no boxes
            raise ValueError(f"cannot merge a metric={state['metric']!r} state into a metric={self.metric!r} evaluator")
        for k, v in state["state"].items():
            self._state[k].extend(v)
        self._n_gt += np.asarray(state["n_gt"], dtype=np.int64)

    def sync(self) -> None:
        """Under torch.distributed, gather all ranks' images into every rank's evaluator (rank order)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, self.state_dict())
        self.reset()
        for state in gathered:
            self.merge(state)

    # ----------------------------------------------------------------- update
    def update(self, preds: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]]) -> None:
        """Add images. preds: ``{"boxes" [N,4] xyxy, "scores" [N], "labels" [N]}``; gts: ``{"boxes" [M,4],
        "labels" [M], "difficult" [M] bool (optional)}``, both in original image coordinates."""
        if len(preds) != len(gts):
            raise ValueError(f"update(): {len(preds)} prediction dicts but {len(gts)} ground-truth dicts")
        k = len(self.classes)
        for p, g in zip(preds, gts):
            db = _np(p["boxes"], np.float32, boxes=True)
            ds = _np(p["scores"], np.float32)
            dl = _np(p["labels"], np.int64)
            gb = _np(g["boxes"], np.float32, boxes=True)
            gl = _np(g["labels"], np.int64)
            gd = _np(g["difficult"], bool) if g.get("difficult") is not None else np.zeros(len(gl), dtype=bool)
            if not (len(db) == len(ds) == len(dl)) or not (len(gb) == len(gl) == len(gd)):
                raise ValueError("update(): boxes, scores/labels and difficult must have the same length per image")
            for name, lab in (("prediction", dl), ("ground-truth", gl)):
                if lab.size and (lab.min() < 1 or lab.max() >= k):
                    raise ValueError(f"update(): {name} label {int(lab.min() if lab.min() < 1 else lab.max())} "
                                     f"is outside 1..{k - 1} (classes[0] is __background__)")
            tp, ign = voc_match(db, ds, dl, gb, gl, gd)
            s = self._state
            s["det_scores"].append(ds)
            s["det_labels"].append(dl)
            s["det_tp"].append(tp)
            s["det_ignored"].append(ign)
            if self.use_coco:  # VOC needs no boxes after matching
                s["det_boxes"].append(db)
                s["gt_boxes"].append(gb)
                s["gt_labels"].append(gl)
                s["gt_difficult"].append(gd)
            self._n_gt += np.bincount(gl[~gd], minlength=k)

    def process(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        """:meth:`update` with ``targets`` as ground-truth dicts or as the data loader's targets, whose original
        image annotations are ``orig_boxes`` / ``orig_labels`` / ``orig_difficult``."""
        self.update(predictions, [_ground_truth(t) for t in targets])

    def evaluate(self) -> EvalResult | None:
        """Every rank's images gathered (:meth:`sync`), then scored: the result on rank 0, None on the others."""
        self.sync()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return None
        return self.compute()

    # ---------------------------------------------------------------- compute
    def compute(self) -> EvalResult:
        res = EvalResult(metric=self.metric, n_images=self.n_images)
        rows = {c: {"class": self.classes[c], "n_gt": int(self._n_gt[c]), "ap50": math.nan, "ap": math.nan,
                    "ap_voc07": math.nan, "ap_voc12": math.nan} for c in range(1, len(self.classes))}
        self._compute_voc(res, rows)
        if self.use_coco and self.n_images:
            with _gc_paused():
                self._compute_coco(res, rows)
        res.per_class = [rows[c] for c in range(1, len(self.classes))]
        return res

    def _compute_voc(self, res: EvalResult, rows: dict[int, dict[str, Any]]) -> None:
        s = self._state
        if not s["det_scores"]:
            scores, labels, tp = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        else:
            keep = ~np.concatenate(s["det_ignored"])
            scores = np.concatenate(s["det_scores"])[keep]
            labels = np.concatenate(s["det_labels"])[keep]
            tp = np.concatenate(s["det_tp"])[keep]
        order = np.argsort(-scores, kind="stable")  # one global sort; per class below keeps this order
        labels, tp = labels[order], tp[order]
        aps07, aps12 = [], []
        for c, row in rows.items():
            n_gt = row["n_gt"]
            if n_gt == 0:
                continue
            t = tp[labels == c]
            ctp = np.cumsum(t)
            cfp = np.cumsum(~t)
            recall = ctp / n_gt
            precision = ctp / np.maximum(ctp + cfp, 1)
            row["ap_voc07"] = float(voc_ap(recall, precision, use_07=True))
            row["ap_voc12"] = voc_ap(recall, precision, use_07=False)
            aps07.append(row["ap_voc07"])
            aps12.append(row["ap_voc12"])
            res.pr_curves[row["class"]] = (recall, precision)
        if aps07:
            res.voc07, res.voc12 = float(np.mean(aps07)), float(np.mean(aps12))

    def _compute_coco(self, res: EvalResult, rows: dict[int, dict[str, Any]]) -> None:
        from faster_coco_eval import COCOeval_faster

        s = self._state
        gt, dt = _coco_datasets(s, len(self.classes))
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        st = ev.stats
        res.map, res.map50, res.map75 = _nan(st[0]), _nan(st[1]), _nan(st[2])
        res.map_small, res.map_medium, res.map_large = _nan(st[3]), _nan(st[4]), _nan(st[5])
        res.mar_100 = _nan(st[8])
        # precision[T, R, K, A, M]: area index 0 = "all", last maxDets = 100 - exactly COCOeval's per-category AP
        prec = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
        i50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
        for k, cat in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            if (p > -1).any():
                rows[int(cat)]["ap"] = float(p[p > -1].mean())
                p50 = p[i50]
                rows[int(cat)]["ap50"] = float(p50[p50 > -1].mean())


def _ground_truth(target: dict[str, Any]) -> dict[str, Any]:
    if "orig_boxes" in target:
        return {"boxes": target["orig_boxes"], "labels": target["orig_labels"],
                "difficult": target.get("orig_difficult")}
    return target


@contextlib.contextmanager
def _gc_paused() -> Iterable[None]:
    """The COCO datasets are ~10 small dicts/lists per box; Python's cyclic GC would rescan them again and again
    while they are built (half the evaluation time at 500k boxes). They hold no cycles, so pause it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _coco_datasets(s: dict[str, list[np.ndarray]], n_classes: int) -> tuple[Any, Any]:
    """faster-coco-eval COCO objects for ground truth and detections, built with vectorized numpy.

    Same content as torchmetrics' ``_get_coco_format``: image ids 0..N-1 in update order, bbox ``[x, y, w, h]``,
    ``area = w * h`` (COCO box area, used for small/medium/large), ``iscrowd`` = difficult, annotation ids from 1.
    """
    from faster_coco_eval import COCO

    n_img = len(s["det_scores"])
    images = [{"id": i} for i in range(n_img)]
    cats = [{"id": c, "name": str(c)} for c in range(1, n_classes)]

    def anns(boxes: list[np.ndarray], labels: list[np.ndarray], extra: dict[str, list[np.ndarray]]) -> list[dict]:
        counts = [len(x) for x in labels]
        if sum(counts) == 0:
            return []
        b = np.concatenate(boxes).astype(np.float64)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        cols = {
            "image_id": np.repeat(np.arange(n_img), counts).tolist(),
            "bbox": xywh.tolist(),
            "area": (xywh[:, 2] * xywh[:, 3]).tolist(),
            "category_id": np.concatenate(labels).tolist(),
            **{k: v for k, v in extra.items()},
        }
        keys = list(cols)
        return [dict(zip(keys, vals), id=i) for i, vals in enumerate(zip(*cols.values()), start=1)]

    gt_anns = anns(s["gt_boxes"], s["gt_labels"],
                   {"iscrowd": np.concatenate(s["gt_difficult"]).astype(np.int64).tolist() if n_img else []})
    dt_anns = anns(s["det_boxes"], s["det_labels"],
                   {"score": np.concatenate(s["det_scores"]).astype(np.float64).tolist() if n_img else [],
                    "iscrowd": [0] * sum(len(x) for x in s["det_labels"])})
    out = []
    for a in (gt_anns, dt_anns):
        coco = COCO(print_function=lambda *a, **k: None)
        coco.dataset = {"images": images, "annotations": a, "categories": cats}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        out.append(coco)
    return out[0], out[1]


# ------------------------------------------------------------------------------ saved predictions (no model)
def predictions_per_image(
    predictions_json: str | os.PathLike | list[dict[str, Any]],
    gts_by_file: dict[str, dict[str, Any]],
    classes: Sequence[str],
    label_of: Callable[[int], int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """COCO-results-format predictions as the prediction dicts an evaluator's ``process`` takes: one
    ``{"boxes" [N, 4] xyxy, "scores", "labels"}`` per image of ``gts_by_file``, in its order (empty for an image
    without predictions), in original image pixels.

    ``predictions_json``: a path to (or the loaded list of) ``{"file_name" | "image_id", "category_id",
    "bbox": [x, y, w, h], "score"}`` in original image pixels. ``category_id`` is our label index into
    ``classes`` (1..K-1, ``classes[0]`` is ``__background__``), or - with ``label_of`` (e.g.
    ``DataConfig.label_of`` of a COCO dataset) - the dataset's own id, mapped to the label index. A row's optional
    ``category_name`` must be that label's class (catches files written for other classes or ids).
    Images are matched by ``file_name`` (or ``image_id``) to the keys of ``gts_by_file`` (gt dicts as for
    :meth:`DetectionEvaluator.update`); when the exact key is absent the base name is tried, so a path
    ``images/a.jpg`` matches ``a.jpg``. A prediction for an image not in ``gts_by_file`` is a UserError.
    """
    src = "predictions" if isinstance(predictions_json, list) else str(predictions_json)
    if isinstance(predictions_json, list):
        preds = predictions_json
    else:
        path = Path(predictions_json)
        if not path.is_file():
            raise UserError(f"{path}: predictions file not found; pass the predictions.json written by inference")
        try:
            preds = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); pass a COCO results-format predictions file") from None
    if isinstance(preds, dict) and isinstance(preds.get("annotations"), list):
        preds = preds["annotations"]
    if not isinstance(preds, list):
        raise UserError(f"{src}: expected a JSON list of {{file_name, category_id, bbox, score}} (COCO results format)")

    keys = [str(k) for k in gts_by_file]
    by_key = {str(k): k for k in gts_by_file}
    by_base: dict[str, Any] = {}
    for k in gts_by_file:
        by_base.setdefault(Path(str(k)).name, []).append(k)
    index = {k: i for i, k in enumerate(keys)}
    n_cls = len(classes)
    per_image: list[list[tuple[list[float], float, int]]] = [[] for _ in keys]
    unknown: list[str] = []
    for n, d in enumerate(preds):
        if not isinstance(d, dict) or "bbox" not in d or "score" not in d or "category_id" not in d:
            raise UserError(f"{src}: entry {n} lacks bbox/score/category_id; expected COCO results format")
        name = d.get("file_name", d.get("image_id"))
        if name is None:
            raise UserError(f"{src}: entry {n} has neither file_name nor image_id")
        key = by_key.get(str(name))
        if key is None:
            cands = by_base.get(Path(str(name)).name, [])
            key = cands[0] if len(cands) == 1 else None
        if key is None:
            unknown.append(str(name))
            continue
        cat = d["category_id"]
        if label_of is not None:
            cat = label_of(cat)
        elif not isinstance(cat, int) or not 1 <= cat < n_cls:
            raise UserError(f"{src}: entry {n} has category_id {cat!r}; use our label index 1..{n_cls - 1} "
                            f"(classes[0] is __background__)")
        cname = d.get("category_name")
        if cname is not None and cname != classes[cat]:
            raise UserError(f"{src}: entry {n} has category_id {d['category_id']!r} named {cname!r}, which is "
                            f"{classes[cat]!r} here; score against the dataset the model was trained on")
        bbox = d["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise UserError(f"{src}: entry {n} bbox {bbox!r} is not [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        per_image[index[str(key)]].append(([x, y, x + w, y + h], float(d["score"]), cat))
    if unknown:
        raise UserError(f"{src}: {len(unknown)} predictions refer to images not in the ground truth "
                        f"(e.g. {unknown[0]!r}); score against the dataset the predictions were made on")

    return [{"boxes": np.asarray([b for b, _, _ in dets], dtype=np.float32).reshape(-1, 4),
             "scores": np.asarray([s for _, s, _ in dets], dtype=np.float32),
             "labels": np.asarray([c for _, _, c in dets], dtype=np.int64)} for dets in per_image]


def score_predictions_json(
    predictions_json: str | os.PathLike | list[dict[str, Any]],
    gts_by_file: dict[str, dict[str, Any]],
    classes: Sequence[str],
    metric: str = "all",
    label_of: Callable[[int], int] | None = None,
) -> EvalResult:
    """Score COCO-results-format predictions against ground truth, without a model (arguments as for
    :func:`predictions_per_image`). Images with ground truth but no predictions count as all missed."""
    preds = predictions_per_image(predictions_json, gts_by_file, classes, label_of)
    ev = DetectionEvaluator(classes, metric=metric)
    ev.process(preds, list(gts_by_file.values()))
    return ev.evaluate()


__all__ = [
    "DetectionEvaluator", "EvalResult", "predictions_per_image", "score_predictions_json", "voc_ap",
    "voc_match", "METRICS",
]
