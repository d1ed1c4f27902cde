"""``DinoBackbone``: a DINOv3 backbone with the official output semantics, whatever builds it (timm or the official
code), freezing / partial fine-tuning, and the feature maps it declares (``output_shape()``).

Input sizes that are not multiples of the stride: the official ViT patch conv floors (the bottom/right remainder
pixels are ignored); timm asserts divisibility, so the timm ViT path crops the input to ``H//16*16 x W//16*16``
first, which gives the official result exactly. ConvNeXt convs floor at every stride in both implementations.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .entrypoints import FAMILIES, NORMALIZATION, FeatureShape


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


class DinoBackbone(nn.Module):
    """A DINOv3 backbone with the official output semantics, whatever builds it (timm or the official code).

    ``forward_last(x)`` == official ``get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]``;
    ``forward_multi(x)``: ConvNeXt stages 1,2,3 (strides 8/16/32, only stage 3 with the final norm, as the official
    code), ViT 4 evenly spaced blocks, all normed, stride 16. ``output_shape()`` declares the channels and strides of
    both. ``x`` is float, already normalized with ``mean``/``std``.
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
        self._family = FAMILIES[family]
        self.num_layers, self.multi_indices = self._family.depth(arch)
        self._output_shape = self._family.output_shape(arch)
        self.weights_source: dict[str, Any] | None = None
        self.frozen, self.unfreeze_last = True, 0
        self.set_trainable(unfreeze_last if unfreeze_last is not None else (-1 if fine_tune else 0))

    def output_shape(self) -> dict[str, list[FeatureShape]]:
        """The maps ``forward_last`` (``"last"``) and ``forward_multi`` (``"multi"``) return: channels and stride of
        each, in order (stride: input pixels per map cell; inputs are cropped or padded to a multiple of it)."""
        return {mode: list(shapes) for mode, shapes in self._output_shape.items()}

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
        return self._family.stem_layer

    def _trains(self, layer: int | None) -> bool:
        n = self.unfreeze_last
        return layer is not None and (n == -1 or (n > 0 and layer >= self.num_layers - n))

    def set_trainable(self, unfreeze_last: int) -> DinoBackbone:
        """``0``: frozen (no gradients, always eval mode, run under ``no_grad``); ``-1``: everything trains;
        ``N``: the last N ViT blocks / ConvNeXt stages plus the final norm train, the rest stays frozen, in eval mode,
        and records no autograd graph (its parameters and the input need no gradient). ``frozen`` is True only
        for 0."""
        n, total = unfreeze_last, self.num_layers
        what = self._family.layer_kind
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
        """``output_shape()["last"]``: [B, C, H/stride, W/stride], exactly the official n=1, reshape, norm output."""
        return self.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]

    def forward_multi(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``output_shape()["multi"]``: official ``get_intermediate_layers`` on ``multi_indices`` with reshape and
        norm."""
        return list(self.get_intermediate_layers(x, n=self.multi_indices, reshape=True, norm=True))

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = True,
                                norm: bool = True, return_class_token: bool = False,
                                return_extra_tokens: bool = False) -> tuple:
        """Official semantics for both families (only the default differs: ``reshape=True`` here, official False).

        Returns one entry per taken layer, in layer order: the patch map, or a tuple ``(patch, cls[, storage])``.
        ``return_extra_tokens`` (the 4 storage tokens) exists for ViTs only, as in the official code.
        """
        if return_extra_tokens and not self._family.has_tokens:
            raise ValueError("return_extra_tokens exists only for ViT backbones (official ConvNeXt has no tokens)")
        with self._grad_context():
            if self.impl == "hub":
                kw = dict(return_extra_tokens=True) if return_extra_tokens else {}
                return tuple(self.model.get_intermediate_layers(x, n=n, reshape=reshape, norm=norm,
                                                                return_class_token=return_class_token, **kw))
            idx = _take_indices(n, self.num_layers)
            return _TIMM_FORWARD[self.family].layers(self, x, idx, reshape, norm, return_class_token,
                                                     return_extra_tokens)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Official ``forward_features`` dict: ``x_norm_clstoken`` [B,C], ``x_storage_tokens`` [B,S,C],
        ``x_norm_patchtokens`` [B,HW,C], ``x_prenorm`` (raw last layer: ViT all tokens, ConvNeXt patch tokens)."""
        if self.impl == "hub":
            with self._grad_context():
                return self.model.forward_features(x)
        return _TIMM_FORWARD[self.family].features(self, x)


# ---------------------------------------------------------------------------------------------------------------
# timm models with the official semantics, per family
# ---------------------------------------------------------------------------------------------------------------

class _TimmViT:
    @staticmethod
    def layers(b: DinoBackbone, x: torch.Tensor, idx: list[int], reshape: bool, norm: bool, cls: bool,
               extra: bool) -> tuple:
        h, w = x.shape[-2] // 16 * 16, x.shape[-1] // 16 * 16
        if (h, w) != tuple(x.shape[-2:]):
            x = x[..., :h, :w]  # the official patch conv floors; timm asserts divisibility -> same result
        feats = b.model.forward_intermediates(x, indices=idx, return_prefix_tokens=True, norm=norm,
                                              stop_early=True, output_fmt="NCHW" if reshape else "NLC",
                                              intermediates_only=True)
        out = []
        for patch, prefix in feats:
            parts = (patch,) + ((prefix[:, 0],) if cls else ()) + ((prefix[:, 1:],) if extra else ())
            out.append(parts if len(parts) > 1 else patch)
        return tuple(out)

    @staticmethod
    def features(b: DinoBackbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
        patch, cls, storage = b.get_intermediate_layers(x, n=1, reshape=False, norm=False,
                                                        return_class_token=True, return_extra_tokens=True)[0]
        with b._grad_context():
            prenorm = torch.cat([cls[:, None], storage, patch], dim=1)
            normed = b.model.norm(prenorm)
        n_prefix = 1 + storage.shape[1]
        return dict(x_norm_clstoken=normed[:, 0], x_storage_tokens=normed[:, 1:n_prefix],
                    x_norm_patchtokens=normed[:, n_prefix:], x_prenorm=prenorm)


class _TimmConvNeXt:
    @staticmethod
    def layers(b: DinoBackbone, x: torch.Tensor, idx: list[int], reshape: bool, norm: bool, cls: bool,
               extra: bool) -> tuple:
        feats = b.model.forward_intermediates(x, indices=idx, norm=False, stop_early=True, intermediates_only=True)
        final_norm = b.model.head.norm  # official `norm`: LayerNorm over channels, applied to the last stage only
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

    @staticmethod
    def features(b: DinoBackbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with b._grad_context():
            raw = b.model.forward_intermediates(x, indices=[3], norm=False, intermediates_only=True)[0]
            tokens = raw.flatten(2).transpose(1, 2)
            final_norm = b.model.head.norm
            norm_tokens = F.layer_norm(tokens, tokens.shape[-1:], final_norm.weight, final_norm.bias, final_norm.eps)
            cls = F.layer_norm(tokens.mean(dim=1), tokens.shape[-1:], final_norm.weight, final_norm.bias,
                               final_norm.eps)
        return dict(x_norm_clstoken=cls, x_storage_tokens=tokens[:, :0], x_norm_patchtokens=norm_tokens,
                    x_prenorm=tokens)


_TIMM_FORWARD = {"vit": _TimmViT, "convnext": _TimmConvNeXt}
