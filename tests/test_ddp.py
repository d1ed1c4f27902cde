"""Two-process DDP training on CPU (gloo), with images and with the feature cache on an uneven dataset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """17 training images: 2 ranks x batch 8 -> shards of 9 and 8, i.e. 2 and 1 steps unless padded."""
    from src.detection.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("uneven"), 17, 6, imgsz=64, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["images", "feature-cache"])
def test_ddp_gloo_two_processes_on_an_uneven_dataset(uneven: Path, tmp_path: Path, cache: bool, run_script,
                                                     tiny_train_args, read_results):
    extra = ["--cache-features", "ram"] if cache else []
    out = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29517 + cache),
                     "train_detection.py", "--config", str(uneven), *tiny_train_args, "--imgsz", "64", "--device",
                     "cpu", "--epochs", "2", *extra, "--out-dir", str(tmp_path), "--name", "ddp", timeout=420)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "best_model.pth").exists() and len(read_results(run)) == 2
    assert out.stdout.count("total parameters.") == 1  # rank-0 logging only
    assert all(not math.isnan(r["map"]) and math.isfinite(r["train_loss"]) for r in read_results(run))
    if cache:
        assert "feature cache (ram): 9 training images" in out.stdout  # rank 0's padded shard
