"""Batched RetinaNet / FCOS / SSD losses against torchvision's per-image implementations (the oracle).

Tiny torchvision detectors supply ``compute_loss``, the matchers and the anchors; head outputs are random tensors, so
no network runs. Targets mix images with 0, 1 and 7 boxes and include ties: a duplicated box, a box equal to an
anchor, and a box centered between two anchors.
"""

import pytest
import torch
from sync_guard import forbid_host_syncs
from torch import nn
from torchvision.models.detection._utils import Matcher, SSDMatcher
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import boxes as box_ops

from src.detection.modeling.losses import (
    batched_box_iou,
    fcos_loss,
    fcos_matches,
    pad_targets,
    retinanet_loss,
    retinanet_matches,
    ssd_loss,
    ssd_matches,
)

H, W = 96, 128
GRIDS = [(12, 16), (6, 8), (3, 4)]  # strides 8, 16, 32
C = 5
TOL = {"rtol": 1e-5, "atol": 1e-5}
# compiled vs eager: inductor sums the losses' thousands of terms in its own order, with the vector width of the
# CPU it runs on, so fp32 rounding differs by more than between two eager implementations
COMPILED_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (see conftest)."""


def _backbone() -> nn.Module:
    backbone = nn.Conv2d(3, 32, 1)  # FCOSHead's GroupNorm needs 32 channels
    backbone.out_channels = 32
    return backbone


def _anchors(generator: nn.Module, batch: int) -> list[torch.Tensor]:
    images = ImageList(torch.zeros(batch, 3, H, W), [(H, W)] * batch)
    feats = [torch.zeros(batch, 8, h, w) for h, w in GRIDS]
    return generator(images, feats)


def _targets(counts: list[int], anchors: torch.Tensor, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random valid boxes of many sizes; images with >= 3 boxes get a duplicate, an anchor, and a box that overlaps
    two neighbouring anchors equally."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in counts:
        size = torch.exp(torch.empty(k, 2).uniform_(1.0, 4.7, generator=g))  # ~3 .. 110 px
        center = torch.rand(k, 2, generator=g) * torch.tensor([W, H])
        boxes = torch.cat([center - size / 2, center + size / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W - 2)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H - 2)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1.5)
        if k >= 3:
            boxes[1] = boxes[0]  # duplicate gt: equal IoU rows, equal areas
            i = int(torch.randint(len(anchors), (1,), generator=g))
            boxes[2] = anchors[i]  # IoU exactly 1 with one anchor
        if k >= 4:
            boxes[3] = anchors[40] + torch.tensor([4.0, 0.0, 4.0, 0.0])  # halfway to the next location (stride 8)
        labels = torch.randint(0, C, (k,), generator=g)  # class 0 included
        out.append({"boxes": boxes, "labels": labels})
    return out


BATCHES = {
    "mixed": [0, 1, 7, 4],
    "one_each": [1, 1],
    "all_empty": [0, 0, 0],
}


def _leaves(shapes: dict[str, tuple[int, ...]], seed: int, positive: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.rand(shape, generator=g) * 2 if name in positive else torch.randn(shape, generator=g)
        out[name] = t.requires_grad_()
    return out


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]
             ) -> float:
    """Values and gradients (of a weighted sum of the components) agree; returns the largest difference."""
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
        worst = max(worst, (ours[k] - theirs[k]).abs().item())
    weights = {k: 1.0 + 0.3 * i for i, k in enumerate(sorted(ours))}
    g_ours = torch.autograd.grad(sum(weights[k] * ours[k] for k in ours), list(leaves.values()), allow_unused=True)
    g_theirs = torch.autograd.grad(sum(weights[k] * theirs[k] for k in theirs), list(leaves.values()),
                                   allow_unused=True)
    for name, a, b in zip(leaves, g_ours, g_theirs):
        a = torch.zeros_like(leaves[name]) if a is None else a
        b = torch.zeros_like(leaves[name]) if b is None else b
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")
        worst = max(worst, (a - b).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------- RetinaNet
def _retinanet(loss_type: str) -> RetinaNet:
    generator = AnchorGenerator(((16, 20, 25), (32, 40, 50), (64, 80, 101)), ((0.5, 1.0, 2.0),) * 3)
    model = RetinaNet(_backbone(), C, anchor_generator=generator, head=RetinaNetHead(32, 9, C))
    model.head.regression_head._loss_type = loss_type
    return model


def _record_matches(model) -> dict:
    """torchvision's matched indices, recorded as its head's ``compute_loss`` receives them."""
    seen = {}
    compute = model.head.compute_loss

    def spy(targets, head_outputs, anchors, matched_idxs):
        seen["matched"] = torch.stack(matched_idxs)
        return compute(targets, head_outputs, anchors, matched_idxs)

    model.head.compute_loss = spy
    return seen


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "giou", "diou", "ciou"])
def test_retinanet_matches_torchvision(batch, loss_type):
    counts = BATCHES[batch]
    model = _retinanet(loss_type)
    anchors = _anchors(model.anchor_generator, len(counts))
    targets = _targets(counts, anchors[0], seed=len(counts))
    n = anchors[0].shape[0]
    leaves = _leaves({"cls_logits": (len(counts), n, C), "bbox_regression": (len(counts), n, 4)}, seed=1)

    seen = _record_matches(model)
    theirs = model.compute_loss(targets, leaves, anchors)
    boxes, labels, valid = pad_targets(targets, max_boxes=9)  # extra padding must not matter
    ours = retinanet_loss(leaves["cls_logits"], leaves["bbox_regression"], anchors[0], boxes, labels, valid,
                          box_coder=model.head.regression_head.box_coder, loss_type=loss_type)
    _compare(ours, theirs, leaves)
    assert torch.equal(retinanet_matches(anchors[0], boxes, valid), seen["matched"])
    if batch == "mixed":  # the case exercises foreground, ignored and low-quality matches
        assert (seen["matched"] == -2).any() and (seen["matched"] >= 0).sum() > 10


def test_retinanet_ties_and_low_quality():
    """Two anchors tie for a gt's best IoU (both take it); duplicate gts resolve to the first index."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 60, 60]])
    gt = torch.tensor([[[5.0, 0, 15, 10], [5, 0, 15, 10], [0, 0, 100, 100]]])
    valid = torch.tensor([[True, True, True]])
    ours = retinanet_matches(anchors, gt, valid)
    theirs = Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_ops.box_iou(gt[0], anchors))
    assert torch.equal(ours[0], theirs)
    assert ours.tolist() == [[0, 0, 2]]


