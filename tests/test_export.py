"""ONNX export (``python -m src.detection.commands.export``) and onnxruntime inference (``OnnxPredictor``).

Parity is checked against the PyTorch ``Predictor`` on the same checkpoint: same detections (count, labels),
boxes within 1e-3 relative, scores within 1e-4, on 3 images of different sizes. The models have random weights;
their classification layers are re-drawn with a wider spread so that scores are well separated and a realistic
number of boxes pass the score threshold (the default prior makes every score ~0.01).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from src.detection.checkpoint import build_payload, model_meta, save_checkpoint  # noqa: E402
from src.detection.commands.export import build_export_parser, export_config_from_args, main  # noqa: E402
from src.detection.core.errors import UserError  # noqa: E402
from src.detection.data.transforms import resize_image  # noqa: E402
from src.detection.inference.export import ExportConfig, ExportGraph, export_onnx  # noqa: E402
from src.detection.inference.onnx_runtime import DetectionDecoder, OnnxPredictor  # noqa: E402
from src.detection.inference.predictor import Predictor  # noqa: E402
from src.detection.inference.sidecar import sidecar_path  # noqa: E402
from src.detection.modeling.builder import build_detector  # noqa: E402
from src.detection.modeling.config import DetectorConfig  # noqa: E402

CLASSES = ["__background__", "cat", "dog", "car"]
IMGSZ = (320, 256)
SCORE_THRESH = 0.5
MAX_DET = 300
# detections above SCORE_THRESH in the image with the fewest: far below the top-k (1000 per level) and MAX_DET
# cut-offs, so near-equal scores cannot swap a detection in or out of the result
TARGET_CANDIDATES = 40


def _detector(model_name: str, head: str, imgsz=IMGSZ, letterbox: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = DetectorConfig(model_name=model_name, num_classes=len(CLASSES), head=head, imgsz=imgsz,
                         score_thresh=SCORE_THRESH, max_det=MAX_DET, letterbox=letterbox)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_detector(cfg, verbose=False).eval()
    _calibrate_scores(model, head, imgsz)
    return model


def _calibrate_scores(model: nn.Module, head: str, imgsz) -> None:
    """Random classification weights with a spread (the default prior makes every score ~0.01), and a bias - a low
    prior for the sigmoid heads, a strong background for SSD's softmax - chosen so that TARGET_CANDIDATES
    scores pass SCORE_THRESH on the test images."""
    convs = [m for n, m in model.head.classification_head.named_modules()  # the layer(s) holding the class bias
             if isinstance(m, nn.Conv2d) and m.bias is not None
             and (n.split(".")[0] == "cls_logits" or n.startswith("module_list"))]
    for conv in convs:
        nn.init.normal_(conv.weight, std=0.05)
        nn.init.zeros_(conv.bias)
    batch = torch.stack([resize_image(i, imgsz) for i in _images()])
    with torch.inference_mode():
        out = ExportGraph(model)(batch)
    logits = out[0]

    def count(b: float) -> int:
        if head == "ssd":
            scores = torch.softmax(logits + torch.tensor([b] + [0.0] * (len(CLASSES) - 1)), -1)[..., 1:]
        elif head == "fcos":
            scores = torch.sqrt(torch.sigmoid(logits[..., 1:] - b) * torch.sigmoid(out[2]))
        else:
            scores = torch.sigmoid(logits[..., 1:] - b)
        return int((scores > SCORE_THRESH).flatten(1).sum(1).min())

    lo, hi = -10.0, 30.0  # count(b) falls as b grows
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) > TARGET_CANDIDATES else (lo, mid)
    with torch.no_grad():
        for conv in convs:
            background = torch.arange(conv.bias.numel()) % len(CLASSES) == 0
            conv.bias.copy_(torch.where(background, lo, 0.0) if head == "ssd" else torch.full_like(conv.bias, -lo))


def _checkpoint(folder: Path, model_name: str, head: str, **kw) -> Path:
    model = _detector(model_name, head, **kw)
    return save_checkpoint(folder / f"{model_name}_{head}.pth", build_payload(model, model_meta(model, CLASSES)))


def _images(seed: int = 1) -> list[torch.Tensor]:
    """Smooth random RGB images (not noise: real-looking feature maps) of three sizes and aspect ratios."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in ((240, 320), (256, 256), (300, 200)):
        low = torch.rand((1, 3, h // 16, w // 16), generator=g) * 255
        out.append(nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0].round().to(torch.uint8))
    return out


def _assert_same(ref: list[dict], got: list[dict]) -> None:
    """Same detections: count, labels, boxes (1e-3 relative), scores (1e-4). Paired by label and nearest box,
    since the order of two near-equal scores may differ."""
    assert len(ref) == len(got)
    for r, o in zip(ref, got):
        n = len(r["boxes"])
        assert 0 < n < MAX_DET, "no detections, or the max_det cut-off was reached"
        assert len(o["boxes"]) == n
        free = list(range(n))
        for i in range(n):
            same = [j for j in free if o["labels"][j] == r["labels"][i]]
            assert same, f"no detection of class {int(r['labels'][i])} left to pair"
            j = min(same, key=lambda k: float((o["boxes"][k] - r["boxes"][i]).abs().max()))
            free.remove(j)
            torch.testing.assert_close(o["boxes"][j], r["boxes"][i], rtol=1e-3, atol=1e-3)
            assert abs(float(o["scores"][j] - r["scores"][i])) <= 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One static ConvNeXt RetinaNet export shared by the fast tests."""
    folder = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(folder, "dinov3_convnext_atto", "retinanet")
    result = export_onnx(ExportConfig(model=str(ckpt)))
    return ckpt, result


# ---------------------------------------------------------------------------------------------- fast tests
def test_export_writes_checked_model_and_sidecar(exported):
    ckpt, result = exported
    onnx_path = result["onnx"]
    assert onnx_path == ckpt.with_suffix(".onnx") and onnx_path.is_file()
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    side = json.loads(sidecar_path(onnx_path).read_text())
    assert side["classes"] == CLASSES and side["head"] == "retinanet"
    assert side["model_name"] == "dinov3_convnext_atto" and side["toolkit_version"]
    assert side["input"]["imgsz"] == list(IMGSZ) and side["input"]["size_multiple"] == 32
    assert side["input"]["letterbox"] is False and len(side["input"]["mean"]) == 3 and len(side["input"]["std"]) == 3
    assert side["thresholds"] == {"score_thresh": SCORE_THRESH, "nms": 0.45, "max_det": MAX_DET,
                                  "topk_candidates": 1000}
    assert max(side["verification"]["max_rel_diff"].values()) < 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape == [1, 3, IMGSZ[1], IMGSZ[0]]
    assert [o.name for o in session.get_outputs()] == side["graph"]["outputs"]
    assert not [p for p in onnx_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_onnx_predictor_matches_pytorch(exported):
    ckpt, result = exported
    images = _images()
    ref = Predictor(ckpt, device="cpu", precision="fp32").predict(images)
    pred = OnnxPredictor(result["onnx"], device="cpu")
    assert pred.classes == CLASSES and pred.imgsz == IMGSZ and pred.precision == "fp32"
    _assert_same(ref, pred.predict(images))
    # run-time thresholds, as --threshold / --max-det pass them
    thresh = float(ref[0]["scores"].median())  # about half of the first image's detections pass
    strict = OnnxPredictor(result["onnx"], device="cpu", score_thresh=thresh, max_det=5).predict(images[:1])
    ref_strict = Predictor(ckpt, device="cpu", precision="fp32", score_thresh=thresh, max_det=5).predict(images[:1])
    _assert_same(ref_strict, strict)
    assert all(len(p["boxes"]) == 5 and (p["scores"] >= thresh).all() for p in strict)


def test_description_inside_onnx_file_is_enough(exported, tmp_path):
    _, result = exported
    alone = tmp_path / "copy.onnx"
    alone.write_bytes(result["onnx"].read_bytes())  # no sidecar beside it
    images = _images()[:1]
    _assert_same(OnnxPredictor(result["onnx"], device="cpu").predict(images),
                 OnnxPredictor(alone, device="cpu").predict(images))


@pytest.mark.parametrize("head", ["retinanet", "ssd", "fcos"])
def test_decoder_is_the_torchvision_postprocess(head):
    """Graph outputs (computed in PyTorch) + DetectionDecoder == the detector's own forward, exactly."""
    model = _detector("dinov3_convnext_atto", head, imgsz=(128, 96))
    batch = torch.stack([nn.functional.interpolate(i[None].float(), size=(96, 128))[0].to(torch.uint8)
                         for i in _images()[:2]])
    with torch.inference_mode():
        want = model(batch)
        outputs = dict(zip(ExportGraph(model).names + ("anchors", "level_sizes"), ExportGraph(model)(batch)))
    decoder = DetectionDecoder(head, len(CLASSES), model.score_thresh, model.nms_thresh, model.detections_per_img,
                               model.topk_candidates)
    got = decoder(outputs, batch.shape[-2:])
    for w, g in zip(want, got):
        assert len(w["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(w[k], g[k]), k


def test_infer_command_with_onnx_model_matches_pth(exported, tmp_path):
    """infer_det_image.py's body with --model x.onnx writes the same predictions.json as with the .pth."""
    import cv2

    from src.detection.commands.infer_image import build_image_parser, image_config_from_args, infer_images

    ckpt, result = exported
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(_images()):
        cv2.imwrite(str(folder / f"im{i}.png"), img.permute(1, 2, 0).numpy()[:, :, ::-1])
    rows = {}
    for name, model in (("pth", ckpt), ("onnx", result["onnx"])):
        args = build_image_parser().parse_args(["--input", str(folder), "--model", str(model), "--threshold", "0.4",
                                                "--device", "cpu", "--precision", "auto" if name == "onnx" else "fp32",
                                                "--out-dir", str(tmp_path / name)])
        summary = infer_images(image_config_from_args(args))
        assert summary["images"] == 3 and (tmp_path / name / "im0.png").is_file()
        rows[name] = json.loads(Path(summary["predictions"]).read_text())
    assert len(rows["pth"]) == len(rows["onnx"]) > 0
    key = lambda r: (r["file_name"], -r["score"])  # noqa: E731
    for a, b in zip(sorted(rows["pth"], key=key), sorted(rows["onnx"], key=key)):
        assert (a["file_name"], a["category_id"]) == (b["file_name"], b["category_id"])
        np.testing.assert_allclose(b["bbox"], a["bbox"], rtol=1e-3, atol=2e-2)
        assert abs(a["score"] - b["score"]) <= 1e-4


def test_static_graph_refuses_other_sizes(exported):
    _, result = exported
    with pytest.raises(UserError, match="--imgsz 640 640.*exported for 320x256"):
        OnnxPredictor(result["onnx"], device="cpu", imgsz=640)
    with pytest.raises(UserError, match="--keep-aspect"):
        OnnxPredictor(result["onnx"], device="cpu", keep_aspect=True)


def test_static_batch_graph_runs_any_number_of_images(exported):
    _, result = exported
    pred = OnnxPredictor(result["onnx"], device="cpu")
    batch = torch.stack([pred.preprocess(i) for i in _images()])  # 3 images through a batch-1 graph
    raw = pred.forward(batch)
    assert len(raw) == 3 and pred.model_timer.items == 3


def test_half_on_cpu_is_a_clear_error(exported, capsys):
    ckpt, _ = exported
    with pytest.raises(UserError, match="--half.*CUDA"):
        export_onnx(ExportConfig(model=str(ckpt), half=True, device="cpu"))


def test_hub_backbone_is_refused_before_anything_is_written(tmp_path):
    model = _detector("dinov3_convnext_atto", "retinanet", imgsz=(64, 64))
    meta = {**model_meta(model, CLASSES), "backbone_impl": "hub"}
    ckpt = save_checkpoint(tmp_path / "hub.pth", build_payload(model, meta))
    with pytest.raises(UserError, match="backbone-impl hub"):
        export_onnx(ExportConfig(model=str(ckpt)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.pth"]


def test_failed_export_leaves_existing_files_untouched(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, "dinov3_convnext_atto", "retinanet", imgsz=(64, 64))
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def broken_export(module, args, f, **kw):
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed\nwith details")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(UserError, match="ONNX export of this dinov3_convnext_atto/retinanet failed") as err:
        export_onnx(ExportConfig(model=str(ckpt), output=str(target)))
    assert "\n" not in str(err.value)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name, "model.onnx"]


def test_sidecar_is_the_checkpoint_card(exported):
    """The sidecar holds the checkpoint's card (same fields as its meta, format 2) plus the export's sections."""
    from src.detection.checkpoint import load_card, load_checkpoint
    from src.detection.inference.sidecar import read_sidecar

    ckpt, result = exported
    side = json.loads(sidecar_path(result["onnx"]).read_text())
    assert side["format_version"] == 2 and "detector" not in side and "imgsz" not in side
    card = load_card(load_checkpoint(ckpt))
    assert read_sidecar(result["onnx"]).card == card
    assert OnnxPredictor(result["onnx"], device="cpu").meta == Predictor(ckpt, device="cpu").meta == card.to_dict()


def test_export_prepares_the_checkpoint_once(tmp_path, monkeypatch):
    from src.detection.checkpoint import build as ck_build
    from src.detection.inference import export as export_module

    ckpt = _checkpoint(tmp_path, "dinov3_convnext_atto", "retinanet", imgsz=(64, 64))
    calls = {}
    for module, name in ((ck_build, "load_checkpoint"), (ck_build, "load_card"), (export_module, "prepare_checkpoint")):
        def counted(*a, _real=getattr(module, name), _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(module, name, counted)

    def stop(*a, **k):  # everything up to the graph has run by now
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.onnx, "export", stop)
    with pytest.raises(UserError, match="stop here"):
        export_onnx(ExportConfig(model=str(ckpt), verify=False))
    assert calls == {"load_checkpoint": 1, "load_card": 1, "prepare_checkpoint": 1}


def test_onnx_devices_follow_the_device_rule(monkeypatch):
    """--device for onnxruntime is checked by runtime.select_device, like every command's; auto falls back to the
    CPU where onnxruntime has no CUDA provider."""
    from src.detection.inference import onnx_runtime

    class FakeOrt:
        providers = ["CPUExecutionProvider"]

        def get_available_providers(self):
            return self.providers

    fake = FakeOrt()
    monkeypatch.setattr(onnx_runtime, "_onnxruntime", lambda what: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert onnx_runtime._providers("auto") == (["CPUExecutionProvider"], torch.device("cpu"))
    assert onnx_runtime._providers("cpu") == (["CPUExecutionProvider"], torch.device("cpu"))
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is visible"):
        onnx_runtime._providers("cuda")
    with pytest.raises(UserError, match="--device 'tpu' is not valid"):
        onnx_runtime._providers("tpu")
    monkeypatch.setattr(onnx_runtime, "select_device", lambda name: torch.device("cuda", 1)
                        if name != "cpu" else torch.device("cpu"))
    assert onnx_runtime._providers("auto") == (["CPUExecutionProvider"], torch.device("cpu"))
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        onnx_runtime._providers("cuda:1")
    fake.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers, device = onnx_runtime._providers("cuda:1")
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 1}) and device == torch.device("cuda", 1)


def test_config_validation_and_help():
    with pytest.raises(UserError, match="--opset 9"):
        ExportConfig(model="x.pth", opset=9)
    with pytest.raises(UserError, match="--output"):
        ExportConfig(model="x.pth", output="x.pt")
    with pytest.raises(UserError, match="--format"):
        ExportConfig(model="x.pth", format="tflite")
    text = build_export_parser().format_help()
    assert "(default: 17)" in text and "--dynamic" in text and "--half" in text


def test_checkpoint_flags_are_the_inference_ones(tmp_path):
    """--model-name/--config/--head/--feature-extractor/--weights: one definition, same help and meaning in export
    and both inference commands; --config takes any dataset config form without its data folders."""
    from src.detection.commands.infer_image import build_image_parser
    from src.detection.commands.infer_video import build_video_parser

    flags = ("--model-name", "--config", "--head", "--feature-extractor", "--weights")

    def actions(parser):
        return {a.option_strings[0]: (a.dest, a.default, a.help) for a in parser._actions
                if a.option_strings and a.option_strings[0] in flags}

    export = actions(build_export_parser())
    assert sorted(export) == sorted(flags)
    assert export == actions(build_image_parser()) == actions(build_video_parser())
    text = " ".join(build_export_parser().format_help().split())
    assert "--feature-extractor FEATURE_EXTRACTOR multi | last; checked against the checkpoint --" in text
    assert "(default: None)" not in text  # "not given" needs no saying

    data = tmp_path / "data.yaml"  # Ultralytics form; its image folders do not exist
    data.write_text("path: gone\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n")
    args = build_export_parser().parse_args(["--model", "m.pth", "--config", str(data), "--head", "fcos",
                                             "--feature-extractor", "last", "--model-name", "dinov3_vit_tiny"])
    cfg = export_config_from_args(args)
    assert cfg.expect() == {"model_name": "dinov3_vit_tiny", "head": "fcos", "feature_extractor": "last",
                            "classes": ["__background__", "cat", "dog"]}


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="missing.pth not found") as err:
        main(["--model", str(tmp_path / "missing.pth")])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- slow matrix
@pytest.mark.slow
@pytest.mark.parametrize("model_name,head,dynamic,letterbox", [
    ("dinov3_vit_tiny", "retinanet", False, False),
    ("dinov3_convnext_atto", "ssd", False, False),
    ("dinov3_vit_tiny", "ssd", True, False),
    ("dinov3_convnext_atto", "fcos", False, False),
    ("dinov3_vit_tiny", "fcos", True, True),
])
def test_parity_heads_and_backbones(tmp_path, model_name, head, dynamic, letterbox):
    ckpt = _checkpoint(tmp_path, model_name, head, imgsz=(256, 192), letterbox=letterbox)
    out = tmp_path / "out"
    assert main(["--model", str(ckpt), "--out-dir", str(out), "--batch", "2"] + (["--dynamic"] if dynamic else [])) == 0
    onnx_path = out / f"{model_name}_{head}.onnx"
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    keep_aspect = dynamic and head != "ssd"  # aspect-preserving inputs of several sizes through one graph
    images = _images(seed=3)
    ref = Predictor(ckpt, device="cpu", precision="fp32", keep_aspect=keep_aspect, batch_size=2).predict(images)
    pred = OnnxPredictor(onnx_path, device="cpu", keep_aspect=keep_aspect, batch_size=2)
    assert pred.dynamic_hw == keep_aspect
    _assert_same(ref, pred.predict(images))


def test_unverified_half_export_says_why_and_what_is_unchecked(monkeypatch):
    """Without onnxruntime's CUDA provider an fp16 graph cannot be run here: the result says so, exactly."""
    from src.detection.inference import export as export_module

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    example = torch.zeros((1, 3, 64, 64), dtype=torch.uint8)
    result = export_module._verify(None, Path("unused.onnx"), example, ["cls_logits"], half=True)
    why = result["skipped"]
    assert "no CUDAExecutionProvider" in why and "CPUExecutionProvider" in why and ort.__version__ in why
    assert "NOT compared with PyTorch" in why and "onnxruntime-gpu" in why and "\n" not in why


def test_io_binding_gives_the_same_detections(exported):
    """The I/O-binding path (what the CUDA provider uses) run on the CPU provider: the same boxes as session.run,
    also for several images through a batch-1 graph and when the bound output buffers are reused."""
    _, result = exported
    plain = OnnxPredictor(result["onnx"], device="cpu")
    bound = OnnxPredictor(result["onnx"], device="cpu", io_binding=True)
    assert bound.io_binding and not plain.io_binding and "I/O binding" in bound.describe()
    images = _images()
    ref = plain.predict(images)
    for _ in range(2):  # the second round runs on the buffers the first one allocated
        got = bound.predict(images)
        for r, g in zip(ref, got):
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(r[key], g[key]), key
    batch = torch.stack([bound.preprocess(i) for i in images])
    raw_plain, raw_bound = plain.raw_outputs(batch), bound.raw_outputs(batch)  # 3 chunks of the batch-1 graph
    assert set(raw_plain) == set(raw_bound)
    for key in raw_plain:
        assert torch.equal(raw_plain[key], raw_bound[key]), key
