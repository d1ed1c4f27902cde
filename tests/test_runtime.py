"""Device and precision policy (core/runtime.py), with the GPU's answers monkeypatched where no GPU is present."""

import pytest
import torch

from src.detection.core.errors import UserError
from src.detection.core.runtime import inference_precision


@pytest.mark.parametrize("capability, half, expected", [((9, 0), False, "bf16"), ((8, 6), False, "bf16"),
                                                        ((7, 5), False, "fp16"), ((9, 0), True, "fp16")])
def test_inference_auto_on_cuda_is_bf16_where_native_else_fp16(monkeypatch, capability, half, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_precision("auto", torch.device("cuda", 0), backbone_params=28_000_000, half=half) == expected
    assert inference_precision("fp32", torch.device("cuda", 0), backbone_params=28_000_000) == "fp32"


def test_inference_auto_on_cpu_without_native_bf16_is_fp32(monkeypatch):
    from src.detection.core import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    assert inference_precision("auto", torch.device("cpu"), backbone_params=10**9) == "fp32"
    with pytest.raises(UserError, match="fp16"):
        inference_precision("fp16", torch.device("cpu"), backbone_params=1)
