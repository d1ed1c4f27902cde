"""Two-process DDP training on CPU (gloo), with images and with the feature cache on an uneven dataset."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model-name", "dinov3_convnext_atto", "--head", "fcos", "--fpn-channels", "64", "--imgsz", "64",
        "--batch", "8", "--workers", "0", "--lr", "2e-3", "--warmup-epochs", "0.3", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """17 training images: 2 ranks x batch 8 -> shards of 9 and 8, i.e. 2 and 1 steps unless padded."""
    from src.detection.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("uneven"), 17, 6, imgsz=64, seed=1)


def torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "train_detection.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows(run: Path) -> list[dict[str, float]]:
    with open(run / "results.csv") as f:
        return [{k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["images", "feature-cache"])
def test_ddp_gloo_two_processes_on_an_uneven_dataset(uneven: Path, tmp_path: Path, cache: bool):
    extra = ["--cache-features", "ram"] if cache else []
    out = torchrun(["--config", str(uneven), *TINY, "--epochs", "2", *extra, "--out-dir", str(tmp_path),
                    "--name", "ddp"], port=29517 + cache)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "best_model.pth").exists() and len(rows(run)) == 2
    assert out.stdout.count("total parameters.") == 1  # rank-0 logging only
    assert all(not math.isnan(r["map"]) and math.isfinite(r["train_loss"]) for r in rows(run))
    if cache:
        assert "feature cache (ram): 9 training images" in out.stdout  # rank 0's padded shard
