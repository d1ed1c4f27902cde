"""From a checkpoint to a model: prepare it once (read its card, check the user's claims, or describe a
reference-project file with them), then build the detector it describes and load its weights.

``prepare_checkpoint`` returns a ``PreparedCheckpoint`` (card + payload) that every consumer takes as is, so a
checkpoint is read, upgraded and checked once however many steps use it (predictor, export, evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from .card import ModelCard, load_card
from .files import frozen_backbone_keys, load_checkpoint
from .reference import REFERENCE_FORMAT, convert_reference_state_dict, reference_card


@dataclass
class PreparedCheckpoint:
    """A checkpoint read once: its card (upgraded, checked or describing a reference file) and the payload as
    loaded (``model`` state dict under the stored key names, optimizer state, ``train_config``, ...)."""

    card: ModelCard
    payload: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.payload.get("path", "checkpoint"))

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.payload["model"]


def prepare_checkpoint(source: str | os.PathLike | Mapping[str, Any], expect: Mapping[str, Any] | None = None,
                       imgsz: Any = None, required: Collection[str] = ()) -> PreparedCheckpoint:
    """Read a checkpoint (a path, or a payload ``files.load_checkpoint`` returned) and its card.

    ``expect``: what the command line claims (model_name, head, feature_extractor, classes; see
    ``ModelCard.check_matches``, ``required`` there too): checked against our checkpoints; for a reference-project
    checkpoint, which records nothing, they (plus backbone_impl, arch_overrides and ``imgsz``) describe the model.
    """
    payload = dict(source) if isinstance(source, Mapping) else load_checkpoint(source)
    expect = expect or {}
    if payload.get("format") == REFERENCE_FORMAT or payload.get("meta") is None:
        card = reference_card(
            payload, model_name=expect.get("model_name"), classes=expect.get("classes"), head=expect.get("head"),
            imgsz=imgsz, feature_extractor=expect.get("feature_extractor"),
            backbone_impl=expect.get("backbone_impl") or "timm", arch_overrides=expect.get("arch_overrides"))
    else:
        where = str(payload.get("path", "checkpoint"))
        card = load_card(payload, f"checkpoint {where}")
        card.check_matches(expect, where, required)
    return PreparedCheckpoint(card, payload)


def check_state_dict(model: nn.Module, sd: Mapping[str, Any], where: str, what: str, hint: str,
                     allowed_missing: Collection[str] = frozenset()) -> None:
    """One-line UserError naming missing / unexpected / other-shaped keys (before ``load_state_dict`` raises)."""
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


# Threads inside ``parameters_on_meta`` (with their nesting depth). Construction in any other thread is untouched.
_META_THREADS: Counter[int] = Counter()
_META_LOCK = threading.Lock()
_REGISTER_PARAMETER: list[Any] = []  # nn.Module.register_parameter as found when the first block began


def _register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if param is not None and not param.is_meta and threading.get_ident() in _META_THREADS:
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _REGISTER_PARAMETER[0](module, name, param)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this block, modules this thread constructs create their parameters on the meta device (no memory, no
    random init) while buffers and plain tensor attributes stay real, so what a state dict does not hold
    (non-persistent RoPE periods and normalization constants, torchvision's anchor templates) is computed as usual.

    ``torch.device("meta")`` cannot do this: it sends every tensor to meta, and those values would be lost. So
    ``nn.Module.register_parameter`` is wrapped for the duration of the outermost block (as accelerate's
    ``init_empty_weights`` does), and the wrapper acts only for the threads inside a block."""
    me = threading.get_ident()
    with _META_LOCK:
        if not _META_THREADS:
            _REGISTER_PARAMETER[:] = [nn.Module.register_parameter]
            nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
        _META_THREADS[me] += 1
    try:
        yield
    finally:
        with _META_LOCK:
            _META_THREADS[me] -= 1
            if not _META_THREADS[me]:
                del _META_THREADS[me]
            if not _META_THREADS:
                nn.Module.register_parameter = _REGISTER_PARAMETER[0]  # type: ignore[method-assign]


def _with_overrides(cfg: Any, overrides: Mapping[str, Any] | None) -> Any:
    """``cfg`` with ``overrides`` (e.g. nms, score_thresh) applied; None values keep the stored setting."""
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for k, v in (overrides or {}).items():
        if k not in names:
            raise ValueError(f"unknown DetectorConfig override {k!r}")
        if v is not None:
            changes[k] = v
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_model(ckpt: PreparedCheckpoint, device: str | torch.device = "cpu",
                overrides: Mapping[str, Any] | None = None, weights: str | None = None) -> nn.Module:
    """The detector ``ckpt`` describes, with its weights loaded, on ``device`` in eval mode.

    The model normalizes and pads exactly as the card's input spec says (``model.input_spec``). No backbone
    weights file is needed when the checkpoint includes the backbone (the default); otherwise ``weights``
    (``--weights``) or the path the card records.
    """
    from ..modeling.builder import build_detector

    card, where = ckpt.card, ckpt.path
    cfg = _with_overrides(card.detector, overrides)
    includes_backbone = card.provenance.includes_backbone
    backbone_weights = None
    if not includes_backbone:
        backbone_weights = weights or card.provenance.weights
        if not backbone_weights:
            raise UserError(f"checkpoint {where} was saved without its backbone; pass the backbone weights file "
                            f"({cfg.model_name}) with --weights")
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
    state = ckpt.state
    if card.provenance.is_reference:
        state = convert_reference_state_dict(state, model, where)
        check_state_dict(model, state, where, f"reference {cfg.model_name}/{cfg.head} model (last feature map, "
                         f"{cfg.num_classes - 1} classes)", "check --model-name, --head and the classes of --config")
    else:
        allowed = frozen_backbone_keys(model) if not includes_backbone else set()
        check_state_dict(model, state, where, f"{cfg.model_name}/{cfg.head} model its metadata describes",
                         "was it edited or written by another version?", allowed)
    if lazy:
        own = model.state_dict()  # each tensor keeps the dtype the model was built with
        state = {k: v.to(own[k].dtype) if v.is_floating_point() and k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=includes_backbone, assign=lazy)
    return model.to(device).eval()


def model_from_checkpoint(source: PreparedCheckpoint | str | os.PathLike | Mapping[str, Any],
                          device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None,
                          weights: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``build_model`` from a prepared checkpoint, a path or a payload (prepared here, claiming nothing); returns
    ``(model in eval mode, the card as stored, with the built model's input spec)``."""
    ckpt = source if isinstance(source, PreparedCheckpoint) else prepare_checkpoint(source)
    model = build_model(ckpt, device, overrides, weights)
    return model, ckpt.card.with_input(model.input_spec).to_dict()
