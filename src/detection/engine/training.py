"""A training run described by a ``TrainConfig``: set-up, epoch loop, checkpoints, logs, plots; and ``--eval-only``.

``run(cfg, typed)`` is the body of ``train_detection.py``; ``typed`` (the options typed on the command line)
matters for ``--resume``, which keeps the run's saved configuration except the ``RESUME_OVERRIDABLE`` options
typed now, and for ``--eval-only``, which hands the model options the user gave to the evaluation.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import (
    build_payload,
    check_state_dict,
    describe_weights_source,
    frozen_backbone_keys,
    load_checkpoint,
    model_meta,
    save_checkpoint,
    set_rng_state,
    training_options,
)
from ..checkpoint.source import ModelSource
from ..core.errors import UserError
from ..core.io import atomic_write
from ..core.paths import resolve_path
from ..core.runtime import amp_settings, seed_everything, setup_distributed, unwrap
from ..data.datasets import (
    build_dataloader,
    build_datasets,
    drop_undecodable,
    load_data_config,
    save_transformed_samples,
)
from ..data.device_resize import deferred_view
from ..data.image_io import undecodable_images
from ..data.sampling import EpochSampler, EpochSeededDataset, ShardSampler, padded_shard
from ..evaluation.metrics import EvalResult
from ..evaluation.mosaic import batch_mosaic, prediction_mosaic, sample_ids, save_jpg
from ..evaluation.report import format_table, plot_training_curves, save_results
from ..modeling.anchor_fit import ANCHOR_HEADS, dataset_input_boxes, fit_config
from ..modeling.builder import build_detector
from ..modeling.detector import count_parameters
from .config import RESUME_OVERRIDABLE, TrainConfig, resume_config
from .early_stopping import EarlyStopping
from .evaluation import EvalConfig, EvalReport, ReportingEvaluator, evaluate_checkpoint
from .feature_cache import CachedBatches, FeatureCache, collate_cached
from .loggers import ExperimentLogger, build_loggers
from .loop import (
    GraphedTrainStep,
    ModelEMA,
    NonFiniteGuard,
    build_optimizer,
    build_scheduler,
    evaluate,
    place_model,
    train_one_epoch,
)

CSV_FIELDS = ["epoch", "train_loss", "map", "map50", "map75", "lr", "seconds", "eval_seconds", "skipped_steps"]
VAL_SAMPLES = 8  # validation images drawn with their predictions at every evaluation
ANCHOR_FIT_MAX_BOXES = 20_000  # the anchor-fit line at the start estimates on a sample of this many boxes


# ----------------------------------------------------------------------------------------------- set-up helpers
def find_resume_checkpoint(cfg: TrainConfig) -> Path:
    """The last_model.pth ``--resume`` continues: the path given, that of ``--name``, or the newest run's."""
    parent = cfg.output.parent()
    runs = sorted((p for p in parent.glob("*/last_model.pth")), key=lambda p: p.stat().st_mtime)
    resumable = ", ".join(p.parent.name for p in runs[-5:]) if runs else "none"
    if cfg.resume != "auto":
        path = resolve_path(cfg.resume)
        if not path.exists():
            raise UserError(f"--resume {cfg.resume}: no such file; pass a run's last_model.pth (runs with one under "
                            f"{parent}: {resumable})")
        return path
    if cfg.output.name:
        path = parent / cfg.output.name / "last_model.pth"
        if not path.is_file():
            raise UserError(f"--resume --name {cfg.output.name}: no run folder {path.parent} with a last_model.pth; "
                            f"runs that can resume under {parent} (--out-dir): {resumable}")
        return path
    if not runs:
        raise UserError(f"--resume: no last_model.pth found under {parent}; pass the checkpoint path, "
                        f"e.g. --resume outputs/img_det/run_1/last_model.pth")
    return runs[-1]


