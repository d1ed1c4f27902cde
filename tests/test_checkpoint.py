"""Checkpoints: atomic writes, safe loading, clear errors for wrong files, RNG capture, model round trip, the model
card (every stored form since format 1, the ONNX sidecar) and preparing a checkpoint once."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import src.detection.checkpoint as ck
from src.detection.checkpoint import build as ck_build
from src.detection.core.errors import UserError


def _payload(value: float = 1.0) -> dict:
    return {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION,
            "meta": {"classes": ["__background__", "a"], "model_name": "x"},
            "model": {"w": torch.full((3,), value)}, "epoch": 3, "rng": ck.get_rng_state()}


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path / "sub" / "c.pth", _payload(2.5))
    out = ck.load_checkpoint(path)
    assert torch.equal(out["model"]["w"], torch.full((3,), 2.5))
    assert out["epoch"] == 3 and out["meta"]["classes"] == ["__background__", "a"]
    assert out["path"] == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["c.pth"]  # no temp file left


def test_failing_save_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pth"
    ck.save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, _payload(9.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    good = ck.save_checkpoint(tmp_path / "good.pth", _payload())
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    for bad in (trunc, garbage):
        with pytest.raises(UserError, match="corrupt or truncated") as exc:
            ck.load_checkpoint(bad)
        assert "\n" not in str(exc.value) and bad.name in str(exc.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found.*--model"):
        ck.load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder"):
        ck.load_checkpoint(tmp_path)


def test_backbone_weights_file_is_recognised(tmp_path: Path) -> None:
    # Shape of an official DINOv3 ConvNeXt state dict (key names from the official checkpoints).
    raw = {"downsample_layers.0.0.weight": torch.zeros(2, 3, 4, 4), "stages.0.0.gamma": torch.zeros(2),
           "norm.weight": torch.ones(2)}
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(raw, path)
    with pytest.raises(UserError, match="looks like a backbone weights file.*pass it with --weights, not --model"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize("keys", [
    # transformers DINOv3 ViT / ConvNeXt names, timm's (as timm.create_model writes them), prefixed official ones
    ["embeddings.cls_token", "embeddings.patch_embeddings.weight", "layer.0.attention.k_proj.weight", "norm.weight"],
    ["stages.0.downsample_layers.0.weight", "stages.0.layers.0.depthwise_conv.weight", "layer_norm.weight"],
    ["cls_token", "reg_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.gamma_1"],
    ["stem.0.weight", "stages.0.blocks.0.conv_dw.weight", "stages.1.downsample.1.weight", "head.norm.weight"],
    ["backbone.storage_tokens", "backbone.blocks.0.attn.qkv.weight", "backbone.norm.weight"],
], ids=["transformers-vit", "transformers-convnext", "timm-vit", "timm-convnext", "prefixed-official"])
def test_backbone_weights_in_every_layout_are_recognised(tmp_path: Path, keys: list[str]) -> None:
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {k: torch.zeros(2) for k in keys}}, path)
    with pytest.raises(UserError, match="looks like a backbone weights file.*pass it with --weights, not --model"):
        ck.load_checkpoint(path)


def test_safetensors_and_weights_folders_passed_as_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 4), "layer.0.norm1.weight": torch.ones(4)},
              folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is a backbone weights file, not a detector checkpoint.*--weights"):
        ck.load_checkpoint(folder / "model.safetensors")
    with pytest.raises(UserError, match="looks like a backbone weights folder.*pass it with --weights"):
        ck.load_checkpoint(folder)


def test_detector_state_dicts_are_not_taken_for_backbones(tmp_path: Path) -> None:
    path = tmp_path / "torchvision.pth"
    torch.save({"backbone.body.stem.0.weight": torch.zeros(1), "head.classification_head.conv.weight": torch.zeros(1)},
               path)
    with pytest.raises(UserError, match="not a checkpoint of this toolkit"):
        ck.load_checkpoint(path)


def test_foreign_and_unsafe_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "model_state_dict": {"head.w": torch.zeros(1)}}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this toolkit.*model_state_dict"):
        ck.load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pth"
    torch.save({"format": ck.FORMAT, "obj": Path("x")}, pickled)  # arbitrary object: refused by weights_only
    with pytest.raises(UserError, match=r"arbitrary Python objects \(pathlib\.\w*Path\)"):
        ck.load_checkpoint(pickled)
    legacy = tmp_path / "legacy.pth"  # the pre-zip torch.save format cannot be inspected without unpickling
    torch.save({"format": ck.FORMAT, "obj": Path("x")}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        ck.load_checkpoint(legacy)


def test_unsupported_format_version(tmp_path: Path) -> None:
    payload = _payload()
    payload["format_version"] = ck.FORMAT_VERSION + 1
    path = ck.save_checkpoint(tmp_path / "future.pth", payload)
    with pytest.raises(UserError, match=f"format_version {ck.FORMAT_VERSION + 1}"):
        ck.load_checkpoint(path)


def test_rng_state_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.save_checkpoint(tmp_path / "rng.pth", _payload())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ck.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.fixture(scope="module")
def tiny_model():
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=3, head="fcos", imgsz=(64, 96),
                         fpn_channels=64, arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return build_detector(cfg, verbose=False).eval()


def test_model_round_trip_without_backbone_file(tiny_model, tmp_path: Path) -> None:
    meta = ck.model_meta(tiny_model, ["__background__", "a", "b"], letterbox=True)
    assert meta["input"]["imgsz"] == [64, 96] and meta["input"]["letterbox"] is True and len(meta["input"]["mean"]) == 3
    assert "imgsz" not in meta  # the input spec is its one record
    path = ck.save_checkpoint(tmp_path / "m.pth", ck.build_payload(tiny_model, meta, epoch=4, best_metric=0.5))
    model, meta2 = ck.model_from_checkpoint(path, "cpu", overrides={"score_thresh": 0.2})
    assert meta2["includes_backbone"] is True and meta2["classes"] == ["__background__", "a", "b"]
    assert model.config.score_thresh == 0.2 and model.config.imgsz == (64, 96) and not model.training
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randint(0, 255, (1, 3, 96, 64), dtype=torch.uint8)
    with torch.no_grad():
        ours, theirs = (list(m.backbone(m.transform(x)[0].tensors).values()) for m in (tiny_model, model))
    assert len(ours) == len(theirs) == 5 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_checkpoint_without_backbone(tiny_model, tmp_path: Path) -> None:
    meta = ck.model_meta(tiny_model, ["__background__", "a", "b"], letterbox=False)
    with pytest.raises(UserError, match="--no-save-backbone needs --weights"):
        ck.build_payload(tiny_model, meta, include_backbone=False)
    full = ck.build_payload(tiny_model, meta)["model"]
    slim = ck.build_payload(tiny_model, {**meta, "weights": "backbone.pth"}, include_backbone=False)
    dino_keys = set(full) - set(slim["model"])
    assert dino_keys and slim["meta"]["includes_backbone"] is False
    assert all(not tiny_model.get_parameter(k).requires_grad for k in dino_keys if k.endswith("weight"))
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable <= set(slim["model"])
    slim["meta"]["weights"] = None
    path = ck.save_checkpoint(tmp_path / "slim.pth", slim)
    with pytest.raises(UserError, match="saved without its backbone.*--weights"):
        ck.model_from_checkpoint(path, "cpu")


def test_edited_checkpoint_is_one_line_naming_keys(tiny_model, tmp_path: Path) -> None:
    payload = ck.build_payload(tiny_model, ck.model_meta(tiny_model, ["__background__", "a", "b"]))
    weight = next(k for k in payload["model"] if k.startswith("head.") and k.endswith("weight"))
    payload["model"][weight] = torch.zeros(1, 2)
    payload["model"]["head.extra.bias"] = torch.zeros(1)
    path = ck.save_checkpoint(tmp_path / "edited.pth", payload)
    with pytest.raises(UserError) as exc:
        ck.model_from_checkpoint(path, "cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "head.extra.bias" in msg and f"{weight} [1, 2]" in msg


def test_backbone_provenance_is_recorded(tmp_path: Path) -> None:
    """A detector built from a weights file records where its backbone came from; a random one records None."""
    from src.detection.inference.predictor import Predictor
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=3, head="fcos", imgsz=(64, 64),
                         fpn_channels=64, arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        random_model = build_detector(cfg, verbose=False)
    assert ck.model_meta(random_model, ["__background__", "a", "b"])["weights_source"] is None
    weights = tmp_path / "backbone.pth"
    torch.save(random_model.dino.model.state_dict(), weights)  # timm's key names
    model = build_detector(cfg, weights=str(weights), verbose=False)
    meta = ck.model_meta(model, ["__background__", "a", "b"], weights=str(weights))
    want = {"format": "timm", "path": str(weights.resolve()), "hub": None}
    assert meta["weights_source"] == want and "category_ids" not in meta
    path = ck.save_checkpoint(tmp_path / "m.pth", ck.build_payload(model, meta))
    assert ck.load_checkpoint(path)["meta"]["weights_source"] == want
    assert f"backbone from timm weights {weights.resolve()}" in Predictor(path, device="cpu").describe()


def test_loading_a_checkpoint_skips_the_random_init_and_keeps_computed_buffers(tmp_path: Path, monkeypatch) -> None:
    """The model is built with parameters on the meta device and takes the checkpoint's tensors as they are (no
    copy); buffers the state dict does not hold (ViT RoPE periods, attention k_bias, normalization constants) are
    still computed, so every tensor and the output equal a normally built model's. If construction cannot run that
    way, the normal build is used."""
    import contextlib

    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_vit_tiny", num_classes=3, head="retinanet", imgsz=(64, 64),
                         fpn_channels=64, arch_overrides={"embed_dim": 64, "depth": 2, "num_heads": 4})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        original = build_detector(cfg, verbose=False).eval()
    path = ck.save_checkpoint(tmp_path / "vit.pth", ck.build_payload(original, ck.model_meta(original, ["__background__", "a", "b"])))
    ckpt = ck.load_checkpoint(path)
    model, _ = ck.model_from_checkpoint(ckpt, "cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    reference = dict(original.named_parameters()) | dict(original.named_buffers())
    assert tensors.keys() == reference.keys() and not any(t.is_meta for t in tensors.values())
    assert any("rope" in k for k in tensors) and any("k_bias" in k for k in tensors)  # non-persistent buffers
    for k, t in tensors.items():
        assert torch.equal(t, reference[k]), k
    weight = next(k for k in ckpt["model"] if k.startswith("backbone.dino.") and k.endswith("weight"))
    assert tensors[weight].data_ptr() == ckpt["model"][weight].data_ptr()  # taken over, not copied
    frozen = {k for k, p in original.named_parameters() if not p.requires_grad}
    assert {k for k, p in model.named_parameters() if not p.requires_grad} == frozen
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x)[0]["scores"], original(x)[0]["scores"])

    @contextlib.contextmanager
    def refuse():  # stands in for construction code that cannot run with meta parameters
        raise RuntimeError("Tensor on device cpu is not on the expected device meta!")
        yield

    monkeypatch.setattr(ck_build, "parameters_on_meta", refuse)
    fallback, _ = ck.model_from_checkpoint(ck.load_checkpoint(path), "cpu")
    for k, t in (dict(fallback.named_parameters()) | dict(fallback.named_buffers())).items():
        assert torch.equal(t, reference[k]), k


def test_meta_parameters_only_for_the_thread_inside_the_block() -> None:
    """Modules other threads build meanwhile keep real parameters; everything is as before once the block ends."""
    import threading

    before = torch.nn.Module.register_parameter
    other: list[torch.nn.Module] = []
    with ck.parameters_on_meta():
        mine = torch.nn.Linear(2, 2)
        worker = threading.Thread(target=lambda: other.append(torch.nn.Linear(2, 2)))
        worker.start()
        worker.join()
        assert mine.weight.is_meta and not other[0].weight.is_meta
    assert torch.nn.Module.register_parameter is before and not torch.nn.Linear(2, 2).weight.is_meta


# ------------------------------------------------------------------------------------------------ the model card
CLASSES = ["__background__", "a", "b"]


def _tiny(head: str = "fcos", **kw):
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=3, head=head, imgsz=(64, 96),
                         fpn_channels=64, arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}, **kw)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return build_detector(cfg, verbose=False).eval()


def _v1_payload(model, drop=("head_convs", "head_separable", "input"), **top) -> dict:
    """A format 1 payload: today's meta with the top-level imgsz older readers read, ``drop`` keys removed and
    ``top`` set (e.g. the top-level letterbox / mean / std that came before the ``input`` dict)."""
    payload = ck.build_payload(model, ck.model_meta(model, CLASSES))
    meta = payload["meta"]
    meta["imgsz"] = list(meta["input"]["imgsz"])
    for key in drop:
        meta.pop(key, None)
    meta.update(top)
    payload["format_version"] = 1
    return payload


def test_format_1_checkpoint_loads_with_the_old_defaults(tmp_path: Path) -> None:
    """No head_convs: torchvision's 4 convs; no head_separable: dense convs; no input dict: the top-level imgsz /
    letterbox / mean / std. Such a checkpoint rebuilds its model strictly."""
    from src.detection.modeling.heads import LEGACY_HEAD_CONVS

    model = _tiny(head_convs=4, head_separable=False)
    mean, std = [0.4, 0.4, 0.4], [0.2, 0.25, 0.3]
    path = ck.save_checkpoint(tmp_path / "v1.pth", _v1_payload(model, letterbox=True, mean=mean, std=std))
    card = ck.load_card(ck.load_checkpoint(path))
    cfg = card.detector
    assert card.format_version == 1 and cfg.head_convs == LEGACY_HEAD_CONVS and cfg.head_separable is False
    assert cfg.imgsz == (64, 96) and cfg.letterbox is True and cfg.mean == tuple(mean) and cfg.std == tuple(std)
    assert cfg.size_multiple is None  # not recorded then: the built model says
    assert card.classes == CLASSES and card.provenance.source == "ours" and card.provenance.includes_backbone
    loaded, meta = ck.model_from_checkpoint(path, "cpu")  # strict: the old head's every tensor fits
    assert loaded.input_spec.size_multiple == 32 and loaded.input_spec.mean == tuple(mean)
    assert meta["head_separable"] is False and meta["input"]["letterbox"] is True and "imgsz" not in meta
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_format_1_rules_for_head_fields() -> None:
    """A separable or shorter head was always recorded; SSD has no conv tower, so neither field is filled in."""
    four = _tiny(head_convs=4, head_separable=False)
    card = ck.load_card(_v1_payload(four, drop=("head_convs",)))
    assert card.detector.head_convs == 4 and card.detector.head_separable is False
    from src.detection.modeling.builder import build_detector

    with pytest.warns(UserWarning, match="RANDOM weights"):
        rebuilt = build_detector(card.detector, verbose=False)
    rebuilt.load_state_dict(four.state_dict(), strict=True)
    one = _tiny(head_convs=1, head_separable=True)  # recorded values are kept as they are
    kept = ck.load_card(_v1_payload(one, drop=()))
    assert kept.detector.head_convs == 1 and kept.detector.head_separable is True
    ssd = ck.load_card(_v1_payload(_tiny(head="ssd")))
    assert ssd.detector.head_convs is None and ssd.detector.head_separable is None


def test_format_1_with_the_duplicate_imgsz_loads_and_new_meta_has_none(tmp_path: Path) -> None:
    model = _tiny()
    old = _v1_payload(model, drop=())  # the last format 1 form: input dict plus its imgsz at the top level
    assert old["meta"]["imgsz"] == old["meta"]["input"]["imgsz"]
    path = ck.save_checkpoint(tmp_path / "old.pth", old)
    loaded, meta = ck.model_from_checkpoint(path, "cpu")
    assert loaded.input_spec == model.input_spec and "imgsz" not in meta
    new = ck.build_payload(model, ck.model_meta(model, CLASSES))
    assert new["format_version"] == ck.FORMAT_VERSION == 2 and "imgsz" not in new["meta"]
    assert new["meta"]["input"]["imgsz"] == [64, 96]


def test_future_card_is_refused() -> None:
    model = _tiny()
    payload = ck.build_payload(model, ck.model_meta(model, CLASSES))
    payload["format_version"] = ck.FORMAT_VERSION + 1
    with pytest.raises(UserError, match=f"format_version {ck.FORMAT_VERSION + 1}, this toolkit reads 1..2"):
        ck.load_card(payload)


def test_card_round_trips_through_checkpoint_meta_and_onnx_sidecar(tmp_path: Path) -> None:
    import json

    from src.detection.inference.sidecar import OnnxDescription, read_sidecar, sidecar_path

    model = _tiny()
    card = ck.ModelCard.from_model(model, CLASSES, category_ids=[0, 7, 3])
    assert card.labels.dataset_id(1) == 7 and card.input == model.input_spec
    path = ck.save_checkpoint(tmp_path / "m.pth", ck.build_payload(model, card))
    from_pth = ck.load_card(ck.load_checkpoint(path))
    assert from_pth == card and from_pth.format_version == ck.FORMAT_VERSION
    desc = OnnxDescription(card, graph={"batch": 1}, thresholds={"score_thresh": 0.05}, extra={"exported_from": "m"})
    onnx_path = tmp_path / "m.onnx"
    sidecar_path(onnx_path).write_text(json.dumps(desc.to_dict()))
    read = read_sidecar(onnx_path)
    assert read.card == card and read.graph == {"batch": 1} and read.extra == {"exported_from": "m"}
    side = json.loads(sidecar_path(onnx_path).read_text())
    assert {k: v for k, v in side.items() if k in from_pth.to_dict() and k != "input"} == {
        k: v for k, v in card.to_dict().items() if k != "input"}  # the same fields as a checkpoint's meta


def test_format_1_sidecar_with_its_detector_section_loads(tmp_path: Path) -> None:
    import json

    from src.detection.inference.sidecar import read_sidecar, sidecar_path

    model = _tiny(head_convs=4, head_separable=False)
    detector = model.config.to_dict()  # format 1: the config in its own section, without the newer head fields
    for key in ("head_convs", "head_separable"):
        detector.pop(key)
    side = {"format": "dinov3-detection-onnx", "format_version": 1, "toolkit_version": "0.1",
            "exported_from": "m.pth", "model_name": detector["model_name"], "head": "fcos",
            "feature_extractor": "multi", "classes": CLASSES, "category_ids": None, "num_classes": 3,
            "input": {**model.input_spec.to_dict(), "dtype": "uint8", "layout": "NCHW"},
            "thresholds": {"score_thresh": 0.05, "nms": 0.45, "max_det": 100, "topk_candidates": 1000},
            "graph": {"batch": 1}, "detector": detector, "verification": {"skipped": "--no-verify"}}
    sidecar_path(tmp_path / "m.onnx").write_text(json.dumps(side))
    card = read_sidecar(tmp_path / "m.onnx").card
    assert card.input == model.input_spec and card.detector.head_separable is False
    assert card.detector.head_convs == 4 and card.classes == CLASSES and card.labels.category_ids is None


def test_claims_are_checked_by_the_card() -> None:
    card = ck.ModelCard.from_model(_tiny(), CLASSES)
    card.check_matches({"model_name": "dinov3_convnext_atto", "classes": CLASSES, "head": None}, "m.pth")
    with pytest.raises(UserError, match=r"--head ssd contradicts checkpoint m.pth \(fcos\); drop the flag"):
        card.check_matches({"head": "ssd"}, "m.pth")
    with pytest.raises(UserError, match=r"--config 1 classes \['x'\]\.\.\. contradicts.*pass the --config the model"):
        card.check_matches({"classes": ["__background__", "x"]}, "m.pth", required=("classes",))


def test_training_options_of_every_format() -> None:
    """Format 1's parser namespace: amp is precision, parser-only keys dropped; a run recorded without
    head_separable trained dense heads."""
    args = {"amp": "none", "epochs": 7, "cfg": None}
    assert ck.training_options({"args": args}, known={"epochs", "precision", "head_separable"}) == {
        "precision": "fp32", "epochs": 7, "head_separable": False}
    assert ck.training_options({"args": {"amp": "bf16"}})["precision"] == "bf16"
    assert ck.training_options({"train_config": {"epochs": 3, "head_separable": True}}) == {
        "epochs": 3, "head_separable": True}
    assert ck.training_options({"meta": {}}) == {}


def test_predictor_from_a_path_prepares_the_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.detection.inference import predictor as predictor_module

    model = _tiny()
    path = ck.save_checkpoint(tmp_path / "m.pth", ck.build_payload(model, ck.model_meta(model, CLASSES)))
    calls: dict[str, int] = {}

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    counted(ck_build, "load_checkpoint")
    counted(ck_build, "load_card")
    counted(predictor_module, "prepare_checkpoint")
    cfg = predictor_module.PredictConfig(model=str(path), device="cpu", model_name="dinov3_convnext_atto",
                                         config=None, head="fcos")
    predictor = predictor_module.build_predictor(cfg, verbose=False)
    assert calls == {"load_checkpoint": 1, "load_card": 1, "prepare_checkpoint": 1}
    assert predictor.meta["input"]["imgsz"] == [64, 96] and "imgsz" not in predictor.meta
    calls.clear()
    predictor_module.Predictor(path, device="cpu", imgsz=(96, 128))
    assert calls == {"load_checkpoint": 1, "load_card": 1, "prepare_checkpoint": 1}
