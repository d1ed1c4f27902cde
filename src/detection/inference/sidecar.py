"""The description of an ONNX export: ``<model>.onnx.json`` beside the graph, also stored in the ONNX file's metadata.

It is the checkpoint's model card (``checkpoint.ModelCard.to_dict()``, the same fields as a ``.pth``'s ``meta``,
with the export's input spec) plus what only an export has: ``graph`` (input / output names, batch, dynamic size,
opset, precision), ``thresholds`` (the decoding defaults), ``verification`` (onnxruntime vs PyTorch) and
``exported_from``. ``format_version`` is the card's, so older sidecars are upgraded by ``checkpoint.load_card``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.card import FORMAT_VERSION, ModelCard, load_card
from ..core.errors import UserError

SIDECAR_FORMAT = "dinov3-detection-onnx"
METADATA_KEY = "dinov3_detection"  # the sidecar's JSON, also stored in the ONNX file's metadata_props
INPUT_LAYOUT = {"dtype": "uint8", "layout": "NCHW RGB 0..255, resized (not normalized)"}


@dataclass
class OnnxDescription:
    """A sidecar, read: the model card and the export's own sections."""

    card: ModelCard
    graph: dict[str, Any]
    thresholds: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # exported_from, verification

    def to_dict(self) -> dict[str, Any]:
        card = self.card.to_dict()
        return {"format": SIDECAR_FORMAT, "format_version": FORMAT_VERSION, **card,
                "input": {**card["input"], **INPUT_LAYOUT}, "thresholds": dict(self.thresholds),
                "graph": dict(self.graph), **self.extra}


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``best_model.onnx`` -> ``best_model.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def read_sidecar(onnx_path: str | os.PathLike) -> OnnxDescription:
    """The export's description: ``<model>.onnx.json``, else the copy in the ONNX file's metadata."""
    path = Path(onnx_path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{side}: not valid JSON ({exc.__class__.__name__}); re-export the model with "
                            f"python -m src.detection.export") from None
    else:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a broken file
            raise UserError(f"--model {path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise UserError(f"--model {path}: no {side.name} beside it and no description inside; export the "
                            f"model with python -m src.detection.export (it writes both)")
        data = json.loads(props[METADATA_KEY])
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{side}: not a description written by python -m src.detection.export; re-export the model")
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{side}: format_version {version!r}, this toolkit reads 1..{FORMAT_VERSION}; use the "
                        f"toolkit version that exported it ({data.get('toolkit_version', '?')})")
    card = load_card(data, str(side))
    extra = {k: data[k] for k in ("exported_from", "verification") if k in data}
    return OnnxDescription(card, dict(data.get("graph") or {}), dict(data.get("thresholds") or {}), extra)
