"""Where and how models run: device choice, precision (autocast / GradScaler), timing, distributed helpers.

Precision rules (one place, fixed, so the same checkpoint on the same machine always gives the same boxes):

* training ``--amp auto``: bf16 autocast where the hardware runs bf16 natively (CUDA compute capability >= 8,
  CPUs with AVX-512 BF16 / AMX), fp16 + GradScaler on older CUDA GPUs, fp32 elsewhere;
* inference ``--precision auto``: on CUDA bf16 autocast where the GPU runs it natively (compute capability >= 8),
  fp16 on older GPUs (and with ``--half``): detections match fp32 within the tolerances in README.md's precision
  section and the model runs at tensor-core speed; on a CPU with native bf16, bf16 for
  backbones of at least ``CPU_BF16_MIN_BACKBONE_PARAMS`` parameters, fp32 for smaller ones (measured in
  benchmarks/bench_infer.py: bf16 was 3.1x faster for convnext_tiny at 640, 4x slower for convnext_atto at 192,
  whose small convolutions do not amortise the bf16 reorders); fp32 on CPUs without native bf16 (emulated bf16
  is slower).
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .choices import PRECISIONS
from .errors import UserError

CPU_BF16_MIN_BACKBONE_PARAMS = 20_000_000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------- devices
def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda``/``cuda:N``/``cpu`` are checked."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name!r} is not valid; use auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------------- precision
def cpu_bf16_supported() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 / AMX); otherwise bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16_native(device: torch.device) -> bool:
    """Native bf16 tensor cores (Ampere, compute capability >= 8). ``torch.cuda.is_bf16_supported()`` also
    reports emulated bf16 on older GPUs (T4, V100), where it is slow, so the capability decides."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def amp_settings(amp: str | None, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Training autocast dtype and GradScaler for ``--precision`` (``--amp``; ``auto``: see the module docstring)."""
    if amp in (None, "none", "fp32"):
        return None, None
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if cuda_bf16_native(device) else "fp16"
        elif cpu_bf16_supported():
            amp = "bf16"
        else:
            return None, None
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32")
        return torch.float16, torch.amp.GradScaler("cuda")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use --precision fp16")
    return torch.bfloat16, None


def inference_precision(precision: str | None, device: torch.device, backbone_params: int) -> str:
    """The autocast precision inference runs in (``auto``/None: see the module docstring)."""
    cuda = device.type == "cuda"
    if precision in (None, "auto"):
        if cuda:
            precision = "bf16" if cuda_bf16_native(device) else "fp16"
        elif cpu_bf16_supported() and backbone_params >= CPU_BF16_MIN_BACKBONE_PARAMS:
            precision = "bf16"
        else:
            precision = "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 / --half need a CUDA device; on CPU use --precision bf16")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")
    return precision


def autocast_context(device: torch.device, dtype: torch.dtype | str | None, cache: bool = True):
    """``torch.autocast`` for ``dtype`` (a dtype or ``fp32``/``fp16``/``bf16``); a no-op for fp32/None.
    ``cache=False`` for work captured in a CUDA graph (cached weight casts are freed when autocast exits)."""
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)  # type: ignore[arg-type]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# --------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings are real (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates synchronised wall time and item counts, e.g. ``with sw.time(n_images): model(x)``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self.items = 0
        self.last = 0.0

    def time(self, items: int = 1):
        sw = self

        class _Ctx:
            def __enter__(self):
                synchronize(sw.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(sw.device)
                sw.last = time.perf_counter() - self.t0
                sw.seconds += sw.last
                sw.items += items
                return False

        return _Ctx()

    @property
    def rate(self) -> float:
        """Items per second over everything timed so far."""
        return self.items / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------- distributed
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def setup_distributed(device_arg: str) -> tuple[torch.device, int, int]:
    """Initialise DDP when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return select_device(device_arg), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return device, dist.get_rank(), dist.get_world_size()


def unwrap(model: nn.Module) -> nn.Module:
    """The real model behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
