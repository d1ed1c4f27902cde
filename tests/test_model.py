"""Detector builder: the reference's parameter counts, every head x mode x family on tiny backbones, the no-resize
transform, the feature cache, fine-tuning, dtypes and memory formats."""

import json
import math
import warnings

import pytest
import torch

from src.detection.core.errors import UserError
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig
from src.detection.modeling.detector import count_parameters
from src.detection.modeling.heads import (
    HEAD_CONVS,
    HEAD_SEPARABLE,
    group_norm_in_input_dtype,
    num_extra_levels,
    ssd_scales,
)

W, H = 128, 96  # non-square on purpose: (width, height) as --imgsz W H
NUM_CLASSES = 4
TINY = {  # tiny architectures of the two families (random init, fast on CPU)
    "convnext": ("dinov3_convnext_atto", {"depths": [1, 1, 1, 1], "dims": [32, 64, 96, 128]}),
    "vit": ("dinov3_vit_tiny", {"embed_dim": 64, "depth": 4, "num_heads": 4}),
}
HEADS = ["retinanet", "ssd", "fcos"]
MODES = ["last", "multi"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster, and far faster on a loaded machine (no thread contention)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backbone warns about random weights on every build
        yield


def tiny(family="convnext", head="retinanet", mode="multi", imgsz=(W, H), **kw) -> DetectorConfig:
    name, arch = TINY[family]
    kw.setdefault("fpn_channels", 64)
    return DetectorConfig(name, NUM_CLASSES, head=head, feature_extractor=mode, imgsz=imgsz, arch_overrides=arch,
                          **kw)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_detector(cfg, verbose=False)


def images(b=2, w=W, h=H, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 5.0, 120.0, 40.0]]), "labels": torch.tensor([1, 3])},
            {"boxes": torch.tensor([[30.0, 20.0, 90.0, 90.0]]), "labels": torch.tensor([2])}]


# ------------------------------------------------------------------------------------------- parameter counts
def test_seed_parameter_counts_exact(capsys):
    """The reference project's model: convnext_tiny + single-level RetinaNet, 21 classes."""
    with torch.device("meta"):  # exact counts without allocating 73M parameters
        model = build_detector(DetectorConfig("dinov3_convnext_tiny", 21, head="retinanet", feature_extractor="last"))
    out = capsys.readouterr().out.splitlines()
    assert out == ["72,885,975 total parameters.", "45,065,847 training parameters."]
    assert count_parameters(model) == (72_885_975, 45_065_847)
    assert model.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert model.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),)
    assert model.nms_thresh == 0.45
    # the frozen part is exactly the backbone
    assert sum(p.numel() for p in model.dino.parameters()) == 72_885_975 - 45_065_847
    assert not any(p.requires_grad for p in model.dino.parameters())


def test_single_level_ssd_parameter_counts():
    """`last` SSD is one real level (the reference declared 6 levels for one map); counts stated in the README."""
    with torch.device("meta"):
        model = build_detector(DetectorConfig("dinov3_convnext_tiny", 21, head="ssd", feature_extractor="last"),
                               verbose=False)
    assert count_parameters(model) == (28_857_078, 1_036_950)
    assert len(model.head.classification_head.module_list) == 1
    assert model.anchor_generator.num_anchors_per_location() == [6]


