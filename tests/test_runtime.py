"""Device and precision policy (core/runtime.py), with the GPU's answers monkeypatched where no GPU is present."""

import pytest
import torch

from src.detection.core.errors import UserError
from src.detection.core.runtime import inference_precision


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16")])
def test_inference_auto_on_cuda_is_bf16_where_native_else_fp16(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_precision("auto", torch.device("cuda", 0), backbone_params=28_000_000) == expected
    assert inference_precision("fp32", torch.device("cuda", 0), backbone_params=28_000_000) == "fp32"


def test_inference_auto_on_cpu_without_native_bf16_is_fp32(monkeypatch):
    from src.detection.core import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    assert inference_precision("auto", torch.device("cpu"), backbone_params=10**9) == "fp32"
    with pytest.raises(UserError, match="fp16"):
        inference_precision("fp16", torch.device("cpu"), backbone_params=1)


def test_sigterm_becomes_keyboard_interrupt_inside_the_block_only():
    import os
    import signal

    from src.detection.core.errors import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 5)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_ends_on_sigterm_as_on_ctrl_c(capsys):
    """A command's own Ctrl-C handling (inference writes what is done) runs on SIGTERM too; exit status 130."""
    import os
    import signal
    import time

    from src.detection.core.errors import run_cli

    finished = []

    def command() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            finished.append("wrote what was done")
            raise
        return 0

    with pytest.raises(SystemExit) as exc:
        run_cli(command)
    assert exc.value.code == 130 and finished == ["wrote what was done"]
    assert capsys.readouterr().err.strip() == "interrupted"


def test_warnings_start_their_own_line_below_a_progress_bar(capsys):
    import sys
    import warnings

    from tqdm import tqdm

    from src.detection.core.errors import ToolkitWarning, run_cli

    def command() -> int:
        bar = tqdm(total=10, file=sys.stderr, ascii=True, desc="epoch 1/3")
        bar.update(4)
        warnings.warn("train: skipping a.jpg", ToolkitWarning, stacklevel=1)
        bar.close()
        return 0

    with pytest.raises(SystemExit):
        run_cli(command)
    err = capsys.readouterr().err
    before = err.split("WARNING: train: skipping a.jpg")[0]
    assert before and before[-1] in "\r\n", repr(err)  # the bar was lifted, not continued
