"""Backbone weights in every layout users download, read into Meta's official state-dict layout.

``--weights`` takes (the layout is decided from the content, never from a file name):

* **meta** - Meta's official checkpoint (``storage_tokens`` / ``downsample_layers.*`` keys), usually the e-mailed
  ``.pth``;
* **transformers** - a folder with ``config.json`` (``model_type`` ``dinov3_vit`` / ``dinov3_convnext``) and
  ``model.safetensors`` (or shards + ``model.safetensors.index.json``), or the weights file with that
  ``config.json`` beside it, as ``hf download facebook/dinov3-...`` fetches them;
* **timm** - timm's own layout (``reg_token`` / ``stem.*`` keys) in ``.safetensors``, ``.pth`` or ``.bin``, alone or
  in a folder with timm's ``config.json``;
* a hub name: ``hf-hub:<org>/<repo>[@revision]`` (either of the two layouts above) or ``timm:<model>.<tag>``
  (timm's pretrained tag, e.g. ``timm:convnext_tiny.dinov3_lvd1689m``), resolved from the Hugging Face cache
  (``$HF_HOME``/``$HF_HUB_CACHE``) first, downloaded when the network allows.

Every layout is converted to the official key names here, so ``official_keys.py`` has one strict official->timm mapping.
Input statistics (``weights_family``): SAT-493M and LVD-1689M weights share their architecture, so the family is read
from what comes with the tensors - transformers ``preprocessor_config.json`` ``image_mean``/``image_std``, timm
``config.json`` ``pretrained_cfg`` (``mean``/``std``, ``tag``), the ``timm:`` tag - and, where the content says
nothing, from ``sat493m`` in the hub repository id (also part of the Hugging Face cache path). ``None`` when unknown;
the caller then uses the ``--model-name`` entry's family.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.paths import REPO_ROOT, load_dotenv_once, resolve_path

__all__ = ["LoadedWeights", "resolve_weights", "locate_weights", "open_weights", "read_torch_state_dict",
           "hf_config_architecture", "HUB_PREFIXES"]

HUB_PREFIXES = ("hf-hub:", "timm:")
FORMATS = ("meta", "transformers", "timm")
# The mean/std of each weight family (same values as backbones.NORMALIZATION; kept here to recognise them).
_FAMILY_STATS = {
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


@dataclass
class LoadedWeights:
    """One weights source, already in the official key layout."""

    format: str  # "meta" | "transformers" | "timm"
    path: Path  # the file or folder read
    hub: str | None  # the hub name given to --weights, if any
    state_dict: dict[str, torch.Tensor]  # official key names
    family: str  # "vit" | "convnext"
    weights_family: str | None = None  # "lvd1689m" / "sat493m" when the content tells, else None
    config_arch: dict[str, Any] | None = None  # transformers: the architecture config.json describes
    key_name: Callable[[str], str] = field(default=lambda k: k)  # official key -> the name in the user's file

    @property
    def where(self) -> str:
        return f"--weights {self.hub or self.path}"

    @property
    def source(self) -> dict[str, Any]:
        """What the detector metadata records: the layout, the file/folder and the hub name."""
        return {"format": self.format, "path": str(self.path), "hub": self.hub}


# ---------------------------------------------------------------------------------------------------------------
# Where the weights are: local path, bare name in weights/ or $DINOv3_WEIGHTS, hub name
# ---------------------------------------------------------------------------------------------------------------

def resolve_weights(weights: str | os.PathLike | None) -> Path | None:
    """A local ``--weights``: an existing file or folder (as given, or relative to the repo root), else a bare name
    looked up in ``weights/`` and then ``$DINOv3_WEIGHTS`` (``.env`` is loaded). ``None`` -> ``None``."""
    if weights is None or str(weights) == "":
        return None
    load_dotenv_once()
    given = Path(weights).expanduser()
    candidates = [given, resolve_path(given)]
    if len(given.parts) == 1:  # bare name: also the weights folders
        candidates.append(REPO_ROOT / "weights" / given)
        env = os.environ.get("DINOv3_WEIGHTS")
        if env:
            candidates.append(resolve_path(env) / given)
    looked: list[str] = []
    for cand in candidates:
        if cand.is_file() or cand.is_dir():
            return cand.resolve()
        if str(cand) not in looked:
            looked.append(str(cand))
    hint = "" if os.environ.get("DINOv3_WEIGHTS") else " ($DINOv3_WEIGHTS is not set)"
    raise UserError(f"--weights {weights}: file not found; looked in: {', '.join(looked)}{hint}. Put the weights in "
                    f"weights/, set DINOv3_WEIGHTS in .env, or pass a hub name (hf-hub:facebook/dinov3-...)")


def _hub_repo_id(spec: str) -> tuple[str, str | None, str | None]:
    """``hf-hub:org/repo[@rev]`` / ``timm:model.tag`` -> (repo id, revision, timm tag or None)."""
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        try:
            from timm.models import get_pretrained_cfg
            cfg = get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - timm raises various errors for unknown names
            cfg = None
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id or "." not in name:
            raise UserError(f"--weights {spec}: not a timm pretrained tag; use e.g. timm:convnext_tiny.dinov3_lvd1689m "
                            f"or timm:vit_small_patch16_dinov3_qkvb.lvd1689m (list: timm.list_pretrained('*dinov3*'))")
        return hub_id, None, name.split(".", 1)[1]
    repo = spec[len("hf-hub:"):]
    repo, _, rev = repo.partition("@")
    if repo.count("/") != 1:
        raise UserError(f"--weights {spec}: expected hf-hub:<org>/<repo>, e.g. "
                        f"hf-hub:facebook/dinov3-convnext-tiny-pretrain-lvd1689m")
    return repo, rev or None, None


def _hf_cache_dir() -> str | None:
    """Read at call time (huggingface_hub reads its environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _snapshot(spec: str) -> Path:
    """The local folder of a hub name: the cache first, then a download (``*.json`` + ``*.safetensors`` only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, rev, _ = _hub_repo_id(spec)
    kwargs = dict(repo_id=repo, revision=rev, cache_dir=_hf_cache_dir(), allow_patterns=["*.json", "*.safetensors"])
    fetch = f"hf download {repo}" + (f" --revision {rev}" if rev else "")
    licence = (" (facebook/ repositories need Meta's licence accepted on the repository page first, and "
               "`hf auth login`)" if repo.startswith("facebook/") else "")
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if _offline():
        raise UserError(f"--weights {spec}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; fetch it once "
                        f"with `{fetch}` (huggingface-cli download {repo}){licence}")
    try:
        return Path(snapshot_download(**kwargs))
    except GatedRepoError as exc:
        raise UserError(f"--weights {spec}: {repo} is gated; accept Meta's licence on "
                        f"https://huggingface.co/{repo}, log in (`hf auth login`) and run `{fetch}`") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"--weights {spec}: repository {repo} not found (or private/gated: log in with "
                        f"`hf auth login`){licence}") from exc
    except Exception as exc:  # noqa: BLE001 - network failures come in many types; all mean "not available"
        raise UserError(f"--weights {spec}: not cached and the download failed ({type(exc).__name__}); fetch it with "
                        f"`{fetch}`{licence}") from exc


def locate_weights(weights: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """(local file or folder, hub name or None) for a ``--weights`` value; nothing is read."""
    if weights is None or str(weights) == "":
        return None, None
    spec = str(weights)
    if spec.startswith(HUB_PREFIXES):
        return _snapshot(spec), spec
    return resolve_weights(weights), None


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------------------------

def _container(path: Path) -> str:
    """'safetensors' | 'torch', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors first: its 8-byte header length may itself start with 0x80, the pickle protocol marker
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) / legacy pickle
        return "torch"
    raise UserError(f"--weights {path}: cannot be read: neither safetensors nor a PyTorch checkpoint (empty, "
                    f"truncated or another format); re-download it")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError both mean a damaged file
        raise UserError(f"--weights {path}: cannot be read as safetensors ({str(exc).splitlines()[0][:120]}); "
                        f"the file is damaged or truncated - re-download it") from exc


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``torch.save``-d state dict (memory-mapped when possible, ``weights_only``), unwrapped from
    ``{"model": ...}`` / ``{"state_dict": ...}``."""
    path = Path(path)
    try:
        # only zip files (torch.save's format since 1.6) can be memory-mapped; legacy files are read whole
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file for the user
        raise UserError(f"--weights {path}: cannot be read as a PyTorch checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    if isinstance(sd, dict) and sd.get("format") == "dinov3-detection":
        raise UserError(f"--weights {path} is a detector checkpoint of this toolkit; pass it as --model, "
                        f"--weights takes DINOv3 backbone weights")
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--weights {path}: not a state dict of tensors; pass DINOv3 backbone weights (Meta .pth, "
                        f"transformers folder or timm file)")
    return sd


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(path) if _container(path) == "safetensors" else read_torch_state_dict(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--weights: {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"--weights: {path} is not a JSON object")
    return data


def _folder_files(folder: Path) -> list[Path]:
    """The weight files of a transformers/timm folder: shards from the index, else the single weights file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise UserError(f"--weights {folder}: {index.name} lists shards that are not there "
                            f"({', '.join(missing[:3]) or 'none listed'}); re-download the folder")
        return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if len(found) == 1:
        return [folder / found[0]]
    raise UserError(f"--weights {folder}: no model.safetensors in this folder"
                    + (f" (several candidates: {', '.join(found[:4])}; pass one file)" if found else
                       "; pass a transformers/timm folder or a weights file"))


