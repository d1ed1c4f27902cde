"""The detector configuration: everything needed to rebuild a detector, and the one check of its choices.

``head``, ``feature_extractor`` and ``backbone_impl`` are validated here only (``check_choices``, which
``DetectorConfig`` and ``build_backbone`` call; the training config builds a ``DetectorConfig`` to check its fields).
The heads are those of the registry (``heads.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ..core.choices import BACKBONE_IMPLS, FEATURE_EXTRACTORS, HEADS
from ..core.cli import check_choice, parse_imgsz
from ..core.errors import UserError

if TYPE_CHECKING:
    from .input_spec import InputSpec

# The head registry (heads.py) and the input spec import torch: they are imported where a config needs them, so
# the training parser, which builds a default config, stays light.
CHOICES = {"head": HEADS, "feature_extractor": FEATURE_EXTRACTORS, "backbone_impl": BACKBONE_IMPLS}


def check_choices(**values: str) -> None:
    """UserError naming the flag for a ``head`` / ``feature_extractor`` / ``backbone_impl`` value (the keyword) that
    is not one of its ``CHOICES``."""
    for name, value in values.items():
        check_choice(f"--{name.replace('_', '-')}", value, CHOICES[name])


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
    # RetinaNet anchors. Sizes: with the pyramid, one base size per level (each level gets torchvision's 3 octave
    # scales of it); with the single ``last`` map, that level's sizes. None: 4 x stride per level / the reference's
    # 32-512. Ratios: height / width (torchvision's convention); None: 0.5, 1, 2.
    anchor_sizes: tuple[int, ...] | None = None
    anchor_ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.imgsz = parse_imgsz(self.imgsz)
        self.num_classes = int(self.num_classes)
        self.letterbox = bool(self.letterbox)
        self.mean = None if self.mean is None else tuple(float(v) for v in self.mean)
        self.std = None if self.std is None else tuple(float(v) for v in self.std)
        self.size_multiple = None if self.size_multiple is None else int(self.size_multiple)
        check_choices(head=self.head, feature_extractor=self.feature_extractor, backbone_impl=self.backbone_impl)
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
            if self.head_separable and not _head(self.head).has_tower:
                raise UserError(f"--head-separable: the {_head(self.head).title} head has no conv tower "
                                f"(one conv per level); drop it")
        self.anchor_sizes = _positive("--anchor-sizes", self.anchor_sizes, int, self.head)
        self.anchor_ratios = _positive("--anchor-ratios", self.anchor_ratios, float, self.head)

    @property
    def input_spec(self) -> InputSpec:
        """The input specification (complete on ``model.config``; a fresh config needs ``build_detector`` first,
        since the size multiple and the default mean/std come from the backbone)."""
        if self.size_multiple is None or self.mean is None or self.std is None:
            raise ValueError("this DetectorConfig is not resolved yet: use build_detector(cfg).input_spec "
                             "(or model.config.input_spec)")
        from .input_spec import InputSpec

        return InputSpec(self.imgsz, self.letterbox, self.size_multiple, self.mean, self.std,
                         fixed_aspect=_head(self.head).fixed_aspect)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples) so it survives ``torch.load(weights_only=True)`` and YAML.

        The input fields go into one ``input`` dict (``InputSpec.to_dict``); ``imgsz`` also stays at the top level
        for readers of older metadata."""
        d = asdict(self)
        for k in _INPUT_FIELDS:
            d.pop(k)
        d["imgsz"] = [int(v) for v in self.imgsz]
        d["arch_overrides"] = _plain(self.arch_overrides)
        for k in ("anchor_sizes", "anchor_ratios"):
            d[k] = _plain(d[k])
        d["input"] = {"imgsz": list(d["imgsz"]), "letterbox": self.letterbox, "size_multiple": self.size_multiple,
                      "mean": None if self.mean is None else list(self.mean),
                      "std": None if self.std is None else list(self.std),
                      "fixed_aspect": _head(self.head).fixed_aspect}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        """Inverse of ``to_dict``; keys that are not config fields (e.g. the rest of checkpoint meta) are ignored.
        Older stored forms are upgraded before they get here (``checkpoint.load_card``)."""
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("model_name", "num_classes") if k not in d]
        if missing:
            raise UserError(f"detector config is missing {', '.join(missing)}; the checkpoint metadata is incomplete")
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(d.get("input"), dict):
            kwargs.update({k: v for k, v in d["input"].items() if k in _INPUT_FIELDS or k == "imgsz"})
        return cls(**kwargs)


_INPUT_FIELDS = ("letterbox", "mean", "std", "size_multiple")


def _head(name: str) -> Any:
    from .heads import HEAD_TYPES

    return HEAD_TYPES[name]


def _check_head_convs(value: Any, head: str) -> int | None:
    if value is None:
        return None
    from .heads import LEGACY_HEAD_CONVS, MAX_HEAD_CONVS

    if not _head(head).has_tower:
        raise UserError(f"--head-convs {value}: the {_head(head).title} head has no conv tower (one conv per "
                        f"level); drop --head-convs")
    if not 0 <= int(value) <= MAX_HEAD_CONVS:
        raise UserError(f"--head-convs {value}: use 0..{MAX_HEAD_CONVS} conv layers per head branch "
                        f"(torchvision's RetinaNet/FCOS use {LEGACY_HEAD_CONVS})")
    return int(value)


def _positive(flag: str, values: Any, kind: type, head: str) -> tuple | None:
    """``values`` as a tuple of positive ``kind`` numbers (None stays None); only RetinaNet has settable anchors."""
    if values is None:
        return None
    if head != "retinanet":
        why = "'s default boxes follow its strides and --imgsz" if head == "ssd" else " matches objects by location"
        raise UserError(f"{flag}: only RetinaNet has anchors to set (the {_head(head).title} head{why}); drop it")
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise UserError(f"{flag} {' '.join(map(str, values))}: give one or more positive numbers")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