def saved_config(ckpt: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a training checkpoint was written with (older formats: ``checkpoint.training_options``)."""
    stored = training_options(ckpt, known=TrainConfig().to_dict().keys())
    if not stored:
        raise UserError(f"--resume: {ckpt['path']} holds no training state (written by inference tools?); "
                        f"resume from a last_model.pth of a training run")
    return TrainConfig.from_dict(stored, source=ckpt["path"])


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(CSV_FIELDS) + sorted({k for r in rows for k in r if k not in CSV_FIELDS})
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: str | None) -> int | float:
    """A results.csv cell as written: integers (epoch, skipped steps) stay integers, so a resumed run rewrites them
    as they were; an empty cell is NaN."""
    if value in ("", None):
        return math.nan
    try:
        return int(value)
    except ValueError:
        return float(value)


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def sharded_undecodable(rank: int, world: int) -> Callable[..., list[tuple[Path, str]]]:
    """``undecodable_images`` with the decoding shared between the ``world`` processes of a distributed run (each
    decodes every ``world``-th image, then all learn the whole list): the same answer on every rank, 1/world of
    the start-up decoding each, where every rank decoding every image would compete for the same CPU cores."""
    def find(paths: Sequence[Path], desc: str = "decoding images", show: bool = True) -> list[tuple[Path, str]]:
        mine = undecodable_images(list(paths)[rank::world], desc=desc, show=show)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, [(str(p), reason) for p, reason in mine])
        reasons = {p: reason for part in parts for p, reason in part}
        return [(Path(p), reasons[str(p)]) for p in paths if str(p) in reasons]  # in the order given

    return find


def data_loaders(cfg: TrainConfig, data_cfg, spec, rank: int, world: int, device: torch.device | None = None):
    """Training loader (epoch-seeded, padded shards) and validation loader (sharded, no padding), both resizing
    as input spec ``spec`` (the model's ``input_spec``) says: on ``device`` with ``--resize-on-device`` (default: on
    a GPU), the loader workers then only decode (``data.device_resize``). The returned datasets resize in the
    loader (pictures, anchor fit, feature cache)."""
    batch, workers = cfg.runtime.batch, cfg.runtime.workers
    train_ds, valid_ds = build_datasets(data_cfg, imgsz=spec.imgsz, augment=cfg.augment, letterbox=spec.letterbox,
                                        include_difficult=cfg.include_difficult,
                                        ignore_unknown_classes=cfg.ignore_unknown_classes or None,
                                        skip_bad_samples=cfg.skip_bad_samples or None, verbose=rank == 0)
    # every image decoded now (threads), before the run folder exists: a truncated file stops the start, not epoch 1
    skip = bool(cfg.skip_bad_samples or data_cfg.skip_bad_samples)
    find = sharded_undecodable(rank, world) if world > 1 else undecodable_images
    for ds in (train_ds, valid_ds):
        drop_undecodable(ds, skip, progress=rank == 0, verbose=rank == 0, find=find)
        if len(ds) == 0:
            raise UserError(f"{ds.name}: no image could be decoded; check the image files")
    live_train, live_valid = train_ds, valid_ds
    on_device = cfg.resize_on_device if cfg.resize_on_device is not None else (
        device is not None and device.type == "cuda")
    if on_device and not cfg.cache_features:  # a cache replaces these loaders with its own
        live_train, live_valid = deferred_view(train_ds), deferred_view(valid_ds)
        if live_train is None:
            if cfg.resize_on_device:
                raise UserError(f"--resize-on-device: --augment {cfg.augment} rescales and crops the resized image, "
                                f"which the loader does; drop --resize-on-device or use --augment none/flip/ssd")
            live_train = train_ds
        if rank == 0:
            print(f"data: images resized on {device or 'the device'} in batches; loader workers decode"
                  + ("" if live_train is not train_ds else " and resize training images (--augment strong)"))
    train_sampler = EpochSampler(len(train_ds), seed=cfg.seed, shuffle=True, rank=rank, world_size=world)
    train_loader = build_dataloader(EpochSeededDataset(live_train, cfg.seed), batch, workers, sampler=train_sampler)
    valid_loader = build_dataloader(live_valid, batch, workers, sampler=ShardSampler(len(valid_ds), rank, world))
    return train_ds, valid_ds, train_loader, train_sampler, valid_loader


def _given_options(cfg: TrainConfig, typed: frozenset[str] | set[str] | None) -> set[str]:
    """The options the user gave: typed on the command line, or set to other than the default (by ``--cfg`` or an
    API caller)."""
    default = TrainConfig()
    return set(typed or ()) | {k for k, v in cfg.options().items() if v != default.get(k)}


def eval_only_config(cfg: TrainConfig, typed: frozenset[str] | set[str] | None = None) -> EvalConfig:
    """What ``--eval-only --model ckpt`` evaluates: the model-source options the user gave (the rest is the
    checkpoint's own) with the run's runtime options; the evaluation score threshold only when given."""
    if not cfg.model:
        raise UserError("--eval-only needs --model <checkpoint.pth>")
    given = _given_options(cfg, typed)
    claims = {k: cfg.get(k) for k in ("model_name", "head", "feature_extractor", "weights", "imgsz", "backbone_impl",
                                      "arch_overrides") if k in given}
    # an untyped --config is the run's own dataset (recorded in the checkpoint), not the parser's default
    return EvalConfig(config=cfg.config if "config" in given else None,
                      source=ModelSource(model=cfg.model, **claims), metric=cfg.metric, runtime=cfg.runtime, score_thresh=cfg.get("score_thresh") if "score_thresh" in given else None)


def eval_only(cfg: TrainConfig, typed: frozenset[str] | set[str] | None = None) -> EvalResult:
    """``--eval-only --model ckpt``: score a checkpoint on the validation split of ``--config`` (default: the dataset
    the checkpoint was trained on) and print it."""
    result = evaluate_checkpoint(eval_only_config(cfg, typed))
    print(format_table(result))
    return result


def compile_for_training(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile`` of the module the training step calls (the DDP wrapper under DDP). The returned module
    must be the one called: compiling a copy or assigning a compiled forward elsewhere compiles nothing."""
    return torch.compile(model, backend=backend)


def configure_trainable(model: nn.Module, cfg: TrainConfig, verbose: bool) -> None:
    """Apply ``--unfreeze-last`` and report what trains."""
    dino = unwrap(model).dino
    if cfg.unfreeze_last:
        dino.set_trainable(cfg.unfreeze_last)
    if verbose:
        trained = sum(p.numel() for p in dino.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in dino.parameters() if not p.requires_grad)
        total, trainable = count_parameters(model)
        what = ("frozen" if not trained else "fully trained" if not frozen
                else f"last {cfg.unfreeze_last} of {dino.num_layers} layers trained")
        print(f"backbone {what} ({describe_weights_source(dino.weights_source)}): {trained:,} trainable / "
              f"{frozen:,} frozen parameters; {trainable - trained:,} trainable in neck + head")


# ----------------------------------------------------------------------------------------------- main entry
def run(cfg: TrainConfig, typed: frozenset[str] | set[str] | None = None) -> Path | None:
    """Train (or ``--eval-only``) as ``cfg`` describes; ``typed``: the options typed on the command line (resume).

    Returns the run folder on rank 0.
    """
    if cfg.eval_only:
        eval_only(cfg, typed)
        return None
    main = int(os.environ.get("RANK", "0")) == 0
    resume_ckpt = None
    run_dir: Path | None = None
    if cfg.resume:
        ckpt_path = find_resume_checkpoint(cfg)
        resume_ckpt = load_checkpoint(ckpt_path)
        saved = saved_config(resume_ckpt)
        cfg, ignored = resume_config(saved, cfg, None if typed is None else frozenset(typed))
        if ignored and main:
            print(f"note: --resume keeps the run's {', '.join('--' + k.replace('_', '-') for k in ignored)}; "
                  f"it may change only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OVERRIDABLE))}")
        run_dir = ckpt_path.parent
        done = int(resume_ckpt.get("epoch") or 0)
        if done >= cfg.epochs:  # checked before anything is built or written: a finished run stays as it is
            raise UserError(f"{run_dir.name} already finished {done}/{saved.epochs} epochs; pass a larger --epochs "
                            f"(e.g. --resume {ckpt_path} --epochs {done + 10}) to train it further")

    device, rank, world = setup_distributed(cfg.runtime.device)
    main = rank == 0
    seed_everything(cfg.seed)
    data_cfg = load_data_config(cfg.config)
    classes = data_cfg.classes

    torch.manual_seed(cfg.seed)  # identical head initialisation on every rank and every (re)start
    model = place_model(build_detector(cfg.detector_config(len(classes)), weights=cfg.weights, verbose=main,
                                       repo_dir=cfg.repo_dir), device)
    # the run records the head it built, not "the default", so a later change of defaults cannot break its resume
    cfg = cfg.replace(head_convs=model.config.head_convs, head_separable=model.config.head_separable)
    configure_trainable(model, cfg, verbose=main)
    spec = model.input_spec
    meta = model_meta(model, classes, spec.letterbox, weights=cfg.weights, category_ids=data_cfg.category_ids)
    meta["augment"] = cfg.augment

    train_ds, valid_ds, train_loader, train_sampler, valid_loader = data_loaders(cfg, data_cfg, spec, rank, world, device)
    if run_dir is None:  # created only once model and data are known to be fine: no empty folders on errors
        if main:
            run_dir = cfg.output.run_dir("run")
        if world > 1:  # every rank needs the folder name (for the disk cache)
            holder = [str(run_dir) if main else None]
            dist.broadcast_object_list(holder)
            run_dir = Path(holder[0])
    assert run_dir is not None

    if main:
        print(f"data: {len(train_ds)} training / {len(valid_ds)} validation images, {len(classes) - 1} classes "
              f"({', '.join(classes[1:])})")
        if data_cfg.visualize_transformed_images:
            paths = save_transformed_samples(train_ds, run_dir / "transformed_samples")
            print(f"wrote {len(paths)} augmented samples to {run_dir / 'transformed_samples'}")
        if model.config.head in ANCHOR_HEADS:
            fit = fit_config(dataset_input_boxes(train_ds, spec.imgsz, spec.letterbox), model.config,
                             max_boxes=ANCHOR_FIT_MAX_BOXES, seed=cfg.seed)
            print(fit.describe())

    amp_dtype, scaler = amp_settings(cfg.runtime.precision, device)
    if cfg.cache_features:  # the image loaders are replaced by ones over cached backbone maps
        train_loader, train_sampler, valid_loader = prepare_feature_cache(
            cfg, model, train_ds, valid_ds, device, run_dir, rank, world, main, amp_dtype)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = compile_for_training(train_model, cfg.compile)

    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.backbone_lr,
                                layer_decay=cfg.layer_decay)
    if main and cfg.cuda_graphs is not False and GraphedTrainStep.eligible(train_model, optimizer, device, scaler):
        print("training step: replayed from a CUDA graph per batch shape, captured after 2 warm-up steps "
              "(--no-cuda-graphs: launch kernel by kernel)")
    iters_per_epoch = len(train_loader)
    scheduler = build_scheduler(optimizer, schedule=cfg.scheduler, epochs=cfg.epochs, iters_per_epoch=iters_per_epoch,
                                warmup_epochs=cfg.warmup_epochs, warmup_iters=cfg.warmup_iters, steps=cfg.lr_steps)
    ema = ModelEMA(model, decay=cfg.ema_decay) if cfg.ema else None
    val_ids = sample_ids(len(valid_ds), VAL_SAMPLES)
    evaluator = ReportingEvaluator(classes, cfg.metric, cfg.detector.score_thresh, val_ids)
    early = EarlyStopping(cfg.patience)

    start_epoch, best_map = 1, -1.0
    rows = read_csv(run_dir / "results.csv") if resume_ckpt else []
    if resume_ckpt is not None:
        start_epoch, best_map = restore_training_state(resume_ckpt, model, optimizer, scheduler, scaler, ema)
        if resume_ckpt.get("early_stopping"):
            early.load_state_dict(resume_ckpt["early_stopping"])
        rows = [r for r in rows if r.get("epoch", 0) < start_epoch]
        if main:
            print(f"resuming {run_dir.name} at epoch {start_epoch}/{cfg.epochs} (best mAP {best_map:.4f})")
    if main:
        cfg.save_yaml(run_dir / "args.yaml")
    # a resumed run continues the same logs: TensorBoard drops what the interrupted run logged from start_epoch on
    logger = build_loggers(cfg.logger, run_dir, resume_step=start_epoch if resume_ckpt is not None else None,
                           config=cfg.to_dict())
    if main:
        if resume_ckpt is None:
            mosaic = train_batch_mosaic(train_ds, cfg, classes)
            save_jpg(mosaic, run_dir / "train_batch0.jpg")
            logger.log_image("train/batch0", mosaic, 0)
        if "tensorboard" in cfg.logger:
            print(f"TensorBoard logs in {run_dir / 'tensorboard'}: tensorboard --logdir {run_dir.parent}")
    val_images: dict[int, torch.Tensor] = {}  # the sampled validation images, decoded once
    best_line = ""

    guard = NonFiniteGuard(cfg.max_nonfinite)
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_sampler.set_epoch(epoch)
            losses = train_one_epoch(train_model, train_loader, optimizer, scheduler, device, epoch, scaler=scaler,
                                     amp_dtype=amp_dtype, clip_grad=cfg.clip_grad, ema=ema, guard=guard,
                                     total=iters_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                                     cuda_graphs=cfg.cuda_graphs)
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch, **losses, "skipped_steps": int(losses.get("skipped_steps", 0)),
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "seconds": train_seconds, "map": math.nan, "map50": math.nan, "map75": math.nan}
            result = None
            report: EvalReport | None = None
            if epoch % cfg.eval_interval == 0 or epoch == cfg.epochs:
                with ema.swapped_in(model) if ema else contextlib.nullcontext():
                    result = evaluate(model, valid_loader, device, classes, spec=spec, evaluator=evaluator,
                                      amp_dtype=amp_dtype)
                report = evaluator.report()
                if main:
                    row.update({k: v for k, v in result.summary().items()
                                if k in ("map", "map50", "map75") or not math.isnan(v)}, eval_seconds=result.seconds)
                    row.update(best_f1=report.f1.best_f1, best_threshold=report.f1.best_threshold)
            if main:
                rows.append(row)
                improved = result is not None and result.primary > best_map  # NaN never improves
                if improved:
                    best_map = result.primary
                if result is not None:
                    stopped = early.step(result.primary, epoch)
                # the card of this epoch's weights records the threshold found for them
                epoch_meta = {**meta, **report.threshold_meta()} if report is not None else meta
                save_epoch(run_dir, model, epoch_meta, optimizer, scheduler, scaler, ema, epoch, best_map, cfg,
                           improved, result, extra={"early_stopping": early.state_dict()})
                write_csv(run_dir / "results.csv", rows)
                plot_training_curves(rows, run_dir)
                log_epoch(logger, row, report, run_dir, epoch, classes, valid_ds, val_images)
                if improved and report is not None:
                    report.save(run_dir)
                    use = ("stored in best_model.pth (inference: --threshold auto)" if report.f1.found
                           else "--threshold auto has no threshold to use")
                    best_line = f"{report.f1.describe()} at epoch {epoch}; {use}"
                print(epoch_summary(row, losses, cfg.epochs))
                if stopped:
                    print(f"{early.message()}; {run_dir / 'last_model.pth'} holds epoch {epoch}: continue with "
                          f"python train_detection.py --resume {run_dir / 'last_model.pth'} --patience "
                          f"{2 * cfg.patience} (or 0: off)")
            if world > 1:
                holder = [stopped]  # every rank stops at the same epoch
                dist.broadcast_object_list(holder)
                stopped = bool(holder[0])
                dist.barrier()
            if stopped:
                break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (core.errors.sigterm_as_interrupt): say how to continue
        if main:
            print(interrupted_message(run_dir, int(rows[-1]["epoch"]) if rows else None), file=sys.stderr)
        raise
    finally:
        logger.close()
    if main:
        print(f"done: best mAP@.5:.95 {best_map:.4f}; outputs in {run_dir}")
        if best_line:
            print(f"{best_line}; confusion_matrix.png, f1_curve.png in {run_dir}")
    if world > 1:
        dist.destroy_process_group()
    return run_dir if main else None


