"""Batched RetinaNet / FCOS / SSD post-processing against torchvision's per-image ``postprocess_detections``.

torchvision stays the oracle: tiny torchvision detectors supply ``postprocess_detections``, box coders and anchors;
head outputs are random (scaled so many scores pass the threshold, one image has none), image sizes differ within a
batch (clipping), ``detections_per_img`` cuts or not. Detections must match per image in number, order, labels,
boxes (1e-4) and scores (1e-6). The batched versions must also stay at one host sync and far fewer operator calls.
"""

import functools
from collections import OrderedDict

import pytest
import torch
from sync_guard import count_host_syncs
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead

from src.detection.modeling.postprocess import fcos_postprocess, retinanet_postprocess, split_levels, ssd_postprocess

H, W = 96, 128
GRIDS = [(12, 16), (6, 8), (3, 4)]  # strides 8, 16, 32
C = 5
SIZES = [(96, 128), (80, 100), (96, 61), (50, 128), (90, 117), (64, 64), (96, 128), (33, 90)]  # (h, w), all <= H, W
EMPTY = 2  # this image's logits are so low that nothing passes the threshold
WORST: dict[str, dict[str, float]] = {}  # largest differences seen per head, printed at the end


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (see conftest)."""


class _Backbone(nn.Module):
    """Three maps at strides 8, 16, 32 (``out_channels`` 32: FCOSHead's GroupNorm needs 32 channels)."""

    out_channels = 32

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 8, stride=8)
        self.down = nn.ModuleList([nn.Conv2d(32, 32, 2, stride=2) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = [self.stem(x)]
        for conv in self.down:
            feats.append(conv(feats[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


def _retinanet(**kw) -> RetinaNet:
    generator = AnchorGenerator(((16, 20, 25), (32, 40, 50), (64, 80, 101)), ((0.5, 1.0, 2.0),) * 3)
    return RetinaNet(_Backbone(), C, anchor_generator=generator, head=RetinaNetHead(32, 9, C),
                     min_size=H, max_size=W, **kw).eval()


def _fcos(**kw) -> FCOS:
    generator = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    return FCOS(_Backbone(), C, anchor_generator=generator, head=FCOSHead(32, 1, C), min_size=H, max_size=W,
                **kw).eval()


def _ssd(**kw) -> SSD:
    generator = DefaultBoxGenerator([[2], [2, 3], [2]])
    return SSD(_Backbone(), generator, (W, H), C, head=SSDHead([32] * 3, generator.num_anchors_per_location(), C),
               **kw).eval()


def _settings(model: nn.Module, score_thresh: float, detections_per_img: int, topk_candidates: int) -> dict:
    model.score_thresh = score_thresh
    model.detections_per_img = detections_per_img
    model.topk_candidates = topk_candidates
    return dict(box_coder=model.box_coder, score_thresh=score_thresh, nms_thresh=model.nms_thresh,
                detections_per_img=detections_per_img, topk_candidates=topk_candidates)


def _anchors(model: nn.Module, batch: int) -> list[torch.Tensor]:
    """The model's anchors for a padded ``H x W`` batch: one ``[N, 4]`` per image (all equal)."""
    images = ImageList(torch.zeros(batch, 3, H, W), SIZES[:batch])
    return model.anchor_generator(images, [torch.zeros(batch, 32, h, w) for h, w in GRIDS])


def _logits(shape: tuple[int, ...], seed: int, scale: float, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * scale + shift
    if shape[0] > EMPTY:
        logits[EMPTY] = -20.0
    return logits


def _untie(logits: torch.Tensor, score_fn, seed: int) -> torch.Tensor:
    """``logits`` nudged until no two relevant scores (> 1e-3) of an image are equal.

    Equal float32 scores happen (sigmoid maps neighbouring logits onto one float), and torchvision orders them
    arbitrarily (non-stable sorts, ``topk``), so equal candidates would make the comparison depend on sort internals.
    """
    g = torch.Generator().manual_seed(seed)
    logits = logits.clone()
    for _ in range(50):
        scores = score_fn(logits).flatten(1)
        tied = torch.zeros_like(scores, dtype=torch.bool)
        for i, row in enumerate(scores):
            _, inverse, counts = row.unique(return_inverse=True, return_counts=True)
            tied[i] = (counts[inverse] > 1) & (row > 1e-3)
        if not tied.any():
            return logits
        logits.view(tied.shape)[tied] += torch.randn(int(tied.sum()), generator=g) * 1e-3
    raise AssertionError("could not untie the scores")


def _untie_outputs(head: str, outputs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Head outputs ``[B, N, ...]`` with ``cls_logits`` untied for ``head``'s scores."""
    if head == "retinanet":
        score_fn = torch.sigmoid
    elif head == "fcos":
        ctrness = torch.sigmoid(outputs["bbox_ctrness"])
        score_fn = lambda logits: torch.sqrt(torch.sigmoid(logits) * ctrness)  # noqa: E731
    else:
        foreground = torch.ones(outputs["cls_logits"].shape[-1]).index_fill_(0, torch.tensor(0), 0.0)
        score_fn = lambda logits: torch.softmax(logits, dim=-1) * foreground  # noqa: E731
    return dict(outputs, cls_logits=_untie(outputs["cls_logits"], score_fn, seed))


def _regression(shape: tuple[int, ...], seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    reg = torch.randn(shape, generator=g) * 0.5
    return reg.abs() * 2 if positive else reg  # FCOS: distances to the four sides (in anchor sizes)


def _compare(ours: list[dict], theirs: list[dict], head: str) -> None:
    assert len(ours) == len(theirs)
    worst = WORST.setdefault(head, {"boxes": 0.0, "scores": 0.0, "detections": 0})
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["boxes"].dtype == torch.float32 and a["scores"].dtype == torch.float32
        assert a["labels"].dtype == torch.int64
        assert len(a["scores"]) == len(b["scores"]), f"image {i}: {len(a['scores'])} vs {len(b['scores'])} detections"
        assert torch.equal(a["labels"], b["labels"]), f"image {i}: labels differ"
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6, msg=lambda m, i=i: f"image {i}: {m}")
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4, msg=lambda m, i=i: f"image {i}: {m}")
        if len(a["scores"]):
            worst["boxes"] = max(worst["boxes"], (a["boxes"] - b["boxes"]).abs().max().item())
            worst["scores"] = max(worst["scores"], (a["scores"] - b["scores"]).abs().max().item())
        worst["detections"] += len(a["scores"])


def _background_masked(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """What our detectors feed torchvision: class 0's logit is -inf."""
    out = []
    for level in levels:
        level = level.clone()
        level[..., 0] = float("-inf")
        out.append(level)
    return out


# (score_thresh, detections_per_img, topk_candidates): cut hard / keep all, few candidates per level / all of them
CASES = [(0.05, 10, 1000), (0.05, 300, 1000), (0.5, 10, 40), (0.5, 300, 40), (0.05, 300, 40)]


# ---------------------------------------------------------------------------------------------- RetinaNet / FCOS
def _dense_inputs(head: str, batch: int, seed: int = 0, sparse: bool = False):
    """A tiny detector, random head outputs split per level, anchors per image and level. ``sparse``: few scores
    pass 0.05 (a trained model's regime) instead of thousands per image."""
    model = _retinanet() if head == "retinanet" else _fcos()
    anchors = _anchors(model, batch)
    sizes = [h * w for h, w in GRIDS]
    a = anchors[0].shape[0] // sum(sizes)
    per_level = [n * a for n in sizes]
    n = sum(per_level)
    scale, shift = (1.0, -5.0) if sparse else (2.0, -1.5 if head == "retinanet" else 0.0)
    outputs = {"cls_logits": _logits((batch, n, C), seed, scale, shift),
               "bbox_regression": _regression((batch, n, 4), seed + 1, positive=head == "fcos")}
    if head == "fcos":
        outputs["bbox_ctrness"] = _logits((batch, n, 1), seed + 2, 1.0, 0.0)
    outputs = _untie_outputs(head, outputs, seed)
    split = {k: split_levels(v, per_level) for k, v in outputs.items()}
    return model, split, [split_levels(x, per_level) for x in anchors]


def _ours_dense(head: str, split: dict, level_anchors, image_sizes, settings: dict, mask_background: bool,
                nms_per_image: bool | None = None):
    kw = dict(settings, mask_background=mask_background, nms_per_image=nms_per_image)
    if head == "retinanet":
        return retinanet_postprocess(split["cls_logits"], split["bbox_regression"], level_anchors, image_sizes, **kw)
    return fcos_postprocess(split["cls_logits"], split["bbox_regression"], split["bbox_ctrness"], level_anchors,
                            image_sizes, **kw)


@pytest.mark.parametrize("mask_background", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_dense_heads_match_torchvision(head, case, mask_background):
    batch = 4
    model, split, anchors = _dense_inputs(head, batch, seed=CASES.index(case))
    settings = _settings(model, *case)
    reference = dict(split, cls_logits=_background_masked(split["cls_logits"])) if mask_background else split
    with torch.no_grad():
        theirs = model.postprocess_detections(reference, anchors, SIZES[:batch])
    for nms_per_image in (True, False):  # CPU's default, accelerators' default (one NMS for the batch)
        ours = _ours_dense(head, split, anchors[0], SIZES[:batch], settings, mask_background, nms_per_image)
        _compare(ours, theirs, head)
    assert len(theirs[EMPTY]["scores"]) == 0 and sum(len(d["scores"]) for d in theirs) > batch
    if mask_background:
        assert all((d["labels"] != 0).all() for d in ours)


# ---------------------------------------------------------------------------------------------------------- SSD
def _ssd_inputs(batch: int, seed: int = 0, sparse: bool = False):
    model = _ssd()
    anchors = _anchors(model, batch)
    n = anchors[0].shape[0]
    logits = _logits((batch, n, C), seed, 2.0, 0.0)
    if sparse:
        logits[..., 0] += 9.0
    if batch > EMPTY:
        logits[EMPTY, :, 0] = 20.0  # all background
    outputs = {"cls_logits": logits, "bbox_regression": _regression((batch, n, 4), seed + 1)}
    return model, _untie_outputs("ssd", outputs, seed), anchors


@pytest.mark.parametrize("case", [(0.05, 10, 400), (0.05, 200, 400), (0.5, 10, 20), (0.5, 200, 20), (0.05, 200, 20)])
def test_ssd_matches_torchvision(case):
    batch = 4
    model, outputs, anchors = _ssd_inputs(batch, seed=case[1] + case[2])
    settings = _settings(model, *case)
    with torch.no_grad():
        theirs = model.postprocess_detections(outputs, anchors, SIZES[:batch])
    for nms_per_image in (True, False):
        ours = ssd_postprocess(outputs["bbox_regression"], outputs["cls_logits"], anchors[0], SIZES[:batch],
                               nms_per_image=nms_per_image, **settings)
        _compare(ours, theirs, "ssd")
    assert len(theirs[EMPTY]["scores"]) == 0 and sum(len(d["scores"]) for d in theirs) > batch


# ------------------------------------------------------------------------------------------ end to end (forward)
@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
def test_forward_outputs_match(head):
    """A real forward (images of different sizes): our function on the head outputs the model hands its own
    ``postprocess_detections``, given split per level and unsplit, equals that method's result."""
    torch.manual_seed(0)
    model = {"retinanet": _retinanet, "fcos": _fcos, "ssd": _ssd}[head]()
    for m in model.head.modules():  # spread the logits (the priors make them nearly equal)
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.1)
            nn.init.zeros_(m.bias)
    images = [torch.rand(3, h, w) for h, w in [(96, 128), (70, 128), (96, 50), (40, 100)]]
    seen = {}
    original = model.postprocess_detections

    def spy(head_outputs, anchors, image_sizes):
        if head == "ssd":
            head_outputs = _untie_outputs(head, head_outputs)
        else:
            levels = [x.shape[1] for x in head_outputs["cls_logits"]]
            untied = _untie_outputs(head, {k: torch.cat(v, dim=1) for k, v in head_outputs.items()})
            head_outputs = {k: split_levels(v, levels) for k, v in untied.items()}
        out = original(head_outputs, anchors, image_sizes)
        # copies: the transform's postprocess then rescales boxes in these dicts
        seen.update(head_outputs=head_outputs, anchors=anchors, image_sizes=image_sizes, out=[dict(d) for d in out])
        return out

    model.postprocess_detections = spy
    with torch.no_grad():
        model(images)
    outs, anchors, image_sizes, theirs = (seen[k] for k in ("head_outputs", "anchors", "image_sizes", "out"))
    assert len(set(image_sizes)) > 1 or head == "ssd"
    settings = dict(box_coder=model.box_coder, score_thresh=model.score_thresh, nms_thresh=model.nms_thresh,
                    detections_per_img=model.detections_per_img, topk_candidates=model.topk_candidates)
    if head == "ssd":
        _compare(ssd_postprocess(outs["bbox_regression"], outs["cls_logits"], anchors, image_sizes, **settings),
                 theirs, head)
        return
    fn = retinanet_postprocess if head == "retinanet" else fcos_postprocess
    extra = [outs["bbox_ctrness"]] if head == "fcos" else []
    _compare(fn(outs["cls_logits"], outs["bbox_regression"], *extra, anchors[0], image_sizes, **settings), theirs, head)
    unsplit = [torch.cat(outs[k], dim=1) for k in ("cls_logits", "bbox_regression", *(["bbox_ctrness"] * len(extra)))]
    _compare(fn(*unsplit, anchors[0], image_sizes, **settings), theirs, head)
    assert sum(len(d["scores"]) for d in theirs) > 0


# ------------------------------------------------------------------------------------------------ dtype, anchors
def test_half_inputs_and_per_image_anchors():
    """float16 head outputs are post-processed in float32 (equal to torchvision on the float32 values); anchors may be
    ``[B, N_l, 4]``; bfloat16 gives exactly what its float32 values give."""
    batch = 4
    model, split, anchors = _dense_inputs("retinanet", batch, seed=3)
    settings = _settings(model, 0.05, 100, 1000)
    levels = [x.shape[1] for x in split["cls_logits"]]
    # float16 has too few values for random logits to give distinct scores: draw each image's logits without
    # replacement from the float16 values whose sigmoids are all distinct floats (2^-6 <= |x| <= 6)
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    values = values[values.isfinite() & (values.abs() >= 2**-6) & (values.abs() <= 6)]
    n = sum(levels) * C
    g = torch.Generator().manual_seed(3)
    logits = torch.stack([values[torch.randperm(len(values), generator=g)[:n]] for _ in range(batch)])
    half = {"cls_logits": split_levels(logits.reshape(batch, -1, C), levels),
            "bbox_regression": [x.half() for x in split["bbox_regression"]]}
    per_image = [torch.stack(level) for level in zip(*anchors)]
    ours = retinanet_postprocess(half["cls_logits"], half["bbox_regression"], per_image, SIZES[:batch],
                                 mask_background=True, **settings)
    reference = {k: [x.float() for x in v] for k, v in half.items()}
    reference["cls_logits"] = _background_masked(reference["cls_logits"])
    _compare(ours, model.postprocess_detections(reference, anchors, SIZES[:batch]), "retinanet")

    bf16 = {k: [x.bfloat16() for x in v] for k, v in split.items()}
    low, full = (retinanet_postprocess(d["cls_logits"], d["bbox_regression"], anchors[0], SIZES[:batch], **settings)
                 for d in (bf16, {k: [x.float() for x in v] for k, v in bf16.items()}))
    for a, b in zip(low, full):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    assert sum(len(d["scores"]) for d in low) > 0


# ------------------------------------------------------------------------------------------------ syncs and ops
@functools.cache
def _calls(head: str, batch: int):
    """(ours(nms_per_image), torchvision's()) on the same sparse random batch, torchvision's default settings."""
    if head == "ssd":
        model, outputs, anchors = _ssd_inputs(batch, sparse=True)
        settings = _settings(model, model.score_thresh, model.detections_per_img, model.topk_candidates)
        return (lambda per_image: ssd_postprocess(outputs["bbox_regression"], outputs["cls_logits"], anchors[0],
                                                  SIZES[:batch], nms_per_image=per_image, **settings),
                lambda: model.postprocess_detections(outputs, anchors, SIZES[:batch]))
    model, split, anchors = _dense_inputs(head, batch, sparse=True)
    settings = _settings(model, model.score_thresh, model.detections_per_img, model.topk_candidates)
    return (lambda per_image: _ours_dense(head, split, anchors[0], SIZES[:batch], settings, False, per_image),
            lambda: model.postprocess_detections(split, anchors, SIZES[:batch]))


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
def test_one_host_sync(head):
    """One ``tolist`` at the end (CUDA ``nms`` adds its own, invisible here); no boolean masks, ``nonzero``... The
    per-image NMS is the CPU's path: with many candidate slots it reads each image's valid ones and per-class
    counts on the host (where nothing waits for a device), and nothing else."""
    ours, _ = _calls(head, batch=8)
    with count_host_syncs() as syncs:
        ours(False)
    assert syncs == ["tolist"], syncs
    with count_host_syncs() as syncs:
        ours(True)
    assert syncs.count("nonzero") == 8 and syncs[-1] == "tolist", syncs  # one selection per image, sizes at the end
    assert set(syncs) == {"nonzero", "aten.nonzero", "tolist"}, syncs


def _op_count(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return len(prof.events())


@pytest.mark.parametrize("head", ["retinanet", "fcos", "ssd"])
def test_far_fewer_operator_calls(head):
    ours, theirs = _calls(head, batch=8)
    n_theirs = _op_count(theirs)
    n_one, n_per_image = _op_count(lambda: ours(False)), _op_count(lambda: ours(True))
    print(f"\n{head}, batch 8: {n_one} operator calls (ours, one NMS), {n_per_image} (ours, NMS per image) vs "
          f"{n_theirs} (torchvision)")
    # the per-image path is the CPU's: its host-side selection of the valid candidates adds a few calls per image,
    # each far cheaper than the NMS work it saves
    assert n_one * 3 < n_theirs and n_per_image * 2 < n_theirs
    _compare(ours(False), theirs(), head)


def test_split_levels():
    x = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    parts = split_levels(x, [6, 3, 1])
    assert [p.shape[1] for p in parts] == [6, 3, 1] and torch.equal(torch.cat(parts, 1), x)
    assert [p.shape[0] for p in split_levels(torch.zeros(10, 4), [6, 3, 1])] == [6, 3, 1]


def test_report_largest_differences():
    """Runs last in this file: prints the largest differences seen (pytest -s)."""
    for head, worst in WORST.items():
        print(f"\n{head}: max |boxes diff| {worst['boxes']:.3g}, max |scores diff| {worst['scores']:.3g} "
              f"over {worst['detections']} detections")


def test_cpu_nms_per_class_equals_one_nms_over_the_valid_candidates():
    """Many candidate slots: the CPU path's NMS per label (valid candidates only) keeps what torchvision's
    ``batched_nms`` keeps, in one ``nms`` call's order (descending score, equal scores by index)."""
    from torchvision.ops import batched_nms, nms

    from src.detection.modeling.postprocess import PER_CLASS_NMS_MIN, _image_nms

    g = torch.Generator().manual_seed(0)
    k = 3 * PER_CLASS_NMS_MIN
    centres = torch.rand(40, 2, generator=g) * 200  # clusters: plenty to suppress
    xy = centres[torch.randint(0, 40, (k,), generator=g)] + torch.randn(k, 2, generator=g) * 4
    wh = 10 + torch.rand(k, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, 7, (k,), generator=g)
    scores = (torch.rand(k, generator=g) * 20).round() / 20  # many equal scores
    valid = torch.rand(k, generator=g) > 0.3
    scores = scores.masked_fill(~valid, float("-inf"))
    shifted = boxes + torch.stack([labels * 300, 0 * labels], 1).to(boxes).repeat(1, 2)  # as the batched code does
    ours = _image_nms(shifted, scores, labels, valid, 0.5)
    idx = valid.nonzero().squeeze(1)
    ref = idx[batched_nms(boxes[idx], scores[idx], labels[idx], 0.5)]
    ref = ref.sort().values
    ref = ref[scores[ref].sort(descending=True, stable=True).indices]
    assert torch.equal(ours, ref) and 0.2 * len(idx) < len(ours) < 0.9 * len(idx)
    one_call = nms(shifted[idx], scores[idx], 0.5)  # the single call it replaces, on the same candidates
    assert torch.equal(ours, idx[one_call])
