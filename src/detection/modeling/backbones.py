"""DINOv3 backbones: every official hub entry point, built with timm (default) or the official code (``impl="hub"``).

The timm path loads Meta's official ``.pth`` files *strictly*: after the official->timm key mapping there must be
0 missing, 0 unexpected and 0 shape-mismatched keys, and the only official tensors left out are the ones the
official model never uses at inference (``mask_token``, the RoPE ``periods`` buffer - checked against timm's -, the
``bias_mask`` buffers - checked to be the 1/0/1 layout timm hard-codes - and the SAT ``local_cls_norm``).

Weights in the transformers and timm layouts (and hub names) are read and renamed to the official keys by
``weight_formats``, then go through the same strict mapping. Outputs follow the official ``get_intermediate_layers``
exactly (see ``DinoBackbone``). Everything needed at run time is copied into ``ENTRYPOINTS`` below; the parity
fixtures (``tests/fixtures/dinov3``) are used by the tests only.

Input sizes that are not multiples of the stride: the official ViT patch conv floors (the bottom/right remainder
pixels are ignored); timm asserts divisibility, so the timm ViT path crops the input to ``H//16*16 x W//16*16``
first, which gives the official result exactly. ConvNeXt convs floor at every stride in both implementations.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ToolkitWarning, UserError
from ..core.paths import load_dotenv_once, resolve_path
from .weight_formats import LoadedWeights, locate_weights, open_weights, read_torch_state_dict, resolve_weights

__all__ = [
    "ENTRYPOINTS", "NORMALIZATION", "RandomWeightsWarning", "DinoBackbone", "build_backbone", "resolve_weights",
    "load_official_state_dict", "convert_official_state_dict", "official_param_count", "guess_model_name",
]

# Reads a torch.save-d state dict (Meta's .pth among others); kept under its historical name.
load_official_state_dict = read_torch_state_dict

# Input normalization per weight family (official README / hub transforms).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


class RandomWeightsWarning(ToolkitWarning):
    """Emitted when a backbone is built without ``--weights`` (random initialisation)."""


# ---------------------------------------------------------------------------------------------------------------
# Entry-point table (facts copied from the official hub, snapshot 6876159a; see the fixture README).
# ``arch`` uses the official constructor kwarg names; ``arch_overrides`` in build_backbone uses the same names.
# ---------------------------------------------------------------------------------------------------------------

def _vit(timm_name: str, embed_dim: int, depth: int, num_heads: int, ffn_layer: str, ffn_ratio: float,
         qkv_bias: bool, n_params: int | None, checkpoint_file: str | None, weights_family: str = "lvd1689m",
         untie: bool = False, hub_function: str | None = None) -> dict[str, Any]:
    return dict(
        family="vit", timm_name=timm_name, hub_function=hub_function, n_params=n_params,
        checkpoint_file=checkpoint_file, weights_family=weights_family, official=checkpoint_file is not None,
        arch=dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn_layer=ffn_layer, ffn_ratio=ffn_ratio,
                  qkv_bias=qkv_bias, untie_global_and_local_cls_norm=untie),
    )


def _convnext(depths: tuple[int, ...], dims: tuple[int, ...], n_params: int | None, checkpoint_file: str | None,
              hub_function: str | None = None) -> dict[str, Any]:
    return dict(
        family="convnext", timm_name="convnext_tiny", hub_function=hub_function, n_params=n_params,
        checkpoint_file=checkpoint_file, weights_family="lvd1689m", official=checkpoint_file is not None,
        arch=dict(depths=list(depths), dims=list(dims)),
    )


ENTRYPOINTS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": _vit("vit_small_patch16_dinov3_qkvb", 384, 12, 6, "mlp", 4, True, 21_601_152,
                          "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "dinov3_vits16plus": _vit("vit_small_plus_patch16_dinov3_qkvb", 384, 12, 6, "swiglu", 6.0, True, 28_697_472,
                              "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "dinov3_vitb16": _vit("vit_base_patch16_dinov3_qkvb", 768, 12, 12, "mlp", 4, True, 85_669_632,
                          "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "dinov3_vitl16": _vit("vit_large_patch16_dinov3_qkvb", 1024, 24, 16, "mlp", 4, True, 303_154_176,
                          "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    # Same hub function as dinov3_vitl16; chosen automatically for a checkpoint named *-eadcf0ff.pth.
    "dinov3_vitl16_sat493m": _vit("vit_large_patch16_dinov3_qkvb", 1024, 24, 16, "mlp", 4, True, 303_156_224,
                                  "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", "sat493m", untie=True,
                                  hub_function="dinov3_vitl16"),
    # timm has no dedicated L+ name: the H+ definition with L sizes is key/shape compatible.
    "dinov3_vitl16plus": _vit("vit_huge_plus_patch16_dinov3_qkvb", 1024, 24, 16, "swiglu", 6.0, True, 403_915_776,
                              "dinov3_vitl16plus_pretrain_lvd1689m-46503df0.pth"),
    "dinov3_vith16plus": _vit("vit_huge_plus_patch16_dinov3_qkvb", 1280, 32, 20, "swiglu", 6.0, True, 840_633_600,
                              "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    "dinov3_vit7b16": _vit("vit_7b_patch16_dinov3", 4096, 40, 32, "swiglu64", 3, False, 6_716_043_264,
                           "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth", untie=True),
    # Same architecture as dinov3_vit7b16, other mean/std; chosen automatically for *-a6675841.pth.
    "dinov3_vit7b16_sat493m": _vit("vit_7b_patch16_dinov3", 4096, 40, 32, "swiglu64", 3, False, 6_716_043_264,
                                   "dinov3_vit7b16_pretrain_sat493m-a6675841.pth", "sat493m", untie=True,
                                   hub_function="dinov3_vit7b16"),
    "dinov3_convnext_tiny": _convnext((3, 3, 9, 3), (96, 192, 384, 768), 27_820_128,
                                      "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"),
    "dinov3_convnext_small": _convnext((3, 3, 27, 3), (96, 192, 384, 768), 49_454_688,
                                       "dinov3_convnext_small_pretrain_lvd1689m-296db49d.pth"),
    "dinov3_convnext_base": _convnext((3, 3, 27, 3), (128, 256, 512, 1024), 87_566_464,
                                      "dinov3_convnext_base_pretrain_lvd1689m-801f2ba9.pth"),
    "dinov3_convnext_large": _convnext((3, 3, 27, 3), (192, 384, 768, 1536), 196_230_336,
                                       "dinov3_convnext_large_pretrain_lvd1689m-61fa432d.pth"),
    # Architecture-only names for demos and tests: RANDOM INIT ONLY, Meta publishes no weights for them
    # (a --weights file still loads if it matches the architecture exactly).
    "dinov3_convnext_atto": _convnext((2, 2, 6, 2), (40, 80, 160, 320), None, None),
    "dinov3_vit_tiny": _vit("vit_small_patch16_dinov3_qkvb", 192, 6, 3, "mlp", 4, True, None, None),
}
for _name, _e in ENTRYPOINTS.items():
    _e["hub_function"] = _e["hub_function"] or _name
    if _e["family"] == "vit":
        _e["channels"], _e["strides"] = [_e["arch"]["embed_dim"]], [16]
    else:
        _e["channels"], _e["strides"] = list(_e["arch"]["dims"]), [4, 8, 16, 32]
del _name, _e

# Official constructor kwargs the timm implementation reproduces only at one value (every hub entry point uses it).
# _ANY: accepted at any value (bookkeeping, or training-only like the RoPE coordinate rescaling). Other keys in
# arch_overrides are errors; the _FREE ones are the architecture.
_ANY = object()
_VIT_FIXED: dict[str, Any] = dict(
    img_size=_ANY, patch_size=16, in_chans=3, pos_embed_rope_base=100, pos_embed_rope_min_period=None,
    pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None,
    pos_embed_rope_jitter_coords=None, pos_embed_rope_rescale_coords=_ANY, pos_embed_rope_dtype="fp32",
    norm_layer="layernormbf16", ffn_bias=True, proj_bias=True, n_storage_tokens=4, mask_k_bias=True,
    untie_cls_and_patch_norms=False, device=_ANY,
)
_VIT_FREE = {"embed_dim", "depth", "num_heads", "ffn_layer", "ffn_ratio", "qkv_bias",
             "untie_global_and_local_cls_norm", "drop_path_rate", "layerscale_init"}
_CONVNEXT_FIXED: dict[str, Any] = dict(in_chans=3, patch_size=None)
_CONVNEXT_FREE = {"depths", "dims", "drop_path_rate", "layer_scale_init_value"}


def _entry(model_name: str) -> dict[str, Any]:
    if model_name not in ENTRYPOINTS:
        raise UserError(f"--model-name {model_name!r} is not a DINOv3 backbone; valid names: "
                        f"{', '.join(ENTRYPOINTS)}")
    return ENTRYPOINTS[model_name]


def _merge_arch(model_name: str, entry: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Entry architecture + official-style overrides, validated against what the timm path reproduces."""
    arch = dict(entry["arch"])
    fixed, free = (_VIT_FIXED, _VIT_FREE) if entry["family"] == "vit" else (_CONVNEXT_FIXED, _CONVNEXT_FREE)
    for key, value in (overrides or {}).items():
        if key in free:
            arch[key] = list(value) if isinstance(value, (list, tuple)) else value
        elif key in fixed:
            want = fixed[key]
            if want is not _ANY and value != want:
                raise UserError(f"arch_overrides {key}={value!r} for {model_name}: only {want!r} is supported "
                                f"(the value every official entry point uses)")
        else:
            raise UserError(f"arch_overrides: unknown key {key!r} for {model_name}; supported: "
                            f"{', '.join(sorted(free | set(fixed)))}")
    if entry["family"] == "vit":
        if arch["embed_dim"] % arch["num_heads"] or (arch["embed_dim"] // arch["num_heads"]) % 4:
            raise UserError(f"arch_overrides for {model_name}: embed_dim/num_heads must be a multiple of 4 (RoPE)")
        _ffn_align(arch["ffn_layer"])  # validates the name
    elif len(arch["depths"]) != 4 or len(arch["dims"]) != 4:
        raise UserError(f"arch_overrides for {model_name}: ConvNeXt needs 4 depths and 4 dims")
    return arch


def _ffn_align(ffn_layer: str) -> int:
    """0 for the plain MLP, else the SwiGLU hidden-size alignment (official: swiglu=8, swigluN=N)."""
    if ffn_layer == "mlp":
        return 0
    m = re.fullmatch(r"swiglu(\d*)", ffn_layer)
    if not m:
        raise UserError(f"ffn_layer {ffn_layer!r} is not supported; use mlp, swiglu, swiglu32, swiglu64 or swiglu128")
    return int(m.group(1) or 8)


def _timm_kwargs(family: str, arch: dict[str, Any]) -> dict[str, Any]:
    """Official architecture kwargs -> timm create_model kwargs (every size passed explicitly)."""
    if family == "convnext":
        kw = dict(depths=tuple(arch["depths"]), dims=tuple(arch["dims"]), num_classes=0,
                  drop_path_rate=float(arch.get("drop_path_rate", 0.0)))
        if "layer_scale_init_value" in arch:
            kw["ls_init_value"] = arch["layer_scale_init_value"]
        return kw
    dim = arch["embed_dim"]
    kw = dict(embed_dim=dim, depth=arch["depth"], num_heads=arch["num_heads"], qkv_bias=bool(arch["qkv_bias"]),
              num_classes=0, global_pool="token", drop_path_rate=float(arch.get("drop_path_rate", 0.0)))
    if "layerscale_init" in arch:
        kw["init_values"] = arch["layerscale_init"]
    align = _ffn_align(arch["ffn_layer"])
    if align:
        # official SwiGLUFFN: hidden = int(int(C*ratio)*2/3) rounded up to `align`; timm: int(C*mlp_ratio) rounded up.
        hidden = int(int(dim * arch["ffn_ratio"]) * 2 / 3)
        ratio = hidden / dim
        while int(dim * ratio) < hidden:  # guard against float rounding down
            ratio += 1e-9
        kw.update(swiglu_mlp=True, swiglu_align_to=align, mlp_ratio=ratio)
    else:
        kw.update(swiglu_mlp=False, mlp_ratio=float(arch["ffn_ratio"]))
    return kw


# ---------------------------------------------------------------------------------------------------------------
# Weights: official -> timm conversion (locating and reading every layout: weight_formats.py)
# ---------------------------------------------------------------------------------------------------------------

def _checkpoint_family(sd: dict[str, torch.Tensor]) -> str | None:
    """Official key layout only (timm-format state dicts are not official checkpoints)."""
    if "downsample_layers.0.0.weight" in sd:
        return "convnext"
    if "storage_tokens" in sd or "cls_token" in sd:
        return "vit"
    return None


def _arch_signature(family: str, arch: dict[str, Any]) -> tuple:
    if family == "convnext":
        return ("convnext", tuple(arch["depths"]), tuple(arch["dims"]))
    dim, align = arch["embed_dim"], _ffn_align(arch["ffn_layer"])
    hidden = int(dim * arch["ffn_ratio"])
    if align:
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % align
    return ("vit", dim, arch["depth"], bool(align), hidden, bool(arch["qkv_bias"]),
            bool(arch["untie_global_and_local_cls_norm"]))


def _checkpoint_signature(sd: dict[str, torch.Tensor]) -> tuple | None:
    """The same signature read from an official state dict (shapes only)."""
    try:
        if _checkpoint_family(sd) == "convnext":
            depths = tuple(1 + max(int(m.group(2)) for k in sd if (m := re.match(r"stages\.(\d+)\.(\d+)\.", k))
                                   and int(m.group(1)) == s) for s in range(4))
            dims = tuple(int(sd[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in range(4))
            return ("convnext", depths, dims)
        dim = int(sd["cls_token"].shape[-1])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        swiglu = "blocks.0.mlp.w1.weight" in sd
        hidden = int(sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
        return ("vit", dim, depth, swiglu, hidden, "blocks.0.attn.qkv.bias" in sd, "local_cls_norm.weight" in sd)
    except (KeyError, ValueError):
        return None


def guess_model_name(sd: dict[str, torch.Tensor], path: str | os.PathLike | None = None) -> str | None:
    """Which official entry point a checkpoint belongs to: by its official file name, else by its shapes."""
    if path is not None:
        name = Path(path).name
        for model_name, e in ENTRYPOINTS.items():
            if e["checkpoint_file"] and e["checkpoint_file"].rsplit("-", 1)[-1][:-4] in name:
                return model_name
    sig = _checkpoint_signature(sd)
    for model_name, e in ENTRYPOINTS.items():
        if sig is not None and _arch_signature(e["family"], e["arch"]) == sig:
            return model_name
    return None


def _expected_dropped(family: str, arch: dict[str, Any]) -> dict[str, list[int]]:
    """Official keys (-> shapes) with no timm counterpart that the official model never uses at inference."""
    if family == "convnext":
        c = arch["dims"][-1]
        return {"norms.3.weight": [c], "norms.3.bias": [c]}  # second registration of the final `norm`
    c, heads = arch["embed_dim"], arch["num_heads"]
    keys = {"mask_token": [1, c], "rope_embed.periods": [c // heads // 4]}
    if arch["qkv_bias"]:
        keys.update({f"blocks.{i}.attn.qkv.bias_mask": [3 * c] for i in range(arch["depth"])})
    if arch["untie_global_and_local_cls_norm"]:
        keys.update({"local_cls_norm.weight": [c], "local_cls_norm.bias": [c]})
    return keys


def _dropped_by_timm_filter(family: str, key: str) -> bool:
    """Keys timm's checkpoint_filter_fn discards without a word (mirrors timm 1.0.31)."""
    if family == "convnext":
        return key.startswith(("projectors.", "norms."))
    return (("rope" in key and key != "rope.freqs") or key.endswith((".periods", ".bias_mask", "mask_token"))
            or key.startswith(("projectors.", "local_cls_norm")))


_TIMM_TO_OFFICIAL = {
    "convnext": [(r"^stem\.", "downsample_layers.0."), (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
                 (r"^stages\.(\d+)\.blocks\.", r"stages.\1."), (r"\.conv_dw\.", ".dwconv."),
                 (r"\.mlp\.fc(\d)\.", r".pwconv\1."), (r"^head\.norm\.", "norm.")],
    "vit": [(r"^reg_token$", "storage_tokens"), (r"\.gamma_(\d)$", r".ls\1.gamma"), (r"\.mlp\.fc1_g\.", ".mlp.w1."),
            (r"\.mlp\.fc1_x\.", ".mlp.w2."), (r"\.attn\.[qv]_bias$", ".attn.qkv.bias")],
}


def _official_key(key: str, family: str, swiglu: bool = False) -> str:
    """timm key -> official key, only to name keys in error messages the way the user's checkpoint does."""
    for pattern, repl in _TIMM_TO_OFFICIAL[family]:
        key = re.sub(pattern, repl, key)
    return re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key) if swiglu else key


def _fmt_keys(keys: Sequence[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def convert_official_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, family: str, arch: dict[str, Any],
                                model_name: str = "", source: str = "checkpoint", allow_absent_unused: bool = False,
                                key_name: Callable[[str], str] | None = None, where: str | None = None
                                ) -> dict[str, torch.Tensor]:
    """Official DINOv3 state dict -> timm state dict for ``model``, strictly.

    Raises UserError unless the result has exactly ``model``'s keys and shapes and the only official keys left out
    are the inference-unused ones (``_expected_dropped``). Checks that each qkv ``bias_mask`` is 1/0/1 (timm drops the
    k third of the bias and hard-codes a zero k bias) and that the RoPE ``periods`` follow the official formula (timm
    recomputes them). Meta tensors (shape-only checks) skip these value checks. Nothing is loaded here.
    ``allow_absent_unused``: the inference-unused keys may be missing (transformers / timm files never carry them);
    ``key_name`` renames official keys in messages to the names the user's file uses; ``where`` names the tensors'
    origin in messages (default ``--weights <source>``)."""
    from timm.models import convnext as timm_convnext
    from timm.models import eva as timm_eva

    user_name = key_name or (lambda k: k)
    where = where or f"--weights {source}"
    ck_family = _checkpoint_family(sd)
    if ck_family != family:
        guess = guess_model_name(sd, source)
        raise UserError(f"{where} is a {ck_family or 'non-DINOv3'} checkpoint but --model-name {model_name} is a "
                        f"{family}" + (f"; pass --model-name {guess}" if guess else ""))
    sd = dict(sd)
    expected_dropped = _expected_dropped(family, arch)
    unexpected = [k for k in sd if _dropped_by_timm_filter(family, k) and k not in expected_dropped]
    if family == "vit" and not arch["qkv_bias"]:
        unexpected += [k for k in sd if k.endswith("attn.qkv.bias")]  # timm would skip them with a print
    missing = [] if allow_absent_unused else sorted(set(expected_dropped) - set(sd))
    mismatched = [f"{user_name(k)} {list(sd[k].shape)} vs model {shape}" for k, shape in expected_dropped.items()
                  if k in sd and list(sd[k].shape) != shape]

    kept = {k: v for k, v in sd.items() if k not in expected_dropped and k not in unexpected}
    target = model.state_dict()
    if family == "vit":
        patch = kept.get("patch_embed.proj.weight")
        if patch is not None and tuple(patch.shape[-2:]) != (16, 16):  # timm would silently resample it
            mismatched.append(f"{user_name('patch_embed.proj.weight')} {list(patch.shape)} (patch size must be 16)")
            kept.pop("patch_embed.proj.weight")
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints when it skips a bias
            out = timm_eva.checkpoint_filter_fn(kept, model)
    else:
        # key by key: timm's ConvNeXt filter looks up / reshapes to the model's tensors and raises on foreign keys
        out = {}
        for k, v in kept.items():
            try:
                out.update(timm_convnext.checkpoint_filter_fn({k: v}, model))
            except KeyError:
                unexpected.append(k)
            except RuntimeError:
                mismatched.append(f"{user_name(k)} {list(v.shape)}")
    swiglu = family == "vit" and _ffn_align(arch["ffn_layer"]) > 0
    unexpected = [user_name(k) for k in unexpected]
    missing = [user_name(k) for k in missing]
    name = lambda k: user_name(_official_key(k, family, swiglu))  # noqa: E731 - keys as the user's file names them
    missing += list(dict.fromkeys(name(k) for k in target if k not in out))
    unexpected += list(dict.fromkeys(name(k) for k in out if k not in target))
    mismatched += [f"{name(k)} {list(v.shape)} vs model {list(target[k].shape)}"
                   for k, v in out.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or mismatched:
        guess = guess_model_name(sd, source)
        parts = [f"{len(missing)} missing (e.g. {_fmt_keys(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {_fmt_keys(unexpected)})" if unexpected else "",
                 f"{len(mismatched)} with other shapes (e.g. {_fmt_keys(mismatched, 2)})" if mismatched else ""]
        hint = (f"; it looks like {guess}, pass --model-name {guess}" if guess and guess != model_name
                else "; check --model-name and --weights")
        raise UserError(f"{where} does not match --model-name {model_name}: "
                        f"{'; '.join(p for p in parts if p)}{hint}")
    if family == "vit":  # values timm ignores (it recomputes / hard-codes them) must be what it assumes
        for key, mask in sd.items():
            if not key.endswith("attn.qkv.bias_mask") or mask.is_meta:
                continue
            c = arch["embed_dim"]
            want = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)]).to(mask.dtype)
            if mask.shape != want.shape or not torch.equal(mask.cpu(), want):
                raise UserError(f"{where}: {key} is not the 1/0/1 (q/k/v) mask the timm implementation assumes; "
                                f"the q/v/k biases cannot be mapped exactly - use --backbone-impl hub")
        periods = sd.get("rope_embed.periods")
        if periods is not None and not periods.is_meta:
            # official RoPE (base 100): periods[j] = base ** (2j / (head_dim / 2)), j < head_dim / 4; timm recomputes it
            head_dim = arch["embed_dim"] // arch["num_heads"]
            want = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
            if periods.shape != want.shape or not torch.allclose(periods.float().cpu(), want, rtol=1e-5, atol=0):
                raise UserError(f"{where}: rope_embed.periods {list(periods.shape)} is not the RoPE of --model-name "
                                f"{model_name} (other head size or RoPE base); check --model-name")
    return out


def _assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load into a model built on the meta device (no wasted random init), then rebuild timm's
    non-persistent buffers (RoPE periods, zero k bias), which no checkpoint carries."""
    target = model.state_dict()
    sd = {k: (v.to(target[k].dtype) if v.dtype != target[k].dtype else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    for module in model.modules():
        if module is not model and hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - would mean a timm change
        raise RuntimeError(f"tensors left uninitialised after loading: {left[:5]}")


# ---------------------------------------------------------------------------------------------------------------
# The backbone module
# ---------------------------------------------------------------------------------------------------------------

def _take_indices(n: int | Sequence[int], total: int) -> list[int]:
    """Official semantics: an int takes the last n layers, a sequence those indices; returned in layer order."""
    if isinstance(n, int):
        if not 1 <= n <= total:
            raise ValueError(f"n={n} but the backbone has {total} layers")
        return list(range(total - n, total))
    idx = sorted({int(i) for i in n})
    if not idx or idx[0] < 0 or idx[-1] >= total:
        raise ValueError(f"layer indices {list(n)} out of range 0..{total - 1}")
    return idx


def _evenly_spaced(depth: int, k: int = 4) -> list[int]:
    """k blocks spread over the depth, the last block always included (depth 12 -> 2, 5, 8, 11)."""
    return sorted({(i + 1) * depth // k - 1 for i in range(k)} - {-1} | {depth - 1})


class DinoBackbone(nn.Module):
    """A DINOv3 backbone with the official output semantics, whatever builds it (timm or the official code).

    ``forward_last(x)`` == official ``get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]``;
    ``forward_multi(x)``: ConvNeXt stages 1,2,3 (strides 8/16/32, only stage 3 with the final norm, as the official
    code), ViT 4 evenly spaced blocks, all normed, stride 16. ``x`` is float, already normalized with ``mean``/``std``.
    Frozen (the default): no gradients, stays in eval mode even inside a module put in ``train()``. Partly or fully
    trainable: see ``set_trainable``. ``weights_source``: where the weights came from (``build_backbone`` sets it).
    """

    def __init__(self, model: nn.Module, model_name: str, family: str, arch: dict[str, Any], impl: str = "timm",
                 weights_family: str = "lvd1689m", fine_tune: bool = False, unfreeze_last: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.family = family
        self.impl = impl
        self.arch = dict(arch)
        self.weights_family = weights_family
        self.mean, self.std = NORMALIZATION[weights_family]
        if family == "convnext":
            dims = list(arch["dims"])
            self.num_layers = 4
            self.last_channels, self.last_stride = dims[3], 32
            self.multi_indices = [1, 2, 3]
            self.multi_channels, self.multi_strides = dims[1:], [8, 16, 32]
            self.size_divisor = 32
        else:
            dim = arch["embed_dim"]
            self.num_layers = arch["depth"]
            self.last_channels, self.last_stride = dim, 16
            self.multi_indices = _evenly_spaced(arch["depth"])
            self.multi_channels = [dim] * len(self.multi_indices)
            self.multi_strides = [16] * len(self.multi_indices)
            self.size_divisor = 16
        self.weights_source: dict[str, Any] | None = None
        self.frozen, self.unfreeze_last = True, 0
        self.set_trainable(unfreeze_last if unfreeze_last is not None else (-1 if fine_tune else 0))

    # ----------------------------------------------------------------------------------------- trainable part
    def _layer_of(self, name: str) -> int | None:
        """Depth index of a parameter/module name of ``self.model``: -1 embeddings (ViT), 0..L-1 the blocks / stages
        (the ConvNeXt stem belongs to stage 0, as in the official code), L the final norm; None for containers."""
        if not name or name in ("blocks", "stages", "downsample_layers"):
            return None
        m = re.match(r"(?:blocks|stages|downsample_layers)\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
        if re.match(r"(?:norm|norms|head|fc_norm|head_drop|cls_norm|local_cls_norm)(?:\.|$)", name):
            return self.num_layers
        return -1 if self.family == "vit" else 0

    def _trains(self, layer: int | None) -> bool:
        n = self.unfreeze_last
        return layer is not None and (n == -1 or (n > 0 and layer >= self.num_layers - n))

    def set_trainable(self, unfreeze_last: int) -> DinoBackbone:
        """``0``: frozen (no gradients, always eval mode, run under ``no_grad``); ``-1``: everything trains;
        ``N``: the last N ViT blocks / ConvNeXt stages plus the final norm train, the rest stays frozen, in eval mode,
        and records no autograd graph (its parameters and the input need no gradient). ``frozen`` is True only
        for 0."""
        n, total = unfreeze_last, self.num_layers
        what = "blocks" if self.family == "vit" else "stages"
        if isinstance(n, bool) or not isinstance(n, int) or not -1 <= n <= total:
            raise UserError(f"--unfreeze-last {n}: use 0 (frozen backbone), -1 (fine-tune all) or 1..{total} "
                            f"(the last N of the {total} {what} of {self.model_name})")
        if n > 0 and self.impl != "timm":
            raise UserError(f"--unfreeze-last {n}: partial fine-tuning needs --backbone-impl timm (hub: 0 or -1)")
        self.unfreeze_last, self.frozen = n, n == 0
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._trains(self._layer_of(name)))
        return self.train(self.training)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Trainable parameters by depth, shallowest first (ViT: embeddings, block 0, ...; ConvNeXt: stage 0 with the
        stem, ...); the final norm joins the deepest group. For layer-wise LR decay: the last group gets the backbone
        LR, each earlier one R times the next. Empty when frozen."""
        groups: dict[int, list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                layer = min(self._layer_of(name), self.num_layers - 1)
                groups.setdefault(layer, []).append(p)
        return [groups[k] for k in sorted(groups)]

    def frozen_state_keys(self) -> set[str]:
        """State-dict keys (of this module) that never change in training: frozen parameters and buffers."""
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        return {k for k, t in self.state_dict(keep_vars=True).items() if id(t) not in trainable}

    def train(self, mode: bool = True) -> DinoBackbone:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen backbone is a fixed feature extractor, never in training mode
        elif mode and self.unfreeze_last > 0:
            for name, module in self.model.named_modules():  # per module: containers span trained and frozen layers
                layer = self._layer_of(name)
                if layer is not None and not self._trains(layer):
                    module.training = False
        return self

    def _grad_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_last(x)

    def forward_last(self, x: torch.Tensor) -> torch.Tensor:
        """[B, last_channels, H/stride, W/stride], exactly the official n=1, reshape, norm output."""
        return self.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]

    def forward_multi(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps with ``multi_channels`` / ``multi_strides`` (official ``get_intermediate_layers`` on
        ``multi_indices`` with reshape and norm)."""
        return list(self.get_intermediate_layers(x, n=self.multi_indices, reshape=True, norm=True))

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = True,
                                norm: bool = True, return_class_token: bool = False,
                                return_extra_tokens: bool = False) -> tuple:
        """Official semantics for both families (only the default differs: ``reshape=True`` here, official False).

        Returns one entry per taken layer, in layer order: the patch map, or a tuple ``(patch, cls[, storage])``.
        ``return_extra_tokens`` (the 4 storage tokens) exists for ViTs only, as in the official code.
        """
        if return_extra_tokens and self.family != "vit":
            raise ValueError("return_extra_tokens exists only for ViT backbones (official ConvNeXt has no tokens)")
        with self._grad_context():
            if self.impl == "hub":
                kw = dict(return_extra_tokens=True) if return_extra_tokens else {}
                return tuple(self.model.get_intermediate_layers(x, n=n, reshape=reshape, norm=norm,
                                                                return_class_token=return_class_token, **kw))
            idx = _take_indices(n, self.num_layers)
            if self.family == "convnext":
                return self._convnext_layers(x, idx, reshape, norm, return_class_token)
            return self._vit_layers(x, idx, reshape, norm, return_class_token, return_extra_tokens)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Official ``forward_features`` dict: ``x_norm_clstoken`` [B,C], ``x_storage_tokens`` [B,S,C],
        ``x_norm_patchtokens`` [B,HW,C], ``x_prenorm`` (raw last layer: ViT all tokens, ConvNeXt patch tokens)."""
        if self.impl == "hub":
            with self._grad_context():
                return self.model.forward_features(x)
        if self.family == "vit":
            patch, cls, storage = self.get_intermediate_layers(x, n=1, reshape=False, norm=False,
                                                               return_class_token=True, return_extra_tokens=True)[0]
            with self._grad_context():
                prenorm = torch.cat([cls[:, None], storage, patch], dim=1)
                normed = self.model.norm(prenorm)
            n_prefix = 1 + storage.shape[1]
            return dict(x_norm_clstoken=normed[:, 0], x_storage_tokens=normed[:, 1:n_prefix],
                        x_norm_patchtokens=normed[:, n_prefix:], x_prenorm=prenorm)
        with self._grad_context():
            raw = self.model.forward_intermediates(x, indices=[3], norm=False, intermediates_only=True)[0]
            tokens = raw.flatten(2).transpose(1, 2)
            final_norm = self.model.head.norm
            norm_tokens = F.layer_norm(tokens, tokens.shape[-1:], final_norm.weight, final_norm.bias, final_norm.eps)
            cls = F.layer_norm(tokens.mean(dim=1), tokens.shape[-1:], final_norm.weight, final_norm.bias,
                               final_norm.eps)
        return dict(x_norm_clstoken=cls, x_storage_tokens=tokens[:, :0], x_norm_patchtokens=norm_tokens,
                    x_prenorm=tokens)

    def _convnext_layers(self, x: torch.Tensor, idx: list[int], reshape: bool, norm: bool, cls: bool) -> tuple:
        feats = self.model.forward_intermediates(x, indices=idx, norm=False, stop_early=True, intermediates_only=True)
        final_norm = self.model.head.norm  # official `norm`: LayerNorm over channels, applied to the last stage only
        out = []
        for i, f in zip(idx, feats):
            token = f.mean(dim=(-2, -1))  # official class token: spatial mean of the raw map, then the same norm
            if norm and i == 3:
                f = final_norm(f)
                token = F.layer_norm(token, token.shape[-1:], final_norm.weight, final_norm.bias, final_norm.eps)
            if not reshape:
                f = f.flatten(2).transpose(1, 2)
            out.append((f, token) if cls else f)
        return tuple(out)

    def _vit_layers(self, x: torch.Tensor, idx: list[int], reshape: bool, norm: bool, cls: bool,
                    extra: bool) -> tuple:
        h, w = x.shape[-2] // 16 * 16, x.shape[-1] // 16 * 16
        if (h, w) != tuple(x.shape[-2:]):
            x = x[..., :h, :w]  # the official patch conv floors; timm asserts divisibility -> same result
        feats = self.model.forward_intermediates(x, indices=idx, return_prefix_tokens=True, norm=norm,
                                                 stop_early=True, output_fmt="NCHW" if reshape else "NLC",
                                                 intermediates_only=True)
        out = []
        for patch, prefix in feats:
            parts = (patch,) + ((prefix[:, 0],) if cls else ()) + ((prefix[:, 1:],) if extra else ())
            out.append(parts if len(parts) > 1 else patch)
        return tuple(out)


def official_param_count(backbone: DinoBackbone) -> int:
    """Parameter count of the official model this backbone reproduces (shared tensors once).

    timm has no slot for official parameters that inference never uses: ``mask_token`` [C], the k third of each
    qkv bias (always masked to zero; timm keeps a zero buffer) and the SAT / 7B ``local_cls_norm`` [2C].
    """
    n = sum(p.numel() for p in backbone.model.parameters())
    if backbone.impl == "hub" or backbone.family == "convnext":
        return n
    arch, dim = backbone.arch, backbone.arch["embed_dim"]
    n += dim  # mask_token
    if arch["qkv_bias"]:
        n += arch["depth"] * dim
    if arch["untie_global_and_local_cls_norm"]:
        n += 2 * dim
    return n


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------

def _select_entry(model_name: str, loaded: LoadedWeights | None,
                  weights_path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The entry for ``model_name``, switched to the weight variant (SAT-493M vs LVD-1689M) of the same hub function
    that the weights belong to: for Meta's files by the official checkpoint hash in the file name (as the official
    hub does), for the other layouts by the weight family their content records (see weight_formats)."""
    entry = _entry(model_name)
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
    """Architecture of transformers/timm weights, comparable with ``_arch_signature(...)[:5]``: the qkv-bias flag
    (timm also publishes bias-free copies) and the SAT ``local_cls_norm`` (never exported) are left out."""
    cfg = loaded.config_arch
    if cfg is not None:
        if cfg["family"] == "convnext":
            return ("convnext", tuple(cfg["depths"]), tuple(cfg["dims"]))
        return ("vit", cfg["embed_dim"], cfg["depth"], cfg["gated"], cfg["hidden"])
    sig = _checkpoint_signature(loaded.state_dict)
    return None if sig is None else sig[:5]


def _describe(sig: tuple) -> str:
    if sig[0] == "convnext":
        return f"a ConvNeXt with depths {list(sig[1])}, widths {list(sig[2])}"
    return f"a ViT with width {sig[1]}, {sig[2]} blocks, {'SwiGLU' if sig[3] else 'MLP'} hidden size {sig[4]}"


def _candidates(loaded: LoadedWeights) -> list[str]:
    """Entry points whose architecture the transformers/timm weights have; the weight family picks among twins."""
    sig = _layout_signature(loaded)
    heads = (loaded.config_arch or {}).get("num_heads")
    names = [n for n, e in ENTRYPOINTS.items() if sig is not None and _arch_signature(e["family"], e["arch"])[:5] == sig
             and (heads is None or e["arch"].get("num_heads") == heads)]
    want = loaded.weights_family or "lvd1689m"
    return sorted(names, key=lambda n: (ENTRYPOINTS[n]["weights_family"] != want, not ENTRYPOINTS[n]["official"]))


def _infer_model_name(loaded: LoadedWeights) -> str:
    name = guess_model_name(loaded.state_dict, loaded.path) if loaded.format == "meta" else next(
        iter(_candidates(loaded)), None)
    if name is None:
        sig = _layout_signature(loaded) if loaded.format != "meta" else _checkpoint_signature(loaded.state_dict)
        what = _describe(sig) if sig else "an unrecognised architecture"
        raise UserError(f"{loaded.where} holds {what}, which is no DINOv3 entry point; pass --model-name (and "
                        f"arch_overrides for a custom size)")
    return name


def _check_layout_arch(loaded: LoadedWeights, model_name: str, family: str, arch: dict[str, Any]) -> None:
    """transformers/timm weights: the architecture they record must be the one --model-name builds."""
    sig = _layout_signature(loaded)
    want = _arch_signature(family, arch)[:5]
    heads = (loaded.config_arch or {}).get("num_heads")
    if sig == want and (heads is None or family != "vit" or heads == arch["num_heads"]):
        return
    guess = next(iter(_candidates(loaded)), None)
    have = _describe(sig) if sig else f"a {loaded.family}"
    if sig == want:
        have += f" with {heads} attention heads (--model-name has {arch['num_heads']})"
    hint = f"pass --model-name {guess} (or omit --model-name)" if guess else "check --model-name and --weights"
    raise UserError(f"{loaded.where} ({loaded.format} layout) is {have} but --model-name {model_name} is "
                    f"{_describe(want)}; {hint}")


def _random_init_warning(model_name: str, entry: dict[str, Any]) -> None:
    what = ("random init only: Meta publishes no weights for this architecture-only name" if not entry["official"]
            else f"pass --weights {entry['checkpoint_file']} for the pretrained backbone")
    warnings.warn(f"WARNING: {model_name} has RANDOM weights (no --weights given; {what})",
                  RandomWeightsWarning, stacklevel=3)


def _build_timm(model_name: str, entry: dict[str, Any], arch: dict[str, Any],
                loaded: LoadedWeights | None) -> nn.Module:
    import timm

    kwargs = _timm_kwargs(entry["family"], arch)
    if loaded is None:
        return timm.create_model(entry["timm_name"], pretrained=False, **kwargs)
    with torch.device("meta"):  # weights replace everything: skip the (slow, for 7B huge) random init
        model = timm.create_model(entry["timm_name"], pretrained=False, **kwargs)
    sd = loaded.state_dict
    if loaded.format == "timm" and entry["family"] == "vit" and arch["qkv_bias"] and not any(
            k.endswith("attn.qkv.bias") for k in sd):
        # timm also publishes DINOv3 ViTs built without q/v biases; a zero bias computes exactly the same
        sd = dict(sd)
        for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
            sd[k.replace(".weight", ".bias")] = torch.zeros(sd[k].shape[0], dtype=sd[k].dtype)
    converted = convert_official_state_dict(sd, model, entry["family"], arch, model_name,
                                            str(loaded.hub or loaded.path), allow_absent_unused=loaded.format != "meta",
                                            key_name=loaded.key_name)
    _assign_state_dict(model, converted)
    return model


def _hub_repo() -> Path:
    load_dotenv_once()
    repo = os.environ.get("DINOv3_REPO")
    if not repo:
        raise UserError("--backbone-impl hub needs the official code: git clone "
                        "https://github.com/facebookresearch/dinov3.git dinov3/dinov3 and set "
                        "DINOv3_REPO=dinov3/dinov3 in .env (or use --backbone-impl timm)")
    path = resolve_path(repo)
    if not (path / "hubconf.py").is_file():
        raise UserError(f"DINOv3_REPO={repo}: no hubconf.py in {path}; clone "
                        f"https://github.com/facebookresearch/dinov3.git there (or use --backbone-impl timm)")
    return path


def _build_hub(entry: dict[str, Any], overrides: dict[str, Any] | None, weights_path: Path | None) -> nn.Module:
    repo = _hub_repo()
    kwargs: dict[str, Any] = dict(overrides or {})
    if weights_path is None:
        kwargs["pretrained"] = False
    else:
        kwargs["weights"] = str(weights_path)
    try:
        return torch.hub.load(str(repo), entry["hub_function"], source="local", **kwargs)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"official DINOv3 code in {repo} could not build {entry['hub_function']} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc


def build_backbone(model_name: str | None = None, weights: str | os.PathLike | None = None, impl: str = "timm",
                   fine_tune: bool = False, arch_overrides: dict[str, Any] | None = None,
                   unfreeze_last: int | None = None) -> DinoBackbone:
    """Build ``model_name`` (see ``ENTRYPOINTS``) with timm (default) or the official code (``impl="hub"``).

    ``weights``: Meta's ``.pth``, a transformers folder/file, a timm file, or a hub name (``hf-hub:...``,
    ``timm:...``) - see ``weight_formats`` - loaded strictly; the layout is read from the content and recorded in
    ``backbone.weights_source``. ``None`` gives random weights with a ``RandomWeightsWarning``. ``model_name=None``
    takes the architecture from the weights. ``arch_overrides`` takes official constructor kwargs (e.g. ``depth``,
    ``embed_dim``, ``dims``) - used for tiny parity models. Trainable part: ``unfreeze_last`` (see
    ``DinoBackbone.set_trainable``; ``None`` -> ``-1`` if ``fine_tune`` else ``0``).
    """
    if impl not in ("timm", "hub"):
        raise UserError(f"--backbone-impl {impl!r} is not valid; use timm or hub")
    if model_name is not None:
        _entry(model_name)
    loaded: LoadedWeights | None = None
    if impl == "hub":
        _hub_repo()  # fail on a missing clone before anything else
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
    arch = _merge_arch(model_name, entry, arch_overrides)
    if loaded is not None and loaded.format != "meta":
        _check_layout_arch(loaded, model_name, entry["family"], arch)
    if source is None:
        _random_init_warning(model_name, entry)
    if impl == "timm":
        model = _build_timm(model_name, entry, arch, loaded)
    else:
        model = _build_hub(entry, arch_overrides, path)
    weights_family = (loaded.weights_family if loaded is not None and loaded.weights_family
                      else entry["weights_family"])
    backbone = DinoBackbone(model, model_name, entry["family"], arch, impl=impl, weights_family=weights_family,
                            fine_tune=fine_tune, unfreeze_last=unfreeze_last)
    backbone.weights_source = source
    return backbone
