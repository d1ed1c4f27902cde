"""Train / evaluate loops (one epoch at a time), optimizer + LR schedule, EMA, distributed helpers."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..core.errors import UserError
from ..core.runtime import autocast_context, is_distributed, is_main_process, unwrap, world_size
from ..evaluation.metrics import DetectionEvaluator


# ----------------------------------------------------------------------------------------------- optimisation
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    backbone_lr: float | None = None, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW (the reference's default) or SGD over trainable params; no weight decay on norms/biases.

    Backbone parameters that train get ``backbone_lr`` (default ``lr``) for the deepest trained layer and
    ``layer_decay`` times the next layer's LR for each earlier one (layer-wise LR decay; groups from
    ``DinoBackbone.layer_groups``). Every group records its ``name`` for logs.
    """
    m = unwrap(model)
    dino = getattr(m, "dino", None)
    depth_of: dict[int, int] = {}  # id(param) -> distance from the deepest trained backbone layer
    backbone_ids: set[int] = set()
    if dino is not None:
        backbone_ids = {id(p) for p in dino.parameters()}
        groups_by_depth = dino.layer_groups() if hasattr(dino, "layer_groups") else [
            [p for p in dino.parameters() if p.requires_grad]]
        for d, params in enumerate(reversed(groups_by_depth)):
            depth_of.update({id(p): d for p in params})
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}  # (backbone depth or -1 for the head, no_decay)
    for p in m.parameters():
        if not p.requires_grad:
            continue
        depth = depth_of.get(id(p), 0) if id(p) in backbone_ids else -1
        groups.setdefault((depth, p.ndim <= 1), []).append(p)
    if not groups:
        raise UserError("the model has no trainable parameters; check --fine-tune / the head configuration")
    base_backbone_lr = lr if backbone_lr is None else backbone_lr
    param_groups = []
    for (depth, no_decay), params in sorted(groups.items()):
        group_lr = lr if depth < 0 else base_backbone_lr * layer_decay ** depth
        part = "head" if depth < 0 else f"backbone-{depth}"
        param_groups.append({"params": params, "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay,
                             "name": f"{part}{'-no-decay' if no_decay else ''}"})
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    raise UserError(f"--optimizer {name!r} is not supported; use adamw or sgd")


def lr_factor(it: int, *, total_iters: int, iters_per_epoch: int, warmup_iters: int, schedule: str,
              steps: list[int], gamma: float = 0.1, min_factor: float = 0.01) -> float:
    """Multiplier of the base LR at iteration ``it``: linear warm-up, then none/cosine/step/multistep (epochs)."""
    if warmup_iters > 0 and it < warmup_iters:
        return 0.001 + (1 - 0.001) * it / warmup_iters
    epoch = it // max(1, iters_per_epoch)
    if schedule == "cosine":
        progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        step = steps[0] if steps else max(1, int(total_iters / max(1, iters_per_epoch) * 2 / 3))
        return gamma ** (epoch // step)
    if schedule == "multistep":
        return gamma ** sum(epoch >= s for s in steps)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0.0, warmup_iters: int | None = None, steps: list[int] | None = None,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler (so warm-up works inside the first epoch)."""
    if schedule not in ("none", "cosine", "step", "multistep"):
        raise UserError(f"--scheduler {schedule!r} is not supported; use none, cosine, step or multistep")
    if schedule == "multistep" and not steps:
        raise UserError("--scheduler multistep needs --lr-steps (epochs), e.g. --lr-steps 20 27")
    warm = warmup_iters if warmup_iters is not None else int(round(warmup_epochs * iters_per_epoch))
    kwargs = dict(total_iters=epochs * iters_per_epoch, iters_per_epoch=iters_per_epoch, warmup_iters=warm,
                  schedule=schedule, steps=list(steps or []), gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **kwargs))


class ModelEMA:
    """Exponential moving average of the *trainable* weights (and float buffers) only.

    The frozen backbone never changes, so it is not copied; evaluation swaps the averaged tensors in.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: int = 2000):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.shadow = {n: t.detach().clone() for n, t in self._tensors(model).items()}

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = unwrap(model)
        params = dict(m.named_parameters())
        out = {n: params[n] for n in self.names}
        out.update({n: b for n, b in m.named_buffers() if b.dtype.is_floating_point and not n.startswith("backbone.dino")})
        return out

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmup))  # small decay early: YOLO-style ramp
        for n, t in self._tensors(model).items():
            self.shadow[n].mul_(d).add_(t.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        live = self._tensors(model)
        backup = {n: t.detach().clone() for n, t in live.items()}
        with torch.no_grad():
            for n, t in live.items():
                t.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(backup[n])

    def averaged(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of a model ``state`` dict with the averaged tensors in place of the live ones (for saving: a
        state dict taken inside ``swapped_in`` would share storage with the parameters restored on exit)."""
        return {k: self.shadow[k].detach().clone() if k in self.shadow else v for k, v in state.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.decay = int(state["updates"]), float(state["decay"])
        for n, t in state["shadow"].items():
            if n in self.shadow:
                self.shadow[n].copy_(t)


# ----------------------------------------------------------------------------------------------- loops
def targets_to_device(targets: list[dict], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Only what the detection losses need, as plain tensors."""
    return [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device, torch.float32),
             "labels": t["labels"].to(device)} for t in targets]


