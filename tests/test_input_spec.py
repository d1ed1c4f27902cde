"""The input specification: one object (size, letterbox, size multiple, mean/std) from the built model into checkpoint
metadata and back, and the preprocessing / box mapping every command shares."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from src.detection.checkpoint import build_payload, load_checkpoint, model_meta, save_checkpoint
from src.detection.core.errors import UserError
from src.detection.data.transforms import PAD_VALUE, boxes_to_original, letterbox_size, resize_image
from src.detection.modeling.builder import build_detector
from src.detection.modeling.config import DetectorConfig
from src.detection.modeling.entrypoints import NORMALIZATION
from src.detection.modeling.input_spec import InputSpec

CLASSES = ["__background__", "a", "b"]
ATTO = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
VIT = {"embed_dim": 64, "depth": 2, "num_heads": 4}


@pytest.fixture(autouse=True)
def _quiet():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weight backbones warn on every build
        yield
    torch.set_num_threads(previous)


def build(name, arch, **kw):
    torch.manual_seed(0)
    kw.setdefault("fpn_channels", 64)
    return build_detector(DetectorConfig(name, len(CLASSES), arch_overrides=arch, **kw), verbose=False).eval()


def save(model, path: Path, letterbox=None) -> Path:
    return save_checkpoint(path, build_payload(model, model_meta(model, CLASSES, letterbox=letterbox)))


# ------------------------------------------------------------------------------------------------ size multiple
@pytest.mark.parametrize("name, arch, mode, multiple", [
    ("dinov3_vit_tiny", VIT, "last", 16), ("dinov3_vit_tiny", VIT, "multi", 32),
    ("dinov3_convnext_atto", ATTO, "last", 32), ("dinov3_convnext_atto", ATTO, "multi", 32)])
def test_size_multiple_is_what_the_model_pads_to(name, arch, mode, multiple):
    model = build(name, arch, feature_extractor=mode, imgsz=(100, 70))
    spec = model.input_spec
    assert spec.size_multiple == multiple
    batch, _ = model.transform(torch.zeros((1, 3, 70, 100), dtype=torch.uint8))
    assert tuple(batch.tensors.shape[-2:]) == (-(-70 // multiple) * multiple, -(-100 // multiple) * multiple)


def test_spec_round_trips_through_checkpoint_metadata(tmp_path: Path):
    model = build("dinov3_convnext_atto", ATTO, head="fcos", imgsz=(96, 64), letterbox=True)
    path = save(model, tmp_path / "m.pth")
    meta = load_checkpoint(path)["meta"]
    assert InputSpec.from_dict(meta["input"]) == model.input_spec
    assert meta["input"] == {"imgsz": [96, 64], "letterbox": True, "size_multiple": 32,
                             "mean": list(NORMALIZATION["lvd1689m"][0]), "std": list(NORMALIZATION["lvd1689m"][1]),
                             "fixed_aspect": False}
    assert DetectorConfig.from_dict(meta).input_spec == model.input_spec
    with pytest.raises(ValueError, match="not resolved"):
        _ = DetectorConfig("dinov3_convnext_atto", 3).input_spec


def test_checkpoint_from_before_the_input_dict_still_loads(tmp_path: Path):
    """Older metadata: imgsz / letterbox / mean / std at the top level, no ``input``."""
    from src.detection.checkpoint import model_from_checkpoint

    model = build("dinov3_convnext_atto", ATTO, head="fcos", imgsz=(96, 64))
    payload = build_payload(model, model_meta(model, CLASSES))
    meta = payload["meta"]
    del meta["input"]
    sat_mean, sat_std = NORMALIZATION["sat493m"]
    meta.update(imgsz=[96, 64], letterbox=True, mean=list(sat_mean), std=list(sat_std))
    loaded, meta2 = model_from_checkpoint(save_checkpoint(tmp_path / "old.pth", payload), "cpu")
    spec = loaded.input_spec
    assert spec.imgsz == (96, 64) and spec.letterbox and spec.mean == sat_mean and spec.std == sat_std
    assert spec.size_multiple == 32 and meta2["input"] == spec.to_dict()


# ------------------------------------------------------------------------------------------------ SAT-493M
def test_sat_backbone_is_reloaded_with_sat_statistics(tmp_path: Path, fixtures_dir: Path):
    """Training picks the SAT-493M variant from the weights file name; the checkpoint records the hub name
    (dinov3_vitl16), whose default statistics are ImageNet's - inference must still normalize with SAT's."""
    from src.detection.inference.predictor import Predictor

    weights = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    shutil.copy(fixtures_dir / "vit_s_like_random" / "weights.pth", weights)  # official keys, ViT-S-like shapes
    arch = {"embed_dim": 64, "depth": 4, "num_heads": 4, "untie_global_and_local_cls_norm": False}
    cfg = DetectorConfig("dinov3_vitl16", len(CLASSES), head="retinanet", feature_extractor="last", imgsz=(64, 48),
                         arch_overrides=arch)
    model = build_detector(cfg, weights=str(weights), verbose=False).eval()
    sat_mean, sat_std = NORMALIZATION["sat493m"]
    assert model.dino.weights_family == "sat493m" and model.input_spec.mean == sat_mean
    path = save(model, tmp_path / "sat.pth")
    assert load_checkpoint(path)["meta"]["model_name"] == "dinov3_vitl16"

    predictor = Predictor(path, device="cpu")
    assert predictor.input_spec.mean == sat_mean and predictor.input_spec.std == sat_std
    x = torch.full((1, 3, 48, 64), 200, dtype=torch.uint8)
    normalized = predictor.model.transform(x)[0].tensors[0, :, 0, 0]
    torch.testing.assert_close(normalized, (200 / 255 - torch.tensor(sat_mean)) / torch.tensor(sat_std))
    # and the reloaded model computes what the trained one did
    with torch.no_grad():
        a, b = model(x), predictor.model(x)
    torch.testing.assert_close(a[0]["scores"], b[0]["scores"])


# ------------------------------------------------------------------------------------------------ geometry
def test_keep_aspect_uses_the_letterbox_scale_of_a_non_square_imgsz():
    """A 4:3 photo into a 160x96 letterbox: scale min(160/240, 96/180) = 0.533, not long side 160 (0.667)."""
    spec = InputSpec((160, 96), letterbox=True, size_multiple=32)
    image = torch.randint(0, 255, (3, 180, 240), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert spec.input_size((180, 240), keep_aspect=True) == (128, 96)
    full = spec.preprocess(image)
    assert full.shape == (3, 96, 160) and (full[:, :, 128:] == PAD_VALUE).all()
    fast = spec.preprocess(image, keep_aspect=True)
    assert torch.equal(fast, full[:, :, :128])  # the same pixels at the same scale, minus the padding
    boxes = torch.tensor([[16.0, 8.0, 64.0, 40.0]])
    torch.testing.assert_close(spec.boxes_to_original(boxes, (180, 240), keep_aspect=True), boxes / (128 / 240))
    # content sizes that are not multiples get padding up to the next multiple only (capped at imgsz rounded up)
    tall = InputSpec((100, 100), letterbox=True, size_multiple=32)
    assert letterbox_size((300, 120), (100, 100)) == (100, 40)
    assert tall.input_size((300, 120), keep_aspect=True) == (64, 128)
    out = tall.preprocess(torch.zeros((3, 300, 120), dtype=torch.uint8), keep_aspect=True)
    assert out.shape == (3, 128, 64) and (out[:, :, 40:] == PAD_VALUE).all() and (out[:, 100:] == PAD_VALUE).all()


def test_preprocess_is_the_validation_resize():
    from torchvision import tv_tensors

    from src.detection.data.transforms import build_transform

    image = torch.randint(0, 255, (3, 75, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for letterbox in (False, True):
        spec = InputSpec((96, 64), letterbox=letterbox)
        loader_op = build_transform("flip", spec.imgsz, letterbox=letterbox, train=False)
        out, _ = loader_op(tv_tensors.Image(image), {"boxes": tv_tensors.BoundingBoxes(
            torch.zeros(0, 4), format="XYXY", canvas_size=(75, 130)), "labels": torch.zeros(0)})
        assert torch.equal(spec.preprocess(image), out.as_subclass(torch.Tensor))
        assert torch.equal(spec.preprocess(image), resize_image(image, (96, 64), letterbox))
        boxes = torch.tensor([[3.0, 4.0, 50.0, 60.0]])
        assert torch.equal(spec.boxes_to_original(boxes, (75, 130)), boxes_to_original(boxes, (75, 130), (96, 64),
                                                                                        letterbox))


def _ssd_checkpoint(tmp_path: Path) -> Path:
    model = build("dinov3_convnext_atto", ATTO, head="ssd", feature_extractor="last", imgsz=(128, 128), letterbox=True)
    assert model.input_spec.fixed_aspect
    return save(model, tmp_path / "ssd.pth")


def test_ssd_is_never_fed_another_aspect_ratio(tmp_path: Path):
    """Default boxes are fractions of the input tensor: a 4:3 input would shrink their heights by 25 %."""
    from src.detection.inference.predictor import Predictor

    path = _ssd_checkpoint(tmp_path)
    default = Predictor(path, device="cpu")
    assert default.input_size((480, 640)) == (128, 128) and not default.keep_aspect
    assert default.preprocess(torch.zeros((3, 480, 640), dtype=torch.uint8)).shape == (3, 128, 128)
    with pytest.raises(UserError, match="--keep-aspect.*SSD"):
        Predictor(path, device="cpu", keep_aspect=True)
    with pytest.raises(UserError, match="--imgsz 160 120.*aspect ratio 128:128"):
        Predictor(path, device="cpu", imgsz=(160, 120))
    assert Predictor(path, device="cpu", imgsz=256).imgsz == (256, 256)  # same aspect: fine


def test_keep_aspect_is_refused_for_a_stretch_trained_model(tmp_path: Path):
    """A stretch-trained model fed letterboxed content at another scale loses most of its accuracy: refuse."""
    from src.detection.inference.predictor import Predictor

    with pytest.raises(UserError, match="--keep-aspect: this model was trained on stretched inputs.*--letterbox"):
        InputSpec((96, 64), letterbox=False).check_keep_aspect()
    InputSpec((96, 64), letterbox=True).check_keep_aspect()  # letterbox-trained: fine
    model = build("dinov3_convnext_atto", ATTO, imgsz=(96, 64))
    stretch = save(model, tmp_path / "stretch.pth", letterbox=False)
    with pytest.raises(UserError, match="--keep-aspect.*stretched") as err:
        Predictor(stretch, device="cpu", keep_aspect=True)
    assert "\n" not in str(err.value)
    boxed = save(model, tmp_path / "boxed.pth", letterbox=True)
    assert Predictor(boxed, device="cpu", keep_aspect=True).input_size((640, 480)) == (64, 64)  # less padding
