"""The standalone evaluation entry: scoring a saved predictions JSON against a dataset without a model, and
reproducing a training run's own evaluation from its checkpoint (the same path as inference)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings
from pathlib import Path

import pytest

from src.detection.checkpoint.source import ModelSource
from src.detection.commands.evaluate import main as evaluate_main
from src.detection.core.cli import RuntimeOptions
from src.detection.data.datasets import load_data_config, load_ground_truth
from src.detection.data.synthetic import generate_dataset
from src.detection.engine.evaluation import EvalConfig, evaluate_checkpoint_report
from src.detection.evaluation.predictions import evaluate_predictions, evaluate_predictions_report

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models in process


def predictions_from_ground_truth(gts: dict, drop_every: int = 0) -> list[dict]:
    """COCO results-format predictions equal to the ground truth (optionally missing every n-th box)."""
    out, k = [], 0
    for name, gt in gts.items():
        for box, label, difficult in zip(gt["boxes"].tolist(), gt["labels"].tolist(), gt["difficult"].tolist()):
            k += 1
            if difficult or (drop_every and k % drop_every == 0):
                continue
            x1, y1, x2, y2 = box
            out.append({"file_name": name, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": 0.9})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("evalset"), 4, 20, imgsz=96, seed=3)


def test_perfect_predictions_score_one_and_missing_boxes_lower_recall(dataset: Path, tmp_path: Path, run_main):
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    assert sum(len(g["boxes"]) for g in gts.values()) > 10
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(predictions_from_ground_truth(gts)))
    out = run_main(evaluate_main, ["--predictions", perfect, "--config", dataset, "--out-dir", tmp_path, "--name", "p"])
    assert out.returncode == 0, out.stderr
    all_row = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("all")][0]
    assert all(float(v) == pytest.approx(1.0) for v in all_row[2:])  # AP50, AP, VOC07, VOC12
    assert (tmp_path / "p" / "per_class_ap.csv").is_file() and (tmp_path / "p" / "pr_curves.png").is_file()

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(predictions_from_ground_truth(gts, drop_every=3)))
    out = run_main(evaluate_main, ["--predictions", partial, "--config", dataset, "--out-dir", tmp_path, "--name", "q",
                                   "--metric", "coco"])
    assert out.returncode == 0, out.stderr
    ap50 = float([ln.split() for ln in out.stdout.splitlines() if ln.startswith("all")][0][2])
    assert 0.4 < ap50 < 0.9


def test_documented_module_exits_2_with_one_error_line(dataset: Path, tmp_path: Path, run_script):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run_script("-m", "src.detection.evaluate", "--predictions", str(bad), "--config", str(dataset),
                     "--out-dir", str(tmp_path), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.json" in lines[0]
    assert not any(tmp_path.glob("eval_*")), "a failed evaluation must not leave a run folder"


def test_bad_predictions_file_is_one_line(dataset: Path, tmp_path: Path, run_main):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args in (["--predictions", str(bad)], ["--predictions", str(tmp_path / "missing.json")],
                 ["--model", str(tmp_path / "missing.pth")]):
        out = run_main(evaluate_main, [*args, "--config", str(dataset), "--out-dir", str(tmp_path)])
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and args[1].split("/")[-1] in lines[0]
        assert not any(tmp_path.glob("eval_*")), "a failed evaluation must not leave a run folder"


def test_cut_predictions_are_scored_with_a_warning(dataset: Path, tmp_path: Path):
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    rows = predictions_from_ground_truth(gts)  # every score 0.9: what a file cut at --threshold 0.5 looks like
    old = tmp_path / "old" / "predictions.json"
    old.parent.mkdir()
    old.write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="lowest score is 0.9.*looks cut.*underestimated"):
        evaluate_predictions(old, dataset)
    # a file whose writer recorded the cut
    (old.parent / "summary.json").write_text(json.dumps({"predictions": str(old), "predictions_score_floor": 0.5}))
    with pytest.warns(UserWarning, match=r"only detections scoring >= 0.5 \(cut"):
        evaluate_predictions(old, dataset)
    # recorded down to the evaluation threshold: no warning, even though every score is high
    (old.parent / "summary.json").write_text(json.dumps({"predictions": str(old), "predictions_score_floor": 0.05}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_predictions(old, dataset)
    assert result.map50 == pytest.approx(1.0)


def test_onnx_model_gets_the_two_step_recipe(dataset: Path, tmp_path: Path, run_main):
    onnx = tmp_path / "best_model.onnx"
    onnx.write_bytes(b"ONNX stand-in: never opened")
    out = run_main(evaluate_main, ["--model", onnx, "--config", dataset, "--out-dir", tmp_path])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"python infer_det_image.py --model {onnx}" in lines[0]
    assert "python -m src.detection.evaluate --predictions" in lines[0] and "Unpickling" not in lines[0]
    assert not any(tmp_path.glob("eval_*"))


def test_evaluate_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "(default: outputs/eval)" in text and "--threshold THRESHOLD, --score-thresh" in text
    # the model-source flags every command that loads a checkpoint takes
    for flag in ("--model-name", "--head", "--feature-extractor", "--weights", "--imgsz", "--workers", "--device"):
        assert flag in text, flag


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """A short letterbox run at a non-square size on a tiny synthetic set (as tests/test_train.py builds them),
    validated on its own training images so that the model finds objects after a few epochs."""
    root = tmp_path_factory.mktemp("e2e")
    data = generate_dataset(root / "data", 24, 4, imgsz=96, seed=1)
    fit = data.parent / "fit.yaml"
    fit.write_text(data.read_text().replace("VALID_IMG: valid/", "VALID_IMG: train/")
                   .replace("VALID_ANNOT: valid/", "VALID_ANNOT: train/"))
    from src.detection.commands.train import main as train_main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(["--config", str(fit), "--model-name", "dinov3_convnext_atto", "--head", "fcos",
                           "--fpn-channels", "64", "--imgsz", "96", "64", "--letterbox", "--augment", "none",
                           "--batch", "4", "--workers", "0", "--lr", "2e-3", "--warmup-epochs", "0.3", "--seed", "0",
                           "--epochs", "10", "--eval-interval", "5", "--device", "cpu", "--out-dir", str(root),
                           "--name", "run", "--precision", "fp32"]) == 0
    # fp32 pinned: on a CPU with native bf16 training would evaluate in bf16, while inference's rule keeps this tiny
    # backbone in fp32; the comparisons below are about one computation, not two precisions
    return fit, root / "run"


@pytest.mark.slow
def test_evaluate_model_reproduces_the_best_row_and_inference_json_scores_the_same(trained_run, tmp_path: Path,
                                                                                   read_results):
    from src.detection.commands.infer_image import build_image_parser, image_config_from_args, infer_images
    from src.detection.data.formats import FORMATS

    data, run = trained_run
    scored_rows = [r for r in read_results(run) if not math.isnan(r["map"])]
    best = max(scored_rows, key=lambda r: r["map"])  # first of equals, as training keeps the first best
    assert best["map50"] > 0  # a model that finds something, so the comparison below means something
    # one device for training, evaluation and inference: results on a GPU differ from the CPU's in the last digits
    report = evaluate_checkpoint_report(EvalConfig(config=str(data), source=ModelSource(model=str(run / "best_model.pth")),
                                                   metric="coco", runtime=RuntimeOptions(device="cpu", workers=0)))
    result = report.result
    for key in ("map", "map50", "map75"):
        assert getattr(result, key) == pytest.approx(best[key], rel=0, abs=1e-12), key

    images = FORMATS["voc"].split_layout(data.parent, "train")[0]  # the validation split of the fit config
    infer_images(image_config_from_args(build_image_parser().parse_args(
        ["-i", str(images), "--model", str(run / "best_model.pth"), "--threshold", "0.5", "--device", "cpu",
         "--batch", "8", "--no-save", "--out-dir", str(tmp_path / "inf")])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is not cut: no warning
        scored_report = evaluate_predictions_report(tmp_path / "inf" / "predictions.json", data, metric="coco")
    scored = scored_report.result
    for key in ("map", "map50", "map75", "map_small", "mar_100"):
        assert getattr(scored, key) == pytest.approx(getattr(result, key), rel=0, abs=1e-9, nan_ok=True), key
    # and the rest of the report: a trained model's confusion matrix (letterboxed, non-square input) and best threshold
    assert report.confusion.matrix.trace() > 0
    assert (scored_report.confusion.matrix == report.confusion.matrix).all()
    assert scored_report.f1.best_threshold == pytest.approx(report.f1.best_threshold, rel=0, abs=1e-6)
    assert scored_report.f1.best_f1 == pytest.approx(report.f1.best_f1, rel=0, abs=1e-9)


# ------------------------------------------------------------------------------------------ COCO category ids
def even_odds(model) -> None:
    """Scores around 0.5 instead of the 0.01 prior: a random tiny model then detects every class."""
    import torch

    with torch.no_grad():
        cls_logits = model.head.classification_head.cls_logits  # separable: the bias is on its pointwise conv
        getattr(cls_logits, "pointwise", cls_logits).bias.zero_()


def _noise_jpeg(path: Path, w: int, h: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def coco_inference(tmp_path_factory, make_tiny_checkpoint) -> tuple[Path, Path]:
    """A COCO dataset with category ids 3 and 7 (one valid image readable from its header but not decodable),
    a tiny random RetinaNet checkpoint recording those ids, and image inference over the valid folder."""
    from src.detection.inference.images import ImageInferConfig, infer_images
    from src.detection.inference.predictor import PredictConfig

    root = tmp_path_factory.mktemp("coco_ids")
    names = ["a.jpg", "b.jpg", "sub/c.jpg", "broken.jpg"]
    for k, name in enumerate(names):
        _noise_jpeg(root / "valid" / name, 64, 48, seed=k)
    _noise_jpeg(root / "train" / "t.jpg", 64, 48, seed=9)
    broken = root / "valid" / "broken.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # header intact, pixels cut
    cats = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    boxes = [[4, 4, 28, 30], [30, 10, 32, 34], [0, 16, 20, 22], [20, 2, 40, 40], [8, 8, 30, 30]]
    valid = {"images": [{"id": 100 + k, "file_name": n, "width": 64, "height": 48} for k, n in enumerate(names)],
             "annotations": [{"id": j + 1, "image_id": 100 + j % 4, "category_id": (3, 7)[j % 2], "bbox": b,
                              "area": b[2] * b[3], "iscrowd": 0} for j, b in enumerate(boxes)],
             "categories": cats}
    train = {"images": [{"id": 1, "file_name": "t.jpg", "width": 64, "height": 48}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 20, 20], "area": 400,
                              "iscrowd": 0}], "categories": cats}
    (root / "valid.json").write_text(json.dumps(valid))
    (root / "train.json").write_text(json.dumps(train))
    config = root / "coco.yaml"
    config.write_text("FORMAT: coco\nTRAIN_JSON: train.json\nTRAIN_IMG: train\nVALID_JSON: valid.json\n"
                      "VALID_IMG: valid\n")
    data_cfg = load_data_config(config)
    assert data_cfg.classes == ["__background__", "cat", "dog"] and data_cfg.category_ids == [0, 3, 7]

    ckpt = make_tiny_checkpoint(root / "model.pth", data_cfg.classes, category_ids=data_cfg.category_ids,
                                prepare=even_odds)
    out = root / "inference"
    infer_images(ImageInferConfig(PredictConfig(model=str(ckpt), device="cpu", no_save=True, out_dir=str(out)),
                                  input=str(root / "valid"), recursive=True))
    return config, out


def test_coco_ids_round_trip_through_inference_and_evaluation(coco_inference, tmp_path: Path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    config, out = coco_inference
    rows = json.loads((out / "predictions.json").read_text())
    assert {(r["category_id"], r["category_name"]) for r in rows} == {(3, "cat"), (7, "dog")}
    assert json.loads((out / "summary.json").read_text())["unreadable"] == ["broken.jpg"]

    result = evaluate_predictions(out / "predictions.json", config, metric="coco")
    # pycocotools on the user's own annotation file: image ids by file name, the unreadable image left out
    gt = COCO(str(config.parent / "valid.json"))
    ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    ev = COCOeval(gt, gt.loadRes([{**r, "image_id": ids[r["file_name"]]} for r in rows]), "bbox")
    ev.params.imgIds = [i for name, i in ids.items() if name != "broken.jpg"]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert result.map50 > 0  # something matched, so the comparison means something
    assert result.map == pytest.approx(ev.stats[0], abs=1e-6) and result.map50 == pytest.approx(ev.stats[1], abs=1e-6)
    assert result.n_images == 3


def test_predictions_with_other_ids_or_classes_are_refused(coco_inference, tmp_path: Path):
    from src.detection.core.errors import UserError

    config, out = coco_inference
    rows = json.loads((out / "predictions.json").read_text())
    for change, pattern in (({"category_id": 1}, r"category id 1 is not one of this dataset's ids \[3, 7\]"),
                            ({"category_name": "dog"}, "category_id 3 named 'dog', which is 'cat' here")):
        path = tmp_path / "edited.json"
        path.write_text(json.dumps([{**r, **change} if r["category_id"] == 3 else r for r in rows]))
        with pytest.raises(UserError, match=pattern):
            evaluate_predictions(path, config)


# ------------------------------------------------------------------------------------------ --predictions: the report
REPORT_FILES = ("confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix_normalized.csv", "f1_curve.png",
                "f1_curve.csv", "per_class_ap.csv")


def _matrix(folder: Path) -> list[list[int]]:
    """confusion_matrix.csv's counts (rows: true class, then background; columns: predicted, then background)."""
    rows = list(csv.reader((folder / "confusion_matrix.csv").read_text().splitlines()))
    return [[int(v) for v in r[1:]] for r in rows[1:]]


