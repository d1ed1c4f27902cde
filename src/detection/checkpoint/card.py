"""The model card: what a trained detector is, in the one form checkpoints (``meta``) and ONNX sidecars both store.

A ``ModelCard`` is the detector config (``DetectorConfig``, which holds the input fields, so ``card.input`` is its
``InputSpec``), the label map (class names and a COCO dataset's category ids) and the provenance (toolkit version,
backbone weights, whether the backbone is inside, ours or a reference-project checkpoint). ``to_dict()`` is the
stored form; ``load_card()`` reads every stored form since format 1 and is the only code that knows older layouts.

Stored forms (``format_version``):

1. the ``DetectorConfig`` fields at the top level, with ``input`` and a copy of its ``imgsz`` beside it; files of
   the earliest versions have ``imgsz``/``letterbox``/``mean``/``std`` at the top level and no ``input``, no
   ``head_convs`` (torchvision's 4 convs per branch) and no ``head_separable`` (dense convs); ONNX sidecars keep the
   config in a ``detector`` section. Training options are ``train_config`` or, earliest, the parser's ``args``
   (``amp`` for ``precision``).
2. the same fields, the input only in ``input``; sidecars flat like ``meta``. Optional, and absent from cards of
   models never scored by training: ``best_threshold`` (the score threshold with the highest F1 over all classes at
   IoU 0.5 on the validation split, what ``--threshold auto`` uses) and ``best_threshold_f1`` (that F1). Older
   readers ignore them, so they need no new format version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from ..modeling.config import DetectorConfig
    from ..modeling.input_spec import InputSpec

FORMAT = "dinov3-detection"
FORMAT_VERSION = 2
BACKGROUND = "__background__"
SOURCES = ("ours", "reference")  # who trained the model: this toolkit, or the reference project (adopted)
# What the checkpoint-describing flags claim, checked against a card (``ModelCard.check_matches``).
CLAIM_FLAGS = {"model_name": "--model-name", "head": "--head", "feature_extractor": "--feature-extractor",
               "classes": "--config"}


# ------------------------------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class LabelMap:
    """Class names (``__background__`` at label 0, as torchvision counts) and, for COCO datasets, the annotation
    file's category id of each label, so predictions go back to the user's ids."""

    classes: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes or self.classes[0] != BACKGROUND:
            raise ValueError("classes must start with '__background__'")
        if self.category_ids is not None:
            ids = tuple(int(i) for i in self.category_ids)
            if len(ids) != len(self.classes):
                raise ValueError("category_ids needs one id per class (0 for __background__)")
            object.__setattr__(self, "category_ids", ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset_id(self, label: int) -> int:
        """The dataset's category id of ``label`` (the label itself where the dataset has no ids of its own)."""
        return self.category_ids[label] if self.category_ids is not None else int(label)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"classes": list(self.classes)}
        if self.category_ids is not None:
            d["category_ids"] = list(self.category_ids)
        return d


@dataclass(frozen=True)
class Provenance:
    """Where a model came from. ``weights``: the backbone file given at training (loading a checkpoint saved
    without its backbone needs it); ``weights_source``: what was read (``DinoBackbone.weights_source``: format,
    path, hub name; None for a random init or a reference checkpoint)."""

    toolkit_version: str | None = __version__
    weights: str | None = None
    weights_source: dict[str, Any] | None = None
    includes_backbone: bool = True
    source: str = "ours"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {SOURCES}")

    @property
    def is_reference(self) -> bool:
        return self.source == "reference"

    def to_dict(self) -> dict[str, Any]:
        return {"toolkit_version": self.toolkit_version, "weights": self.weights,
                "weights_source": None if self.weights_source is None else dict(self.weights_source),
                "includes_backbone": bool(self.includes_backbone), "source": self.source}


def _describe_classes(classes: list[str] | tuple[str, ...]) -> str:
    return f"{len(classes) - 1} classes {list(classes[1:4])}..."


