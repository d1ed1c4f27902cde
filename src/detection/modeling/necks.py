"""Necks: what turns the backbone's maps into the levels a head runs on.

``build_neck`` reads the backbone's declared ``output_shape()``: ``last`` passes the single last map through; ``multi``
builds a 5-level pyramid P3..P7 (strides 8..128) - an FPN over a hierarchical backbone's stages (ConvNeXt), or a
ViTDet-style simple feature pyramid over a plain backbone's equal-stride maps (ViT blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation


class SingleLevel(nn.Module):
    """`last` mode: the backbone's last map is the only level (no parameters)."""

    def forward(self, feats: list[Tensor]) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", feats[-1])])


class FPNNeck(nn.Module):
    """torchvision FPN over the ConvNeXt stages (strides 8/16/32) plus P6/P7 from P5 -> strides 8..128."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))

    def forward(self, feats: list[Tensor]) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((f"c{i}", f) for i, f in enumerate(feats)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet-style pyramid from stride-16 ViT maps: strides 8 (deconv), 16, 32 (max-pool), then P6/P7.

    The given block outputs are concatenated on channels (so every level sees all of them); each level then gets a
    1x1 projection (the deconv for stride 8) and a 3x3 conv, both with LayerNorm, as in ViTDet.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        ln = partial(LayerNorm2d, eps=1e-6)
        self.up = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2), ln(out_channels))
        self.proj16 = Conv2dNormActivation(in_channels, out_channels, 1, norm_layer=ln, activation_layer=None)
        self.down = nn.MaxPool2d(2, ceil_mode=True)
        self.proj32 = Conv2dNormActivation(in_channels, out_channels, 1, norm_layer=ln, activation_layer=None)
        self.outs = nn.ModuleList(Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=ln,
                                                       activation_layer=None) for _ in range(3))
        self.p6p7 = LastLevelP6P7(out_channels, out_channels)

    def forward(self, feats: list[Tensor]) -> OrderedDict[str, Tensor]:
        x = torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]
        levels = [self.up(x), self.proj16(x), self.proj32(self.down(x))]
        p = [conv(level) for conv, level in zip(self.outs, levels)]
        p, _ = self.p6p7(p, p, [])
        return OrderedDict(zip(("p3", "p4", "p5", "p6", "p7"), p))


class ExtraLevels(nn.Module):
    """SSD's extra levels after a pyramid: 1x1 reduce + 3x3 stride-2 conv (+ReLU), each halving the grid."""

    def __init__(self, pyramid: nn.Module, channels: int, n_extra: int):
        super().__init__()
        self.pyramid = pyramid
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True))
            for _ in range(n_extra))
        for m in self.extra.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> OrderedDict[str, Tensor]:
        out = self.pyramid(feats)
        x = next(reversed(out.values()))
        for i, block in enumerate(self.extra):
            x = block(x)
            out[f"x{i}"] = x
        return out



class Pyramid(NamedTuple):
    """A built neck and the levels it gives: ``channels`` per level, nominal ``strides``, and the ``size_multiple``
    the input must be padded to so every level covers the image exactly."""

    neck: nn.Module
    channels: int
    strides: list[int]
    size_multiple: int


def build_neck(shapes: Sequence[Any], mode: str, channels: int) -> Pyramid:
    """The neck for backbone maps of ``shapes`` (``DinoBackbone.output_shape()[mode]``: each with ``channels`` and
    ``stride``); ``channels`` is the pyramid width (``multi`` only: ``last`` keeps the backbone's)."""
    if mode == "last":
        last = shapes[-1]
        return Pyramid(SingleLevel(), last.channels, [last.stride], last.stride)
    strides = [s.stride for s in shapes]
    if len(set(strides)) == 1:  # a plain backbone: strides 8/16/32 around its one stride
        neck: nn.Module = SimpleFeaturePyramid(sum(s.channels for s in shapes), channels)
        base = [strides[-1] // 2, strides[-1], strides[-1] * 2]
    else:  # a hierarchical backbone: an FPN over its stages
        neck = FPNNeck([s.channels for s in shapes], channels)
        base = list(strides)
    # P5 = image / base[-1] exactly; P6/P7 round up like torchvision's
    return Pyramid(neck, channels, base + [base[-1] * 2, base[-1] * 4], base[-1])
