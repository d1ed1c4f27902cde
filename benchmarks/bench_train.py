"""Training speed: the reference project's training step vs ours, and epoch time with vs without the feature cache.

    python -m benchmarks.bench_train [--quick] [--device cpu|cuda]

Same backbone size (``dinov3_convnext_tiny``, random weights), image size (640x640), classes (21, as VOC) and
synthetic images (``src.detection.data.synthetic``) for both sides, in the same process, repetitions interleaved
(baseline, ours, baseline, ...) after a warm-up; median and min-max reported. ``--quick``: the architecture-only
``dinov3_convnext_atto`` at 160x160 with fewer repetitions.

* baseline = the reference project's step rebuilt here from torchvision classes: the backbone (our timm module)
  called through ``get_intermediate_layers(x, n=1, reshape=True, norm=True)`` inside the autograd graph (frozen
  only by ``requires_grad=False``, no ``no_grad``), torchvision ``RetinaNet`` with its own
  ``GeneralizedRCNNTransform`` (resize to min_size=max_size=imgsz, ImageNet mean/std), the reference anchors
  ``((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)`` and ``RetinaNetHead(C, 15, 21)``, float images, AdamW lr 1e-4,
  ``loss.backward(); optimizer.step()``.
* ours = ``build_detector(DetectorConfig(...))`` with the toolkit's defaults (multi-level RetinaNet on a frozen
  backbone, uint8 input) trained by ``engine.train_one_epoch`` with the optimizer / scheduler / grad clipping
  a default ``TrainConfig`` gives (``train.run`` builds them the same way).
* epoch time = ``train_one_epoch`` over the real training loader of ``train.py`` (decode + flip augmentation
  included), against the loader ``train.py`` builds for ``--cache-features ram`` (``FeatureCache`` +
  ``CachedBatches``); epochs from 2 on are compared (epoch 1 also pays the warm-up); the one-off cache build is
  reported in the note.

Data loading is outside the timed span of the images/s rows (both sides get ready batches) and inside the
epoch-time rows.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import bench_main, make_row, time_call, time_interleaved
from src.detection.engine.config import TrainConfig

NUM_CLASSES = 21  # the reference figures were measured with the 20 VOC classes + background
REFERENCE_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
REFERENCE_ASPECT_RATIOS = ((0.5, 1.0, 2.0),)
GOAL_TRAIN = 1.5  # CPU (2 cores), with the CPU recipe (--head-separable): no regression below 1.5x at batch 2
GOAL_TRAIN_GPU = 3.0  # on a GPU, at batch 8 and 32
GOAL_CEILING = 0.4  # our training step's share of the frozen backbone's own forward, on a GPU
GOAL_CACHE = 3.0


def settings(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Model, image size and repetition counts for the full and the ``--quick`` run (``variants``: also the
    informative rows - bf16, the reference head through our path, the separable head, the cache with the
    reference head). On CUDA the full run uses the batch sizes GPU users train with (8 and 32)."""
    if device.startswith("cuda") and not quick:
        return dict(model_name="dinov3_convnext_tiny", imgsz=640, batches=(8, 32), steps={8: 4, 32: 2}, reps=3,
                    warmup=2, n_images=64, epoch_images=128, epoch_batch=32, epochs=3, variants=True)
    if quick:
        return dict(model_name="dinov3_convnext_atto", imgsz=160, batches=(2, 8), steps={2: 2, 8: 1}, reps=2,
                    warmup=1, n_images=16, epoch_images=16, epoch_batch=8, epochs=3, variants=True)
    return dict(model_name="dinov3_convnext_tiny", imgsz=640, batches=(2, 8), steps={2: 2, 8: 1}, reps=3,
                warmup=1, n_images=16, epoch_images=16, epoch_batch=8, epochs=3, variants=True)


# --------------------------------------------------------------------------------------------------- baseline
class ReferenceBackbone(nn.Module):
    """What the reference project wrapped around DINOv3: the last map from ``get_intermediate_layers``.

    Frozen by ``requires_grad=False`` only - the forward runs inside autograd (no ``no_grad``) and the module
    follows ``model.train()``, as in the reference.
    """

    def __init__(self, dino: nn.Module):
        super().__init__()
        self.dino = dino
        self.out_channels = dino.output_shape()["last"][0].channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.dino.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0])])


