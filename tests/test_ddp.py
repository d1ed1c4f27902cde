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


def _check_shard(rank: int, world: int, paths: list[str], init: str, out: str) -> None:
    """One process of the sharded decode check: record what this rank decoded and what it was told is broken."""
    import json

    import torch.distributed as dist

    from src.detection.data import image_io
    from src.detection.engine import training

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    decoded: list[str] = []
    real = image_io.read_image

    def spy(path, *a, **k):
        decoded.append(str(path))
        return real(path, *a, **k)

    image_io.read_image = spy
    try:
        bad = training.sharded_undecodable(rank, world)([Path(p) for p in paths], show=False)
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps({"decoded": decoded, "bad": [[str(p), r] for p, r in bad]}))


def test_every_rank_learns_every_undecodable_image_after_decoding_its_share(tmp_path: Path):
    """Distributed training decodes each image once in all (rank r every world-th one), and every rank ends up with
    the whole list of broken files, in dataset order, as one process checking all of them finds it."""
    import json

    import numpy as np
    import torch.multiprocessing as mp
    from PIL import Image

    from src.detection.data.image_io import undecodable_images

    paths = []
    for i in range(7):
        path = tmp_path / f"im{i}.jpg"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
        if i in (1, 4, 5):  # broken ones on both ranks' shares
            path.write_bytes(path.read_bytes()[:20])
        paths.append(str(path))
    expected = [[str(p), r] for p, r in undecodable_images([Path(p) for p in paths], show=False)]
    assert [p for p, _ in expected] == [paths[i] for i in (1, 4, 5)]
    mp.spawn(_check_shard, args=(2, paths, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    runs = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [sorted(r["decoded"]) for r in runs] == [sorted(paths[0::2]), sorted(paths[1::2])]
    assert runs[0]["bad"] == runs[1]["bad"] == expected