# ---------------------------------------------------------------------------------------------------- FCOS
def _fcos() -> FCOS:
    generator = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    return FCOS(_backbone(), C, anchor_generator=generator, head=FCOSHead(32, 1, C))


@pytest.mark.parametrize("batch", list(BATCHES))
def test_fcos_matches_torchvision(batch):
    counts = BATCHES[batch]
    model = _fcos()
    anchors = _anchors(model.anchor_generator, len(counts))
    per_level = [h * w for h, w in GRIDS]
    targets = _targets(counts, anchors[0], seed=10 + len(counts))
    n = anchors[0].shape[0]
    b = len(counts)
    leaves = _leaves({"cls_logits": (b, n, C), "bbox_regression": (b, n, 4), "bbox_ctrness": (b, n, 1)}, seed=2,
                     positive=("bbox_regression",))

    seen = _record_matches(model)
    theirs = model.compute_loss(targets, leaves, anchors, per_level)
    boxes, labels, valid = pad_targets(targets)
    ours = fcos_loss(leaves["cls_logits"], leaves["bbox_regression"], leaves["bbox_ctrness"], anchors[0], per_level,
                     boxes, labels, valid, box_coder=model.head.box_coder,
                     center_sampling_radius=model.center_sampling_radius)
    _compare(ours, theirs, leaves)
    assert torch.equal(fcos_matches(anchors[0], per_level, boxes, valid), seen["matched"])
    if batch == "mixed":
        assert (seen["matched"] >= 0).sum() > 5


def test_fcos_smallest_box_wins_first_on_ties():
    anchors = torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8]])
    gt = torch.tensor([[[0.0, 0, 20, 20], [1, 1, 15, 7], [1, 1, 15, 7], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, True, False]])
    assert fcos_matches(anchors, [2], gt, valid).tolist() == [[1, 1]]


# ---------------------------------------------------------------------------------------------------- SSD
def _ssd() -> SSD:
    generator = DefaultBoxGenerator([[2], [2, 3], [2]])
    head = SSDHead([32, 32, 32], generator.num_anchors_per_location(), C)
    return SSD(_backbone(), generator, (H, W), C, head=head)


