"""Meta's official DINOv3 state dicts -> timm's, strictly; recognising which entry point a checkpoint belongs to.

After the official->timm key mapping there must be 0 missing, 0 unexpected and 0 shape-mismatched keys, and the only
official tensors left out are the ones the official model never uses at inference (``mask_token``, the RoPE
``periods`` buffer - checked against timm's -, the ``bias_mask`` buffers - checked to be the 1/0/1 layout timm
hard-codes - and the SAT ``local_cls_norm``). ``OFFICIAL_KEYS[family]`` holds each family's key layout.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from .entrypoints import ENTRYPOINTS, FAMILIES, ffn_align


class OfficialKeys:
    """One family's official key layout and how timm's checkpoint filter maps it."""

    family: str = ""
    # timm key -> official key patterns, only to name keys in messages the way the user's checkpoint does
    timm_to_official: list[tuple[str, str]] = []

    def matches(self, sd: dict[str, torch.Tensor]) -> bool:
        """Whether ``sd`` is in this family's official layout."""
        raise NotImplementedError

    def signature(self, sd: dict[str, torch.Tensor]) -> tuple:
        """``Family.signature`` read from an official state dict (shapes only); KeyError/ValueError if it lacks keys."""
        raise NotImplementedError

    def expected_dropped(self, arch: dict[str, Any]) -> dict[str, list[int]]:
        """Official keys (-> shapes) with no timm counterpart that the official model never uses at inference."""
        raise NotImplementedError

    def dropped_by_timm_filter(self, key: str) -> bool:
        """Keys timm's checkpoint_filter_fn discards without a word (mirrors timm 1.0.31)."""
        raise NotImplementedError

    def unexpected(self, sd: dict[str, torch.Tensor], arch: dict[str, Any]) -> list[str]:
        """Further keys ``arch`` has no place for although timm's filter would pass them over silently."""
        return []

    def filter(self, kept: dict[str, torch.Tensor], model: nn.Module, user_name: Callable[[str], str],
               unexpected: list[str], mismatched: list[str]) -> dict[str, torch.Tensor]:
        """timm's checkpoint filter on ``kept``; keys it cannot place are appended to ``unexpected`` /
        ``mismatched`` (described with ``user_name``)."""
        raise NotImplementedError

    def official_key(self, key: str, arch: dict[str, Any]) -> str:
        """timm key -> official key."""
        for pattern, repl in self.timm_to_official:
            key = re.sub(pattern, repl, key)
        return key

    def check_values(self, sd: dict[str, torch.Tensor], arch: dict[str, Any], where: str, model_name: str) -> None:
        """UserError for tensors timm ignores (recomputes or hard-codes) whose values are not what it assumes."""

    def unused_parameters(self, arch: dict[str, Any]) -> int:
        """Official parameters timm has no slot for (inference never uses them)."""
        return 0