# ------------------------------------------------------------------------------------ forward / backward
@pytest.mark.parametrize("family", ["convnext", "vit"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_forward_backward_grads_only_outside_backbone(family, head, mode):
    model = build(tiny(family, head, mode))
    model.train()
    assert not model.dino.model.training, "a frozen backbone must stay in eval mode under model.train()"
    losses = model(images(), targets())
    expected = {"retinanet": {"classification", "bbox_regression"}, "ssd": {"classification", "bbox_regression"},
                "fcos": {"classification", "bbox_regression", "bbox_ctrness"}}[head]
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    dino_ids = {id(p) for p in model.dino.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in model.dino.parameters())
    new = [(n, p) for n, p in model.named_parameters() if id(p) not in dino_ids]
    assert new and all(p.requires_grad for _, p in new)
    missing = [n for n, p in new if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for _, p in new)
    # `last`: the backbone's own map; `multi`: P3..P7 (at 128x96 SSD needs no extra level: P7 is already 1x1)
    last_stride = model.dino.output_shape()["last"][0].stride
    assert model.backbone.strides == ([last_stride] if mode == "last" else [8, 16, 32, 64, 128])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_eval_boxes_inside_non_square_image(family, head):
    model = build(tiny(family, head, "multi", score_thresh=0.0, max_det=50)).eval()
    with torch.no_grad():
        out = model(images(b=2))
    assert len(out) == 2
    for det in out:
        boxes = det["boxes"]
        assert boxes.shape[0] > 0 and boxes.shape[0] <= 50 and boxes.dtype == torch.float32
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        assert det["scores"].shape == det["labels"].shape == boxes.shape[:1]


# ------------------------------------------------------------------------------------------------ transform
@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_transform_never_resizes_and_normalizes_once(family):
    model = build(tiny(family, "retinanet", "last")).eval()
    t = model.transform
    batch, _ = t(torch.full((2, 3, H, W), 255, dtype=torch.uint8))
    assert batch.image_sizes == [(H, W)] * 2 and tuple(batch.tensors.shape) == (2, 3, H, W)
    mean, std = torch.tensor(model.dino.mean), torch.tensor(model.dino.std)
    torch.testing.assert_close(batch.tensors[0, :, 0, 0], (1 - mean) / std)
    # a size that is not a multiple of the stride: kept as the image size, padded (not resized) for the backbone
    odd, _ = t(images(b=1, w=100, h=75))
    stride = model.dino.output_shape()["last"][0].stride
    assert model.transform.size_divisible == stride
    assert odd.image_sizes == [(75, 100)]
    assert tuple(odd.tensors.shape[-2:]) == (math.ceil(75 / stride) * stride, math.ceil(100 / stride) * stride)
    assert (odd.tensors[..., 75:, :] == 0).all() and (odd.tensors[..., :, 100:] == 0).all()
    # the reference's anchors: 15 per location of the single last map, for exactly this image size
    feats = model.backbone(batch.tensors)
    anchors = model.anchor_generator(batch, list(feats.values()))
    assert anchors[0].shape == ((H // stride) * (W // stride) * 15, 4)
    centers = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
    assert centers[:, 0].max() < W and centers[:, 1].max() < H


def test_postprocess_keeps_input_coordinates():
    """torchvision would map boxes back through a resize; ours never resized, so boxes are left as they are."""
    model = build(tiny()).eval()
    result = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]])}]
    out = model.transform.postprocess(result, [(H, W)], [(2 * H, 2 * W)])
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[1.0, 2.0, 30.0, 40.0]]))


@pytest.mark.parametrize("head", HEADS)
def test_uint8_float_and_list_inputs_agree(head):
    model = build(tiny("convnext", head, "multi", score_thresh=0.0)).eval()
    x = images(b=2)
    with torch.no_grad():
        a = model(x)
        b = model(x.float() / 255)
        c = model(list(x))
    for da, db, dc in zip(a, b, c):
        assert da["boxes"].shape[0] > 0
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(da[k], db[k])
            torch.testing.assert_close(da[k], dc[k])


def test_targets_are_not_modified_and_accept_tv_tensors():
    from torchvision import tv_tensors

    model = build(tiny()).train()
    tg = targets()
    tg[0]["boxes"] = tv_tensors.BoundingBoxes(tg[0]["boxes"], format="XYXY", canvas_size=(H, W))
    before = tg[0]["boxes"].clone()
    losses = model(images(), tg)
    assert all(torch.isfinite(v) for v in losses.values())
    assert isinstance(tg[0]["boxes"], tv_tensors.BoundingBoxes) and torch.equal(tg[0]["boxes"], before)


