"""The one training configuration: ``TrainConfig`` and the ``train_detection.py`` parser that builds it.

A run is fully described by its ``TrainConfig``: checkpoints store ``cfg.to_dict()`` and the run folder's
``args.yaml`` is that same dict, so ``--cfg args.yaml`` re-runs it exactly (flags typed on the command line
override the file). ``parse_train_config`` also returns which options the user actually typed, because a resumed
run must tell "typed at the default value" apart from "not typed".
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..core.cli import new_parser, parse_imgsz
from ..core.errors import UserError
from ..core.io import read_yaml, write_text_atomic
from ..core.runtime import PRECISIONS
from ..data.transforms import DEFAULT_AUGMENT, PRESETS
from ..modeling.model import BACKBONE_IMPLS, FEATURE_EXTRACTORS, HEADS, DetectorConfig
from .feature_cache import check_cacheable

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step", "multistep")
METRICS = ("coco", "voc07", "voc12", "all")
CACHE_MODES = ("ram", "disk")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
AMP_ALIASES = {"none": "fp32"}  # the older --amp spelling of --precision

# What a resumed run may change (typed flags only); everything else comes from the checkpoint, because it shapes
# the model, the data, the optimiser state or the LR schedule's per-iteration position.
RESUME_OVERRIDABLE = frozenset({"epochs", "workers", "device", "eval_interval", "precision", "compile",
                                "max_nonfinite"})
# Options that say what to do now (start / find / evaluate a run), not how it trains: not stored with the run
# (so --cfg on a run's args.yaml starts it afresh), and never "ignored" on resume.
NOT_STORED = frozenset({"resume", "eval_only", "model", "name", "exist_ok"})
RUN_CONTROL = NOT_STORED | {"out_dir"}


@dataclass
class TrainConfig:
    """Every setting of a training run (field names = ``train_detection.py`` option dests)."""

    # model
    model_name: str = "dinov3_convnext_tiny"
    weights: str | None = None
    head: str = "retinanet"
    feature_extractor: str = "multi"
    backbone_impl: str = "timm"
    repo_dir: str | None = None
    fine_tune: bool = False
    unfreeze_last: int = 0
    backbone_lr: float | None = None
    layer_decay: float = 1.0
    fpn_channels: int = 128
    head_convs: int | None = None
    head_separable: bool | None = None
    imgsz: tuple[int, int] = (640, 640)
    letterbox: bool = False
    nms: float = 0.45
    score_thresh: float = 0.05
    max_det: int = 100
    arch_overrides: dict[str, Any] | None = None  # official constructor kwargs (tiny test models); --cfg only
    # data
    config: str = "detection_configs/voc.yaml"
    augment: str = DEFAULT_AUGMENT
    include_difficult: bool = False
    ignore_unknown_classes: bool = False
    skip_bad_samples: bool = False
    workers: int = 4
    batch: int = 8
    cache_features: str | None = None
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
    precision: str = "auto"
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 42
    max_nonfinite: int = 10
    device: str = "auto"
    compile: str | None = None
    # evaluation and outputs
    eval_interval: int = 1
    metric: str = "coco"
    eval_only: bool = False
    model: str | None = None
    resume: str | None = None
    out_dir: str = "outputs/img_det"
    name: str | None = None
    exist_ok: bool = False
    no_save_backbone: bool = False

    def __post_init__(self) -> None:
        self.imgsz = parse_imgsz(self.imgsz)
        self.optimizer = str(self.optimizer).lower()
        self.precision = AMP_ALIASES.get(self.precision, self.precision)
        self.lr_steps = [int(s) for s in (self.lr_steps or [])]
        checks = [("head", HEADS), ("feature_extractor", FEATURE_EXTRACTORS), ("backbone_impl", BACKBONE_IMPLS),
                  ("augment", PRESETS), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                  ("precision", PRECISIONS), ("metric", METRICS)]
        for name, allowed in checks:
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"--{_flag(name)} {value!r} is not valid; choose one of {', '.join(allowed)}")
        for name, allowed in (("cache_features", CACHE_MODES), ("compile", COMPILE_BACKENDS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise UserError(f"--{_flag(name)} {value!r} is not valid; choose one of {', '.join(allowed)}")
        for name, low in (("epochs", 1), ("batch", 1), ("workers", 0), ("eval_interval", 1), ("max_nonfinite", 1),
                          ("unfreeze_last", 0)):
            if int(getattr(self, name)) < low:
                raise UserError(f"--{_flag(name)} {getattr(self, name)}: must be at least {low}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"--layer-decay {self.layer_decay}: must be in (0, 1] (1 = the same LR for every layer)")
        if self.fine_tune and self.unfreeze_last:
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
        return self.fine_tune or self.unfreeze_last > 0

    def detector_config(self, num_classes: int) -> DetectorConfig:
        return DetectorConfig(model_name=self.model_name, num_classes=num_classes, head=self.head,
                              feature_extractor=self.feature_extractor, imgsz=self.imgsz, letterbox=self.letterbox,
                              backbone_impl=self.backbone_impl, fine_tune=self.fine_tune, nms=self.nms,
                              score_thresh=self.score_thresh, max_det=self.max_det,
                              arch_overrides=self.arch_overrides, fpn_channels=self.fpn_channels,
                              head_convs=self.head_convs, head_separable=self.head_separable)

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain types (YAML / ``weights_only`` safe); ``NOT_STORED`` options are left at their defaults, so the
        dict describes the run itself and ``--cfg`` on it starts the same run afresh."""
        d = asdict(replace(self, **{k: _DEFAULTS[k] for k in NOT_STORED}))
        d["imgsz"] = [int(v) for v in self.imgsz]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise UserError(f"{source}: unknown training option(s) {', '.join(unknown)}; use the keys of a run's "
                            f"args.yaml (the option names with '_' instead of '-')")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        data = read_yaml(path, "--cfg", "pass a run's args.yaml",
                         expected="a mapping of option names to values (a run's args.yaml)")
        return cls.from_dict(data, source=f"--cfg {path}")

    def save_yaml(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, "# Training configuration of this run; re-run it with: python train_detection.py --cfg "
                       f"{path.name} (flags typed then override it)\n" + yaml.safe_dump(self.to_dict(), sort_keys=False))