class ViTKeys(OfficialKeys):
    family = "vit"
    timm_to_official = [(r"^reg_token$", "storage_tokens"), (r"\.gamma_(\d)$", r".ls\1.gamma"),
                        (r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w2."),
                        (r"\.attn\.[qv]_bias$", ".attn.qkv.bias")]

    def matches(self, sd):
        return "storage_tokens" in sd or "cls_token" in sd

    def signature(self, sd):
        dim = int(sd["cls_token"].shape[-1])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        swiglu = "blocks.0.mlp.w1.weight" in sd
        hidden = int(sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
        return ("vit", dim, depth, swiglu, hidden, "blocks.0.attn.qkv.bias" in sd, "local_cls_norm.weight" in sd)

    def expected_dropped(self, arch):
        c, heads = arch["embed_dim"], arch["num_heads"]
        keys = {"mask_token": [1, c], "rope_embed.periods": [c // heads // 4]}
        if arch["qkv_bias"]:
            keys.update({f"blocks.{i}.attn.qkv.bias_mask": [3 * c] for i in range(arch["depth"])})
        if arch["untie_global_and_local_cls_norm"]:
            keys.update({"local_cls_norm.weight": [c], "local_cls_norm.bias": [c]})
        return keys

    def dropped_by_timm_filter(self, key):
        return (("rope" in key and key != "rope.freqs") or key.endswith((".periods", ".bias_mask", "mask_token"))
                or key.startswith(("projectors.", "local_cls_norm")))

    def unexpected(self, sd, arch):
        # an architecture without q/v biases: timm would skip them with a print
        return [] if arch["qkv_bias"] else [k for k in sd if k.endswith("attn.qkv.bias")]

    def filter(self, kept, model, user_name, unexpected, mismatched):
        from timm.models import eva as timm_eva

        patch = kept.get("patch_embed.proj.weight")
        if patch is not None and tuple(patch.shape[-2:]) != (16, 16):  # timm would silently resample it
            mismatched.append(f"{user_name('patch_embed.proj.weight')} {list(patch.shape)} (patch size must be 16)")
            kept.pop("patch_embed.proj.weight")
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints when it skips a bias
            return timm_eva.checkpoint_filter_fn(kept, model)

    def official_key(self, key, arch):
        key = super().official_key(key, arch)
        return re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key) if ffn_align(arch["ffn_layer"]) > 0 else key

    def check_values(self, sd, arch, where, model_name):
        for key, mask in sd.items():
            if not key.endswith("attn.qkv.bias_mask") or mask.is_meta:
                continue
            c = arch["embed_dim"]
            want = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)]).to(mask.dtype)
            if mask.shape != want.shape or not torch.equal(mask.cpu(), want):
                raise UserError(f"{where}: {key} is not the 1/0/1 (q/k/v) mask the timm implementation assumes; "
                                f"the q/v/k biases cannot be mapped exactly - use --backbone-impl hub")
        periods = sd.get("rope_embed.periods")
        if periods is not None and not periods.is_meta:
            # official RoPE (base 100): periods[j] = base ** (2j / (head_dim / 2)), j < head_dim / 4; timm recomputes it
            head_dim = arch["embed_dim"] // arch["num_heads"]
            want = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
            if periods.shape != want.shape or not torch.allclose(periods.float().cpu(), want, rtol=1e-5, atol=0):
                raise UserError(f"{where}: rope_embed.periods {list(periods.shape)} is not the RoPE of --model-name "
                                f"{model_name} (other head size or RoPE base); check --model-name")

    def unused_parameters(self, arch):
        # mask_token [C], the k third of each qkv bias (always masked to zero; timm keeps a zero buffer) and the
        # SAT / 7B local_cls_norm [2C]
        dim = arch["embed_dim"]
        n = dim
        if arch["qkv_bias"]:
            n += arch["depth"] * dim
        if arch["untie_global_and_local_cls_norm"]:
            n += 2 * dim
        return n