def _ssd_oracle(model: SSD, targets, head_outputs, anchors) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``SSD.forward``'s matching loop followed by ``SSD.compute_loss``."""
    matched_idxs = []
    for anchors_per_image, targets_per_image in zip(anchors, targets):
        if targets_per_image["boxes"].numel() == 0:
            matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64))
            continue
        matched_idxs.append(model.proposal_matcher(box_ops.box_iou(targets_per_image["boxes"], anchors_per_image)))
    return model.compute_loss(targets, head_outputs, anchors, matched_idxs), torch.stack(matched_idxs)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_ssd_matches_torchvision(batch):
    counts = BATCHES[batch]
    model = _ssd()
    anchors = _anchors(model.anchor_generator, len(counts))
    targets = _targets(counts, anchors[0], seed=20 + len(counts))
    n = anchors[0].shape[0]
    b = len(counts)
    leaves = _leaves({"bbox_regression": (b, n, 4), "cls_logits": (b, n, C)}, seed=3)
    theirs, matched = _ssd_oracle(model, targets, leaves, anchors)
    boxes, labels, valid = pad_targets(targets)
    ours = ssd_loss(leaves["bbox_regression"], leaves["cls_logits"], anchors[0], boxes, labels, valid,
                    box_coder=model.box_coder, neg_to_pos_ratio=model.neg_to_pos_ratio)
    _compare(ours, theirs, leaves)
    assert torch.equal(ssd_matches(anchors[0], boxes, valid), matched)


