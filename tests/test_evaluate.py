"""The standalone evaluation entry: scoring a saved predictions JSON against a dataset without a model, and
reproducing a training run's own evaluation from its checkpoint (the same path as inference)."""

from __future__ import annotations

import contextlib
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
from src.detection.engine.evaluation import EvalConfig, evaluate_checkpoint
from src.detection.evaluation.predictions import evaluate_predictions

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
    result = evaluate_checkpoint(EvalConfig(config=str(data), source=ModelSource(model=str(run / "best_model.pth")),
                                            metric="coco", runtime=RuntimeOptions(device="cpu", workers=0)))
    for key in ("map", "map50", "map75"):
        assert getattr(result, key) == pytest.approx(best[key], rel=0, abs=1e-12), key

    images = FORMATS["voc"].split_layout(data.parent, "train")[0]  # the validation split of the fit config
    infer_images(image_config_from_args(build_image_parser().parse_args(
        ["-i", str(images), "--model", str(run / "best_model.pth"), "--threshold", "0.5", "--device", "cpu",
         "--batch", "8", "--no-save", "--out-dir", str(tmp_path / "inf")])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is not cut: no warning
        scored = evaluate_predictions(tmp_path / "inf" / "predictions.json", data, metric="coco")
    for key in ("map", "map50", "map75", "map_small", "mar_100"):
        assert getattr(scored, key) == pytest.approx(getattr(result, key), rel=0, abs=1e-9, nan_ok=True), key


# ------------------------------------------------------------------------------------------ COCO category ids
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
    import torch

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

    def even_odds(model) -> None:  # scores around 0.5 instead of the 0.01 prior: detections of both classes
        with torch.no_grad():
            cls_logits = model.head.classification_head.cls_logits  # separable: the bias is on its pointwise conv
            getattr(cls_logits, "pointwise", cls_logits).bias.zero_()

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
