"""One training epoch of VOC07+12 trainval's size (16,551 images, 640 px, batch 32) through ``train_detection.py``
itself, data loading included: ``bench_train.full_epoch_row`` (goal <= 45 s on an H200 machine; the reference on
an RTX 3080: 345 s). GPU only: on a 2-core CPU such an epoch takes hours.

    python -m benchmarks.bench_epoch [--device cuda]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_train import full_epoch_row, log
from benchmarks.common import bench_main


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    if not device.startswith("cuda"):
        log("the 16,551-image epoch runs on CUDA only")
        return []
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
        return [full_epoch_row(Path(tmp), torch.device(device), n_images=2_048 if quick else 16_551)]


def main() -> None:
    bench_main(run, __doc__, "2,048 images instead of 16,551", device="cuda", device_help="cuda[:N]")


if __name__ == "__main__":
    main()
