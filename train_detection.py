"""Train a detector (SSD / RetinaNet / FCOS) on a frozen DINOv3 backbone from a VOC-XML dataset.

    python train_detection.py --weights dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth \
        --model-name dinov3_convnext_tiny --imgsz 640 640 --lr 0.0001 --epochs 30 --workers 8 --batch 8 \
        --config detection_configs/voc.yaml --head retinanet

Multi-GPU: ``torchrun --nproc_per_node N train_detection.py ...``. See README.md for every flag.
"""

from __future__ import annotations

import argparse

from src.detection.errors import run_cli
from src.detection.transforms import DEFAULT_AUGMENT, PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (flags of the reference project keep working)")
    g.add_argument("--model-name", default="dinov3_convnext_tiny", help="DINOv3 entry point, e.g. dinov3_vits16")
    g.add_argument("--weights", default=None, help="backbone .pth: a path or a file name in weights/ or "
                   "$DINOv3_WEIGHTS; omitted = random init (warning)")
    g.add_argument("--head", default="retinanet", choices=["retinanet", "ssd", "fcos"])
    g.add_argument("--feature-extractor", default="multi", choices=["multi", "last"],
                   help="multi: feature pyramid (recommended); last: the reference's single last map")
    g.add_argument("--backbone-impl", default="timm", choices=["timm", "hub"],
                   help="timm (default) or the official repo via torch.hub (needs DINOv3_REPO)")
    g.add_argument("--fine-tune", action="store_true", help="train the backbone too (default: frozen)")
    g.add_argument("--backbone-lr", type=float, default=None, help="LR for the backbone with --fine-tune")
    g.add_argument("--fpn-channels", type=int, default=128,
                   help="width of the FPN / pyramid and the head convs (256 = torchvision RetinaNet; 128 trains ~1.7x faster)")
    g.add_argument("--imgsz", type=int, nargs="+", default=[640, 640], metavar="N", help="W H, or one size")
    g.add_argument("--letterbox", action="store_true", help="keep aspect ratio and pad instead of stretching")
    g.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold")
    g.add_argument("--score-thresh", type=float, default=0.05, help="score threshold used for evaluation")
    g.add_argument("--max-det", type=int, default=100, help="detections kept per image")

    g = p.add_argument_group("data")
    g.add_argument("--config", default="detection_configs/voc.yaml", help="dataset YAML (see detection_configs/)")
    g.add_argument("--augment", default=DEFAULT_AUGMENT, choices=PRESETS,
                   help="augmentation preset (flip trained best on the synthetic set, docs/DEMO.md)")
    g.add_argument("--include-difficult", action="store_true", help="train on 'difficult' objects too")
    g.add_argument("--ignore-unknown-classes", action="store_true", help="skip objects whose class is not in CLASSES")
    g.add_argument("--skip-bad-samples", action="store_true", help="skip unreadable images / malformed XML")
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--cache-features", nargs="?", const="ram", default=None, choices=["ram", "disk"],
                   help="compute frozen backbone features once (augment none/flip only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--scheduler", nargs="?", const="cosine", default="cosine",
                   choices=["none", "cosine", "step", "multistep"])
    g.add_argument("--lr-steps", type=int, nargs="*", default=[], help="epochs for step/multistep decay")
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--warmup-iters", type=int, default=None, help="overrides --warmup-epochs")
    g.add_argument("--clip-grad", type=float, default=10.0, help="max grad norm (0 = off)")
    g.add_argument("--amp", nargs="?", const="auto", default="auto", choices=["auto", "none", "fp16", "bf16"],
                   help="mixed precision: auto (default) = bf16 where the GPU/CPU runs it natively, fp16 + GradScaler "
                        "on older GPUs, else fp32; none = always fp32")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the trainable weights (evaluated/saved)")
    g.add_argument("--ema-decay", type=float, default=0.9998)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many NaN/inf losses in a row")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--metric", default="coco", choices=["coco", "voc07", "voc12", "all"])
    g.add_argument("--eval-only", action="store_true", help="evaluate --model on the validation split and exit")
    g.add_argument("--model", default=None, help="checkpoint for --eval-only")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: last_model.pth of --name or the latest run)")
    g.add_argument("--out-dir", default="outputs/img_det", help="parent folder of run folders")
    g.add_argument("--name", default=None, help="run folder name (default: run_N, auto-increment)")
    g.add_argument("--exist-ok", action="store_true", help="reuse an existing --name folder")
    g.add_argument("--no-save-backbone", action="store_true",
                   help="leave frozen backbone weights out of checkpoints (smaller; inference then needs --weights)")
    return p


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    from src.detection.train import run

    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    run(args, explicit=explicit)
    return 0


if __name__ == "__main__":
    run_cli(main)
