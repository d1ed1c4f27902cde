#!/usr/bin/env bash
# `make demo`: synthetic VOC-XML data -> train a detector on a frozen (random-weight) DINOv3-style backbone on CPU
# -> image and video inference with the best checkpoint. No download, no GPU. Recipe: README.md "The demo".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=input/shapes
RUN=outputs/img_det/demo
INFER=outputs/inference/demo

echo "== 1/4 synthetic dataset -> $DATA"
$PY -m src.detection.synthetic --out "$DATA" --train 1600 --valid 200 --imgsz 192 --seed 0 --video 240

echo "== 2/4 training (CPU, frozen random-weight backbone: no pretrained DINOv3 weights exist on this machine)"
$PY train_detection.py --config "$DATA/shapes.yaml" --model-name dinov3_convnext_atto --head fcos \
    --feature-extractor multi --fpn-channels 64 --imgsz 192 --batch 8 --workers 2 --lr 1e-3 --epochs 12 \
    --warmup-epochs 0.5 --augment flip --cache-features ram --name demo --exist-ok --seed 0

echo "== 3/4 image inference"
$PY infer_det_image.py --input "$DATA/valid/images" --model "$RUN/best_model.pth" --threshold 0.5 \
    --out-dir outputs/inference --name demo --exist-ok --max-images 24

echo "== 4/4 video inference"
$PY infer_det_video.py --input "$DATA/demo.mp4" --model "$RUN/best_model.pth" --threshold 0.5 \
    --out-dir outputs/inference --name demo_video --exist-ok

echo
echo "Demo finished. Outputs:"
echo "  dataset            $DATA  (config $DATA/shapes.yaml)"
echo "  training run       $RUN   (best_model.pth, results.csv, train_loss.png, map.png, per_class_ap.csv)"
echo "  annotated images   $INFER  (predictions.json)"
echo "  annotated video    outputs/inference/demo_video"
