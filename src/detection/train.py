"""``train_detection.py`` behind the argument parser: set-up, epoch loop, checkpoints, logs, plots."""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import build_payload, load_checkpoint, model_meta, save_checkpoint, set_rng_state
from .datasets import build_dataloader, build_datasets, collate_fn, load_data_config, save_transformed_samples
from .engine import ModelEMA, NonFiniteGuard, build_optimizer, build_scheduler, evaluate, train_one_epoch
from .runtime import amp_settings, is_main_process, setup_distributed, unwrap
from .errors import UserError
from .feature_cache import FeatureCache, check_cacheable, collate_cached
from .metrics import format_table, save_results
from .model import DetectorConfig, build_detector
from .plots import plot_training_curves
from .sampling import EpochSampler, EpochSeededDataset, ShardSampler
from .utils import increment_path, parse_imgsz, resolve_repo_path, seed_everything

# Arguments a resumed run takes from the command line instead of the checkpoint.
RESUME_OVERRIDABLE = {"epochs", "workers", "device", "eval_interval", "resume", "exist_ok", "amp"}
CSV_FIELDS = ["epoch", "train_loss", "map", "map50", "map75", "lr", "seconds", "eval_seconds", "skipped_steps"]


# ----------------------------------------------------------------------------------------------- set-up helpers
def find_resume_checkpoint(args: argparse.Namespace) -> Path:
    if args.resume != "auto":
        return resolve_repo_path(args.resume)
    parent = resolve_repo_path(args.out_dir)
    if args.name:
        return parent / args.name / "last_model.pth"
    runs = sorted((p for p in parent.glob("*/last_model.pth")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"--resume: no last_model.pth found under {parent}; pass the checkpoint path, "
                        f"e.g. --resume outputs/img_det/run_1/last_model.pth")
    return runs[-1]


def restore_args(args: argparse.Namespace, saved: dict[str, Any], explicit: set[str]) -> argparse.Namespace:
    """A resumed run keeps its original settings; only RESUME_OVERRIDABLE flags typed now replace them."""
    merged = dict(saved)
    for key in RESUME_OVERRIDABLE:
        if key in explicit or key not in merged:
            merged[key] = getattr(args, key)
    ignored = sorted(k for k in explicit - RESUME_OVERRIDABLE if getattr(args, k) != saved.get(k))
    if ignored and is_main_process():
        print(f"note: --resume keeps the run's original {', '.join('--' + k.replace('_', '-') for k in ignored)}")
    return argparse.Namespace(**merged)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(CSV_FIELDS) + sorted({k for r in rows for k in r if k not in CSV_FIELDS})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in csv.DictReader(f)]


def data_loaders(args, data_cfg, imgsz, rank: int, world: int, device: torch.device):
    """Training loader (epoch-seeded) and validation loader (sharded, no padding)."""
    train_ds, valid_ds = build_datasets(
        data_cfg, imgsz=imgsz, augment=args.augment, letterbox=args.letterbox,
        include_difficult=args.include_difficult, ignore_unknown_classes=args.ignore_unknown_classes or None,
        skip_bad_samples=args.skip_bad_samples or None, verbose=is_main_process())
    train_sampler = EpochSampler(len(train_ds), seed=args.seed, shuffle=True, rank=rank, world_size=world)
    train_loader = build_dataloader(EpochSeededDataset(train_ds, args.seed), args.batch, args.workers,
                                    sampler=train_sampler)
    valid_loader = build_dataloader(valid_ds, args.batch, args.workers, sampler=ShardSampler(len(valid_ds), rank, world))
    return train_ds, valid_ds, train_loader, train_sampler, valid_loader


def eval_only(args: argparse.Namespace) -> None:
    """``--eval-only --model ckpt``: score a checkpoint on the validation split of ``--config``."""
    from .evaluate import evaluate_checkpoint

    if not args.model:
        raise UserError("--eval-only needs --model <checkpoint.pth>")
    evaluate_checkpoint(args.model, args.config, metric=args.metric, batch=args.batch, workers=args.workers,
                        device=args.device, out_dir=None, score_thresh=args.score_thresh)


