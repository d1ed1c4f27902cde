"""The DINOv3 entry points and architecture families: facts copied from the official hub, and the mapping of the
official constructor arguments onto timm's.

``ENTRYPOINTS[name]`` describes one official hub entry point (plus two architecture-only names for demos and tests):
its family, architecture (official constructor kwarg names), timm model name, checkpoint file and weight family.
``FAMILIES[family]`` holds what differs between the two architectures (ViT, ConvNeXt): which official kwargs may
change, the timm kwargs, a shape signature for recognising weights, the depth layout and the feature maps a
backbone returns (``output_shape``). The parity fixtures (``tests/fixtures/dinov3``) are used by the tests only.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..core.errors import UserError

# Input normalization per weight family (official README / hub transforms).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}




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
del _name, _e


def entry_point(model_name: str) -> dict[str, Any]:
    """The entry point ``model_name``; a UserError listing the valid names for another one."""
    if model_name not in ENTRYPOINTS:
        raise UserError(f"--model-name {model_name!r} is not a DINOv3 backbone; valid names: "
                        f"{', '.join(ENTRYPOINTS)}")
    return ENTRYPOINTS[model_name]


def merge_arch(model_name: str, entry: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Entry architecture + official-style overrides, validated against what the timm path reproduces."""
    family = FAMILIES[entry["family"]]
    arch = dict(entry["arch"])
    for key, value in (overrides or {}).items():
        if key in family.free:
            arch[key] = list(value) if isinstance(value, (list, tuple)) else value
        elif key in family.fixed:
            want = family.fixed[key]
            if want is not ANY and value != want:
                raise UserError(f"arch_overrides {key}={value!r} for {model_name}: only {want!r} is supported "
                                f"(the value every official entry point uses)")
        else:
            raise UserError(f"arch_overrides: unknown key {key!r} for {model_name}; supported: "
                            f"{', '.join(sorted(family.free | set(family.fixed)))}")
    family.check_arch(model_name, arch)
    return arch


def ffn_align(ffn_layer: str) -> int:
    """0 for the plain MLP, else the SwiGLU hidden-size alignment (official: swiglu=8, swigluN=N)."""
    if ffn_layer == "mlp":
        return 0
    m = re.fullmatch(r"swiglu(\d*)", ffn_layer)
    if not m:
        raise UserError(f"ffn_layer {ffn_layer!r} is not supported; use mlp, swiglu, swiglu32, swiglu64 or swiglu128")
    return int(m.group(1) or 8)


def describe_signature(sig: tuple) -> str:
    """A shape signature (``Family.signature``, first element the family) in words, for messages."""
    return FAMILIES[sig[0]].describe(sig)


# ---------------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------------

class FeatureShape(NamedTuple):
    """One feature map a backbone returns: its channels and its stride (input pixels per map cell)."""

    channels: int
    stride: int


# Official constructor kwargs the timm implementation reproduces only at one value (every hub entry point uses it).
# ANY: accepted at any value (bookkeeping, or training-only like the RoPE coordinate rescaling). Other keys in
# arch_overrides are errors; a family's ``free`` ones are the architecture.
ANY = object()


class Family:
    """What differs between the DINOv3 architectures for building and describing a backbone."""

    name: str = ""
    fixed: dict[str, Any] = {}
    free: frozenset[str] = frozenset()
    layer_kind = ""  # what the depth counts, for messages ("blocks", "stages")
    # depth index of the parameters before the first layer and outside the final norm (see DinoBackbone._layer_of)
    stem_layer = 0
    has_tokens = False  # class and storage tokens beside the patch map

    def check_arch(self, model_name: str, arch: dict[str, Any]) -> None:
        """UserError for an architecture the timm path cannot build."""

    def timm_kwargs(self, arch: dict[str, Any]) -> dict[str, Any]:
        """Official architecture kwargs -> timm ``create_model`` kwargs (every size passed explicitly)."""
        raise NotImplementedError

    def signature(self, arch: dict[str, Any]) -> tuple:
        """What tells architectures apart in a state dict (shapes only): comparable with a checkpoint's."""
        raise NotImplementedError

    def describe(self, sig: tuple) -> str:
        raise NotImplementedError

    def recorded_signature(self, recorded: dict[str, Any]) -> tuple:
        """``signature(...)[:5]`` of the architecture transformers / timm weights record
        (``weight_formats.hf_config_architecture``)."""
        raise NotImplementedError

    def depth(self, arch: dict[str, Any]) -> tuple[int, list[int]]:
        """(number of layers, the layer indices ``multi`` takes)."""
        raise NotImplementedError

    def output_shape(self, arch: dict[str, Any]) -> dict[str, list[FeatureShape]]:
        """The maps a backbone of ``arch`` returns per feature extractor (``last``, ``multi``), in order."""
        raise NotImplementedError