class NonFiniteGuard:
    """Skip steps with a NaN/inf loss; stop with a clear message after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def check(self, finite: bool, epoch: int) -> bool:
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise UserError(f"training diverged: {self.in_row} non-finite losses in a row in epoch {epoch}; "
                            f"lower --lr, add --clip-grad, or drop --amp fp16")
        return False


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                    clip_grad: float = 0.0, ema: ModelEMA | None = None, guard: NonFiniteGuard | None = None,
                    total: int | None = None, desc: str = "train") -> dict[str, float]:
    """One pass over ``batches`` of ``(images, targets)`` or ``(images, targets, cached_features)``.

    Returns epoch-mean losses per component (``loss_*``) and their sum ``train_loss``, plus ``skipped_steps``.
    """
    model.train()
    guard = guard or NonFiniteGuard(10)
    sums: dict[str, float] = {}
    n_steps, skipped = 0, 0
    bar = tqdm(batches, total=total, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False)
    for batch in bar:
        images = batch[0].to(device, non_blocking=True)
        targets = targets_to_device(batch[1], device)
        cache_ctx = contextlib.nullcontext()
        if len(batch) > 2:  # feature cache: fp16 maps, cast once by the model to its input dtype
            cache_ctx = unwrap(model).cached_features([f.to(device, non_blocking=True) for f in batch[2]])
        with cache_ctx, autocast_context(device, amp_dtype):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        # All ranks must agree on skipping, otherwise DDP deadlocks in the next all-reduce.
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if is_distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not guard.check(finite.item() == 1.0, epoch):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            if scheduler is not None:
                scheduler.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable_parameters(model), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(trainable_parameters(model), clip_grad)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        n_steps += 1
        for k, v in loss_dict.items():  # torchvision names differ per head; prefix them for results.csv
            key = k if k.startswith("loss_") else f"loss_{k}"
            sums[key] = sums.get(key, 0.0) + float(v.detach())
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
        bar.set_postfix(loss=f"{sums['train_loss'] / n_steps:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    means = {k: v / max(1, n_steps) for k, v in sums.items()}
    if is_distributed():  # average the epoch means over ranks so rank 0 logs the global numbers
        keys = sorted(means)
        vec = torch.tensor([means[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(vec)
        means = dict(zip(keys, (vec / world_size()).tolist()))
    means["skipped_steps"] = float(skipped)
    return means


def _eval_spec(model: nn.Module, spec: Any, imgsz: tuple[int, int] | None, letterbox: bool | None):
    """The input spec evaluation maps boxes back with: ``spec``, else the model's with ``imgsz``/``letterbox``."""
    if spec is not None:
        return spec
    return unwrap(model).input_spec.replace(imgsz=imgsz, letterbox=letterbox)


@torch.inference_mode()
def predict_batches(model: nn.Module, loader: Iterable, device: torch.device, *, spec: Any = None,
                    imgsz: tuple[int, int] | None = None, letterbox: bool | None = None,
                    amp_dtype: torch.dtype | str | None = None, desc: str = "eval"):
    """Yield ``(predictions, targets)`` per batch, predictions mapped to ORIGINAL image coordinates (CPU).

    The loader's images were resized by ``spec`` (``InputSpec``; default: the model's, with ``imgsz``/``letterbox``
    if given) and boxes go back through ``spec.boxes_to_original`` - the same functions inference uses. Batches of
    ``(images, targets, cached_features)`` run the model on the cached backbone maps.
    """
    model.eval()
    spec = _eval_spec(model, spec, imgsz, letterbox)
    for batch in tqdm(loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False):
        images, targets = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        cache_ctx = contextlib.nullcontext()
        if len(batch) > 2 and batch[2] is not None:
            cache_ctx = unwrap(model).cached_features([f.to(device, non_blocking=True) for f in batch[2]])
        with cache_ctx, autocast_context(device, amp_dtype):
            outputs = model(images)
        preds = []
        for out, t in zip(outputs, targets):
            boxes = spec.boxes_to_original(out["boxes"].float().cpu(), tuple(t["orig_size"]))
            preds.append({"boxes": boxes, "scores": out["scores"].float().cpu(), "labels": out["labels"].cpu()})
        yield preds, targets


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, classes: list[str], *, spec: Any = None,
             imgsz: tuple[int, int] | None = None, letterbox: bool | None = None, metric: str = "coco",
             amp_dtype: torch.dtype | str | None = None):
    """Run the model over ``loader`` and score it in original image coordinates (``predict_batches``).

    Only boxes are kept (streaming). Under DDP each rank scores its shard and rank 0 merges them.
    Returns the metrics result on rank 0 and ``None`` elsewhere.
    """
    evaluator = DetectionEvaluator(classes, metric=metric)
    start = time.perf_counter()
    for preds, targets in predict_batches(model, loader, device, spec=spec, imgsz=imgsz, letterbox=letterbox,
                                          amp_dtype=amp_dtype):
        gts = [{"boxes": t["orig_boxes"], "labels": t["orig_labels"], "difficult": t["orig_difficult"]} for t in targets]
        evaluator.update(preds, gts)
    if is_distributed():
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, evaluator.state_dict())
        if not is_main_process():
            return None
        evaluator = DetectionEvaluator(classes, metric=metric)
        for state in gathered:
            evaluator.merge_state(state)
    result = evaluator.compute()
    result.seconds = time.perf_counter() - start
    return result