# -------------------------------------------------------------------------------------------- imgsz / settings
def test_imgsz_sets_ssd_default_boxes_and_extra_levels():
    small = build(tiny("convnext", "ssd", "multi", imgsz=(W, H)))
    big = build(tiny("convnext", "ssd", "multi", imgsz=(640, 480)))
    assert small.anchor_generator.scales != big.anchor_generator.scales
    assert big.anchor_generator.scales[0] == pytest.approx(4 * 8 / 480)
    # 640x480: P7 (stride 128) is a 4x5 grid -> 3 extra stride-2 levels reach 1x1
    assert num_extra_levels((4, 5)) == 3 and num_extra_levels((1, 1)) == 0
    assert len(big.head.classification_head.module_list) == 5 + 3
    assert len(small.head.classification_head.module_list) == 5
    assert ssd_scales([8, 16], 64) == [0.5, 1.0, 1.0]
    # an extra level really runs: 256x192 -> P7 grid 2x2 -> one extra 1x1 level
    model = build(tiny("convnext", "ssd", "multi", imgsz=(256, 192), score_thresh=0.0)).eval()
    feats = model.backbone(model.transform(images(b=1, w=256, h=192))[0].tensors)
    assert [tuple(f.shape[-2:]) for f in feats.values()][-2:] == [(2, 2), (1, 1)]
    with torch.no_grad():
        out = model(images(b=1, w=256, h=192))
    assert out[0]["boxes"][:, 2].max() <= 256 and out[0]["boxes"][:, 3].max() <= 192


@pytest.mark.parametrize("head", HEADS)
def test_detection_settings_are_wired(head):
    model = build(tiny("vit", head, "multi", nms=0.3, score_thresh=0.0, max_det=3)).eval()
    assert (model.nms_thresh, model.score_thresh, model.detections_per_img) == (0.3, 0.0, 3)
    with torch.no_grad():
        out = model(images(b=1))
    assert out[0]["boxes"].shape[0] == 3


@pytest.mark.parametrize("head", HEADS)
def test_background_class_is_never_predicted(head):
    model = build(tiny("convnext", head, "multi", score_thresh=0.0, max_det=1000)).eval()
    with torch.no_grad():
        out = model(images(b=2))
    labels = torch.cat([o["labels"] for o in out])
    assert labels.numel() > 0 and bool((labels > 0).all())


def test_config_round_trip_and_errors():
    cfg = DetectorConfig("dinov3_vits16", 21, head="fcos", imgsz=[320, 240], arch_overrides={"depth": (2,)})
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain types only
    assert d["imgsz"] == [320, 240] and d["arch_overrides"] == {"depth": [2]}
    back = DetectorConfig.from_dict({**d, "classes": ["__background__", "a"], "letterbox": False})
    assert back.imgsz == (320, 240) and back.head == "fcos" and back.to_dict() == d
    assert DetectorConfig("dinov3_vits16", 3, imgsz=512).imgsz == (512, 512)
    with pytest.raises(UserError, match="--head 'yolo'"):
        DetectorConfig("dinov3_vits16", 21, head="yolo")
    with pytest.raises(UserError, match="--feature-extractor"):
        DetectorConfig("dinov3_vits16", 21, feature_extractor="all")
    with pytest.raises(UserError, match="--nms"):
        DetectorConfig("dinov3_vits16", 21, nms=1.5)
    with pytest.raises(UserError, match="__background__"):
        DetectorConfig("dinov3_vits16", 1)
    with pytest.raises(UserError, match="--fpn-channels 48"):
        DetectorConfig("dinov3_vits16", 21, fpn_channels=48)
    with pytest.raises(UserError, match="model_name"):
        DetectorConfig.from_dict({"num_classes": 3})


# ------------------------------------------------------------------------------------------------ feature cache
@pytest.mark.parametrize("family,head,mode", [("convnext", "retinanet", "multi"), ("vit", "fcos", "multi"),
                                              ("convnext", "ssd", "last")])