_FIELDS = {f.name for f in fields(TrainConfig)}
_DEFAULTS = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}


def _flag(dest: str) -> str:
    return dest.replace("_", "-")


def legacy_config(args: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``args`` from before TrainConfig (argparse namespace): renamed keys mapped, others dropped."""
    d = dict(args)
    if "amp" in d:
        d.setdefault("precision", d.pop("amp") or "fp32")
    return {k: v for k, v in d.items() if k in _FIELDS}


# --------------------------------------------------------------------------------------------------- parser

def _lower(value: str) -> str:
    return value.lower()


def _amp(value: str) -> str:
    return AMP_ALIASES.get(value, value)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``train_detection.py``'s parser. Option dests are TrainConfig field names (plus ``cfg``).

    ``allow_abbrev=False``: the reference's ``--weight`` must not be taken as an abbreviation of anything, and only
    spelled-out aliases are accepted.
    """
    p = new_parser(description)
    d = TrainConfig()
    p.add_argument("--cfg", default=None, metavar="YAML",
                   help="start from a saved configuration (a run's args.yaml); flags typed now override it")

    g = p.add_argument_group("model (the reference project's flags keep working)")
    g.add_argument("--model-name", default=d.model_name, help="DINOv3 entry point, e.g. dinov3_vits16")
    g.add_argument("--weights", "--weight", dest="weights", default=d.weights,
                   help="backbone weights: Meta .pth, a transformers folder/safetensors, a timm file, hf-hub:ORG/REPO or "
                        "timm:NAME; a bare file name is looked up in weights/ and $DINOv3_WEIGHTS; omitted = random "
                        "init (warning)")
    g.add_argument("--head", default=d.head, choices=HEADS, help="detection head")
    g.add_argument("--feature-extractor", "--feautre-extractor", dest="feature_extractor",
                   default=d.feature_extractor, choices=FEATURE_EXTRACTORS,
                   help="multi: feature pyramid (recommended); last: the reference's single last map")
    g.add_argument("--backbone-impl", default=d.backbone_impl, choices=BACKBONE_IMPLS,
                   help="timm, or the official code via torch.hub (needs --repo-dir or DINOv3_REPO)")
    g.add_argument("--repo-dir", default=d.repo_dir,
                   help="official DINOv3 clone for --backbone-impl hub (what DINOv3_REPO in .env sets)")
    g.add_argument("--fine-tune", action="store_true", help="train the whole backbone too (off: frozen)")
    g.add_argument("--unfreeze-last", type=int, default=d.unfreeze_last, metavar="N",
                   help="train only the last N backbone layers (ConvNeXt stages / ViT blocks); 0 = frozen")
    g.add_argument("--backbone-lr", type=float, default=d.backbone_lr,
                   help="LR of the deepest trained backbone layer (None: --lr)")
    g.add_argument("--layer-decay", type=float, default=d.layer_decay, metavar="R",
                   help="each earlier trained backbone layer gets R x the LR of the layer after it")
    g.add_argument("--head-convs", type=int, default=d.head_convs, metavar="N",
                   help="conv layers per RetinaNet/FCOS head branch, 0-4 (default: torchvision's 4; fewer = cheaper "
                        "steps but slower learning, docs/DEMO.md)")
    g.add_argument("--head-separable", action=argparse.BooleanOptionalAction, default=d.head_separable,
                   help="depthwise-separable head convs (EfficientDet-style; ~8x fewer head FLOPs); None: "
                        "the built-in default for the feature extractor")
    g.add_argument("--fpn-channels", type=int, default=d.fpn_channels,
                   help="width of the FPN / pyramid and the head convs (256 = torchvision RetinaNet; 128 trains "
                        "~1.7x faster)")
    g.add_argument("--imgsz", type=int, nargs="+", default=list(d.imgsz), metavar="N", help="W H, or one size")
    g.add_argument("--letterbox", action="store_true", help="keep aspect ratio and pad instead of stretching")
    g.add_argument("--nms", type=float, default=d.nms, help="NMS IoU threshold")
    g.add_argument("--threshold", "--score-thresh", dest="score_thresh", type=float, default=d.score_thresh,
                   help="score threshold used for evaluation (keep it low for mAP)")
    g.add_argument("--max-det", type=int, default=d.max_det, help="detections kept per image")

    g = p.add_argument_group("data")
    g.add_argument("--config", default=d.config, help="dataset YAML (see detection_configs/)")
    g.add_argument("--augment", default=d.augment, choices=PRESETS,
                   help="augmentation preset (flip trained best on the synthetic set, docs/DEMO.md)")
    g.add_argument("--include-difficult", action="store_true", help="train on 'difficult' objects too")
    g.add_argument("--ignore-unknown-classes", action="store_true",
                   help="skip objects whose class is not in CLASSES")
    g.add_argument("--skip-bad-samples", action="store_true", help="skip unreadable images / malformed XML")
    g.add_argument("--workers", type=int, default=d.workers, help="data loader worker processes")
    g.add_argument("--batch", type=int, default=d.batch, help="images per step (per GPU under DDP)")
    g.add_argument("--cache-features", nargs="?", const="ram", default=d.cache_features, choices=CACHE_MODES,
                   help="compute frozen backbone features once, for training and validation images (augment "
                        "none/flip; not with a trained backbone)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="number of epochs")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate")
    g.add_argument("--optimizer", type=_lower, default=d.optimizer, choices=OPTIMIZERS,
                   help="adamw or sgd (any case: AdamW, SGD)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (not on norms/biases)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--scheduler", nargs="?", const="multistep", default=d.scheduler, choices=SCHEDULERS,
                   help="per-iteration LR schedule after warm-up; a bare --scheduler is the reference's switch: "
                        "multistep at --scheduler-epochs, gamma 0.1")
    g.add_argument("--lr-steps", "--scheduler-epochs", dest="lr_steps", type=int, nargs="*", default=d.lr_steps,
                   metavar="EPOCH", help="milestone epochs of step/multistep decay (x0.1 each)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear LR warm-up length")
    g.add_argument("--warmup-iters", type=int, default=d.warmup_iters, help="warm-up in iterations (overrides "
                   "--warmup-epochs)")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0 = off)")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="autocast: auto = bf16 where the GPU/CPU runs it natively, fp16 + GradScaler on older "
                        "GPUs (T4, V100), else fp32")
    g.add_argument("--amp", dest="precision", nargs="?", const="auto", type=_amp, default=d.precision,
                   choices=PRECISIONS, metavar="{auto,none,fp16,bf16}", help="older spelling of --precision (auto/none/fp16/bf16; none = fp32)")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the trainable weights (evaluated, and "
                   "saved as best_model.pth)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (data order, augmentation, init)")
    g.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after this many NaN/inf losses in a row")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--compile", nargs="?", const="inductor", default=d.compile, choices=COMPILE_BACKENDS,
                   help="torch.compile the training forward (backend; eager/aot_eager are for debugging)")

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate every N epochs (and at "
                   "the end)")
    g.add_argument("--metric", default=d.metric, choices=METRICS, help="metric that picks best_model.pth")
    g.add_argument("--eval-only", action="store_true", help="evaluate --model on the validation split and exit")
    g.add_argument("--model", default=d.model, help="checkpoint for --eval-only")
    g.add_argument("--resume", nargs="?", const="auto", default=d.resume,
                   help="continue a run from its last_model.pth (bare: that of --name or the newest run); "
                        f"only {', '.join('--' + _flag(k) for k in sorted(RESUME_OVERRIDABLE))} may change")
    g.add_argument("--out-dir", default=d.out_dir, help="parent folder of run folders")
    g.add_argument("--name", default=d.name, help="run folder name (default: run_N, auto-increment)")
    g.add_argument("--exist-ok", action="store_true", help="reuse an existing --name folder")
    g.add_argument("--no-save-backbone", action="store_true",
                   help="leave frozen backbone weights out of checkpoints (smaller; inference then needs --weights)")
    return p


