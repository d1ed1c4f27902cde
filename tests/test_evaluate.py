"""The standalone evaluation entry: scoring a saved predictions JSON against a dataset without a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from src.detection.datasets import load_data_config, load_ground_truth
from src.detection.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]


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


def run_evaluate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.detection.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_perfect_predictions_score_one_and_missing_boxes_lower_recall(dataset: Path, tmp_path: Path):
    gts = load_ground_truth(load_data_config(dataset), split="valid")
    assert sum(len(g["boxes"]) for g in gts.values()) > 10
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(predictions_from_ground_truth(gts)))
    out = run_evaluate(["--predictions", str(perfect), "--config", str(dataset), "--out-dir", str(tmp_path),
                        "--name", "p"])
    assert out.returncode == 0, out.stderr
    all_row = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("all")][0]
    assert all(float(v) == pytest.approx(1.0) for v in all_row[2:])  # AP50, AP, VOC07, VOC12
    assert (tmp_path / "p" / "per_class_ap.csv").is_file() and (tmp_path / "p" / "pr_curves.png").is_file()

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(predictions_from_ground_truth(gts, drop_every=3)))
    out = run_evaluate(["--predictions", str(partial), "--config", str(dataset), "--out-dir", str(tmp_path),
                        "--name", "q", "--metric", "coco"])
    assert out.returncode == 0, out.stderr
    ap50 = float([ln.split() for ln in out.stdout.splitlines() if ln.startswith("all")][0][2])
    assert 0.4 < ap50 < 0.9


def test_bad_predictions_file_is_one_line(dataset: Path, tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args in (["--predictions", str(bad)], ["--predictions", str(tmp_path / "missing.json")],
                 ["--model", str(tmp_path / "missing.pth")]):
        out = run_evaluate([*args, "--config", str(dataset), "--out-dir", str(tmp_path)])
        assert out.returncode == 2 and "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and args[1].split("/")[-1] in lines[0]
        assert not any(tmp_path.glob("eval_*")), "a failed evaluation must not leave a run folder"