def test_cached_features_give_identical_losses(family, head, mode, monkeypatch):
    model = build(tiny(family, head, mode)).train()
    x, tg = images(), targets()
    feats = model.backbone_features(x)
    assert [f.shape[1] for f in feats] == [s.channels for s in model.dino.output_shape()[mode]]
    assert all(not f.requires_grad for f in feats)
    reference = model(x, tg)
    sum(reference.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran although cached features were given")

    monkeypatch.setattr(model.dino, "forward_last", no_backbone)
    monkeypatch.setattr(model.dino, "forward_multi", no_backbone)
    with model.cached_features(feats):
        cached = model(torch.zeros_like(x), tg)
    assert cached.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(cached[k], reference[k], rtol=0, atol=0)
    sum(cached.values()).backward()
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g)
    # fp16 storage (what the cache keeps) still runs and stays close
    with model.cached_features([f.half() for f in feats]):
        half = model(torch.zeros_like(x), tg)
    for k in reference:
        assert abs(float(half[k]) - float(reference[k])) < 0.05 * abs(float(reference[k])) + 1e-3
    # outside the block the backbone is needed again
    with pytest.raises(AssertionError, match="backbone ran"):
        model(x, tg)


def test_cached_features_shape_mismatch_is_an_error():
    model = build(tiny()).train()
    feats = model.backbone_features(images(b=2))
    with model.cached_features(feats[:1]), pytest.raises(ValueError, match="cached features"):
        model(images(b=2), targets())
    with model.cached_features(feats), pytest.raises(ValueError, match="batch of 1"):
        model(images(b=1), targets()[:1])


def test_fine_tune_trains_the_backbone():
    model = build(tiny("vit", "retinanet", "last", fine_tune=True)).train()
    assert model.dino.model.training
    sum(model(images(), targets()).values()).backward()
    grads = [p.grad for p in model.dino.parameters()]
    assert grads and all(p.requires_grad for p in model.dino.parameters())
    assert sum(g is not None for g in grads) > 0.9 * len(grads)
    with pytest.raises(UserError, match="fine-tune"):
        model.backbone_features(images())


# ------------------------------------------------------------------------------------ dtypes / memory format
@pytest.mark.parametrize("family", ["convnext", "vit"])
@pytest.mark.parametrize("head", HEADS)
def test_bf16_autocast_and_channels_last(head, family):
    model = build(tiny(family, head, "multi", score_thresh=0.0)).to(memory_format=torch.channels_last)
    x = images().contiguous(memory_format=torch.channels_last)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(x, targets())
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        batch = model.transform(x)[0]
        feats = [f.bfloat16() for f in model.backbone(batch.tensors).values()]
        anchors_bf16 = model.anchor_generator(batch, feats)
    assert anchors_bf16[0].dtype == torch.float32  # pixel coordinates never in bf16
    for det, r in zip(out, ref):
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape[0] > 0
        assert (det["boxes"][:, 2] <= W).all() and (det["boxes"][:, 3] <= H).all()
        # same best-scoring box within bf16 noise
        assert abs(float(det["scores"][0]) - float(r["scores"][0])) < 0.05


# ------------------------------------------------------------------------------------------------ head depth
def _tower_convs(branch) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in branch.conv.modules())


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_head_convs_sets_both_towers_with_torchvision_names(head, n):
    """A head of depth n is torchvision's head with only conv.0..n-1 in each tower: its state dict loads into
    torchvision's own 4-conv head (GroupNorm, as the multi-level recipe) with exactly the deeper layers missing."""
    from functools import partial

    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead

    model = build(tiny(head=head, head_convs=n, head_separable=False))
    assert model.config.head_convs == n
    for branch in (model.head.classification_head, model.head.regression_head):
        assert _tower_convs(branch) == n
    c, anchors = 64, model.anchor_generator.num_anchors_per_location()[0]
    if head == "fcos":
        full = FCOSHead(c, anchors, NUM_CLASSES)
    else:
        full = RetinaNetHead(c, anchors, NUM_CLASSES, norm_layer=partial(torch.nn.GroupNorm, 32))
    result = full.load_state_dict(model.head.state_dict(), strict=False)
    assert not result.unexpected_keys
    deeper = {k for k in full.state_dict() if ".conv." in k and int(k.split(".conv.")[1].split(".")[0]) >=
              (3 * n if head == "fcos" else n)}  # FCOS towers are flat (conv, norm, relu) x n
    assert set(result.missing_keys) == deeper
    losses = model(images(), targets())
    assert all(torch.isfinite(v) for v in losses.values())