def train_batch_mosaic(train_ds, cfg: TrainConfig, classes: list[str]):
    """The first training batch of epoch 1 (rank 0's share) as augmented and seeded for training, with its boxes:
    an HxWx3 uint8 picture. Seeded per sample like the loader, so it leaves the run's random state untouched."""
    sampler = EpochSampler(len(train_ds), seed=cfg.seed, shuffle=True)
    sampler.set_epoch(1)
    seeded = EpochSeededDataset(train_ds, cfg.seed)
    keys = list(sampler)[:min(16, cfg.runtime.batch)]
    return batch_mosaic([s for s in (seeded[k] for k in keys) if s is not None], classes)


def scalar_tag(key: str) -> str:
    """A results.csv column's experiment-logger tag: ``train/`` (losses, lr, skipped steps), ``time/`` (seconds)
    or ``metrics/``; the part after the slash is the column name."""
    if key.startswith("loss") or key in ("train_loss", "lr", "skipped_steps"):
        return f"train/{key}"
    if key.endswith("seconds"):
        return f"time/{key}"
    return f"metrics/{key}"


def log_epoch(logger: ExperimentLogger, row: dict[str, Any], report: EvalReport | None, run_dir: Path, epoch: int,
              classes: list[str], valid_ds, val_images: dict[int, torch.Tensor]) -> None:
    """The epoch's results.csv row (numbers only) to the experiment loggers; after an evaluation also per-class AP,
    PR curves and the validation images with ground truth beside predictions (``val_pred_epoch_N.jpg``)."""
    logger.log_scalars(epoch, {scalar_tag(k): v for k, v in row.items()
                               if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)})
    if report is None:
        return
    per_class = {}
    for r in report.result.per_class:
        for key in ("ap50", "ap", "ap_voc07", "ap_voc12"):
            if math.isfinite(r[key]):
                per_class[f"{key}/{r['class']}"] = r[key]
    logger.log_scalars(epoch, per_class)
    for name, (recall, precision) in report.result.pr_curves.items():
        logger.log_pr_curve(f"pr/{name}", recall, precision, epoch)
    if report.samples:
        from ..data.image_io import read_image

        ids = list(report.samples)
        for i in ids:
            if i not in val_images:
                val_images[i] = read_image(valid_ds.records[i].image)
        # drawn at the best-F1 threshold of this evaluation: what --threshold auto would show
        picture = prediction_mosaic([val_images[i] for i in ids], [report.samples[i][1] for i in ids],
                                    [report.samples[i][0] for i in ids], classes, report.f1.best_threshold)
        save_jpg(picture, run_dir / f"val_pred_epoch_{epoch}.jpg")
        logger.log_image("val/predictions", picture, epoch)


