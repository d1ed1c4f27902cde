"""Checkpoints trained by the reference project load with the flags its own commands took.

A reference checkpoint is ``{"model_state_dict", "epoch", "optimizer_state_dict"}``: the official hub model under
``backbone.backbone_model.<official key>`` and torchvision's head under ``head.``. Here such files are built from
the official key lists / the official-format fixture weights and torchvision's own head classes (what the reference
instantiated), saved with ``torch.save`` and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSDHead

from src.detection.checkpoint import (
    REFERENCE_BACKBONE_PREFIX,
    REFERENCE_FORMAT,
    convert_reference_state_dict,
    load_checkpoint,
)
from src.detection.core.errors import UserError
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["__background__", "circle", "square"]
FIXTURE_ARCH = {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64]}  # tests/fixtures/dinov3/convnext_tiny_random


@pytest.fixture(autouse=True)
def _quiet():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(previous)


def official_keys(fixtures_dir: Path, name: str) -> dict[str, list[int]]:
    return json.loads((fixtures_dir / "keys" / f"keys_{name}.json").read_text())


def reference_head(head: str, channels: int, num_classes: int) -> torch.nn.Module:
    """The torchvision head the reference put on the last map (15 reference anchors / 6 SSD default boxes per cell)."""
    torch.manual_seed(1)
    if head == "retinanet":
        return RetinaNetHead(channels, 15, num_classes)
    return SSDHead([channels], [6], num_classes)


def reference_state_dict(backbone: dict[str, torch.Tensor], head: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {REFERENCE_BACKBONE_PREFIX + k: v for k, v in backbone.items()}
    sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return sd


def official_random(keys: dict[str, list[int]], embed: int, heads: int) -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes, with the two buffers the official model computes set as it does."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in keys.items()}
    for k in sd:
        if k.endswith("attn.qkv.bias_mask"):
            sd[k] = torch.cat([torch.ones(embed), torch.zeros(embed), torch.ones(embed)])
    head_dim = embed // heads
    sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    return sd


# ------------------------------------------------------------------------------------------ full-size key mapping
@pytest.mark.parametrize("model_name, head, channels", [
    ("dinov3_convnext_tiny", "retinanet", 768), ("dinov3_vits16", "ssd", 384), ("dinov3_vitl16_sat493m", "retinanet", 1024)])
def test_official_key_lists_map_onto_our_last_model(fixtures_dir: Path, model_name: str, head: str, channels: int):
    """Shapes only (meta device): every official backbone key and torchvision head key lands on our model."""
    keys = official_keys(fixtures_dir, model_name)
    hub_name = model_name.replace("_sat493m", "")
    with torch.device("meta"):
        backbone = {k: torch.empty(shape) for k, shape in keys.items()}
        ref = reference_state_dict(backbone, reference_head(head, channels, 21))
    from src.detection.checkpoint import reference_card

    card = reference_card({"format": REFERENCE_FORMAT, "meta": None, "model": ref, "path": "ref.pth"},
                          model_name=hub_name, classes=["__background__"] + [f"c{i}" for i in range(20)])
    cfg = card.detector
    assert card.provenance.is_reference and DetectorConfig.from_dict(card.to_dict()) == cfg
    assert cfg.head == head and cfg.feature_extractor == "last" and cfg.imgsz == (640, 640)
    with torch.device("meta"):
        model = build_detector(cfg, verbose=False)
    ours = convert_reference_state_dict(ref, model, "ref.pth")
    target = model.state_dict()
    assert set(ours) == set(target)
    assert all(tuple(ours[k].shape) == tuple(target[k].shape) for k in target)


# ------------------------------------------------------------------------------------------ tiny, real values
@pytest.fixture(scope="module")
def tiny_reference(fixtures_dir: Path, tmp_path_factory) -> tuple[Path, torch.nn.Module, dict]:
    backbone = torch.load(fixtures_dir / "convnext_tiny_random" / "weights.pth", weights_only=True)
    head = reference_head("retinanet", 64, len(CLASSES)).eval()
    path = tmp_path_factory.mktemp("ref") / "best_model.pth"
    torch.save({"epoch": 7, "model_state_dict": reference_state_dict(backbone, head),
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    return path, head, torch.load(fixtures_dir / "convnext_tiny_random" / "expected.pt", weights_only=True)


def test_reference_checkpoint_loads_and_computes_what_the_reference_did(tiny_reference, fixtures_dir: Path):
    from src.detection.inference.predictor import Predictor

    path, head, expected = tiny_reference
    ckpt = load_checkpoint(path)  # weights_only=True inside
    assert ckpt["format"] == REFERENCE_FORMAT and ckpt["epoch"] == 7
    expect = {"model_name": "dinov3_convnext_tiny", "classes": CLASSES, "arch_overrides": FIXTURE_ARCH}
    predictor = Predictor(path, device="cpu", imgsz=(128, 96), expect=expect)
    model = predictor.model
    assert predictor.meta["source"] == REFERENCE_FORMAT and predictor.classes == CLASSES
    assert model.config.feature_extractor == "last" and model.config.head == "retinanet"
    assert not predictor.input_spec.letterbox and predictor.input_spec.mean == (0.485, 0.456, 0.406)
    # backbone: the official model's get_intermediate_layers(n=1, reshape, norm) on the fixture input
    x = torch.load(fixtures_dir / "convnext_tiny_random" / "input.pt", weights_only=True)
    with torch.no_grad():
        feat = model.backbone(x)["0"]
    torch.testing.assert_close(feat, expected["last"], rtol=0, atol=1e-4)
    # head: torchvision's head with the reference's weights
    with torch.no_grad():
        ours, theirs = model.head([feat]), head([feat])
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k])
    dets = predictor.predict([torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8)])
    assert dets[0]["boxes"].shape[1] == 4


def test_reference_checkpoint_errors_are_one_line(tiny_reference, tmp_path: Path):
    from src.detection.inference.predictor import Predictor

    path, _, _ = tiny_reference
    with pytest.raises(UserError, match="reference project.*--model-name and --config"):
        Predictor(path, device="cpu")
    with pytest.raises(UserError, match="--head ssd contradicts.*retinanet"):
        Predictor(path, device="cpu", expect={"model_name": "dinov3_convnext_tiny", "classes": CLASSES,
                                               "arch_overrides": FIXTURE_ARCH, "head": "ssd"})
    with pytest.raises(UserError, match="convnext checkpoint but --model-name dinov3_vits16 is a vit"):
        Predictor(path, device="cpu", expect={"model_name": "dinov3_vits16", "classes": CLASSES})
    with pytest.raises(UserError) as exc:  # other sizes than the weights: the keys that differ are named
        Predictor(path, device="cpu", expect={"model_name": "dinov3_convnext_tiny", "classes": CLASSES})
    assert "\n" not in str(exc.value) and "other shapes" in str(exc.value) and "stages." in str(exc.value)
    with pytest.raises(UserError, match="cls_logits.weight.*classes of --config"):  # wrong class count
        Predictor(path, device="cpu", expect={"model_name": "dinov3_convnext_tiny", "arch_overrides": FIXTURE_ARCH,
                                               "classes": CLASSES + ["triangle"]})
    sd = torch.load(path, weights_only=True)
    del sd["model_state_dict"][REFERENCE_BACKBONE_PREFIX + "norm.weight"]
    sd["model_state_dict"]["head.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(sd, broken)
    with pytest.raises(UserError, match="norm.weight"):
        Predictor(broken, device="cpu", expect={"model_name": "dinov3_convnext_tiny", "classes": CLASSES,
                                                 "arch_overrides": FIXTURE_ARCH})


# ------------------------------------------------------------------------------------------ the commands
@pytest.mark.slow
def test_reference_vits16_ssd_checkpoint_in_every_command(fixtures_dir: Path, tmp_path: Path):
    """A full-size dinov3_vits16 SSD reference checkpoint (random values) through the image command, evaluate and
    the video command's predictor, with the reference's flags."""
    import cv2

    from src.detection.data.synthetic import CLASSES as SHAPES
    from src.detection.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", 1, 2, imgsz=64, seed=0)
    classes = list(SHAPES)
    backbone = official_random(official_keys(fixtures_dir, "dinov3_vits16"), 384, 6)
    ckpt = tmp_path / "reference_ssd.pth"
    torch.save({"epoch": 1, "model_state_dict": reference_state_dict(backbone, reference_head("ssd", 384, len(classes)))},
               ckpt)
    flags = ["--model", str(ckpt), "--model-name", "dinov3_vits16", "--head", "ssd", "--config", str(data),
             "--imgsz", "64", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), (torch.rand(48, 80, 3) * 255).byte().numpy())
    out = subprocess.run([sys.executable, "infer_det_image.py", "-i", str(images), *flags, "--out-dir",
                          str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reference-project checkpoint" in out.stdout and (tmp_path / "out" / "predictions.json").is_file()
    # evaluate and the video command in-process (their parsers, the same code path as their CLIs)
    from src.detection.commands.evaluate import build_parser, eval_config_from_args
    from src.detection.engine.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(eval_config_from_args(build_parser().parse_args([*flags, "--workers", "0"])))
    assert result.n_images == 2
    from src.detection.commands.infer_video import build_video_parser
    from src.detection.inference.options import predict_config_from_args
    from src.detection.inference.predictor import build_predictor

    args = build_video_parser().parse_args(["--input", "clip.mp4", *flags])
    predictor = build_predictor(predict_config_from_args(args), verbose=False)
    assert predictor.meta["source"] == REFERENCE_FORMAT and predictor.model.config.head == "ssd"
