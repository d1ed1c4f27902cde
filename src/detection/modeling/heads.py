"""Detection heads: one registry entry per head (``HEAD_TYPES``) owns everything that differs between heads.

A ``HeadType``

* builds the detector on a neck's levels (``build``): anchors or default boxes, the torchvision head (float32
  outputs), the head's detector class (torchvision's RetinaNet / SSD / FCOS with ``DinoDetector`` mixed in);
* owns its batched training loss from ``losses.py`` (``loss_fn``; ``loss`` calls it on the head's outputs with the
  settings of a built model, ``loss_options``): what ``DinoDetector.forward`` computes for padded ground truth, equal
  to torchvision's per-image ``compute_loss`` (the test oracle);
* owns its batched post-processing (``postprocess``, from ``postprocess.py``), equal to torchvision's per-image
  ``postprocess_detections`` (the test oracle), which ``DinoDetector.postprocess_detections`` calls;
* declares the raw outputs an ONNX export returns per anchor (``onnx_outputs``, followed by ``ANCHOR_OUTPUTS``)
  and decodes them (``decoder`` / ``decode``) through the same post-processing as the detector class, so an exported
  model decodes exactly like the PyTorch one;
* states the properties other code asks about: ``has_tower`` (conv towers per branch, so ``--head-convs`` and
  ``--head-separable`` apply) and ``fixed_aspect`` (default boxes are fractions of the input, so the model must
  always see the training aspect ratio).

``feature_extractor="last"`` keeps the reference project's single-level RetinaNet exactly (its
``AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))`` and a plain ``RetinaNetHead`` on the backbone
channels: ``dinov3_convnext_tiny`` with 21 classes has 72,885,975 / 45,065,847 total / trainable parameters); SSD
there is a real single-level SSD. On the ``multi`` pyramid RetinaNet follows torchvision's v2 recipe (GroupNorm
head, GIoU loss), SSD adds extra levels down to a 1x1 grid, FCOS uses one anchor per location of the level's stride.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead

from ..core.errors import UserError
from .detector import DinoDetector, DinoFeatures
from .losses import fcos_loss, retinanet_loss, ssd_loss
from .necks import ExtraLevels, Pyramid
from .postprocess import fcos_postprocess, retinanet_postprocess, ssd_postprocess
from .transform import Float32AnchorGenerator, Float32DefaultBoxGenerator

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
# Dense 3x3 head convs by default, as torchvision's (and published results): on a GPU they are faster than the
# depthwise-separable option (H200, batch 8: 17.2 vs 18.3 ms of neck + head kernels). `--head-separable` (3x3
# depthwise + 1x1 pointwise, EfficientDet's head) is the CPU option: at 640 px the neck + head forward drops from
# 27.6 to 6.0 GFLOP per image and a cached CPU training step runs ~2.3x faster (benchmarks/README.md).
HEAD_SEPARABLE = {"last": False, "multi": False}
SSD_ASPECT_RATIOS = [2, 3]  # per level: 2 square boxes + 2 per ratio = 6 default boxes per location
# What an exported graph returns after the head's own outputs: anchors [N,4] (xyxy, input pixels) and the number
# of feature-map locations per level [L] (int64), which the decoding splits the per-anchor outputs by.
ANCHOR_OUTPUTS = ("anchors", "level_sizes")


# ------------------------------------------------------------------------------ torchvision heads, float32 out
class _Float32Outputs:
    """Head outputs in float32 so losses, box decoding and NMS stay exact under autocast / half models."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {k: v.float() for k, v in super().forward(x).items()}


