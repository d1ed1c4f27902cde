"""Experiment loggers behind one small interface: ``--logger csv|tensorboard|wandb|mlflow`` (several allowed).

    logger = build_loggers(["csv", "tensorboard"], run_dir, resume_step=start_epoch)
    logger.log_scalars(epoch, {"train/loss": 0.52, "metrics/mAP50": 0.61, "lr": 1e-4})
    logger.log_image("val/predictions", mosaic_hwc_uint8, epoch)
    logger.log_pr_curve("pr/cat", recall, precision, epoch)
    logger.close()

``csv`` is the run's ``results.csv``, which training writes itself: its backend does nothing here. TensorBoard
(``torch.utils.tensorboard``) writes to ``<run>/tensorboard``; W&B and MLflow are imported only when asked for
(a missing package is one error line naming it) and run offline by default (``WANDB_MODE=offline`` unless set;
MLflow's file store ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set). Only rank 0 logs under DDP (the others
get a logger that does nothing). A resumed run (``resume_step``: the first step it will log again) continues the
same logs: TensorBoard purges events from that step on, W&B and MLflow reopen the run whose id is stored in the run
folder and skip steps they already hold, so no step is logged twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.io import write_text_atomic

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
DEFAULT_LOGGERS = ("csv", "tensorboard")
PR_POINTS = 101  # TensorBoard's PR plugin keeps a fixed number of thresholds per curve


def parse_loggers(values: str | Iterable[str] | None) -> tuple[str, ...]:
    """``--logger`` values (repeated or comma-separated) -> the backends, csv always first; UserError for others."""
    if values is None:
        return DEFAULT_LOGGERS
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip().lower() for v in items for n in str(v).split(",") if n.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise UserError(f"--logger {bad[0]!r} is not valid; choose from {', '.join(LOGGERS)} (several allowed)")
    return tuple(dict.fromkeys(["csv", *names]))


def is_main_process() -> bool:
    """Rank 0 (or no DDP); imported when called: the parsers import this module's names without torch."""
    from ..core.runtime import is_main_process as main

    return main()


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """Numbers only: None / '' / non-numeric entries are left out (an epoch without evaluation)."""
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _check_image(image: Any) -> np.ndarray:
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"log_image expects an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    return arr


class ExperimentLogger:
    """The interface; this base class does nothing (csv backend, ranks other than 0)."""

    name = "none"

    def log_scalars(self, step: int, values: dict[str, Any]) -> None:
        """Log every number in ``values`` (``{"group/name": value}``) at ``step`` (the epoch)."""

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Log an ``HxWx3`` uint8 RGB image (numpy or tensor)."""

    def log_pr_curve(self, tag: str, recall: Sequence[float], precision: Sequence[float], step: int) -> None:
        """Log a precision-recall curve (points in descending score order, as ``EvalResult.pr_curves`` holds)."""

    def close(self) -> None:
        """Flush and release files / runs."""


class TensorBoardLogger(ExperimentLogger):
    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.log_dir = Path(log_dir)
        # purge_step: events at and after it (from an interrupted run) are dropped, so nothing is logged twice
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step)

    def log_scalars(self, step, values):
        for k, v in _scalars(values).items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, tag, image, step):
        # JPEG, not add_image's PNG: a 1300 px mosaic of photos encodes ~20x faster and is ~5x smaller (the image
        # plugin serves any encoding it recognises)
        import io

        from PIL import Image
        from torch.utils.tensorboard.summary import Summary

        arr = _check_image(image)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=90)
        encoded = Summary.Image(height=arr.shape[0], width=arr.shape[1], colorspace=3,
                                encoded_image_string=buf.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)

    def log_pr_curve(self, tag, recall, precision, step):
        r, p = _resample(recall, precision)
        zeros = np.zeros(len(r))  # the plugin draws precision over recall; counts are not known here
        self.writer.add_pr_curve_raw(tag, zeros, zeros, zeros, zeros, p, r, step, num_thresholds=len(r))

    def close(self):
        self.writer.flush()
        self.writer.close()


def _resample(recall: Sequence[float], precision: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """At most ``PR_POINTS`` points, ordered by descending recall as the PR plugin expects (threshold order)."""
    r, p = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if len(r) > PR_POINTS:
        idx = np.unique(np.linspace(0, len(r) - 1, PR_POINTS).round().astype(int))
        r, p = r[idx], p[idx]
    if not len(r):
        r, p = np.zeros(1), np.zeros(1)
    return r[::-1].copy(), p[::-1].copy()


class _StepGuard:
    """For services that cannot purge (W&B, MLflow): the last step a resumed run already holds."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.last = int(path.read_text()) if resume and path.is_file() else -1

    def fresh(self, step: int) -> bool:
        return step > self.last

    def done(self, step: int) -> None:
        if step > self.last:
            self.last = step
            write_text_atomic(self.path, str(step))


