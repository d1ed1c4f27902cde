r"""Train a detector (SSD / RetinaNet / FCOS) on a frozen DINOv3 backbone from a VOC, COCO or YOLO dataset.

    python train_detection.py --weights dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth \
        --model-name dinov3_convnext_tiny --imgsz 640 640 --lr 0.0001 --epochs 30 --workers 8 --batch 8 \
        --config detection_configs/voc.yaml --head retinanet

Re-run a run exactly: --cfg outputs/img_det/run_1/args.yaml (flags typed after it override it).
Multi-GPU: torchrun --nproc_per_node N train_detection.py ...  See README.md for every flag.
"""

from src.detection.core.errors import run_cli


def main() -> int:
    from src.detection.commands.train import main

    return main()


if __name__ == "__main__":
    run_cli(main)
