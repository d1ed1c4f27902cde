"""Detectors on a frozen DINOv3 backbone: torchvision RetinaNet / SSD / FCOS with a trainable neck.

``build_detector(cfg)`` is the one builder used by training, inference, evaluation and benchmarks.

* ``feature_extractor="last"`` (the reference's): the single last backbone map goes straight to the head. RetinaNet uses
  the reference project's ``AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))`` and a plain
  ``RetinaNetHead`` on the backbone channels, so ``dinov3_convnext_tiny`` with 21 classes has exactly
  72,885,975 / 45,065,847 (total / trainable) parameters. SSD is a real single-level SSD.
* ``feature_extractor="multi"``: a 5-level pyramid P3..P7 (strides 8..128) - an FPN over the ConvNeXt stages, or a
  ViTDet-style simple feature pyramid over the ViT blocks - with RetinaNet (torchvision's v2 recipe: GroupNorm
  head, GIoU loss), SSD (plus extra levels down to a 1x1 grid) or FCOS on top.

The images reach the model already resized by ``InputSpec.preprocess`` (the validation loader's resize op), so
the transform never resizes: it only turns uint8 into float, normalizes with the spec's mean/std (the one place
that happens) and pads to the spec's size multiple. Detections come back in input coordinates;
``model.input_spec.boxes_to_original`` maps them to the original image.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from ..core.cli import parse_imgsz
from ..core.errors import UserError
from ..data.transforms import boxes_to_original as _boxes_to_original
from ..data.transforms import letterbox_size, resize_image

HEADS = ("retinanet", "ssd", "fcos")
FEATURE_EXTRACTORS = ("multi", "last")
BACKBONE_IMPLS = ("timm", "hub")

# The reference project's single-level RetinaNet anchors (15 per location) - kept exactly for `last`.
REFERENCE_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
REFERENCE_ASPECT_RATIOS = ((0.5, 1.0, 2.0),)
# Anchor / default-box base size = ANCHOR_STRIDE_FACTOR x stride (RetinaNet: 32 px at stride 8 ... 512 at 128).
ANCHOR_STRIDE_FACTOR = 4
# Conv layers per RetinaNet / FCOS head branch (classification and box regression each); `head_convs` overrides.
# torchvision's 4 everywhere: `last` is the reference's head parameter for parameter, and for `multi` shorter towers
# cut a cached step's cost (benchmarks/bench_head.py) but learned far slower in docs/DEMO.md's measurements.
HEAD_CONVS = {"last": 4, "multi": 4}
LEGACY_HEAD_CONVS = 4  # torchvision's, and what checkpoints without a recorded head_convs were built with
MAX_HEAD_CONVS = 4  # torchvision's RetinaNet head builds exactly 4; fewer are taken from its tower
# Depthwise-separable head convs (EfficientDet's head): a 3x3 depthwise + 1x1 pointwise conv per layer. At 640 px
# the neck + head forward drops from 27.6 to 6.0 GFLOP per image and a cached training step runs ~2.3x faster, and
# on the demo it learned faster than the dense head (docs/DEMO.md). `last` keeps the reference's dense head.
HEAD_SEPARABLE = {"last": False, "multi": True}
SSD_ASPECT_RATIOS = [2, 3]  # per level: 2 square boxes + 2 per ratio = 6 default boxes per location


# ----------------------------------------------------------------------------------------------- input spec
# The LVD-1689M (ImageNet) statistics: what a config that names no weights family normalizes with.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes model input and how boxes come back: the one description shared by training-time
    evaluation, ``evaluate``, both inference commands and checkpoints (``meta["input"]``).

    * ``imgsz`` (W, H): every image is resized to it, stretched or (``letterbox``) aspect-preserving with grey
      padding at the bottom/right (``transforms.ResizeTo``, the same op the validation loader uses);
    * ``size_multiple``: the model zero-pads its input to a multiple of this (16 for ViT ``last``, 32 for ConvNeXt
      and for the pyramids) - read from the built backbone, never assumed;
    * ``mean``/``std``: the normalization the model applies (per backbone weight family: LVD-1689M or SAT-493M);
    * ``fixed_aspect``: SSD default boxes are fractions of the input tensor, so such a model must always see
      inputs of the training aspect ratio (no ``keep_aspect``, no ``--imgsz`` of another shape).
    """

    imgsz: tuple[int, int]
    letterbox: bool = False
    size_multiple: int = 32
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    fixed_aspect: bool = False

    def __post_init__(self) -> None:
        set_ = partial(object.__setattr__, self)  # frozen: normalise the types once, here
        set_("imgsz", parse_imgsz(self.imgsz))
        set_("letterbox", bool(self.letterbox))
        set_("size_multiple", int(self.size_multiple))
        set_("mean", tuple(float(v) for v in self.mean))
        set_("std", tuple(float(v) for v in self.std))
        set_("fixed_aspect", bool(self.fixed_aspect))
        if self.size_multiple < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"invalid input spec {self}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain lists / numbers (``weights_only``- and YAML-safe)."""
        return {"imgsz": list(self.imgsz), "letterbox": self.letterbox, "size_multiple": self.size_multiple,
                "mean": list(self.mean), "std": list(self.std), "fixed_aspect": self.fixed_aspect}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> InputSpec:
        """A copy with ``changes`` (None values ignored, so optional CLI overrides pass straight through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_imgsz(self, imgsz: Sequence[int] | int | None, flag: str = "--imgsz") -> InputSpec:
        """The spec at another input size; a fixed-aspect (SSD) model only accepts the training aspect ratio."""
        if imgsz is None:
            return self
        w, h = parse_imgsz(imgsz)
        W, H = self.imgsz
        if self.fixed_aspect and abs(w * H - h * W) > 0.01 * W * H:
            raise UserError(f"{flag} {w} {h}: this SSD model was trained at {W}x{H} and its default boxes are "
                            f"fractions of the input, so the input must keep the aspect ratio {W}:{H} "
                            f"(e.g. {flag} {2 * W} {2 * H}); or drop {flag}")
        return self.replace(imgsz=(w, h))

    # ------------------------------------------------------------------ geometry
    def input_size(self, orig_hw: Sequence[int], keep_aspect: bool = False) -> tuple[int, int]:
        """(W, H) of the model input for an image of original size (H, W).

        ``keep_aspect`` (inference speed option): the letterbox content at the letterbox scale
        ``min(W / w0, H / h0)``, with the padding cut down to the next multiple of ``size_multiple`` instead of
        ``imgsz`` - same scale as a letterbox-trained model saw, less padding to compute.
        """
        if not keep_aspect:
            return self.imgsz
        self.check_keep_aspect()
        h, w = letterbox_size(orig_hw, self.imgsz)
        m = self.size_multiple
        W, H = self.imgsz
        return min(math.ceil(w / m) * m, math.ceil(W / m) * m), min(math.ceil(h / m) * m, math.ceil(H / m) * m)

    def preprocess(self, image: Tensor, keep_aspect: bool = False) -> Tensor:
        """Original uint8 [3,H,W] (or a batch of equal sizes) -> uint8 model input (normalization is the model's)."""
        if not keep_aspect:
            return resize_image(image, self.imgsz, self.letterbox)
        return resize_image(image, self.imgsz, letterbox=True, canvas=self.input_size(image.shape[-2:], True))

    def boxes_to_original(self, boxes: Tensor, orig_hw: Sequence[int], keep_aspect: bool = False) -> Tensor:
        """xyxy boxes in model-input coordinates -> the original (H, W) image's, clamped (inverse of preprocess)."""
        return _boxes_to_original(boxes, orig_hw, self.imgsz, self.letterbox or keep_aspect)

    def check_keep_aspect(self) -> None:
        """UserError when ``keep_aspect`` cannot be used (fixed-aspect SSD models)."""
        if self.fixed_aspect:
            raise UserError("--keep-aspect: this SSD model's default boxes are fractions of the input, so it must "
                            f"see the training aspect ratio {self.imgsz[0]}:{self.imgsz[1]}; drop --keep-aspect")

    def describe(self) -> str:
        mode = "letterbox" if self.letterbox else "stretch"
        return f"{self.imgsz[0]}x{self.imgsz[1]} {mode}, pad /{self.size_multiple}"


# --------------------------------------------------------------------------------------------------- config
@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector; ``to_dict()`` goes into checkpoint metadata.

    The input fields (``imgsz``, ``letterbox``, ``mean``, ``std``, ``size_multiple``) form ``input_spec``; ``mean``/
    ``std``/``size_multiple`` left at None are filled in by ``build_detector`` from the backbone (its weight family
    and strides), so ``model.config`` is always complete. ``to_dict`` writes them as one ``input`` dict.
    """

    model_name: str
    num_classes: int  # including __background__ (index 0), as torchvision and the reference count it
    head: str = "retinanet"
    feature_extractor: str = "multi"
    imgsz: tuple[int, int] = (640, 640)  # (width, height) the data pipeline resizes to
    backbone_impl: str = "timm"
    fine_tune: bool = False
    nms: float = 0.45
    score_thresh: float = 0.05
    max_det: int = 100
    arch_overrides: dict[str, Any] | None = None
    fpn_channels: int = 128
    letterbox: bool = False
    mean: tuple[float, float, float] | None = None  # None: the backbone weight family's statistics
    std: tuple[float, float, float] | None = None
    size_multiple: int | None = None  # None: what the built model pads to
    # conv layers per head branch (RetinaNet / FCOS); None: HEAD_CONVS[feature_extractor] (SSD has none)
    head_convs: int | None = None
    # depthwise-separable head convs (RetinaNet / FCOS); None: HEAD_SEPARABLE[feature_extractor]
    head_separable: bool | None = None

    def __post_init__(self) -> None:
        self.imgsz = parse_imgsz(self.imgsz)
        self.num_classes = int(self.num_classes)
        self.letterbox = bool(self.letterbox)
        self.mean = None if self.mean is None else tuple(float(v) for v in self.mean)
        self.std = None if self.std is None else tuple(float(v) for v in self.std)
        self.size_multiple = None if self.size_multiple is None else int(self.size_multiple)
        if self.head not in HEADS:
            raise UserError(f"--head {self.head!r} is not valid; choose one of {', '.join(HEADS)}")
        if self.feature_extractor not in FEATURE_EXTRACTORS:
            raise UserError(f"--feature-extractor {self.feature_extractor!r} is not valid; "
                            f"choose one of {', '.join(FEATURE_EXTRACTORS)}")
        if self.backbone_impl not in BACKBONE_IMPLS:
            raise UserError(f"--backbone-impl {self.backbone_impl!r} is not valid; "
                            f"choose one of {', '.join(BACKBONE_IMPLS)}")
        if self.num_classes < 2:
            raise UserError(f"num_classes={self.num_classes}: CLASSES needs '__background__' plus at least one class")
        if not 0.0 < self.nms <= 1.0:
            raise UserError(f"--nms {self.nms}: the NMS IoU threshold must be in (0, 1]")
        if not 0.0 <= self.score_thresh < 1.0:
            raise UserError(f"--score-thresh {self.score_thresh}: must be in [0, 1)")
        if int(self.max_det) < 1:
            raise UserError(f"--max-det {self.max_det}: keep at least 1 detection per image")
        self.max_det = int(self.max_det)
        if int(self.fpn_channels) < 64 or int(self.fpn_channels) % 32:
            # the heads use GroupNorm(32): a 1-channel group cannot be normalized on a 1x1 level
            raise UserError(f"--fpn-channels {self.fpn_channels}: use a multiple of 32, at least 64 (e.g. 256)")
        self.fpn_channels = int(self.fpn_channels)
        self.head_convs = _check_head_convs(self.head_convs, self.head)
        if self.head_separable is not None:
            self.head_separable = bool(self.head_separable)
            if self.head_separable and self.head == "ssd":
                raise UserError("--head-separable: the SSD head has no conv tower (one conv per level); drop it")

    @property
    def input_spec(self) -> InputSpec:
        """The input specification (complete on ``model.config``; a fresh config needs ``build_detector`` first,
        since the size multiple and the default mean/std come from the backbone)."""
        if self.size_multiple is None or self.mean is None or self.std is None:
            raise ValueError("this DetectorConfig is not resolved yet: use build_detector(cfg).input_spec "
                             "(or model.config.input_spec)")
        return InputSpec(self.imgsz, self.letterbox, self.size_multiple, self.mean, self.std,
                         fixed_aspect=self.head == "ssd")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples) so it survives ``torch.load(weights_only=True)`` and YAML.

        The input fields go into one ``input`` dict (``InputSpec.to_dict``); ``imgsz`` also stays at the top level
        for readers of older metadata."""
        d = asdict(self)
        for k in _INPUT_FIELDS:
            d.pop(k)
        d["imgsz"] = [int(v) for v in self.imgsz]
        d["arch_overrides"] = _plain(self.arch_overrides)
        d["input"] = {"imgsz": list(d["imgsz"]), "letterbox": self.letterbox, "size_multiple": self.size_multiple,
                      "mean": None if self.mean is None else list(self.mean),
                      "std": None if self.std is None else list(self.std), "fixed_aspect": self.head == "ssd"}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        """Inverse of ``to_dict``; keys that are not config fields (e.g. the rest of checkpoint meta) are ignored.

        Metadata written before the ``input`` dict existed keeps ``imgsz``/``letterbox``/``mean``/``std`` at the
        top level; both forms are read."""
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("model_name", "num_classes") if k not in d]
        if missing:
            raise UserError(f"detector config is missing {', '.join(missing)}; the checkpoint metadata is incomplete")
        kwargs = {k: v for k, v in d.items() if k in names}
        if "head_convs" not in d and d.get("head", "retinanet") != "ssd":
            kwargs["head_convs"] = LEGACY_HEAD_CONVS  # metadata from before the field: torchvision's 4 convs
        if "head_separable" not in d and d.get("head", "retinanet") != "ssd":
            kwargs["head_separable"] = False  # metadata from before the field: dense convs
        if isinstance(d.get("input"), dict):
            kwargs.update({k: v for k, v in d["input"].items() if k in _INPUT_FIELDS or k == "imgsz"})
        return cls(**kwargs)


