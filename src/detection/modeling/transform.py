"""The detector's input transform (normalize and pad, never resize) and anchor generators that stay float32.

The images reach the model already resized by ``InputSpec.preprocess`` (the validation loader's resize op), so the
transform only turns uint8 into float, normalizes with the spec's mean/std (the one place that happens) and pads to
the spec's size multiple. Detections come back in input coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform


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