# ----------------------------------------------------------------------------------------------- main entry
def run(args: argparse.Namespace, explicit: set[str] | None = None) -> Path | None:
    """Train (or ``--eval-only``) as described by the parsed ``train_detection.py`` arguments.

    Returns the run folder on rank 0.
    """
    explicit = explicit or set()
    if args.eval_only:
        eval_only(args)
        return None

    device, rank, world = setup_distributed(args.device)
    main = rank == 0
    resume_ckpt = None
    if args.resume:
        ckpt_path = find_resume_checkpoint(args)
        resume_ckpt = load_checkpoint(ckpt_path)
        if "args" not in resume_ckpt:
            raise UserError(f"--resume: {ckpt_path} holds no training state (written by inference tools?); "
                            f"resume from a last_model.pth of a training run")
        args = restore_args(args, resume_ckpt["args"], explicit)
        run_dir = ckpt_path.parent
    imgsz = parse_imgsz(args.imgsz)
    if args.cache_features:
        check_cacheable(args.augment, args.fine_tune)

    seed_everything(args.seed)
    data_cfg = load_data_config(args.config)
    classes = data_cfg.classes

    cfg = DetectorConfig(model_name=args.model_name, num_classes=len(classes), head=args.head,
                         feature_extractor=args.feature_extractor, imgsz=imgsz, backbone_impl=args.backbone_impl,
                         fine_tune=args.fine_tune, nms=args.nms, score_thresh=args.score_thresh,
                         max_det=args.max_det, fpn_channels=args.fpn_channels)
    torch.manual_seed(args.seed)  # identical head initialisation on every rank and every (re)start
    model = build_detector(cfg, weights=args.weights, verbose=main).to(device)
    meta = model_meta(model, classes, args.letterbox, weights=args.weights)
    meta["augment"] = args.augment

    train_ds, valid_ds, train_loader, train_sampler, valid_loader = data_loaders(args, data_cfg, imgsz, rank, world,
                                                                                 device)
    if not args.resume:  # created only once model and data are known to be fine: no empty folders on errors
        run_dir = None
        if main:
            run_dir = increment_path(args.out_dir, args.name, "run", exist_ok=args.exist_ok)
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

    amp_dtype, scaler = amp_settings(args.amp, device)
    if args.cache_features:  # the image loader is replaced by one over cached backbone maps
        train_loader, train_sampler = prepare_feature_cache(args, model, data_cfg, imgsz, device, run_dir, rank,
                                                            world, main, amp_dtype)

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.backbone_lr)
    iters_per_epoch = len(train_loader)
    scheduler = build_scheduler(optimizer, schedule=args.scheduler, epochs=args.epochs, iters_per_epoch=iters_per_epoch,
                                warmup_epochs=args.warmup_epochs, warmup_iters=args.warmup_iters, steps=args.lr_steps)
    ema = ModelEMA(model, decay=args.ema_decay) if args.ema else None

    start_epoch, best_map = 1, -1.0
    rows = read_csv(run_dir / "results.csv") if resume_ckpt else []
    if resume_ckpt is not None:
        start_epoch, best_map = restore_training_state(resume_ckpt, model, optimizer, scheduler, scaler, ema,
                                                       args, iters_per_epoch)
        rows = [r for r in rows if r.get("epoch", 0) < start_epoch]
        if main:
            print(f"resuming {run_dir.name} at epoch {start_epoch}/{args.epochs} (best mAP {best_map:.4f})")
    if main:
        with open(run_dir / "args.yaml", "w") as f:
            yaml.safe_dump({"args": vars(args), "data": {"config": str(data_cfg.path), "classes": classes}, "model": cfg.to_dict(),
                            "toolkit_version": __version__}, f, sort_keys=False)

    guard = NonFiniteGuard(args.max_nonfinite)
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        losses = train_one_epoch(train_model, train_loader, optimizer, scheduler, device, epoch, scaler=scaler,
                                 amp_dtype=amp_dtype, clip_grad=args.clip_grad, ema=ema, guard=guard,
                                 total=iters_per_epoch, desc=f"epoch {epoch}/{args.epochs}")
        train_seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch, **losses, "lr": optimizer.param_groups[0]["lr"],
                               "seconds": train_seconds, "map": math.nan, "map50": math.nan, "map75": math.nan}
        result = None
        if epoch % args.eval_interval == 0 or epoch == args.epochs:
            with ema.swapped_in(model) if ema else contextlib.nullcontext():
                result = evaluate(model, valid_loader, device, classes, imgsz=imgsz, letterbox=args.letterbox,
                                  metric=args.metric, amp_dtype=amp_dtype)
            if main:
                row.update({k: v for k, v in result.summary().items()
                            if k in ("map", "map50", "map75") or not math.isnan(v)}, eval_seconds=result.seconds)
        if main:
            rows.append(row)
            improved = result is not None and result.primary > best_map  # NaN never improves
            if improved:
                best_map = result.primary
            save_epoch(run_dir, model, meta, optimizer, scheduler, scaler, ema, epoch, best_map, args, improved,
                       result)
            write_csv(run_dir / "results.csv", rows)
            plot_training_curves(rows, run_dir)
            print(epoch_summary(row, losses, args.epochs))
        if world > 1:
            dist.barrier()
    if main:
        print(f"done: best mAP@.5:.95 {best_map:.4f}; outputs in {run_dir}")
    if world > 1:
        dist.destroy_process_group()
    return run_dir if main else None


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
               args: argparse.Namespace, improved: bool, result) -> None:
    payload = build_payload(model, meta, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            ema=ema.state_dict() if ema else None, epoch=epoch, best_metric=best_map,
                            include_backbone=not args.no_save_backbone)
    payload["args"] = vars(args)
    save_checkpoint(run_dir / "last_model.pth", payload)
    if improved:
        if ema is not None:  # best_model.pth is for inference: store the averaged weights it was scored with
            with ema.swapped_in(model):
                payload["model"] = build_payload(model, meta, include_backbone=not args.no_save_backbone)["model"]
        save_checkpoint(run_dir / "best_model.pth", payload)
        (run_dir / "per_class_ap.txt").write_text(f"epoch {epoch}\n{format_table(result)}\n")
        save_results(result, run_dir)


