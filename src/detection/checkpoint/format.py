"""Checkpoints: one self-describing format, written atomically, loaded with ``weights_only=True``.

Payload (all plain tensors / containers / numbers / strings, so the safe unpickler accepts it)::

    {"format": "dinov3-detection", "format_version": 1,
     "meta": DetectorConfig.to_dict() (its "input" dict = the InputSpec) + classes, toolkit_version,
             includes_backbone, weights, weights_source (backbone provenance), category_ids (COCO datasets only),
     "model": state_dict, "optimizer", "scheduler", "scaler", "ema", "epoch", "best_metric", "rng"}

By default the frozen backbone is saved inside ``model`` so inference needs no backbone weights file;
``include_backbone=False`` keeps only the trainable part, and loading then needs the backbone ``--weights``.
Metadata written before the ``input`` dict existed (``imgsz``/``letterbox``/``mean``/``std`` at the top level) loads
the same way (``DetectorConfig.from_dict``).

Checkpoints trained by the reference project (``{"model_state_dict": ..., "epoch", "optimizer_state_dict"}`` with
the hub model under ``backbone.backbone_model.`` and torchvision head names) carry no metadata: the user supplies
what the reference's own commands took (``--model-name``, ``--head``, ``--config``, ``--imgsz``), see
``adopt_reference_checkpoint``; the official backbone keys are mapped with ``backbones.convert_official_state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..core.errors import UserError
from ..core.io import atomic_write
from ..core.paths import REPO_ROOT
from ..core.runtime import unwrap

FORMAT = "dinov3-detection"
FORMAT_VERSION = 1
REFERENCE_FORMAT = "reference"  # ``format`` of a loaded reference-project checkpoint (it has none of its own)
REFERENCE_BACKBONE_PREFIX = "backbone.backbone_model."  # the reference wrapped the hub model under this name
REFERENCE_IMGSZ = 640  # the reference commands' default --imgsz

# Key patterns of raw DINOv3 backbone state dicts under a prefix (official ConvNeXt / ViT, transformers and timm
# names; unprefixed files are recognised by ``weight_formats.weights_layout``), used only to tell the user they
# passed a backbone file where a detector checkpoint was expected. Detector state dicts have heads / anchors.
_BACKBONE_KEY_HINTS = tuple(re.compile(r"(^|\.)" + h) for h in (
    r"downsample_layers\.", r"stages\.\d+\.((layers|blocks)\.)?\d+\.", r"stem\.", r"patch_embed(dings)?\.",
    r"(cls_token|reg_token|storage_tokens|register_tokens|mask_token)$", r"rope_embed", r"blocks\.\d+\.",
    r"embeddings\.", r"layer\.\d+\."))
_DETECTOR_KEY_PREFIXES = ("head.classification_head", "head.regression_head", "backbone.body", "backbone.fpn",
                          "anchor")


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
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that belong to its frozen DINOv3 backbone (empty when fine-tuned)."""
    dino = getattr(model, "dino", None)
    if dino is None or not getattr(dino, "frozen", True):
        return set()
    ids = {id(t) for t in dino.state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def model_meta(model: nn.Module, classes: list[str], letterbox: bool | None = None,
               weights: str | None = None, category_ids: list[int] | None = None) -> dict[str, Any]:
    """Checkpoint metadata for ``model``: its resolved DetectorConfig (with the ``input`` spec: size, letterbox,
    size multiple, mean/std) plus the classes. ``letterbox`` overrides the config's (None: keep it).

    ``weights_source``: where the backbone weights came from (``DinoBackbone.weights_source``: format, path, hub
    name; None for a random init). ``category_ids`` (COCO datasets): the annotation file's id of each label, so
    predictions can be written with the user's ids; stored only when given.
    """
    model = unwrap(model)
    if not classes or classes[0] != "__background__":
        raise ValueError("classes must start with '__background__'")
    if category_ids is not None and len(category_ids) != len(classes):
        raise ValueError("category_ids needs one id per class (0 for __background__)")
    cfg = model.config
    if letterbox is not None and bool(letterbox) != cfg.letterbox:
        cfg = dataclasses.replace(cfg, letterbox=bool(letterbox))
    meta = dict(cfg.to_dict())
    source = getattr(getattr(model, "dino", None), "weights_source", None)
    meta.update(classes=list(classes), toolkit_version=__version__, weights=str(weights) if weights else None,
                weights_source=dict(source) if source else None)
    if category_ids is not None:
        meta["category_ids"] = [int(i) for i in category_ids]
    return meta


def describe_weights_source(source: dict[str, Any] | None) -> str:
    """One phrase for a ``weights_source`` (``model_meta``), e.g. ``timm weights /w/backbone.safetensors``."""
    if not source:
        return "random init"
    return f"{source.get('format')} weights {source.get('hub') or source.get('path')}"


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
    skip = set() if include_backbone else frozen_backbone_keys(model)
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


def _looks_like_reference(obj: Any) -> bool:
    """A reference-project checkpoint: ``model_state_dict`` holding its hub backbone and torchvision head keys."""
    sd = obj.get("model_state_dict") if isinstance(obj, dict) and "format" not in obj else None
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(REFERENCE_BACKBONE_PREFIX) for k in sd)


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
    """Load and validate one of our checkpoints; every kind of wrong file becomes a one-line UserError.

    A reference-project checkpoint comes back as ``{"format": REFERENCE_FORMAT, "meta": None, "model": ...}``:
    pass it through :func:`adopt_reference_checkpoint` before building a model from it."""
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
    if _looks_like_reference(obj):
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