def _best_line(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("best score threshold")]
    assert len(lines) == 1, stdout
    return lines[0]


def _counts_per_class(gts: dict, n_classes: int) -> list[int]:
    """Non-difficult ground truth per real class (difficult objects are never counted as missed)."""
    out = [0] * n_classes
    for g in gts.values():
        for label, difficult in zip(g["labels"].tolist(), g["difficult"].tolist()):
            out[label - 1] += not difficult
    return out


@pytest.fixture(scope="module")
def tiny_inference(dataset: Path, tmp_path_factory, make_tiny_checkpoint) -> tuple[Path, Path]:
    """A tiny random RetinaNet checkpoint for the synthetic set (64 px input for 96 px images, so boxes are mapped
    back to the originals; scores around 0.5: right, confused and false detections) and image inference over its
    validation images (predictions.json, summary.json)."""
    from src.detection.data.formats import FORMATS
    from src.detection.inference.images import ImageInferConfig, infer_images
    from src.detection.inference.predictor import PredictConfig

    root = tmp_path_factory.mktemp("tiny_inference")
    ckpt = make_tiny_checkpoint(root / "model.pth", load_data_config(dataset).classes, prepare=even_odds)
    images = FORMATS["voc"].split_layout(dataset.parent, "valid")[0]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        infer_images(ImageInferConfig(PredictConfig(model=str(ckpt), device="cpu", no_save=True,
                                                    out_dir=str(root / "inference")), input=str(images)))
    return ckpt, root / "inference"


