"""Cost of experiment logging: epoch wall time of a tiny training run with ``--logger csv`` vs ``--logger csv
tensorboard``.

    python -m benchmarks.bench_logging [--quick] [--device cpu|cuda]

Both sides run ``engine.training.run`` on the same synthetic set (``src.detection.data.synthetic``), model
(``dinov3_convnext_atto``, random weights, FCOS, 64 FPN channels), seed and settings, evaluating every epoch, runs
interleaved (csv, csv+tensorboard, csv, ...). An epoch's wall time is the time between two epoch-end lines: training,
evaluation, checkpoints, results.csv, plots, the validation mosaic and - on the TensorBoard side - every scalar,
per-class AP, PR curve and the mosaic image written to the event file. Epoch 1 (start-up, first writer) is left out.
The goal: logging adds at most 2 % (ratio csv / csv+tensorboard >= 0.98).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import bench_main, make_row

GOAL = 0.98  # epoch time with csv only / with csv + tensorboard: logging costs at most 2 %


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"train": 32, "valid": 16, "imgsz": 96, "epochs": 3, "reps": 2}
    return {"train": 128, "valid": 32, "imgsz": 160, "epochs": 4, "reps": 4}


def epoch_walls(config: Path, out_dir: Path, loggers: list[str], s: dict[str, Any], device: str
                ) -> tuple[list[float], list[float]]:
    """Wall seconds of epochs 2.. of one training run with ``loggers``, and of their ``log_epoch`` calls (what
    the loggers and the validation mosaic cost)."""
    from src.detection.engine import training
    from src.detection.engine.config import TrainConfig

    stamps: list[float] = []
    logging: list[float] = []
    summary, log_epoch = training.epoch_summary, training.log_epoch

    def stamped(*args: Any, **kwargs: Any) -> str:  # called once per epoch, after everything the epoch writes
        stamps.append(time.perf_counter())
        return summary(*args, **kwargs)

    def timed(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        log_epoch(*args, **kwargs)
        logging.append(time.perf_counter() - t0)

    cfg = TrainConfig.from_dict({
        "config": str(config), "model_name": "dinov3_convnext_atto", "head": "fcos", "fpn_channels": 64,
        "imgsz": [s["imgsz"], s["imgsz"]], "batch": 8, "workers": 0, "device": device, "epochs": s["epochs"],
        "lr": 2e-3, "warmup_epochs": 0.3, "seed": 0, "logger": loggers, "out_dir": str(out_dir),
        "name": "_".join(loggers), "exist_ok": True})
    training.epoch_summary, training.log_epoch = stamped, timed
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random backbone weights: intended
            training.run(cfg)
    finally:
        training.epoch_summary, training.log_epoch = summary, log_epoch
    return [b - a for a, b in zip(stamps, stamps[1:])], logging[1:]


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    import torch

    from src.detection.data.synthetic import generate_dataset

    s = settings(quick)
    torch_threads = torch.get_num_threads()
    plain: list[float] = []
    logged: list[float] = []
    log_s: dict[str, list[float]] = {"csv": [], "tensorboard": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            config = generate_dataset(root / "shapes", s["train"], s["valid"], imgsz=s["imgsz"], seed=0)
        sides = (["csv"], ["csv", "tensorboard"])
        for rep in range(s["reps"]):  # interleaved, the order alternating: both see the same machine load
            for loggers in sides if rep % 2 == 0 else sides[::-1]:
                walls, logs = epoch_walls(config, root / f"rep{rep}", loggers, s, device)
                (logged if "tensorboard" in loggers else plain).extend(walls)
                log_s[loggers[-1]].extend(logs)
    torch.set_num_threads(torch_threads)
    note = (f"{s['train']} train / {s['valid']} valid synthetic images at {s['imgsz']} px, FCOS on "
            f"dinov3_convnext_atto, batch 8, evaluation every epoch; epochs 2-{s['epochs']} of {s['reps']} runs each; "
            f"per-epoch logging calls (median): {1e3 * statistics.median(log_s['csv']):.0f} ms csv (the validation "
            f"mosaic), {1e3 * statistics.median(log_s['tensorboard']):.0f} ms with TensorBoard")
    return [make_row(f"epoch time --logger csv vs csv tensorboard ({torch.device(device).type})", plain, logged,
                     GOAL, "s", higher_is_better=False, note=note)]


def main() -> None:
    bench_main(run, __doc__, "fewer, smaller images and runs", device="cpu", device_help="cpu | cuda")


if __name__ == "__main__":
    main()
