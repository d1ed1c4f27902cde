"""Checkpoint files: what a payload holds, the atomic save, the ``weights_only`` load, and a clear error for every
kind of wrong file (backbone weights, safetensors, foreign or unsafe pickles, damage).

Payload (all plain tensors / containers / numbers / strings, so the safe unpickler accepts it)::

    {"format": "dinov3-detection", "format_version": card.FORMAT_VERSION,
     "meta": the model card (card.ModelCard.to_dict()),
     "model": state_dict, "optimizer", "scheduler", "scaler", "ema", "epoch", "best_metric", "rng",
     "train_config" (training checkpoints: TrainConfig.to_dict())}

By default the frozen backbone is saved inside ``model`` so inference needs no backbone weights file;
``include_backbone=False`` keeps only the trainable part, and loading then needs the backbone ``--weights``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..core.errors import UserError
from ..core.io import atomic_write
from ..core.paths import resolve_path
from ..core.runtime import unwrap
from .card import FORMAT, FORMAT_VERSION, ModelCard
from .reference import REFERENCE_FORMAT, looks_like_reference
from .rng import get_rng_state

# Key patterns of raw DINOv3 backbone state dicts under a prefix (official ConvNeXt / ViT, transformers and timm
# names; unprefixed files are recognised by ``weight_formats.weights_layout``), used only to tell the user they
# passed a backbone file where a detector checkpoint was expected. Detector state dicts have heads / anchors.
_BACKBONE_KEY_HINTS = tuple(re.compile(r"(^|\.)" + h) for h in (
    r"downsample_layers\.", r"stages\.\d+\.((layers|blocks)\.)?\d+\.", r"stem\.", r"patch_embed(dings)?\.",
    r"(cls_token|reg_token|storage_tokens|register_tokens|mask_token)$", r"rope_embed", r"blocks\.\d+\.",
    r"embeddings\.", r"layer\.\d+\."))
_DETECTOR_KEY_PREFIXES = ("head.classification_head", "head.regression_head", "backbone.body", "backbone.fpn",
                          "anchor")


# --------------------------------------------------------------------------------------------------- write
def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that belong to its frozen DINOv3 backbone (empty when fine-tuned)."""
    dino = getattr(model, "dino", None)
    if dino is None or not getattr(dino, "frozen", True):
        return set()
    ids = {id(t) for t in dino.state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def build_payload(model: nn.Module, meta: dict[str, Any] | ModelCard, optimizer: Any = None, scheduler: Any = None,
                  scaler: Any = None, ema: Any = None, epoch: int = 0, best_metric: float | None = None,
                  rng: dict[str, Any] | None = None, include_backbone: bool = True) -> dict[str, Any]:
    """Everything a checkpoint holds. ``meta``: the model's card (``ModelCard`` or its ``to_dict()``, e.g. from
    ``card.model_meta``; extra keys are kept).

    ``rng=None`` captures the current RNG states. ``include_backbone=False`` drops a *frozen* backbone's tensors
    (a fine-tuned backbone is always saved, since no weights file could restore it).
    """
    model = unwrap(model)
    state = model.state_dict()
    skip = set() if include_backbone else frozen_backbone_keys(model)
    meta = meta.to_dict() if isinstance(meta, ModelCard) else dict(meta)
    meta.setdefault("toolkit_version", __version__)
    meta["includes_backbone"] = not skip
    if skip and not meta.get("weights"):
        raise UserError("--no-save-backbone needs --weights: a randomly initialised backbone can only be restored "
                        "from the checkpoint itself; drop --no-save-backbone")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "model": {k: v for k, v in state.items() if k not in skip},
        "optimizer": _state(optimizer),
        "scheduler": _state(scheduler),
        "scaler": _state(scaler),
        "ema": _state(ema),
        "epoch": int(epoch),
        "best_metric": None if best_metric is None else float(best_metric),
        "rng": get_rng_state() if rng is None else rng,
    }


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (``core.io.atomic_write``): a crash or exception mid-write leaves
    any existing file at ``path`` untouched and no partial file behind."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


# --------------------------------------------------------------------------------------------------- read
def _find(path: str | os.PathLike) -> Path:
    p = resolve_path(path)
    if not p.exists():
        raise UserError(f"checkpoint {path} not found; pass a .pth written by train_detection.py "
                        f"(e.g. outputs/img_det/<run>/best_model.pth) with --model")
    if p.is_dir():
        if (p / "config.json").is_file() or any(p.glob("*.safetensors")):
            raise UserError(f"{path} looks like a backbone weights folder (transformers / timm), not a detector "
                            f"checkpoint; pass it with --weights, not --model")
        raise UserError(f"checkpoint {path} is a folder; pass the .pth file inside it (e.g. {p}/best_model.pth)")
    return p