def interrupted_message(run_dir: Path, finished: int | None) -> str:
    """What an interrupted run leaves (``finished``: its last finished epoch) and the command that continues it."""
    last = run_dir / "last_model.pth"
    if not finished or not last.is_file():
        return f"interrupted before the first epoch finished: nothing to resume in {run_dir}; start the run again"
    return (f"interrupted: {last} holds epoch {finished}; continue with: python train_detection.py --resume {last}")


def epoch_summary(row: dict[str, Any], losses: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(row['epoch'])}/{epochs}", f"loss {losses.get('train_loss', math.nan):.4f}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in losses.items() if k.startswith("loss_")]
    if not math.isnan(row["map"]):
        parts += [f"mAP {row['map']:.4f}", f"mAP50 {row['map50']:.4f}"]
    parts.append(f"{row['seconds']:.1f}s")
    if losses.get("skipped_steps"):
        parts.append(f"skipped {int(losses['skipped_steps'])} non-finite steps")
    return " | ".join(parts)


def save_epoch(run_dir: Path, model, meta, optimizer, scheduler, scaler, ema, epoch: int, best_map: float,
               cfg: TrainConfig, improved: bool, result, extra: dict[str, Any] | None = None) -> None:
    """last_model.pth (and best_model.pth when ``improved``); ``extra``: more training state for the payload."""
    payload = build_payload(model, meta, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            ema=ema.state_dict() if ema else None, epoch=epoch, best_metric=best_map,
                            include_backbone=not cfg.no_save_backbone)
    payload["train_config"] = cfg.to_dict()
    payload.update(extra or {})
    save_checkpoint(run_dir / "last_model.pth", payload)
    if improved:
        if ema is not None:  # best_model.pth is for inference: the averaged weights it was scored with
            payload = {**payload, "model": ema.averaged(payload["model"])}
        save_checkpoint(run_dir / "best_model.pth", payload)
        (run_dir / "per_class_ap.txt").write_text(f"epoch {epoch}\n{format_table(result)}\n")
        save_results(result, run_dir)


