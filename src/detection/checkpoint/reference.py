"""Checkpoints trained by the reference project: recognising them, describing them with a card, mapping their keys.

A reference checkpoint is ``{"model_state_dict", "epoch", "optimizer_state_dict"}`` with the hub model under
``backbone.backbone_model.<official key>`` and torchvision's head names; it records no model description, so the
user supplies what the reference's own commands took (``--model-name``, ``--head``, ``--config``, ``--imgsz``),
see :func:`reference_card`. The official backbone keys are mapped with ``official_keys.convert_official_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from .card import LabelMap, ModelCard, Provenance

REFERENCE_FORMAT = "reference"  # ``format`` of a loaded reference-project checkpoint (it has none of its own)
REFERENCE_BACKBONE_PREFIX = "backbone.backbone_model."  # the reference wrapped the hub model under this name
REFERENCE_IMGSZ = 640  # the reference commands' default --imgsz


def looks_like_reference(obj: Any) -> bool:
    """A reference-project checkpoint: ``model_state_dict`` holding its hub backbone and torchvision head keys."""
    sd = obj.get("model_state_dict") if isinstance(obj, dict) and "format" not in obj else None
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(REFERENCE_BACKBONE_PREFIX) for k in sd)


def reference_head(sd: dict[str, Any]) -> str | None:
    """Which torchvision head a reference state dict holds (SSD heads are ``module_list``s)."""
    if any(k.startswith("head.classification_head.module_list.") for k in sd):
        return "ssd"
    if any(k.startswith("head.classification_head.cls_logits.") for k in sd):
        return "retinanet"
    return None


def reference_card(ckpt: dict[str, Any], *, model_name: str | None, classes: list[str] | None,
                   head: str | None = None, imgsz: Any = None, feature_extractor: str | None = None,
                   backbone_impl: str = "timm", arch_overrides: dict[str, Any] | None = None) -> ModelCard:
    """The card of a reference-project checkpoint (as ``files.load_checkpoint`` returns it), from the flags its
    commands took.

    The reference trained only the single last feature map with stretched inputs (``feature_extractor='last'``,
    whose anchors are the reference's), so that is what is described; ``imgsz`` defaults to the reference's 640.
    The state dict keeps the reference's key names until :func:`convert_reference_state_dict` maps them.
    """
    from ..modeling.config import DetectorConfig
    from ..modeling.entrypoints import ENTRYPOINTS

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
    official = {k[len(REFERENCE_BACKBONE_PREFIX):] for k in ckpt["model"] if k.startswith(REFERENCE_BACKBONE_PREFIX)}
    if "local_cls_norm.weight" in official and ENTRYPOINTS.get(model_name, {}).get("family") == "vit":
        # SAT-493M hub weights carry the (inference-unused) local class-token norm. Normalization stays the hub
        # name's default (ImageNet statistics), assumed for every reference checkpoint since none records its own
        arch_overrides = {**(arch_overrides or {}), "untie_global_and_local_cls_norm": True}
    cfg = DetectorConfig(model_name=model_name, num_classes=len(classes), head=head or found or "retinanet",
                         feature_extractor="last", imgsz=imgsz or REFERENCE_IMGSZ, backbone_impl=backbone_impl,
                         arch_overrides=arch_overrides)
    return ModelCard(cfg, LabelMap(classes), Provenance(includes_backbone=True, source="reference"))


def convert_reference_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Reference key names -> ours: the hub backbone (``backbone.backbone_model.<official key>``) goes through the
    official->timm mapping of ``official_keys.convert_official_state_dict`` (as is for ``--backbone-impl hub``); the
    torchvision head keys are the same in both projects."""
    from ..modeling.official_keys import convert_official_state_dict

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
