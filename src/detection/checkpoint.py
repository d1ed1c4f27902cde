"""Checkpoints: one self-describing format, written atomically, loaded with ``weights_only=True``.

Payload (all plain tensors / containers / numbers / strings, so the safe unpickler accepts it)::

    {"format": "dinov3-detection", "format_version": 1,
     "meta": DetectorConfig.to_dict() + classes, letterbox, mean, std, toolkit_version, includes_backbone,
     "model": state_dict, "optimizer", "scheduler", "scaler", "ema", "epoch", "best_metric", "rng"}

By default the frozen backbone is saved inside ``model`` so inference needs no backbone weights file;
``include_backbone=False`` keeps only the trainable part, and loading then needs the backbone ``--weights``.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import UserError
from .runtime import unwrap
from .utils import REPO_ROOT

FORMAT = "dinov3-detection"
FORMAT_VERSION = 1

# Key fragments of raw DINOv3 backbone state dicts (official ConvNeXt / ViT checkpoints and timm names), used only
# to tell the user they passed a backbone file where a detector checkpoint was expected.
_BACKBONE_KEY_HINTS = ("downsample_layers.", "stages.", "stem.", "patch_embed.", "cls_token", "storage_tokens",
                       "mask_token", "rope_embed", "blocks.")


# --------------------------------------------------------------------------------------------------- RNG state
def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states as plain lists / tensors (``weights_only``-safe)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss_next": gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only when as many GPUs are visible)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = npst["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((npst["name"], keys.astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# --------------------------------------------------------------------------------------------------- save
def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A crash or exception mid-write leaves any existing file at ``path`` untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that belong to its frozen DINOv3 backbone (empty when fine-tuned)."""
    dino = getattr(model, "dino", None)
    if dino is None or not getattr(dino, "frozen", True):
        return set()
    ids = {id(t) for t in dino.state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def model_meta(model: nn.Module, classes: list[str], letterbox: bool, weights: str | None = None) -> dict[str, Any]:
    """Checkpoint metadata for ``model``: its DetectorConfig plus what inference needs to reproduce preprocessing."""
    model = unwrap(model)
    if not classes or classes[0] != "__background__":
        raise ValueError("classes must start with '__background__'")
    meta = dict(model.config.to_dict())
    dino = model.dino
    meta.update(classes=list(classes), letterbox=bool(letterbox), mean=[float(v) for v in dino.mean],
                std=[float(v) for v in dino.std], toolkit_version=__version__,
                weights=str(weights) if weights else None)
    return meta


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def build_payload(model: nn.Module, meta: dict[str, Any], optimizer: Any = None, scheduler: Any = None,
                  scaler: Any = None, ema: Any = None, epoch: int = 0, best_metric: float | None = None,
                  rng: dict[str, Any] | None = None, include_backbone: bool = True) -> dict[str, Any]:
    """Everything a checkpoint holds. ``meta`` comes from :func:`model_meta` (extra keys are kept).

    ``rng=None`` captures the current RNG states. ``include_backbone=False`` drops a *frozen* backbone's tensors
    (a fine-tuned backbone is always saved, since no weights file could restore it).
    """
    model = unwrap(model)
    state = model.state_dict()
    skip = set() if include_backbone else _frozen_backbone_keys(model)
    meta = dict(meta)
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


# --------------------------------------------------------------------------------------------------- load
def _find(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if not p.exists():
        raise UserError(f"checkpoint {path} not found; pass a .pth written by train_detection.py "
                        f"(e.g. outputs/img_det/<run>/best_model.pth) with --model")
    if p.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the .pth file inside it (e.g. {p}/best_model.pth)")
    return p


def _looks_like_backbone(obj: Any) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "format" not in obj:
        obj = obj["model"]  # some releases wrap the state dict once
    if not isinstance(obj, dict) or not obj:
        return False
    keys = [k for k in obj if isinstance(k, str)]
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors >= 0.9 * len(obj) and any(h in k for k in keys for h in _BACKBONE_KEY_HINTS) \
        and not any(k.startswith(("head.", "backbone.body", "anchor")) for k in keys)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate one of our checkpoints; every kind of wrong file becomes a one-line UserError."""
    p = _find(path)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise UserError(f"checkpoint {p} contains arbitrary Python objects, so it was not written by this "
                            f"toolkit and is not loaded for safety; pass a .pth written by train_detection.py") from None
        raise UserError(f"checkpoint {p} is corrupt or truncated ({type(exc).__name__}); re-copy it or use "
                        f"another checkpoint (e.g. last_model.pth)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {p} is corrupt or truncated ({first}); re-copy it or use another checkpoint "
                        f"(e.g. last_model.pth)") from None
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


def detector_config_from_meta(meta: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The DetectorConfig stored in ``meta`` with ``overrides`` (e.g. imgsz, nms, score_thresh) applied."""
    from .model import DetectorConfig  # local: model.py pulls in timm

    fields = set(DetectorConfig.__dataclass_fields__)
    cfg = {k: v for k, v in meta.items() if k in fields}
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise ValueError(f"unknown DetectorConfig override {k!r}")
        if v is not None:
            cfg[k] = v
    if isinstance(cfg.get("imgsz"), list):
        cfg["imgsz"] = tuple(cfg["imgsz"])
    return DetectorConfig.from_dict(cfg)


def model_from_checkpoint(ckpt: dict[str, Any] | str | os.PathLike, device: str | torch.device = "cpu",
                          overrides: dict[str, Any] | None = None, weights: str | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector a checkpoint describes and load its weights; returns ``(model in eval mode, meta)``.

    No backbone weights file is needed when the checkpoint includes the backbone (the default); otherwise
    ``weights`` (``--weights``) or the path stored in ``meta['weights']`` supplies it.
    """
    from .model import build_detector

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    where = ckpt.get("path", "checkpoint")
    meta = dict(ckpt["meta"])
    cfg = detector_config_from_meta(meta, overrides)
    includes_backbone = bool(meta.get("includes_backbone", True))
    backbone_weights = None
    if not includes_backbone:
        backbone_weights = weights or meta.get("weights")
        if not backbone_weights:
            raise UserError(f"checkpoint {where} was saved without its backbone; pass the backbone weights file "
                            f"({meta.get('model_name')}) with --weights")
    with warnings.catch_warnings():
        if includes_backbone:  # the random init is overwritten by the checkpoint's backbone weights just below
            from .backbones import RandomWeightsWarning

            warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_detector(cfg, weights=backbone_weights, verbose=False)
    result = model.load_state_dict(ckpt["model"], strict=False)
    missing = list(result.missing_keys)
    if not includes_backbone:
        allowed = _frozen_backbone_keys(model)
        missing = [k for k in missing if k not in allowed]
    if missing or result.unexpected_keys:
        detail = (f"missing {len(missing)} (e.g. {missing[:2]}), unexpected {len(result.unexpected_keys)} "
                  f"(e.g. {list(result.unexpected_keys)[:2]})")
        raise UserError(f"checkpoint {where} does not match the {cfg.model_name}/{cfg.head} model its metadata "
                        f"describes: {detail}; was it edited or written by another version?")
    model.to(device).eval()
    meta["imgsz"] = tuple(cfg.imgsz)
    return model, meta
