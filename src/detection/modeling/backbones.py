"""``build_backbone``: the one way to get a DINOv3 backbone, built with timm (default) or the official code
(``impl="hub"``, ``hub.py``), for every official hub entry point (``entrypoints.py``).

The timm path loads Meta's official ``.pth`` files *strictly* (``official_keys.py``). Weights in the transformers and
timm layouts (and hub names) are read and renamed to the official keys by ``weight_formats``, then go through the
same strict mapping. Outputs follow the official ``get_intermediate_layers`` exactly (``dino.DinoBackbone``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ToolkitWarning, UserError
from .config import check_choices
from .dino import DinoBackbone
from .entrypoints import ENTRYPOINTS, FAMILIES, describe_signature, entry_point, merge_arch
from .hub import build_hub, hub_repo
from .official_keys import assign_state_dict, checkpoint_signature, convert_official_state_dict, guess_model_name
from .weight_formats import LoadedWeights, locate_weights, open_weights


class RandomWeightsWarning(ToolkitWarning):
    """Emitted when a backbone is built without ``--weights`` (random initialisation)."""


def _select_entry(model_name: str, loaded: LoadedWeights | None,
                  weights_path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The entry for ``model_name``, switched to the weight variant (SAT-493M vs LVD-1689M) of the same hub function
    that the weights belong to: for Meta's files by the official checkpoint hash in the file name (as the official
    hub does), for the other layouts by the weight family their content records (see weight_formats)."""
    entry = entry_point(model_name)
    if loaded is not None and loaded.format != "meta":
        for name, e in ENTRYPOINTS.items():
            if (loaded.weights_family and e["hub_function"] == entry["hub_function"]
                    and e["weights_family"] == loaded.weights_family and e["official"] == entry["official"]):
                return name, e
        return model_name, entry
    path = loaded.path if loaded is not None else weights_path
    if path is not None:
        for name, e in ENTRYPOINTS.items():
            h = e["checkpoint_file"] and e["checkpoint_file"].rsplit("-", 1)[-1][:-4]
            if h and f"-{h}" in path.name and e["hub_function"] == entry["hub_function"]:
                return name, e
    return model_name, entry


def _layout_signature(loaded: LoadedWeights) -> tuple | None:
    """Architecture of transformers/timm weights, comparable with ``Family.signature(...)[:5]``: the qkv-bias flag
    (timm also publishes bias-free copies) and the SAT ``local_cls_norm`` (never exported) are left out."""
    cfg = loaded.config_arch
    if cfg is not None:
        return FAMILIES[cfg["family"]].recorded_signature(cfg)
    sig = checkpoint_signature(loaded.state_dict)
    return None if sig is None else sig[:5]


def _candidates(loaded: LoadedWeights) -> list[str]:
    """Entry points whose architecture the transformers/timm weights have; the weight family picks among twins."""
    sig = _layout_signature(loaded)
    heads = (loaded.config_arch or {}).get("num_heads")
    names = [n for n, e in ENTRYPOINTS.items() if sig is not None and FAMILIES[e["family"]].signature(e["arch"])[:5] == sig
             and (heads is None or e["arch"].get("num_heads") == heads)]
    want = loaded.weights_family or "lvd1689m"
    return sorted(names, key=lambda n: (ENTRYPOINTS[n]["weights_family"] != want, not ENTRYPOINTS[n]["official"]))


def _infer_model_name(loaded: LoadedWeights) -> str:
    name = guess_model_name(loaded.state_dict, loaded.path) if loaded.format == "meta" else next(
        iter(_candidates(loaded)), None)
    if name is None:
        sig = _layout_signature(loaded) if loaded.format != "meta" else checkpoint_signature(loaded.state_dict)
        what = describe_signature(sig) if sig else "an unrecognised architecture"
        raise UserError(f"{loaded.where} holds {what}, which is no DINOv3 entry point; pass --model-name (and "
                        f"arch_overrides for a custom size)")
    return name


def _check_layout_arch(loaded: LoadedWeights, model_name: str, family: str, arch: dict[str, Any]) -> None:
    """transformers/timm weights: the architecture they record must be the one --model-name builds."""
    sig = _layout_signature(loaded)
    want = FAMILIES[family].signature(arch)[:5]
    heads = (loaded.config_arch or {}).get("num_heads")
    if sig == want and (heads is None or heads == arch.get("num_heads")):
        return
    guess = next(iter(_candidates(loaded)), None)
    have = describe_signature(sig) if sig else f"a {loaded.family}"
    if sig == want:
        have += f" with {heads} attention heads (--model-name has {arch['num_heads']})"
    hint = f"pass --model-name {guess} (or omit --model-name)" if guess else "check --model-name and --weights"
    raise UserError(f"{loaded.where} ({loaded.format} layout) is {have} but --model-name {model_name} is "
                    f"{describe_signature(want)}; {hint}")