def weights_layout(sd: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(format, family) of a DINOv3 backbone state dict from its key names; None for anything else."""
    if "reg_token" in sd or ("cls_token" in sd and any(k.endswith(".gamma_1") for k in sd)):
        return "timm", "vit"
    if "stem.0.weight" in sd:
        return "timm", "convnext"
    if "storage_tokens" in sd or "cls_token" in sd:
        return "meta", "vit"
    if "downsample_layers.0.0.weight" in sd:
        return "meta", "convnext"
    if "embeddings.cls_token" in sd:
        return "transformers", "vit"
    if "stages.0.downsample_layers.0.weight" in sd:
        return "transformers", "convnext"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Key renaming tables: (layout key, official key); {i}/{s}/{j} are layer numbers. A pattern ending in "." is a prefix
# (the rest of the key is kept), anything else is a whole key. The same table renames official -> layout for messages.
# ---------------------------------------------------------------------------------------------------------------

def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>\d+)")
    rx = rx.replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(rx if pattern.endswith(".") else rx + "$")


class _Renamer:
    def __init__(self, pairs: list[tuple[str, str]]):
        self.forward = [(_compile(a), b) for a, b in pairs]
        self.backward = [(_compile(b), a) for a, b in pairs]

    @staticmethod
    def _apply(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
        for rx, template in rules:
            m = rx.match(key)
            if m:
                return template.format(**m.groupdict()) + key[m.end():]
        return None

    def to_official(self, key: str) -> str | None:
        return self._apply(key, self.forward)

    def from_official(self, key: str) -> str:
        return self._apply(key, self.backward) or key


def _vit_block_pairs(prefix: str, names: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"{prefix}.{{i}}.{src}", f"blocks.{{i}}.{dst}") for src, dst in names.items()]


_HF_VIT_COMMON = [("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
                  ("embeddings.register_tokens", "storage_tokens"),
                  ("embeddings.patch_embeddings.", "patch_embed.proj."), ("norm.", "norm.")]
_HF_VIT_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attention.o_proj.": "attn.proj.",
                 "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_HF_MLP = {"mlp.up_proj.": "mlp.fc1.", "mlp.down_proj.": "mlp.fc2."}
_HF_GATED = {"mlp.gate_proj.": "mlp.w1.", "mlp.up_proj.": "mlp.w2.", "mlp.down_proj.": "mlp.w3."}
_HF_CONVNEXT = [("stages.{s}.downsample_layers.{j}.", "downsample_layers.{s}.{j}."),
                ("stages.{s}.layers.{i}.depthwise_conv.", "stages.{s}.{i}.dwconv."),
                ("stages.{s}.layers.{i}.layer_norm.", "stages.{s}.{i}.norm."),
                ("stages.{s}.layers.{i}.pointwise_conv1.", "stages.{s}.{i}.pwconv1."),
                ("stages.{s}.layers.{i}.pointwise_conv2.", "stages.{s}.{i}.pwconv2."),
                ("stages.{s}.layers.{i}.gamma", "stages.{s}.{i}.gamma"), ("layer_norm.", "norm.")]

_TIMM_VIT_COMMON = [("cls_token", "cls_token"), ("reg_token", "storage_tokens"),
                    ("patch_embed.proj.", "patch_embed.proj."), ("norm.", "norm.")]
_TIMM_VIT_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.qkv.weight": "attn.qkv.weight",
                   "attn.proj.": "attn.proj.", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_TIMM_MLP = {"mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
_TIMM_GATED = {"mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.", "mlp.fc2.": "mlp.w3."}
_TIMM_CONVNEXT = [("stem.{j}.", "downsample_layers.0.{j}."),
                  ("stages.{s}.downsample.{j}.", "downsample_layers.{s}.{j}."),
                  ("stages.{s}.blocks.{i}.conv_dw.", "stages.{s}.{i}.dwconv."),
                  ("stages.{s}.blocks.{i}.norm.", "stages.{s}.{i}.norm."),
                  ("stages.{s}.blocks.{i}.mlp.fc1.", "stages.{s}.{i}.pwconv1."),
                  ("stages.{s}.blocks.{i}.mlp.fc2.", "stages.{s}.{i}.pwconv2."),
                  ("stages.{s}.blocks.{i}.gamma", "stages.{s}.{i}.gamma"), ("head.norm.", "norm.")]


def _renamer(fmt: str, family: str, gated: bool) -> _Renamer:
    if family == "convnext":
        return _Renamer(_HF_CONVNEXT if fmt == "transformers" else _TIMM_CONVNEXT)
    if fmt == "transformers":
        block = {**_HF_VIT_BLOCK, **(_HF_GATED if gated else _HF_MLP)}
        return _Renamer(_HF_VIT_COMMON + _vit_block_pairs("layer", block))
    block = {**_TIMM_VIT_BLOCK, **(_TIMM_GATED if gated else _TIMM_MLP)}
    return _Renamer(_TIMM_VIT_COMMON + _vit_block_pairs("blocks", block))


def _fmt(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _to_official(sd: dict[str, torch.Tensor], fmt: str, family: str, gated: bool,
                 where: str) -> tuple[dict[str, torch.Tensor], Callable[[str], str]]:
    """Rename a transformers/timm state dict to the official keys (q/k/v fused into qkv). Every tensor must be
    placed; leftovers are named. Returns the dict and official-key -> layout-key naming for later messages."""
    renamer = _renamer(fmt, family, gated)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> {q|k|v: tensor}
    if family == "vit":
        qkv_rx = (re.compile(r"layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$") if fmt == "transformers"
                  else re.compile(r"blocks\.(\d+)\.attn\.([qkv])_(bias)$"))
    for key, value in sd.items():
        m = qkv_rx.match(key) if family == "vit" else None
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = renamer.to_official(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value.reshape(1, -1) if new == "mask_token" else value
    problems: list[str] = []
    for (block, kind), parts in sorted(qkv.items()):
        if kind == "weight":
            if set(parts) != {"q", "k", "v"}:
                problems += [f"layer.{block}.attention.{p}_proj.weight" for p in "qkv" if p not in parts]
                continue
            out[f"blocks.{block}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
            continue
        if "k" in parts and bool(parts["k"].abs().max() > 0):
            # official DINOv3 masks the key bias to zero (mask_k_bias); a non-zero one is another model
            raise UserError(f"{where}: has a non-zero key bias ({key_name_qkv(fmt, block, 'k')}); DINOv3 has none "
                            f"(the official model masks it) - these are not DINOv3 weights")
        if "q" not in parts or "v" not in parts:
            problems += [key_name_qkv(fmt, block, p) for p in "qv" if p not in parts]
            continue
        out[f"blocks.{block}.attn.qkv.bias"] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    if unknown or problems:
        parts_msg = ([f"{len(unknown)} tensors that are not part of a DINOv3 {family} (e.g. {_fmt(unknown)})"]
                     if unknown else []) + ([f"missing {_fmt(problems)}"] if problems else [])
        raise UserError(f"{where} ({fmt} layout): {'; '.join(parts_msg)}; pass DINOv3 backbone weights only")

    def key_name(official: str) -> str:
        m = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", official)
        if m and family == "vit" and (fmt == "transformers" or m.group(2) == "bias"):
            letters = "qkv" if m.group(2) == "weight" else "qv"
            return "/".join(key_name_qkv(fmt, m.group(1), p, m.group(2)) for p in letters)
        return renamer.from_official(official)

    return out, key_name


def key_name_qkv(fmt: str, block: str, part: str, kind: str = "bias") -> str:
    if fmt == "transformers":
        return f"layer.{block}.attention.{part}_proj.{kind}"
    return f"blocks.{block}.attn.{'qkv.weight' if kind == 'weight' else part + '_bias'}"


# ---------------------------------------------------------------------------------------------------------------
# transformers config.json
# ---------------------------------------------------------------------------------------------------------------

# Values the official DINOv3 models (and hence the timm implementation) use; a config with another value describes a
# different model. Missing optional fields take transformers' defaults.
_HF_VIT_FIXED = {"patch_size": 16, "num_channels": 3, "num_register_tokens": 4, "rope_theta": 100.0,
                 "proj_bias": True, "mlp_bias": True, "key_bias": False, "layer_norm_eps": 1e-5}
_HF_VIT_DEFAULTS = {"patch_size": 16, "num_channels": 3, "rope_theta": 100.0, "proj_bias": True, "mlp_bias": True,
                    "key_bias": False, "query_bias": True, "value_bias": True, "use_gated_mlp": False,
                    "layer_norm_eps": 1e-5}
_HF_CONVNEXT_FIXED = {"num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6}


def hf_config_architecture(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The architecture a transformers DINOv3 ``config.json`` describes, validated against what DINOv3 uses.

    ViT: ``{"family": "vit", "embed_dim", "depth", "num_heads", "gated", "hidden", "qkv_bias"}``; ConvNeXt:
    ``{"family": "convnext", "depths", "dims"}`` (official names; ``hidden`` is the MLP width)."""
    model_type = config.get("model_type")
    if model_type == "dinov3_convnext":
        for key, want in _HF_CONVNEXT_FIXED.items():
            if key in config and config[key] != want:
                raise UserError(f"{where}: {key}={config[key]!r} is not DINOv3's ({want!r}); not a DINOv3 ConvNeXt")
        depths, dims = config.get("depths"), config.get("hidden_sizes")
        if not (isinstance(depths, list) and isinstance(dims, list) and len(depths) == len(dims) == 4):
            raise UserError(f"{where}: a DINOv3 ConvNeXt needs 4 depths and 4 hidden_sizes")
        return {"family": "convnext", "depths": [int(d) for d in depths], "dims": [int(d) for d in dims]}
    if model_type != "dinov3_vit":
        raise UserError(f"{where}: model_type {model_type!r} is not a DINOv3 backbone (dinov3_vit / dinov3_convnext)")
    cfg = {**_HF_VIT_DEFAULTS, **config}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "num_register_tokens") if k not in cfg]
    if missing:
        raise UserError(f"{where}: lacks {', '.join(missing)}; re-download the model folder")
    for key, want in _HF_VIT_FIXED.items():
        value = cfg[key]
        if value != want and not (isinstance(want, float) and abs(float(value) - want) <= 1e-9 * max(1.0, want)):
            raise UserError(f"{where}: {key}={value!r} is not supported (every DINOv3 model uses {want!r})")
    gated = bool(cfg["use_gated_mlp"])
    act = cfg.get("hidden_act", "silu" if gated else "gelu")
    if act != ("silu" if gated else "gelu"):
        raise UserError(f"{where}: hidden_act={act!r} with use_gated_mlp={gated} is not DINOv3's "
                        f"({'silu' if gated else 'gelu'})")
    if bool(cfg["query_bias"]) != bool(cfg["value_bias"]):
        raise UserError(f"{where}: query_bias={cfg['query_bias']} but value_bias={cfg['value_bias']}; DINOv3 has both "
                        f"or neither")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if dim % heads or (dim // heads) % 4:
        raise UserError(f"{where}: hidden_size/num_attention_heads must be a multiple of 4 (RoPE)")
    return {"family": "vit", "embed_dim": dim, "depth": int(cfg["num_hidden_layers"]), "num_heads": heads,
            "gated": gated, "hidden": int(cfg["intermediate_size"]), "qkv_bias": bool(cfg["query_bias"])}


# ---------------------------------------------------------------------------------------------------------------
# Weight family (LVD-1689M vs SAT-493M)
# ---------------------------------------------------------------------------------------------------------------

def _family_from_stats(mean: Any, std: Any) -> str | None:
    try:
        mean, std = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError):
        return None
    for name, (m, s) in _FAMILY_STATS.items():
        if len(mean) == 3 and len(std) == 3 and all(abs(a - b) < 2e-3 for a, b in zip(mean + std, m + s)):
            return name
    return None


