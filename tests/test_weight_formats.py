"""--weights in every published layout: transformers folders/files (parity with the outputs transformers computed),
timm files (parity with timm's own forward), hub names from the Hugging Face cache, and the refusals."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from src.detection.core.errors import UserError
from src.detection.modeling import backbones as bb
from src.detection.modeling import weight_formats as wf
from src.detection.modeling.backbones import RandomWeightsWarning, build_backbone
from src.detection.modeling.dino import DinoBackbone
from src.detection.modeling.entrypoints import ENTRYPOINTS, NORMALIZATION

ATOL = 1e-4


def _hf_overrides(config: dict) -> tuple[str, dict]:
    """(entry point, official constructor kwargs) for a tiny transformers config, read field by field."""
    if config["model_type"] == "dinov3_convnext":
        return "dinov3_convnext_tiny", {"depths": config["depths"], "dims": config["hidden_sizes"]}
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    kw = {"embed_dim": dim, "depth": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
          "qkv_bias": config.get("query_bias", True)}
    if config.get("use_gated_mlp"):
        # official SwiGLU width: int(int(dim * ratio) * 2 / 3) rounded up to the alignment
        kw.update(ffn_layer="swiglu64" if hidden % 64 == 0 else "swiglu", ffn_ratio=hidden * 1.5 / dim)
        return "dinov3_vits16plus", kw
    kw.update(ffn_layer="mlp", ffn_ratio=hidden / dim)
    return "dinov3_vits16", kw


def _hf_build(folder: Path, weights=None, **kw) -> DinoBackbone:
    config = json.loads((folder / "hf" / "config.json").read_text())
    name, overrides = _hf_overrides(config)
    return build_backbone(name, weights=str(weights or folder / "hf"), arch_overrides=overrides, **kw)


def _tokens(b: DinoBackbone, x: torch.Tensor) -> torch.Tensor:
    """transformers' last_hidden_state from our outputs: [cls, registers, patches] (ConvNeXt: [pooled, patches])."""
    f = b.forward_features(x)
    return torch.cat([f["x_norm_clstoken"][:, None], f["x_storage_tokens"], f["x_norm_patchtokens"]], dim=1)


def _close(actual, expected) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def test_hf_fixtures_are_discovered(hf_fixture_folders):
    assert {"vit_s_like_hf", "convnext_like_hf"} <= {f.name for f in hf_fixture_folders}


def test_transformers_parity(hf_fixture):
    """Every discovered transformers fixture: the folder, and the safetensors file with config.json beside it, load
    through --weights and reproduce what transformers returned (expected.pt)."""
    x = torch.load(hf_fixture / "input.pt", weights_only=True)
    expected = torch.load(hf_fixture / "expected.pt", weights_only=True)
    for weights in (hf_fixture / "hf", hf_fixture / "hf" / "model.safetensors"):
        b = _hf_build(hf_fixture, weights)
        assert b.weights_source == {"format": "transformers", "path": str(weights.resolve()), "hub": None}
        tokens = _tokens(b, x)
        _close(tokens, expected["last_hidden_state"])
        _close(b.forward_features(x)["x_norm_clstoken"], expected["pooler_output"])
        # the detector's feature map = transformers' patch tokens laid out on the grid
        last = b.forward_last(x)
        n_prefix = tokens.shape[1] - last.shape[-2] * last.shape[-1]
        grid = expected["last_hidden_state"][:, n_prefix:].transpose(1, 2).reshape(last.shape)
        _close(last, grid)
    # per layer, before the final norm: ViT block outputs (all tokens), ConvNeXt stage maps
    hidden = expected["hidden_states"][1:]
    raw = b.get_intermediate_layers(x, n=len(hidden), reshape=b.family == "convnext", norm=False,
                                     return_class_token=b.family == "vit", return_extra_tokens=b.family == "vit")
    for ours, theirs in zip(raw, hidden):
        _close(torch.cat([ours[1][:, None], ours[2], ours[0]], dim=1) if b.family == "vit" else ours, theirs)