def restore_training_state(ckpt: dict[str, Any], model, optimizer, scheduler, scaler, ema) -> tuple[int, float]:
    """Load weights and optimiser/scheduler/scaler/EMA/RNG state; returns (next epoch, best mAP).

    Only the frozen backbone may be absent (a ``--no-save-backbone`` checkpoint; it comes from ``--weights``),
    checked by tensor identity: a missing neck or head tensor is a broken checkpoint.
    """
    m = unwrap(model)
    allowed = set() if ckpt["meta"].get("includes_backbone", True) else frozen_backbone_keys(m)
    check_state_dict(m, ckpt["model"], ckpt["path"], "model this run builds (--resume)",
                     "resume with the run's own last_model.pth", allowed)
    m.load_state_dict(ckpt["model"], strict=False)
    if ckpt.get("optimizer"):
        # load_state_dict also takes the saved groups' fused/foreach; how a step runs is this build's choice (a
        # checkpoint of a non-fused optimizer would otherwise meet the fused loop's device-side skip flag)
        implementation = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:
            raise UserError(f"--resume: {ckpt['path']}: the optimizer state does not fit this model "
                            f"({str(exc).splitlines()[0]})") from None
        for group in optimizer.param_groups:
            group.update(implementation)
    if ckpt.get("scheduler"):
        # A larger --epochs changes the schedule's length; the lambda is rebuilt from the config, only the step
        # count is restored.
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    best = ckpt.get("best_metric")
    return int(ckpt["epoch"]) + 1, -1.0 if best is None else float(best)


