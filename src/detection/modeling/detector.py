"""What every detector here shares, whatever its head: ``DinoFeatures`` (DINOv3 backbone -> neck, with the feature
cache's stand-in) and ``DinoDetector``, mixed into each head's torchvision detector class (``heads.py``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import UserError
from .input_spec import InputSpec
from .losses import PaddedTargets
from .transform import DetectionTransform


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
        return [s.channels for s in self.dino.output_shape()[self.mode]]

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


class DinoDetector:
    """What every detector here adds to the torchvision model (mixed in before RetinaNet / SSD / FCOS)."""

    config: Any  # the DetectorConfig it was built from (``builder.build_detector`` sets it)
    head_kind: Any  # the head's registry entry (``heads.HEAD_TYPES``), set on each detector class
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

    def forward(self, images, targets=None):
        """torchvision's forward, except for padded ground truth (``losses.PaddedTargets``: the training losses
        come from ``batched_losses``, so DDP / ``torch.compile`` wrappers still go through ``forward``) and for
        inference on a ``[B, 3, H, W]`` batch (``head_forward`` then ``detect``: the same detections, in two parts
        of which the first has fixed shapes and can be captured in a CUDA graph)."""
        if isinstance(targets, PaddedTargets):
            return self.batched_losses(images, targets)
        if targets is None and not self.training and isinstance(images, Tensor):
            return self.detect(self.head_forward(images), images.shape[-2:])
        return super().forward(images, targets)  # type: ignore[misc]

    def head_forward(self, images: Tensor) -> tuple[dict[str, Tensor], tuple[int, int], tuple[tuple[int, int], ...]]:
        """Normalize + pad, backbone, neck and head for a ``[B, 3, H, W]`` batch of equal-size images (uint8 or
        float): the head's raw outputs ``{name: [B, N, ...]}``, the padded input size and each level's grid.
        Fixed shapes, no host synchronisation."""
        image_list, _ = self.transform(images)
        features = list(self.backbone(image_list.tensors).values())
        outputs = dict(self.head(features))
        return outputs, tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features)

    def detect(self, raw: tuple[dict[str, Tensor], tuple[int, int], tuple[tuple[int, int], ...]],
               image_size: Sequence[int]) -> list[dict[str, Tensor]]:
        """``head_forward``'s output -> detections per image in input coordinates, clipped to ``image_size``
        (h, w), the unpadded size every image of the batch has (torchvision's post-processing for the batch at
        once, ``head_kind.detect``)."""
        outputs, padded_hw, levels = raw
        first = next(iter(outputs.values()))
        anchors = self._anchors_at(padded_hw, levels, first.device)
        sizes = [(int(image_size[0]), int(image_size[1]))] * first.shape[0]
        return self.head_kind.detect(self, outputs, anchors, [h * w for h, w in levels], sizes)

    def batched_losses(self, images: Tensor, targets: PaddedTargets) -> dict[str, Tensor]:
        """The training losses torchvision's forward computes, for a ``[B, 3, H, W]`` batch of equal-size images,
        without its per-image loops: the head's registry entry (``head_kind.loss``, from ``losses.py``) matches and
        scores the whole batch on padded ground truth, with no host synchronisation and the same shapes every
        step. Keys as torchvision's (``classification``, ``bbox_regression``, ``bbox_ctrness``)."""
        image_list, _ = self.transform(images)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self._anchors_at(tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features),
                                   features[0].device)
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        kind = self.head_kind
        return kind.loss(head_outputs, anchors, per_level, targets.boxes, targets.labels, targets.valid,
                         **kind.loss_options(self))

    def _anchors_at(self, padded_hw: tuple[int, int], levels: tuple[tuple[int, int], ...],
                    device: torch.device) -> Tensor:
        """One image's anchors ``[N, 4]`` (the same for every image of an equal-size batch) for an input padded to
        ``padded_hw`` with feature grids ``levels``; they depend only on shapes, so they are computed once per
        input shape (torchvision regenerates them every step)."""
        key = (tuple(padded_hw), tuple(levels), device)
        cache = self.__dict__.setdefault("_anchor_cache", {})
        if key not in cache:
            from torchvision.models.detection.image_list import ImageList

            image = ImageList(torch.zeros(1, 3, *padded_hw, device=device), [tuple(padded_hw)])
            grids = [torch.zeros(1, 1, h, w, device=device) for h, w in levels]
            cache[key] = self.anchor_generator(image, grids)[0].detach()
        return cache[key]

    def postprocess_detections(self, head_outputs, anchors, image_sizes) -> list[dict[str, Tensor]]:
        """torchvision's post-processing for the whole batch at once (``head_kind.postprocess``: one NMS, no
        per-image loops; equal results). Class 0 is ``__background__`` here (the reference's ``num_classes``
        counts it) and never becomes a detection. All images share their anchors (same padded tensor size)."""
        return self.head_kind.postprocess(self, head_outputs, anchors[0], image_sizes)

    def _require_frozen(self) -> None:
        if not getattr(self.dino, "frozen", True):
            raise UserError("--cache-features needs a frozen backbone; drop --fine-tune or the feature cache")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