def build_reference(model_name: str, imgsz: int, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference project's detector from plain torchvision classes (nothing from our model.py)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

    from src.detection.modeling.backbones import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: known, the benchmark says so itself
        # fine_tune=True only switches off our frozen path (no_grad + forced eval); freezing is redone below
        dino = build_backbone(model_name, fine_tune=True)
    dino.model.requires_grad_(False)
    backbone = ReferenceBackbone(dino)
    anchors = AnchorGenerator(REFERENCE_ANCHOR_SIZES, REFERENCE_ASPECT_RATIOS)
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    # RetinaNet's own GeneralizedRCNNTransform: resizes to min_size/max_size and normalizes with ImageNet stats
    return RetinaNet(backbone, num_classes, min_size=imgsz, max_size=imgsz, anchor_generator=anchors, head=head,
                     nms_thresh=0.45)


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, device: torch.device) -> None:
    """The reference training loop body: float images in a list, sum of losses, backward, AdamW step."""
    model.train()
    for images, targets in batches:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        loss = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --------------------------------------------------------------------------------------------------- ours
def build_ours(cfg: TrainConfig, device: torch.device, iters_per_epoch: int):
    """Our detector as a training run with ``cfg`` builds it (defaults: multi-level RetinaNet, frozen backbone),
    with the optimizer and scheduler ``train.run`` builds from the same config."""
    from src.detection.engine.loop import build_optimizer, build_scheduler, place_model
    from src.detection.modeling.builder import build_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = place_model(build_detector(cfg.detector_config(NUM_CLASSES), verbose=False), device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.backbone_lr,
                                layer_decay=cfg.layer_decay)
    scheduler = build_scheduler(optimizer, schedule=cfg.scheduler, epochs=cfg.epochs, iters_per_epoch=iters_per_epoch,
                                warmup_epochs=cfg.warmup_epochs, warmup_iters=cfg.warmup_iters, steps=cfg.lr_steps)
    return model, optimizer, scheduler


def our_epoch(model, batches, optimizer, scheduler, device: torch.device, epoch: int, cfg: TrainConfig,
              amp_dtype=None, cuda_graphs: bool | None = None) -> None:
    """``engine.train_one_epoch`` with the settings ``train.run`` uses for ``cfg`` (progress bar silenced)."""
    from src.detection.engine.loop import train_one_epoch

    with contextlib.redirect_stderr(io.StringIO()):
        train_one_epoch(model, batches, optimizer, scheduler, device, epoch, clip_grad=cfg.clip_grad,
                        amp_dtype=amp_dtype, total=len(batches), desc="bench", cuda_graphs=cuda_graphs)


def log(message: str) -> None:
    """Progress on stderr: a full run takes a while and prints its table only at the end."""
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- data
def make_data(root: Path, n_images: int, imgsz: int) -> Path:
    """Synthetic shapes at ``imgsz`` (the project's generator); returns the dataset config path."""
    from src.detection.data.synthetic import generate_dataset

    return generate_dataset(root / f"shapes_{imgsz}", n_images, 1, imgsz=imgsz, seed=0)


