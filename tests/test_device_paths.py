"""The GPU paths: batched upload + resize of frames, CUDA-graph inference and the CUDA-graph training step.

Each is checked against the eager path it replaces (the oracle). The upload test also runs on a CPU; the others
need CUDA and are skipped without it (the GPU benchmark script runs them on the lent GPU).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from src.detection.inference.predictor import Predictor

CLASSES = ["__background__", "a", "b", "c"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint, tmp_path_factory):
    def spread(model):  # many confident candidates, so equality covers NMS and the top-k
        for m in model.head.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, std=0.05)

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pth", CLASSES, imgsz=(96, 64), prepare=spread)


def frames(n: int, h: int = 72, w: int = 120, seed: int = 0) -> list[torch.Tensor]:
    """Decoded-video-like frames: [3,H,W] views of height x width x channel memory."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1) for _ in range(n)]


@pytest.mark.parametrize("letterbox", [False, True])
def test_batched_upload_equals_per_image_preprocessing(checkpoint, letterbox):
    p = Predictor(checkpoint, device="cpu", letterbox=letterbox)
    imgs = frames(3)
    batch = p.input_spec.preprocess(p.upload(imgs))
    assert batch.shape == (3, 3, 64, 96)
    assert torch.equal(batch, torch.stack([p.preprocess(im) for im in imgs]))
    planar = [im.contiguous() for im in imgs]  # CHW memory takes the same path without the layout change
    assert torch.equal(p.input_spec.preprocess(p.upload(planar)), batch)


def _assert_same(ours, theirs, atol=1e-3):
    assert sum(len(d["scores"]) for d in theirs) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=atol)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=atol * 100)


@cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_inference_equals_eager(checkpoint, batch):
    graphed = Predictor(checkpoint, device="cuda", precision="fp32", score_thresh=0.05, batch_size=batch,
                        cuda_graphs=True)
    eager = Predictor(checkpoint, device="cuda", precision="fp32", score_thresh=0.05, batch_size=batch,
                      cuda_graphs=False)
    imgs = frames(batch * 4, seed=1)
    for start in range(0, len(imgs), batch):  # warm-up calls, the capture, then replays
        chunk = imgs[start:start + batch]
        _assert_same(graphed.predict(chunk), eager.predict(chunk))
    assert len(graphed._head_forward.graphs) == 1 and not graphed._head_forward.failed


@cuda
def test_device_preprocessing_matches_the_cpu_within_rounding(checkpoint):
    gpu = Predictor(checkpoint, device="cuda", letterbox=True)
    cpu = Predictor(checkpoint, device="cpu", letterbox=True)
    imgs = frames(4, seed=2)
    ours = gpu.preprocess_batch(imgs).cpu()
    theirs = torch.stack([cpu.preprocess(im) for im in imgs])
    assert (ours.int() - theirs.int()).abs().max() <= 1


def _tiny_training_model(device):
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=4, head="retinanet", imgsz=(96, 64),
                         fpn_channels=64, arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(cfg, verbose=False).to(device)


def _batches(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        imgs = torch.randint(0, 256, (4, 3, 64, 96), dtype=torch.uint8, generator=g)
        targets = []
        for j in range(4):
            k = (i + j) % 3  # 0, 1 or 2 boxes: includes images without objects
            xy = torch.rand(k, 2, generator=g) * torch.tensor([60.0, 30.0])
            wh = 8 + torch.rand(k, 2, generator=g) * 30
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (k,), generator=g)})
        out.append((imgs, targets))
    return out