class ConvNeXtKeys(OfficialKeys):
    family = "convnext"
    timm_to_official = [(r"^stem\.", "downsample_layers.0."),
                        (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
                        (r"^stages\.(\d+)\.blocks\.", r"stages.\1."), (r"\.conv_dw\.", ".dwconv."),
                        (r"\.mlp\.fc(\d)\.", r".pwconv\1."), (r"^head\.norm\.", "norm.")]

    def matches(self, sd):
        return "downsample_layers.0.0.weight" in sd

    def signature(self, sd):
        depths = tuple(1 + max(int(m.group(2)) for k in sd if (m := re.match(r"stages\.(\d+)\.(\d+)\.", k))
                               and int(m.group(1)) == s) for s in range(4))
        dims = tuple(int(sd[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in range(4))
        return ("convnext", depths, dims)

    def expected_dropped(self, arch):
        c = arch["dims"][-1]
        return {"norms.3.weight": [c], "norms.3.bias": [c]}  # second registration of the final `norm`

    def dropped_by_timm_filter(self, key):
        return key.startswith(("projectors.", "norms."))

    def filter(self, kept, model, user_name, unexpected, mismatched):
        from timm.models import convnext as timm_convnext

        # key by key: timm's ConvNeXt filter looks up / reshapes to the model's tensors and raises on foreign keys
        out = {}
        for k, v in kept.items():
            try:
                out.update(timm_convnext.checkpoint_filter_fn({k: v}, model))
            except KeyError:
                unexpected.append(k)
            except RuntimeError:
                mismatched.append(f"{user_name(k)} {list(v.shape)}")
        return out


# the ConvNeXt layout first: its marker is the more specific one
OFFICIAL_KEYS: dict[str, OfficialKeys] = {k.family: k for k in (ConvNeXtKeys(), ViTKeys())}


def checkpoint_family(sd: dict[str, torch.Tensor]) -> str | None:
    """The family of an official state dict; None for other layouts (timm-format state dicts are not official)."""
    return next((name for name, keys in OFFICIAL_KEYS.items() if keys.matches(sd)), None)


def checkpoint_signature(sd: dict[str, torch.Tensor]) -> tuple | None:
    """``Family.signature`` read from an official state dict (shapes only); None when it cannot be read."""
    keys = OFFICIAL_KEYS[checkpoint_family(sd) or "vit"]
    try:
        return keys.signature(sd)
    except (KeyError, ValueError):
        return None


def guess_model_name(sd: dict[str, torch.Tensor], path: str | os.PathLike | None = None) -> str | None:
    """Which official entry point a checkpoint belongs to: by its official file name, else by its shapes."""
    if path is not None:
        name = Path(path).name
        for model_name, e in ENTRYPOINTS.items():
            if e["checkpoint_file"] and e["checkpoint_file"].rsplit("-", 1)[-1][:-4] in name:
                return model_name
    sig = checkpoint_signature(sd)
    for model_name, e in ENTRYPOINTS.items():
        if sig is not None and FAMILIES[e["family"]].signature(e["arch"]) == sig:
            return model_name
    return None


def _fmt_keys(keys: Sequence[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def convert_official_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, family: str, arch: dict[str, Any],
                                model_name: str = "", source: str = "checkpoint", allow_absent_unused: bool = False,
                                key_name: Callable[[str], str] | None = None, where: str | None = None
                                ) -> dict[str, torch.Tensor]:
    """Official DINOv3 state dict -> timm state dict for ``model``, strictly.

    Raises UserError unless the result has exactly ``model``'s keys and shapes and the only official keys left out
    are the inference-unused ones (``OfficialKeys.expected_dropped``). Checks that each qkv ``bias_mask`` is 1/0/1
    (timm drops the k third of the bias and hard-codes a zero k bias) and that the RoPE ``periods`` follow the
    official formula (timm recomputes them). Meta tensors (shape-only checks) skip these value checks. Nothing is
    loaded here. ``allow_absent_unused``: the inference-unused keys may be missing (transformers / timm files never
    carry them); ``key_name`` renames official keys in messages to the names the user's file uses; ``where`` names
    the tensors' origin in messages (default ``--weights <source>``)."""
    user_name = key_name or (lambda k: k)
    where = where or f"--weights {source}"
    layout = OFFICIAL_KEYS[family]
    ck_family = checkpoint_family(sd)
    if ck_family != family:
        guess = guess_model_name(sd, source)
        raise UserError(f"{where} is a {ck_family or 'non-DINOv3'} checkpoint but --model-name {model_name} is a "
                        f"{family}" + (f"; pass --model-name {guess}" if guess else ""))
    sd = dict(sd)
    expected_dropped = layout.expected_dropped(arch)
    unexpected = [k for k in sd if layout.dropped_by_timm_filter(k) and k not in expected_dropped]
    unexpected += layout.unexpected(sd, arch)
    missing = [] if allow_absent_unused else sorted(set(expected_dropped) - set(sd))
    mismatched = [f"{user_name(k)} {list(sd[k].shape)} vs model {shape}" for k, shape in expected_dropped.items()
                  if k in sd and list(sd[k].shape) != shape]

    kept = {k: v for k, v in sd.items() if k not in expected_dropped and k not in unexpected}
    target = model.state_dict()
    out = layout.filter(kept, model, user_name, unexpected, mismatched)
    unexpected = [user_name(k) for k in unexpected]
    missing = [user_name(k) for k in missing]
    name = lambda k: user_name(layout.official_key(k, arch))  # noqa: E731 - keys as the user's file names them
    missing += list(dict.fromkeys(name(k) for k in target if k not in out))
    unexpected += list(dict.fromkeys(name(k) for k in out if k not in target))
    mismatched += [f"{name(k)} {list(v.shape)} vs model {list(target[k].shape)}"
                   for k, v in out.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or mismatched:
        guess = guess_model_name(sd, source)
        parts = [f"{len(missing)} missing (e.g. {_fmt_keys(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {_fmt_keys(unexpected)})" if unexpected else "",
                 f"{len(mismatched)} with other shapes (e.g. {_fmt_keys(mismatched, 2)})" if mismatched else ""]
        hint = (f"; it looks like {guess}, pass --model-name {guess}" if guess and guess != model_name
                else "; check --model-name and --weights")
        raise UserError(f"{where} does not match --model-name {model_name}: "
                        f"{'; '.join(p for p in parts if p)}{hint}")
    layout.check_values(sd, arch, where, model_name)
    return out


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load into a model built on the meta device (no wasted random init), then rebuild timm's
    non-persistent buffers (RoPE periods, zero k bias), which no checkpoint carries."""
    target = model.state_dict()
    sd = {k: (v.to(target[k].dtype) if v.dtype != target[k].dtype else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    for module in model.modules():
        if module is not model and hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - would mean a timm change
        raise RuntimeError(f"tensors left uninitialised after loading: {left[:5]}")


def official_param_count(backbone: Any) -> int:
    """Parameter count of the official model a ``DinoBackbone`` reproduces (shared tensors once): timm has no slot
    for official parameters that inference never uses (``OfficialKeys.unused_parameters``)."""
    n = sum(p.numel() for p in backbone.model.parameters())
    if backbone.impl == "hub":
        return n
    return n + OFFICIAL_KEYS[backbone.family].unused_parameters(backbone.arch)
