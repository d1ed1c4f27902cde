"""What a run folder, TensorBoard, ``evaluate`` and the inference commands show besides the metrics: experiment
logs equal to results.csv, early stopping that leaves a resumable run, the confusion matrix and F1 curve of the
best epoch, the best threshold in the checkpoint (``--threshold auto``), prediction mosaics, the anchor-fit line,
and sliced inference from both inference commands.

One tiny RetinaNet run (module fixture) at learning rate 0: its metric never improves after epoch 1, so
``--patience 1`` stops it deterministically at epoch 2 of 4.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.detection.checkpoint import load_card, load_checkpoint
from src.detection.commands.evaluate import main as evaluate_main
from src.detection.commands.infer_image import main as image_main
from src.detection.commands.infer_video import main as video_main
from src.detection.commands.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from src.detection.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("shapes"), 24, 8, imgsz=96, seed=1)


@pytest.fixture(scope="module")
def stopped_run(shapes: Path, tmp_path_factory, tiny_train_args, one_thread) -> tuple[Path, str]:
    out_dir = tmp_path_factory.mktemp("runs")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = train_main(["--config", str(shapes), *tiny_train_args, "--head", "retinanet", "--lr", "0",
                           "--epochs", "4", "--patience", "1", "--device", "cpu", "--out-dir", str(out_dir),
                           "--name", "r"])
    assert code == 0, stdout.getvalue()[-2000:]
    return out_dir / "r", stdout.getvalue()


def results(run: Path) -> list[dict[str, float]]:
    with open(run / "results.csv") as f:
        return [{k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(f)]


def test_patience_stops_says_so_and_leaves_a_resumable_run(stopped_run):
    run, out = stopped_run
    assert [int(r["epoch"]) for r in results(run)] == [1, 2]
    line = next(ln for ln in out.splitlines() if ln.startswith("early stopping:"))
    assert "--patience 1" in line and f"--resume {run / 'last_model.pth'}" in line
    ckpt = load_checkpoint(run / "last_model.pth")
    assert ckpt["epoch"] == 2 and ckpt["early_stopping"]["bad"] == 1 and ckpt["early_stopping"]["best_step"] == 1


def test_run_folder_holds_confusion_matrix_f1_curve_mosaics_and_the_best_threshold(stopped_run, shapes: Path):
    run, out = stopped_run
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix_normalized.csv", "f1_curve.png",
                 "f1_curve.csv", "train_batch0.jpg", "val_pred_epoch_1.jpg", "val_pred_epoch_2.jpg"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    with Image.open(run / "val_pred_epoch_2.jpg") as im:  # 8 validation images: 4 rows of 2 (truth | predictions)
        assert im.format == "JPEG" and im.size == (4 * 324 + 4, 4 * 324 + 4)  # 320 px pictures, 4 px gaps
    # every non-difficult validation box is in a true-class row of the confusion matrix (found or missed)
    with open(run / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["circle", "square", "triangle", "background"]
    from src.detection.data.datasets import build_datasets, load_data_config

    _, valid = build_datasets(load_data_config(shapes), imgsz=(96, 96), augment="none", splits=("valid",))
    n_gt = sum(int((~valid.annotations(i)["difficult"]).sum()) for i in range(len(valid)))
    assert sum(int(v) for r in rows[1:4] for v in r[1:]) == n_gt
    # the best epoch's threshold is in best_model.pth's card, as results.csv and the final line say
    best = results(run)[0]
    card = load_card(load_checkpoint(run / "best_model.pth"))
    assert card.best_threshold == pytest.approx(best["best_threshold"])
    assert card.best_threshold_f1 == pytest.approx(best["best_f1"])
    if card.best_threshold_f1 > 0:
        assert f"best score threshold {card.best_threshold:.3f}" in out and "(inference: --threshold auto)" in out
    else:  # this run trains at --lr 0: nothing is found, and no threshold is recommended
        assert "best score threshold: none - no detection is correct" in out
        assert "--threshold auto has no threshold to use" in out
    assert "anchor fit: " in out and "matched by the default anchors" in out


def test_tensorboard_equals_results_csv_and_a_resume_appends_without_duplicates(stopped_run, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "r"
    shutil.copytree(stopped_run[0], run)
    # what a run killed after logging epoch 3 but before saving it leaves: an event the resume must drop
    with SummaryWriter(str(run / "tensorboard")) as w:
        w.add_scalar("train/train_loss", 999.0, 3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        # the restored early-stopping state (1 evaluation without improvement) stops it again after epoch 3
        assert train_main(["--resume", str(run / "last_model.pth"), "--epochs", "4", "--workers", "0"]) == 0
    assert "early stopping:" in out.getvalue()
    rows = results(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    logged = {t.split("/", 1)[1]: {e.step: e.value for e in acc.Scalars(t)}
              for t in tags["scalars"] if t.split("/")[0] in ("train", "time", "metrics")}
    assert {"train_loss", "loss_classification", "loss_bbox_regression", "lr", "map", "map50", "best_threshold"} \
        <= set(logged)
    for column, by_step in logged.items():
        steps = [e.step for e in acc.Scalars(next(t for t in tags["scalars"] if t.endswith("/" + column)))]
        assert sorted(steps) == sorted(set(steps)) == [1, 2, 3], column  # each epoch once, resumed epoch 3 too
        for r in rows:
            assert by_step[int(r["epoch"])] == pytest.approx(r[column], rel=1e-6, abs=1e-9), (column, r["epoch"])
    assert {"ap50/circle", "ap/square"} <= set(tags["scalars"])
    assert {"pr/circle", "pr/square", "pr/triangle"} <= set(tags["tensors"])
    assert [e.step for e in acc.Images("val/predictions")] == [1, 2, 3]
    assert [e.step for e in acc.Images("train/batch0")] == [0]


def test_evaluate_writes_the_confusion_matrix_and_f1_curve(stopped_run, shapes: Path, tmp_path: Path, run_main):
    run, _ = stopped_run
    out = run_main(evaluate_main, ["--model", run / "best_model.pth", "--config", shapes, "--workers", "0",
                                   "--device", "cpu", "--out-dir", tmp_path, "--name", "e"])
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "f1_curve.png", "f1_curve.csv", "per_class_ap.csv"):
        assert (tmp_path / "e" / name).is_file(), name
    # the same pass training ran: the threshold it finds is the one the checkpoint stores
    card = load_card(load_checkpoint(run / "best_model.pth"))
    found = f"best score threshold {card.best_threshold:.3f}" if card.best_threshold_f1 > 0 else \
        "best score threshold: none"
    assert found in out.stdout
    with open(run / "confusion_matrix.csv") as a, open(tmp_path / "e" / "confusion_matrix.csv") as b:
        assert a.read() == b.read()


def test_threshold_auto_uses_the_checkpoints_best_threshold(stopped_run, shapes: Path, tmp_path: Path, run_main,
                                                            make_tiny_checkpoint):
    import dataclasses

    run, _ = stopped_run
    images = shapes.parent / "valid" / "images"
    payload = torch.load(run / "best_model.pth", weights_only=True)
    card = load_card(payload)

    def with_card(name: str, **changes) -> Path:
        torch.save({**payload, "meta": dataclasses.replace(card, **changes).to_dict()}, tmp_path / name)
        return tmp_path / name

    found = with_card("found.pth", best_threshold=0.375, best_threshold_f1=0.5)
    out = run_main(image_main, ["--model", found, "-i", images, "--threshold", "auto", "--device", "cpu",
                                "--no-save", "--out-dir", tmp_path / "i"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["threshold"] == 0.375
    assert "--threshold auto: 0.375" in out.stdout and "(F1 0.500)" in out.stdout
    # a checkpoint that stores none, or one whose validation found nothing correct (F1 0): one line naming the fix
    plain = make_tiny_checkpoint(tmp_path / "plain.pth", ["__background__", "circle", "square", "triangle"])
    hopeless = with_card("hopeless.pth", best_threshold=0.0, best_threshold_f1=0.0)
    for model, needle in ((plain, "retrain"), (hopeless, "(F1 0), so it has no best threshold")):
        out = run_main(image_main, ["--model", model, "-i", images, "--threshold", "auto", "--device", "cpu",
                                    "--no-save", "--out-dir", tmp_path / "j"])
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert out.returncode == 2 and len(errors) == 1 and "pass a number" in errors[0] and needle in errors[0]


def test_slice_flags_run_both_inference_commands_on_tiles(stopped_run, shapes: Path, tmp_path: Path, run_main):
    run, _ = stopped_run
    frames = shapes.parent / "valid" / "images"
    common = ["--model", run / "best_model.pth", "-i", frames, "--device", "cpu", "--threshold", "0.3",
              "--slice", "64", "64", "--slice-overlap", "0.25"]
    out = run_main(image_main, [*common, "--slice-merge", "wbf", "--no-save", "--out-dir", tmp_path / "i"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sliced 64x64 tiles, overlap 0.25 + whole image, wbf merge" in out.stdout
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["images"] == 8
    out = run_main(video_main, [*common, "--no-slice-full", "--no-save", "--save-json", "--out-dir", tmp_path / "v"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sliced 64x64 tiles, overlap 0.25, nms merge" in out.stdout
    lines = (tmp_path / "v" / "images.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_slice_and_threshold_mistakes_are_one_line(stopped_run, shapes: Path, run_main, tmp_path: Path):
    run, _ = stopped_run
    base = ["--model", run / "best_model.pth", "-i", shapes.parent / "valid" / "images", "--no-save",
            "--out-dir", tmp_path]
    for extra, needle in ((["--slice", "8", "8"], "--slice 8 8"), (["--slice", "64", "64", "--slice-overlap", "1"],
                                                                   "--slice-overlap"),
                          (["--threshold", "high"], "--threshold")):
        out = run_main(image_main, [*base, *extra])
        errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
        assert out.returncode == 2 and len(errors) == 1 and needle in errors[0], (extra, out.stderr)


def test_card_records_the_threshold_and_old_cards_load_without_one(make_tiny_checkpoint, tmp_path: Path):
    import dataclasses

    path = make_tiny_checkpoint(tmp_path / "m.pth", ["__background__", "a"])
    payload = torch.load(path, weights_only=True)
    old = load_card(payload)
    assert old.best_threshold is None and "best_threshold" not in old.to_dict()  # stored as it always was
    new = dataclasses.replace(old, best_threshold=0.375, best_threshold_f1=0.5)
    again = load_card({**payload, "meta": new.to_dict()})
    assert (again.best_threshold, again.best_threshold_f1) == (0.375, 0.5)


def test_evaluator_group_feeds_every_evaluator_and_returns_the_primary_result():
    from src.detection.evaluation.confusion import ConfusionMatrix
    from src.detection.evaluation.evaluator import EvaluatorGroup
    from src.detection.evaluation.metrics import DetectionEvaluator

    classes = ["__background__", "a", "b"]
    group = EvaluatorGroup(DetectionEvaluator(classes, metric="voc07"), ConfusionMatrix(classes, score_thresh=0.5))
    group.reset()
    pred = {"boxes": torch.tensor([[0, 0, 10, 10.], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 2])}
    gt = {"boxes": torch.tensor([[0, 0, 10, 10.], [50, 50, 60, 60]]), "labels": torch.tensor([1, 1])}
    group.process([pred], [gt])
    result = group.evaluate()
    assert result is group.results[0] and result.voc07 == pytest.approx(6 / 11)  # recall 1/2 at precision 1
    # a found, a missed, a false b
    assert group.results[1].tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