def describe_weights_source(source: dict[str, Any] | None) -> str:
    """One phrase for a ``weights_source``, e.g. ``timm weights /w/backbone.safetensors``."""
    if not source:
        return "random init"
    return f"{source.get('format')} weights {source.get('hub') or source.get('path')}"


# ------------------------------------------------------------------------------------------------- the card
@dataclass(frozen=True)
class ModelCard:
    """Detector config + label map + provenance; ``format_version``: the stored form it was read from."""

    detector: DetectorConfig
    labels: LabelMap
    provenance: Provenance = Provenance()
    format_version: int = FORMAT_VERSION
    best_threshold: float | None = None  # None: not known (see the module docstring)
    best_threshold_f1: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module, classes: list[str], letterbox: bool | None = None,
                   weights: str | None = None, category_ids: list[int] | None = None) -> ModelCard:
        """The card of a built model (its resolved config, so the input spec is complete). ``letterbox``
        overrides the config's (None: keep it); ``category_ids`` (COCO datasets) only when given."""
        from ..core.runtime import unwrap

        model = unwrap(model)
        cfg = model.config
        if letterbox is not None and bool(letterbox) != cfg.letterbox:
            cfg = dataclasses.replace(cfg, letterbox=bool(letterbox))
        source = getattr(getattr(model, "dino", None), "weights_source", None)
        return cls(cfg, LabelMap(classes, category_ids),
                   Provenance(weights=str(weights) if weights else None,
                              weights_source=dict(source) if source else None))

    # ------------------------------------------------------------------ views
    @property
    def input(self) -> InputSpec:
        """The input specification (complete once the config is resolved, i.e. for every stored card)."""
        return self.detector.input_spec

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    def with_input(self, spec: InputSpec) -> ModelCard:
        """This card with another input spec (an inference ``--imgsz``/``--letterbox``, an export's size)."""
        cfg = dataclasses.replace(self.detector, imgsz=spec.imgsz, letterbox=spec.letterbox,
                                  size_multiple=spec.size_multiple, mean=spec.mean, std=spec.std)
        return dataclasses.replace(self, detector=cfg)

    def with_detector(self, cfg: DetectorConfig) -> ModelCard:
        return dataclasses.replace(self, detector=cfg)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (plain types, ``weights_only``- and JSON-safe): the config's fields with the input spec
        as ``input``, ``classes`` (+ ``category_ids``), and the provenance fields."""
        d = self.detector.to_dict()
        d.pop("imgsz", None)  # ``input`` holds it
        d.update(self.labels.to_dict())
        d.update(self.provenance.to_dict())
        if self.best_threshold is not None:  # absent rather than None: a card without one stores what it always did
            d.update(best_threshold=float(self.best_threshold),
                     best_threshold_f1=None if self.best_threshold_f1 is None else float(self.best_threshold_f1))
        return d

    # ------------------------------------------------------------------ checks
    def check_matches(self, expect: Mapping[str, Any], where: str, required: Collection[str] = ()) -> None:
        """UserError when a claim of the command line (``expect``: model_name, head, feature_extractor, classes;
        None = no claim) contradicts this card. ``required``: claims of flags the command cannot do without (e.g.
        evaluate's ``--config``), whose fix is another value rather than dropping the flag."""
        d = self.detector
        have_all = {"model_name": d.model_name, "head": d.head, "feature_extractor": d.feature_extractor,
                    "classes": self.classes}
        for key, flag in CLAIM_FLAGS.items():
            want = expect.get(key)
            if want is None:
                continue
            have = have_all[key]
            if key == "classes":
                want = list(want)
            if want == have:
                continue
            shown_want = _describe_classes(want) if key == "classes" else want
            shown_have = _describe_classes(have) if key == "classes" else have
            fix = (f"pass the {flag} the model was trained with, or the matching checkpoint" if key in required
                   else "drop the flag (the checkpoint's metadata is used) or pass the matching checkpoint")
            raise UserError(f"{flag} {shown_want} contradicts checkpoint {where} ({shown_have}); {fix}")


# ------------------------------------------------------------------------------------------------- reading
def load_card(data: Mapping[str, Any], where: str = "checkpoint") -> ModelCard:
    """The card stored in ``data``: a checkpoint payload (its ``meta``, at the payload's ``format_version``), an
    ONNX sidecar (its own ``format_version``) or a bare ``meta`` dict (read as format 1, whose rules leave a newer
    ``meta`` as it is). Older forms are upgraded step by step to the current one here, and only here."""
    if isinstance(data.get("meta"), Mapping):
        version, meta = data.get("format_version", 1), data["meta"]
    else:
        version, meta = data.get("format_version", 1), data
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{where} has format_version {version!r}, this toolkit reads 1..{FORMAT_VERSION}; use the "
                        f"toolkit version that wrote it ({meta.get('toolkit_version', '?')})")
    stored = dict(meta)
    for step in range(version, FORMAT_VERSION):
        stored = _UPGRADES[step](stored)
    return _card(stored, where, version)


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    from ..modeling.heads import HEAD_TYPES, LEGACY_HEAD_CONVS

    if isinstance(meta.get("detector"), Mapping):  # a sidecar: the config had a section of its own
        meta = {**meta.pop("detector"), **meta}
    top = {k: meta.pop(k) for k in ("imgsz", "letterbox", "mean", "std", "size_multiple") if k in meta}
    meta["input"] = {**top, **(meta.get("input") or {})}  # where both exist, ``input`` is the newer record
    kind = HEAD_TYPES.get(meta.get("head", "retinanet"))
    if kind is None or kind.has_tower:  # (an unknown head is refused by the config) SSD has no tower to describe
        meta.setdefault("head_convs", LEGACY_HEAD_CONVS)
        meta.setdefault("head_separable", False)
    return meta


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def _card(meta: dict[str, Any], where: str, version: int) -> ModelCard:
    from ..modeling.config import DetectorConfig

    if not isinstance(meta.get("classes"), (list, tuple)):
        raise UserError(f"{where}: the metadata names no classes; re-save it with train_detection.py")
    try:
        labels = LabelMap(meta["classes"], meta.get("category_ids"))
        provenance = Provenance(toolkit_version=meta.get("toolkit_version"), weights=meta.get("weights"),
                                weights_source=meta.get("weights_source"),
                                includes_backbone=bool(meta.get("includes_backbone", True)),
                                source=meta.get("source") or "ours")
    except ValueError as exc:
        raise UserError(f"{where}: invalid metadata ({exc}); re-save it with train_detection.py") from None
    best, f1 = meta.get("best_threshold"), meta.get("best_threshold_f1")
    return ModelCard(DetectorConfig.from_dict(meta), labels, provenance, version,
                     best_threshold=None if best is None else float(best), best_threshold_f1=None if f1 is None else float(f1))