def _evenly_spaced(depth: int, k: int = 4) -> list[int]:
    """k blocks spread over the depth, the last block always included (depth 12 -> 2, 5, 8, 11)."""
    return sorted({(i + 1) * depth // k - 1 for i in range(k)} - {-1} | {depth - 1})


class ViTFamily(Family):
    """Plain ViT, patch size 16: every block's map has stride 16; ``multi`` takes 4 evenly spaced blocks."""

    name = "vit"
    fixed = dict(
        img_size=ANY, patch_size=16, in_chans=3, pos_embed_rope_base=100, pos_embed_rope_min_period=None,
        pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None,
        pos_embed_rope_jitter_coords=None, pos_embed_rope_rescale_coords=ANY, pos_embed_rope_dtype="fp32",
        norm_layer="layernormbf16", ffn_bias=True, proj_bias=True, n_storage_tokens=4, mask_k_bias=True,
        untie_cls_and_patch_norms=False, device=ANY,
    )
    free = frozenset({"embed_dim", "depth", "num_heads", "ffn_layer", "ffn_ratio", "qkv_bias",
                      "untie_global_and_local_cls_norm", "drop_path_rate", "layerscale_init"})
    layer_kind = "blocks"
    stem_layer = -1  # the patch embedding and tokens come before block 0
    has_tokens = True
    stride = 16

    def check_arch(self, model_name: str, arch: dict[str, Any]) -> None:
        if arch["embed_dim"] % arch["num_heads"] or (arch["embed_dim"] // arch["num_heads"]) % 4:
            raise UserError(f"arch_overrides for {model_name}: embed_dim/num_heads must be a multiple of 4 (RoPE)")
        ffn_align(arch["ffn_layer"])  # validates the name

    def timm_kwargs(self, arch: dict[str, Any]) -> dict[str, Any]:
        dim = arch["embed_dim"]
        kw = dict(embed_dim=dim, depth=arch["depth"], num_heads=arch["num_heads"], qkv_bias=bool(arch["qkv_bias"]),
                  num_classes=0, global_pool="token", drop_path_rate=float(arch.get("drop_path_rate", 0.0)))
        if "layerscale_init" in arch:
            kw["init_values"] = arch["layerscale_init"]
        align = ffn_align(arch["ffn_layer"])
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

    def signature(self, arch: dict[str, Any]) -> tuple:
        dim, align = arch["embed_dim"], ffn_align(arch["ffn_layer"])
        hidden = int(dim * arch["ffn_ratio"])
        if align:
            hidden = int(hidden * 2 / 3)
            hidden += -hidden % align
        return ("vit", dim, arch["depth"], bool(align), hidden, bool(arch["qkv_bias"]),
                bool(arch["untie_global_and_local_cls_norm"]))

    def describe(self, sig: tuple) -> str:
        return f"a ViT with width {sig[1]}, {sig[2]} blocks, {'SwiGLU' if sig[3] else 'MLP'} hidden size {sig[4]}"

    def recorded_signature(self, recorded: dict[str, Any]) -> tuple:
        return ("vit", recorded["embed_dim"], recorded["depth"], recorded["gated"], recorded["hidden"])

    def depth(self, arch: dict[str, Any]) -> tuple[int, list[int]]:
        return arch["depth"], _evenly_spaced(arch["depth"])

    def output_shape(self, arch: dict[str, Any]) -> dict[str, list[FeatureShape]]:
        shape = FeatureShape(arch["embed_dim"], self.stride)
        return {"last": [shape], "multi": [shape] * len(self.depth(arch)[1])}


class ConvNeXtFamily(Family):
    """ConvNeXt: 4 stages of strides 4/8/16/32; ``multi`` takes stages 1-3 (strides 8/16/32)."""

    name = "convnext"
    fixed = dict(in_chans=3, patch_size=None)
    free = frozenset({"depths", "dims", "drop_path_rate", "layer_scale_init_value"})
    layer_kind = "stages"
    stem_layer = 0  # the stem belongs to stage 0, as in the official code
    strides = (4, 8, 16, 32)
    multi_indices = (1, 2, 3)

    def check_arch(self, model_name: str, arch: dict[str, Any]) -> None:
        if len(arch["depths"]) != 4 or len(arch["dims"]) != 4:
            raise UserError(f"arch_overrides for {model_name}: ConvNeXt needs 4 depths and 4 dims")

    def timm_kwargs(self, arch: dict[str, Any]) -> dict[str, Any]:
        kw = dict(depths=tuple(arch["depths"]), dims=tuple(arch["dims"]), num_classes=0,
                  drop_path_rate=float(arch.get("drop_path_rate", 0.0)))
        if "layer_scale_init_value" in arch:
            kw["ls_init_value"] = arch["layer_scale_init_value"]
        return kw

    def signature(self, arch: dict[str, Any]) -> tuple:
        return ("convnext", tuple(arch["depths"]), tuple(arch["dims"]))

    def describe(self, sig: tuple) -> str:
        return f"a ConvNeXt with depths {list(sig[1])}, widths {list(sig[2])}"

    def recorded_signature(self, recorded: dict[str, Any]) -> tuple:
        return self.signature(recorded)

    def depth(self, arch: dict[str, Any]) -> tuple[int, list[int]]:
        return len(self.strides), list(self.multi_indices)

    def output_shape(self, arch: dict[str, Any]) -> dict[str, list[FeatureShape]]:
        stages = [FeatureShape(int(c), s) for c, s in zip(arch["dims"], self.strides)]
        return {"last": [stages[-1]], "multi": [stages[i] for i in self.multi_indices]}


FAMILIES: dict[str, Family] = {f.name: f for f in (ViTFamily(), ConvNeXtFamily())}