_INPUT_FIELDS = ("letterbox", "mean", "std", "size_multiple")


def _check_head_convs(value: Any, head: str) -> int | None:
    if value is None:
        return None
    if head == "ssd":
        raise UserError(f"--head-convs {value}: the SSD head has no conv tower (one conv per level); drop --head-convs")
    if not 0 <= int(value) <= MAX_HEAD_CONVS:
        raise UserError(f"--head-convs {value}: use 0..{MAX_HEAD_CONVS} conv layers per head branch "
                        f"(torchvision's RetinaNet/FCOS use {LEGACY_HEAD_CONVS})")
    return int(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ transform
class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform minus the resize.

    Accepts a ``[B,3,H,W]`` batch or a list of ``[3,H,W]`` tensors, uint8 (0..255) or float (0..1); converts to the
    model's float dtype, normalizes with the backbone's mean/std and zero-pads (after normalization, as torchvision
    does) bottom/right to ``size_divisible`` so every feature map covers the image exactly. ``image_sizes`` are the
    unpadded sizes, so predictions are clipped to the real image and never rescaled.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size_divisible: int, imgsz: tuple[int, int]):
        w, h = imgsz
        super().__init__(min(w, h), max(w, h), list(mean), list(std), size_divisible=size_divisible)
        # Buffers (not saved) so .to(device/dtype) carries them: the input dtype follows the model's.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor | Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images as a [B,3,H,W] tensor or a list of [3,H,W], got {tuple(images.shape)}")
            batch, sizes = self._normalize(images), [tuple(images.shape[-2:])] * images.shape[0]
        else:
            images = list(images)
            sizes = [tuple(im.shape[-2:]) for im in images]
            if len(set(sizes)) == 1:
                batch = self._normalize(torch.stack(images))
            else:  # mixed sizes: torchvision pads each to the largest
                batch = self.batch_images([self._normalize(im[None])[0] for im in images], self.size_divisible)
        d = self.size_divisible
        pad_h, pad_w = -batch.shape[-2] % d, -batch.shape[-1] % d
        if pad_h or pad_w:
            batch = F.pad(batch, (0, pad_w, 0, pad_h))
        if targets is not None:
            targets = [self._target(t, batch.device) for t in targets]
        return ImageList(batch, [(int(h), int(w)) for h, w in sizes]), targets

    def _normalize(self, x: Tensor) -> Tensor:
        x = x.to(self.mean.device, non_blocking=True)
        dtype = self.mean.dtype
        x = x.to(dtype).div_(255) if not x.is_floating_point() else x.to(dtype)
        return (x - self.mean) / self.std

    @staticmethod
    def _target(t: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        t = dict(t)  # never modify the caller's dict
        t["boxes"] = torch.as_tensor(t["boxes"]).as_subclass(Tensor).to(device, torch.float32).reshape(-1, 4)
        t["labels"] = torch.as_tensor(t["labels"]).as_subclass(Tensor).to(device, torch.int64)
        return t

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result  # input size == original size here: nothing to rescale

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(Normalize(mean={self.image_mean}, std={self.image_std}), "
                f"no resize, pad to /{self.size_divisible})")


# ------------------------------------------------------------------------- float32 detection arithmetic
class _Float32Anchors:
    """Anchors in float32 even under autocast: bf16 cannot hold pixel coordinates (spacing 4 px near 640).

    The generators only read shape/dtype/device from the feature maps, so empty stand-ins are enough.
    """

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        stand_ins = [torch.empty((0, 0, *f.shape[-2:]), device=f.device) for f in feature_maps]
        return super().forward(image_list, stand_ins)


class Float32AnchorGenerator(_Float32Anchors, AnchorGenerator):
    pass


class Float32DefaultBoxGenerator(_Float32Anchors, DefaultBoxGenerator):
    pass


class _Float32Outputs:
    """Head outputs in float32 so losses, box decoding and NMS stay exact under autocast / half models."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {k: v.float() for k, v in super().forward(x).items()}


class DetRetinaNetHead(_Float32Outputs, RetinaNetHead):
    pass


class DetSSDHead(_Float32Outputs, SSDHead):
    pass


class DetFCOSHead(_Float32Outputs, FCOSHead):
    pass


# ---------------------------------------------------------------------------------------------- necks
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


class DinoFeatures(nn.Module):
    """The detector's ``backbone``: frozen DINOv3 (``dino``) -> trainable ``neck`` -> OrderedDict of maps.

    A feature cache can stand in for the DINOv3 forward (see ``Detector.cached_features``).
    """

    def __init__(self, dino: nn.Module, mode: str, neck: nn.Module, out_channels: int, strides: list[int]):
        super().__init__()
        self.dino = dino
        self.mode = mode
        self.neck = neck
        self.out_channels = out_channels  # RetinaNet / FCOS require this attribute
        self.strides = strides  # nominal stride of each output level
        self._cached: list[Tensor] | None = None

    @property
    def feature_channels(self) -> list[int]:
        return [self.dino.last_channels] if self.mode == "last" else list(self.dino.multi_channels)

    def dino_features(self, x: Tensor) -> list[Tensor]:
        """The frozen part: DINOv3 maps for a normalized, padded batch."""
        if self.mode == "last":
            return [self.dino.forward_last(x)]
        return list(self.dino.forward_multi(x))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self._take_cache(x) if self._cached is not None else self.dino_features(x)
        return self.neck(feats)

    def _take_cache(self, x: Tensor) -> list[Tensor]:
        feats = self._cached
        channels = self.feature_channels
        if len(feats) != len(channels) or any(f.dim() != 4 or f.shape[0] != x.shape[0] or f.shape[1] != c
                                              for f, c in zip(feats, channels)):
            got = [tuple(f.shape) for f in feats]
            raise ValueError(f"cached features {got} do not fit a batch of {x.shape[0]} for this {self.mode} "
                             f"model (expected {len(channels)} maps with channels {channels})")
        out = []
        for f in feats:
            f = f.to(device=x.device, dtype=x.dtype, non_blocking=True)
            out.append(f.clone() if f.is_inference() else f)  # inference-mode tensors cannot enter autograd
        return out


class _DinoDetector:
    """What every detector here adds to the torchvision model (mixed in before RetinaNet / SSD / FCOS)."""

    config: DetectorConfig
    backbone: DinoFeatures
    transform: DetectionTransform

    @property
    def dino(self) -> nn.Module:
        """The DINOv3 backbone (``DinoBackbone``)."""
        return self.backbone.dino

    @property
    def input_spec(self) -> InputSpec:
        """How images must be prepared for this model and how its boxes map back (see ``InputSpec``)."""
        return self.config.input_spec

    def backbone_features(self, images: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """The frozen backbone's maps for ``images`` (after normalization/padding): what the feature cache stores."""
        self._require_frozen()
        image_list, _ = self.transform(images)
        with torch.no_grad():
            return self.backbone.dino_features(image_list.tensors)

    @contextmanager
    def cached_features(self, feats: Sequence[Tensor]) -> Iterator[None]:
        """Inside this block the model uses ``feats`` (from ``backbone_features``) instead of running DINOv3.

        Images still go through the transform (their shape sets anchors and clipping), so a zero tensor of the
        right shape is enough; the neck and head run (and train) as usual.
        """
        self._require_frozen()
        previous = self.backbone._cached
        self.backbone._cached = list(feats)
        try:
            yield
        finally:
            self.backbone._cached = previous

    def postprocess_detections(self, head_outputs, *args, **kwargs) -> list[dict[str, Tensor]]:
        # RetinaNet/FCOS score every class index including 0 (the reference's num_classes counts __background__).
        # A background "detection" is meaningless and would take a max_det slot, so class 0 gets score 0 before
        # thresholding/top-k (SSD's softmax postprocess already skips it).
        logits = head_outputs.get("cls_logits")
        if isinstance(logits, list):
            masked = []
            for level in logits:
                level = level.clone()
                level[..., 0] = float("-inf")
                masked.append(level)
            head_outputs = {**head_outputs, "cls_logits": masked}
        return super().postprocess_detections(head_outputs, *args, **kwargs)  # type: ignore[misc]

    def _require_frozen(self) -> None:
        if not getattr(self.dino, "frozen", True):
            raise UserError("--cache-features needs a frozen backbone; drop --fine-tune or the feature cache")


class DinoRetinaNet(_DinoDetector, RetinaNet):
    pass


class DinoSSD(_DinoDetector, SSD):
    pass


class DinoFCOS(_DinoDetector, FCOS):
    pass


Detector = DinoRetinaNet | DinoSSD | DinoFCOS


# -------------------------------------------------------------------------------------------- builders
def retinanet_anchor_sizes(strides: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """torchvision's RetinaNet anchors (3 octave scales of 4 x stride per level) for any list of strides."""
    return tuple(tuple(int(ANCHOR_STRIDE_FACTOR * s * 2 ** (i / 3)) for i in range(3)) for s in strides)


def ssd_scales(strides: Sequence[int], shorter_side: int) -> list[float]:
    """SSD default-box scales (fraction of the image side): 4 x stride / shorter side, capped at 1.

    One more entry than levels: DefaultBoxGenerator uses sqrt(s_k * s_k+1) for each level's second square box.
    """
    strides = list(strides) + [strides[-1] * 2]
    return [min(1.0, ANCHOR_STRIDE_FACTOR * s / shorter_side) for s in strides]


def num_extra_levels(grid: tuple[int, int]) -> int:
    """How many stride-2 (k3, p1) convs take a ``(h, w)`` grid down to 1x1."""
    h, w, n = grid[0], grid[1], 0
    while max(h, w) > 1:
        h, w, n = math.ceil(h / 2), math.ceil(w / 2), n + 1
    return n


def _padded(imgsz: tuple[int, int], divisible: int) -> tuple[int, int]:
    w, h = imgsz
    return math.ceil(w / divisible) * divisible, math.ceil(h / divisible) * divisible


def _shorten_towers(head: RetinaNetHead, n_convs: int) -> None:
    """Keep the first ``n_convs`` of the 4 conv layers torchvision's RetinaNet head builds per branch (it has no
    depth argument; FCOSHead has ``num_convs``). Module names stay torchvision's (``conv.0`` ...)."""
    for branch in (head.classification_head, head.regression_head):
        branch.conv = nn.Sequential(*list(branch.conv)[:n_convs])


class SeparableConv2d(nn.Sequential):
    """A 3x3 depthwise conv followed by a 1x1 pointwise conv that takes the dense conv's place (and its bias)."""

    def __init__(self, conv: nn.Conv2d):
        depthwise = nn.Conv2d(conv.in_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                              groups=conv.in_channels, bias=False)
        pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
        # unit-gain depthwise filters, so the pointwise conv's torchvision N(0, 0.01) init sets the output scale as in
        # the dense head; the dense conv's bias carries over (the classification prior: initial scores stay ~0.01)
        nn.init.kaiming_normal_(depthwise.weight, nonlinearity="linear")
        nn.init.normal_(pointwise.weight, std=0.01)
        if conv.bias is not None:
            with torch.no_grad():
                pointwise.bias.copy_(conv.bias)
        super().__init__(OrderedDict(depthwise=depthwise, pointwise=pointwise))


def _make_separable(head: nn.Module) -> None:
    """Swap every dense 3x3 conv of a RetinaNet / FCOS head (towers and predictors) for a ``SeparableConv2d``."""
    for parent in list(head.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.groups == 1:
                setattr(parent, name, SeparableConv2d(child))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_detector(cfg: DetectorConfig, weights: str | None = None, verbose: bool = True) -> Detector:
    """Build the detector ``cfg`` describes on a DINOv3 backbone (``weights``: see ``backbones.resolve_weights``).

    Prints the reference's two lines (total / trainable parameters) unless ``verbose=False``.
    """
    from .backbones import build_backbone  # local: keeps `import model` cheap for config-only users

    dino = build_backbone(cfg.model_name, weights=weights, impl=cfg.backbone_impl, fine_tune=cfg.fine_tune,
                          arch_overrides=cfg.arch_overrides)
    family = dino.family
    if cfg.feature_extractor == "last":
        neck, channels, strides = SingleLevel(), dino.last_channels, [dino.last_stride]
        divisible = dino.last_stride
    else:
        channels = cfg.fpn_channels
        if family == "convnext":
            neck = FPNNeck(list(dino.multi_channels), channels)
            base = list(dino.multi_strides)
        elif family == "vit":
            neck = SimpleFeaturePyramid(sum(dino.multi_channels), channels)
            s = dino.multi_strides[-1]
            base = [s // 2, s, s * 2]
        else:  # pragma: no cover - backbones.py only has these two families
            raise ValueError(f"unknown backbone family {family!r}")
        strides = base + [base[-1] * 2, base[-1] * 4]
        divisible = base[-1]  # P5 = image / 32 exactly; P6/P7 round up like torchvision's

    num_classes = cfg.num_classes
    n_convs = HEAD_CONVS[cfg.feature_extractor] if cfg.head_convs is None else cfg.head_convs
    separable = HEAD_SEPARABLE[cfg.feature_extractor] if cfg.head_separable is None else cfg.head_separable
    common = dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms, detections_per_img=cfg.max_det)
    if cfg.head == "retinanet":
        if cfg.feature_extractor == "last":  # the reference project's model, parameter for parameter
            anchors = Float32AnchorGenerator(REFERENCE_ANCHOR_SIZES, REFERENCE_ASPECT_RATIOS)
            head = DetRetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes)
            _shorten_towers(head, n_convs)
        else:  # torchvision's RetinaNet v2 recipe: GroupNorm in the head, GIoU box loss
            anchors = Float32AnchorGenerator(retinanet_anchor_sizes(strides), ((0.5, 1.0, 2.0),) * len(strides))
            head = DetRetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes,
                                    norm_layer=partial(nn.GroupNorm, 32))
            head.regression_head._loss_type = "giou"
            _shorten_towers(head, n_convs)
        model: Detector = DinoRetinaNet(DinoFeatures(dino, cfg.feature_extractor, neck, channels, strides),
                                        num_classes, anchor_generator=anchors, head=head, **common)
    elif cfg.head == "ssd":
        w, h = _padded(cfg.imgsz, divisible)
        if cfg.feature_extractor == "multi":
            n_extra = num_extra_levels((math.ceil(h / strides[-1]), math.ceil(w / strides[-1])))
            neck = ExtraLevels(neck, channels, n_extra)
            strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(n_extra)]
        boxes = Float32DefaultBoxGenerator([SSD_ASPECT_RATIOS] * len(strides), scales=ssd_scales(strides, min(w, h)))
        head = DetSSDHead([channels] * len(strides), boxes.num_anchors_per_location(), num_classes)
        model = DinoSSD(DinoFeatures(dino, cfg.feature_extractor, neck, channels, strides), boxes,
                        (cfg.imgsz[1], cfg.imgsz[0]), num_classes, head=head, **common)
    else:  # fcos: one anchor per location whose size is the level's stride (FCOS assigns objects by it)
        if channels % 32 or channels < 64:
            raise UserError(f"--head fcos: {cfg.model_name} gives {channels}-channel features, but FCOS's GroupNorm(32) "
                            f"needs a multiple of 32 (at least 64); use --feature-extractor multi")
        anchors = Float32AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        head = DetFCOSHead(channels, 1, num_classes, num_convs=n_convs)
        model = DinoFCOS(DinoFeatures(dino, cfg.feature_extractor, neck, channels, strides), num_classes,
                         anchor_generator=anchors, head=head, **common)
    if separable and cfg.head != "ssd":
        _make_separable(model.head)

    if cfg.size_multiple is not None and cfg.size_multiple != divisible:
        raise UserError(f"the configuration expects inputs padded to /{cfg.size_multiple}, but {cfg.model_name} "
                        f"({cfg.feature_extractor}) pads to /{divisible}; was the checkpoint written by another version?")
    # mean/std: the configuration's (a checkpoint's record) or the statistics of the backbone's weight family
    model.config = dataclasses.replace(cfg, mean=cfg.mean or tuple(dino.mean), std=cfg.std or tuple(dino.std),
                                       size_multiple=divisible, head_convs=None if cfg.head == "ssd" else n_convs,
                                       head_separable=None if cfg.head == "ssd" else separable)
    spec = model.config.input_spec
    model.transform = DetectionTransform(spec.mean, spec.std, spec.size_multiple, spec.imgsz)
    if verbose:
        total, trainable = count_parameters(model)
        print(f"{total:,} total parameters.")
        print(f"{trainable:,} training parameters.")
    return model