def training_options(payload: Mapping[str, Any], known: Collection[str] | None = None) -> dict[str, Any]:
    """The training run's options a checkpoint recorded, in ``TrainConfig.to_dict()`` terms; {} when none.

    Format 1 files of the earliest versions hold the parser's namespace (``args``) instead: ``amp`` becomes
    ``precision`` and, when ``known`` lists the TrainConfig fields, the parser-only keys are dropped. A run recorded
    without ``head_separable`` trained dense head convs."""
    if isinstance(payload.get("train_config"), Mapping):
        stored = dict(payload["train_config"])
    elif isinstance(payload.get("args"), Mapping):
        stored = dict(payload["args"])
        if "amp" in stored:
            amp = stored.pop("amp")
            stored.setdefault("precision", "fp32" if amp in (None, "none") else amp)
        if known is not None:
            stored = {k: v for k, v in stored.items() if k in known}
    else:
        return {}
    stored.setdefault("head_separable", False)
    return stored


def model_meta(model: nn.Module, classes: list[str], letterbox: bool | None = None,
               weights: str | None = None, category_ids: list[int] | None = None) -> dict[str, Any]:
    """The stored card of a built model (``ModelCard.from_model(...).to_dict()``), the ``meta`` of a checkpoint."""
    return ModelCard.from_model(model, classes, letterbox, weights, category_ids).to_dict()