@cuda
@pytest.mark.parametrize("clip_grad", [0.0, 1.0])
def test_cuda_graph_training_step_equals_eager(clip_grad):
    """Eight steps (two warm-up, capture, replays) with a changing LR: the same weights as the eager step."""
    from src.detection.engine.loop import build_optimizer, build_scheduler, train_one_epoch

    device = torch.device("cuda")
    results = []
    # Adam divides by the gradient's running RMS, so for near-zero gradients it turns the last-bit differences of
    # non-deterministic kernels (atomics, TF32) into full-size steps; eps = 1 keeps updates proportional to the
    # gradient, so both runs stay comparable over many steps. TF32 off for the same reason.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for graphs in (False, True):
        model = _tiny_training_model(device)
        opt = build_optimizer(model, "adamw", 1e-3, 1e-4)
        for group in opt.param_groups:
            group["eps"] = 1.0
        sched = build_scheduler(opt, schedule="cosine", epochs=1, iters_per_epoch=8, warmup_iters=3)
        means = train_one_epoch(model, _batches(8, device), opt, sched, device, 1, clip_grad=clip_grad,
                                cuda_graphs=graphs, log_interval=4)
        results.append((means, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    (eager_means, eager_w), (graph_means, graph_w) = results
    for k in eager_means:
        assert graph_means[k] == pytest.approx(eager_means[k], rel=1e-4, abs=1e-6), k
    for n in eager_w:
        torch.testing.assert_close(graph_w[n], eager_w[n], rtol=1e-4, atol=1e-5, msg=n)


@cuda
@pytest.mark.parametrize("low_precision_norm", [False, True])
def test_cuda_graph_training_step_captures_once_and_never_syncs(low_precision_norm):
    from src.detection.engine.loop import build_optimizer, graphed_step_for, padded_targets

    device = torch.device("cuda")
    model = _tiny_training_model(device)
    model.head.low_precision_norm = low_precision_norm
    opt = build_optimizer(model, "adamw", 1e-3, 1e-4)
    step = graphed_step_for(model, opt, device, torch.bfloat16, 0.0, None, None)
    assert step is not None
    batches = _batches(6, device)
    inputs = [(imgs.to(device), padded_targets(t, device)) for imgs, t in batches]
    for imgs, t in inputs[:3]:
        step(imgs, t, None)  # two warm-up steps and the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for imgs, t in inputs[3:]:
            _, loss, finite = step(imgs, t, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(step.graphed.graphs) == 1 and not step.graphed.failed
    assert torch.isfinite(loss).item() and finite.item() == 1.0
    assert graphed_step_for(model, opt, device, torch.bfloat16, 0.0, None, None) is step  # kept across epochs
    assert graphed_step_for(model, opt, device, torch.bfloat16, 0.0, None, False) is None
    model_copy = copy.deepcopy(model)
    assert graphed_step_for(model_copy, build_optimizer(model_copy, "sgd", 1e-3, 1e-4), device, None, 0.0, None,
                            None) is None  # SGD: no capturable fused step here


@cuda
def test_low_precision_norm_stays_within_bf16_rounding_on_cuda():
    """On CUDA, autocast runs GroupNorm in fp32; the merged tower's ``low_precision_norm`` runs it in bf16 instead:
    the head's outputs stay within bf16 rounding of the default's."""
    device = torch.device("cuda")
    model = _tiny_training_model(device)
    torch.manual_seed(1)
    feats = [torch.randn(2, model.backbone.out_channels, h, w, device=device)
             for h, w in [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model.head(feats)
        model.head.low_precision_norm = True
        low = model.head(feats)
    for k in plain:
        torch.testing.assert_close(low[k], plain[k], rtol=0.05, atol=0.05)


def test_postprocess_maps_a_batch_like_each_image_alone(checkpoint):
    """One copy back and one box mapping for frames of one size (per image for mixed sizes) give exactly what
    mapping each image's detections alone gives."""
    p = Predictor(checkpoint, device="cpu", score_thresh=0.05, batch_size=4)
    same = frames(3, seed=3)
    mixed = [*frames(1, 72, 120, seed=4), *frames(1, 90, 60, seed=5), *frames(1, 40, 100, seed=6)]
    for imgs in (same, mixed):
        sizes = [im.shape[-2:] for im in imgs]
        raw = p.forward(torch.stack([p.preprocess(im) for im in imgs]))
        ours = p.postprocess(raw, sizes)
        assert sum(len(d["scores"]) for d in ours) > 0
        for det, hw, got in zip(raw, sizes, ours):
            assert torch.equal(got["boxes"], p.input_spec.boxes_to_original(det["boxes"].float(), hw))
            assert torch.equal(got["scores"], det["scores"].float())
            assert torch.equal(got["labels"], det["labels"].to(torch.int64))


@cuda
def test_submit_in_flight_equals_predict_and_never_syncs(checkpoint):
    """Two batches in flight (the second replays the CUDA graph whose outputs the first still needs) give what
    ``predict`` gives, and ``submit`` (upload, resize, graphed forward) waits for nothing on the device."""
    p = Predictor(checkpoint, device="cuda", precision="fp32", score_thresh=0.05, batch_size=4)
    imgs = frames(8, seed=8)
    for _ in range(3):  # two warm-up calls and the capture
        p.predict(imgs[:4])
    expected = [p.predict(imgs[:4]), p.predict(imgs[4:])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first, second = p.submit(imgs[:4]), p.submit(imgs[4:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_same(first.result(), expected[0])
    _assert_same(second.result(), expected[1])
    assert len(p._head_forward.graphs) == 1 and not p._head_forward.failed
    mixed = [*frames(3, seed=9), *frames(2, 90, 60, seed=10), *frames(1, 40, 100, seed=11)]
    pending = [p.submit(mixed), p.submit(mixed[::-1])]
    _assert_same(pending[1].result(), p.predict(mixed[::-1]))
    _assert_same(pending[0].result(), p.predict(mixed))
    for got in pending[0].result():
        assert got["boxes"].device.type == "cpu" and got["boxes"].dtype == torch.float32
