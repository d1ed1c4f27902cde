"""Our detectors' batched training losses (``model(images, PaddedTargets)``) equal torchvision's own training
forward with per-image targets (the oracle), with the same gradients, and read nothing back to the host."""

import warnings

import pytest
import torch
from sync_guard import forbid_host_syncs

from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig
from src.detection.modeling.losses import pad_targets

IMGSZ = (128, 96)


def _model(head: str, feature_extractor: str):
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=4, head=head,
                         feature_extractor=feature_extractor, imgsz=IMGSZ, fpn_channels=64)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(cfg, verbose=False).train()


def _batch():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 3, IMGSZ[1], IMGSZ[0]), dtype=torch.uint8, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [30, 5, 120, 90], [30, 5, 120, 90]]),
                "labels": torch.tensor([1, 3, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[0.0, 0, 20, 30]]), "labels": torch.tensor([2])}]
    return images, targets


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
@pytest.mark.parametrize("feature_extractor", ["multi", "last"])
def test_batched_losses_equal_torchvision_training_forward(head, feature_extractor):
    model = _model(head, feature_extractor)
    images, targets = _batch()
    expected = model(images, targets)
    sum(expected.values()).backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    got = model(images, pad_targets(targets, max_boxes=8))
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)
    sum(got.values()).backward()
    got_grads = _grads(model)
    assert set(got_grads) == set(expected_grads) and got_grads
    for n in expected_grads:
        torch.testing.assert_close(got_grads[n], expected_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
def test_training_losses_make_no_host_syncs(head):
    model = _model(head, "multi")
    images, targets = _batch()
    padded = pad_targets(targets, max_boxes=8)
    model(images, padded)  # the first call computes the anchors of this shape (cached)
    with forbid_host_syncs():
        losses = model(images, padded)
        sum(losses.values()).backward()


@pytest.mark.slow
@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
def test_training_forward_compiles_as_one_graph(head):
    """Static shapes and no host reads: dynamo captures transform, backbone, neck, head, matching and losses as one
    graph with no break (what ``--compile`` and CUDA graphs need)."""
    import torch._dynamo

    model = _model(head, "multi")
    images, targets = _batch()
    padded = pad_targets(targets, max_boxes=8)
    model(images, padded)  # anchors of this shape computed once, outside the graph
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(images, padded)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1