def _state_dict_in(obj: Any) -> dict | None:
    """The state dict a weights file holds (unwrapped once from ``{"model": ...}`` / ``{"state_dict": ...}``)."""
    if isinstance(obj, dict) and "format" not in obj:
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj if isinstance(obj, dict) else None


def _looks_like_backbone(obj: Any) -> bool:
    """Raw DINOv3 backbone weights in any published layout (Meta, transformers, timm), possibly under a prefix."""
    from ..modeling.weight_formats import weights_layout

    sd = _state_dict_in(obj)
    if not sd:
        return False
    keys = [k for k in sd if isinstance(k, str)]
    tensors = sum(isinstance(v, torch.Tensor) for v in sd.values())
    if tensors < 0.9 * len(sd) or any(k.startswith(_DETECTOR_KEY_PREFIXES) for k in keys):
        return False
    return weights_layout(sd) is not None or any(h.search(k) for k in keys for h in _BACKBONE_KEY_HINTS)


def _safetensors_keys(p: Path) -> list[str] | None:
    """The tensor names of a safetensors file (header only), None for any other file."""
    from safetensors import SafetensorError, safe_open

    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: 8-byte header length, then the JSON header
        return None
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError):
        return None


def _unloadable(p: Path) -> str:
    """Why the safe unpickler refused ``p``: Python objects it does not allow (listed from the file's pickle without
    running it), else damage."""
    unsafe: list[str] = []
    if zipfile.is_zipfile(p):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(p)
        except (RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError):
            pass
    else:
        with open(p, "rb") as f:
            pickled = f.read(1) == b"\x80"  # the pickle protocol marker a pre-1.6 torch.save file starts with
        if pickled:  # that format cannot be inspected without unpickling it
            return (f"checkpoint {p} cannot be loaded safely (an old torch.save format holding Python objects, or "
                    f"a damaged file); pass a .pth written by train_detection.py")
    if unsafe:
        return (f"checkpoint {p} contains arbitrary Python objects ({', '.join(unsafe[:3])}), so it was not written "
                f"by this toolkit and is not loaded for safety; pass a .pth written by train_detection.py")
    return (f"checkpoint {p} is corrupt or truncated (UnpicklingError); re-copy it or use another checkpoint "
            f"(e.g. last_model.pth)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate the container of one of our checkpoints (its card is read by ``card.load_card``); every
    kind of wrong file becomes a one-line UserError. ``path`` resolves by ``core.paths.resolve_path``.

    A reference-project checkpoint comes back as ``{"format": REFERENCE_FORMAT, "meta": None, "model": ...}``
    (``build.prepare_checkpoint`` describes it with the user's flags)."""
    p = _find(path)
    keys = _safetensors_keys(p)
    if keys is not None:  # torch.load cannot read it; only backbone weights come as safetensors
        from ..modeling.weight_formats import weights_layout

        what = "a backbone weights file" if weights_layout(dict.fromkeys(keys)) else "a safetensors weights file"
        raise UserError(f"{p} is {what}, not a detector checkpoint; pass backbone weights with --weights, and "
                        f"a .pth written by train_detection.py with --model")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(_unloadable(p)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {p} is corrupt or truncated ({first}); re-copy it or use another checkpoint "
                        f"(e.g. last_model.pth)") from None
    if looks_like_reference(obj):
        return {"format": REFERENCE_FORMAT, "meta": None, "model": obj["model_state_dict"],
                "epoch": obj.get("epoch"), "path": str(p)}
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if _looks_like_backbone(obj):
            raise UserError(f"{p} looks like a backbone weights file, not a detector checkpoint; pass it with "
                            f"--weights, not --model")
        found = ", ".join(sorted(map(str, obj))[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{p} is not a checkpoint of this toolkit (found: {found}); pass a .pth written by "
                        f"train_detection.py with --model")
    version = obj.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"checkpoint {p} has format_version {version!r}, this toolkit reads 1..{FORMAT_VERSION}; "
                        f"use the toolkit version that wrote it ({obj.get('meta', {}).get('toolkit_version', '?')})")
    missing = [k for k in ("meta", "model") if not isinstance(obj.get(k), dict)]
    if missing:
        raise UserError(f"checkpoint {p} is incomplete (no {', '.join(missing)}); re-save it with train_detection.py")
    obj["path"] = str(p)
    return obj