def _weights_family(fmt: str, folder: Path, hub: str | None, timm_cfg: dict[str, Any] | None) -> str | None:
    """``lvd1689m`` / ``sat493m`` from the files beside the tensors or the name, else None."""
    if fmt == "transformers" and (folder / "preprocessor_config.json").is_file():
        pre = _read_json(folder / "preprocessor_config.json")
        fam = _family_from_stats(pre.get("image_mean"), pre.get("image_std"))
        if fam:
            return fam
    if timm_cfg is not None:
        pcfg = timm_cfg.get("pretrained_cfg") or {}
        fam = _family_from_stats(pcfg.get("mean"), pcfg.get("std"))
        if fam:
            return fam
        tag = str(pcfg.get("tag", ""))
        for name in _FAMILY_STATS:
            if name in tag:
                return name
    names = [hub or "", str(folder)]
    for name in ("sat493m", "lvd1689m"):
        if any(name in n.lower() for n in names):
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def open_weights(weights: str | os.PathLike | None) -> LoadedWeights | None:
    """Locate, read and convert ``--weights`` to the official layout (see the module docstring)."""
    path, hub = locate_weights(weights)
    if path is None:
        return None
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    if path.is_dir():
        if not config_path.is_file():
            raise UserError(f"--weights {path}: a weights folder needs its config.json (transformers or timm); "
                            f"or pass the weights file itself")
        files = _folder_files(path)
    else:
        files = [path]
        index = folder / "model.safetensors.index.json"
        if path.suffix == ".safetensors" and index.is_file() and path.name in json.dumps(_read_json(index)):
            files = _folder_files(folder)  # one shard given: read the whole sharded checkpoint
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_file(f))
    layout = weights_layout(sd)
    where = f"--weights {hub or path}"
    if layout is None:
        raise UserError(f"{where}: not DINOv3 backbone weights in any known layout (Meta, transformers, timm); "
                        f"first keys: {_fmt(sorted(sd), 4)}")
    fmt, family = layout
    config = _read_json(config_path) if config_path.is_file() else None
    timm_cfg = config if (fmt == "timm" and config is not None and "architecture" in config) else None
    loaded = LoadedWeights(format=fmt, path=path, hub=hub, state_dict=sd, family=family)
    if fmt == "meta":
        return loaded
    config_arch = None
    if fmt == "transformers":
        if config is None or not str(config.get("model_type", "")).startswith("dinov3"):
            raise UserError(f"{where}: transformers-layout weights need their config.json (model_type dinov3_vit / "
                            f"dinov3_convnext) beside them; download the whole folder (hf download <repo>)")
        config_arch = hf_config_architecture(config, str(config_path))
        if config_arch["family"] != family:
            raise UserError(f"{where}: config.json describes a {config_arch['family']} but the tensors are a {family}")
        gated = family == "vit" and config_arch["gated"]
    else:
        gated = any(k.endswith("mlp.fc1_g.weight") for k in sd)
    loaded.state_dict, loaded.key_name = _to_official(sd, fmt, family, gated, where)
    loaded.config_arch = config_arch
    loaded.weights_family = _weights_family(fmt, folder, hub, timm_cfg)
    if hub and hub.startswith("timm:") and loaded.weights_family is None:
        tag = _hub_repo_id(hub)[2] or ""
        loaded.weights_family = next((n for n in _FAMILY_STATS if n in tag), None)
    return loaded