def fixed_batches(config: Path, imgsz: int, batch: int, n_batches: int) -> tuple[list, list]:
    """``n_batches`` ready batches from our dataset (flip preset, seeded): ours as uint8 ``[B,3,H,W]``, the
    reference's as lists of float images in 0..1 (what its dataset produced) with plain-tensor targets."""
    from src.detection.data.datasets import build_datasets, collate_fn, load_data_config

    torch.manual_seed(0)
    ds, _ = build_datasets(load_data_config(config), imgsz=(imgsz, imgsz), augment="flip", verbose=False,
                           splits=("train",))
    ours, ref = [], []
    for b in range(n_batches):
        items = [ds[(b * batch + j) % len(ds)] for j in range(batch)]
        images, targets = collate_fn(items)
        ours.append((images, targets))
        ref.append(([im.float().div(255) for im in images],
                    [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"]} for t in targets]))
    return ours, ref


# --------------------------------------------------------------------------------------------------- rows
def training_rows(s: dict[str, Any], config: Path, device: torch.device) -> list[dict[str, Any]]:
    """Images/s of training steps, reference vs ours, at each batch size; at the largest batch also the
    informative variants (``--amp bf16``, ``--feature-extractor last``, ``--no-head-separable``) that show where
    the time goes."""
    from src.detection.core.runtime import amp_settings
    from src.detection.modeling.detector import count_parameters

    imgsz, name = s["imgsz"], s["model_name"]
    args = TrainConfig.from_dict({"model_name": name, "imgsz": (imgsz, imgsz)})  # a user's run with the defaults
    torch.manual_seed(0)
    ref = build_reference(name, imgsz).to(device)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    ours, opt, sched = build_ours(args, device, iters_per_epoch=100)
    models = {"ref": ref, "ours": ours}
    if s["variants"]:
        torch.manual_seed(0)
        last, last_opt, last_sched = build_ours(args.replace(feature_extractor="last"), device, iters_per_epoch=100)
        models["last"] = last
        torch.manual_seed(0)
        sep, sep_opt, sep_sched = build_ours(args.replace(head_separable=True), device, iters_per_epoch=100)
        models["sep"] = sep
        torch.manual_seed(0)
        wide, wide_opt, wide_sched = build_ours(args.replace(fpn_channels=2 * args.detector.fpn_channels), device,
                                                iters_per_epoch=100)
        models["wide"] = wide
        torch.manual_seed(0)
        branches, branches_opt, branches_sched = build_ours(args, device, iters_per_epoch=100)
        # the head's other forward than the device's default (merged towers on a GPU, torchvision's two on a CPU)
        branches.head.merge_branches = device.type != "cuda"
    if device.type == "cuda":  # the same model and optimizer state kinds, stepped eagerly
        torch.manual_seed(0)
        eager, eager_opt, eager_sched = build_ours(args, device, iters_per_epoch=100)
    if s["variants"] and device.type == "cuda":  # the merged tower's GroupNorm in bf16 instead of autocast's fp32
        torch.manual_seed(0)
        lownorm, lownorm_opt, lownorm_sched = build_ours(args, device, iters_per_epoch=100)
        lownorm.head.low_precision_norm = True
    counts = {k: "{:,}/{:,}".format(*count_parameters(m)) for k, m in models.items()}
    default_amp = amp_settings(args.runtime.precision, device)[0]  # what a user's run gets: bf16 where native, else fp32
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[default_amp]
    rows = []
    for batch in s["batches"]:
        steps = s["steps"][batch]
        ours_b, ref_b = fixed_batches(config, imgsz, batch, steps)
        fns = {"ref": lambda: reference_step(ref, ref_opt, ref_b, device),
               "ours": lambda: our_epoch(ours, ours_b, opt, sched, device, 1, args, amp_dtype=default_amp)}
        variants = s["variants"] and batch == max(s["batches"])
        # on a CPU the separable head is the recipe the README recommends: measured at every batch size there
        cpu_recipe = s["variants"] and device.type == "cpu"
        if variants or cpu_recipe:
            fns["sep"] = lambda: our_epoch(sep, ours_b, sep_opt, sep_sched, device, 1, args,
                                           amp_dtype=default_amp)
        if variants:
            fns["last"] = lambda: our_epoch(last, ours_b, last_opt, last_sched, device, 1, args,
                                            amp_dtype=default_amp)
            fns["wide"] = lambda: our_epoch(wide, ours_b, wide_opt, wide_sched, device, 1, args,
                                            amp_dtype=default_amp)
            fns["branches"] = lambda: our_epoch(branches, ours_b, branches_opt, branches_sched, device, 1, args,
                                                amp_dtype=default_amp)
            if default_amp is not None:
                fns["fp32"] = lambda: our_epoch(ours, ours_b, opt, sched, device, 1, args, amp_dtype=None)
                if device.type == "cuda":
                    fns["lownorm"] = lambda: our_epoch(lownorm, ours_b, lownorm_opt, lownorm_sched, device, 1, args,
                                                       amp_dtype=default_amp)
        if device.type == "cuda":
            fns["eager"] = lambda: our_epoch(eager, ours_b, eager_opt, eager_sched, device, 1, args,
                                             amp_dtype=default_amp, cuda_graphs=False)
        times = time_interleaved(fns, reps=s["reps"], warmup=s["warmup"], device=device)
        log(f"batch {batch}: {', '.join(f'{k} {batch * steps / min(v):.2f} img/s' for k, v in times.items())} (best)")
        n = batch * steps
        rate = {k: [n / t for t in v] for k, v in times.items()}
        setup = f"{name} {imgsz}x{imgsz}, {steps} step(s) of {batch} per rep"
        rows.append(make_row(
            f"train images/s, batch {batch}: reference step vs ours ({device.type})", rate["ref"], rate["ours"],
            GOAL_TRAIN_GPU if device.type == "cuda" else "info", "img/s", higher_is_better=True,
            note=f"{setup}; ours = defaults (multi-level RetinaNet, dense head, frozen backbone, --amp auto = {amp_name}); params total/trainable: "
                 f"reference {counts['ref']}, ours {counts['ours']}"))
        if "sep" in rate:
            rows.append(make_row(
                f"train images/s, batch {batch}: reference step vs ours --head-separable ({device.type})",
                rate["ref"], rate["sep"], GOAL_TRAIN if cpu_recipe and batch == min(s["batches"]) else "info",
                "img/s", higher_is_better=True,
                note=f"{setup}; depthwise-separable head convs, the CPU recipe ({counts['sep']} params)"))
        if variants:
            rows.append(make_row(
                f"train images/s, batch {batch}: reference step vs ours --feature-extractor last ({device.type})",
                rate["ref"], rate["last"], "info", "img/s", higher_is_better=True,
                note=f"{setup}; the reference's own head through our frozen path ({counts['last']} params)"))
            rows.append(make_row(
                f"train images/s, batch {batch}: reference step vs ours --fpn-channels {2 * args.detector.fpn_channels} "
                f"({device.type})", rate["ref"], rate["wide"], "info", "img/s", higher_is_better=True,
                note=f"{setup}; neck + head twice as wide as the default {args.detector.fpn_channels} ({counts['wide']} "
                     f"params)"))
            two, one = (rate["ours"], rate["branches"]) if device.type != "cuda" else (rate["branches"], rate["ours"])
            rows.append(make_row(
                f"train images/s, batch {batch}: ours with the head's two towers (torchvision's forward) vs merged "
                f"into one of grouped convs ({device.type})", two, one, "info", "img/s", higher_is_better=True,
                note=f"{setup}; same parameters and outputs; the default is merged on a GPU, two towers on a CPU"))
            if "lownorm" in rate:
                rows.append(make_row(
                    f"train images/s, batch {batch}: ours (GroupNorm in fp32, as autocast runs it) vs GroupNorm in "
                    f"{amp_name} ({device.type})", rate["ours"], rate["lownorm"], "info", "img/s",
                    higher_is_better=True,
                    note=f"{setup}; the merged tower's low_precision_norm (off by default): a ratio clearly above 1 "
                         f"makes it the default on a GPU"))
            if "fp32" in rate:
                rows.append(make_row(
                    f"train images/s, batch {batch}: reference step vs ours --amp none ({device.type})",
                    rate["ref"], rate["fp32"], "info", "img/s", higher_is_better=True,
                    note=f"{setup}; default model in plain fp32"))
        if "eager" in rate:
            rows.append(make_row(
                f"train images/s, batch {batch}: ours --no-cuda-graphs vs ours (default: CUDA graphs) "
                f"({device.type})", rate["eager"], rate["ours"], "info", "img/s", higher_is_better=True,
                note=f"{setup}; the same step launched kernel by kernel vs replayed from one CUDA graph"))
        if device.type == "cuda":
            ceiling = backbone_ceiling(ours, batch, imgsz, default_amp, device, s["reps"])
            rows.append(make_row(
                f"train images/s, batch {batch}: frozen backbone forward alone (the ceiling) vs our step ({device.type})",
                ceiling, rate["ours"], GOAL_CEILING, "img/s", higher_is_better=True,
                note=f"{name} {imgsz}x{imgsz}, {amp_name}, channels-last, no_grad; ratio = our training step's share "
                     f"of the backbone-only speed"))
    if device.type == "cuda":
        if s.get("compile_row"):  # ~70 s of compilation: only on request (--compile-row)
            rows.append(compile_row(s, config, device, args, default_amp))
        rows.append(sync_row(ours, opt, sched, fixed_batches(config, imgsz, s["batches"][0], 6)[0], device, args,
                             default_amp))
    return rows


GOAL_OPS = 1300  # aten operator calls per training step (default model, batch 8), flat in the batch size
OPS_IMGSZ = 128  # operator counts do not depend on the image size: counted on small images


def count_aten_calls(fn) -> int:
    """aten operator calls ``fn()`` dispatches in this thread (the method of ``../shared/tools/count_ops.py``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def ops_rows(s: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Operator calls per training step of the default model as a GPU runs it, counted on the CPU (eager: each call
    is a kernel launch a GPU makes when not replaying a graph), at batch 2, 8 and 16: the launch-overhead proxy
    that needs no GPU."""
    imgsz, device, n_steps = s.get("ops_imgsz", OPS_IMGSZ), torch.device("cpu"), s.get("ops_steps", 4)
    args = TrainConfig.from_dict({"model_name": s["model_name"], "imgsz": (imgsz, imgsz)})
    config = make_data(root, 16, imgsz)
    counts = {}
    for batch in (2, 8, 16):
        torch.manual_seed(0)
        model, opt, sched = build_ours(args, device, iters_per_epoch=100)
        model.head.merge_branches = True  # the head as a GPU runs it (on a CPU it keeps torchvision's two towers)
        batches = fixed_batches(config, imgsz, batch, n_steps + 1)[0]
        our_epoch(model, batches[:1], opt, sched, device, 1, args)  # warm-up: anchors, optimizer state
        steps = batches[1:]
        counts[batch] = count_aten_calls(lambda: our_epoch(model, steps, opt, sched, device, 1, args)) / len(steps)
    log(f"operator calls per step: {', '.join(f'batch {b}: {n:,.0f}' for b, n in counts.items())}")
    note = (f"{s['model_name']}, defaults with the head as a GPU runs it (merged towers), eager on the CPU at "
            f"{imgsz} px, torch dispatch count per step ({n_steps} steps incl. one loss read-back); baseline = the goal")
    return [make_row(f"operator calls per training step, batch 8 (cpu, {s['model_name']})", [GOAL_OPS],
                     [counts[8]], 1.0, "ops", higher_is_better=False, note=note),
            make_row("operator calls per training step: batch 2 vs batch 16 (flat in the batch size)", [counts[2]],
                     [counts[16]], "info", "ops", higher_is_better=False, note=note)]


def compile_row(s: dict[str, Any], config: Path, device: torch.device, cfg: TrainConfig, amp_dtype
                ) -> dict[str, Any]:
    """Our default step eager vs ``--compile`` (inductor; the step's shapes are static), at the smallest batch;
    the one-off compile time goes in the note."""
    import time

    from src.detection.engine.training import compile_for_training

    batch = s["batches"][0]
    steps = s["steps"][batch]
    batches, _ = fixed_batches(config, s["imgsz"], batch, steps)
    torch.manual_seed(0)
    eager, e_opt, e_sched = build_ours(cfg, device, iters_per_epoch=100)
    torch.manual_seed(0)
    model, c_opt, c_sched = build_ours(cfg, device, iters_per_epoch=100)
    compiled = compile_for_training(model, "inductor")
    t0 = time.perf_counter()
    our_epoch(compiled, batches[:1], c_opt, c_sched, device, 1, cfg, amp_dtype=amp_dtype)
    compile_s = time.perf_counter() - t0
    times = time_interleaved({"eager": lambda: our_epoch(eager, batches, e_opt, e_sched, device, 1, cfg, amp_dtype),
                              "compiled": lambda: our_epoch(compiled, batches, c_opt, c_sched, device, 1, cfg,
                                                            amp_dtype)},
                             reps=s["reps"], warmup=1, device=device)
    n = batch * steps
    log(f"compile: {compile_s:.1f}s; eager {n / min(times['eager']):.1f}, compiled {n / min(times['compiled']):.1f} img/s")
    return make_row(f"train images/s, batch {batch}: ours eager vs ours --compile ({device.type})",
                    [n / t for t in times["eager"]], [n / t for t in times["compiled"]], "info", "img/s",
                    higher_is_better=True, note=f"inductor, first step (compile) {compile_s:.0f}s")


def backbone_ceiling(model: nn.Module, batch: int, imgsz: int, amp_dtype, device: torch.device,
                     reps: int) -> list[float]:
    """Images/s of the frozen backbone's forward alone at ``batch``: what no training step can beat."""
    from src.detection.core.runtime import autocast_context

    dino = model.dino
    x = torch.randn(batch, 3, imgsz, imgsz, device=device).contiguous(memory_format=torch.channels_last)
    dino_cl = dino.to(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), autocast_context(device, amp_dtype):
            dino_cl.forward_multi(x)

    times = time_interleaved({"b": forward}, reps=max(3, reps), warmup=2, device=device)["b"]
    return [batch / t for t in times]


def sync_row(model, optimizer, scheduler, batches: list, device: torch.device, cfg: TrainConfig,
             amp_dtype) -> dict[str, Any]:
    """Host-device synchronisations in ``len(batches)`` training steps with the progress read-back only at the end
    (``torch.cuda.set_sync_debug_mode("warn")`` reports every one)."""
    from src.detection.engine.loop import train_one_epoch

    our_epoch(model, batches, optimizer, scheduler, device, 1, cfg, amp_dtype=amp_dtype)  # warm: anchors, kernels
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, batches, optimizer, scheduler, device, 1, clip_grad=cfg.clip_grad,
                            amp_dtype=amp_dtype, total=len(batches), desc="bench", log_interval=len(batches))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    log(f"syncs in {len(batches)} steps: {len(syncs)} {sorted(set(syncs))[:3]}")
    return {"name": f"host syncs in {len(batches)} training steps, progress read once at the end ({device.type})",
            "baseline": float("nan"), "ours": float(len(syncs)), "ratio": float("nan"), "goal": "info",
            "unit": "syncs", "note": "torch.cuda.set_sync_debug_mode('warn'); goal: 1 (the epoch-end read-back)"}


def cache_rows(s: dict[str, Any], config: Path, device: torch.device, root: Path,
               feature_extractor: str = "multi", goal: Any = GOAL_CACHE) -> list[dict[str, Any]]:
    """Epoch seconds of the real training loader vs the ``--cache-features ram`` loader (epochs >= 2)."""
    from src.detection.core.runtime import amp_settings
    from src.detection.data.datasets import load_data_config
    from src.detection.engine.training import data_loaders, prepare_feature_cache
    from src.detection.modeling.input_spec import InputSpec

    imgsz, batch = s["imgsz"], s["epoch_batch"]
    # 2 shared cores: a worker process only competes with compute; a GPU machine decodes in parallel
    workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    args = TrainConfig.from_dict({"config": str(config), "imgsz": (imgsz, imgsz), "batch": batch, "workers": workers,
                                  "model_name": s["model_name"], "cache_features": "ram",
                                  "feature_extractor": feature_extractor,
                                  # on a CPU the recipe the README recommends there
                                  "head_separable": device.type == "cpu" and feature_extractor == "multi"})
    data_cfg = load_data_config(config)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # dataset summaries
        train_ds, valid_ds, loader, sampler, _ = data_loaders(args, data_cfg, InputSpec((imgsz, imgsz)), 0, 1,
                                                            device)
    model, opt, sched = build_ours(args, device, iters_per_epoch=len(loader))
    cached: dict[str, Any] = {}

    amp = amp_settings(args.runtime.precision, device)[0]  # the default --precision auto, as train.run applies it

    def build() -> None:
        cached["loader"], cached["sampler"], _ = prepare_feature_cache(
            args, model, train_ds, valid_ds, device, root / "cache_run", 0, 1, False, amp)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        build_s = time_call(build, device)
    c_loader, c_sampler = cached["loader"], cached["sampler"]
    plain, cache = [], []
    for epoch in range(1, s["epochs"] + 1):  # interleaved so both see the same machine load
        sampler.set_epoch(epoch)
        plain.append(time_call(lambda: our_epoch(model, loader, opt, sched, device, epoch, args, amp), device))
        c_sampler.set_epoch(epoch)
        cache.append(time_call(lambda: our_epoch(model, c_loader, opt, sched, device, epoch, args, amp), device))
    n = len(sampler)
    log(f"cache ({feature_extractor}): epochs without {[round(t, 1) for t in plain]}s, with {[round(t, 1) for t in cache]}s")
    head = "--feature-extractor last (reference head)"
    if feature_extractor == "multi":
        head = "default multi-level" + (" --head-separable (the CPU recipe)" if args.detector.head_separable else "")
    note = (f"{head}; {n} images/epoch, batch {batch}, flip augmentation, epochs 2-{s['epochs']} (epoch 1: "
            f"{plain[0]:.1f}s vs {cache[0]:.1f}s); one-off cache build {build_s:.1f}s ({n} images x 2 flips)")
    suffix = "" if feature_extractor == "multi" else ", --feature-extractor last"
    return [make_row(f"epoch time without vs with --cache-features ram{suffix}, from epoch 2 ({device.type})",
                     plain[1:], cache[1:], goal, "s", higher_is_better=False, note=note)]


EPOCH_IMAGES = 16_551  # Pascal VOC 2007+2012 trainval
GOAL_EPOCH_S = 45.0  # one such epoch at 640 px, batch 32, data loading included, on an H200 (reference, RTX 3080: 345 s)


def full_epoch_row(root: Path, device: torch.device, n_images: int = EPOCH_IMAGES, batch: int = 32,
                   imgsz: int = 640, unique: int = 512) -> dict[str, Any]:
    """One epoch of ``n_images`` training images through ``train_detection.py`` itself (decoding, augmentation,
    loader workers, CUDA-graph capture all included): ``unique`` synthetic 640 px images in YOLO layout, linked
    under ``n_images`` names; the epoch's own ``seconds`` from ``results.csv``."""
    import csv
    import subprocess
    import time

    from src.detection.data.synthetic import generate_dataset

    t0 = time.perf_counter()
    config = generate_dataset(root / "epoch_data", unique, 32, imgsz=imgsz, seed=1, format="yolo")
    images, labels = root / "epoch_data" / "images" / "train", root / "epoch_data" / "labels" / "train"
    sources = sorted(images.glob("*.jpg"))
    for i in range(len(sources), n_images):
        src = sources[i % len(sources)]
        os.link(src, images / f"copy_{i:06d}.jpg")
        os.link(labels / f"{src.stem}.txt", labels / f"copy_{i:06d}.txt")
    made = time.perf_counter() - t0
    workers = min(16, os.cpu_count() or 1)
    cmd = [sys.executable, "train_detection.py", "--config", str(config), "--model-name", "dinov3_convnext_tiny",
           "--imgsz", str(imgsz), "--batch", str(batch), "--workers", str(workers), "--epochs", "1",
           "--device", device.type, "--out-dir", str(root / "runs"), "--name", "epoch", "--exist-ok"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"epoch run failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(root / "runs" / "epoch" / "results.csv", newline="") as f:
        epoch_s = float(next(csv.DictReader(f))["seconds"])
    log(f"{n_images}-image epoch: {epoch_s:.1f}s ({wall:.0f}s with start-up and evaluation; data made in {made:.0f}s)")
    return {"name": f"one epoch of {n_images:,} images at {imgsz}x{imgsz}, batch {batch}, data loading included "
                    f"({device.type})", "baseline": GOAL_EPOCH_S, "ours": epoch_s, "ratio": GOAL_EPOCH_S / epoch_s,
            "goal": 1.0, "unit": "s",
            "note": f"train_detection.py defaults, dinov3_convnext_tiny, {workers} loader workers; baseline = the "
                    f"goal ({GOAL_EPOCH_S:.0f} s; the reference on an RTX 3080: 345 s); {images_per_s(n_images, epoch_s)}"
                    f"; whole command {wall:.0f}s (start-up, cache-free, evaluation of 32 images)"}


def images_per_s(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} img/s"


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """All training rows ``{name, baseline, ours, ratio, goal, unit, *_spread, note}`` on ``device``."""
    s = settings(quick, device)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        config = make_data(root, max(s["n_images"], s["epoch_images"]), s["imgsz"])
        rows = ops_rows(s, root) + training_rows(s, config, dev)
        rows += cache_rows(s, config, dev, root)
        if s["variants"]:
            rows += cache_rows(s, config, dev, root, feature_extractor="last", goal="info")
    for r in rows:  # a NaN would make every ratio meaningless: fail loudly instead
        for key in ("baseline", "ours", "ratio"):
            if not math.isfinite(r[key]) and r.get("unit") != "syncs":
                raise RuntimeError(f"{r['name']}: non-finite {key} {r[key]}")
    return rows


def main() -> None:
    bench_main(run, __doc__, "tiny backbone at 160 px, few repetitions", device="cpu", device_help="cpu or cuda[:N]")


if __name__ == "__main__":
    main()
