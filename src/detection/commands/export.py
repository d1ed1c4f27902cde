"""``python -m src.detection.export --model best_model.pth --format onnx``: export a trained detector to ONNX.

Writes ``best_model.onnx`` and its description ``best_model.onnx.json`` next to the checkpoint, or into
``--out-dir`` / ``--output``; run the result with ``infer_det_image.py --model best_model.onnx``. What the graph
holds and why decoding stays outside it: ``inference.export``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..checkpoint.source import ModelSource
from ..core.choices import DEFAULT_OPSET, EXPORT_FORMATS, MAX_OPSET, MIN_OPSET
from ..core.cli import config_from_args, new_parser
from ..core.errors import ToolkitWarning, run_cli

if TYPE_CHECKING:
    from ..inference.export import ExportConfig


def build_export_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        description="Export a detector checkpoint to ONNX (+ a JSON description) for onnxruntime.")
    parser.add_argument("--model", required=True, help="detector checkpoint (.pth from train_detection.py)")
    parser.add_argument("--format", default="onnx", choices=EXPORT_FORMATS, help="export format")
    parser.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="SIZE",
                        help="input size of the graph: SIZE | W H (one value: square; two at most); default: the "
                             "checkpoint's")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the graph (with --dynamic: of the "
                                                             "example used for tracing)")
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic batch and input size (SSD: dynamic batch only, its default boxes are "
                             "fractions of the export size)")
    parser.add_argument("--half", action="store_true", help="fp16 weights and activations (CUDA GPU only)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET})")
    parser.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                        help="folder for <checkpoint name>.onnx; None = the checkpoint's folder")
    parser.add_argument("--output", default=None, help="exact .onnx file to write (overrides --out-dir)")
    parser.add_argument("--device", default="auto", help="auto (cuda with --half, else cpu) | cpu | cuda | cuda:N")
    ModelSource.add_claims_to(parser.add_argument_group("model"))  # the same claims the inference commands take
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the export with onnxruntime against PyTorch (default: it is checked; an "
                             "fp16 export only where onnxruntime has its CUDA provider)")
    return parser


def export_config_from_args(args: argparse.Namespace) -> ExportConfig:
    from ..inference.export import ExportConfig  # after parsing: --help does not import torch

    return config_from_args(ExportConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = export_config_from_args(build_export_parser().parse_args(argv))
    from ..inference.export import export_onnx

    result = export_onnx(cfg)
    b, _, h, w = result["input_shape"]
    shape = ("[batch,3,height,width]" if result["dynamic_hw"] else f"[batch,3,{h},{w}]") if cfg.dynamic \
        else f"[{b},3,{h},{w}]"
    ver = result["verification"]
    checked = (f"onnxruntime vs PyTorch max relative difference {max(ver['max_rel_diff'].values()):.1e}"
               if "max_rel_diff" in ver else "not verified" + ("" if cfg.verify else " (--no-verify)"))
    if "skipped" in ver and cfg.verify:  # asked for, yet not done: say why and what is left unchecked
        warnings.warn(f"{result['onnx'].name} not verified: {ver['skipped']}", ToolkitWarning, stacklevel=2)
    print(f"exported {result['onnx']} ({result['mb']:.1f} MB, opset {cfg.opset}, input uint8 {shape}) and "
          f"{result['sidecar'].name} in {result['seconds']:.1f}s; {checked}")
    print(f"run it: python infer_det_image.py --model {result['onnx']} --input <images>")
    return 0


def __getattr__(name: str) -> Any:
    """``ExportConfig`` / ``export_onnx`` as names of this module too, loaded on first use."""
    if name in ("ExportConfig", "export_onnx"):
        from ..inference import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    run_cli(main)