class _MergedBranches(_Float32Outputs):
    """torchvision's two-branch head (RetinaNet, FCOS: a classification and a box tower on the same features) run
    as one tower of twice the width: the first conv's weights stacked, every later conv grouped (``groups=2``, one
    group per branch), each GroupNorm over both branches with twice the groups (the same channel groups, so the same
    statistics). Same parameters (the state dict is torchvision's), same arithmetic, same outputs (tests, 1e-5),
    half the operator calls per pyramid level in the forward and the backward (a training step launches ~250
    fewer kernels). ``merge_branches``: None (default) merges on a GPU only - oneDNN's grouped convs made a CPU step
    slower (640 px, batch 2: 0.68x separable, 0.87x dense; benchmarks/README.md); False runs torchvision's own
    per-branch forward (the test oracle), True merges anywhere."""

    merge_branches: bool | None = None
    # merged tower only: GroupNorm in the autocast dtype (bf16/fp16) as CPU autocast runs it, where CUDA autocast
    # upcasts it to fp32 and the next conv casts back (two extra passes over every activation); off until a GPU
    # benchmark row (bench_train, "GroupNorm in fp32 vs in the autocast dtype") shows it pays
    low_precision_norm: bool = False
    nonnegative: tuple[str, ...] = ()  # outputs torchvision passes through a ReLU

    def predictors(self) -> list[tuple[str, nn.Module, int, int]]:
        """``(output name, predictor conv, branch 0/1, values per anchor)`` in torchvision's output order."""
        raise NotImplementedError

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        merge = self.merge_branches if self.merge_branches is not None else x[0].is_cuda
        if not merge:
            return super().forward(x)
        tower = merged_tower(self.classification_head.conv, self.regression_head.conv, self.low_precision_norm)
        predictors = self.predictors()
        outputs: dict[str, list[Tensor]] = {name: [] for name, *_ in predictors}
        for features in x:
            y = features
            for layer in tower:
                y = layer(y)
            branches = y.chunk(2, dim=1) if tower else (features, features)
            for name, conv, branch, k in predictors:
                out = conv(branches[branch])
                n, _, h, w = out.shape
                # (N, A * k, H, W) -> (N, HWA, k), as torchvision's heads
                outputs[name].append(out.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        merged = {name: torch.cat(parts, dim=1).float() for name, parts in outputs.items()}
        for name in self.nonnegative:  # elementwise, so once on the concatenated levels
            merged[name] = nn.functional.relu(merged[name])
        return merged


def _tower_layers(tower: nn.Module) -> list[nn.Module]:
    """A branch's conv tower as a flat list of convs (dense or ``SeparableConv2d``), GroupNorms and ReLUs
    (RetinaNet nests each triple in a ``Conv2dNormActivation``; FCOS does not)."""
    out: list[nn.Module] = []
    for m in tower:
        nested = isinstance(m, nn.Sequential) and not isinstance(m, SeparableConv2d)
        out.extend(m.children() if nested else [m])
    return out


def group_norm_in_input_dtype(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``group_norm`` on a bf16/fp16 activation under autocast, in that dtype (statistics still accumulate in fp32
    inside the kernel), with the affine parameters cast to it; otherwise plain ``group_norm``."""
    if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    return nn.functional.group_norm(x, num_groups, weight, bias, eps)


def merged_tower(tower_a: nn.Module, tower_b: nn.Module, low_precision_norm: bool = False
                 ) -> list[Callable[[Tensor], Tensor]]:
    """Two equal towers as one: callables taking ``[B, C, H, W]`` features (first) or ``[B, 2C, H, W]`` (the
    branches side by side) to the next ``[B, 2C, H, W]``. Parameters are concatenated here, once per forward
    (autograd takes each branch's gradient back through the concatenation). ``low_precision_norm``: GroupNorms
    through ``group_norm_in_input_dtype``."""
    layers: list[Callable[[Tensor], Tensor]] = []
    for j, (a, b) in enumerate(zip(_tower_layers(tower_a), _tower_layers(tower_b), strict=True)):
        first = j == 0
        if isinstance(a, SeparableConv2d):
            dw = torch.cat([a.depthwise.weight, b.depthwise.weight])
            pw = torch.cat([a.pointwise.weight, b.pointwise.weight])
            bias = None if a.pointwise.bias is None else torch.cat([a.pointwise.bias, b.pointwise.bias])
            conv = a.depthwise

            def separable(y, dw=dw, pw=pw, bias=bias, conv=conv, first=first):
                y = torch.cat([y, y], dim=1) if first else y  # each branch's depthwise filters see the features
                y = nn.functional.conv2d(y, dw, None, conv.stride, conv.padding, groups=dw.shape[0])
                return nn.functional.conv2d(y, pw, bias, groups=2)
            layers.append(separable)
        elif isinstance(a, nn.Conv2d):
            weight = torch.cat([a.weight, b.weight])
            bias = None if a.bias is None else torch.cat([a.bias, b.bias])
            layers.append(partial(nn.functional.conv2d, weight=weight, bias=bias, stride=a.stride,
                                  padding=a.padding, groups=1 if first else 2))
        elif isinstance(a, nn.GroupNorm):
            norm = group_norm_in_input_dtype if low_precision_norm else nn.functional.group_norm
            layers.append(partial(norm, num_groups=2 * a.num_groups, weight=torch.cat([a.weight, b.weight]),
                                  bias=torch.cat([a.bias, b.bias]), eps=a.eps))
        elif isinstance(a, nn.ReLU):
            layers.append(partial(nn.functional.relu, inplace=a.inplace))
        else:
            raise TypeError(f"cannot merge a {type(a).__name__} of a head tower")
    return layers


class DetRetinaNetHead(_MergedBranches, RetinaNetHead):
    def predictors(self) -> list[tuple[str, nn.Module, int, int]]:
        return [("cls_logits", self.classification_head.cls_logits, 0, self.classification_head.num_classes),
                ("bbox_regression", self.regression_head.bbox_reg, 1, 4)]


class DetSSDHead(_Float32Outputs, SSDHead):
    pass


class DetFCOSHead(_MergedBranches, FCOSHead):
    nonnegative = ("bbox_regression",)

    def predictors(self) -> list[tuple[str, nn.Module, int, int]]:
        return [("cls_logits", self.classification_head.cls_logits, 0, self.classification_head.num_classes),
                ("bbox_regression", self.regression_head.bbox_reg, 1, 4),
                ("bbox_ctrness", self.regression_head.bbox_ctrness, 1, 1)]


class DinoRetinaNet(DinoDetector, RetinaNet):
    pass


class DinoSSD(DinoDetector, SSD):
    pass


class DinoFCOS(DinoDetector, FCOS):
    pass


# ------------------------------------------------------------------------------------------ building blocks
def retinanet_anchor_sizes(strides: Sequence[int],
                           base_sizes: Sequence[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """torchvision's RetinaNet anchors, 3 octave scales of a base size per level, for any list of strides; the base
    sizes default to 4 x stride (32 px at stride 8 ... 512 at 128)."""
    if base_sizes is None:
        base_sizes = [ANCHOR_STRIDE_FACTOR * s for s in strides]
    elif len(base_sizes) != len(strides):
        raise UserError(f"--anchor-sizes {' '.join(map(str, base_sizes))}: this pyramid has {len(strides)} levels "
                        f"(strides {', '.join(map(str, strides))}); give one base size per level (each gets 3 "
                        f"octave scales), e.g. {' '.join(str(ANCHOR_STRIDE_FACTOR * s) for s in strides)}")
    return tuple(tuple(int(b * 2 ** (i / 3)) for i in range(3)) for b in base_sizes)


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


def make_separable(head: nn.Module) -> None:
    """Swap every dense 3x3 conv of a head (towers and predictors) for a ``SeparableConv2d``."""
    for parent in list(head.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.groups == 1:
                setattr(parent, name, SeparableConv2d(child))


class _StandIn(nn.Module):
    """Stand-in backbone / head: a decoder (``HeadType.decoder``) never runs them."""

    out_channels = 0


def _settings(cfg: Any) -> dict[str, Any]:
    return dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms, detections_per_img=cfg.max_det)


# ------------------------------------------------------------------------------------------------ registry
class HeadType:
    """One detection head: see the module docstring. Subclasses set the class attributes and ``_build``."""

    name: str = ""
    title: str = ""  # how messages name the head
    detector_class: type[DinoDetector]
    onnx_outputs: tuple[str, ...] = ()  # raw head outputs per anchor, in graph order, each [B, N, ...]
    has_tower: bool = True
    fixed_aspect: bool = False
    loss_fn: Callable[..., dict[str, Tensor]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ building
    def tower(self, cfg: Any) -> tuple[int | None, bool | None]:
        """(conv layers per branch, depthwise-separable) the head is built with for ``cfg`` (a ``DetectorConfig``):
        the configured values or the defaults of its feature extractor; ``(None, None)`` for a head without towers."""
        if not self.has_tower:
            return None, None
        mode = cfg.feature_extractor
        n_convs = HEAD_CONVS[mode] if cfg.head_convs is None else cfg.head_convs
        return n_convs, HEAD_SEPARABLE[mode] if cfg.head_separable is None else cfg.head_separable

    def build(self, cfg: Any, dino: nn.Module, pyramid: Pyramid) -> DinoDetector:
        """The detector of this head for ``cfg`` on the DINOv3 backbone ``dino`` and the neck's ``pyramid``."""
        n_convs, separable = self.tower(cfg)
        model = self._build(cfg, dino, pyramid, n_convs)
        if separable:
            make_separable(model.head)
        return model

    def _build(self, cfg: Any, dino: nn.Module, pyramid: Pyramid, n_convs: int | None) -> DinoDetector:
        raise NotImplementedError

    @staticmethod
    def _features(cfg: Any, dino: nn.Module, pyramid: Pyramid) -> DinoFeatures:
        return DinoFeatures(dino, cfg.feature_extractor, pyramid.neck, pyramid.channels, pyramid.strides)

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: dict[str, Tensor], anchors: Tensor, num_anchors_per_level: Sequence[int],
             gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, **options: Any) -> dict[str, Tensor]:
        """``loss_fn`` on the head's ``outputs`` (``{name: [B, N, ...]}``, as the head returns them) for padded
        ground truth (``losses.pad_targets``); ``options`` as ``loss_options`` gives them for a built model."""
        raise NotImplementedError

    def loss_options(self, model: nn.Module) -> dict[str, Any]:
        """The keyword arguments of ``loss_fn`` that reproduce ``model``'s own ``compute_loss``."""
        return {}

    def postprocess(self, model: nn.Module, head_outputs: dict[str, Any], anchors: Any,
                    image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """``model.postprocess_detections`` for the whole batch at once (``postprocess.py``): head outputs as
        torchvision's ``forward`` passes them, ``anchors`` of one image (all images of a batch share them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ONNX outputs and decoding
    @property
    def output_names(self) -> tuple[str, ...]:
        """Every output of an exported graph, in order: the head's own, then ``ANCHOR_OUTPUTS``."""
        return (*self.onnx_outputs, *ANCHOR_OUTPUTS)

    def decoder(self, num_classes: int, score_thresh: float, nms: float, max_det: int,
                topk_candidates: int) -> DinoDetector:
        """A weightless detector of this head whose ``postprocess_detections`` decodes raw outputs (``decode``)."""
        settings = dict(score_thresh=float(score_thresh), nms_thresh=float(nms), detections_per_img=int(max_det),
                        topk_candidates=int(topk_candidates), head=_StandIn())
        return self.detector_class(_StandIn(), num_classes, **settings).eval()

    def decode(self, decoder: DinoDetector, outputs: dict[str, Tensor], image_size: Sequence[int]
               ) -> list[dict[str, Tensor]]:
        """Raw outputs (``output_names``, e.g. an exported graph's) -> detections in input coordinates, clipped to
        ``image_size`` (h, w), the unpadded size every image of the batch has; ``decoder`` from ``decoder()``."""
        head_outputs = {k: outputs[k].float() for k in self.onnx_outputs}
        n = head_outputs["cls_logits"].shape[0]
        sizes = [(int(image_size[0]), int(image_size[1]))] * n
        with torch.inference_mode():
            hw = [int(v) for v in outputs["level_sizes"].tolist()]
            return self.detect(decoder, head_outputs, outputs["anchors"].float(), hw, sizes)

    def detect(self, model: DinoDetector, head_outputs: dict[str, Tensor], anchors: Tensor, level_sizes: Sequence[int],
               image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """What torchvision's ``forward`` does after the head in eval mode: raw outputs ``{name: [B, N, ...]}`` and
        one image's ``anchors`` ``[N, 4]`` -> ``model.postprocess_detections`` per image; ``level_sizes``: the
        locations of each level's grid."""
        # the per-level split RetinaNet.forward / FCOS.forward do before their postprocess_detections
        per_location = head_outputs["cls_logits"].shape[1] // sum(level_sizes)
        per_level = [v * per_location for v in level_sizes]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        n = len(image_sizes)
        return model.postprocess_detections(split, [list(anchors.split(per_level))] * n, image_sizes)


class RetinaNetType(HeadType):
    name, title = "retinanet", "RetinaNet"
    detector_class = DinoRetinaNet
    onnx_outputs = ("cls_logits", "bbox_regression")
    loss_fn = staticmethod(retinanet_loss)

    def _build(self, cfg: Any, dino: nn.Module, pyramid: Pyramid, n_convs: int | None) -> DinoDetector:
        channels, strides, num_classes = pyramid.channels, pyramid.strides, cfg.num_classes
        ratios = cfg.anchor_ratios or REFERENCE_ASPECT_RATIOS[0]
        if cfg.feature_extractor == "last":  # the reference project's model, parameter for parameter
            anchors = Float32AnchorGenerator((cfg.anchor_sizes or REFERENCE_ANCHOR_SIZES[0],), (ratios,))
            head = DetRetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes)
        else:  # torchvision's RetinaNet v2 recipe: GroupNorm in the head, GIoU box loss
            anchors = Float32AnchorGenerator(retinanet_anchor_sizes(strides, cfg.anchor_sizes),
                                             (ratios,) * len(strides))
            head = DetRetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes,
                                    norm_layer=partial(nn.GroupNorm, 32))
            head.regression_head._loss_type = "giou"
        _shorten_towers(head, n_convs)
        return DinoRetinaNet(self._features(cfg, dino, pyramid), num_classes, anchor_generator=anchors, head=head,
                             **_settings(cfg))

    def loss(self, outputs, anchors, num_anchors_per_level, gt_boxes, gt_labels, gt_valid, **options):
        return retinanet_loss(outputs["cls_logits"], outputs["bbox_regression"], anchors, gt_boxes, gt_labels,
                              gt_valid, **options)

    def postprocess(self, model, head_outputs, anchors, image_sizes):
        # class 0 is __background__ here: masked so it never takes a detection slot
        return retinanet_postprocess(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, image_sizes,
                                     mask_background=True, **_postprocess_settings(model))

    def loss_options(self, model: nn.Module) -> dict[str, Any]:
        matcher, regression = model.proposal_matcher, model.head.regression_head
        return dict(box_coder=regression.box_coder, fg_iou=matcher.high_threshold, bg_iou=matcher.low_threshold,
                    allow_low_quality_matches=matcher.allow_low_quality_matches, loss_type=regression._loss_type)


class SSDType(HeadType):
    name, title = "ssd", "SSD"
    detector_class = DinoSSD
    onnx_outputs = ("cls_logits", "bbox_regression")
    has_tower = False  # one conv per level
    fixed_aspect = True
    loss_fn = staticmethod(ssd_loss)

    def _build(self, cfg: Any, dino: nn.Module, pyramid: Pyramid, n_convs: int | None) -> DinoDetector:
        neck, channels, strides = pyramid.neck, pyramid.channels, pyramid.strides
        w, h = _padded(cfg.imgsz, pyramid.size_multiple)
        if cfg.feature_extractor == "multi":  # stride-2 levels after the pyramid, down to a 1x1 grid
            n_extra = num_extra_levels((math.ceil(h / strides[-1]), math.ceil(w / strides[-1])))
            neck = ExtraLevels(neck, channels, n_extra)
            strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(n_extra)]
        boxes = Float32DefaultBoxGenerator([SSD_ASPECT_RATIOS] * len(strides), scales=ssd_scales(strides, min(w, h)))
        head = DetSSDHead([channels] * len(strides), boxes.num_anchors_per_location(), cfg.num_classes)
        features = DinoFeatures(dino, cfg.feature_extractor, neck, channels, strides)
        return DinoSSD(features, boxes, (cfg.imgsz[1], cfg.imgsz[0]), cfg.num_classes, head=head, **_settings(cfg))

    def loss(self, outputs, anchors, num_anchors_per_level, gt_boxes, gt_labels, gt_valid, **options):
        return ssd_loss(outputs["bbox_regression"], outputs["cls_logits"], anchors, gt_boxes, gt_labels, gt_valid,
                        **options)

    def loss_options(self, model: nn.Module) -> dict[str, Any]:
        return dict(box_coder=model.box_coder, iou_thresh=model.proposal_matcher.high_threshold,
                    neg_to_pos_ratio=model.neg_to_pos_ratio)

    def postprocess(self, model, head_outputs, anchors, image_sizes):
        return ssd_postprocess(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors, image_sizes,
                               **_postprocess_settings(model))

    def decoder(self, num_classes: int, score_thresh: float, nms: float, max_det: int,
                topk_candidates: int) -> DinoDetector:
        settings = dict(score_thresh=float(score_thresh), nms_thresh=float(nms), detections_per_img=int(max_det),
                        topk_candidates=int(topk_candidates), head=_StandIn())
        # the default-box generator is only a constructor argument here: the anchors come with the outputs
        return DinoSSD(_StandIn(), DefaultBoxGenerator([[2]]), (32, 32), num_classes, **settings).eval()

    def decode(self, decoder, outputs, image_size):
        head_outputs = {k: outputs[k].float() for k in self.onnx_outputs}
        n = head_outputs["cls_logits"].shape[0]
        sizes = [(int(image_size[0]), int(image_size[1]))] * n
        with torch.inference_mode():
            return self.detect(decoder, head_outputs, outputs["anchors"].float(), [], sizes)

    def detect(self, model, head_outputs, anchors, level_sizes, image_sizes):
        # SSD decodes all levels at once (no per-level split)
        return model.postprocess_detections(head_outputs, [anchors] * len(image_sizes), image_sizes)


class FCOSType(HeadType):
    name, title = "fcos", "FCOS"
    detector_class = DinoFCOS
    onnx_outputs = ("cls_logits", "bbox_regression", "bbox_ctrness")
    loss_fn = staticmethod(fcos_loss)

    def _build(self, cfg: Any, dino: nn.Module, pyramid: Pyramid, n_convs: int | None) -> DinoDetector:
        channels, strides = pyramid.channels, pyramid.strides
        if channels % 32 or channels < 64:
            raise UserError(f"--head fcos: {cfg.model_name} gives {channels}-channel features, but FCOS's GroupNorm(32) "
                            f"needs a multiple of 32 (at least 64); use --feature-extractor multi")
        # one anchor per location whose size is the level's stride (FCOS assigns objects by it)
        anchors = Float32AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        head = DetFCOSHead(channels, 1, cfg.num_classes, num_convs=n_convs)
        return DinoFCOS(self._features(cfg, dino, pyramid), cfg.num_classes, anchor_generator=anchors, head=head,
                        **_settings(cfg))

    def loss(self, outputs, anchors, num_anchors_per_level, gt_boxes, gt_labels, gt_valid, **options):
        return fcos_loss(outputs["cls_logits"], outputs["bbox_regression"], outputs["bbox_ctrness"], anchors,
                         num_anchors_per_level, gt_boxes, gt_labels, gt_valid, **options)

    def loss_options(self, model: nn.Module) -> dict[str, Any]:
        return dict(box_coder=model.box_coder, center_sampling_radius=model.center_sampling_radius)

    def postprocess(self, model, head_outputs, anchors, image_sizes):
        return fcos_postprocess(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                head_outputs["bbox_ctrness"], anchors, image_sizes, mask_background=True,
                                **_postprocess_settings(model))


def _postprocess_settings(model: nn.Module) -> dict[str, Any]:
    return dict(box_coder=model.box_coder, score_thresh=model.score_thresh, nms_thresh=model.nms_thresh,
                detections_per_img=model.detections_per_img, topk_candidates=model.topk_candidates)


HEAD_TYPES: dict[str, HeadType] = {h.name: h for h in (RetinaNetType(), SSDType(), FCOSType())}
for _kind in HEAD_TYPES.values():
    _kind.detector_class.head_kind = _kind  # what the detector's batched loss and post-processing call


def head_type(name: str) -> HeadType:
    """The registry entry of head ``name``; a UserError naming ``--head`` for another name."""
    if name not in HEAD_TYPES:
        raise UserError(f"--head {name!r} is not valid; choose one of {', '.join(HEAD_TYPES)}")
    return HEAD_TYPES[name]