def restore_training_state(ckpt: dict[str, Any], model, optimizer, scheduler, scaler, ema, args,
                           iters_per_epoch: int) -> tuple[int, float]:
    """Load weights and optimiser/scheduler/scaler/EMA/RNG state; returns (next epoch, best mAP)."""
    result = unwrap(model).load_state_dict(ckpt["model"], strict=False)
    if result.unexpected_keys or any(not k.startswith("backbone.") for k in result.missing_keys):
        raise UserError(f"--resume: {ckpt['path']} does not match this model ({len(result.missing_keys)} missing, "
                        f"{len(result.unexpected_keys)} unexpected keys)")
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
        # A larger --epochs changes the schedule's length; the lambda is rebuilt from args, only the step is kept.
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    best = ckpt.get("best_metric")
    return int(ckpt["epoch"]) + 1, -1.0 if best is None else float(best)


def prepare_feature_cache(args, model, data_cfg, imgsz, device, run_dir: Path, rank: int, world: int, main: bool,
                          amp_dtype: torch.dtype | None = None):
    """Build the cache for this rank's shard; returns (loader, sampler) that replace the image loader."""
    cache_ds, _ = build_datasets(data_cfg, imgsz=imgsz, augment="none", letterbox=args.letterbox,
                                 include_difficult=args.include_difficult,
                                 ignore_unknown_classes=args.ignore_unknown_classes or None,
                                 skip_bad_samples=args.skip_bad_samples or None, verbose=False, splits=("train",))
    shard = list(range(rank, len(cache_ds), world))  # under DDP each rank caches and trains on a fixed shard
    cache = FeatureCache(args.cache_features, flip=args.augment == "flip", seed=args.seed,
                         cache_dir=run_dir / f"feature_cache_rank{rank}")
    t0 = time.perf_counter()
    cache.build(unwrap(model), cache_ds, shard, device, batch_size=args.batch, workers=args.workers,
                collate_fn=collate_fn, amp_dtype=amp_dtype, show=main)
    if main:
        print(f"feature cache ({args.cache_features}): {len(shard)} images x {1 + cache.flip} variants, "
              f"{cache.nbytes / 2**20:.0f} MiB, built in {time.perf_counter() - t0:.1f}s")
    sampler = EpochSampler(len(shard), seed=args.seed, shuffle=True, indices=shard)
    workers = args.workers if args.cache_features == "disk" else 0
    loader = DataLoader(cache, batch_size=args.batch, sampler=sampler, num_workers=workers,
                        collate_fn=functools.partial(collate_cached, imgsz=imgsz), pin_memory=device.type == "cuda")
    return loader, sampler
