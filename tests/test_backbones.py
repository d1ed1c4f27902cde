"""DINOv3 backbones: parity with the official code (fixtures), strict checkpoint mapping, counts, errors, freezing."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from src.detection.core.errors import UserError
from src.detection.core.paths import REPO_ROOT
from src.detection.modeling import hub
from src.detection.modeling.backbones import RandomWeightsWarning, build_backbone
from src.detection.modeling.dino import DinoBackbone
from src.detection.modeling.entrypoints import ENTRYPOINTS, NORMALIZATION, merge_arch
from src.detection.modeling.official_keys import convert_official_state_dict, official_param_count
from src.detection.modeling.weight_formats import resolve_weights

ATOL = 1e-4
# Expected keys we consciously do not reproduce, with the reason. Any other key in expected.pt must be checked.
UNSUPPORTED_KEYS = {
    "last_patchsize16": "ConvNeXt `patch_size` output resizing is a training-time option no hub entry point uses",
}
TINY_CONVNEXT = {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64]}


def quiet_build(*args, **kwargs) -> DinoBackbone:
    """build_backbone without the (expected) random-weights warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return build_backbone(*args, **kwargs)


def fixture_backbone(folder: Path, **kwargs) -> DinoBackbone:
    """Build a fixture's tiny model through the real path: official constructor kwargs as arch_overrides (on the
    entry point whose other settings are the official defaults), weights.pth via resolve_weights + strict load."""
    cfg = json.loads((folder / "config.json").read_text())
    base = {"ConvNeXt": "dinov3_convnext_tiny", "DinoVisionTransformer": "dinov3_vits16"}[cfg["official_class"]]
    return build_backbone(base, weights=str(folder / "weights.pth"), arch_overrides=cfg["constructor_kwargs"],
                          **kwargs)