def test_transformers_live_model(hf_fixture):
    """With transformers installed, its own model on the fixture folder agrees too."""
    transformers = pytest.importorskip("transformers")
    config = json.loads((hf_fixture / "hf" / "config.json").read_text())
    cls = {"dinov3_vit": "DINOv3ViTModel", "dinov3_convnext": "DINOv3ConvNextModel"}[config["model_type"]]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    model = getattr(transformers, cls).from_pretrained(str(hf_fixture / "hf")).eval()
    x = torch.load(hf_fixture / "input.pt", weights_only=True)
    with torch.no_grad():
        out = model(pixel_values=x)
    b = _hf_build(hf_fixture)
    _close(_tokens(b, x), out.last_hidden_state)
    _close(b.forward_features(x)["x_norm_clstoken"], out.pooler_output)


# ---------------------------------------------------------------------------------------------------- timm layout

def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Values of the fixtures' scale: small residual branches, LayerNorm near identity, nothing trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim <= 1 or "token" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


TIMM_VITS = {  # timm model -> (our entry point, official kwargs of the same tiny size)
    "vit_small_patch16_dinov3_qkvb": ("dinov3_vits16", {}),
    "vit_small_patch16_dinov3": ("dinov3_vits16", {}),  # timm's bias-free copy: zero q/v biases
    "vit_small_plus_patch16_dinov3_qkvb": ("dinov3_vits16plus", {}),
}