def test_head_convs_defaults_and_parameter_counts():
    """`last` keeps torchvision's 4 convs (the reference's head); `multi` uses HEAD_CONVS['multi']; each conv layer
    left out takes away exactly one 3x3 conv + GroupNorm per branch."""
    assert HEAD_CONVS["last"] == 4
    for head in ("retinanet", "fcos"):
        assert build(tiny(head=head, mode="last")).config.head_convs == 4
        default = build(tiny(head=head))
        assert default.config.head_convs == HEAD_CONVS["multi"]
        four = build(tiny(head=head, head_convs=4, head_separable=False))
        c = 64
        bias = c if head == "fcos" else 0  # torchvision's RetinaNet tower convs have no bias before a norm
        per_layer = 2 * (9 * c * c + bias + 2 * c)  # two branches x (conv, GroupNorm affine)
        two = build(tiny(head=head, head_convs=2, head_separable=False))
        assert count_parameters(four)[1] - count_parameters(two)[1] == 2 * per_layer
    assert build(tiny(head="ssd")).config.head_convs is None


def _stored_config(meta: dict) -> DetectorConfig:
    """The config of checkpoint metadata of the oldest format (upgraded where every stored form is read)."""
    from src.detection.checkpoint import load_card

    return load_card({**meta, "classes": ["__background__"]}).detector


def test_head_convs_config_round_trip_and_older_metadata():
    """The built depth is recorded; metadata written before the field existed means torchvision's 4 convs, so
    such checkpoints keep loading strictly."""
    model = build(tiny(head="fcos", head_convs=1))
    d = model.config.to_dict()
    assert d["head_convs"] == 1 and DetectorConfig.from_dict(d).head_convs == 1
    old = build(tiny(head="fcos", head_convs=4))
    legacy = {k: v for k, v in old.config.to_dict().items() if k != "head_convs"}
    rebuilt = build(_stored_config(legacy))
    rebuilt.load_state_dict(old.state_dict(), strict=True)
    ssd_meta = {k: v for k, v in build(tiny(head="ssd")).config.to_dict().items() if k != "head_convs"}
    assert _stored_config(ssd_meta).head_convs is None
    with pytest.raises(UserError, match="--head-convs 5"):
        tiny(head="fcos", head_convs=5)
    with pytest.raises(UserError, match="--head-convs 2: the SSD head"):
        tiny(head="ssd", head_convs=2)