def _random_init_warning(model_name: str, entry: dict[str, Any]) -> None:
    what = ("random init only: Meta publishes no weights for this architecture-only name" if not entry["official"]
            else f"pass --weights {entry['checkpoint_file']} for the pretrained backbone")
    warnings.warn(f"WARNING: {model_name} has RANDOM weights (no --weights given; {what})",
                  RandomWeightsWarning, stacklevel=3)


def _build_timm(model_name: str, entry: dict[str, Any], arch: dict[str, Any],
                loaded: LoadedWeights | None) -> nn.Module:
    import timm

    kwargs = FAMILIES[entry["family"]].timm_kwargs(arch)
    if loaded is None:
        return timm.create_model(entry["timm_name"], pretrained=False, **kwargs)
    with torch.device("meta"):  # weights replace everything: skip the (slow, for 7B huge) random init
        model = timm.create_model(entry["timm_name"], pretrained=False, **kwargs)
    sd = loaded.state_dict
    if loaded.format == "timm" and arch.get("qkv_bias") and not any(
            k.endswith("attn.qkv.bias") for k in sd):
        # timm also publishes DINOv3 ViTs built without q/v biases; a zero bias computes exactly the same
        sd = dict(sd)
        for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
            sd[k.replace(".weight", ".bias")] = torch.zeros(sd[k].shape[0], dtype=sd[k].dtype)
    converted = convert_official_state_dict(sd, model, entry["family"], arch, model_name,
                                            str(loaded.hub or loaded.path), allow_absent_unused=loaded.format != "meta",
                                            key_name=loaded.key_name)
    assign_state_dict(model, converted)
    return model




def build_backbone(model_name: str | None = None, weights: str | os.PathLike | None = None, impl: str = "timm",
                   fine_tune: bool = False, arch_overrides: dict[str, Any] | None = None,
                   unfreeze_last: int | None = None, repo_dir: str | os.PathLike | None = None) -> DinoBackbone:
    """Build ``model_name`` (see ``ENTRYPOINTS``) with timm (default) or the official code (``impl="hub"``).

    ``weights``: Meta's ``.pth``, a transformers folder/file, a timm file, or a hub name (``hf-hub:...``,
    ``timm:...``) - see ``weight_formats`` - loaded strictly; the layout is read from the content and recorded in
    ``backbone.weights_source``. ``None`` gives random weights with a ``RandomWeightsWarning``. ``model_name=None``
    takes the architecture from the weights. ``arch_overrides`` takes official constructor kwargs (e.g. ``depth``,
    ``embed_dim``, ``dims``) - used for tiny parity models. Trainable part: ``unfreeze_last`` (see
    ``DinoBackbone.set_trainable``; ``None`` -> ``-1`` if ``fine_tune`` else ``0``). ``repo_dir``: the official
    clone ``impl="hub"`` builds from (default: ``DINOv3_REPO``; see ``hub.hub_repo``).
    """
    check_choices(backbone_impl=impl)
    if model_name is not None:
        entry_point(model_name)
    loaded: LoadedWeights | None = None
    if impl == "hub":
        repo = hub_repo(repo_dir)  # fail on a missing clone before anything else
        path, hub = locate_weights(weights)
        if path is not None and (hub or path.is_dir()):
            raise UserError(f"--weights {weights}: --backbone-impl hub (Meta's code) loads Meta's .pth only; use "
                            f"--backbone-impl timm for transformers/timm weights and hub names")
        if model_name is None:
            raise UserError("--backbone-impl hub needs --model-name")
        model_name, entry = _select_entry(model_name, None, path)
        source = None if path is None else {"format": "meta", "path": str(path), "hub": None}
    else:
        loaded = open_weights(weights)
        if model_name is None:
            if loaded is None:
                raise UserError("--model-name is required when no --weights are given")
            model_name = _infer_model_name(loaded)
        model_name, entry = _select_entry(model_name, loaded)
        source = loaded.source if loaded is not None else None
    arch = merge_arch(model_name, entry, arch_overrides)
    if loaded is not None and loaded.format != "meta":
        _check_layout_arch(loaded, model_name, entry["family"], arch)
    if source is None:
        _random_init_warning(model_name, entry)
    if impl == "timm":
        model = _build_timm(model_name, entry, arch, loaded)
    else:
        model = build_hub(repo, entry["hub_function"], arch_overrides, path)
    weights_family = (loaded.weights_family if loaded is not None and loaded.weights_family
                      else entry["weights_family"])
    backbone = DinoBackbone(model, model_name, entry["family"], arch, impl=impl, weights_family=weights_family,
                            fine_tune=fine_tune, unfreeze_last=unfreeze_last)
    backbone.weights_source = source
    return backbone
