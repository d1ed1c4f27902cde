"""Checkpoints: the model card (``card``), files (``files``), reference-project checkpoints (``reference``), RNG
state (``rng``), building a model from a checkpoint (``build``), and the model-source option group of the commands
that load one (``source``). The names below are the package's API (``source`` is imported from its module)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import (
        PreparedCheckpoint,
        build_model,
        check_state_dict,
        model_from_checkpoint,
        parameters_on_meta,
        prepare_checkpoint,
    )
    from .card import (
        FORMAT,
        FORMAT_VERSION,
        LabelMap,
        ModelCard,
        Provenance,
        describe_weights_source,
        load_card,
        model_meta,
        training_options,
    )
    from .files import build_payload, frozen_backbone_keys, load_checkpoint, save_checkpoint
    from .reference import (
        REFERENCE_BACKBONE_PREFIX,
        REFERENCE_FORMAT,
        convert_reference_state_dict,
        reference_card,
        reference_head,
    )
    from .rng import get_rng_state, set_rng_state

__all__ = [
    "FORMAT", "FORMAT_VERSION", "REFERENCE_BACKBONE_PREFIX", "REFERENCE_FORMAT", "LabelMap", "ModelCard",
    "PreparedCheckpoint", "Provenance", "build_model", "build_payload", "check_state_dict",
    "convert_reference_state_dict", "describe_weights_source", "frozen_backbone_keys", "get_rng_state",
    "load_card", "load_checkpoint", "model_from_checkpoint", "model_meta", "parameters_on_meta",
    "prepare_checkpoint", "reference_card", "reference_head", "save_checkpoint", "set_rng_state",
    "training_options",
]

# Each name is imported from its module on first use, so that importing ``checkpoint.source`` (the parsers' option
# group) does not load torch through ``build`` and ``files``.
_MODULE = {name: module for module, names in {
    "build": ("PreparedCheckpoint", "build_model", "check_state_dict", "model_from_checkpoint", "parameters_on_meta",
              "prepare_checkpoint"),
    "card": ("FORMAT", "FORMAT_VERSION", "LabelMap", "ModelCard", "Provenance", "describe_weights_source",
             "load_card", "model_meta", "training_options"),
    "files": ("build_payload", "frozen_backbone_keys", "load_checkpoint", "save_checkpoint"),
    "reference": ("REFERENCE_BACKBONE_PREFIX", "REFERENCE_FORMAT", "convert_reference_state_dict", "reference_card",
                  "reference_head"),
    "rng": ("get_rng_state", "set_rng_state"),
}.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
    globals()[name] = value
    return value