def test_ssd_shared_best_anchor_goes_to_last_gt():
    """Duplicate gts share their best default box; torchvision's in-order write leaves the later one there."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    gt = torch.tensor([[[0.0, 0, 9, 9], [0, 0, 9, 9], [52, 52, 60, 60]]])
    valid = torch.tensor([[True, True, True]])
    theirs = SSDMatcher(0.5)(box_ops.box_iou(gt[0], anchors))
    assert torch.equal(ssd_matches(anchors, gt, valid)[0], theirs)
    assert theirs.tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------------- interface
def test_pad_targets():
    targets = [{"boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    boxes, labels, valid = pad_targets(targets, max_boxes=3)
    assert boxes.shape == (2, 3, 4) and labels.shape == (2, 3) and valid.tolist() == [[True, False, False]] * 1 + [
        [False, False, False]]
    assert boxes[0, 0].tolist() == [1, 2, 3, 4] and labels[0, 0] == 3
    assert pad_targets(targets)[0].shape == (2, 1, 4)
    with pytest.raises(ValueError, match="max_boxes"):
        pad_targets(targets, max_boxes=0)


def test_no_boxes_at_all():
    """A batch padded to M = 0 (no image has a box) works and equals torchvision."""
    model = _retinanet("giou")
    anchors = _anchors(model.anchor_generator, 2)
    n = anchors[0].shape[0]
    leaves = _leaves({"cls_logits": (2, n, C), "bbox_regression": (2, n, 4)}, seed=4)
    boxes, labels, valid = pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
    assert boxes.shape == (2, 0, 4)
    ours = retinanet_loss(leaves["cls_logits"], leaves["bbox_regression"], anchors[0], boxes, labels, valid,
                          loss_type="giou")
    theirs = model.compute_loss([{"boxes": b[:0], "labels": lab[:0]} for b, lab in zip(boxes, labels)], leaves, anchors)
    _compare(ours, theirs, leaves)


def test_per_image_anchors_and_int32_labels():
    """``[B, N, 4]`` anchors and int32 labels give exactly the losses of shared ``[N, 4]`` anchors and int64."""
    for call, (args, kwargs) in _cases():
        shared = call(*args, **kwargs)
        args = list(args)
        anchors_at = 3 if call is fcos_loss else 2
        args[anchors_at] = args[anchors_at].expand(args[0].shape[0], -1, -1)
        args[-2] = args[-2].int()
        stacked = call(*args, **kwargs)
        for k in shared:
            torch.testing.assert_close(shared[k], stacked[k], rtol=0, atol=0)


def test_half_inputs_are_computed_in_float32():
    model = _ssd()
    anchors = _anchors(model.anchor_generator, 2)
    targets = _targets([4, 2], anchors[0], seed=6)
    n = anchors[0].shape[0]
    leaves = _leaves({"bbox_regression": (2, n, 4), "cls_logits": (2, n, C)}, seed=7)
    boxes, labels, valid = pad_targets(targets)
    half = ssd_loss(leaves["bbox_regression"].half(), leaves["cls_logits"].half(), anchors[0], boxes, labels, valid)
    assert all(v.dtype == torch.float32 for v in half.values())
    rounded = {k: v.detach().half().float() for k, v in leaves.items()}
    full = ssd_loss(rounded["bbox_regression"], rounded["cls_logits"], anchors[0], boxes, labels, valid)
    for k in half:
        torch.testing.assert_close(half[k], full[k], **TOL)


def _cases(batch: int = 3) -> list[tuple[object, tuple[tuple, dict]]]:
    """``(loss function, (args, kwargs))`` for each head on a mixed batch padded to a fixed M."""
    per_level = [h * w for h, w in GRIDS]
    cases = []
    for model, seed in ((_retinanet("giou"), 30), (_fcos(), 31), (_ssd(), 32)):
        anchors = _anchors(model.anchor_generator, batch)[0]
        gt = pad_targets(_targets([0, 7, 4][:batch], anchors, seed=seed), max_boxes=8)
        n = anchors.shape[0]
        g = torch.Generator().manual_seed(seed)
        cls = torch.randn(batch, n, C, generator=g, requires_grad=True)
        reg = torch.rand(batch, n, 4, generator=g, requires_grad=True)
        ctr = torch.randn(batch, n, 1, generator=g, requires_grad=True)
        if isinstance(model, RetinaNet):
            cases.append((retinanet_loss, ((cls, reg, anchors, *gt), {"loss_type": "giou"})))
        elif isinstance(model, FCOS):
            cases.append((fcos_loss, ((cls, reg, ctr, anchors, per_level, *gt), {})))
        else:
            cases.append((ssd_loss, ((reg, cls, anchors, *gt), {})))
    return cases


def test_no_host_syncs():
    """Nothing reads device values on the host: the usual ways to do so raise during the calls (forward and
    backward)."""
    cases = _cases()
    with forbid_host_syncs():
        for call, (args, kwargs) in cases:
            losses = call(*args, **kwargs)
            torch.autograd.backward(list(losses.values()))


def test_cuda_no_sync():
    """On a GPU the CUDA sync debugger turns any synchronizing call into an error."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _fcos()
    anchors = _anchors(model.anchor_generator, 2)[0].cuda()
    boxes, labels, valid = pad_targets(_targets([5, 0], anchors.cpu(), seed=8), device="cuda", max_boxes=8)
    per_level = [h * w for h, w in GRIDS]
    n = anchors.shape[0]
    leaves = {k: torch.randn(2, n, d, device="cuda", requires_grad=True) for k, d in (("c", C), ("r", 4), ("t", 1))}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [retinanet_loss(leaves["c"], leaves["r"], anchors, boxes, labels, valid, loss_type="giou"),
               fcos_loss(leaves["c"], leaves["r"].abs(), leaves["t"], anchors, per_level, boxes, labels, valid),
               ssd_loss(leaves["r"], leaves["c"], anchors, boxes, labels, valid)]
        torch.autograd.backward([v for d in out for v in d.values()])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batched_box_iou_is_bit_identical():
    g = torch.Generator().manual_seed(9)
    a = torch.rand(2, 5, 4, generator=g) * 50
    a[..., 2:] += a[..., :2]
    b = torch.rand(1, 30, 4, generator=g) * 50
    b[..., 2:] += b[..., :2]
    ours = batched_box_iou(a, b)
    for i in range(2):
        assert torch.equal(ours[i], box_ops.box_iou(a[i], b[0]))


@pytest.mark.slow
def test_fullgraph_compile():
    """All three losses compile as one graph each (a graph break would mean a hidden host round-trip); 25-50 s on 2 cores."""
    torch._dynamo.reset()
    for call, (args, kwargs) in _cases():
        eager = call(*args, **kwargs)
        compiled = torch.compile(call, fullgraph=True, dynamic=False)(*args, **kwargs)
        for k in eager:
            torch.testing.assert_close(compiled[k], eager[k], **COMPILED_TOL)