def detector_config_from_meta(meta: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The DetectorConfig stored in ``meta`` with ``overrides`` (e.g. nms, score_thresh) applied (None = keep)."""
    from ..modeling.model import DetectorConfig  # local: model.py pulls in timm

    cfg = DetectorConfig.from_dict(meta)
    names = set(DetectorConfig.__dataclass_fields__)
    changes = {}
    for k, v in (overrides or {}).items():
        if k not in names:
            raise ValueError(f"unknown DetectorConfig override {k!r}")
        if v is not None:
            changes[k] = v
    return dataclasses.replace(cfg, **changes) if changes else cfg


def reference_head(sd: dict[str, Any]) -> str | None:
    """Which torchvision head a reference state dict holds (SSD heads are ``module_list``s)."""
    if any(k.startswith("head.classification_head.module_list.") for k in sd):
        return "ssd"
    if any(k.startswith("head.classification_head.cls_logits.") for k in sd):
        return "retinanet"
    return None


def adopt_reference_checkpoint(ckpt: dict[str, Any], *, model_name: str | None, classes: list[str] | None,
                               head: str | None = None, imgsz: Any = None, feature_extractor: str | None = None,
                               backbone_impl: str = "timm", arch_overrides: dict[str, Any] | None = None
                               ) -> dict[str, Any]:
    """Give a reference-project checkpoint (see :func:`load_checkpoint`) the metadata its commands took as flags.

    The reference trained only the single last feature map with stretched inputs (``feature_extractor='last'``,
    whose anchors are the reference's), so that is what is built; ``imgsz`` defaults to the reference's 640.
    The state dict keeps the reference's key names until :func:`model_from_checkpoint` maps them.
    """
    from ..modeling.model import DetectorConfig

    where = ckpt.get("path", "checkpoint")
    if not model_name or not classes:
        need = " and ".join(f for f, v in (("--model-name", model_name), ("--config", classes)) if not v)
        raise UserError(f"--model {where} was trained by the reference project and records no model description; "
                        f"pass {need} as with the reference's commands (plus --head and --imgsz if it used them)")
    found = reference_head(ckpt["model"])
    if head and found and head != found:
        raise UserError(f"--head {head} contradicts --model {where}, whose weights are a {found} head; "
                        f"pass --head {found}")
    if feature_extractor not in (None, "last"):
        raise UserError(f"--feature-extractor {feature_extractor}: reference-project checkpoints use the single last "
                        f"feature map; drop the flag")
    from ..modeling.backbones import ENTRYPOINTS

    official = {k[len(REFERENCE_BACKBONE_PREFIX):] for k in ckpt["model"] if k.startswith(REFERENCE_BACKBONE_PREFIX)}
    if "local_cls_norm.weight" in official and ENTRYPOINTS.get(model_name, {}).get("family") == "vit":
        # SAT-493M hub weights carry the (inference-unused) local class-token norm. Normalization stays the hub
        # name's default (ImageNet statistics), assumed for every reference checkpoint since none records its own
        arch_overrides = {**(arch_overrides or {}), "untie_global_and_local_cls_norm": True}
    cfg = DetectorConfig(model_name=model_name, num_classes=len(classes), head=head or found or "retinanet",
                         feature_extractor="last", imgsz=imgsz or REFERENCE_IMGSZ, backbone_impl=backbone_impl,
                         arch_overrides=arch_overrides)
    meta = {**cfg.to_dict(), "classes": list(classes), "includes_backbone": True, "source": REFERENCE_FORMAT,
            "toolkit_version": __version__, "weights": None}
    return {**ckpt, "format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta}


def convert_reference_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Reference key names -> ours: the hub backbone (``backbone.backbone_model.<official key>``) goes through the
    official->timm mapping of ``backbones.convert_official_state_dict`` (as is for ``--backbone-impl hub``); the
    torchvision head keys are the same in both projects."""
    from ..modeling.backbones import convert_official_state_dict

    dino = model.dino
    official = {k[len(REFERENCE_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(REFERENCE_BACKBONE_PREFIX)}
    rest = {k: v for k, v in sd.items() if not k.startswith(REFERENCE_BACKBONE_PREFIX)}
    if dino.impl == "hub":
        mapped = official
    else:
        mapped = convert_official_state_dict(official, dino.model, dino.family, dino.arch, dino.model_name,
                                             source=where,
                                             where=f"--model {where}: the backbone ({REFERENCE_BACKBONE_PREFIX}*)")
    prefix = _prefix_of(model, dino.model)
    return {**{prefix + k: v for k, v in mapped.items()}, **rest}


def _prefix_of(model: nn.Module, sub: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is sub:
            return f"{name}." if name else ""
    raise ValueError("submodule not found")  # pragma: no cover


def _check_state_dict(model: nn.Module, sd: dict[str, Any], where: str, what: str, hint: str,
                      allowed_missing: set[str] = frozenset()) -> None:
    """One-line UserError naming missing / unexpected / other-shaped keys (before load_state_dict raises)."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd and k not in allowed_missing]
    unexpected = [k for k in sd if k not in target]
    mismatched = [f"{k} {list(sd[k].shape)} vs {list(target[k].shape)}" for k in sd
                  if k in target and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
                 f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:2])})" if mismatched else ""]
        raise UserError(f"checkpoint {where} does not match the {what}: {'; '.join(p for p in parts if p)}; {hint}")


def prepare_checkpoint(ckpt: dict[str, Any], expect: dict[str, Any], imgsz: Any = None) -> dict[str, Any]:
    """Check the user's flags against an own checkpoint, or describe a reference-project checkpoint with them."""
    if ckpt.get("format") == REFERENCE_FORMAT:
        return adopt_reference_checkpoint(
            ckpt, model_name=expect.get("model_name"), classes=expect.get("classes"), head=expect.get("head"),
            imgsz=imgsz, feature_extractor=expect.get("feature_extractor"),
            backbone_impl=expect.get("backbone_impl") or "timm", arch_overrides=expect.get("arch_overrides"))
    _check_expectations(ckpt["meta"], expect, ckpt.get("path", "checkpoint"))
    return ckpt


def _check_expectations(meta: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    flags = {"model_name": "--model-name", "head": "--head", "feature_extractor": "--feature-extractor",
             "classes": "--config"}  # its classes, from whatever form the dataset config takes
    for key, flag in flags.items():
        want = expect.get(key)
        if want is None:
            continue
        have = meta.get(key)
        if key == "classes":
            want, have = list(want), list(have or [])
        if want != have:
            shown_want = want if key != "classes" else f"{len(want) - 1} classes {want[1:4]}..."
            shown_have = have if key != "classes" else f"{len(have) - 1} classes {have[1:4]}..."
            raise UserError(f"{flag} {shown_want} contradicts checkpoint {where} ({shown_have}); drop the flag "
                            f"(the checkpoint's metadata is used) or pass the matching checkpoint")


@contextlib.contextmanager
def parameters_on_meta():
    """Inside this block every module parameter is created on the meta device (no memory, no random init) while
    buffers stay real, so non-persistent buffers a state dict does not hold (RoPE periods, normalization constants)
    are computed as usual. ``torch.device("meta")`` would put those on meta too; accelerate's ``init_empty_weights``
    does the same as this but is not a dependency here."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def model_from_checkpoint(ckpt: dict[str, Any] | str | os.PathLike, device: str | torch.device = "cpu",
                          overrides: dict[str, Any] | None = None, weights: str | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector a checkpoint describes and load its weights; returns ``(model in eval mode, meta)``.

    The model normalizes and pads exactly as ``meta``'s input spec says (``model.input_spec``); ``meta["input"]``
    is that spec and ``meta["imgsz"]`` its size. No backbone weights file is needed when the checkpoint includes
    the backbone (the default); otherwise ``weights`` (``--weights``) or the path stored in ``meta['weights']``.
    """
    from ..modeling.model import build_detector

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    where = ckpt.get("path", "checkpoint")
    if ckpt.get("format") == REFERENCE_FORMAT or ckpt.get("meta") is None:
        raise UserError(f"--model {where} was trained by the reference project and records no model description; "
                        f"pass --model-name and --config as with the reference's commands")
    meta = dict(ckpt["meta"])
    cfg = detector_config_from_meta(meta, overrides)
    includes_backbone = bool(meta.get("includes_backbone", True))
    backbone_weights = None
    if not includes_backbone:
        backbone_weights = weights or meta.get("weights")
        if not backbone_weights:
            raise UserError(f"checkpoint {where} was saved without its backbone; pass the backbone weights file "
                            f"({meta.get('model_name')}) with --weights")
    # A checkpoint that holds every parameter needs no random init: the parameters are built on the meta device and
    # the checkpoint's tensors become them (seconds and one copy of the weights less for large backbones).
    lazy = includes_backbone
    with warnings.catch_warnings():
        if includes_backbone:
            from ..modeling.backbones import RandomWeightsWarning

            warnings.simplefilter("ignore", RandomWeightsWarning)  # no random init is kept
            try:
                with parameters_on_meta():
                    model = build_detector(cfg, verbose=False)
            except Exception:  # construction code that computes with a parameter cannot run on meta
                lazy = False
        if not lazy:
            model = build_detector(cfg, weights=backbone_weights, verbose=False)
    state = ckpt["model"]
    if meta.get("source") == REFERENCE_FORMAT:
        state = convert_reference_state_dict(state, model, where)
        _check_state_dict(model, state, where, f"reference {cfg.model_name}/{cfg.head} model (last feature map, "
                          f"{cfg.num_classes - 1} classes)", "check --model-name, --head and the classes of --config")
    else:
        allowed = frozen_backbone_keys(model) if not includes_backbone else set()
        _check_state_dict(model, state, where, f"{cfg.model_name}/{cfg.head} model its metadata describes",
                          "was it edited or written by another version?", allowed)
    if lazy:
        own = model.state_dict()  # each tensor keeps the dtype the model was built with
        state = {k: v.to(own[k].dtype) if v.is_floating_point() and k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=includes_backbone, assign=lazy)
    model.to(device).eval()
    meta["imgsz"] = tuple(model.input_spec.imgsz)
    meta["input"] = model.input_spec.to_dict()
    return model, meta