def test_predictions_report_equals_the_model_report(tiny_inference, dataset: Path, tmp_path: Path, run_main):
    ckpt, inference = tiny_inference
    out = run_main(evaluate_main, ["--model", ckpt, "--config", dataset, "--workers", "0", "--device", "cpu",
                                   "--out-dir", tmp_path, "--name", "model"])
    assert out.returncode == 0, out.stderr[-2000:]
    model_line = _best_line(out.stdout)
    out = run_main(evaluate_main, ["--predictions", inference / "predictions.json", "--config", dataset,
                                   "--out-dir", tmp_path, "--name", "pred"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert _best_line(out.stdout) == model_line and "not meaningful" not in model_line
    for name in REPORT_FILES:
        assert (tmp_path / "pred" / name).is_file(), name
    matrix = _matrix(tmp_path / "model")
    assert _matrix(tmp_path / "pred") == matrix
    assert ((tmp_path / "pred" / "confusion_matrix_normalized.csv").read_text()
            == (tmp_path / "model" / "confusion_matrix_normalized.csv").read_text())
    # a matrix with every kind of cell, so the equality means something
    k = len(matrix) - 1
    assert sum(matrix[i][i] for i in range(k)) > 0  # right
    assert sum(matrix[i][j] for i in range(k) for j in range(k) if i != j) > 0  # confused
    assert sum(matrix[k][:k]) > 0 and sum(matrix[i][k] for i in range(k)) > 0  # false, missed
    # the F1 curves: the same up to the last bit of a score (the two passes batch the images differently)
    with open(tmp_path / "model" / "f1_curve.csv") as a, open(tmp_path / "pred" / "f1_curve.csv") as b:
        model_rows, pred_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(model_rows) == len(pred_rows) == 101
    for m, p in zip(model_rows, pred_rows):
        assert {c: float(v) for c, v in p.items()} == pytest.approx({c: float(v) for c, v in m.items()}, abs=1e-6)
    best = evaluate_predictions_report(inference / "predictions.json", dataset).f1
    assert 0 < best.best_f1 < 1 and f"best score threshold {best.best_threshold:.3f}" in model_line


def test_predictions_report_files_difficult_objects_and_cut(dataset: Path, tmp_path: Path, run_main):
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    n_gt = _counts_per_class(gts, len(load_data_config(dataset).classes) - 1)
    rows = predictions_from_ground_truth(gts)
    # a detection on each difficult object counts nowhere, as in the --model path: not a false detection
    on_difficult = [{"file_name": name, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9}
                    for name, g in gts.items()
                    for (x1, y1, x2, y2), label, difficult in zip(g["boxes"].tolist(), g["labels"].tolist(),
                                                                   g["difficult"].tolist()) if difficult]
    assert on_difficult, "the synthetic set has difficult objects"
    path = tmp_path / "inf" / "predictions.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows + on_difficult))
    out = run_main(evaluate_main, ["--predictions", path, "--config", dataset, "--out-dir", tmp_path, "--name", "p"])
    assert out.returncode == 0, out.stderr[-2000:]
    for name in REPORT_FILES:
        assert (tmp_path / "p" / name).is_file(), name
    k = len(n_gt)
    assert _matrix(tmp_path / "p") == [[n_gt[i] if j == i else 0 for j in range(k + 1)] for i in range(k)] + [
        [0] * (k + 1)]
    line = _best_line(out.stdout)
    assert line.startswith("best score threshold 0.900: F1 1.000 ") and "--threshold 0.900" in line
    # every score is 0.9: the file looks cut (a warning, as before), and the threshold line says what that means
    assert "looks cut" in out.stderr
    assert "no detection scoring below 0.9, so the F1 curve below it is not meaningful" in line

    # the cut its writer recorded: the matrix counts from it, the line names it
    summary = path.parent / "summary.json"
    summary.write_text(json.dumps({"predictions": str(path), "predictions_score_floor": 0.5}))
    with pytest.warns(UserWarning, match="only detections scoring >= 0.5"):
        report = evaluate_predictions_report(path, dataset)
    assert report.score_floor == 0.5 and report.confusion.score_thresh == 0.5
    # written down to the evaluation threshold: not cut, nothing said
    summary.write_text(json.dumps({"predictions": str(path), "predictions_score_floor": 0.05}))
    out = run_main(evaluate_main, ["--predictions", path, "--config", dataset, "--out-dir", tmp_path, "--name", "q"])
    assert out.returncode == 0 and "not meaningful" not in _best_line(out.stdout) and "WARNING" not in out.stderr


def test_predictions_threshold_scores_only_the_detections_above_it(dataset: Path, tmp_path: Path, run_main):
    """--threshold with --predictions: as a model's evaluation threshold, detections at or below it are not scored;
    the result equals scoring a file without them."""
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    true = [dict(r, score=0.9 if i % 3 else 0.4) for i, r in enumerate(predictions_from_ground_truth(gts))]
    false = [dict(r, bbox=[r["bbox"][0] + 3, r["bbox"][1] + 40, r["bbox"][2], r["bbox"][3]], score=0.6) for r in true]
    both, only_true = tmp_path / "both.json", tmp_path / "true.json"
    both.write_text(json.dumps(true + false))
    only_true.write_text(json.dumps([r for r in true if r["score"] > 0.7]))
    args = ["--config", dataset, "--out-dir", tmp_path]
    cut = run_main(evaluate_main, ["--predictions", both, "--threshold", "0.7", *args, "--name", "cut"])
    ref = run_main(evaluate_main, ["--predictions", only_true, *args, "--name", "ref"])
    full = run_main(evaluate_main, ["--predictions", both, *args, "--name", "full"])
    assert cut.returncode == ref.returncode == full.returncode == 0, cut.stderr[-2000:]
    assert _matrix(tmp_path / "cut") == _matrix(tmp_path / "ref") and sum(_matrix(tmp_path / "cut")[-1]) == 0
    assert sum(_matrix(tmp_path / "full")[-1]) > 0  # without --threshold the false detections count
    table = [ln for ln in cut.stdout.splitlines() if ln.startswith("all")]
    assert table == [ln for ln in ref.stdout.splitlines() if ln.startswith("all")] and table
    assert table != [ln for ln in full.stdout.splitlines() if ln.startswith("all")]  # the cut changes the scores
    bad = run_main(evaluate_main, ["--predictions", both, "--threshold", "1.5", *args, "--name", "bad"])
    assert bad.returncode == 2 and "--threshold 1.5: a score threshold must be in [0, 1)" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_predictions_without_detections_count_every_object_missed(dataset: Path, tmp_path: Path, run_main):
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    n_gt = _counts_per_class(gts, len(load_data_config(dataset).classes) - 1)
    k = len(n_gt)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = run_main(evaluate_main, ["--predictions", empty, "--config", dataset, "--out-dir", tmp_path, "--name", "e"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert _matrix(tmp_path / "e") == [[0] * k + [n_gt[i]] for i in range(k)] + [[0] * (k + 1)]
    assert (tmp_path / "e" / "f1_curve.csv").is_file()
    assert _best_line(out.stdout) == ("best score threshold: none - no detection is correct at IoU 0.5 at any "
                                      "threshold (F1 0)")  # no threshold to recommend

    # predictions for one image only: the others' objects are missed
    first = next(iter(gts))
    one = {first: gts[first]}
    only = tmp_path / "one.json"
    only.write_text(json.dumps(predictions_from_ground_truth(one)))
    out = run_main(evaluate_main, ["--predictions", only, "--config", dataset, "--out-dir", tmp_path, "--name", "o"])
    assert out.returncode == 0, out.stderr[-2000:]
    hit = _counts_per_class(one, k)
    assert sum(hit) > 0
    assert _matrix(tmp_path / "o") == [[hit[i] if j == i else 0 for j in range(k)] + [n_gt[i] - hit[i]]
                                       for i in range(k)] + [[0] * (k + 1)]

    # a prediction for a file the dataset does not have stays one error line, and no result folder
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps([{"file_name": "elsewhere.jpg", "category_id": 1, "bbox": [0, 0, 5, 5],
                                  "score": 0.5}]))
    out = run_main(evaluate_main, ["--predictions", stray, "--config", dataset, "--out-dir", tmp_path, "--name", "s"])
    errors = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(errors) == 1 and "refer to images not in the ground truth" in errors[0]
    assert not (tmp_path / "s").exists()
