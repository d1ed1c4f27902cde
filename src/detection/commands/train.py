r"""Train a detector (SSD / RetinaNet / FCOS) on a frozen DINOv3 backbone from a VOC, COCO or YOLO dataset.

    python train_detection.py --weights dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth \
        --model-name dinov3_convnext_tiny --imgsz 640 640 --lr 0.0001 --epochs 30 --workers 8 --batch 8 \
        --config detection_configs/voc.yaml --head retinanet

Re-run a run exactly: --cfg outputs/img_det/run_1/args.yaml (flags typed after it override it).
Multi-GPU: torchrun --nproc_per_node N train_detection.py ...  See README.md for every flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..core.choices import BACKBONE_IMPLS, FEATURE_EXTRACTORS, HEADS, METRICS, PRECISIONS, PRESETS
from ..core.cli import OutputOptions, RuntimeOptions, new_parser
from ..core.errors import run_cli
from ..engine.config import (
    AMP_ALIASES,
    CACHE_MODES,
    COMPILE_BACKENDS,
    OPTIMIZERS,
    RESUME_OVERRIDABLE,
    SCHEDULERS,
    TrainConfig,
)
from ..engine.loggers import DEFAULT_LOGGERS, LOGGERS


def _lower(value: str) -> str:
    return value.lower()


def _amp(value: str) -> str:
    return AMP_ALIASES.get(value, value)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """``train_detection.py``'s parser. Option dests are TrainConfig's option names (plus ``cfg``).

    No abbreviations (``new_parser``): the reference's ``--weight`` must not be taken as an abbreviation of anything,
    and only spelled-out aliases are accepted.
    """
    p = new_parser(description)
    d = TrainConfig()
    m = d.detector
    p.add_argument("--cfg", default=None, metavar="YAML",
                   help="start from a saved configuration (a run's args.yaml); flags typed now override it")

    g = p.add_argument_group("model (the reference project's flags keep working)")
    g.add_argument("--model-name", default=m.model_name, help="DINOv3 entry point, e.g. dinov3_vits16")
    g.add_argument("--weights", "--weight", dest="weights", default=d.weights,
                   help="backbone weights: Meta .pth, a transformers folder/safetensors, a timm file, hf-hub:ORG/REPO or "
                        "timm:NAME; a bare file name is looked up in weights/ and $DINOv3_WEIGHTS; omitted = random "
                        "init (warning)")
    g.add_argument("--head", default=m.head, choices=HEADS, help="detection head")
    g.add_argument("--feature-extractor", "--feautre-extractor", dest="feature_extractor",
                   default=m.feature_extractor, choices=FEATURE_EXTRACTORS,
                   help="multi: feature pyramid (recommended); last: the reference's single last map")
    g.add_argument("--backbone-impl", default=m.backbone_impl, choices=BACKBONE_IMPLS,
                   help="timm, or the official code via torch.hub (needs --repo-dir or DINOv3_REPO)")
    g.add_argument("--repo-dir", default=d.repo_dir,
                   help="official DINOv3 clone for --backbone-impl hub (what DINOv3_REPO in .env sets)")
    g.add_argument("--fine-tune", action="store_true", help="train the whole backbone too (off: frozen)")
    g.add_argument("--unfreeze-last", type=int, default=d.unfreeze_last, metavar="N",
                   help="train only the last N backbone layers (ConvNeXt stages / ViT blocks); 0 = frozen")
    g.add_argument("--backbone-lr", type=float, default=d.backbone_lr,
                   help="LR of the deepest trained backbone layer (default: --lr)")
    g.add_argument("--layer-decay", type=float, default=d.layer_decay, metavar="R",
                   help="each earlier trained backbone layer gets R x the LR of the layer after it")
    g.add_argument("--head-convs", type=int, default=m.head_convs, metavar="N",
                   help="conv layers per RetinaNet/FCOS head branch, 0-4 (default: torchvision's 4; fewer = cheaper "
                        "steps but slower learning, docs/DEMO.md)")
    g.add_argument("--head-separable", action=argparse.BooleanOptionalAction, default=m.head_separable,
                   help="depthwise-separable head convs (EfficientDet-style, ~4.6x fewer neck+head FLOPs): the "
                        "CPU option (cached CPU steps ~2.3x faster); a GPU runs torchvision's dense head (the "
                        "default) faster")
    g.add_argument("--anchor-sizes", type=int, nargs="+", default=m.anchor_sizes, metavar="PX",
                   help="RetinaNet anchor sizes in input pixels: one base size per pyramid level (each gets 3 octave "
                        "scales; default 4 x stride: 32 64 128 256 512), or with --feature-extractor last that "
                        "level's sizes; `python -m src.detection.analyze` suggests them for a dataset")
    g.add_argument("--anchor-ratios", type=float, nargs="+", default=m.anchor_ratios, metavar="H/W",
                   help="RetinaNet anchor aspect ratios, height / width (default: 0.5 1 2)")
    g.add_argument("--fpn-channels", type=int, default=m.fpn_channels,
                   help="width of the FPN / pyramid and the head convs (256 = torchvision RetinaNet; 128 trains "
                        "~1.7x faster)")
    g.add_argument("--imgsz", type=int, nargs="+", default=list(m.imgsz), metavar="N", help="W H, or one size")
    g.add_argument("--letterbox", action="store_true", help="keep aspect ratio and pad instead of stretching")
    g.add_argument("--nms", type=float, default=m.nms, help="NMS IoU threshold")
    g.add_argument("--eval-score-thresh", dest="score_thresh", type=float, default=m.score_thresh,
                   help="lowest score a detection needs to be evaluated (keep it low for mAP; the checkpoint records "
                        "it as the model's score threshold); older spellings --score-thresh and --threshold")
    # Older spellings; hidden, because in the inference commands --threshold is the drawing threshold.
    g.add_argument("--score-thresh", "--threshold", dest="score_thresh", type=float, default=m.score_thresh,
                   help=argparse.SUPPRESS)
    g.add_argument("--max-det", type=int, default=m.max_det, help="detections kept per image")

    g = p.add_argument_group("data")
    g.add_argument("--config", default=d.config, help="dataset YAML (see detection_configs/)")
    g.add_argument("--augment", default=d.augment, choices=PRESETS,
                   help="augmentation preset (flip trained best on the synthetic set, docs/DEMO.md)")
    g.add_argument("--include-difficult", action="store_true", help="train on 'difficult' objects too")
    g.add_argument("--ignore-unknown-classes", action="store_true",
                   help="skip objects whose class is not in CLASSES")
    g.add_argument("--skip-bad-samples", action="store_true", help="skip unreadable images / malformed XML")
    g.add_argument("--cache-features", nargs="?", const="ram", default=d.cache_features, choices=CACHE_MODES,
                   help="compute frozen backbone features once, for training and validation images (augment "
                        "none/flip; not with a trained backbone). ram: kept in GPU memory when they fit in half "
                        "of it, else pinned host memory; disk: files in the run folder")
    g.add_argument("--resize-on-device", action=argparse.BooleanOptionalAction, default=d.resize_on_device,
                   help="loader workers only decode (and run --augment ssd's photometric/zoom/crop); flip and "
                        "resize run on the training device in batches. Default: on a GPU, where it frees the "
                        "CPU workers; on a CPU the workers resize in parallel with the step")

    g = p.add_argument_group("runtime")
    RuntimeOptions.add_to(g, precision_help="autocast: auto = bf16 where the GPU/CPU runs it natively, fp16 + "
                                            "GradScaler on older GPUs (T4, V100), else fp32",
                          batch=d.runtime.batch, batch_help="images per step (per GPU under DDP)",
                          workers=d.runtime.workers, workers_help="data loader worker processes")
    g.add_argument("--amp", dest="precision", nargs="?", const="auto", type=_amp, default=d.runtime.precision,
                   choices=PRECISIONS, metavar="{auto,none,fp16,bf16}",
                   help="older spelling of --precision (auto/none/fp16/bf16; none = fp32)")
    g.add_argument("--compile", nargs="?", const="inductor", default=d.compile, choices=COMPILE_BACKENDS,
                   help="torch.compile the training forward (backend; eager/aot_eager are for debugging)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs,
                   help="replay each training step from a CUDA graph (one launch for the whole step; GPU, "
                        "bf16/fp32, AdamW, one process, no --compile, frozen backbone). Default: on where that holds")

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
    g.add_argument("--ema", action="store_true", help="keep an EMA of the trainable weights (evaluated, and "
                   "saved as best_model.pth)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (data order, augmentation, init)")
    g.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after this many NaN/inf losses in a row")

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate every N epochs (and at "
                   "the end)")
    g.add_argument("--metric", default=d.metric, choices=METRICS, help="metric that picks best_model.pth")
    g.add_argument("--patience", type=int, default=d.patience, metavar="N",
                   help="stop after N evaluations without improvement of --metric (last_model.pth stays resumable); "
                        "0 = off")
    g.add_argument("--logger", nargs="+", action="extend", default=None, choices=LOGGERS, metavar="NAME",
                   help=f"experiment loggers, several allowed ({', '.join(LOGGERS)}); results.csv is always "
                        f"written; TensorBoard logs go to <run>/tensorboard. Default: {' '.join(DEFAULT_LOGGERS)} "
                        f"(--logger csv turns TensorBoard off)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --model on the validation split of --config and exit (--model-name, --head, "
                        "--imgsz, ... describe a reference-project checkpoint)")
    g.add_argument("--model", default=d.model, help="checkpoint for --eval-only")
    g.add_argument("--resume", nargs="?", const="auto", default=d.resume,
                   help="continue a run from its last_model.pth (bare: that of --name or the newest run); "
                        f"only {', '.join(_flag(k) for k in sorted(RESUME_OVERRIDABLE))} may change")
    OutputOptions.add_to(g, out_dir=d.output.out_dir, out_dir_help="parent folder of run folders",
                         name_help="run folder name (default: run_N, auto-increment)",
                         exist_ok_help="reuse an existing --name folder")
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


def parse_train_config(argv: Sequence[str] | None = None, description: str | None = __doc__
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


def main(argv: Sequence[str] | None = None) -> int:
    cfg, typed = parse_train_config(argv)
    from ..engine.training import run  # after parsing: --help and flag errors skip the model and plotting code

    run(cfg, typed=typed)
    return 0


if __name__ == "__main__":
    run_cli(main)