def _dense_convs(head) -> dict[str, torch.nn.Conv2d]:
    return {n: m for n, m in head.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_separable_head_replaces_every_dense_conv(head):
    """Each dense 3x3 head conv becomes depthwise 3x3 + pointwise 1x1 that together compute the same map as
    conv2d(conv2d(x, dw, groups=C), pw); the parameter saving is exactly 9*cin*cout - 9*cin - cin*cout per conv,
    the classification prior bias survives, and the head trains."""
    dense = build(tiny(head=head, head_separable=False))
    sep = build(tiny(head=head, head_separable=True))
    assert sep.config.head_separable is True and dense.config.head_separable is False
    convs = _dense_convs(dense.head)
    assert all(m.groups == 1 for m in convs.values())
    assert set(_dense_convs(sep.head)) == {f"{n}.depthwise" for n in convs}
    for m in sep.head.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            assert m.groups == m.in_channels == m.out_channels
    saved = sum(9 * c.in_channels * c.out_channels - 9 * c.in_channels - c.in_channels * c.out_channels
                for c in convs.values())
    assert count_parameters(dense)[1] - count_parameters(sep)[1] == saved
    cls = sep.head.classification_head.cls_logits
    torch.testing.assert_close(cls.pointwise.bias, dense.head.classification_head.cls_logits.bias)
    x = torch.randn(1, cls.depthwise.in_channels, 9, 7)
    expected = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, cls.depthwise.weight, padding=1,
                                                                     groups=x.shape[1]),
                                          cls.pointwise.weight, cls.pointwise.bias)
    torch.testing.assert_close(cls(x), expected)

    sep.train()
    opt = torch.optim.AdamW([p for p in sep.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = sum(sep(images(), targets()).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_separable_head_config_round_trip_and_older_metadata():
    """The choice is recorded and rebuilt; metadata from before the field means dense convs (strict load); the
    reference's `last` head and SSD stay dense."""
    model = build(tiny(head="retinanet", head_separable=True))
    d = model.config.to_dict()
    assert d["head_separable"] is True
    build(DetectorConfig.from_dict(d)).load_state_dict(model.state_dict(), strict=True)
    dense = build(tiny(head="fcos", head_separable=False))
    legacy = {k: v for k, v in dense.config.to_dict().items() if k != "head_separable"}
    assert _stored_config(legacy).head_separable is False
    build(_stored_config(legacy)).load_state_dict(dense.state_dict(), strict=True)
    assert HEAD_SEPARABLE["last"] is False
    assert build(tiny(head="retinanet", mode="last")).config.head_separable is False
    assert build(tiny(head="fcos")).config.head_separable is HEAD_SEPARABLE["multi"]
    assert build(tiny(head="ssd")).config.head_separable is None
    with pytest.raises(UserError, match="--head-separable: the SSD head"):
        tiny(head="ssd", head_separable=True)


# ------------------------------------------------------------------------------------------------ head registry
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", HEADS)
def test_every_registered_head_builds_exports_decodes_and_has_its_loss(name, mode):
    """Each registry entry builds its detector for `last` and `multi`; the head returns exactly the outputs the entry
    declares for ONNX, which ExportGraph exports and the entry's decoding turns into the model's own detections; its
    loss function on those outputs equals what the model computes in training."""
    from src.detection.inference.export import ExportGraph
    from src.detection.inference.onnx_runtime import DetectionDecoder, output_names
    from src.detection.modeling.heads import ANCHOR_OUTPUTS, HEAD_TYPES
    from src.detection.modeling.losses import pad_targets

    assert set(HEAD_TYPES) == set(HEADS)
    kind = HEAD_TYPES[name]
    model = build(tiny("convnext", name, mode, score_thresh=0.0))
    assert isinstance(model, kind.detector_class) and model.config.head == name
    assert model.input_spec.fixed_aspect == kind.fixed_aspect
    assert (model.config.head_convs is not None) == kind.has_tower
    assert output_names(name) == [*kind.onnx_outputs, *ANCHOR_OUTPUTS] == list(kind.output_names)

    x, tg = images(), targets()
    model.eval()
    with torch.no_grad():
        want = model(x)
        graph = ExportGraph(model)
        assert graph.names == kind.onnx_outputs
        outputs = dict(zip(kind.output_names, graph(x)))
    decoder = DetectionDecoder(name, NUM_CLASSES, model.score_thresh, model.nms_thresh, model.detections_per_img,
                               model.topk_candidates)
    for w, g in zip(want, decoder(outputs, x.shape[-2:])):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(w[k], g[k]), k

    model.train()
    image_list, _ = model.transform(x)
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    assert set(head_outputs) == set(kind.onnx_outputs)
    anchors = model.anchor_generator(image_list, features)[0]
    per_level = [f.shape[-2] * f.shape[-1] * anchors.shape[0] // sum(g.shape[-2] * g.shape[-1] for g in features)
                 for f in features]
    gt_boxes, gt_labels, gt_valid = pad_targets(tg)
    got = kind.loss(head_outputs, anchors, per_level, gt_boxes, gt_labels, gt_valid, **kind.loss_options(model))
    expected = model(x, tg)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head,mode", [("retinanet", "multi"), ("retinanet", "last"), ("fcos", "multi"),
                                       ("ssd", "multi"), ("ssd", "last")])
def test_batch_forward_equals_torchvision_forward(head, mode):
    """Inference on a ``[B, 3, H, W]`` batch goes through ``head_forward`` + ``detect`` (the part a CUDA graph can
    hold, then post-processing); torchvision's own forward (the oracle) gives the same detections."""
    model = build(tiny(head=head, mode=mode, score_thresh=0.0)).eval()
    for m in model.head.modules():  # spread the logits so many candidates pass and NMS has work
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    batch = images(3, seed=4)
    with torch.no_grad():
        ours = model(batch)
        theirs = type(model).__mro__[2].forward(model, list(batch))  # torchvision's class, after DinoDetector
    assert type(model).__mro__[2].__module__.startswith("torchvision")
    assert sum(len(d["scores"]) for d in theirs) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("head,mode,separable,n", [
    ("retinanet", "multi", False, 4), ("retinanet", "multi", True, 4), ("retinanet", "last", False, 4),
    ("fcos", "multi", False, 4), ("fcos", "multi", True, 2), ("fcos", "last", False, 4), ("retinanet", "multi", False, 0),
])
def test_merged_towers_equal_torchvision_head_forward(head, mode, separable, n):
    """The head runs both branches as one tower of grouped convs; torchvision's own per-branch forward (the oracle)
    gives the same outputs and the same parameter gradients."""
    model = build(tiny(head=head, mode=mode, head_separable=separable, head_convs=n))
    torch.manual_seed(1)
    feats = [torch.randn(2, c, h, w) for c, (h, w) in zip([model.backbone.out_channels] * 5,
                                                          [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)])]
    feats = feats[:1] if mode == "last" else feats
    results = {}
    for merge in (True, False):
        model.head.merge_branches = merge
        model.head.zero_grad(set_to_none=True)
        out = model.head(feats)
        sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values()).backward()
        results[merge] = out, {k: p.grad.clone() for k, p in model.head.named_parameters() if p.grad is not None}
    (merged, merged_grads), (oracle, oracle_grads) = results[True], results[False]
    assert merged.keys() == oracle.keys() and merged_grads.keys() == oracle_grads.keys()
    for k in oracle:
        torch.testing.assert_close(merged[k], oracle[k], rtol=1e-5, atol=1e-6)
    for k in oracle_grads:
        torch.testing.assert_close(merged_grads[k], oracle_grads[k], rtol=1e-5, atol=1e-6)
    assert len(oracle_grads) == len(dict(model.head.named_parameters()))  # every parameter took part