def typed_options(argv: Sequence[str], description: str | None = None) -> frozenset[str]:
    """Dests of the options present in ``argv`` - whatever their value, defaults included.

    A second parse with every default suppressed leaves exactly the typed options in the namespace.
    """
    parser = build_parser(description)
    for action in parser._actions:  # not set_defaults: argparse would run the SUPPRESS string through type=int
        action.default = argparse.SUPPRESS
    ns = parser.parse_args(list(argv))
    return frozenset(k for k, v in vars(ns).items() if v != argparse.SUPPRESS)


def parse_train_config(argv: Sequence[str] | None = None, description: str | None = None
                       ) -> tuple[TrainConfig, frozenset[str]]:
    """``(TrainConfig, typed option dests)`` for a ``train_detection.py`` command line (``--cfg`` applied)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = vars(build_parser(description).parse_args(argv))
    typed = typed_options(argv, description)
    cfg_file = ns.pop("cfg")
    if cfg_file:
        base = TrainConfig.from_yaml(cfg_file).to_dict()
        ns = {**base, **{k: v for k, v in ns.items() if k in typed}}
    return TrainConfig.from_dict(ns), typed - {"cfg"}


def resume_config(saved: TrainConfig, given: TrainConfig, typed: frozenset[str] | None) -> tuple[TrainConfig, list[str]]:
    """The configuration a resumed run continues with, and the typed options it ignores (for a note).

    The saved run's settings stay; ``RESUME_OVERRIDABLE`` options replace them when typed now (``typed=None``, for
    API callers: all of them are taken from ``given``). Typing a value equal to the saved one is not "ignored".
    """
    take = RESUME_OVERRIDABLE if typed is None else RESUME_OVERRIDABLE & typed
    changes = {k: getattr(given, k) for k in take}
    changes.update({k: getattr(given, k) for k in RUN_CONTROL})
    ignored = sorted(k for k in (typed or ()) - RESUME_OVERRIDABLE - RUN_CONTROL
                     if getattr(given, k) != getattr(saved, k))
    return replace(saved, **changes), ignored
