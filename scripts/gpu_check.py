"""Targeted GPU check (validation run): training rows at batch 8 and 32 and the GPU inference rows, without the
long rows (16,551-image epoch, demo) of ``python -m benchmarks.run_all --device cuda``."""
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import bench_infer, bench_train
from benchmarks.common import markdown_table

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
dev = torch.device("cuda")
s = bench_train.settings(False, "cuda")
rows = []
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    config = bench_train.make_data(root, max(s["n_images"], s["epoch_images"]), s["imgsz"])
    rows += bench_train.training_rows(s, config, dev)
    rows += bench_train.cache_rows(s, config, dev, root)
    print(markdown_table(rows), flush=True)
rows += bench_infer.run(quick=False, device="cuda", only="gpu") if "only" in bench_infer.run.__code__.co_varnames else []
text = markdown_table(rows)
print(text)
(out / "gpu_check.md").write_text(text)