def test_group_norm_in_the_autocast_dtype():
    """Under autocast, a bf16 activation is normalised in bf16 (statistics in fp32 inside the kernel), close to the
    fp32 GroupNorm, and the fp32 affine parameters still get their gradients; outside autocast it is the plain
    GroupNorm, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 16, 6, 5, generator=g) * 3 + 1
    w = (torch.rand(16, generator=g) + 0.5).requires_grad_()
    b = torch.randn(16, generator=g).requires_grad_()
    assert torch.equal(group_norm_in_input_dtype(x32, 4, w, b, 1e-5), torch.nn.functional.group_norm(x32, 4, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_norm_in_input_dtype(x32.bfloat16(), 4, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    low = (w.grad.clone(), b.grad.clone())
    w.grad = b.grad = None
    ref = torch.nn.functional.group_norm(x32.bfloat16().float(), 4, w, b, 1e-5)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output and affine
    assert low[0].dtype == torch.float32
    torch.testing.assert_close(low[0], w.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(low[1], b.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_merged_towers_with_low_precision_norm(head, monkeypatch):
    """``low_precision_norm`` routes the tower's GroupNorms through ``group_norm_in_input_dtype``, changes nothing
    in fp32 and stays within bf16 rounding of torchvision's head under bf16 autocast, with a gradient for every
    parameter."""
    from src.detection.modeling import heads

    calls = []
    monkeypatch.setattr(heads, "group_norm_in_input_dtype",
                        lambda *a, **k: calls.append(1) or group_norm_in_input_dtype(*a, **k))
    model = build(tiny(head=head, mode="multi"))
    torch.manual_seed(1)
    feats = [torch.randn(2, model.backbone.out_channels, h, w) for h, w in [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]]
    model.head.merge_branches = True
    plain = model.head(feats)
    assert not calls
    model.head.low_precision_norm = True
    low = model.head(feats)
    assert len(calls) == 4 * 5  # 4 tower GroupNorms x 5 levels
    assert all(torch.equal(low[k], plain[k]) for k in plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.head(feats)
        model.head.merge_branches, model.head.low_precision_norm = False, False
        oracle = model.head(feats)
    for k in oracle:
        torch.testing.assert_close(low[k], oracle[k], rtol=0.05, atol=0.05)
    model.head.zero_grad(set_to_none=True)
    model.head.merge_branches, model.head.low_precision_norm = True, True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sum(v.float().sum() for v in model.head(feats).values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())
