"""Partial fine-tuning of the backbone: exactly the last N blocks/stages (+ final norm) train, the rest stays frozen,
in eval mode and outside autograd; layer groups for layer-wise LR decay."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from src.detection.core.errors import UserError
from src.detection.modeling.backbones import RandomWeightsWarning, build_backbone

VIT = ("dinov3_vit_tiny", {"embed_dim": 32, "num_heads": 2, "depth": 4, "drop_path_rate": 0.1})
CONVNEXT = ("dinov3_convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "drop_path_rate": 0.1})


def _build(spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return build_backbone(spec[0], arch_overrides=spec[1], **kw)


def _trained_names(b, steps: int = 3) -> set[str]:
    """Names of the parameters that changed after a few optimizer steps on the multi-level features."""
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    params = [p for p in b.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2) if params else None  # moves every parameter with a gradient
    b.train()
    for _ in range(steps):
        loss = sum(f.square().mean() for f in b.forward_multi(torch.randn(2, 3, 64, 64)))
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {n for n, p in b.model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("n", [1, 2])
def test_vit_last_blocks_train(n):
    b = _build(VIT, unfreeze_last=n)
    assert not b.frozen and b.unfreeze_last == n
    changed = _trained_names(b)
    trainable = {f"blocks.{i}." for i in range(4 - n, 4)} | {"norm."}
    assert changed and all(name.startswith(tuple(trainable)) for name in changed), sorted(changed)
    # every tensor of the trainable blocks moved (with the final norm); nothing else did
    want = {name for name, _ in b.model.named_parameters() if name.startswith(tuple(trainable))}
    assert changed == want
    # frozen blocks and embeddings stay in eval mode (no drop-path) while the rest trains
    assert all(not b.model.blocks[i].training for i in range(4 - n)) and not b.model.patch_embed.training
    assert all(b.model.blocks[i].training and b.model.blocks[i].drop_path1.training for i in range(4 - n, 4))
    # the frozen prefix records no autograd graph
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.requires_grad))
             for k, blk in enumerate(b.model.blocks)]
    b.forward_last(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == {k: k >= 4 - n for k in range(4)}


def test_convnext_last_stage_trains():
    b = _build(CONVNEXT, unfreeze_last=1)
    changed = _trained_names(b)
    assert changed == {n for n, _ in b.model.named_parameters() if n.startswith(("stages.3.", "head.norm."))}
    assert not b.model.stem.training and not b.model.stages[2].training and b.model.stages[3].training
    # all four stages: the stem trains with stage 0, as in the official layout
    b = _build(CONVNEXT, unfreeze_last=4)
    assert all(p.requires_grad for p in b.parameters())


def test_frozen_and_full_keep_their_meaning():
    frozen = _build(VIT)
    assert frozen.frozen and frozen.unfreeze_last == 0 and _trained_names(frozen) == set()
    assert not frozen.model.training and frozen.layer_groups() == []
    assert frozen.frozen_state_keys() == set(frozen.state_dict())
    full = _build(VIT, fine_tune=True)
    assert not full.frozen and full.unfreeze_last == -1
    assert _trained_names(full) == {n for n, _ in full.model.named_parameters()}
    assert full.frozen_state_keys() == set()
    assert _build(VIT, unfreeze_last=-1).unfreeze_last == -1


def test_layer_groups_order_for_decay():
    b = _build(VIT, unfreeze_last=2)
    groups = b.layer_groups()
    ids = [{id(p) for p in g} for g in groups]
    blk = lambda i: {id(p) for p in b.model.blocks[i].parameters()}  # noqa: E731
    assert ids == [blk(2), blk(3) | {id(p) for p in b.model.norm.parameters()}]
    full = _build(VIT, fine_tune=True).layer_groups()
    assert len(full) == 1 + 4  # embeddings, then one group per block (the last with the final norm)
    assert sum(len(g) for g in full) == len(list(_build(VIT, fine_tune=True).parameters()))
    assert [len(g) for g in _build(CONVNEXT, unfreeze_last=-1).layer_groups()] != []
    assert len(_build(CONVNEXT, unfreeze_last=-1).layer_groups()) == 4
    # set_trainable switches in place; the state-dict view follows
    b.set_trainable(1)
    assert len(b.layer_groups()) == 1 and "model.blocks.2.norm1.weight" in b.frozen_state_keys()
    assert "model.blocks.3.norm1.weight" not in b.frozen_state_keys()


@pytest.mark.parametrize("n", [-2, 5, 1.5, True])
def test_invalid_counts_are_refused(n):
    with pytest.raises(UserError, match="--unfreeze-last"):
        _build(VIT, unfreeze_last=n)


def test_parent_train_keeps_frozen_parts_in_eval():
    b = _build(VIT, unfreeze_last=1)
    parent = nn.Sequential(b)
    parent.eval()
    parent.train()
    assert not b.model.blocks[0].training and b.model.blocks[3].training and b.model.norm.training