class WandbLogger(ExperimentLogger):
    name = "wandb"

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any] | None, resume: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("--logger wandb needs the wandb package: pip install wandb (or drop --logger wandb)") from None
        self.wandb = wandb
        os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; `wandb sync` uploads later
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else wandb.util.generate_id()
        write_text_atomic(id_file, run_id)
        self.guard = _StepGuard(run_dir / "wandb_last_step.txt", resume)
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), id=run_id, resume="allow",
                              config=config or {}, reinit=True)

    def log_scalars(self, step, values):
        if self.guard.fresh(step):
            self.run.log(_scalars(values), step=step)
            self.guard.done(step)

    def log_image(self, tag, image, step):
        if self.guard.fresh(step):
            self.run.log({tag: self.wandb.Image(_check_image(image))}, step=step)

    def log_pr_curve(self, tag, recall, precision, step):
        if self.guard.fresh(step):
            r, p = _resample(recall, precision)
            table = self.wandb.Table(data=[[float(a), float(b)] for a, b in zip(r, p)], columns=["recall", "precision"])
            self.run.log({tag: self.wandb.plot.line(table, "recall", "precision", title=tag)}, step=step)

    def close(self):
        self.run.finish()


class MlflowLogger(ExperimentLogger):
    name = "mlflow"

    def __init__(self, run_dir: Path, experiment: str, config: dict[str, Any] | None, resume: bool) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError("--logger mlflow needs the mlflow package: pip install mlflow (or drop --logger mlflow)") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(experiment)
        id_file = run_dir / "mlflow_run_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=run_dir.name)
        write_text_atomic(id_file, self.run.info.run_id)
        self.guard = _StepGuard(run_dir / "mlflow_last_step.txt", resume)
        if config and run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log_scalars(self, step, values):
        if self.guard.fresh(step):
            self.mlflow.log_metrics({k.replace("@", "_"): v for k, v in _scalars(values).items() if math.isfinite(v)},
                                    step=step)
            self.guard.done(step)

    def log_image(self, tag, image, step):
        if self.guard.fresh(step):
            self.mlflow.log_image(_check_image(image), artifact_file=f"{tag}/step_{step:04d}.png")

    def log_pr_curve(self, tag, recall, precision, step):
        if self.guard.fresh(step):
            r, p = _resample(recall, precision)
            self.mlflow.log_dict({"recall": r.tolist(), "precision": p.tolist()}, f"{tag}/step_{step:04d}.json")

    def close(self):
        self.mlflow.end_run()


class LoggerGroup(ExperimentLogger):
    """Every call goes to each backend."""

    name = "group"

    def __init__(self, loggers: Sequence[ExperimentLogger]) -> None:
        self.loggers = list(loggers)

    def log_scalars(self, step, values):
        for lg in self.loggers:
            lg.log_scalars(step, values)

    def log_image(self, tag, image, step):
        for lg in self.loggers:
            lg.log_image(tag, image, step)

    def log_pr_curve(self, tag, recall, precision, step):
        for lg in self.loggers:
            lg.log_pr_curve(tag, recall, precision, step)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_loggers(names: str | Iterable[str] | None, run_dir: str | os.PathLike, *, resume_step: int | None = None,
                  config: dict[str, Any] | None = None, project: str = "dinov3-detection") -> ExperimentLogger:
    """The loggers ``names`` (``parse_loggers``) for the run folder ``run_dir``, on rank 0 (elsewhere: one that
    does nothing). ``resume_step``: the first step a resumed run logs (None: a new run); ``config``: the run's
    options (``TrainConfig.to_dict()``), recorded by W&B and MLflow; ``project``: their project / experiment."""
    chosen = parse_loggers(names)
    if not is_main_process():
        return ExperimentLogger()
    run = Path(run_dir)
    resume = resume_step is not None
    backends: list[ExperimentLogger] = []
    for name in chosen:
        if name == "tensorboard":
            backends.append(TensorBoardLogger(run / "tensorboard", resume_step))
        elif name == "wandb":
            backends.append(WandbLogger(run, project, config, resume))
        elif name == "mlflow":
            backends.append(MlflowLogger(run, project, config, resume))
    return LoggerGroup(backends)
