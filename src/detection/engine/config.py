"""The one training configuration, ``TrainConfig``, composed of option groups.

A run is fully described by its ``TrainConfig``: checkpoints store ``cfg.to_dict()`` and the run folder's
``args.yaml`` is that same dict, so ``--cfg args.yaml`` re-runs it exactly. The dict is flat (option names as keys,
as args.yaml files have always been) while the config holds its groups: ``detector`` (what ``DetectorConfig`` is
built from), ``runtime`` (device, precision, batch, workers) and ``output`` (run folder); ``get`` / ``replace`` /
``from_dict`` take the flat option names. The parser that builds it is ``commands/train.py``'s.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..core.choices import DEFAULT_AUGMENT, METRICS, PRESETS, check_cacheable
from ..core.cli import OutputOptions, RuntimeOptions, check_at_least, check_choice, parse_imgsz
from ..core.errors import UserError
from ..core.io import read_yaml, write_text_atomic
from ..modeling.config import DetectorConfig
from .loggers import DEFAULT_LOGGERS, parse_loggers

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step", "multistep")
CACHE_MODES = ("ram", "disk")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
AMP_ALIASES = {"none": "fp32"}  # the older --amp spelling of --precision

# What a resumed run may change (typed flags only); everything else comes from the checkpoint, because it shapes
# the model, the data, the optimiser state or the LR schedule's per-iteration position.
RESUME_OVERRIDABLE = frozenset({"epochs", "workers", "device", "eval_interval", "precision", "compile", "cuda_graphs",
                                "resize_on_device", "max_nonfinite", "patience", "logger"})
# Options that say what to do now (start / find / evaluate a run), not how it trains: not stored with the run
# (so --cfg on a run's args.yaml starts it afresh), and never "ignored" on resume.
NOT_STORED = frozenset({"resume", "eval_only", "model", "name", "exist_ok"})
RUN_CONTROL = NOT_STORED | {"out_dir"}


def _flag(dest: str) -> str:
    return dest.replace("_", "-")


@dataclass
class DetectorOptions:
    """The detector a run trains: ``DetectorConfig`` less what the data decides (``num_classes``) and what the
    built backbone fills in (``mean``, ``std``, ``size_multiple``)."""

    model_name: str = "dinov3_convnext_tiny"
    head: str = "retinanet"
    feature_extractor: str = "multi"
    backbone_impl: str = "timm"
    fine_tune: bool = False
    fpn_channels: int = 128
    head_convs: int | None = None
    head_separable: bool | None = None
    anchor_sizes: tuple[int, ...] | None = None
    anchor_ratios: tuple[float, ...] | None = None
    imgsz: tuple[int, int] = (640, 640)
    letterbox: bool = False
    nms: float = 0.45
    score_thresh: float = 0.05  # the evaluation score threshold (--eval-score-thresh)
    max_det: int = 100
    arch_overrides: dict[str, Any] | None = None  # official constructor kwargs (tiny test models); --cfg only

    def __post_init__(self) -> None:
        self.imgsz = parse_imgsz(self.imgsz)
        checked = self.detector_config(2)  # DetectorConfig checks every field; any valid class count does for that
        self.anchor_sizes, self.anchor_ratios = checked.anchor_sizes, checked.anchor_ratios

    def detector_config(self, num_classes: int) -> DetectorConfig:
        return DetectorConfig(num_classes=num_classes, **asdict(self))


# The groups a TrainConfig holds, by field name; their fields are options like the others.
_PARTS: dict[str, type] = {"detector": DetectorOptions, "runtime": RuntimeOptions, "output": OutputOptions}


@dataclass
class TrainConfig:
    """Every setting of a training run. Flat option names (``train_detection.py`` option dests) are the
    ``detector``, ``runtime`` and ``output`` fields plus the fields below."""

    detector: DetectorOptions = field(default_factory=DetectorOptions)
    weights: str | None = None
    repo_dir: str | None = None
    unfreeze_last: int = 0
    backbone_lr: float | None = None
    layer_decay: float = 1.0
    # data
    config: str = "detection_configs/voc.yaml"
    augment: str = DEFAULT_AUGMENT
    include_difficult: bool = False
    ignore_unknown_classes: bool = False
    skip_bad_samples: bool = False
    cache_features: str | None = None
    resize_on_device: bool | None = None  # None: on a GPU (data.device_resize)
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(batch=8, workers=4))
    # optimisation
    epochs: int = 30
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "cosine"
    lr_steps: list[int] = field(default_factory=list)
    warmup_epochs: float = 1.0
    warmup_iters: int | None = None
    clip_grad: float = 10.0
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 42
    max_nonfinite: int = 10
    compile: str | None = None
    cuda_graphs: bool | None = None  # None: on where the step allows it (loop.GraphedTrainStep)
    # evaluation and outputs
    eval_interval: int = 1
    metric: str = "coco"
    patience: int = 0  # evaluations without improvement of the metric before stopping; 0 = never stop early
    logger: list[str] = field(default_factory=lambda: list(DEFAULT_LOGGERS))
    eval_only: bool = False
    model: str | None = None
    resume: str | None = None
    output: OutputOptions = field(default_factory=lambda: OutputOptions(out_dir="outputs/img_det"))
    no_save_backbone: bool = False

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).lower()
        self.lr_steps = [int(s) for s in (self.lr_steps or [])]
        self.logger = list(parse_loggers(self.logger))
        for name, allowed in (("augment", PRESETS), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                              ("metric", METRICS)):
            check_choice(f"--{_flag(name)}", getattr(self, name), allowed)
        for name, allowed in (("cache_features", CACHE_MODES), ("compile", COMPILE_BACKENDS)):
            if getattr(self, name) is not None:
                check_choice(f"--{_flag(name)}", getattr(self, name), allowed)
        for name, low in (("epochs", 1), ("eval_interval", 1), ("max_nonfinite", 1), ("unfreeze_last", 0),
                          ("patience", 0)):
            check_at_least(f"--{_flag(name)}", getattr(self, name), low)
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"--layer-decay {self.layer_decay}: must be in (0, 1] (1 = the same LR for every layer)")
        if self.detector.fine_tune and self.unfreeze_last:
            raise UserError(f"--fine-tune trains the whole backbone, --unfreeze-last {self.unfreeze_last} only its last "
                            f"layers: pass one of them")
        if self.cache_features:
            check_cacheable(self.augment, self.trains_backbone)
        if self.scheduler == "multistep" and not self.lr_steps:
            raise UserError("--scheduler multistep (or a bare --scheduler) needs milestones: add --scheduler-epochs "
                            "(alias --lr-steps), e.g. --scheduler-epochs 20")

    # -- derived settings
    @property
    def trains_backbone(self) -> bool:
        """Whether any backbone parameter is trained (full fine-tuning or the last ``unfreeze_last`` layers)."""
        return self.detector.fine_tune or self.unfreeze_last > 0

    def detector_config(self, num_classes: int) -> DetectorConfig:
        return self.detector.detector_config(num_classes)

    # -- flat option names
    def get(self, name: str) -> Any:
        """The value of option ``name`` (a flat option name, wherever its group keeps it)."""
        return getattr(getattr(self, _PART_OF[name]), name) if name in _PART_OF else getattr(self, name)

    def options(self) -> dict[str, Any]:
        """Every option by its flat name (groups expanded), in the order args.yaml lists them."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(asdict(value) if f.name in _PARTS else {f.name: value})
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with options changed by flat name (checked like a new config)."""
        return TrainConfig.from_dict({**self.options(), **changes})

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain types (YAML / ``weights_only`` safe), flat; ``NOT_STORED`` options are left at their defaults, so
        the dict describes the run itself and ``--cfg`` on it starts the same run afresh."""
        d = self.options()
        d.update({k: _DEFAULTS[k] for k in NOT_STORED})
        d["imgsz"] = [int(v) for v in self.detector.imgsz]
        for k in ("anchor_sizes", "anchor_ratios"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from flat option names (an args.yaml, a checkpoint's ``train_config``); absent = default."""
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise UserError(f"{source}: unknown training option(s) {', '.join(unknown)}; use the keys of a run's "
                            f"args.yaml (the option names with '_' instead of '-')")
        d = dict(d)
        if "precision" in d:
            d["precision"] = AMP_ALIASES.get(d["precision"], d["precision"])
        parts = {}
        for name in _PARTS:  # each group from its defaults in a TrainConfig, with the given options applied
            default = getattr(_DEFAULT, name)
            given = {k: d.pop(k) for k in _GROUP_FIELDS[name] if k in d}
            parts[name] = type(default)(**{**asdict(default), **given})
        return cls(**parts, **d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        data = read_yaml(path, "--cfg", "pass a run's args.yaml",
                         expected="a mapping of option names to values (a run's args.yaml)")
        return cls.from_dict(data, source=f"--cfg {path}")

    def save_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        return write_text_atomic(path, "# Training configuration of this run; re-run it with: python train_detection.py "
                                 f"--cfg {path.name} (flags typed then override it)\n"
                                 + yaml.safe_dump(self.to_dict(), sort_keys=False))


_GROUP_FIELDS = {name: [f.name for f in fields(kind)] for name, kind in _PARTS.items()}
_PART_OF = {k: name for name, keys in _GROUP_FIELDS.items() for k in keys}
_DEFAULT = TrainConfig()
_DEFAULTS = _DEFAULT.options()
_FIELDS = frozenset(_DEFAULTS)


def resume_config(saved: TrainConfig, given: TrainConfig, typed: frozenset[str] | None) -> tuple[TrainConfig, list[str]]:
    """The configuration a resumed run continues with, and the typed options it ignores (for a note).

    The saved run's settings stay; ``RESUME_OVERRIDABLE`` options replace them when typed now (``typed=None``, for
    API callers: all of them are taken from ``given``). Typing a value equal to the saved one is not "ignored".
    """
    take = RESUME_OVERRIDABLE if typed is None else RESUME_OVERRIDABLE & typed
    changes = {k: given.get(k) for k in take | RUN_CONTROL}
    ignored = sorted(k for k in (typed or ()) - RESUME_OVERRIDABLE - RUN_CONTROL if given.get(k) != saved.get(k))
    return saved.replace(**changes), ignored