@pytest.mark.parametrize("timm_name", list(TIMM_VITS))
def test_timm_vit_parity(timm_name, tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(timm_name, pretrained=False, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                              global_pool="token").eval()
    _randomize(model)
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.forward_features(x)  # [B, 1 + 4 + N, C] after the final norm
    entry, extra = TIMM_VITS[timm_name]
    overrides = {"embed_dim": 64, "depth": 2, "num_heads": 4, **extra}
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        b = build_backbone(entry, weights=str(tmp_path / f), arch_overrides=overrides)
        assert b.weights_source["format"] == "timm"
        _close(_tokens(b, x), want)
        _close(b.forward_last(x), want[:, 5:].transpose(1, 2).reshape(2, 64, 3, 4))


def test_timm_convnext_parity_and_hf_folder(tmp_path):
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64),
                              num_classes=0).eval()
    _randomize(model, seed=2)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model.forward_features(x)
        normed = model.head.norm(raw)
    save_for_hf(model, tmp_path / "timm_folder", safe_serialization=True)  # model.safetensors + timm config.json
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.bin")  # a training-style wrapper
    for weights in (tmp_path / "timm_folder", tmp_path / "ckpt.bin"):
        b = build_backbone("dinov3_convnext_tiny", weights=str(weights),
                           arch_overrides={"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64]})
        assert b.weights_source["format"] == "timm"
        _close(b.forward_last(x), normed)
        _close(b.forward_features(x)["x_prenorm"], raw.flatten(2).transpose(1, 2))


def test_sat_family_from_timm_config(tmp_path):
    """timm's pretrained_cfg (mean/std) marks SAT-493M weights: the SAT entry and its statistics are chosen."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("vit_large_patch16_dinov3_qkvb.sat493m", pretrained=False, embed_dim=64, depth=2,
                              num_heads=4, num_classes=0)
    save_for_hf(model, tmp_path / "sat", safe_serialization=True)
    b = build_backbone("dinov3_vitl16", weights=str(tmp_path / "sat"),
                       arch_overrides={"embed_dim": 64, "depth": 2, "num_heads": 4})
    assert b.model_name == "dinov3_vitl16_sat493m" and b.weights_family == "sat493m"
    assert (b.mean, b.std) == NORMALIZATION["sat493m"]


# ------------------------------------------------------------------------------------------------------ hub names

def _fake_hf_cache(home: Path, repo: str, files: Path) -> None:
    """The Hugging Face cache layout huggingface_hub reads offline (models--org--name/{refs,snapshots})."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(files, base / "snapshots" / commit)


@pytest.fixture
def offline_hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_name_from_the_cache(offline_hf_home, hf_fixture_folders):
    vit = next(f for f in hf_fixture_folders if f.name == "vit_s_like_hf")
    # an SAT-493M repository name marks the weight family when the files say nothing
    _fake_hf_cache(offline_hf_home, "facebook/dinov3-vitl16-pretrain-sat493m", vit / "hf")
    spec = "hf-hub:facebook/dinov3-vitl16-pretrain-sat493m"
    b = build_backbone("dinov3_vitl16", weights=spec, arch_overrides={"embed_dim": 64, "depth": 4, "num_heads": 4})
    assert b.weights_source["hub"] == spec and b.weights_source["format"] == "transformers"
    assert b.model_name == "dinov3_vitl16_sat493m" and b.weights_family == "sat493m"
    x = torch.load(vit / "input.pt", weights_only=True)
    _close(_tokens(b, x), torch.load(vit / "expected.pt", weights_only=True)["last_hidden_state"])


def test_hub_name_not_cached_offline(offline_hf_home):
    with pytest.raises(UserError) as exc:
        build_backbone("dinov3_convnext_tiny", weights="hf-hub:facebook/dinov3-convnext-tiny-pretrain-lvd1689m")
    msg = str(exc.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download facebook/dinov3-convnext-tiny-pretrain-lvd1689m" in msg and "licence" in msg
    with pytest.raises(UserError, match="hf download timm/convnext_tiny.dinov3_lvd1689m"):
        build_backbone("dinov3_convnext_tiny", weights="timm:convnext_tiny.dinov3_lvd1689m")
    with pytest.raises(UserError, match="not a timm pretrained tag"):
        build_backbone("dinov3_convnext_tiny", weights="timm:convnext_tiny")


# ------------------------------------------------------------------------------------------------------- refusals

def test_wrong_family_and_size_are_refused(hf_fixture_folders):
    folders = {f.name: f for f in hf_fixture_folders}
    with pytest.raises(UserError, match=r"transformers layout\) is a ConvNeXt .* --model-name dinov3_vits16 is a ViT"):
        build_backbone("dinov3_vits16", weights=str(folders["convnext_like_hf"] / "hf"))
    with pytest.raises(UserError, match=r"is a ViT with width 64, 4 blocks.*--model-name dinov3_vits16 is a ViT "
                                        r"with width 384"):
        build_backbone("dinov3_vits16", weights=str(folders["vit_s_like_hf"] / "hf"))
    with pytest.raises(UserError, match="no DINOv3 entry point; pass --model-name"):
        build_backbone(None, weights=str(folders["vit_s_like_hf"] / "hf"))
    with pytest.raises(UserError, match="4 attention heads"):  # sizes match, head count does not
        build_backbone("dinov3_vits16", weights=str(folders["vit_s_like_hf"] / "hf"),
                       arch_overrides={"embed_dim": 64, "depth": 4, "num_heads": 2})


def _official_hf_config(name: str) -> dict:
    """The transformers config.json of an official entry point (sizes as transformers' converters write them)."""
    e = ENTRYPOINTS[name]
    a = e["arch"]
    if e["family"] == "convnext":
        return {"model_type": "dinov3_convnext", "depths": a["depths"], "hidden_sizes": a["dims"]}
    dim, gated = a["embed_dim"], a["ffn_layer"] != "mlp"
    hidden = int(dim * a["ffn_ratio"])
    if gated:
        align = 64 if a["ffn_layer"] == "swiglu64" else 8
        hidden = -(-int(hidden * 2 / 3) // align) * align
    return {"model_type": "dinov3_vit", "hidden_size": dim, "num_hidden_layers": a["depth"],
            "num_attention_heads": a["num_heads"], "intermediate_size": hidden, "use_gated_mlp": gated,
            "hidden_act": "silu" if gated else "gelu", "num_register_tokens": 4, "query_bias": a["qkv_bias"],
            "value_bias": a["qkv_bias"], "key_bias": False, "layer_norm_eps": 1e-5 if e["family"] == "vit" else 1e-6}


@pytest.mark.parametrize("name", [n for n, e in ENTRYPOINTS.items() if e["official"]])
def test_every_official_size_is_recognised_from_its_config(name):
    """Architecture read from config.json -> the entry point (SAT twins by their statistics), and a wrong
    --model-name is refused with the right one suggested."""
    e = ENTRYPOINTS[name]
    loaded = wf.LoadedWeights(format="transformers", path=Path("x"), hub=None, state_dict={}, family=e["family"],
                              weights_family=e["weights_family"],
                              config_arch=wf.hf_config_architecture(_official_hf_config(name)))
    assert bb._infer_model_name(loaded) == name
    other = "dinov3_vitb16" if name != "dinov3_vitb16" else "dinov3_vits16"
    if e["family"] == "convnext":
        other = "dinov3_convnext_base" if name != "dinov3_convnext_base" else "dinov3_convnext_tiny"
    with pytest.raises(UserError, match=f"--model-name {other} is a .*pass --model-name "):
        bb._check_layout_arch(loaded, other, ENTRYPOINTS[other]["family"], ENTRYPOINTS[other]["arch"])


def test_unsupported_config_values_are_refused():
    cfg = _official_hf_config("dinov3_vits16")
    for key, value in (("patch_size", 14), ("rope_theta", 10000.0), ("key_bias", True), ("num_register_tokens", 0)):
        with pytest.raises(UserError, match=f"{key}={value!r}"):
            wf.hf_config_architecture({**cfg, key: value})
    with pytest.raises(UserError, match="not a DINOv3 backbone"):
        wf.hf_config_architecture({**cfg, "model_type": "dinov2"})


def test_truncated_and_foreign_files_are_refused(tmp_path, hf_fixture_folders):
    src = next(f for f in hf_fixture_folders if f.name == "vit_s_like_hf") / "hf"
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors: cannot be read as safetensors.*truncated"):
        _hf_build(src.parent, folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="cannot be read"):
        _hf_build(src.parent, folder)
    # transformers tensors without their config.json
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(src / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(UserError, match="need their config.json"):
        _hf_build(src.parent, lone / "model.safetensors")
    # tensors of some other model
    from safetensors.torch import save_file
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not DINOv3 backbone weights.*encoder.weight"):
        build_backbone("dinov3_vits16", weights=str(tmp_path / "other.safetensors"))


def test_extra_and_missing_tensors_are_named(tmp_path, hf_fixture_folders):
    from safetensors.torch import load_file, save_file

    src = next(f for f in hf_fixture_folders if f.name == "vit_s_like_hf") / "hf"
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    sd = load_file(src / "model.safetensors")
    save_file({**sd, "layer.0.attention.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"not part of a DINOv3 vit \(e\.g\. layer\.0\.attention\.extra\.weight"):
        _hf_build(src.parent, folder)
    save_file({k: v for k, v in sd.items() if k != "layer.3.mlp.up_proj.bias"}, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"1 missing \(e\.g\. layer\.3\.mlp\.up_proj\.bias\)"):
        _hf_build(src.parent, folder)
    save_file({k: v for k, v in sd.items() if k != "layer.1.attention.k_proj.weight"}, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"missing layer\.1\.attention\.k_proj\.weight"):
        _hf_build(src.parent, folder)


def test_hub_impl_refuses_other_layouts(tmp_path, monkeypatch, hf_fixture_folders):
    (tmp_path / "hubconf.py").write_text("")
    monkeypatch.setenv("DINOv3_REPO", str(tmp_path))
    folder = next(f for f in hf_fixture_folders if f.name == "vit_s_like_hf") / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        with pytest.raises(UserError, match="hub .*Meta's .pth only"):
            build_backbone("dinov3_vits16", weights=str(folder), impl="hub")


@pytest.mark.parametrize("variant", ["swiglu", "7b_like"])
def test_transformers_gated_models_live(variant, tmp_path):
    """SwiGLU ViTs (S+/L+/H+) and the 7B layout (SwiGLU, no q/v bias) written by transformers itself."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3")
    bias = variant == "swiglu"
    config = transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128 if bias else 192,
        use_gated_mlp=True, hidden_act="silu", num_register_tokens=4, query_bias=bias, value_bias=bias,
        key_bias=False, layerscale_value=0.1)
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    _randomize(model)
    model.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(pixel_values=x)
    b = _hf_build(tmp_path)
    _close(_tokens(b, x), out.last_hidden_state)
