"""The training epoch as a GPU runs it: no host synchronisation between two logging steps, non-finite steps skipped
on the device by the fused optimizer, and the same epoch means as summing the step losses on the host."""

import math
import warnings

import pytest
import torch
from sync_guard import count_host_syncs
from torch import nn

from src.detection.core.errors import UserError
from src.detection.engine.loop import NonFiniteGuard, build_optimizer, skips_on_device, train_one_epoch
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig


def _batches(n, size=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g)
        targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[4.0, 10.0, 30.0, 60.0], [20, 20, 60, 50]])[: 1 + i % 2],
                    "labels": torch.tensor([2, 1])[: 1 + i % 2]}]
        out.append((images, targets))
    return out


def _detector():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(DetectorConfig("dinov3_convnext_atto", 3, imgsz=(64, 64), fpn_channels=64),
                              verbose=False)


def test_default_optimizers_skip_non_finite_steps_on_the_device():
    model = _detector()
    assert skips_on_device(build_optimizer(model, "adamw", 1e-3, 0.01))
    assert skips_on_device(build_optimizer(model, "sgd", 1e-3, 0.01))


def test_no_host_sync_between_logging_steps():
    model = _detector()
    opt = build_optimizer(model, "adamw", 1e-3, 0.01)
    batches = _batches(7)
    with count_host_syncs() as syncs:
        out = train_one_epoch(model, batches, opt, None, torch.device("cpu"), 1, clip_grad=1.0, log_interval=3)
    # reads after steps 3 and 6 and at the end: one transfer each, nothing else
    assert syncs == ["tolist"] * 3
    assert math.isfinite(out["train_loss"]) and out["skipped_steps"] == 0


def test_epoch_means_equal_the_mean_of_the_step_losses():
    model = _detector()
    opt = build_optimizer(model, "sgd", 0.0, 0.0)  # lr 0: every step sees the same weights
    batches = _batches(4)
    expected = []
    model.train()
    for images, targets in batches:
        from src.detection.engine.loop import padded_targets

        with torch.no_grad():
            losses = model(images, padded_targets(targets, torch.device("cpu")))
        expected.append({f"loss_{k}": float(v) for k, v in losses.items()})
    out = train_one_epoch(model, batches, opt, None, torch.device("cpu"), 1, log_interval=3)
    for key in expected[0]:
        assert out[key] == pytest.approx(sum(e[key] for e in expected) / len(expected), rel=1e-5)
    assert out["train_loss"] == pytest.approx(sum(sum(e.values()) for e in expected) / len(expected), rel=1e-5)


class NanAt(nn.Module):
    def __init__(self, nan_at):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.calls, self.nan_at = 0, set(nan_at)

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w * images.float().mean()).pow(2).sum()
        return {"loss_a": loss * float("nan") if self.calls in self.nan_at else loss}


def test_fused_optimizer_skips_non_finite_steps_exactly():
    batches = [(torch.ones(2, 3, 4, 4), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
               for _ in range(5)]
    nan_model, clean_model = NanAt({2, 4}), NanAt(set())
    nan_opt = torch.optim.AdamW(nan_model.parameters(), lr=0.1, fused=True)
    clean_opt = torch.optim.AdamW(clean_model.parameters(), lr=0.1, fused=True)
    out = train_one_epoch(nan_model, batches, nan_opt, None, torch.device("cpu"), 1)
    train_one_epoch(clean_model, batches[:3], clean_opt, None, torch.device("cpu"), 1)  # the 3 finite steps
    assert out["skipped_steps"] == 2
    torch.testing.assert_close(nan_model.w, clean_model.w, rtol=0, atol=0)
    assert int(nan_opt.state[nan_model.w]["step"]) == 3


def test_fused_path_stops_a_diverged_run_with_a_clear_message():
    batches = [(torch.ones(2, 3, 4, 4), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
               for _ in range(6)]
    model = NanAt({2, 3, 4})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with pytest.raises(UserError, match="3 non-finite losses in a row in epoch 7; lower --lr"):
        train_one_epoch(model, batches, opt, None, torch.device("cpu"), 7, guard=NonFiniteGuard(3))