def prepare_feature_cache(cfg: TrainConfig, model, train_ds, valid_ds, device: torch.device, run_dir: Path,
                          rank: int, world: int, main: bool, amp_dtype: torch.dtype | None = None):
    """Cache this rank's training shard (padded: equal steps on every rank) and validation shard.

    Returns ``(train loader, its sampler, validation loader)`` replacing the image loaders.
    """
    shard = padded_shard(len(train_ds), rank, world)  # under DDP each rank caches and trains on a fixed shard
    batch, workers, imgsz = cfg.runtime.batch, cfg.runtime.workers, unwrap(model).input_spec.imgsz
    common = dict(device=device, batch_size=batch, workers=workers, amp_dtype=amp_dtype)
    t0 = time.perf_counter()
    cache = FeatureCache(cfg.cache_features, flip=cfg.augment == "flip", seed=cfg.seed,
                         cache_dir=run_dir / f"feature_cache_rank{rank}")
    cache.build(unwrap(model), train_ds, shard, show=main, **common)
    valid_shard = list(ShardSampler(len(valid_ds), rank, world))
    valid_cache = FeatureCache(cfg.cache_features, flip=False, seed=cfg.seed,
                               cache_dir=run_dir / f"feature_cache_valid_rank{rank}")
    valid_cache.build(unwrap(model), valid_ds, valid_shard, show=main, **common)
    where = cache.place(device)
    valid_cache.place(device)
    if main:
        for c in (cache, valid_cache):
            if c.reused:  # disk: the folder already held these maps (same data, model and settings)
                print(f"reusing feature cache (key {c.key[:12]}) in {c.cache_dir}")
        built = "reused" if cache.reused and valid_cache.reused else "built"
        print(f"feature cache ({cfg.cache_features}): {len(cache)} training images x {1 + cache.flip} variants + "
              f"{len(valid_cache)} validation images, {(cache.nbytes + valid_cache.nbytes) / 2**20:.0f} MiB, "
              f"{built} in {time.perf_counter() - t0:.1f}s"
              + (f", kept in {where}" if cfg.cache_features == "ram" else ""))
    sampler = EpochSampler(len(shard), seed=cfg.seed, shuffle=True, indices=shard)
    pin = device.type == "cuda"
    if cfg.cache_features == "ram":
        return (CachedBatches(cache, sampler, batch, imgsz, pin_memory=pin), sampler,
                CachedBatches(valid_cache, valid_shard, batch, imgsz, pin_memory=pin))
    collate = functools.partial(collate_cached, imgsz=imgsz)
    loader = DataLoader(cache, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin)
    valid_loader = DataLoader(valid_cache, batch_size=batch, sampler=valid_shard, num_workers=workers,
                              collate_fn=collate, pin_memory=pin)
    return loader, sampler, valid_loader
