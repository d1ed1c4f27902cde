"""Unit tests of the training engine pieces: LR schedule, non-finite guard, EMA, epoch-keyed sampling, cache."""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from src.detection.core.errors import UserError
from src.detection.data.sampling import EpochSampler, EpochSeededDataset, ShardSampler
from src.detection.engine.loop import (
    ModelEMA,
    NonFiniteGuard,
    build_optimizer,
    build_scheduler,
    lr_factor,
    train_one_epoch,
)


def test_lr_schedule_warmup_then_cosine_step_multistep():
    kw = dict(total_iters=100, iters_per_epoch=10, warmup_iters=10, steps=[5, 8])
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.001)
    assert lr_factor(5, schedule="cosine", **kw) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)
    assert lr_factor(99, schedule="cosine", **kw) < 0.02
    assert lr_factor(49, schedule="multistep", **kw) == 1.0
    assert lr_factor(50, schedule="multistep", **kw) == pytest.approx(0.1)
    assert lr_factor(85, schedule="multistep", **kw) == pytest.approx(0.01)
    assert lr_factor(50, schedule="step", **kw) == pytest.approx(0.1)  # step every 5 epochs
    assert lr_factor(50, schedule="none", **kw) == 1.0


def test_scheduler_drives_the_optimizer_per_iteration():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.01)
    sched = build_scheduler(opt, schedule="cosine", epochs=2, iters_per_epoch=5, warmup_iters=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(0.1) and lrs[-1] < lrs[5]
    # no weight decay on biases / norms
    decays = {g["weight_decay"] for g in opt.param_groups if any(p.ndim == 1 for p in g["params"])}
    assert decays == {0.0}
    with pytest.raises(UserError, match="--lr-steps"):
        build_scheduler(opt, schedule="multistep", epochs=2, iters_per_epoch=5)


class ToyDetector(nn.Module):
    """Stands in for a detector: returns a loss dict; NaN for the batches listed in ``nan_at``."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls, self.nan_at = 0, set(nan_at)

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w * images.float().mean()) ** 2
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return {"loss_a": loss, "loss_b": loss * 0.5}


def batches(n):
    return [(torch.ones(2, 3, 4, 4), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
            for _ in range(n)]


def test_non_finite_steps_are_skipped_and_reported():
    model = ToyDetector(nan_at={2, 4})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.w.detach().clone()
    out = train_one_epoch(model, batches(5), opt, None, torch.device("cpu"), 1)
    assert out["skipped_steps"] == 2
    assert math.isfinite(out["train_loss"]) and set(out) >= {"loss_a", "loss_b", "train_loss"}
    assert not torch.equal(before, model.w.detach())


def test_too_many_non_finite_steps_stop_with_a_clear_message():
    model = ToyDetector(nan_at={1, 2, 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(UserError, match="3 non-finite losses in a row in epoch 7; lower --lr"):
        train_one_epoch(model, batches(5), opt, None, torch.device("cpu"), 7, guard=NonFiniteGuard(3))


def test_ema_tracks_trainable_weights_and_swaps_for_eval():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = ModelEMA(model, decay=0.5, warmup=1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    live = model[0].weight.detach().clone()
    with ema.swapped_in(model):
        inside = model[0].weight.detach().clone()
    assert not torch.allclose(inside, live)  # averaged weights are in use inside the block
    assert torch.equal(model[0].weight, live)  # and restored afterwards
    assert "0.bias" not in ema.shadow
    state = ema.state_dict()
    other = ModelEMA(model, decay=0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow["0.weight"], ema.shadow["0.weight"])


class RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i, torch.rand(()).item()


def test_epoch_keyed_sampling_is_reproducible_and_sharded():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(3)
    assert [i for _, i in first] != [i for _, i in s]
    s.set_epoch(2)
    assert list(s) == first and sorted(i for _, i in first) == list(range(10))
    ds = EpochSeededDataset(RandomDataset(), seed=3)
    assert ds[(2, 5)] == ds[(2, 5)] and ds[(2, 5)] != ds[(3, 5)]
    # DDP: equal-length shards covering everything
    shards = []
    for r in range(3):
        sh = EpochSampler(10, seed=3, rank=r, world_size=3)
        sh.set_epoch(1)
        shards.append([i for _, i in sh])
    assert {len(x) for x in shards} == {4} and set(sum(shards, [])) == set(range(10))
    assert sorted(sum((list(ShardSampler(10, r, 3)) for r in range(3)), [])) == list(range(10))


def _tiny_data(tmp_path, n_train=6, n_valid=3):
    from src.detection.data.datasets import load_data_config
    from src.detection.data.synthetic import generate_dataset

    return load_data_config(generate_dataset(tmp_path / "d", n_train, n_valid, imgsz=64, seed=0))


def _tiny_model(num_classes, imgsz, letterbox=False):
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights: intended here
        return build_detector(DetectorConfig("dinov3_convnext_atto", num_classes, head="fcos", imgsz=imgsz,
                                             fpn_channels=64, letterbox=letterbox), verbose=False)


@pytest.mark.parametrize("letterbox", [False, True])
def test_cached_samples_are_the_live_pipelines_samples(tmp_path, letterbox):
    """For every (seed, epoch, index) the cache holds the live pipeline's boxes and the backbone maps of the live
    pipeline's image (flip first, then resize / pad bottom-right), in both resize modes; validation likewise."""
    from src.detection.data.datasets import build_datasets, collate_fn
    from src.detection.engine.feature_cache import CachedBatches, FeatureCache

    data = _tiny_data(tmp_path)
    imgsz = (96, 64)  # not the images' aspect ratio: letterbox pads 32 columns
    train_ds, valid_ds = build_datasets(data, imgsz=imgsz, augment="flip", letterbox=letterbox, verbose=False)
    model = _tiny_model(len(data.classes), imgsz, letterbox)
    cache = FeatureCache("ram", flip=True, seed=5)
    cache.build(model, train_ds, [0, 1, 2, 3, 4, 5, 0], torch.device("cpu"), batch_size=4, show=False)
    assert len(cache) == 6  # the repeated (DDP padding) index is computed once
    live = EpochSeededDataset(train_ds, seed=5)
    seen = set()
    with torch.no_grad():
        for epoch in (1, 2, 3):
            for i in range(6):
                image, target = live[(epoch, i)]
                feats, cached = cache[(epoch, i)]
                torch.testing.assert_close(cached["boxes"], target["boxes"].as_subclass(torch.Tensor))
                assert torch.equal(cached["labels"], target["labels"])
                for c, ref in zip(feats, model.backbone_features(image[None])):
                    torch.testing.assert_close(c.float(), ref[0], rtol=2e-3, atol=2e-3)  # fp16 storage
                seen.add(cache.flipped((epoch, i))[1])
        assert seen == {False, True}
        valid = FeatureCache("ram", flip=False, seed=5)
        valid.build(model, valid_ds, [0, 1, 2], torch.device("cpu"), batch_size=2, show=False)
        images, targets, feats = next(iter(CachedBatches(valid, [2, 0], 2, imgsz)))
        live_images, live_targets = collate_fn([valid_ds[2], valid_ds[0]])
        assert images.shape == live_images.shape
        for got, want in zip(targets, live_targets):
            assert set(got) == set(want)
            for k in ("orig_boxes", "orig_labels", "orig_difficult", "labels"):
                assert torch.equal(got[k], want[k]), k
            assert tuple(got["orig_size"]) == tuple(want["orig_size"]) and got["image_id"] == want["image_id"]
        for c, ref in zip(feats, model.backbone_features(live_images)):
            torch.testing.assert_close(c.float(), ref, rtol=2e-3, atol=2e-3)


def test_feature_cache_training_matches_image_training(tmp_path):
    """A step on cached fp16 features gives (almost) the losses of the same step on the live images."""
    from src.detection.data.datasets import build_datasets, collate_fn
    from src.detection.engine.feature_cache import CachedBatches, FeatureCache

    data = _tiny_data(tmp_path, n_train=8)
    train_ds, _ = build_datasets(data, imgsz=(64, 64), augment="flip", verbose=False, splits=("train",))
    model = _tiny_model(len(data.classes), (64, 64))
    cache = FeatureCache("ram", flip=True, seed=0)
    cache.build(model, train_ds, list(range(8)), torch.device("cpu"), batch_size=4, show=False)
    assert cache.nbytes == sum(t.numel() * 2 for t in cache.levels)
    sampler = EpochSampler(8, seed=0)
    sampler.set_epoch(3)
    keys = list(sampler)[:4]
    model.train()
    images, targets = collate_fn([EpochSeededDataset(train_ds, 0)[k] for k in keys])
    direct = model(images, targets)
    cached_images, cached_targets, feats = next(iter(CachedBatches(cache, keys, 4, (64, 64))))
    with model.cached_features(feats):
        from_cache = model(cached_images, cached_targets)
    for k in direct:
        assert from_cache[k].item() == pytest.approx(direct[k].item(), rel=2e-2)


def test_disk_feature_cache_is_reused_until_the_data_changes(tmp_path, capsys):
    """A second start in the same run folder with the same data and model runs no backbone forward and reads the
    same maps; an edited training annotation rebuilds the training cache (the validation one is still reused)."""
    from src.detection.data.datasets import build_datasets, load_data_config
    from src.detection.engine.config import TrainConfig
    from src.detection.engine.training import prepare_feature_cache

    data = _tiny_data(tmp_path, n_train=4, n_valid=2)
    cfg = TrainConfig().replace(cache_features="disk", augment="flip", batch=2, workers=0)
    run_dir = tmp_path / "run"

    def start():
        train_ds, valid_ds = build_datasets(load_data_config(data.path), imgsz=(64, 64), augment="flip",
                                            verbose=False)
        model = _tiny_model(len(data.classes), (64, 64))
        forward, calls = model.backbone_features, []
        model.backbone_features = lambda images: calls.append(len(images)) or forward(images)
        loader, _, valid_loader = prepare_feature_cache(cfg, model, train_ds, valid_ds, torch.device("cpu"), run_dir,
                                                        rank=0, world=1, main=True)
        return sum(calls), loader.dataset, valid_loader.dataset, capsys.readouterr().out, train_ds

    images, first, _, out, train_ds = start()
    assert images == 4 * 2 + 2 and "reusing" not in out  # both flips of 4 training images, 2 validation images
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")}
    boxes = first[0][1]["boxes"]
    again, second, valid, out, _ = start()
    assert again == 0 and out.count("reusing feature cache (key ") == 2 and valid.reused and second.reused
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")} == files  # read, not rewritten
    assert second.nbytes == first.nbytes > 0 and torch.equal(second[0][1]["boxes"], boxes)

    xml = train_ds.records[0].annotation
    xmin = int(ET.parse(xml).find("object/bndbox/xmin").text)
    xml.write_text(xml.read_text().replace(f"<xmin>{xmin}<", f"<xmin>{xmin + 1}<", 1))  # one box edge moves
    rebuilt, third, valid, out, _ = start()
    assert rebuilt == 4 * 2 and out.count("reusing feature cache (key ") == 1 and valid.reused
    assert not third.reused and third.key != second.key
    assert not torch.equal(third[0][1]["boxes"], boxes)


def test_padded_shards_give_every_rank_the_same_number_of_steps():
    from src.detection.data.sampling import padded_shard

    for n, world in ((17, 2), (5, 4), (8, 3), (1, 2)):
        shards = [padded_shard(n, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
        assert set(sum(shards, [])) == set(range(n))


def test_ema_weights_for_saving_do_not_alias_the_live_ones():
    model = nn.Sequential(nn.Linear(2, 2))
    ema = ModelEMA(model, decay=0.5, warmup=1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    saved = ema.averaged(model.state_dict())
    torch.testing.assert_close(saved["0.weight"], ema.shadow["0.weight"])
    assert not torch.allclose(saved["0.weight"], model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on: the saved copy must not follow
    torch.testing.assert_close(saved["0.weight"], ema.shadow["0.weight"])


def test_layer_decay_gives_earlier_backbone_layers_smaller_learning_rates():
    model = _tiny_model(4, (64, 64))
    model.dino.set_trainable(2)  # the last 2 of 4 ConvNeXt stages (+ final norm)
    opt = build_optimizer(model, "adamw", 1e-3, 0.01, backbone_lr=1e-4, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    groups = model.dino.layer_groups()
    assert len(groups) == 2
    assert {lr_of[id(p)] for p in groups[1]} == {1e-4} and {lr_of[id(p)] for p in groups[0]} == {5e-5}
    backbone = {id(p) for p in model.dino.parameters()}
    assert {lr for i, lr in lr_of.items() if i not in backbone} == {1e-3}
    assert set(lr_of) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.slow
def test_compiled_training_step_runs_the_compiled_module():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from src.detection.engine.training import compile_for_training

    model = _tiny_model(3, (64, 64))
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_for_training(model, "eager")
    opt = build_optimizer(model, "adamw", 1e-3, 0.01)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    out = train_one_epoch(compiled, [(images, targets)], opt, None, torch.device("cpu"), 1)
    assert math.isfinite(out["train_loss"])
    assert counters["stats"]["calls_captured"] > 0  # dynamo traced the module the step called
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # and it trained the real model
    torch._dynamo.reset()


def test_fine_tune_backbone_gets_its_own_learning_rate():
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    model = build_detector(DetectorConfig("dinov3_convnext_atto", 4, head="fcos", imgsz=(64, 64), fpn_channels=64,
                                          fine_tune=True), verbose=False)
    opt = build_optimizer(model, "adamw", 1e-3, 0.01, backbone_lr=1e-5)
    backbone = {id(p) for p in model.dino.parameters()}
    for group in opt.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == (1e-5 if in_backbone.pop() else 1e-3)
    frozen = build_detector(DetectorConfig("dinov3_convnext_atto", 4, head="fcos", imgsz=(64, 64), fpn_channels=64),
                            verbose=False)
    n_opt = sum(len(g["params"]) for g in build_optimizer(frozen, "sgd", 1e-3, 0.0).param_groups)
    assert n_opt == sum(p.requires_grad for p in frozen.parameters()) and not any(
        p.requires_grad for p in frozen.dino.parameters())


def test_resume_takes_the_optimizer_state_of_an_unfused_optimizer():
    """Checkpoints of earlier versions hold a plain (unfused) AdamW's state: resuming keeps this build's step."""
    from src.detection.engine.training import restore_training_state

    model = ToyDetector()
    old = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    loss = sum(model(*batches(1)[0]).values())
    loss.backward()
    old.step()
    ckpt = {"path": "old.pth", "meta": {}, "model": model.state_dict(), "optimizer": old.state_dict(), "epoch": 1,
            "best_metric": 0.5}
    opt = build_optimizer(model, "adamw", 0.01, 0.0)
    assert restore_training_state(ckpt, model, opt, None, None, None) == (2, 0.5)
    before = model.w.detach().clone()
    out = train_one_epoch(model, batches(2), opt, None, torch.device("cpu"), 2)
    assert out["skipped_steps"] == 0 and not torch.equal(before, model.w.detach())
