"""Experiment loggers: TensorBoard values read back with tensorboard's own reader, resume without duplicate steps,
optional backends, rank 0 only."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.detection.core.errors import UserError
from src.detection.engine import loggers
from src.detection.engine.loggers import build_loggers, parse_loggers


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _values(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_images_pr_curves(tmp_path):
    rows = [{"train/loss": 1.0 / (e + 1), "metrics/mAP50": 0.1 * e, "lr": 1e-4, "metrics/mAP": ""} for e in range(4)]
    lg = build_loggers(["tensorboard"], tmp_path)
    for e, row in enumerate(rows):
        lg.log_scalars(e, row)
    lg.log_image("val/predictions", np.full((8, 12, 3), 200, np.uint8), 3)
    lg.log_pr_curve("pr/cat", np.linspace(0.01, 0.8, 500), np.linspace(1, 0.5, 500), 3)
    lg.close()
    acc = _read(tmp_path / "tensorboard")
    for key in ("train/loss", "metrics/mAP50", "lr"):
        got = _values(acc, key)
        assert [s for s, _ in got] == [0, 1, 2, 3]
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in rows], rtol=1e-6)
    assert "metrics/mAP" not in acc.Tags()["scalars"]  # an empty value (no evaluation) is not a point
    img = acc.Images("val/predictions")[0]
    assert (img.step, img.width, img.height) == (3, 12, 8)
    assert "pr/cat" in acc.Tags()["tensors"]
    pr = acc.Tensors("pr/cat")[0]
    assert pr.step == 3 and pr.tensor_proto.tensor_shape.dim[1].size == loggers.PR_POINTS


def test_resume_appends_without_duplicate_steps(tmp_path):
    lg = build_loggers("tensorboard", tmp_path)
    for e in range(5):  # epochs 3 and 4 were logged, but the last checkpoint is from epoch 2
        lg.log_scalars(e, {"train/loss": float(e)})
    lg.close()
    lg = build_loggers("tensorboard", tmp_path, resume_step=3)
    for e in range(3, 6):
        lg.log_scalars(e, {"train/loss": 10.0 + e})
    lg.close()
    got = _values(_read(tmp_path / "tensorboard"), "train/loss")
    assert got == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_parse_and_missing_packages(tmp_path, monkeypatch):
    assert parse_loggers(None) == ("csv", "tensorboard")
    assert parse_loggers(["tensorboard,wandb", "csv"]) == ("csv", "tensorboard", "wandb")
    assert parse_loggers("csv") == ("csv",)
    with pytest.raises(UserError, match="--logger 'neptune'"):
        parse_loggers("neptune")
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
        with pytest.raises(UserError, match=f"needs the {name} package: pip install {name}"):
            build_loggers(name, tmp_path)
    lg = build_loggers("csv", tmp_path)  # results.csv is training's own: nothing to do here
    lg.log_scalars(0, {"a": 1.0})
    lg.close()
    assert not any(tmp_path.iterdir())


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(loggers, "is_main_process", lambda: False)
    lg = build_loggers(["tensorboard"], tmp_path)
    lg.log_scalars(0, {"a": 1.0})
    lg.close()
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = build_loggers("wandb", tmp_path)
    lg.log_scalars(0, {"a": 1.0})
    lg.close()
    assert (tmp_path / "wandb_id.txt").is_file()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_file_store_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lg = build_loggers("mlflow", tmp_path)
    for e in range(3):
        lg.log_scalars(e, {"loss": float(e)})
    lg.close()
    lg = build_loggers("mlflow", tmp_path, resume_step=2)
    for e in range(2, 4):
        lg.log_scalars(e, {"loss": 10.0 + e})
    lg.close()
    import mlflow

    run_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")]
    assert sorted(steps) == [0, 1, 2, 3]
