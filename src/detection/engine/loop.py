"""Train / evaluate loops (one epoch at a time), optimizer + LR schedule, EMA, distributed helpers."""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..core.errors import UserError
from ..core.runtime import autocast_context, is_distributed, is_main_process, unwrap, world_size
from ..evaluation.evaluator import DatasetEvaluator
from ..evaluation.metrics import DetectionEvaluator
from ..modeling.losses import PaddedTargets, pad_targets


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` as training runs it: on a GPU the backbone in channels-last, its fast layout there
    (the layout inference uses; the neck and head stay NCHW, which GroupNorm needs to avoid layout copies)."""
    model = model.to(device)
    if device.type == "cuda":
        unwrap(model).dino.to(memory_format=torch.channels_last)
    return model


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
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=_fusable(param_groups))
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True,
                               fused=_fusable(param_groups))
    raise UserError(f"--optimizer {name!r} is not supported; use adamw or sgd")


def _fusable(param_groups: list[dict[str, Any]]) -> bool | None:
    """Fused AdamW / SGD (one kernel per step, and a step that a device-side flag can skip, so a non-finite loss
    needs no host sync) where every parameter is a float tensor on a CPU or CUDA device; else torch's default."""
    params = [p for g in param_groups for p in g["params"]]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step`` honours a device-side ``found_inf`` flag (torch's fused Adam(W) / SGD)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


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
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One averaging step; ``applied`` (a 0/1 device tensor) turns it into a no-op for a skipped optimizer step
        without reading the flag on the host."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmup))  # small decay early: YOLO-style ramp
        if applied is None:
            for n, t in self._tensors(model).items():
                self.shadow[n].mul_(d).add_(t.detach(), alpha=1 - d)
            return
        keep = d + (1 - d) * (1 - applied)  # d for an applied step, 1 (shadow unchanged) for a skipped one
        for n, t in self._tensors(model).items():
            self.shadow[n].mul_(keep).add_(t.detach() * (1 - keep))

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
LOG_INTERVAL = 20  # steps between the (only) host reads of a training epoch: progress bar and the non-finite check
BOX_BUCKET = 16  # ground truth is padded to a multiple of this many boxes, so step shapes rarely change


def padded_targets(targets: list[dict], device: torch.device) -> PaddedTargets:
    """A batch's ground truth padded on the host (``losses.pad_targets``) to a multiple of ``BOX_BUCKET`` boxes and
    copied to ``device`` without blocking (from pinned memory on CUDA)."""
    most = max((int(t["boxes"].shape[0]) for t in targets), default=0)
    padded = pad_targets(targets, device="cpu", max_boxes=max(BOX_BUCKET, -(-most // BOX_BUCKET) * BOX_BUCKET))
    if device.type == "cuda":
        padded = padded.pin_memory()
    return padded.to(device, non_blocking=True)


class NonFiniteGuard:
    """Skip steps with a NaN/inf loss; stop with a clear message after ``limit`` in a row.

    ``check`` decides on the host (optimizers without a device-side skip); ``observe`` counts on the device and
    ``read`` checks those counts when the loop reads back anyway (every ``LOG_INTERVAL`` steps)."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0
        self._device_counts: torch.Tensor | None = None  # [current run, longest run, skipped] since the last read

    def check(self, finite: bool, epoch: int) -> bool:
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        self._raise_if_diverged(self.in_row, epoch)
        return False

    def observe(self, finite: torch.Tensor) -> None:
        bad = 1 - finite
        if self._device_counts is None:  # filled on the device: a host-to-device copy would synchronise
            run = finite.new_full((), float(self.in_row))
            self._device_counts = torch.stack([run, run, finite.new_zeros(())])
        run = (self._device_counts[0] + 1) * bad
        self._device_counts = torch.stack([run, torch.maximum(self._device_counts[1], run),
                                           self._device_counts[2] + bad])

    def counts(self) -> torch.Tensor | None:
        """The device counters to read back with the loss sums (one transfer for both)."""
        return self._device_counts

    def read(self, counts: list[float], epoch: int) -> None:
        run, longest, skipped = (int(c) for c in counts)
        self.in_row, self.total, self._device_counts = run, self.total + skipped, None
        self._raise_if_diverged(longest, epoch)

    def _raise_if_diverged(self, in_row: int, epoch: int) -> None:
        if in_row >= self.limit:
            raise UserError(f"training diverged: {in_row} non-finite losses in a row in epoch {epoch}; "
                            f"lower --lr, add --clip-grad, or drop --amp fp16")


def backward_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, finite: torch.Tensor,
                      clip_grad: float, on_device: bool) -> None:
    """Backward, gradient clipping and the optimizer step; ``on_device``: a fused optimizer skips the step itself
    when ``finite`` (a 0/1 device tensor) is 0, so nothing waits for the host. Shared by the eager and the graphed
    step."""
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(trainable_parameters(model), clip_grad)
    if not on_device:
        optimizer.step()
        return
    optimizer.found_inf = 1 - finite
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class GraphedTrainStep:
    """The training step (forward, losses, backward, gradient clipping, fused AdamW step) replayed from a CUDA graph
    per batch signature (``core.graphs``): on a GPU the step's ~2,000 small kernels cost more to launch than to
    run, and a graph launches them at once. Eligible when nothing in the step needs the host: CUDA, a fused
    optimizer that skips non-finite steps itself, no GradScaler (bf16 or fp32), no DDP, no ``torch.compile``, a
    frozen backbone.

    The learning rate enters the captured optimizer step as a device tensor that each call refreshes from the
    scheduler's float (group ``lr`` stays a float, so checkpoints and schedulers are unchanged).
    Returns the step's ``(loss_dict, loss, finite)``: static tensors, valid until the next call.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 amp_dtype: torch.dtype | None, clip_grad: float):
        from ..core.graphs import GraphedFunction

        self.model, self.optimizer, self.clip_grad, self.amp_dtype = model, optimizer, clip_grad, amp_dtype
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in optimizer.param_groups]
        self.graphed = GraphedFunction(self._step, name="training step", warmup=2,
                                       context=lambda: autocast_context(device, amp_dtype, cache=False))

    @staticmethod
    def eligible(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 scaler: Any) -> bool:
        from ..core.graphs import graphs_supported

        # a frozen backbone only: a partly trained one has not been captured cleanly (a host copy inside the step)
        return (graphs_supported(device) and scaler is None and skips_on_device(optimizer) and
                isinstance(optimizer, torch.optim.AdamW) and not is_distributed() and
                not hasattr(model, "_orig_mod") and unwrap(model) is model and getattr(model.dino, "frozen", True))

    def __call__(self, images: torch.Tensor, targets: PaddedTargets, features: list[torch.Tensor] | None):
        for t, g in zip(self.lrs, self.optimizer.param_groups):
            t.fill_(float(g["lr"]))
        return self.graphed(images, targets, features)

    @contextlib.contextmanager
    def _device_lr(self):
        """While capturing, the optimizer step reads the LR from device memory that ``__call__`` refreshes."""
        if not torch.cuda.is_current_stream_capturing():
            yield
            return
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        for g, t in zip(groups, self.lrs):
            g["lr"], g["capturable"] = t, True
        try:
            yield
        finally:
            for g, (lr, cap) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, cap

    def _step(self, images: torch.Tensor, targets: PaddedTargets, features: list[torch.Tensor] | None):
        cache_ctx = contextlib.nullcontext() if features is None else self.model.cached_features(features)
        with cache_ctx:
            loss_dict = self.model(images, targets)
        loss = sum(loss_dict.values())
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        self.optimizer.zero_grad(set_to_none=True)
        with self._device_lr():
            backward_and_step(self.model, self.optimizer, loss, finite, self.clip_grad, on_device=True)
        # detached: a reference to the autograd graph kept past the step would tie its gradient-accumulation
        # nodes to this step's stream
        return {k: v.detach() for k, v in loss_dict.items()}, loss.detach(), finite


_GRAPHED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_step_for(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                     amp_dtype: torch.dtype | None, clip_grad: float, scaler: Any,
                     cuda_graphs: bool | None) -> GraphedTrainStep | None:
    """The optimizer's ``GraphedTrainStep`` (kept across epochs, so each batch signature is captured once), or
    None when graphs are off or the step is not eligible. ``cuda_graphs``: None = on where eligible."""
    if cuda_graphs is False or not GraphedTrainStep.eligible(model, optimizer, device, scaler):
        return None
    step = _GRAPHED_STEPS.get(optimizer)
    if step is None or (step.model, step.amp_dtype, step.clip_grad) != (model, amp_dtype, clip_grad):
        step = _GRAPHED_STEPS[optimizer] = GraphedTrainStep(model, optimizer, device, amp_dtype, clip_grad)
    return step


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                    clip_grad: float = 0.0, ema: ModelEMA | None = None, guard: NonFiniteGuard | None = None,
                    total: int | None = None, desc: str = "train", log_interval: int = LOG_INTERVAL,
                    cuda_graphs: bool | None = None) -> dict[str, float]:
    """One pass over ``batches`` of ``(images, targets)`` or ``(images, targets, cached_features)``.

    The step never waits for the device: ground truth goes in padded (``PaddedTargets``: the model computes its
    losses for the whole batch), losses are summed on the device and read back every ``log_interval`` steps (the
    progress bar, the non-finite check) and at the end, and a step with a non-finite loss is skipped by the fused
    optimizer itself (``found_inf``). Optimizers without that ability fall back to a host check per step. On CUDA
    the whole step is replayed from a CUDA graph where it can be (``GraphedTrainStep``; ``cuda_graphs=False``
    turns that off).

    Returns epoch-mean losses per component (``loss_*``) and their sum ``train_loss``, plus ``skipped_steps``.
    """
    model.train()
    guard = guard or NonFiniteGuard(10)
    on_device = skips_on_device(optimizer)
    keys: list[str] = []
    sums: torch.Tensor | None = None  # per component, then the total, then the count of applied steps
    read: list[float] = []
    skipped_host = 0
    skipped_before = guard.total
    bar = tqdm(batches, total=total, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False)

    def read_back() -> None:
        nonlocal read
        counts = guard.counts()
        vec = sums if counts is None else torch.cat([sums, counts.to(sums.dtype)])
        values = vec.tolist()
        read = values[:len(keys) + 2]
        if counts is not None:
            guard.read(values[len(keys) + 2:], epoch)
        if read[-1]:
            bar.set_postfix(loss=f"{read[-2] / read[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")

    graphed = graphed_step_for(model, optimizer, device, amp_dtype, clip_grad, scaler, cuda_graphs)
    for i, batch in enumerate(bar):
        images = batch[0].to(device, non_blocking=True)
        targets = padded_targets(batch[1], device)
        # feature cache: fp16 maps, cast once by the model to its input dtype
        features = [f.to(device, non_blocking=True) for f in batch[2]] if len(batch) > 2 else None
        if graphed is not None:  # eligible only where the optimizer skips on the device (on_device)
            loss_dict, loss, finite = graphed(images, targets, features)
        else:
            cache_ctx = contextlib.nullcontext() if features is None else unwrap(model).cached_features(features)
            with cache_ctx, autocast_context(device, amp_dtype):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            # All ranks must agree on skipping, otherwise DDP deadlocks in the next all-reduce.
            finite = torch.isfinite(loss.detach()).all().to(torch.float32)
            if is_distributed():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            optimizer.zero_grad(set_to_none=True)
            if not on_device and not guard.check(finite.item() == 1.0, epoch):
                skipped_host += 1
                if scheduler is not None:
                    scheduler.step()
                continue
            if scaler is not None:  # GradScaler skips non-finite steps itself (without a sync for fused optimizers)
                scaler.scale(loss).backward()
                if clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(trainable_parameters(model), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                backward_and_step(model, optimizer, loss, finite, clip_grad, on_device)
        keys = keys or list(loss_dict)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model, finite if on_device else None)
        if on_device:
            guard.observe(finite)
        sums = _add_step(sums, loss_dict, loss, finite, keys)
        if (i + 1) % log_interval == 0:
            read_back()
    if sums is not None and (i + 1) % log_interval:
        read_back()
    bar.close()
    n_steps = read[-1] if read else 0.0
    # torchvision names differ per head; prefix them for results.csv
    means = {(k if k.startswith("loss_") else f"loss_{k}"): v / max(1.0, n_steps) for k, v in zip(keys, read)}
    if read:
        means["train_loss"] = read[len(keys)] / max(1.0, n_steps)
    if is_distributed():  # average the epoch means over ranks so rank 0 logs the global numbers
        names = sorted(means)
        vec = torch.tensor([means[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        means = dict(zip(names, (vec / world_size()).tolist()))
    means["skipped_steps"] = float(skipped_host + guard.total - skipped_before) if on_device else float(skipped_host)
    return means


def _add_step(sums: torch.Tensor | None, loss_dict: dict[str, torch.Tensor], loss: torch.Tensor,
              finite: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """The epoch's device-side sums plus this step's losses per component, their total and the applied count
    (a skipped step adds zeros)."""
    step = torch.stack([loss_dict[k].detach().float().sum() for k in keys] + [loss.detach().float().sum()])
    step = torch.cat([torch.nan_to_num(step) * finite, finite.reshape(1)])
    return step if sums is None else sums + step


@torch.inference_mode()
def predict_batches(model: nn.Module, loader: Iterable, device: torch.device, *, spec: Any = None,
                    amp_dtype: torch.dtype | str | None = None, desc: str = "eval"):
    """Yield ``(predictions, targets)`` per batch, predictions mapped to ORIGINAL image coordinates (CPU).

    The loader's images were resized by ``spec`` (``InputSpec``; default: the model's) and boxes go back through
    ``spec.boxes_to_original`` - the same functions inference uses. Batches of ``(images, targets,
    cached_features)`` run the model on the cached backbone maps.
    """
    model.eval()
    spec = spec if spec is not None else unwrap(model).input_spec
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
             metric: str = "coco", amp_dtype: torch.dtype | str | None = None,
             evaluator: DatasetEvaluator | None = None):
    """Run the model over ``loader`` and score it in original image coordinates (``predict_batches``).

    ``evaluator`` (default: a ``DetectionEvaluator`` for ``classes`` and ``metric``) is reset, fed every batch and
    asked for the result; under DDP each rank processes its shard and rank 0 gets the merged result.
    Returns the result on rank 0 and ``None`` elsewhere.
    """
    evaluator = evaluator or DetectionEvaluator(classes, metric=metric)
    evaluator.reset()
    start = time.perf_counter()
    for preds, targets in predict_batches(model, loader, device, spec=spec, amp_dtype=amp_dtype):
        evaluator.process(preds, targets)
    result = evaluator.evaluate()
    if result is not None:
        result.seconds = time.perf_counter() - start
    return result