def _outputs(b: DinoBackbone, x: torch.Tensor, key: str):
    """Our value for one expected.pt key (see the fixture README for how each was computed officially)."""
    gil = b.get_intermediate_layers
    grid = [x.shape[-2] // 16, x.shape[-1] // 16]
    xn = x[:, :, :90, :120]
    if key == "last":
        return b.forward_last(x)
    if key == "last4":
        return list(gil(x, n=4, reshape=True, norm=True))
    if key == "last_nonorm":
        return gil(x, n=1, reshape=True, norm=False)[0]
    if key == "cls":
        return gil(x, n=1, reshape=True, norm=True, return_class_token=True)[0][1]
    if key == "last4_cls":
        return [t[1] for t in gil(x, n=4, reshape=True, norm=True, return_class_token=True)]
    if key == "storage":
        return gil(x, n=1, reshape=True, norm=True, return_class_token=True, return_extra_tokens=True)[0][2]
    if key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        return b.forward_features(x)[key]
    if key == "forward":  # official model(x) = identity head on the cls token; timm: global_pool='token'
        with torch.no_grad():
            return b.model(x)
    if key in ("rope_sin", "rope_cos"):
        sin, cos = b.model.rope.get_embed(grid).chunk(2, dim=-1)
        return sin if key == "rope_sin" else cos
    if key == "nondiv_last":
        return b.forward_last(xn)
    if key == "nondiv_x_norm_clstoken":
        return b.forward_features(xn)["x_norm_clstoken"]
    raise KeyError(key)


def _close(actual, expected) -> None:
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _close(a, e)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def test_fixture_folders_are_discovered(official_fixture_folders):
    # the in-repo copy alone holds three; folders found elsewhere (shared/, $DINOV3_FIXTURES) add to them
    names = {f.name for f in official_fixture_folders}
    assert {"convnext_tiny_random", "vit_s_like_random", "vit_7b_like_random"} <= names


def test_parity_with_official_fixture(official_fixture):
    """Every discovered fixture folder (parametrized by conftest): each expected.pt key reproduced to 1e-4."""
    folder = official_fixture
    b = fixture_backbone(folder)
    x = torch.load(folder / "input.pt", weights_only=True)
    expected = torch.load(folder / "expected.pt", weights_only=True)
    failures, checked = [], 0
    for key, value in expected.items():
        if key in UNSUPPORTED_KEYS:
            continue
        try:
            _close(_outputs(b, x, key), value)
            checked += 1
        except (AssertionError, KeyError) as exc:
            failures.append(f"{folder.name}/{key}: {str(exc)[:300]}")
    # forward_multi is get_intermediate_layers on multi_indices: depth-4 ViT -> all 4 blocks, ConvNeXt stages 1-3
    skip = 1 if b.family == "convnext" else 0
    _close(b.forward_multi(x), list(expected["last4"])[skip:])
    assert not failures, "\n".join(failures)
    assert checked >= 8


def test_meta_models_accept_exactly_the_official_keys(fixtures_dir):
    files = sorted((fixtures_dir / "keys").glob("keys_*.json"))
    assert len(files) == 12
    for f in files:
        name = f.stem[len("keys_"):]
        shapes = json.loads(f.read_text())
        with torch.device("meta"):
            b = quiet_build(name)
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        mapped = convert_official_state_dict(sd, b.model, b.family, b.arch, name, f.name)  # raises on any mismatch
        result = b.model.load_state_dict(mapped, strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys, name
        # one key too few / too many / wrong shape is refused, naming the key
        drop = next(k for k in shapes if k.endswith("norm.bias"))
        args = (b.model, b.family, b.arch, name)
        with pytest.raises(UserError, match=f"missing.*{re.escape(drop)}"):
            convert_official_state_dict({k: v for k, v in sd.items() if k != drop}, *args)
        with pytest.raises(UserError, match=r"unexpected \(e\.g\. extra\.weight"):
            convert_official_state_dict({**sd, "extra.weight": torch.empty(3, device="meta")}, *args)
        bad = {**sd, drop: torch.empty(shapes[drop][0] + 1, device="meta")}
        with pytest.raises(UserError, match=f"other shapes.*{re.escape(drop)}"):
            convert_official_state_dict(bad, *args)


def test_entrypoint_table_matches_official_facts(fixtures_dir):
    official = json.loads((fixtures_dir / "entrypoints.json").read_text())
    assert set(official) == {n for n, e in ENTRYPOINTS.items() if e["official"]}
    for name, rec in official.items():
        e = ENTRYPOINTS[name]
        assert e["checkpoint_file"] == rec["checkpoint_file"], name
        assert e["hub_function"] == rec["hub_function"], name
        assert (tuple(NORMALIZATION[e["weights_family"]][0]), tuple(NORMALIZATION[e["weights_family"]][1])) == (
            tuple(rec["input_norm"]["mean"]), tuple(rec["input_norm"]["std"])), name
        kw = rec["constructor_kwargs"]
        for key, value in e["arch"].items():
            assert kw.get(key, False if key.startswith("untie") else None) == value, (name, key)
        # every official kwarg is either in our arch or accepted as an override
        merge_arch(name, e, kw)


def test_full_size_parameter_counts(fixtures_dir):
    official = json.loads((fixtures_dir / "entrypoints.json").read_text())
    for name, rec in official.items():
        with torch.device("meta"):
            b = quiet_build(name)
        assert official_param_count(b) == rec["n_params"], name
    with torch.device("meta"):  # the detector's reference-exact parameter count relies on timm holding every official tensor
        b = quiet_build("dinov3_convnext_tiny")
    assert sum(p.numel() for p in b.parameters()) == 27_820_128


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(UserError, match="valid names") as exc:
        build_backbone("dinov3_vit_giant")
    msg = str(exc.value)
    assert "dinov3_vit_giant" in msg and "\n" not in msg
    assert all(name in msg for name in ENTRYPOINTS)


def test_missing_weights_lists_places_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOv3_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError) as exc:
        build_backbone("dinov3_convnext_tiny", weights="nope-12345678.pth")
    msg = str(exc.value)
    assert "nope-12345678.pth" in msg and str(tmp_path / "nope-12345678.pth") in msg
    assert str(REPO_ROOT / "weights" / "nope-12345678.pth") in msg and "\n" not in msg
    # a bare name found in $DINOv3_WEIGHTS; a path works as given
    (tmp_path / "w.pth").write_bytes(b"x")
    assert resolve_weights("w.pth") == (tmp_path / "w.pth").resolve()
    assert resolve_weights(str(tmp_path / "w.pth")) == (tmp_path / "w.pth").resolve()
    assert resolve_weights(None) is None
    with pytest.raises(UserError, match="cannot be read"):  # not a checkpoint
        build_backbone("dinov3_convnext_tiny", weights="w.pth")


def test_wrong_architecture_checkpoint_names_keys(fixtures_dir):
    vit_s = fixtures_dir / "vit_s_like_random" / "weights.pth"
    with pytest.raises(UserError, match="vit checkpoint.*convnext"):
        build_backbone("dinov3_convnext_tiny", weights=str(vit_s), arch_overrides=TINY_CONVNEXT)
    # the 7B-like checkpoint (SwiGLU, no qkv bias, local_cls_norm) into a ViT-S-like model
    s_kwargs = json.loads((fixtures_dir / "vit_s_like_random" / "config.json").read_text())["constructor_kwargs"]
    with pytest.raises(UserError, match=r"unexpected \(e\.g\. .*local_cls_norm|mlp\.w1") as exc:
        build_backbone("dinov3_vits16", weights=str(fixtures_dir / "vit_7b_like_random" / "weights.pth"),
                       arch_overrides=s_kwargs)
    assert "missing" in str(exc.value) and "blocks.0.attn.qkv.bias" in str(exc.value)
    # full size: a ViT-B key set into ViT-S -> shape mismatches named and the right --model-name suggested
    shapes = json.loads((fixtures_dir / "keys" / "keys_dinov3_vitb16.json").read_text())
    with torch.device("meta"):
        b = quiet_build("dinov3_vits16")
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    shape_msg = r"other shapes \(e\.g\. mask_token \[1, 768\] vs model \[1, 384\].*--model-name dinov3_vitb16"
    with pytest.raises(UserError, match=shape_msg):
        convert_official_state_dict(sd, b.model, b.family, b.arch, "dinov3_vits16", "some_file.pth")


    # full size ConvNeXt-S keys into ConvNeXt-T: the extra stage-2 blocks are named by their official keys
    shapes = json.loads((fixtures_dir / "keys" / "keys_dinov3_convnext_small.json").read_text())
    with torch.device("meta"):
        b = quiet_build("dinov3_convnext_tiny")
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with pytest.raises(UserError, match=r"unexpected \(e\.g\. stages\.2\.9\..*--model-name dinov3_convnext_small"):
        convert_official_state_dict(sd, b.model, b.family, b.arch, "dinov3_convnext_tiny", "x.pth")


def test_rope_periods_are_checked(fixtures_dir, tmp_path):
    folder = fixtures_dir / "vit_s_like_random"
    sd = torch.load(folder / "weights.pth", weights_only=True)
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.01  # e.g. another RoPE base
    torch.save(sd, tmp_path / "w.pth")
    kwargs = json.loads((folder / "config.json").read_text())["constructor_kwargs"]
    with pytest.raises(UserError, match="rope_embed.periods"):
        build_backbone("dinov3_vits16", weights=str(tmp_path / "w.pth"), arch_overrides=kwargs)


@pytest.mark.parametrize("mask", ["ones", "k_first"])
def test_k_bias_mask_must_be_101(fixtures_dir, tmp_path, mask):
    folder = fixtures_dir / "vit_s_like_random"
    sd = torch.load(folder / "weights.pth", weights_only=True)
    m = sd["blocks.1.attn.qkv.bias_mask"]
    c = m.numel() // 3
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones_like(m) if mask == "ones" else torch.cat(
        [torch.zeros(c), torch.ones(2 * c)])
    torch.save(sd, tmp_path / "w.pth")
    kwargs = json.loads((folder / "config.json").read_text())["constructor_kwargs"]
    with pytest.raises(UserError, match="blocks.1.attn.qkv.bias_mask.*1/0/1"):
        build_backbone("dinov3_vits16", weights=str(tmp_path / "w.pth"), arch_overrides=kwargs)


def test_sat_checkpoint_detected_by_file_hash(fixtures_dir, tmp_path):
    folder = fixtures_dir / "vit_s_like_random"
    kwargs = json.loads((folder / "config.json").read_text())["constructor_kwargs"]
    sd = torch.load(folder / "weights.pth", weights_only=True)
    dim = kwargs["embed_dim"]
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    sat = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(sd, sat)
    b = build_backbone("dinov3_vitl16", weights=str(sat), arch_overrides=kwargs)
    assert b.model_name == "dinov3_vitl16_sat493m" and b.weights_family == "sat493m"
    assert (b.mean, b.std) == ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
    # the SAT head does not change features: same output as the LVD-style model on the same weights
    lvd = fixture_backbone(folder)
    x = torch.load(folder / "input.pt", weights_only=True)
    torch.testing.assert_close(b.forward_last(x), lvd.forward_last(x), rtol=0, atol=0)
    assert lvd.mean == (0.485, 0.456, 0.406)
    # without the SAT hash the extra local_cls_norm keys are unexpected (official strict loading agrees)
    plain = tmp_path / "plain.pth"
    shutil.copy(sat, plain)
    with pytest.raises(UserError, match="unexpected.*local_cls_norm"):
        build_backbone("dinov3_vitl16", weights=str(plain), arch_overrides=kwargs)


def test_hub_impl_needs_the_official_clone(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "load_dotenv_once", lambda: None)
    monkeypatch.delenv("DINOv3_REPO", raising=False)
    with pytest.raises(UserError, match="DINOv3_REPO"):
        build_backbone("dinov3_convnext_tiny", impl="hub")
    monkeypatch.setenv("DINOv3_REPO", str(tmp_path))
    with pytest.raises(UserError, match="hubconf.py"):
        build_backbone("dinov3_convnext_tiny", impl="hub")
    with pytest.raises(UserError, match="--backbone-impl 'official' is not valid; choose one of timm, hub"):
        build_backbone("dinov3_convnext_tiny", impl="official")


def test_random_init_warns_and_small_names_work():
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights.*random init only"):
        b = build_backbone("dinov3_vit_tiny")
    x = torch.randn(1, 3, 64, 80)
    assert b.forward_last(x).shape == (1, 192, 4, 5)
    assert b.multi_indices == [0, 2, 3, 5] and [s.stride for s in b.output_shape()["multi"]] == [16] * 4
    with pytest.warns(RandomWeightsWarning, match="dinov3_convnext_atto"):
        c = build_backbone("dinov3_convnext_atto")
    feats = c.forward_multi(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(80, 8, 10), (160, 4, 5), (320, 2, 2)]
    assert c.output_shape() == {"last": [(320, 32)], "multi": [(80, 8), (160, 16), (320, 32)]}
    torch.testing.assert_close(feats[-1], c.forward_last(x))  # stage 3 carries the final norm
    with pytest.raises(UserError, match="unknown key 'dpeth'"):
        build_backbone("dinov3_vit_tiny", arch_overrides={"dpeth": 3})
    with pytest.raises(UserError, match="patch_size=14"):
        build_backbone("dinov3_vit_tiny", arch_overrides={"patch_size": 14})


@pytest.mark.parametrize("name, arch", [("dinov3_convnext_atto", TINY_CONVNEXT),
                                        ("dinov3_vit_tiny", {"embed_dim": 32, "num_heads": 2, "depth": 5})])
def test_output_shape_is_what_forward_returns(name, arch):
    """The declared channels and strides of each feature extractor are those of the maps the forwards return."""
    b = quiet_build(name, arch_overrides=arch)
    x = torch.randn(1, 3, 64, 96)
    shapes = b.output_shape()
    assert set(shapes) == {"last", "multi"}
    for mode, maps in (("last", [b.forward_last(x)]), ("multi", b.forward_multi(x))):
        got = [(f.shape[1], x.shape[-2] // f.shape[-2], x.shape[-1] // f.shape[-1]) for f in maps]
        assert got == [(s.channels, s.stride, s.stride) for s in shapes[mode]], mode
    shapes["last"].clear()  # a copy: the backbone's declaration cannot be changed from outside
    assert len(b.output_shape()["last"]) == 1


def test_vit_multi_blocks_evenly_spaced():
    b = quiet_build("dinov3_vit_tiny", arch_overrides={"embed_dim": 32, "num_heads": 2, "depth": 12})
    assert b.multi_indices == [2, 5, 8, 11]
    x = torch.randn(1, 3, 40, 56)  # not multiples of 16: cropped like the official patch-conv floor
    feats = b.forward_multi(x)
    ref = b.get_intermediate_layers(x[:, :, :32, :48], n=[2, 5, 8, 11], reshape=True, norm=True)
    assert len(feats) == 4 and all(f.shape == (1, 32, 2, 3) for f in feats)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=0, atol=0)
    with pytest.raises(ValueError):
        b.get_intermediate_layers(x, n=13)


def test_frozen_backbone_stays_frozen(fixtures_dir):
    b = fixture_backbone(fixtures_dir / "convnext_tiny_random")
    parent = nn.Sequential(b, nn.Identity())
    parent.train()
    assert b.frozen and not b.model.training
    assert not any(p.requires_grad for p in b.parameters())
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    y = b.forward_last(x)
    assert not y.requires_grad and y.grad_fn is None
    assert all(f.grad_fn is None for f in b.forward_multi(x))


def test_fine_tune_trains(fixtures_dir):
    b = fixture_backbone(fixtures_dir / "vit_s_like_random", fine_tune=True)
    b.train()
    assert not b.frozen and b.model.training
    assert all(p.requires_grad for p in b.parameters())
    sum(f.sum() for f in b.forward_multi(torch.randn(1, 3, 32, 32))).backward()
    assert b.model.blocks[0].attn.q_bias.grad is not None
    assert b.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


FAKE_HUBCONF = '''
import torch
from torch import nn
CALLS = []

class Official(nn.Module):
    """Stands in for the official ConvNeXt: records the calls the wrapper makes."""
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.w = nn.Parameter(torch.ones(1))
    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        CALLS.append(dict(n=n, reshape=reshape, norm=norm, cls=return_class_token))
        idx = range(4 - n, 4) if isinstance(n, int) else n
        return tuple(x.sum() * 0 * self.w + torch.full((x.shape[0], 8 * (i + 1), 2, 2), float(i)) for i in idx)

def dinov3_convnext_tiny(pretrained=True, weights=None, **kwargs):
    m = Official(pretrained=pretrained, weights=weights, **kwargs)
    m.calls = CALLS
    return m
'''


def test_hub_impl_wraps_the_official_model(tmp_path, monkeypatch):
    (tmp_path / "hubconf.py").write_text(FAKE_HUBCONF)
    monkeypatch.setenv("DINOv3_REPO", str(tmp_path))
    b = quiet_build("dinov3_convnext_tiny", impl="hub", arch_overrides=TINY_CONVNEXT)
    assert b.impl == "hub" and b.model.kwargs == dict(pretrained=False, weights=None, **TINY_CONVNEXT)
    assert [s.channels for s in b.output_shape()["multi"]] == [32, 48, 64] and b.output_shape()["last"] == [(64, 32)]
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    last, multi = b.forward_last(x), b.forward_multi(x)
    assert b.model.calls == [dict(n=1, reshape=True, norm=True, cls=False),
                             dict(n=[1, 2, 3], reshape=True, norm=True, cls=False)]
    assert torch.equal(last[0, 0], torch.full((2, 2), 3.0)) and [f[0, 0, 0, 0].item() for f in multi] == [1, 2, 3]
    assert last.grad_fn is None and not b.model.training  # frozen like the timm path
    weights = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    weights.write_bytes(b"")
    b = quiet_build("dinov3_convnext_tiny", impl="hub", weights=str(weights))
    assert b.model.kwargs == dict(pretrained=True, weights=str(weights))


def test_hub_impl_names_a_missing_dependency_of_the_clone(tmp_path, monkeypatch):
    # a clone whose own requirements are not installed: its hubconf imports a module this environment lacks
    (tmp_path / "hubconf.py").write_text("import termcolor_not_installed_here\n" + FAKE_HUBCONF)
    monkeypatch.setenv("DINOv3_REPO", str(tmp_path))
    with pytest.raises(UserError) as exc:
        quiet_build("dinov3_convnext_tiny", impl="hub", arch_overrides=TINY_CONVNEXT)
    message = str(exc.value)
    assert "'termcolor_not_installed_here'" in message and "\n" not in message
    assert f"pip install -r {tmp_path / 'requirements.txt'}" in message
